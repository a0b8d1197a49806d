//! A listing's `Link` header, as the upstream client follows it to the next catalog or tags page: any header
//! value is handled, `%XX` decoding agrees with a plain reference decoder, and any `last` a registry
//! percent-encodes into the link (relative or absolute) comes back unchanged.
#![no_main]

use breakwater::fuzzing::{parse_link_last, percent_decode};
use libfuzzer_sys::fuzz_target;

/// Reference decoder: `%` and two hex digits is a byte, `+` is a space (form encoding), the rest is itself.
fn decode(s: &str) -> String {
    let b = s.as_bytes();
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every byte but the URL-unreserved ones as `%XX`, as Go's `url.Values.Encode` does for names and tags.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let _ = parse_link_last(data);
    let Ok(s) = std::str::from_utf8(data) else { return };
    assert_eq!(percent_decode(s), decode(s), "decoding {s:?}");
    let e = encode(s);
    for link in [
        format!("</v2/_catalog?last={e}&n=100>; rel=\"next\""),
        format!("<https://r.example/v2/team/app/tags/list?n=2&last={e}>; rel=\"next\""),
    ] {
        assert_eq!(parse_link_last(link.as_bytes()).as_deref(), Some(s), "{link}");
    }
});
