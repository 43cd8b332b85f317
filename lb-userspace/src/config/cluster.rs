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
    Ok(ClusterConfig {
        id: c.id,
        group: c.group,
        peers: c.peers,
        port,
        key,
        interval: std::time::Duration::from_millis(interval),
        timeout: std::time::Duration::from_millis(timeout),
        orphan_expiry: c.orphan_expiry_s.map(std::time::Duration::from_secs),
        preferred: c.preferred,
        vip_interface: c
            .vip_interface
            .unwrap_or_else(|| interfaces[0].name.clone()),
        script: c.script,
        script_timeout: std::time::Duration::from_millis(c.script_timeout_ms),
    })
}
