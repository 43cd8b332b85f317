//! Failover time of the cluster in the lab: from `kill -9` of the daemon serving a VIP
//! (and its link going down) to the first answered request, with a client asking every
//! 10 ms. Per heartbeat interval (timeout = 3 intervals); the baseline of each line is
//! its own timeout, the detection floor no failover can beat.

use std::{
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use anyhow::{ensure, Context, Result};
use lb_tests::{
    cluster_lab::{vip_addr, Cluster},
    lab::standard,
    traffic,
};
use nix::sys::signal::Signal;

/// One failover: lb1 dies; returns the time to the first answer after the kill; then
/// lb1 comes back and the cluster settles again.
fn once(c: &mut Cluster) -> Result<Duration> {
    c.settle(Duration::from_secs(10));
    let vip1 = vip_addr(standard::VIP);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let stream = c.lab.host("client").ns.spawn(move || {
        let mut log = Vec::new();
        let start = Instant::now();
        while !flag.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(20) {
            let ok = traffic::http_get(None, vip1, Duration::from_millis(100)).is_ok();
            log.push((Instant::now(), ok));
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(log)
    });
    std::thread::sleep(Duration::from_millis(200));
    c.lbds
        .get("lb1")
        .context("lb1 runs")?
        .signal(Signal::SIGKILL)?;
    c.lab.host("lb1").ns.ip("link set eth0 down")?;
    let killed = Instant::now();
    c.lbds.remove("lb1");
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut resumed = None;
    while resumed.is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        // Peek: the stream thread owns the log, so wait for an answer via owners.
        let o = c.owners();
        if o.get(&standard::VIP.to_string())
            .is_some_and(|v| v.len() == 1)
        {
            resumed = Some(());
        }
    }
    std::thread::sleep(Duration::from_millis(400));
    stop.store(true, Ordering::Relaxed);
    let log = stream
        .join()
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    let first = log
        .iter()
        .find(|(t, ok)| *t > killed && *ok)
        .map(|(t, _)| *t - killed)
        .context("no answer after the failover")?;
    c.lab.host("lb1").ns.ip("link set eth0 up")?;
    c.start("lb1");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let o = c.settle(Duration::from_secs(10));
        if o[&standard::VIP.to_string()] == ["lb1"] {
            break;
        }
        ensure!(Instant::now() < deadline, "lb1 did not get its VIP back");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(first)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn main() -> Result<()> {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!("cluster failover: kill -9 + link down of the VIP's node -> first answered request (client every 10 ms)");
    println!(
        "{:>10} {:>10} {:>5} {:>9} {:>9} {:>9} {:>9} {:>16}",
        "interval", "timeout", "runs", "min ms", "median", "p95", "max", "median/timeout"
    );
    for (interval, runs) in [(100u64, 20usize), (50, 10), (200, 10)] {
        let mut c = Cluster::with_interval(&format!("bench{interval}"), interval);
        let mut times = Vec::new();
        for _ in 0..runs {
            times.push(once(&mut c)?);
        }
        times.sort();
        let timeout = Duration::from_millis(3 * interval);
        let median = percentile(&times, 0.5);
        println!(
            "{:>8} ms {:>7} ms {:>5} {:>9.0} {:>9.0} {:>9.0} {:>9.0} {:>16.2}",
            interval,
            3 * interval,
            runs,
            ms(times[0]),
            ms(median),
            ms(percentile(&times, 0.95)),
            ms(*times.last().expect("runs > 0")),
            median.as_secs_f64() / timeout.as_secs_f64()
        );
    }
    Ok(())
}
