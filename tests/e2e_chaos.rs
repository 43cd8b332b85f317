//! The cluster under faults (issue 14), short forms: each scenario drives a fault in
//! the three-node lab while a client opens a new TCP connection and sends a new UDP
//! datagram every 10 ms and ten long-lived connections echo every 50 ms, and asserts
//! what the cluster promises: failover within one timeout, no lost request on
//! handback, restart or a planned leave, no broken connection, no VIP left on a node
//! that does not own it, at most one owner per VIP. `cargo xtask chaos` runs the long
//! forms and prints the figures.

use std::time::{Duration, Instant};

use lb_tests::{
    chaos::{arp_answers, holders, one_holder_each, scenarios, Outcome},
    cluster_lab::{mac_of, Cluster},
    lab::standard,
};
use nix::sys::signal::Signal;

fn log_has(c: &Cluster, needle: &str) -> Vec<String> {
    let mut hits = Vec::new();
    for e in std::fs::read_dir(&c.dir).unwrap().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            for l in std::fs::read_to_string(&p).unwrap_or_default().lines() {
                if l.contains(needle) {
                    hits.push(format!("{}: {l}", p.file_name().unwrap().to_string_lossy()));
                }
            }
        }
    }
    hits
}

fn report(what: &str, o: &Outcome) {
    eprintln!(
        "{what}: recovered after {:?}, {} of {} probes failed (longest outage {:?}), {} long-lived connections broken, a VIP on two nodes for up to {:?}",
        o.recovered, o.failed_probes, o.probes, o.longest_outage, o.broken.len(), o.duplicate
    );
    if !o.failures.is_empty() {
        let first: Vec<String> = o
            .failures
            .iter()
            .take(12)
            .map(|(t, k)| format!("{k:?}@{}ms", t.as_millis()))
            .collect();
        eprintln!("  failed probes (after the fault): {}", first.join(" "));
    }
}

#[test]
fn failover_takes_one_timeout_and_handback_loses_nothing() {
    let mut c = Cluster::new("chaos-failover");
    for run in 0..3 {
        let f = scenarios::failover(&mut c);
        report(&format!("failover {run}"), &f);
        let took = f.recovered.expect("no answer after the failover");
        assert!(
            took < Duration::from_millis(420),
            "run {run}: failover took {took:?} (timeout 300 ms)"
        );
        assert!(f.broken.is_empty(), "run {run}: {:?}", f.broken);
        let h = scenarios::handback(&mut c);
        report(&format!("handback {run}"), &h);

        assert_eq!(
            h.failed_probes, 0,
            "run {run}: the handback lost requests ({:?} of outage)",
            h.longest_outage
        );
        assert!(h.broken.is_empty(), "run {run}: {:?}", h.broken);
    }
}

#[test]
fn a_restarting_owner_loses_no_request() {
    let mut c = Cluster::new("chaos-restart");
    for signal in [Signal::SIGTERM, Signal::SIGKILL] {
        let o = scenarios::restart(&mut c, signal);
        report(&format!("restart ({signal:?})"), &o);
        assert_eq!(
            o.failed_probes, 0,
            "{signal:?}: lost requests ({:?} of outage)",
            o.longest_outage
        );
        assert!(o.broken.is_empty(), "{signal:?}: {:?}", o.broken);
    }
}

#[test]
fn a_flapping_link_leaves_each_vip_on_exactly_its_owner() {
    let mut c = Cluster::new("chaos-flap");
    let o = scenarios::flap(&mut c, Duration::from_secs(10));
    report("link flapping every 300 ms for 10 s", &o);
    // The scenario waits for VIP 2 to be lb2's alone; and nothing else is left over.
    let h = one_holder_each(&c, Duration::from_secs(5)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(h[&standard::VIP.into()], "lb1");
    assert_eq!(h[&standard::VIP2.into()], "lb2");
}

#[test]
fn two_releases_at_once_succeed_and_break_no_connection() {
    // One node holding both VIPs alone must keep them: no quorum.
    let mut c = Cluster::with_quorum("chaos-double", 1);
    let o = scenarios::double_release(&mut c);
    report("two VIPs released at once", &o);
    let failed = log_has(&c, "release failed");
    assert!(failed.is_empty(), "{failed:?}");
    assert!(o.broken.is_empty(), "{:?}", o.broken);
    assert_eq!(
        o.failed_probes, 0,
        "lost requests ({:?} of outage)",
        o.longest_outage
    );
}

#[test]
fn a_node_leaving_with_detach_hands_its_vip_over_first() {
    let mut c = Cluster::new("chaos-detach");
    let o = scenarios::detach(&mut c);
    report("owner leaving (shutdown --detach)", &o);
    assert!(o.broken.is_empty(), "{:?}", o.broken);
    assert_eq!(
        o.failed_probes, 0,
        "lost requests ({:?} of outage)",
        o.longest_outage
    );
}

#[test]
fn during_a_partition_each_vip_has_at_most_one_owner() {
    let mut c = Cluster::new("chaos-partition");
    for cut in [Duration::from_secs(2), Duration::from_secs(5)] {
        let o = scenarios::partition(&mut c, cut);
        report(&format!("lb1 cut off for {cut:?}"), &o);
        assert!(
            o.duplicate < Duration::from_millis(700),
            "a VIP was on two nodes for {:?} during a {cut:?} partition",
            o.duplicate
        );
    }
}

#[test]
fn a_dead_daemon_stops_answering_arp_for_its_vips() {
    let mut c = Cluster::new("chaos-dead");
    one_holder_each(&c, Duration::from_secs(10)).unwrap();
    assert_eq!(arp_answers(&c, standard::VIP2), [mac_of("lb2")]);
    c.lbds.get("lb2").unwrap().signal(Signal::SIGKILL).unwrap();
    let killed = Instant::now();
    c.lbds.remove("lb2");
    // lb3 takes VIP 2 within a timeout; lb2's kernel must not answer for it any more.
    let deadline = killed + Duration::from_secs(5);
    loop {
        let answers = arp_answers(&c, standard::VIP2);
        if answers == [mac_of("lb3")] {
            eprintln!(
                "dead daemon: only the new owner answers ARP {:?} after the kill",
                killed.elapsed()
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ARP for VIP 2 is answered by {answers:?} (lb2 {}, lb3 {}); interfaces: {:?}",
            mac_of("lb2"),
            mac_of("lb3"),
            holders(&c)
        );
    }
}

#[test]
fn a_node_that_joined_while_a_backend_answered_late_steers_flows_as_the_others() {
    let mut c = Cluster::new("chaos-slowarp");
    let o = scenarios::join_with_slow_arp(&mut c, Duration::from_secs(3));
    report("failover to a node that joined with b2's ARP 3 s late", &o);
    assert!(o.broken.is_empty(), "{:?}", o.broken);
    // Every node reports the same table digest for each VIP it has.
    let mut digests: std::collections::BTreeMap<String, std::collections::BTreeSet<String>> =
        Default::default();
    for lb in ["lb2", "lb3"] {
        let v = c.view(lb);
        for h in v["hosts"].as_array().unwrap() {
            for (vip, d) in h["info"]["digests"].as_object().unwrap() {
                digests
                    .entry(vip.clone())
                    .or_default()
                    .insert(d.to_string());
            }
        }
    }
    assert!(!digests.is_empty());
    for (vip, ds) in &digests {
        assert_eq!(ds.len(), 1, "{vip}: nodes hold different tables {ds:?}");
    }
}

#[test]
fn a_killed_daemon_on_a_live_link_fails_over_and_back_without_breaking_connections() {
    let mut c = Cluster::new("chaos-killup");
    let f = scenarios::kill(&mut c, false);
    report("kill -9 of lb1's lbd, link up", &f);
    let took = f.recovered.expect("no answer after the failover");
    assert!(
        took < Duration::from_millis(420),
        "failover took {took:?} (timeout 300 ms)"
    );
    assert!(f.broken.is_empty(), "{:?}", f.broken);
    let h = scenarios::handback(&mut c);
    report("handback", &h);
    assert_eq!(
        h.failed_probes, 0,
        "the handback lost requests ({:?} of outage)",
        h.longest_outage
    );
    assert!(h.broken.is_empty(), "{:?}", h.broken);
}

#[test]
fn ipv6_fails_over_and_back_like_ipv4() {
    let mut c = Cluster::with_ipv6("chaos-ipv6");
    let f = scenarios::failover6(&mut c);
    report("IPv6 failover", &f);
    let took = f.recovered.expect("no IPv6 answer after the failover");
    assert!(
        took < Duration::from_millis(420),
        "IPv6 failover took {took:?} (timeout 300 ms)"
    );
    assert!(f.broken.is_empty(), "{:?}", f.broken);
    let h = scenarios::handback6(&mut c);
    report("IPv6 handback", &h);
    assert_eq!(
        h.failed_probes, 0,
        "the IPv6 handback lost requests ({:?} of outage)",
        h.longest_outage
    );
    assert!(h.broken.is_empty(), "{:?}", h.broken);
    // The address survived lb1's link going down, and the node has it back.
    let lb1 = c.view("lb1");
    let me = lb1["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["me"] == true)
        .unwrap()
        .clone();
    assert_eq!(
        me["info"]["serving"][standard::VIP6.to_string()],
        "online",
        "{me}"
    );
}
