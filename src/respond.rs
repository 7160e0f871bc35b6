//! Deciding what to send: from a parsed request to a [`Response`] (status, head, body and, for
//! downloads that move a session, the ownership and epoch its progress is recorded under).

use crate::files::{DigestState, OpenError, OpenFile, Source};
use crate::http::error::RequestError;
use crate::http::precondition::{self, Validators, Verdict};
use crate::http::range::{self, ByteRange, ContentRange, RangePlan};
use crate::http::request::{Method, Request};
use crate::http::response::{Head, Status};
use crate::http::target::{self, RelPath, Route, TargetError};
use crate::id::IdError;
use crate::service::Service;
use crate::session::{Claim, ConnectionHandle, Position, Resume, SessionError, SessionKey};
use bytes::{BufMut, Bytes, BytesMut};

/// Response field carrying the session's offset: where a server-resumed download of this file
/// would start now (on HEAD), or where this response's bytes start (on GET).
pub const OFFSET_FIELD: &str = "Roam-Offset";
/// Response field saying that the `Repr-Digest` of this version is being computed.
pub const DIGEST_PENDING_FIELD: &str = "Roam-Digest";

/// A decided response, its head not yet finished (the connection adds `Connection`).
#[derive(Debug)]
pub struct Response {
    pub head: Head,
    pub body: Body,
    /// Present when the body advances a session: the claim its progress is recorded on.
    pub claim: Option<Claim>,
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

impl From<SessionError> for RequestError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Full(_) => RequestError::SessionsFull,
            SessionError::Preempted(_) => RequestError::TakenOver,
            SessionError::Store(e) => RequestError::StoreUnavailable(e.to_string()),
        }
    }
}

/// Decides the response to `req` arriving on connection `conn`.
pub async fn respond(
    svc: &Service,
    req: &Request,
    conn: &ConnectionHandle,
) -> Result<Response, RequestError> {
    if req.method == Method::Other {
        return Err(RequestError::MethodNotAllowed);
    }
    let route = target::route(&req.target, svc.config().allow_dotfiles).map_err(|e| match e {
        TargetError::BadForm => RequestError::BadTarget,
        TargetError::NoSuchRoute => RequestError::NotFound("no such route: use / or /{id}/{path}"),
        TargetError::Refused => RequestError::NotFound("no such file"),
    })?;
    match route {
        Route::Mint => {
            if req.method == Method::Get && !svc.allow_mint(conn.peer) {
                return Err(RequestError::MintRateLimited);
            }
            Ok(mint(svc, req.method == Method::Head))
        }
        Route::File { id, path } => serve_file(svc, req, conn, id, &path).await,
    }
}

fn mint(svc: &Service, head_only: bool) -> Response {
    let id = Bytes::from(svc.ids().mint().to_string());
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
    }
}

async fn serve_file(
    svc: &Service,
    req: &Request,
    conn: &ConnectionHandle,
    id: &str,
    rel: &RelPath,
) -> Result<Response, RequestError> {
    let client = svc.ids().verify(id).map_err(|e| match e {
        IdError::Malformed => RequestError::NotFound("malformed client id"),
        IdError::Unknown => RequestError::NotFound("unknown client id"),
    })?;
    let (file, file_key) = svc.open(rel).map_err(|e| match e {
        OpenError::NotFound => RequestError::NotFound("no such file"),
        OpenError::Io(e) => RequestError::Internal(e),
    })?;
    let key = SessionKey::new(client, file_key);
    let head_only = req.method == Method::Head;
    let validators = Validators {
        etag: &file.etag,
        last_modified: file.last_modified,
    };
    let conditions = req.conditions();
    let honor_range = match precondition::evaluate(&conditions, &validators) {
        Verdict::PreconditionFailed => {
            return Ok(bodiless(Status::PreconditionFailed, &file));
        }
        Verdict::NotModified => return Ok(bodiless(Status::NotModified, &file)),
        Verdict::Proceed { honor_range } => honor_range,
    };
    // RFC 9110 §14.2: Range is defined for GET only and must be ignored on HEAD, which
    // therefore reports what a GET without Range would get (the session's position).
    let range = if head_only {
        None
    } else {
        req.range.as_deref()
    };
    let Some(range_value) = range else {
        if !svc.config().implicit_resume {
            // Plain HTTP semantics: the whole file, and that is the client's position now.
            let whole = ByteRange {
                start: 0,
                end: file.len,
            };
            return declared(svc, conn, key, file, whole, head_only, Status::Ok).await;
        }
        return resumed(svc, conn, key, file, head_only).await;
    };
    // A client resuming with Range but no If-Range (curl -C -, wget -c), or with a date in
    // If-Range, whose session began on another version of the file has a partial copy of that
    // other version. A date cannot tell two versions written within one second apart (RFC 9110
    // §8.8.2.2), but the session record can: sending the new bytes from N would splice two
    // versions, so it is treated like a failed If-Range.
    let if_range_is_etag = req.if_range.as_deref().is_some_and(|v| {
        let v = v.trim_start();
        v.starts_with('"') || v.starts_with("W/")
    });
    let stale_session = !if_range_is_etag
        && svc
            .sessions()
            .version(key)
            .await?
            .is_some_and(|v| v != file.session_version());
    if !honor_range || stale_session {
        // If-Range names another version: the client's partial copy is stale, so it gets the
        // whole current file, and that is now its position (RFC 9110 §13.1.5).
        let whole = ByteRange {
            start: 0,
            end: file.len,
        };
        return declared(svc, conn, key, file, whole, head_only, Status::Ok).await;
    }
    let plan = match range::parse(range_value) {
        Ok(specs) => range::plan(&specs, file.len),
        // RFC 9110 §14.2: a Range we cannot read is ignored; the client gets the whole file, and
        // since it did not say where it stands, its session is left alone.
        Err(_) => RangePlan::Whole,
    };
    match plan {
        RangePlan::Single {
            range,
            declares_position: true,
        } => {
            declared(
                svc,
                conn,
                key,
                file,
                range,
                head_only,
                Status::PartialContent,
            )
            .await
        }
        RangePlan::Single {
            range,
            declares_position: false,
        } => Ok(slice(&file, range, Status::PartialContent, head_only, None)),
        RangePlan::Whole => Ok(whole_untracked(&file, head_only)),
        RangePlan::Multi(ranges) => Ok(multipart(&file, &ranges, head_only)),
        RangePlan::Unsatisfiable => Ok(bodiless(Status::RangeNotSatisfiable, &file)),
    }
}

/// A request without `Range`: the server decides where to start, from the session. HEAD
/// reports where a GET would start without taking the session from anyone.
async fn resumed(
    svc: &Service,
    conn: &ConnectionHandle,
    key: SessionKey,
    file: OpenFile,
    head_only: bool,
) -> Result<Response, RequestError> {
    let version = file.session_version();
    let (offset, claim) = if head_only {
        match svc.sessions().position(key, version, file.len).await? {
            Position::Finished { length } => return Ok(finished(&file, length)),
            Position::At(offset) => (offset, None),
        }
    } else {
        match svc.sessions().resume(key, version, file.len, conn).await? {
            // Everything was confirmed: answer as curl and wget understand "already complete",
            // cheaply and never with the file again.
            Resume::Finished { length } => return Ok(finished(&file, length)),
            Resume::From(claim) => (claim.start(), Some(claim)),
        }
    };
    let status = if offset == 0 {
        Status::Ok
    } else {
        Status::PartialContent
    };
    let range = ByteRange {
        start: offset,
        end: file.len,
    };
    let mut resp = slice(&file, range, status, head_only, claim);
    resp.head.field(OFFSET_FIELD, offset);
    Ok(resp)
}

/// `416` for a finished session, with where it stands.
fn finished(file: &OpenFile, length: u64) -> Response {
    let mut resp = bodiless(Status::RangeNotSatisfiable, file);
    resp.head.field(OFFSET_FIELD, length);
    resp
}

/// A request that states the client's position (`Range: bytes=N-`, or a stale `If-Range`
/// meaning "from 0"): the session follows it under a new epoch.
async fn declared(
    svc: &Service,
    conn: &ConnectionHandle,
    key: SessionKey,
    file: OpenFile,
    range: ByteRange,
    head_only: bool,
    status: Status,
) -> Result<Response, RequestError> {
    if head_only {
        return Ok(slice(&file, range, status, true, None));
    }
    let claim = svc
        .sessions()
        .declare(key, file.session_version(), range.start, conn)
        .await?;
    Ok(slice(&file, range, status, false, Some(claim)))
}

/// The fields every session response carries.
/// (`Cache-Control: no-store` among them: a session response depends on the client's state, so
/// no shared cache may reuse it for anyone.)
fn representation_fields(head: &mut Head, file: &OpenFile) {
    head.raw(&file.fields);
    match &file.digest {
        DigestState::Ready(digest) => {
            head.field("Repr-Digest", digest);
        }
        DigestState::Pending => {
            head.field(DIGEST_PENDING_FIELD, "pending");
        }
        DigestState::Unavailable => {}
    }
}

/// One contiguous slice, `200` when it is the whole file from byte 0, else `206`.
fn slice(
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
    Response { head, body, claim }
}

fn whole_untracked(file: &OpenFile, head_only: bool) -> Response {
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
fn bodiless(status: Status, file: &OpenFile) -> Response {
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
    }
}

fn multipart(file: &OpenFile, ranges: &[ByteRange], head_only: bool) -> Response {
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
    }
}
