//! What the data plane takes from the directory, read from a replica: each service's
//! backends (with the route their frames take now), its SPM epoch record and its
//! water-mark verdicts. Pure.

use std::{collections::BTreeMap, net::IpAddr};

use super::tables::{names, ServerRoute, Tables};
use crate::{
    model::{DirBackend, Forward, ServiceKey},
    spm::EpochRecord,
    watermark::{Verdict, VERDICT_TABLE},
};

/// Everything the data plane takes from the directory for the given services.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Feed {
    pub backends: BTreeMap<ServiceKey, BTreeMap<IpAddr, DirBackend>>,
    pub epochs: BTreeMap<ServiceKey, u64>,
    pub verdicts: BTreeMap<ServiceKey, Vec<Verdict>>,
}

impl Feed {
    /// The next hops the data plane needs MACs for.
    pub fn vias(&self) -> std::collections::BTreeSet<IpAddr> {
        self.backends
            .values()
            .flat_map(|b| b.values().map(|d| d.via))
            .collect()
    }
}

/// Whether a change to `table` changes what [`feed`] gives: leases and the agents
/// table change every second and must not cost a data-plane pass.
pub fn shapes_dataplane(table: &str) -> bool {
    table.starts_with("svc.")
        || table == names::HOST_ROUTES
        || table == names::SPM
        || table == VERDICT_TABLE
        || table == names::DESIRED
}

/// Which services a set of directory changes can change the feed of: a service's own
/// table, its SPM record and its water-mark verdicts name it; a host route (shared by
/// every service with a backend on that host) or the cluster's desired services
/// concern all of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    pub all: bool,
    pub services: std::collections::BTreeSet<ServiceKey>,
}

impl Scope {
    /// Adds what a change of row `key` in `table` concerns (nothing if it does not
    /// shape the data plane).
    pub fn add(&mut self, table: &str, key: &str) {
        if !shapes_dataplane(table) {
            return;
        }
        let named = if let Some(s) = table.strip_prefix("svc.") {
            s.parse::<ServiceKey>().ok()
        } else if table == names::SPM || table == VERDICT_TABLE {
            key.parse::<ServiceKey>().ok()
        } else {
            None
        };
        match named {
            Some(k) => {
                self.services.insert(k);
            }
            None => self.all = true,
        }
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.services.is_empty()
    }
}

/// The cluster's desired services, if an operator has set them through the API of
/// any node (until then each node runs its own configuration). `Err`: the row does
/// not parse (written by a newer lbd?); the node keeps what it has.
pub fn desired(tables: &Tables) -> Option<Result<crate::desired::Desired, String>> {
    let row = tables.get(names::DESIRED, names::DESIRED_KEY)?;
    Some(serde_json::from_str(&row.value).map_err(|e| e.to_string()))
}

pub fn feed(tables: &Tables, services: &[ServiceKey]) -> Feed {
    let epochs = services
        .iter()
        .filter_map(|k| {
            let e = tables.get(names::SPM, &k.to_string())?;
            let r: EpochRecord = serde_json::from_str(&e.value).ok()?;
            Some((*k, r.epoch))
        })
        .collect();
    let verdicts = services
        .iter()
        .filter_map(|k| {
            let e = tables.get(VERDICT_TABLE, &k.to_string())?;
            Some((*k, serde_json::from_str(&e.value).ok()?))
        })
        .collect();
    Feed {
        backends: backends_by_service(tables, services),
        epochs,
        verdicts,
    }
}

/// The backends the directory holds for each service: the data plane's input. A
/// backend's identity is its host's first route (route 0, valid or not) or the address
/// it was registered with, so that a route change moves its frames (`via`) without
/// moving its flows. An invalid entry (lease expired, health failing) keeps weight 0:
/// no new flow, and its flows continue, as with a drain; only a deleted entry leaves.
pub fn backends_by_service(
    tables: &Tables,
    services: &[ServiceKey],
) -> BTreeMap<ServiceKey, BTreeMap<IpAddr, DirBackend>> {
    let mut out = BTreeMap::new();
    for key in services {
        let mut backends: BTreeMap<IpAddr, DirBackend> = BTreeMap::new();
        for e in tables.search(&names::service(&key.to_string()), "") {
            let Some(server) = ServerRoute::parse(&e.value) else {
                continue;
            };
            let Some((via, _)) = tables.host_route(&server.host) else {
                continue;
            };
            let identity = server.host.parse::<IpAddr>().ok().or_else(|| {
                tables
                    .search(names::HOST_ROUTES, &format!("{}#", server.host))
                    .into_iter()
                    .filter_map(|r| {
                        Some((
                            r.key.rsplit_once('#')?.1.parse::<u32>().ok()?,
                            r.value.parse::<IpAddr>().ok()?,
                        ))
                    })
                    .min_by_key(|(order, _)| *order)
                    .map(|(_, a)| a)
            });
            let Some(identity) = identity else { continue };
            // The same rules as for a configured backend: a registration cannot make
            // the data plane send a service's packets to a group, to loopback or to
            // the VIP itself.
            // Judged as L2: a registered host's next hop is a neighbour of its family.
            if crate::validate::backend_refusal(key, identity, Forward::L2).is_some()
                || crate::validate::backend_refusal(key, via, Forward::L2).is_some()
            {
                continue;
            }
            let weight = if e.valid { server.weight() } else { 0 };
            let b = backends.entry(identity).or_insert(DirBackend {
                weight: 0,
                via,
                sphere: None,
            });
            b.weight = b.weight.max(weight);
            if let Some(s) = server.attributes.get("sphere") {
                b.sphere = Some(s.clone());
            }
        }
        if !backends.is_empty() {
            out.insert(*key, backends);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_change_concerns_the_service_it_names_and_a_host_route_all() {
        let key: ServiceKey = "tcp/198.18.0.100:8080".parse().unwrap();
        let mut s = Scope::default();
        s.add(&names::service(&key.to_string()), "a");
        s.add(names::SPM, &key.to_string());
        s.add(VERDICT_TABLE, &key.to_string());
        s.add(names::AGENTS, "lb1");
        assert_eq!(
            s,
            Scope {
                all: false,
                services: [key].into()
            }
        );
        s.add(names::HOST_ROUTES, "host2/0");
        assert!(s.all);
        let mut s = Scope::default();
        s.add(names::DESIRED, names::DESIRED_KEY);
        assert!(s.all);
        let mut s = Scope::default();
        s.add(names::SPM, "not a service");
        assert!(s.all, "what cannot be read concerns everything");
    }

    #[test]
    fn the_data_plane_sees_valid_entries_weighted_and_invalid_ones_drained() {
        let key: ServiceKey = "tcp/198.18.0.100:8080".parse().unwrap();
        let other: ServiceKey = "tcp/198.18.0.101:8080".parse().unwrap();
        let table = names::service(&key.to_string());
        let mut t = Tables::default();
        t.add(&table, "a", "198.18.0.11:8080;weight=3", true);
        t.add(&table, "b", "host2:8080", false);
        t.add(&table, "c", "hostless:8080", true);
        t.add(&table, "d", "[2001:db8::1]:8080", true);
        t.add(&table, "e", "127.0.0.1:8080", true);
        t.add(&table, "f", "198.18.0.100:8080", true);
        t.add(
            names::HOST_ROUTES,
            &crate::directory::tables::host_route_key("host2", 0),
            "198.18.0.12",
            true,
        );
        let b = backends_by_service(&t, &[key, other]);
        assert_eq!(b.len(), 1, "no entries for the other service");
        let got: Vec<(String, u32)> = b[&key]
            .iter()
            .map(|(a, d)| (a.to_string(), d.weight))
            .collect();
        assert_eq!(
            got,
            [
                ("198.18.0.11".to_string(), 3),
                ("198.18.0.12".to_string(), 0)
            ],
            "c has no route, d is of the other family, e is loopback, f the VIP itself"
        );
    }

    #[test]
    fn a_failed_route_moves_frames_to_the_next_route_but_keeps_the_identity() {
        use crate::directory::tables::host_route_key;
        let key: ServiceKey = "tcp/198.18.0.100:8080".parse().unwrap();
        let table = names::service(&key.to_string());
        let mut t = Tables::default();
        t.add(&table, "b3", "b3host:8080", true);
        t.add(
            names::HOST_ROUTES,
            &host_route_key("b3host", 0),
            "198.18.0.13",
            true,
        );
        t.add(
            names::HOST_ROUTES,
            &host_route_key("b3host", 1),
            "198.18.0.23",
            true,
        );
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let first = backends_by_service(&t, &[key]);
        assert_eq!(
            first[&key][&ip("198.18.0.13")],
            DirBackend {
                weight: 1,
                via: ip("198.18.0.13"),
                sphere: None,
            }
        );
        t.set_valid(names::HOST_ROUTES, &host_route_key("b3host", 0), false);
        let moved = backends_by_service(&t, &[key]);
        assert_eq!(moved[&key].len(), 1);
        assert_eq!(
            moved[&key][&ip("198.18.0.13")],
            DirBackend {
                weight: 1,
                via: ip("198.18.0.23"),
                sphere: None,
            }
        );
        t.set_valid(names::HOST_ROUTES, &host_route_key("b3host", 1), false);
        assert!(
            backends_by_service(&t, &[key]).is_empty(),
            "no valid route: unreachable"
        );
    }
}
