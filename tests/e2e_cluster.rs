//! Three LB nodes running lbd as a cluster in the lab: VIP ownership, failover with
//! gratuitous ARP, a preferred node coming back, partitions, forged messages.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use lb_tests::{
    cluster_lab::{client_mac_for, mac_of, vip_addr, Cluster, GROUP, KEY, TIMEOUT},
    lab::standard,
    traffic,
};
use nix::sys::signal::Signal;

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
    // The directory's table of management agents lists the three nodes, one master.
    wait_all(&c, "agents", Duration::from_secs(5), |rows| {
        rows.as_array().is_some_and(|r| {
            r.len() == 3
                && r.iter().all(|e| e["valid"] == true)
                && r.iter()
                    .filter(|e| {
                        e["value"]
                            .as_str()
                            .unwrap_or_default()
                            .ends_with("role=master")
                    })
                    .count()
                    == 1
        })
    });
    // Each node advertises its load (connection-table entries, with traffic just
    // sent there are some) against its capacity (its IPv4 and IPv6 tables' sizes,
    // 16384 each) in its heartbeats.
    let start = Instant::now();
    loop {
        let v = c.view("lb3");
        let hosts = v["hosts"].as_array().unwrap();
        let ok = hosts.len() == 3
            && hosts.iter().all(|h| h["info"]["capacity"] == 2 * 16384)
            && hosts
                .iter()
                .filter(|h| {
                    ["198.18.0.2", "198.18.0.3"].contains(&h["info"]["id"].as_str().unwrap())
                })
                .all(|h| h["info"]["load"].as_u64().unwrap() > 0);
        if ok {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "load not advertised: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
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
fn a_partition_leaves_the_majority_one_owner_and_healing_gives_it_back_within_two_seconds() {
    let c = Cluster::new("partition");
    c.settle(Duration::from_secs(5));
    // lb1 hears nobody and nobody hears lb1: alone it is no majority of three, so it
    // gives VIP 1 up, and the other two give it to the spare.
    nft(&c, "lb1", &drop_control_from("{ 198.18.0.3, 198.18.0.4 }"));
    for lb in ["lb2", "lb3"] {
        nft(&c, lb, &drop_control_from("198.18.0.2"));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = c.owners();
        if o.get(&standard::VIP.to_string()).map(Vec::as_slice) == Some(&["lb3".to_string()][..]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "VIP 1 did not go to the majority side alone: {o:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(c.view("lb1")["quorate"], false);
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
            leaving: false,
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
            dir_master: false,
            dir_backup_of: None,
            dir_version: 0,
            dir_digest: 0,
            ready: true,
            digests: Default::default(),
            unable: Default::default(),
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
    for lb in ["lb1", "lb2", "lb3"] {
        // Every forged datagram is counted (multicast: each node got all five).
        let start = Instant::now();
        let v = loop {
            let v = c.view(lb);
            if v["rejected"]["bad_mac"].as_u64().unwrap() >= 5 {
                break v;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{lb} counted no 5 forged messages: {}",
                v["rejected"]
            );
            std::thread::sleep(Duration::from_millis(50));
        };
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
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Follow lb2's events while lb1 dies: lb2 becomes leader and, with the spare
    // quiesced, takes lb1's VIP itself.
    // The stream replays recent events first, so it may start at any time.
    let mut follow = c.lbctl_spawn("lb2", &["-o", "json", "events", "--follow"]);
    c.lbds.get("lb1").unwrap().signal(Signal::SIGKILL).unwrap();
    c.lab.host("lb1").ns.ip("link set eth0 down").unwrap();
    c.lbds.remove("lb1");
    let owners = c.settle(Duration::from_secs(10));
    assert_eq!(owners[&standard::VIP.to_string()], ["lb2"], "{owners:?}");
    let parse = |lines: &[String]| -> Vec<serde_json::Value> {
        lines
            .iter()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect()
    };
    let acquired = |events: &[serde_json::Value]| {
        events
            .iter()
            .any(|e| e["event"] == "acquire" && e["address"] == standard::VIP.to_string())
    };
    let lines = lb_tests::cluster_lab::lines_until(&mut follow, Duration::from_secs(5), |l| {
        acquired(&parse(l))
    });
    let events = parse(&lines);
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["event"].as_str()).collect();
    for wanted in ["host_dead", "leader_change", "acquire"] {
        assert!(kinds.contains(&wanted), "no {wanted} in {kinds:?}");
    }
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "acquire" && e["address"] == standard::VIP.to_string()),
        "no acquire of {} in {events:?}",
        standard::VIP
    );
    // lb2's script ran for the acquire; lb3's never did.
    let script = std::fs::read_to_string(c.dir.join("script-lb2.out")).unwrap_or_default();
    assert!(
        script.contains(&format!("acquire {}", standard::VIP)),
        "{script}"
    );
    assert!(
        !c.dir.join("script-lb3.out").exists(),
        "the quiesced spare acquired something"
    );
    let v = c.view("lb3");
    let me = v["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["me"] == true)
        .unwrap();
    assert_eq!(me["info"]["quiesce"], true);
}

#[test]
fn a_cluster_without_multicast_forms_from_its_peer_list() {
    let c = Cluster::unicast("unicast");
    let owners = c.settle(Duration::from_secs(5));
    assert_eq!(owners[&standard::VIP.to_string()], ["lb1"], "{owners:?}");
    assert_eq!(owners[&standard::VIP2.to_string()], ["lb2"], "{owners:?}");
    assert_eq!(c.agreed_leader().as_deref(), Some("198.18.0.2"));
    let answer = c.client(|| traffic::http_get(None, vip_addr(standard::VIP2), TIMEOUT));
    assert!(answer.starts_with('b'), "{answer}");
}

#[test]
fn a_node_whose_backends_are_unreachable_gives_its_vip_up() {
    let c = Cluster::new("selftest");
    c.settle(Duration::from_secs(5));
    // The services (the cluster's: changed through lb1, applied by all) now point at
    // 198.18.0.50, an address of b1 that lb1 cannot resolve (its ARP replies are
    // dropped there): lb1's own tests fail, the others' pass.
    c.second_address_on_b1("198.18.0.50");
    let out = c
        .lab
        .host("lb1")
        .ns
        .command("nft")
        .arg("table arp lbarp { chain in { type filter hook input priority 0; arp saddr ip 198.18.0.50 drop; }; }")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let svc = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    let svc2 = format!("tcp/{}:{}", standard::VIP2, standard::SERVICE_PORT);
    for s in [&svc, &svc2] {
        let out = c.lbctl("lb1", &["backend", "add", s, "198.18.0.50"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        for (_, o) in standard::BACKENDS {
            let out = c.lbctl(
                "lb1",
                &["backend", "remove", s, &standard::backend_ip(o).to_string()],
            );
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = c.owners();
        // Another node, which can reach the backends, serves it.
        if o.get(&standard::VIP.to_string())
            .is_some_and(|v| v.len() == 1 && v[0] != "lb1")
        {
            break;
        }
        assert!(Instant::now() < deadline, "lb1 kept its VIP: {o:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // Once neither VIP is servable from lb1, its own test fails.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = c.view("lb2");
        let lb1 = v["hosts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|h| h["info"]["id"] == "198.18.0.2")
            .cloned()
            .unwrap();
        if lb1["info"]["ok"] == false {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{lb1}\n{}",
            String::from_utf8_lossy(&c.lbctl("lb1", &["backend", "list", &svc2]).stdout)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let out = c.lbctl("lb1", &["-o", "json", "events"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("test_failed"));
    let answer = c.client(|| traffic::http_get(None, vip_addr(standard::VIP), TIMEOUT));
    assert!(answer.starts_with('b'), "{answer}");
}

#[test]
fn a_backend_registered_on_one_node_is_in_every_nodes_directory_and_maps() {
    let c = Cluster::new("dsd");
    c.settle(Duration::from_secs(5));
    let svc = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    let table = format!("svc.{svc}");
    // Registered on lb3 (not the directory master, lb1, which serves VIP 1).
    let out = c.lbctl(
        "lb3",
        &["dir", "add", &table, "extra", "198.18.0.13:8080;weight=5"],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    for lb in ["lb1", "lb2", "lb3"] {
        loop {
            let out = c.lbctl(lb, &["-o", "json", "dir", "search", &table]);
            let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if rows
                .as_array()
                .is_some_and(|r| r.iter().any(|e| e["key"] == "extra"))
            {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{lb} never got the entry: {rows}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let out = c.lbctl(lb, &["-o", "json", "backend", "list", &svc]);
        let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let b = list
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == "198.18.0.13");
        assert!(
            b.is_some_and(|b| b["weight"] == 3 || b["weight"] == 1 || b["weight"] == 5),
            "{lb}: {list}"
        );
    }
    eprintln!(
        "directory: an entry added on lb3 reached all three nodes within {:?}",
        start.elapsed()
    );
    // A deletion travels the same way.
    let out = c.lbctl("lb2", &["dir", "delete", &table, "extra"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let start = Instant::now();
    for lb in ["lb1", "lb2", "lb3"] {
        loop {
            let out = c.lbctl(lb, &["-o", "json", "dir", "search", &table]);
            let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if rows.as_array().is_some_and(|r| r.is_empty()) {
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{lb} kept the entry: {rows}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Waits until `check` holds for the directory table on every running node.
fn wait_all(
    c: &Cluster,
    table: &str,
    within: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let start = Instant::now();
    for lb in c.lbds.keys() {
        loop {
            let out = c.lbctl(lb, &["-o", "json", "dir", "search", table]);
            let rows: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
            if check(&rows) {
                break;
            }
            assert!(start.elapsed() < within, "{lb}: {rows}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    start.elapsed()
}

#[test]
fn a_change_made_on_a_node_after_its_restart_is_applied_not_taken_for_an_earlier_one() {
    // A node's directory requests are numbered; the master remembers what each
    // number became, so that a resent request is acknowledged, not applied twice.
    // A restarted lbd must not number its requests as its last run did: the master
    // would acknowledge them as the old ones and apply nothing.
    let mut c = Cluster::new("dsdrestart");
    c.settle(Duration::from_secs(5));
    let leader = c.agreed_leader().expect("a leader");
    let lb = ["lb2", "lb3"]
        .into_iter()
        .find(|lb| *lb != leader)
        .expect("a node that is not the directory master");
    let svc = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    let table = format!("svc.{svc}");
    let add = |c: &Cluster, key: &str| {
        let out = c.lbctl(lb, &["dir", "add", &table, key, "198.18.0.13:8080"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let has = |key: &'static str| {
        move |rows: &serde_json::Value| {
            rows.as_array()
                .is_some_and(|r| r.iter().any(|e| e["key"] == key))
        }
    };
    add(&c, "before");
    wait_all(&c, &table, Duration::from_secs(5), has("before"));

    c.lbds.get(lb).unwrap().signal(Signal::SIGKILL).unwrap();
    c.lbds.remove(lb);
    c.start(lb);
    c.wait_ready(lb, Duration::from_secs(10));
    add(&c, "after");
    let took = wait_all(&c, &table, Duration::from_secs(5), has("after"));
    eprintln!("a change on {lb} after its restart reached every node within {took:?}");
}

/// `lbctl backend register` of b3 (198.18.0.13:8080, ttl 1 s) on lb3, renewing until
/// killed.
fn register_b3_on_lb3(c: &Cluster, svc: &str) -> std::process::Child {
    c.lbctl_spawn(
        "lb3",
        &[
            "backend",
            "register",
            "--service",
            svc,
            "--addr",
            "198.18.0.13:8080",
            "--ttl",
            "1s",
        ],
    )
}

/// Whether a directory search holds b3's registration with this validity.
fn lease_valid(want: bool) -> impl Fn(&serde_json::Value) -> bool {
    move |rows| {
        rows.as_array().is_some_and(|r| {
            r.iter()
                .any(|e| e["key"] == "198.18.0.13:8080" && e["valid"] == want)
        })
    }
}

#[test]
fn a_lease_held_on_one_node_expires_on_every_node_and_the_directory_survives_its_master() {
    let mut c = Cluster::new("dsdlease");
    c.settle(Duration::from_secs(5));
    let svc = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    let table = format!("svc.{svc}");
    let mut register = register_b3_on_lb3(&c, &svc);
    let joined = wait_all(&c, &table, Duration::from_secs(5), lease_valid(true));
    register.kill().unwrap();
    let _ = register.wait();
    let left = wait_all(&c, &table, Duration::from_secs(5), lease_valid(false));
    eprintln!("lease on lb3: valid on all nodes after {joined:?}; invalid on all {left:?} after renewals stopped (ttl 1 s)");

    // The directory master (lb1, the leader) dies; lb2 takes over with the backup's
    // copy, and the directory goes on: a change made on lb3 reaches the survivors.
    c.lbds.get("lb1").unwrap().signal(Signal::SIGKILL).unwrap();
    c.lab.host("lb1").ns.ip("link set eth0 down").unwrap();
    c.lbds.remove("lb1");
    c.settle(Duration::from_secs(10));
    let out = c.lbctl("lb3", &["dir", "add", &table, "after", "198.18.0.12:8080"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let moved = wait_all(&c, &table, Duration::from_secs(5), |rows| {
        rows.as_array().is_some_and(|r| {
            r.iter().any(|e| e["key"] == "after")
                && r.iter().any(|e| e["key"] == "198.18.0.13:8080")
        })
    });
    eprintln!(
        "directory after its master died: a change on lb3 reached lb2 and lb3 within {moved:?}"
    );
}

#[test]
fn a_lease_expires_even_when_the_node_that_took_the_registration_dies() {
    let mut c = Cluster::new("leasenode");
    c.settle(Duration::from_secs(5));
    let svc = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    let table = format!("svc.{svc}");
    let mut register = register_b3_on_lb3(&c, &svc);
    wait_all(&c, &table, Duration::from_secs(5), lease_valid(true));
    // lb3, which took the registration, dies (and the registering process with it).
    c.lbds.get("lb3").unwrap().signal(Signal::SIGKILL).unwrap();
    c.lbds.remove("lb3");
    let _ = register.kill();
    let _ = register.wait();
    let left = wait_all(&c, &table, Duration::from_secs(5), lease_valid(false));
    eprintln!("lease taken on lb3, lb3 killed: invalid on lb1 and lb2 after {left:?} (ttl 1 s)");
}

#[test]
fn a_failed_route_to_a_backend_host_moves_its_traffic_on_every_node() {
    let mut c = Cluster::new("routes");
    c.settle(Duration::from_secs(5));
    c.lab.add_link("b3", "eth1", 53).unwrap();
    let svc1 = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    for (key, value) in [("b3host#0", "198.18.0.13"), ("b3host#1", "198.18.0.53")] {
        let out = c.lbctl("lb2", &["dir", "add", "host_routes", key, value]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for svc in [
        &svc1,
        &format!("tcp/{}:{}", standard::VIP2, standard::SERVICE_PORT),
    ] {
        let out = c.lbctl(
            "lb2",
            &["dir", "add", &format!("svc.{svc}"), "b3", "b3host:8080"],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    wait_all(&c, "host_routes", Duration::from_secs(5), |rows| {
        rows.as_array().is_some_and(|r| r.len() == 2)
    });

    // A long-lived connection through lb1 (VIP 1) that lands on b3.
    let vip1 = vip_addr(standard::VIP);
    let conv = c.client(move || {
        for i in 0..40 {
            let src = standard::client_sources().nth(i % 20);
            let mut conv = traffic::Conversation::open(src, vip1, TIMEOUT)?;
            if conv.ask(&format!("who {i}"))? == "b3" {
                return Ok(conv);
            }
        }
        anyhow::bail!("no connection landed on b3")
    });
    c.lab.host("b3").ns.ip("link set eth0 down").unwrap();
    let down = Instant::now();
    let invalid = |rows: &serde_json::Value| {
        rows.as_array().is_some_and(|r| {
            r.iter()
                .any(|e| e["key"] == "b3host#0" && e["valid"] == false)
        })
    };
    wait_all(&c, "host_routes", Duration::from_secs(10), invalid);
    eprintln!(
        "route 0 of b3 invalid on all three nodes {:?} after its link went down",
        down.elapsed()
    );
    c.client(move || {
        let mut conv = conv;
        let name = conv.ask_within("still there", Duration::from_secs(5))?;
        anyhow::ensure!(name == "b3", "the connection moved to {name}");
        Ok(())
    });
    // Both VIPs (served by two different nodes) still reach b3, over its second link,
    // once each node has the new next hop's MAC (until then b3's frames go the old
    // way and are lost: bounded retries).
    for vip in [standard::VIP, standard::VIP2] {
        let s: Vec<Ipv4Addr> = standard::client_sources().collect();
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let s = s.clone();
            let spread = c.lab.host("client").ns.spawn(move || {
                traffic::http_spread(&s, vip_addr(vip), 60, Duration::from_millis(500))
            });
            match spread.join().expect("client panicked") {
                Ok(spread) => {
                    assert!(spread.contains_key("b3"), "{vip}: {spread:?}");
                    break;
                }
                Err(e) if Instant::now() > deadline => panic!("{vip}: {e:#}"),
                Err(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }
}

/// `lbctl spm show` on `lb` as JSON (None while it fails).
fn spm_show(c: &Cluster, lb: &str, args: &[&str]) -> Option<serde_json::Value> {
    let mut all = vec!["-o", "json", "spm", "show"];
    all.extend_from_slice(args);
    let out = c.lbctl(lb, &all);
    out.status
        .success()
        .then(|| serde_json::from_slice(&out.stdout).ok())
        .flatten()
}

/// Waits until every node's map of `svc` satisfies `check`; returns when the last did.
fn wait_spm(
    c: &Cluster,
    svc: &str,
    within: Duration,
    check: impl Fn(&serde_json::Value) -> bool,
) -> Duration {
    let start = Instant::now();
    for lb in c.lbds.keys() {
        loop {
            let map = spm_show(c, lb, &["--service", svc]);
            if map.as_ref().is_some_and(&check) {
                break;
            }
            assert!(start.elapsed() < within, "{lb}: {map:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    start.elapsed()
}

#[test]
fn scaling_a_stateful_service_moves_its_epoch_on_every_node_and_its_vip_partitions_by_source() {
    let b = |o: u8| standard::backend_ip(o);
    let services = format!(
        r#"
[[service]]
vip = "{vip}"
port = {port}
protocol = "tcp"

[[service.backend]]
address = "{b1}"
weight = 2

[service.spm]
id = "web"
rule = "source"
epoch_policy = "stateful"

[[service]]
vip = "{vip2}"
port = {port}
protocol = "tcp"

[[service.backend]]
address = "{b1}"

[[service.backend]]
address = "{b2}"
"#,
        vip = standard::VIP,
        vip2 = standard::VIP2,
        port = standard::SERVICE_PORT,
        b1 = b(11),
        b2 = b(12),
    );
    let c = Cluster::with_services("spm", &services);
    c.settle(Duration::from_secs(5));
    let svc = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    let epochs = |m: &serde_json::Value| -> Vec<u64> {
        m["entries"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|e| e["sphere"]["epoch"].as_u64().unwrap_or(u64::MAX))
            .collect()
    };
    wait_spm(&c, &svc, Duration::from_secs(5), |m| epochs(m) == [0]);
    // The SPM manager (on the directory master) has recorded the service everywhere.
    wait_all(&c, "spm", Duration::from_secs(5), |rows| {
        rows.as_array()
            .is_some_and(|r| r.iter().any(|e| e["key"] == svc.as_str()))
    });

    // A smart client watching lb3's map sees each new version as it comes.
    let mut watch = c.lbctl_spawn("lb3", &["-o", "json", "spm", "watch", "--service", &svc]);

    // Scale from one instance to two, through the directory on a node that is not
    // the directory master.
    let table = format!("svc.{svc}");
    let add = |key: &str, value: &str| {
        let out = c.lbctl("lb3", &["dir", "add", &table, key, value]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Instant::now()
    };
    let added = add("b2", &format!("{}:8080;weight=1", b(12)));
    wait_spm(&c, &svc, Duration::from_secs(5), |m| epochs(m) == [1, 1]);
    let took = added.elapsed();
    eprintln!("epoch 0 -> 1 on every node after {took:?}");
    assert!(
        took < Duration::from_secs(1),
        "the new epoch reached every node after {took:?}"
    );
    for lb in c.lbds.keys() {
        let out = c.lbctl(lb, &["-o", "json", "service", "show", &svc]);
        let view: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(view["config"]["epoch"], 1, "{lb}'s data plane: {view}");
    }

    // A client holding epoch 0 gets the mismatch reply, with the new entries.
    let stale = c.lbctl("lb2", &["spm", "show", "--service", &svc, "--epoch", "0"]);
    assert_eq!(stale.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&stale.stderr).contains("epoch mismatch"));
    // ... and lbctl prints the map to use, in both forms (issue 19: it printed none).
    let shown = String::from_utf8_lossy(&stale.stdout);
    assert!(
        shown.contains("198.18.0.11") && shown.contains("198.18.0.12"),
        "no entries printed on a mismatch: {shown:?}"
    );
    let stale_json = c.lbctl(
        "lb2",
        &[
            "-o",
            "json",
            "spm",
            "show",
            "--service",
            &svc,
            "--epoch",
            "0",
        ],
    );
    assert_eq!(stale_json.status.code(), Some(1));
    let printed: serde_json::Value = serde_json::from_slice(&stale_json.stdout)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&stale_json.stdout)));
    assert_eq!(epochs(&printed["map"]), [1, 1], "{printed}");
    let raw = std::process::Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}", "--unix-socket"])
        .arg(c.socket("lb2"))
        .arg(format!("http://lbd/v1/spm?service={svc}&epoch=0"))
        .output()
        .expect("curl");
    let raw = String::from_utf8_lossy(&raw.stdout).to_string();
    let (body, code) = raw.rsplit_once('\n').unwrap();
    assert_eq!(code, "409", "{raw}");
    let body: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(body["epoch_mismatch"]["current"], 1, "{body}");
    assert_eq!(epochs(&body["map"]), [1, 1], "{body}");

    // Source partitioning: even client addresses reach the first instance (by
    // address), odd ones the second, and each client's map names where it goes.
    let answers = c.client(|| {
        let mut a = Vec::new();
        for src in standard::client_sources().take(10) {
            for _ in 0..2 {
                a.push((
                    src,
                    traffic::http_get(Some(src), vip_addr(standard::VIP), TIMEOUT)?,
                ));
            }
        }
        Ok(a)
    });
    for (src, name) in &answers {
        let want = if src.octets()[3] % 2 == 0 { "b1" } else { "b2" };
        assert_eq!(name, want, "client {src}: {answers:?}");
        let map = spm_show(
            &c,
            "lb1",
            &["--service", &svc, "--client", &src.to_string()],
        )
        .unwrap();
        let told = map["entries"][0]["host"]["inet_address"].as_str().unwrap();
        let want_ip = if want == "b1" { b(11) } else { b(12) };
        assert_eq!(told, want_ip.to_string(), "client {src}: {map}");
    }

    // A third instance, heavier: epoch 2, and every entry lists the others as its
    // backups in failover order (heavier first).
    add("b3", &format!("{}:8080;weight=5", b(13)));
    wait_spm(&c, &svc, Duration::from_secs(5), |m| epochs(m) == [2, 2, 2]);
    let map = spm_show(&c, "lb2", &["--service", &svc]).unwrap();
    let host = |h: &serde_json::Value| h["inet_address"].as_str().unwrap().to_string();
    let hosts: Vec<String> = map["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| host(&e["host"]))
        .collect();
    assert_eq!(hosts, [b(13), b(11), b(12)].map(|a| a.to_string()), "{map}");
    let backups: Vec<String> = map["entries"][2]["backups"]
        .as_array()
        .unwrap()
        .iter()
        .map(host)
        .collect();
    assert_eq!(backups, [b(13), b(11)].map(|a| a.to_string()), "{map}");

    let seen_of = |lines: &[String]| -> Vec<Vec<u64>> {
        lines
            .iter()
            .map(|l| epochs(&serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))))
            .collect()
    };
    let lines = lb_tests::cluster_lab::lines_until(&mut watch, Duration::from_secs(5), |l| {
        seen_of(l).last() == Some(&vec![2, 2, 2])
    });
    let seen = seen_of(&lines);
    for wanted in [vec![0], vec![1, 1], vec![2, 2, 2]] {
        assert!(
            seen.contains(&wanted),
            "the watch missed {wanted:?}: {seen:?}"
        );
    }
    assert_eq!(seen.last(), Some(&vec![2, 2, 2]), "{seen:?}");
}

/// How long a TCP connect to `vip` takes to be refused (fails if it is not refused).
fn refused_after(c: &Cluster, vip: Ipv4Addr) -> Duration {
    c.client(move || {
        let start = Instant::now();
        match std::net::TcpStream::connect_timeout(&vip_addr(vip), Duration::from_secs(2)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(start.elapsed()),
            Err(e) => anyhow::bail!("not refused but {e} after {:?}", start.elapsed()),
            Ok(_) => anyhow::bail!("connected to a service in maintenance"),
        }
    })
}

fn unavailable_on(c: &Cluster, lb: &str, svc: &str) -> Option<serde_json::Value> {
    let out = c.lbctl(lb, &["-o", "json", "service", "show", svc]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    v.get("unavailable").cloned()
}

#[test]
fn maintenance_set_on_one_node_is_refused_at_once_by_every_node_and_outlives_restarts() {
    let mut c = Cluster::new("avail");
    c.settle(Duration::from_secs(5));
    let svc = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    let vip1 = vip_addr(standard::VIP);
    c.client(move || traffic::http_get(None, vip1, TIMEOUT).map(drop));

    // lb3 goes away and forgets everything: it comes back later as a new node.
    c.lbds.get("lb3").unwrap().signal(Signal::SIGKILL).unwrap();
    c.lbds.remove("lb3");
    c.wipe("lb3");

    // Maintenance, set on lb2 (lb1 serves the VIP).
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
            "--operator",
            "tester",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let set = Instant::now();
    for lb in ["lb1", "lb2"] {
        loop {
            if let Some(u) = unavailable_on(&c, lb, &svc) {
                assert_eq!(u["operator"], "tester", "{u}");
                assert_eq!(u["reason"], "planned", "{u}");
                assert!(u["expected_up_ms"].as_u64().is_some(), "{u}");
                break;
            }
            assert!(
                set.elapsed() < Duration::from_secs(1),
                "{lb} does not refuse after 1 s"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    eprintln!("maintenance on every live node after {:?}", set.elapsed());
    // Clients are refused at once, not left to time out.
    let times: Vec<Duration> = (0..5).map(|_| refused_after(&c, standard::VIP)).collect();
    eprintln!("connection refused after {times:?}");
    assert!(
        times.iter().all(|t| *t < Duration::from_millis(10)),
        "{times:?}"
    );
    // The map says why and until when.
    let map = spm_show(&c, "lb1", &["--service", &svc]).unwrap();
    assert_eq!(
        map["entries"][0]["unavailable"]["reason"], "planned",
        "{map}"
    );

    // The serving node restarts during maintenance: it still refuses.
    c.lbds.get("lb1").unwrap().signal(Signal::SIGKILL).unwrap();
    c.lbds.remove("lb1");
    refused_after(&c, standard::VIP);
    c.start("lb1");
    assert!(
        unavailable_on(&c, "lb1", &svc).is_some(),
        "lb1 forgot across its restart"
    );
    refused_after(&c, standard::VIP);

    // A new node learns the state from its peers before it serves.
    c.start("lb3");
    let deadline = Instant::now() + Duration::from_secs(3);
    while unavailable_on(&c, "lb3", &svc).is_none() {
        assert!(
            Instant::now() < deadline,
            "lb3 did not learn the maintenance"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Once synced, it serves the VIP when lb1 dies, and refuses as the others did.
    c.wait_ready("lb3", Duration::from_secs(5));
    c.lbds.get("lb1").unwrap().signal(Signal::SIGKILL).unwrap();
    c.lab.host("lb1").ns.ip("link set eth0 down").unwrap();
    c.lbds.remove("lb1");
    let owners = c.settle(Duration::from_secs(10));
    assert_eq!(owners[&standard::VIP.to_string()], ["lb3"], "{owners:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while client_mac_for(&c, standard::VIP).as_deref() != Some(mac_of("lb3").as_str()) {
        assert!(Instant::now() < deadline, "the client still sends to lb1");
        std::thread::sleep(Duration::from_millis(20));
    }
    refused_after(&c, standard::VIP);

    // Available again, from lb3: served again.
    let out = c.lbctl("lb3", &["service", "available", &svc]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let deadline = Instant::now() + Duration::from_secs(2);
    while unavailable_on(&c, "lb2", &svc).is_some() {
        assert!(Instant::now() < deadline, "lb2 still refuses");
        std::thread::sleep(Duration::from_millis(20));
    }
    c.client(move || traffic::http_get(None, vip1, TIMEOUT).map(drop));
}

#[test]
fn the_status_page_of_a_node_shows_a_failover_within_two_seconds() {
    let mut c = Cluster::new("pagefail");
    c.settle(Duration::from_secs(5));
    let page = lb_tests::browser::Browser::open(
        &c.lab.host("lb2").ns,
        "http://127.0.0.1:9469/",
        &c.dir.join("chromium"),
    )
    .unwrap();
    // Which node's row says it serves the VIP.
    let owner = |p: &lb_tests::browser::Browser| -> String {
        p.eval(&format!(
            "for (const r of document.querySelectorAll('tr[data-node]')) \
               if (r.lastChild.innerText.split(', ').includes('{}')) return r.dataset.node; \
             return '';",
            standard::VIP
        ))
        .as_str()
        .unwrap_or("")
        .to_string()
    };
    page.wait_for(Duration::from_secs(10), |p| owner(p) == "198.18.0.2")
        .unwrap_or_else(|| panic!("the page never showed lb1 serving: {:?}", page.text("body")));
    c.lbds.get("lb1").unwrap().signal(Signal::SIGKILL).unwrap();
    c.lab.host("lb1").ns.ip("link set eth0 down").unwrap();
    c.lbds.remove("lb1");
    let took = page
        .wait_for(Duration::from_secs(10), |p| {
            let o = owner(p);
            !o.is_empty() && o != "198.18.0.2"
        })
        .unwrap_or_else(|| panic!("no failover on the page: {:?}", page.text("body")));
    eprintln!("the open page showed the failover {took:?} after the kill");
    assert!(
        took <= Duration::from_secs(2),
        "the failover showed after {took:?}"
    );
    assert!(
        page.text("#changes")
            .contains(&format!("VIP {}", standard::VIP)),
        "{:?}",
        page.text("#changes")
    );
}
