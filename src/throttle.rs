//! Log throttling: failures that are ours (descriptor exhaustion, a store that cannot be
//! written) come in bursts, so they are logged at most once a second with the count of lines
//! held back, never once per request.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// Admits one log line per second and counts the lines it held back.
#[derive(Debug)]
pub struct LogThrottle {
    last_second: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for LogThrottle {
    fn default() -> Self {
        Self::new()
    }
}

impl LogThrottle {
    pub const fn new() -> Self {
        LogThrottle {
            last_second: AtomicU64::new(u64::MAX),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(lines suppressed since the last admitted one)` if this line may be logged.
    pub fn admit(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_second.load(Relaxed);
        if last != now
            && self
                .last_second
                .compare_exchange(last, now, Relaxed, Relaxed)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Relaxed));
        }
        self.suppressed.fetch_add(1, Relaxed);
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_second_and_a_count_of_the_rest() {
        let t = LogThrottle::new();
        assert_eq!(t.admit(), Some(0));
        let mut held = 0;
        for _ in 0..10 {
            if t.admit().is_none() {
                held += 1;
            }
        }
        // At most one more line got through if the second turned meanwhile.
        assert!(held >= 9);
    }
}
