//! The connection tables' layout: arrays of sets of four slots. IPv4
//! (`CONN_SETS_V4`): each set two cache lines, the keys of its slots in the first,
//! their entries in the second. IPv6 (`CONN_SETS_V6`): four lines, the slots' state
//! words and a keyed tag of their addresses in the first, then each slot's addresses
//! and entry side by side (exact keys: a flow is never taken for another whose tag
//! is the same). A flow may live in either of two sets chosen by a keyed hash
//! of its key, and is entered into the emptier one. Why not the kernel's hash map: a lookup there reads
//! a bucket and then an element elsewhere (two to three cache and TLB misses in a
//! large table), an insert pops a cold element from a free list besides; here a
//! lookup that hits reads one set's two adjacent lines, a miss the key lines of two
//! sets, and an insert writes into lines the lookup just read.
//!
//! Who writes a slot owns it first: the word of a key that holds the ports,
//! protocol and family is the slot's state (0: empty, [`CLAIMED`]: being written,
//! anything else: the key's own word, which for a real key is never 0 nor
//! `CLAIMED`: its family byte is `FAMILY_V4` or `FAMILY_V6`).
//! A writer claims a slot by compare-and-exchange of that word (from 0 to insert,
//! from the key's word to change an entry), writes the rest, and publishes by
//! storing the key's word last. A reader compares the key, reads the entry and
//! compares the key again: an entry read across a reuse of its slot is not taken.
//! The sweeper frees a slot by compare-and-exchange from the key's word to 0.

use crate::{ConnEntry, FlowKeyV4, FAMILY_V4};

/// Slots per set.
pub const WAYS: usize = 4;

/// The state word of a slot being written. Its family byte (byte 5) is 0xff, which
/// no real key has.
pub const CLAIMED: u64 = u64::MAX;

/// One set: the keys of its slots, then their entries, 64 bytes each (the array is
/// `BPF_F_MMAPABLE`, so its elements start on a page and each set is two lines).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnSet {
    pub keys: [FlowKeyV4; WAYS],
    pub entries: [ConnEntry; WAYS],
}

/// Word indices in a `ConnSet` of way `w`'s state (its key's second word), its
/// key's first word, its entry (two words).
pub const fn state4(w: usize) -> usize {
    2 * w + 1
}
pub const fn key4(w: usize) -> usize {
    2 * w
}
pub const fn entry4(w: usize) -> usize {
    2 * WAYS + 2 * w
}

/// The element after the last set: what the next load must know to find the flows
/// already entered (the sets' hash key), and a mark that it was written.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SetsMeta {
    pub magic: u64,
    pub seed: u64,
    pub _rest: [u64; 14],
}

/// One set of the IPv6 table: 256 bytes, four lines (the array's elements start on
/// a page).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnSet6 {
    /// Each way's state: its key's last word (`FlowKey`'s ports, protocol, family).
    pub states: [u64; WAYS],
    /// Each way's `tag6` of its addresses: most lookups that miss stop here.
    pub tags: [u64; WAYS],
    /// Each way's addresses and entry, side by side: an insert writes one or two
    /// lines, a hit reads one or two (apart, three: the addresses, then the entry).
    pub ways: [Way6; WAYS],
}

/// An IPv6 way's source and destination address (as `FlowKey` has them) and entry.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Way6 {
    pub addrs: [u64; 4],
    pub entry: ConnEntry,
}

/// Word indices in a `ConnSet6` of way `w`'s state, tag, first address word, entry.
pub const fn state6(w: usize) -> usize {
    w
}
pub const fn tag6_at(w: usize) -> usize {
    WAYS + w
}
pub const fn addrs6(w: usize) -> usize {
    2 * WAYS + 6 * w
}
pub const fn entry6(w: usize) -> usize {
    addrs6(w) + 4
}

/// `SetsMeta::magic` once written.
pub const META_MAGIC: u64 = 0x4c42_5345_5453_0001; // "LBSETS", layout 1

/// Sets for a table sized for `capacity` flows: twice as many slots, rounded up to a
/// power of two (at half full, one insert in about 30,000 finds both its sets full;
/// at a quarter, next to none).
pub const fn sets_for(capacity: u32) -> u32 {
    let slots = (capacity as u64) * 2;
    let sets = slots.div_ceil(WAYS as u64);
    let sets = if sets < 1 { 1 } else { sets };
    sets.next_power_of_two() as u32
}

/// A key's last word, as the program reads it from memory (little-endian): ports,
/// protocol, family and padding, laid out alike in `FlowKey` and `FlowKeyV4`. The
/// slot's state word.
#[inline(always)]
fn tail_word(sport_be: u16, dport_be: u16, proto: u8, family: u8, pad: [u8; 2]) -> u64 {
    let (s, d) = (sport_be.to_ne_bytes(), dport_be.to_ne_bytes());
    u64::from_le_bytes([s[0], s[1], d[0], d[1], proto, family, pad[0], pad[1]])
}

/// The two words of a key, as the program reads them from memory.
#[inline(always)]
pub fn key_words(key: &FlowKeyV4) -> (u64, u64) {
    let (src, dst) = (u32::from_le_bytes(key.src), u32::from_le_bytes(key.dst));
    (
        src as u64 | (dst as u64) << 32,
        tail_word(key.sport_be, key.dport_be, key.proto, key.family, key._pad),
    )
}

/// An IPv6 flow's key as a slot holds it: its four address words (source, then
/// destination, as `FlowKey` has them in memory) and its last word (the state).
#[inline(always)]
pub fn key_words6(flow: &crate::FlowKey) -> ([u64; 4], u64) {
    let half = |b: &[u8; 16], i: usize| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&b[i..i + 8]);
        u64::from_le_bytes(w)
    };
    (
        [
            half(&flow.src, 0),
            half(&flow.src, 8),
            half(&flow.dst, 0),
            half(&flow.dst, 8),
        ],
        tail_word(
            flow.sport_be,
            flow.dport_be,
            flow.proto,
            flow.family,
            flow._pad,
        ),
    )
}

/// The tag of an IPv6 flow's addresses, keyed by the table's seed.
#[inline(always)]
pub fn tag6(a: &[u64; 4], seed: u64) -> u64 {
    fmix(fmix(fmix(fmix(a[0] ^ seed) ^ a[1]) ^ a[2]) ^ a[3])
}

/// The two sets an IPv6 key may live in: by its tag (keyed already) and its state.
#[inline(always)]
pub fn sets6_of(tag: u64, tail: u64, mask: u32) -> (u32, u32) {
    sets_of(tag, tail, 0, mask)
}

/// Whether `k1` (a slot's state word) is a published key.
#[inline(always)]
pub fn is_key(k1: u64) -> bool {
    k1 != 0 && k1 != CLAIMED
}

#[inline(always)]
fn fmix(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// The two sets a key may live in (`mask`: sets - 1). Keyed by `seed`, drawn at
/// random when the table is made: whoever picks flows cannot aim them at a set.
#[inline(always)]
pub fn sets_of(k0: u64, k1: u64, seed: u64, mask: u32) -> (u32, u32) {
    let h = fmix(fmix(k0 ^ seed) ^ k1);
    let first = h as u32 & mask;
    let mut second = (h >> 32) as u32 & mask;
    if second == first {
        // Two distinct sets whenever there are two.
        second = first ^ (mask & 1);
    }
    (first, second)
}

/// A key's family byte, which makes its state word a key.
const _: () = assert!(FAMILY_V4 != 0 && FAMILY_V4 != 0xff);
const _: () = assert!(crate::FAMILY_V6 != 0 && crate::FAMILY_V6 != 0xff);
const _: () = assert!(core::mem::offset_of!(ConnSet, entries) == 8 * entry4(0));
const _: () = assert!(8 * state4(0) == 8 + core::mem::offset_of!(ConnSet, keys));
const _: () = assert!(core::mem::offset_of!(ConnSet6, tags) == 8 * tag6_at(0));
const _: () = assert!(core::mem::offset_of!(ConnSet6, ways) == 8 * addrs6(0));
const _: () = assert!(core::mem::offset_of!(Way6, entry) == 8 * (entry6(0) - addrs6(0)));
const _: () = assert!(core::mem::size_of::<Way6>() == 8 * (addrs6(1) - addrs6(0)));

#[cfg(test)]
mod tests {
    use super::*;

    fn key(src: u32, sport: u16) -> FlowKeyV4 {
        FlowKeyV4 {
            src: src.to_be_bytes(),
            dst: [198, 18, 0, 100],
            sport_be: sport.to_be(),
            dport_be: 80u16.to_be(),
            proto: crate::PROTO_TCP,
            family: FAMILY_V4,
            _pad: [0; 2],
        }
    }

    #[test]
    fn key_words_are_the_keys_memory() {
        let k = key(0xc612_0001, 40000);
        // SAFETY: FlowKeyV4 is 16 bytes of plain data, 8-aligned.
        let mem: [u64; 2] = unsafe { core::mem::transmute(k) };
        assert_eq!(key_words(&k), (mem[0], mem[1]));
        assert!(
            is_key(mem[1]),
            "a real key's second word is neither 0 nor CLAIMED"
        );
    }

    #[test]
    fn an_ipv6_keys_words_are_its_memory_and_its_tag_is_keyed() {
        let flow = crate::FlowKey {
            src: [0x20, 1, 0xd, 0xb8, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10],
            dst: [0x20, 1, 0xd, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0],
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: crate::PROTO_TCP,
            family: crate::FAMILY_V6,
            _pad: [0; 2],
        };
        // SAFETY: FlowKey is 40 bytes of plain data, 8-aligned.
        let mem: [u64; 5] = unsafe { core::mem::transmute(flow) };
        let (a, tail) = key_words6(&flow);
        assert_eq!((a, tail), ([mem[0], mem[1], mem[2], mem[3]], mem[4]));
        assert!(is_key(tail));
        assert_ne!(tag6(&a, 1), tag6(&a, 2));
        let mut b = a;
        b[1] ^= 1;
        assert_ne!(tag6(&a, 1), tag6(&b, 1));
    }

    #[test]
    fn sets_are_sized_for_twice_the_capacity_in_slots() {
        assert_eq!(sets_for(1), 1);
        assert_eq!(sets_for(2048), 1024);
        assert_eq!(sets_for(2049), 2048);
        assert_eq!(sets_for(16 << 20), 8 << 20);
        for c in [1u32, 3, 1000, 1 << 18, (1 << 18) + 1] {
            assert!(sets_for(c) as usize * WAYS >= 2 * c as usize);
        }
    }

    #[test]
    fn a_keys_two_sets_differ_and_move_with_the_seed() {
        let mask = (1 << 16) - 1;
        let mut moved = 0;
        for i in 0..1000u32 {
            let (k0, k1) = key_words(&key(0xc612_0000 + i, 1024 + i as u16));
            let (a, b) = sets_of(k0, k1, 1, mask);
            assert_ne!(a, b);
            assert!(a <= mask && b <= mask);
            if sets_of(k0, k1, 2, mask) != (a, b) {
                moved += 1;
            }
        }
        assert!(moved > 990, "another seed moved only {moved} of 1000 keys");
    }

    #[test]
    fn flows_spread_evenly_over_the_sets() {
        // 64 sets, 64,000 flows: each set's share within 25% of 1,000.
        let mask = 63;
        let mut count = [0u32; 64];
        for i in 0..32_000u32 {
            let (k0, k1) = key_words(&key(0xc612_0000 + i / 7, 1024 + (i % 7) as u16));
            let (a, b) = sets_of(k0, k1, 0x1234_5678_9abc_def0, mask);
            count[a as usize] += 1;
            count[b as usize] += 1;
        }
        for (i, c) in count.iter().enumerate() {
            assert!((750..1250).contains(c), "set {i}: {c} of ~1000");
        }
    }
}
