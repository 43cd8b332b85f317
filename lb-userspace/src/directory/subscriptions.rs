//! Subscriptions (the DSD seed's Figs. 5D/5E): a subscriber names a table and a key
//! prefix and receives Add / Delete events for matching changes. Each subscriber has
//! a bounded queue; when it falls behind, its queue is dropped and replaced by one
//! Resync event, which means "rescan the table": events are never silently lost.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use super::tables::{Change, Entry, Op};

pub type SubId = u64;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "lowercase")]
pub enum Event {
    /// A row was added or changed (value or validity).
    Add {
        table: String,
        key: String,
        value: String,
        valid: bool,
    },
    Delete {
        table: String,
        key: String,
    },
    /// Events were discarded: rescan the subscribed table.
    Resync {
        table: String,
    },
}

#[derive(Clone, Debug)]
struct Subscription {
    table: String,
    prefix: String,
    queue: VecDeque<Event>,
    capacity: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Subscriptions {
    next: SubId,
    subs: BTreeMap<SubId, Subscription>,
}

impl Subscriptions {
    pub fn subscribe(&mut self, table: &str, prefix: &str, capacity: usize) -> SubId {
        self.next += 1;
        self.subs.insert(
            self.next,
            Subscription {
                table: table.to_string(),
                prefix: prefix.to_string(),
                queue: VecDeque::new(),
                capacity: capacity.max(1),
            },
        );
        self.next
    }

    pub fn cancel(&mut self, id: SubId) -> bool {
        self.subs.remove(&id).is_some()
    }

    /// Offers a change to every subscription. `row` is the row after the change (for
    /// a validity change, the value is needed too); `None` after a delete.
    pub fn publish(&mut self, change: &Change, row: Option<&Entry>) {
        let event = match (&change.op, row) {
            (Op::Delete, _) => Event::Delete {
                table: change.table.clone(),
                key: change.key.clone(),
            },
            (_, Some(row)) => Event::Add {
                table: change.table.clone(),
                key: change.key.clone(),
                value: row.value.clone(),
                valid: row.valid,
            },
            (_, None) => return,
        };
        for sub in self.subs.values_mut() {
            if sub.table != change.table || !change.key.starts_with(&sub.prefix) {
                continue;
            }
            if matches!(sub.queue.back(), Some(Event::Resync { .. })) {
                // Already told to rescan; the rescan will see this change.
                continue;
            }
            if sub.queue.len() >= sub.capacity {
                sub.queue.clear();
                sub.queue.push_back(Event::Resync {
                    table: sub.table.clone(),
                });
            } else {
                sub.queue.push_back(event.clone());
            }
        }
    }

    /// Everything queued for a subscription, oldest first; `None` if it is unknown.
    pub fn drain(&mut self, id: SubId) -> Option<Vec<Event>> {
        self.subs.get_mut(&id).map(|s| s.queue.drain(..).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::directory::tables::Tables;

    fn put(
        t: &mut Tables,
        subs: &mut Subscriptions,
        table: &str,
        key: &str,
        value: &str,
        valid: bool,
    ) {
        if let Some(c) = t.add(table, key, value, valid) {
            subs.publish(&c, t.get(table, key).as_ref());
        }
    }

    #[test]
    fn only_matching_table_and_prefix_are_delivered() {
        let (mut t, mut s) = (Tables::default(), Subscriptions::default());
        let web = s.subscribe("svc.web", "web.", 16);
        let all = s.subscribe("svc.web", "", 16);
        put(&mut t, &mut s, "svc.web", "web.1", "h:1", true);
        put(&mut t, &mut s, "svc.web", "other.1", "h:2", true);
        put(&mut t, &mut s, "svc.db", "web.1", "h:3", true);
        let got = s.drain(web).unwrap();
        assert_eq!(got.len(), 1);
        assert!(matches!(&got[0], Event::Add { key, .. } if key == "web.1"));
        assert_eq!(s.drain(all).unwrap().len(), 2);
        let c = t.delete("svc.web", "web.1").unwrap();
        s.publish(&c, None);
        assert_eq!(
            s.drain(web).unwrap(),
            [Event::Delete {
                table: "svc.web".into(),
                key: "web.1".into()
            }]
        );
        let c = t.set_valid("svc.web", "other.1", false).unwrap();
        s.publish(&c, t.get("svc.web", "other.1").as_ref());
        assert!(matches!(
            &s.drain(all).unwrap()[..],
            [_, Event::Add { valid: false, .. }]
        ));
    }

    #[test]
    fn a_subscriber_that_falls_behind_gets_one_resync_instead_of_a_silent_gap() {
        let (mut t, mut s) = (Tables::default(), Subscriptions::default());
        let slow = s.subscribe("svc.web", "", 3);
        for i in 0..10 {
            put(&mut t, &mut s, "svc.web", &format!("web.{i}"), "h:1", true);
        }
        assert_eq!(
            s.drain(slow).unwrap(),
            [Event::Resync {
                table: "svc.web".into()
            }]
        );
        // After draining, events flow again.
        put(&mut t, &mut s, "svc.web", "web.99", "h:1", true);
        assert_eq!(s.drain(slow).unwrap().len(), 1);
        assert!(s.cancel(slow));
        assert!(s.drain(slow).is_none());
    }
}
