//! The directory inside lbd: the agent interface (add, delete, search, find-server,
//! heartbeat, register with a lease, subscribe) over the local replica, lease expiry
//! on a timer, and the data plane fed from the replica. This node is its own master
//! for now (no backup); replication between nodes uses `directory::replication`.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Mutex};
use tracing::{info, warn};

use crate::{
    shell::daemon::Daemon,
    directory::{
        replication::{Agent, Backup, Master, Msg, NodeId, Out},
        store::DirectoryStore,
        subscriptions::Event,
        tables::{names, Change, CompleteRoute, Entry, Heartbeats, Op, ServerRoute, Tables},
    },
    model::{DirBackend, ServiceKey},
    shell::neighbor::NeighborTable,
};

/// A backend registering itself (or registered by a sidecar) with a lease.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Registration {
    pub service: ServiceKey,
    /// Instance name, unique within the service (default: the address and port).
    #[serde(default)]
    pub instance: Option<String>,
    pub address: IpAddr,
    pub port: u16,
    #[serde(default = "one")]
    pub weight: u32,
    /// The lease: without a renewal within this long, the backend is invalid.
    pub ttl_ms: u64,
}

fn one() -> u32 {
    1
}

impl Registration {
    pub fn instance(&self) -> String {
        self.instance.clone().unwrap_or_else(|| match self.address {
            IpAddr::V4(a) => format!("{a}:{}", self.port),
            IpAddr::V6(a) => format!("[{a}]:{}", self.port),
        })
    }

    pub fn value(&self) -> String {
        let host = match self.address {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        format!("{host}:{};weight={}", self.port, self.weight)
    }
}

/// The backends the directory holds for each service: the data plane's input. A
/// backend's identity is its host's first route (route 0, valid or not) or the address
/// it was registered with, so that a route change moves its frames (`via`) without
/// moving its flows. An invalid entry (lease expired, health failing) keeps weight 0:
/// no new flow, and its flows continue, as with a drain; only a deleted entry leaves.
pub fn backends_by_service(
    tables: &Tables,
    services: &[ServiceKey],
) -> BTreeMap<ServiceKey, BTreeMap<IpAddr, DirBackend>> {
    let mut out = BTreeMap::new();
    for key in services {
        let mut backends: BTreeMap<IpAddr, DirBackend> = BTreeMap::new();
        for e in tables.search(&names::service(&key.to_string()), "") {
            let Some(server) = ServerRoute::parse(&e.value) else {
                continue;
            };
            let Some((via, _)) = tables.host_route(&server.host) else {
                continue;
            };
            let identity = server.host.parse::<IpAddr>().ok().or_else(|| {
                tables
                    .search(names::HOST_ROUTES, &format!("{}#", server.host))
                    .into_iter()
                    .filter_map(|r| {
                        Some((
                            r.key.rsplit_once('#')?.1.parse::<u32>().ok()?,
                            r.value.parse::<IpAddr>().ok()?,
                        ))
                    })
                    .min_by_key(|(order, _)| *order)
                    .map(|(_, a)| a)
            });
            let Some(identity) = identity else { continue };
            if identity.is_ipv4() != key.addr.is_ipv4() || via.is_ipv4() != key.addr.is_ipv4() {
                continue;
            }
            let weight = if e.valid { server.weight() } else { 0 };
            let b = backends.entry(identity).or_insert(DirBackend {
                weight: 0,
                via,
                sphere: None,
            });
            b.weight = b.weight.max(weight);
            if let Some(s) = server.attributes.get("sphere") {
                b.sphere = Some(s.clone());
            }
        }
        if !backends.is_empty() {
            out.insert(*key, backends);
        }
    }
    out
}

/// This node's part of the directory: always an agent (whose replica feeds the data
/// plane and answers queries), and the master or the backup when the cluster says so.
struct State {
    /// Renewals sent by this node: makes every lease renewal a new value.
    renewals: u64,
    me: NodeId,
    agent: Agent,
    master: Option<Master>,
    backup: Option<Backup>,
    heartbeats: Heartbeats,
    /// Other nodes' directory endpoints, by id.
    peers: BTreeMap<NodeId, SocketAddr>,
    /// When each service's water-mark period last ran on this node (as master).
    steering_runs: BTreeMap<ServiceKey, Instant>,
}

impl State {
    /// This node is the master, its own replica has every change the master
    /// committed, and none of its own submissions is still waiting (for the backup to
    /// store it): what the managers read is what they wrote. Deciding before that
    /// would write the same record again and again.
    fn master_in_sync(&self) -> bool {
        self.master
            .as_ref()
            .is_some_and(|m| self.agent.version() >= m.version() && self.agent.unacked() == 0)
    }

    /// Delivers messages among this node's roles until none is left for it; returns
    /// the changes its replica applied and the messages for other nodes.
    fn dispatch(
        &mut self,
        mut queue: Vec<(NodeId, NodeId, Msg)>,
    ) -> (Vec<Change>, Vec<(NodeId, Msg)>) {
        let mut applied = Vec::new();
        let mut remote = Vec::new();
        while let Some((to, from, msg)) = queue.pop() {
            if to != self.me {
                remote.push((to, msg));
                continue;
            }
            let outs = match &msg {
                Msg::Submit { .. } | Msg::Stored { .. } | Msg::Sync { .. } => {
                    match self.master.as_mut() {
                        Some(m) => m.handle(msg),
                        None => Vec::new(), // Not the master (any more): the sender resends.
                    }
                }
                Msg::Replicate { .. } => match self.backup.as_mut() {
                    Some(b) => b.handle(from, msg),
                    None => Vec::new(),
                },
                Msg::Push { .. } | Msg::Ack { .. } | Msg::Log { .. } | Msg::Snapshot { .. } => {
                    let (changes, outs) = self.agent.handle(msg);
                    applied.extend(changes);
                    outs
                }
            };
            for o in outs {
                match o {
                    Out::To(t, m) => queue.push((t, self.me, m)),
                    Out::All(m) => {
                        queue.push((self.me, self.me, m.clone()));
                        for p in self.peers.keys() {
                            queue.push((*p, self.me, m.clone()));
                        }
                    }
                }
            }
        }
        (applied, remote)
    }

    fn local(&self, outs: Vec<Out>) -> Vec<(NodeId, NodeId, Msg)> {
        outs.into_iter()
            .flat_map(|o| match o {
                Out::To(t, m) => vec![(t, self.me, m)],
                Out::All(m) => std::iter::once(self.me)
                    .chain(self.peers.keys().copied())
                    .map(|p| (p, self.me, m.clone()))
                    .collect(),
            })
            .collect()
    }
}

/// What the API holds of the directory.
#[derive(Clone)]
pub struct DirHandle {
    state: Arc<Mutex<State>>,
    daemon: Arc<Mutex<Daemon>>,
    neighbors: Arc<NeighborTable>,
    key: Arc<Vec<u8>>,
    /// Next hops recently asked for, and when.
    tried: Arc<Mutex<BTreeMap<IpAddr, Instant>>>,
    /// Every change applied to this node's replica, with the row after it, for
    /// subscribers.
    pub changes: broadcast::Sender<(Change, Option<Entry>)>,
    /// Where operator-visible events go (the cluster's event stream), with our id.
    events: Option<(crate::shell::clusterd::ClusterHandle, IpAddr)>,
}

impl DirHandle {
    /// Submits local changes through this node's agent (to the master, here or on
    /// another node); returns how many the replica applied at once (all of them when
    /// this node is the master; the others arrive with the master's pushes).
    async fn commit(&self, changes: Vec<Change>) -> Result<usize> {
        let (applied, remote) = {
            let mut s = self.state.lock().await;
            let mut queue = Vec::new();
            for change in changes {
                let (_, outs) = s.agent.submit(change);
                queue.extend(s.local(outs));
            }
            s.dispatch(queue)
        };
        self.send_remote(remote).await;
        self.applied(applied).await
    }

    /// Handles a message from another node.
    pub async fn receive(&self, from: NodeId, msg: Msg) -> Result<()> {
        let (applied, remote) = {
            let mut s = self.state.lock().await;
            let me = s.me;
            s.dispatch(vec![(me, from, msg)])
        };
        self.send_remote(remote).await;
        self.applied(applied).await.map(drop)
    }

    async fn applied(&self, applied: Vec<Change>) -> Result<usize> {
        let n = applied.len();
        if n == 0 {
            return Ok(0);
        }
        // Only service instances and host routes shape the data plane; leases and the
        // agents table change every second and must not cost a data-plane pass.
        let shapes = applied.iter().any(|c| {
            c.table.starts_with("svc.")
                || c.table == names::HOST_ROUTES
                || c.table == names::SPM
                || c.table == crate::watermark::VERDICT_TABLE
        });
        {
            let mut s = self.state.lock().await;
            let now = Instant::now();
            for c in applied {
                if c.table == names::LEASES {
                    if let Some((table, key)) = c.key.split_once(LEASE_SEP) {
                        match &c.op {
                            Op::Put { value, .. } => {
                                let ttl = value
                                    .split(';')
                                    .next()
                                    .and_then(|t| t.parse().ok())
                                    .unwrap_or(0);
                                s.heartbeats
                                    .expect(table, key, now + Duration::from_millis(ttl));
                            }
                            Op::Delete => s.heartbeats.forget(table, key),
                            Op::Valid { .. } => {}
                        }
                    }
                }
                let row = s.agent.tables().get(&c.table, &c.key);
                let _ = self.changes.send((c, row));
            }
        }
        if shapes {
            self.feed_dataplane().await?;
        }
        Ok(n)
    }

    async fn send_remote(&self, remote: Vec<(NodeId, Msg)>) {
        if remote.is_empty() {
            return;
        }
        let (me, peers) = {
            let s = self.state.lock().await;
            (s.me, s.peers.clone())
        };
        for (to, msg) in remote {
            let Some(addr) = peers.get(&to).copied() else {
                continue;
            };
            let body = crate::cluster::wire::encode_body(
                &serde_json::to_vec(&msg).expect("serializes"),
                &self.key,
            );
            tokio::spawn(async move {
                if let Err(e) =
                    crate::shell::peer::post_to_peer(addr, "/v1/dsd", ("x-lb-node", me.to_string()), body).await
                {
                    tracing::debug!(%addr, "directory message not delivered (it is resent): {e:#}");
                }
            });
        }
    }

    /// Re-sends what is unacknowledged and asks for missed changes; follows the
    /// cluster's leader (master) and next node (backup).
    async fn tick(&self, roles: Option<(NodeId, Option<NodeId>, BTreeMap<NodeId, SocketAddr>)>) {
        let (applied, remote) = {
            let mut s = self.state.lock().await;
            let mut queue = Vec::new();
            if let Some((leader, backup, peers)) = roles {
                s.peers = peers;
                let me = s.me;
                if leader == me && s.master.is_none() {
                    let m = match s.backup.take() {
                        Some(b) => Master::promote(b, backup),
                        None => {
                            Master::seeded(me, backup, s.agent.tables().clone(), s.agent.version())
                        }
                    };
                    info!(version = m.version(), "this node is the directory master");
                    s.master = Some(m);
                } else if leader != me && s.master.is_some() {
                    s.master = None;
                }
                if let Some(m) = s.master.as_mut() {
                    if m.backup != backup {
                        let outs = m.backup_lost(backup);
                        queue.extend(s.local(outs));
                    }
                }
                if backup == Some(me) && s.backup.is_none() && leader != me {
                    s.backup = Some(Backup::seeded(
                        me,
                        s.agent.tables().clone(),
                        s.agent.version(),
                    ));
                } else if backup != Some(me) {
                    s.backup = None;
                }
                if s.agent.master != leader {
                    let outs = s.agent.master_changed(leader);
                    queue.extend(s.local(outs));
                }
            }
            let outs = s.agent.tick();
            queue.extend(s.local(outs));
            if let Some(m) = s.master.as_mut() {
                let outs = m.tick();
                queue.extend(s.local(outs));
            }
            s.dispatch(queue)
        };
        self.send_remote(remote).await;
        if let Err(e) = self.applied(applied).await {
            warn!("applying directory changes: {e:#}");
        }
    }

    async fn feed_dataplane(&self) -> Result<()> {
        let services = self.daemon.lock().await.service_keys();
        let (backends, epochs) = {
            let s = self.state.lock().await;
            let tables = s.agent.tables();
            let epochs: BTreeMap<ServiceKey, u64> = services
                .iter()
                .filter_map(|k| {
                    let e = tables.get(names::SPM, &k.to_string())?;
                    let r: crate::spm::EpochRecord = serde_json::from_str(&e.value).ok()?;
                    Some((*k, r.epoch))
                })
                .collect();
            let verdicts: BTreeMap<ServiceKey, Vec<crate::watermark::Verdict>> = services
                .iter()
                .filter_map(|k| {
                    let e = tables.get(crate::watermark::VERDICT_TABLE, &k.to_string())?;
                    Some((*k, serde_json::from_str(&e.value).ok()?))
                })
                .collect();
            (backends_by_service(tables, &services), (epochs, verdicts))
        };
        let (epochs, verdicts) = epochs;
        self.daemon.lock().await.set_verdicts(verdicts)?;
        let bumped = self.daemon.lock().await.set_epochs(epochs)?;
        if !bumped.is_empty() {
            info!(services = ?bumped.iter().map(|k| k.to_string()).collect::<Vec<_>>(), "SPM epochs changed");
        }
        // Resolve new backends' MACs first, so they take traffic as soon as they are in.
        // An address that did not answer is not asked again for 5 s (the daemon's
        // neighbour refresh keeps trying): a dead next hop must not stall every change.
        let unknown: Vec<IpAddr> = {
            let d = self.daemon.lock().await;
            let mut tried = self.tried.lock().await;
            let now = Instant::now();
            tried.retain(|_, at| now.duration_since(*at) < Duration::from_secs(5));
            let vias: std::collections::BTreeSet<IpAddr> = backends
                .values()
                .flat_map(|b| b.values().map(|x| x.via))
                .filter(|a| !d.knows_neighbor(*a) && !tried.contains_key(a))
                .collect();
            for a in &vias {
                tried.insert(*a, now);
            }
            vias.into_iter().collect()
        };
        let mut found = BTreeMap::new();
        for addr in unknown {
            match self
                .neighbors
                .resolve(addr, Duration::from_millis(1500))
                .await
            {
                Ok(Some(n)) => {
                    found.insert(addr, n);
                }
                Ok(None) => warn!(%addr, "no MAC for a directory backend yet"),
                Err(e) => warn!(%addr, "resolving a directory backend: {e:#}"),
            }
        }
        if !found.is_empty() {
            self.daemon.lock().await.update_neighbors(found)?;
        }
        let touched = self.daemon.lock().await.set_directory(backends)?;
        if !touched.is_empty() {
            info!(services = ?touched.iter().map(|k| k.to_string()).collect::<Vec<_>>(), "directory changed backends");
        }
        Ok(())
    }

    /// The SPM manager (on the directory master): records each service's epoch and
    /// valid instance set in the `spm` table, bumping the epoch as the service's policy
    /// and its operators' bumps say. Every node takes its epochs from that table.
    async fn manage_spm(&self) -> Result<()> {
        if !self.state.lock().await.master_in_sync() {
            return Ok(());
        }
        let views = self.daemon.lock().await.services()?;
        let records: Vec<(String, crate::spm::EpochRecord)> = {
            let s = self.state.lock().await;
            let tables = s.agent.tables();
            views
                .iter()
                .filter_map(|v| {
                    let key = v.key.to_string();
                    let record = tables.get(names::SPM, &key).and_then(|e| {
                        serde_json::from_str::<crate::spm::EpochRecord>(&e.value).ok()
                    });
                    let bumps = tables
                        .get(names::SPM_BUMPS, &key)
                        .and_then(|e| e.value.parse().ok())
                        .unwrap_or(0);
                    let members: Vec<String> = v
                        .backends
                        .iter()
                        .filter(|b| b.takes_new_flows())
                        .map(|b| b.address.to_string())
                        .collect();
                    let next = crate::spm::next_record(
                        v.spm.epoch_policy,
                        record.as_ref(),
                        &members,
                        bumps,
                    )?;
                    Some((key, next))
                })
                .collect()
        };
        for (key, record) in records {
            info!(service = %key, epoch = record.epoch, members = ?record.members, "SPM manager: service record");
            let value = serde_json::to_string(&record).expect("serializes");
            self.put_entry(names::SPM, &key, &value, true).await?;
        }
        Ok(())
    }

    /// The water-mark steering of every service that has it (on the directory master,
    /// each on its own period): samples are the valid load reports, M is the last
    /// verdicts in the `steering` table, the new verdicts go there when they change.
    async fn manage_load(&self) -> Result<()> {
        if !self.state.lock().await.master_in_sync() {
            return Ok(());
        }
        let marks: Vec<(ServiceKey, crate::watermark::Marks)> = {
            let d = self.daemon.lock().await;
            d.desired()
                .services
                .iter()
                .filter_map(|(k, s)| Some((*k, s.steering?)))
                .collect()
        };
        let mut writes = Vec::new();
        {
            let mut s = self.state.lock().await;
            let now = Instant::now();
            for (key, m) in marks {
                let due = s
                    .steering_runs
                    .get(&key)
                    .is_none_or(|t| now.duration_since(*t) >= Duration::from_millis(m.period_ms));
                if !due {
                    continue;
                }
                s.steering_runs.insert(key, now);
                let svc = key.to_string();
                let tables = s.agent.tables();
                let samples = crate::watermark::samples(
                    &tables.search(crate::watermark::LOAD_TABLE, &format!("{svc}|")),
                );
                let previous: Vec<crate::watermark::Verdict> = tables
                    .get(crate::watermark::VERDICT_TABLE, &svc)
                    .and_then(|e| serde_json::from_str(&e.value).ok())
                    .unwrap_or_default();
                let Some(verdicts) = crate::watermark::next_verdicts(&m, &samples, &previous)
                else {
                    continue;
                };
                for v in crate::watermark::moved(&previous, &verdicts) {
                    info!(service = %svc, backend = %v.backend, util = v.util, weighted = v.weighted, in_table = v.in_table, "water marks: backend {}", if v.in_table { "in" } else { "out" });
                    if let Some((c, id)) = &self.events {
                        c.publish(
                            *id,
                            crate::cluster::node::Event::Steering {
                                service: svc.clone(),
                                backend: v.backend,
                                in_table: v.in_table,
                                util: v.util,
                            },
                        );
                    }
                }
                writes.push((svc, serde_json::to_string(&verdicts).expect("serializes")));
            }
        }
        for (svc, value) in writes {
            self.put_entry(crate::watermark::VERDICT_TABLE, &svc, &value, true)
                .await?;
        }
        Ok(())
    }

    /// A backend's load report, valid for `ttl` unless renewed.
    pub async fn report_load(
        &self,
        service: ServiceKey,
        backend: IpAddr,
        load: u64,
        capacity: u64,
        ttl: Duration,
    ) -> Result<()> {
        let key = crate::watermark::load_key(&service.to_string(), backend);
        let value = format!("{load};{capacity}");
        let table = crate::watermark::LOAD_TABLE;
        let current = self.state.lock().await.agent.tables().get(table, &key);
        if current.as_ref().map(|e| e.value.as_str()) != Some(value.as_str())
            || current.is_some_and(|e| !e.valid)
        {
            self.put_entry(table, &key, &value, true).await?;
        }
        let renewal = {
            let mut s = self.state.lock().await;
            s.renewals += 1;
            format!("{};{}:{}", ttl.as_millis(), s.me, s.renewals)
        };
        self.renew(table, &key, true, renewal).await
    }

    /// Asks the SPM manager for a new epoch of `service` (through the directory, so
    /// that whichever node is master folds it in).
    pub async fn bump_epoch(&self, service: ServiceKey) -> Result<()> {
        let key = service.to_string();
        let bumps: u64 = {
            let s = self.state.lock().await;
            s.agent
                .tables()
                .get(names::SPM_BUMPS, &key)
                .and_then(|e| e.value.parse().ok())
                .unwrap_or(0)
        };
        self.put_entry(names::SPM_BUMPS, &key, &(bumps + 1).to_string(), true)
            .await
            .map(drop)
    }

    async fn put_entry(&self, table: &str, key: &str, value: &str, valid: bool) -> Result<usize> {
        self.commit(vec![Change {
            table: table.into(),
            key: key.into(),
            op: Op::Put {
                value: value.into(),
                valid,
            },
        }])
        .await
    }

    /// Deletes an entry; `Ok(false)` if this node's replica does not have it.
    async fn delete_entry(&self, table: &str, key: &str) -> Result<bool> {
        {
            let mut s = self.state.lock().await;
            if s.agent.tables().get(table, key).is_none() {
                return Ok(false);
            }
            s.heartbeats.forget(table, key);
        }
        self.commit(vec![Change {
            table: table.into(),
            key: key.into(),
            op: Op::Delete,
        }])
        .await?;
        Ok(true)
    }

    /// A heartbeat: valid now, and expected again within `time_max`. Returns whether
    /// the entry exists.
    async fn heartbeat_entry(&self, table: &str, key: &str, time_max: Duration) -> Result<bool> {
        let (valid, renewal) = {
            let mut s = self.state.lock().await;
            let Some(entry) = s.agent.tables().get(table, key) else {
                return Ok(false);
            };
            s.renewals += 1;
            (
                entry.valid,
                format!("{};{}:{}", time_max.as_millis(), s.me, s.renewals),
            )
        };
        self.renew(table, key, valid, renewal).await?;
        Ok(true)
    }

    /// Writes the lease row (every renewal a new value, so that the master sees it
    /// and restarts the countdown), and marks the entry valid if it is not.
    async fn renew(&self, table: &str, key: &str, valid: bool, renewal: String) -> Result<()> {
        let mut changes = vec![Change {
            table: names::LEASES.into(),
            key: lease_key(table, key),
            op: Op::Put {
                value: renewal,
                valid: true,
            },
        }];
        if !valid {
            changes.push(Change {
                table: table.into(),
                key: key.into(),
                op: Op::Valid { valid: true },
            });
        }
        self.commit(changes).await.map(drop)
    }

    /// Registers (or renews) a backend with its lease.
    pub async fn register(&self, r: &Registration) -> Result<()> {
        let table = names::service(&r.service.to_string());
        let key = r.instance();
        let current = self.state.lock().await.agent.tables().get(&table, &key);
        if current.as_ref().map(|e| e.value.as_str()) != Some(r.value().as_str())
            || current.is_some_and(|e| !e.valid)
        {
            self.put_entry(&table, &key, &r.value(), true).await?;
        }
        // The lease lives in the directory: whichever node is the master counts it
        // down, so it expires even if this node dies.
        let renewal = {
            let mut s = self.state.lock().await;
            s.renewals += 1;
            format!("{};{}:{}", r.ttl_ms, s.me, s.renewals)
        };
        self.renew(&table, &key, true, renewal).await
    }

    async fn search_entries(&self, table: &str, prefix: &str) -> Vec<Entry> {
        self.state.lock().await.agent.tables().search(table, prefix)
    }

    async fn find_servers(&self, table: &str, prefix: &str) -> Vec<CompleteRoute> {
        self.state
            .lock()
            .await
            .agent
            .tables()
            .find_server(table, prefix)
    }

    /// Matching events for a subscriber, from a broadcast receiver; `Resync` when the
    /// receiver fell behind.
    pub fn event_for(
        table: &str,
        prefix: &str,
        item: Result<(Change, Option<Entry>), broadcast::error::RecvError>,
    ) -> Option<Event> {
        match item {
            Ok((change, row)) => {
                if change.table != table || !change.key.starts_with(prefix) {
                    return None;
                }
                Some(match (&change.op, row) {
                    (Op::Delete, _) | (_, None) => Event::Delete {
                        table: change.table,
                        key: change.key,
                    },
                    (_, Some(row)) => Event::Add {
                        table: change.table,
                        key: change.key,
                        value: row.value,
                        valid: row.valid,
                    },
                })
            }
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Event::Resync {
                table: table.to_string(),
            }),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

impl DirectoryStore for DirHandle {
    async fn add(&self, table: &str, key: &str, value: &str, valid: bool) -> Result<()> {
        self.put_entry(table, key, value, valid).await.map(drop)
    }

    async fn delete(&self, table: &str, key: &str) -> Result<bool> {
        self.delete_entry(table, key).await
    }

    async fn search(&self, table: &str, prefix: &str) -> Vec<Entry> {
        self.search_entries(table, prefix).await
    }

    async fn find_server(&self, table: &str, prefix: &str) -> Vec<CompleteRoute> {
        self.find_servers(table, prefix).await
    }

    async fn heartbeat(&self, table: &str, key: &str, time_max: Duration) -> Result<bool> {
        self.heartbeat_entry(table, key, time_max).await
    }

    fn subscribe(&self) -> broadcast::Receiver<(Change, Option<Entry>)> {
        self.changes.subscribe()
    }
}

/// Route monitoring: every host route is ARP-probed through `interface` every 300 ms;
/// two misses make it invalid (the next valid route becomes current), two answers
/// valid again.
pub fn monitor_routes(handle: DirHandle, interface: String, src: std::net::Ipv4Addr) {
    tokio::spawn(async move {
        let mut health: BTreeMap<String, crate::health::Health> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        loop {
            tick.tick().await;
            let routes = handle.search_entries(names::HOST_ROUTES, "").await;
            let mut probes = Vec::new();
            for r in routes {
                let Ok(IpAddr::V4(target)) = r.value.parse::<IpAddr>() else {
                    continue;
                };
                let iface = interface.clone();
                probes.push((
                    r.key.clone(),
                    tokio::task::spawn_blocking(move || {
                        crate::shell::vip::arp_probe(&iface, src, target, Duration::from_millis(200))
                    }),
                ));
            }
            for (key, probe) in probes {
                let ok = matches!(probe.await, Ok(Ok(Some(_))));
                let h = health.entry(key.clone()).or_default();
                if let Some(valid) = h.record(ok, 2, 2) {
                    info!(route = %key, valid, "host route probe verdict");
                    let change = Change {
                        table: names::HOST_ROUTES.into(),
                        key,
                        op: Op::Valid { valid },
                    };
                    if let Err(e) = handle.commit(vec![change]).await {
                        warn!("applying a route verdict: {e:#}");
                    }
                }
            }
        }
    });
}

/// Who is the directory's master and backup, from the cluster's hosts (id, claims to
/// be master, replica version). Mastership sticks: a claimed master stays while alive
/// (two claims after a partition: the lower id). Without one, the host with the most
/// recent replica takes over (the backup, which stores every change before it is
/// acknowledged, has it), ties to the lower id, so a node that restarts with an empty
/// replica never becomes master over nodes that have the directory.
pub fn directory_roles(hosts: &[(IpAddr, bool, u64)]) -> Option<(IpAddr, Option<IpAddr>)> {
    let best = |candidates: &mut dyn Iterator<Item = &(IpAddr, bool, u64)>| {
        candidates
            .max_by(|a, b| a.2.cmp(&b.2).then(b.0.cmp(&a.0)))
            .map(|h| h.0)
    };
    let master = hosts
        .iter()
        .filter(|h| h.1)
        .map(|h| h.0)
        .min()
        .or_else(|| best(&mut hosts.iter()))?;
    let backup = best(&mut hosts.iter().filter(|h| h.0 != master));
    Some((master, backup))
}

/// Leases are rows of the `leases` table keyed `<table>|<key>`, valued
/// `<ttl_ms>;<renewal id>`.
const LEASE_SEP: char = '|';

fn lease_key(table: &str, key: &str) -> String {
    format!("{table}{LEASE_SEP}{key}")
}

/// The largest replication message accepted (a snapshot of a big directory).
pub const MAX_DSD_MESSAGE: usize = 64 << 20;

/// Takes one framed message from another node: checks its MAC, parses it, hands it on.
pub async fn accept(
    handle: &DirHandle,
    from: NodeId,
    body: &[u8],
) -> Result<(), crate::cluster::wire::Reject> {
    let body = crate::cluster::wire::decode_body(body, &handle.key, MAX_DSD_MESSAGE)?;
    let msg: Msg =
        serde_json::from_slice(body).map_err(|_| crate::cluster::wire::Reject::Malformed)?;
    if let Err(e) = handle.receive(from, msg).await {
        warn!("applying a directory message: {e:#}");
    }
    Ok(())
}

/// Starts the directory: lease expiry every 50 ms; resends, resyncs and (in a
/// cluster) role changes every 200 ms. Without a cluster this node is its own master.
pub fn start(
    daemon: Arc<Mutex<Daemon>>,
    neighbors: Arc<NeighborTable>,
    cluster: Option<(crate::shell::clusterd::ClusterHandle, crate::config::ClusterConfig)>,
) -> DirHandle {
    let (changes, _) = broadcast::channel(1024);
    let me = cluster.as_ref().map_or(0, |(_, c)| crate::shell::peer::node_id(c.id));
    let key = cluster
        .as_ref()
        .map(|(_, c)| c.key.clone())
        .unwrap_or_default();
    let handle = DirHandle {
        state: Arc::new(Mutex::new(State {
            renewals: 0,
            me,
            agent: Agent::new(me, me),
            master: if cluster.is_none() {
                Some(Master::new(me, None))
            } else {
                None
            },
            backup: None,
            heartbeats: Heartbeats::default(),
            peers: BTreeMap::new(),
            steering_runs: BTreeMap::new(),
        })),
        daemon,
        neighbors,
        key: Arc::new(key),
        tried: Arc::new(Mutex::new(BTreeMap::new())),
        changes,
        events: cluster.as_ref().map(|(c, cfg)| (c.clone(), cfg.id)),
    };
    let h = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut n = 0u64;
        loop {
            tick.tick().await;
            n += 1;
            let expired = {
                let mut s = h.state.lock().await;
                let master = s.master.is_some();
                let State {
                    agent, heartbeats, ..
                } = &mut *s;
                let late = heartbeats.expire(agent.tables(), Instant::now());
                if master {
                    // The countdown runs on every node (so a new master has it), but
                    // only the master acts: invalidate, and drop the lease row.
                    late.into_iter()
                        .flat_map(|c| {
                            let lease = Change {
                                table: names::LEASES.into(),
                                key: lease_key(&c.table, &c.key),
                                op: Op::Delete,
                            };
                            [c, lease]
                        })
                        .collect()
                } else {
                    Vec::new()
                }
            };
            // An empty directory changes nothing, yet the data plane must hear from
            // it once (a service without backends is judged out only after that).
            if n == 20 {
                if let Err(e) = h.feed_dataplane().await {
                    warn!("feeding the data plane from the directory: {e:#}");
                }
            }
            if n.is_multiple_of(2) {
                if let Err(e) = h.manage_spm().await {
                    warn!("SPM manager: {e:#}");
                }
                if let Err(e) = h.manage_load().await {
                    warn!("water-mark steering: {e:#}");
                }
            }
            if !expired.is_empty() {
                for c in &expired {
                    info!(table = %c.table, key = %c.key, "lease expired: entry invalid");
                }
                if let Err(e) = h.commit(expired).await {
                    warn!("applying expired leases: {e:#}");
                }
            }
            // The management agents table: this node, with a lease (3 s, renewed
            // every second), so every node sees which agents are alive and which leads.
            if n.is_multiple_of(20) {
                let (name, role, endpoint) = {
                    let d = h.daemon.lock().await;
                    let s = h.state.lock().await;
                    let role = if s.master.is_some() {
                        "master"
                    } else if s.backup.is_some() {
                        "backup"
                    } else {
                        "agent"
                    };
                    let endpoint = cluster
                        .as_ref()
                        .map(|(_, c)| crate::shell::peer::endpoint(c.id, c.port).to_string())
                        .unwrap_or_else(|| "-".into());
                    (d.config.node.name.clone(), role, endpoint)
                };
                let value = format!("{endpoint};role={role}");
                let current = h.search_entries(names::AGENTS, &name).await;
                if !current
                    .iter()
                    .any(|e| e.key == name && e.value == value && e.valid)
                {
                    if let Err(e) = h.put_entry(names::AGENTS, &name, &value, true).await {
                        warn!("registering this agent: {e:#}");
                    }
                }
                if let Err(e) = h
                    .heartbeat_entry(names::AGENTS, &name, Duration::from_secs(3))
                    .await
                {
                    warn!("renewing this agent: {e:#}");
                }
            }
            // No directory role before the cluster has had time to settle: a node that
            // just started sees only itself and would lead a directory of its own.
            let settled = cluster
                .as_ref()
                .is_none_or(|(_, cfg)| n * 50 >= 3 * cfg.timeout.as_millis() as u64);
            if n.is_multiple_of(4) && settled {
                let roles = cluster.as_ref().and_then(|(c, cfg)| {
                    let view = c.view();
                    view.leader?;
                    let hosts: Vec<(IpAddr, bool, u64)> = view
                        .hosts
                        .iter()
                        .map(|h| (h.info.id, h.info.dir_master, h.info.dir_version))
                        .collect();
                    let (master, backup) = directory_roles(&hosts)?;
                    let peers = hosts
                        .iter()
                        .filter(|(a, _, _)| crate::shell::peer::node_id(*a) != me)
                        .map(|(a, _, _)| (crate::shell::peer::node_id(*a), crate::shell::peer::endpoint(*a, cfg.port)))
                        .collect();
                    Some((crate::shell::peer::node_id(master), backup.map(crate::shell::peer::node_id), peers))
                });
                if cluster.is_none() || roles.is_some() {
                    h.tick(roles).await;
                }
                // Advertise this node's directory role and version in its heartbeats.
                if let Some((c, _)) = &cluster {
                    let (master, version) = {
                        let s = h.state.lock().await;
                        match &s.master {
                            Some(m) => (true, m.version()),
                            None => (false, s.agent.version()),
                        }
                    };
                    c.set_directory(master, version).await;
                }
            }
        }
    });
    handle
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directory_mastership_sticks_and_passes_to_the_most_recent_replica() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a, b, c) = (ip("198.18.0.2"), ip("198.18.0.3"), ip("198.18.0.4"));
        // Nobody claims, all empty: the lowest id.
        assert_eq!(
            directory_roles(&[(a, false, 0), (b, false, 0), (c, false, 0)]),
            Some((a, Some(b)))
        );
        // b is master; a comes back empty: b stays.
        assert_eq!(
            directory_roles(&[(a, false, 0), (b, true, 40), (c, false, 40)]),
            Some((b, Some(c)))
        );
        // The master died: the most recent replica (the backup) takes over.
        assert_eq!(
            directory_roles(&[(a, false, 0), (c, false, 41)]),
            Some((c, Some(a)))
        );
        // Two claims after a partition: the lower id.
        assert_eq!(
            directory_roles(&[(b, true, 9), (c, true, 12)]),
            Some((b, Some(c)))
        );
        assert_eq!(directory_roles(&[]), None);
    }

    #[test]
    fn the_data_plane_sees_valid_entries_weighted_and_invalid_ones_drained() {
        let key: ServiceKey = "tcp/198.18.0.100:8080".parse().unwrap();
        let other: ServiceKey = "tcp/198.18.0.101:8080".parse().unwrap();
        let table = names::service(&key.to_string());
        let mut t = Tables::default();
        t.add(&table, "a", "198.18.0.11:8080;weight=3", true);
        t.add(&table, "b", "host2:8080", false);
        t.add(&table, "c", "hostless:8080", true);
        t.add(&table, "d", "[2001:db8::1]:8080", true);
        t.add(
            names::HOST_ROUTES,
            &crate::directory::tables::host_route_key("host2", 0),
            "198.18.0.12",
            true,
        );
        let b = backends_by_service(&t, &[key, other]);
        assert_eq!(b.len(), 1, "no entries for the other service");
        let got: Vec<(String, u32)> = b[&key]
            .iter()
            .map(|(a, d)| (a.to_string(), d.weight))
            .collect();
        assert_eq!(
            got,
            [
                ("198.18.0.11".to_string(), 3),
                ("198.18.0.12".to_string(), 0)
            ],
            "c has no route, d is of the other family"
        );
    }

    #[test]
    fn a_failed_route_moves_frames_to_the_next_route_but_keeps_the_identity() {
        use crate::directory::tables::host_route_key;
        let key: ServiceKey = "tcp/198.18.0.100:8080".parse().unwrap();
        let table = names::service(&key.to_string());
        let mut t = Tables::default();
        t.add(&table, "b3", "b3host:8080", true);
        t.add(
            names::HOST_ROUTES,
            &host_route_key("b3host", 0),
            "198.18.0.13",
            true,
        );
        t.add(
            names::HOST_ROUTES,
            &host_route_key("b3host", 1),
            "198.18.0.23",
            true,
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let first = backends_by_service(&t, &[key]);
        assert_eq!(
            first[&key][&ip("198.18.0.13")],
            DirBackend {
                weight: 1,
                via: ip("198.18.0.13"),
                sphere: None,
            }
        );
        t.set_valid(names::HOST_ROUTES, &host_route_key("b3host", 0), false);
        let moved = backends_by_service(&t, &[key]);
        assert_eq!(moved[&key].len(), 1);
        assert_eq!(
            moved[&key][&ip("198.18.0.13")],
            DirBackend {
                weight: 1,
                via: ip("198.18.0.23"),
                sphere: None,
            }
        );
        t.set_valid(names::HOST_ROUTES, &host_route_key("b3host", 1), false);
        assert!(
            backends_by_service(&t, &[key]).is_empty(),
            "no valid route: unreachable"
        );
    }
}
