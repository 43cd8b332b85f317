//! Directory propagation in the lab: from a change submitted on one LB node (lb3, not
//! the master) to that change being in every node's replica, whose applying step also
//! rewrites that node's maps. 100 changes; p50/p99. Polls each node's API over its
//! Unix socket directly (no process per poll). Baseline: the same round on one node's
//! own API (a query answered, no replication), measured in the same run.

use std::{
    io::{Read, Write},
    os::unix::net::UnixStream,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{bail, Result};
use lb_tests::{cluster_lab::Cluster, lab::standard};

fn http(socket: &Path, method: &str, path: &str, body: &str) -> Result<String> {
    let mut s = UnixStream::connect(socket)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: lbd\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> Result<()> {
    let c = Cluster::new("propagation");
    c.settle(Duration::from_secs(10));
    let table = format!("svc.tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    let enc: String = table
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect();
    let search = format!("/v1/dir/search?table={enc}&prefix=bench");
    let sockets: Vec<_> = ["lb1", "lb2", "lb3"]
        .iter()
        .map(|lb| c.socket(lb))
        .collect();
    let mut spread = Vec::new();
    let mut local = Vec::new();
    for i in 0..100u32 {
        let value = format!("198.18.0.13:8080;weight={};rev={i}", 1 + i % 9);
        let body = format!(r#"{{"table":"{table}","key":"bench","value":"{value}","valid":true}}"#);
        let start = Instant::now();
        http(&sockets[2], "POST", "/v1/dir/add", &body)?;
        for s in &sockets {
            loop {
                if http(s, "GET", &search, "")?.contains(&format!("rev={i}\"")) {
                    break;
                }
                if start.elapsed() > Duration::from_secs(5) {
                    bail!("change {i} did not reach {}", s.display());
                }
            }
        }
        spread.push(start.elapsed());
        let t = Instant::now();
        http(&sockets[2], "GET", &search, "")?;
        local.push(t.elapsed());
    }
    spread.sort();
    local.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "directory propagation: change on lb3 -> in all 3 replicas (and their maps), 100 changes"
    );
    println!(
        "{:<40} {:>9} {:>9} {:>9}",
        "line", "p50 ms", "p99 ms", "p50 ratio"
    );
    println!(
        "{:<40} {:>9.2} {:>9.2} {:>9.2}",
        "baseline: one API query on lb3",
        ms(percentile(&local, 0.5)),
        ms(percentile(&local, 0.99)),
        1.0
    );
    println!(
        "{:<40} {:>9.2} {:>9.2} {:>9.2}",
        "change -> every node",
        ms(percentile(&spread, 0.5)),
        ms(percentile(&spread, 0.99)),
        percentile(&spread, 0.5).as_secs_f64() / percentile(&local, 0.5).as_secs_f64()
    );
    Ok(())
}
