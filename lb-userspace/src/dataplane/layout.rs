//! What a service's ring slot holds, as a pure function of its plan: the table new
//! flows are steered by (a Maglev table, or the instances in address order for the
//! `source` rule) and, for the `topology` rule, one sub-table per sphere after it.
//!
//! Built without history: the same backends, weights and size give the same cells on
//! every node and after every restart, whatever order the node learned them in, so a
//! flow fails over to a node that steers it the same way. Cells name backends by
//! their index in address order; the map writer turns indices into its own ids.

use std::{collections::BTreeSet, net::IpAddr};

use lb_common::{FAMILY_V4, FAMILY_V6, RING_EMPTY};

use crate::{
    maglev::{self, MaglevBackend, MaglevError},
    plan::{Rule, ServicePlan},
};

/// A ring slot's contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    /// The whole service's table, then each sphere's; indices into the plan's
    /// backends in address order, or `RING_EMPTY`.
    pub cells: Vec<u32>,
    /// Cells of the whole service's table (the head of `cells`).
    pub table_size: u32,
    /// Client subnets with their sphere's sub-table: (network, prefix, offset, size).
    pub subnets: Vec<(IpAddr, u8, u32, u32)>,
}

/// An address as the maps store it: IPv4 in the first 4 bytes.
pub fn addr_bytes(addr: IpAddr) -> ([u8; 16], u8) {
    let mut bytes = [0u8; 16];
    match addr {
        IpAddr::V4(a) => {
            bytes[..4].copy_from_slice(&a.octets());
            (bytes, FAMILY_V4)
        }
        IpAddr::V6(a) => (a.octets(), FAMILY_V6),
    }
}

/// Seeds a backend's Maglev permutation from its address, so that every node derives
/// the same permutation whatever ids it gave out.
pub fn maglev_key(addr: IpAddr) -> u64 {
    let (b, family) = addr_bytes(addr);
    let hi = u64::from_be_bytes(b[..8].try_into().expect("8 bytes"));
    let lo = u64::from_be_bytes(b[8..].try_into().expect("8 bytes"));
    hi ^ lo.rotate_left(29) ^ family as u64
}

/// The smallest prime not below `n`.
fn prime_at_least(n: u64) -> u64 {
    (n.max(2)..)
        .find(|p| *p > u32::MAX as u64 || maglev::is_prime(*p as u32))
        .expect("primes are unbounded")
}

/// Where an automatically sized table may lie (`[dataplane] maglev_min_size` and
/// `maglev_max_size`, both primes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableBounds {
    pub min: u32,
    pub max: u32,
}

/// Cells per backend of an automatically sized table: Maglev's guidance (M >= 100 N
/// keeps every backend's share within about 1% of its weight).
pub const CELLS_PER_BACKEND: u64 = 100;

/// `ceil(2^(k/2))` in integers, so that every node computes the same ladder.
fn ladder(k: u32) -> u64 {
    let square = 1u128 << k;
    let mut r = (square as f64).sqrt() as u128;
    while r * r > square {
        r -= 1;
    }
    while r * r < square {
        r += 1;
    }
    r as u64
}

/// The table size of a service with `backends` backends: `pinned` if the operator
/// chose one (non-zero), else the first prime at or above the first step of a
/// sqrt(2) ladder that holds `CELLS_PER_BACKEND` cells per backend, within `bounds`.
/// The ladder keeps the size still while backends come and go in small numbers: a
/// new size moves every new flow (not the established ones, which the connection
/// table holds), a new backend only its share.
pub fn table_size(pinned: u32, backends: usize, bounds: TableBounds) -> u32 {
    if pinned != 0 {
        return pinned;
    }
    let want = (backends.max(1) as u64 * CELLS_PER_BACKEND).max(bounds.min as u64);
    let step = (0..64).map(ladder).find(|v| *v >= want).unwrap_or(want);
    let p = prime_at_least(step);
    if p > bounds.max as u64 {
        bounds.max
    } else {
        p as u32
    }
}

/// The most cells a slot of `plan` can take (its table, and one sub-table per sphere
/// of the topology rule), without building it: what capacity checks count.
pub fn slot_max(plan: &ServicePlan, bounds: TableBounds) -> u64 {
    let subnets = match &plan.rule {
        Rule::Topology { subnets } => subnets.as_slice(),
        _ => &[],
    };
    slot_cells(
        plan.config.maglev_size,
        plan.backends.len(),
        subnets,
        bounds,
    )
}

/// The most cells a slot takes for a table of `pinned` size (0: sized by its
/// `backends`) with the topology rule's `subnets` (none for the other rules): the
/// table, one sub-table per sphere, the trailer.
pub fn slot_cells(
    pinned: u32,
    backends: usize,
    subnets: &[(IpAddr, u8, String)],
    bounds: TableBounds,
) -> u64 {
    let size = table_size(pinned, backends, bounds) as u64;
    let spheres = subnets
        .iter()
        .map(|(_, _, s)| s)
        .collect::<BTreeSet<_>>()
        .len() as u64;
    size * (1 + spheres) + TRAILER_CELLS as u64
}

/// `addr` with the bits beyond `prefix` cleared.
pub fn masked(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(a) => {
            let bits = u32::from(a);
            let mask = u32::MAX
                .checked_shl(32 - prefix.min(32) as u32)
                .unwrap_or(0);
            IpAddr::from((bits & mask).to_be_bytes())
        }
        IpAddr::V6(a) => {
            let bits = u128::from(a);
            let mask = u128::MAX
                .checked_shl(128 - prefix.min(128) as u32)
                .unwrap_or(0);
            IpAddr::from((bits & mask).to_be_bytes())
        }
    }
}

/// A plan's layout and its fingerprint, made before its write.
#[derive(Clone, Debug)]
pub struct Laid {
    pub layout: Layout,
    pub fingerprint: u64,
}

impl Laid {
    pub fn of(plan: &ServicePlan, bounds: TableBounds) -> Result<Laid, MaglevError> {
        let layout = layout(plan, bounds)?;
        let fingerprint = fingerprint(plan, &layout);
        Ok(Laid {
            layout,
            fingerprint,
        })
    }
}

/// The slot's contents for `plan`, its table sized by [`table_size`].
pub fn layout(plan: &ServicePlan, bounds: TableBounds) -> Result<Layout, MaglevError> {
    let size = table_size(plan.config.maglev_size, plan.backends.len(), bounds);
    let members: Vec<MaglevBackend> = plan
        .backends
        .iter()
        .enumerate()
        .map(|(i, (addr, b))| MaglevBackend {
            id: i as u32,
            key: maglev_key(*addr),
            weight: b.weight,
        })
        .collect();
    let subnets = match &plan.rule {
        Rule::Topology { subnets } => subnets.as_slice(),
        _ => &[],
    };
    let spheres: BTreeSet<&String> = subnets.iter().map(|(_, _, s)| s).collect();
    // Each sphere's table has the whole table's size: a slot holds at most
    // `slot_max` cells.
    let part = size;
    let table_of = |members: &[MaglevBackend]| -> Result<Vec<u32>, MaglevError> {
        if plan.rule == Rule::Source {
            // Address order, as the SPM generator's `source` rule.
            Ok(members
                .iter()
                .filter(|m| m.weight > 0)
                .map(|m| m.id)
                .collect())
        } else {
            maglev::build(members, part, None)
        }
    };
    let mut cells = table_of(&members)?;
    let table_size = cells.len() as u32;
    let mut sphere_tables: Vec<(&String, u32, u32)> = Vec::new();
    for sphere in &spheres {
        let inside: Vec<MaglevBackend> = plan
            .backends
            .values()
            .zip(&members)
            .filter(|(b, _)| b.sphere.as_ref() == Some(*sphere))
            .map(|(_, m)| *m)
            .collect();
        // A sphere without a live instance keeps its clients on the whole table.
        if inside.iter().all(|m| m.weight == 0) {
            continue;
        }
        let t = table_of(&inside)?;
        sphere_tables.push((sphere, cells.len() as u32, t.len() as u32));
        cells.extend(t);
    }
    let subnets = subnets
        .iter()
        .filter_map(|(net, prefix, sphere)| {
            let (_, offset, size) = sphere_tables.iter().find(|(s, _, _)| *s == sphere)?;
            Some((masked(*net, *prefix), *prefix, *offset, *size))
        })
        .collect();
    Ok(Layout {
        cells,
        table_size,
        subnets,
    })
}

/// Cells after each table in its extent: the digest of the plan it was built from
/// and the table's fingerprint (two cells each). The program never reads them; a
/// restarted lbd does, to take a table over without building it again.
pub const TRAILER_CELLS: u32 = 4;

/// A digest of everything [`layout`] reads from a plan (the size, the rule and its
/// subnets, each backend's address, table weight and sphere): equal digests, equal
/// layouts. 64-bit FNV-1a.
pub fn plan_digest(plan: &ServicePlan, bounds: TableBounds) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |bytes: &[u8]| {
        for b in bytes {
            h = (h ^ *b as u64).wrapping_mul(0x100_0000_01b3);
        }
    };
    // Which `fingerprint` the trailer's was computed with: a table whose trailer
    // holds another kind is built again once (after an upgrade), so that every table
    // of a node (and of a cluster) has its fingerprint computed alike.
    eat(FINGERPRINT_KIND);
    eat(&table_size(plan.config.maglev_size, plan.backends.len(), bounds).to_le_bytes());
    match &plan.rule {
        Rule::Hash => eat(&[0]),
        Rule::Source => eat(&[1]),
        Rule::Topology { subnets } => {
            eat(&[2]);
            for (net, prefix, sphere) in subnets {
                eat(&addr_bytes(*net).0);
                eat(&[*prefix]);
                eat(sphere.as_bytes());
                eat(&[0]);
            }
        }
    }
    for (addr, b) in &plan.backends {
        let (a, f) = addr_bytes(*addr);
        eat(&[f]);
        eat(&a);
        eat(&b.weight.to_le_bytes());
        match &b.sphere {
            Some(s) => {
                eat(&[1]);
                eat(s.as_bytes());
                eat(&[0]);
            }
            None => eat(&[0]),
        }
    }
    h
}

/// The kind of [`fingerprint`] (see `plan_digest`). 2: a word per cell.
const FINGERPRINT_KIND: &[u8] = b"fp2";

/// A digest of what a layout steers where (cells by backend address, the subnet rules
/// and the table size), equal on every node that holds the same table. Each backend's
/// address is hashed once (64-bit FNV-1a) and each cell mixes in its backend's word:
/// a table of 12M cells costs a multiply a cell, not one per byte of an address.
pub fn fingerprint(plan: &ServicePlan, layout: &Layout) -> u64 {
    const PRIME: u64 = 0x100_0000_01b3;
    let fnv = |h: u64, bytes: &[u8]| {
        bytes
            .iter()
            .fold(h, |h, b| (h ^ *b as u64).wrapping_mul(PRIME))
    };
    const BASIS: u64 = 0xcbf2_9ce4_8422_2325;
    let words: Vec<u64> = plan
        .backends
        .keys()
        .map(|a| {
            let (bytes, family) = addr_bytes(*a);
            fnv(fnv(BASIS, &[family]), &bytes)
        })
        .collect();
    // What an empty cell (or one naming no backend) mixes in: no address hashes to it
    // but by chance.
    let empty = fnv(BASIS, &[0xff]);
    let mut h = fnv(BASIS, &layout.table_size.to_le_bytes());
    for &c in &layout.cells {
        let w = match words.get(c as usize) {
            Some(w) if c != RING_EMPTY => *w,
            _ => empty,
        };
        // A word at a time; the rotation keeps a word's high bits in play.
        h = (h ^ w).wrapping_mul(PRIME).rotate_left(29);
    }
    for (net, prefix, offset, size) in &layout.subnets {
        h = fnv(h, &addr_bytes(*net).0);
        h = fnv(h, &[*prefix]);
        h = fnv(h, &offset.to_le_bytes());
        h = fnv(h, &size.to_le_bytes());
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{BackendRoute, Egress, ServiceConfig},
        plan::BackendPlan,
    };

    const B: TableBounds = TableBounds {
        min: 251,
        max: 16_777_213,
    };

    fn plan(addrs: &[(&str, u32)], size: u32) -> ServicePlan {
        let route = BackendRoute {
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_mac: [2, 0, 0, 0, 0, 2],
            egress: Egress::Ingress,
            encap: None,
        };
        ServicePlan::with_backends(
            ServiceConfig {
                maglev_size: size,
                ..ServiceConfig::default()
            },
            addrs.iter().map(|(a, w)| (a.parse().unwrap(), *w, route)),
        )
    }

    #[test]
    fn the_fingerprint_follows_every_cell() {
        let a = plan(
            &[("198.18.0.11", 1), ("198.18.0.12", 2), ("198.18.0.13", 1)],
            4093,
        );
        let la = layout(&a, B).unwrap();
        let whole = fingerprint(&a, &la);
        // Two cells of two backends swapped: the same shares, another table.
        let (i, j) = (0..la.cells.len())
            .flat_map(|i| (i + 1..la.cells.len()).map(move |j| (i, j)))
            .find(|&(i, j)| la.cells[i] != la.cells[j])
            .unwrap();
        let mut swapped = la.clone();
        swapped.cells.swap(i, j);
        assert_ne!(fingerprint(&a, &swapped), whole);
        // The last cell emptied.
        let mut emptied = la.clone();
        *emptied.cells.last_mut().unwrap() = RING_EMPTY;
        assert_ne!(fingerprint(&a, &emptied), whole);
        // Another address for the same index.
        let mut moved = a.clone();
        let b = moved
            .backends
            .remove(&"198.18.0.13".parse().unwrap())
            .unwrap();
        moved.backends.insert("198.18.0.14".parse().unwrap(), b);
        assert_ne!(fingerprint(&moved, &la), whole);
    }

    #[test]
    fn the_table_depends_on_the_definition_only() {
        let a = plan(
            &[("198.18.0.11", 1), ("198.18.0.12", 2), ("198.18.0.13", 1)],
            4093,
        );
        let la = layout(&a, B).unwrap();
        // The same service reached by another path of changes is the same service.
        let mut b = plan(&[("198.18.0.13", 1)], 4093);
        b.backends.insert(
            "198.18.0.12".parse().unwrap(),
            BackendPlan {
                weight: 2,
                route: None,
                sphere: None,
            },
        );
        b.backends.insert(
            "198.18.0.11".parse().unwrap(),
            a.backends.values().next().unwrap().clone(),
        );
        let lb = layout(&b, B).unwrap();
        assert_eq!(la, lb);
        assert_eq!(
            fingerprint(&a, &la),
            fingerprint(&b, &lb),
            "routes are not part of the table"
        );
        let c = plan(
            &[("198.18.0.11", 1), ("198.18.0.12", 1), ("198.18.0.13", 1)],
            4093,
        );
        assert_ne!(
            fingerprint(&a, &la),
            fingerprint(&c, &layout(&c, B).unwrap())
        );
    }

    #[test]
    fn adding_a_backend_moves_little_more_than_its_share() {
        let ten: Vec<(String, u32)> = (1..=10).map(|i| (format!("198.18.0.{i}"), 1)).collect();
        let refs: Vec<(&str, u32)> = ten.iter().map(|(a, w)| (a.as_str(), *w)).collect();
        let before = plan(&refs[..9], 65537);
        let after = plan(&refs, 65537);
        let lb = layout(&before, B).unwrap();
        let la = layout(&after, B).unwrap();
        let name = |p: &ServicePlan, c: u32| p.backends.keys().nth(c as usize).copied();
        let moved = lb
            .cells
            .iter()
            .zip(&la.cells)
            .filter(|(x, y)| name(&before, **x) != name(&after, **y))
            .count();
        let share = 65537 / 10;
        // Plain Maglev moves a few percent more than the newcomer's share.
        assert!(
            moved >= share && moved < share * 2,
            "{moved} cells moved for a share of {share}"
        );
    }

    #[test]
    fn source_partitioning_lists_the_weighted_instances_in_address_order() {
        let mut p = plan(
            &[("198.18.0.12", 1), ("198.18.0.11", 1), ("198.18.0.13", 0)],
            4093,
        );
        p.rule = Rule::Source;
        let l = layout(&p, B).unwrap();
        assert_eq!(l.cells, vec![0, 1]);
    }

    #[test]
    fn an_automatic_table_follows_its_backends_on_a_ladder_within_bounds() {
        assert_eq!(table_size(4093, 3, B), 4093, "a pinned size is kept");
        assert_eq!(table_size(0, 0, B), 257, "at least the minimum");
        assert_eq!(table_size(0, 3, B), 367);
        let thousand = table_size(0, 1000, B);
        assert!(thousand >= 100_000 && thousand < 142_000, "{thousand}");
        assert_eq!(table_size(0, 1001, B), thousand);
        assert!(maglev::is_prime(table_size(0, 100_000, B)));
        assert!(table_size(0, 100_000, B) >= 10_000_000);
        let small = TableBounds {
            min: 251,
            max: 4093,
        };
        assert_eq!(table_size(0, 1000, small), 4093, "never above the maximum");
        let mut three = plan(
            &[("198.18.0.11", 1), ("198.18.0.12", 1), ("198.18.0.13", 1)],
            0,
        );
        three.config.maglev_size = 0;
        let l = layout(&three, B).unwrap();
        assert_eq!(l.table_size, 367);
        for i in 0..3 {
            let n = l.cells.iter().filter(|c| **c == i).count();
            assert!((122..=123).contains(&n), "backend {i}: {n} cells");
        }
        for n in [0, 1, 2, 3, 7, 50, 333, 4000] {
            let s = table_size(0, n, B);
            assert!(
                maglev::is_prime(s) && s as u64 >= (n as u64 * 100).max(251),
                "{n}: {s}"
            );
        }
    }
}
