//! ICMP errors about our flows. A backend answers clients from the VIP, so a router
//! on the way back that cannot forward a reply ("fragmentation needed", "packet too
//! big", "unreachable", "time exceeded") sends its error to the VIP: it arrives here,
//! not at the backend that needs it (without it, path MTU discovery stalls and the
//! connection hangs). The error quotes the reply's headers; the flow it belongs to
//! is that quote reversed, and the error goes to that flow's backend, carried like
//! the flow (`forward::send`). Anything else to a VIP address that is not TCP or UDP
//! (a ping, an error quoting a foreign flow) stays the node's own stack's business.

use aya_ebpf::programs::XdpContext;
use lb_common::{FlowKey, GlobalStats, FAMILY_V4, PROTO_TCP, PROTO_UDP, VIP_F_UNAVAILABLE};

use crate::{
    forward, lookup,
    parse::{ptr_at, L3},
    stats::{self, Exit},
};

const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_ICMPV6: u8 = 58;
const ICMP_HEADER: usize = 8;
const IP4: usize = 20;
const IP6: usize = 40;

/// Whether `proto` is ICMP of the packet's family.
#[inline(always)]
pub fn is_icmp(flow: &FlowKey) -> bool {
    if flow.family == FAMILY_V4 {
        flow.proto == IPPROTO_ICMP
    } else {
        flow.proto == IPPROTO_ICMPV6
    }
}

/// Steers the ICMP error in the frame to the backend of the flow it quotes;
/// `Exit::NotL4` (to the node's stack, as before) when it is no error of ours.
#[inline(always)]
pub fn steer(
    ctx: &XdpContext,
    l3: &L3,
    flow: &mut FlowKey,
    g: &mut GlobalStats,
) -> Result<u32, Exit> {
    // In place: the error's key becomes the quoted flow's (its destination, the VIP,
    // stays), so no second key takes stack.
    quoted_flow(ctx, l3, flow)?;
    let vip = lookup::vip(flow).map_err(|_| Exit::NotL4)?;
    if vip.flags & VIP_F_UNAVAILABLE != 0 {
        return Err(Exit::NotL4);
    }
    // Never entered: an error proves nothing about the flow.
    let (_, backend) =
        lookup::backend(ctx, flow, &vip, false, false, g).map_err(|_| Exit::NotL4)?;
    let action = forward::send(ctx, &backend, flow, l3.ip_end - l3.l3_off, g)?;
    stats::count_icmp_steered(g);
    Ok(action)
}

/// Turns the error's key into the key of the flow it is about, seen from the client:
/// the quoted packet went from the VIP (the error's destination, which stays) to the
/// client (the new source), so its ports swap.
#[inline(always)]
fn quoted_flow(ctx: &XdpContext, l3: &L3, flow: &mut FlowKey) -> Result<(), Exit> {
    let icmp: *const [u8; 2] = ptr_at(ctx, l3.l4_off).map_err(|_| Exit::NotL4)?;
    // SAFETY: ptr_at checked the bounds.
    let kind = unsafe { (*icmp)[0] };
    let quote = l3.l4_off + ICMP_HEADER;
    if flow.family == FAMILY_V4 {
        // Destination unreachable (all codes, "fragmentation needed" among them) and
        // time exceeded.
        if kind != 3 && kind != 11 {
            return Err(Exit::NotL4);
        }
        let ip: *const [u8; IP4] = ptr_at(ctx, quote).map_err(|_| Exit::NotL4)?;
        let ports: *const [u8; 4] = ptr_at(ctx, quote + IP4).map_err(|_| Exit::NotL4)?;
        // SAFETY: ptr_at checked the bounds.
        let (ip, ports) = unsafe { (&*ip, &*ports) };
        let proto = ip[9];
        let quoted_src = [ip[12], ip[13], ip[14], ip[15]];
        let vip = [flow.dst[0], flow.dst[1], flow.dst[2], flow.dst[3]];
        if ip[0] != 0x45
            || (proto != PROTO_TCP && proto != PROTO_UDP)
            || u32::from_ne_bytes(quoted_src) != u32::from_ne_bytes(vip)
        {
            return Err(Exit::NotL4);
        }
        flow.proto = proto;
        for i in 0..4 {
            flow.src[i] = ip[16 + i];
        }
        flow.sport_be = u16::from_ne_bytes([ports[2], ports[3]]);
        flow.dport_be = u16::from_ne_bytes([ports[0], ports[1]]);
    } else {
        // Destination unreachable, packet too big, time exceeded, parameter problem.
        if !(1..=4).contains(&kind) {
            return Err(Exit::NotL4);
        }
        let ip: *const [u8; IP6] = ptr_at(ctx, quote).map_err(|_| Exit::NotL4)?;
        let ports: *const [u8; 4] = ptr_at(ctx, quote + IP6).map_err(|_| Exit::NotL4)?;
        // SAFETY: ptr_at checked the bounds.
        let (ip, ports) = unsafe { (&*ip, &*ports) };
        let proto = ip[6];
        if ip[0] >> 4 != 6
            || (proto != PROTO_TCP && proto != PROTO_UDP)
            || !same16(ip, 8, &flow.dst)
        {
            return Err(Exit::NotL4);
        }
        flow.proto = proto;
        for i in 0..16 {
            flow.src[i] = ip[24 + i];
        }
        flow.sport_be = u16::from_ne_bytes([ports[2], ports[3]]);
        flow.dport_be = u16::from_ne_bytes([ports[0], ports[1]]);
    }
    Ok(())
}

/// Whether `p[at..at + 16]` is `addr`, compared in words (a slice comparison becomes
/// a call of an out-of-line `bcmp`).
#[inline(always)]
fn same16<const N: usize>(p: &[u8; N], at: usize, addr: &[u8; 16]) -> bool {
    let mut diff = 0u32;
    let mut i = 0;
    while i < 16 {
        let a = u32::from_ne_bytes([p[at + i], p[at + i + 1], p[at + i + 2], p[at + i + 3]]);
        let b = u32::from_ne_bytes([addr[i], addr[i + 1], addr[i + 2], addr[i + 3]]);
        diff |= a ^ b;
        i += 4;
    }
    diff == 0
}
