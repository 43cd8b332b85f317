//! The cluster's I/O: the control socket (multicast group and/or unicast peers), the
//! timer that ticks the node's state machine, the acquire/release actions (address,
//! data plane, announcements, script), the node's own health tests, and what the API
//! shows of it all. The decisions are `cluster::node`'s.

use std::{
    collections::{BTreeMap, VecDeque},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::Arc,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result};
use rand::{rngs::StdRng, SeedableRng};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::{
    net::UdpSocket,
    sync::{broadcast, mpsc},
};
use tracing::{info, warn};

use crate::{
    api::{ClusterView, EventRecord},
    cluster::{
        node::{Event, Input, Node, NodeConfig, Output, Timing},
        wire::{self, Reject},
    },
    config::ClusterConfig,
    shell::handle::DaemonHandle,
    shell::neighbor::NeighborTable,
    shell::vip::{self, Announcer},
};

/// How many past events `lbctl events` shows without --follow.
const EVENT_LOG: usize = 200;
/// Announcements after an acquire: at once, then after these delays.
const ANNOUNCE_AGAIN: [Duration; 2] = [Duration::from_millis(200), Duration::from_millis(600)];

/// What the API reads and the commands it sends.
#[derive(Clone)]
pub struct ClusterHandle {
    view: Arc<std::sync::Mutex<ClusterView>>,
    log: Arc<std::sync::Mutex<VecDeque<EventRecord>>>,
    pub events: broadcast::Sender<EventRecord>,
    commands: mpsc::Sender<Input>,
}

impl ClusterHandle {
    /// An event from outside the node's state machine (water marks, availability):
    /// logged and streamed like the others.
    pub fn publish(&self, node: IpAddr, event: Event) {
        info!(?event, "event");
        let record = EventRecord {
            at_ms: now_ms(),
            node,
            event,
        };
        {
            let mut log = self.log.lock().expect("not poisoned");
            if log.len() == EVENT_LOG {
                log.pop_front();
            }
            log.push_back(record.clone());
        }
        let _ = self.events.send(record);
    }

    pub fn view(&self) -> ClusterView {
        self.view.lock().expect("not poisoned").clone()
    }

    pub fn recent_events(&self) -> Vec<EventRecord> {
        self.log
            .lock()
            .expect("not poisoned")
            .iter()
            .cloned()
            .collect()
    }

    /// Advertises this node's directory role and replica version.
    pub async fn set_directory(&self, master: bool, version: u64) {
        let _ = self
            .commands
            .send(Input::Directory { master, version })
            .await;
    }

    pub async fn set_quiesce(&self, quiesce: bool) -> Result<()> {
        self.commands
            .send(Input::SetQuiesce(quiesce))
            .await
            .context("the cluster task has stopped")
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn control_socket(cfg: &ClusterConfig) -> Result<UdpSocket> {
    let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    sock.set_reuse_address(true)?;
    sock.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, cfg.port)).into())
        .with_context(|| format!("binding the cluster port {}", cfg.port))?;
    if let (Some(group), IpAddr::V4(id)) = (cfg.group, cfg.id) {
        if let IpAddr::V4(g) = group.ip() {
            sock.join_multicast_v4(&g, &id)
                .with_context(|| format!("joining {g} on the interface of {id} (cluster.id must be an address of this node)"))?;
            sock.set_multicast_if_v4(&id)?;
            sock.set_multicast_loop_v4(false)?;
            sock.set_multicast_ttl_v4(1)?;
        }
    }
    sock.set_nonblocking(true)?;
    Ok(UdpSocket::from_std(sock.into())?)
}

struct Actions {
    daemon: DaemonHandle,
    netlink: rtnetlink::Handle,
    ifindex: u32,
    interface: String,
    script: Option<std::path::PathBuf>,
    script_timeout: Duration,
}

impl Actions {
    async fn acquire(&self, vip: IpAddr) -> Result<()> {
        vip::add_address(&self.netlink, self.ifindex, vip).await?;
        self.daemon.call(move |d| d.set_owned(vip, true)).await?;
        if let Some(script) = &self.script {
            if let Err(e) = vip::run_script(script, "acquire", vip, self.script_timeout).await {
                let _ = self.daemon.call(move |d| d.set_owned(vip, false)).await;
                let _ = vip::remove_address(&self.netlink, self.ifindex, vip).await;
                return Err(e);
            }
        }
        let mut announcer = Announcer::open(&self.interface)?;
        announcer.announce(vip)?;
        // Repeat in the background: a lost announcement leaves caches stale.
        tokio::spawn(async move {
            for delay in ANNOUNCE_AGAIN {
                tokio::time::sleep(delay).await;
                let _ = announcer.announce(vip);
            }
        });
        Ok(())
    }

    async fn release(&self, vip: IpAddr) -> Result<()> {
        let script = match &self.script {
            Some(s) => vip::run_script(s, "release", vip, self.script_timeout).await,
            None => Ok(()),
        };
        self.daemon.call(move |d| d.set_owned(vip, false)).await?;
        vip::remove_address(&self.netlink, self.ifindex, vip).await?;
        script
    }
}

/// The node's own tests: its VIP interface is up, the program is attached, and at
/// least one backend is reachable (or it has none to reach).
async fn self_test(daemon: &DaemonHandle, neighbors: &NeighborTable, interface: &str) -> bool {
    let up = neighbors.link_up(interface).await.unwrap_or(false);
    let status = daemon.now().status.clone();
    let attached = !status.interfaces.is_empty();
    let reachable = status.backends == 0 || status.unresolved_backends < status.backends;
    up && attached && reachable
}

/// Starts the cluster task; returns the handle the API uses.
/// `conn_capacity`: the connection table's size, the capacity this node advertises.
pub async fn start(
    cfg: ClusterConfig,
    daemon: DaemonHandle,
    neighbors: Arc<NeighborTable>,
    conn_capacity: u32,
) -> Result<ClusterHandle> {
    let socket = control_socket(&cfg)?;
    let iface = neighbors.interface(&cfg.vip_interface).await?;
    let (conn, netlink, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
    tokio::spawn(conn);

    // The daemon kept serving the group addresses it found on the interface.
    let group_addrs: Vec<IpAddr> = cfg
        .preferred
        .iter()
        .copied()
        .chain(daemon.now().service_addresses.clone())
        .collect();
    let adopted: Vec<IpAddr> = daemon.now().adopted.iter().copied().collect();

    let node_cfg = NodeConfig {
        id: cfg.id,
        control_addresses: vec![cfg.id],
        preferred: cfg.preferred.clone(),
        addresses: {
            let mut a = group_addrs.clone();
            a.sort();
            a.dedup();
            a
        },
        timing: Timing {
            interval: cfg.interval,
            timeout: cfg.timeout,
            command_timeout: cfg.timeout,
            orphan_expiry: cfg.orphan_expiry,
        },
        quorum: cfg.quorum,
    };
    // Microseconds of wall clock: above anything this node sent before a restart.
    let first_seq = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(1, |d| d.as_micros() as u64);
    let mut node = Node::new(node_cfg, first_seq);
    for a in &adopted {
        node.adopt(*a);
        info!(vip = %a, "kept a VIP this node served before it restarted");
    }

    let (events, _) = broadcast::channel(256);
    let (commands, mut command_rx) = mpsc::channel::<Input>(16);
    let handle = ClusterHandle {
        view: Arc::new(std::sync::Mutex::new(ClusterView::default())),
        log: Arc::new(std::sync::Mutex::new(VecDeque::new())),
        events: events.clone(),
        commands: commands.clone(),
    };
    let actions = Arc::new(Actions {
        daemon: daemon.clone(),
        netlink,
        ifindex: iface.ifindex,
        interface: cfg.vip_interface.clone(),
        script: cfg.script.clone(),
        script_timeout: cfg.script_timeout,
    });
    let destinations: Vec<SocketAddr> = cfg
        .group
        .into_iter()
        .chain(cfg.peers.iter().copied())
        .collect();
    let key = cfg.key.clone();
    let tick_every = (cfg.interval / 4).max(Duration::from_millis(5));
    let h = handle.clone();
    let interface = cfg.vip_interface.clone();
    tokio::spawn(async move {
        let mut rng = StdRng::from_entropy();
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut tests = tokio::time::interval(Duration::from_secs(1));
        let mut buf = vec![0u8; wire::MAX_MESSAGE + 1];
        let mut event_counts: BTreeMap<String, u64> = BTreeMap::new();
        let mut announcer: Option<Announcer> = None;
        loop {
            let input = tokio::select! {
                _ = tick.tick() => Input::Tick,
                _ = tests.tick() => {
                    // As the seed's transmit thread does: announce what we serve again,
                    // so a cache that missed the takeover (or points at a node that
                    // handed the VIP back) heals within a second.
                    if announcer.is_none() {
                        announcer = Announcer::open(&interface).map_err(|e| warn!("announcer: {e:#}")).ok();
                    }
                    if let Some(a) = announcer.as_mut() {
                        for (vip, state) in node.serving() {
                            if *state == crate::cluster::wire::AddrState::Online {
                                let _ = a.announce(*vip);
                            }
                        }
                    }
                    // The load this node advertises: its connection table's entries
                    // against its size (what the leader's spare choice can weigh).
                    let status = daemon.now().status.clone();
                    let load = Input::Load {
                        load: status.conn_table_entries.min(u32::MAX as usize) as u32,
                        capacity: conn_capacity,
                    };
                    for out in node.handle(Instant::now(), load, &mut rng) {
                        if let Output::Event(e) = out {
                            info!(?e, "cluster event");
                        }
                    }
                    Input::TestResult { ok: self_test(&daemon, &neighbors, &interface).await }
                }
                r = socket.recv_from(&mut buf) => match r {
                    Ok((n, from)) => match wire::decode(&buf[..n], &key) {
                        Ok(m) => {
                            tracing::debug!(%from, sender = %m.sender(), seq = m.seq(), "control message");
                            Input::Message(m)
                        }
                        Err(why) => {
                            tracing::debug!(%from, ?why, "control message dropped");
                            node.count_reject(why);
                            continue;
                        }
                    },
                    Err(e) => {
                        warn!("cluster socket: {e}");
                        continue;
                    }
                },
                Some(cmd) = command_rx.recv() => cmd,
            };
            let now = Instant::now();
            for out in node.handle(now, input, &mut rng) {
                match out {
                    Output::Send(m) => {
                        let bytes = wire::encode(&m, &key);
                        for d in &destinations {
                            if let Err(e) = socket.send_to(&bytes, d).await {
                                warn!(to = %d, "sending a control message: {e}");
                            }
                        }
                    }
                    Output::Acquire(vip) => {
                        let (a, c) = (actions.clone(), commands.clone());
                        tokio::spawn(async move {
                            let r = a.acquire(vip).await;
                            if let Err(e) = &r {
                                warn!(%vip, "acquire failed: {e:#}");
                            }
                            let _ = c
                                .send(Input::Acquired {
                                    address: vip,
                                    ok: r.is_ok(),
                                })
                                .await;
                        });
                    }
                    Output::Release(vip) => {
                        let (a, c) = (actions.clone(), commands.clone());
                        tokio::spawn(async move {
                            let r = a.release(vip).await;
                            if let Err(e) = &r {
                                warn!(%vip, "release failed: {e:#}");
                            }
                            let _ = c
                                .send(Input::Released {
                                    address: vip,
                                    ok: r.is_ok(),
                                })
                                .await;
                        });
                    }
                    Output::Event(event) => {
                        info!(?event, "cluster event");
                        let name = serde_json::to_value(&event)
                            .ok()
                            .and_then(|v| v["event"].as_str().map(str::to_string))
                            .unwrap_or_default();
                        *event_counts.entry(name).or_default() += 1;
                        let record = EventRecord {
                            at_ms: now_ms(),
                            node: node.id(),
                            event,
                        };
                        {
                            let mut log = h.log.lock().expect("not poisoned");
                            if log.len() == EVENT_LOG {
                                log.pop_front();
                            }
                            log.push_back(record.clone());
                        }
                        let _ = h.events.send(record);
                    }
                }
            }
            let mut view = h.view.lock().expect("not poisoned");
            *view = ClusterView {
                id: Some(node.id()),
                leader: node.leader(),
                is_leader: node.is_leader(),
                hosts: node.hosts(now),
                rejected: Reject::ALL
                    .iter()
                    .map(|r| {
                        (
                            r.name().to_string(),
                            node.rejected().get(r).copied().unwrap_or(0),
                        )
                    })
                    .collect(),
                events: event_counts.clone(),
            };
        }
    });
    Ok(handle)
}
