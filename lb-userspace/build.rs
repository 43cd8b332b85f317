//! Builds the XDP object from `lb-ebpf` and hands its path to the library, which
//! embeds it. The eBPF crate needs Debian's rustc (its prebuilt `core` for
//! bpfel-unknown-none, see shared/TOOLCHAIN.md) and bpf-linker, so this drives that
//! compiler itself instead of aya-build's build-std route. Rebuilt whenever the
//! kernel-side sources change; no manual step.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const TARGET: &str = "bpfel-unknown-none";

fn main() -> Result<()> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .context("lb-userspace has no parent directory")?;
    for dir in [
        "lb-ebpf/src",
        "lb-ebpf/Cargo.toml",
        "lb-common/src",
        "lb-common/Cargo.toml",
    ] {
        println!("cargo:rerun-if-changed={}", root.join(dir).display());
    }
    if !Path::new(DEBIAN_RUSTC).exists() {
        bail!(
            "{DEBIAN_RUSTC} (Debian's rustc-web) is missing, so the XDP program cannot be \
             built. Run `sudo scripts/install-toolchain.sh` or `cargo xtask test`, which runs it."
        );
    }
    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let target_dir = root.join("target").join("bpf");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(root)
        .args([
            "build",
            "--release",
            "--package",
            "lb-ebpf",
            "--target",
            TARGET,
        ])
        .arg("--target-dir")
        .arg(&target_dir);
    // The outer cargo's settings are for the host compiler; none of them must leak in.
    for (key, _) in env::vars() {
        if key.starts_with("CARGO_") && key != "CARGO_HOME"
            || key.starts_with("RUSTC")
            || key == "RUSTFLAGS"
            || key == "RUSTDOC"
        {
            cmd.env_remove(key);
        }
    }
    let status = cmd
        .env("RUSTC", DEBIAN_RUSTC)
        // Debian's compiler is a stable release; aya-ebpf needs a few unstable features.
        .env("RUSTC_BOOTSTRAP", "1")
        .env("CARGO_TARGET_BPFEL_UNKNOWN_NONE_LINKER", "bpf-linker")
        .env(
            "CARGO_ENCODED_RUSTFLAGS",
            "-Cdebuginfo=2\u{1f}-Clink-arg=--btf",
        )
        .status()
        .context("running cargo to build lb-ebpf")?;
    if !status.success() {
        bail!("building lb-ebpf for {TARGET} failed (see the compiler output above)");
    }
    let object = target_dir.join(TARGET).join("release").join("lb-ebpf");
    let out = PathBuf::from(env::var("OUT_DIR")?).join("lb-ebpf.o");
    std::fs::copy(&object, &out).with_context(|| format!("copying {}", object.display()))?;
    println!("cargo:rustc-env=LB_EBPF_OBJECT={}", out.display());
    // The map-less XDP_PASS object for veth peers, shipped beside lbd (the package
    // installs it as /usr/lib/lb/lb-pass.o); `lbd --write-pass-object` writes it too.
    let pass = target_dir.join(TARGET).join("release").join("lb-pass");
    let pass_out = PathBuf::from(env::var("OUT_DIR")?).join("lb-pass.o");
    std::fs::copy(&pass, &pass_out).with_context(|| format!("copying {}", pass.display()))?;
    println!("cargo:rustc-env=LB_PASS_OBJECT={}", pass_out.display());
    commit();
    Ok(())
}

/// The commit being built, for `--version` and `lb_build_info`: `LB_COMMIT` when set
/// (a package built from a tarball), else git's, else "unknown".
fn commit() {
    println!("cargo:rerun-if-env-changed=LB_COMMIT");
    let git = |args: &[&str]| -> Option<String> {
        let out = Command::new("git").args(args).output().ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let commit = env::var("LB_COMMIT")
        .ok()
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".into());
    // Rebuilt when HEAD moves: HEAD itself and the branch it names.
    for path in [
        git(&["rev-parse", "--git-path", "HEAD"]),
        git(&["symbolic-ref", "-q", "HEAD"]).and_then(|r| git(&["rev-parse", "--git-path", &r])),
    ]
    .into_iter()
    .flatten()
    {
        println!("cargo:rerun-if-changed={path}");
    }
    println!("cargo:rustc-env=LB_COMMIT={commit}");
}
