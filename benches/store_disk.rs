//! The disk store at scale (issue 13): a state directory with millions of sessions, then a real
//! `roam serve` restarted on it. Measures how long the restarted process takes to listen and to
//! answer a request for a session recorded before the restart (the store opens in the
//! background), and the disk space per session. Not a criterion bench: it times whole
//! processes.
//!
//!   cargo bench --bench store_disk                        # 10 million sessions
//!   ROAM_BENCH_SESSIONS=1000000 cargo bench --bench store_disk
//!
//! Under `cargo test` (no `--bench` argument) it runs a small smoke size.

use roam::session::backend::{Backend, Report};
use roam::session::clock::SessionClock;
use roam::session::disk::{claim_state_dir, DiskBackend};
use roam::session::{Ended, Epoch, FileKey, Record, SessionKey};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bytes allocated on disk (not the apparent size: fjall preallocates its journal sparsely).
fn du(path: &Path) -> u64 {
    let out = Command::new("du")
        .args(["-s", "--block-size=1"])
        .arg(path)
        .output()
        .expect("du");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn start(root: &Path, state: &Path) -> (Child, String, Instant) {
    let started = Instant::now();
    let log = std::fs::File::create(state.with_extension("log")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_roam"))
        .args(["serve", "--listen", "127.0.0.1:0", "--root"])
        .arg(root)
        .arg("--state-dir")
        .arg(state)
        .env("RUST_LOG", "info,fjall=warn,lsm_tree=warn")
        .env("NO_COLOR", "1")
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("spawn roam");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("roam listening on http://")
        .expect("listening line")
        .to_owned();
    (child, addr, started)
}

fn exchange(addr: &str, req: &str) -> String {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read(&mut b).unwrap() == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

fn stop(mut child: Child) {
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    let _ = child.wait();
}

fn main() {
    let benching = std::env::args().any(|a| a == "--bench");
    let n: u64 = std::env::var("ROAM_BENCH_SESSIONS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(if benching { 10_000_000 } else { 20_000 });
    let work = tempfile::tempdir().unwrap();
    let (root, state) = (work.path().join("root"), work.path().join("state"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("f.bin"), vec![7u8; 4 << 20]).unwrap();

    // 1. A real session, made by a real server: f.bin downloaded whole (from a declared 1 MiB),
    //    so the session is finished at its length.
    let (child, addr, _) = start(&root, &state);
    let fetch = |req: &str| {
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut all = Vec::new();
        s.read_to_end(&mut all).unwrap();
        all
    };
    let minted = fetch("GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n");
    let text = String::from_utf8_lossy(&minted).into_owned();
    let id = text.rsplit("\r\n\r\n").next().unwrap().to_owned();
    let target = format!("/{id}/f.bin");
    let got = fetch(&format!(
        "GET {target} HTTP/1.1\r\nHost: b\r\nRange: bytes=1048576-\r\nConnection: close\r\n\r\n"
    ));
    assert!(got.starts_with(b"HTTP/1.1 206"));
    stop(child);

    // 2. Millions more, written through the backend as the write-behind layer does.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let load = Instant::now();
    let loaded_in_bytes = rt.block_on(async {
        let lock = claim_state_dir(&state).unwrap();
        let backend = DiskBackend::open(
            &state,
            lock,
            Duration::from_secs(86_400),
            usize::MAX,
            Arc::new(SessionClock::default()),
        );
        backend.ready().await.unwrap();
        let file = FileKey::of_path(Path::new("other.bin"));
        let mut i = 0u64;
        while i < n {
            let batch: Vec<Report> = (i..(i + 50_000).min(n))
                .map(|k| Report::Snapshot {
                    key: SessionKey {
                        client: k.wrapping_mul(0x9e37_79b9_7f4a_7c15),
                        file,
                    },
                    record: Record {
                        offset: k,
                        version: 1,
                        epoch: Epoch(1),
                        ended: Ended::Network,
                    },
                })
                .collect();
            i += batch.len() as u64;
            backend.commit(batch).await.unwrap();
        }
        let loaded = du(&state.join("store"));
        backend.compact().await.unwrap();
        backend.close().await.unwrap();
        loaded
    });
    let loaded_in = load.elapsed();
    let before_compaction = loaded_in_bytes;
    let store_bytes = du(&state.join("store"));

    // 3. Restart on it: time to listen, and to answer for the real session.
    let (child, addr, started) = start(&root, &state);
    let listening = started.elapsed();
    let head = exchange(&addr, &format!("HEAD {target} HTTP/1.1\r\nHost: b\r\n\r\n"));
    let answered = started.elapsed();
    assert!(
        head.to_ascii_lowercase().contains("roam-offset: 4194304"),
        "the session recorded before the restart: {head}"
    );
    stop(child);
    let log = std::fs::read_to_string(state.with_extension("log")).unwrap_or_default();
    let opened = log
        .lines()
        .rfind(|l| l.contains("session store open"))
        .unwrap_or("")
        .to_owned();
    println!("sessions: {n}");
    println!(
        "the restarted server's open: {}",
        opened.split("INFO").last().unwrap_or("")
    );
    println!("bulk load through the backend: {loaded_in:?}");
    println!(
        "store on disk after loading: {:.1} MB, {:.1} bytes per session",
        before_compaction as f64 / 1e6,
        before_compaction as f64 / n as f64
    );
    println!(
        "store on disk after compaction: {:.1} MB, {:.1} bytes per session",
        store_bytes as f64 / 1e6,
        store_bytes as f64 / n as f64
    );
    println!("restart: listening after {listening:?}, first answer for a stored session after {answered:?}");
}
