//! `ManifestInfo::parse` on any bytes, pushed with any of the Content-Types clients send. What it accepts must
//! be consistent (kind and media type agree, every digest it hands on is valid grammar), deterministic, and no
//! larger than the input could describe.
#![no_main]

use breakwater::oci::{Digest, ManifestInfo, ManifestKind, DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST};
use libfuzzer_sys::fuzz_target;

/// The shortest JSON string a descriptor's digest can be (`"sha256:<64 hex>"`): a bound on how many digests
/// a manifest of a given length can name.
const MIN_DIGEST_JSON: usize = 2 + 7 + 64;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the Content-Type of the push.
    let Some((&pick, body)) = data.split_first() else { return };
    let content_type = match pick % 8 {
        0 => None,
        1 => Some("application/json"),
        2 => Some(OCI_MANIFEST),
        3 => Some(OCI_INDEX),
        4 => Some(DOCKER_MANIFEST),
        5 => Some(DOCKER_LIST),
        6 => Some("application/vnd.oci.image.manifest.v1+json; charset=utf-8"),
        _ => Some("application/octet-stream"),
    };
    let Ok(info) = ManifestInfo::parse(body, content_type) else { return };

    match info.kind {
        ManifestKind::Image => {
            assert!(info.media_type == OCI_MANIFEST || info.media_type == DOCKER_MANIFEST, "{}", info.media_type);
            assert!(info.children.is_empty());
            assert!(!info.blobs.is_empty(), "an image's config is always a required blob");
        }
        ManifestKind::Index => {
            assert!(info.media_type == OCI_INDEX || info.media_type == DOCKER_LIST, "{}", info.media_type);
            assert!(info.blobs.is_empty());
        }
    }
    // A specific Content-Type is what the manifest is stored and served with.
    if let Some(ct) = content_type.map(|c| c.split(';').next().unwrap_or("").trim()) {
        if ct != "application/json" && ct != "application/octet-stream" {
            assert_eq!(info.media_type, ct);
        }
    }
    let digests: Vec<&Digest> = info.blobs.iter().chain(&info.children).chain(info.subject.as_ref()).collect();
    for d in &digests {
        assert_eq!(d.to_string().parse::<Digest>().as_ref(), Ok(*d));
    }
    assert!(digests.len() * MIN_DIGEST_JSON <= body.len(), "{} digests out of {} bytes", digests.len(), body.len());

    let again = ManifestInfo::parse(body, content_type).expect("the same bytes parsed twice");
    assert_eq!((again.kind, &again.media_type, &again.blobs, &again.children), (info.kind, &info.media_type, &info.blobs, &info.children));
    assert_eq!((&again.subject, &again.artifact_type, &again.annotations), (&info.subject, &info.artifact_type, &info.annotations));
});
