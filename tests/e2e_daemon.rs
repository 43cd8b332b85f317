//! lbd and lbctl as an operator uses them, in the lab: traffic from the client
//! namespace to the VIP, changes made with lbctl, a daemon killed and restarted.

mod common;

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::Path,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use common::*;
use lb_tests::{
    lab::standard,
    traffic::{self, Conversation},
};
use nix::sys::signal::Signal;

#[test]
fn http_and_udp_to_the_vip_spread_over_all_three_backends() {
    let env = Env::new("spread", &["b1", "b2", "b3"]);
    let tcp = env.spread(300);
    eprintln!("HTTP: {tcp:?}");
    assert_eq!(tcp.values().sum::<usize>(), 300);
    assert_eq!(tcp.len(), 3, "{tcp:?}");
    for (b, n) in &tcp {
        assert!(*n >= 45, "{b} got {n} of 300 connections (< 15%): {tcp:?}");
    }
    let s = sources();
    let udp = env.client(move || traffic::udp_spread(&s, vip(), 90, TIMEOUT));
    eprintln!("UDP: {udp:?}");
    assert_eq!(udp.values().sum::<usize>(), 90);
    assert_eq!(udp.len(), 3, "{udp:?}");
    // The daemon counted them.
    let stats: serde_json::Value =
        serde_json::from_str(&env.lbctl_ok(&["-o", "json", "stats"])).unwrap();
    let tcp_packets = stats["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == SVC)
        .unwrap()["packets"]
        .as_u64()
        .unwrap();
    assert!(tcp_packets >= 3 * 300, "{tcp_packets}");
}

#[test]
fn drained_and_removed_backends_get_no_new_connections_and_drained_ones_keep_theirs() {
    let env = Env::new("drain", &["b1", "b2", "b3"]);
    // A long-lived connection; whichever backend it lands on gets drained.
    let (conv, first) = env.client(|| {
        let mut c = Conversation::open(None, vip(), TIMEOUT)?;
        let name = c.ask("hello")?;
        Ok((c, name))
    });
    let octet = standard::BACKENDS
        .iter()
        .find(|(t, _)| *t == first)
        .unwrap()
        .1;
    let drained = standard::backend_ip(octet).to_string();
    let out = env.lbctl_ok(&["backend", "drain", SVC, &drained]);
    assert!(out.contains("draining"), "{out}");

    let after = env.spread(60);
    assert!(
        !after.contains_key(&first),
        "drained {first} still got new connections: {after:?}"
    );
    // The established connection still works, on the same backend.
    let conv = env.client(move || {
        let mut conv = conv;
        for i in 0..5 {
            let name = conv.ask(&format!("still there {i}"))?;
            anyhow::ensure!(name == first, "the drained connection moved to {name}");
        }
        Ok(conv)
    });

    // Remove another one: at once, nothing new reaches it either.
    let other = standard::BACKENDS
        .iter()
        .find(|(t, _)| after.contains_key(*t))
        .unwrap();
    let out = env.lbctl_ok(&[
        "backend",
        "remove",
        SVC,
        &standard::backend_ip(other.1).to_string(),
    ]);
    assert!(out.starts_with("- backend"), "{out}");
    let last = env.spread(60);
    assert_eq!(
        last.len(),
        1,
        "only the one remaining backend should answer: {last:?}"
    );
    assert!(!last.contains_key(other.0));
    drop(conv);
}

#[test]
fn an_added_backend_leaves_established_connections_where_they_are() {
    let env = Env::new("add", &["b1", "b2"]);
    let convs = env.client(|| {
        let mut convs = Vec::new();
        for i in 0..12 {
            let src = standard::client_sources().nth(i);
            let mut c = Conversation::open(src, vip(), TIMEOUT)?;
            let name = c.ask("hello")?;
            convs.push((c, name));
        }
        Ok(convs)
    });
    let out = env.lbctl_ok(&["backend", "add", SVC, "198.18.0.13"]);
    assert!(out.starts_with("+ backend 198.18.0.13"), "{out}");
    env.client(move || {
        for (mut c, name) in convs {
            for i in 0..3 {
                let now = c.ask(&format!("again {i}"))?;
                anyhow::ensure!(now == name, "a connection moved from {name} to {now}");
            }
        }
        Ok(())
    });
    let fresh = env.spread(120);
    assert!(
        fresh.get("b3").copied().unwrap_or(0) >= 15,
        "the new backend got too little: {fresh:?}"
    );
}

#[test]
fn killing_and_restarting_lbd_breaks_no_connection() {
    let mut env = Env::new("restart", &["b1", "b2", "b3"]);
    let stop = Arc::new(AtomicBool::new(false));
    let flag = stop.clone();
    // A steady stream: a long-lived conversation and new connections, alternating.
    let stream = env.lab.host("client").ns.spawn(move || {
        let mut conv = Conversation::open(None, vip(), TIMEOUT)?;
        let home = conv.ask("start")?;
        let started = Instant::now();
        let mut last = Instant::now();
        let mut max_gap = Duration::ZERO;
        let mut answers = 0u32;
        let sources: Vec<Ipv4Addr> = standard::client_sources().collect();
        while !flag.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(60) {
            let name = conv.ask(&format!("tick {answers}"))?;
            anyhow::ensure!(
                name == home,
                "the long-lived connection moved from {home} to {name}"
            );
            traffic::http_get(
                Some(sources[answers as usize % sources.len()]),
                vip(),
                TIMEOUT,
            )?;
            answers += 1;
            max_gap = max_gap.max(last.elapsed());
            last = Instant::now();
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok((answers, max_gap))
    });
    std::thread::sleep(Duration::from_millis(300));
    // A runtime change made before the crash must survive it.
    env.lbctl_ok(&["backend", "weight", SVC, "198.18.0.13", "5"]);
    std::thread::sleep(Duration::from_millis(200));
    env.lbd.as_ref().unwrap().signal(Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    env.lbd
        .as_mut()
        .unwrap()
        .wait_timeout(Duration::from_secs(5))
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let start_time = env.start_lbd();
    let restart = killed.elapsed();
    let status: serde_json::Value =
        serde_json::from_str(&env.lbctl_ok(&["-o", "json", "status"])).unwrap();
    assert_eq!(status["resumed"], true, "{status}");
    assert_eq!(status["interfaces"][0]["attach"], "replaced", "{status}");
    let backends: serde_json::Value =
        serde_json::from_str(&env.lbctl_ok(&["-o", "json", "backend", "list", SVC])).unwrap();
    let b3 = backends
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == "198.18.0.13")
        .unwrap();
    assert_eq!(
        b3["weight"], 5,
        "the runtime change was lost in the restart: {b3}"
    );
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let (answers, max_gap) = stream
        .join()
        .expect("stream thread panicked")
        .expect("the stream broke");
    eprintln!(
        "hitless restart: lbd down {restart:?} (start to ready {start_time:?}); {answers} exchanges, largest gap between answers {max_gap:?}"
    );
    assert!(answers > 50, "only {answers} exchanges");
    assert!(
        max_gap < restart,
        "a gap of {max_gap:?} is not shorter than the restart ({restart:?})"
    );
}

#[test]
fn a_config_typo_names_its_line_and_a_stopped_daemon_gets_a_one_line_error() {
    let dir = std::env::temp_dir().join(format!("lb-e2e-typo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lbd.toml");
    let text = config_text("typo", &dir, Path::new("/sys/fs/bpf/lb/typo"), &["b1"])
        .replace("protocol = \"udp\"", "protocl = \"udp\"");
    let line = text.lines().position(|l| l.starts_with("protocl")).unwrap() + 1;
    std::fs::write(&path, text).unwrap();
    let out = std::process::Command::new(binary("lbd"))
        .arg("--config")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("lbd.toml:{line}:")),
        "no line {line} in: {stderr}"
    );
    assert!(stderr.contains("protocl"), "{stderr}");

    let out = std::process::Command::new(binary("lbctl"))
        .args([
            "--socket",
            &dir.join("nobody.sock").to_string_lossy(),
            "status",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(stderr.contains("lbd is not running"), "{stderr}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_lbctl_command_speaks_json() {
    let env = Env::new("json", &["b1", "b2"]);
    let apply = env.dir.join("apply.toml");
    std::fs::write(
        &apply,
        config_text("x", &env.dir, &env.pin_dir, &["b1", "b2", "b3"]),
    )
    .unwrap();
    let apply = apply.to_string_lossy().into_owned();
    let commands: Vec<Vec<&str>> = vec![
        vec!["status"],
        vec!["service", "list"],
        vec!["service", "show", SVC],
        vec!["backend", "list", SVC],
        vec!["stats"],
        vec!["service", "add", "tcp/198.18.0.100:9090"],
        vec![
            "backend",
            "add",
            "tcp/198.18.0.100:9090",
            "198.18.0.11",
            "--weight",
            "2",
        ],
        vec![
            "backend",
            "weight",
            "tcp/198.18.0.100:9090",
            "198.18.0.11",
            "3",
        ],
        vec!["backend", "drain", "tcp/198.18.0.100:9090", "198.18.0.11"],
        vec![
            "backend",
            "drain",
            "tcp/198.18.0.100:9090",
            "198.18.0.11",
            "--undo",
        ],
        vec!["backend", "remove", "tcp/198.18.0.100:9090", "198.18.0.11"],
        vec!["service", "remove", "tcp/198.18.0.100:9090"],
        vec!["apply", "-f", &apply, "--dry-run"],
        vec!["apply", "-f", &apply],
    ];
    for cmd in &commands {
        let mut args = vec!["--output", "json"];
        args.extend(cmd);
        let out = env.lbctl_ok(&args);
        let v: serde_json::Value =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("lbctl {cmd:?}: {e}: {out}"));
        assert!(!v.is_null(), "lbctl {cmd:?}");
    }
    // The apply added b3 to both services; a second one has nothing to do.
    let again: serde_json::Value =
        serde_json::from_str(&env.lbctl_ok(&["-o", "json", "apply", "-f", &apply])).unwrap();
    assert_eq!(again["changes"].as_array().unwrap().len(), 0, "{again}");
    // And a shutdown answers in JSON too; with --detach nothing of the data plane stays.
    let out = env.lbctl_ok(&["-o", "json", "shutdown", "--detach"]);
    serde_json::from_str::<serde_json::Value>(&out).unwrap();
    let mut env = env;
    let status = env
        .lbd
        .as_mut()
        .unwrap()
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "lbd did not exit cleanly: {status:?}"
    );
    let left: Vec<_> = std::fs::read_dir(&env.pin_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        left.is_empty(),
        "pins left after shutdown --detach: {left:?}"
    );
    let link = env.lab.host("lb1").ns.ip("link show eth0").unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(
        !link.contains("xdp"),
        "an XDP program is still attached: {link}"
    );
}

#[test]
fn a_backend_registered_with_a_lease_takes_connections_and_leaves_when_it_stops_renewing() {
    let env = Env::new("lease", &["b1", "b2"]);
    let mut register = std::process::Command::new(binary("lbctl"))
        .arg("--socket")
        .arg(&env.socket)
        .args([
            "backend",
            "register",
            "--service",
            SVC,
            "--addr",
            "198.18.0.13:8080",
            "--ttl",
            "1s",
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("lbctl backend register");
    let joined = env.spread_until(30, "b3 never got a connection", |s| s.contains_key("b3"));
    // It shows in the directory and in the service's backends.
    let rows = env.lbctl_ok(&["-o", "json", "dir", "search", &format!("svc.{SVC}")]);
    assert!(rows.contains("198.18.0.13:8080"), "{rows}");
    let backends = env.lbctl_ok(&["backend", "list", SVC]);
    assert!(backends.contains("198.18.0.13"), "{backends}");

    register.kill().unwrap();
    let _ = register.wait();
    let left = env.spread_until(30, "b3 still gets connections", |s| !s.contains_key("b3"));
    eprintln!("lease: new connections reached the registered backend after {joined:?}; it left {left:?} after its renewals stopped (ttl 1 s)");
    let rows: serde_json::Value = serde_json::from_str(&env.lbctl_ok(&[
        "-o",
        "json",
        "dir",
        "search",
        &format!("svc.{SVC}"),
    ]))
    .unwrap();
    assert_eq!(rows[0]["valid"], false, "{rows}");
}

#[test]
fn a_backend_failing_its_health_check_gets_no_new_connections_until_it_recovers() {
    let mut env = Env::with_check("health", &["b1", "b2", "b3"], HTTP_CHECK);
    let all = env.spread(60);
    assert_eq!(all.len(), 3, "{all:?}");
    // b2's server stops; the host stays up and reachable.
    env.lab.stop_server("b2");
    let stopped = Instant::now();
    let gone = loop {
        // Requests that land on b2 before the check catches it fail; count only answers.
        let s = sources();
        let answers = env.client(move || {
            let mut a = BTreeMap::new();
            for i in 0..30 {
                if let Ok(name) =
                    traffic::http_get(Some(s[i % s.len()]), vip(), Duration::from_millis(500))
                {
                    *a.entry(name).or_insert(0usize) += 1;
                }
            }
            Ok(a)
        });
        if answers.values().sum::<usize>() == 30 && !answers.contains_key("b2") {
            break stopped.elapsed();
        }
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "b2 still chosen: {answers:?}"
        );
    };
    let backends = env.lbctl_ok(&["-o", "json", "backend", "list", SVC]);
    let list: serde_json::Value = serde_json::from_str(&backends).unwrap();
    let b2 = list
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == "198.18.0.12")
        .unwrap();
    assert_eq!(b2["weight"], 1, "the configured weight is kept: {b2}");
    assert_eq!(b2["healthy"], false, "{b2}");

    env.lab.start_server("b2", &std::env::temp_dir()).unwrap();
    let back = env.spread_until(60, "b2 never came back", |s| s.contains_key("b2"));
    eprintln!("health check (HTTP every 200 ms, fall 2, rise 2): b2 out {gone:?} after its server stopped, back {back:?} after it restarted");
}

#[test]
fn with_two_routes_to_a_backend_a_failed_link_moves_its_traffic_to_the_other() {
    let mut env = Env::new("routes", &["b1", "b2"]);
    env.lab.add_link("b3", "eth1", 53).unwrap();
    let table = format!("svc.{SVC}");
    env.lbctl_ok(&["dir", "add", "host_routes", "b3host#0", "198.18.0.13"]);
    env.lbctl_ok(&["dir", "add", "host_routes", "b3host#1", "198.18.0.53"]);
    env.lbctl_ok(&["dir", "add", &table, "b3", "b3host:8080"]);
    let found = env.lbctl_ok(&["-o", "json", "dir", "find", &table]);
    assert!(found.contains("198.18.0.13"), "{found}");

    // A long-lived connection that lands on b3.
    let conv = env.client(|| {
        for i in 0..40 {
            let src = standard::client_sources().nth(i % 20);
            let mut c = Conversation::open(src, vip(), TIMEOUT)?;
            if c.ask(&format!("who {i}"))? == "b3" {
                return Ok(c);
            }
        }
        anyhow::bail!("no connection landed on b3 in 40 tries")
    });
    env.lab.host("b3").ns.ip("link set eth0 down").unwrap();
    let down = Instant::now();
    loop {
        let rows: serde_json::Value = serde_json::from_str(&env.lbctl_ok(&[
            "-o",
            "json",
            "dir",
            "search",
            "host_routes",
            "b3host#0",
        ]))
        .unwrap();
        if rows[0]["valid"] == false {
            break;
        }
        assert!(
            down.elapsed() < Duration::from_secs(10),
            "route 0 never marked invalid: {rows}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let moved = down.elapsed();
    let found = env.lbctl_ok(&["-o", "json", "dir", "find", &table]);
    assert!(
        found.contains("198.18.0.53"),
        "the second route is not current: {found}"
    );
    // The established connection goes on, over the second link, on the same backend.
    env.client(move || {
        let mut conv = conv;
        let name = conv.ask_within("still b3?", Duration::from_secs(5))?;
        anyhow::ensure!(name == "b3", "moved to {name}");
        Ok(())
    });
    let spread = env.spread(60);
    assert!(
        spread.contains_key("b3"),
        "b3 gets no new connection over its second route: {spread:?}"
    );
    eprintln!("host routes: route 0 of b3 marked invalid {moved:?} after its link went down; traffic continued over route 1");
}

#[test]
fn a_backend_registers_itself_from_its_own_host_signed_and_unsigned_requests_are_refused() {
    let env = Env::new("selfreg", &["b1", "b2"]);
    let b3 = &env.lab.host("b3").ns;
    // Anyone who reaches the port but has not the key is refused, and counted.
    let body =
        format!(r#"{{"service":"{SVC}","address":"198.18.0.13","port":8080,"ttl_ms":5000}}"#);
    let out = b3
        .exec(
            "curl",
            &[
                "-s",
                "-m",
                "3",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "-X",
                "POST",
                "-H",
                "content-type: application/json",
                "-d",
                &body,
                "http://198.18.0.2:9470/v1/dir/register",
            ],
        )
        .expect("curl from b3");
    let code = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        code == "400" || code == "401",
        "an unsigned registration answered {code}"
    );
    let (refused, status) = env.rejected_on("registry");
    assert_eq!(refused, 1, "{status}");
    let rows = env.lbctl_ok(&["-o", "json", "dir", "search", &format!("svc.{SVC}")]);
    assert!(
        !rows.contains("198.18.0.13"),
        "registered without the key: {rows}"
    );
    // With the key, from b3 itself, through lbctl.
    let key = env.dir.join("registry.key");
    std::fs::write(&key, REGISTRY_KEY).unwrap();
    let mut cmd = b3.command(&binary("lbctl").to_string_lossy());
    cmd.args([
        "backend",
        "register",
        "--service",
        SVC,
        "--addr",
        "198.18.0.13:8080",
        "--ttl",
        "2s",
        "--registry",
        "198.18.0.2:9470",
        "--registry-key-file",
    ])
    .arg(&key)
    .stdout(std::process::Stdio::null());
    let mut register = cmd.spawn().expect("lbctl backend register from b3");
    let joined = env.spread_until(30, "b3 never got a connection", |s| s.contains_key("b3"));
    eprintln!("a signed registration from b3 took connections after {joined:?}");
    let _ = register.kill();
    let _ = register.wait();
    // Only registration is open on that port, not the management API.
    let out = b3
        .exec(
            "curl",
            &[
                "-s",
                "-m",
                "3",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://198.18.0.2:9470/v1/status",
            ],
        )
        .expect("curl from b3");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "404");
}

#[test]
fn the_service_point_map_shows_entries_backups_and_epochs_and_answers_a_stale_epoch() {
    let env = Env::new("spm", &["b1", "b2"]);
    let map: serde_json::Value =
        serde_json::from_str(&env.lbctl_ok(&["-o", "json", "spm", "show", "--service", SVC]))
            .unwrap();
    let entries = map["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{map}");
    assert_eq!(entries[0]["sphere"]["epoch"], 0);
    assert_eq!(
        entries[0]["backups"].as_array().unwrap().len(),
        1,
        "the other backend is the backup"
    );
    // One client: one target (pre-selected), the rest as backups.
    let one: serde_json::Value = serde_json::from_str(&env.lbctl_ok(&[
        "-o",
        "json",
        "spm",
        "show",
        "--service",
        SVC,
        "--client",
        "203.0.113.7",
    ]))
    .unwrap();
    assert_eq!(one["entries"].as_array().unwrap().len(), 1, "{one}");
    // Type 2: the service spec moves to the header.
    let t2: serde_json::Value = serde_json::from_str(&env.lbctl_ok(&[
        "-o",
        "json",
        "spm",
        "show",
        "--service",
        SVC,
        "--type",
        "2",
    ]))
    .unwrap();
    assert_eq!(t2["spec"]["service_id"], SVC);
    assert!(t2["entries"][0].get("spec").is_none(), "{t2}");

    // An operator bump: a new epoch, in the map and in the data plane.
    let out = env.lbctl_ok(&["service", "bump-epoch", SVC]);
    assert!(out.contains("epoch 1"), "{out}");
    let map: serde_json::Value =
        serde_json::from_str(&env.lbctl_ok(&["-o", "json", "spm", "show", "--service", SVC]))
            .unwrap();
    assert_eq!(map["entries"][0]["sphere"]["epoch"], 1);
    // A client holding the old epoch is told so.
    let stale = env.lbctl(&["spm", "show", "--service", SVC, "--epoch", "0"]);
    assert_eq!(stale.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&stale.stderr).contains("epoch mismatch"),
        "{}",
        String::from_utf8_lossy(&stale.stderr)
    );
    // ... and gets the entries to use instead, in both output formats.
    let shown = String::from_utf8_lossy(&stale.stdout);
    assert!(
        shown.contains("198.18.0.11:8080"),
        "no entries printed: {shown}"
    );
    let stale = env.lbctl(&[
        "-o",
        "json",
        "spm",
        "show",
        "--service",
        SVC,
        "--epoch",
        "0",
    ]);
    assert_eq!(stale.status.code(), Some(1));
    let reply: serde_json::Value = serde_json::from_slice(&stale.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&stale.stdout)));
    assert_eq!(reply["epoch_mismatch"]["current"], 1, "{reply}");
    assert_eq!(reply["map"]["entries"][0]["sphere"]["epoch"], 1, "{reply}");
    env.lbctl_ok(&["spm", "show", "--service", SVC, "--epoch", "1"]);
    // Traffic still flows after the bump (connections of the old epoch are kept).
    assert_eq!(env.spread(20).values().sum::<usize>(), 20);
}

#[test]
fn an_overloaded_backend_gets_no_new_connections_until_below_the_low_water_mark() {
    let steering = "\n[service.steering]\nhigh = 800\nlow = 600\nperiod_ms = 200\n";
    let env = Env::with_check("watermarks", &["b1", "b2", "b3"], steering);
    let svc = format!("tcp/{}:{}", standard::VIP, standard::SERVICE_PORT);
    // A long-lived connection that landed on b1.
    let conv = env.client(|| {
        for i in 0..40 {
            let src = sources().get(i % 20).copied();
            let mut c = Conversation::open(src, vip(), TIMEOUT)?;
            if c.ask(&format!("who {i}"))? == "b1" {
                return Ok(c);
            }
        }
        anyhow::bail!("no connection landed on b1")
    });
    let report = |backend: u8, load: u64| {
        env.lbctl_ok(&[
            "backend",
            "report",
            "--service",
            &svc,
            "--addr",
            &standard::backend_ip(backend).to_string(),
            "--load",
            &load.to_string(),
            "--capacity",
            "1000",
            "--interval",
            "20s",
            "--once",
        ]);
    };
    let note = |backend: u8| -> String {
        let v: serde_json::Value =
            serde_json::from_str(&env.lbctl_ok(&["-o", "json", "service", "show", &svc])).unwrap();
        v["backends"]
            .as_array()
            .unwrap()
            .iter()
            .find(|b| b["address"] == standard::backend_ip(backend).to_string())
            .and_then(|b| b["steering"].as_str().map(str::to_string))
            .unwrap_or_default()
    };
    let wait_note = |backend: u8, prefix: &str| -> Duration {
        let start = Instant::now();
        while !note(backend).starts_with(prefix) {
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "b{backend}: {:?}",
                note(backend)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        start.elapsed()
    };
    report(12, 100);
    report(13, 200);
    report(11, 950);
    let took = wait_note(11, "out:");
    eprintln!("b1 out of the new-flow table {took:?} after its report");
    assert!(note(11).contains("utilization 950"), "{}", note(11));
    let spread = env.spread(60);
    assert_eq!(
        spread.get("b1"),
        None,
        "new connections avoid b1: {spread:?}"
    );
    // Its established connection goes on.
    let mut conv = env.client(move || {
        let mut conv = conv;
        anyhow::ensure!(conv.ask("still there")? == "b1");
        Ok(conv)
    });

    // Down to 700, between the marks: the manager judges it and keeps it out
    // (hysteresis).
    report(11, 700);
    wait_note(11, "out: utilization 700");
    assert_eq!(env.spread(30).get("b1"), None);

    // Below the low mark: back in, and new connections reach it again.
    report(11, 500);
    wait_note(11, "in:");
    let spread = env.spread(60);
    assert!(spread.get("b1").copied().unwrap_or(0) > 0, "{spread:?}");
    conv = env.client(move || {
        anyhow::ensure!(conv.ask("and now")? == "b1");
        Ok(conv)
    });
    drop(conv);
}

#[test]
fn a_subscriber_sees_adds_and_deletes_of_its_prefix_only() {
    use std::io::BufRead;
    let env = Env::new("subscribe", &["b1"]);
    let mut sub = std::process::Command::new(binary("lbctl"))
        .arg("--socket")
        .arg(&env.socket)
        .args(["-o", "json", "dir", "subscribe", "svc.sub", "web-"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("lbctl dir subscribe");
    let lines = std::sync::mpsc::channel::<String>();
    let stdout = sub.stdout.take().unwrap();
    let tx = lines.0;
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
    // The subscription is in place once a first matching change comes through.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut first = None;
    let mut tries = 0;
    while first.is_none() && Instant::now() < deadline {
        // A new key each time: adding the same row again changes nothing.
        env.lbctl_ok(&[
            "dir",
            "add",
            "svc.sub",
            &format!("web-0-{tries}"),
            "198.18.0.11:80",
        ]);
        tries += 1;
        first = lines.1.recv_timeout(Duration::from_millis(200)).ok();
    }
    let first: serde_json::Value = serde_json::from_str(&first.expect("no event")).unwrap();
    assert_eq!(first["event"], "add", "{first}");
    env.lbctl_ok(&["dir", "add", "svc.sub", "db-1", "198.18.0.12:80"]);
    env.lbctl_ok(&["dir", "add", "svc.sub", "web-1", "198.18.0.12:80"]);
    env.lbctl_ok(&["dir", "delete", "svc.sub", "web-1"]);
    let mut got = Vec::new();
    while got.len() < 2 {
        let l = lines
            .1
            .recv_timeout(Duration::from_secs(3))
            .unwrap_or_else(|_| panic!("events so far: {got:?}"));
        let e: serde_json::Value = serde_json::from_str(&l).unwrap();
        if e["key"].as_str().unwrap().starts_with("web-0-") {
            continue; // the tries while waiting for the subscription
        }
        got.push((
            e["event"].as_str().unwrap().to_string(),
            e["key"].as_str().unwrap().to_string(),
        ));
    }
    assert_eq!(
        got,
        [
            ("add".to_string(), "web-1".to_string()),
            ("delete".to_string(), "web-1".to_string())
        ],
        "db-1 is outside the prefix"
    );
    let _ = sub.kill();
    let _ = sub.wait();
}

#[test]
fn sighup_reloads_the_services_of_the_config_file_and_a_bad_file_changes_nothing() {
    let env = Env::new("sighup", &["b1", "b2"]);
    let backends = |env: &Env| -> Vec<String> {
        let list: serde_json::Value =
            serde_json::from_str(&env.lbctl_ok(&["-o", "json", "backend", "list", SVC])).unwrap();
        list.as_array()
            .unwrap()
            .iter()
            .map(|b| b["address"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(backends(&env), ["198.18.0.11", "198.18.0.12"]);
    // The file gains b3 and a changed [dataplane] size: SIGHUP applies the first and
    // says the second waits for a restart.
    let text = reconfigured(&env, &["b1", "b2", "b3"]);
    std::fs::write(&env.config, &text).unwrap();
    env.lbd.as_ref().unwrap().signal(Signal::SIGHUP).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while backends(&env) != ["198.18.0.11", "198.18.0.12", "198.18.0.13"] {
        assert!(
            Instant::now() < deadline,
            "b3 not added: {:?}",
            backends(&env)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A broken file: lbd keeps running and keeps what it has, and says where.
    std::fs::write(
        &env.config,
        text.replace("protocol = \"udp\"", "protocol = \"sctp\""),
    )
    .unwrap();
    env.lbd.as_ref().unwrap().signal(Signal::SIGHUP).unwrap();
    let log = std::fs::read_dir(&env.dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("lbd-") && n.ends_with(".log"))
        })
        .expect("lbd's log");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        if text.contains("was not reloaded") {
            assert!(
                text.contains("lbd.toml:") && text.contains("sctp"),
                "the error says where: {text}"
            );
            assert!(text.contains("take effect at the next restart"), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "no reload error logged: {text}");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        env.lbctl(&["status"]).status.success(),
        "lbd died on SIGHUP"
    );
    assert_eq!(
        backends(&env),
        ["198.18.0.11", "198.18.0.12", "198.18.0.13"]
    );
}

/// The XDP mode the kernel reports for lb1's eth0 (`ip -d link`): "xdpgeneric" is
/// skb mode, "xdp" driver mode.
fn kernel_xdp_mode(env: &Env) -> &'static str {
    let out = env
        .lab
        .host("lb1")
        .ns
        .exec("ip", &["-d", "link", "show", "dev", "eth0"])
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    if text.contains(" xdpgeneric") {
        "skb"
    } else if text.contains(" xdp ") || text.contains(" xdp/") {
        "driver"
    } else {
        "none"
    }
}

#[test]
fn a_restart_with_another_xdp_mode_attaches_in_it_and_status_reports_the_kernels_mode() {
    let mut env = Env::new("xdpmode", &["b1"]);
    let status = |env: &Env| -> serde_json::Value {
        serde_json::from_str(&env.lbctl_ok(&["-o", "json", "status"])).unwrap()
    };
    assert_eq!(kernel_xdp_mode(&env), "skb");
    assert_eq!(status(&env)["interfaces"][0]["xdp_mode"], "skb");
    for (asked, attach) in [("driver", "new"), ("skb", "new"), ("skb", "replaced")] {
        // A plain stop keeps the data plane attached (a hitless restart).
        let lbd = env.lbd.as_mut().unwrap();
        lbd.signal(Signal::SIGTERM).unwrap();
        lbd.wait_timeout(Duration::from_secs(10)).unwrap();
        let text = std::fs::read_to_string(&env.config).unwrap();
        let text = text
            .replace("xdp_mode = \"skb\"", &format!("xdp_mode = \"{asked}\""))
            .replace("xdp_mode = \"driver\"", &format!("xdp_mode = \"{asked}\""));
        std::fs::write(&env.config, text).unwrap();
        env.start_lbd();
        let s = status(&env);
        assert_eq!(
            kernel_xdp_mode(&env),
            asked,
            "restarted with xdp_mode = {asked}: {s}"
        );
        assert_eq!(s["interfaces"][0]["xdp_mode"], asked, "{s}");
        assert_eq!(s["interfaces"][0]["attach"], attach, "{s}");
        // lb1's eth0 is a veth: in driver mode its transmits need a program on the
        // peer, and the status says so.
        let warning = s["interfaces"][0]["warning"].as_str().unwrap_or("");
        assert_eq!(
            warning.contains("veth in driver mode"),
            asked == "driver",
            "{s}"
        );
        if asked == "driver" {
            // The bridge-side peer has no XDP program: what the program sends back
            // out is dropped, and now counted where an operator looks.
            let answered = env
                .client(|| Ok(traffic::http_get(None, vip(), Duration::from_millis(300)).is_ok()));
            assert!(!answered, "answered through a veth whose peer runs no XDP");
            // The driver's counters are read once a second.
            let deadline = Instant::now() + Duration::from_secs(3);
            loop {
                let s = status(&env);
                let dropped = s["interfaces"][0]["xdp_tx_errors"].as_u64().unwrap_or(0);
                if dropped > 0 {
                    break;
                }
                assert!(Instant::now() < deadline, "no transmit errors counted: {s}");
                std::thread::sleep(Duration::from_millis(100));
            }
            let m = env
                .lab
                .host("lb1")
                .ns
                .exec("curl", &["-s", "http://127.0.0.1:9469/metrics"])
                .unwrap();
            let m = String::from_utf8_lossy(&m.stdout);
            assert!(
                m.lines().any(|l| l
                    .starts_with("lb_interface_xdp_tx_errors_total{interface=\"eth0\"}")
                    && !l.ends_with(" 0")),
                "{m}"
            );
        }
    }
    // Still balancing after the re-attachments.
    let tcp = env.spread(20);
    assert_eq!(tcp.values().sum::<usize>(), 20, "{tcp:?}");
}

#[test]
fn with_json_output_errors_are_json_documents_with_the_exit_code() {
    let env = Env::new("jsonerr", &["b1"]);
    let json_of = |out: &std::process::Output| -> serde_json::Value {
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            panic!(
                "not JSON ({e}): {} / {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )
        })
    };
    // Refused by lbd: exit 1.
    let out = env.lbctl(&[
        "-o",
        "json",
        "backend",
        "remove",
        "tcp/198.18.0.100:81",
        "198.18.0.11",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let v = json_of(&out);
    assert_eq!(v["exit"], 1, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("198.18.0.100:81"),
        "{v}"
    );
    // No lbd on the socket: exit 3.
    let out = std::process::Command::new(binary("lbctl"))
        .args(["--socket", "/nonexistent/lbd.sock", "-o", "json", "status"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(json_of(&out)["exit"], 3);
    // A bad input file: exit 2.
    let out = env.lbctl(&["-o", "json", "apply", "-f", "/nonexistent.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(json_of(&out)["exit"], 2);
    // Humans still get a line on stderr, nothing on stdout.
    let out = env.lbctl(&["backend", "remove", "tcp/198.18.0.100:81", "198.18.0.11"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("lbctl: "));
}

/// lb1's config file as written by `Env`, with these backends and another connection
/// table size (a [dataplane] change, which waits for a restart).
fn reconfigured(env: &Env, backends: &[&str]) -> String {
    let node_line = std::fs::read_to_string(&env.config)
        .unwrap()
        .lines()
        .find(|l| l.starts_with("name = "))
        .unwrap()
        .to_string();
    common::config_text("unused", &env.dir, &env.pin_dir, backends)
        .lines()
        .map(|l| {
            if l.starts_with("name = ") {
                node_line.clone()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
        .replace("conn_table_size = 16384", "conn_table_size = 32768")
}

#[test]
fn lbctl_reload_applies_the_file_and_answers_what_changed_and_a_bad_file_changes_nothing() {
    let env = Env::new("reload", &["b1", "b2"]);
    let text = reconfigured(&env, &["b1", "b2", "b3"]);
    std::fs::write(&env.config, &text).unwrap();
    let r: serde_json::Value =
        serde_json::from_str(&env.lbctl_ok(&["-o", "json", "reload"])).unwrap();
    let changes = r["changes"].to_string();
    assert!(changes.contains("198.18.0.13"), "{r}");
    assert_eq!(
        r["restart_needed"],
        serde_json::json!(["[dataplane]"]),
        "{r}"
    );
    let human = env.lbctl_ok(&["reload"]);
    assert!(human.contains("no changes to the services"), "{human}");
    assert!(human.contains("[dataplane] changed"), "{human}");
    let list = env.lbctl_ok(&["-o", "json", "backend", "list", SVC]);
    assert!(list.contains("198.18.0.13"), "{list}");
    // A broken file: refused with where and why; nothing changes.
    std::fs::write(
        &env.config,
        reconfigured(&env, &["b1"]).replace("protocol = \"udp\"", "protocol = \"sctp\""),
    )
    .unwrap();
    let out = env.lbctl(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lbd.toml:") && err.contains("sctp"), "{err}");
    assert_eq!(env.lbctl_ok(&["-o", "json", "backend", "list", SVC]), list);
}

/// The newest lbd log of `env` (each start writes its own).
fn newest_log(env: &Env) -> String {
    let mut logs: Vec<_> = std::fs::read_dir(&env.dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("lbd-") && n.ends_with(".log")
        })
        .map(|e| (e.metadata().unwrap().modified().unwrap(), e.path()))
        .collect();
    logs.sort();
    std::fs::read_to_string(&logs.last().expect("a log").1).unwrap()
}

#[test]
fn the_log_warns_of_unresolved_backends_and_refusals_and_a_standalone_start_is_quiet() {
    let mut env = Env::new("logs", &["b1"]);
    env.lbctl_ok(&["shutdown", "--detach"]);
    env.lbd
        .as_mut()
        .unwrap()
        .wait_timeout(Duration::from_secs(10))
        .unwrap();
    // A backend no host answers ARP for.
    let text = std::fs::read_to_string(&env.config).unwrap().replacen(
        "[[service.backend]]",
        "[[service.backend]]\naddress = \"198.18.0.77\"\n\n[[service.backend]]",
        1,
    );
    std::fs::write(&env.config, text).unwrap();
    env.start_lbd();
    let refused = env.lbctl(&[
        "backend",
        "add",
        SVC,
        "198.18.0.14",
        "--mac",
        "ff:ff:ff:ff:ff:ff",
    ]);
    assert!(!refused.status.success());
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = newest_log(&env);
        if log.contains("request refused") || Instant::now() > deadline {
            break log;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("no MAC for this backend")
            && l.contains("198.18.0.77")),
        "{log}"
    );
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("request refused")
            && l.contains("ff:ff:ff:ff:ff:ff")),
        "{log}"
    );
    for noise in ["directory master", "SPM manager"] {
        assert!(
            !log.contains(noise),
            "a standalone start logs {noise:?}: {log}"
        );
    }
}

/// Headless Chromium on lb1's status page (the metrics port, inside lb1's
/// namespace), run for `ms` of the page's (virtual) time: its DOM, or a screenshot
/// into `png`.
fn chromium(env: &Env, profile: &Path, ms: u64, png: Option<&Path>) -> std::process::Output {
    let mut cmd = env.lab.host("lb1").ns.command("chromium");
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .arg(format!("--virtual-time-budget={ms}"))
    .arg("--window-size=1280,900");
    match png {
        Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
        None => cmd.arg("--dump-dom"),
    };
    cmd.arg("http://127.0.0.1:9469/")
        .stderr(std::process::Stdio::null())
        .output()
        .expect("chromium (installed by scripts/install-toolchain.sh)")
}

#[test]
fn the_status_page_draws_services_backends_and_their_state_in_headless_chromium() {
    let env = Env::new("page", &["b1", "b2"]);
    env.lbctl_ok(&["backend", "drain", SVC, "198.18.0.12"]);
    let profile = env.dir.join("chromium");
    let out = chromium(&env, &profile, 3500, None);
    let dom = String::from_utf8_lossy(&out.stdout).into_owned();
    // The page ran, polled more than once (no reload), and drew what lbd has.
    let refreshes: u32 = dom
        .split("refreshed ")
        .nth(1)
        .and_then(|r| r.split(' ').next()?.parse().ok())
        .unwrap_or_else(|| panic!("the page did not run: {dom}"));
    assert!(refreshes >= 2, "refreshed {refreshes} times: {dom}");
    let row = |addr: &str| -> String {
        dom.split(&format!("data-backend=\"{addr}\""))
            .nth(1)
            .and_then(|r| r.split("</tr>").next())
            .unwrap_or_else(|| panic!("no row for {addr}: {dom}"))
            .to_string()
    };
    assert!(
        row("198.18.0.12").contains("draining"),
        "{}",
        row("198.18.0.12")
    );
    assert!(
        row("198.18.0.11").contains("active"),
        "{}",
        row("198.18.0.11")
    );
    assert!(dom.contains(&format!("data-service=\"{SVC}\"")), "{dom}");
    assert!(dom.contains("standalone node"), "{dom}");
    // A screenshot for the test output.
    let png = Path::new(env!("CARGO_TARGET_TMPDIR")).join("status-page.png");
    let _ = std::fs::remove_file(&png);
    let shot = chromium(&env, &profile, 2500, Some(&png));
    assert!(shot.status.success() && png.is_file(), "no screenshot");
    eprintln!("screenshot of the status page: {}", png.display());
}

#[test]
fn the_status_page_shows_a_drain_within_two_seconds_in_an_open_browser() {
    let env = Env::new("pagelive", &["b1", "b2"]);
    let page = lb_tests::browser::Browser::open(
        &env.lab.host("lb1").ns,
        "http://127.0.0.1:9469/",
        &env.dir.join("chromium-live"),
    )
    .unwrap();
    let row = "[data-backend=\"198.18.0.12\"]";
    page.wait_for(Duration::from_secs(10), |p| p.text(row).contains("active"))
        .unwrap_or_else(|| panic!("the page never drew b2: {:?}", page.text("body")));
    // The drain, with the page open: it must show without a reload, within 2 s.
    env.lbctl_ok(&["backend", "drain", SVC, "198.18.0.12"]);
    let took = page
        .wait_for(Duration::from_secs(5), |p| p.text(row).contains("draining"))
        .unwrap_or_else(|| panic!("no drain on the page after 5 s: {:?}", page.text("body")));
    eprintln!("the open page showed the drain after {took:?}");
    assert!(
        took <= Duration::from_secs(2),
        "the drain showed after {took:?}"
    );
    assert!(
        page.text("#changes")
            .contains("198.18.0.12 active → draining"),
        "{:?}",
        page.text("#changes")
    );
    // New connections show as new flows per second.
    env.spread(30);
    let new_flows = |p: &lb_tests::browser::Browser| -> u64 {
        let text = p.text("#newflows");
        text.split(' ')
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    page.wait_for(Duration::from_secs(3), |p| new_flows(p) > 0)
        .unwrap_or_else(|| panic!("no new flows/s shown: {:?}", page.text("#summary")));
}
