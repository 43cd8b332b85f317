//! `cargo xtask lab up|down|status` and `cargo xtask demo`: three LB nodes running lbd
//! as a cluster in namespaces, two VIPs, three backends, a client.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_tests::{
    lab::{self, standard, Lab, RUN_DIR},
    netns::Netns,
    traffic,
};
use nix::sys::signal::{SigSet, Signal};

use crate::target_dir;

const LB_PIN_ROOT: &str = "/sys/fs/bpf/lb";
const GROUP: &str = "239.255.18.1:7400";

fn lbd_config(lb: &str, octet: u8) -> String {
    let backends: String = standard::BACKENDS
        .iter()
        .map(|(_, o)| {
            format!(
                "\n[[service.backend]]\naddress = \"{}\"\n",
                standard::backend_ip(*o)
            )
        })
        .collect();
    let mut services = String::new();
    for vip in [standard::VIP, standard::VIP2] {
        for proto in ["tcp", "udp"] {
            services.push_str(&format!(
                "\n[[service]]\nvip = \"{vip}\"\nport = {}\nprotocol = \"{proto}\"\n{backends}",
                standard::SERVICE_PORT
            ));
        }
    }
    let preferred = match lb {
        "lb1" => format!("\"{}\"", standard::VIP),
        "lb2" => format!("\"{}\"", standard::VIP2),
        _ => String::new(),
    };
    format!(
        r#"# lbd on the lab's {lb} ({ip}). Written by `cargo xtask lab up`.
[node]
name = "lab-{lb}"
api_socket = "{RUN_DIR}/{lb}.sock"
# Inside {lb}'s network namespace; from the host:
#   nsenter --net=/run/netns/lblab-{lb} curl -s http://127.0.0.1:9469/metrics
metrics_listen = "127.0.0.1:9469"
state_dir = "{RUN_DIR}/state-{lb}"
pin_dir = "{LB_PIN_ROOT}/lab-{lb}"

[dataplane]
# Generic mode: the lab's veth peers sit in a bridge namespace, and native XDP on
# veth would need an XDP program on each peer. A real NIC takes xdp_mode = "driver".
interfaces = [{{ name = "eth0", xdp_mode = "skb" }}]
max_services = 16
conn_table_size = 65536

[cluster]
id = "{ip}"
group = "{GROUP}"
nodes = 3
key = "lab-cluster-key-0123456789"
# lb1 prefers the first VIP, lb2 the second; lb3 prefers none: a hot spare.
preferred = [{preferred}]
{services}"#,
        ip = standard::backend_ip(octet),
    )
}

pub fn config_path(lb: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("lbd-{lb}.toml"))
}

fn socket(lb: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("{lb}.sock"))
}

/// Builds the lab and leaves it running; returns it (its namespaces stay on drop).
pub fn up() -> Result<Lab> {
    down()?;
    let lab = Lab::persistent()?.cluster(Path::new(RUN_DIR))?;
    for (lb, octet) in standard::LBS {
        std::fs::write(config_path(lb), lbd_config(lb, octet))?;
    }
    println!(
        "lab up: namespaces {}",
        lab::persistent_namespaces().join(", ")
    );
    println!(
        "  client 198.18.0.{} (+ sources .21-.40); LB nodes lb1 .2, lb2 .3, lb3 .4; backends b1-b3 .11-.13 serving TCP/UDP {}",
        standard::CLIENT,
        standard::SERVICE_PORT
    );
    println!(
        "  VIPs {} (lb1 prefers it) and {} (lb2 prefers it); lb3 is a hot spare",
        standard::VIP,
        standard::VIP2
    );
    println!("  lbd configs: {RUN_DIR}/lbd-lb{{1,2,3}}.toml");
    println!(
        "  start lbd:   nsenter --net=/run/netns/lblab-lb1 {}/lbd --config {}",
        target_dir().display(),
        config_path("lb1").display()
    );
    Ok(lab)
}

pub fn down() -> Result<()> {
    lab::teardown_persistent()?;
    for (lb, _) in standard::LBS {
        let _ = std::fs::remove_dir_all(Path::new(LB_PIN_ROOT).join(format!("lab-{lb}")));
        let _ = std::fs::remove_dir_all(Path::new(RUN_DIR).join(format!("state-{lb}")));
        let _ = std::fs::remove_file(socket(lb));
    }
    Ok(())
}

fn lbctl(lb: &str, args: &[&str]) -> Command {
    let mut cmd = Command::new(target_dir().join("lbctl"));
    cmd.arg("--socket").arg(socket(lb)).args(args);
    cmd
}

pub fn status() -> Result<()> {
    let names = lab::persistent_namespaces();
    if names.is_empty() {
        println!("the lab is down (cargo xtask lab up)");
        return Ok(());
    }
    println!("namespaces: {}", names.join(", "));
    for (lb, _) in standard::LBS {
        if socket(lb).exists() {
            println!("--- lbd on {lb}");
            let _ = lbctl(lb, &["status"]).status();
        } else {
            println!("--- no lbd on {lb}");
        }
    }
    if let Some((lb, _)) = standard::LBS.iter().find(|(lb, _)| socket(lb).exists()) {
        println!("--- the cluster, as {lb} sees it");
        let _ = lbctl(lb, &["cluster"]).status();
    }
    Ok(())
}

/// Waits until lbd answers on its socket (it binds the socket before it is ready).
fn wait_ready(lb: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let ok = lbctl(lb, &["status"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "lbd on {lb} did not answer on {} within {timeout:?}",
        socket(lb).display()
    )
}

/// Waits until each VIP is online on exactly one node; returns who serves what.
fn wait_assigned(timeout: Duration) -> Result<BTreeMap<String, String>> {
    let deadline = Instant::now() + timeout;
    // Every node ready (its start-up sync done) for a moment first, so that a
    // preferred node has had its VIP handed back.
    let mut ready_since: Option<Instant> = None;
    loop {
        let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut all_ready = true;
        for (lb, _) in standard::LBS {
            let out = lbctl(lb, &["-o", "json", "cluster"]).output()?;
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(&out.stdout) else {
                continue;
            };
            for h in v["hosts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|h| h["me"] == true)
            {
                all_ready &= h["info"]["ready"] != false;
                for (vip, state) in h["info"]["serving"].as_object().into_iter().flatten() {
                    if state == "online" {
                        owners.entry(vip.clone()).or_default().push(lb.to_string());
                    }
                }
            }
        }
        if all_ready {
            ready_since.get_or_insert_with(Instant::now);
        } else {
            ready_since = None;
        }
        let settled = ready_since.is_some_and(|t| t.elapsed() > Duration::from_millis(600));
        if settled && owners.len() == 2 && owners.values().all(|o| o.len() == 1) {
            return Ok(owners
                .into_iter()
                .map(|(k, mut v)| (k, v.remove(0)))
                .collect());
        }
        if Instant::now() > deadline {
            bail!("the cluster did not assign both VIPs within {timeout:?}: {owners:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn start_lbd(lb: &str) -> Result<()> {
    let ns = Netns::open(&format!("lblab-{lb}"), true)?;
    let log = Path::new(RUN_DIR).join(format!("lbd-{lb}.log"));
    let log_file = std::fs::File::create(&log)?;
    let child = ns
        .command(&target_dir().join("lbd").to_string_lossy())
        .args([
            "--config",
            &config_path(lb).to_string_lossy(),
            "--detach-on-exit",
        ])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .with_context(|| format!("starting lbd on {lb}"))?;
    std::fs::write(
        Path::new(RUN_DIR).join(format!("lbd-{lb}.pid")),
        child.id().to_string(),
    )?;
    wait_ready(lb, Duration::from_secs(20)).with_context(|| format!("see {}", log.display()))
}

pub fn demo(wait: bool) -> Result<()> {
    // Block the signals first, so that Ctrl-C reaches sigwait below, not the default
    // handler, and the lab is always torn down.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    let _lab = up()?;
    let result = (|| -> Result<()> {
        for (lb, _) in standard::LBS {
            start_lbd(lb)?;
        }
        let owners = wait_assigned(Duration::from_secs(10))?;
        println!(
            "\nlbd runs on lb1, lb2, lb3 (logs: {RUN_DIR}/lbd-lb*.log); the cluster assigned:"
        );
        for (vip, lb) in &owners {
            println!("  {vip} -> {lb}");
        }
        let client = Netns::open("lblab-client", true)?;
        let sources: Vec<Ipv4Addr> = standard::client_sources().collect();
        let report = client
            .spawn(move || {
                let mut out = Vec::new();
                for vip in [standard::VIP, standard::VIP2] {
                    let addr = SocketAddr::from((vip, standard::SERVICE_PORT));
                    let tcp = traffic::http_spread(&sources, addr, 150, Duration::from_secs(3))?;
                    let udp = traffic::udp_spread(&sources, addr, 45, Duration::from_secs(3))?;
                    out.push((vip, tcp, udp));
                }
                Ok(out)
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
        println!(
            "\n{:<14} {:<8} {:>14} {:>12}",
            "VIP", "backend", "HTTP (of 150)", "UDP (of 45)"
        );
        for (vip, tcp, udp) in &report {
            for (name, n) in tcp {
                println!(
                    "{:<14} {:<8} {:>14} {:>12}",
                    vip.to_string(),
                    name,
                    n,
                    udp.get(name).copied().unwrap_or(0)
                );
            }
        }
        println!();
        let _ = lbctl("lb3", &["cluster"]).status();
        let lbctl_path = target_dir().join("lbctl");
        println!("\nLook around:");
        println!(
            "  {} --socket {RUN_DIR}/lb1.sock status",
            lbctl_path.display()
        );
        println!(
            "  {} --socket {RUN_DIR}/lb3.sock cluster",
            lbctl_path.display()
        );
        println!(
            "  {} --socket {RUN_DIR}/lb2.sock events --follow",
            lbctl_path.display()
        );
        println!(
            "  {} --socket {RUN_DIR}/lb1.sock stats --watch",
            lbctl_path.display()
        );
        println!("  nsenter --net=/run/netns/lblab-lb1 curl -s http://127.0.0.1:9469/metrics");
        println!(
            "  nsenter --net=/run/netns/lblab-client curl -s http://{}:{}/",
            standard::VIP,
            standard::SERVICE_PORT
        );
        println!("Fail a node and watch the spare take over:");
        println!("  kill -9 $(cat {RUN_DIR}/lbd-lb1.pid); ip -n lblab-lb1 link set eth0 down");
        let svc = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
        println!("Put a service in maintenance on every node (clients are refused at once):");
        println!(
            "  {} --socket {RUN_DIR}/lb2.sock service maintenance {svc} --for 5m",
            lbctl_path.display()
        );
        println!(
            "  {} --socket {RUN_DIR}/lb2.sock service available {svc}",
            lbctl_path.display()
        );
        println!("See the Service Point Map a client would get:");
        println!(
            "  {} --socket {RUN_DIR}/lb3.sock spm show --service {svc} --client 198.18.0.10",
            lbctl_path.display()
        );
        Ok(())
    })();
    if result.is_ok() && wait {
        println!("\nThe lab keeps running; Ctrl-C tears it down.");
        let _ = signals.wait();
    }
    println!("tearing the lab down");
    down()?;
    result
}
