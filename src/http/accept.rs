//! The `Accept` header of a manifest GET or HEAD (RFC 9110 §12.5.1), as far as manifests need it: which media
//! types the client takes, and the media ranges it sent, to forward to an upstream.
//!
//! Content negotiation is HTTP's own semantics, so it is decided here rather than in `registry`: the registry
//! stores one representation per manifest (its exact bytes), and a client either accepts its media type or is
//! answered as if the manifest were not there, which is what distribution does.

use axum::http::{header, HeaderMap};

/// At most this many media ranges are kept from a request (for the check and for forwarding): clients send a
/// handful; a longer list is cut rather than copied into every upstream request.
const MAX_RANGES: usize = 32;

/// What a client said it accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accept {
    /// The media ranges with a non-zero quality, lowercased, parameters removed (`type/subtype`, `type/*`,
    /// `*/*`); `None` when the request had no usable `Accept`, which accepts everything.
    ranges: Option<Vec<String>>,
}

impl Accept {
    /// Reads every `Accept` field of a request (Docker sends one field per type, others one comma-separated
    /// list; RFC 9110 makes both mean the same list).
    pub fn from_headers(headers: &HeaderMap) -> Accept {
        let values: Vec<&str> = headers.get_all(header::ACCEPT).iter().filter_map(|v| v.to_str().ok()).collect();
        Accept::parse(&values)
    }

    pub fn parse(values: &[&str]) -> Accept {
        let mut ranges = Vec::new();
        let mut seen_any = false;
        for element in values.iter().flat_map(|v| v.split(',')) {
            let mut parts = element.split(';');
            let range = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            if range.is_empty() {
                continue;
            }
            seen_any = true;
            // `q=0` means "not this one" (RFC 9110 §12.4.2); any other quality accepts.
            let refused = parts.any(|p| {
                let p = p.trim().to_ascii_lowercase();
                p.strip_prefix("q=").is_some_and(|q| q.trim().parse::<f32>().is_ok_and(|q| q <= 0.0))
            });
            if !refused && ranges.len() < MAX_RANGES && !ranges.contains(&range) {
                ranges.push(range);
            }
        }
        Accept { ranges: seen_any.then_some(ranges) }
    }

    /// Whether a manifest of `media_type` may be served to this client.
    pub fn accepts(&self, media_type: &str) -> bool {
        let Some(ranges) = &self.ranges else {
            return true;
        };
        let media_type = media_type.to_ascii_lowercase();
        let kind = media_type.split('/').next().unwrap_or("");
        ranges.iter().any(|r| match r.strip_suffix("/*") {
            Some("*") => true,
            Some(k) => k == kind,
            None => *r == media_type,
        })
    }

    /// The media ranges the client sent (without parameters), to forward upstream; empty without an `Accept`.
    pub fn ranges(&self) -> &[String] {
        self.ranges.as_deref().unwrap_or(&[])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OCI: &str = "application/vnd.oci.image.manifest.v1+json";
    const DOCKER: &str = "application/vnd.docker.distribution.manifest.v2+json";

    #[test]
    fn no_accept_or_wildcards_accept_everything() {
        assert!(Accept::parse(&[]).accepts(OCI));
        assert!(Accept::parse(&[""]).accepts(OCI));
        assert!(Accept::parse(&["*/*"]).accepts(OCI));
        assert!(Accept::parse(&["application/*"]).accepts(DOCKER));
        assert!(!Accept::parse(&["text/*"]).accepts(DOCKER));
    }

    #[test]
    fn docker_schema2_and_oci_are_distinct() {
        let docker_only = Accept::parse(&[DOCKER]);
        assert!(docker_only.accepts(DOCKER));
        assert!(!docker_only.accepts(OCI));
        assert!(!Accept::parse(&[OCI]).accepts(DOCKER));
    }

    #[test]
    fn lists_fields_parameters_and_quality() {
        let a = Accept::parse(&[&format!("{DOCKER}; q=0.5 , {OCI};q=1"), "application/json"]);
        assert!(a.accepts(OCI) && a.accepts(DOCKER) && a.accepts("application/json"));
        assert_eq!(a.ranges(), [DOCKER, OCI, "application/json"]);
        // Case-insensitive, as media types are.
        assert!(Accept::parse(&["Application/Vnd.OCI.Image.Manifest.v1+JSON"]).accepts(OCI));
        // q=0 refuses a type; a header of refusals only accepts nothing.
        let refused = Accept::parse(&[&format!("{OCI};q=0, {DOCKER}")]);
        assert!(!refused.accepts(OCI) && refused.accepts(DOCKER));
        assert!(!Accept::parse(&[&format!("{OCI};q=0.0")]).accepts(OCI));
    }

    #[test]
    fn ranges_are_bounded_and_deduplicated() {
        let many: Vec<String> = (0..100).map(|i| format!("application/x-{i}")).collect();
        let joined = many.join(",");
        assert_eq!(Accept::parse(&[&joined]).ranges().len(), MAX_RANGES);
        assert_eq!(Accept::parse(&[OCI, OCI]).ranges(), [OCI]);
    }
}
