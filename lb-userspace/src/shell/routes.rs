//! Host-route monitoring: every host route in the directory is ARP-probed through
//! the first data-plane interface every 300 ms; two misses make it invalid (the next
//! valid route becomes current), two answers valid again. The verdict goes to the
//! directory, so every node moves the host's frames.

use std::{collections::BTreeMap, net::IpAddr, time::Duration};

use tracing::{info, warn};

use crate::{
    directory::tables::{names, Change, Op},
    health::Health,
    shell::{dird::DirHandle, vip::arp_probe},
};

pub fn monitor_routes(handle: DirHandle, interface: String, src: std::net::Ipv4Addr) {
    tokio::spawn(async move {
        let mut health: BTreeMap<String, Health> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        loop {
            tick.tick().await;
            let routes = handle.with_tables(|t| t.search(names::HOST_ROUTES, ""));
            let mut probes = Vec::new();
            for r in routes {
                let Ok(IpAddr::V4(target)) = r.value.parse::<IpAddr>() else {
                    continue;
                };
                let iface = interface.clone();
                probes.push((
                    r.key.clone(),
                    tokio::task::spawn_blocking(move || {
                        arp_probe(&iface, src, target, Duration::from_millis(200))
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
