//! The balancer's XDP program. `lb_xdp` reads top to bottom as a packet's path:
//! parse L3 (ARP and neighbour solicitations: the liveness guard) → is the destination a VIP address → is the packet regular → parse L4 →
//! which service → which backend (connection table, then Maglev) → forward.
//! Each stage returns `Result<_, Exit>`; an `Exit` carries the reason, and the reason
//! decides both the verdict and the counter, in one place (`stats::count_exit`).
#![no_std]
// `core::intrinsics::atomic_cxchg`: core's atomics have no compare-exchange on
// bpfel-unknown-none, the intrinsic emits BPF_CMPXCHG (the build sets RUSTC_BOOTSTRAP).
#![feature(core_intrinsics)]
#![allow(internal_features)]
#![no_main]

mod decap;
mod encap;
mod forward;
mod guard;
mod icmp;
mod lookup;
mod maps;
mod parse;
mod probe;
mod refuse;
mod sets;
mod stats;

use aya_ebpf::{
    bindings::xdp_action::{XDP_DROP, XDP_PASS, XDP_TX},
    macros::{classifier, xdp},
    programs::{TcContext, XdpContext},
};
use lb_common::{FlowKey, GlobalStats, FAMILY_V6, PROTO_TCP, PROTO_UDP, VIP_F_UNAVAILABLE};
use lookup::Established;
use network_types::eth::EthHdr;
use parse::Irregular;
use stats::Exit;

#[xdp]
pub fn lb_xdp(ctx: XdpContext) -> u32 {
    // Index 0 of a one-entry array: always there.
    let Some(g) = stats::global() else {
        return XDP_PASS;
    };
    match balance(&ctx, g) {
        Ok(action) => action,
        Err(exit) => {
            stats::count_exit(g, exit);
            exit.action()
        }
    }
}

#[inline(always)]
fn balance(ctx: &XdpContext, g: &mut GlobalStats) -> Result<u32, Exit> {
    let mut slot = core::mem::MaybeUninit::uninit();
    let flow = parse::zeroed_flow(&mut slot);
    let l3 = match parse::l3(ctx, flow) {
        Err(Exit::NotIp) => return Err(guard::arp(ctx)),
        other => other?,
    };
    // A regular TCP or UDP packet needs no address lookup: the filter's clear bit
    // says "not ours", and its service lookup decides the rest. The address (its
    // fragment/option policy, ICMPv6 for the guard) matters only for the others.
    let fast =
        l3.irregular == Irregular::None && (flow.proto == PROTO_TCP || flow.proto == PROTO_UDP);
    if fast {
        lookup::vip_filter(flow)?;
    } else {
        let addr = match lookup::vip_addr(flow) {
            Err(Exit::NotVip) if flow.family == FAMILY_V6 && flow.proto == icmp::IPPROTO_ICMPV6 => {
                return Err(guard::neighbour_solicitation(ctx))
            }
            other => other?,
        };
        parse::check_regular(l3.irregular, addr.flags)?;
        if icmp::is_icmp(flow) {
            return icmp::steer(ctx, &l3, flow, g);
        }
    }
    // Past the filter on the fast path, the destination may still be foreign (a
    // shared bit): what would drop or miss is checked against the address table, so
    // that foreign traffic always passes.
    let foreign = |e: Exit, flow: &FlowKey| {
        if fast && lookup::vip_addr(flow).is_err() {
            Exit::NotVip
        } else {
            e
        }
    };
    let enter = match parse::l4(ctx, &l3, flow) {
        Ok(enter) => enter,
        Err(e) => return Err(foreign(e, flow)),
    };
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    // An established flow's packet finds its service through its backend; the
    // others look their service up by address, port and protocol.
    let (backend_id, backend) = match lookup::established(flow, g) {
        Established::Forward(id, b) => {
            stats::count_vip(b.vip_id, frame_len);
            (id, b)
        }
        Established::Refuse(vip_id) => {
            stats::count_vip(vip_id, frame_len);
            return refuse::refuse(ctx, flow, g);
        }
        known => {
            let vip = lookup::vip(flow).map_err(|e| foreign(e, flow))?;
            // Past the filter on the fast path, the address may be one this node
            // does not serve (it shares a served one's bit) and still have its
            // services in `VIPS`: the service's state word says.
            if fast && !lookup::served(vip.vip_id, flow) {
                return Err(Exit::NotVip);
            }
            stats::count_vip(vip.vip_id, frame_len);
            if vip.flags & VIP_F_UNAVAILABLE != 0 {
                return refuse::refuse(ctx, flow, g);
            }
            let new = matches!(known, Established::New);
            lookup::backend(ctx, flow, &vip, enter, new, g)?
        }
    };
    let action = forward::send(ctx, &backend, flow, l3.ip_end - l3.l3_off, g)?;
    stats::count_backend(backend_id, frame_len);
    Ok(action)
}

/// Passes everything. Attached to the peer of a veth that `lb_xdp` transmits on:
/// without an XDP program there, veth drops `XDP_TX`/`XDP_REDIRECT` frames.
#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

/// The backend side: strips IPIP/GUE sent by the LB nodes (`decap`).
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    decap::run(&ctx)
}

/// The backend side where an interface takes no XDP program: the same on tc ingress.
#[classifier]
pub fn lb_decap_tc(ctx: TcContext) -> i32 {
    decap::run_tc(&ctx)
}

/// tc egress of the data-plane interfaces: lbd's marked health probes of an
/// encapsulating service leave wrapped like its traffic (`probe`).
#[classifier]
pub fn lb_probe_encap(ctx: TcContext) -> i32 {
    probe::run(&ctx)
}

/// The benchmark's baseline: the least a forwarding XDP program can do.
#[xdp]
pub fn lb_swap_macs(ctx: XdpContext) -> u32 {
    let Ok(eth) = parse::ptr_at_mut::<EthHdr>(&ctx, 0) else {
        return XDP_DROP;
    };
    // SAFETY: ptr_at_mut checked that a whole EthHdr lies inside the packet.
    unsafe {
        let dst = (*eth).dst_addr;
        (*eth).dst_addr = (*eth).src_addr;
        (*eth).src_addr = dst;
    }
    XDP_TX
}

/// The least any XDP program costs: the benchmark shows it beside the baseline.
#[xdp]
pub fn lb_drop(_ctx: XdpContext) -> u32 {
    XDP_DROP
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the verifier rejects any program with a reachable panic path, so a
    // program that loaded never gets here.
    unsafe { core::hint::unreachable_unchecked() }
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
