//! nginx for tests: found on the machine (a failure under `CI=true`, a skip elsewhere), run in
//! the foreground as one process with every path inside its own temporary folder, on a free
//! port (nginx cannot take a listener, so a conflict is detected and retried).
#![allow(dead_code)]

use super::netns::KillOnDrop;
use std::fs::File;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn is_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
}

/// The nginx binary, or `None` (after printing "skipping") outside CI; panics under `CI=true`.
pub fn nginx_or_skip() -> Option<PathBuf> {
    let candidates = [
        PathBuf::from("/usr/sbin/nginx"),
        PathBuf::from("/usr/local/sbin/nginx"),
    ];
    let found = candidates.into_iter().find(|p| p.exists()).or_else(|| {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("nginx"))
                .find(|p| p.exists())
        })
    });
    if found.is_none() {
        assert!(
            !is_ci(),
            "CI=true but nginx is not installed (scripts/test.sh installs it)"
        );
        println!("skipping: nginx not found");
    }
    found
}

/// A running nginx; killed when dropped.
pub struct Nginx {
    _child: KillOnDrop,
    pub addr: SocketAddr,
    /// nginx's prefix: its configuration, logs (`access.log`, `error.log`) and temporary files.
    pub dir: tempfile::TempDir,
}

impl Nginx {
    /// Starts nginx with `http_extra(dir)` inside `http { }` (after the temporary paths) and
    /// `server_body` inside `server { }` after its `listen`.
    pub fn start(bin: &Path, http_extra: impl Fn(&Path) -> String, server_body: &str) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        std::fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let extra = http_extra(dir.path());
        for attempt in 0..10 {
            let port = TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let conf = format!(
                "daemon off;\n\
                 master_process off;\n\
                 worker_processes 1;\n\
                 pid {d}/nginx.pid;\n\
                 error_log {d}/error.log info;\n\
                 events {{ worker_connections 256; }}\n\
                 http {{\n\
                 client_body_temp_path {d}/tmp/body;\n\
                 proxy_temp_path {d}/tmp/proxy;\n\
                 fastcgi_temp_path {d}/tmp/fastcgi;\n\
                 uwsgi_temp_path {d}/tmp/uwsgi;\n\
                 scgi_temp_path {d}/tmp/scgi;\n\
                 {extra}\n\
                 server {{\n\
                 listen 127.0.0.1:{port};\n\
                 {server_body}\n\
                 }}\n\
                 }}\n"
            );
            let conf_path = dir.path().join("nginx.conf");
            std::fs::write(&conf_path, conf).unwrap();
            let _ = std::fs::remove_file(dir.path().join("error.log"));
            let mut child = KillOnDrop(
                Command::new(bin)
                    .arg("-p")
                    .arg(dir.path())
                    .arg("-c")
                    .arg(&conf_path)
                    .arg("-e")
                    .arg(dir.path().join("error.log"))
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(File::create(dir.path().join("nginx.stderr")).unwrap())
                    .spawn()
                    .expect("spawn nginx"),
            );
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let started = Instant::now();
            loop {
                if let Some(status) = child.try_wait().unwrap() {
                    let log = std::fs::read_to_string(dir.path().join("error.log"))
                        .unwrap_or_default()
                        + &std::fs::read_to_string(dir.path().join("nginx.stderr"))
                            .unwrap_or_default();
                    if log.contains("Address already in use") {
                        eprintln!("nginx: port {port} taken (attempt {attempt}), retrying");
                        break;
                    }
                    panic!("nginx exited with {status}:\n{log}");
                }
                if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                    return Nginx {
                        _child: child,
                        addr,
                        dir,
                    };
                }
                assert!(
                    started.elapsed() < Duration::from_secs(20),
                    "nginx did not start listening on {addr}"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("nginx could not bind a free port in 10 attempts");
    }

    /// What nginx logged in `access.log` so far.
    pub fn access_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default()
    }
}
