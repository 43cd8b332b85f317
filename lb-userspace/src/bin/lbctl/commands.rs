//! What each command asks lbd and prints: one function per command group, every
//! request and answer a type of `lb_userspace::api`.

use std::{io::Write, net::IpAddr, time::Duration};

use lb_userspace::{
    api::{self, client::Client, Applied},
    availability::Record,
    config::parse_services,
    desired::BackendSpec,
    directory::tables::{CompleteRoute, Entry},
    model::{ServiceConfig, ServiceKey},
    spm::Spm,
};

use crate::{
    cli::{whoami, BackendCmd, Cmd, DirCmd, NodeCmd, Output, ServiceCmd, SpmCmd},
    render, Failure,
};

/// Prints an answer: itself as JSON, or through `human`.
fn show<T: serde::Serialize>(out: Output, v: &T, human: impl FnOnce(&T)) {
    match out {
        Output::Json => render::json(v),
        Output::Human => human(v),
    }
}

/// A directory write that was taken but not acknowledged in time.
fn pending_unless(committed: bool) -> Result<(), Failure> {
    if committed {
        return Ok(());
    }
    Err(Failure::Pending(
        "pending: the directory's master has the change but its backup has not stored it \
         yet (a master or backup is being replaced?); this node resends it until it is \
         stored. Check with `lbctl dir search`, or send it again"
            .into(),
    ))
}

fn flush() {
    let _ = std::io::stdout().flush();
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

/// A URL query of a typed query struct, values encoded.
fn query<T: serde::Serialize>(q: &T) -> String {
    let v = serde_json::to_value(q).expect("queries serialize");
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| {
            let text = match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            format!("{k}={}", enc(&text))
        })
        .collect::<Vec<_>>()
        .join("&")
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads an apply file before anything is asked of lbd: a bad file is the caller's
/// error (exit 2).
pub fn read_apply(cmd: &Cmd) -> Result<Option<api::Apply>, Failure> {
    let Cmd::Apply { file, dry_run } = cmd else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(file)
        .map_err(|e| Failure::Input(format!("{}: {e}", file.display())))?;
    let desired = parse_services(file, &text).map_err(|e| Failure::Input(e.to_string()))?;
    Ok(Some(api::Apply {
        desired,
        dry_run: *dry_run,
    }))
}

pub async fn run(
    client: &Client,
    out: Output,
    cmd: Cmd,
    apply: Option<api::Apply>,
) -> Result<(), Failure> {
    match cmd {
        Cmd::Completions { .. } | Cmd::Man => unreachable!("handled without lbd"),
        Cmd::Status => {
            let s: api::Status = client.get("/v1/status").await?;
            show(out, &s, render::status);
        }
        Cmd::Service(cmd) => service(client, out, cmd).await?,
        Cmd::Backend(cmd) => backend(client, out, cmd).await?,
        Cmd::Stats { watch, interval } => stats(client, out, watch, interval).await?,
        Cmd::Apply { .. } => {
            let r: Applied = client
                .post("/v1/apply", apply.as_ref().expect("read before"))
                .await?;
            show(out, &r, render::applied);
        }
        Cmd::Reload => {
            let r: api::Reloaded = client.post("/v1/reload", &serde_json::json!({})).await?;
            show(out, &r, render::reloaded);
        }
        Cmd::Cluster => {
            let c: api::ClusterView = client.get("/v1/cluster").await?;
            show(out, &c, render::cluster);
        }
        Cmd::Node(cmd) => {
            let quiesce = matches!(cmd, NodeCmd::Quiesce);
            let r: api::Quiesce = client
                .post("/v1/node/quiesce", &api::Quiesce { quiesce })
                .await?;
            show(out, &r, |r| {
                println!(
                    "{}",
                    if r.quiesce {
                        "quiesced: this node acquires no VIP"
                    } else {
                        "unquiesced"
                    }
                )
            });
        }
        Cmd::Events { follow } => {
            let path = format!("/v1/events?{}", query(&api::EventsQuery { follow }));
            client
                .get_lines(&path, |line| {
                    match (out, serde_json::from_str::<api::EventRecord>(line)) {
                        (Output::Human, Ok(e)) => render::event(&e),
                        _ => println!("{line}"),
                    }
                    flush();
                })
                .await?;
        }
        Cmd::Dir(cmd) => dir(client, out, cmd).await?,
        Cmd::Spm(cmd) => spm(client, out, cmd).await?,
        Cmd::Shutdown { detach } => {
            let r: api::ShuttingDown = client
                .post("/v1/shutdown", &api::Shutdown { detach })
                .await?;
            show(out, &r, |_| {
                println!(
                    "lbd is shutting down{}",
                    if detach {
                        " and detaching the data plane"
                    } else {
                        "; the data plane keeps forwarding"
                    }
                )
            });
        }
    }
    Ok(())
}

async fn find_service(client: &Client, key: ServiceKey) -> Result<api::ServiceView, Failure> {
    let all: Vec<api::ServiceView> = client.get("/v1/services").await?;
    all.into_iter().find(|s| s.key == key).ok_or_else(|| {
        Failure::Client(api::client::ClientError::Daemon {
            message: format!("no service {key}; `lbctl service list` shows them"),
            status: 404,
            body: Vec::new(),
        })
    })
}

async fn service(client: &Client, out: Output, cmd: ServiceCmd) -> Result<(), Failure> {
    match cmd {
        ServiceCmd::Add {
            service,
            maglev_size,
            pass_irregular,
            forward,
        } => {
            let mut config = ServiceConfig {
                pass_irregular,
                forward,
                ..ServiceConfig::default()
            };
            if let Some(m) = maglev_size {
                config.maglev_size = m;
            }
            let r: Applied = client
                .post(
                    "/v1/services/add",
                    &api::AddService {
                        service,
                        config: Some(config),
                    },
                )
                .await?;
            show(out, &r, render::applied);
        }
        ServiceCmd::Maintenance {
            service,
            reason,
            duration,
            operator,
        } => {
            let r: Record = client
                .post(
                    "/v1/services/availability",
                    &api::SetAvailability {
                        service,
                        available: false,
                        reason: Some(reason),
                        operator: Some(operator.unwrap_or_else(whoami)),
                        expected_up_ms: duration.map(|d| now_ms() + d.as_millis() as u64),
                    },
                )
                .await?;
            show(out, &r, |r| {
                println!("{service}: unavailable ({:?}) on every node", r.reason)
            });
        }
        ServiceCmd::Available { service, operator } => {
            let r: Record = client
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
            show(out, &r, |_| println!("{service}: available on every node"));
        }
        ServiceCmd::BumpEpoch { service } => {
            let r: api::EpochBumped = client
                .post("/v1/services/bump-epoch", &api::ServiceRef { service })
                .await?;
            show(out, &r, |r| {
                println!("service {}: epoch {}", r.service, r.epoch)
            });
        }
        ServiceCmd::Remove { service } => {
            let r: Applied = client
                .post("/v1/services/remove", &api::ServiceRef { service })
                .await?;
            show(out, &r, render::applied);
        }
        ServiceCmd::List => {
            let all: Vec<api::ServiceView> = client.get(&listing(out, "/v1/services")).await?;
            show(out, &all, |a| render::services(a));
        }
        ServiceCmd::Show {
            service: Some(service),
        } => {
            let s = find_service(client, service).await?;
            show(out, &s, render::service);
        }
        ServiceCmd::Show { service: None } => {
            let all: Vec<api::ServiceView> = client.get("/v1/services").await?;
            show(out, &all, |all| {
                for (i, s) in all.iter().enumerate() {
                    if i > 0 {
                        println!();
                    }
                    render::service(s);
                }
            });
        }
    }
    Ok(())
}

async fn backend(client: &Client, out: Output, cmd: BackendCmd) -> Result<(), Failure> {
    let applied = |r: Applied| show(out, &r, render::applied);
    match cmd {
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
            applied(
                client
                    .post(
                        "/v1/backends/add",
                        &api::AddBackend {
                            service,
                            backend: address,
                            spec: Some(spec),
                        },
                    )
                    .await?,
            );
        }
        BackendCmd::Remove { service, address } => applied(
            client
                .post(
                    "/v1/backends/remove",
                    &api::BackendRef {
                        service,
                        backend: address,
                    },
                )
                .await?,
        ),
        BackendCmd::Drain {
            service,
            address,
            undo,
        } => applied(
            client
                .post(
                    "/v1/backends/drain",
                    &api::DrainBackend {
                        service,
                        backend: address,
                        drain: !undo,
                    },
                )
                .await?,
        ),
        BackendCmd::Weight {
            service,
            address,
            weight,
        } => applied(
            client
                .post(
                    "/v1/backends/weight",
                    &api::SetWeight {
                        service,
                        backend: address,
                        weight,
                    },
                )
                .await?,
        ),
        BackendCmd::Setup {
            host,
            xdp_mode,
            hook,
        } => {
            use lb_userspace::shell::backend_side::Hook;
            let setup = backend_setup(host)?;
            let mode = match xdp_mode {
                crate::cli::XdpModeArg::Auto => aya::programs::XdpMode::Default,
                crate::cli::XdpModeArg::Driver => aya::programs::XdpMode::Driver,
                crate::cli::XdpModeArg::Skb => aya::programs::XdpMode::Skb,
            };
            let hook = match hook {
                crate::cli::HookArg::Auto => Hook::Auto(mode),
                crate::cli::HookArg::Xdp => Hook::Xdp(mode),
                crate::cli::HookArg::Tc => Hook::Tc,
            };
            let done = lb_userspace::shell::backend_side::apply(&setup, hook)
                .await
                .map_err(|e| Failure::Shown(format!("backend setup: {e:#}")))?;
            let left = lb_userspace::shell::backend_side::doctor(&setup)
                .await
                .map_err(|e| Failure::Shown(format!("checking the setup: {e:#}")))?;
            match out {
                Output::Json => {
                    render::json(&serde_json::json!({ "done": done, "problems": left }))
                }
                Output::Human => {
                    for d in &done {
                        println!("{d}");
                    }
                    if done.is_empty() {
                        println!("nothing to do: this host was set up already");
                    }
                    for f in &left {
                        println!("still wrong: {}\n  fix: {}", f.problem, f.fix);
                    }
                }
            }
            if !left.is_empty() {
                return Err(Failure::Shown(format!("{} problem(s) remain", left.len())));
            }
        }
        BackendCmd::Doctor { host } => {
            let setup = backend_setup(host)?;
            let found = lb_userspace::shell::backend_side::doctor(&setup)
                .await
                .map_err(|e| Failure::Shown(format!("backend doctor: {e:#}")))?;
            match out {
                Output::Json => render::json(&found),
                Output::Human => {
                    if found.is_empty() {
                        println!("ok: this host is set up for {}", setup.mode);
                    }
                    for f in &found {
                        println!("{}\n  fix: {}", f.problem, f.fix);
                    }
                }
            }
            if !found.is_empty() {
                return Err(Failure::Shown(format!("{} problem(s) found", found.len())));
            }
        }
        BackendCmd::List { service } => {
            let s = find_service(client, service).await?;
            match out {
                Output::Json => render::json(&s.backends),
                Output::Human => render::backends(&s),
            }
        }
        BackendCmd::Register {
            service,
            addr,
            ttl,
            weight,
            registry,
        } => {
            let client = registry_client(&registry)?.unwrap_or_else(|| client.clone());
            register_loop(&client, out, service, addr, ttl, weight).await?
        }
        BackendCmd::Report {
            service,
            addr,
            load,
            capacity,
            interval,
            once,
            registry,
        } => {
            let client = registry_client(&registry)?.unwrap_or_else(|| client.clone());
            report_loop(&client, out, service, addr, load, capacity, interval, once).await?
        }
    }
    Ok(())
}

/// A client of an LB node's registry port, when the command names one.
fn registry_client(r: &crate::cli::Registry) -> Result<Option<Client>, Failure> {
    let Some(addr) = r.registry else {
        return Ok(None);
    };
    let file = r.registry_key_file.as_ref().expect("clap requires it");
    let key = std::fs::read(file)
        .map_err(|e| Failure::Input(format!("--registry-key-file {}: {e}", file.display())))?;
    let key = String::from_utf8_lossy(&key).trim().as_bytes().to_vec();
    Ok(Some(Client::registry(addr, key)))
}

/// A list of services for `out`: a table shows each service's backend count only, so
/// a human's asks for a summary; JSON gets the whole document.
fn listing(out: Output, path: &str) -> String {
    match out {
        Output::Human => format!("{path}?summary=true"),
        Output::Json => path.to_string(),
    }
}

async fn stats(client: &Client, out: Output, watch: bool, interval: u64) -> Result<(), Failure> {
    // With --watch a human sees the counters once, then rates over each interval.
    let mut last: Option<(api::Stats, std::time::Instant)> = None;
    loop {
        let s: api::Stats = client.get(&listing(out, "/v1/stats")).await?;
        let taken = std::time::Instant::now();
        match (out, &last) {
            (Output::Json, _) => println!("{}", serde_json::to_string(&s).expect("serializes")),
            (Output::Human, None) => render::stats(&s),
            (Output::Human, Some((prev, at))) => {
                let secs = taken.duration_since(*at).as_secs_f64();
                render::rates(&render::stats_rates(prev, &s, secs), secs);
            }
        }
        flush();
        if !watch {
            return Ok(());
        }
        last = Some((s, taken));
        tokio::time::sleep(Duration::from_secs(interval.max(1))).await;
        if out == Output::Human {
            println!();
        }
    }
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

/// Reports a backend's load every `interval` (or once).
#[allow(clippy::too_many_arguments)]
async fn report_loop(
    client: &Client,
    out: Output,
    service: ServiceKey,
    addr: IpAddr,
    load: Option<u64>,
    capacity: u64,
    interval: Duration,
    once: bool,
) -> Result<(), Failure> {
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
        let r: api::LoadReported = client.post("/v1/backends/report", &report).await?;
        match out {
            Output::Json => println!("{}", serde_json::to_string(&r).expect("serializes")),
            Output::Human => println!("{addr} in {service}: load {load} of {capacity}"),
        }
        flush();
        if once {
            return Ok(());
        }
        tokio::time::sleep(interval).await;
    }
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
    let body = api::Registration {
        service,
        instance: None,
        address: addr.ip(),
        port: addr.port(),
        weight,
        ttl_ms: ttl.as_millis() as u64,
    };
    let mut first = true;
    loop {
        // After the first registration, a failed or pending renewal is retried
        // (soon: the lease runs meanwhile) rather than ending the loop.
        let r: api::Registered = match client.post("/v1/dir/register", &body).await {
            Ok(r) => r,
            Err(e) if !first => {
                eprintln!("lbctl: renewing the registration failed (retrying in 1 s): {e}");
                tokio::time::sleep(Duration::from_secs(1).min(ttl / 3)).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        if !r.committed {
            eprintln!(
                "lbctl: registration pending (not yet stored by the directory's backup); retrying"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        }
        if first {
            show(out, &r, |r| {
                println!(
                    "registered {} in {service} for {ttl:?}; renewing every {:?} until interrupted",
                    r.registered,
                    ttl / 3
                )
            });
            flush();
            first = false;
        }
        tokio::time::sleep(ttl / 3).await;
    }
}

async fn dir(client: &Client, out: Output, cmd: DirCmd) -> Result<(), Failure> {
    let table_prefix = |table: String, prefix: Option<String>| {
        query(&api::TablePrefix {
            table,
            prefix: prefix.unwrap_or_default(),
        })
    };
    match cmd {
        DirCmd::Search { table, prefix } => {
            let rows: Vec<Entry> = client
                .get(&format!("/v1/dir/search?{}", table_prefix(table, prefix)))
                .await?;
            show(out, &rows, |r| render::rows(r));
        }
        DirCmd::Find { table, prefix } => {
            let routes: Vec<CompleteRoute> = client
                .get(&format!("/v1/dir/find?{}", table_prefix(table, prefix)))
                .await?;
            show(out, &routes, |r| render::routes(r));
        }
        DirCmd::Add {
            table,
            key,
            value,
            invalid,
        } => {
            let r: api::DirSubmitted = client
                .post(
                    "/v1/dir/add",
                    &api::DirAdd {
                        table,
                        key,
                        value,
                        valid: !invalid,
                    },
                )
                .await?;
            show(out, &r, |_| {
                if r.committed {
                    println!("stored in the directory")
                }
            });
            pending_unless(r.committed)?;
        }
        DirCmd::Delete { table, key } => {
            let r: api::DirDeleted = client
                .post("/v1/dir/delete", &api::DirKey { table, key })
                .await?;
            show(out, &r, |_| {
                if r.committed {
                    println!("deleted")
                }
            });
            pending_unless(r.committed)?;
        }
        DirCmd::Heartbeat {
            table,
            key,
            time_max,
        } => {
            let r: api::DirValid = client
                .post(
                    "/v1/dir/heartbeat",
                    &api::DirHeartbeat {
                        table,
                        key,
                        time_max_ms: time_max.as_millis() as u64,
                    },
                )
                .await?;
            show(out, &r, |_| {
                if r.committed {
                    println!("valid for {time_max:?}")
                }
            });
            pending_unless(r.committed)?;
        }
        DirCmd::Subscribe { table, prefix } => {
            client
                .get_lines(
                    &format!("/v1/dir/subscribe?{}", table_prefix(table, prefix)),
                    |line| {
                        println!("{line}");
                        flush();
                    },
                )
                .await?;
        }
    }
    Ok(())
}

async fn spm(client: &Client, out: Output, cmd: SpmCmd) -> Result<(), Failure> {
    match cmd {
        SpmCmd::Show {
            service,
            client: addr,
            key,
            map_type,
            provider,
            epoch,
            level,
        } => {
            let q = api::SpmQuery {
                service,
                client: addr,
                key,
                map_type,
                provider,
                epoch,
                level,
            };
            match client.get::<Spm>(&format!("/v1/spm?{}", query(&q))).await {
                Ok(map) => show(out, &map, render::spm),
                // An epoch mismatch carries the new map: print it, then fail.
                Err(api::client::ClientError::Daemon {
                    message,
                    status: 409,
                    body,
                }) => {
                    if let Ok(m) = serde_json::from_slice::<api::EpochMismatch>(&body) {
                        show(out, &m, |m| render::spm(&m.map));
                        return Err(Failure::Shown(message));
                    }
                    return Err(Failure::Client(api::client::ClientError::Daemon {
                        message,
                        status: 409,
                        body: Vec::new(),
                    }));
                }
                Err(e) => return Err(e.into()),
            }
        }
        SpmCmd::Watch {
            service,
            client: addr,
        } => {
            let q = api::SpmQuery {
                service,
                client: addr,
                ..api::SpmQuery::default()
            };
            client
                .get_lines(&format!("/v1/spm/watch?{}", query(&q)), |line| {
                    match (out, serde_json::from_str::<Spm>(line)) {
                        (Output::Human, Ok(map)) => render::spm_line(&map),
                        _ => println!("{line}"),
                    }
                    flush();
                })
                .await?;
        }
    }
    Ok(())
}

/// The setup a `backend setup`/`doctor` command line asks for.
fn backend_setup(
    host: crate::cli::BackendHost,
) -> Result<lb_userspace::backend_side::Setup, Failure> {
    if host.mode.encapsulates() && host.lb_sources.is_empty() {
        return Err(Failure::Input(format!(
            "--mode {} needs --lb-source: the LB nodes' encap_source_v4/_v6 addresses, whose \
             packets the decapsulation takes",
            host.mode
        )));
    }
    Ok(lb_userspace::backend_side::Setup {
        interface: host.interface,
        vips: host.vips,
        mode: host.mode,
        lb_sources: host.lb_sources,
        gue_port: host.gue_port,
        pin_dir: host.pin_dir,
    })
}
