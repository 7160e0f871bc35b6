//! Network-namespace harness for tests that need a real network path that can silently vanish: owns creating and tearing down a two-path (wifi + lte) namespace pair and running code inside a namespace.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::ops::{Deref, DerefMut};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

const NETNS_DIR: &str = "/var/run/netns";

/// MAC that no interface in the pair has. Pinning the peer's IP to it makes
/// every frame land on the other veth as PACKET_OTHERHOST, which IP drops
/// without a trace.
const NOWHERE_MAC: &str = "02:de:ad:00:00:01";

/// Whether this machine can run namespace tests: root, a working `ip`, and
/// namespaces plus veth pairs can actually be created. Probed once per process.
pub fn netns_available() -> Result<(), String> {
    static PROBE: OnceLock<Result<(), String>> = OnceLock::new();
    PROBE
        .get_or_init(|| {
            // SAFETY: geteuid has no preconditions and cannot fail.
            if unsafe { libc::geteuid() } != 0 {
                return Err("network namespace tests need root".to_string());
            }
            match Command::new("ip").arg("-V").output() {
                Ok(out) if out.status.success() => {}
                Ok(out) => return Err(format!("`ip -V` failed: {}", out.status)),
                Err(e) => return Err(format!("cannot run `ip` (iproute2): {e}")),
            }
            // Index outside the normal sequence so the first real test still
            // gets the documented 10.77.1.x / 10.77.2.x subnets.
            TwoPathNet::create_indexed("probe", 99)
                .map(drop)
                .map_err(|e| format!("cannot create network namespaces: {e}"))
        })
        .clone()
}

/// Test gate. Returns true when namespaces work. Otherwise, under `CI=true`
/// panics (a CI job must not silently skip these tests); elsewhere prints
/// "skipping: <reason>" and returns false so the test can return early.
pub fn require_netns() -> bool {
    match netns_available() {
        Ok(()) => true,
        Err(reason) => {
            let ci = std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true"));
            if ci {
                panic!("CI=true but network namespace tests cannot run: {reason}");
            }
            eprintln!("skipping: {reason}");
            false
        }
    }
}

/// Two namespaces, "srv" and "cli", joined by two independent veth paths:
/// `wifi` (10.77.{2k+1}.0/24) and `lte` (10.77.{2k+2}.0/24), where k is a
/// per-process index (k = 0 gives 10.77.1.x / 10.77.2.x). The server end is .1,
/// the client end .2; in each namespace the interfaces are named `wifi` and
/// `lte`. Dropping it deletes both namespaces, also when the test panics.
#[derive(Debug)]
pub struct TwoPathNet {
    srv: String,
    cli: String,
    wifi_net: u8,
    lte_net: u8,
}

impl TwoPathNet {
    pub fn create(tag: &str) -> io::Result<TwoPathNet> {
        static NEXT_INDEX: AtomicU32 = AtomicU32::new(0);
        Self::create_indexed(tag, NEXT_INDEX.fetch_add(1, Ordering::SeqCst))
    }

    fn create_indexed(tag: &str, index: u32) -> io::Result<TwoPathNet> {
        // Separate namespace pairs cannot clash even on identical subnets; the
        // per-index subnets only keep addresses distinguishable in logs and
        // packet captures when tests run in parallel.
        let k = u8::try_from(index % 100).unwrap_or(0);
        let (srv, cli) = ns_names(tag, std::process::id(), index);
        sweep_stale_namespaces();

        // Built before any setup step so that a failure half-way is cleaned up
        // by Drop.
        let net = TwoPathNet {
            srv,
            cli,
            wifi_net: 2 * k + 1,
            lte_net: 2 * k + 2,
        };
        // A crashed earlier run whose pid we now reuse left these behind.
        let _ = ip(["netns", "del", net.srv.as_str()]);
        let _ = ip(["netns", "del", net.cli.as_str()]);

        ip(["netns", "add", net.srv.as_str()])?;
        ip(["netns", "add", net.cli.as_str()])?;
        for ns in [&net.srv, &net.cli] {
            ip(["-n", ns.as_str(), "link", "set", "lo", "up"])?;
        }
        for (dev, subnet) in [("wifi", net.wifi_net), ("lte", net.lte_net)] {
            // Each end is created directly inside its namespace, so the fixed
            // short names never collide in the root namespace.
            ip([
                "link",
                "add",
                dev,
                "netns",
                net.srv.as_str(),
                "type",
                "veth",
                "peer",
                "name",
                dev,
                "netns",
                net.cli.as_str(),
            ])?;
            for (ns, host) in [(&net.srv, 1), (&net.cli, 2)] {
                let cidr = format!("10.77.{subnet}.{host}/24");
                ip(["-n", ns.as_str(), "addr", "add", cidr.as_str(), "dev", dev])?;
                ip(["-n", ns.as_str(), "link", "set", dev, "up"])?;
            }
        }
        Ok(net)
    }

    pub fn srv_ns(&self) -> &str {
        &self.srv
    }

    pub fn cli_ns(&self) -> &str {
        &self.cli
    }

    pub fn wifi_server_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.wifi_net, 1)
    }

    pub fn wifi_client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.wifi_net, 2)
    }

    pub fn lte_server_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.lte_net, 1)
    }

    pub fn lte_client_ip(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.lte_net, 2)
    }

    /// Makes the wifi path silently drop every packet in both directions: no
    /// FIN, no RST, no ICMP, and no local error on either host.
    ///
    /// Done by pinning each side's ARP entry for the other to a MAC nobody
    /// has, so frames still leave the sender and are discarded by the
    /// receiving veth as addressed to another host. Both interfaces, their
    /// addresses and routes stay up, exactly like a radio link whose other end
    /// walked away. Rejected alternatives: `ip link set down` removes the
    /// connected route, so the local stack fails sends and new connects with
    /// ENETUNREACH/EHOSTUNREACH instead of losing packets (not silent); tc
    /// netem, nftables and tc filters need kernel modules this CI kernel lacks.
    /// Idempotent.
    pub fn cut_wifi(&self) -> io::Result<()> {
        let pins = [
            (&self.srv, self.wifi_client_ip()),
            (&self.cli, self.wifi_server_ip()),
        ];
        for (ns, peer) in pins {
            let peer = peer.to_string();
            ip([
                "-n",
                ns.as_str(),
                "neigh",
                "replace",
                peer.as_str(),
                "lladdr",
                NOWHERE_MAC,
                "dev",
                "wifi",
                "nud",
                "permanent",
            ])?;
        }
        Ok(())
    }

    /// Undoes [`TwoPathNet::cut_wifi`]; the next packet re-resolves the real
    /// MAC via ARP, so established connections recover on their next
    /// retransmission. Idempotent.
    pub fn restore_wifi(&self) -> io::Result<()> {
        for ns in [&self.srv, &self.cli] {
            // Plain `neigh flush` skips permanent entries; `nud all` does not.
            ip([
                "-n",
                ns.as_str(),
                "neigh",
                "flush",
                "dev",
                "wifi",
                "nud",
                "all",
            ])?;
        }
        Ok(())
    }
}

impl Drop for TwoPathNet {
    fn drop(&mut self) {
        // Deleting a namespace destroys the veth ends inside it (and with them
        // their peers), once no socket or process still holds the namespace.
        for ns in [&self.cli, &self.srv] {
            if Path::new(NETNS_DIR).join(ns).exists() {
                if let Err(e) = ip(["netns", "del", ns.as_str()]) {
                    eprintln!("TwoPathNet: cannot delete namespace {ns}: {e}");
                }
            }
        }
    }
}

/// Runs `f` on a fresh thread that has joined network namespace `ns`, and
/// returns its result (re-raising its panic). Sockets created inside `f` stay
/// in that namespace for their whole life, even when used from other threads
/// or a tokio runtime afterwards. Panics if the namespace cannot be entered.
pub fn in_namespace<T: Send>(ns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = netns_path(ns);
    let handle =
        File::open(&path).unwrap_or_else(|e| panic!("cannot open {}: {e}", path.display()));
    std::thread::scope(|scope| {
        let thread = scope.spawn(|| {
            // SAFETY: `handle` is an open namespace file for the whole call.
            // setns(CLONE_NEWNET) switches only the calling thread, which is
            // private to this function and exits once `f` returns, so no other
            // code ever runs in a namespace it did not ask for.
            let rc = unsafe { libc::setns(handle.as_raw_fd(), libc::CLONE_NEWNET) };
            if rc != 0 {
                panic!(
                    "setns into {} failed: {}",
                    path.display(),
                    io::Error::last_os_error()
                );
            }
            f()
        });
        match thread.join() {
            Ok(value) => value,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}

/// A listening socket bound inside `ns`.
pub fn tcp_listen_in(ns: &str, addr: SocketAddr) -> io::Result<TcpListener> {
    in_namespace(ns, || TcpListener::bind(addr))
}

/// A TCP connection made from inside `ns`.
pub fn tcp_connect_in(ns: &str, addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    in_namespace(ns, || TcpStream::connect_timeout(&addr, timeout))
}

/// Sets `/proc/sys/<key with dots as slashes>` for namespace `ns` only, e.g.
/// `set_sysctl(ns, "net.ipv4.tcp_retries2", "5")` to make dead-peer detection
/// take seconds instead of minutes.
pub fn set_sysctl(ns: &str, key: &str, value: &str) -> io::Result<()> {
    let path = PathBuf::from("/proc/sys").join(key.replace('.', "/"));
    in_namespace(ns, || std::fs::write(path, value))
}

/// A `Command` that runs `program` inside `ns` through `ip netns exec`; add
/// arguments, env and stdio to it as usual.
pub fn netns_command(ns: &str, program: impl AsRef<OsStr>) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(program);
    cmd
}

/// Spawns `cmd` inside `ns` via `ip netns exec` (which execs in place, so the
/// Child's pid is the program's own). Program, arguments, environment changes
/// and working directory are carried over; stdio is not (std offers no way to
/// read it back from a `Command`), so stdin is null and stdout/stderr are
/// inherited. Use [`netns_command`] when you need pipes. Panics if the spawn
/// fails. Kill and wait the child yourself (or wrap it in [`KillOnDrop`]): a
/// leftover child keeps the namespace alive and can keep cargo's output pipe
/// open.
pub fn spawn_in_namespace(ns: &str, cmd: Command) -> Child {
    let mut wrapped = netns_command(ns, cmd.get_program());
    wrapped.args(cmd.get_args());
    for (key, value) in cmd.get_envs() {
        match value {
            Some(value) => wrapped.env(key, value),
            None => wrapped.env_remove(key),
        };
    }
    if let Some(dir) = cmd.get_current_dir() {
        wrapped.current_dir(dir);
    }
    wrapped.stdin(Stdio::null());
    wrapped
        .spawn()
        .unwrap_or_else(|e| panic!("cannot spawn {cmd:?} in namespace {ns}: {e}"))
}

/// Kills and reaps the child when dropped, so a panicking test does not leave
/// a server running inside a namespace.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn netns_path(ns: &str) -> PathBuf {
    Path::new(NETNS_DIR).join(ns)
}

/// Namespace names kept within the 15-byte interface-name limit so they can
/// double as interface names: `r<tag:≤4>-<pid base36>-<index base36><s|c>`.
fn ns_names(tag: &str, pid: u32, index: u32) -> (String, String) {
    let tag: String = tag
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(4)
        .collect();
    let stem = format!("r{tag}-{}-{}", base36(pid), base36(index % 1296));
    (format!("{stem}s"), format!("{stem}c"))
}

fn base36(mut n: u32) -> String {
    const DIGITS: &[u8; 36] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = Vec::new();
    loop {
        out.push(DIGITS[(n % 36) as usize]);
        n /= 36;
        if n == 0 {
            break;
        }
    }
    out.reverse();
    String::from_utf8(out).unwrap_or_default()
}

/// Pid encoded in one of our namespace names, if `name` is one.
fn pid_of_ns_name(name: &str) -> Option<u32> {
    let rest = name.strip_prefix('r')?;
    let mut parts = rest.split('-');
    let tag = parts.next()?;
    let pid = parts.next()?;
    let last = parts.next()?;
    let well_formed = parts.next().is_none()
        && tag.len() <= 4
        && tag.bytes().all(|b| b.is_ascii_alphanumeric())
        && (2..=3).contains(&last.len())
        && (last.ends_with('s') || last.ends_with('c'))
        && last[..last.len() - 1]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric());
    if !well_formed || pid.is_empty() || pid.len() > 7 {
        return None;
    }
    u32::from_str_radix(pid, 36).ok()
}

/// Deletes namespaces of ours whose creating process is gone (a run that was
/// killed before Drop could run), so they do not pile up across runs.
fn sweep_stale_namespaces() {
    let Ok(entries) = std::fs::read_dir(NETNS_DIR) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(pid) = pid_of_ns_name(name) else {
            continue;
        };
        if !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = ip(["netns", "del", name]);
        }
    }
}

pub fn ip<I, S>(args: I) -> io::Result<()>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new("ip");
    cmd.args(args);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot run {cmd:?}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )))
    }
}
