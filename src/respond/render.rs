//! Rendering decided responses: heads with the representation fields, slices, multipart
//! bodies, bodiless answers, minted IDs and errors. No decisions about sessions are made here.

use super::DIGEST_PENDING_FIELD;
use crate::files::{DigestState, OpenFile, Source};
use crate::http::error::RequestError;
use crate::http::range::{ByteRange, ContentRange};
use crate::http::response::{Head, Status};
use crate::service::Service;
use crate::session::Claim;
use bytes::{BufMut, Bytes, BytesMut};

/// A decided response, its head not yet finished (the connection adds `Connection`).
#[derive(Debug)]
pub struct Response {
    pub head: Head,
    pub body: Body,
    /// Present when the body advances a session: the claim its progress is recorded on.
    pub claim: Option<Claim>,
    /// The file offset of the body's first byte, for a body that is one slice of a file.
    pub body_start: Option<u64>,
}

/// What follows the head. HEAD requests always get `Empty` with GET's `Content-Length`.
#[derive(Debug)]
pub enum Body {
    Empty,
    Bytes(Bytes),
    File {
        source: Source,
        range: ByteRange,
    },
    /// `multipart/byteranges`: each part's header bytes and slice, then the closing delimiter.
    Multipart {
        source: Source,
        parts: Vec<(Bytes, ByteRange)>,
        end: Bytes,
    },
}

pub(super) fn mint(svc: &Service, head_only: bool) -> Response {
    let id = Bytes::from(svc.ids().mint().to_string());
    if !head_only {
        svc.metrics().id_minted();
    }
    let mut head = Head::new(Status::Ok);
    head.field("Content-Type", "text/plain; charset=utf-8")
        .field("Content-Length", id.len())
        // Each device must get its own ID: no cache may store this and hand it to another.
        .field("Cache-Control", "no-store");
    Response {
        head,
        body: if head_only {
            Body::Empty
        } else {
            Body::Bytes(id)
        },
        claim: None,
        body_start: None,
    }
}

/// The fields every session response carries.
/// (`Cache-Control: no-store` among them: a session response depends on the client's state, so
/// no shared cache may reuse it for anyone.)
fn representation_fields(head: &mut Head, file: &OpenFile) {
    head.raw(&file.fields);
    match &file.digest {
        DigestState::Ready(digest) => {
            head.field("Repr-Digest", &**digest);
        }
        DigestState::Pending => {
            head.field(DIGEST_PENDING_FIELD, "pending");
        }
        DigestState::Unavailable => {}
    }
}

/// One contiguous slice, `200` when it is the whole file from byte 0, else `206`.
pub(super) fn slice(
    file: &OpenFile,
    range: ByteRange,
    status: Status,
    head_only: bool,
    claim: Option<Claim>,
) -> Response {
    let mut head = Head::new(status);
    head.field("Content-Type", file.content_type)
        .field("Content-Length", range.end - range.start);
    if status == Status::PartialContent {
        head.field("Content-Range", range.content_range(file.len));
    }
    representation_fields(&mut head, file);
    let body = if head_only || range.start == range.end {
        Body::Empty
    } else if let Some(small) = &file.small {
        // In-memory copy: both bounds are within a file of at most SMALL_FILE bytes.
        Body::Bytes(small.slice(range.start as usize..range.end as usize))
    } else {
        Body::File {
            source: file.source.clone(),
            range,
        }
    };
    Response {
        head,
        body,
        claim,
        body_start: Some(range.start),
    }
}

pub(super) fn whole_untracked(file: &OpenFile, head_only: bool) -> Response {
    slice(
        file,
        ByteRange {
            start: 0,
            end: file.len,
        },
        Status::Ok,
        head_only,
        None,
    )
}

/// 304, 412 and 416: validators and, for 416, `Content-Range: bytes */len` (RFC 9110 §15.5.17).
pub(super) fn bodiless(status: Status, file: &OpenFile) -> Response {
    let mut head = Head::new(status);
    if status == Status::RangeNotSatisfiable {
        head.field(
            "Content-Range",
            ContentRange::Unsatisfied { complete: file.len },
        );
    }
    if status != Status::NotModified {
        head.field("Content-Length", 0);
    }
    representation_fields(&mut head, file);
    Response {
        head,
        body: Body::Empty,
        claim: None,
        body_start: None,
    }
}

pub(super) fn multipart(file: &OpenFile, ranges: &[ByteRange], head_only: bool) -> Response {
    let boundary = boundary_for(file);
    let mut parts = Vec::with_capacity(ranges.len());
    let mut total = 0u64;
    for r in ranges {
        let mut b = BytesMut::new();
        b.put_slice(b"\r\n--");
        b.put_slice(boundary.as_bytes());
        b.put_slice(b"\r\nContent-Type: ");
        b.put_slice(file.content_type.as_bytes());
        b.put_slice(b"\r\nContent-Range: ");
        b.put_slice(r.content_range(file.len).to_string().as_bytes());
        b.put_slice(b"\r\n\r\n");
        total += b.len() as u64 + r.len();
        parts.push((b.freeze(), *r));
    }
    let end = Bytes::from(format!("\r\n--{boundary}--\r\n"));
    total += end.len() as u64;
    let mut head = Head::new(Status::PartialContent);
    head.field(
        "Content-Type",
        format_args!("multipart/byteranges; boundary={boundary}"),
    )
    .field("Content-Length", total);
    representation_fields(&mut head, file);
    let body = if head_only {
        Body::Empty
    } else {
        Body::Multipart {
            source: file.source.clone(),
            parts,
            end,
        }
    };
    Response {
        head,
        body,
        claim: None,
        body_start: None,
    }
}

/// A boundary that cannot occur in practice inside the file: derived from the version and
/// randomised per response.
fn boundary_for(file: &OpenFile) -> String {
    format!("roam-{:016x}-{:016x}", file.version, rand::random::<u64>())
}

/// The answer for a failed request: a short plain-text reason.
pub fn error_response(err: &RequestError, head_only: bool) -> Response {
    let d = err.disposition();
    let body = Bytes::from(err.body());
    let mut head = Head::new(d.status);
    head.field("Content-Type", "text/plain; charset=utf-8")
        .field("Content-Length", body.len())
        .field("Cache-Control", "no-store");
    match err {
        RequestError::MethodNotAllowed => {
            head.field("Allow", "GET, HEAD");
        }
        RequestError::SessionsFull => {
            head.field("Retry-After", 60);
        }
        RequestError::StoreUnavailable(_) => {
            head.field("Retry-After", 1);
        }
        RequestError::MintRateLimited => {
            head.field("Retry-After", 1);
        }
        _ => {}
    }
    Response {
        head,
        body: if head_only {
            Body::Empty
        } else {
            Body::Bytes(body)
        },
        claim: None,
        body_start: None,
    }
}
