//! The XDP program driven with crafted frames through `BPF_PROG_TEST_RUN`: verdicts,
//! output bytes and counters. Needs root (CAP_BPF, CAP_NET_ADMIN), as CI has.

mod support;

use std::{
    collections::{BTreeMap, HashMap},
    net::IpAddr,
};

use aya::programs::{TestRun, TestRunOptions};
use lb_common::GlobalStats;
use lb_userspace::{
    plan::{BackendPlan, Rule, ServicePlan},
    BackendRoute, Dataplane, Egress, LoadOptions, MapManager, Program, Programs, Proto,
    ServiceConfig, ServiceKey,
};
use support::{backend_mac, macs, Frame, CLIENT_MAC, ETH_LEN, IPV4_LEN, L4, LB_MAC};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "2001:db8::100";
const CLIENT4: &str = "198.18.1.10";
const CLIENT6: &str = "2001:db8:1::10";

struct Lb {
    dp: Programs,
    maps: MapManager,
    /// What each service was given, in the old operator verbs the tests speak.
    given: BTreeMap<ServiceKey, (ServiceConfig, Vec<BackendConfig>, Steering)>,
}

/// A backend as a test gives it.
#[derive(Clone, Copy, Debug)]
struct BackendConfig {
    addr: IpAddr,
    weight: u32,
    route: BackendRoute,
}

/// The L4 rules as a test gives them.
#[derive(Clone, Debug, Default)]
struct Steering {
    source_partition: bool,
    topology: Vec<(IpAddr, u8, String)>,
    spheres: BTreeMap<IpAddr, String>,
}

fn plan_of(config: ServiceConfig, backends: &[BackendConfig], steering: &Steering) -> ServicePlan {
    let rule = if steering.source_partition {
        Rule::Source
    } else if !steering.topology.is_empty() {
        Rule::Topology {
            subnets: steering.topology.clone(),
        }
    } else {
        Rule::Hash
    };
    ServicePlan {
        config,
        rule,
        backends: backends
            .iter()
            .map(|b| {
                (
                    b.addr,
                    BackendPlan {
                        weight: b.weight,
                        route: Some(b.route),
                        sphere: steering.spheres.get(&b.addr).cloned(),
                    },
                )
            })
            .collect(),
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Every run of a test on one CPU: the connection table is shared, but the refusal
/// budget, the counters and the LRU's free lists are per CPU.
fn pin_to_cpu0() {
    let mut set = nix::sched::CpuSet::new();
    set.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
}

fn load_lb() -> Lb {
    assert!(
        is_root(),
        "the data-plane tests load XDP programs and must run as root (sudo cargo xtask test)"
    );
    load_lb_with(LoadOptions {
        max_services: 8,
        conn_table_size: 1 << 15,
        ..LoadOptions::default()
    })
}

/// The balancer on CPU 0 with these sizes and timeouts.
fn load_lb_with(options: LoadOptions) -> Lb {
    pin_to_cpu0();
    let (dp, maps) = Programs::load(&options).expect("loading the XDP object");
    Lb::new(dp, maps)
}

fn service(addr: &str, port: u16, proto: Proto) -> ServiceKey {
    ServiceKey {
        addr: addr.parse().unwrap(),
        port,
        proto,
    }
}

fn backend(addr: &str, i: u8, weight: u32) -> BackendConfig {
    BackendConfig {
        addr: addr.parse().unwrap(),
        weight,
        route: BackendRoute {
            dst_mac: backend_mac(i),
            src_mac: LB_MAC,
            egress: Egress::Ingress,
            encap: None,
        },
    }
}

fn backends4(n: u8) -> Vec<BackendConfig> {
    (1..=n)
        .map(|i| backend(&format!("198.18.0.{}", i), i, 1))
        .collect()
}

fn backends6(n: u8) -> Vec<BackendConfig> {
    (1..=n)
        .map(|i| backend(&format!("2001:db8::{i}"), i, 1))
        .collect()
}

impl Lb {
    fn add(&mut self, key: ServiceKey, backends: &[BackendConfig]) {
        self.add_with(key, ServiceConfig::default(), backends)
    }

    fn add_with(&mut self, key: ServiceKey, config: ServiceConfig, backends: &[BackendConfig]) {
        self.given
            .insert(key, (config, backends.to_vec(), Steering::default()));
        self.write(key);
    }

    fn new(dp: Programs, maps: MapManager) -> Lb {
        Lb {
            dp,
            maps,
            given: BTreeMap::new(),
        }
    }

    fn write(&mut self, key: ServiceKey) {
        let (config, backends, steering) = &self.given[&key];
        let plan = plan_of(*config, backends, steering);
        self.maps.write_service(key, &plan).unwrap();
    }

    fn set_backends(&mut self, key: ServiceKey, backends: &[BackendConfig]) {
        self.given.get_mut(&key).unwrap().1 = backends.to_vec();
        self.write(key);
    }

    fn set_config(&mut self, key: ServiceKey, config: ServiceConfig) {
        self.given.entry(key).or_default().0 = config;
        self.write(key);
    }

    fn set_steering(&mut self, key: ServiceKey, steering: Steering) {
        self.given.get_mut(&key).unwrap().2 = steering;
        self.write(key);
    }

    fn remove(&mut self, key: ServiceKey) {
        self.given.remove(&key);
        self.maps.remove_service(key).unwrap();
    }

    fn run_prog(&self, program: Program, frame: &[u8]) -> (u32, Vec<u8>) {
        support::test_run(&self.dp, program, frame)
    }

    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        self.run_prog(Program::Balancer, frame)
    }

    /// Sends a frame that must be forwarded; returns the backend index its MAC names.
    fn forward(&self, frame: &Frame) -> u8 {
        let bytes = frame.build();
        let (verdict, out) = self.run(&bytes);
        assert_eq!(verdict, XDP_TX, "frame {frame:?} not transmitted");
        let (dst, src) = macs(&out);
        assert_eq!(src, LB_MAC);
        assert_eq!(
            dst[..5],
            backend_mac(0)[..5],
            "not a backend MAC: {dst:02x?}"
        );
        dst[5]
    }

    fn stats(&self) -> GlobalStats {
        self.maps.global_stats().unwrap()
    }
}

/// Flow `i` of a family: distinct client addresses and ports.
fn flow(l4: L4, v6: bool, i: u32, dport: u16) -> Frame {
    let sport = 1024 + (i % 60000) as u16;
    let host = i / 60000 + 10;
    let src: IpAddr = if v6 {
        format!("2001:db8:1::{:x}", host).parse().unwrap()
    } else {
        format!("198.18.1.{}", host).parse().unwrap()
    };
    let dst: IpAddr = if v6 { VIP6 } else { VIP4 }.parse().unwrap();
    Frame::new(src, dst, l4, sport, dport)
}

/// Packets of `n` established connections (ACKs: a SYN is steered but not entered in
/// the connection table).
fn flows(n: u32, dport: u16) -> Vec<Frame> {
    // Spread the clients over addresses too, not only ports.
    (0..n)
        .map(|i| {
            let mut f = flow(L4::Tcp, false, i, dport).established();
            f.src = format!("198.18.1.{}", 10 + i % 200).parse().unwrap();
            f.sport = 1024 + (i / 200) as u16 * 7 + (i % 7) as u16;
            f
        })
        .collect()
}

#[test]
fn forwards_tcp_and_udp_to_v4_and_v6_vips_rewriting_only_the_macs() {
    let mut lb = load_lb();
    lb.add(service(VIP4, 80, Proto::Tcp), &backends4(1));
    lb.add(service(VIP4, 53, Proto::Udp), &backends4(1));
    lb.add(service(VIP6, 80, Proto::Tcp), &backends6(1));
    lb.add(service(VIP6, 53, Proto::Udp), &backends6(1));
    let frames = [
        Frame::tcp(CLIENT4, VIP4, 40000, 80),
        Frame::udp(CLIENT4, VIP4, 40000, 53),
        Frame::tcp(CLIENT6, VIP6, 40000, 80),
        Frame::udp(CLIENT6, VIP6, 40000, 53),
    ];
    for frame in &frames {
        let input = frame.build();
        let (verdict, out) = lb.run(&input);
        assert_eq!(verdict, XDP_TX, "{frame:?}");
        assert_eq!(out.len(), input.len());
        assert_eq!(macs(&out), (backend_mac(1), LB_MAC), "{frame:?}");
        assert_eq!(out[12..], input[12..], "IP packet changed for {frame:?}");
    }
    let stats = lb.stats();
    assert_eq!(stats.tx, 4);
    assert_eq!(stats.lru_miss, 4);
}

#[test]
fn the_same_five_tuple_always_goes_to_the_same_backend() {
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    lb.add(key, &backends4(3));
    let frames = flows(300, 80);
    let first: Vec<u8> = frames.iter().map(|f| lb.forward(f)).collect();
    for _ in 0..3 {
        let again: Vec<u8> = frames.iter().map(|f| lb.forward(f)).collect();
        assert_eq!(again, first);
    }
    // A second balancer with the same configuration and an empty connection table picks
    // the same backends: the choice is the Maglev table's, not an accident of the LRU.
    let mut other = load_lb();
    other.add(key, &backends4(3));
    let fresh: Vec<u8> = frames.iter().map(|f| other.forward(f)).collect();
    assert_eq!(fresh, first);
    assert_eq!(lb.stats().lru_hit, 900);
    assert!(
        first
            .iter()
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            == 3
    );
}

#[test]
fn ten_thousand_flows_spread_evenly_over_three_backends() {
    let mut lb = load_lb();
    lb.add(service(VIP4, 80, Proto::Tcp), &backends4(3));
    let mut per_backend: HashMap<u8, u32> = HashMap::new();
    for f in flows(10_000, 80) {
        *per_backend.entry(lb.forward(&f)).or_default() += 1;
    }
    assert_eq!(per_backend.len(), 3, "{per_backend:?}");
    for (b, n) in &per_backend {
        let share = *n as f64 / 10_000.0;
        assert!(
            (share - 1.0 / 3.0).abs() <= 0.1 / 3.0,
            "backend {b} got {n} of 10000 flows: {per_backend:?}"
        );
    }
}

#[test]
fn weights_set_the_share_of_new_flows() {
    let mut lb = load_lb();
    let mut bs = backends4(2);
    bs[0].weight = 3;
    bs[1].weight = 1;
    lb.add(service(VIP4, 80, Proto::Tcp), &bs);
    let mut per_backend: HashMap<u8, u32> = HashMap::new();
    for f in flows(8000, 80) {
        *per_backend.entry(lb.forward(&f)).or_default() += 1;
    }
    let heavy = per_backend[&1] as f64 / 8000.0;
    assert!(
        (heavy - 0.75).abs() < 0.05,
        "weight 3:1 gave {per_backend:?}"
    );
}

#[test]
fn established_flows_keep_their_backend_when_one_is_added() {
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    lb.add(key, &backends4(3));
    let old = flows(3000, 80);
    let before: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();

    lb.set_backends(key, &backends4(4));
    let after: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
    assert_eq!(after, before, "an established flow changed backend");
    assert_eq!(lb.stats().lru_hit, 3000);

    // The LRU is what kept them: with the new table alone, some would have moved.
    let mut fresh = load_lb();
    fresh.add(key, &backends4(4));
    let table_only: Vec<u8> = old.iter().map(|f| fresh.forward(f)).collect();
    let moved = table_only.iter().filter(|&&b| b == 4).count();
    assert!(
        moved > 3000 / 8,
        "only {moved} flows would have moved to the new backend"
    );

    // New flows do reach the new backend.
    let new: Vec<u8> = flows(6000, 80)[3000..]
        .iter()
        .map(|f| lb.forward(f))
        .collect();
    let on_new = new.iter().filter(|&&b| b == 4).count();
    assert!(
        on_new > 3000 / 8,
        "only {on_new} of 3000 new flows went to the new backend"
    );
}

#[test]
fn a_syn_is_steered_by_the_table_and_its_flow_entered_at_the_first_ack() {
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    lb.add(key, &backends4(3));
    let syn = Frame::tcp(CLIENT4, VIP4, 40000, 80);
    let to = lb.forward(&syn);
    assert_eq!(lb.maps.count_connections_now(), 0, "a SYN entered its flow");
    // A RST or a SYN+ACK to a VIP proves no connection either.
    let mut rst = syn.clone();
    rst.tcp_flags = 0x14;
    assert_eq!(lb.forward(&rst), to);
    let mut syn_ack = syn.clone();
    syn_ack.tcp_flags = 0x12;
    assert_eq!(lb.forward(&syn_ack), to);
    assert_eq!(
        lb.maps.count_connections_now(),
        0,
        "a RST or SYN+ACK entered its flow"
    );
    // The handshake's ACK goes where the SYN went, and enters the flow.
    assert_eq!(lb.forward(&syn.clone().established()), to);
    assert_eq!(lb.maps.count_connections_now(), 1);
    // From then on the table keeps it, SYN retransmits included.
    lb.set_backends(key, &backends4(9));
    assert_eq!(lb.forward(&syn), to);
    assert_eq!(lb.forward(&syn.clone().established()), to);
    // UDP has no handshake: its first datagram enters the flow.
    let udp = service(VIP4, 53, Proto::Udp);
    lb.add(udp, &backends4(3));
    lb.forward(&Frame::udp(CLIENT4, VIP4, 40000, 53));
    assert_eq!(lb.maps.count_connections_now(), 2);
}

#[test]
fn a_flood_of_a_million_spoofed_syns_leaves_established_flows_on_their_backends() {
    const ESTABLISHED: u32 = 10_000;
    const FLOOD: u32 = 1_000_000;
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    lb.add(key, &backends4(3));
    let real = flows(ESTABLISHED, 80);
    let before: Vec<u8> = real.iter().map(|f| lb.forward(f)).collect();
    assert_eq!(lb.maps.count_connections_now(), ESTABLISHED as usize);

    // 1M SYNs from spoofed sources (198.19.0.0/16 x ports), 30 times the table's
    // capacity: each one is steered, none is entered.
    let template = Frame::tcp("198.19.0.1", VIP4, 1, 80).build();
    let mut frame = template.clone();
    let mut out = vec![0u8; frame.len() + 64];
    let prog = lb.dp.program(Program::Balancer);
    for i in 0..FLOOD {
        frame[ETH_LEN + 14..ETH_LEN + 16].copy_from_slice(&((i >> 16) as u16).to_be_bytes());
        frame[ETH_LEN + IPV4_LEN..ETH_LEN + IPV4_LEN + 2]
            .copy_from_slice(&(i as u16).to_be_bytes());
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        assert_eq!(r.return_value, XDP_TX, "SYN {i} of the flood not steered");
    }
    assert_eq!(
        lb.maps.count_connections_now(),
        ESTABLISHED as usize,
        "the flood changed the connection table"
    );

    // The table changes (more backends): the real flows stay where they were,
    // which only their connection-table entries can do.
    lb.set_backends(key, &backends4(6));
    let after: Vec<u8> = real.iter().map(|f| lb.forward(f)).collect();
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    assert_eq!(
        moved, 0,
        "{moved} of {ESTABLISHED} established flows changed backend"
    );
}

/// A table of this many entries in the tests that fill it.
const SMALL_TABLE: u32 = 2048;

#[test]
fn a_full_ipv4_connection_table_keeps_its_flows_and_still_steers_new_ones() {
    a_full_connection_table_keeps_its_flows_and_still_steers_new_ones(false);
}

#[test]
fn a_full_ipv6_connection_table_keeps_its_flows_and_still_steers_new_ones() {
    a_full_connection_table_keeps_its_flows_and_still_steers_new_ones(true);
}

fn a_full_connection_table_keeps_its_flows_and_still_steers_new_ones(v6: bool) {
    const NEW: u64 = 500;
    assert!(is_root(), "the data-plane tests must run as root");
    let mut lb = load_lb_with(LoadOptions {
        max_services: 8,
        conn_table_size: SMALL_TABLE,
        ..LoadOptions::default()
    });
    let (key, backends, client, vip) = if v6 {
        (service(VIP6, 80, Proto::Tcp), backends6(3), CLIENT6, VIP6)
    } else {
        (service(VIP4, 80, Proto::Tcp), backends4(3), CLIENT4, VIP4)
    };
    lb.add(key, &backends);
    // Sized for SMALL_TABLE flows, it holds them: twice the slots, a flow in the
    // emptier of two sets (one in ~30,000 finds both full at this load).
    let n = 4 * SMALL_TABLE + 2 * NEW as u32;
    let all = if v6 { flows6(n, 1) } else { flows(n, 80) };
    let (sized, beyond) = all.split_at(SMALL_TABLE as usize);
    for f in sized {
        lb.forward(f);
    }
    let held = lb.maps.count_connections_now();
    assert!(
        held + 2 >= SMALL_TABLE as usize,
        "a table sized for {SMALL_TABLE} flows held {held} of them"
    );

    // Flows beyond it until NEW have been refused: each refused one goes where its
    // SYN went (the Maglev table), and none takes the place of a flow entered.
    let mut entered = vec![];
    for f in beyond {
        let full = lb.stats().conn_table_full;
        if full >= NEW {
            break;
        }
        let mut syn = f.clone();
        syn.tcp_flags = pnet::packet::tcp::TcpFlags::SYN;
        let to = lb.forward(&syn);
        assert_eq!(
            lb.forward(f),
            to,
            "{f:?}: its ACK went elsewhere than its SYN"
        );
        if lb.stats().conn_table_full == full {
            entered.push(f.clone());
        }
    }
    assert_eq!(
        lb.stats().conn_table_full,
        NEW,
        "too few flows were refused"
    );
    let slots = 2 * SMALL_TABLE as usize;
    assert!(
        (slots * 3 / 4..=slots).contains(&(held + entered.len())),
        "a table of {slots} slots refused its {NEW}th flow at {}",
        held + entered.len()
    );
    assert_eq!(
        lb.maps.count_connections_now(),
        held + entered.len(),
        "a refused flow took another's place"
    );
    let old: Vec<&Frame> = sized.iter().chain(&entered).collect();
    let before: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();

    // The table changes: the flows entered stay where they were, which only their
    // entries can do.
    lb.set_backends(key, &if v6 { backends6(6) } else { backends4(6) });
    let after: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
    let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
    assert_eq!(
        moved,
        0,
        "{moved} of {} entered flows changed backend",
        old.len()
    );

    // Slots freed (the sweeper's work): a new flow is entered at once; a refusal
    // (both of one flow's sets full) holds off no other flow.
    lb.maps.clear_connections().unwrap();
    let fresh = Frame::tcp(client, vip, 50000, 80).established();
    lb.forward(&fresh);
    assert!(
        lb.maps.connection(&flow_key(&fresh)).is_some(),
        "a new flow was not entered right after the table emptied"
    );
}

#[test]
fn each_connection_table_draws_its_own_hash_key_and_a_reload_keeps_it() {
    // Where a flow may live is keyed: flows picked to crowd one set of one table
    // are spread over another's. Two tables made apart have different keys...
    let (pins, options) = pinned("seed");
    let apart = LoadOptions {
        pin_dir: None,
        ..options.clone()
    };
    let (_a, first) = Programs::load(&apart).expect("load");
    let (_b, second) = Programs::load(&apart).expect("load");
    let (first, second) = (first.conn_sets_seeds(), second.conn_sets_seeds());
    assert_ne!(first.0, second.0, "two IPv4 tables drew one key");
    assert_ne!(first.1, second.1, "two IPv6 tables drew one key");
    assert_ne!(first.0, first.1, "a load's two tables drew one key");
    // ...and a load on a pinned table takes the key it was filled with.
    let (dp, maps) = Programs::load(&options).expect("first load");
    let seed = maps.conn_sets_seeds();
    drop((dp, maps));
    let (dp, maps) = Programs::load(&options).expect("load on the pins");
    assert_eq!(maps.conn_sets_seeds(), seed, "the reload drew another key");
    drop(maps);
    dp.unpin_maps().unwrap();
    drop(pins);
}

/// The connection-table key of a frame (as the program builds it).
fn flow_key(f: &Frame) -> lb_common::FlowKey {
    let (src, family) = lb_userspace::dataplane::layout::addr_bytes(f.src);
    let (dst, _) = lb_userspace::dataplane::layout::addr_bytes(f.dst);
    lb_common::FlowKey {
        src,
        dst,
        sport_be: f.sport.to_be(),
        dport_be: f.dport.to_be(),
        proto: match f.l4 {
            L4::Udp => lb_common::PROTO_UDP,
            _ => lb_common::PROTO_TCP,
        },
        family,
        _pad: [0; 2],
    }
}

#[test]
fn idle_flows_are_swept_by_their_protocols_timeout_and_live_ones_kept() {
    assert!(is_root(), "the data-plane tests must run as root");
    let mut lb = load_lb_with(LoadOptions {
        max_services: 8,
        conn_table_size: 1 << 12,
        tcp_idle_timeout_s: 900,
        udp_idle_timeout_s: 60,
        ..LoadOptions::default()
    });
    lb.add(service(VIP4, 80, Proto::Tcp), &backends4(3));
    lb.add(service(VIP4, 53, Proto::Udp), &backends4(3));
    let tcp = Frame::tcp(CLIENT4, VIP4, 40000, 80).established();
    let udp = Frame::udp(CLIENT4, VIP4, 40001, 53);
    let (tcp_to, udp_to) = (lb.forward(&tcp), lb.forward(&udp));
    let hz = lb_userspace::dataplane::maps::sweep::hz();
    let entered = |lb: &Lb, f: &Frame| lb.maps.connection(&flow_key(f));
    let stamped = entered(&lb, &tcp).expect("the ACK entered its flow").seen;
    let now = stamped;
    assert!(
        entered(&lb, &udp).is_some(),
        "the datagram entered its flow"
    );

    // A sweep before either timeout keeps both.
    let swept = lb.maps.sweep_connections_at(now + 10).unwrap();
    assert_eq!((swept.kept, swept.expired), (2, 0));
    // 60 s idle: the UDP flow goes, the TCP one (900 s) stays.
    let udp_ticks = lb_common::idle::ticks_of(60, hz);
    let swept = lb
        .maps
        .sweep_connections_at(stamped + udp_ticks + 2)
        .unwrap();
    assert_eq!((swept.kept, swept.expired), (1, 1));
    assert!(entered(&lb, &udp).is_none(), "the idle UDP flow was kept");
    assert!(
        entered(&lb, &tcp).is_some(),
        "the TCP flow was swept before its timeout"
    );
    // An idle flow that comes back is steered by the table and entered again.
    assert_eq!(lb.forward(&udp), udp_to);
    assert!(entered(&lb, &udp).is_some());

    // A packet of a flow refreshes its stamp: an entry written as seen long ago,
    // then one packet, and the sweep after its timeout keeps it.
    let key = flow_key(&tcp);
    let mut old = entered(&lb, &tcp).unwrap();
    old.seen = now - 5_000;
    lb.maps.set_connection(key, old).unwrap();
    assert_eq!(lb.forward(&tcp), tcp_to);
    let seen = entered(&lb, &tcp).unwrap().seen;
    assert!(
        seen.wrapping_sub(stamped) < 3,
        "the packet did not refresh its entry: {seen}, first stamped {stamped}"
    );
    let tcp_ticks = lb_common::idle::ticks_of(900, hz);
    lb.maps.sweep_connections_at(now + tcp_ticks - 2).unwrap();
    assert!(
        entered(&lb, &tcp).is_some(),
        "a flow seen just now was swept"
    );
    // Without packets it goes once its timeout has passed.
    lb.maps.sweep_connections_at(seen + tcp_ticks + 1).unwrap();
    assert!(entered(&lb, &tcp).is_none());
    assert_eq!(lb.maps.count_connections_now(), 0);
}

#[test]
fn a_sweep_of_a_large_table_removes_every_idle_entry_once() {
    // Removals during a walk must not restart it or skip entries: half of 20,000
    // flows stamped long ago, half now.
    const FLOWS: u32 = 20_000;
    assert!(is_root(), "the data-plane tests must run as root");
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    lb.add(key, &backends4(3));
    let all = flows(FLOWS, 80);
    for f in &all {
        lb.forward(f);
    }
    let now = lb.maps.connection(&flow_key(&all[1])).unwrap().seen;
    for f in all.iter().step_by(2) {
        let k = flow_key(f);
        let mut e = lb.maps.connection(&k).unwrap();
        e.seen = now - 10_000;
        lb.maps.set_connection(k, e).unwrap();
    }
    let swept = lb.maps.sweep_connections_at(now).unwrap();
    assert_eq!(
        (swept.kept, swept.expired),
        (FLOWS as u64 / 2, FLOWS as u64 / 2)
    );
    assert_eq!(lb.maps.count_connections_now(), FLOWS as usize / 2);
    for (i, f) in all.iter().enumerate() {
        assert_eq!(
            lb.maps.connection(&flow_key(f)).is_some(),
            i % 2 == 1,
            "flow {i}"
        );
    }
}

/// Established IPv6 flows that differ only in their source address's last bytes
/// (an IPv4 flow's key keeps 4 bytes of each address; an IPv6 flow's must keep 16).
fn flows6(n: u32, first: u32) -> Vec<Frame> {
    (first..first + n)
        .map(|i| {
            let src = format!("2001:db8:1::{:x}:{:x}", i >> 16, i & 0xffff);
            Frame::new(
                src.parse().unwrap(),
                VIP6.parse().unwrap(),
                L4::Tcp,
                40000,
                80,
            )
            .established()
        })
        .collect()
}

#[test]
fn ipv4_and_ipv6_flows_are_each_entered_whole_and_kept_swept_and_refused_apart() {
    assert!(is_root(), "the data-plane tests must run as root");
    let mut lb = load_lb_with(LoadOptions {
        max_services: 8,
        conn_table_size: SMALL_TABLE,
        ..LoadOptions::default()
    });
    let (k4, k6) = (service(VIP4, 80, Proto::Tcp), service(VIP6, 80, Proto::Tcp));
    lb.add(k4, &backends4(3));
    lb.add(k6, &backends6(3));
    let v4 = flows(1000, 80);
    let v6 = flows6(1000, 1);
    let before4: Vec<u8> = v4.iter().map(|f| lb.forward(f)).collect();
    let before6: Vec<u8> = v6.iter().map(|f| lb.forward(f)).collect();
    assert_eq!(
        lb.maps.count_connections_now(),
        2000,
        "every flow of both families has an entry of its own"
    );
    for f in v4.iter().chain(&v6) {
        assert!(
            lb.maps.connection(&flow_key(f)).is_some(),
            "{f:?} not entered"
        );
    }

    // Their tables change: every flow of both families stays where it was, which only
    // its entry can do.
    lb.set_backends(k4, &backends4(6));
    lb.set_backends(k6, &backends6(6));
    let hits = lb.stats().lru_hit;
    let after4: Vec<u8> = v4.iter().map(|f| lb.forward(f)).collect();
    let after6: Vec<u8> = v6.iter().map(|f| lb.forward(f)).collect();
    assert_eq!(after4, before4, "an IPv4 flow changed backend");
    assert_eq!(after6, before6, "an IPv6 flow changed backend");
    assert_eq!(lb.stats().lru_hit - hits, 2000);

    // Idle IPv6 flows are swept as IPv4 ones are: half of each stamped long ago.
    let now = lb.maps.connection(&flow_key(&v6[0])).unwrap().seen;
    for f in v4.iter().chain(&v6).step_by(2) {
        let k = flow_key(f);
        let mut e = lb.maps.connection(&k).unwrap();
        e.seen = now - 10_000;
        lb.maps.set_connection(k, e).unwrap();
    }
    let swept = lb.maps.sweep_connections_at(now).unwrap();
    assert_eq!((swept.kept, swept.expired), (1000, 1000));
    for (i, f) in v4.iter().chain(&v6).enumerate() {
        assert_eq!(
            lb.maps.connection(&flow_key(f)).is_some(),
            i % 2 == 1,
            "flow {i} ({f:?})"
        );
    }

    // The IPv6 table full (the swept flows back, then new ones until 100 were
    // refused): the refused flows are counted, no IPv4 flow lost its entry, and
    // the IPv4 table, which is not full, still enters its new flows.
    for f in v4.iter().chain(&v6) {
        lb.forward(f);
    }
    let more6 = flows6(4 * SMALL_TABLE, 1001);
    let mut more = more6.iter();
    while lb.stats().conn_table_full < 100 {
        lb.forward(more.next().expect("the IPv6 table refused no flow"));
    }
    assert_eq!(lb.stats().conn_table_full, 100);
    for f in &v4 {
        assert!(
            lb.maps.connection(&flow_key(f)).is_some(),
            "{f:?} lost its entry"
        );
    }
    let new4 = Frame::tcp(CLIENT4, VIP4, 50000, 80).established();
    lb.forward(&new4);
    assert!(
        lb.maps.connection(&flow_key(&new4)).is_some(),
        "the IPv4 flow was not entered while the IPv6 table was full"
    );
}

#[test]
fn a_removed_backend_gets_no_packet_even_from_its_old_flows() {
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    lb.add(key, &backends4(3));
    let old = flows(3000, 80);
    let before: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
    let on_removed = before.iter().filter(|&&b| b == 3).count() as u64;
    assert!(on_removed > 0);

    lb.set_backends(key, &backends4(2));
    let hits_before = lb.stats().lru_hit;
    let after: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
    for (b, a) in before.iter().zip(&after) {
        assert_ne!(*a, 3, "a packet went to the removed backend");
        if *b != 3 {
            assert_eq!(a, b, "a flow of a remaining backend moved");
        }
    }
    let stats = lb.stats();
    assert_eq!(stats.lru_stale, on_removed);
    assert_eq!(stats.lru_hit - hits_before, 3000 - on_removed);

    // Its id may be reused by the next backend; the old flows still must not follow it.
    lb.set_backends(
        key,
        &[backends4(2), vec![backend("198.18.0.9", 9, 1)]].concat(),
    );
    let again: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
    assert_eq!(
        again, after,
        "re-steered flows moved again when a backend was added"
    );
}

#[test]
fn a_port_less_service_catches_every_port_of_its_address() {
    let mut lb = load_lb();
    lb.add(service(VIP4, 0, Proto::Tcp), &backends4(1));
    lb.add(
        service(VIP4, 443, Proto::Tcp),
        &[backend("198.18.0.2", 2, 1)],
    );
    assert_eq!(lb.forward(&Frame::tcp(CLIENT4, VIP4, 5000, 8080)), 1);
    assert_eq!(lb.forward(&Frame::tcp(CLIENT4, VIP4, 5000, 443)), 2);
    // The fallback is per protocol.
    let (verdict, _) = lb.run(&Frame::udp(CLIENT4, VIP4, 5000, 8080).build());
    assert_eq!(verdict, XDP_PASS);
    assert_eq!(lb.stats().pass_no_service, 1);
}

/// Asserts the frame comes back unmodified with `verdict` and bumps exactly one global
/// counter, the one `counter` names.
fn assert_untouched(lb: &Lb, input: &[u8], verdict: u32, counter: &str) {
    assert_untouched_counting(lb, input, verdict, &[counter])
}

/// As `assert_untouched`, for a packet that also passes counted stages on the way.
fn assert_untouched_counting(lb: &Lb, input: &[u8], verdict: u32, counters: &[&str]) {
    let counter = counters[0];
    let before = lb.stats();
    let (got, out) = lb.run(input);
    assert_eq!(got, verdict, "verdict for the `{counter}` case");
    assert_eq!(out, input, "frame modified in the `{counter}` case");
    let after = lb.stats();
    for ((name, b), a) in GlobalStats::FIELDS
        .iter()
        .zip(before.values())
        .zip(after.values())
    {
        let expected = if counters.contains(name) { b + 1 } else { b };
        assert_eq!(a, expected, "counter {name} in the `{counter}` case");
    }
}

#[test]
fn traffic_not_for_a_service_passes_unchanged() {
    let mut lb = load_lb();
    lb.add(service(VIP4, 80, Proto::Tcp), &backends4(1));
    lb.add(service(VIP6, 80, Proto::Tcp), &backends6(1));
    // Another address.
    assert_untouched(
        &lb,
        &Frame::tcp(CLIENT4, "198.18.0.200", 1, 80).build(),
        XDP_PASS,
        "pass_not_vip",
    );
    assert_untouched(
        &lb,
        &Frame::tcp(CLIENT6, "2001:db8::200", 1, 80).build(),
        XDP_PASS,
        "pass_not_vip",
    );
    // The VIP, another port.
    assert_untouched(
        &lb,
        &Frame::tcp(CLIENT4, VIP4, 1, 22).build(),
        XDP_PASS,
        "pass_no_service",
    );
    // The VIP, another protocol.
    assert_untouched(
        &lb,
        &Frame::udp(CLIENT6, VIP6, 1, 80).build(),
        XDP_PASS,
        "pass_no_service",
    );
    // ICMP to the VIP is the node's own (ping, PMTU errors).
    let mut icmp = Frame::tcp(CLIENT4, VIP4, 0, 0);
    icmp.l4 = L4::Other(1);
    icmp.payload = vec![8, 0, 0, 0, 0, 1, 0, 1];
    assert_untouched(&lb, &icmp.build(), XDP_PASS, "pass_not_l4");
    // ARP and other ethertypes.
    let mut arp = Frame::tcp(CLIENT4, VIP4, 1, 80).build();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_untouched(&lb, &arp, XDP_PASS, "pass_not_ip");
    let mut vlan = Frame::tcp(CLIENT4, VIP4, 1, 80).build();
    vlan[12..14].copy_from_slice(&0x8100u16.to_be_bytes());
    assert_untouched(&lb, &vlan, XDP_PASS, "pass_not_ip");
}

#[test]
fn malformed_frames_to_a_vip_are_never_forwarded_or_modified() {
    let mut lb = load_lb();
    lb.add(service(VIP4, 80, Proto::Tcp), &backends4(1));
    lb.add(service(VIP4, 53, Proto::Udp), &backends4(1));
    lb.add(service(VIP6, 80, Proto::Tcp), &backends6(1));
    let tcp4 = Frame::tcp(CLIENT4, VIP4, 1000, 80).build();
    let udp4 = Frame::udp(CLIENT4, VIP4, 1000, 53).build();
    let tcp6 = Frame::tcp(CLIENT6, VIP6, 1000, 80).build();

    // Only an Ethernet header, or a cut IP header: not parseable, the kernel's to drop.
    assert_untouched(&lb, &tcp4[..ETH_LEN], XDP_PASS, "pass_unparsed");
    assert_untouched(&lb, &tcp4[..ETH_LEN + 12], XDP_PASS, "pass_unparsed");
    assert_untouched(&lb, &tcp6[..ETH_LEN + 30], XDP_PASS, "pass_unparsed");

    // IP header complete, L4 cut off: the IP total length lies.
    assert_untouched(
        &lb,
        &tcp4[..ETH_LEN + IPV4_LEN + 10],
        XDP_DROP,
        "drop_malformed",
    );
    assert_untouched(&lb, &tcp6[..ETH_LEN + 40 + 10], XDP_DROP, "drop_malformed");
    // Total length larger than the frame.
    let mut long = tcp4.clone();
    long[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&2000u16.to_be_bytes());
    assert_untouched(&lb, &long, XDP_DROP, "drop_malformed");
    // Total length shorter than the IP header.
    let mut short = tcp4.clone();
    short[ETH_LEN + 2..ETH_LEN + 4].copy_from_slice(&10u16.to_be_bytes());
    assert_untouched(&lb, &short, XDP_DROP, "drop_malformed");
    // Header length field below 20 bytes.
    let mut ihl = tcp4.clone();
    ihl[ETH_LEN] = 0x44;
    assert_untouched(&lb, &ihl, XDP_DROP, "drop_malformed");
    // Wrong IP version in an IPv4 frame.
    let mut version = tcp4.clone();
    version[ETH_LEN] = 0x65;
    assert_untouched(&lb, &version, XDP_DROP, "drop_malformed");
    // TCP data offset below 5 words, and beyond the packet.
    let mut doff = tcp4.clone();
    doff[ETH_LEN + IPV4_LEN + 12] = 0x40;
    assert_untouched(&lb, &doff, XDP_DROP, "drop_malformed");
    let mut doff = tcp4.clone();
    doff[ETH_LEN + IPV4_LEN + 12] = 0xf0;
    assert_untouched(&lb, &doff, XDP_DROP, "drop_malformed");
    // UDP length beyond the IP packet, and below its own header.
    let mut ulen = udp4.clone();
    ulen[ETH_LEN + IPV4_LEN + 4..ETH_LEN + IPV4_LEN + 6].copy_from_slice(&500u16.to_be_bytes());
    assert_untouched(&lb, &ulen, XDP_DROP, "drop_malformed");
    let mut ulen = udp4.clone();
    ulen[ETH_LEN + IPV4_LEN + 4..ETH_LEN + IPV4_LEN + 6].copy_from_slice(&4u16.to_be_bytes());
    assert_untouched(&lb, &ulen, XDP_DROP, "drop_malformed");
    // IPv6 payload length beyond the frame.
    let mut plen = tcp6.clone();
    plen[ETH_LEN + 4..ETH_LEN + 6].copy_from_slice(&3000u16.to_be_bytes());
    assert_untouched(&lb, &plen, XDP_DROP, "drop_malformed");

    // Trailing bytes after the IP packet (Ethernet padding) are fine.
    let mut padded = tcp4.clone();
    padded.extend_from_slice(&[0; 6]);
    assert_eq!(lb.run(&padded).0, XDP_TX);
}

#[test]
fn fragments_and_ip_options_are_dropped_by_default_and_passed_when_configured() {
    let mut lb = load_lb();
    let strict = service(VIP4, 80, Proto::Tcp);
    lb.add(strict, &backends4(1));
    lb.add(service(VIP6, 80, Proto::Tcp), &backends6(1));

    let mut more_fragments = Frame::tcp(CLIENT4, VIP4, 1000, 80);
    more_fragments.ipv4_frag = 0x2000;
    let mut later_fragment = Frame::tcp(CLIENT4, VIP4, 1000, 80);
    later_fragment.ipv4_frag = 185; // offset 1480 bytes, last fragment
    let mut options = Frame::tcp(CLIENT4, VIP4, 1000, 80);
    options.ipv4_options = vec![1, 1, 1, 0]; // NOP NOP NOP END
    let mut v6_fragment = Frame::tcp(CLIENT6, VIP6, 1000, 80);
    v6_fragment.ipv6_ext = Some(44);
    let mut v6_hop_by_hop = Frame::tcp(CLIENT6, VIP6, 1000, 80);
    v6_hop_by_hop.ipv6_ext = Some(0);
    let mut v6_dest_opts = Frame::tcp(CLIENT6, VIP6, 1000, 80);
    v6_dest_opts.ipv6_ext = Some(60);

    assert_untouched(&lb, &more_fragments.build(), XDP_DROP, "drop_fragment");
    assert_untouched(&lb, &later_fragment.build(), XDP_DROP, "drop_fragment");
    assert_untouched(&lb, &options.build(), XDP_DROP, "drop_ip_options");
    assert_untouched(&lb, &v6_fragment.build(), XDP_DROP, "drop_fragment");
    assert_untouched(&lb, &v6_hop_by_hop.build(), XDP_DROP, "drop_ip_options");
    assert_untouched(&lb, &v6_dest_opts.build(), XDP_DROP, "drop_ip_options");

    // Not ours: the same oddities to another address are the kernel's business.
    let mut foreign = more_fragments.clone();
    foreign.dst = "198.18.0.200".parse().unwrap();
    assert_untouched(&lb, &foreign.build(), XDP_PASS, "pass_not_vip");

    // A service that asks for them gets them passed to its node's stack.
    let config = ServiceConfig {
        pass_irregular: true,
        ..ServiceConfig::default()
    };
    lb.set_config(strict, config);
    assert_untouched(&lb, &more_fragments.build(), XDP_PASS, "pass_irregular");
    assert_untouched(&lb, &options.build(), XDP_PASS, "pass_irregular");
    // The flag is the service's: the IPv6 one still drops.
    assert_untouched(&lb, &v6_fragment.build(), XDP_DROP, "drop_fragment");
    // And back.
    lb.set_config(strict, ServiceConfig::default());
    assert_untouched(&lb, &options.build(), XDP_DROP, "drop_ip_options");
}

#[test]
fn a_service_without_backends_drops_and_counts() {
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    lb.set_config(key, ServiceConfig::default());
    // The connection table is asked first (a miss), then the empty service drops.
    assert_untouched_counting(
        &lb,
        &Frame::tcp(CLIENT4, VIP4, 1, 80).build(),
        XDP_DROP,
        &["drop_no_backend", "lru_miss"],
    );
    lb.set_backends(key, &backends4(1));
    assert_eq!(lb.forward(&Frame::tcp(CLIENT4, VIP4, 1, 80)), 1);
    lb.set_backends(key, &[]);
    assert_eq!(
        lb.run(&Frame::tcp(CLIENT4, VIP4, 1, 80).build()).0,
        XDP_DROP
    );
    // Removing the service makes its address foreign again.
    lb.remove(key);
    assert_untouched(
        &lb,
        &Frame::tcp(CLIENT4, VIP4, 1, 80).build(),
        XDP_PASS,
        "pass_not_vip",
    );
}

#[test]
fn a_backend_behind_another_interface_is_reached_by_redirect() {
    let mut lb = load_lb();
    let mut b = backend("198.18.0.1", 1, 1);
    b.route.egress = Egress::Interface { ifindex: 1 }; // lo: any existing interface will do
    lb.add(service(VIP4, 80, Proto::Tcp), &[b]);
    let input = Frame::tcp(CLIENT4, VIP4, 1000, 80).build();
    let (verdict, out) = lb.run(&input);
    assert_eq!(verdict, XDP_REDIRECT);
    assert_eq!(macs(&out), (backend_mac(1), LB_MAC));
    assert_eq!(lb.stats().redirect, 1);
}

#[test]
fn service_and_backend_counters_count_packets_and_bytes() {
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    lb.add(key, &backends4(2));
    let frames = flows(100, 80);
    let len = frames[0].build().len() as u64;
    for f in &frames {
        lb.forward(f);
    }
    let counters = lb.maps.counters(key).unwrap();
    let svc = counters.service;
    assert_eq!((svc.packets, svc.bytes), (100, 100 * len));
    let per: Vec<_> = ["198.18.0.1", "198.18.0.2"]
        .iter()
        .map(|a| counters.backends[&a.parse::<IpAddr>().unwrap()])
        .collect();
    assert_eq!(per[0].packets + per[1].packets, 100);
    assert!(per[0].packets > 0 && per[1].packets > 0);
    assert_eq!(per[0].bytes + per[1].bytes, 100 * len);

    // Read in batches for many services at once: the same figures.
    let other = service(VIP4, 81, Proto::Tcp);
    lb.add(other, &backends4(3));
    for f in flows(30, 81) {
        lb.forward(&f);
    }
    let all = lb.maps.counters_of(&mut [key, other].into_iter());
    assert_eq!(all[&key], lb.maps.counters(key).unwrap());
    assert_eq!(all[&other], lb.maps.counters(other).unwrap());
    assert_eq!(all[&other].service.packets, 30);
}

#[test]
fn the_baseline_program_swaps_macs() {
    let lb = load_lb();
    let input = Frame::tcp(CLIENT4, VIP4, 1, 80).build();
    let (verdict, out) = lb.run_prog(Program::SwapMacs, &input);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(macs(&out), (CLIENT_MAC, LB_MAC));
}

/// A pin directory of the test's own, removed when dropped (even by a failing test).
struct PinDir(std::path::PathBuf);

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Load options that pin a small balancer's maps in a directory named for the test
/// (`name`), for a second load to take over as a restarted daemon does.
fn pinned(name: &str) -> (PinDir, LoadOptions) {
    let dir = std::path::PathBuf::from(format!("/sys/fs/bpf/lbtest-{}-{name}", std::process::id()));
    assert!(is_root(), "must run as root");
    pin_to_cpu0();
    let options = LoadOptions {
        max_services: 8,
        conn_table_size: 1 << 15,
        pin_dir: Some(dir.clone()),
        ..LoadOptions::default()
    };
    (PinDir(dir), options)
}

#[test]
fn a_reload_on_pinned_maps_carries_on_where_the_last_run_stopped() {
    let (_pins, options) = pinned("restore");
    let key = service(VIP4, 80, Proto::Tcp);
    let old = flows(2000, 80);

    let (before, given, contents) = {
        let (dp, maps) = Programs::load(&options).expect("first load");
        let mut lb = Lb::new(dp, maps);
        lb.add(key, &backends4(3));
        for f in &old {
            lb.forward(f);
        }
        // One more change, so the live table sits in the second slot.
        lb.set_backends(key, &backends4(2));
        let before: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
        let contents = lb.maps.read_back(key).unwrap();
        (before, lb.given.clone(), contents)
    };

    let (dp, mut maps) = Programs::load(&options).expect("second load on the pinned maps");
    assert_eq!(maps.restore().unwrap(), 0, "nothing was left over");
    assert_eq!(
        maps.services(),
        vec![key],
        "the service is taken from the maps"
    );
    let mut lb = Lb::new(dp, maps);
    lb.given = given;
    // The same plan again: nothing differs, the maps are as they were.
    lb.write(key);
    assert_eq!(lb.maps.read_back(key).unwrap(), contents);
    let hits = lb.stats().lru_hit;
    let after: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
    assert_eq!(after, before, "flows changed backend across the reload");
    assert_eq!(
        lb.stats().lru_hit - hits,
        2000,
        "the connection table did not survive"
    );

    // Changes after the reload write the spare slot, not the live one, and keep flows.
    lb.set_backends(key, &backends4(4)[..]);
    let again: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
    assert_eq!(again, before);
    let mut fresh = 0;
    for f in flows(4000, 80)[2000..].iter() {
        if lb.forward(f) >= 3 {
            fresh += 1;
        }
    }
    assert!(
        fresh > 500,
        "only {fresh} new flows reached backends 3 and 4"
    );
    lb.dp.unpin_maps().unwrap();
}

#[test]
fn an_older_builds_connection_table_is_unpinned_when_this_build_loads() {
    // Older builds kept both families in one table, pinned as `CONNS`, then IPv4
    // flows in a hash of 16-byte keys, `CONNS_V4`: left pinned, their memory (up to
    // 1.7 GB) would stay taken for good.
    let (pins, options) = pinned("retired");
    std::fs::create_dir_all(&pins.0).unwrap();
    let retired = lb_common::map_names::CONNS_RETIRED;
    for (name, key) in retired.iter().zip(["40", "16"]) {
        let old = pins.0.join(name);
        let made = std::process::Command::new("bpftool")
            .args(["map", "create"])
            .arg(&old)
            .args(["type", "hash", "key", key, "value", "16", "entries", "1024"])
            .args(["name", name])
            .status()
            .expect("running bpftool (scripts/install-toolchain.sh installs it)");
        assert!(
            made.success() && old.exists(),
            "bpftool made no pinned {name}"
        );
    }
    let (dp, _maps) = Programs::load(&options).expect("load beside an older build's pins");
    for name in retired {
        assert!(
            !pins.0.join(name).exists(),
            "the older build's connection table {name} is still pinned"
        );
    }
    for name in lb_common::map_names::ALL {
        assert!(pins.0.join(name).exists(), "{name} is not pinned");
    }
    dp.unpin_maps().unwrap();
}

#[test]
fn a_flow_that_moves_to_another_cpu_keeps_its_backend() {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(cpus >= 2, "this test needs two CPUs to move a flow between");
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    lb.add(key, &backends4(3));
    let old = flows(2000, 80);
    let before: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
    // The backend set changes, so the table alone would move about a quarter of them.
    lb.set_backends(key, &backends4(4));
    let misses = lb.stats().lru_miss;
    let mut cpu1 = nix::sched::CpuSet::new();
    cpu1.set(1).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu1).unwrap();
    let after: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
    assert_eq!(
        after, before,
        "flows changed backend when they moved to CPU 1"
    );
    // One table for every CPU: CPU 1 found each flow in it.
    assert_eq!(lb.stats().lru_miss, misses);
}

#[test]
fn in_a_cluster_only_owned_vips_are_balanced() {
    let mut lb = load_lb();
    lb.add(service(VIP4, 80, Proto::Tcp), &backends4(2));
    let frame = Frame::tcp(CLIENT4, VIP4, 1000, 80).build();
    lb.maps.set_served(Some(Default::default())).unwrap();
    assert_untouched(&lb, &frame, XDP_PASS, "pass_not_vip");
    lb.maps
        .set_served(Some([VIP4.parse().unwrap()].into()))
        .unwrap();
    assert_eq!(lb.run(&frame).0, XDP_TX);
    lb.maps.set_served(Some(Default::default())).unwrap();
    assert_untouched(&lb, &frame, XDP_PASS, "pass_not_vip");
}

/// Two addresses in 198.18.0.0/16 whose `VIP_FILTER` bits are the same.
fn colliding_addresses() -> (std::net::Ipv4Addr, std::net::Ipv4Addr) {
    use lb_common::hash::vip_filter_bit;
    let mut seen = std::collections::HashMap::new();
    for n in 1..=u16::MAX {
        let a = std::net::Ipv4Addr::new(198, 18, (n >> 8) as u8, n as u8);
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&a.octets());
        if let Some(first) = seen.insert(vip_filter_bit(&b, lb_common::FAMILY_V4), a) {
            return (first, a);
        }
    }
    panic!("no two addresses of 198.18.0.0/16 share a filter bit");
}

#[test]
fn an_address_this_node_does_not_serve_is_passed_whatever_filter_bit_it_shares() {
    // The filter is only a first look: an address that shares its bit with a served
    // one must be passed as any unserved address is, new flows and flows entered
    // while it was served alike.
    let (served, other) = colliding_addresses();
    let mut lb = load_lb();
    let (ka, kb) = (
        service(&served.to_string(), 80, Proto::Tcp),
        service(&other.to_string(), 80, Proto::Tcp),
    );
    lb.add(ka, &backends4(2));
    lb.add(kb, &backends4(2));
    let to = |addr: std::net::Ipv4Addr, port: u16| {
        Frame::tcp(CLIENT4, &addr.to_string(), port, 80).established()
    };
    // Entered while both are served.
    let old_b = lb.forward(&to(other, 1000));
    lb.forward(&to(served, 1000));

    lb.maps
        .set_served(Some([IpAddr::V4(served)].into()))
        .unwrap();
    assert_untouched(&lb, &to(other, 1001).build(), XDP_PASS, "pass_not_vip");
    assert_untouched(&lb, &to(other, 1000).build(), XDP_PASS, "pass_not_vip");
    let mut syn = to(other, 1002);
    syn.tcp_flags = pnet::packet::tcp::TcpFlags::SYN;
    assert_untouched(&lb, &syn.build(), XDP_PASS, "pass_not_vip");
    lb.forward(&to(served, 1000));
    lb.forward(&to(served, 1001));

    // Served again: its flow is where it was.
    lb.maps
        .set_served(Some([IpAddr::V4(served), IpAddr::V4(other)].into()))
        .unwrap();
    assert_eq!(lb.forward(&to(other, 1000)), old_b);
}

#[test]
fn after_an_epoch_change_old_connections_are_kept_or_resteered_as_the_service_says() {
    for resteer in [false, true] {
        let mut lb = load_lb();
        let key = service(VIP4, 80, Proto::Tcp);
        lb.add(key, &backends4(3));
        let old = flows(2000, 80);
        let before: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
        // The deployment changes (a fourth backend) and the epoch with it.
        let config = ServiceConfig {
            epoch: 1,
            epoch_resteer: resteer,
            ..ServiceConfig::default()
        };
        lb.set_config(key, config);
        lb.set_backends(key, &backends4(4));
        let after: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
        let moved = before.iter().zip(&after).filter(|(b, a)| b != a).count();
        let stats = lb.stats();
        if resteer {
            assert_eq!(
                stats.epoch_resteer, 2000,
                "every old connection re-steered once"
            );
            assert!(
                moved > 2000 / 8,
                "re-steered flows follow the new table: only {moved} moved"
            );
            // Re-steered once: they now belong to the new epoch.
            let again: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
            assert_eq!(again, after);
            assert_eq!(lb.stats().epoch_resteer, 2000);
        } else {
            assert_eq!(moved, 0, "kept connections stay on their backends");
            assert_eq!(stats.epoch_keep, 2000);
            assert_eq!(stats.epoch_resteer, 0);
        }
    }
}

/// What the SPM generator tells `client` under `rule` for these backends.
fn spm_choice(rule: lb_userspace::spm::Rule, backends: &[BackendConfig], client: IpAddr) -> IpAddr {
    use lb_userspace::spm;
    let service = spm::Service {
        spec: spm::ServiceSpec {
            service_id: "web".into(),
            service_version: "1".into(),
        },
        epoch: 0,
        rule,
        instances: backends
            .iter()
            .map(|b| spm::Instance {
                name: format!("i{}", b.route.dst_mac[5]),
                host: spm::ServiceHost {
                    inet_address: b.addr,
                    dns_address: None,
                    port: 80,
                },
                weight: b.weight,
                valid: true,
                provider: "p".into(),
            })
            .collect(),
        command: None,
        valid_from: None,
        valid_until: None,
        redirector: None,
        unavailable: None,
    };
    let c = spm::Client {
        address: Some(client),
        key: None,
    };
    spm::entries_for(&service, &c)[0].host.inet_address
}

#[test]
fn a_source_partitioned_service_sends_even_clients_to_the_first_backend_and_odd_to_the_second() {
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    let bs = backends4(2);
    lb.add(key, &bs);
    lb.set_steering(
        key,
        Steering {
            source_partition: true,
            ..Steering::default()
        },
    );
    for host in 10..60u8 {
        let client = format!("198.18.1.{host}");
        for sport in [1000, 2000, 3000] {
            let got = lb.forward(&Frame::tcp(&client, VIP4, sport, 80));
            assert_eq!(got, if host % 2 == 0 { 1 } else { 2 }, "client {client}");
        }
        // The SPM tells the client the instance its packets reach.
        let told = spm_choice(
            lb_userspace::spm::Rule::Source,
            &bs,
            client.parse().unwrap(),
        );
        assert_eq!(told, bs[(host % 2) as usize].addr, "client {client}");
    }
    // A third instance: the partition follows the modulus over three.
    lb.set_backends(key, &backends4(3));
    for host in 60..90u8 {
        let client: std::net::Ipv4Addr = format!("198.18.1.{host}").parse().unwrap();
        let got = lb.forward(&Frame::tcp(&client.to_string(), VIP4, 4000, 80));
        assert_eq!(got as u32, u32::from(client) % 3 + 1, "client {client}");
    }
}

#[test]
fn a_topology_service_keeps_each_client_subnet_in_its_sphere() {
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    lb.add(key, &backends4(4));
    let sphere = |i: u8| if i <= 2 { "east" } else { "west" };
    let steering = Steering {
        source_partition: false,
        topology: vec![
            ("198.18.1.0".parse().unwrap(), 25, "east".into()),
            ("198.18.1.128".parse().unwrap(), 25, "west".into()),
        ],
        spheres: (1..=4u8)
            .map(|i| {
                (
                    format!("198.18.0.{i}").parse().unwrap(),
                    sphere(i).to_string(),
                )
            })
            .collect(),
    };
    lb.set_steering(key, steering.clone());
    let reached = |lb: &Lb, net: &str, hosts: std::ops::Range<u8>, sport: u16| {
        let mut seen = std::collections::BTreeSet::new();
        for h in hosts {
            for p in 0..4 {
                seen.insert(lb.forward(&Frame::tcp(&format!("{net}.{h}"), VIP4, sport + p, 80)));
            }
        }
        seen
    };
    assert_eq!(reached(&lb, "198.18.1", 1..120, 1000), [1, 2].into());
    assert_eq!(reached(&lb, "198.18.1", 130..250, 1000), [3, 4].into());
    assert_eq!(
        reached(&lb, "198.18.2", 1..120, 1000),
        [1, 2, 3, 4].into(),
        "outside every subnet: the whole service"
    );
    // East loses its instances: its clients go to the whole service, not nowhere.
    let west_only: Vec<BackendConfig> = backends4(4).into_iter().skip(2).collect();
    lb.set_backends(key, &west_only);
    assert_eq!(reached(&lb, "198.18.1", 1..120, 2000), [3, 4].into());
    // Rules off: new flows of either subnet use every backend again.
    lb.set_backends(key, &backends4(4));
    lb.set_steering(key, Steering::default());
    assert_eq!(
        reached(&lb, "198.18.1", 130..250, 3000),
        [1, 2, 3, 4].into()
    );
    // And on again, twice (both ring slots), with stale subnet rules gone each time.
    lb.set_steering(key, steering);
    lb.set_backends(key, &backends4(4));
    assert_eq!(reached(&lb, "198.18.1", 1..120, 4000), [1, 2].into());
    assert_eq!(reached(&lb, "198.18.1", 130..250, 4000), [3, 4].into());
}

fn unavailable(lb: &mut Lb, key: ServiceKey, unavailable: bool) {
    lb.set_config(
        key,
        ServiceConfig {
            unavailable,
            ..ServiceConfig::default()
        },
    );
}

/// An established flow's packet finds its service by its backend (`VIP_STATE`), not
/// by a `VIPS` lookup: whatever the service becomes must reach those packets too.
#[test]
fn established_flows_follow_their_services_availability_epoch_and_removal() {
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    // Another service on the address: after the first is removed, its packets still
    // pass the address filter and must be passed on by the service lookup.
    lb.add(service(VIP4, 443, Proto::Tcp), &backends4(1));
    lb.add(key, &backends4(3));
    let old = flows(300, 80);
    let before: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
    let (id, word) = lb.maps.state_word(key).unwrap();
    assert_ne!(
        word & lb_common::VIP_STATE_LIVE as u64,
        0,
        "no state word written"
    );

    unavailable(&mut lb, key, true);
    let s0 = lb.stats();
    for f in &old {
        assert_eq!(
            lb.run(&f.build()).0,
            XDP_DROP,
            "a packet of an unavailable service was not dropped"
        );
    }
    let s1 = lb.stats();
    assert_eq!(s1.drop_unavailable - s0.drop_unavailable, 300);
    assert_eq!(
        s1.lru_hit, s0.lru_hit,
        "an unavailable service's packet counted as forwarded"
    );

    unavailable(&mut lb, key, false);
    let back: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
    assert_eq!(back, before, "flows moved when their service came back");

    // A new epoch in a service that re-steers its old connections.
    let config = ServiceConfig {
        epoch: 7,
        epoch_resteer: true,
        ..ServiceConfig::default()
    };
    lb.set_config(key, config);
    let s2 = lb.stats();
    for f in &old {
        lb.forward(f);
    }
    assert_eq!(lb.stats().epoch_resteer - s2.epoch_resteer, 300);
    assert_eq!(
        lb.maps.state_word(key).unwrap().1 >> 32,
        7,
        "the word kept the old epoch"
    );

    lb.remove(key);
    let s3 = lb.stats();
    for f in &old {
        assert_untouched(&lb, &f.build(), XDP_PASS, "pass_no_service");
    }
    assert_eq!(lb.stats().lru_hit, s3.lru_hit);
    assert!(lb.maps.state_word(key).is_none());
    assert_eq!(
        lb.maps.state_word_at(id),
        0,
        "the removed service's word still names it"
    );
}

/// A word not written (a crash between it and `VIPS`, an older build's pinned maps)
/// or one that disagrees with `VIPS` before a restore: the packet takes the `VIPS`
/// way, and a restore writes every word again.
#[test]
fn a_service_state_word_left_unwritten_or_stale_is_never_obeyed_after_a_restore() {
    let (_pins, options) = pinned("state-word");
    let key = service(VIP4, 80, Proto::Tcp);
    let old = flows(500, 80);
    let (before, given, id) = {
        let (dp, maps) = Programs::load(&options).expect("first load");
        let mut lb = Lb::new(dp, maps);
        lb.add(key, &backends4(3));
        let before: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
        let (id, _) = lb.maps.state_word(key).unwrap();
        // Unwritten: the flows still reach their backends, by the service lookup.
        lb.maps.set_state_word(id, 0);
        let hits = lb.stats().lru_hit;
        let unwritten: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
        assert_eq!(
            unwritten, before,
            "flows moved when their service's word was 0"
        );
        assert_eq!(lb.stats().lru_hit - hits, 500);
        // Stale: says the service is unavailable, which `VIPS` does not.
        lb.maps.set_state_word(
            id,
            (lb_common::VIP_STATE_LIVE | lb_common::VIP_F_UNAVAILABLE) as u64,
        );
        (before, lb.given.clone(), id)
    };
    let (dp, mut maps) = Programs::load(&options).expect("second load on the pinned maps");
    maps.restore().unwrap();
    let mut lb = Lb::new(dp, maps);
    lb.given = given;
    let (restored_id, word) = lb.maps.state_word(key).unwrap();
    assert_eq!(restored_id, id);
    assert_eq!(
        word as u32 & lb_common::VIP_F_UNAVAILABLE,
        0,
        "the restore kept a stale word"
    );
    let after: Vec<u8> = old.iter().map(|f| lb.forward(f)).collect();
    assert_eq!(after, before, "flows changed backend across the reload");
    lb.dp.unpin_maps().unwrap();
}

#[test]
fn a_syn_to_an_unavailable_service_gets_a_well_formed_rst() {
    use pnet::packet::{
        ethernet::EthernetPacket, ipv4::Ipv4Packet, ipv6::Ipv6Packet, tcp::TcpPacket, Packet,
    };
    let mut lb = load_lb();
    for (vip, client, bs) in [(VIP4, CLIENT4, backends4(2)), (VIP6, CLIENT6, backends6(2))] {
        let key = service(vip, 80, Proto::Tcp);
        lb.add(key, &bs);
        unavailable(&mut lb, key, true);
        let mut syn = Frame::tcp(client, vip, 40000, 80);
        syn.payload = b"early data".to_vec();
        let (verdict, out) = lb.run(&syn.build());
        assert_eq!(verdict, XDP_TX, "{vip}");
        let eth = EthernetPacket::new(&out).unwrap();
        assert_eq!(macs(&out), (CLIENT_MAC, LB_MAC), "back to the client");
        let (tcp_bytes, src, dst) = if vip == VIP4 {
            assert_eq!(out.len(), ETH_LEN + IPV4_LEN + 20);
            let ip = Ipv4Packet::new(eth.payload()).unwrap();
            assert_eq!(ip.get_total_length(), 40);
            assert_eq!(
                ip.get_checksum(),
                pnet::packet::ipv4::checksum(&ip),
                "IP checksum"
            );
            let tcp = TcpPacket::new(ip.payload()).unwrap();
            assert_eq!(
                tcp.get_checksum(),
                pnet::packet::tcp::ipv4_checksum(&tcp, &ip.get_source(), &ip.get_destination()),
                "TCP checksum"
            );
            (
                ip.payload().to_vec(),
                IpAddr::V4(ip.get_source()),
                IpAddr::V4(ip.get_destination()),
            )
        } else {
            assert_eq!(out.len(), ETH_LEN + 40 + 20);
            let ip = Ipv6Packet::new(eth.payload()).unwrap();
            assert_eq!(ip.get_payload_length(), 20);
            let tcp = TcpPacket::new(ip.payload()).unwrap();
            assert_eq!(
                tcp.get_checksum(),
                pnet::packet::tcp::ipv6_checksum(&tcp, &ip.get_source(), &ip.get_destination()),
                "TCP checksum"
            );
            (
                ip.payload().to_vec(),
                IpAddr::V6(ip.get_source()),
                IpAddr::V6(ip.get_destination()),
            )
        };
        assert_eq!((src, dst), (vip.parse().unwrap(), client.parse().unwrap()));
        let tcp = TcpPacket::new(&tcp_bytes).unwrap();
        assert_eq!((tcp.get_source(), tcp.get_destination()), (80, 40000));
        assert_eq!(
            tcp.get_flags(),
            pnet::packet::tcp::TcpFlags::RST | pnet::packet::tcp::TcpFlags::ACK
        );
        assert_eq!(tcp.get_acknowledgement(), 1 + 1 + 10, "seq + SYN + data");
        assert_eq!(tcp.get_sequence(), 0);
        assert_eq!(tcp.get_data_offset(), 5);
    }
    let stats = lb.stats();
    assert_eq!(stats.refuse_rst, 2);
    assert_eq!(stats.tx, 0, "a refusal is not a forward");

    // Anything but a SYN is dropped: a RST must not reset other people's connections.
    let mut ack = Frame::tcp(CLIENT4, VIP4, 40001, 80).build();
    ack[ETH_LEN + IPV4_LEN + 13] = 0x10;
    let (verdict, _) = lb.run(&ack);
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(lb.stats().drop_unavailable, 1);

    // Available again: forwarded as before.
    unavailable(&mut lb, service(VIP4, 80, Proto::Tcp), false);
    lb.forward(&Frame::tcp(CLIENT4, VIP4, 40002, 80));
}

#[test]
fn udp_to_an_unavailable_service_gets_an_icmp_error_quoting_it() {
    use pnet::packet::{
        ethernet::EthernetPacket, icmp::IcmpPacket, icmpv6::Icmpv6Packet, ipv4::Ipv4Packet,
        ipv6::Ipv6Packet, Packet,
    };
    let mut lb = load_lb();
    for (vip, client, bs) in [(VIP4, CLIENT4, backends4(2)), (VIP6, CLIENT6, backends6(2))] {
        let key = service(vip, 53, Proto::Udp);
        lb.add(key, &bs);
        unavailable(&mut lb, key, true);
        let mut f = Frame::udp(client, vip, 5353, 53);
        f.payload = vec![7u8; 100];
        let input = f.build();
        let (verdict, out) = lb.run(&input);
        assert_eq!(verdict, XDP_TX, "{vip}");
        assert_eq!(macs(&out), (CLIENT_MAC, LB_MAC));
        let eth = EthernetPacket::new(&out).unwrap();
        if vip == VIP4 {
            assert_eq!(out.len(), ETH_LEN + 20 + 8 + 28);
            let ip = Ipv4Packet::new(eth.payload()).unwrap();
            assert_eq!(ip.get_checksum(), pnet::packet::ipv4::checksum(&ip));
            assert_eq!(ip.get_source().to_string(), vip);
            assert_eq!(ip.get_destination().to_string(), client);
            assert_eq!(ip.get_total_length() as usize, 20 + 8 + 28);
            let icmp = IcmpPacket::new(ip.payload()).unwrap();
            assert_eq!((icmp.get_icmp_type().0, icmp.get_icmp_code().0), (3, 13));
            assert_eq!(icmp.get_checksum(), pnet::packet::icmp::checksum(&icmp));
            assert_eq!(
                &ip.payload()[8..],
                &input[ETH_LEN..ETH_LEN + 28],
                "quotes the IP header and the UDP header"
            );
        } else {
            assert_eq!(out.len(), ETH_LEN + 40 + 8 + 48);
            let ip = Ipv6Packet::new(eth.payload()).unwrap();
            assert_eq!(ip.get_source().to_string(), vip);
            assert_eq!(ip.get_destination().to_string(), client);
            assert_eq!(ip.get_payload_length(), 56);
            let icmp = Icmpv6Packet::new(ip.payload()).unwrap();
            assert_eq!((icmp.get_icmpv6_type().0, icmp.get_icmpv6_code().0), (1, 1));
            assert_eq!(
                icmp.get_checksum(),
                pnet::packet::icmpv6::checksum(&icmp, &ip.get_source(), &ip.get_destination())
            );
            assert_eq!(&ip.payload()[8..], &input[ETH_LEN..ETH_LEN + 48]);
        }
    }
    assert_eq!(lb.stats().refuse_icmp, 2);
}

#[test]
fn refusals_to_one_source_are_limited() {
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    lb.add(key, &backends4(2));
    unavailable(&mut lb, key, true);
    let mut answered = 0;
    let start = std::time::Instant::now();
    for i in 0..150u16 {
        let (verdict, _) = lb.run(&Frame::tcp(CLIENT4, VIP4, 30000 + i, 80).build());
        answered += (verdict == XDP_TX) as u32;
    }
    let took = start.elapsed();
    let stats = lb.stats();
    // The budget is per one-second window: a burst inside one window gets exactly
    // 100 answers; a machine slow enough to cross windows gets at most 100 per window.
    if took < std::time::Duration::from_secs(1) {
        assert_eq!(answered, 100, "burst of 150 in {took:?}");
    }
    assert!(answered >= 100, "{answered}");
    assert!(
        answered as u64 <= 100 * (took.as_secs() + 1),
        "{answered} answers in {took:?}"
    );
    assert_eq!(stats.refuse_rst as u32, answered);
    assert_eq!(stats.drop_refuse_limited as u32, 150 - answered);
    // Another source has its own budget.
    assert_eq!(
        lb.run(&Frame::tcp("198.18.1.99", VIP4, 1, 80).build()).0,
        XDP_TX
    );
}

/// Issue 13, item 1: a removed backend's (id, generation) must never be handed to
/// another backend, across a restart on the pinned maps, or a connection-table entry
/// of the removed one follows the newcomer, even into another service.
#[test]
fn a_removed_backends_identity_is_never_reissued_after_a_restart() {
    let (_pins, options) = pinned("reissue");
    let s1 = service(VIP4, 80, Proto::Tcp);
    let s2 = service(VIP4, 81, Proto::Tcp);
    let f = Frame::tcp(CLIENT4, VIP4, 40000, 80);
    let given = {
        let (dp, maps) = Programs::load(&options).expect("first load");
        let mut lb = Lb::new(dp, maps);
        // S2's backend first: A then holds the highest generation when it goes.
        lb.add(s2, &[backend("198.18.0.3", 3, 1)]);
        lb.add(s1, &[backend("198.18.0.1", 1, 1)]);
        assert_eq!(lb.forward(&f), 1, "the flow starts on A");
        lb.set_backends(s1, &[]);
        lb.given.clone()
    };
    let (dp, mut maps) = Programs::load(&options).expect("second load on the pinned maps");
    maps.restore().unwrap();
    let mut lb = Lb::new(dp, maps);
    lb.given = given;
    lb.set_backends(
        s2,
        &[backend("198.18.0.3", 3, 1), backend("198.18.0.2", 2, 1)],
    );
    let mut ack = f.build();
    ack[ETH_LEN + IPV4_LEN + 13] = 0x10;
    let (verdict, out) = lb.run(&ack);
    assert_eq!(
        verdict,
        XDP_DROP,
        "the flow of a service without backends was sent to {:02x?}",
        macs(&out).0
    );
    assert_eq!(lb.stats().drop_no_backend, 1);
    lb.dp.unpin_maps().unwrap();
}

/// Issue 13, item 4: a refusal is only ever sent to a unicast source, from a unicast
/// frame, and never to the VIP itself or loopback, multicast, broadcast, unspecified.
#[test]
fn refusals_go_only_to_unicast_sources_from_unicast_frames() {
    let mut lb = load_lb();
    let k4 = service(VIP4, 80, Proto::Tcp);
    let u4 = service(VIP4, 53, Proto::Udp);
    let k6 = service(VIP6, 80, Proto::Tcp);
    let u6 = service(VIP6, 53, Proto::Udp);
    for (k, bs) in [
        (k4, backends4(1)),
        (u4, backends4(1)),
        (k6, backends6(1)),
        (u6, backends6(1)),
    ] {
        lb.add(k, &bs);
        unavailable(&mut lb, k, true);
    }
    let mut bad: Vec<(String, Vec<u8>)> = Vec::new();
    for src in ["255.255.255.255", "224.0.0.1", "0.0.0.0", "127.0.0.1", VIP4] {
        bad.push((
            format!("tcp from {src}"),
            Frame::tcp(src, VIP4, 1000, 80).build(),
        ));
        bad.push((
            format!("udp from {src}"),
            Frame::udp(src, VIP4, 1000, 53).build(),
        ));
    }
    for src in ["ff02::1", "::", "::1", VIP6] {
        bad.push((
            format!("tcp from {src}"),
            Frame::tcp(src, VIP6, 1000, 80).build(),
        ));
        bad.push((
            format!("udp from {src}"),
            Frame::udp(src, VIP6, 1000, 53).build(),
        ));
    }
    for (what, dst_mac) in [
        ("broadcast", [0xff; 6]),
        ("multicast", [0x01, 0x00, 0x5e, 0, 0, 1]),
    ] {
        let mut f = Frame::tcp(CLIENT4, VIP4, 1000, 80);
        f.dst_mac = dst_mac;
        bad.push((format!("tcp to {what} MAC"), f.build()));
        let mut f = Frame::udp(CLIENT6, VIP6, 1000, 53);
        f.dst_mac = dst_mac;
        bad.push((format!("udp to {what} MAC"), f.build()));
    }
    let mut f = Frame::tcp(CLIENT4, VIP4, 1000, 80);
    f.src_mac = [0x01, 0x00, 0x5e, 0, 0, 1];
    bad.push(("tcp from a multicast MAC".into(), f.build()));
    let before = lb.stats();
    for (what, frame) in &bad {
        let (verdict, _) = lb.run(frame);
        assert_eq!(verdict, XDP_DROP, "{what} was answered");
    }
    let after = lb.stats();
    assert_eq!(
        after.refuse_rst + after.refuse_icmp,
        before.refuse_rst + before.refuse_icmp
    );
    assert_eq!(
        after.drop_refuse_invalid - before.drop_refuse_invalid,
        bad.len() as u64,
        "every one of them counted as an invalid refusal"
    );
}

/// Issue 13, item 4: SYN and FIN each take a sequence number (RFC 793), so the RST
/// for a SYN+FIN acknowledges seq + 2.
#[test]
fn the_rst_for_a_syn_fin_acknowledges_both() {
    use pnet::packet::{ethernet::EthernetPacket, ipv4::Ipv4Packet, tcp::TcpPacket, Packet};
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    lb.add(key, &backends4(1));
    unavailable(&mut lb, key, true);
    let mut f = Frame::tcp(CLIENT4, VIP4, 40000, 80);
    f.payload.clear();
    let mut syn_fin = f.build();
    syn_fin[ETH_LEN + IPV4_LEN + 13] = 0x03;
    let (verdict, out) = lb.run(&syn_fin);
    assert_eq!(verdict, XDP_TX);
    let eth = EthernetPacket::new(&out).unwrap();
    let ip = Ipv4Packet::new(eth.payload()).unwrap();
    let tcp = TcpPacket::new(ip.payload()).unwrap();
    assert_eq!(tcp.get_acknowledgement(), 1 + 2, "seq + SYN + FIN");
}

/// Issue 13, item 4: ESP, AH and the experimental next headers are extension headers
/// to a VIP (dropped as IP options, or passed with pass_irregular), not foreign traffic.
#[test]
fn ipv6_esp_ah_and_experimental_next_headers_are_extension_headers() {
    let mut lb = load_lb();
    lb.add(service(VIP6, 80, Proto::Tcp), &backends6(1));
    for nh in [50u8, 51, 253, 254] {
        let mut f = Frame::tcp(CLIENT6, VIP6, 1000, 80);
        f.ipv6_ext = Some(nh);
        let before = lb.stats().drop_ip_options;
        let (verdict, _) = lb.run(&f.build());
        assert_eq!(verdict, XDP_DROP, "next header {nh}");
        assert_eq!(lb.stats().drop_ip_options, before + 1, "next header {nh}");
    }
}

/// An ARP request from the client for `target`.
fn arp_request(target: &str) -> Vec<u8> {
    let target: std::net::Ipv4Addr = target.parse().unwrap();
    let client: std::net::Ipv4Addr = CLIENT4.parse().unwrap();
    let mut f = Vec::new();
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x0806u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&client.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target.octets());
    f
}

/// An ARP reply from the client (op 2) naming `target`.
fn arp_reply(target: &str) -> Vec<u8> {
    let mut f = arp_request(target);
    f[ETH_LEN + 7] = 2;
    f
}

/// An ICMPv6 neighbour solicitation from the client for `target`.
fn neighbour_solicitation(target: &str) -> Vec<u8> {
    let target: std::net::Ipv6Addr = target.parse().unwrap();
    let client: std::net::Ipv6Addr = CLIENT6.parse().unwrap();
    let t = target.octets();
    let solicited: std::net::Ipv6Addr =
        format!("ff02::1:ff{:02x}:{:02x}{:02x}", t[13], t[14], t[15])
            .parse()
            .unwrap();
    let mut f = Vec::new();
    f.extend_from_slice(&[0x33, 0x33, 0xff, t[13], t[14], t[15]]);
    f.extend_from_slice(&CLIENT_MAC);
    f.extend_from_slice(&0x86ddu16.to_be_bytes());
    f.extend_from_slice(&[0x60, 0, 0, 0]);
    f.extend_from_slice(&32u16.to_be_bytes());
    f.extend_from_slice(&[58, 255]);
    f.extend_from_slice(&client.octets());
    f.extend_from_slice(&solicited.octets());
    f.extend_from_slice(&[135, 0, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&t);
    f.extend_from_slice(&[1, 1]);
    f.extend_from_slice(&CLIENT_MAC);
    f
}

#[test]
fn a_stale_daemon_stamp_silences_neighbour_requests_for_served_vips_only() {
    let mut lb = load_lb();
    let mut stamp = lb.dp.stamp().unwrap();
    lb.add(service(VIP4, 80, Proto::Tcp), &backends4(2));
    lb.add(service(VIP6, 80, Proto::Tcp), &backends6(2));
    let served: std::collections::BTreeSet<IpAddr> =
        [VIP4.parse().unwrap(), VIP6.parse().unwrap()].into();
    lb.maps.set_served(Some(served)).unwrap();
    let requests = [
        (arp_request(VIP4), "pass_not_ip"),
        (neighbour_solicitation(VIP6), "pass_not_vip"),
    ];
    let others = [
        (arp_request("198.18.0.200"), "pass_not_ip"),
        (arp_reply(VIP4), "pass_not_ip"),
        (neighbour_solicitation("2001:db8::200"), "pass_not_vip"),
    ];
    // No stamp (not in a cluster): the kernel answers as always.
    for (frame, counter) in requests.iter().chain(&others) {
        assert_untouched(&lb, frame, XDP_PASS, counter);
    }
    // lbd alive: the same.
    stamp.alive_for(std::time::Duration::from_secs(60)).unwrap();
    for (frame, counter) in requests.iter().chain(&others) {
        assert_untouched(&lb, frame, XDP_PASS, counter);
    }
    // lbd's stamp ran out: requests for served VIPs are dropped and counted; other
    // requests, replies, and the VIPs' own traffic go on.
    stamp
        .set(lb_userspace::dataplane::liveness::monotonic_ns() - 1)
        .unwrap();
    for (frame, _) in &requests {
        assert_untouched(&lb, frame, XDP_DROP, "drop_daemon_stale");
    }
    for (frame, counter) in &others {
        assert_untouched(&lb, frame, XDP_PASS, counter);
    }
    assert_eq!(
        lb.run(&Frame::tcp(CLIENT4, VIP4, 1000, 80).build()).0,
        XDP_TX
    );
    // A VIP this node no longer serves is not its business.
    lb.maps
        .set_served(Some([VIP6.parse().unwrap()].into()))
        .unwrap();
    assert_untouched(&lb, &requests[0].0, XDP_PASS, "pass_not_ip");
}

#[test]
fn the_vip_filter_passes_other_addresses_and_never_hides_a_vip() {
    use lb_common::{hash::vip_filter_bit, FAMILY_V4};
    let mut lb = load_lb();
    let key = service(VIP4, 80, Proto::Tcp);
    lb.add(key, &backends4(2));
    let to = |dst: &str| Frame::tcp(CLIENT4, dst, 40000, 80).build();
    assert_eq!(lb.run(&to(VIP4)).0, XDP_TX);
    // An address whose filter bit is the VIP's: the filter lets it through to the
    // table, which says it is not ours.
    let vip_bytes = |a: std::net::Ipv4Addr| {
        let mut b = [0u8; 16];
        b[..4].copy_from_slice(&a.octets());
        b
    };
    let vip: std::net::Ipv4Addr = VIP4.parse().unwrap();
    let twin = (1u32..)
        .map(|i| std::net::Ipv4Addr::from(u32::from(vip) ^ (i << 8)))
        .find(|a| {
            vip_filter_bit(&vip_bytes(*a), FAMILY_V4) == vip_filter_bit(&vip_bytes(vip), FAMILY_V4)
        })
        .unwrap();
    let before = lb.stats().pass_not_vip;
    assert_eq!(
        lb.run(&to(&twin.to_string())).0,
        XDP_PASS,
        "{twin} shares the VIP's bit"
    );
    assert_eq!(lb.run(&to("198.18.0.200")).0, XDP_PASS);
    assert_eq!(
        lb.stats().pass_not_vip,
        before + 2,
        "both counted as not ours"
    );
    // Through the filter, a broken TCP header to the twin is still foreign traffic:
    // passed untouched, never dropped as a malformed packet to a VIP.
    let mut broken = to(&twin.to_string());
    broken[ETH_LEN + IPV4_LEN + 12] = 0x40;
    assert_untouched(&lb, &broken, XDP_PASS, "pass_not_vip");
    let mut broken = to(VIP4);
    broken[ETH_LEN + IPV4_LEN + 12] = 0x40;
    assert_untouched(&lb, &broken, XDP_DROP, "drop_malformed");
    // The service goes: its address is foreign again (its bit cleared), and a new
    // one is ours at once.
    lb.remove(key);
    assert_eq!(lb.run(&to(VIP4)).0, XDP_PASS);
    let other = service("198.18.0.101", 80, Proto::Tcp);
    lb.add(other, &backends4(2));
    assert_eq!(lb.run(&to("198.18.0.101")).0, XDP_TX);
    assert_eq!(lb.run(&to(VIP4)).0, XDP_PASS);
    lb.dp.unpin_maps().unwrap();
}

#[test]
fn the_connection_table_is_counted_apart_and_the_count_follows_the_table() {
    use lb_userspace::dataplane::{ConnCounts, Dataplane};
    let mut lb = load_lb();
    lb.add(service(VIP4, 80, Proto::Tcp), &backends4(2));
    lb.add(service(VIP6, 80, Proto::Tcp), &backends6(2));
    for f in flows(100, 80).iter().chain(&flows6(30, 1)) {
        lb.forward(f);
    }
    // Counted by the manager's own thread (a walk of a large table must not hold
    // up the daemon): it shows within a couple of seconds, without a walk here;
    // by family, as each table is sized on its own.
    let want = ConnCounts {
        ipv4: 100,
        ipv6: 30,
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while lb.maps.conn_counts() != want {
        assert!(
            std::time::Instant::now() < deadline,
            "the count stayed at {:?}",
            lb.maps.conn_counts()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(lb.maps.count_connections_now(), 130);
}

#[test]
fn the_managers_sweeper_removes_flows_idle_beyond_their_timeout() {
    use lb_userspace::dataplane::Dataplane;
    assert!(is_root(), "the data-plane tests must run as root");
    let mut lb = load_lb_with(LoadOptions {
        max_services: 8,
        conn_table_size: 1 << 12,
        udp_idle_timeout_s: 1,
        ..LoadOptions::default()
    });
    lb.add(service(VIP4, 53, Proto::Udp), &backends4(2));
    lb.add(service(VIP4, 80, Proto::Tcp), &backends4(2));
    let tcp = Frame::tcp(CLIENT4, VIP4, 40000, 80).established();
    lb.forward(&tcp);
    for i in 0..50 {
        lb.forward(&Frame::udp(CLIENT4, VIP4, 41000 + i, 53));
    }
    assert_eq!(lb.maps.count_connections_now(), 51);
    // Idle for a second (a tick or two of the connection clock: 256 jiffies), the
    // datagrams' flows go by the manager's own sweeper, and its count follows; the
    // TCP flow (900 s), which goes on sending, stays.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while lb.maps.count_connections_now() != 1 || lb.maps.conn_counts().total() != 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "20 s on, the table holds {} entries (counted {:?})",
            lb.maps.count_connections_now(),
            lb.maps.conn_counts()
        );
        lb.forward(&tcp);
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(lb.maps.connection(&flow_key(&tcp)).is_some());
}
