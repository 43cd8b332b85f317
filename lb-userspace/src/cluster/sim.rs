//! Many nodes on a simulated network with simulated time: random joins, deaths,
//! quiesces, test failures and partitions, then the network heals and settles, and
//! the equilibrium conditions of the seed must hold.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use proptest::prelude::*;
use rand::{rngs::StdRng, SeedableRng};

use super::{
    node::{Input, Node, NodeConfig, Output, Timing},
    wire::{self, AddrState},
};

const KEY: &[u8] = b"cluster key";
const STEP: Duration = Duration::from_millis(50);

fn ip(last: u8) -> IpAddr {
    IpAddr::from([198, 18, 0, last])
}

fn vip(i: usize) -> IpAddr {
    IpAddr::from([198, 18, 0, 100 + i as u8])
}

struct Sim {
    now: Instant,
    nodes: Vec<Option<Node>>,
    configs: Vec<NodeConfig>,
    /// Pairs that cannot hear each other.
    cut: BTreeSet<(usize, usize)>,
    restarts: u64,
    rng: StdRng,
    /// Acquires that a quiesced or failed node started: must stay zero.
    bad_acquires: u32,
}

impl Sim {
    /// `preferred[i]`: the VIP indexes node i prefers; `vips` addresses in the group.
    fn new(preferred: &[Vec<usize>], vips: usize, seed: u64) -> Sim {
        let addresses: Vec<IpAddr> = (0..vips).map(vip).collect();
        let configs: Vec<NodeConfig> = preferred
            .iter()
            .enumerate()
            .map(|(i, p)| NodeConfig {
                id: ip(2 + i as u8),
                control_addresses: vec![ip(2 + i as u8)],
                preferred: p.iter().map(|v| vip(*v)).collect(),
                addresses: addresses.clone(),
                timing: Timing::default(),
                quorum: 1,
            })
            .collect();
        let nodes = configs
            .iter()
            .map(|c| Some(Node::new(c.clone(), 1)))
            .collect();
        Sim {
            now: Instant::now(),
            nodes,
            configs,
            cut: BTreeSet::new(),
            restarts: 0,
            rng: StdRng::seed_from_u64(seed),
            bad_acquires: 0,
        }
    }

    /// The same nodes, each needing `quorum` alive hosts to serve.
    fn with_quorum(mut self, quorum: usize) -> Sim {
        for c in &mut self.configs {
            c.quorum = quorum;
        }
        self.nodes = self
            .configs
            .iter()
            .map(|c| Some(Node::new(c.clone(), 1)))
            .collect();
        self
    }

    fn owners(&self, v: usize) -> Vec<IpAddr> {
        self.nodes
            .iter()
            .flatten()
            .filter(|n| n.serving().contains_key(&vip(v)))
            .map(|n| n.id())
            .collect()
    }

    fn hears(&self, from: usize, to: usize) -> bool {
        !self.cut.contains(&(from.min(to), from.max(to)))
    }

    /// Feeds `input` to node `i` and everything that follows from it, to quiescence.
    fn feed(&mut self, i: usize, input: Input) {
        let mut queue = vec![(i, input)];
        while let Some((n, input)) = queue.pop() {
            let Some(node) = self.nodes[n].as_mut() else {
                continue;
            };
            let (quiesced, ok) = (node.quiesced(), node.ok());
            let outputs = node.handle(self.now, input, &mut self.rng);
            for o in outputs {
                match o {
                    Output::Send(m) => {
                        // Through the real framing: what arrives is what decode gives.
                        let bytes = wire::encode(&m, KEY);
                        for to in 0..self.nodes.len() {
                            if to != n && self.nodes[to].is_some() && self.hears(n, to) {
                                let m = wire::decode(&bytes, KEY).expect("own messages decode");
                                queue.push((to, Input::Message(m)));
                            }
                        }
                    }
                    Output::Acquire(address) => {
                        if quiesced || !ok {
                            self.bad_acquires += 1;
                        }
                        queue.push((n, Input::Acquired { address, ok: true }));
                    }
                    Output::Release(address) => {
                        queue.push((n, Input::Released { address, ok: true }))
                    }
                    Output::Event(_) => {}
                }
            }
        }
    }

    fn step(&mut self) {
        self.now += STEP;
        for i in 0..self.nodes.len() {
            self.feed(i, Input::Tick);
        }
    }

    fn run(&mut self, d: Duration) {
        for _ in 0..(d.as_millis() / STEP.as_millis()) {
            self.step();
        }
    }

    fn apply(&mut self, op: &Op) {
        let n = self.nodes.len();
        match *op {
            Op::Kill(i) => self.nodes[i % n] = None,
            Op::Start(i) => {
                let i = i % n;
                if self.nodes[i].is_none() {
                    // A restarted daemon starts with nothing served and a later sequence.
                    self.restarts += 1;
                    self.nodes[i] = Some(Node::new(
                        self.configs[i].clone(),
                        1_000_000 * self.restarts,
                    ));
                }
            }
            Op::Quiesce(i, q) => self.feed(i % n, Input::SetQuiesce(q)),
            Op::Test(i, ok) => self.feed(i % n, Input::TestResult { ok }),
            Op::Cut(a, b) => {
                let (a, b) = (a % n, b % n);
                if a != b {
                    self.cut.insert((a.min(b), a.max(b)));
                }
            }
            Op::Heal => self.cut.clear(),
            Op::Wait(ms) => self.run(Duration::from_millis(ms as u64)),
        }
    }

    /// The seed's equilibrium conditions, on the live nodes.
    fn check_equilibrium(&self) -> Result<(), String> {
        let alive: Vec<&Node> = self.nodes.iter().flatten().collect();
        if alive.is_empty() {
            return Ok(());
        }
        let leader = alive.iter().map(|n| n.id()).min();
        for n in &alive {
            if n.leader() != leader {
                return Err(format!(
                    "{} follows {:?}, not {leader:?}",
                    n.id(),
                    n.leader()
                ));
            }
        }
        let universe: BTreeSet<IpAddr> = self
            .configs
            .iter()
            .zip(&self.nodes)
            .filter(|(_, n)| n.is_some())
            .flat_map(|(c, _)| c.addresses.iter().chain(&c.preferred).copied())
            .collect();
        let mut owners: BTreeMap<IpAddr, Vec<IpAddr>> = BTreeMap::new();
        for n in &alive {
            for (a, s) in n.serving() {
                if *s != AddrState::Online {
                    return Err(format!("{} still has {a} {s:?}", n.id()));
                }
                if !universe.contains(a) {
                    return Err(format!(
                        "{} serves {a}, which is not a group address",
                        n.id()
                    ));
                }
                if !n.ok() {
                    return Err(format!("{} failed its tests but serves {a}", n.id()));
                }
                owners.entry(*a).or_default().push(n.id());
            }
        }
        let can_serve = alive.iter().any(|n| n.ok() && !n.quiesced());
        for a in &universe {
            match owners.get(a).map(Vec::len).unwrap_or(0) {
                1 => {}
                0 if !can_serve => {}
                k => return Err(format!("{a} is served by {k} nodes: {owners:?}")),
            }
        }
        for (c, n) in self.configs.iter().zip(&self.nodes) {
            let Some(n) = n else { continue };
            if !n.ok() || n.quiesced() {
                continue;
            }
            for p in &c.preferred {
                // A lower alive, OK host preferring the same address wins it.
                let rival = self.configs.iter().zip(&self.nodes).any(|(c2, n2)| {
                    n2.as_ref()
                        .is_some_and(|n2| n2.ok() && !n2.quiesced() && n2.id() < n.id())
                        && c2.preferred.contains(p)
                });
                if !rival && !n.serving().contains_key(p) {
                    return Err(format!(
                        "{} does not serve its preferred {p}: {owners:?}",
                        n.id()
                    ));
                }
            }
        }
        if self.bad_acquires > 0 {
            return Err(format!(
                "{} acquires by quiesced or failed nodes",
                self.bad_acquires
            ));
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
enum Op {
    Kill(usize),
    Start(usize),
    Quiesce(usize, bool),
    Test(usize, bool),
    Cut(usize, usize),
    Heal,
    Wait(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0..5usize).prop_map(Op::Kill),
        (0..5usize).prop_map(Op::Start),
        (0..5usize, any::<bool>()).prop_map(|(i, q)| Op::Quiesce(i, q)),
        (0..5usize, any::<bool>()).prop_map(|(i, ok)| Op::Test(i, ok)),
        (0..5usize, 0..5usize).prop_map(|(a, b)| Op::Cut(a, b)),
        Just(Op::Heal),
        (0..1500u16).prop_map(Op::Wait),
    ]
}

#[test]
fn a_quiet_cluster_settles_with_every_vip_on_its_preferred_node() {
    let mut sim = Sim::new(&[vec![0], vec![1], vec![]], 3, 1);
    sim.run(Duration::from_secs(2));
    sim.check_equilibrium().unwrap();
    let spare = sim.nodes[2].as_ref().unwrap();
    assert_eq!(
        spare.serving().keys().copied().collect::<Vec<_>>(),
        [vip(2)],
        "the orphan goes to the spare"
    );
}

#[test]
fn a_dead_nodes_vip_moves_and_comes_back_with_it() {
    let mut sim = Sim::new(&[vec![0], vec![1], vec![]], 2, 2);
    sim.run(Duration::from_secs(1));
    sim.apply(&Op::Kill(1));
    sim.run(Duration::from_secs(1));
    sim.check_equilibrium().unwrap();
    assert!(
        sim.nodes[2]
            .as_ref()
            .unwrap()
            .serving()
            .contains_key(&vip(1)),
        "the spare took the dead node's VIP"
    );
    sim.apply(&Op::Start(1));
    sim.run(Duration::from_secs(2));
    sim.check_equilibrium().unwrap();
    assert!(
        sim.nodes[1]
            .as_ref()
            .unwrap()
            .serving()
            .contains_key(&vip(1)),
        "the preferred node got its VIP back"
    );
}

#[test]
fn failover_takes_about_the_timeout() {
    // Detection (3 intervals of silence) plus one command round trip.
    let mut sim = Sim::new(&[vec![0], vec![1]], 2, 3);
    sim.run(Duration::from_secs(1));
    sim.apply(&Op::Kill(1));
    let start = sim.now;
    while !sim.nodes[0]
        .as_ref()
        .unwrap()
        .serving()
        .contains_key(&vip(1))
    {
        sim.step();
        assert!(
            sim.now - start < Duration::from_secs(2),
            "no failover within 2 s"
        );
    }
    assert!(
        sim.now - start <= Duration::from_millis(500),
        "failover took {:?}",
        sim.now - start
    );
}

#[test]
fn the_spare_takes_the_dead_leaders_vip_within_one_timeout_even_if_it_hears_last() {
    // Node 0 leads and serves vip 0. Node 1 ticks before node 2 in each step, so it
    // sees the death first, leads, and orders node 2 (the spare) to acquire while node
    // 2 still follows node 0: the order must not wait for a resend.
    let mut sim = Sim::new(&[vec![0], vec![1], vec![]], 2, 6);
    sim.run(Duration::from_secs(1));
    assert_eq!(sim.owners(0), [ip(2)]);
    sim.apply(&Op::Kill(0));
    let start = sim.now;
    while sim.owners(0).is_empty() {
        sim.step();
        assert!(
            sim.now - start < Duration::from_secs(2),
            "no failover within 2 s"
        );
    }
    assert_eq!(sim.owners(0), [ip(4)], "the spare took it");
    let timeout = Timing::default().timeout;
    assert!(
        sim.now - start <= timeout + 2 * STEP,
        "failover took {:?} (timeout {timeout:?})",
        sim.now - start
    );
}

#[test]
fn with_a_majority_quorum_a_partition_leaves_one_owner_per_vip() {
    let mut sim = Sim::new(&[vec![0], vec![1], vec![]], 2, 7).with_quorum(2);
    sim.run(Duration::from_secs(1));
    sim.check_equilibrium().unwrap();
    sim.apply(&Op::Cut(0, 1));
    sim.apply(&Op::Cut(0, 2));
    let timeout = Timing::default().timeout;
    let cut = sim.now;
    for _ in 0..60 {
        sim.step();
        if sim.now - cut > timeout + 3 * STEP {
            assert_eq!(
                sim.owners(0),
                [ip(4)],
                "the majority side serves vip 0 alone"
            );
            assert_eq!(sim.owners(1), [ip(3)]);
            assert!(!sim.nodes[0].as_ref().unwrap().quorate());
        }
        assert!(sim.owners(0).len() <= 2 && sim.owners(1).len() == 1);
    }
    sim.apply(&Op::Heal);
    sim.run(Duration::from_secs(2));
    sim.check_equilibrium().unwrap();
    assert_eq!(sim.owners(0), [ip(2)], "back on its preferred node");
}

#[test]
fn a_restarted_node_keeps_what_it_adopted_while_it_listens() {
    let mut sim = Sim::new(&[vec![0], vec![1], vec![]], 2, 8).with_quorum(2);
    sim.run(Duration::from_secs(1));
    // Node 1's daemon restarts within the timeout and adopts what it served.
    let mut node = Node::new(sim.configs[1].clone(), 1_000_000);
    node.adopt(vip(1));
    sim.nodes[1] = Some(node);
    for _ in 0..40 {
        sim.step();
        assert_eq!(
            sim.owners(1),
            [ip(3)],
            "vip 1 left its node or got a second owner"
        );
    }
    sim.check_equilibrium().unwrap();
}

#[test]
fn a_partition_makes_two_owners_and_healing_leaves_one() {
    let mut sim = Sim::new(&[vec![0], vec![], vec![]], 1, 4);
    sim.run(Duration::from_secs(1));
    // Node 0 serves vip 0; cut it off from the others: they elect node 1, which gives
    // the "unserved" VIP to a spare.
    sim.apply(&Op::Cut(0, 1));
    sim.apply(&Op::Cut(0, 2));
    sim.run(Duration::from_secs(1));
    let owners = sim
        .nodes
        .iter()
        .flatten()
        .filter(|n| n.serving().contains_key(&vip(0)))
        .count();
    assert_eq!(owners, 2, "both sides serve during the partition");
    sim.apply(&Op::Heal);
    sim.run(Duration::from_secs(2));
    sim.check_equilibrium().unwrap();
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn after_any_history_the_healed_cluster_reaches_equilibrium(
        ops in proptest::collection::vec(op(), 0..25),
        seed in any::<u64>(),
    ) {
        let mut sim = Sim::new(&[vec![0], vec![1], vec![2, 3], vec![], vec![]], 5, seed);
        sim.run(Duration::from_secs(1));
        for op in &ops {
            sim.apply(op);
            sim.step();
        }
        sim.apply(&Op::Heal);
        sim.run(Duration::from_secs(3));
        prop_assert!(sim.check_equilibrium().is_ok(), "{:?} after {:?}", sim.check_equilibrium(), ops);
    }
}

#[test]
fn an_orphan_whose_preferred_node_stays_away_expires() {
    // Only node 0 knows vip 0 (it prefers it; the others are not configured with it).
    let mut sim = Sim::new(&[vec![0], vec![], vec![]], 0, 5);
    for (i, c) in sim.configs.iter_mut().enumerate() {
        c.timing.orphan_expiry = Some(Duration::from_secs(2));
        c.addresses = if i == 0 { vec![vip(0)] } else { vec![] };
    }
    sim.nodes = sim
        .configs
        .iter()
        .map(|c| Some(Node::new(c.clone(), 1)))
        .collect();
    sim.run(Duration::from_secs(1));
    assert!(sim.nodes[0]
        .as_ref()
        .unwrap()
        .serving()
        .contains_key(&vip(0)));
    sim.apply(&Op::Kill(0));
    sim.run(Duration::from_secs(1));
    let served = |sim: &Sim| {
        sim.nodes
            .iter()
            .flatten()
            .any(|n| n.serving().contains_key(&vip(0)))
    };
    assert!(served(&sim), "the orphan is served by a spare meanwhile");
    sim.run(Duration::from_secs(3));
    assert!(!served(&sim), "the orphan did not expire");
}
