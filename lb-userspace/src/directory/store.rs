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

pub trait DirectoryStore: Clone + Send + Sync + 'static {
    /// Adds a row or changes it.
    fn add(
        &self,
        table: &str,
        key: &str,
        value: &str,
        valid: bool,
    ) -> impl Future<Output = Result<()>> + Send;
    /// Deletes a row; `false` if there was none.
    fn delete(&self, table: &str, key: &str) -> impl Future<Output = Result<bool>> + Send;
    /// Rows whose key starts with `prefix` (all for "").
    fn search(&self, table: &str, prefix: &str) -> impl Future<Output = Vec<Entry>> + Send;
    /// Valid instances with the current route to their host.
    fn find_server(
        &self,
        table: &str,
        prefix: &str,
    ) -> impl Future<Output = Vec<CompleteRoute>> + Send;
    /// The row is valid now and must be renewed within `time_max`; `false` if unknown.
    fn heartbeat(
        &self,
        table: &str,
        key: &str,
        time_max: Duration,
    ) -> impl Future<Output = Result<bool>> + Send;
    /// Add / Delete events of `table` for keys starting with `prefix`, from now on;
    /// one Resync when the subscriber fell behind (rescan the table).
    fn subscribe(&self, table: &str, prefix: &str) -> impl Stream<Item = Event> + Send + 'static;
}
