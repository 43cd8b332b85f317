//! The reconciler on the real maps, driven by random sequences of operator changes
//! (some refused for want of room), restarts on the pinned maps, and crashes at a
//! random map write of a change. After every step the maps, read back, must hold the
//! plan of the desired state the node would start with. Needs root.

use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
};

use lb_userspace::{
    dataplane::{Contents, Dataplane},
    desired::{BackendSpec, Desired, ServiceSpec},
    model::{ServiceConfig, ServiceKey},
    plan,
    reconcile::Reconciler,
    LoadOptions, MapManager, Programs,
};
use rand::{rngs::StdRng, Rng, SeedableRng};
use support::known;

mod support;

struct Unpin(PathBuf);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn options(dir: &PathBuf) -> LoadOptions {
    LoadOptions {
        max_services: 4,
        maglev_max_size: 4093,
        ring_cells: 1 << 16,
        conn_table_size: 1 << 12,
        pin_dir: Some(dir.clone()),
        ..LoadOptions::default()
    }
}

fn key(port: u16) -> ServiceKey {
    format!("tcp/198.18.0.100:{port}").parse().unwrap()
}

fn backend(i: u32) -> (IpAddr, BackendSpec) {
    (
        IpAddr::from(Ipv4Addr::from(0xc613_0000 + i)),
        BackendSpec {
            mac: Some([2, 0, 0, (i >> 16) as u8, (i >> 8) as u8, i as u8]),
            weight: 1,
            drain: false,
        },
    )
}

/// A random change of `d`; sometimes one too big to fit.
fn change(rng: &mut StdRng, d: &Desired) -> Desired {
    let mut d = d.clone();
    let port = 80 + rng.gen_range(0..5u16);
    match rng.gen_range(0..10) {
        0 => {
            d.services.remove(&key(port));
        }
        1 => {
            // 9,000 backends: more than the data plane's backend ids.
            let spec = d.services.entry(key(port)).or_default();
            spec.config.maglev_size = 4093;
            for i in 0..9000 {
                // Drained: the table could hold them, the backend ids cannot.
                let (a, mut b) = backend(100_000 + i);
                b.drain = true;
                spec.backends.insert(a, b);
            }
        }
        _ => {
            let spec = d.services.entry(key(port)).or_insert_with(|| ServiceSpec {
                config: ServiceConfig {
                    maglev_size: 4093,
                    ..ServiceConfig::default()
                },
                ..ServiceSpec::default()
            });
            let (a, mut b) = backend(rng.gen_range(0..40));
            match rng.gen_range(0..4) {
                0 => {
                    spec.backends.remove(&a);
                }
                1 => {
                    b.weight = rng.gen_range(0..4);
                    spec.backends.insert(a, b);
                }
                2 => {
                    b.drain = true;
                    spec.backends.insert(a, b);
                }
                _ => {
                    spec.backends.insert(a, b);
                }
            }
        }
    }
    d
}

/// The maps, read back, hold the plan of what the reconciler knows, for every service
/// it wants and no other.
fn assert_holds_the_plan(r: &Reconciler<MapManager>, when: &str) {
    let inputs = r.known().inputs();
    let mut held = r.dp.services();
    held.sort();
    let wanted: Vec<ServiceKey> = r.desired().services.keys().copied().collect();
    assert_eq!(held, wanted, "{when}: services");
    assert!(
        r.dp.tally_holds(),
        "{when}: the usage kept is the usage summed"
    );
    for k in wanted {
        let p = plan::plan_service(&inputs, &k, r.written(&k)).unwrap();
        let expected = Contents::expected(&p, options(&PathBuf::new()).tables()).unwrap();
        let got = r.dp.read_back(k).unwrap().unwrap();
        assert_eq!(got, expected, "{when}: {k}");
    }
}

#[test]
fn random_changes_restarts_and_crashes_leave_the_maps_holding_the_plan() {
    assert!(
        std::fs::read_to_string("/proc/self/status")
            .unwrap()
            .lines()
            .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0")),
        "loads XDP maps: run as root"
    );
    for seed in [1u64, 2, 3] {
        let dir = PathBuf::from(format!(
            "/sys/fs/bpf/lbtest-{}-prop-{seed}",
            std::process::id()
        ));
        let _cleanup = Unpin(dir.clone());
        let mut rng = StdRng::seed_from_u64(seed);
        // What desired.json holds.
        let mut file = Desired::default();
        let (mut programs, maps) = Programs::load(&options(&dir)).unwrap();
        let mut r = Reconciler::new(maps, known(file.clone()));
        r.reconcile_all().unwrap();
        let (mut refused, mut crashes, mut restarts) = (0, 0, 0);
        for step in 0..80 {
            let when = format!("seed {seed} step {step}");
            let next = change(&mut rng, r.desired());
            let crash = rng.gen_range(0..6) == 0;
            if crash {
                r.dp.crash_after_writes(rng.gen_range(0..20));
            }
            let mut saves = Vec::new();
            let result = r.apply(next, false, &mut |d, _| {
                saves.push(d.clone());
                Ok(())
            });
            let crashed = crash && result.is_err() && !saves.is_empty();
            if crashed || rng.gen_range(0..8) == 0 {
                // The process dies (if it crashed: right there, with the intent saved
                // and the maps half written) and a new one starts on the pins.
                if crashed {
                    file = saves[0].clone();
                    crashes += 1;
                } else {
                    restarts += 1;
                }
                drop(r);
                drop(programs);
                let (p, mut maps) = Programs::load(&options(&dir)).unwrap();
                maps.restore().unwrap();
                programs = p;
                r = Reconciler::new(maps, known(file.clone()));
                r.reconcile_all().unwrap();
                assert_holds_the_plan(&r, &format!("{when}, after a restart"));
                continue;
            }
            if crash {
                // The change wrote nothing before its point came (or was refused).
                r.dp.crash_after_writes(u64::MAX);
            }
            match result {
                Ok(_) => file = saves.last().cloned().unwrap_or(file),
                Err(e) => {
                    refused += 1;
                    assert!(
                        [
                            "backend slots",
                            "no room for service",
                            "the data plane holds"
                        ]
                        .iter()
                        .any(|why| format!("{e:#}").contains(why))
                            || crash,
                        "{when}: {e:#}"
                    );
                    assert_eq!(
                        saves.len() % 2,
                        0,
                        "{when}: a failed change saves the old intent back"
                    );
                }
            }
            assert_holds_the_plan(&r, &when);
        }
        eprintln!(
            "seed {seed}: 80 steps, {refused} refused, {crashes} crashes, {restarts} restarts"
        );
        assert!(
            crashes > 0 && refused > 0,
            "the sequence must exercise crashes and refusals"
        );
        programs.unpin_maps().unwrap();
    }
}
