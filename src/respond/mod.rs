//! Deciding what to send: from a parsed request to a [`Response`] (status, head, body and, for
//! downloads that move a session, the claim its progress is recorded on). The only module that
//! knows the whole protocol: routes, IDs, preconditions, ranges, and which requests resume,
//! declare or leave a session alone. `render` turns each decision into a head and a body.

use crate::files::{OpenError, OpenFile};
use crate::http::error::RequestError;
use crate::http::precondition::{self, Validators, Verdict};
use crate::http::range::{self, ByteRange, RangePlan};
use crate::http::request::{Method, Request};
use crate::http::response::Status;
use crate::http::target::{self, RelPath, Route, TargetError};
use crate::id::IdError;
use crate::ops::metrics::ResumeHow;
use crate::service::Service;
use crate::session::{ConnectionHandle, Epoch, Position, Resume, SessionError, SessionKey};

mod render;

use self::render::{bodiless, mint, multipart, slice, whole_untracked};
pub use self::render::{error_response, Body, Response};

/// Response field carrying the session's offset: where a server-resumed download of this file
/// would start now (on HEAD), or where this response's bytes start (on GET).
pub const OFFSET_FIELD: &str = "Roam-Offset";
/// Response field saying that the `Repr-Digest` of this version is being computed.
pub const DIGEST_PENDING_FIELD: &str = "Roam-Digest";

impl From<SessionError> for RequestError {
    fn from(e: SessionError) -> Self {
        match e {
            SessionError::Full(_) => RequestError::SessionsFull,
            SessionError::Preempted(_) => RequestError::TakenOver,
            SessionError::Store(e) => RequestError::StoreUnavailable(e.to_string()),
        }
    }
}

/// What the connection is still confirming: for a session, the epoch and end offset of the last
/// body it sent (see `Sessions::resume`).
pub type InFlight<'a> = &'a (dyn Fn(SessionKey) -> Option<(Epoch, u64)> + Sync);

/// No body in flight (a fresh connection, benches, tests).
pub fn nothing_in_flight(_: SessionKey) -> Option<(Epoch, u64)> {
    None
}

/// Decides the response to `req` arriving on connection `conn`.
pub async fn respond(
    svc: &Service,
    req: &Request,
    conn: &ConnectionHandle,
    in_flight: InFlight<'_>,
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
        Route::File { id, path } => serve_file(svc, req, conn, in_flight, id, &path).await,
    }
}

async fn serve_file(
    svc: &Service,
    req: &Request,
    conn: &ConnectionHandle,
    in_flight: InFlight<'_>,
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
        return resumed(svc, conn, key, file, head_only, in_flight(key)).await;
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
    here: Option<(Epoch, u64)>,
) -> Result<Response, RequestError> {
    let version = file.session_version();
    let (offset, claim) = if head_only {
        match svc.sessions().position(key, version, file.len).await? {
            Position::Finished { length } => return Ok(finished(&file, length)),
            Position::At(offset) => (offset, None),
        }
    } else {
        match svc
            .sessions()
            .resume(key, version, file.len, conn, here)
            .await?
        {
            // Everything was confirmed: answer as curl and wget understand "already complete",
            // cheaply and never with the file again.
            Resume::Finished { length } => return Ok(finished(&file, length)),
            Resume::From(claim) => (claim.start(), Some(claim)),
        }
    };
    let status = if offset == 0 {
        Status::Ok
    } else {
        if !head_only {
            svc.metrics().resume(ResumeHow::Implicit);
        }
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
    if range.start > 0 {
        svc.metrics().resume(ResumeHow::Declared);
    }
    Ok(slice(&file, range, status, false, Some(claim)))
}
