//! The project's shared vocabulary: what a service, a protocol, a MAC, a route, a
//! health check and a directory backend are. Pure data with its text forms; every
//! other module (pure cores and I/O shells alike) takes these from here, so that no
//! shell has to import another for a type.

use std::{fmt, net::IpAddr, time::Duration};

use lb_common::{PROTO_TCP, PROTO_UDP};
use serde::{Deserialize, Serialize};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Proto::Tcp => PROTO_TCP,
            Proto::Udp => PROTO_UDP,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// A service: what clients address. Port 0 is the address's port-less fallback.
/// Serialized as its text form (`tcp/198.18.0.100:80`), so it can key JSON objects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub addr: IpAddr,
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.addr {
            IpAddr::V4(a) => write!(f, "{}/{a}:", self.proto)?,
            IpAddr::V6(a) => write!(f, "{}/[{a}]:", self.proto)?,
        }
        match self.port {
            0 => f.write_str("*"),
            p => write!(f, "{p}"),
        }
    }
}

impl Serialize for ServiceKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ServiceKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl std::str::FromStr for ServiceKey {
    type Err = String;

    /// The `Display` form: `tcp/198.18.0.100:80`, `udp/[2001:db8::1]:53`, `tcp/198.18.0.100:*`.
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        let bad = || {
            format!("`{s}` is not a service; write it as tcp/198.18.0.100:80, udp/[2001:db8::1]:53 or tcp/198.18.0.100:* (any port)")
        };
        let (proto, rest) = s.split_once('/').ok_or_else(bad)?;
        let proto = match proto {
            "tcp" => Proto::Tcp,
            "udp" => Proto::Udp,
            _ => return Err(bad()),
        };
        let (addr, port) = rest.rsplit_once(':').ok_or_else(bad)?;
        let addr = addr.trim_start_matches('[').trim_end_matches(']');
        let addr: IpAddr = addr.parse().map_err(|_| bad())?;
        let port = match port {
            "*" => 0,
            p => p.parse().map_err(|_| bad())?,
        };
        Ok(ServiceKey { addr, port, proto })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Entries of the service's Maglev table, a prime, pinned by the operator; 0: sized
    /// by its backends (`dataplane::layout::table_size`).
    #[serde(default)]
    pub maglev_size: u32,
    /// Pass fragments and packets with IP options to the kernel instead of dropping them.
    pub pass_irregular: bool,
    /// The service's epoch (SPM). Connections begun in an older one are kept on their
    /// backend, or steered anew with `epoch_resteer`.
    #[serde(default)]
    pub epoch: u32,
    #[serde(default)]
    pub epoch_resteer: bool,
    /// Maintenance or outage: SYNs get a RST, UDP an ICMP error, the rest is dropped.
    #[serde(default)]
    pub unavailable: bool,
    /// How packets reach the backends: L2 (same segment) or encapsulated.
    #[serde(default)]
    pub forward: Forward,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            maglev_size: 0,
            pass_irregular: false,
            epoch: 0,
            epoch_resteer: false,
            unavailable: false,
            forward: Forward::L2,
        }
    }
}

/// Where a frame for a backend leaves this node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Egress {
    /// Back out of the interface it came in on (`XDP_TX`).
    Ingress,
    /// Out of another interface (`XDP_REDIRECT` through the devmap).
    Interface { ifindex: u32 },
}

/// Where a backend's frames go: to `dst_mac` (the backend's, or its next hop's) from
/// `src_mac` (ours on the egress interface); as they came (L2 direct server return)
/// or wrapped in an outer header (`encap`) for a backend beyond this segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackendRoute {
    pub dst_mac: [u8; 6],
    pub src_mac: [u8; 6],
    pub egress: Egress,
    #[serde(default)]
    pub encap: Option<Encap>,
}

/// How a service's packets are carried to its backends.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Forward {
    /// L2 direct server return: new MACs, the packet as it came. The backend must
    /// share a segment with this node.
    #[default]
    L2,
    /// IP in IP (IPv4 or IPv6 outer header, of the backend's family), to the backend's
    /// address through the kernel's route to it.
    Ipip,
    /// GUE variant 1 (IP in UDP), as `Ipip` with a UDP header whose source port
    /// carries the flow hash.
    Gue,
}

impl Forward {
    pub fn encapsulates(self) -> bool {
        self != Forward::L2
    }
}

impl fmt::Display for Forward {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Forward::L2 => "l2",
            Forward::Ipip => "ipip",
            Forward::Gue => "gue",
        })
    }
}

impl std::str::FromStr for Forward {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s {
            "l2" => Ok(Forward::L2),
            "ipip" => Ok(Forward::Ipip),
            "gue" => Ok(Forward::Gue),
            _ => Err(format!("`{s}` is not a forwarding mode: l2, ipip or gue")),
        }
    }
}

/// This node's side of encapsulation (`[dataplane]`): the outer header's source per
/// family (an address of this node the backends route back to), the GUE port, and
/// the largest IP packet the paths to the backends carry when it is below the
/// egress link's MTU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncapSettings {
    pub source_v4: Option<std::net::Ipv4Addr>,
    pub source_v6: Option<std::net::Ipv6Addr>,
    /// 0: `lb_common::GUE_PORT_DEFAULT`.
    pub gue_port: u16,
    pub path_mtu: Option<u16>,
}

impl EncapSettings {
    /// The outer source for a backend at `addr`, if one is configured.
    pub fn source_for(&self, addr: IpAddr) -> Option<IpAddr> {
        match addr {
            IpAddr::V4(_) => self.source_v4.map(IpAddr::V4),
            IpAddr::V6(_) => self.source_v6.map(IpAddr::V6),
        }
    }

    pub fn gue_port(&self) -> u16 {
        if self.gue_port == 0 {
            lb_common::GUE_PORT_DEFAULT
        } else {
            self.gue_port
        }
    }
}

/// An encapsulating route's outer header: `mode` (ipip or gue) from `source` (an
/// address of this node of the backend's family) to the backend, on a path that
/// carries `mtu` bytes; GUE to UDP port `gue_port`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Encap {
    pub mode: Forward,
    pub source: IpAddr,
    pub mtu: u16,
    pub gue_port: u16,
}

// ---- MAC addresses -------------------------------------------------------------

/// A MAC address, in transmission order.
pub type Mac = [u8; 6];

/// `02:00:00:00:00:01` (case-insensitive hex pairs) to bytes.
pub fn parse_mac(s: &str) -> Option<Mac> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut mac = [0u8; 6];
    for (b, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(p, 16).ok()?;
    }
    Some(mac)
}

/// Lower-case hex pairs joined by colons.
pub fn mac_to_string(mac: &Mac) -> String {
    // Written by hand: the views of a node with 100,000 backends format one each.
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(17);
    for (i, b) in mac.iter().enumerate() {
        if i > 0 {
            s.push(':');
        }
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

/// Why a MAC cannot be a frame's destination for one host, if it cannot.
pub fn mac_refusal(mac: &Mac) -> Option<&'static str> {
    if *mac == [0; 6] {
        Some("the all-zero MAC is no station")
    } else if *mac == [0xff; 6] {
        Some("the broadcast MAC would send the service's traffic to every host on the link")
    } else if mac[0] & 1 != 0 {
        Some("a multicast MAC (group bit set) would send the service's traffic to a group")
    } else {
        None
    }
}

// ---- health checks -------------------------------------------------------------

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Probe {
    /// A TCP connection is accepted.
    Tcp,
    /// `GET path` answers with `status`.
    Http { path: String, status: u16 },
    /// A datagram with `send` gets any answer (containing `expect`, if set).
    Udp {
        send: String,
        expect: Option<String>,
    },
}

/// One service's health checks: how, of which backends, and how its traffic reaches
/// them (an encapsulating service's probes are wrapped the same way, so a backend
/// whose decapsulation is broken fails them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceChecks {
    pub service: ServiceKey,
    pub check: CheckConfig,
    pub backends: Vec<IpAddr>,
    pub forward: Forward,
    /// This node's outer sources: an encapsulated probe comes from the one of its
    /// backend's family (the answer must come back to this node, not to a VIP the
    /// kernel might pick as the source, which the backend holds on its own lo).
    pub encap: EncapSettings,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckConfig {
    pub probe: Probe,
    /// Port probed on each backend.
    pub port: u16,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that make an unhealthy backend healthy again.
    pub rise: u32,
    /// Consecutive failures that make a healthy backend unhealthy.
    pub fall: u32,
}

impl Default for CheckConfig {
    fn default() -> Self {
        Self {
            probe: Probe::Tcp,
            port: 80,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise: 2,
            fall: 3,
        }
    }
}

// ---- the directory's backends --------------------------------------------------

/// A backend the directory holds: its weight, and the address of its host's current
/// route (where its frames go; its identity in the tables stays the same when the
/// route changes, so its flows stay with it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirBackend {
    pub weight: u32,
    pub via: IpAddr,
    /// The `sphere` attribute of its entry (the SPM topology rule's provider).
    pub sphere: Option<String>,
}

// ---- this node's links ---------------------------------------------------------

/// A neighbour entry we can forward with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Neighbor {
    pub ifindex: u32,
    pub mac: [u8; 6],
}

/// An interface of this node, as the data plane needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalInterface {
    pub name: String,
    pub ifindex: u32,
    pub mac: [u8; 6],
    /// The link's MTU: the largest IP packet an encapsulated frame may be on it.
    pub mtu: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_round_trip() {
        assert_eq!(
            mac_to_string(&parse_mac("02:AB:00:00:00:0b").unwrap()),
            "02:ab:00:00:00:0b"
        );
        assert_eq!(parse_mac("02:ab:00:00:00"), None);
        assert_eq!(parse_mac("02:ab:00:00:00:0bb"), None);
    }

    #[test]
    fn only_unicast_macs_are_backend_macs() {
        assert_eq!(mac_refusal(&[2, 0, 0, 0, 0, 1]), None);
        for bad in [
            [0; 6],
            [0xff; 6],
            [1, 0, 0x5e, 0, 0, 1],
            [0x33, 0x33, 0, 0, 0, 1],
        ] {
            assert!(mac_refusal(&bad).is_some(), "{bad:02x?}");
        }
    }

    #[test]
    fn service_keys_parse_back_from_their_display() {
        for s in [
            "tcp/198.18.0.100:80",
            "udp/[2001:db8::1]:53",
            "tcp/198.18.0.100:*",
        ] {
            let k: ServiceKey = s.parse().unwrap();
            assert_eq!(k.to_string(), s);
        }
        for bad in [
            "198.18.0.100:80",
            "sctp/198.18.0.100:80",
            "tcp/198.18.0.100",
            "tcp/x:80",
            "tcp/198.18.0.100:99999",
        ] {
            assert!(bad.parse::<ServiceKey>().is_err(), "{bad}");
        }
    }
}
