//! What the maps hold: the plan and table fingerprint each service was last written
//! with, and what the published snapshot needs of them (backend counts, services
//! this node cannot steer, each VIP's digest) kept as each service is written, so
//! that a snapshot after a change of one service costs in proportion to it.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use crate::{
    model::{Proto, ServiceKey},
    plan::ServicePlan,
};

#[derive(Default)]
pub struct Written {
    plans: BTreeMap<ServiceKey, ServicePlan>,
    digests: BTreeMap<ServiceKey, u64>,
    backends: usize,
    unrouted: usize,
    unable: BTreeSet<ServiceKey>,
    by_vip: BTreeMap<IpAddr, u64>,
}

impl Written {
    pub fn get(&self, key: &ServiceKey) -> Option<&ServicePlan> {
        self.plans.get(key)
    }

    /// `key` written with `plan`, its table's fingerprint `digest`; returns the plan
    /// it held before.
    pub fn insert(
        &mut self,
        key: ServiceKey,
        plan: ServicePlan,
        digest: u64,
    ) -> Option<ServicePlan> {
        self.count(&plan, 1);
        if is_unable(&plan) {
            self.unable.insert(key);
        } else {
            self.unable.remove(&key);
        }
        let before = self.plans.insert(key, plan);
        if let Some(b) = &before {
            self.count(b, -1);
        }
        self.digests.insert(key, digest);
        self.digest_vip(key.addr);
        before
    }

    /// `key` removed from the maps; returns the plan it held.
    pub fn remove(&mut self, key: &ServiceKey) -> Option<ServicePlan> {
        let before = self.plans.remove(key);
        if let Some(b) = &before {
            self.count(b, -1);
        }
        self.unable.remove(key);
        self.digests.remove(key);
        self.digest_vip(key.addr);
        before
    }

    pub fn clear(&mut self) {
        *self = Written::default();
    }

    /// Backends written, and those of them without a route.
    pub fn backend_counts(&self) -> (usize, usize) {
        (self.backends, self.unrouted)
    }

    /// VIP addresses with a service this node cannot steer as its table says: a
    /// backend with cells but no route yet, or backends but none with a weight.
    pub fn unable(&self) -> BTreeSet<IpAddr> {
        self.unable.iter().map(|k| k.addr).collect()
    }

    /// Each VIP's digest: its services' table fingerprints, in key order.
    pub fn vip_digests(&self) -> &BTreeMap<IpAddr, u64> {
        &self.by_vip
    }

    fn count(&mut self, p: &ServicePlan, sign: isize) {
        let unrouted = p.backends.values().filter(|b| b.route.is_none()).count();
        self.backends = self
            .backends
            .wrapping_add_signed(sign * p.backends.len() as isize);
        self.unrouted = self.unrouted.wrapping_add_signed(sign * unrouted as isize);
    }

    /// Recomputes the digest of `vip` from its services (ordered after it in the map).
    fn digest_vip(&mut self, vip: IpAddr) {
        let first = ServiceKey {
            addr: vip,
            port: 0,
            proto: Proto::Tcp,
        };
        let mut services = self
            .digests
            .range(first..)
            .take_while(|(k, _)| k.addr == vip)
            .peekable();
        if services.peek().is_none() {
            self.by_vip.remove(&vip);
            return;
        }
        let h = services.fold(VIP_DIGEST_START, |h, (key, d)| mix(h, key, *d));
        self.by_vip.insert(vip, h);
    }
}

/// A VIP's digest before its first service (64-bit FNV-1a's offset basis).
const VIP_DIGEST_START: u64 = 0xcbf2_9ce4_8422_2325;

/// A VIP's digest `h` taking in one of its services (in key order) and its table's
/// fingerprint.
fn mix(h: u64, key: &ServiceKey, digest: u64) -> u64 {
    key.port
        .to_le_bytes()
        .into_iter()
        .chain([key.proto as u8])
        .chain(digest.to_le_bytes())
        .fold(h, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

fn is_unable(p: &ServicePlan) -> bool {
    let unrouted = p
        .backends
        .values()
        .any(|b| b.weight > 0 && b.route.is_none());
    let none = !p.backends.is_empty() && p.backends.values().all(|b| b.weight == 0);
    unrouted || none
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::{BackendRoute, Egress},
        plan::BackendPlan,
    };
    use proptest::prelude::*;

    fn key(vip: u8, port: u16, udp: bool) -> ServiceKey {
        ServiceKey {
            addr: IpAddr::from([198, 18, 0, vip]),
            port,
            proto: if udp { Proto::Udp } else { Proto::Tcp },
        }
    }

    fn plan(backends: &[(u8, u32, bool)]) -> ServicePlan {
        ServicePlan {
            backends: backends
                .iter()
                .map(|&(b, weight, routed)| {
                    let route = routed.then_some(BackendRoute {
                        dst_mac: [2, 0, 0, 0, 0, b],
                        src_mac: [2, 0, 0, 0, 0, 1],
                        egress: Egress::Ingress,
                        encap: None,
                    });
                    let plan = BackendPlan {
                        weight,
                        route,
                        sphere: None,
                    };
                    (IpAddr::from([198, 19, 0, b]), plan)
                })
                .collect(),
            ..ServicePlan::default()
        }
    }

    /// What the summaries are, computed from every plan (what the reconciler did on
    /// each snapshot before).
    fn from_scratch(
        plans: &BTreeMap<ServiceKey, (ServicePlan, u64)>,
    ) -> ((usize, usize), BTreeSet<IpAddr>, BTreeMap<IpAddr, u64>) {
        let mut counts = (0, 0);
        let mut unable = BTreeSet::new();
        let mut vips: BTreeMap<IpAddr, u64> = BTreeMap::new();
        for (k, (p, d)) in plans {
            counts.0 += p.backends.len();
            counts.1 += p.backends.values().filter(|b| b.route.is_none()).count();
            if is_unable(p) {
                unable.insert(k.addr);
            }
            let h = vips.entry(k.addr).or_insert(VIP_DIGEST_START);
            *h = mix(*h, k, *d);
        }
        (counts, unable, vips)
    }

    proptest! {
        /// Any sequence of writes and removals leaves the summaries as a walk of
        /// every plan gives them.
        #[test]
        fn the_summaries_kept_per_write_are_those_of_all_plans(
            steps in proptest::collection::vec(
                (0u8..4, 0u16..3, any::<bool>(), any::<bool>(),
                 proptest::collection::vec((0u8..6, 0u32..3, any::<bool>()), 0..4),
                 any::<u64>()),
                1..60,
            )
        ) {
            let mut w = Written::default();
            let mut all = BTreeMap::new();
            for (vip, port, udp, remove, backends, digest) in steps {
                let k = key(vip, port, udp);
                if remove {
                    prop_assert_eq!(w.remove(&k), all.remove(&k).map(|(p, _)| p));
                } else {
                    let p = plan(&backends);
                    let before = all.insert(k, (p.clone(), digest)).map(|(p, _)| p);
                    prop_assert_eq!(w.insert(k, p, digest), before);
                }
                let (counts, unable, vips) = from_scratch(&all);
                prop_assert_eq!(w.backend_counts(), counts);
                prop_assert_eq!(w.unable(), unable);
                prop_assert_eq!(w.vip_digests(), &vips);
            }
        }
    }
}
