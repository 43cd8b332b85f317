//! Crash points for tests: with `LBD_CRASH_AT=<point>[:<n>]` in its environment, lbd
//! kills itself (SIGKILL, as `kill -9` would) the n-th time (default: first) it reaches
//! `point`. Lets a test stop the daemon between two writes that must not be torn apart,
//! which no timing-based kill can aim at. Without the variable a point costs one
//! relaxed load.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    OnceLock,
};

struct Target {
    point: String,
    nth: u64,
    seen: AtomicU64,
}

fn target() -> Option<&'static Target> {
    static TARGET: OnceLock<Option<Target>> = OnceLock::new();
    TARGET
        .get_or_init(|| {
            let spec = std::env::var("LBD_CRASH_AT").ok()?;
            let (point, nth) = match spec.rsplit_once(':') {
                Some((p, n)) => (p.to_string(), n.parse().ok()?),
                None => (spec, 1),
            };
            Some(Target {
                point,
                nth,
                seen: AtomicU64::new(0),
            })
        })
        .as_ref()
}

/// Marks a crash point.
pub fn point(name: &str) {
    let Some(t) = target() else { return };
    if t.point == name && t.seen.fetch_add(1, Ordering::Relaxed) + 1 == t.nth {
        eprintln!("lbd: crash point {name} reached (LBD_CRASH_AT): killing myself");
        let _ = nix::sys::signal::kill(nix::unistd::Pid::this(), nix::sys::signal::Signal::SIGKILL);
    }
}
