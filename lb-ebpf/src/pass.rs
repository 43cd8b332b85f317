//! `lb-pass`: an object holding only an `XDP_PASS` program and no maps, so that
//! iproute2 (libbpf) loads it: `ip link set dev PEER xdp obj lb-pass.o sec xdp`.
//! A veth drops the frames XDP transmits on it unless its peer runs an XDP
//! program; this is that program for peers lbd does not manage (another namespace).
#![no_std]
#![no_main]

use aya_ebpf::{bindings::xdp_action::XDP_PASS, macros::xdp, programs::XdpContext};

#[xdp]
pub fn lb_pass(_ctx: XdpContext) -> u32 {
    XDP_PASS
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // SAFETY: the program has no panic path; the verifier would refuse one.
    unsafe { core::hint::unreachable_unchecked() }
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
