//! A test topology: hosts, each in its own namespace with one `eth0`, all plugged into
//! one bridge that lives in a namespace of its own (so nothing touches the host's
//! network). Addresses come from the benchmark range 198.18.0.0/24.

use std::{
    net::Ipv4Addr,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

use nix::{sys::signal::Signal, unistd::Pid};

use anyhow::{Context, Result};

use crate::netns::{self, Netns};

pub const SUBNET_PREFIX: u8 = 24;
pub const SUBNET6_PREFIX: u8 = 64;

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

    /// An IPv6 VIP on `lo` for DSR: the kernel answers neighbour solicitations only
    /// for addresses on the interface they arrive on, so this one stays silent.
    pub fn add_dsr_vip6(&self, vip: std::net::Ipv6Addr) -> Result<()> {
        self.ns
            .ip(&format!("-6 addr add {vip}/128 dev lo"))
            .map(drop)
    }

    /// Adds an address to `eth0` (a VIP the host owns and answers ARP for).
    pub fn add_addr(&self, addr: Ipv4Addr) -> Result<()> {
        self.ns
            .ip(&format!("addr add {addr}/32 dev eth0"))
            .map(drop)
    }
}

/// Gives a host's `eth0` its MAC and addresses (`v4`, `v6` with their prefixes) and
/// brings it up.
fn up_eth0(ns: &Netns, tag: &str, mac: &[u8; 6], v4: &str, v6: &str) -> Result<()> {
    ns.ip(&format!("link set eth0 address {}", mac_string(mac)))?;
    ns.ip(&format!("addr add {v4} dev eth0"))?;
    ns.ip(&format!("-6 addr add {v6} dev eth0 nodad"))?;
    ns.ip("link set eth0 up")?;
    // veth hands a socket's packets on with the checksum unfinished; a frame that
    // XDP forwards keeps it unfinished and the receiver drops it.
    ns.exec("ethtool", &["-K", "eth0", "tx", "off"])
        .with_context(|| format!("turning off TX checksum offload in {tag}"))?;
    Ok(())
}

/// The bridge and its hosts. Dropping it deletes every namespace it made.
#[derive(Debug)]
pub struct Lab {
    // Processes stop first, then hosts' namespaces go, then the bridge's.
    procs: Vec<Proc>,
    hosts: Vec<Host>,
    pub bridge: Netns,
    /// Prefix of every namespace name of this lab.
    prefix: String,
    persistent: bool,
}

/// Namespace prefix and run directory of the lab that `cargo xtask lab up` leaves
/// running.
pub const PERSISTENT_PREFIX: &str = "lblab";
pub const RUN_DIR: &str = "/run/lblab";

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

/// Prints the last `lines` lines of every `*.log` in `dir`: the daemons' own account
/// of what happened, for a test that failed (called before the directory goes).
pub fn print_log_tails(dir: &std::path::Path, lines: usize) {
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.extension().is_some_and(|x| x == "log") {
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(lines).collect();
            eprintln!("--- {} (last {lines} lines)", p.display());
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

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
        let prefix = format!("{}-{}-{id}", netns::PREFIX, std::process::id());
        Self::with_prefix(prefix, false)
    }

    /// The lab of `cargo xtask lab up`: fixed names, left running when dropped.
    pub fn persistent() -> Result<Lab> {
        anyhow::ensure!(
            netns::is_root(),
            "the lab creates network namespaces and must run as root"
        );
        std::fs::create_dir_all(RUN_DIR).with_context(|| format!("creating {RUN_DIR}"))?;
        Self::with_prefix(PERSISTENT_PREFIX.to_string(), true)
    }

    fn with_prefix(prefix: String, persistent: bool) -> Result<Lab> {
        let bridge = Netns::create_named(&format!("{prefix}-br"), persistent)?;
        // No IGMP snooping: the cluster's multicast reaches every port at once.
        bridge.ip("link add br0 type bridge mcast_snooping 0")?;
        bridge.ip("link set br0 up")?;
        Ok(Lab {
            procs: Vec::new(),
            hosts: Vec::new(),
            bridge,
            prefix,
            persistent,
        })
    }

    /// Adds host `tag` (at most 10 characters) with address 198.18.0.`octet`.
    pub fn add_host(&mut self, tag: &str, octet: u8) -> Result<&Host> {
        let ns = Netns::create_named(&format!("{}-{tag}", self.prefix), self.persistent)?;
        let ip = Ipv4Addr::new(198, 18, 0, octet);
        let mac = [0x02, 0x1b, 0, 0, 0, octet];
        let port = format!("v-{tag}");
        self.bridge.ip(&format!(
            "link add {port} type veth peer name eth0 netns {}",
            ns.name()
        ))?;
        self.bridge.ip(&format!("link set {port} master br0 up"))?;
        up_eth0(
            &ns,
            tag,
            &mac,
            &format!("{ip}/{SUBNET_PREFIX}"),
            &format!("{}/{SUBNET6_PREFIX}", standard::v6(octet)),
        )?;
        self.hosts.push(Host {
            tag: tag.to_string(),
            ns,
            ip,
            mac,
            bridge_port: port,
        });
        Ok(self.hosts.last().expect("just pushed"))
    }

    /// Adds host `tag` behind host `router` on a subnet of its own, 198.18.`subnet`.0/24
    /// and 2001:db8:`subnet`::/64: the router is .254 / ::fe there and the host .1 /
    /// ::1, routed by default through it. No L2 adjacency with anything on the
    /// bridge. The router forwards (and keeps no reverse-path filter).
    pub fn add_routed_host(&mut self, tag: &str, router: &str, subnet: u8) -> Result<&Host> {
        let ns = Netns::create_named(&format!("{}-{tag}", self.prefix), self.persistent)?;
        let ip = Ipv4Addr::new(198, 18, subnet, 1);
        let mac = [0x02, 0x1d, 0, 0, subnet, 1];
        let r = self.host(router);
        let port = format!("r-{tag}");
        r.ns.ip(&format!(
            "link add {port} type veth peer name eth0 netns {}",
            ns.name()
        ))?;
        r.ns.ip(&format!("addr add 198.18.{subnet}.254/24 dev {port}"))?;
        r.ns.ip(&format!(
            "-6 addr add 2001:db8:{subnet:x}::fe/64 dev {port} nodad"
        ))?;
        r.ns.ip(&format!("link set {port} up"))?;
        r.ns.exec("ethtool", &["-K", &port, "tx", "off"])?;
        for key in [
            "net.ipv4.ip_forward=1",
            "net.ipv6.conf.all.forwarding=1",
            "net.ipv4.conf.all.rp_filter=0",
            "net.ipv4.conf.default.rp_filter=0",
        ] {
            let (k, v) = key.split_once('=').expect("key=value");
            r.ns.sysctl(k, v)?;
        }
        up_eth0(
            &ns,
            tag,
            &mac,
            &format!("{ip}/24"),
            &format!("2001:db8:{subnet:x}::1/64"),
        )?;
        ns.ip(&format!("route add default via 198.18.{subnet}.254"))?;
        ns.ip(&format!("-6 route add default via 2001:db8:{subnet:x}::fe"))?;
        self.hosts.push(Host {
            tag: tag.to_string(),
            ns,
            ip,
            mac,
            bridge_port: String::new(),
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

/// A process running inside a lab host. Killed on drop, unless detached.
#[derive(Debug)]
pub struct Proc {
    pub name: String,
    child: Option<Child>,
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, |c| c.id())
    }

    /// Sends `signal` (e.g. SIGKILL, SIGTERM) without waiting.
    pub fn signal(&self, signal: Signal) -> Result<()> {
        let pid = Pid::from_raw(self.pid() as i32);
        nix::sys::signal::kill(pid, signal).with_context(|| format!("signalling {}", self.name))
    }

    /// Waits up to `timeout` for the process to exit; returns its status if it did.
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        let deadline = Instant::now() + timeout;
        let child = self.child.as_mut().context("process already reaped")?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Leaves the process running past this handle (the persistent lab).
    pub fn detach(mut self) -> u32 {
        let pid = self.pid();
        self.child = None;
        pid
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The standard lab of issue 3: one client (with twenty extra source addresses), two
/// LB nodes, three backends serving on `SERVICE_PORT`; the VIP is owned by lb1.
pub mod standard {
    use std::net::Ipv4Addr;

    pub const VIP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 100);
    pub const SERVICE_PORT: u16 = 8080;
    pub const CLIENT: u8 = 10;
    pub const LBS: [(&str, u8); 3] = [("lb1", 2), ("lb2", 3), ("lb3", 4)];
    /// The cluster lab's second VIP (preferred by lb2; the first by lb1; lb3 is a spare).
    pub const VIP2: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 101);
    pub const BACKENDS: [(&str, u8); 3] = [("b1", 11), ("b2", 12), ("b3", 13)];
    /// Extra client source addresses: 198.18.0.21 to .40.
    pub fn client_sources() -> impl Iterator<Item = Ipv4Addr> {
        (21..=40).map(|o| Ipv4Addr::new(198, 18, 0, o))
    }
    pub fn backend_ip(octet: u8) -> Ipv4Addr {
        Ipv4Addr::new(198, 18, 0, octet)
    }
    /// Every host's IPv6 address: 2001:db8::`octet`.
    pub fn v6(octet: u8) -> std::net::Ipv6Addr {
        std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, octet as u16)
    }
    /// The cluster lab's IPv6 VIP (preferred by lb1 in a cluster with IPv6).
    pub const VIP6: std::net::Ipv6Addr =
        std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x100);
}

impl Lab {
    /// Path of the lab-server binary next to the running executable's target dir.
    pub fn target_binary(name: &str) -> Result<PathBuf> {
        // Test executables live in target/<profile>/deps, xtask in target/<profile>.
        let exe = std::env::current_exe()?;
        for dir in exe.ancestors().skip(1).take(3) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Ok(candidate);
            }
        }
        anyhow::bail!(
            "{name} is not built next to {}; build the workspace first (cargo build)",
            exe.display()
        )
    }

    /// Starts `program` in host `tag`'s network namespace, output to `log`.
    pub fn spawn(&self, tag: &str, program: &Path, args: &[&str], log: &Path) -> Result<Proc> {
        self.spawn_with_env(tag, program, args, &[], log)
    }

    /// As `spawn`, with extra environment variables.
    pub fn spawn_with_env(
        &self,
        tag: &str,
        program: &Path,
        args: &[&str],
        env: &[(&str, &str)],
        log: &Path,
    ) -> Result<Proc> {
        let host = self.host(tag);
        let out =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let mut cmd = host.ns.command(&program.to_string_lossy());
        cmd.args(args)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .process_group(0);
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {} in {tag}", program.display()))?;
        Ok(Proc {
            name: format!(
                "{} in {tag}",
                program.file_name().unwrap_or_default().to_string_lossy()
            ),
            child: Some(child),
        })
    }

    /// Gives host `tag` a second link to the bridge, `ifname` with 198.18.0.`octet`:
    /// a second route to it.
    pub fn add_link(&mut self, tag: &str, ifname: &str, octet: u8) -> Result<()> {
        let port = format!("v-{tag}-{ifname}");
        let host = self.host(tag);
        self.bridge.ip(&format!(
            "link add {port} type veth peer name {ifname} netns {}",
            host.ns.name()
        ))?;
        self.bridge.ip(&format!("link set {port} master br0 up"))?;
        let mac = [0x02, 0x1c, 0, 0, 0, octet];
        host.ns
            .ip(&format!("link set {ifname} address {}", mac_string(&mac)))?;
        host.ns.ip(&format!(
            "addr add 198.18.0.{octet}/{SUBNET_PREFIX} dev {ifname}"
        ))?;
        host.ns.ip(&format!("link set {ifname} up"))?;
        host.ns.exec("ethtool", &["-K", ifname, "tx", "off"])?;
        host.ns
            .sysctl(&format!("net.ipv4.conf.{ifname}.arp_ignore"), "1")?;
        host.ns
            .sysctl(&format!("net.ipv4.conf.{ifname}.arp_announce"), "2")?;
        Ok(())
    }

    /// Stops the lab server on backend `tag` (the host stays up).
    pub fn stop_server(&mut self, tag: &str) {
        let name = format!("lab-server in {tag}");
        self.procs.retain(|p| p.name != name);
    }

    /// Starts the lab server on backend `tag` again.
    pub fn start_server(&mut self, tag: &str, log_dir: &Path) -> Result<()> {
        let server = Self::target_binary("lab-server")?;
        let log = log_dir.join(format!("{}-lab-server-{tag}-again.log", self.prefix));
        let port = standard::SERVICE_PORT.to_string();
        let proc = self.spawn(tag, &server, &[tag, &port], &log)?;
        self.procs.push(proc);
        Ok(())
    }

    /// Builds the standard topology and starts the backends' servers.
    pub fn standard(self, log_dir: &Path) -> Result<Lab> {
        self.build(log_dir, true)
    }

    /// The topology for a cluster: the VIPs are on no LB node until the cluster
    /// assigns them; backends carry both VIPs.
    pub fn cluster(self, log_dir: &Path) -> Result<Lab> {
        self.build(log_dir, false)
    }

    fn build(mut self, log_dir: &Path, static_vip: bool) -> Result<Lab> {
        use standard::*;
        self.add_host("client", CLIENT)?;
        for (tag, octet) in LBS {
            self.add_host(tag, octet)?;
        }
        for (tag, octet) in BACKENDS {
            self.add_host(tag, octet)?;
        }
        let client = self.host("client");
        for a in client_sources() {
            client.add_addr(a)?;
        }
        if static_vip {
            self.host("lb1").add_addr(VIP)?;
        }
        let server = Self::target_binary("lab-server")?;
        for (tag, _) in BACKENDS {
            self.host(tag).add_dsr_vip(VIP)?;
            if !static_vip {
                self.host(tag).add_dsr_vip(VIP2)?;
                self.host(tag).add_dsr_vip6(VIP6)?;
            }
            let log = log_dir.join(format!("{}-lab-server-{tag}.log", self.prefix));
            let port = SERVICE_PORT.to_string();
            let proc = self.spawn(tag, &server, &[tag, &port], &log)?;
            if self.persistent {
                // Left running for `lab down` to stop.
                let pid = proc.detach();
                std::fs::write(
                    Path::new(RUN_DIR).join(format!("lab-server-{tag}.pid")),
                    pid.to_string(),
                )?;
            } else {
                self.procs.push(proc);
            }
        }
        for (tag, _) in BACKENDS {
            let ready = self.host(tag).ns.spawn(|| {
                let deadline = Instant::now() + Duration::from_secs(10);
                while Instant::now() < deadline {
                    if std::net::TcpStream::connect(("127.0.0.1", SERVICE_PORT)).is_ok() {
                        return Ok(());
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                anyhow::bail!("the lab server did not start listening within 10 s")
            });
            ready
                .join()
                .map_err(|_| anyhow::anyhow!("readiness check panicked"))?
                .with_context(|| format!("lab server in {tag}"))?;
        }
        Ok(self)
    }
}

/// Stops what `cargo xtask lab up` started and deletes its namespaces.
pub fn teardown_persistent() -> Result<()> {
    let mut pids = Vec::new();
    if let Ok(entries) = std::fs::read_dir(RUN_DIR) {
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_some_and(|x| x == "pid") {
                if let Some(pid) = std::fs::read_to_string(&path)
                    .ok()
                    .and_then(|s| s.trim().parse::<i32>().ok())
                {
                    let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGTERM);
                    pids.push(pid);
                }
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    // Whatever ignored SIGTERM goes now: a leftover would hold its namespace alive.
    for pid in pids {
        let _ = nix::sys::signal::kill(Pid::from_raw(pid), Signal::SIGKILL);
    }
    if let Ok(entries) = std::fs::read_dir("/run/netns") {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with(&format!("{PERSISTENT_PREFIX}-")) {
                netns::ip(&format!("netns del {name}"))?;
            }
        }
    }
    Ok(())
}

/// Names of the persistent lab's namespaces that exist.
pub fn persistent_namespaces() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir("/run/netns")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&format!("{PERSISTENT_PREFIX}-")))
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    names
}
