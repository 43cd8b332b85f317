//! Service Point Maps (the SPM seed): what clients and the data plane are told about
//! where services are. Pure: the generator takes the services' instances (from the
//! directory) and a client's attributes, applies each service's partitioning rule,
//! and returns entries with ordered backups; `project` gives map types 1–4;
//! `epoch_bump` and `next_record` say when a deployment change must be visible to
//! clients. lbd serves the maps (`/v1/spm`); the rules that apply at L4 (`Source`,
//! `Topology`) are also compiled into the data plane by the map manager, with the
//! same choice of instance.

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// Service spec (the seed's Fig. 2): which service, which version.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceSpec {
    pub service_id: String,
    pub service_version: String,
}

/// Service sphere: who provides it, and the service's epoch there.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Sphere {
    pub provider_id: String,
    pub epoch: u64,
}

/// Service host: where to contact it.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ServiceHost {
    pub inet_address: IpAddr,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_address: Option<String>,
    pub port: u16,
}

/// One SPM entry. In map types 2–4 the fields shared by every entry move to the
/// header and are `None` here.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<ServiceSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sphere: Option<Sphere>,
    pub host: ServiceHost,
    /// Command or data for the client (the seed's command/data item).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// Where to go, in order, when `host` cannot be reached.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub backups: Vec<ServiceHost>,
    /// Validity window, Unix seconds; `None` = open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_from: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub valid_until: Option<u64>,
    /// Present when the service is refused: why, by whom, expected back when.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<crate::availability::Record>,
}

impl Entry {
    pub fn valid_at(&self, now: u64) -> bool {
        self.valid_from.is_none_or(|f| now >= f) && self.valid_until.is_none_or(|u| now < u)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spm {
    /// Changes with every regeneration.
    pub version: u64,
    /// 1: full; 2: one service; 3: one sphere; 4: one service in one sphere.
    pub map_type: u8,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spec: Option<ServiceSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sphere: Option<Sphere>,
    pub entries: Vec<Entry>,
}

/// How the generator chooses what a client is told (per service).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "rule", rename_all = "snake_case")]
pub enum Rule {
    /// Every valid instance.
    Plain,
    /// Only the instance this client should use (a stable hash of its address,
    /// weighted); the others as its backups.
    Preselect,
    /// A key (from the request or the client) modulo the instance count picks it,
    /// instances in address order.
    Data,
    /// As `Data`, with the client's address as the key (its last 32 bits): the rule the
    /// XDP program applies to the VIP, so a client is told the instance its packets reach.
    Source,
    /// The client's subnet selects the sphere; instances of that sphere only.
    Topology { subnets: Vec<(IpAddr, u8, String)> },
}

/// One instance of a service, as the directory knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    pub name: String,
    pub host: ServiceHost,
    pub weight: u32,
    pub valid: bool,
    /// The provider (sphere) this instance belongs to.
    pub provider: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    pub spec: ServiceSpec,
    pub epoch: u64,
    pub rule: Rule,
    pub instances: Vec<Instance>,
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub valid_from: Option<u64>,
    #[serde(default)]
    pub valid_until: Option<u64>,
    /// The re-director case of the seed: the level-1 map shows only this service point
    /// (the VIP), and the service's own instances are in its sub-level map.
    #[serde(default)]
    pub redirector: Option<ServiceHost>,
    #[serde(default)]
    pub unavailable: Option<crate::availability::Record>,
}

/// The number the `Source` rule (and the data plane) partitions on: the address's
/// last 32 bits.
pub fn source_key(a: IpAddr) -> u64 {
    let b = addr_bytes(a);
    u32::from_be_bytes([
        b[b.len() - 4],
        b[b.len() - 3],
        b[b.len() - 2],
        b[b.len() - 1],
    ]) as u64
}

/// What the generator knows of the client asking.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Client {
    pub address: Option<IpAddr>,
    /// Data-dependent routing key (request key or client id).
    pub key: Option<u64>,
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325u64, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100000001b3)
    })
}

fn addr_bytes(a: IpAddr) -> Vec<u8> {
    match a {
        IpAddr::V4(v) => v.octets().to_vec(),
        IpAddr::V6(v) => v.octets().to_vec(),
    }
}

fn in_subnet(addr: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let (a, n) = (addr_bytes(addr), addr_bytes(net));
    if a.len() != n.len() {
        return false;
    }
    let bits = prefix as usize;
    (0..a.len() * 8)
        .take(bits)
        .all(|i| (a[i / 8] >> (7 - i % 8)) & 1 == (n[i / 8] >> (7 - i % 8)) & 1)
}

/// The entries of one service for one client. Backups are the other chosen-eligible
/// instances in failover order: higher weight first, then name.
pub fn entries_for(service: &Service, client: &Client) -> Vec<Entry> {
    let mut valid: Vec<&Instance> = service
        .instances
        .iter()
        .filter(|i| i.valid && i.weight > 0)
        .collect();
    if let Rule::Topology { subnets } = &service.rule {
        let sphere = client
            .address
            .and_then(|a| subnets.iter().find(|(net, p, _)| in_subnet(a, *net, *p)))
            .map(|(_, _, s)| s.clone());
        // A sphere without a valid instance sends its clients to every sphere rather
        // than to none; the data plane does the same.
        if let Some(s) = sphere.filter(|s| valid.iter().any(|i| &i.provider == s)) {
            valid.retain(|i| i.provider == s);
        }
    }
    valid.sort_by(|a, b| b.weight.cmp(&a.weight).then(a.name.cmp(&b.name)));
    if valid.is_empty() {
        return Vec::new();
    }
    let entry = |i: &Instance, backups: Vec<ServiceHost>| Entry {
        spec: Some(service.spec.clone()),
        sphere: Some(Sphere {
            provider_id: i.provider.clone(),
            epoch: service.epoch,
        }),
        host: i.host.clone(),
        command: service.command.clone(),
        backups,
        valid_from: service.valid_from,
        valid_until: service.valid_until,
        unavailable: service.unavailable.clone(),
    };
    let chosen = match (&service.rule, client) {
        (Rule::Plain, _) | (Rule::Topology { .. }, _) => None,
        (
            Rule::Preselect,
            Client {
                address: Some(a), ..
            },
        ) => {
            // Weighted choice by a stable hash of the client: the same client is always
            // sent to the same instance while the set is unchanged.
            let total: u64 = valid.iter().map(|i| i.weight as u64).sum();
            let mut point = fnv(&addr_bytes(*a)) % total;
            valid.iter().position(|i| {
                let w = i.weight as u64;
                if point < w {
                    true
                } else {
                    point -= w;
                    false
                }
            })
        }
        (Rule::Data, Client { key: Some(k), .. }) => Some(by_address(&valid, *k)),
        (
            Rule::Source,
            Client {
                address: Some(a), ..
            },
        ) => Some(by_address(&valid, source_key(*a))),
        _ => None,
    };
    match chosen {
        Some(c) => {
            let backups = valid
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != c)
                .map(|(_, v)| v.host.clone())
                .collect();
            vec![entry(valid[c], backups)]
        }
        None => valid
            .iter()
            .map(|i| {
                let backups = valid
                    .iter()
                    .filter(|o| o.name != i.name)
                    .map(|o| o.host.clone())
                    .collect();
                entry(i, backups)
            })
            .collect(),
    }
}

/// The instance `key` selects: instances in address order (then port), so that every
/// generator and the data plane (which orders backends by address) agree.
fn by_address(valid: &[&Instance], key: u64) -> usize {
    let mut order: Vec<usize> = (0..valid.len()).collect();
    order.sort_by_key(|i| (valid[*i].host.inet_address, valid[*i].host.port));
    order[(key % valid.len() as u64) as usize]
}

/// The level-1 map (type 1) for a client: every service's entries valid at `now`; a
/// service behind a re-director appears as that one service point.
pub fn generate(services: &[Service], client: &Client, now: u64, version: u64) -> Spm {
    Spm {
        version,
        map_type: 1,
        spec: None,
        sphere: None,
        entries: services
            .iter()
            .flat_map(|s| match &s.redirector {
                Some(r) => vec![Entry {
                    spec: Some(s.spec.clone()),
                    sphere: Some(Sphere {
                        provider_id: "redirector".into(),
                        epoch: s.epoch,
                    }),
                    host: r.clone(),
                    command: Some(format!(
                        "sub-level map: GET /v1/spm?service={}&level=2",
                        s.spec.service_id
                    )),
                    backups: Vec::new(),
                    valid_from: s.valid_from,
                    valid_until: s.valid_until,
                    unavailable: s.unavailable.clone(),
                }],
                None => entries_for(s, client),
            })
            .filter(|e| e.valid_at(now))
            .collect(),
    }
}

/// The sub-level map of one service (map type 2): its instances as its rule gives
/// them to `client`, whether or not the level-1 map shows a re-director.
pub fn sub_level(service: &Service, client: &Client, now: u64, version: u64) -> Spm {
    let direct = Service {
        redirector: None,
        ..service.clone()
    };
    let map = generate(&[direct], client, now, version);
    project(&map, 2, Some(&service.spec.service_id), None).expect("type 2 with a service")
}

/// A map of another type from a type-1 map: only the entries of `service` (types 2,
/// 4) and/or of `provider` (types 3, 4), with the shared fields moved to the header.
pub fn project(
    map: &Spm,
    map_type: u8,
    service: Option<&str>,
    provider: Option<&str>,
) -> Result<Spm, String> {
    let by_service = matches!(map_type, 2 | 4);
    let by_sphere = matches!(map_type, 3 | 4);
    if !(1..=4).contains(&map_type) {
        return Err(format!(
            "map type {map_type}: use 1 (full), 2 (service), 3 (sphere) or 4 (service in sphere)"
        ));
    }
    if by_service && service.is_none() {
        return Err(format!("map type {map_type} needs a service"));
    }
    if by_sphere && provider.is_none() {
        return Err(format!("map type {map_type} needs a provider (sphere)"));
    }
    let entries: Vec<&Entry> = map
        .entries
        .iter()
        .filter(|e| {
            !by_service
                || e.spec
                    .as_ref()
                    .is_some_and(|s| Some(s.service_id.as_str()) == service)
        })
        .filter(|e| {
            !by_sphere
                || e.sphere
                    .as_ref()
                    .is_some_and(|s| Some(s.provider_id.as_str()) == provider)
        })
        .collect();
    let spec = if by_service {
        entries.first().and_then(|e| e.spec.clone())
    } else {
        None
    };
    let sphere = if by_sphere {
        entries.first().and_then(|e| e.sphere.clone())
    } else {
        None
    };
    // A field moves to the header only where it equals the header's: an entry whose
    // sphere has another epoch (another service of the provider, in type 3) keeps
    // its own, which overrides the header's, so no client is handed a wrong epoch.
    let entries = entries
        .into_iter()
        .map(|e| Entry {
            spec: if by_service && e.spec == spec {
                None
            } else {
                e.spec.clone()
            },
            sphere: if by_sphere && e.sphere == sphere {
                None
            } else {
                e.sphere.clone()
            },
            ..e.clone()
        })
        .collect();
    Ok(Spm {
        version: map.version,
        map_type,
        spec,
        sphere,
        entries,
    })
}

/// When a deployment change must show as a new epoch (the seed's policy).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EpochPolicy {
    /// Clients keep state: a changed set of instances, or a restart, bumps the epoch.
    Stateful,
    /// No client state: only an operator bump changes the epoch.
    Stateless,
}

/// Whether going from `before` to `after` (instance names and their restart counts)
/// bumps the epoch under `policy`.
pub fn epoch_bump(policy: EpochPolicy, before: &[(String, u64)], after: &[(String, u64)]) -> bool {
    match policy {
        EpochPolicy::Stateless => false,
        EpochPolicy::Stateful => {
            let mut b = before.to_vec();
            let mut a = after.to_vec();
            b.sort();
            a.sort();
            a != b
        }
    }
}

/// The replicated record of one service's epoch (the SPM manager's output): the epoch
/// and the instance set it was computed for, so that the next manager, on any node,
/// continues from it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: u64,
    pub members: Vec<String>,
    /// Operator bumps folded in so far (the `spm_bumps` row's count).
    #[serde(default)]
    pub bumps: u64,
}

/// A service's SPM settings, from its `[service.spm]` section.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// serviceId in the map; default: the service's key (`addr:port/proto`).
    pub id: Option<String>,
    pub version: String,
    pub rule: RuleName,
    pub epoch_policy: EpochPolicy,
    /// For the `topology` rule: client subnets (network, prefix) and their sphere.
    pub topology: Vec<(IpAddr, u8, String)>,
    /// Spheres of configured backends (directory backends carry a `sphere` attribute).
    pub spheres: std::collections::BTreeMap<IpAddr, String>,
    /// Level 1 shows the VIP as the one service point; instances in the sub-level map.
    pub redirect: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            id: None,
            version: "1".into(),
            rule: RuleName::Preselect,
            epoch_policy: EpochPolicy::Stateless,
            topology: Vec::new(),
            spheres: Default::default(),
            redirect: false,
        }
    }
}

/// The rules by name, as the config file spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RuleName {
    Plain,
    Preselect,
    Data,
    Source,
    Topology,
}

impl Settings {
    pub fn rule(&self) -> Rule {
        match self.rule {
            RuleName::Plain => Rule::Plain,
            RuleName::Preselect => Rule::Preselect,
            RuleName::Data => Rule::Data,
            RuleName::Source => Rule::Source,
            RuleName::Topology => Rule::Topology {
                subnets: self.topology.clone(),
            },
        }
    }
}

/// What the SPM manager writes for a service whose valid instances are now `members`
/// and whose operators asked for `bumps` new epochs so far: `None` when the record
/// stands. Each pass bumps at most once, however many causes it sees.
pub fn next_record(
    policy: EpochPolicy,
    record: Option<&EpochRecord>,
    members: &[String],
    bumps: u64,
) -> Option<EpochRecord> {
    let mut members = members.to_vec();
    members.sort();
    members.dedup();
    let Some(old) = record else {
        return Some(EpochRecord {
            epoch: (bumps > 0) as u64,
            members,
            bumps,
        });
    };
    let as_set = |m: &[String]| m.iter().map(|n| (n.clone(), 0)).collect::<Vec<_>>();
    let changed = old.members != members;
    let bump = bumps > old.bumps || epoch_bump(policy, &as_set(&old.members), &as_set(&members));
    (changed || bump).then(|| EpochRecord {
        epoch: old.epoch + bump as u64,
        members,
        bumps: bumps.max(old.bumps),
    })
}

#[cfg(test)]
mod tests;
