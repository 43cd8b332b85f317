//! lbctl's command line: every command, its arguments and its help.

use std::{net::IpAddr, path::PathBuf, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use lb_userspace::model::{parse_mac, ServiceKey};

#[derive(Parser)]
#[command(name = "lbctl", version = lb_userspace::LONG_VERSION, about = "Control the load balancer daemon (lbd)")]
pub struct Cli {
    /// lbd's API socket. Default: $LBCTL_SOCKET, else the only socket in /run/lb.
    #[arg(long, global = true)]
    pub socket: Option<PathBuf>,
    /// Output format.
    #[arg(long, short, global = true, value_enum, default_value_t = Output::Human)]
    pub output: Output,
    #[command(subcommand)]
    pub command: Cmd,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Human,
    Json,
}

#[derive(Subcommand)]
pub enum Cmd {
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
pub enum ServiceCmd {
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
pub enum SpmCmd {
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
pub enum DirCmd {
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

pub fn whoami() -> String {
    std::env::var("USER").unwrap_or_else(|_| "operator".into())
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
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
pub enum NodeCmd {
    /// Acquire no VIP from now on; keep the ones served.
    Quiesce,
    Unquiesce,
}

#[derive(Subcommand)]
pub enum BackendCmd {
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
        #[command(flatten)]
        registry: Registry,
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
        #[command(flatten)]
        registry: Registry,
        #[arg(long)]
        once: bool,
    },
}

pub fn parse_mac_arg(s: &str) -> Result<[u8; 6], String> {
    parse_mac(s).ok_or_else(|| format!("`{s}` is not a MAC address like 02:00:00:00:00:01"))
}

/// Where a backend registers from its own host: an LB node's registry port, with the
/// key the node's `registry_key` holds. Without `--registry`, the local lbd's socket.
#[derive(clap::Args, Clone, Debug)]
pub struct Registry {
    /// The registry port of an LB node (`node.registry_listen`), e.g. 198.18.0.2:9470.
    #[arg(long, requires = "registry_key_file")]
    pub registry: Option<std::net::SocketAddr>,
    /// A file holding the registry key (the node's `registry_key`).
    #[arg(long)]
    pub registry_key_file: Option<PathBuf>,
}
