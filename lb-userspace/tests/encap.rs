//! Encapsulation through `BPF_PROG_TEST_RUN`: the balancer's IPIP and GUE output, byte
//! for byte against headers built independently (pnet), its ICMP "too big" answers,
//! ICMP errors steered to the quoted flow's backend, and the backend side's `lb_decap`
//! taking the balancer's output back to the client's packet. Needs root.

mod support;

use std::net::IpAddr;

use aya::programs::{TestRun, TestRunOptions};
use lb_common::{hash::flow_hash, FlowKey, FAMILY_V4, FAMILY_V6, GUE_SPORT_BASE};
use lb_userspace::{
    dataplane::decap::{Decap, DecapSettings},
    model::{Encap, Forward},
    plan::ServicePlan,
    BackendRoute, Dataplane, Egress, LoadOptions, MapManager, Program, Programs, Proto,
    ServiceConfig, ServiceKey,
};
use pnet::packet::{
    ethernet::{EtherTypes, MutableEthernetPacket},
    ip::IpNextHeaderProtocol,
    ipv4::{self, MutableIpv4Packet},
    ipv6::MutableIpv6Packet,
    udp::{self, MutableUdpPacket},
    util,
};
use support::{Frame, CLIENT_MAC, ETH_LEN, L4, LB_MAC};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;

const VIP4: &str = "198.18.0.100";
const VIP6: &str = "2001:db8::100";
const CLIENT4: &str = "198.18.1.10";
const CLIENT6: &str = "2001:db8:1::10";
/// This node's outer sources.
const SRC4: &str = "198.18.0.2";
const SRC6: &str = "2001:db8::2";
/// Backends in other subnets, behind the gateway.
const REMOTE4: &str = "198.18.5.1";
const REMOTE6: &str = "2001:db8:5::1";
const GW_MAC: [u8; 6] = [0x02, 0x9a, 0, 0, 0, 1];
const GUE_PORT: u16 = 6080;

struct Lb {
    dp: Programs,
    maps: MapManager,
}

fn load_lb() -> Lb {
    let mut set = nix::sched::CpuSet::new();
    set.set(0).unwrap();
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set).unwrap();
    let options = LoadOptions {
        max_services: 8,
        conn_table_size: 1 << 12,
        ..LoadOptions::default()
    };
    let (dp, maps) = Programs::load(&options).expect("loading the XDP object (as root)");
    Lb { dp, maps }
}

fn route(mode: Forward, backend: IpAddr, mtu: u16) -> BackendRoute {
    let source: IpAddr = if backend.is_ipv4() { SRC4 } else { SRC6 }.parse().unwrap();
    BackendRoute {
        dst_mac: GW_MAC,
        src_mac: LB_MAC,
        egress: Egress::Ingress,
        encap: Some(Encap {
            mode,
            source,
            mtu,
            gue_port: GUE_PORT,
        }),
    }
}

impl Lb {
    fn serve(
        &mut self,
        vip: &str,
        proto: Proto,
        mode: Forward,
        backends: &[&str],
        mtu: u16,
    ) -> ServiceKey {
        let key = ServiceKey {
            addr: vip.parse().unwrap(),
            port: if proto == Proto::Tcp { 80 } else { 53 },
            proto,
        };
        let plan = ServicePlan::with_backends(
            ServiceConfig {
                forward: mode,
                ..ServiceConfig::default()
            },
            backends.iter().map(|b| {
                let a: IpAddr = b.parse().unwrap();
                (a, 1, route(mode, a, mtu))
            }),
        );
        self.maps.write_service(key, &plan).unwrap();
        key
    }

    fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        support::test_run(&self.dp, Program::Balancer, frame)
    }
}

/// The flow key the program builds for `f`, to know its hash.
fn key_of(f: &Frame) -> FlowKey {
    let mut k = FlowKey::default();
    match (f.src, f.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            k.src[..4].copy_from_slice(&s.octets());
            k.dst[..4].copy_from_slice(&d.octets());
            k.family = FAMILY_V4;
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            k.src = s.octets();
            k.dst = d.octets();
            k.family = FAMILY_V6;
        }
        _ => unreachable!(),
    }
    k.sport_be = f.sport.to_be();
    k.dport_be = f.dport.to_be();
    k.proto = match f.l4 {
        L4::Tcp => 6,
        L4::Udp => 17,
        L4::Other(p) => p,
    };
    k
}

/// The frame the balancer must send for `inner` (an IP packet) of a flow with `hash`:
/// outer headers built here with pnet from the documented rules.
fn expected(inner: &[u8], mode: Forward, src: IpAddr, dst: IpAddr, hash: u32) -> Vec<u8> {
    let inner_v4 = inner[0] >> 4 == 4;
    let tos = if inner_v4 {
        inner[1]
    } else {
        (inner[0] << 4) | (inner[1] >> 4)
    };
    let gue = mode == Forward::Gue;
    let mut l4 = Vec::new();
    if gue {
        l4 = vec![0u8; 8 + inner.len()];
        let mut u = MutableUdpPacket::new(&mut l4).unwrap();
        u.set_source(GUE_SPORT_BASE | (hash as u16 & 0x3fff));
        u.set_destination(GUE_PORT);
        u.set_length((8 + inner.len()) as u16);
        u.set_payload(inner);
        if let (IpAddr::V6(s), IpAddr::V6(d)) = (src, dst) {
            let sum = udp::ipv6_checksum(&u.to_immutable(), &s, &d);
            u.set_checksum(sum);
        }
    } else {
        l4.extend_from_slice(inner);
    }
    let proto = if gue {
        17
    } else if inner_v4 {
        4
    } else {
        41
    };
    let (ethertype, ip) = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut buf = vec![0u8; 20 + l4.len()];
            let mut ip = MutableIpv4Packet::new(&mut buf).unwrap();
            ip.set_version(4);
            ip.set_header_length(5);
            ip.set_dscp(tos >> 2);
            ip.set_ecn(tos & 3);
            ip.set_total_length((20 + l4.len()) as u16);
            ip.set_flags(2); // DF
            ip.set_ttl(64);
            ip.set_next_level_protocol(IpNextHeaderProtocol(proto));
            ip.set_source(s);
            ip.set_destination(d);
            ip.set_payload(&l4);
            let sum = ipv4::checksum(&ip.to_immutable());
            ip.set_checksum(sum);
            (EtherTypes::Ipv4, buf)
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut buf = vec![0u8; 40 + l4.len()];
            let mut ip = MutableIpv6Packet::new(&mut buf).unwrap();
            ip.set_version(6);
            ip.set_traffic_class(tos);
            ip.set_flow_label(hash & 0xfffff);
            ip.set_payload_length(l4.len() as u16);
            ip.set_next_header(IpNextHeaderProtocol(proto));
            ip.set_hop_limit(64);
            ip.set_source(s);
            ip.set_destination(d);
            ip.set_payload(&l4);
            (EtherTypes::Ipv6, buf)
        }
        _ => unreachable!(),
    };
    let mut frame = vec![0u8; ETH_LEN + ip.len()];
    let mut eth = MutableEthernetPacket::new(&mut frame).unwrap();
    eth.set_destination(GW_MAC.into());
    eth.set_source(LB_MAC.into());
    eth.set_ethertype(ethertype);
    eth.set_payload(&ip);
    frame
}

/// `frame` with its IP header's DSCP/ECN byte set to `tos` (checksum fixed).
fn with_tos(mut frame: Vec<u8>, tos: u8) -> Vec<u8> {
    if frame[ETH_LEN] >> 4 == 4 {
        frame[ETH_LEN + 1] = tos;
        let mut ip = MutableIpv4Packet::new(&mut frame[ETH_LEN..]).unwrap();
        let sum = ipv4::checksum(&ip.to_immutable());
        ip.set_checksum(sum);
    } else {
        MutableIpv6Packet::new(&mut frame[ETH_LEN..])
            .unwrap()
            .set_traffic_class(tos);
    }
    frame
}

#[test]
fn every_family_pair_is_wrapped_in_ipip_and_gue_byte_for_byte() {
    let mut lb = load_lb();
    let cases = [
        (VIP4, CLIENT4, REMOTE4, Forward::Ipip),
        (VIP4, CLIENT4, REMOTE4, Forward::Gue),
        (VIP6, CLIENT6, REMOTE6, Forward::Ipip),
        (VIP6, CLIENT6, REMOTE6, Forward::Gue),
        // The mixed cases: the outer header is the backend's family.
        (VIP4, CLIENT4, REMOTE6, Forward::Ipip),
        (VIP4, CLIENT4, REMOTE6, Forward::Gue),
        (VIP6, CLIENT6, REMOTE4, Forward::Ipip),
        (VIP6, CLIENT6, REMOTE4, Forward::Gue),
    ];
    for (vip, client, backend, mode) in cases {
        for proto in [Proto::Tcp, Proto::Udp] {
            let key = lb.serve(vip, proto, mode, &[backend], 1500);
            let mut f = if proto == Proto::Tcp {
                Frame::tcp(client, vip, 40000, 80)
            } else {
                Frame::udp(client, vip, 40000, 53)
            };
            f.payload = vec![0x5a; 333];
            // EF with ECT(0): both are carried to the outer header.
            let input = with_tos(f.build(), 0xb8 | 2);
            let (verdict, out) = lb.run(&input);
            let what = format!("{mode:?} {proto:?} {client} -> {vip} via {backend}");
            assert_eq!(verdict, XDP_TX, "{what}");
            let src: IpAddr = if backend.contains(':') { SRC6 } else { SRC4 }
                .parse()
                .unwrap();
            let want = expected(
                &input[ETH_LEN..],
                mode,
                src,
                backend.parse().unwrap(),
                flow_hash(&key_of(&f)),
            );
            assert_eq!(out.len(), want.len(), "{what}: length");
            assert_eq!(out, want, "{what}");
            lb.maps.remove_service(key).unwrap();
        }
    }
    let s = lb.maps.global_stats().unwrap();
    assert_eq!((s.fwd_ipip, s.fwd_gue, s.fwd_l2), (8, 8, 0));
    assert_eq!(s.tx, 16);
}

#[test]
fn gue_spreads_flows_over_source_ports_and_ipv6_flow_labels() {
    let mut lb = load_lb();
    lb.serve(VIP6, Proto::Tcp, Forward::Gue, &[REMOTE6], 1500);
    let mut ports = std::collections::BTreeSet::new();
    let mut labels = std::collections::BTreeSet::new();
    for i in 0..64u16 {
        let f = Frame::tcp(CLIENT6, VIP6, 20000 + i, 80);
        let (verdict, out) = lb.run(&f.build());
        assert_eq!(verdict, XDP_TX);
        let label = u32::from_be_bytes([
            0,
            out[ETH_LEN + 1] & 0x0f,
            out[ETH_LEN + 2],
            out[ETH_LEN + 3],
        ]);
        let sport = u16::from_be_bytes([out[ETH_LEN + 40], out[ETH_LEN + 41]]);
        assert!(sport >= GUE_SPORT_BASE, "{sport}");
        ports.insert(sport);
        labels.insert(label);
    }
    assert!(
        ports.len() >= 60,
        "64 flows used {} source ports",
        ports.len()
    );
    assert!(
        labels.len() >= 60,
        "64 flows used {} flow labels",
        labels.len()
    );
}

/// Checks an ICMP error the balancer built: addressed back to the client from the
/// VIP, quoting the start of `input`, with valid checksums. Returns its bytes 4..8.
fn check_icmp_v4(out: &[u8], input: &[u8], kind: u8, code: u8) -> [u8; 4] {
    assert_eq!(out[0..6], CLIENT_MAC);
    assert_eq!(out[6..12], LB_MAC);
    let ip = &out[ETH_LEN..];
    assert_eq!(out.len(), ETH_LEN + 20 + 8 + 28);
    assert_eq!(ip[9], 1, "ICMP");
    assert_eq!(
        ip[12..16],
        input[ETH_LEN + 16..ETH_LEN + 20],
        "from the VIP"
    );
    assert_eq!(
        ip[16..20],
        input[ETH_LEN + 12..ETH_LEN + 16],
        "to the client"
    );
    assert_eq!(
        util::checksum(&ip[..20], 5),
        u16::from_be_bytes([ip[10], ip[11]])
    );
    let icmp = &ip[20..];
    assert_eq!((icmp[0], icmp[1]), (kind, code));
    assert_eq!(
        util::checksum(icmp, 1),
        u16::from_be_bytes([icmp[2], icmp[3]])
    );
    assert_eq!(icmp[8..], input[ETH_LEN..ETH_LEN + 28], "the quote");
    [icmp[4], icmp[5], icmp[6], icmp[7]]
}

#[test]
fn a_packet_too_big_for_the_tunnel_is_answered_with_the_mtu_left_and_never_fragmented() {
    let mut lb = load_lb();
    lb.serve(VIP4, Proto::Tcp, Forward::Ipip, &[REMOTE4], 1500);
    // 20 + 20 + payload: 1480 bytes fit a 1500-byte path with the 20-byte outer header.
    let sized = |payload: usize, df: bool| {
        let mut f = Frame::tcp(CLIENT4, VIP4, 40001, 80).established();
        f.payload = vec![7; payload];
        if !df {
            f.ipv4_frag = 0;
        }
        f.build()
    };
    let (verdict, out) = lb.run(&sized(1440, true));
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out.len(), ETH_LEN + 1500, "exactly the path's MTU");
    let input = sized(1441, true);
    let (verdict, out) = lb.run(&input);
    assert_eq!(verdict, XDP_TX, "answered");
    let rest = check_icmp_v4(&out, &input, 3, 4);
    assert_eq!(u16::from_be_bytes([rest[2], rest[3]]), 1480, "next-hop MTU");
    // Without DF the client allows fragmenting, which the tunnel never does: dropped.
    let (verdict, _) = lb.run(&sized(1441, false));
    assert_eq!(verdict, XDP_DROP);
    let s = lb.maps.global_stats().unwrap();
    assert_eq!((s.fwd_ipip, s.icmp_too_big, s.drop_too_big), (1, 1, 1));

    // GUE costs 28 bytes; a smaller path MTU (the route's) is what counts.
    let mut lb = load_lb();
    lb.serve(VIP4, Proto::Tcp, Forward::Gue, &[REMOTE4], 1400);
    let input = sized(1400 - 28 - 40 + 1, true);
    let (verdict, out) = lb.run(&input);
    assert_eq!(verdict, XDP_TX);
    let rest = check_icmp_v4(&out, &input, 3, 4);
    assert_eq!(u16::from_be_bytes([rest[2], rest[3]]), 1372);
}

#[test]
fn an_ipv6_packet_too_big_gets_an_icmpv6_packet_too_big() {
    let mut lb = load_lb();
    // Mixed: an IPv6 client's packet in an IPv4 tunnel leaves 1480 bytes.
    lb.serve(VIP6, Proto::Udp, Forward::Ipip, &[REMOTE4], 1500);
    let mut f = Frame::udp(CLIENT6, VIP6, 40002, 53);
    f.payload = vec![1; 1480 - 40 - 8 + 1];
    let input = f.build();
    let (verdict, out) = lb.run(&input);
    assert_eq!(verdict, XDP_TX);
    assert_eq!(out.len(), ETH_LEN + 40 + 8 + 48);
    let ip = &out[ETH_LEN..];
    assert_eq!(ip[6], 58, "ICMPv6");
    assert_eq!(ip[8..24], input[ETH_LEN + 24..ETH_LEN + 40], "from the VIP");
    assert_eq!(
        ip[24..40],
        input[ETH_LEN + 8..ETH_LEN + 24],
        "to the client"
    );
    let icmp = &ip[40..];
    assert_eq!((icmp[0], icmp[1]), (2, 0), "packet too big");
    assert_eq!(
        u32::from_be_bytes([icmp[4], icmp[5], icmp[6], icmp[7]]),
        1480
    );
    let (s, d): (std::net::Ipv6Addr, std::net::Ipv6Addr) =
        (VIP6.parse().unwrap(), CLIENT6.parse().unwrap());
    let sum = util::ipv6_checksum(icmp, 1, &[], &s, &d, IpNextHeaderProtocol(58));
    assert_eq!(sum, u16::from_be_bytes([icmp[2], icmp[3]]));
    assert_eq!(icmp[8..], input[ETH_LEN..ETH_LEN + 48], "the quote");
}

/// A router's ICMP error to the VIP about a reply the backend sent from `vip`:80 to
/// `client`:`cport` (TCP).
fn router_error(vip: &str, client: &str, cport: u16, kind: u8, code: u8, rest: [u8; 4]) -> Frame {
    let (v, c): (IpAddr, IpAddr) = (vip.parse().unwrap(), client.parse().unwrap());
    let router: IpAddr = if v.is_ipv4() {
        "198.18.2.1"
    } else {
        "2001:db8:2::1"
    }
    .parse()
    .unwrap();
    let reply = Frame::new(v, c, L4::Tcp, 80, cport).established().build();
    let quote_len = if v.is_ipv4() { 28 } else { 48 };
    let mut msg = vec![kind, code, 0, 0, rest[0], rest[1], rest[2], rest[3]];
    msg.extend_from_slice(&reply[ETH_LEN..ETH_LEN + quote_len]);
    let sum = match (router, v) {
        (IpAddr::V6(r), IpAddr::V6(v)) => {
            util::ipv6_checksum(&msg, 1, &[], &r, &v, IpNextHeaderProtocol(58))
        }
        _ => util::checksum(&msg, 1),
    };
    msg[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = Frame::new(router, v, L4::Other(if v.is_ipv4() { 1 } else { 58 }), 0, 0);
    f.payload = msg;
    f
}

#[test]
fn an_icmp_error_about_a_flow_goes_to_that_flows_backend_encapsulated_like_it() {
    let backends4 = ["198.18.5.1", "198.18.5.2", "198.18.5.3"];
    let backends6 = ["2001:db8:5::1", "2001:db8:5::2", "2001:db8:5::3"];
    for (vip, client, backends, kind, code) in [
        (VIP4, CLIENT4, backends4, 3, 4),
        (VIP6, CLIENT6, backends6, 2, 0),
    ] {
        let mut lb = load_lb();
        lb.serve(vip, Proto::Tcp, Forward::Gue, &backends, 1500);
        for cport in 40000..40024u16 {
            // The flow first (its ACK enters it), then a router's error about its reply.
            let flow = Frame::tcp(client, vip, cport, 80).established();
            let (verdict, out) = lb.run(&flow.build());
            assert_eq!(verdict, XDP_TX);
            let outer_dst = |out: &[u8]| -> Vec<u8> {
                if vip.contains(':') {
                    out[ETH_LEN + 24..ETH_LEN + 40].to_vec()
                } else {
                    out[ETH_LEN + 16..ETH_LEN + 20].to_vec()
                }
            };
            let owner = outer_dst(&out);
            let error = router_error(vip, client, cport, kind, code, [0, 0, 0x05, 0x00]);
            let input = error.build();
            let (verdict, out) = lb.run(&input);
            assert_eq!(verdict, XDP_TX, "the error for port {cport} is forwarded");
            assert_eq!(outer_dst(&out), owner, "to the backend of its flow");
            let want = expected(
                &input[ETH_LEN..],
                Forward::Gue,
                (if vip.contains(':') { SRC6 } else { SRC4 })
                    .parse()
                    .unwrap(),
                IpAddr::from(if vip.contains(':') {
                    <[u8; 16]>::try_from(owner.as_slice())
                        .map(IpAddr::from)
                        .unwrap()
                } else {
                    <[u8; 4]>::try_from(owner.as_slice())
                        .map(IpAddr::from)
                        .unwrap()
                }),
                flow_hash(&key_of(&flow)),
            );
            assert_eq!(out, want, "the error, unchanged inside");
        }
        // Not entered in the connection table (it proves nothing): the steered flow
        // of a client never seen is still the one its SYN would take.
        let error = router_error(vip, client, 50000, kind, code, [0; 4]);
        let (verdict, out) = lb.run(&error.build());
        assert_eq!(verdict, XDP_TX);
        let (_, syn) = lb.run(&Frame::tcp(client, vip, 50000, 80).build());
        let at = if vip.contains(':') {
            ETH_LEN + 24..ETH_LEN + 40
        } else {
            ETH_LEN + 16..ETH_LEN + 20
        };
        assert_eq!(out[at.clone()], syn[at]);
        let s = lb.maps.global_stats().unwrap();
        assert_eq!(s.icmp_steered, 25);
        // About a port with no service, or an echo request: the node's stack's.
        let mut foreign = router_error(vip, client, 40000, kind, code, [0; 4]);
        let reply = Frame::new(
            vip.parse().unwrap(),
            client.parse().unwrap(),
            L4::Tcp,
            81,
            40000,
        )
        .build();
        let q = if vip.contains(':') { 48 } else { 28 };
        foreign.payload[8..].copy_from_slice(&reply[ETH_LEN..ETH_LEN + q]);
        let input = foreign.build();
        let (verdict, out) = lb.run(&input);
        assert_eq!((verdict, &out), (XDP_PASS, &input), "no service on port 81");
        let mut ping = Frame::new(
            client.parse().unwrap(),
            vip.parse().unwrap(),
            L4::Other(if vip.contains(':') { 58 } else { 1 }),
            0,
            0,
        );
        ping.payload = vec![if vip.contains(':') { 128 } else { 8 }, 0, 0, 0, 0, 1, 0, 1];
        let input = ping.build();
        let (verdict, out) = lb.run(&input);
        assert_eq!((verdict, &out), (XDP_PASS, &input), "an echo request");
    }
}

/// Runs `frame` through the backend side's XDP program, or with `tc` its tc
/// fallback: the verdict and the frame that left.
fn decap_through(d: &Decap, tc: bool, frame: &[u8]) -> (u32, Vec<u8>) {
    let mut out = vec![0u8; frame.len() + 64];
    let opts = TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ..TestRunOptions::default()
    };
    let r = if tc {
        d.tc_program().test_run(opts)
    } else {
        d.program().test_run(opts)
    }
    .expect("BPF_PROG_TEST_RUN");
    out.truncate(r.data_size_out as usize);
    (r.return_value, out)
}

fn decap_run(d: &Decap, frame: &[u8]) -> (u32, Vec<u8>) {
    decap_through(d, false, frame)
}

fn decap() -> Decap {
    Decap::load(
        &DecapSettings {
            sources: vec![SRC4.parse().unwrap(), SRC6.parse().unwrap()],
            gue_port: GUE_PORT,
        },
        None,
    )
    .expect("loading lb_decap")
}

#[test]
fn the_backends_decap_gives_the_stack_the_clients_packet_for_every_mode_and_family() {
    let mut lb = load_lb();
    let d = decap();
    let n = round_trips(&mut lb, &d, false);
    let s = d.stats().unwrap();
    assert_eq!((s.ipip, s.gue), (n / 2, n / 2));
}

/// Every family pair in IPIP and GUE through the balancer, then through the backend
/// side's XDP program (or with `tc` its tc fallback): what leaves is the client's
/// packet with the frame's MACs. Returns how many went through.
fn round_trips(lb: &mut Lb, d: &Decap, tc: bool) -> u64 {
    let passed = if tc { TC_ACT_OK } else { XDP_PASS };
    let mut n = 0;
    for (vip, client, backend) in [
        (VIP4, CLIENT4, REMOTE4),
        (VIP6, CLIENT6, REMOTE6),
        (VIP4, CLIENT4, REMOTE6),
        (VIP6, CLIENT6, REMOTE4),
    ] {
        for mode in [Forward::Ipip, Forward::Gue] {
            let key = lb.serve(vip, Proto::Tcp, mode, &[backend], 1500);
            let input = Frame::tcp(client, vip, 40000, 80).build();
            let (_, wrapped) = lb.run(&input);
            let (verdict, out) = decap_through(d, tc, &wrapped);
            assert_eq!(verdict, passed);
            assert_eq!(
                out[ETH_LEN - 2..],
                input[ETH_LEN - 2..],
                "{mode:?} {client} via {backend} (tc: {tc}): the client's packet"
            );
            assert_eq!(out[..12], wrapped[..12], "the frame's MACs stay");
            lb.maps.remove_service(key).unwrap();
            n += 1;
        }
    }
    n
}

#[test]
fn the_decap_leaves_everything_else_untouched() {
    let mut lb = load_lb();
    let d = decap();
    lb.serve(VIP4, Proto::Tcp, Forward::Ipip, &[REMOTE4], 1500);
    let (_, wrapped) = lb.run(&Frame::tcp(CLIENT4, VIP4, 40000, 80).build());
    let fix = |mut f: Vec<u8>| {
        let mut ip = MutableIpv4Packet::new(&mut f[ETH_LEN..]).unwrap();
        let sum = ipv4::checksum(&ip.to_immutable());
        ip.set_checksum(sum);
        f
    };
    // From a host that is no LB node.
    let mut foreign = wrapped.clone();
    foreign[ETH_LEN + 12..ETH_LEN + 16].copy_from_slice(&[198, 18, 9, 9]);
    let foreign = fix(foreign);
    // A fragment of an LB node's packet.
    let mut fragment = wrapped.clone();
    fragment[ETH_LEN + 6] |= 0x20; // more fragments
    let fragment = fix(fragment);
    // UDP to another port, and plain traffic.
    let plain = Frame::tcp(CLIENT4, VIP4, 40000, 80).build();
    let other_port = Frame::udp(SRC4, REMOTE4, 40000, 6081).build();
    for (what, frame) in [
        ("foreign source", &foreign),
        ("fragment", &fragment),
        ("plain", &plain),
        ("udp to 6081", &other_port),
    ] {
        let (verdict, out) = decap_run(&d, frame);
        assert_eq!((verdict, &out), (XDP_PASS, frame), "{what}");
    }
    let s = d.stats().unwrap();
    assert_eq!(
        (s.foreign_source, s.malformed, s.passed, s.ipip),
        (1, 1, 2, 0)
    );
}

#[test]
fn a_congestion_mark_on_the_tunnel_reaches_the_inner_packet_or_drops_it() {
    let mut lb = load_lb();
    let d = decap();
    lb.serve(VIP4, Proto::Tcp, Forward::Ipip, &[REMOTE4], 1500);
    let mark_ce = |mut f: Vec<u8>| {
        f[ETH_LEN + 1] |= 3;
        let mut ip = MutableIpv4Packet::new(&mut f[ETH_LEN..]).unwrap();
        let sum = ipv4::checksum(&ip.to_immutable());
        ip.set_checksum(sum);
        f
    };
    // ECT(0) inside: the router's CE mark is copied in, the checksum kept valid.
    let input = with_tos(Frame::tcp(CLIENT4, VIP4, 40000, 80).build(), 2);
    let (_, wrapped) = lb.run(&input);
    assert_eq!(wrapped[ETH_LEN + 1], 2, "ECN copied out");
    // The XDP program and its tc fallback alike.
    for ((verdict, out), passed) in [
        (decap_run(&d, &mark_ce(wrapped.clone())), XDP_PASS),
        (decap_tc_run(&d, &mark_ce(wrapped)), TC_ACT_OK),
    ] {
        assert_eq!(verdict, passed);
        assert_eq!(out[ETH_LEN + 1], 3, "CE inside");
        let inner = pnet::packet::ipv4::Ipv4Packet::new(&out[ETH_LEN..]).unwrap();
        assert_eq!(ipv4::checksum(&inner), inner.get_checksum());
        assert_eq!(out[ETH_LEN + 20..], input[ETH_LEN + 20..]);
    }
    // Not ECN-capable inside: RFC 6040 drops it.
    let (_, wrapped) = lb.run(&Frame::tcp(CLIENT4, VIP4, 40001, 80).build());
    let (verdict, _) = decap_run(&d, &mark_ce(wrapped));
    assert_eq!(verdict, XDP_DROP);
    assert_eq!(d.stats().unwrap().ce_dropped, 1);
}

fn decap_tc_run(d: &Decap, frame: &[u8]) -> (u32, Vec<u8>) {
    decap_through(d, true, frame)
}

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

#[test]
fn the_tc_fallback_decapsulates_as_the_xdp_program_does() {
    let mut lb = load_lb();
    let d = decap();
    let n = round_trips(&mut lb, &d, true);
    assert_eq!(d.stats().unwrap().ipip + d.stats().unwrap().gue, n);
    // Foreign senders and plain traffic pass untouched; a CE mark on a packet that
    // does not speak ECN is dropped, as by XDP.
    lb.serve(VIP4, Proto::Tcp, Forward::Ipip, &[REMOTE4], 1500);
    let (_, wrapped) = lb.run(&Frame::tcp(CLIENT4, VIP4, 40001, 80).build());
    let mut foreign = wrapped.clone();
    foreign[ETH_LEN + 12..ETH_LEN + 16].copy_from_slice(&[198, 18, 9, 9]);
    let plain = Frame::tcp(CLIENT4, VIP4, 40000, 80).build();
    for frame in [&foreign, &plain] {
        let (verdict, out) = decap_tc_run(&d, frame);
        assert_eq!((verdict, &out), (TC_ACT_OK, frame));
    }
    let mut ce = wrapped;
    ce[ETH_LEN + 1] |= 3;
    let (verdict, _) = decap_tc_run(&d, &ce);
    assert_eq!(verdict, TC_ACT_SHOT);
}

#[test]
fn too_big_answers_to_one_source_are_limited_like_refusals() {
    let mut lb = load_lb();
    lb.serve(VIP4, Proto::Tcp, Forward::Ipip, &[REMOTE4], 1500);
    let mut f = Frame::tcp(CLIENT4, VIP4, 40003, 80).established();
    f.payload = vec![7; 1441];
    let input = f.build();
    let answered = (0..lb_common::REFUSALS_PER_SECOND + 5)
        .filter(|_| lb.run(&input).0 == XDP_TX)
        .count() as u64;
    // Within one second: the source's budget, then drops (never a reflector).
    assert_eq!(answered, lb_common::REFUSALS_PER_SECOND);
    let s = lb.maps.global_stats().unwrap();
    assert_eq!(
        (s.icmp_too_big, s.drop_too_big),
        (lb_common::REFUSALS_PER_SECOND, 5)
    );
}
