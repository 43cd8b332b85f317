//! lbd: the balancer daemon. Wires the config, the daemon state, the API and metrics
//! listeners and the background refreshes; the logic lives in the library.

use std::{collections::BTreeMap, path::PathBuf, process::ExitCode, sync::Arc, time::Duration};

use anyhow::{Context, Result};
use clap::Parser;
use lb_userspace::{
    api::Shutdown,
    config::{Config, DEFAULT_PATH},
    server::{api_router, bind_api, metrics_router, registry_router, AppState, Rejects},
    shell::{
        clusterd,
        daemon::Daemon,
        dird,
        handle::DaemonHandle,
        neighbor::{nudge, NeighborTable},
        notify, preflight,
    },
};
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    name = "lbd",
    version = lb_userspace::LONG_VERSION,
    about = "The load balancer daemon: loads the XDP data plane and serves the management API"
)]
struct Args {
    /// The configuration file.
    #[arg(long, default_value = DEFAULT_PATH)]
    config: PathBuf,
    /// On exit, detach the XDP program and remove the pinned maps. Without it the data
    /// plane keeps forwarding while lbd is down, and the next start takes it over.
    #[arg(long)]
    detach_on_exit: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    check: bool,
    /// Write lb-pass.o, an XDP program that passes every frame and has no maps, to
    /// PATH and exit. Load it on a veth's peer that lbd does not manage (veth drops
    /// what XDP transmits unless the peer runs XDP too):
    /// `ip link set dev PEER xdp obj PATH sec xdp`.
    #[arg(long, value_name = "PATH")]
    write_pass_object: Option<PathBuf>,
    /// Print the manual page lbd(8) in roff and exit (for packaging).
    #[arg(long, hide = true)]
    print_man: bool,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,netlink_packet_route=error".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if let Some(path) = &args.write_pass_object {
        return match std::fs::write(path, lb_userspace::PASS_OBJECT) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lbd: writing {}: {e}", path.display());
                ExitCode::FAILURE
            }
        };
    }
    if args.print_man {
        let man = clap_mangen::Man::new(<Args as clap::CommandFactory>::command()).section("8");
        return match man.render(&mut std::io::stdout()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("lbd: writing the manual page: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lbd: config error: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lbd: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check {
        // What a start checks before it touches the kernel's BPF, in this namespace.
        let checked = runtime.block_on(async {
            let neighbors = NeighborTable::new()?;
            preflight::check(&config, &neighbors).await
        });
        return match checked {
            Ok(()) => {
                println!(
                    "{}: ok ({} services)",
                    args.config.display(),
                    config.desired.services.len()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("lbd: config error: {}: {e:#}", args.config.display());
                ExitCode::from(2)
            }
        };
    }
    match runtime.block_on(run(config, args.config.clone(), args.detach_on_exit)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("lbd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(config: Config, path: std::path::PathBuf, detach_on_exit: bool) -> Result<()> {
    let api_path = config.node.api_socket.clone();
    // Bind first: a second daemon for the same node must fail before touching the maps.
    let api_listener = bind_api(&api_path)?;
    let result = serve(config, path, detach_on_exit, api_listener).await;
    // Whatever happened, the socket goes with this lbd.
    let _ = std::fs::remove_file(&api_path);
    result
}

async fn serve(
    config: Config,
    config_path: std::path::PathBuf,
    detach_on_exit: bool,
    api_listener: tokio::net::UnixListener,
) -> Result<()> {
    let neighbors = Arc::new(NeighborTable::new()?);
    preflight::check(&config, &neighbors).await?;
    let metrics_addr = config.node.metrics_listen;
    // Every listener before the data plane: a start that cannot serve fails before
    // it has pinned or attached anything.
    let metrics_listener = tokio::net::TcpListener::bind(metrics_addr)
        .await
        .with_context(|| {
            format!("binding the metrics address {metrics_addr} (node.metrics_listen)")
        })?;
    let registry_listener = match config.node.registry_listen {
        Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
            format!("binding the registry address {addr} (node.registry_listen): is it an address of this node?")
        })?),
        None => None,
    };
    let peer_listener = match &config.cluster {
        Some(c) => {
            let addr = lb_userspace::shell::peer::endpoint(c.id, c.port);
            Some(tokio::net::TcpListener::bind(addr).await.with_context(|| {
                format!("binding the peer endpoint {addr} (cluster.id, cluster port + 1)")
            })?)
        }
        None => None,
    };
    let api_path = config.node.api_socket.clone();
    let registry_key = config.node.registry_key.clone().map(Arc::new);
    let rejects: Arc<Rejects> = Arc::default();
    let cluster_config = config.cluster.clone();
    // The load advertised counts the flows of both families' tables.
    let conn_capacity = config
        .sizes
        .conn_table_size
        .saturating_add(config.sizes.v6_conn_table_size());
    let pin_dir = config.node.pin_dir.clone();
    let first_interface = config.interfaces.first().map(|i| i.name.clone());
    let saved_availability = lb_userspace::shell::availd::load(&config.node.state_dir)?;
    let daemon = Daemon::start(config, &neighbors, saved_availability.clone()).await?;
    let status = daemon.status();
    info!(
        node = %status.node,
        services = status.services,
        resumed = status.resumed,
        api = %api_path.display(),
        metrics = %status.metrics,
        "lbd ready"
    );
    // The daemon runs on its own thread from here; the rest reach it through its handle.
    let daemon = DaemonHandle::spawn(daemon, Duration::from_secs(1));
    let cluster = match &cluster_config {
        Some(c) => {
            let handle = clusterd::start(
                c.clone(),
                daemon.clone(),
                neighbors.clone(),
                conn_capacity,
                &pin_dir,
            )
            .await?;
            info!(id = %c.id, group = ?c.group, peers = c.peers.len(), "cluster member");
            Some(handle)
        }
        None => None,
    };
    let directory = dird::start(
        daemon.clone(),
        neighbors.clone(),
        cluster.clone().zip(cluster_config.clone()),
    );
    lb_userspace::shell::managers::start(directory.clone());
    // The records the daemon started with (it applied them before attaching).
    let state_dir = daemon.now().state_dir.clone();
    let availability = lb_userspace::shell::availd::start(
        saved_availability,
        &state_dir,
        daemon.clone(),
        cluster.clone().zip(cluster_config.clone()),
    );
    // The directory's replication endpoint, next to the cluster's port.
    if let Some(listener) = peer_listener {
        let addr = listener.local_addr()?;
        let peers = axum::serve(
            listener,
            lb_userspace::server::dsd_router(directory.clone(), rejects.clone()).merge(
                lb_userspace::server::avail_router(availability.clone(), rejects.clone()),
            ),
        );
        tokio::spawn(async move { peers.await });
        info!(%addr, "peer endpoint (directory, availability)");
    }
    // Host routes are probed through the first data-plane interface, from its address.
    if let Some(first) = first_interface {
        let iface = neighbors.interface(&first).await?;
        let vips = daemon.now().service_addresses.clone();
        let src = neighbors
            .addresses(iface.ifindex)
            .await?
            .into_iter()
            .find_map(|a| match a {
                std::net::IpAddr::V4(v4) if !vips.contains(&a) => Some(v4),
                _ => None,
            });
        match src {
            Some(src) => lb_userspace::shell::routes::monitor_routes(directory.clone(), first, src),
            None => {
                warn!(interface = %first, "no IPv4 address of its own: host routes are not probed")
            }
        }
    }
    tokio::spawn(lb_userspace::shell::health::run_checks(daemon.clone()));
    // Ready (VIPs may come) once the replica and the availability records are synced.
    if let Some(cluster) = cluster.clone() {
        let (directory, availability) = (directory.clone(), availability.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            loop {
                if directory.synced() && availability.synced() {
                    info!(
                        after_ms = started.elapsed().as_millis() as u64,
                        "start-up sync done: ready for VIPs"
                    );
                    cluster.set_ready().await;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        });
    }
    let (shutdown_tx, mut shutdown_rx) = mpsc::channel::<Shutdown>(1);
    let state = AppState {
        registry_key,
        rejects,
        directory,
        availability,
        daemon: daemon.clone(),
        shutdown: shutdown_tx,
        neighbors: neighbors.clone(),
        cluster,
        config_path: Some(config_path.clone()),
    };
    let api = axum::serve(api_listener, api_router(state.clone()));
    let metrics = axum::serve(metrics_listener, metrics_router(state.clone()));
    if let Some(listener) = registry_listener {
        let addr = listener.local_addr()?;
        let registry = axum::serve(listener, registry_router(state.clone()));
        tokio::spawn(async move { registry.await });
        info!(%addr, "backends may register here");
    }
    let api_task = tokio::spawn(async move { api.await });
    let metrics_task = tokio::spawn(async move { metrics.await });

    // Backend MACs: the kernel keeps its neighbour entries fresh; we mirror them.
    let refresh = {
        let daemon = daemon.clone();
        let neighbors = neighbors.clone();
        tokio::spawn(async move {
            let mut missing = true;
            loop {
                // Soon again while a backend is unresolved: until then its VIPs are
                // not this node's to take.
                let wait = if missing { 250 } else { 2000 };
                tokio::time::sleep(Duration::from_millis(wait)).await;
                let (wanted, routed) = {
                    let now = daemon.now();
                    (now.resolvable.clone(), now.routed.clone())
                };
                // An encapsulated backend's entry is its gateway's: a route change
                // moves its frames to the new gateway.
                let found: BTreeMap<_, _> = match neighbors.table_for(&wanted, &routed).await {
                    Ok(t) => t,
                    Err(e) => {
                        warn!("reading the neighbour table: {e:#}");
                        continue;
                    }
                };
                missing = false;
                for addr in wanted.iter().filter(|a| !found.contains_key(a)) {
                    nudge(*addr);
                    missing = true;
                }
                if let Err(e) = daemon.change(move |d| d.update_neighbors(found)).await {
                    warn!("applying new backend MACs: {e:#}");
                }
            }
        })
    };

    // systemd (Type=notify): ready once the data plane is attached and the API
    // serves; the watchdog is fed only while the daemon thread answers, so a stuck
    // daemon is restarted (and resumes the pinned data plane, hitless).
    notify::notify("READY=1");
    let watchdog = notify::watchdog_interval().map(|every| {
        let daemon = daemon.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let alive = tokio::time::timeout(every, daemon.call(|_| ())).await;
                if alive.is_ok() {
                    notify::notify("WATCHDOG=1");
                } else {
                    warn!("the daemon thread did not answer within {every:?}: not feeding the watchdog");
                }
            }
        })
    });
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::pin!(api_task);
    tokio::pin!(metrics_task);
    let detach = loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); break detach_on_exit }
            _ = int.recv() => { info!("SIGINT"); break detach_on_exit }
            _ = hup.recv() => lb_userspace::server::reload::on_hangup(&state).await,
            req = shutdown_rx.recv() => {
                let detach = req.map(|r| r.detach).unwrap_or(false) || detach_on_exit;
                info!(detach, "shutdown requested");
                // Let the API answer the request before the listener goes.
                tokio::time::sleep(Duration::from_millis(100)).await;
                break detach
            }
            r = &mut api_task => { anyhow::bail!("the API server stopped: {r:?}") }
            r = &mut metrics_task => { anyhow::bail!("the metrics server stopped: {r:?}") }
        }
    };
    notify::notify("STOPPING=1");
    if let Some(w) = watchdog {
        w.abort();
    }
    refresh.abort();
    if detach {
        if let (Some(cluster), Some(c)) = (&state.cluster, &cluster_config) {
            // Make before break: the others take the VIPs while this node forwards.
            cluster.leave(3 * c.timeout + Duration::from_secs(2)).await;
        }
        daemon.call(|d| d.detach_everything()).await?;
        if let Some(c) = &cluster_config {
            // Give the VIPs up, so that the others take them at once.
            if let Ok(iface) = neighbors.interface(&c.vip_interface).await {
                for vip in daemon
                    .now()
                    .service_addresses
                    .clone()
                    .into_iter()
                    .chain(c.preferred.iter().copied())
                {
                    let _ = lb_userspace::shell::vip::remove_address(
                        neighbors.handle(),
                        iface.ifindex,
                        vip,
                    )
                    .await;
                }
            }
        }
    } else {
        info!("leaving the XDP program attached: traffic keeps flowing; the next lbd takes over");
    }
    Ok(())
}
