//! The liveness guard: a node whose lbd died must stop answering ARP and neighbour
//! solicitations for its VIPs within the cluster's timeout, while the program keeps
//! forwarding the flows already steered here. lbd stamps `CONTROL` with how long it
//! is known alive; a request for a served VIP after that is dropped before the
//! kernel can answer it. Only requests are judged: everything else passes as before.

use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::XdpContext};
use lb_common::{AddrKey, FAMILY_V4, FAMILY_V6};
use network_types::eth::EthHdr;

use crate::{
    maps::{CONTROL, VIP_ADDRS},
    parse::ptr_at,
    stats::Exit,
};

const ARP_REQUEST: u16 = 1;
const ICMPV6_NEIGHBOUR_SOLICITATION: u8 = 135;
/// ARP for Ethernet/IPv4: htype, ptype, hlen, plen, op, sha, spa, tha, tpa.
const ARP_OP: usize = 6;
const ARP_TPA: usize = 24;
const IPV6_HEADER: usize = 40;
/// ICMPv6 NS: type, code, checksum, reserved, then the target address.
const NS_TARGET: usize = 8;

/// Whether lbd's stamp has run out (never, if lbd does not stamp).
#[inline(always)]
fn daemon_stale() -> bool {
    match CONTROL.get(0) {
        Some(c) if c.alive_until_ns != 0 => {
            // SAFETY: a helper without arguments.
            let now = unsafe { bpf_ktime_get_ns() };
            now > c.alive_until_ns
        }
        _ => false,
    }
}

#[inline(always)]
fn served(addr: [u8; 16], family: u8) -> bool {
    let key = AddrKey {
        addr,
        family,
        _pad: [0; 3],
    };
    // SAFETY: only presence is read.
    unsafe { VIP_ADDRS.get(&key) }.is_some()
}

/// A frame that is not IP: an ARP request for a served VIP while lbd is stale is
/// dropped, everything else passes (`not_ip`).
#[inline(always)]
pub fn arp(ctx: &XdpContext) -> Exit {
    let Ok(op) = ptr_at::<[u8; 2]>(ctx, EthHdr::LEN + ARP_OP) else {
        return Exit::NotIp;
    };
    let Ok(tpa) = ptr_at::<[u8; 4]>(ctx, EthHdr::LEN + ARP_TPA) else {
        return Exit::NotIp;
    };
    // SAFETY: ptr_at checked the bounds.
    let (op, tpa) = unsafe { (u16::from_be_bytes(*op), *tpa) };
    if op != ARP_REQUEST {
        return Exit::NotIp;
    }
    let mut addr = [0u8; 16];
    addr[..4].copy_from_slice(&tpa);
    if served(addr, FAMILY_V4) && daemon_stale() {
        Exit::DaemonStale
    } else {
        Exit::NotIp
    }
}

/// ICMPv6 not to a VIP: a neighbour solicitation for a served VIP while lbd is
/// stale is dropped, everything else passes (`not_vip`).
#[inline(always)]
pub fn neighbour_solicitation(ctx: &XdpContext) -> Exit {
    let off = EthHdr::LEN + IPV6_HEADER;
    let Ok(kind) = ptr_at::<u8>(ctx, off) else {
        return Exit::NotVip;
    };
    let Ok(target) = ptr_at::<[u8; 16]>(ctx, off + NS_TARGET) else {
        return Exit::NotVip;
    };
    // SAFETY: ptr_at checked the bounds.
    let (kind, target) = unsafe { (*kind, *target) };
    if kind == ICMPV6_NEIGHBOUR_SOLICITATION && served(target, FAMILY_V6) && daemon_stale() {
        Exit::DaemonStale
    } else {
        Exit::NotVip
    }
}
