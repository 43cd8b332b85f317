//! The file as written: strict serde shapes (unknown fields are errors), each
//! section with its span so that errors can point at it.

use std::{
    net::{IpAddr, SocketAddr},
    path::PathBuf,
};

use serde::{de, Deserialize, Deserializer};
use toml::Spanned;

use super::XdpModeName;
use crate::model::{parse_mac, Proto};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct File {
    pub(super) node: Spanned<NodeSection>,
    #[serde(default)]
    pub(super) dataplane: Option<Spanned<DataplaneSection>>,
    #[serde(default)]
    pub(super) service: Vec<Spanned<ServiceSection>>,
    #[serde(default)]
    pub(super) cluster: Option<Spanned<ClusterSection>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ClusterSection {
    pub(super) id: IpAddr,
    pub(super) group: Option<SocketAddr>,
    #[serde(default)]
    pub(super) peers: Vec<SocketAddr>,
    pub(super) port: Option<u16>,
    pub(super) key: Option<Spanned<String>>,
    pub(super) key_file: Option<PathBuf>,
    #[serde(default = "default_interval")]
    pub(super) interval_ms: Spanned<u64>,
    pub(super) timeout_ms: Option<Spanned<u64>>,
    pub(super) orphan_expiry_s: Option<u64>,
    pub(super) nodes: Option<Spanned<usize>>,
    pub(super) quorum: Option<Spanned<usize>>,
    #[serde(default)]
    pub(super) preferred: Vec<IpAddr>,
    pub(super) vip_interface: Option<String>,
    pub(super) script: Option<PathBuf>,
    #[serde(default = "default_script_timeout")]
    pub(super) script_timeout_ms: u64,
    pub(super) startup_sync: Option<Spanned<String>>,
}

pub(super) fn default_interval() -> Spanned<u64> {
    Spanned::new(0..0, 100)
}

pub(super) fn default_script_timeout() -> u64 {
    5000
}

/// A services-only file, for `lbctl apply`: a full lbd config is accepted too and
/// its other sections are ignored.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServicesFile {
    #[serde(default)]
    #[allow(dead_code)] // Read so that a full lbd config applies as it is.
    pub(super) node: Option<toml::Value>,
    #[serde(default)]
    #[allow(dead_code)]
    pub(super) dataplane: Option<toml::Value>,
    #[serde(default)]
    pub(super) service: Vec<Spanned<ServiceSection>>,
    #[serde(default)]
    #[allow(dead_code)]
    pub(super) cluster: Option<toml::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NodeSection {
    pub(super) name: Spanned<String>,
    pub(super) api_socket: Option<PathBuf>,
    pub(super) metrics_listen: Option<SocketAddr>,
    pub(super) state_dir: Option<PathBuf>,
    pub(super) pin_dir: Option<PathBuf>,
    pub(super) registry_listen: Option<SocketAddr>,
    pub(super) registry_key: Option<Spanned<String>>,
    pub(super) registry_key_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InterfaceSection {
    pub(super) name: String,
    #[serde(default)]
    pub(super) xdp_mode: XdpModeName,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DataplaneSection {
    #[serde(default)]
    pub(super) interfaces: Vec<InterfaceSection>,
    pub(super) max_services: Option<Spanned<u32>>,
    pub(super) max_backends: Option<Spanned<u32>>,
    pub(super) ring_cells: Option<Spanned<u32>>,
    pub(super) maglev_min_size: Option<Spanned<u32>>,
    pub(super) maglev_max_size: Option<Spanned<u32>>,
    pub(super) conn_table_size: Option<Spanned<u32>>,
    pub(super) conn_table_size_v6: Option<Spanned<u32>>,
    pub(super) tcp_idle_timeout_s: Option<Spanned<u32>>,
    pub(super) udp_idle_timeout_s: Option<Spanned<u32>>,
    /// Encapsulation (services with `forward = "ipip"` or `"gue"`): this node's
    /// outer source per family, the backends' GUE port, the paths' MTU.
    pub(super) encap_source_v4: Option<Spanned<std::net::Ipv4Addr>>,
    pub(super) encap_source_v6: Option<Spanned<std::net::Ipv6Addr>>,
    pub(super) gue_port: Option<Spanned<u16>>,
    pub(super) encap_mtu: Option<Spanned<u16>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ServiceSection {
    pub(super) vip: IpAddr,
    #[serde(default)]
    pub(super) port: u16,
    pub(super) protocol: Proto,
    pub(super) maglev_size: Option<Spanned<u32>>,
    #[serde(default)]
    pub(super) pass_irregular: bool,
    pub(super) forward: Option<Spanned<String>>,
    #[serde(default)]
    pub(super) backend: Vec<Spanned<BackendSection>>,
    pub(super) check: Option<Spanned<CheckSection>>,
    pub(super) spm: Option<Spanned<SpmSection>>,
    pub(super) steering: Option<Spanned<SteeringSection>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SteeringSection {
    #[serde(default = "default_scale")]
    pub(super) scale: u64,
    pub(super) high: u64,
    pub(super) low: u64,
    #[serde(default = "one_usize")]
    pub(super) min_backends: usize,
    #[serde(default = "default_steering_period")]
    pub(super) period_ms: u64,
}

pub(super) fn default_scale() -> u64 {
    1000
}
pub(super) fn one_usize() -> usize {
    1
}
pub(super) fn default_steering_period() -> u64 {
    1000
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SpmSection {
    pub(super) id: Option<String>,
    pub(super) version: Option<String>,
    pub(super) rule: Option<String>,
    pub(super) epoch_policy: Option<String>,
    #[serde(default)]
    pub(super) epoch_resteer: bool,
    #[serde(default)]
    pub(super) redirect: bool,
    #[serde(default)]
    pub(super) topology: Vec<TopologySection>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct TopologySection {
    pub(super) subnet: String,
    pub(super) sphere: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct CheckSection {
    /// tcp | http | udp
    pub(super) kind: String,
    /// Port to probe; default: the service's port.
    pub(super) port: Option<u16>,
    pub(super) path: Option<String>,
    pub(super) status: Option<u16>,
    pub(super) send: Option<String>,
    pub(super) expect: Option<String>,
    #[serde(default = "default_check_interval")]
    pub(super) interval_ms: u64,
    #[serde(default = "default_check_timeout")]
    pub(super) timeout_ms: u64,
    #[serde(default = "default_rise")]
    pub(super) rise: u32,
    #[serde(default = "default_fall")]
    pub(super) fall: u32,
}

pub(super) fn default_check_interval() -> u64 {
    1000
}
pub(super) fn default_check_timeout() -> u64 {
    500
}
pub(super) fn default_rise() -> u32 {
    2
}
pub(super) fn default_fall() -> u32 {
    3
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BackendSection {
    pub(super) address: IpAddr,
    #[serde(default, deserialize_with = "de_mac")]
    pub(super) mac: Option<[u8; 6]>,
    #[serde(default = "one")]
    pub(super) weight: u32,
    #[serde(default)]
    pub(super) drain: bool,
    pub(super) sphere: Option<String>,
}

pub(super) fn one() -> u32 {
    1
}

pub(super) fn de_mac<'de, D: Deserializer<'de>>(d: D) -> Result<Option<[u8; 6]>, D::Error> {
    let s = String::deserialize(d)?;
    parse_mac(&s).map(Some).ok_or_else(|| {
        de::Error::custom(format!("`{s}` is not a MAC address like 02:00:00:00:00:01"))
    })
}
