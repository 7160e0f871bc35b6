//! roam: an HTTP/1.1 file server for devices whose connections break.
//!
//! A client gets an ID (`GET /`), downloads `GET /{id}/{path}`, loses the network, reconnects
//! from anywhere and receives exactly the rest: the server records, per (client, file), the
//! bytes the client's TCP acknowledged, not the bytes it wrote.
//!
//! # Layout
//! In the order a request flows through them:
//! - [`server`]: accept loop, connection cap, shutdown.
//! - [`conn`]: one connection: reading heads, writing responses, sending files, settling
//!   progress.
//! - [`request`]: request heads on httparse, framing and limits.
//! - [`target`]: request target to route and validated relative path.
//! - [`id`]: client IDs, minted and verified without server-side state; [`limit`]: optional
//!   mint rate limit.
//! - [`filetable`]: open files cached per path; [`files`]: confined opens under the root,
//!   validators; [`digest`]: `Repr-Digest` cache.
//! - [`precondition`], [`range`]: RFC 9110 conditional requests and byte ranges.
//! - [`respond`]: the decision: status, head, body, which session it advances.
//! - [`takeover`]: one sender per session; stale connections are aborted.
//! - [`store`]: the progress store trait and its in-memory backend.
//! - [`delivery`]: acknowledged bytes to confirmed body offsets.
//! - [`response`], [`error`]: response heads; the one error-to-status mapping.
//! - [`sys`]: the only `unsafe`: TCP_INFO, SIOCOUTQ, sendfile, openat2.
//! - [`service`], [`config`], [`cli`]: shared state and settings.
//!
//! [`client`] is `roam get`, the download client: it uses none of the server modules but
//! [`id`]'s ID format.
#![deny(unsafe_code)]

pub mod cli;
pub mod client;
pub mod config;
pub mod conn;
pub mod delivery;
pub mod digest;
pub mod error;
pub mod files;
pub mod filetable;
pub mod id;
pub mod limit;
pub mod precondition;
pub mod range;
pub mod request;
pub mod respond;
pub mod response;
pub mod server;
pub mod service;
pub mod store;
pub mod sys;
pub mod takeover;
pub mod target;
