//! What lbd's data plane really holds: its pinned maps read directly, and frames run
//! through `BPF_PROG_TEST_RUN` on a copy of the XDP program loaded onto the same pinned
//! maps (the same object lbd embeds, so the same code on the same tables).

use std::{collections::BTreeMap, net::IpAddr, path::Path};

use aya::{
    maps::{Array, HashMap, Map, MapData},
    programs::{TestRun, TestRunOptions},
};
use lb_common::{Backend, VipKey, VipMeta, BACKEND_F_ACTIVE, FAMILY_V4};

pub const XDP_DROP: u32 = 1;
pub const XDP_PASS: u32 = 2;
pub const XDP_TX: u32 = 3;

fn open(dir: &Path, name: &str) -> MapData {
    MapData::from_pin(dir.join(name))
        .unwrap_or_else(|e| panic!("opening pinned map {name} in {}: {e}", dir.display()))
}

pub fn addr_of(bytes: &[u8; 16], family: u8) -> IpAddr {
    if family == FAMILY_V4 {
        IpAddr::from(<[u8; 4]>::try_from(&bytes[..4]).unwrap())
    } else {
        IpAddr::from(*bytes)
    }
}

/// The services in `VIPS`, by their text key (`tcp/198.18.0.100:8080`).
pub fn services(dir: &Path) -> BTreeMap<String, VipMeta> {
    let map: HashMap<MapData, VipKey, VipMeta> =
        HashMap::try_from(Map::HashMap(open(dir, "VIPS"))).unwrap();
    map.iter()
        .map(|r| {
            let (k, v) = r.unwrap();
            let proto = if k.proto == 6 { "tcp" } else { "udp" };
            let port = u16::from_be(k.port_be);
            let port = if port == 0 {
                "*".to_string()
            } else {
                port.to_string()
            };
            let key = match addr_of(&k.addr, k.family) {
                IpAddr::V4(a) => format!("{proto}/{a}:{port}"),
                IpAddr::V6(a) => format!("{proto}/[{a}]:{port}"),
            };
            (key, v)
        })
        .collect()
}

/// Every active entry of `BACKENDS`: id → backend.
pub fn active_backends(dir: &Path) -> BTreeMap<u32, Backend> {
    let map: Array<MapData, Backend> = Array::try_from(Map::Array(open(dir, "BACKENDS"))).unwrap();
    (0..map.len())
        .filter_map(|i| {
            let b = map.get(&i, 0).ok()?;
            (b.flags & BACKEND_F_ACTIVE != 0).then_some((i, b))
        })
        .collect()
}

/// The backend ids a service's live table names.
pub fn table_ids(dir: &Path, meta: &VipMeta) -> std::collections::BTreeSet<u32> {
    // Two cells per element, cell 2k in the low half.
    let map: Array<MapData, u64> = Array::try_from(Map::Array(open(dir, "MAGLEV_RING"))).unwrap();
    (meta.ring_offset..meta.ring_offset + meta.ring_size)
        .map(|i| (map.get(&(i / 2), 0).unwrap() >> ((i & 1) * 32)) as u32)
        .filter(|id| *id != u32::MAX)
        .collect()
}

/// A copy of the balancer on lbd's pinned maps, to run frames through.
pub struct Probe {
    dp: lb_userspace::Programs,
    _maps: lb_userspace::MapManager,
}

impl Probe {
    /// `options` must give the sizes lbd was started with (the loader checks them).
    pub fn open(options: lb_userspace::LoadOptions) -> Probe {
        let (dp, maps) = lb_userspace::Programs::load(&options).expect("loading onto the pins");
        Probe { dp, _maps: maps }
    }

    pub fn run(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let mut out = vec![0u8; frame.len() + 512];
        let r = self
            .dp
            .program(lb_userspace::Program::Balancer)
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(r.data_size_out as usize);
        (r.return_value, out)
    }
}

/// A TCP SYN from `src:sport` to `dst:dport`, with valid checksums (built by hand:
/// the tests crate has no packet library, and the data plane reads only headers).
pub fn syn_v4(
    src: std::net::Ipv4Addr,
    sport: u16,
    dst: std::net::Ipv4Addr,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    let mut f = vec![0u8; 14 + 20 + 20];
    f[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&[0x08, 0x00]);
    let ip = &mut f[14..34];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&40u16.to_be_bytes());
    ip[6] = 0x40;
    ip[8] = 64;
    ip[9] = 6;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let sum = checksum(&f[14..34]);
    f[24..26].copy_from_slice(&sum.to_be_bytes());
    let tcp = &mut f[34..54];
    tcp[0..2].copy_from_slice(&sport.to_be_bytes());
    tcp[2..4].copy_from_slice(&dport.to_be_bytes());
    tcp[4..8].copy_from_slice(&1u32.to_be_bytes());
    tcp[12] = 5 << 4;
    tcp[13] = flags;
    tcp[14..16].copy_from_slice(&65535u16.to_be_bytes());
    f
}

fn checksum(b: &[u8]) -> u16 {
    let mut sum: u32 = b
        .chunks(2)
        .map(|c| u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]) as u32)
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Destination MAC of a frame, as text.
pub fn dst_mac(frame: &[u8]) -> String {
    frame[..6]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
