//! Sending a packet on to its backend. L2 direct server return only for now: the IP
//! packet is untouched, the backend answers the client directly.

use aya_ebpf::{bindings::xdp_action::XDP_TX, programs::XdpContext};
use lb_common::{Backend, ROUTE_MODE_L2_DSR};
use network_types::eth::EthHdr;

use crate::{
    maps::{ROUTES, TX_PORTS},
    parse::ptr_at_mut,
    stats::{self, Exit},
};

#[inline(always)]
pub fn l2(ctx: &XdpContext, backend: &Backend) -> Result<u32, Exit> {
    let route = ROUTES.get(backend.route_id).ok_or(Exit::NoRoute)?;
    if route.mode != ROUTE_MODE_L2_DSR {
        return Err(Exit::NoRoute);
    }
    let eth: *mut EthHdr = ptr_at_mut(ctx, 0).map_err(|_| Exit::Malformed)?;
    // SAFETY: ptr_at_mut checked that the Ethernet header lies inside the packet.
    unsafe {
        (*eth).dst_addr = route.dst_mac;
        (*eth).src_addr = route.src_mac;
    }
    if route.tx_port == 0 {
        stats::count_tx();
        return Ok(XDP_TX);
    }
    match TX_PORTS.redirect(route.tx_port, 0) {
        Ok(action) => {
            stats::count_redirect();
            Ok(action)
        }
        Err(_) => Err(Exit::RedirectFailed),
    }
}
