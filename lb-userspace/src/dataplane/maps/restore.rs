//! Reading the maps back: taking over what an earlier run pinned, and what they hold
//! for a service (for the consistency checks and tests).

use std::{collections::BTreeMap, net::IpAddr};

use lb_common::{
    map_names, Backend, SphereKey, SphereMeta, VipKey, VipMeta, BACKEND_F_ACTIVE, FAMILY_V4,
    FAMILY_V6, RING_EMPTY,
};

use super::{addr_of, is_missing, service_key_of, vip_key, BackendState, MapManager, ServiceState};
use crate::{
    dataplane::{
        error::{DataplaneError, MapResultExt, Result},
        Contents,
    },
    model::ServiceKey,
};

impl MapManager {
    fn read_ring(&self, offset: u32, len: u32) -> Result<Vec<u32>> {
        (offset..offset + len)
            .map(|i| self.ring.get(&i, 0).map_ctx(map_names::MAGLEV_RING))
            .collect()
    }

    /// Takes over maps an earlier run filled (pinned maps) from the maps alone:
    /// services and their slots from `VIPS`, backends from `BACKENDS` (each names its
    /// service), tables from the ring, egress slots from the devmap. Backends that no
    /// service owns (left by a run that died in a write) are deactivated; everything
    /// else is corrected by the next write of each service's plan. Returns how many
    /// backends were deactivated.
    pub fn restore(&mut self) -> Result<u32> {
        let stride = self.limits.ring_stride;
        let vips: Vec<(VipKey, VipMeta)> = self
            .vips
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_ctx(map_names::VIPS)?;
        let mut max_gen = 0;
        let mut active: BTreeMap<u32, Vec<(u32, Backend)>> = BTreeMap::new();
        for id in 0..self.limits.backends {
            let b = self.backends.get(&id, 0).map_ctx(map_names::BACKENDS)?;
            max_gen = max_gen.max(b.gen);
            if b.flags & BACKEND_F_ACTIVE != 0 {
                active.entry(b.vip_id).or_default().push((id, b));
            }
        }
        self.next_gen = max_gen.wrapping_add(1).max(1);
        self.tx_port_slots.clear();
        for slot in 1..=self.limits.tx_ports {
            if let Ok(v) = self.tx_ports.get(slot, 0) {
                if v.if_index != 0 {
                    self.tx_port_slots.insert(v.if_index, slot);
                }
            }
        }
        let mut sphere_keys: BTreeMap<u32, Vec<(u32, SphereKey, SphereMeta)>> = BTreeMap::new();
        for k in self.spheres.keys() {
            let k = k.map_ctx(map_names::SPHERES)?;
            let v = self.spheres.get(&k, 0).map_ctx(map_names::SPHERES)?;
            let data = k.data();
            sphere_keys
                .entry(data.ring_offset)
                .or_default()
                .push((k.prefix_len(), data, v));
        }
        for (vkey, meta) in vips {
            let Some(key) = service_key_of(&vkey) else {
                continue;
            };
            if meta.vip_id >= self.limits.services {
                continue;
            }
            let slot = (meta.ring_offset / stride) as usize % 2;
            let live_rules = sphere_keys
                .get(&meta.ring_offset)
                .cloned()
                .unwrap_or_default();
            let len = live_rules
                .iter()
                .map(|(_, _, m)| m.offset + m.size)
                .max()
                .unwrap_or(0)
                .max(meta.ring_size)
                .min(stride);
            let cells = self.read_ring(meta.ring_offset, len)?;
            let base = meta.vip_id as usize * 2;
            self.ring_shadow[base + slot] = Some(cells);
            // The spare slot's contents are not read (a restart must not cost a
            // table's worth of reads per service): its next table is written whole.
            self.ring_shadow[base + 1 - slot] = None;
            let mut backends = BTreeMap::new();
            for (id, b) in active.remove(&meta.vip_id).unwrap_or_default() {
                let Some(addr) = addr_of(&b.addr, b.family) else {
                    continue;
                };
                let route = self.routes.get(&b.route_id, 0).map_ctx(map_names::ROUTES)?;
                self.free_backend_ids.remove(&id);
                backends.insert(
                    addr,
                    BackendState {
                        id,
                        entry: b,
                        route,
                    },
                );
            }
            let spare_offset = (meta.vip_id * 2 + (1 - slot) as u32) * stride;
            let keys = |rules: Vec<(u32, SphereKey, SphereMeta)>| -> Vec<(u32, SphereKey)> {
                rules.into_iter().map(|(p, k, _)| (p, k)).collect()
            };
            let mut sk = [Vec::new(), Vec::new()];
            sk[slot] = keys(live_rules);
            sk[1 - slot] = keys(sphere_keys.get(&spare_offset).cloned().unwrap_or_default());
            self.free_vip_ids.remove(&meta.vip_id);
            self.services.insert(
                key,
                ServiceState {
                    vip_id: meta.vip_id,
                    active_slot: slot,
                    meta: Some(meta),
                    backends,
                    sphere_keys: sk,
                },
            );
        }
        // Backends of no service: written by a run that died before naming them.
        let mut collected = 0;
        for (id, b) in active.into_values().flatten() {
            self.deactivate(id, b)?;
            collected += 1;
        }
        Ok(collected)
    }

    /// What the maps hold for `key`, read from them (not from what was written).
    pub(super) fn read_contents(&self, key: ServiceKey) -> Result<Option<Contents>> {
        let meta = match self.vips.get(&vip_key(&key), 0) {
            Ok(m) => m,
            Err(e) if is_missing(&e) => return Ok(None),
            Err(e) => {
                return Err(DataplaneError::Map {
                    name: map_names::VIPS,
                    source: e,
                })
            }
        };
        let mut by_id: BTreeMap<u32, IpAddr> = BTreeMap::new();
        let mut backends = BTreeMap::new();
        for id in 0..self.limits.backends {
            let b = self.backends.get(&id, 0).map_ctx(map_names::BACKENDS)?;
            if b.flags & BACKEND_F_ACTIVE == 0 || b.vip_id != meta.vip_id {
                continue;
            }
            let Some(addr) = addr_of(&b.addr, b.family) else {
                continue;
            };
            let route = self.routes.get(&b.route_id, 0).map_ctx(map_names::ROUTES)?;
            by_id.insert(id, addr);
            backends.insert(addr, self.l2_route(&route));
        }
        let mut subnets = Vec::new();
        for k in self.spheres.keys() {
            let k = k.map_ctx(map_names::SPHERES)?;
            let data = k.data();
            if data.ring_offset != meta.ring_offset {
                continue;
            }
            let v = self.spheres.get(&k, 0).map_ctx(map_names::SPHERES)?;
            let prefix = (k.prefix_len() - 32) as u8;
            let family = if key.addr.is_ipv4() {
                FAMILY_V4
            } else {
                FAMILY_V6
            };
            if let Some(net) = addr_of(&data.addr, family) {
                subnets.push((net, prefix, v.offset, v.size));
            }
        }
        subnets.sort();
        let len = subnets
            .iter()
            .map(|(_, _, o, s)| o + s)
            .max()
            .unwrap_or(0)
            .max(meta.ring_size);
        let unknown = IpAddr::from([0u8, 0, 0, 0]);
        let cells = self
            .read_ring(meta.ring_offset, len)?
            .into_iter()
            .map(|id| (id != RING_EMPTY).then(|| by_id.get(&id).copied().unwrap_or(unknown)))
            .collect();
        Ok(Some(Contents {
            flags: meta.flags,
            epoch: meta.epoch,
            table_size: meta.ring_size,
            backends,
            cells,
            subnets,
        }))
    }
}
