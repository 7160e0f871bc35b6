//! The clock sessions expire by: wall-clock seconds, so that idle time counts across restarts
//! (a durable store keeps when each record was last touched), but advanced by the monotonic
//! clock while the process runs, so that a step of the system clock neither expires every
//! session at once nor keeps them forever. Tests inject a [`ManualClock`].

use std::fmt::Debug;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch, as sessions count them.
pub trait Clock: Send + Sync + Debug + 'static {
    fn now(&self) -> u64;
}

/// The wall clock read once at start (never earlier than `not_before`, the newest time a
/// durable store recorded), then advanced by the monotonic clock.
#[derive(Debug)]
pub struct SessionClock {
    start_wall: u64,
    start: Instant,
}

impl SessionClock {
    /// A clock starting now. `not_before`: a time this clock must not go behind (the last time a
    /// durable store recorded: a system clock set back across a restart must not make stored
    /// sessions younger, or older ones than they are look new).
    pub fn new(not_before: u64) -> Self {
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        SessionClock {
            start_wall: wall.max(not_before),
            start: Instant::now(),
        }
    }
}

impl Default for SessionClock {
    fn default() -> Self {
        SessionClock::new(0)
    }
}

impl Clock for SessionClock {
    fn now(&self) -> u64 {
        self.start_wall + self.start.elapsed().as_secs()
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    pub fn at(secs: u64) -> Self {
        ManualClock(AtomicU64::new(secs))
    }

    pub fn advance(&self, secs: u64) {
        self.0.fetch_add(secs, Ordering::SeqCst);
    }

    pub fn set(&self, secs: u64) {
        self.0.store(secs, Ordering::SeqCst);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::SeqCst)
    }
}

impl<C: Clock> Clock for std::sync::Arc<C> {
    fn now(&self) -> u64 {
        (**self).now()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_clock_never_goes_before_the_stored_time() {
        let far = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 10_000;
        assert!(SessionClock::new(far).now() >= far);
        let c = SessionClock::default();
        assert!(c.now() > 1_600_000_000);
    }
}
