//! The directory as the rest of lbd uses it: the seed's agent interface, and nothing
//! about how it is stored or replicated. The embedded replicated store
//! (`dird::DirHandle`) implements it; a fleet that already runs etcd could implement
//! it over etcd instead (prefix search = range read, subscribe = prefix watch,
//! heartbeat = lease keep-alive) without touching the API or the data plane.

use std::{future::Future, time::Duration};

use anyhow::Result;
use futures::Stream;

use super::{
    subscriptions::Event,
    tables::{CompleteRoute, Entry},
};

/// How far a change got when the call returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Written {
    /// Stored where a failover keeps it: by the directory's backup (or by the master
    /// alone, when the cluster has no other node to hold a copy).
    Committed,
    /// Sent to the master but not acknowledged in time: this node resends it until
    /// the master commits it, and it is lost if this node dies first. Ask again, or
    /// read it back, before relying on it.
    Pending,
}

/// A change refused because this node cannot see a quorum of the cluster: on a
/// minority side the directory is read-only (a write there could not be stored where
/// the majority's master keeps it).
#[derive(Debug)]
pub struct ReadOnly;

impl std::fmt::Display for ReadOnly {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(
            "this node does not see a quorum of the cluster: its directory is read-only \
             until it does; write through a node of the majority (`lbctl cluster` shows them)",
        )
    }
}

impl std::error::Error for ReadOnly {}

pub trait DirectoryStore: Clone + Send + Sync + 'static {
    /// Adds a row or changes it. Errors with [`ReadOnly`] on a minority side.
    fn add(
        &self,
        table: &str,
        key: &str,
        value: &str,
        valid: bool,
    ) -> impl Future<Output = Result<Written>> + Send;
    /// Deletes a row; `None` if there was none.
    fn delete(
        &self,
        table: &str,
        key: &str,
    ) -> impl Future<Output = Result<Option<Written>>> + Send;
    /// Rows whose key starts with `prefix` (all for "").
    fn search(&self, table: &str, prefix: &str) -> impl Future<Output = Vec<Entry>> + Send;
    /// Valid instances with the current route to their host.
    fn find_server(
        &self,
        table: &str,
        prefix: &str,
    ) -> impl Future<Output = Vec<CompleteRoute>> + Send;
    /// The row is valid now and must be renewed within `time_max`; `None` if unknown.
    fn heartbeat(
        &self,
        table: &str,
        key: &str,
        time_max: Duration,
    ) -> impl Future<Output = Result<Option<Written>>> + Send;
    /// Add / Delete events of `table` for keys starting with `prefix`, from now on;
    /// one Resync when the subscriber fell behind (rescan the table).
    fn subscribe(&self, table: &str, prefix: &str) -> impl Stream<Item = Event> + Send + 'static;
}
