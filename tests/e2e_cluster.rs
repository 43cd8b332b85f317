//! Three LB nodes running lbd as a cluster in the lab: VIP ownership, failover with
//! gratuitous ARP, a preferred node coming back, partitions, forged messages.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use std::sync::{
    atomic::{AtomicBool, Ordering},
    Arc,
};

use lb_tests::{
    lab::{standard, Lab, Proc},
    traffic,
};
use nix::sys::signal::Signal;

const TIMEOUT: Duration = Duration::from_secs(2);
const GROUP: &str = "239.255.18.1:7400";
const KEY: &str = "lab-cluster-key-0123456789";

fn binary(name: &str) -> PathBuf {
    Lab::target_binary(name).expect("workspace binaries are built by cargo test")
}

fn lb_ip(lb: &str) -> Ipv4Addr {
    standard::backend_ip(standard::LBS.iter().find(|(t, _)| *t == lb).unwrap().1)
}

fn config(node: &str, lb: &str, dir: &Path, preferred: &[Ipv4Addr]) -> String {
    let mut services = String::new();
    for vip in [standard::VIP, standard::VIP2] {
        services.push_str(&format!(
            "\n[[service]]\nvip = \"{vip}\"\nport = {}\nprotocol = \"tcp\"\n",
            standard::SERVICE_PORT
        ));
        for (_, o) in standard::BACKENDS {
            services.push_str(&format!(
                "\n[[service.backend]]\naddress = \"{}\"\n",
                standard::backend_ip(o)
            ));
        }
    }
    let preferred: Vec<String> = preferred.iter().map(|p| format!("\"{p}\"")).collect();
    // Every node records its acquire/release script calls next to its log.
    let script = dir.join(format!("script-{lb}.sh"));
    std::fs::write(&script, format!("#!/bin/sh\necho \"$1 $2\" >> {}/script-{lb}.out\n", dir.display())).unwrap();
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
group = "{GROUP}"
key = "{KEY}"
preferred = [{preferred}]
script = "{script}"
"#,
        dir = dir.display(),
        id = lb_ip(lb),
        preferred = preferred.join(", "),
        script = script.display(),
    )
}

struct Cluster {
    lbds: BTreeMap<&'static str, Proc>,
    lab: Lab,
    dir: PathBuf,
    node: String,
}

impl Cluster {
    fn new(test: &str) -> Cluster {
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
        };
        for lb in ["lb1", "lb2", "lb3"] {
            c.start(lb);
        }
        c
    }

    fn preferred(lb: &str) -> Vec<Ipv4Addr> {
        match lb {
            "lb1" => vec![standard::VIP],
            "lb2" => vec![standard::VIP2],
            _ => vec![],
        }
    }

    fn socket(&self, lb: &str) -> PathBuf {
        self.dir.join(format!("{lb}.sock"))
    }

    fn start(&mut self, lb: &'static str) {
        let path = self.dir.join(format!("{lb}.toml"));
        std::fs::write(
            &path,
            config(&self.node, lb, &self.dir, &Self::preferred(lb)),
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
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if self.lbctl(lb, &["status"]).status.success() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "lbd on {lb} did not answer: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }

    fn lbctl(&self, lb: &str, args: &[&str]) -> Output {
        std::process::Command::new(binary("lbctl"))
            .arg("--socket")
            .arg(self.socket(lb))
            .args(args)
            .output()
            .expect("running lbctl")
    }

    fn view(&self, lb: &str) -> serde_json::Value {
        let out = self.lbctl(lb, &["-o", "json", "cluster"]);
        assert!(
            out.status.success(),
            "lbctl cluster on {lb}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Who serves each VIP, as each node reports itself ("me" rows), online only.
    fn owners(&self) -> BTreeMap<String, Vec<String>> {
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

    /// The leader every running node follows, if they agree and each hears all of
    /// the running nodes.
    fn agreed_leader(&self) -> Option<String> {
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
    fn settle(&self, within: Duration) -> BTreeMap<String, Vec<String>> {
        let deadline = Instant::now() + within;
        loop {
            let o = self.owners();
            if o.len() == 2 && o.values().all(|v| v.len() == 1) && self.agreed_leader().is_some() {
                return o;
            }
            assert!(
                Instant::now() < deadline,
                "no equilibrium within {within:?}: {o:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn client<T: Send + 'static>(
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

impl Drop for Cluster {
    fn drop(&mut self) {
        self.lbds.clear();
        if std::thread::panicking() {
            // The daemons' own account of what happened, before it is deleted.
            for e in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                let p = e.path();
                if p.extension().is_some_and(|x| x == "log") {
                    let text = std::fs::read_to_string(&p).unwrap_or_default();
                    let tail: Vec<&str> = text.lines().rev().take(40).collect();
                    eprintln!("--- {} (last 40 lines)", p.display());
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
        for lb in ["lb1", "lb2", "lb3"] {
            let _ = std::fs::remove_dir_all(format!("/sys/fs/bpf/lb/{}-{lb}", self.node));
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn vip_addr(v: Ipv4Addr) -> SocketAddr {
    SocketAddr::from((v, standard::SERVICE_PORT))
}

#[test]
fn each_vip_is_served_by_its_preferred_node_and_clients_reach_both() {
    let c = Cluster::new("own");
    let owners = c.settle(Duration::from_secs(5));
    assert_eq!(owners[&standard::VIP.to_string()], ["lb1"], "{owners:?}");
    assert_eq!(owners[&standard::VIP2.to_string()], ["lb2"], "{owners:?}");
    assert_eq!(
        c.agreed_leader().as_deref(),
        Some("198.18.0.2"),
        "the lowest id leads"
    );
    let answers = c.client(|| {
        let mut a = BTreeMap::new();
        for vip in [standard::VIP, standard::VIP2] {
            let s: Vec<Ipv4Addr> = standard::client_sources().collect();
            a.insert(vip, traffic::http_spread(&s, vip_addr(vip), 30, TIMEOUT)?);
        }
        Ok(a)
    });
    for (vip, spread) in &answers {
        assert_eq!(spread.values().sum::<usize>(), 30, "{vip}: {spread:?}");
        assert_eq!(spread.len(), 3, "{vip}: {spread:?}");
    }
}

fn client_mac_for(c: &Cluster, vip: Ipv4Addr) -> Option<String> {
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

fn mac_of(lb: &str) -> String {
    let octet = standard::LBS.iter().find(|(t, _)| *t == lb).unwrap().1;
    format!("02:1b:00:00:00:{octet:02x}")
}

#[test]
fn a_dead_nodes_vip_moves_with_its_connections_and_comes_back_to_it() {
    let mut c = Cluster::new("failover");
    c.settle(Duration::from_secs(5));
    let vip1 = vip_addr(standard::VIP);
    let (mut conv, home) = c.client(move || {
        let mut conv = traffic::Conversation::open(None, vip1, Duration::from_secs(5))?;
        let home = conv.ask("hello")?;
        Ok((conv, home))
    });
    assert_eq!(
        client_mac_for(&c, standard::VIP).as_deref(),
        Some(mac_of("lb1").as_str())
    );

    // A request every 10 ms, each with a short timeout, logging when answers stop and
    // resume.
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    let stream = c.lab.host("client").ns.spawn(move || {
        let mut log = Vec::new();
        let start = Instant::now();
        while !flag.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(30) {
            let ok = traffic::http_get(None, vip1, Duration::from_millis(300)).is_ok();
            log.push((Instant::now(), ok));
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(log)
    });
    std::thread::sleep(Duration::from_millis(300));
    c.lbds.get("lb1").unwrap().signal(Signal::SIGKILL).unwrap();
    c.lab.host("lb1").ns.ip("link set eth0 down").unwrap();
    let killed = Instant::now();
    c.lbds.remove("lb1");

    let owners = c.settle(Duration::from_secs(10));
    assert_eq!(
        owners[&standard::VIP.to_string()],
        ["lb3"],
        "the spare takes the orphan: {owners:?}"
    );
    // Wait for service to resume, bounded.
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline
        && client_mac_for(&c, standard::VIP).as_deref() != Some(mac_of("lb3").as_str())
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let moved_after = killed.elapsed();
    // The client's ARP entry moved to lb3 well before the kernel would have probed on
    // its own (delay_first_probe_time is 5 s): the gratuitous ARP did it.
    assert_eq!(
        client_mac_for(&c, standard::VIP).as_deref(),
        Some(mac_of("lb3").as_str())
    );
    assert!(
        moved_after < Duration::from_secs(4),
        "ARP entry moved only after {moved_after:?}"
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let log = stream.join().expect("stream panicked").expect("stream");
    let resumed = log
        .iter()
        .find(|(t, ok)| *t > killed && *ok)
        .map(|(t, _)| *t - killed);
    let failures = log.iter().filter(|(t, ok)| *t > killed && !*ok).count();
    eprintln!("failover: answers resumed {resumed:?} after the kill ({failures} failed requests); ARP moved within {moved_after:?}");
    assert!(resumed.is_some(), "service did not resume");
    assert!(log.last().unwrap().1, "the last request failed");

    // The long-lived connection goes on, on the same backend, through lb3.
    let conv_again = c.client(move || {
        let name = conv.ask("after the failover")?;
        anyhow::ensure!(name == home, "the connection moved from {home} to {name}");
        Ok(conv)
    });
    drop(conv_again);

    // lb1 comes back and gets its VIP back; from then on there is one owner.
    c.lab.host("lb1").ns.ip("link set eth0 up").unwrap();
    c.start("lb1");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = c.settle(Duration::from_secs(10));
        if o[&standard::VIP.to_string()] == ["lb1"] {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "lb1 did not get its VIP back: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for _ in 0..20 {
        let o = c.owners();
        assert_eq!(
            o.get(&standard::VIP.to_string()).map(Vec::len),
            Some(1),
            "{o:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let answer = c.client(move || {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            match traffic::http_get(None, vip1, Duration::from_millis(500)) {
                Ok(a) => return Ok(a),
                Err(e) if Instant::now() > deadline => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    });
    assert!(answer.starts_with('b'), "{answer}");
    assert_eq!(
        client_mac_for(&c, standard::VIP).as_deref(),
        Some(mac_of("lb1").as_str())
    );
}

fn nft(c: &Cluster, lb: &str, rules: &str) {
    let path = c.dir.join(format!("nft-{lb}.rules"));
    std::fs::write(&path, rules).unwrap();
    c.lab
        .host(lb)
        .ns
        .exec("nft", &["-f", &path.to_string_lossy()])
        .expect("nft");
}

fn drop_control_from(sources: &str) -> String {
    format!(
        "table inet part {{\n  chain input {{\n    type filter hook input priority 0;\n    ip saddr {sources} udp dport 7400 drop\n  }}\n}}\n"
    )
}

#[test]
fn a_partition_gives_two_owners_and_healing_one_within_two_seconds() {
    let c = Cluster::new("partition");
    c.settle(Duration::from_secs(5));
    // lb1 hears nobody and nobody hears lb1.
    nft(&c, "lb1", &drop_control_from("{ 198.18.0.3, 198.18.0.4 }"));
    for lb in ["lb2", "lb3"] {
        nft(&c, lb, &drop_control_from("198.18.0.2"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = c.owners();
        if o.get(&standard::VIP.to_string()).map(Vec::len) == Some(2) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the partitioned side never took the VIP: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    for lb in ["lb1", "lb2", "lb3"] {
        c.lab
            .host(lb)
            .ns
            .exec("nft", &["delete", "table", "inet", "part"])
            .expect("nft delete");
    }
    let healed = Instant::now();
    let owners = c.settle(Duration::from_secs(2));
    eprintln!(
        "partition healed: one owner again after {:?}",
        healed.elapsed()
    );
    assert_eq!(owners[&standard::VIP.to_string()], ["lb1"], "{owners:?}");
}

#[test]
fn forged_and_replayed_control_messages_change_nothing_and_are_counted() {
    use lb_userspace::cluster::wire::{encode, AddrState, HostInfo, Message};
    let c = Cluster::new("forged");
    let before = c.settle(Duration::from_secs(5));
    let intruder = |id: &str, seq: u64| Message::Info {
        seq,
        host: HostInfo {
            id: id.parse().unwrap(),
            control_addresses: vec![id.parse().unwrap()],
            ok: true,
            quiesce: false,
            load: 0,
            capacity: 1,
            // Claims both VIPs and the lowest id: it would lead and cause releases.
            preferred: vec![standard::VIP.into(), standard::VIP2.into()],
            serving: [
                (standard::VIP.into(), AddrState::Online),
                (standard::VIP2.into(), AddrState::Online),
            ]
            .into(),
            addresses: vec![],
        },
        others: vec![],
        service_addresses: vec![],
    };
    let forged = encode(
        &intruder("198.18.0.1", u64::MAX / 2),
        b"not the cluster key at all",
    );
    // Right key, but lb1's id with a sequence number long past: a replay.
    let replayed = encode(&intruder("198.18.0.2", 1), KEY.as_bytes());
    c.client(move || {
        let sock = std::net::UdpSocket::bind("198.18.0.10:0")?;
        for _ in 0..5 {
            sock.send_to(&forged, GROUP)?;
            sock.send_to(&replayed, GROUP)?;
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    });
    std::thread::sleep(Duration::from_millis(500));
    for lb in ["lb1", "lb2", "lb3"] {
        let v = c.view(lb);
        assert!(
            v["rejected"]["bad_mac"].as_u64().unwrap() >= 5,
            "{lb}: {}",
            v["rejected"]
        );
        let hosts: Vec<String> = v["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| h["info"]["id"].to_string())
            .collect();
        assert!(
            !hosts.iter().any(|h| h.contains("198.18.0.1\"")),
            "{lb} accepted the forged host: {hosts:?}"
        );
        assert_eq!(v["leader"], "198.18.0.2");
    }
    for lb in ["lb2", "lb3"] {
        let v = c.view(lb);
        assert!(
            v["rejected"]["replayed"].as_u64().unwrap() >= 5,
            "{lb}: {}",
            v["rejected"]
        );
    }
    assert_eq!(c.owners(), before, "ownership changed");
    let metrics = c
        .lab
        .host("lb2")
        .ns
        .exec("curl", &["-s", "http://127.0.0.1:9469/metrics"])
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    assert!(
        metrics.contains("lb_cluster_messages_rejected_total{reason=\"bad_mac\"}"),
        "{metrics}"
    );
}

#[test]
fn a_quiesced_spare_takes_nothing_and_events_stream_the_takeover() {
    let mut c = Cluster::new("quiesce");
    c.settle(Duration::from_secs(5));
    let out = c.lbctl("lb3", &["node", "quiesce"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Follow lb2's events while lb1 dies: lb2 becomes leader and, with the spare
    // quiesced, takes lb1's VIP itself.
    let mut follow = std::process::Command::new(binary("lbctl"))
        .arg("--socket")
        .arg(c.socket("lb2"))
        .args(["-o", "json", "events", "--follow"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    c.lbds.get("lb1").unwrap().signal(Signal::SIGKILL).unwrap();
    c.lab.host("lb1").ns.ip("link set eth0 down").unwrap();
    c.lbds.remove("lb1");
    let owners = c.settle(Duration::from_secs(10));
    assert_eq!(owners[&standard::VIP.to_string()], ["lb2"], "{owners:?}");
    std::thread::sleep(Duration::from_millis(300));
    follow.kill().unwrap();
    let out = follow.wait_with_output().unwrap();
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    for wanted in ["host_dead", "leader_change", "acquire"] {
        assert!(kinds.contains(&wanted), "no {wanted} in {kinds:?}");
    }
    assert!(
        events.iter().any(|e| e["event"] == "acquire" && e["address"] == standard::VIP.to_string()),
        "no acquire of {} in {events:?}",
        standard::VIP
    );
    // lb2's script ran for the acquire; lb3's never did.
    let script = std::fs::read_to_string(c.dir.join("script-lb2.out")).unwrap_or_default();
    assert!(script.contains(&format!("acquire {}", standard::VIP)), "{script}");
    assert!(!c.dir.join("script-lb3.out").exists(), "the quiesced spare acquired something");
    let v = c.view("lb3");
    let me = v["hosts"].as_array().unwrap().iter().find(|h| h["me"] == true).unwrap();
    assert_eq!(me["info"]["quiesce"], true);
}
