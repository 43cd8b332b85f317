//! What a backend host needs to take a balanced service's traffic, and what is wrong
//! with one that does not: the VIPs on `lo` (so the stack accepts packets to them),
//! ARP kept quiet about them (`arp_ignore=1`, `arp_announce=2`: only the LB nodes
//! answer for a VIP), and for an encapsulating service the decapsulation attached with
//! the LB nodes' outer sources and reverse-path filtering that is not strict. Pure:
//! `diagnose` compares what a host has (`Facts`, gathered by `shell::backend_side`)
//! with what it needs (`Setup`) and says, for each gap, the command that closes it.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::Serialize;

use crate::model::Forward;

/// What a backend is set up for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Setup {
    /// The interface the service's packets arrive on.
    pub interface: String,
    pub vips: Vec<IpAddr>,
    pub mode: Forward,
    /// The LB nodes' outer sources (`encap_source_v4`/`_v6`), for ipip and gue.
    pub lb_sources: Vec<IpAddr>,
    pub gue_port: u16,
    /// Where the decapsulation's maps and link are pinned.
    pub pin_dir: PathBuf,
}

/// What the host has.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// Addresses on `lo`.
    pub on_lo: Vec<IpAddr>,
    /// sysctl name (`net.ipv4.conf.all.arp_ignore`) → value; absent: unreadable.
    pub sysctls: BTreeMap<String, String>,
    /// The XDP program attached to the interface, by name ("none" if none).
    pub xdp_program: Option<String>,
    /// The tc ingress (tcx) programs on the interface, by name: `lb_decap_tc` is the
    /// decapsulation where XDP cannot attach.
    pub tc_programs: Vec<String>,
    /// The pinned decapsulation's sources and GUE port, if it is pinned.
    pub decap: Option<(Vec<IpAddr>, u16)>,
    /// The interface exists.
    pub interface_exists: bool,
}

/// One thing wrong, and the command that puts it right.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub problem: String,
    pub fix: String,
}

/// The sysctls a backend needs: (name, wanted value, why). `rp_filter` is judged
/// apart (the kernel uses the larger of `all` and the interface's).
pub fn sysctls(setup: &Setup) -> Vec<(String, &'static str, &'static str)> {
    let i = &setup.interface;
    let mut out = Vec::new();
    if setup.vips.iter().any(|v| v.is_ipv4()) {
        for scope in ["all", i.as_str()] {
            out.push((
                format!("net.ipv4.conf.{scope}.arp_ignore"),
                "1",
                "else this host answers ARP for the VIP on lo and takes the LB's traffic",
            ));
            out.push((
                format!("net.ipv4.conf.{scope}.arp_announce"),
                "2",
                "else its ARP requests name the VIP as their source and poison neighbours' caches",
            ));
        }
    }
    out
}

/// Where the reverse-path filter stands: the kernel applies the larger of `all` and
/// the interface's value; 1 (strict) drops a decapsulated packet whose client the
/// host would reach another way.
fn rp_filter(setup: &Setup, facts: &Facts) -> Option<u32> {
    let get = |scope: &str| {
        facts
            .sysctls
            .get(&format!("net.ipv4.conf.{scope}.rp_filter"))
            .and_then(|v| v.trim().parse::<u32>().ok())
    };
    Some(get("all")?.max(get(&setup.interface)?))
}

/// Every gap between `facts` and `setup`, each with its fix; empty: ready.
pub fn diagnose(setup: &Setup, facts: &Facts) -> Vec<Finding> {
    let mut out = Vec::new();
    let i = &setup.interface;
    if !facts.interface_exists {
        out.push(Finding {
            problem: format!("interface {i} does not exist"),
            fix: format!("ip link show   # and pass the right one with --interface"),
        });
        return out;
    }
    for vip in &setup.vips {
        if !facts.on_lo.contains(vip) {
            let (v6, len) = if vip.is_ipv6() {
                ("-6 ", 128)
            } else {
                ("", 32)
            };
            out.push(Finding {
                problem: format!("VIP {vip} is not on lo: the stack drops packets to it"),
                fix: format!("ip {v6}addr add {vip}/{len} dev lo"),
            });
        }
    }
    for (name, want, why) in sysctls(setup) {
        let have = facts.sysctls.get(&name).map(|v| v.trim().to_string());
        if have.as_deref() != Some(want) {
            out.push(Finding {
                problem: format!(
                    "{name} is {}, needs {want}: {why}",
                    have.as_deref().unwrap_or("unreadable")
                ),
                fix: format!("sysctl -w {name}={want}"),
            });
        }
    }
    if setup.mode.encapsulates() {
        if rp_filter(setup, facts) == Some(1) {
            out.push(Finding {
                problem: format!(
                    "rp_filter is strict (1) on {i}: a decapsulated packet from a client this \
                     host routes another way is dropped"
                ),
                fix: format!(
                    "sysctl -w net.ipv4.conf.all.rp_filter=2 net.ipv4.conf.{i}.rp_filter=2"
                ),
            });
        }
        let setup_cmd = setup_command(setup);
        let on_tc = facts
            .tc_programs
            .iter()
            .any(|p| p == lb_common::program_names::DECAP_TC);
        match facts.xdp_program.as_deref() {
            Some(lb_common::program_names::DECAP) => {}
            _ if on_tc => {}
            Some("none") | None => out.push(Finding {
                problem: format!(
                    "no decapsulation on {i}: {} packets from the LB nodes reach the stack \
                     still wrapped and are dropped",
                    setup.mode
                ),
                fix: setup_cmd.clone(),
            }),
            Some(other) => out.push(Finding {
                problem: format!(
                    "XDP program {other} is attached to {i}, not lb_decap: the LB nodes' \
                     packets are not decapsulated"
                ),
                fix: format!("ip link set {i} xdp off; {setup_cmd}"),
            }),
        }
        match &facts.decap {
            None => out.push(Finding {
                problem: format!(
                    "the decapsulation's maps are not pinned in {}",
                    setup.pin_dir.display()
                ),
                fix: setup_cmd.clone(),
            }),
            Some((sources, port)) => {
                for s in setup.lb_sources.iter().filter(|s| !sources.contains(s)) {
                    out.push(Finding {
                        problem: format!(
                            "LB source {s} is not among the decapsulation's sources: its \
                             packets pass wrapped and are dropped"
                        ),
                        fix: setup_cmd.clone(),
                    });
                }
                if setup.mode == Forward::Gue && *port != setup.gue_port {
                    out.push(Finding {
                        problem: format!(
                            "the decapsulation takes GUE on port {port}, the LB nodes send to {}",
                            setup.gue_port
                        ),
                        fix: setup_cmd.clone(),
                    });
                }
            }
        }
    }
    out
}

/// The `lbctl backend setup` command for `setup`.
pub fn setup_command(setup: &Setup) -> String {
    let mut cmd = format!("lbctl backend setup --interface {}", setup.interface);
    for v in &setup.vips {
        cmd.push_str(&format!(" --vip {v}"));
    }
    cmd.push_str(&format!(" --mode {}", setup.mode));
    for s in &setup.lb_sources {
        cmd.push_str(&format!(" --lb-source {s}"));
    }
    if setup.mode == Forward::Gue {
        cmd.push_str(&format!(" --gue-port {}", setup.gue_port));
    }
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn setup(mode: Forward) -> Setup {
        Setup {
            interface: "eth0".into(),
            vips: vec![ip("198.18.0.100"), ip("2001:db8::100")],
            mode,
            lb_sources: vec![ip("198.18.0.2")],
            gue_port: 6080,
            pin_dir: "/sys/fs/bpf/lb-decap".into(),
        }
    }

    fn ready(setup: &Setup) -> Facts {
        let mut sysctls: BTreeMap<String, String> = sysctls(setup)
            .into_iter()
            .map(|(n, v, _)| (n, v.to_string()))
            .collect();
        sysctls.insert("net.ipv4.conf.all.rp_filter".into(), "2".into());
        sysctls.insert("net.ipv4.conf.eth0.rp_filter".into(), "0".into());
        Facts {
            on_lo: setup.vips.clone(),
            sysctls,
            xdp_program: Some("lb_decap".into()),
            tc_programs: Vec::new(),
            decap: Some((setup.lb_sources.clone(), setup.gue_port)),
            interface_exists: true,
        }
    }

    #[test]
    fn a_ready_host_has_no_findings_and_each_broken_setting_is_named_with_its_fix() {
        let s = setup(Forward::Gue);
        assert_eq!(diagnose(&s, &ready(&s)), vec![]);

        let mut f = ready(&s);
        f.on_lo.retain(|a| a.is_ipv4());
        let d = diagnose(&s, &f);
        assert_eq!(d.len(), 1, "{d:?}");
        assert_eq!(d[0].fix, "ip -6 addr add 2001:db8::100/128 dev lo");

        let mut f = ready(&s);
        f.sysctls
            .insert("net.ipv4.conf.eth0.arp_ignore".into(), "0".into());
        let d = diagnose(&s, &f);
        assert_eq!(
            d[0].fix, "sysctl -w net.ipv4.conf.eth0.arp_ignore=1",
            "{d:?}"
        );
        assert!(d[0].problem.contains("is 0, needs 1"), "{d:?}");

        let mut f = ready(&s);
        // The kernel takes the larger of `all` and the interface's: loose wins.
        f.sysctls
            .insert("net.ipv4.conf.eth0.rp_filter".into(), "1".into());
        assert_eq!(diagnose(&s, &f), vec![]);
        f.sysctls
            .insert("net.ipv4.conf.all.rp_filter".into(), "1".into());
        let d = diagnose(&s, &f);
        assert!(d[0].problem.contains("rp_filter is strict"), "{d:?}");

        let mut f = ready(&s);
        f.xdp_program = Some("none".into());
        let d = diagnose(&s, &f);
        assert!(d[0].problem.contains("no decapsulation on eth0"), "{d:?}");
        assert_eq!(
            d[0].fix,
            "lbctl backend setup --interface eth0 --vip 198.18.0.100 --vip 2001:db8::100 \
             --mode gue --lb-source 198.18.0.2 --gue-port 6080"
        );

        // The tc fallback counts as the decapsulation too.
        let mut f = ready(&s);
        f.xdp_program = Some("none".into());
        f.tc_programs = vec!["lb_decap_tc".into()];
        assert_eq!(diagnose(&s, &f), vec![]);

        let mut f = ready(&s);
        f.decap = Some((vec![ip("198.18.0.3")], 7000));
        let d = diagnose(&s, &f);
        assert_eq!(d.len(), 2, "{d:?}");
        assert!(d[0].problem.contains("LB source 198.18.0.2"), "{d:?}");
        assert!(d[1].problem.contains("port 7000"), "{d:?}");
    }

    #[test]
    fn an_l2_backend_needs_no_decapsulation() {
        let s = setup(Forward::L2);
        let mut f = ready(&s);
        f.xdp_program = Some("none".into());
        f.decap = None;
        f.sysctls
            .insert("net.ipv4.conf.all.rp_filter".into(), "1".into());
        assert_eq!(diagnose(&s, &f), vec![]);
    }
}
