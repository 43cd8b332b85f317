//! Service availability between LB nodes (seed 003), the I/O around the pure
//! `availability` module: every node holds the set of records, persists it (atomic
//! write, fsync) and gives it to the data plane; a record set here is pushed to every
//! peer, and a peer that learns something new repeats it to the others (each node a
//! repeater). A node that starts syncs: it sends its set to its reference peers (the
//! other cluster members), merges the union they answer with, then pushes to each the
//! records it lacked (follow-ups). Every few seconds it syncs with one peer more, so a
//! missed push heals. Messages are framed and signed with the cluster key like the
//! directory's; a replayed one is harmless (merging is idempotent, later wins).

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        Arc,
    },
    time::Duration,
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::{
    availability::{self, Record, Set},
    shell::handle::DaemonHandle,
};

pub const FILE: &str = "availability.json";
/// The largest availability message accepted.
pub const MAX_MESSAGE: usize = 4 << 20;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Msg {
    /// New records: merge, and repeat what was new to the other peers.
    Push { records: Vec<Record> },
    /// The sender's whole set: merge it, answer with the union.
    Sync { records: Vec<Record> },
}

/// Reads the set a previous run saved; a missing file is an empty set.
pub fn load(dir: &Path) -> Result<Set> {
    let path = dir.join(FILE);
    match std::fs::read(&path) {
        Ok(bytes) => {
            let records: Vec<Record> = serde_json::from_slice(&bytes).with_context(|| {
                format!("reading {} (remove it to start empty)", path.display())
            })?;
            let mut set = Set::new();
            for r in records {
                availability::absorb(&mut set, r);
            }
            Ok(set)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Set::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn save(path: &Path, set: &Set) -> Result<()> {
    let records: Vec<&Record> = set.values().collect();
    crate::shell::state_file::write_atomic(path, &serde_json::to_vec_pretty(&records)?)
}

#[derive(Clone)]
pub struct AvailHandle {
    set: Arc<Mutex<Set>>,
    path: PathBuf,
    daemon: DaemonHandle,
    key: Arc<Vec<u8>>,
    cluster: Option<(
        crate::shell::clusterd::ClusterHandle,
        crate::config::ClusterConfig,
    )>,
    synced: Arc<AtomicBool>,
    pub rejected: Arc<AtomicU64>,
}

impl AvailHandle {
    pub async fn records(&self) -> Set {
        self.set.lock().await.clone()
    }

    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Relaxed)
    }

    /// Takes records into the set; persists and applies the set if any was new.
    /// Returns the new ones.
    async fn absorb(&self, records: Vec<Record>) -> Result<Vec<Record>> {
        let (fresh, set) = {
            let mut set = self.set.lock().await;
            let fresh: Vec<Record> = records
                .into_iter()
                .filter(|r| availability::absorb(&mut set, r.clone()))
                .collect();
            (fresh, set.clone())
        };
        if !fresh.is_empty() {
            for r in &fresh {
                info!(service = %r.service, available = r.available, reason = ?r.reason, operator = %r.operator, "availability record");
                if let Some((c, cfg)) = &self.cluster {
                    c.publish(
                        cfg.id,
                        crate::cluster::node::Event::Availability {
                            service: r.service.clone(),
                            available: r.available,
                            reason: format!("{:?}", r.reason).to_lowercase(),
                            operator: r.operator.clone(),
                        },
                    );
                }
            }
            save(&self.path, &set)?;
            self.daemon.change(move |d| d.set_availability(set)).await?;
        }
        Ok(fresh)
    }

    /// An operator's record: kept, applied, pushed to every peer.
    pub async fn set(&self, record: Record) -> Result<()> {
        let fresh = self.absorb(vec![record]).await?;
        self.push(fresh, None).await;
        Ok(())
    }

    /// A message from a peer (already authenticated); the answer to a sync.
    pub async fn receive(&self, from: Option<SocketAddr>, msg: Msg) -> Result<Option<Vec<Record>>> {
        match msg {
            Msg::Push { records } => {
                let fresh = self.absorb(records).await?;
                self.push(fresh, from).await;
                Ok(None)
            }
            Msg::Sync { records } => {
                let fresh = self.absorb(records).await?;
                self.push(fresh, from).await;
                Ok(Some(self.records().await.into_values().collect()))
            }
        }
    }

    /// For the start-up sync: how many peers must answer, whether this node may also
    /// be synced alone (quorum 1), and how many other hosts are alive now.
    fn sync_needs(&self) -> (usize, bool, usize) {
        let Some((c, cfg)) = &self.cluster else {
            return (0, true, 0);
        };
        let alive = c
            .view()
            .hosts
            .iter()
            .filter(|h| h.info.id != cfg.id)
            .count();
        (
            cfg.startup_sync.peers_needed(cfg.quorum),
            cfg.quorum <= 1,
            alive,
        )
    }

    fn peers(&self) -> Vec<SocketAddr> {
        let Some((c, cfg)) = &self.cluster else {
            return Vec::new();
        };
        let mut peers: Vec<SocketAddr> = c
            .view()
            .hosts
            .iter()
            .map(|h| h.info.id)
            .filter(|id| *id != cfg.id)
            .map(|id| crate::shell::peer::endpoint(id, cfg.port))
            .collect();
        // Configured unicast peers count too, before they have been heard.
        for p in &cfg.peers {
            let e = crate::shell::peer::endpoint(p.ip(), cfg.port);
            if !peers.contains(&e) {
                peers.push(e);
            }
        }
        peers
    }

    async fn push(&self, records: Vec<Record>, except: Option<SocketAddr>) {
        if records.is_empty() {
            return;
        }
        let body = self.frame(&Msg::Push { records });
        for peer in self.peers().into_iter().filter(|p| Some(*p) != except) {
            let body = body.clone();
            let me = self.me();
            tokio::spawn(async move {
                if let Err(e) = post(peer, me, body).await {
                    warn!(%peer, "availability push not delivered (the next sync repairs it): {e:#}");
                }
            });
        }
    }

    fn me(&self) -> SocketAddr {
        self.cluster
            .as_ref()
            .map(|(_, c)| crate::shell::peer::endpoint(c.id, c.port))
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    fn frame(&self, msg: &Msg) -> Vec<u8> {
        crate::cluster::wire::encode_stream(
            &serde_json::to_vec(msg).expect("serializes"),
            &self.key,
            crate::cluster::wire::unix_secs(),
        )
    }

    /// The cluster key, that messages between nodes are signed with.
    pub fn key(&self) -> &[u8] {
        &self.key
    }

    /// Counts a message refused before it was opened.
    pub fn count_reject(&self) {
        self.rejected.fetch_add(1, Ordering::Relaxed);
    }

    /// Sends our set to `peer`, merges its answer, and pushes it what it lacked.
    async fn sync_with(&self, peer: SocketAddr) -> Result<()> {
        let mine = self.records().await;
        let body = self.frame(&Msg::Sync {
            records: mine.into_values().collect(),
        });
        let answer = post(peer, self.me(), body).await?;
        let answer = crate::cluster::wire::decode_stream(
            &answer,
            &self.key,
            MAX_MESSAGE,
            crate::cluster::wire::unix_secs(),
        )
        .map_err(|why| anyhow::anyhow!("answer refused: {}", why.name()))?;
        let theirs: Vec<Record> =
            serde_json::from_slice(answer).context("a malformed sync answer")?;
        let fresh = self.absorb(theirs.clone()).await?;
        self.push(fresh, Some(peer)).await;
        let mut their_set = Set::new();
        for r in theirs {
            availability::absorb(&mut their_set, r);
        }
        let follow_ups = availability::newer_than(&self.records().await, &their_set);
        if !follow_ups.is_empty() {
            post(
                peer,
                self.me(),
                self.frame(&Msg::Push {
                    records: follow_ups,
                }),
            )
            .await?;
        }
        Ok(())
    }

    /// Frames an answer to a sync.
    pub fn frame_answer(&self, records: &[Record]) -> Vec<u8> {
        crate::cluster::wire::encode_stream(
            &serde_json::to_vec(records).expect("serializes"),
            &self.key,
            crate::cluster::wire::unix_secs(),
        )
    }

    /// Parses an authenticated message from a peer.
    pub fn open(&self, body: &[u8]) -> Result<Msg, crate::cluster::wire::Reject> {
        serde_json::from_slice(body).map_err(|_| {
            self.rejected.fetch_add(1, Ordering::Relaxed);
            crate::cluster::wire::Reject::Malformed
        })
    }
}

async fn post(peer: SocketAddr, from: SocketAddr, body: Vec<u8>) -> Result<Vec<u8>> {
    crate::shell::peer::post_to_peer(peer, "/v1/avail", ("x-lb-from", from.to_string()), body).await
}

/// Starts availability: `set` was loaded (and given to the daemon) before the node
/// served. In a cluster: syncs with the reference peers as soon as they are known
/// (at most 3 s of waiting), then with one peer every 5 s.
pub fn start(
    set: Set,
    state_dir: &Path,
    daemon: DaemonHandle,
    cluster: Option<(
        crate::shell::clusterd::ClusterHandle,
        crate::config::ClusterConfig,
    )>,
) -> AvailHandle {
    let key = cluster
        .as_ref()
        .map(|(_, c)| c.key.clone())
        .unwrap_or_default();
    let standalone = cluster.is_none();
    let handle = AvailHandle {
        set: Arc::new(Mutex::new(set)),
        path: state_dir.join(FILE),
        daemon,
        key: Arc::new(key),
        cluster,
        synced: Arc::new(AtomicBool::new(standalone)),
        rejected: Arc::new(AtomicU64::new(0)),
    };
    if standalone {
        return handle;
    }
    let h = handle.clone();
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut round = 0usize;
        let mut warned = std::collections::BTreeSet::new();
        loop {
            let peers = h.peers();
            if !h.synced() {
                let mut answered = 0;
                for p in &peers {
                    match h.sync_with(*p).await {
                        Ok(()) => answered += 1,
                        Err(e) => {
                            if warned.insert(*p) {
                                warn!(peer = %p, "availability sync (retried until it answers): {e:#}");
                            }
                        }
                    }
                }
                let (need, alone_ok, alive) = h.sync_needs();
                if crate::availability::startup_synced(
                    answered,
                    need,
                    alone_ok,
                    alive,
                    start.elapsed(),
                ) {
                    info!(peers = peers.len(), answered, "availability synced");
                    h.synced.store(true, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            if !peers.is_empty() {
                round += 1;
                let p = peers[round % peers.len()];
                if let Err(e) = h.sync_with(p).await {
                    warn!(peer = %p, "availability sync: {e:#}");
                }
            }
        }
    });
    handle
}
