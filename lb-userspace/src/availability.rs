//! Per-service availability (seed 003): records with a reason code, who set them and
//! when, merged by "later wins" so that any two nodes that saw the same records hold
//! the same set whatever the order they saw them in. Pure; `availd` moves the records
//! between nodes and to disk.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why a service is unavailable (the seed's reason codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    Unknown,
    /// Planned maintenance (with an expected duration).
    Planned,
    /// Unplanned outage.
    Unplanned,
    Testing,
}

impl std::str::FromStr for Reason {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "unknown" => Ok(Reason::Unknown),
            "planned" => Ok(Reason::Planned),
            "unplanned" => Ok(Reason::Unplanned),
            "testing" => Ok(Reason::Testing),
            _ => Err(format!(
                "`{s}` is not a reason: use planned, unplanned, testing or unknown"
            )),
        }
    }
}

/// One availability record. Field order matters: records of one service are ordered
/// by creation time first, then by the other fields, so "the later one wins" is a
/// total order and merging is a join.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Record {
    /// Creation time, Unix milliseconds.
    pub created_ms: u64,
    pub service: String,
    pub available: bool,
    pub reason: Reason,
    /// Who set it (operator name, or the node for automatic records).
    pub operator: String,
    /// When the service went or goes down, and when it is expected back (Unix ms).
    #[serde(default)]
    pub expected_down_ms: Option<u64>,
    #[serde(default)]
    pub expected_up_ms: Option<u64>,
}

/// The records a node holds: the latest per service.
pub type Set = BTreeMap<String, Record>;

/// Takes `r` into `set` if it is later than what the set holds for its service;
/// returns whether the set changed.
pub fn absorb(set: &mut Set, r: Record) -> bool {
    match set.get(&r.service) {
        Some(held) if *held >= r => false,
        _ => {
            set.insert(r.service.clone(), r);
            true
        }
    }
}

/// The union of two sets, the later record winning per service.
pub fn merge(a: &Set, b: &Set) -> Set {
    let mut out = a.clone();
    for r in b.values() {
        absorb(&mut out, r.clone());
    }
    out
}

/// What `mine` has that `theirs` lacks or holds older: the follow-ups to send a peer
/// after it answered a sync with `theirs`.
pub fn newer_than(mine: &Set, theirs: &Set) -> Vec<Record> {
    mine.values()
        .filter(|r| theirs.get(&r.service).is_none_or(|t| *t < **r))
        .cloned()
        .collect()
}

/// Whether `service` is available by `set` (no record: available).
pub fn is_available(set: &Set, service: &str) -> bool {
    set.get(service).is_none_or(|r| r.available)
}

/// Whether a starting node has synced its records: `answered` peers answered and
/// `needed` must; or it is alone where alone is enough (`alone_ok`: a quorum of 1)
/// with nobody else heard (`others_alive`) for `waited` of at least 3 s. Never just
/// because time passed: a node that could not ask may have missed a maintenance
/// record, and would serve a service that is down.
pub fn startup_synced(
    answered: usize,
    needed: usize,
    alone_ok: bool,
    others_alive: usize,
    waited: std::time::Duration,
) -> bool {
    answered >= needed
        || (alone_ok && others_alive == 0 && waited > std::time::Duration::from_secs(3))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn rec(service: &str, created: u64, available: bool) -> Record {
        Record {
            created_ms: created,
            service: service.into(),
            available,
            reason: if available {
                Reason::Unknown
            } else {
                Reason::Planned
            },
            operator: "ops".into(),
            expected_down_ms: None,
            expected_up_ms: None,
        }
    }

    #[test]
    fn a_starting_node_is_synced_by_answers_never_by_time_alone() {
        use std::time::Duration;
        let long = Duration::from_secs(60);
        assert!(startup_synced(1, 1, false, 2, Duration::ZERO));
        assert!(
            !startup_synced(0, 1, false, 2, long),
            "peers alive, none answered"
        );
        assert!(
            !startup_synced(0, 1, false, 0, long),
            "alone, but a quorum needs more"
        );
        assert!(
            !startup_synced(0, 1, true, 0, Duration::from_secs(1)),
            "not yet 3 s"
        );
        assert!(startup_synced(0, 1, true, 0, long), "alone with quorum 1");
        assert!(
            !startup_synced(0, 1, true, 1, long),
            "someone is there to ask"
        );
        assert!(
            !startup_synced(1, 2, false, 2, long),
            "quorum mode: two answers"
        );
    }

    #[test]
    fn the_later_record_wins_and_old_news_changes_nothing() {
        let mut set = Set::new();
        assert!(absorb(&mut set, rec("web", 10, false)));
        assert!(!absorb(&mut set, rec("web", 5, true)), "older");
        assert!(!absorb(&mut set, rec("web", 10, false)), "the same");
        assert!(!is_available(&set, "web"));
        assert!(absorb(&mut set, rec("web", 20, true)));
        assert!(is_available(&set, "web"));
        assert!(is_available(&set, "db"), "no record: available");
    }

    #[test]
    fn follow_ups_are_what_the_peer_lacks_or_holds_older() {
        let mine: Set = [rec("a", 10, false), rec("b", 10, true), rec("c", 1, true)]
            .into_iter()
            .map(|r| (r.service.clone(), r))
            .collect();
        let theirs: Set = [rec("a", 5, true), rec("b", 20, false), rec("c", 1, true)]
            .into_iter()
            .map(|r| (r.service.clone(), r))
            .collect();
        let ups = newer_than(&mine, &theirs);
        assert_eq!(ups, vec![rec("a", 10, false)]);
    }

    fn arb_record() -> impl Strategy<Value = Record> {
        (
            0u64..20,
            prop::sample::select(vec!["web", "db", "mail"]),
            any::<bool>(),
            prop::sample::select(vec![
                Reason::Unknown,
                Reason::Planned,
                Reason::Unplanned,
                Reason::Testing,
            ]),
            prop::sample::select(vec!["ann", "bob"]),
        )
            .prop_map(|(t, s, a, reason, op)| Record {
                created_ms: t,
                service: s.into(),
                available: a,
                reason,
                operator: op.into(),
                expected_down_ms: None,
                expected_up_ms: Some(t + 100),
            })
    }

    fn arb_set() -> impl Strategy<Value = Set> {
        prop::collection::vec(arb_record(), 0..8).prop_map(|rs| {
            let mut s = Set::new();
            for r in rs {
                absorb(&mut s, r);
            }
            s
        })
    }

    proptest! {
        #[test]
        fn merge_is_commutative_associative_and_idempotent(a in arb_set(), b in arb_set(), c in arb_set()) {
            prop_assert_eq!(merge(&a, &b), merge(&b, &a));
            prop_assert_eq!(merge(&merge(&a, &b), &c), merge(&a, &merge(&b, &c)));
            prop_assert_eq!(merge(&a, &a), a.clone());
            // Whatever order records arrive in, the result is the same.
            let mut one = a.clone();
            for r in b.values().chain(c.values()) { absorb(&mut one, r.clone()); }
            let mut two = a.clone();
            for r in c.values().chain(b.values()).collect::<Vec<_>>().into_iter().rev() { absorb(&mut two, r.clone()); }
            prop_assert_eq!(one, two);
            // After a sync and its follow-ups, both sides hold the union.
            let union = merge(&a, &b);
            let mut peer = b.clone();
            for r in newer_than(&a, &b) { absorb(&mut peer, r); }
            prop_assert_eq!(peer, union);
        }
    }
}
