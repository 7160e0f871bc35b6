//! Readiness for a load balancer: a server is ready while it accepts new clients and its
//! progress store can be reached. Draining (after SIGTERM) and an unreachable store each make
//! `/readyz` answer 503, so the balancer stops sending new clients while those already here
//! finish or resume elsewhere. Liveness (`/healthz`) needs nothing but a running process.

use std::sync::atomic::{AtomicBool, Ordering};

/// Whether the server still takes new clients. Set once, when shutdown starts.
#[derive(Debug, Default)]
pub struct Health {
    draining: AtomicBool,
}

impl Health {
    /// The server stopped accepting: from now on it only finishes what it has.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::Relaxed);
    }

    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }
}

/// What `/readyz` says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Readiness {
    Ready,
    /// Shutting down: no longer accepting.
    Draining,
    /// The progress store cannot be reached or written (the reason, for the operator).
    StoreUnavailable(String),
}
