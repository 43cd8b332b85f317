//! The IPv4 connection table (`CONN_SETS_V4`) as lbd holds it: the array mapped as
//! memory, read and written by the protocol of `lb_common::conn_sets` (the program
//! follows the same one, in `lb-ebpf/src/sets.rs`). Here: the sweep that frees the
//! slots of idle flows and counts the rest, a flow's entry for tests and tools, and
//! the hash key that the next load must reuse.

use std::{
    os::fd::AsFd,
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;
use lb_common::{
    conn_sets::{is_key, key_words, sets_of, ConnSet, SetsMeta, CLAIMED, META_MAGIC, WAYS},
    idle, map_names, ConnEntry, FlowKey, FlowKeyV4,
};

use super::{
    ring::Mapped,
    sweep::{IdleTimeouts, Swept},
};
use crate::dataplane::error::{DataplaneError, MapResultExt, Result};

const NAME: &str = map_names::CONN_SETS_V4;
const SET_WORDS: usize = std::mem::size_of::<ConnSet>() / 8;

/// `CONN_SETS_V4`, mapped.
pub(super) struct ConnSets {
    map: Mapped,
    seed: u64,
    mask: u32,
}

impl ConnSets {
    /// The table of a load: its hash key from the element after the last set, which
    /// the loader wrote (`write_meta`) before the program could run.
    pub(super) fn new(map: MapData) -> Result<ConnSets> {
        let map = Mapped::new(map, NAME, std::mem::size_of::<ConnSet>())?;
        Self::of(map)
    }

    /// A second mapping of the same table (the sweeping thread's).
    pub(super) fn view(&self) -> Result<ConnSets> {
        Self::of(self.map.view_again(NAME, std::mem::size_of::<ConnSet>())?)
    }

    fn of(map: Mapped) -> Result<ConnSets> {
        let sets = map.entries().saturating_sub(1);
        let meta: SetsMeta = map.get(sets);
        if !sets.is_power_of_two() || meta.magic != META_MAGIC {
            return Err(DataplaneError::Options(format!(
                "{NAME} ({} elements) has no hash key recorded after its sets; \
                 detach the data plane (lbctl shutdown --detach) and start again",
                map.entries()
            )));
        }
        Ok(ConnSets {
            map,
            seed: meta.seed,
            mask: sets - 1,
        })
    }

    pub(super) fn seed(&self) -> u64 {
        self.seed
    }

    fn sets(&self) -> u32 {
        self.mask + 1
    }

    /// Word `i` of set `s`.
    fn word(&self, s: u32, i: usize) -> &AtomicU64 {
        assert!(s <= self.mask && i < SET_WORDS);
        // SAFETY: inside the mapping (set `s` of `sets()`, each SET_WORDS words), which
        // lives as long as `self`; 8-aligned (the mapping is page-aligned, sets are 128
        // bytes). The program changes these words concurrently: atomics only.
        unsafe { &*(self.map.base() as *const AtomicU64).add(s as usize * SET_WORDS + i) }
    }

    /// The way of set `s` holding (k0, k1).
    fn way_of(&self, s: u32, k0: u64, k1: u64) -> Option<usize> {
        (0..WAYS).find(|&w| {
            self.word(s, 2 * w + 1).load(Ordering::Acquire) == k1
                && self.word(s, 2 * w).load(Ordering::Acquire) == k0
        })
    }

    fn entry_at(&self, s: u32, w: usize) -> ConnEntry {
        let e0 = self.word(s, 8 + 2 * w).load(Ordering::Acquire);
        let e1 = self.word(s, 9 + 2 * w).load(Ordering::Acquire);
        ConnEntry {
            backend_id: e0 as u32,
            backend_gen: (e0 >> 32) as u32,
            epoch: e1 as u32,
            seen: (e1 >> 32) as u32,
        }
    }

    /// An IPv4 flow's entry, read as the program reads it (the key compared again
    /// after the entry).
    pub(super) fn get(&self, flow: &FlowKey) -> Option<ConnEntry> {
        let (k0, k1) = key_words(&FlowKeyV4::of(flow));
        let (a, b) = sets_of(k0, k1, self.seed, self.mask);
        [a, b].into_iter().find_map(|s| {
            let w = self.way_of(s, k0, k1)?;
            let e = self.entry_at(s, w);
            (self.way_of(s, k0, k1) == Some(w)).then_some(e)
        })
    }

    fn publish(&self, s: u32, w: usize, k0: u64, k1: u64, entry: &ConnEntry) {
        self.word(s, 2 * w).store(k0, Ordering::Release);
        self.word(s, 8 + 2 * w).store(
            entry.backend_id as u64 | (entry.backend_gen as u64) << 32,
            Ordering::Release,
        );
        self.word(s, 9 + 2 * w).store(
            entry.epoch as u64 | (entry.seen as u64) << 32,
            Ordering::Release,
        );
        self.word(s, 2 * w + 1).swap(k1, Ordering::SeqCst);
    }

    /// Enters an IPv4 flow with `entry` or changes its entry, as the program does
    /// (tests: an entry stamped at another time).
    pub(super) fn set(&self, flow: &FlowKey, entry: &ConnEntry) -> Result<()> {
        let (k0, k1) = key_words(&FlowKeyV4::of(flow));
        let (a, b) = sets_of(k0, k1, self.seed, self.mask);
        for s in [a, b] {
            if let Some(w) = self.way_of(s, k0, k1) {
                let state = self.word(s, 2 * w + 1);
                if state
                    .compare_exchange(k1, CLAIMED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    if self.word(s, 2 * w).load(Ordering::Acquire) == k0 {
                        self.publish(s, w, k0, k1, entry);
                        return Ok(());
                    }
                    state.swap(k1, Ordering::SeqCst);
                }
            }
        }
        let free = |s: u32| {
            (0..WAYS)
                .filter(|&w| self.word(s, 2 * w + 1).load(Ordering::Acquire) == 0)
                .count()
        };
        let order = if free(b) > free(a) { [b, a] } else { [a, b] };
        for s in order {
            for w in 0..WAYS {
                if self
                    .word(s, 2 * w + 1)
                    .compare_exchange(0, CLAIMED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    self.publish(s, w, k0, k1, entry);
                    return Ok(());
                }
            }
        }
        Err(DataplaneError::Options(format!(
            "{NAME}: both sets of the flow are full"
        )))
    }

    /// Frees way `w` of set `s` if it still holds the key whose state word is `k1`.
    fn free_way(&self, s: u32, w: usize, k1: u64) -> bool {
        self.word(s, 2 * w + 1)
            .compare_exchange(k1, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// One pass over every slot: frees those of flows idle by the clock (the later of
    /// `clock` and the newest stamp met so far, as the hash tables' sweep), counts
    /// the rest. A slot is freed only if its key is still the one read (a flow
    /// entered or changed meanwhile is kept).
    pub(super) fn sweep(&self, clock: Option<u32>, timeouts: &IdleTimeouts) -> Swept {
        let mut swept = Swept::default();
        let mut now = clock;
        for s in 0..self.sets() {
            for w in 0..WAYS {
                let k1 = self.word(s, 2 * w + 1).load(Ordering::Acquire);
                if k1 == CLAIMED {
                    swept.kept += 1;
                    continue;
                }
                if !is_key(k1) {
                    continue;
                }
                let entry = self.entry_at(s, w);
                let clock = now.map_or(entry.seen, |n| idle::later(n, entry.seen));
                now = Some(clock);
                let proto = (k1 >> 32) as u8;
                let key = FlowKeyV4 {
                    proto,
                    ..FlowKeyV4::default()
                };
                if timeouts.expired(&key, &entry, clock) && self.free_way(s, w, k1) {
                    swept.expired += 1;
                } else {
                    swept.kept += 1;
                }
            }
        }
        swept.newest = now;
        swept
    }

    /// Slots holding a flow (or being written).
    pub(super) fn count(&self) -> usize {
        (0..self.sets())
            .map(|s| {
                (0..WAYS)
                    .filter(|&w| self.word(s, 2 * w + 1).load(Ordering::Acquire) != 0)
                    .count()
            })
            .sum()
    }

    /// Frees every slot (benchmarks and tests); how many held a flow.
    pub(super) fn clear(&self) -> usize {
        let mut n = 0;
        for s in 0..self.sets() {
            for w in 0..WAYS {
                let k1 = self.word(s, 2 * w + 1).load(Ordering::Acquire);
                if is_key(k1) && self.free_way(s, w, k1) {
                    n += 1;
                }
            }
        }
        n
    }
}

/// The hash key recorded in the table pinned at `path` by an earlier load, if one is
/// there and has it: the flows it holds stay where the key put them.
pub(crate) fn pinned_seed(path: &Path) -> Result<Option<u64>> {
    if !path.exists() {
        return Ok(None);
    }
    let data = MapData::from_pin(path).map_ctx(NAME)?;
    let map = Mapped::new(data, NAME, std::mem::size_of::<ConnSet>())?;
    let meta: SetsMeta = map.get(map.entries().saturating_sub(1));
    Ok((meta.magic == META_MAGIC).then_some(meta.seed))
}

/// Records `seed` after the last set of the table just loaded (before any program
/// runs on it), unless it is recorded there already; then it must be that one (the
/// program was given `seed`, and lbd reads the table's sets by the record).
pub(crate) fn write_meta(map: &MapData, seed: u64) -> Result<()> {
    let dup =
        map.fd().as_fd().try_clone_to_owned().map_err(|e| {
            DataplaneError::Options(format!("duplicating {NAME}'s descriptor: {e}"))
        })?;
    let data = MapData::from_fd(dup).map_ctx(NAME)?;
    let mapped = Mapped::new(data, NAME, std::mem::size_of::<ConnSet>())?;
    let last = mapped.entries().saturating_sub(1);
    let meta: SetsMeta = mapped.get(last);
    if meta.magic == META_MAGIC {
        if meta.seed != seed {
            return Err(DataplaneError::Options(format!(
                "{NAME} records another hash key than the program was given; \
                 detach the data plane (lbctl shutdown --detach) and start again"
            )));
        }
        return Ok(());
    }
    // SAFETY: element `last` of the mapping, 128 bytes, 8-aligned; the program never
    // reads it (it indexes sets by the mask, below it).
    unsafe {
        let p = mapped
            .base()
            .add(last as usize * std::mem::size_of::<ConnSet>()) as *mut u64;
        std::ptr::write_volatile(p.add(1), seed);
        std::ptr::write_volatile(p, META_MAGIC);
    }
    Ok(())
}
