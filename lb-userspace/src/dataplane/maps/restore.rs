//! Reading the maps back: taking over what an earlier run pinned, and what they hold
//! for a service (for the consistency checks and tests).

use std::{collections::BTreeMap, net::IpAddr};

use crate::dataplane::layout::TRAILER_CELLS;
use lb_common::{
    map_names, Backend, SphereKey, SphereMeta, VipKey, VipMeta, BACKEND_F_ACTIVE, FAMILY_V4,
    FAMILY_V6, RING_EMPTY,
};

use super::{
    addr_of, is_missing, service_key_of, vip_key, BackendState, Extent, Extents, MapManager,
    ServiceState,
};
use crate::{
    dataplane::{
        error::{DataplaneError, MapResultExt, Result},
        Contents,
    },
    model::ServiceKey,
};

impl MapManager {
    fn read_ring(&self, offset: u32, len: u32) -> Result<Vec<u32>> {
        if offset as u64 + len as u64 > self.ring.cells() as u64 {
            return Err(DataplaneError::Options(format!(
                "{}: a table at {offset} of {len} cells lies beyond the ring's {} cells",
                map_names::MAGLEV_RING,
                self.ring.cells()
            )));
        }
        Ok(self.ring.read(offset, len))
    }

    /// Takes over maps an earlier run filled (pinned maps) from the maps alone:
    /// services and their slots from `VIPS`, backends from `BACKENDS` (each names its
    /// service), tables from the ring, egress slots from the devmap. Backends that no
    /// service owns (left by a run that died in a write) are deactivated; everything
    /// else is corrected by the next write of each service's plan. Returns how many
    /// backends were deactivated.
    pub fn restore(&mut self) -> Result<u32> {
        let vips: Vec<(VipKey, VipMeta)> = self
            .vips
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_ctx(map_names::VIPS)?;
        let mut max_gen = 0;
        let mut active: BTreeMap<u32, Vec<(u32, Backend)>> = BTreeMap::new();
        for id in 0..self.backends_view.entries() {
            let b: Backend = self.backends_view.get(id);
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
        let mut used: BTreeMap<u32, u32> = BTreeMap::new();
        for (vkey, meta) in vips {
            let Some(key) = service_key_of(&vkey) else {
                continue;
            };
            if meta.vip_id >= self.limits.services {
                continue;
            }
            let live_rules = sphere_keys.remove(&meta.ring_offset).unwrap_or_default();
            // The live slot: its table and sphere tables. The other slot is not
            // known; the next table is written to a new extent.
            let len = live_rules
                .iter()
                .map(|(_, _, m)| m.offset + m.size)
                .max()
                .unwrap_or(0)
                .max(meta.ring_size);
            let len = len + TRAILER_CELLS;
            if meta.ring_offset as u64 + len as u64 > self.ring.cells() as u64 {
                continue;
            }
            let extent = Extent {
                offset: meta.ring_offset,
                len,
            };
            let trailer = super::trailer_of(
                &self
                    .ring
                    .read(meta.ring_offset + len - TRAILER_CELLS, TRAILER_CELLS),
            );
            let before = used.range(..extent.offset + extent.len.max(1)).next_back();
            if before.is_some_and(|(o, l)| o + l > extent.offset) {
                // Two services naming the same cells: only a corrupted map does that;
                // the later one is written anew (as if new) by the next reconcile.
                continue;
            }
            used.insert(extent.offset, extent.len);
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
            let sk = [
                live_rules.into_iter().map(|(p, k, _)| (p, k)).collect(),
                Vec::new(),
            ];
            self.free_vip_ids.remove(&meta.vip_id);
            self.services.insert(
                key,
                ServiceState {
                    vip_id: meta.vip_id,
                    active_slot: 0,
                    meta: Some(meta),
                    backends,
                    sphere_keys: sk,
                    slots: [Some(extent), None],
                    reserved: 2 * len as u64,
                    trailers: [Some(trailer), None],
                },
            );
        }
        self.extents = Extents::with_used(
            self.ring.cells(),
            used.into_iter().map(|(offset, len)| Extent { offset, len }),
        );
        // Subnet rules of slots no service points at: their cells go to whoever
        // gets the extent next.
        for (p, k, _) in sphere_keys.into_values().flatten() {
            self.remove_sphere_key((p, k))?;
        }
        // Backends of no service: written by a run that died before naming them.
        let mut collected = 0;
        for (id, b) in active.into_values().flatten() {
            self.deactivate(id, b)?;
            collected += 1;
        }
        // Whatever an earlier run (or an older build, without the words) left.
        let words: Vec<(VipMeta, bool)> = self
            .services
            .iter()
            .filter_map(|(k, s)| Some((s.meta?, self.serves(k.addr))))
            .collect();
        self.vip_state.set_all(words.into_iter());
        self.tally = self.tally_afresh();
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
        for id in 0..self.backends_view.entries() {
            let b: Backend = self.backends_view.get(id);
            if b.flags & BACKEND_F_ACTIVE == 0 || b.vip_id != meta.vip_id {
                continue;
            }
            let Some(addr) = addr_of(&b.addr, b.family) else {
                continue;
            };
            let route = self.routes.get(&b.route_id, 0).map_ctx(map_names::ROUTES)?;
            by_id.insert(id, addr);
            backends.insert(addr, self.backend_route(&route, b.family));
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
