//! Counters, and the reasons a packet leaves the program early. Every reason has its
//! own named counter (no index-dependent meanings).

use aya_ebpf::bindings::xdp_action::{XDP_DROP, XDP_PASS};
use lb_common::{Counter, GlobalStats};

use crate::maps::{BACKEND_STATS, GLOBAL_STATS, VIP_STATS};

/// Why a packet was not forwarded.
#[derive(Clone, Copy)]
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
            | Exit::DaemonStale => XDP_DROP,
        }
    }
}

#[inline(always)]
fn bump(field: impl FnOnce(&mut GlobalStats) -> &mut u64) {
    if let Some(g) = GLOBAL_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's own slot; XDP does not preempt itself on a CPU.
        *field(unsafe { &mut *g }) += 1;
    }
}

#[inline(always)]
pub fn count_exit(exit: Exit) {
    bump(|g| match exit {
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
    })
}

#[inline(always)]
pub fn count_lru_hit() {
    bump(|g| &mut g.lru_hit)
}

#[inline(always)]
pub fn count_lru_miss() {
    bump(|g| &mut g.lru_miss)
}

#[inline(always)]
pub fn count_lru_stale() {
    bump(|g| &mut g.lru_stale)
}

#[inline(always)]
pub fn count_epoch_keep() {
    bump(|g| &mut g.epoch_keep)
}

#[inline(always)]
pub fn count_epoch_resteer() {
    bump(|g| &mut g.epoch_resteer)
}

#[inline(always)]
pub fn count_refuse_rst() {
    bump(|g| &mut g.refuse_rst)
}

#[inline(always)]
pub fn count_refuse_icmp() {
    bump(|g| &mut g.refuse_icmp)
}

#[inline(always)]
pub fn count_tx() {
    bump(|g| &mut g.tx)
}

#[inline(always)]
pub fn count_redirect() {
    bump(|g| &mut g.redirect)
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
