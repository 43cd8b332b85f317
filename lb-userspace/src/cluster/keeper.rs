//! What this node's interface and data plane must hold for the VIPs it serves, and
//! the steps that get them there. The node's state machine decides *whether* this
//! node serves a VIP; the keeper decides *how* to take it on and off without a
//! moment where clients point at a node that does not forward:
//!
//! - acquire: the data plane first (a packet that arrives once the address is up is
//!   balanced, never reset by the kernel), then the address, the script, and the
//!   announcements (now, +200 ms, +600 ms);
//! - release: stop announcing (pending repeats cancelled), the script, remove the
//!   address (the kernel stops answering ARP for it), and only after a grace period
//!   the data-plane entry: clients that still point here keep being forwarded while
//!   the new owner's announcements reach them;
//! - a failed acquire is undone step by step;
//! - `reconcile` compares what is (interface addresses, the data plane's VIPs) with
//!   what should be, and repairs every difference, counting it.
//!
//! Pure: time comes in, steps go out; the I/O layer runs the steps one at a time.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    time::{Duration, Instant},
};

/// Announcements after an acquire, counted from it.
pub const ANNOUNCE_AT: [Duration; 3] = [
    Duration::ZERO,
    Duration::from_millis(200),
    Duration::from_millis(600),
];

/// One thing to do to the system.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Put the VIP in the data plane's served set.
    Own(IpAddr),
    /// Take it out.
    Disown(IpAddr),
    AddAddress(IpAddr),
    RemoveAddress(IpAddr),
    /// The operator's script: `acquire|release VIP`.
    Script(&'static str, IpAddr),
    /// A gratuitous ARP / unsolicited neighbour advertisement.
    Announce(IpAddr),
}

/// What the system holds now, among the group's addresses.
#[derive(Clone, Debug, Default)]
pub struct Seen {
    pub on_interface: BTreeSet<IpAddr>,
    /// In the data plane's served set.
    pub owned: BTreeSet<IpAddr>,
}

/// A difference `reconcile` found and the step that repairs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repair {
    pub address: IpAddr,
    pub what: &'static str,
    pub step: Step,
}

#[derive(Debug)]
pub struct Keeper {
    grace: Duration,
    /// VIPs this node serves: acquired and not released.
    held: BTreeSet<IpAddr>,
    /// Released VIPs still forwarded, until the instant given.
    draining: BTreeMap<IpAddr, Instant>,
    /// Announcements still to send, by VIP.
    announcements: BTreeMap<IpAddr, Vec<Instant>>,
    repairs: u64,
}

impl Keeper {
    /// `held`: what the node serves already (adopted after a restart).
    pub fn new(grace: Duration, held: BTreeSet<IpAddr>) -> Keeper {
        Keeper {
            grace,
            held,
            draining: BTreeMap::new(),
            announcements: BTreeMap::new(),
            repairs: 0,
        }
    }

    pub fn held(&self) -> &BTreeSet<IpAddr> {
        &self.held
    }

    pub fn draining(&self) -> impl Iterator<Item = &IpAddr> {
        self.draining.keys()
    }

    /// Differences repaired since the start.
    pub fn repairs(&self) -> u64 {
        self.repairs
    }

    /// The steps of an acquire, in order; run them all, or `undo_acquire` on the
    /// first failure. Announcements are scheduled (see `due`).
    pub fn acquire(&mut self, vip: IpAddr, script: bool) -> Vec<Step> {
        self.draining.remove(&vip);
        let mut steps = vec![Step::Own(vip), Step::AddAddress(vip)];
        if script {
            steps.push(Step::Script("acquire", vip));
        }
        steps
    }

    /// The acquire's steps ran: this node serves `vip`; announce it now and again.
    pub fn acquired(&mut self, now: Instant, vip: IpAddr) -> Vec<Step> {
        self.held.insert(vip);
        let mut at: Vec<Instant> = ANNOUNCE_AT.iter().map(|d| now + *d).collect();
        at.remove(0);
        self.announcements.insert(vip, at);
        vec![Step::Announce(vip)]
    }

    /// A step of the acquire failed: take back what the others did.
    pub fn undo_acquire(&mut self, vip: IpAddr) -> Vec<Step> {
        self.held.remove(&vip);
        self.announcements.remove(&vip);
        self.draining.remove(&vip);
        vec![Step::RemoveAddress(vip), Step::Disown(vip)]
    }

    /// The steps of a release, in order. The data-plane entry stays for the grace
    /// period (see `due`).
    pub fn release(&mut self, now: Instant, vip: IpAddr, script: bool) -> Vec<Step> {
        self.held.remove(&vip);
        self.announcements.remove(&vip);
        self.draining.insert(vip, now + self.grace);
        let mut steps = Vec::new();
        if script {
            steps.push(Step::Script("release", vip));
        }
        steps.push(Step::RemoveAddress(vip));
        steps
    }

    /// Leaving for good: every held VIP released and nothing left to drain later
    /// (the caller waits out `grace` itself before it detaches).
    pub fn release_all(&mut self, now: Instant, script: bool) -> Vec<Step> {
        let held: Vec<IpAddr> = self.held.iter().copied().collect();
        held.into_iter()
            .flat_map(|v| self.release(now, v, script))
            .collect()
    }

    /// What is due at `now`: repeated announcements and the end of grace periods.
    pub fn due(&mut self, now: Instant) -> Vec<Step> {
        let mut steps = Vec::new();
        for (vip, at) in self.announcements.iter_mut() {
            let before = at.len();
            at.retain(|t| *t > now);
            if at.len() < before {
                steps.push(Step::Announce(*vip));
            }
        }
        self.announcements.retain(|_, at| !at.is_empty());
        let ended: Vec<IpAddr> = self
            .draining
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(v, _)| *v)
            .collect();
        for vip in ended {
            self.draining.remove(&vip);
            steps.push(Step::Disown(vip));
        }
        steps
    }

    /// The next instant `due` has something to do.
    pub fn next_due(&self) -> Option<Instant> {
        self.announcements
            .values()
            .flatten()
            .chain(self.draining.values())
            .min()
            .copied()
    }

    /// Every difference between `seen` and what should be, as repairs (counted).
    /// `group`: the addresses this node may ever serve (others on the interface are
    /// not the keeper's business).
    pub fn reconcile(&mut self, seen: &Seen, group: &BTreeSet<IpAddr>) -> Vec<Repair> {
        let mut out = Vec::new();
        for vip in &self.held {
            if !seen.owned.contains(vip) {
                out.push(Repair {
                    address: *vip,
                    what: "served but not in the data plane",
                    step: Step::Own(*vip),
                });
            }
            if !seen.on_interface.contains(vip) {
                out.push(Repair {
                    address: *vip,
                    what: "served but not on the interface",
                    step: Step::AddAddress(*vip),
                });
                // Whoever answered for it meanwhile may have moved caches away.
                out.push(Repair {
                    address: *vip,
                    what: "served but not on the interface",
                    step: Step::Announce(*vip),
                });
            }
        }
        for vip in seen.on_interface.intersection(group) {
            if !self.held.contains(vip) {
                out.push(Repair {
                    address: *vip,
                    what: "on the interface but not served",
                    step: Step::RemoveAddress(*vip),
                });
            }
        }
        for vip in &seen.owned {
            if !self.held.contains(vip) && !self.draining.contains_key(vip) {
                out.push(Repair {
                    address: *vip,
                    what: "in the data plane but not served",
                    step: Step::Disown(*vip),
                });
            }
        }
        self.repairs += out.len() as u64;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const V: &str = "198.18.0.100";

    #[test]
    fn an_acquire_forwards_before_the_address_is_up_and_announces_three_times() {
        let t0 = Instant::now();
        let mut k = Keeper::new(Duration::from_secs(2), BTreeSet::new());
        let steps = k.acquire(ip(V), true);
        assert_eq!(
            steps,
            [
                Step::Own(ip(V)),
                Step::AddAddress(ip(V)),
                Step::Script("acquire", ip(V))
            ]
        );
        assert_eq!(k.acquired(t0, ip(V)), [Step::Announce(ip(V))]);
        assert!(k.due(t0 + Duration::from_millis(199)).is_empty());
        assert_eq!(
            k.due(t0 + Duration::from_millis(200)),
            [Step::Announce(ip(V))]
        );
        assert_eq!(k.next_due(), Some(t0 + Duration::from_millis(600)));
        assert_eq!(
            k.due(t0 + Duration::from_millis(600)),
            [Step::Announce(ip(V))]
        );
        assert!(k.due(t0 + Duration::from_secs(5)).is_empty());
        assert_eq!(k.next_due(), None);
    }

    #[test]
    fn a_release_cancels_pending_announcements_and_forwards_through_the_grace() {
        let t0 = Instant::now();
        let mut k = Keeper::new(Duration::from_secs(2), BTreeSet::new());
        k.acquire(ip(V), false);
        k.acquired(t0, ip(V));
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(k.release(t1, ip(V), false), [Step::RemoveAddress(ip(V))]);
        // Nothing announced after the release; the entry goes when the grace ends.
        assert!(k.due(t1 + Duration::from_millis(1500)).is_empty());
        assert_eq!(k.due(t1 + Duration::from_secs(2)), [Step::Disown(ip(V))]);
        // Meanwhile the entry is expected: no repair takes it out early.
        let mut k = Keeper::new(Duration::from_secs(2), [ip(V)].into());
        k.release(t0, ip(V), false);
        let seen = Seen {
            on_interface: BTreeSet::new(),
            owned: [ip(V)].into(),
        };
        assert!(k.reconcile(&seen, &[ip(V)].into()).is_empty());
    }

    #[test]
    fn taking_a_vip_back_during_its_grace_keeps_the_entry() {
        let t0 = Instant::now();
        let mut k = Keeper::new(Duration::from_secs(2), [ip(V)].into());
        k.release(t0, ip(V), false);
        k.acquire(ip(V), false);
        k.acquired(t0 + Duration::from_secs(1), ip(V));
        assert!(!k
            .due(t0 + Duration::from_secs(3))
            .contains(&Step::Disown(ip(V))));
    }

    #[test]
    fn a_failed_acquire_is_undone() {
        let t0 = Instant::now();
        let mut k = Keeper::new(Duration::from_secs(2), BTreeSet::new());
        k.acquire(ip(V), false);
        assert_eq!(
            k.undo_acquire(ip(V)),
            [Step::RemoveAddress(ip(V)), Step::Disown(ip(V))]
        );
        assert!(k.held().is_empty());
        assert!(
            k.due(t0 + Duration::from_secs(1)).is_empty(),
            "nothing announced"
        );
    }

    #[test]
    fn reconcile_repairs_and_counts_every_difference() {
        let (a, b, c, own) = (
            ip(V),
            ip("198.18.0.101"),
            ip("198.18.0.102"),
            ip("198.18.0.2"),
        );
        let group: BTreeSet<IpAddr> = [a, b, c].into();
        let mut k = Keeper::new(Duration::from_secs(2), [a].into());
        let seen = Seen {
            // b leaked on the interface, c in the data plane; a is missing from both;
            // the node's own address is not the keeper's business.
            on_interface: [b, own].into(),
            owned: [c].into(),
        };
        let steps: Vec<Step> = k
            .reconcile(&seen, &group)
            .into_iter()
            .map(|r| r.step)
            .collect();
        assert_eq!(
            steps,
            [
                Step::Own(a),
                Step::AddAddress(a),
                Step::Announce(a),
                Step::RemoveAddress(b),
                Step::Disown(c)
            ]
        );
        assert_eq!(k.repairs(), 5);
        let fixed = Seen {
            on_interface: [a, own].into(),
            owned: [a].into(),
        };
        assert!(k.reconcile(&fixed, &group).is_empty());
        assert_eq!(k.repairs(), 5);
    }
}
