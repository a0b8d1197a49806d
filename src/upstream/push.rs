//! Writing to a registry: what replication needs of its destination. Blob existence checks, cross-repository
//! mounts, uploads (monolithic, or streamed with resumption from the registry's upload offset), manifest pushes
//! and deletes (event-driven replication).

use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};

use super::{Upstream, UpstreamError};
use crate::oci::{Digest, RepoName};
use crate::storage::ByteStream;

/// What a mount request led to.
pub enum Mount {
    Mounted,
    /// The registry did not mount, and opened an upload session at this location instead.
    Session(String),
}

/// What a single POST (the whole blob in the upload's POST) led to.
pub enum Posted {
    /// The registry stored the blob: one request in all.
    Created,
    /// The registry does not take a blob in its POST (distribution ignores the body) and opened an upload
    /// session at this location instead, which the blob can still be PUT to.
    Session(String),
}

fn delete_scope(repo: &RepoName) -> String {
    format!("repository:{repo}:delete")
}

fn push_scope(repo: &RepoName) -> String {
    format!("repository:{repo}:pull,push")
}

fn location(resp: &reqwest::Response) -> Result<String, UpstreamError> {
    resp.headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
        .ok_or_else(|| UpstreamError::Invalid(format!("{} without Location", resp.status())))
}

fn with_digest(location: &str, digest: &Digest) -> String {
    let sep = if location.contains('?') { '&' } else { '?' };
    format!("{location}{sep}digest={digest}")
}

impl Upstream {
    /// The size of blob `digest` in `repo`, or `None` if the registry does not have it there.
    pub async fn blob_size(&self, repo: &RepoName, digest: &Digest) -> Result<Option<u64>, UpstreamError> {
        match self.exchange(Method::HEAD, &push_scope(repo), &format!("/v2/{repo}/blobs/{digest}"), HeaderMap::new(), None).await {
            // The header itself: reqwest's `content_length()` is the size of the (empty) body of a HEAD.
            Ok(r) => Ok(Some(
                r.headers()
                    .get(header::CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
            Err(UpstreamError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The digest `reference` points at in `repo`, or `None`.
    pub async fn manifest_digest(&self, repo: &RepoName, reference: &str) -> Result<Option<Digest>, UpstreamError> {
        match self.manifest(repo, reference, true).await {
            Ok(m) => Ok(Some(m.digest)),
            Err(UpstreamError::NotFound) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Asks the registry to mount `digest` from `from` into `repo`.
    pub async fn mount(&self, repo: &RepoName, digest: &Digest, from: &RepoName) -> Result<Mount, UpstreamError> {
        let path = format!("/v2/{repo}/blobs/uploads/?mount={digest}&from={from}");
        let resp = self.exchange(Method::POST, &push_scope(repo), &path, HeaderMap::new(), None).await?;
        if resp.status() == StatusCode::CREATED {
            Ok(Mount::Mounted)
        } else {
            Ok(Mount::Session(location(&resp)?))
        }
    }

    /// Sends the whole blob in the upload's POST (the spec's "single POST", `?digest=` with the body). The body
    /// is bytes, so a 401 challenge replays it.
    pub async fn post_blob(&self, repo: &RepoName, digest: &Digest, bytes: Bytes) -> Result<Posted, UpstreamError> {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        let path = format!("/v2/{repo}/blobs/uploads/?digest={digest}");
        let resp = self.exchange(Method::POST, &push_scope(repo), &path, h, Some(reqwest::Body::from(bytes))).await?;
        if resp.status() == StatusCode::CREATED {
            Ok(Posted::Created)
        } else {
            Ok(Posted::Session(location(&resp)?))
        }
    }

    /// Opens an upload session in `repo` and returns its location.
    pub async fn start_upload(&self, repo: &RepoName) -> Result<String, UpstreamError> {
        let resp = self.exchange(Method::POST, &push_scope(repo), &format!("/v2/{repo}/blobs/uploads/"), HeaderMap::new(), None).await?;
        location(&resp)
    }

    /// Uploads a whole blob of `size` bytes into the session at `location` in one PUT.
    pub async fn put_blob(&self, repo: &RepoName, location: &str, digest: &Digest, size: u64, body: ByteStream) -> Result<(), UpstreamError> {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
        self.exchange_stream(Method::PUT, &push_scope(repo), &with_digest(location, digest), h, body).await?;
        Ok(())
    }

    /// Uploads a whole blob held in memory into the session at `location` in one PUT (replayed after a 401).
    pub async fn put_blob_bytes(&self, repo: &RepoName, location: &str, digest: &Digest, bytes: Bytes) -> Result<(), UpstreamError> {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        self.exchange(Method::PUT, &push_scope(repo), &with_digest(location, digest), h, Some(reqwest::Body::from(bytes))).await?;
        Ok(())
    }

    /// Streams bytes into the session at `location` (a PATCH without `Content-Range`) and returns the session's
    /// next location.
    pub async fn patch_blob(&self, repo: &RepoName, location: &str, body: ByteStream) -> Result<String, UpstreamError> {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
        let resp = self.exchange_stream(Method::PATCH, &push_scope(repo), location, h, body).await?;
        location_or(resp, location)
    }

    /// How many bytes the session at `location` holds (from its `Range: 0-<last>` header), and its location.
    /// `0-0` (and no `Range` at all) reads as 0: registries send `0-0` for an empty session, but distribution
    /// and breakwater send it for a one-byte session too, so 0 is all that is certain. To resume an upload, use
    /// [`Upstream::resume_upload`], which copes with that.
    pub async fn upload_offset(&self, repo: &RepoName, location: &str) -> Result<(u64, String), UpstreamError> {
        let resp = self.exchange(Method::GET, &push_scope(repo), location, HeaderMap::new(), None).await?;
        let last = resp
            .headers()
            .get(header::RANGE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split('-').nth(1))
            .and_then(|end| end.trim().parse::<u64>().ok());
        let offset = match last {
            None | Some(0) => 0,
            Some(end) => end.checked_add(1).ok_or_else(|| UpstreamError::Invalid(format!("upload Range ends at {end}")))?,
        };
        let loc = location_or(resp, location)?;
        Ok((offset, loc))
    }

    /// Where to resume the upload at `location` after a broken PATCH: its offset and location. A session
    /// reporting `0-0` may hold nothing or one byte, which no registry distinguishes (distribution 2.8 ignores
    /// a PATCH's `Content-Range`, so sending byte 0 again cannot be refused as out of order either); such a
    /// session is abandoned for a fresh one, so resuming at 0 is right whatever it held.
    pub async fn resume_upload(&self, repo: &RepoName, location: &str) -> Result<(u64, String), UpstreamError> {
        let (offset, location) = self.upload_offset(repo, location).await?;
        if offset > 0 {
            return Ok((offset, location));
        }
        // Best effort: an abandoned session is the destination's to purge if the DELETE fails.
        let _ = self.exchange(Method::DELETE, &push_scope(repo), &location, HeaderMap::new(), None).await;
        Ok((0, self.start_upload(repo).await?))
    }

    /// Completes the session at `location` as blob `digest`.
    pub async fn finish_blob(&self, repo: &RepoName, location: &str, digest: &Digest) -> Result<(), UpstreamError> {
        let mut h = HeaderMap::new();
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
        self.exchange(Method::PUT, &push_scope(repo), &with_digest(location, digest), h, Some(reqwest::Body::from(Bytes::new()))).await?;
        Ok(())
    }

    /// Deletes the manifest (by digest) or the tag `reference` in `repo`; false if the registry has no such thing
    /// (already gone: what a delete wants).
    pub async fn delete_manifest(&self, repo: &RepoName, reference: &str) -> Result<bool, UpstreamError> {
        let path = format!("/v2/{repo}/manifests/{reference}");
        match self.exchange(Method::DELETE, &delete_scope(repo), &path, HeaderMap::new(), None).await {
            Ok(_) => Ok(true),
            Err(UpstreamError::NotFound) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Pushes a manifest's exact bytes under `reference` (a tag or its digest).
    pub async fn put_manifest(&self, repo: &RepoName, reference: &str, media_type: &str, bytes: Bytes) -> Result<(), UpstreamError> {
        let mut h = HeaderMap::new();
        let ct = HeaderValue::from_str(media_type).map_err(|_| UpstreamError::Invalid(format!("media type {media_type:?}")))?;
        h.insert(header::CONTENT_TYPE, ct);
        let path = format!("/v2/{repo}/manifests/{reference}");
        self.exchange(Method::PUT, &push_scope(repo), &path, h, Some(reqwest::Body::from(bytes))).await?;
        Ok(())
    }
}


fn location_or(resp: reqwest::Response, fallback: &str) -> Result<String, UpstreamError> {
    Ok(location(&resp).unwrap_or_else(|_| fallback.to_string()))
}
