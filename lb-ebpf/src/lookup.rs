//! Which service, which backend: the connection table first, the Maglev table second.

use aya_ebpf::{helpers::bpf_jiffies64, maps::lpm_trie::Key, programs::XdpContext};
use aya_log_ebpf::error;
use lb_common::{
    hash::{flow_hash, vip_filter_bit},
    idle, AddrKey, AddrMeta, Backend, ConnEntry, FlowKey, GlobalStats, SphereKey, VipKey, VipMeta,
    BACKEND_F_ACTIVE, FAMILY_V4, RING_EMPTY, VIP_F_EPOCH_RESTEER, VIP_F_SRC_PARTITION,
    VIP_F_TOPOLOGY, VIP_F_UNAVAILABLE, VIP_STATE_LIVE, VIP_STATE_UNSERVED,
};

use crate::{
    maps::{BACKENDS, MAGLEV_RING, SPHERES, VIPS, VIP_ADDRS, VIP_FILTER, VIP_STATE},
    sets,
    stats::{self, Exit},
};

/// A key built in 8-aligned stack memory, so that it is written in words: the keys
/// themselves are byte arrays (align 1 or 2) and would be written byte by byte.
#[repr(C, align(8))]
struct Aligned<T>(T);

/// Copies `flow.dst` (8-aligned inside FlowKey) into an 8-aligned key's first 16 bytes.
#[inline(always)]
fn copy_dst<T>(key: &mut Aligned<T>, flow: &FlowKey) {
    let from = flow.dst.as_ptr() as *const u64;
    let to = key as *mut Aligned<T> as *mut u64;
    // SAFETY: both sides are 8-aligned and at least 16 bytes (keys starting with
    // a 16-byte address; checked by the callers' types).
    unsafe {
        *to = *from;
        *to.add(1) = *from.add(1);
    }
}

/// Whether the destination may be a VIP address (one bit of `VIP_FILTER`).
#[inline(always)]
pub fn vip_filter(flow: &FlowKey) -> Result<(), Exit> {
    let (word, bit) = vip_filter_bit(&flow.dst, flow.family);
    match VIP_FILTER.get(word) {
        Some(w) if *w & (1u64 << bit) != 0 => Ok(()),
        _ => Err(Exit::NotVip),
    }
}

#[inline(always)]
pub fn vip_addr(flow: &FlowKey) -> Result<AddrMeta, Exit> {
    vip_filter(flow)?;
    let mut key = Aligned(AddrKey {
        addr: [0; 16],
        family: 0,
        _pad: [0; 3],
    });
    copy_dst(&mut key, flow);
    // SAFETY: family then three padding bytes: one u32 at offset 16 of an 8-aligned key.
    unsafe { *((&mut key as *mut Aligned<AddrKey> as *mut u32).add(4)) = flow.family as u32 };
    // SAFETY: AddrMeta is plain data; a concurrent update at worst gives the old value.
    unsafe { VIP_ADDRS.get(&key.0) }
        .copied()
        .ok_or(Exit::NotVip)
}

/// The service on (address, port, protocol), else the address's port-less fallback.
#[inline(always)]
pub fn vip(flow: &FlowKey) -> Result<VipMeta, Exit> {
    let mut key = Aligned(VipKey {
        addr: [0; 16],
        port_be: flow.dport_be,
        proto: flow.proto,
        family: flow.family,
    });
    copy_dst(&mut key, flow);
    // SAFETY: hash map values are swapped whole by updates; we copy out at once.
    if let Some(meta) = unsafe { VIPS.get(&key.0) } {
        return Ok(*meta);
    }
    key.0.port_be = 0;
    // SAFETY: as above.
    unsafe { VIPS.get(&key.0) }.copied().ok_or(Exit::NoService)
}

/// Whether this node serves the address of service `vip_id` (the flow's
/// destination): its state word says, in one load; a word being written (0) leaves
/// it to the address table.
#[inline(always)]
pub fn served(vip_id: u32, flow: &FlowKey) -> bool {
    if let Some(word) = VIP_STATE.get_ptr(vip_id) {
        // SAFETY: an array element; lbd stores the word whole, read in one load.
        let flags = unsafe { core::ptr::read_volatile(word) } as u32;
        if flags & VIP_STATE_LIVE != 0 {
            return flags & VIP_STATE_UNSERVED == 0;
        }
    }
    vip_addr(flow).is_ok()
}

/// Enters a flow (or changes its entry); not 0 if it was refused: both of its sets
/// are full (nothing is evicted). A refusal says nothing of the next flow's sets
/// and cost no more than the lookup before it, so it holds off nothing. Not
/// inlined: the entry then lives in a stack frame of its own, and the main
/// program's frame stays within what its deepest call chain leaves of BPF's 512
/// bytes.
#[inline(never)]
fn enter_apart(flow: &FlowKey, backend_id: u32, backend_gen: u32, epoch: u32) -> u64 {
    let entry = ConnEntry {
        backend_id,
        backend_gen,
        epoch,
        seen: now_tick(),
    };
    let entered = if flow.family == FAMILY_V4 {
        sets::enter(&sets::V4::of(flow), &entry)
    } else {
        sets::enter(&sets::V6::of(flow), &entry)
    };
    !entered as u64
}

/// The connection clock's tick now (`lb_common::idle`).
#[inline(always)]
fn now_tick() -> u32 {
    // SAFETY: a helper without arguments.
    idle::tick(unsafe { bpf_jiffies64() })
}

#[inline(always)]
fn live_backend(id: u32, gen: u32) -> Option<Backend> {
    let b = BACKENDS.get(id)?;
    (b.flags & BACKEND_F_ACTIVE != 0 && b.gen == gen).then_some(*b)
}

/// The flow's entry in its family's connection table, its `seen` stamped with this
/// tick: a packet of the flow was seen, whatever is decided of the entry. Stamped
/// here, before any decision, so that callers need not keep the pointer across one
/// (that would take a stack slot the program does not have). The flow's slot is
/// asked again once its entry is read: if it no longer holds the flow (freed and
/// reused, or being changed, meanwhile) the flow is taken as having none. One test
/// of the family, each table on a path of its own: the verifier does not know that
/// a second test of the same byte answers as the first.
#[inline(always)]
fn conn(flow: &FlowKey) -> Option<ConnEntry> {
    if flow.family == FAMILY_V4 {
        conn_by(&sets::V4::of(flow))
    } else {
        conn_by(&sets::V6::of(flow))
    }
}

/// `conn` in one family's table: the entry's two words read into registers (a copy
/// of the whole entry would cost stack the program does not have), then the slot
/// asked again.
#[inline(always)]
fn conn_by<K: sets::Key>(k: &K) -> Option<ConnEntry> {
    let (s, w) = sets::find(k)?;
    let p = sets::entry_of::<K>(s, w);
    let e = p as *const u64;
    // SAFETY: an 8-aligned 16-byte map value; every writer writes each word whole.
    let (w0, w1) = unsafe {
        (
            core::ptr::read_volatile(e),
            core::ptr::read_volatile(e.add(1)),
        )
    };
    if !sets::holds(k, s, w) {
        return None;
    }
    Some(stamp(p, w0, w1))
}

/// The entry read as (w0, w1) from `p`, its stamp moved to this tick if it was
/// older: written only when the tick moved on, so that a flow's packets on several
/// CPUs share its entry's cache line instead of bouncing it.
#[inline(always)]
fn stamp(p: *mut ConnEntry, w0: u64, w1: u64) -> ConnEntry {
    let conn = ConnEntry {
        backend_id: w0 as u32,
        backend_gen: (w0 >> 32) as u32,
        epoch: w1 as u32,
        seen: (w1 >> 32) as u32,
    };
    let now = now_tick();
    if conn.seen != now {
        // SAFETY: the entry's own memory; a racing sweep that freed it at worst
        // gives the slot's next flow a fresher stamp.
        unsafe { (*p).seen = now };
    }
    conn
}

/// What the connection table decides of a packet before its service is looked up.
pub enum Established {
    /// Its flow's backend (id, entry), live, of a service that keeps the flow there.
    Forward(u32, Backend),
    /// Its flow's service (this id) is unavailable: the packet is refused.
    Refuse(u32),
    /// No entry: a new flow, steered by its service's table.
    New,
    /// An entry that only the service's `VIPS` entry decides: its backend is gone,
    /// its epoch is past in a service that re-steers, or its service's state word
    /// is not written.
    Undecided,
}

/// The packet's flow in the connection table, and, if its backend is live, the
/// service that backend belongs to (`VIP_STATE` by the backend's `vip_id`): an
/// established flow's packets skip the `VIPS` lookup. The backend's service is the
/// flow's: removing a service clears its state word before its `VIPS` entry and
/// deactivates its backends after; an id is given anew only after both.
#[inline(always)]
pub fn established(flow: &FlowKey, g: &mut GlobalStats) -> Established {
    let Some(ConnEntry {
        backend_id: id,
        backend_gen: gen,
        epoch,
        ..
    }) = conn(flow)
    else {
        return Established::New;
    };
    let Some(b) = live_backend(id, gen) else {
        return Established::Undecided;
    };
    let Some(word) = VIP_STATE.get_ptr(b.vip_id) else {
        return Established::Undecided;
    };
    // SAFETY: an array element; lbd stores the word whole, read here in one load.
    let state = unsafe { core::ptr::read_volatile(word) };
    let flags = state as u32;
    if flags & VIP_STATE_LIVE == 0 || flags & VIP_STATE_UNSERVED != 0 {
        return Established::Undecided;
    }
    if flags & VIP_F_UNAVAILABLE != 0 {
        return Established::Refuse(b.vip_id);
    }
    if epoch != (state >> 32) as u32 {
        if flags & VIP_F_EPOCH_RESTEER != 0 {
            return Established::Undecided;
        }
        stats::count_epoch_keep(g);
    }
    stats::count_lru_hit(g);
    Established::Forward(id, b)
}

/// The table a new flow is steered by: its sphere's, when the service partitions by
/// topology and the client's subnet has one; the whole service's otherwise.
#[inline(always)]
fn table(flow: &FlowKey, vip: &VipMeta) -> (u32, u32) {
    if vip.flags & VIP_F_TOPOLOGY != 0 {
        let bits = if flow.family == FAMILY_V4 { 32 } else { 128 };
        let key = Key::new(
            32 + bits,
            SphereKey {
                ring_offset: vip.ring_offset,
                addr: flow.src,
            },
        );
        if let Some(m) = SPHERES.get(&key) {
            return (vip.ring_offset + m.offset, m.size);
        }
    }
    (vip.ring_offset, vip.ring_size)
}

/// The flow's backend once its service is known: its entry's, if that stands for
/// this service; else its service's table's. `new`: `established` found no entry
/// (the table is not asked again).
#[inline(always)]
pub fn backend(
    ctx: &XdpContext,
    flow: &FlowKey,
    vip: &VipMeta,
    enter: bool,
    new: bool,
    g: &mut GlobalStats,
) -> Result<(u32, Backend), Exit> {
    let found = if new { None } else { conn(flow) };
    if let Some(conn) = found {
        let resteer = conn.epoch != vip.epoch && vip.flags & VIP_F_EPOCH_RESTEER != 0;
        if resteer {
            // The service moved on to a new epoch and wants its old connections
            // steered like new ones.
            stats::count_epoch_resteer(g);
        } else if let Some(b) = live_backend(conn.backend_id, conn.backend_gen) {
            if conn.epoch != vip.epoch {
                stats::count_epoch_keep(g);
            }
            stats::count_lru_hit(g);
            return Ok((conn.backend_id, b));
        } else {
            stats::count_lru_stale(g);
        }
    } else {
        stats::count_lru_miss(g);
    }

    let (offset, size) = table(flow, vip);
    if size == 0 {
        return Err(Exit::NoBackend);
    }
    let point = if vip.flags & VIP_F_SRC_PARTITION != 0 {
        // The SPM's `source` rule: the client's address picks the instance, so a
        // client is always sent where its map says.
        // The address's last 32 bits, read as one aligned word (FlowKey is 8-aligned,
        // the source at offset 0; whole words, not bytes).
        let words = flow.src.as_ptr() as *const u32;
        // SAFETY: 16 bytes, 4-aligned: words 0 and 3 lie inside.
        // Both words are read (volatile, so that LLVM keeps two loads) and the value
        // chosen: a chosen pointer becomes "stack pointer | offset", which the
        // verifier refuses.
        let (first, last) = unsafe {
            (
                core::ptr::read_volatile(words),
                core::ptr::read_volatile(words.add(3)),
            )
        };
        let w = if flow.family == FAMILY_V4 {
            first
        } else {
            last
        };
        u32::from_be(w)
    } else {
        flow_hash(flow)
    };
    let index = offset + point % size;
    let pair = *MAGLEV_RING.get(index / 2).ok_or(Exit::NoBackend)?;
    let id = (pair >> ((index & 1) * 32)) as u32;
    if id == RING_EMPTY {
        return Err(Exit::NoBackend);
    }
    let Some(b) = BACKENDS
        .get(id)
        .copied()
        .filter(|b| b.flags & BACKEND_F_ACTIVE != 0)
    else {
        // The control plane writes backends before the tables that name them.
        error!(
            ctx,
            "vip {}: Maglev entry {} names inactive backend {}", vip.vip_id, index, id
        );
        return Err(Exit::NoBackend);
    };
    // Entered only once the flow proves real (`parse::l4`); until then it is steered
    // by the table alone. A full table takes no one's place (lbd's sweeper frees
    // the entries of idle flows): the insert fails, is counted, and the flow goes on
    // where the Maglev table sends it.
    if enter && enter_apart(flow, id, b.gen, vip.epoch) != 0 {
        stats::count_conn_table_full(g);
    }
    Ok((id, b))
}
