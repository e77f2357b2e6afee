//! What an admitted request holds until its response ends: its concurrent-stream slots and its
//! token reservation, released and settled when the response body is dropped.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::ext::UsageReport;

/// Held by the response body; dropping it frees the request's stream slots and settles its
/// token reservation.
#[derive(Default)]
pub(crate) struct Ticket {
    /// In-memory stream slots, freed by a decrement.
    pub(super) slots: Vec<Arc<AtomicU32>>,
    /// What is done when the response ends (settling tokens, freeing shared stream slots).
    pub(super) settle: Option<Arc<Settle>>,
}

impl Ticket {
    /// The response extension through which the usage tap reports the response's tokens, if
    /// the request reserved any.
    pub(super) fn usage_report(&self) -> Option<UsageReport> {
        let settle = self
            .settle
            .as_ref()
            .filter(|s| s.reserved.is_some())?
            .clone();
        Some(UsageReport::new(move |tokens| {
            settle.reported.store(tokens, Ordering::Release);
        }))
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        for slot in &self.slots {
            slot.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl fmt::Debug for Ticket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ticket")
            .field("slots", &self.slots.len())
            .field("settles", &self.settle.is_some())
            .finish()
    }
}

const NOT_REPORTED: u64 = u64::MAX;

type OnEnd = Box<dyn FnOnce(i64) + Send + Sync>;

/// Runs once, when both the response body and the usage tap's report are gone: with the
/// difference between the tokens the response used (as reported) and those it reserved, or 0
/// when none were reported (the reservation stands).
pub(super) struct Settle {
    reserved: Option<u64>,
    reported: AtomicU64,
    on_end: Option<OnEnd>,
}

impl Settle {
    /// `reserved` is the tokens charged up front, if the request is under a token limit.
    pub(super) fn new(
        reserved: Option<u64>,
        on_end: impl FnOnce(i64) + Send + Sync + 'static,
    ) -> Self {
        Self {
            reserved,
            reported: AtomicU64::new(NOT_REPORTED),
            on_end: Some(Box::new(on_end)),
        }
    }
}

impl Drop for Settle {
    fn drop(&mut self) {
        let reported = *self.reported.get_mut();
        let delta = match self.reserved {
            Some(reserved) if reported != NOT_REPORTED => {
                let used = i64::try_from(reported).unwrap_or(i64::MAX);
                used.saturating_sub(i64::try_from(reserved).unwrap_or(i64::MAX))
            }
            _ => 0,
        };
        if let Some(on_end) = self.on_end.take() {
            on_end(delta);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn settled(reserved: Option<u64>, report: Option<u64>) -> Option<i64> {
        let seen = Arc::new(Mutex::new(None));
        let out = seen.clone();
        let ticket = Ticket {
            slots: vec![Arc::new(AtomicU32::new(1))],
            settle: Some(Arc::new(Settle::new(reserved, move |d| {
                *out.lock().unwrap() = Some(d);
            }))),
        };
        let usage = ticket.usage_report();
        assert_eq!(usage.is_some(), reserved.is_some());
        if let (Some(usage), Some(n)) = (&usage, report) {
            usage.report(n);
        }
        drop(ticket);
        // The report still holds the settlement: nothing yet.
        if usage.is_some() {
            assert_eq!(*seen.lock().unwrap(), None);
        }
        drop(usage);
        *seen.lock().unwrap()
    }

    #[test]
    fn a_reservation_settles_to_the_reported_count_or_stands() {
        assert_eq!(settled(Some(100), Some(250)), Some(150));
        assert_eq!(settled(Some(100), Some(40)), Some(-60));
        assert_eq!(
            settled(Some(100), None),
            Some(0),
            "no count: the reservation stands"
        );
        assert_eq!(settled(None, None), Some(0));
    }
}
