//! `lbctl backend setup` and `doctor` on a backend host: reads what the host has
//! (`backend_side::Facts`: addresses on lo over netlink, sysctls from /proc/sys, the
//! XDP program on the interface, the pinned decapsulation) and puts right what
//! `backend_side::diagnose` finds. /proc/sys/net and netlink show the caller's network
//! namespace, so both work inside one.

use std::net::IpAddr;

use anyhow::{Context, Result};
use aya::programs::XdpMode;

use crate::{
    backend_side::{self, Facts, Finding, Setup},
    dataplane::decap::{self, Decap, DecapSettings},
    model::Forward,
    shell::{neighbor::NeighborTable, vip},
};

fn sysctl_path(name: &str) -> String {
    format!("/proc/sys/{}", name.replace('.', "/"))
}

fn read_sysctl(name: &str) -> Option<String> {
    std::fs::read_to_string(sysctl_path(name))
        .ok()
        .map(|v| v.trim().to_string())
}

fn write_sysctl(name: &str, value: &str) -> Result<()> {
    std::fs::write(sysctl_path(name), value).with_context(|| format!("setting {name}={value}"))
}

/// What the host has, as `setup` would judge it.
pub async fn gather(setup: &Setup) -> Result<Facts> {
    let net = NeighborTable::new()?;
    let mut facts = Facts {
        interface_exists: net.ifindex(&setup.interface).await.is_some(),
        ..Facts::default()
    };
    if let Some(lo) = net.ifindex("lo").await {
        facts.on_lo = net.addresses(lo).await?;
    }
    let i = &setup.interface;
    let mut names: Vec<String> = backend_side::sysctls(setup)
        .into_iter()
        .map(|(n, _, _)| n)
        .collect();
    names.push("net.ipv4.conf.all.rp_filter".into());
    names.push(format!("net.ipv4.conf.{i}.rp_filter"));
    for n in names {
        if let Some(v) = read_sysctl(&n) {
            facts.sysctls.insert(n, v);
        }
    }
    if facts.interface_exists {
        facts.xdp_program = Some(match net.xdp_program_id(i).await? {
            None => "none".to_string(),
            Some(id) => aya::programs::loaded_programs()
                .flatten()
                .find(|p| p.id() == id)
                .and_then(|p| p.name_as_str().map(str::to_string))
                .unwrap_or_else(|| format!("program {id}")),
        });
    }
    if facts.interface_exists {
        if let Ok((_, progs)) =
            aya::programs::SchedClassifier::query_tcx(i, aya::programs::TcAttachType::Ingress)
        {
            facts.tc_programs = progs
                .iter()
                .filter_map(|p| p.name_as_str().map(str::to_string))
                .collect();
        }
    }
    facts.decap = decap::read_pinned(&setup.pin_dir)
        .ok()
        .map(|(s, _)| (s.sources, s.gue_port));
    Ok(facts)
}

/// Where the decapsulation attaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    /// XDP in this mode, else (the interface or driver refuses it) tc ingress.
    Auto(XdpMode),
    Xdp(XdpMode),
    Tc,
}

/// Makes the host what `setup` needs: VIPs on lo, the sysctls, and for ipip/gue the
/// decapsulation loaded, configured and attached through a pinned link (it outlives
/// this command). Returns what it did, a line each.
pub async fn apply(setup: &Setup, hook: Hook) -> Result<Vec<String>> {
    let mut done = Vec::new();
    let facts = gather(setup).await?;
    anyhow::ensure!(
        facts.interface_exists,
        "interface {} does not exist in this network namespace",
        setup.interface
    );
    let net = NeighborTable::new()?;
    let lo = net
        .ifindex("lo")
        .await
        .context("this network namespace has no lo")?;
    for v in setup.vips.iter().filter(|v| !facts.on_lo.contains(v)) {
        vip::add_address(net.handle(), lo, *v).await?;
        done.push(format!("added {v} to lo"));
    }
    for (name, want, _) in backend_side::sysctls(setup) {
        if facts.sysctls.get(&name).map(String::as_str) != Some(want) {
            write_sysctl(&name, want)?;
            done.push(format!("set {name}={want}"));
        }
    }
    if setup.mode.encapsulates() {
        for scope in ["all", setup.interface.as_str()] {
            let name = format!("net.ipv4.conf.{scope}.rp_filter");
            if facts.sysctls.get(&name).map(String::as_str) == Some("1") {
                write_sysctl(&name, "2")?;
                done.push(format!("set {name}=2 (loose)"));
            }
        }
        let settings = DecapSettings {
            sources: setup.lb_sources.clone(),
            gue_port: if setup.mode == Forward::Gue {
                setup.gue_port
            } else {
                0
            },
        };
        let mut d = Decap::load(&settings, Some(&setup.pin_dir))?;
        let name = match hook {
            Hook::Xdp(mode) => {
                d.attach_pinned(&setup.interface, mode)?;
                "lb_decap (XDP)"
            }
            Hook::Tc => {
                d.attach_tc_pinned(&setup.interface)?;
                "lb_decap_tc (tc ingress)"
            }
            Hook::Auto(mode) => match d.attach_pinned(&setup.interface, mode) {
                Ok(()) => "lb_decap (XDP)",
                Err(e) => {
                    done.push(format!("XDP did not attach ({e}); using tc ingress"));
                    d.attach_tc_pinned(&setup.interface)?;
                    "lb_decap_tc (tc ingress)"
                }
            },
        };
        done.push(format!(
            "{name} attached to {} for {} from {}",
            setup.interface,
            setup.mode,
            setup
                .lb_sources
                .iter()
                .map(IpAddr::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    Ok(done)
}

/// What is wrong on this host for `setup`.
pub async fn doctor(setup: &Setup) -> Result<Vec<Finding>> {
    Ok(backend_side::diagnose(setup, &gather(setup).await?))
}
