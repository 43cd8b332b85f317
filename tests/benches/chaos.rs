//! The chaos suite's long forms (`cargo xtask chaos`): every fault of the cluster
//! issue, repeated, against the release build, with the prober (a new TCP connection
//! and a new UDP datagram every 10 ms), ten long-lived connections and the sampler of
//! which node claims each VIP. Prints one line per scenario; fails if a promise broke
//! (a broken connection, a lost request on a planned move, a VIP left on a node that
//! does not own it).

use std::time::Duration;

use anyhow::{ensure, Result};
use lb_tests::{
    chaos::{one_holder_each, scenarios, Outcome},
    cluster_lab::Cluster,
};
use nix::sys::signal::Signal;

struct Row {
    name: String,
    outcomes: Vec<Outcome>,
    /// Planned moves must lose nothing.
    lossless: bool,
}

fn print(rows: &[Row]) {
    println!(
        "{:>42} {:>5} {:>8} {:>7} {:>7} {:>14} {:>14}",
        "scenario", "runs", "probes", "failed", "broken", "recovered med", "dup max ms"
    );
    for r in rows {
        let mut rec: Vec<Duration> = r.outcomes.iter().filter_map(|o| o.recovered).collect();
        rec.sort();
        let med = rec
            .get(rec.len() / 2)
            .map_or("-".into(), |d| format!("{:.0} ms", d.as_secs_f64() * 1e3));
        println!(
            "{:>42} {:>5} {:>8} {:>7} {:>7} {:>14} {:>14.0}",
            r.name,
            r.outcomes.len(),
            r.outcomes.iter().map(|o| o.probes).sum::<usize>(),
            r.outcomes.iter().map(|o| o.failed_probes).sum::<usize>(),
            r.outcomes.iter().map(|o| o.broken.len()).sum::<usize>(),
            med,
            r.outcomes
                .iter()
                .map(|o| o.duplicate.as_secs_f64() * 1e3)
                .fold(0.0, f64::max)
        );
    }
}

fn main() -> Result<()> {
    let mut rows: Vec<Row> = Vec::new();
    let mut row = |name: &str, lossless: bool, outcomes: Vec<Outcome>| {
        rows.push(Row {
            name: name.to_string(),
            outcomes,
            lossless,
        })
    };
    {
        let mut c = Cluster::new("chaos-long-kill");
        let (mut down, mut back, mut up, mut back_up) = (vec![], vec![], vec![], vec![]);
        for _ in 0..10 {
            down.push(scenarios::kill(&mut c, true));
            back.push(scenarios::handback(&mut c));
            up.push(scenarios::kill(&mut c, false));
            back_up.push(scenarios::handback(&mut c));
        }
        row("kill -9 + link down (failover)", false, down);
        row("handback after it", true, back);
        row("kill -9, link up (failover)", true, up);
        row("handback after it", true, back_up);
    }
    {
        let mut c = Cluster::new("chaos-long-restart");
        let (mut term, mut kill) = (vec![], vec![]);
        for _ in 0..5 {
            term.push(scenarios::restart(&mut c, Signal::SIGTERM));
            kill.push(scenarios::restart(&mut c, Signal::SIGKILL));
        }
        row("restart of the owner's lbd (SIGTERM)", true, term);
        row("restart of the owner's lbd (kill -9)", true, kill);
    }
    for secs in [10u64, 30] {
        let mut c = Cluster::new(&format!("chaos-long-flap{secs}"));
        let o = scenarios::flap(&mut c, Duration::from_secs(secs));
        let left = one_holder_each(&c, Duration::from_secs(5));
        ensure!(left.is_ok(), "after {secs} s of flapping: {left:?}");
        row(
            &format!("link flapping every 300 ms for {secs} s"),
            false,
            vec![o],
        );
    }
    {
        let mut runs = vec![];
        for i in 0..3 {
            let mut c = Cluster::with_quorum(&format!("chaos-long-double{i}"), 1);
            runs.push(scenarios::double_release(&mut c));
        }
        row("two releases at once", true, runs);
    }
    {
        let mut c = Cluster::new("chaos-long-detach");
        let mut runs = vec![];
        for _ in 0..3 {
            runs.push(scenarios::detach(&mut c));
            c.start("lb2");
        }
        row("owner leaving (shutdown --detach)", true, runs);
    }
    {
        let mut c = Cluster::new("chaos-long-partition");
        for secs in [2u64, 5, 10] {
            let o = scenarios::partition(&mut c, Duration::from_secs(secs));
            row(&format!("lb1 cut off for {secs} s"), false, vec![o]);
        }
    }
    {
        let mut c = Cluster::new("chaos-long-slowarp");
        let o = scenarios::join_with_slow_arp(&mut c, Duration::from_secs(3));
        row(
            "failover to a node that joined, ARP 3 s late",
            false,
            vec![o],
        );
    }
    print(&rows);
    for r in &rows {
        for o in &r.outcomes {
            ensure!(
                o.broken.is_empty(),
                "{}: connections broke: {:?}",
                r.name,
                o.broken
            );
            ensure!(
                !r.lossless || o.failed_probes == 0,
                "{}: {} requests lost",
                r.name,
                o.failed_probes
            );
        }
    }
    Ok(())
}
