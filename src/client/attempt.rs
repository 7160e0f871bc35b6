//! What one answer means for the part file: a pure function from what the client holds and
//! what the server said to what to do next. No I/O; the download engine in `mod.rs` carries it
//! out.

use crate::http::range::ContentRange;

/// What the client holds when it asks.
#[derive(Clone, Copy, Debug)]
pub struct Holding<'a> {
    /// Bytes in the part file: what the request asks to continue from.
    pub on_disk: u64,
    /// Strong ETag of the version being downloaded, once known.
    pub etag: Option<&'a str>,
    /// The file's length, once known.
    pub length: Option<u64>,
}

/// The fields of an answer that decide what it means.
#[derive(Clone, Copy, Debug, Default)]
pub struct Answer<'a> {
    pub status: u16,
    /// The strong ETag, if the server sent one (a weak one identifies no exact bytes).
    pub etag: Option<&'a str>,
    pub content_range: Option<&'a str>,
    pub content_length: Option<u64>,
}

/// What to do with an answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// A body follows: its first byte is file offset `start` of a `length`-byte file; bytes
    /// before what is on disk are skipped. `fresh`: this is the whole file of a version the
    /// client knows nothing about (a `200`): forget the old version and empty the part file.
    Receive {
        start: u64,
        length: u64,
        fresh: bool,
    },
    /// All `length` bytes are on disk (a `416` for exactly what is held, of the same version).
    Complete { length: u64 },
    /// The part file cannot be continued: empty it and ask again from byte 0.
    StartOver(&'static str),
    /// Something transient went wrong: ask again after a pause.
    Retry(String),
    /// The server refused (a 4xx other than 408 and 429, or an answer roam get cannot use).
    Refused,
}

/// Before asking: a part file longer than the file cannot be right, and one exactly as long is
/// done.
pub fn before_asking(h: &Holding<'_>) -> Option<Decision> {
    match h.length {
        Some(len) if h.on_disk > len => {
            Some(Decision::StartOver("the part file is longer than the file"))
        }
        Some(len) if h.on_disk == len && len > 0 => Some(Decision::Complete { length: len }),
        _ => None,
    }
}

/// The meaning of answer `a` to `Range: bytes={on_disk}-` (with `If-Range` once an ETag is
/// known).
pub fn decide(h: &Holding<'_>, a: &Answer<'_>) -> Decision {
    if h.on_disk > 0 && h.etag.is_some() && a.etag.is_some() && a.etag != h.etag {
        return Decision::StartOver("the file changed on the server");
    }
    match a.status {
        206 => partial(h, a),
        200 => match a.content_length {
            Some(length) => Decision::Receive {
                start: 0,
                length,
                fresh: true,
            },
            None => Decision::Retry("200 without Content-Length".into()),
        },
        416 => match a.content_range.and_then(|v| v.parse().ok()) {
            Some(ContentRange::Unsatisfied { complete })
                if complete == h.on_disk
                    && (h.etag.is_none() || a.etag.is_none() || a.etag == h.etag) =>
            {
                Decision::Complete { length: complete }
            }
            _ => Decision::StartOver("the server has a shorter file now"),
        },
        408 | 429 | 500..=599 => Decision::Retry(format!("server answered {}", a.status)),
        _ => Decision::Refused,
    }
}

/// A `206` must start at or before what is on disk and run to the end of the file.
fn partial(h: &Holding<'_>, a: &Answer<'_>) -> Decision {
    let Some(ContentRange::Satisfied {
        first,
        last,
        complete,
    }) = a.content_range.and_then(|v| v.parse().ok())
    else {
        return Decision::Retry("206 without a usable Content-Range".into());
    };
    if first > h.on_disk {
        return Decision::Retry(format!("server started at {first}, past {}", h.on_disk));
    }
    let Some(end) = last.checked_add(1) else {
        return Decision::Retry("Content-Range past the largest offset".into());
    };
    if complete.is_some_and(|c| c != end) {
        return Decision::Retry("server sent a closed range".into());
    }
    Decision::Receive {
        start: first,
        length: end,
        fresh: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const E1: &str = "\"a-1\"";
    const E2: &str = "\"a-2\"";

    fn holding(on_disk: u64, etag: Option<&'static str>, length: Option<u64>) -> Holding<'static> {
        Holding {
            on_disk,
            etag,
            length,
        }
    }

    fn answer(
        status: u16,
        etag: Option<&'static str>,
        content_range: Option<&'static str>,
        content_length: Option<u64>,
    ) -> Answer<'static> {
        Answer {
            status,
            etag,
            content_range,
            content_length,
        }
    }

    fn receive(start: u64, length: u64, fresh: bool) -> Decision {
        Decision::Receive {
            start,
            length,
            fresh,
        }
    }

    #[test]
    fn decision_table() {
        use Decision::*;
        let retry = |s: &str| Retry(s.to_owned());
        #[rustfmt::skip]
        let table: Vec<(Holding, Answer, Decision)> = vec![
            // A first request: 200 with the whole file, or 206 from 0 to the end.
            (holding(0, None, None), answer(200, Some(E1), None, Some(10)), receive(0, 10, true)),
            (holding(0, None, None), answer(206, Some(E1), Some("bytes 0-9/10"), Some(10)), receive(0, 10, false)),
            // Resuming: exactly from what is on disk, or from earlier (the overlap is skipped).
            (holding(4, Some(E1), Some(10)), answer(206, Some(E1), Some("bytes 4-9/10"), Some(6)), receive(4, 10, false)),
            (holding(4, Some(E1), Some(10)), answer(206, Some(E1), Some("bytes 2-9/10"), Some(8)), receive(2, 10, false)),
            // A length unknown to the server is taken from the range.
            (holding(4, None, None), answer(206, None, Some("bytes 4-9/*"), Some(6)), receive(4, 10, false)),
            // Past what is on disk would leave a hole: never written.
            (holding(4, Some(E1), Some(10)), answer(206, Some(E1), Some("bytes 6-9/10"), Some(4)), retry("server started at 6, past 4")),
            (holding(4, Some(E1), Some(10)), answer(206, Some(E1), Some("bytes 4-7/10"), Some(4)), retry("server sent a closed range")),
            (holding(4, Some(E1), Some(10)), answer(206, Some(E1), None, Some(6)), retry("206 without a usable Content-Range")),
            (holding(4, Some(E1), Some(10)), answer(206, Some(E1), Some("bytes 9-4/10"), Some(6)), retry("206 without a usable Content-Range")),
            // Another version: the If-Range failed and the whole new file comes (200), or the
            // server ignored If-Range and the ETag tells.
            (holding(4, Some(E1), Some(10)), answer(200, Some(E2), None, Some(12)), StartOver("the file changed on the server")),
            (holding(4, Some(E1), Some(10)), answer(206, Some(E2), Some("bytes 4-9/10"), Some(6)), StartOver("the file changed on the server")),
            // A server without ETags sends 200 for a file it will not range: start over.
            (holding(4, None, Some(10)), answer(200, None, None, Some(10)), receive(0, 10, true)),
            (holding(4, None, Some(10)), answer(200, None, None, None), retry("200 without Content-Length")),
            // 416 for exactly what is held: complete; for anything else the file shrank.
            (holding(10, Some(E1), Some(10)), answer(416, Some(E1), Some("bytes */10"), Some(0)), Complete { length: 10 }),
            (holding(10, None, None), answer(416, None, Some("bytes */10"), Some(0)), Complete { length: 10 }),
            (holding(10, Some(E1), Some(10)), answer(416, Some(E1), Some("bytes */8"), Some(0)), StartOver("the server has a shorter file now")),
            (holding(10, Some(E1), Some(10)), answer(416, Some(E1), None, Some(0)), StartOver("the server has a shorter file now")),
            // Transient answers are retried; refusals end the download.
            (holding(4, Some(E1), Some(10)), answer(503, None, None, Some(0)), retry("server answered 503")),
            (holding(4, Some(E1), Some(10)), answer(429, None, None, Some(0)), retry("server answered 429")),
            (holding(4, Some(E1), Some(10)), answer(408, None, None, Some(0)), retry("server answered 408")),
            (holding(0, None, None), answer(404, None, None, Some(0)), Refused),
            (holding(0, None, None), answer(301, None, None, Some(0)), Refused),
        ];
        for (h, a, want) in table {
            assert_eq!(decide(&h, &a), want, "{h:?} {a:?}");
        }
    }

    #[test]
    fn before_asking_table() {
        assert_eq!(
            before_asking(&holding(11, Some(E1), Some(10))),
            Some(Decision::StartOver("the part file is longer than the file"))
        );
        assert_eq!(
            before_asking(&holding(10, Some(E1), Some(10))),
            Some(Decision::Complete { length: 10 })
        );
        assert_eq!(before_asking(&holding(0, None, Some(0))), None);
        assert_eq!(before_asking(&holding(3, Some(E1), Some(10))), None);
        assert_eq!(before_asking(&holding(3, None, None)), None);
    }
}
