//! The daemon's TOML configuration. Parsing is strict (unknown fields are errors, so a
//! typo cannot silently become a default) and every error names the file, line and
//! field. The file's services become a [`Desired`]; the rest says where the daemon
//! runs and how the data plane is sized.

mod cluster;
mod error;
mod file;
mod secret;
mod services;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use toml::Spanned;

pub use error::ConfigError;
pub use services::parse_services;

use crate::{
    dataplane::loader::{
        LoadOptions, CONN_TABLE_LIMIT, IDLE_TIMEOUT_LIMIT, MAX_BACKENDS_LIMIT, MAX_SERVICES_LIMIT,
        RING_CELLS_LIMIT,
    },
    desired::Desired,
    maglev::is_prime,
    model::EncapSettings,
};
use error::Ctx;
use file::File;

pub const DEFAULT_PATH: &str = "/etc/lb/lbd.toml";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9469";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpModeName {
    /// Native (driver) mode: the fast path.
    #[default]
    Driver,
    /// Generic mode: works on any interface, slower.
    Skb,
    /// Let the kernel pick.
    Auto,
}

impl XdpModeName {
    /// Whether the kernel's report of an attach mode (`NeighborTable::xdp_attached`)
    /// is this mode (`auto` is whatever the kernel chose).
    pub fn is(self, kernel: &str) -> bool {
        match self {
            XdpModeName::Driver => kernel == "driver",
            XdpModeName::Skb => kernel == "skb",
            XdpModeName::Auto => true,
        }
    }

    pub fn mode(self) -> aya::programs::XdpMode {
        use aya::programs::XdpMode;
        match self {
            XdpModeName::Driver => XdpMode::Driver,
            XdpModeName::Skb => XdpMode::Skb,
            XdpModeName::Auto => XdpMode::Default,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Interface {
    pub name: String,
    pub xdp_mode: XdpModeName,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeConfig {
    pub name: String,
    pub api_socket: PathBuf,
    pub metrics_listen: SocketAddr,
    /// Where runtime changes and the map manager's snapshot are saved.
    pub state_dir: PathBuf,
    /// bpffs directory for the pinned maps and links.
    pub pin_dir: PathBuf,
    /// Where backends register themselves over HTTP (TCP); off when absent.
    pub registry_listen: Option<SocketAddr>,
    /// What registry requests must be signed with (required with `registry_listen`).
    pub registry_key: Option<Vec<u8>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub node: NodeConfig,
    pub interfaces: Vec<Interface>,
    /// `[dataplane]`'s sizes (`pin_dir` unset: it is `node.pin_dir`).
    pub sizes: LoadOptions,
    /// `[dataplane]`'s encapsulation settings.
    pub encap: EncapSettings,
    pub desired: Desired,
    /// Present when this node is one of a cluster that moves VIPs between nodes.
    pub cluster: Option<ClusterConfig>,
}

/// The `[cluster]` section: this node in its group of LB nodes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterConfig {
    /// This node's id address (its control address); the lowest alive id leads.
    pub id: IpAddr,
    /// The group's multicast address and port.
    pub group: Option<SocketAddr>,
    /// Unicast peers, for networks without multicast (control address and port).
    pub peers: Vec<SocketAddr>,
    /// Port to listen on for control messages.
    pub port: u16,
    /// The shared secret of the group's HMAC-SHA256.
    pub key: Vec<u8>,
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    pub orphan_expiry: Option<std::time::Duration>,
    /// How many LB nodes the group has, this one included.
    pub nodes: usize,
    /// Hosts that must be alive (this one included) for this node to serve VIPs: a
    /// node cut off from a majority gives its VIPs up rather than split the brain.
    pub quorum: usize,
    /// VIPs this node prefers to serve (none: a hot spare).
    pub preferred: Vec<IpAddr>,
    /// Interface the VIPs are added to and announced on.
    pub vip_interface: String,
    /// Run with `acquire|release VIP` after an acquire and before a release.
    pub script: Option<PathBuf>,
    pub script_timeout: std::time::Duration,
    /// How many peers must have answered this node's start-up sync before it takes
    /// VIPs (see [`StartupSync`]).
    pub startup_sync: StartupSync,
}

/// `cluster.startup_sync`: whom a starting node must have synced its availability
/// records with before it is ready (its directory replica always comes from the
/// master, which needs a quorum).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartupSync {
    /// At least one peer (default).
    Peer,
    /// Enough peers to make a quorum with this node.
    Quorum,
}

impl StartupSync {
    /// How many peers must answer, in a group with this quorum.
    pub fn peers_needed(self, quorum: usize) -> usize {
        match self {
            StartupSync::Peer => 1,
            StartupSync::Quorum => quorum.saturating_sub(1).max(1),
        }
    }
}

impl Config {
    /// The sections of `new` that differ from this config in what only a restart
    /// applies (everything but the services).
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        let mut later = Vec::new();
        if self.node != new.node {
            later.push("[node]");
        }
        if self.interfaces != new.interfaces || self.sizes != new.sizes || self.encap != new.encap {
            later.push("[dataplane]");
        }
        if self.cluster != new.cluster {
            later.push("[cluster]");
        }
        later
    }

    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            pin_dir: Some(self.node.pin_dir.clone()),
            ..self.sizes.clone()
        }
    }
}

fn sized(
    ctx: &Ctx,
    v: Option<Spanned<u32>>,
    default: u32,
    field: &str,
    check: impl Fn(u32) -> Option<String>,
) -> Result<u32, ConfigError> {
    match v {
        None => Ok(default),
        Some(s) => match check(*s.get_ref()) {
            None => Ok(*s.get_ref()),
            Some(why) => Err(ctx.err(s.span(), format!("dataplane.{field}: {why}"))),
        },
    }
}

impl Config {
    pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
        let ctx = Ctx { path, text };
        let file: File = toml::from_str(text).map_err(|e| ctx.toml_err(e))?;
        let node_span = file.node.span();
        let node = file.node.into_inner();
        let name = node.name.get_ref().clone();
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ctx.err(
                node.name.span(),
                "node.name: use letters, digits, '-' and '_' only (it names files and directories)",
            ));
        }
        let registry_key = secret::read(
            &ctx,
            ("node.registry_key", "node.registry_key_file"),
            node.registry_key,
            node.registry_key_file,
            node_span.clone(),
            path,
        )?;
        if node.registry_listen.is_some() && registry_key.is_none() {
            return Err(ctx.err(
                node_span,
                "node.registry_listen: needs registry_key or registry_key_file (at least 16 \
                 characters, shared with the backends' `lbctl backend register --registry-key-file`): \
                 without it, anyone who reaches the port could add backends",
            ));
        }
        let defaults = LoadOptions::default();
        let (interfaces, sizes, encap) = match file.dataplane {
            None => {
                return Err(ctx.err(
                    node_span,
                    "dataplane: missing; add [dataplane] with interfaces = [{ name = \"eth0\" }]",
                ))
            }
            Some(dp) => {
                let span = dp.span();
                let dp = dp.into_inner();
                if dp.interfaces.is_empty() {
                    return Err(ctx.err(
                        span,
                        "dataplane.interfaces: name at least one interface to attach to",
                    ));
                }
                let range = |max: u32, unit: &'static str| {
                    move |v: u32| {
                        (v == 0 || v > max).then(|| format!("{v} must be 1..={max} ({unit})"))
                    }
                };
                let prime = |v: u32| (!is_prime(v)).then(|| format!("{v} is not a prime"));
                let sizes = LoadOptions {
                    max_services: sized(
                        &ctx,
                        dp.max_services,
                        defaults.max_services,
                        "max_services",
                        range(MAX_SERVICES_LIMIT, "services"),
                    )?,
                    max_backends: sized(
                        &ctx,
                        dp.max_backends,
                        defaults.max_backends,
                        "max_backends",
                        range(MAX_BACKENDS_LIMIT, "backends over all services"),
                    )?,
                    ring_cells: sized(
                        &ctx,
                        dp.ring_cells,
                        defaults.ring_cells,
                        "ring_cells",
                        range(RING_CELLS_LIMIT, "table cells, 4 bytes each"),
                    )?,
                    maglev_min_size: sized(
                        &ctx,
                        dp.maglev_min_size,
                        defaults.maglev_min_size,
                        "maglev_min_size",
                        prime,
                    )?,
                    maglev_max_size: sized(
                        &ctx,
                        dp.maglev_max_size,
                        defaults.maglev_max_size,
                        "maglev_max_size",
                        prime,
                    )?,
                    conn_table_size: sized(
                        &ctx,
                        dp.conn_table_size,
                        defaults.conn_table_size,
                        "conn_table_size",
                        range(
                            CONN_TABLE_LIMIT,
                            "IPv4 flows; each costs 64 to 128 bytes of kernel memory",
                        ),
                    )?,
                    conn_table_size_v6: dp
                        .conn_table_size_v6
                        .map(|v| {
                            sized(
                                &ctx,
                                Some(v),
                                0,
                                "conn_table_size_v6",
                                range(
                                    CONN_TABLE_LIMIT,
                                    "IPv6 flows; each costs 128 to 256 bytes of kernel memory",
                                ),
                            )
                        })
                        .transpose()?,
                    tcp_idle_timeout_s: sized(
                        &ctx,
                        dp.tcp_idle_timeout_s,
                        defaults.tcp_idle_timeout_s,
                        "tcp_idle_timeout_s",
                        range(IDLE_TIMEOUT_LIMIT, "seconds"),
                    )?,
                    udp_idle_timeout_s: sized(
                        &ctx,
                        dp.udp_idle_timeout_s,
                        defaults.udp_idle_timeout_s,
                        "udp_idle_timeout_s",
                        range(IDLE_TIMEOUT_LIMIT, "seconds"),
                    )?,
                    pin_dir: None,
                };
                if let Some(why) = sizes.refusal() {
                    return Err(ctx.err(span, why));
                }
                let mut encap = EncapSettings {
                    source_v4: dp.encap_source_v4.as_ref().map(|a| *a.get_ref()),
                    source_v6: dp.encap_source_v6.as_ref().map(|a| *a.get_ref()),
                    ..EncapSettings::default()
                };
                for (field, a) in [
                    (
                        "encap_source_v4",
                        dp.encap_source_v4
                            .map(|a| (IpAddr::V4(*a.get_ref()), a.span())),
                    ),
                    (
                        "encap_source_v6",
                        dp.encap_source_v6
                            .map(|a| (IpAddr::V6(*a.get_ref()), a.span())),
                    ),
                ] {
                    if let Some((a, span)) = a {
                        if let Some(why) = crate::validate::source_refusal(a) {
                            return Err(ctx.err(
                                span,
                                format!("dataplane.{field}: {a} cannot be an outer source: {why}"),
                            ));
                        }
                    }
                }
                if let Some(p) = dp.gue_port {
                    if *p.get_ref() == 0 {
                        return Err(ctx.err(
                            p.span(),
                            "dataplane.gue_port: 0 is no port (leave it out for 6080)",
                        ));
                    }
                    encap.gue_port = *p.get_ref();
                }
                if let Some(m) = dp.encap_mtu {
                    let v = *m.get_ref();
                    if !(576..=9216).contains(&v) {
                        return Err(ctx.err(m.span(), format!("dataplane.encap_mtu: {v} must be 576..=9216 (bytes of an IP packet, outer header included)")));
                    }
                    encap.path_mtu = Some(v);
                }
                let interfaces: Vec<Interface> = dp
                    .interfaces
                    .into_iter()
                    .map(|i| Interface {
                        name: i.name,
                        xdp_mode: i.xdp_mode,
                    })
                    .collect();
                (interfaces, sizes, encap)
            }
        };
        let desired = services::services(&ctx, file.service, Some((&sizes, &encap)))?;
        let cluster = match file.cluster {
            None => None,
            Some(c) => Some(cluster::cluster(&ctx, c, path, &interfaces)?),
        };
        Ok(Config {
            path: path.to_path_buf(),
            node: NodeConfig {
                api_socket: node
                    .api_socket
                    .unwrap_or_else(|| PathBuf::from(format!("/run/lb/{name}.sock"))),
                metrics_listen: node
                    .metrics_listen
                    .unwrap_or_else(|| DEFAULT_METRICS.parse().expect("valid default")),
                state_dir: node
                    .state_dir
                    .unwrap_or_else(|| PathBuf::from(format!("/var/lib/lb/{name}"))),
                pin_dir: node
                    .pin_dir
                    .unwrap_or_else(|| PathBuf::from(format!("/sys/fs/bpf/lb/{name}"))),
                registry_listen: node.registry_listen,
                registry_key,
                name,
            },
            interfaces,
            sizes,
            encap,
            desired,
            cluster,
        })
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            path: path.to_path_buf(),
            line: 0,
            column: 0,
            message: format!("cannot read the config: {e}"),
        })?;
        Config::parse(path, &text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Forward;

    const GOOD: &str = r#"
[node]
name = "lb1"

[dataplane]
interfaces = [{ name = "eth0", xdp_mode = "skb" }]
conn_table_size = 4096

[[service]]
vip = "198.18.0.100"
port = 80
protocol = "tcp"

[[service.backend]]
address = "198.18.0.11"
mac = "02:1b:00:00:00:0b"

[[service.backend]]
address = "198.18.0.12"
weight = 3
drain = true
"#;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("lbd.toml"), text)
    }

    #[test]
    fn a_good_file_gives_defaults_where_silent() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.node.name, "lb1");
        assert_eq!(c.node.api_socket, PathBuf::from("/run/lb/lb1.sock"));
        assert_eq!(c.node.pin_dir, PathBuf::from("/sys/fs/bpf/lb/lb1"));
        assert_eq!(c.interfaces[0].xdp_mode, XdpModeName::Skb);
        assert_eq!(c.sizes.conn_table_size, 4096);
        assert_eq!(c.sizes.maglev_max_size, 16_777_213);
        assert_eq!(c.sizes.max_services, 1024);
        let (key, svc) = c.desired.services.iter().next().unwrap();
        assert_eq!(key.to_string(), "tcp/198.18.0.100:80");
        let b: Vec<_> = svc.backends.values().collect();
        assert_eq!(b[0].mac, Some([2, 0x1b, 0, 0, 0, 0x0b]));
        assert_eq!((b[0].weight, b[0].drain), (1, false));
        assert_eq!((b[1].weight, b[1].drain, b[1].mac), (3, true, None));
    }

    fn error_of(text: &str) -> ConfigError {
        parse(text).expect_err("should not parse")
    }

    #[test]
    fn an_encapsulating_service_needs_an_outer_source_of_each_backends_family() {
        let head = "[node]\nname = \"lb1\"\n\n[dataplane]\ninterfaces = [{ name = \"eth0\" }]\n";
        let svc = "\n[[service]]\nvip = \"198.18.0.100\"\nport = 80\nprotocol = \"tcp\"\nforward = \"gue\"\n\
                   backend = [{ address = \"198.18.5.1\" }, { address = \"2001:db8:5::1\" }]\n";
        let c = parse(&format!(
            "{head}encap_source_v4 = \"198.18.0.2\"\nencap_source_v6 = \"2001:db8::2\"\n\
             gue_port = 7000\nencap_mtu = 1400\n{svc}"
        ))
        .unwrap();
        let (_, spec) = c.desired.services.iter().next().unwrap();
        assert_eq!(spec.config.forward, Forward::Gue);
        assert_eq!(c.encap.source_v4, Some("198.18.0.2".parse().unwrap()));
        assert_eq!((c.encap.gue_port(), c.encap.path_mtu), (7000, Some(1400)));
        // Without the IPv6 source, the IPv6 backend's line says what to set.
        let e = error_of(&format!("{head}encap_source_v4 = \"198.18.0.2\"\n{svc}"));
        assert_eq!((e.line, e.column), (13, 40), "{e}");
        assert!(e.message.contains("set [dataplane] encap_source_v6"), "{e}");
        // The families mix only when encapsulated.
        let e = error_of(&format!(
            "{head}encap_source_v4 = \"198.18.0.2\"\nencap_source_v6 = \"2001:db8::2\"\n{}",
            svc.replace("forward = \"gue\"\n", "")
        ));
        assert!(e.message.contains("not of the same family"), "{e}");
        let e = error_of(&format!("{head}{}", svc.replace("\"gue\"", "\"vxlan\"")));
        assert!(
            e.message
                .contains("forward: `vxlan` is not a forwarding mode: l2, ipip or gue"),
            "{e}"
        );
        let e = error_of(&format!("{head}encap_source_v4 = \"127.0.0.1\"\n"));
        assert!(e.message.contains("dataplane.encap_source_v4: 127.0.0.1 cannot be an outer source: it is a loopback address"), "{e}");
    }

    #[test]
    fn idle_timeouts_are_read_and_refused_out_of_range_at_their_line() {
        let c = parse(&GOOD.replace(
            "conn_table_size = 4096",
            "conn_table_size = 4096\ntcp_idle_timeout_s = 3600\nudp_idle_timeout_s = 30",
        ))
        .unwrap();
        assert_eq!(
            (c.sizes.tcp_idle_timeout_s, c.sizes.udp_idle_timeout_s),
            (3600, 30)
        );
        let d = parse(GOOD).unwrap();
        assert_eq!(
            (d.sizes.tcp_idle_timeout_s, d.sizes.udp_idle_timeout_s),
            (900, 300)
        );
        for (field, v) in [("tcp_idle_timeout_s", 0), ("udp_idle_timeout_s", 604_801)] {
            let e = error_of(&GOOD.replace(
                "conn_table_size = 4096",
                &format!("conn_table_size = 4096\n{field} = {v}"),
            ));
            assert_eq!(e.line, 8, "{e}");
            assert!(
                e.message.contains(&format!(
                    "dataplane.{field}: {v} must be 1..=604800 (seconds)"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn the_ipv6_connection_table_is_sized_like_the_ipv4_one_unless_set() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.sizes.v6_conn_table_size(), 4096);
        let c = parse(&GOOD.replace(
            "conn_table_size = 4096",
            "conn_table_size = 4096\nconn_table_size_v6 = 1024",
        ))
        .unwrap();
        assert_eq!(
            (c.sizes.conn_table_size, c.sizes.v6_conn_table_size()),
            (4096, 1024)
        );
        let e = error_of(&GOOD.replace(
            "conn_table_size = 4096",
            "conn_table_size = 4096\nconn_table_size_v6 = 0",
        ));
        assert_eq!(e.line, 8, "{e}");
        assert!(
            e.message
                .contains("dataplane.conn_table_size_v6: 0 must be 1..=16777216"),
            "{e}"
        );
    }

    #[test]
    fn limits_beyond_the_data_plane_are_refused_at_their_line_or_service() {
        let e = error_of(&GOOD.replace("conn_table_size = 4096", "conn_table_size = 16777217"));
        assert_eq!(e.line, 7, "{e}");
        assert!(
            e.message
                .contains("dataplane.conn_table_size: 16777217 must be 1..=16777216"),
            "{e}"
        );
        parse(&GOOD.replace("conn_table_size = 4096", "conn_table_size = 16777216")).unwrap();
        let e = error_of(&GOOD.replace("conn_table_size = 4096", "max_services = 65537"));
        assert!(
            e.message.contains("max_services: 65537 must be 1..=65536"),
            "{e}"
        );
        // 10,000 services are accepted with max_services raised, refused without.
        let many: String = (0..10_000)
            .map(|i| {
                format!(
                    "\n[[service]]\nvip = \"198.18.{}.{}\"\nport = 80\nprotocol = \"tcp\"\n",
                    100 + i / 250,
                    i % 250
                )
            })
            .collect();
        let head = "[node]\nname = \"lb1\"\n\n[dataplane]\ninterfaces = [{ name = \"eth0\" }]\n";
        let e = error_of(&format!("{head}{many}"));
        assert!(
            e.message
                .contains("service number 1025, but dataplane.max_services is 1024"),
            "{e}"
        );
        assert_eq!(e.line, 6 + 1024 * 5 + 1, "{e}");
        let c = parse(&format!("{head}max_services = 10000\n{many}")).unwrap();
        assert_eq!(c.desired.services.len(), 10_000);
        // The ring: a table pinned large enough that two slots do not fit.
        let e = error_of(
            &GOOD
                .replace(
                    "conn_table_size = 4096",
                    "ring_cells = 100000\nmaglev_max_size = 65537",
                )
                .replace("port = 80", "port = 80\nmaglev_size = 65537"),
        );
        assert!(e.message.contains("dataplane.ring_cells is 100000"), "{e}");
    }

    #[test]
    fn a_typo_in_a_field_name_is_located() {
        let e = error_of(&GOOD.replace("weight = 3", "wieght = 3"));
        assert_eq!(e.line, 20, "{e}");
        assert!(e.message.contains("unknown field `wieght`"), "{e}");
        assert!(e.to_string().starts_with("lbd.toml:20:"), "{e}");
    }

    #[test]
    fn bad_values_are_located_and_named() {
        let e = error_of(&GOOD.replace("\"198.18.0.12\"", "\"198.18.0.300\""));
        assert_eq!(e.line, 19, "{e}");
        let e = error_of(&GOOD.replace("02:1b:00:00:00:0b", "02:1b:00"));
        assert_eq!(e.line, 16, "{e}");
        assert!(e.message.contains("not a MAC"), "{e}");
        let e = error_of(&GOOD.replace("protocol = \"tcp\"", "protocol = \"sctp\""));
        assert_eq!(e.line, 12, "{e}");
        let e = error_of(&GOOD.replace("port = 80", "port = 80\nmaglev_size = 65536"));
        assert_eq!(e.line, 12, "{e}");
        assert!(
            e.message.contains("maglev_size: 65536 is not a prime"),
            "{e}"
        );
        let e = error_of(&GOOD.replace("\"198.18.0.12\"", "\"2001:db8::12\""));
        assert!(e.message.contains("not of the same family"), "{e}");
        let e = error_of(&GOOD.replace("\"198.18.0.12\"", "\"198.18.0.11\""));
        assert!(e.message.contains("listed twice"), "{e}");
        let e = error_of(&GOOD.replace("name = \"lb1\"", "name = \"lb 1\""));
        assert_eq!(e.line, 3, "{e}");
    }

    #[test]
    fn missing_sections_say_what_to_add() {
        let e = error_of("[node]\nname = \"x\"\n");
        assert!(e.message.contains("[dataplane]"), "{e}");
        let e = error_of("[dataplane]\ninterfaces = [{ name = \"eth0\" }]\n");
        assert!(e.message.contains("node"), "{e}");
    }

    #[test]
    fn apply_files_may_be_full_configs_or_services_only() {
        let full = parse_services(Path::new("x"), GOOD).unwrap();
        assert_eq!(full, parse(GOOD).unwrap().desired);
        let only = parse_services(
            Path::new("x"),
            "[[service]]\nvip = \"198.18.0.1\"\nprotocol = \"udp\"\n",
        )
        .unwrap();
        assert_eq!(
            only.services.keys().next().unwrap().to_string(),
            "udp/198.18.0.1:*"
        );
    }

    #[test]
    fn a_cluster_section_needs_a_group_and_a_key() {
        let with = |extra: &str| parse(&format!("{GOOD}\n[cluster]\nid = \"198.18.0.2\"\n{extra}"));
        let c = with("group = \"239.1.1.1:7400\"\nnodes = 3\nkey = \"0123456789abcdef\"\npreferred = [\"198.18.0.100\"]")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.port, 7400);
        assert_eq!(c.timeout, std::time::Duration::from_millis(300));
        assert_eq!(c.vip_interface, "eth0");
        assert_eq!((c.nodes, c.quorum), (3, 2));
        let e = with("key = \"0123456789abcdef\"").unwrap_err();
        assert!(e.message.contains("group"), "{e}");
        let e = with("group = \"198.18.0.9:7400\"\nkey = \"0123456789abcdef\"").unwrap_err();
        assert!(e.message.contains("not a multicast"), "{e}");
        let e = with("group = \"239.1.1.1:7400\"\nkey = \"short\"").unwrap_err();
        assert!(e.message.contains("16 characters"), "{e}");
        let e = with(
            "group = \"239.1.1.1:7400\"\nnodes = 3\nkey = \"0123456789abcdef\"\ntimeout_ms = 50",
        )
        .unwrap_err();
        assert!(e.message.contains("timeout_ms"), "{e}");
        assert_eq!(e.line, GOOD.lines().count() + 7, "{e}");
    }

    #[test]
    fn the_quorum_is_a_majority_and_two_nodes_must_choose() {
        let with = |extra: &str| {
            parse(&format!(
                "{GOOD}\n[cluster]\nid = \"198.18.0.2\"\nkey = \"0123456789abcdef\"\n{extra}"
            ))
        };
        let sizes = |extra: &str| {
            let c = with(extra).unwrap().cluster.unwrap();
            (c.nodes, c.quorum)
        };
        let peers = |n: usize| {
            let list: Vec<String> = (0..n)
                .map(|i| format!("\"198.18.0.{}:7400\"", 3 + i))
                .collect();
            format!("peers = [{}]", list.join(", "))
        };
        assert_eq!(sizes(&peers(2)), (3, 2));
        assert_eq!(sizes(&peers(4)), (5, 3));
        assert_eq!(sizes(&format!("{}\nquorum = 1", peers(1))), (2, 1));
        assert_eq!(sizes(&format!("{}\nquorum = 2", peers(1))), (2, 2));
        assert_eq!(sizes("group = \"239.1.1.1:7400\"\nquorum = 1"), (1, 1));
        assert_eq!(sizes("group = \"239.1.1.1:7400\"\nnodes = 4"), (4, 3));
        for (extra, field) in [
            (peers(1), "cluster.quorum"),
            ("group = \"239.1.1.1:7400\"".to_string(), "cluster.nodes"),
            (
                "group = \"239.1.1.1:7400\"\nnodes = 2".to_string(),
                "cluster.quorum",
            ),
            (format!("{}\nquorum = 4", peers(2)), "cluster.quorum"),
            (format!("{}\nquorum = 0", peers(2)), "cluster.quorum"),
            (format!("{}\nnodes = 2", peers(2)), "cluster.nodes"),
        ] {
            let e = with(&extra).unwrap_err();
            assert!(e.message.contains(field), "{extra}: {e}");
        }
    }

    #[test]
    fn a_reload_names_the_sections_that_wait_for_a_restart_and_not_the_services() {
        let old = parse(GOOD).unwrap();
        let services = parse(&GOOD.replace("weight = 3", "weight = 4")).unwrap();
        assert!(
            old.restart_needed(&services).is_empty(),
            "services reload in place"
        );
        let sized =
            parse(&GOOD.replace("conn_table_size = 4096", "conn_table_size = 8192")).unwrap();
        assert_eq!(old.restart_needed(&sized), ["[dataplane]"]);
        let mut renamed = old.clone();
        renamed.node.name = "other".into();
        assert_eq!(old.restart_needed(&renamed), ["[node]"]);
    }

    #[test]
    fn startup_sync_is_peer_by_default_and_a_bad_value_names_the_field_and_line() {
        let with = |extra: &str| {
            parse(&format!(
                "{GOOD}\n[cluster]\nid = \"198.18.0.2\"\nkey = \"0123456789abcdef\"\n\
                 group = \"239.1.1.1:7400\"\nnodes = 5\n{extra}"
            ))
        };
        let c = with("").unwrap().cluster.unwrap();
        assert_eq!(c.startup_sync, StartupSync::Peer);
        assert_eq!(c.startup_sync.peers_needed(c.quorum), 1);
        let c = with("startup_sync = \"quorum\"").unwrap().cluster.unwrap();
        assert_eq!(
            c.startup_sync.peers_needed(c.quorum),
            2,
            "quorum 3 of 5: 2 peers"
        );
        let e = with("startup_sync = \"all\"").unwrap_err();
        assert!(e.message.contains("cluster.startup_sync"), "{e}");
        assert_eq!(e.line, GOOD.lines().count() + 7, "{e}");
    }

    #[test]
    fn spm_settings_parse_and_bad_ones_name_their_field() {
        let spm = r#"
[service.spm]
id = "web"
rule = "topology"
epoch_policy = "stateful"
epoch_resteer = true
topology = [{ subnet = "203.0.113.0/25", sphere = "east" }]
"#;
        let text = GOOD.replace("weight = 3", "weight = 3\nsphere = \"east\"") + spm;
        let c = parse(&text).unwrap();
        let svc = c.desired.services.values().next().unwrap();
        assert_eq!(svc.spm.id.as_deref(), Some("web"));
        assert_eq!(svc.spm.rule, crate::spm::RuleName::Topology);
        assert_eq!(svc.spm.epoch_policy, crate::spm::EpochPolicy::Stateful);
        assert!(svc.config.epoch_resteer);
        assert_eq!(
            svc.spm.topology,
            vec![("203.0.113.0".parse().unwrap(), 25, "east".to_string())]
        );
        assert_eq!(svc.spm.spheres.len(), 1);
        let e = error_of(&text.replace("\"topology\"", "\"nearest\""));
        assert!(e.message.contains("spm.rule: `nearest`"), "{e}");
        assert_eq!(
            e.line,
            GOOD.lines().count() + 3,
            "{e}: the [service.spm] line"
        );
        let e = error_of(&text.replace("203.0.113.0/25", "203.0.113.0"));
        assert!(e.message.contains("spm.topology.subnet"), "{e}");
        let e = error_of(&text.replace("stateful", "sticky"));
        assert!(e.message.contains("spm.epoch_policy"), "{e}");
    }

    #[test]
    fn steering_needs_low_below_high() {
        let ok = parse(&format!(
            "{GOOD}\n[service.steering]\nhigh = 800\nlow = 600\n"
        ))
        .unwrap();
        let marks = ok
            .desired
            .services
            .values()
            .next()
            .unwrap()
            .steering
            .unwrap();
        assert_eq!(
            (marks.scale, marks.min_backends, marks.period_ms),
            (1000, 1, 1000)
        );
        let e = error_of(&format!(
            "{GOOD}\n[service.steering]\nhigh = 600\nlow = 800\n"
        ));
        assert!(
            e.message.contains("steering.low (800) must be below"),
            "{e}"
        );
        assert_eq!(e.line, GOOD.lines().count() + 2, "{e}");
    }
}
