//! A lab with one standalone lbd on lb1, for the end-to-end tests that drive lbd and
//! lbctl as an operator does. Shared by the test files that include it (`mod common;`).
#![allow(dead_code)]

pub mod maps;

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use lb_tests::{
    lab::{standard, Lab, Proc},
    traffic,
};

pub const TIMEOUT: Duration = Duration::from_secs(3);

pub fn vip() -> SocketAddr {
    SocketAddr::from((standard::VIP, standard::SERVICE_PORT))
}

pub fn sources() -> Vec<Ipv4Addr> {
    standard::client_sources().collect()
}

/// A lab with lbd running on lb1, cleaned up on drop (lbd killed, pins removed, the
/// namespaces deleted), also when the test fails.
pub struct Env {
    pub lbd: Option<Proc>,
    pub lab: Lab,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub pin_dir: PathBuf,
}

pub fn config_text(node: &str, dir: &Path, pin_dir: &Path, backends: &[&str]) -> String {
    config_with_check(node, dir, pin_dir, backends, "")
}

/// An HTTP health check of the TCP service, quick enough for a test.
pub const HTTP_CHECK: &str = "\n[service.check]\nkind = \"http\"\npath = \"/\"\ninterval_ms = 200\ntimeout_ms = 200\nrise = 2\nfall = 2\n";

pub fn config_with_check(
    node: &str,
    dir: &Path,
    pin_dir: &Path,
    backends: &[&str],
    check: &str,
) -> String {
    let octets: BTreeMap<&str, u8> = standard::BACKENDS.iter().copied().collect();
    let list: String = backends
        .iter()
        .map(|b| {
            format!(
                "\n[[service.backend]]\naddress = \"{}\"\n",
                standard::backend_ip(octets[b])
            )
        })
        .collect();
    format!(
        r#"[node]
name = "{node}"
api_socket = "{dir}/lbd.sock"
metrics_listen = "127.0.0.1:9469"
state_dir = "{dir}/state"
pin_dir = "{pin}"
# Backends register themselves here (lb1's own address in the lab).
registry_listen = "198.18.0.2:9470"
registry_key = "{registry_key}"

[dataplane]
interfaces = [{{ name = "eth0", xdp_mode = "skb" }}]
max_services = 8
conn_table_size = 16384

[[service]]
vip = "{vip}"
port = {port}
protocol = "tcp"
{list}{check}
[[service]]
vip = "{vip}"
port = {port}
protocol = "udp"
{list}"#,
        dir = dir.display(),
        pin = pin_dir.display(),
        registry_key = REGISTRY_KEY,
        vip = standard::VIP,
        port = standard::SERVICE_PORT,
        check = check,
    )
}

/// `lbctl --socket SOCKET ARGS...`.
pub fn lbctl_at(socket: &Path, args: &[&str]) -> Output {
    std::process::Command::new(binary("lbctl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .output()
        .expect("running lbctl")
}

/// Runs `f` on a thread in the lab's client namespace; its answer.
pub fn on_client<T: Send + 'static>(
    lab: &Lab,
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> T {
    lab.host("client")
        .ns
        .spawn(f)
        .join()
        .expect("client thread panicked")
        .expect("client traffic")
}

pub fn binary(name: &str) -> PathBuf {
    Lab::target_binary(name).expect("workspace binaries are built by cargo test")
}

impl Env {
    pub fn new(test: &str, backends: &[&str]) -> Env {
        Self::with_check(test, backends, "")
    }

    pub fn with_check(test: &str, backends: &[&str], check: &str) -> Env {
        let lab = Lab::new()
            .expect("creating the lab")
            .standard(&std::env::temp_dir())
            .expect("standard topology");
        let node = format!("t{}-{test}", std::process::id());
        let dir = std::env::temp_dir().join(format!("lb-e2e-{node}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lb/{node}"));
        let config = dir.join("lbd.toml");
        std::fs::write(
            &config,
            config_with_check(&node, &dir, &pin_dir, backends, check),
        )
        .unwrap();
        let mut env = Env {
            lbd: None,
            lab,
            socket: dir.join("lbd.sock"),
            dir,
            config,
            pin_dir,
        };
        env.start_lbd();
        env
    }

    /// Starts lbd on lb1 and waits until it answers; returns how long that took.
    pub fn start_lbd(&mut self) -> Duration {
        self.start_lbd_with_env(&[])
    }

    /// Starts lbd with extra environment variables (e.g. a crash point).
    pub fn start_lbd_with_env(&mut self, vars: &[(&str, &str)]) -> Duration {
        let start = Instant::now();
        let log = self
            .dir
            .join(format!("lbd-{}.log", start.elapsed().as_nanos()));
        let proc = self
            .lab
            .spawn_with_env(
                "lb1",
                &binary("lbd"),
                &["--config", &self.config.to_string_lossy()],
                vars,
                &log,
            )
            .expect("starting lbd");
        self.lbd = Some(proc);
        let deadline = start + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.lbctl(&["status"]).status.success() {
                return start.elapsed();
            }
            if let Some(status) = self
                .lbd
                .as_mut()
                .unwrap()
                .wait_timeout(Duration::from_millis(50))
                .unwrap()
            {
                panic!(
                    "lbd exited with {status}: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
        }
        panic!(
            "lbd did not answer within 20 s: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    pub fn lbctl(&self, args: &[&str]) -> Output {
        lbctl_at(&self.socket, args)
    }

    pub fn lbctl_ok(&self, args: &[&str]) -> String {
        let out = self.lbctl(args);
        assert!(
            out.status.success(),
            "lbctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Requests lbd refused on one port (`lbctl status`'s `rejected`, keys
    /// "port/reason"), summed over the reasons; and the status it read them from.
    pub fn rejected_on(&self, port: &str) -> (u64, serde_json::Value) {
        let status: serde_json::Value =
            serde_json::from_str(&self.lbctl_ok(&["-o", "json", "status"])).unwrap();
        let n = status["rejected"]
            .as_object()
            .unwrap()
            .iter()
            .filter(|(k, _)| k.starts_with(&format!("{port}/")))
            .map(|(_, n)| n.as_u64().unwrap())
            .sum();
        (n, status)
    }

    /// Runs `f` on a thread in the client namespace.
    pub fn client<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> T {
        on_client(&self.lab, f)
    }

    pub fn spread(&self, n: usize) -> BTreeMap<String, usize> {
        let s = sources();
        self.client(move || traffic::http_spread(&s, vip(), n, TIMEOUT))
    }

    /// Rounds of `n` new connections until their spread satisfies `done`; how long
    /// that took. Fails after 10 s, saying `what` did not happen.
    pub fn spread_until(
        &self,
        n: usize,
        what: &str,
        done: impl Fn(&BTreeMap<String, usize>) -> bool,
    ) -> Duration {
        let start = Instant::now();
        loop {
            let spread = self.spread(n);
            if done(&spread) {
                return start.elapsed();
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{what}: {spread:?}"
            );
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.lbd.take();
        if std::thread::panicking() {
            lb_tests::lab::print_log_tails(&self.dir, 30);
        }
        // Unpinning the link takes the program off; unpinning the maps frees them.
        let _ = std::fs::remove_dir_all(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub const SVC: &str = "tcp/198.18.0.100:8080";

/// The registry key of the standard config (`node.registry_key`).
pub const REGISTRY_KEY: &str = "registry-key-0123456789";
