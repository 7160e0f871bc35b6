//! Redis for tests: `redis-server` found on the machine (a failure under `CI=true`, a skip
//! elsewhere), run in the foreground with every file in its own temporary folder, never a
//! system service. Redis needs a port number (it cannot take a listener): one is taken by
//! binding port 0 and released, and the start is retried if another process took it meanwhile.
//! A three-master Cluster is three such servers joined with `redis-cli --cluster create`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// True when `redis-server` and `redis-cli` run; otherwise prints "skipping" (and panics under
/// `CI=true`, where scripts/test.sh must have installed them).
pub fn redis_or_skip() -> bool {
    let found = ["redis-server", "redis-cli"].iter().all(|b| {
        Command::new(b)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !found {
        assert!(
            !is_ci(),
            "CI=true but redis-server is not installed (scripts/test.sh installs it)"
        );
        println!("skipping: redis-server not found");
    }
    found
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `redis-server` process of the test's own; killed when dropped.
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    extra: Vec<String>,
    _tmp: Option<tempfile::TempDir>,
}

impl RedisServer {
    /// A standalone server without persistence.
    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// A standalone server with `extra` arguments (for example `--appendonly yes`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let mut s = Self::start_in(&dir, extra, None);
        s._tmp = Some(tmp);
        s
    }

    fn start_in(dir: &Path, extra: &[&str], port: Option<u16>) -> RedisServer {
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        for _ in 0..20 {
            let port = port.unwrap_or_else(free_port);
            let mut s = RedisServer {
                child: None,
                port,
                dir: dir.to_path_buf(),
                extra: extra.clone(),
                _tmp: None,
            };
            if s.spawn() {
                return s;
            }
        }
        panic!("redis-server could not start after 20 tries ({dir:?})");
    }

    /// Starts the process on `self.port`; false if the port was taken.
    fn spawn(&mut self) -> bool {
        let log = self.dir.join(format!("redis-{}.log", self.port));
        // setpriv: the server dies with the test process, even if the test is killed.
        let mut child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "redis-server"])
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run redis-server");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                if text.contains("Address already in use") {
                    return false;
                }
                panic!("redis-server exited: {text}");
            }
            if self.ping_port() {
                self.child = Some(child);
                return true;
            }
            assert!(Instant::now() < deadline, "redis-server did not answer");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn ping_port(&self) -> bool {
        self.cli(&["PING"]).is_some_and(|r| r == "PONG")
    }

    /// One command through a plain RESP connection; the reply as text (`None` if unreachable).
    pub fn cli(&self, args: &[&str]) -> Option<String> {
        command(self.port, args)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// SIGKILL (the append-only file, if any, keeps what was written).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the server again on the same port and folder (so it reads its append-only file).
    pub fn restart(&mut self) {
        self.kill();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.spawn() {
            assert!(
                Instant::now() < deadline,
                "port {} stayed taken after Redis stopped",
                self.port
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sends one command in RESP and reads one reply, rendered as text: simple strings and bulk
/// strings as themselves, integers in decimal, arrays joined with newlines, errors as `-ERR …`.
pub fn command(port: u16, args: &[&str]) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut out = format!("*{}\r\n", args.len());
    for a in args {
        out.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(out.as_bytes()).ok()?;
    let mut r = BufReader::new(s);
    read_reply(&mut r)
}

fn read_reply(r: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    r.read_line(&mut line).ok()?;
    let line = line.trim_end_matches("\r\n");
    let (kind, rest) = line.split_at_checked(1)?;
    match kind {
        "+" | ":" => Some(rest.to_owned()),
        "-" => Some(line.to_owned()),
        "$" => {
            let n: i64 = rest.parse().ok()?;
            if n < 0 {
                return Some(String::new());
            }
            let mut buf = vec![0u8; n as usize + 2];
            std::io::Read::read_exact(r, &mut buf).ok()?;
            buf.truncate(n as usize);
            String::from_utf8(buf).ok()
        }
        "*" => {
            let n: i64 = rest.parse().ok()?;
            let mut parts = Vec::new();
            for _ in 0..n.max(0) {
                parts.push(read_reply(r)?);
            }
            Some(parts.join("\n"))
        }
        _ => None,
    }
}

/// A Redis Cluster of three masters on this machine.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
    _tmp: tempfile::TempDir,
}

impl RedisCluster {
    /// Three masters.
    pub fn start() -> RedisCluster {
        Self::start_with_replicas(0)
    }

    /// Three masters with `replicas` replicas each (`nodes`: masters first, as created).
    pub fn start_with_replicas(replicas: usize) -> RedisCluster {
        let tmp = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..3 * (1 + replicas) {
            let dir = tmp.path().join(format!("n{i}"));
            std::fs::create_dir_all(&dir).unwrap();
            let conf = dir.join("nodes.conf");
            // Each node's bus port is picked like its port (port + 10000 could overflow).
            let bus = free_port().to_string();
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                conf.to_str().unwrap(),
                "--cluster-node-timeout",
                "2000",
                "--cluster-port",
                &bus,
                "--appendonly",
                "no",
                // Replicas sync at once (the default waits 5 s for more replicas to join).
                "--repl-diskless-sync-delay",
                "0",
            ];
            nodes.push(RedisServer::start_in(&dir, &args, None));
        }
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &nodes {
            create.arg(format!("127.0.0.1:{}", n.port));
        }
        let out = create
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        for n in &nodes {
            while !n
                .cli(&["CLUSTER", "INFO"])
                .is_some_and(|i| i.contains("cluster_state:ok"))
            {
                assert!(Instant::now() < deadline, "the cluster never became ok");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        for n in &nodes {
            // Every replica has its data link up (a failover needs it).
            while n.cli(&["ROLE"]).is_some_and(|r| {
                r.starts_with("slave") && r.lines().nth(3).is_none_or(|s| s != "connected")
            }) {
                assert!(Instant::now() < deadline, "a replica never connected");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        RedisCluster { nodes, _tmp: tmp }
    }

    /// `--store` for the cluster (every live node a seed).
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .filter(|n| n.child.is_some())
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}
