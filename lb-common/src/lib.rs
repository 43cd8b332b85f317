//! The `#[repr(C)]` keys and values of every BPF map, shared by the XDP program
//! (`lb-ebpf`) and userspace (`lb-userspace`), so neither side keeps its own copy.
//!
//! Rules for these types: no `bool`, `Option` or enums (their layout is not a kernel
//! ABI); padding is spelled out as `_pad` fields so `aya::Pod` is sound; byte order is
//! in the field name (`_be` = network byte order) or its doc. Sizes are asserted at
//! compile time so a change that would silently break the other side does not build.
#![no_std]

pub mod conn_sets;
pub mod hash;
pub mod idle;

/// Address family tags used in keys. Our own values, not the kernel's `AF_*`, so the
/// key layout does not depend on the platform's headers.
pub const FAMILY_V4: u8 = 4;
pub const FAMILY_V6: u8 = 6;

/// IP protocol numbers the balancer steers.
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;

/// The kernel's `BPF_F_MMAPABLE` map flag: the ring array is written by lbd through
/// a shared mapping.
pub const BPF_F_MMAPABLE: u32 = 1 << 10;
/// Marks a ring entry that has no backend (a service with no usable backend).
pub const RING_EMPTY: u32 = u32::MAX;

/// Placeholder capacities of the address, VIP, backend and route tables in the object:
/// the loader sizes every one of them from `[dataplane]` at load time.
pub const MAX_VIP_ADDRS: u32 = 1024;
pub const MAX_VIPS: u32 = 1024;
pub const MAX_BACKENDS: u32 = 8192;
pub const MAX_TX_PORTS: u32 = 64;
/// CPUs whose connection-table entries a packet may look at when its own CPU has
/// none. Machines with more CPUs still work; flows that move between CPUs beyond
/// this many are re-steered through the Maglev table (usually to the same backend).
pub const MAX_CPUS: u32 = 128;

/// Map names, as the XDP program declares them and the loader looks them up.
pub mod map_names {
    pub const VIP_ADDRS: &str = "VIP_ADDRS";
    pub const VIPS: &str = "VIPS";
    pub const MAGLEV_RING: &str = "MAGLEV_RING";
    pub const BACKENDS: &str = "BACKENDS";
    pub const ROUTES: &str = "ROUTES";
    pub const TX_PORTS: &str = "TX_PORTS";
    /// The connection tables, one per family, in sets of slots (`conn_sets`).
    pub const CONN_SETS_V4: &str = "CONN_SETS_V4";
    pub const CONN_SETS_V6: &str = "CONN_SETS_V6";
    /// Connection tables of older builds: the one table of both families, then the
    /// hashes of each family. Unpinned at load, so that their memory goes with the
    /// old program.
    pub const CONNS_RETIRED: [&str; 3] = ["CONNS", "CONNS_V4", "CONNS_V6"];
    pub const VIP_STATS: &str = "VIP_STATS";
    pub const BACKEND_STATS: &str = "BACKEND_STATS";
    pub const GLOBAL_STATS: &str = "GLOBAL_STATS";
    pub const SPHERES: &str = "SPHERES";
    pub const REFUSALS: &str = "REFUSALS";
    pub const CONTROL: &str = "CONTROL";
    pub const VIP_FILTER: &str = "VIP_FILTER";
    pub const VIP_STATE: &str = "VIP_STATE";
    /// The backend side's decapsulation (`lb_decap`); not the balancer's, not pinned
    /// with its maps.
    pub const DECAP_SOURCES: &str = "DECAP_SOURCES";
    pub const DECAP_CONFIG: &str = "DECAP_CONFIG";
    pub const DECAP_STATS: &str = "DECAP_STATS";
    /// `lb_probe_encap`'s settings (written at every start, not pinned).
    pub const PROBE_CONFIG: &str = "PROBE_CONFIG";
    /// The balancer's maps.
    pub const ALL: [&str; 16] = [
        VIP_ADDRS,
        VIPS,
        MAGLEV_RING,
        BACKENDS,
        ROUTES,
        TX_PORTS,
        CONN_SETS_V4,
        CONN_SETS_V6,
        VIP_STATS,
        BACKEND_STATS,
        GLOBAL_STATS,
        SPHERES,
        REFUSALS,
        CONTROL,
        VIP_FILTER,
        VIP_STATE,
    ];
}

/// Program names in the object.
pub mod program_names {
    /// The balancer.
    pub const BALANCER: &str = "lb_xdp";
    /// Passes everything: attached to a veth peer so that `XDP_TX` frames arrive.
    pub const PASS: &str = "lb_pass";
    /// Swaps MACs and returns `XDP_TX`: the benchmark's baseline.
    pub const SWAP_MACS: &str = "lb_swap_macs";
    /// Returns `XDP_DROP`: the cost of running any program at all.
    pub const DROP: &str = "lb_drop";
    /// The backend side: strips IPIP/GUE from the LB nodes' packets (XDP).
    pub const DECAP: &str = "lb_decap";
    /// The same on tc ingress, where an interface takes no XDP program.
    pub const DECAP_TC: &str = "lb_decap_tc";
    /// tc egress of the data-plane interfaces: wraps marked health probes.
    pub const PROBE_ENCAP: &str = "lb_probe_encap";
}

/// Key of `VIP_ADDRS`: every address that has at least one VIP. The XDP program looks
/// the destination address up here before anything else, so traffic that is not ours
/// leaves after one lookup and packets too broken to carry ports can still be told
/// apart ("addressed to us, drop") from foreign traffic ("not ours, pass").
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct AddrKey {
    /// IPv4 in the first 4 bytes (rest zero) or IPv6, network byte order.
    pub addr: [u8; 16],
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    pub _pad: [u8; 3],
}

/// Value of `VIP_ADDRS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct AddrMeta {
    /// `ADDR_F_*` flags. Fragments carry no ports, so the fragment/option policy is
    /// per address: the OR of the policies of the services on that address.
    pub flags: u32,
}

/// Send fragments and packets with IP options/extension headers to the kernel
/// (`XDP_PASS`) instead of dropping them.
pub const ADDR_F_PASS_IRREGULAR: u32 = 1 << 0;

/// Key of `VIPS`. A port of 0 is the port-less fallback entry of the address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct VipKey {
    /// As in [`AddrKey::addr`].
    pub addr: [u8; 16],
    pub port_be: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    pub family: u8,
}

/// Value of `VIPS`. Replaced whole by userspace (a hash map update swaps the element
/// atomically), which is what makes a Maglev table flip atomic: the new table is
/// written to the spare slot first, then one update points `ring_offset` at it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct VipMeta {
    /// Index of the service in `VIP_STATS`.
    pub vip_id: u32,
    /// `VIP_F_*` flags.
    pub flags: u32,
    /// First entry of the service's current table in `MAGLEV_RING`.
    pub ring_offset: u32,
    /// Entries in that table (a prime for a Maglev table; the instance count for a
    /// source-partitioned service). 0 means the service has no table yet.
    pub ring_size: u32,
    /// The service's epoch (SPM): connections remember the epoch they began in, and
    /// one that outlives it is kept or re-steered as `VIP_F_EPOCH_RESTEER` says.
    pub epoch: u32,
}

/// Per-service flag: a connection from an older epoch is steered anew, as a new flow
/// (default: it stays on its backend until it ends).
pub const VIP_F_EPOCH_RESTEER: u32 = 1 << 1;

/// Per-service flag (SPM rule `source`): the table is the service's instances in
/// address order and the client's address (its last 32 bits) modulo their number
/// picks one, instead of the flow hash over the Maglev table.
pub const VIP_F_SRC_PARTITION: u32 = 1 << 2;

/// Per-service flag (SPM rule `topology`): the client's subnet, looked up in `SPHERES`,
/// may name a sub-table of the service's ring slot holding only its sphere's instances.
pub const VIP_F_TOPOLOGY: u32 = 1 << 3;

/// Data of the `SPHERES` LPM-trie key (after the kernel's `prefixlen`, which counts the
/// 32 bits of `ring_offset` plus the subnet's prefix). Keyed by the ring offset of the
/// table the service's `VipMeta` points at, so a new layout is written beside the old
/// one and the `VIPS` flip switches both at once.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct SphereKey {
    pub ring_offset: u32,
    /// The client subnet, as in [`AddrKey::addr`].
    pub addr: [u8; 16],
}

/// Value of `SPHERES`: the sphere's sub-table, relative to the key's `ring_offset`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SphereMeta {
    pub offset: u32,
    pub size: u32,
}

/// Per-service flag: the service is unavailable (maintenance, outage). A TCP SYN is
/// answered with a RST and a UDP datagram with an ICMP "administratively prohibited"
/// from the XDP program itself, within `REFUSALS_PER_SECOND` per source; every other
/// packet of the service is dropped.
pub const VIP_F_UNAVAILABLE: u32 = 1 << 4;

/// Bit of a `VIP_STATE` word's flags that no `VIP_F_*` flag uses: the word was
/// written for a live service (a zero word is "not known").
pub const VIP_STATE_LIVE: u32 = 1 << 31;
/// Bit of a `VIP_STATE` word: the service's address is not one this node serves (in
/// a cluster, another node owns it), so its packets are passed to the stack like any
/// other address's. Its `VIPS` entry stays (a takeover writes only the address), and
/// its address may share a served one's `VIP_FILTER` bit.
pub const VIP_STATE_UNSERVED: u32 = 1 << 30;

/// The `VIP_STATE` word of a service (indexed by `VipMeta::vip_id`): what a packet
/// of an established flow needs of its service, its flags (low half, with
/// [`VIP_STATE_LIVE`]) and epoch (high half), in one word that lbd stores at once.
/// Such a packet reaches its backend from the connection table, and its service
/// from the backend's `vip_id`, without the `VIPS` lookup (a hash of the address,
/// port and protocol). A word without `VIP_STATE_LIVE` sends it the `VIPS` way.
pub fn vip_state(meta: &VipMeta, served: bool) -> u64 {
    let unserved = if served { 0 } else { VIP_STATE_UNSERVED };
    (meta.epoch as u64) << 32 | (meta.flags | VIP_STATE_LIVE | unserved) as u64
}

/// Refusals sent to one source address per second, at most; beyond, dropped (a
/// refusal must not become a reflection amplifier).
pub const REFUSALS_PER_SECOND: u64 = 100;
/// Sources tracked by the refusal limiter (LRU).
pub const MAX_REFUSING_SOURCES: u32 = 16384;

/// Value of `REFUSALS` (LRU hash keyed by the source address, 16 bytes as in
/// [`AddrKey::addr`]): refusals sent in the current one-second window.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RefuseBucket {
    pub window_start_ns: u64,
    pub count: u64,
}

/// Capacity of `SPHERES` (subnet rules over all services and both ring slots).
pub const MAX_SPHERE_RULES: u32 = 4096;

/// Per-service flag: this service wants fragments and packets with IP options passed
/// to the kernel; folded into [`ADDR_F_PASS_IRREGULAR`] of its address.
pub const VIP_F_PASS_IRREGULAR: u32 = 1 << 0;

/// Value of `BACKENDS`, indexed by backend id. A backend is one real server of one
/// service; the same host serving two services has two ids (and two counters).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Backend {
    /// The real server's address, as in [`AddrKey::addr`]. Not needed to forward in
    /// L2 mode; an encapsulating mode uses it as the inner destination's real.
    pub addr: [u8; 16],
    pub family: u8,
    pub _pad: u8,
    /// `BACKEND_F_*`.
    pub flags: u16,
    /// Changes every time the id is given to a different backend. Connection entries
    /// remember it, so a flow never follows a recycled id to a stranger.
    pub gen: u32,
    /// Index in `ROUTES`: how to reach this backend.
    pub route_id: u32,
    /// The service (`VipMeta::vip_id`) this backend belongs to: the maps say by
    /// themselves which backend is whose, so a restarted daemon needs no other record.
    pub vip_id: u32,
}

/// The backend may receive packets: established flows keep using it. New flows reach
/// it only through the Maglev table (a drained backend is active but not in the table).
/// A deactivated entry keeps its `gen`, so the highest generation ever given out can
/// always be read back from the map: a generation is never given twice.
pub const BACKEND_F_ACTIVE: u16 = 1 << 0;

/// Value of `ROUTES`: how a frame for a backend leaves this node. `mode` says which
/// fields mean something: the L2 fields always, the outer ones for an encapsulating
/// mode.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Route {
    /// `ROUTE_MODE_*`. 0 is "no route": the packet is dropped and counted.
    pub mode: u32,
    /// 0: out of the interface the packet came in on (`XDP_TX`). Otherwise the key of
    /// the egress interface in `TX_PORTS` (`XDP_REDIRECT`).
    pub tx_port: u32,
    /// The backend's MAC, or its next hop's (an encapsulating mode: the gateway's).
    pub dst_mac: [u8; 6],
    /// Our MAC on the egress interface.
    pub src_mac: [u8; 6],
    /// Encapsulating modes: the outer header's source, an address of this node of the
    /// backend's family (as in [`AddrKey::addr`]); the outer destination is the
    /// backend's own address (`Backend::addr`).
    pub outer_src: [u8; 16],
    /// Encapsulating modes: the largest IP packet the egress path carries, outer
    /// header included. A packet that would not fit is answered with ICMP "too big".
    pub mtu: u16,
    /// `ROUTE_MODE_GUE`: the UDP port the backend's decapsulation listens on,
    /// network byte order.
    pub gue_port_be: u16,
}

// The data plane copies both MACs as one 12-byte run, in the Ethernet header's order.
const _: () = assert!(
    core::mem::offset_of!(Route, src_mac) == core::mem::offset_of!(Route, dst_mac) + 6
        && core::mem::offset_of!(Route, dst_mac) % 4 == 0
);

/// No route (yet): the backend's MAC is not known. Its frames are dropped and counted
/// (`drop_no_route`), so that it keeps its cells and the table stays what it is.
pub const ROUTE_MODE_NONE: u32 = 0;
/// L2 direct server return: rewrite the MACs, keep the IP packet as it is.
pub const ROUTE_MODE_L2_DSR: u32 = 1;
/// IP in IP: an outer IPv4 (protocol 4 or 41) or IPv6 (next header 4 or 41) header
/// from `Route::outer_src` to the backend, the client's packet unchanged inside.
pub const ROUTE_MODE_IPIP: u32 = 2;
/// GUE variant 1 (IP directly in UDP): as IPIP with a UDP header between, its source
/// port from the flow hash so the backend's NIC spreads flows over its queues.
pub const ROUTE_MODE_GUE: u32 = 3;

/// The outer header's TTL / hop limit. The inner packet's is left as the client sent
/// it (the tunnel is one hop, as a router would count it only at its ends).
pub const ENCAP_TTL: u8 = 64;
/// The UDP port a backend's decapsulation listens on for GUE unless configured.
pub const GUE_PORT_DEFAULT: u16 = 6080;
/// The outer source port range of GUE: the top quarter of the ports (RFC 7605's
/// dynamic range), 14 bits of the flow hash below it.
pub const GUE_SPORT_BASE: u16 = 0xc000;

/// A flow's 5-tuple, either family, as the parser reads it; an IPv6 flow's slots in
/// `CONN_SETS_V6` hold its words. Aligned to 8 so that the program zeroes and compares
/// it in words, not bytes. An IPv4 address fills the first 4 bytes of its field, the
/// rest zero.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKey {
    pub src: [u8; 16],
    pub dst: [u8; 16],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

/// Key of the IPv4 connection table `CONN_SETS_V4`: the words of a `FlowKey` that an
/// IPv4 flow uses, in the same order (its tail is `FlowKey`'s last 8 bytes as they
/// are): 16 bytes, so four slots' keys fill one cache line.
#[repr(C, align(8))]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct FlowKeyV4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub sport_be: u16,
    pub dport_be: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}

impl FlowKeyV4 {
    /// The IPv4 flow's key (`flow.family` is `FAMILY_V4`).
    pub fn of(flow: &FlowKey) -> Self {
        Self {
            src: [flow.src[0], flow.src[1], flow.src[2], flow.src[3]],
            dst: [flow.dst[0], flow.dst[1], flow.dst[2], flow.dst[3]],
            sport_be: flow.sport_be,
            dport_be: flow.dport_be,
            proto: flow.proto,
            family: flow.family,
            _pad: flow._pad,
        }
    }

    /// The flow this key stands for.
    pub fn flow(&self) -> FlowKey {
        let mut f = FlowKey {
            sport_be: self.sport_be,
            dport_be: self.dport_be,
            proto: self.proto,
            family: self.family,
            _pad: self._pad,
            ..FlowKey::default()
        };
        f.src[..4].copy_from_slice(&self.src);
        f.dst[..4].copy_from_slice(&self.dst);
        f
    }
}

/// A flow's entry in `CONN_SETS_V4` and `CONN_SETS_V6`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ConnEntry {
    pub backend_id: u32,
    pub backend_gen: u32,
    /// The service's epoch when the connection began.
    pub epoch: u32,
    /// When a packet of the flow was last seen, in [`idle::tick`]s: lbd's sweeper
    /// removes flows idle beyond their protocol's timeout.
    pub seen: u32,
}

/// Packets and bytes (whole frames), per CPU, in `VIP_STATS` and `BACKEND_STATS`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Counter {
    pub packets: u64,
    pub bytes: u64,
}

/// Global counters, per CPU, in `GLOBAL_STATS[0]`. Every packet ends in exactly one
/// `pass_*`, `drop_*`, `tx`, `redirect` or `refuse_*` field; `lru_*` and `epoch_*`
/// count lookups besides.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct GlobalStats {
    /// Not IPv4/IPv6 (ARP, VLAN-tagged, unknown ethertype) or too short for Ethernet.
    pub pass_not_ip: u64,
    /// The IP header is too short to read the destination: the kernel judges it.
    pub pass_unparsed: u64,
    /// Destination is not a VIP address.
    pub pass_not_vip: u64,
    /// To a VIP address but neither TCP nor UDP (ICMP, ...): the node's stack answers.
    pub pass_not_l4: u64,
    /// To a VIP address and protocol, but no service on that port and no fallback.
    pub pass_no_service: u64,
    /// Fragment or IP options to a VIP address whose policy is to pass them.
    pub pass_irregular: u64,
    /// To a VIP address with a bad IP or L4 header (version, lengths, truncation).
    pub drop_malformed: u64,
    /// IPv4 fragment or IPv6 fragment header, to a VIP address.
    pub drop_fragment: u64,
    /// IPv4 options or IPv6 extension headers, to a VIP address.
    pub drop_ip_options: u64,
    /// The service has no usable backend.
    pub drop_no_backend: u64,
    /// The backend's route is missing or has an unknown mode.
    pub drop_no_route: u64,
    /// `XDP_REDIRECT` to the route's egress interface failed.
    pub drop_redirect_failed: u64,
    pub tx: u64,
    pub redirect: u64,
    /// Connection table hit with a live backend.
    pub lru_hit: u64,
    /// No entry: the flow went through the Maglev table.
    pub lru_miss: u64,
    /// An entry whose backend was removed or recycled: re-steered as a new flow.
    pub lru_stale: u64,
    /// A connection from an older epoch of its service kept on its backend (per packet).
    pub epoch_keep: u64,
    /// A connection from an older epoch steered anew (per packet that was re-steered).
    pub epoch_resteer: u64,
    /// To an unavailable service, neither a TCP SYN nor UDP: dropped.
    pub drop_unavailable: u64,
    /// A refusal (RST or ICMP) this source had no budget left for: dropped.
    pub drop_refuse_limited: u64,
    /// A TCP SYN to an unavailable service answered with a RST (`XDP_TX`).
    pub refuse_rst: u64,
    /// A UDP datagram to an unavailable service answered with an ICMP/ICMPv6
    /// "administratively prohibited" (`XDP_TX`).
    pub refuse_icmp: u64,
    /// To an unavailable service from a source that must never be answered (RFC 1122
    /// 3.2.2: broadcast, multicast, unspecified, loopback, the VIP itself) or in a
    /// frame that is not unicast both ways: dropped, no refusal sent.
    pub drop_refuse_invalid: u64,
    /// An ARP request or IPv6 neighbour solicitation for a VIP this node forwards,
    /// while lbd's liveness stamp (`Control`) is stale: a node whose daemon died
    /// stops answering for its VIPs (the cluster moves them), yet keeps forwarding.
    pub drop_daemon_stale: u64,
    /// Forwarded by L2 direct server return (also counted in `tx` or `redirect`).
    pub fwd_l2: u64,
    /// Forwarded in IP in IP (also counted in `tx` or `redirect`).
    pub fwd_ipip: u64,
    /// Forwarded in GUE (also counted in `tx` or `redirect`).
    pub fwd_gue: u64,
    /// Too big for the backend's path once encapsulated: answered with ICMP
    /// "fragmentation needed" / ICMPv6 "packet too big" carrying the path's MTU
    /// less the encapsulation (`XDP_TX`).
    pub icmp_too_big: u64,
    /// Too big once encapsulated, and no ICMP may be sent (an IPv4 packet without DF,
    /// the source's budget spent, or a source never answered): dropped, never
    /// fragmented.
    pub drop_too_big: u64,
    /// An ICMP error about one of our flows (a router's "too big" or "unreachable"
    /// quoting a packet a backend sent from the VIP) sent on to that flow's backend.
    pub icmp_steered: u64,
    /// The frame could not be grown for the outer header (no headroom): dropped.
    pub drop_encap_failed: u64,
    /// A flow proved real (its first non-SYN packet) while the connection table was
    /// full: not entered, it goes on where its service's Maglev table sends it
    /// (which moves it only if that table changes). Counted per packet that tried.
    pub conn_table_full: u64,
}

/// The socket mark of lbd's health probes of an encapsulating service:
/// `PROBE_MARK_BASE | ROUTE_MODE_IPIP` or `| ROUTE_MODE_GUE`. `lb_probe_encap` wraps
/// the packets of marked sockets as the service's traffic is wrapped.
pub const PROBE_MARK_BASE: u32 = 0x4c42_0000;
pub const PROBE_MARK_MASK: u32 = 0xffff_ff00;

pub const fn probe_mark(route_mode: u32) -> u32 {
    PROBE_MARK_BASE | route_mode
}

/// `PROBE_CONFIG[0]`: this node's outer sources and the backends' GUE port, for
/// `lb_probe_encap`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct ProbeConfig {
    pub source_v4: [u8; 4],
    pub gue_port_be: u16,
    pub _pad: u16,
    pub source_v6: [u8; 16],
}

/// Capacity of `DECAP_SOURCES`: the LB nodes' outer source addresses a backend takes
/// encapsulated packets from.
pub const MAX_DECAP_SOURCES: u32 = 256;

/// `DECAP_CONFIG[0]`: the backend side's settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DecapConfig {
    /// The UDP port GUE packets come to, network byte order; 0: GUE is not taken.
    pub gue_port_be: u16,
    pub _pad: u16,
    /// `DECAP_F_*`.
    pub flags: u32,
}

/// Counters of the decapsulation, per CPU, in `DECAP_STATS[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DecapStats {
    /// IP in IP from an LB source, stripped and passed to the stack.
    pub ipip: u64,
    /// GUE from an LB source, stripped and passed to the stack.
    pub gue: u64,
    /// Encapsulated (IPIP, or UDP to the GUE port) but not from a configured LB
    /// source: passed untouched (the stack has no tunnel for it and drops it).
    pub foreign_source: u64,
    /// From an LB source with an inner packet that is no IP packet of the family its
    /// header says (or a fragment of the outer packet): passed untouched.
    pub malformed: u64,
    /// The outer header was marked CE (congestion) and the inner packet does not
    /// speak ECN: dropped, as RFC 6040 says.
    pub ce_dropped: u64,
    /// Everything else: not encapsulated, passed untouched.
    pub passed: u64,
}

/// `CONTROL[0]`: what lbd tells the program about itself.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Control {
    /// CLOCK_MONOTONIC nanoseconds until which lbd is known alive; lbd moves it
    /// forward every cluster interval. 0: no cluster, never stale.
    pub alive_until_ns: u64,
}

/// Field-wise helpers of `GlobalStats` (summing per-CPU values, naming fields for
/// printing), generated from one list so no use site keeps its own list of fields.
macro_rules! global_stats_fields {
    ($($field:ident),* $(,)?) => {
        impl GlobalStats {
            /// Field names, in declaration order.
            pub const FIELDS: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Adds `other` into `self`, field by field.
            pub fn accumulate(&mut self, other: &GlobalStats) {
                $(self.$field += other.$field;)*
            }

            /// The value of each field, in the order of [`Self::FIELDS`].
            pub fn values(&self) -> [u64; 33] {
                [$(self.$field),*]
            }
        }
    };
}
global_stats_fields!(
    pass_not_ip,
    pass_unparsed,
    pass_not_vip,
    pass_not_l4,
    pass_no_service,
    pass_irregular,
    drop_malformed,
    drop_fragment,
    drop_ip_options,
    drop_no_backend,
    drop_no_route,
    drop_redirect_failed,
    tx,
    redirect,
    lru_hit,
    lru_miss,
    lru_stale,
    epoch_keep,
    epoch_resteer,
    drop_unavailable,
    drop_refuse_limited,
    refuse_rst,
    refuse_icmp,
    drop_refuse_invalid,
    drop_daemon_stale,
    fwd_l2,
    fwd_ipip,
    fwd_gue,
    icmp_too_big,
    drop_too_big,
    icmp_steered,
    drop_encap_failed,
    conn_table_full,
);

#[cfg(feature = "user")]
mod pod {
    use super::*;
    // SAFETY: all of these are #[repr(C)], made of integers and byte arrays, with any
    // padding written out as fields, so every bit pattern is valid and none is uninit.
    unsafe impl aya::Pod for AddrKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for AddrMeta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Control {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VipKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for VipMeta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Backend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Route {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowKeyV4 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ConnEntry {}
    // SAFETY: as above.
    unsafe impl aya::Pod for conn_sets::ConnSet {}
    // SAFETY: as above.
    unsafe impl aya::Pod for conn_sets::SetsMeta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for conn_sets::ConnSet6 {}
    // SAFETY: as above.
    unsafe impl aya::Pod for Counter {}
    // SAFETY: as above.
    unsafe impl aya::Pod for GlobalStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SphereKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SphereMeta {}
    // SAFETY: as above.
    unsafe impl aya::Pod for RefuseBucket {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DecapConfig {}
    // SAFETY: as above.
    unsafe impl aya::Pod for DecapStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for ProbeConfig {}
}

macro_rules! assert_layout {
    ($t:ty, $size:expr, $align:expr) => {
        const _: () = assert!(core::mem::size_of::<$t>() == $size);
        const _: () = assert!(core::mem::align_of::<$t>() == $align);
    };
}
assert_layout!(AddrKey, 20, 1);
assert_layout!(AddrMeta, 4, 4);
assert_layout!(VipKey, 20, 2);
assert_layout!(VipMeta, 20, 4);
assert_layout!(Backend, 32, 4);
assert_layout!(Route, 40, 4);
assert_layout!(FlowKey, 40, 8);
assert_layout!(FlowKeyV4, 16, 8);
// `FlowKeyV4`'s tail is `FlowKey`'s last 8 bytes, copied as one word.
const _: () = assert!(core::mem::offset_of!(FlowKey, sport_be) == 32);
const _: () = assert!(core::mem::offset_of!(FlowKeyV4, sport_be) == 8);
assert_layout!(ConnEntry, 16, 4);
assert_layout!(conn_sets::ConnSet, 128, 8);
assert_layout!(conn_sets::SetsMeta, 128, 8);
assert_layout!(conn_sets::ConnSet6, 256, 8);
assert_layout!(Counter, 16, 8);
assert_layout!(GlobalStats, 33 * 8, 8);
assert_layout!(Control, 8, 8);
assert_layout!(RefuseBucket, 16, 8);
assert_layout!(SphereKey, 20, 4);
assert_layout!(SphereMeta, 8, 4);
assert_layout!(DecapConfig, 8, 4);
assert_layout!(ProbeConfig, 24, 2);
assert_layout!(DecapStats, 48, 8);

// The live bit of a `VIP_STATE` word is no service flag.
const _: () = assert!(
    (VIP_F_EPOCH_RESTEER | VIP_F_SRC_PARTITION | VIP_F_TOPOLOGY | VIP_F_UNAVAILABLE)
        & (VIP_STATE_LIVE | VIP_STATE_UNSERVED)
        == 0
);
