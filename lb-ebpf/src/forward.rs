//! Sending a packet on to its backend, as its route says: L2 direct server return
//! (the IP packet untouched, new MACs) or wrapped in an outer header (`encap`) for a
//! backend beyond this node's segment, sent to the gateway's MAC. Either way the
//! backend answers the client directly.

use aya_ebpf::{bindings::xdp_action::XDP_TX, programs::XdpContext};
use lb_common::{
    Backend, FlowKey, GlobalStats, Route, ROUTE_MODE_GUE, ROUTE_MODE_IPIP, ROUTE_MODE_L2_DSR,
};
use network_types::eth::EthHdr;

use crate::{
    encap,
    maps::{ROUTES, TX_PORTS},
    parse::ptr_at_mut,
    stats::{self, Exit},
};

/// Sends the frame's IP packet (`ip_len` bytes after the Ethernet header) to
/// `backend`. `flow` is the flow it belongs to (for an ICMP error, the flow it
/// quotes): it picks the outer flow label and GUE source port.
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    backend: &Backend,
    flow: &FlowKey,
    ip_len: usize,
    g: &mut GlobalStats,
) -> Result<u32, Exit> {
    stats::unpack(send_apart(ctx, backend, flow, ip_len, g))
}

// Not inlined: a function of its own has a stack frame of its own, and the main
// program's, with the encapsulation's inlined, would exceed BPF's 512 bytes.
#[inline(never)]
fn send_apart(
    ctx: &XdpContext,
    backend: &Backend,
    flow: &FlowKey,
    ip_len: usize,
    g: &mut GlobalStats,
) -> u64 {
    stats::pack(sending(ctx, backend, flow, ip_len, g))
}

#[inline(always)]
fn sending(
    ctx: &XdpContext,
    backend: &Backend,
    flow: &FlowKey,
    ip_len: usize,
    g: &mut GlobalStats,
) -> Result<u32, Exit> {
    let route = ROUTES.get(backend.route_id).ok_or(Exit::NoRoute)?;
    let mode = route.mode;
    if mode == ROUTE_MODE_IPIP || mode == ROUTE_MODE_GUE {
        if let Some(answered) = encap::wrap(ctx, route, backend, flow, ip_len, g)? {
            return Ok(answered);
        }
    } else if mode != ROUTE_MODE_L2_DSR {
        return Err(Exit::NoRoute);
    }
    write_macs(ctx, route)?;
    let action = egress(route, g)?;
    match mode {
        ROUTE_MODE_L2_DSR => g.fwd_l2 += 1,
        ROUTE_MODE_IPIP => g.fwd_ipip += 1,
        _ => g.fwd_gue += 1,
    }
    Ok(action)
}

#[inline(always)]
fn write_macs(ctx: &XdpContext, route: &Route) -> Result<(), Exit> {
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0).map_err(|_| Exit::Malformed)?;
    // Both MACs as three 32-bit words: `Route` holds them back to back in the order
    // of the Ethernet header, and a 6-byte array copy becomes a byte loop in BPF.
    let macs = core::ptr::addr_of!(route.dst_mac) as *const u32;
    let out = eth as *mut u32;
    // SAFETY: `macs` points at 12 bytes of the route (dst_mac, then src_mac, 4-byte
    // aligned after two u32 fields); ptr_at_mut checked that the 14-byte Ethernet
    // header lies inside the packet; packet stores need no alignment here.
    unsafe {
        core::ptr::write_unaligned(out, core::ptr::read_unaligned(macs));
        core::ptr::write_unaligned(out.add(1), core::ptr::read_unaligned(macs.add(1)));
        core::ptr::write_unaligned(out.add(2), core::ptr::read_unaligned(macs.add(2)));
    }
    Ok(())
}

#[inline(always)]
fn egress(route: &Route, g: &mut GlobalStats) -> Result<u32, Exit> {
    if route.tx_port == 0 {
        stats::count_tx(g);
        return Ok(XDP_TX);
    }
    match TX_PORTS.redirect(route.tx_port, 0) {
        Ok(action) => {
            stats::count_redirect(g);
            Ok(action)
        }
        Err(_) => Err(Exit::RedirectFailed),
    }
}
