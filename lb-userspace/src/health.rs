//! The rise/fall counter that turns probe results into healthy/unhealthy
//! transitions, for backends' health checks and the directory's host-route probes.
//! Pure: the probing is `shell::health`'s.

/// One backend's check state: starts healthy (a new backend takes traffic at once;
/// the first `fall` failures take it out).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Health {
    healthy: bool,
    ok_run: u32,
    fail_run: u32,
}

impl Default for Health {
    fn default() -> Self {
        Self {
            healthy: true,
            ok_run: 0,
            fail_run: 0,
        }
    }
}

impl Health {
    pub fn healthy(&self) -> bool {
        self.healthy
    }

    /// Takes one probe result; returns the new state when it changes.
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        if ok {
            self.ok_run += 1;
            self.fail_run = 0;
            if !self.healthy && self.ok_run >= rise.max(1) {
                self.healthy = true;
                return Some(true);
            }
        } else {
            self.fail_run += 1;
            self.ok_run = 0;
            if self.healthy && self.fail_run >= fall.max(1) {
                self.healthy = false;
                return Some(false);
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fall_failures_take_it_out_and_rise_successes_bring_it_back() {
        let mut h = Health::default();
        assert!(h.healthy());
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(
            h.record(true, 2, 3),
            None,
            "a success resets the failure run"
        );
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), None);
        assert_eq!(h.record(false, 2, 3), Some(false));
        assert_eq!(h.record(false, 2, 3), None, "reported once");
        assert_eq!(h.record(true, 2, 3), None);
        assert_eq!(h.record(true, 2, 3), Some(true));
        assert!(h.healthy());
    }
}
