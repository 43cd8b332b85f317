//! Named network namespaces (as `ip netns` makes them) and running code inside them.
//!
//! Names carry the creating process's pid, so parallel runs do not collide and a later
//! run can tell and remove what a killed one left behind.

use std::{
    fs::File,
    path::Path,
    process::{Command, Output},
    thread::{self, JoinHandle},
};

use anyhow::{bail, Context, Result};
use nix::sched::{setns, CloneFlags};

/// Every namespace this crate makes starts with this.
pub const PREFIX: &str = "lbt";

/// Runs a command, failing with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) -> Result<Output> {
    let out = Command::new(program).args(args).output().with_context(|| {
        format!("running {program} (is it installed? scripts/install-toolchain.sh installs it)")
    })?;
    if !out.status.success() {
        bail!(
            "{program} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// `ip` with arguments given as one string (no argument here contains a space).
pub fn ip(args: &str) -> Result<Output> {
    run("ip", &args.split_whitespace().collect::<Vec<_>>())
}

/// A named network namespace, deleted on drop (which also deletes its interfaces).
#[derive(Debug)]
pub struct Netns {
    name: String,
    /// Left in place on drop (the persistent lab of `cargo xtask lab up`).
    keep: bool,
}

impl Netns {
    /// Creates `lbt-<pid>-<tag>`, with its loopback up; deleted on drop.
    pub fn create(tag: &str) -> Result<Netns> {
        Self::create_named(&format!("{PREFIX}-{}-{tag}", std::process::id()), false)
    }

    /// Creates a namespace with exactly this name, replacing one left over.
    pub fn create_named(name: &str, keep: bool) -> Result<Netns> {
        let _ = ip(&format!("netns del {name}"));
        ip(&format!("netns add {name}"))?;
        let ns = Netns {
            name: name.to_string(),
            keep,
        };
        ns.ip("link set lo up")?;
        Ok(ns)
    }

    /// A namespace that already exists (of a persistent lab).
    pub fn open(name: &str, keep: bool) -> Result<Netns> {
        anyhow::ensure!(
            Path::new(&format!("/run/netns/{name}")).exists(),
            "network namespace {name} does not exist; is the lab up? (cargo xtask lab up)"
        );
        Ok(Netns {
            name: name.to_string(),
            keep,
        })
    }

    pub fn path(&self) -> String {
        format!("/run/netns/{}", self.name)
    }

    /// A command that runs `program` in this namespace's network (and only network)
    /// namespace: unlike `ip netns exec` it keeps the host's /sys and bpffs, where
    /// lbd pins its maps.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path()))
            .arg("--")
            .arg(program);
        cmd
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// `ip -n <ns> ...`
    pub fn ip(&self, args: &str) -> Result<Output> {
        ip(&format!("-n {} {args}", self.name))
    }

    /// Runs a program inside the namespace (`ip netns exec`).
    pub fn exec(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut full = vec!["netns", "exec", &self.name, program];
        full.extend_from_slice(args);
        run("ip", &full)
    }

    /// Sets a sysctl inside the namespace.
    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        self.exec("sysctl", &["-qw", &format!("{key}={value}")])
            .map(drop)
    }

    /// Runs `f` on the calling thread inside the namespace, then returns the thread to
    /// the namespace it was in. Sockets and interface lookups made in `f` are the
    /// namespace's; what `f` creates keeps living there afterwards.
    pub fn enter<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let home = File::open("/proc/thread-self/ns/net").context("opening this thread's netns")?;
        let target = File::open(self.path()).with_context(|| format!("opening {}", self.path()))?;
        setns(&target, CloneFlags::CLONE_NEWNET)
            .with_context(|| format!("entering {}", self.name))?;
        let result = f();
        setns(&home, CloneFlags::CLONE_NEWNET).context("returning to the original netns")?;
        result
    }

    /// Runs `f` on a new thread that lives inside the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> JoinHandle<Result<T>> {
        let path = self.path();
        let name = self.name.clone();
        thread::spawn(move || {
            let target = File::open(&path).with_context(|| format!("opening {path}"))?;
            setns(&target, CloneFlags::CLONE_NEWNET).with_context(|| format!("entering {name}"))?;
            f()
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if self.keep {
            return;
        }
        if let Err(e) = ip(&format!("netns del {}", self.name)) {
            eprintln!("warning: could not delete netns {}: {e:#}", self.name);
        }
    }
}

/// Deletes namespaces left by runs whose process no longer exists (killed, or crashed
/// before their drop handlers ran).
pub fn remove_orphans() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let mut parts = name.splitn(3, '-');
        if parts.next() != Some(PREFIX) {
            continue;
        }
        let Some(pid) = parts.next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&format!("netns del {name}"));
        }
    }
}

/// Whether this process runs as root, which namespaces and XDP need.
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// Children inherit the signal mask; a caller that blocked SIGTERM/SIGINT to wait for
/// them (the demo) must not pass that on, or its children could not be stopped.
pub fn unblock_signals_in_child(cmd: &mut Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: pthread_sigmask is async-signal-safe, and nothing else runs between
    // fork and exec here.
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::signal::SigSet::all()
                .thread_unblock()
                .map_err(std::io::Error::from)
        });
    }
}
