//! A driver's own counters (`ethtool -S`), read with the SIOCETHTOOL ioctl: the one
//! place where a veth says it dropped frames XDP transmitted (its peer has no XDP
//! program), which no other counter shows.

use std::io;

const SIOCETHTOOL: libc::c_ulong = 0x8946;
const ETHTOOL_GSSET_INFO: u32 = 0x37;
const ETHTOOL_GSTRINGS: u32 = 0x1b;
const ETHTOOL_GSTATS: u32 = 0x1d;
const ETH_SS_STATS: u32 = 1;
const ETH_GSTRING_LEN: usize = 32;
/// More than any driver reports; bounds what a broken answer can make us allocate.
const MAX_STATS: usize = 4096;

#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: *mut libc::c_void,
    _pad: [u8; 16],
}

fn ioctl(name: &str, data: *mut libc::c_void) -> io::Result<()> {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data,
        _pad: [0; 16],
    };
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "interface name too long",
        ));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: a plain datagram socket, closed below; the request and the buffer it
    // points to outlive the call and are as large as the command says.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let r = libc::ioctl(fd, SIOCETHTOOL as _, &mut req as *mut IfReq);
        let err = io::Error::last_os_error();
        libc::close(fd);
        if r < 0 {
            return Err(err);
        }
    }
    Ok(())
}

/// Every driver counter of `name` whose name passes `keep`, summed.
pub fn sum_stats(name: &str, mut keep: impl FnMut(&str) -> bool) -> io::Result<u64> {
    // How many counters: struct ethtool_sset_info with one u32 of data.
    let mut info = [0u32; 5];
    info[0] = ETHTOOL_GSSET_INFO;
    info[2] = 1 << ETH_SS_STATS; // sset_mask (u64 at offset 8, little end first)
    ioctl(name, info.as_mut_ptr().cast())?;
    let n = (info[4] as usize).min(MAX_STATS);
    if n == 0 {
        return Ok(0);
    }
    // Their names: struct ethtool_gstrings, then n × 32 bytes.
    let mut strings = vec![0u8; 12 + n * ETH_GSTRING_LEN];
    strings[0..4].copy_from_slice(&ETHTOOL_GSTRINGS.to_ne_bytes());
    strings[4..8].copy_from_slice(&ETH_SS_STATS.to_ne_bytes());
    strings[8..12].copy_from_slice(&(n as u32).to_ne_bytes());
    ioctl(name, strings.as_mut_ptr().cast())?;
    // Their values: struct ethtool_stats, then n × u64.
    let mut stats = vec![0u64; 1 + n];
    stats[0] = ETHTOOL_GSTATS as u64 | (n as u64) << 32;
    ioctl(name, stats.as_mut_ptr().cast())?;
    let mut sum = 0u64;
    for i in 0..n {
        let raw = &strings[12 + i * ETH_GSTRING_LEN..12 + (i + 1) * ETH_GSTRING_LEN];
        let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
        if keep(&String::from_utf8_lossy(&raw[..end])) {
            sum = sum.wrapping_add(stats[1 + i]);
        }
    }
    Ok(sum)
}

/// Frames XDP transmitted that the driver dropped (veth: `*_xdp_tx_errors` and
/// `*_xdp_xmit_errors`); `None` if the driver reports no such counter.
pub fn xdp_tx_errors(name: &str) -> Option<u64> {
    let mut any = false;
    let sum = sum_stats(name, |s| {
        let hit = s.ends_with("xdp_tx_errors") || s.ends_with("xdp_xmit_errors");
        any |= hit;
        hit
    });
    sum.ok().filter(|_| any)
}
