//! One LB node's part in the cluster, as a state machine: fed with the time, received
//! messages and the outcomes of its own actions; returns messages to send, actions
//! (acquire or release a VIP) and events. No sockets, no clocks: the daemon's tokio
//! layer owns those, and the tests drive many nodes through a simulated network.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use rand::Rng;
use serde::{Deserialize, Serialize};

use super::{
    assign::decide,
    wire::{AddrState, HostInfo, Message, Reject, Replay},
};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Between two info messages.
    pub interval: Duration,
    /// Silence after which a host is dead.
    pub timeout: Duration,
    /// How long the leader waits for a host to act on a command before sending again.
    pub command_timeout: Duration,
    /// An address no alive host is configured with, but someone still serves, expires
    /// after this long; `None`: never.
    pub orphan_expiry: Option<Duration>,
}

impl Default for Timing {
    fn default() -> Self {
        let interval = Duration::from_millis(100);
        Self {
            interval,
            timeout: 3 * interval,
            command_timeout: 3 * interval,
            orphan_expiry: None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub id: IpAddr,
    pub control_addresses: Vec<IpAddr>,
    pub preferred: Vec<IpAddr>,
    /// The group's service addresses as this node is configured.
    pub addresses: Vec<IpAddr>,
    pub timing: Timing,
    /// Hosts that must be alive, this one included, for it to serve or lead: a node
    /// cut off from a majority gives its VIPs up, so a partition leaves at most one
    /// owner per VIP on the majority side. 1: no quorum.
    pub quorum: usize,
}

/// What the leader is waiting for a host to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Command {
    Acquire,
    Release,
    /// Nothing: an unassignable address, reported once per command timeout.
    None,
}

/// Something worth telling the operator (logged, counted, streamed by `lbctl events`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    Acquire {
        address: IpAddr,
    },
    AcquireFail {
        address: IpAddr,
    },
    Release {
        address: IpAddr,
    },
    ReleaseFail {
        address: IpAddr,
    },
    CannotAssign {
        address: IpAddr,
    },
    TestFailed,
    LeaderChange {
        from: Option<IpAddr>,
        to: IpAddr,
    },
    HostDead {
        host: IpAddr,
    },
    HostJoined {
        host: IpAddr,
    },
    /// Fewer hosts alive than the quorum: this node gave its VIPs up.
    QuorumLost {
        alive: usize,
        quorum: usize,
    },
    QuorumRegained {
        alive: usize,
    },
    /// This node's tables for a VIP differ from those of the node serving it: it will
    /// not take the VIP until they agree.
    TableMismatch {
        address: IpAddr,
        owner: IpAddr,
    },
    /// What this node holds of a VIP differed from what it serves, and was repaired.
    Repaired {
        address: IpAddr,
        what: String,
    },
    /// This node's directory replica held other rows than the master's at the same
    /// version; it was replaced by the master's (`rows` changed).
    DirectoryResync {
        rows: usize,
    },
    /// This node finished its start-up sync (directory and availability) and may
    /// take VIPs.
    Ready,
    /// The water marks took a backend out of new flows, or let it back in.
    Steering {
        service: String,
        backend: IpAddr,
        in_table: bool,
        util: u64,
    },
    /// A service became unavailable or available again (operator record).
    Availability {
        service: String,
        available: bool,
        reason: String,
        operator: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Output {
    Send(Message),
    /// Make this node serve the address: add it to the interface, mark it in the XDP
    /// table, announce it; then report `Input::Acquired`.
    Acquire(IpAddr),
    /// The reverse; then report `Input::Released`.
    Release(IpAddr),
    Event(Event),
}

#[derive(Clone, Debug)]
pub enum Input {
    Tick,
    Message(Message),
    TestResult {
        ok: bool,
    },
    SetQuiesce(bool),
    /// Whether this node has finished its start-up sync (directory, availability): a
    /// node that has not takes no VIP and is given none.
    SetReady(bool),
    /// Leaving the group for good: hand every VIP over, acquire nothing.
    Leave,
    Load {
        load: u32,
        capacity: u32,
    },
    Acquired {
        address: IpAddr,
        ok: bool,
    },
    /// This node's directory role and replica version, to advertise.
    Directory {
        master: bool,
        backup_of: Option<IpAddr>,
        version: u64,
        digest: u64,
    },
    /// What this node's data plane says: each VIP's table digest, and the VIPs it
    /// cannot serve (no usable backend for any of their services).
    DataPlane {
        digests: BTreeMap<IpAddr, u64>,
        unable: BTreeSet<IpAddr>,
    },
    Released {
        address: IpAddr,
        ok: bool,
    },
}

#[derive(Clone, Debug)]
struct Heard {
    info: HostInfo,
    at: Instant,
}

/// A host as `lbctl cluster` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostView {
    pub info: HostInfo,
    pub age_ms: u64,
    pub leader: bool,
    pub me: bool,
}

pub struct Node {
    config: NodeConfig,
    seq: u64,
    ok: bool,
    quiesce: bool,
    leaving: bool,
    load: u32,
    capacity: u32,
    serving: BTreeMap<IpAddr, AddrState>,
    hosts: BTreeMap<IpAddr, Heard>,
    replay: Replay,
    leader: Option<IpAddr>,
    /// The leader's outstanding commands: address → (host, sent at, what).
    in_flight: BTreeMap<IpAddr, (IpAddr, Instant, Command)>,
    /// When each group address was last configured on an alive host.
    address_seen: BTreeMap<IpAddr, Instant>,
    last_info: Option<Instant>,
    rejected: BTreeMap<Reject, u64>,
    /// The first tick. A node listens for one timeout before it leads: until then it
    /// does not know who else is alive, and would assign to the wrong hosts.
    started: Option<Instant>,
    dir_master: bool,
    dir_backup_of: Option<IpAddr>,
    dir_version: u64,
    dir_digest: u64,
    /// Start-up sync done (directory and availability): until then, no VIP.
    ready: bool,
    digests: BTreeMap<IpAddr, u64>,
    unable: BTreeSet<IpAddr>,
    /// Commands from a host that is not (yet) this node's leader, by address: the
    /// death that made it leader may reach this node a moment later. Carried out as
    /// soon as this node agrees, if still fresh.
    pending: BTreeMap<IpAddr, (Message, Instant)>,
    /// Enough hosts alive (see `NodeConfig::quorum`).
    quorate: bool,
    /// VIPs whose owner's tables differ from this node's (reported once).
    mismatched: BTreeSet<IpAddr>,
}

impl Node {
    /// `first_seq` must exceed every sequence number this node ever sent before (the
    /// daemon passes the wall clock in microseconds), or peers take it for a replay.
    pub fn new(config: NodeConfig, first_seq: u64) -> Self {
        Self {
            config,
            seq: first_seq,
            ok: true,
            quiesce: false,
            leaving: false,
            load: 0,
            capacity: 0,
            serving: BTreeMap::new(),
            hosts: BTreeMap::new(),
            replay: Replay::default(),
            leader: None,
            in_flight: BTreeMap::new(),
            address_seen: BTreeMap::new(),
            last_info: None,
            rejected: BTreeMap::new(),
            started: None,
            dir_master: false,
            dir_backup_of: None,
            dir_version: 0,
            dir_digest: 0,
            ready: true,
            digests: BTreeMap::new(),
            unable: BTreeSet::new(),
            pending: BTreeMap::new(),
            quorate: true,
            mismatched: BTreeSet::new(),
        }
    }

    pub fn id(&self) -> IpAddr {
        self.config.id
    }

    /// Takes on addresses this node already serves when it starts (a restarted
    /// daemon finding its VIPs still on the interface): reported online at once, so
    /// the leader does not hand them to someone else, or resolves the duplicate.
    pub fn adopt(&mut self, address: IpAddr) {
        self.serving.insert(address, AddrState::Online);
    }

    pub fn is_leader(&self) -> bool {
        self.leader == Some(self.config.id)
    }

    pub fn leader(&self) -> Option<IpAddr> {
        self.leader
    }

    pub fn serving(&self) -> &BTreeMap<IpAddr, AddrState> {
        &self.serving
    }

    pub fn quiesced(&self) -> bool {
        self.quiesce
    }

    pub fn ok(&self) -> bool {
        self.ok
    }

    pub fn rejected(&self) -> &BTreeMap<Reject, u64> {
        &self.rejected
    }

    /// Counts a datagram dropped before it became a message (bad MAC, malformed...).
    pub fn count_reject(&mut self, why: Reject) {
        *self.rejected.entry(why).or_default() += 1;
    }

    fn next_seq(&mut self) -> u64 {
        self.seq += 1;
        self.seq
    }

    pub fn my_info(&self) -> HostInfo {
        HostInfo {
            id: self.config.id,
            control_addresses: self.config.control_addresses.clone(),
            ok: self.ok,
            quiesce: self.quiesce,
            leaving: self.leaving,
            load: self.load,
            capacity: self.capacity,
            preferred: self.config.preferred.clone(),
            serving: self.serving.clone(),
            addresses: self.config.addresses.clone(),
            dir_master: self.dir_master,
            dir_backup_of: self.dir_backup_of,
            dir_version: self.dir_version,
            dir_digest: self.dir_digest,
            ready: self.ready,
            digests: self.digests.clone(),
            unable: self.unable.clone(),
        }
    }

    pub fn hosts(&self, now: Instant) -> Vec<HostView> {
        let mut out = vec![HostView {
            info: self.my_info(),
            age_ms: 0,
            leader: self.leader == Some(self.config.id),
            me: true,
        }];
        for (id, h) in &self.hosts {
            out.push(HostView {
                info: h.info.clone(),
                age_ms: now.saturating_duration_since(h.at).as_millis() as u64,
                leader: self.leader == Some(*id),
                me: false,
            });
        }
        out.sort_by_key(|h| h.info.id);
        out
    }

    pub fn handle<R: Rng>(&mut self, now: Instant, input: Input, rng: &mut R) -> Vec<Output> {
        let mut out = Vec::new();
        match input {
            Input::Tick => self.tick(now, rng, &mut out),
            Input::Message(m) => self.receive(now, m, &mut out),
            Input::TestResult { ok } => {
                if self.ok && !ok {
                    out.push(Output::Event(Event::TestFailed));
                    // A failing node gives its addresses up, so that others take them.
                    let serving: Vec<IpAddr> = self.serving.keys().copied().collect();
                    for a in serving {
                        self.release(a, &mut out);
                    }
                }
                self.ok = ok;
            }
            Input::SetQuiesce(q) => self.quiesce = q,
            Input::SetReady(r) => {
                if r && !self.ready {
                    out.push(Output::Event(Event::Ready));
                }
                self.ready = r;
                self.send_info(now, &mut out);
            }
            Input::Leave => {
                self.leaving = true;
                self.send_info(now, &mut out);
            }
            Input::Directory {
                master,
                backup_of,
                version,
                digest,
            } => {
                self.dir_digest = digest;
                self.dir_master = master;
                self.dir_backup_of = backup_of;
                self.dir_version = version;
            }
            Input::DataPlane { digests, unable } => {
                self.digests = digests;
                self.unable = unable;
            }
            Input::Load { load, capacity } => {
                self.load = load;
                self.capacity = capacity;
            }
            Input::Acquired { address, ok } => {
                if self.serving.get(&address) == Some(&AddrState::Acquiring) {
                    if ok {
                        self.serving.insert(address, AddrState::Online);
                        out.push(Output::Event(Event::Acquire { address }));
                    } else {
                        self.serving.remove(&address);
                        out.push(Output::Event(Event::AcquireFail { address }));
                    }
                    // Report at once: the leader waits for this.
                    self.send_info(now, &mut out);
                }
            }
            Input::Released { address, ok } => {
                if self.serving.remove(&address).is_some() {
                    out.push(Output::Event(if ok {
                        Event::Release { address }
                    } else {
                        Event::ReleaseFail { address }
                    }));
                    self.send_info(now, &mut out);
                }
            }
        }
        out
    }

    fn acquire(&mut self, address: IpAddr, out: &mut Vec<Output>) {
        if !self.ok
            || !self.quorate
            || !self.ready
            || self.quiesce
            || self.leaving
            || self.serving.contains_key(&address)
        {
            return;
        }
        self.serving.insert(address, AddrState::Acquiring);
        out.push(Output::Acquire(address));
    }

    fn release(&mut self, address: IpAddr, out: &mut Vec<Output>) {
        match self.serving.get(&address) {
            Some(AddrState::Online) | Some(AddrState::Acquiring) => {
                self.serving.insert(address, AddrState::Releasing);
                out.push(Output::Release(address));
            }
            _ => {}
        }
    }

    fn receive(&mut self, now: Instant, m: Message, out: &mut Vec<Output>) {
        if let Err(why) = self.replay.check(self.config.id, &m) {
            self.count_reject(why);
            return;
        }
        match m {
            Message::Info {
                host,
                service_addresses,
                ..
            } => {
                // Every node keeps the service-address table, so that whoever leads
                // next knows which addresses were alive and since when.
                for a in host.addresses.iter().chain(&host.preferred) {
                    self.address_seen.insert(*a, now);
                }
                for (a, age_ms) in service_addresses {
                    let seen = now
                        .checked_sub(Duration::from_millis(age_ms))
                        .unwrap_or(now);
                    let e = self.address_seen.entry(a).or_insert(seen);
                    *e = (*e).max(seen);
                }
                if !self.hosts.contains_key(&host.id) {
                    out.push(Output::Event(Event::HostJoined { host: host.id }));
                }
                self.hosts.insert(
                    host.id,
                    Heard {
                        info: host,
                        at: now,
                    },
                );
                self.elect(now, out);
            }
            Message::Acquire { to, .. } | Message::Release { to, .. } if to != self.config.id => {}
            Message::Acquire { from, address, .. } if Some(from) == self.leader => {
                self.acquire(address, out)
            }
            Message::Release { from, address, .. } if Some(from) == self.leader => {
                self.release(address, out)
            }
            Message::Acquire { address, .. } | Message::Release { address, .. } => {
                self.pending.insert(address, (m, now));
            }
        }
    }

    /// Carries out what the leader sent before this node followed it.
    fn run_pending(&mut self, now: Instant, out: &mut Vec<Output>) {
        let fresh = self.config.timing.command_timeout;
        let pending = std::mem::take(&mut self.pending);
        for (address, (m, at)) in pending {
            if now.saturating_duration_since(at) > fresh {
                continue;
            }
            match m {
                Message::Acquire { from, .. } if Some(from) == self.leader => {
                    self.acquire(address, out)
                }
                Message::Release { from, .. } if Some(from) == self.leader => {
                    self.release(address, out)
                }
                other => {
                    self.pending.insert(address, (other, at));
                }
            }
        }
    }

    fn elect(&mut self, now: Instant, out: &mut Vec<Output>) {
        let leader = self.hosts.keys().copied().chain([self.config.id]).min();
        if leader != self.leader {
            if let Some(to) = leader {
                out.push(Output::Event(Event::LeaderChange {
                    from: self.leader,
                    to,
                }));
            }
            self.leader = leader;
            self.in_flight.clear();
            self.run_pending(now, out);
        }
    }

    /// Gives everything up when fewer hosts than the quorum are alive.
    fn check_quorum(&mut self, out: &mut Vec<Output>) {
        let alive = self.hosts.len() + 1;
        let quorate = alive >= self.config.quorum;
        if quorate == self.quorate {
            return;
        }
        self.quorate = quorate;
        if quorate {
            out.push(Output::Event(Event::QuorumRegained { alive }));
        } else {
            out.push(Output::Event(Event::QuorumLost {
                alive,
                quorum: self.config.quorum,
            }));
            let serving: Vec<IpAddr> = self.serving.keys().copied().collect();
            for a in serving {
                self.release(a, out);
            }
        }
    }

    /// Reports, once per change, VIPs whose owner holds other tables than this node.
    fn check_tables(&mut self, out: &mut Vec<Output>) {
        for (addr, mine) in &self.digests {
            let owner = self.hosts.values().find_map(|h| {
                (h.info.serving.get(addr) == Some(&AddrState::Online))
                    .then(|| (h.info.id, h.info.digests.get(addr).copied()))
            });
            let differs = match owner {
                Some((_, Some(theirs))) => theirs != *mine,
                _ => false,
            };
            if differs && self.mismatched.insert(*addr) {
                out.push(Output::Event(Event::TableMismatch {
                    address: *addr,
                    owner: owner.expect("differs").0,
                }));
            } else if !differs {
                self.mismatched.remove(addr);
            }
        }
    }

    /// VIPs whose owner's tables differ from this node's.
    pub fn mismatched(&self) -> &BTreeSet<IpAddr> {
        &self.mismatched
    }

    pub fn quorate(&self) -> bool {
        self.quorate
    }

    /// VIPs this node serves that no other alive host reports serving too: the ones
    /// to announce again. While another claims one, the leader is about to release
    /// one of the two, and an announcement now could point clients at the loser.
    /// Nothing before this node has listened for a timeout: until then it does not
    /// know who else serves what (after a restart, another may have taken over).
    pub fn uncontested(&self, now: Instant) -> BTreeSet<IpAddr> {
        let listened = self
            .started
            .is_some_and(|s| now.saturating_duration_since(s) >= self.config.timing.timeout);
        if !listened {
            return BTreeSet::new();
        }
        self.serving
            .iter()
            .filter(|(a, s)| {
                **s == AddrState::Online
                    && !self
                        .hosts
                        .values()
                        .any(|h| h.info.serving.get(a) == Some(&AddrState::Online))
            })
            .map(|(a, _)| *a)
            .collect()
    }

    fn send_info(&mut self, now: Instant, out: &mut Vec<Output>) {
        let seq = self.next_seq();
        let others = self
            .hosts
            .values()
            .map(|h| {
                (
                    h.info.clone(),
                    now.saturating_duration_since(h.at).as_millis() as u64,
                )
            })
            .collect();
        let service_addresses = self
            .address_seen
            .iter()
            .map(|(a, t)| (*a, now.saturating_duration_since(*t).as_millis() as u64))
            .collect();
        out.push(Output::Send(Message::Info {
            seq,
            host: self.my_info(),
            others,
            service_addresses,
        }));
        self.last_info = Some(now);
    }

    fn tick<R: Rng>(&mut self, now: Instant, rng: &mut R, out: &mut Vec<Output>) {
        let timeout = self.config.timing.timeout;
        let dead: Vec<IpAddr> = self
            .hosts
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.at) > timeout)
            .map(|(id, _)| *id)
            .collect();
        for host in dead {
            self.hosts.remove(&host);
            out.push(Output::Event(Event::HostDead { host }));
        }
        self.elect(now, out);
        let started = *self.started.get_or_insert(now);
        let listened = now.saturating_duration_since(started) >= timeout;
        // A node that just started has heard nobody yet: what it adopted stays until
        // it has listened for a timeout.
        if listened {
            self.check_quorum(out);
        }
        self.check_tables(out);
        for a in self.config.addresses.iter().chain(&self.config.preferred) {
            self.address_seen.insert(*a, now);
        }
        if self
            .last_info
            .is_none_or(|t| now.saturating_duration_since(t) >= self.config.timing.interval)
        {
            self.send_info(now, out);
        }
        if self.quorate && self.leader == Some(self.config.id) && listened {
            self.lead(now, rng, out);
        }
    }

    fn lead<R: Rng>(&mut self, now: Instant, rng: &mut R, out: &mut Vec<Output>) {
        let me = self.my_info();
        let mut hosts: Vec<&HostInfo> = self.hosts.values().map(|h| &h.info).collect();
        hosts.push(&me);
        let expiry = self.config.timing.orphan_expiry;
        let addresses: BTreeSet<IpAddr> = self
            .address_seen
            .iter()
            .filter(|(_, seen)| expiry.is_none_or(|e| now.saturating_duration_since(**seen) <= e))
            .map(|(a, _)| *a)
            .collect();
        // Commands that were acted on (the host reports the outcome) or timed out are
        // no longer in flight: the next step of a handover follows at once.
        let command_timeout = self.config.timing.command_timeout;
        let serving_of = |host: IpAddr, addr: &IpAddr| -> Option<AddrState> {
            if host == self.config.id {
                self.serving.get(addr).copied()
            } else {
                self.hosts
                    .get(&host)
                    .and_then(|h| h.info.serving.get(addr).copied())
            }
        };
        let done: Vec<IpAddr> = self
            .in_flight
            .iter()
            .filter(|(addr, (to, sent, what))| {
                now.saturating_duration_since(*sent) >= command_timeout
                    || match what {
                        Command::Acquire => serving_of(*to, addr) == Some(AddrState::Online),
                        Command::Release => serving_of(*to, addr).is_none(),
                        Command::None => false,
                    }
            })
            .map(|(a, _)| *a)
            .collect();
        for a in done {
            self.in_flight.remove(&a);
        }
        let in_flight: BTreeSet<IpAddr> = self.in_flight.keys().copied().collect();
        let (_, decision) = decide(&hosts, &addresses, &in_flight, rng);
        drop(hosts);
        for (to, address) in decision.release {
            self.in_flight.insert(address, (to, now, Command::Release));
            if to == self.config.id {
                self.release(address, out);
            } else {
                let seq = self.next_seq();
                out.push(Output::Send(Message::Release {
                    seq,
                    from: self.config.id,
                    to,
                    address,
                }));
            }
        }
        for (to, address) in decision.acquire {
            self.in_flight.insert(address, (to, now, Command::Acquire));
            if to == self.config.id {
                self.acquire(address, out);
            } else {
                let seq = self.next_seq();
                out.push(Output::Send(Message::Acquire {
                    seq,
                    from: self.config.id,
                    to,
                    address,
                }));
            }
        }
        for address in decision.cannot_assign {
            // Once per command timeout, not every tick.
            self.in_flight
                .insert(address, (self.config.id, now, Command::None));
            out.push(Output::Event(Event::CannotAssign { address }));
        }
    }
}
