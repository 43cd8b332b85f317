//! lbd's data plane on this node: loading and attaching the program, taking over the
//! maps an earlier run pinned, resolving backend MACs at start, keeping the operator's
//! intent in `state_dir`, and the reconciler ([`crate::reconcile`]) that writes the
//! plan of everything known into the maps. The API server, the directory, the cluster
//! and the health checks hand their inputs to this; it does the I/O around the
//! reconciler's decisions.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use lb_common::map_names;
use tracing::{info, warn};

use crate::{
    api, availability,
    config::{Config, XdpModeName},
    dataplane::{
        loader::{Attached, Program, Programs},
        maps::MapManager,
        Dataplane,
    },
    desired::{Change, Desired},
    model::{DirBackend, LocalInterface, Neighbor, ServiceKey},
    reconcile::{Known, Reconciler},
    shell::{desired_log::DesiredLog, neighbor::NeighborTable},
    watermark::Verdict,
};

/// Written by earlier versions; the maps now say what it said.
const OLD_SNAPSHOT_FILE: &str = "snapshot.json";

pub struct Daemon<D: Dataplane = MapManager> {
    pub config: Config,
    /// The loaded programs; `None` for a daemon over another data plane (tests).
    programs: Option<Programs>,
    core: Reconciler<D>,
    from_config: Desired,
    /// The file's services of a reload being written: `from_config` once it is.
    reloaded: Option<Desired>,
    /// Where the desired state is saved before the maps change.
    log: DesiredLog,
    /// Each interface with the mode asked for, how it was attached and the mode the
    /// kernel reports (read back after attaching).
    interfaces: Vec<(LocalInterface, XdpModeName, Attached, String)>,
    /// Warnings about interfaces, by name (shown in the status).
    interface_warnings: BTreeMap<String, String>,
    started: Instant,
    resumed: bool,
    /// Cluster mode: VIPs found on the interface at start, still served.
    adopted: BTreeSet<IpAddr>,
    /// Cluster mode: the addresses this node serves (`None`: standalone, all).
    owned: Option<BTreeSet<IpAddr>>,
    /// Entries in the connection table, as last counted (counting walks the table).
    conn_entries: crate::dataplane::ConnCounts,
    /// Each interface's dropped XDP transmits as last read from its driver (three
    /// ioctls: read once a second with the count, not on every status).
    xdp_tx_errors: BTreeMap<String, u64>,
}

/// This node's own addresses: those of its data-plane and VIP interfaces that the
/// config does not name as VIPs (a standalone node may carry its VIPs statically).
pub async fn own_addresses(config: &Config, neighbors: &NeighborTable) -> Result<BTreeSet<IpAddr>> {
    let mut names: Vec<&str> = config.interfaces.iter().map(|i| i.name.as_str()).collect();
    if let Some(c) = &config.cluster {
        names.push(&c.vip_interface);
    }
    let vips: BTreeSet<IpAddr> = config
        .desired
        .services
        .keys()
        .map(|k| k.addr)
        .chain(
            config
                .cluster
                .iter()
                .flat_map(|c| c.preferred.iter().copied()),
        )
        .collect();
    let mut own = BTreeSet::new();
    for name in names {
        let i = neighbors.interface(name).await?;
        own.extend(neighbors.addresses(i.ifindex).await?);
    }
    if let Some(c) = &config.cluster {
        own.insert(c.id);
    }
    Ok(own.difference(&vips).copied().collect())
}

/// Attaches the balancer to `name` in the asked mode and reads back the mode the
/// kernel has. A pinned link from the last run is kept (a hitless restart) only if it
/// is in that mode: a restart with another `xdp_mode` re-attaches, which leaves the
/// interface without the program for a moment (the kernel cannot change a link's
/// mode in place).
async fn attach_in_mode(
    programs: &mut Programs,
    neighbors: &NeighborTable,
    name: &str,
    asked: XdpModeName,
) -> Result<(Attached, &'static str)> {
    let how = programs.attach_pinned(Program::Balancer, name, asked.mode())?;
    let actual = neighbors.xdp_attached(name).await?;
    if how == Attached::Replaced && !asked.is(actual) {
        warn!(
            interface = name,
            was = actual,
            asked = ?asked,
            "re-attaching the XDP program in the asked mode: a restart with another \
             xdp_mode cannot replace the program in place"
        );
        programs.detach_pinned(Program::Balancer, name)?;
        // The kernel frees a released link a moment later; until then a new
        // attachment is refused (EEXIST). Bounded: 1 s.
        for _ in 0..50 {
            if neighbors.xdp_attached(name).await? == "none" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let how = programs.attach_pinned(Program::Balancer, name, asked.mode())?;
        return Ok((how, neighbors.xdp_attached(name).await?));
    }
    Ok((how, actual))
}

impl Daemon<MapManager> {
    /// Loads the data plane (taking over pinned maps and links if an earlier run left
    /// them), writes the desired state, attaches. `availability` is the set the last
    /// run saved: applied before the first write. A start that fails after creating
    /// the maps removes them again.
    pub async fn start(
        config: Config,
        neighbors: &NeighborTable,
        availability: availability::Set,
    ) -> Result<Daemon> {
        std::fs::create_dir_all(&config.node.state_dir)
            .with_context(|| format!("creating state_dir {}", config.node.state_dir.display()))?;
        let mut locals = Vec::new();
        for i in &config.interfaces {
            locals.push(neighbors.interface(&i.name).await?);
        }
        let resumed = config.node.pin_dir.join(map_names::VIPS).exists();
        let (programs, maps) = Programs::load(&config.load_options())?;
        match Self::take_over(
            config,
            neighbors,
            availability,
            locals,
            resumed,
            programs,
            maps,
        )
        .await
        {
            Ok(d) => Ok(d),
            Err(mut failed) => {
                // Maps this start created go again; a resumed data plane stays as it was.
                if !resumed {
                    failed.clean();
                }
                Err(failed.error)
            }
        }
    }

    async fn take_over(
        config: Config,
        neighbors: &NeighborTable,
        availability: availability::Set,
        locals: Vec<LocalInterface>,
        resumed: bool,
        mut programs: Programs,
        mut maps: MapManager,
    ) -> Result<Daemon, StartFailed> {
        let fail = |programs: Programs, names: Vec<String>, error: anyhow::Error| StartFailed {
            programs: Some(programs),
            interfaces: names,
            error,
        };
        if resumed {
            let t = Instant::now();
            match maps.restore() {
                Ok(collected) => info!(
                    services = maps.services().len(),
                    collected,
                    took_ms = t.elapsed().as_millis() as u64,
                    "resuming the pinned data plane"
                ),
                Err(e) => return Err(fail(programs, vec![], e.into())),
            }
        }
        let _ = std::fs::remove_file(config.node.state_dir.join(OLD_SNAPSHOT_FILE));
        let mut log = DesiredLog::open(&config.node.state_dir);
        let desired = match log.saved() {
            Some(s) if s.from_config == config.desired => s.desired.clone(),
            Some(_) => {
                info!("the config file changed since the last run: its services replace runtime changes");
                config.desired.clone()
            }
            None => config.desired.clone(),
        };
        let own = match own_addresses(&config, neighbors).await {
            Ok(o) => o,
            Err(e) => return Err(fail(programs, vec![], e)),
        };
        if let Err(e) = crate::reconcile::validate(
            &desired,
            config.sizes.max_services,
            config.sizes.maglev_max_size,
            &own,
            &config.encap,
        ) {
            return Err(fail(programs, vec![], e));
        }
        // In a cluster this node serves only what the cluster gives it. VIPs still on
        // the interface were its own before a restart: keep serving them meanwhile.
        let mut adopted = BTreeSet::new();
        let mut owned = None;
        if let Some(c) = &config.cluster {
            let present = match neighbors.interface(&c.vip_interface).await {
                Ok(iface) => neighbors.addresses(iface.ifindex).await,
                Err(e) => Err(e),
            };
            let present = match present {
                Ok(p) => p,
                Err(e) => return Err(fail(programs, vec![], e)),
            };
            adopted = desired
                .services
                .keys()
                .map(|k| k.addr)
                .chain(c.preferred.iter().copied())
                .filter(|a| present.contains(a))
                .collect();
            owned = Some(adopted.clone());
            if let Err(e) = maps.set_served(owned.clone()) {
                return Err(fail(programs, vec![], e.into()));
            }
        }
        let mut core = Reconciler::new(
            maps,
            Known {
                desired,
                availability,
                interfaces: locals.clone(),
                encap: config.encap,
                own_addresses: own,
                ..Known::default()
            },
        );
        // Backend MACs, all at once and bounded: an unresolved backend keeps its
        // cells (its frames wait), so a start never waits on one dead host.
        // A restart (pinned maps were there) must not wait: the program forwards
        // meanwhile and the neighbour refresh fills in the rest within seconds.
        let wait = if resumed {
            Duration::ZERO
        } else {
            Duration::from_millis(1500)
        };
        let fresh = neighbors
            .resolve_all(&core.unresolved(), &core.routed(), wait)
            .await;
        let written = core
            .update_neighbors(fresh)
            .and_then(|_| core.reconcile_all());
        if let Err(e) = written {
            return Err(fail(programs, vec![], e));
        }
        if !resumed {
            for addr in core.unresolved() {
                warn!(
                    backend = %addr,
                    "no MAC for this backend after {wait:?} (no ARP/ND answer): it gets no \
                     traffic until it answers; check that it is up and on the interface's segment, \
                     or give its mac in the config"
                );
            }
        }
        let mut interfaces: Vec<(LocalInterface, XdpModeName, Attached, String)> = locals
            .iter()
            .zip(&config.interfaces)
            .map(|(l, i)| (l.clone(), i.xdp_mode, Attached::New, String::new()))
            .collect();
        let mut attached = Vec::new();
        let mut interface_warnings = BTreeMap::new();
        for (l, mode, how, kernel_mode) in interfaces.iter_mut() {
            match attach_in_mode(&mut programs, neighbors, &l.name, *mode).await {
                Ok((h, actual)) => {
                    info!(interface = %l.name, mode = actual, how = ?h, "XDP program attached");
                    *how = h;
                    *kernel_mode = actual.to_string();
                    attached.push(l.name.clone());
                    if actual == "driver" && neighbors.is_veth(&l.name).await.unwrap_or(false) {
                        let w = "a veth in driver mode: the frames XDP sends back out are dropped \
                                 (ethtool -S shows xdp_tx_errors) unless the veth's peer has an XDP \
                                 program too; use xdp_mode = \"skb\" or attach one to the peer"
                            .to_string();
                        warn!(interface = %l.name, "{w}");
                        interface_warnings.insert(l.name.clone(), w);
                    }
                }
                Err(e) => return Err(fail(programs, attached, e)),
            }
        }
        // Health probes of encapsulating services leave wrapped like their traffic.
        if config.encap.source_v4.is_some() || config.encap.source_v6.is_some() {
            for l in &locals {
                if let Err(e) = programs.attach_probe_encap(&l.name, &config.encap) {
                    return Err(fail(programs, attached, e.into()));
                }
            }
        }
        let from_config = config.desired.clone();
        if let Err(e) = log.save(&from_config, core.desired(), None) {
            return Err(fail(programs, attached, e));
        }
        Ok(Daemon {
            from_config,
            reloaded: None,
            log,
            config,
            programs: Some(programs),
            core,
            interfaces,
            interface_warnings,
            started: Instant::now(),
            resumed,
            adopted,
            owned,
            conn_entries: Default::default(),
            xdp_tx_errors: BTreeMap::new(),
        })
    }
}

impl<D: Dataplane> Daemon<D> {
    /// A daemon over `dp` with nothing loaded or attached (the API's tests, over the
    /// fake): everything else as `start` leaves it.
    pub fn with_dataplane(config: Config, dp: D, known: Known) -> Result<Daemon<D>> {
        let mut core = Reconciler::new(dp, known);
        core.reconcile_all()?;
        Ok(Daemon {
            from_config: config.desired.clone(),
            reloaded: None,
            log: DesiredLog::open(&config.node.state_dir),
            interfaces: Vec::new(),
            interface_warnings: BTreeMap::new(),
            config,
            programs: None,
            core,
            started: Instant::now(),
            resumed: false,
            adopted: BTreeSet::new(),
            owned: None,
            conn_entries: Default::default(),
            xdp_tx_errors: BTreeMap::new(),
        })
    }

    /// Every address whose MAC this node has learned.
    pub fn known_neighbors(&self) -> BTreeSet<IpAddr> {
        self.core.known().neighbors.keys().copied().collect()
    }

    pub fn knows_neighbor(&self, addr: IpAddr) -> bool {
        self.core.knows_neighbor(addr)
    }

    /// Next hops whose MAC comes from the neighbour table.
    pub fn resolvable(&self) -> Vec<IpAddr> {
        self.core.resolvable()
    }

    /// Those next hops that may be behind a gateway (encapsulated backends).
    pub fn routed(&self) -> Vec<IpAddr> {
        self.core.routed()
    }

    pub fn desired(&self) -> &Desired {
        self.core.desired()
    }

    /// The configured services (keys), for the directory to look up.
    pub fn service_keys(&self) -> Vec<ServiceKey> {
        self.core.desired().services.keys().copied().collect()
    }

    /// A re-read config file (SIGHUP). Its services, if they differ from the file's
    /// last ones, replace the desired state, runtime changes included (as a restart
    /// with a changed file does); a refusal changes nothing. Returns what changes, and
    /// the sections whose changes wait for the next restart. As `begin_apply`, the
    /// save and the maps are left to [`Self::write_some`].
    pub fn begin_reload(
        &mut self,
        new: Config,
        services_too: bool,
    ) -> Result<(Vec<Change>, Vec<&'static str>)> {
        let later = self.config.restart_needed(&new);
        let mut changes = Vec::new();
        if services_too && new.desired != self.from_config {
            changes = self.core.begin_apply_of(new.desired.clone(), None, false)?;
            if self.core.writing() {
                self.reloaded = Some(new.desired);
            } else {
                self.from_config = new.desired;
            }
        }
        Ok((changes, later))
    }

    /// Makes `new` the desired state; returns what changed. Saved before the maps are
    /// written; a refused or failed change leaves both as they were.
    pub fn apply(&mut self, new: Desired, dry_run: bool) -> Result<Vec<Change>> {
        let (log, from) = (&mut self.log, &self.from_config);
        // The config is what it was at the last save: only the touched services differ.
        self.core.apply(new, dry_run, &mut |d, touched| {
            log.save(from, d, Some(touched))
        })
    }

    /// As `apply`, with the save and the maps left to [`Self::write_some`]: what is
    /// refused is refused here.
    pub fn begin_apply(&mut self, new: Desired) -> Result<Vec<Change>> {
        self.core.begin_apply_of(new, None, false)
    }

    /// Whether an apply begun is still being written.
    pub fn writing(&self) -> bool {
        self.core.writing()
    }

    /// See `Reconciler::set_deferred`.
    pub fn defer_writes(&mut self, on: bool) {
        self.core.set_deferred(on);
    }

    /// Whether that write waits for a table laid out apart.
    pub fn laying(&self) -> bool {
        self.core.laying()
    }

    /// As `begin_apply`, for `new` = what is desired with only service `key` edited
    /// (as `apply_edit`).
    pub fn begin_apply_edit(&mut self, new: Desired, key: ServiceKey) -> Result<Vec<Change>> {
        self.core
            .begin_apply_of(new, Some(&BTreeSet::from([key])), false)
    }

    /// Writes the next services of the apply begun for about `budget` (at least one).
    /// `Some`: it ended (see [`Reconciler::write_some`]).
    pub fn write_some(&mut self, budget: Duration) -> Option<Result<()>> {
        // A reload's services come from another file: compared in full.
        let (from, touched_only) = match &self.reloaded {
            Some(file) => (file, false),
            None => (&self.from_config, true),
        };
        let log = &mut self.log;
        let until = Instant::now() + budget;
        let r = self
            .core
            .write_some_in_background(&mut || Instant::now() < until, &mut |d, touched| {
                log.save(from, d, touched_only.then_some(touched))
            });
        if let Some(done) = &r {
            if let Some(file) = self.reloaded.take() {
                if done.is_ok() {
                    self.from_config = file;
                }
            }
        }
        r
    }

    /// As `apply`, for `new` = what is desired with only service `key` edited: only
    /// that service is compared and judged (an API change costs its service).
    pub fn apply_edit(&mut self, new: Desired, key: ServiceKey) -> Result<Vec<Change>> {
        let (log, from) = (&mut self.log, &self.from_config);
        let keys = BTreeSet::from([key]);
        self.core
            .apply_of(new, Some(&keys), false, &mut |d, touched| {
                log.save(from, d, Some(touched))
            })
    }

    pub fn set_directory(
        &mut self,
        directory: BTreeMap<ServiceKey, BTreeMap<IpAddr, DirBackend>>,
    ) -> Result<Vec<ServiceKey>> {
        self.core.set_directory(directory)
    }

    /// What the directory gives the data plane, with new next hops' MACs.
    pub fn set_feed(
        &mut self,
        feed: crate::directory::feed::Feed,
        neighbors: BTreeMap<IpAddr, Neighbor>,
    ) -> Result<Vec<ServiceKey>> {
        self.core.set_feed(feed, neighbors)
    }

    pub fn set_feed_of(
        &mut self,
        keys: &BTreeSet<ServiceKey>,
        feed: crate::directory::feed::Feed,
        neighbors: BTreeMap<IpAddr, Neighbor>,
    ) -> Result<Vec<ServiceKey>> {
        self.core.set_feed_of(keys, feed, neighbors)
    }

    pub fn set_epochs(&mut self, epochs: BTreeMap<ServiceKey, u64>) -> Result<Vec<ServiceKey>> {
        self.core.set_epochs(epochs)
    }

    pub fn set_verdicts(
        &mut self,
        verdicts: BTreeMap<ServiceKey, Vec<Verdict>>,
    ) -> Result<Vec<ServiceKey>> {
        self.core.set_verdicts(verdicts)
    }

    pub fn set_availability(&mut self, set: availability::Set) -> Result<()> {
        self.core.set_availability(set).map(drop)
    }

    pub fn set_health(&mut self, key: ServiceKey, addr: IpAddr, healthy: bool) -> Result<()> {
        self.core.set_health(key, addr, healthy).map(drop)
    }

    pub fn is_healthy(&self, key: ServiceKey, addr: IpAddr) -> bool {
        self.core.is_healthy(key, addr)
    }

    pub fn checks(&self) -> Vec<crate::model::ServiceChecks> {
        self.core.checks()
    }

    /// Freshly read neighbour entries; returns the addresses that changed.
    pub fn update_neighbors(&mut self, fresh: BTreeMap<IpAddr, Neighbor>) -> Result<Vec<IpAddr>> {
        self.core.update_neighbors(fresh)
    }

    /// Addresses of the configured services.
    pub fn service_addresses(&self) -> Vec<IpAddr> {
        let a: BTreeSet<IpAddr> = self
            .core
            .desired()
            .services
            .keys()
            .map(|k| k.addr)
            .collect();
        a.into_iter().collect()
    }

    pub fn adopted(&self) -> &BTreeSet<IpAddr> {
        &self.adopted
    }

    /// Cluster mode: serve only `owned` from now on.
    pub fn own_only(&mut self, owned: BTreeSet<IpAddr>) -> Result<()> {
        self.owned = Some(owned.clone());
        self.core.dp.set_served(Some(owned))?;
        Ok(())
    }

    pub fn set_owned(&mut self, vip: IpAddr, owned: bool) -> Result<()> {
        let mut set = self.owned.clone().unwrap_or_default();
        if owned {
            set.insert(vip);
        } else {
            set.remove(&vip);
        }
        self.own_only(set)
    }

    /// Each VIP's table digest (see `Reconciler::vip_digests`).
    pub fn vip_digests(&self) -> BTreeMap<IpAddr, u64> {
        self.core.vip_digests()
    }

    /// VIPs with a service this node cannot send new flows for.
    pub fn unable(&self) -> BTreeSet<IpAddr> {
        self.core.unable()
    }

    /// Whether this node's data plane balances `addr` now.
    pub fn serves(&self, addr: IpAddr) -> bool {
        self.core.dp.serves(addr)
    }

    pub fn flush_logs(&mut self) {
        if let Some(p) = self.programs.as_mut() {
            p.flush_logs();
        }
    }

    /// Counts the connection table again (it walks the table: not on every read) and
    /// reads the interfaces' driver counters.
    pub fn count_connections(&mut self) {
        self.conn_entries = self.core.dp.conn_counts();
        self.xdp_tx_errors = self
            .interfaces
            .iter()
            .filter_map(|(l, ..)| Some((l.name.clone(), super::ethtool::xdp_tx_errors(&l.name)?)))
            .collect();
    }

    pub fn status(&self) -> api::Status {
        let (backends, unresolved) = self.core.backend_counts();
        api::Status {
            node: self.config.node.name.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            api: api::VERSION.to_string(),
            uptime_seconds: self.started.elapsed().as_secs(),
            interfaces: self
                .interfaces
                .iter()
                .map(|(l, _, how, kernel_mode)| api::InterfaceStatus {
                    name: l.name.clone(),
                    xdp_mode: kernel_mode.clone(),
                    attach: format!("{how:?}").to_lowercase(),
                    warning: self.interface_warnings.get(&l.name).cloned(),
                    xdp_tx_errors: self.xdp_tx_errors.get(&l.name).copied(),
                })
                .collect(),
            services: self.core.desired().services.len(),
            backends,
            unresolved_backends: unresolved,
            conn_table_entries: self.conn_entries.total(),
            conn_table_entries_v6: self.conn_entries.ipv6,
            resumed: self.resumed,
            metrics: format!("http://{}/metrics", self.config.node.metrics_listen),
            rejected: Default::default(),
            ready: true,
            waiting_for: Vec::new(),
        }
    }

    pub fn services(&self) -> Result<Vec<api::ServiceView>> {
        Ok(self.core.views())
    }

    pub fn generation(&self) -> u64 {
        self.core.generation()
    }

    /// The desired state for the published snapshot: a copy of a persistent map,
    /// which shares every service with the reconciler's.
    pub fn shared_desired(&self) -> std::sync::Arc<Desired> {
        std::sync::Arc::new(self.core.desired().clone())
    }

    pub fn planned_services(&self, since: Option<u64>) -> (u64, Vec<api::ServiceView>) {
        let views = match since {
            None => self.core.views_with(false),
            Some(g) => self
                .core
                .views_of(&mut self.core.touched_since(g).into_iter(), false),
        };
        (self.core.generation(), views)
    }

    pub fn stats(&self) -> Result<api::Stats> {
        let global = self.core.dp.global_stats()?;
        Ok(api::Stats {
            services: self.services()?,
            global: lb_common::GlobalStats::FIELDS
                .iter()
                .zip(global.values())
                .map(|(n, v)| (n.to_string(), v))
                .collect(),
            conn_table_entries: self.conn_entries.total(),
            conn_table_entries_v6: self.conn_entries.ipv6,
        })
    }

    /// Detaches the program and removes the pinned maps: the next start begins from
    /// nothing but the saved desired state.
    pub fn detach_everything(&mut self) -> Result<()> {
        let Some(programs) = self.programs.as_mut() else {
            return Ok(());
        };
        for (l, _, _, _) in self.interfaces.clone() {
            programs.detach_pinned(Program::Balancer, &l.name)?;
            programs.detach_probe_encap(&l.name)?;
        }
        programs.unpin_maps()?;
        info!("XDP program detached, pinned maps removed");
        Ok(())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.config.node.state_dir.clone()
    }
}

/// A start that failed after it had created the maps (and maybe attached): carries
/// what is needed to take it all back, so a failed start leaves nothing behind.
struct StartFailed {
    programs: Option<Programs>,
    interfaces: Vec<String>,
    error: anyhow::Error,
}

impl StartFailed {
    fn clean(&mut self) {
        if let Some(mut p) = self.programs.take() {
            for i in &self.interfaces {
                let _ = p.detach_pinned(Program::Balancer, i);
                let _ = p.detach_probe_encap(i);
            }
            if let Err(e) = p.unpin_maps() {
                warn!("removing the maps of a failed start: {e:#}");
            }
        }
    }
}
