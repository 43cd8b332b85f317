//! The cluster's I/O: the control socket (multicast group and/or unicast peers), the
//! timer that ticks the node's state machine, the acquire/release actions (address,
//! data plane, announcements, script), the node's own health tests, and what the API
//! shows of it all. The decisions are `cluster::node`'s.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
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
    dataplane::liveness::Stamp,
    shell::handle::DaemonHandle,
    shell::neighbor::NeighborTable,
    shell::vipd::{self, VipHandle},
};

/// How many past events `lbctl events` shows without --follow.
const EVENT_LOG: usize = 200;

/// What the API reads and the commands it sends.
#[derive(Clone)]
pub struct ClusterHandle {
    view: Arc<std::sync::Mutex<ClusterView>>,
    log: Arc<std::sync::Mutex<VecDeque<EventRecord>>>,
    pub events: broadcast::Sender<EventRecord>,
    /// Events by kind, since the start.
    counts: Arc<std::sync::Mutex<BTreeMap<String, u64>>>,
    commands: mpsc::Sender<Input>,
    vips: Arc<std::sync::Mutex<Option<VipHandle>>>,
}

impl ClusterHandle {
    /// An event from outside the node's state machine (water marks, availability):
    /// logged and streamed like the others.
    pub fn publish(&self, node: IpAddr, event: Event) {
        self.record(node, event)
    }

    fn record(&self, node: IpAddr, event: Event) {
        info!(?event, "cluster event");
        let name = serde_json::to_value(&event)
            .ok()
            .and_then(|v| v["event"].as_str().map(str::to_string))
            .unwrap_or_default();
        *self
            .counts
            .lock()
            .expect("not poisoned")
            .entry(name)
            .or_default() += 1;
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
    pub async fn set_directory(
        &self,
        master: bool,
        backup_of: Option<IpAddr>,
        version: u64,
        digest: u64,
    ) {
        let _ = self
            .commands
            .send(Input::Directory {
                master,
                backup_of,
                version,
                digest,
            })
            .await;
    }

    /// This node has finished its start-up sync: it may take VIPs from now on.
    pub async fn set_ready(&self) {
        let _ = self.commands.send(Input::SetReady(true)).await;
    }

    /// Leaves the group for good: the others take every VIP of this node before it
    /// releases them (or, after `within`, it releases what nobody took), and the
    /// released ones are forwarded for the grace period. Then the data plane may go.
    pub async fn leave(&self, within: Duration) {
        let _ = self.commands.send(Input::Leave).await;
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            let serving = self
                .view()
                .hosts
                .iter()
                .find(|h| h.me)
                .map_or(0, |h| h.info.serving.len());
            if serving == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let vips = self.vips.lock().expect("not poisoned").clone();
        if let Some(v) = vips {
            v.release_all().await;
        }
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

/// The node's own tests: its VIP interface is up, the program is attached, and it
/// can serve some VIP. Which VIPs it can serve is judged per VIP
/// (`Published::unable`, advertised to the leader): one family's or one service's
/// backends out of reach must not cost the others their node. A daemon that just
/// started (the neighbour table may still be filling) is not judged on backends.
async fn self_test(
    daemon: &DaemonHandle,
    neighbors: &NeighborTable,
    interface: &str,
    started: Instant,
) -> bool {
    let up = neighbors.link_up(interface).await.unwrap_or(false);
    let now = daemon.now();
    let attached = !now.status.interfaces.is_empty();
    let vips: BTreeSet<IpAddr> = now.service_addresses.iter().copied().collect();
    let none_servable = !vips.is_empty() && vips.is_subset(&now.unable);
    let judged = started.elapsed() >= Duration::from_secs(3);
    up && attached && !(judged && none_servable)
}

/// Starts the cluster task; returns the handle the API uses.
/// `conn_capacity`: the connection tables' sizes together, the capacity this node advertises.
pub async fn start(
    cfg: ClusterConfig,
    daemon: DaemonHandle,
    neighbors: Arc<NeighborTable>,
    conn_capacity: u32,
    pin_dir: &std::path::Path,
) -> Result<ClusterHandle> {
    let socket = control_socket(&cfg)?;
    let iface = neighbors.interface(&cfg.vip_interface).await?;
    // Link down flushes IPv6 addresses by default; a VIP must survive a flap (the
    // reconciler would put it back, but only after clients saw it gone).
    let keep = format!(
        "/proc/sys/net/ipv6/conf/{}/keep_addr_on_down",
        cfg.vip_interface
    );
    if let Err(e) = std::fs::write(&keep, "1") {
        warn!("setting {keep}: {e} (IPv6 VIPs will be flushed when the link goes down)");
    }
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
    // Not ready until the start-up sync is done (`ClusterHandle::set_ready`).
    node.handle(
        Instant::now(),
        Input::SetReady(false),
        &mut StdRng::from_entropy(),
    );
    {
        let now = daemon.now();
        node.handle(
            Instant::now(),
            Input::DataPlane {
                digests: now.digests.clone(),
                unable: now.unable.clone(),
            },
            &mut StdRng::from_entropy(),
        );
    }
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
        counts: Arc::default(),
        commands: commands.clone(),
        vips: Arc::default(),
    };
    let (repairs_tx, mut repairs) = mpsc::unbounded_channel();
    let vips = vipd::start(
        vipd::Settings {
            daemon: daemon.clone(),
            netlink,
            ifindex: iface.ifindex,
            interface: cfg.vip_interface.clone(),
            script: cfg.script.clone(),
            script_timeout: cfg.script_timeout,
            group: group_addrs.iter().copied().collect(),
            held: adopted.iter().copied().collect(),
        },
        commands.clone(),
        repairs_tx,
    );
    handle
        .vips
        .lock()
        .expect("not poisoned")
        .replace(vips.clone());
    // The liveness stamp, on its own map handle and task: the data plane stops
    // answering ARP for our VIPs within a timeout of this process dying.
    match Stamp::open(pin_dir) {
        Ok(mut stamp) => {
            let (every, ahead) = (cfg.interval, cfg.timeout);
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    if let Err(e) = stamp.alive_for(ahead) {
                        warn!("writing the liveness stamp: {e}");
                    }
                }
            });
        }
        Err(e) => warn!("no liveness stamp (a dead lbd's node would keep answering ARP): {e}"),
    }
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
        let started = Instant::now();
        let mut uncontested: BTreeSet<IpAddr> = BTreeSet::new();
        let mut tick = tokio::time::interval(tick_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let mut tests = tokio::time::interval(Duration::from_secs(1));
        let mut buf = vec![0u8; wire::MAX_MESSAGE + 1];
        loop {
            let input = tokio::select! {
                _ = tick.tick() => Input::Tick,
                Some(event) = repairs.recv() => {
                    h.record(node.id(), event);
                    continue;
                }
                _ = tests.tick() => {
                    // As the seed's transmit thread does: announce what we serve again,
                    // so a cache that missed the takeover (or points at a node that
                    // handed the VIP back) heals within a second.
                    vips.announce(node.uncontested(Instant::now())).await;
                    // The load this node advertises: its connection table's entries
                    // against its size (what the leader's spare choice can weigh).
                    let status = daemon.now().status.clone();
                    let load = Input::Load {
                        load: status.conn_table_entries.min(u32::MAX as usize) as u32,
                        capacity: conn_capacity,
                    };
                    let now_pub = daemon.now();
                    let tables = Input::DataPlane {
                        digests: now_pub.digests.clone(),
                        unable: now_pub.unable.clone(),
                    };
                    for input in [load, tables] {
                        for out in node.handle(Instant::now(), input, &mut rng) {
                            if let Output::Event(e) = out {
                                h.record(node.id(), e);
                            }
                        }
                    }
                    Input::TestResult { ok: self_test(&daemon, &neighbors, &interface, started).await }
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
                    // One actor, in order: a release never races an acquire or
                    // another release of this node.
                    Output::Acquire(vip) => vips.acquire(vip).await,
                    Output::Release(vip) => vips.release(vip).await,
                    Output::Event(event) => h.record(node.id(), event),
                }
            }
            // A VIP this node now serves alone (the other side of a handover just let
            // go): announce it at once, in case the other's last announcement came
            // after ours.
            let alone = node.uncontested(now);
            let fresh: BTreeSet<IpAddr> = alone.difference(&uncontested).copied().collect();
            if !fresh.is_empty() {
                vips.announce(fresh).await;
            }
            uncontested = alone;
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
                events: h.counts.lock().expect("not poisoned").clone(),
                quorate: node.quorate(),
                mismatched: node.mismatched().iter().copied().collect(),
            };
        }
    });
    Ok(handle)
}
