//! The broker's clock: the wall clock, never earlier than the latest time the broker has used.
//!
//! Consent tokens expire and audit entries are dated by this clock. A wall clock that steps
//! backwards (a bad NTP server, an operator's typo) would otherwise make expired tokens valid
//! again and date new entries before old ones. So the clock keeps a floor: the latest time it
//! has returned, raised at start to the time of the newest entry in the audit log (the floor is
//! persisted there, by every entry the broker writes). Time then stands still until the wall
//! clock catches up with it, and the broker says so once per step.
//!
//! The floor is one per process: a process runs one broker (tests that run several share it,
//! which only ever moves it closer to the present).

use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};

use time::OffsetDateTime;

/// The floor, in nanoseconds since the Unix epoch (an `i64` reaches the year 2262).
static FLOOR_NANOS: AtomicI64 = AtomicI64::new(i64::MIN);
/// Whether the wall clock is behind the floor now (so a step is logged once).
static BEHIND: AtomicBool = AtomicBool::new(false);
/// A wall clock this far behind the floor is logged as a step back.
const STEP_LOGGED_NANOS: i64 = 1_000_000_000;

/// The current time: the wall clock, or the floor if the wall clock is behind it.
pub fn now() -> OffsetDateTime {
    at(OffsetDateTime::now_utc())
}

/// [`now`], given the wall clock's reading.
fn at(wall: OffsetDateTime) -> OffsetDateTime {
    let nanos = i64::try_from(wall.unix_timestamp_nanos()).unwrap_or(i64::MAX);
    let floor = FLOOR_NANOS.fetch_max(nanos, Ordering::SeqCst);
    if floor <= nanos {
        if BEHIND.swap(false, Ordering::Relaxed) {
            tracing::info!("the wall clock has caught up with the broker's clock");
        }
        return wall;
    }
    if floor - nanos > STEP_LOGGED_NANOS && !BEHIND.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            behind_ms = (floor - nanos) / 1_000_000,
            "the wall clock is behind the latest time the broker has used: the broker's clock \
             stands still until it catches up (expired tokens stay expired, audit times do \
             not go backwards)"
        );
    }
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(floor)).unwrap_or(wall)
}

/// Raises the floor to `t` (the time of the newest audit entry, at start).
pub fn raise_floor(t: OffsetDateTime) {
    let nanos = i64::try_from(t.unix_timestamp_nanos()).unwrap_or(i64::MAX);
    FLOOR_NANOS.fetch_max(nanos, Ordering::SeqCst);
}

/// The current time as a protobuf timestamp.
pub fn now_timestamp() -> prost_types::Timestamp {
    let t = now();
    prost_types::Timestamp {
        seconds: t.unix_timestamp(),
        nanos: i32::try_from(t.nanosecond()).unwrap_or(0),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_step_back_of_the_wall_clock_does_not_move_time_back() {
        let t0 = OffsetDateTime::now_utc() + time::Duration::hours(5);
        raise_floor(t0);
        // The wall clock (now) is five hours behind: time stands at the floor.
        assert_eq!(now(), t0);
        let later = t0 + time::Duration::seconds(3);
        assert_eq!(at(later), later, "a wall clock ahead of the floor is used");
        assert_eq!(at(t0), later, "and then becomes the floor");
        assert!(now() >= later);
    }
}
