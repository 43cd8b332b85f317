//! lbd's liveness stamp: `CONTROL[0].alive_until_ns`, in CLOCK_MONOTONIC (the clock
//! of `bpf_ktime_get_ns`). Once it has passed, the program drops ARP requests and
//! neighbour solicitations for the VIPs it forwards, so a node whose daemon died stops
//! drawing clients to itself while its peers move the VIPs. 0 disables the guard.
//!
//! The stamp has its own handle on the map, so that writing it never waits for the
//! daemon thread (a long apply must not make the node look dead).

use std::{path::Path, time::Duration};

use aya::maps::{Array, Map, MapData};
use lb_common::{map_names, Control};

use super::error::{DataplaneError, Result};

pub struct Stamp {
    map: Array<MapData, Control>,
}

fn map_err(source: aya::maps::MapError) -> DataplaneError {
    DataplaneError::Map {
        name: map_names::CONTROL,
        source,
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds.
pub fn monotonic_ns() -> u64 {
    let t = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC)
        .expect("CLOCK_MONOTONIC is always there");
    t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64
}

impl Stamp {
    /// The pinned map of a data plane loaded with `pin_dir`.
    pub fn open(pin_dir: &Path) -> Result<Stamp> {
        let data = MapData::from_pin(pin_dir.join(map_names::CONTROL)).map_err(map_err)?;
        Self::from_map(Map::Array(data))
    }

    pub fn from_map(map: Map) -> Result<Stamp> {
        Ok(Stamp {
            map: Array::try_from(map).map_err(map_err)?,
        })
    }

    /// lbd is alive for `ahead` from now.
    pub fn alive_for(&mut self, ahead: Duration) -> Result<()> {
        self.set(monotonic_ns() + ahead.as_nanos() as u64)
    }

    /// The raw stamp (0: no guard).
    pub fn set(&mut self, alive_until_ns: u64) -> Result<()> {
        self.map
            .set(0, Control { alive_until_ns }, 0)
            .map_err(map_err)
    }

    pub fn get(&self) -> Result<u64> {
        Ok(self.map.get(&0, 0).map_err(map_err)?.alive_until_ns)
    }
}
