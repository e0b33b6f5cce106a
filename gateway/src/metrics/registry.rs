//! Metric slots: which counter index a listener name or a destination's labels count under.
//!
//! Both maps only grow, so a reload never renumbers a counter: a listener removed and added
//! again, or a destination that leaves the route table and comes back, continues its counters
//! and they stay monotonic. Slots are assigned off the hot path, when a listener is opened or a
//! snapshot is published; workers only index arrays with them.

use std::sync::{Mutex, OnceLock};

use crate::config::MAX_LISTENERS;
use crate::routes::{DestinationLabels, RouteTable};

/// Destination label sets are capped so a control plane with a huge catalog cannot blow up
/// the scrape; values beyond the cap share the `__overflow__` slot, which is itself counted.
pub const MAX_DESTINATIONS: usize = 256;
pub(super) const OVERFLOW_SLOT: usize = MAX_DESTINATIONS - 1;

/// Append-only map from destination labels to a counter slot.
#[derive(Default)]
struct Destinations {
    slots: Vec<DestinationLabels>,
    overflowed: u64,
}

pub struct Registry {
    /// Listener names by metric slot. A slot, once named, keeps its name for the life of the
    /// process, so a listener removed and added again by reloads keeps its counters.
    listener_slots: Box<[OnceLock<String>]>,
    listener_registry: Mutex<()>,
    destinations: Mutex<Destinations>,
}

impl Default for Registry {
    fn default() -> Registry {
        Registry {
            listener_slots: (0..MAX_LISTENERS).map(|_| OnceLock::new()).collect(),
            listener_registry: Mutex::new(()),
            destinations: Mutex::new(Destinations::default()),
        }
    }
}

impl Registry {
    /// The metric slot of a listener name, assigned on first sight; `None` once all
    /// `MAX_LISTENERS` slots are named.
    pub fn listener_slot(&self, name: &str) -> Option<usize> {
        let _assigning = match self.listener_registry.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        for (slot, cell) in self.listener_slots.iter().enumerate() {
            match cell.get() {
                Some(known) if known == name => return Some(slot),
                Some(_) => {}
                None => {
                    let _ = cell.set(name.to_owned());
                    return Some(slot);
                }
            }
        }
        None
    }

    /// The name of a listener slot (lock-free; empty for a slot never named).
    pub fn listener_name(&self, slot: usize) -> &str {
        self.listener_slots
            .get(slot)
            .and_then(OnceLock::get)
            .map_or("", String::as_str)
    }

    /// The named listener slots, in slot order.
    pub fn named_listeners(&self) -> Vec<(usize, &str)> {
        self.listener_slots
            .iter()
            .enumerate()
            .map_while(|(slot, cell)| cell.get().map(|name| (slot, name.as_str())))
            .collect()
    }

    /// The counter slot for a destination, assigned on first sight. Called when a snapshot is
    /// published (never by building one, so a refused reload names nothing).
    pub fn destination_slot(&self, labels: &DestinationLabels) -> usize {
        let mut destinations = self.lock_destinations();
        if let Some(slot) = destinations.slots.iter().position(|known| known == labels) {
            return slot;
        }
        if destinations.slots.len() < OVERFLOW_SLOT {
            destinations.slots.push(labels.clone());
            return destinations.slots.len() - 1;
        }
        destinations.overflowed += 1;
        OVERFLOW_SLOT
    }

    /// The counter slot of each cluster of `table`, in table order.
    pub fn destination_slots(&self, table: &RouteTable) -> Vec<usize> {
        table
            .clusters()
            .iter()
            .map(|cluster| self.destination_slot(&cluster.labels))
            .collect()
    }

    /// The named destinations by slot, and how many label sets went to the overflow slot.
    pub fn destinations(&self) -> (Vec<DestinationLabels>, u64) {
        let destinations = self.lock_destinations();
        (destinations.slots.clone(), destinations.overflowed)
    }

    fn lock_destinations(&self) -> std::sync::MutexGuard<'_, Destinations> {
        match self.destinations.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(service: &str) -> DestinationLabels {
        DestinationLabels {
            service: service.into(),
            datacenter: "dc1".into(),
        }
    }

    #[test]
    fn slots_are_stable_and_capped() {
        let registry = Registry::default();
        assert_eq!(registry.listener_slot("a"), Some(0));
        assert_eq!(registry.listener_slot("b"), Some(1));
        assert_eq!(registry.listener_slot("a"), Some(0));
        assert_eq!(registry.listener_name(1), "b");
        assert_eq!(registry.named_listeners(), vec![(0, "a"), (1, "b")]);
        assert_eq!(registry.destination_slot(&labels("x")), 0);
        assert_eq!(registry.destination_slot(&labels("y")), 1);
        assert_eq!(registry.destination_slot(&labels("x")), 0);
        for index in 0..OVERFLOW_SLOT {
            registry.destination_slot(&labels(&format!("many-{index}")));
        }
        assert_eq!(registry.destination_slot(&labels("late")), OVERFLOW_SLOT);
        let (named, overflowed) = registry.destinations();
        assert_eq!(named.len(), OVERFLOW_SLOT);
        assert!(overflowed >= 2, "{overflowed}");
    }
}
