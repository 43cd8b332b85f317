//! The real data plane: the XDP program's maps, written so that every packet sees
//! either a service's whole old state or its whole new one.
//!
//! Ordering rules of [`Dataplane::write_service`]:
//! - a backend and its route are written before any table names it;
//! - a new table goes to the service's spare ring slot (its subnet rules with it),
//!   and one `VIPS` update (atomic for a hash map) flips the service to it: the
//!   commit point. A failure before it undoes every entry written;
//! - removed backends are deactivated after the flip, so no live table names an
//!   inactive backend, and their connections then fail the data plane's generation
//!   check and are steered anew.
//!
//! The maps describe themselves: `VIPS` names each service's id, slot and table, and
//! each `BACKENDS` entry its address, service and generation. So a restarted daemon
//! takes over from the maps alone ([`MapManager::restore`]), and whatever an
//! interrupted run left (a backend written but never named, a service that was being
//! removed) is corrected by the next write of the plan, which compares with what the
//! maps hold rather than with a record of what was meant.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::{
    maps::{
        lpm_trie::{Key as LpmKey, LpmTrie},
        Array, DevMap, HashMap, MapData, PerCpuArray, PerCpuHashMap, PerCpuValues,
    },
    Ebpf,
};
use lb_common::{
    map_names, AddrKey, AddrMeta, Backend, ConnEntry, Counter, FlowKey, GlobalStats, Route,
    SphereKey, SphereMeta, VipKey, VipMeta, ADDR_F_PASS_IRREGULAR, BACKEND_F_ACTIVE, FAMILY_V4,
    FAMILY_V6, MAX_BACKENDS, MAX_SPHERE_RULES, MAX_TX_PORTS, PROTO_TCP, PROTO_UDP,
    RING_EMPTY, ROUTE_MODE_L2_DSR, ROUTE_MODE_NONE, VIP_F_PASS_IRREGULAR,
};

use super::{
    error::{DataplaneError, MapResultExt, Result},
    layout::{addr_bytes, layout, Layout},
    vip_flags, Contents, Dataplane, Limits, ServiceCounters, Usage,
};
use crate::{
    model::{Egress, L2Route, Proto, ServiceKey},
    plan::ServicePlan,
};

#[derive(Clone, Debug)]
struct BackendState {
    id: u32,
    entry: Backend,
    route: Route,
}

#[derive(Clone, Debug)]
struct ServiceState {
    vip_id: u32,
    /// The ring slot (0 or 1) `meta` points at.
    active_slot: usize,
    /// As written in `VIPS`; `None` before the first flip of a new service.
    meta: Option<VipMeta>,
    backends: BTreeMap<IpAddr, BackendState>,
    /// The `SPHERES` keys written for each ring slot.
    sphere_keys: [Vec<(u32, SphereKey)>; 2],
}

/// What a write did before its commit point, to be undone if it fails there.
#[derive(Default)]
struct Undo {
    new_service: bool,
    new_backends: Vec<IpAddr>,
    routes: Vec<(IpAddr, Route)>,
    spare_keys: Vec<(u32, SphereKey)>,
}

pub struct MapManager {
    vip_addrs: HashMap<MapData, AddrKey, AddrMeta>,
    vips: HashMap<MapData, VipKey, VipMeta>,
    ring: Array<MapData, u32>,
    backends: Array<MapData, Backend>,
    routes: Array<MapData, Route>,
    tx_ports: DevMap<MapData>,
    conns: PerCpuHashMap<MapData, FlowKey, ConnEntry>,
    vip_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    global_stats: PerCpuArray<MapData, GlobalStats>,
    spheres: LpmTrie<MapData, SphereKey, SphereMeta>,

    nr_cpus: usize,
    limits: Limits,
    services: BTreeMap<ServiceKey, ServiceState>,
    /// What each ring slot holds, by `vip_id * 2 + slot`, as far as it is known
    /// (`None`: unknown, the next table written there is written whole).
    ring_shadow: Vec<Option<Vec<u32>>>,
    free_backend_ids: BTreeSet<u32>,
    free_vip_ids: BTreeSet<u32>,
    /// Above every generation any `BACKENDS` entry holds or held.
    next_gen: u32,
    tx_port_slots: BTreeMap<u32, u32>,
    served: Option<BTreeSet<IpAddr>>,
    /// Test hook: after this many more map writes every write fails and nothing is
    /// undone, as if the process had died there.
    crash_after: Option<u64>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map>,
{
    ebpf.take_map(name)
        .and_then(|m| T::try_from(m).ok())
        .ok_or(DataplaneError::MapShape { name })
}

/// Deleting a key that is not there: aya reports it as KeyNotFound or as the
/// syscall's ENOENT, depending on the path taken.
fn is_missing(e: &aya::maps::MapError) -> bool {
    match e {
        aya::maps::MapError::KeyNotFound => true,
        aya::maps::MapError::SyscallError(s) => {
            s.io_error.raw_os_error() == Some(nix::errno::Errno::ENOENT as i32)
        }
        _ => false,
    }
}

fn service_key_of(key: &VipKey) -> Option<ServiceKey> {
    let addr = addr_of(&key.addr, key.family)?;
    let proto = match key.proto {
        PROTO_TCP => Proto::Tcp,
        PROTO_UDP => Proto::Udp,
        _ => return None,
    };
    Some(ServiceKey {
        addr,
        port: u16::from_be(key.port_be),
        proto,
    })
}

fn addr_of(bytes: &[u8; 16], family: u8) -> Option<IpAddr> {
    match family {
        FAMILY_V4 => Some(IpAddr::from(<[u8; 4]>::try_from(&bytes[..4]).ok()?)),
        FAMILY_V6 => Some(IpAddr::from(*bytes)),
        _ => None,
    }
}

fn vip_key(key: &ServiceKey) -> VipKey {
    let (addr, family) = addr_bytes(key.addr);
    VipKey {
        addr,
        port_be: key.port.to_be(),
        proto: key.proto.number(),
        family,
    }
}

impl MapManager {
    /// `max_services` services, each owning two ring slots of `ring_stride` cells.
    pub(crate) fn new(ebpf: &mut Ebpf, max_services: u32, ring_stride: u32) -> Result<Self> {
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| DataplaneError::Options(format!("reading {what}: {e}")))?;
        Ok(Self {
            vip_addrs: take(ebpf, map_names::VIP_ADDRS)?,
            vips: take(ebpf, map_names::VIPS)?,
            ring: take(ebpf, map_names::MAGLEV_RING)?,
            backends: take(ebpf, map_names::BACKENDS)?,
            routes: take(ebpf, map_names::ROUTES)?,
            tx_ports: take(ebpf, map_names::TX_PORTS)?,
            conns: take(ebpf, map_names::CONNS)?,
            vip_stats: take(ebpf, map_names::VIP_STATS)?,
            backend_stats: take(ebpf, map_names::BACKEND_STATS)?,
            global_stats: take(ebpf, map_names::GLOBAL_STATS)?,
            spheres: take(ebpf, map_names::SPHERES)?,
            nr_cpus,
            limits: Limits {
                services: max_services,
                backends: MAX_BACKENDS,
                ring_stride,
                sphere_rules: MAX_SPHERE_RULES,
                tx_ports: MAX_TX_PORTS - 1,
            },
            services: BTreeMap::new(),
            ring_shadow: vec![None; max_services as usize * 2],
            free_backend_ids: (0..MAX_BACKENDS).collect(),
            free_vip_ids: (0..max_services).collect(),
            next_gen: 1,
            tx_port_slots: BTreeMap::new(),
            served: None,
            crash_after: None,
        })
    }

    /// Test hook: the `n`+1-th map write from now on fails, and so does every one
    /// after it, with nothing undone: what a process killed at that point leaves.
    #[doc(hidden)]
    pub fn crash_after_writes(&mut self, n: u64) {
        self.crash_after = Some(n);
    }

    /// One map write is about to happen.
    fn writing(&mut self) -> Result<()> {
        match self.crash_after.as_mut() {
            Some(0) => Err(DataplaneError::Crashed),
            Some(n) => {
                *n -= 1;
                Ok(())
            }
            None => Ok(()),
        }
    }

    fn zero_counter(&mut self, backend: bool, index: u32) -> Result<()> {
        self.writing()?;
        let zeros = PerCpuValues::try_from(vec![Counter::default(); self.nr_cpus])
            .map_err(|e| DataplaneError::Options(format!("per-CPU values: {e}")))?;
        if backend {
            self.backend_stats
                .set(index, zeros, 0)
                .map_ctx(map_names::BACKEND_STATS)
        } else {
            self.vip_stats
                .set(index, zeros, 0)
                .map_ctx(map_names::VIP_STATS)
        }
    }

    fn set_backend(&mut self, id: u32, entry: Backend) -> Result<()> {
        self.writing()?;
        self.backends
            .set(id, entry, 0)
            .map_ctx(map_names::BACKENDS)
    }

    fn set_route(&mut self, id: u32, route: Route) -> Result<()> {
        self.writing()?;
        self.routes.set(id, route, 0).map_ctx(map_names::ROUTES)
    }

    /// Takes the backend out of service but keeps its generation in the map.
    fn deactivate(&mut self, id: u32, entry: Backend) -> Result<()> {
        self.set_backend(
            id,
            Backend {
                flags: entry.flags & !BACKEND_F_ACTIVE,
                ..entry
            },
        )?;
        self.free_backend_ids.insert(id);
        Ok(())
    }

    fn remove_sphere_key(&mut self, (prefix_len, data): (u32, SphereKey)) -> Result<()> {
        self.writing()?;
        match self.spheres.remove(&LpmKey::new(prefix_len, data)) {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(DataplaneError::Map {
                name: map_names::SPHERES,
                source: e,
            }),
        }
    }

    /// The `Route` for `route`; its egress must have a devmap slot already.
    fn route_entry(&self, route: Option<&L2Route>) -> Route {
        let Some(r) = route else {
            return Route {
                mode: ROUTE_MODE_NONE,
                ..Route::default()
            };
        };
        let tx_port = match r.egress {
            Egress::Ingress => 0,
            Egress::Interface { ifindex } => self.tx_port_slots[&ifindex],
        };
        Route {
            mode: ROUTE_MODE_L2_DSR,
            tx_port,
            dst_mac: r.dst_mac,
            src_mac: r.src_mac,
        }
    }

    fn l2_route(&self, r: &Route) -> Option<L2Route> {
        if r.mode == ROUTE_MODE_NONE {
            return None;
        }
        let egress = match r.tx_port {
            0 => Egress::Ingress,
            slot => Egress::Interface {
                ifindex: self
                    .tx_port_slots
                    .iter()
                    .find(|(_, s)| **s == slot)
                    .map_or(0, |(i, _)| *i),
            },
        };
        Some(L2Route {
            dst_mac: r.dst_mac,
            src_mac: r.src_mac,
            egress,
        })
    }

    /// The devmap slot of an egress interface; slot 0 stays "same interface".
    fn tx_port(&mut self, ifindex: u32) -> Result<u32> {
        if let Some(&slot) = self.tx_port_slots.get(&ifindex) {
            return Ok(slot);
        }
        let slot = self.tx_port_slots.len() as u32 + 1;
        if slot > self.limits.tx_ports {
            return Err(DataplaneError::TooManyTxPorts {
                max: self.limits.tx_ports,
            });
        }
        self.writing()?;
        self.tx_ports.set(slot, ifindex, None, 0).map_err(|e| {
            DataplaneError::Options(format!("devmap slot {slot} for ifindex {ifindex}: {e}"))
        })?;
        self.tx_port_slots.insert(ifindex, slot);
        Ok(slot)
    }

    /// Refusals that need no write: what does not fit is refused before anything is.
    fn check(&self, key: ServiceKey, plan: &ServicePlan) -> Result<()> {
        let next = BTreeMap::from([(key, Some(plan.clone()))]);
        super::check_fits(&self.limits, &self.usage(), &next)?;
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

    fn write(&mut self, key: ServiceKey, plan: &ServicePlan, l: &Layout, undo: &mut Undo) -> Result<()> {
        let stride = self.limits.ring_stride;
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
                },
            );
            undo.new_service = true;
        }
        for b in plan.backends.values() {
            if let Some(L2Route {
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
            .map(|&c| if c == RING_EMPTY { RING_EMPTY } else { ids[c as usize] })
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
        let active_offset = (vip_id * 2 + active as u32) * stride;
        let same_table = s.meta.is_some_and(|m| m.ring_size == l.table_size)
            && self.ring_shadow[(vip_id * 2) as usize + active]
                .as_ref()
                .is_some_and(|sh| sh.len() >= cells.len() && sh[..cells.len()] == cells[..])
            && {
                let mut want: Vec<(u32, SphereKey)> =
                    keys_for(active_offset).into_iter().map(|(k, _)| k).collect();
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
                self.vips
                    .insert(vip_key(&key), meta, 0)
                    .map_ctx(map_names::VIPS)?;
                self.services.get_mut(&key).expect("exists").meta = Some(meta);
            }
        } else {
            let spare = 1 - active;
            let index = (vip_id * 2) as usize + spare;
            let offset = index as u32 * stride;
            let shadow = self.ring_shadow[index].take();
            for (cell, &id) in cells.iter().enumerate() {
                // Beyond what is known of the slot, every cell is written.
                let known = shadow.as_ref().and_then(|s| s.get(cell)).copied();
                if known != Some(id) {
                    self.writing()?;
                    self.ring
                        .set(offset + cell as u32, id, 0)
                        .map_ctx(map_names::MAGLEV_RING)?;
                }
            }
            self.ring_shadow[index] = Some(match shadow {
                Some(mut known) if known.len() >= cells.len() => {
                    known[..cells.len()].copy_from_slice(&cells);
                    known
                }
                _ => cells.clone(),
            });

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
            self.vips
                .insert(vip_key(&key), meta, 0)
                .map_ctx(map_names::VIPS)?;
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
    fn undo(&mut self, key: ServiceKey, undo: Undo) {
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
            }
        }
    }

    /// Keeps `VIP_ADDRS` equal to the set of served service addresses, with the OR
    /// of their fragment policies.
    fn write_addr(&mut self, addr: IpAddr) -> Result<()> {
        let (bytes, family) = addr_bytes(addr);
        let key = AddrKey {
            addr: bytes,
            family,
            _pad: [0; 3],
        };
        let on_addr: Vec<u32> = self
            .services
            .iter()
            .filter(|(k, _)| k.addr == addr)
            .filter_map(|(_, s)| s.meta.map(|m| m.flags))
            .collect();
        let served = self.served.as_ref().is_none_or(|o| o.contains(&addr));
        let current = self.vip_addrs.get(&key, 0).ok();
        if on_addr.is_empty() || !served {
            if current.is_none() {
                return Ok(());
            }
            self.writing()?;
            return match self.vip_addrs.remove(&key) {
                Ok(()) => Ok(()),
                Err(e) if is_missing(&e) => Ok(()),
                Err(e) => Err(DataplaneError::Map {
                    name: map_names::VIP_ADDRS,
                    source: e,
                }),
            };
        }
        let pass = on_addr.iter().any(|f| f & VIP_F_PASS_IRREGULAR != 0);
        let meta = AddrMeta {
            flags: if pass { ADDR_F_PASS_IRREGULAR } else { 0 },
        };
        if current == Some(meta) {
            return Ok(());
        }
        self.writing()?;
        self.vip_addrs
            .insert(key, meta, 0)
            .map_ctx(map_names::VIP_ADDRS)
    }

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
            let v = self
                .spheres
                .get(&k, 0)
                .map_ctx(map_names::SPHERES)?;
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
            let live_rules = sphere_keys.get(&meta.ring_offset).cloned().unwrap_or_default();
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
                backends.insert(addr, BackendState { id, entry: b, route });
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

    pub fn global_stats(&self) -> Result<GlobalStats> {
        let per_cpu = self
            .global_stats
            .get(&0, 0)
            .map_ctx(map_names::GLOBAL_STATS)?;
        let mut total = GlobalStats::default();
        for s in per_cpu.iter() {
            total.accumulate(s);
        }
        Ok(total)
    }

    fn sum(values: PerCpuValues<Counter>) -> Counter {
        values.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        })
    }
}

impl Dataplane for MapManager {
    fn limits(&self) -> Limits {
        self.limits
    }

    fn usage(&self) -> Usage {
        Usage {
            services: self
                .services
                .iter()
                .map(|(k, s)| {
                    (
                        *k,
                        (
                            s.backends.keys().copied().collect(),
                            s.sphere_keys[s.active_slot].len(),
                        ),
                    )
                })
                .collect(),
            tx_ports: self.tx_port_slots.keys().copied().collect(),
        }
    }

    fn write_service(&mut self, key: ServiceKey, plan: &ServicePlan) -> Result<()> {
        self.check(key, plan)?;
        let l = layout(plan, self.limits.ring_stride)?;
        let mut undo = Undo::default();
        match self.write(key, plan, &l, &mut undo) {
            Ok(()) => Ok(()),
            Err(e @ DataplaneError::Crashed) => Err(e),
            Err(e) => {
                self.undo(key, undo);
                Err(e)
            }
        }
    }

    fn remove_service(&mut self, key: ServiceKey) -> Result<()> {
        let state = self
            .services
            .get(&key)
            .cloned()
            .ok_or(DataplaneError::UnknownService(key))?;
        self.writing()?;
        match self.vips.remove(&vip_key(&key)) {
            Ok(()) => {}
            Err(e) if is_missing(&e) => {}
            Err(e) => {
                return Err(DataplaneError::Map {
                    name: map_names::VIPS,
                    source: e,
                })
            }
        }
        // Unreachable from here on; what follows only frees.
        self.services.remove(&key);
        self.free_vip_ids.insert(state.vip_id);
        self.write_addr(key.addr)?;
        for b in state.backends.values() {
            self.deactivate(b.id, b.entry)?;
        }
        for k in state.sphere_keys.iter().flatten() {
            self.remove_sphere_key(*k)?;
        }
        Ok(())
    }

    fn set_served(&mut self, served: Option<BTreeSet<IpAddr>>) -> Result<()> {
        let all: BTreeSet<IpAddr> = self
            .services
            .keys()
            .map(|k| k.addr)
            .chain(served.iter().flatten().copied())
            .chain(self.served.iter().flatten().copied())
            .collect();
        self.served = served;
        for a in all {
            self.write_addr(a)?;
        }
        Ok(())
    }

    fn services(&self) -> Vec<ServiceKey> {
        self.services.keys().copied().collect()
    }

    fn counters(&self, key: ServiceKey) -> Option<ServiceCounters> {
        let s = self.services.get(&key)?;
        let service = self
            .vip_stats
            .get(&s.vip_id, 0)
            .map(Self::sum)
            .unwrap_or_default();
        let backends = s
            .backends
            .iter()
            .map(|(a, b)| {
                (
                    *a,
                    self.backend_stats
                        .get(&b.id, 0)
                        .map(Self::sum)
                        .unwrap_or_default(),
                )
            })
            .collect();
        Some(ServiceCounters { service, backends })
    }

    fn global_stats(&self) -> Result<GlobalStats> {
        MapManager::global_stats(self)
    }

    fn conn_count(&self) -> usize {
        self.conns.keys().filter(|k| k.is_ok()).count()
    }

    fn read_back(&self, key: ServiceKey) -> Result<Option<Contents>> {
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
            let family = if key.addr.is_ipv4() { FAMILY_V4 } else { FAMILY_V6 };
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

    fn serves(&self, addr: IpAddr) -> bool {
        let (bytes, family) = addr_bytes(addr);
        self.vip_addrs
            .get(
                &AddrKey {
                    addr: bytes,
                    family,
                    _pad: [0; 3],
                },
                0,
            )
            .is_ok()
    }
}
