//! An in-memory data plane for the reconciler's tests: it keeps the plans written,
//! enforces the same limits as the maps (backend ids, services), and can be told to
//! fail a write, as a kernel error would, to test that a failed change is undone.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{Counter, GlobalStats};

use super::{Contents, Dataplane, DataplaneError, Held, Limits, Result, ServiceCounters, Usage};
use crate::{
    model::ServiceKey,
    plan::{Rule, ServicePlan},
};

pub struct FakeDataplane {
    pub limits: Limits,
    services: BTreeMap<ServiceKey, ServicePlan>,
    served: Option<BTreeSet<IpAddr>>,
    /// `write_service` and `remove_service` calls so far.
    pub calls: u64,
    /// The call with this number (1-based) fails without changing anything.
    pub fail_call: Option<u64>,
    /// How long each call takes (a slow kernel, or a large table), and the calls so
    /// far as seen from other threads (the daemon's tests watch an apply progress).
    pub pause: std::time::Duration,
    pub seen: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl FakeDataplane {
    pub fn new(limits: Limits) -> FakeDataplane {
        FakeDataplane {
            limits,
            services: BTreeMap::new(),
            served: None,
            calls: 0,
            fail_call: None,
            pause: std::time::Duration::ZERO,
            seen: Default::default(),
        }
    }

    /// The plan the fake holds for a service.
    pub fn held(&self, key: ServiceKey) -> Option<&ServicePlan> {
        self.services.get(&key)
    }

    fn call(&mut self) -> Result<()> {
        if !self.pause.is_zero() {
            std::thread::sleep(self.pause);
        }
        self.calls += 1;
        self.seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if self.fail_call == Some(self.calls) {
            return Err(DataplaneError::Options(format!(
                "injected failure of call {}",
                self.calls
            )));
        }
        Ok(())
    }
}

impl Dataplane for FakeDataplane {
    fn limits(&self) -> Limits {
        self.limits
    }

    fn usage(&self, keys: &mut dyn Iterator<Item = ServiceKey>) -> Usage {
        let held = self.services.iter().map(|(k, p)| {
            let rules = match &p.rule {
                Rule::Topology { subnets } => subnets.len(),
                _ => 0,
            };
            (
                *k,
                Held {
                    backends: p.backends.keys().copied().collect(),
                    rules,
                    ring_cells: super::ring_reservation(p, self.limits.tables),
                },
            )
        });
        let keys: Vec<ServiceKey> = keys.collect();
        Usage::of(held, &keys)
    }

    fn write_service(&mut self, key: ServiceKey, plan: &ServicePlan) -> Result<u64> {
        let laid = super::layout::Laid::of(plan, self.limits.tables)?;
        self.write_service_laid(key, plan, laid)
    }

    fn write_service_laid(
        &mut self,
        key: ServiceKey,
        plan: &ServicePlan,
        laid: super::layout::Laid,
    ) -> Result<u64> {
        // The same refusals as the maps, checked before anything changes.
        let next = BTreeMap::from([(key, Some(plan.clone()))]);
        super::check_fits(&self.limits, &self.usage(&mut std::iter::once(key)), &next)?;
        self.call()?;
        self.services.insert(key, plan.clone());
        Ok(laid.fingerprint)
    }

    fn remove_service(&mut self, key: ServiceKey) -> Result<()> {
        if !self.services.contains_key(&key) {
            return Err(DataplaneError::UnknownService(key));
        }
        self.call()?;
        self.services.remove(&key);
        Ok(())
    }

    fn set_served(&mut self, served: Option<BTreeSet<IpAddr>>) -> Result<()> {
        self.served = served;
        Ok(())
    }

    fn services(&self) -> Vec<ServiceKey> {
        self.services.keys().copied().collect()
    }

    fn holds(&self, key: ServiceKey) -> bool {
        self.services.contains_key(&key)
    }

    fn counters(&self, key: ServiceKey) -> Option<ServiceCounters> {
        let p = self.services.get(&key)?;
        Some(ServiceCounters {
            service: Counter::default(),
            backends: p
                .backends
                .keys()
                .map(|a| (*a, Counter::default()))
                .collect(),
        })
    }

    fn global_stats(&self) -> Result<GlobalStats> {
        Ok(GlobalStats::default())
    }

    fn conn_counts(&self) -> super::ConnCounts {
        super::ConnCounts::default()
    }

    fn read_back(&self, key: ServiceKey) -> Result<Option<Contents>> {
        self.services
            .get(&key)
            .map(|p| Contents::expected(p, self.limits.tables))
            .transpose()
    }

    fn serves(&self, addr: IpAddr) -> bool {
        self.services.keys().any(|k| k.addr == addr)
            && self.served.as_ref().is_none_or(|s| s.contains(&addr))
    }
}
