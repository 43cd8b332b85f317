//! The tokio shells: each owns sockets, timers or files and hands what it learns to
//! the pure cores and the reconciler, then carries out their decisions. None imports
//! another's internals beyond the handles they pass each other.

pub mod availd;
pub mod backend_side;
pub mod clusterd;
pub mod daemon;
pub mod desired_log;
pub mod dird;
pub mod ethtool;
pub mod handle;
pub mod health;
pub mod managers;
pub mod neighbor;
pub mod notify;
pub mod peer;
pub mod preflight;
pub mod routes;
pub mod state_file;
pub mod vip;
pub mod vipd;
