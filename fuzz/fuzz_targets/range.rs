//! `Range` on blob GETs: whatever the header, a partial answer is a non-empty window inside the blob (so the
//! `Content-Range` written from it never underflows), and the canonical forms mean what RFC 9110 says.
#![no_main]

use breakwater::fuzzing::{parse_range, RangeRequest};
use breakwater::storage::ByteRange;
use libfuzzer_sys::fuzz_target;

fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    u64::from_le_bytes(w)
}

/// Small sizes and offsets are where the edges are (0, 1, size - 1); half the inputs stay among them.
fn num(b: &[u8]) -> u64 {
    let w = word(b);
    if w & 1 == 0 { (w >> 1) % 64 } else { w >> 1 }
}

fn check(r: &RangeRequest, size: u64) {
    if let RangeRequest::Partial(ByteRange { start, end }) = *r {
        assert!(start < end && end <= size, "window {start}..{end} of a {size}-byte blob");
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 24 {
        return;
    }
    let (size, a, b) = (num(&data[..8]), num(&data[8..16]), num(&data[16..24]));
    if let Ok(header) = std::str::from_utf8(&data[24..]) {
        check(&parse_range(Some(header), size), size);
    }

    // bytes=A-B: B inclusive, clamped to the end; A past the end, or A > B (no byte at all), is unsatisfiable.
    let got = parse_range(Some(&format!("bytes={a}-{b}")), size);
    let want = if a > b || a >= size {
        RangeRequest::Unsatisfiable
    } else {
        partial(a, b.min(size - 1) + 1)
    };
    assert_eq!(got, want, "bytes={a}-{b} of {size}");
    // bytes=A-: from A to the end.
    let got = parse_range(Some(&format!("bytes={a}-")), size);
    assert_eq!(got, if a < size { partial(a, size) } else { RangeRequest::Unsatisfiable }, "bytes={a}- of {size}");
    // bytes=-N: the last N bytes (all of them when N >= size); none is unsatisfiable.
    let got = parse_range(Some(&format!("bytes=-{b}")), size);
    let want = if b == 0 || size == 0 { RangeRequest::Unsatisfiable } else { partial(size - b.min(size), size) };
    assert_eq!(got, want, "bytes=-{b} of {size}");
});

fn partial(start: u64, end: u64) -> RangeRequest {
    RangeRequest::Partial(ByteRange { start, end })
}
