//! `VIP_STATE` as lbd holds it: each service's flags and epoch in one word
//! (`lb_common::vip_state`), by service id, which the program reads for a packet of an
//! established flow instead of looking its service up in `VIPS`.
//!
//! The words only repeat `VIPS`: a word that is not written (0) sends the packet the
//! `VIPS` way, which is always right. So a word is cleared before its service's `VIPS`
//! entry changes and set after to what the entry then holds: a packet in between,
//! or after a crash in between, takes the slower path, never a stale one.

use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::MapData;
use lb_common::{map_names, vip_state, VipMeta};

use super::ring::Mapped;
use crate::dataplane::error::Result;

pub(super) struct StateWords {
    map: Mapped,
}

impl StateWords {
    pub(super) fn new(map: MapData) -> Result<StateWords> {
        Ok(StateWords {
            map: Mapped::new(map, map_names::VIP_STATE, 8)?,
        })
    }

    fn word(&self, id: u32) -> Option<&AtomicU64> {
        // An id beyond the map (a pinned map of another size) has no word: its
        // packets take the `VIPS` way.
        (id < self.map.entries()).then(|| {
            // SAFETY: inside the page-aligned mapping, which lives as long as
            // `self`; 8-byte elements, so every word is aligned.
            unsafe { &*self.map.base().cast::<AtomicU64>().add(id as usize) }
        })
    }

    /// One store: a packet reads the old word or the new one, never half of each.
    pub(super) fn put(&self, id: u32, word: u64) {
        if let Some(w) = self.word(id) {
            w.store(word, Ordering::SeqCst);
        }
    }

    /// The word of service `id` says `meta`, and whether its address is served.
    pub(super) fn set(&self, id: u32, meta: &VipMeta, served: bool) {
        self.put(id, vip_state(meta, served));
    }

    /// The word of service `id` says nothing: its packets take the `VIPS` way.
    pub(super) fn clear(&self, id: u32) {
        self.put(id, 0);
    }

    pub(super) fn get(&self, id: u32) -> u64 {
        self.word(id).map_or(0, |w| w.load(Ordering::SeqCst))
    }

    /// Every word says what `metas` (each service's `VIPS` entry) say, the others
    /// nothing: after a restore, whatever an earlier run left.
    pub(super) fn set_all(&self, metas: impl IntoIterator<Item = (VipMeta, bool)>) {
        let mut held = vec![None; self.map.entries() as usize];
        for (m, served) in metas {
            if let Some(slot) = held.get_mut(m.vip_id as usize) {
                *slot = Some((m, served));
            }
        }
        for (id, meta) in held.iter().enumerate() {
            match meta {
                Some((m, served)) => self.set(id as u32, m, *served),
                None => self.clear(id as u32),
            }
        }
    }
}
