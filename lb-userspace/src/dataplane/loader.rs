//! Loading the XDP object, attaching its programs to interfaces, detaching them.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, MapData, MapInfo},
    programs::{
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachType},
        xdp::{XdpLink, XdpLinkId},
        SchedClassifier, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
use lb_common::{conn_sets, map_names, program_names, ProbeConfig};

use super::maps::sets::{self, Family};

use super::{
    error::{DataplaneError, Result},
    maps::MapManager,
};
use crate::{maglev::is_prime, model::EncapSettings};

/// The XDP object built from `lb-ebpf` by this crate's build script.
static OBJECT: &[u8] = aya::include_bytes_aligned!(env!("LB_EBPF_OBJECT"));

/// The object, for the other program loaded from it (`decap`).
pub(super) fn object() -> &'static [u8] {
    OBJECT
}

/// The programs in the object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Program {
    /// The balancer.
    Balancer,
    /// `XDP_PASS` for everything: goes on a veth peer so that transmitted frames arrive.
    Pass,
    /// Swaps MACs and transmits: the benchmark's baseline.
    SwapMacs,
    /// Drops everything: the least any XDP program costs (shown beside the baseline).
    Drop,
}

impl Program {
    pub const ALL: [Program; 4] = [
        Program::Balancer,
        Program::Pass,
        Program::SwapMacs,
        Program::Drop,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Program::Balancer => program_names::BALANCER,
            Program::Pass => program_names::PASS,
            Program::SwapMacs => program_names::SWAP_MACS,
            Program::Drop => program_names::DROP,
        }
    }
}

/// Sizes fixed at load time. The kernel preallocates every map whole, so these are
/// what the data plane costs in memory whatever it holds (see `docs/DEPLOYING.md`,
/// "Limits and memory").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadOptions {
    /// Services (VIP, port, protocol) the data plane can hold at once: `VIPS`,
    /// `VIP_ADDRS` and `VIP_STATS` entries.
    pub max_services: u32,
    /// Backends over all services: `BACKENDS`, `ROUTES` and `BACKEND_STATS` entries.
    pub max_backends: u32,
    /// Cells (4 bytes each) of the ring array all services' tables share; a service
    /// reserves two slots of its own table's size (`dataplane::ring_reservation`).
    pub ring_cells: u32,
    /// Bounds of an automatically sized table (primes).
    pub maglev_min_size: u32,
    pub maglev_max_size: u32,
    /// Flows the IPv4 connection table is sized for (shared by every CPU; twice as
    /// many slots, `lb_common::conn_sets::sets_for`).
    pub conn_table_size: u32,
    /// Flows the IPv6 one is sized for; `None`: as many as the IPv4 one.
    pub conn_table_size_v6: Option<u32>,
    /// Seconds a flow may be idle before the sweeper removes its entry, by protocol.
    pub tcp_idle_timeout_s: u32,
    pub udp_idle_timeout_s: u32,
    /// A bpffs directory to pin the maps in. A later load with the same directory
    /// reuses them, contents and all: what a restarting daemon needs.
    pub pin_dir: Option<PathBuf>,
}

/// What `[dataplane]` accepts: each bound keeps a map within what one node can hold
/// (and the kernel can allocate) on a typical machine.
pub const MAX_SERVICES_LIMIT: u32 = 65_536;
pub const MAX_BACKENDS_LIMIT: u32 = 1 << 20;
pub const RING_CELLS_LIMIT: u32 = 1 << 28;
pub const CONN_TABLE_LIMIT: u32 = 16 << 20;
/// A week: a longer idle timeout keeps the entries of flows long gone.
pub const IDLE_TIMEOUT_LIMIT: u32 = 7 * 86_400;

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            max_services: 1024,
            max_backends: 16_384,
            ring_cells: 24 << 20,
            // Small services keep one size while they grow to ten backends: a new
            // size re-steers every new flow, and a handshake whose SYN was steered
            // by the old table and its ACK by the new one is reset.
            maglev_min_size: 1021,
            maglev_max_size: 16_777_213,
            conn_table_size: 1 << 18,
            conn_table_size_v6: None,
            // IPVS's established TCP and UDP timeouts, which operators know.
            tcp_idle_timeout_s: 900,
            udp_idle_timeout_s: 300,
            pin_dir: None,
        }
    }
}

impl LoadOptions {
    /// Entries of the IPv6 connection table.
    pub fn v6_conn_table_size(&self) -> u32 {
        self.conn_table_size_v6.unwrap_or(self.conn_table_size)
    }

    /// The first option out of its range, named as in `[dataplane]`.
    pub fn refusal(&self) -> Option<String> {
        let range = |name: &str, v: u32, max: u32| {
            (v == 0 || v > max).then(|| format!("dataplane.{name}: {v} must be 1..={max}"))
        };
        range("max_services", self.max_services, MAX_SERVICES_LIMIT)
            .or_else(|| range("max_backends", self.max_backends, MAX_BACKENDS_LIMIT))
            .or_else(|| range("ring_cells", self.ring_cells, RING_CELLS_LIMIT))
            .or_else(|| range("conn_table_size", self.conn_table_size, CONN_TABLE_LIMIT))
            .or_else(|| {
                range(
                    "conn_table_size_v6",
                    self.v6_conn_table_size(),
                    CONN_TABLE_LIMIT,
                )
            })
            .or_else(|| {
                range(
                    "tcp_idle_timeout_s",
                    self.tcp_idle_timeout_s,
                    IDLE_TIMEOUT_LIMIT,
                )
            })
            .or_else(|| {
                range(
                    "udp_idle_timeout_s",
                    self.udp_idle_timeout_s,
                    IDLE_TIMEOUT_LIMIT,
                )
            })
            .or_else(|| {
                (!is_prime(self.maglev_min_size)).then(|| {
                    format!(
                        "dataplane.maglev_min_size: {} is not a prime",
                        self.maglev_min_size
                    )
                })
            })
            .or_else(|| {
                (!is_prime(self.maglev_max_size)).then(|| {
                    format!(
                        "dataplane.maglev_max_size: {} is not a prime",
                        self.maglev_max_size
                    )
                })
            })
            .or_else(|| {
                (self.maglev_min_size > self.maglev_max_size).then(|| {
                    format!(
                        "dataplane.maglev_min_size: {} is above maglev_max_size {}",
                        self.maglev_min_size, self.maglev_max_size
                    )
                })
            })
    }

    /// The bounds of automatically sized tables.
    pub fn tables(&self) -> super::layout::TableBounds {
        super::layout::TableBounds {
            min: self.maglev_min_size,
            max: self.maglev_max_size,
        }
    }
}

/// The loaded programs. Dropping it detaches everything it attached.
pub struct Programs {
    ebpf: Ebpf,
    // Owns the log ring buffer: dropping it would close the map the program writes to.
    logger: Option<EbpfLogger<&'static dyn log::Log>>,
    links: HashMap<(Program, String), XdpLinkId>,
    pin_dir: Option<PathBuf>,
}

/// How `attach_pinned` found the interface.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attached {
    /// Nothing of ours was attached; a new link was made and pinned.
    New,
    /// A pinned link from an earlier run was there; its program was replaced
    /// atomically, with no moment without a program.
    Replaced,
}

/// A pinned map made with other sizes would be reused as it is, silently ignoring the
/// new options: refuse instead.
/// Key and value sizes of every map, as this build's types have them.
fn layouts() -> [(&'static str, usize, usize); 16] {
    use lb_common::*;
    use std::mem::size_of;
    [
        (
            map_names::VIP_ADDRS,
            size_of::<AddrKey>(),
            size_of::<AddrMeta>(),
        ),
        (map_names::VIPS, size_of::<VipKey>(), size_of::<VipMeta>()),
        (map_names::VIP_FILTER, 4, 8),
        (map_names::VIP_STATE, 4, 8),
        // Two cells per element.
        (map_names::MAGLEV_RING, 4, 8),
        (map_names::BACKENDS, 4, size_of::<Backend>()),
        (map_names::ROUTES, 4, size_of::<Route>()),
        // A devmap value is `struct bpf_devmap_val`: ifindex and program fd.
        (map_names::TX_PORTS, 4, 8),
        (map_names::CONN_SETS_V4, 4, size_of::<conn_sets::ConnSet>()),
        (map_names::CONN_SETS_V6, 4, size_of::<conn_sets::ConnSet6>()),
        (map_names::VIP_STATS, 4, size_of::<Counter>()),
        (map_names::BACKEND_STATS, 4, size_of::<Counter>()),
        (map_names::GLOBAL_STATS, 4, size_of::<GlobalStats>()),
        // An LPM trie's key is the kernel's `prefixlen` followed by the data.
        (
            map_names::SPHERES,
            4 + size_of::<SphereKey>(),
            size_of::<SphereMeta>(),
        ),
        (map_names::REFUSALS, 16, size_of::<RefuseBucket>()),
        (map_names::CONTROL, 4, size_of::<Control>()),
    ]
}

/// Pinned maps left by an older build whose types had other sizes would be reused
/// and misread: refuse, naming the way out.
fn check_pinned_layouts(dir: &Path) -> Result<()> {
    for (name, key, value) in layouts() {
        let path = dir.join(name);
        if !path.exists() {
            continue;
        }
        let info =
            MapInfo::from_pin(&path).map_err(|source| DataplaneError::Map { name, source })?;
        // The connection table's kind changed too (per-CPU values, then an LRU,
        // before): same sizes, another map.
        // And the ring became mappable.
        let mappable = [
            map_names::MAGLEV_RING,
            map_names::BACKENDS,
            map_names::VIP_STATE,
            map_names::CONN_SETS_V4,
            map_names::CONN_SETS_V6,
        ];
        let kind_differs =
            mappable.contains(&name) && info.map_flags() & lb_common::BPF_F_MMAPABLE == 0;
        if kind_differs || info.key_size() as usize != key || info.value_size() as usize != value {
            return Err(DataplaneError::Options(format!(
                "the pinned map {} was made by another build (key {} / value {} bytes, this build uses {key} / {value}); \
                 detach the old data plane first (lbctl shutdown --detach, or remove {})",
                path.display(),
                info.key_size(),
                info.value_size(),
                dir.display()
            )));
        }
    }
    Ok(())
}

/// Unpins the maps of older builds that this one no longer uses (their connection
/// tables): the old program, while still attached, keeps its map; once it is
/// replaced the map's memory is freed instead of staying pinned for good. Its flows
/// are re-steered by their services' tables, as after a restart that lost them.
fn unpin_retired(dir: &Path) {
    for path in map_names::CONNS_RETIRED.map(|name| dir.join(name)) {
        if !path.exists() {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                tracing::info!(path = %path.display(), "unpinned an older build's connection table")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "could not unpin an older build's connection table; remove it by hand")
            }
        }
    }
}

fn check_pinned_size(dir: &Path, name: &str, expected: u32, option: &str) -> Result<()> {
    let path = dir.join(name);
    if !path.exists() {
        return Ok(());
    }
    let info = MapInfo::from_pin(&path).map_err(|source| DataplaneError::Map {
        name: map_names::ALL
            .iter()
            .find(|n| **n == name)
            .copied()
            .unwrap_or("?"),
        source,
    })?;
    if info.max_entries() != expected {
        return Err(DataplaneError::Options(format!(
            "the pinned map {} has {} entries but {option} now makes it {expected}; \
             detach the balancer (lbctl shutdown --detach) to apply new sizes",
            path.display(),
            info.max_entries()
        )));
    }
    Ok(())
}

/// The link pinned at `path` (by an earlier run), as a link of type `L`, for its
/// program to be replaced in one step; `None` if nothing is pinned there.
pub(super) fn pinned_link<L>(path: &Path, kind: &str) -> Result<Option<L>>
where
    L: TryFrom<FdLink>,
    <L as TryFrom<FdLink>>::Error: std::fmt::Display,
{
    if !path.exists() {
        return Ok(None);
    }
    let old = PinnedLink::from_pin(path).map_err(|e| {
        DataplaneError::Options(format!("opening pinned link {}: {e}", path.display()))
    })?;
    L::try_from(FdLink::from(old)).map(Some).map_err(|e| {
        DataplaneError::Options(format!(
            "pinned link {} is not {kind} link: {e}",
            path.display()
        ))
    })
}

/// Pins `link` (just made by attaching `program` to `interface`) at `path`: pinned,
/// it lives on when this process's handle closes.
pub(super) fn pin_link<L>(link: L, path: &Path, program: &str, interface: &str) -> Result<()>
where
    FdLink: TryFrom<L>,
    <FdLink as TryFrom<L>>::Error: std::fmt::Display,
{
    let fd_link = FdLink::try_from(link).map_err(|e| {
        DataplaneError::Options(format!(
            "the kernel attached {program} to {interface} without a BPF link, which cannot be pinned: {e}"
        ))
    })?;
    fd_link.pin(path).map_err(|e| {
        DataplaneError::Options(format!("pinning the link at {}: {e}", path.display()))
    })?;
    Ok(())
}

impl Programs {
    /// Loads every program and hands back the maps to write services into.
    pub fn load(options: &LoadOptions) -> Result<(Programs, MapManager)> {
        if let Some(why) = options.refusal() {
            return Err(DataplaneError::Options(why));
        }
        let mut loader = EbpfLoader::new();
        let sizes = [
            (map_names::VIP_ADDRS, options.max_services, "max_services"),
            (map_names::VIPS, options.max_services, "max_services"),
            (map_names::VIP_STATS, options.max_services, "max_services"),
            (map_names::VIP_STATE, options.max_services, "max_services"),
            (map_names::BACKENDS, options.max_backends, "max_backends"),
            (map_names::ROUTES, options.max_backends, "max_backends"),
            (
                map_names::BACKEND_STATS,
                options.max_backends,
                "max_backends",
            ),
            (
                map_names::MAGLEV_RING,
                options.ring_cells.div_ceil(2),
                "ring_cells",
            ),
            (
                map_names::CONN_SETS_V4,
                // The sets, and the element after them that records their hash key.
                conn_sets::sets_for(options.conn_table_size) + 1,
                "conn_table_size",
            ),
            (
                map_names::CONN_SETS_V6,
                conn_sets::sets_for(options.v6_conn_table_size()) + 1,
                "conn_table_size_v6",
            ),
        ];
        for (name, entries, _) in sizes {
            loader.map_max_entries(name, entries);
        }
        if let Some(dir) = &options.pin_dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                DataplaneError::Options(format!(
                    "creating pin directory {} (is bpffs mounted on /sys/fs/bpf?): {e}",
                    dir.display()
                ))
            })?;
            for (name, entries, option) in sizes {
                check_pinned_size(dir, name, entries, option)?;
            }
            check_pinned_layouts(dir)?;
            for name in map_names::ALL {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        // Each connection table's hash key: the one its pinned sets were filled by,
        // else new; and its sets' mask.
        let key = |family: Family, size: u32| -> Result<(u64, u32)> {
            let pinned = match &options.pin_dir {
                Some(dir) => sets::pinned_seed(family, &dir.join(family.name()))?,
                None => None,
            };
            Ok((
                pinned.unwrap_or_else(rand::random::<u64>),
                conn_sets::sets_for(size) - 1,
            ))
        };
        let keys = [
            key(Family::V4, options.conn_table_size)?,
            key(Family::V6, options.v6_conn_table_size())?,
        ];
        loader.override_global("CONN_SETS_SEED", &keys[0].0, true);
        loader.override_global("CONN_SETS_MASK", &keys[0].1, true);
        loader.override_global("CONN_SETS_V6_SEED", &keys[1].0, true);
        loader.override_global("CONN_SETS_V6_MASK", &keys[1].1, true);
        let mut ebpf = loader.load(OBJECT)?;
        // The program logs only on control-plane inconsistencies; no log map means none.
        let logger = EbpfLogger::init(&mut ebpf).ok();
        for program in Program::ALL {
            let xdp: &mut Xdp = ebpf
                .program_mut(program.name())
                .and_then(|p| p.try_into().ok())
                .ok_or(DataplaneError::MissingProgram {
                    name: program.name(),
                })?;
            xdp.load().map_err(|source| DataplaneError::ProgramLoad {
                name: program.name(),
                source,
            })?;
        }
        let tc: &mut SchedClassifier = ebpf
            .program_mut(program_names::PROBE_ENCAP)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram {
                name: program_names::PROBE_ENCAP,
            })?;
        tc.load().map_err(|source| DataplaneError::ProgramLoad {
            name: program_names::PROBE_ENCAP,
            source,
        })?;
        // Before any program is attached: a new table records its key here.
        let maps = MapManager::new(&mut ebpf, options, keys.map(|(seed, _)| seed))?;
        if let Some(dir) = &options.pin_dir {
            unpin_retired(dir);
        }
        let dataplane = Programs {
            ebpf,
            logger,
            links: HashMap::new(),
            pin_dir: options.pin_dir.clone(),
        };
        Ok((dataplane, maps))
    }

    /// The liveness stamp, on this load's own map (tests without a pin directory).
    pub fn stamp(&mut self) -> Result<super::liveness::Stamp> {
        let map = self
            .ebpf
            .take_map(map_names::CONTROL)
            .ok_or(DataplaneError::MapShape {
                name: map_names::CONTROL,
            })?;
        super::liveness::Stamp::from_map(map)
    }

    /// A loaded program, e.g. to run packets through it with `aya::programs::TestRun`.
    pub fn program(&self, program: Program) -> &Xdp {
        self.ebpf
            .program(program.name())
            .and_then(|p| p.try_into().ok())
            .expect("every program was checked at load")
    }

    fn program_mut(&mut self, program: Program) -> &mut Xdp {
        self.ebpf
            .program_mut(program.name())
            .and_then(|p| p.try_into().ok())
            .expect("every program was checked at load")
    }

    /// Attaches `program` to `interface` (in the calling thread's network namespace).
    pub fn attach(&mut self, program: Program, interface: &str, mode: XdpMode) -> Result<()> {
        let id = self
            .program_mut(program)
            .attach(interface, mode)
            .map_err(|source| DataplaneError::Attach {
                program: program.name(),
                interface: interface.to_string(),
                source,
            })?;
        self.links.insert((program, interface.to_string()), id);
        Ok(())
    }

    /// Detaches `program` from `interface`; a no-op if it is not attached there.
    pub fn detach(&mut self, program: Program, interface: &str) -> Result<()> {
        if let Some(id) = self.links.remove(&(program, interface.to_string())) {
            self.program_mut(program)
                .detach(id)
                .map_err(|source| DataplaneError::Detach {
                    program: program.name(),
                    source,
                })?;
        }
        Ok(())
    }

    fn link_pin_path(&self, program: Program, interface: &str) -> Result<PathBuf> {
        let dir = self.pin_dir.as_ref().ok_or_else(|| {
            DataplaneError::Options("pinned attach needs LoadOptions::pin_dir".into())
        })?;
        Ok(dir.join(format!("link-{}-{interface}", program.name())))
    }

    /// Attaches `program` to `interface` through a link pinned in the pin directory, so
    /// that it outlives this process. If an earlier run left such a link, its program
    /// is replaced by this one in one step: traffic never goes unhandled.
    pub fn attach_pinned(
        &mut self,
        program: Program,
        interface: &str,
        mode: XdpMode,
    ) -> Result<Attached> {
        let path = self.link_pin_path(program, interface)?;
        let attach_err = |source| DataplaneError::Attach {
            program: program.name(),
            interface: interface.to_string(),
            source,
        };
        if let Some(link) = pinned_link::<XdpLink>(&path, "an XDP")? {
            let id = self
                .program_mut(program)
                .attach_to_link(link)
                .map_err(attach_err)?;
            self.links.insert((program, interface.to_string()), id);
            return Ok(Attached::Replaced);
        }
        let xdp = self.program_mut(program);
        let id = xdp.attach(interface, mode).map_err(attach_err)?;
        let link = xdp.take_link(id).map_err(attach_err)?;
        pin_link(link, &path, program.name(), interface)?;
        Ok(Attached::New)
    }

    /// Wraps this node's marked health probes on `interface`'s egress as `encap`
    /// says (`lb_probe_encap`): from its outer sources, GUE to its port. Through a
    /// link pinned in the pin directory (replaced in one step by a later run), or a
    /// plain one without a pin directory (tests).
    pub fn attach_probe_encap(&mut self, interface: &str, encap: &EncapSettings) -> Result<()> {
        let mut config: Array<&mut MapData, ProbeConfig> =
            Array::try_from(self.ebpf.map_mut(map_names::PROBE_CONFIG).ok_or(
                DataplaneError::MapShape {
                    name: map_names::PROBE_CONFIG,
                },
            )?)
            .map_err(|source| DataplaneError::Map {
                name: map_names::PROBE_CONFIG,
                source,
            })?;
        let c = ProbeConfig {
            source_v4: encap.source_v4.map_or([0; 4], |a| a.octets()),
            gue_port_be: encap.gue_port().to_be(),
            _pad: 0,
            source_v6: encap.source_v6.map_or([0; 16], |a| a.octets()),
        };
        config.set(0, c, 0).map_err(|source| DataplaneError::Map {
            name: map_names::PROBE_CONFIG,
            source,
        })?;
        let attach_err = |source| DataplaneError::Attach {
            program: program_names::PROBE_ENCAP,
            interface: interface.to_string(),
            source,
        };
        let path = self
            .pin_dir
            .as_ref()
            .map(|d| d.join(format!("link-{}-{interface}", program_names::PROBE_ENCAP)));
        let tc: &mut SchedClassifier = self
            .ebpf
            .program_mut(program_names::PROBE_ENCAP)
            .and_then(|p| p.try_into().ok())
            .expect("checked at load");
        let old = match &path {
            Some(p) => pinned_link::<SchedClassifierLink>(p, "a tc")?,
            None => None,
        };
        if let Some(link) = old {
            let id = tc.attach_to_link(link).map_err(attach_err)?;
            // The pin holds the link; this process's handle must not take it down.
            let _ = tc.take_link(id);
            return Ok(());
        }
        let id = tc
            .attach(interface, TcAttachType::Egress)
            .map_err(attach_err)?;
        let Some(path) = path else {
            // Kept with the program: detached when `Programs` drops.
            return Ok(());
        };
        let link = tc.take_link(id).map_err(attach_err)?;
        pin_link(link, &path, program_names::PROBE_ENCAP, interface)
    }

    /// Removes the probe encapsulation's pinned link on `interface`, if there is one.
    pub fn detach_probe_encap(&mut self, interface: &str) -> Result<()> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        remove_pin(&dir.join(format!("link-{}-{interface}", program_names::PROBE_ENCAP)))
    }

    /// Removes the pinned link of `program` on `interface`: the program comes off the
    /// interface once this process closes its own handles too.
    pub fn detach_pinned(&mut self, program: Program, interface: &str) -> Result<()> {
        let path = self.link_pin_path(program, interface)?;
        if let Some(id) = self.links.remove(&(program, interface.to_string())) {
            let _ = self.program_mut(program).detach(id);
        }
        remove_pin(&path)
    }

    /// Removes the pinned maps and the pin directory (after `detach_pinned` on every
    /// interface): the next load starts empty.
    pub fn unpin_maps(&self) -> Result<()> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        for name in map_names::ALL {
            match std::fs::remove_file(dir.join(name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(DataplaneError::Options(format!(
                        "unpinning {name} in {}: {e}",
                        dir.display()
                    )))
                }
            }
        }
        let _ = std::fs::remove_dir(dir);
        Ok(())
    }

    /// Writes out what the program logged; the daemon calls it when the log fd is readable.
    pub fn flush_logs(&mut self) {
        if let Some(logger) = self.logger.as_mut() {
            logger.flush();
        }
    }
}

/// Removes a pinned link's file; one that is not there is already removed.
fn remove_pin(path: &std::path::Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(DataplaneError::Options(format!(
            "removing {}: {e}",
            path.display()
        ))),
    }
}
