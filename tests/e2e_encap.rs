//! Backends beyond the LB's segment: the client, lb1 and a router share the lab
//! bridge; b1 and b2 sit in subnets of their own behind the router (198.18.5.0/24 and
//! 198.18.6.0/24, 2001:db8:5::/64 and 2001:db8:6::/64), with no L2 adjacency to the
//! LB. lbd reaches them in IPIP and GUE; the backends run `lbctl backend setup`
//! (lb_decap, VIPs on lo) and answer the client directly through the router.

mod common;

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    process::Output,
    time::{Duration, Instant},
};

use common::binary;
use lb_tests::{
    lab::{Lab, Proc},
    traffic::{self, Conversation},
};

const PORT: u16 = 8080;
const TIMEOUT: Duration = Duration::from_secs(3);
/// (VIP, forwarding mode) of each service pair (TCP and UDP on PORT).
const VIPS: [(&str, &str); 4] = [
    ("198.18.0.100", "ipip"),
    ("198.18.0.101", "gue"),
    ("2001:db8::100", "ipip"),
    ("2001:db8::101", "gue"),
];
const BACKENDS: [(&str, u8); 2] = [("b1", 5), ("b2", 6)];

/// LB nodes: tag and last octet (198.18.0.x, 2001:db8::x).
const LBS: [(&str, u8); 2] = [("lb1", 2), ("lb2", 3)];

struct Routed {
    lbds: Vec<Proc>,
    servers: Vec<Proc>,
    lab: Lab,
    dir: PathBuf,
    /// lb1's API socket (and lb2's, in a cluster).
    sockets: Vec<PathBuf>,
    pins: Vec<PathBuf>,
    /// The LB nodes lbd runs on.
    lbs: usize,
}

fn backend_addr(subnet: u8, v6: bool) -> String {
    if v6 {
        format!("2001:db8:{subnet:x}::1")
    } else {
        format!("198.18.{subnet}.1")
    }
}

fn decap_pin(node: &str, tag: &str) -> PathBuf {
    PathBuf::from(format!("/sys/fs/bpf/lb-decap-{node}-{tag}"))
}

/// What a `Routed` lab is built with.
#[derive(Default)]
struct Opts {
    /// The LB's `dataplane.encap_mtu`.
    encap_mtu: Option<u16>,
    /// The MTU of the router's link to the bridge (the backends' replies cross it).
    router_mtu: Option<u32>,
    /// A `[service.check]` section for every TCP service.
    check: &'static str,
    /// lb1 and lb2 as a cluster (lb1 prefers every VIP) instead of lb1 alone with the
    /// VIPs on its interface.
    cluster: bool,
}

impl Routed {
    /// The topology, lbd on lb1 and both backends set up.
    fn new(test: &str, encap_mtu: Option<u16>, router_mtu: Option<u32>) -> Routed {
        Self::build(
            test,
            Opts {
                encap_mtu,
                router_mtu,
                ..Opts::default()
            },
        )
    }

    fn build(test: &str, opts: Opts) -> Routed {
        let lbs = if opts.cluster { 2 } else { 1 };
        let mut lab = Lab::new().expect("creating the lab");
        lab.add_host("client", 10).unwrap();
        for (tag, octet) in &LBS[..lbs] {
            lab.add_host(tag, *octet).unwrap();
        }
        lab.add_host("router", 1).unwrap();
        for (tag, subnet) in BACKENDS {
            lab.add_routed_host(tag, "router", subnet).unwrap();
        }
        for (tag, _) in &LBS[..lbs] {
            let lb = lab.host(tag);
            if !opts.cluster {
                for (vip, _) in VIPS {
                    let v6 = vip.contains(':');
                    let (fam, len) = if v6 { ("-6 ", 128) } else { ("", 32) };
                    let nodad = if v6 { " nodad" } else { "" };
                    lb.ns
                        .ip(&format!("{fam}addr add {vip}/{len} dev eth0{nodad}"))
                        .unwrap();
                }
            }
            for (_, subnet) in BACKENDS {
                lb.ns
                    .ip(&format!("route add 198.18.{subnet}.0/24 via 198.18.0.1"))
                    .unwrap();
                lb.ns
                    .ip(&format!(
                        "-6 route add 2001:db8:{subnet:x}::/64 via 2001:db8::1"
                    ))
                    .unwrap();
            }
        }
        if let Some(mtu) = opts.router_mtu {
            lab.host("router")
                .ns
                .ip(&format!("link set eth0 mtu {mtu}"))
                .unwrap();
        }
        let node = format!("t{}-{test}", std::process::id());
        let dir = std::env::temp_dir().join(format!("lb-e2e-{node}"));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let server = binary("lab-server");
        let mut pins: Vec<PathBuf> = LBS[..lbs]
            .iter()
            .map(|(tag, _)| PathBuf::from(format!("/sys/fs/bpf/lb/{node}-{tag}")))
            .collect();
        let mut servers = Vec::new();
        for (tag, _) in BACKENDS {
            let log = dir.join(format!("lab-server-{tag}.log"));
            servers.push(
                lab.spawn(tag, &server, &[tag, &PORT.to_string()], &log)
                    .unwrap(),
            );
            pins.push(decap_pin(&node, tag));
        }
        let mut env = Routed {
            lbds: Vec::new(),
            servers,
            lab,
            sockets: LBS[..lbs]
                .iter()
                .map(|(tag, _)| dir.join(format!("{tag}.sock")))
                .collect(),
            dir,
            pins,
            lbs,
        };
        for (tag, _) in BACKENDS {
            let out = env.backend_lbctl(tag, &node, "setup", &["--xdp-mode", "skb"]);
            assert!(
                out.status.success(),
                "backend setup on {tag}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        for (i, (tag, octet)) in LBS[..lbs].iter().enumerate() {
            let config = env.dir.join(format!("{tag}.toml"));
            let text = config_text(&node, tag, *octet, &env.dir, &env.pins[i], &opts);
            std::fs::write(&config, text).unwrap();
            let log = env.dir.join(format!("lbd-{tag}.log"));
            env.lbds.push(
                env.lab
                    .spawn(
                        tag,
                        &binary("lbd"),
                        &["--config", &config.to_string_lossy()],
                        &log,
                    )
                    .expect("starting lbd"),
            );
            let deadline = Instant::now() + Duration::from_secs(20);
            while !env.lbctl_on(i, &["status"]).status.success() {
                assert!(
                    Instant::now() < deadline,
                    "lbd on {tag} did not answer within 20 s: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        env
    }

    fn lbctl(&self, args: &[&str]) -> Output {
        self.lbctl_on(0, args)
    }

    fn lbctl_on(&self, lb: usize, args: &[&str]) -> Output {
        common::lbctl_at(&self.sockets[lb], args)
    }

    /// `lbctl backend <verb>` on backend `tag`, for every VIP, in gue mode (which
    /// takes IPIP too) from the LB nodes' outer sources.
    fn backend_lbctl(&self, tag: &str, node: &str, verb: &str, extra: &[&str]) -> Output {
        let pin = decap_pin(node, tag);
        let mut args: Vec<String> = vec![
            "backend".into(),
            verb.into(),
            "--interface".into(),
            "eth0".into(),
        ];
        for (vip, _) in VIPS {
            args.extend(["--vip".into(), vip.into()]);
        }
        args.extend(["--mode".into(), "gue".into()]);
        for (_, octet) in &LBS[..self.lbs] {
            args.extend(["--lb-source".into(), format!("198.18.0.{octet}")]);
            args.extend(["--lb-source".into(), format!("2001:db8::{octet:x}")]);
        }
        args.push("--pin-dir".into());
        args.push(pin.to_string_lossy().into_owned());
        args.extend(extra.iter().map(|s| s.to_string()));
        self.lab
            .host(tag)
            .ns
            .command(&binary("lbctl").to_string_lossy())
            .args(&args)
            .output()
            .expect("running lbctl in the backend")
    }

    /// lb1's global data-plane counters, by name.
    fn global(&self) -> BTreeMap<String, u64> {
        self.global_on(0)
    }

    /// LB node `lb`'s global data-plane counters, by name.
    fn global_on(&self, lb: usize) -> BTreeMap<String, u64> {
        let out = self.lbctl_on(lb, &["-o", "json", "stats"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        v["global"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p[0].as_str().unwrap().to_string(), p[1].as_u64().unwrap()))
            .collect()
    }

    fn client<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> T {
        common::on_client(&self.lab, f)
    }
}

impl Drop for Routed {
    fn drop(&mut self) {
        self.lbds.clear();
        self.servers.clear();
        if std::thread::panicking() {
            lb_tests::lab::print_log_tails(&self.dir, 40);
        }
        for p in &self.pins {
            let _ = std::fs::remove_dir_all(p);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config_text(
    node: &str,
    lb: &str,
    octet: u8,
    dir: &std::path::Path,
    pin: &std::path::Path,
    opts: &Opts,
) -> String {
    let mut services = String::new();
    for (vip, mode) in VIPS {
        let v6 = vip.contains(':');
        let backends: String = BACKENDS
            .iter()
            .map(|(_, s)| {
                format!(
                    "\n[[service.backend]]\naddress = \"{}\"\n",
                    backend_addr(*s, v6)
                )
            })
            .collect();
        for proto in ["tcp", "udp"] {
            let check = if proto == "tcp" { opts.check } else { "" };
            services.push_str(&format!(
                "\n[[service]]\nvip = \"{vip}\"\nport = {PORT}\nprotocol = \"{proto}\"\nforward = \"{mode}\"\n{backends}{check}"
            ));
        }
    }
    let mtu = opts
        .encap_mtu
        .map_or(String::new(), |m| format!("encap_mtu = {m}\n"));
    let cluster = if opts.cluster {
        let preferred: Vec<String> = if lb == "lb1" {
            VIPS.iter().map(|(v, _)| format!("\"{v}\"")).collect()
        } else {
            Vec::new()
        };
        format!(
            "\n[cluster]\nid = \"198.18.0.{octet}\"\ngroup = \"239.255.18.9:7400\"\nnodes = 2\nquorum = 1\n\
             key = \"encap-cluster-key-0123456789\"\ninterval_ms = 100\npreferred = [{}]\n",
            preferred.join(", ")
        )
    } else {
        String::new()
    };
    format!(
        r#"[node]
name = "{node}-{lb}"
api_socket = "{dir}/{lb}.sock"
metrics_listen = "127.0.0.1:9469"
state_dir = "{dir}/state-{lb}"
pin_dir = "{pin}"

[dataplane]
interfaces = [{{ name = "eth0", xdp_mode = "skb" }}]
max_services = 16
conn_table_size = 16384
encap_source_v4 = "198.18.0.{octet}"
encap_source_v6 = "2001:db8::{octet:x}"
{mtu}{services}{cluster}"#,
        dir = dir.display(),
        pin = pin.display(),
    )
}

fn addr(vip: &str) -> SocketAddr {
    SocketAddr::new(vip.parse::<IpAddr>().unwrap(), PORT)
}

/// `n` HTTP requests and `n` UDP questions to `vip`; the backends that answered each.
fn ask(
    vip: &'static str,
    n: usize,
) -> anyhow::Result<(BTreeMap<String, usize>, BTreeMap<String, usize>)> {
    let mut tcp = BTreeMap::new();
    let mut udp = BTreeMap::new();
    for i in 0..n {
        let name = traffic::http_get(None, addr(vip), TIMEOUT)
            .map_err(|e| e.context(format!("HTTP request {i} to {vip}")))?;
        *tcp.entry(name).or_default() += 1;
        let name = traffic::udp_ask(None, addr(vip), &format!("q{i}"), TIMEOUT)
            .map_err(|e| e.context(format!("UDP question {i} to {vip}")))?;
        *udp.entry(name).or_default() += 1;
    }
    Ok((tcp, udp))
}

#[test]
fn remote_backends_serve_tcp_and_udp_over_ipv4_and_ipv6_vips_via_ipip_and_gue() {
    let env = Routed::new("encap", None, None);
    for (vip, mode) in VIPS {
        let (tcp, udp) = env.client(move || ask(vip, 16));
        for (what, spread) in [("TCP", &tcp), ("UDP", &udp)] {
            assert_eq!(
                spread.keys().collect::<Vec<_>>(),
                ["b1", "b2"],
                "{what} to {vip} ({mode}): {spread:?}"
            );
        }
    }
    let g = env.global();
    assert!(g["fwd_ipip"] > 0 && g["fwd_gue"] > 0, "{g:?}");
    assert_eq!(g["fwd_l2"], 0, "nothing went by L2: {g:?}");

    // The same through lbctl: the service made again, now in GUE.
    let ok = |args: &[&str]| {
        let out = env.lbctl(args);
        assert!(
            out.status.success(),
            "lbctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let svc = "tcp/198.18.0.100:8080";
    ok(&["service", "remove", svc]);
    ok(&["service", "add", svc, "--forward", "gue"]);
    for (_, subnet) in BACKENDS {
        ok(&["backend", "add", svc, &backend_addr(subnet, false)]);
    }
    let list = ok(&["service", "list"]);
    // SERVICE BACKENDS FORWARD ...: the count comes with the summary lbctl asks for.
    let count = BACKENDS.len().to_string();
    assert!(
        list.lines().any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.first() == Some(&svc) && f.get(1) == Some(&count.as_str()) && f.get(2) == Some(&"gue")
        }),
        "{list}"
    );
    let before = env.global()["fwd_gue"];
    let (tcp, _) = env.client(|| ask("198.18.0.100", 16));
    assert_eq!(tcp.keys().collect::<Vec<_>>(), ["b1", "b2"], "{tcp:?}");
    assert!(
        env.global()["fwd_gue"] >= before + 16 * 3,
        "the TCP service now goes by GUE"
    );
    // An L2 service cannot have a backend of the other family; an encapsulating one can.
    let out = env.lbctl(&["service", "add", "tcp/198.18.0.100:9000"]);
    assert!(out.status.success());
    let out = env.lbctl(&["backend", "add", "tcp/198.18.0.100:9000", "2001:db8:5::1"]);
    assert!(!out.status.success(), "an L2 service took an IPv6 backend");
    let why = String::from_utf8_lossy(&out.stderr);
    assert!(why.contains("only an encapsulating service"), "{why}");
    ok(&["service", "remove", "tcp/198.18.0.100:9000"]);
    ok(&[
        "service",
        "add",
        "tcp/198.18.0.100:9000",
        "--forward",
        "ipip",
    ]);
    ok(&["backend", "add", "tcp/198.18.0.100:9000", "2001:db8:5::1"]);
}

#[test]
fn a_large_transfer_through_smaller_mtus_completes_by_too_big_answers_both_ways() {
    // The tunnel's path carries 1,400 bytes (the LB answers the client's larger
    // packets with "too big"), and so does the router's link to the client (the
    // router's own "too big" about a backend's reply goes to the VIP, i.e. to the
    // LB, which steers it to that backend).
    let env = Routed::new("ptb", Some(1400), Some(1400));
    for (vip, _) in VIPS {
        let line: String = std::iter::repeat_n('x', 20_000).collect();
        let name = env.client(move || {
            let mut c = Conversation::open(None, addr(vip), Duration::from_secs(10))?;
            c.ask(&line)
        });
        assert!(name == "b1" || name == "b2", "{vip}: {name}");
    }
    let g = env.global();
    assert!(
        g["icmp_too_big"] >= 4,
        "the LB answered each VIP's large packets: {g:?}"
    );
    assert!(
        g["icmp_steered"] >= 4,
        "the router's errors reached the backends: {g:?}"
    );
}

#[test]
fn backend_doctor_names_each_broken_setting_and_the_command_that_fixes_it() {
    let env = Routed::new("doctor", None, None);
    let node = format!("t{}-doctor", std::process::id());
    let doctor = |expect_ok: bool| -> String {
        let out = env.backend_lbctl("b1", &node, "doctor", &[]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            out.status.success(),
            expect_ok,
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    assert!(doctor(true).starts_with("ok: this host is set up for gue"));
    let b1 = &env.lab.host("b1").ns;
    let breaks: [(&str, &str, &str, &str); 4] = [
        (
            "addr del 198.18.0.100/32 dev lo",
            "",
            "VIP 198.18.0.100 is not on lo",
            "fix: ip addr add 198.18.0.100/32 dev lo",
        ),
        (
            "",
            "net.ipv4.conf.eth0.arp_ignore=0",
            "net.ipv4.conf.eth0.arp_ignore is 0, needs 1",
            "fix: sysctl -w net.ipv4.conf.eth0.arp_ignore=1",
        ),
        (
            "",
            "net.ipv4.conf.all.rp_filter=1",
            "rp_filter is strict (1) on eth0",
            "fix: sysctl -w net.ipv4.conf.all.rp_filter=2",
        ),
        (
            "link set eth0 xdp off",
            "",
            "no decapsulation on eth0",
            "fix: lbctl backend setup --interface eth0",
        ),
    ];
    for (ip_cmd, sysctl, problem, fix) in breaks {
        if !ip_cmd.is_empty() {
            if ip_cmd.contains("xdp off") {
                // A pinned link holds the program: removing the pin takes it off.
                let _ = std::fs::remove_file(decap_pin(&node, "b1").join("link-lb_decap-eth0"));
            } else {
                b1.ip(ip_cmd).unwrap();
            }
        }
        if let Some((k, v)) = sysctl.split_once('=') {
            b1.sysctl(k, v).unwrap();
        }
        let text = doctor(false);
        assert!(text.contains(problem), "{problem}: {text}");
        assert!(text.contains(fix), "{fix}: {text}");
        // Setup puts it right, and doctor agrees.
        let out = env.backend_lbctl("b1", &node, "setup", &["--xdp-mode", "skb"]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        doctor(true);
    }
    // Set up again (safe to repeat), it still serves.
    let out = env.backend_lbctl("b1", &node, "setup", &["--xdp-mode", "skb"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(text.contains("lb_decap (XDP) attached to eth0"), "{text}");
    let (tcp, _) = env.client(|| ask("198.18.0.100", 16));
    assert!(tcp.contains_key("b1"), "{tcp:?}");
    // Where XDP is not wanted (or not possible): the same on tc ingress.
    std::fs::remove_file(decap_pin(&node, "b1").join("link-lb_decap-eth0")).unwrap();
    let out = env.backend_lbctl("b1", &node, "setup", &["--hook", "tc"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("lb_decap_tc (tc ingress) attached to eth0"),
        "{text}"
    );
    doctor(true);
    let (tcp, udp) = env.client(|| ask("198.18.0.101", 16));
    assert!(
        tcp.contains_key("b1") && udp.contains_key("b1"),
        "GUE through tc: {tcp:?} {udp:?}"
    );
    let (tcp, _) = env.client(|| ask("2001:db8::100", 16));
    assert!(tcp.contains_key("b1"), "IPv6 IPIP through tc: {tcp:?}");
}

/// Whether lbd holds backend `addr` of `service` healthy.
fn healthy(env: &Routed, service: &str, addr: &str) -> bool {
    let out = env.lbctl(&["-o", "json", "backend", "list", service]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let b = list
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["address"] == addr)
        .unwrap_or_else(|| panic!("no {addr} in {list}"));
    b["healthy"] == true
}

/// Waits up to 10 s for `done`; fails saying `what`.
fn within(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "{what} within 10 s");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn health_checks_go_through_the_tunnel_so_a_broken_decapsulation_fails_them() {
    let check: &'static str = "\n[service.check]\nkind = \"http\"\npath = \"/\"\ninterval_ms = 200\ntimeout_ms = 300\nrise = 2\nfall = 2\n";
    let env = Routed::build(
        "health",
        Opts {
            check,
            ..Opts::default()
        },
    );
    let node = format!("t{}-health", std::process::id());
    let services = [
        ("tcp/198.18.0.100:8080", "198.18.5.1"),
        ("tcp/198.18.0.101:8080", "198.18.5.1"),
        ("tcp/[2001:db8::100]:8080", "2001:db8:5::1"),
        ("tcp/[2001:db8::101]:8080", "2001:db8:5::1"),
    ];
    // A backend starts healthy; wait until every probe has had answers for a while
    // (the lab's fresh links finish IPv6 duplicate address detection first, which
    // holds the router's first neighbour solicitations for about two seconds).
    let all_up = || {
        services
            .iter()
            .all(|(svc, b1)| healthy(&env, svc, b1) && healthy(&env, svc, &b1.replace('5', "6")))
    };
    let mut steady = 0;
    let deadline = Instant::now() + Duration::from_secs(15);
    while steady < 25 {
        assert!(
            Instant::now() < deadline,
            "the backends never stayed healthy for 2.5 s"
        );
        steady = if all_up() { steady + 1 } else { 0 };
        std::thread::sleep(Duration::from_millis(100));
    }
    // b1's decapsulation goes (its link's pin removed): its server still answers
    // anyone who reaches it directly, but the LB's packets, and its probes, are
    // wrapped and now dropped.
    std::fs::remove_file(decap_pin(&node, "b1").join("link-lb_decap-eth0")).unwrap();
    for (svc, b1) in services {
        within(&format!("{b1} of {svc} judged down"), || {
            !healthy(&env, svc, b1)
        });
        assert!(
            healthy(&env, svc, &b1.replace('5', "6")),
            "b2 of {svc} stays up"
        );
    }
    let tcp = env.client(|| traffic::http_spread(&[], addr("198.18.0.100"), 12, TIMEOUT));
    assert_eq!(tcp.keys().collect::<Vec<_>>(), ["b2"], "{tcp:?}");
    // Set up again, it comes back.
    let out = env.backend_lbctl("b1", &node, "setup", &["--xdp-mode", "skb"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    for (svc, b1) in services {
        within(&format!("{b1} of {svc} healthy again"), || {
            healthy(&env, svc, b1)
        });
    }
}

#[test]
fn a_cluster_failover_keeps_established_encapsulated_connections() {
    let env = Routed::build(
        "failover",
        Opts {
            cluster: true,
            ..Opts::default()
        },
    );
    // lb1 takes every VIP (it prefers them); wait for traffic to flow through it.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ok = env.client(|| {
            Ok(VIPS.iter().all(|(vip, _)| {
                traffic::http_get(None, addr(vip), Duration::from_millis(500)).is_ok()
            }))
        });
        if ok {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the cluster never served every VIP"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // One long-lived connection per VIP (IPIP and GUE, IPv4 and IPv6), through lb1.
    let (convs, homes) = env.client(|| {
        let mut convs = Vec::new();
        let mut homes = Vec::new();
        for (vip, _) in VIPS {
            let mut c = Conversation::open(None, addr(vip), TIMEOUT)?;
            homes.push(c.ask("before")?);
            convs.push(c);
        }
        Ok((convs, homes))
    });
    let (g1, g2) = (env.global_on(0), env.global_on(1));
    assert!(
        g1["fwd_ipip"] > 0 && g1["fwd_gue"] > 0,
        "lb1 carried them first: {g1:?}"
    );
    assert_eq!(
        (g2["fwd_ipip"], g2["fwd_gue"]),
        (0, 0),
        "lb2 carried nothing yet: {g2:?}"
    );
    // lb1 dies: its daemon killed, its link down. lb2 takes the VIPs, and steers the
    // connections it has never seen by the same table to the same backends, wrapped
    // from its own source (which the backends take too).
    env.lbds[0]
        .signal(nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    env.lab.host("lb1").ns.ip("link set eth0 down").unwrap();
    let after = env.client(move || {
        let mut names = Vec::new();
        for mut c in convs {
            names.push(c.ask_within("after", Duration::from_secs(10))?);
        }
        Ok(names)
    });
    assert_eq!(
        after, homes,
        "every connection kept its backend across the failover"
    );
    let g = env.global_on(1);
    assert!(
        g["fwd_ipip"] > 0 && g["fwd_gue"] > 0,
        "lb2 carried them: {g:?}"
    );
}
