//! The connection table's clock and idle rule, shared by the data plane (which stamps
//! an entry when it sees the flow) and lbd's sweeper (which removes idle entries).

/// Ticks are the kernel's jiffies (`bpf_jiffies64`, which the verifier turns into one
/// load on 64-bit JITs; a clock helper such as `bpf_ktime_get_coarse_ns` is a call
/// that cost the established path ~30 ns) in units of 256: about a second at
/// HZ=250, a quarter of one at HZ=1000. The data plane rewrites an entry's `seen` only
/// when the tick moved on, so an established flow dirties its entry (a cache line
/// other CPUs may read) at most once a tick, not once per packet.
pub const TICK_SHIFT: u32 = 8;

/// The tick of a jiffies count.
#[inline(always)]
pub const fn tick(jiffies: u64) -> u32 {
    (jiffies >> TICK_SHIFT) as u32
}

/// Ticks that cover at least `seconds` on a kernel of `hz` jiffies a second: an idle
/// timeout is never cut short.
pub const fn ticks_of(seconds: u32, hz: u32) -> u32 {
    (seconds as u64 * hz as u64).div_ceil(1 << TICK_SHIFT) as u32
}

/// Whether an entry last seen at tick `seen` has been idle for more than `timeout`
/// ticks at tick `now`. The difference is taken as signed: an entry stamped after
/// `now` was read is fresh, not 2^32 ticks old (ticks wrap after 2^32 of them, over
/// 100 years at HZ=1000).
#[inline(always)]
pub const fn expired(seen: u32, now: u32, timeout: u32) -> bool {
    let idle = now.wrapping_sub(seen) as i32;
    idle > 0 && idle as u32 > timeout
}

/// The later of two ticks (wrap-safe, as [`expired`]).
pub const fn later(a: u32, b: u32) -> u32 {
    if (b.wrapping_sub(a) as i32) > 0 {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_in_ticks_covers_its_seconds() {
        for hz in [100u32, 250, 300, 1000] {
            for s in [1u32, 2, 10, 300, 900, 86_400, 604_800] {
                let t = ticks_of(s, hz) as u64;
                let jiffies = s as u64 * hz as u64;
                assert!(t << TICK_SHIFT >= jiffies, "{s} s at {hz}");
                assert!((t - 1) << TICK_SHIFT < jiffies, "{s} s at {hz}");
            }
        }
    }

    #[test]
    fn idle_is_counted_across_the_wrap_and_a_newer_stamp_is_fresh() {
        assert!(!expired(100, 110, 10));
        assert!(expired(100, 111, 10));
        // Stamped just before the counter wrapped, swept just after.
        assert!(!expired(u32::MAX - 2, 5, 10));
        assert!(expired(u32::MAX - 5, 5, 10));
        // Stamped by the data plane after the sweeper took its clock.
        assert!(!expired(1_001, 1_000, 10));
        assert!(expired(u32::MAX, 0, 0));
    }

    #[test]
    fn the_later_tick_is_found_across_the_wrap() {
        assert_eq!(later(5, 9), 9);
        assert_eq!(later(9, 5), 9);
        assert_eq!(later(u32::MAX - 1, 3), 3);
        assert_eq!(later(3, u32::MAX - 1), 3);
    }

    #[test]
    fn a_tick_is_256_jiffies() {
        assert_eq!(tick(0), 0);
        assert_eq!(tick(255), 0);
        assert_eq!(tick(256), 1);
        assert_eq!(tick((1 << 40) + 512), 2);
    }
}
