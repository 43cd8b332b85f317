//! The `[cluster]` section.

use std::path::Path;

use toml::Spanned;

use super::{
    error::{ConfigError, Ctx},
    file::ClusterSection,
    ClusterConfig, Interface,
};

pub(super) fn cluster(
    ctx: &Ctx,
    section: Spanned<ClusterSection>,
    path: &Path,
    interfaces: &[Interface],
) -> Result<ClusterConfig, ConfigError> {
    let span = section.span();
    let c = section.into_inner();
    if c.group.is_none() && c.peers.is_empty() {
        return Err(ctx.err(
            span,
            "cluster: set group (multicast address:port) or peers (unicast address:port list)",
        ));
    }
    if let Some(g) = c.group {
        if !g.ip().is_multicast() {
            return Err(ctx.err(
                span,
                format!("cluster.group: {} is not a multicast address", g.ip()),
            ));
        }
    }
    let key = super::secret::read(
        ctx,
        ("cluster.key", "cluster.key_file"),
        c.key,
        c.key_file,
        span.clone(),
        path,
    )?
    .ok_or_else(|| {
        ctx.err(
            span.clone(),
            "cluster: set exactly one of key and key_file (the group's shared secret)",
        )
    })?;
    let (nodes, quorum) = sizes(ctx, &c.nodes, &c.quorum, c.peers.len(), span.clone())?;
    let interval = *c.interval_ms.get_ref();
    if interval == 0 {
        return Err(ctx.err(
            c.interval_ms.span(),
            "cluster.interval_ms: must be positive",
        ));
    }
    let timeout = match c.timeout_ms {
        None => 3 * interval,
        Some(t) if *t.get_ref() <= interval => {
            return Err(ctx.err(
                t.span(),
                format!("cluster.timeout_ms: must exceed interval_ms ({interval})"),
            ));
        }
        Some(t) => *t.get_ref(),
    };
    let port = c.port.or(c.group.map(|g| g.port())).unwrap_or(7400);
    let startup_sync = match c.startup_sync {
        None => super::StartupSync::Peer,
        Some(s) => match s.get_ref().as_str() {
            "peer" => super::StartupSync::Peer,
            "quorum" => super::StartupSync::Quorum,
            other => {
                return Err(ctx.err(
                    s.span(),
                    format!(
                        "cluster.startup_sync: {other:?} is not one of \"peer\" (a starting \
                         node syncs with at least one peer before it takes VIPs) or \
                         \"quorum\" (with enough peers to make a quorum)"
                    ),
                ))
            }
        },
    };
    Ok(ClusterConfig {
        id: c.id,
        group: c.group,
        peers: c.peers,
        port,
        key,
        interval: std::time::Duration::from_millis(interval),
        timeout: std::time::Duration::from_millis(timeout),
        orphan_expiry: c.orphan_expiry_s.map(std::time::Duration::from_secs),
        nodes,
        quorum,
        preferred: c.preferred,
        vip_interface: c
            .vip_interface
            .unwrap_or_else(|| interfaces[0].name.clone()),
        script: c.script,
        script_timeout: std::time::Duration::from_millis(c.script_timeout_ms),
        startup_sync,
    })
}

/// The group's size and quorum: a majority by default. Two nodes have no majority
/// that survives the loss of one, so they must say which failure they prefer.
fn sizes(
    ctx: &Ctx,
    given_nodes: &Option<Spanned<usize>>,
    given_quorum: &Option<Spanned<usize>>,
    peers: usize,
    span: std::ops::Range<usize>,
) -> Result<(usize, usize), ConfigError> {
    let nodes = match given_nodes {
        Some(n) if *n.get_ref() == 0 => {
            return Err(ctx.err(n.span(), "cluster.nodes: must be at least 1"))
        }
        Some(n) if peers > 0 && *n.get_ref() < peers + 1 => {
            return Err(ctx.err(
                n.span(),
                format!(
                    "cluster.nodes: {} is fewer than this node and its {} peers",
                    n.get_ref(),
                    peers
                ),
            ))
        }
        Some(n) => *n.get_ref(),
        None if peers > 0 => peers + 1,
        None if given_quorum.as_ref().is_some_and(|q| *q.get_ref() == 1) => 1,
        None => {
            return Err(ctx.err(
                span,
                "cluster.nodes: set how many LB nodes the group has (a node that sees \
                 fewer than a majority of them gives its VIPs up), or quorum = 1 to \
                 serve whatever the node sees",
            ))
        }
    };
    let quorum = match given_quorum {
        Some(q) if *q.get_ref() == 0 || *q.get_ref() > nodes => {
            return Err(ctx.err(
                q.span(),
                format!("cluster.quorum: must be between 1 and cluster.nodes ({nodes})"),
            ))
        }
        Some(q) => *q.get_ref(),
        None if nodes == 2 => {
            return Err(ctx.err(
                span,
                "cluster.quorum: a two-node group has no majority that survives losing \
                 a node; set quorum = 1 (each node serves alone when it cannot see the \
                 other: both answer for the VIPs during a partition) or quorum = 2 (a \
                 node alone serves nothing: no failover)",
            ))
        }
        None => nodes / 2 + 1,
    };
    Ok((nodes, quorum))
}
