//! The IPv4 connection table's layout: an array of sets (`CONN_SETS_V4`), each two
//! cache lines: the keys of its four slots in the first, their entries in the second.
//! A flow may live in either of two sets chosen by a keyed hash of its key, and is
//! entered into the emptier one. Why not the kernel's hash map: a lookup there reads
//! a bucket and then an element elsewhere (two to three cache and TLB misses in a
//! large table), an insert pops a cold element from a free list besides; here a
//! lookup that hits reads one set's two adjacent lines, a miss the key lines of two
//! sets, and an insert writes into lines the lookup just read.
//!
//! Who writes a slot owns it first: the second word of a slot's key is its state
//! (0: empty, [`CLAIMED`]: being written, anything else: the key's own word, which
//! for a real IPv4 key is never 0 nor `CLAIMED`: its family byte is `FAMILY_V4`).
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

/// Byte offset from a slot's key to its entry.
pub const ENTRY_OFFSET: usize = 64;

/// The element after the last set: what the next load must know to find the flows
/// already entered (the sets' hash key), and a mark that it was written.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SetsMeta {
    pub magic: u64,
    pub seed: u64,
    pub _rest: [u64; 14],
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

/// The two words of a key, as the program reads them from memory (little-endian).
#[inline(always)]
pub fn key_words(key: &FlowKeyV4) -> (u64, u64) {
    let k0 = u64::from_le_bytes([
        key.src[0], key.src[1], key.src[2], key.src[3], key.dst[0], key.dst[1], key.dst[2],
        key.dst[3],
    ]);
    let s = key.sport_be.to_ne_bytes();
    let d = key.dport_be.to_ne_bytes();
    let k1 = u64::from_le_bytes([
        s[0],
        s[1],
        d[0],
        d[1],
        key.proto,
        key.family,
        key._pad[0],
        key._pad[1],
    ]);
    (k0, k1)
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

/// An IPv4 key's family byte, which makes its state word a key.
const _: () = assert!(FAMILY_V4 != 0 && FAMILY_V4 != 0xff);

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
