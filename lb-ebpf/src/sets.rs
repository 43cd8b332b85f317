//! The connection tables, the program's side: find a flow's slot, read its entry so
//! that a slot reused meanwhile is noticed, enter or change a flow's entry. The
//! layouts and the protocol between writers are `lb_common::conn_sets`'s.
//!
//! An IPv4 set is read as sixteen words: the state word of way `w` (its key's second
//! word) is word `2w + 1`, the key's first word `2w`, its entry words `8 + 2w` and
//! `9 + 2w`. An IPv6 set is 32 words, placed by `conn_sets::{state6, tag6_at,
//! addrs6, entry6}`. Every access is volatile: the compiler must neither merge the
//! second compare of a key into the first nor move an entry's read past it.

use core::{
    intrinsics::{atomic_cxchg, atomic_xchg, AtomicOrdering},
    ptr::{read_volatile, write_volatile},
};

use lb_common::{
    conn_sets::{
        addrs6, entry6, sets6_of, sets_of, state6, tag6, tag6_at, CLAIMED, ENTRY_OFFSET, WAYS,
    },
    ConnEntry, FlowKey,
};

use crate::maps::{
    CONN_SETS_MASK, CONN_SETS_SEED, CONN_SETS_V4, CONN_SETS_V6, CONN_SETS_V6_MASK,
    CONN_SETS_V6_SEED,
};

/// An IPv4 flow's key as the two words a slot holds: source and destination address
/// (the first words of `FlowKey`'s address fields), then ports, protocol, family and
/// padding (`FlowKey`'s last word) — what `lb_common::conn_sets::key_words` makes of
/// its `FlowKeyV4`.
#[inline(always)]
pub fn words(flow: &FlowKey) -> (u64, u64) {
    let w = flow as *const FlowKey as *const u32;
    // SAFETY: FlowKey is 40 bytes, 8-aligned: source word at 0, destination word at
    // 16, the tail word at 32 (offsets checked in lb_common).
    unsafe {
        let src = *w as u64;
        let dst = *w.add(4) as u64;
        (src | dst << 32, *(w as *const u64).add(4))
    }
}

/// The flow's two sets, as word pointers (`None` only if the loader sized the array
/// below the mask, which it does not).
#[inline(always)]
fn sets(k0: u64, k1: u64) -> Option<(*mut u64, *mut u64)> {
    // SAFETY: read-only data the loader wrote.
    let (seed, mask) = unsafe {
        (
            read_volatile(&CONN_SETS_SEED),
            read_volatile(&CONN_SETS_MASK),
        )
    };
    let (a, b) = sets_of(k0, k1, seed, mask);
    let a = CONN_SETS_V4.get_ptr_mut(a)? as *mut u64;
    let b = CONN_SETS_V4.get_ptr_mut(b)? as *mut u64;
    Some((a, b))
}

/// The entry of the way of set `s` that holds (k0, k1).
#[inline(always)]
fn in_set(s: *mut u64, k0: u64, k1: u64) -> Option<*mut ConnEntry> {
    for w in 0..WAYS {
        // SAFETY: words of one 128-byte map value.
        unsafe {
            if read_volatile(s.add(2 * w + 1)) == k1 && read_volatile(s.add(2 * w)) == k0 {
                return Some(s.add(8 + 2 * w) as *mut ConnEntry);
            }
        }
    }
    None
}

/// The flow's entry, if it has one.
#[inline(always)]
pub fn find(flow: &FlowKey) -> Option<*mut ConnEntry> {
    let (k0, k1) = words(flow);
    let (a, b) = sets(k0, k1)?;
    in_set(a, k0, k1).or_else(|| in_set(b, k0, k1))
}

/// Whether the slot of entry `p` (found by `find` for `flow`) still holds the flow:
/// asked after its entry was read, so that an entry read while its slot was freed and
/// given to another flow, or while it was being changed, is not taken.
#[inline(always)]
pub fn holds(p: *mut ConnEntry, flow: &FlowKey) -> bool {
    let (k0, k1) = words(flow);
    // SAFETY: `p` is a slot's entry; its key lies ENTRY_OFFSET bytes before it, in
    // the same set.
    unsafe {
        let key = (p as *mut u8).sub(ENTRY_OFFSET) as *const u64;
        read_volatile(key.add(1)) == k1 && read_volatile(key) == k0
    }
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

/// Writes the entry of way `w` (owned) and publishes its key: the state word last,
/// by an exchange, so that no store before it is seen after it.
#[inline(always)]
fn publish(s: *mut u64, w: usize, k0: u64, k1: u64, e0: u64, e1: u64) {
    // SAFETY: words of one map value; the way is this writer's (claimed).
    unsafe {
        write_volatile(s.add(2 * w), k0);
        write_volatile(s.add(8 + 2 * w), e0);
        write_volatile(s.add(9 + 2 * w), e1);
        atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(s.add(2 * w + 1), k1);
    }
}

/// Changes the entry of the flow's way in set `s`, if it has one there.
#[inline(always)]
fn change(s: *mut u64, k0: u64, k1: u64, e0: u64, e1: u64) -> bool {
    for w in 0..WAYS {
        // SAFETY: words of one map value.
        unsafe {
            let state = s.add(2 * w + 1);
            if read_volatile(state) == k1
                && read_volatile(s.add(2 * w)) == k0
                && cas(state, k1, CLAIMED)
            {
                if read_volatile(s.add(2 * w)) == k0 {
                    publish(s, w, k0, k1, e0, e1);
                    return true;
                }
                // Freed and given to another flow with the same ports meanwhile: its
                // key again, untouched.
                atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(state, k1);
            }
        }
    }
    false
}

/// Free ways of set `s`.
#[inline(always)]
fn free(s: *mut u64) -> u32 {
    let mut n = 0;
    for w in 0..WAYS {
        // SAFETY: a word of one map value.
        n += (unsafe { read_volatile(s.add(2 * w + 1)) } == 0) as u32;
    }
    n
}

/// Claims a free way of set `s` and enters the flow there.
#[inline(always)]
fn claim(s: *mut u64, k0: u64, k1: u64, e0: u64, e1: u64) -> bool {
    for w in 0..WAYS {
        // SAFETY: a word of one map value.
        let state = unsafe { s.add(2 * w + 1) };
        // SAFETY: as above.
        if unsafe { read_volatile(state) } == 0 && cas(state, 0, CLAIMED) {
            publish(s, w, k0, k1, e0, e1);
            return true;
        }
    }
    false
}

/// Enters the flow with `entry`, or changes the entry it has; false if both its sets
/// are full (nothing is evicted).
#[inline(always)]
pub fn enter(flow: &FlowKey, entry: &ConnEntry) -> bool {
    let (k0, k1) = words(flow);
    let Some((a, b)) = sets(k0, k1) else {
        return false;
    };
    let e0 = entry.backend_id as u64 | (entry.backend_gen as u64) << 32;
    let e1 = entry.epoch as u64 | (entry.seen as u64) << 32;
    if change(a, k0, k1, e0, e1) || change(b, k0, k1, e0, e1) {
        return true;
    }
    // The emptier set first: sets fill evenly, and a flow is refused only when
    // both of its sets are full.
    let (first, second) = if free(b) > free(a) { (b, a) } else { (a, b) };
    claim(first, k0, k1, e0, e1) || claim(second, k0, k1, e0, e1)
}

// ---- IPv6: sets of 32 words (`ConnSet6`): states, tags, addresses, entries ----

/// An IPv6 flow's key as a slot holds it: its four address words and its last word
/// (the state), as `lb_common::conn_sets::key_words6` makes them.
#[inline(always)]
fn words6(flow: &FlowKey) -> ([u64; 4], u64) {
    let w = flow as *const FlowKey as *const u64;
    // SAFETY: FlowKey is 40 bytes, 8-aligned: five words.
    unsafe { ([*w, *w.add(1), *w.add(2), *w.add(3)], *w.add(4)) }
}

#[inline(always)]
fn sets6(tag: u64, tail: u64) -> Option<(*mut u64, *mut u64)> {
    // SAFETY: read-only data the loader wrote.
    let mask = unsafe { read_volatile(&CONN_SETS_V6_MASK) };
    let (a, b) = sets6_of(tag, tail, mask);
    let a = CONN_SETS_V6.get_ptr_mut(a)? as *mut u64;
    let b = CONN_SETS_V6.get_ptr_mut(b)? as *mut u64;
    Some((a, b))
}

#[inline(always)]
fn seed6() -> u64 {
    // SAFETY: read-only data the loader wrote.
    unsafe { read_volatile(&CONN_SETS_V6_SEED) }
}

/// Whether way `w` of set `s` holds the addresses `a` (its state and tag matched).
#[inline(always)]
fn addrs_are(s: *mut u64, w: usize, a: &[u64; 4]) -> bool {
    // SAFETY: words of one 256-byte map value.
    unsafe {
        let p = s.add(addrs6(w));
        read_volatile(p) == a[0]
            && read_volatile(p.add(1)) == a[1]
            && read_volatile(p.add(2)) == a[2]
            && read_volatile(p.add(3)) == a[3]
    }
}

/// The way of set `s` that holds the key (tail, tag, addresses).
#[inline(always)]
fn in_set6(s: *mut u64, a: &[u64; 4], tag: u64, tail: u64) -> Option<usize> {
    for w in 0..WAYS {
        // SAFETY: words of one map value.
        let hit = unsafe {
            read_volatile(s.add(state6(w))) == tail && read_volatile(s.add(tag6_at(w))) == tag
        };
        if hit && addrs_are(s, w, a) {
            return Some(w);
        }
    }
    None
}

/// The flow's set and way, if it has an entry.
#[inline(always)]
pub fn find6(flow: &FlowKey) -> Option<(*mut u64, usize)> {
    let (a, tail) = words6(flow);
    let tag = tag6(&a, seed6());
    let (s1, s2) = sets6(tag, tail)?;
    if let Some(w) = in_set6(s1, &a, tag, tail) {
        return Some((s1, w));
    }
    in_set6(s2, &a, tag, tail).map(|w| (s2, w))
}

/// The entry of way `w` of set `s`.
#[inline(always)]
pub fn entry6_of(s: *mut u64, w: usize) -> *mut ConnEntry {
    // SAFETY: way `w` (< WAYS) of one map value.
    unsafe { s.add(entry6(w)) as *mut ConnEntry }
}

/// As `holds`, for way `w` of IPv6 set `s`: asked after the entry was read.
#[inline(always)]
pub fn holds6(s: *mut u64, w: usize, flow: &FlowKey) -> bool {
    let (a, tail) = words6(flow);
    // SAFETY: words of one map value.
    // SAFETY: a word of one map value.
    let state = unsafe { read_volatile(s.add(state6(w))) };
    state == tail && addrs_are(s, w, &a)
}

/// Writes way `w` (owned) and publishes its state last.
#[inline(always)]
fn publish6(s: *mut u64, w: usize, a: &[u64; 4], tag: u64, tail: u64, e0: u64, e1: u64) {
    // SAFETY: words of one map value; the way is this writer's (claimed).
    unsafe {
        write_volatile(s.add(tag6_at(w)), tag);
        let p = s.add(addrs6(w));
        write_volatile(p, a[0]);
        write_volatile(p.add(1), a[1]);
        write_volatile(p.add(2), a[2]);
        write_volatile(p.add(3), a[3]);
        write_volatile(s.add(entry6(w)), e0);
        write_volatile(s.add(entry6(w) + 1), e1);
        atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(s.add(state6(w)), tail);
    }
}

/// Enters an IPv6 flow or changes its entry; false if both its sets are full.
#[inline(always)]
pub fn enter6(flow: &FlowKey, entry: &ConnEntry) -> bool {
    let (a, tail) = words6(flow);
    let tag = tag6(&a, seed6());
    let Some((s1, s2)) = sets6(tag, tail) else {
        return false;
    };
    let e0 = entry.backend_id as u64 | (entry.backend_gen as u64) << 32;
    let e1 = entry.epoch as u64 | (entry.seen as u64) << 32;
    for s in [s1, s2] {
        if let Some(w) = in_set6(s, &a, tag, tail) {
            // SAFETY: a word of one map value.
            let state = unsafe { s.add(state6(w)) };
            if cas(state, tail, CLAIMED) {
                if addrs_are(s, w, &a) {
                    publish6(s, w, &a, tag, tail, e0, e1);
                    return true;
                }
                // SAFETY: as above.
                unsafe { atomic_xchg::<u64, { AtomicOrdering::SeqCst }>(state, tail) };
            }
        }
    }
    let free6 = |s: *mut u64| {
        let mut n = 0u32;
        for w in 0..WAYS {
            // SAFETY: a word of one map value.
            n += (unsafe { read_volatile(s.add(state6(w))) } == 0) as u32;
        }
        n
    };
    let (first, second) = if free6(s2) > free6(s1) {
        (s2, s1)
    } else {
        (s1, s2)
    };
    for s in [first, second] {
        for w in 0..WAYS {
            // SAFETY: a word of one map value.
            let state = unsafe { s.add(state6(w)) };
            // SAFETY: as above.
            if unsafe { read_volatile(state) } == 0 && cas(state, 0, CLAIMED) {
                publish6(s, w, &a, tag, tail, e0, e1);
                return true;
            }
        }
    }
    false
}
