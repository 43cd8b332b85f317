//! lbd's state and the operations on it: start (fresh, or resuming pinned maps),
//! apply a desired state, refresh backend MACs, report, shut down. The API server and
//! the binary are thin layers over this.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use lb_common::map_names;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::{
    api,
    config::{Config, XdpModeName},
    desired::{diff, Change, Desired, ServiceSpec},
    loader::{Attached, Dataplane, Program},
    manager::{BackendConfig, MapManager, Snapshot},
    model::{mac_to_string, CheckConfig, DirBackend, Egress, L2Route, ServiceKey},
    neighbor::{LocalInterface, Neighbor, NeighborTable},
};

const DESIRED_FILE: &str = "desired.json";
const SNAPSHOT_FILE: &str = "snapshot.json";

/// What is saved of the operator's intent.
#[derive(Serialize, Deserialize)]
struct SavedDesired {
    /// The config file's services when `desired` was derived from them: if the file
    /// says something else now, it was edited since, and the file wins.
    from_config: Desired,
    desired: Desired,
}

/// Where each backend's frames go: the MAC and interface. A backend without a MAC
/// (unresolved) is left out of the table until it has one.
pub fn plan_backends(
    spec: &ServiceSpec,
    neighbors: &BTreeMap<IpAddr, Neighbor>,
    interfaces: &[LocalInterface],
    via: &BTreeMap<IpAddr, IpAddr>,
) -> Vec<BackendConfig> {
    let Some(first) = interfaces.first() else {
        return Vec::new();
    };
    spec.backends
        .iter()
        .filter_map(|(addr, b)| {
            // A backend reached over another of its host's routes: that route's MAC.
            let hop = via.get(addr).unwrap_or(addr);
            let neighbor = neighbors.get(hop);
            let dst_mac = b.mac.or(neighbor.map(|n| n.mac))?;
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
            Some(BackendConfig {
                addr: *addr,
                weight: b.effective_weight(),
                route: L2Route {
                    dst_mac,
                    src_mac: out.mac,
                    egress,
                },
            })
        })
        .collect()
}

/// Checks what the data plane would refuse, before anything is written.
pub fn validate(desired: &Desired, config: &Config) -> Result<()> {
    if desired.services.len() > config.max_services as usize {
        bail!(
            "{} services, but the data plane holds {} (dataplane.max_services)",
            desired.services.len(),
            config.max_services
        );
    }
    for (key, spec) in &desired.services {
        if spec.config.maglev_size > config.maglev_max_size
            || !crate::maglev::is_prime(spec.config.maglev_size)
        {
            bail!(
                "{key}: maglev_size {} must be a prime no larger than {}",
                spec.config.maglev_size,
                config.maglev_max_size
            );
        }
        for addr in spec.backends.keys() {
            if addr.is_ipv4() != key.addr.is_ipv4() {
                bail!("{key}: backend {addr} is not of the service's address family");
            }
        }
    }
    Ok(())
}

pub struct Daemon {
    pub config: Config,
    dataplane: Dataplane,
    maps: MapManager,
    desired: Desired,
    from_config: Desired,
    neighbors: BTreeMap<IpAddr, Neighbor>,
    interfaces: Vec<(LocalInterface, XdpModeName, Attached)>,
    started: Instant,
    resumed: bool,
    /// Cluster mode: VIPs found on the interface at start, still served.
    adopted: BTreeSet<IpAddr>,
    /// Valid backends the directory holds per service (address → weight), merged with
    /// the configured ones when the maps are written.
    directory: BTreeMap<ServiceKey, BTreeMap<IpAddr, DirBackend>>,
    /// Backends whose health check fails: no new flows (weight 0) until they recover.
    unhealthy: BTreeSet<(ServiceKey, IpAddr)>,
    /// Each service's epoch as the SPM manager records it in the directory; added to
    /// the configured epoch, so that every node's data plane has the same one.
    epochs: BTreeMap<ServiceKey, u64>,
    /// Operators' availability records (seed 003), by service key.
    availability: crate::availability::Set,
    /// The water-mark manager's verdicts per service (from the directory).
    verdicts: BTreeMap<ServiceKey, Vec<crate::watermark::Verdict>>,
    /// The directory has given its backends at least once: before that, a service
    /// without backends may only be waiting for them, not out.
    directory_fed: bool,
}

/// A service's backends as the maps get them: the configured ones, plus those the
/// directory holds (a configured backend wins over a directory entry for its address).
pub fn merged_spec(
    spec: &ServiceSpec,
    directory: Option<&BTreeMap<IpAddr, DirBackend>>,
) -> ServiceSpec {
    let mut merged = spec.clone();
    for (addr, d) in directory.into_iter().flatten() {
        merged
            .backends
            .entry(*addr)
            .or_insert(crate::desired::BackendSpec {
                mac: None,
                weight: d.weight,
                drain: false,
            });
    }
    merged
}

impl Daemon {
    /// Loads the data plane (taking over pinned maps and links if an earlier run left
    /// them), applies the desired state, attaches.
    /// `availability` is the set the last run saved: applied before the first write.
    pub async fn start(
        config: Config,
        neighbors: &NeighborTable,
        availability: crate::availability::Set,
    ) -> Result<Daemon> {
        std::fs::create_dir_all(&config.node.state_dir)
            .with_context(|| format!("creating state_dir {}", config.node.state_dir.display()))?;
        let mut locals = Vec::new();
        for i in &config.interfaces {
            locals.push(neighbors.interface(&i.name).await?);
        }

        let pinned_before = config.node.pin_dir.join(map_names::VIPS).exists();
        let (dataplane, mut maps) = Dataplane::load(&config.load_options())?;
        let snapshot_path = config.node.state_dir.join(SNAPSHOT_FILE);
        let resumed = pinned_before;
        if resumed {
            let snapshot: Snapshot = match std::fs::read(&snapshot_path) {
                Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| {
                    format!(
                        "{} is corrupt; remove it to start over",
                        snapshot_path.display()
                    )
                })?,
                Err(_) => Snapshot::default(),
            };
            maps.restore(&snapshot)?;
            info!(
                services = snapshot.services.len(),
                "resuming the pinned data plane"
            );
        }

        let saved: Option<SavedDesired> = std::fs::read(config.node.state_dir.join(DESIRED_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok());
        let desired = match saved {
            Some(s) if s.from_config == config.desired => s.desired,
            Some(_) => {
                info!("the config file changed since the last run: its services replace runtime changes");
                config.desired.clone()
            }
            None => config.desired.clone(),
        };
        validate(&desired, &config)?;
        // In a cluster this node serves only what the cluster gives it. VIPs still on
        // the interface were its own before a restart: keep serving them meanwhile.
        let mut adopted = BTreeSet::new();
        if let Some(c) = &config.cluster {
            let iface = neighbors.interface(&c.vip_interface).await?;
            let present = neighbors.addresses(iface.ifindex).await?;
            adopted = desired
                .services
                .keys()
                .map(|k| k.addr)
                .chain(c.preferred.iter().copied())
                .filter(|a| present.contains(a))
                .collect();
            maps.own_only(adopted.clone())?;
        }

        let mut daemon = Daemon {
            from_config: config.desired.clone(),
            config,
            dataplane,
            maps,
            desired: Desired::default(),
            neighbors: BTreeMap::new(),
            interfaces: Vec::new(),
            started: Instant::now(),
            resumed,
            adopted,
            directory: BTreeMap::new(),
            unhealthy: BTreeSet::new(),
            epochs: BTreeMap::new(),
            availability,
            directory_fed: false,
            verdicts: BTreeMap::new(),
        };
        daemon.interfaces = locals
            .iter()
            .zip(&daemon.config.interfaces)
            .map(|(l, i)| (l.clone(), i.xdp_mode, Attached::New))
            .collect();
        for addr in daemon.unresolved_in(&desired) {
            if let Some(n) = neighbors.resolve(addr, Duration::from_millis(1500)).await? {
                daemon.neighbors.insert(addr, n);
            } else {
                warn!(%addr, "backend MAC not resolved yet; it gets traffic once it is");
            }
        }
        // Everything the maps hold that is not desired goes; everything desired is written.
        let everything: BTreeSet<ServiceKey> = daemon
            .maps
            .services()
            .copied()
            .chain(desired.services.keys().copied())
            .collect();
        daemon.sync(&desired, &everything)?;
        daemon.desired = desired;
        let collected = daemon.maps.collect_garbage()?;
        if collected > 0 {
            info!(collected, "deactivated backends left by an interrupted run");
        }
        for i in 0..daemon.interfaces.len() {
            let (name, mode) = (daemon.interfaces[i].0.name.clone(), daemon.interfaces[i].1);
            let how = daemon
                .dataplane
                .attach_pinned(Program::Balancer, &name, mode.mode())?;
            info!(interface = %name, ?mode, ?how, "XDP program attached");
            daemon.interfaces[i].2 = how;
        }
        daemon.persist()?;
        Ok(daemon)
    }

    fn unresolved_in(&self, desired: &Desired) -> Vec<IpAddr> {
        let set: BTreeSet<IpAddr> = desired
            .services
            .values()
            .flat_map(|s| s.backends.iter())
            .filter(|(a, b)| b.mac.is_none() && !self.neighbors.contains_key(a))
            .map(|(a, _)| *a)
            .collect();
        set.into_iter().collect()
    }

    pub fn knows_neighbor(&self, addr: IpAddr) -> bool {
        self.neighbors.contains_key(&addr)
    }

    /// Backend addresses whose MAC comes from the neighbour table.
    pub fn resolvable(&self) -> Vec<IpAddr> {
        let set: BTreeSet<IpAddr> = self
            .desired
            .services
            .values()
            .flat_map(|s| s.backends.iter())
            .filter(|(_, b)| b.mac.is_none())
            .map(|(a, _)| *a)
            .chain(
                self.directory
                    .values()
                    .flat_map(|d| d.values().map(|b| b.via)),
            )
            .collect();
        set.into_iter().collect()
    }

    /// Directory backends reached through another address than their own.
    fn via(&self) -> BTreeMap<IpAddr, IpAddr> {
        self.directory
            .values()
            .flat_map(|d| d.iter())
            .filter(|(a, b)| **a != b.via)
            .map(|(a, b)| (*a, b.via))
            .collect()
    }

    /// A service's backends as the maps get them: configured and directory ones, with
    /// failing health checks at weight 0, and the water marks applied: a backend
    /// above them takes no new flows, the others share by headroom.
    fn effective_spec(&self, key: &ServiceKey, spec: &ServiceSpec) -> ServiceSpec {
        let mut spec = merged_spec(spec, self.directory.get(key));
        let verdicts = self.verdicts.get(key);
        for (addr, b) in spec.backends.iter_mut() {
            if self.unhealthy.contains(&(*key, *addr)) {
                b.weight = 0;
            }
            if let Some(v) = verdicts.and_then(|v| v.iter().find(|v| v.backend == *addr)) {
                b.weight = if v.in_table {
                    b.weight.saturating_mul(v.headroom.max(1))
                } else {
                    0
                };
            }
        }
        spec
    }

    /// Takes the water-mark verdicts; rewrites the services whose verdicts changed.
    pub fn set_verdicts(
        &mut self,
        verdicts: BTreeMap<ServiceKey, Vec<crate::watermark::Verdict>>,
    ) -> Result<Vec<ServiceKey>> {
        let touched = self.changed(&self.verdicts, &verdicts);
        self.verdicts = verdicts;
        self.resync(touched)
    }

    /// Why a backend is in or out of the new-flow table by the water marks.
    fn steering_note(&self, key: &ServiceKey, addr: IpAddr) -> Option<String> {
        let marks = self.desired.services.get(key)?.steering?;
        let v = self.verdicts.get(key)?.iter().find(|v| v.backend == addr)?;
        Some(if v.in_table {
            format!(
                "in: utilization {} (high {}, low {}), headroom {}/16",
                v.util, marks.high, marks.low, v.headroom
            )
        } else {
            format!(
                "out: utilization {} weighted {} > high {}; back below low {}",
                v.util, v.weighted, marks.high, marks.low
            )
        })
    }

    /// Every service with a health check, and the backends to check (configured and
    /// from the directory).
    pub fn checks(&self) -> Vec<(ServiceKey, CheckConfig, Vec<IpAddr>)> {
        self.desired
            .services
            .iter()
            .filter_map(|(k, s)| {
                let check = s.check.clone()?;
                let backends = merged_spec(s, self.directory.get(k))
                    .backends
                    .keys()
                    .copied()
                    .collect();
                Some((*k, check, backends))
            })
            .collect()
    }

    /// A health check's verdict changed: rewrite the service.
    pub fn set_health(&mut self, key: ServiceKey, addr: IpAddr, healthy: bool) -> Result<()> {
        let changed = if healthy {
            self.unhealthy.remove(&(key, addr))
        } else {
            self.unhealthy.insert((key, addr))
        };
        if changed {
            info!(service = %key, backend = %addr, healthy, "health check verdict");
            let desired = self.desired.clone();
            self.sync(&desired, &BTreeSet::from([key]))?;
        }
        Ok(())
    }

    pub fn is_healthy(&self, key: ServiceKey, addr: IpAddr) -> bool {
        !self.unhealthy.contains(&(key, addr))
    }

    /// The configured services (keys), for the directory to look up.
    pub fn service_keys(&self) -> Vec<ServiceKey> {
        self.desired.services.keys().copied().collect()
    }

    /// Takes the directory's current backends per service; rewrites the services
    /// whose set changed. Returns those services.
    pub fn set_directory(
        &mut self,
        directory: BTreeMap<ServiceKey, BTreeMap<IpAddr, DirBackend>>,
    ) -> Result<Vec<ServiceKey>> {
        let touched = if self.directory_fed {
            self.changed(&self.directory, &directory)
        } else {
            // The first word from the directory: services may now be judged out.
            self.directory_fed = true;
            self.desired.services.keys().copied().collect()
        };
        self.directory = directory;
        self.resync(touched)
    }

    /// Takes the SPM manager's epochs (from the directory); rewrites the services whose
    /// epoch changed. Returns those services.
    pub fn set_epochs(&mut self, epochs: BTreeMap<ServiceKey, u64>) -> Result<Vec<ServiceKey>> {
        let touched = self.changed(&self.epochs, &epochs);
        self.epochs = epochs;
        self.resync(touched)
    }

    /// The configured services whose entry differs between `old` and `new`.
    fn changed<V: PartialEq>(
        &self,
        old: &BTreeMap<ServiceKey, V>,
        new: &BTreeMap<ServiceKey, V>,
    ) -> BTreeSet<ServiceKey> {
        self.desired
            .services
            .keys()
            .filter(|k| old.get(k) != new.get(k))
            .copied()
            .collect()
    }

    /// Rewrites `touched` from the desired state into the maps and saves; returns them.
    fn resync(&mut self, touched: BTreeSet<ServiceKey>) -> Result<Vec<ServiceKey>> {
        if !touched.is_empty() {
            let desired = self.desired.clone();
            self.sync(&desired, &touched)?;
            self.persist()?;
        }
        Ok(touched.into_iter().collect())
    }

    /// The service's configuration as the data plane gets it.
    fn effective_config(&self, key: &ServiceKey, spec: &ServiceSpec) -> crate::ServiceConfig {
        let mut config = spec.config;
        let recorded = self.epochs.get(key).copied().unwrap_or(0) as u32;
        config.epoch = config.epoch.wrapping_add(recorded);
        config.unavailable = self.availability_of(key, spec).is_some();
        config
    }

    /// Why the service is unavailable, if it is: an operator's record, or no valid
    /// backend at all (an unplanned outage, decided by each node from what it sees).
    pub fn availability_of(
        &self,
        key: &ServiceKey,
        spec: &ServiceSpec,
    ) -> Option<crate::availability::Record> {
        if let Some(r) = self.availability.get(&key.to_string()) {
            if !r.available {
                return Some(r.clone());
            }
        }
        if !self.directory_fed {
            return None;
        }
        // Water marks are not an outage: only what the operator, the directory and the
        // health checks say counts here.
        let merged = merged_spec(spec, self.directory.get(key));
        let valid = merged.backends.iter().any(|(addr, b)| {
            let resolved = b.mac.is_some() || self.neighbors.contains_key(&self.via_of(*addr));
            // A drained backend still serves its connections: the service is not out.
            resolved && self.is_healthy(*key, *addr) && (b.weight > 0 || b.drain)
        });
        (!valid).then(|| crate::availability::Record {
            created_ms: 0,
            service: key.to_string(),
            available: false,
            reason: crate::availability::Reason::Unplanned,
            operator: "automatic: no valid backend".into(),
            expected_down_ms: None,
            expected_up_ms: None,
        })
    }

    fn via_of(&self, addr: IpAddr) -> IpAddr {
        self.via().get(&addr).copied().unwrap_or(addr)
    }

    /// Takes the merged availability records; rewrites the services whose state
    /// changed.
    pub fn set_availability(&mut self, set: crate::availability::Set) -> Result<()> {
        let touched = self
            .desired
            .services
            .keys()
            .filter(|k| {
                let k = k.to_string();
                self.availability.get(&k) != set.get(&k)
            })
            .copied()
            .collect();
        self.availability = set;
        self.resync(touched).map(drop)
    }

    /// The SPM settings with the directory backends' spheres added.
    fn effective_spm(&self, key: &ServiceKey, spec: &ServiceSpec) -> crate::spm::Settings {
        let mut spm = spec.spm.clone();
        for (addr, d) in self.directory.get(key).into_iter().flatten() {
            if let Some(s) = &d.sphere {
                spm.spheres.entry(*addr).or_insert_with(|| s.clone());
            }
        }
        spm
    }

    /// Writes `desired` for the services in `touched` into the maps.
    fn sync(&mut self, desired: &Desired, touched: &BTreeSet<ServiceKey>) -> Result<()> {
        let locals: Vec<LocalInterface> = self.interfaces.iter().map(|i| i.0.clone()).collect();
        for key in touched {
            match desired.services.get(key) {
                None => {
                    if self.maps.services().any(|k| k == key) {
                        self.maps.remove_service(*key)?;
                    }
                }
                Some(spec) => {
                    self.maps
                        .upsert_service(*key, self.effective_config(key, spec))?;
                    let spm = self.effective_spm(key, spec);
                    self.maps.set_steering(
                        *key,
                        crate::model::Steering {
                            source_partition: spm.rule == crate::spm::RuleName::Source,
                            topology: if spm.rule == crate::spm::RuleName::Topology {
                                spm.topology.clone()
                            } else {
                                Vec::new()
                            },
                            spheres: spm.spheres,
                        },
                    )?;
                    let spec = self.effective_spec(key, spec);
                    let mut backends = plan_backends(&spec, &self.neighbors, &locals, &self.via());
                    // A backend whose new next hop is not resolved yet keeps its current
                    // route meanwhile: its packets may be lost for a moment (TCP resends
                    // them), but its flows are not re-steered and broken.
                    let current = self.maps.current_backends(*key);
                    for (addr, b) in &spec.backends {
                        if backends.iter().any(|p| p.addr == *addr) {
                            continue;
                        }
                        if let Some((_, route)) = current.get(addr) {
                            backends.push(BackendConfig {
                                addr: *addr,
                                weight: b.effective_weight(),
                                route: *route,
                            });
                        }
                    }
                    self.maps.set_backends(*key, &backends)?;
                }
            }
        }
        Ok(())
    }

    fn persist(&self) -> Result<()> {
        let dir = &self.config.node.state_dir;
        let saved = SavedDesired {
            from_config: self.from_config.clone(),
            desired: self.desired.clone(),
        };
        crate::state_file::write_atomic(&dir.join(DESIRED_FILE), &serde_json::to_vec_pretty(&saved)?)?;
        crate::state_file::write_atomic(
            &dir.join(SNAPSHOT_FILE),
            &serde_json::to_vec(&self.maps.snapshot())?,
        )
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    /// Makes `new` the desired state; returns what changed.
    pub fn apply(&mut self, new: Desired, dry_run: bool) -> Result<Vec<Change>> {
        validate(&new, &self.config)?;
        let changes = diff(&self.desired, &new);
        if dry_run || changes.is_empty() {
            return Ok(changes);
        }
        let touched: BTreeSet<ServiceKey> = changes.iter().map(change_service).collect();
        for c in &changes {
            info!(change = %c, "applying");
        }
        self.sync(&new, &touched)?;
        crate::fault::point("apply.maps-written");
        self.desired = new;
        self.persist()?;
        Ok(changes)
    }

    /// Takes freshly read neighbour entries; rewrites the services whose backends'
    /// MACs changed. Returns the addresses that changed.
    pub fn update_neighbors(&mut self, fresh: BTreeMap<IpAddr, Neighbor>) -> Result<Vec<IpAddr>> {
        let changed: Vec<IpAddr> = fresh
            .iter()
            .filter(|(a, n)| self.neighbors.get(a) != Some(n))
            .map(|(a, _)| *a)
            .collect();
        if changed.is_empty() {
            return Ok(changed);
        }
        for (a, n) in &fresh {
            if self.neighbors.get(a) != Some(n) {
                info!(backend = %a, mac = %mac_to_string(&n.mac), "backend MAC learned");
            }
        }
        self.neighbors.extend(fresh);
        let touched: BTreeSet<ServiceKey> =
            self.desired
                .services
                .iter()
                .filter(|(k, s)| {
                    changed.iter().any(|a| {
                        s.backends.get(a).is_some_and(|b| b.mac.is_none())
                            || self.directory.get(*k).is_some_and(|d| {
                                d.contains_key(a) || d.values().any(|b| b.via == *a)
                            })
                    })
                })
                .map(|(k, _)| *k)
                .collect();
        let desired = self.desired.clone();
        self.sync(&desired, &touched)?;
        self.persist()?;
        Ok(changed)
    }

    /// Addresses of the configured services.
    pub fn service_addresses(&self) -> Vec<IpAddr> {
        let mut a: Vec<IpAddr> = self.desired.services.keys().map(|k| k.addr).collect();
        a.dedup();
        a
    }

    pub fn adopted(&self) -> &BTreeSet<IpAddr> {
        &self.adopted
    }

    /// Cluster mode: serve only `owned` from now on.
    pub fn own_only(&mut self, owned: BTreeSet<IpAddr>) -> Result<()> {
        self.maps.own_only(owned)?;
        Ok(())
    }

    pub fn set_owned(&mut self, vip: IpAddr, owned: bool) -> Result<()> {
        self.maps.set_owned(vip, owned)?;
        Ok(())
    }

    pub fn flush_logs(&mut self) {
        self.dataplane.flush_logs();
    }

    pub fn status(&self) -> api::Status {
        let backends: usize = self
            .desired
            .services
            .values()
            .map(|s| s.backends.len())
            .sum();
        let unresolved = self
            .desired
            .services
            .values()
            .flat_map(|s| s.backends.iter())
            .filter(|(a, b)| b.mac.is_none() && !self.neighbors.contains_key(a))
            .count();
        api::Status {
            node: self.config.node.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            api: api::VERSION.to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            interfaces: self
                .interfaces
                .iter()
                .map(|(l, mode, how)| api::InterfaceStatus {
                    name: l.name.clone(),
                    xdp_mode: format!("{mode:?}").to_lowercase(),
                    attach: format!("{how:?}").to_lowercase(),
                })
                .collect(),
            services: self.desired.services.len(),
            backends,
            unresolved_backends: unresolved,
            conn_table_entries: self.maps.conn_count(),
            resumed: self.resumed,
            metrics: format!("http://{}/metrics", self.config.node.metrics_listen),
        }
    }

    pub fn services(&self) -> Result<Vec<api::ServiceView>> {
        let mut out = Vec::new();
        for (key, spec) in &self.desired.services {
            let counter = self.maps.service_counter(*key).unwrap_or_default();
            let config = self.effective_config(key, spec);
            let spm = self.effective_spm(key, spec);
            let mut backends = Vec::new();
            // Configured backends and those the directory holds.
            let spec = &merged_spec(spec, self.directory.get(key));
            for (addr, b) in &spec.backends {
                let (mac, source) = match (b.mac, self.neighbors.get(addr)) {
                    (Some(m), _) => (Some(m), "config"),
                    (None, Some(n)) => (Some(n.mac), "neighbour table"),
                    (None, None) => (None, "unresolved"),
                };
                let c = self.maps.backend_counter(*key, *addr).unwrap_or_default();
                backends.push(api::BackendView {
                    address: *addr,
                    weight: b.weight,
                    healthy: self.is_healthy(*key, *addr),
                    drain: b.drain,
                    mac: mac.map(|m| mac_to_string(&m)),
                    mac_source: source.to_string(),
                    packets: c.packets,
                    bytes: c.bytes,
                    sphere: spm.spheres.get(addr).cloned(),
                    steering: self.steering_note(key, *addr),
                });
            }
            out.push(api::ServiceView {
                service: key.to_string(),
                key: *key,
                config,
                packets: counter.packets,
                bytes: counter.bytes,
                backends,
                spm,
                unavailable: self.availability_of(key, &self.desired.services[key]),
            });
        }
        Ok(out)
    }

    pub fn stats(&self) -> Result<api::Stats> {
        let global = self.maps.global_stats()?;
        Ok(api::Stats {
            services: self.services()?,
            global: lb_common::GlobalStats::FIELDS
                .iter()
                .zip(global.values())
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
            conn_table_entries: self.maps.conn_count(),
        })
    }

    /// Detaches the program and removes the pinned maps and the snapshot: the next
    /// start begins from nothing but the saved desired state.
    pub fn detach_everything(&mut self) -> Result<()> {
        for (l, _, _) in self.interfaces.clone() {
            self.dataplane.detach_pinned(Program::Balancer, &l.name)?;
        }
        self.dataplane.unpin_maps()?;
        let _ = std::fs::remove_file(self.config.node.state_dir.join(SNAPSHOT_FILE));
        info!("XDP program detached, pinned maps removed");
        Ok(())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.config.node.state_dir.clone()
    }
}

fn change_service(c: &Change) -> ServiceKey {
    match c {
        Change::AddService { service, .. }
        | Change::RemoveService { service }
        | Change::ChangeService { service, .. }
        | Change::AddBackend { service, .. }
        | Change::RemoveBackend { service, .. }
        | Change::ChangeBackend { service, .. }
        | Change::ChangeSpm { service, .. } => *service,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::BackendSpec;

    fn local(ifindex: u32, last: u8) -> LocalInterface {
        LocalInterface {
            name: format!("eth{ifindex}"),
            ifindex,
            mac: [2, 0, 0, 0, 0, last],
        }
    }

    #[test]
    fn backends_without_a_mac_wait_and_drained_ones_get_no_weight() {
        let mut spec = ServiceSpec::default();
        let a: IpAddr = "198.18.0.11".parse().unwrap();
        let b: IpAddr = "198.18.0.12".parse().unwrap();
        let c: IpAddr = "198.18.0.13".parse().unwrap();
        spec.backends.insert(
            a,
            BackendSpec {
                mac: Some([2, 1, 1, 1, 1, 1]),
                weight: 2,
                drain: false,
            },
        );
        spec.backends.insert(
            b,
            BackendSpec {
                mac: None,
                weight: 1,
                drain: true,
            },
        );
        spec.backends.insert(c, BackendSpec::default());
        let neighbors = BTreeMap::from([(
            b,
            Neighbor {
                ifindex: 7,
                mac: [2, 2, 2, 2, 2, 2],
            },
        )]);
        let planned = plan_backends(&spec, &neighbors, &[local(7, 9)], &BTreeMap::new());
        assert_eq!(planned.len(), 2, "the unresolved backend must wait");
        assert_eq!(planned[0].weight, 2);
        assert_eq!(planned[0].route.src_mac, [2, 0, 0, 0, 0, 9]);
        assert_eq!(planned[0].route.egress, Egress::Ingress);
        assert_eq!(planned[1].weight, 0);
        assert_eq!(planned[1].route.dst_mac, [2, 2, 2, 2, 2, 2]);
    }

    #[test]
    fn with_several_interfaces_frames_leave_by_the_backends_own() {
        let mut spec = ServiceSpec::default();
        let b: IpAddr = "198.18.0.12".parse().unwrap();
        spec.backends.insert(b, BackendSpec::default());
        let neighbors = BTreeMap::from([(
            b,
            Neighbor {
                ifindex: 8,
                mac: [2, 2, 2, 2, 2, 2],
            },
        )]);
        let planned = plan_backends(
            &spec,
            &neighbors,
            &[local(7, 7), local(8, 8)],
            &BTreeMap::new(),
        );
        assert_eq!(planned[0].route.egress, Egress::Interface { ifindex: 8 });
        assert_eq!(planned[0].route.src_mac, [2, 0, 0, 0, 0, 8]);
    }
}
