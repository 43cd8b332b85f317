//! The Debian package as an operator gets it: built by scripts/package.sh (what
//! `cargo xtask package` runs) from this build's binaries, unpacked into a clean
//! root, its example config checked and its systemd unit's command run the way
//! systemd would (a notification socket and a watchdog), without systemd.

mod common;

use std::{
    os::unix::net::UnixDatagram,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use common::binary;
use lb_tests::lab::Lab;

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("running a packaging tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The package built from the binaries this test run uses, unpacked into `root`.
fn build_and_unpack(dir: &Path) -> (PathBuf, PathBuf) {
    let bins = binary("lbd").parent().unwrap().to_path_buf();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/package.sh");
    let deb = PathBuf::from(
        run(Command::new("sh")
            .arg(&script)
            .arg(&bins)
            .arg(dir.join("out")))
        .trim(),
    );
    let root = dir.join("root");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root));
    (deb, root)
}

/// Removes the test's directory and lbd's pins when the test ends, passed or not
/// (declared first, so dropped after the lab and lbd are gone).
struct Cleanup(PathBuf, PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

#[test]
fn the_package_installs_lbd_lbctl_unit_config_and_manuals_and_its_unit_command_starts() {
    let dir = std::env::temp_dir().join(format!("lb-package-{}", std::process::id()));
    let node = format!("pkg{}", std::process::id());
    let _cleanup = Cleanup(dir.clone(), PathBuf::from(format!("/sys/fs/bpf/lb/{node}")));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let (deb, root) = build_and_unpack(&dir);

    let fields = run(Command::new("dpkg-deb")
        .args(["-f"])
        .arg(&deb)
        .args(["Package", "Version", "Depends"]));
    assert!(fields.contains("Package: lb"), "{fields}");
    assert!(
        fields.contains(&format!("Version: {}", env!("CARGO_PKG_VERSION"))),
        "{fields}"
    );
    let conffiles = run(Command::new("dpkg-deb")
        .arg("--info")
        .arg(&deb)
        .arg("conffiles"));
    assert_eq!(conffiles.trim(), "/etc/lb/lbd.toml");
    for file in [
        "usr/sbin/lbd",
        "usr/bin/lbctl",
        "lib/systemd/system/lbd.service",
        "etc/lb/lbd.toml",
        "usr/share/man/man8/lbd.8.gz",
        "usr/share/man/man8/lbctl.8.gz",
        "usr/share/man/man5/lbd.toml.5.gz",
        "usr/share/bash-completion/completions/lbctl",
        "usr/share/doc/lb/API.md",
        "usr/lib/lb/lb-pass.o",
    ] {
        assert!(root.join(file).is_file(), "the package lacks /{file}");
    }
    // The manuals are roff that man(1) renders: a title line each.
    for man in ["man8/lbd.8.gz", "man8/lbctl.8.gz", "man5/lbd.toml.5.gz"] {
        let text = run(Command::new("zcat").arg(root.join("usr/share/man").join(man)));
        assert!(text.contains(".TH "), "{man}: {text}");
    }
    // The installed lbd names its version and the commit it was built from.
    let lbd = root.join("usr/sbin/lbd");
    let version = run(Command::new(&lbd).arg("--version"));
    assert!(
        version.starts_with(&format!("lbd {} (commit ", env!("CARGO_PKG_VERSION")))
            && !version.contains("unknown"),
        "{version}"
    );

    // The unit: Type=notify, a watchdog, reload by SIGHUP, restart on failure.
    let unit = std::fs::read_to_string(root.join("lib/systemd/system/lbd.service")).unwrap();
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
    ] {
        assert!(unit.contains(line), "the unit lacks {line}: {unit}");
    }
    let exec_start = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .expect("ExecStart");
    let exec_check = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecStartPre="))
        .expect("ExecStartPre");

    // The example config, with this test's node name and paths: checked, then
    // started by the unit's own command line in an LB node's namespace.
    let lab = Lab::new().unwrap().standard(&std::env::temp_dir()).unwrap();
    let example = std::fs::read_to_string(root.join("etc/lb/lbd.toml")).unwrap();
    let config = example.replace(
        "name = \"lb1\"",
        &format!(
            "name = \"{node}\"\napi_socket = \"{d}/lbd.sock\"\nstate_dir = \"{d}/state\"\n\
             pin_dir = \"/sys/fs/bpf/lb/{node}\"\nmetrics_listen = \"127.0.0.1:9479\"",
            d = dir.display()
        ),
    );
    assert_ne!(config, example, "the example config names no node");
    let config_path = dir.join("lbd.toml");
    std::fs::write(&config_path, &config).unwrap();
    let as_installed = |line: &str| -> Vec<String> {
        line.split_whitespace()
            .map(|w| match w {
                "/usr/sbin/lbd" => lbd.to_string_lossy().into_owned(),
                "/etc/lb/lbd.toml" => config_path.to_string_lossy().into_owned(),
                w => w.to_string(),
            })
            .collect()
    };
    let check = as_installed(exec_check);
    let out = lab
        .host("lb1")
        .ns
        .command(&check[0])
        .args(&check[1..])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the example config fails --check: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // lb-pass.o loads with iproute2 (libbpf), as the docs tell veth users to do:
    // the balancer's own object, with aya's legacy map definitions, does not.
    let ns = &lab.host("lb1").ns;
    ns.ip("link add pkgx type veth peer name pkgy").unwrap();
    ns.ip(&format!(
        "link set dev pkgx xdp obj {} sec xdp",
        root.join("usr/lib/lb/lb-pass.o").display()
    ))
    .unwrap();
    let shown = ns
        .exec("ip", &["-d", "link", "show", "dev", "pkgx"])
        .unwrap();
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(
        shown.contains("prog/xdp") && shown.contains("name lb_pass"),
        "{shown}"
    );

    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = as_installed(exec_start);
    let mut lbd_proc = lab
        .spawn_with_env(
            "lb1",
            Path::new(&start[0]),
            &start[1..].iter().map(String::as_str).collect::<Vec<_>>(),
            &[
                ("NOTIFY_SOCKET", notify_path.to_str().unwrap()),
                ("WATCHDOG_USEC", "400000"),
            ],
            &dir.join("lbd.log"),
        )
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    let mut buf = [0u8; 256];
    while !(seen.iter().any(|m| m == "READY=1") && seen.iter().any(|m| m == "WATCHDOG=1")) {
        assert!(
            Instant::now() < deadline,
            "no READY=1 and WATCHDOG=1 within 20 s (got {seen:?}): {}",
            std::fs::read_to_string(dir.join("lbd.log")).unwrap_or_default()
        );
        if let Ok(n) = notify.recv(&mut buf) {
            seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
    }
    // Ready means ready: the API answers at once.
    let status = run(Command::new(root.join("usr/bin/lbctl"))
        .arg("--socket")
        .arg(dir.join("lbd.sock"))
        .args(["-o", "json", "status"]));
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status["node"], node.as_str(), "{status}");
    run(Command::new(root.join("usr/bin/lbctl"))
        .arg("--socket")
        .arg(dir.join("lbd.sock"))
        .args(["shutdown", "--detach"]));
    lbd_proc.wait_timeout(Duration::from_secs(10)).unwrap();
}
