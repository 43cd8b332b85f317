//! Backend MAC addresses from the kernel's neighbour table (over netlink), with a
//! nudge that makes the kernel ARP (or send a neighbour solicitation) for an address
//! it does not know yet. The kernel then keeps the entry fresh; we re-read it.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket},
    time::Duration,
};

use anyhow::{Context, Result};
use futures::TryStreamExt;
use netlink_packet_route::neighbour::{NeighbourAddress, NeighbourAttribute, NeighbourState};

pub use crate::model::{LocalInterface, Neighbor};

pub struct NeighborTable {
    handle: rtnetlink::Handle,
}

impl NeighborTable {
    /// Opens a netlink connection; must run inside a tokio runtime.
    pub fn new() -> Result<Self> {
        let (conn, handle, _) = rtnetlink::new_connection().context("opening a netlink socket")?;
        tokio::spawn(conn);
        Ok(Self { handle })
    }

    /// Every usable entry: states with a known link-layer address.
    pub async fn dump(&self) -> Result<Vec<(IpAddr, Neighbor)>> {
        let mut out = Vec::new();
        let mut entries = self.handle.neighbours().get().execute();
        while let Some(msg) = entries
            .try_next()
            .await
            .context("reading the neighbour table")?
        {
            if !matches!(
                msg.header.state,
                NeighbourState::Reachable
                    | NeighbourState::Stale
                    | NeighbourState::Delay
                    | NeighbourState::Probe
                    | NeighbourState::Permanent
            ) {
                continue;
            }
            let mut ip = None;
            let mut mac = None;
            for attr in &msg.attributes {
                match attr {
                    NeighbourAttribute::Destination(NeighbourAddress::Inet(a)) => {
                        ip = Some(IpAddr::V4(*a))
                    }
                    NeighbourAttribute::Destination(NeighbourAddress::Inet6(a)) => {
                        ip = Some(IpAddr::V6(*a))
                    }
                    NeighbourAttribute::LinkLocalAddress(l) if l.len() == 6 => {
                        mac = Some(<[u8; 6]>::try_from(l.as_slice()).expect("length checked"))
                    }
                    _ => {}
                }
            }
            if let (Some(ip), Some(mac)) = (ip, mac) {
                out.push((
                    ip,
                    Neighbor {
                        ifindex: msg.header.ifindex,
                        mac,
                    },
                ));
            }
        }
        Ok(out)
    }

    pub async fn lookup(&self, ip: IpAddr) -> Result<Option<Neighbor>> {
        Ok(self
            .dump()
            .await?
            .into_iter()
            .find(|(a, _)| *a == ip)
            .map(|(_, n)| n))
    }

    /// Looks `ip` up; if the kernel does not know it, makes the kernel resolve it and
    /// waits up to `timeout`.
    pub async fn resolve(&self, ip: IpAddr, timeout: Duration) -> Result<Option<Neighbor>> {
        if let Some(n) = self.lookup(ip).await? {
            return Ok(Some(n));
        }
        nudge(ip);
        let deadline = tokio::time::Instant::now() + timeout;
        while tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
            if let Some(n) = self.lookup(ip).await? {
                return Ok(Some(n));
            }
        }
        Ok(None)
    }
}

/// Sends an empty datagram to the discard port: to send it the kernel must resolve
/// the address, which is the whole point. The backend may answer with an ICMP error.
pub fn nudge(ip: IpAddr) {
    let bind: IpAddr = match ip {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    if let Ok(sock) = UdpSocket::bind((bind, 0)) {
        let _ = sock.send_to(&[], (ip, 9));
    }
}

/// A route of the main table: destination, prefix length, gateway.
pub type KernelRoute = (IpAddr, u8, Option<IpAddr>);

/// The gateway the longest matching route names for `addr`; `None` when the best
/// route has none (`addr` is on a link) or there is no route at all.
pub fn gateway_of(routes: &[KernelRoute], addr: IpAddr) -> Option<IpAddr> {
    let bits = |a: IpAddr| -> u128 {
        match a {
            IpAddr::V4(v) => (u32::from(v) as u128) << 96,
            IpAddr::V6(v) => u128::from(v),
        }
    };
    routes
        .iter()
        .filter(|(net, len, _)| {
            net.is_ipv4() == addr.is_ipv4() && {
                let mask = if *len == 0 {
                    0
                } else {
                    u128::MAX << (128 - *len as u32)
                };
                bits(*net) & mask == bits(addr) & mask
            }
        })
        .max_by_key(|(_, len, _)| *len)
        .and_then(|(_, _, gw)| *gw)
}

impl NeighborTable {
    /// The main table's unicast routes, both families.
    pub async fn routes(&self) -> Result<Vec<KernelRoute>> {
        use netlink_packet_route::route::{RouteAddress, RouteAttribute, RouteType};
        let mut out = Vec::new();
        for version in [rtnetlink::IpVersion::V4, rtnetlink::IpVersion::V6] {
            let v6 = version == rtnetlink::IpVersion::V6;
            let mut routes = self.handle.route().get(version).execute();
            while let Some(msg) = routes
                .try_next()
                .await
                .context("reading the routing table")?
            {
                if msg.header.kind != RouteType::Unicast {
                    continue;
                }
                let mut table = msg.header.table as u32;
                let (mut dst, mut gw) = (None, None);
                for attr in &msg.attributes {
                    match attr {
                        RouteAttribute::Table(t) => table = *t,
                        RouteAttribute::Destination(RouteAddress::Inet(a)) => {
                            dst = Some(IpAddr::V4(*a))
                        }
                        RouteAttribute::Destination(RouteAddress::Inet6(a)) => {
                            dst = Some(IpAddr::V6(*a))
                        }
                        RouteAttribute::Gateway(RouteAddress::Inet(a)) => gw = Some(IpAddr::V4(*a)),
                        RouteAttribute::Gateway(RouteAddress::Inet6(a)) => {
                            gw = Some(IpAddr::V6(*a))
                        }
                        _ => {}
                    }
                }
                // RT_TABLE_MAIN: the table the kernel routes by without policy rules.
                if table != 254 {
                    continue;
                }
                let any: IpAddr = if v6 {
                    Ipv6Addr::UNSPECIFIED.into()
                } else {
                    Ipv4Addr::UNSPECIFIED.into()
                };
                out.push((dst.unwrap_or(any), msg.header.destination_prefix_length, gw));
            }
        }
        Ok(out)
    }

    /// The neighbour entries for `wanted` next hops, keyed by them: a `routed` one's
    /// is its gateway's (the kernel's route to it), any other's its own.
    pub async fn table_for(
        &self,
        wanted: &[IpAddr],
        routed: &[IpAddr],
    ) -> Result<std::collections::BTreeMap<IpAddr, Neighbor>> {
        let table: std::collections::BTreeMap<IpAddr, Neighbor> =
            self.dump().await?.into_iter().collect();
        let routes = if routed.is_empty() {
            Vec::new()
        } else {
            self.routes().await?
        };
        Ok(wanted
            .iter()
            .filter_map(|a| {
                let hop = if routed.contains(a) {
                    gateway_of(&routes, *a).unwrap_or(*a)
                } else {
                    *a
                };
                Some((*a, *table.get(&hop)?))
            })
            .collect())
    }

    /// Resolves `addrs` through the neighbour table, all at once, within `within`: one
    /// dump at a time (concurrent dumps on one netlink socket are refused with EBUSY).
    /// A `routed` address is resolved through its gateway.
    pub async fn resolve_all(
        &self,
        addrs: &[IpAddr],
        routed: &[IpAddr],
        within: Duration,
    ) -> std::collections::BTreeMap<IpAddr, Neighbor> {
        let deadline = tokio::time::Instant::now() + within;
        let mut found = std::collections::BTreeMap::new();
        let mut nudged = false;
        loop {
            match self.table_for(addrs, routed).await {
                Ok(table) => found.extend(table),
                Err(e) => tracing::warn!("reading the neighbour table: {e:#}"),
            }
            let missing: Vec<IpAddr> = addrs
                .iter()
                .copied()
                .filter(|a| !found.contains_key(a))
                .collect();
            if missing.is_empty() {
                break;
            }
            if !nudged {
                for a in &missing {
                    nudge(*a);
                }
                nudged = true;
            }
            if tokio::time::Instant::now() >= deadline {
                for a in missing {
                    tracing::warn!(backend = %a, "backend MAC not resolved yet: its frames are dropped (drop_no_route) until it is");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        found
    }

    pub fn handle(&self) -> &rtnetlink::Handle {
        &self.handle
    }

    /// The addresses on an interface.
    pub async fn addresses(&self, ifindex: u32) -> Result<Vec<IpAddr>> {
        crate::shell::vip::addresses(&self.handle, ifindex).await
    }

    /// Whether the interface is up with its link running.
    pub async fn link_up(&self, name: &str) -> Result<bool> {
        use netlink_packet_route::link::LinkFlag;
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        let Some(msg) = links.try_next().await.ok().flatten() else {
            return Ok(false);
        };
        Ok(msg.header.flags.contains(&LinkFlag::Up)
            && msg.header.flags.contains(&LinkFlag::Running))
    }

    /// One of this network namespace's links by name, over netlink (not /sys, which
    /// shows the namespace of whoever mounted it).
    async fn link(&self, name: &str) -> Result<netlink_packet_route::link::LinkMessage> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        let missing = || format!("interface {name} does not exist in this network namespace");
        links
            .try_next()
            .await
            .with_context(missing)?
            .with_context(missing)
    }

    /// The XDP attach mode the kernel reports for `name` ("driver", "skb", "hw",
    /// "multi", or "none"): what is true, whatever was asked for.
    pub async fn xdp_attached(&self, name: &str) -> Result<&'static str> {
        use netlink_packet_route::link::{LinkAttribute, LinkXdp, XdpAttached};
        let msg = self.link(name).await?;
        let attached = msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
                LinkXdp::Attached(a) => Some(*a),
                _ => None,
            }),
            _ => None,
        });
        Ok(match attached {
            Some(XdpAttached::Driver) => "driver",
            Some(XdpAttached::SocketBuffer) => "skb",
            Some(XdpAttached::Hardware) => "hw",
            Some(XdpAttached::Multiple) => "multi",
            _ => "none",
        })
    }

    /// The id of the XDP program attached to `name`, if one is.
    pub async fn xdp_program_id(&self, name: &str) -> Result<Option<u32>> {
        use netlink_packet_route::link::{LinkAttribute, LinkXdp};
        let msg = self.link(name).await?;
        Ok(msg.attributes.iter().find_map(|a| match a {
            LinkAttribute::Xdp(xdp) => xdp.iter().find_map(|x| match x {
                LinkXdp::ProgId(id) if *id != 0 => Some(*id),
                _ => None,
            }),
            _ => None,
        }))
    }

    /// The index of interface `name`, if it exists in this network namespace.
    pub async fn ifindex(&self, name: &str) -> Option<u32> {
        self.link(name).await.ok().map(|m| m.header.index)
    }

    /// Whether `name` is a veth (its link kind over netlink).
    pub async fn is_veth(&self, name: &str) -> Result<bool> {
        use netlink_packet_route::link::{InfoKind, LinkAttribute, LinkInfo};
        let msg = self.link(name).await?;
        Ok(msg.attributes.iter().any(|a| {
            matches!(a, LinkAttribute::LinkInfo(infos)
                if infos.iter().any(|i| matches!(i, LinkInfo::Kind(InfoKind::Veth))))
        }))
    }

    /// Reads one of this network namespace's interfaces: name, index, MAC.
    pub async fn interface(&self, name: &str) -> Result<LocalInterface> {
        use netlink_packet_route::link::LinkAttribute;
        let msg = self.link(name).await?;
        let mac = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Address(m) if m.len() == 6 => <[u8; 6]>::try_from(m.as_slice()).ok(),
                _ => None,
            })
            .with_context(|| format!("interface {name} has no Ethernet address"))?;
        let mtu = msg
            .attributes
            .iter()
            .find_map(|a| match a {
                LinkAttribute::Mtu(m) => Some(*m),
                _ => None,
            })
            .unwrap_or(1500);
        Ok(LocalInterface {
            name: name.to_string(),
            ifindex: msg.header.index,
            mac,
            mtu,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn the_longest_matching_route_names_the_gateway() {
        let routes = [
            (ip("0.0.0.0"), 0, Some(ip("198.18.0.254"))),
            (ip("198.18.0.0"), 24, None),
            (ip("198.18.5.0"), 24, Some(ip("198.18.0.1"))),
            (ip("::"), 0, Some(ip("2001:db8::fe"))),
            (ip("2001:db8::"), 64, None),
        ];
        assert_eq!(
            gateway_of(&routes, ip("198.18.5.7")),
            Some(ip("198.18.0.1"))
        );
        assert_eq!(gateway_of(&routes, ip("198.18.0.7")), None, "on the link");
        assert_eq!(
            gateway_of(&routes, ip("203.0.113.1")),
            Some(ip("198.18.0.254"))
        );
        assert_eq!(
            gateway_of(&routes, ip("2001:db8:5::1")),
            Some(ip("2001:db8::fe"))
        );
        assert_eq!(gateway_of(&routes, ip("2001:db8::9")), None);
        assert_eq!(
            gateway_of(&routes[1..3], ip("203.0.113.1")),
            None,
            "no route"
        );
    }
}
