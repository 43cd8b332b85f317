//! Whole directory nodes (`DirNode`) in a simulated cluster: each node takes its roles
//! from what it can see (`directory_roles`, a majority quorum) as lbd does: at its own
//! moment of a 200 ms round, from the claims and versions the others' last heartbeats
//! carried and its own last advertisement (all of them stale while changes flow).
//! Messages are dropped, delayed and reordered, nodes die and links are cut. What must hold, over many
//! seeds: every change a node was told is committed survives the death of any one
//! node; after a partition heals, every replica holds the same rows.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr},
    time::{Duration, Instant},
};

use rand::{rngs::StdRng, Rng, SeedableRng};

use super::{
    node::{directory_roles, Candidate, DirNode, Input, Outputs},
    replication::{Msg, NodeId},
    tables::{Change, Op},
};

fn addr(id: NodeId) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(198, 18, 0, id as u8 + 1))
}

fn id_of(a: IpAddr) -> NodeId {
    match a {
        IpAddr::V4(v4) => NodeId::from(v4.octets()[3]) - 1,
        IpAddr::V6(_) => unreachable!(),
    }
}

struct Sim {
    rng: StdRng,
    t0: Instant,
    now_ms: u64,
    seq: u64,
    nodes: Vec<DirNode>,
    dead: BTreeSet<NodeId>,
    /// Pairs that cannot reach each other.
    cut: BTreeSet<(NodeId, NodeId)>,
    queue: BTreeMap<(u64, u64), (NodeId, NodeId, Msg)>,
    drop_rate: f64,
    /// Requests waiting for their answer: (node, req) → the key they write.
    waiting: BTreeMap<(NodeId, u64), String>,
    /// Keys whose write was acknowledged to the client.
    acked: BTreeSet<String>,
    refused: usize,
    next_key: u64,
    resynced: usize,
    /// What each node last advertised of its directory (claims, version), as
    /// `shell::dird` does after its roles step; its own view reads this, not its
    /// live state ...
    advertised: Vec<Advert>,
    /// ... and the others read what its last heartbeat carried.
    heard: Vec<Advert>,
    /// When in each 200 ms round a node takes its roles (the nodes' timers are not
    /// in step), and when in each 100 ms its heartbeat leaves.
    phases: Vec<(u64, u64)>,
}

/// What a node's heartbeat says of its directory: claims master, backup of whom,
/// version.
type Advert = (bool, Option<NodeId>, u64);

impl Sim {
    fn new(seed: u64, n: u32, drop_rate: f64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let phases = (0..n)
            .map(|_| (rng.gen_range(0..200), rng.gen_range(0..100)))
            .collect();
        Sim {
            rng,
            phases,
            t0: Instant::now(),
            now_ms: 0,
            seq: 0,
            nodes: (0..n).map(|i| DirNode::new(i, false, 1)).collect(),
            dead: BTreeSet::new(),
            cut: BTreeSet::new(),
            queue: BTreeMap::new(),
            drop_rate,
            waiting: BTreeMap::new(),
            acked: BTreeSet::new(),
            refused: 0,
            next_key: 0,
            resynced: 0,
            advertised: vec![(false, None, 0); n as usize],
            heard: vec![(false, None, 0); n as usize],
        }
    }

    fn reaches(&self, a: NodeId, b: NodeId) -> bool {
        !self.dead.contains(&a)
            && !self.dead.contains(&b)
            && !self.cut.contains(&(a, b))
            && !self.cut.contains(&(b, a))
    }

    fn now(&self) -> Instant {
        self.t0 + Duration::from_millis(self.now_ms)
    }

    fn carry_out(&mut self, me: NodeId, out: Outputs) {
        for (req, _) in &out.acked {
            if let Some(key) = self.waiting.remove(&(me, *req)) {
                self.acked.insert(key);
            }
        }
        if out.resynced {
            self.resynced += 1;
        }
        for (to, msg) in out.send {
            if !self.reaches(me, to) || self.rng.gen_bool(self.drop_rate) {
                continue;
            }
            let delay = self.rng.gen_range(0..30);
            self.seq += 1;
            self.queue
                .insert((self.now_ms + delay, self.seq), (to, me, msg));
        }
    }

    /// A client writes a new key through node `via`.
    fn write(&mut self, via: NodeId) {
        if self.dead.contains(&via) {
            return;
        }
        self.next_key += 1;
        let key = format!("k{}", self.next_key);
        let change = Change {
            table: "svc.web".into(),
            key: key.clone(),
            op: Op::Put {
                value: format!("198.18.1.{}:80", self.next_key % 250),
                valid: true,
            },
        };
        let now = self.now();
        let out = self.nodes[via as usize].handle(now, Input::Submit(vec![change]));
        if out.refused {
            self.refused += 1;
        }
        for req in &out.submitted {
            self.waiting.insert((via, *req), key.clone());
        }
        self.carry_out(via, out);
    }

    /// Every 200 ms, as `shell::dird` does: roles from what this node sees of the
    /// others (their last heartbeats) and of itself (what it last advertised), then a
    /// tick, then it advertises its role and version.
    fn roles(&mut self, me: NodeId) {
        if self.dead.contains(&me) {
            return;
        }
        let n = self.nodes.len() as u32;
        let quorum = n / 2 + 1;
        let seen: Vec<NodeId> = (0..n)
            .filter(|o| *o == me || self.reaches(me, *o))
            .collect();
        let now = self.now();
        let input = if (seen.len() as u32) < quorum {
            Input::NoQuorum
        } else {
            let hosts: Vec<Candidate> = seen
                .iter()
                .map(|o| {
                    let (master, backup_of, version) = if *o == me {
                        self.advertised[me as usize]
                    } else {
                        self.heard[*o as usize]
                    };
                    Candidate {
                        id: addr(*o),
                        master,
                        backup_of: backup_of.map(addr),
                        version,
                    }
                })
                .collect();
            let (master, backup) = directory_roles(&hosts).expect("hosts");
            Input::Roles {
                master: id_of(master),
                backup: backup.map(id_of),
                peers: seen.iter().copied().filter(|o| *o != me).collect(),
            }
        };
        let out = self.nodes[me as usize].handle(now, input);
        self.carry_out(me, out);
        let out = self.nodes[me as usize].handle(now, Input::Tick);
        self.carry_out(me, out);
        let node = &self.nodes[me as usize];
        self.advertised[me as usize] = (node.is_master(), node.backing(), node.version());
    }

    fn step(&mut self) {
        self.now_ms += 1;
        for me in 0..self.nodes.len() as NodeId {
            let (roles_at, heartbeat_at) = self.phases[me as usize];
            if self.now_ms % 200 == roles_at {
                self.roles(me);
            }
            if self.now_ms % 100 == heartbeat_at {
                self.heard[me as usize] = self.advertised[me as usize];
            }
        }
        while let Some((&(at, s), _)) = self.queue.first_key_value() {
            if at > self.now_ms {
                break;
            }
            let (to, from, msg) = self.queue.remove(&(at, s)).expect("present");
            if !self.reaches(from, to) {
                continue;
            }
            let now = self.now();
            let out = self.nodes[to as usize].handle(now, Input::Receive { from, msg });
            self.carry_out(to, out);
        }
    }

    fn run(&mut self, ms: u64) {
        for _ in 0..ms {
            self.step();
        }
    }

    fn alive(&self) -> Vec<NodeId> {
        (0..self.nodes.len() as u32)
            .filter(|i| !self.dead.contains(i))
            .collect()
    }

    fn master(&self) -> Option<NodeId> {
        self.alive()
            .into_iter()
            .find(|i| self.nodes[*i as usize].is_master())
    }

    /// Runs until every live replica has the same content as the master's, and no
    /// request waits; panics after `max_ms`.
    fn settle(&mut self, max_ms: u64) {
        for _ in 0..max_ms / 10 {
            self.run(10);
            let Some(m) = self.master() else { continue };
            let (v, d) = (
                self.nodes[m as usize].version(),
                self.nodes[m as usize].digest(),
            );
            let same = self.alive().iter().all(|i| {
                let node = &self.nodes[*i as usize];
                node.tables().digest() == d && (node.is_master() || node.version() == v)
            });
            if same && self.waiting.keys().all(|(n, _)| self.dead.contains(n)) {
                return;
            }
        }
        panic!(
            "not settled after {max_ms} ms: master {:?}, versions {:?}, digests {:?}, waiting {}",
            self.master(),
            self.nodes.iter().map(DirNode::version).collect::<Vec<_>>(),
            self.nodes
                .iter()
                .map(|n| n.tables().digest())
                .collect::<Vec<_>>(),
            self.waiting.len()
        );
    }

    fn assert_acked_everywhere(&self, what: &str) {
        for i in self.alive() {
            let t = self.nodes[i as usize].tables();
            for key in &self.acked {
                assert!(
                    t.get("svc.web", key).is_some(),
                    "{what}: node {i} lacks acknowledged {key}"
                );
            }
        }
    }
}

#[test]
fn killing_any_node_at_any_moment_loses_no_acknowledged_change() {
    for seed in 0..200 {
        let mut s = Sim::new(seed, 3, 0.05);
        s.run(1000); // roles settle
        let victim_is_master = seed % 3 != 0;
        let kill_at = s.rng.gen_range(20..120);
        for i in 0..200u32 {
            let via = s.rng.gen_range(0..3);
            s.write(via);
            let pause = s.rng.gen_range(0..20);
            s.run(pause);
            if i == kill_at {
                let victim = if victim_is_master {
                    s.master().expect("a master")
                } else {
                    s.rng.gen_range(0..3)
                };
                s.dead.insert(victim);
                // What the victim was still waiting for is never acknowledged.
                s.waiting.retain(|(n, _), _| *n != victim);
            }
        }
        s.settle(30_000);
        assert!(
            s.acked.len() > 100,
            "seed {seed}: only {} acked",
            s.acked.len()
        );
        s.assert_acked_everywhere(&format!("seed {seed}"));
    }
}

#[test]
fn a_burst_through_a_new_master_survives_its_death_too() {
    for seed in 0..100 {
        let mut s = Sim::new(1000 + seed, 3, 0.05);
        s.run(1000);
        for _ in 0..30 {
            let via = s.rng.gen_range(0..3);
            s.write(via);
            s.run(5);
        }
        let first = s.master().expect("a master");
        s.dead.insert(first);
        s.waiting.retain(|(n, _), _| *n != first);
        // Writes start at once, while the others are still sorting out roles.
        let mut second = None;
        for _ in 0..150 {
            let via = s.alive()[s.rng.gen_range(0..2)];
            s.write(via);
            s.run(3);
            second = second.or(s.master());
        }
        // The node that became master dies right after its burst; the last node
        // alone has no quorum, so it answers nothing new, but must hold every acked
        // change. Bring the first back (empty: it restarted) to give it a quorum.
        let second = second.expect("a new master took over");
        s.dead.insert(second);
        s.waiting.retain(|(n, _), _| *n != second);
        s.dead.remove(&first);
        // A run of its own for its requests, as the daemon picks one at start.
        s.nodes[first as usize] = DirNode::new(first, false, (1 << 32) | 1);
        s.advertised[first as usize] = (false, None, 0);
        s.heard[first as usize] = (false, None, 0);
        s.settle(30_000);
        assert!(s.acked.len() >= 30, "seed {seed}");
        s.assert_acked_everywhere(&format!("seed {seed}"));
    }
}

#[test]
fn after_a_partition_heals_every_replica_holds_the_same_rows() {
    for seed in 0..100 {
        let mut s = Sim::new(2000 + seed, 3, 0.05);
        s.run(1000);
        for _ in 0..20 {
            let via = s.rng.gen_range(0..3);
            s.write(via);
            s.run(5);
        }
        // The master is cut off from the other two; both sides are written to.
        let m = s.master().expect("a master");
        for o in 0..3 {
            if o != m {
                s.cut.insert((m, o));
            }
        }
        for _ in 0..60 {
            let via = s.rng.gen_range(0..3);
            s.write(via);
            s.run(100);
        }
        assert!(s.refused > 0, "seed {seed}: the minority refused writes");
        s.cut.clear();
        s.settle(30_000);
        s.assert_acked_everywhere(&format!("seed {seed}"));
        let rows: Vec<usize> = s.nodes.iter().map(|n| n.tables().len()).collect();
        assert!(
            rows.windows(2).all(|w| w[0] == w[1]),
            "seed {seed}: {rows:?}"
        );
    }
}

#[test]
fn a_replica_that_diverged_at_the_same_version_is_found_and_replaced() {
    let mut s = Sim::new(7, 3, 0.0);
    s.run(1000);
    for i in 0..10 {
        s.write(i % 3);
        s.run(20);
    }
    s.settle(10_000);
    // A replica with rows nobody wrote (a bug, a disk, an old partition's leftovers)
    // at the master's version: only the digest tells.
    let agent = (0..3)
        .find(|i| !s.nodes[*i as usize].is_master() && s.nodes[*i as usize].role() == "agent");
    let agent = agent.expect("an agent");
    let v = s.nodes[agent as usize].version();
    s.nodes[agent as usize].corrupt_for_test("svc.web", "stray");
    assert_eq!(s.nodes[agent as usize].version(), v);
    s.settle(10_000);
    assert!(s.resynced >= 1, "the divergence was reported");
    assert!(s.nodes[agent as usize]
        .tables()
        .get("svc.web", "stray")
        .is_none());
}
