//! What may be a VIP, a backend and a backend's MAC. One set of rules, used by the
//! config parser (with the field's line), the reconciler (every change, whoever makes
//! it) and the directory feed (a registered backend that breaks them is left out).
//! Pure.

use std::{collections::BTreeSet, net::IpAddr};

use crate::{
    desired::Desired,
    model::{mac_refusal, EncapSettings, Forward, ServiceKey},
};

/// Why `addr` cannot be a host address (a VIP or a backend), if it cannot.
fn not_a_host(addr: IpAddr) -> Option<&'static str> {
    match addr {
        IpAddr::V4(a) => {
            if a.is_unspecified() || a.octets()[0] == 0 {
                Some("it is in 0.0.0.0/8 (this network)")
            } else if a.is_broadcast() {
                Some("it is the broadcast address")
            } else if a.is_multicast() {
                Some("it is a multicast address")
            } else if a.is_loopback() {
                Some("it is a loopback address")
            } else if a.is_link_local() {
                Some("it is link-local (169.254.0.0/16)")
            } else if a.octets()[0] >= 240 {
                Some("it is in the reserved 240.0.0.0/4")
            } else {
                None
            }
        }
        IpAddr::V6(a) => {
            if a.is_unspecified() {
                Some("it is the unspecified address ::")
            } else if a.is_loopback() {
                Some("it is the loopback address ::1")
            } else if a.is_multicast() {
                Some("it is a multicast address")
            } else if a.segments()[0] & 0xffc0 == 0xfe80 {
                Some("it is link-local (fe80::/10)")
            } else if a.to_ipv4_mapped().is_some() {
                Some("it is an IPv4-mapped address; write the IPv4 address")
            } else {
                None
            }
        }
    }
}

/// Why `addr` cannot be a VIP, if it cannot. `own` are this node's own addresses
/// (those of its interfaces that the config does not name as VIPs): balancing one
/// would take the node's own traffic (its SSH, say) to the backends.
pub fn vip_refusal(addr: IpAddr, own: &BTreeSet<IpAddr>) -> Option<String> {
    if let Some(why) = not_a_host(addr) {
        return Some(format!("{addr} cannot be a VIP: {why}"));
    }
    own.contains(&addr).then(|| {
        format!(
            "{addr} cannot be a VIP: it is this node's own address, and its traffic (SSH, the \
             cluster) would go to the backends; use an address of its own"
        )
    })
}

/// Why `addr` cannot be the outer source of encapsulated packets, if it cannot.
pub fn source_refusal(addr: IpAddr) -> Option<&'static str> {
    not_a_host(addr)
}

/// Why `addr` cannot be a backend of `service` reached by `forward`, if it cannot.
/// Only an encapsulating service may have backends of the other family (the outer
/// header is of the backend's family, the client's packet inside it of the VIP's).
pub fn backend_refusal(service: &ServiceKey, addr: IpAddr, forward: Forward) -> Option<String> {
    if let Some(why) = not_a_host(addr) {
        return Some(format!("{addr} cannot be a backend of {service}: {why}"));
    }
    if addr.is_ipv4() != service.addr.is_ipv4() && !forward.encapsulates() {
        return Some(format!(
            "{addr} cannot be a backend of {service}: it is of the other address family \
             (only an encapsulating service, forward = \"ipip\" or \"gue\", may mix them)"
        ));
    }
    (addr == service.addr).then(|| {
        format!("{addr} cannot be a backend of {service}: it is the VIP itself, and its packets would loop")
    })
}

/// The first thing in `desired` that breaks the rules, said with the service.
pub fn desired(
    desired: &Desired,
    own: &BTreeSet<IpAddr>,
    encap: &EncapSettings,
) -> Result<(), String> {
    services(desired.services.iter(), own, encap)
}

/// As [`desired`], for some of its services.
pub fn services<'a>(
    services: impl Iterator<Item = (&'a ServiceKey, &'a crate::desired::ServiceSpec)>,
    own: &BTreeSet<IpAddr>,
    encap: &EncapSettings,
) -> Result<(), String> {
    for (key, spec) in services {
        if let Some(why) = vip_refusal(key.addr, own) {
            return Err(format!("service {key}: {why}"));
        }
        let forward = spec.config.forward;
        for (addr, b) in &spec.backends {
            if let Some(why) = backend_refusal(key, *addr, forward) {
                return Err(why);
            }
            if let Some(why) = encap_refusal(key, *addr, forward, encap) {
                return Err(why);
            }
            if let Some(mac) = &b.mac {
                if let Some(why) = mac_refusal(mac) {
                    return Err(format!(
                        "backend {addr} of {key}: MAC {}: {why}",
                        crate::model::mac_to_string(mac)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// Why this node cannot encapsulate for backend `addr` of `service`, if it cannot:
/// it needs an outer source of the backend's family.
pub fn encap_refusal(
    service: &ServiceKey,
    addr: IpAddr,
    forward: Forward,
    encap: &EncapSettings,
) -> Option<String> {
    if !forward.encapsulates() || encap.source_for(addr).is_some() {
        return None;
    }
    let field = if addr.is_ipv4() {
        "encap_source_v4"
    } else {
        "encap_source_v6"
    };
    Some(format!(
        "backend {addr} of {service} (forward = \"{forward}\"): this node has no outer source \
         for it; set [dataplane] {field} to an address of this node the backend routes back to"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_unicast_host_addresses_of_somebody_else_are_vips() {
        let own = BTreeSet::from([ip("198.18.0.2")]);
        for good in ["198.18.0.100", "2001:db8::100", "203.0.113.7"] {
            assert_eq!(vip_refusal(ip(good), &own), None, "{good}");
        }
        for bad in [
            "0.0.0.0",
            "0.1.2.3",
            "255.255.255.255",
            "224.0.0.1",
            "239.1.1.1",
            "127.0.0.1",
            "169.254.0.1",
            "240.0.0.1",
            "198.18.0.2",
            "::",
            "::1",
            "ff02::1",
            "fe80::1",
            "::ffff:198.18.0.100",
        ] {
            assert!(vip_refusal(ip(bad), &own).is_some(), "{bad}");
        }
    }

    #[test]
    fn a_backend_is_a_host_of_the_services_family_and_not_the_vip() {
        let key: ServiceKey = "tcp/198.18.0.100:80".parse().unwrap();
        assert_eq!(backend_refusal(&key, ip("198.18.0.11"), Forward::L2), None);
        // Encapsulated, the outer header is the backend's family.
        assert_eq!(
            backend_refusal(&key, ip("2001:db8::11"), Forward::Ipip),
            None
        );
        assert!(backend_refusal(&key, ip("198.18.0.100"), Forward::Gue).is_some());
        for bad in [
            "198.18.0.100",
            "2001:db8::11",
            "127.0.0.1",
            "224.0.0.1",
            "0.0.0.0",
        ] {
            assert!(
                backend_refusal(&key, ip(bad), Forward::L2).is_some(),
                "{bad}"
            );
        }
    }
}
