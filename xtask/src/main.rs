//! `cargo xtask <command>`: the project's build, test and benchmark entry points. Every
//! command that needs the eBPF toolchain installs what is missing first, so a fresh
//! clone needs nothing else.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, test and benchmark the load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install the toolchain (Debian rustc for BPF, bpf-linker, bpftool, iproute2...).
    Setup,
    /// Build the XDP object (through lb-userspace's build script) and the userspace crates.
    BuildEbpf {
        /// Build in release mode.
        #[arg(long)]
        release: bool,
    },
    /// Install what is missing, then run every test: unit, data-plane, end to end.
    /// Needs root (XDP programs, network namespaces).
    Test {
        /// Passed to `cargo test` after `--` (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Install what is missing, then run the data-plane benchmark.
    Bench,
    /// The chaos suite's long forms against the release build (the cluster under
    /// kill -9, restarts, link flaps, partitions, slow ARP): prints a line per fault.
    Chaos,
    /// Build the Debian package (release build): lbd, lbctl, the systemd unit, an
    /// example /etc/lb/lbd.toml, manual pages and completions, in target/debian.
    Package,
    /// The lab: client, two LB nodes and three backends in network namespaces.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
    /// The main job: bring the lab up, start lbd on lb1, send traffic, show where it
    /// went, and keep everything running until Ctrl-C.
    Demo {
        /// Exit after the traffic report instead of waiting for Ctrl-C (tears down).
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Build the topology and start the backends' servers (replaces a running lab).
    Up,
    /// Stop everything the lab runs and delete its namespaces.
    Down,
    /// What is running.
    Status,
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives in the workspace")
        .to_path_buf()
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

fn status(mut cmd: Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// lbd, lbctl and the lab's server, in target/debug.
fn build_binaries() -> Result<()> {
    build_bins(false)
}

/// lbd, lbctl and the lab server, in the profile the tests or benches run them in.
fn build_bins(release: bool) -> Result<()> {
    let mut cmd = cargo();
    cmd.args([
        "build",
        "--package",
        "lb-userspace",
        "--package",
        "lb-tests",
        "--bins",
    ]);
    if release {
        cmd.arg("--release");
    }
    status(
        cmd,
        if release {
            "cargo build --release"
        } else {
            "cargo build"
        },
    )
}

pub fn target_dir() -> PathBuf {
    workspace_root().join("target/debug")
}

fn setup() -> Result<()> {
    let script = workspace_root().join("scripts/install-toolchain.sh");
    status(Command::new(&script), "scripts/install-toolchain.sh")
}

mod lab;

fn main() -> Result<()> {
    match Cli::parse().command {
        Cmd::Lab { action } => match action {
            LabAction::Up => {
                setup()?;
                build_binaries()?;
                lab::up().map(drop)
            }
            LabAction::Down => lab::down(),
            LabAction::Status => lab::status(),
        },
        Cmd::Demo { no_wait } => {
            setup()?;
            build_binaries()?;
            lab::demo(!no_wait)
        }
        Cmd::Setup => setup(),
        Cmd::BuildEbpf { release } => {
            setup()?;
            let mut cmd = cargo();
            cmd.args(["build", "--package", "lb-userspace"]);
            if release {
                cmd.arg("--release");
            }
            status(cmd, "cargo build")?;
            let object = workspace_root().join("target/bpf/bpfel-unknown-none/release/lb-ebpf");
            println!("XDP object: {}", object.display());
            Ok(())
        }
        Cmd::Test { args } => {
            setup()?;
            let mut cmd = cargo();
            // The default members: every crate but lb-ebpf, which only builds for BPF.
            cmd.arg("test");
            if !args.is_empty() {
                cmd.arg("--").args(args);
            }
            status(cmd, "cargo test")
        }
        Cmd::Package => {
            setup()?;
            build_bins(true)?;
            let root = workspace_root();
            let mut cmd = Command::new("sh");
            cmd.arg(root.join("scripts/package.sh"))
                .arg(root.join("target/release"))
                .arg(root.join("target/debian"));
            status(cmd, "scripts/package.sh")
        }
        Cmd::Chaos => {
            setup()?;
            build_bins(true)?;
            let mut cmd = cargo();
            cmd.args(["bench", "--package", "lb-tests", "--bench", "chaos"]);
            status(cmd, "cargo bench (chaos)")
        }
        Cmd::Bench => {
            setup()?;
            let mut cmd = cargo();
            cmd.args(["bench", "--package", "lb-userspace", "--bench", "dataplane"]);
            status(cmd, "cargo bench (data plane)")?;
            let mut cmd = cargo();
            cmd.args(["bench", "--package", "lb-userspace", "--bench", "directory"]);
            status(cmd, "cargo bench (directory)")?;
            // The failover bench drives lbd and the lab server: build them first, in
            // the profile the bench runs in.
            build_bins(true)?;
            let mut cmd = cargo();
            cmd.args(["bench", "--package", "lb-tests", "--bench", "failover"]);
            status(cmd, "cargo bench (failover)")?;
            let mut cmd = cargo();
            cmd.args(["bench", "--package", "lb-tests", "--bench", "propagation"]);
            status(cmd, "cargo bench (directory propagation)")?;
            let mut cmd = cargo();
            cmd.args(["bench", "--package", "lb-tests", "--bench", "scale"]);
            status(cmd, "cargo bench (scale)")
        }
    }
}
