//! Directory throughput: changes per second the master commits, with its backup and
//! 3 agents, and with 100 agents, all in one process with instant delivery (the
//! protocol's own cost, no network). Baseline: applying the same changes straight to
//! one table, measured in the same run.

use std::time::Instant;

use lb_userspace::directory::{
    replication::{Agent, Backup, Master, Msg, Out},
    tables::{Change, Op, Tables},
};

fn change(i: u64) -> Change {
    Change {
        table: "svc.tcp/198.18.0.100:8080".into(),
        key: format!("web.{}", i % 5000),
        op: Op::Put {
            value: format!(
                "198.18.{}.{}:8080;weight={}",
                (i / 250) % 250,
                i % 250,
                1 + i % 3
            ),
            valid: !i.is_multiple_of(7),
        },
    }
}

/// Commits `n` changes submitted round-robin by the agents; returns changes/s.
fn run(agents: u32, n: u64) -> f64 {
    let mut master = Master::new(0, Some(1));
    let mut backup = Backup::new(1);
    let mut agents: Vec<Agent> = (0..agents).map(|i| Agent::new(10 + i, 0, 1)).collect();
    let start = Instant::now();
    for i in 0..n {
        let a = (i % agents.len() as u64) as usize;
        let (_, outs) = agents[a].submit(change(i));
        let from = agents[a].id;
        // (from, to, message): the master hears its backup's messages only from it.
        let mut queue: Vec<(u32, u32, Msg)> = outs
            .into_iter()
            .filter_map(|o| match o {
                Out::To(to, m) => Some((from, to, m)),
                Out::All(_) => None,
            })
            .collect();
        while let Some((from, to, msg)) = queue.pop() {
            let outs = match to {
                0 => master.handle(from, msg),
                1 => backup.handle(from, msg),
                id => agents[(id - 10) as usize].handle(msg).1,
            };
            for o in outs {
                match o {
                    Out::To(next, m) => queue.push((to, next, m)),
                    Out::All(m) => {
                        for ag in agents.iter() {
                            queue.push((to, ag.id, m.clone()));
                        }
                    }
                }
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    assert_eq!(master.version(), n);
    assert!(agents.iter().all(|a| a.version() == n && a.unacked() == 0));
    n as f64 / secs
}

fn baseline(n: u64) -> f64 {
    let mut t = Tables::default();
    let start = Instant::now();
    for i in 0..n {
        t.apply(&change(i));
    }
    n as f64 / start.elapsed().as_secs_f64().max(f64::EPSILON)
}

fn main() {
    let n = 100_000;
    let base = baseline(n);
    println!("directory throughput, {n} changes each (in-process, instant delivery)");
    println!("{:<44} {:>14} {:>10}", "line", "changes/s", "ratio");
    println!(
        "{:<44} {:>14.0} {:>10.2}",
        "baseline: apply to one table", base, 1.0
    );
    for (agents, count) in [(3u32, n), (100, n / 10)] {
        let rate = run(agents, count);
        println!(
            "{:<44} {:>14.0} {:>10.3}",
            format!("master + backup + {agents} agents"),
            rate,
            rate / base
        );
    }
}
