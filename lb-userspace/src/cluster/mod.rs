//! The LB-node cluster (the RAIS seed): heartbeats, leader election, assignment of
//! service addresses (VIPs) to nodes. `wire` frames and authenticates messages,
//! `assign` holds the leader's rules, `node` is one node's state machine, `keeper`
//! the steps that put a VIP on and off this node safely. All pure;
//! the daemon does the I/O.

pub mod assign;
pub mod keeper;
pub mod node;
pub mod wire;

#[cfg(test)]
mod sim;
