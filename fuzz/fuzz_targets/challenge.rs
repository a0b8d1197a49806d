//! `WWW-Authenticate` from an upstream: whatever the header, a parsed challenge is normalised (scheme and
//! parameter names lowercase and trimmed), no bigger than its text, and printed back in the canonical form
//! (every value quoted and escaped) it parses to the same challenge.
#![no_main]

use breakwater::fuzzing::{parse_challenge, Challenge};
use libfuzzer_sys::fuzz_target;

fn print(c: &Challenge) -> String {
    let mut names: Vec<&String> = c.params.keys().collect();
    names.sort();
    let params: Vec<String> = names
        .into_iter()
        .map(|n| format!("{n}=\"{}\"", c.params[n].replace('\\', "\\\\").replace('"', "\\\"")))
        .collect();
    if params.is_empty() {
        c.scheme.clone()
    } else {
        format!("{} {}", c.scheme, params.join(","))
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else { return };
    let Some(c) = parse_challenge(header) else { return };
    assert!(!c.scheme.is_empty() && !c.scheme.contains(char::is_whitespace), "scheme {:?}", c.scheme);
    assert_eq!(c.scheme, c.scheme.to_ascii_lowercase());
    for (name, value) in &c.params {
        assert_eq!(name, &name.to_ascii_lowercase());
        assert_eq!(name, name.trim());
        assert!(name.len() + value.len() < header.len());
    }
    assert!(c.params.len() <= header.matches('=').count());
    let printed = print(&c);
    assert_eq!(parse_challenge(&printed).as_ref(), Some(&c), "printed as {printed:?}");
});
