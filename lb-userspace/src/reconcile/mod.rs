//! The reconciler: holds what lbd knows (the inputs of [`crate::plan`]), and makes the
//! data plane hold the plan of it. Every change, whoever makes it (an operator, the
//! directory, a health check, the SPM or water-mark manager, availability, the
//! neighbour table), goes the same way: take the new input, plan the services it
//! touches, check that the whole transition fits, write the services that differ from
//! what is written, and if a write fails, write the previous plans back. A refused
//! change leaves the maps and the views exactly as they were.
//!
//! It talks to the maps only through the [`Dataplane`] trait, so its tests run on the
//! in-memory fake; the I/O (neighbour resolution, files, the API) is the daemon's.

use crate::dataplane::ServiceCounters;
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{Context, Result};
use tracing::{info, warn};

use crate::{
    api, availability,
    dataplane::{
        check_fits,
        layout::{self, Laid},
        Dataplane,
    },
    desired::{diff, Change, Desired},
    model::{
        mac_to_string, DirBackend, EncapSettings, LocalInterface, Neighbor, ServiceChecks,
        ServiceKey,
    },
    plan::{self, Inputs, ServicePlan},
    watermark::Verdict,
};

/// Everything the plan is made from.
#[derive(Clone, Debug, Default)]
pub struct Known {
    pub desired: Desired,
    pub directory: BTreeMap<ServiceKey, BTreeMap<IpAddr, DirBackend>>,
    pub directory_fed: bool,
    pub unhealthy: BTreeSet<(ServiceKey, IpAddr)>,
    pub epochs: BTreeMap<ServiceKey, u64>,
    pub verdicts: BTreeMap<ServiceKey, Vec<Verdict>>,
    pub availability: availability::Set,
    pub neighbors: BTreeMap<IpAddr, Neighbor>,
    pub interfaces: Vec<LocalInterface>,
    /// This node's outer sources and GUE port (`[dataplane]`).
    pub encap: EncapSettings,
    /// This node's own addresses (its interfaces' addresses the config does not name
    /// as VIPs): never a VIP.
    pub own_addresses: BTreeSet<IpAddr>,
}

impl Known {
    pub fn inputs(&self) -> Inputs<'_> {
        Inputs {
            desired: &self.desired,
            directory: &self.directory,
            directory_fed: self.directory_fed,
            unhealthy: &self.unhealthy,
            epochs: &self.epochs,
            verdicts: &self.verdicts,
            availability: &self.availability,
            neighbors: &self.neighbors,
            interfaces: &self.interfaces,
            encap: &self.encap,
        }
    }
}

pub struct Reconciler<D: Dataplane> {
    pub dp: D,
    known: Known,
    /// The plan each service was last written with (what the maps hold), and its
    /// table's fingerprint.
    written: Written,
    /// Why the maps do not hold the plan of what is known, when a change from outside
    /// the operator (the directory, say) did not fit; retried with every change.
    behind: Option<String>,
    /// Counts the changes of what is written and desired: what follows from the
    /// plans (the SPM manager's records) need not be computed again while it stands.
    generation: u64,
    /// The generation at which each service last changed.
    touched: BTreeMap<ServiceKey, u64>,
    /// An apply whose intent is saved and whose services are being written, a batch
    /// at a time ([`Self::write_some`]), so that its owner can answer reads between
    /// batches.
    writing: Option<Writing>,
    /// See `LAID_APART`.
    laid_apart: u64,
    /// A change of the inputs (health, directory, availability, neighbours) leaves
    /// its write to `write_some` as an apply does ([`Self::set_deferred`]).
    deferred: bool,
}

/// A move of the maps to new plans, under way: `order[..at]` are written, and `done`
/// holds what each of them held before (for the roll-back).
struct Transition {
    next: BTreeMap<ServiceKey, Option<ServicePlan>>,
    order: Vec<ServiceKey>,
    at: usize,
    done: Vec<(ServiceKey, Option<ServicePlan>)>,
    /// The layout of `order[at]` being made on a thread of its own (a large table,
    /// written in the background: see `LAID_APART`).
    laying: Option<Laying>,
}

type Laying = std::thread::JoinHandle<std::result::Result<Laid, crate::maglev::MaglevError>>;

/// A table slot of at least this many cells is laid out on a thread of its own when
/// an apply is written in the background, so that the daemon answers reads meanwhile
/// (a service of 100,000 backends has a table of 11.9M cells: about a second).
pub const LAID_APART: u64 = 1 << 20;

/// `plan`'s layout from the thread in `laying`, once it is made; `None` until then
/// (the first call starts the thread).
fn lay_apart(
    laying: &mut Option<Laying>,
    plan: &ServicePlan,
    bounds: layout::TableBounds,
) -> Result<Option<std::result::Result<Laid, crate::maglev::MaglevError>>> {
    match laying.take() {
        None => {
            let plan = plan.clone();
            *laying = Some(
                std::thread::Builder::new()
                    .name("lbd-layout".into())
                    .spawn(move || Laid::of(&plan, bounds))
                    .context("starting a thread to lay out a table")?,
            );
            Ok(None)
        }
        Some(h) if !h.is_finished() => {
            *laying = Some(h);
            Ok(None)
        }
        Some(h) => Ok(Some(h.join().expect("laying out a table does not panic"))),
    }
}

/// An apply being written: first its intent is saved and its transition started (one
/// step), then its services are written; and what to go back to if a step fails.
struct Writing {
    step: Step,
    /// What was desired before an apply, put back if its write fails; `None` for a
    /// change of the inputs, which saved nothing (its failure leaves the node
    /// `behind`, as a synchronous one does).
    old: Option<Desired>,
    touched: BTreeSet<ServiceKey>,
    /// The changes named in the log as it starts (the first few), and how many more.
    named: Vec<String>,
    more: usize,
}

enum Step {
    /// The plans to move to, once the intent is saved.
    Save(BTreeMap<ServiceKey, Option<ServicePlan>>),
    Write(Transition),
}

/// Checks what the data plane would refuse, and what must never reach it (see
/// `crate::validate`), before anything is planned.
pub fn validate(
    desired: &Desired,
    max_services: u32,
    max_size: u32,
    own: &BTreeSet<IpAddr>,
    encap: &EncapSettings,
) -> Result<()> {
    validate_services(desired, None, max_services, max_size, own, encap)
}

/// As [`validate`], judging only the services `keys` (all with `None`): the others
/// are known to be as they were, and valid.
fn validate_services(
    desired: &Desired,
    keys: Option<&BTreeSet<ServiceKey>>,
    max_services: u32,
    max_size: u32,
    own: &BTreeSet<IpAddr>,
    encap: &EncapSettings,
) -> Result<()> {
    let judged: Vec<(&ServiceKey, &crate::desired::ServiceSpec)> = match keys {
        None => desired.services.iter().collect(),
        Some(keys) => keys
            .iter()
            .filter_map(|k| desired.services.get_key_value(k))
            .collect(),
    };
    crate::validate::services(judged.iter().copied(), own, encap)
        .map_err(|e| anyhow::anyhow!(e))?;
    if desired.services.len() > max_services as usize {
        anyhow::bail!(
            "{} services, but the data plane holds {max_services} (dataplane.max_services)",
            desired.services.len(),
        );
    }
    for (key, spec) in judged {
        let pinned = spec.config.maglev_size;
        if pinned != 0 && (pinned > max_size || !crate::maglev::is_prime(pinned)) {
            anyhow::bail!(
                "{key}: maglev_size {} must be a prime no larger than {max_size} (or 0: sized by its backends)",
                spec.config.maglev_size,
            );
        }
        // Only an encapsulating service may mix families (its outer header is the
        // backend's family); `validate::desired` above says so with the reason.
        for addr in spec.backends.keys() {
            if addr.is_ipv4() != key.addr.is_ipv4() && !spec.config.forward.encapsulates() {
                anyhow::bail!("{key}: backend {addr} is not of the service's address family");
            }
        }
    }
    Ok(())
}

impl<D: Dataplane> Reconciler<D> {
    /// Starts from what `dp` holds (empty, or restored from pinned maps); nothing is
    /// written until [`Self::reconcile_all`].
    pub fn new(dp: D, known: Known) -> Self {
        Reconciler {
            dp,
            known,
            written: Written::default(),
            behind: None,
            generation: 0,
            touched: BTreeMap::new(),
            writing: None,
            laid_apart: LAID_APART,
            deferred: false,
        }
    }

    pub fn known(&self) -> &Known {
        &self.known
    }

    pub fn desired(&self) -> &Desired {
        &self.known.desired
    }

    /// The plan the maps hold for a service.
    pub fn written(&self, key: &ServiceKey) -> Option<&ServicePlan> {
        self.written.get(key)
    }

    /// Each VIP address's digest: its services' table fingerprints, combined in
    /// key order. Equal on two nodes exactly when they steer that VIP's new flows alike.
    pub fn vip_digests(&self) -> BTreeMap<IpAddr, u64> {
        self.written.vip_digests().clone()
    }

    /// VIP addresses with a service this node cannot steer as its table says: a
    /// backend with cells but no route yet (its new flows would be dropped here while
    /// a node that resolved it forwards them), or backends but none with a weight.
    /// Such a node should not take the VIP while another can.
    pub fn unable(&self) -> BTreeSet<IpAddr> {
        self.written.unable()
    }

    /// See the field: changes whenever a plan is written or the desired state changes.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn behind(&self) -> Option<&str> {
        self.behind.as_deref()
    }

    /// The plan of `keys` from what is known now (`None`: the service goes).
    fn plans(&self, keys: &BTreeSet<ServiceKey>) -> BTreeMap<ServiceKey, Option<ServicePlan>> {
        let inputs = self.known.inputs();
        keys.iter()
            .map(|k| (*k, plan::plan_service(&inputs, k, self.written.get(k))))
            .collect()
    }

    /// Moves the maps to `next` (only what differs from what is written), all or
    /// nothing. Returns the services written.
    fn transition(
        &mut self,
        next: BTreeMap<ServiceKey, Option<ServicePlan>>,
    ) -> Result<Vec<ServiceKey>> {
        let mut t = self.start_transition(next)?;
        self.advance(&mut t, &mut || true, false)?;
        Ok(t.order)
    }

    /// The transition to `next` (only what differs from what is written), checked to
    /// fit as a whole before anything is written; nothing is written yet.
    fn start_transition(
        &mut self,
        next: BTreeMap<ServiceKey, Option<ServicePlan>>,
    ) -> Result<Transition> {
        let next: BTreeMap<ServiceKey, Option<ServicePlan>> = next
            .into_iter()
            .filter(|(k, p)| match p {
                None => self.dp.holds(*k),
                Some(p) => self.written.get(k) != Some(p) || !self.dp.holds(*k),
            })
            .collect();
        let mut t = Transition {
            next,
            order: Vec::new(),
            at: 0,
            done: Vec::new(),
            laying: None,
        };
        if t.next.is_empty() {
            return Ok(t);
        }
        self.generation += 1;
        for k in t.next.keys() {
            self.touched.insert(*k, self.generation);
        }
        t.order = check_fits(
            &self.dp.limits(),
            &self.dp.usage(&mut t.next.keys().copied()),
            &t.next,
        )?;
        Ok(t)
    }

    /// Writes the next services of `t`, at least one, while `more()` says so.
    /// `Ok(true)`: all are written. If a write fails, what was written goes back to
    /// what it held and the error is returned.
    /// In the `background`, a large table is laid out on a thread of its own first:
    /// `Ok(false)` until it is made ([`Self::laying`]).
    fn advance(
        &mut self,
        t: &mut Transition,
        more: &mut dyn FnMut() -> bool,
        background: bool,
    ) -> Result<bool> {
        while t.at < t.order.len() {
            let key = t.order[t.at];
            let bounds = self.dp.limits().tables;
            let r = match &t.next[&key] {
                Some(p) if background && layout::slot_max(p, bounds) >= self.laid_apart => {
                    match lay_apart(&mut t.laying, p, bounds)? {
                        None => return Ok(false),
                        Some(Ok(laid)) => self.dp.write_service_laid(key, p, laid),
                        Some(Err(e)) => Err(e.into()),
                    }
                }
                Some(p) => self.dp.write_service(key, p),
                None => self.dp.remove_service(key).map(|()| 0),
            };
            match r {
                Ok(digest) => {
                    let before = match &t.next[&key] {
                        Some(p) => self.written.insert(key, p.clone(), digest),
                        None => self.written.remove(&key),
                    };
                    t.done.push((key, before));
                }
                Err(e) => {
                    let why = format!("writing {key}: {e}");
                    self.roll_back(std::mem::take(&mut t.done));
                    return Err(anyhow::anyhow!(why));
                }
            }
            t.at += 1;
            if t.at < t.order.len() && !more() {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Writes back what the services in `done` held before (in reverse order).
    fn roll_back(&mut self, done: Vec<(ServiceKey, Option<ServicePlan>)>) {
        for (key, before) in done.into_iter().rev() {
            let r = match &before {
                Some(p) => self.dp.write_service(key, p),
                None => self.dp.remove_service(key).map(|()| 0),
            };
            match r {
                Ok(digest) => {
                    match before {
                        Some(p) => self.written.insert(key, p, digest),
                        None => self.written.remove(&key),
                    };
                }
                Err(e) => {
                    // Left as the failed change made it; the next change writes the plan
                    // again, which repairs it.
                    warn!(service = %key, "rolling back a failed change: {e}");
                    self.written.remove(&key);
                }
            }
        }
    }

    /// Makes the maps hold the plan of everything known: every desired service, and
    /// no other (what an earlier run left is removed).
    pub fn reconcile_all(&mut self) -> Result<Vec<ServiceKey>> {
        let keys: BTreeSet<ServiceKey> = self
            .dp
            .services()
            .into_iter()
            .chain(self.known.desired.services.keys().copied())
            .collect();
        // Nothing is taken as written: each service is compared with what the maps hold.
        self.written.clear();
        let next = self.plans(&keys);
        self.transition(next)
    }

    /// Rewrites `touched` from what is known; keeps the new inputs if it fails (the
    /// maps stay as they were, and the next change tries again).
    fn resync(&mut self, mut touched: BTreeSet<ServiceKey>) -> Result<Vec<ServiceKey>> {
        if self.behind.is_some() {
            touched.extend(self.known.desired.services.keys().copied());
        }
        if touched.is_empty() {
            return Ok(Vec::new());
        }
        // One write staged at a time: an earlier change of the inputs (in the same
        // job, deferred) is written out first, so that this one's plans are the
        // newer. An apply's is never under way here: its owner runs no change
        // meanwhile.
        anyhow::ensure!(
            self.writing.as_ref().is_none_or(|w| w.old.is_none()),
            "an apply is being written to the maps; this change of the inputs waits for it"
        );
        if let Some(Err(e)) = self.write_some(&mut || true, &mut |_, _| Ok(())) {
            warn!("writing an earlier change of the inputs: {e:#}");
        }
        let next = self.plans(&touched);
        let t = self
            .start_transition(next)
            .inspect_err(|e| self.behind = Some(format!("{e:#}")))?;
        let order = t.order.clone();
        if order.is_empty() {
            self.behind = None;
            return Ok(order);
        }
        // Staged as an apply's write is (nothing to save first); its end says whether
        // the node is still behind its inputs (`write_some_of`, `give_up`).
        self.writing = Some(Writing {
            touched: t.next.keys().copied().collect(),
            step: Step::Write(t),
            old: None,
            named: Vec::new(),
            more: 0,
        });
        if !self.deferred {
            if let Some(r) = self.write_some(&mut || true, &mut |_, _| Ok(())) {
                r?;
            }
        }
        Ok(order)
    }

    /// Makes `new` the desired state; returns what changed. Validated and checked in
    /// full first; `save` makes the intent durable before the maps change (so a crash
    /// at any point of the write is completed at the next start); if the write fails,
    /// the maps and the saved intent go back to what they were.
    pub fn apply(
        &mut self,
        new: Desired,
        dry_run: bool,
        save: &mut dyn FnMut(&Desired, &BTreeSet<ServiceKey>) -> Result<()>,
    ) -> Result<Vec<Change>> {
        self.apply_of(new, None, dry_run, save)
    }

    /// As [`Self::apply`], given that only the services `keys` may differ between
    /// what is desired now and `new` (an edit of one service): only those are
    /// compared and judged, so the cost is theirs, not the node's. `None`: all.
    pub fn apply_of(
        &mut self,
        new: Desired,
        keys: Option<&BTreeSet<ServiceKey>>,
        dry_run: bool,
        save: &mut dyn FnMut(&Desired, &BTreeSet<ServiceKey>) -> Result<()>,
    ) -> Result<Vec<Change>> {
        let changes = self.begin_apply_of(new, keys, dry_run)?;
        if let Some(r) = self.write_some(&mut || true, save) {
            r?;
        }
        Ok(changes)
    }

    /// As [`Self::apply_of`], up to saving it: validated, checked and made the
    /// desired state, with the save and the map writes left to [`Self::write_some`]
    /// (`Ok`: the changes it makes once written). A refusal is decided here and
    /// changes nothing (a failure to save or write, later, changes nothing either).
    /// Meanwhile the views show the new desired state over the maps as they are
    /// written; nothing else may change until it is written.
    pub fn begin_apply_of(
        &mut self,
        new: Desired,
        keys: Option<&BTreeSet<ServiceKey>>,
        dry_run: bool,
    ) -> Result<Vec<Change>> {
        if self.writing.is_some() {
            anyhow::bail!(
                "another change is being written to the maps; send this one when it is answered"
            );
        }
        let limits = self.dp.limits();
        validate_services(
            &new,
            keys,
            limits.services,
            limits.tables.max,
            &self.known.own_addresses,
            &self.known.encap,
        )?;
        let changes = match keys {
            None => diff(&self.known.desired, &new),
            Some(keys) => crate::desired::diff_of(&self.known.desired, &new, keys),
        };
        if changes.is_empty() {
            return Ok(changes);
        }
        let touched: BTreeSet<ServiceKey> = changes.iter().map(Change::service).collect();
        let old = std::mem::replace(&mut self.known.desired, new);
        let next = self.plans(&touched);
        if let Err(e) = check_fits(&limits, &self.dp.usage(&mut next.keys().copied()), &next) {
            self.known.desired = old;
            return Err(e.into());
        }
        if dry_run {
            self.known.desired = old;
            return Ok(changes);
        }
        self.writing = Some(Writing {
            step: Step::Save(next),
            old: Some(old),
            touched,
            named: changes
                .iter()
                .take(LOGGED_CHANGES)
                .map(|c| c.to_string())
                .collect(),
            more: changes.len().saturating_sub(LOGGED_CHANGES),
        });
        Ok(changes)
    }

    /// Whether an apply is being written ([`Self::begin_apply_of`]).
    pub fn writing(&self) -> bool {
        self.writing.is_some()
    }

    /// While on, a change of the inputs (`set_health`, `set_feed`...) checks, plans
    /// and stages its write, and returns the services it will write; the write is
    /// left to [`Self::write_some`], in batches, as an apply's. Its owner then
    /// answers reads between batches instead of holding them for the whole write (a
    /// health verdict on a backend of a 100,000-backend service writes a table of
    /// 12M cells).
    pub fn set_deferred(&mut self, on: bool) {
        self.deferred = on;
    }

    /// Writes the next services of the apply under way, at least one, while `more()`
    /// says so. `None`: none under way, or not all written yet; `Some`: it ended, in
    /// the maps and the views. If a write failed, the maps, the desired state and
    /// (through `save`) the saved intent are back to what they were before it.
    pub fn write_some(
        &mut self,
        more: &mut dyn FnMut() -> bool,
        save: &mut dyn FnMut(&Desired, &BTreeSet<ServiceKey>) -> Result<()>,
    ) -> Option<Result<()>> {
        self.write_some_of(more, save, false)
    }

    /// As `write_some`, for a writer that answers reads between steps: a table of
    /// `laid_apart` cells or more is laid out on a thread of its own, and the steps
    /// meanwhile write nothing ([`Self::laying`] says so, for the writer to wait on
    /// its reads rather than spin).
    pub fn write_some_in_background(
        &mut self,
        more: &mut dyn FnMut() -> bool,
        save: &mut dyn FnMut(&Desired, &BTreeSet<ServiceKey>) -> Result<()>,
    ) -> Option<Result<()>> {
        self.write_some_of(more, save, true)
    }

    /// Whether the apply under way waits for a table being laid out.
    pub fn laying(&self) -> bool {
        matches!(&self.writing, Some(Writing { step: Step::Write(t), .. }) if t.laying.is_some())
    }

    /// Tables from this many cells up are laid out apart (`LAID_APART`; tests lower it).
    pub fn set_laid_apart(&mut self, cells: u64) {
        self.laid_apart = cells;
    }

    fn write_some_of(
        &mut self,
        more: &mut dyn FnMut() -> bool,
        save: &mut dyn FnMut(&Desired, &BTreeSet<ServiceKey>) -> Result<()>,
        background: bool,
    ) -> Option<Result<()>> {
        let mut w = self.writing.take()?;
        if let Step::Save(next) = &mut w.step {
            let next = std::mem::take(next);
            if let Err(e) = save(&self.known.desired, &w.touched) {
                if let Some(old) = w.old {
                    self.known.desired = old;
                }
                return Some(Err(e).context("saving the desired state; nothing was changed"));
            }
            // Each change is named up to a point; an apply of 10,000 services says how
            // many more there are (they are all in the answer and the desired log).
            for c in &w.named {
                info!(change = %c, "applying");
            }
            if w.more > 0 {
                info!(
                    more = w.more,
                    services = w.touched.len(),
                    "applying: and more changes, not named one by one"
                );
            }
            crate::fault::point("apply.saved");
            match self.start_transition(next) {
                Ok(t) => w.step = Step::Write(t),
                Err(e) => {
                    self.give_up(w.old, &w.touched, &e, save);
                    return Some(Err(e));
                }
            }
            // Saving 10,000 services is a batch's worth on its own.
            if !more() {
                self.writing = Some(w);
                return None;
            }
        }
        let Step::Write(t) = &mut w.step else {
            unreachable!("saved above")
        };
        match self.advance(t, more, background) {
            Ok(false) => {
                self.writing = Some(w);
                None
            }
            Ok(true) => {
                if w.old.is_some() {
                    // An apply's maps are written, its end not yet recorded.
                    crate::fault::point("apply.maps-written");
                }
                self.generation += 1;
                for k in &w.touched {
                    self.touched.insert(*k, self.generation);
                }
                if w.old.is_none() {
                    self.behind = None;
                }
                Some(Ok(()))
            }
            Err(e) => {
                self.give_up(w.old, &w.touched, &e, save);
                Some(Err(e))
            }
        }
    }

    /// After a failed write: `old` is desired again, and saved again; a change of the
    /// inputs (no `old`) leaves the node behind them, retried with the next change.
    fn give_up(
        &mut self,
        old: Option<Desired>,
        touched: &BTreeSet<ServiceKey>,
        e: &anyhow::Error,
        save: &mut dyn FnMut(&Desired, &BTreeSet<ServiceKey>) -> Result<()>,
    ) {
        let Some(old) = old else {
            self.behind = Some(format!("{e:#}"));
            return;
        };
        let new = std::mem::replace(&mut self.known.desired, old);
        if let Err(s) = save(&self.known.desired, touched) {
            warn!("restoring the saved desired state after a failed change: {s:#}");
            // The file says `new`: the next start applies it.
            let _ = new;
        }
    }

    /// The configured services whose entry differs between `old` and `new`.
    fn changed<V: PartialEq>(
        &self,
        old: &BTreeMap<ServiceKey, V>,
        new: &BTreeMap<ServiceKey, V>,
    ) -> BTreeSet<ServiceKey> {
        self.known
            .desired
            .services
            .keys()
            .filter(|k| old.get(k) != new.get(k))
            .copied()
            .collect()
    }

    /// The directory's current backends per service.
    pub fn set_directory(
        &mut self,
        directory: BTreeMap<ServiceKey, BTreeMap<IpAddr, DirBackend>>,
    ) -> Result<Vec<ServiceKey>> {
        let touched = if self.known.directory_fed {
            self.changed(&self.known.directory, &directory)
        } else {
            // The first word from the directory: services may now be judged out.
            self.known.directory_fed = true;
            self.known.desired.services.keys().copied().collect()
        };
        self.known.directory = directory;
        self.resync(touched)
    }

    /// Everything the directory gives the data plane, and the MACs of its new next
    /// hops, taken at once: one plan and one write of the services it touches.
    pub fn set_feed(
        &mut self,
        feed: crate::directory::feed::Feed,
        neighbors: BTreeMap<IpAddr, Neighbor>,
    ) -> Result<Vec<ServiceKey>> {
        let learned = self.learn(neighbors);
        let mut touched = self.changed(&self.known.epochs, &feed.epochs);
        touched.extend(self.changed(&self.known.verdicts, &feed.verdicts));
        if self.known.directory_fed {
            touched.extend(self.changed(&self.known.directory, &feed.backends));
        } else {
            // The first word from the directory: services may now be judged out.
            self.known.directory_fed = true;
            touched.extend(self.known.desired.services.keys().copied());
        }
        self.known.epochs = feed.epochs;
        self.known.verdicts = feed.verdicts;
        self.known.directory = feed.backends;
        touched.extend(self.resolved_through(&learned));
        self.resync(touched)
    }

    /// As `set_feed`, for the services `keys` only: `feed` holds what the directory
    /// has for them (a key missing from it has nothing there), the others keep what
    /// they had. Costs those services, not the node. Only after a whole feed (the
    /// first one decides which services are judged out).
    pub fn set_feed_of(
        &mut self,
        keys: &BTreeSet<ServiceKey>,
        mut feed: crate::directory::feed::Feed,
        neighbors: BTreeMap<IpAddr, Neighbor>,
    ) -> Result<Vec<ServiceKey>> {
        anyhow::ensure!(
            self.known.directory_fed,
            "a partial feed before the first whole one"
        );
        let learned = self.learn(neighbors);
        let mut touched = BTreeSet::new();
        for k in keys {
            let (e, v, b) = (
                feed.epochs.remove(k),
                feed.verdicts.remove(k),
                feed.backends.remove(k),
            );
            let before = (
                self.known.epochs.get(k).copied(),
                self.known.verdicts.get(k).cloned(),
                self.known.directory.get(k).cloned(),
            );
            if before != (e, v.clone(), b.clone()) {
                touched.insert(*k);
            }
            match e {
                Some(e) => self.known.epochs.insert(*k, e),
                None => self.known.epochs.remove(k),
            };
            match v {
                Some(v) => self.known.verdicts.insert(*k, v),
                None => self.known.verdicts.remove(k),
            };
            match b {
                Some(b) => self.known.directory.insert(*k, b),
                None => self.known.directory.remove(k),
            };
        }
        touched.extend(self.resolved_through(&learned));
        self.resync(touched)
    }

    /// Takes in neighbour entries that came with a feed; returns the addresses whose
    /// entry is new or changed.
    fn learn(&mut self, neighbors: BTreeMap<IpAddr, Neighbor>) -> BTreeSet<IpAddr> {
        let learned: BTreeSet<IpAddr> = neighbors
            .iter()
            .filter(|(a, n)| self.known.neighbors.get(a) != Some(*n))
            .map(|(a, _)| *a)
            .collect();
        for a in &learned {
            info!(backend = %a, mac = %mac_to_string(&neighbors[a].mac), "backend MAC learned");
        }
        self.known.neighbors.extend(neighbors);
        learned
    }

    /// Services with a backend whose next hop is among `learned` (just resolved).
    fn resolved_through(&self, learned: &BTreeSet<IpAddr>) -> BTreeSet<ServiceKey> {
        if learned.is_empty() {
            return BTreeSet::new();
        }
        self.known
            .desired
            .services
            .iter()
            .filter(|(k, s)| {
                let dir = self.known.directory.get(*k);
                s.backends
                    .keys()
                    .copied()
                    .chain(dir.into_iter().flat_map(|d| d.values().map(|b| b.via)))
                    .any(|h| learned.contains(&h))
            })
            .map(|(k, _)| *k)
            .collect()
    }

    /// The SPM manager's epochs (from the directory).
    pub fn set_epochs(&mut self, epochs: BTreeMap<ServiceKey, u64>) -> Result<Vec<ServiceKey>> {
        let touched = self.changed(&self.known.epochs, &epochs);
        self.known.epochs = epochs;
        self.resync(touched)
    }

    /// The water-mark manager's verdicts (from the directory).
    pub fn set_verdicts(
        &mut self,
        verdicts: BTreeMap<ServiceKey, Vec<Verdict>>,
    ) -> Result<Vec<ServiceKey>> {
        let touched = self.changed(&self.known.verdicts, &verdicts);
        self.known.verdicts = verdicts;
        self.resync(touched)
    }

    /// The merged availability records.
    pub fn set_availability(&mut self, set: availability::Set) -> Result<Vec<ServiceKey>> {
        let touched = self
            .known
            .desired
            .services
            .keys()
            .filter(|k| {
                let k = k.to_string();
                self.known.availability.get(&k) != set.get(&k)
            })
            .copied()
            .collect();
        self.known.availability = set;
        self.resync(touched)
    }

    /// A health check's verdict.
    pub fn set_health(&mut self, key: ServiceKey, addr: IpAddr, healthy: bool) -> Result<bool> {
        let changed = if healthy {
            self.known.unhealthy.remove(&(key, addr))
        } else {
            self.known.unhealthy.insert((key, addr))
        };
        if changed {
            // Only changes of verdict get here; a backend going out is worth a warning.
            if healthy {
                info!(service = %key, backend = %addr, "backend passes its health check again: takes new flows");
            } else {
                warn!(service = %key, backend = %addr, "backend fails its health check: no new flows (established ones stay)");
            }
            self.resync(BTreeSet::from([key]))?;
        }
        Ok(changed)
    }

    /// Freshly read neighbour entries; returns the addresses whose entry changed.
    pub fn update_neighbors(&mut self, fresh: BTreeMap<IpAddr, Neighbor>) -> Result<Vec<IpAddr>> {
        let changed: Vec<IpAddr> = fresh
            .iter()
            .filter(|(a, n)| self.known.neighbors.get(a) != Some(n))
            .map(|(a, _)| *a)
            .collect();
        if changed.is_empty() {
            return Ok(changed);
        }
        for a in &changed {
            info!(backend = %a, mac = %mac_to_string(&fresh[a].mac), "backend MAC learned");
        }
        self.known.neighbors.extend(fresh);
        let touched: BTreeSet<ServiceKey> = self
            .known
            .desired
            .services
            .iter()
            .filter(|(k, s)| {
                let dir = self.known.directory.get(*k);
                changed.iter().any(|a| {
                    s.backends.get(a).is_some_and(|b| b.mac.is_none())
                        || dir.is_some_and(|d| d.contains_key(a) || d.values().any(|b| b.via == *a))
                })
            })
            .map(|(k, _)| *k)
            .collect();
        self.resync(touched)?;
        Ok(changed)
    }

    pub fn knows_neighbor(&self, addr: IpAddr) -> bool {
        self.known.neighbors.contains_key(&addr)
    }

    pub fn set_interfaces(&mut self, interfaces: Vec<LocalInterface>) {
        self.known.interfaces = interfaces;
    }

    /// Next hops whose MAC comes from the neighbour table.
    pub fn resolvable(&self) -> Vec<IpAddr> {
        let set: BTreeSet<IpAddr> = self
            .known
            .desired
            .services
            .values()
            .flat_map(|s| s.backends.iter())
            .filter(|(_, b)| b.mac.is_none())
            .map(|(a, _)| *a)
            .chain(
                self.known
                    .directory
                    .values()
                    .flat_map(|d| d.values().map(|b| b.via)),
            )
            .collect();
        set.into_iter().collect()
    }

    /// Next hops that may be reached through a gateway: the backends of encapsulating
    /// services (their frames go to whatever the kernel routes them through). The
    /// others must be on a link of this node (L2 direct server return).
    pub fn routed(&self) -> Vec<IpAddr> {
        let set: BTreeSet<IpAddr> = self
            .known
            .desired
            .services
            .values()
            .filter(|s| s.config.forward.encapsulates())
            .flat_map(|s| s.backends.iter())
            .filter(|(_, b)| b.mac.is_none())
            .map(|(a, _)| *a)
            .collect();
        set.into_iter().collect()
    }

    /// Backends (by next hop) whose MAC is not known yet.
    pub fn unresolved(&self) -> Vec<IpAddr> {
        self.resolvable()
            .into_iter()
            .filter(|a| !self.known.neighbors.contains_key(a))
            .collect()
    }

    pub fn is_healthy(&self, key: ServiceKey, addr: IpAddr) -> bool {
        !self.known.unhealthy.contains(&(key, addr))
    }

    /// Every service with a health check, and the backends to check.
    pub fn checks(&self) -> Vec<ServiceChecks> {
        self.known
            .desired
            .services
            .iter()
            .filter_map(|(k, s)| {
                let check = s.check.clone()?;
                let backends = plan::merged(s, self.known.directory.get(k))
                    .into_keys()
                    .collect();
                Some(ServiceChecks {
                    service: *k,
                    check,
                    backends,
                    forward: s.config.forward,
                    encap: self.known.encap,
                })
            })
            .collect()
    }

    /// The services as the API shows them: what is written, with counters.
    pub fn views(&self) -> Vec<api::ServiceView> {
        self.views_with(true)
    }

    /// The views; without the maps' counters (zero) when `counters` is false, for
    /// callers that only need what is planned (the SPM manager).
    pub fn views_with(&self, counters: bool) -> Vec<api::ServiceView> {
        self.views_of(&mut self.known.desired.services.keys().copied(), counters)
    }

    /// The services that changed after generation `since`.
    pub fn touched_since(&self, since: u64) -> Vec<ServiceKey> {
        self.touched
            .iter()
            .filter(|(_, g)| **g > since)
            .map(|(k, _)| *k)
            .collect()
    }

    /// The views of the desired services among `keys`. Built on two threads for a
    /// node of thousands of services (each view is its own; the API's list waits for
    /// all of them).
    pub fn views_of(
        &self,
        keys: &mut dyn Iterator<Item = ServiceKey>,
        counters: bool,
    ) -> Vec<api::ServiceView> {
        let keys: Vec<ServiceKey> = keys
            .filter(|k| self.known.desired.services.contains_key(k))
            .collect();
        let mut all = if counters {
            self.dp.counters_of(&mut keys.iter().copied())
        } else {
            BTreeMap::new()
        };
        let work: Vec<(ServiceKey, ServiceCounters)> = keys
            .into_iter()
            .map(|k| {
                let c = all.remove(&k).unwrap_or_default();
                (k, c)
            })
            .collect();
        let (known, written) = (&self.known, &self.written);
        let build = |part: &[(ServiceKey, ServiceCounters)]| -> Vec<api::ServiceView> {
            let inputs = known.inputs();
            part.iter()
                .map(|(k, c)| view_of(known, written, &inputs, k, c))
                .collect()
        };
        if work.len() < PARALLEL_VIEWS {
            return build(&work);
        }
        let (first, second) = work.split_at(work.len() / 2);
        std::thread::scope(|s| {
            let later = s.spawn(|| build(second));
            let mut out = build(first);
            out.extend(later.join().expect("building views does not panic"));
            out
        })
    }

    /// Backends written, and those without a route (kept as services are written:
    /// every published snapshot asks, and a node may hold 100,000 backends).
    pub fn backend_counts(&self) -> (usize, usize) {
        self.written.backend_counts()
    }
}

/// The changes of one apply named one by one in the log.
const LOGGED_CHANGES: usize = 100;

/// From this many services on, views are built on two threads.
const PARALLEL_VIEWS: usize = 2048;

/// One service's view: what is written (or would be), its backends and counters.
fn view_of(
    known: &Known,
    written: &Written,
    inputs: &plan::Inputs,
    key: &ServiceKey,
    counters: &ServiceCounters,
) -> api::ServiceView {
    let spec = &known.desired.services[key];
    let planned;
    let p = match written.get(key) {
        Some(p) => p,
        None => {
            planned = plan::plan_service(inputs, key, None).unwrap_or_default();
            &planned
        }
    };
    let mut spm = spec.spm.clone();
    let mut backends = Vec::new();
    let merged = plan::merged(spec, known.directory.get(key));
    let unavailable = plan::unavailable_with(inputs, key, &merged);
    for (addr, (b, dir)) in merged {
        let bp = p.backends.get(&addr);
        let route = bp.and_then(|b| b.route);
        let source = match (b.mac, route) {
            (Some(_), _) => "config",
            (None, Some(_)) => "neighbour table",
            (None, None) => "unresolved",
        };
        let healthy = !known.unhealthy.contains(&(*key, addr));
        let c = counters.backends.get(&addr).copied().unwrap_or_default();
        let sphere = bp.and_then(|b| b.sphere.clone());
        if let Some(s) = &sphere {
            spm.spheres.entry(addr).or_insert_with(|| s.clone());
        }
        backends.push(api::BackendView {
            address: addr,
            weight: b.weight,
            healthy,
            drain: b.drain,
            mac: route.map(|r| mac_to_string(&r.dst_mac)),
            mac_source: source.to_string(),
            packets: c.packets,
            bytes: c.bytes,
            sphere,
            steering: steering_note(known, key, addr),
            valid: plan::valid_instance(&b, healthy, route.is_some()),
            from_directory: dir.is_some() && !spec.backends.contains_key(&addr),
        });
    }
    api::ServiceView {
        service: key.to_string(),
        key: *key,
        config: p.config,
        packets: counters.service.packets,
        bytes: counters.service.bytes,
        backend_count: backends.len(),
        backends,
        spm,
        unavailable,
    }
}

/// Why a backend is in or out of the new-flow table by the water marks.
fn steering_note(known: &Known, key: &ServiceKey, addr: IpAddr) -> Option<String> {
    let marks = known.desired.services.get(key)?.steering?;
    let v = known
        .verdicts
        .get(key)?
        .iter()
        .find(|v| v.backend == addr)?;
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

#[cfg(test)]
mod tests;
mod written;

use written::Written;
