//! `cargo xtask lab up|down|status` and `cargo xtask demo`.

use std::{
    net::SocketAddr,
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

[[service]]
vip = "{vip}"
port = {port}
protocol = "tcp"
{backends}
[[service]]
vip = "{vip}"
port = {port}
protocol = "udp"
{backends}"#,
        ip = standard::backend_ip(octet),
        vip = standard::VIP,
        port = standard::SERVICE_PORT,
    )
}

pub fn config_path(lb: &str) -> PathBuf {
    Path::new(RUN_DIR).join(format!("lbd-{lb}.toml"))
}

/// Builds the lab and leaves it running; returns it (its namespaces stay on drop).
pub fn up() -> Result<Lab> {
    down()?;
    let lab = Lab::persistent()?.standard(Path::new(RUN_DIR))?;
    for (lb, octet) in standard::LBS {
        std::fs::write(config_path(lb), lbd_config(lb, octet))?;
    }
    println!(
        "lab up: namespaces {}",
        lab::persistent_namespaces().join(", ")
    );
    println!(
        "  client 198.18.0.{} (+ sources .21-.40), lb1 .2 (owns VIP {}), lb2 .3, backends b1-b3 .11-.13 serving TCP/UDP {}",
        standard::CLIENT,
        standard::VIP,
        standard::SERVICE_PORT
    );
    println!(
        "  lbd configs: {}, {}",
        config_path("lb1").display(),
        config_path("lb2").display()
    );
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
        let _ = std::fs::remove_file(Path::new(RUN_DIR).join(format!("{lb}.sock")));
    }
    Ok(())
}

pub fn status() -> Result<()> {
    let names = lab::persistent_namespaces();
    if names.is_empty() {
        println!("the lab is down (cargo xtask lab up)");
        return Ok(());
    }
    println!("namespaces: {}", names.join(", "));
    for (lb, _) in standard::LBS {
        let socket = Path::new(RUN_DIR).join(format!("{lb}.sock"));
        if socket.exists() {
            println!("--- lbd on {lb}");
            let _ = Command::new(target_dir().join("lbctl"))
                .args(["--socket", &socket.to_string_lossy(), "status"])
                .status();
        } else {
            println!("--- no lbd on {lb}");
        }
    }
    Ok(())
}

/// Waits until lbd answers on its socket (it binds the socket before it is ready).
fn wait_ready(path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let ok = Command::new(target_dir().join("lbctl"))
            .args(["--socket", &path.to_string_lossy(), "status"])
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
        "lbd did not answer on {} within {timeout:?}",
        path.display()
    )
}

pub fn demo(wait: bool) -> Result<()> {
    // Block the signals first, so that Ctrl-C reaches sigwait below, not the default
    // handler, and the lab is always torn down.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.thread_block()?;

    let _lab = up()?;
    let lb1 = Netns::open("lblab-lb1", true)?;
    let log = Path::new(RUN_DIR).join("lbd-lb1.log");
    let socket = Path::new(RUN_DIR).join("lb1.sock");
    let log_file = std::fs::File::create(&log)?;
    let child = lb1
        .command(&target_dir().join("lbd").to_string_lossy())
        .args([
            "--config",
            &config_path("lb1").to_string_lossy(),
            "--detach-on-exit",
        ])
        .stdin(Stdio::null())
        .stdout(log_file.try_clone()?)
        .stderr(log_file)
        .process_group(0)
        .spawn()
        .context("starting lbd")?;
    std::fs::write(
        Path::new(RUN_DIR).join("lbd-lb1.pid"),
        child.id().to_string(),
    )?;
    let result = (|| -> Result<()> {
        wait_ready(&socket, Duration::from_secs(20))
            .with_context(|| format!("see {}", log.display()))?;
        println!("lbd runs on lb1 (log: {})", log.display());
        let client = Netns::open("lblab-client", true)?;
        let sources: Vec<_> = standard::client_sources().collect();
        let vip = SocketAddr::from((standard::VIP, standard::SERVICE_PORT));
        let report = client
            .spawn(move || {
                let tcp = traffic::http_spread(&sources, vip, 300, Duration::from_secs(3))?;
                let udp = traffic::udp_spread(&sources, vip, 90, Duration::from_secs(3))?;
                Ok((tcp, udp))
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
        println!(
            "\n{:<10} {:>14} {:>14}",
            "backend", "HTTP (of 300)", "UDP (of 90)"
        );
        for (name, n) in &report.0 {
            println!(
                "{:<10} {:>14} {:>14}",
                name,
                n,
                report.1.get(name).copied().unwrap_or(0)
            );
        }
        let lbctl = target_dir().join("lbctl");
        println!("\nLook around:");
        println!("  {} --socket {} status", lbctl.display(), socket.display());
        println!(
            "  {} --socket {} stats --watch",
            lbctl.display(),
            socket.display()
        );
        println!("  nsenter --net=/run/netns/lblab-lb1 curl -s http://127.0.0.1:9469/metrics");
        println!(
            "  nsenter --net=/run/netns/lblab-client curl -s http://{}:{}/",
            standard::VIP,
            standard::SERVICE_PORT
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
