//! Prometheus metrics (prometheus-client): one registry per server, and the handles the request
//! path, the session layer and the store stack increment. Every handle is resolved once, when
//! [`Metrics::new`] builds the registry: a counter is an `Arc<AtomicU64>`, so counting a response
//! is one relaxed atomic add, with no label lookup per request, and the request duration
//! histogram ([`DurationHistogram`]) is lock-free too.
//!
//! Names are a contract with dashboards and alerts (docs/OPERATIONS.md lists them with their
//! meaning); rename nothing without a note there.
//!
//! The HTTPS listener counts handshakes through [`Metrics::tls`] (`conn::tls`). Hooks for work
//! that lands later: `roam_takeovers_total{scope="remote"}` through [`Metrics::takeovers`], and
//! a shared store's errors through [`StoreMetrics::error`] (the write-behind layer already
//! times every batch and counts its failures, whatever the backend).

use crate::http::response::Status;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// `roam_request_duration_seconds` buckets: from a cached 1 KiB answer (well under a
/// millisecond on a LAN) to a multi-gigabyte download over a phone (an hour).
pub const REQUEST_DURATION_BUCKETS: [f64; 19] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 300.0, 900.0, 3600.0,
];

/// `roam_store_flush_seconds` buckets: one `fdatasync` on an SSD takes about a millisecond; a
/// disk under pressure or a remote store, up to seconds.
pub const STORE_FLUSH_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The `Content-Type` of [`Metrics::render`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Label = [(&'static str, &'static str); 1];

/// Every status roam sends, in the order of [`status_slot`].
const STATUSES: [Status; 14] = [
    Status::Ok,
    Status::PartialContent,
    Status::NotModified,
    Status::BadRequest,
    Status::NotFound,
    Status::MethodNotAllowed,
    Status::RequestTimeout,
    Status::PreconditionFailed,
    Status::UriTooLong,
    Status::RangeNotSatisfiable,
    Status::TooManyRequests,
    Status::HeadersTooLarge,
    Status::InternalServerError,
    Status::ServiceUnavailable,
];

/// The index of `status` in [`STATUSES`] (exhaustive: a new status must get a counter).
fn status_slot(status: Status) -> usize {
    match status {
        Status::Ok => 0,
        Status::PartialContent => 1,
        Status::NotModified => 2,
        Status::BadRequest => 3,
        Status::NotFound => 4,
        Status::MethodNotAllowed => 5,
        Status::RequestTimeout => 6,
        Status::PreconditionFailed => 7,
        Status::UriTooLong => 8,
        Status::RangeNotSatisfiable => 9,
        Status::TooManyRequests => 10,
        Status::HeadersTooLarge => 11,
        Status::InternalServerError => 12,
        Status::ServiceUnavailable => 13,
    }
}

/// The status code as a label value, without formatting per request.
fn status_label(status: Status) -> &'static str {
    match status {
        Status::Ok => "200",
        Status::PartialContent => "206",
        Status::NotModified => "304",
        Status::BadRequest => "400",
        Status::NotFound => "404",
        Status::MethodNotAllowed => "405",
        Status::RequestTimeout => "408",
        Status::PreconditionFailed => "412",
        Status::UriTooLong => "414",
        Status::RangeNotSatisfiable => "416",
        Status::TooManyRequests => "429",
        Status::HeadersTooLarge => "431",
        Status::InternalServerError => "500",
        Status::ServiceUnavailable => "503",
    }
}

/// How a download came to start past byte 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResumeHow {
    /// A request without `Range` that the server resumed from the session.
    Implicit,
    /// A request that stated its position (`Range: bytes=N-` with N > 0).
    Declared,
}

/// Where the sender a takeover stopped was.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TakeoverScope {
    /// On this process.
    Local,
    /// On another node sharing the store (asked through `RemoteOwners`).
    Remote,
}

/// How a TLS handshake ended (for the HTTPS listener).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsHandshake {
    Ok,
    /// The peer sent something that is not a TLS handshake we accept, or closed mid-way.
    Failed,
    /// The handshake did not finish within the header timeout.
    TimedOut,
}

/// The store stack's handles: batch timings and errors, whatever the backend.
#[derive(Clone, Debug)]
pub struct StoreMetrics {
    flush_seconds: Histogram,
    errors: Counter,
}

impl Default for StoreMetrics {
    /// Handles registered nowhere (a store built outside a server: benches, unit tests).
    fn default() -> Self {
        StoreMetrics {
            flush_seconds: Histogram::new(STORE_FLUSH_BUCKETS),
            errors: Counter::default(),
        }
    }
}

impl StoreMetrics {
    /// One batch committed (or failed) after `took`.
    pub fn flushed(&self, took: Duration) {
        self.flush_seconds.observe(took.as_secs_f64());
    }

    /// One failed store operation: a batch, a read, an expiry, a begin in a shared store.
    pub fn error(&self) {
        self.errors.inc();
    }

    /// Errors counted so far.
    pub fn errors(&self) -> u64 {
        self.errors.get()
    }
}

/// TLS handshake counters, each resolved on its first use (a server without HTTPS exposes
/// none).
#[derive(Debug)]
pub struct TlsMetrics {
    family: Family<Label, Counter>,
    resolved: [OnceLock<Counter>; 3],
}

impl TlsMetrics {
    /// Counts one handshake.
    pub fn handshake(&self, result: TlsHandshake) {
        let (slot, value) = match result {
            TlsHandshake::Ok => (0, "ok"),
            TlsHandshake::Failed => (1, "failed"),
            TlsHandshake::TimedOut => (2, "timeout"),
        };
        self.resolved[slot]
            .get_or_init(|| self.family.get_or_create_owned(&[("result", value)]))
            .inc();
    }
}

/// A histogram observed once per response, by every worker thread: each bucket's count and the
/// sum (in nanoseconds) are atomics, so observing is two relaxed atomic adds and never takes a
/// lock. (prometheus-client's `Histogram` keeps its state behind a mutex, which every worker
/// would take once per response.) Exposed as a classic histogram with explicit buckets.
#[derive(Clone, Debug)]
pub struct DurationHistogram {
    inner: Arc<DurationBuckets>,
}

#[derive(Debug)]
struct DurationBuckets {
    /// Upper bounds in seconds, ascending; one more count than bounds, for `+Inf`.
    bounds: &'static [f64],
    /// Per-bucket (not cumulative) counts: `counts[i]` counts the observations in
    /// (`bounds[i-1]`, `bounds[i]`]; the last, those above every bound.
    counts: Box<[AtomicU64]>,
    sum_nanos: AtomicU64,
}

impl DurationHistogram {
    /// A histogram with `bounds` (seconds, ascending).
    pub fn new(bounds: &'static [f64]) -> Self {
        debug_assert!(bounds.windows(2).all(|w| w[0] < w[1]));
        DurationHistogram {
            inner: Arc::new(DurationBuckets {
                bounds,
                counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
                sum_nanos: AtomicU64::new(0),
            }),
        }
    }

    pub fn observe(&self, took: Duration) {
        let secs = took.as_secs_f64();
        let slot = self.inner.bounds.partition_point(|&b| b < secs);
        self.inner.counts[slot].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.inner.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let d = &self.inner;
        // Count and buckets come from one read of the counts, so they agree; the sum may
        // include an observation they do not yet show.
        let buckets: Vec<(f64, u64)> = d
            .bounds
            .iter()
            .copied()
            .chain(std::iter::once(f64::INFINITY))
            .zip(d.counts.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let count = buckets.iter().map(|(_, n)| n).sum();
        let sum = d.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

/// The server's metrics: a cheap-clone handle.
#[derive(Clone, Debug)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    responses: [Counter; STATUSES.len()],
    bytes_sent: Counter,
    bytes_acked: Counter,
    resumes_implicit: Counter,
    resumes_declared: Counter,
    takeovers_local: Counter,
    takeovers_remote: Counter,
    ids_minted: Counter,
    sessions: Gauge,
    connections: Gauge,
    request_duration: DurationHistogram,
    store: StoreMetrics,
    tls: TlsMetrics,
    access_log_dropped: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A registry with every roam metric, each series at zero.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let responses_family = Family::<Label, Counter>::default();
        let responses =
            STATUSES.map(|s| responses_family.get_or_create_owned(&[("status", status_label(s))]));
        registry.register(
            "roam_responses",
            "Responses by status code, counted when their head is sent",
            responses_family,
        );
        let bytes_sent = Counter::default();
        registry.register(
            "roam_bytes_sent",
            "Response body bytes handed to the kernel",
            bytes_sent.clone(),
        );
        let bytes_acked = Counter::default();
        registry.register(
            "roam_bytes_acked",
            "Response body bytes the clients' TCP acknowledged",
            bytes_acked.clone(),
        );
        let resumes = Family::<Label, Counter>::default();
        let resumes_implicit = resumes.get_or_create_owned(&[("how", "implicit")]);
        let resumes_declared = resumes.get_or_create_owned(&[("how", "declared")]);
        registry.register(
            "roam_resumes",
            "Downloads started past byte 0: implicit (no Range, from the session) or declared \
             (Range: bytes=N-)",
            resumes,
        );
        let takeovers = Family::<Label, Counter>::default();
        let takeovers_local = takeovers.get_or_create_owned(&[("scope", "local")]);
        let takeovers_remote = takeovers.get_or_create_owned(&[("scope", "remote")]);
        registry.register(
            "roam_takeovers",
            "Senders stopped because the same client asked for the same file again",
            takeovers,
        );
        let ids_minted = Counter::default();
        registry.register(
            "roam_ids_minted",
            "Client IDs handed out (GET /)",
            ids_minted.clone(),
        );
        let sessions = Gauge::default();
        registry.register(
            "roam_sessions",
            "Download sessions held (the disk store's count may include replaced records until \
             they are compacted)",
            sessions.clone(),
        );
        let connections = Gauge::default();
        registry.register(
            "roam_connections",
            "Client connections open on the public listener",
            connections.clone(),
        );
        let request_duration = DurationHistogram::new(&REQUEST_DURATION_BUCKETS);
        registry.register(
            "roam_request_duration_seconds",
            "From a request's head to the last byte of its response handed to the kernel \
             (responses sent whole)",
            request_duration.clone(),
        );
        let store = StoreMetrics::default();
        registry.register(
            "roam_store_flush_seconds",
            "Time to commit one batch of session changes to the store",
            store.flush_seconds.clone(),
        );
        registry.register(
            "roam_store_errors",
            "Failed session store operations (batches, reads, expiry)",
            store.errors.clone(),
        );
        let tls = TlsMetrics {
            family: Family::default(),
            resolved: Default::default(),
        };
        registry.register(
            "roam_tls_handshakes",
            "TLS handshakes by result (ok, failed, timeout)",
            tls.family.clone(),
        );
        let access_log_dropped = Counter::default();
        registry.register(
            "roam_access_log_dropped_lines",
            "Access log lines lost: the buffer was full or the log could not be written",
            access_log_dropped.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                responses,
                bytes_sent,
                bytes_acked,
                resumes_implicit,
                resumes_declared,
                takeovers_local,
                takeovers_remote,
                ids_minted,
                sessions,
                connections,
                request_duration,
                store,
                tls,
                access_log_dropped,
            }),
        }
    }

    /// Counts a response whose head is being sent.
    pub fn response(&self, status: Status) {
        self.inner.responses[status_slot(status)].inc();
    }

    /// Adds body bytes handed to the kernel and body bytes acknowledged.
    pub fn body_bytes(&self, sent: u64, acked: u64) {
        if sent > 0 {
            self.inner.bytes_sent.inc_by(sent);
        }
        if acked > 0 {
            self.inner.bytes_acked.inc_by(acked);
        }
    }

    /// A response sent whole, `took` after its request's head arrived.
    pub fn request_done(&self, took: Duration) {
        self.inner.request_duration.observe(took);
    }

    pub fn resume(&self, how: ResumeHow) {
        match how {
            ResumeHow::Implicit => self.inner.resumes_implicit.inc(),
            ResumeHow::Declared => self.inner.resumes_declared.inc(),
        };
    }

    /// The takeover counter for `scope` (a handle, kept by whoever stops senders).
    pub fn takeovers(&self, scope: TakeoverScope) -> Counter {
        match scope {
            TakeoverScope::Local => self.inner.takeovers_local.clone(),
            TakeoverScope::Remote => self.inner.takeovers_remote.clone(),
        }
    }

    pub fn id_minted(&self) {
        self.inner.ids_minted.inc();
    }

    /// Counts an open connection until the returned guard is dropped.
    pub fn connection(&self) -> ConnectionGauge {
        self.inner.connections.inc();
        ConnectionGauge(self.inner.connections.clone())
    }

    /// The store stack's handles.
    pub fn store(&self) -> StoreMetrics {
        self.inner.store.clone()
    }

    /// TLS handshake counters.
    pub fn tls(&self) -> &TlsMetrics {
        &self.inner.tls
    }

    /// The counter of access log lines lost.
    pub fn access_log_dropped(&self) -> Counter {
        self.inner.access_log_dropped.clone()
    }

    /// The exposition, with the gauges read at scrape time set first.
    pub fn render(&self, sessions: usize) -> String {
        self.inner
            .sessions
            .set(i64::try_from(sessions).unwrap_or(i64::MAX));
        let mut out = String::with_capacity(8 * 1024);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.inner.registry);
        out
    }
}

/// An open connection, counted in `roam_connections` while it lives.
#[derive(Debug)]
pub struct ConnectionGauge(Gauge);

impl Drop for ConnectionGauge {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The value of the series `name` (with its labels, as exposed) in `text`.
    fn value(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn every_name_the_dashboards_rely_on_is_exposed() {
        let m = Metrics::new();
        m.response(Status::PartialContent);
        m.response(Status::PartialContent);
        m.body_bytes(100, 60);
        m.resume(ResumeHow::Declared);
        m.takeovers(TakeoverScope::Local).inc();
        m.id_minted();
        let _c = m.connection();
        m.request_done(Duration::from_millis(3));
        m.store().flushed(Duration::from_millis(2));
        m.store().error();
        let text = m.render(7);
        assert_eq!(
            value(&text, "roam_responses_total{status=\"206\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "roam_responses_total{status=\"404\"}"),
            Some(0.0)
        );
        assert_eq!(value(&text, "roam_bytes_sent_total"), Some(100.0));
        assert_eq!(value(&text, "roam_bytes_acked_total"), Some(60.0));
        assert_eq!(
            value(&text, "roam_resumes_total{how=\"declared\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "roam_resumes_total{how=\"implicit\"}"),
            Some(0.0)
        );
        assert_eq!(
            value(&text, "roam_takeovers_total{scope=\"local\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "roam_takeovers_total{scope=\"remote\"}"),
            Some(0.0)
        );
        assert_eq!(value(&text, "roam_ids_minted_total"), Some(1.0));
        assert_eq!(value(&text, "roam_sessions"), Some(7.0));
        assert_eq!(value(&text, "roam_connections"), Some(1.0));
        assert_eq!(
            value(&text, "roam_request_duration_seconds_bucket{le=\"0.005\"}"),
            Some(1.0)
        );
        assert_eq!(
            value(&text, "roam_request_duration_seconds_bucket{le=\"0.0025\"}"),
            Some(0.0)
        );
        assert_eq!(value(&text, "roam_store_flush_seconds_count"), Some(1.0));
        assert_eq!(value(&text, "roam_store_errors_total"), Some(1.0));
        assert!(
            !text.contains("roam_tls_handshakes"),
            "nothing before HTTPS"
        );
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn the_duration_histogram_counts_bounds_inclusively_and_loses_nothing_across_threads() {
        let m = Metrics::new();
        m.request_done(Duration::from_millis(1));
        m.request_done(Duration::from_secs(2 * 3600));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for _ in 0..10_000 {
                        m.request_done(Duration::from_micros(700));
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = m.render(0);
        let series = |le: &str| {
            value(
                &text,
                &format!("roam_request_duration_seconds_bucket{{le=\"{le}\"}}"),
            )
        };
        assert_eq!(series("0.0005"), Some(0.0));
        // A bound is inclusive: 1 ms is in le="0.001", with the 40,000 of 0.7 ms.
        assert_eq!(series("0.001"), Some(40_001.0));
        assert_eq!(series("3600.0"), Some(40_001.0));
        assert_eq!(series("+Inf"), Some(40_002.0));
        assert_eq!(
            value(&text, "roam_request_duration_seconds_count"),
            Some(40_002.0)
        );
        let sum = value(&text, "roam_request_duration_seconds_sum").unwrap();
        assert!((sum - (0.001 + 7200.0 + 28.0)).abs() < 1e-6, "{sum}");
        assert!(text.contains("# TYPE roam_request_duration_seconds histogram"));
    }

    #[test]
    fn connections_are_counted_while_open_and_tls_series_appear_on_use() {
        let m = Metrics::new();
        let a = m.connection();
        let b = m.connection();
        drop(a);
        assert_eq!(value(&m.render(0), "roam_connections"), Some(1.0));
        drop(b);
        assert_eq!(value(&m.render(0), "roam_connections"), Some(0.0));
        m.tls().handshake(TlsHandshake::Ok);
        m.tls().handshake(TlsHandshake::Ok);
        m.tls().handshake(TlsHandshake::TimedOut);
        let text = m.render(0);
        assert_eq!(
            value(&text, "roam_tls_handshakes_total{result=\"ok\"}"),
            Some(2.0)
        );
        assert_eq!(
            value(&text, "roam_tls_handshakes_total{result=\"timeout\"}"),
            Some(1.0)
        );
    }
}
