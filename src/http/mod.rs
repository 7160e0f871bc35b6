//! Pure HTTP/1.1: request heads in (`request`), request targets to routes and confined relative
//! paths (`target`), byte ranges (`range`) and conditional requests (`precondition`) as RFC
//! 9110 defines them, response heads out (`response`), and every way a request can fail with
//! its status (`error`). No I/O, no sessions: plain values in, plain values out.

pub mod error;
pub mod precondition;
pub mod range;
pub mod request;
pub mod response;
pub mod target;
