//! Typed access to the balancer's maps, in operator verbs: add or change a service,
//! set its backends (which rebuilds its Maglev table), remove it, read its counters.
//!
//! Ordering rules that keep every packet consistent while maps change:
//! - a backend and its route are written before any table names it;
//! - a new table goes to the service's spare ring slot, and one `VIPS` update (atomic
//!   for a hash map) flips the service to it;
//! - a removed backend is deactivated only after the flip, so no live table names an
//!   inactive backend, and its old connections then fail the data plane's check and are
//!   re-steered.
//!
//! Only cells that differ from what the spare slot already holds are written.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

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
    FAMILY_V6, MAX_BACKENDS, MAX_TX_PORTS, PROTO_TCP, PROTO_UDP,
    ROUTE_MODE_L2_DSR, VIP_F_EPOCH_RESTEER, VIP_F_PASS_IRREGULAR, VIP_F_SRC_PARTITION,
    VIP_F_TOPOLOGY, VIP_F_UNAVAILABLE,
};

use crate::{
    error::{DataplaneError, MapResultExt, Result},
    maglev::{self, MaglevBackend},
    model::{Egress, L2Route, Proto, ServiceConfig, ServiceKey, Steering},
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BackendConfig {
    pub addr: IpAddr,
    /// Share of new flows; 0 drains the backend (established flows stay on it).
    pub weight: u32,
    pub route: L2Route,
}

/// What a change wrote to the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableUpdate {
    pub table_size: u32,
    pub cells_written: u32,
}

#[derive(Clone, Debug)]
struct BackendState {
    id: u32,
    weight: u32,
    route: Route,
}

#[derive(Clone, Debug)]
struct ServiceState {
    vip_id: u32,
    config: ServiceConfig,
    /// The ring slot (0 or 1) the service's `VipMeta` points at.
    active_slot: usize,
    /// The table in the active slot; `None` before the first `set_backends`.
    table: Option<Vec<u32>>,
    backends: BTreeMap<IpAddr, BackendState>,
    steering: Steering,
    /// The `SPHERES` keys written for each ring slot.
    sphere_keys: [Vec<(u32, SphereKey)>; 2],
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
    max_services: u32,
    ring_stride: u32,
    services: BTreeMap<ServiceKey, ServiceState>,
    /// What each ring slot holds, by `vip_id * 2 + slot`; shorter than the stride means
    /// the rest is still zero, as the kernel created it.
    ring_shadow: Vec<Vec<u32>>,
    free_backend_ids: BTreeSet<u32>,
    next_gen: u32,
    tx_port_slots: BTreeMap<u32, u32>,
    /// In a cluster, the addresses this node serves: only these are in `VIP_ADDRS`,
    /// so traffic for the others passes to the kernel. `None`: a standalone node,
    /// which serves every service address.
    owned: Option<BTreeSet<IpAddr>>,
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map>,
{
    ebpf.take_map(name)
        .and_then(|m| T::try_from(m).ok())
        .ok_or(DataplaneError::MapShape { name })
}

/// An address as the maps store it: IPv4 in the first 4 bytes.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            (bytes, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// Seeds a backend's Maglev permutation from its address, so that every node derives
/// the same permutation whatever ids it gave out.
/// The largest prime not above `n` (at least 2).
fn prime_at_most(n: u32) -> u32 {
    (2..=n.max(2))
        .rev()
        .find(|p| maglev::is_prime(*p))
        .unwrap_or(2)
}

/// `addr` with the bits beyond `prefix` cleared.
fn masked(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = u32::MAX
                .checked_shl(32 - prefix.min(32) as u32)
                .unwrap_or(0);
            IpAddr::from((bits & mask).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = u128::MAX
                .checked_shl(128 - prefix.min(128) as u32)
                .unwrap_or(0);
            IpAddr::from((bits & mask).to_be_bytes())
        }
    }
}

fn maglev_key(addr: IpAddr) -> u64 {
    let (b, family) = addr_bytes(addr);
    let hi = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
    let lo = u64::from_be_bytes(b[8..].try_into().expect("8 bytes"));
    hi ^ lo.rotate_left(29) ^ family as u64
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
            max_services,
            ring_stride,
            services: BTreeMap::new(),
            ring_shadow: vec![Vec::new(); max_services as usize * 2],
            free_backend_ids: (0..MAX_BACKENDS).collect(),
            next_gen: 1,
            tx_port_slots: BTreeMap::new(),
            owned: None,
        })
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

    fn zero_counter(&mut self, which: CounterMap, index: u32) -> Result<()> {
        let zeros = PerCpuValues::try_from(vec![Counter::default(); self.nr_cpus])
            .map_err(|e| DataplaneError::Options(format!("per-CPU values: {e}")))?;
        match which {
            CounterMap::Vip => self
                .vip_stats
                .set(index, zeros, 0)
                .map_ctx(map_names::VIP_STATS),
            CounterMap::Backend => self
                .backend_stats
                .set(index, zeros, 0)
                .map_ctx(map_names::BACKEND_STATS),
        }
    }

    /// Adds a service or changes its configuration. A new service has no backend
    /// (its packets are dropped and counted) until `set_backends`.
    pub fn upsert_service(&mut self, key: ServiceKey, config: ServiceConfig) -> Result<()> {
        if config.maglev_size > self.ring_stride {
            return Err(DataplaneError::RingTooLarge {
                service: key,
                size: config.maglev_size,
                max: self.ring_stride,
            });
        }
        if !maglev::is_prime(config.maglev_size) {
            return Err(maglev::MaglevError::SizeNotPrime {
                size: config.maglev_size,
            }
            .into());
        }
        match self.services.get_mut(&key) {
            Some(state) => {
                let resize = state.config.maglev_size != config.maglev_size;
                state.config = config;
                if resize && state.table.is_some() {
                    self.rebuild(key)?;
                } else {
                    self.write_vip(key)?;
                }
            }
            None => {
                let used: BTreeSet<u32> = self.services.values().map(|s| s.vip_id).collect();
                let vip_id = (0..self.max_services).find(|id| !used.contains(id)).ok_or(
                    DataplaneError::TooManyServices {
                        service: key,
                        max: self.max_services,
                    },
                )?;
                self.zero_counter(CounterMap::Vip, vip_id)?;
                self.services.insert(
                    key,
                    ServiceState {
                        vip_id,
                        config,
                        active_slot: 0,
                        table: None,
                        backends: BTreeMap::new(),
                        steering: Steering::default(),
                        sphere_keys: [Vec::new(), Vec::new()],
                    },
                );
                self.write_vip(key)?;
            }
        }
        self.write_addr(key.addr)
    }

    /// Removes a service and its backends. Its connections die with it.
    pub fn remove_service(&mut self, key: ServiceKey) -> Result<()> {
        let state = self
            .services
            .remove(&key)
            .ok_or(DataplaneError::UnknownService(key))?;
        match self.vips.remove(&Self::vip_key(&key)) {
            Ok(()) => {}
            Err(e) if is_missing(&e) => {}
            Err(e) => {
                return Err(DataplaneError::Map {
                    name: map_names::VIPS,
                    source: e,
                })
            }
        }
        for backend in state.backends.values() {
            self.deactivate(backend.id)?;
        }
        for k in state.sphere_keys.iter().flatten() {
            self.remove_sphere_key(*k)?;
        }
        self.write_addr(key.addr)
    }

    fn remove_sphere_key(&mut self, (prefix_len, data): (u32, SphereKey)) -> Result<()> {
        match self.spheres.remove(&LpmKey::new(prefix_len, data)) {
            Ok(()) => Ok(()),
            Err(e) if is_missing(&e) => Ok(()),
            Err(e) => Err(DataplaneError::Map {
                name: map_names::SPHERES,
                source: e,
            }),
        }
    }

    /// Sets how the service's new flows pick a backend (source partitioning, client
    /// subnet → sphere); rebuilds its table when that changes.
    pub fn set_steering(&mut self, key: ServiceKey, steering: Steering) -> Result<()> {
        let state = self
            .services
            .get_mut(&key)
            .ok_or(DataplaneError::UnknownService(key))?;
        if state.steering == steering {
            return Ok(());
        }
        for (net, _, _) in &steering.topology {
            if net.is_ipv4() != key.addr.is_ipv4() {
                return Err(DataplaneError::Options(format!(
                    "service {key}: topology subnet {net} is of the other address family"
                )));
            }
        }
        state.steering = steering;
        if state.table.is_some() {
            self.rebuild(key)?;
        } else {
            self.write_vip(key)?;
        }
        Ok(())
    }

    /// Sets the service's backends to exactly `backends`: adds the new ones, updates
    /// weights and routes, removes the ones not listed, and rebuilds the Maglev table.
    pub fn set_backends(
        &mut self,
        key: ServiceKey,
        backends: &[BackendConfig],
    ) -> Result<TableUpdate> {
        let state = self
            .services
            .get(&key)
            .ok_or(DataplaneError::UnknownService(key))?;
        let mut listed = BTreeSet::new();
        for b in backends {
            if b.addr.is_ipv4() != key.addr.is_ipv4() {
                return Err(DataplaneError::FamilyMismatch {
                    service: key,
                    backend: b.addr,
                });
            }
            if !listed.insert(b.addr) {
                return Err(DataplaneError::DuplicateBackend {
                    service: key,
                    backend: b.addr,
                });
            }
        }
        // Nothing changed (the daemon re-syncs a service for many reasons): no table
        // to rebuild, which is the expensive part.
        let unchanged = state.table.is_some()
            && backends.len() == state.backends.len()
            && backends.iter().all(|b| {
                state.backends.get(&b.addr).is_some_and(|s| {
                    s.weight == b.weight && self.known_route(&b.route) == Some(s.route)
                })
            });
        if unchanged {
            let size = state.table.as_ref().map_or(0, |t| t.len() as u32);
            return Ok(TableUpdate {
                table_size: size,
                cells_written: 0,
            });
        }
        let newcomers = backends
            .iter()
            .filter(|b| !state.backends.contains_key(&b.addr))
            .count();
        if newcomers > self.free_backend_ids.len() {
            let backend = backends
                .iter()
                .find(|b| !state.backends.contains_key(&b.addr))
                .map(|b| b.addr)
                .expect("there is a newcomer");
            return Err(DataplaneError::TooManyBackends {
                service: key,
                backend,
                max: MAX_BACKENDS,
            });
        }

        // Backends and routes first: nothing names them yet.
        for b in backends {
            let route = self.route(&b.route)?;
            let existing = self
                .services
                .get(&key)
                .and_then(|s| s.backends.get(&b.addr))
                .cloned();
            match existing {
                Some(mut current) => {
                    if current.route != route {
                        // In place: a packet racing this write may see part of the old
                        // MACs and be lost, as during any route change; never another
                        // backend's MAC, since the slot is this backend's alone.
                        self.routes
                            .set(current.id, route, 0)
                            .map_ctx(map_names::ROUTES)?;
                        current.route = route;
                    }
                    current.weight = b.weight;
                    self.state_mut(key).backends.insert(b.addr, current);
                }
                None => {
                    let id = self.free_backend_ids.pop_first().expect("counted above");
                    let gen = self.next_gen;
                    self.next_gen = self.next_gen.wrapping_add(1).max(1);
                    self.routes.set(id, route, 0).map_ctx(map_names::ROUTES)?;
                    self.zero_counter(CounterMap::Backend, id)?;
                    let (addr, family) = addr_bytes(b.addr);
                    let entry = Backend {
                        addr,
                        family,
                        _pad: 0,
                        flags: BACKEND_F_ACTIVE,
                        gen,
                        route_id: id,
                    };
                    self.backends
                        .set(id, entry, 0)
                        .map_ctx(map_names::BACKENDS)?;
                    self.state_mut(key).backends.insert(
                        b.addr,
                        BackendState {
                            id,
                            weight: b.weight,
                            route,
                        },
                    );
                }
            }
        }
        let gone: Vec<IpAddr> = self.services[&key]
            .backends
            .keys()
            .filter(|a| !listed.contains(*a))
            .copied()
            .collect();
        let mut removed = Vec::new();
        for addr in gone {
            removed.push(
                self.state_mut(key)
                    .backends
                    .remove(&addr)
                    .expect("listed")
                    .id,
            );
        }

        let update = self.rebuild(key)?;
        // After the flip: no table names these any more.
        for id in removed {
            self.deactivate(id)?;
        }
        Ok(update)
    }

    fn state_mut(&mut self, key: ServiceKey) -> &mut ServiceState {
        self.services
            .get_mut(&key)
            .expect("caller checked the service exists")
    }

    fn deactivate(&mut self, id: u32) -> Result<()> {
        self.backends
            .set(id, Backend::default(), 0)
            .map_ctx(map_names::BACKENDS)?;
        self.free_backend_ids.insert(id);
        Ok(())
    }

    fn route(&mut self, route: &L2Route) -> Result<Route> {
        if let Egress::Interface { ifindex } = route.egress {
            self.tx_port(ifindex)?;
        }
        Ok(self.known_route(route).expect("the egress has a slot now"))
    }

    /// The `Route` for `route` if its egress already has a devmap slot.
    fn known_route(&self, route: &L2Route) -> Option<Route> {
        let tx_port = match route.egress {
            Egress::Ingress => 0,
            Egress::Interface { ifindex } => *self.tx_port_slots.get(&ifindex)?,
        };
        Some(Route {
            mode: ROUTE_MODE_L2_DSR,
            tx_port,
            dst_mac: route.dst_mac,
            src_mac: route.src_mac,
        })
    }

    /// The devmap slot of an egress interface; slot 0 stays "same interface".
    fn tx_port(&mut self, ifindex: u32) -> Result<u32> {
        if let Some(&slot) = self.tx_port_slots.get(&ifindex) {
            return Ok(slot);
        }
        let slot = self.tx_port_slots.len() as u32 + 1;
        if slot >= MAX_TX_PORTS {
            return Err(DataplaneError::TooManyTxPorts {
                max: MAX_TX_PORTS - 1,
            });
        }
        self.tx_ports.set(slot, ifindex, None, 0).map_err(|e| {
            DataplaneError::Options(format!("devmap slot {slot} for ifindex {ifindex}: {e}"))
        })?;
        self.tx_port_slots.insert(ifindex, slot);
        Ok(slot)
    }

    /// Builds the service's table from its backends into the spare slot and flips.
    fn rebuild(&mut self, key: ServiceKey) -> Result<TableUpdate> {
        let stride = self.ring_stride;
        let state = &self.services[&key];
        let size = state.config.maglev_size;
        let members: Vec<MaglevBackend> = state
            .backends
            .iter()
            .map(|(addr, b)| MaglevBackend {
                id: b.id,
                key: maglev_key(*addr),
                weight: b.weight,
            })
            .collect();
        let steering = &state.steering;
        let spheres: BTreeSet<&String> = steering.topology.iter().map(|(_, _, s)| s).collect();
        // Sphere tables share the slot with the whole service's table: each gets an
        // equal part, and Maglev tables stay prime.
        let part = if spheres.is_empty() {
            size
        } else {
            prime_at_most(size.min(stride / (spheres.len() as u32 + 1)))
        };
        let table_of = |members: &[MaglevBackend], previous: Option<&[u32]>| {
            if steering.source_partition {
                // Address order, as the SPM generator's `source` rule.
                Ok(members
                    .iter()
                    .filter(|m| m.weight > 0)
                    .map(|m| m.id)
                    .collect::<Vec<u32>>())
            } else {
                maglev::build(members, part, previous)
            }
        };
        let history = (spheres.is_empty() && !steering.source_partition)
            .then_some(state.table.as_deref())
            .flatten();
        let table = table_of(&members, history)?;
        let mut cells = table.clone();
        let mut sphere_tables: BTreeMap<&String, (u32, u32)> = BTreeMap::new();
        for sphere in &spheres {
            let inside: Vec<MaglevBackend> = state
                .backends
                .iter()
                .zip(&members)
                .filter(|((addr, _), _)| steering.spheres.get(*addr) == Some(*sphere))
                .map(|(_, m)| *m)
                .collect();
            // A sphere without a live instance keeps its clients on the whole table.
            if inside.iter().all(|m| m.weight == 0) {
                continue;
            }
            let t = table_of(&inside, None)?;
            sphere_tables.insert(sphere, (cells.len() as u32, t.len() as u32));
            cells.extend(t);
        }
        let spare = 1 - state.active_slot;
        let shadow_index = state.vip_id as usize * 2 + spare;
        let offset = shadow_index as u32 * stride;
        let sphere_keys: Vec<((u32, SphereKey), SphereMeta)> = steering
            .topology
            .iter()
            .filter_map(|(net, prefix, sphere)| {
                let (offset_in, size) = *sphere_tables.get(sphere)?;
                let (addr, _) = addr_bytes(masked(*net, *prefix));
                Some((
                    (
                        32 + *prefix as u32,
                        SphereKey {
                            ring_offset: offset,
                            addr,
                        },
                    ),
                    SphereMeta {
                        offset: offset_in,
                        size,
                    },
                ))
            })
            .collect();

        let shadow = &mut self.ring_shadow[shadow_index];
        if shadow.len() < cells.len() {
            shadow.resize(cells.len(), 0);
        }
        let mut written = 0;
        for (cell, id) in maglev::delta(&shadow[..cells.len()], &cells) {
            self.ring
                .set(offset + cell, id, 0)
                .map_ctx(map_names::MAGLEV_RING)?;
            written += 1;
        }
        shadow[..cells.len()].copy_from_slice(&cells);

        // The spare slot's subnet rules before the flip; the old slot's after it.
        let stale = std::mem::take(&mut self.state_mut(key).sphere_keys[spare]);
        for ((prefix_len, data), v) in &sphere_keys {
            self.spheres
                .insert(&LpmKey::new(*prefix_len, *data), v, 0)
                .map_ctx(map_names::SPHERES)?;
        }
        for k in stale {
            if !sphere_keys.iter().any(|(n, _)| *n == k) {
                self.remove_sphere_key(k)?;
            }
        }

        let state = self.state_mut(key);
        let old = state.active_slot;
        state.active_slot = spare;
        state.table = Some(table);
        state.sphere_keys[spare] = sphere_keys.into_iter().map(|(k, _)| k).collect();
        self.write_vip(key)?;
        for k in std::mem::take(&mut self.state_mut(key).sphere_keys[old]) {
            self.remove_sphere_key(k)?;
        }
        Ok(TableUpdate {
            table_size: size,
            cells_written: written,
        })
    }

    fn write_vip(&mut self, key: ServiceKey) -> Result<()> {
        let state = &self.services[&key];
        let slot = state.vip_id * 2 + state.active_slot as u32;
        let meta = VipMeta {
            vip_id: state.vip_id,
            flags: (if state.config.pass_irregular {
                VIP_F_PASS_IRREGULAR
            } else {
                0
            }) | (if state.config.epoch_resteer {
                VIP_F_EPOCH_RESTEER
            } else {
                0
            }) | (if state.steering.source_partition {
                VIP_F_SRC_PARTITION
            } else {
                0
            }) | (if state.steering.topology.is_empty() {
                0
            } else {
                VIP_F_TOPOLOGY
            }) | (if state.config.unavailable {
                VIP_F_UNAVAILABLE
            } else {
                0
            }),
            ring_offset: slot * self.ring_stride,
            ring_size: state.table.as_ref().map_or(0, |t| t.len() as u32),
            epoch: state.config.epoch,
        };
        self.vips
            .insert(Self::vip_key(&key), meta, 0)
            .map_ctx(map_names::VIPS)
    }

    /// Keeps `VIP_ADDRS` equal to the set of service addresses, with the OR of their
    /// fragment policies.
    fn write_addr(&mut self, addr: IpAddr) -> Result<()> {
        let (bytes, family) = addr_bytes(addr);
        let key = AddrKey {
            addr: bytes,
            family,
            _pad: [0; 3],
        };
        let mut on_addr = self
            .services
            .iter()
            .filter(|(k, _)| k.addr == addr)
            .peekable();
        let owned = self.owned.as_ref().is_none_or(|o| o.contains(&addr));
        if on_addr.peek().is_none() || !owned {
            return match self.vip_addrs.remove(&key) {
                Ok(()) => Ok(()),
                Err(e) if is_missing(&e) => Ok(()),
                Err(e) => Err(DataplaneError::Map {
                    name: map_names::VIP_ADDRS,
                    source: e,
                }),
            };
        }
        let pass = on_addr.any(|(_, s)| s.config.pass_irregular);
        let meta = AddrMeta {
            flags: if pass { ADDR_F_PASS_IRREGULAR } else { 0 },
        };
        self.vip_addrs
            .insert(key, meta, 0)
            .map_ctx(map_names::VIP_ADDRS)
    }

    /// The routes the maps hold for a service's backends, with their weights.
    pub fn current_backends(&self, key: ServiceKey) -> BTreeMap<IpAddr, (u32, L2Route)> {
        let Some(state) = self.services.get(&key) else {
            return BTreeMap::new();
        };
        state
            .backends
            .iter()
            .map(|(addr, b)| {
                let egress = match b.route.tx_port {
                    0 => Egress::Ingress,
                    slot => Egress::Interface {
                        ifindex: self
                            .tx_port_slots
                            .iter()
                            .find(|(_, s)| **s == slot)
                            .map_or(0, |(i, _)| *i),
                    },
                };
                let route = L2Route {
                    dst_mac: b.route.dst_mac,
                    src_mac: b.route.src_mac,
                    egress,
                };
                (*addr, (b.weight, route))
            })
            .collect()
    }

    /// Switches to cluster mode: from now on only addresses passed to `set_owned`
    /// are served; all others leave `VIP_ADDRS` at once.
    pub fn own_only(&mut self, owned: BTreeSet<IpAddr>) -> Result<()> {
        let all: BTreeSet<IpAddr> = self
            .services
            .keys()
            .map(|k| k.addr)
            .chain(owned.iter().copied())
            .collect();
        self.owned = Some(owned);
        for a in all {
            self.write_addr(a)?;
        }
        Ok(())
    }

    /// Starts or stops serving `addr` (cluster mode).
    pub fn set_owned(&mut self, addr: IpAddr, owned: bool) -> Result<()> {
        let set = self.owned.get_or_insert_with(BTreeSet::new);
        if owned {
            set.insert(addr);
        } else {
            set.remove(&addr);
        }
        self.write_addr(addr)
    }

    pub fn services(&self) -> impl Iterator<Item = &ServiceKey> {
        self.services.keys()
    }

    /// The data-plane id of a backend of a service (the index of its counters).
    pub fn backend_id(&self, key: ServiceKey, addr: IpAddr) -> Result<u32> {
        self.services
            .get(&key)
            .ok_or(DataplaneError::UnknownService(key))?
            .backends
            .get(&addr)
            .map(|b| b.id)
            .ok_or(DataplaneError::UnknownBackend {
                service: key,
                backend: addr,
            })
    }

    fn sum(values: PerCpuValues<Counter>) -> Counter {
        values.iter().fold(Counter::default(), |acc, c| Counter {
            packets: acc.packets + c.packets,
            bytes: acc.bytes + c.bytes,
        })
    }

    pub fn service_counter(&self, key: ServiceKey) -> Result<Counter> {
        let id = self
            .services
            .get(&key)
            .ok_or(DataplaneError::UnknownService(key))?
            .vip_id;
        self.vip_stats
            .get(&id, 0)
            .map(Self::sum)
            .map_ctx(map_names::VIP_STATS)
    }

    pub fn backend_counter(&self, key: ServiceKey, addr: IpAddr) -> Result<Counter> {
        let id = self.backend_id(key, addr)?;
        self.backend_stats
            .get(&id, 0)
            .map(Self::sum)
            .map_ctx(map_names::BACKEND_STATS)
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

    /// Entries in the connection table (all CPUs share the key space).
    pub fn conn_count(&self) -> usize {
        self.conns.keys().filter(|k| k.is_ok()).count()
    }
}

/// What the manager knows that the maps do not say: which backend address owns
/// which id, its weight and route, and the services' configurations. Saved after every
/// change by the daemon; with the pinned maps it lets a restarted daemon carry on.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snapshot {
    pub services: Vec<ServiceSnapshot>,
    /// (ifindex, devmap slot)
    pub tx_ports: Vec<(u32, u32)>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSnapshot {
    pub key: ServiceKey,
    pub config: ServiceConfig,
    pub backends: Vec<BackendSnapshot>,
    #[serde(default)]
    pub steering: Steering,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendSnapshot {
    pub addr: IpAddr,
    pub id: u32,
    pub weight: u32,
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub tx_port: u32,
}

impl MapManager {
    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            services: self
                .services
                .iter()
                .map(|(key, s)| ServiceSnapshot {
                    key: *key,
                    config: s.config,
                    backends: s
                        .backends
                        .iter()
                        .map(|(addr, b)| BackendSnapshot {
                            addr: *addr,
                            id: b.id,
                            weight: b.weight,
                            dst_mac: b.route.dst_mac,
                            src_mac: b.route.src_mac,
                            tx_port: b.route.tx_port,
                        })
                        .collect(),
                    steering: s.steering.clone(),
                })
                .collect(),
            tx_ports: self.tx_port_slots.iter().map(|(i, s)| (*i, *s)).collect(),
        }
    }

    fn read_ring(&self, offset: u32, len: u32) -> Result<Vec<u32>> {
        (offset..offset + len)
            .map(|i| self.ring.get(&i, 0).map_ctx(map_names::MAGLEV_RING))
            .collect()
    }

    /// Takes over maps that an earlier run filled (pinned maps), using its snapshot
    /// for what the maps do not record. The maps are the truth where both speak: a
    /// service's id, live table slot and table come from `VIPS` and the ring, so a
    /// snapshot that missed the last change can never make the next table write go
    /// to the live slot. Backends the snapshot names but the maps no longer hold
    /// are dropped; call `collect_garbage` after reconciling with the desired state.
    pub fn restore(&mut self, snapshot: &Snapshot) -> Result<()> {
        let vips: Vec<(VipKey, VipMeta)> = self
            .vips
            .iter()
            .collect::<std::result::Result<_, _>>()
            .map_ctx(map_names::VIPS)?;
        let known: BTreeMap<ServiceKey, &ServiceSnapshot> =
            snapshot.services.iter().map(|s| (s.key, s)).collect();
        let mut max_gen = 0;
        for id in 0..MAX_BACKENDS {
            let b = self.backends.get(&id, 0).map_ctx(map_names::BACKENDS)?;
            max_gen = max_gen.max(b.gen);
        }
        self.next_gen = max_gen.wrapping_add(1).max(1);
        self.tx_port_slots = snapshot.tx_ports.iter().copied().collect();
        let mut sphere_keys: BTreeMap<u32, Vec<(u32, SphereKey)>> = BTreeMap::new();
        for k in self.spheres.keys() {
            let k = k.map_ctx(map_names::SPHERES)?;
            let data = k.data();
            sphere_keys
                .entry(data.ring_offset)
                .or_default()
                .push((k.prefix_len(), data));
        }

        for (vkey, meta) in vips {
            let Some(key) = service_key_of(&vkey) else {
                continue;
            };
            let slot = (meta.ring_offset / self.ring_stride) as usize % 2;
            let table = if meta.ring_size > 0 {
                Some(self.read_ring(meta.ring_offset, meta.ring_size)?)
            } else {
                None
            };
            let spare_offset = (meta.vip_id * 2 + (1 - slot) as u32) * self.ring_stride;
            let spare_len = meta
                .ring_size
                .max(known.get(&key).map_or(0, |s| s.config.maglev_size));
            let steered = meta.flags & (VIP_F_SRC_PARTITION | VIP_F_TOPOLOGY) != 0;
            // Sphere tables lie beyond `ring_size`: read whole slots to know them.
            let topology = meta.flags & VIP_F_TOPOLOGY != 0;
            let spare_len = if topology {
                self.ring_stride
            } else {
                spare_len
            };
            let spare = self.read_ring(spare_offset, spare_len.min(self.ring_stride))?;
            let active_cells = if topology {
                Some(self.read_ring(meta.ring_offset, self.ring_stride)?)
            } else {
                table.clone()
            };
            let mut config = known.get(&key).map(|s| s.config).unwrap_or_default();
            config.pass_irregular = meta.flags & VIP_F_PASS_IRREGULAR != 0;
            config.epoch_resteer = meta.flags & VIP_F_EPOCH_RESTEER != 0;
            config.unavailable = meta.flags & VIP_F_UNAVAILABLE != 0;
            config.epoch = meta.epoch;
            if let Some(t) = table.as_ref().filter(|_| !steered) {
                config.maglev_size = t.len() as u32;
            }
            let mut backends = BTreeMap::new();
            for b in known
                .get(&key)
                .map(|s| s.backends.as_slice())
                .unwrap_or(&[])
            {
                let live = self.backends.get(&b.id, 0).map_ctx(map_names::BACKENDS)?;
                if live.flags & BACKEND_F_ACTIVE == 0 || addr_bytes(b.addr).0 != live.addr {
                    continue;
                }
                self.free_backend_ids.remove(&b.id);
                backends.insert(
                    b.addr,
                    BackendState {
                        id: b.id,
                        weight: b.weight,
                        route: Route {
                            mode: ROUTE_MODE_L2_DSR,
                            tx_port: b.tx_port,
                            dst_mac: b.dst_mac,
                            src_mac: b.src_mac,
                        },
                    },
                );
            }
            let base = meta.vip_id as usize * 2;
            self.ring_shadow[base + slot] = active_cells.unwrap_or_default();
            self.ring_shadow[base + 1 - slot] = spare;
            let slot_keys = |s: usize| {
                sphere_keys
                    .get(&((meta.vip_id * 2 + s as u32) * self.ring_stride))
                    .cloned()
                    .unwrap_or_default()
            };
            let keys = [slot_keys(0), slot_keys(1)];
            let steering = known
                .get(&key)
                .map(|s| s.steering.clone())
                .unwrap_or_default();
            self.services.insert(
                key,
                ServiceState {
                    vip_id: meta.vip_id,
                    config,
                    active_slot: slot,
                    table,
                    backends,
                    steering,
                    sphere_keys: keys,
                },
            );
        }
        Ok(())
    }

    /// Deactivates backends that are active in the map but owned by no service and
    /// named by no live table: leftovers of a run that died between writing the maps
    /// and saving its snapshot. Returns how many.
    pub fn collect_garbage(&mut self) -> Result<u32> {
        let mut in_use: BTreeSet<u32> = BTreeSet::new();
        for s in self.services.values() {
            in_use.extend(s.backends.values().map(|b| b.id));
            if let Some(t) = &s.table {
                in_use.extend(t.iter().copied().filter(|&id| id != lb_common::RING_EMPTY));
            }
        }
        let mut collected = 0;
        for id in 0..MAX_BACKENDS {
            if in_use.contains(&id) {
                continue;
            }
            let b = self.backends.get(&id, 0).map_ctx(map_names::BACKENDS)?;
            if b.flags & BACKEND_F_ACTIVE != 0 {
                self.deactivate(id)?;
                collected += 1;
            }
        }
        Ok(collected)
    }
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
    let addr = match key.family {
        FAMILY_V4 => IpAddr::from(<[u8; 4]>::try_from(&key.addr[..4]).ok()?),
        FAMILY_V6 => IpAddr::from(key.addr),
        _ => return None,
    };
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

#[derive(Clone, Copy)]
enum CounterMap {
    Vip,
    Backend,
}
