//! The SPM generator against hand-made cases.

use super::*;

fn host(last: u8) -> ServiceHost {
    ServiceHost {
        inet_address: IpAddr::from([198, 18, 0, last]),
        dns_address: None,
        port: 8080,
    }
}

fn inst(name: &str, last: u8, weight: u32, valid: bool, provider: &str) -> Instance {
    Instance {
        name: name.into(),
        host: host(last),
        weight,
        valid,
        provider: provider.into(),
    }
}

fn service(id: &str, rule: Rule) -> Service {
    Service {
        spec: ServiceSpec {
            service_id: id.into(),
            service_version: "1.0".into(),
        },
        epoch: 7,
        rule,
        instances: vec![
            inst("a", 11, 2, true, "east"),
            inst("b", 12, 1, true, "west"),
            inst("c", 13, 1, false, "east"),
        ],
        command: None,
        valid_from: None,
        valid_until: None,
        redirector: None,
        unavailable: None,
    }
}

#[test]
fn plain_lists_every_valid_instance_with_the_others_as_backups() {
    let e = entries_for(&service("web", Rule::Plain), &Client::default());
    assert_eq!(e.len(), 2, "c is invalid");
    assert_eq!(e[0].host, host(11), "heavier first");
    assert_eq!(e[0].backups, vec![host(12)]);
    assert_eq!(e[1].backups, vec![host(11)]);
    assert_eq!(e[0].sphere.as_ref().unwrap().epoch, 7);
}

#[test]
fn preselect_gives_each_client_one_stable_target_and_the_rest_as_backups() {
    let s = service("web", Rule::Preselect);
    let mut counts = std::collections::BTreeMap::new();
    for i in 0..=255u8 {
        let c = Client {
            address: Some(IpAddr::from([203, 0, 113, i])),
            key: None,
        };
        let e = entries_for(&s, &c);
        assert_eq!(e.len(), 1);
        assert_eq!(e, entries_for(&s, &c), "stable for one client");
        assert_eq!(e[0].backups.len(), 1);
        *counts.entry(e[0].host.inet_address).or_insert(0) += 1;
    }
    let heavy = counts[&IpAddr::from([198, 18, 0, 11])];
    assert!(
        (130..=210).contains(&heavy),
        "weight 2 of 3 should get about 2/3: {counts:?}"
    );
}

#[test]
fn data_routing_maps_keys_by_modulus_over_instances_in_address_order() {
    let s = service("kv", Rule::Data);
    let pick = |k| {
        entries_for(
            &s,
            &Client {
                address: None,
                key: Some(k),
            },
        )[0]
        .host
        .clone()
    };
    assert_eq!(pick(0), host(11));
    assert_eq!(pick(1), host(12));
    assert_eq!(pick(2), host(11));
    // Without a key: every instance, as plain.
    assert_eq!(entries_for(&s, &Client::default()).len(), 2);
}

#[test]
fn topology_sends_a_subnet_to_its_sphere() {
    let rule = Rule::Topology {
        subnets: vec![
            ("203.0.113.0".parse().unwrap(), 25, "east".into()),
            ("203.0.113.128".parse().unwrap(), 25, "west".into()),
        ],
    };
    let s = service("web", rule);
    let east = entries_for(
        &s,
        &Client {
            address: Some("203.0.113.5".parse().unwrap()),
            key: None,
        },
    );
    assert_eq!(
        east.iter().map(|e| e.host.clone()).collect::<Vec<_>>(),
        [host(11)]
    );
    let west = entries_for(
        &s,
        &Client {
            address: Some("203.0.113.200".parse().unwrap()),
            key: None,
        },
    );
    assert_eq!(
        west.iter().map(|e| e.host.clone()).collect::<Vec<_>>(),
        [host(12)]
    );
    let other = entries_for(
        &s,
        &Client {
            address: Some("192.0.2.1".parse().unwrap()),
            key: None,
        },
    );
    assert_eq!(other.len(), 2, "outside every subnet: all spheres");
}

#[test]
fn source_partitioning_sends_even_addresses_to_the_first_instance_and_odd_to_the_second() {
    let s = service("web", Rule::Source);
    for last in 0..=20u8 {
        let c = Client {
            address: Some(IpAddr::from([203, 0, 113, last])),
            key: None,
        };
        let e = entries_for(&s, &c);
        assert_eq!(e.len(), 1);
        let want = if last % 2 == 0 { host(11) } else { host(12) };
        assert_eq!(e[0].host, want, "client .{last}");
        assert_eq!(e[0].backups.len(), 1);
    }
    assert_eq!(source_key("2001:db8::1:3".parse().unwrap()), 0x0001_0003);
}

#[test]
fn a_sphere_without_valid_instances_sends_its_clients_everywhere() {
    let mut s = service(
        "web",
        Rule::Topology {
            subnets: vec![("203.0.113.0".parse().unwrap(), 24, "west".into())],
        },
    );
    s.instances[1].valid = false;
    let c = Client {
        address: Some("203.0.113.9".parse().unwrap()),
        key: None,
    };
    assert_eq!(entries_for(&s, &c).len(), 1, "only a remains, in east");
}

#[test]
fn a_redirected_service_is_one_point_in_level_one_and_whole_in_its_sub_level_map() {
    let mut s = service("web", Rule::Plain);
    s.redirector = Some(ServiceHost {
        inet_address: "192.0.2.80".parse().unwrap(),
        dns_address: None,
        port: 80,
    });
    let top = generate(&[s.clone()], &Client::default(), 0, 1);
    assert_eq!(top.entries.len(), 1);
    assert_eq!(top.entries[0].host.port, 80);
    assert!(top.entries[0].command.as_ref().unwrap().contains("level=2"));
    let sub = sub_level(&s, &Client::default(), 0, 1);
    assert_eq!(sub.map_type, 2);
    assert_eq!(sub.spec.as_ref().unwrap().service_id, "web");
    assert_eq!(sub.entries.len(), 2);
}

#[test]
fn the_epoch_record_moves_on_set_changes_by_policy_and_on_operator_bumps() {
    let names = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let first = next_record(EpochPolicy::Stateful, None, &names(&["a"]), 0).unwrap();
    assert_eq!(first.epoch, 0, "a new service starts at 0");
    assert_eq!(
        next_record(EpochPolicy::Stateful, Some(&first), &names(&["a"]), 0),
        None
    );
    let two = next_record(EpochPolicy::Stateful, Some(&first), &names(&["b", "a"]), 0).unwrap();
    assert_eq!((two.epoch, two.members.clone()), (1, names(&["a", "b"])));
    let stateless =
        next_record(EpochPolicy::Stateless, Some(&first), &names(&["a", "b"]), 0).unwrap();
    assert_eq!(stateless.epoch, 0, "recorded, not bumped");
    let bumped = next_record(
        EpochPolicy::Stateless,
        Some(&stateless),
        &names(&["a", "b"]),
        1,
    )
    .unwrap();
    assert_eq!((bumped.epoch, bumped.bumps), (1, 1));
    assert_eq!(
        next_record(
            EpochPolicy::Stateless,
            Some(&bumped),
            &names(&["a", "b"]),
            1
        ),
        None,
        "a bump is folded in once"
    );
}

#[test]
fn map_types_move_exactly_the_shared_fields_to_the_header() {
    let map = generate(
        &[service("web", Rule::Plain), service("db", Rule::Plain)],
        &Client::default(),
        0,
        3,
    );
    assert_eq!(map.entries.len(), 4);
    let t2 = project(&map, 2, Some("web"), None).unwrap();
    assert_eq!(t2.spec.as_ref().unwrap().service_id, "web");
    assert!(t2
        .entries
        .iter()
        .all(|e| e.spec.is_none() && e.sphere.is_some()));
    assert_eq!(t2.entries.len(), 2);
    let t3 = project(&map, 3, None, Some("east")).unwrap();
    assert_eq!(t3.sphere.as_ref().unwrap().provider_id, "east");
    assert!(t3
        .entries
        .iter()
        .all(|e| e.sphere.is_none() && e.spec.is_some()));
    assert_eq!(t3.entries.len(), 2, "one east instance in each service");
    let t4 = project(&map, 4, Some("db"), Some("west")).unwrap();
    assert!(t4.spec.is_some() && t4.sphere.is_some());
    assert!(t4
        .entries
        .iter()
        .all(|e| e.spec.is_none() && e.sphere.is_none()));
    assert_eq!(t4.entries.len(), 1);
    assert!(project(&map, 2, None, None).is_err());
    assert!(project(&map, 5, None, None).is_err());
    assert_eq!(project(&map, 1, None, None).unwrap(), map);
}

#[test]
fn a_sphere_map_keeps_each_services_own_epoch() {
    let mut db = service("db", Rule::Plain);
    db.epoch = 9;
    let map = generate(&[service("web", Rule::Plain), db], &Client::default(), 0, 3);
    let t3 = project(&map, 3, None, Some("east")).unwrap();
    let header = t3.sphere.as_ref().unwrap();
    assert_eq!(header.provider_id, "east");
    // Every entry's epoch, as a client reads it (its own sphere, else the header's),
    // is its service's.
    for e in &t3.entries {
        let epoch = e.sphere.as_ref().unwrap_or(header).epoch;
        let want = if e.spec.as_ref().unwrap().service_id == "db" {
            9
        } else {
            7
        };
        assert_eq!(epoch, want, "{e:?}");
    }
    assert_eq!(
        t3.entries.iter().filter(|e| e.sphere.is_some()).count(),
        1,
        "only the entry that differs from the header keeps its sphere"
    );
}

#[test]
fn validity_windows_are_honoured() {
    let mut s = service("web", Rule::Plain);
    s.valid_from = Some(100);
    s.valid_until = Some(200);
    assert!(generate(&[s.clone()], &Client::default(), 99, 1)
        .entries
        .is_empty());
    assert_eq!(
        generate(&[s.clone()], &Client::default(), 100, 1)
            .entries
            .len(),
        2
    );
    assert!(generate(&[s], &Client::default(), 200, 1)
        .entries
        .is_empty());
}

#[test]
fn stateful_services_bump_the_epoch_when_the_set_or_a_restart_changes() {
    let one = vec![("a".to_string(), 0)];
    let two = vec![("a".to_string(), 0), ("b".to_string(), 0)];
    let restarted = vec![("a".to_string(), 1)];
    assert!(epoch_bump(EpochPolicy::Stateful, &one, &two));
    assert!(epoch_bump(EpochPolicy::Stateful, &one, &restarted));
    assert!(!epoch_bump(
        EpochPolicy::Stateful,
        &two,
        &[two[1].clone(), two[0].clone()]
    ));
    assert!(!epoch_bump(EpochPolicy::Stateless, &one, &two));
}
