//! Writing responses: heads, bodies from memory, file bodies with `sendfile` (or positioned
//! reads where it is missing), multipart parts; waiting for the socket with the write-stall
//! timeout; stopping at safe points for a takeover, a shutdown or a file rewritten in place.

use super::end::Ending;
use super::progress::BodyId;
use super::Connection;
use crate::files::Source;
use crate::ops::access_log::{AccessRecord, BodyEnd};
use crate::respond::{Body, Response};
use crate::sys;
use bytes::BytesMut;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::Interest;
use tokio::time::Instant;

/// Largest sendfile call; bounded so milestones and cancellation checks happen regularly.
const SENDFILE_CHUNK: usize = 1 << 20;
/// Bodies larger than this turn on `TCP_NOTSENT_LOWAT` for their connection.
const LOWAT_FROM: u64 = 1 << 20;
/// How often a sender blocked on a slow reader records the reader's progress.
const BLOCKED_SETTLE: Duration = Duration::from_millis(250);
/// A file body's last bytes, read into memory before the final version check and written from
/// there (never more than this, and never more than the body).
const TAIL: u64 = 16 * 1024;
/// Positioned reads where `sendfile` is missing (measured: 8 KiB reads reach 0.31 GB/s, 256 KiB
/// reads 1.39 GB/s).
const READ_SIZE: u64 = 256 * 1024;

/// Plaintext encrypted and written at a time on a TLS connection: four full records (measured
/// in docs/benchmarks.md).
const TLS_CHUNK: u64 = 64 * 1024;
/// When a chunk about to be sent is not in the page cache, this much (from the chunk's start)
/// is read in off the runtime first.
#[cfg(target_os = "linux")]
const WARM_AHEAD: u64 = 4 << 20;

/// Why the `sendfile` loop stopped short.
#[cfg(target_os = "linux")]
enum SendfileEnd {
    /// sendfile cannot serve this file (some file systems): fall back to reads from here.
    Unsupported(u64),
    End(Ending),
}

#[cfg(target_os = "linux")]
impl From<Ending> for SendfileEnd {
    fn from(e: Ending) -> Self {
        SendfileEnd::End(e)
    }
}

impl Connection {
    /// Writes a response whose request's head was read at `received`. HEAD responses arrive
    /// with an empty body already. `line`: the access log record, handed to the body's
    /// accounting (written when it ends) or, for a response without body, written here.
    pub(super) async fn send(
        &mut self,
        resp: Response,
        close: bool,
        http10: bool,
        received: std::time::Instant,
        mut line: Option<Box<AccessRecord>>,
    ) -> Result<(), Ending> {
        // Taken over while deciding: send nothing. (At shutdown a decided answer still goes out.)
        if self.handle.taken_over() {
            return Err(Ending::TakenOver);
        }
        let status = resp.head.status();
        self.svc.metrics().response(status);
        if let Some(l) = &mut line {
            l.status = status.code();
            l.body_start = resp.body_start;
        }
        let result = self.send_response(resp, close, http10, &mut line).await;
        if result.is_ok() {
            self.svc.metrics().request_done(received.elapsed());
        }
        if let Some(mut l) = line {
            // Not taken by a body: nothing of a body was sent.
            let ended = match &result {
                Ok(()) => BodyEnd::Complete,
                Err(end) => end.body_end(),
            };
            l.end(ended, 0, 0);
            self.svc.ops().access_log.write(l);
        }
        result
    }

    async fn send_response(
        &mut self,
        resp: Response,
        close: bool,
        http10: bool,
        line: &mut Option<Box<AccessRecord>>,
    ) -> Result<(), Ending> {
        let Response {
            head, body, claim, ..
        } = resp;
        let head = head.finish(close, http10);
        match body {
            Body::Empty => self.write(&head, false, None).await,
            Body::Bytes(bytes) => {
                let start = self.deliveries.written() + head.len() as u64;
                let body = self
                    .deliveries
                    .track(claim, bytes.len() as u64, start, line.take());
                if self.tls.is_none() {
                    // Head and body in one vectored send, without copying them together.
                    let sent = self.stream.try_write_vectored(&[
                        std::io::IoSlice::new(&head),
                        std::io::IoSlice::new(&bytes),
                    ]);
                    match sent {
                        Ok(n) => {
                            self.deliveries.wrote(n as u64, Some(body));
                            let rest = n.saturating_sub(head.len());
                            if n < head.len() {
                                self.write(&head[n..], true, Some(body)).await?;
                            }
                            return self.write(&bytes[rest..], false, Some(body)).await;
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(Ending::from_io(e)),
                    }
                }
                // Through TLS one buffer makes one record; a full socket waits in `write`.
                let mut both = BytesMut::with_capacity(head.len() + bytes.len());
                both.extend_from_slice(&head);
                both.extend_from_slice(&bytes);
                self.write(&both, false, Some(body)).await
            }
            Body::File { source, range } => {
                if range.len() > LOWAT_FROM {
                    self.bound_unsent();
                }
                self.write(&head, true, None).await?;
                let start = self.deliveries.written();
                let body = Some(
                    self.deliveries
                        .track(claim, range.len(), start, line.take()),
                );
                // All but the tail from the file; the tail is read into memory, then the file
                // is checked, then the tail is written: the last byte never leaves unless
                // every byte before it came from the version the head describes.
                let tail = (range.end - range.start).min(TAIL);
                self.send_file(&source, range.start, range.end - tail, body)
                    .await?;
                let last = read_tail(&source, range.end - tail, tail)?;
                self.final_check(&source)?;
                self.write(&last, false, body).await
            }
            Body::Multipart { source, parts, end } => {
                self.write(&head, true, None).await?;
                let len = parts
                    .iter()
                    .map(|(prefix, range)| prefix.len() as u64 + range.len())
                    .sum::<u64>()
                    + end.len() as u64;
                let start = self.deliveries.written();
                let body = Some(self.deliveries.track(claim, len, start, line.take()));
                for (prefix, range) in parts {
                    // Parts may be shorter than a progress interval: check for an in-place
                    // rewrite before each one.
                    self.between_chunks(&source, true)?;
                    self.write(&prefix, true, body).await?;
                    self.send_file(&source, range.start, range.end, body)
                        .await?;
                }
                // The closing delimiter is the body's end: it goes out only if every part
                // came from the version the head describes.
                self.final_check(&source)?;
                self.write(&end, false, body).await
            }
        }
    }

    /// Caps the unsent bytes the kernel may hold for this connection (`TCP_NOTSENT_LOWAT`), so a
    /// long transfer keeps "written" close to "acknowledged" and a peer that stops reading holds
    /// little. Only from the first large body on: measured on loopback with 64 connections of
    /// 100 KiB responses, a 16 KiB low-water mark cut throughput from 42k to 2.2k requests/s
    /// (writability then waits for ACKs), while a body that small bounds the queue by itself.
    fn bound_unsent(&mut self) {
        if self.lowat_set {
            return;
        }
        self.lowat_set = true;
        let lowat = self.svc.config().notsent_lowat;
        #[cfg(target_os = "linux")]
        if lowat > 0 {
            if let Err(e) = sys::set_notsent_lowat(self.fd(), lowat) {
                tracing::debug!(error = %e, "cannot set TCP_NOTSENT_LOWAT");
            }
        }
        #[cfg(not(target_os = "linux"))]
        let _ = lowat;
    }

    /// Waits until the socket can take more bytes, or the peer stalls past the write-stall
    /// timeout, or the connection is aborted.
    /// While blocked, progress is still settled every `BLOCKED_SETTLE` so that the record (and
    /// a HEAD's `Roam-Offset`) follows a slow reader.
    /// With `stoppable` (between file chunks), shutdown ends the wait; heads and small bodies
    /// are finished so that a request answered during shutdown gets its whole answer.
    pub(super) async fn writable(&mut self, stoppable: bool) -> Result<(), Ending> {
        let stall_deadline = Instant::now() + self.svc.config().write_stall_timeout;
        // Past shutdown, a head or small body in progress is finished (only a takeover, which
        // cannot happen any more, would interrupt it).
        let interruptible = stoppable || !self.handle.shutdown.is_cancelled();
        loop {
            tokio::select! {
                biased;
                _ = self.handle.abort.cancelled(), if interruptible => {
                    return Err(self.cancelled());
                }
                r = self.stream.writable() => {
                    return r.map_err(Ending::from_io);
                }
                _ = tokio::time::sleep_until(stall_deadline) => {
                    return Err(Ending::Stalled);
                }
                _ = tokio::time::sleep(BLOCKED_SETTLE), if self.deliveries.unsettled() => self.settle(),
            }
        }
    }

    /// Writes all of `buf`. With `more`, tells the kernel a body follows so the head shares
    /// its segment. `body`: the tracked body that (the end of) `buf` belongs to.
    ///
    /// Writes first and waits only when the socket is full: the usual response goes out without
    /// registering any wake-up.
    async fn write(
        &mut self,
        mut buf: &[u8],
        more: bool,
        body: Option<BodyId>,
    ) -> Result<(), Ending> {
        if self.tls.is_some() {
            // Through TLS `more` keeps the records in our buffer, to leave with what follows.
            self.tls_encrypt(buf, body)?;
            return if more {
                Ok(())
            } else {
                self.flush_tls(false).await
            };
        }
        while !buf.is_empty() {
            let fd = self.fd();
            let r = self.stream.try_io(Interest::WRITABLE, || {
                #[cfg(target_os = "linux")]
                if more {
                    return sys::send_more(fd, buf);
                }
                let _ = (fd, more);
                self.stream.try_write(buf)
            });
            match r {
                Ok(n) => {
                    self.deliveries.wrote(n as u64, body);
                    buf = &buf[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.settle();
                    self.writable(false).await?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Ending::from_io(e)),
            }
        }
        Ok(())
    }

    /// Sends `[start, end)` of `file`, with sendfile where the platform has it.
    async fn send_file(
        &mut self,
        file: &Source,
        start: u64,
        end: u64,
        body: Option<BodyId>,
    ) -> Result<(), Ending> {
        if self.tls.is_some() {
            return self.encrypted_loop(file, start, end, body).await;
        }
        // Multipath TCP copies what it is given into its own buffers (to send it again on
        // another subflow), so `sendfile` is no zero-copy there: measured on loopback it was
        // slower than reading and writing and cost more CPU per byte
        // (scripts/mptcp-sendfile.py, docs/benchmarks.md). A connection that fell back to TCP
        // is a TCP socket again, and gets `sendfile`.
        #[cfg(target_os = "linux")]
        if self.transport == sys::Transport::Mptcp && sys::mptcp_active(self.fd()) {
            return self.copy_loop(file, start, end, body).await;
        }
        #[cfg(target_os = "linux")]
        {
            match self.sendfile_loop(file, start, end, body).await {
                Err(SendfileEnd::Unsupported(pos)) => self.read_loop(file, pos, end, body).await,
                Err(SendfileEnd::End(e)) => Err(e),
                Ok(()) => Ok(()),
            }
        }
        #[cfg(not(target_os = "linux"))]
        {
            self.read_loop(file, start, end, body).await
        }
    }

    /// Before a body's last bytes: abort if the file is no longer the version the body started
    /// with, so that no client ever receives a complete body spliced from two versions.
    fn final_check(&self, file: &Source) -> Result<(), Ending> {
        if file.changed() {
            return Err(Ending::FileChanged(
                "file changed before the end of the body",
            ));
        }
        Ok(())
    }

    /// After `n` more body bytes of a file went out: every `--progress-interval` bytes
    /// (counted in `since_settle`), a milestone settles progress and checks the file; then
    /// [`Connection::between_chunks`].
    fn chunk_sent(&mut self, file: &Source, since_settle: &mut u64, n: u64) -> Result<(), Ending> {
        *since_settle += n;
        let milestone = *since_settle >= self.svc.config().progress_interval;
        if milestone {
            *since_settle = 0;
            self.settle();
        }
        self.between_chunks(file, milestone)
    }

    /// Between chunks: stop if the connection was taken over or the server is stopping, and
    /// abort if the file was rewritten in place (never a body spliced from two versions).
    fn between_chunks(&self, file: &Source, check_file: bool) -> Result<(), Ending> {
        if self.handle.abort.is_cancelled() {
            return Err(self.cancelled());
        }
        if check_file && file.changed() {
            return Err(Ending::FileChanged("file changed during transfer"));
        }
        Ok(())
    }

    /// Makes sure `[pos, pos + len)` of the file is in the page cache before a runtime thread
    /// sends or reads it, so that a cold file never blocks the other connections on this
    /// thread: if the chunk's last byte is not cached (one non-blocking one-byte read), up to
    /// [`WARM_AHEAD`] bytes from `pos` are read in on the blocking pool while this task waits.
    /// Returns how far the file is now known to be warm.
    #[cfg(target_os = "linux")]
    async fn warm(&self, file: &Source, pos: u64, len: u64, end: u64) -> u64 {
        let fd = file.file.as_raw_fd();
        // A file that one read-ahead covers and that was found cached within the last second
        // is not probed again: under load every response of a hot file would pay a system
        // call for it.
        let small = file.opened_len() <= WARM_AHEAD;
        if len == 0 || (small && file.recently_warm()) {
            return pos + len;
        }
        if sys::cached(fd, pos + len - 1) != Some(false) {
            if small {
                file.mark_warm();
            }
            return pos + len;
        }
        let upto = (pos + WARM_AHEAD.max(len)).min(end);
        let f = Arc::clone(&file.file);
        let count = usize::try_from(upto - pos).unwrap_or(usize::MAX);
        let read = tokio::task::spawn_blocking(move || sys::read_ahead(f.as_raw_fd(), pos, count));
        match read.await {
            Ok(Ok(())) => {}
            // The send reads the data itself, and reports a failure as it would have.
            Ok(Err(e)) => tracing::debug!(error = %e, "readahead failed"),
            Err(e) => tracing::debug!(error = %e, "readahead task failed"),
        }
        if small && pos == 0 {
            file.mark_warm();
        }
        upto
    }

    #[cfg(target_os = "linux")]
    async fn sendfile_loop(
        &mut self,
        file: &Source,
        start: u64,
        end: u64,
        body: Option<BodyId>,
    ) -> Result<(), SendfileEnd> {
        let file_fd = file.file.as_raw_fd();
        let mut pos = start;
        let mut since_settle = 0u64;
        let mut warm_to = start;
        while pos < end {
            let fd = self.fd();
            let want = usize::try_from(end - pos)
                .unwrap_or(usize::MAX)
                .min(SENDFILE_CHUNK);
            if pos + want as u64 > warm_to {
                warm_to = self.warm(file, pos, want as u64, end).await;
            }
            match self
                .stream
                .try_io(Interest::WRITABLE, || sys::sendfile(fd, file_fd, pos, want))
            {
                Ok(0) => {
                    return Err(SendfileEnd::End(Ending::FileChanged(
                        "file shrank during transfer",
                    )))
                }
                Ok(n) => {
                    pos += n as u64;
                    self.deliveries.wrote(n as u64, body);
                    self.chunk_sent(file, &mut since_settle, n as u64)
                        .map_err(SendfileEnd::End)?;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.settle();
                    self.writable(true).await?;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e)
                    if pos == start
                        && matches!(
                            e.raw_os_error(),
                            Some(libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP)
                        ) =>
                {
                    return Err(SendfileEnd::Unsupported(pos));
                }
                Err(e) => return Err(SendfileEnd::End(Ending::from_io(e))),
            }
        }
        Ok(())
    }

    /// Through TLS: positioned reads of whole records' worth, encrypted, written; progress
    /// settled at the same milestones as `sendfile`. The reads hit the page cache like
    /// `sendfile` does, on this thread.
    async fn encrypted_loop(
        &mut self,
        file: &Source,
        start: u64,
        end: u64,
        body: Option<BodyId>,
    ) -> Result<(), Ending> {
        let mut plain = vec![0u8; (end - start).min(TLS_CHUNK) as usize];
        let mut pos = start;
        let mut since_settle = 0u64;
        #[cfg(target_os = "linux")]
        let mut warm_to = start;
        while pos < end {
            let len = (end - pos).min(TLS_CHUNK) as usize;
            #[cfg(target_os = "linux")]
            if pos + len as u64 > warm_to {
                warm_to = self.warm(file, pos, len as u64, end).await;
            }
            read_exact_at(file, &mut plain[..len], pos)?;
            self.tls_encrypt(&plain[..len], body)?;
            pos += len as u64;
            self.flush_tls(true).await?;
            self.chunk_sent(file, &mut since_settle, len as u64)?;
        }
        Ok(())
    }

    /// Multipath TCP: positioned reads into one reused buffer (from the page cache, on this
    /// thread, as `sendfile` reads), then ordinary writes; progress settled at the same
    /// milestones as `sendfile`.
    #[cfg(target_os = "linux")]
    async fn copy_loop(
        &mut self,
        file: &Source,
        start: u64,
        end: u64,
        body: Option<BodyId>,
    ) -> Result<(), Ending> {
        let mut chunk = vec![0u8; (end - start).min(READ_SIZE) as usize];
        let mut pos = start;
        let mut since_settle = 0u64;
        let mut warm_to = start;
        while pos < end {
            let len = (end - pos).min(READ_SIZE) as usize;
            if pos + len as u64 > warm_to {
                warm_to = self.warm(file, pos, len as u64, end).await;
            }
            read_exact_at(file, &mut chunk[..len], pos)?;
            let mut rest = &chunk[..len];
            while !rest.is_empty() {
                match self.stream.try_write(rest) {
                    Ok(n) => {
                        rest = &rest[n..];
                        self.deliveries.wrote(n as u64, body);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.settle();
                        self.writable(true).await?;
                    }
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Ending::from_io(e)),
                }
            }
            pos += len as u64;
            self.chunk_sent(file, &mut since_settle, len as u64)?;
        }
        Ok(())
    }

    /// The portable path: positioned reads on the blocking pool in large chunks, then ordinary
    /// writes.
    async fn read_loop(
        &mut self,
        file: &Source,
        start: u64,
        end: u64,
        body: Option<BodyId>,
    ) -> Result<(), Ending> {
        let mut pos = start;
        while pos < end {
            let len = (end - pos).min(READ_SIZE) as usize;
            let f = Arc::clone(&file.file);
            let chunk = tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len];
                let n = read_at(&f, &mut buf, pos)?;
                buf.truncate(n);
                Ok::<_, io::Error>(buf)
            })
            .await
            .map_err(|e| Ending::NetworkFailed(io::Error::other(e)))?
            .map_err(|e| {
                tracing::warn!(error = %e, "file read failed mid-transfer");
                Ending::FileChanged("file read failed")
            })?;
            if chunk.is_empty() {
                return Err(Ending::FileChanged("file shrank during transfer"));
            }
            let mut rest: &[u8] = &chunk;
            while !rest.is_empty() {
                self.writable(true).await?;
                match self.stream.try_write(rest) {
                    Ok(n) => {
                        rest = &rest[n..];
                        self.deliveries.wrote(n as u64, body);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.settle(),
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(Ending::from_io(e)),
                }
            }
            pos += chunk.len() as u64;
            self.settle();
            self.between_chunks(file, true)?;
        }
        Ok(())
    }
}

/// Reads `[at, at + len)` of the file whole (`len` at most [`TAIL`]). The pages were usually
/// just read by `sendfile`'s neighbour calls or are the end of a small file, so this is a
/// page-cache copy. A short read means the file shrank.
fn read_tail(file: &Source, at: u64, len: u64) -> Result<Vec<u8>, Ending> {
    let mut buf = vec![0u8; len as usize];
    read_exact_at(file, &mut buf, at)?;
    Ok(buf)
}

/// Fills `buf` from `pos` of the file: a short read means the file shrank, a failed one that
/// it can no longer be read; either ends the body.
fn read_exact_at(file: &Source, buf: &mut [u8], pos: u64) -> Result<(), Ending> {
    match read_at(&file.file, buf, pos) {
        Ok(n) if n == buf.len() => Ok(()),
        Ok(_) => Err(Ending::FileChanged("file shrank during transfer")),
        Err(e) => {
            tracing::warn!(error = %e, "file read failed mid-transfer");
            Err(Ending::FileChanged("file read failed"))
        }
    }
}

#[cfg(unix)]
fn read_at(file: &File, buf: &mut [u8], pos: u64) -> io::Result<usize> {
    use std::os::unix::fs::FileExt;
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], pos + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}
