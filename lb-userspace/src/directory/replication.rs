//! Replication of the directory: one master orders every change (a version each),
//! a backup stores each change before the master commits it, and agents on every LB
//! node keep replicas. Agents forward local changes to the master and resend them
//! until acknowledged; they apply pushed changes in version order, and ask for what
//! they missed (log entries, or a whole snapshot) when they see a gap.
//!
//! Guarantee: a change is acknowledged to its submitter only after the backup holds
//! it, so when the master is lost and the backup takes over, no acknowledged change
//! is lost. Pure state machines: messages in, messages out; the caller moves them
//! (over UDP/TCP in lbd, through a lossy simulated network in the tests).

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

/// The master (or the backup, which is a master in waiting).
#[derive(Clone, Debug)]
pub struct Master {
    pub id: NodeId,
    pub backup: Option<NodeId>,
    tables: Tables,
    /// Committed changes, by version (kept from `log_start`).
    log: BTreeMap<Version, Change>,
    log_start: Version,
    committed: Version,
    /// Assigned but waiting for the backup: version → (change, origin).
    waiting: BTreeMap<Version, (Change, (NodeId, u64))>,
    next: Version,
    /// What each origin's request became, so a resent Submit is acked, not re-applied.
    done: BTreeMap<(NodeId, u64), Version>,
    log_limit: usize,
    /// Agents found at this master's version with other content (sent a snapshot).
    diverged: Vec<NodeId>,
}

impl Master {
    pub fn new(id: NodeId, backup: Option<NodeId>) -> Self {
        Self {
            id,
            backup,
            tables: Tables::default(),
            log: BTreeMap::new(),
            log_start: 1,
            committed: 0,
            waiting: BTreeMap::new(),
            next: 1,
            done: BTreeMap::new(),
            log_limit: 10_000,
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

    /// Whether a submitter's request is committed here.
    pub fn has_committed(&self, origin: (NodeId, u64)) -> bool {
        self.done.contains_key(&origin)
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
        self.tables.apply(&change);
        self.committed = version;
        self.log.insert(version, change.clone());
        while self.log.len() > self.log_limit {
            let (v, _) = self.log.pop_first().expect("non-empty");
            self.log_start = v + 1;
        }
        self.done.insert(origin, version);
        out.push(Out::All(Msg::Push { version, change }));
        // The master's own node's agent is acked too, or it would resend forever.
        out.push(Out::To(
            origin.0,
            Msg::Ack {
                req: origin.1,
                version,
            },
        ));
    }

    /// A change made on the master's own node.
    pub fn submit_local(&mut self, req: u64, change: Change) -> Vec<Out> {
        self.handle(Msg::Submit {
            from: self.id,
            req,
            change,
        })
    }

    pub fn handle(&mut self, msg: Msg) -> Vec<Out> {
        let mut out = Vec::new();
        match msg {
            Msg::Submit { from, req, change } => {
                if let Some(version) = self.done.get(&(from, req)) {
                    out.push(Out::To(
                        from,
                        Msg::Ack {
                            req,
                            version: *version,
                        },
                    ));
                    return out;
                }
                if self.waiting.values().any(|(_, o)| *o == (from, req)) {
                    return out; // Already with the backup; the ack follows.
                }
                let version = self.next;
                self.next += 1;
                match self.backup {
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
                    None => self.commit(version, change, (from, req), &mut out),
                }
            }
            Msg::Stored { version } => {
                // A backup behind what is committed (it joined after changes were
                // committed without it) stores in order, so it would wait forever
                // for those: send them from the log, whether or not changes wait.
                if version < self.committed {
                    if let Some(b) = self.backup {
                        if version + 1 < self.log_start {
                            // The log does not reach back that far: seed it whole.
                            out.push(Out::To(
                                b,
                                Msg::Seed {
                                    version: self.committed,
                                    rows: self.tables.snapshot(),
                                    done: self.done.iter().map(|(o, v)| (*o, *v)).collect(),
                                },
                            ));
                            out.extend(self.tick());
                            return out;
                        }
                        let from = version + 1;
                        for (v, c) in self.log.range(from..) {
                            out.push(Out::To(
                                b,
                                Msg::Replicate {
                                    version: *v,
                                    origin: (self.id, 0),
                                    change: c.clone(),
                                },
                            ));
                        }
                    }
                }
                // The backup stores in order: everything up to `version` is safe.
                while let Some((&v, _)) = self.waiting.first_key_value() {
                    if v > version {
                        break;
                    }
                    let (change, origin) = self.waiting.remove(&v).expect("present");
                    self.commit(v, change, origin, &mut out);
                }
            }
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

    /// Resends what the backup has not confirmed (the caller calls this on a timer).
    pub fn tick(&mut self) -> Vec<Out> {
        let Some(b) = self.backup else {
            return Vec::new();
        };
        self.waiting
            .iter()
            .map(|(v, (c, o))| {
                Out::To(
                    b,
                    Msg::Replicate {
                        version: *v,
                        origin: *o,
                        change: c.clone(),
                    },
                )
            })
            .collect()
    }

    /// The backup is gone: commit what waited for it, and go on alone (or with a new one).
    pub fn backup_lost(&mut self, new_backup: Option<NodeId>) -> Vec<Out> {
        self.backup = new_backup;
        let mut out = Vec::new();
        match new_backup {
            None => {
                let waiting = std::mem::take(&mut self.waiting);
                for (v, (c, o)) in waiting {
                    self.commit(v, c, o, &mut out);
                }
            }
            Some(_) => out.extend(self.tick()),
        }
        out
    }
}

/// The backup: stores the master's changes in version order.
#[derive(Clone, Debug)]
pub struct Backup {
    pub id: NodeId,
    tables: Tables,
    log: BTreeMap<Version, Change>,
    pending: BTreeMap<Version, (Change, (NodeId, u64))>,
    stored: Version,
    done: BTreeMap<(NodeId, u64), Version>,
}

impl Backup {
    pub fn new(id: NodeId) -> Self {
        Self {
            id,
            tables: Tables::default(),
            log: BTreeMap::new(),
            pending: BTreeMap::new(),
            stored: 0,
            done: BTreeMap::new(),
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

    pub fn handle(&mut self, master: NodeId, msg: Msg) -> Vec<Out> {
        if let Msg::Seed {
            version,
            rows,
            done,
        } = msg
        {
            if version > self.stored {
                let mut fresh = Tables::default();
                for r in &rows {
                    fresh.apply(r);
                }
                self.tables = fresh;
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

    /// Stores the pending changes that follow what is stored, in version order, and
    /// tells the master how far it got.
    fn store_in_order(&mut self, master: NodeId) -> Vec<Out> {
        while let Some((change, origin)) = self.pending.remove(&(self.stored + 1)) {
            self.stored += 1;
            self.tables.apply(&change);
            self.log.insert(self.stored, change);
            self.done.insert(origin, self.stored);
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
    pub fn new(id: NodeId, master: NodeId) -> Self {
        Self {
            id,
            master,
            tables: Tables::default(),
            applied: 0,
            ahead: BTreeMap::new(),
            unacked: BTreeMap::new(),
            next_req: 1,
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
                let mut fresh = Tables::default();
                for r in &rows {
                    fresh.apply(r);
                }
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
