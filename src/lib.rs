//! roam: an HTTP/1.1 file server for devices whose connections break.
//!
//! A client gets an ID (`GET /`), downloads `GET /{id}/{path}`, loses the network, reconnects
//! from anywhere and receives exactly the rest: the server records, per (client, file), the
//! bytes the client's TCP acknowledged, not the bytes it wrote.
//!
//! # Layout
//! In the order a request meets them:
//! - [`server`]: accept loop, connection cap, the sweeper and the session writer, shutdown.
//! - [`tls`]: HTTPS when configured: the certificate (reloaded on SIGHUP), and per connection
//!   the TLS layer that maps acknowledged ciphertext to plaintext the client can use.
//! - [`conn`]: one connection: reading heads, sending responses and files, settling what each
//!   body's peer acknowledged (`conn::progress`), closing (`conn::close`), and why it ended
//!   (`conn::end`).
//! - [`http`]: pure HTTP/1.1: request heads, targets and paths, ranges, preconditions,
//!   response heads, errors and their statuses.
//! - [`respond`]: the decision: status, head, body, and the session claim a body advances.
//! - [`id`]: client IDs, minted and verified without server-side state, and the optional mint
//!   rate limit.
//! - [`files`]: confined opens under the served folder, the file table, `Repr-Digest`s.
//! - [`session`]: the resume protocol: takeover of stale senders, records and epochs in the
//!   table, the storage seam and write-behind layer for backends, claims.
//! - [`service`]: the shared state a connection reaches through methods; [`settings`]: the
//!   command line and the validated configuration.
//! - [`ops`]: what an operator sees: metrics, the admin listener (`/metrics`, `/healthz`,
//!   `/readyz`), the access log, the SIGHUP reload broadcast, systemd notification.
//! - [`sys`]: the only `unsafe`: TCP_INFO, SIOCOUTQ, sendfile, openat2; [`throttle`]: log
//!   throttling.
//!
//! [`client`] is `roam get`, the download client: it uses none of the server modules but the
//! ID format and the `Content-Range` type.
#![deny(unsafe_code)]

pub mod client;
pub mod conn;
pub mod files;
pub mod http;
pub mod id;
pub mod ops;
pub mod respond;
pub mod server;
pub mod service;
pub mod session;
pub mod settings;
pub mod sys;
pub mod throttle;
pub mod tls;

/// The concurrent maps on the request path: `DashMap` with foldhash's hasher, seeded per
/// process (the default SipHash took about 3 % of a 1 KiB response's instructions). The keys
/// are server-minted session keys and paths of files that exist.
pub type ConcurrentMap<K, V> = dashmap::DashMap<K, V, foldhash::fast::RandomState>;
