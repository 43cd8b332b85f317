//! The scale table (`cargo xtask bench`): lbd (release build) on the lab's lb1 with
//! configs of growing size. Per case: start from empty and restart on the pinned maps
//! (until `lbctl status` answers with every service in the maps), lbd's own memory
//! (anonymous RSS: the mapped ring and backend table are the kernel's, counted in the
//! maps column), the
//! kernel memory of its maps (each map's own `memlock` in lbd's fdinfo), one change
//! (`lbctl backend add` to the last service), `service list` / `stats` / `/metrics`
//! (each the median of five),
//! and the longest `lbctl status`, `/metrics` and `service list` while a change of
//! every service is applied. lbctl's
//! own start-up is in every command figure: its floor is the `lbctl version` line.

use std::{
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{bail, ensure, Context, Result};
use lb_tests::lab::{Lab, Proc};
use nix::sys::signal::Signal;

struct Case {
    services: u32,
    backends: u32,
}

const CASES: [Case; 7] = [
    Case {
        services: 1,
        backends: 3,
    },
    Case {
        services: 100,
        backends: 3,
    },
    Case {
        services: 1_000,
        backends: 3,
    },
    Case {
        services: 10_000,
        backends: 3,
    },
    Case {
        services: 1,
        backends: 1_000,
    },
    Case {
        services: 1,
        backends: 10_000,
    },
    Case {
        services: 1,
        backends: 100_000,
    },
];

fn binary(name: &str) -> PathBuf {
    Lab::target_binary(name).expect("built by xtask before the bench")
}

/// Service `i`'s VIP and port: 100 ports per address in 198.18.200.0/22.
fn service(i: u32) -> (String, u16) {
    let a = 200 * 256 + i / 100;
    (
        format!("198.18.{}.{}", a >> 8, a & 255),
        1000 + (i % 100) as u16,
    )
}

/// Backend `j`: 198.19.0.0/16 and up, its MAC made of its number.
fn backend(j: u32) -> (String, String) {
    let a = 0xc613_0000u32 + j;
    (
        std::net::Ipv4Addr::from(a).to_string(),
        format!(
            "02:00:00:{:02x}:{:02x}:{:02x}",
            (j >> 16) & 255,
            (j >> 8) & 255,
            j & 255
        ),
    )
}

fn services_text(case: &Case, extra: u32) -> String {
    let mut s = String::new();
    for i in 0..case.services {
        let (vip, port) = service(i);
        s.push_str(&format!(
            "[[service]]\nvip = \"{vip}\"\nport = {port}\nprotocol = \"tcp\"\n"
        ));
        // In the 10,000-service case the last service has 1,000 backends: the issue's
        // "a change to a service of 1,000 while 10,000 exist".
        let big = case.services >= 10_000 && i == case.services - 1;
        let n = if big { 1000 } else { case.backends };
        for b in 0..n + extra {
            let j = if big {
                2_000_000 + b
            } else {
                i * (case.backends + 1) + b
            };
            let (addr, mac) = backend(j);
            s.push_str(&format!(
                "[[service.backend]]\naddress = \"{addr}\"\nmac = \"{mac}\"\n"
            ));
        }
    }
    s
}

fn config(dir: &Path, pin: &Path, case: &Case) -> String {
    let total = case.services * (case.backends + 1) + 1001;
    // Two slots of each table: 3 (+1) backends get 367 or 521 cells, N backends at
    // most 100 N x sqrt(2) rounded up to a prime.
    // The default ring (24M cells) holds the services cases; one service of N
    // backends needs two slots of about 100 N x sqrt(2) cells.
    let per_table = (case.backends as u64 + 1) * 100 * 146 / 100 + 1000;
    let ring = (case.services as u64 * 2 * per_table).clamp(24 << 20, 1 << 28);
    format!(
        "[node]\nname = \"scale\"\napi_socket = \"{d}/lbd.sock\"\nmetrics_listen = \"127.0.0.1:9469\"\n\
         state_dir = \"{d}/state\"\npin_dir = \"{p}\"\n\n[dataplane]\n\
         interfaces = [{{ name = \"eth0\", xdp_mode = \"skb\" }}]\n\
         max_services = {ms}\nmax_backends = {mb}\nring_cells = {ring}\nconn_table_size = 65536\n\n{svc}",
        d = dir.display(),
        p = pin.display(),
        ms = case.services.max(16),
        mb = (total + 16).max(1024),
        svc = services_text(case, 0),
    )
}

struct Node<'a> {
    lab: &'a Lab,
    dir: PathBuf,
    socket: PathBuf,
    lbd: Option<Proc>,
}

impl Node<'_> {
    fn lbctl(&self, args: &[&str]) -> Result<(Duration, String)> {
        let t = Instant::now();
        let out = Command::new(binary("lbctl"))
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()?;
        let took = t.elapsed();
        ensure!(
            out.status.success(),
            "lbctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok((took, String::from_utf8_lossy(&out.stdout).into_owned()))
    }

    /// Starts lbd; returns how long until it answers with `services` in the maps.
    fn start(&mut self, services: u32) -> Result<Duration> {
        let t = Instant::now();
        let log = self.dir.join(format!("lbd-{}.log", t.elapsed().as_nanos()));
        let config = self.dir.join("lbd.toml");
        self.lbd = Some(self.lab.spawn(
            "lb1",
            &binary("lbd"),
            &["--config", &config.to_string_lossy()],
            &log,
        )?);
        let deadline = t + Duration::from_secs(300);
        while Instant::now() < deadline {
            if let Ok((_, out)) = self.lbctl(&["-o", "json", "status"]) {
                let v: serde_json::Value = serde_json::from_str(&out)?;
                if v["services"].as_u64() == Some(services as u64)
                    || v["services"].as_array().map(|a| a.len() as u64) == Some(services as u64)
                {
                    return Ok(t.elapsed());
                }
            }
            if let Some(st) = self
                .lbd
                .as_mut()
                .expect("started")
                .wait_timeout(Duration::from_millis(20))?
            {
                bail!("lbd exited with {st}: {}", std::fs::read_to_string(&log)?);
            }
        }
        bail!(
            "lbd did not come up in 300 s: {}",
            std::fs::read_to_string(&log)?
        )
    }

    fn stop(&mut self) -> Result<()> {
        if let Some(mut p) = self.lbd.take() {
            p.signal(Signal::SIGTERM)?;
            p.wait_timeout(Duration::from_secs(30))?
                .context("lbd did not stop within 30 s")?;
        }
        Ok(())
    }

    fn pid(&self) -> u32 {
        self.lbd.as_ref().map_or(0, |p| p.pid())
    }

    fn rss_mb(&self) -> f64 {
        std::fs::read_to_string(format!("/proc/{}/status", self.pid()))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("RssAnon:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
            })
            .map_or(0.0, |kb| kb / 1024.0)
    }

    /// The sum of the `memlock` of every BPF map lbd holds, each counted once.
    fn map_mib(&self) -> f64 {
        let mut seen = std::collections::BTreeSet::new();
        let mut bytes = 0u64;
        let Ok(fds) = std::fs::read_dir(format!("/proc/{}/fdinfo", self.pid())) else {
            return 0.0;
        };
        for fd in fds.flatten() {
            let Ok(info) = std::fs::read_to_string(fd.path()) else {
                continue;
            };
            let field = |name: &str| {
                info.lines()
                    .find(|l| l.starts_with(name))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            };
            if let (Some(id), Some(mem)) = (field("map_id:"), field("memlock:")) {
                if seen.insert(id) {
                    bytes += mem;
                }
            }
        }
        bytes as f64 / (1 << 20) as f64
    }

    fn metrics(&self) -> Result<Duration> {
        let t = Instant::now();
        let out = self
            .lab
            .host("lb1")
            .ns
            .command("curl")
            .args(["-sf", "-o", "/dev/null", "http://127.0.0.1:9469/metrics"])
            .status()?;
        ensure!(out.success(), "GET /metrics failed");
        Ok(t.elapsed())
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn run(lab: &Lab, case: &Case) -> Result<String> {
    let dir = std::env::temp_dir().join(format!("lb-scale-{}", std::process::id()));
    let pin = PathBuf::from(format!("/sys/fs/bpf/lb/scale-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&pin);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("lbd.toml"), config(&dir, &pin, case))?;
    let mut node = Node {
        lab,
        socket: dir.join("lbd.sock"),
        dir: dir.clone(),
        lbd: None,
    };
    let result = (|| -> Result<String> {
        let start = node.start(case.services)?;
        if let Ok(secs) = std::env::var("LB_BENCH_SCALE_HOLD") {
            // For profiling by hand: the node stays up this long.
            println!("holding: lbctl --socket {}", node.socket.display());
            std::thread::sleep(Duration::from_secs(secs.parse().unwrap_or(60)));
        }
        let (rss, maps) = (node.rss_mb(), node.map_mib());
        let (floor, _) = node.lbctl(&["--version"])?;
        let (last_vip, last_port) = service(case.services - 1);
        let svc = format!("tcp/{last_vip}:{last_port}");
        // Once the start's own work (the SPM records, the first feed) is done: the
        // median of five changes to the last service.
        std::thread::sleep(Duration::from_secs(3));
        let mut changes = Vec::new();
        for k in 0..5 {
            let (addr, mac) = backend(case.services * (case.backends + 1) + 1000 + k);
            changes.push(
                node.lbctl(&["backend", "add", &svc, &addr, "--mac", &mac])?
                    .0,
            );
        }
        changes.sort();
        let change = changes[2];
        // Each the median of five, as the change: single reads vary by tens of ms here.
        let median = |mut v: Vec<Duration>| {
            v.sort();
            v[v.len() / 2]
        };
        let list = median(
            (0..5)
                .map(|_| Ok(node.lbctl(&["service", "list"])?.0))
                .collect::<Result<_>>()?,
        );
        let stats = median(
            (0..5)
                .map(|_| Ok(node.lbctl(&["stats"])?.0))
                .collect::<Result<_>>()?,
        );
        let metrics = median((0..5).map(|_| node.metrics()).collect::<Result<_>>()?);
        // A change of every service (one backend more each) applied from a file,
        // while `lbctl status` is asked every 20 ms.
        let file = dir.join("bigger.toml");
        std::fs::write(&file, services_text(case, 1))?;
        let socket = node.socket.clone();
        let apply = std::thread::spawn(move || {
            let t = Instant::now();
            let ok = Command::new(binary("lbctl"))
                .arg("--socket")
                .arg(&socket)
                .args(["apply", "-f", &file.to_string_lossy()])
                .output()
                .map(|o| {
                    o.status
                        .success()
                        .then_some(())
                        .ok_or_else(|| String::from_utf8_lossy(&o.stderr).into_owned())
                });
            (t.elapsed(), ok)
        });
        let (mut worst, mut worst_metrics, mut worst_list) =
            (Duration::ZERO, Duration::ZERO, Duration::ZERO);
        while !apply.is_finished() {
            let (took, _) = node.lbctl(&["status"])?;
            worst = worst.max(took);
            worst_metrics = worst_metrics.max(node.metrics()?);
            worst_list = worst_list.max(node.lbctl(&["service", "list"])?.0);
            std::thread::sleep(Duration::from_millis(20));
        }
        let (applied, ok) = apply.join().expect("apply thread");
        match ok {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("lbctl apply of every service: {e}"),
            Err(e) => bail!("running lbctl apply: {e}"),
        }
        node.stop()?;
        let resume = node.start(case.services)?;
        Ok(format!(
            "{:>8} x {:<7}{} {:>9.2} {:>9.2} {:>8.0} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>9.1} {:>10.0} {:>9.1} {:>11.1} {:>9.1}",
            case.services,
            case.backends,
            if case.services >= 10_000 { " (last: 1,000)" } else { "" },
            start.as_secs_f64(),
            resume.as_secs_f64(),
            rss,
            maps,
            ms(change),
            ms(list),
            ms(stats),
            ms(metrics),
            ms(floor),
            ms(applied),
            ms(worst),
            ms(worst_metrics),
            ms(worst_list),
        ))
    })();
    let _ = node.lbctl(&["shutdown", "--detach"]);
    let _ = node.stop();
    if let Ok(keep) = std::env::var("LB_BENCH_SCALE_LOGS") {
        // For profiling by hand: lbd's logs of each start are kept there.
        let _ = std::fs::create_dir_all(&keep);
        for log in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            if log.file_name().to_string_lossy().ends_with(".log") {
                let to = Path::new(&keep).join(format!(
                    "{}x{}-{}",
                    case.services,
                    case.backends,
                    log.file_name().to_string_lossy()
                ));
                let _ = std::fs::copy(log.path(), to);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&pin);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn main() -> Result<()> {
    let filter: Option<u32> = std::env::var("LB_BENCH_SCALE_MAX")
        .ok()
        .and_then(|v| v.parse().ok());
    let lab = Lab::new()?.standard(&std::env::temp_dir())?;
    println!("scale: lbd (release) on one node, backends with their MACs configured; times in s, commands in ms (lbctl's own floor in `lbctl`)");
    println!(
        "{:>18} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10} {:>10} {:>11} {:>9}",
        "services x backends",
        "start s",
        "resume s",
        "anon MB",
        "maps MiB",
        "1 change",
        "list",
        "stats",
        "metrics",
        "lbctl",
        "apply all",
        "status max",
        "metrics max",
        "list max"
    );
    for case in CASES {
        let only: Option<u32> = std::env::var("LB_BENCH_SCALE_ONLY")
            .ok()
            .and_then(|v| v.parse().ok());
        if filter.is_some_and(|m| case.services * case.backends > m)
            || only.is_some_and(|n| case.services * case.backends != n)
        {
            continue;
        }
        match run(&lab, &case) {
            Ok(line) => println!("{line}"),
            Err(e) => println!("{:>8} x {:<7} failed: {e:#}", case.services, case.backends),
        }
    }
    Ok(())
}
