//! One LB node's part in the directory, as a state machine: always an agent (whose
//! replica feeds the data plane and answers queries), the master or the backup when
//! the cluster says so, and the countdowns of the leases it has seen. Fed with the
//! time, local submissions, messages from other nodes and the roles the cluster
//! decided; returns the changes its replica applied and the messages to send. No
//! sockets, no clocks: `shell::dird` does the I/O.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    time::{Duration, Instant},
};

use super::{
    replication::{Agent, Backup, Master, Msg, NodeId, Out},
    tables::{names, Change, Heartbeats, Op, Tables},
};

/// Leases are rows of the `leases` table keyed `<table>|<key>`, valued
/// `<ttl_ms>;<renewal id>`.
pub const LEASE_SEP: char = '|';

pub fn lease_key(table: &str, key: &str) -> String {
    format!("{table}{LEASE_SEP}{key}")
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Input {
    /// Changes made on this node (API, registrations, verdicts, managers).
    Submit(Vec<Change>),
    /// A message from another node.
    Receive { from: NodeId, msg: Msg },
    /// The roles the cluster decided, and the other nodes (by id). No backup while
    /// there are other nodes: a master holds its changes until one is named.
    Roles {
        master: NodeId,
        backup: Option<NodeId>,
        peers: BTreeSet<NodeId>,
    },
    /// The cluster has no quorum here (a minority side, or alone): give up the
    /// master's and the backup's roles, and refuse local changes until roles come
    /// again (the directory is read-only on a minority; see [`Outputs::refused`]).
    NoQuorum,
    /// Resend what is unacknowledged, ask for missed changes.
    Tick,
    /// Run the lease countdowns.
    Expire,
}

/// What a step produced.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Outputs {
    /// Changes this node's replica applied, in order.
    pub applied: Vec<Change>,
    /// Messages for other nodes.
    pub send: Vec<(NodeId, Msg)>,
    /// This node became the master (its version), for the log.
    pub became_master: Option<u64>,
    /// Leases that ran out here (as master): the entries now invalid.
    pub expired: Vec<Change>,
    /// The requests a `Submit` became, in order ...
    pub submitted: Vec<u64>,
    /// ... and those the master acknowledged in this step (committed: stored by the
    /// backup, or by the master alone when it has none), with their versions.
    pub acked: Vec<(u64, u64)>,
    /// The `Submit` was refused: this node is on a minority side (read-only).
    pub refused: bool,
    /// This replica was found to differ from the master's at the same version and
    /// was replaced by a snapshot.
    pub resynced: bool,
    /// As master: agents whose replicas differed (each was sent a snapshot).
    pub diverged: Vec<NodeId>,
}

pub struct DirNode {
    me: NodeId,
    agent: Agent,
    master: Option<Master>,
    backup: Option<Backup>,
    heartbeats: Heartbeats,
    peers: BTreeSet<NodeId>,
    /// Renewals sent by this node: makes every lease renewal a new value.
    renewals: u64,
    /// No quorum: no role, no local change.
    read_only: bool,
    /// This replica has been brought up to a master's state since the node started
    /// (a snapshot from the master, or this node is the master): until then it may
    /// lack what the cluster decided while it was away.
    synced: bool,
}

impl DirNode {
    /// A node whose master is `master` (itself when standalone: then it is the
    /// master from the start, with no backup). `first_req`: its first request's
    /// number, in a run none of its earlier runs used (`Agent::new`).
    pub fn new(me: NodeId, standalone: bool, first_req: u64) -> DirNode {
        DirNode {
            me,
            agent: Agent::new(me, me, first_req),
            master: standalone.then(|| Master::new(me, None)),
            backup: None,
            heartbeats: Heartbeats::default(),
            peers: BTreeSet::new(),
            renewals: 0,
            read_only: false,
            synced: standalone,
        }
    }

    /// See [`DirNode::synced`]'s field: sticky once true.
    pub fn synced(&self) -> bool {
        self.synced
    }

    /// A row this replica gets without any master's say (tests of divergence).
    #[cfg(test)]
    pub fn corrupt_for_test(&mut self, table: &str, key: &str) {
        self.agent
            .tables_mut()
            .add(table, key, "198.18.9.9:80", true);
    }

    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Whether local request `req` still waits for the master's acknowledgement.
    pub fn is_pending(&self, req: u64) -> bool {
        self.agent.is_pending(req)
    }

    /// The version of this node's own replica (what it serves and feeds).
    pub fn replica_version(&self) -> u64 {
        self.agent.version()
    }

    /// The content digest of what [`DirNode::version`] counts.
    pub fn digest(&self) -> u64 {
        match &self.master {
            Some(m) => m.tables().digest(),
            None => self.agent.tables().digest(),
        }
    }

    pub fn tables(&self) -> &Tables {
        self.agent.tables()
    }

    /// The version of this node's replica (or the master's, when it is the master;
    /// what the backup stored, when that is ahead: the directory's next master is
    /// chosen by this number, and the backup holds every acknowledged change).
    pub fn version(&self) -> u64 {
        match (&self.master, &self.backup) {
            (Some(m), _) => m.version(),
            (None, Some(b)) => b.stored().max(self.agent.version()),
            (None, None) => self.agent.version(),
        }
    }

    pub fn is_master(&self) -> bool {
        self.master.is_some()
    }

    /// The master this node is the backup of.
    pub fn backing(&self) -> Option<NodeId> {
        self.backup.as_ref().map(|_| self.agent.master)
    }

    pub fn role(&self) -> &'static str {
        if self.master.is_some() {
            "master"
        } else if self.backup.is_some() {
            "backup"
        } else {
            "agent"
        }
    }

    /// This node is the master, its own replica has every change the master
    /// committed, and none of its own submissions is still waiting (for the backup to
    /// store it): what the managers read is what they wrote. Deciding before that
    /// would write the same record again and again.
    pub fn master_in_sync(&self) -> bool {
        self.master
            .as_ref()
            .is_some_and(|m| self.agent.version() >= m.version() && self.agent.unacked() == 0)
    }

    /// The value of a lease row for a renewal by this node: every renewal a new value,
    /// so the master sees it and restarts the countdown.
    pub fn renewal(&mut self, ttl: Duration) -> String {
        self.renewals += 1;
        format!("{};{}:{}", ttl.as_millis(), self.me, self.renewals)
    }

    /// Forgets the countdown of an entry (deleted here).
    pub fn forget_lease(&mut self, table: &str, key: &str) {
        self.heartbeats.forget(table, key);
    }

    pub fn handle(&mut self, now: Instant, input: Input) -> Outputs {
        let mut out = Outputs::default();
        let mut queue = Vec::new();
        match input {
            Input::Submit(changes) => {
                if self.read_only {
                    out.refused = true;
                    return out;
                }
                for c in changes {
                    let (req, outs) = self.agent.submit(c);
                    out.submitted.push(req);
                    queue.extend(self.local(outs));
                }
            }
            Input::NoQuorum => {
                self.read_only = true;
                self.master = None;
                self.backup = None;
            }
            Input::Receive { from, msg } => queue.push((self.me, from, msg)),
            Input::Roles {
                master,
                backup,
                peers,
            } => {
                self.peers = peers;
                self.read_only = false;
                let me = self.me;
                let alone = self.peers.is_empty();
                if master == me && self.master.is_none() {
                    let mut m = match self.backup.take() {
                        Some(b) => Master::promote(b, backup),
                        None => Master::seeded(
                            me,
                            backup,
                            self.agent.tables().clone(),
                            self.agent.version(),
                        ),
                    };
                    let outs = m.set_backup(backup, alone);
                    queue.extend(self.local(outs));
                    out.became_master = Some(m.version());
                    self.master = Some(m);
                    self.synced = true;
                } else if master != me && self.master.is_some() {
                    self.master = None;
                }
                if let Some(m) = self.master.as_mut() {
                    if m.backup != backup {
                        let outs = m.set_backup(backup, alone);
                        queue.extend(self.local(outs));
                    }
                }
                if backup == Some(me) && self.backup.is_none() && master != me {
                    let b = Backup::seeded(me, self.agent.tables().clone(), self.agent.version());
                    // Tells the master at once how far it is, rather than at the
                    // master's next resend: until then, what the master acknowledged
                    // is on the master alone.
                    let hello = Out::To(
                        master,
                        Msg::Stored {
                            version: b.stored(),
                        },
                    );
                    queue.extend(self.local(vec![hello]));
                    self.backup = Some(b);
                } else if backup != Some(me) {
                    self.backup = None;
                }
                if self.agent.master != master {
                    let outs = self.agent.master_changed(master);
                    queue.extend(self.local(outs));
                }
            }
            Input::Tick => {
                let outs = self.agent.tick();
                queue.extend(self.local(outs));
                if let Some(m) = self.master.as_mut() {
                    let outs = m.tick();
                    queue.extend(self.local(outs));
                }
            }
            Input::Expire => {
                let late = self.heartbeats.expire(self.agent.tables(), now);
                // The countdown runs on every node (so a new master has it), but only
                // the master acts: invalidate, and drop the lease row.
                if self.master.is_some() && !late.is_empty() {
                    out.expired = late.clone();
                    for c in late {
                        let lease = Change {
                            table: names::LEASES.into(),
                            key: lease_key(&c.table, &c.key),
                            op: Op::Delete,
                        };
                        for change in [c, lease] {
                            let (_, outs) = self.agent.submit(change);
                            queue.extend(self.local(outs));
                        }
                    }
                }
            }
        }
        self.dispatch(now, queue, &mut out);
        out
    }

    /// Delivers messages among this node's roles until none is left for it.
    fn dispatch(&mut self, now: Instant, mut queue: Vec<(NodeId, NodeId, Msg)>, out: &mut Outputs) {
        while let Some((to, from, msg)) = queue.pop() {
            if to != self.me {
                out.send.push((to, msg));
                continue;
            }
            let outs = match &msg {
                Msg::Submit { .. }
                | Msg::Stored { .. }
                | Msg::Sync { .. }
                | Msg::Recovered { .. } => {
                    match self.master.as_mut() {
                        Some(m) => m.handle(from, msg),
                        None => Vec::new(), // Not the master (any more): the sender resends.
                    }
                }
                Msg::Replicate { .. } | Msg::Seed { .. } | Msg::Recover { .. } => {
                    match self.backup.as_mut() {
                        Some(b) => b.handle(from, msg),
                        None => Vec::new(),
                    }
                }
                Msg::Push { .. } | Msg::Ack { .. } | Msg::Log { .. } | Msg::Snapshot { .. } => {
                    if let Msg::Ack { req, version } = &msg {
                        if self.agent.is_pending(*req) {
                            out.acked.push((*req, *version));
                        }
                    }
                    let from_master = from == self.agent.master;
                    // The master answers a sync with a snapshot, or with the log
                    // after what the agent applied: either way it is in sync then (an
                    // agent that applied the first pushes before its sync was answered
                    // only ever gets logs).
                    let answer = matches!(msg, Msg::Snapshot { .. } | Msg::Log { .. });
                    let diverged = self.agent.diverged;
                    let (changes, outs) = self.agent.handle(msg);
                    if answer && from_master {
                        self.synced = true;
                    }
                    if self.agent.diverged > diverged {
                        out.resynced = true;
                    }
                    for c in &changes {
                        self.count_down(now, c);
                    }
                    out.applied.extend(changes);
                    outs
                }
            };
            queue.extend(self.local(outs));
        }
        if let Some(m) = self.master.as_mut() {
            out.diverged.extend(m.take_diverged());
        }
    }

    /// A lease row applied here restarts (or stops) its entry's countdown.
    fn count_down(&mut self, now: Instant, c: &Change) {
        if c.table != names::LEASES {
            return;
        }
        let Some((table, key)) = c.key.split_once(LEASE_SEP) else {
            return;
        };
        match &c.op {
            Op::Put { value, .. } => {
                let ttl = value
                    .split(';')
                    .next()
                    .and_then(|t| t.parse().ok())
                    .unwrap_or(0);
                self.heartbeats
                    .expect(table, key, now + Duration::from_millis(ttl));
            }
            Op::Delete => self.heartbeats.forget(table, key),
            Op::Valid { .. } => {}
        }
    }

    fn local(&self, outs: Vec<Out>) -> Vec<(NodeId, NodeId, Msg)> {
        outs.into_iter()
            .flat_map(|o| match o {
                Out::To(t, m) => vec![(t, self.me, m)],
                Out::All(m) => std::iter::once(self.me)
                    .chain(self.peers.iter().copied())
                    .map(|p| (p, self.me, m.clone()))
                    .collect(),
            })
            .collect()
    }
}

/// What the cluster view says of one host, for the directory's roles: the role it
/// claims in its heartbeats (master, or backup of which master) and the version of
/// its replica (as of its last heartbeat: stale by up to a round, so versions alone
/// cannot tell which replica is newest while changes flow).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Candidate {
    pub id: IpAddr,
    pub master: bool,
    pub backup_of: Option<IpAddr>,
    pub version: u64,
}

/// Who is the directory's master and backup, from the cluster's hosts. Both roles
/// stick while their holder is alive: a claimed master stays (two claims after a
/// partition: the lower id), and so does a host that an alive host claims to back
/// up (it was named master; its own claim is on its way). Without either, a claimed
/// backup takes over, because it stored every change its master acknowledged (the
/// heartbeats' versions lag the stream of changes, and an agent whose heartbeat left
/// after the backup's can show a higher one). Only without any claim does the host
/// with the most recent replica take the role, ties to the lower id, so a node that
/// restarts with an empty replica never becomes master over nodes that have the
/// directory. The master's backup sticks the same way.
pub fn directory_roles(hosts: &[Candidate]) -> Option<(IpAddr, Option<IpAddr>)> {
    let best = |candidates: &mut dyn Iterator<Item = &Candidate>| {
        candidates
            .max_by(|a, b| a.version.cmp(&b.version).then(b.id.cmp(&a.id)))
            .map(|h| h.id)
    };
    let alive = |id: IpAddr| hosts.iter().any(|h| h.id == id);
    let master = hosts
        .iter()
        .filter(|h| h.master)
        .map(|h| h.id)
        .min()
        .or_else(|| {
            hosts
                .iter()
                .filter_map(|h| h.backup_of)
                .filter(|m| alive(*m))
                .min()
        })
        .or_else(|| best(&mut hosts.iter().filter(|h| h.backup_of.is_some())))
        .or_else(|| best(&mut hosts.iter()))?;
    let backup = best(&mut hosts.iter().filter(|h| h.backup_of == Some(master)))
        .or_else(|| best(&mut hosts.iter().filter(|h| h.id != master)));
    Some((master, backup))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(table: &str, key: &str, value: &str) -> Change {
        Change {
            table: table.into(),
            key: key.into(),
            op: Op::Put {
                value: value.into(),
                valid: true,
            },
        }
    }

    #[test]
    fn directory_mastership_sticks_and_passes_to_the_backup_else_the_most_recent_replica() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let (a, b, c) = (ip("198.18.0.2"), ip("198.18.0.3"), ip("198.18.0.4"));
        let host = |id, master, backup_of, version| Candidate {
            id,
            master,
            backup_of,
            version,
        };
        // Nobody claims, all empty: the lowest id.
        assert_eq!(
            directory_roles(&[
                host(a, false, None, 0),
                host(b, false, None, 0),
                host(c, false, None, 0)
            ]),
            Some((a, Some(b)))
        );
        // b is master; a comes back empty: b stays.
        assert_eq!(
            directory_roles(&[
                host(a, false, None, 0),
                host(b, true, None, 40),
                host(c, false, None, 40)
            ]),
            Some((b, Some(c)))
        );
        // The backup's claim sticks, even when an agent's heartbeat shows more.
        assert_eq!(
            directory_roles(&[
                host(a, true, None, 50),
                host(b, false, None, 50),
                host(c, false, Some(a), 48)
            ]),
            Some((a, Some(c)))
        );
        // The master died: its backup takes over, whatever the (stale) versions say.
        assert_eq!(
            directory_roles(&[host(b, false, None, 57), host(c, false, Some(a), 55)]),
            Some((c, Some(b)))
        );
        // The new master's backup claims before the new master does: the old
        // backup's claim (of the dead master) does not make the new one master.
        assert_eq!(
            directory_roles(&[host(b, false, Some(c), 58), host(c, false, Some(a), 55)]),
            Some((c, Some(b)))
        );
        // Without a backup's claim, the most recent replica.
        assert_eq!(
            directory_roles(&[host(a, false, None, 0), host(c, false, None, 41)]),
            Some((c, Some(a)))
        );
        // Two claims after a partition: the lower id.
        assert_eq!(
            directory_roles(&[host(b, true, None, 9), host(c, true, None, 12)]),
            Some((b, Some(c)))
        );
        assert_eq!(directory_roles(&[]), None);
    }

    #[test]
    fn a_standalone_node_applies_its_own_changes_at_once_and_expires_leases() {
        let t0 = Instant::now();
        let mut n = DirNode::new(0, true, 1);
        let out = n.handle(t0, Input::Submit(vec![put("svc.x", "a", "198.18.0.11:80")]));
        assert_eq!(out.applied.len(), 1);
        assert!(out.send.is_empty());
        assert!(n.master_in_sync());
        let renewal = n.renewal(Duration::from_millis(100));
        n.handle(
            t0,
            Input::Submit(vec![put(names::LEASES, &lease_key("svc.x", "a"), &renewal)]),
        );
        assert!(n
            .handle(t0 + Duration::from_millis(50), Input::Expire)
            .expired
            .is_empty());
        let late = n.handle(t0 + Duration::from_millis(150), Input::Expire);
        assert_eq!(late.expired.len(), 1, "{late:?}");
        assert!(!n.tables().get("svc.x", "a").unwrap().valid);
        assert!(n
            .tables()
            .get(names::LEASES, &lease_key("svc.x", "a"))
            .is_none());
    }

    /// Node 1 master, node 2 its backup (and an agent), as the cluster names them;
    /// what node 2 sends on it is lost; what node 1 sends (it asks its backup what
    /// it stored) is returned.
    fn master_and_backup(t0: Instant) -> (DirNode, DirNode, Vec<(NodeId, Msg)>) {
        let mut master = DirNode::new(1, false, 1);
        let mut agent = DirNode::new(2, false, 1);
        let roles = |peer: NodeId| Input::Roles {
            master: 1,
            backup: Some(2),
            peers: BTreeSet::from([peer]),
        };
        drop(agent.handle(t0, roles(1)));
        let asked = master.handle(t0, roles(2)).send;
        assert!(master.is_master() && !agent.is_master());
        (master, agent, asked)
    }

    #[test]
    fn an_agent_sends_its_changes_to_the_master_and_applies_them_when_pushed() {
        let t0 = Instant::now();
        let (mut master, mut agent, asked) = master_and_backup(t0);
        let submitted = agent
            .handle(t0, Input::Submit(vec![put("svc.x", "b", "198.18.0.12:80")]))
            .send;
        assert!(submitted.iter().all(|(to, _)| *to == 1));
        let mut wire: Vec<(NodeId, Msg)> = asked.into_iter().chain(submitted).collect();
        // Deliver until quiet.
        for _ in 0..10 {
            let mut next = Vec::new();
            for (to, msg) in wire.drain(..) {
                let node = if to == 1 { &mut master } else { &mut agent };
                let from = if to == 1 { 2 } else { 1 };
                next.extend(node.handle(t0, Input::Receive { from, msg }).send);
            }
            wire = next;
        }
        assert!(agent.tables().get("svc.x", "b").is_some());
        assert!(master.tables().get("svc.x", "b").is_some());
    }

    /// An agent that has applied the master's first pushes before any answer to its
    /// sync (its first one went to a node not yet master, and was dropped) is answered
    /// with a log, not a snapshot: it is in sync then too.
    #[test]
    fn an_agent_answered_with_a_log_is_synced() {
        let t0 = Instant::now();
        // The agent hears of the master first; its sync is lost.
        let (mut master, mut agent, asked) = master_and_backup(t0);
        // The master's first change reaches the agent as a push.
        let mut wire: Vec<(NodeId, NodeId, Msg)> = asked
            .into_iter()
            .chain(
                master
                    .handle(t0, Input::Submit(vec![put("svc.x", "b", "198.18.0.12:80")]))
                    .send,
            )
            .map(|(to, m)| (1, to, m))
            .collect();
        // Then the agent's timer: a sync after what it applied.
        for _ in 0..10 {
            let mut next = Vec::new();
            for (from, to, msg) in wire.drain(..) {
                let node = if to == 1 { &mut master } else { &mut agent };
                next.extend(
                    node.handle(t0, Input::Receive { from, msg })
                        .send
                        .into_iter()
                        .map(|(t, m)| (to, t, m)),
                );
            }
            if next.is_empty() && !agent.synced() {
                next.extend(
                    agent
                        .handle(t0, Input::Tick)
                        .send
                        .into_iter()
                        .map(|(t, m)| (2, t, m)),
                );
            }
            wire = next;
        }
        assert!(agent.tables().get("svc.x", "b").is_some());
        assert!(
            agent.synced(),
            "answered with a log, the agent never counted as synced"
        );
    }
}
