//! The connection tables (`CONN_SETS_V4`, `CONN_SETS_V6`) as lbd holds them: each
//! array mapped as memory, read and written by the protocol of
//! `lb_common::conn_sets` (the program follows the same one, in
//! `lb-ebpf/src/sets.rs`). Here: the sweep that frees the slots of idle flows and
//! counts the rest, a flow's entry for tests and tools, and the hash key that the
//! next load must reuse.

use std::{
    path::Path,
    sync::atomic::{AtomicU64, Ordering},
};

use aya::maps::MapData;
use lb_common::{
    conn_sets::{
        addrs6, entry4, entry6, is_key, key4, key_words, key_words6, sets6_of, sets_of, state4,
        state6, tag6, tag6_at, ConnSet, ConnSet6, SetsMeta, CLAIMED, META_MAGIC, WAYS,
    },
    idle, map_names, ConnEntry, FlowKey, FlowKeyV4,
};

use super::{
    ring::Mapped,
    sweep::{IdleTimeouts, Swept},
};
use crate::dataplane::error::{DataplaneError, MapResultExt, Result};

/// Which table, and so which layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Family {
    V4,
    V6,
}

impl Family {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Family::V4 => map_names::CONN_SETS_V4,
            Family::V6 => map_names::CONN_SETS_V6,
        }
    }

    /// Bytes of a set (an array element).
    pub(crate) fn set_bytes(self) -> usize {
        match self {
            Family::V4 => std::mem::size_of::<ConnSet>(),
            Family::V6 => std::mem::size_of::<ConnSet6>(),
        }
    }

    /// Word of way `w`'s state.
    fn state(self, w: usize) -> usize {
        match self {
            Family::V4 => state4(w),
            Family::V6 => state6(w),
        }
    }

    /// Word of way `w`'s entry (two words).
    fn entry(self, w: usize) -> usize {
        match self {
            Family::V4 => entry4(w),
            Family::V6 => entry6(w),
        }
    }

    /// The words of way `w`'s key besides its state, in `Key::rest`'s order.
    fn rest(self, w: usize) -> Vec<usize> {
        match self {
            Family::V4 => vec![key4(w)],
            Family::V6 => {
                let a = addrs6(w);
                vec![tag6_at(w), a, a + 1, a + 2, a + 3]
            }
        }
    }
}

/// A flow's key as a slot holds it (its state word, and the rest in `Family::rest`'s
/// order), and its two sets.
struct Key {
    state: u64,
    rest: Vec<u64>,
    sets: (u32, u32),
}

/// One connection table, mapped.
pub(super) struct ConnSets {
    family: Family,
    map: Backing,
    seed: u64,
    mask: u32,
}

/// Where a table's words are: the kernel's array, mapped; or, in the unit tests of
/// the protocol, memory of the process.
enum Backing {
    Map(Mapped),
    #[cfg(test)]
    Memory(std::sync::Arc<Vec<AtomicU64>>),
}

impl Backing {
    /// Another handle on the same words.
    fn view(&self, family: Family) -> Result<Backing> {
        match self {
            Backing::Map(m) => Ok(Backing::Map(
                m.view_again(family.name(), family.set_bytes())?,
            )),
            #[cfg(test)]
            Backing::Memory(words) => Ok(Backing::Memory(std::sync::Arc::clone(words))),
        }
    }

    fn base(&self) -> *const AtomicU64 {
        match self {
            Backing::Map(m) => m.base() as *const AtomicU64,
            #[cfg(test)]
            Backing::Memory(words) => words.as_ptr(),
        }
    }
}

impl ConnSets {
    /// The table of a load, whose program was given `seed`: recorded after the last
    /// set of a new table (before any program runs on it); a table pinned by an
    /// earlier load must have it recorded already (`pinned_seed` read it), for lbd
    /// reads the sets by the record.
    pub(super) fn new(family: Family, map: MapData, seed: u64) -> Result<ConnSets> {
        let name = family.name();
        let map = Mapped::new(map, name, family.set_bytes())?;
        let sets = map.entries().saturating_sub(1);
        if !sets.is_power_of_two() {
            return Err(DataplaneError::Options(format!(
                "{name} has {} elements, not a power of two of sets and one more; \
                 detach the data plane (lbctl shutdown --detach) and start again",
                map.entries()
            )));
        }
        let meta: SetsMeta = map.get(sets);
        if meta.magic != META_MAGIC {
            // SAFETY: element `sets` of the mapping, a whole set's bytes, 8-aligned;
            // the program never reads it (it indexes sets by the mask, below it).
            unsafe {
                let p = map.base().add(sets as usize * family.set_bytes()) as *mut u64;
                std::ptr::write_volatile(p.add(1), seed);
                std::ptr::write_volatile(p, META_MAGIC);
            }
        } else if meta.seed != seed {
            return Err(DataplaneError::Options(format!(
                "{name} records another hash key than the program was given; \
                 detach the data plane (lbctl shutdown --detach) and start again"
            )));
        }
        Ok(ConnSets {
            family,
            map: Backing::Map(map),
            seed,
            mask: sets - 1,
        })
    }

    /// A second mapping of the same table (the sweeping thread's).
    pub(super) fn view(&self) -> Result<ConnSets> {
        Ok(ConnSets {
            map: self.map.view(self.family)?,
            ..*self
        })
    }

    /// A table of `sets` sets in memory (the protocol's unit tests).
    #[cfg(test)]
    fn in_memory(family: Family, sets: u32, seed: u64) -> ConnSets {
        let words = sets as usize * family.set_bytes() / 8;
        ConnSets {
            family,
            map: Backing::Memory(std::sync::Arc::new(
                (0..words).map(|_| AtomicU64::new(0)).collect(),
            )),
            seed,
            mask: sets - 1,
        }
    }

    pub(super) fn seed(&self) -> u64 {
        self.seed
    }

    fn sets(&self) -> u32 {
        self.mask + 1
    }

    fn key(&self, flow: &FlowKey) -> Key {
        match self.family {
            Family::V4 => {
                let (k0, k1) = key_words(&FlowKeyV4::of(flow));
                Key {
                    state: k1,
                    rest: vec![k0],
                    sets: sets_of(k0, k1, self.seed, self.mask),
                }
            }
            Family::V6 => {
                let (a, tail) = key_words6(flow);
                let tag = tag6(&a, self.seed);
                Key {
                    state: tail,
                    rest: vec![tag, a[0], a[1], a[2], a[3]],
                    sets: sets6_of(tag, tail, self.mask),
                }
            }
        }
    }

    /// Word `i` of set `s`.
    fn word(&self, s: u32, i: usize) -> &AtomicU64 {
        let set_words = self.family.set_bytes() / 8;
        assert!(s <= self.mask && i < set_words);
        // SAFETY: inside the mapping (set `s` of `sets()`, each `set_words` words),
        // which lives as long as `self`; 8-aligned (the mapping is page-aligned, sets
        // are 128 or 256 bytes). The program changes these words concurrently:
        // atomics only.
        unsafe { &*self.map.base().add(s as usize * set_words + i) }
    }

    fn state(&self, s: u32, w: usize) -> &AtomicU64 {
        self.word(s, self.family.state(w))
    }

    /// Whether way `w` of set `s` holds `key`'s words besides the state.
    fn rest_is(&self, s: u32, w: usize, key: &Key) -> bool {
        self.family
            .rest(w)
            .iter()
            .zip(&key.rest)
            .all(|(&i, &v)| self.word(s, i).load(Ordering::Acquire) == v)
    }

    /// The way of set `s` holding `key`.
    fn way_of(&self, s: u32, key: &Key) -> Option<usize> {
        (0..WAYS).find(|&w| {
            self.state(s, w).load(Ordering::Acquire) == key.state && self.rest_is(s, w, key)
        })
    }

    fn entry_at(&self, s: u32, w: usize) -> ConnEntry {
        let e = self.family.entry(w);
        let e0 = self.word(s, e).load(Ordering::Acquire);
        let e1 = self.word(s, e + 1).load(Ordering::Acquire);
        ConnEntry {
            backend_id: e0 as u32,
            backend_gen: (e0 >> 32) as u32,
            epoch: e1 as u32,
            seen: (e1 >> 32) as u32,
        }
    }

    /// A flow's entry, read as the program reads it (the key compared again after
    /// the entry).
    pub(super) fn get(&self, flow: &FlowKey) -> Option<ConnEntry> {
        let key = self.key(flow);
        [key.sets.0, key.sets.1].into_iter().find_map(|s| {
            let w = self.way_of(s, &key)?;
            let e = self.entry_at(s, w);
            (self.way_of(s, &key) == Some(w)).then_some(e)
        })
    }

    /// Writes way `w` (owned) and publishes its state last.
    fn publish(&self, s: u32, w: usize, key: &Key, entry: &ConnEntry) {
        for (&i, &v) in self.family.rest(w).iter().zip(&key.rest) {
            self.word(s, i).store(v, Ordering::Release);
        }
        let e = self.family.entry(w);
        self.word(s, e).store(
            entry.backend_id as u64 | (entry.backend_gen as u64) << 32,
            Ordering::Release,
        );
        self.word(s, e + 1).store(
            entry.epoch as u64 | (entry.seen as u64) << 32,
            Ordering::Release,
        );
        self.state(s, w).swap(key.state, Ordering::SeqCst);
    }

    /// Enters a flow with `entry` or changes its entry, as the program does (tests:
    /// an entry stamped at another time).
    pub(super) fn set(&self, flow: &FlowKey, entry: &ConnEntry) -> Result<()> {
        let key = self.key(flow);
        let (a, b) = key.sets;
        for s in [a, b] {
            if let Some(w) = self.way_of(s, &key) {
                let state = self.state(s, w);
                if state
                    .compare_exchange(key.state, CLAIMED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    if self.rest_is(s, w, &key) {
                        self.publish(s, w, &key, entry);
                        return Ok(());
                    }
                    state.swap(key.state, Ordering::SeqCst);
                }
            }
        }
        let free = |s: u32| {
            (0..WAYS)
                .filter(|&w| self.state(s, w).load(Ordering::Acquire) == 0)
                .count()
        };
        let order = if free(b) > free(a) { [b, a] } else { [a, b] };
        for s in order {
            for w in 0..WAYS {
                if self
                    .state(s, w)
                    .compare_exchange(0, CLAIMED, Ordering::SeqCst, Ordering::SeqCst)
                    .is_ok()
                {
                    self.publish(s, w, &key, entry);
                    return Ok(());
                }
            }
        }
        Err(DataplaneError::Options(format!(
            "{}: both sets of the flow are full",
            self.family.name()
        )))
    }

    /// Frees way `w` of set `s` if it still holds the key whose state word is `k1`.
    fn free_way(&self, s: u32, w: usize, k1: u64) -> bool {
        self.state(s, w)
            .compare_exchange(k1, 0, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// One pass over every slot: frees those of flows idle by the clock (the later of
    /// `clock` and the newest stamp met so far), counts the rest. A slot is freed
    /// only if its key is still the one read (a flow entered or changed meanwhile is
    /// kept).
    pub(super) fn sweep(&self, clock: Option<u32>, timeouts: &IdleTimeouts) -> Swept {
        let mut swept = Swept::default();
        let mut now = clock;
        for s in 0..self.sets() {
            for w in 0..WAYS {
                let k1 = self.state(s, w).load(Ordering::Acquire);
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
                // The state word's fifth byte is the protocol, in both layouts.
                let proto = (k1 >> 32) as u8;
                if timeouts.expired(proto, &entry, clock) && self.free_way(s, w, k1) {
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
                    .filter(|&w| self.state(s, w).load(Ordering::Acquire) != 0)
                    .count()
            })
            .sum()
    }

    /// Frees every slot (benchmarks and tests); how many held a flow.
    pub(super) fn clear(&self) -> usize {
        let mut n = 0;
        for s in 0..self.sets() {
            for w in 0..WAYS {
                let k1 = self.state(s, w).load(Ordering::Acquire);
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
pub(crate) fn pinned_seed(family: Family, path: &Path) -> Result<Option<u64>> {
    if !path.exists() {
        return Ok(None);
    }
    let name = family.name();
    let data = MapData::from_pin(path).map_ctx(name)?;
    let map = Mapped::new(data, name, family.set_bytes())?;
    let meta: SetsMeta = map.get(map.entries().saturating_sub(1));
    Ok((meta.magic == META_MAGIC).then_some(meta.seed))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Flow `i` of a family: its own source address, the same ports.
    fn flow(family: Family, i: u32) -> FlowKey {
        let mut f = FlowKey {
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: lb_common::PROTO_TCP,
            ..FlowKey::default()
        };
        match family {
            Family::V4 => {
                f.family = lb_common::FAMILY_V4;
                f.src[..4].copy_from_slice(&(0xc612_0100 + i).to_be_bytes());
                f.dst[..4].copy_from_slice(&[198, 18, 0, 100]);
            }
            Family::V6 => {
                f.family = lb_common::FAMILY_V6;
                f.src = [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, i as u8];
                f.dst = [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0];
            }
        }
        f
    }

    /// The entry flow `i` is always given: a reader that ever gets another means it
    /// took a slot's entry for its own while the slot held, or was being written
    /// for, another flow.
    fn entry_of(i: u32, round: u32) -> ConnEntry {
        ConnEntry {
            backend_id: i + 1,
            backend_gen: !(i + 1),
            epoch: round,
            seen: round,
        }
    }

    fn race(family: Family) {
        // Six flows in one set of four ways, entered, read and freed from two
        // threads at once (each also frees every slot now and then): ways change
        // hands all the time.
        const FLOWS: u32 = 6;
        const ROUNDS: u32 = 1_000_000;
        let table = ConnSets::in_memory(family, 1, 0x5eed);
        let wrong = std::sync::atomic::AtomicU64::new(0);
        let found = std::sync::atomic::AtomicU64::new(0);
        std::thread::scope(|scope| {
            for t in 0..2u32 {
                let table = table.view().unwrap();
                let (wrong, found) = (&wrong, &found);
                scope.spawn(move || {
                    for round in 0..ROUNDS {
                        let i = (round.wrapping_mul(7) + t * 3) % FLOWS;
                        let f = flow(family, i);
                        let _ = table.set(&f, &entry_of(i, round));
                        let j = (round.wrapping_mul(5) + t) % FLOWS;
                        if let Some(e) = table.get(&flow(family, j)) {
                            found.fetch_add(1, Ordering::Relaxed);
                            if (e.backend_id, e.backend_gen) != (j + 1, !(j + 1)) {
                                wrong.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        if round % 64 == t {
                            table.clear();
                        }
                    }
                });
            }
        });
        let (wrong, found) = (wrong.into_inner(), found.into_inner());
        assert!(found > 10_000, "only {found} reads found their flow");
        assert_eq!(
            wrong, 0,
            "{wrong} of {found} reads found another flow's entry"
        );
    }

    #[test]
    fn ipv4_writers_readers_and_freers_at_once_never_give_a_flow_anothers_entry() {
        race(Family::V4);
    }

    #[test]
    fn ipv6_writers_readers_and_freers_at_once_never_give_a_flow_anothers_entry() {
        race(Family::V6);
    }

    #[test]
    fn a_flow_is_refused_only_when_both_its_sets_are_full() {
        for family in [Family::V4, Family::V6] {
            let table = ConnSets::in_memory(family, 2, 1);
            let mut entered = 0;
            for i in 0..9 {
                if table.set(&flow(family, i), &entry_of(i, 0)).is_ok() {
                    entered += 1;
                }
            }
            assert_eq!(entered, 8, "{family:?}: two sets of four ways");
            assert_eq!(table.count(), 8);
            for i in 0..9 {
                if let Some(e) = table.get(&flow(family, i)) {
                    assert_eq!(e, entry_of(i, 0));
                }
            }
            assert_eq!(table.clear(), 8);
            assert_eq!(table.count(), 0);
        }
    }
}
