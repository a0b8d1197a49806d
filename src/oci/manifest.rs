//! The fields of a manifest that the registry needs to check references and answer the referrers API.
//!
//! The manifest's bytes stay the truth: this parse only *reads* them, and they are stored and served unchanged.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::Digest;

/// Manifests larger than this are refused, as distribution and the spec's guidance do: a manifest is held in
/// memory whole, so its size must be bounded.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Whether a manifest points at blobs (an image) or at other manifests (an index).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    Image,
    Index,
}

/// A content descriptor, with the fields the registry reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    #[serde(default)]
    pub media_type: Option<String>,
    pub digest: String,
    pub size: i64,
    #[serde(default)]
    pub artifact_type: Option<String>,
    #[serde(default)]
    pub urls: Option<Vec<String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    #[serde(default)]
    schema_version: Option<i64>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    artifact_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    subject: Option<Descriptor>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
}

/// What the registry learned from parsing a manifest.
#[derive(Debug, Clone)]
pub struct ManifestInfo {
    pub kind: ManifestKind,
    /// The media type the manifest is stored and served with.
    pub media_type: String,
    /// `artifactType`, or for an image manifest without one, its config's media type (as the referrers API wants).
    pub artifact_type: Option<String>,
    pub subject: Option<Digest>,
    pub annotations: Option<BTreeMap<String, String>>,
    /// Blobs that must exist in the repository (config and distributable layers).
    pub blobs: Vec<Digest>,
    /// The size each descriptor of `blobs` gives (same order; `None` if negative): lets a copier choose how to
    /// upload a blob before it has fetched a byte.
    pub blob_sizes: Vec<Option<u64>>,
    /// Manifests an index refers to; they must exist in the repository.
    pub children: Vec<Digest>,
}

fn parse_digest(d: &Descriptor) -> Result<Digest, String> {
    d.digest.parse().map_err(|_| format!("invalid descriptor digest {:?}", d.digest))
}

impl ManifestInfo {
    /// Parses `bytes`, pushed with the `Content-Type` header `content_type` (if any).
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<ManifestInfo, String> {
        let raw: RawManifest = serde_json::from_slice(bytes).map_err(|e| format!("manifest is not valid JSON: {e}"))?;
        if raw.schema_version != Some(2) {
            return Err("only schemaVersion 2 manifests are supported".into());
        }
        // Clients sometimes send no or a generic content type; then the body's own mediaType (or its shape) decides.
        let header = content_type
            .map(|c| c.split(';').next().unwrap_or("").trim())
            .filter(|c| !c.is_empty() && *c != "application/json" && *c != "application/octet-stream");
        if let (Some(h), Some(b)) = (header, raw.media_type.as_deref()) {
            if h != b {
                return Err(format!("Content-Type {h} does not match the manifest's mediaType {b}"));
            }
        }
        let media_type = match header.or(raw.media_type.as_deref()) {
            Some(m) => m.to_string(),
            None if raw.manifests.is_some() => OCI_INDEX.to_string(),
            None => OCI_MANIFEST.to_string(),
        };
        let kind = match media_type.as_str() {
            OCI_MANIFEST | DOCKER_MANIFEST => ManifestKind::Image,
            OCI_INDEX | DOCKER_LIST => ManifestKind::Index,
            other => return Err(format!("unsupported manifest media type {other}")),
        };
        let subject = raw.subject.as_ref().map(parse_digest).transpose()?;
        let mut blobs = Vec::new();
        let mut blob_sizes = Vec::new();
        let mut children = Vec::new();
        let artifact_type = match kind {
            ManifestKind::Image => {
                let config = raw.config.as_ref().ok_or("image manifest has no config")?;
                let layers = raw.layers.as_ref().ok_or("image manifest has no layers")?;
                blobs.push(parse_digest(config)?);
                blob_sizes.push(u64::try_from(config.size).ok());
                for layer in layers {
                    let d = parse_digest(layer)?;
                    // Non-distributable layers live at their `urls`, not in the registry.
                    if layer.urls.as_ref().is_none_or(|u| u.is_empty()) {
                        blobs.push(d);
                        blob_sizes.push(u64::try_from(layer.size).ok());
                    }
                }
                raw.artifact_type.clone().or_else(|| config.media_type.clone())
            }
            ManifestKind::Index => {
                let manifests = raw.manifests.as_ref().ok_or("index has no manifests")?;
                for m in manifests {
                    children.push(parse_digest(m)?);
                }
                raw.artifact_type.clone()
            }
        };
        Ok(ManifestInfo { kind, media_type, artifact_type, subject, annotations: raw.annotations, blobs, blob_sizes, children })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn image_manifest() {
        let body = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/x.cfg","digest":"{D}","size":0}},"layers":[{{"digest":"{D}","size":0}}],"subject":{{"digest":"{D}","size":0}},"annotations":{{"a":"b"}}}}"#
        );
        let m = ManifestInfo::parse(body.as_bytes(), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(m.kind, ManifestKind::Image);
        assert_eq!(m.blobs.len(), 2);
        assert_eq!(m.artifact_type.as_deref(), Some("application/x.cfg"));
        assert_eq!(m.subject.unwrap().to_string(), D);
    }

    #[test]
    fn index_without_media_type_field() {
        let body = format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"{D}","size":1}}]}}"#);
        let m = ManifestInfo::parse(body.as_bytes(), Some(OCI_INDEX)).unwrap();
        assert_eq!(m.kind, ManifestKind::Index);
        assert_eq!(m.children.len(), 1);
    }

    #[test]
    fn rejects_mismatch_and_garbage() {
        let body = format!(r#"{{"schemaVersion":2,"mediaType":"{OCI_INDEX}","manifests":[]}}"#);
        assert!(ManifestInfo::parse(body.as_bytes(), Some(OCI_MANIFEST)).is_err());
        assert!(ManifestInfo::parse(b"not json", Some(OCI_MANIFEST)).is_err());
        assert!(ManifestInfo::parse(br#"{"schemaVersion":1}"#, None).is_err());
        let bad = r#"{"schemaVersion":2,"config":{"digest":"sha256:zz","size":0},"layers":[]}"#;
        assert!(ManifestInfo::parse(bad.as_bytes(), Some(OCI_MANIFEST)).is_err());
    }
}
