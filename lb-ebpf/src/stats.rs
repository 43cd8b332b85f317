//! Counters, and the reasons a packet leaves the program early. Every reason has its
//! own named counter (no index-dependent meanings).

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use lb_common::{Counter, GlobalStats};

use crate::maps::{BACKEND_STATS, GLOBAL_STATS, VIP_STATS};

/// Why a packet was not forwarded.
#[derive(Clone, Copy)]
#[repr(u32)]
pub enum Exit {
    NotIp,
    Unparsed,
    NotVip,
    NotL4,
    NoService,
    PassIrregular,
    Malformed,
    Fragment,
    IpOptions,
    NoBackend,
    NoRoute,
    RedirectFailed,
    Unavailable,
    RefuseLimited,
    RefuseInvalid,
    DaemonStale,
    TooBig,
    EncapFailed,
}

/// A result in one register, for functions the program calls rather than inlines: a
/// Rust `Result` returned from a BPF function may leave part of its register
/// unwritten on some paths, which the verifier refuses ("R0 !read_ok").
#[inline(always)]
pub fn pack(r: Result<u32, Exit>) -> u64 {
    match r {
        Ok(action) => action as u64,
        Err(e) => (1 << 32) | e as u32 as u64,
    }
}

#[inline(always)]
pub fn unpack(v: u64) -> Result<u32, Exit> {
    if v >> 32 == 0 {
        Ok(v as u32)
    } else {
        // SAFETY: only `pack` makes these values, from an `Exit`.
        Err(unsafe { core::mem::transmute::<u32, Exit>(v as u32) })
    }
}

impl Exit {
    #[inline(always)]
    pub fn action(self) -> u32 {
        match self {
            Exit::NotIp
            | Exit::Unparsed
            | Exit::NotVip
            | Exit::NotL4
            | Exit::NoService
            | Exit::PassIrregular => XDP_PASS,
            Exit::Malformed
            | Exit::Fragment
            | Exit::IpOptions
            | Exit::NoBackend
            | Exit::NoRoute
            | Exit::RedirectFailed
            | Exit::Unavailable
            | Exit::RefuseLimited
            | Exit::RefuseInvalid
            | Exit::DaemonStale
            | Exit::TooBig
            | Exit::EncapFailed => XDP_DROP,
        }
    }
}

/// This CPU's counters, looked up once per packet and passed down (a per-CPU array
/// lookup per counter would cost one each).
#[inline(always)]
pub fn global() -> Option<&'static mut GlobalStats> {
    let g = GLOBAL_STATS.get_ptr_mut(0)?;
    // SAFETY: this CPU's own slot; XDP does not preempt itself on a CPU, and the
    // reference lives only for this packet.
    Some(unsafe { &mut *g })
}

#[inline(always)]
pub fn count_exit(g: &mut GlobalStats, exit: Exit) {
    *match exit {
        Exit::NotIp => &mut g.pass_not_ip,
        Exit::Unparsed => &mut g.pass_unparsed,
        Exit::NotVip => &mut g.pass_not_vip,
        Exit::NotL4 => &mut g.pass_not_l4,
        Exit::NoService => &mut g.pass_no_service,
        Exit::PassIrregular => &mut g.pass_irregular,
        Exit::Malformed => &mut g.drop_malformed,
        Exit::Fragment => &mut g.drop_fragment,
        Exit::IpOptions => &mut g.drop_ip_options,
        Exit::NoBackend => &mut g.drop_no_backend,
        Exit::NoRoute => &mut g.drop_no_route,
        Exit::RedirectFailed => &mut g.drop_redirect_failed,
        Exit::Unavailable => &mut g.drop_unavailable,
        Exit::RefuseLimited => &mut g.drop_refuse_limited,
        Exit::RefuseInvalid => &mut g.drop_refuse_invalid,
        Exit::DaemonStale => &mut g.drop_daemon_stale,
        Exit::TooBig => &mut g.drop_too_big,
        Exit::EncapFailed => &mut g.drop_encap_failed,
    } += 1;
}

#[inline(always)]
pub fn count_lru_hit(g: &mut GlobalStats) {
    g.lru_hit += 1;
}

#[inline(always)]
pub fn count_lru_miss(g: &mut GlobalStats) {
    g.lru_miss += 1;
}

#[inline(always)]
pub fn count_conn_table_full(g: &mut GlobalStats) {
    g.conn_table_full += 1;
}

#[inline(always)]
pub fn count_lru_stale(g: &mut GlobalStats) {
    g.lru_stale += 1;
}

#[inline(always)]
pub fn count_epoch_keep(g: &mut GlobalStats) {
    g.epoch_keep += 1;
}

#[inline(always)]
pub fn count_epoch_resteer(g: &mut GlobalStats) {
    g.epoch_resteer += 1;
}

#[inline(always)]
pub fn count_refuse_rst(g: &mut GlobalStats) {
    g.refuse_rst += 1;
}

#[inline(always)]
pub fn count_refuse_icmp(g: &mut GlobalStats) {
    g.refuse_icmp += 1;
}

#[inline(always)]
pub fn count_tx(g: &mut GlobalStats) {
    g.tx += 1;
}

#[inline(always)]
pub fn count_redirect(g: &mut GlobalStats) {
    g.redirect += 1;
}

#[inline(always)]
pub fn count_too_big(g: &mut GlobalStats) {
    g.icmp_too_big += 1;
}

#[inline(always)]
pub fn count_icmp_steered(g: &mut GlobalStats) {
    g.icmp_steered += 1;
}

#[inline(always)]
fn add(counter: Option<*mut Counter>, bytes: u64) {
    if let Some(c) = counter {
        // SAFETY: this CPU's own slot.
        let c = unsafe { &mut *c };
        c.packets += 1;
        c.bytes += bytes;
    }
}

#[inline(always)]
pub fn count_vip(vip_id: u32, bytes: u64) {
    add(VIP_STATS.get_ptr_mut(vip_id), bytes)
}

#[inline(always)]
pub fn count_backend(backend_id: u32, bytes: u64) {
    add(BACKEND_STATS.get_ptr_mut(backend_id), bytes)
}
