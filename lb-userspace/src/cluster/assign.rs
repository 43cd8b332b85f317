//! The leader's assignment rules (the RAIS seed's Control thread, Fig. 6A/6B): from the
//! alive hosts' reports, build the control service-address table, the spare-host list
//! and the non-spare-eligible list, and decide who acquires and who releases. Pure: the
//! caller passes the hosts, the addresses, what is in flight, and the random source.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use rand::{seq::SliceRandom, Rng};

use super::wire::{AddrState, HostInfo};

/// One row of the control service-address table (Fig. 6B).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControlEntry {
    pub states: BTreeSet<AddrState>,
    /// The OK host whose preferred address this is.
    pub preferred: Option<IpAddr>,
    /// Hosts that claim the address (acquiring, releasing or online).
    pub claimants: BTreeSet<IpAddr>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ControlDb {
    pub table: BTreeMap<IpAddr, ControlEntry>,
    pub spares: Vec<IpAddr>,
    pub non_spare_eligible: Vec<IpAddr>,
}

/// What the leader sends.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    pub acquire: Vec<(IpAddr, IpAddr)>,
    pub release: Vec<(IpAddr, IpAddr)>,
    /// Unserved addresses that no host can take.
    pub cannot_assign: Vec<IpAddr>,
}

/// Builds the control database. `addresses` are the group's valid service addresses
/// (an address outside it is expired: whoever serves it is told to release).
pub fn control_db(
    hosts: &[&HostInfo],
    addresses: &BTreeSet<IpAddr>,
    release: &mut Vec<(IpAddr, IpAddr)>,
) -> ControlDb {
    let mut db = ControlDb {
        table: addresses
            .iter()
            .map(|a| (*a, ControlEntry::default()))
            .collect(),
        ..ControlDb::default()
    };
    for h in hosts {
        // A host still in its start-up sync may lack what the cluster decided while it
        // was away: it is given nothing, and its preferences wait.
        if h.ok && h.ready && !h.quiesce && !h.leaving {
            if h.preferred.is_empty() {
                db.spares.push(h.id);
            } else {
                db.non_spare_eligible.push(h.id);
            }
        }
        if h.ok && h.ready && !h.leaving {
            for p in &h.preferred {
                if let Some(e) = db.table.get_mut(p) {
                    // Two hosts preferring one address: the lower id keeps it.
                    if e.preferred.is_none_or(|cur| h.id < cur) {
                        e.preferred = Some(h.id);
                    }
                }
            }
        }
        for (addr, state) in &h.serving {
            match db.table.get_mut(addr) {
                Some(e) => {
                    e.claimants.insert(h.id);
                    e.states.insert(*state);
                }
                None => {
                    if *state != AddrState::Releasing {
                        release.push((h.id, *addr));
                    }
                }
            }
        }
    }
    db
}

fn pick<R: Rng>(rng: &mut R, from: &[IpAddr]) -> Option<IpAddr> {
    from.choose(rng).copied()
}

/// The digest every host that takes `addr` must hold: the current owner's (a flow
/// moving to a host with another table would be steered elsewhere), else the one most
/// ok hosts report (ties: the lowest id's). `None`: nobody reports one.
pub fn reference_digest(hosts: &[&HostInfo], addr: IpAddr) -> Option<u64> {
    if let Some(owner) = hosts
        .iter()
        .find(|h| h.serving.get(&addr) == Some(&AddrState::Online))
    {
        if let Some(d) = owner.digests.get(&addr) {
            return Some(*d);
        }
    }
    let mut votes: BTreeMap<u64, (usize, IpAddr)> = BTreeMap::new();
    for h in hosts.iter().filter(|h| h.ok) {
        if let Some(d) = h.digests.get(&addr) {
            let e = votes.entry(*d).or_insert((0, h.id));
            e.0 += 1;
            e.1 = e.1.min(h.id);
        }
    }
    votes
        .into_iter()
        .max_by(|a, b| a.1 .0.cmp(&b.1 .0).then(b.1 .1.cmp(&a.1 .1)))
        .map(|(d, _)| d)
}

/// Whether `host` may take `addr`: it can serve the VIP's services, and its tables
/// are the reference's (a host that reports no digest yet is not held back).
pub fn able(host: &HostInfo, addr: IpAddr, reference: Option<u64>) -> bool {
    !host.unable.contains(&addr)
        && match (host.digests.get(&addr), reference) {
            (Some(mine), Some(r)) => *mine == r,
            _ => true,
        }
}

/// The leader's decisions for one round. `in_flight` addresses have a command
/// outstanding and are left alone until the hosts report its outcome.
pub fn decide<R: Rng>(
    hosts: &[&HostInfo],
    addresses: &BTreeSet<IpAddr>,
    in_flight: &BTreeSet<IpAddr>,
    rng: &mut R,
) -> (ControlDb, Decision) {
    let mut d = Decision::default();
    let db = control_db(hosts, addresses, &mut d.release);
    let by_id: BTreeMap<IpAddr, &HostInfo> = hosts.iter().map(|h| (h.id, *h)).collect();
    let quiesced = |id: IpAddr| by_id.get(&id).is_some_and(|h| h.quiesce);
    let leaving = |id: &IpAddr| by_id.get(id).is_some_and(|h| h.leaving);

    for (addr, entry) in &db.table {
        if in_flight.contains(addr) {
            continue;
        }
        // Wait for transitions to finish before judging.
        if entry.states.contains(&AddrState::Acquiring)
            || entry.states.contains(&AddrState::Releasing)
        {
            continue;
        }
        let reference = reference_digest(hosts, *addr);
        let may = |id: &IpAddr| by_id.get(id).is_some_and(|h| able(h, *addr, reference));
        let spares: Vec<IpAddr> = db.spares.iter().copied().filter(|h| may(h)).collect();
        let others: Vec<IpAddr> = db
            .non_spare_eligible
            .iter()
            .copied()
            .filter(|h| may(h))
            .collect();
        let preferred = entry.preferred.filter(|p| !quiesced(*p) && may(p));
        let staying: Vec<IpAddr> = entry
            .claimants
            .iter()
            .copied()
            .filter(|c| !leaving(c))
            .collect();
        // Served, but by no host that can serve it (its backends out of reach from
        // there): an able host takes it first, then the duplicate goes to it.
        if !staying.is_empty() && !staying.iter().any(may) {
            let choice = preferred
                .or_else(|| pick(rng, &spares))
                .or_else(|| pick(rng, &others));
            if let Some(c) = choice.filter(|c| !entry.claimants.contains(c)) {
                d.acquire.push((c, *addr));
                continue;
            }
        }
        // Unserved, or served only by hosts that are leaving (they keep forwarding
        // until another serves it: make before break).
        if staying.is_empty() {
            // A host that cannot serve every service of the VIP, or holds other
            // tables, only when no other can take it: serving beats not serving.
            let choice = preferred
                .or_else(|| pick(rng, &spares))
                .or_else(|| pick(rng, &others))
                .or_else(|| entry.preferred.filter(|p| !quiesced(*p)))
                .or_else(|| pick(rng, &db.spares))
                .or_else(|| pick(rng, &db.non_spare_eligible));
            match choice {
                Some(c) => d.acquire.push((c, *addr)),
                None => d.cannot_assign.push(*addr),
            }
            continue;
        }
        // The preferred host is back and not serving: make before break. It acquires
        // (and announces) while the current owner still forwards; once both serve, the
        // duplicate below is resolved in its favour and the other releases.
        if let Some(p) = preferred.filter(|p| !entry.claimants.contains(p)) {
            d.acquire.push((p, *addr));
            continue;
        }
        if entry.claimants.len() > 1 {
            let claimants: Vec<IpAddr> = entry.claimants.iter().copied().collect();
            let choice = match preferred {
                Some(p) => p,
                None => {
                    let able_claimants: Vec<IpAddr> =
                        staying.iter().copied().filter(|c| may(c)).collect();
                    let spare_claimants: Vec<IpAddr> = able_claimants
                        .iter()
                        .copied()
                        .filter(|c| db.spares.contains(c))
                        .collect();
                    pick(rng, &spare_claimants)
                        .or_else(|| pick(rng, &able_claimants))
                        .or_else(|| pick(rng, &staying))
                        .expect("two or more claimants")
                }
            };
            for c in claimants {
                if c != choice {
                    d.release.push((c, *addr));
                }
            }
        }
    }
    (db, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{rngs::StdRng, SeedableRng};

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn host(id: &str, preferred: &[&str], serving: &[(&str, AddrState)]) -> HostInfo {
        HostInfo {
            id: ip(id),
            control_addresses: vec![ip(id)],
            ok: true,
            quiesce: false,
            leaving: false,
            load: 0,
            capacity: 100,
            preferred: preferred.iter().map(|p| ip(p)).collect(),
            serving: serving.iter().map(|(a, s)| (ip(a), *s)).collect(),
            addresses: vec![],
            dir_master: false,
            dir_backup_of: None,
            dir_version: 0,
            dir_digest: 0,
            ready: true,
            digests: BTreeMap::new(),
            unable: BTreeSet::new(),
        }
    }

    fn addrs(list: &[&str]) -> BTreeSet<IpAddr> {
        list.iter().map(|a| ip(a)).collect()
    }

    fn run(hosts: &[HostInfo], a: &[&str]) -> Decision {
        let refs: Vec<&HostInfo> = hosts.iter().collect();
        decide(
            &refs,
            &addrs(a),
            &BTreeSet::new(),
            &mut StdRng::seed_from_u64(1),
        )
        .1
    }

    const V1: &str = "198.18.0.100";
    const V2: &str = "198.18.0.101";

    #[test]
    fn unserved_addresses_go_to_their_preferred_host_first() {
        let hosts = [
            host("198.18.0.2", &[V1], &[]),
            host("198.18.0.3", &[V2], &[]),
            host("198.18.0.4", &[], &[]),
        ];
        let d = run(&hosts, &[V1, V2]);
        assert_eq!(
            d.acquire,
            vec![(ip("198.18.0.2"), ip(V1)), (ip("198.18.0.3"), ip(V2))]
        );
        assert!(d.release.is_empty());
    }

    #[test]
    fn orphans_go_to_a_hot_spare_before_other_hosts() {
        let hosts = [
            host("198.18.0.3", &[V2], &[(V2, AddrState::Online)]),
            host("198.18.0.4", &[], &[]),
        ];
        let d = run(&hosts, &[V1, V2]);
        assert_eq!(d.acquire, vec![(ip("198.18.0.4"), ip(V1))]);
        // Without a spare, a non-spare host takes it.
        let d = run(&hosts[..1], &[V1, V2]);
        assert_eq!(d.acquire, vec![(ip("198.18.0.3"), ip(V1))]);
    }

    #[test]
    fn quiesced_and_failed_hosts_acquire_nothing_but_quiesced_ones_keep_theirs() {
        let mut q = host("198.18.0.2", &[], &[(V2, AddrState::Online)]);
        q.quiesce = true;
        let mut bad = host("198.18.0.3", &[V1], &[]);
        bad.ok = false;
        let d = run(&[q, bad], &[V1, V2]);
        assert!(d.acquire.is_empty());
        assert!(d.release.is_empty());
        assert_eq!(d.cannot_assign, vec![ip(V1)]);
    }

    #[test]
    fn a_returning_preferred_host_acquires_before_the_other_releases() {
        let hosts = [
            host("198.18.0.2", &[V1], &[]),
            host("198.18.0.4", &[], &[(V1, AddrState::Online)]),
        ];
        let d = run(&hosts, &[V1]);
        assert_eq!(d.acquire, vec![(ip("198.18.0.2"), ip(V1))], "make");
        assert!(
            d.release.is_empty(),
            "before break: the holder keeps forwarding"
        );
        // Both serve: now the other one releases.
        let hosts = [
            host("198.18.0.2", &[V1], &[(V1, AddrState::Online)]),
            host("198.18.0.4", &[], &[(V1, AddrState::Online)]),
        ];
        let d = run(&hosts, &[V1]);
        assert_eq!(d.release, vec![(ip("198.18.0.4"), ip(V1))]);
        assert!(d.acquire.is_empty());
    }

    #[test]
    fn an_owner_that_cannot_serve_its_vip_hands_it_to_one_that_can() {
        let mut owner = host("198.18.0.2", &[V1], &[(V1, AddrState::Online)]);
        owner.unable.insert(ip(V1));
        let d = run(&[owner.clone(), host("198.18.0.4", &[], &[])], &[V1]);
        assert_eq!(d.acquire, vec![(ip("198.18.0.4"), ip(V1))], "make");
        assert!(d.release.is_empty(), "before break");
        let d = run(
            &[
                owner.clone(),
                host("198.18.0.4", &[], &[(V1, AddrState::Online)]),
            ],
            &[V1],
        );
        assert_eq!(d.release, vec![(ip("198.18.0.2"), ip(V1))]);
        // Nobody can do better: it stays.
        let mut other = host("198.18.0.4", &[], &[]);
        other.unable.insert(ip(V1));
        let d = run(&[owner, other], &[V1]);
        assert!(d.acquire.is_empty() && d.release.is_empty(), "{d:?}");
    }

    #[test]
    fn a_leaving_host_keeps_its_vip_until_another_serves_it() {
        let mut leaving = host("198.18.0.2", &[V1], &[(V1, AddrState::Online)]);
        leaving.leaving = true;
        let spare = host("198.18.0.4", &[], &[]);
        let d = run(&[leaving.clone(), spare], &[V1]);
        assert_eq!(d.acquire, vec![(ip("198.18.0.4"), ip(V1))], "make");
        assert!(d.release.is_empty(), "before break");
        let spare = host("198.18.0.4", &[], &[(V1, AddrState::Online)]);
        let d = run(&[leaving.clone(), spare], &[V1]);
        assert_eq!(d.release, vec![(ip("198.18.0.2"), ip(V1))]);
        assert!(d.acquire.is_empty());
        // Alone, it keeps serving: nobody else can.
        let d = run(&[leaving], &[V1]);
        assert!(d.acquire.is_empty() && d.release.is_empty(), "{d:?}");
    }

    #[test]
    fn a_host_still_in_its_start_up_sync_is_given_nothing_until_it_is_ready() {
        let owner = host("198.18.0.3", &[], &[(V1, AddrState::Online)]);
        let mut back = host("198.18.0.2", &[V1], &[]);
        back.ready = false;
        let d = run(&[back.clone(), owner.clone()], &[V1]);
        assert!(d.acquire.is_empty() && d.release.is_empty(), "{d:?}");
        // Unserved, and the only candidate is not ready: it stays unserved.
        let d = run(&[back.clone()], &[V1]);
        assert!(d.acquire.is_empty(), "{d:?}");
        back.ready = true;
        assert_eq!(
            run(&[back], &[V1]).acquire,
            vec![(ip("198.18.0.2"), ip(V1))]
        );
    }

    #[test]
    fn a_host_with_other_tables_or_no_usable_backend_does_not_take_the_vip() {
        let mut owner = host("198.18.0.3", &[V2], &[(V1, AddrState::Online)]);
        owner.digests.insert(ip(V1), 7);
        let mut preferred = host("198.18.0.2", &[V1], &[]);
        preferred.digests.insert(ip(V1), 8);
        let d = run(&[preferred.clone(), owner.clone()], &[V1]);
        assert!(
            d.acquire.is_empty() && d.release.is_empty(),
            "{d:?}: its tables differ"
        );
        preferred.digests.insert(ip(V1), 7);
        assert_eq!(
            run(&[preferred.clone(), owner], &[V1]).acquire,
            vec![(ip("198.18.0.2"), ip(V1))]
        );
        // Unserved: a spare that cannot serve V1 is passed over for one that can.
        let mut unable = host("198.18.0.4", &[], &[]);
        unable.unable.insert(ip(V1));
        let able = host("198.18.0.5", &[], &[]);
        for seed in 0..8 {
            let refs = [&unable, &able];
            let (_, d) = decide(
                &refs,
                &addrs(&[V1]),
                &BTreeSet::new(),
                &mut StdRng::seed_from_u64(seed),
            );
            assert_eq!(d.acquire, vec![(ip("198.18.0.5"), ip(V1))]);
        }
        // Nobody else: serving beats not serving.
        let refs = [&unable];
        let (_, d) = decide(
            &refs,
            &addrs(&[V1]),
            &BTreeSet::new(),
            &mut StdRng::seed_from_u64(1),
        );
        assert_eq!(d.acquire, vec![(ip("198.18.0.4"), ip(V1))]);
    }

    #[test]
    fn duplicates_keep_the_preferred_else_a_spare() {
        let hosts = [
            host("198.18.0.2", &[V1], &[(V1, AddrState::Online)]),
            host("198.18.0.4", &[], &[(V1, AddrState::Online)]),
        ];
        assert_eq!(run(&hosts, &[V1]).release, vec![(ip("198.18.0.4"), ip(V1))]);
        let hosts = [
            host("198.18.0.2", &[V2], &[(V1, AddrState::Online)]),
            host("198.18.0.4", &[], &[(V1, AddrState::Online)]),
        ];
        assert_eq!(
            run(&hosts, &[V1, V2]).release,
            vec![(ip("198.18.0.2"), ip(V1))]
        );
    }

    #[test]
    fn addresses_outside_the_group_are_released_and_transitions_are_waited_for() {
        let hosts = [host(
            "198.18.0.2",
            &[],
            &[
                ("198.18.0.199", AddrState::Online),
                (V1, AddrState::Acquiring),
            ],
        )];
        let d = run(&hosts, &[V1]);
        assert_eq!(d.release, vec![(ip("198.18.0.2"), ip("198.18.0.199"))]);
        assert!(d.acquire.is_empty());
    }
}
