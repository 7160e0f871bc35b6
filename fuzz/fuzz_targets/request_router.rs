//! Fuzzes everything a stranger's bytes reach before the file system: the request head parser,
//! the router (target to validated relative path), the client-ID check, the `Range` parser and
//! planner, and the precondition evaluator. None of them may panic, and each result must keep
//! the invariant the rest of the server relies on (a routed path has only normal components, a
//! planned range lies inside the file, a consumed head is within the limits).
#![no_main]

use libfuzzer_sys::fuzz_target;
use roam::id::IdAuthority;
use roam::http::precondition::{self, Validators};
use roam::http::range::{self, RangePlan, MAX_PARTS};
use roam::http::request::{self, Limits, Request};
use roam::http::target::{self, Route};
use std::path::Component;
use std::sync::OnceLock;
use std::time::{Duration, UNIX_EPOCH};

/// The server's defaults, and small limits so the 414/431 edges are reached by short inputs.
const LIMITS: [Limits; 2] = [
    Limits {
        max_request_line: roam::settings::config::DEFAULT_MAX_REQUEST_LINE,
        max_head: roam::settings::config::DEFAULT_MAX_HEAD,
        max_headers: roam::settings::config::DEFAULT_MAX_HEADERS,
    },
    Limits {
        max_request_line: 64,
        max_head: 256,
        max_headers: 4,
    },
];

/// File lengths the planner is tried against: empty, tiny, around the coalescing gap, large,
/// and the largest a u64 can say.
const LENGTHS: [u64; 6] = [0, 1, 80, 4096, 5 << 30, u64::MAX];

fn authority() -> &'static IdAuthority {
    static IDS: OnceLock<IdAuthority> = OnceLock::new();
    IDS.get_or_init(|| IdAuthority::new(b"roam fuzz secret, 32 bytes long!"))
}

fuzz_target!(|data: &[u8]| {
    for limits in &LIMITS {
        match request::parse(data, limits) {
            Ok(Some((req, consumed))) => {
                assert!(consumed > 0 && consumed <= data.len());
                assert!(consumed <= limits.max_head, "head larger than max_head");
                check_request(&req);
            }
            Ok(None) => {
                assert!(data.len() < limits.max_head, "partial head past max_head");
            }
            Err(_) => {}
        }
    }
});

fn check_request(req: &Request) {
    // A body is only ever admitted on a method that is refused, and then the connection closes.
    if req.has_body {
        assert_eq!(req.method, request::Method::Other);
        assert!(!req.keep_alive);
    }
    for allow_dotfiles in [false, true] {
        if let Ok(Route::File { id, path }) = target::route(&req.target, allow_dotfiles) {
            let p = path.as_path();
            assert!(p.is_relative(), "absolute path routed: {p:?}");
            assert!(p.components().count() > 0);
            for c in p.components() {
                let Component::Normal(name) = c else {
                    panic!("non-normal component {c:?} in {p:?}");
                };
                let name = name.to_str().expect("routed names are UTF-8");
                assert!(!name.contains(['/', '\\', ':', '\0']), "{name:?}");
                assert!(allow_dotfiles || !name.starts_with('.'), "dotfile {name:?}");
            }
            if let Ok(client) = authority().verify(id) {
                assert_eq!(client.to_string(), id, "an ID has one spelling");
            }
        }
    }
    if let Some(value) = &req.range {
        if let Ok(specs) = range::parse(value) {
            assert!(!specs.is_empty() && specs.len() <= range::MAX_LISTED_RANGES);
            for len in LENGTHS {
                check_plan(&range::plan(&specs, len), len);
            }
        }
    }
    let conditions = req.conditions();
    for (etag, secs) in [("\"10-5f\"", 1_700_000_000), ("\"0-0\"", 0)] {
        let validators = Validators {
            etag,
            last_modified: Some(UNIX_EPOCH + Duration::from_secs(secs)),
        };
        let _ = precondition::evaluate(&conditions, &validators);
    }
}

fn check_plan(plan: &RangePlan, len: u64) {
    match plan {
        RangePlan::Single { range, .. } => {
            assert!(
                range.start < range.end && range.end <= len,
                "{range:?} of {len}"
            );
        }
        RangePlan::Multi(ranges) => {
            assert!(ranges.len() >= 2 && ranges.len() <= MAX_PARTS);
            let mut sorted = ranges.clone();
            sorted.sort();
            let mut total = 0u64;
            for w in sorted.windows(2) {
                assert!(w[0].end <= w[1].start, "overlapping parts {ranges:?}");
            }
            for r in ranges {
                assert!(r.start < r.end && r.end <= len, "{r:?} of {len}");
                total += r.len();
            }
            // No amplification: the parts never add up to more than the file.
            assert!(total <= len);
        }
        RangePlan::Unsatisfiable | RangePlan::Whole => {}
    }
}
