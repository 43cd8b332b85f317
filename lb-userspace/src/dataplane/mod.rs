//! The data plane as the control plane sees it: a narrow [`Dataplane`] trait (write a
//! service's plan, remove a service, choose the served addresses, read counters and
//! what the maps hold), implemented by the real maps ([`maps::MapManager`]) and by an
//! in-memory fake ([`fake::FakeDataplane`]) that the reconciler's tests use.
//!
//! `write_service` is all or nothing for one service: new entries are written before
//! the one `VIPS` update that makes them reachable, old ones removed after it, and a
//! failure before that update undoes what it wrote. Whether a whole change fits
//! (services, backend ids, subnet rules, egress ports) is decided before anything is
//! written, by the pure [`check_fits`], so a refused change touches nothing.

pub mod decap;
pub mod error;
pub mod fake;
pub mod layout;
pub mod liveness;
pub mod loader;
pub mod maps;

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{
    Counter, GlobalStats, RING_EMPTY, VIP_F_EPOCH_RESTEER, VIP_F_PASS_IRREGULAR,
    VIP_F_SRC_PARTITION, VIP_F_TOPOLOGY, VIP_F_UNAVAILABLE,
};

pub use error::{DataplaneError, Result};

use crate::{
    maglev,
    model::{BackendRoute, Egress, ServiceKey},
    plan::{Rule, ServicePlan},
};

/// What the data plane can hold, fixed when it is loaded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub services: u32,
    pub backends: u32,
    /// Bounds of the automatically sized tables; `max` also bounds a pinned size.
    pub tables: layout::TableBounds,
    /// Cells of the ring array, shared by all services' tables.
    pub ring_cells: u64,
    /// Client subnet rules over all services and both ring slots.
    pub sphere_rules: u32,
    /// Egress interfaces other than the receiving one.
    pub tx_ports: u32,
}

/// What one service holds, as far as capacity is concerned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Held {
    /// Its backends (each holds one backend id).
    pub backends: BTreeSet<IpAddr>,
    /// Its subnet rules (live slot).
    pub rules: usize,
    /// Ring cells reserved for it: two slots of its largest table.
    pub ring_cells: u64,
}

/// What the maps hold now, as far as capacity is concerned: the services asked about
/// in detail, the rest as totals (so that a change to one service costs in proportion
/// to that service, not to the node).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// The services asked about that the maps hold.
    pub services: BTreeMap<ServiceKey, Held>,
    /// Over every service the maps hold: services, backends, subnet rules, ring cells.
    pub service_count: usize,
    pub backend_count: usize,
    pub rule_count: usize,
    pub ring_cells: u64,
    /// Egress interfaces that have a devmap slot.
    pub tx_ports: BTreeSet<u32>,
}

impl Usage {
    /// The usage of `held`, detailed for `keys` (test and fake helper).
    pub fn of<'a>(
        held: impl IntoIterator<Item = (ServiceKey, Held)>,
        keys: impl IntoIterator<Item = &'a ServiceKey>,
    ) -> Usage {
        let all: BTreeMap<ServiceKey, Held> = held.into_iter().collect();
        let mut u = Usage {
            service_count: all.len(),
            ..Usage::default()
        };
        for h in all.values() {
            u.backend_count += h.backends.len();
            u.rule_count += h.rules;
            u.ring_cells += h.ring_cells;
        }
        for k in keys {
            if let Some(h) = all.get(k) {
                u.services.insert(*k, h.clone());
            }
        }
        u
    }
}

/// [`ring_reservation`] of a service as configured (its own backends).
pub fn spec_reservation(spec: &crate::desired::ServiceSpec, bounds: layout::TableBounds) -> u64 {
    let subnets = match spec.spm.rule {
        crate::spm::RuleName::Topology => spec.spm.topology.as_slice(),
        _ => &[],
    };
    2 * layout::slot_cells(
        spec.config.maglev_size,
        spec.backends.len(),
        subnets,
        bounds,
    )
}

/// The ring cells a service with `plan` reserves: two slots (the live one and the
/// one the next table is written to) of its largest slot.
pub fn ring_reservation(plan: &ServicePlan, bounds: layout::TableBounds) -> u64 {
    2 * layout::slot_max(plan, bounds)
}

/// Packet and byte counters of a service and of each of its backends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServiceCounters {
    pub service: Counter,
    pub backends: BTreeMap<IpAddr, Counter>,
}

/// What the maps hold for one service, read back and named by address (ids are the
/// writer's business): equal to [`Contents::expected`] of the plan last written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Contents {
    /// `VIP_F_*` as in `VIPS`.
    pub flags: u32,
    pub epoch: u32,
    pub table_size: u32,
    /// Active backends and their routes (`None`: no route, frames dropped).
    pub backends: BTreeMap<IpAddr, Option<BackendRoute>>,
    /// The live slot: whole table and sphere tables, by backend address.
    pub cells: Vec<Option<IpAddr>>,
    /// (network, prefix, offset, size) of the subnet rules of the live slot.
    pub subnets: Vec<(IpAddr, u8, u32, u32)>,
}

/// The `VIP_F_*` flags a plan gets.
pub fn vip_flags(plan: &ServicePlan) -> u32 {
    let c = &plan.config;
    let mut f = 0;
    if c.pass_irregular {
        f |= VIP_F_PASS_IRREGULAR;
    }
    if c.epoch_resteer {
        f |= VIP_F_EPOCH_RESTEER;
    }
    if c.unavailable {
        f |= VIP_F_UNAVAILABLE;
    }
    match plan.rule {
        Rule::Hash => {}
        Rule::Source => f |= VIP_F_SRC_PARTITION,
        Rule::Topology { .. } => f |= VIP_F_TOPOLOGY,
    }
    f
}

impl Contents {
    /// What the maps must hold for `plan`.
    pub fn expected(plan: &ServicePlan, bounds: layout::TableBounds) -> Result<Contents> {
        let l = layout::layout(plan, bounds)?;
        let addrs: Vec<IpAddr> = plan.backends.keys().copied().collect();
        let mut subnets = l.subnets.clone();
        subnets.sort();
        Ok(Contents {
            flags: vip_flags(plan),
            epoch: plan.config.epoch,
            table_size: l.table_size,
            backends: plan.backends.iter().map(|(a, b)| (*a, b.route)).collect(),
            cells: l
                .cells
                .iter()
                .map(|&c| (c != RING_EMPTY).then(|| addrs[c as usize]))
                .collect(),
            subnets,
        })
    }
}

/// Entries in the connection tables, by family (each sized on its own:
/// `conn_table_size`, `conn_table_size_v6`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConnCounts {
    pub ipv4: usize,
    pub ipv6: usize,
}

impl ConnCounts {
    pub fn total(&self) -> usize {
        self.ipv4 + self.ipv6
    }
}

/// The data plane, in the verbs the reconciler needs.
pub trait Dataplane {
    fn limits(&self) -> Limits;
    /// What the maps hold: `keys` in detail, everything as totals.
    fn usage(&self, keys: &mut dyn Iterator<Item = ServiceKey>) -> Usage;
    /// Makes the maps hold `plan` for `key` (adding the service if it is new). All or
    /// nothing; writes only what differs from what the maps hold. Returns the
    /// fingerprint of the table written (`layout::fingerprint`).
    fn write_service(&mut self, key: ServiceKey, plan: &ServicePlan) -> Result<u64>;
    /// As `write_service`, with the layout of `plan` already made (on another thread:
    /// a table of millions of cells takes a second to build).
    fn write_service_laid(
        &mut self,
        key: ServiceKey,
        plan: &ServicePlan,
        laid: layout::Laid,
    ) -> Result<u64> {
        let _ = laid;
        self.write_service(key, plan)
    }
    /// Removes a service and its backends (their connections end with it).
    fn remove_service(&mut self, key: ServiceKey) -> Result<()>;
    /// In a cluster, the addresses this node serves (only those are in `VIP_ADDRS`);
    /// `None`: a standalone node serves every service address.
    fn set_served(&mut self, served: Option<BTreeSet<IpAddr>>) -> Result<()>;
    /// The services the maps hold.
    fn services(&self) -> Vec<ServiceKey>;
    /// Whether the maps hold `key` (a change of one service asks this, not `services`).
    fn holds(&self, key: ServiceKey) -> bool;
    fn counters(&self, key: ServiceKey) -> Option<ServiceCounters>;
    /// The counters of every service in `keys` the maps hold (an implementation reads
    /// each counter map once, not once per service).
    fn counters_of(
        &self,
        keys: &mut dyn Iterator<Item = ServiceKey>,
    ) -> BTreeMap<ServiceKey, ServiceCounters> {
        keys.filter_map(|k| Some((k, self.counters(k)?))).collect()
    }
    fn global_stats(&self) -> Result<GlobalStats>;
    /// Entries in the connection tables, as last counted (the real maps count on a
    /// thread of their own, every second or as often as a walk allows).
    fn conn_counts(&self) -> ConnCounts;
    /// What the maps hold for `key`, read back from them.
    fn read_back(&self, key: ServiceKey) -> Result<Option<Contents>>;
    /// Whether the service's address is in `VIP_ADDRS` (balanced by this node).
    fn serves(&self, addr: IpAddr) -> bool;
}

/// The order to write `next` in (`None`: remove the service), if it all fits in
/// `limits` given `usage`; the first thing that does not fit otherwise, named.
/// Removals go first, then the services that give back backend ids, so that a
/// change that fits at its end also fits at every step on the way (a service holds
/// its old and new backends until its table flips).
pub fn check_fits(
    limits: &Limits,
    usage: &Usage,
    next: &BTreeMap<ServiceKey, Option<ServicePlan>>,
) -> Result<Vec<ServiceKey>> {
    let empty = Held::default();
    let mut order: Vec<(i64, ServiceKey)> = Vec::new();
    for (key, plan) in next {
        let held = usage.services.get(key).unwrap_or(&empty);
        let rank = match plan {
            None => i64::MIN,
            Some(p) => {
                let added = p
                    .backends
                    .keys()
                    .filter(|a| !held.backends.contains(a))
                    .count() as i64;
                let removed = held
                    .backends
                    .iter()
                    .filter(|a| !p.backends.contains_key(a))
                    .count() as i64;
                added - removed
            }
        };
        order.push((rank, *key));
    }
    order.sort();
    let mut services = usage.service_count as i64;
    let mut used = usage.backend_count as i64;
    let mut rules = usage.rule_count as i64;
    let mut cells = usage.ring_cells as i64;
    let mut ports = usage.tx_ports.clone();
    for (_, key) in &order {
        let known = usage.services.get(key);
        let held = known.unwrap_or(&empty);
        let Some(plan) = &next[key] else {
            if known.is_some() {
                services -= 1;
                used -= held.backends.len() as i64;
                rules -= held.rules as i64;
                cells -= held.ring_cells as i64;
            }
            continue;
        };
        if known.is_none() {
            services += 1;
            if services > limits.services as i64 {
                return Err(DataplaneError::TooManyServices {
                    service: *key,
                    max: limits.services,
                });
            }
        }
        let size = layout::table_size(plan.config.maglev_size, plan.backends.len(), limits.tables);
        if size > limits.tables.max {
            return Err(DataplaneError::RingTooLarge {
                service: *key,
                size,
                max: limits.tables.max,
            });
        }
        if !maglev::is_prime(size) {
            return Err(maglev::MaglevError::SizeNotPrime { size }.into());
        }
        let weighted = plan.backends.values().filter(|b| b.weight > 0).count();
        if weighted > size as usize {
            return Err(maglev::MaglevError::TooManyBackends {
                backends: weighted,
                size,
            }
            .into());
        }
        // Only an encapsulated backend may be of the other family: its outer header
        // is of its own family.
        for (addr, b) in &plan.backends {
            let encapsulated =
                plan.config.forward.encapsulates() || b.route.is_some_and(|r| r.encap.is_some());
            if addr.is_ipv4() != key.addr.is_ipv4() && !encapsulated {
                return Err(DataplaneError::FamilyMismatch {
                    service: *key,
                    backend: *addr,
                });
            }
        }
        let added: Vec<IpAddr> = plan
            .backends
            .keys()
            .filter(|a| !held.backends.contains(a))
            .copied()
            .collect();
        if used + added.len() as i64 > limits.backends as i64 {
            let free = (limits.backends as i64 - used).max(0) as usize;
            return Err(DataplaneError::TooManyBackends {
                service: *key,
                backend: added[free.min(added.len() - 1)],
                max: limits.backends,
            });
        }
        let removed = held
            .backends
            .iter()
            .filter(|a| !plan.backends.contains_key(a))
            .count() as i64;
        used += added.len() as i64 - removed;
        // A service keeps its reservation until its new one is made.
        let want = ring_reservation(plan, limits.tables) as i64;
        if cells - held.ring_cells as i64 + want > limits.ring_cells as i64 {
            return Err(DataplaneError::RingFull {
                service: *key,
                needed: want as u64,
                free: (limits.ring_cells as i64 - cells).max(0) as u64,
                total: limits.ring_cells,
            });
        }
        cells += want - held.ring_cells as i64;
        let new_rules = match &plan.rule {
            Rule::Topology { subnets } => subnets.len() as i64,
            _ => 0,
        };
        // The new slot's rules are written before the old slot's are removed.
        if rules + new_rules > limits.sphere_rules as i64 {
            return Err(DataplaneError::Options(format!(
                "{key}: its {new_rules} subnet rules do not fit: the data plane holds {} in all",
                limits.sphere_rules
            )));
        }
        rules += new_rules - held.rules as i64;
        for b in plan.backends.values() {
            if let Some(BackendRoute {
                egress: Egress::Interface { ifindex },
                ..
            }) = b.route
            {
                ports.insert(ifindex);
            }
        }
        if ports.len() > limits.tx_ports as usize {
            return Err(DataplaneError::TooManyTxPorts {
                max: limits.tx_ports,
            });
        }
    }
    Ok(order.into_iter().map(|(_, k)| k).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ServiceConfig;

    fn plan(n: u32, base: u32) -> ServicePlan {
        let route = BackendRoute {
            dst_mac: [2, 0, 0, 0, 0, 1],
            src_mac: [2, 0, 0, 0, 0, 2],
            egress: Egress::Ingress,
            encap: None,
        };
        ServicePlan::with_backends(
            ServiceConfig {
                maglev_size: 4093,
                ..ServiceConfig::default()
            },
            (0..n).map(|i| {
                (
                    IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + base + i)),
                    1,
                    route,
                )
            }),
        )
    }

    fn limits() -> Limits {
        Limits {
            services: 4,
            backends: 100,
            tables: layout::TableBounds {
                min: 251,
                max: 65537,
            },
            ring_cells: 1 << 20,
            sphere_rules: 16,
            tx_ports: 4,
        }
    }

    fn key(port: u16) -> ServiceKey {
        format!("tcp/198.18.0.100:{port}").parse().unwrap()
    }

    fn usage(of: &[(ServiceKey, &ServicePlan)]) -> Usage {
        let held = of.iter().map(|(k, p)| {
            (
                *k,
                Held {
                    backends: p.backends.keys().copied().collect(),
                    rules: 0,
                    ring_cells: ring_reservation(p, limits().tables),
                },
            )
        });
        let keys: Vec<ServiceKey> = of.iter().map(|(k, _)| *k).collect();
        Usage::of(held, &keys)
    }

    #[test]
    fn a_change_that_needs_more_backend_ids_than_exist_is_refused_whole() {
        let held = plan(10, 0);
        let u = usage(&[(key(1), &held)]);
        let next = BTreeMap::from([(key(2), Some(plan(50, 100))), (key(3), Some(plan(45, 200)))]);
        let e = check_fits(&limits(), &u, &next).unwrap_err();
        assert!(
            matches!(e, DataplaneError::TooManyBackends { max: 100, .. }),
            "{e}"
        );
        let next = BTreeMap::from([(key(2), Some(plan(50, 100))), (key(3), Some(plan(40, 200)))]);
        check_fits(&limits(), &u, &next).unwrap();
    }

    #[test]
    fn what_is_given_back_counts_first() {
        // Full: 100 ids held. Replacing one service by another of the same size fits,
        // because the removal is written first.
        let a = plan(60, 0);
        let b = plan(40, 100);
        let u = usage(&[(key(1), &a), (key(2), &b)]);
        let next = BTreeMap::from([(key(1), None), (key(3), Some(plan(60, 300)))]);
        assert_eq!(
            check_fits(&limits(), &u, &next).unwrap(),
            vec![key(1), key(3)]
        );
        // A service that shrinks goes before one that grows.
        let next = BTreeMap::from([(key(1), Some(plan(20, 0))), (key(2), Some(plan(80, 100)))]);
        assert_eq!(
            check_fits(&limits(), &u, &next).unwrap(),
            vec![key(1), key(2)]
        );
    }

    #[test]
    fn services_and_sizes_are_bounded() {
        let u = Usage::default();
        let next: BTreeMap<_, _> = (1..=5).map(|p| (key(p), Some(plan(1, p as u32)))).collect();
        assert!(matches!(
            check_fits(&limits(), &u, &next),
            Err(DataplaneError::TooManyServices { max: 4, .. })
        ));
        let mut big = plan(1, 0);
        big.config.maglev_size = 655373;
        let next = BTreeMap::from([(key(1), Some(big))]);
        assert!(matches!(
            check_fits(&limits(), &u, &next),
            Err(DataplaneError::RingTooLarge { .. })
        ));
    }

    #[test]
    fn ring_cells_are_reserved_for_what_each_table_needs_and_refused_beyond() {
        // 4093-cell tables reserve 2 x (4093 + 4) cells each (a table and its trailer).
        let u = usage(&[(key(1), &plan(1, 0))]);
        let mut small = limits();
        small.services = 1000;
        small.ring_cells = 3 * 2 * 4097;
        let next: BTreeMap<_, _> = (2..=3).map(|p| (key(p), Some(plan(1, p as u32)))).collect();
        check_fits(&small, &u, &next).unwrap();
        let next: BTreeMap<_, _> = (2..=4).map(|p| (key(p), Some(plan(1, p as u32)))).collect();
        let e = check_fits(&small, &u, &next).unwrap_err();
        assert!(
            matches!(
                e,
                DataplaneError::RingFull {
                    needed: 8194,
                    free: 0,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("ring_cells"), "{e}");
        // An automatic table is sized by its backends: three backends reserve 2 x 367.
        let mut auto = plan(3, 0);
        auto.config.maglev_size = 0;
        assert_eq!(ring_reservation(&auto, small.tables), 2 * (367 + 4));
    }
}
