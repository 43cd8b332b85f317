//! Shared by the end-to-end tests and `cargo xtask`: network namespaces, the lab
//! topology built from them, and small servers that say who answered.

pub mod browser;
pub mod chaos;
pub mod cluster_lab;
pub mod lab;
pub mod netns;
pub mod servers;
pub mod traffic;
