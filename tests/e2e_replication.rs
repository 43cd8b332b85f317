//! The replicated directory under faults, in the three-node lab: an acknowledged change
//! survives killing the master at once (also right after a new master took over), a
//! partition with writes on both sides heals to identical replicas, and a node that
//! cannot sync at start takes no VIP.

use std::{
    collections::BTreeSet,
    time::{Duration, Instant},
};

use lb_tests::{
    cluster_lab::{vip_addr, Cluster},
    lab::standard,
    traffic,
};
use nix::sys::signal::Signal;

const TABLE: &str = "t.stream";

/// Whether a new connection to VIP 1 is answered (a service in maintenance is
/// refused).
fn served(c: &Cluster) -> bool {
    c.lab
        .host("client")
        .ns
        .spawn(|| {
            Ok(
                traffic::http_get(None, vip_addr(standard::VIP), Duration::from_millis(500))
                    .is_ok(),
            )
        })
        .join()
        .expect("client thread")
        .unwrap_or(false)
}

/// The node the running nodes agree is the directory master.
fn dir_master(c: &Cluster, within: Duration) -> &'static str {
    let deadline = Instant::now() + within;
    loop {
        let mut masters = BTreeSet::new();
        for lb in c.lbds.keys() {
            for h in c.view(lb)["hosts"].as_array().unwrap() {
                if h["info"]["dir_master"] == true {
                    masters.insert(h["info"]["id"].as_str().unwrap().to_string());
                }
            }
        }
        if masters.len() == 1 {
            let id = masters.pop_first().unwrap();
            if let Some(lb) = ["lb1", "lb2", "lb3"]
                .into_iter()
                .find(|lb| lb_tests::cluster_lab::lb_ip(lb).to_string() == id)
            {
                if c.lbds.contains_key(lb) {
                    return lb;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "no agreed directory master: {masters:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The keys of `table` on `lb`.
fn keys(c: &Cluster, lb: &str, table: &str) -> BTreeSet<String> {
    let out = c.lbctl(lb, &["-o", "json", "dir", "search", table]);
    let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    rows.as_array()
        .map(|r| {
            r.iter()
                .map(|e| e["key"].as_str().unwrap_or_default().to_string())
                .collect()
        })
        .unwrap_or_default()
}

/// Writes `n` keys through `lb` from two writers at once; the master is killed once
/// `kill_after` of them were acknowledged. Returns the acknowledged keys.
fn stream_then_kill(
    c: &mut Cluster,
    lb: &'static str,
    prefix: &str,
    n: usize,
    kill_after: usize,
) -> BTreeSet<String> {
    let acked = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    let socket = c.socket(lb);
    let lbctl = lb_tests::cluster_lab::binary("lbctl");
    let writers: Vec<_> = (0..2)
        .map(|w| {
            let (acked, socket, lbctl) = (acked.clone(), socket.clone(), lbctl.clone());
            let prefix = prefix.to_string();
            std::thread::spawn(move || {
                for i in (w..n).step_by(2) {
                    let key = format!("{prefix}{i:03}");
                    let ok = std::process::Command::new(&lbctl)
                        .arg("--socket")
                        .arg(&socket)
                        .args(["dir", "add", TABLE, &key, "198.18.0.11:80"])
                        .output()
                        .is_ok_and(|o| o.status.success());
                    if ok {
                        acked.lock().unwrap().insert(key);
                    }
                }
            })
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.lock().unwrap().len() < kill_after {
        assert!(
            Instant::now() < deadline,
            "only {} acknowledged through {lb}",
            acked.lock().unwrap().len()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    c.lbds.get(lb).unwrap().signal(Signal::SIGKILL).unwrap();
    let at_kill = acked.lock().unwrap().clone();
    c.lbds.remove(lb);
    for w in writers {
        w.join().unwrap();
    }
    at_kill
}

/// Every running node holds every key in `want` (within `within`).
fn assert_everywhere(c: &Cluster, want: &BTreeSet<String>, within: Duration, what: &str) {
    let deadline = Instant::now() + within;
    for lb in c.lbds.keys() {
        loop {
            let have = keys(c, lb, TABLE);
            let lost: Vec<&String> = want.difference(&have).collect();
            if lost.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {lb} lacks {} acknowledged changes: {lost:?}",
                lost.len()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

#[test]
fn killing_the_directory_master_loses_no_acknowledged_change() {
    let mut c = Cluster::new("dsdkill");
    c.settle(Duration::from_secs(10));
    // A stream through the master, which dies after the 40th answer.
    let first = dir_master(&c, Duration::from_secs(5));
    let acked = stream_then_kill(&mut c, first, "a", 80, 40);
    let second = dir_master(&c, Duration::from_secs(10));
    assert_ne!(second, first);
    assert_everywhere(&c, &acked, Duration::from_secs(5), "first kill");
    eprintln!(
        "master {first} killed after {} acknowledged changes: all on the survivors",
        acked.len()
    );
    // The first comes back (empty: wiped); right after, a burst through the new
    // master, which dies after 30 answers.
    c.wipe(first);
    c.start(first);
    c.wait_ready(first, Duration::from_secs(10));
    let burst = stream_then_kill(&mut c, second, "b", 60, 30);
    dir_master(&c, Duration::from_secs(10));
    let all: BTreeSet<String> = acked.union(&burst).cloned().collect();
    assert_everywhere(&c, &all, Duration::from_secs(5), "second kill");
    eprintln!(
        "master {second} killed after a burst of {} acknowledged changes: all on the survivors",
        burst.len()
    );
}

#[test]
fn after_a_full_partition_heals_every_replica_holds_the_same_rows() {
    let c = Cluster::new("dsdpart");
    c.settle(Duration::from_secs(10));
    let master = dir_master(&c, Duration::from_secs(5));
    let others: Vec<&str> = ["lb1", "lb2", "lb3"]
        .into_iter()
        .filter(|lb| *lb != master)
        .collect();
    let mut before = BTreeSet::new();
    for i in 0..5 {
        // Just after the roles settle the master's backup may still be recovering,
        // and on a loaded machine a write can outlast lbctl's wait: it answers
        // "pending", and sending it again is what it says to do (a resend is
        // acknowledged, not applied twice). Every row is checked on every replica
        // at the end.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let out = c.lbctl(
                master,
                &["dir", "add", TABLE, &format!("before{i}"), "x:80"],
            );
            let err = String::from_utf8_lossy(&out.stderr);
            if out.status.success() {
                before.insert(format!("before{i}"));
                break;
            }
            assert!(
                err.contains("pending") && Instant::now() < deadline,
                "{err}"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    // The master is cut off (cluster and peer ports, both ways).
    c.isolate(master, true);
    let deadline = Instant::now() + Duration::from_secs(10);
    while c.view(master)["quorate"] != false {
        assert!(
            Instant::now() < deadline,
            "{master} still thinks it has a quorum"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut acked = BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    // The majority elects a master of its own and takes writes ...
    while acked.len() < 10 {
        let lb = others[acked.len() % 2];
        let key = format!("majority{}", acked.len());
        let out = c.lbctl(lb, &["dir", "add", TABLE, &key, "x:80"]);
        if out.status.success() {
            acked.insert(key);
        } else {
            assert!(
                Instant::now() < deadline,
                "the majority takes no writes: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // ... the minority refuses them, saying why.
    for i in 0..3 {
        let out = c.lbctl(
            master,
            &["dir", "add", TABLE, &format!("minority{i}"), "x:80"],
        );
        assert!(
            !out.status.success(),
            "the cut-off node acknowledged a write it cannot store with the majority"
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("quorum"), "{err}");
    }
    c.isolate(master, false);
    let healed = Instant::now();
    let deadline = healed + Duration::from_secs(10);
    loop {
        let sets: Vec<BTreeSet<String>> = ["lb1", "lb2", "lb3"]
            .iter()
            .map(|lb| keys(&c, lb, TABLE))
            .collect();
        if sets.windows(2).all(|w| w[0] == w[1])
            && acked.is_subset(&sets[0])
            && before.is_subset(&sets[0])
        {
            assert!(
                sets[0].iter().all(|k| !k.starts_with("minority")),
                "{sets:?}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "replicas still differ 10 s after the heal: {:?}",
            sets.iter().map(BTreeSet::len).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "partition healed: identical replicas after {:?}",
        healed.elapsed()
    );
    // And they say so: equal versions carry equal digests.
    let view = c.view("lb2");
    let digests: BTreeSet<(u64, u64)> = view["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| {
            (
                h["info"]["dir_version"].as_u64().unwrap(),
                h["info"]["dir_digest"].as_u64().unwrap(),
            )
        })
        .collect();
    let versions: BTreeSet<u64> = digests.iter().map(|d| d.0).collect();
    assert_eq!(
        versions.len(),
        digests.len(),
        "a version with two digests: {digests:?}"
    );
}

#[test]
fn a_node_that_cannot_sync_at_start_takes_no_vip_and_serves_no_service_in_maintenance() {
    let mut c = Cluster::new("dsdsync");
    c.settle(Duration::from_secs(10));
    let svc = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    // lb1 (VIP 1's preferred node) goes down; meanwhile the service goes into
    // maintenance on the others.
    c.lbds.get("lb1").unwrap().signal(Signal::SIGKILL).unwrap();
    c.lbds.remove("lb1");
    c.wipe("lb1");
    let _ = c
        .lab
        .host("lb1")
        .ns
        .ip(&format!("addr del {}/32 dev eth0", standard::VIP));
    let out = c.lbctl(
        "lb2",
        &[
            "service",
            "maintenance",
            &svc,
            "--reason",
            "planned",
            "--for",
            "10m",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let owners = c.settle(Duration::from_secs(10));
    assert_ne!(owners[&standard::VIP.to_string()], ["lb1"]);
    // lb1 restarts with its peer port (directory, availability) blocked both ways.
    let out = c
        .lab
        .host("lb1")
        .ns
        .command("nft")
        .arg("table inet peerblock { chain in { type filter hook input priority 0; tcp dport 7401 drop; }; chain out { type filter hook output priority 0; tcp dport 7401 drop; }; }")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.start("lb1");
    let blocked = Instant::now();
    let mut probes = 0;
    while blocked.elapsed() < Duration::from_secs(4) {
        let o = c.owners();
        assert!(
            !o.values().any(|v| v.iter().any(|lb| lb == "lb1")),
            "lb1 took a VIP {:?} after start without its sync: {o:?}",
            blocked.elapsed()
        );
        assert!(
            !served(&c),
            "the service in maintenance was served {:?} after lb1 started",
            blocked.elapsed()
        );
        probes += 1;
    }
    assert!(probes > 3, "only {probes} probes in 4 s");
    let status = c.lbctl("lb1", &["-o", "json", "status"]);
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(
        status["ready"], false,
        "lb1 says it is ready unsynced: {status}"
    );
    let human = c.lbctl("lb1", &["status"]);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("ready       NO") && text.contains("waiting"),
        "{text}"
    );
    // Unblocked: it syncs, learns the maintenance, takes its VIP back, and refuses.
    let _ = c
        .lab
        .host("lb1")
        .ns
        .command("nft")
        .args(["delete", "table", "inet", "peerblock"])
        .output();
    let unblocked = Instant::now();
    c.wait_ready("lb1", Duration::from_secs(10));
    let owners = c.settle(Duration::from_secs(10));
    assert_eq!(owners[&standard::VIP.to_string()], ["lb1"], "{owners:?}");
    eprintln!(
        "lb1 ready {:?} after its peer port was unblocked",
        unblocked.elapsed()
    );
    for _ in 0..5 {
        assert!(!served(&c), "lb1 served a service in maintenance");
    }
}

/// Each running node's table digest for `vip`, by node.
fn vip_digests(c: &Cluster, vip: &str) -> Vec<(String, Option<u64>)> {
    c.lbds
        .keys()
        .map(|lb| {
            let view = c.view(lb);
            let me = view["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|h| h["me"] == true)
                .cloned()
                .unwrap_or_default();
            (lb.to_string(), me["info"]["digests"][vip].as_u64())
        })
        .collect()
}

/// The backends of `svc` on `lb`: (address, weight, drain).
fn backends(c: &Cluster, lb: &str, svc: &str) -> Vec<(String, u64, bool)> {
    let out = c.lbctl(lb, &["-o", "json", "backend", "list", svc]);
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    list.as_array()
        .map(|l| {
            l.iter()
                .map(|b| {
                    (
                        b["address"].as_str().unwrap_or_default().to_string(),
                        b["weight"].as_u64().unwrap_or_default(),
                        b["drain"].as_bool().unwrap_or_default(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn a_drain_or_weight_set_through_any_node_is_applied_by_every_node() {
    let c = Cluster::new("dsdops");
    c.settle(Duration::from_secs(10));
    let svc = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    let vip = standard::VIP.to_string();
    let before = vip_digests(&c, &vip);
    assert!(
        before.windows(2).all(|w| w[0].1 == w[1].1),
        "tables differ already: {before:?}"
    );
    let first = backends(&c, "lb3", &svc);
    let target = first.first().expect("a backend").0.clone();
    // Through lb3, which neither masters the directory nor serves the VIP.
    let out = c.lbctl("lb3", &["backend", "drain", &svc, &target]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = c.lbctl("lb2", &["backend", "weight", &svc, &first[1].0, "7"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let lists: Vec<Vec<(String, u64, bool)>> = ["lb1", "lb2", "lb3"]
            .iter()
            .map(|lb| backends(&c, lb, &svc))
            .collect();
        let digests = vip_digests(&c, &vip);
        let drained = lists
            .iter()
            .all(|l| l.iter().any(|b| b.0 == target && b.2) && l.iter().any(|b| b.1 == 7));
        if drained && digests.windows(2).all(|w| w[0].1 == w[1].1) && digests != before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the operator's change is not on every node: {lists:?}, digests {digests:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_reachable_instance_added_right_after_unresolvable_ones_is_in_every_data_plane_at_once() {
    let c = Cluster::new("dsdstuck");
    c.settle(Duration::from_secs(10));
    let svc = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    let table = format!("svc.{svc}");
    c.second_address_on_b1("198.18.0.51");
    // Three instances on addresses nobody has and one that answers, added at once
    // (as four backends registering together would).
    let added = Instant::now();
    let adds: Vec<std::process::Child> =
        ["198.18.0.61", "198.18.0.62", "198.18.0.63", "198.18.0.51"]
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                c.lbctl_spawn(
                    "lb2",
                    &[
                        "dir",
                        "add",
                        &table,
                        &format!("i{i}"),
                        &format!("{addr}:8080"),
                    ],
                )
            })
            .collect();
    for mut a in adds {
        assert!(a.wait().unwrap().success());
    }
    for lb in ["lb1", "lb2", "lb3"] {
        loop {
            let out = c.lbctl(lb, &["-o", "json", "backend", "list", &svc]);
            let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            let resolved = list.as_array().is_some_and(|l| {
                l.iter()
                    .any(|b| b["address"] == "198.18.0.51" && b["mac"].is_string())
            });
            if resolved {
                break;
            }
            assert!(
                added.elapsed() < Duration::from_millis(1400),
                "{lb}: the reachable instance is not in the data plane: {list}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    eprintln!(
        "a reachable instance after three unresolvable ones: in every node's data plane after {:?}",
        added.elapsed()
    );
}

#[test]
fn a_drain_through_a_node_that_is_not_the_master_moves_a_stateful_epoch_on_every_node() {
    let services = format!(
        r#"
[[service]]
vip = "{vip}"
port = {port}
protocol = "tcp"

[[service.backend]]
address = "198.18.0.11"

[[service.backend]]
address = "198.18.0.12"

[service.spm]
id = "web"
epoch_policy = "stateful"

[[service]]
vip = "{vip2}"
port = {port}
protocol = "tcp"

[[service.backend]]
address = "198.18.0.12"
"#,
        vip = standard::VIP,
        vip2 = standard::VIP2,
        port = standard::SERVICE_PORT,
    );
    let c = Cluster::with_services("dsdepoch", &services);
    c.settle(Duration::from_secs(10));
    let master = dir_master(&c, Duration::from_secs(5));
    let via = ["lb3", "lb2"].into_iter().find(|lb| *lb != master).unwrap();
    let svc = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    let entries = |lb: &str| -> Option<(u64, Vec<String>)> {
        let out = c.lbctl(lb, &["-o", "json", "spm", "show", "--service", &svc]);
        let m: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let e = m["entries"].as_array()?;
        Some((
            e.first()?["sphere"]["epoch"].as_u64()?,
            e.iter()
                .map(|e| {
                    e["host"]["inet_address"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string()
                })
                .collect(),
        ))
    };
    let before = entries(master).expect("a map");
    let out = c.lbctl(via, &["backend", "drain", &svc, "198.18.0.12"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let maps: Vec<Option<(u64, Vec<String>)>> =
            ["lb1", "lb2", "lb3"].iter().map(|lb| entries(lb)).collect();
        let want = Some((before.0 + 1, vec!["198.18.0.11".to_string()]));
        if maps.iter().all(|m| *m == want) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "drained through {via} (master {master}): maps {maps:?}, want {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
