//! Shared integration-test support: a byte-exact disruptive TCP proxy and a network-namespace harness.
pub mod check;
pub mod moving;
pub mod mptcp;
pub mod netns;
pub mod nginx;
pub mod proxy;
pub mod redis;
pub mod server;
pub mod tls;
