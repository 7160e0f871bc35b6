//! Byte ranges (RFC 9110 §14): parsing the `Range` field and deciding which slices of a
//! representation to send. Pure functions over plain values. Ranges are half-open inside the
//! crate; the inclusive form appears only when a `Content-Range` value is written.
//!
//! Longer than most files: about half of it is the unit and property tests beside the grammar
//! and the arithmetic they pin down.

use std::fmt;

/// Most ranges a request may list before the whole field is ignored: hundreds of tiny ranges
/// are an amplification attack, not a download manager.
pub const MAX_LISTED_RANGES: usize = 100;
/// Most parts a `multipart/byteranges` response may carry after coalescing; past this the
/// whole representation is sent instead (a 200 is never larger than the file).
pub const MAX_PARTS: usize = 16;
/// Ranges separated by fewer bytes than a part's own header costs are merged (RFC 9110
/// §15.3.7.2 allows coalescing over gaps smaller than the multipart overhead).
pub const COALESCE_GAP: u64 = 80;

/// A non-empty, in-bounds, half-open slice `[start, end)` of a representation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteRange {
    /// First byte; always `< end`.
    pub start: u64,
    /// One past the last byte; always `<= ` the representation's length.
    pub end: u64,
}

impl ByteRange {
    /// Number of bytes in the slice; never zero.
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    /// Always false: a `ByteRange` is non-empty by construction. Present for clippy's sake.
    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// The `Content-Range` value for this slice of a `complete_len`-byte representation.
    pub fn content_range(&self, complete_len: u64) -> ContentRange {
        ContentRange::Satisfied {
            first: self.start,
            last: self.end - 1,
            complete: Some(complete_len),
        }
    }
}

/// A `Content-Range` field value (RFC 9110 §14.4), as roam writes it and as `roam get` reads
/// it from any server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ContentRange {
    /// `bytes FIRST-LAST/COMPLETE`, inclusive as the RFC writes it; `COMPLETE` is `*` (`None`)
    /// when the sender does not know the length (roam always does).
    Satisfied {
        first: u64,
        last: u64,
        complete: Option<u64>,
    },
    /// `bytes */COMPLETE`, sent with 416.
    Unsatisfied { complete: u64 },
}

impl fmt::Display for ContentRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContentRange::Satisfied {
                first,
                last,
                complete: Some(complete),
            } => write!(f, "bytes {first}-{last}/{complete}"),
            ContentRange::Satisfied {
                first,
                last,
                complete: None,
            } => write!(f, "bytes {first}-{last}/*"),
            ContentRange::Unsatisfied { complete } => write!(f, "bytes */{complete}"),
        }
    }
}

impl crate::http::response::FieldValue for ContentRange {
    fn put(&self, buf: &mut bytes::BytesMut) {
        use crate::http::response::put_number;
        use bytes::BufMut;
        match *self {
            ContentRange::Satisfied {
                first,
                last,
                complete,
            } => {
                buf.put_slice(b"bytes ");
                put_number(buf, first);
                buf.put_u8(b'-');
                put_number(buf, last);
                buf.put_u8(b'/');
                match complete {
                    Some(c) => put_number(buf, c),
                    None => buf.put_u8(b'*'),
                }
            }
            ContentRange::Unsatisfied { complete } => {
                buf.put_slice(b"bytes */");
                put_number(buf, complete);
            }
        }
    }
}

impl std::str::FromStr for ContentRange {
    type Err = ();

    /// Parses `bytes FIRST-LAST/COMPLETE` (`COMPLETE` may be `*`) or `bytes */COMPLETE`; a
    /// range whose last byte precedes its first, or lies past a known length, is refused.
    fn from_str(v: &str) -> Result<Self, ()> {
        let rest = v.trim().strip_prefix("bytes ").ok_or(())?;
        let (range, complete) = rest.split_once('/').ok_or(())?;
        let complete = match complete {
            "*" => None,
            c => Some(parse_digits(c).map_err(|_| ())?),
        };
        if range == "*" {
            return complete
                .map(|complete| ContentRange::Unsatisfied { complete })
                .ok_or(());
        }
        let (a, b) = range.split_once('-').ok_or(())?;
        let (first, last) = (
            parse_digits(a).map_err(|_| ())?,
            parse_digits(b).map_err(|_| ())?,
        );
        if last < first || complete.is_some_and(|c| last >= c) {
            return Err(());
        }
        Ok(ContentRange::Satisfied {
            first,
            last,
            complete,
        })
    }
}

/// One element of a parsed `range-set`, before it meets a length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// `first-` or `first-last` (inclusive `last`, `None` when open-ended). Numbers too large
    /// for a u64 saturate, which keeps their meaning: beyond any file.
    Int { first: u64, last: Option<u64> },
    /// `-length`: the final `length` bytes.
    Suffix { length: u64 },
}

/// Why a `Range` field is ignored (RFC 9110 §14.2: a server MAY ignore it; we ignore anything
/// we cannot read exactly, and answer with the whole representation).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ignored {
    /// A unit other than `bytes`.
    UnknownUnit,
    /// Not the grammar of RFC 9110 §14.1.
    Malformed,
    /// More than [`MAX_LISTED_RANGES`] elements.
    TooMany,
}

/// Parses a `Range` field value. Unit names are case-insensitive; optional whitespace is allowed
/// around list elements (and so after `=`), empty list elements are skipped (RFC 9110 §5.6.1).
pub fn parse(value: &str) -> Result<Vec<RangeSpec>, Ignored> {
    let value = value.trim_matches([' ', '\t']);
    let (unit, set) = value.split_once('=').ok_or(Ignored::Malformed)?;
    if unit.is_empty() || !unit.bytes().all(is_tchar) {
        return Err(Ignored::Malformed);
    }
    if !unit.eq_ignore_ascii_case("bytes") {
        return Err(Ignored::UnknownUnit);
    }
    let mut specs = Vec::new();
    for element in set.split(',') {
        let element = element.trim_matches([' ', '\t']);
        if element.is_empty() {
            continue;
        }
        if specs.len() == MAX_LISTED_RANGES {
            return Err(Ignored::TooMany);
        }
        specs.push(parse_spec(element)?);
    }
    if specs.is_empty() {
        return Err(Ignored::Malformed);
    }
    Ok(specs)
}

fn parse_spec(element: &str) -> Result<RangeSpec, Ignored> {
    let (first, last) = element.split_once('-').ok_or(Ignored::Malformed)?;
    if first.is_empty() {
        return Ok(RangeSpec::Suffix {
            length: parse_digits(last)?,
        });
    }
    let first = parse_digits(first)?;
    let last = if last.is_empty() {
        None
    } else {
        let last = parse_digits(last)?;
        // RFC 9110 §14.1.1: a first-pos greater than last-pos makes the range-spec invalid.
        if last < first {
            return Err(Ignored::Malformed);
        }
        Some(last)
    };
    Ok(RangeSpec::Int { first, last })
}

/// 1*DIGIT with no sign and no whitespace; too many digits saturate at u64::MAX.
fn parse_digits(s: &str) -> Result<u64, Ignored> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Ignored::Malformed);
    }
    Ok(s.bytes().fold(0u64, |n, b| {
        n.saturating_mul(10).saturating_add(u64::from(b - b'0'))
    }))
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// What to send for a request's ranges against a representation of `len` bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RangePlan {
    /// One slice: 206 with `Content-Range`. `declares_position` is true for `first-` (an
    /// open-ended range), which states where the client's copy ends.
    Single {
        range: ByteRange,
        declares_position: bool,
    },
    /// Several disjoint slices, in the order the client first asked for them (RFC 9110
    /// §15.3.7.2): 206 `multipart/byteranges`.
    Multi(Vec<ByteRange>),
    /// Nothing in the set overlaps the representation: 416 with `bytes */len`.
    Unsatisfiable,
    /// The set would cost more than the whole file: send the whole file with 200.
    Whole,
}

/// Resolves parsed specs against a length (RFC 9110 §14.1.2 satisfiability), clamping ends past
/// EOF, coalescing overlapping or nearly adjacent ranges, and refusing amplification.
pub fn plan(specs: &[RangeSpec], len: u64) -> RangePlan {
    let ranges: Vec<ByteRange> = specs.iter().filter_map(|s| resolve(*s, len)).collect();
    if ranges.is_empty() {
        return RangePlan::Unsatisfiable;
    }
    if let [RangeSpec::Int { first, last }] = specs {
        return RangePlan::Single {
            range: ranges[0],
            declares_position: last.is_none() && *first < len,
        };
    }
    // Coalesce in byte order, remembering for each merged range the earliest position at which
    // the client asked for any of its pieces; then answer in that order.
    let mut by_start: Vec<(ByteRange, usize)> = ranges.into_iter().zip(0..).collect();
    by_start.sort_unstable();
    let mut merged: Vec<(ByteRange, usize)> = Vec::with_capacity(by_start.len());
    for (r, asked) in by_start {
        match merged.last_mut() {
            Some((prev, first_asked)) if r.start < prev.end.saturating_add(COALESCE_GAP) => {
                prev.end = prev.end.max(r.end);
                *first_asked = (*first_asked).min(asked);
            }
            _ => merged.push((r, asked)),
        }
    }
    match merged.len() {
        1 => RangePlan::Single {
            range: merged[0].0,
            declares_position: false,
        },
        n if n > MAX_PARTS => RangePlan::Whole,
        _ => {
            merged.sort_unstable_by_key(|&(_, asked)| asked);
            RangePlan::Multi(merged.into_iter().map(|(r, _)| r).collect())
        }
    }
}

fn resolve(spec: RangeSpec, len: u64) -> Option<ByteRange> {
    match spec {
        RangeSpec::Int { first, last } => {
            if first >= len {
                return None;
            }
            let end = last.map_or(len, |l| l.saturating_add(1).min(len));
            Some(ByteRange { start: first, end })
        }
        RangeSpec::Suffix { length } => {
            if length == 0 || len == 0 {
                return None;
            }
            Some(ByteRange {
                start: len - length.min(len),
                end: len,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn br(start: u64, end: u64) -> ByteRange {
        ByteRange { start, end }
    }

    fn single(start: u64, end: u64, declares: bool) -> RangePlan {
        RangePlan::Single {
            range: br(start, end),
            declares_position: declares,
        }
    }

    fn plan_of(value: &str, len: u64) -> Result<RangePlan, Ignored> {
        parse(value).map(|s| plan(&s, len))
    }

    #[test]
    fn rfc_9110_examples() {
        // RFC 9110 §14.1.2 examples against a 10000-byte representation.
        assert_eq!(plan_of("bytes=0-499", 10000), Ok(single(0, 500, false)));
        assert_eq!(
            plan_of("bytes=500-999", 10000),
            Ok(single(500, 1000, false))
        );
        assert_eq!(plan_of("bytes=-500", 10000), Ok(single(9500, 10000, false)));
        assert_eq!(plan_of("bytes=9500-", 10000), Ok(single(9500, 10000, true)));
        assert_eq!(
            plan_of("bytes=0-0,-1", 10000),
            Ok(RangePlan::Multi(vec![br(0, 1), br(9999, 10000)]))
        );
        // Overlapping and adjacent ranges coalesce into one.
        assert_eq!(
            plan_of("bytes=500-600,601-999", 10000),
            Ok(single(500, 1000, false))
        );
        assert_eq!(
            plan_of("bytes=500-700,601-999", 10000),
            Ok(single(500, 1000, false))
        );
    }

    #[test]
    fn forms_and_edges() {
        assert_eq!(plan_of("bytes=0-", 10), Ok(single(0, 10, true)));
        assert_eq!(plan_of("bytes=5-100", 10), Ok(single(5, 10, false)));
        assert_eq!(plan_of("bytes=-100", 10), Ok(single(0, 10, false)));
        assert_eq!(plan_of("bytes=10-", 10), Ok(RangePlan::Unsatisfiable));
        assert_eq!(plan_of("bytes=-0", 10), Ok(RangePlan::Unsatisfiable));
        assert_eq!(plan_of("bytes=0-", 0), Ok(RangePlan::Unsatisfiable));
        assert_eq!(plan_of("bytes=-5", 0), Ok(RangePlan::Unsatisfiable));
        assert_eq!(
            plan_of("bytes=99999999999999999999999-", 10),
            Ok(RangePlan::Unsatisfiable)
        );
        assert_eq!(
            plan_of("bytes=3-99999999999999999999999", 10),
            Ok(single(3, 10, false))
        );
        // One satisfiable element is enough.
        assert_eq!(plan_of("bytes=20-30,2-3", 10), Ok(single(2, 4, false)));
    }

    #[test]
    fn whitespace_and_case() {
        assert_eq!(plan_of("BYTES=0-1", 10), Ok(single(0, 2, false)));
        assert_eq!(plan_of("Bytes=0-1", 10), Ok(single(0, 2, false)));
        assert_eq!(plan_of("  bytes=0-1  ", 10), Ok(single(0, 2, false)));
        assert_eq!(plan_of("bytes= 0-1", 10), Ok(single(0, 2, false)));
        assert_eq!(
            plan_of("bytes=0-1 ,\t, 800-999", 1000),
            Ok(RangePlan::Multi(vec![br(0, 2), br(800, 1000)]))
        );
        assert_eq!(plan_of("bytes=0 -1", 10), Err(Ignored::Malformed));
        assert_eq!(plan_of("bytes =0-1", 10), Err(Ignored::Malformed));
    }

    #[test]
    fn garbage_is_ignored() {
        for value in [
            "",
            "bytes",
            "bytes=",
            "bytes=,",
            "bytes=a-b",
            "bytes=1-0",
            "bytes=-",
            "bytes=--1",
            "bytes=+1-2",
            "bytes=0x10-",
            "bytes=1-2-3",
            "=0-1",
            "bytes=0-1;x",
            "bytes=\u{e9}-",
        ] {
            assert_eq!(parse(value), Err(Ignored::Malformed), "{value:?}");
        }
        assert_eq!(parse("items=0-1"), Err(Ignored::UnknownUnit));
        assert_eq!(parse("none"), Err(Ignored::Malformed));
    }

    #[test]
    fn amplification_is_refused() {
        let many: Vec<String> = (0..101)
            .map(|i| format!("{}-{}", i * 1000, i * 1000))
            .collect();
        assert_eq!(
            parse(&format!("bytes={}", many.join(","))),
            Err(Ignored::TooMany)
        );
        let seventeen: Vec<String> = (0..17)
            .map(|i| format!("{}-{}", i * 1000, i * 1000))
            .collect();
        assert_eq!(
            plan_of(&format!("bytes={}", seventeen.join(",")), 100_000),
            Ok(RangePlan::Whole)
        );
        // The same byte asked for again and again coalesces to one range.
        let repeated = vec!["0-0"; 100].join(",");
        assert_eq!(
            plan_of(&format!("bytes={repeated}"), 10),
            Ok(single(0, 1, false))
        );
    }

    #[test]
    fn content_range_is_inclusive() {
        assert_eq!(
            br(0, 500).content_range(1000).to_string(),
            "bytes 0-499/1000"
        );
        assert_eq!(
            ContentRange::Unsatisfied { complete: 7 }.to_string(),
            "bytes */7"
        );
    }

    #[test]
    fn content_range_parses_what_servers_send() {
        let p = |v: &str| v.parse::<ContentRange>();
        assert_eq!(
            p("bytes 0-9/10"),
            Ok(ContentRange::Satisfied {
                first: 0,
                last: 9,
                complete: Some(10)
            })
        );
        assert_eq!(
            p("bytes */10"),
            Ok(ContentRange::Unsatisfied { complete: 10 })
        );
        assert_eq!(
            p("bytes 5-9/*"),
            Ok(ContentRange::Satisfied {
                first: 5,
                last: 9,
                complete: None
            })
        );
        for bad in [
            "bytes 9-5/10",
            "bytes 0-10/10",
            "items 0-1/2",
            "bytes */*",
            "bytes -1-2/3",
            "bytes 0-1/x",
        ] {
            assert_eq!(p(bad), Err(()), "{bad}");
        }
        for written in [
            br(3, 10).content_range(10),
            ContentRange::Unsatisfied { complete: 4 },
        ] {
            assert_eq!(p(&written.to_string()), Ok(written));
        }
    }

    proptest! {
        #[test]
        fn every_planned_range_is_a_non_empty_in_bounds_slice(
            specs in proptest::collection::vec(
                prop_oneof![
                    (0u64..2000, proptest::option::of(0u64..2000)).prop_map(|(f, l)| {
                        RangeSpec::Int { first: f, last: l.map(|l| l.max(f)) }
                    }),
                    (0u64..2000).prop_map(|length| RangeSpec::Suffix { length }),
                ], 1..20),
            len in 0u64..1500,
        ) {
            match plan(&specs, len) {
                RangePlan::Single { range, .. } => {
                    prop_assert!(range.start < range.end && range.end <= len);
                }
                RangePlan::Multi(ranges) => {
                    prop_assert!(ranges.len() >= 2 && ranges.len() <= MAX_PARTS);
                    let mut sorted = ranges.clone();
                    sorted.sort_unstable();
                    for w in sorted.windows(2) {
                        prop_assert!(w[0].end + COALESCE_GAP <= w[1].start);
                    }
                    let total: u64 = ranges.iter().map(|r| r.len()).sum();
                    prop_assert!(total <= len);
                    for r in &ranges {
                        prop_assert!(r.start < r.end && r.end <= len);
                    }
                }
                RangePlan::Unsatisfiable => {
                    prop_assert!(specs.iter().all(|s| resolve(*s, len).is_none()));
                }
                RangePlan::Whole => {}
            }
        }

        #[test]
        fn parse_never_panics(s in "\\PC*") {
            let _ = parse(&s);
        }

        #[test]
        fn written_ranges_parse_back(first in 0u64..u64::MAX / 2, span in 0u64..1 << 40) {
            let value = format!("bytes={}-{}", first, first + span);
            prop_assert_eq!(parse(&value), Ok(vec![RangeSpec::Int { first, last: Some(first + span) }]));
        }
    }
}
