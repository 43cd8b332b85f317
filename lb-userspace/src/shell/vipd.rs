//! The VIP actor: the one place that touches this node's VIPs (interface addresses,
//! the data plane's served set, announcements, the operator's script). It runs the
//! keeper's steps one at a time, so that two releases never race on netlink, retries
//! what fails transiently, undoes a failed acquire, and every second reconciles what
//! the system holds with what the node serves, reporting each repair.

use std::{
    collections::BTreeSet,
    net::IpAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, warn};

use crate::{
    cluster::{
        keeper::{Keeper, Seen, Step},
        node::{Event, Input},
    },
    shell::{
        handle::DaemonHandle,
        vip::{self, Announcer},
    },
};

/// How long a released VIP is still forwarded: clients that missed the new owner's
/// announcements are moved by its repeats and its once-a-second re-announce.
pub const GRACE: Duration = Duration::from_secs(3);
/// Netlink calls refused with EBUSY are tried this many times.
const BUSY_TRIES: u32 = 8;

enum Command {
    Acquire(IpAddr),
    Release(IpAddr),
    /// Announce these again if still held (the node's once-a-second re-announce).
    Announce(BTreeSet<IpAddr>),
    /// Release everything; answer once nothing is forwarded any more.
    ReleaseAll(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct VipHandle {
    tx: mpsc::Sender<Command>,
}

impl VipHandle {
    pub async fn acquire(&self, vip: IpAddr) {
        let _ = self.tx.send(Command::Acquire(vip)).await;
    }

    pub async fn release(&self, vip: IpAddr) {
        let _ = self.tx.send(Command::Release(vip)).await;
    }

    pub async fn announce(&self, vips: BTreeSet<IpAddr>) {
        let _ = self.tx.send(Command::Announce(vips)).await;
    }

    /// Releases every VIP and waits out the grace period.
    pub async fn release_all(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::ReleaseAll(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

pub struct Settings {
    pub daemon: DaemonHandle,
    pub netlink: rtnetlink::Handle,
    pub ifindex: u32,
    pub interface: String,
    pub script: Option<PathBuf>,
    pub script_timeout: Duration,
    /// Every address this node may serve: others on the interface are left alone.
    pub group: BTreeSet<IpAddr>,
    /// What the node serves already (adopted after a restart).
    pub held: BTreeSet<IpAddr>,
}

struct Actor {
    s: Settings,
    keeper: Keeper,
    announcer: Option<Announcer>,
    results: mpsc::Sender<Input>,
    events: mpsc::UnboundedSender<Event>,
    leaving: Option<oneshot::Sender<()>>,
}

/// Starts the actor. Outcomes of acquires and releases go to `results`, repairs to
/// `events`.
pub fn start(
    s: Settings,
    results: mpsc::Sender<Input>,
    events: mpsc::UnboundedSender<Event>,
) -> VipHandle {
    let (tx, mut rx) = mpsc::channel(64);
    let mut actor = Actor {
        keeper: Keeper::new(GRACE, s.held.clone()),
        s,
        announcer: None,
        results,
        events,
        leaving: None,
    };
    tokio::spawn(async move {
        let mut reconcile = tokio::time::interval(Duration::from_secs(1));
        reconcile.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let wake = actor
                .keeper
                .next_due()
                .map(tokio::time::Instant::from_std)
                .unwrap_or_else(|| tokio::time::Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(c) => actor.command(c).await,
                    None => return,
                },
                _ = tokio::time::sleep_until(wake) => actor.due().await,
                _ = reconcile.tick() => actor.reconcile().await,
            }
        }
    });
    VipHandle { tx }
}

/// Whether a netlink failure is one worth trying again (EBUSY: another dump or
/// change on the same socket was in progress).
fn busy(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        if let Some(rtnetlink::Error::NetlinkError(m)) = c.downcast_ref::<rtnetlink::Error>() {
            return m.raw_code() == -(nix::errno::Errno::EBUSY as i32);
        }
        c.to_string().contains("os error 16")
    })
}

async fn observe(s: &Settings) -> Result<Seen> {
    let (h, i) = (s.netlink.clone(), s.ifindex);
    let on_interface = busy_retry(|| vip::addresses(&h, i))
        .await?
        .into_iter()
        .filter(|a| s.group.contains(a))
        .collect();
    let group = s.group.clone();
    let owned = s.daemon.call(move |d| d.served_of(&group)).await;
    Ok(Seen {
        on_interface,
        owned,
    })
}

async fn busy_retry<T, F, Fut>(f: F) -> Result<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut wait = Duration::from_millis(5);
    for _ in 1..BUSY_TRIES {
        match f().await {
            Err(e) if busy(&e) => {
                tokio::time::sleep(wait).await;
                wait *= 2;
            }
            other => return other,
        }
    }
    f().await
}

impl Actor {
    async fn command(&mut self, c: Command) {
        match c {
            Command::Acquire(vip) => {
                let ok = self.acquire(vip).await;
                let _ = self
                    .results
                    .send(Input::Acquired { address: vip, ok })
                    .await;
            }
            Command::Release(vip) => {
                let ok = self.release(vip).await;
                let _ = self
                    .results
                    .send(Input::Released { address: vip, ok })
                    .await;
            }
            Command::Announce(vips) => {
                for vip in vips.intersection(&self.keeper.held().clone()) {
                    if let Err(e) = self.run(&Step::Announce(*vip)).await {
                        warn!(%vip, "announcing again: {e:#}");
                    }
                }
            }
            Command::ReleaseAll(done) => {
                let held: Vec<IpAddr> = self.keeper.held().iter().copied().collect();
                for vip in held {
                    let ok = self.release(vip).await;
                    let _ = self
                        .results
                        .send(Input::Released { address: vip, ok })
                        .await;
                }
                if self.keeper.draining().next().is_none() {
                    let _ = done.send(());
                } else {
                    self.leaving = Some(done);
                }
            }
        }
    }

    async fn acquire(&mut self, vip: IpAddr) -> bool {
        let steps = self.keeper.acquire(vip, self.s.script.is_some());
        let mut failed = None;
        for step in &steps {
            if let Err(e) = self.run(step).await {
                failed = Some(e);
                break;
            }
        }
        if failed.is_none() {
            for step in self.keeper.acquired(Instant::now(), vip) {
                if let Err(e) = self.run(&step).await {
                    failed = Some(e);
                    break;
                }
            }
        }
        let Some(e) = failed else {
            return true;
        };
        warn!(%vip, "acquire failed, undoing it: {e:#}");
        for step in self.keeper.undo_acquire(vip) {
            if let Err(e) = self.run(&step).await {
                // The reconcile repairs what this leaves.
                warn!(%vip, ?step, "undoing the acquire: {e:#}");
            }
        }
        false
    }

    /// The address goes now, the data-plane entry after the grace period. True when
    /// the address is off the interface.
    async fn release(&mut self, vip: IpAddr) -> bool {
        let mut ok = true;
        for step in self
            .keeper
            .release(Instant::now(), vip, self.s.script.is_some())
        {
            if let Err(e) = self.run(&step).await {
                warn!(%vip, ?step, "release: {e:#}");
                ok &= !matches!(step, Step::RemoveAddress(_));
            }
        }
        ok
    }

    async fn due(&mut self) {
        for step in self.keeper.due(Instant::now()) {
            if let Err(e) = self.run(&step).await {
                warn!(?step, "{e:#}");
            }
        }
        if self.keeper.draining().next().is_none() {
            if let Some(done) = self.leaving.take() {
                let _ = done.send(());
            }
        }
    }

    async fn reconcile(&mut self) {
        let seen = match observe(&self.s).await {
            Ok(s) => s,
            Err(e) => {
                warn!("reading what this node holds of its VIPs: {e:#}");
                return;
            }
        };
        for repair in self.keeper.reconcile(&seen, &self.s.group) {
            warn!(vip = %repair.address, what = repair.what, "repairing");
            let _ = self.events.send(Event::Repaired {
                address: repair.address,
                what: repair.what.to_string(),
            });
            if let Err(e) = self.run(&repair.step).await {
                warn!(vip = %repair.address, "repair failed (tried again in a second): {e:#}");
            }
        }
    }

    async fn run(&mut self, step: &Step) -> Result<()> {
        match *step {
            Step::Own(vip) => self.s.daemon.call(move |d| d.set_owned(vip, true)).await,
            Step::Disown(vip) => self.s.daemon.call(move |d| d.set_owned(vip, false)).await,
            Step::AddAddress(vip) => {
                let (h, i) = (self.s.netlink.clone(), self.s.ifindex);
                busy_retry(|| vip::add_address(&h, i, vip)).await
            }
            Step::RemoveAddress(vip) => {
                let (h, i) = (self.s.netlink.clone(), self.s.ifindex);
                busy_retry(|| vip::remove_address(&h, i, vip)).await
            }
            Step::Script(verb, vip) => match &self.s.script {
                Some(script) => vip::run_script(script, verb, vip, self.s.script_timeout).await,
                None => Ok(()),
            },
            Step::Announce(vip) => {
                if self.announcer.is_none() {
                    self.announcer = Some(Announcer::open(&self.s.interface)?);
                }
                let r = self
                    .announcer
                    .as_mut()
                    .expect("opened above")
                    .announce(vip)
                    .context("announcing");
                if r.is_err() {
                    // A link that went away and came back needs a new socket.
                    self.announcer = None;
                } else {
                    debug!(%vip, "announced");
                }
                r
            }
        }
    }
}
