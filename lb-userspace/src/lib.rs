//! The balancer's userspace library. Pure cores (no I/O, time and randomness as
//! arguments): the vocabulary ([`model`]), the desired state ([`desired`]), the plan
//! of the data plane ([`plan`]), Maglev, the SPM, water marks, availability, the
//! cluster and the directory. The data plane behind a trait ([`dataplane`]), the
//! reconciler that drives it ([`reconcile`]), and the tokio shells around them
//! (daemon, directory, cluster, availability, health, API server).

/// lb-pass.o: the map-less `XDP_PASS` object for veth peers (`lbd --write-pass-object`).
pub const PASS_OBJECT: &[u8] = include_bytes!(env!("LB_PASS_OBJECT"));
/// The commit this build was made from (`LB_COMMIT` or git's; see build.rs).
pub const COMMIT: &str = env!("LB_COMMIT");
/// `--version` of lbd and lbctl: the package version and the commit.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("LB_COMMIT"),
    ")"
);

pub mod api;
pub mod availability;
pub mod backend_side;
pub mod cluster;
pub mod config;
pub mod dataplane;
pub mod desired;
pub mod directory;
pub mod fault;
pub mod health;
pub mod maglev;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod reconcile;
pub mod server;
pub mod shell;
pub mod spm;
pub mod validate;
pub mod watermark;

pub use dataplane::{
    loader::{Attached, LoadOptions, Program, Programs},
    maps::MapManager,
    Dataplane, DataplaneError,
};
pub use model::{BackendRoute, Egress, Proto, ServiceConfig, ServiceKey};
