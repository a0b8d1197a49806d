//! `Content-Range` of a chunked upload's PATCH: whatever the header, an accepted range is two numbers that print
//! back (as `S-E`) to the same range, and the forms clients send mean what they say. Whether the range fits the
//! upload (start where it ends, end not before start) is the registry's to judge, not this parser's.
#![no_main]

use breakwater::fuzzing::parse_content_range;
use libfuzzer_sys::fuzz_target;

fn word(b: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(b);
    u64::from_le_bytes(w)
}

fuzz_target!(|data: &[u8]| {
    if let Some(Ok((start, end))) = parse_content_range(data) {
        let printed = format!("{start}-{end}");
        assert_eq!(parse_content_range(printed.as_bytes()), Some(Ok((start, end))), "{:?}", String::from_utf8_lossy(data));
    }
    if data.len() < 16 {
        return;
    }
    let (start, end) = (word(&data[..8]), word(&data[8..16]));
    // What distribution's clients send (`0-99`), RFC 9110's form (`bytes 0-99/*`, `bytes 0-99/100`), and `bytes=`.
    for form in [format!("{start}-{end}"), format!("bytes {start}-{end}/*"), format!("bytes {start}-{end}/{end}"), format!("bytes={start}-{end}")] {
        assert_eq!(parse_content_range(form.as_bytes()), Some(Ok((start, end))), "{form}");
    }
});
