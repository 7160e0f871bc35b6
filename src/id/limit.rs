//! Optional per-address rate limit on minting client IDs (off by default). Minting costs the
//! server nothing to remember, so the limit exists only to blunt ID farming by one source;
//! mobile carriers put many phones behind one address, which is why it is off unless asked for.

use dashmap::DashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Most addresses tracked at once; past it idle buckets are dropped, and if none are idle the
/// new address is let through rather than letting the table grow.
const MAX_TRACKED: usize = 100_000;

/// A token bucket per source address (IPv6 by /64, the usual allocation to one subscriber).
#[derive(Debug)]
pub struct MintLimiter {
    per_second: f64,
    burst: f64,
    buckets: DashMap<IpAddr, Bucket>,
    origin: Instant,
    /// When the full table was last swept (milliseconds since `origin`): at most once a second,
    /// so a flood of new addresses cannot make every mint scan the table.
    last_sweep_ms: AtomicU64,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    /// Seconds since `origin` of the last refill.
    at: f64,
}

impl MintLimiter {
    /// Allows `per_second` mints per address on average, `burst` at once.
    pub fn new(per_second: f64, burst: u32) -> Self {
        MintLimiter {
            per_second,
            burst: f64::from(burst.max(1)),
            buckets: DashMap::new(),
            origin: Instant::now(),
            last_sweep_ms: AtomicU64::new(0),
        }
    }

    /// Takes one token for `addr`; false when the address is over its rate.
    pub fn allow(&self, addr: IpAddr) -> bool {
        let key = source_key(addr);
        let now = self.origin.elapsed().as_secs_f64();
        if self.buckets.len() >= MAX_TRACKED && !self.buckets.contains_key(&key) {
            let now_ms = (now * 1000.0) as u64;
            let last = self.last_sweep_ms.load(Ordering::Relaxed);
            if now_ms.saturating_sub(last) >= 1000
                && self
                    .last_sweep_ms
                    .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
            {
                let idle_after = self.burst / self.per_second;
                self.buckets.retain(|_, b| now - b.at < idle_after);
            }
            if self.buckets.len() >= MAX_TRACKED {
                return true;
            }
        }
        let mut bucket = self.buckets.entry(key).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let refill = (now - bucket.at) * self.per_second;
        bucket.tokens = (bucket.tokens + refill).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// IPv4 addresses as they are; IPv6 addresses by their /64 (IPv4-mapped ones as IPv4).
fn source_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_refuse_per_address() {
        let l = MintLimiter::new(0.001, 3);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(l.allow(a) && l.allow(a) && l.allow(a));
        assert!(!l.allow(a));
        assert!(l.allow(b));
    }

    #[test]
    fn ipv6_is_limited_per_64() {
        let l = MintLimiter::new(0.001, 1);
        assert!(l.allow("2001:db8::1".parse().unwrap()));
        assert!(!l.allow("2001:db8::ffff".parse().unwrap()));
        assert!(l.allow("2001:db8:0:1::1".parse().unwrap()));
        assert_eq!(
            source_key("::ffff:10.1.2.3".parse().unwrap()),
            "10.1.2.3".parse::<IpAddr>().unwrap()
        );
    }
}
