//! A test topology: hosts, each in its own namespace with one `eth0`, all plugged into
//! one bridge that lives in a namespace of its own (so nothing touches the host's
//! network). Addresses come from the benchmark range 198.18.0.0/24.

use std::{
    net::Ipv4Addr,
    sync::atomic::{AtomicU32, Ordering},
};

use anyhow::{Context, Result};

use crate::netns::{self, Netns};

pub const SUBNET_PREFIX: u8 = 24;

/// A host on the lab bridge.
#[derive(Debug)]
pub struct Host {
    pub tag: String,
    pub ns: Netns,
    pub ip: Ipv4Addr,
    pub mac: [u8; 6],
    /// Name of this host's port on the bridge, in the bridge namespace.
    pub bridge_port: String,
}

impl Host {
    /// Puts a service address on the host's loopback without letting the host answer
    /// ARP for it: how an L2 DSR backend receives traffic for a VIP it does not own.
    pub fn add_dsr_vip(&self, vip: Ipv4Addr) -> Result<()> {
        self.ns.sysctl("net.ipv4.conf.all.arp_ignore", "1")?;
        self.ns.sysctl("net.ipv4.conf.all.arp_announce", "2")?;
        self.ns.sysctl("net.ipv4.conf.eth0.arp_ignore", "1")?;
        self.ns.sysctl("net.ipv4.conf.eth0.arp_announce", "2")?;
        self.ns.ip(&format!("addr add {vip}/32 dev lo"))?;
        Ok(())
    }

    /// Adds an address to `eth0` (a VIP the host owns and answers ARP for).
    pub fn add_addr(&self, addr: Ipv4Addr) -> Result<()> {
        self.ns
            .ip(&format!("addr add {addr}/32 dev eth0"))
            .map(drop)
    }
}

/// The bridge and its hosts. Dropping it deletes every namespace it made.
#[derive(Debug)]
pub struct Lab {
    // Hosts drop (and their namespaces go) before the bridge's.
    hosts: Vec<Host>,
    pub bridge: Netns,
    /// Distinguishes labs of one process (tests run in parallel threads).
    id: u32,
}

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl Lab {
    pub fn new() -> Result<Lab> {
        anyhow::ensure!(
            netns::is_root(),
            "the lab creates network namespaces and must run as root"
        );
        netns::remove_orphans();
        let id = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let bridge = Netns::create(&format!("{id}-br"))?;
        bridge.ip("link add br0 type bridge")?;
        bridge.ip("link set br0 up")?;
        Ok(Lab {
            hosts: Vec::new(),
            bridge,
            id,
        })
    }

    /// Adds host `tag` (at most 10 characters) with address 198.18.0.`octet`.
    pub fn add_host(&mut self, tag: &str, octet: u8) -> Result<&Host> {
        let ns = Netns::create(&format!("{}-{tag}", self.id))?;
        let ip = Ipv4Addr::new(198, 18, 0, octet);
        let mac = [0x02, 0x1b, 0, 0, 0, octet];
        let port = format!("v-{tag}");
        self.bridge.ip(&format!(
            "link add {port} type veth peer name eth0 netns {}",
            ns.name()
        ))?;
        self.bridge.ip(&format!("link set {port} master br0 up"))?;
        ns.ip(&format!("link set eth0 address {}", mac_string(&mac)))?;
        ns.ip(&format!("addr add {ip}/{SUBNET_PREFIX} dev eth0"))?;
        ns.ip("link set eth0 up")?;
        // veth hands a socket's packets on with the checksum unfinished; a frame that
        // XDP forwards keeps it unfinished and the receiver drops it.
        ns.exec("ethtool", &["-K", "eth0", "tx", "off"])
            .with_context(|| format!("turning off TX checksum offload in {tag}"))?;
        self.hosts.push(Host {
            tag: tag.to_string(),
            ns,
            ip,
            mac,
            bridge_port: port,
        });
        Ok(self.hosts.last().expect("just pushed"))
    }

    pub fn host(&self, tag: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.tag == tag)
            .unwrap_or_else(|| panic!("no host {tag} in the lab"))
    }
}
