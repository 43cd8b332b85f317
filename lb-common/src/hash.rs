//! The flow hash: which Maglev entry a new flow lands on. Shared so that userspace can
//! tell which backend a given 5-tuple maps to (tests, and later `lbctl`), and written
//! with straight-line integer code the verifier accepts (no loops over packet data).
//!
//! MurmurHash3 (x86, 32-bit) over the words of the 5-tuple: cheap, and it mixes well
//! enough that 10,000 flows spread over backends within a few percent of even.

use crate::FlowKey;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn finish(mut h: u32, len: u32) -> u32 {
    h ^= len;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// Words of the VIP address filter (`VIP_FILTER`): 64 × 64 bits.
pub const VIP_FILTER_WORDS: u32 = 64;

/// Where an address's bit lies in the VIP address filter: (word, bit). The program
/// tests it before the `VIP_ADDRS` lookup, so that traffic to other addresses (most
/// of what a node sees) costs one multiply and an array read instead of a hash-table
/// lookup; a set bit only means "look it up".
#[inline(always)]
pub fn vip_filter_bit(addr: &[u8; 16], family: u8) -> (u32, u32) {
    let w = if family == crate::FAMILY_V4 {
        word(addr, 0)
    } else {
        word(addr, 0) ^ word(addr, 4) ^ word(addr, 8) ^ word(addr, 12)
    };
    let h = w.wrapping_mul(0x9e37_79b1) >> 20;
    (h >> 6, h & 63)
}

/// Hash of a flow's 5-tuple, independent of the CPU and of the table size.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = 0x5bd1_e995;
    h = mix(h, word(&k.src, 0));
    h = mix(h, word(&k.src, 4));
    h = mix(h, word(&k.src, 8));
    h = mix(h, word(&k.src, 12));
    h = mix(h, word(&k.dst, 0));
    h = mix(h, word(&k.dst, 4));
    h = mix(h, word(&k.dst, 8));
    h = mix(h, word(&k.dst, 12));
    h = mix(h, (k.sport_be as u32) << 16 | k.dport_be as u32);
    h = mix(h, k.proto as u32);
    finish(h, 40)
}

/// 64-bit seeded hash used by the Maglev builder for a backend's permutation.
pub fn key_hash(key: u64, seed: u32) -> u32 {
    let mut h = seed;
    h = mix(h, key as u32);
    h = mix(h, (key >> 32) as u32);
    finish(h, 8)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_every_field_of_the_tuple() {
        let base = FlowKey {
            src: [198, 18, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            dst: [198, 18, 0, 100, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            sport_be: 40000u16.to_be(),
            dport_be: 80u16.to_be(),
            proto: crate::PROTO_TCP,
            family: crate::FAMILY_V4,
            _pad: [0; 2],
        };
        let h = flow_hash(&base);
        let variants = [
            FlowKey {
                sport_be: 40001u16.to_be(),
                ..base
            },
            FlowKey {
                dport_be: 81u16.to_be(),
                ..base
            },
            FlowKey {
                proto: crate::PROTO_UDP,
                ..base
            },
            FlowKey {
                src: [198, 18, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ..base
            },
            FlowKey {
                dst: [198, 18, 0, 101, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                ..base
            },
        ];
        for v in variants {
            assert_ne!(flow_hash(&v), h, "{v:?} hashes like {base:?}");
        }
        assert_eq!(flow_hash(&base), h, "hash must be deterministic");
    }
}
