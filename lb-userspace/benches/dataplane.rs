//! Per-packet cost of the XDP program through `BPF_PROG_TEST_RUN`, against a baseline
//! program (swap MACs, `XDP_TX`) measured the same way in the same run.
//!
//! `repeat = 1` per call with a fresh frame each time, as Katran's perf tester does:
//! with `repeat > 1` the kernel reruns the program on its own output, and a new flow
//! would become an established one from the second repetition. The figures are the
//! kernel's own run time per call (it excludes the syscall): mean and median.
//!
//! Honest conditions: each connection table is sized for 1,048,576 flows per
//! possible CPU (one shared table a family), is filled and emptied once before
//! anything is timed (a used table's slots are scattered, as a long-running node's
//! are), the full line runs on a table filled until 99% of new flows are refused,
//! and every line runs
//! in chunks interleaved with chunks of the baseline, each line's ratio taken against
//! the baseline chunks around it, over several rounds.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{net::Ipv4Addr, time::Instant};

use anyhow::{ensure, Context, Result};
use aya::programs::{TestRun, TestRunAttrs, TestRunOptions, XdpMode};
use lb_userspace::{
    model::{Encap, Forward},
    plan::ServicePlan,
    BackendRoute, Dataplane, Egress, LoadOptions, Program, Programs, Proto, ServiceConfig,
    ServiceKey,
};
use support::{backend_mac, Frame, ETH_LEN, LB_MAC};

/// The service's pinned table size: Katran's default ring.
const MAGLEV_SIZE: u32 = 65537;
const VIP: &str = "198.18.0.100";
/// Services whose backends are behind a router: IPIP on one, GUE on the other.
const VIP_IPIP: &str = "198.18.0.101";
const VIP_GUE: &str = "198.18.0.102";
/// An IPv6 service: its flows live in the IPv6 connection table.
const VIP6: &str = "2001:db8::100";
const BACKENDS: u8 = 16;
const ROUNDS: usize = 4;
const CHUNK: u64 = 100_000;
/// Established flows cycled through for the cold line.
const COLD_FLOWS: u64 = 1 << 20;

const XDP_DROP: u32 = 1;
const XDP_TX: u32 = 3;
const XDP_PASS: u32 = 2;
/// The TCP flags byte of a built IPv4 frame.
const TCP_FLAGS: usize = ETH_LEN + 20 + 13;
/// The TCP flags byte of a built IPv6 frame.
const TCP_FLAGS6: usize = ETH_LEN + 40 + 13;

/// Per-call kernel times of a line, over all its chunks, and the baseline's means of
/// the chunks run beside it.
#[derive(Default)]
struct Line {
    samples: Vec<u32>,
    baseline_means: Vec<f64>,
}

impl Line {
    fn mean(&self) -> f64 {
        self.samples.iter().map(|s| *s as f64).sum::<f64>() / self.samples.len().max(1) as f64
    }
    fn median(&mut self) -> f64 {
        self.samples.sort_unstable();
        self.samples
            .get(self.samples.len() / 2)
            .copied()
            .unwrap_or(0) as f64
    }
    /// Call at the given fraction of the sorted samples (after `median`, which sorts).
    fn quantile(&self, q: f64) -> f64 {
        let i =
            ((self.samples.len() as f64 * q) as usize).min(self.samples.len().saturating_sub(1));
        self.samples.get(i).copied().unwrap_or(0) as f64
    }
    /// Calls of at least `ns`, per thousand, and their share of the line's time (%).
    fn slow(&self, ns: u32) -> (f64, f64) {
        let slow: Vec<u32> = self.samples.iter().copied().filter(|s| *s >= ns).collect();
        let all: f64 = self.samples.iter().map(|s| *s as f64).sum();
        (
            slow.len() as f64 * 1000.0 / self.samples.len().max(1) as f64,
            slow.iter().map(|s| *s as f64).sum::<f64>() * 100.0 / all.max(1.0),
        )
    }
    fn baseline(&self) -> f64 {
        self.baseline_means.iter().sum::<f64>() / self.baseline_means.len().max(1) as f64
    }
}

/// Runs `n` calls of `program` on frames from `next`; every call must return
/// `verdict`. Returns the per-call kernel times in ns.
fn chunk(
    dp: &Programs,
    name: &str,
    program: Program,
    verdict: u32,
    n: u64,
    next: &mut dyn FnMut(&mut Vec<u8>),
) -> Result<Vec<u32>> {
    let prog = dp.program(program);
    let mut frame = Vec::new();
    let mut out = vec![0u8; 2048];
    let mut samples = Vec::with_capacity(n as usize);
    for call in 0..n {
        next(&mut frame);
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .with_context(|| format!("{name}: BPF_PROG_TEST_RUN"))?;
        ensure!(
            r.return_value == verdict,
            "{name}: verdict {} instead of {verdict} on call {call}",
            r.return_value
        );
        samples.push(r.duration.as_nanos().min(u32::MAX as u128) as u32);
    }
    Ok(samples)
}

/// Writes a distinct source (address, port) for flow `n` into a built IPv4 frame:
/// 32 bits of flows (198.19.0.0/16 x ports), so each line's range starts at its own
/// power of two below 2^32 (higher bits would alias another line's flows).
/// Checksums are left stale: the program does not read them.
fn set_flow(frame: &mut [u8], n: u64) {
    debug_assert!(n < 1 << 32, "flow {n} aliases flow {}", n as u32);
    let src = Ipv4Addr::new(
        198,
        19,
        (n >> 24) as u8 ^ ((n >> 16) as u8),
        (n >> 16) as u8,
    );
    frame[ETH_LEN + 12..ETH_LEN + 16].copy_from_slice(&src.octets());
    frame[ETH_LEN + 20..ETH_LEN + 22].copy_from_slice(&(n as u16).to_be_bytes());
}

/// Writes a distinct source address for flow `n` into a built IPv6 frame (its last
/// 32 bits).
fn set_flow6(frame: &mut [u8], n: u64) {
    frame[ETH_LEN + 20..ETH_LEN + 24].copy_from_slice(&(n as u32).to_be_bytes());
}

/// A source of frames for one line: a template and how call `n` changes it.
struct Gen {
    template: Vec<u8>,
    n: u64,
    step: fn(&mut [u8], u64),
}

impl Gen {
    fn new(template: Vec<u8>, step: fn(&mut [u8], u64)) -> Gen {
        Gen {
            template,
            n: 0,
            step,
        }
    }
    fn next(&mut self, f: &mut Vec<u8>) {
        if f.is_empty() {
            *f = self.template.clone();
        }
        (self.step)(f, self.n);
        self.n += 1;
    }
}

struct Spec {
    name: &'static str,
    program: Program,
    verdict: u32,
    gen: Gen,
    line: Line,
}

impl Spec {
    fn new(name: &'static str, program: Program, verdict: u32, gen: Gen) -> Spec {
        Spec {
            name,
            program,
            verdict,
            gen,
            line: Line::default(),
        }
    }
}

/// Rounds of (baseline chunk, line chunk) for every line, interleaved.
fn run_rounds(dp: &Programs, baseline: &mut Gen, specs: &mut [&mut Spec]) -> Result<()> {
    for _ in 0..rounds() {
        for spec in specs.iter_mut().filter(|s| selected(s.name)) {
            let base = chunk(
                dp,
                "baseline",
                Program::SwapMacs,
                XDP_TX,
                CHUNK / 2,
                &mut |f| baseline.next(f),
            )?;
            let mean = base.iter().map(|s| *s as f64).sum::<f64>() / base.len() as f64;
            spec.line.baseline_means.push(mean);
            let gen = &mut spec.gen;
            let samples = chunk(dp, spec.name, spec.program, spec.verdict, CHUNK, &mut |f| {
                gen.next(f)
            })?;
            spec.line.samples.extend(samples);
        }
    }
    Ok(())
}

/// `LB_BENCH_LINES=established,non-VIP` runs only the lines whose names contain one
/// of the words (for profiling one path with `perf`); all lines by default.
fn selected(name: &str) -> bool {
    match std::env::var("LB_BENCH_LINES") {
        Ok(words) => words.split(',').any(|w| name.contains(w.trim())),
        Err(_) => true,
    }
}

/// `LB_BENCH_ROUNDS` overrides the number of rounds (longer runs for a profile).
fn rounds() -> usize {
    std::env::var("LB_BENCH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(ROUNDS)
}

/// Runs `n` new IPv4 flows (sources from `first`) through the balancer: fills the
/// table (`template` an ACK: a SYN does not enter its flow).
fn fill(dp: &Programs, template: &[u8], first: u64, n: u64) -> Result<()> {
    fill_by(dp, template, first, n, set_flow)
}

/// As `fill`, with the flows' sources written by `step`.
fn fill_by(
    dp: &Programs,
    template: &[u8],
    first: u64,
    n: u64,
    step: fn(&mut [u8], u64),
) -> Result<()> {
    let mut i = first;
    chunk(dp, "fill", Program::Balancer, XDP_TX, n, &mut |f| {
        if f.is_empty() {
            *f = template.to_vec();
        }
        step(f, i);
        i += 1;
    })
    .map(drop)
}

/// Live frames (`BPF_F_TEST_XDP_LIVE_FRAMES`): the kernel runs the program on real
/// frames from a page pool as if they arrived on `lbl0`, and transmits what it returns
/// `XDP_TX` for, through the veth pair to `lbl1` (whose XDP program passes them to a
/// stack that drops them: the bench runs in a network namespace of its own).
const LIVE_IF: &str = "lbl0";
const LIVE_PEER: &str = "lbl1";
const LIVE_REPEAT: u32 = 2_000_000;
const LIVE_ROUNDS: usize = 3;

/// A network namespace for this process alone, with the veth pair in it: nothing
/// the bench creates or sends is seen outside.
fn live_setup(dp: &mut Programs) -> Result<u32> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("a network namespace of its own for the live-frames lines")?;
    let ip = |args: &[&str]| -> Result<()> {
        let out = std::process::Command::new("ip").args(args).output()?;
        ensure!(
            out.status.success(),
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(())
    };
    ip(&[
        "link", "add", LIVE_IF, "type", "veth", "peer", "name", LIVE_PEER,
    ])?;
    ip(&["link", "set", LIVE_IF, "up"])?;
    ip(&["link", "set", LIVE_PEER, "up"])?;
    // veth drops XDP_TX frames unless its peer has an XDP program.
    dp.attach(Program::Pass, LIVE_PEER, XdpMode::Driver)?;
    Ok(nix::net::if_::if_nametoindex(LIVE_IF)?)
}

/// Mean ns per frame of `repeat` live frames of `frame` through `program`.
fn live_run(dp: &Programs, program: Program, ifindex: u32, frame: &[u8]) -> Result<f64> {
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex (u32 each); data_end must be the frame's length.
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&(frame.len() as u32).to_ne_bytes());
    md[12..16].copy_from_slice(&ifindex.to_ne_bytes());
    let r = dp
        .program(program)
        .test_run(TestRunOptions {
            data_in: Some(frame),
            ctx_in: Some(&md),
            repeat: LIVE_REPEAT,
            attrs: TestRunAttrs::new().xdp_live_frames(64),
            ..TestRunOptions::default()
        })
        .with_context(|| format!("{}: BPF_PROG_TEST_RUN with live frames", program.name()))?;
    Ok(r.duration.as_nanos() as f64)
}

/// The live-frames table: Mpps on one core for the baseline and each line, in rounds
/// interleaved with the baseline.
fn live_lines(dp: &mut Programs, syn: &[u8], ack: &[u8], other: &[u8]) -> Result<()> {
    let ifindex = live_setup(dp)?;
    let lines: [(&str, Program, &[u8]); 4] = [
        ("XDP_DROP one-liner", Program::Drop, syn),
        ("established TCP ACK", Program::Balancer, ack),
        ("SYN, one tuple (never entered)", Program::Balancer, syn),
        ("non-VIP (XDP_PASS to stack)", Program::Balancer, other),
    ];
    let mut base = vec![Vec::new(); lines.len()];
    let mut ns = vec![Vec::new(); lines.len()];
    for _ in 0..LIVE_ROUNDS {
        for (i, (_, program, frame)) in lines.iter().enumerate() {
            base[i].push(live_run(dp, Program::SwapMacs, ifindex, syn)?);
            ns[i].push(live_run(dp, *program, ifindex, frame)?);
        }
    }
    let mean = |v: &Vec<f64>| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "\nlive frames through a veth pair in the bench's own namespace ({LIVE_ROUNDS} rounds of \
         {LIVE_REPEAT} frames per line, batch 64, CPU 0); baseline = MAC swap + XDP_TX the same way"
    );
    println!(
        "{:<30} {:>10} {:>8} {:>14} {:>8}",
        "line", "ns/frame", "Mpps", "baseline Mpps", "ratio"
    );
    for (i, (name, _, _)) in lines.iter().enumerate() {
        let (line, b) = (mean(&ns[i]), mean(&base[i]));
        println!(
            "{:<30} {:>10.1} {:>8.2} {:>14.2} {:>8.2}",
            name,
            line,
            1e3 / line,
            1e3 / b,
            line / b
        );
    }
    Ok(())
}

fn main() -> Result<()> {
    let mut cpu0 = nix::sched::CpuSet::new();
    cpu0.set(0)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu0)
        .context("pinning the benchmark to CPU 0")?;
    let cpus = aya::util::nr_cpus().map_err(|(w, e)| anyhow::anyhow!("{w}: {e}"))? as u32;
    let capacity = (1u32 << 20) * cpus;
    let options = LoadOptions {
        conn_table_size: capacity,
        ..LoadOptions::default()
    };
    let (mut dp, mut maps) = Programs::load(&options)
        .context("loading the XDP program (the benchmark must run as root)")?;
    let key = ServiceKey {
        addr: VIP.parse()?,
        port: 80,
        proto: Proto::Tcp,
    };
    let udp_key = ServiceKey {
        proto: Proto::Udp,
        ..key
    };
    // BACKENDS backends on this link, addressed by `address(i)`, in a table of
    // Katran's ring size (the comparison), pinned: an automatic table of 16
    // backends would be 2,053 cells, kinder to the cache than what is compared.
    let local_plan = |address: &dyn Fn(u8) -> String| {
        let backends: Vec<_> = (1..=BACKENDS)
            .map(|i| {
                (
                    address(i).parse().expect("address"),
                    1,
                    BackendRoute {
                        dst_mac: backend_mac(i),
                        src_mac: LB_MAC,
                        egress: Egress::Ingress,
                        encap: None,
                    },
                )
            })
            .collect();
        ServicePlan::with_backends(
            ServiceConfig {
                maglev_size: MAGLEV_SIZE,
                ..ServiceConfig::default()
            },
            backends,
        )
    };
    let mut plan = local_plan(&|i| format!("198.18.0.{i}"));
    maps.write_service(key, &plan)?;
    maps.write_service(udp_key, &plan)?;
    // The same 16 backends' worth of remote ones, wrapped (outer IPv4 header to the
    // gateway's MAC), for the encapsulated lines.
    for (vip, mode) in [(VIP_IPIP, Forward::Ipip), (VIP_GUE, Forward::Gue)] {
        let remote: Vec<_> = (1..=BACKENDS)
            .map(|i| {
                (
                    format!("198.18.5.{i}").parse().expect("address"),
                    1,
                    BackendRoute {
                        dst_mac: backend_mac(200),
                        src_mac: LB_MAC,
                        egress: Egress::Ingress,
                        encap: Some(Encap {
                            mode,
                            source: "198.18.0.2".parse().expect("address"),
                            mtu: 1500,
                            gue_port: lb_common::GUE_PORT_DEFAULT,
                        }),
                    },
                )
            })
            .collect();
        let remote_plan = ServicePlan::with_backends(
            ServiceConfig {
                maglev_size: MAGLEV_SIZE,
                forward: mode,
                ..ServiceConfig::default()
            },
            remote,
        );
        let k = ServiceKey {
            addr: vip.parse()?,
            ..key
        };
        maps.write_service(k, &remote_plan)?;
    }

    // The same backends' worth for the IPv6 service, on the same link.
    let plan6 = local_plan(&|i| format!("2001:db8:5::{i}"));
    maps.write_service(
        ServiceKey {
            addr: VIP6.parse()?,
            ..key
        },
        &plan6,
    )?;

    let syn = Frame::tcp("198.19.0.1", VIP, 40000, 80).build();
    let mut ack = syn.clone();
    ack[TCP_FLAGS] = 0x10;
    let udp = Frame::udp("198.19.0.1", VIP, 40000, 80).build();
    let to_other = Frame::tcp("198.19.0.1", "198.18.0.200", 40000, 80).build();
    let ack_to = |vip: &str| {
        let mut f = Frame::tcp("198.19.0.1", vip, 40000, 80).build();
        f[TCP_FLAGS] = 0x10;
        f
    };
    let (ack_ipip, ack_gue) = (ack_to(VIP_IPIP), ack_to(VIP_GUE));
    let mut ack6 = Frame::tcp("2001:db8:19::1", VIP6, 40000, 80).build();
    ack6[TCP_FLAGS6] = 0x10;

    // Used tables: filled to capacity by the program, then emptied.
    let started = Instant::now();
    fill(&dp, &ack, 1 << 27, capacity as u64)?;
    fill_by(&dp, &ack6, 1 << 27, capacity as u64, set_flow6)?;
    let emptied = maps.clear_connections()?;
    eprintln!(
        "tables filled with {capacity} flows each and emptied ({emptied}) in {:?}",
        started.elapsed()
    );

    fn same(_: &mut [u8], _: u64) {}
    fn new_flow(f: &mut [u8], n: u64) {
        set_flow(f, n)
    }
    fn new_udp(f: &mut [u8], n: u64) {
        set_flow(f, (1 << 26) + n)
    }
    fn cold(f: &mut [u8], n: u64) {
        // Over all of the cold flows, not the first of them in the order entered:
        // an odd stride visits each of the 2^20 once per 2^20 calls.
        set_flow(f, (1 << 28) + n.wrapping_mul(0x9e37_79b1) % COLD_FLOWS)
    }
    fn refused(f: &mut [u8], n: u64) {
        let src = 0xc613_0000u32.wrapping_add(n as u32);
        f[ETH_LEN + 12..ETH_LEN + 16].copy_from_slice(&src.to_be_bytes());
    }
    let mut baseline = Gen::new(syn.clone(), same);
    let mut drop = Spec::new(
        "XDP_DROP one-liner",
        Program::Drop,
        XDP_DROP,
        Gen::new(syn.clone(), same),
    );
    let mut established = Spec::new(
        "established TCP ACK",
        Program::Balancer,
        XDP_TX,
        Gen::new(ack.clone(), same),
    );
    let mut non_vip = Spec::new(
        "non-VIP (XDP_PASS)",
        Program::Balancer,
        XDP_PASS,
        Gen::new(to_other.clone(), same),
    );
    // A new TCP flow costs its SYN (steered by the Maglev table, not entered) and its
    // first ACK (steered again, entered): both lines, each with its own new flows.
    let mut tcp_syn = Spec::new(
        "new SYN (steered, not entered)",
        Program::Balancer,
        XDP_TX,
        Gen::new(syn.clone(), |f, n| set_flow(f, (1 << 25) + n)),
    );
    let mut tcp_new = Spec::new(
        "new flow's 1st ACK, not full",
        Program::Balancer,
        XDP_TX,
        Gen::new(ack.clone(), new_flow),
    );
    let mut udp_new = Spec::new(
        "UDP new, table not full",
        Program::Balancer,
        XDP_TX,
        Gen::new(udp.clone(), new_udp),
    );
    let mut ipip_est = Spec::new(
        "IPIP established TCP ACK",
        Program::Balancer,
        XDP_TX,
        Gen::new(ack_ipip.clone(), same),
    );
    let mut ipip_new = Spec::new(
        "IPIP new flow's 1st ACK",
        Program::Balancer,
        XDP_TX,
        Gen::new(ack_ipip.clone(), new_flow),
    );
    let mut gue_est = Spec::new(
        "GUE established TCP ACK",
        Program::Balancer,
        XDP_TX,
        Gen::new(ack_gue.clone(), same),
    );
    let mut gue_new = Spec::new(
        "GUE new flow's 1st ACK",
        Program::Balancer,
        XDP_TX,
        Gen::new(ack_gue.clone(), new_flow),
    );
    let mut v6_est = Spec::new(
        "IPv6 established TCP ACK",
        Program::Balancer,
        XDP_TX,
        Gen::new(ack6.clone(), same),
    );
    let mut v6_new = Spec::new(
        "IPv6 new flow's 1st ACK",
        Program::Balancer,
        XDP_TX,
        Gen::new(ack6.clone(), |f, n| set_flow6(f, (1 << 24) + n)),
    );
    // The established flows first, so that their lines are hits from the first call.
    for warm in [&ack, &ack_ipip, &ack_gue, &ack6] {
        chunk(&dp, "warm", Program::Balancer, XDP_TX, 1, &mut |f| {
            *f = warm.clone()
        })?;
    }
    run_rounds(
        &dp,
        &mut baseline,
        &mut [
            &mut drop,
            &mut established,
            &mut non_vip,
            &mut tcp_syn,
            &mut tcp_new,
            &mut udp_new,
            &mut ipip_est,
            &mut ipip_new,
            &mut gue_est,
            &mut gue_new,
            &mut v6_est,
            &mut v6_new,
        ],
    )?;

    // A full table: every insert is refused (counted; the flow goes on by its Maglev
    // table). Emptied of the lines' new flows first (they may fill most of it: 4
    // rounds of 4 lines of 100,000), so that every cold flow goes in, then filled
    // until new flows find both their sets full: the IPv4 table has twice its
    // nominal size in slots, and its last free ones are found by ever fewer flows.
    maps.clear_connections()?;
    fill(&dp, &ack, 1 << 28, COLD_FLOWS)?;
    let present = maps.count_connections_now() as u64;
    ensure!(
        present + COLD_FLOWS / 10_000 >= COLD_FLOWS,
        "the table holds {present} of the {COLD_FLOWS} cold flows"
    );
    let mut next = 1u64 << 29;
    let mut refused_share = 0.0;
    for _ in 0..16 {
        let before = maps.global_stats()?.conn_table_full;
        fill(&dp, &ack, next, capacity as u64 / 2)?;
        next += capacity as u64 / 2;
        let refused = maps.global_stats()?.conn_table_full - before;
        refused_share = refused as f64 / (capacity as u64 / 2) as f64;
        if refused_share > 0.99 {
            break;
        }
    }
    let held = maps.count_connections_now();
    ensure!(
        refused_share > 0.99,
        "the table still enters {:.1}% of new flows with {held} held",
        100.0 * (1.0 - refused_share)
    );
    eprintln!(
        "full table: {held} flows held (nominal size {capacity}), {:.2}% of the last fill's new flows refused",
        100.0 * refused_share
    );
    let mut full_new = Spec::new(
        "new flow's 1st ACK, full (refused)",
        Program::Balancer,
        XDP_TX,
        Gen::new(ack.clone(), |f, n| set_flow(f, (1 << 30) + n)),
    );
    let mut full_syn = Spec::new(
        "SYN flood, table full",
        Program::Balancer,
        XDP_TX,
        Gen::new(syn.clone(), |f, n| set_flow(f, (1 << 31) + n)),
    );
    let mut cold_est = Spec::new(
        "established, 1M flows, cold",
        Program::Balancer,
        XDP_TX,
        Gen::new(ack.clone(), cold),
    );
    run_rounds(
        &dp,
        &mut baseline,
        &mut [&mut cold_est, &mut full_new, &mut full_syn],
    )?;

    // Maintenance: every SYN is answered with a RST by the program itself. A new
    // client address per call keeps the per-source refusal budget out of the way.
    plan.config.unavailable = true;
    maps.write_service(key, &plan)?;
    let mut refusal = Spec::new(
        "refusal (SYN -> RST)",
        Program::Balancer,
        XDP_TX,
        Gen::new(syn.clone(), refused),
    );
    run_rounds(&dp, &mut baseline, &mut [&mut refusal])?;

    let stats = maps.global_stats()?;
    println!(
        "data plane, {BACKENDS} backends, Maglev table {}, connection tables of {capacity} entries \
         ({cpus} possible CPUs x 1,048,576; each filled and emptied before timing); pinned to CPU 0; \
         {} rounds of {CHUNK} calls per line, each beside a baseline chunk",
        MAGLEV_SIZE,
        rounds(),
    );
    println!(
        "{:<30} {:>9} {:>10} {:>10} {:>8} {:>12} {:>8} {:>9} {:>10} {:>8}",
        "line",
        "calls",
        "mean ns",
        "median ns",
        "p99 ns",
        "baseline ns",
        "ratio",
        "med. ratio",
        ">=10us per",
        "of time"
    );
    for spec in [
        &mut drop,
        &mut established,
        &mut cold_est,
        &mut non_vip,
        &mut tcp_syn,
        &mut tcp_new,
        &mut full_new,
        &mut full_syn,
        &mut udp_new,
        &mut ipip_est,
        &mut ipip_new,
        &mut gue_est,
        &mut gue_new,
        &mut v6_est,
        &mut v6_new,
        &mut refusal,
    ] {
        if spec.line.samples.is_empty() {
            continue;
        }
        let base = spec.line.baseline();
        let mean = spec.line.mean();
        let median = spec.line.median();
        let p99 = spec.line.quantile(0.99);
        let (slow, share) = spec.line.slow(10_000);
        println!(
            "{:<30} {:>9} {:>10.1} {:>10.1} {:>8.0} {:>12.1} {:>8.2} {:>9.2} {:>9.1}\u{2030} {:>7.1}%",
            spec.name,
            spec.line.samples.len(),
            mean,
            median,
            p99,
            base,
            mean / base,
            median / base,
            slow,
            share
        );
    }
    println!(
        "(ratio = the line's mean over the mean of the baseline chunks beside it; med. ratio = \
         its median over the same; >=10us: calls of 10 us or more, per thousand, and their \
         share of the line's time; connection-table hits {}, misses {}, refused as full {})",
        stats.lru_hit, stats.lru_miss, stats.conn_table_full
    );

    if selected("live frames") {
        plan.config.unavailable = false;
        maps.write_service(key, &plan)?;
        live_lines(&mut dp, &syn, &ack, &to_other)?;
    }
    Ok(())
}
