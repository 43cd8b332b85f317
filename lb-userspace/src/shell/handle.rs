//! How the other shells reach the daemon: the daemon runs on a thread of its own and
//! is the only owner of the reconciler. Changes and reads that need the maps are
//! jobs sent to it ([`DaemonHandle::call`]); everything else is read from a snapshot
//! it publishes after every change, before the change is answered
//! ([`DaemonHandle::now`], a `watch`), so a reader never waits behind a change, a
//! client reads back its own, and state flows one way.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::PathBuf,
    sync::Arc,
    time::Duration,
};

use anyhow::Result;
use tokio::sync::{mpsc, oneshot, watch};

use crate::{
    api, availability,
    dataplane::Dataplane,
    desired::{Change, Desired},
    directory::feed::Feed,
    model::{Neighbor, ServiceKey},
    shell::daemon::Daemon,
};

/// What readers see without asking the daemon: republished after every job that
/// may change it, and every second.
#[derive(Clone, Debug)]
pub struct Published {
    pub node: String,
    pub state_dir: PathBuf,
    pub status: api::Status,
    /// Shares every unchanged service with the reconciler's (a persistent map).
    pub desired: Arc<Desired>,
    /// Every service with a health check, and the backends to check.
    pub checks: Vec<crate::model::ServiceChecks>,
    /// Next hops whose MAC comes from the neighbour table.
    pub resolvable: Vec<IpAddr>,
    /// Those of them that may be behind a gateway (encapsulated backends).
    pub routed: Vec<IpAddr>,
    /// Next hops whose MAC is known.
    pub known_neighbors: BTreeSet<IpAddr>,
    pub service_addresses: Vec<IpAddr>,
    /// Cluster mode: VIPs found on the interface at start.
    pub adopted: BTreeSet<IpAddr>,
    /// Each VIP's table digest, as written (compared across the cluster).
    pub digests: BTreeMap<IpAddr, u64>,
    /// VIPs with a service this node cannot send new flows for.
    pub unable: BTreeSet<IpAddr>,
    /// The reconciler's generation (`Reconciler::generation`).
    pub generation: u64,
}

/// The daemon as the jobs see it: object-safe, so that the handle does not depend
/// on which data plane the daemon drives.
pub trait Core: Send {
    fn desired(&self) -> &Desired;
    fn apply(&mut self, new: Desired, dry_run: bool) -> Result<Vec<Change>>;
    /// As `apply`, for an edit of the one service `key` (nothing else differs).
    fn apply_edit(&mut self, new: Desired, key: ServiceKey) -> Result<Vec<Change>>;
    /// An apply whose maps are then written a batch at a time (`write_some`).
    fn begin_apply(&mut self, new: Desired) -> Result<Vec<Change>>;
    fn begin_apply_edit(&mut self, new: Desired, key: ServiceKey) -> Result<Vec<Change>>;
    fn writing(&self) -> bool;
    /// See `Reconciler::set_deferred`.
    fn defer_writes(&mut self, on: bool);
    fn write_some(&mut self, budget: Duration) -> Option<Result<()>>;
    /// Whether the write waits for a table laid out on a thread of its own.
    fn laying(&self) -> bool;
    /// A re-read config file: what changed, and the sections that wait for a restart.
    /// A reload whose maps are then written a batch at a time (`write_some`).
    fn begin_reload(
        &mut self,
        new: crate::config::Config,
        services_too: bool,
    ) -> Result<(Vec<Change>, Vec<&'static str>)>;
    fn set_feed(
        &mut self,
        feed: Feed,
        neighbors: BTreeMap<IpAddr, Neighbor>,
    ) -> Result<Vec<ServiceKey>>;
    /// As `set_feed`, for `keys` only (`feed` holds those services, and no other).
    fn set_feed_of(
        &mut self,
        keys: &std::collections::BTreeSet<ServiceKey>,
        feed: Feed,
        neighbors: BTreeMap<IpAddr, Neighbor>,
    ) -> Result<Vec<ServiceKey>>;
    fn set_availability(&mut self, set: availability::Set) -> Result<()>;
    fn set_health(&mut self, key: ServiceKey, addr: IpAddr, healthy: bool) -> Result<()>;
    fn update_neighbors(&mut self, fresh: BTreeMap<IpAddr, Neighbor>) -> Result<Vec<IpAddr>>;
    fn set_owned(&mut self, vip: IpAddr, owned: bool) -> Result<()>;
    /// Which of `addrs` the data plane forwards now (read from the maps).
    fn served_of(&self, addrs: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr>;
    /// The services with their counters (reads the maps).
    fn services(&self) -> Result<Vec<api::ServiceView>>;
    /// The views (without the maps' counters) of the services changed after
    /// generation `since` (`None`: all), and the generation they are of.
    fn planned_services(&self, since: Option<u64>) -> (u64, Vec<api::ServiceView>);
    fn stats(&self) -> Result<api::Stats>;
    fn flush_logs(&mut self);
    fn count_connections(&mut self);
    fn detach_everything(&mut self) -> Result<()>;
    fn published(&self) -> Published;
}

impl<D: Dataplane + Send> Core for Daemon<D> {
    fn desired(&self) -> &Desired {
        Daemon::desired(self)
    }
    fn apply(&mut self, new: Desired, dry_run: bool) -> Result<Vec<Change>> {
        Daemon::apply(self, new, dry_run)
    }
    fn apply_edit(&mut self, new: Desired, key: ServiceKey) -> Result<Vec<Change>> {
        Daemon::apply_edit(self, new, key)
    }
    fn begin_apply(&mut self, new: Desired) -> Result<Vec<Change>> {
        Daemon::begin_apply(self, new)
    }
    fn begin_apply_edit(&mut self, new: Desired, key: ServiceKey) -> Result<Vec<Change>> {
        Daemon::begin_apply_edit(self, new, key)
    }
    fn writing(&self) -> bool {
        Daemon::writing(self)
    }
    fn defer_writes(&mut self, on: bool) {
        Daemon::defer_writes(self, on)
    }
    fn write_some(&mut self, budget: Duration) -> Option<Result<()>> {
        Daemon::write_some(self, budget)
    }
    fn laying(&self) -> bool {
        Daemon::laying(self)
    }
    fn begin_reload(
        &mut self,
        new: crate::config::Config,
        services_too: bool,
    ) -> Result<(Vec<Change>, Vec<&'static str>)> {
        Daemon::begin_reload(self, new, services_too)
    }
    fn set_feed(
        &mut self,
        feed: Feed,
        neighbors: BTreeMap<IpAddr, Neighbor>,
    ) -> Result<Vec<ServiceKey>> {
        Daemon::set_feed(self, feed, neighbors)
    }
    fn set_feed_of(
        &mut self,
        keys: &std::collections::BTreeSet<ServiceKey>,
        feed: Feed,
        neighbors: BTreeMap<IpAddr, Neighbor>,
    ) -> Result<Vec<ServiceKey>> {
        Daemon::set_feed_of(self, keys, feed, neighbors)
    }
    fn set_availability(&mut self, set: availability::Set) -> Result<()> {
        Daemon::set_availability(self, set)
    }
    fn set_health(&mut self, key: ServiceKey, addr: IpAddr, healthy: bool) -> Result<()> {
        Daemon::set_health(self, key, addr, healthy)
    }
    fn update_neighbors(&mut self, fresh: BTreeMap<IpAddr, Neighbor>) -> Result<Vec<IpAddr>> {
        Daemon::update_neighbors(self, fresh)
    }
    fn set_owned(&mut self, vip: IpAddr, owned: bool) -> Result<()> {
        Daemon::set_owned(self, vip, owned)
    }
    fn served_of(&self, addrs: &BTreeSet<IpAddr>) -> BTreeSet<IpAddr> {
        addrs.iter().copied().filter(|a| self.serves(*a)).collect()
    }
    fn planned_services(&self, since: Option<u64>) -> (u64, Vec<api::ServiceView>) {
        Daemon::planned_services(self, since)
    }
    fn services(&self) -> Result<Vec<api::ServiceView>> {
        Daemon::services(self)
    }
    fn stats(&self) -> Result<api::Stats> {
        Daemon::stats(self)
    }
    fn flush_logs(&mut self) {
        Daemon::flush_logs(self)
    }
    fn count_connections(&mut self) {
        Daemon::count_connections(self)
    }
    fn detach_everything(&mut self) -> Result<()> {
        Daemon::detach_everything(self)
    }
    fn published(&self) -> Published {
        Published {
            node: self.config.node.name.clone(),
            state_dir: self.state_dir(),
            status: self.status(),
            desired: self.shared_desired(),
            checks: self.checks(),
            resolvable: self.resolvable(),
            routed: self.routed(),
            known_neighbors: self.known_neighbors(),
            service_addresses: self.service_addresses(),
            adopted: self.adopted().clone(),
            digests: self.vip_digests(),
            unable: self.unable(),
            generation: self.generation(),
        }
    }
}

/// A job (given the daemon and the way to republish: a change is answered only once
/// the snapshot that holds it is published, so its client reads it back), whether
/// it may change what is published (reads do not republish: the snapshot costs in
/// proportion to the node, and reads come often), and who sent it (named in the
/// log when it holds the daemon long). A job that begins an apply whose maps are
/// written in batches returns what ends it.
type Job = (
    Box<dyn FnOnce(&mut dyn Core, &dyn Fn(&dyn Core)) -> Option<Finish> + Send>,
    bool,
    &'static str,
);

/// Run with an apply's outcome once its last batch is written: republishes, then
/// answers its client.
type Finish = Box<dyn FnOnce(&mut dyn Core, Result<()>, &dyn Fn(&dyn Core)) + Send>;

/// How long one batch of an apply's map writes holds the daemon before the reads
/// that came meanwhile are answered (10,000 services take most of a second).
pub const WRITE_BATCH: Duration = Duration::from_millis(20);

/// A job that holds the daemon longer than this is logged at debug (any job at
/// trace), with the snapshot it republishes: what keeps readers waiting on a large
/// node.
const SLOW_JOB: Duration = Duration::from_millis(50);

#[derive(Clone)]
pub struct DaemonHandle {
    jobs: mpsc::Sender<Job>,
    now: watch::Receiver<Arc<Published>>,
    /// The last views and stats read, for readers that must not wait behind a long
    /// job (an apply of 10,000 services is one).
    last: Arc<std::sync::Mutex<LastRead>>,
}

/// Each with the generation published before it was read: it is at least that new,
/// and it is used only while that is still the generation published (so a client
/// never reads back something older than its own change).
#[derive(Default)]
struct LastRead {
    services: Option<(u64, Vec<api::ServiceView>)>,
    stats: Option<(u64, api::Stats)>,
}

/// Which last read a reader that stops waiting may be answered with.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Since {
    /// One read while the generation published now stood (a client reads back its
    /// own change).
    Published,
    /// Any (monitors).
    Any,
}

/// How long a counters reader waits for the daemon before it is answered with the
/// last counters read.
pub const READ_PATIENCE: Duration = Duration::from_millis(100);

impl DaemonHandle {
    /// Starts the daemon's thread. It also counts the connection table and flushes
    /// the program's log every `housekeeping`.
    pub fn spawn(mut core: impl Core + 'static, housekeeping: Duration) -> DaemonHandle {
        let (jobs, mut rx) = mpsc::channel::<Job>(256);
        core.count_connections();
        let (tx, now) = watch::channel(Arc::new(core.published()));
        std::thread::Builder::new()
            .name("lbd-daemon".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_time()
                    .build()
                    .expect("the daemon thread's runtime");
                let mut next = std::time::Instant::now() + housekeeping;
                // The apply being written, if any, and the changes sent meanwhile (run
                // in order once it is written; reads are answered between batches).
                let mut writing: Option<Finish> = None;
                let mut parked: std::collections::VecDeque<Job> = Default::default();
                let publish = |core: &dyn Core| {
                    tx.send_replace(Arc::new(core.published()));
                };
                loop {
                    let started = std::time::Instant::now();
                    if let Some(finish) = writing.take() {
                        match core.write_some(WRITE_BATCH) {
                            Some(r) => {
                                finish(&mut core, r, &publish);
                                slow("a job", "the end of an apply", started);
                            }
                            None => writing = Some(finish),
                        }
                        let mut meanwhile = |job: Job, core: &mut dyn Core| {
                            if job.1 {
                                parked.push_back(job);
                            } else {
                                let started = std::time::Instant::now();
                                let (job, _, from) = job;
                                let _ = job(core, &publish);
                                slow("a read", from, started);
                            }
                        };
                        if writing.is_some() && core.laying() {
                            // Nothing to write until a table is laid out on its own
                            // thread: wait for a read rather than spin.
                            if let Recv::Job(job) =
                                recv_timeout(&rt, &mut rx, Duration::from_millis(2))
                            {
                                meanwhile(job, &mut core);
                            }
                        }
                        while let Ok(job) = rx.try_recv() {
                            meanwhile(job, &mut core);
                        }
                        continue;
                    }
                    if let Some((job, _, from)) = parked.pop_front() {
                        writing = job(&mut core, &publish);
                        slow("a job", from, started);
                        continue;
                    }
                    let wait = next.saturating_duration_since(std::time::Instant::now());
                    let job = match recv_timeout(&rt, &mut rx, wait) {
                        Recv::Job(j) => Some(j),
                        Recv::Timeout => None,
                        Recv::Closed => return,
                    };
                    let started = std::time::Instant::now();
                    match job {
                        Some((job, changes, from)) => {
                            writing = job(&mut core, &publish);
                            slow(if changes { "a job" } else { "a read" }, from, started);
                        }
                        None => {
                            core.count_connections();
                            core.flush_logs();
                            next = std::time::Instant::now() + housekeeping;
                            publish(&core);
                            slow("a job", "housekeeping", started);
                        }
                    }
                }
            })
            .expect("spawning the daemon thread");
        DaemonHandle {
            jobs,
            now,
            last: Default::default(),
        }
    }

    /// Runs `f` on the daemon and returns its result.
    pub async fn call<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Core) -> R + Send + 'static,
    ) -> R {
        let from = std::any::type_name_of_val(&f);
        self.job(f, true, from).await
    }

    /// Runs `f`, which only reads (counters, views), on the daemon; nothing is
    /// republished after it.
    pub async fn read<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Core) -> R + Send + 'static,
    ) -> R {
        let from = std::any::type_name_of_val(&f);
        self.job(move |core: &mut dyn Core| f(core), false, from)
            .await
    }

    async fn job<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Core) -> R + Send + 'static,
        changes: bool,
        from: &'static str,
    ) -> R {
        let (tx, rx) = oneshot::channel();
        let job: Job = (
            Box::new(move |core, publish| {
                if !changes {
                    // A read whose caller gave up (a scrape answered from the last
                    // counters) is not run: queued behind a long job, such reads
                    // would hold the daemon one after another once it ends.
                    if !tx.is_closed() {
                        let _ = tx.send(f(core));
                    }
                    return None;
                }
                let r = f(core);
                publish(core);
                let _ = tx.send(r);
                None
            }),
            changes,
            from,
        );
        self.send(job, rx).await
    }

    /// Makes `new` the desired state, as [`Daemon::apply`]; its maps are written in
    /// batches of about `WRITE_BATCH`, with the reads sent meanwhile answered between
    /// them (changes sent meanwhile wait until it is written). Answered once written
    /// and republished, or refused (changing nothing), or failed and undone.
    pub async fn apply(&self, new: Desired) -> Result<Vec<Change>> {
        self.in_batches(move |core| core.begin_apply(new), "an apply")
            .await
    }

    /// An edit of service `key`: `edit` makes the new desired state from the one now,
    /// in the job that applies it (no other change comes between); written as
    /// `apply` is. `Ok(Err)`: the edit refused itself, and nothing changed.
    pub async fn apply_edit<E: Send + 'static>(
        &self,
        key: ServiceKey,
        edit: impl FnOnce(&mut Desired) -> std::result::Result<(), E> + Send + 'static,
    ) -> Result<std::result::Result<Vec<Change>, E>> {
        self.in_batches(
            move |core| {
                let mut new = core.desired().clone();
                match edit(&mut new) {
                    Err(e) => Ok(Err(e)),
                    Ok(()) => core.begin_apply_edit(new, key).map(Ok),
                }
            },
            "an edit",
        )
        .await
    }

    /// Runs `f`, a change of the daemon's inputs (a health verdict, a directory feed,
    /// availability, neighbours), with the map writes it leads to done as `apply`
    /// does them: in batches, with reads answered between them and a large table laid
    /// out on a thread of its own. Answered once written and published.
    pub async fn change<R: Send + 'static>(
        &self,
        f: impl FnOnce(&mut dyn Core) -> Result<R> + Send + 'static,
    ) -> Result<R> {
        let from = std::any::type_name_of_val(&f);
        self.in_batches(
            move |core| {
                core.defer_writes(true);
                let r = f(core);
                core.defer_writes(false);
                r
            },
            from,
        )
        .await
    }

    /// The config file re-read ([`Daemon::begin_reload`]), written as `apply` is.
    pub async fn reload(
        &self,
        new: crate::config::Config,
        services_too: bool,
    ) -> Result<(Vec<Change>, Vec<&'static str>)> {
        self.in_batches(move |core| core.begin_reload(new, services_too), "a reload")
            .await
    }

    /// Runs `begin` on the daemon, then the write it leaves a batch at a time; answers
    /// with `begin`'s result once that write has ended and been published.
    async fn in_batches<R: Send + 'static>(
        &self,
        begin: impl FnOnce(&mut dyn Core) -> Result<R> + Send + 'static,
        from: &'static str,
    ) -> Result<R> {
        let (tx, rx) = oneshot::channel();
        let job: Job = (
            Box::new(move |core, publish| match begin(core) {
                Ok(v) if core.writing() => Some(Box::new(
                    move |core: &mut dyn Core, r: Result<()>, publish: &dyn Fn(&dyn Core)| {
                        publish(core);
                        let _ = tx.send(r.map(|()| v));
                    },
                )),
                r => {
                    publish(core);
                    let _ = tx.send(r);
                    None
                }
            }),
            true,
            from,
        );
        self.send(job, rx).await
    }

    /// Sends `job` to the daemon and waits for the answer it gives on `rx`.
    async fn send<R>(&self, job: Job, rx: oneshot::Receiver<R>) -> R {
        self.jobs
            .send(job)
            .await
            .expect("the daemon thread outlives every handle");
        rx.await.expect("the daemon answers every job it takes")
    }

    /// The services' views with their counters; if the daemon is busy for longer
    /// than `READ_PATIENCE` (a long apply), the last ones read.
    pub async fn services_view(&self) -> Result<Vec<api::ServiceView>> {
        self.patiently(|d| d.services(), |l| &mut l.services, Since::Published)
            .await
    }

    /// The stats; if the daemon is busy for longer than `READ_PATIENCE`, the last
    /// ones read.
    pub async fn stats_view(&self) -> Result<api::Stats> {
        self.patiently(|d| d.stats(), |l| &mut l.stats, Since::Published)
            .await
    }

    /// The stats for a monitor (`/metrics`, the status page); if the daemon is busy
    /// for longer than `READ_PATIENCE`, the last ones read even if a change was
    /// published since: a scrape made nothing to read back, and must not wait for
    /// the jobs that follow a large apply.
    pub async fn monitored_stats(&self) -> Result<api::Stats> {
        self.patiently(|d| d.stats(), |l| &mut l.stats, Since::Any)
            .await
    }

    /// `read` on the daemon, or the last result kept in `slot` when the daemon
    /// takes longer than `READ_PATIENCE` and `since` allows it.
    async fn patiently<T: Clone + Send + 'static>(
        &self,
        read: fn(&dyn Core) -> Result<T>,
        slot: fn(&mut LastRead) -> &mut Option<(u64, T)>,
        since: Since,
    ) -> Result<T> {
        let generation = self.now().generation;
        let fresh = tokio::time::timeout(READ_PATIENCE, self.read(read)).await;
        let (generation, v) = match fresh {
            Ok(r) => (generation, r?),
            Err(_) => {
                let cached = slot(&mut self.last.lock().expect("not poisoned")).clone();
                match cached {
                    Some((g, v)) if since == Since::Any || g == self.now().generation => {
                        return Ok(v)
                    }
                    _ => (self.now().generation, self.read(read).await?),
                }
            }
        };
        *slot(&mut self.last.lock().expect("not poisoned")) = Some((generation, v.clone()));
        Ok(v)
    }

    /// What the daemon published last.
    pub fn now(&self) -> Arc<Published> {
        self.now.borrow().clone()
    }
}

/// Logs how long a job held the daemon (a change's republish included): at debug
/// beyond `SLOW_JOB`, else at trace.
fn slow(what: &str, from: &str, started: std::time::Instant) {
    let took = started.elapsed();
    let long = took >= SLOW_JOB;
    if !long && !tracing::enabled!(tracing::Level::TRACE) {
        return;
    }
    if long {
        tracing::debug!("{what} from {from} held the daemon {} ms", took.as_millis());
    } else {
        tracing::trace!("{what} from {from} held the daemon {} ms", took.as_millis());
    }
}

enum Recv {
    Job(Job),
    Timeout,
    Closed,
}

/// A receive with a deadline, on the daemon thread's own small runtime.
fn recv_timeout(
    rt: &tokio::runtime::Runtime,
    rx: &mut mpsc::Receiver<Job>,
    wait: Duration,
) -> Recv {
    rt.block_on(async {
        match tokio::time::timeout(wait, rx.recv()).await {
            Ok(Some(j)) => Recv::Job(j),
            Ok(None) => Recv::Closed,
            Err(_) => Recv::Timeout,
        }
    })
}
