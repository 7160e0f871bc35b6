//! Request errors and the one place they become responses: [`RequestError::disposition`] is
//! the exhaustive match from every way a request can fail to a status, whether the connection
//! survives, and how loudly to log.

use super::response::Status;
use std::io;

/// Everything that can stop a request from being served normally.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The head breaks HTTP/1.1 syntax or framing rules.
    #[error("bad request: {0}")]
    Malformed(&'static str),
    /// A singleton field appeared twice.
    #[error("bad request: duplicate {0} field")]
    DuplicateField(&'static str),
    /// The request line exceeds the limit.
    #[error("request line too long")]
    UriTooLong,
    /// The head exceeds the size or field-count limit.
    #[error("request header fields too large")]
    HeadTooLarge,
    /// The head did not arrive within the header timeout.
    #[error("timed out reading the request head")]
    HeadTimeout,
    /// A method other than GET or HEAD.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The target is not origin-form or absolute-form.
    #[error("bad request target")]
    BadTarget,
    /// Unknown or malformed client ID, missing file, refused path. The reason is safe to show.
    #[error("not found: {0}")]
    NotFound(&'static str),
    /// This address minted IDs faster than `--mint-rate` allows.
    #[error("too many client IDs minted from this address; retry later")]
    MintRateLimited,
    /// The progress store is at its session cap.
    #[error("too many download sessions")]
    SessionsFull,
    /// The session store could not be read or written.
    #[error("session store unavailable: {0}")]
    StoreUnavailable(String),
    /// A newer request took this download over while this one waited: its connection is
    /// being aborted, and nothing is sent.
    #[error("taken over by a newer request")]
    TakenOver,
    /// A plain-HTTP request arrived on a port that speaks only HTTPS (answered in cleartext, then
    /// the connection closes).
    #[error("this port speaks HTTPS: use an https:// URL")]
    PlainHttpOnTlsPort,
    /// Our own I/O failed (opening the file, descriptor exhaustion).
    #[error("internal error: {0}")]
    Internal(#[source] io::Error),
}

/// How a failed request is answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Disposition {
    pub status: Status,
    /// Close the connection after answering: the byte stream can no longer be trusted, or the
    /// peer is misbehaving.
    pub close: bool,
    /// Log at warn (our problem) rather than debug (the client's).
    pub ours: bool,
}

impl RequestError {
    /// The status, connection fate and log level of this error.
    pub fn disposition(&self) -> Disposition {
        use Status::*;
        let (status, close, ours) = match self {
            RequestError::Malformed(_) | RequestError::DuplicateField(_) => {
                (BadRequest, true, false)
            }
            RequestError::BadTarget => (BadRequest, true, false),
            RequestError::UriTooLong => (UriTooLong, true, false),
            RequestError::HeadTooLarge => (HeadersTooLarge, true, false),
            RequestError::HeadTimeout => (RequestTimeout, true, false),
            RequestError::MethodNotAllowed => (MethodNotAllowed, false, false),
            RequestError::NotFound(_) => (NotFound, false, false),
            RequestError::MintRateLimited => (TooManyRequests, false, false),
            RequestError::SessionsFull => (ServiceUnavailable, false, true),
            RequestError::StoreUnavailable(_) => (ServiceUnavailable, false, true),
            RequestError::TakenOver => (ServiceUnavailable, true, false),
            RequestError::PlainHttpOnTlsPort => (BadRequest, true, false),
            RequestError::Internal(_) => (InternalServerError, false, true),
        };
        Disposition {
            status,
            close,
            ours,
        }
    }

    /// A short plain-text body for the client: the reason, with nothing about the file system.
    pub fn body(&self) -> String {
        match self {
            RequestError::Internal(_) | RequestError::StoreUnavailable(_) => {
                "internal error\n".to_owned()
            }
            other => format!("{other}\n"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_errors_close_and_lookups_do_not() {
        assert!(RequestError::Malformed("x").disposition().close);
        assert!(RequestError::HeadTooLarge.disposition().close);
        assert!(!RequestError::NotFound("no such file").disposition().close);
        assert_eq!(
            RequestError::UriTooLong.disposition().status,
            Status::UriTooLong
        );
        let io = RequestError::Internal(io::Error::other("secret path /etc"));
        assert!(!io.body().contains("/etc"));
    }
}
