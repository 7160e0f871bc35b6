//! Response heads: status codes and the bytes of a head, rendered into one buffer so the head
//! goes out in a single write.

use bytes::{BufMut, Bytes, BytesMut};
use std::fmt::Write as _;
use std::time::SystemTime;

/// The `Server` field value.
pub const SERVER: &str = concat!("roam/", env!("CARGO_PKG_VERSION"));

thread_local! {
    /// The `Date` and `Server` lines, formatted once per second per thread.
    static DATE_LINE: std::cell::RefCell<(u64, String)> = const { std::cell::RefCell::new((0, String::new())) };
}

/// The statuses roam sends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Ok,
    PartialContent,
    NotModified,
    BadRequest,
    NotFound,
    MethodNotAllowed,
    RequestTimeout,
    PreconditionFailed,
    UriTooLong,
    RangeNotSatisfiable,
    TooManyRequests,
    HeadersTooLarge,
    InternalServerError,
    ServiceUnavailable,
}

impl Status {
    pub fn code(self) -> u16 {
        match self {
            Status::Ok => 200,
            Status::PartialContent => 206,
            Status::NotModified => 304,
            Status::BadRequest => 400,
            Status::NotFound => 404,
            Status::MethodNotAllowed => 405,
            Status::RequestTimeout => 408,
            Status::PreconditionFailed => 412,
            Status::UriTooLong => 414,
            Status::RangeNotSatisfiable => 416,
            Status::TooManyRequests => 429,
            Status::HeadersTooLarge => 431,
            Status::InternalServerError => 500,
            Status::ServiceUnavailable => 503,
        }
    }

    fn reason(self) -> &'static str {
        match self {
            Status::Ok => "OK",
            Status::PartialContent => "Partial Content",
            Status::NotModified => "Not Modified",
            Status::BadRequest => "Bad Request",
            Status::NotFound => "Not Found",
            Status::MethodNotAllowed => "Method Not Allowed",
            Status::RequestTimeout => "Request Timeout",
            Status::PreconditionFailed => "Precondition Failed",
            Status::UriTooLong => "URI Too Long",
            Status::RangeNotSatisfiable => "Range Not Satisfiable",
            Status::TooManyRequests => "Too Many Requests",
            Status::HeadersTooLarge => "Request Header Fields Too Large",
            Status::InternalServerError => "Internal Server Error",
            Status::ServiceUnavailable => "Service Unavailable",
        }
    }
}

/// A field value as it goes into a head: strings and numbers are copied and printed directly
/// (every response carries several; the formatting machinery cost about 5 % of a 1 KiB
/// response's instructions), anything else through `format_args!`.
pub trait FieldValue {
    fn put(&self, buf: &mut BytesMut);
}

impl FieldValue for &str {
    fn put(&self, buf: &mut BytesMut) {
        buf.put_slice(self.as_bytes());
    }
}

impl FieldValue for &String {
    fn put(&self, buf: &mut BytesMut) {
        buf.put_slice(self.as_bytes());
    }
}

impl FieldValue for String {
    fn put(&self, buf: &mut BytesMut) {
        buf.put_slice(self.as_bytes());
    }
}

impl FieldValue for u64 {
    fn put(&self, buf: &mut BytesMut) {
        put_number(buf, *self);
    }
}

impl FieldValue for usize {
    fn put(&self, buf: &mut BytesMut) {
        put_number(buf, *self as u64);
    }
}

impl FieldValue for i32 {
    fn put(&self, buf: &mut BytesMut) {
        let mut b = itoa::Buffer::new();
        buf.put_slice(b.format(*self).as_bytes());
    }
}

impl FieldValue for std::fmt::Arguments<'_> {
    fn put(&self, buf: &mut BytesMut) {
        // Writing to a BytesMut cannot fail.
        let _ = buf.write_fmt(*self);
    }
}

/// Appends `n` in decimal.
pub fn put_number(buf: &mut BytesMut, n: u64) {
    let mut b = itoa::Buffer::new();
    buf.put_slice(b.format(n).as_bytes());
}

/// A response head being written: status line, `Date` and `Server` first, then fields.
#[derive(Debug)]
pub struct Head {
    buf: BytesMut,
    status: Status,
}

impl Head {
    pub fn new(status: Status) -> Head {
        let mut buf = BytesMut::with_capacity(320);
        buf.put_slice(b"HTTP/1.1 ");
        put_number(&mut buf, u64::from(status.code()));
        buf.put_u8(b' ');
        buf.put_slice(status.reason().as_bytes());
        buf.put_slice(b"\r\n");
        DATE_LINE.with(|cell| {
            let mut cached = cell.borrow_mut();
            let now = SystemTime::now();
            let second = now
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs());
            if cached.0 != second || cached.1.is_empty() {
                *cached = (
                    second,
                    format!(
                        "Date: {}\r\nServer: {SERVER}\r\n",
                        httpdate::fmt_http_date(now)
                    ),
                );
            }
            buf.put_slice(cached.1.as_bytes());
        });
        Head { buf, status }
    }

    pub fn status(&self) -> Status {
        self.status
    }

    /// Appends a field. Values are ours (numbers, validated strings), never raw client input.
    pub fn field(&mut self, name: &str, value: impl FieldValue) -> &mut Self {
        self.buf.put_slice(name.as_bytes());
        self.buf.put_slice(b": ");
        value.put(&mut self.buf);
        self.buf.put_slice(b"\r\n");
        self
    }

    /// Appends pre-rendered field lines (each ending in CRLF).
    pub fn raw(&mut self, lines: &[u8]) -> &mut Self {
        self.buf.put_slice(lines);
        self
    }

    /// Ends the head. `Connection: close` when we will close; `keep-alive` is spelled out only
    /// for HTTP/1.0 clients, for whom it is not the default.
    pub fn finish(mut self, close: bool, http10: bool) -> Bytes {
        if close {
            self.buf.put_slice(b"Connection: close\r\n");
        } else if http10 {
            self.buf.put_slice(b"Connection: keep-alive\r\n");
        }
        self.buf.put_slice(b"\r\n");
        self.buf.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Numbers, strings, ranges and formatted values render as their `Display` would.
    #[test]
    fn field_values_render_as_displayed() {
        use crate::http::range::ContentRange;
        let mut h = Head::new(Status::RangeNotSatisfiable);
        h.field("A", 0u64)
            .field("B", u64::MAX)
            .field("C", 12usize)
            .field("D", -3)
            .field("E", "text/plain")
            .field("F", String::from("x"))
            .field(
                "G",
                ContentRange::Satisfied {
                    first: 5,
                    last: 9,
                    complete: Some(10),
                },
            )
            .field(
                "H",
                ContentRange::Satisfied {
                    first: 0,
                    last: 0,
                    complete: None,
                },
            )
            .field("I", ContentRange::Unsatisfied { complete: 7 })
            .field("J", format_args!("b={}", 4));
        let bytes = h.finish(false, false);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 416 Range Not Satisfiable\r\n"),
            "{text}"
        );
        assert!(
            text.ends_with(
                "A: 0\r\nB: 18446744073709551615\r\nC: 12\r\nD: -3\r\nE: text/plain\r\n\
                 F: x\r\nG: bytes 5-9/10\r\nH: bytes 0-0/*\r\nI: bytes */7\r\nJ: b=4\r\n\r\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn head_layout() {
        let mut h = Head::new(Status::PartialContent);
        h.field("Content-Length", 5);
        let bytes = h.finish(true, false);
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with("HTTP/1.1 206 Partial Content\r\nDate: "));
        assert!(text.contains("\r\nServer: roam/"));
        assert!(text.ends_with("Content-Length: 5\r\nConnection: close\r\n\r\n"));
    }
}
