//! Health probes through the tunnel: lbd marks the sockets of an encapsulating
//! service's health checks (`lb_common::probe_mark`), and `lb_probe_encap`, on the
//! egress of the data-plane interfaces, wraps their packets as the service's traffic
//! is wrapped, so that a backend whose decapsulation is broken fails its checks
//! instead of passing them by the direct route. The kernel has already routed the
//! packet (its MACs are the gateway's); the outer destination is the inner one (the
//! backend's own address), the outer source this node's (`PROBE_CONFIG`).
//! Everything unmarked passes untouched.
//!
//! The outer IPv4 header has DF set and a computed checksum; GUE carries no UDP
//! checksum (0: RFC 768 for IPv4, RFC 6935 for IPv6 tunnels) because the probe's own
//! checksum may still be unfinished here (the stack fills it in later).

use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO,
        TC_ACT_OK,
    },
    programs::TcContext,
};
use lb_common::{
    ENCAP_TTL, GUE_SPORT_BASE, PROBE_MARK_BASE, PROBE_MARK_MASK, PROTO_UDP, ROUTE_MODE_GUE,
};

use crate::maps::PROBE_CONFIG;

const ETH: usize = 14;
const IP4: usize = 20;
const IP6: usize = 40;
const UDP: usize = 8;

#[inline(always)]
pub fn run(ctx: &TcContext) -> i32 {
    let _ = wrap(ctx);
    TC_ACT_OK as i32
}

#[inline(always)]
fn wrap(ctx: &TcContext) -> Result<(), i64> {
    // SAFETY: the context's skb pointer is valid for the program's run.
    let mark = unsafe { (*ctx.skb.skb).mark };
    if mark & PROBE_MARK_MASK != PROBE_MARK_BASE {
        return Ok(());
    }
    let gue = mark & 0xff == ROUTE_MODE_GUE;
    let cfg = PROBE_CONFIG.get(0).ok_or(0i64)?;
    let ether: [u8; 2] = ctx.load(12)?;
    match ether {
        [0x08, 0x00] => {
            let inner: [u8; IP4] = ctx.load(ETH)?;
            let ports: [u8; 2] = ctx.load(ETH + IP4)?;
            let inner_len = u16::from_be_bytes([inner[2], inner[3]]) as usize;
            let proto = if gue { PROTO_UDP } else { 4 };
            let outer = if gue { IP4 + UDP } else { IP4 };
            let flags = BPF_F_ADJ_ROOM_FIXED_GSO as u64
                | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
                | if gue {
                    BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
                } else {
                    0
                };
            ctx.adjust_room(outer as i32, BPF_ADJ_ROOM_MAC, flags)?;
            let total = ((inner_len + outer) as u16).to_be_bytes();
            let s = cfg.source_v4;
            let mut h = [
                0x45, inner[1], total[0], total[1], 0, 0, 0x40, 0, ENCAP_TTL, proto, 0, 0, s[0],
                s[1], s[2], s[3], inner[16], inner[17], inner[18], inner[19], 0, 0, 0, 0, 0, 0, 0,
                0,
            ];
            let mut sum = 0u32;
            let mut i = 0;
            while i < IP4 {
                sum += u16::from_be_bytes([h[i], h[i + 1]]) as u32;
                i += 2;
            }
            sum = (sum & 0xffff) + (sum >> 16);
            sum = (sum & 0xffff) + (sum >> 16);
            let c = (!(sum as u16)).to_be_bytes();
            h[10] = c[0];
            h[11] = c[1];
            if gue {
                let sport = (GUE_SPORT_BASE | (u16::from_be_bytes(ports) & 0x3fff)).to_be_bytes();
                let dport = cfg.gue_port_be.to_ne_bytes();
                let len = ((inner_len + UDP) as u16).to_be_bytes();
                h[20] = sport[0];
                h[21] = sport[1];
                h[22] = dport[0];
                h[23] = dport[1];
                h[24] = len[0];
                h[25] = len[1];
                ctx.store(ETH, &h, 0)?;
            } else {
                let head: [u8; IP4] = [
                    h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7], h[8], h[9], h[10], h[11],
                    h[12], h[13], h[14], h[15], h[16], h[17], h[18], h[19],
                ];
                ctx.store(ETH, &head, 0)?;
            }
        }
        [0x86, 0xdd] => {
            let inner: [u8; IP6] = ctx.load(ETH)?;
            let ports: [u8; 2] = ctx.load(ETH + IP6)?;
            let payload = u16::from_be_bytes([inner[4], inner[5]]) as usize;
            let inner_len = IP6 + payload;
            let proto = if gue { PROTO_UDP } else { 41 };
            let outer = if gue { IP6 + UDP } else { IP6 };
            let flags = BPF_F_ADJ_ROOM_FIXED_GSO as u64
                | BPF_F_ADJ_ROOM_ENCAP_L3_IPV6 as u64
                | if gue {
                    BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
                } else {
                    0
                };
            ctx.adjust_room(outer as i32, BPF_ADJ_ROOM_MAC, flags)?;
            let mut h = [0u8; IP6 + UDP];
            // Version and traffic class as the inner packet's; no flow label.
            h[0] = 0x60 | (inner[0] & 0x0f);
            h[1] = inner[1] & 0xf0;
            let len = ((inner_len + outer - IP6) as u16).to_be_bytes();
            h[4] = len[0];
            h[5] = len[1];
            h[6] = proto;
            h[7] = ENCAP_TTL;
            let mut i = 0;
            while i < 16 {
                h[8 + i] = cfg.source_v6[i];
                h[24 + i] = inner[24 + i];
                i += 1;
            }
            if gue {
                let sport = (GUE_SPORT_BASE | (u16::from_be_bytes(ports) & 0x3fff)).to_be_bytes();
                let dport = cfg.gue_port_be.to_ne_bytes();
                let ulen = ((inner_len + UDP) as u16).to_be_bytes();
                h[40] = sport[0];
                h[41] = sport[1];
                h[42] = dport[0];
                h[43] = dport[1];
                h[44] = ulen[0];
                h[45] = ulen[1];
                ctx.store(ETH, &h, 0)?;
            } else {
                let mut head = [0u8; IP6];
                let mut i = 0;
                while i < IP6 {
                    head[i] = h[i];
                    i += 1;
                }
                ctx.store(ETH, &head, 0)?;
            }
        }
        _ => {}
    }
    Ok(())
}
