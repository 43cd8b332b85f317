//! lbctl: the balancer's command line, a client of lbd's management API.
//!
//! Exit codes: 0 done; 1 lbd refused the request (the message says why); 2 bad usage
//! or input file; 3 lbd is not running; 4 unexpected answer from lbd.

use std::{io::Write, net::IpAddr, path::PathBuf, process::ExitCode, time::Duration};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use lb_userspace::{
    api::{self, Applied},
    api::client::{Client, ClientError},
    config::parse_services,
    desired::BackendSpec,
    model::{parse_mac, ServiceConfig, ServiceKey},
};
use serde::Serialize;

#[derive(Parser)]
#[command(version, about = "Control the load balancer daemon (lbd)")]
struct Cli {
    /// lbd's API socket. Default: $LBCTL_SOCKET, else the only socket in /run/lb.
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Human)]
    output: Output,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Cmd {
    /// The daemon: node, interfaces, counts, where the metrics are.
    Status,
    /// Services (VIP, port, protocol).
    #[command(subcommand)]
    Service(ServiceCmd),
    /// Backends of a service.
    #[command(subcommand)]
    Backend(BackendCmd),
    /// Packet and byte counters, drops by reason.
    Stats {
        /// Print again every --interval seconds until interrupted.
        #[arg(long)]
        watch: bool,
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
    /// Make lbd's services exactly those of a file (an lbd config or just [[service]]
    /// sections); prints the changes.
    Apply {
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Show the changes without making them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Stop lbd. The data plane keeps forwarding unless --detach.
    Shutdown {
        /// Also detach the XDP program and remove the pinned maps.
        #[arg(long)]
        detach: bool,
    },
    /// The cluster: nodes, leader, who serves which VIP, rejected messages.
    Cluster,
    /// This node in its cluster.
    #[command(subcommand)]
    Node(NodeCmd),
    /// Cluster events (acquire, release, leader change...); --follow streams them.
    Events {
        #[arg(long, short)]
        follow: bool,
    },
    /// The Service Point Map: where clients should go, with epochs and backups.
    #[command(subcommand)]
    Spm(SpmCmd),
    /// The directory: tables of service instances, host routes, partitions.
    #[command(subcommand)]
    Dir(DirCmd),
    /// Print a shell completion script.
    Completions { shell: clap_complete::Shell },
}

/// Services are written as tcp/198.18.0.100:80, udp/[2001:db8::1]:53, tcp/198.18.0.100:* (any port).
#[derive(Subcommand)]
enum ServiceCmd {
    Add {
        service: ServiceKey,
        #[arg(long)]
        maglev_size: Option<u32>,
        /// Pass fragments and packets with IP options to the node's stack instead of dropping them.
        #[arg(long)]
        pass_irregular: bool,
    },
    Remove {
        service: ServiceKey,
    },
    /// Start a new epoch for the service: clients holding the old one are told so.
    BumpEpoch {
        service: ServiceKey,
    },
    List,
    Show {
        service: ServiceKey,
    },
    /// Refuse the service on every LB node at once (SYN → RST, UDP → ICMP error).
    Maintenance {
        service: ServiceKey,
        /// planned, unplanned, testing or unknown.
        #[arg(long, default_value = "planned")]
        reason: lb_userspace::availability::Reason,
        /// Expected duration (e.g. 30m); shown to clients as the expected return.
        #[arg(long = "for", value_parser = parse_duration)]
        duration: Option<Duration>,
        /// Who is doing it (default: $USER).
        #[arg(long)]
        operator: Option<String>,
    },
    /// Serve the service again on every LB node.
    Available {
        service: ServiceKey,
        #[arg(long)]
        operator: Option<String>,
    },
}

#[derive(Subcommand)]
enum SpmCmd {
    Show {
        #[arg(long)]
        service: Option<ServiceKey>,
        /// Apply the rules for this client address.
        #[arg(long)]
        client: Option<IpAddr>,
        /// Data-dependent routing key.
        #[arg(long)]
        key: Option<u64>,
        /// Map type: 1 full, 2 one service, 3 one sphere, 4 one service in one sphere.
        #[arg(long = "type")]
        map_type: Option<u8>,
        #[arg(long)]
        provider: Option<String>,
        /// The epoch you hold for --service: a stale one gets the mismatch reply.
        #[arg(long)]
        epoch: Option<u64>,
        /// 2: the service's sub-level map (its instances behind a re-director).
        #[arg(long)]
        level: Option<u8>,
    },
    /// Prints the map now and again each time it changes (one JSON line per version
    /// with --output json), until interrupted.
    Watch {
        #[arg(long)]
        service: Option<ServiceKey>,
        #[arg(long)]
        client: Option<IpAddr>,
    },
}

#[derive(Subcommand)]
enum DirCmd {
    /// Rows whose key starts with PREFIX (all without one).
    Search {
        table: String,
        prefix: Option<String>,
    },
    /// Valid instances with the current route to their host.
    Find {
        table: String,
        prefix: Option<String>,
    },
    Add {
        table: String,
        key: String,
        value: String,
        #[arg(long)]
        invalid: bool,
    },
    Delete {
        table: String,
        key: String,
    },
    /// Valid now, and invalid unless renewed within --time-max.
    Heartbeat {
        table: String,
        key: String,
        #[arg(long, value_parser = parse_duration)]
        time_max: Duration,
    },
    /// Stream Add / Delete / Resync events of a table (and key prefix).
    Subscribe {
        table: String,
        prefix: Option<String>,
    },
}

fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "operator".into())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit())
        .map_or((s, "s"), |i| s.split_at(i));
    let n: u64 = num
        .parse()
        .map_err(|_| format!("`{s}` is not a duration like 500ms or 2s"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(60 * n)),
        "h" => Ok(Duration::from_secs(3600 * n)),
        _ => Err(format!("`{s}`: use ms, s, m or h")),
    }
}

#[derive(Subcommand)]
enum NodeCmd {
    /// Acquire no VIP from now on; keep the ones served.
    Quiesce,
    Unquiesce,
}

#[derive(Subcommand)]
enum BackendCmd {
    Add {
        service: ServiceKey,
        address: IpAddr,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Fixed MAC; by default it is resolved through the neighbour table.
        #[arg(long, value_parser = parse_mac_arg)]
        mac: Option<[u8; 6]>,
    },
    Remove {
        service: ServiceKey,
        address: IpAddr,
    },
    /// Take no new flows; established ones continue until they end.
    Drain {
        service: ServiceKey,
        address: IpAddr,
        /// Put the backend back into rotation.
        #[arg(long)]
        undo: bool,
    },
    /// Change a backend's weight.
    Weight {
        service: ServiceKey,
        address: IpAddr,
        weight: u32,
    },
    List {
        service: ServiceKey,
    },
    /// Register a backend in the directory with a lease, and keep renewing it until
    /// interrupted: stop this and the backend leaves within the lease.
    Register {
        #[arg(long)]
        service: ServiceKey,
        /// The backend's address and port.
        #[arg(long)]
        addr: std::net::SocketAddr,
        #[arg(long, value_parser = parse_duration, default_value = "2s")]
        ttl: Duration,
        #[arg(long, default_value_t = 1)]
        weight: u32,
    },
    /// Reports a backend's load and capacity for the water marks, every --interval
    /// until interrupted (or once). Without --load: this host's CPU busy time, per
    /// mille of --capacity.
    Report {
        #[arg(long)]
        service: ServiceKey,
        /// The backend's address.
        #[arg(long)]
        addr: IpAddr,
        #[arg(long)]
        load: Option<u64>,
        #[arg(long, default_value_t = 1000)]
        capacity: u64,
        #[arg(long, value_parser = parse_duration, default_value = "1s")]
        interval: Duration,
        #[arg(long)]
        once: bool,
    },
}

/// CPU busy time since the last call, per mille (from /proc/stat).
fn cpu_busy_permille(last: &mut Option<(u64, u64)>) -> u64 {
    let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = text
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    let total: u64 = fields.iter().sum();
    // idle + iowait
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    match last.replace((total, idle)) {
        Some((t0, i0)) if total > t0 => {
            let dt = total - t0;
            (dt - (idle - i0).min(dt)) * 1000 / dt
        }
        _ => 0,
    }
}

async fn report_loop(client: &Client, out: Output, cmd: BackendCmd) -> Result<(), Failure> {
    let BackendCmd::Report {
        service,
        addr,
        load,
        capacity,
        interval,
        once,
    } = cmd
    else {
        unreachable!("only reports")
    };
    let mut cpu = None;
    cpu_busy_permille(&mut cpu);
    loop {
        let load = match load {
            Some(l) => l,
            None => {
                tokio::time::sleep(interval.min(Duration::from_secs(1))).await;
                cpu_busy_permille(&mut cpu) * capacity / 1000
            }
        };
        let report = api::LoadReport {
            service,
            backend: addr,
            load,
            capacity,
            ttl_ms: (interval.as_millis() as u64 * 3).max(1000),
        };
        let r: serde_json::Value = client.post("/v1/backends/report", &report).await?;
        if out == Output::Json {
            println!("{}", serde_json::to_string(&r).expect("serializes"));
        } else {
            println!("{addr} in {service}: load {load} of {capacity}");
        }
        let _ = std::io::stdout().flush();
        if once {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
}

fn parse_mac_arg(s: &str) -> Result<[u8; 6], String> {
    parse_mac(s).ok_or_else(|| format!("`{s}` is not a MAC address like 02:00:00:00:00:01"))
}

enum Failure {
    Client(ClientError),
    Input(String),
}

impl From<ClientError> for Failure {
    fn from(e: ClientError) -> Self {
        Failure::Client(e)
    }
}

fn default_socket() -> Result<PathBuf, Failure> {
    if let Ok(s) = std::env::var("LBCTL_SOCKET") {
        return Ok(s.into());
    }
    let found: Vec<PathBuf> = std::fs::read_dir("/run/lb")
        .map(|d| {
            d.flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|x| x == "sock"))
                .collect()
        })
        .unwrap_or_default();
    match found.as_slice() {
        [] => Err(Failure::Client(ClientError::NotRunning {
            path: "/run/lb/*.sock".into(),
        })),
        [one] => Ok(one.clone()),
        many => Err(Failure::Input(format!(
            "several lbd sockets in /run/lb ({}); pick one with --socket",
            many.iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ))),
    }
}

fn print_json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("API types serialize")
    );
}

fn print_applied(out: Output, applied: &Applied) {
    if out == Output::Json {
        return print_json(applied);
    }
    if applied.changes.is_empty() {
        println!("no changes");
    }
    for c in &applied.changes {
        println!("{c}");
    }
    if applied.dry_run && !applied.changes.is_empty() {
        println!("(dry run: nothing was changed)");
    }
}

fn print_table(rows: Vec<Vec<String>>) {
    table(rows)
}

fn table(rows: Vec<Vec<String>>) {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn print_services(services: &[api::ServiceView]) {
    let mut rows = vec![vec![
        "SERVICE".into(),
        "BACKENDS".into(),
        "MAGLEV".into(),
        "PACKETS".into(),
        "BYTES".into(),
    ]];
    for s in services {
        rows.push(vec![
            s.service.clone(),
            s.backends.len().to_string(),
            s.config.maglev_size.to_string(),
            s.packets.to_string(),
            s.bytes.to_string(),
        ]);
    }
    table(rows);
}

fn print_backends(s: &api::ServiceView) {
    let mut rows = vec![vec![
        "BACKEND".into(),
        "WEIGHT".into(),
        "STATE".into(),
        "MAC".into(),
        "PACKETS".into(),
        "BYTES".into(),
        "WATER MARKS".into(),
    ]];
    for b in &s.backends {
        let state = match (b.drain, &b.mac) {
            (_, None) => "unresolved",
            _ if !b.healthy => "unhealthy",
            (true, _) => "draining",
            (false, _) => "active",
        };
        rows.push(vec![
            b.address.to_string(),
            b.weight.to_string(),
            state.into(),
            b.mac.clone().unwrap_or_else(|| "-".into()),
            b.packets.to_string(),
            b.bytes.to_string(),
            b.steering.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    table(rows);
}

async fn find_service(client: &Client, key: ServiceKey) -> Result<api::ServiceView, Failure> {
    let all: Vec<api::ServiceView> = client.get("/v1/services").await?;
    all.into_iter().find(|s| s.key == key).ok_or_else(|| {
        Failure::Client(ClientError::Daemon(format!(
            "no service {key}; `lbctl service list` shows them"
        )))
    })
}

/// Percent-encodes a query value.
fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A URL query from the parameters that are given, values encoded.
fn query(params: &[(&str, Option<String>)]) -> String {
    params
        .iter()
        .filter_map(|(k, v)| Some(format!("{k}={}", enc(v.as_ref()?))))
        .collect::<Vec<_>>()
        .join("&")
}

async fn dir(client: &Client, out: Output, cmd: DirCmd) -> Result<(), Failure> {
    match cmd {
        DirCmd::Search { table, prefix } => {
            let path = format!(
                "/v1/dir/search?table={}&prefix={}",
                enc(&table),
                enc(&prefix.unwrap_or_default())
            );
            let rows: Vec<serde_json::Value> = client.get(&path).await?;
            if out == Output::Json {
                print_json(&rows);
            } else {
                let mut t = vec![vec!["KEY".into(), "VALUE".into(), "VALID".into()]];
                for r in &rows {
                    t.push(vec![
                        r["key"].as_str().unwrap_or_default().into(),
                        r["value"].as_str().unwrap_or_default().into(),
                        if r["valid"] == true { "1" } else { "0" }.into(),
                    ]);
                }
                print_table(t);
            }
        }
        DirCmd::Find { table, prefix } => {
            let path = format!(
                "/v1/dir/find?table={}&prefix={}",
                enc(&table),
                enc(&prefix.unwrap_or_default())
            );
            let rows: Vec<serde_json::Value> = client.get(&path).await?;
            if out == Output::Json {
                print_json(&rows);
            } else {
                for r in &rows {
                    println!(
                        "{} {}:{}",
                        r["instance"].as_str().unwrap_or_default(),
                        r["address"].as_str().unwrap_or_default(),
                        r["server"]["port"]
                    );
                }
            }
        }
        DirCmd::Add {
            table,
            key,
            value,
            invalid,
        } => {
            let body = serde_json::json!({ "table": table, "key": key, "value": value, "valid": !invalid });
            let r: serde_json::Value = client.post("/v1/dir/add", &body).await?;
            if out == Output::Json {
                print_json(&r)
            } else {
                println!("submitted to the directory")
            }
        }
        DirCmd::Delete { table, key } => {
            let r: serde_json::Value = client
                .post(
                    "/v1/dir/delete",
                    &serde_json::json!({ "table": table, "key": key }),
                )
                .await?;
            if out == Output::Json {
                print_json(&r)
            } else {
                println!("deleted")
            }
        }
        DirCmd::Heartbeat {
            table,
            key,
            time_max,
        } => {
            let body = serde_json::json!({ "table": table, "key": key, "time_max_ms": time_max.as_millis() as u64 });
            let r: serde_json::Value = client.post("/v1/dir/heartbeat", &body).await?;
            if out == Output::Json {
                print_json(&r)
            } else {
                println!("valid for {time_max:?}")
            }
        }
        DirCmd::Subscribe { table, prefix } => {
            let path = format!(
                "/v1/dir/subscribe?table={}&prefix={}",
                enc(&table),
                enc(&prefix.unwrap_or_default())
            );
            client
                .get_lines(&path, |line| {
                    println!("{line}");
                    let _ = std::io::stdout().flush();
                })
                .await?;
        }
    }
    Ok(())
}

/// Registers and renews until interrupted (or until lbd refuses).
async fn register_loop(
    client: &Client,
    out: Output,
    service: ServiceKey,
    addr: std::net::SocketAddr,
    ttl: Duration,
    weight: u32,
) -> Result<(), Failure> {
    let body = serde_json::json!({
        "service": service,
        "address": addr.ip(),
        "port": addr.port(),
        "weight": weight,
        "ttl_ms": ttl.as_millis() as u64,
    });
    let mut first = true;
    loop {
        let r: serde_json::Value = client.post("/v1/dir/register", &body).await?;
        if first {
            if out == Output::Json {
                print_json(&r);
            } else {
                println!(
                    "registered {} in {service} for {ttl:?}; renewing every {:?} until interrupted",
                    r["registered"].as_str().unwrap_or_default(),
                    ttl / 3
                );
            }
            let _ = std::io::stdout().flush();
            first = false;
        }
        tokio::time::sleep(ttl / 3).await;
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let out = cli.output;
    if let Cmd::Completions { shell } = cli.command {
        clap_complete::generate(shell, &mut Cli::command(), "lbctl", &mut std::io::stdout());
        return Ok(());
    }
    // Read input files before talking to the daemon: a bad file is the caller's error.
    let apply = match &cli.command {
        Cmd::Apply { file, dry_run } => {
            let text = std::fs::read_to_string(file)
                .map_err(|e| Failure::Input(format!("{}: {e}", file.display())))?;
            let desired = parse_services(file, &text).map_err(|e| Failure::Input(e.to_string()))?;
            Some(api::Apply {
                desired,
                dry_run: *dry_run,
            })
        }
        _ => None,
    };
    let socket = match cli.socket {
        Some(s) => s,
        None => default_socket()?,
    };
    let client = Client::new(socket);
    if let Cmd::Backend(BackendCmd::Register {
        service,
        addr,
        ttl,
        weight,
    }) = cli.command
    {
        return register_loop(&client, out, service, addr, ttl, weight).await;
    }
    if let Cmd::Backend(cmd @ BackendCmd::Report { .. }) = cli.command {
        return report_loop(&client, out, cmd).await;
    }
    match cli.command {
        Cmd::Completions { .. } => unreachable!("handled above"),
        Cmd::Status => {
            let s: api::Status = client.get("/v1/status").await?;
            if out == Output::Json {
                print_json(&s);
            } else {
                println!("node        {} (lbd {}, API {})", s.node, s.version, s.api);
                println!(
                    "uptime      {} s{}",
                    s.uptime_seconds,
                    if s.resumed {
                        ", resumed a running data plane"
                    } else {
                        ""
                    }
                );
                for i in &s.interfaces {
                    println!("interface   {} (XDP {}, {})", i.name, i.xdp_mode, i.attach);
                }
                println!("services    {}", s.services);
                println!(
                    "backends    {} ({} unresolved)",
                    s.backends, s.unresolved_backends
                );
                println!("connections {}", s.conn_table_entries);
                println!("metrics     {}", s.metrics);
            }
        }
        Cmd::Service(cmd) => match cmd {
            ServiceCmd::Add {
                service,
                maglev_size,
                pass_irregular,
            } => {
                let mut config = ServiceConfig {
                    pass_irregular,
                    ..ServiceConfig::default()
                };
                if let Some(m) = maglev_size {
                    config.maglev_size = m;
                }
                let r = client
                    .post(
                        "/v1/services/add",
                        &api::AddService {
                            service,
                            config: Some(config),
                        },
                    )
                    .await?;
                print_applied(out, &r);
            }
            ServiceCmd::Maintenance {
                service,
                reason,
                duration,
                operator,
            } => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let r: lb_userspace::availability::Record = client
                    .post(
                        "/v1/services/availability",
                        &api::SetAvailability {
                            service,
                            available: false,
                            reason: Some(reason),
                            operator: Some(operator.unwrap_or_else(whoami)),
                            expected_up_ms: duration.map(|d| now + d.as_millis() as u64),
                        },
                    )
                    .await?;
                if out == Output::Json {
                    print_json(&r);
                } else {
                    println!("{service}: unavailable ({:?}) on every node", r.reason);
                }
            }
            ServiceCmd::Available { service, operator } => {
                let r: lb_userspace::availability::Record = client
                    .post(
                        "/v1/services/availability",
                        &api::SetAvailability {
                            service,
                            available: true,
                            reason: None,
                            operator: Some(operator.unwrap_or_else(whoami)),
                            expected_up_ms: None,
                        },
                    )
                    .await?;
                if out == Output::Json {
                    print_json(&r);
                } else {
                    println!("{service}: available on every node");
                }
            }
            ServiceCmd::BumpEpoch { service } => {
                let r: api::EpochBumped = client
                    .post("/v1/services/bump-epoch", &api::ServiceRef { service })
                    .await?;
                if out == Output::Json {
                    print_json(&r);
                } else {
                    println!("service {}: epoch {}", r.service, r.epoch);
                }
            }
            ServiceCmd::Remove { service } => {
                let r = client
                    .post("/v1/services/remove", &api::ServiceRef { service })
                    .await?;
                print_applied(out, &r);
            }
            ServiceCmd::List => {
                let all: Vec<api::ServiceView> = client.get("/v1/services").await?;
                if out == Output::Json {
                    print_json(&all);
                } else {
                    print_services(&all);
                }
            }
            ServiceCmd::Show { service } => {
                let s = find_service(&client, service).await?;
                if out == Output::Json {
                    print_json(&s);
                } else {
                    println!(
                        "{}  maglev {}  pass_irregular {}  packets {}  bytes {}",
                        s.service,
                        s.config.maglev_size,
                        s.config.pass_irregular,
                        s.packets,
                        s.bytes
                    );
                    println!(
                        "  spm: rule {:?}, epoch {} ({:?}; old connections {}){}",
                        s.spm.rule,
                        s.config.epoch,
                        s.spm.epoch_policy,
                        if s.config.epoch_resteer {
                            "re-steered"
                        } else {
                            "kept"
                        },
                        if s.spm.redirect { ", re-director" } else { "" }
                    );
                    if let Some(u) = &s.unavailable {
                        let back = u
                            .expected_up_ms
                            .map(|t| format!(", expected back at {} (Unix ms)", t))
                            .unwrap_or_default();
                        println!("  UNAVAILABLE: {:?}, by {}{back}", u.reason, u.operator);
                    }
                    for (net, prefix, sphere) in &s.spm.topology {
                        println!("  clients in {net}/{prefix} -> sphere {sphere}");
                    }
                    print_backends(&s);
                }
            }
        },
        Cmd::Backend(cmd) => match cmd {
            BackendCmd::Add {
                service,
                address,
                weight,
                mac,
            } => {
                let spec = BackendSpec {
                    mac,
                    weight,
                    drain: false,
                };
                let r = client
                    .post(
                        "/v1/backends/add",
                        &api::AddBackend {
                            service,
                            backend: address,
                            spec: Some(spec),
                        },
                    )
                    .await?;
                print_applied(out, &r);
            }
            BackendCmd::Remove { service, address } => {
                let r = client
                    .post(
                        "/v1/backends/remove",
                        &api::BackendRef {
                            service,
                            backend: address,
                        },
                    )
                    .await?;
                print_applied(out, &r);
            }
            BackendCmd::Drain {
                service,
                address,
                undo,
            } => {
                let r = client
                    .post(
                        "/v1/backends/drain",
                        &api::DrainBackend {
                            service,
                            backend: address,
                            drain: !undo,
                        },
                    )
                    .await?;
                print_applied(out, &r);
            }
            BackendCmd::Weight {
                service,
                address,
                weight,
            } => {
                let r = client
                    .post(
                        "/v1/backends/weight",
                        &api::SetWeight {
                            service,
                            backend: address,
                            weight,
                        },
                    )
                    .await?;
                print_applied(out, &r);
            }
            BackendCmd::List { service } => {
                let s = find_service(&client, service).await?;
                if out == Output::Json {
                    print_json(&s.backends);
                } else {
                    print_backends(&s);
                }
            }
            BackendCmd::Register { .. } | BackendCmd::Report { .. } => {
                unreachable!("handled before the match")
            }
        },
        Cmd::Stats { watch, interval } => loop {
            let s: api::Stats = client.get("/v1/stats").await?;
            if out == Output::Json {
                println!("{}", serde_json::to_string(&s).expect("serializes"));
            } else {
                print_services(&s.services);
                println!();
                let nonzero: Vec<String> = s
                    .global
                    .iter()
                    .filter(|(_, v)| *v > 0)
                    .map(|(n, v)| format!("{n} {v}"))
                    .collect();
                println!(
                    "data plane: {}",
                    if nonzero.is_empty() {
                        "no packets yet".into()
                    } else {
                        nonzero.join(", ")
                    }
                );
                println!("connections: {}", s.conn_table_entries);
            }
            let _ = std::io::stdout().flush();
            if !watch {
                break;
            }
            tokio::time::sleep(Duration::from_secs(interval.max(1))).await;
            if out == Output::Human {
                println!();
            }
        },
        Cmd::Apply { .. } => {
            let r = client
                .post("/v1/apply", apply.as_ref().expect("parsed above"))
                .await?;
            print_applied(out, &r);
        }
        Cmd::Cluster => {
            let c: lb_userspace::api::ClusterView = client.get("/v1/cluster").await?;
            if out == Output::Json {
                print_json(&c);
            } else {
                let mut rows = vec![vec![
                    "NODE".into(),
                    "ROLE".into(),
                    "OK".into(),
                    "QUIESCED".into(),
                    "AGE".into(),
                    "PREFERS".into(),
                    "SERVES".into(),
                ]];
                for h in &c.hosts {
                    let role = match (h.leader, h.me) {
                        (true, true) => "leader (me)",
                        (true, false) => "leader",
                        (false, true) => "me",
                        (false, false) => "",
                    };
                    let list = |v: Vec<String>| {
                        if v.is_empty() {
                            "-".to_string()
                        } else {
                            v.join(",")
                        }
                    };
                    rows.push(vec![
                        h.info.id.to_string(),
                        role.into(),
                        if h.info.ok { "yes" } else { "NO" }.into(),
                        if h.info.quiesce { "yes" } else { "no" }.into(),
                        format!("{} ms", h.age_ms),
                        list(h.info.preferred.iter().map(|a| a.to_string()).collect()),
                        list(
                            h.info
                                .serving
                                .iter()
                                .map(|(a, s)| format!("{a} ({})", format!("{s:?}").to_lowercase()))
                                .collect(),
                        ),
                    ]);
                }
                table(rows);
                let rejected: Vec<String> = c
                    .rejected
                    .iter()
                    .filter(|(_, n)| **n > 0)
                    .map(|(r, n)| format!("{r} {n}"))
                    .collect();
                if !rejected.is_empty() {
                    println!("rejected messages: {}", rejected.join(", "));
                }
            }
        }
        Cmd::Node(cmd) => {
            let quiesce = matches!(cmd, NodeCmd::Quiesce);
            let r: serde_json::Value = client
                .post("/v1/node/quiesce", &api::Quiesce { quiesce })
                .await?;
            if out == Output::Json {
                print_json(&r);
            } else {
                println!(
                    "{}",
                    if quiesce {
                        "quiesced: this node acquires no VIP"
                    } else {
                        "unquiesced"
                    }
                );
            }
        }
        Cmd::Events { follow } => {
            let path = if follow {
                "/v1/events?follow=true"
            } else {
                "/v1/events"
            };
            client
                .get_lines(path, |line| {
                    if out == Output::Json {
                        println!("{line}");
                    } else if let Ok(v) = serde_json::from_str::<serde_json::Value>(line) {
                        let mut fields = v.as_object().cloned().unwrap_or_default();
                        let at = fields.remove("at_ms").and_then(|t| t.as_u64()).unwrap_or(0);
                        let node = fields
                            .remove("node")
                            .map(|n| n.to_string())
                            .unwrap_or_default();
                        let event = fields
                            .remove("event")
                            .and_then(|e| e.as_str().map(str::to_string))
                            .unwrap_or_default();
                        let rest: Vec<String> = fields
                            .iter()
                            .map(|(k, v)| format!("{k}={}", v.to_string().trim_matches('"')))
                            .collect();
                        println!("{at} {} {event} {}", node.trim_matches('"'), rest.join(" "));
                    }
                    let _ = std::io::stdout().flush();
                })
                .await?;
        }
        Cmd::Dir(cmd) => dir(&client, out, cmd).await?,
        Cmd::Spm(SpmCmd::Show {
            service,
            client: addr,
            key,
            map_type,
            provider,
            epoch,
            level,
        }) => {
            let q = query(&[
                ("level", level.map(|l| l.to_string())),
                ("service", service.map(|s| s.to_string())),
                ("client", addr.map(|a| a.to_string())),
                ("key", key.map(|k| k.to_string())),
                ("type", map_type.map(|t| t.to_string())),
                ("provider", provider),
                ("epoch", epoch.map(|e| e.to_string())),
            ]);
            let map: serde_json::Value = client.get(&format!("/v1/spm?{q}")).await?;
            if out == Output::Json {
                print_json(&map);
            } else {
                println!("SPM version {} type {}", map["version"], map["map_type"]);
                let mut rows = vec![vec![
                    "SERVICE".into(),
                    "EPOCH".into(),
                    "HOST".into(),
                    "BACKUPS".into(),
                ]];
                for e in map["entries"].as_array().into_iter().flatten() {
                    let svc = e["spec"]["service_id"]
                        .as_str()
                        .or(map["spec"]["service_id"].as_str())
                        .unwrap_or("-");
                    let epoch = e["sphere"]["epoch"]
                        .as_u64()
                        .or(map["sphere"]["epoch"].as_u64())
                        .unwrap_or(0);
                    let backups: Vec<String> = e["backups"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|b| {
                            format!("{}:{}", b["inet_address"].as_str().unwrap_or(""), b["port"])
                        })
                        .collect();
                    rows.push(vec![
                        svc.to_string(),
                        epoch.to_string(),
                        format!(
                            "{}:{}",
                            e["host"]["inet_address"].as_str().unwrap_or(""),
                            e["host"]["port"]
                        ),
                        if backups.is_empty() {
                            "-".into()
                        } else {
                            backups.join(",")
                        },
                    ]);
                }
                table(rows);
            }
        }
        Cmd::Spm(SpmCmd::Watch {
            service,
            client: addr,
        }) => {
            let q = query(&[
                ("service", service.map(|s| s.to_string())),
                ("client", addr.map(|a| a.to_string())),
            ]);
            client
                .get_lines(&format!("/v1/spm/watch?{q}"), |line| {
                    if out == Output::Json {
                        println!("{line}");
                    } else if let Ok(map) = serde_json::from_str::<serde_json::Value>(line) {
                        let entries: Vec<String> = map["entries"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .map(|e| {
                                format!(
                                    "{}@{}={}:{}",
                                    e["spec"]["service_id"].as_str().unwrap_or("-"),
                                    e["sphere"]["epoch"],
                                    e["host"]["inet_address"].as_str().unwrap_or(""),
                                    e["host"]["port"]
                                )
                            })
                            .collect();
                        println!("version {}: {}", map["version"], entries.join(" "));
                    }
                    let _ = std::io::stdout().flush();
                })
                .await?;
        }
        Cmd::Shutdown { detach } => {
            let r: serde_json::Value = client
                .post("/v1/shutdown", &api::Shutdown { detach })
                .await?;
            if out == Output::Json {
                print_json(&r);
            } else {
                println!(
                    "lbd is shutting down{}",
                    if detach {
                        " and detaching the data plane"
                    } else {
                        "; the data plane keeps forwarding"
                    }
                );
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Input(m)) => {
            eprintln!("lbctl: {m}");
            ExitCode::from(2)
        }
        Err(Failure::Client(e)) => {
            eprintln!("lbctl: {e}");
            ExitCode::from(match e {
                ClientError::Daemon(_) => 1,
                ClientError::NotRunning { .. } => 3,
                ClientError::Protocol { .. } => 4,
            })
        }
    }
}
