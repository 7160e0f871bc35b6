//! Memory and throughput of the session table at scale: RSS growth per tracked session, and
//! inserts and updates per second on two threads. Not a criterion bench: it measures the
//! process's resident memory, which needs a process of its own.
//!
//!   cargo bench --bench store_memory            # 10 million sessions
//!   ROAM_BENCH_SESSIONS=1000000 cargo bench --bench store_memory
//!
//! Under `cargo test` (no `--bench` argument) it runs a small smoke size.

use roam::session::clock::SessionClock;
use roam::session::table::Table;
use roam::session::{Epoch, FileKey, SessionKey};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn key(i: u64) -> SessionKey {
    // Client nonces are random; a multiplicative hash spreads them the same way.
    SessionKey {
        client: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        file: FileKey(i % 8),
    }
}

/// Runs `f(i)` for every i in 0..n split over `threads` threads; returns operations per second.
fn parallel(n: u64, threads: u64, f: impl Fn(u64) + Send + Sync + 'static) -> f64 {
    let f = Arc::new(f);
    let started = Instant::now();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let f = Arc::clone(&f);
            std::thread::spawn(move || {
                let mut i = t;
                while i < n {
                    f(i);
                    i += threads;
                }
            })
        })
        .collect();
    for h in handles {
        h.join().expect("worker thread");
    }
    n as f64 / started.elapsed().as_secs_f64()
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let n: u64 = std::env::var("ROAM_BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 10_000_000 } else { 10_000 });
    let store = Arc::new(Table::new(
        usize::MAX,
        Duration::from_secs(24 * 3600),
        Arc::new(SessionClock::default()),
        false,
    ));
    // Each record's epoch, kept outside the measured memory: `advance` needs its owner's.
    let epochs: Arc<Vec<AtomicU16>> = Arc::new((0..n).map(|_| AtomicU16::new(0)).collect());
    let before = rss_bytes();
    let (s, e) = (Arc::clone(&store), Arc::clone(&epochs));
    let inserts = parallel(n, 2, move |i| {
        let epoch = s.begin(key(i), 7, 0).expect("no cap");
        e[i as usize].store(epoch.0, Ordering::Relaxed);
    });
    let after = rss_bytes();
    let (s, e) = (Arc::clone(&store), Arc::clone(&epochs));
    let updates = parallel(n, 2, move |i| {
        s.advance(&key(i), Epoch(e[i as usize].load(Ordering::Relaxed)), i);
    });
    let s = Arc::clone(&store);
    let lookups = parallel(n, 2, move |i| {
        assert!(s.get(&key(i)).is_some());
    });
    assert_eq!(store.len() as u64, n);
    println!("sessions: {n}");
    println!(
        "RSS growth: {:.1} MB, {:.1} bytes per session",
        (after - before) as f64 / 1e6,
        (after.saturating_sub(before)) as f64 / n as f64
    );
    println!("inserts (2 threads): {:.2} M/s", inserts / 1e6);
    println!("updates (2 threads): {:.2} M/s", updates / 1e6);
    println!("lookups (2 threads): {:.2} M/s", lookups / 1e6);
}
