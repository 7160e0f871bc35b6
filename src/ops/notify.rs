//! Readiness notification for systemd (`Type=notify`): one datagram to the socket named by
//! `NOTIFY_SOCKET` (sd_notify(3)). Without that variable (not started by a service manager),
//! nothing is sent.

use std::io;

/// The listeners are bound and serving.
pub const READY: &str = "READY=1";
/// Shutdown started: draining.
pub const STOPPING: &str = "STOPPING=1";

/// Sends `state` to the service manager; `Ok(false)` when there is none.
pub fn notify(state: &str) -> io::Result<bool> {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let socket = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = path.as_encoded_bytes();
    // A leading '@' names a socket in the abstract namespace.
    #[cfg(target_os = "linux")]
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.send_to_addr(state.as_bytes(), &addr)?;
        return Ok(true);
    }
    socket.send_to(state.as_bytes(), std::path::Path::new(&path))?;
    Ok(true)
}

/// [`notify`], logging a failure instead of returning it (the service manager then times the
/// start out, which says more than a failed start would).
pub fn tell(state: &str) {
    if let Err(e) = notify(state) {
        tracing::warn!(error = %e, state, "cannot notify the service manager");
    }
}
