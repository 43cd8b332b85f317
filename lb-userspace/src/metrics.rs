//! Prometheus text exposition of the daemon's figures. Pure: takes the same views the
//! API returns.

use std::fmt::Write;

use crate::api::{ClusterView, Stats, Status};

fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(status: &Status, stats: &Stats, cluster: Option<&ClusterView>) -> String {
    let mut out = String::new();
    family(&mut out, "lb_up", "gauge", "1 while the daemon serves.");
    let _ = writeln!(out, "lb_up{{node=\"{}\"}} 1", escape(&status.node));
    family(
        &mut out,
        "lb_node_info",
        "gauge",
        "Always 1; the node's name as a label, to join onto the other series.",
    );
    let _ = writeln!(out, "lb_node_info{{node=\"{}\"}} 1", escape(&status.node));
    family(
        &mut out,
        "lb_build_info",
        "gauge",
        "Always 1; the running build's version and commit as labels.",
    );
    let _ = writeln!(
        out,
        "lb_build_info{{version=\"{}\",commit=\"{}\"}} 1",
        escape(&status.version),
        crate::COMMIT
    );
    family(
        &mut out,
        "lb_uptime_seconds",
        "gauge",
        "Seconds since the daemon started.",
    );
    let _ = writeln!(out, "lb_uptime_seconds {}", status.uptime_seconds);
    family(
        &mut out,
        "lb_resumed",
        "gauge",
        "1 if this run took over a pinned data plane (hitless restart).",
    );
    let _ = writeln!(out, "lb_resumed {}", u8::from(status.resumed));
    family(
        &mut out,
        "lb_backends_unresolved",
        "gauge",
        "Backends without a known MAC (they get no traffic).",
    );
    let _ = writeln!(out, "lb_backends_unresolved {}", status.unresolved_backends);
    family(
        &mut out,
        "lb_interface_xdp_tx_errors_total",
        "counter",
        "Frames XDP transmitted that the driver dropped (veth without an XDP program on its peer), where the driver counts them.",
    );
    for i in &status.interfaces {
        if let Some(n) = i.xdp_tx_errors {
            let _ = writeln!(
                out,
                "lb_interface_xdp_tx_errors_total{{interface=\"{}\"}} {n}",
                escape(&i.name)
            );
        }
    }
    family(
        &mut out,
        "lb_conn_table_entries",
        "gauge",
        "Entries in the connection table.",
    );
    let _ = writeln!(out, "lb_conn_table_entries {}", stats.conn_table_entries);
    family(
        &mut out,
        "lb_conn_table_family_entries",
        "gauge",
        "Entries in each family's connection table (sized by conn_table_size and conn_table_size_v6).",
    );
    let v6 = stats.conn_table_entries_v6;
    let _ = writeln!(
        out,
        "lb_conn_table_family_entries{{family=\"ipv4\"}} {}",
        stats.conn_table_entries.saturating_sub(v6)
    );
    let _ = writeln!(out, "lb_conn_table_family_entries{{family=\"ipv6\"}} {v6}");

    family(
        &mut out,
        "lb_peer_requests_rejected_total",
        "counter",
        "Requests refused on the peer and registry ports, by port and reason (bad_mac: not signed with the key).",
    );
    for (what, n) in &status.rejected {
        let (port, reason) = what.split_once('/').unwrap_or((what, ""));
        let _ = writeln!(
            out,
            "lb_peer_requests_rejected_total{{port=\"{}\",reason=\"{}\"}} {n}",
            escape(port),
            escape(reason)
        );
    }
    // Counted besides the verdicts, a family each (their sums are not packet counts):
    // global-counter prefix, family, label, help.
    const BESIDES: [(&str, &str, &str, &str); 3] = [
        (
            "lru_",
            "lb_dataplane_conn_lookups_total",
            "result",
            "Connection-table lookups of packets to a service: hit, miss (steered by the Maglev table), stale (its backend gone).",
        ),
        (
            "fwd_",
            "lb_dataplane_forwarded_total",
            "mode",
            "Packets forwarded to a backend, by mode (each also counted as a tx or redirect verdict).",
        ),
        (
            "epoch_",
            "lb_dataplane_epoch_decisions_total",
            "decision",
            "Packets of connections from an older epoch of their service: kept on their backend or re-steered.",
        ),
    ];
    const TABLE_FULL: &str = "conn_table_full";
    family(
        &mut out,
        "lb_dataplane_packets_total",
        "counter",
        "Packets by the data plane's verdict (pass_*, drop_*, tx, redirect, refuse_*): the sum is every packet seen.",
    );
    for (name, v) in &stats.global {
        if name != TABLE_FULL && !BESIDES.iter().any(|b| name.starts_with(b.0)) {
            let _ = writeln!(out, "lb_dataplane_packets_total{{outcome=\"{name}\"}} {v}");
        }
    }
    for (prefix, metric, label, help) in BESIDES {
        family(&mut out, metric, "counter", help);
        for (name, v) in &stats.global {
            if let Some(value) = name.strip_prefix(prefix) {
                let _ = writeln!(out, "{metric}{{{label}=\"{value}\"}} {v}");
            }
        }
    }
    family(
        &mut out,
        "lb_dataplane_conn_table_full_total",
        "counter",
        "Packets of flows proved real that their family's full connection table did not enter: steered by their Maglev table alone (raise conn_table_size or conn_table_size_v6, or lower the idle timeouts).",
    );
    if let Some((_, v)) = stats.global.iter().find(|(name, _)| name == TABLE_FULL) {
        let _ = writeln!(out, "lb_dataplane_conn_table_full_total {v}");
    }
    family(
        &mut out,
        "lb_service_packets_total",
        "counter",
        "Packets to a service.",
    );
    for s in &stats.services {
        let _ = writeln!(
            out,
            "lb_service_packets_total{{service=\"{}\"}} {}",
            escape(&s.service),
            s.packets
        );
    }
    family(
        &mut out,
        "lb_service_bytes_total",
        "counter",
        "Bytes to a service.",
    );
    for s in &stats.services {
        let _ = writeln!(
            out,
            "lb_service_bytes_total{{service=\"{}\"}} {}",
            escape(&s.service),
            s.bytes
        );
    }
    family(
        &mut out,
        "lb_service_unavailable",
        "gauge",
        "1 while the service is refused (maintenance, outage), with its reason; 0 with reason \"none\" while it is served.",
    );
    for s in &stats.services {
        let (v, reason) = match &s.unavailable {
            Some(r) => (1, format!("{:?}", r.reason).to_lowercase()),
            None => (0, "none".to_string()),
        };
        let _ = writeln!(
            out,
            "lb_service_unavailable{{service=\"{}\",reason=\"{}\"}} {v}",
            escape(&s.service),
            reason
        );
    }
    family(
        &mut out,
        "lb_backend_healthy",
        "gauge",
        "1 while the service's health check passes for the backend (always 1 without a check).",
    );
    for s in &stats.services {
        for b in &s.backends {
            let _ = writeln!(
                out,
                "lb_backend_healthy{{service=\"{}\",backend=\"{}\"}} {}",
                escape(&s.service),
                b.address,
                u8::from(b.healthy)
            );
        }
    }
    family(
        &mut out,
        "lb_backend_over_water_mark",
        "gauge",
        "1 while the water marks keep the backend out of new flows.",
    );
    for s in &stats.services {
        for b in s.backends.iter().filter(|b| b.steering.is_some()) {
            let out_now = b.steering.as_deref().is_some_and(|n| n.starts_with("out:"));
            let _ = writeln!(
                out,
                "lb_backend_over_water_mark{{service=\"{}\",backend=\"{}\"}} {}",
                escape(&s.service),
                b.address,
                u8::from(out_now)
            );
        }
    }
    family(
        &mut out,
        "lb_backend_packets_total",
        "counter",
        "Packets forwarded to a backend.",
    );
    for s in &stats.services {
        for b in &s.backends {
            let _ = writeln!(
                out,
                "lb_backend_packets_total{{service=\"{}\",backend=\"{}\"}} {}",
                escape(&s.service),
                b.address,
                b.packets
            );
        }
    }
    family(
        &mut out,
        "lb_backend_bytes_total",
        "counter",
        "Bytes forwarded to a backend.",
    );
    for s in &stats.services {
        for b in &s.backends {
            let _ = writeln!(
                out,
                "lb_backend_bytes_total{{service=\"{}\",backend=\"{}\"}} {}",
                escape(&s.service),
                b.address,
                b.bytes
            );
        }
    }
    family(
        &mut out,
        "lb_backend_weight",
        "gauge",
        "A backend's configured weight (0 while draining takes effect in lb_backend_draining).",
    );
    for s in &stats.services {
        for b in &s.backends {
            let _ = writeln!(
                out,
                "lb_backend_weight{{service=\"{}\",backend=\"{}\"}} {}",
                escape(&s.service),
                b.address,
                b.weight
            );
        }
    }
    family(
        &mut out,
        "lb_backend_draining",
        "gauge",
        "1 while a backend takes no new flows.",
    );
    for s in &stats.services {
        for b in &s.backends {
            let _ = writeln!(
                out,
                "lb_backend_draining{{service=\"{}\",backend=\"{}\"}} {}",
                escape(&s.service),
                b.address,
                u8::from(b.drain)
            );
        }
    }
    if let Some(c) = cluster {
        family(
            &mut out,
            "lb_cluster_is_leader",
            "gauge",
            "1 while this node leads its cluster.",
        );
        let _ = writeln!(out, "lb_cluster_is_leader {}", u8::from(c.is_leader));
        family(
            &mut out,
            "lb_cluster_hosts_alive",
            "gauge",
            "Cluster nodes this node hears (itself included).",
        );
        let _ = writeln!(out, "lb_cluster_hosts_alive {}", c.hosts.len());
        family(
            &mut out,
            "lb_cluster_vips_served",
            "gauge",
            "VIPs this node serves.",
        );
        let served = c
            .hosts
            .iter()
            .find(|h| h.me)
            .map_or(0, |h| h.info.serving.len());
        let _ = writeln!(out, "lb_cluster_vips_served {served}");
        family(
            &mut out,
            "lb_cluster_quorate",
            "gauge",
            "1 while this node sees cluster.quorum nodes (itself included) and may serve VIPs.",
        );
        let _ = writeln!(out, "lb_cluster_quorate {}", u8::from(c.quorate));
        family(
            &mut out,
            "lb_cluster_table_mismatches",
            "gauge",
            "VIPs whose owner holds other tables than this node (it does not take them).",
        );
        let _ = writeln!(out, "lb_cluster_table_mismatches {}", c.mismatched.len());
        family(
            &mut out,
            "lb_cluster_messages_rejected_total",
            "counter",
            "Control messages dropped, by reason.",
        );
        for (reason, n) in &c.rejected {
            let _ = writeln!(
                out,
                "lb_cluster_messages_rejected_total{{reason=\"{reason}\"}} {n}"
            );
        }
        family(
            &mut out,
            "lb_cluster_events_total",
            "counter",
            "Cluster events, by kind.",
        );
        for (event, n) in &c.events {
            let _ = writeln!(out, "lb_cluster_events_total{{event=\"{event}\"}} {n}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_familys_connection_table_has_its_own_count() {
        let status: Status = serde_json::from_value(serde_json::json!({
            "node": "lb1", "version": "0", "api": "1", "uptime_seconds": 1,
            "interfaces": [], "services": 0, "backends": 0, "unresolved_backends": 0,
            "conn_table_entries": 130, "conn_table_entries_v6": 30,
            "resumed": false, "metrics": "",
        }))
        .unwrap();
        let stats = Stats {
            services: Vec::new(),
            global: Vec::new(),
            conn_table_entries: 130,
            conn_table_entries_v6: 30,
        };
        let text = render(&status, &stats, None);
        for line in [
            "lb_conn_table_entries 130",
            "lb_conn_table_family_entries{family=\"ipv4\"} 100",
            "lb_conn_table_family_entries{family=\"ipv6\"} 30",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }
}
