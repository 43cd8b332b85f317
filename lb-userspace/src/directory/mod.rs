//! The Dynamic Server Directory (the DSD seed): replicated (key, value, valid) tables
//! of service instances, host routes and partitions, with the agent interface (add,
//! delete, prefix search, find-server, heartbeat, subscribe). `tables` and
//! `subscriptions` are pure; replication between the master and the agents builds on
//! the `Change` they produce.

pub mod feed;
pub mod node;
pub mod replication;
pub mod store;
pub mod subscriptions;
pub mod tables;

#[cfg(test)]
mod failover_sim;
#[cfg(test)]
mod sim;
