//! The connection tables, the program's side: find a flow's slot, read its entry so
//! that a slot reused meanwhile is noticed, enter or change a flow's entry. The
//! layouts and the protocol between writers are `lb_common::conn_sets`'s; one body
//! serves both families, each family's key (`V4`, `V6`) saying where its words lie.
//!
//! Every access is volatile: the compiler must neither merge the second compare of
//! a key into the first nor move an entry's read past it.

use core::{
    intrinsics::{atomic_cxchg, atomic_xchg, AtomicOrdering},
    ptr::{read_volatile, write_volatile},
};

use lb_common::{
    conn_sets::{
        addrs6, entry4, entry6, key4, sets6_of, sets_of, state4, state6, tag6, tag6_at, CLAIMED,
        WAYS,
    },
    ConnEntry, FlowKey,
};

use crate::maps::{
    CONN_SETS_MASK, CONN_SETS_SEED, CONN_SETS_V4, CONN_SETS_V6, CONN_SETS_V6_MASK,
    CONN_SETS_V6_SEED,
};

/// A flow's key as its family's table holds it. A set is a map value read as words
/// (`s`); way `w`'s words are where the family's layout puts them.
pub trait Key {
    /// Word of way `w`'s state.
    fn state_at(w: usize) -> usize;
    /// First of way `w`'s two entry words.
    fn entry_at(w: usize) -> usize;
    /// The key's state word.
    fn state(&self) -> u64;
    /// The flow's two sets, as word pointers (`None` only if the loader sized the
    /// array below the mask, which it does not).
    fn sets(&self) -> Option<(*mut u64, *mut u64)>;
    /// Whether way `w` of set `s` holds the key's words besides the state, first
    /// those in the set's first line (a way that does not hold it is mostly told by
    /// them).
    fn rest_is(&self, s: *mut u64, w: usize) -> bool;
    /// Writes the key's words besides the state into way `w` (owned).
    fn write_rest(&self, s: *mut u64, w: usize);
}

/// An IPv4 flow's key: source and destination address (the first words of
/// `FlowKey`'s address fields), then ports, protocol, family and padding
/// (`FlowKey`'s last word, the state), as `lb_common::conn_sets::key_words` makes
/// them of its `FlowKeyV4`.
pub struct V4 {
    k0: u64,
    k1: u64,
}

impl V4 {
    #[inline(always)]
    pub fn of(flow: &FlowKey) -> V4 {
        let w = flow as *const FlowKey as *const u32;
        // SAFETY: FlowKey is 40 bytes, 8-aligned: source word at 0, destination word
        // at 16, the tail word at 32 (offsets checked in lb_common).
        unsafe {
            let (src, dst) = (*w as u64, *w.add(4) as u64);
            V4 {
                k0: src | dst << 32,
                k1: *(w as *const u64).add(4),
            }
        }
    }
}

impl Key for V4 {
    #[inline(always)]
    fn state_at(w: usize) -> usize {
        state4(w)
    }

    #[inline(always)]
    fn entry_at(w: usize) -> usize {
        entry4(w)
    }

    #[inline(always)]
    fn state(&self) -> u64 {
        self.k1
    }

    #[inline(always)]
    fn sets(&self) -> Option<(*mut u64, *mut u64)> {
        // SAFETY: read-only data the loader wrote.
        let (seed, mask) = unsafe {
            (
                read_volatile(&CONN_SETS_SEED),
                read_volatile(&CONN_SETS_MASK),
            )
        };
        let (a, b) = sets_of(self.k0, self.k1, seed, mask);
        let a = CONN_SETS_V4.get_ptr_mut(a)? as *mut u64;
        let b = CONN_SETS_V4.get_ptr_mut(b)? as *mut u64;
        Some((a, b))
    }

    #[inline(always)]
    fn rest_is(&self, s: *mut u64, w: usize) -> bool {
        // SAFETY: a word of one 128-byte map value.
        unsafe { read_volatile(s.add(key4(w))) == self.k0 }
    }

    #[inline(always)]
    fn write_rest(&self, s: *mut u64, w: usize) {
        // SAFETY: as above.
        unsafe { write_volatile(s.add(key4(w)), self.k0) }
    }
}

/// An IPv6 flow's key: its four address words, their keyed tag, and its last word
/// (the state), as `lb_common::conn_sets::{key_words6, tag6}` make them.
pub struct V6 {
    a: [u64; 4],
    tag: u64,
    tail: u64,
}

impl V6 {
    #[inline(always)]
    pub fn of(flow: &FlowKey) -> V6 {
        let w = flow as *const FlowKey as *const u64;
        // SAFETY: FlowKey is 40 bytes, 8-aligned: five words; and read-only data
        // the loader wrote.
        let (a, tail, seed) = unsafe {
            (
                [*w, *w.add(1), *w.add(2), *w.add(3)],
                *w.add(4),
                read_volatile(&CONN_SETS_V6_SEED),
            )
        };
        V6 {
            tag: tag6(&a, seed),
            a,
            tail,
        }
    }
}

impl Key for V6 {
    #[inline(always)]
    fn state_at(w: usize) -> usize {
        state6(w)
    }

    #[inline(always)]
    fn entry_at(w: usize) -> usize {
        entry6(w)
    }

    #[inline(always)]
    fn state(&self) -> u64 {
        self.tail
    }

    #[inline(always)]
    fn sets(&self) -> Option<(*mut u64, *mut u64)> {
        // SAFETY: read-only data the loader wrote.
        let mask = unsafe { read_volatile(&CONN_SETS_V6_MASK) };
        let (a, b) = sets6_of(self.tag, self.tail, mask);
        let a = CONN_SETS_V6.get_ptr_mut(a)? as *mut u64;
        let b = CONN_SETS_V6.get_ptr_mut(b)? as *mut u64;
        Some((a, b))
    }

    #[inline(always)]
    fn rest_is(&self, s: *mut u64, w: usize) -> bool {
        // SAFETY: words of one 256-byte map value.
        unsafe {
            let p = s.add(addrs6(w));
            read_volatile(s.add(tag6_at(w))) == self.tag
                && read_volatile(p) == self.a[0]
                && read_volatile(p.add(1)) == self.a[1]
                && read_volatile(p.add(2)) == self.a[2]
                && read_volatile(p.add(3)) == self.a[3]
        }
    }

    #[inline(always)]
    fn write_rest(&self, s: *mut u64, w: usize) {
        // SAFETY: as above.
        unsafe {
            write_volatile(s.add(tag6_at(w)), self.tag);
            let p = s.add(addrs6(w));
            write_volatile(p, self.a[0]);
            write_volatile(p.add(1), self.a[1]);
            write_volatile(p.add(2), self.a[2]);
            write_volatile(p.add(3), self.a[3]);
        }
    }
}

/// Whether way `w` of set `s` holds key `k`.
#[inline(always)]
fn holds_at<K: Key>(k: &K, s: *mut u64, w: usize) -> bool {
    // SAFETY: a word of one map value.
    let state = unsafe { read_volatile(s.add(K::state_at(w))) };
    state == k.state() && k.rest_is(s, w)
}

/// The way of set `s` that holds `k`.
#[inline(always)]
fn way_of<K: Key>(k: &K, s: *mut u64) -> Option<usize> {
    (0..WAYS).find(|&w| holds_at(k, s, w))
}

/// The flow's set and way, if it has an entry.
#[inline(always)]
pub fn find<K: Key>(k: &K) -> Option<(*mut u64, usize)> {
    let (a, b) = k.sets()?;
    if let Some(w) = way_of(k, a) {
        return Some((a, w));
    }
    way_of(k, b).map(|w| (b, w))
}

/// The entry of way `w` of set `s`.
#[inline(always)]
pub fn entry_of<K: Key>(s: *mut u64, w: usize) -> *mut ConnEntry {
    // SAFETY: way `w` (< WAYS) of one map value.
    unsafe { s.add(K::entry_at(w)) as *mut ConnEntry }
}

/// Whether way `w` of set `s` (found by `find`) still holds the flow: asked after
/// its entry was read, so that an entry read while its slot was freed and given to
/// another flow, or while it was being changed, is not taken.
#[inline(always)]
pub fn holds<K: Key>(k: &K, s: *mut u64, w: usize) -> bool {
    holds_at(k, s, w)
}

/// Compare-and-exchange of a state word; whether it held `from`.
#[inline(always)]
fn cas(word: *mut u64, from: u64, to: u64) -> bool {
    // SAFETY: an 8-aligned word of a map value; the verifier accepts BPF_CMPXCHG on it.
    unsafe {
        atomic_cxchg::<u64, { AtomicOrdering::SeqCst }, { AtomicOrdering::SeqCst }>(word, from, to)
            .1
    }
}

/// Stores a state word by an exchange: no store before it is seen after it.
#[inline(always)]
fn publish_state(word: *mut u64, state: u64) {
    // SAFETY: an 8-aligned word of a map value; BPF_XCHG.
    unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(word, state) };
}

/// Writes way `w` (owned) and publishes its state last.
#[inline(always)]
fn publish<K: Key>(k: &K, s: *mut u64, w: usize, e0: u64, e1: u64) {
    k.write_rest(s, w);
    // SAFETY: words of one map value; the way is this writer's (claimed).
    unsafe {
        write_volatile(s.add(K::entry_at(w)), e0);
        write_volatile(s.add(K::entry_at(w) + 1), e1);
    }
    // SAFETY: as above.
    publish_state(unsafe { s.add(K::state_at(w)) }, k.state());
}

/// Changes the entry of the flow's way in set `s`, if it has one there.
#[inline(always)]
fn change<K: Key>(k: &K, s: *mut u64, e0: u64, e1: u64) -> bool {
    for w in 0..WAYS {
        // SAFETY: a word of one map value.
        let state = unsafe { s.add(K::state_at(w)) };
        if holds_at(k, s, w) && cas(state, k.state(), CLAIMED) {
            if k.rest_is(s, w) {
                publish(k, s, w, e0, e1);
                return true;
            }
            // Freed and given to another flow with the same ports meanwhile: its
            // key again, untouched.
            publish_state(state, k.state());
        }
    }
    false
}

/// Free ways of set `s`.
#[inline(always)]
fn free<K: Key>(s: *mut u64) -> u32 {
    let mut n = 0;
    for w in 0..WAYS {
        // SAFETY: a word of one map value.
        n += (unsafe { read_volatile(s.add(K::state_at(w))) } == 0) as u32;
    }
    n
}

/// Claims a free way of set `s` and enters the flow there.
#[inline(always)]
fn claim<K: Key>(k: &K, s: *mut u64, e0: u64, e1: u64) -> bool {
    for w in 0..WAYS {
        // SAFETY: a word of one map value.
        let state = unsafe { s.add(K::state_at(w)) };
        // SAFETY: as above.
        if unsafe { read_volatile(state) } == 0 && cas(state, 0, CLAIMED) {
            publish(k, s, w, e0, e1);
            return true;
        }
    }
    false
}

/// Enters the flow with `entry`, or changes the entry it has; false if both its sets
/// are full (nothing is evicted).
#[inline(always)]
pub fn enter<K: Key>(k: &K, entry: &ConnEntry) -> bool {
    let Some((a, b)) = k.sets() else {
        return false;
    };
    let e0 = entry.backend_id as u64 | (entry.backend_gen as u64) << 32;
    let e1 = entry.epoch as u64 | (entry.seen as u64) << 32;
    if change(k, a, e0, e1) || change(k, b, e0, e1) {
        return true;
    }
    // The emptier set first: sets fill evenly, and a flow is refused only when
    // both of its sets are full.
    let (first, second) = if free::<K>(b) > free::<K>(a) {
        (b, a)
    } else {
        (a, b)
    };
    claim(k, first, e0, e1) || claim(k, second, e0, e1)
}
