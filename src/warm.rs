//! `breakwater warm`: pulls artifacts through a running breakwater so that its cache holds them before a
//! rollout. It is an ordinary registry client: whatever it pulls, the server fetches (once) from upstream.

use futures_util::StreamExt;
use serde::Deserialize;

use crate::oci::{Digest, OCI_INDEX, DOCKER_LIST};

/// A reference as the server names it: `REPO:TAG` or `REPO@DIGEST` (e.g. `docker.io/library/alpine:3.20`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmRef {
    pub repo: String,
    pub reference: String,
}

impl std::str::FromStr for WarmRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (repo, reference) = if let Some((r, d)) = s.split_once('@') {
            (r, d.to_string())
        } else {
            match s.rsplit_once(':') {
                // A colon before the last slash belongs to a host:port, not to a tag.
                Some((r, t)) if !t.contains('/') => (r, t.to_string()),
                _ => (s, "latest".to_string()),
            }
        };
        repo.parse::<crate::oci::RepoName>().map_err(|e| format!("{s}: {e}"))?;
        reference.parse::<crate::oci::Reference>().map_err(|e| format!("{s}: {e}"))?;
        Ok(WarmRef { repo: repo.to_string(), reference })
    }
}

/// What a warm-up pulled.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct WarmStats {
    pub manifests: u64,
    pub blobs: u64,
    pub bytes: u64,
}

#[derive(Deserialize)]
struct Platform {
    os: Option<String>,
    architecture: Option<String>,
    variant: Option<String>,
}

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    platform: Option<Platform>,
}

#[derive(Deserialize)]
struct Manifest {
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

/// Pulls `refs` through the breakwater that `server` reaches (its URL, and the credentials it is logged in to
/// with: the upstream client speaks basic auth and the token flow, as for any registry). With `platform`
/// (`os/arch[/variant]`), only that platform of an index is pulled; otherwise all of them.
pub async fn warm(server: crate::upstream::UpstreamConfig, refs: &[WarmRef], platform: Option<&str>) -> anyhow::Result<WarmStats> {
    let client = crate::upstream::Upstream::new(server)?;
    let mut stats = WarmStats::default();
    for r in refs {
        let repo: crate::oci::RepoName = r.repo.parse().map_err(|e| anyhow::anyhow!("{}: {e}", r.repo))?;
        let mut queue = vec![r.reference.clone()];
        while let Some(reference) = queue.pop() {
            let m = client.manifest(&repo, &reference, false).await.map_err(|e| anyhow::anyhow!("{}:{reference}: {e}", r.repo))?;
            let body = m.bytes.unwrap_or_default();
            stats.manifests += 1;
            let parsed: Manifest = serde_json::from_slice(&body)?;
            if m.media_type == OCI_INDEX || m.media_type == DOCKER_LIST || parsed.manifests.is_some() {
                for child in parsed.manifests.unwrap_or_default() {
                    if platform.is_none_or(|want| matches_platform(child.platform.as_ref(), want)) {
                        queue.push(child.digest);
                    }
                }
                continue;
            }
            for b in parsed.config.into_iter().chain(parsed.layers.unwrap_or_default()) {
                let digest: Digest = b.digest.parse().map_err(|e| anyhow::anyhow!("{e}"))?;
                let blob = client.blob(&repo, &digest, 0).await.map_err(|e| anyhow::anyhow!("{}@{digest}: {e}", r.repo))?;
                let mut body = blob.body;
                while let Some(chunk) = body.next().await {
                    stats.bytes += chunk?.len() as u64;
                }
                stats.blobs += 1;
            }
        }
    }
    Ok(stats)
}

fn matches_platform(p: Option<&Platform>, want: &str) -> bool {
    let Some(p) = p else { return false };
    let mut parts = want.split('/');
    let (os, arch, variant) = (parts.next(), parts.next(), parts.next());
    p.os.as_deref() == os && p.architecture.as_deref() == arch && (variant.is_none() || p.variant.as_deref() == variant)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        let r: WarmRef = "docker.io/library/alpine:3.20".parse().unwrap();
        assert_eq!((r.repo.as_str(), r.reference.as_str()), ("docker.io/library/alpine", "3.20"));
        let r: WarmRef = "up/app".parse().unwrap();
        assert_eq!(r.reference, "latest");
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        let r: WarmRef = format!("up/app@{d}").parse().unwrap();
        assert_eq!(r.reference, d);
        assert!("Up/App:1".parse::<WarmRef>().is_err());
        assert!("up/app@sha256:short".parse::<WarmRef>().is_err());
    }
}
