//! The ring array as lbd holds it: a shared mapping of the kernel's array
//! (`BPF_F_MMAPABLE`), so a table of any size is written and read as memory (a start
//! with 10,000 services writes millions of cells; a syscall per cell takes seconds),
//! and the allocator that gives each table its extent of the array.

use std::{
    collections::BTreeMap,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::atomic::{fence, AtomicU32, Ordering},
};

use aya::maps::MapData;
use lb_common::map_names;

use crate::dataplane::error::{DataplaneError, Result};

/// An array map made with `BPF_F_MMAPABLE`, mapped shared: element `i` lies at
/// `i * round_up(value_size, 8)` (the kernel's element size).
pub(super) struct Mapped {
    // Keeps the map (and so the mapping's object) alive as long as the mapping.
    _map: MapData,
    base: NonNull<u8>,
    entries: u32,
    elem: usize,
    bytes: usize,
}

// The mapping is only touched through the one `MapManager` that owns it, which
// moves between threads as a whole.
unsafe impl Send for Mapped {}

impl Mapped {
    /// Maps `map` (named `name` in errors), whose values are `value_size` bytes.
    pub(super) fn new(map: MapData, name: &'static str, value_size: usize) -> Result<Mapped> {
        let entries = map
            .info()
            .map_err(|source| DataplaneError::Map { name, source })?
            .max_entries();
        let elem = value_size.div_ceil(8) * 8;
        // SAFETY: sysconf has no preconditions.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            p if p > 0 => p as usize,
            _ => 4096,
        };
        let bytes = (entries as usize * elem).div_ceil(page) * page;
        if bytes == 0 {
            return Err(DataplaneError::Options(format!("{name} has no entries")));
        }
        // SAFETY: a shared read-write mapping of the whole array, which the kernel
        // allows for a BPF_F_MMAPABLE array of this many bytes (page-rounded).
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(DataplaneError::Options(format!(
                "mapping {name} ({entries} entries) into memory: {}; it must be made with \
                 BPF_F_MMAPABLE (detach an older data plane: lbctl shutdown --detach)",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Mapped {
            _map: map,
            base: NonNull::new(ptr.cast()).expect("mmap succeeded"),
            entries,
            elem,
            bytes,
        })
    }

    /// A second handle on the map behind `map` (a duplicated descriptor), mapped.
    pub(super) fn view(map: &MapData, name: &'static str, value_size: usize) -> Result<Mapped> {
        let fd = map.fd().as_fd().try_clone_to_owned().map_err(|e| {
            DataplaneError::Options(format!("duplicating {name}'s descriptor: {e}"))
        })?;
        let dup = MapData::from_fd(fd).map_err(|source| DataplaneError::Map { name, source })?;
        Mapped::new(dup, name, value_size)
    }

    /// Another mapping of the same map (a duplicated descriptor).
    pub(super) fn view_again(&self, name: &'static str, value_size: usize) -> Result<Mapped> {
        Mapped::view(&self._map, name, value_size)
    }

    pub(super) fn entries(&self) -> u32 {
        self.entries
    }

    /// The mapping's first byte (page-aligned).
    pub(super) fn base(&self) -> *mut u8 {
        self.base.as_ptr()
    }

    /// Element `i` as a `T` (read whole; the program never writes these maps).
    pub(super) fn get<T: Copy>(&self, i: u32) -> T {
        assert!(i < self.entries && std::mem::size_of::<T>() <= self.elem);
        // SAFETY: inside the mapping, which lives as long as `self`; unaligned read
        // of plain data.
        unsafe { std::ptr::read_unaligned(self.base.as_ptr().add(i as usize * self.elem).cast()) }
    }
}

impl Drop for Mapped {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.bytes);
        }
    }
}

/// The kernel's ring array, mapped: 4-byte cells, two per 8-byte element.
pub(super) struct Ring {
    map: Mapped,
}

impl Ring {
    pub(super) fn new(map: MapData) -> Result<Ring> {
        Ok(Ring {
            map: Mapped::new(map, map_names::MAGLEV_RING, 8)?,
        })
    }

    pub(super) fn cells(&self) -> u32 {
        self.map.entries.saturating_mul(2)
    }

    fn cell(&self, i: u32) -> &AtomicU32 {
        assert!(i < self.cells(), "ring cell {i} beyond {}", self.cells());
        // SAFETY: in bounds of the mapping, which lives as long as `self`; aligned,
        // since the mapping is page-aligned and cells are 4 bytes (cell 2k is the low
        // half of element k, little-endian).
        unsafe { &*self.map.base.as_ptr().cast::<AtomicU32>().add(i as usize) }
    }

    pub(super) fn read(&self, offset: u32, len: u32) -> Vec<u32> {
        (offset..offset + len)
            .map(|i| self.cell(i).load(Ordering::Relaxed))
            .collect()
    }

    /// Whether the cells at `offset` are `cells`.
    pub(super) fn holds(&self, offset: u32, cells: &[u32]) -> bool {
        offset as u64 + cells.len() as u64 <= self.cells() as u64
            && cells
                .iter()
                .enumerate()
                .all(|(i, c)| self.cell(offset + i as u32).load(Ordering::Relaxed) == *c)
    }

    /// Writes `cells` at `offset`. The program reads them only after the `VIPS`
    /// update that names them: the fence orders these stores before it.
    pub(super) fn write(&mut self, offset: u32, cells: &[u32]) {
        for (i, c) in cells.iter().enumerate() {
            self.cell(offset + i as u32).store(*c, Ordering::Relaxed);
        }
        fence(Ordering::SeqCst);
    }
}

/// A table's place in the ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Extent {
    pub offset: u32,
    pub len: u32,
}

/// The free cells of the ring, as extents by offset: first fit, neighbours merged on
/// free. Tables come in few sizes (a ladder of primes), so freed extents fit the next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Extents {
    free: BTreeMap<u32, u32>,
}

impl Extents {
    /// All of `cells` free.
    pub(super) fn new(cells: u32) -> Extents {
        let mut free = BTreeMap::new();
        if cells > 0 {
            free.insert(0, cells);
        }
        Extents { free }
    }

    /// All of `cells` free but `used` (extents that must not overlap).
    pub(super) fn with_used(cells: u32, used: impl IntoIterator<Item = Extent>) -> Extents {
        let mut used: Vec<Extent> = used.into_iter().filter(|e| e.len > 0).collect();
        used.sort_by_key(|e| e.offset);
        let mut free = BTreeMap::new();
        let mut at = 0u32;
        for e in used {
            if e.offset > at {
                free.insert(at, e.offset - at);
            }
            at = at.max(e.offset.saturating_add(e.len));
        }
        if at < cells {
            free.insert(at, cells - at);
        }
        Extents { free }
    }

    pub(super) fn alloc(&mut self, len: u32) -> Option<Extent> {
        if len == 0 {
            return Some(Extent { offset: 0, len: 0 });
        }
        let (&offset, &have) = self.free.iter().find(|(_, l)| **l >= len)?;
        self.free.remove(&offset);
        if have > len {
            self.free.insert(offset + len, have - len);
        }
        Some(Extent { offset, len })
    }

    pub(super) fn release(&mut self, e: Extent) {
        if e.len == 0 {
            return;
        }
        let mut offset = e.offset;
        let mut len = e.len;
        if let Some((&o, &l)) = self.free.range(..offset).next_back() {
            if o + l == offset {
                self.free.remove(&o);
                offset = o;
                len += l;
            }
        }
        if let Some(&l) = self.free.get(&(offset + len)) {
            self.free.remove(&(offset + len));
            len += l;
        }
        self.free.insert(offset, len);
    }

    pub(super) fn free_cells(&self) -> u64 {
        self.free.values().map(|l| *l as u64).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extents_are_given_first_fit_and_merge_when_freed() {
        let mut x = Extents::new(100);
        let a = x.alloc(30).unwrap();
        let b = x.alloc(30).unwrap();
        let c = x.alloc(30).unwrap();
        assert_eq!((a.offset, b.offset, c.offset), (0, 30, 60));
        assert_eq!(x.alloc(11), None, "10 cells left");
        x.release(b);
        assert_eq!(x.alloc(31), None, "a hole of 30 and a tail of 10");
        x.release(a);
        assert_eq!(x.alloc(60).unwrap().offset, 0, "neighbours merged");
        x.release(Extent { offset: 0, len: 60 });
        x.release(c);
        assert_eq!(x, Extents::new(100));
    }

    #[test]
    fn extents_taken_over_from_the_maps_are_not_given_again() {
        let used = [
            Extent { offset: 10, len: 5 },
            Extent {
                offset: 40,
                len: 20,
            },
        ];
        let mut x = Extents::with_used(100, used);
        assert_eq!(x.free_cells(), 75);
        let mut got = Vec::new();
        while let Some(e) = x.alloc(5) {
            got.push(e);
        }
        assert_eq!(got.len(), 15);
        for e in got {
            for u in used {
                assert!(e.offset + e.len <= u.offset || e.offset >= u.offset + u.len);
            }
        }
    }
}
