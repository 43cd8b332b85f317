//! The plan: from everything lbd knows (the operator's desired state, the directory,
//! health verdicts, SPM epochs, water-mark verdicts, availability records, the
//! neighbour table and this node's interfaces) to the exact contents each service's
//! maps must have. Pure: the same inputs always give the same plan, whatever order
//! they arrived in, so two nodes that know the same things write the same tables.
//!
//! This is the only place that decides which backend takes new flows
//! ([`table_weight`]), where its frames go ([`route_of`]) and whether a service is
//! refused ([`unavailable`]).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use crate::{
    availability,
    desired::{BackendSpec, Desired, ServiceSpec},
    model::{
        BackendRoute, DirBackend, Egress, Encap, EncapSettings, Forward, LocalInterface, Neighbor,
        ServiceConfig, ServiceKey,
    },
    spm::RuleName,
    watermark::Verdict,
};

/// What the plan is made from. Borrowed: the reconciler owns the values.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    pub desired: &'a Desired,
    /// Valid backends the directory holds per service.
    pub directory: &'a BTreeMap<ServiceKey, BTreeMap<IpAddr, DirBackend>>,
    /// The directory has spoken at least once: before that, a service without
    /// backends may only be waiting for them, and is not judged out.
    pub directory_fed: bool,
    /// Backends whose health check fails.
    pub unhealthy: &'a BTreeSet<(ServiceKey, IpAddr)>,
    /// Each service's epoch as the SPM manager recorded it (added to the configured one).
    pub epochs: &'a BTreeMap<ServiceKey, u64>,
    /// The water-mark manager's verdicts per service.
    pub verdicts: &'a BTreeMap<ServiceKey, Vec<Verdict>>,
    pub availability: &'a availability::Set,
    /// The kernel's neighbour entries this node knows, by address.
    pub neighbors: &'a BTreeMap<IpAddr, Neighbor>,
    /// The data-plane interfaces, the first being where frames leave by default.
    pub interfaces: &'a [LocalInterface],
    /// This node's outer sources and GUE port, for services that encapsulate.
    pub encap: &'a EncapSettings,
}

/// How a service's new flows pick a backend.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Rule {
    /// The flow hash over a Maglev table.
    #[default]
    Hash,
    /// SPM rule `source`: the client address modulo the weighted instances, in
    /// address order (the SPM generator's choice, enforced by XDP).
    Source,
    /// SPM rule `topology`: a client subnet's sphere has a table of its own;
    /// (network, prefix, sphere).
    Topology { subnets: Vec<(IpAddr, u8, String)> },
}

/// One backend as the maps must hold it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendPlan {
    /// Its share of new flows in the table; 0: in no cell (its connections stay).
    pub weight: u32,
    /// Where its frames go; `None` while its MAC is unknown. An unresolved backend
    /// still has its cells (a table must not depend on what one node has resolved
    /// yet, or failing over to that node would move flows): its frames are dropped
    /// and counted (`drop_no_route`) until the route is known.
    pub route: Option<BackendRoute>,
    /// Its sphere (SPM provider), for the topology rule.
    pub sphere: Option<String>,
}

/// One service as the maps must hold it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServicePlan {
    /// As the data plane gets it: the epoch includes the SPM record, `unavailable`
    /// is decided by [`unavailable`].
    pub config: ServiceConfig,
    pub rule: Rule,
    pub backends: BTreeMap<IpAddr, BackendPlan>,
}

impl ServicePlan {
    /// A plain service with these backends (tests and tools).
    pub fn with_backends(
        config: ServiceConfig,
        backends: impl IntoIterator<Item = (IpAddr, u32, BackendRoute)>,
    ) -> ServicePlan {
        ServicePlan {
            config,
            rule: Rule::Hash,
            backends: backends
                .into_iter()
                .map(|(a, weight, route)| {
                    (
                        a,
                        BackendPlan {
                            weight,
                            route: Some(route),
                            sphere: None,
                        },
                    )
                })
                .collect(),
        }
    }
}

impl BackendPlan {
    /// New flows may reach it: it has cells and a route.
    pub fn takes_new_flows(&self) -> bool {
        self.weight > 0 && self.route.is_some()
    }
}

/// A service's backends as the data plane sees them: the configured ones, plus those
/// the directory holds. A configured backend's weight, drain and MAC win over a
/// directory entry for its address; the entry's host route (`via`) still says where
/// its frames go. Returns each with its directory entry, if any.
pub fn merged(
    spec: &ServiceSpec,
    directory: Option<&BTreeMap<IpAddr, DirBackend>>,
) -> BTreeMap<IpAddr, (BackendSpec, Option<DirBackend>)> {
    let mut out: BTreeMap<IpAddr, (BackendSpec, Option<DirBackend>)> = spec
        .backends
        .iter()
        .map(|(a, b)| (*a, (*b, directory.and_then(|d| d.get(a)).cloned())))
        .collect();
    for (addr, d) in directory.into_iter().flatten() {
        out.entry(*addr).or_insert((
            BackendSpec {
                mac: None,
                weight: d.weight,
                drain: false,
            },
            Some(d.clone()),
        ));
    }
    out
}

/// The one definition of how many cells a backend gets: its configured weight,
/// nothing while it drains or fails its health check, and under water marks nothing
/// while it is out of the table, its weight times its headroom share while in.
pub fn table_weight(spec: &BackendSpec, healthy: bool, verdict: Option<&Verdict>) -> u32 {
    if spec.drain || !healthy {
        return 0;
    }
    match verdict {
        Some(v) if !v.in_table => 0,
        Some(v) => spec.weight.saturating_mul(v.headroom.max(1)),
        None => spec.weight,
    }
}

/// The one definition of a valid instance (what the SPM lists and its epoch policy
/// watches): resolved, healthy, weighted and not draining. Water marks do not make
/// an instance invalid; they only keep new flows from it for a while.
pub fn valid_instance(spec: &BackendSpec, healthy: bool, resolved: bool) -> bool {
    resolved && healthy && !spec.drain && spec.weight > 0
}

/// Where a backend's frames go: to its MAC (configured, or its next hop's from the
/// neighbour table; a directory backend's next hop is its host's current route; an
/// encapsulated backend's, the gateway the kernel routes it through), out of the
/// interface that neighbour is on. `previous` is the route written now: kept while a
/// new next hop is unresolved, so a route change never re-steers flows. An
/// encapsulating service's backend of a family without a configured outer source
/// has no route (the config check refuses that).
#[allow(clippy::too_many_arguments)]
pub fn route_of(
    addr: IpAddr,
    spec: &BackendSpec,
    dir: Option<&DirBackend>,
    neighbors: &BTreeMap<IpAddr, Neighbor>,
    interfaces: &[LocalInterface],
    previous: Option<&BackendRoute>,
    forward: Forward,
    settings: &EncapSettings,
) -> Option<BackendRoute> {
    let first = interfaces.first()?;
    let hop = dir.map_or(addr, |d| d.via);
    let neighbor = neighbors.get(&hop);
    let Some(dst_mac) = spec.mac.or(neighbor.map(|n| n.mac)) else {
        return previous.copied();
    };
    let out = neighbor
        .and_then(|n| interfaces.iter().find(|i| i.ifindex == n.ifindex))
        .unwrap_or(first);
    let egress = if interfaces.len() == 1 {
        Egress::Ingress
    } else {
        Egress::Interface {
            ifindex: out.ifindex,
        }
    };
    let encap = if forward.encapsulates() {
        let link = out.mtu.min(u16::MAX as u32) as u16;
        Some(Encap {
            mode: forward,
            source: settings.source_for(addr)?,
            mtu: settings.path_mtu.map_or(link, |m| m.min(link)),
            gue_port: settings.gue_port(),
        })
    } else {
        None
    };
    Some(BackendRoute {
        dst_mac,
        src_mac: out.mac,
        egress,
        encap,
    })
}

/// Whether a backend's MAC is known (configured, or in the neighbour table for its
/// next hop).
pub fn resolved(
    addr: IpAddr,
    spec: &BackendSpec,
    dir: Option<&DirBackend>,
    neighbors: &BTreeMap<IpAddr, Neighbor>,
) -> bool {
    spec.mac.is_some() || neighbors.contains_key(&dir.map_or(addr, |d| d.via))
}

/// Why the service is unavailable, if it is: an operator's record, or no valid
/// backend at all (an automatic unplanned outage, judged by each node from what it
/// sees, and only once the directory has spoken). Water marks are not an outage; a
/// drained backend still serves its connections, so it counts as valid.
pub fn unavailable(inputs: &Inputs, key: &ServiceKey) -> Option<availability::Record> {
    match inputs.desired.services.get(key) {
        Some(spec) => unavailable_with(inputs, key, &merged(spec, inputs.directory.get(key))),
        // Only an operator's record can say so of a service not desired.
        None => declared_unavailable(inputs, key),
    }
}

/// An operator's record that says the service is down, if there is one.
fn declared_unavailable(inputs: &Inputs, key: &ServiceKey) -> Option<availability::Record> {
    // The set is keyed by the service's name: not formatted when the set is empty,
    // as it is on most nodes.
    if inputs.availability.is_empty() {
        return None;
    }
    let r = inputs.availability.get(&key.to_string())?;
    (!r.available).then(|| r.clone())
}

/// As [`unavailable`], with the service's backends already merged (the views have them).
pub fn unavailable_with(
    inputs: &Inputs,
    key: &ServiceKey,
    merged: &BTreeMap<IpAddr, (BackendSpec, Option<DirBackend>)>,
) -> Option<availability::Record> {
    if let Some(r) = declared_unavailable(inputs, key) {
        return Some(r);
    }
    if !inputs.directory_fed {
        return None;
    }
    let valid = merged.iter().any(|(addr, (b, dir))| {
        resolved(*addr, b, dir.as_ref(), inputs.neighbors)
            && !inputs.unhealthy.contains(&(*key, *addr))
            && (b.weight > 0 || b.drain)
    });
    (!valid).then(|| availability::Record {
        created_ms: 0,
        service: key.to_string(),
        available: false,
        reason: availability::Reason::Unplanned,
        operator: "automatic: no valid backend".into(),
        expected_down_ms: None,
        expected_up_ms: None,
    })
}

/// The rule from the service's SPM settings.
fn rule_of(spec: &ServiceSpec) -> Rule {
    match spec.spm.rule {
        RuleName::Source => Rule::Source,
        RuleName::Topology => Rule::Topology {
            subnets: spec.spm.topology.clone(),
        },
        _ => Rule::Hash,
    }
}

/// The plan of one service; `None` if it is not desired. `previous` is what the maps
/// hold for it now (its routes are kept while new next hops resolve).
pub fn plan_service(
    inputs: &Inputs,
    key: &ServiceKey,
    previous: Option<&ServicePlan>,
) -> Option<ServicePlan> {
    let spec = inputs.desired.services.get(key)?;
    let mut config = spec.config;
    let recorded = inputs.epochs.get(key).copied().unwrap_or(0) as u32;
    config.epoch = config.epoch.wrapping_add(recorded);
    config.unavailable = unavailable(inputs, key).is_some();
    let verdicts = inputs.verdicts.get(key);
    let backends = merged(spec, inputs.directory.get(key))
        .into_iter()
        .map(|(addr, (b, dir))| {
            let healthy = !inputs.unhealthy.contains(&(*key, addr));
            let verdict = verdicts.and_then(|v| v.iter().find(|v| v.backend == addr));
            let before = previous
                .and_then(|p| p.backends.get(&addr))
                .and_then(|b| b.route.as_ref());
            let sphere = spec
                .spm
                .spheres
                .get(&addr)
                .cloned()
                .or_else(|| dir.as_ref().and_then(|d| d.sphere.clone()));
            (
                addr,
                BackendPlan {
                    weight: table_weight(&b, healthy, verdict),
                    route: route_of(
                        addr,
                        &b,
                        dir.as_ref(),
                        inputs.neighbors,
                        inputs.interfaces,
                        before,
                        spec.config.forward,
                        inputs.encap,
                    ),
                    sphere,
                },
            )
        })
        .collect();
    Some(ServicePlan {
        config,
        rule: rule_of(spec),
        backends,
    })
}

/// The plan of every desired service.
pub fn plan_all(
    inputs: &Inputs,
    previous: &BTreeMap<ServiceKey, ServicePlan>,
) -> BTreeMap<ServiceKey, ServicePlan> {
    inputs
        .desired
        .services
        .keys()
        .filter_map(|k| Some((*k, plan_service(inputs, k, previous.get(k))?)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::watermark::Verdict;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn local(ifindex: u32, last: u8) -> LocalInterface {
        LocalInterface {
            name: format!("eth{ifindex}"),
            ifindex,
            mac: [2, 0, 0, 0, 0, last],
            mtu: 1500,
        }
    }

    struct World {
        desired: Desired,
        directory: BTreeMap<ServiceKey, BTreeMap<IpAddr, DirBackend>>,
        unhealthy: BTreeSet<(ServiceKey, IpAddr)>,
        epochs: BTreeMap<ServiceKey, u64>,
        verdicts: BTreeMap<ServiceKey, Vec<Verdict>>,
        availability: availability::Set,
        neighbors: BTreeMap<IpAddr, Neighbor>,
        interfaces: Vec<LocalInterface>,
        encap: EncapSettings,
        fed: bool,
    }

    impl World {
        fn new() -> World {
            let mut desired = Desired::default();
            let mut spec = ServiceSpec::default();
            spec.backends.insert(
                ip("198.18.0.11"),
                BackendSpec {
                    mac: Some([2, 1, 1, 1, 1, 1]),
                    weight: 2,
                    drain: false,
                },
            );
            spec.backends.insert(
                ip("198.18.0.12"),
                BackendSpec {
                    mac: None,
                    weight: 1,
                    drain: true,
                },
            );
            spec.backends
                .insert(ip("198.18.0.13"), BackendSpec::default());
            desired.services.insert(key(), spec);
            World {
                desired,
                directory: BTreeMap::new(),
                unhealthy: BTreeSet::new(),
                epochs: BTreeMap::new(),
                verdicts: BTreeMap::new(),
                availability: availability::Set::new(),
                neighbors: BTreeMap::from([(
                    ip("198.18.0.12"),
                    Neighbor {
                        ifindex: 7,
                        mac: [2, 2, 2, 2, 2, 2],
                    },
                )]),
                interfaces: vec![local(7, 9)],
                encap: EncapSettings::default(),
                fed: true,
            }
        }

        fn inputs(&self) -> Inputs<'_> {
            Inputs {
                desired: &self.desired,
                directory: &self.directory,
                directory_fed: self.fed,
                unhealthy: &self.unhealthy,
                epochs: &self.epochs,
                verdicts: &self.verdicts,
                availability: &self.availability,
                neighbors: &self.neighbors,
                interfaces: &self.interfaces,
                encap: &self.encap,
            }
        }

        fn plan(&self) -> ServicePlan {
            plan_service(&self.inputs(), &key(), None).unwrap()
        }
    }

    fn key() -> ServiceKey {
        "tcp/198.18.0.100:80".parse().unwrap()
    }

    #[test]
    fn unresolved_backends_keep_their_cells_without_a_route_and_drained_ones_get_none() {
        let w = World::new();
        let p = w.plan();
        let a = &p.backends[&ip("198.18.0.11")];
        assert_eq!(a.weight, 2);
        let route = a.route.unwrap();
        assert_eq!(route.src_mac, [2, 0, 0, 0, 0, 9]);
        assert_eq!(route.egress, Egress::Ingress);
        let b = &p.backends[&ip("198.18.0.12")];
        assert_eq!(b.weight, 0, "drained");
        assert_eq!(b.route.unwrap().dst_mac, [2, 2, 2, 2, 2, 2]);
        let c = &p.backends[&ip("198.18.0.13")];
        assert_eq!(
            c.weight, 1,
            "an unresolved backend keeps its share of the table"
        );
        assert_eq!(c.route, None);
        assert!(!c.takes_new_flows());
    }

    #[test]
    fn with_several_interfaces_frames_leave_by_the_backends_own() {
        let mut w = World::new();
        w.interfaces = vec![local(7, 7), local(8, 8)];
        w.neighbors.insert(
            ip("198.18.0.13"),
            Neighbor {
                ifindex: 8,
                mac: [2, 3, 3, 3, 3, 3],
            },
        );
        let r = w.plan().backends[&ip("198.18.0.13")].route.unwrap();
        assert_eq!(r.egress, Egress::Interface { ifindex: 8 });
        assert_eq!(r.src_mac, [2, 0, 0, 0, 0, 8]);
    }

    #[test]
    fn health_water_marks_and_the_directory_shape_the_weights() {
        let mut w = World::new();
        w.unhealthy.insert((key(), ip("198.18.0.11")));
        w.verdicts.insert(
            key(),
            vec![Verdict {
                backend: ip("198.18.0.13"),
                util: 500,
                weighted: 500,
                in_table: true,
                headroom: 4,
            }],
        );
        w.directory.insert(
            key(),
            BTreeMap::from([
                (
                    ip("198.18.0.11"),
                    DirBackend {
                        weight: 9,
                        via: ip("198.18.0.11"),
                        sphere: None,
                    },
                ),
                (
                    ip("198.18.0.14"),
                    DirBackend {
                        weight: 3,
                        via: ip("198.18.0.12"),
                        sphere: Some("east".into()),
                    },
                ),
            ]),
        );
        let p = w.plan();
        assert_eq!(
            p.backends[&ip("198.18.0.11")].weight,
            0,
            "unhealthy; the configured entry wins over the directory's"
        );
        assert_eq!(
            p.backends[&ip("198.18.0.13")].weight,
            4,
            "weight × headroom"
        );
        let d = &p.backends[&ip("198.18.0.14")];
        assert_eq!(d.weight, 3);
        assert_eq!(
            d.route.unwrap().dst_mac,
            [2, 2, 2, 2, 2, 2],
            "through its host's current route"
        );
        assert_eq!(d.sphere.as_deref(), Some("east"));
        w.verdicts.get_mut(&key()).unwrap()[0].in_table = false;
        assert_eq!(
            w.plan().backends[&ip("198.18.0.13")].weight,
            0,
            "out by the water marks"
        );
    }

    #[test]
    fn a_backend_whose_next_hop_is_unknown_keeps_the_route_it_has() {
        let w = World::new();
        let mut before = w.plan();
        let kept = BackendRoute {
            dst_mac: [2, 5, 5, 5, 5, 5],
            src_mac: [2, 0, 0, 0, 0, 9],
            egress: Egress::Ingress,
            encap: None,
        };
        before.backends.get_mut(&ip("198.18.0.13")).unwrap().route = Some(kept);
        let p = plan_service(&w.inputs(), &key(), Some(&before)).unwrap();
        assert_eq!(p.backends[&ip("198.18.0.13")].route, Some(kept));
    }

    #[test]
    fn epochs_add_up_and_availability_is_decided_here() {
        let mut w = World::new();
        w.desired.services.get_mut(&key()).unwrap().config.epoch = 2;
        w.epochs.insert(key(), 3);
        let p = w.plan();
        assert_eq!(p.config.epoch, 5);
        assert!(!p.config.unavailable);
        // No valid backend: an automatic outage, but only once the directory spoke.
        w.neighbors.clear();
        w.unhealthy.insert((key(), ip("198.18.0.11")));
        assert!(w.plan().config.unavailable);
        assert_eq!(
            unavailable(&w.inputs(), &key()).unwrap().operator,
            "automatic: no valid backend"
        );
        w.fed = false;
        assert!(!w.plan().config.unavailable);
        // An operator's record.
        w.fed = true;
        w.unhealthy.clear();
        availability::absorb(
            &mut w.availability,
            availability::Record {
                created_ms: 1,
                service: key().to_string(),
                available: false,
                reason: availability::Reason::Planned,
                operator: "ops".into(),
                expected_down_ms: None,
                expected_up_ms: None,
            },
        );
        assert!(w.plan().config.unavailable);
    }

    #[test]
    fn the_plan_does_not_depend_on_the_order_things_were_learned() {
        let w = World::new();
        let mut other = World::new();
        // The same neighbours, inserted in another order, and a service added later.
        other.neighbors = w.neighbors.iter().rev().map(|(a, n)| (*a, *n)).collect();
        assert_eq!(w.plan(), other.plan());
        assert_eq!(
            plan_all(&w.inputs(), &BTreeMap::new()),
            plan_all(&other.inputs(), &BTreeMap::new())
        );
    }
}
