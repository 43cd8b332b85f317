//! Utilization-based steering: the DNS thread of the RAIS seed (seed 004), applied to
//! a service's backends instead of a DNS zone. Pure: each period takes the backends'
//! load and capacity samples and the set that was in the new-flow table last period,
//! and returns who stays in, who goes out (weight 0 for new flows) and how the rest
//! share new flows by headroom.
//!
//! The seed's pseudo-code, with the comparisons it leaves implicit:
//! - `util = load * scale / capacity`;
//! - `util > high` → `weighted = util + delta`;
//! - `low < util <= high` → `weighted = util` if the backend was in the table last
//!   period, else `util + delta` (a backend that was taken out stays out until it is
//!   below the low mark: hysteresis);
//! - otherwise `weighted = util`;
//! - when there are more backends than the minimum, sort by `weighted` ascending and,
//!   from index `min_backends` on, remove those whose `weighted > high`.
//!
//! `delta = high - low`. Backends without a fresh sample are not judged (they stay in,
//! treated as idle).

use std::{collections::BTreeSet, net::IpAddr};

use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Marks {
    /// Makes `util` an integer: typically 100 to 1000 (1000 = per mille).
    pub scale: u64,
    pub high: u64,
    pub low: u64,
    /// Never fewer backends than this in the table, even overloaded ones.
    pub min_backends: usize,
    /// How often the control plane runs a period (milliseconds).
    #[serde(default = "default_period")]
    pub period_ms: u64,
}

fn default_period() -> u64 {
    1000
}

/// The table of load reports: `<service>|<backend>` → `<load>;<capacity>`.
pub const LOAD_TABLE: &str = "load";
/// The manager's verdicts per service (JSON list of `Verdict`).
pub const VERDICT_TABLE: &str = "steering";

pub fn load_key(service: &str, backend: IpAddr) -> String {
    format!("{service}|{backend}")
}

/// Parses a load report's value.
pub fn parse_load(value: &str) -> Option<(u64, u64)> {
    let (l, c) = value.split_once(';')?;
    Some((l.parse().ok()?, c.parse().ok()?))
}

/// The samples in a service's valid load rows, (key, value, valid) with keys
/// `<service>|<backend>` and values `<load>;<capacity>`; rows that do not parse are
/// skipped.
pub fn samples<'a>(rows: impl IntoIterator<Item = (&'a str, &'a str, bool)>) -> Vec<Sample> {
    rows.into_iter()
        .filter(|(_, _, valid)| *valid)
        .filter_map(|(key, value, _)| {
            let backend = key.rsplit_once('|')?.1.parse().ok()?;
            let (load, capacity) = parse_load(value)?;
            Some(Sample {
                backend,
                load,
                capacity,
            })
        })
        .collect()
}

/// The manager's step for one service: the new verdicts when they differ from
/// `previous` in what the data plane uses (in or out, headroom), else `None`.
pub fn next_verdicts(
    marks: &Marks,
    samples: &[Sample],
    previous: &[Verdict],
) -> Option<Vec<Verdict>> {
    let verdicts = period(marks, samples, &last_in(previous, samples));
    // What the data plane uses (in or out, headroom), and which band the utilization
    // is in (below low, between the marks, above high): a move between bands is
    // rare and tells the operator the hysteresis is holding a backend where it is.
    let band = |u: u64| (u >= marks.low) as u8 + (u > marks.high) as u8;
    let shape = |v: &[Verdict]| {
        v.iter()
            .map(|x| (x.backend, x.in_table, x.headroom, band(x.util)))
            .collect::<Vec<_>>()
    };
    (shape(&verdicts) != shape(previous)).then_some(verdicts)
}

/// The verdicts of `next` that moved a backend in or out (or judged it first).
pub fn moved<'a>(previous: &[Verdict], next: &'a [Verdict]) -> Vec<&'a Verdict> {
    next.iter()
        .filter(|v| {
            previous
                .iter()
                .find(|p| p.backend == v.backend)
                .is_none_or(|p| p.in_table != v.in_table)
        })
        .collect()
}

/// The seed's M for the next period: the backends in the table after `previous`, and
/// those never judged (a newcomer gets the benefit of the doubt).
pub fn last_in(previous: &[Verdict], samples: &[Sample]) -> BTreeSet<IpAddr> {
    samples
        .iter()
        .map(|s| s.backend)
        .filter(|b| {
            previous
                .iter()
                .find(|v| v.backend == *b)
                .is_none_or(|v| v.in_table)
        })
        .collect()
}

impl Marks {
    pub fn delta(&self) -> u64 {
        self.high.saturating_sub(self.low)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub backend: IpAddr,
    pub load: u64,
    pub capacity: u64,
}

/// One backend's verdict for this period.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub backend: IpAddr,
    pub util: u64,
    pub weighted: u64,
    pub in_table: bool,
    /// Share of new flows from headroom, 1 (none left) to 16 (idle); 0 when out.
    pub headroom: u32,
}

/// The utilization of a sample; no capacity counts as overloaded.
pub fn util(marks: &Marks, s: &Sample) -> u64 {
    if s.capacity == 0 {
        return u64::MAX / 4;
    }
    ((s.load as u128 * marks.scale as u128) / s.capacity as u128).min(u64::MAX as u128 / 4) as u64
}

/// One period of the DNS thread. `last_in`: the backends that were in the table after
/// the previous period (the seed's database M).
pub fn period(marks: &Marks, samples: &[Sample], last_in: &BTreeSet<IpAddr>) -> Vec<Verdict> {
    let delta = marks.delta();
    let mut rows: Vec<Verdict> = samples
        .iter()
        .map(|s| {
            let u = util(marks, s);
            let weighted = if u > marks.high {
                u + delta
            } else if u > marks.low {
                if last_in.contains(&s.backend) {
                    u
                } else {
                    u + delta
                }
            } else {
                u
            };
            Verdict {
                backend: s.backend,
                util: u,
                weighted,
                in_table: true,
                headroom: 0,
            }
        })
        .collect();
    if rows.len() > marks.min_backends {
        rows.sort_by_key(|r| (r.weighted, r.backend));
        for r in rows.iter_mut().skip(marks.min_backends) {
            if r.weighted > marks.high {
                r.in_table = false;
            }
        }
    }
    for r in rows.iter_mut().filter(|r| r.in_table) {
        r.headroom = headroom(marks, r.util);
    }
    rows.sort_by_key(|r| r.backend);
    rows
}

/// Headroom below the high mark in sixteenths (at least 1): new flows go where there
/// is room, in coarse steps so that small load changes do not rebuild the table.
pub fn headroom(marks: &Marks, util: u64) -> u32 {
    if marks.high == 0 {
        return 1;
    }
    let left = marks.high.saturating_sub(util.min(marks.high));
    1 + (15 * left / marks.high) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const MARKS: Marks = Marks {
        scale: 1000,
        high: 800,
        low: 600,
        min_backends: 1,
        period_ms: 1000,
    };

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 18, 0, last])
    }

    fn s(last: u8, load: u64, capacity: u64) -> Sample {
        Sample {
            backend: ip(last),
            load,
            capacity,
        }
    }

    fn out(rows: &[Verdict]) -> Vec<IpAddr> {
        rows.iter()
            .filter(|r| !r.in_table)
            .map(|r| r.backend)
            .collect()
    }

    /// Samples, last period's table, expected (util, weighted) per backend, expected out.
    type Case = (Vec<Sample>, BTreeSet<IpAddr>, Vec<(u64, u64)>, Vec<IpAddr>);

    /// Hand-computed from the seed's pseudo-code, scale 1000, high 800, low 600
    /// (delta 200), minimum 1.
    #[test]
    fn the_seeds_cases() {
        let all: BTreeSet<IpAddr> = [ip(1), ip(2), ip(3)].into();
        // (samples, last M, expected (util, weighted) per backend, expected out)
        let cases: Vec<Case> = vec![
            // All below low: weighted = util, nobody out.
            (
                vec![s(1, 10, 100), s(2, 50, 100), s(3, 59, 100)],
                all.clone(),
                vec![(100, 100), (500, 500), (590, 590)],
                vec![],
            ),
            // One above high: util 900 + delta 200 = 1100 > 800, out.
            (
                vec![s(1, 10, 100), s(2, 90, 100), s(3, 20, 100)],
                all.clone(),
                vec![(100, 100), (900, 1100), (200, 200)],
                vec![ip(2)],
            ),
            // In the band and in M: stays (weighted = util = 700).
            (
                vec![s(1, 10, 100), s(2, 70, 100)],
                all.clone(),
                vec![(100, 100), (700, 700)],
                vec![],
            ),
            // In the band but not in M (taken out before): 700 + 200 = 900 > 800, out.
            (
                vec![s(1, 10, 100), s(2, 70, 100)],
                [ip(1)].into(),
                vec![(100, 100), (700, 900)],
                vec![ip(2)],
            ),
            // Back below low: returns whatever M says.
            (
                vec![s(1, 10, 100), s(2, 55, 100)],
                [ip(1)].into(),
                vec![(100, 100), (550, 550)],
                vec![],
            ),
            // Everyone above high: the minimum (1) stays, the least loaded one.
            (
                vec![s(1, 95, 100), s(2, 85, 100), s(3, 99, 100)],
                all.clone(),
                vec![(950, 1150), (850, 1050), (990, 1190)],
                vec![ip(1), ip(3)],
            ),
            // Not more backends than the minimum: nobody is removed.
            (vec![s(1, 99, 100)], all.clone(), vec![(990, 1190)], vec![]),
            // Capacity matters: load 90 of capacity 200 is 450.
            (
                vec![s(1, 90, 200), s(2, 90, 100)],
                all.clone(),
                vec![(450, 450), (900, 1100)],
                vec![ip(2)],
            ),
            // Exactly at high: not above it, in M → stays.
            (
                vec![s(1, 10, 100), s(2, 80, 100)],
                all.clone(),
                vec![(100, 100), (800, 800)],
                vec![],
            ),
        ];
        for (i, (samples, m, expected, gone)) in cases.into_iter().enumerate() {
            let rows = period(&MARKS, &samples, &m);
            let got: Vec<(u64, u64)> = rows.iter().map(|r| (r.util, r.weighted)).collect();
            assert_eq!(got, expected, "case {i}");
            assert_eq!(out(&rows), gone, "case {i}");
        }
    }

    #[test]
    fn the_manager_step_reads_valid_rows_and_publishes_only_changes() {
        let rows = [
            ("tcp/198.18.0.100:80|198.18.0.1", "10;100", true),
            ("tcp/198.18.0.100:80|198.18.0.2", "95;100", true),
            ("tcp/198.18.0.100:80|198.18.0.3", "95;100", false),
            ("tcp/198.18.0.100:80|198.18.0.4", "garbage", true),
        ];
        let s = samples(rows);
        assert_eq!(s, vec![self::s(1, 10, 100), self::s(2, 95, 100)]);
        let first = next_verdicts(&MARKS, &s, &[]).expect("first verdicts");
        assert_eq!(out(&first), vec![ip(2)]);
        assert_eq!(
            moved(&[], &first).len(),
            2,
            "both judged for the first time"
        );
        assert_eq!(next_verdicts(&MARKS, &s, &first), None, "nothing changed");
        // Between the marks now: still out (it was out); published once, because the
        // utilization moved to another band, then not again within the band.
        let between = [self::s(1, 10, 100), self::s(2, 70, 100)];
        let held = next_verdicts(&MARKS, &between, &first).expect("a new band");
        assert_eq!(out(&held), vec![ip(2)], "hysteresis: still out");
        let nearby = [self::s(1, 10, 100), self::s(2, 72, 100)];
        assert_eq!(next_verdicts(&MARKS, &nearby, &held), None, "same band");
        let back = next_verdicts(&MARKS, &[self::s(1, 10, 100), self::s(2, 50, 100)], &first)
            .expect("back in");
        assert_eq!(
            moved(&first, &back)
                .iter()
                .map(|v| v.backend)
                .collect::<Vec<_>>(),
            vec![ip(2)]
        );
    }

    #[test]
    fn a_minimum_of_two_keeps_the_two_least_loaded() {
        let marks = Marks {
            min_backends: 2,
            ..MARKS
        };
        let rows = period(
            &marks,
            &[s(1, 95, 100), s(2, 85, 100), s(3, 99, 100)],
            &BTreeSet::new(),
        );
        assert_eq!(out(&rows), vec![ip(3)]);
    }

    #[test]
    fn hysteresis_over_a_sequence_of_periods() {
        let mut m: BTreeSet<IpAddr> = [ip(1), ip(2)].into();
        let mut states = Vec::new();
        for load in [50, 90, 75, 65, 55, 70] {
            let rows = period(&MARKS, &[s(1, 10, 100), s(2, load, 100)], &m);
            m = rows
                .iter()
                .filter(|r| r.in_table)
                .map(|r| r.backend)
                .collect();
            states.push(m.contains(&ip(2)));
        }
        // 500 in; 900 out; 750 still out; 650 still out; 550 back; 700 stays in.
        assert_eq!(states, [true, false, false, false, true, true]);
    }

    #[test]
    fn headroom_gives_more_new_flows_to_idler_backends() {
        let rows = period(
            &MARKS,
            &[s(1, 0, 100), s(2, 40, 100), s(3, 80, 100)],
            &[ip(1), ip(2), ip(3)].into(),
        );
        let h: Vec<u32> = rows.iter().map(|r| r.headroom).collect();
        assert_eq!(h, [16, 8, 1]);
        assert_eq!(
            util(&MARKS, &s(1, 5, 0)),
            u64::MAX / 4,
            "no capacity: overloaded"
        );
    }
}
