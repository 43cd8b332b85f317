//! The reconciler over the in-memory data plane.

use super::*;
use crate::{
    dataplane::{fake::FakeDataplane, Contents, Limits},
    desired::{BackendSpec, ServiceSpec},
    model::ServiceConfig,
};

fn limits() -> Limits {
    Limits {
        services: 4,
        backends: 16,
        tables: crate::dataplane::layout::TableBounds {
            min: 251,
            max: 4093,
        },
        ring_cells: 1 << 20,
        sphere_rules: 16,
        tx_ports: 4,
    }
}

fn key(port: u16) -> ServiceKey {
    format!("tcp/198.18.0.100:{port}").parse().unwrap()
}

fn spec(n: u8, first: u8) -> ServiceSpec {
    ServiceSpec {
        config: ServiceConfig {
            maglev_size: 4093,
            ..ServiceConfig::default()
        },
        backends: (first..first + n)
            .map(|i| {
                (
                    format!("198.18.0.{i}").parse().unwrap(),
                    BackendSpec {
                        mac: Some([2, 0, 0, 0, 0, i]),
                        ..BackendSpec::default()
                    },
                )
            })
            .collect(),
        ..ServiceSpec::default()
    }
}

fn desired(services: &[(u16, u8, u8)]) -> Desired {
    Desired {
        services: services
            .iter()
            .map(|(p, n, first)| (key(*p), spec(*n, *first)))
            .collect(),
    }
}

fn known() -> Known {
    Known {
        interfaces: vec![LocalInterface {
            name: "eth0".into(),
            ifindex: 2,
            mac: [2, 0, 0, 0, 0, 0xfe],
            mtu: 1500,
        }],
        directory_fed: true,
        ..Known::default()
    }
}

fn started(d: Desired) -> Reconciler<FakeDataplane> {
    let mut r = Reconciler::new(
        FakeDataplane::new(limits()),
        Known {
            desired: d,
            ..known()
        },
    );
    r.reconcile_all().unwrap();
    r
}

/// Whether the maps hold backend `addr` for service `key`.
fn holds_backend(r: &Reconciler<FakeDataplane>, key: ServiceKey, addr: &str) -> bool {
    r.dp.held(key)
        .is_some_and(|h| h.backends.contains_key(&addr.parse().unwrap()))
}

/// The maps (read back) hold exactly the plan of what is known.
fn assert_holds_the_plan(r: &Reconciler<FakeDataplane>) {
    let inputs = r.known.inputs();
    let mut held: Vec<ServiceKey> = r.dp.services();
    held.sort();
    let wanted: Vec<ServiceKey> = r.known.desired.services.keys().copied().collect();
    assert_eq!(held, wanted);
    for k in wanted {
        let p = plan::plan_service(&inputs, &k, r.written.get(&k)).unwrap();
        assert_eq!(
            r.dp.read_back(k).unwrap(),
            Some(Contents::expected(&p, limits().tables).unwrap()),
            "{k}"
        );
    }
}

/// `r`, started from one service (80, 3 backends) and moved to `next` in steps, holds
/// what one `apply` of `next` from there writes.
fn assert_as_at_once(r: &Reconciler<FakeDataplane>, next: Desired) {
    let mut at_once = started(desired(&[(80, 3, 1)]));
    at_once.apply(next, false, &mut never_saved()).unwrap();
    for k in at_once.desired().services.keys() {
        assert_eq!(r.dp.held(*k), at_once.dp.held(*k), "{k}");
    }
    assert_holds_the_plan(r);
}

fn never_saved() -> impl FnMut(&Desired, &BTreeSet<ServiceKey>) -> Result<()> {
    |_, _| Ok(())
}

/// Writes the write under way a batch at a time, at most `max` batches, each of one
/// service (unless it fails: the roll-back writes more); no other change may start
/// meanwhile. Returns the batches taken and how the write ended.
fn write_in_batches(
    r: &mut Reconciler<FakeDataplane>,
    max: usize,
    save: &mut dyn FnMut(&Desired, &BTreeSet<ServiceKey>) -> Result<()>,
) -> (usize, Result<()>) {
    for batches in 1..=max {
        let calls = r.dp.calls;
        let step = r.write_some(&mut || false, save);
        if step.as_ref().is_none_or(|ended| ended.is_ok()) {
            assert_eq!(r.dp.calls, calls + 1, "one service per batch");
        }
        if let Some(ended) = step {
            return (batches, ended);
        }
        assert!(r.writing());
        assert!(
            r.begin_apply_of(desired(&[(80, 1, 1)]), None, false)
                .is_err(),
            "no other change starts while one is written"
        );
    }
    panic!("{max} services, one per batch: the write did not end in {max} batches");
}

#[test]
fn a_change_that_does_not_fit_changes_nothing() {
    let mut r = started(desired(&[(80, 3, 1)]));
    let before = r.dp.held(key(80)).cloned();
    let mut saved = 0;
    let e = r
        .apply(
            desired(&[(80, 3, 1), (81, 6, 10), (82, 9, 20)]),
            false,
            &mut |_, _| {
                saved += 1;
                Ok(())
            },
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("backend slots"), "{e:#}");
    assert_eq!(saved, 0, "a refused change is not saved");
    assert_eq!(r.dp.services(), vec![key(80)]);
    assert_eq!(r.dp.held(key(80)).cloned(), before);
    assert_eq!(r.desired(), &desired(&[(80, 3, 1)]));
    assert_holds_the_plan(&r);
}

#[test]
fn a_write_that_fails_is_rolled_back_with_the_saved_intent() {
    let mut r = started(desired(&[(80, 3, 1)]));
    // Three services change; the write of the second fails.
    r.dp.fail_call = Some(r.dp.calls + 2);
    let mut saves: Vec<Desired> = Vec::new();
    let e = r
        .apply(
            desired(&[(80, 2, 1), (81, 3, 10), (82, 3, 20)]),
            false,
            &mut |d, _| {
                saves.push(d.clone());
                Ok(())
            },
        )
        .unwrap_err();
    assert!(format!("{e:#}").contains("injected"), "{e:#}");
    assert_eq!(
        saves.len(),
        2,
        "saved before the write, and back after it failed"
    );
    assert_eq!(saves[1], desired(&[(80, 3, 1)]));
    assert_eq!(r.desired(), &desired(&[(80, 3, 1)]));
    assert_holds_the_plan(&r);
}

#[test]
fn an_apply_written_a_service_at_a_time_ends_as_one_written_at_once() {
    let mut r = started(desired(&[(80, 3, 1)]));
    let next = desired(&[(80, 2, 1), (81, 3, 10), (82, 3, 20), (83, 1, 30)]);
    let calls_before = r.dp.calls;
    let changes = r.begin_apply_of(next.clone(), None, false).unwrap();
    assert!(!changes.is_empty());
    assert!(r.writing());
    assert_eq!(r.desired(), &next, "the views show what is being applied");
    let generation = r.generation();
    // The first batch saves the intent; each of the others writes one service.
    let mut saves = 0;
    let mut save = |_: &Desired, _: &BTreeSet<ServiceKey>| {
        saves += 1;
        Ok(())
    };
    assert!(r.write_some(&mut || false, &mut save).is_none());
    assert_eq!(r.dp.calls, calls_before, "nothing written while saving");
    let (batches, ended) = write_in_batches(&mut r, 4, &mut save);
    ended.unwrap();
    assert_eq!(batches, 4);
    assert_eq!(saves, 1);
    assert!(!r.writing());
    assert!(
        r.generation() > generation,
        "the end of the write is a new generation"
    );
    assert!(r.write_some(&mut || true, &mut never_saved()).is_none());

    assert_as_at_once(&r, next);
}

#[test]
fn in_the_background_large_tables_are_laid_out_apart_and_written_as_at_once() {
    let mut r = started(desired(&[(80, 3, 1)]));
    // Every table counts as large here.
    r.set_laid_apart(0);
    let next = desired(&[(80, 2, 1), (81, 3, 10), (82, 3, 20)]);
    r.begin_apply_of(next.clone(), None, false).unwrap();
    let (mut steps, mut laying_seen) = (0, 0);
    let ended = loop {
        steps += 1;
        assert!(steps < 20_000, "the write did not end");
        let calls = r.dp.calls;
        if let Some(done) = r.write_some_in_background(&mut || false, &mut never_saved()) {
            break done;
        }
        if r.laying() {
            laying_seen += 1;
            assert_eq!(
                r.dp.calls, calls,
                "nothing written while a table is laid out"
            );
            std::thread::sleep(std::time::Duration::from_micros(200));
        }
    };
    ended.unwrap();
    assert!(
        laying_seen >= 3,
        "each of the three tables was laid out apart"
    );
    assert!(!r.laying());
    assert_as_at_once(&r, next);
}

#[test]
fn a_write_that_fails_after_some_batches_is_rolled_back_with_the_saved_intent() {
    let mut r = started(desired(&[(80, 3, 1)]));
    let before = r.dp.held(key(80)).cloned();
    // Four services change; the third write fails, two batches after the first.
    r.dp.fail_call = Some(r.dp.calls + 3);
    let mut saves: Vec<Desired> = Vec::new();
    let mut save = |d: &Desired, _: &BTreeSet<ServiceKey>| {
        saves.push(d.clone());
        Ok(())
    };
    r.begin_apply_of(
        desired(&[(80, 2, 1), (81, 3, 10), (82, 3, 20), (83, 1, 30)]),
        None,
        false,
    )
    .unwrap();
    // The save, then two services, then the failure.
    for _ in 0..3 {
        assert!(r.write_some(&mut || false, &mut save).is_none());
    }
    let e = r.write_some(&mut || false, &mut save).unwrap().unwrap_err();
    assert!(format!("{e:#}").contains("injected"), "{e:#}");
    assert!(!r.writing());
    assert_eq!(
        saves.len(),
        2,
        "saved before the first batch, and back after the failure"
    );
    assert_eq!(saves[1], desired(&[(80, 3, 1)]));
    assert_eq!(r.desired(), &desired(&[(80, 3, 1)]));
    assert_eq!(r.dp.held(key(80)).cloned(), before);
    assert_holds_the_plan(&r);
}

#[test]
fn an_apply_that_cannot_be_saved_changes_nothing() {
    let mut r = started(desired(&[(80, 3, 1)]));
    let calls = r.dp.calls;
    let e = r
        .apply(desired(&[(80, 2, 1), (81, 3, 10)]), false, &mut |_, _| {
            anyhow::bail!("disk full")
        })
        .unwrap_err();
    assert!(
        format!("{e:#}").contains("saving the desired state"),
        "{e:#}"
    );
    assert!(format!("{e:#}").contains("disk full"), "{e:#}");
    assert_eq!(r.dp.calls, calls, "nothing written");
    assert!(!r.writing());
    assert_eq!(r.desired(), &desired(&[(80, 3, 1)]));
    assert_holds_the_plan(&r);
}

#[test]
fn a_restart_on_maps_a_crash_left_holds_the_saved_intent() {
    // The intent is saved before the maps are written; a process that dies after
    // writing one of two services leaves maps that match neither state.
    let mut r = started(desired(&[(80, 3, 1), (81, 2, 10)]));
    r.dp.fail_call = Some(r.dp.calls + 2);
    let mut saved = None;
    let _ = r.apply(desired(&[(80, 1, 1), (81, 4, 10)]), false, &mut |d, _| {
        saved.get_or_insert_with(|| d.clone());
        Ok(())
    });
    // ... and died: the rollback never happened. A new lbd starts on those maps
    // with the saved intent.
    let dp = std::mem::replace(&mut r.dp, FakeDataplane::new(limits()));
    let mut again = Reconciler::new(
        dp,
        Known {
            desired: saved.unwrap(),
            ..known()
        },
    );
    again.dp.fail_call = None;
    again.reconcile_all().unwrap();
    assert_eq!(again.desired(), &desired(&[(80, 1, 1), (81, 4, 10)]));
    assert_holds_the_plan(&again);
}

#[test]
fn services_the_maps_hold_but_nobody_wants_go_at_start() {
    let r = started(desired(&[(80, 1, 1), (81, 1, 5)]));
    let mut again = Reconciler::new(
        r.dp,
        Known {
            desired: desired(&[(81, 2, 5)]),
            ..known()
        },
    );
    again.reconcile_all().unwrap();
    assert_holds_the_plan(&again);
}

#[test]
fn inputs_from_outside_reach_the_maps_and_a_refused_one_is_retried() {
    let mut r = started(desired(&[(80, 2, 1)]));
    // The directory adds a backend.
    let dir = BTreeMap::from([(
        key(80),
        BTreeMap::from([(
            "198.18.0.50".parse().unwrap(),
            DirBackend {
                weight: 1,
                via: "198.18.0.50".parse().unwrap(),
                sphere: None,
            },
        )]),
    )]);
    assert_eq!(r.set_directory(dir).unwrap(), vec![key(80)]);
    assert!(holds_backend(&r, key(80), "198.18.0.50"));
    assert_holds_the_plan(&r);
    // Health takes one out of the table; the view says why.
    r.set_health(key(80), "198.18.0.1".parse().unwrap(), false)
        .unwrap();
    assert_eq!(
        r.dp.held(key(80)).unwrap().backends[&"198.18.0.1".parse().unwrap()].weight,
        0
    );
    assert!(!r.views()[0].backends[0].healthy);
    // A directory that grows beyond the backend ids is not written; once it
    // shrinks again, the maps catch up.
    let many: BTreeMap<IpAddr, DirBackend> = (100..130u8)
        .map(|i| {
            let a: IpAddr = format!("198.18.0.{i}").parse().unwrap();
            (
                a,
                DirBackend {
                    weight: 1,
                    via: a,
                    sphere: None,
                },
            )
        })
        .collect();
    let before = r.dp.held(key(80)).cloned();
    assert!(r.set_directory(BTreeMap::from([(key(80), many)])).is_err());
    assert_eq!(r.dp.held(key(80)).cloned(), before, "nothing of it written");
    assert!(r.behind().is_some());
    r.set_directory(BTreeMap::new()).unwrap();
    assert!(r.behind().is_none());
    assert_holds_the_plan(&r);
}

#[test]
fn unchanged_inputs_write_nothing() {
    let mut r = started(desired(&[(80, 2, 1)]));
    let calls = r.dp.calls;
    r.set_epochs(BTreeMap::new()).unwrap();
    r.set_verdicts(BTreeMap::new()).unwrap();
    r.update_neighbors(BTreeMap::new()).unwrap();
    assert!(r
        .apply(desired(&[(80, 2, 1)]), false, &mut never_saved())
        .unwrap()
        .is_empty());
    assert_eq!(r.dp.calls, calls);
}

#[test]
fn a_configured_backend_follows_its_host_route_in_the_directory() {
    let mut d = desired(&[(80, 1, 1)]);
    let b: IpAddr = "198.18.0.13".parse().unwrap();
    d.services
        .get_mut(&key(80))
        .unwrap()
        .backends
        .insert(b, BackendSpec::default());
    let mut r = started(d);
    let n = |mac: u8| Neighbor {
        ifindex: 2,
        mac: [2, 0, 0, 0, 0, mac],
    };
    r.update_neighbors(BTreeMap::from([(b, n(13))])).unwrap();
    let via = |v: &str| {
        BTreeMap::from([(
            key(80),
            BTreeMap::from([(
                b,
                DirBackend {
                    weight: 1,
                    via: v.parse().unwrap(),
                    sphere: None,
                },
            )]),
        )])
    };
    r.set_directory(via("198.18.0.13")).unwrap();
    let mac = |r: &Reconciler<FakeDataplane>| {
        r.dp.held(key(80)).unwrap().backends[&b]
            .route
            .unwrap()
            .dst_mac[5]
    };
    assert_eq!(mac(&r), 13);
    // The route fails over: the new next hop is resolved first, then the directory says so.
    r.update_neighbors(BTreeMap::from([("198.18.0.53".parse().unwrap(), n(53))]))
        .unwrap();
    r.set_directory(via("198.18.0.53")).unwrap();
    assert_eq!(mac(&r), 53);
}

#[test]
fn a_partial_feed_changes_its_services_only_and_keeps_the_others() {
    use crate::directory::feed::Feed;
    let mut r = started(desired(&[(80, 1, 1), (81, 1, 10)]));
    let dir = |via: &str| {
        BTreeMap::from([(
            "198.18.0.60".parse::<IpAddr>().unwrap(),
            DirBackend {
                weight: 1,
                via: via.parse().unwrap(),
                sphere: None,
            },
        )])
    };
    let one = BTreeSet::from([key(80)]);
    let whole = Feed {
        backends: BTreeMap::from([(key(80), dir("198.18.0.50")), (key(81), dir("198.18.0.51"))]),
        ..Feed::default()
    };
    r.set_feed(whole, BTreeMap::new()).unwrap();
    // Service 80's backend moves to another next hop; 81 is not named and keeps its.
    let part = Feed {
        backends: BTreeMap::from([(key(80), dir("198.18.0.52"))]),
        epochs: BTreeMap::from([(key(80), 3)]),
        ..Feed::default()
    };
    assert_eq!(
        r.set_feed_of(&one, part, BTreeMap::new()).unwrap(),
        vec![key(80)]
    );
    let k = r.known();
    assert_eq!(k.directory[&key(80)], dir("198.18.0.52"));
    assert_eq!(k.directory[&key(81)], dir("198.18.0.51"));
    assert_eq!(k.epochs.get(&key(80)), Some(&3));
    // A named service with nothing in the feed has nothing left in the directory.
    assert_eq!(
        r.set_feed_of(&one, Feed::default(), BTreeMap::new())
            .unwrap(),
        vec![key(80)]
    );
    assert!(!r.known().directory.contains_key(&key(80)));
    assert_eq!(r.known().directory[&key(81)], dir("198.18.0.51"));
    // The same again changes nothing.
    assert!(r
        .set_feed_of(&one, Feed::default(), BTreeMap::new())
        .unwrap()
        .is_empty());
}

/// Three services, each with 198.18.0.50 from the directory.
fn directory_for_all() -> BTreeMap<ServiceKey, BTreeMap<IpAddr, DirBackend>> {
    let via: IpAddr = "198.18.0.50".parse().unwrap();
    [80, 81, 82]
        .into_iter()
        .map(|p| {
            (
                key(p),
                BTreeMap::from([(
                    via,
                    DirBackend {
                        weight: 1,
                        via,
                        sphere: None,
                    },
                )]),
            )
        })
        .collect()
}

#[test]
fn a_deferred_change_of_the_inputs_is_written_in_batches_as_at_once() {
    let services = desired(&[(80, 2, 1), (81, 2, 10), (82, 2, 20)]);
    let mut at_once = started(services.clone());
    at_once.set_directory(directory_for_all()).unwrap();

    let mut r = started(services);
    let calls = r.dp.calls;
    r.set_deferred(true);
    let staged = r.set_directory(directory_for_all()).unwrap();
    r.set_deferred(false);
    assert_eq!(staged.len(), 3, "the services it will write");
    assert_eq!(r.dp.calls, calls, "nothing written yet");
    assert!(r.writing());
    let (batches, ended) = write_in_batches(&mut r, 3, &mut never_saved());
    ended.unwrap();
    assert_eq!(batches, 3);
    for k in [80, 81, 82] {
        assert_eq!(r.dp.held(key(k)), at_once.dp.held(key(k)), "{k}");
    }
    assert_holds_the_plan(&r);
}

#[test]
fn a_deferred_change_whose_write_fails_leaves_the_maps_as_they_were_and_is_retried() {
    let mut r = started(desired(&[(80, 2, 1), (81, 2, 10), (82, 2, 20)]));
    let before: Vec<_> = [80, 81, 82].map(|k| r.dp.held(key(k)).cloned()).into();
    // The second service's write fails.
    r.dp.fail_call = Some(r.dp.calls + 2);
    r.set_deferred(true);
    r.set_directory(directory_for_all()).unwrap();
    r.set_deferred(false);
    let (batches, failed) = write_in_batches(&mut r, 3, &mut never_saved());
    assert_eq!(batches, 2, "the second write failed");
    assert!(failed.is_err());
    let after: Vec<_> = [80, 81, 82].map(|k| r.dp.held(key(k)).cloned()).into();
    assert_eq!(after, before, "the first service's write was rolled back");
    assert!(
        r.behind().is_some(),
        "the node says it is behind its inputs"
    );
    // The next change of the inputs writes everything known.
    r.set_health(key(80), "198.18.0.1".parse().unwrap(), false)
        .unwrap();
    assert!(r.behind().is_none());
    assert!(holds_backend(&r, key(82), "198.18.0.50"));
    assert_holds_the_plan(&r);
}
