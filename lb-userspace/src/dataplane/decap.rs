//! The backend side's program: `lb_decap` strips the IPIP/GUE headers LB nodes put
//! on, so that a backend needs no tunnel device and no kernel module. Loaded from
//! the same object as the balancer, with the balancer's own maps at their least
//! size (they are created, never used); its three maps are pinned in their own
//! directory, so a later `lbctl backend setup` updates them in place and
//! `lbctl backend doctor` reads them.

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{
        tc::{SchedClassifierLink, TcAttachType},
        xdp::XdpLink,
        SchedClassifier, Xdp, XdpMode,
    },
    Ebpf, EbpfLoader,
};
use lb_common::{map_names, program_names, AddrKey, DecapConfig, DecapStats};

use super::{
    error::{DataplaneError, MapResultExt, Result},
    layout::addr_bytes,
    loader::{pin_link, pinned_link},
};

/// The decapsulation's maps, by name: what is pinned in its directory.
pub const MAPS: [&str; 3] = [
    map_names::DECAP_SOURCES,
    map_names::DECAP_CONFIG,
    map_names::DECAP_STATS,
];

/// The balancer's maps that dominate its memory, at their least size here.
const LEAST: [&str; 9] = [
    map_names::VIP_ADDRS,
    map_names::VIPS,
    map_names::VIP_STATS,
    map_names::BACKENDS,
    map_names::ROUTES,
    map_names::BACKEND_STATS,
    map_names::MAGLEV_RING,
    map_names::CONN_SETS_V4,
    map_names::CONN_SETS_V6,
];

/// What the decapsulation takes: packets from these outer sources (the LB nodes'
/// `encap_source_v4`/`_v6`), and GUE on this UDP port.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DecapSettings {
    pub sources: Vec<IpAddr>,
    pub gue_port: u16,
}

pub struct Decap {
    ebpf: Ebpf,
    pin_dir: Option<PathBuf>,
}

impl Decap {
    /// Loads `lb_decap` with `settings`; with `pin_dir`, its maps are pinned there
    /// (reused if already there: their contents are replaced by `settings`).
    pub fn load(settings: &DecapSettings, pin_dir: Option<&Path>) -> Result<Decap> {
        let mut loader = EbpfLoader::new();
        for name in LEAST {
            loader.map_max_entries(name, 1);
        }
        if let Some(dir) = pin_dir {
            std::fs::create_dir_all(dir).map_err(|e| {
                DataplaneError::Options(format!(
                    "creating pin directory {} (is bpffs mounted on /sys/fs/bpf?): {e}",
                    dir.display()
                ))
            })?;
            for name in MAPS {
                loader.map_pin_path(name, dir.join(name));
            }
        }
        let mut ebpf = loader.load(super::loader::object())?;
        let xdp: &mut Xdp = ebpf
            .program_mut(program_names::DECAP)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram {
                name: program_names::DECAP,
            })?;
        xdp.load().map_err(|source| DataplaneError::ProgramLoad {
            name: program_names::DECAP,
            source,
        })?;
        let tc: &mut SchedClassifier = ebpf
            .program_mut(program_names::DECAP_TC)
            .and_then(|p| p.try_into().ok())
            .ok_or(DataplaneError::MissingProgram {
                name: program_names::DECAP_TC,
            })?;
        tc.load().map_err(|source| DataplaneError::ProgramLoad {
            name: program_names::DECAP_TC,
            source,
        })?;
        let mut decap = Decap {
            ebpf,
            pin_dir: pin_dir.map(Path::to_path_buf),
        };
        decap.configure(settings)?;
        Ok(decap)
    }

    /// Replaces the sources and the GUE port with `settings`.
    pub fn configure(&mut self, settings: &DecapSettings) -> Result<()> {
        let mut sources: HashMap<&mut MapData, AddrKey, u32> =
            HashMap::try_from(self.ebpf.map_mut(map_names::DECAP_SOURCES).ok_or(
                DataplaneError::MapShape {
                    name: map_names::DECAP_SOURCES,
                },
            )?)
            .map_ctx(map_names::DECAP_SOURCES)?;
        let wanted: Vec<AddrKey> = settings.sources.iter().map(|a| source_key(*a)).collect();
        let stale: Vec<AddrKey> = sources
            .keys()
            .filter_map(|k| k.ok())
            .filter(|k| !wanted.contains(k))
            .collect();
        for k in stale {
            sources.remove(&k).map_ctx(map_names::DECAP_SOURCES)?;
        }
        for k in &wanted {
            sources.insert(k, 1, 0).map_ctx(map_names::DECAP_SOURCES)?;
        }
        let mut config: Array<&mut MapData, DecapConfig> =
            Array::try_from(self.ebpf.map_mut(map_names::DECAP_CONFIG).ok_or(
                DataplaneError::MapShape {
                    name: map_names::DECAP_CONFIG,
                },
            )?)
            .map_ctx(map_names::DECAP_CONFIG)?;
        let c = DecapConfig {
            gue_port_be: settings.gue_port.to_be(),
            ..DecapConfig::default()
        };
        config.set(0, c, 0).map_ctx(map_names::DECAP_CONFIG)
    }

    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(program_names::DECAP)
            .and_then(|p| p.try_into().ok())
            .expect("checked at load")
    }

    /// The tc fallback (`lb_decap_tc`).
    pub fn tc_program(&self) -> &SchedClassifier {
        self.ebpf
            .program(program_names::DECAP_TC)
            .and_then(|p| p.try_into().ok())
            .expect("checked at load")
    }

    /// Attaches `lb_decap_tc` to `interface`'s tc ingress (tcx) through a pinned
    /// link, for interfaces where XDP cannot attach; a link an earlier setup pinned
    /// gets this program in one step.
    pub fn attach_tc_pinned(&mut self, interface: &str) -> Result<()> {
        let dir = self.pin_dir.clone().ok_or_else(|| {
            DataplaneError::Options("a pinned attach needs a pin directory".into())
        })?;
        let path = tc_link_path(&dir, interface);
        let attach_err = |source| DataplaneError::Attach {
            program: program_names::DECAP_TC,
            interface: interface.to_string(),
            source,
        };
        let tc: &mut SchedClassifier = self
            .ebpf
            .program_mut(program_names::DECAP_TC)
            .and_then(|p| p.try_into().ok())
            .expect("checked at load");
        if let Some(link) = pinned_link::<SchedClassifierLink>(&path, "a tc")? {
            let id = tc.attach_to_link(link).map_err(attach_err)?;
            let _ = tc.take_link(id);
            return Ok(());
        }
        let id = tc
            .attach(interface, TcAttachType::Ingress)
            .map_err(attach_err)?;
        let link = tc.take_link(id).map_err(attach_err)?;
        pin_link(link, &path, program_names::DECAP_TC, interface)
    }

    /// The counters, summed over CPUs.
    pub fn stats(&self) -> Result<DecapStats> {
        stats_of(
            self.ebpf
                .map(map_names::DECAP_STATS)
                .ok_or(DataplaneError::MapShape {
                    name: map_names::DECAP_STATS,
                })?,
        )
    }

    /// Attaches to `interface` through a link pinned in the pin directory, so that it
    /// outlives this process; a link left by an earlier setup gets this program in
    /// one step.
    pub fn attach_pinned(&mut self, interface: &str, mode: XdpMode) -> Result<()> {
        let dir = self.pin_dir.clone().ok_or_else(|| {
            DataplaneError::Options("a pinned attach needs a pin directory".into())
        })?;
        let path = link_path(&dir, interface);
        let attach_err = |source| DataplaneError::Attach {
            program: program_names::DECAP,
            interface: interface.to_string(),
            source,
        };
        let xdp: &mut Xdp = self
            .ebpf
            .program_mut(program_names::DECAP)
            .and_then(|p| p.try_into().ok())
            .expect("checked at load");
        if let Some(link) = pinned_link::<XdpLink>(&path, "an XDP")? {
            let id = xdp.attach_to_link(link).map_err(attach_err)?;
            // The link stays pinned; this process's handle goes with it.
            let _ = xdp.take_link(id);
            return Ok(());
        }
        let id = xdp.attach(interface, mode).map_err(attach_err)?;
        let link = xdp.take_link(id).map_err(attach_err)?;
        pin_link(link, &path, program_names::DECAP, interface)
    }
}

/// Where the XDP link of `interface` is pinned.
pub fn link_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link-{}-{interface}", program_names::DECAP))
}

/// Where the tc link of `interface` is pinned.
pub fn tc_link_path(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link-{}-{interface}", program_names::DECAP_TC))
}

pub fn source_key(addr: IpAddr) -> AddrKey {
    let (addr, family) = addr_bytes(addr);
    AddrKey {
        addr,
        family,
        _pad: [0; 3],
    }
}

fn stats_of(map: &aya::maps::Map) -> Result<DecapStats> {
    let stats: PerCpuArray<&MapData, DecapStats> =
        PerCpuArray::try_from(map).map_ctx(map_names::DECAP_STATS)?;
    let per_cpu = stats.get(&0, 0).map_ctx(map_names::DECAP_STATS)?;
    let mut sum = DecapStats::default();
    for s in per_cpu.iter() {
        sum.ipip += s.ipip;
        sum.gue += s.gue;
        sum.foreign_source += s.foreign_source;
        sum.malformed += s.malformed;
        sum.ce_dropped += s.ce_dropped;
        sum.passed += s.passed;
    }
    Ok(sum)
}

/// What a pinned decapsulation holds (for `lbctl backend doctor`): its sources,
/// its GUE port and its counters, read from the pins in `dir`.
pub fn read_pinned(dir: &Path) -> Result<(DecapSettings, DecapStats)> {
    let open = |name: &'static str| {
        MapData::from_pin(dir.join(name)).map_err(|source| DataplaneError::Map { name, source })
    };
    let sources: HashMap<MapData, AddrKey, u32> =
        HashMap::try_from(aya::maps::Map::HashMap(open(map_names::DECAP_SOURCES)?))
            .map_ctx(map_names::DECAP_SOURCES)?;
    let addrs = sources
        .keys()
        .filter_map(|k| k.ok())
        .filter_map(|k| match k.family {
            lb_common::FAMILY_V4 => Some(IpAddr::from(<[u8; 4]>::try_from(&k.addr[..4]).ok()?)),
            lb_common::FAMILY_V6 => Some(IpAddr::from(k.addr)),
            _ => None,
        })
        .collect();
    let config: Array<MapData, DecapConfig> =
        Array::try_from(aya::maps::Map::Array(open(map_names::DECAP_CONFIG)?))
            .map_ctx(map_names::DECAP_CONFIG)?;
    let c = config.get(&0, 0).map_ctx(map_names::DECAP_CONFIG)?;
    let stats = stats_of(&aya::maps::Map::PerCpuArray(open(map_names::DECAP_STATS)?))?;
    Ok((
        DecapSettings {
            sources: addrs,
            gue_port: u16::from_be(c.gue_port_be),
        },
        stats,
    ))
}
