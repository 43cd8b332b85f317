//! Everything a start checks before it touches the kernel's BPF: run by `lbd --check`
//! and by every start, so that `--check` passes exactly the configs that start, and a
//! start that cannot serve fails before it has pinned or attached anything. Errors
//! name the field.

use std::{collections::BTreeSet, net::IpAddr};

use anyhow::{bail, Result};

use crate::{config::Config, shell::neighbor::NeighborTable};

/// bpffs' magic number (`statfs`'s f_type).
const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

/// Checks the environment this config is for: the namespace the caller runs in.
pub async fn check(config: &Config, neighbors: &NeighborTable) -> Result<()> {
    for i in &config.interfaces {
        if neighbors.interface(&i.name).await.is_err() {
            bail!(
                "dataplane.interfaces: {} does not exist in this network namespace (`ip link` lists them)",
                i.name
            );
        }
    }
    let local: BTreeSet<IpAddr> = crate::shell::vip::all_addresses(neighbors.handle())
        .await?
        .into_iter()
        .collect();
    let is_local = |a: IpAddr| a.is_unspecified() || local.contains(&a);
    if !is_local(config.node.metrics_listen.ip()) {
        bail!(
            "node.metrics_listen: {} is not an address of this node",
            config.node.metrics_listen
        );
    }
    if let Some(r) = config.node.registry_listen {
        if !is_local(r.ip()) {
            bail!("node.registry_listen: {r} is not an address of this node");
        }
    }
    if let Some(c) = &config.cluster {
        if neighbors.interface(&c.vip_interface).await.is_err() {
            bail!(
                "cluster.vip_interface: {} does not exist in this network namespace",
                c.vip_interface
            );
        }
        if !local.contains(&c.id) {
            bail!("cluster.id: {} is not an address of this node", c.id);
        }
    }
    let own = crate::shell::daemon::own_addresses(config, neighbors).await?;
    crate::reconcile::validate(
        &config.desired,
        config.sizes.max_services,
        config.sizes.maglev_max_size,
        &own,
        &config.encap,
    )
    .map_err(|e| anyhow::anyhow!("service: {e:#}"))?;
    let bpffs = config
        .node
        .pin_dir
        .ancestors()
        .find(|p| p.exists())
        .map(|p| nix::sys::statfs::statfs(p).map(|s| s.filesystem_type().0 as i64))
        .transpose()?;
    if bpffs != Some(BPF_FS_MAGIC) {
        bail!(
            "node.pin_dir: {} is not on a BPF filesystem (mount -t bpf bpf /sys/fs/bpf); \
             under `ip netns exec` /sys is the namespace's own: run lbd with `nsenter --net=...` \
             instead, or mount bpffs inside",
            config.node.pin_dir.display()
        );
    }
    Ok(())
}
