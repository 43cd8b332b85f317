//! Encapsulation for backends beyond this node's segment: an outer IPv4 or IPv6 header
//! (IP in IP), or one with a UDP header after it (GUE variant 1: the inner packet
//! directly after UDP), from this node's address to the backend's. The client's packet
//! travels unchanged inside; the backend's decapsulation strips the outer headers and
//! answers the client directly from the VIP.
//!
//! - The outer TTL / hop limit is `ENCAP_TTL`; DSCP and ECN are copied from the inner
//!   packet (RFC 6040 normal mode), so queues on the way treat the flow as the client
//!   marked it. IPv4 outer headers have DF set: the tunnel is never fragmented.
//! - A packet that would not fit the path once wrapped is answered with ICMP
//!   "fragmentation needed" (IPv4 with DF) or ICMPv6 "packet too big" naming the MTU
//!   left for the inner packet; an IPv4 packet without DF is dropped and counted.
//! - GUE over IPv4 carries no UDP checksum (0, allowed by RFC 768); over IPv6 the
//!   checksum is computed from the inner packet's own checksums (its L4 checksum
//!   already makes its segment sum known), so no loop over the payload is needed.

use aya_ebpf::{helpers::bpf_xdp_adjust_head, programs::XdpContext};
use lb_common::{
    hash::flow_hash, Backend, FlowKey, GlobalStats, Route, ENCAP_TTL, FAMILY_V4, GUE_SPORT_BASE,
    PROTO_TCP, PROTO_UDP, ROUTE_MODE_GUE,
};

use crate::{
    parse::{ptr_at, ptr_at_mut},
    refuse,
    stats::{self, Exit},
};

const ETH: usize = 14;
const IP4: usize = 20;
const IP6: usize = 40;
const UDP: usize = 8;
const ETH_P_IP: [u8; 2] = [0x08, 0x00];
const ETH_P_IPV6: [u8; 2] = [0x86, 0xdd];
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const IPPROTO_ICMP: u8 = 1;

/// Wraps the frame's IP packet (`inner_len` bytes after the Ethernet header) for
/// `backend` as `route` says. `None`: wrapped, the caller writes the MACs and sends
/// it. `Some(action)`: the packet was too big and was answered instead.
#[inline(always)]
pub fn wrap(
    ctx: &XdpContext,
    route: &Route,
    backend: &Backend,
    flow: &FlowKey,
    inner_len: usize,
    g: &mut GlobalStats,
) -> Result<Option<u32>, Exit> {
    let gue = route.mode == ROUTE_MODE_GUE;
    let mtu = route.mtu as usize;
    match (backend.family == FAMILY_V4, gue) {
        (true, false) => push::<IP4>(ctx, route, backend, flow, inner_len, mtu, g),
        (true, true) => push::<{ IP4 + UDP }>(ctx, route, backend, flow, inner_len, mtu, g),
        (false, false) => push::<IP6>(ctx, route, backend, flow, inner_len, mtu, g),
        (false, true) => push::<{ IP6 + UDP }>(ctx, route, backend, flow, inner_len, mtu, g),
    }
}

/// `OUTER`: the bytes added (outer IP header, and UDP for GUE); which ones is implied
/// by the size. A const, so that every bound below is one the verifier can check.
#[inline(always)]
fn push<const OUTER: usize>(
    ctx: &XdpContext,
    route: &Route,
    backend: &Backend,
    flow: &FlowKey,
    inner_len: usize,
    mtu: usize,
    g: &mut GlobalStats,
) -> Result<Option<u32>, Exit> {
    let outer_v4 = OUTER == IP4 || OUTER == IP4 + UDP;
    let gue = OUTER == IP4 + UDP || OUTER == IP6 + UDP;
    if inner_len + OUTER > mtu {
        return too_big(ctx, flow, mtu.saturating_sub(OUTER), g).map(Some);
    }
    // SAFETY: growing the head of the packet we own; the helper checks the headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(OUTER as i32)) } != 0 {
        return Err(Exit::EncapFailed);
    }
    let inner = ETH + OUTER;
    let first: *const [u8; 4] = ptr_at(ctx, inner).map_err(|_| Exit::Malformed)?;
    // SAFETY: ptr_at checked the bounds.
    let first = unsafe { *first };
    let inner_v4 = first[0] >> 4 == 4;
    // DSCP and ECN, from the inner header's TOS or traffic class.
    let tos = if inner_v4 {
        first[1]
    } else {
        (first[0] << 4) | (first[1] >> 4)
    };
    let eth: *mut [u8; 2] = ptr_at_mut(ctx, 12).map_err(|_| Exit::Malformed)?;
    // SAFETY: ptr_at_mut checked the bounds. The MACs are written by the caller.
    unsafe { *eth = if outer_v4 { ETH_P_IP } else { ETH_P_IPV6 } };
    let proto = if gue {
        PROTO_UDP
    } else if inner_v4 {
        IPPROTO_IPIP
    } else {
        IPPROTO_IPV6
    };
    let hash = if gue || !outer_v4 { flow_hash(flow) } else { 0 };
    let l4_len = (inner_len + UDP) as u16;
    if outer_v4 {
        let ip: *mut [u8; IP4] = ptr_at_mut(ctx, ETH).map_err(|_| Exit::Malformed)?;
        let total = (inner_len + OUTER) as u32;
        let src = word(&route.outer_src, 0);
        let dst = word(&backend.addr, 0);
        // Header words, host order: version/IHL, TOS, length; id, DF; TTL, protocol.
        let w0 = 0x4500_0000 | ((tos as u32) << 16) | total;
        let w1 = 0x0000_4000;
        let w2 = ((ENCAP_TTL as u32) << 24) | ((proto as u32) << 16);
        let (s, d) = (u32::from_be(src), u32::from_be(dst));
        let sum = (w0 >> 16)
            + (w0 & 0xffff)
            + (w1 & 0xffff)
            + (w2 >> 16)
            + (s >> 16)
            + (s & 0xffff)
            + (d >> 16)
            + (d & 0xffff);
        let w2 = w2 | (!fold(sum)) as u32;
        let out = ip as *mut u32;
        // SAFETY: ptr_at_mut checked that 20 bytes lie inside the packet; packet
        // stores need no alignment.
        unsafe {
            out.write_unaligned(w0.to_be());
            out.add(1).write_unaligned(w1.to_be());
            out.add(2).write_unaligned(w2.to_be());
            out.add(3).write_unaligned(src);
            out.add(4).write_unaligned(dst);
        }
        if gue {
            let udp: *mut [u8; UDP] = ptr_at_mut(ctx, ETH + IP4).map_err(|_| Exit::Malformed)?;
            let sport = (GUE_SPORT_BASE | (hash as u16 & 0x3fff)) as u32;
            let ports = (sport << 16) | u16::from_be(route.gue_port_be) as u32;
            let out = udp as *mut u32;
            // SAFETY: ptr_at_mut checked the bounds. No checksum (RFC 768 allows it).
            unsafe {
                out.write_unaligned(ports.to_be());
                out.add(1).write_unaligned(((l4_len as u32) << 16).to_be());
            }
        }
    } else {
        let ip: *mut [u8; IP6] = ptr_at_mut(ctx, ETH).map_err(|_| Exit::Malformed)?;
        let payload = (inner_len + OUTER - IP6) as u32;
        // Version, traffic class, and a flow label from the flow hash (ECMP on the way
        // hashes it); payload length, next header, hop limit.
        let w0 = (6u32 << 28) | ((tos as u32) << 20) | (hash & 0x000f_ffff);
        let w1 = (payload << 16) | ((proto as u32) << 8) | ENCAP_TTL as u32;
        let out = ip as *mut u32;
        // SAFETY: ptr_at_mut checked that 40 bytes lie inside the packet.
        unsafe {
            out.write_unaligned(w0.to_be());
            out.add(1).write_unaligned(w1.to_be());
            for i in 0..4 {
                out.add(2 + i).write_unaligned(word(&route.outer_src, i));
                out.add(6 + i).write_unaligned(word(&backend.addr, i));
            }
        }
        if gue {
            let sport = GUE_SPORT_BASE | (hash as u16 & 0x3fff);
            let dport = u16::from_be(route.gue_port_be);
            let sum = inner_sum(ctx, inner, inner_v4)?;
            let csum = match sum {
                // An inner UDP datagram without a checksum tells nothing of its data:
                // zero, which RFC 6935 allows for tunnels.
                None => 0,
                Some(inner) => {
                    let mut s = words16(&route.outer_src) + words16(&backend.addr);
                    // Pseudo header: upper-layer length and next header; then the UDP
                    // header (its length once more).
                    s += l4_len as u32 + PROTO_UDP as u32;
                    s += sport as u32 + dport as u32 + l4_len as u32;
                    s += inner;
                    let c = !fold(s);
                    if c == 0 {
                        0xffff
                    } else {
                        c
                    }
                }
            };
            let udp: *mut [u8; UDP] = ptr_at_mut(ctx, ETH + IP6).map_err(|_| Exit::Malformed)?;
            let (sp, dp, len, cs) = (
                sport.to_be_bytes(),
                dport.to_be_bytes(),
                l4_len.to_be_bytes(),
                csum.to_be_bytes(),
            );
            // SAFETY: ptr_at_mut checked the bounds.
            unsafe { *udp = [sp[0], sp[1], dp[0], dp[1], len[0], len[1], cs[0], cs[1]] };
        }
    }
    Ok(None)
}

/// Word `i` of a 16-byte address, as it lies in memory.
#[inline(always)]
fn word(a: &[u8; 16], i: usize) -> u32 {
    // SAFETY: i < 4, so the 4 bytes lie inside the array.
    unsafe { (a.as_ptr() as *const u32).add(i).read_unaligned() }
}

/// Sum of the 16-bit words of a 16-byte address.
#[inline(always)]
fn words16(a: &[u8; 16]) -> u32 {
    let mut s = 0u32;
    let mut i = 0;
    while i < 16 {
        s += u16::from_be_bytes([a[i], a[i + 1]]) as u32;
        i += 2;
    }
    s
}

/// Folds a 32-bit one's-complement sum into 16 bits.
#[inline(always)]
fn fold(mut s: u32) -> u16 {
    s = (s & 0xffff) + (s >> 16);
    s = (s & 0xffff) + (s >> 16);
    s as u16
}

/// One's-complement negation of a 16-bit value, as an addend.
#[inline(always)]
fn neg(v: u32) -> u32 {
    0xffff - fold(v) as u32
}

/// The one's-complement sum of the inner packet's bytes, known without reading its
/// payload: a valid L4 checksum makes segment + pseudo header sum to zero, so the
/// segment sums to minus its pseudo header; a valid IPv4 header sums to zero, an
/// IPv6 header's words are read. `None` for an IPv4 UDP datagram without checksum.
#[inline(always)]
fn inner_sum(ctx: &XdpContext, inner: usize, inner_v4: bool) -> Result<Option<u32>, Exit> {
    if inner_v4 {
        let ip: *const [u8; IP4] = ptr_at(ctx, inner).map_err(|_| Exit::Malformed)?;
        // SAFETY: ptr_at checked the bounds.
        let ip = unsafe { &*ip };
        let proto = ip[9];
        let total = u16::from_be_bytes([ip[2], ip[3]]) as u32;
        let header = ((ip[0] & 0x0f) as u32) * 4;
        if proto == IPPROTO_ICMP {
            // ICMP's checksum covers its message alone: the segment sums to zero.
            return Ok(Some(0));
        }
        if proto == PROTO_UDP {
            let udp: *const [u8; UDP] = ptr_at(ctx, inner + IP4).map_err(|_| Exit::Malformed)?;
            // SAFETY: ptr_at checked the bounds.
            let udp = unsafe { &*udp };
            if udp[6] == 0 && udp[7] == 0 {
                return Ok(None);
            }
        }
        let mut pseudo = 0u32;
        let mut i = 12;
        while i < 20 {
            pseudo += u16::from_be_bytes([ip[i], ip[i + 1]]) as u32;
            i += 2;
        }
        pseudo += proto as u32 + total.saturating_sub(header);
        Ok(Some(neg(pseudo)))
    } else {
        let ip: *const [u8; IP6] = ptr_at(ctx, inner).map_err(|_| Exit::Malformed)?;
        // SAFETY: ptr_at checked the bounds.
        let ip = unsafe { &*ip };
        // The header's addresses and payload length are in the pseudo header too and
        // cancel; what is left is its first two words, next header and hop limit, less
        // the pseudo header's next header.
        let mut s = u16::from_be_bytes([ip[0], ip[1]]) as u32;
        s += u16::from_be_bytes([ip[2], ip[3]]) as u32;
        s += u16::from_be_bytes([ip[6], ip[7]]) as u32;
        s += neg(ip[6] as u32);
        Ok(Some(s))
    }
}

/// The packet does not fit the path once wrapped: tell the client the MTU it has
/// (`room`), as a router would; never fragment. Only TCP and UDP are answered (an
/// ICMP error is never answered with another, RFC 1122 3.2.2).
#[inline(always)]
fn too_big(
    ctx: &XdpContext,
    flow: &FlowKey,
    room: usize,
    g: &mut GlobalStats,
) -> Result<u32, Exit> {
    let ip: *const [u8; 10] = ptr_at(ctx, ETH).map_err(|_| Exit::Malformed)?;
    // SAFETY: ptr_at checked the bounds.
    let ip = unsafe { &*ip };
    let v4 = ip[0] >> 4 == 4;
    let proto = if v4 { ip[9] } else { ip[6] };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return Err(Exit::TooBig);
    }
    if v4 && ip[6] & 0x40 == 0 {
        // No DF: the client lets routers fragment, which we never do.
        return Err(Exit::TooBig);
    }
    refuse::answerable(ctx, flow).map_err(|_| Exit::TooBig)?;
    refuse::allowed(&flow.src).map_err(|_| Exit::TooBig)?;
    let mtu = room as u16;
    if v4 {
        let m = mtu.to_be_bytes();
        // Destination unreachable, fragmentation needed and DF set (RFC 1191).
        refuse::icmp_v4(ctx, 3, 4, [0, 0, m[0], m[1]])?;
    } else {
        // Packet too big (RFC 4443 3.2).
        refuse::icmp_v6(ctx, 2, 0, (mtu as u32).to_be_bytes())?;
    }
    stats::count_too_big(g);
    Ok(aya_ebpf::bindings::xdp_action::XDP_TX)
}
