//! The Redis backend against a real `redis-server` started for each test (on a free port, killed
//! when the test's thread ends): the contract suite, then what only a shared store does (two
//! nodes on one Redis: fencing by node, takeover messages, writing back epochs begun alone,
//! scripts lost by a restart).

use super::*;
use crate::session::clock::ManualClock;
use crate::session::contract::{key, T0};
use std::cell::RefCell;
use std::process::{Child, Command, Stdio};

/// A `redis-server` of this test's own.
struct Server {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
    /// The next database a backend gets (each starts empty).
    next_db: usize,
}

const DATABASES: usize = 1024;

impl Server {
    fn start() -> Option<Server> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
            assert!(
                !ci,
                "CI=true but redis-server is not installed (scripts/test.sh installs it)"
            );
            eprintln!("skipping: redis-server is not installed");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        for _ in 0..10 {
            // Redis needs a port number: take a free one and hand it over (retried if another
            // process takes it first).
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let mut child = Command::new("setpriv")
                .args(["--pdeathsig", "KILL", "--", "redis-server"])
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--databases", &DATABASES.to_string()])
                .arg("--dir")
                .arg(dir.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("run redis-server");
            let client = redis::Client::open(format!("redis://127.0.0.1:{port}/")).unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // the port was taken: try another
                }
                if let Ok(mut c) = client.get_connection() {
                    if redis::cmd("PING").query::<String>(&mut c).is_ok() {
                        return Some(Server {
                            child,
                            port,
                            _dir: dir,
                            next_db: 0,
                        });
                    }
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "redis-server did not start"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("no free port for redis-server after 10 tries");
    }

    /// The URL of a fresh, empty database.
    fn fresh_db(&mut self) -> String {
        let db = self.next_db % DATABASES;
        self.next_db += 1;
        let url = format!("redis://127.0.0.1:{}/{db}", self.port);
        let mut c = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("FLUSHDB").query::<()>(&mut c).unwrap();
        url
    }

    fn conn(&self, url: &str) -> redis::Connection {
        redis::Client::open(url).unwrap().get_connection().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

thread_local! {
    static SERVER: RefCell<Option<Server>> = const { RefCell::new(None) };
}

/// A fresh database on this test's server (started on first use); `None` when redis-server is
/// missing outside CI.
fn fresh() -> Option<String> {
    SERVER.with(|s| {
        let mut s = s.borrow_mut();
        if s.is_none() {
            *s = Some(Server::start()?);
        }
        s.as_mut().map(Server::fresh_db)
    })
}

fn raw(url: &str) -> redis::Connection {
    SERVER.with(|s| s.borrow().as_ref().unwrap().conn(url))
}

fn backend_on(url: &str, clock: Arc<ManualClock>, cap: usize, ttl: Duration) -> RedisBackend {
    let target = RedisTarget::parse(url).unwrap().unwrap();
    // A generous bound: the contract is about rules, not speed, and the machine may be busy.
    RedisBackend::new(target, ttl, cap, Duration::from_secs(5), clock)
}

/// The contract suite's factory. Without redis-server (outside CI) it falls back to the memory
/// backend so that the suite still runs, after saying so once per test.
fn factory(clock: Arc<ManualClock>, cap: usize, ttl: Duration) -> Arc<dyn Backend> {
    match fresh() {
        Some(url) => Arc::new(backend_on(&url, clock, cap, ttl)),
        None => Arc::new(crate::session::memory::MemoryBackend::new(cap, ttl, clock)),
    }
}

crate::contract_tests!(factory);

fn two_nodes() -> Option<(String, RedisBackend, RedisBackend, Arc<ManualClock>)> {
    let url = fresh()?;
    let clock = Arc::new(ManualClock::at(T0));
    let ttl = Duration::from_secs(3600);
    let a = backend_on(&url, clock.clone(), 1000, ttl);
    let b = backend_on(&url, clock.clone(), 1000, ttl);
    Some((url, a, b, clock))
}

fn ask(expect: Option<Epoch>, local: Local) -> ResumeAsk {
    ResumeAsk {
        version: 7,
        length: 1000,
        expect,
        local,
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

async fn began(b: &RedisBackend, k: SessionKey, a: ResumeAsk) -> (Epoch, u64) {
    match b.resume(k, a).await.unwrap() {
        Resumed::Began { epoch, start } => (epoch, start),
        other => panic!("expected a begin, got {other:?}"),
    }
}

/// Node B resuming a session node A is sending learns that A holds it; after A's final commit
/// B begins from A's offset; A's late commits (its epoch is gone) never move the record.
#[tokio::test]
async fn a_session_held_by_another_node_is_reported_then_taken_from_its_last_commit() {
    let Some((_, a, b, _)) = two_nodes() else {
        return;
    };
    let k = key(1);
    let (ea, start) = began(&a, k, ask(None, Local::None)).await;
    assert_eq!(start, 0);
    a.commit(vec![progress(k, ea, 300, Ended::Sending)])
        .await
        .unwrap();
    match b.resume(k, ask(None, Local::None)).await.unwrap() {
        Resumed::Held { holder, epoch } => {
            assert_eq!(holder, a.node());
            assert_eq!(epoch, ea);
        }
        other => panic!("{other:?}"),
    }
    // A stops: its final offset, ended by the network.
    let c = a
        .commit(vec![progress(k, ea, 450, Ended::Network)])
        .await
        .unwrap();
    assert_eq!(c.applied, 1);
    let (eb, start) = began(&b, k, ask(Some(ea), Local::None)).await;
    assert_eq!(start, 450, "B starts where A's client stands");
    assert_ne!(eb, ea);
    // A's sender, superseded, reports more: refused.
    let c = a
        .commit(vec![progress(k, ea, 900, Ended::Network)])
        .await
        .unwrap();
    assert_eq!((c.applied, c.stale), (0, 1));
    // Even with B's epoch, a commit from A is not B's.
    let c = a
        .commit(vec![progress(k, eb, 990, Ended::Clean)])
        .await
        .unwrap();
    assert_eq!(c.stale, 1);
    let h = b.holding(k).await.unwrap().unwrap();
    assert_eq!(
        (h.stored.record.offset, h.holder.as_deref()),
        (450, Some(b.node()))
    );
    // A begin expecting an epoch that is gone conflicts.
    assert_eq!(
        a.resume(k, ask(Some(ea), Local::None)).await.unwrap(),
        Resumed::Conflict
    );
}

/// A node that did not answer (dead or cut off): the taker begins expecting its epoch anyway
/// and starts from its last commit; the epoch shuts the silent node out.
#[tokio::test]
async fn a_silent_holder_is_shut_out_by_the_epoch() {
    let Some((_, a, b, _)) = two_nodes() else {
        return;
    };
    let k = key(2);
    let (ea, _) = began(&a, k, ask(None, Local::None)).await;
    a.commit(vec![progress(k, ea, 120, Ended::Sending)])
        .await
        .unwrap();
    // B asks A to stop: A is not running (no heartbeat, not subscribed).
    assert!(!b.stop(a.node(), k, ea).await.unwrap());
    let (_, start) = began(&b, k, ask(Some(ea), Local::None)).await;
    assert_eq!(start, 120);
    let c = a
        .commit(vec![progress(k, ea, 500, Ended::Sending)])
        .await
        .unwrap();
    assert_eq!(c.stale, 1);
    assert_eq!(
        b.holding(k).await.unwrap().unwrap().stored.record.offset,
        120
    );
}

/// Where a server-resumed begin starts: the stored offset of the same version; 0 for another
/// version or after the peer went away; nothing at all for a finished file.
#[tokio::test]
async fn resume_starts_where_the_client_stands() {
    let Some((_, a, _b, _)) = two_nodes() else {
        return;
    };
    let k = key(3);
    let (e, _) = began(&a, k, ask(None, Local::None)).await;
    a.commit(vec![progress(k, e, 640, Ended::Network)])
        .await
        .unwrap();
    let (e, start) = began(&a, k, ask(None, Local::None)).await;
    assert_eq!(start, 640);
    a.commit(vec![progress(k, e, 700, Ended::Peer)])
        .await
        .unwrap();
    let (e, start) = began(&a, k, ask(None, Local::None)).await;
    assert_eq!(start, 0, "the peer went away: whole file again");
    a.commit(vec![progress(k, e, 1000, Ended::Clean)])
        .await
        .unwrap();
    assert_eq!(
        a.resume(k, ask(None, Local::None)).await.unwrap(),
        Resumed::Finished
    );
    let other_version = ResumeAsk {
        version: 8,
        ..ask(None, Local::None)
    };
    assert_eq!(began(&a, k, other_version).await.1, 0);
}

fn script_calls(url: &str) -> u64 {
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query(&mut raw(url))
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|l| l.split(',').next()?.parse().ok())
        .unwrap_or(0)
}

/// A session this node saw finished is confirmed by a plain read (no script runs), including
/// from the node's own end not written yet; one that another node began again or holds goes
/// to BEGIN, which answers as before.
#[tokio::test]
async fn a_session_seen_finished_is_confirmed_by_a_read() {
    let Some((url, a, b, _)) = two_nodes() else {
        return;
    };
    let k = key(12);
    let (e, _) = began(&a, k, ask(None, Local::None)).await;
    let finished = Record {
        offset: 1000,
        version: 7,
        epoch: e,
        ended: Ended::Clean,
    };
    // The end is not written yet: the store still has A sending from 0.
    let calls = script_calls(&url);
    assert_eq!(
        a.resume(k, ask(None, Local::Registered(finished)))
            .await
            .unwrap(),
        Resumed::Finished
    );
    assert_eq!(script_calls(&url), calls, "a script ran");
    a.commit(vec![progress(k, e, 1000, Ended::Clean)])
        .await
        .unwrap();
    let calls = script_calls(&url);
    assert_eq!(
        a.resume(k, ask(None, Local::Registered(finished)))
            .await
            .unwrap(),
        Resumed::Finished
    );
    assert_eq!(script_calls(&url), calls, "a script ran");
    // Another version of the file: not finished.
    let v8 = ResumeAsk {
        version: 8,
        ..ask(None, Local::Registered(finished))
    };
    let (e8, start) = began(&a, k, v8).await;
    assert_eq!(start, 0);
    a.commit(vec![progress(k, e8, 1000, Ended::Clean)])
        .await
        .unwrap();
    // B sends it again (a declared position) and is cut at 10: A's view is stale, BEGIN
    // decides.
    let again = Record {
        offset: 10,
        version: 7,
        epoch: Epoch(e8.0.wrapping_add(5)),
        ended: Ended::Network,
    };
    b.commit(vec![Report::Begun {
        key: k,
        record: again,
    }])
    .await
    .unwrap();
    assert_eq!(
        began(&a, k, ask(None, Local::Registered(finished))).await.1,
        10
    );
    // B holds it, sending: A is told so.
    let held = Record {
        epoch: Epoch(e8.0.wrapping_add(9)),
        ended: Ended::Sending,
        ..again
    };
    b.commit(vec![Report::Begun {
        key: k,
        record: held,
    }])
    .await
    .unwrap();
    assert_eq!(
        a.resume(k, ask(None, Local::Registered(finished)))
            .await
            .unwrap(),
        Resumed::Held {
            holder: b.node().to_owned(),
            epoch: held.epoch
        }
    );
}

/// The node's own newer knowledge counts: progress of its epoch not written yet, and an epoch
/// it began alone (a declared position) that the store has not seen.
#[tokio::test]
async fn a_begin_decides_from_this_nodes_unwritten_progress() {
    let Some((_, a, b, _)) = two_nodes() else {
        return;
    };
    let k = key(4);
    let (e, _) = began(&a, k, ask(None, Local::None)).await;
    a.commit(vec![progress(k, e, 100, Ended::Sending)])
        .await
        .unwrap();
    let mine = Record {
        offset: 350,
        version: 7,
        epoch: e,
        ended: Ended::Network,
    };
    let (e2, start) = began(&a, k, ask(None, Local::Registered(mine))).await;
    assert_eq!(start, 350);
    // Another node's view of its own epoch does not apply to A's.
    let not_mine = Record {
        offset: 999,
        epoch: e2,
        ..mine
    };
    match b
        .resume(k, ask(None, Local::Registered(not_mine)))
        .await
        .unwrap()
    {
        Resumed::Held { holder, .. } => assert_eq!(holder, a.node()),
        other => panic!("{other:?}"),
    }
    // An epoch A began alone: taken as written.
    let k2 = key(5);
    let alone = Record {
        offset: 420,
        version: 7,
        epoch: Epoch(31_000),
        ended: Ended::Network,
    };
    let (e3, start) = began(&a, k2, ask(None, Local::Begun(alone))).await;
    assert_eq!((e3, start), (Epoch(31_001), 420));
}

/// One commit carries many sessions in a few script calls (more than one chunk here): every
/// report gets its own verdict: stale progress and records past the cap are refused one by one
/// without failing the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_mixed_batch_keeps_every_sessions_verdict() {
    let Some(url) = fresh() else {
        return;
    };
    let clock = Arc::new(ManualClock::at(T0));
    let n = (COMMIT_CHUNK * 2 + 7) as u64;
    // Room for every session but the last three of the batch.
    let a = backend_on(
        &url,
        clock.clone(),
        n as usize - 3,
        Duration::from_secs(3600),
    );
    let b = backend_on(&url, clock.clone(), n as usize, Duration::from_secs(3600));
    let record = |offset| Record {
        offset,
        version: 7,
        epoch: Epoch(3),
        ended: Ended::Sending,
    };
    // The first half of the sessions exist as A's already.
    let first: Vec<Report> = (0..n / 2)
        .map(|i| Report::Begun {
            key: key(i),
            record: record(10),
        })
        .collect();
    assert_eq!(a.commit(first).await.unwrap().applied, (n / 2) as usize);
    // B takes every fourth of them: A's progress on those is stale from now on.
    for i in (0..n / 2).step_by(4) {
        b.commit(vec![Report::Begun {
            key: key(i),
            record: Record {
                epoch: Epoch(4),
                ..record(20)
            },
        }])
        .await
        .unwrap();
    }
    // One batch: progress for the first half, new records for the second.
    let batch: Vec<Report> = (0..n)
        .map(|i| {
            if i < n / 2 {
                progress(key(i), Epoch(3), 100 + i, Ended::Clean)
            } else {
                Report::Begun {
                    key: key(i),
                    record: record(i),
                }
            }
        })
        .collect();
    let c = a.commit(batch).await.unwrap();
    let taken = (n / 2).div_ceil(4) as usize;
    assert_eq!(c.applied, n as usize - taken - 3, "{c:?}");
    assert_eq!(c.stale, taken + 3, "{c:?}");
    let mut refused = 0;
    for i in 0..n {
        let got = b.holding(key(i)).await.unwrap();
        if i < n / 2 && i % 4 == 0 {
            let h = got.unwrap();
            assert_eq!(
                (h.stored.record.epoch, h.stored.record.offset),
                (Epoch(4), 20)
            );
        } else if i < n / 2 {
            let h = got.unwrap();
            assert_eq!(
                (
                    h.stored.record.offset,
                    h.stored.record.ended,
                    h.holder.as_deref()
                ),
                (100 + i, Ended::Clean, Some(a.node()))
            );
        } else if let Some(h) = got {
            assert_eq!(h.stored.record.offset, i);
        } else {
            refused += 1;
        }
    }
    // Which new sessions the cap refused depends on the order the calls ran in.
    assert_eq!(refused, 3, "new records refused past the cap");
}

/// Epochs begun alone are written as that node's; written again they only move forward; a
/// node's stop request reaches it over its channel; a release ends a hold without progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn begun_records_stop_messages_and_releases() {
    let Some((_, a, b, _)) = two_nodes() else {
        return;
    };
    let k = key(6);
    let record = Record {
        offset: 50,
        version: 7,
        epoch: Epoch(9),
        ended: Ended::Sending,
    };
    let c = a
        .commit(vec![Report::Begun { key: k, record }])
        .await
        .unwrap();
    assert_eq!(c.applied, 1);
    a.commit(vec![progress(k, Epoch(9), 80, Ended::Sending)])
        .await
        .unwrap();
    // The same batch sent again (a retry): forward only.
    a.commit(vec![Report::Begun { key: k, record }])
        .await
        .unwrap();
    let h = b.holding(k).await.unwrap().unwrap();
    assert_eq!(
        (
            h.stored.record.offset,
            h.stored.record.epoch,
            h.holder.as_deref()
        ),
        (80, Epoch(9), Some(a.node()))
    );

    // A joins the fleet: B's stop request reaches it.
    let (tx, mut rx) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let running = {
        let (a, stop) = (a.clone(), stop.clone());
        tokio::spawn(async move { a.run(tx, stop).await })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    let request = loop {
        assert!(Instant::now() < deadline, "A never got the stop request");
        if b.stop(a.node(), k, Epoch(9)).await.unwrap() {
            match tokio::time::timeout(Duration::from_secs(2), rx.recv()).await {
                Ok(Some(r)) => break r,
                _ => continue,
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        request,
        StopRequest {
            key: k,
            epoch: Epoch(9)
        }
    );
    // A runs no sender for it: it releases its hold.
    a.release(k, Epoch(9)).await.unwrap();
    let h = b.holding(k).await.unwrap().unwrap();
    assert_eq!(h.stored.record.ended, Ended::Network);
    assert_eq!(began(&b, k, ask(None, Local::None)).await.1, 80);
    stop.cancel();
    running.await.unwrap();
    // Leaving deletes the heartbeat: the next stop finds A gone.
    assert!(!b.stop(a.node(), k, Epoch(9)).await.unwrap());
}

/// Redis lost its scripts (a restart, a failover): a batch loads them again and goes through.
#[tokio::test]
async fn commits_survive_an_emptied_script_cache() {
    let Some((url, a, _b, _)) = two_nodes() else {
        return;
    };
    let k = key(7);
    let (e, _) = began(&a, k, ask(None, Local::None)).await;
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query::<()>(&mut raw(&url))
        .unwrap();
    let c = a
        .commit(vec![progress(k, e, 77, Ended::Network)])
        .await
        .unwrap();
    assert_eq!(c.applied, 1);
    redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query::<()>(&mut raw(&url))
        .unwrap();
    assert_eq!(began(&a, k, ask(None, Local::None)).await.1, 77);
}

/// The same begin sent twice (a retry after a lost answer) answers the same epoch, and offsets
/// near 2^53 stay exact (Lua numbers are doubles).
#[tokio::test]
async fn keys_share_a_slot_per_client_and_large_offsets_stay_exact() {
    let Some((_, a, _b, _)) = two_nodes() else {
        return;
    };
    let one = session_key(SessionKey {
        client: 0xdead_beef,
        file: FileKey(1),
    });
    let two = session_key(SessionKey {
        client: 0xdead_beef,
        file: FileKey(u64::MAX),
    });
    // Redis Cluster hashes only what is between the first `{` and the next `}`.
    let tag = |k: &str| -> String {
        let open = k.find('{').unwrap();
        let close = open + k[open..].find('}').unwrap();
        k[open + 1..close].to_owned()
    };
    assert_eq!(one, "roam:{00000000deadbeef}:0000000000000001");
    assert_eq!(tag(&one), tag(&two), "one client, one slot");
    assert_eq!(tag(&one), "00000000deadbeef");
    let k = key(8);
    let (e, _) = began(&a, k, ask(None, Local::None)).await;
    let big = (1u64 << 53) - 1;
    a.commit(vec![progress(k, e, big, Ended::Network)])
        .await
        .unwrap();
    let huge = ResumeAsk {
        length: u64::MAX,
        ..ask(None, Local::None)
    };
    assert_eq!(began(&a, k, huge).await.1, big);
}

/// Unreachable Redis: a request-path call fails within its bound and marks Redis down, later
/// calls fail at once, and a background call that gets through clears the mark.
#[tokio::test]
async fn an_unreachable_store_fails_fast_and_recovers() {
    let Some(url) = fresh() else {
        return;
    };
    // Nothing listens on this port (bound, then released, and never given to Redis).
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = dead.local_addr().unwrap().port();
    drop(dead);
    let target = RedisTarget::parse(&format!("redis://127.0.0.1:{port}/"))
        .unwrap()
        .unwrap();
    let clock = Arc::new(ManualClock::at(T0));
    let b = RedisBackend::new(
        target,
        Duration::from_secs(3600),
        100,
        Duration::from_millis(50),
        clock.clone(),
    );
    assert!(b.reachable());
    let started = Instant::now();
    assert!(b.holding(key(9)).await.is_err());
    assert!(started.elapsed() < Duration::from_secs(2));
    assert!(!b.reachable());
    let again = Instant::now();
    assert!(b.resume(key(9), ask(None, Local::None)).await.is_err());
    assert!(
        again.elapsed() < Duration::from_millis(20),
        "no wait while down"
    );
    // A reachable one recovers through a background call.
    let good = backend_on(&url, clock, 100, Duration::from_secs(3600));
    good.inner.health.failed("test", &"forced");
    assert!(!good.reachable());
    good.heartbeat().await.unwrap();
    assert!(good.reachable());
}

#[test]
fn stop_messages_round_trip() {
    let k = SessionKey {
        client: 0x0123_4567_89ab_cdef,
        file: FileKey(u64::MAX),
    };
    let m = stop_message(k, Epoch(65_535));
    assert_eq!(
        parse_stop(&m),
        Some(StopRequest {
            key: k,
            epoch: Epoch(65_535)
        })
    );
    for bad in ["", "x 1", "0123 1", &m.replace(' ', "")] {
        assert_eq!(parse_stop(bad), None, "{bad:?}");
    }
}
