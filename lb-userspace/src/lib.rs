//! The balancer's userspace library: loading and attaching the XDP program
//! ([`loader`]), writing services and backends into its maps ([`manager`]), and the
//! pure Maglev table builder ([`maglev`]). The daemon and CLI build on these.

pub mod maglev;
