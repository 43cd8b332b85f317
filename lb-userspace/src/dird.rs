//! The directory inside lbd: the agent interface (add, delete, search, find-server,
//! heartbeat, register with a lease, subscribe) over the local replica, lease expiry
//! on a timer, and the data plane fed from the replica. This node is its own master
//! for now (no backup); replication between nodes uses `directory::replication`.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Result;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, Mutex};
use tracing::{info, warn};

use crate::{
    daemon::{Daemon, DirBackend},
    directory::{
        replication::Master,
        subscriptions::Event,
        tables::{names, Change, CompleteRoute, Entry, Heartbeats, Op, ServerRoute, Tables},
    },
    manager::ServiceKey,
    neighbor::NeighborTable,
};

/// A backend registering itself (or registered by a sidecar) with a lease.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Registration {
    pub service: ServiceKey,
    /// Instance name, unique within the service (default: the address and port).
    #[serde(default)]
    pub instance: Option<String>,
    pub address: IpAddr,
    pub port: u16,
    #[serde(default = "one")]
    pub weight: u32,
    /// The lease: without a renewal within this long, the backend is invalid.
    pub ttl_ms: u64,
}

fn one() -> u32 {
    1
}

impl Registration {
    pub fn instance(&self) -> String {
        self.instance.clone().unwrap_or_else(|| match self.address {
            IpAddr::V4(a) => format!("{a}:{}", self.port),
            IpAddr::V6(a) => format!("[{a}]:{}", self.port),
        })
    }

    pub fn value(&self) -> String {
        let host = match self.address {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        };
        format!("{host}:{};weight={}", self.port, self.weight)
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
            if identity.is_ipv4() != key.addr.is_ipv4() || via.is_ipv4() != key.addr.is_ipv4() {
                continue;
            }
            let weight = if e.valid { server.weight() } else { 0 };
            let b = backends
                .entry(identity)
                .or_insert(DirBackend { weight: 0, via });
            b.weight = b.weight.max(weight);
        }
        if !backends.is_empty() {
            out.insert(*key, backends);
        }
    }
    out
}

struct State {
    master: Master,
    heartbeats: Heartbeats,
    next_req: u64,
}

/// What the API holds of the directory.
#[derive(Clone)]
pub struct DirHandle {
    state: Arc<Mutex<State>>,
    daemon: Arc<Mutex<Daemon>>,
    neighbors: Arc<NeighborTable>,
    /// Every applied change with the row after it, for subscribers.
    pub changes: broadcast::Sender<(Change, Option<Entry>)>,
}

impl DirHandle {
    /// Applies local changes (through this node's master) and feeds the data plane.
    async fn commit(&self, changes: Vec<Change>) -> Result<usize> {
        let mut applied = Vec::new();
        {
            let mut s = self.state.lock().await;
            for change in changes {
                s.next_req += 1;
                let req = s.next_req;
                let before = s.master.version();
                s.master.submit_local(req, change.clone());
                if s.master.version() > before {
                    let row = s.master.tables().get(&change.table, &change.key);
                    applied.push((change, row));
                }
            }
        }
        let n = applied.len();
        for a in applied {
            let _ = self.changes.send(a);
        }
        if n > 0 {
            self.feed_dataplane().await?;
        }
        Ok(n)
    }

    async fn feed_dataplane(&self) -> Result<()> {
        let services = self.daemon.lock().await.service_keys();
        let backends = {
            let s = self.state.lock().await;
            backends_by_service(s.master.tables(), &services)
        };
        // Resolve new backends' MACs first, so they take traffic as soon as they are in.
        let unknown: Vec<IpAddr> = {
            let d = self.daemon.lock().await;
            let vias: std::collections::BTreeSet<IpAddr> = backends
                .values()
                .flat_map(|b| b.values().map(|x| x.via))
                .filter(|a| !d.knows_neighbor(*a))
                .collect();
            vias.into_iter().collect()
        };
        let mut found = BTreeMap::new();
        for addr in unknown {
            match self
                .neighbors
                .resolve(addr, Duration::from_millis(1500))
                .await
            {
                Ok(Some(n)) => {
                    found.insert(addr, n);
                }
                Ok(None) => warn!(%addr, "no MAC for a directory backend yet"),
                Err(e) => warn!(%addr, "resolving a directory backend: {e:#}"),
            }
        }
        if !found.is_empty() {
            self.daemon.lock().await.update_neighbors(found)?;
        }
        let touched = self.daemon.lock().await.set_directory(backends)?;
        if !touched.is_empty() {
            info!(services = ?touched.iter().map(|k| k.to_string()).collect::<Vec<_>>(), "directory changed backends");
        }
        Ok(())
    }

    pub async fn add(&self, table: &str, key: &str, value: &str, valid: bool) -> Result<usize> {
        self.commit(vec![Change {
            table: table.into(),
            key: key.into(),
            op: Op::Put {
                value: value.into(),
                valid,
            },
        }])
        .await
    }

    pub async fn delete(&self, table: &str, key: &str) -> Result<usize> {
        self.state.lock().await.heartbeats.forget(table, key);
        self.commit(vec![Change {
            table: table.into(),
            key: key.into(),
            op: Op::Delete,
        }])
        .await
    }

    /// A heartbeat: valid now, and expected again within `time_max`. Returns whether
    /// the entry exists.
    pub async fn heartbeat(&self, table: &str, key: &str, time_max: Duration) -> Result<bool> {
        let change = {
            let mut s = self.state.lock().await;
            if s.master.tables().get(table, key).is_none() {
                return Ok(false);
            }
            let State {
                master, heartbeats, ..
            } = &mut *s;
            heartbeats.beat(master.tables(), table, key, time_max, Instant::now())
        };
        if let Some(c) = change {
            self.commit(vec![c]).await?;
        }
        Ok(true)
    }

    /// Registers (or renews) a backend with its lease.
    pub async fn register(&self, r: &Registration) -> Result<()> {
        let table = names::service(&r.service.to_string());
        let key = r.instance();
        let current = self.state.lock().await.master.tables().get(&table, &key);
        if current.as_ref().map(|e| e.value.as_str()) != Some(r.value().as_str())
            || current.is_some_and(|e| !e.valid)
        {
            self.add(&table, &key, &r.value(), true).await?;
        }
        self.heartbeat(&table, &key, Duration::from_millis(r.ttl_ms))
            .await?;
        Ok(())
    }

    pub async fn search(&self, table: &str, prefix: &str) -> Vec<Entry> {
        self.state
            .lock()
            .await
            .master
            .tables()
            .search(table, prefix)
    }

    pub async fn find(&self, table: &str, prefix: &str) -> Vec<CompleteRoute> {
        self.state
            .lock()
            .await
            .master
            .tables()
            .find_server(table, prefix)
    }

    /// Matching events for a subscriber, from a broadcast receiver; `Resync` when the
    /// receiver fell behind.
    pub fn event_for(
        table: &str,
        prefix: &str,
        item: Result<(Change, Option<Entry>), broadcast::error::RecvError>,
    ) -> Option<Event> {
        match item {
            Ok((change, row)) => {
                if change.table != table || !change.key.starts_with(prefix) {
                    return None;
                }
                Some(match (&change.op, row) {
                    (Op::Delete, _) | (_, None) => Event::Delete {
                        table: change.table,
                        key: change.key,
                    },
                    (_, Some(row)) => Event::Add {
                        table: change.table,
                        key: change.key,
                        value: row.value,
                        valid: row.valid,
                    },
                })
            }
            Err(broadcast::error::RecvError::Lagged(_)) => Some(Event::Resync {
                table: table.to_string(),
            }),
            Err(broadcast::error::RecvError::Closed) => None,
        }
    }
}

/// Route monitoring: every host route is ARP-probed through `interface` every 300 ms;
/// two misses make it invalid (the next valid route becomes current), two answers
/// valid again.
pub fn monitor_routes(handle: DirHandle, interface: String, src: std::net::Ipv4Addr) {
    tokio::spawn(async move {
        let mut health: BTreeMap<String, crate::health::Health> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        loop {
            tick.tick().await;
            let routes = handle.search(names::HOST_ROUTES, "").await;
            let mut probes = Vec::new();
            for r in routes {
                let Ok(IpAddr::V4(target)) = r.value.parse::<IpAddr>() else {
                    continue;
                };
                let iface = interface.clone();
                probes.push((
                    r.key.clone(),
                    tokio::task::spawn_blocking(move || {
                        crate::vip::arp_probe(&iface, src, target, Duration::from_millis(200))
                    }),
                ));
            }
            for (key, probe) in probes {
                let ok = matches!(probe.await, Ok(Ok(Some(_))));
                let h = health.entry(key.clone()).or_default();
                if let Some(valid) = h.record(ok, 2, 2) {
                    info!(route = %key, valid, "host route probe verdict");
                    let change = Change {
                        table: names::HOST_ROUTES.into(),
                        key,
                        op: Op::Valid { valid },
                    };
                    if let Err(e) = handle.commit(vec![change]).await {
                        warn!("applying a route verdict: {e:#}");
                    }
                }
            }
        }
    });
}

/// Starts the directory (lease expiry every 50 ms) and returns its handle.
pub fn start(daemon: Arc<Mutex<Daemon>>, neighbors: Arc<NeighborTable>) -> DirHandle {
    let (changes, _) = broadcast::channel(1024);
    let handle = DirHandle {
        state: Arc::new(Mutex::new(State {
            master: Master::new(0, None),
            heartbeats: Heartbeats::default(),
            next_req: 0,
        })),
        daemon,
        neighbors,
        changes,
    };
    let h = handle.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        loop {
            tick.tick().await;
            let expired = {
                let mut s = h.state.lock().await;
                let State {
                    master, heartbeats, ..
                } = &mut *s;
                heartbeats.expire(master.tables(), Instant::now())
            };
            if !expired.is_empty() {
                for c in &expired {
                    info!(table = %c.table, key = %c.key, "lease expired: entry invalid");
                }
                if let Err(e) = h.commit(expired).await {
                    warn!("applying expired leases: {e:#}");
                }
            }
        }
    });
    handle
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "c has no route, d is of the other family"
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
                via: ip("198.18.0.13")
            }
        );
        t.set_valid(names::HOST_ROUTES, &host_route_key("b3host", 0), false);
        let moved = backends_by_service(&t, &[key]);
        assert_eq!(moved[&key].len(), 1);
        assert_eq!(
            moved[&key][&ip("198.18.0.13")],
            DirBackend {
                weight: 1,
                via: ip("198.18.0.23")
            }
        );
        t.set_valid(names::HOST_ROUTES, &host_route_key("b3host", 1), false);
        assert!(
            backends_by_service(&t, &[key]).is_empty(),
            "no valid route: unreachable"
        );
    }
}
