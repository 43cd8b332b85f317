//! Maglev lookup tables, weighted and stable.
//!
//! Plain Maglev (Eisenbud et al., NSDI '16) fills the table by letting each backend
//! claim cells in the order of its own permutation of the table. It is independent of
//! history, but removing a backend still reshuffles a few percent of other backends'
//! cells. This builder takes the previous table into account so that:
//! - every backend gets exactly its weight's share of cells (largest-remainder
//!   rounding), so shares are as even as the table size allows;
//! - a backend keeps every cell it had, up to its new share: removing a backend moves
//!   only that backend's cells; adding one moves only the cells the newcomer needs;
//! - freed cells are claimed through each backend's Maglev permutation, so the result
//!   is a deterministic function of (previous table, backend set), whatever the order
//!   the backends are given in.

use lb_common::{hash::key_hash, RING_EMPTY};
use thiserror::Error;

/// One backend as the table builder sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MaglevBackend {
    /// What the table's cells hold (the backend's id in the data plane).
    pub id: u32,
    /// Seeds the backend's permutation: derive it from the backend's identity
    /// (address, port), not from `id`, so that another node with other ids agrees.
    pub key: u64,
    /// Relative share of new flows; 0 = in no cell (drained).
    pub weight: u32,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum MaglevError {
    #[error("Maglev table size {size} is not a prime; pick a prime such as 65537 or 655373")]
    SizeNotPrime { size: u32 },
    #[error("{backends} weighted backends do not fit a Maglev table of {size} entries; use a larger prime size")]
    TooManyBackends { backends: usize, size: u32 },
    #[error("backend id {id} appears twice in one table build")]
    DuplicateId { id: u32 },
}

const OFFSET_SEED: u32 = 0x2545_f491;
const SKIP_SEED: u32 = 0x9e37_79b9;

pub fn is_prime(n: u32) -> bool {
    if n < 2 {
        return false;
    }
    let n = n as u64;
    (2..)
        .take_while(|d| d * d <= n)
        .all(|d| !n.is_multiple_of(d))
}

/// Each backend's number of cells: its weight's share of `size`, remainders going to
/// the largest fractional parts (ties to the lower key), so the counts add up to `size`.
fn targets(backends: &[MaglevBackend], size: u32) -> Vec<u32> {
    let total: u64 = backends.iter().map(|b| b.weight as u64).sum();
    if total == 0 {
        return vec![0; backends.len()];
    }
    let mut counts: Vec<u32> = Vec::with_capacity(backends.len());
    let mut remainders: Vec<(u64, usize)> = Vec::with_capacity(backends.len());
    for (i, b) in backends.iter().enumerate() {
        let exact = size as u64 * b.weight as u64;
        counts.push((exact / total) as u32);
        remainders.push((exact % total, i));
    }
    let missing = size - counts.iter().sum::<u32>();
    // Backends are sorted by key, so index order breaks ties deterministically.
    remainders.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    for &(_, i) in remainders.iter().take(missing as usize) {
        counts[i] += 1;
    }
    counts
}

/// Builds a table of `size` cells for `backends`, keeping what it can of `previous`
/// (ignored when its size differs). Cells hold backend ids, or `RING_EMPTY` when no
/// backend has weight.
pub fn build(
    backends: &[MaglevBackend],
    size: u32,
    previous: Option<&[u32]>,
) -> Result<Vec<u32>, MaglevError> {
    if !is_prime(size) {
        return Err(MaglevError::SizeNotPrime { size });
    }
    let mut live: Vec<MaglevBackend> = backends.iter().copied().filter(|b| b.weight > 0).collect();
    if live.len() > size as usize {
        return Err(MaglevError::TooManyBackends {
            backends: live.len(),
            size,
        });
    }
    live.sort_by_key(|b| (b.key, b.id));
    let mut ids: Vec<u32> = live.iter().map(|b| b.id).collect();
    ids.sort_unstable();
    if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
        return Err(MaglevError::DuplicateId { id: w[0] });
    }

    let mut table = vec![RING_EMPTY; size as usize];
    if live.is_empty() {
        return Ok(table);
    }
    let target = targets(&live, size);
    let mut count = vec![0u32; live.len()];

    let mut filled = 0u32;
    if let Some(prev) = previous.filter(|p| p.len() == size as usize) {
        let max_id = live.iter().map(|b| b.id).max().unwrap_or(0) as usize;
        let mut keep = |cell: usize, i: usize, table: &mut [u32]| {
            if count[i] < target[i] {
                table[cell] = live[i].id;
                count[i] += 1;
                filled += 1;
            }
        };
        if max_id <= 4 * size as usize {
            // Ids index a vector when it costs no more than a few tables (a large
            // service's ids are dense enough): one load per cell.
            let mut index = vec![u32::MAX; max_id + 1];
            for (i, b) in live.iter().enumerate() {
                index[b.id as usize] = i as u32;
            }
            for (cell, &id) in prev.iter().enumerate() {
                if let Some(&i) = index.get(id as usize).filter(|i| **i != u32::MAX) {
                    keep(cell, i as usize, &mut table);
                }
            }
        } else {
            // A few backends with scattered ids: a small sorted vector.
            let mut by_id: Vec<(u32, usize)> =
                live.iter().enumerate().map(|(i, b)| (b.id, i)).collect();
            by_id.sort_unstable();
            for (cell, &id) in prev.iter().enumerate() {
                if id == RING_EMPTY {
                    continue;
                }
                if let Ok(pos) = by_id.binary_search_by_key(&id, |&(id, _)| id) {
                    keep(cell, by_id[pos].1, &mut table);
                }
            }
        }
    }

    let m = size as u64;
    // Each backend's place in its permutation, (offset + n * skip) mod m, kept as the
    // cell itself and advanced by adding: no division per probe (a new backend in a
    // full table of 131,101 probes about a thousand cells for each one it takes).
    let mut at: Vec<(u64, u64)> = live
        .iter()
        .map(|b| {
            let offset = key_hash(b.key, OFFSET_SEED) as u64 % m;
            let skip = key_hash(b.key, SKIP_SEED) as u64 % (m - 1) + 1;
            (offset, skip)
        })
        .collect();
    // The backends still short of their share, in the order they claim in.
    let mut short: Vec<usize> = (0..live.len()).filter(|&i| count[i] < target[i]).collect();
    // Once few cells are free (fewer than sqrt(m)), probing costs m / free loads per
    // claim (a backend added to a full table of 10M cells took seconds); the claim is
    // then found from the free cells instead: the one nearest along the claimant's
    // permutation, at distance (cell - place) / skip mod m. The same cell either way.
    let mut free: Option<Vec<u32>> = None;
    let mut inverses: Vec<u64> = vec![0; live.len()];
    // Which cells are taken, a bit each: what probing reads, so that a table of 12M
    // cells (48 MB) is probed in 1.5 MB of cache instead of a miss per probe.
    let mut taken_bits: Vec<u64> = vec![0; (size as usize).div_ceil(64)];
    for (c, &id) in table.iter().enumerate() {
        if id != RING_EMPTY {
            taken_bits[c / 64] |= 1 << (c % 64);
        }
    }
    while filled < size {
        let mut still = Vec::with_capacity(short.len());
        for &i in &short {
            let left = (size - filled) as u64;
            if free.is_none() && left * left <= m {
                free = Some(
                    (0..size)
                        .filter(|&c| table[c as usize] == RING_EMPTY)
                        .collect(),
                );
            }
            let (place, skip) = &mut at[i];
            let taken = match &mut free {
                None => {
                    // The permutation visits every cell once and one is free: this ends.
                    loop {
                        let c = *place as usize;
                        *place += *skip;
                        if *place >= m {
                            *place -= m;
                        }
                        if taken_bits[c / 64] & (1 << (c % 64)) == 0 {
                            break c;
                        }
                    }
                }
                Some(cells) => {
                    if inverses[i] == 0 {
                        inverses[i] = inverse_mod(*skip, m);
                    }
                    let inverse = inverses[i];
                    let (pos, _) = cells
                        .iter()
                        .enumerate()
                        .map(|(pos, &c)| {
                            let ahead = (c as u64 + m - *place) % m;
                            (pos, ahead * inverse % m)
                        })
                        .min_by_key(|&(_, steps)| steps)
                        .expect("a backend short of its share means a free cell");
                    let c = cells.swap_remove(pos) as u64;
                    *place = (c + *skip) % m;
                    c as usize
                }
            };
            table[taken] = live[i].id;
            taken_bits[taken / 64] |= 1 << (taken % 64);
            count[i] += 1;
            filled += 1;
            if count[i] < target[i] {
                still.push(i);
            }
        }
        short = still;
    }
    Ok(table)
}

/// `a`'s inverse modulo the prime `m` (Fermat: a^(m-2)); `a` in 1..m.
fn inverse_mod(a: u64, m: u64) -> u64 {
    let (mut base, mut exp, mut acc) = (a % m, m - 2, 1u64);
    while exp > 0 {
        if exp & 1 == 1 {
            acc = acc * base % m;
        }
        base = base * base % m;
        exp >>= 1;
    }
    acc
}

/// The cells that differ between two tables of the same size: what has to be written.
pub fn delta<'a>(old: &'a [u32], new: &'a [u32]) -> impl Iterator<Item = (u32, u32)> + 'a {
    old.iter()
        .zip(new)
        .enumerate()
        .filter(|(_, (o, n))| o != n)
        .map(|(i, (_, &n))| (i as u32, n))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    const M: u32 = 65537;

    /// The table as first written here (a division per probe, a binary search per
    /// kept cell): the faster build must give exactly this, or tables would differ
    /// between versions of lbd in one cluster.
    fn reference_build(
        backends: &[MaglevBackend],
        size: u32,
        previous: Option<&[u32]>,
    ) -> Vec<u32> {
        let mut live: Vec<MaglevBackend> =
            backends.iter().copied().filter(|b| b.weight > 0).collect();
        live.sort_by_key(|b| (b.key, b.id));
        let mut table = vec![RING_EMPTY; size as usize];
        if live.is_empty() {
            return table;
        }
        let target = targets(&live, size);
        let mut count = vec![0u32; live.len()];
        let mut filled = 0u32;
        if let Some(prev) = previous.filter(|p| p.len() == size as usize) {
            let mut by_id: Vec<(u32, usize)> =
                live.iter().enumerate().map(|(i, b)| (b.id, i)).collect();
            by_id.sort_unstable();
            for (cell, &id) in prev.iter().enumerate() {
                if id == RING_EMPTY {
                    continue;
                }
                if let Ok(pos) = by_id.binary_search_by_key(&id, |&(id, _)| id) {
                    let i = by_id[pos].1;
                    if count[i] < target[i] {
                        table[cell] = id;
                        count[i] += 1;
                        filled += 1;
                    }
                }
            }
        }
        let m = size as u64;
        let perm: Vec<(u64, u64)> = live
            .iter()
            .map(|b| {
                let offset = key_hash(b.key, OFFSET_SEED) as u64 % m;
                let skip = key_hash(b.key, SKIP_SEED) as u64 % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let mut next = vec![0u64; live.len()];
        while filled < size {
            for i in 0..live.len() {
                if count[i] >= target[i] {
                    continue;
                }
                let (offset, skip) = perm[i];
                let cell = loop {
                    let c = ((offset + next[i] * skip) % m) as usize;
                    next[i] += 1;
                    if table[c] == RING_EMPTY {
                        break c;
                    }
                };
                table[cell] = live[i].id;
                count[i] += 1;
                filled += 1;
            }
        }
        table
    }

    proptest! {
        /// From scratch and from a previous table, with dense ids (indexed) and
        /// scattered ones (searched).
        #[test]
        fn the_build_gives_the_reference_table(
            before in proptest::collection::vec((0u32..40, 0u32..4), 1..24),
            after in proptest::collection::vec((0u32..40, 0u32..4), 1..24),
            scattered in any::<bool>(),
            size in prop::sample::select(vec![251u32, 1021, 4093]),
        ) {
            let spread = if scattered { 1_000_003 } else { 1 };
            let set = |v: &[(u32, u32)]| -> Vec<MaglevBackend> {
                let mut seen = std::collections::BTreeSet::new();
                v.iter()
                    .filter(|(id, _)| seen.insert(*id))
                    .map(|&(id, weight)| MaglevBackend {
                        id: id * spread,
                        key: 0x5000 + id as u64 * 104_729,
                        weight,
                    })
                    .collect()
            };
            let (before, after) = (set(&before), set(&after));
            let first = build(&before, size, None).unwrap();
            prop_assert_eq!(&first, &reference_build(&before, size, None));
            let second = build(&after, size, Some(&first)).unwrap();
            prop_assert_eq!(second, reference_build(&after, size, Some(&first)));
        }
    }

    /// A backend added to a full table: the claims are found among a few free cells
    /// from the first (what a service of 100,000 backends does on every change).
    #[test]
    fn a_backend_added_to_a_large_table_gets_the_reference_cells() {
        let size = 65537;
        let mut set: Vec<MaglevBackend> = (0..600u32)
            .map(|id| MaglevBackend {
                id,
                key: 0x9000 + id as u64 * 7919,
                weight: 1 + id % 3,
            })
            .collect();
        let first = build(&set, size, None).unwrap();
        assert_eq!(first, reference_build(&set, size, None));
        set.push(MaglevBackend {
            id: 600,
            key: 0x77,
            weight: 2,
        });
        set.remove(17);
        let second = build(&set, size, Some(&first)).unwrap();
        assert_eq!(second, reference_build(&set, size, Some(&first)));
    }

    fn backends(weights: &[u32]) -> Vec<MaglevBackend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| MaglevBackend {
                id: i as u32,
                key: 0x1000 + i as u64 * 7919,
                weight: w,
            })
            .collect()
    }

    fn counts(table: &[u32]) -> HashMap<u32, usize> {
        let mut c = HashMap::new();
        for &id in table {
            *c.entry(id).or_default() += 1;
        }
        c
    }

    #[test]
    fn shares_follow_weights_within_five_percent() {
        for weights in [
            vec![1, 1, 1],
            vec![1, 2, 3, 4],
            vec![10, 1],
            vec![5; 17],
            vec![100, 37, 1, 60],
        ] {
            let table = build(&backends(&weights), M, None).unwrap();
            let total: u32 = weights.iter().sum();
            let c = counts(&table);
            for (id, &w) in weights.iter().enumerate() {
                let expected = M as f64 * w as f64 / total as f64;
                let got = c[&(id as u32)] as f64;
                assert!(
                    (got - expected).abs() <= expected * 0.05,
                    "weights {weights:?}: backend {id} has {got} cells, expected {expected:.0}"
                );
            }
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_cells() {
        let all = backends(&[1, 1, 1, 1, 1]);
        let before = build(&all, M, None).unwrap();
        let survivors: Vec<_> = all.iter().copied().filter(|b| b.id != 2).collect();
        let after = build(&survivors, M, Some(&before)).unwrap();
        for (cell, (&old, &new)) in before.iter().zip(&after).enumerate() {
            if old != 2 {
                assert_eq!(old, new, "cell {cell} belonged to {old} and moved to {new}");
            } else {
                assert_ne!(new, 2, "cell {cell} still names the removed backend");
            }
        }
    }

    #[test]
    fn adding_a_backend_moves_about_one_in_n_plus_one() {
        let four = backends(&[1, 1, 1, 1]);
        let before = build(&four, M, None).unwrap();
        let five = backends(&[1, 1, 1, 1, 1]);
        let after = build(&five, M, Some(&before)).unwrap();
        let moved: Vec<_> = delta(&before, &after).collect();
        let ideal = M as f64 / 5.0;
        assert!(
            (moved.len() as f64) <= ideal * 1.01 && (moved.len() as f64) >= ideal * 0.99,
            "{} cells moved, ideal {ideal:.0}",
            moved.len()
        );
        assert!(
            moved.iter().all(|&(_, id)| id == 4),
            "a cell moved to an old backend"
        );
    }

    #[test]
    fn fresh_tables_interleave_backends() {
        // Stability must not degenerate into contiguous blocks: consecutive cells are
        // what consecutive hashes hit, so each backend must be spread over the table.
        let table = build(&backends(&[1, 1, 1]), M, None).unwrap();
        let runs = table.windows(2).filter(|w| w[0] != w[1]).count();
        assert!(
            runs > M as usize / 3,
            "only {runs} backend changes along the table"
        );
    }

    #[test]
    fn rejects_bad_sizes_and_duplicates() {
        assert_eq!(
            build(&backends(&[1]), 65536, None),
            Err(MaglevError::SizeNotPrime { size: 65536 })
        );
        assert_eq!(
            build(&backends(&[1, 1, 1, 1]), 3, None),
            Err(MaglevError::TooManyBackends {
                backends: 4,
                size: 3
            })
        );
        let mut dup = backends(&[1, 1]);
        dup[1].id = 0;
        assert_eq!(
            build(&dup, 7, None),
            Err(MaglevError::DuplicateId { id: 0 })
        );
    }

    #[test]
    fn no_weight_means_empty_cells() {
        let table = build(&backends(&[0, 0]), 7, None).unwrap();
        assert!(table.iter().all(|&c| c == RING_EMPTY));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Through any sequence of backend sets, each build gives exact shares, does
        /// not depend on input order, and removals move only the removed cells.
        #[test]
        fn stable_through_random_changes(
            steps in prop::collection::vec(prop::collection::vec(0u32..4, 1..12), 1..6)
        ) {
            let size = 1009;
            let mut previous: Option<Vec<u32>> = None;
            for weights in steps {
                let set = backends(&weights);
                let table = build(&set, size, previous.as_deref()).unwrap();
                let mut reversed = set.clone();
                reversed.reverse();
                prop_assert_eq!(&build(&reversed, size, previous.as_deref()).unwrap(), &table);
                let live: Vec<_> = set.iter().copied().filter(|b| b.weight > 0).collect();
                let mut sorted = live.clone();
                sorted.sort_by_key(|b| (b.key, b.id));
                let expected = targets(&sorted, size);
                let c = counts(&table);
                for (b, t) in sorted.iter().zip(expected) {
                    prop_assert_eq!(c.get(&b.id).copied().unwrap_or(0), t as usize);
                }
                if let Some(prev) = &previous {
                    // Backends whose share did not shrink keep every cell they had.
                    let prev_counts = counts(prev);
                    for b in &live {
                        let had = prev_counts.get(&b.id).copied().unwrap_or(0);
                        let has = c.get(&b.id).copied().unwrap_or(0);
                        if has >= had {
                            for (cell, &id) in prev.iter().enumerate() {
                                if id == b.id {
                                    prop_assert_eq!(table[cell], b.id);
                                }
                            }
                        }
                    }
                }
                previous = Some(table);
            }
        }
    }
}
