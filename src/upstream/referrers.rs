//! The manifests that refer to a subject on a registry: its referrers API (following `Link` pages), or, for a
//! registry without one (distribution 2.8 answers `404 page not found`), the distribution spec 1.1's referrers tag
//! schema, an index tagged `<alg>-<hex>` that clients such as cosign and oras keep up to date.

use std::collections::BTreeMap;

use reqwest::header::HeaderMap;
use reqwest::Method;

use super::{Upstream, UpstreamError};
use crate::oci::{Digest, RepoName};

/// One referrer, as a descriptor in a referrers index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteReferrer {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    pub artifact_type: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
}

/// The referrers of a subject, and whether there were more than the caller wanted held.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Referrers {
    pub items: Vec<RemoteReferrer>,
    pub truncated: bool,
}

/// The tag under which the referrers tag schema keeps the index of `subject`'s referrers: `<alg>-<hex>`, the
/// algorithm cut to 32 characters and the hex to 64, as the spec says (a tag has at most 128).
pub fn fallback_tag(subject: &Digest) -> String {
    let (alg, hex) = (subject.algorithm().as_str(), subject.hex());
    format!("{}-{}", &alg[..alg.len().min(32)], &hex[..hex.len().min(64)])
}

/// The descriptors of an index's `manifests`; descriptors without a valid digest, media type or size are
/// skipped (they could not be fetched anyway).
pub(crate) fn index_referrers(body: &[u8]) -> Result<Vec<RemoteReferrer>, UpstreamError> {
    let v: serde_json::Value = serde_json::from_slice(body).map_err(|e| UpstreamError::Invalid(format!("referrers index: {e}")))?;
    let descriptors = v.get("manifests").and_then(|m| m.as_array()).map(Vec::as_slice).unwrap_or_default();
    Ok(descriptors.iter().filter_map(descriptor).collect())
}

fn descriptor(d: &serde_json::Value) -> Option<RemoteReferrer> {
    let text = |key: &str| d.get(key).and_then(|x| x.as_str()).map(str::to_string);
    let annotations = d.get("annotations").and_then(|a| serde_json::from_value::<BTreeMap<String, String>>(a.clone()).ok());
    Some(RemoteReferrer {
        media_type: text("mediaType")?,
        digest: text("digest")?.parse().ok()?,
        size: d.get("size")?.as_u64()?,
        artifact_type: text("artifactType"),
        annotations,
    })
}

impl Upstream {
    /// The referrers of `subject` in `repo`, at most `max`: from the referrers API, or when the registry has none,
    /// from the fallback tag (none when that tag does not exist either).
    pub async fn referrers_of(&self, repo: &RepoName, subject: &Digest, max: usize) -> Result<Referrers, UpstreamError> {
        if let Some(found) = self.referrers_api(repo, subject, max).await? {
            return Ok(found);
        }
        let mut items = match self.manifest(repo, &fallback_tag(subject), false).await {
            Ok(m) => index_referrers(m.bytes.as_deref().unwrap_or_default())?,
            Err(UpstreamError::NotFound) => Vec::new(),
            Err(e) => return Err(e),
        };
        let truncated = items.len() > max;
        items.truncate(max);
        Ok(Referrers { items, truncated })
    }

    /// The referrers API's answer, every `Link` page of it up to `max` descriptors; `None` if the registry answers
    /// 404 (it has no referrers API: one that has it answers an empty index for an unknown subject).
    pub async fn referrers_api(&self, repo: &RepoName, subject: &Digest, max: usize) -> Result<Option<Referrers>, UpstreamError> {
        let mut target = format!("/v2/{repo}/referrers/{subject}");
        let mut found = Referrers::default();
        loop {
            let resp = match self.exchange(Method::GET, &format!("repository:{repo}:pull"), &target, HeaderMap::new(), None).await {
                Ok(r) => r,
                Err(UpstreamError::NotFound) if found.items.is_empty() => return Ok(None),
                Err(e) => return Err(e),
            };
            let next = super::catalog::next_target(resp.headers());
            let body = super::read_limited(resp, crate::oci::MAX_MANIFEST_BYTES, self.config.timeout).await?;
            let page = index_referrers(&body)?;
            let added = page.len();
            found.items.extend(page);
            if found.items.len() > max {
                found.items.truncate(max);
                found.truncated = true;
                return Ok(Some(found));
            }
            match next {
                // A page that adds nothing, or a `Link` to itself, ends the walk rather than loop.
                Some(n) if n != target && added > 0 => target = n,
                _ => return Ok(Some(found)),
            }
        }
    }

    /// Digests of the manifests that refer to `digest` in `repo` (the referrers API, following its `Link`
    /// pages); empty if the registry does not support it.
    pub async fn referrers(&self, repo: &RepoName, digest: &Digest) -> Result<Vec<Digest>, UpstreamError> {
        let found = self.referrers_api(repo, digest, usize::MAX).await?.unwrap_or_default();
        Ok(found.items.into_iter().map(|r| r.digest).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_tags_follow_the_spec() {
        let d: Digest = format!("sha256:{}", "a".repeat(64)).parse().unwrap();
        assert_eq!(fallback_tag(&d), format!("sha256-{}", "a".repeat(64)));
        let long: Digest = format!("sha512:{}", "b".repeat(128)).parse().unwrap();
        let tag = fallback_tag(&long);
        assert_eq!(tag, format!("sha512-{}", "b".repeat(64)));
        assert!(tag.parse::<crate::oci::Tag>().is_ok(), "a valid tag");
    }

    #[test]
    fn index_descriptors_are_read_leniently() {
        let d = format!("sha256:{}", "c".repeat(64));
        let body = serde_json::json!({"manifests": [
            {"mediaType": "m", "digest": d, "size": 7, "artifactType": "t", "annotations": {"k": "v"}},
            {"mediaType": "m", "digest": "sha256:short", "size": 7},
            {"mediaType": "m", "digest": d, "size": -1},
            {"digest": d, "size": 7},
            {"mediaType": "m", "digest": d, "size": 3, "annotations": {"k": 1}},
        ]});
        let got = index_referrers(body.to_string().as_bytes()).unwrap();
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].annotations.as_ref().and_then(|a| a.get("k")).map(String::as_str), Some("v"));
        assert_eq!((got[0].artifact_type.as_deref(), got[0].size), (Some("t"), 7));
        assert_eq!((got[1].annotations.as_ref(), got[1].size), (None, 3), "annotations that are not strings are dropped");
        assert_eq!(index_referrers(b"{}").unwrap(), Vec::new());
        assert!(index_referrers(b"not json").is_err());
    }
}
