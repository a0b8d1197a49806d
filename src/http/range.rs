//! The single-range subset of HTTP `Range` (RFC 9110 §14.1.2) that blob downloads need.

use crate::storage::ByteRange;

/// How a `Range` header applies to a blob of a given size.
#[derive(Debug, PartialEq, Eq)]
pub enum RangeRequest {
    /// No usable range: serve the whole blob (absent, malformed, or several ranges, which RFC 9110 lets a server
    /// answer with the full representation).
    Full,
    Partial(ByteRange),
    /// Outside the blob, or a range whose last byte comes before its first (`bytes=500-0`): 416. RFC 9110 would
    /// let a server ignore the latter as invalid and send the whole blob, but a client asking for a window
    /// never wants the whole blob instead (a resuming client would append it), and distribution answers 416.
    Unsatisfiable,
}

pub fn parse(header: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.trim().split_once('-') else {
        return RangeRequest::Full;
    };
    let parse_num = |s: &str| s.trim().parse::<u64>().ok();
    match (first.trim().is_empty(), last.trim().is_empty()) {
        // bytes=-N: the last N bytes.
        (true, false) => match parse_num(last) {
            Some(0) => RangeRequest::Unsatisfiable,
            Some(_) if size == 0 => RangeRequest::Unsatisfiable,
            Some(n) => RangeRequest::Partial(ByteRange { start: size.saturating_sub(n), end: size }),
            None => RangeRequest::Full,
        },
        // bytes=A-: from A to the end.
        (false, true) => match parse_num(first) {
            Some(a) if a < size => RangeRequest::Partial(ByteRange { start: a, end: size }),
            Some(_) => RangeRequest::Unsatisfiable,
            None => RangeRequest::Full,
        },
        // bytes=A-B, B inclusive and clamped to the end; B before A names no byte at all.
        (false, false) => match (parse_num(first), parse_num(last)) {
            (Some(a), Some(b)) if a > b => RangeRequest::Unsatisfiable,
            (Some(a), Some(b)) if a < size => RangeRequest::Partial(ByteRange { start: a, end: b.min(size - 1) + 1 }),
            (Some(_), Some(_)) => RangeRequest::Unsatisfiable,
            _ => RangeRequest::Full,
        },
        (true, true) => RangeRequest::Full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(start: u64, end: u64) -> RangeRequest {
        RangeRequest::Partial(ByteRange { start, end })
    }

    #[test]
    fn ranges() {
        assert_eq!(parse(None, 10), RangeRequest::Full);
        assert_eq!(parse(Some("bytes=0-4"), 10), part(0, 5));
        assert_eq!(parse(Some("bytes=5-"), 10), part(5, 10));
        assert_eq!(parse(Some("bytes=-3"), 10), part(7, 10));
        assert_eq!(parse(Some("bytes=-30"), 10), part(0, 10));
        assert_eq!(parse(Some("bytes=8-100"), 10), part(8, 10));
        assert_eq!(parse(Some("bytes=10-"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=10-20"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=-0"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-"), 0), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=5-2"), 10), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=500-0"), 1000), RangeRequest::Unsatisfiable);
        assert_eq!(parse(Some("bytes=0-1,3-4"), 10), RangeRequest::Full);
        assert_eq!(parse(Some("items=0-1"), 10), RangeRequest::Full);
        assert_eq!(parse(Some("bytes=x-1"), 10), RangeRequest::Full);
    }
}
