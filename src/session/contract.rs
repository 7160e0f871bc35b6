//! The contract every backend passes, written once: [`contract_tests!`] expands into the whole
//! suite for a factory that makes a fresh backend from a clock, a session cap and a TTL.
//!
//! What it holds a backend to: a begin creates or renews a record under a new epoch; a report
//! from an older epoch never moves a record (fencing); offsets never move backwards within an
//! epoch, while a begin may set any offset (a declared position); the end state is kept; the
//! session cap refuses new keys only; `Expect` guards begins; idle records expire by the
//! injected clock (no sleeps); concurrent begins and reports from several threads keep those
//! rules; and random operation sequences agree with a simple model.
//!
//! Longer than most files because the contract reads best in one place: each rule, then the
//! model it is checked against.
#![cfg(test)]

use super::backend::{Backend, Begin, BeginError, Expect, Report};
use super::clock::ManualClock;
use super::key::{Ended, Epoch, FileKey, Record, SessionKey};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// Makes a fresh, empty backend.
pub type Factory = fn(Arc<ManualClock>, usize, Duration) -> Arc<dyn Backend>;

pub const T0: u64 = 1_800_000_000;

pub fn key(n: u64) -> SessionKey {
    SessionKey {
        client: 0x5eed_0000 + n,
        file: FileKey(n.wrapping_mul(0x9e37_79b9_7f4a_7c15)),
    }
}

fn begin(version: u32, offset: u64) -> Begin {
    Begin {
        version,
        offset,
        expect: Expect::Any,
    }
}

fn progress(key: SessionKey, epoch: Epoch, offset: u64, ended: Ended) -> Report {
    Report::Progress {
        key,
        epoch,
        offset,
        ended,
    }
}

/// `len()` is `n`: exactly, or at least for a backend that only estimates it.
fn assert_len(b: &dyn Backend, n: usize) {
    if b.len_is_exact() {
        assert_eq!(b.len(), n);
    } else {
        assert!(b.len() >= n, "an estimate of {n} records said {}", b.len());
    }
}

async fn read(b: &dyn Backend, k: SessionKey) -> Option<Record> {
    b.read(k).await.expect("read").map(|s| s.record)
}

pub async fn begin_creates_then_renews(f: Factory) {
    let b = f(
        Arc::new(ManualClock::at(T0)),
        100,
        Duration::from_secs(3600),
    );
    let k = key(1);
    assert_eq!(read(&*b, k).await, None);
    let e1 = b.begin(k, begin(7, 100)).await.unwrap();
    assert_eq!(
        read(&*b, k).await,
        Some(Record {
            offset: 100,
            version: 7,
            epoch: e1,
            ended: Ended::Sending
        })
    );
    let e2 = b.begin(k, begin(8, 5)).await.unwrap();
    assert_ne!(e1, e2, "a renewed record has a new epoch");
    let r = read(&*b, k).await.unwrap();
    assert_eq!((r.offset, r.version, r.epoch), (5, 8, e2));
    assert_len(&*b, 1);
}

pub async fn a_stale_epoch_never_moves_the_record(f: Factory) {
    let b = f(
        Arc::new(ManualClock::at(T0)),
        100,
        Duration::from_secs(3600),
    );
    let k = key(2);
    let old = b.begin(k, begin(1, 0)).await.unwrap();
    let new = b.begin(k, begin(1, 500)).await.unwrap();
    let c = b
        .commit(vec![progress(k, old, 900, Ended::Peer)])
        .await
        .unwrap();
    assert_eq!((c.applied, c.stale), (0, 1));
    let r = read(&*b, k).await.unwrap();
    assert_eq!((r.offset, r.epoch, r.ended), (500, new, Ended::Sending));
    // Progress for a key with no record is stale too.
    let c = b
        .commit(vec![progress(key(99), old, 1, Ended::Clean)])
        .await
        .unwrap();
    assert_eq!(c.stale, 1);
    assert_eq!(read(&*b, key(99)).await, None);
}

pub async fn offsets_move_forward_only_within_an_epoch(f: Factory) {
    let b = f(
        Arc::new(ManualClock::at(T0)),
        100,
        Duration::from_secs(3600),
    );
    let k = key(3);
    let e = b.begin(k, begin(1, 100)).await.unwrap();
    b.commit(vec![
        progress(k, e, 150, Ended::Sending),
        progress(k, e, 120, Ended::Sending),
    ])
    .await
    .unwrap();
    assert_eq!(read(&*b, k).await.unwrap().offset, 150);
    b.commit(vec![progress(k, e, 400, Ended::Network)])
        .await
        .unwrap();
    let r = read(&*b, k).await.unwrap();
    assert_eq!((r.offset, r.ended), (400, Ended::Network));
    // A declared position may move backwards: a new epoch is the client's word.
    let d = b.begin(k, begin(1, 10)).await.unwrap();
    assert_eq!(read(&*b, k).await.unwrap().offset, 10);
    b.commit(vec![progress(k, d, 20, Ended::Clean)])
        .await
        .unwrap();
    let r = read(&*b, k).await.unwrap();
    assert_eq!((r.offset, r.ended), (20, Ended::Clean));
}

pub async fn snapshots_replace_records_of_exclusive_stores(f: Factory) {
    let b = f(
        Arc::new(ManualClock::at(T0)),
        100,
        Duration::from_secs(3600),
    );
    if !b.exclusive() {
        return;
    }
    let k = key(4);
    let record = Record {
        offset: 77,
        version: 3,
        epoch: Epoch(41),
        ended: Ended::Peer,
    };
    b.commit(vec![Report::Snapshot { key: k, record }])
        .await
        .unwrap();
    assert_eq!(read(&*b, k).await, Some(record));
    // The snapshot's epoch is the current one: its progress applies, older ones do not.
    b.commit(vec![
        progress(k, Epoch(40), 500, Ended::Clean),
        progress(k, Epoch(41), 90, Ended::Network),
    ])
    .await
    .unwrap();
    let r = read(&*b, k).await.unwrap();
    assert_eq!((r.offset, r.ended), (90, Ended::Network));
}

pub async fn the_cap_refuses_new_keys_only(f: Factory) {
    let b = f(Arc::new(ManualClock::at(T0)), 2, Duration::from_secs(3600));
    b.begin(key(1), begin(1, 0)).await.unwrap();
    b.begin(key(2), begin(1, 0)).await.unwrap();
    assert!(matches!(
        b.begin(key(3), begin(1, 0)).await,
        Err(BeginError::Full(_))
    ));
    assert!(b.begin(key(1), begin(1, 5)).await.is_ok());
    assert_eq!(read(&*b, key(3)).await, None);
}

pub async fn expect_guards_begins(f: Factory) {
    let b = f(
        Arc::new(ManualClock::at(T0)),
        100,
        Duration::from_secs(3600),
    );
    let k = key(5);
    let e = b
        .begin(
            k,
            Begin {
                expect: Expect::Absent,
                ..begin(1, 0)
            },
        )
        .await
        .unwrap();
    for wrong in [Expect::Absent, Expect::Epoch(e.next())] {
        assert!(matches!(
            b.begin(
                k,
                Begin {
                    expect: wrong,
                    ..begin(1, 9)
                }
            )
            .await,
            Err(BeginError::Conflict)
        ));
    }
    assert_eq!(read(&*b, k).await.unwrap().offset, 0);
    let e2 = b
        .begin(
            k,
            Begin {
                expect: Expect::Epoch(e),
                ..begin(1, 9)
            },
        )
        .await
        .unwrap();
    assert_ne!(e, e2);
    assert!(matches!(
        b.begin(
            key(6),
            Begin {
                expect: Expect::Epoch(e),
                ..begin(1, 0)
            }
        )
        .await,
        Err(BeginError::Conflict)
    ));
}

pub async fn idle_records_expire_by_the_clock(f: Factory) {
    let clock = Arc::new(ManualClock::at(T0));
    let b = f(Arc::clone(&clock), 100, Duration::from_secs(600));
    let (old, busy) = (key(7), key(8));
    b.begin(old, begin(1, 0)).await.unwrap();
    let e = b.begin(busy, begin(1, 0)).await.unwrap();
    clock.advance(500);
    // Progress refreshes a record.
    b.commit(vec![progress(busy, e, 10, Ended::Sending)])
        .await
        .unwrap();
    clock.advance(200);
    // A store that expires records itself counts nothing when swept.
    let swept = |n: usize| if b.expires_itself() { 0 } else { n };
    assert_eq!(
        b.expire().await.unwrap(),
        swept(1),
        "700 s idle > 600 s TTL"
    );
    assert_eq!(read(&*b, old).await, None);
    assert_eq!(read(&*b, busy).await.unwrap().offset, 10, "200 s idle");
    clock.advance(400);
    assert_eq!(
        b.expire().await.unwrap(),
        0,
        "600 s idle is not longer than the TTL"
    );
    assert_eq!(read(&*b, busy).await.unwrap().offset, 10, "600 s idle");
    clock.advance(60);
    assert_eq!(b.expire().await.unwrap(), swept(1));
    assert_eq!(read(&*b, busy).await, None);
    assert_len(&*b, 0);
    // Progress on an expired record is stale: it does not bring the record back.
    let c = b
        .commit(vec![progress(busy, e, 20, Ended::Sending)])
        .await
        .unwrap();
    assert_eq!(c.stale, 1);
    assert_eq!(read(&*b, busy).await, None);
    // A record re-created after expiry works as new.
    b.begin(old, begin(2, 3)).await.unwrap();
    assert_eq!(read(&*b, old).await.unwrap().version, 2);
}

/// Several threads begin and report on a shared session and on sessions of their own. After
/// they finish: each private session holds its owner's highest report; the shared session's
/// epoch is one a thread began, and its offset is the highest report made under that epoch
/// (or its begin offset).
pub async fn concurrent_begins_and_reports_keep_the_rules(f: Factory) {
    let b = f(
        Arc::new(ManualClock::at(T0)),
        10_000,
        Duration::from_secs(3600),
    );
    let shared = key(1000);
    let mut tasks = Vec::new();
    for t in 0..4u64 {
        let b = Arc::clone(&b);
        tasks.push(tokio::spawn(async move {
            let mine = key(2000 + t);
            let mut log: Vec<(Epoch, u64, Vec<u64>)> = Vec::new();
            let me = b.begin(mine, begin(1, 0)).await.unwrap();
            for round in 0..20u64 {
                let start = t * 1_000_000 + round * 1000;
                let e = b.begin(shared, begin(1, start)).await.unwrap();
                let mut reported = Vec::new();
                for step in 1..=10u64 {
                    let off = start + step * 7;
                    b.commit(vec![
                        progress(shared, e, off, Ended::Sending),
                        progress(mine, me, round * 10 + step, Ended::Sending),
                    ])
                    .await
                    .unwrap();
                    reported.push(off);
                    tokio::task::yield_now().await;
                }
                log.push((e, start, reported));
            }
            log
        }));
    }
    let mut logs = Vec::new();
    for t in tasks {
        logs.extend(t.await.unwrap());
    }
    for t in 0..4u64 {
        assert_eq!(read(&*b, key(2000 + t)).await.unwrap().offset, 200);
    }
    let r = read(&*b, shared).await.unwrap();
    let owner: Vec<_> = logs.iter().filter(|(e, _, _)| *e == r.epoch).collect();
    assert!(
        !owner.is_empty(),
        "the shared record's epoch was begun by a thread"
    );
    // Epochs can repeat only after 65,536 begins; here each is unique.
    assert_eq!(owner.len(), 1);
    let (_, start, reported) = owner[0];
    let expected = reported.iter().copied().max().unwrap_or(*start);
    assert!(
        r.offset == expected || reported.contains(&r.offset) || r.offset == *start,
        "offset {} is not the begin or a report of its epoch",
        r.offset
    );
    assert_eq!(
        r.offset, expected,
        "the highest report of the current epoch"
    );
}

/// One step of a random operation sequence.
#[derive(Clone, Debug)]
pub enum Op {
    Begin {
        key: u8,
        version: u32,
        offset: u64,
    },
    /// Progress under the key's current epoch (`stale`: under its previous one).
    Progress {
        key: u8,
        offset: u64,
        stale: bool,
    },
    End {
        key: u8,
        ended: u8,
    },
    Tick {
        secs: u64,
    },
    Expire,
}

/// The model: what each key's record must be.
#[derive(Clone, Copy, Debug)]
struct Modeled {
    record: Record,
    previous: Option<Epoch>,
    touched: u64,
}

/// Runs `ops` against a fresh backend and against the model, comparing every record after
/// every step.
pub async fn agrees_with_the_model(f: Factory, ops: Vec<Op>) {
    const TTL: u64 = 1000;
    let clock = Arc::new(ManualClock::at(T0));
    let b = f(Arc::clone(&clock), 1000, Duration::from_secs(TTL));
    let mut model: HashMap<u8, Modeled> = HashMap::new();
    let mut last_expire = clock.now_secs();
    for op in ops {
        // The server's sweeper runs 16 times per TTL; a record is never left unexamined for
        // many TTLs (its touch stamp wraps after two), so neither is one here.
        let op = match op {
            Op::Tick { secs } if clock.now_secs() + secs - last_expire > TTL => {
                clock.advance(secs);
                Op::Expire
            }
            other => other,
        };
        match op {
            Op::Begin {
                key: k,
                version,
                offset,
            } => {
                let e = b
                    .begin(key(k.into()), begin(version, offset))
                    .await
                    .unwrap();
                let previous = model.get(&k).map(|m| m.record.epoch);
                assert_ne!(Some(e), previous, "a begin returns a new epoch");
                model.insert(
                    k,
                    Modeled {
                        record: Record {
                            offset,
                            version,
                            epoch: e,
                            ended: Ended::Sending,
                        },
                        previous,
                        touched: clock.now_secs(),
                    },
                );
            }
            Op::Progress {
                key: k,
                offset,
                stale,
            } => {
                let Some(m) = model.get_mut(&k) else { continue };
                let epoch = if stale {
                    match m.previous {
                        Some(p) => p,
                        None => continue,
                    }
                } else {
                    m.record.epoch
                };
                b.commit(vec![progress(key(k.into()), epoch, offset, m.record.ended)])
                    .await
                    .unwrap();
                if !stale {
                    m.record.offset = m.record.offset.max(offset);
                    m.touched = clock.now_secs();
                }
            }
            Op::End { key: k, ended } => {
                let Some(m) = model.get_mut(&k) else { continue };
                let ended = Ended::from_bits(ended);
                b.commit(vec![progress(
                    key(k.into()),
                    m.record.epoch,
                    m.record.offset,
                    ended,
                )])
                .await
                .unwrap();
                m.record.ended = ended;
                m.touched = clock.now_secs();
            }
            Op::Tick { secs } => {
                clock.advance(secs);
                if b.expires_itself() {
                    let now = clock.now_secs();
                    model.retain(|_, m| now - m.touched <= TTL);
                }
            }
            Op::Expire => {
                b.expire().await.unwrap();
                let now = clock.now_secs();
                last_expire = now;
                // Expiry is exact to the touch unit (1 s for this TTL): idle strictly longer
                // than the TTL goes, idle for at most the TTL stays.
                model.retain(|_, m| now - m.touched <= TTL);
            }
        }
        for (k, m) in &model {
            assert_eq!(
                read(&*b, key((*k).into())).await,
                Some(m.record),
                "key {k} after {:?}",
                m
            );
        }
    }
}

trait NowSecs {
    fn now_secs(&self) -> u64;
}

impl NowSecs for ManualClock {
    fn now_secs(&self) -> u64 {
        use super::clock::Clock;
        self.now()
    }
}

/// Random operation sequences for [`agrees_with_the_model`].
pub fn ops() -> impl proptest::strategy::Strategy<Value = Vec<Op>> {
    use proptest::prelude::*;
    let op = prop_oneof![
        3 => (0u8..4, 1u32..3, 0u64..1000).prop_map(|(key, version, offset)| Op::Begin { key, version, offset }),
        6 => (0u8..4, 0u64..2000, proptest::bool::weighted(0.2)).prop_map(|(key, offset, stale)| Op::Progress { key, offset, stale }),
        1 => (0u8..4, 0u8..4).prop_map(|(key, ended)| Op::End { key, ended }),
        1 => (0u64..700).prop_map(|secs| Op::Tick { secs }),
        1 => Just(Op::Expire),
    ];
    proptest::collection::vec(op, 1..60)
}

/// Expands into the whole suite for `$factory` (a [`Factory`]).
#[macro_export]
#[doc(hidden)]
macro_rules! contract_tests {
    ($factory:expr) => {
        use $crate::session::contract as c;

        #[tokio::test]
        async fn contract_begin_creates_then_renews() {
            c::begin_creates_then_renews($factory).await;
        }
        #[tokio::test]
        async fn contract_a_stale_epoch_never_moves_the_record() {
            c::a_stale_epoch_never_moves_the_record($factory).await;
        }
        #[tokio::test]
        async fn contract_offsets_move_forward_only_within_an_epoch() {
            c::offsets_move_forward_only_within_an_epoch($factory).await;
        }
        #[tokio::test]
        async fn contract_snapshots_replace_records_of_exclusive_stores() {
            c::snapshots_replace_records_of_exclusive_stores($factory).await;
        }
        #[tokio::test]
        async fn contract_the_cap_refuses_new_keys_only() {
            c::the_cap_refuses_new_keys_only($factory).await;
        }
        #[tokio::test]
        async fn contract_expect_guards_begins() {
            c::expect_guards_begins($factory).await;
        }
        #[tokio::test]
        async fn contract_idle_records_expire_by_the_clock() {
            c::idle_records_expire_by_the_clock($factory).await;
        }
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn contract_concurrent_begins_and_reports_keep_the_rules() {
            c::concurrent_begins_and_reports_keep_the_rules($factory).await;
        }
        proptest::proptest! {
            #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
            #[test]
            fn contract_agrees_with_the_model(ops in c::ops()) {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                rt.block_on(c::agrees_with_the_model($factory, ops));
            }
        }
    };
}
