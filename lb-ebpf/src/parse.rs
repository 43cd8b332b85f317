//! Header parsing. The only module that knows byte offsets; every packet access goes
//! through `ptr_at`, which proves to the verifier (and to a hostile packet) that the
//! whole header lies inside the frame.

use core::mem::size_of;

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKey, ADDR_F_PASS_IRREGULAR, FAMILY_V4, FAMILY_V6, PROTO_TCP, PROTO_UDP};
use network_types::{eth::EthHdr, ip::Ipv4Hdr, ip::Ipv6Hdr, tcp::TcpHdr, udp::UdpHdr};

use crate::stats::Exit;

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPV4_MF_AND_OFFSET: u16 = 0x3fff;
/// IPv6 extension headers we do not walk: hop-by-hop, routing, destination options,
/// ESP, AH, mobility, HIP, shim6 and the two experimental values (RFC 3692). Ports
/// behind them cannot be read at a fixed offset (behind ESP, not at all).
const IPV6_EXT_HEADERS: [u8; 10] = [0, 43, 50, 51, 60, 135, 139, 140, 253, 254];
const IPV6_FRAGMENT: u8 = 44;

#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, ()> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return Err(());
    }
    Ok((start + offset) as *const T)
}

#[inline(always)]
pub fn ptr_at_mut<T>(ctx: &XdpContext, offset: usize) -> Result<*mut T, ()> {
    ptr_at::<T>(ctx, offset).map(|p| p as *mut T)
}

/// What is wrong with an IP packet whose destination we could read. Judged only once
/// we know the packet is addressed to a VIP: foreign traffic is the kernel's business.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Irregular {
    None,
    Malformed,
    Fragment,
    Options,
}

pub struct L3 {
    pub irregular: Irregular,
    /// Offset of the IP header.
    pub l3_off: usize,
    /// Offset of the L4 header (fixed: packets with options never reach L4 parsing).
    pub l4_off: usize,
    /// Offset one past the IP packet's last byte, from its own length field.
    pub ip_end: usize,
}

/// A zeroed flow key, as five 8-byte stores: `FlowKey::default()` compiles to a call of
/// an out-of-line byte loop (memset) in BPF, and an IPv4 key needs its unused address
/// bytes and the padding zero (they are part of the connection table's key).
#[inline(always)]
pub fn zeroed_flow(slot: &mut core::mem::MaybeUninit<FlowKey>) -> &mut FlowKey {
    let words = slot.as_mut_ptr() as *mut u64;
    // SAFETY: FlowKey is 40 bytes, 8-aligned, plain data: five u64 stores cover it and
    // every bit pattern is a valid FlowKey. Volatile, or LLVM merges them back into
    // a memset call.
    unsafe {
        for i in 0..5 {
            core::ptr::write_volatile(words.add(i), 0);
        }
        slot.assume_init_mut()
    }
}

/// Copies a 16-byte address out of the packet as four 4-byte words (a `copy_from_slice`
/// of 16 bytes becomes a call of an out-of-line memcpy).
#[inline(always)]
fn copy_addr16(to: &mut [u8; 16], from: &[u8; 16]) {
    let from = from.as_ptr() as *const u32;
    let to = to.as_mut_ptr() as *mut u32;
    // SAFETY: both are 16 bytes; unaligned accesses for the packet's side, and the
    // key's side is 8-aligned (FlowKey's addresses lie at offsets 0 and 16).
    unsafe {
        for i in 0..4 {
            core::ptr::write_unaligned(to.add(i), core::ptr::read_unaligned(from.add(i)));
        }
    }
}

/// Reads the IP header into `flow` (addresses, protocol, family).
#[inline(always)]
pub fn l3(ctx: &XdpContext, flow: &mut FlowKey) -> Result<L3, Exit> {
    let eth: *const EthHdr = ptr_at(ctx, 0).map_err(|_| Exit::NotIp)?;
    // SAFETY: ptr_at checked the bounds.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let frame_len = ctx.data_end() - ctx.data();
    match ether_type {
        ETH_P_IP => ipv4(ctx, flow, frame_len),
        ETH_P_IPV6 => ipv6(ctx, flow, frame_len),
        _ => Err(Exit::NotIp),
    }
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, flow: &mut FlowKey, frame_len: usize) -> Result<L3, Exit> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).map_err(|_| Exit::Unparsed)?;
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { &*ip };
    flow.family = FAMILY_V4;
    flow.proto = ip.proto;
    flow.src[..4].copy_from_slice(&ip.src_addr);
    flow.dst[..4].copy_from_slice(&ip.dst_addr);
    let version = ip.vihl >> 4;
    let header_len = ((ip.vihl & 0x0f) as usize) * 4;
    let total_len = u16::from_be_bytes(ip.tot_len) as usize;
    let frags = u16::from_be_bytes(ip.frags);
    let irregular = if version != 4
        || header_len < Ipv4Hdr::LEN
        || total_len < header_len
        || EthHdr::LEN + total_len > frame_len
    {
        Irregular::Malformed
    } else if frags & IPV4_MF_AND_OFFSET != 0 {
        Irregular::Fragment
    } else if header_len > Ipv4Hdr::LEN {
        Irregular::Options
    } else {
        Irregular::None
    };
    Ok(L3 {
        irregular,
        l3_off: EthHdr::LEN,
        l4_off: EthHdr::LEN + Ipv4Hdr::LEN,
        ip_end: EthHdr::LEN + total_len,
    })
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, flow: &mut FlowKey, frame_len: usize) -> Result<L3, Exit> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, EthHdr::LEN).map_err(|_| Exit::Unparsed)?;
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { &*ip };
    flow.family = FAMILY_V6;
    flow.proto = ip.next_hdr;
    copy_addr16(&mut flow.src, &ip.src_addr);
    copy_addr16(&mut flow.dst, &ip.dst_addr);
    let version = ip.vcf[0] >> 4;
    let total_len = Ipv6Hdr::LEN + u16::from_be_bytes(ip.payload_len) as usize;
    let irregular = if version != 6 || EthHdr::LEN + total_len > frame_len {
        Irregular::Malformed
    } else if ip.next_hdr == IPV6_FRAGMENT {
        Irregular::Fragment
    } else if IPV6_EXT_HEADERS.contains(&ip.next_hdr) {
        Irregular::Options
    } else {
        Irregular::None
    };
    Ok(L3 {
        irregular,
        l3_off: EthHdr::LEN,
        l4_off: EthHdr::LEN + Ipv6Hdr::LEN,
        ip_end: EthHdr::LEN + total_len,
    })
}

/// The fragment/option policy, applied once the destination is known to be ours.
#[inline(always)]
pub fn check_regular(irregular: Irregular, addr_flags: u32) -> Result<(), Exit> {
    let pass = addr_flags & ADDR_F_PASS_IRREGULAR != 0;
    match irregular {
        Irregular::None => Ok(()),
        Irregular::Malformed => Err(Exit::Malformed),
        Irregular::Fragment if pass => Err(Exit::PassIrregular),
        Irregular::Fragment => Err(Exit::Fragment),
        Irregular::Options if pass => Err(Exit::PassIrregular),
        Irregular::Options => Err(Exit::IpOptions),
    }
}

/// TCP flag bits of the header's 14th byte.
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// Reads the ports into `flow`, and says whether a flow missing from the connection
/// table is entered on this packet. Only TCP and UDP are balanced; anything else to a
/// VIP address is the node's own stack's (ping, ICMP errors).
///
/// A TCP flow is entered at its first packet of a synchronized connection (ACK set,
/// neither SYN nor RST), not at its SYN: a SYN proves nothing about its source, and a
/// flood of spoofed SYNs would otherwise evict the table's real flows. The SYN is
/// steered by the Maglev table, as its ACK will be. UDP has no handshake: every
/// packet is entered.
#[inline(always)]
pub fn l4(ctx: &XdpContext, l3: &L3, flow: &mut FlowKey) -> Result<bool, Exit> {
    match flow.proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l3.l4_off).map_err(|_| Exit::Malformed)?;
            // SAFETY: ptr_at checked the bounds.
            let tcp = unsafe { &*tcp };
            let header_len = (tcp.doff() as usize) * 4;
            if header_len < TcpHdr::LEN || l3.l4_off + header_len > l3.ip_end {
                return Err(Exit::Malformed);
            }
            flow.sport_be = u16::from_ne_bytes(tcp.source);
            flow.dport_be = u16::from_ne_bytes(tcp.dest);
            // SAFETY: byte 13 of the 20-byte header ptr_at checked.
            let flags = unsafe { *(tcp as *const TcpHdr as *const u8).add(13) };
            Ok(flags & (TCP_ACK | TCP_SYN | TCP_RST) == TCP_ACK)
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l3.l4_off).map_err(|_| Exit::Malformed)?;
            // SAFETY: ptr_at checked the bounds.
            let udp = unsafe { &*udp };
            let len = u16::from_be_bytes(udp.len) as usize;
            if len < UdpHdr::LEN || l3.l4_off + len > l3.ip_end {
                return Err(Exit::Malformed);
            }
            flow.sport_be = u16::from_ne_bytes(udp.src);
            flow.dport_be = u16::from_ne_bytes(udp.dst);
            Ok(true)
        }
        _ => Err(Exit::NotL4),
    }
}
