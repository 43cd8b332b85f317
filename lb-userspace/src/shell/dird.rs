//! The directory's I/O on this node: the agent interface the API serves (add,
//! delete, search, find-server, heartbeat, register with a lease, subscribe), the
//! transport of replication messages to and from other nodes (signed HTTP POSTs to
//! their peer port), the timers (lease countdowns, resends, the cluster's roles), and
//! the feeder that hands the replica's contents to the daemon. The decisions are
//! `directory::node`'s; what the data plane takes from the replica is
//! `directory::feed`'s.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use futures::Stream;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    api::Registration,
    config::ClusterConfig,
    directory::{
        feed::{feed, shapes_dataplane},
        node::{directory_roles, lease_key, Candidate, DirNode, Input, Outputs},
        replication::{Msg, NodeId},
        store::{DirectoryStore, ReadOnly, Written},
        subscriptions::{Event, SubId, Subscriptions},
        tables::{names, Change, CompleteRoute, Entry, Op, Tables},
    },
    model::ServiceKey,
    shell::{clusterd::ClusterHandle, handle::DaemonHandle, neighbor::NeighborTable, peer},
};

/// The largest replication message accepted (a snapshot of a big directory).
pub const MAX_DSD_MESSAGE: usize = 64 << 20;

/// How long a change waits for the master's acknowledgement (the backup stored it)
/// before it is answered pending: longer than replacing a dead backup takes (a
/// cluster timeout and a roles round).
pub const ACK_WAIT: Duration = Duration::from_secs(2);

/// What one step of the node did, as far as a caller waits on it.
struct Stepped {
    submitted: Vec<u64>,
    refused: bool,
}

/// What the API, the managers and the route monitor hold of the directory.
#[derive(Clone)]
pub struct DirHandle {
    /// The pure node. A plain mutex: every step is short and never awaits.
    node: Arc<std::sync::Mutex<DirNode>>,
    daemon: DaemonHandle,
    key: Arc<Vec<u8>>,
    /// Other nodes' directory endpoints, by id.
    peers: Arc<std::sync::Mutex<BTreeMap<NodeId, SocketAddr>>>,
    me: NodeId,
    /// Subscribers' queues (the pure `Subscriptions`), and a count of the changes
    /// offered to them, which wakes them.
    subs: Arc<std::sync::Mutex<Subscriptions>>,
    published: Arc<watch::Sender<u64>>,
    /// Where operator-visible events go (the cluster's event stream), with our id.
    pub(crate) events: Option<(ClusterHandle, IpAddr)>,
    /// Counts the replica changes that shape the data plane (wakes the feeder) ...
    wanted: Arc<watch::Sender<u64>>,
    /// ... and which services they concern, until the feeder takes them.
    scope: Arc<std::sync::Mutex<crate::directory::feed::Scope>>,
    /// ... and how many of them the feeder has handed to the daemon.
    fed: Arc<watch::Sender<u64>>,
    /// Counts the steps in which the master acknowledged local requests ...
    acks: Arc<watch::Sender<u64>>,
    /// ... and the versions they were committed at, until their submitter takes them.
    ack_versions: Arc<std::sync::Mutex<BTreeMap<u64, u64>>>,
}

impl DirHandle {
    /// Runs one step of the node and carries out its outputs.
    fn step(&self, input: Input) -> Stepped {
        let out = {
            let mut node = self.node.lock().expect("not poisoned");
            let out = node.handle(Instant::now(), input);
            if !out.applied.is_empty() {
                let mut subs = self.subs.lock().expect("not poisoned");
                for c in &out.applied {
                    subs.publish(c, node.tables().get(&c.table, &c.key).as_ref());
                }
                self.published.send_modify(|n| *n += 1);
            }
            out
        };
        self.carry_out(out)
    }

    fn carry_out(&self, out: Outputs) -> Stepped {
        if let Some(version) = out.became_master {
            // A standalone node is its own master at every start: news only in a cluster.
            if self.events.is_some() {
                info!(version, "this node is the directory master");
            } else {
                debug!(version, "this node is the directory master (standalone)");
            }
        }
        for c in &out.expired {
            info!(table = %c.table, key = %c.key, "lease expired: entry invalid");
        }
        if out.resynced {
            warn!(
                rows = out.applied.len(),
                "this node's directory replica differed from the master's at the same \
                 version: replaced by the master's"
            );
            if let Some((c, id)) = &self.events {
                c.publish(
                    *id,
                    crate::cluster::node::Event::DirectoryResync {
                        rows: out.applied.len(),
                    },
                );
            }
        }
        for agent in &out.diverged {
            warn!(
                agent,
                "a replica differed from this master's: sent it a snapshot"
            );
        }
        if out.applied.iter().any(|c| shapes_dataplane(&c.table)) {
            {
                let mut scope = self.scope.lock().expect("not poisoned");
                for c in &out.applied {
                    scope.add(&c.table, &c.key);
                }
                // A resync replaced the replica: anything may have changed.
                if out.resynced {
                    scope.all = true;
                }
            }
            self.wanted.send_modify(|n| *n += 1);
        }
        if !out.acked.is_empty() {
            self.ack_versions
                .lock()
                .expect("not poisoned")
                .extend(out.acked.iter().copied());
            self.acks.send_modify(|n| *n += 1);
        }
        self.send(out.send);
        Stepped {
            submitted: out.submitted,
            refused: out.refused,
        }
    }

    fn send(&self, remote: Vec<(NodeId, Msg)>) {
        if remote.is_empty() {
            return;
        }
        let peers = self.peers.lock().expect("not poisoned").clone();
        let me = self.me;
        for (to, msg) in remote {
            let Some(addr) = peers.get(&to).copied() else {
                continue;
            };
            let body = crate::cluster::wire::encode_stream(
                &serde_json::to_vec(&msg).expect("serializes"),
                &self.key,
                crate::cluster::wire::unix_secs(),
            );
            tokio::spawn(async move {
                if let Err(e) =
                    peer::post_to_peer(addr, "/v1/dsd", ("x-lb-node", me.to_string()), body).await
                {
                    tracing::debug!(%addr, "directory message not delivered (it is resent): {e:#}");
                }
            });
        }
    }

    /// Submits local changes through this node's agent (to the master, here or on
    /// another node) and waits until the master has acknowledged them, that is, until
    /// they are stored where a failover keeps them (at most [`ACK_WAIT`]; then they
    /// are `Pending`), and then until this node's data plane holds them (at most 3 s),
    /// so that what the caller is told is what the cluster and the maps hold.
    pub async fn commit(&self, changes: Vec<Change>) -> Result<Written> {
        let mut acks = self.acks.subscribe();
        let mut published = self.published.subscribe();
        let stepped = self.step(Input::Submit(changes));
        if stepped.refused {
            return Err(ReadOnly.into());
        }
        let reqs = stepped.submitted;
        let all_acked = || {
            let node = self.node.lock().expect("not poisoned");
            reqs.iter().all(|r| !node.is_pending(*r))
        };
        let acked = tokio::time::timeout(ACK_WAIT, async {
            while !all_acked() {
                if acks.changed().await.is_err() {
                    break;
                }
            }
        })
        .await
        .is_ok()
            && all_acked();
        let version = {
            let mut versions = self.ack_versions.lock().expect("not poisoned");
            reqs.iter()
                .filter_map(|r| versions.remove(r))
                .max()
                .unwrap_or(0)
        };
        if !acked {
            return Ok(Written::Pending);
        }
        // The replica applies the change when the master's push arrives (it may
        // come after the ack); then the feeder hands it to the daemon.
        let held = || self.node.lock().expect("not poisoned").replica_version() >= version;
        let _ = tokio::time::timeout(Duration::from_secs(3), async {
            while !held() {
                if published.changed().await.is_err() {
                    break;
                }
            }
            let wanted = *self.wanted.borrow();
            let mut fed = self.fed.subscribe();
            let _ = fed.wait_for(|n| *n >= wanted).await;
        })
        .await;
        Ok(Written::Committed)
    }

    /// Whether this node's replica has been brought to a master's state since it
    /// started (it may have missed changes while it was away until then).
    pub fn synced(&self) -> bool {
        self.node.lock().expect("not poisoned").synced()
    }

    /// This node sees no quorum: the directory is read-only here.
    pub fn read_only(&self) -> bool {
        self.node.lock().expect("not poisoned").read_only()
    }

    /// Reads this node's replica.
    pub fn with_tables<R>(&self, f: impl FnOnce(&Tables) -> R) -> R {
        f(self.node.lock().expect("not poisoned").tables())
    }

    /// Writes the cluster's desired services (see `names::DESIRED`).
    pub async fn set_desired(&self, desired: &crate::desired::Desired) -> Result<Written> {
        let value = serde_json::to_string(desired).expect("serializes");
        self.put_entry(names::DESIRED, names::DESIRED_KEY, &value, true)
            .await
    }

    pub fn daemon(&self) -> &DaemonHandle {
        &self.daemon
    }

    /// The replica's version (changes with every change of the directory).
    pub fn version(&self) -> u64 {
        self.node.lock().expect("not poisoned").version()
    }

    pub fn master_in_sync(&self) -> bool {
        self.node.lock().expect("not poisoned").master_in_sync()
    }

    fn renewal(&self, ttl: Duration) -> String {
        self.node.lock().expect("not poisoned").renewal(ttl)
    }

    /// The cluster key, that messages between nodes are signed with.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Takes one authenticated message from another node: parses it, hands it on.
    /// Never waits on anything but the node's own step.
    pub fn accept(&self, from: NodeId, body: &[u8]) -> Result<(), crate::cluster::wire::Reject> {
        let msg: Msg =
            serde_json::from_slice(body).map_err(|_| crate::cluster::wire::Reject::Malformed)?;
        self.step(Input::Receive { from, msg });
        Ok(())
    }

    pub async fn put_entry(
        &self,
        table: &str,
        key: &str,
        value: &str,
        valid: bool,
    ) -> Result<Written> {
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

    /// Puts valid entries of one table in one commit (one round of replication and
    /// one feed of the data plane, however many).
    pub async fn put_entries(&self, table: &str, rows: Vec<(String, String)>) -> Result<Written> {
        self.commit(
            rows.into_iter()
                .map(|(key, value)| Change {
                    table: table.into(),
                    key,
                    op: Op::Put { value, valid: true },
                })
                .collect(),
        )
        .await
    }

    /// Deletes an entry; `Ok(None)` if this node's replica does not have it.
    async fn delete_entry(&self, table: &str, key: &str) -> Result<Option<Written>> {
        {
            let mut node = self.node.lock().expect("not poisoned");
            if node.tables().get(table, key).is_none() {
                return Ok(None);
            }
            if node.read_only() {
                return Err(ReadOnly.into());
            }
            node.forget_lease(table, key);
        }
        self.commit(vec![Change {
            table: table.into(),
            key: key.into(),
            op: Op::Delete,
        }])
        .await
        .map(Some)
    }

    /// Writes the entry if the replica does not hold it like this, valid.
    async fn put_if_changed(&self, table: &str, key: &str, value: &str) -> Result<Written> {
        let current = self.with_tables(|t| t.get(table, key));
        if current.as_ref().map(|e| e.value.as_str()) != Some(value)
            || current.is_some_and(|e| !e.valid)
        {
            return self.put_entry(table, key, value, true).await;
        }
        Ok(Written::Committed)
    }

    /// Writes the lease row (every renewal a new value, so that the master sees it
    /// and restarts the countdown), and marks the entry valid if it is not.
    async fn renew(&self, table: &str, key: &str, ttl: Duration) -> Result<Written> {
        let valid = self.with_tables(|t| t.get(table, key).is_some_and(|e| e.valid));
        let mut changes = vec![Change {
            table: names::LEASES.into(),
            key: lease_key(table, key),
            op: Op::Put {
                value: self.renewal(ttl),
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
        self.commit(changes).await
    }

    /// A heartbeat: valid now, and expected again within `time_max`. `None` if the
    /// entry does not exist.
    async fn heartbeat_entry(
        &self,
        table: &str,
        key: &str,
        time_max: Duration,
    ) -> Result<Option<Written>> {
        if self.with_tables(|t| t.get(table, key)).is_none() {
            return Ok(None);
        }
        self.renew(table, key, time_max).await.map(Some)
    }

    /// Registers (or renews) a backend with its lease. The lease lives in the
    /// directory: whichever node is the master counts it down, so it expires even if
    /// this node dies.
    pub async fn register(&self, r: &Registration) -> Result<Written> {
        let table = names::service(&r.service.to_string());
        let key = r.instance();
        let row = self.put_if_changed(&table, &key, &r.value()).await?;
        let lease = self
            .renew(&table, &key, Duration::from_millis(r.ttl_ms))
            .await?;
        Ok(worse(row, lease))
    }

    /// A backend's load report, valid for `ttl` unless renewed.
    pub async fn report_load(
        &self,
        service: ServiceKey,
        backend: IpAddr,
        load: u64,
        capacity: u64,
        ttl: Duration,
    ) -> Result<Written> {
        let key = crate::watermark::load_key(&service.to_string(), backend);
        let table = crate::watermark::LOAD_TABLE;
        let row = self
            .put_if_changed(table, &key, &format!("{load};{capacity}"))
            .await?;
        Ok(worse(row, self.renew(table, &key, ttl).await?))
    }

    /// Asks the SPM manager for a new epoch of `service` (through the directory, so
    /// that whichever node is master folds it in).
    pub async fn bump_epoch(&self, service: ServiceKey) -> Result<Written> {
        let key = service.to_string();
        let bumps: u64 = self.with_tables(|t| {
            t.get(names::SPM_BUMPS, &key)
                .and_then(|e| e.value.parse().ok())
                .unwrap_or(0)
        });
        self.put_entry(names::SPM_BUMPS, &key, &(bumps + 1).to_string(), true)
            .await
    }
}

/// Of two writes, how far the less advanced got.
fn worse(a: Written, b: Written) -> Written {
    if a == Written::Pending || b == Written::Pending {
        Written::Pending
    } else {
        Written::Committed
    }
}

impl DirectoryStore for DirHandle {
    async fn add(&self, table: &str, key: &str, value: &str, valid: bool) -> Result<Written> {
        self.put_entry(table, key, value, valid).await
    }

    async fn delete(&self, table: &str, key: &str) -> Result<Option<Written>> {
        self.delete_entry(table, key).await
    }

    async fn search(&self, table: &str, prefix: &str) -> Vec<Entry> {
        self.with_tables(|t| t.search(table, prefix))
    }

    async fn find_server(&self, table: &str, prefix: &str) -> Vec<CompleteRoute> {
        self.with_tables(|t| t.find_server(table, prefix))
    }

    async fn heartbeat(
        &self,
        table: &str,
        key: &str,
        time_max: Duration,
    ) -> Result<Option<Written>> {
        self.heartbeat_entry(table, key, time_max).await
    }

    fn subscribe(&self, table: &str, prefix: &str) -> impl Stream<Item = Event> + Send + 'static {
        /// Cancels the subscription when the stream goes (the client hung up).
        struct Sub {
            id: SubId,
            subs: Arc<std::sync::Mutex<Subscriptions>>,
            woken: watch::Receiver<u64>,
            ready: std::collections::VecDeque<Event>,
        }
        impl Drop for Sub {
            fn drop(&mut self) {
                self.subs.lock().expect("not poisoned").cancel(self.id);
            }
        }
        let id = self
            .subs
            .lock()
            .expect("not poisoned")
            .subscribe(table, prefix, 1024);
        let sub = Sub {
            id,
            subs: self.subs.clone(),
            woken: self.published.subscribe(),
            ready: Default::default(),
        };
        futures::stream::unfold(sub, |mut sub| async move {
            loop {
                if let Some(e) = sub.ready.pop_front() {
                    return Some((e, sub));
                }
                let drained = sub.subs.lock().expect("not poisoned").drain(sub.id)?;
                if drained.is_empty() {
                    sub.woken.changed().await.ok()?;
                }
                sub.ready.extend(drained);
            }
        })
    }
}

/// Hands the replica's contents to the daemon whenever they change: the feeder runs
/// on its own, so that a message from another node is never held up by resolving a
/// new next hop's MAC (up to 100 ms). A next hop that did not answer is not asked
/// again for 5 s (the daemon's neighbour refresh keeps trying).
async fn feeder(h: DirHandle, neighbors: Arc<NeighborTable>) {
    let mut tried: BTreeMap<IpAddr, Instant> = BTreeMap::new();
    // An empty directory changes nothing, yet the data plane must hear from it once
    // (a service without backends is judged out only after that).
    let first = tokio::time::sleep(Duration::from_secs(1));
    tokio::pin!(first);
    let mut fed_once = false;
    // Whether the daemon has had one whole feed; until then every round is whole.
    let mut fed_whole = false;
    // The services fed at least once (a newly desired one is fed in the next round).
    let mut seen: std::collections::BTreeSet<ServiceKey> = Default::default();
    let mut wanted = h.wanted.subscribe();
    loop {
        tokio::select! {
            _ = wanted.changed() => {}
            _ = &mut first, if !fed_once => {}
        }
        fed_once = true;
        let round = *wanted.borrow_and_update();
        // The cluster's desired services first: the feed below is for them.
        match h.with_tables(crate::directory::feed::desired) {
            Some(Ok(d)) if d != *h.daemon.now().desired => match h.daemon.apply(d).await {
                Ok(changes) => info!(
                    changes = changes.len(),
                    "applied the cluster's desired services"
                ),
                Err(e) => warn!(
                    "applying the cluster's desired services (this node keeps what it has): {e:#}"
                ),
            },
            Some(Err(e)) => warn!("the cluster's desired services do not parse: {e}"),
            _ => {}
        }
        // Only the services the changes named, once the directory has been fed whole
        // (a change to one service of 10,000 must not re-feed the others).
        let scope = std::mem::take(&mut *h.scope.lock().expect("not poisoned"));
        let partial = fed_whole && !scope.all;
        let mut scope = scope;
        let services: Vec<ServiceKey> = {
            let now = h.daemon.now();
            if partial {
                // Services desired since the last round have never been fed.
                scope.services.extend(
                    now.desired
                        .services
                        .keys()
                        .filter(|k| !seen.contains(k))
                        .copied(),
                );
                scope
                    .services
                    .iter()
                    .filter(|k| now.desired.services.contains_key(k))
                    .copied()
                    .collect()
            } else {
                now.desired.services.keys().copied().collect()
            }
        };
        let f = h.with_tables(|t| feed(t, &services));
        let services_fed = services.clone();
        let now = Instant::now();
        tried.retain(|_, at| now.duration_since(*at) < Duration::from_secs(5));
        let unknown: Vec<IpAddr> = {
            let known = &h.daemon.now().known_neighbors;
            f.vias()
                .into_iter()
                .filter(|a| !known.contains(a) && !tried.contains_key(a))
                .collect()
        };
        for addr in &unknown {
            tried.insert(*addr, now);
        }
        // All at once, and briefly: an answer comes within a millisecond or two on a
        // link, and an unresolvable next hop must not hold up the others (nor the
        // operator's change, which waits for this feed). Late answers come in with
        // the neighbour refresh (every 250 ms while a backend is unresolved).
        let found = neighbors
            .resolve_all(&unknown, &[], Duration::from_millis(100))
            .await;
        let keys = partial.then(|| scope.services.clone());
        let result = h
            .daemon
            .change(move |d| match &keys {
                Some(keys) => d.set_feed_of(keys, f, found),
                None => d.set_feed(f, found),
            })
            .await;
        if result.is_ok() {
            if !partial {
                seen.clear();
            }
            seen.extend(services_fed.iter().copied());
        }
        match (&result, partial) {
            (Ok(_), false) => fed_whole = true,
            // Not taken: the next round feeds everything.
            (Err(_), _) => h.scope.lock().expect("not poisoned").all = true,
            _ => {}
        }
        match result {
            Ok(touched) if !touched.is_empty() && h.events.is_some() => {
                info!(services = ?touched.iter().map(|k| k.to_string()).collect::<Vec<_>>(), "directory changed the data plane");
            }
            Ok(touched) if !touched.is_empty() => {
                debug!(
                    services = touched.len(),
                    "directory changed the data plane (standalone)"
                );
            }
            Ok(_) => {}
            Err(e) => warn!("feeding the data plane from the directory: {e:#}"),
        }
        h.fed.send_modify(|n| *n = (*n).max(round));
    }
}

/// The directory roles the cluster view says, with the other nodes' endpoints.
fn roles(
    cluster: &ClusterHandle,
    cfg: &ClusterConfig,
    me: NodeId,
) -> Option<(NodeId, Option<NodeId>, BTreeMap<NodeId, SocketAddr>)> {
    let view = cluster.view();
    view.leader?;
    let hosts: Vec<Candidate> = view
        .hosts
        .iter()
        .map(|h| Candidate {
            id: h.info.id,
            master: h.info.dir_master,
            backup_of: h.info.dir_backup_of,
            version: h.info.dir_version,
        })
        .collect();
    let (master, backup) = directory_roles(&hosts)?;
    let peers = hosts
        .iter()
        .filter(|h| peer::node_id(h.id) != me)
        .map(|h| (peer::node_id(h.id), peer::endpoint(h.id, cfg.port)))
        .collect();
    Some((peer::node_id(master), backup.map(peer::node_id), peers))
}

/// The number of this run's first directory request: a random run in the high 32
/// bits, counting from 1 below them (`replication::Done`). The master would take a
/// request numbered as one of an earlier run's for a resend of it, and acknowledge
/// it without applying it; a random run needs no clock that never steps back.
fn first_request() -> u64 {
    (u64::from(rand::random::<u32>()) << 32) | 1
}

/// Starts the directory: lease countdowns every 50 ms; resends, resyncs and (in a
/// cluster) role changes every 200 ms; this node in the agents table every second;
/// the feeder. Without a cluster this node is its own master. The managers that run
/// on the master are started beside it (`shell::managers::start`).
pub fn start(
    daemon: DaemonHandle,
    neighbors: Arc<NeighborTable>,
    cluster: Option<(ClusterHandle, ClusterConfig)>,
) -> DirHandle {
    let me = cluster.as_ref().map_or(0, |(_, c)| peer::node_id(c.id));
    let handle = DirHandle {
        node: Arc::new(std::sync::Mutex::new(DirNode::new(
            me,
            cluster.is_none(),
            first_request(),
        ))),
        daemon,
        key: Arc::new(
            cluster
                .as_ref()
                .map(|(_, c)| c.key.clone())
                .unwrap_or_default(),
        ),
        peers: Arc::new(std::sync::Mutex::new(BTreeMap::new())),
        me,
        subs: Arc::new(std::sync::Mutex::new(Subscriptions::default())),
        published: Arc::new(watch::channel(0).0),
        events: cluster.as_ref().map(|(c, cfg)| (c.clone(), cfg.id)),
        wanted: Arc::new(watch::channel(0).0),
        scope: Arc::new(std::sync::Mutex::new(Default::default())),
        fed: Arc::new(watch::channel(0).0),
        acks: Arc::new(watch::channel(0).0),
        ack_versions: Arc::new(std::sync::Mutex::new(BTreeMap::new())),
    };
    tokio::spawn(feeder(handle.clone(), neighbors));
    tokio::spawn(register_agent(
        handle.clone(),
        cluster
            .as_ref()
            .map(|(_, c)| peer::endpoint(c.id, c.port).to_string()),
    ));
    let h = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        let mut n = 0u64;
        loop {
            tick.tick().await;
            n += 1;
            h.step(Input::Expire);
            // No directory role before the cluster has had time to settle: a node that
            // just started sees only itself and would lead a directory of its own.
            let settled = cluster
                .as_ref()
                .is_none_or(|(_, cfg)| n * 50 >= 3 * cfg.timeout.as_millis() as u64);
            if !(n.is_multiple_of(4) && settled) {
                continue;
            }
            if let Some((c, cfg)) = &cluster {
                if !c.view().quorate {
                    h.step(Input::NoQuorum);
                } else if let Some((master, backup, peers)) = roles(c, cfg, me) {
                    let ids: BTreeSet<NodeId> = peers.keys().copied().collect();
                    *h.peers.lock().expect("not poisoned") = peers;
                    h.step(Input::Roles {
                        master,
                        backup,
                        peers: ids,
                    });
                    h.step(Input::Tick);
                }
                // Advertise this node's directory role and version in its heartbeats.
                let (master, backing, version, digest) = {
                    let node = h.node.lock().expect("not poisoned");
                    (
                        node.is_master(),
                        node.backing(),
                        node.version(),
                        node.digest(),
                    )
                };
                let backup_of = backing.and_then(|m| {
                    let peers = h.peers.lock().expect("not poisoned");
                    peers.get(&m).map(|a| a.ip())
                });
                c.set_directory(master, backup_of, version, digest).await;
            } else {
                h.step(Input::Tick);
            }
        }
    });
    handle
}

/// The management agents table: this node, with a lease (3 s, renewed every second),
/// so that every node sees which agents are alive and which leads. On its own task:
/// a write waits for the master's acknowledgement, which must not hold up the
/// directory's timers.
async fn register_agent(h: DirHandle, endpoint: Option<String>) {
    let endpoint = endpoint.unwrap_or_else(|| "-".into());
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if h.read_only() {
            continue;
        }
        let name = h.daemon.now().node.clone();
        let role = h.node.lock().expect("not poisoned").role();
        let value = format!("{endpoint};role={role}");
        if let Err(e) = h.put_if_changed(names::AGENTS, &name, &value).await {
            warn!("registering this agent: {e:#}");
        }
        if let Err(e) = h.renew(names::AGENTS, &name, Duration::from_secs(3)).await {
            warn!("renewing this agent: {e:#}");
        }
    }
}
