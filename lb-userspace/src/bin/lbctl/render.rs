//! How lbctl prints the API's typed answers for people (`-o human`); `-o json` prints
//! the answers themselves.

use lb_userspace::{
    api::{self, Applied, ClusterView, EventRecord},
    directory::tables::{CompleteRoute, Entry},
    spm::Spm,
};
use serde::Serialize;

pub fn json<T: Serialize>(v: &T) {
    println!(
        "{}",
        serde_json::to_string_pretty(v).expect("API types serialize")
    );
}

/// Columns aligned on the widest cell.
pub fn table(rows: Vec<Vec<String>>) {
    let widths: Vec<usize> = (0..rows[0].len())
        .map(|c| rows.iter().map(|r| r[c].len()).max().unwrap_or(0))
        .collect();
    for r in rows {
        let line: Vec<String> = r
            .iter()
            .zip(&widths)
            .map(|(v, w)| format!("{v:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn header(names: &[&str]) -> Vec<Vec<String>> {
    vec![names.iter().map(|n| n.to_string()).collect()]
}

pub fn applied(a: &Applied) {
    if a.changes.is_empty() {
        println!("no changes");
    }
    for c in &a.changes {
        println!("{c}");
    }
    if a.dry_run && !a.changes.is_empty() {
        println!("(dry run: nothing was changed)");
    }
}

pub fn reloaded(r: &api::Reloaded) {
    println!("reloaded {}", r.file);
    if !r.services_applied {
        println!(
            "services not applied: they are the cluster's{}; `lbctl apply -f {}` changes them everywhere",
            if r.services_differ_from_cluster {
                " and differ from the file's"
            } else {
                ""
            },
            r.file
        );
    } else if r.changes.is_empty() {
        println!("no changes to the services");
    }
    for c in &r.changes {
        println!("{c}");
    }
    for section in &r.restart_needed {
        println!("{section} changed: takes effect at the next restart");
    }
}

pub fn status(s: &api::Status) {
    println!("node        {} (lbd {}, API {})", s.node, s.version, s.api);
    println!(
        "uptime      {} s{}",
        s.uptime_seconds,
        if s.resumed {
            ", resumed a running data plane"
        } else {
            ""
        }
    );
    for i in &s.interfaces {
        println!("interface   {} (XDP {}, {})", i.name, i.xdp_mode, i.attach);
        if let Some(w) = &i.warning {
            println!("  warning   {w}");
        }
        if let Some(n) = i.xdp_tx_errors.filter(|n| *n > 0) {
            println!("  dropped   {n} frames XDP transmitted (the driver's xdp_tx_errors)");
        }
    }
    println!("services    {}", s.services);
    println!(
        "backends    {} ({} unresolved)",
        s.backends, s.unresolved_backends
    );
    println!(
        "connections {} (IPv6 {})",
        s.conn_table_entries, s.conn_table_entries_v6
    );
    println!("metrics     {}", s.metrics);
    if s.ready {
        println!("ready       yes");
    } else {
        println!("ready       NO: takes no VIP until its start-up sync is done");
        for w in &s.waiting_for {
            println!("  waiting   {w}");
        }
    }
    if !s.rejected.is_empty() {
        let r: Vec<String> = s.rejected.iter().map(|(k, n)| format!("{k} {n}")).collect();
        println!("refused     {}", r.join(", "));
    }
}

pub fn services(services: &[api::ServiceView]) {
    let mut rows = header(&[
        "SERVICE", "BACKENDS", "FORWARD", "MAGLEV", "PACKETS", "BYTES",
    ]);
    for s in services {
        rows.push(vec![
            s.service.clone(),
            s.backend_count.max(s.backends.len()).to_string(),
            s.config.forward.to_string(),
            s.config.maglev_size.to_string(),
            s.packets.to_string(),
            s.bytes.to_string(),
        ]);
    }
    table(rows);
}

pub fn backends(s: &api::ServiceView) {
    let mut rows = header(&[
        "BACKEND",
        "WEIGHT",
        "STATE",
        "MAC",
        "PACKETS",
        "BYTES",
        "WATER MARKS",
    ]);
    for b in &s.backends {
        let state = match (b.drain, &b.mac) {
            (_, None) => "unresolved",
            _ if !b.healthy => "unhealthy",
            (true, _) => "draining",
            (false, _) => "active",
        };
        rows.push(vec![
            b.address.to_string(),
            b.weight.to_string(),
            state.into(),
            b.mac.clone().unwrap_or_else(|| "-".into()),
            b.packets.to_string(),
            b.bytes.to_string(),
            b.steering.clone().unwrap_or_else(|| "-".into()),
        ]);
    }
    table(rows);
}

pub fn service(s: &api::ServiceView) {
    println!(
        "{}  maglev {}  pass_irregular {}  packets {}  bytes {}",
        s.service, s.config.maglev_size, s.config.pass_irregular, s.packets, s.bytes
    );
    println!(
        "  spm: rule {:?}, epoch {} ({:?}; old connections {}){}",
        s.spm.rule,
        s.config.epoch,
        s.spm.epoch_policy,
        if s.config.epoch_resteer {
            "re-steered"
        } else {
            "kept"
        },
        if s.spm.redirect { ", re-director" } else { "" }
    );
    if let Some(u) = &s.unavailable {
        let back = u
            .expected_up_ms
            .map(|t| format!(", expected back at {t} (Unix ms)"))
            .unwrap_or_default();
        println!("  UNAVAILABLE: {:?}, by {}{back}", u.reason, u.operator);
    }
    for (net, prefix, sphere) in &s.spm.topology {
        println!("  clients in {net}/{prefix} -> sphere {sphere}");
    }
    backends(s);
}

pub fn stats(s: &api::Stats) {
    services(&s.services);
    println!();
    let nonzero: Vec<String> = s
        .global
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(n, v)| format!("{n} {v}"))
        .collect();
    println!(
        "data plane: {}",
        if nonzero.is_empty() {
            "no packets yet".into()
        } else {
            nonzero.join(", ")
        }
    );
    println!(
        "connections: {} (IPv6 {})",
        s.conn_table_entries, s.conn_table_entries_v6
    );
}

/// Per-second rates between two snapshots taken `secs` apart: each service's packets
/// and bytes, and the data plane's counters that moved. A counter that went down
/// (lbd restarted without its maps) counts from zero.
pub fn stats_rates(prev: &api::Stats, now: &api::Stats, secs: f64) -> Rates {
    let per_second = |a: u64, b: u64| (b.checked_sub(a).unwrap_or(b)) as f64 / secs.max(1e-3);
    // By key, not a search per service: 10,000 services would be 10^8 comparisons.
    let before: std::collections::HashMap<&str, &api::ServiceView> = prev
        .services
        .iter()
        .map(|p| (p.service.as_str(), p))
        .collect();
    let services = now
        .services
        .iter()
        .map(|s| {
            let before = before.get(s.service.as_str());
            (
                s.service.clone(),
                per_second(before.map_or(0, |p| p.packets), s.packets),
                per_second(before.map_or(0, |p| p.bytes), s.bytes),
            )
        })
        .collect();
    let global = now
        .global
        .iter()
        .filter_map(|(name, v)| {
            let before = prev
                .global
                .iter()
                .find(|(n, _)| n == name)
                .map_or(0, |(_, v)| *v);
            let r = per_second(before, *v);
            (r > 0.0).then(|| (name.clone(), r))
        })
        .collect();
    Rates { services, global }
}

pub struct Rates {
    /// (service, packets/s, bytes/s)
    pub services: Vec<(String, f64, f64)>,
    /// Data-plane counters that moved, per second.
    pub global: Vec<(String, f64)>,
}

pub fn rates(r: &Rates, secs: f64) {
    let mut rows = header(&["SERVICE", "PACKETS/S", "BITS/S"]);
    for (service, pps, bps) in &r.services {
        rows.push(vec![
            service.clone(),
            format!("{pps:.0}"),
            format!("{:.0}", bps * 8.0),
        ]);
    }
    table(rows);
    let moved: Vec<String> = r
        .global
        .iter()
        .map(|(n, v)| format!("{n} {v:.0}/s"))
        .collect();
    println!(
        "data plane, per second over the last {secs:.1} s: {}",
        if moved.is_empty() {
            "nothing".into()
        } else {
            moved.join(", ")
        }
    );
}

pub fn cluster(c: &ClusterView) {
    let mut rows = header(&[
        "NODE",
        "ROLE",
        "OK",
        "QUIESCED",
        "AGE",
        "DIRECTORY",
        "PREFERS",
        "SERVES",
    ]);
    let list = |v: Vec<String>| {
        if v.is_empty() {
            "-".to_string()
        } else {
            v.join(",")
        }
    };
    for h in &c.hosts {
        let role = match (h.leader, h.me) {
            (true, true) => "leader (me)",
            (true, false) => "leader",
            (false, true) => "me",
            (false, false) => "",
        };
        rows.push(vec![
            h.info.id.to_string(),
            role.into(),
            match (h.info.ok, h.info.ready) {
                (true, true) => "yes",
                (false, _) => "NO",
                (true, false) => "syncing",
            }
            .into(),
            match (h.info.quiesce, h.info.leaving) {
                (_, true) => "leaving",
                (true, false) => "yes",
                (false, false) => "no",
            }
            .into(),
            format!("{} ms", h.age_ms),
            // Equal versions with different digests would be replicas that diverged.
            format!(
                "{}v{} #{:04x}",
                match (h.info.dir_master, h.info.dir_backup_of) {
                    (true, _) => "master ".to_string(),
                    (false, Some(of)) => format!("backup of {of} "),
                    (false, None) => String::new(),
                },
                h.info.dir_version,
                h.info.dir_digest & 0xffff
            ),
            list(h.info.preferred.iter().map(|a| a.to_string()).collect()),
            list(
                h.info
                    .serving
                    .iter()
                    .map(|(a, s)| format!("{a} ({})", format!("{s:?}").to_lowercase()))
                    .collect(),
            ),
        ]);
    }
    table(rows);
    if !c.quorate {
        println!("NO QUORUM: this node sees too few nodes (cluster.quorum) and serves no VIP");
    }
    if !c.mismatched.is_empty() {
        let m: Vec<String> = c.mismatched.iter().map(|a| a.to_string()).collect();
        println!(
            "tables differ from the owner's for: {} (this node will not take them)",
            m.join(", ")
        );
    }
    let rejected: Vec<String> = c
        .rejected
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(r, n)| format!("{r} {n}"))
        .collect();
    if !rejected.is_empty() {
        println!("rejected messages: {}", rejected.join(", "));
    }
}

/// One event: time, node, kind, then its fields.
pub fn event(e: &EventRecord) {
    let mut fields = serde_json::to_value(&e.event)
        .ok()
        .and_then(|v| v.as_object().cloned())
        .unwrap_or_default();
    let kind = fields
        .remove("event")
        .and_then(|k| k.as_str().map(str::to_string))
        .unwrap_or_default();
    let rest: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{k}={}", v.to_string().trim_matches('"')))
        .collect();
    println!("{} {} {kind} {}", e.at_ms, e.node, rest.join(" "));
}

pub fn spm(map: &Spm) {
    println!("SPM version {} type {}", map.version, map.map_type);
    let mut rows = header(&["SERVICE", "EPOCH", "HOST", "BACKUPS"]);
    for e in &map.entries {
        let svc = e
            .spec
            .as_ref()
            .or(map.spec.as_ref())
            .map_or("-", |s| s.service_id.as_str());
        let epoch = e
            .sphere
            .as_ref()
            .or(map.sphere.as_ref())
            .map_or(0, |s| s.epoch);
        let backups: Vec<String> = e
            .backups
            .iter()
            .map(|b| format!("{}:{}", b.inet_address, b.port))
            .collect();
        rows.push(vec![
            svc.to_string(),
            epoch.to_string(),
            format!("{}:{}", e.host.inet_address, e.host.port),
            if backups.is_empty() {
                "-".into()
            } else {
                backups.join(",")
            },
        ]);
    }
    table(rows);
}

/// One version of a watched map on one line.
pub fn spm_line(map: &Spm) {
    let entries: Vec<String> = map
        .entries
        .iter()
        .map(|e| {
            format!(
                "{}@{}={}:{}",
                e.spec.as_ref().map_or("-", |s| s.service_id.as_str()),
                e.sphere.as_ref().map_or(0, |s| s.epoch),
                e.host.inet_address,
                e.host.port
            )
        })
        .collect();
    println!("version {}: {}", map.version, entries.join(" "));
}

pub fn rows(rows: &[Entry]) {
    let mut t = header(&["KEY", "VALUE", "VALID"]);
    for r in rows {
        t.push(vec![
            r.key.clone(),
            r.value.clone(),
            if r.valid { "1" } else { "0" }.into(),
        ]);
    }
    table(t);
}

pub fn routes(routes: &[CompleteRoute]) {
    for r in routes {
        println!("{} {}:{}", r.instance, r.address, r.server.port);
    }
}

#[cfg(test)]
mod tests {
    use lb_userspace::api;

    fn stats(global: &[(&str, u64)]) -> api::Stats {
        api::Stats {
            services: Vec::new(),
            global: global.iter().map(|(n, v)| (n.to_string(), *v)).collect(),
            conn_table_entries: 0,
            conn_table_entries_v6: 0,
        }
    }

    #[test]
    fn watch_rates_are_per_second_differences_and_a_reset_counts_from_zero() {
        let r = super::stats_rates(
            &stats(&[("tx", 100), ("pass_not_vip", 500), ("drop_malformed", 7)]),
            &stats(&[("tx", 400), ("pass_not_vip", 50), ("drop_malformed", 7)]),
            2.0,
        );
        assert_eq!(
            r.global,
            [
                ("tx".to_string(), 150.0),
                ("pass_not_vip".to_string(), 25.0)
            ]
        );
    }
}
