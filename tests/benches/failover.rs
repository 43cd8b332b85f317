//! Failover time of the cluster in the lab: from `kill -9` of the daemon serving a VIP
//! (and its link going down) to the first answered request, with a client opening a
//! new connection every 10 ms (each on its own thread, so one lost SYN does not hide
//! the next). Per heartbeat interval (timeout = 3 intervals); the baseline of each
//! line is its own timeout, the detection floor no failover can beat. Then the
//! planned moves (handback, restarts, leave): requests lost, connections broken.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use lb_tests::{chaos::scenarios, cluster_lab::Cluster};
use nix::sys::signal::Signal;

/// One failover (lb1, the owner of VIP 1 and the leader, dies: kill -9 and link
/// down), measured by the chaos prober; then lb1 comes back and takes its VIP back.
fn once(c: &mut Cluster) -> Result<Duration> {
    let f = scenarios::failover(c);
    let took = f.recovered.context("no answer after the failover")?;
    ensure!(f.broken.is_empty(), "connections broke: {:?}", f.broken);
    scenarios::handback(c);
    Ok(took)
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
    for (interval, runs) in [(100u64, 30usize), (50, 10), (200, 10)] {
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
    // The planned moves, with the chaos instruments (a new TCP connection and a new
    // UDP datagram every 10 ms, ten long-lived connections): requests lost.
    println!();
    println!("planned moves (defaults: interval 100 ms, timeout 300 ms): failed probes per run, broken long-lived connections");
    println!(
        "{:>24} {:>5} {:>12} {:>14} {:>8} {:>10}",
        "move", "runs", "probes", "failed probes", "broken", "worst run"
    );
    let mut c = Cluster::new("bench-moves");
    let mut rows: Vec<(&str, Vec<lb_tests::chaos::Outcome>)> = vec![
        ("failover (kill -9)", vec![]),
        ("handback", vec![]),
        ("restart (SIGTERM)", vec![]),
        ("restart (kill -9)", vec![]),
        ("leave (shutdown --detach)", vec![]),
    ];
    for _ in 0..10 {
        rows[0].1.push(scenarios::failover(&mut c));
        rows[1].1.push(scenarios::handback(&mut c));
        rows[2].1.push(scenarios::restart(&mut c, Signal::SIGTERM));
        rows[3].1.push(scenarios::restart(&mut c, Signal::SIGKILL));
    }
    for _ in 0..5 {
        rows[4].1.push(scenarios::detach(&mut c));
        c.start("lb2");
    }
    for (name, outcomes) in &rows {
        let probes: usize = outcomes.iter().map(|o| o.probes).sum();
        let failed: usize = outcomes.iter().map(|o| o.failed_probes).sum();
        let broken: usize = outcomes.iter().map(|o| o.broken.len()).sum();
        let worst = outcomes.iter().map(|o| o.failed_probes).max().unwrap_or(0);
        println!(
            "{:>24} {:>5} {:>12} {:>14} {:>8} {:>10}",
            name,
            outcomes.len(),
            probes,
            failed,
            broken,
            worst
        );
    }
    Ok(())
}
