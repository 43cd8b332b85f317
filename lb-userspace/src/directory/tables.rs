//! The directory's relational tables (the DSD seed, Figs. 2A–2F): every table holds
//! (key, value, valid) rows under string keys; a translation table maps symbolic table
//! names to ids. The operations of the seed's agent interface live here as plain
//! functions of the tables: add (also: change), delete, key-prefix search, find-server,
//! heartbeat with Time_Max and its expiry. Every mutation returns the `Change` it made,
//! which is what replication ships and subscriptions filter.

use std::{
    collections::BTreeMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

pub type TableId = u32;

/// Names of the tables lbd uses. A service's instances live in `svc.<service>`.
pub mod names {
    pub const HOST_ROUTES: &str = "host_routes";
    pub const PARTITIONS: &str = "partitions";
    pub const AGENTS: &str = "agents";
    /// Leases (registrations, heartbeats): `<table>|<key>` → `<ttl_ms>;<renewal>`.
    pub const LEASES: &str = "leases";
    /// The SPM manager's epoch record per service (key: the service, `tcp/addr:port`).
    pub const SPM: &str = "spm";
    /// Operator epoch bumps per service: a count the SPM manager folds in.
    pub const SPM_BUMPS: &str = "spm_bumps";
    /// The cluster's desired services (what operators set through any node's API),
    /// one row keyed [`DESIRED_KEY`]: JSON of `desired::Desired`. Every node applies it.
    pub const DESIRED: &str = "desired";
    pub const DESIRED_KEY: &str = "services";
    pub fn service(service: &str) -> String {
        format!("svc.{service}")
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub key: String,
    pub value: String,
    pub valid: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum Op {
    /// Adds the row or replaces its value and validity.
    Put {
        value: String,
        valid: bool,
    },
    Delete,
    /// Only the validity changes (heartbeat, expiry, health checks, route probes).
    Valid {
        valid: bool,
    },
}

/// One mutation of one row, in the form replication and subscriptions carry it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Change {
    pub table: String,
    pub key: String,
    pub op: Op,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Row {
    value: String,
    valid: bool,
}

/// A server route as a service instance's value carries it: `host:port`, then optional
/// `;name=value` attributes (`weight`, `capacity`, anything else is metadata).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServerRoute {
    pub host: String,
    pub port: u16,
    pub attributes: BTreeMap<String, String>,
}

impl ServerRoute {
    pub fn parse(value: &str) -> Option<ServerRoute> {
        let mut parts = value.split(';');
        let hostport = parts.next()?;
        let (host, port) = hostport.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() {
            return None;
        }
        let attributes = parts
            .filter(|p| !p.is_empty())
            .map(|p| match p.split_once('=') {
                Some((k, v)) => (k.to_string(), v.to_string()),
                None => (p.to_string(), String::new()),
            })
            .collect();
        Some(ServerRoute {
            host: host.to_string(),
            port: port.parse().ok()?,
            attributes,
        })
    }

    pub fn weight(&self) -> u32 {
        self.attributes
            .get("weight")
            .and_then(|w| w.parse().ok())
            .unwrap_or(1)
    }
}

/// A server instance with the route to reach it: what find-server returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompleteRoute {
    /// The instance's key (e.g. `web.3`).
    pub instance: String,
    pub server: ServerRoute,
    /// The current network route to the host: its lowest-numbered valid host route,
    /// or the host itself when it is an address.
    pub address: IpAddr,
    /// Order number of the host route used (0 when the host is an address).
    pub route_order: u32,
}

/// Host-route keys are `<host>#<order>`; the lowest valid order is current.
pub fn host_route_key(host: &str, order: u32) -> String {
    format!("{host}#{order}")
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tables {
    /// The translation table: symbolic name → id.
    ids: BTreeMap<String, TableId>,
    rows: BTreeMap<TableId, BTreeMap<String, Row>>,
    /// The content digest (see [`Tables::digest`]), kept up to date by `apply`.
    #[serde(skip)]
    digest: u64,
}

/// One row's part of the digest: FNV-1a over the table name, key, value and validity
/// (stable across builds, unlike std's hasher, since nodes compare digests).
fn row_hash(table: &str, key: &str, row: &Row) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for part in [
        table.as_bytes(),
        b"\0",
        key.as_bytes(),
        b"\0",
        row.value.as_bytes(),
    ] {
        for b in part {
            h ^= u64::from(*b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h ^= u64::from(row.valid);
    h.wrapping_mul(0x0100_0000_01b3)
}

impl Tables {
    /// A digest of the content (every table's rows, whatever order they came in):
    /// equal content, equal digest on every node. The rows' hashes are summed, so that
    /// one change updates it in constant time.
    pub fn digest(&self) -> u64 {
        self.digest
    }

    /// How many rows all tables hold.
    pub fn len(&self) -> usize {
        self.rows.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The id of a table, creating it on first use.
    pub fn table_id(&mut self, name: &str) -> TableId {
        if let Some(id) = self.ids.get(name) {
            return *id;
        }
        let id = self.ids.len() as TableId;
        self.ids.insert(name.to_string(), id);
        self.rows.insert(id, BTreeMap::new());
        id
    }

    pub fn lookup_id(&self, name: &str) -> Option<TableId> {
        self.ids.get(name).copied()
    }

    pub fn table_names(&self) -> impl Iterator<Item = &str> {
        self.ids.keys().map(String::as_str)
    }

    /// Applies a change; returns it if it changed anything (replaying a change is a
    /// no-op, which makes resends harmless).
    pub fn apply(&mut self, change: &Change) -> Option<Change> {
        let id = self.table_id(&change.table);
        let table = self.rows.get_mut(&id).expect("created with its id");
        let before = table.get(&change.key).cloned();
        match &change.op {
            Op::Put { value, valid } => {
                let row = Row {
                    value: value.clone(),
                    valid: *valid,
                };
                table.insert(change.key.clone(), row);
            }
            Op::Delete => {
                table.remove(&change.key);
            }
            Op::Valid { valid } => {
                if let Some(row) = table.get_mut(&change.key) {
                    row.valid = *valid;
                }
            }
        }
        let after = table.get(&change.key);
        if before.as_ref() == after {
            return None;
        }
        let hash = |r: Option<&Row>| r.map_or(0, |r| row_hash(&change.table, &change.key, r));
        self.digest = self
            .digest
            .wrapping_sub(hash(before.as_ref()))
            .wrapping_add(hash(after));
        Some(change.clone())
    }

    pub fn add(&mut self, table: &str, key: &str, value: &str, valid: bool) -> Option<Change> {
        self.apply(&Change {
            table: table.to_string(),
            key: key.to_string(),
            op: Op::Put {
                value: value.to_string(),
                valid,
            },
        })
    }

    pub fn delete(&mut self, table: &str, key: &str) -> Option<Change> {
        self.apply(&Change {
            table: table.to_string(),
            key: key.to_string(),
            op: Op::Delete,
        })
    }

    pub fn set_valid(&mut self, table: &str, key: &str, valid: bool) -> Option<Change> {
        self.apply(&Change {
            table: table.to_string(),
            key: key.to_string(),
            op: Op::Valid { valid },
        })
    }

    pub fn get(&self, table: &str, key: &str) -> Option<Entry> {
        let row = self.rows.get(self.ids.get(table)?)?.get(key)?;
        Some(Entry {
            key: key.to_string(),
            value: row.value.clone(),
            valid: row.valid,
        })
    }

    /// Every row whose key starts with `prefix` (all rows for ""), in key order, valid
    /// or not. An unknown table has no rows.
    pub fn search(&self, table: &str, prefix: &str) -> Vec<Entry> {
        let Some(rows) = self.ids.get(table).and_then(|id| self.rows.get(id)) else {
            return Vec::new();
        };
        rows.range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, r)| Entry {
                key: k.clone(),
                value: r.value.clone(),
                valid: r.valid,
            })
            .collect()
    }

    /// The current route to `host`: its lowest-numbered valid host route; an address
    /// is its own route.
    pub fn host_route(&self, host: &str) -> Option<(IpAddr, u32)> {
        if let Ok(addr) = host.parse::<IpAddr>() {
            return Some((addr, 0));
        }
        self.search(names::HOST_ROUTES, &format!("{host}#"))
            .into_iter()
            .filter(|e| e.valid)
            .filter_map(|e| {
                let order: u32 = e.key.rsplit_once('#')?.1.parse().ok()?;
                Some((e.value.parse::<IpAddr>().ok()?, order))
            })
            .min_by_key(|(_, order)| *order)
    }

    /// Find-server (the seed's Fig. 5B): the valid instances of `server_table` whose key
    /// starts with `prefix`, each with the current route to its host. Instances whose
    /// host has no valid route are left out.
    pub fn find_server(&self, server_table: &str, prefix: &str) -> Vec<CompleteRoute> {
        self.search(server_table, prefix)
            .into_iter()
            .filter(|e| e.valid)
            .filter_map(|e| {
                let server = ServerRoute::parse(&e.value)?;
                let (address, route_order) = self.host_route(&server.host)?;
                Some(CompleteRoute {
                    instance: e.key,
                    server,
                    address,
                    route_order,
                })
            })
            .collect()
    }

    /// Partition lookup: a direct entry for the partition, else the indirect rule
    /// `mod/<m>` whose value names the table of `<n mod m>` entries.
    pub fn partition(&self, partition: u64) -> Option<String> {
        if let Some(e) = self
            .get(names::PARTITIONS, &partition.to_string())
            .filter(|e| e.valid)
        {
            return Some(e.value);
        }
        self.search(names::PARTITIONS, "mod/")
            .into_iter()
            .filter(|e| e.valid)
            .find_map(|rule| {
                let m: u64 = rule
                    .key
                    .strip_prefix("mod/")?
                    .parse()
                    .ok()
                    .filter(|m| *m > 0)?;
                self.get(&rule.value, &(partition % m).to_string())
                    .filter(|e| e.valid)
                    .map(|e| e.value)
            })
    }

    /// The tables a snapshot holds (`snapshot`'s inverse).
    pub fn from_snapshot(rows: &[Change]) -> Tables {
        let mut t = Tables::default();
        for r in rows {
            t.apply(r);
        }
        t
    }

    /// Every row as changes: the snapshot an agent resyncs from.
    pub fn snapshot(&self) -> Vec<Change> {
        let mut out = Vec::new();
        for (name, id) in &self.ids {
            for (key, row) in &self.rows[id] {
                out.push(Change {
                    table: name.clone(),
                    key: key.clone(),
                    op: Op::Put {
                        value: row.value.clone(),
                        valid: row.valid,
                    },
                });
            }
        }
        out
    }
}

/// Heartbeat deadlines (the seed's Fig. 5C): a heartbeat marks the entry valid and
/// expects the next one within Time_Max; `expire` invalidates the late ones.
#[derive(Clone, Debug, Default)]
pub struct Heartbeats {
    deadlines: BTreeMap<(String, String), Instant>,
}

impl Heartbeats {
    /// Records a heartbeat; returns the change that marks the entry valid, if it is
    /// not (for the caller to apply). An entry that does not exist is not created:
    /// register it first.
    pub fn beat(
        &mut self,
        tables: &Tables,
        table: &str,
        key: &str,
        time_max: Duration,
        now: Instant,
    ) -> Option<Change> {
        let entry = tables.get(table, key)?;
        self.deadlines
            .insert((table.to_string(), key.to_string()), now + time_max);
        (!entry.valid).then(|| Change {
            table: table.to_string(),
            key: key.to_string(),
            op: Op::Valid { valid: true },
        })
    }

    /// Expects the next heartbeat before `deadline` (a registration with a lease).
    pub fn expect(&mut self, table: &str, key: &str, deadline: Instant) {
        self.deadlines
            .insert((table.to_string(), key.to_string()), deadline);
    }

    /// Stops expecting heartbeats for an entry (it was deleted).
    pub fn forget(&mut self, table: &str, key: &str) {
        self.deadlines.remove(&(table.to_string(), key.to_string()));
    }

    /// The changes that invalidate every entry whose Time_Max has passed (for the
    /// caller to apply).
    pub fn expire(&mut self, tables: &Tables, now: Instant) -> Vec<Change> {
        let late: Vec<(String, String)> = self
            .deadlines
            .iter()
            .filter(|(_, deadline)| now >= **deadline)
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for (table, key) in late {
            self.deadlines.remove(&(table.clone(), key.clone()));
            if tables.get(&table, &key).is_some_and(|e| e.valid) {
                out.push(Change {
                    table,
                    key,
                    op: Op::Valid { valid: false },
                });
            }
        }
        out
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.deadlines.values().min().copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn directory() -> Tables {
        let mut t = Tables::default();
        t.add("svc.web", "web.1", "host1:8080;weight=2", true);
        t.add("svc.web", "web.2", "host2:8080", true);
        t.add("svc.web", "web.3", "198.18.0.13:8080", false);
        t.add("svc.webadmin", "webadmin.1", "host1:9000", true);
        t.add(
            names::HOST_ROUTES,
            &host_route_key("host1", 0),
            "198.18.0.11",
            false,
        );
        t.add(
            names::HOST_ROUTES,
            &host_route_key("host1", 1),
            "198.18.1.11",
            true,
        );
        t.add(
            names::HOST_ROUTES,
            &host_route_key("host2", 0),
            "198.18.0.12",
            true,
        );
        t
    }

    #[test]
    fn tables_get_ids_from_the_translation_table() {
        let mut t = Tables::default();
        let a = t.table_id("svc.web");
        let b = t.table_id("host_routes");
        assert_ne!(a, b);
        assert_eq!(t.table_id("svc.web"), a);
        assert_eq!(t.lookup_id("nope"), None);
    }

    #[test]
    fn add_changes_delete_removes_and_repeats_change_nothing() {
        let mut t = Tables::default();
        assert!(t.add("s", "k", "v1", true).is_some());
        assert!(
            t.add("s", "k", "v1", true).is_none(),
            "the same row again is no change"
        );
        assert!(t.add("s", "k", "v2", true).is_some());
        assert_eq!(t.get("s", "k").unwrap().value, "v2");
        assert!(t.set_valid("s", "k", false).is_some());
        assert!(t.set_valid("s", "k", false).is_none());
        assert!(t.delete("s", "k").is_some());
        assert!(t.delete("s", "k").is_none());
        assert!(
            t.set_valid("s", "k", true).is_none(),
            "validity of a missing row"
        );
    }

    #[test]
    fn prefix_search_matches_leading_characters_and_empty_means_all() {
        let t = directory();
        let keys = |v: Vec<Entry>| v.into_iter().map(|e| e.key).collect::<Vec<_>>();
        assert_eq!(
            keys(t.search("svc.web", "web.")),
            ["web.1", "web.2", "web.3"]
        );
        assert_eq!(keys(t.search("svc.web", "web.2")), ["web.2"]);
        assert_eq!(keys(t.search("svc.web", "")).len(), 3);
        assert!(t.search("svc.web", "x").is_empty());
        assert!(t.search("no.such.table", "").is_empty());
    }

    #[test]
    fn find_server_uses_the_lowest_valid_host_route_and_skips_invalid_instances() {
        let mut t = directory();
        let found = t.find_server("svc.web", "web.");
        assert_eq!(found.len(), 2, "web.3 is invalid: {found:?}");
        assert_eq!(found[0].instance, "web.1");
        assert_eq!(
            found[0].address,
            "198.18.1.11".parse::<IpAddr>().unwrap(),
            "route 0 of host1 is invalid"
        );
        assert_eq!(found[0].route_order, 1);
        assert_eq!(found[0].server.weight(), 2);
        assert_eq!(found[1].address, "198.18.0.12".parse::<IpAddr>().unwrap());
        // host1's first route comes back: it is current again.
        t.set_valid(names::HOST_ROUTES, &host_route_key("host1", 0), true);
        assert_eq!(t.find_server("svc.web", "web.1")[0].route_order, 0);
        // No valid route at all: the instance cannot be reached.
        t.set_valid(names::HOST_ROUTES, &host_route_key("host2", 0), false);
        assert!(t.find_server("svc.web", "web.2").is_empty());
        // A host given as an address needs no route.
        t.set_valid("svc.web", "web.3", true);
        assert_eq!(
            t.find_server("svc.web", "web.3")[0].address,
            "198.18.0.13".parse::<IpAddr>().unwrap()
        );
    }

    #[test]
    fn server_routes_parse_with_attributes() {
        let r = ServerRoute::parse("[2001:db8::5]:443;weight=7;zone=a").unwrap();
        assert_eq!(
            (r.host.as_str(), r.port, r.weight()),
            ("2001:db8::5", 443, 7)
        );
        assert_eq!(r.attributes["zone"], "a");
        assert!(ServerRoute::parse("host").is_none());
        assert!(ServerRoute::parse(":80").is_none());
        assert!(ServerRoute::parse("h:99999").is_none());
    }

    #[test]
    fn partitions_resolve_directly_then_by_modulus() {
        let mut t = Tables::default();
        t.add(names::PARTITIONS, "7", "MDS.2", true);
        t.add(names::PARTITIONS, "mod/4", "partitions.mod4", true);
        t.add("partitions.mod4", "1", "MDS.1", true);
        t.add("partitions.mod4", "3", "MDS.3", true);
        assert_eq!(t.partition(7).as_deref(), Some("MDS.2"));
        assert_eq!(t.partition(9).as_deref(), Some("MDS.1"));
        assert_eq!(t.partition(11).as_deref(), Some("MDS.3"));
        assert_eq!(t.partition(8), None);
    }

    #[test]
    fn a_missed_time_max_invalidates_and_a_heartbeat_revalidates() {
        let mut t = directory();
        let mut hb = Heartbeats::default();
        let t0 = Instant::now();
        let max = Duration::from_secs(2);
        assert!(
            hb.beat(&t, "svc.web", "web.1", max, t0).is_none(),
            "already valid"
        );
        assert!(hb.beat(&t, "svc.web", "nope", max, t0).is_none());
        assert!(hb.expire(&t, t0 + Duration::from_millis(1999)).is_empty());
        hb.beat(&t, "svc.web", "web.1", max, t0 + Duration::from_secs(1));
        assert!(
            hb.expire(&t, t0 + Duration::from_millis(2999)).is_empty(),
            "renewed"
        );
        let expired = hb.expire(&t, t0 + Duration::from_secs(3));
        assert_eq!(expired.len(), 1);
        t.apply(&expired[0]);
        assert!(!t.get("svc.web", "web.1").unwrap().valid);
        let back = hb.beat(&t, "svc.web", "web.1", max, t0 + Duration::from_secs(4));
        assert_eq!(back.map(|c| c.op), Some(Op::Valid { valid: true }));
    }

    #[test]
    fn a_snapshot_rebuilds_the_same_tables() {
        let t = directory();
        let mut copy = Tables::default();
        for c in t.snapshot() {
            copy.apply(&c);
        }
        for name in t.table_names() {
            assert_eq!(copy.search(name, ""), t.search(name, ""));
        }
        assert_eq!(copy.digest(), t.digest(), "same rows, same digest");
    }

    #[test]
    fn the_digest_follows_the_content_not_the_order_or_the_history() {
        let mut a = Tables::default();
        a.add("svc.x", "1", "198.18.0.11:80", true);
        a.add("svc.x", "2", "198.18.0.12:80", true);
        a.add("other", "k", "v", true);
        let mut b = Tables::default();
        b.add("other", "k", "v", true);
        b.add("svc.x", "2", "198.18.0.12:80", false);
        b.add("svc.x", "3", "gone:80", true);
        b.add("svc.x", "1", "198.18.0.11:80", true);
        assert_ne!(a.digest(), b.digest(), "2 is invalid and 3 is extra in b");
        b.set_valid("svc.x", "2", true);
        b.delete("svc.x", "3");
        assert_eq!(a.digest(), b.digest());
        b.delete("other", "k");
        assert_ne!(a.digest(), b.digest());
        assert_eq!(Tables::default().digest(), 0);
    }
}
