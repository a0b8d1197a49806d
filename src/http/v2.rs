//! Handlers of the distribution API: one entry point that routes on the parsed path and the method.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::Extension;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures_util::TryStreamExt;

use super::accept::Accept;
use super::range::{self, RangeRequest};
use super::route::{self, Route};
use super::{upload_range, App};
use crate::auth::Identity;
use crate::meta::{ManifestRecord, Page};
use crate::flight::BlobFlight;
use crate::oci::{Digest, Reference, RepoName, Tag, MAX_MANIFEST_BYTES};
use crate::proxy::{Cached, ProxiedBlob, ReferrersPage, TagPage, Target};
use crate::registry::{Registry, RegistryError};
use crate::storage::{ByteStream, OpenBlob};

type Result<T> = std::result::Result<T, RegistryError>;

const DIGEST_HEADER: &str = "docker-content-digest";
const UPLOAD_UUID_HEADER: &str = "docker-upload-uuid";
const API_VERSION_HEADER: &str = "docker-distribution-api-version";
/// Largest page of `_catalog` or `tags/list` served; distribution's limit, and a bound on one response's size.
const MAX_PAGE: u64 = 1000;
/// Catalog page size when the client gives none (as distribution).
const DEFAULT_CATALOG_PAGE: u64 = 100;
/// Tags page size when the client gives none: the largest page, so a client that lists without `n` gets as
/// much as it can in one answer, and a `Link` to the rest (the spec allows a partial list then; skopeo and
/// breakwater's replication follow it).
const DEFAULT_TAGS_PAGE: u64 = MAX_PAGE;
/// Largest (and default) page of referrers: each descriptor may carry a manifest's annotations, so pages are
/// shorter than name listings.
const MAX_REFERRERS_PAGE: u64 = 100;
/// Bound on the bytes of the descriptors in one referrers answer; a page stops early (with a `Link`) beyond it.
const MAX_REFERRERS_BYTES: usize = 4 * 1024 * 1024;
/// Most tags one manifest push may add with `?tag=` (the spec asks for at least 10): each is a write, and a bound
/// keeps one request's work bounded whatever the URI's length.
const MAX_PUSH_TAGS: usize = 100;

pub async fn handle(
    State(app): State<Arc<App>>,
    identity: Option<Extension<Identity>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let req = Req { method: &method, uri: &uri, headers: &headers, identity: identity.as_ref().map(|e| &e.0) };
    let mut resp = match dispatch(&app, &req, body).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    resp.headers_mut().insert(API_VERSION_HEADER, HeaderValue::from_static("registry/2.0"));
    resp
}

/// What a handler reads of its request besides the body.
struct Req<'a> {
    method: &'a Method,
    uri: &'a Uri,
    headers: &'a HeaderMap,
    /// Who is asking, when access control is on (the gate has let them through for what the route needs).
    identity: Option<&'a Identity>,
}

async fn dispatch(app: &App, req: &Req<'_>, body: Body) -> Result<Response> {
    let (method, uri, headers) = (req.method, req.uri, req.headers);
    let Some(route) = route::parse(uri.path()) else {
        return Ok(not_found());
    };
    let query: HashMap<String, String> = Query::try_from_uri(uri).map(|q| q.0).unwrap_or_default();
    let reg = &app.registry;
    let ns = query.get("ns").map(String::as_str);
    let m = method.as_str();
    match (&route, m) {
        (Route::Base, "GET" | "HEAD") => Ok(json_response(StatusCode::OK, "application/json", "{}".into(), m)),
        (Route::Catalog, "GET") => {
            let n = page_size(&query, DEFAULT_CATALOG_PAGE, MAX_PAGE)?;
            let (page, cursor) = catalog_page(app, req.identity, query.get("last").map(String::as_str), n).await?;
            let link = (page.more && n > 0).then(|| next_link_after("/v2/_catalog", n, cursor.as_deref().unwrap_or("")));
            let body = serde_json::json!({ "repositories": page.items }).to_string();
            Ok(with_link(json_response(StatusCode::OK, "application/json", body, m), link))
        }
        (Route::Tags { name }, "GET") => {
            let target = app.proxy.target(name, ns)?;
            let n = page_size(&query, DEFAULT_TAGS_PAGE, MAX_PAGE)?;
            let TagPage { page, stale } = app.proxy.tag_list(target, query.get("last").map(String::as_str), n).await?;
            // The name as the client gave it (with its `ns=`), so that the Link leads back the same way.
            let link = (page.more && n > 0).then(|| {
                let after = page.items.last().map(String::as_str).unwrap_or("");
                format!("</v2/{name}/tags/list?n={n}&last={after}{}>; rel=\"next\"", ns_suffix(ns))
            });
            let body = serde_json::json!({ "name": name, "tags": page.items }).to_string();
            Ok(with_stale(with_link(json_response(StatusCode::OK, "application/json", body, m), link), stale))
        }
        (Route::Manifest { name, reference }, "GET" | "HEAD") => {
            let requested = manifest_ref(reference)?;
            let accept = Accept::from_headers(headers);
            let by_tag = matches!(requested, Reference::Tag(_));
            // `local`: served from a pushed repository, whose pulls by tag retention counts (a cache's content
            // is eviction's, which tracks its own accesses).
            let (repo, reference, stale, local) = match app.proxy.target(name, ns)? {
                Target::Local(repo) => (repo, requested, false, true),
                Target::Cached(c) => cached(resolve_cached(app, &c, &requested, &accept).await?),
                Target::LocalOrCached(repo, c) => match reg.manifest_record(&repo, &requested).await {
                    Err(RegistryError::ManifestUnknown) => cached(resolve_cached(app, &c, &requested, &accept).await?),
                    _ => (repo, requested, false, true),
                },
            };
            let (record, body) = if m == "HEAD" {
                (reg.manifest_record(&repo, &reference).await?, Body::empty())
            } else {
                let man = reg.manifest(&repo, &reference).await?;
                (man.record, Body::from(man.bytes))
            };
            // Content negotiation, as distribution does it: a tag whose manifest is of a type the client does not
            // accept is unknown to that client (an old client that takes only Docker schema2 must not be handed an
            // OCI manifest it cannot read). A digest names exactly one set of bytes, so it is served whatever the
            // Accept (distribution does the same; clients fetch an index's children by digest).
            if by_tag && !accept.accepts(&record.media_type) {
                return Err(RegistryError::ManifestNotAcceptable(record.media_type));
            }
            if let (true, Reference::Tag(tag)) = (local, &reference) {
                reg.note_pull(&repo, tag).await;
            }
            Ok(with_stale(manifest_response(&record.media_type, &record.digest, record.size, body), stale))
        }
        (Route::Manifest { name, reference }, "PUT") => {
            let (repo, reference) = (writable(app, name)?, manifest_ref(reference)?);
            let bytes = axum::body::to_bytes(body, MAX_MANIFEST_BYTES + 1).await.map_err(|e| {
                if std::error::Error::source(&e).is_some_and(|s| s.is::<http_body_util::LengthLimitError>()) {
                    RegistryError::ManifestTooLarge
                } else {
                    RegistryError::ManifestInvalid(format!("reading the manifest failed: {e}"))
                }
            })?;
            let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok());
            let tags = push_tags(uri, &reference)?;
            let pushed = reg.put_manifest(&repo, &reference, content_type, bytes).await?;
            reg.tag_manifest_all(&repo, &pushed.digest, &tags).await?;
            let mut resp = created(&format!("/v2/{repo}/manifests/{}", pushed.digest), &pushed.digest);
            if let Some(subject) = pushed.subject {
                resp.headers_mut().insert("oci-subject", header_value(&subject.to_string()));
            }
            // One `OCI-Tag` field per tag: the spec asks for a field for each accepted tag (RFC 9110 lets a
            // client read repeated fields as one comma-separated list, so either form means the same).
            for tag in &tags {
                resp.headers_mut().append("oci-tag", header_value(tag.as_str()));
            }
            Ok(resp)
        }
        (Route::Manifest { name, reference }, "DELETE") => {
            reg.delete_manifest(&writable(app, name)?, &manifest_ref(reference)?).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        (Route::Blob { name, digest }, "GET" | "HEAD") => {
            let (digest, head) = (digest_param(digest)?, m == "HEAD");
            // With the upstream whose namespace served it, whose `bytes_served` it counts.
            let (source, upstream) = match app.proxy.target(name, ns)? {
                Target::Local(repo) => (BlobSource::Stored(stored_blob(reg, &repo, &digest, head).await?), None),
                Target::Cached(c) => (proxied_blob(app, &c, &digest, head).await?, Some(c.upstream)),
                Target::LocalOrCached(repo, c) => match stored_blob(reg, &repo, &digest, head).await {
                    Ok(blob) => (BlobSource::Stored(blob), None),
                    Err(RegistryError::BlobUnknown) => (proxied_blob(app, &c, &digest, head).await?, Some(c.upstream)),
                    Err(e) => return Err(e),
                },
            };
            serve_blob(app, &digest, source, headers, head, upstream.map(|u| Arc::clone(u.stats()))).await
        }
        (Route::Blob { name, digest }, "DELETE") => {
            reg.delete_blob(&writable(app, name)?, &digest_param(digest)?).await?;
            Ok(StatusCode::ACCEPTED.into_response())
        }
        (Route::UploadStart { name }, "POST") => {
            let repo = writable(app, name)?;
            if let Some(mount) = query.get("mount") {
                let digest = digest_param(mount)?;
                // An invalid `from` cannot hold the blob: fall back to an upload rather than fail the push.
                let from = query.get("from").and_then(|f| f.parse::<RepoName>().ok());
                if may_mount(app, req.identity, from.as_ref()) && reg.mount(&repo, &digest, from.as_ref()).await? {
                    return Ok(created(&format!("/v2/{repo}/blobs/{digest}"), &digest));
                }
            } else if let Some(d) = query.get("digest") {
                let digest = digest_param(d)?;
                reg.put_blob(&repo, &digest, body_stream(body)).await?;
                return Ok(created(&format!("/v2/{repo}/blobs/{digest}"), &digest));
            }
            let id = reg.start_upload(&repo).await?;
            Ok(upload_response(StatusCode::ACCEPTED, &repo, &id, 0))
        }
        (Route::Upload { name, id }, "GET") => {
            let repo = repo(name)?;
            let size = reg.upload_offset(&repo, id).await?;
            Ok(upload_response(StatusCode::NO_CONTENT, &repo, id, size))
        }
        (Route::Upload { name, id }, "PATCH") => {
            let repo = writable(app, name)?;
            let (range, declared) = (content_range(headers)?, content_length(headers));
            let size = reg.upload_chunk(&repo, id, range, declared, body_stream(body)).await?;
            Ok(upload_response(StatusCode::ACCEPTED, &repo, id, size))
        }
        (Route::Upload { name, id }, "PUT") => {
            let repo = writable(app, name)?;
            let digest = digest_param(query.get("digest").map(String::as_str).unwrap_or(""))?;
            let (range, declared) = (content_range(headers)?, content_length(headers));
            reg.finish_upload(&repo, id, &digest, range, declared, Some(body_stream(body))).await?;
            Ok(created(&format!("/v2/{repo}/blobs/{digest}"), &digest))
        }
        (Route::Upload { name, id }, "DELETE") => {
            reg.cancel_upload(&writable(app, name)?, id).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        (Route::Referrers { name, digest }, "GET") => {
            let (target, subject) = (app.proxy.target(name, ns)?, digest_param(digest)?);
            let filter = query.get("artifactType").map(String::as_str);
            let n = page_size(&query, MAX_REFERRERS_PAGE, MAX_REFERRERS_PAGE)?;
            let last = match query.get("last") {
                Some(l) => Some(l.parse::<Digest>().map_err(|_| RegistryError::PaginationInvalid(format!("last must be a digest, not {l:?}")))?),
                None => None,
            };
            let ReferrersPage { page, stale } = app.proxy.referrer_list(target, &subject, filter, last.as_ref(), n).await?;
            let (manifests, more) = referrer_descriptors(page);
            // No `Link` after an empty page (`n=0`): it would point at the same page again.
            let link = (more && !manifests.is_empty()).then(|| {
                let after = manifests.last().and_then(|d| d["digest"].as_str()).unwrap_or("");
                let mut target = format!("/v2/{name}/referrers/{subject}?n={n}&last={after}");
                if let Some(t) = filter {
                    target.push_str(&format!("&artifactType={}", query_escape(t)));
                }
                format!("<{target}{}>; rel=\"next\"", ns_suffix(ns))
            });
            let index = serde_json::json!({
                "schemaVersion": 2, "mediaType": crate::oci::OCI_INDEX, "manifests": manifests,
            });
            let mut resp = json_response(StatusCode::OK, crate::oci::OCI_INDEX, index.to_string(), m);
            if filter.is_some() {
                resp.headers_mut().insert("oci-filters-applied", HeaderValue::from_static("artifactType"));
            }
            Ok(with_stale(with_link(resp, link), stale))
        }
        _ => Err(RegistryError::Unsupported(format!("{m} is not supported on {}", route.kind()))),
    }
}

/// Pages of the catalog read at most per request while filtering it to what the caller may pull; beyond that
/// the answer is short, with a `Link` to the rest (which the spec allows).
const MAX_FILTERED_PAGES: usize = 50;

/// A page of the catalog: with access control, only the repositories the caller may pull. Also returns the
/// name the next page starts after (the last name looked at, which the caller may not be allowed to see).
async fn catalog_page(app: &App, identity: Option<&Identity>, last: Option<&str>, n: u64) -> Result<(Page, Option<String>)> {
    let (Some(auth), Some(id)) = (&app.auth, identity) else {
        let page = app.registry.catalog(last, n).await?;
        let cursor = page.items.last().cloned();
        return Ok((page, cursor));
    };
    let subject = auth.current_subject(id);
    let mut out = Page { items: Vec::new(), more: false };
    let mut cursor = last.map(str::to_string);
    for _ in 0..MAX_FILTERED_PAGES {
        let page = app.registry.catalog(cursor.as_deref(), n).await?;
        out.more = page.more;
        for name in page.items {
            if out.items.len() as u64 == n {
                out.more = true;
                return Ok((out, cursor));
            }
            cursor = Some(name.clone());
            if auth.subject_may_pull(&subject, &name) {
                out.items.push(name);
            }
        }
        if !out.more || out.items.len() as u64 == n {
            break;
        }
    }
    Ok((out, cursor))
}

/// Whether a cross-repository mount may be tried: always without access control; with it, only from a
/// repository the caller may pull (a digest alone must not give anyone bytes they could not read).
fn may_mount(app: &App, identity: Option<&Identity>, from: Option<&RepoName>) -> bool {
    match (&app.auth, identity) {
        (Some(auth), Some(id)) => from.is_some_and(|f| auth.actions(id, f.as_str()).contains(crate::auth::Action::Pull)),
        _ => true,
    }
}

fn repo(name: &str) -> Result<RepoName> {
    Ok(name.parse()?)
}

/// A repository a client may write to: valid, and not in an upstream's namespace.
fn writable(app: &App, name: &str) -> Result<RepoName> {
    let repo = repo(name)?;
    app.proxy.check_writable(name)?;
    Ok(repo)
}

/// Resolves a manifest through the cache; returns the local repository that now holds it, its digest there, and
/// whether it is served stale.
/// A cache's answer (`resolve_cached`), marked as not local.
fn cached((repo, reference, stale): (RepoName, Reference, bool)) -> (RepoName, Reference, bool, bool) {
    (repo, reference, stale, false)
}

async fn resolve_cached(app: &App, c: &Cached, reference: &Reference, accept: &Accept) -> Result<(RepoName, Reference, bool)> {
    let resolved = app.proxy.manifest(c, reference, accept.ranges()).await?;
    Ok((c.local.clone(), Reference::Digest(resolved.digest), resolved.stale))
}

/// A blob through the cache: a HEAD asks the proxy's HEAD path, which downloads nothing; a GET its download.
async fn proxied_blob(app: &App, c: &Cached, digest: &Digest, head: bool) -> Result<BlobSource> {
    let blob = if head { app.proxy.blob_head(c, digest).await? } else { app.proxy.blob(c, digest).await? };
    Ok(blob.into())
}

/// Blob `digest` of `repo` as stored: its size for a HEAD, opened for a GET.
async fn stored_blob(reg: &Registry, repo: &RepoName, digest: &Digest, head: bool) -> Result<OpenBlob> {
    if head {
        Ok(OpenBlob::sized(reg.blob_size(repo, digest).await?))
    } else {
        reg.open_blob(repo, digest).await
    }
}

/// Where a blob's bytes come from.
enum BlobSource {
    Stored(OpenBlob),
    Flight(Arc<BlobFlight>, u64),
    /// Nowhere here: only its size is known, from the upstream (answers a HEAD only).
    SizeOnly(u64),
}

impl From<ProxiedBlob> for BlobSource {
    fn from(b: ProxiedBlob) -> Self {
        match b {
            ProxiedBlob::Stored(blob) => BlobSource::Stored(blob),
            ProxiedBlob::Flight(f, size) => BlobSource::Flight(f, size),
            ProxiedBlob::Upstream(size) => BlobSource::SizeOnly(size),
        }
    }
}

fn manifest_ref(s: &str) -> Result<Reference> {
    Ok(s.parse()?)
}

fn digest_param(s: &str) -> Result<Digest> {
    Ok(s.parse()?)
}

fn header_value(s: &str) -> HeaderValue {
    // Every value passed here is built from validated names and digests, which are visible ASCII.
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "application/json")], super::error::error_body("NAME_UNKNOWN", "no such endpoint"))
        .into_response()
}

fn body_stream(body: Body) -> ByteStream {
    Box::pin(body.into_data_stream().map_err(std::io::Error::other))
}

/// `n` of a paged listing: `default` when absent, at most `max` (the spec lets a registry return fewer than `n`
/// items when it sends a `Link` to the rest), an error when not a number.
fn page_size(query: &HashMap<String, String>, default: u64, max: u64) -> Result<u64> {
    match query.get("n") {
        None => Ok(default),
        Some(n) => match n.parse::<u64>() {
            Ok(n) => Ok(n.min(max)),
            Err(_) => Err(RegistryError::PaginationInvalid(format!("n must be a non-negative integer, not {n:?}"))),
        },
    }
}

/// A `Link` to the page of `path` after `last`.
fn next_link_after(path: &str, n: u64, last: &str) -> String {
    format!("<{path}?n={n}&last={last}>; rel=\"next\"")
}

/// The descriptors of a page of referrers, cut short (and then `more`) where they would exceed
/// `MAX_REFERRERS_BYTES`; the first is always kept, so every page makes progress.
fn referrer_descriptors(page: Page<ManifestRecord>) -> (Vec<serde_json::Value>, bool) {
    let (mut out, mut bytes) = (Vec::with_capacity(page.items.len()), 0usize);
    for r in page.items {
        let mut d = serde_json::json!({ "mediaType": r.media_type, "digest": r.digest, "size": r.size });
        if let Some(t) = r.artifact_type {
            d["artifactType"] = t.into();
        }
        if let Some(a) = r.annotations.as_deref().and_then(|a| serde_json::from_str::<serde_json::Value>(a).ok()) {
            d["annotations"] = a;
        }
        let size = d.to_string().len();
        if !out.is_empty() && bytes.saturating_add(size) > MAX_REFERRERS_BYTES {
            return (out, true);
        }
        bytes = bytes.saturating_add(size);
        out.push(d);
    }
    (out, page.more)
}

/// Percent-encodes a query value (everything but RFC 3986's unreserved characters), so that a `+` or `/` in
/// an artifact type survives the round trip through a `Link`.
pub(super) fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// The `&ns=` that keeps a `Link` of a containerd-style request (`?ns=UPSTREAM`) on the same upstream.
fn ns_suffix(ns: Option<&str>) -> String {
    ns.map(|ns| format!("&ns={}", query_escape(ns))).unwrap_or_default()
}

/// Marks an answer served from the cache because the upstream could not be asked.
fn with_stale(mut resp: Response, stale: bool) -> Response {
    if stale {
        resp.headers_mut().insert(header::WARNING, HeaderValue::from_static("110 - \"Response is Stale\""));
    }
    resp
}

fn with_link(mut resp: Response, link: Option<String>) -> Response {
    if let Some(link) = link {
        resp.headers_mut().insert(header::LINK, header_value(&link));
    }
    resp
}

/// A JSON body, or for HEAD its headers alone.
fn json_response(status: StatusCode, content_type: &'static str, body: String, method: &str) -> Response {
    let len = body.len();
    let body = if method == "HEAD" { Body::empty() } else { Body::from(body) };
    let mut resp = (status, [(header::CONTENT_TYPE, content_type)], body).into_response();
    resp.headers_mut().insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    resp
}

fn created(location: &str, digest: &Digest) -> Response {
    let mut resp = StatusCode::CREATED.into_response();
    let h = resp.headers_mut();
    h.insert(header::LOCATION, header_value(location));
    h.insert(DIGEST_HEADER, header_value(&digest.to_string()));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    resp
}

fn upload_response(status: StatusCode, repo: &RepoName, id: &str, size: u64) -> Response {
    let mut resp = status.into_response();
    let h = resp.headers_mut();
    h.insert(header::LOCATION, header_value(&format!("/v2/{repo}/blobs/uploads/{id}")));
    h.insert(header::RANGE, header_value(&upload_range(size)));
    h.insert(UPLOAD_UUID_HEADER, header_value(id));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(0));
    resp
}

fn manifest_response(media_type: &str, digest: &Digest, size: u64, body: Body) -> Response {
    let mut resp = Response::new(body);
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, header_value(media_type));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    h.insert(DIGEST_HEADER, header_value(&digest.to_string()));
    h.insert(header::ETAG, header_value(&format!("\"{digest}\"")));
    resp
}

/// The request's declared body length, if it declared one.
fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
}

/// Tags a manifest push asks for besides its reference (`PUT /v2/<name>/manifests/<digest>?tag=A&tag=B`,
/// distribution spec 1.1): only for a push by digest, which is where the spec defines them (a push by tag has
/// its tag already); at most `MAX_PUSH_TAGS`, each a valid tag, or the push is refused before anything is stored.
fn push_tags(uri: &Uri, reference: &Reference) -> Result<Vec<Tag>> {
    if !matches!(reference, Reference::Digest(_)) {
        return Ok(Vec::new());
    }
    let pairs: Vec<(String, String)> = Query::try_from_uri(uri).map(|q| q.0).unwrap_or_default();
    let mut tags: Vec<Tag> = Vec::new();
    for (_, t) in pairs.iter().filter(|(k, _)| k == "tag") {
        if tags.len() == MAX_PUSH_TAGS {
            return Err(RegistryError::TooManyTags(MAX_PUSH_TAGS));
        }
        let tag: Tag = t.parse()?;
        if !tags.contains(&tag) {
            tags.push(tag);
        }
    }
    Ok(tags)
}

/// A PATCH's `Content-Range: <start>-<end>` (inclusive); `None` for a streamed chunk without one. Whether the
/// range makes sense (start before end, where the upload is) is the registry's to judge.
pub(crate) fn content_range(headers: &HeaderMap) -> Result<Option<(u64, u64)>> {
    let Some(v) = headers.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let bad = || RegistryError::BlobUploadInvalid("Content-Range must be <start>-<end>".into());
    let s = v.to_str().map_err(|_| bad())?;
    let s = s.strip_prefix("bytes=").or_else(|| s.strip_prefix("bytes ")).unwrap_or(s);
    let (start, end) = s.split_once('-').ok_or_else(bad)?;
    let start: u64 = start.trim().parse().map_err(|_| bad())?;
    let end: u64 = end.split('/').next().unwrap_or("").trim().parse().map_err(|_| bad())?;
    Ok(Some((start, end)))
}

/// `served_for`: the counters of the upstream whose cached blob this is, which count the bytes as they are sent.
async fn serve_blob(
    app: &App,
    digest: &Digest,
    source: BlobSource,
    headers: &HeaderMap,
    head: bool,
    served_for: Option<Arc<crate::upstream::stats::Stats>>,
) -> Result<Response> {
    let size = match &source {
        BlobSource::Stored(OpenBlob { size, .. }) | BlobSource::Flight(_, size) | BlobSource::SizeOnly(size) => *size,
    };
    if let (BlobSource::Stored(_), false) = (&source, head) {
        if let Some(url) = app.registry.blob_redirect(digest).await? {
            // The store serves the bytes (and the client's Range) itself; the access check was ours, just made.
            let mut resp = StatusCode::TEMPORARY_REDIRECT.into_response();
            let h = resp.headers_mut();
            h.insert(header::LOCATION, header_value(&url));
            h.insert(DIGEST_HEADER, header_value(&digest.to_string()));
            return Ok(resp);
        }
    }
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let (status, window) = match range::parse(range_header, size) {
        RangeRequest::Full => (StatusCode::OK, None),
        RangeRequest::Partial(r) => (StatusCode::PARTIAL_CONTENT, Some(r)),
        RangeRequest::Unsatisfiable => {
            let mut resp = RegistryError::RangeInvalid(format!("range not satisfiable for a blob of {size} bytes")).into_response();
            resp.headers_mut().insert(header::CONTENT_RANGE, header_value(&format!("bytes */{size}")));
            return Ok(resp);
        }
    };
    let len = window.map_or(size, |r| r.end - r.start);
    let stream = match source {
        _ if head => None,
        BlobSource::Stored(blob) => Some(app.registry.read_open(digest, blob, window).await?),
        BlobSource::Flight(flight, _) => {
            Some(flight.reader(window).await.map_err(|e| RegistryError::UpstreamUnavailable(e.to_string()))?)
        }
        // Only the HEAD path gives a size without bytes; a GET reaching here is a bug, refused rather than
        // answered with fewer bytes than its Content-Length.
        BlobSource::SizeOnly(_) => return Err(RegistryError::UpstreamUnavailable("the blob is not cached".into())),
    };
    let body = match (stream, served_for) {
        (None, _) => Body::empty(),
        (Some(stream), None) => Body::from_stream(stream),
        (Some(stream), Some(stats)) => Body::from_stream(stream.inspect_ok(move |bytes| stats.served(bytes.len() as u64))),
    };
    let mut resp = Response::new(body);
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(DIGEST_HEADER, header_value(&digest.to_string()));
    h.insert(header::ETAG, header_value(&format!("\"{digest}\"")));
    if let Some(r) = window {
        h.insert(header::CONTENT_RANGE, header_value(&format!("bytes {}-{}/{size}", r.start, r.end - 1)));
    }
    Ok(resp)
}
