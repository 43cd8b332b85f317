//! The directory master's managers, every 100 ms: the SPM manager (each service's
//! epoch record in the `spm` table) and the water-mark manager (each steered
//! service's verdicts in the `steering` table, on its own period). Their decisions
//! are the pure `spm::next_record` and `watermark::next_verdicts`; this only reads
//! the replica and the daemon's views, and writes records through the directory.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use anyhow::Result;
use tracing::{debug, info, warn};

use crate::{
    cluster::node::Event,
    directory::tables::names,
    model::ServiceKey,
    shell::dird::DirHandle,
    spm::{next_record, EpochRecord},
    watermark::{self, Marks, Verdict},
};

/// What the SPM manager planned last: the daemon's generation and the bumps.
pub struct Seen {
    generation: u64,
    bumps: Vec<(String, String)>,
}

/// Records each service's epoch and valid instance set, bumping the epoch as the
/// service's policy and its operators' bumps say. Every node takes its epochs from
/// that table. Acts only when the master's replica is in sync (else it would write
/// the same record again and again).
async fn manage_spm(h: &DirHandle, seen: &mut Option<Seen>) -> Result<()> {
    if !h.master_in_sync() {
        *seen = None;
        return Ok(());
    }
    // A record follows from the service's plan and its operators' bumps: plan again
    // only the services that changed since the last round, and all of them when a
    // bump came (a node of 10,000 services must not plan them all ten times a second).
    let bumps: Vec<(String, String)> = h.with_tables(|t| {
        t.search(names::SPM_BUMPS, "")
            .into_iter()
            .map(|e| (e.key.clone(), e.value.clone()))
            .collect()
    });
    let generation = h.daemon().now().generation;
    let since = match seen {
        Some(s) if s.bumps == bumps => {
            if s.generation == generation {
                return Ok(());
            }
            Some(s.generation)
        }
        _ => None,
    };
    let (generation, views) = h.daemon().read(move |d| d.planned_services(since)).await;
    *seen = Some(Seen { generation, bumps });
    let records: Vec<(String, EpochRecord)> = h.with_tables(|tables| {
        views
            .iter()
            .filter_map(|v| {
                let key = v.key.to_string();
                let record = tables
                    .get(names::SPM, &key)
                    .and_then(|e| serde_json::from_str::<EpochRecord>(&e.value).ok());
                let bumps = tables
                    .get(names::SPM_BUMPS, &key)
                    .and_then(|e| e.value.parse().ok())
                    .unwrap_or(0);
                let members: Vec<String> = v
                    .backends
                    .iter()
                    .filter(|b| b.takes_new_flows())
                    .map(|b| b.address.to_string())
                    .collect();
                let next = next_record(v.spm.epoch_policy, record.as_ref(), &members, bumps)?;
                Some((key, next))
            })
            .collect()
    });
    if records.is_empty() {
        return Ok(());
    }
    let rows = records
        .into_iter()
        .map(|(key, record)| {
            debug!(service = %key, epoch = record.epoch, members = ?record.members, "SPM manager: service record");
            (key, serde_json::to_string(&record).expect("serializes"))
        })
        .collect();
    // One commit for all: a start of 10,000 services is one replication round and
    // one feed, not 10,000.
    if let Err(e) = h.put_entries(names::SPM, rows).await {
        *seen = None;
        return Err(e);
    }
    Ok(())
}

/// The water-mark steering of every service that has it, each on its own period:
/// samples are the valid load reports, M is the last verdicts in the `steering`
/// table, the new verdicts go there when they change.
async fn manage_load(h: &DirHandle, runs: &mut BTreeMap<ServiceKey, Instant>) -> Result<()> {
    if !h.master_in_sync() {
        return Ok(());
    }
    let marks: Vec<(ServiceKey, Marks)> = h
        .daemon()
        .now()
        .desired
        .services
        .iter()
        .filter_map(|(k, s)| Some((*k, s.steering?)))
        .collect();
    let now = Instant::now();
    let mut writes = Vec::new();
    for (key, m) in marks {
        let due = runs
            .get(&key)
            .is_none_or(|t| now.duration_since(*t) >= Duration::from_millis(m.period_ms));
        if !due {
            continue;
        }
        runs.insert(key, now);
        let svc = key.to_string();
        let (samples, previous) = h.with_tables(|t| {
            let rows = t.search(watermark::LOAD_TABLE, &format!("{svc}|"));
            let samples = watermark::samples(
                rows.iter()
                    .map(|e| (e.key.as_str(), e.value.as_str(), e.valid)),
            );
            let previous: Vec<Verdict> = t
                .get(watermark::VERDICT_TABLE, &svc)
                .and_then(|e| serde_json::from_str(&e.value).ok())
                .unwrap_or_default();
            (samples, previous)
        });
        let Some(verdicts) = watermark::next_verdicts(&m, &samples, &previous) else {
            continue;
        };
        for v in watermark::moved(&previous, &verdicts) {
            info!(service = %svc, backend = %v.backend, util = v.util, weighted = v.weighted, in_table = v.in_table, "water marks: backend {}", if v.in_table { "in" } else { "out" });
            if let Some((c, id)) = &h.events {
                c.publish(
                    *id,
                    Event::Steering {
                        service: svc.clone(),
                        backend: v.backend,
                        in_table: v.in_table,
                        util: v.util,
                    },
                );
            }
        }
        writes.push((svc, serde_json::to_string(&verdicts).expect("serializes")));
    }
    if !writes.is_empty() {
        h.put_entries(watermark::VERDICT_TABLE, writes).await?;
    }
    Ok(())
}

/// Runs both managers every 100 ms.
pub fn start(h: DirHandle) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut runs = BTreeMap::new();
        let mut seen = None;
        loop {
            tick.tick().await;
            if let Err(e) = manage_spm(&h, &mut seen).await {
                warn!("SPM manager: {e:#}");
            }
            if let Err(e) = manage_load(&h, &mut runs).await {
                warn!("water-mark steering: {e:#}");
            }
        }
    });
}
