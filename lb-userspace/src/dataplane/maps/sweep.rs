//! What the connection tables' sweep shares (the pass itself is
//! `sets::ConnSets::sweep`): neither table evicts, so lbd removes the entries of
//! flows idle beyond their protocol's timeout (`lb_common::idle`). One pass also
//! counts what is left: the count `stats` and `/metrics` report without walking the
//! tables themselves.
//!
//! Its clock is the table itself: the data plane stamps entries in jiffies, which
//! userspace cannot read, and the newest stamp in the table is "now" to within a
//! tick whenever traffic flows. When none flows, the newest stamp stays where the
//! traffic stopped and nothing more expires until it comes back: an entry is never
//! removed early, only sometimes late.

use lb_common::{idle, ConnEntry, PROTO_UDP};

use super::LoadOptions;

/// Idle timeouts in connection-clock ticks, by protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IdleTimeouts {
    pub tcp: u32,
    pub udp: u32,
}

impl IdleTimeouts {
    pub fn of(options: &LoadOptions, hz: u32) -> Self {
        Self {
            tcp: idle::ticks_of(options.tcp_idle_timeout_s, hz),
            udp: idle::ticks_of(options.udp_idle_timeout_s, hz),
        }
    }

    fn of_proto(&self, proto: u8) -> u32 {
        if proto == PROTO_UDP {
            self.udp
        } else {
            self.tcp
        }
    }

    /// Whether the entry of a flow of protocol `proto` is idle beyond its timeout at
    /// tick `now`.
    pub fn expired(&self, proto: u8, entry: &ConnEntry, now: u32) -> bool {
        idle::expired(entry.seen, now, self.of_proto(proto))
    }
}

/// What one walk of the table found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Swept {
    /// Entries left in the table.
    pub kept: u64,
    /// Entries removed as idle.
    pub expired: u64,
    /// The newest stamp seen (or the clock the walk began with, if later): the next
    /// walk's clock.
    pub newest: Option<u32>,
}

impl Swept {
    /// What walks of two tables found together (the second walked with the first's
    /// clock).
    pub fn and(self, other: Swept) -> Swept {
        Swept {
            kept: self.kept + other.kept,
            expired: self.expired + other.expired,
            newest: other.newest.or(self.newest),
        }
    }
}

/// The kernel's jiffies a second: the coarse clocks' resolution is one jiffy. If it
/// cannot be read, 1000 (the highest usual HZ: timeouts come out longer, never
/// shorter).
pub fn hz() -> u32 {
    nix::time::clock_getres(nix::time::ClockId::CLOCK_MONOTONIC_COARSE)
        .ok()
        .map(|r| r.tv_sec() as u64 * 1_000_000_000 + r.tv_nsec() as u64)
        .filter(|ns| (1_000_000..=100_000_000).contains(ns))
        .map_or(1000, |ns| (1_000_000_000 + ns / 2) as u32 / ns as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::PROTO_TCP;

    fn seen(seen: u32) -> ConnEntry {
        ConnEntry {
            seen,
            ..ConnEntry::default()
        }
    }

    #[test]
    fn each_protocol_has_its_own_timeout() {
        let t = IdleTimeouts::of(
            &LoadOptions {
                tcp_idle_timeout_s: 900,
                udp_idle_timeout_s: 30,
                ..LoadOptions::default()
            },
            1000,
        );
        // 900,000 and 30,000 jiffies in ticks of 256.
        assert_eq!((t.tcp, t.udp), (3516, 118));
        let now = 10_000;
        assert!(!t.expired(PROTO_TCP, &seen(now - 3516), now));
        assert!(t.expired(PROTO_TCP, &seen(now - 3517), now));
        assert!(!t.expired(PROTO_UDP, &seen(now - 118), now));
        assert!(t.expired(PROTO_UDP, &seen(now - 119), now));
    }

    #[test]
    fn hz_is_the_coarse_clocks_resolution() {
        assert!([100, 250, 300, 1000].contains(&hz()), "{}", hz());
    }
}
