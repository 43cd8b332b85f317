//! A node at the scale the data plane is documented for: 10,000 services of three
//! backends each, written to the real maps, a flow to the last service through the
//! real program (`BPF_PROG_TEST_RUN`), and a restart that resumes the pinned maps with
//! every table unchanged. Needs root. Durations are printed, not asserted (the
//! benchmark's scale table measures them).

mod support;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Instant,
};

use lb_userspace::{
    dataplane::{Contents, Dataplane},
    desired::{BackendSpec, Desired, ServiceSpec},
    model::{Proto, ServiceKey},
    reconcile::Reconciler,
    LoadOptions, MapManager, Program, Programs,
};
use support::{known, macs, Frame};

const SERVICES: u32 = 10_000;
const XDP_TX: u32 = 3;

struct Unpin(PathBuf);

impl Drop for Unpin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn options(dir: &std::path::Path) -> LoadOptions {
    LoadOptions {
        max_services: SERVICES,
        max_backends: 4 * SERVICES,
        conn_table_size: 1 << 16,
        pin_dir: Some(dir.to_path_buf()),
        ..LoadOptions::default()
    }
}

/// Service `i`: 100 addresses in 198.18.200.0/24 with 100 ports each.
fn service(i: u32) -> ServiceKey {
    ServiceKey {
        addr: IpAddr::from(Ipv4Addr::new(198, 18, 200, (i / 100) as u8)),
        port: 1000 + (i % 100) as u16,
        proto: Proto::Tcp,
    }
}

/// Backend `j` of all: 198.19.0.0/16, its MAC made of its number.
fn backend(j: u32) -> (IpAddr, [u8; 6]) {
    (
        IpAddr::from(Ipv4Addr::from(0xc613_0000 + j)),
        [2, 0, 0, (j >> 16) as u8, (j >> 8) as u8, j as u8],
    )
}

fn desired() -> Desired {
    let services = (0..SERVICES)
        .map(|i| {
            let backends = (0..3)
                .map(|b| {
                    let (addr, mac) = backend(i * 3 + b);
                    (
                        addr,
                        BackendSpec {
                            mac: Some(mac),
                            weight: 1,
                            drain: false,
                        },
                    )
                })
                .collect();
            (
                service(i),
                ServiceSpec {
                    backends,
                    ..ServiceSpec::default()
                },
            )
        })
        .collect();
    Desired { services }
}

/// Sends a handshake's ACK to service `i`; returns the destination MAC it left with.
fn forward(programs: &Programs, i: u32, sport: u16) -> [u8; 6] {
    let key = service(i);
    let frame = Frame::tcp("198.18.1.10", &key.addr.to_string(), sport, key.port)
        .established()
        .build();
    let (verdict, out) = support::test_run(programs, Program::Balancer, &frame);
    assert_eq!(verdict, XDP_TX, "a flow to {key} was not forwarded");
    macs(&out).0
}

fn contents(r: &Reconciler<MapManager>) -> BTreeMap<ServiceKey, Contents> {
    r.dp.services()
        .into_iter()
        .map(|k| (k, r.dp.read_back(k).unwrap().expect("held")))
        .collect()
}

#[test]
fn ten_thousand_services_start_serve_their_last_service_and_resume_unchanged() {
    let dir = PathBuf::from(format!("/sys/fs/bpf/lbtest-{}-scale", std::process::id()));
    let _cleanup = Unpin(dir.clone());
    let want = desired();

    let t = Instant::now();
    let (programs, maps) = Programs::load(&options(&dir)).expect("loading the XDP object");
    let mut r = Reconciler::new(maps, known(want.clone()));
    let written = r.reconcile_all().unwrap();
    eprintln!("start: {SERVICES} services written in {:?}", t.elapsed());
    assert_eq!(written.len(), SERVICES as usize);

    let last = SERVICES - 1;
    let theirs: Vec<[u8; 6]> = (0..3).map(|b| backend(last * 3 + b).1).collect();
    for sport in 40000..40020 {
        let mac = forward(&programs, last, sport);
        assert!(
            theirs.contains(&mac),
            "{mac:02x?} is not a backend of the last service"
        );
    }
    // Every table holds what its service's plan says, and each is the service's own.
    let before = contents(&r);
    assert_eq!(before.len(), SERVICES as usize);
    for (k, c) in &before {
        assert_eq!(
            c.table_size, 1031,
            "{k}: three backends get the smallest table (the first prime above 1,021's step)"
        );
        assert!(c
            .cells
            .iter()
            .all(|cell| cell.is_some_and(|a| want.services[k].backends.contains_key(&a))));
    }

    // A restart: the maps are pinned; the new run takes them over and writes nothing.
    drop(r);
    drop(programs);
    let t = Instant::now();
    let (programs, mut maps) = Programs::load(&options(&dir)).unwrap();
    maps.restore().unwrap();
    // Any map write from here on fails: the take-over must need none (each table's
    // trailer names the plan it was built from, so none is built or written again).
    maps.crash_after_writes(0);
    let mut r = Reconciler::new(maps, known(want.clone()));
    r.reconcile_all()
        .expect("resuming unchanged services writes nothing");
    eprintln!(
        "resume: {SERVICES} services taken over in {:?}",
        t.elapsed()
    );
    r.dp.crash_after_writes(u64::MAX);
    assert_eq!(r.dp.tables_built(), 0, "a table was built again on resume");
    assert_eq!(contents(&r), before, "a table changed across the restart");
    for sport in 40000..40020 {
        let mac = forward(&programs, last, sport);
        assert!(theirs.contains(&mac));
    }

    // A change after the take-over is written as any other.
    let mut changed = want;
    let k = service(last);
    changed
        .services
        .get_mut(&k)
        .unwrap()
        .backends
        .values_mut()
        .next()
        .unwrap()
        .weight = 0;
    r.apply(changed, false, &mut |_, _| Ok(())).unwrap();
    let after = r.dp.read_back(k).unwrap().unwrap();
    assert_ne!(
        after.cells, before[&k].cells,
        "the weight-0 backend left the table"
    );
}

/// One service of 10,000 backends: more than the 8,192 backend slots the data
/// plane once had in all (lbd exited at 8,193).
#[test]
fn one_service_of_ten_thousand_backends_is_served_and_resumed_without_a_rebuild() {
    const BACKENDS: u32 = 10_000;
    let dir = PathBuf::from(format!(
        "/sys/fs/bpf/lbtest-{}-scale-wide",
        std::process::id()
    ));
    let _cleanup = Unpin(dir.clone());
    let key = service(0);
    let spec = ServiceSpec {
        backends: (0..BACKENDS)
            .map(|j| {
                let (addr, mac) = backend(j);
                (
                    addr,
                    BackendSpec {
                        mac: Some(mac),
                        weight: 1,
                        drain: false,
                    },
                )
            })
            .collect(),
        ..ServiceSpec::default()
    };
    let want = Desired {
        services: [(key, spec)].into_iter().collect(),
    };
    let (programs, maps) = Programs::load(&options(&dir)).expect("loading the XDP object");
    let mut r = Reconciler::new(maps, known(want.clone()));
    r.reconcile_all().unwrap();
    let before = r.dp.read_back(key).unwrap().expect("held");
    assert_eq!(before.backends.len(), BACKENDS as usize);
    assert!(
        before.table_size as u64 >= 100 * BACKENDS as u64,
        "{}",
        before.table_size
    );
    let mut seen = std::collections::BTreeSet::new();
    for sport in 40000..40200 {
        let mac = forward(&programs, 0, sport);
        assert_eq!(mac[..3], [2, 0, 0], "not a backend's MAC: {mac:02x?}");
        seen.insert(mac);
    }
    assert!(
        seen.len() > 150,
        "200 flows reached only {} backends",
        seen.len()
    );

    drop(r);
    drop(programs);
    let (_programs, mut maps) = Programs::load(&options(&dir)).unwrap();
    maps.restore().unwrap();
    let mut r = Reconciler::new(maps, known(want));
    r.reconcile_all().unwrap();
    assert_eq!(
        r.dp.tables_built(),
        0,
        "the table was built again on resume"
    );
    assert_eq!(r.dp.read_back(key).unwrap().unwrap(), before);
}
