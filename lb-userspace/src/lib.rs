//! The balancer's userspace library: loading and attaching the XDP program
//! ([`loader`]), writing services and backends into its maps ([`manager`]), and the
//! pure Maglev table builder ([`maglev`]). The daemon and CLI build on these.

pub mod api;
pub mod availability;
pub mod availd;
pub mod client;
pub mod cluster;
pub mod clusterd;
pub mod config;
pub mod daemon;
pub mod desired;
pub mod dird;
pub mod directory;
pub mod error;
pub mod fault;
pub mod health;
pub mod loader;
pub mod maglev;
pub mod manager;
pub mod metrics;
pub mod model;
pub mod neighbor;
pub mod peer;
pub mod server;
pub mod spm;
pub mod state_file;
pub mod vip;
pub mod watermark;

pub use error::DataplaneError;
pub use loader::{Attached, Dataplane, LoadOptions, Program};
pub use manager::{BackendConfig, MapManager, Snapshot};
pub use model::{Egress, L2Route, Proto, ServiceConfig, ServiceKey, Steering};
