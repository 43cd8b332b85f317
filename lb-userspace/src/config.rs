//! The daemon's TOML configuration. Parsing is strict (unknown fields are errors, so a
//! typo cannot silently become a default) and every error names the file, line and
//! field. The file's services become a [`Desired`]; the rest says where the daemon
//! runs and how the data plane is sized.

use std::{
    collections::BTreeMap,
    fmt,
    net::{IpAddr, SocketAddr},
    ops::Range,
    path::{Path, PathBuf},
};

use serde::{de, Deserialize, Deserializer, Serialize};
use toml::Spanned;

use crate::{
    desired::{BackendSpec, Desired, ServiceSpec},
    dataplane::loader::LoadOptions,
    maglev::is_prime,
    model::{parse_mac, CheckConfig, Probe, Proto, ServiceConfig, ServiceKey},
};

pub const DEFAULT_PATH: &str = "/etc/lb/lbd.toml";
pub const DEFAULT_METRICS: &str = "127.0.0.1:9469";

/// A configuration error, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub path: PathBuf,
    /// 1-based; 0 when the error is about the file as a whole.
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.path.display(), self.message)
        } else {
            write!(
                f,
                "{}:{}:{}: {}",
                self.path.display(),
                self.line,
                self.column,
                self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

fn locate(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    pub path: PathBuf,
    pub node: NodeConfig,
    pub interfaces: Vec<Interface>,
    pub max_services: u32,
    pub maglev_max_size: u32,
    pub conn_table_size: u32,
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
    /// VIPs this node prefers to serve (none: a hot spare).
    pub preferred: Vec<IpAddr>,
    /// Interface the VIPs are added to and announced on.
    pub vip_interface: String,
    /// Run with `acquire|release VIP` after an acquire and before a release.
    pub script: Option<PathBuf>,
    pub script_timeout: std::time::Duration,
}

impl Config {
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions {
            max_services: self.max_services,
            maglev_max_size: self.maglev_max_size,
            conn_table_size: self.conn_table_size,
            pin_dir: Some(self.node.pin_dir.clone()),
        }
    }
}

// ---- the file as written -------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    node: Spanned<NodeSection>,
    #[serde(default)]
    dataplane: Option<Spanned<DataplaneSection>>,
    #[serde(default)]
    service: Vec<Spanned<ServiceSection>>,
    #[serde(default)]
    cluster: Option<Spanned<ClusterSection>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterSection {
    id: IpAddr,
    group: Option<SocketAddr>,
    #[serde(default)]
    peers: Vec<SocketAddr>,
    port: Option<u16>,
    key: Option<Spanned<String>>,
    key_file: Option<PathBuf>,
    #[serde(default = "default_interval")]
    interval_ms: Spanned<u64>,
    timeout_ms: Option<Spanned<u64>>,
    orphan_expiry_s: Option<u64>,
    #[serde(default)]
    preferred: Vec<IpAddr>,
    vip_interface: Option<String>,
    script: Option<PathBuf>,
    #[serde(default = "default_script_timeout")]
    script_timeout_ms: u64,
}

fn default_interval() -> Spanned<u64> {
    Spanned::new(0..0, 100)
}

fn default_script_timeout() -> u64 {
    5000
}

/// A services-only file, for `lbctl apply`: a full lbd config is accepted too and
/// its other sections are ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServicesFile {
    #[serde(default)]
    #[allow(dead_code)] // Read so that a full lbd config applies as it is.
    node: Option<toml::Value>,
    #[serde(default)]
    #[allow(dead_code)]
    dataplane: Option<toml::Value>,
    #[serde(default)]
    service: Vec<Spanned<ServiceSection>>,
    #[serde(default)]
    #[allow(dead_code)]
    cluster: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NodeSection {
    name: Spanned<String>,
    api_socket: Option<PathBuf>,
    metrics_listen: Option<SocketAddr>,
    state_dir: Option<PathBuf>,
    pin_dir: Option<PathBuf>,
    registry_listen: Option<SocketAddr>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct InterfaceSection {
    name: String,
    #[serde(default)]
    xdp_mode: XdpModeName,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DataplaneSection {
    #[serde(default)]
    interfaces: Vec<InterfaceSection>,
    max_services: Option<Spanned<u32>>,
    maglev_max_size: Option<Spanned<u32>>,
    conn_table_size: Option<Spanned<u32>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ServiceSection {
    vip: IpAddr,
    #[serde(default)]
    port: u16,
    protocol: Proto,
    maglev_size: Option<Spanned<u32>>,
    #[serde(default)]
    pass_irregular: bool,
    #[serde(default)]
    backend: Vec<Spanned<BackendSection>>,
    check: Option<Spanned<CheckSection>>,
    spm: Option<Spanned<SpmSection>>,
    steering: Option<Spanned<SteeringSection>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SteeringSection {
    #[serde(default = "default_scale")]
    scale: u64,
    high: u64,
    low: u64,
    #[serde(default = "one_usize")]
    min_backends: usize,
    #[serde(default = "default_steering_period")]
    period_ms: u64,
}

fn default_scale() -> u64 {
    1000
}
fn one_usize() -> usize {
    1
}
fn default_steering_period() -> u64 {
    1000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SpmSection {
    id: Option<String>,
    version: Option<String>,
    rule: Option<String>,
    epoch_policy: Option<String>,
    #[serde(default)]
    epoch_resteer: bool,
    #[serde(default)]
    redirect: bool,
    #[serde(default)]
    topology: Vec<TopologySection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TopologySection {
    subnet: String,
    sphere: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckSection {
    /// tcp | http | udp
    kind: String,
    /// Port to probe; default: the service's port.
    port: Option<u16>,
    path: Option<String>,
    status: Option<u16>,
    send: Option<String>,
    expect: Option<String>,
    #[serde(default = "default_check_interval")]
    interval_ms: u64,
    #[serde(default = "default_check_timeout")]
    timeout_ms: u64,
    #[serde(default = "default_rise")]
    rise: u32,
    #[serde(default = "default_fall")]
    fall: u32,
}

fn default_check_interval() -> u64 {
    1000
}
fn default_check_timeout() -> u64 {
    500
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BackendSection {
    address: IpAddr,
    #[serde(default, deserialize_with = "de_mac")]
    mac: Option<[u8; 6]>,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    drain: bool,
    sphere: Option<String>,
}

fn one() -> u32 {
    1
}

fn de_mac<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 6]>, D::Error> {
    let s = String::deserialize(d)?;
    parse_mac(&s).map(Some).ok_or_else(|| {
        de::Error::custom(format!("`{s}` is not a MAC address like 02:00:00:00:00:01"))
    })
}

// ---- from the file to the model ------------------------------------------------

struct Ctx<'a> {
    path: &'a Path,
    text: &'a str,
}

impl Ctx<'_> {
    fn err(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let (line, column) = locate(self.text, span.start);
        ConfigError {
            path: self.path.to_path_buf(),
            line,
            column,
            message: message.into(),
        }
    }

    fn toml_err(&self, e: toml::de::Error) -> ConfigError {
        let message = e.message().to_string();
        match e.span() {
            Some(span) => self.err(span, message),
            None => ConfigError {
                path: self.path.to_path_buf(),
                line: 0,
                column: 0,
                message,
            },
        }
    }
}

fn services(
    ctx: &Ctx,
    sections: Vec<Spanned<ServiceSection>>,
    max_size: u32,
) -> Result<Desired, ConfigError> {
    let mut out = BTreeMap::new();
    for section in sections {
        let span = section.span();
        let s = section.into_inner();
        let key = ServiceKey {
            addr: s.vip,
            port: s.port,
            proto: s.protocol,
        };
        let mut config = ServiceConfig {
            pass_irregular: s.pass_irregular,
            ..ServiceConfig::default()
        };
        if let Some(size) = s.maglev_size {
            let v = *size.get_ref();
            if !is_prime(v) {
                return Err(ctx.err(
                    size.span(),
                    format!("maglev_size: {v} is not a prime (65537 is the default)"),
                ));
            }
            if v > max_size {
                return Err(ctx.err(
                    size.span(),
                    format!("maglev_size: {v} exceeds dataplane.maglev_max_size {max_size}"),
                ));
            }
            config.maglev_size = v;
        }
        if config.maglev_size > max_size {
            config.maglev_size = max_size;
        }
        let mut spm = crate::spm::Settings::default();
        if let Some(section) = s.spm {
            let sspan = section.span();
            let section = section.into_inner();
            spm.id = section.id;
            if let Some(v) = section.version {
                spm.version = v;
            }
            if let Some(r) = section.rule {
                spm.rule = serde_json::from_value(serde_json::Value::String(r.clone()))
                    .map_err(|_| {
                        ctx.err(
                            sspan.clone(),
                            format!(
                                "spm.rule: `{r}` is not one of plain, preselect, data, source, topology"
                            ),
                        )
                    })?;
            }
            if let Some(p) = section.epoch_policy {
                spm.epoch_policy = serde_json::from_value(serde_json::Value::String(p.clone()))
                    .map_err(|_| {
                        ctx.err(
                            sspan.clone(),
                            format!("spm.epoch_policy: `{p}` is not one of stateful, stateless"),
                        )
                    })?;
            }
            config.epoch_resteer = section.epoch_resteer;
            spm.redirect = section.redirect;
            for t in section.topology {
                let parsed = t.subnet.split_once('/').and_then(|(a, p)| {
                    let a: IpAddr = a.parse().ok()?;
                    let p: u8 = p.parse().ok()?;
                    (p <= if a.is_ipv4() { 32 } else { 128 }).then_some((a, p))
                });
                let Some((net, prefix)) = parsed else {
                    return Err(ctx.err(
                        sspan,
                        format!(
                            "spm.topology.subnet: `{}` is not an address/prefix such as 203.0.113.0/25",
                            t.subnet
                        ),
                    ));
                };
                if net.is_ipv4() != s.vip.is_ipv4() {
                    return Err(ctx.err(
                        sspan,
                        format!(
                            "spm.topology.subnet: {} is not of the same family as vip {}",
                            t.subnet, s.vip
                        ),
                    ));
                }
                spm.topology.push((net, prefix, t.sphere));
            }
            if spm.rule == crate::spm::RuleName::Topology && spm.topology.is_empty() {
                return Err(ctx.err(
                    sspan,
                    "spm.topology: the topology rule needs subnet rules, e.g. \
                     topology = [{ subnet = \"203.0.113.0/25\", sphere = \"east\" }]",
                ));
            }
        }
        let steering = match s.steering {
            None => None,
            Some(section) => {
                let sspan = section.span();
                let t = section.into_inner();
                if t.scale == 0 || t.period_ms == 0 {
                    return Err(ctx.err(sspan, "steering: scale and period_ms must be positive"));
                }
                if t.low >= t.high {
                    return Err(ctx.err(
                        sspan,
                        format!(
                            "steering.low ({}) must be below steering.high ({}): the gap is the hysteresis",
                            t.low, t.high
                        ),
                    ));
                }
                Some(crate::watermark::Marks {
                    scale: t.scale,
                    high: t.high,
                    low: t.low,
                    min_backends: t.min_backends,
                    period_ms: t.period_ms,
                })
            }
        };
        let mut backends = BTreeMap::new();
        for b in s.backend {
            let bspan = b.span();
            let b = b.into_inner();
            if b.address.is_ipv4() != s.vip.is_ipv4() {
                return Err(ctx.err(
                    bspan,
                    format!(
                        "backend.address: {} is not of the same family as vip {}",
                        b.address, s.vip
                    ),
                ));
            }
            let spec = BackendSpec {
                mac: b.mac,
                weight: b.weight,
                drain: b.drain,
            };
            if let Some(sphere) = b.sphere {
                spm.spheres.insert(b.address, sphere);
            }
            if backends.insert(b.address, spec).is_some() {
                return Err(ctx.err(
                    bspan,
                    format!("backend.address: {} is listed twice in {key}", b.address),
                ));
            }
        }
        let check = match s.check {
            None => None,
            Some(c) => {
                let cspan = c.span();
                let c = c.into_inner();
                let probe = match c.kind.as_str() {
                    "tcp" => Probe::Tcp,
                    "http" => Probe::Http {
                        path: c.path.unwrap_or_else(|| "/".into()),
                        status: c.status.unwrap_or(200),
                    },
                    "udp" => Probe::Udp {
                        send: c.send.unwrap_or_else(|| "ping".into()),
                        expect: c.expect,
                    },
                    other => {
                        return Err(ctx.err(
                            cspan,
                            format!("check.kind: `{other}` is not one of tcp, http, udp"),
                        ));
                    }
                };
                let port = c.port.unwrap_or(key.port);
                if port == 0 {
                    return Err(ctx.err(
                        cspan,
                        "check.port: the service has no port; say which port to probe",
                    ));
                }
                if c.interval_ms == 0 || c.timeout_ms == 0 || c.rise == 0 || c.fall == 0 {
                    return Err(ctx.err(
                        cspan,
                        "check: interval_ms, timeout_ms, rise and fall must be positive",
                    ));
                }
                Some(CheckConfig {
                    probe,
                    port,
                    interval: std::time::Duration::from_millis(c.interval_ms),
                    timeout: std::time::Duration::from_millis(c.timeout_ms),
                    rise: c.rise,
                    fall: c.fall,
                })
            }
        };
        if out
            .insert(
                key,
                ServiceSpec {
                    config,
                    backends,
                    check,
                    spm,
                    steering,
                },
            )
            .is_some()
        {
            return Err(ctx.err(span, format!("service: {key} is defined twice")));
        }
    }
    Ok(Desired { services: out })
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
        let defaults = LoadOptions::default();
        let (interfaces, max_services, maglev_max_size, conn_table_size) =
            match file.dataplane {
                None => return Err(ctx.err(
                    node_span,
                    "dataplane: missing; add [dataplane] with interfaces = [{ name = \"eth0\" }]",
                )),
                Some(dp) => {
                    let span = dp.span();
                    let dp = dp.into_inner();
                    if dp.interfaces.is_empty() {
                        return Err(ctx.err(
                            span,
                            "dataplane.interfaces: name at least one interface to attach to",
                        ));
                    }
                    let max_services = sized(
                        &ctx,
                        dp.max_services,
                        defaults.max_services,
                        "max_services",
                        |v| {
                            (v == 0 || v > lb_common::MAX_VIPS)
                                .then(|| format!("must be 1..={}", lb_common::MAX_VIPS))
                        },
                    )?;
                    let maglev_max_size = sized(
                        &ctx,
                        dp.maglev_max_size,
                        defaults.maglev_max_size,
                        "maglev_max_size",
                        |v| (!is_prime(v)).then(|| format!("{v} is not a prime")),
                    )?;
                    let conn_table_size = sized(
                        &ctx,
                        dp.conn_table_size,
                        defaults.conn_table_size,
                        "conn_table_size",
                        |v| (v == 0).then(|| "must be positive".to_string()),
                    )?;
                    let interfaces: Vec<Interface> = dp
                        .interfaces
                        .into_iter()
                        .map(|i| Interface {
                            name: i.name,
                            xdp_mode: i.xdp_mode,
                        })
                        .collect();
                    (interfaces, max_services, maglev_max_size, conn_table_size)
                }
            };
        let desired = services(&ctx, file.service, maglev_max_size)?;
        let cluster = match file.cluster {
            None => None,
            Some(c) => Some(cluster(&ctx, c, path, &interfaces)?),
        };
        if desired.services.len() > max_services as usize {
            return Err(ctx.err(
                node_span,
                format!(
                    "service: {} services but dataplane.max_services is {max_services}",
                    desired.services.len()
                ),
            ));
        }
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
                name,
            },
            interfaces,
            max_services,
            maglev_max_size,
            conn_table_size,
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

fn cluster(
    ctx: &Ctx,
    section: Spanned<ClusterSection>,
    path: &Path,
    interfaces: &[Interface],
) -> Result<ClusterConfig, ConfigError> {
    let span = section.span();
    let c = section.into_inner();
    if c.group.is_none() && c.peers.is_empty() {
        return Err(ctx.err(
            span,
            "cluster: set group (multicast address:port) or peers (unicast address:port list)",
        ));
    }
    if let Some(g) = c.group {
        if !g.ip().is_multicast() {
            return Err(ctx.err(
                span,
                format!("cluster.group: {} is not a multicast address", g.ip()),
            ));
        }
    }
    let key = match (c.key, c.key_file) {
        (Some(k), None) => {
            if k.get_ref().len() < 16 {
                return Err(ctx.err(k.span(), "cluster.key: use at least 16 characters"));
            }
            k.into_inner().into_bytes()
        }
        (None, Some(f)) => {
            let f = if f.is_relative() {
                path.parent().unwrap_or(Path::new(".")).join(f)
            } else {
                f
            };
            let k = std::fs::read(&f).map_err(|e| {
                ctx.err(
                    span.clone(),
                    format!("cluster.key_file: cannot read {}: {e}", f.display()),
                )
            })?;
            let k = String::from_utf8_lossy(&k).trim().as_bytes().to_vec();
            if k.len() < 16 {
                return Err(ctx.err(
                    span,
                    format!(
                        "cluster.key_file: {} holds fewer than 16 characters",
                        f.display()
                    ),
                ));
            }
            k
        }
        _ => {
            return Err(ctx.err(
                span,
                "cluster: set exactly one of key and key_file (the group's shared secret)",
            ))
        }
    };
    let interval = *c.interval_ms.get_ref();
    if interval == 0 {
        return Err(ctx.err(
            c.interval_ms.span(),
            "cluster.interval_ms: must be positive",
        ));
    }
    let timeout = match c.timeout_ms {
        None => 3 * interval,
        Some(t) if *t.get_ref() <= interval => {
            return Err(ctx.err(
                t.span(),
                format!("cluster.timeout_ms: must exceed interval_ms ({interval})"),
            ));
        }
        Some(t) => *t.get_ref(),
    };
    let port = c.port.or(c.group.map(|g| g.port())).unwrap_or(7400);
    Ok(ClusterConfig {
        id: c.id,
        group: c.group,
        peers: c.peers,
        port,
        key,
        interval: std::time::Duration::from_millis(interval),
        timeout: std::time::Duration::from_millis(timeout),
        orphan_expiry: c.orphan_expiry_s.map(std::time::Duration::from_secs),
        preferred: c.preferred,
        vip_interface: c
            .vip_interface
            .unwrap_or_else(|| interfaces[0].name.clone()),
        script: c.script,
        script_timeout: std::time::Duration::from_millis(c.script_timeout_ms),
    })
}

/// Parses the services of a file for `lbctl apply`.
pub fn parse_services(path: &Path, text: &str) -> Result<Desired, ConfigError> {
    let ctx = Ctx { path, text };
    let file: ServicesFile = toml::from_str(text).map_err(|e| ctx.toml_err(e))?;
    services(&ctx, file.service, u32::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        assert_eq!(c.conn_table_size, 4096);
        assert_eq!(c.maglev_max_size, 65537);
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
        let c = with("group = \"239.1.1.1:7400\"\nkey = \"0123456789abcdef\"\npreferred = [\"198.18.0.100\"]")
            .unwrap()
            .cluster
            .unwrap();
        assert_eq!(c.port, 7400);
        assert_eq!(c.timeout, std::time::Duration::from_millis(300));
        assert_eq!(c.vip_interface, "eth0");
        let e = with("key = \"0123456789abcdef\"").unwrap_err();
        assert!(e.message.contains("group"), "{e}");
        let e = with("group = \"198.18.0.9:7400\"\nkey = \"0123456789abcdef\"").unwrap_err();
        assert!(e.message.contains("not a multicast"), "{e}");
        let e = with("group = \"239.1.1.1:7400\"\nkey = \"short\"").unwrap_err();
        assert!(e.message.contains("16 characters"), "{e}");
        let e = with("group = \"239.1.1.1:7400\"\nkey = \"0123456789abcdef\"\ntimeout_ms = 50")
            .unwrap_err();
        assert!(e.message.contains("timeout_ms"), "{e}");
        assert_eq!(e.line, GOOD.lines().count() + 6, "{e}");
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
