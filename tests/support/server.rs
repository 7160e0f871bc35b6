//! A roam server for black-box tests: bound on 127.0.0.1:0, run on its own runtime thread,
//! stopped through the injected shutdown future when dropped. Plus raw-HTTP helpers that send
//! exact bytes and parse exact responses.
#![allow(dead_code)]

use roam::service::Service;
use roam::settings::Config;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A running server. Dropping it shuts the server down and waits for it.
pub struct TestServer {
    pub addr: SocketAddr,
    pub service: Arc<Service>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    /// Serves `root` with default settings.
    pub fn start(root: &Path) -> TestServer {
        Self::start_with(root, |_| {})
    }

    /// Serves `root` with settings adjusted by `tweak`, on a listener bound as `roam serve`
    /// binds it by default (Multipath TCP where the kernel has it), so every test's TCP
    /// clients go through the kernel's fallback as real ones do.
    pub fn start_with(root: &Path, tweak: impl FnOnce(&mut Config)) -> TestServer {
        let (listener, _protocol) = roam::server::bind_std(
            "127.0.0.1:0".parse().unwrap(),
            1024,
            false,
            roam::settings::config::DEFAULT_MPTCP,
        )
        .unwrap();
        Self::start_on(listener, root, tweak)
    }

    /// Serves `root` on an already bound listener (for example one created inside a network
    /// namespace), with settings adjusted by `tweak`.
    pub fn start_on(
        listener: std::net::TcpListener,
        root: &Path,
        tweak: impl FnOnce(&mut Config),
    ) -> TestServer {
        listener.set_nonblocking(true).unwrap();
        let mut config = Config::new(root.to_path_buf(), "127.0.0.1:0".parse().unwrap());
        tweak(&mut config);
        let config = config.validate().expect("test config is valid");
        let service = Service::new(config).expect("root opens");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let svc = Arc::clone(&service);
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                ready_tx.send(listener.local_addr().unwrap()).unwrap();
                roam::server::run(listener, svc, async {
                    let _ = stopped.await;
                })
                .await;
            });
        });
        let addr = ready_rx.recv().expect("server thread started");
        TestServer {
            addr,
            service,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The base URL, `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Mints a client ID with `GET /`.
    pub fn mint(&self) -> String {
        let resp = request(self.addr, &get("/"));
        assert_eq!(resp.status, 200, "mint failed: {resp:?}");
        String::from_utf8(resp.body).unwrap()
    }

    /// Stops the server and waits for it to finish (bounded by its shutdown timeout).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A parsed response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lowercased; repeated fields joined with ", ".
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .map(|s| s.as_str())
    }
}

/// `GET target HTTP/1.1` with a Host and nothing else.
pub fn get(target: &str) -> String {
    format!("GET {target} HTTP/1.1\r\nHost: test\r\n\r\n")
}

/// `GET` with extra header lines (each `Name: value`).
pub fn get_with(target: &str, headers: &[&str]) -> String {
    let mut s = format!("GET {target} HTTP/1.1\r\nHost: test\r\n");
    for h in headers {
        s.push_str(h);
        s.push_str("\r\n");
    }
    s.push_str("\r\n");
    s
}

/// Opens a connection with a read timeout so a broken test fails instead of hanging.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Sends raw bytes on a new connection and reads one response.
pub fn request(addr: SocketAddr, raw: &str) -> Response {
    let mut s = connect(addr);
    s.write_all(raw.as_bytes()).unwrap();
    read_response(&mut s, raw.starts_with("HEAD"))
}

/// Reads one response from `s`; `head_only` for responses to HEAD (no body whatever
/// Content-Length says).
pub fn read_response(s: &mut impl Read, head_only: bool) -> Response {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = s.read(&mut byte).expect("read response head");
        assert!(
            n == 1,
            "connection closed in the response head after {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(byte[0]);
    }
    let text = String::from_utf8(head).expect("ASCII head");
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap();
    let status: u16 = status_line.split(' ').nth(1).unwrap().parse().unwrap();
    let mut headers: HashMap<String, String> = HashMap::new();
    for line in lines.filter(|l| !l.is_empty()) {
        let (name, value) = line.split_once(':').expect("header line");
        headers
            .entry(name.trim().to_ascii_lowercase())
            .and_modify(|v| {
                v.push_str(", ");
                v.push_str(value.trim());
            })
            .or_insert_with(|| value.trim().to_owned());
    }
    let len: usize = if head_only || status == 304 {
        0
    } else {
        headers
            .get("content-length")
            .map(|v| v.parse().unwrap())
            .unwrap_or(0)
    };
    let mut body = vec![0u8; len];
    s.read_exact(&mut body).expect("read response body");
    Response {
        status,
        headers,
        body,
    }
}

/// Reads until EOF or reset; returns what arrived.
pub fn read_to_end_lossy(s: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return out,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return out,
        }
    }
}

/// A temporary served folder.
pub struct Root {
    pub dir: tempfile::TempDir,
}

impl Root {
    pub fn new() -> Root {
        Root {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `bytes` at `rel` (creating folders) and returns the full path.
    pub fn file(&self, rel: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(rel);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).unwrap();
        }
        std::fs::write(&p, bytes).unwrap();
        p
    }
}

/// Deterministic pseudo-random content, so every byte position is distinguishable.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
