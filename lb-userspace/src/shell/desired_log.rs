//! The operator's intent on disk, saved in proportion to each change: a snapshot
//! (`desired.json`: the config's services it was derived from, and the desired
//! state) and a log after it (`desired.log`: one line per change, the touched
//! services' new specs, `null` for a removed one), appended and flushed before the
//! maps are written. A node of 10,000 services writes a few hundred bytes per change,
//! not megabytes. The log is folded into a new snapshot when it outgrows it.
//!
//! A crash while a line is appended leaves a line without its newline: it is
//! ignored, and so was the change (the maps are written only after the line is on
//! disk).

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::{
    desired::{Desired, ServiceSpec},
    model::ServiceKey,
};

pub const SNAPSHOT_FILE: &str = "desired.json";
pub const LOG_FILE: &str = "desired.log";
/// The log is folded into the snapshot once it is larger than this or the snapshot.
const FOLD_AT: u64 = 1 << 20;

/// What is saved of the operator's intent.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Saved {
    /// The config file's services when `desired` was derived from them: if the file
    /// says something else now, it was edited since, and the file wins.
    pub from_config: Desired,
    pub desired: Desired,
}

/// One line of the log.
#[derive(Serialize, Deserialize)]
struct Line {
    services: BTreeMap<ServiceKey, Option<ServiceSpec>>,
}

/// The services of `new` that differ from `old` (`None`: gone).
fn delta(old: &Desired, new: &Desired) -> BTreeMap<ServiceKey, Option<ServiceSpec>> {
    let mut out = BTreeMap::new();
    for (k, spec) in &new.services {
        if old.services.get(k) != Some(spec) {
            out.insert(*k, Some(spec.clone()));
        }
    }
    for k in old.services.keys() {
        if !new.services.contains_key(k) {
            out.insert(*k, None);
        }
    }
    out
}

/// As `delta`, looking only at `keys`.
fn delta_of(
    old: &Desired,
    new: &Desired,
    keys: &BTreeSet<ServiceKey>,
) -> BTreeMap<ServiceKey, Option<ServiceSpec>> {
    keys.iter()
        .filter_map(|k| match (old.services.get(k), new.services.get(k)) {
            (a, Some(b)) if a != Some(b) => Some((*k, Some(b.clone()))),
            (Some(_), None) => Some((*k, None)),
            _ => None,
        })
        .collect()
}

/// `desired` with a log's lines applied; the lines after a torn one are not read.
fn replay(mut desired: Desired, log: &str) -> Desired {
    for line in log.split_inclusive('\n') {
        let Some(text) = line.strip_suffix('\n') else {
            break;
        };
        let Ok(l) = serde_json::from_str::<Line>(text) else {
            break;
        };
        for (k, spec) in l.services {
            match spec {
                Some(s) => {
                    desired.services.insert(k, s);
                }
                None => {
                    desired.services.remove(&k);
                }
            }
        }
    }
    desired
}

pub struct DesiredLog {
    dir: PathBuf,
    /// What the snapshot and the log hold together.
    saved: Option<Saved>,
    snapshot_bytes: u64,
    log_bytes: u64,
}

impl DesiredLog {
    /// Reads what the last run saved in `dir` (`None`: nothing, or a snapshot that
    /// does not parse).
    pub fn open(dir: &Path) -> DesiredLog {
        let snapshot = std::fs::read(dir.join(SNAPSHOT_FILE)).ok();
        let snapshot_bytes = snapshot.as_ref().map_or(0, |b| b.len() as u64);
        let saved = snapshot
            .and_then(|b| serde_json::from_slice::<Saved>(&b).ok())
            .map(|s| {
                let log = std::fs::read_to_string(dir.join(LOG_FILE)).unwrap_or_default();
                Saved {
                    desired: replay(s.desired, &log),
                    from_config: s.from_config,
                }
            });
        DesiredLog {
            dir: dir.to_path_buf(),
            saved,
            snapshot_bytes,
            log_bytes: u64::MAX,
        }
    }

    pub fn saved(&self) -> Option<&Saved> {
        self.saved.as_ref()
    }

    /// Makes `desired` (derived from `from_config`) what is saved: one appended line,
    /// or a new snapshot (the first save of a run, another config, a long log).
    /// `touched`: the caller knows that `from_config` is the one of the last save and
    /// that only these services may differ from it, so nothing else is compared (a
    /// change to one service of 10,000 costs that service); `None`: compare all.
    pub fn save(
        &mut self,
        from_config: &Desired,
        desired: &Desired,
        touched: Option<&BTreeSet<ServiceKey>>,
    ) -> Result<()> {
        let appendable = self.log_bytes <= FOLD_AT.max(self.snapshot_bytes)
            && self
                .saved
                .as_ref()
                .is_some_and(|s| touched.is_some() || &s.from_config == from_config);
        if !appendable {
            return self.snapshot(from_config, desired);
        }
        let saved = self.saved.as_mut().expect("appendable");
        let line = Line {
            services: match touched {
                Some(keys) => delta_of(&saved.desired, desired, keys),
                None => delta(&saved.desired, desired),
            },
        };
        if line.services.is_empty() {
            return Ok(());
        }
        let mut text = serde_json::to_vec(&line)?;
        text.push(b'\n');
        let path = self.dir.join(LOG_FILE);
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        // One write of the whole line, then to disk before the maps change.
        f.write_all(&text)
            .and_then(|()| f.sync_data())
            .with_context(|| format!("appending to {}", path.display()))?;
        self.log_bytes += text.len() as u64;
        // In place: only the touched services are copied.
        for (k, spec) in line.services {
            match spec {
                Some(s) => {
                    saved.desired.services.insert(k, s);
                }
                None => {
                    saved.desired.services.remove(&k);
                }
            }
        }
        Ok(())
    }

    fn snapshot(&mut self, from_config: &Desired, desired: &Desired) -> Result<()> {
        let saved = Saved {
            from_config: from_config.clone(),
            desired: desired.clone(),
        };
        let bytes = serde_json::to_vec(&saved)?;
        crate::shell::state_file::write_atomic(&self.dir.join(SNAPSHOT_FILE), &bytes)?;
        // The snapshot holds everything: an old log after it would be replayed on top.
        crate::shell::state_file::write_atomic(&self.dir.join(LOG_FILE), b"")?;
        self.snapshot_bytes = bytes.len() as u64;
        self.log_bytes = 0;
        self.saved = Some(saved);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::desired::BackendSpec;

    fn desired(n: u16, backends: u32) -> Desired {
        let services = (0..n)
            .map(|p| {
                let spec = ServiceSpec {
                    backends: (0..backends)
                        .map(|b| {
                            (
                                std::net::IpAddr::from([198, 18, 1, b as u8]),
                                BackendSpec {
                                    mac: None,
                                    weight: 1,
                                    drain: false,
                                },
                            )
                        })
                        .collect(),
                    ..ServiceSpec::default()
                };
                (
                    format!("tcp/198.18.0.100:{}", 1000 + p).parse().unwrap(),
                    spec,
                )
            })
            .collect();
        Desired { services }
    }

    /// The first service (by key), to change.
    fn first(d: &mut Desired) -> &mut crate::desired::ServiceSpec {
        let k = *d.services.keys().next().unwrap();
        d.services.get_mut(&k).unwrap()
    }

    fn dir(test: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lb-desired-log-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_change_appends_its_services_and_a_restart_reads_them_back() {
        let d = dir("append");
        let config = desired(100, 3);
        let mut log = DesiredLog::open(&d);
        assert!(log.saved().is_none());
        log.save(&config, &config, None).unwrap();
        let snapshot = std::fs::metadata(d.join(SNAPSHOT_FILE)).unwrap().len();
        let mut now = config.clone();
        first(&mut now).backends.clear();
        let gone = *now.services.keys().last().unwrap();
        now.services.remove(&gone);
        log.save(&config, &now, None).unwrap();
        let appended = std::fs::metadata(d.join(LOG_FILE)).unwrap().len();
        assert!(
            appended < snapshot / 20,
            "{appended} bytes appended, snapshot {snapshot}"
        );
        assert_eq!(
            std::fs::metadata(d.join(SNAPSHOT_FILE)).unwrap().len(),
            snapshot,
            "the snapshot is not rewritten"
        );
        let again = DesiredLog::open(&d);
        assert_eq!(again.saved().unwrap().desired, now);
        assert_eq!(again.saved().unwrap().from_config, config);
    }

    #[test]
    fn a_save_told_the_touched_services_appends_them_as_a_full_comparison_would() {
        let d = dir("touched");
        let config = desired(100, 3);
        let mut log = DesiredLog::open(&d);
        log.save(&config, &config, None).unwrap();
        let mut now = config.clone();
        let changed = *now.services.keys().next().unwrap();
        let gone = *now.services.keys().last().unwrap();
        first(&mut now).backends.clear();
        now.services.remove(&gone);
        let touched = BTreeSet::from([changed, gone]);
        log.save(&config, &now, Some(&touched)).unwrap();
        let text = std::fs::read_to_string(d.join(LOG_FILE)).unwrap();
        assert_eq!(text.lines().count(), 1, "{text}");
        let again = DesiredLog::open(&d);
        assert_eq!(again.saved().unwrap().desired, now);
        // Only the named services are looked at: an untouched one that differs (which
        // a caller must never do) is not in the line.
        let mut sneaky = now.clone();
        let other = *sneaky.services.keys().nth(5).unwrap();
        sneaky.services.get_mut(&other).unwrap().backends.clear();
        let mut log = DesiredLog::open(&d);
        log.save(&config, &now, None).unwrap();
        log.save(&config, &sneaky, Some(&BTreeSet::new())).unwrap();
        assert_eq!(DesiredLog::open(&d).saved().unwrap().desired, now);
    }

    #[test]
    fn a_torn_last_line_is_a_change_that_never_happened() {
        let d = dir("torn");
        let config = desired(3, 1);
        let mut log = DesiredLog::open(&d);
        log.save(&config, &config, None).unwrap();
        let mut one = config.clone();
        first(&mut one).config.pass_irregular = true;
        log.save(&config, &one, None).unwrap();
        // A crash in the middle of appending the next change.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(d.join(LOG_FILE))
            .unwrap();
        f.write_all(b"{\"services\":{\"tcp/198.18.0.100:1000\":nu")
            .unwrap();
        assert_eq!(DesiredLog::open(&d).saved().unwrap().desired, one);
    }

    #[test]
    fn a_new_config_or_a_long_log_makes_a_new_snapshot() {
        let d = dir("fold");
        let config = desired(2, 1);
        let mut log = DesiredLog::open(&d);
        log.save(&config, &config, None).unwrap();
        let mut now = config.clone();
        for i in 0..20_000u32 {
            first(&mut now).config.epoch = i;
            log.save(&config, &now, None).unwrap();
        }
        let logged = std::fs::metadata(d.join(LOG_FILE)).unwrap().len();
        assert!(
            logged <= FOLD_AT + 1000,
            "the log was folded: {logged} bytes"
        );
        assert_eq!(DesiredLog::open(&d).saved().unwrap().desired, now);
        let other = desired(5, 2);
        log.save(&other, &other, None).unwrap();
        assert_eq!(std::fs::metadata(d.join(LOG_FILE)).unwrap().len(), 0);
        assert_eq!(DesiredLog::open(&d).saved().unwrap().from_config, other);
    }
}
