//! The reload signal (SIGHUP): one broadcast that several parts listen to. The access log
//! reopens its file (logrotate moves the old one away first); the HTTPS listener reloads its
//! certificate. `main` fires it; each part subscribes where it is built, with [`Reload::on_reload`]
//! or a receiver of its own from [`Reload::subscribe`].

use std::sync::Arc;
use tokio::sync::watch;

/// A cheap-clone handle on the reload broadcast. The value is the number of reloads so far.
#[derive(Clone, Debug)]
pub struct Reload {
    tx: Arc<watch::Sender<u64>>,
}

impl Default for Reload {
    fn default() -> Self {
        Reload {
            tx: Arc::new(watch::channel(0).0),
        }
    }
}

impl Reload {
    /// Tells every subscriber to reload.
    pub fn fire(&self) {
        self.tx.send_modify(|n| *n += 1);
    }

    /// A receiver that sees each later reload (`changed().await`); reloads fired while nobody
    /// looked coalesce into one.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }

    /// Runs `f` on the current runtime after every reload, until the broadcast is dropped.
    pub fn on_reload(&self, f: impl Fn() + Send + 'static) {
        let mut rx = self.subscribe();
        tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                f();
            }
        });
    }

    /// Reloads fired so far.
    pub fn count(&self) -> u64 {
        *self.tx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test]
    async fn every_subscriber_hears_a_reload() {
        let reload = Reload::default();
        let seen = Arc::new(AtomicU64::new(0));
        for _ in 0..2 {
            let seen = Arc::clone(&seen);
            reload.on_reload(move || {
                seen.fetch_add(1, Ordering::SeqCst);
            });
        }
        let mut rx = reload.subscribe();
        reload.fire();
        rx.changed().await.unwrap();
        assert_eq!(reload.count(), 1);
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while seen.load(Ordering::SeqCst) < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "a subscriber missed it"
            );
            tokio::task::yield_now().await;
        }
    }
}
