//! Per-packet cost of the XDP program through `BPF_PROG_TEST_RUN`, against a baseline
//! program (swap MACs, `XDP_TX`) measured the same way in the same run.
//!
//! `repeat = 1` per call with a fresh frame each time, as Katran's perf tester does:
//! with `repeat > 1` the kernel reruns the program on its own output, and a new flow
//! would become an established one from the second repetition. The figure is the
//! kernel's own mean run time over the calls (it excludes the syscall), pinned to one
//! CPU because the connection table is per CPU.

#[path = "../tests/support/mod.rs"]
mod support;

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use lb_userspace::{
    plan::ServicePlan, Dataplane, Egress, L2Route, LoadOptions, Program, Programs, Proto,
    ServiceConfig, ServiceKey,
};
use support::{backend_mac, Frame, ETH_LEN, LB_MAC};

const VIP: &str = "198.18.0.100";
const MIN_TIME: Duration = Duration::from_secs(1);
const MIN_CALLS: u64 = 200_000;
const BACKENDS: u8 = 16;

const XDP_TX: u32 = 3;
const XDP_PASS: u32 = 2;

struct Line {
    name: &'static str,
    calls: u64,
    kernel_ns: f64,
    wall_ns: f64,
}

/// Runs `program` on frames from `next_frame` until `MIN_TIME` and `MIN_CALLS` are both
/// reached; every call must return `verdict`.
fn measure(
    dp: &Programs,
    name: &'static str,
    program: Program,
    verdict: u32,
    mut next_frame: impl FnMut(u64, &mut Vec<u8>),
) -> Result<Line> {
    let prog = dp.program(program);
    let mut frame = Vec::new();
    let mut out = vec![0u8; 2048];
    let mut kernel = Duration::ZERO;
    let mut calls = 0u64;
    let start = Instant::now();
    while calls < MIN_CALLS || start.elapsed() < MIN_TIME {
        next_frame(calls, &mut frame);
        let r = prog
            .test_run(TestRunOptions {
                data_in: Some(&frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .with_context(|| format!("{name}: BPF_PROG_TEST_RUN"))?;
        ensure!(
            r.return_value == verdict,
            "{name}: verdict {} instead of {verdict} on call {calls}",
            r.return_value
        );
        kernel += r.duration;
        calls += 1;
    }
    let wall = start.elapsed();
    Ok(Line {
        name,
        calls,
        kernel_ns: kernel.as_nanos() as f64 / calls as f64,
        wall_ns: wall.as_nanos() as f64 / calls as f64,
    })
}

/// Writes a distinct source (address, port) for flow `n` into a built IPv4/TCP frame.
/// Checksums are left stale: the program does not read them.
fn set_flow(frame: &mut [u8], n: u64) {
    let src = Ipv4Addr::new(
        198,
        19,
        (n >> 24) as u8 ^ ((n >> 16) as u8),
        (n >> 16) as u8,
    );
    frame[ETH_LEN + 12..ETH_LEN + 16].copy_from_slice(&src.octets());
    frame[ETH_LEN + 20..ETH_LEN + 22].copy_from_slice(&(n as u16).to_be_bytes());
}

fn main() -> Result<()> {
    let mut cpu0 = nix::sched::CpuSet::new();
    cpu0.set(0)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &cpu0)
        .context("pinning the benchmark to CPU 0")?;

    let (dp, mut maps) = Programs::load(&LoadOptions::default())
        .context("loading the XDP program (the benchmark must run as root)")?;
    let key = ServiceKey {
        addr: VIP.parse()?,
        port: 80,
        proto: Proto::Tcp,
    };
    let backends: Vec<_> = (1..=BACKENDS)
        .map(|i| {
            (
                format!("198.18.0.{i}").parse().expect("address"),
                1,
                L2Route {
                    dst_mac: backend_mac(i),
                    src_mac: LB_MAC,
                    egress: Egress::Ingress,
                },
            )
        })
        .collect();
    let mut plan = ServicePlan::with_backends(ServiceConfig::default(), backends);
    maps.write_service(key, &plan)?;

    let to_vip = Frame::tcp("198.19.0.1", VIP, 40000, 80).build();
    let to_other = Frame::tcp("198.19.0.1", "198.18.0.200", 40000, 80).build();

    let baseline = measure(
        &dp,
        "baseline: swap MACs, XDP_TX",
        Program::SwapMacs,
        XDP_TX,
        |_, f| {
            if f.is_empty() {
                *f = to_vip.clone();
            }
        },
    )?;
    let new_flow = measure(
        &dp,
        "new flow (LRU miss + Maglev)",
        Program::Balancer,
        XDP_TX,
        |n, f| {
            if f.is_empty() {
                *f = to_vip.clone();
            }
            set_flow(f, n);
        },
    )?;
    let established = measure(
        &dp,
        "established flow (LRU hit)",
        Program::Balancer,
        XDP_TX,
        |_, f| {
            if f.is_empty() {
                *f = to_vip.clone();
            }
        },
    )?;
    let non_vip = measure(
        &dp,
        "non-VIP packet (XDP_PASS)",
        Program::Balancer,
        XDP_PASS,
        |_, f| {
            if f.is_empty() {
                *f = to_other.clone();
            }
        },
    )?;
    // Maintenance: every SYN is answered with a RST by the program itself. A new
    // client address per call keeps the per-source refusal budget out of the way.
    plan.config.unavailable = true;
    maps.write_service(key, &plan)?;
    let refusal = measure(
        &dp,
        "refusal (SYN -> RST, maintenance)",
        Program::Balancer,
        XDP_TX,
        |n, f| {
            if f.is_empty() {
                *f = to_vip.clone();
            }
            let src = 0xc613_0000u32.wrapping_add(n as u32);
            f[26..30].copy_from_slice(&src.to_be_bytes());
        },
    )?;

    let stats = maps.global_stats()?;
    println!(
        "data plane, {} backends, Maglev table {}, connection table of {} entries; pinned to CPU 0",
        BACKENDS,
        ServiceConfig::default().maglev_size,
        LoadOptions::default().conn_table_size
    );
    println!(
        "{:<32} {:>10} {:>12} {:>10} {:>14}",
        "line", "calls", "ns/packet", "ratio", "wall ns/call"
    );
    for line in [&baseline, &new_flow, &established, &non_vip, &refusal] {
        println!(
            "{:<32} {:>10} {:>12.1} {:>10.2} {:>14.1}",
            line.name,
            line.calls,
            line.kernel_ns,
            line.kernel_ns / baseline.kernel_ns,
            line.wall_ns
        );
    }
    println!(
        "(ratio = ns/packet over the baseline's; LRU hits {}, misses {})",
        stats.lru_hit, stats.lru_miss
    );
    Ok(())
}
