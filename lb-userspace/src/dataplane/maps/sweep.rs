//! The connection tables' sweeping: neither table evicts, so lbd removes the entries
//! of flows idle beyond their protocol's timeout (`lb_common::idle`). Here the walk
//! of the IPv6 table (a preallocated hash) and what both tables' sweeps share (the
//! IPv4 table's pass over its sets is `sets::ConnSets::sweep`). One walk also counts
//! what is left: the count `stats` and `/metrics` report without walking the table
//! themselves.
//!
//! Its clock is the table itself: the data plane stamps entries in jiffies, which
//! userspace cannot read, and the newest stamp in the table is "now" to within a
//! tick whenever traffic flows. When none flows, the newest stamp stays where the
//! traffic stopped and nothing more expires until it comes back: an entry is never
//! removed early, only sometimes late.

use aya::maps::{HashMap, MapData};
use lb_common::{idle, ConnEntry, FlowKey, FlowKeyV4, PROTO_UDP};

use super::LoadOptions;

/// A key of a connection table (`FlowKeyV4`, `FlowKey`): what the sweep reads of it.
pub trait ConnKey: aya::Pod {
    fn proto(&self) -> u8;
}

impl ConnKey for FlowKey {
    fn proto(&self) -> u8 {
        self.proto
    }
}

impl ConnKey for FlowKeyV4 {
    fn proto(&self) -> u8 {
        self.proto
    }
}

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

    /// Whether a flow's entry is idle beyond its protocol's timeout at tick `now`.
    pub fn expired(&self, key: &impl ConnKey, entry: &ConnEntry, now: u32) -> bool {
        idle::expired(entry.seen, now, self.of_proto(key.proto()))
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

/// Deletions between moves of the sweeping thread to the next CPU.
const SPREAD_EVERY: u64 = 1024;

/// Walks the table once through `walker` and removes through `remover` (two handles
/// on the same map: the walk borrows one) every entry idle by the clock: the later
/// of `clock` (the last walk's newest stamp) and the newest stamp met so far in this
/// walk, so that the clock only ever lags.
///
/// An entry is removed only once the walk has moved past it: the kernel continues a
/// walk from the last key it returned, and a walk whose key was removed starts over
/// from the first bucket.
///
/// A removed element goes back to the free list of the CPU that removes it, and a CPU
/// whose own list is empty takes its next element by looking at the other CPUs' lists
/// in turn: with one sweeping CPU, every other CPU would come to look through up to
/// all of them for each new flow. So the sweep moves itself over `cpus` as it removes,
/// handing each CPU back its share.
pub fn sweep<K: ConnKey>(
    walker: &HashMap<MapData, K, ConnEntry>,
    remover: &mut HashMap<MapData, K, ConnEntry>,
    clock: Option<u32>,
    timeouts: &IdleTimeouts,
    cpus: &[u32],
) -> Swept {
    let mut swept = Swept::default();
    let mut now = clock;
    let mut pending: Option<K> = None;
    let mut mover = CpuMover::new(cpus);
    let mut remove = |key: &K, swept: &mut Swept| {
        // An entry already gone (removed meanwhile) is not counted twice.
        if remover.remove(key).is_ok() {
            swept.expired += 1;
            if swept.expired % SPREAD_EVERY == 0 {
                mover.next();
            }
        }
    };
    for item in walker.iter() {
        let Ok((key, entry)) = item else {
            continue;
        };
        if let Some(p) = pending.take() {
            remove(&p, &mut swept);
        }
        let clock = now.map_or(entry.seen, |n| idle::later(n, entry.seen));
        now = Some(clock);
        if timeouts.expired(&key, &entry, clock) {
            pending = Some(key);
        } else {
            swept.kept += 1;
        }
    }
    if let Some(p) = pending.take() {
        remove(&p, &mut swept);
    }
    mover.restore();
    swept.newest = now;
    swept
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

/// Moves the calling thread from CPU to CPU, and back to the CPUs it was allowed at
/// first. A CPU it may not run on (a cpuset) is skipped: the spread is a help, not a
/// condition.
struct CpuMover<'a> {
    cpus: &'a [u32],
    at: usize,
    allowed: Option<nix::sched::CpuSet>,
}

impl<'a> CpuMover<'a> {
    fn new(cpus: &'a [u32]) -> Self {
        Self {
            cpus,
            at: 0,
            allowed: None,
        }
    }

    fn next(&mut self) {
        if self.cpus.len() < 2 {
            return;
        }
        let me = nix::unistd::Pid::from_raw(0);
        if self.allowed.is_none() {
            self.allowed = nix::sched::sched_getaffinity(me).ok();
        }
        self.at = (self.at + 1) % self.cpus.len();
        let mut set = nix::sched::CpuSet::new();
        if set.set(self.cpus[self.at] as usize).is_ok() {
            let _ = nix::sched::sched_setaffinity(me, &set);
        }
    }

    fn restore(&mut self) {
        if let Some(allowed) = self.allowed.take() {
            let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &allowed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::PROTO_TCP;

    fn key(proto: u8) -> FlowKey {
        FlowKey {
            proto,
            ..FlowKey::default()
        }
    }

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
        assert!(!t.expired(&key(PROTO_TCP), &seen(now - 3516), now));
        assert!(t.expired(&key(PROTO_TCP), &seen(now - 3517), now));
        assert!(!t.expired(&key(PROTO_UDP), &seen(now - 118), now));
        assert!(t.expired(&key(PROTO_UDP), &seen(now - 119), now));
    }

    #[test]
    fn hz_is_the_coarse_clocks_resolution() {
        assert!([100, 250, 300, 1000].contains(&hz()), "{}", hz());
    }
}
