//! The management API's messages (version 1), shared by the daemon's server and
//! lbctl's client. Paths are under `/v1/`; docs/API.md describes them.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::{
    desired::{BackendSpec, Change, Desired},
    model::{ServiceConfig, ServiceKey},
};

pub mod client;

pub const VERSION: &str = "v1";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InterfaceStatus {
    pub name: String,
    pub xdp_mode: String,
    /// `new` (attached by this run) or `replaced` (took over a pinned link).
    pub attach: String,
    /// Something about this interface the operator must know (e.g. a veth in driver
    /// mode, whose transmits need an XDP program on its peer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warning: Option<String>,
    /// Frames XDP transmitted that the driver dropped (`ethtool -S`: veth's
    /// `xdp_tx_errors`), where the driver counts them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub xdp_tx_errors: Option<u64>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Status {
    pub node: String,
    pub version: String,
    pub api: String,
    pub uptime_seconds: u64,
    pub interfaces: Vec<InterfaceStatus>,
    pub services: usize,
    pub backends: usize,
    pub unresolved_backends: usize,
    /// Entries in both connection tables ...
    pub conn_table_entries: usize,
    /// ... of which IPv6 (each family's table has its own size).
    #[serde(default)]
    pub conn_table_entries_v6: usize,
    /// The data plane's maps came from a previous run (hitless restart).
    pub resumed: bool,
    pub metrics: String,
    /// Requests refused on the peer and registry ports: `<port>/<reason>` -> count.
    #[serde(default)]
    pub rejected: std::collections::BTreeMap<String, u64>,
    /// In a cluster: the start-up sync is done and the node may take VIPs. A
    /// standalone node is always ready.
    #[serde(default = "yes")]
    pub ready: bool,
    /// Why the node is not ready yet (what it waits for).
    #[serde(default)]
    pub waiting_for: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct BackendView {
    pub address: IpAddr,
    pub weight: u32,
    pub drain: bool,
    /// False while the service's health check fails for it (it then takes no new flows).
    #[serde(default = "healthy_default")]
    pub healthy: bool,
    /// The MAC frames are sent to; `None` while unresolved (no traffic then).
    pub mac: Option<String>,
    pub mac_source: String,
    pub packets: u64,
    pub bytes: u64,
    /// The backend's sphere (SPM provider), from the config or the directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sphere: Option<String>,
    /// The water marks' verdict on it, when the service has them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub steering: Option<String>,
    /// A valid instance (`plan::valid_instance`): resolved, healthy, weighted, not
    /// draining.
    #[serde(default)]
    pub valid: bool,
    /// It comes from the directory (registered), not from the config.
    #[serde(default)]
    pub from_directory: bool,
}

/// A backend's load report (water-mark steering).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoadReport {
    pub service: ServiceKey,
    pub backend: IpAddr,
    pub load: u64,
    pub capacity: u64,
    /// The report counts for this long unless renewed.
    #[serde(default = "default_report_ttl")]
    pub ttl_ms: u64,
}

fn default_report_ttl() -> u64 {
    3000
}

impl BackendView {
    /// A valid instance: new connections may go to it (see `plan::valid_instance`).
    pub fn takes_new_flows(&self) -> bool {
        self.valid
    }
}

fn healthy_default() -> bool {
    true
}

/// `GET /v1/services` and `/v1/stats`: `?summary=true` leaves each service's backends
/// out (their count stays): a table of services needs no more, and on a node of
/// 10,000 services it is a fifth of the document to make, send and read.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize)]
pub struct ListQuery {
    #[serde(default)]
    pub summary: bool,
}

impl ListQuery {
    /// `views` as asked: without their backends in a summary.
    pub fn shape(self, mut views: Vec<ServiceView>) -> Vec<ServiceView> {
        if self.summary {
            for v in &mut views {
                v.backends = Vec::new();
            }
        }
        views
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ServiceView {
    pub service: String,
    pub key: ServiceKey,
    /// As the data plane has it: `epoch` is the configured one plus the SPM
    /// manager's (the directory's `spm` record).
    pub config: ServiceConfig,
    pub packets: u64,
    pub bytes: u64,
    /// Every backend; empty in a summary (`?summary=true`), which has only ...
    pub backends: Vec<BackendView>,
    /// ... how many there are.
    #[serde(default)]
    pub backend_count: usize,
    #[serde(default)]
    pub spm: crate::spm::Settings,
    /// Why the service is refused, when it is (operator record or automatic).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<crate::availability::Record>,
}

/// An operator's availability change for one service.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetAvailability {
    pub service: ServiceKey,
    pub available: bool,
    #[serde(default)]
    pub reason: Option<crate::availability::Reason>,
    #[serde(default)]
    pub operator: Option<String>,
    /// Expected back at (Unix ms).
    #[serde(default)]
    pub expected_up_ms: Option<u64>,
}

/// The availability records this node holds.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Availability {
    pub records: Vec<crate::availability::Record>,
    /// This node has merged its peers' records since it started.
    pub synced: bool,
    /// Messages from peers refused (bad MAC, malformed).
    pub rejected: u64,
}

/// The answer to an epoch bump: the service's epoch once it took effect here.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochBumped {
    pub service: ServiceKey,
    pub epoch: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Stats {
    pub services: Vec<ServiceView>,
    /// The data plane's global counters by name (passes, drops by reason, LRU).
    pub global: Vec<(String, u64)>,
    /// Entries in both connection tables, and of which IPv6.
    pub conn_table_entries: usize,
    #[serde(default)]
    pub conn_table_entries_v6: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceRef {
    pub service: ServiceKey,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddService {
    pub service: ServiceKey,
    #[serde(default)]
    pub config: Option<ServiceConfig>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AddBackend {
    pub service: ServiceKey,
    pub backend: IpAddr,
    #[serde(default)]
    pub spec: Option<BackendSpec>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendRef {
    pub service: ServiceKey,
    pub backend: IpAddr,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DrainBackend {
    pub service: ServiceKey,
    pub backend: IpAddr,
    /// `false` puts a drained backend back into rotation.
    pub drain: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SetWeight {
    pub service: ServiceKey,
    pub backend: IpAddr,
    pub weight: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Apply {
    pub desired: Desired,
    #[serde(default)]
    pub dry_run: bool,
}

/// The answer to a reload (`POST /v1/reload`, SIGHUP).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Reloaded {
    /// The file that was read.
    pub file: String,
    /// What its services changed (empty: they were as before, or not applied).
    pub changes: Vec<Change>,
    /// False in a cluster whose services are the directory's: the file's are not
    /// applied (`lbctl apply` changes them everywhere).
    pub services_applied: bool,
    /// The file's services are not what the cluster has (only when not applied).
    pub services_differ_from_cluster: bool,
    /// Sections that changed and take effect at the next restart (node, dataplane, ...).
    pub restart_needed: Vec<String>,
}

/// The answer to every change: what it changed (empty: nothing to do).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Applied {
    pub changes: Vec<Change>,
    pub dry_run: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quiesce {
    pub quiesce: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shutdown {
    /// Also detach the XDP program and remove the pinned maps.
    pub detach: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EventRecord {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub node: IpAddr,
    #[serde(flatten)]
    pub event: crate::cluster::node::Event,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterView {
    pub id: Option<IpAddr>,
    pub leader: Option<IpAddr>,
    pub is_leader: bool,
    pub hosts: Vec<crate::cluster::node::HostView>,
    pub rejected: std::collections::BTreeMap<String, u64>,
    pub events: std::collections::BTreeMap<String, u64>,
    /// This node sees enough hosts to serve VIPs (cluster.quorum).
    #[serde(default)]
    pub quorate: bool,
    /// VIPs whose owner holds other tables than this node (it will not take them).
    #[serde(default)]
    pub mismatched: Vec<IpAddr>,
}

/// A backend registering itself (or registered by a sidecar) with a lease.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub service: ServiceKey,
    /// Instance name, unique within the service (default: the address and port).
    #[serde(default)]
    pub instance: Option<String>,
    pub address: IpAddr,
    pub port: u16,
    #[serde(default = "one")]
    pub weight: u32,
    /// The lease: without a renewal within this long, the backend is invalid.
    pub ttl_ms: u64,
}

fn one() -> u32 {
    1
}

impl Registration {
    pub fn instance(&self) -> String {
        self.instance.clone().unwrap_or_else(|| match self.address {
            IpAddr::V4(a) => format!("{a}:{}", self.port),
            IpAddr::V6(a) => format!("[{a}]:{}", self.port),
        })
    }

    pub fn value(&self) -> String {
        let host = match self.address {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        format!("{host}:{};weight={}", self.port, self.weight)
    }
}

/// A backend's load report, as recorded.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LoadReported {
    /// The report's key in the directory: `<service>|<backend>`.
    pub reported: String,
    pub load: u64,
    pub capacity: u64,
    /// Stored where a failover keeps it (answered 200). `false` (answered 202): sent
    /// to the directory's master, not yet acknowledged; read it back or send it again.
    #[serde(default = "yes")]
    pub committed: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ShuttingDown {
    pub shutting_down: bool,
}

/// Query of `/v1/spm` and `/v1/spm/watch`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpmQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service: Option<ServiceKey>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<u64>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub map_type: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The epoch the client holds for `service`: a stale one gets the mismatch reply.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epoch: Option<u64>,
    /// 2: the service's sub-level map (its instances, also when level 1 shows a
    /// re-director).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<u8>,
}

/// The seed's epoch-mismatch reply (HTTP 409): says so, and carries the new map.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochMismatch {
    pub error: String,
    pub epoch_mismatch: EpochHeld,
    pub map: crate::spm::Spm,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EpochHeld {
    pub service: ServiceKey,
    pub held: u64,
    pub current: u64,
}

/// Query of `/v1/events`.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventsQuery {
    #[serde(default)]
    pub follow: bool,
}

/// Query of `/v1/dir/search`, `/v1/dir/find` and `/v1/dir/subscribe`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TablePrefix {
    pub table: String,
    #[serde(default)]
    pub prefix: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirAdd {
    pub table: String,
    pub key: String,
    pub value: String,
    #[serde(default = "yes")]
    pub valid: bool,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirKey {
    pub table: String,
    pub key: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirHeartbeat {
    pub table: String,
    pub key: String,
    pub time_max_ms: u64,
}

/// The answer to a directory add.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DirSubmitted {
    pub submitted: bool,
    /// Stored where a failover keeps it (answered 200). `false` (answered 202): sent
    /// to the directory's master, not yet acknowledged; read it back or send it again.
    #[serde(default = "yes")]
    pub committed: bool,
}

/// The answer to a directory delete.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DirDeleted {
    pub changed: bool,
    /// Stored where a failover keeps it (answered 200). `false` (answered 202): sent
    /// to the directory's master, not yet acknowledged; read it back or send it again.
    #[serde(default = "yes")]
    pub committed: bool,
}

/// The answer to a heartbeat: the entry is valid until its time_max runs out.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DirValid {
    pub valid: bool,
    /// Stored where a failover keeps it (answered 200). `false` (answered 202): sent
    /// to the directory's master, not yet acknowledged; read it back or send it again.
    #[serde(default = "yes")]
    pub committed: bool,
}

/// The answer to a registration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Registered {
    pub registered: String,
    pub ttl_ms: u64,
    /// Stored where a failover keeps it (answered 200). `false` (answered 202): sent
    /// to the directory's master, not yet acknowledged; read it back or send it again.
    #[serde(default = "yes")]
    pub committed: bool,
}
