//! Which deliveries are in flight on which subscription.
//!
//! An agency may hold several subscriptions (connections) at once; each queued item is in
//! flight on at most one of them until it is acknowledged or that subscription ends, when it
//! becomes available again. Each subscription has at most its window in flight, so a slow
//! consumer holds the broker to a bounded amount of memory.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicU64, Ordering},
    },
};

use concordat_proto::ids::AgencyId;
use tokio::sync::Notify;

use crate::{
    refusal::Internal,
    store::{Queued, Storage},
};

/// In-flight bookkeeping for every recipient.
#[derive(Default)]
pub struct Dispatcher {
    recipients: Mutex<HashMap<AgencyId, Recipient>>,
    next_id: AtomicU64,
}

/// The most subscriptions one agency may hold at once.
pub const MAX_SUBSCRIPTIONS: usize = 16;

#[derive(Default)]
struct Recipient {
    /// Open subscriptions.
    subscriptions: usize,
    /// Queue sequence number → the subscription it is in flight on.
    in_flight: HashMap<u64, u64>,
    /// Wakes this recipient's subscriptions when items become available again.
    notify: Arc<Notify>,
}

/// A subscription's identity within the dispatcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionId(u64);

impl Dispatcher {
    fn lock(&self) -> MutexGuard<'_, HashMap<AgencyId, Recipient>> {
        // The map stays consistent even if a holder panicked: every update is a single insert
        // or remove.
        self.recipients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a new subscription of `recipient`; returns its id and the notifier to wait on,
    /// or `None` when the agency already holds [`MAX_SUBSCRIPTIONS`].
    pub fn register(&self, recipient: &AgencyId) -> Option<(SubscriptionId, Arc<Notify>)> {
        let mut all = self.lock();
        let state = all.entry(recipient.clone()).or_default();
        if state.subscriptions >= MAX_SUBSCRIPTIONS {
            return None;
        }
        state.subscriptions += 1;
        let id = SubscriptionId(self.next_id.fetch_add(1, Ordering::Relaxed));
        Some((id, state.notify.clone()))
    }

    /// How many items subscription `sub` has in flight.
    pub fn in_flight(&self, recipient: &AgencyId, sub: SubscriptionId) -> usize {
        self.lock()
            .get(recipient)
            .map_or(0, |r| r.in_flight.values().filter(|s| **s == sub.0).count())
    }

    /// How many items `recipient` has in flight across all its subscriptions.
    pub fn in_flight_total(&self, recipient: &AgencyId) -> usize {
        self.lock().get(recipient).map_or(0, |r| r.in_flight.len())
    }

    /// Claims up to `budget` of the oldest durable items (sequence ≤ `durable`) of `recipient`'s
    /// queue that no subscription has in flight, for subscription `sub`.
    pub fn claim(
        &self,
        storage: &dyn Storage,
        recipient: &AgencyId,
        sub: SubscriptionId,
        durable: u64,
        budget: usize,
    ) -> Result<Vec<Queued>, Internal> {
        if budget == 0 {
            return Ok(Vec::new());
        }
        let mut all = self.lock();
        let state = all.entry(recipient.clone()).or_default();
        let taken = &state.in_flight;
        let items =
            storage.claimable(recipient, durable, budget, &|seq| taken.contains_key(&seq))?;
        for item in &items {
            state.in_flight.insert(item.seq, sub.0);
        }
        Ok(items)
    }

    /// Marks deliveries as acknowledged and wakes the recipient's subscriptions.
    pub fn acked(&self, recipient: &AgencyId, seqs: &[u64]) {
        let mut all = self.lock();
        if let Some(state) = all.get_mut(recipient) {
            for seq in seqs {
                state.in_flight.remove(seq);
            }
            state.notify.notify_waiters();
        }
    }

    /// Ends subscription `sub`: its unacknowledged items become available to the others.
    pub fn release(&self, recipient: &AgencyId, sub: SubscriptionId) {
        let mut all = self.lock();
        if let Some(state) = all.get_mut(recipient) {
            state.subscriptions = state.subscriptions.saturating_sub(1);
            state.in_flight.retain(|_, s| *s != sub.0);
            state.notify.notify_waiters();
        }
    }
}
