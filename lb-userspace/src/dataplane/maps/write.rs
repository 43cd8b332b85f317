//! Writing one service's plan: the order that keeps every packet on a whole old or
//! whole new state, and the undo of what was written before the commit point.

use std::{collections::BTreeMap, net::IpAddr};

use aya::maps::lpm_trie::Key as LpmKey;
use lb_common::{
    map_names, AddrKey, AddrMeta, Backend, SphereKey, SphereMeta, VipMeta, ADDR_F_PASS_IRREGULAR,
    BACKEND_F_ACTIVE, RING_EMPTY, VIP_F_PASS_IRREGULAR,
};

use super::{is_missing, vip_key, BackendState, MapManager, ServiceState, Undo};
use crate::{
    dataplane::{
        check_fits,
        error::{DataplaneError, MapResultExt, Result},
        layout::{addr_bytes, Layout, TRAILER_CELLS},
        vip_flags, Dataplane,
    },
    model::{BackendRoute, Egress, ServiceKey},
    plan::ServicePlan,
};

impl MapManager {
    /// Refusals that need no write: what does not fit is refused before anything is.
    pub(super) fn check(&self, key: ServiceKey, plan: &ServicePlan) -> Result<()> {
        let next = BTreeMap::from([(key, Some(plan.clone()))]);
        check_fits(&self.limits, &self.usage(&mut std::iter::once(key)), &next)?;
        let newcomers = plan
            .backends
            .keys()
            .filter(|a| {
                !self
                    .services
                    .get(&key)
                    .is_some_and(|s| s.backends.contains_key(a))
            })
            .count();
        if newcomers > self.free_backend_ids.len() {
            return Err(DataplaneError::TooManyBackends {
                service: key,
                backend: *plan.backends.keys().next().expect("a newcomer"),
                max: self.limits.backends,
            });
        }
        if !self.services.contains_key(&key) && self.free_vip_ids.is_empty() {
            return Err(DataplaneError::TooManyServices {
                service: key,
                max: self.limits.services,
            });
        }
        Ok(())
    }

    pub(super) fn write(
        &mut self,
        key: ServiceKey,
        plan: &ServicePlan,
        l: &Layout,
        trailer: [u32; 4],
        undo: &mut Undo,
    ) -> Result<()> {
        if !self.services.contains_key(&key) {
            let vip_id = *self.free_vip_ids.first().expect("checked");
            self.zero_counter(false, vip_id)?;
            self.free_vip_ids.remove(&vip_id);
            self.services.insert(
                key,
                ServiceState {
                    vip_id,
                    active_slot: 0,
                    meta: None,
                    backends: BTreeMap::new(),
                    sphere_keys: [Vec::new(), Vec::new()],
                    slots: [None, None],
                    reserved: 0,
                    trailers: [None, None],
                },
            );
            undo.new_service = true;
        }
        for b in plan.backends.values() {
            if let Some(BackendRoute {
                egress: Egress::Interface { ifindex },
                ..
            }) = b.route
            {
                self.tx_port(ifindex)?;
            }
        }
        let vip_id = self.services[&key].vip_id;

        // Backends and routes first: nothing names them yet.
        for (addr, b) in &plan.backends {
            let route = self.route_entry(b.route.as_ref());
            match self.services[&key].backends.get(addr).cloned() {
                Some(current) => {
                    if current.route != route {
                        // In place: a packet racing this write may see part of the old
                        // MACs and be lost, as during any route change; never another
                        // backend's MAC, since the slot is this backend's alone.
                        self.set_route(current.id, route)?;
                        undo.routes.push((*addr, current.route));
                        let s = self.services.get_mut(&key).expect("exists");
                        s.backends.get_mut(addr).expect("exists").route = route;
                    }
                }
                None => {
                    let id = *self.free_backend_ids.first().expect("checked");
                    let gen = self.next_gen;
                    self.next_gen = self.next_gen.wrapping_add(1).max(1);
                    self.set_route(id, route)?;
                    self.zero_counter(true, id)?;
                    let (bytes, family) = addr_bytes(*addr);
                    let entry = Backend {
                        addr: bytes,
                        family,
                        _pad: 0,
                        flags: BACKEND_F_ACTIVE,
                        gen,
                        route_id: id,
                        vip_id,
                    };
                    self.set_backend(id, entry)?;
                    self.free_backend_ids.remove(&id);
                    self.services
                        .get_mut(&key)
                        .expect("exists")
                        .backends
                        .insert(*addr, BackendState { id, entry, route });
                    undo.new_backends.push(*addr);
                }
            }
        }

        // The table, in backend ids.
        let ids: Vec<u32> = {
            let s = &self.services[&key];
            plan.backends.keys().map(|a| s.backends[a].id).collect()
        };
        let cells: Vec<u32> = l
            .cells
            .iter()
            .map(|&c| {
                if c == RING_EMPTY {
                    RING_EMPTY
                } else {
                    ids[c as usize]
                }
            })
            .collect();
        let s = &self.services[&key];
        let active = s.active_slot;
        let flags = vip_flags(plan);
        let keys_for = |offset: u32| -> Vec<((u32, SphereKey), SphereMeta)> {
            l.subnets
                .iter()
                .map(|(net, prefix, off, size)| {
                    (
                        (
                            32 + *prefix as u32,
                            SphereKey {
                                ring_offset: offset,
                                addr: addr_bytes(*net).0,
                            },
                        ),
                        SphereMeta {
                            offset: *off,
                            size: *size,
                        },
                    )
                })
                .collect()
        };
        let active_extent = s.slots[active];
        let active_offset = active_extent.map_or(0, |e| e.offset);
        let same_table = s.meta.is_some_and(|m| m.ring_size == l.table_size)
            && active_extent.is_some_and(|e| {
                e.len as usize == cells.len() + TRAILER_CELLS as usize
                    && self.ring.holds(e.offset, &cells)
            })
            && {
                let mut want: Vec<(u32, SphereKey)> = keys_for(active_offset)
                    .into_iter()
                    .map(|(k, _)| k)
                    .collect();
                let mut have = s.sphere_keys[active].clone();
                want.sort_by_key(|(p, k)| (*p, k.addr));
                have.sort_by_key(|(p, k)| (*p, k.addr));
                want == have
            };
        let removed: Vec<(IpAddr, BackendState)> = s
            .backends
            .iter()
            .filter(|(a, _)| !plan.backends.contains_key(a))
            .map(|(a, b)| (*a, b.clone()))
            .collect();
        let reserved = super::super::ring_reservation(plan, self.limits.tables);

        if same_table {
            let meta = VipMeta {
                vip_id,
                flags,
                ring_offset: active_offset,
                ring_size: l.table_size,
                epoch: plan.config.epoch,
            };
            if s.meta != Some(meta) {
                self.writing()?;
                self.write_vip(key, meta)?;
                self.services.get_mut(&key).expect("exists").meta = Some(meta);
            }
            // Same cells, maybe from a plan of another digest (a weight that moved
            // nothing): the live trailer says which plan it now stands for. The
            // program never reads it.
            let e = active_extent.expect("same table");
            self.ring.write(e.offset + cells.len() as u32, &trailer);
            self.services.get_mut(&key).expect("exists").trailers[active] =
                Some(super::trailer_of(&trailer));
        } else {
            let spare = 1 - active;
            let len = cells.len() as u32 + TRAILER_CELLS;
            // The spare slot's extent, if it has this table's size; else a new one
            // (the old one's subnet rules go with it: another service may get it).
            let extent = match self.services[&key].slots[spare] {
                Some(e) if e.len == len => e,
                old => {
                    if let Some(e) = old {
                        let stale = std::mem::take(
                            &mut self.services.get_mut(&key).expect("exists").sphere_keys[spare],
                        );
                        for k in stale {
                            self.remove_sphere_key(k)?;
                        }
                        self.services.get_mut(&key).expect("exists").slots[spare] = None;
                        self.extents.release(e);
                    }
                    let e = self.extents.alloc(len).ok_or(DataplaneError::RingFull {
                        service: key,
                        needed: len as u64,
                        free: self.extents.free_cells(),
                        total: self.limits.ring_cells,
                    })?;
                    self.services.get_mut(&key).expect("exists").slots[spare] = Some(e);
                    e
                }
            };
            let offset = extent.offset;
            self.writing()?;
            self.ring.write(offset, &cells);
            self.ring.write(offset + cells.len() as u32, &trailer);
            self.services.get_mut(&key).expect("exists").trailers[spare] =
                Some(super::trailer_of(&trailer));

            // The spare slot's subnet rules before the flip; the old slot's after it.
            let new_keys = keys_for(offset);
            let stale = std::mem::take(
                &mut self.services.get_mut(&key).expect("exists").sphere_keys[spare],
            );
            for (k, v) in &new_keys {
                self.writing()?;
                self.spheres
                    .insert(&LpmKey::new(k.0, k.1), v, 0)
                    .map_ctx(map_names::SPHERES)?;
                undo.spare_keys.push(*k);
            }
            for k in stale {
                if !new_keys.iter().any(|(n, _)| *n == k) {
                    self.remove_sphere_key(k)?;
                }
            }
            let meta = VipMeta {
                vip_id,
                flags,
                ring_offset: offset,
                ring_size: l.table_size,
                epoch: plan.config.epoch,
            };
            self.writing()?;
            self.write_vip(key, meta)?;
            // The commit point: from here on the service is at its new plan.
            *undo = Undo::default();
            let s = self.services.get_mut(&key).expect("exists");
            s.active_slot = spare;
            s.meta = Some(meta);

            s.sphere_keys[spare] = new_keys.into_iter().map(|(k, _)| k).collect();
            let old = std::mem::take(&mut s.sphere_keys[active]);
            for k in old {
                self.remove_sphere_key(k)?;
            }
        }
        *undo = Undo::default();
        self.services.get_mut(&key).expect("exists").reserved = reserved;
        // After the flip: no table names these any more.
        for (addr, b) in removed {
            self.deactivate(b.id, b.entry)?;
            self.services
                .get_mut(&key)
                .expect("exists")
                .backends
                .remove(&addr);
        }
        self.write_addr(key.addr)
    }

    /// Takes back what a write did before its commit point.
    pub(super) fn undo(&mut self, key: ServiceKey, undo: Undo) {
        let mut undo_one = || -> Result<()> {
            for k in &undo.spare_keys {
                self.remove_sphere_key(*k)?;
            }
            for (addr, route) in &undo.routes {
                let id = self.services[&key].backends[addr].id;
                self.set_route(id, *route)?;
                self.services
                    .get_mut(&key)
                    .expect("exists")
                    .backends
                    .get_mut(addr)
                    .expect("exists")
                    .route = *route;
            }
            for addr in &undo.new_backends {
                let b = self.services[&key].backends[addr].clone();
                self.deactivate(b.id, b.entry)?;
                self.services
                    .get_mut(&key)
                    .expect("exists")
                    .backends
                    .remove(addr);
            }
            Ok(())
        };
        if let Err(e) = undo_one() {
            tracing::warn!(service = %key, "undoing a failed write: {e}; the next write of the service repairs it");
        }
        if undo.new_service {
            if let Some(s) = self.services.remove(&key) {
                self.free_vip_ids.insert(s.vip_id);
                for e in s.slots.iter().flatten() {
                    self.extents.release(*e);
                }
            }
        }
    }

    /// Keeps `VIP_ADDRS` equal to the set of served service addresses, with the OR
    /// of their fragment policies.
    /// The service's `VIPS` entry becomes `meta`; its state word is cleared around
    /// the update and then says what the entry holds (`state`).
    fn write_vip(&mut self, key: ServiceKey, meta: VipMeta) -> Result<()> {
        let held = self.services.get(&key).and_then(|s| s.meta);
        self.vip_state.clear(meta.vip_id);
        let written = self
            .vips
            .insert(vip_key(&key), meta, 0)
            .map_ctx(map_names::VIPS);
        let served = self.serves(key.addr);
        match (&written, held) {
            (Ok(()), _) => self.vip_state.set(meta.vip_id, &meta, served),
            (Err(_), Some(old)) => self.vip_state.set(old.vip_id, &old, served),
            (Err(_), None) => {}
        }
        written
    }

    pub(super) fn write_addr(&mut self, addr: IpAddr) -> Result<()> {
        let (bytes, family) = addr_bytes(addr);
        let key = AddrKey {
            addr: bytes,
            family,
            _pad: [0; 3],
        };
        // The services of one address are neighbours in the map's order.
        let first = ServiceKey {
            addr,
            port: 0,
            proto: crate::model::Proto::Tcp,
        };
        let last = ServiceKey {
            addr,
            port: u16::MAX,
            proto: crate::model::Proto::Udp,
        };
        let on_addr: Vec<VipMeta> = self
            .services
            .range(first..=last)
            .filter_map(|(_, s)| s.meta)
            .collect();
        let served = self.serves(addr);
        let current = self.vip_addrs.get(&key, 0).ok();
        if on_addr.is_empty() || !served {
            // Its services' words say so before the address goes: their packets are
            // passed, also where the address shares a served one's filter bit.
            for m in &on_addr {
                self.vip_state.set(m.vip_id, m, false);
            }
            if current.is_none() {
                return Ok(());
            }
            self.writing()?;
            match self.vip_addrs.remove(&key) {
                Ok(()) => {}
                Err(e) if is_missing(&e) => {}
                Err(e) => {
                    return Err(DataplaneError::Map {
                        name: map_names::VIP_ADDRS,
                        source: e,
                    })
                }
            }
            // After the table: until then the filter still lets its packets look.
            return self.sync_vip_filter();
        }
        let pass = on_addr.iter().any(|m| m.flags & VIP_F_PASS_IRREGULAR != 0);
        let meta = AddrMeta {
            flags: if pass { ADDR_F_PASS_IRREGULAR } else { 0 },
        };
        if current != Some(meta) {
            self.writing()?;
            self.vip_addrs
                .insert(key, meta, 0)
                .map_ctx(map_names::VIP_ADDRS)?;
            self.set_vip_filter_bit(&key)?;
        }
        // Served (again): its services' words, after the address.
        for m in &on_addr {
            self.vip_state.set(m.vip_id, m, true);
        }
        Ok(())
    }

    /// Whether this node serves `addr` (in a cluster: owns it).
    pub(super) fn serves(&self, addr: IpAddr) -> bool {
        self.served.as_ref().is_none_or(|o| o.contains(&addr))
    }
}
