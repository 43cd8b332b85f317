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
        Array, DevMap, HashMap, IterableMap, MapData, PerCpuArray, PerCpuValues,
    },
    Ebpf,
};
use lb_common::{
    map_names, AddrKey, AddrMeta, Backend, ConnEntry, Counter, FlowKey, GlobalStats, Route,
    SphereKey, SphereMeta, VipKey, VipMeta, BACKEND_F_ACTIVE, FAMILY_V4, FAMILY_V6,
    MAX_SPHERE_RULES, MAX_TX_PORTS, PROTO_TCP, PROTO_UDP, ROUTE_MODE_GUE, ROUTE_MODE_IPIP,
    ROUTE_MODE_L2_DSR, ROUTE_MODE_NONE,
};

use super::{
    error::{DataplaneError, MapResultExt, Result},
    layout::addr_bytes,
    loader::LoadOptions,
    Contents, Dataplane, Held, Limits, ServiceCounters, Usage,
};
use crate::{
    model::{BackendRoute, Egress, Encap, Forward, Proto, ServiceKey},
    plan::ServicePlan,
};

mod batch;
mod restore;
mod ring;
pub(super) mod sets;
mod state;
pub mod sweep;
mod write;

use ring::{Extent, Extents, Mapped, Ring};
use sets::{ConnSets, Family};
use state::StateWords;

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
    /// Where each slot's table lies in the ring (`None`: the slot holds no cells).
    slots: [Option<Extent>; 2],
    /// Ring cells counted against the ring for it (`dataplane::ring_reservation`).
    reserved: u64,
    /// Each slot's trailer: the digest of the plan its table was built from and the
    /// table's fingerprint (`layout::TRAILER_CELLS`).
    trailers: [Option<(u64, u64)>; 2],
}

/// A trailer's cells: the plan digest and the fingerprint, low halves first.
fn trailer_cells(digest: u64, fingerprint: u64) -> [u32; 4] {
    [
        digest as u32,
        (digest >> 32) as u32,
        fingerprint as u32,
        (fingerprint >> 32) as u32,
    ]
}

fn trailer_of(cells: &[u32]) -> (u64, u64) {
    (
        cells[0] as u64 | (cells[1] as u64) << 32,
        cells[2] as u64 | (cells[3] as u64) << 32,
    )
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
    vip_filter: Array<MapData, u64>,
    vips: HashMap<MapData, VipKey, VipMeta>,
    /// Each service's flags and epoch, repeated from `VIPS` for established flows.
    vip_state: StateWords,
    ring: Ring,
    /// The ring's cells that no slot holds.
    extents: Extents,
    backends: Array<MapData, Backend>,
    /// `BACKENDS` as memory, for reading it whole.
    backends_view: Mapped,
    routes: Array<MapData, Route>,
    tx_ports: DevMap<MapData>,
    conns_v4: ConnSets,
    conns_v6: ConnSets,
    /// Entries in `CONN_SETS_V4` and `CONN_SETS_V6`, as last counted by the sweeping
    /// thread.
    conn_entries: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
    idle_timeouts: sweep::IdleTimeouts,
    vip_stats: PerCpuArray<MapData, Counter>,
    backend_stats: PerCpuArray<MapData, Counter>,
    global_stats: PerCpuArray<MapData, GlobalStats>,
    spheres: LpmTrie<MapData, SphereKey, SphereMeta>,

    nr_cpus: usize,
    limits: Limits,
    services: BTreeMap<ServiceKey, ServiceState>,
    free_backend_ids: BTreeSet<u32>,
    free_vip_ids: BTreeSet<u32>,
    /// Above every generation any `BACKENDS` entry holds or held.
    next_gen: u32,
    tx_port_slots: BTreeMap<u32, u32>,
    served: Option<BTreeSet<IpAddr>>,
    /// Test hook: after this many more map writes every write fails and nothing is
    /// undone, as if the process had died there.
    crash_after: Option<u64>,
    /// Tables built (`layout::layout`) by this manager.
    tables_built: u64,
    /// What every service in `services` holds, added up: kept as each service is
    /// written or removed, so that the check before one service's write costs that
    /// service, not the node (summed afresh, 10,000 services took seconds to apply).
    tally: Tally,
}

/// Backends, subnet rules and ring cells held, over one service or all.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Tally {
    backends: usize,
    rules: usize,
    ring_cells: u64,
}

impl Tally {
    fn of(s: &ServiceState) -> Tally {
        Tally {
            backends: s.backends.len(),
            rules: s.sphere_keys[s.active_slot].len(),
            ring_cells: s.reserved,
        }
    }
}

/// A counter's per-CPU values added up.
fn sum_cpus<'a>(values: impl Iterator<Item = &'a Counter>) -> Counter {
    values.fold(Counter::default(), |acc, c| Counter {
        packets: acc.packets + c.packets,
        bytes: acc.bytes + c.bytes,
    })
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T>
where
    T: TryFrom<aya::maps::Map>,
{
    ebpf.take_map(name)
        .and_then(|m| T::try_from(m).ok())
        .ok_or(DataplaneError::MapShape { name })
}

/// An array map's data, taken from the loaded object (for the ones lbd maps as
/// memory).
fn take_array(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData> {
    match ebpf.take_map(name) {
        Some(aya::maps::Map::Array(data)) => Ok(data),
        _ => Err(DataplaneError::MapShape { name }),
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
    /// The maps of a loaded object, sized as `options` say, whose program was given
    /// `seeds` as the connection tables' hash keys (IPv4, IPv6).
    pub(crate) fn new(ebpf: &mut Ebpf, options: &LoadOptions, seeds: [u64; 2]) -> Result<Self> {
        let nr_cpus = aya::util::nr_cpus()
            .map_err(|(what, e)| DataplaneError::Options(format!("reading {what}: {e}")))?;
        let ring = Ring::new(take_array(ebpf, map_names::MAGLEV_RING)?)?;
        let vip_state = StateWords::new(take_array(ebpf, map_names::VIP_STATE)?)?;
        let max_services = options.max_services;
        let max_backends = options.max_backends;
        let backends: Array<MapData, Backend> = take(ebpf, map_names::BACKENDS)?;
        let backends_view = Mapped::view(
            backends.map(),
            map_names::BACKENDS,
            std::mem::size_of::<Backend>(),
        )?;
        let mut m = Self {
            vip_addrs: take(ebpf, map_names::VIP_ADDRS)?,
            vip_filter: take(ebpf, map_names::VIP_FILTER)?,
            vips: take(ebpf, map_names::VIPS)?,
            vip_state,
            extents: Extents::new(ring.cells()),
            ring,
            backends,
            backends_view,
            routes: take(ebpf, map_names::ROUTES)?,
            tx_ports: take(ebpf, map_names::TX_PORTS)?,
            conns_v4: ConnSets::new(Family::V4, take_array(ebpf, Family::V4.name())?, seeds[0])?,
            conns_v6: ConnSets::new(Family::V6, take_array(ebpf, Family::V6.name())?, seeds[1])?,
            conn_entries: Default::default(),
            idle_timeouts: sweep::IdleTimeouts::of(options, sweep::hz()),
            vip_stats: take(ebpf, map_names::VIP_STATS)?,
            backend_stats: take(ebpf, map_names::BACKEND_STATS)?,
            global_stats: take(ebpf, map_names::GLOBAL_STATS)?,
            spheres: take(ebpf, map_names::SPHERES)?,
            nr_cpus,
            limits: Limits {
                services: max_services,
                backends: max_backends,
                tables: options.tables(),
                ring_cells: options.ring_cells as u64,
                sphere_rules: MAX_SPHERE_RULES,
                tx_ports: MAX_TX_PORTS - 1,
            },
            services: BTreeMap::new(),
            free_backend_ids: (0..max_backends).collect(),
            free_vip_ids: (0..max_services).collect(),
            next_gen: 1,
            tx_port_slots: BTreeMap::new(),
            served: None,
            crash_after: None,
            tables_built: 0,
            tally: Tally::default(),
        };
        m.sweep_apart()?;
        // Pinned `VIP_ADDRS` from a build without the filter, or a filter left behind
        // by a crash between the two writes: make it say what the table holds.
        m.sync_vip_filter()?;
        Ok(m)
    }

    /// The fingerprint of the service's live table if the maps hold `plan` already:
    /// the live slot's trailer names a plan of this digest, and `VIPS`, the backends
    /// and their routes say what the plan says.
    fn unchanged(&self, key: ServiceKey, plan: &ServicePlan, digest: u64) -> Option<u64> {
        let s = self.services.get(&key)?;
        let meta = s.meta?;
        let (d, fingerprint) = s.trailers[s.active_slot]?;
        if d != digest
            || meta.flags != super::vip_flags(plan)
            || meta.epoch != plan.config.epoch
            || s.backends.len() != plan.backends.len()
        {
            return None;
        }
        for (addr, b) in &plan.backends {
            let held = s.backends.get(addr)?;
            if let Some(BackendRoute {
                egress: Egress::Interface { ifindex },
                ..
            }) = b.route
            {
                self.tx_port_slots.get(&ifindex)?;
            }
            if held.route != self.route_entry(b.route.as_ref()) {
                return None;
            }
        }
        Some(fingerprint)
    }

    /// Walks the connection tables now (tests and benchmarks: the daemon reads the
    /// count the counting thread keeps).
    pub fn count_connections_now(&self) -> usize {
        self.conns_v4.count() + self.conns_v6.count()
    }

    /// Sweeps the connection tables on a thread of its own, through mappings of its
    /// own: a pass over 16M slots takes a while, which must not hold up the daemon
    /// (nor anything waiting for it). It frees idle slots, publishes the count left,
    /// and rests at least as long as the pass took (at least a second); it ends once
    /// the manager is gone.
    fn sweep_apart(&self) -> Result<()> {
        use std::sync::{atomic::Ordering, Arc};
        let sets_v4 = self.conns_v4.view()?;
        let sets_v6 = self.conns_v6.view()?;
        let timeouts = self.idle_timeouts;
        let count = Arc::clone(&self.conn_entries);
        std::thread::Builder::new()
            .name("lbd-conn-sweep".into())
            .spawn(move || {
                let mut clock = None;
                while Arc::strong_count(&count) > 1 {
                    let t = std::time::Instant::now();
                    // One clock for both tables: the data plane stamps them alike.
                    let v4 = sets_v4.sweep(clock, &timeouts);
                    let v6 = sets_v6.sweep(v4.newest, &timeouts);
                    let swept = v4.and(v6);
                    clock = swept.newest;
                    count[0].store(v4.kept, Ordering::Relaxed);
                    count[1].store(v6.kept, Ordering::Relaxed);
                    if swept.expired > 0 {
                        tracing::debug!(
                            expired = swept.expired,
                            kept = swept.kept,
                            took = ?t.elapsed(),
                            "connection table swept"
                        );
                    }
                    let rest = t.elapsed().max(std::time::Duration::from_secs(1));
                    let until = std::time::Instant::now() + rest;
                    // In short steps, so that it ends soon after the manager.
                    while std::time::Instant::now() < until && Arc::strong_count(&count) > 1 {
                        std::thread::sleep(std::time::Duration::from_millis(50));
                    }
                }
            })
            .map_err(|e| {
                DataplaneError::Options(format!("starting the connection sweeper: {e}"))
            })?;
        Ok(())
    }

    /// One sweep of the connection table with its clock at least `now` (tests: the
    /// daemon's sweeper keeps its clock from walk to walk).
    #[doc(hidden)]
    pub fn sweep_connections_at(&mut self, now: u32) -> Result<sweep::Swept> {
        let v4 = self.conns_v4.sweep(Some(now), &self.idle_timeouts);
        let v6 = self.conns_v6.sweep(v4.newest, &self.idle_timeouts);
        Ok(v4.and(v6))
    }

    /// The `VIP_STATE` word of `key`'s service (0: none), and the id it is at
    /// (tests and tools).
    #[doc(hidden)]
    pub fn state_word(&self, key: ServiceKey) -> Option<(u32, u64)> {
        let id = self.services.get(&key)?.vip_id;
        Some((id, self.state_word_at(id)))
    }

    /// `VIP_STATE` word `id`, whoever holds the id (tests and tools).
    #[doc(hidden)]
    pub fn state_word_at(&self, id: u32) -> u64 {
        self.vip_state.get(id)
    }

    /// Sets `VIP_STATE` word `id` to `word`, as a crash or an older build might
    /// have left it (tests).
    #[doc(hidden)]
    pub fn set_state_word(&mut self, id: u32, word: u64) {
        self.vip_state.put(id, word);
    }

    /// The connection tables' hash keys, IPv4 and IPv6 (tests: each table draws its
    /// own).
    #[doc(hidden)]
    pub fn conn_sets_seeds(&self) -> (u64, u64) {
        (self.conns_v4.seed(), self.conns_v6.seed())
    }

    /// A flow's entry in the connection table (tests and tools).
    #[doc(hidden)]
    pub fn connection(&self, flow: &FlowKey) -> Option<ConnEntry> {
        if flow.family == lb_common::FAMILY_V4 {
            self.conns_v4.get(flow)
        } else {
            self.conns_v6.get(flow)
        }
    }

    /// Writes a flow's entry (tests: an entry stamped at another time).
    #[doc(hidden)]
    pub fn set_connection(&mut self, flow: FlowKey, entry: ConnEntry) -> Result<()> {
        if flow.family == lb_common::FAMILY_V4 {
            self.conns_v4.set(&flow, &entry)
        } else {
            self.conns_v6.set(&flow, &entry)
        }
    }

    /// Sets the filter bit of an address just added to `VIP_ADDRS`.
    pub(super) fn set_vip_filter_bit(&mut self, key: &AddrKey) -> Result<()> {
        let (word, bit) = lb_common::hash::vip_filter_bit(&key.addr, key.family);
        let w = self.vip_filter.get(&word, 0).unwrap_or(0);
        if w & (1 << bit) == 0 {
            self.vip_filter
                .set(word, w | (1 << bit), 0)
                .map_ctx(map_names::VIP_FILTER)?;
        }
        Ok(())
    }

    /// Sets exactly the filter bits of the addresses in `VIP_ADDRS` (after a removal,
    /// and at start).
    pub(super) fn sync_vip_filter(&mut self) -> Result<()> {
        let mut want = [0u64; lb_common::hash::VIP_FILTER_WORDS as usize];
        for key in self.vip_addrs.keys().filter_map(|k| k.ok()) {
            let (word, bit) = lb_common::hash::vip_filter_bit(&key.addr, key.family);
            want[word as usize] |= 1 << bit;
        }
        for (i, w) in want.iter().enumerate() {
            let i = i as u32;
            if self.vip_filter.get(&i, 0).ok() != Some(*w) {
                self.vip_filter
                    .set(i, *w, 0)
                    .map_ctx(map_names::VIP_FILTER)?;
            }
        }
        Ok(())
    }

    /// Benchmark hook: empties the connection table (a used table, as a node that
    /// has run for a while has it, is filled and emptied once before timing).
    #[doc(hidden)]
    pub fn clear_connections(&mut self) -> Result<usize> {
        Ok(self.conns_v4.clear() + self.conns_v6.clear())
    }

    /// How many tables this manager has built (a resume of unchanged services
    /// builds none).
    pub fn tables_built(&self) -> u64 {
        self.tables_built
    }

    /// Whether the usage kept as services are written equals the usage summed over
    /// them (what the tests check after every change, crash and restart).
    pub fn tally_holds(&self) -> bool {
        self.tally == self.tally_afresh()
    }

    /// Test hook: the `n`+1-th map write from now on fails, and so does every one
    /// after it, with nothing undone: what a process killed at that point leaves.
    #[doc(hidden)]
    pub fn crash_after_writes(&mut self, n: u64) {
        self.crash_after = Some(n);
    }

    /// One map write is about to happen.
    fn writing(&mut self) -> Result<()> {
        crate::fault::point("maps.write");
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
        self.backends.set(id, entry, 0).map_ctx(map_names::BACKENDS)
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
    fn route_entry(&self, route: Option<&BackendRoute>) -> Route {
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
        let mut entry = Route {
            mode: ROUTE_MODE_L2_DSR,
            tx_port,
            dst_mac: r.dst_mac,
            src_mac: r.src_mac,
            ..Route::default()
        };
        if let Some(e) = r.encap {
            entry.mode = match e.mode {
                Forward::Gue => ROUTE_MODE_GUE,
                _ => ROUTE_MODE_IPIP,
            };
            entry.outer_src = addr_bytes(e.source).0;
            entry.mtu = e.mtu;
            if e.mode == Forward::Gue {
                entry.gue_port_be = e.gue_port.to_be();
            }
        }
        entry
    }

    /// The route a `Route` entry of a backend of `family` says (read back).
    fn backend_route(&self, r: &Route, family: u8) -> Option<BackendRoute> {
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
        let encap = match r.mode {
            ROUTE_MODE_IPIP | ROUTE_MODE_GUE => Some(Encap {
                mode: if r.mode == ROUTE_MODE_GUE {
                    Forward::Gue
                } else {
                    Forward::Ipip
                },
                source: addr_of(&r.outer_src, family)?,
                mtu: r.mtu,
                gue_port: if r.mode == ROUTE_MODE_GUE {
                    u16::from_be(r.gue_port_be)
                } else {
                    lb_common::GUE_PORT_DEFAULT
                },
            }),
            _ => None,
        };
        Some(BackendRoute {
            dst_mac: r.dst_mac,
            src_mac: r.src_mac,
            egress,
            encap,
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
        sum_cpus(values.iter())
    }
    /// What `key` holds now (nothing if the maps do not hold it).
    fn held_by(&self, key: ServiceKey) -> Tally {
        self.services.get(&key).map(Tally::of).unwrap_or_default()
    }

    /// Runs `f`, which changes `key` only, and replaces what `key` held in the tally
    /// by what it holds after `f`, whatever `f`'s outcome.
    fn tallied<R>(&mut self, key: ServiceKey, f: impl FnOnce(&mut Self) -> R) -> R {
        let before = self.held_by(key);
        let r = f(self);
        let after = self.held_by(key);
        self.tally.backends = self.tally.backends - before.backends + after.backends;
        self.tally.rules = self.tally.rules - before.rules + after.rules;
        self.tally.ring_cells = self.tally.ring_cells - before.ring_cells + after.ring_cells;
        r
    }

    /// The tally summed over every service (after a restore, and to check the one kept).
    fn tally_afresh(&self) -> Tally {
        self.services
            .values()
            .map(Tally::of)
            .fold(Tally::default(), |a, t| Tally {
                backends: a.backends + t.backends,
                rules: a.rules + t.rules,
                ring_cells: a.ring_cells + t.ring_cells,
            })
    }

    fn write_service_tallied(
        &mut self,
        key: ServiceKey,
        plan: &ServicePlan,
        laid: Option<super::layout::Laid>,
    ) -> Result<u64> {
        self.check(key, plan)?;
        let digest = super::layout::plan_digest(plan, self.limits.tables);
        if let Some(fingerprint) = self.unchanged(key, plan, digest) {
            // What a restart finds: the maps hold this plan already; its table is
            // not built again (a service of 100,000 backends takes seconds to build).
            self.write_addr(key.addr)?;
            return Ok(fingerprint);
        }
        let super::layout::Laid {
            layout: l,
            fingerprint,
        } = match laid {
            Some(laid) => laid,
            None => super::layout::Laid::of(plan, self.limits.tables)?,
        };
        self.tables_built += 1;
        let mut undo = Undo::default();
        match self.write(key, plan, &l, trailer_cells(digest, fingerprint), &mut undo) {
            Ok(()) => Ok(fingerprint),
            Err(e @ DataplaneError::Crashed) => Err(e),
            Err(e) => {
                self.undo(key, undo);
                Err(e)
            }
        }
    }

    fn remove_service_tallied(&mut self, key: ServiceKey) -> Result<()> {
        let state = self
            .services
            .get(&key)
            .cloned()
            .ok_or(DataplaneError::UnknownService(key))?;
        self.writing()?;
        // Before the entry: until the backends are deactivated, their flows' packets
        // must not find the service by its word.
        self.vip_state.clear(state.vip_id);
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
        for e in state.slots.iter().flatten() {
            self.extents.release(*e);
        }
        self.write_addr(key.addr)?;
        for b in state.backends.values() {
            self.deactivate(b.id, b.entry)?;
        }
        for k in state.sphere_keys.iter().flatten() {
            self.remove_sphere_key(*k)?;
        }
        Ok(())
    }
}

impl Dataplane for MapManager {
    fn limits(&self) -> Limits {
        self.limits
    }

    fn usage(&self, keys: &mut dyn Iterator<Item = ServiceKey>) -> Usage {
        let mut u = Usage {
            service_count: self.services.len(),
            tx_ports: self.tx_port_slots.keys().copied().collect(),
            ..Usage::default()
        };
        u.backend_count = self.tally.backends;
        u.rule_count = self.tally.rules;
        u.ring_cells = self.tally.ring_cells;
        for k in keys {
            if let Some(s) = self.services.get(&k) {
                u.services.insert(
                    k,
                    Held {
                        backends: s.backends.keys().copied().collect(),
                        rules: s.sphere_keys[s.active_slot].len(),
                        ring_cells: s.reserved,
                    },
                );
            }
        }
        u
    }

    fn write_service(&mut self, key: ServiceKey, plan: &ServicePlan) -> Result<u64> {
        self.tallied(key, |m| m.write_service_tallied(key, plan, None))
    }

    fn write_service_laid(
        &mut self,
        key: ServiceKey,
        plan: &ServicePlan,
        laid: super::layout::Laid,
    ) -> Result<u64> {
        self.tallied(key, |m| m.write_service_tallied(key, plan, Some(laid)))
    }

    fn remove_service(&mut self, key: ServiceKey) -> Result<()> {
        self.tallied(key, |m| m.remove_service_tallied(key))
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

    fn holds(&self, key: ServiceKey) -> bool {
        self.services.contains_key(&key)
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

    fn counters_of(
        &self,
        keys: &mut dyn Iterator<Item = ServiceKey>,
    ) -> BTreeMap<ServiceKey, ServiceCounters> {
        let held: Vec<(ServiceKey, &ServiceState)> = keys
            .filter_map(|k| Some((k, self.services.get(&k)?)))
            .collect();
        let vip_upto = held.iter().map(|(_, s)| s.vip_id + 1).max().unwrap_or(0);
        let backend_upto = held
            .iter()
            .flat_map(|(_, s)| s.backends.values().map(|b| b.id + 1))
            .max()
            .unwrap_or(0);
        let read = || -> std::io::Result<(Vec<Counter>, Vec<Counter>)> {
            Ok((
                batch::sum_per_cpu(self.vip_stats.map(), vip_upto, self.nr_cpus)?,
                batch::sum_per_cpu(self.backend_stats.map(), backend_upto, self.nr_cpus)?,
            ))
        };
        match read() {
            Ok((vips, backends)) => held
                .into_iter()
                .map(|(k, s)| {
                    let at =
                        |v: &Vec<Counter>, i: u32| v.get(i as usize).copied().unwrap_or_default();
                    let c = ServiceCounters {
                        service: at(&vips, s.vip_id),
                        backends: s
                            .backends
                            .iter()
                            .map(|(a, b)| (*a, at(&backends, b.id)))
                            .collect(),
                    };
                    (k, c)
                })
                .collect(),
            Err(e) => {
                tracing::debug!("reading counters in batches: {e}; one by one instead");
                held.into_iter()
                    .filter_map(|(k, _)| Some((k, self.counters(k)?)))
                    .collect()
            }
        }
    }

    fn global_stats(&self) -> Result<GlobalStats> {
        MapManager::global_stats(self)
    }

    fn conn_counts(&self) -> super::ConnCounts {
        let n = |i: usize| self.conn_entries[i].load(std::sync::atomic::Ordering::Relaxed) as usize;
        super::ConnCounts {
            ipv4: n(0),
            ipv6: n(1),
        }
    }

    fn read_back(&self, key: ServiceKey) -> Result<Option<Contents>> {
        self.read_contents(key)
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
