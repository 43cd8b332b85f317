//! Sending a packet on to its backend. L2 direct server return only for now: the IP
//! packet is untouched, the backend answers the client directly.

use aya_ebpf::{bindings::xdp_action::XDP_TX, programs::XdpContext};
use lb_common::{Backend, GlobalStats, ROUTE_MODE_L2_DSR};
use network_types::eth::EthHdr;

use crate::{
    maps::{ROUTES, TX_PORTS},
    parse::ptr_at_mut,
    stats::{self, Exit},
};

#[inline(always)]
pub fn l2(ctx: &XdpContext, backend: &Backend, g: &mut GlobalStats) -> Result<u32, Exit> {
    let route = ROUTES.get(backend.route_id).ok_or(Exit::NoRoute)?;
    if route.mode != ROUTE_MODE_L2_DSR {
        return Err(Exit::NoRoute);
    }
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
