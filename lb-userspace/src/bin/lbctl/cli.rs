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
        /// Seconds between two prints with --watch (rates are over this interval).
        #[arg(long, default_value_t = 2)]
        interval: u64,
    },
    /// Make lbd's services exactly those of a file (an lbd config or just [[service]]
    /// sections); prints the changes.
    Apply {
        /// The file: an lbd config (its [[service]] sections are used) or only
        /// [[service]] sections.
        #[arg(short = 'f', long = "file")]
        file: PathBuf,
        /// Show the changes without making them.
        #[arg(long)]
        dry_run: bool,
    },
    /// Re-read lbd's config file and apply its services, as SIGHUP does; prints the
    /// changes and the sections that wait for a restart. A bad file changes nothing.
    Reload,
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
        /// Keep printing events as they happen, until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// The Service Point Map: where clients should go, with epochs and backups.
    #[command(subcommand)]
    Spm(SpmCmd),
    /// The directory: tables of service instances, host routes, partitions.
    #[command(subcommand)]
    Dir(DirCmd),
    /// Print the manual page lbctl(8) in roff (for packaging).
    #[command(hide = true)]
    Man,
    /// Print a shell completion script.
    Completions {
        /// The shell: bash, elvish, fish, powershell or zsh.
        shell: clap_complete::Shell,
    },
}

/// Services are written as tcp/198.18.0.100:80, udp/[2001:db8::1]:53, tcp/198.18.0.100:* (any port).
#[derive(Subcommand)]
pub enum ServiceCmd {
    /// Add a service (no backends yet: add them with `backend add`).
    Add {
        /// The service, e.g. tcp/198.18.0.100:80 (tcp/ADDR:* for the port-less one).
        service: ServiceKey,
        /// Its Maglev table size (a prime; default from the config's dataplane section).
        #[arg(long)]
        maglev_size: Option<u32>,
        /// Pass fragments and packets with IP options to the node's stack instead of dropping them.
        #[arg(long)]
        pass_irregular: bool,
        /// How packets reach the backends: l2 (on this segment), ipip or gue (behind
        /// routers; needs the node's dataplane.encap_source_v4/_v6).
        #[arg(long, default_value = "l2")]
        forward: lb_userspace::model::Forward,
    },
    /// Remove a service and its backends; its flows are dropped from then on.
    Remove {
        /// The service, e.g. tcp/198.18.0.100:80 (tcp/ADDR:* for the port-less one).
        service: ServiceKey,
    },
    /// Start a new epoch for the service: clients holding the old one are told so.
    BumpEpoch {
        /// The service, e.g. tcp/198.18.0.100:80 (tcp/ADDR:* for the port-less one).
        service: ServiceKey,
    },
    /// Every service with its backend count and state, one line each.
    List,
    /// A service in detail: its settings and every backend (all services without one).
    Show {
        /// The service, e.g. tcp/198.18.0.100:80 (tcp/ADDR:* for the port-less one).
        service: Option<ServiceKey>,
    },
    /// Refuse the service on every LB node at once (SYN → RST, UDP → ICMP error).
    Maintenance {
        /// The service, e.g. tcp/198.18.0.100:80 (tcp/ADDR:* for the port-less one).
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
        /// The service, e.g. tcp/198.18.0.100:80 (tcp/ADDR:* for the port-less one).
        service: ServiceKey,
        /// Who is doing it (default: $USER).
        #[arg(long)]
        operator: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum SpmCmd {
    /// The map as a client gets it (type 1: every service), or its part for one
    /// service, sphere or client.
    Show {
        /// Only this service's entries.
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
        /// Only this provider's entries (its name in the SPM settings).
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
        /// Only this service's entries.
        #[arg(long)]
        service: Option<ServiceKey>,
        /// Apply the rules for this client address.
        #[arg(long)]
        client: Option<IpAddr>,
    },
}

#[derive(Subcommand)]
pub enum DirCmd {
    /// Rows whose key starts with PREFIX (all without one).
    Search {
        /// The table, e.g. instances or routes.
        table: String,
        /// Only keys that start with this.
        prefix: Option<String>,
    },
    /// Valid instances with the current route to their host.
    Find {
        /// The table, e.g. instances or routes.
        table: String,
        /// Only keys that start with this.
        prefix: Option<String>,
    },
    /// Write a row (answered once a backup holds it: exit 5 if none does yet).
    Add {
        /// The table, e.g. instances or routes.
        table: String,
        /// The row's key.
        key: String,
        /// The row's value.
        value: String,
        /// Write it marked invalid (present, but not used).
        #[arg(long)]
        invalid: bool,
    },
    /// Delete a row.
    Delete {
        /// The table, e.g. instances or routes.
        table: String,
        /// The row's key.
        key: String,
    },
    /// Valid now, and invalid unless renewed within --time-max.
    Heartbeat {
        /// The table, e.g. instances or routes.
        table: String,
        /// The row's key.
        key: String,
        /// How long the row stays valid without another heartbeat (e.g. 5s).
        #[arg(long, value_parser = parse_duration)]
        time_max: Duration,
    },
    /// Stream Add / Delete / Resync events of a table (and key prefix).
    Subscribe {
        /// The table, e.g. instances or routes.
        table: String,
        /// Only keys that start with this.
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
    /// Acquire VIPs again as the cluster assigns them.
    Unquiesce,
}

#[derive(Subcommand)]
pub enum BackendCmd {
    /// Add a backend to a service; it takes new flows at once.
    Add {
        /// The service, e.g. tcp/198.18.0.100:80 (tcp/ADDR:* for the port-less one).
        service: ServiceKey,
        /// The backend's address.
        address: IpAddr,
        /// Its share of new flows relative to the others.
        #[arg(long, default_value_t = 1)]
        weight: u32,
        /// Fixed MAC; by default it is resolved through the neighbour table.
        #[arg(long, value_parser = parse_mac_arg)]
        mac: Option<[u8; 6]>,
    },
    /// Remove a backend: it gets no packet from then on, not even of its old flows.
    Remove {
        /// The service, e.g. tcp/198.18.0.100:80 (tcp/ADDR:* for the port-less one).
        service: ServiceKey,
        /// The backend's address.
        address: IpAddr,
    },
    /// Take no new flows; established ones continue until they end.
    Drain {
        /// The service, e.g. tcp/198.18.0.100:80 (tcp/ADDR:* for the port-less one).
        service: ServiceKey,
        /// The backend's address.
        address: IpAddr,
        /// Put the backend back into rotation.
        #[arg(long)]
        undo: bool,
    },
    /// Change a backend's weight.
    Weight {
        /// The service, e.g. tcp/198.18.0.100:80 (tcp/ADDR:* for the port-less one).
        service: ServiceKey,
        /// The backend's address.
        address: IpAddr,
        /// The new weight (0 takes it out of new flows, like a drain).
        weight: u32,
    },
    /// On a backend host: everything it needs to take a service's traffic: the VIPs
    /// on lo, ARP kept quiet about them, and for ipip/gue the decapsulation program
    /// (lb_decap) attached with the LB nodes' sources. Needs no lbd; safe to repeat.
    Setup {
        #[command(flatten)]
        host: BackendHost,
        /// XDP mode of the decapsulation (auto: driver where the interface has it).
        #[arg(long, value_enum, default_value = "auto")]
        xdp_mode: XdpModeArg,
        /// Where the decapsulation goes: xdp, tc (ingress, for interfaces that take
        /// no XDP program), or auto (XDP, else tc).
        #[arg(long, value_enum, default_value = "auto")]
        hook: HookArg,
    },
    /// On a backend host: check what `backend setup` sets up, and say what is wrong
    /// with the command that fixes it. Exits 1 if anything is.
    Doctor {
        #[command(flatten)]
        host: BackendHost,
    },
    /// A service's backends with weight, health, MAC and counters.
    List {
        /// The service, e.g. tcp/198.18.0.100:80 (tcp/ADDR:* for the port-less one).
        service: ServiceKey,
    },
    /// Register a backend in the directory with a lease, and keep renewing it until
    /// interrupted: stop this and the backend leaves within the lease.
    Register {
        /// The service, e.g. tcp/198.18.0.100:80 (tcp/ADDR:* for the port-less one).
        #[arg(long)]
        service: ServiceKey,
        /// The backend's address and port.
        #[arg(long)]
        addr: std::net::SocketAddr,
        /// The lease: without a renewal within it, the registration ends.
        #[arg(long, value_parser = parse_duration, default_value = "2s")]
        ttl: Duration,
        /// Its share of new flows relative to the others.
        #[arg(long, default_value_t = 1)]
        weight: u32,
        #[command(flatten)]
        registry: Registry,
    },
    /// Reports a backend's load and capacity for the water marks, every --interval
    /// until interrupted (or once). Without --load: this host's CPU busy time, per
    /// mille of --capacity.
    Report {
        /// The service, e.g. tcp/198.18.0.100:80 (tcp/ADDR:* for the port-less one).
        #[arg(long)]
        service: ServiceKey,
        /// The backend's address.
        #[arg(long)]
        addr: IpAddr,
        /// The load to report (default: this host's CPU busy time).
        #[arg(long)]
        load: Option<u64>,
        /// The capacity the load is measured against.
        #[arg(long, default_value_t = 1000)]
        capacity: u64,
        /// Time between two reports.
        #[arg(long, value_parser = parse_duration, default_value = "1s")]
        interval: Duration,
        #[command(flatten)]
        registry: Registry,
        /// Report once and exit.
        #[arg(long)]
        once: bool,
    },
}

/// A backend host as `backend setup` and `doctor` take it.
#[derive(clap::Args, Clone, Debug)]
pub struct BackendHost {
    /// The interface the service's packets arrive on.
    #[arg(long, default_value = "eth0")]
    pub interface: String,
    /// A VIP this backend serves (repeat for more).
    #[arg(long = "vip", required = true)]
    pub vips: Vec<IpAddr>,
    /// How the LB nodes send it packets: l2 (same segment), ipip or gue.
    #[arg(long, default_value = "l2")]
    pub mode: lb_userspace::model::Forward,
    /// An LB node's outer source address (its encap_source_v4/_v6); repeat for each
    /// node. Required for ipip and gue.
    #[arg(long = "lb-source")]
    pub lb_sources: Vec<IpAddr>,
    /// The UDP port GUE comes to (the LB nodes' dataplane.gue_port).
    #[arg(long, default_value_t = lb_common::GUE_PORT_DEFAULT)]
    pub gue_port: u16,
    /// bpffs directory for the decapsulation's maps and link.
    #[arg(long, default_value = "/sys/fs/bpf/lb-decap")]
    pub pin_dir: PathBuf,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum HookArg {
    Auto,
    Xdp,
    Tc,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum XdpModeArg {
    Auto,
    Driver,
    Skb,
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

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every subcommand, at every depth, says what it does, and every argument what
    /// it takes: `lbctl X --help` is never an empty line.
    #[test]
    fn every_subcommand_and_argument_has_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
                let here = format!("{path} {}", sub.get_name());
                if sub.get_about().is_none() {
                    missing.push(here.clone());
                }
                for arg in sub.get_arguments() {
                    let id = arg.get_id().as_str();
                    if id != "help" && id != "version" && arg.get_help().is_none() {
                        missing.push(format!("{here} <{id}>"));
                    }
                }
                walk(sub, &here, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "lbctl", &mut missing);
        assert!(missing.is_empty(), "no help for: {missing:#?}");
    }
}
