//! Three LB nodes running lbd as a cluster in the lab, for the cluster's end-to-end
//! tests and the failover benchmark: configs, start/kill, views through lbctl.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use crate::lab::{standard, Lab, Proc};

pub const TIMEOUT: Duration = Duration::from_secs(2);
pub const GROUP: &str = "239.255.18.1:7400";
pub const KEY: &str = "lab-cluster-key-0123456789";

pub fn binary(name: &str) -> PathBuf {
    Lab::target_binary(name).expect("workspace binaries are built by cargo test")
}

pub fn lb_ip(lb: &str) -> Ipv4Addr {
    standard::backend_ip(standard::LBS.iter().find(|(t, _)| *t == lb).unwrap().1)
}

fn config(
    node: &str,
    lb: &str,
    dir: &Path,
    preferred: &[Ipv4Addr],
    interval_ms: u64,
    unicast: bool,
    quorum: Option<usize>,
    ipv6: bool,
    custom_services: Option<&str>,
) -> String {
    // Multicast to the group, or the other nodes' addresses one by one.
    let transport = if unicast {
        let peers: Vec<String> = standard::LBS
            .iter()
            .filter(|(t, _)| *t != lb)
            .map(|(_, o)| format!("\"{}:7400\"", standard::backend_ip(*o)))
            .collect();
        format!("peers = [{}]", peers.join(", "))
    } else {
        format!("group = \"{GROUP}\"\nnodes = {}", standard::LBS.len())
    };
    let transport = match quorum {
        Some(q) => format!("{transport}\nquorum = {q}"),
        None => transport,
    };
    let mut services = String::new();
    for vip in [standard::VIP, standard::VIP2] {
        for proto in ["tcp", "udp"] {
            services.push_str(&format!(
                "\n[[service]]\nvip = \"{vip}\"\nport = {}\nprotocol = \"{proto}\"\n",
                standard::SERVICE_PORT
            ));
            for (_, o) in standard::BACKENDS {
                services.push_str(&format!(
                    "\n[[service.backend]]\naddress = \"{}\"\n",
                    standard::backend_ip(o)
                ));
            }
        }
    }
    if ipv6 {
        for proto in ["tcp", "udp"] {
            services.push_str(&format!(
                "\n[[service]]\nvip = \"{}\"\nport = {}\nprotocol = \"{proto}\"\n",
                standard::VIP6,
                standard::SERVICE_PORT
            ));
            for (_, o) in standard::BACKENDS {
                services.push_str(&format!(
                    "\n[[service.backend]]\naddress = \"{}\"\n",
                    standard::v6(o)
                ));
            }
        }
    }
    if let Some(custom) = custom_services {
        services = custom.to_string();
    }
    let mut preferred: Vec<String> = preferred.iter().map(|p| format!("\"{p}\"")).collect();
    if ipv6 && lb == "lb1" {
        preferred.push(format!("\"{}\"", standard::VIP6));
    }
    // Every node records its acquire/release script calls next to its log.
    let script = dir.join(format!("script-{lb}.sh"));
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho \"$1 $2\" >> {}/script-{lb}.out\n",
            dir.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    format!(
        r#"[node]
name = "{node}-{lb}"
api_socket = "{dir}/{lb}.sock"
metrics_listen = "127.0.0.1:9469"
state_dir = "{dir}/state-{lb}"
pin_dir = "/sys/fs/bpf/lb/{node}-{lb}"

[dataplane]
interfaces = [{{ name = "eth0", xdp_mode = "skb" }}]
max_services = 8
conn_table_size = 16384
{services}
[cluster]
id = "{id}"
{transport}
key = "{KEY}"
interval_ms = {interval_ms}
preferred = [{preferred}]
script = "{script}"
"#,
        dir = dir.display(),
        id = lb_ip(lb),
        preferred = preferred.join(", "),
        script = script.display(),
    )
}

/// At most this many clusters (three lbd each) run at once: more, on a two-core
/// machine, stretch every timer the tests measure.
const MAX_CONCURRENT: usize = 3;

static RUNNING: std::sync::Mutex<usize> = std::sync::Mutex::new(0);
static FREED: std::sync::Condvar = std::sync::Condvar::new();

/// A place among the clusters allowed to run; given back on drop.
struct Permit;

impl Permit {
    fn take() -> Permit {
        let mut n = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        while *n >= MAX_CONCURRENT {
            n = FREED.wait(n).unwrap_or_else(|e| e.into_inner());
        }
        *n += 1;
        Permit
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut n = RUNNING.lock().unwrap_or_else(|e| e.into_inner());
        *n -= 1;
        FREED.notify_one();
    }
}

pub struct Cluster {
    pub lbds: BTreeMap<&'static str, Proc>,
    pub lab: Lab,
    pub dir: PathBuf,
    node: String,
    interval_ms: u64,
    unicast: bool,
    quorum: Option<usize>,
    /// IPv6 services on VIP6 (preferred by lb1) besides the IPv4 ones.
    pub ipv6: bool,
    services: Option<String>,
    // Last: given back after everything else is torn down.
    _permit: Permit,
}

impl Cluster {
    pub fn new(test: &str) -> Cluster {
        Self::with_interval(test, 100)
    }

    /// A cluster whose nodes send info every `interval_ms` (timeout: three of them).
    pub fn with_interval(test: &str, interval_ms: u64) -> Cluster {
        Self::build(test, interval_ms, false)
    }

    /// A cluster whose nodes know each other from a static peer list (no multicast).
    pub fn unicast(test: &str) -> Cluster {
        Self::build(test, 100, true)
    }

    /// A cluster whose nodes have these `[[service]]` sections instead of the standard
    /// two VIPs with three backends each.
    pub fn with_services(test: &str, services: &str) -> Cluster {
        Self::build_with(test, 100, false, None, Some(services.to_string()))
    }

    /// A cluster whose nodes serve VIPs while they see `quorum` nodes (themselves
    /// included) instead of a majority.
    pub fn with_quorum(test: &str, quorum: usize) -> Cluster {
        Self::build_with(test, 100, false, Some(quorum), None)
    }

    fn build(test: &str, interval_ms: u64, unicast: bool) -> Cluster {
        Self::build_with(test, interval_ms, unicast, None, None)
    }

    fn build_with(
        test: &str,
        interval_ms: u64,
        unicast: bool,
        quorum: Option<usize>,
        services: Option<String>,
    ) -> Cluster {
        Self::build_full(test, interval_ms, unicast, quorum, false, services)
    }

    /// With IPv6 services on `standard::VIP6` (lb1 prefers it) besides the IPv4 ones.
    pub fn with_ipv6(test: &str) -> Cluster {
        Self::build_full(test, 100, false, None, true, None)
    }

    fn build_full(
        test: &str,
        interval_ms: u64,
        unicast: bool,
        quorum: Option<usize>,
        ipv6: bool,
        services: Option<String>,
    ) -> Cluster {
        let permit = Permit::take();
        let lab = Lab::new()
            .expect("lab")
            .cluster(&std::env::temp_dir())
            .expect("cluster topology");
        let node = format!("t{}-{test}", std::process::id());
        let dir = std::env::temp_dir().join(format!("lb-e2e-{node}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut c = Cluster {
            lbds: BTreeMap::new(),
            lab,
            dir,
            node,
            interval_ms,
            unicast,
            quorum,
            ipv6,
            services,
            _permit: permit,
        };
        for lb in ["lb1", "lb2", "lb3"] {
            c.start(lb);
        }
        c
    }

    pub fn preferred(lb: &str) -> Vec<Ipv4Addr> {
        match lb {
            "lb1" => vec![standard::VIP],
            "lb2" => vec![standard::VIP2],
            _ => vec![],
        }
    }

    /// Forgets everything `lb` kept (state directory and pinned maps): its next start
    /// is a new node's. Stop it first.
    pub fn wipe(&self, lb: &str) {
        let _ = std::fs::remove_dir_all(self.dir.join(format!("state-{lb}")));
        let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/lb/{}-{lb}", self.node));
    }

    pub fn socket(&self, lb: &str) -> PathBuf {
        self.dir.join(format!("{lb}.sock"))
    }

    pub fn start(&mut self, lb: &'static str) {
        let (lb, log) = self.spawn_lbd(lb);
        self.wait_lbd(lb, &log);
    }

    fn spawn_lbd(&mut self, lb: &'static str) -> (&'static str, PathBuf) {
        let path = self.dir.join(format!("{lb}.toml"));
        std::fs::write(
            &path,
            config(
                &self.node,
                lb,
                &self.dir,
                &Self::preferred(lb),
                self.interval_ms,
                self.unicast,
                self.quorum,
                self.ipv6,
                self.services.as_deref(),
            ),
        )
        .unwrap();
        let n = std::fs::read_dir(&self.dir).map(|d| d.count()).unwrap_or(0);
        let log = self.dir.join(format!("{lb}-{n}.log"));
        let proc = self
            .lab
            .spawn(
                lb,
                &binary("lbd"),
                &["--config", &path.to_string_lossy()],
                &log,
            )
            .expect("starting lbd");
        self.lbds.insert(lb, proc);
        (lb, log)
    }

    fn wait_lbd(&self, lb: &str, log: &Path) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.lbctl(lb, &["status"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!(
            "lbd on {lb} did not answer: {}",
            std::fs::read_to_string(log).unwrap_or_default()
        );
    }

    /// Starts several nodes at once (their lbd processes overlap), waiting for all.
    pub fn start_all(&mut self, lbs: &[&'static str]) {
        let mut started = Vec::new();
        for lb in lbs {
            started.push(self.spawn_lbd(lb));
        }
        for (lb, log) in started {
            self.wait_lbd(lb, &log);
        }
    }

    /// Cuts `lb` off the other LB nodes (their control and peer ports, both ways), or
    /// heals it.
    pub fn isolate(&self, lb: &str, cut: bool) {
        let ns = &self.lab.host(lb).ns;
        if cut {
            let others: Vec<String> = standard::LBS
                .iter()
                .filter(|(t, _)| *t != lb)
                .map(|(_, o)| standard::backend_ip(*o).to_string())
                .collect();
            let set = others.join(", ");
            let rules = format!(
                "table inet lbcut {{ chain in {{ type filter hook input priority 0; ip saddr {{ {set} }} udp dport 7400 drop; ip saddr {{ {set} }} tcp dport 7401 drop; ip daddr 239.255.18.1 drop; }}; chain out {{ type filter hook output priority 0; ip daddr {{ {set} }} drop; ip daddr 239.255.18.1 drop; }}; }}"
            );
            let out = ns.command("nft").arg(&rules).output().expect("nft");
            assert!(
                out.status.success(),
                "nft: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        } else {
            let _ = ns
                .command("nft")
                .args(["delete", "table", "inet", "lbcut"])
                .output();
        }
    }

    /// A long-running lbctl on `lb` (register, watch, events --follow), its output
    /// piped; kill it when done.
    pub fn lbctl_spawn(&self, lb: &str, args: &[&str]) -> std::process::Child {
        std::process::Command::new(binary("lbctl"))
            .arg("--socket")
            .arg(self.socket(lb))
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("starting lbctl")
    }

    pub fn lbctl(&self, lb: &str, args: &[&str]) -> Output {
        std::process::Command::new(binary("lbctl"))
            .arg("--socket")
            .arg(self.socket(lb))
            .args(args)
            .output()
            .expect("running lbctl")
    }

    pub fn view(&self, lb: &str) -> serde_json::Value {
        let out = self.lbctl(lb, &["-o", "json", "cluster"]);
        assert!(
            out.status.success(),
            "lbctl cluster on {lb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Who serves each VIP, as each node reports itself ("me" rows), online only.
    pub fn owners(&self) -> BTreeMap<String, Vec<String>> {
        let mut owners: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for lb in self.lbds.keys() {
            let v = self.view(lb);
            for h in v["hosts"].as_array().unwrap() {
                if h["me"] == true {
                    for (vip, state) in h["info"]["serving"].as_object().unwrap() {
                        if state == "online" {
                            owners.entry(vip.clone()).or_default().push(lb.to_string());
                        }
                    }
                }
            }
        }
        owners
    }

    /// Gives backend b1 a second address on the lab's segment (it answers ARP for it and
    /// serves the VIP behind it): a backend only some nodes can be kept from reaching.
    pub fn second_address_on_b1(&self, addr: &str) {
        self.lab
            .host(standard::BACKENDS[0].0)
            .ns
            .ip(&format!("addr add {addr}/24 dev eth0"))
            .expect("second address on b1");
    }

    /// Waits until `lb` reports itself ready (start-up sync done).
    pub fn wait_ready(&self, lb: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.is_ready(lb) {
            assert!(
                Instant::now() < deadline,
                "{lb} not ready within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_ready(&self, lb: &str) -> bool {
        self.view(lb)["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|h| h["me"] == true && h["info"]["ready"] != false)
    }

    /// Every running node reports itself ready (start-up sync done).
    pub fn all_ready(&self) -> bool {
        self.lbds.keys().all(|lb| self.is_ready(lb))
    }

    /// The leader every running node follows, if they agree and each hears all of
    /// the running nodes.
    pub fn agreed_leader(&self) -> Option<String> {
        let mut leaders = Vec::new();
        for lb in self.lbds.keys() {
            let v = self.view(lb);
            if v["hosts"].as_array().unwrap().len() != self.lbds.len() {
                return None;
            }
            leaders.push(v["leader"].as_str()?.to_string());
        }
        leaders.dedup();
        (leaders.len() == 1).then(|| leaders.remove(0))
    }

    /// Waits until the running nodes agree on a leader and each VIP has exactly one
    /// owner; returns the owners.
    pub fn settle(&self, within: Duration) -> BTreeMap<String, Vec<String>> {
        let deadline = Instant::now() + within;
        let mut ready = ReadyClock::default();
        loop {
            let ready_for = ready.ready_for(self);
            let o = self.owners();
            if ready_for > AFTER_READY
                && o.len() == 2
                && o.values().all(|v| v.len() == 1)
                && self.agreed_leader().is_some()
            {
                return o;
            }
            assert!(
                Instant::now() < deadline,
                "no equilibrium within {within:?}: {o:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn client<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> T {
        self.lab
            .host("client")
            .ns
            .spawn(f)
            .join()
            .expect("client panicked")
            .expect("client traffic")
    }
}

/// How long every node has to have been ready before the cluster counts as settled:
/// the leader's rounds to act on it (a preferred node that was not ready yet gets its
/// VIP handed back).
pub const AFTER_READY: Duration = Duration::from_millis(600);

/// How long every running node has been ready (start-up sync done) without a break,
/// as seen by successive polls.
#[derive(Default)]
pub struct ReadyClock(Option<Instant>);

impl ReadyClock {
    pub fn ready_for(&mut self, c: &Cluster) -> Duration {
        if c.all_ready() {
            self.0.get_or_insert_with(Instant::now).elapsed()
        } else {
            self.0 = None;
            Duration::ZERO
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.lbds.clear();
        if std::thread::panicking() {
            crate::lab::print_log_tails(&self.dir, 40);
        }
        for lb in ["lb1", "lb2", "lb3"] {
            let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/lb/{}-{lb}", self.node));
        }
        // LB_KEEP_LOGS=1 keeps configs and daemon logs for a look after the run.
        if std::env::var_os("LB_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

pub fn vip_addr(v: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((v, standard::SERVICE_PORT))
}

pub fn client_mac_for(c: &Cluster, vip: Ipv4Addr) -> Option<String> {
    let out = c
        .lab
        .host("client")
        .ns
        .ip(&format!("neigh show {vip}"))
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "lladdr" {
            return words.next().map(str::to_string);
        }
    }
    None
}

pub fn mac_of(lb: &str) -> String {
    let octet = standard::LBS.iter().find(|(t, _)| *t == lb).unwrap().1;
    format!("02:1b:00:00:00:{octet:02x}")
}

/// Reads `child`'s stdout lines until `done` holds for those read so far, for at most
/// `within`; kills the child and returns the lines (also when time ran out, for the
/// caller's assertion to show them).
pub fn lines_until(
    child: &mut std::process::Child,
    within: Duration,
    done: impl Fn(&[String]) -> bool,
) -> Vec<String> {
    use std::io::BufRead;
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().expect("a piped stdout");
    std::thread::spawn(move || {
        for l in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(l).is_err() {
                break;
            }
        }
    });
    let deadline = std::time::Instant::now() + within;
    let mut lines = Vec::new();
    while !done(&lines) {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok(l) => lines.push(l),
            Err(_) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    lines
}
