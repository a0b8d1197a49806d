//! Repository names, tags, digests and references: each parser accepts exactly what the distribution spec's
//! regular expression accepts, and a parsed value prints back to the very string it came from (storage paths
//! and database keys are built from the printed form).
#![no_main]

use std::sync::LazyLock;

use breakwater::oci::{Algorithm, Digest, Reference, RepoName, Tag};
use libfuzzer_sys::fuzz_target;
use regex::Regex;

/// The spec's grammar (distribution-spec, "Pulling manifests"), anchored. Names are also bounded at 255 bytes.
static NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*$").unwrap());
static TAG: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}$").unwrap());
/// The two registered algorithms, with their fixed-length lowercase hex (image-spec descriptor.md).
static DIGEST: LazyLock<Regex> = LazyLock::new(|| Regex::new(r"^(sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128})$").unwrap());

fuzz_target!(|data: &[u8]| {
    // Computed digests are valid grammar too, whatever the bytes.
    for alg in [Algorithm::Sha256, Algorithm::Sha512] {
        let d = Digest::of(alg, data);
        assert_eq!(d.to_string().parse::<Digest>().as_ref(), Ok(&d));
    }
    let Ok(s) = std::str::from_utf8(data) else { return };

    let name = s.parse::<RepoName>();
    assert_eq!(name.is_ok(), s.len() <= 255 && NAME.is_match(s), "RepoName and the spec disagree on {s:?}");
    if let Ok(n) = name {
        assert_eq!(n.to_string(), s);
    }

    let tag = s.parse::<Tag>();
    assert_eq!(tag.is_ok(), TAG.is_match(s), "Tag and the spec disagree on {s:?}");
    if let Ok(t) = &tag {
        assert_eq!(t.to_string(), s);
    }

    let digest = s.parse::<Digest>();
    assert_eq!(digest.is_ok(), DIGEST.is_match(s), "Digest and the spec disagree on {s:?}");
    if let Ok(d) = &digest {
        assert_eq!(d.to_string(), s);
        assert_eq!(format!("{}:{}", d.algorithm().as_str(), d.hex()), s);
    }

    // A reference is a digest when it has a `:` (tags cannot), else a tag.
    match s.parse::<Reference>() {
        Ok(r) => {
            assert_eq!(r.to_string(), s);
            match r {
                Reference::Digest(d) => assert_eq!(digest.as_ref(), Ok(&d)),
                Reference::Tag(t) => assert_eq!(tag.as_ref(), Ok(&t)),
            }
        }
        Err(_) => assert!(if s.contains(':') { digest.is_err() } else { tag.is_err() }),
    }
});
