//! Master, backup and agents over a simulated network that drops, delays and
//! reorders messages: agents converge to the master's tables, and a master failover
//! loses no acknowledged change.

use std::collections::BTreeMap;

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{
    replication::{Agent, Backup, Master, Msg, NodeId, Out},
    tables::{Change, Op},
};

const MASTER: NodeId = 0;
const BACKUP: NodeId = 1;

struct Net {
    rng: StdRng,
    now: u64,
    seq: u64,
    /// (deliver at ms, sequence) → (to, from, message)
    queue: BTreeMap<(u64, u64), (NodeId, NodeId, Msg)>,
    drop_rate: f64,
    dead: Vec<NodeId>,
}

impl Net {
    fn send(&mut self, from: NodeId, to: NodeId, msg: Msg) {
        if self.dead.contains(&from) || self.dead.contains(&to) || self.rng.gen_bool(self.drop_rate)
        {
            return;
        }
        let delay = self.rng.gen_range(0..40);
        self.seq += 1;
        self.queue
            .insert((self.now + delay, self.seq), (to, from, msg));
    }
}

struct World {
    net: Net,
    master: Master,
    backup: Option<Backup>,
    agents: Vec<Agent>,
    /// Acknowledged requests: (agent, req).
    acked: Vec<(NodeId, u64)>,
    requests: BTreeMap<(NodeId, u64), Change>,
}

impl World {
    fn new(seed: u64, agents: u32, drop_rate: f64) -> World {
        World {
            net: Net {
                rng: StdRng::seed_from_u64(seed),
                now: 0,
                seq: 0,
                queue: BTreeMap::new(),
                drop_rate,
                dead: vec![],
            },
            master: Master::new(MASTER, Some(BACKUP)),
            backup: Some(Backup::new(BACKUP)),
            agents: (0..agents).map(|i| Agent::new(10 + i, MASTER, 1)).collect(),
            acked: vec![],
            requests: BTreeMap::new(),
        }
    }

    fn route(&mut self, from: NodeId, outs: Vec<Out>) {
        for o in outs {
            match o {
                Out::To(to, m) => self.net.send(from, to, m),
                Out::All(m) => {
                    let ids: Vec<NodeId> = self.agents.iter().map(|a| a.id).collect();
                    for id in ids {
                        self.net.send(from, id, m.clone());
                    }
                }
            }
        }
    }

    fn submit_random(&mut self) {
        let i = self.net.rng.gen_range(0..self.agents.len());
        let key = format!("web.{}", self.net.rng.gen_range(0..20));
        let op = match self.net.rng.gen_range(0..4) {
            0 => Op::Delete,
            1 => Op::Valid {
                valid: self.net.rng.gen_bool(0.5),
            },
            _ => Op::Put {
                value: format!("host{}:80", self.net.rng.gen_range(0..5)),
                valid: true,
            },
        };
        let change = Change {
            table: "svc.web".into(),
            key,
            op,
        };
        let agent = &mut self.agents[i];
        let id = agent.id;
        let (req, outs) = agent.submit(change.clone());
        self.requests.insert((id, req), change);
        self.route(id, outs);
    }

    /// Delivers what is due in the next millisecond; ticks every 50 ms.
    fn step(&mut self) {
        self.net.now += 1;
        if self.net.now.is_multiple_of(50) {
            let outs = self.master.tick();
            let m = self.master.id;
            self.route(m, outs);
            for i in 0..self.agents.len() {
                let id = self.agents[i].id;
                let outs = self.agents[i].tick();
                self.route(id, outs);
            }
        }
        while let Some((&(at, s), _)) = self.net.queue.first_key_value() {
            if at > self.net.now {
                break;
            }
            let (to, from, msg) = self.net.queue.remove(&(at, s)).expect("present");
            if self.net.dead.contains(&to) {
                continue;
            }
            if to == self.master.id {
                let outs = self.master.handle(from, msg);
                self.route(to, outs);
            } else if self.backup.as_ref().is_some_and(|b| b.id == to) {
                let outs = self.backup.as_mut().unwrap().handle(from, msg);
                self.route(to, outs);
            } else if let Some(i) = self.agents.iter().position(|a| a.id == to) {
                if let Msg::Ack { req, .. } = &msg {
                    self.acked.push((to, *req));
                }
                let (_, outs) = self.agents[i].handle(msg);
                self.route(to, outs);
            }
        }
    }

    fn settled(&self) -> bool {
        self.agents
            .iter()
            .all(|a| a.unacked() == 0 && a.version() == self.master.version())
    }

    fn run_until_settled(&mut self, max_ms: u64) {
        for _ in 0..max_ms {
            self.step();
            if self.settled() && self.net.queue.is_empty() {
                return;
            }
        }
        panic!(
            "not settled after {max_ms} ms: master at {}, agents at {:?}, unacked {:?}",
            self.master.version(),
            self.agents.iter().map(|a| a.version()).collect::<Vec<_>>(),
            self.agents.iter().map(|a| a.unacked()).collect::<Vec<_>>()
        );
    }

    fn assert_converged(&self) {
        for a in &self.agents {
            assert_eq!(
                a.tables().search("svc.web", ""),
                self.master.tables().search("svc.web", ""),
                "agent {} differs from the master",
                a.id
            );
        }
    }
}

#[test]
fn agents_converge_to_the_master_through_a_lossy_reordering_network() {
    for seed in 0..20 {
        let mut w = World::new(seed, 3, 0.2);
        for _ in 0..100 {
            w.submit_random();
            for _ in 0..5 {
                w.step();
            }
        }
        w.run_until_settled(60_000);
        w.assert_converged();
        assert_eq!(
            w.acked
                .iter()
                .collect::<std::collections::BTreeSet<_>>()
                .len(),
            100,
            "seed {seed}"
        );
    }
}

#[test]
fn an_agent_too_far_behind_resyncs_from_a_snapshot() {
    let mut w = World::new(7, 3, 0.0);
    w.master.set_log_limit(10);
    // Agent 12 hears nothing for a while.
    w.net.dead.push(12);
    for _ in 0..60 {
        w.submit_random();
        for _ in 0..5 {
            w.step();
        }
    }
    w.net.dead.clear();
    w.run_until_settled(60_000);
    w.assert_converged();
}

#[test]
fn a_master_failover_loses_no_acknowledged_change() {
    for seed in 0..20 {
        let mut w = World::new(100 + seed, 3, 0.1);
        for _ in 0..60 {
            w.submit_random();
            for _ in 0..5 {
                w.step();
            }
        }
        // The master dies with changes in flight; the backup takes over.
        w.net.dead.push(MASTER);
        let acked_before: Vec<(NodeId, u64)> = w.acked.clone();
        let backup = w.backup.take().expect("backup");
        w.master = Master::promote(backup, None);
        for i in 0..w.agents.len() {
            let id = w.agents[i].id;
            let outs = w.agents[i].master_changed(BACKUP);
            w.route(id, outs);
        }
        for _ in 0..30 {
            w.submit_random();
            for _ in 0..5 {
                w.step();
            }
        }
        w.run_until_settled(60_000);
        for origin in &acked_before {
            assert!(
                w.master.has_committed(*origin),
                "seed {seed}: acknowledged {origin:?} lost in the failover"
            );
        }
        w.assert_converged();
    }
}

/// A change that sets key `k` of table "t".
fn put(k: &str) -> Change {
    Change {
        table: "t".into(),
        key: k.into(),
        op: Op::Put {
            value: "v".into(),
            valid: true,
        },
    }
}

/// Delivers `first` (the master's, id 1) to its backup (id 2) and every answer back
/// and forth, with a master tick a round, until quiet (ten rounds): the master's
/// answers to `Stored` go back to the backup.
fn deliver_between(m: &mut Master, b: &mut Backup, first: Vec<Out>) {
    let to_backup = |outs: Vec<Out>| -> Vec<Msg> {
        outs.into_iter()
            .filter_map(|o| match o {
                Out::To(2, msg) => Some(msg),
                _ => None,
            })
            .collect()
    };
    let mut pending = to_backup(first);
    for _ in 0..10 {
        let mut to_master = Vec::new();
        for msg in pending.drain(..) {
            to_master.extend(b.handle(1, msg));
        }
        for o in to_master {
            if let Out::To(1, msg) = o {
                pending.extend(to_backup(m.handle(2, msg)));
            }
        }
        pending.extend(to_backup(m.tick()));
    }
}

#[test]
fn a_backup_that_joins_behind_committed_changes_catches_up_and_new_changes_commit() {
    // Alone, the master commits v1..v3 at once.
    let mut m = Master::new(1, None);
    for (i, k) in ["a", "b", "c"].iter().enumerate() {
        m.submit_local(i as u64 + 1, put(k));
    }
    assert_eq!(m.version(), 3);
    // A backup arrives that has none of them, and a change waits for it.
    let mut b = Backup::new(2);
    let mut first = m.set_backup(Some(2), false);
    first.extend(m.submit_local(4, put("d")));
    deliver_between(&mut m, &mut b, first);
    assert_eq!(m.version(), 4, "the waiting change committed");
}

/// A long-running backup stores every change the master commits (lease renewals
/// included): its log is kept to the master's limit, and a master recovering from it
/// beyond the log gets every row instead.
#[test]
fn a_backup_keeps_its_log_to_the_limit_and_answers_from_rows_beyond_it() {
    let mut b = Backup::new(BACKUP);
    b.set_log_limit(10);
    for v in 1..=100u64 {
        b.handle(
            MASTER,
            Msg::Replicate {
                version: v,
                origin: (MASTER, v),
                change: put(&format!("k{v}")),
            },
        );
    }
    assert_eq!(b.stored(), 100);
    assert!(
        b.log_len() <= 10,
        "the backup's log holds {} changes",
        b.log_len()
    );
    let recovered = |b: &mut Backup, after| match b.handle(MASTER, Msg::Recover { after }).pop() {
        Some(Out::To(
            MASTER,
            Msg::Recovered {
                version,
                entries,
                rows,
                ..
            },
        )) => (version, entries.len(), rows.is_some()),
        other => panic!("no Recovered for the master: {other:?}"),
    };
    assert_eq!(
        recovered(&mut b, 95),
        (100, 5, false),
        "within the log: its entries"
    );
    assert_eq!(
        recovered(&mut b, 50),
        (100, 0, true),
        "beyond the log: the rows"
    );
    // Promoted, it is a master whose log starts where its own did.
    let m = Master::promote(b, None);
    assert_eq!(m.version(), 100);
}

#[test]
fn master_and_backup_forget_old_requests_yet_acknowledge_a_late_resend_without_applying_it() {
    // Every node renews its agent lease each second: remembered for ever, what each
    // request became grew without end on master and backup (and went whole into a
    // seed).
    let mut w = World::new(21, 2, 0.0);
    w.master.set_log_limit(10);
    w.backup.as_mut().unwrap().set_log_limit(10);
    for _ in 0..100 {
        w.submit_random();
        w.run_until_settled(10_000);
    }
    assert_eq!(w.master.version(), 100);
    let (master, backup) = (
        w.master.requests_remembered(),
        w.backup.as_ref().unwrap().requests_remembered(),
    );
    assert!(
        master <= 20 && backup <= 20,
        "100 requests remembered one by one: master {master}, backup {backup}"
    );

    // The first request, resent long after (its ack lost, say): acknowledged with
    // what is committed, and not applied again.
    let (&(from, req), change) = w.requests.first_key_value().expect("a request");
    let digest = w.master.tables().digest();
    let outs = w.master.handle(
        from,
        Msg::Submit {
            from,
            req,
            change: change.clone(),
        },
    );
    assert!(
        outs.iter()
            .any(|o| matches!(o, Out::To(to, Msg::Ack { req: r, .. }) if *to == from && *r == req)),
        "the late resend was not acknowledged: {outs:?}"
    );
    assert_eq!(w.master.version(), 100, "the late resend was applied again");
    assert_eq!(w.master.tables().digest(), digest);

    // A new request of the same run is applied.
    let i = w.agents.iter().position(|a| a.id == from).unwrap();
    let (new_req, outs) = w.agents[i].submit(put("fresh"));
    assert!(new_req > req);
    w.route(from, outs);
    w.run_until_settled(10_000);
    assert_eq!(w.master.version(), 101);
}

#[test]
fn a_backup_seeded_after_requests_were_forgotten_still_knows_them_once_promoted() {
    // Alone, the master commits 100 changes and forgets most of its requests
    // (log and requests kept to 10).
    let mut m = Master::new(1, None);
    m.set_log_limit(10);
    for i in 1..=100u64 {
        m.submit_local(i, put(&format!("k{i}")));
    }
    assert_eq!(m.version(), 100);
    // A backup arrives with nothing: the log does not reach back, so it is seeded.
    let mut b = Backup::new(2);
    let first = m.set_backup(Some(2), false);
    deliver_between(&mut m, &mut b, first);
    assert_eq!(b.stored(), 100, "the backup was seeded");
    // The master dies; the backup takes over. The first request, resent late, is
    // one it was seeded past: acknowledged, not applied again.
    let mut promoted = Master::promote(b, None);
    let outs = promoted.handle(
        1,
        Msg::Submit {
            from: 1,
            req: 1,
            change: put("k1"),
        },
    );
    assert!(
        outs.iter()
            .any(|o| matches!(o, Out::To(1, Msg::Ack { req: 1, .. }))),
        "the late resend was not acknowledged: {outs:?}"
    );
    assert_eq!(promoted.version(), 100, "the late resend was applied again");
}
