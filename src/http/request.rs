//! Request heads: bytes in, a validated [`Request`] out, on httparse. Enforces the framing rules
//! that keep a GET-only server safe from smuggling (RFC 9112 §6.3, §3.2) and the size limits.

use super::error::RequestError;

/// Size limits on a request head, validated once at start-up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Longest request line (method, target, version) before 414.
    pub max_request_line: usize,
    /// Largest head (request line plus header fields) before 431.
    pub max_head: usize,
    /// Most header fields before 431.
    pub max_headers: usize,
}

/// Hard upper bound for `Limits::max_headers`: the parser's header array lives on the stack.
pub const MAX_HEADERS_CEILING: usize = 256;

/// The request methods roam distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    /// Anything else: answered with 405.
    Other,
}

/// A parsed, framing-checked request head. Only the fields roam acts on are kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The request target as sent (origin-form or absolute-form).
    pub target: String,
    /// HTTP/1.0 rather than 1.1.
    pub http10: bool,
    /// Whether the client wants the connection kept open after this response.
    pub keep_alive: bool,
    /// A request body follows (only possible for methods we refuse): the connection must close
    /// after the answer, since we will not read it.
    pub has_body: bool,
    pub range: Option<String>,
    pub if_match: Option<String>,
    pub if_none_match: Option<String>,
    pub if_modified_since: Option<String>,
    pub if_unmodified_since: Option<String>,
    pub if_range: Option<String>,
}

impl Request {
    /// The conditional fields, as the precondition evaluation takes them.
    pub fn conditions(&self) -> super::precondition::Conditions<'_> {
        super::precondition::Conditions {
            if_match: self.if_match.as_deref(),
            if_none_match: self.if_none_match.as_deref(),
            if_modified_since: self.if_modified_since.as_deref(),
            if_unmodified_since: self.if_unmodified_since.as_deref(),
            if_range: self.if_range.as_deref(),
        }
    }
}

/// Tries to parse one request head from the front of `buf`. `Ok(None)` means more bytes are
/// needed (and the limits still allow them); `Ok(Some((req, n)))` consumed `n` bytes.
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<(Request, usize)>, RequestError> {
    // RFC 9112 §2.2: ignore empty lines before the request line.
    let skip = buf
        .iter()
        .position(|&b| b != b'\r' && b != b'\n')
        .unwrap_or(buf.len());
    let line_end = buf[skip..].iter().position(|&b| b == b'\n');
    match line_end {
        Some(end) if end > limits.max_request_line => return Err(RequestError::UriTooLong),
        None if buf.len() - skip > limits.max_request_line => return Err(RequestError::UriTooLong),
        _ => {}
    }
    let mut storage = [httparse::EMPTY_HEADER; MAX_HEADERS_CEILING];
    let headers = &mut storage[..limits.max_headers.min(MAX_HEADERS_CEILING)];
    let mut parsed = httparse::Request::new(headers);
    let consumed = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n > limits.max_head => {
            return Err(RequestError::HeadTooLarge)
        }
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() >= limits.max_head => {
            return Err(RequestError::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(RequestError::HeadTooLarge),
        Err(httparse::Error::Version) => {
            return Err(RequestError::Malformed("unsupported HTTP version"))
        }
        Err(_) => return Err(RequestError::Malformed("malformed request head")),
    };
    let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version)
    else {
        return Err(RequestError::Malformed("malformed request line"));
    };
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    let http10 = version == 0;
    let mut req = Request {
        method,
        target: target.to_owned(),
        http10,
        keep_alive: !http10,
        has_body: false,
        range: None,
        if_match: None,
        if_none_match: None,
        if_modified_since: None,
        if_unmodified_since: None,
        if_range: None,
    };
    let mut hosts = 0usize;
    let mut content_length: Option<u64> = None;
    let mut chunked_or_encoded = false;
    for h in parsed.headers.iter() {
        let name = h.name;
        if name.eq_ignore_ascii_case("host") {
            hosts += 1;
        } else if name.eq_ignore_ascii_case("content-length") {
            // RFC 9112 §6.3: differing or invalid lengths are unrecoverable framing errors.
            for part in ascii(h.value)?.split(',') {
                let part = part.trim();
                if part.is_empty() || part.len() > 19 || !part.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(RequestError::Malformed("invalid Content-Length"));
                }
                let n: u64 = part
                    .parse()
                    .map_err(|_| RequestError::Malformed("invalid Content-Length"))?;
                if content_length.is_some_and(|m| m != n) {
                    return Err(RequestError::Malformed("conflicting Content-Length"));
                }
                content_length = Some(n);
            }
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked_or_encoded = true;
        } else if name.eq_ignore_ascii_case("connection") {
            for token in ascii(h.value)?.split(',') {
                let token = token.trim();
                if token.eq_ignore_ascii_case("close") {
                    req.keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") && http10 {
                    req.keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("range") {
            set_once(&mut req.range, h.value, "Range")?;
        } else if name.eq_ignore_ascii_case("if-range") {
            set_once(&mut req.if_range, h.value, "If-Range")?;
        } else if name.eq_ignore_ascii_case("if-modified-since") {
            set_once(&mut req.if_modified_since, h.value, "If-Modified-Since")?;
        } else if name.eq_ignore_ascii_case("if-unmodified-since") {
            set_once(&mut req.if_unmodified_since, h.value, "If-Unmodified-Since")?;
        } else if name.eq_ignore_ascii_case("if-match") {
            append_list(&mut req.if_match, h.value)?;
        } else if name.eq_ignore_ascii_case("if-none-match") {
            append_list(&mut req.if_none_match, h.value)?;
        }
    }
    // RFC 9112 §3.2: a 1.1 request without exactly one Host, or any request with several, is 400.
    if hosts > 1 || (!http10 && hosts == 0) {
        return Err(RequestError::Malformed("a request needs exactly one Host"));
    }
    if chunked_or_encoded && content_length.is_some() {
        return Err(RequestError::Malformed(
            "Content-Length together with Transfer-Encoding",
        ));
    }
    req.has_body = chunked_or_encoded || content_length.is_some_and(|n| n > 0);
    if req.has_body && req.method != Method::Other {
        // We never read request bodies; one on a GET could hide a second request.
        return Err(RequestError::Malformed("GET and HEAD take no request body"));
    }
    if req.has_body {
        req.keep_alive = false;
    }
    Ok(Some((req, consumed)))
}

fn ascii(value: &[u8]) -> Result<&str, RequestError> {
    if value
        .iter()
        .all(|&b| (0x20..0x7f).contains(&b) || b == b'\t')
    {
        // Checked above: every byte is printable ASCII or HTAB.
        Ok(std::str::from_utf8(value).unwrap_or_default())
    } else {
        Err(RequestError::Malformed("non-ASCII header value"))
    }
}

fn set_once(
    slot: &mut Option<String>,
    value: &[u8],
    name: &'static str,
) -> Result<(), RequestError> {
    if slot.is_some() {
        return Err(RequestError::DuplicateField(name));
    }
    *slot = Some(ascii(value)?.trim().to_owned());
    Ok(())
}

/// List-valued fields may arrive split over several lines (RFC 9110 §5.3).
fn append_list(slot: &mut Option<String>, value: &[u8]) -> Result<(), RequestError> {
    let value = ascii(value)?.trim();
    match slot {
        Some(existing) => {
            existing.push_str(", ");
            existing.push_str(value);
        }
        None => *slot = Some(value.to_owned()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_request_line: 64,
        max_head: 512,
        max_headers: 8,
    };

    fn ok(raw: &str) -> (Request, usize) {
        parse(raw.as_bytes(), &LIMITS).unwrap().unwrap()
    }

    fn err(raw: &str) -> RequestError {
        parse(raw.as_bytes(), &LIMITS).unwrap_err()
    }

    #[test]
    fn simple_get() {
        let (r, n) = ok("GET /a HTTP/1.1\r\nHost: x\r\nRange: bytes=0-\r\n\r\nGET /b");
        assert_eq!(n, 45);
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.target, "/a");
        assert!(r.keep_alive && !r.http10);
        assert_eq!(r.range.as_deref(), Some("bytes=0-"));
    }

    #[test]
    fn http10_and_connection_tokens() {
        let (r, _) = ok("GET / HTTP/1.0\r\n\r\n");
        assert!(r.http10 && !r.keep_alive);
        let (r, _) = ok("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        assert!(r.keep_alive);
        let (r, _) = ok("GET / HTTP/1.1\r\nHost: x\r\nConnection: foo, close\r\n\r\n");
        assert!(!r.keep_alive);
        let (r, _) = ok("\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(r.target, "/");
    }

    #[test]
    fn partial_until_limits() {
        assert!(matches!(
            parse(b"GET / HTTP/1.1\r\nHost: x\r\n", &LIMITS),
            Ok(None)
        ));
        assert!(matches!(parse(b"GET /aaaa", &LIMITS), Ok(None)));
        let long = format!("GET /{} HTTP/1.1\r\n", "a".repeat(100));
        assert!(matches!(err(&long), RequestError::UriTooLong));
        assert!(matches!(err(&"a".repeat(65)), RequestError::UriTooLong));
        let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}\r\n", "v".repeat(600));
        assert!(matches!(err(&big), RequestError::HeadTooLarge));
        let many: String = (0..9).map(|i| format!("X{i}: v\r\n")).collect();
        assert!(matches!(
            err(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n")),
            RequestError::HeadTooLarge
        ));
    }

    #[test]
    fn framing_attacks() {
        for raw in [
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello",
            "GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0x10\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1, 2\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX: a\r\n b\r\n\r\n",
            "GET / HTTP/2.0\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nRange: bytes=0-1\r\nRange: bytes=2-3\r\n\r\n",
            "GET /\x01 HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            assert!(
                matches!(
                    err(raw),
                    RequestError::Malformed(_) | RequestError::DuplicateField(_)
                ),
                "{raw:?}"
            );
        }
        let non_ascii = b"GET / HTTP/1.1\r\nHost: x\r\nRange: bytes=\xff-\r\n\r\n";
        assert!(matches!(
            parse(non_ascii, &LIMITS),
            Err(RequestError::Malformed(_))
        ));
        // Content-Length: 0 is no body.
        assert!(
            !ok("GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
                .0
                .has_body
        );
        // Other methods with a body are parsed so they can get their 405, then close.
        let (r, _) = ok("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc");
        assert_eq!(r.method, Method::Other);
        assert!(r.has_body && !r.keep_alive);
    }

    #[test]
    fn list_fields_join() {
        let (r, _) =
            ok("GET / HTTP/1.1\r\nHost: x\r\nIf-None-Match: \"a\"\r\nIf-None-Match: \"b\"\r\n\r\n");
        assert_eq!(r.if_none_match.as_deref(), Some("\"a\", \"b\""));
    }
}
