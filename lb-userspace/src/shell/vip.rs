//! Taking a VIP on and off this node's interface: the address (netlink), the
//! announcement that moves clients' and routers' caches to our MAC (gratuitous ARP for
//! IPv4, unsolicited neighbour advertisement for IPv6, sent with pnet), and the
//! operator's optional script.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::Path,
    time::Duration,
};

use anyhow::{bail, Context, Result};
use futures::TryStreamExt;
use pnet::{
    datalink::{self, Channel, DataLinkSender},
    packet::{
        arp::{ArpHardwareTypes, ArpOperations, MutableArpPacket},
        ethernet::{EtherTypes, MutableEthernetPacket},
        icmpv6::{self, Icmpv6Packet},
        ip::IpNextHeaderProtocols,
        ipv6::MutableIpv6Packet,
        Packet,
    },
    util::MacAddr,
};

/// Gratuitous ARP: a broadcast ARP request whose sender and target are both the VIP.
pub fn garp_frame(mac: [u8; 6], vip: Ipv4Addr) -> Vec<u8> {
    let mut frame = vec![0u8; 14 + 28];
    {
        let mut eth = MutableEthernetPacket::new(&mut frame).expect("sized");
        eth.set_destination(MacAddr::broadcast());
        eth.set_source(MacAddr::from(mac));
        eth.set_ethertype(EtherTypes::Arp);
    }
    let mut arp = MutableArpPacket::new(&mut frame[14..]).expect("sized");
    arp.set_hardware_type(ArpHardwareTypes::Ethernet);
    arp.set_protocol_type(EtherTypes::Ipv4);
    arp.set_hw_addr_len(6);
    arp.set_proto_addr_len(4);
    arp.set_operation(ArpOperations::Request);
    arp.set_sender_hw_addr(MacAddr::from(mac));
    arp.set_sender_proto_addr(vip);
    arp.set_target_hw_addr(MacAddr::zero());
    arp.set_target_proto_addr(vip);
    frame
}

/// Unsolicited neighbour advertisement to all nodes, override flag set, with our MAC
/// as the target link-layer address option.
pub fn unsolicited_na_frame(mac: [u8; 6], vip: Ipv6Addr) -> Vec<u8> {
    let all_nodes: Ipv6Addr = "ff02::1".parse().expect("valid");
    let mut icmp = vec![0u8; 32];
    icmp[0] = 136; // neighbour advertisement
    icmp[4] = 0x20; // override
    icmp[8..24].copy_from_slice(&vip.octets());
    icmp[24] = 2; // target link-layer address
    icmp[25] = 1; // 8 bytes
    icmp[26..32].copy_from_slice(&mac);
    let sum = icmpv6::checksum(&Icmpv6Packet::new(&icmp).expect("sized"), &vip, &all_nodes);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());

    let mut frame = vec![0u8; 14 + 40 + icmp.len()];
    {
        let mut eth = MutableEthernetPacket::new(&mut frame).expect("sized");
        eth.set_destination(MacAddr::new(0x33, 0x33, 0, 0, 0, 1));
        eth.set_source(MacAddr::from(mac));
        eth.set_ethertype(EtherTypes::Ipv6);
    }
    let mut ip = MutableIpv6Packet::new(&mut frame[14..]).expect("sized");
    ip.set_version(6);
    ip.set_payload_length(icmp.len() as u16);
    ip.set_next_header(IpNextHeaderProtocols::Icmpv6);
    ip.set_hop_limit(255);
    ip.set_source(vip);
    ip.set_destination(all_nodes);
    ip.set_payload(&icmp);
    debug_assert_eq!(ip.packet().len(), 40 + 32);
    frame
}

pub fn announcement(mac: [u8; 6], vip: IpAddr) -> Vec<u8> {
    match vip {
        IpAddr::V4(a) => garp_frame(mac, a),
        IpAddr::V6(a) => unsolicited_na_frame(mac, a),
    }
}

/// A raw sender on one interface (of the calling thread's network namespace).
pub struct Announcer {
    tx: Box<dyn DataLinkSender>,
    mac: [u8; 6],
}

impl Announcer {
    pub fn open(interface: &str) -> Result<Self> {
        let iface = datalink::interfaces()
            .into_iter()
            .find(|i| i.name == interface)
            .with_context(|| format!("interface {interface} not found for announcements"))?;
        let mac = iface
            .mac
            .with_context(|| format!("interface {interface} has no MAC"))?;
        match datalink::channel(&iface, Default::default())
            .context("opening a raw socket for announcements")?
        {
            Channel::Ethernet(tx, _rx) => Ok(Self {
                tx,
                mac: mac.octets(),
            }),
            _ => bail!("interface {interface}: not an Ethernet channel"),
        }
    }

    pub fn announce(&mut self, vip: IpAddr) -> Result<()> {
        let frame = announcement(self.mac, vip);
        match self.tx.send_to(&frame, None) {
            Some(r) => r.context("sending the announcement"),
            None => bail!("sending the announcement: no buffer"),
        }
    }
}

/// Asks `target` for its MAC with an ARP request from `src` on `interface`, and waits
/// up to `timeout` for the answer. Blocking: run it on a blocking thread.
pub fn arp_probe(
    interface: &str,
    src: Ipv4Addr,
    target: Ipv4Addr,
    timeout: Duration,
) -> Result<Option<[u8; 6]>> {
    let iface = datalink::interfaces()
        .into_iter()
        .find(|i| i.name == interface)
        .with_context(|| format!("interface {interface} not found for ARP probes"))?;
    let mac = iface
        .mac
        .with_context(|| format!("interface {interface} has no MAC"))?;
    let config = datalink::Config {
        read_timeout: Some(Duration::from_millis(20)),
        ..Default::default()
    };
    let (mut tx, mut rx) =
        match datalink::channel(&iface, config).context("opening a raw socket for ARP probes")? {
            Channel::Ethernet(tx, rx) => (tx, rx),
            _ => bail!("interface {interface}: not an Ethernet channel"),
        };
    let mut frame = garp_frame(mac.octets(), src);
    {
        let mut arp = MutableArpPacket::new(&mut frame[14..]).expect("sized");
        arp.set_target_proto_addr(target);
    }
    tx.send_to(&frame, None)
        .context("no buffer for the ARP probe")?
        .context("sending the ARP probe")?;
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        let Ok(bytes) = rx.next() else { continue };
        let Some(eth) = pnet::packet::ethernet::EthernetPacket::new(bytes) else {
            continue;
        };
        if eth.get_ethertype() != EtherTypes::Arp {
            continue;
        }
        let Some(arp) = pnet::packet::arp::ArpPacket::new(eth.payload()) else {
            continue;
        };
        if arp.get_operation() == ArpOperations::Reply && arp.get_sender_proto_addr() == target {
            return Ok(Some(arp.get_sender_hw_addr().octets()));
        }
    }
    Ok(None)
}

/// Adds `vip` (as a host address) to the interface; already there is fine.
pub async fn add_address(handle: &rtnetlink::Handle, ifindex: u32, vip: IpAddr) -> Result<()> {
    let prefix = if vip.is_ipv4() { 32 } else { 128 };
    match handle.address().add(ifindex, vip, prefix).execute().await {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc_eexist() => Ok(()),
        Err(e) => Err(e).with_context(|| format!("adding {vip} to interface {ifindex}")),
    }
}

fn libc_eexist() -> i32 {
    nix::errno::Errno::EEXIST as i32
}

/// Removes `vip` from the interface; not there is fine.
pub async fn remove_address(handle: &rtnetlink::Handle, ifindex: u32, vip: IpAddr) -> Result<()> {
    let mut found = handle
        .address()
        .get()
        .set_link_index_filter(ifindex)
        .set_address_filter(vip)
        .execute();
    while let Some(msg) = found
        .try_next()
        .await
        .context("listing interface addresses")?
    {
        handle
            .address()
            .del(msg)
            .execute()
            .await
            .with_context(|| format!("removing {vip} from interface {ifindex}"))?;
    }
    Ok(())
}

/// Every address of every interface (of the calling thread's network namespace).
pub async fn all_addresses(handle: &rtnetlink::Handle) -> Result<Vec<IpAddr>> {
    collect_addresses(handle.address().get()).await
}

/// The addresses on an interface.
pub async fn addresses(handle: &rtnetlink::Handle, ifindex: u32) -> Result<Vec<IpAddr>> {
    collect_addresses(handle.address().get().set_link_index_filter(ifindex)).await
}

async fn collect_addresses(request: rtnetlink::AddressGetRequest) -> Result<Vec<IpAddr>> {
    use netlink_packet_route::address::AddressAttribute;
    let mut out = Vec::new();
    let mut found = request.execute();
    while let Some(msg) = found
        .try_next()
        .await
        .context("listing interface addresses")?
    {
        for a in msg.attributes {
            if let AddressAttribute::Address(ip) = a {
                out.push(ip);
            }
        }
    }
    Ok(out)
}

/// Runs the operator's script as `SCRIPT acquire|release VIP`, killed after `timeout`.
pub async fn run_script(script: &Path, verb: &str, vip: IpAddr, timeout: Duration) -> Result<()> {
    let mut child = tokio::process::Command::new(script)
        .arg(verb)
        .arg(vip.to_string())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {}", script.display()))?;
    match tokio::time::timeout(timeout, child.wait()).await {
        Ok(Ok(status)) if status.success() => Ok(()),
        Ok(Ok(status)) => bail!("{} {verb} {vip} exited with {status}", script.display()),
        Ok(Err(e)) => Err(e).with_context(|| format!("waiting for {}", script.display())),
        Err(_) => bail!(
            "{} {verb} {vip} did not finish within {timeout:?}; killed",
            script.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pnet::packet::{arp::ArpPacket, ethernet::EthernetPacket};

    #[test]
    fn a_gratuitous_arp_names_the_vip_as_sender_and_target() {
        let f = garp_frame([2, 0, 0, 0, 0, 7], "198.18.0.100".parse().unwrap());
        let eth = EthernetPacket::new(&f).unwrap();
        assert_eq!(eth.get_destination(), MacAddr::broadcast());
        assert_eq!(eth.get_ethertype(), EtherTypes::Arp);
        let arp = ArpPacket::new(eth.payload()).unwrap();
        assert_eq!(arp.get_sender_proto_addr(), arp.get_target_proto_addr());
        assert_eq!(arp.get_sender_hw_addr(), MacAddr::new(2, 0, 0, 0, 0, 7));
    }

    #[test]
    fn an_unsolicited_na_checksums_and_carries_our_mac() {
        let vip: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let f = unsolicited_na_frame([2, 0, 0, 0, 0, 7], vip);
        let icmp = &f[54..];
        let all: Ipv6Addr = "ff02::1".parse().unwrap();
        let sum = icmpv6::checksum(&Icmpv6Packet::new(icmp).unwrap(), &vip, &all);
        assert_eq!(u16::from_be_bytes([icmp[2], icmp[3]]), sum);
        assert_eq!(&icmp[26..32], &[2, 0, 0, 0, 0, 7]);
    }
}
