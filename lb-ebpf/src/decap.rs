//! The backend side: `lb_decap` strips the outer header from IP-in-IP and GUE packets
//! that LB nodes sent (their outer source is in `DECAP_SOURCES`) and passes the inner
//! packet, addressed to a VIP on this host's `lo`, to the stack. No tunnel device and
//! no kernel module: the kernel never sees the tunnel. Everything else passes as it
//! came.
//!
//! ECN follows RFC 6040: a CE mark set on the outer header on the way is copied into
//! an ECN-capable inner packet, and an inner packet that is not ECN-capable is dropped.

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC,
        xdp_action::{XDP_DROP, XDP_PASS},
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4, BPF_F_ADJ_ROOM_DECAP_L3_IPV6, TC_ACT_OK, TC_ACT_SHOT,
    },
    helpers::bpf_xdp_adjust_head,
    programs::{TcContext, XdpContext},
};
use lb_common::{AddrKey, DecapStats, FAMILY_V4, FAMILY_V6, PROTO_UDP};

use crate::{
    maps::{DECAP_CONFIG, DECAP_SOURCES, DECAP_STATS},
    parse::{ptr_at, ptr_at_mut},
};

const ETH: usize = 14;
const IP4: usize = 20;
const IP6: usize = 40;
const UDP: usize = 8;
const IPPROTO_IPIP: u8 = 4;
const IPPROTO_IPV6: u8 = 41;
const ECN_CE: u8 = 3;

enum Verdict {
    Ipip,
    Gue,
    ForeignSource,
    Malformed,
    CeDropped,
    Passed,
}

#[inline(always)]
pub fn run(ctx: &XdpContext) -> u32 {
    let verdict = decap(ctx).unwrap_or(Verdict::Passed);
    count(&verdict);
    match verdict {
        Verdict::CeDropped => XDP_DROP,
        _ => XDP_PASS,
    }
}

/// The same for tc ingress (`lb_decap_tc`), where an interface takes no XDP program:
/// the headers are read with `bpf_skb_load_bytes` and removed with
/// `bpf_skb_adjust_room`.
#[inline(always)]
pub fn run_tc(ctx: &TcContext) -> i32 {
    let verdict = decap_skb(ctx).unwrap_or(Verdict::Passed);
    count(&verdict);
    match verdict {
        Verdict::CeDropped => TC_ACT_SHOT as i32,
        _ => TC_ACT_OK as i32,
    }
}

#[inline(always)]
fn count(verdict: &Verdict) {
    if let Some(s) = DECAP_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's own slot.
        let s: &mut DecapStats = unsafe { &mut *s };
        *match verdict {
            Verdict::Ipip => &mut s.ipip,
            Verdict::Gue => &mut s.gue,
            Verdict::ForeignSource => &mut s.foreign_source,
            Verdict::Malformed => &mut s.malformed,
            Verdict::CeDropped => &mut s.ce_dropped,
            Verdict::Passed => &mut s.passed,
        } += 1;
    }
}

/// Whether `addr` (of `family`) is an LB node's outer source.
#[inline(always)]
fn from_lb(addr: &[u8], family: u8) -> bool {
    let mut key = AddrKey {
        family,
        ..AddrKey::default()
    };
    let n = if family == FAMILY_V4 { 4 } else { 16 };
    let mut i = 0;
    while i < n && i < addr.len() {
        key.addr[i] = addr[i];
        i += 1;
    }
    // SAFETY: a plain value, only tested for presence.
    unsafe { DECAP_SOURCES.get(&key) }.is_some()
}

/// An encapsulated packet from an LB node, to strip: the bytes after Ethernet to
/// remove, the inner version the outer header announces (0: any; GUE says it by the
/// version nibble), the outer ECN bits, and whether it is GUE.
struct Strip {
    outer: usize,
    want: u8,
    ecn: u8,
    gue: bool,
}

/// Judges an outer IPv4 header: `Err` is the verdict to pass it with. `dport` reads
/// the UDP destination port after it, when needed.
#[inline(always)]
fn judge_v4(
    ip: &[u8; IP4],
    gue_port: u16,
    dport: impl FnOnce() -> Option<u16>,
) -> Result<Strip, Verdict> {
    if ip[0] != 0x45 {
        return Err(Verdict::Passed);
    }
    let gue = judge_proto(ip[9], gue_port, dport)?;
    if !from_lb(&ip[12..16], FAMILY_V4) {
        return Err(Verdict::ForeignSource);
    }
    if (ip[6] & 0x3f) | ip[7] != 0 {
        // A fragment of the outer packet: the inner one is not whole here.
        return Err(Verdict::Malformed);
    }
    Ok(Strip {
        outer: if gue { IP4 + UDP } else { IP4 },
        want: announced(ip[9]),
        ecn: ip[1] & 3,
        gue,
    })
}

/// As `judge_v4`, for an outer IPv6 header.
#[inline(always)]
fn judge_v6(
    ip: &[u8; IP6],
    gue_port: u16,
    dport: impl FnOnce() -> Option<u16>,
) -> Result<Strip, Verdict> {
    if ip[0] >> 4 != 6 {
        return Err(Verdict::Passed);
    }
    let gue = judge_proto(ip[6], gue_port, dport)?;
    if !from_lb(&ip[8..24], FAMILY_V6) {
        return Err(Verdict::ForeignSource);
    }
    Ok(Strip {
        outer: if gue { IP6 + UDP } else { IP6 },
        want: announced(ip[6]),
        ecn: (ip[1] >> 4) & 3,
        gue,
    })
}

/// Whether the outer protocol is GUE (UDP to our port) or IPIP; `Err`: neither.
#[inline(always)]
fn judge_proto(
    proto: u8,
    gue_port: u16,
    dport: impl FnOnce() -> Option<u16>,
) -> Result<bool, Verdict> {
    match proto {
        IPPROTO_IPIP | IPPROTO_IPV6 => Ok(false),
        PROTO_UDP if gue_port != 0 && dport() == Some(gue_port) => Ok(true),
        _ => Err(Verdict::Passed),
    }
}

/// The inner version an outer protocol number announces (0: GUE, any).
#[inline(always)]
fn announced(proto: u8) -> u8 {
    match proto {
        IPPROTO_IPIP => 4,
        IPPROTO_IPV6 => 6,
        _ => 0,
    }
}

/// Checks the inner header's start (`inner`: 20 bytes, all of an IPv4 header, the
/// start of an IPv6 one) and applies RFC 6040 to it. Returns its version and whether
/// `inner` was changed (CE copied in; for IPv4 the checksum updated, RFC 1624).
#[inline(always)]
fn judge_inner(inner: &mut [u8; IP4], strip: &Strip) -> Result<(u8, bool), Verdict> {
    let version = inner[0] >> 4;
    if (version != 4 && version != 6) || (strip.want != 0 && version != strip.want) {
        return Err(Verdict::Malformed);
    }
    if strip.ecn != ECN_CE {
        return Ok((version, false));
    }
    if version == 4 {
        if inner[1] & 3 == 0 {
            return Err(Verdict::CeDropped);
        }
        let old = u16::from_be_bytes([inner[0], inner[1]]);
        inner[1] |= ECN_CE;
        let new = u16::from_be_bytes([inner[0], inner[1]]);
        let check = u16::from_be_bytes([inner[10], inner[11]]);
        let mut sum = (!check) as u32 + (!old) as u32 + new as u32;
        sum = (sum & 0xffff) + (sum >> 16);
        sum = (sum & 0xffff) + (sum >> 16);
        let c = (!(sum as u16)).to_be_bytes();
        inner[10] = c[0];
        inner[11] = c[1];
    } else {
        if (inner[1] >> 4) & 3 == 0 {
            return Err(Verdict::CeDropped);
        }
        inner[1] |= ECN_CE << 4;
    }
    Ok((version, true))
}

#[inline(always)]
fn decap_skb(ctx: &TcContext) -> Result<Verdict, i64> {
    let ether: [u8; 2] = ctx.load(12)?;
    let gue_port = DECAP_CONFIG.get(0).map_or(0, |c| c.gue_port_be);
    let udp_dport = |off: usize| {
        ctx.load::<[u8; 4]>(off)
            .ok()
            .map(|p| u16::from_ne_bytes([p[2], p[3]]))
    };
    let (judged, outer_v4) = match ether {
        [0x08, 0x00] => {
            let ip: [u8; IP4] = ctx.load(ETH)?;
            (judge_v4(&ip, gue_port, || udp_dport(ETH + IP4)), true)
        }
        [0x86, 0xdd] => {
            let ip: [u8; IP6] = ctx.load(ETH)?;
            (judge_v6(&ip, gue_port, || udp_dport(ETH + IP6)), false)
        }
        _ => return Ok(Verdict::Passed),
    };
    let strip = match judged {
        Ok(s) => s,
        Err(v) => return Ok(v),
    };
    let inner_at = ETH + strip.outer;
    let Ok(mut inner) = ctx.load::<[u8; IP4]>(inner_at) else {
        return Ok(Verdict::Malformed);
    };
    let (version, changed) = match judge_inner(&mut inner, &strip) {
        Ok(j) => j,
        Err(v) => return Ok(v),
    };
    if changed {
        ctx.store(inner_at, &inner, 0)?;
    }
    let inner_v4 = version == 4;
    let flags = if inner_v4 == outer_v4 {
        0
    } else if inner_v4 {
        BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64
    } else {
        BPF_F_ADJ_ROOM_DECAP_L3_IPV6 as u64
    };
    if ctx
        .adjust_room(-(strip.outer as i32), BPF_ADJ_ROOM_MAC, flags)
        .is_err()
    {
        return Ok(Verdict::Malformed);
    }
    if inner_v4 != outer_v4 {
        let ether: [u8; 2] = if inner_v4 { [0x08, 0x00] } else { [0x86, 0xdd] };
        ctx.store(12, &ether, 0)?;
    }
    Ok(if strip.gue {
        Verdict::Gue
    } else {
        Verdict::Ipip
    })
}

#[inline(always)]
fn decap(ctx: &XdpContext) -> Result<Verdict, ()> {
    let eth: *const [u8; ETH] = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at checked the bounds.
    let eth = unsafe { *eth };
    let gue_port = DECAP_CONFIG.get(0).map_or(0, |c| c.gue_port_be);
    let judged = match [eth[12], eth[13]] {
        [0x08, 0x00] => {
            let ip: *const [u8; IP4] = ptr_at(ctx, ETH)?;
            // SAFETY: ptr_at checked the bounds.
            judge_v4(unsafe { &*ip }, gue_port, || dport(ctx, ETH + IP4).ok())
        }
        [0x86, 0xdd] => {
            let ip: *const [u8; IP6] = ptr_at(ctx, ETH)?;
            // SAFETY: ptr_at checked the bounds.
            judge_v6(unsafe { &*ip }, gue_port, || dport(ctx, ETH + IP6).ok())
        }
        _ => return Ok(Verdict::Passed),
    };
    let strip = match judged {
        Ok(s) => s,
        Err(v) => return Ok(v),
    };
    // The outer size as a constant for each case, so the verifier can bound it.
    match strip.outer {
        IP4 => remove::<IP4>(ctx, &eth, &strip),
        o if o == IP4 + UDP => remove::<{ IP4 + UDP }>(ctx, &eth, &strip),
        IP6 => remove::<IP6>(ctx, &eth, &strip),
        _ => remove::<{ IP6 + UDP }>(ctx, &eth, &strip),
    }
}

/// The UDP destination port at `off`, as it lies in the packet.
#[inline(always)]
fn dport(ctx: &XdpContext, off: usize) -> Result<u16, ()> {
    let udp: *const [u8; 4] = ptr_at(ctx, off)?;
    // SAFETY: ptr_at checked the bounds.
    let udp = unsafe { &*udp };
    Ok(u16::from_ne_bytes([udp[2], udp[3]]))
}

/// Removes the `OUTER` bytes after the Ethernet header.
#[inline(always)]
fn remove<const OUTER: usize>(
    ctx: &XdpContext,
    eth: &[u8; ETH],
    strip: &Strip,
) -> Result<Verdict, ()> {
    let inner: *mut [u8; IP4] = match ptr_at_mut(ctx, ETH + OUTER) {
        Ok(p) => p,
        Err(_) => return Ok(Verdict::Malformed),
    };
    // SAFETY: ptr_at_mut checked the bounds; changed in place.
    let (version, _) = match judge_inner(unsafe { &mut *inner }, strip) {
        Ok(j) => j,
        Err(v) => return Ok(v),
    };
    let ether_type: [u8; 2] = if version == 4 {
        [0x08, 0x00]
    } else {
        [0x86, 0xdd]
    };
    // SAFETY: shrinking the head of the packet we own; the helper checks the bounds.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, OUTER as i32) } != 0 {
        return Ok(Verdict::Malformed);
    }
    let out: *mut [u8; ETH] = ptr_at_mut(ctx, 0)?;
    let mut e = *eth;
    e[12] = ether_type[0];
    e[13] = ether_type[1];
    // SAFETY: ptr_at_mut checked the bounds.
    unsafe { *out = e };
    Ok(if strip.gue {
        Verdict::Gue
    } else {
        Verdict::Ipip
    })
}
