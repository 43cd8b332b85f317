//! Every map of the program. Sizes of the ring and the connection table are only
//! defaults: the loader sets them at load time (they dominate memory).

use aya_ebpf::{
    macros::map,
    maps::{Array, DevMap, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    conn_sets::{ConnSet, ConnSet6},
    AddrKey, AddrMeta, Backend, Control, Counter, DecapConfig, DecapStats, GlobalStats,
    ProbeConfig, RefuseBucket, Route, SphereKey, SphereMeta, VipKey, VipMeta, MAX_BACKENDS,
    MAX_DECAP_SOURCES, MAX_REFUSING_SOURCES, MAX_SPHERE_RULES, MAX_TX_PORTS, MAX_VIPS,
    MAX_VIP_ADDRS,
};

#[map]
pub static VIP_ADDRS: HashMap<AddrKey, AddrMeta> = HashMap::with_max_entries(MAX_VIP_ADDRS, 0);

/// A bit per hash of every `VIP_ADDRS` address (`lb_common::hash::vip_filter_bit`): a
/// clear bit means "not ours" without the hash lookup. Written by lbd after
/// `VIP_ADDRS` (set after an add, cleared after a remove).
#[map]
pub static VIP_FILTER: Array<u64> = Array::with_max_entries(lb_common::hash::VIP_FILTER_WORDS, 0);

#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

/// All services' Maglev tables, each where lbd's allocator put it; a service owns two
/// slots of its own table's size and flips between them (see `VipMeta`). Two 4-byte
/// cells per element, cell `2k` in the low half (the kernel spends 8 bytes on every
/// array element, so one cell per element would waste half). Mappable
/// (`BPF_F_MMAPABLE`), so lbd writes and reads whole tables as memory rather than
/// with one syscall per cell.
#[map]
pub static MAGLEV_RING: Array<u64> = Array::with_max_entries(1, lb_common::BPF_F_MMAPABLE);

/// Mappable, so that lbd reads all of it (a restart, a read-back) as memory; it
/// still writes entries with map updates.
/// Each service's flags and epoch in one word (`lb_common::vip_state`), by
/// `VipMeta::vip_id`: a packet of an established flow finds its service through its
/// backend's `vip_id` here rather than by a `VIPS` lookup. Mappable: lbd stores each
/// word at once (a map update copies bytes, and a packet could read half of one).
#[map]
pub static VIP_STATE: Array<u64> = Array::with_max_entries(MAX_VIPS, lb_common::BPF_F_MMAPABLE);

#[map]
pub static BACKENDS: Array<Backend> =
    Array::with_max_entries(MAX_BACKENDS, lb_common::BPF_F_MMAPABLE);

#[map]
pub static ROUTES: Array<Route> = Array::with_max_entries(MAX_BACKENDS, 0);

#[map]
pub static TX_PORTS: DevMap = DevMap::with_max_entries(MAX_TX_PORTS, 0);

/// The connection table of IPv4 flows: sets of four slots, a flow in one of two sets
/// (`lb_common::conn_sets`, the program's side in `sets`). One entry per flow,
/// shared by every CPU (a flow that moves between queues keeps its backend). The
/// loader sizes it (sets for `conn_table_size`, plus one element after the last set
/// that records the hash key for the next load). Mappable: the sets start on a page,
/// so each is two whole cache lines, and lbd's sweeper reads and frees slots as
/// memory. Idle entries are removed by the sweeper (`ConnEntry::seen`); a flow whose
/// two sets are full is refused (`conn_table_full`), evicting no one.
#[map]
pub static CONN_SETS_V4: Array<ConnSet> = Array::with_max_entries(2, lb_common::BPF_F_MMAPABLE);

/// The hash key of `CONN_SETS_V4`'s sets and their count less one, written by the
/// loader into the program's read-only data (the verifier then knows them).
#[no_mangle]
pub static CONN_SETS_SEED: u64 = 0;
#[no_mangle]
pub static CONN_SETS_MASK: u32 = 0;

/// The connection table of IPv6 flows: as `CONN_SETS_V4`, in sets of 256 bytes
/// (`lb_common::conn_sets::ConnSet6`) that keep each flow's whole 5-tuple (a shorter
/// key made by hashing the addresses would let flows collide).
#[map]
pub static CONN_SETS_V6: Array<ConnSet6> = Array::with_max_entries(2, lb_common::BPF_F_MMAPABLE);

/// As `CONN_SETS_SEED`, `CONN_SETS_MASK`, for `CONN_SETS_V6`.
#[no_mangle]
pub static CONN_SETS_V6_SEED: u64 = 0;
#[no_mangle]
pub static CONN_SETS_V6_MASK: u32 = 0;

/// Client subnet → sphere sub-table, for services with `VIP_F_TOPOLOGY`.
#[map]
// BPF_F_NO_PREALLOC (1): required for LPM tries.
pub static SPHERES: LpmTrie<SphereKey, SphereMeta> = LpmTrie::with_max_entries(MAX_SPHERE_RULES, 1);

/// Refusals sent per source address in the current second (fast-fail rate limit).
#[map]
pub static REFUSALS: LruHashMap<[u8; 16], RefuseBucket> =
    LruHashMap::with_max_entries(MAX_REFUSING_SOURCES, 0);

#[map]
pub static VIP_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

#[map]
pub static BACKEND_STATS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

#[map]
pub static GLOBAL_STATS: PerCpuArray<GlobalStats> = PerCpuArray::with_max_entries(1, 0);

/// What lbd tells the program about itself (its liveness stamp).
#[map]
pub static CONTROL: Array<Control> = Array::with_max_entries(1, 0);

/// The backend side (`lb_decap`): LB nodes' outer source addresses, the only senders
/// whose encapsulated packets are stripped.
#[map]
pub static DECAP_SOURCES: HashMap<AddrKey, u32> = HashMap::with_max_entries(MAX_DECAP_SOURCES, 0);

#[map]
pub static DECAP_CONFIG: Array<DecapConfig> = Array::with_max_entries(1, 0);

#[map]
pub static DECAP_STATS: PerCpuArray<DecapStats> = PerCpuArray::with_max_entries(1, 0);

/// `lb_probe_encap`'s settings: this node's outer sources, the GUE port.
#[map]
pub static PROBE_CONFIG: Array<ProbeConfig> = Array::with_max_entries(1, 0);
