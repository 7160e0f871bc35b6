//! Conditional requests (RFC 9110 §13): evaluating `If-Match`, `If-Unmodified-Since`,
//! `If-None-Match`, `If-Modified-Since` and `If-Range` against a representation's validators,
//! in the order §13.2.2 prescribes. Pure functions over plain values.
//!
//! Longer than most files: about half of it is the unit tests, one per rule of §13.

use std::time::SystemTime;

/// The validators of the representation being served.
#[derive(Clone, Copy, Debug)]
pub struct Validators<'a> {
    /// The strong entity-tag, with its quotes: `"…"`.
    pub etag: &'a str,
    /// Last modification time, already truncated to whole seconds as `Last-Modified` sends it;
    /// `None` when the representation has none (then date conditions are ignored, §13.1.3,
    /// §13.1.4, and a date `If-Range` never matches, §13.1.5).
    pub last_modified: Option<SystemTime>,
}

/// The conditional fields of a GET or HEAD request, as received.
#[derive(Clone, Copy, Debug, Default)]
pub struct Conditions<'a> {
    pub if_match: Option<&'a str>,
    pub if_none_match: Option<&'a str>,
    pub if_modified_since: Option<&'a str>,
    pub if_unmodified_since: Option<&'a str>,
    pub if_range: Option<&'a str>,
}

/// The outcome of the preconditions for a GET or HEAD.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// 412: `If-Match` or `If-Unmodified-Since` is false.
    PreconditionFailed,
    /// 304: `If-None-Match` or `If-Modified-Since` is false.
    NotModified,
    /// Serve the representation; `honor_range` says whether a `Range` field may be used
    /// (false when `If-Range` does not match: the client's partial copy is of another version).
    Proceed { honor_range: bool },
}

/// Evaluates the preconditions in RFC 9110 §13.2.2 order for a GET or HEAD.
pub fn evaluate(c: &Conditions<'_>, v: &Validators<'_>) -> Verdict {
    // Step 1-2: If-Match, else If-Unmodified-Since.
    if let Some(field) = c.if_match {
        if !if_match(field, v.etag) {
            return Verdict::PreconditionFailed;
        }
    } else if let (Some(date), Some(lm)) =
        (c.if_unmodified_since.and_then(parse_date), v.last_modified)
    {
        // A date the recipient cannot parse is ignored (§13.1.4).
        if lm > date {
            return Verdict::PreconditionFailed;
        }
    }
    // Step 3-4: If-None-Match, else If-Modified-Since (GET and HEAD only, which is all we serve).
    if let Some(field) = c.if_none_match {
        if !if_none_match(field, v.etag) {
            return Verdict::NotModified;
        }
    } else if let (Some(date), Some(lm)) =
        (c.if_modified_since.and_then(parse_date), v.last_modified)
    {
        if lm <= date {
            return Verdict::NotModified;
        }
    }
    // Step 5: If-Range decides whether Range applies.
    let honor_range = c.if_range.is_none_or(|field| if_range(field, v));
    Verdict::Proceed { honor_range }
}

/// `If-Match` (§13.1.1): true for `*` or when any listed tag matches strongly. A field we
/// cannot parse matches nothing: failing closed is the safe reading of a guard.
fn if_match(field: &str, etag: &str) -> bool {
    if field.trim() == "*" {
        return true;
    }
    match parse_entity_tags(field) {
        Some(tags) => tags
            .iter()
            .any(|t| !t.weak && t.opaque == strip_quotes(etag)),
        None => false,
    }
}

/// `If-None-Match` (§13.1.2): false for `*` (the representation exists) or when any listed tag
/// matches weakly. An unparsable field is treated as matching nothing (so it is true).
fn if_none_match(field: &str, etag: &str) -> bool {
    if field.trim() == "*" {
        return false;
    }
    match parse_entity_tags(field) {
        Some(tags) => !tags.iter().any(|t| t.opaque == strip_quotes(etag)),
        None => true,
    }
}

/// `If-Range` (§13.1.5): a strong entity-tag that matches strongly, or an HTTP-date equal to
/// `Last-Modified`. A weak tag, an unparsable value or anything else is false.
fn if_range(field: &str, v: &Validators<'_>) -> bool {
    let field = field.trim();
    if field.starts_with('"') || field.starts_with("W/") {
        return match parse_entity_tags(field).as_deref() {
            Some([tag]) => !tag.weak && tag.opaque == strip_quotes(v.etag),
            _ => false,
        };
    }
    parse_date(field).is_some_and(|date| Some(date) == v.last_modified)
}

fn parse_date(value: &str) -> Option<SystemTime> {
    httpdate::parse_http_date(value.trim()).ok()
}

fn strip_quotes(etag: &str) -> &str {
    etag.strip_prefix('"')
        .and_then(|e| e.strip_suffix('"'))
        .unwrap_or(etag)
}

#[derive(Debug, PartialEq, Eq)]
struct EntityTag<'a> {
    weak: bool,
    /// The opaque-tag without its quotes.
    opaque: &'a str,
}

/// Parses `#entity-tag` (§8.8.3): a comma-separated list of `[W/]"etagc*"`. `None` if any
/// element is malformed.
fn parse_entity_tags(field: &str) -> Option<Vec<EntityTag<'_>>> {
    let mut tags = Vec::new();
    let mut rest = field.trim_start_matches([' ', '\t', ',']);
    while !rest.is_empty() {
        let (weak, after) = match rest.strip_prefix("W/") {
            Some(after) => (true, after),
            None => (false, rest),
        };
        let body = after.strip_prefix('"')?;
        let close = body.find('"')?;
        let opaque = &body[..close];
        if !opaque
            .bytes()
            .all(|b| b == 0x21 || (0x23..=0x7e).contains(&b) || b >= 0x80)
        {
            return None;
        }
        tags.push(EntityTag { weak, opaque });
        rest = body[close + 1..].trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            break;
        }
        rest = rest.strip_prefix(',')?.trim_start_matches([' ', '\t', ',']);
    }
    if tags.is_empty() {
        return None;
    }
    Some(tags)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    const ETAG: &str = "\"abc-1\"";
    const LM: &str = "Sun, 06 Nov 1994 08:49:37 GMT";
    const BEFORE: &str = "Sun, 06 Nov 1994 08:49:36 GMT";
    const AFTER: &str = "Sun, 06 Nov 1994 08:49:38 GMT";

    fn v() -> Validators<'static> {
        Validators {
            etag: ETAG,
            last_modified: Some(httpdate::parse_http_date(LM).unwrap()),
        }
    }

    fn eval(c: Conditions<'_>) -> Verdict {
        evaluate(&c, &v())
    }

    const GO: Verdict = Verdict::Proceed { honor_range: true };
    const WHOLE: Verdict = Verdict::Proceed { honor_range: false };

    #[test]
    fn without_a_last_modified_date_date_conditions_are_ignored_and_never_match() {
        let v = Validators {
            etag: ETAG,
            last_modified: None,
        };
        for c in [
            Conditions {
                if_modified_since: Some(LM),
                ..Default::default()
            },
            Conditions {
                if_unmodified_since: Some(BEFORE),
                ..Default::default()
            },
        ] {
            assert_eq!(evaluate(&c, &v), GO);
        }
        let date_if_range = Conditions {
            if_range: Some(LM),
            ..Default::default()
        };
        assert_eq!(
            evaluate(&date_if_range, &v),
            Verdict::Proceed { honor_range: false }
        );
    }

    #[test]
    fn conformance_table() {
        use Verdict::*;
        let rows: &[(Conditions<'_>, Verdict)] = &[
            (Conditions::default(), GO),
            // §13.1.1 If-Match: strong comparison, * and lists.
            (
                Conditions {
                    if_match: Some("\"abc-1\""),
                    ..Default::default()
                },
                GO,
            ),
            (
                Conditions {
                    if_match: Some("*"),
                    ..Default::default()
                },
                GO,
            ),
            (
                Conditions {
                    if_match: Some("\"x\", \"abc-1\""),
                    ..Default::default()
                },
                GO,
            ),
            (
                Conditions {
                    if_match: Some("W/\"abc-1\""),
                    ..Default::default()
                },
                PreconditionFailed,
            ),
            (
                Conditions {
                    if_match: Some("\"other\""),
                    ..Default::default()
                },
                PreconditionFailed,
            ),
            (
                Conditions {
                    if_match: Some("garbage"),
                    ..Default::default()
                },
                PreconditionFailed,
            ),
            // §13.1.4 If-Unmodified-Since.
            (
                Conditions {
                    if_unmodified_since: Some(LM),
                    ..Default::default()
                },
                GO,
            ),
            (
                Conditions {
                    if_unmodified_since: Some(AFTER),
                    ..Default::default()
                },
                GO,
            ),
            (
                Conditions {
                    if_unmodified_since: Some(BEFORE),
                    ..Default::default()
                },
                PreconditionFailed,
            ),
            (
                Conditions {
                    if_unmodified_since: Some("yesterday"),
                    ..Default::default()
                },
                GO,
            ),
            // If-Match takes precedence over If-Unmodified-Since (§13.2.2 step 2 only without it).
            (
                Conditions {
                    if_match: Some(ETAG),
                    if_unmodified_since: Some(BEFORE),
                    ..Default::default()
                },
                GO,
            ),
            // §13.1.2 If-None-Match: weak comparison.
            (
                Conditions {
                    if_none_match: Some(ETAG),
                    ..Default::default()
                },
                NotModified,
            ),
            (
                Conditions {
                    if_none_match: Some("W/\"abc-1\""),
                    ..Default::default()
                },
                NotModified,
            ),
            (
                Conditions {
                    if_none_match: Some("*"),
                    ..Default::default()
                },
                NotModified,
            ),
            (
                Conditions {
                    if_none_match: Some("\"zzz\""),
                    ..Default::default()
                },
                GO,
            ),
            // §13.1.3 If-Modified-Since.
            (
                Conditions {
                    if_modified_since: Some(LM),
                    ..Default::default()
                },
                NotModified,
            ),
            (
                Conditions {
                    if_modified_since: Some(AFTER),
                    ..Default::default()
                },
                NotModified,
            ),
            (
                Conditions {
                    if_modified_since: Some(BEFORE),
                    ..Default::default()
                },
                GO,
            ),
            (
                Conditions {
                    if_modified_since: Some("not a date"),
                    ..Default::default()
                },
                GO,
            ),
            // If-None-Match takes precedence over If-Modified-Since.
            (
                Conditions {
                    if_none_match: Some("\"zzz\""),
                    if_modified_since: Some(LM),
                    ..Default::default()
                },
                GO,
            ),
            // 412 beats 304.
            (
                Conditions {
                    if_match: Some("\"zzz\""),
                    if_none_match: Some(ETAG),
                    ..Default::default()
                },
                PreconditionFailed,
            ),
            // §13.1.5 If-Range: strong tag or exact date.
            (
                Conditions {
                    if_range: Some(ETAG),
                    ..Default::default()
                },
                GO,
            ),
            (
                Conditions {
                    if_range: Some("W/\"abc-1\""),
                    ..Default::default()
                },
                WHOLE,
            ),
            (
                Conditions {
                    if_range: Some("\"stale\""),
                    ..Default::default()
                },
                WHOLE,
            ),
            (
                Conditions {
                    if_range: Some(LM),
                    ..Default::default()
                },
                GO,
            ),
            (
                Conditions {
                    if_range: Some(AFTER),
                    ..Default::default()
                },
                WHOLE,
            ),
            (
                Conditions {
                    if_range: Some("junk"),
                    ..Default::default()
                },
                WHOLE,
            ),
            (
                Conditions {
                    if_range: Some("\"abc-1\", \"x\""),
                    ..Default::default()
                },
                WHOLE,
            ),
        ];
        for (i, (c, want)) in rows.iter().enumerate() {
            assert_eq!(eval(*c), *want, "row {i}: {c:?}");
        }
    }

    #[test]
    fn entity_tag_lists() {
        assert_eq!(
            parse_entity_tags("\"a\",W/\"b\" , \"c\"").map(|t| t.len()),
            Some(3)
        );
        assert_eq!(parse_entity_tags("\"a\" \"b\""), None);
        assert_eq!(parse_entity_tags("\"a"), None);
        assert_eq!(parse_entity_tags(""), None);
        assert_eq!(
            parse_entity_tags("\"\""),
            Some(vec![EntityTag {
                weak: false,
                opaque: ""
            }])
        );
    }

    proptest! {
        #[test]
        fn evaluate_never_panics(a in "\\PC{0,40}", b in "\\PC{0,40}", c in "\\PC{0,40}") {
            let conds = Conditions { if_match: Some(&a), if_none_match: Some(&b), if_range: Some(&c), ..Default::default() };
            let _ = evaluate(&conds, &v());
        }

        #[test]
        fn own_etag_always_matches(n in 0u64..u64::MAX, secs in 0u64..4_000_000_000) {
            let etag = format!("\"{n:x}\"");
            let lm = SystemTime::UNIX_EPOCH + Duration::from_secs(secs);
            let v = Validators { etag: &etag, last_modified: Some(lm) };
            let date = httpdate::fmt_http_date(lm);
            let conds = Conditions { if_match: Some(&etag), if_range: Some(&etag), ..Default::default() };
            prop_assert_eq!(evaluate(&conds, &v), GO);
            let conds = Conditions { if_unmodified_since: Some(&date), if_range: Some(&date), ..Default::default() };
            prop_assert_eq!(evaluate(&conds, &v), GO);
            let conds = Conditions { if_none_match: Some(&etag), ..Default::default() };
            prop_assert_eq!(evaluate(&conds, &v), Verdict::NotModified);
        }
    }
}
