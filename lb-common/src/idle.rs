//! The connection table's clock and idle rule, shared by the data plane (which stamps
//! an entry when it sees the flow) and lbd's sweeper (which removes idle entries).

/// Ticks are CLOCK_MONOTONIC (what `bpf_ktime_get_coarse_ns` and userspace's
/// `CLOCK_MONOTONIC_COARSE` read) in units of 2^30 ns, about 1.07 s. The data plane
/// rewrites an entry's `seen` only when the tick moved on, so an established flow
/// dirties its entry (a cache line other CPUs may read) about once a second, not
/// once per packet.
pub const TICK_SHIFT: u32 = 30;

/// The tick of a CLOCK_MONOTONIC time in nanoseconds.
#[inline(always)]
pub const fn tick(monotonic_ns: u64) -> u32 {
    (monotonic_ns >> TICK_SHIFT) as u32
}

/// Ticks that cover at least `seconds`: an idle timeout is never cut short.
pub const fn ticks_of(seconds: u32) -> u32 {
    (seconds as u64 * 1_000_000_000).div_ceil(1 << TICK_SHIFT) as u32
}

/// Whether an entry last seen at tick `seen` has been idle for more than `timeout`
/// ticks at tick `now`. The difference is taken as signed: the sweeper may read its
/// clock just before the data plane stamps a newer tick, and such an entry is fresh,
/// not 146 years old. (Ticks wrap after 2^32 of them, about 146 years of uptime.)
#[inline(always)]
pub const fn expired(seen: u32, now: u32, timeout: u32) -> bool {
    let idle = now.wrapping_sub(seen) as i32;
    idle > 0 && idle as u32 > timeout
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timeout_in_ticks_covers_its_seconds() {
        for s in [1u32, 2, 10, 300, 900, 86_400, 604_800] {
            let t = ticks_of(s) as u64;
            assert!(t << TICK_SHIFT >= s as u64 * 1_000_000_000, "{s} s");
            assert!((t - 1) << TICK_SHIFT < s as u64 * 1_000_000_000, "{s} s");
        }
    }

    #[test]
    fn idle_is_counted_across_the_wrap_and_a_newer_stamp_is_fresh() {
        assert!(!expired(100, 110, 10));
        assert!(expired(100, 111, 10));
        // Stamped just before the counter wrapped, swept just after.
        assert!(!expired(u32::MAX - 2, 5, 10));
        assert!(expired(u32::MAX - 5, 5, 10));
        // Stamped by the data plane after the sweeper read its clock.
        assert!(!expired(1_001, 1_000, 10));
        assert!(expired(u32::MAX, 0, 0));
    }

    #[test]
    fn a_tick_is_about_a_second() {
        assert_eq!(tick(0), 0);
        assert_eq!(tick((1 << 30) - 1), 0);
        assert_eq!(tick(1 << 30), 1);
        assert_eq!(tick(3_600_000_000_000), 3352);
    }
}
