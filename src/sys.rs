//! The few system calls roam needs that std, tokio and socket2 do not wrap: reading what the
//! peer's TCP acknowledged, zero-copy file sends, and confined opens. All of the crate's `unsafe`
//! lives here; every other module is `#![deny(unsafe_code)]`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::RawFd;
#[cfg(target_os = "linux")]
use std::os::fd::{FromRawFd, OwnedFd};

/// What the kernel can tell about the bytes a TCP connection has sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AckCounter {
    /// `tcpi_bytes_acked`: bytes the peer acknowledged over the connection's whole life
    /// (Linux 4.1+). Counts a FIN we sent as one byte once it is acknowledged.
    BytesAcked(u64),
    /// `SIOCOUTQ`: bytes written but not yet acknowledged (sent or not), for kernels whose
    /// `tcp_info` is too short to hold `tcpi_bytes_acked`.
    Outstanding(u64),
    /// No way to ask on this platform: callers must fall back to bytes written.
    Unknown,
}

/// Reads `TCP_INFO`: the struct (zero where the kernel wrote nothing) and how many bytes of it
/// the kernel filled, which is less than its size on kernels older than our `libc`.
#[cfg(target_os = "linux")]
fn tcp_info(fd: RawFd) -> io::Result<(libc::tcp_info, usize)> {
    let mut info = std::mem::MaybeUninit::<libc::tcp_info>::zeroed();
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable buffer of `len` bytes that lives across the call; the kernel
    // writes at most `len` bytes and stores the number written back into `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised, a valid bit pattern for this plain C struct of integers; the
    // kernel overwrote its first `len` bytes with valid values.
    Ok((unsafe { info.assume_init() }, len as usize))
}

/// Asks the kernel how far the peer's TCP has acknowledged. Works after `EPIPE` and
/// `ECONNRESET` (the counters outlive the connection) but not after the socket is closed, so
/// callers read it before dropping the stream.
#[cfg(target_os = "linux")]
pub fn ack_counter(fd: RawFd) -> io::Result<AckCounter> {
    let (info, filled) = tcp_info(fd)?;
    let needed =
        std::mem::offset_of!(libc::tcp_info, tcpi_bytes_acked) + std::mem::size_of::<u64>();
    if filled >= needed {
        return Ok(AckCounter::BytesAcked(info.tcpi_bytes_acked));
    }
    outstanding_bytes(fd).map(AckCounter::Outstanding)
}

/// Portable stub: platforms without `TCP_INFO` report nothing and callers count bytes written.
#[cfg(not(target_os = "linux"))]
pub fn ack_counter(_fd: RawFd) -> io::Result<AckCounter> {
    Ok(AckCounter::Unknown)
}

/// The transport under an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// TCP, including a client that did not ask for Multipath TCP on an MPTCP listener (the
    /// kernel hands such a connection over as a plain TCP socket).
    Tcp,
    /// Multipath TCP: one connection over one or more subflows. Its acknowledgements are read
    /// at the data level (`MPTCP_INFO`), never from one subflow's `TCP_INFO`.
    Mptcp,
}

/// `IPPROTO_MPTCP` (include/uapi/linux/in.h).
pub const IPPROTO_MPTCP: libc::c_int = 262;
/// `SOL_MPTCP` (include/linux/socket.h); libc does not define it.
#[cfg(target_os = "linux")]
const SOL_MPTCP: libc::c_int = 284;
/// `MPTCP_INFO` (include/uapi/linux/mptcp.h).
#[cfg(target_os = "linux")]
const MPTCP_INFO: libc::c_int = 1;

/// `struct mptcp_info` (include/uapi/linux/mptcp.h), up to the fields roam reads. Kernels fill
/// a prefix: 5.9 up to `rcv_nxt`, 6.5 adds the byte counters.
#[cfg(target_os = "linux")]
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct MptcpInfo {
    subflows: u8,
    add_addr_signal: u8,
    add_addr_accepted: u8,
    subflows_max: u8,
    add_addr_signal_max: u8,
    add_addr_accepted_max: u8,
    flags: u32,
    token: u32,
    write_seq: u64,
    snd_una: u64,
    rcv_nxt: u64,
    local_addr_used: u8,
    local_addr_max: u8,
    csum_enabled: u8,
    retransmits: u32,
    bytes_retrans: u64,
    bytes_sent: u64,
    bytes_received: u64,
    bytes_acked: u64,
}

/// The transport of an accepted socket, from `SO_PROTOCOL`.
#[cfg(target_os = "linux")]
pub fn transport(fd: RawFd) -> Transport {
    let mut proto: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `proto` is a live c_int and `len` its exact size; the kernel writes at most `len`
    // bytes.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_PROTOCOL,
            (&mut proto as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc == 0 && proto == IPPROTO_MPTCP {
        Transport::Mptcp
    } else {
        Transport::Tcp
    }
}

/// Portable stub: only Linux has Multipath TCP.
#[cfg(not(target_os = "linux"))]
pub fn transport(_fd: RawFd) -> Transport {
    Transport::Tcp
}

/// Reads `MPTCP_INFO`: the struct and how many bytes of it the kernel filled. Fails once the
/// connection has fallen back to TCP (and on kernels before 5.16, which cannot read it from a
/// socket).
#[cfg(target_os = "linux")]
fn mptcp_info(fd: RawFd) -> io::Result<(MptcpInfo, usize)> {
    let mut info = MptcpInfo::default();
    let mut len = std::mem::size_of::<MptcpInfo>() as libc::socklen_t;
    // SAFETY: `info` is a writable, plain-data struct of `len` bytes that lives across the
    // call; the kernel writes at most `len` bytes and stores the number written in `len`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            SOL_MPTCP,
            MPTCP_INFO,
            (&mut info as *mut MptcpInfo).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((info, len as usize))
}

/// What the peer acknowledged, for a connection of `transport`.
///
/// On Multipath TCP this is the data level: `mptcpi_bytes_acked` (Linux 6.5+), the bytes of the
/// connection's stream the peer's MPTCP stack acknowledged, whichever subflows carried them.
/// `TCP_INFO` on an MPTCP socket describes its first subflow only, which after a path switch
/// stops counting while the connection goes on. Kernels that fill less of `mptcp_info`, and
/// connections that fell back to TCP (where `MPTCP_INFO` fails), use `SIOCOUTQ`, which the
/// kernel answers at the connection level in both cases.
#[cfg(target_os = "linux")]
pub fn ack_counter_on(fd: RawFd, transport: Transport) -> io::Result<AckCounter> {
    match transport {
        Transport::Tcp => ack_counter(fd),
        Transport::Mptcp => {
            let needed = std::mem::offset_of!(MptcpInfo, bytes_acked) + std::mem::size_of::<u64>();
            match mptcp_info(fd) {
                Ok((info, filled)) if filled >= needed => {
                    Ok(AckCounter::BytesAcked(info.bytes_acked))
                }
                _ => outstanding_bytes(fd).map(AckCounter::Outstanding),
            }
        }
    }
}

/// Portable stub.
#[cfg(not(target_os = "linux"))]
pub fn ack_counter_on(fd: RawFd, _transport: Transport) -> io::Result<AckCounter> {
    ack_counter(fd)
}

/// True when nothing sent is waiting for an acknowledgement. TCP: no segment in flight
/// (`tcpi_unacked`). Multipath TCP: every byte sent at the data level is acknowledged
/// (`mptcpi_bytes_sent` = `mptcpi_bytes_acked`, Linux 6.5+); on older kernels or after a
/// fallback, the TCP answer (a fallen-back connection has one subflow, which `TCP_INFO`
/// describes).
#[cfg(target_os = "linux")]
pub fn nothing_in_flight(fd: RawFd, transport: Transport) -> io::Result<bool> {
    if transport == Transport::Mptcp {
        let needed = std::mem::offset_of!(MptcpInfo, bytes_acked) + std::mem::size_of::<u64>();
        if let Ok((info, filled)) = mptcp_info(fd) {
            if filled >= needed {
                return Ok(info.bytes_sent <= info.bytes_acked);
            }
        }
    }
    Ok(tcp_info(fd)?.0.tcpi_unacked == 0)
}

/// True while a Multipath TCP connection is still one (it has not fallen back to TCP).
#[cfg(target_os = "linux")]
pub fn mptcp_active(fd: RawFd) -> bool {
    mptcp_info(fd).is_ok()
}

/// Whether the peer has ended its side of the connection, from the TCP state (`tcpi_state`):
/// a reset received moves the socket to `CLOSE`, a FIN received to `CLOSE_WAIT` (or, after our
/// own FIN, `LAST_ACK`, `CLOSING` or `TIME_WAIT`). `None` if the kernel cannot tell.
#[cfg(target_os = "linux")]
pub fn peer_ended(fd: RawFd) -> Option<PeerEnd> {
    // Linux's enum tcp_state (include/net/tcp_states.h).
    const TCP_TIME_WAIT: u8 = 6;
    const TCP_CLOSE: u8 = 7;
    const TCP_CLOSE_WAIT: u8 = 8;
    const TCP_LAST_ACK: u8 = 9;
    const TCP_CLOSING: u8 = 11;
    let state = tcp_info(fd).ok()?.0.tcpi_state;
    Some(match state {
        TCP_CLOSE => PeerEnd::Reset,
        TCP_CLOSE_WAIT | TCP_LAST_ACK | TCP_CLOSING | TCP_TIME_WAIT => PeerEnd::Closed,
        _ => PeerEnd::Open,
    })
}

/// What the peer did to its side of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerEnd {
    Open,
    /// It sent a FIN.
    Closed,
    /// It sent an RST (or the connection failed).
    Reset,
}

/// The smoothed round-trip time the kernel keeps for the connection (`tcpi_rtt`).
#[cfg(target_os = "linux")]
pub fn smoothed_rtt(fd: RawFd) -> io::Result<std::time::Duration> {
    Ok(std::time::Duration::from_micros(u64::from(
        tcp_info(fd)?.0.tcpi_rtt,
    )))
}

/// Bytes in the send queue not yet acknowledged by the peer (`SIOCOUTQ`, same value as
/// `TIOCOUTQ` on Linux).
#[cfg(target_os = "linux")]
pub fn outstanding_bytes(fd: RawFd) -> io::Result<u64> {
    let mut queued: libc::c_int = 0;
    // SAFETY: SIOCOUTQ writes one c_int through the pointer, which points at a live local.
    let rc = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued as *mut libc::c_int) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::try_from(queued).unwrap_or(0))
}

/// Whether the byte at `offset` of `file` is in the page cache: a one-byte read that refuses
/// to wait for the disk (`preadv2(RWF_NOWAIT)`, Linux 4.14+). `None` when the kernel or the
/// file system cannot tell (callers then read as before), or past the end of the file.
#[cfg(target_os = "linux")]
pub fn cached(file: RawFd, offset: u64) -> Option<bool> {
    let mut byte = 0u8;
    let iov = libc::iovec {
        iov_base: (&mut byte as *mut u8).cast(),
        iov_len: 1,
    };
    let off = libc::off_t::try_from(offset).ok()?;
    // SAFETY: one iovec pointing at a live local byte, length 1; the descriptor is borrowed
    // from a live owner for the call.
    let rc = unsafe { libc::preadv2(file, &iov, 1, off, libc::RWF_NOWAIT) };
    match rc {
        1 => Some(true),
        0 => None,
        _ => match io::Error::last_os_error().raw_os_error() {
            Some(libc::EAGAIN) => Some(false),
            _ => None,
        },
    }
}

/// Reads `[offset, offset + len)` of `file` into the page cache, waiting for the disk
/// (`readahead(2)`). Blocks: for the blocking pool only.
#[cfg(target_os = "linux")]
pub fn read_ahead(file: RawFd, offset: u64, len: usize) -> io::Result<()> {
    let off = libc::off64_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off64_t"))?;
    // SAFETY: plain integers and a descriptor borrowed from a live owner for the call.
    let rc = unsafe { libc::readahead(file, off, len) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Copies up to `count` bytes of `file` starting at `offset` to the socket without passing them
/// through user space. Returns the number of bytes the kernel accepted; `Ok(0)` with
/// `count > 0` means the file ended before `offset` (it was truncated).
#[cfg(target_os = "linux")]
pub fn sendfile(socket: RawFd, file: RawFd, offset: u64, count: usize) -> io::Result<usize> {
    let mut off = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset beyond off_t"))?;
    // SAFETY: both descriptors are borrowed from live owners for the duration of the call; the
    // offset pointer refers to a local the kernel may update.
    let rc = unsafe { libc::sendfile(socket, file, &mut off, count) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

/// One `recv(2)` into the spare capacity of `buf` (at least one byte must be spare); returns
/// how many bytes arrived, 0 when the peer closed its side.
#[cfg(unix)]
pub fn recv_into(socket: RawFd, buf: &mut bytes::BytesMut) -> io::Result<usize> {
    use bytes::BufMut;
    let spare = buf.chunk_mut();
    // SAFETY: `spare` is writable for `spare.len()` bytes; recv writes at most that many.
    let rc = unsafe { libc::recv(socket, spare.as_mut_ptr().cast(), spare.len(), 0) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: recv initialised the first `rc` bytes of the spare capacity.
    unsafe { buf.advance_mut(rc as usize) };
    Ok(rc as usize)
}

/// `send(2)` with `MSG_MORE`, so a response head shares a segment with the body that follows
/// (the kernel holds a partial segment until the next write instead of pushing it alone).
/// `MSG_NOSIGNAL` keeps a vanished peer from raising `SIGPIPE`.
#[cfg(target_os = "linux")]
pub fn send_more(socket: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a valid readable slice for its length during the call.
    let rc = unsafe {
        libc::send(
            socket,
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_MORE | libc::MSG_NOSIGNAL,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc as usize)
}

/// Caps the bytes that may sit in the send queue not yet handed to the network
/// (`TCP_NOTSENT_LOWAT`): the socket stops being writable while more than this is unsent, so
/// what we have written stays close to what the peer has acknowledged.
#[cfg(target_os = "linux")]
pub fn set_notsent_lowat(socket: RawFd, bytes: u32) -> io::Result<()> {
    let value = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
    // SAFETY: passes a pointer to a live c_int and its exact size.
    let rc = unsafe {
        libc::setsockopt(
            socket,
            libc::IPPROTO_TCP,
            libc::TCP_NOTSENT_LOWAT,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens `relative` (no leading slash) for reading below the directory `root`, letting the
/// kernel refuse any resolution that leaves `root` (`..`, absolute symlinks, symlinks whose
/// target escapes) with `openat2(RESOLVE_BENEATH)`. Symlinks that stay inside `root` work.
/// Returns `Ok(None)` when the kernel has no `openat2` (before Linux 5.6), so the caller can use
/// its portable check instead.
#[cfg(target_os = "linux")]
pub fn open_beneath(root: RawFd, relative: &std::ffi::CStr) -> io::Result<Option<OwnedFd>> {
    let mut how: libc::open_how = unsafe {
        // SAFETY: open_how is a plain C struct of integers; all-zero is valid.
        std::mem::zeroed()
    };
    how.flags = (libc::O_RDONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK) as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: `relative` is NUL-terminated and `how` is a live struct whose size we pass; the
    // syscall returns a new descriptor we take ownership of, or -1.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root,
            relative.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if rc < 0 {
        let err = io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::ENOSYS) {
            return Ok(None);
        }
        return Err(err);
    }
    // SAFETY: a non-negative return is a fresh descriptor owned by no one else.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(rc as RawFd) }))
}

/// Bytes available to this process on the file system holding `path` (`statvfs`: free blocks
/// for unprivileged users times the fragment size).
#[cfg(unix)]
pub fn free_space(path: &std::path::Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the path"))?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: `c` is NUL-terminated and `st` is a writable statvfs that outlives the call.
    if unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: zero-initialised plain C struct, filled by a successful statvfs.
    let st = unsafe { st.assume_init() };
    #[allow(clippy::unnecessary_cast)] // the field types differ between platforms
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The soft open-file limit, if there is one.
#[cfg(unix)]
pub fn fd_limit() -> Option<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a pointer to a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0
        || lim.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every unix
    Some(lim.rlim_cur as u64)
}

/// Raises the soft open-file limit to the hard limit: a server holding thousands of
/// connections needs more than the usual default of 1024 descriptors.
#[cfg(unix)]
pub fn raise_fd_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit through a pointer to a live local.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: setrlimit reads one rlimit from a pointer to a live local.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[allow(clippy::unnecessary_cast)] // rlim_t is not u64 on every unix
    Ok(lim.rlim_cur as u64)
}

/// True when the kernel offers TLS offload to sockets (the `tls` upper-layer protocol is built
/// in or loaded). Read once at start, to log which record path is in use.
pub fn kernel_tls_available() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_available_ulp")
        .is_ok_and(|ulps| ulps.split_whitespace().any(|u| u == "tls"))
}
