//! What an operator sees and steers: Prometheus metrics (`metrics`), the admin listener with
//! `/metrics`, `/healthz` and `/readyz` (`admin`, readiness in `health`), the access log
//! (`access_log`), the SIGHUP reload broadcast (`reload`) and systemd readiness notification
//! (`notify`).
//!
//! Where they hook in: the connection counts responses, body bytes and durations and hands each
//! finished response to the access log (`conn`); the request path counts resumes and minted IDs
//! (`respond`); the session layer counts takeovers (`session::owners`); the write-behind layer
//! times batches and counts store errors (`session::writebehind`, `session::store`); the accept
//! loop marks the drain (`server`).

pub mod access_log;
pub mod admin;
pub mod health;
pub mod metrics;
pub mod notify;
pub mod reload;

use self::access_log::AccessLog;
use self::health::Health;
use self::metrics::Metrics;
use self::reload::Reload;

/// The operability parts a server shares, one per server.
#[derive(Debug, Default)]
pub struct Ops {
    pub metrics: Metrics,
    pub access_log: AccessLog,
    pub reload: Reload,
    pub health: Health,
}

impl Ops {
    /// Metrics in `metrics` (the registry the session layer already counts into), no access
    /// log.
    pub fn new(metrics: Metrics) -> Ops {
        Ops {
            metrics,
            ..Ops::default()
        }
    }
}
