//! The services an operator asked for, as data: what the config file and the runtime
//! commands produce, what is saved so a restart keeps it, and what `diff` compares to
//! tell what an `apply` changes. Pure: no maps, no I/O.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::IpAddr,
};

use serde::{Deserialize, Serialize};

use crate::model::{CheckConfig, ServiceConfig, ServiceKey};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BackendSpec {
    /// Fixed MAC; `None` = resolve through the neighbour table.
    pub mac: Option<[u8; 6]>,
    pub weight: u32,
    /// Takes no new flows; established ones stay until they end.
    pub drain: bool,
}

impl Default for BackendSpec {
    fn default() -> Self {
        Self {
            mac: None,
            weight: 1,
            drain: false,
        }
    }
}

impl BackendSpec {
    /// The weight the Maglev table gets: none while draining.
    pub fn effective_weight(&self) -> u32 {
        if self.drain {
            0
        } else {
            self.weight
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub config: ServiceConfig,
    pub backends: BTreeMap<IpAddr, BackendSpec>,
    /// Active health check of the backends, if any.
    #[serde(default)]
    pub check: Option<CheckConfig>,
    /// How the Service Point Map presents the service, and its L4 rules.
    #[serde(default)]
    pub spm: crate::spm::Settings,
    /// Utilization-based steering (water marks), if any.
    #[serde(default)]
    pub steering: Option<crate::watermark::Marks>,
}

/// Every service, keyed by (address, port, protocol).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Desired {
    pub services: Services,
}

/// The services, ordered by key. A persistent map: a copy shares every service with
/// the original and an edit copies only the path to what it changes, so snapshots
/// and edits of a node with 10,000 services cost in proportion to what they change.
pub type Services = imbl::OrdMap<ServiceKey, ServiceSpec>;

/// One difference between two `Desired`s.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    AddService {
        service: ServiceKey,
        config: ServiceConfig,
    },
    RemoveService {
        service: ServiceKey,
    },
    ChangeService {
        service: ServiceKey,
        from: ServiceConfig,
        to: ServiceConfig,
    },
    AddBackend {
        service: ServiceKey,
        backend: IpAddr,
        spec: BackendSpec,
    },
    RemoveBackend {
        service: ServiceKey,
        backend: IpAddr,
    },
    ChangeBackend {
        service: ServiceKey,
        backend: IpAddr,
        from: BackendSpec,
        to: BackendSpec,
    },
    ChangeSpm {
        service: ServiceKey,
        to: crate::spm::Settings,
    },
}

impl Change {
    /// The service a change is about.
    pub fn service(&self) -> ServiceKey {
        match self {
            Change::AddService { service, .. }
            | Change::RemoveService { service }
            | Change::ChangeService { service, .. }
            | Change::AddBackend { service, .. }
            | Change::RemoveBackend { service, .. }
            | Change::ChangeBackend { service, .. }
            | Change::ChangeSpm { service, .. } => *service,
        }
    }
}

fn describe_backend(spec: &BackendSpec) -> String {
    let mut s = format!("weight {}", spec.weight);
    if spec.drain {
        s.push_str(", draining");
    }
    if let Some(mac) = spec.mac {
        s.push_str(&format!(", mac {}", crate::model::mac_to_string(&mac)));
    }
    s
}

fn describe_service(c: &ServiceConfig) -> String {
    let maglev = match c.maglev_size {
        0 => "auto".to_string(),
        n => n.to_string(),
    };
    let mut s = format!("maglev {maglev}, pass_irregular {}", c.pass_irregular);
    if c.epoch != 0 || c.epoch_resteer {
        s.push_str(&format!(
            ", epoch {}{}",
            c.epoch,
            if c.epoch_resteer { " (re-steer)" } else { "" }
        ));
    }
    s
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Change::AddService { service, config } => {
                write!(f, "+ service {service} ({})", describe_service(config))
            }
            Change::RemoveService { service } => write!(f, "- service {service}"),
            Change::ChangeService { service, from, to } => write!(
                f,
                "~ service {service}: {} -> {}",
                describe_service(from),
                describe_service(to)
            ),
            Change::AddBackend {
                service,
                backend,
                spec,
            } => {
                write!(
                    f,
                    "+ backend {backend} of {service} ({})",
                    describe_backend(spec)
                )
            }
            Change::RemoveBackend { service, backend } => {
                write!(f, "- backend {backend} of {service}")
            }
            Change::ChangeBackend {
                service,
                backend,
                from,
                to,
            } => write!(
                f,
                "~ backend {backend} of {service}: {} -> {}",
                describe_backend(from),
                describe_backend(to)
            ),
            Change::ChangeSpm { service, to } => write!(
                f,
                "~ service {service}: spm rule {:?}, epoch policy {:?}, {} subnet rule(s){}",
                to.rule,
                to.epoch_policy,
                to.topology.len(),
                if to.redirect { ", re-director" } else { "" }
            ),
        }
    }
}

/// What turns `old` into `new`, services in key order, each service's own change
/// before its backends'.
pub fn diff(old: &Desired, new: &Desired) -> Vec<Change> {
    let mut changes = Vec::new();
    for key in old.services.keys() {
        if !new.services.contains_key(key) {
            changes.push(Change::RemoveService { service: *key });
        }
    }
    for (key, spec) in &new.services {
        diff_service(*key, old.services.get(key), spec, &mut changes);
    }
    changes
}

/// As [`diff`], given that only the services `keys` may differ: the same changes,
/// in the same order, at the cost of those services.
pub fn diff_of(old: &Desired, new: &Desired, keys: &BTreeSet<ServiceKey>) -> Vec<Change> {
    let mut changes = Vec::new();
    for key in keys {
        if old.services.contains_key(key) && !new.services.contains_key(key) {
            changes.push(Change::RemoveService { service: *key });
        }
    }
    for key in keys {
        if let Some(spec) = new.services.get(key) {
            diff_service(*key, old.services.get(key), spec, &mut changes);
        }
    }
    changes
}

/// The changes that make service `key` go from `before` (absent: a new service) to
/// `spec`.
fn diff_service(
    key: ServiceKey,
    before: Option<&ServiceSpec>,
    spec: &ServiceSpec,
    changes: &mut Vec<Change>,
) {
    let empty = ServiceSpec::default();
    let before = match before {
        None => {
            changes.push(Change::AddService {
                service: key,
                config: spec.config,
            });
            &empty
        }
        Some(before) => {
            if before.config != spec.config {
                changes.push(Change::ChangeService {
                    service: key,
                    from: before.config,
                    to: spec.config,
                });
            }
            if before.spm != spec.spm || before.steering != spec.steering {
                changes.push(Change::ChangeSpm {
                    service: key,
                    to: spec.spm.clone(),
                });
            }
            before
        }
    };
    for addr in before.backends.keys() {
        if !spec.backends.contains_key(addr) {
            changes.push(Change::RemoveBackend {
                service: key,
                backend: *addr,
            });
        }
    }
    for (addr, b) in &spec.backends {
        match before.backends.get(addr) {
            None => changes.push(Change::AddBackend {
                service: key,
                backend: *addr,
                spec: *b,
            }),
            Some(a) if a != b => changes.push(Change::ChangeBackend {
                service: key,
                backend: *addr,
                from: *a,
                to: *b,
            }),
            Some(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Proto;

    fn key(port: u16) -> ServiceKey {
        ServiceKey {
            addr: "198.18.0.100".parse().unwrap(),
            port,
            proto: Proto::Tcp,
        }
    }

    fn desired(services: &[(u16, &[(&str, u32)])]) -> Desired {
        Desired {
            services: services
                .iter()
                .map(|(port, backends)| {
                    (
                        key(*port),
                        ServiceSpec {
                            check: None,
                            spm: Default::default(),
                            steering: None,
                            config: ServiceConfig::default(),
                            backends: backends
                                .iter()
                                .map(|(a, w)| {
                                    (
                                        a.parse().unwrap(),
                                        BackendSpec {
                                            weight: *w,
                                            ..BackendSpec::default()
                                        },
                                    )
                                })
                                .collect(),
                        },
                    )
                })
                .collect(),
        }
    }

    #[test]
    fn no_change_no_diff() {
        let d = desired(&[(80, &[("198.18.0.11", 1)])]);
        assert!(diff(&d, &d).is_empty());
    }

    #[test]
    fn lists_every_kind_of_change() {
        let old = desired(&[(80, &[("198.18.0.11", 1), ("198.18.0.12", 1)]), (443, &[])]);
        let mut new = desired(&[(80, &[("198.18.0.11", 2), ("198.18.0.13", 1)]), (53, &[])]);
        new.services
            .get_mut(&key(53))
            .unwrap()
            .config
            .pass_irregular = true;
        let changes: Vec<String> = diff(&old, &new).iter().map(|c| c.to_string()).collect();
        assert_eq!(
            changes,
            [
                "- service tcp/198.18.0.100:443",
                "+ service tcp/198.18.0.100:53 (maglev auto, pass_irregular true)",
                "- backend 198.18.0.12 of tcp/198.18.0.100:80",
                "~ backend 198.18.0.11 of tcp/198.18.0.100:80: weight 1 -> weight 2",
                "+ backend 198.18.0.13 of tcp/198.18.0.100:80 (weight 1)",
            ]
        );
    }

    #[test]
    fn draining_takes_the_weight_out_of_the_table_only() {
        let b = BackendSpec {
            weight: 5,
            drain: true,
            mac: None,
        };
        assert_eq!(b.effective_weight(), 0);
        assert_eq!(b.weight, 5);
    }

    #[test]
    fn a_diff_of_the_edited_services_is_the_whole_diff() {
        let old = desired(&[
            (80, &[("198.18.0.11", 1)]),
            (81, &[("198.18.0.12", 1)]),
            (82, &[]),
        ]);
        let edits: [(Desired, &[u16]); 4] = [
            (
                desired(&[
                    (80, &[("198.18.0.11", 2), ("198.18.0.13", 1)]),
                    (81, &[("198.18.0.12", 1)]),
                    (82, &[]),
                ]),
                &[80],
            ),
            (desired(&[(80, &[("198.18.0.11", 1)]), (82, &[])]), &[81]),
            (
                desired(&[
                    (80, &[("198.18.0.11", 1)]),
                    (81, &[("198.18.0.12", 1)]),
                    (82, &[]),
                    (83, &[("198.18.0.14", 1)]),
                ]),
                &[83],
            ),
            (desired(&[(81, &[])]), &[80, 81, 82]),
        ];
        for (new, ports) in edits {
            let keys: BTreeSet<ServiceKey> = ports.iter().map(|p| key(*p)).collect();
            assert_eq!(diff_of(&old, &new, &keys), diff(&old, &new), "{ports:?}");
        }
    }
}
