//! Replication of the directory: one master orders every change (a version each),
//! a backup stores each change before the master commits it, and agents on every LB
//! node keep replicas. Agents forward local changes to the master and resend them
//! until acknowledged; they apply pushed changes in version order, and ask for what
//! they missed (log entries, or a whole snapshot) when they see a gap.
//!
//! Guarantee: a change is acknowledged to its submitter only after the backup holds
//! it, so when the master is lost and the backup takes over, no acknowledged change
//! is lost. A master that gets a backup first asks it what it stored (`Recover`)
//! and takes what it lacks as committed before it numbers a change of its own: a
//! master that did not come from the backup (the roles were decided on stale
//! heartbeats, or both died) would otherwise take the backup's answers about
//! versions it stored for an earlier master as acknowledgements of its own.
//!
//! Pure state machines: messages in, messages out; the caller moves them (over
//! UDP/TCP in lbd, through a lossy simulated network in the tests).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::tables::{Change, Tables};

pub type NodeId = u32;
pub type Version = u64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Msg {
    /// Agent → master: please apply (resent until `Ack`).
    Submit {
        from: NodeId,
        req: u64,
        change: Change,
    },
    /// Master → backup: store this before I commit it.
    Replicate {
        version: Version,
        origin: (NodeId, u64),
        change: Change,
    },
    /// Backup → master: stored up to here.
    Stored { version: Version },
    /// A master that just got this backup → the backup: what did you store after
    /// `after` (the master's committed version)?
    Recover { after: Version },
    /// Backup → master: what it stored after the asked version, up to `version`:
    /// the log (`entries`), or when its log does not reach back that far, every row
    /// (`rows`); with what each request became.
    Recovered {
        version: Version,
        entries: Vec<(Version, Change)>,
        rows: Option<Vec<Change>>,
        done: Vec<((NodeId, u64), Version)>,
    },
    /// Master → agents: committed change.
    Push { version: Version, change: Change },
    /// Master → submitter: your change is committed (and held by the backup).
    Ack { req: u64, version: Version },
    /// Agent → master: send me what follows `after` (everything, as a snapshot, for
    /// 0). `digest` is the agent's content digest at `after`: a master at the same
    /// version with another digest answers with a snapshot (the replicas diverged).
    Sync {
        from: NodeId,
        after: Version,
        #[serde(default)]
        digest: Option<u64>,
    },
    /// Master → agent: the committed changes after the asked version...
    Log { entries: Vec<(Version, Change)> },
    /// ...or, if the master's log does not reach back that far, everything.
    Snapshot { version: Version, rows: Vec<Change> },
    /// Master → a backup too far behind for the log: store this state as of `version`
    /// (with what each request became, so that a resent request is not applied twice).
    Seed {
        version: Version,
        rows: Vec<Change>,
        done: Vec<((NodeId, u64), Version)>,
    },
}

/// A message and where it goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Out {
    To(NodeId, Msg),
    /// To every agent (the master's pushes).
    All(Msg),
}

/// The `Ack` of request `origin` (its node, its number), committed at `version`.
fn ack(origin: (NodeId, u64), version: Version) -> Out {
    Out::To(
        origin.0,
        Msg::Ack {
            req: origin.1,
            version,
        },
    )
}

/// Committed changes a master (and its backup) keep for agents and backups that
/// fall behind; further back, they are sent every row.
pub const LOG_LIMIT: usize = 10_000;

/// A request's run: the high 32 bits of its number. A node starts each run at a
/// random one (`DirNode::new`'s `first_req`), so no run's numbers are another's.
fn run_of(req: u64) -> u64 {
    req >> 32
}

/// What each submitter's request became, so that a resent request is acknowledged,
/// not applied twice; kept for the versions of the last `limit` changes (as the
/// log), and beyond that summed up per run of a node as the highest request
/// forgotten (`forgotten`). A node numbers its requests upward within a run and
/// resends an unacknowledged one every 200 ms, so a request at or below that mark
/// is an old one, committed long ago; a new one is always above it.
#[derive(Clone, Debug, Default)]
pub struct Done {
    by_origin: BTreeMap<(NodeId, u64), Version>,
    forgotten: BTreeMap<(NodeId, u64), u64>,
}

impl Done {
    /// The version request `origin` became, if it is committed; a forgotten one
    /// answers `committed` (it is at or below it).
    fn get(&self, origin: (NodeId, u64), committed: Version) -> Option<Version> {
        if let Some(v) = self.by_origin.get(&origin) {
            return Some(*v);
        }
        let (node, req) = origin;
        self.forgotten
            .get(&(node, run_of(req)))
            .is_some_and(|top| req <= *top)
            .then_some(committed)
    }

    fn insert(&mut self, origin: (NodeId, u64), version: Version) {
        self.by_origin.insert(origin, version);
    }

    /// Takes what another holder sent (`after`): requests, and marks as version 0.
    fn extend(&mut self, entries: impl IntoIterator<Item = ((NodeId, u64), Version)>) {
        for ((node, req), v) in entries {
            if v == 0 {
                let top = self.forgotten.entry((node, run_of(req))).or_insert(0);
                *top = (*top).max(req);
            } else {
                self.by_origin.insert((node, req), v);
            }
        }
    }

    /// Forgets the requests that became versions `limit` or more behind `committed`,
    /// once there are twice as many as `limit` (one pass per `limit` changes).
    fn trim(&mut self, committed: Version, limit: usize) {
        if self.by_origin.len() <= 2 * limit {
            return;
        }
        let keep_from = committed.saturating_sub(limit as Version) + 1;
        let forgotten = &mut self.forgotten;
        self.by_origin.retain(|(node, req), v| {
            if *v >= keep_from {
                return true;
            }
            let top = forgotten.entry((*node, run_of(*req))).or_insert(0);
            *top = (*top).max(*req);
            false
        });
    }

    /// Requests remembered one by one (tests).
    pub fn len(&self) -> usize {
        self.by_origin.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_origin.is_empty()
    }

    /// What to send another holder (a seeded or recovering node): the requests
    /// committed after `after`, and every mark, as (node, highest request) at
    /// version 0 (no version is 0; an older node keeps a mark as a request of its
    /// own, acknowledged at once if resent).
    fn after(&self, after: Version) -> Vec<((NodeId, u64), Version)> {
        self.by_origin
            .iter()
            .filter(|(_, v)| **v > after)
            .map(|(o, v)| (*o, *v))
            .chain(
                self.forgotten
                    .iter()
                    .map(|((node, _), top)| ((*node, *top), 0)),
            )
            .collect()
    }
}

/// The master (or the backup, which is a master in waiting).
#[derive(Clone, Debug)]
pub struct Master {
    pub id: NodeId,
    pub backup: Option<NodeId>,
    /// No other node: without a backup, commit at once. With other nodes but no
    /// backup named yet (the roles settle a round after a failover), changes wait
    /// for one: committed alone, they would be lost with this master.
    alone: bool,
    /// Asked the backup what it stored (`Recover`) and not answered yet: changes
    /// wait, unnumbered for the backup, until this master has what it stored.
    recovering: bool,
    /// The most the backup said it stored ...
    backup_stored: Version,
    /// ... and how far the committed log was sent to bring it up since the last
    /// tick: each `Stored` behind would otherwise send the whole rest again, and
    /// each of those is answered with a `Stored`.
    replayed_to: Version,
    tables: Tables,
    /// Committed changes, by version (kept from `log_start`).
    log: BTreeMap<Version, Change>,
    log_start: Version,
    committed: Version,
    /// Assigned but waiting for the backup: version → (change, origin).
    waiting: BTreeMap<Version, (Change, (NodeId, u64))>,
    next: Version,
    /// What each origin's request became, so a resent Submit is acked, not re-applied.
    done: Done,
    log_limit: usize,
    /// Agents found at this master's version with other content (sent a snapshot).
    diverged: Vec<NodeId>,
}

impl Master {
    pub fn new(id: NodeId, backup: Option<NodeId>) -> Self {
        Self {
            id,
            backup,
            alone: backup.is_none(),
            recovering: false,
            backup_stored: 0,
            replayed_to: 0,
            tables: Tables::default(),
            log: BTreeMap::new(),
            log_start: 1,
            committed: 0,
            waiting: BTreeMap::new(),
            next: 1,
            done: Done::default(),
            log_limit: LOG_LIMIT,
            diverged: Vec::new(),
        }
    }

    /// A node taking over without the backup's log (the backup died too): its own
    /// replica, at its version, is the committed state; agents behind it resync from
    /// a snapshot.
    pub fn seeded(id: NodeId, backup: Option<NodeId>, tables: Tables, version: Version) -> Self {
        let mut m = Master::new(id, backup);
        m.tables = tables;
        m.committed = version;
        m.next = version + 1;
        m.log_start = version + 1;
        m
    }

    /// A backup taking over: its stored changes become the committed state.
    pub fn promote(backup: Backup, new_backup: Option<NodeId>) -> Self {
        let mut m = Master::new(backup.id, new_backup);
        m.tables = backup.tables;
        m.committed = backup.stored;
        m.next = backup.stored + 1;
        m.log = backup.log;
        m.log_start = m.log.keys().next().copied().unwrap_or(m.next);
        m.done = backup.done;
        m
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    pub fn version(&self) -> Version {
        self.committed
    }

    /// Requests remembered one by one (tests: bounded by twice the log's limit).
    pub fn requests_remembered(&self) -> usize {
        self.done.len()
    }

    /// Whether a submitter's request is committed here.
    pub fn has_committed(&self, origin: (NodeId, u64)) -> bool {
        self.done.get(origin, self.committed).is_some()
    }

    /// The agents whose replicas were found to differ at this master's version since
    /// the last call (each was sent a snapshot).
    pub fn take_diverged(&mut self) -> Vec<NodeId> {
        std::mem::take(&mut self.diverged)
    }

    /// Limits the log (a smaller one makes agents resync from snapshots sooner).
    pub fn set_log_limit(&mut self, limit: usize) {
        self.log_limit = limit.max(1);
    }

    fn commit(
        &mut self,
        version: Version,
        change: Change,
        origin: (NodeId, u64),
        out: &mut Vec<Out>,
    ) {
        self.apply_committed(version, change, out);
        self.committed = version;
        self.done.insert(origin, version);
        self.done.trim(version, self.log_limit);
        // The master's own node's agent is acked too, or it would resend forever.
        out.push(ack(origin, version));
    }

    /// `change`, committed at `version`: into the tables and the log (kept to
    /// `log_limit`), and pushed to every agent.
    fn apply_committed(&mut self, version: Version, change: Change, out: &mut Vec<Out>) {
        self.tables.apply(&change);
        self.log.insert(version, change.clone());
        while self.log.len() > self.log_limit {
            let (v, _) = self.log.pop_first().expect("non-empty");
            self.log_start = v + 1;
        }
        out.push(Out::All(Msg::Push { version, change }));
    }

    /// A change made on the master's own node.
    pub fn submit_local(&mut self, req: u64, change: Change) -> Vec<Out> {
        self.handle(
            self.id,
            Msg::Submit {
                from: self.id,
                req,
                change,
            },
        )
    }

    /// What the backup sent, or what agents sent; a backup's message from a node
    /// that is not this master's backup (the one before it, still answering) is
    /// ignored, and a `Stored` before the backup answered `Recover` asks again.
    pub fn handle(&mut self, from: NodeId, msg: Msg) -> Vec<Out> {
        let mut out = Vec::new();
        let from_backup = self.backup == Some(from);
        match msg {
            Msg::Stored { .. } | Msg::Recovered { .. } if !from_backup => {}
            // A backup that just took the role says how far it is: ask it what
            // it stored.
            Msg::Stored { .. } if self.recovering => out.extend(self.tick()),
            Msg::Recovered { .. } if !self.recovering => {}
            Msg::Recovered {
                version,
                entries,
                rows,
                done,
            } => {
                self.recovering = false;
                if version > self.committed {
                    self.adopt(version, entries, rows, done, &mut out);
                }
                // A backup behind is brought up from the log; then what waits goes
                // to it (numbered after what it stored).
                self.backup_stored = version;
                out.extend(self.tick());
            }
            Msg::Submit { from, req, change } => {
                if let Some(version) = self.done.get((from, req), self.committed) {
                    out.push(ack((from, req), version));
                    return out;
                }
                if self.waiting.values().any(|(_, o)| *o == (from, req)) {
                    return out; // Already with the backup; the ack follows.
                }
                let version = self.next;
                self.next += 1;
                match self.backup {
                    // Asked again with every change, as a backup is asked with every
                    // change to store: what this master acknowledged stays on it
                    // alone until the backup has answered.
                    Some(b) if self.recovering => {
                        self.waiting.insert(version, (change, (from, req)));
                        out.push(Out::To(
                            b,
                            Msg::Recover {
                                after: self.committed,
                            },
                        ));
                    }
                    Some(b) => {
                        self.waiting.insert(version, (change.clone(), (from, req)));
                        out.push(Out::To(
                            b,
                            Msg::Replicate {
                                version,
                                origin: (from, req),
                                change,
                            },
                        ));
                    }
                    // Alone, the master commits at once (and says so in its status).
                    None if self.alone => self.commit(version, change, (from, req), &mut out),
                    // The backup is yet to be named: sent to it then (`tick`).
                    None => {
                        self.waiting.insert(version, (change, (from, req)));
                    }
                }
            }
            Msg::Stored { version } => out.extend(self.stored(version)),
            Msg::Sync {
                from,
                after,
                digest,
            } => {
                let diverged =
                    after == self.committed && digest.is_some_and(|d| d != self.tables.digest());
                if diverged {
                    self.diverged.push(from);
                }
                if after == 0 || diverged || after + 1 < self.log_start {
                    out.push(Out::To(
                        from,
                        Msg::Snapshot {
                            version: self.committed,
                            rows: self.tables.snapshot(),
                        },
                    ));
                } else {
                    let entries = self
                        .log
                        .range(after + 1..)
                        .map(|(v, c)| (*v, c.clone()))
                        .collect();
                    out.push(Out::To(from, Msg::Log { entries }));
                }
            }
            _ => {}
        }
        out
    }

    /// The backup's changes after this master's committed version: they may have been
    /// acknowledged (by the master it stored them for), so they are committed here
    /// too, and what waits is numbered after them.
    fn adopt(
        &mut self,
        version: Version,
        entries: Vec<(Version, Change)>,
        rows: Option<Vec<Change>>,
        done: Vec<((NodeId, u64), Version)>,
        out: &mut Vec<Out>,
    ) {
        match rows {
            Some(rows) => {
                // Agents find the gap at their next sync and get a snapshot.
                self.tables = Tables::from_snapshot(&rows);
                self.log.clear();
                self.log_start = version + 1;
            }
            None => {
                let committed = self.committed;
                for (v, change) in entries.into_iter().filter(|(v, _)| *v > committed) {
                    self.apply_committed(v, change, out);
                }
            }
        }
        self.committed = version;
        self.done.extend(done);
        self.next = version + 1;
        for (_, (change, origin)) in std::mem::take(&mut self.waiting) {
            if let Some(v) = self.done.get(origin, self.committed) {
                // The backup had it already: it is committed.
                out.push(ack(origin, v));
                continue;
            }
            self.waiting.insert(self.next, (change, origin));
            self.next += 1;
        }
    }

    /// The backup stored up to `version`.
    fn stored(&mut self, version: Version) -> Vec<Out> {
        let mut out = Vec::new();
        self.backup_stored = self.backup_stored.max(version);
        // A backup behind what is committed (it joined after changes were committed
        // without it) stores in order, so it would wait forever for those: send them
        // from the log, whether or not changes wait.
        if version < self.committed && self.replayed_to < self.committed {
            out.extend(self.replay(version));
        } else if let (Some(b), Some(change)) = (self.backup, self.log.get(&(version + 1))) {
            // Sent, but the backup is still short of it: lost, or on its way. One
            // message for one answer, so that a lost one costs a round trip, not a
            // tick, and a burst of answers does not send the whole rest again.
            out.push(Out::To(
                b,
                Msg::Replicate {
                    version: version + 1,
                    origin: (self.id, 0),
                    change: change.clone(),
                },
            ));
        }
        // The backup stores in order: everything up to `version` is safe.
        while let Some((&v, _)) = self.waiting.first_key_value() {
            if v > version {
                break;
            }
            let (change, origin) = self.waiting.remove(&v).expect("present");
            self.commit(v, change, origin, &mut out);
        }
        out
    }

    /// The committed changes after `after` to the backup: from the log, or when it
    /// does not reach back that far, the whole state (`Seed`).
    fn replay(&mut self, after: Version) -> Vec<Out> {
        let Some(b) = self.backup else {
            return Vec::new();
        };
        self.replayed_to = self.committed;
        if after + 1 < self.log_start {
            return vec![Out::To(
                b,
                Msg::Seed {
                    version: self.committed,
                    rows: self.tables.snapshot(),
                    done: self.done.after(0),
                },
            )];
        }
        self.log
            .range(after + 1..)
            .map(|(v, c)| {
                Out::To(
                    b,
                    Msg::Replicate {
                        version: *v,
                        origin: (self.id, 0),
                        change: c.clone(),
                    },
                )
            })
            .collect()
    }

    /// Resends what the backup has not confirmed (the caller calls this on a timer).
    pub fn tick(&mut self) -> Vec<Out> {
        let Some(b) = self.backup else {
            return Vec::new();
        };
        if self.recovering {
            return vec![Out::To(
                b,
                Msg::Recover {
                    after: self.committed,
                },
            )];
        }
        // Once a tick, what was sent to bring the backup up is sent again (it may
        // have been lost).
        self.replayed_to = 0;
        let mut out = if self.backup_stored < self.committed {
            self.replay(self.backup_stored)
        } else {
            Vec::new()
        };
        out.extend(self.waiting.iter().map(|(v, (c, o))| {
            Out::To(
                b,
                Msg::Replicate {
                    version: *v,
                    origin: *o,
                    change: c.clone(),
                },
            )
        }));
        out
    }

    /// The backup changed (or is gone): what waited is sent to the new one; without
    /// one, it keeps waiting for one to be named, unless this master is `alone`
    /// (no other node), when it commits.
    pub fn set_backup(&mut self, new_backup: Option<NodeId>, alone: bool) -> Vec<Out> {
        self.backup = new_backup;
        self.alone = alone;
        self.backup_stored = 0;
        self.replayed_to = 0;
        let mut out = Vec::new();
        match new_backup {
            None if alone => {
                let waiting = std::mem::take(&mut self.waiting);
                for (v, (c, o)) in waiting {
                    self.commit(v, c, o, &mut out);
                }
            }
            None => {}
            // First what it stored (`Recover`), then what waits.
            Some(_) => {
                self.recovering = true;
                out.extend(self.tick());
            }
        }
        out
    }
}

/// The backup: stores the master's changes in version order.
#[derive(Clone, Debug)]
pub struct Backup {
    pub id: NodeId,
    /// The master this backup answered `Recover` for: from then on it stores only
    /// that master's changes (an earlier master's, still in flight, were never
    /// committed and would take versions the new master numbers otherwise).
    serves: Option<NodeId>,
    tables: Tables,
    /// The last changes stored, kept to `log_limit` (as the master's): a master
    /// recovering from further back gets every row instead.
    log: BTreeMap<Version, Change>,
    log_limit: usize,
    pending: BTreeMap<Version, (Change, (NodeId, u64))>,
    stored: Version,
    done: Done,
}

impl Backup {
    pub fn new(id: NodeId) -> Self {
        Self {
            id,
            serves: None,
            tables: Tables::default(),
            log: BTreeMap::new(),
            log_limit: LOG_LIMIT,
            pending: BTreeMap::new(),
            stored: 0,
            done: Done::default(),
        }
    }

    /// A backup that starts from a replica already at `version`.
    pub fn seeded(id: NodeId, tables: Tables, version: Version) -> Self {
        let mut b = Backup::new(id);
        b.tables = tables;
        b.stored = version;
        b
    }

    pub fn stored(&self) -> Version {
        self.stored
    }

    /// Changes held in the log (tests).
    pub fn log_len(&self) -> usize {
        self.log.len()
    }

    /// Requests remembered one by one (tests: bounded by twice the log's limit).
    pub fn requests_remembered(&self) -> usize {
        self.done.len()
    }

    /// Limits the log, as the master's (`Master::set_log_limit`).
    pub fn set_log_limit(&mut self, limit: usize) {
        self.log_limit = limit.max(1);
    }

    pub fn handle(&mut self, master: NodeId, msg: Msg) -> Vec<Out> {
        if let Msg::Recover { after } = msg {
            if self.serves != Some(master) {
                self.serves = Some(master);
                self.pending.clear();
            }
            return vec![Out::To(master, self.recovered(after))];
        }
        if self.serves.is_some_and(|m| m != master) {
            return Vec::new();
        }
        if let Msg::Seed {
            version,
            rows,
            done,
        } = msg
        {
            if version > self.stored {
                self.tables = Tables::from_snapshot(&rows);
                self.stored = version;
                self.log.clear();
                self.pending.retain(|v, _| *v > version);
                self.done.extend(done);
            }
            return self.store_in_order(master);
        }
        if let Msg::Replicate {
            version,
            origin,
            change,
        } = msg
        {
            if version > self.stored {
                self.pending.insert(version, (change, origin));
            }
            return self.store_in_order(master);
        }
        Vec::new()
    }

    /// What this backup stored after `after`: its log when that reaches back, else
    /// every row.
    fn recovered(&self, after: Version) -> Msg {
        let from_log =
            after >= self.stored || (after + 1..=self.stored).all(|v| self.log.contains_key(&v));
        let (entries, rows) = if from_log {
            let entries = self.log.range(after + 1..);
            (entries.map(|(v, c)| (*v, c.clone())).collect(), None)
        } else {
            (Vec::new(), Some(self.tables.snapshot()))
        };
        Msg::Recovered {
            version: self.stored,
            entries,
            rows,
            done: self.done.after(if from_log { after } else { 0 }),
        }
    }

    /// Stores the pending changes that follow what is stored, in version order, and
    /// tells the master how far it got.
    fn store_in_order(&mut self, master: NodeId) -> Vec<Out> {
        while let Some((change, origin)) = self.pending.remove(&(self.stored + 1)) {
            self.stored += 1;
            self.tables.apply(&change);
            self.log.insert(self.stored, change);
            self.done.insert(origin, self.stored);
        }
        self.done.trim(self.stored, self.log_limit);
        while self.log.len() > self.log_limit {
            self.log.pop_first();
        }
        vec![Out::To(
            master,
            Msg::Stored {
                version: self.stored,
            },
        )]
    }
}

/// An agent's replica.
#[derive(Clone, Debug)]
pub struct Agent {
    pub id: NodeId,
    pub master: NodeId,
    tables: Tables,
    applied: Version,
    /// Pushes that arrived ahead of a gap.
    ahead: BTreeMap<Version, Change>,
    /// Local changes not yet acknowledged: request → change.
    unacked: BTreeMap<u64, Change>,
    next_req: u64,
    /// Snapshots that found this replica at the master's version with other rows.
    pub diverged: u64,
    /// The version this replica had reached under the previous master: a new
    /// master's snapshot at or below it that still changes rows replaced changes
    /// this replica held and the new master lacks (the other side of a split).
    before_change: Option<Version>,
}

impl Agent {
    /// `first_req`: the number of this agent's first request. The master takes a
    /// request it has seen from `id` for a resend (acknowledged, not applied): each
    /// run of a node numbers its requests in a run of its own (the high 32 bits,
    /// random in the daemon; `Done`).
    pub fn new(id: NodeId, master: NodeId, first_req: u64) -> Self {
        Self {
            id,
            master,
            tables: Tables::default(),
            applied: 0,
            ahead: BTreeMap::new(),
            unacked: BTreeMap::new(),
            next_req: first_req.max(1),
            diverged: 0,
            before_change: None,
        }
    }

    pub fn tables(&self) -> &Tables {
        &self.tables
    }

    pub fn version(&self) -> Version {
        self.applied
    }

    pub fn unacked(&self) -> usize {
        self.unacked.len()
    }

    #[cfg(test)]
    pub fn tables_mut(&mut self) -> &mut Tables {
        &mut self.tables
    }

    /// Whether request `req` of this agent still waits for the master's ack.
    pub fn is_pending(&self, req: u64) -> bool {
        self.unacked.contains_key(&req)
    }

    /// A local change: forwarded to the master; it shows in the replica once committed.
    pub fn submit(&mut self, change: Change) -> (u64, Vec<Out>) {
        let req = self.next_req;
        self.next_req += 1;
        self.unacked.insert(req, change.clone());
        (
            req,
            vec![Out::To(
                self.master,
                Msg::Submit {
                    from: self.id,
                    req,
                    change,
                },
            )],
        )
    }

    /// Changes applied to the replica by this message, in order (for the data plane
    /// and subscriptions), and messages to send.
    pub fn handle(&mut self, msg: Msg) -> (Vec<Change>, Vec<Out>) {
        let mut applied = Vec::new();
        let mut out = Vec::new();
        match msg {
            Msg::Push { version, change } => {
                if version > self.applied {
                    self.ahead.insert(version, change);
                }
                self.drain_ahead(&mut applied);
                if !self.ahead.is_empty() {
                    out.push(Out::To(self.master, self.sync()));
                }
            }
            Msg::Log { entries } => {
                for (v, c) in entries {
                    if v > self.applied {
                        self.ahead.insert(v, c);
                    }
                }
                self.drain_ahead(&mut applied);
            }
            Msg::Snapshot { version, rows } if version >= self.applied => {
                let fresh = Tables::from_snapshot(&rows);
                // Report the difference as changes, so consumers stay incremental.
                let diff = diff_tables(&self.tables, &fresh);
                let not_behind =
                    version == self.applied || self.before_change.is_some_and(|b| version <= b);
                if not_behind && !diff.is_empty() {
                    self.diverged += 1;
                }
                self.before_change = None;
                applied.extend(diff);
                self.tables = fresh;
                self.applied = version;
                self.ahead.retain(|v, _| *v > version);
                self.drain_ahead(&mut applied);
            }
            Msg::Ack { req, .. } => {
                self.unacked.remove(&req);
            }
            _ => {}
        }
        (applied, out)
    }

    fn drain_ahead(&mut self, applied: &mut Vec<Change>) {
        while let Some(c) = self.ahead.remove(&(self.applied + 1)) {
            self.applied += 1;
            if let Some(c) = self.tables.apply(&c) {
                applied.push(c);
            }
        }
    }

    /// On a timer: resend unacknowledged changes, and ask for anything missed.
    pub fn tick(&mut self) -> Vec<Out> {
        let mut out: Vec<Out> = self
            .unacked
            .iter()
            .map(|(req, c)| {
                Out::To(
                    self.master,
                    Msg::Submit {
                        from: self.id,
                        req: *req,
                        change: c.clone(),
                    },
                )
            })
            .collect();
        out.push(Out::To(self.master, self.sync()));
        out
    }

    fn sync(&self) -> Msg {
        Msg::Sync {
            from: self.id,
            after: self.applied,
            digest: Some(self.tables.digest()),
        }
    }

    /// A new master (the promoted backup): resend what it has not acknowledged, and
    /// resync from it (its versions continue the old master's).
    pub fn master_changed(&mut self, master: NodeId) -> Vec<Out> {
        self.master = master;
        // The new master's versions need not match what this replica saw (it may
        // start from its own replica, or be the other side of a partition): ask for
        // a snapshot (after 0), which replaces the replica, so that no row the new
        // master lacks survives here.
        if self.applied > 0 {
            self.before_change = Some(self.applied);
        }
        self.applied = 0;
        self.ahead.clear();
        self.tick()
    }
}

/// The changes that turn `old` into `new`.
pub fn diff_tables(old: &Tables, new: &Tables) -> Vec<Change> {
    let mut out = Vec::new();
    let names: std::collections::BTreeSet<&str> =
        old.table_names().chain(new.table_names()).collect();
    for name in names {
        let before: BTreeMap<String, (String, bool)> = old
            .search(name, "")
            .into_iter()
            .map(|e| (e.key, (e.value, e.valid)))
            .collect();
        let after: BTreeMap<String, (String, bool)> = new
            .search(name, "")
            .into_iter()
            .map(|e| (e.key, (e.value, e.valid)))
            .collect();
        for key in before.keys() {
            if !after.contains_key(key) {
                out.push(Change {
                    table: name.to_string(),
                    key: key.clone(),
                    op: super::tables::Op::Delete,
                });
            }
        }
        for (key, (value, valid)) in &after {
            if before.get(key) != Some(&(value.clone(), *valid)) {
                out.push(Change {
                    table: name.to_string(),
                    key: key.clone(),
                    op: super::tables::Op::Put {
                        value: value.clone(),
                        valid: *valid,
                    },
                });
            }
        }
    }
    out
}
