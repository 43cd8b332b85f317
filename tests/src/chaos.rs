//! Instruments for the cluster under faults: a prober (a new TCP connection and a new
//! UDP datagram to a VIP every 10 ms), long-lived connections echoing every 50 ms, and
//! a sampler of who holds each VIP (the address on an LB node's interface, which is
//! what makes its kernel answer ARP). The scenarios in `tests/e2e_chaos.rs` and the
//! chaos bench drive faults and read these.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::JoinHandle,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    cluster_lab::Cluster,
    lab::standard,
    traffic::{self, Conversation},
};

/// How long one probe waits for its answer.
const PROBE_TIMEOUT: Duration = Duration::from_millis(200);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Tcp,
    Udp,
}

/// One probe: when it was sent, of which kind, whether it was answered.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub at: Instant,
    pub kind: Kind,
    pub ok: bool,
}

pub struct Probe {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Vec<Sample>>>,
}

impl Probe {
    /// Starts probing `vip` from the client namespace, for at most `limit`. Every
    /// 10 ms a new TCP connection and a new UDP datagram leave, each on its own
    /// thread, so that one unanswered probe does not hold back the next.
    pub fn start(c: &Cluster, vip: impl Into<IpAddr>, limit: Duration) -> Probe {
        let vip: IpAddr = vip.into();
        let to = SocketAddr::new(vip, standard::SERVICE_PORT);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = c.lab.host("client").ns.spawn(move || {
            let sources: Vec<Ipv4Addr> = standard::client_sources().collect();
            let started = Instant::now();
            let (tx, rx) = std::sync::mpsc::channel::<Sample>();
            let mut probes = Vec::new();
            let mut i = 0usize;
            while !flag.load(Ordering::Relaxed) && started.elapsed() < limit {
                // Several IPv4 sources spread the flows; IPv6 has the client's one.
                let src = vip.is_ipv4().then(|| sources[i % sources.len()]);
                // Threads started from this one stay in the client's namespace.
                for kind in [Kind::Tcp, Kind::Udp] {
                    let tx = tx.clone();
                    probes.push(std::thread::spawn(move || {
                        let at = Instant::now();
                        let ok = match kind {
                            Kind::Tcp => traffic::http_get(src, to, PROBE_TIMEOUT).is_ok(),
                            Kind::Udp => {
                                traffic::udp_ask(src, to, &format!("probe {i}"), PROBE_TIMEOUT)
                                    .is_ok()
                            }
                        };
                        let _ = tx.send(Sample { at, kind, ok });
                    }));
                }
                i += 1;
                probes.retain(|p| !p.is_finished());
                std::thread::sleep(Duration::from_millis(10));
            }
            for p in probes {
                let _ = p.join();
            }
            drop(tx);
            let mut log: Vec<Sample> = rx.into_iter().collect();
            log.sort_by_key(|s| s.at);
            Ok(log)
        });
        Probe { stop, thread }
    }

    pub fn stop(self) -> ProbeLog {
        self.stop.store(true, Ordering::Relaxed);
        let samples = self
            .thread
            .join()
            .expect("probe thread panicked")
            .expect("probe");
        ProbeLog { samples }
    }
}

#[derive(Clone, Debug)]
pub struct ProbeLog {
    pub samples: Vec<Sample>,
}

impl ProbeLog {
    pub fn failed(&self) -> usize {
        self.samples.iter().filter(|s| !s.ok).count()
    }

    pub fn failed_after(&self, t: Instant) -> usize {
        self.samples.iter().filter(|s| s.at >= t && !s.ok).count()
    }

    /// The first answered TCP probe sent after `t`, as time since `t`.
    pub fn first_ok_after(&self, t: Instant) -> Option<Duration> {
        self.samples
            .iter()
            .find(|s| s.at >= t && s.ok && s.kind == Kind::Tcp)
            .map(|s| s.at - t)
    }

    /// The longest run of failed probes: from the first failure to the next success.
    pub fn longest_outage(&self) -> Duration {
        let mut worst = Duration::ZERO;
        let mut since: Option<Instant> = None;
        for s in &self.samples {
            match (s.ok, since) {
                (false, None) => since = Some(s.at),
                (true, Some(t)) => {
                    worst = worst.max(s.at - t);
                    since = None;
                }
                _ => {}
            }
        }
        if let (Some(t), Some(last)) = (since, self.samples.last()) {
            worst = worst.max(last.at - t);
        }
        worst
    }

    pub fn total(&self) -> usize {
        self.samples.len()
    }
}

/// Ten long-lived connections to a VIP, each asking every 50 ms; a connection is
/// broken when it fails or its answers come from another backend.
pub struct LongLived {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Result<Vec<String>>>,
}

impl LongLived {
    pub fn start(c: &Cluster, vip: impl Into<IpAddr>, limit: Duration) -> LongLived {
        let vip: IpAddr = vip.into();
        let to = SocketAddr::new(vip, standard::SERVICE_PORT);
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = c.lab.host("client").ns.spawn(move || {
            let sources: Vec<Ipv4Addr> = standard::client_sources().collect();
            let mut convs = Vec::new();
            for i in 0..10 {
                let mut conv = Conversation::open(
                    vip.is_ipv4().then(|| sources[i]),
                    to,
                    Duration::from_secs(2),
                )?;
                let home = conv.ask("hello")?;
                convs.push(Some((conv, home)));
            }
            let started = Instant::now();
            let mut broken = Vec::new();
            let mut n = 0u64;
            while !flag.load(Ordering::Relaxed) && started.elapsed() < limit {
                for (i, slot) in convs.iter_mut().enumerate() {
                    let Some((conv, home)) = slot else { continue };
                    // A slow answer is not a break: TCP resends a lost segment.
                    match conv.ask_within(&format!("tick {n}"), Duration::from_secs(3)) {
                        Ok(name) if name == *home => {}
                        Ok(name) => {
                            broken.push(format!("connection {i} moved from {home} to {name}"));
                            *slot = None;
                        }
                        Err(e) => {
                            broken.push(format!("connection {i} ({home}) broke: {e:#}"));
                            *slot = None;
                        }
                    }
                }
                n += 1;
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok(broken)
        });
        LongLived { stop, thread }
    }

    /// The connections that broke, each said how.
    pub fn stop(self) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .expect("long-lived thread panicked")
            .expect("opening the long-lived connections")
    }
}

/// The VIPs an LB node's kernel claims now: those on its interface, if its link is up
/// (an address on a link that is down answers nobody).
fn claimed(ns: &crate::netns::Netns) -> Vec<IpAddr> {
    let up = ns
        .ip("-o link show dev eth0")
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("LOWER_UP"))
        .unwrap_or(false);
    if !up {
        return Vec::new();
    }
    let Ok(o) = ns.ip("-o addr show dev eth0") else {
        return Vec::new();
    };
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    [
        standard::VIP.into(),
        standard::VIP2.into(),
        IpAddr::from(standard::VIP6),
    ]
    .into_iter()
    .filter(|vip| {
        let family = if vip.is_ipv4() { "inet" } else { "inet6" };
        text.contains(&format!("{family} {vip}/"))
    })
    .collect()
}

/// The VIPs of `c`: both IPv4 ones, and the IPv6 one if it has IPv6 services.
pub fn vips(c: &Cluster) -> Vec<IpAddr> {
    let mut v: Vec<IpAddr> = vec![standard::VIP.into(), standard::VIP2.into()];
    if c.ipv6 {
        v.push(standard::VIP6.into());
    }
    v
}

/// Which LB nodes' kernels claim each of `c`'s VIPs now.
pub fn holders_all(c: &Cluster) -> BTreeMap<IpAddr, Vec<String>> {
    let mut out: BTreeMap<IpAddr, Vec<String>> =
        vips(c).into_iter().map(|v| (v, Vec::new())).collect();
    for (lb, _) in standard::LBS {
        for vip in claimed(&c.lab.host(lb).ns) {
            if let Some(on) = out.get_mut(&vip) {
                on.push(lb.to_string());
            }
        }
    }
    out
}

/// Which LB nodes' kernels claim each IPv4 VIP now.
pub fn holders(c: &Cluster) -> BTreeMap<Ipv4Addr, Vec<String>> {
    holders_all(c)
        .into_iter()
        .filter_map(|(v, on)| match v {
            IpAddr::V4(v) => Some((v, on)),
            IpAddr::V6(_) => None,
        })
        .collect()
}

/// Samples `holders` every 50 ms until stopped.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<Vec<(Instant, BTreeMap<IpAddr, Vec<String>>)>>,
    vips: Vec<IpAddr>,
}

impl Sampler {
    pub fn start(c: &Cluster) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        // Handles that leave the namespaces alone when dropped (the lab owns them).
        let lab_ns: Vec<(String, crate::netns::Netns)> = standard::LBS
            .iter()
            .map(|(lb, _)| {
                let name = c.lab.host(lb).ns.name().to_string();
                (
                    lb.to_string(),
                    crate::netns::Netns::open(&name, true).expect("the lab's namespace"),
                )
            })
            .collect();
        let all = vips(c);
        let watched = all.clone();
        let thread = std::thread::spawn(move || {
            let mut timeline = Vec::new();
            let started = Instant::now();
            while !flag.load(Ordering::Relaxed) && started.elapsed() < Duration::from_secs(120) {
                let mut now: BTreeMap<IpAddr, Vec<String>> =
                    watched.iter().map(|v| (*v, Vec::new())).collect();
                for (lb, ns) in &lab_ns {
                    for vip in claimed(ns) {
                        if let Some(on) = now.get_mut(&vip) {
                            on.push(lb.clone());
                        }
                    }
                }
                timeline.push((Instant::now(), now));
                std::thread::sleep(Duration::from_millis(50));
            }
            timeline
        });
        Sampler {
            stop,
            thread,
            vips: all,
        }
    }

    /// The longest time any VIP was on two or more nodes' interfaces at once.
    pub fn stop(self) -> Duration {
        self.stop.store(true, Ordering::Relaxed);
        let timeline = self.thread.join().expect("sampler panicked");
        let mut worst = Duration::ZERO;
        for vip in &self.vips {
            let mut since = None;
            for (t, h) in &timeline {
                match (h[vip].len() > 1, since) {
                    (true, None) => since = Some(*t),
                    (false, Some(s)) => {
                        worst = worst.max(*t - s);
                        since = None;
                    }
                    _ => {}
                }
            }
            if let (Some(s), Some((t, _))) = (since, timeline.last()) {
                worst = worst.max(*t - s);
            }
        }
        worst
    }
}

/// Waits until every VIP is on exactly one node's interface and that node reports
/// serving it, every running node having finished its start-up sync 600 ms before
/// (time for the leader to hand a preferred node its VIP back); returns who holds
/// what, or says what is wrong after `within`.
pub fn one_holder_each(c: &Cluster, within: Duration) -> Result<BTreeMap<IpAddr, String>, String> {
    holders_settled(c, within, crate::cluster_lab::AFTER_READY)
}

/// As [`one_holder_each`], with the given wait after every node is ready.
pub fn holders_settled(
    c: &Cluster,
    within: Duration,
    after_ready: Duration,
) -> Result<BTreeMap<IpAddr, String>, String> {
    let deadline = Instant::now() + within;
    let mut ready = crate::cluster_lab::ReadyClock::default();
    loop {
        let settled = ready.ready_for(c) >= after_ready;
        // A node whose lbd is down may keep its addresses (its program forwards, its
        // ARP answers are guarded): only running nodes count.
        let mut h = holders_all(c);
        for on in h.values_mut() {
            on.retain(|lb| c.lbds.keys().any(|l| l == lb));
        }
        let owners = c.owners();
        let ok = h.iter().all(|(vip, on)| {
            on.len() == 1 && owners.get(&vip.to_string()).is_some_and(|o| o == on)
        });
        if ok && settled {
            return Ok(h.into_iter().map(|(v, mut on)| (v, on.remove(0))).collect());
        }
        if Instant::now() > deadline {
            return Err(format!(
                "on the interfaces {h:?}, by the nodes' own account {owners:?}"
            ));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// ARP replies for `vip` seen by the client (one request, a second to answer): the
/// MACs that answered. Two means two nodes' kernels claim the VIP.
pub fn arp_answers(c: &Cluster, vip: Ipv4Addr) -> Vec<String> {
    let out = c
        .lab
        .host("client")
        .ns
        .command("arping")
        .args(["-c", "2", "-w", "1", "-I", "eth0", &vip.to_string()])
        .output();
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).to_string())
        .unwrap_or_default();
    let mut macs: Vec<String> = text
        .lines()
        .filter(|l| l.contains("reply from"))
        .filter_map(|l| {
            let open = l.find('[')?;
            let close = l.find(']')?;
            Some(l[open + 1..close].to_lowercase())
        })
        .collect();
    macs.sort();
    macs.dedup();
    macs
}

/// What one fault did to the clients.
#[derive(Clone, Debug, Default)]
pub struct Outcome {
    /// From the fault to the first answered new connection.
    pub recovered: Option<Duration>,
    pub failed_probes: usize,
    pub probes: usize,
    pub longest_outage: Duration,
    pub broken: Vec<String>,
    /// The longest time a VIP was on two nodes' interfaces at once.
    pub duplicate: Duration,
    /// The failed probes: sent this long after the fault, of this kind.
    pub failures: Vec<(Duration, Kind)>,
}

pub mod scenarios {
    use super::*;
    use nix::sys::signal::Signal;

    fn measure(
        c: &mut Cluster,
        vip: impl Into<IpAddr>,
        fault: impl FnOnce(&mut Cluster) -> Instant,
        settle: impl FnOnce(&mut Cluster),
    ) -> Outcome {
        let vip: IpAddr = vip.into();
        one_holder_each(c, Duration::from_secs(10)).expect("a settled cluster first");
        let probe = Probe::start(c, vip, Duration::from_secs(60));
        let long = LongLived::start(c, vip, Duration::from_secs(60));
        let sampler = Sampler::start(c);
        std::thread::sleep(Duration::from_millis(300));
        let at = fault(c);
        settle(c);
        std::thread::sleep(Duration::from_millis(500));
        let duplicate = sampler.stop();
        let broken = long.stop();
        let log = probe.stop();
        Outcome {
            recovered: log.first_ok_after(at),
            failed_probes: log.failed_after(at),
            failures: log
                .samples
                .iter()
                .filter(|s| s.at >= at && !s.ok)
                .map(|s| (s.at - at, s.kind))
                .collect(),
            probes: log.total(),
            longest_outage: log.longest_outage(),
            broken,
            duplicate,
        }
    }

    fn wait_owner(c: &Cluster, vip: impl Into<IpAddr>, lb: &str, within: Duration) {
        let vip: IpAddr = vip.into();
        let deadline = Instant::now() + within;
        loop {
            if let Ok(h) = holders_settled(c, Duration::from_millis(100), Duration::ZERO) {
                if h[&vip] == lb {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "{vip} never came to {lb}: {:?}",
                holders_all(c)
            );
        }
    }

    /// The owner of VIP 1 (lb1, also the leader) dies: kill -9 and its link down.
    pub fn failover(c: &mut Cluster) -> Outcome {
        kill(c, true)
    }

    /// lb1's daemon dies (kill -9); with `link_down` its link goes down too, else
    /// the node stays on the wire with its pinned program and VIP address.
    pub fn kill(c: &mut Cluster, link_down: bool) -> Outcome {
        // A node that released VIP 1 lately still forwards it for its grace period,
        // and the lab's bridge floods frames for a port that went down: wait it out,
        // or the flood would reach the old owner and hide the outage.
        std::thread::sleep(Duration::from_millis(3200));
        measure(
            c,
            standard::VIP,
            |c| {
                c.lbds
                    .get("lb1")
                    .expect("lb1 runs")
                    .signal(Signal::SIGKILL)
                    .unwrap();
                if link_down {
                    c.lab.host("lb1").ns.ip("link set eth0 down").unwrap();
                }
                let at = Instant::now();
                c.lbds.remove("lb1");
                at
            },
            |c| {
                let deadline = Instant::now() + Duration::from_secs(10);
                while holders(c)[&standard::VIP].iter().all(|h| h == "lb1") {
                    assert!(Instant::now() < deadline, "nobody took over VIP 1");
                    std::thread::sleep(Duration::from_millis(50));
                }
            },
        )
    }

    /// The owner of the IPv6 VIP (lb1) dies: kill -9 and its link down; probes and
    /// long-lived connections over IPv6.
    pub fn failover6(c: &mut Cluster) -> Outcome {
        measure(
            c,
            standard::VIP6,
            |c| {
                c.lbds
                    .get("lb1")
                    .expect("lb1 runs")
                    .signal(Signal::SIGKILL)
                    .unwrap();
                c.lab.host("lb1").ns.ip("link set eth0 down").unwrap();
                let at = Instant::now();
                c.lbds.remove("lb1");
                at
            },
            |c| {
                let deadline = Instant::now() + Duration::from_secs(10);
                let v6 = IpAddr::from(standard::VIP6);
                while holders_all(c)[&v6].iter().all(|h| h == "lb1") {
                    assert!(Instant::now() < deadline, "nobody took over the IPv6 VIP");
                    std::thread::sleep(Duration::from_millis(50));
                }
            },
        )
    }

    /// lb1 comes back and takes the IPv6 VIP back.
    pub fn handback6(c: &mut Cluster) -> Outcome {
        measure(
            c,
            standard::VIP6,
            |c| {
                c.lab.host("lb1").ns.ip("link set eth0 up").unwrap();
                let at = Instant::now();
                c.start("lb1");
                at
            },
            |c| wait_owner(c, standard::VIP6, "lb1", Duration::from_secs(15)),
        )
    }

    /// lb1 comes back (link up, lbd started): it is VIP 1's preferred node, so the VIP
    /// goes back to it.
    pub fn handback(c: &mut Cluster) -> Outcome {
        measure(
            c,
            standard::VIP,
            |c| {
                c.lab.host("lb1").ns.ip("link set eth0 up").unwrap();
                let at = Instant::now();
                c.start("lb1");
                at
            },
            |c| wait_owner(c, standard::VIP, "lb1", Duration::from_secs(15)),
        )
    }

    /// The owner's lbd restarts at once (SIGTERM, or kill -9), its link up.
    pub fn restart(c: &mut Cluster, signal: Signal) -> Outcome {
        measure(
            c,
            standard::VIP2,
            |c| {
                let mut p = c.lbds.remove("lb2").expect("lb2 runs");
                p.signal(signal).unwrap();
                let _ = p.wait_timeout(Duration::from_secs(5));
                let at = Instant::now();
                c.start("lb2");
                at
            },
            |c| wait_owner(c, standard::VIP2, "lb2", Duration::from_secs(15)),
        )
    }

    /// The owner of VIP 2 (lb2) loses its link every 300 ms for `flapping`.
    pub fn flap(c: &mut Cluster, flapping: Duration) -> Outcome {
        measure(
            c,
            standard::VIP2,
            |c| {
                let at = Instant::now();
                let mut up = true;
                while at.elapsed() < flapping {
                    up = !up;
                    let state = if up { "up" } else { "down" };
                    c.lab
                        .host("lb2")
                        .ns
                        .ip(&format!("link set eth0 {state}"))
                        .unwrap();
                    std::thread::sleep(Duration::from_millis(300));
                }
                c.lab.host("lb2").ns.ip("link set eth0 up").unwrap();
                at
            },
            |c| wait_owner(c, standard::VIP2, "lb2", Duration::from_secs(15)),
        )
    }

    /// lb1 and lb2 die, lb3 takes both VIPs; then both come back together, and lb3
    /// releases two VIPs at once.
    pub fn double_release(c: &mut Cluster) -> Outcome {
        for lb in ["lb1", "lb2"] {
            c.lbds.get(lb).unwrap().signal(Signal::SIGKILL).unwrap();
            c.lab.host(lb).ns.ip("link set eth0 down").unwrap();
            c.lbds.remove(lb);
        }
        wait_owner(c, standard::VIP, "lb3", Duration::from_secs(10));
        wait_owner(c, standard::VIP2, "lb3", Duration::from_secs(10));
        measure(
            c,
            standard::VIP2,
            |c| {
                for lb in ["lb1", "lb2"] {
                    c.lab.host(lb).ns.ip("link set eth0 up").unwrap();
                }
                let at = Instant::now();
                c.start_all(&["lb1", "lb2"]);
                at
            },
            |c| {
                wait_owner(c, standard::VIP, "lb1", Duration::from_secs(15));
                wait_owner(c, standard::VIP2, "lb2", Duration::from_secs(15));
            },
        )
    }

    /// The owner of VIP 2 leaves for good: `lbctl shutdown --detach`.
    pub fn detach(c: &mut Cluster) -> Outcome {
        measure(
            c,
            standard::VIP2,
            |c| {
                let at = Instant::now();
                let out = c.lbctl("lb2", &["shutdown", "--detach"]);
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                let mut p = c.lbds.remove("lb2").expect("lb2 ran");
                let _ = p.wait_timeout(Duration::from_secs(10));
                at
            },
            |c| {
                let deadline = Instant::now() + Duration::from_secs(10);
                while holders(c)[&standard::VIP2] != ["lb3"] {
                    assert!(
                        Instant::now() < deadline,
                        "VIP 2 did not move to lb3: {:?}",
                        holders(c)
                    );
                    std::thread::sleep(Duration::from_millis(50));
                }
            },
        )
    }

    /// lb3 (the spare) joins anew while b2's ARP answers to it are held back for
    /// `delay`; then the owner of VIP 1 dies and lb3 takes it over. Its table must be
    /// the one the others built.
    pub fn join_with_slow_arp(c: &mut Cluster, delay: Duration) -> Outcome {
        let mut p = c.lbds.remove("lb3").expect("lb3 runs");
        p.signal(Signal::SIGTERM).unwrap();
        let _ = p.wait_timeout(Duration::from_secs(5));
        c.wipe("lb3");
        let ns = &c.lab.host("lb3").ns;
        let b2 = standard::backend_ip(standard::BACKENDS[1].1);
        let rules = format!(
            "table arp lbslow {{ chain in {{ type filter hook input priority 0; arp saddr ip {b2} drop; }}; }}"
        );
        let out = ns.command("nft").arg(&rules).output().expect("nft");
        assert!(
            out.status.success(),
            "nft: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        ns.ip(&format!("neigh flush to {b2}")).unwrap();
        let joined = Instant::now();
        c.start("lb3");
        std::thread::sleep(delay.saturating_sub(joined.elapsed()));
        let _ = c
            .lab
            .host("lb3")
            .ns
            .command("nft")
            .args(["delete", "table", "arp", "lbslow"])
            .output();
        one_holder_each(c, Duration::from_secs(10)).expect("settled after the join");
        failover(c)
    }

    /// lb1 cannot reach the others (and they cannot reach it) for `cut`.
    pub fn partition(c: &mut Cluster, cut: Duration) -> Outcome {
        measure(
            c,
            standard::VIP2,
            |c| {
                let at = Instant::now();
                c.isolate("lb1", true);
                std::thread::sleep(cut);
                c.isolate("lb1", false);
                at
            },
            |c| {
                wait_owner(c, standard::VIP, "lb1", Duration::from_secs(15));
                wait_owner(c, standard::VIP2, "lb2", Duration::from_secs(15));
            },
        )
    }
}
