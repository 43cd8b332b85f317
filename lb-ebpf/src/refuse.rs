//! Fast-fail for an unavailable service: the client is told at once instead of timing
//! out. A TCP SYN gets a RST, a UDP datagram an ICMP (ICMPv6) "administratively
//! prohibited" quoting it; both are built in place and sent back out (`XDP_TX`).
//! Everything else of the service is dropped. Refusals are limited per source, so
//! that spoofed traffic cannot turn the balancer into a reflector.
//!
//! Headers are handled as byte arrays at fixed offsets: packets with IP options or
//! IPv6 extension headers never get here (`parse::check_regular`).

use aya_ebpf::{
    bindings::xdp_action::XDP_TX,
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{
    FlowKey, GlobalStats, RefuseBucket, FAMILY_V4, PROTO_TCP, PROTO_UDP, REFUSALS_PER_SECOND,
};

use crate::{
    maps::REFUSALS,
    parse::{ptr_at, ptr_at_mut},
    stats::{self, Exit},
};

const ETH: usize = 14;
const IP4: usize = 20;
const IP6: usize = 40;
const TCP: usize = 20;
/// What an ICMP error quotes of the refused datagram beyond its IP header: the UDP
/// header (RFC 792's "64 bits of the original data").
const QUOTED_L4: usize = 8;

const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

#[inline(always)]
pub fn refuse(ctx: &XdpContext, flow: &FlowKey, g: &mut GlobalStats) -> Result<u32, Exit> {
    stats::unpack(refuse_apart(ctx, flow, g))
}

// Not inlined: its own frame keeps the main program's stack within BPF's 512 bytes.
#[inline(never)]
fn refuse_apart(ctx: &XdpContext, flow: &FlowKey, g: &mut GlobalStats) -> u64 {
    stats::pack(refusal(ctx, flow, g))
}

#[inline(always)]
fn refusal(ctx: &XdpContext, flow: &FlowKey, g: &mut GlobalStats) -> Result<u32, Exit> {
    let v4 = flow.family == FAMILY_V4;
    answerable(ctx, flow)?;
    match flow.proto {
        PROTO_TCP => {
            let l4 = if v4 { ETH + IP4 } else { ETH + IP6 };
            let tcp: *const [u8; TCP] = ptr_at(ctx, l4).map_err(|_| Exit::Malformed)?;
            // SAFETY: ptr_at checked the bounds.
            let flags = unsafe { (*tcp)[13] };
            // Only a connection attempt is answered; a RST to anything else could be
            // used to reset other people's connections.
            if flags & (TCP_SYN | TCP_ACK | TCP_RST) != TCP_SYN {
                return Err(Exit::Unavailable);
            }
            allowed(&flow.src)?;
            if v4 {
                rst_v4(ctx)?
            } else {
                rst_v6(ctx)?
            }
            stats::count_refuse_rst(g);
            Ok(XDP_TX)
        }
        PROTO_UDP => {
            allowed(&flow.src)?;
            if v4 {
                // Destination unreachable, communication administratively prohibited.
                icmp_v4(ctx, 3, 13, [0; 4])?
            } else {
                // Destination unreachable, communication with the destination
                // administratively prohibited.
                icmp_v6(ctx, 1, 1, [0; 4])?
            }
            stats::count_refuse_icmp(g);
            Ok(XDP_TX)
        }
        _ => Err(Exit::Unavailable),
    }
}

/// Whether a refusal may be sent at all (RFC 1122 3.2.2): the frame was unicast to us
/// from a unicast station, and its source is a unicast host that is not the VIP
/// itself, so that a spoofed source can neither make us answer a group nor escape the
/// per-source budget.
#[inline(always)]
pub fn answerable(ctx: &XdpContext, flow: &FlowKey) -> Result<(), Exit> {
    let eth: *const [u8; ETH] = ptr_at(ctx, 0).map_err(|_| Exit::Malformed)?;
    // SAFETY: ptr_at checked the bounds.
    let eth = unsafe { &*eth };
    // The group bit of either MAC: broadcast or multicast.
    let zero_src = eth[6] | eth[7] | eth[8] | eth[9] | eth[10] | eth[11] == 0;
    if eth[0] & 1 != 0 || eth[6] & 1 != 0 || zero_src {
        return Err(Exit::RefuseInvalid);
    }
    let s = &flow.src;
    let bad = if flow.family == FAMILY_V4 {
        // 0/8 this network, 127/8 loopback, 224/4 multicast, 240/4 reserved and
        // 255.255.255.255 broadcast.
        s[0] == 0 || s[0] == 127 || s[0] >= 224
    } else {
        let high = u64::from_be_bytes([s[0], s[1], s[2], s[3], s[4], s[5], s[6], s[7]]);
        let low = u64::from_be_bytes([s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15]]);
        // ::, ::1 and ff00::/8 multicast.
        (high == 0 && low <= 1) || s[0] == 0xff
    };
    if bad || flow.src == flow.dst {
        return Err(Exit::RefuseInvalid);
    }
    Ok(())
}

/// At most `REFUSALS_PER_SECOND` per source in each one-second window.
#[inline(always)]
pub fn allowed(src: &[u8; 16]) -> Result<(), Exit> {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    match REFUSALS.get_ptr_mut(src) {
        Some(b) => {
            // SAFETY: a value of the map; racing updates from other CPUs only make
            // the limit approximate.
            let b = unsafe { &mut *b };
            if now.wrapping_sub(b.window_start_ns) >= 1_000_000_000 {
                b.window_start_ns = now;
                b.count = 1;
                Ok(())
            } else if b.count < REFUSALS_PER_SECOND {
                b.count += 1;
                Ok(())
            } else {
                Err(Exit::RefuseLimited)
            }
        }
        None => {
            let b = RefuseBucket {
                window_start_ns: now,
                count: 1,
            };
            // A full LRU evicts; a failed insert only loses the count.
            let _ = REFUSALS.insert(src, &b, 0);
            Ok(())
        }
    }
}

/// The Internet checksum of `data` (even length), folded and complemented.
#[inline(always)]
pub fn checksum<const N: usize>(data: &[u8; N]) -> [u8; 2] {
    let mut sum: u32 = 0;
    let mut i = 0;
    while i + 1 < N {
        sum += u16::from_be_bytes([data[i], data[i + 1]]) as u32;
        i += 2;
    }
    // At most 48 words: two folds bring any such sum into 16 bits, and a fixed
    // number of steps keeps the verifier's work small.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

#[inline(always)]
fn swap_macs(eth: &mut [u8; ETH]) {
    for i in 0..6 {
        eth.swap(i, i + 6);
    }
}

/// Cuts the frame to `len` bytes.
#[inline(always)]
fn shrink(ctx: &XdpContext, len: usize) -> Result<(), Exit> {
    let now = ctx.data_end() - ctx.data();
    if now > len {
        // SAFETY: shrinking the packet we own; the helper checks the bounds.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, len as i32 - now as i32) } != 0 {
            return Err(Exit::Unavailable);
        }
    }
    Ok(())
}

const TCP_FIN: u8 = 0x01;

/// The answer's acknowledgment number (RFC 793): the SYN's sequence number plus one
/// for the SYN, one for a FIN, and any data it carried.
#[inline(always)]
fn ack_for(tcp: &[u8; TCP], segment_len: usize) -> [u8; 4] {
    let seq = u32::from_be_bytes([tcp[4], tcp[5], tcp[6], tcp[7]]);
    let header = ((tcp[12] >> 4) as usize) * 4;
    let data = segment_len.saturating_sub(header) as u32;
    let fin = (tcp[13] & TCP_FIN != 0) as u32;
    seq.wrapping_add(1 + fin).wrapping_add(data).to_be_bytes()
}

/// Turns the SYN's TCP header into the RST's (ports swapped, no options).
#[inline(always)]
fn rst_header(tcp: &mut [u8; TCP], ack: [u8; 4]) {
    tcp.swap(0, 2);
    tcp.swap(1, 3);
    tcp[4..8].copy_from_slice(&[0; 4]);
    tcp[8..12].copy_from_slice(&ack);
    tcp[12] = (TCP as u8 / 4) << 4;
    tcp[13] = TCP_RST | TCP_ACK;
    tcp[14..20].copy_from_slice(&[0; 6]);
}

#[inline(always)]
fn rst_v4(ctx: &XdpContext) -> Result<(), Exit> {
    let eth: *mut [u8; ETH] = ptr_at_mut(ctx, 0).map_err(|_| Exit::Malformed)?;
    let ip: *mut [u8; IP4] = ptr_at_mut(ctx, ETH).map_err(|_| Exit::Malformed)?;
    let tcp: *mut [u8; TCP] = ptr_at_mut(ctx, ETH + IP4).map_err(|_| Exit::Malformed)?;
    // SAFETY: ptr_at_mut checked that all three headers lie inside the packet.
    let (eth, ip, tcp) = unsafe { (&mut *eth, &mut *ip, &mut *tcp) };
    swap_macs(eth);
    let total = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let ack = ack_for(tcp, total.saturating_sub(IP4));
    let mut src = [0u8; 4];
    src.copy_from_slice(&ip[12..16]);
    let mut dst = [0u8; 4];
    dst.copy_from_slice(&ip[16..20]);
    let header = [
        0x45,
        0,
        0,
        (IP4 + TCP) as u8,
        0,
        0,
        0x40, // don't fragment
        0,
        64,
        PROTO_TCP,
        0,
        0,
        dst[0],
        dst[1],
        dst[2],
        dst[3],
        src[0],
        src[1],
        src[2],
        src[3],
    ];
    ip.copy_from_slice(&header);
    let sum = checksum(&header);
    ip[10] = sum[0];
    ip[11] = sum[1];
    rst_header(tcp, ack);
    let mut pseudo = [0u8; 12 + TCP];
    pseudo[0..4].copy_from_slice(&dst);
    pseudo[4..8].copy_from_slice(&src);
    pseudo[9] = PROTO_TCP;
    pseudo[11] = TCP as u8;
    pseudo[12..].copy_from_slice(tcp);
    let sum = checksum(&pseudo);
    tcp[16] = sum[0];
    tcp[17] = sum[1];
    shrink(ctx, ETH + IP4 + TCP)
}

#[inline(always)]
fn rst_v6(ctx: &XdpContext) -> Result<(), Exit> {
    let eth: *mut [u8; ETH] = ptr_at_mut(ctx, 0).map_err(|_| Exit::Malformed)?;
    let ip: *mut [u8; IP6] = ptr_at_mut(ctx, ETH).map_err(|_| Exit::Malformed)?;
    let tcp: *mut [u8; TCP] = ptr_at_mut(ctx, ETH + IP6).map_err(|_| Exit::Malformed)?;
    // SAFETY: ptr_at_mut checked that all three headers lie inside the packet.
    let (eth, ip, tcp) = unsafe { (&mut *eth, &mut *ip, &mut *tcp) };
    swap_macs(eth);
    let payload = u16::from_be_bytes([ip[4], ip[5]]) as usize;
    let ack = ack_for(tcp, payload);
    for i in 0..16 {
        ip.swap(8 + i, 24 + i);
    }
    ip[0..4].copy_from_slice(&[0x60, 0, 0, 0]);
    ip[4..6].copy_from_slice(&(TCP as u16).to_be_bytes());
    ip[6] = PROTO_TCP;
    ip[7] = 64;
    rst_header(tcp, ack);
    let mut pseudo = [0u8; 40 + TCP];
    pseudo[0..32].copy_from_slice(&ip[8..40]);
    pseudo[35] = TCP as u8;
    pseudo[39] = PROTO_TCP;
    pseudo[40..].copy_from_slice(tcp);
    let sum = checksum(&pseudo);
    tcp[16] = sum[0];
    tcp[17] = sum[1];
    shrink(ctx, ETH + IP6 + TCP)
}

/// Answers the frame's IPv4 packet with an ICMP error of `kind` and `code` quoting
/// its header and first 8 bytes; `rest` is the 4 bytes after the checksum (the MTU
/// of a "fragmentation needed").
/// One's-complement sum of the 16-bit words of `p[from..to]` (`to - from` even),
/// added to `sum`, unfolded. Constant bounds once inlined: the verifier sees a loop of
/// known length.
#[inline(always)]
fn add_words<const N: usize>(p: &[u8; N], from: usize, to: usize, mut sum: u32) -> u32 {
    let mut i = from;
    while i + 1 < to {
        sum += u16::from_be_bytes([p[i], p[i + 1]]) as u32;
        i += 2;
    }
    sum
}

/// Folds and complements a sum into a checksum field's bytes.
#[inline(always)]
fn finish(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_be_bytes()
}

/// Puts the new frame's MACs (the old frame's, swapped; the old frame now starts at
/// `old`) and the old EtherType in front.
#[inline(always)]
fn answer_eth<const N: usize>(p: &mut [u8; N], old: usize) {
    for i in 0..6 {
        p[i] = p[old + 6 + i];
        p[6 + i] = p[old + i];
    }
    p[12] = p[old + 12];
    p[13] = p[old + 13];
}

// Not inlined: called for refusals and "too big" alike. Built in place: the new
// headers go in front of the old frame, whose IP header and first 8 bytes stay where
// they are and become the quote, so nothing is copied to the stack.
/// Answers the frame's IPv4 packet with an ICMP error of `kind` and `code` quoting
/// its header and first 8 bytes; `rest` is the 4 bytes after the checksum (the MTU
/// of a "fragmentation needed").
#[inline(always)]
pub fn icmp_v4(ctx: &XdpContext, kind: u8, code: u8, rest: [u8; 4]) -> Result<(), Exit> {
    stats::unpack(icmp_v4_apart(ctx, kind, code, u32::from_ne_bytes(rest))).map(|_| ())
}

#[inline(never)]
fn icmp_v4_apart(ctx: &XdpContext, kind: u8, code: u8, rest: u32) -> u64 {
    stats::pack(build_icmp_v4(ctx, kind, code, rest.to_ne_bytes()).map(|_| 0))
}

#[inline(always)]
fn build_icmp_v4(ctx: &XdpContext, kind: u8, code: u8, rest: [u8; 4]) -> Result<(), Exit> {
    const QUOTE: usize = IP4 + QUOTED_L4;
    const ICMP: usize = 8;
    const GROW: usize = IP4 + ICMP;
    const Q: usize = GROW + ETH;
    ptr_at::<[u8; ETH + QUOTE]>(ctx, 0).map_err(|_| Exit::Malformed)?;
    // SAFETY: growing the head of the packet we own; the helper checks the headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROW as i32)) } != 0 {
        return Err(Exit::Unavailable);
    }
    let p: *mut [u8; Q + QUOTE] = ptr_at_mut(ctx, 0).map_err(|_| Exit::Malformed)?;
    // SAFETY: ptr_at_mut checked the bounds.
    let p = unsafe { &mut *p };
    answer_eth(p, GROW);
    let total = ((IP4 + ICMP + QUOTE) as u16).to_be_bytes();
    let ip = ETH;
    p[ip] = 0x45;
    p[ip + 1] = 0;
    p[ip + 2] = total[0];
    p[ip + 3] = total[1];
    for i in 4..8 {
        p[ip + i] = 0;
    }
    p[ip + 8] = 64;
    p[ip + 9] = 1; // ICMP
    p[ip + 10] = 0;
    p[ip + 11] = 0;
    for i in 0..4 {
        // From the quoted packet's destination, to its source.
        p[ip + 12 + i] = p[Q + 16 + i];
        p[ip + 16 + i] = p[Q + 12 + i];
    }
    let sum = finish(add_words(p, ip, ip + IP4, 0));
    p[ip + 10] = sum[0];
    p[ip + 11] = sum[1];
    let icmp = ETH + IP4;
    p[icmp] = kind;
    p[icmp + 1] = code;
    p[icmp + 2] = 0;
    p[icmp + 3] = 0;
    for i in 0..4 {
        p[icmp + 4 + i] = rest[i];
    }
    let sum = finish(add_words(p, icmp, Q + QUOTE, 0));
    p[icmp + 2] = sum[0];
    p[icmp + 3] = sum[1];
    shrink(ctx, Q + QUOTE)
}

/// As [`icmp_v4`], for IPv6: an ICMPv6 error quoting the header and 8 bytes.
// Not inlined, as `icmp_v4`.
#[inline(always)]
pub fn icmp_v6(ctx: &XdpContext, kind: u8, code: u8, rest: [u8; 4]) -> Result<(), Exit> {
    stats::unpack(icmp_v6_apart(ctx, kind, code, u32::from_ne_bytes(rest))).map(|_| ())
}

#[inline(never)]
fn icmp_v6_apart(ctx: &XdpContext, kind: u8, code: u8, rest: u32) -> u64 {
    stats::pack(build_icmp_v6(ctx, kind, code, rest.to_ne_bytes()).map(|_| 0))
}

#[inline(always)]
fn build_icmp_v6(ctx: &XdpContext, kind: u8, code: u8, rest: [u8; 4]) -> Result<(), Exit> {
    const QUOTE: usize = IP6 + QUOTED_L4;
    const ICMP: usize = 8;
    const GROW: usize = IP6 + ICMP;
    const Q: usize = GROW + ETH;
    ptr_at::<[u8; ETH + QUOTE]>(ctx, 0).map_err(|_| Exit::Malformed)?;
    // SAFETY: growing the head of the packet we own; the helper checks the headroom.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(GROW as i32)) } != 0 {
        return Err(Exit::Unavailable);
    }
    let p: *mut [u8; Q + QUOTE] = ptr_at_mut(ctx, 0).map_err(|_| Exit::Malformed)?;
    // SAFETY: ptr_at_mut checked the bounds.
    let p = unsafe { &mut *p };
    answer_eth(p, GROW);
    let payload = ((ICMP + QUOTE) as u16).to_be_bytes();
    let ip = ETH;
    p[ip] = 0x60;
    p[ip + 1] = 0;
    p[ip + 2] = 0;
    p[ip + 3] = 0;
    p[ip + 4] = payload[0];
    p[ip + 5] = payload[1];
    p[ip + 6] = 58; // ICMPv6
    p[ip + 7] = 64;
    for i in 0..16 {
        p[ip + 8 + i] = p[Q + 24 + i];
        p[ip + 24 + i] = p[Q + 8 + i];
    }
    let icmp = ETH + IP6;
    p[icmp] = kind;
    p[icmp + 1] = code;
    p[icmp + 2] = 0;
    p[icmp + 3] = 0;
    for i in 0..4 {
        p[icmp + 4 + i] = rest[i];
    }
    // Pseudo header: both addresses, the length, the next header.
    let mut sum = add_words(p, ip + 8, ip + IP6, 0);
    sum += (ICMP + QUOTE) as u32 + 58;
    let sum = finish(add_words(p, icmp, Q + QUOTE, sum));
    p[icmp + 2] = sum[0];
    p[icmp + 3] = sum[1];
    shrink(ctx, Q + QUOTE)
}
