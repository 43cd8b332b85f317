//! Frames for the data-plane tests and benchmark, built with pnet so that the bytes
//! come from an independent implementation of the headers, not from the program's own.

#![allow(dead_code)]

use std::net::IpAddr;

use pnet::{
    packet::{
        ethernet::{EtherType, EtherTypes, MutableEthernetPacket},
        ip::{IpNextHeaderProtocol, IpNextHeaderProtocols},
        ipv4::{self, MutableIpv4Packet},
        ipv6::MutableIpv6Packet,
        tcp::{self, MutableTcpPacket, TcpFlags},
        udp::{self, MutableUdpPacket},
    },
    util::MacAddr,
};

pub const ETH_LEN: usize = 14;
pub const IPV4_LEN: usize = 20;
pub const IPV6_LEN: usize = 40;
pub const TCP_LEN: usize = 20;
pub const UDP_LEN: usize = 8;

pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
pub const LB_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x02];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum L4 {
    Tcp,
    Udp,
    /// Any other IP protocol number, with `payload` as its body.
    Other(u8),
}

/// One frame's worth of headers. `build` gives a well-formed frame; tests that want a
/// broken one edit the bytes afterwards, at the offsets above.
#[derive(Clone, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: IpAddr,
    pub dst: IpAddr,
    pub l4: L4,
    pub sport: u16,
    pub dport: u16,
    pub payload: Vec<u8>,
    /// IPv4 options (a multiple of 4 bytes), or for IPv6 one extension header of this
    /// next-header number, 8 bytes long, between the fixed header and L4.
    pub ipv4_options: Vec<u8>,
    pub ipv6_ext: Option<u8>,
    /// IPv4 flags+fragment offset field as sent (host order).
    pub ipv4_frag: u16,
    /// TCP flags (SYN by default: a new connection's first packet).
    pub tcp_flags: u8,
}

impl Frame {
    pub fn new(src: IpAddr, dst: IpAddr, l4: L4, sport: u16, dport: u16) -> Self {
        Self {
            src_mac: CLIENT_MAC,
            dst_mac: LB_MAC,
            src,
            dst,
            l4,
            sport,
            dport,
            payload: b"hello, backend".to_vec(),
            ipv4_options: Vec::new(),
            ipv6_ext: None,
            ipv4_frag: 0x4000, // DF
            tcp_flags: TcpFlags::SYN,
        }
    }

    pub fn tcp(src: &str, dst: &str, sport: u16, dport: u16) -> Self {
        Self::new(
            src.parse().unwrap(),
            dst.parse().unwrap(),
            L4::Tcp,
            sport,
            dport,
        )
    }

    /// This frame as a packet of an established connection (ACK only).
    pub fn established(mut self) -> Self {
        self.tcp_flags = TcpFlags::ACK;
        self
    }

    pub fn udp(src: &str, dst: &str, sport: u16, dport: u16) -> Self {
        Self::new(
            src.parse().unwrap(),
            dst.parse().unwrap(),
            L4::Udp,
            sport,
            dport,
        )
    }

    fn l4_bytes(&self) -> (IpNextHeaderProtocol, Vec<u8>) {
        match self.l4 {
            L4::Tcp => {
                let mut buf = vec![0u8; TCP_LEN + self.payload.len()];
                let mut tcp = MutableTcpPacket::new(&mut buf).unwrap();
                tcp.set_source(self.sport);
                tcp.set_destination(self.dport);
                tcp.set_sequence(1);
                tcp.set_data_offset(5);
                tcp.set_flags(self.tcp_flags);
                tcp.set_window(65535);
                tcp.set_payload(&self.payload);
                let sum = match (self.src, self.dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        tcp::ipv4_checksum(&tcp.to_immutable(), &s, &d)
                    }
                    (IpAddr::V6(s), IpAddr::V6(d)) => {
                        tcp::ipv6_checksum(&tcp.to_immutable(), &s, &d)
                    }
                    _ => panic!("mixed families"),
                };
                tcp.set_checksum(sum);
                (IpNextHeaderProtocols::Tcp, buf)
            }
            L4::Udp => {
                let mut buf = vec![0u8; UDP_LEN + self.payload.len()];
                let mut udp = MutableUdpPacket::new(&mut buf).unwrap();
                udp.set_source(self.sport);
                udp.set_destination(self.dport);
                udp.set_length((UDP_LEN + self.payload.len()) as u16);
                udp.set_payload(&self.payload);
                let sum = match (self.src, self.dst) {
                    (IpAddr::V4(s), IpAddr::V4(d)) => {
                        udp::ipv4_checksum(&udp.to_immutable(), &s, &d)
                    }
                    (IpAddr::V6(s), IpAddr::V6(d)) => {
                        udp::ipv6_checksum(&udp.to_immutable(), &s, &d)
                    }
                    _ => panic!("mixed families"),
                };
                udp.set_checksum(sum);
                (IpNextHeaderProtocols::Udp, buf)
            }
            L4::Other(p) => (IpNextHeaderProtocol(p), self.payload.clone()),
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let (proto, l4) = self.l4_bytes();
        let (ethertype, ip): (EtherType, Vec<u8>) = match (self.src, self.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                let header_len = IPV4_LEN + self.ipv4_options.len();
                assert_eq!(self.ipv4_options.len() % 4, 0, "IPv4 options come in words");
                let mut buf = vec![0u8; header_len + l4.len()];
                let mut ip = MutableIpv4Packet::new(&mut buf).unwrap();
                ip.set_version(4);
                ip.set_header_length((header_len / 4) as u8);
                ip.set_total_length((header_len + l4.len()) as u16);
                ip.set_identification(0x1234);
                ip.set_flags((self.ipv4_frag >> 13) as u8);
                ip.set_fragment_offset(self.ipv4_frag & 0x1fff);
                ip.set_ttl(64);
                ip.set_next_level_protocol(proto);
                ip.set_source(s);
                ip.set_destination(d);
                drop(ip);
                buf[IPV4_LEN..header_len].copy_from_slice(&self.ipv4_options);
                buf[header_len..].copy_from_slice(&l4);
                let sum = ipv4::checksum(&pnet::packet::ipv4::Ipv4Packet::new(&buf).unwrap());
                MutableIpv4Packet::new(&mut buf).unwrap().set_checksum(sum);
                (EtherTypes::Ipv4, buf)
            }
            (IpAddr::V6(s), IpAddr::V6(d)) => {
                let ext_len = if self.ipv6_ext.is_some() { 8 } else { 0 };
                let mut buf = vec![0u8; IPV6_LEN + ext_len + l4.len()];
                let mut ip = MutableIpv6Packet::new(&mut buf).unwrap();
                ip.set_version(6);
                ip.set_payload_length((ext_len + l4.len()) as u16);
                ip.set_next_header(match self.ipv6_ext {
                    Some(n) => IpNextHeaderProtocol(n),
                    None => proto,
                });
                ip.set_hop_limit(64);
                ip.set_source(s);
                ip.set_destination(d);
                drop(ip);
                if self.ipv6_ext.is_some() {
                    // next header, then a length of 0 (8 bytes in all), then zero padding.
                    buf[IPV6_LEN] = proto.0;
                }
                buf[IPV6_LEN + ext_len..].copy_from_slice(&l4);
                (EtherTypes::Ipv6, buf)
            }
            _ => panic!("mixed families"),
        };
        let mut frame = vec![0u8; ETH_LEN + ip.len()];
        let mut eth = MutableEthernetPacket::new(&mut frame).unwrap();
        eth.set_destination(MacAddr::from(self.dst_mac));
        eth.set_source(MacAddr::from(self.src_mac));
        eth.set_ethertype(ethertype);
        eth.set_payload(&ip);
        frame
    }
}

/// Destination and source MAC of a frame.
pub fn macs(frame: &[u8]) -> ([u8; 6], [u8; 6]) {
    (
        frame[0..6].try_into().unwrap(),
        frame[6..12].try_into().unwrap(),
    )
}

/// A distinct backend MAC per index.
pub fn backend_mac(i: u8) -> [u8; 6] {
    [0x02, 0xbe, 0, 0, 0, i]
}

/// Runs `frame` through `program` with `BPF_PROG_TEST_RUN`: the verdict and the
/// frame that left (room for a frame grown in front, as the refusals do).
pub fn test_run(
    programs: &lb_userspace::Programs,
    program: lb_userspace::Program,
    frame: &[u8],
) -> (u32, Vec<u8>) {
    use aya::programs::{TestRun, TestRunOptions};
    let mut out = vec![0u8; frame.len() + 512];
    let result = programs
        .program(program)
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ..TestRunOptions::default()
        })
        .expect("BPF_PROG_TEST_RUN");
    out.truncate(result.data_size_out as usize);
    (result.return_value, out)
}

/// What the reconciler knows on a test node: `desired`, one interface (eth0) and a
/// directory that has fed it.
pub fn known(desired: lb_userspace::desired::Desired) -> lb_userspace::reconcile::Known {
    lb_userspace::reconcile::Known {
        desired,
        interfaces: vec![lb_userspace::model::LocalInterface {
            name: "eth0".into(),
            ifindex: 2,
            mac: [2, 0, 0, 0, 0, 0xfe],
            mtu: 1500,
        }],
        directory_fed: true,
        ..Default::default()
    }
}
