//! HTTP-level tests of the OCI Distribution API (spec v1.1) against the real `breakwater` binary.
//!
//! Every test starts its own registry on a free loopback port with an empty data directory, talks to it over
//! plain HTTP with reqwest (redirects disabled, so `Location` headers can be asserted), and checks status codes,
//! headers, bodies and the spec's JSON error codes (`{"errors":[{"code":..., "message":...}]}`).

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use reqwest::header::HeaderMap;
use reqwest::{Client, Method, Response};
use serde_json::{json, Value};
use sha2::{Digest as _, Sha256, Sha512};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

// ---------------------------------------------------------------------------------------------------------------
// Media types
// ---------------------------------------------------------------------------------------------------------------

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

const ACCEPT_ALL_MANIFESTS: &str =
    "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

// ---------------------------------------------------------------------------------------------------------------
// Small pure helpers
// ---------------------------------------------------------------------------------------------------------------

fn sha256(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

fn sha512(data: &[u8]) -> String {
    format!("sha512:{}", hex(&Sha512::digest(data)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Deterministic pseudo-random bytes (different seeds give different content).
fn bytes_of(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

fn descriptor(media_type: &str, data: &[u8]) -> Value {
    json!({"mediaType": media_type, "digest": sha256(data), "size": data.len()})
}

/// Serializes with unusual whitespace so that a server which re-serializes instead of storing bytes is caught.
fn manifest_bytes(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).unwrap().replace("\n", "\n \t");
    s.push_str("\n\n");
    s.into_bytes()
}

fn header(h: &HeaderMap, name: &str) -> Option<String> {
    h.get(name).map(|v| v.to_str().expect("header is ascii").to_string())
}

fn must_header(h: &HeaderMap, name: &str) -> String {
    header(h, name).unwrap_or_else(|| panic!("missing header {name}; headers: {h:?}"))
}

/// Appends a query parameter to a URL that may already carry a query string.
fn with_query(url: &str, kv: &str) -> String {
    if url.contains('?') {
        format!("{url}&{kv}")
    } else {
        format!("{url}?{kv}")
    }
}

/// Percent-encodes what must not appear raw in a query value (notably `+`, which form decoding turns into a space).
fn q(v: &str) -> String {
    v.replace('%', "%25").replace('+', "%2B").replace('&', "%26").replace(' ', "%20").replace('#', "%23")
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let Ok(v) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).expect("utf-8")
}

/// The target of a `Link: <url>; rel="next"` header.
fn next_link(h: &HeaderMap) -> Option<String> {
    let link = header(h, "link")?;
    assert!(link.contains("rel=\"next\""), "Link header without rel=\"next\": {link}");
    let start = link.find('<').expect("Link has <") + 1;
    let end = link.find('>').expect("Link has >");
    Some(link[start..end].to_string())
}

/// Reads the JSON error body and asserts the status and that one of the errors carries `code`.
async fn expect_error(resp: Response, status: u16, code: &str) {
    let got_status = resp.status().as_u16();
    let url = resp.url().clone();
    let body = resp.bytes().await.expect("read body");
    let text = String::from_utf8_lossy(&body);
    assert_eq!(got_status, status, "{url}: expected {status} {code}, got {got_status}: {text}");
    let codes =
        error_codes(&body).unwrap_or_else(|| panic!("{url}: expected a JSON error body with {code}, got {text:?}"));
    assert!(codes.iter().any(|c| c == code), "{url}: expected error code {code}, got {codes:?} in {text}");
}

/// The `code`s of an OCI error body, or None if it is not one. Also checks that each error has a string message.
fn error_codes(body: &[u8]) -> Option<Vec<String>> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let errors = v.get("errors")?.as_array()?;
    let mut codes = Vec::new();
    for e in errors {
        let code = e.get("code")?.as_str()?.to_string();
        assert!(
            code.chars().all(|c| c.is_ascii_uppercase() || c == '_'),
            "error code must be uppercase letters and underscores: {code}"
        );
        if let Some(m) = e.get("message") {
            assert!(m.is_string(), "error message must be a string: {v}");
        }
        codes.push(code);
    }
    Some(codes)
}

// ---------------------------------------------------------------------------------------------------------------
// A registry under test plus a client
// ---------------------------------------------------------------------------------------------------------------

struct Reg {
    bw: common::Breakwater,
    c: Client,
}

struct Image {
    manifest: Vec<u8>,
    digest: String,
    config: Vec<u8>,
    layer: Vec<u8>,
}

impl Reg {
    fn start() -> Self {
        Self::start_with(&[])
    }

    fn start_with(args: &[&str]) -> Self {
        let bw = common::Breakwater::start_with(args);
        let c = Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(60))
            .build()
            .expect("client");
        Reg { bw, c }
    }

    fn url(&self, path: &str) -> String {
        self.bw.url(path)
    }

    /// Resolves a `Location` header (absolute, or relative to the server root) into a URL.
    fn abs(&self, location: &str) -> String {
        if location.starts_with("http://") || location.starts_with("https://") {
            location.to_string()
        } else if location.starts_with('/') {
            self.url(location)
        } else {
            panic!("Location is neither absolute nor absolute-path: {location:?}")
        }
    }

    async fn send(&self, method: Method, url: &str, headers: &[(&str, &str)], body: Option<Vec<u8>>) -> Response {
        let mut rb = self.c.request(method.clone(), url);
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        rb.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"))
    }

    async fn get(&self, path: &str) -> Response {
        self.send(Method::GET, &self.url(path), &[], None).await
    }

    async fn get_with(&self, path: &str, headers: &[(&str, &str)]) -> Response {
        self.send(Method::GET, &self.url(path), headers, None).await
    }

    async fn head(&self, path: &str) -> Response {
        self.send(Method::HEAD, &self.url(path), &[], None).await
    }

    async fn delete(&self, path: &str) -> Response {
        self.send(Method::DELETE, &self.url(path), &[], None).await
    }

    /// Starts an upload session: POST → 202 with Location; returns the absolute upload URL.
    async fn start_upload(&self, repo: &str) -> String {
        let resp = self
            .send(Method::POST, &self.url(&format!("/v2/{repo}/blobs/uploads/")), &[("content-length", "0")], None)
            .await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, 202, "POST /v2/{repo}/blobs/uploads/: {body}");
        self.abs(&must_header(&headers, "location"))
    }

    /// Pushes a blob with POST then PUT under the given digest (which must be right); returns the digest.
    async fn push_blob_as(&self, repo: &str, data: &[u8], digest: &str) -> String {
        let loc = self.start_upload(repo).await;
        let resp = self
            .send(
                Method::PUT,
                &with_query(&loc, &format!("digest={digest}")),
                &[("content-type", "application/octet-stream")],
                Some(data.to_vec()),
            )
            .await;
        let status = resp.status().as_u16();
        let body = resp.text().await.unwrap_or_default();
        assert_eq!(status, 201, "PUT blob {digest} to {repo}: {body}");
        digest.to_string()
    }

    async fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        self.push_blob_as(repo, data, &sha256(data)).await
    }

    async fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> Response {
        self.send(
            Method::PUT,
            &self.url(&format!("/v2/{repo}/manifests/{reference}")),
            &[("content-type", media_type)],
            Some(body.to_vec()),
        )
        .await
    }

    /// Pushes a manifest, asserts 201 with Location and the right Docker-Content-Digest; returns its sha256 digest.
    async fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> String {
        let resp = self.put_manifest(repo, reference, media_type, body).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(status, 201, "PUT manifest {repo}:{reference}: {text}");
        let digest = if reference.starts_with("sha512:") { sha512(body) } else { sha256(body) };
        assert_eq!(must_header(&headers, "docker-content-digest"), digest, "PUT {repo}:{reference}");
        must_header(&headers, "location");
        digest
    }

    /// Pushes a small OCI image (config + one layer + manifest) to `repo` under `reference`.
    async fn push_image(&self, repo: &str, reference: &str, seed: u64) -> Image {
        let config = serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}, "seed": seed
        }))
        .unwrap();
        let layer = bytes_of(seed, 1500);
        self.push_blob(repo, &config).await;
        self.push_blob(repo, &layer).await;
        let manifest = manifest_bytes(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &config),
            "layers": [descriptor(OCI_LAYER, &layer)],
        }));
        let digest = self.push_manifest(repo, reference, OCI_MANIFEST, &manifest).await;
        Image { manifest, digest, config, layer }
    }

    async fn get_manifest(&self, repo: &str, reference: &str) -> Response {
        self.get_with(&format!("/v2/{repo}/manifests/{reference}"), &[("accept", ACCEPT_ALL_MANIFESTS)]).await
    }

    /// GET a manifest and assert it comes back byte for byte with its content type and digest.
    async fn assert_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) {
        let resp = self.get_manifest(repo, reference).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let got = resp.bytes().await.unwrap();
        assert_eq!(status, 200, "GET manifest {repo}:{reference}: {}", String::from_utf8_lossy(&got));
        assert_eq!(must_header(&headers, "content-type"), media_type, "content type of {repo}:{reference}");
        let digest = if reference.starts_with("sha512:") { sha512(body) } else { sha256(body) };
        assert_eq!(must_header(&headers, "docker-content-digest"), digest, "digest of {repo}:{reference}");
        assert!(got.as_ref() == body, "manifest {repo}:{reference} not returned byte for byte");

        let resp = self
            .send(
                Method::HEAD,
                &self.url(&format!("/v2/{repo}/manifests/{reference}")),
                &[("accept", ACCEPT_ALL_MANIFESTS)],
                None,
            )
            .await;
        assert_eq!(resp.status().as_u16(), 200, "HEAD manifest {repo}:{reference}");
        let h = resp.headers();
        assert_eq!(must_header(h, "content-type"), media_type, "HEAD content type of {repo}:{reference}");
        assert_eq!(must_header(h, "docker-content-digest"), digest, "HEAD digest of {repo}:{reference}");
        assert_eq!(must_header(h, "content-length"), body.len().to_string(), "HEAD length of {repo}:{reference}");
    }

    async fn blob_status(&self, repo: &str, digest: &str) -> u16 {
        self.head(&format!("/v2/{repo}/blobs/{digest}")).await.status().as_u16()
    }

    async fn blob_bytes(&self, repo: &str, digest: &str) -> Vec<u8> {
        let resp = self.get(&format!("/v2/{repo}/blobs/{digest}")).await;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.unwrap().to_vec();
        assert_eq!(status, 200, "GET blob {repo}@{digest}: {}", String::from_utf8_lossy(&body));
        body
    }

    /// Upload status (GET on the upload URL); returns (status, Range header).
    async fn upload_status(&self, loc: &str) -> (u16, Option<String>) {
        let resp = self.send(Method::GET, loc, &[], None).await;
        (resp.status().as_u16(), header(resp.headers(), "range"))
    }

    async fn patch_chunk(&self, loc: &str, range: Option<&str>, data: &[u8]) -> Response {
        let mut headers = vec![("content-type", "application/octet-stream")];
        if let Some(r) = range {
            headers.push(("content-range", r));
        }
        self.send(Method::PATCH, loc, &headers, Some(data.to_vec())).await
    }

    /// GET a JSON list endpoint; returns (the list under `key`, the next Link target if any).
    async fn list_page(&self, path: &str, key: &str) -> (Vec<String>, Option<String>) {
        let resp = self.get(path).await;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp.bytes().await.unwrap();
        assert_eq!(status, 200, "GET {path}: {}", String::from_utf8_lossy(&body));
        let v: Value = serde_json::from_slice(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e})"));
        let items = match v.get(key) {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => a.iter().map(|t| t.as_str().expect("string item").to_string()).collect(),
            Some(other) => panic!("GET {path}: {key} is not a list: {other}"),
        };
        (items, next_link(&headers))
    }

    /// Turns a Link target into a path on this server.
    fn link_path(&self, link: &str) -> String {
        if let Some(rest) = link.strip_prefix("http://").or_else(|| link.strip_prefix("https://")) {
            let slash = rest.find('/').expect("path in Link");
            rest[slash..].to_string()
        } else {
            assert!(link.starts_with('/'), "Link target must be absolute or absolute-path: {link}");
            link.to_string()
        }
    }

    /// Follows Link headers from `first` until none is left; returns every item in order.
    async fn follow_pages(&self, first: &str, key: &str) -> Vec<String> {
        let mut all = Vec::new();
        let mut path = first.to_string();
        for _ in 0..1000 {
            let (items, next) = self.list_page(&path, key).await;
            all.extend(items);
            match next {
                Some(link) => path = self.link_path(&link),
                None => return all,
            }
        }
        panic!("pagination from {first} never ended");
    }
}

/// A raw HTTP/1.1 exchange on a fresh TCP connection (`Connection: close`); returns (status, headers, body).
async fn raw_http(addr: &str, request: &str) -> (u16, String, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(request.as_bytes()).await.expect("write");
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut buf))
        .await
        .expect("response within 20s")
        .expect("read");
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").expect("end of headers");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let mut body = buf[split + 4..].to_vec();
    let status: u16 = head.split_whitespace().nth(1).expect("status").parse().expect("numeric status");
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    (status, head, body)
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else { return out };
        let size_str = String::from_utf8_lossy(&data[..eol]);
        let size = usize::from_str_radix(size_str.split(';').next().unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        data = &data[eol + 2..];
        out.extend_from_slice(&data[..size.min(data.len())]);
        if data.len() < size + 2 {
            return out;
        }
        data = &data[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Version check
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn version_check() {
    let r = Reg::start();
    let resp = r.get("/v2/").await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(must_header(resp.headers(), "docker-distribution-api-version"), "registry/2.0");
}

// ---------------------------------------------------------------------------------------------------------------
// Uploads
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn monolithic_single_post() {
    let r = Reg::start();
    let data = bytes_of(1, 4096);
    let digest = sha256(&data);
    let resp = r
        .send(
            Method::POST,
            &r.url(&format!("/v2/mono/single/blobs/uploads/?digest={digest}")),
            &[("content-type", "application/octet-stream")],
            Some(data.clone()),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 201, "single POST upload");
    let h = resp.headers().clone();
    assert_eq!(must_header(&h, "docker-content-digest"), digest);
    let loc = r.abs(&must_header(&h, "location"));
    let resp = r.send(Method::GET, &loc, &[], None).await;
    assert_eq!(resp.status().as_u16(), 200, "GET the blob Location {loc}");
    assert!(resp.bytes().await.unwrap().as_ref() == data.as_slice());
    assert_eq!(r.blob_bytes("mono/single", &digest).await, data);
}

#[tokio::test]
async fn post_then_put() {
    let r = Reg::start();
    let data = bytes_of(2, 10_000);
    let digest = sha256(&data);
    let resp = r.send(Method::POST, &r.url("/v2/mono/put/blobs/uploads/"), &[("content-length", "0")], None).await;
    assert_eq!(resp.status().as_u16(), 202);
    let loc = r.abs(&must_header(resp.headers(), "location"));

    let resp = r
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={digest}")),
            &[("content-type", "application/octet-stream")],
            Some(data.clone()),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 201);
    let h = resp.headers().clone();
    assert_eq!(must_header(&h, "docker-content-digest"), digest);
    let blob_loc = r.abs(&must_header(&h, "location"));
    let resp = r.send(Method::GET, &blob_loc, &[], None).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.bytes().await.unwrap().as_ref() == data.as_slice());

    // The session is closed: its URL no longer answers.
    expect_error(r.send(Method::GET, &loc, &[], None).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
}

#[tokio::test]
async fn chunked_upload_with_content_range() {
    let r = Reg::start();
    let data = bytes_of(3, 100);
    let digest = sha256(&data);
    let mut loc = r.start_upload("chunky").await;

    // Chunk 1: bytes 0-29.
    let resp = r.patch_chunk(&loc, Some("0-29"), &data[0..30]).await;
    assert_eq!(resp.status().as_u16(), 202, "first chunk");
    assert_eq!(must_header(resp.headers(), "range"), "0-29");
    loc = r.abs(&must_header(resp.headers(), "location"));

    // Chunk 2: bytes 30-59.
    let resp = r.patch_chunk(&loc, Some("30-59"), &data[30..60]).await;
    assert_eq!(resp.status().as_u16(), 202, "second chunk");
    assert_eq!(must_header(resp.headers(), "range"), "0-59");
    loc = r.abs(&must_header(resp.headers(), "location"));

    // Out of order: a gap (starts at 70 instead of 60) → 416.
    let resp = r.patch_chunk(&loc, Some("70-79"), &data[70..80]).await;
    assert_eq!(resp.status().as_u16(), 416, "chunk with a gap must be refused");
    // Out of order: an overlap (starts at 50) → 416.
    let resp = r.patch_chunk(&loc, Some("50-69"), &data[50..70]).await;
    assert_eq!(resp.status().as_u16(), 416, "overlapping chunk must be refused");

    // Status is unchanged by the refused chunks.
    let resp = r.send(Method::GET, &loc, &[], None).await;
    assert_eq!(resp.status().as_u16(), 204, "upload status");
    assert_eq!(must_header(resp.headers(), "range"), "0-59");
    loc = r.abs(&must_header(resp.headers(), "location"));

    // Chunk 3: bytes 60-89 via PATCH.
    let resp = r.patch_chunk(&loc, Some("60-89"), &data[60..90]).await;
    assert_eq!(resp.status().as_u16(), 202, "third chunk");
    assert_eq!(must_header(resp.headers(), "range"), "0-89");
    loc = r.abs(&must_header(resp.headers(), "location"));

    // Final chunk in the closing PUT.
    let resp = r
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={digest}")),
            &[("content-type", "application/octet-stream"), ("content-range", "90-99")],
            Some(data[90..].to_vec()),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 201, "closing PUT with the last chunk");
    assert_eq!(must_header(resp.headers(), "docker-content-digest"), digest);
    must_header(resp.headers(), "location");
    assert_eq!(r.blob_bytes("chunky", &digest).await, data);
}

#[tokio::test]
async fn chunked_upload_closed_by_empty_put() {
    let r = Reg::start();
    let data = bytes_of(4, 64 * 1024 + 17);
    let digest = sha256(&data);
    let mut loc = r.start_upload("chunky/empty-put").await;
    let mut offset = 0;
    for chunk in data.chunks(20_000) {
        let range = format!("{}-{}", offset, offset + chunk.len() - 1);
        let resp = r.patch_chunk(&loc, Some(&range), chunk).await;
        assert_eq!(resp.status().as_u16(), 202, "chunk {range}");
        assert_eq!(must_header(resp.headers(), "range"), format!("0-{}", offset + chunk.len() - 1));
        loc = r.abs(&must_header(resp.headers(), "location"));
        offset += chunk.len();
    }
    let resp = r.send(Method::PUT, &with_query(&loc, &format!("digest={digest}")), &[], None).await;
    assert_eq!(resp.status().as_u16(), 201, "closing PUT with no body");
    assert_eq!(must_header(resp.headers(), "docker-content-digest"), digest);
    assert_eq!(r.blob_bytes("chunky/empty-put", &digest).await, data);
}

#[tokio::test]
async fn streamed_patch_without_content_range() {
    let r = Reg::start();
    let data = bytes_of(5, 5000);
    let digest = sha256(&data);
    let mut loc = r.start_upload("streamed").await;
    let resp = r.patch_chunk(&loc, None, &data[..3000]).await;
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(must_header(resp.headers(), "range"), "0-2999");
    loc = r.abs(&must_header(resp.headers(), "location"));
    let resp = r.patch_chunk(&loc, None, &data[3000..]).await;
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(must_header(resp.headers(), "range"), "0-4999");
    loc = r.abs(&must_header(resp.headers(), "location"));
    let (status, range) = r.upload_status(&loc).await;
    assert_eq!(status, 204);
    assert_eq!(range.as_deref(), Some("0-4999"));
    let resp = r.send(Method::PUT, &with_query(&loc, &format!("digest={digest}")), &[], None).await;
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(r.blob_bytes("streamed", &digest).await, data);
}

#[tokio::test]
async fn cancel_upload() {
    let r = Reg::start();
    let data = bytes_of(6, 1000);
    let loc = r.start_upload("cancel/me").await;
    let resp = r.patch_chunk(&loc, Some("0-499"), &data[..500]).await;
    assert_eq!(resp.status().as_u16(), 202);
    let loc = r.abs(&must_header(resp.headers(), "location"));

    let resp = r.send(Method::DELETE, &loc, &[], None).await;
    assert_eq!(resp.status().as_u16(), 204, "cancel upload");

    expect_error(r.send(Method::GET, &loc, &[], None).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    expect_error(r.patch_chunk(&loc, Some("500-999"), &data[500..]).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    let put = with_query(&loc, &format!("digest={}", sha256(&data)));
    expect_error(r.send(Method::PUT, &put, &[], Some(data[500..].to_vec())).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    assert_eq!(r.blob_status("cancel/me", &sha256(&data)).await, 404);
}

#[tokio::test]
async fn unknown_upload_session() {
    let r = Reg::start();
    r.push_image("known", "v1", 7).await; // the repository exists
    let path = "/v2/known/blobs/uploads/00000000-0000-4000-8000-000000000000";
    expect_error(r.get(path).await, 404, "BLOB_UPLOAD_UNKNOWN").await;
    expect_error(
        r.send(Method::PATCH, &r.url(path), &[("content-type", "application/octet-stream")], Some(b"abc".to_vec()))
            .await,
        404,
        "BLOB_UPLOAD_UNKNOWN",
    )
    .await;
}

#[tokio::test]
async fn put_with_wrong_digest_is_refused() {
    let r = Reg::start();
    let data = bytes_of(8, 2048);
    let claimed = sha256(b"something else entirely");

    // POST then PUT.
    let loc = r.start_upload("wrong").await;
    let resp = r
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={claimed}")),
            &[("content-type", "application/octet-stream")],
            Some(data.clone()),
        )
        .await;
    expect_error(resp, 400, "DIGEST_INVALID").await;
    assert_eq!(r.blob_status("wrong", &claimed).await, 404, "blob under the claimed digest must not exist");
    assert_eq!(r.blob_status("wrong", &sha256(&data)).await, 404, "blob under its real digest must not exist");

    // Chunked, closed with the wrong digest.
    let loc = r.start_upload("wrong").await;
    let resp = r.patch_chunk(&loc, Some("0-2047"), &data).await;
    assert_eq!(resp.status().as_u16(), 202);
    let loc = r.abs(&must_header(resp.headers(), "location"));
    let resp = r.send(Method::PUT, &with_query(&loc, &format!("digest={claimed}")), &[], None).await;
    expect_error(resp, 400, "DIGEST_INVALID").await;
    assert_eq!(r.blob_status("wrong", &claimed).await, 404);
    assert_eq!(r.blob_status("wrong", &sha256(&data)).await, 404);

    // Single POST with the wrong digest.
    let resp = r
        .send(
            Method::POST,
            &r.url(&format!("/v2/wrong/blobs/uploads/?digest={claimed}")),
            &[("content-type", "application/octet-stream")],
            Some(data.clone()),
        )
        .await;
    expect_error(resp, 400, "DIGEST_INVALID").await;
    assert_eq!(r.blob_status("wrong", &claimed).await, 404);
    assert_eq!(r.blob_status("wrong", &sha256(&data)).await, 404);

    // A sha512 digest that does not match.
    let resp = r
        .send(
            Method::POST,
            &r.url(&format!("/v2/wrong/blobs/uploads/?digest={}", sha512(b"nope"))),
            &[("content-type", "application/octet-stream")],
            Some(data.clone()),
        )
        .await;
    expect_error(resp, 400, "DIGEST_INVALID").await;
}

#[tokio::test]
async fn invalid_digest_strings_are_refused() {
    let r = Reg::start();
    let data = bytes_of(9, 100);
    let bad = [
        "notadigest",
        "sha256:1234",                                                             // too short
        "sha256:ZZZZ6c3c624b58dbbcd3c0dd82b4c53f04194d1247c6eebdaab7c610cf7d6670", // not hex
        "sha256:6C3C624B58DBBCD3C0DD82B4C53F04194D1247C6EEBDAAB7C610CF7D66709B3B", // uppercase hex
        "sha512:abcdef",                                                           // too short
    ];
    for d in bad {
        let loc = r.start_upload("baddigest").await;
        let resp = r
            .send(
                Method::PUT,
                &with_query(&loc, &format!("digest={}", q(d))),
                &[("content-type", "application/octet-stream")],
                Some(data.clone()),
            )
            .await;
        expect_error(resp, 400, "DIGEST_INVALID").await;

        let resp = r
            .send(
                Method::POST,
                &r.url(&format!("/v2/baddigest/blobs/uploads/?digest={}", q(d))),
                &[("content-type", "application/octet-stream")],
                Some(data.clone()),
            )
            .await;
        expect_error(resp, 400, "DIGEST_INVALID").await;
    }
    // A PUT that completes an upload without any digest is not a complete upload.
    let loc = r.start_upload("baddigest").await;
    let resp = r.send(Method::PUT, &loc, &[("content-type", "application/octet-stream")], Some(data.clone())).await;
    let status = resp.status().as_u16();
    assert!((400..500).contains(&status), "PUT without ?digest= must be a 4xx, got {status}");
    assert_eq!(r.blob_status("baddigest", &sha256(&data)).await, 404);

    // An invalid digest on the blob endpoints.
    let resp = r.get("/v2/baddigest/blobs/sha256:1234").await;
    let status = resp.status().as_u16();
    if status == 400 {
        expect_error(resp, 400, "DIGEST_INVALID").await;
    } else {
        assert_eq!(status, 404, "GET a blob with a malformed digest: 400 DIGEST_INVALID or 404");
    }
}

#[tokio::test]
async fn sha512_blobs_and_manifests() {
    let r = Reg::start();
    let config = br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#.to_vec();
    let layer = bytes_of(10, 3000);
    let config_d = sha512(&config);
    let layer_d = sha512(&layer);

    // Single POST by sha512.
    let resp = r
        .send(
            Method::POST,
            &r.url(&format!("/v2/five12/blobs/uploads/?digest={layer_d}")),
            &[("content-type", "application/octet-stream")],
            Some(layer.clone()),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 201, "single POST by sha512");
    let dcd = must_header(resp.headers(), "docker-content-digest");
    assert!(dcd == layer_d || dcd == sha256(&layer), "Docker-Content-Digest {dcd} names neither digest of the blob");
    // POST then PUT by sha512.
    r.push_blob_as("five12", &config, &config_d).await;

    for (d, bytes) in [(&layer_d, &layer), (&config_d, &config)] {
        let resp = r.head(&format!("/v2/five12/blobs/{d}")).await;
        assert_eq!(resp.status().as_u16(), 200, "HEAD sha512 blob");
        assert_eq!(must_header(resp.headers(), "content-length"), bytes.len().to_string());
        assert_eq!(must_header(resp.headers(), "docker-content-digest"), *d);
        assert_eq!(&r.blob_bytes("five12", d).await, bytes);
    }

    // A manifest referencing sha512 blobs, pushed by its sha512 digest.
    let manifest = manifest_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": config_d, "size": config.len()},
        "layers": [{"mediaType": OCI_LAYER, "digest": layer_d, "size": layer.len()}],
    }));
    let md = sha512(&manifest);
    let resp = r.put_manifest("five12", &md, OCI_MANIFEST, &manifest).await;
    assert_eq!(resp.status().as_u16(), 201, "PUT manifest by sha512 digest");
    assert_eq!(must_header(resp.headers(), "docker-content-digest"), md);
    r.assert_manifest("five12", &md, OCI_MANIFEST, &manifest).await;

    // The wrong sha512 for the body.
    let wrong = sha512(b"other");
    expect_error(r.put_manifest("five12", &wrong, OCI_MANIFEST, &manifest).await, 400, "DIGEST_INVALID").await;
}

// ---------------------------------------------------------------------------------------------------------------
// Blob reads and deletes
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn blob_get_head_and_ranges() {
    let r = Reg::start();
    let data = bytes_of(11, 1000);
    let digest = r.push_blob("ranges", &data).await;

    let resp = r.head(&format!("/v2/ranges/blobs/{digest}")).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(must_header(resp.headers(), "content-length"), "1000");
    assert_eq!(must_header(resp.headers(), "docker-content-digest"), digest);

    let resp = r.get(&format!("/v2/ranges/blobs/{digest}")).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(must_header(resp.headers(), "content-length"), "1000");
    assert_eq!(must_header(resp.headers(), "docker-content-digest"), digest);
    assert!(resp.bytes().await.unwrap().as_ref() == data.as_slice());

    let cases: [(&str, usize, usize); 6] = [
        ("bytes=0-99", 0, 99),
        ("bytes=100-199", 100, 199),
        ("bytes=500-", 500, 999),
        ("bytes=-10", 990, 999),
        ("bytes=999-999", 999, 999),
        ("bytes=990-5000", 990, 999), // last-pos beyond the end is clipped (RFC 9110 §14.1.2)
    ];
    for (range, a, b) in cases {
        let resp = r.get_with(&format!("/v2/ranges/blobs/{digest}"), &[("range", range)]).await;
        assert_eq!(resp.status().as_u16(), 206, "Range: {range}");
        assert_eq!(must_header(resp.headers(), "content-range"), format!("bytes {a}-{b}/1000"), "Range: {range}");
        assert_eq!(must_header(resp.headers(), "content-length"), (b - a + 1).to_string(), "Range: {range}");
        let body = resp.bytes().await.unwrap();
        assert!(body.as_ref() == &data[a..=b], "Range: {range}: wrong bytes");
    }

    for range in ["bytes=1000-", "bytes=5000-6000", "bytes=1000-1000"] {
        let resp = r.get_with(&format!("/v2/ranges/blobs/{digest}"), &[("range", range)]).await;
        if let Some(cr) = header(resp.headers(), "content-range") {
            assert_eq!(cr, "bytes */1000", "Content-Range of a 416 for {range}");
        }
        expect_error(resp, 416, "RANGE_INVALID").await;
    }
}

#[tokio::test]
async fn unknown_blob() {
    let r = Reg::start();
    r.push_image("has/stuff", "v1", 12).await;
    let missing = sha256(b"never pushed");
    expect_error(r.get(&format!("/v2/has/stuff/blobs/{missing}")).await, 404, "BLOB_UNKNOWN").await;
    assert_eq!(r.blob_status("has/stuff", &missing).await, 404);
    let status = r.get(&format!("/v2/nothing/here/blobs/{missing}")).await.status().as_u16();
    assert_eq!(status, 404, "blob in an unknown repository");
}

#[tokio::test]
async fn delete_blob() {
    let r = Reg::start();
    let data = bytes_of(13, 777);
    let digest = r.push_blob("del/blob", &data).await;
    assert_eq!(r.blob_status("del/blob", &digest).await, 200);

    let resp = r.delete(&format!("/v2/del/blob/blobs/{digest}")).await;
    assert_eq!(resp.status().as_u16(), 202, "DELETE blob");
    assert_eq!(r.blob_status("del/blob", &digest).await, 404);
    expect_error(r.get(&format!("/v2/del/blob/blobs/{digest}")).await, 404, "BLOB_UNKNOWN").await;
    expect_error(r.delete(&format!("/v2/del/blob/blobs/{digest}")).await, 404, "BLOB_UNKNOWN").await;

    // It can be pushed again afterwards.
    r.push_blob("del/blob", &data).await;
    assert_eq!(r.blob_bytes("del/blob", &digest).await, data);
}

#[tokio::test]
async fn same_content_in_two_repositories() {
    let r = Reg::start();
    let data = bytes_of(14, 3333);
    let digest = r.push_blob("dedup/one", &data).await;
    r.push_blob("dedup/two", &data).await;
    assert_eq!(r.delete(&format!("/v2/dedup/one/blobs/{digest}")).await.status().as_u16(), 202);
    assert_eq!(r.blob_status("dedup/one", &digest).await, 404);
    // Deleting it from one repository does not take it from the other.
    assert_eq!(r.blob_bytes("dedup/two", &digest).await, data);
}

// ---------------------------------------------------------------------------------------------------------------
// Cross-repository mount
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn cross_repository_mount() {
    let r = Reg::start();
    let data = bytes_of(15, 2500);
    let digest = r.push_blob("mount/a", &data).await;

    let resp = r
        .send(
            Method::POST,
            &r.url(&format!("/v2/mount/b/blobs/uploads/?mount={digest}&from=mount/a")),
            &[("content-length", "0")],
            None,
        )
        .await;
    assert_eq!(resp.status().as_u16(), 201, "mount of a blob that the source repository has");
    let loc = r.abs(&must_header(resp.headers(), "location"));
    if let Some(d) = header(resp.headers(), "docker-content-digest") {
        assert_eq!(d, digest);
    }
    let resp = r.send(Method::GET, &loc, &[], None).await;
    assert_eq!(resp.status().as_u16(), 200, "GET the mounted blob's Location");
    assert!(resp.bytes().await.unwrap().as_ref() == data.as_slice());
    assert_eq!(r.blob_bytes("mount/b", &digest).await, data);

    // Content is stored once: deleting it from the source leaves the mount intact.
    assert_eq!(r.delete(&format!("/v2/mount/a/blobs/{digest}")).await.status().as_u16(), 202);
    assert_eq!(r.blob_status("mount/a", &digest).await, 404);
    assert_eq!(r.blob_bytes("mount/b", &digest).await, data);

    // A digest nobody has: fall back to an ordinary upload session (202 + Location), usable as such.
    let other = bytes_of(16, 1200);
    let other_d = sha256(&other);
    let resp = r
        .send(
            Method::POST,
            &r.url(&format!("/v2/mount/c/blobs/uploads/?mount={other_d}&from=mount/a")),
            &[("content-length", "0")],
            None,
        )
        .await;
    assert_eq!(resp.status().as_u16(), 202, "mount of an unknown blob falls back to an upload session");
    let loc = r.abs(&must_header(resp.headers(), "location"));
    let resp = r
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={other_d}")),
            &[("content-type", "application/octet-stream")],
            Some(other.clone()),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 201, "the fallback session completes an upload");
    assert_eq!(r.blob_bytes("mount/c", &other_d).await, other);

    // Mount from a repository that does not exist: also a fallback.
    let resp = r
        .send(
            Method::POST,
            &r.url(&format!("/v2/mount/d/blobs/uploads/?mount={}&from=no/such/repo", sha256(b"zzz"))),
            &[("content-length", "0")],
            None,
        )
        .await;
    assert_eq!(resp.status().as_u16(), 202);
    must_header(resp.headers(), "location");
}

// ---------------------------------------------------------------------------------------------------------------
// Manifests
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn oci_manifest_by_tag_and_digest() {
    let r = Reg::start();
    let img = r.push_image("app/web", "v1", 20).await;
    assert_eq!(img.digest, sha256(&img.manifest));

    // The PUT's Location is pullable.
    let resp = r.put_manifest("app/web", "v1", OCI_MANIFEST, &img.manifest).await; // idempotent re-push
    assert_eq!(resp.status().as_u16(), 201);
    let loc = r.abs(&must_header(resp.headers(), "location"));
    let resp = r.send(Method::GET, &loc, &[("accept", ACCEPT_ALL_MANIFESTS)], None).await;
    assert_eq!(resp.status().as_u16(), 200, "GET manifest Location {loc}");
    assert!(resp.bytes().await.unwrap().as_ref() == img.manifest.as_slice());

    r.assert_manifest("app/web", "v1", OCI_MANIFEST, &img.manifest).await;
    r.assert_manifest("app/web", &img.digest, OCI_MANIFEST, &img.manifest).await;

    // Config and layer are pullable.
    assert_eq!(r.blob_bytes("app/web", &sha256(&img.config)).await, img.config);
    assert_eq!(r.blob_bytes("app/web", &sha256(&img.layer)).await, img.layer);

    // Push by digest (no tag).
    let img2 = {
        let m = manifest_bytes(&json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, &img.config),
            "layers": [],
            "annotations": {"by": "digest"},
        }));
        let d = sha256(&m);
        r.push_manifest("app/web", &d, OCI_MANIFEST, &m).await;
        (m, d)
    };
    r.assert_manifest("app/web", &img2.1, OCI_MANIFEST, &img2.0).await;

    // Moving a tag.
    r.push_manifest("app/web", "v1", OCI_MANIFEST, &img2.0).await;
    r.assert_manifest("app/web", "v1", OCI_MANIFEST, &img2.0).await;
    r.assert_manifest("app/web", &img.digest, OCI_MANIFEST, &img.manifest).await;

    // Manifests are per repository.
    let status = r.get_manifest("app/other", &img.digest).await.status().as_u16();
    assert_eq!(status, 404, "a manifest is not visible from another repository");
}

#[tokio::test]
async fn oci_index() {
    let r = Reg::start();
    let amd = r.push_image("multi", "amd64", 21).await;
    let arm = r.push_image("multi", "arm64", 22).await;
    let index = manifest_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": amd.digest, "size": amd.manifest.len(),
             "platform": {"architecture": "amd64", "os": "linux"}},
            {"mediaType": OCI_MANIFEST, "digest": arm.digest, "size": arm.manifest.len(),
             "platform": {"architecture": "arm64", "os": "linux"}},
        ],
        "annotations": {"org.opencontainers.image.ref.name": "latest"},
    }));
    let d = r.push_manifest("multi", "latest", OCI_INDEX, &index).await;
    r.assert_manifest("multi", "latest", OCI_INDEX, &index).await;
    r.assert_manifest("multi", &d, OCI_INDEX, &index).await;
}

#[tokio::test]
async fn docker_schema2_and_manifest_list() {
    let r = Reg::start();
    let config = br#"{"architecture":"amd64","os":"linux","config":{},"rootfs":{"type":"layers","diff_ids":[]}}"#;
    let layer = bytes_of(23, 2222);
    r.push_blob("dock/er", config).await;
    r.push_blob("dock/er", &layer).await;
    let manifest = manifest_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_MANIFEST,
        "config": descriptor(DOCKER_CONFIG, config),
        "layers": [descriptor(DOCKER_LAYER, &layer)],
    }));
    let md = r.push_manifest("dock/er", "schema2", DOCKER_MANIFEST, &manifest).await;
    r.assert_manifest("dock/er", "schema2", DOCKER_MANIFEST, &manifest).await;
    r.assert_manifest("dock/er", &md, DOCKER_MANIFEST, &manifest).await;

    let list = manifest_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": DOCKER_LIST,
        "manifests": [
            {"mediaType": DOCKER_MANIFEST, "digest": md, "size": manifest.len(),
             "platform": {"architecture": "amd64", "os": "linux"}},
        ],
    }));
    let ld = r.push_manifest("dock/er", "list", DOCKER_LIST, &list).await;
    r.assert_manifest("dock/er", "list", DOCKER_LIST, &list).await;
    r.assert_manifest("dock/er", &ld, DOCKER_LIST, &list).await;
}

#[tokio::test]
async fn manifest_referencing_unknown_blob() {
    let r = Reg::start();
    let config = br#"{"os":"linux"}"#;
    r.push_blob("unk/blob", config).await;
    let missing_layer = bytes_of(24, 100);
    let manifest = manifest_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, config),
        "layers": [descriptor(OCI_LAYER, &missing_layer)],
    }));
    expect_error(r.put_manifest("unk/blob", "v1", OCI_MANIFEST, &manifest).await, 400, "MANIFEST_BLOB_UNKNOWN").await;
    expect_error(r.get_manifest("unk/blob", "v1").await, 404, "MANIFEST_UNKNOWN").await;

    // Unknown config too.
    let manifest = manifest_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, b"{\"never\":1}"),
        "layers": [],
    }));
    expect_error(r.put_manifest("unk/blob", "v2", OCI_MANIFEST, &manifest).await, 400, "MANIFEST_BLOB_UNKNOWN").await;
}

#[tokio::test]
async fn invalid_manifests() {
    let r = Reg::start();
    let config = br#"{"os":"linux"}"#;
    r.push_blob("bad/manifest", config).await;
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("not json", b"this is not json at all".to_vec()),
        ("truncated json", b"{\"schemaVersion\": 2, \"mediaType\": \"application/vnd.oci".to_vec()),
        ("empty body", Vec::new()),
        ("json array", b"[1,2,3]".to_vec()),
        (
            "config is a string",
            serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": "oops", "layers": []}))
                .unwrap(),
        ),
        (
            "layers is not a list",
            serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, config), "layers": {"a": 1}
            }))
            .unwrap(),
        ),
        (
            "schemaVersion 1 with an OCI media type",
            serde_json::to_vec(&json!({
                "schemaVersion": 1, "mediaType": OCI_MANIFEST,
                "config": descriptor(OCI_CONFIG, config), "layers": []
            }))
            .unwrap(),
        ),
        (
            "descriptor with a malformed digest",
            serde_json::to_vec(&json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": "sha256:nothex", "size": 14}, "layers": []
            }))
            .unwrap(),
        ),
    ];
    for (what, body) in cases {
        let resp = r.put_manifest("bad/manifest", "v1", OCI_MANIFEST, &body).await;
        let status = resp.status().as_u16();
        let text = resp.bytes().await.unwrap();
        assert_eq!(status, 400, "{what}: {}", String::from_utf8_lossy(&text));
        let codes = error_codes(&text).unwrap_or_else(|| panic!("{what}: no JSON error body"));
        assert!(codes.iter().any(|c| c == "MANIFEST_INVALID"), "{what}: expected MANIFEST_INVALID, got {codes:?}");
    }
    expect_error(r.get_manifest("bad/manifest", "v1").await, 404, "MANIFEST_UNKNOWN").await;
}

#[tokio::test]
async fn manifest_size_limit() {
    let r = Reg::start();
    let config = br#"{"os":"linux"}"#;
    r.push_blob("big/manifest", config).await;
    let build = |target: usize| {
        let base = json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": descriptor(OCI_CONFIG, config), "layers": [],
            "annotations": {"pad": ""},
        });
        let overhead = serde_json::to_vec(&base).unwrap().len();
        let mut v = base;
        v["annotations"]["pad"] = Value::String("x".repeat(target - overhead));
        let bytes = serde_json::to_vec(&v).unwrap();
        assert_eq!(bytes.len(), target);
        bytes
    };

    // Just under 4 MiB: registries SHOULD accept manifests of at least 4 MiB.
    let ok = build(4 * 1024 * 1024 - 1024);
    let d = r.push_manifest("big/manifest", "almost4m", OCI_MANIFEST, &ok).await;
    r.assert_manifest("big/manifest", &d, OCI_MANIFEST, &ok).await;

    // Over 4 MiB: refused with a 4xx (413 Payload Too Large is what the spec suggests).
    let too_big = build(4 * 1024 * 1024 + 64 * 1024);
    let result =
        r.c.put(r.url("/v2/big/manifest/manifests/huge"))
            .header("content-type", OCI_MANIFEST)
            .body(too_big.clone())
            .send()
            .await;
    match result {
        Ok(resp) => {
            let status = resp.status().as_u16();
            assert!((400..500).contains(&status), "manifest over 4 MiB must be refused with a 4xx, got {status}");
        }
        // The server may answer early and close while the body is still being sent; that is a refusal too.
        Err(e) => eprintln!("PUT of an oversized manifest ended with a transport error (early refusal?): {e}"),
    }
    expect_error(r.get_manifest("big/manifest", "huge").await, 404, "MANIFEST_UNKNOWN").await;
    let status = r.get_manifest("big/manifest", &sha256(&too_big)).await.status().as_u16();
    assert_eq!(status, 404);
}

#[tokio::test]
async fn put_manifest_by_mismatched_digest() {
    let r = Reg::start();
    let img = r.push_image("mismatch", "v1", 25).await;
    let other = manifest_bytes(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &img.config), "layers": [], "annotations": {"x": "y"},
    }));
    // Reference is the digest of a different body.
    expect_error(r.put_manifest("mismatch", &img.digest, OCI_MANIFEST, &other).await, 400, "DIGEST_INVALID").await;
    let status = r.get_manifest("mismatch", &sha256(&other)).await.status().as_u16();
    assert_eq!(status, 404, "the refused manifest must not be stored");
    // The original is untouched.
    r.assert_manifest("mismatch", &img.digest, OCI_MANIFEST, &img.manifest).await;
}

#[tokio::test]
async fn unknown_manifest() {
    let r = Reg::start();
    r.push_image("known/repo", "v1", 26).await;
    expect_error(r.get_manifest("known/repo", "nope").await, 404, "MANIFEST_UNKNOWN").await;
    expect_error(r.get_manifest("known/repo", &sha256(b"nope")).await, 404, "MANIFEST_UNKNOWN").await;
    let resp = r.head("/v2/known/repo/manifests/nope").await;
    assert_eq!(resp.status().as_u16(), 404);
    // Unknown repository altogether.
    let resp = r.get_manifest("unknown/repo", "v1").await;
    let status = resp.status().as_u16();
    let body = resp.bytes().await.unwrap();
    assert_eq!(status, 404);
    let codes = error_codes(&body).expect("JSON error body");
    assert!(
        codes.iter().any(|c| c == "NAME_UNKNOWN" || c == "MANIFEST_UNKNOWN"),
        "unknown repository: NAME_UNKNOWN or MANIFEST_UNKNOWN, got {codes:?}"
    );
    expect_error(r.delete(&format!("/v2/known/repo/manifests/{}", sha256(b"nope"))).await, 404, "MANIFEST_UNKNOWN")
        .await;
}

#[tokio::test]
async fn delete_manifest_by_digest_removes_its_tags() {
    let r = Reg::start();
    let img = r.push_image("del/manifest", "v1", 27).await;
    r.push_manifest("del/manifest", "also", OCI_MANIFEST, &img.manifest).await;
    let keep = r.push_image("del/manifest", "keep", 28).await;

    let resp = r.delete(&format!("/v2/del/manifest/manifests/{}", img.digest)).await;
    assert_eq!(resp.status().as_u16(), 202, "DELETE manifest by digest");
    expect_error(r.get_manifest("del/manifest", &img.digest).await, 404, "MANIFEST_UNKNOWN").await;
    expect_error(r.get_manifest("del/manifest", "v1").await, 404, "MANIFEST_UNKNOWN").await;
    expect_error(r.get_manifest("del/manifest", "also").await, 404, "MANIFEST_UNKNOWN").await;
    assert_eq!(r.head(&format!("/v2/del/manifest/manifests/{}", img.digest)).await.status().as_u16(), 404);
    let (tags, _) = r.list_page("/v2/del/manifest/tags/list", "tags").await;
    assert_eq!(tags, vec!["keep".to_string()]);
    r.assert_manifest("del/manifest", &keep.digest, OCI_MANIFEST, &keep.manifest).await;
    expect_error(r.delete(&format!("/v2/del/manifest/manifests/{}", img.digest)).await, 404, "MANIFEST_UNKNOWN").await;
}

#[tokio::test]
async fn delete_by_tag_removes_only_the_tag() {
    let r = Reg::start();
    let img = r.push_image("del/tag", "v1", 29).await;
    r.push_manifest("del/tag", "v2", OCI_MANIFEST, &img.manifest).await;

    let resp = r.delete("/v2/del/tag/manifests/v1").await;
    assert_eq!(resp.status().as_u16(), 202, "DELETE by tag");
    expect_error(r.get_manifest("del/tag", "v1").await, 404, "MANIFEST_UNKNOWN").await;
    r.assert_manifest("del/tag", "v2", OCI_MANIFEST, &img.manifest).await;
    r.assert_manifest("del/tag", &img.digest, OCI_MANIFEST, &img.manifest).await;
    let (tags, _) = r.list_page("/v2/del/tag/tags/list", "tags").await;
    assert_eq!(tags, vec!["v2".to_string()]);
    expect_error(r.delete("/v2/del/tag/manifests/v1").await, 404, "MANIFEST_UNKNOWN").await;
}

// ---------------------------------------------------------------------------------------------------------------
// Repository names
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn invalid_repository_names() {
    let r = Reg::start();
    let digest = sha256(b"x");
    // Names that route but are invalid: must be 400 NAME_INVALID.
    for name in ["Upper", "lib/Upper", "-lead", "lib/-lead", "trail-", "a..b", "a___b", "a/.hidden", "a/b_"] {
        expect_error(r.get(&format!("/v2/{name}/tags/list")).await, 400, "NAME_INVALID").await;
        expect_error(r.get_manifest(name, "latest").await, 400, "NAME_INVALID").await;
        expect_error(r.get(&format!("/v2/{name}/blobs/{digest}")).await, 400, "NAME_INVALID").await;
        let resp = r.send(Method::POST, &r.url(&format!("/v2/{name}/blobs/uploads/")), &[], None).await;
        expect_error(resp, 400, "NAME_INVALID").await;
        let resp = r.put_manifest(name, "latest", OCI_MANIFEST, b"{}").await;
        expect_error(resp, 400, "NAME_INVALID").await;
    }
    // A name longer than 255 characters (as counted with the registry's hostname it would be; many registries
    // cap the name alone): not asserted, distributions differ.

    // Paths that may not even route: 400 NAME_INVALID or 404. Sent raw so that no client normalizes them.
    for path in
        ["/v2/a//b/tags/list", "/v2/a/../b/tags/list", "/v2/../tags/list", "/v2/a/./b/tags/list", "/v2//a/tags/list"]
    {
        let req = format!("GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", r.bw.addr);
        let (status, _, body) = raw_http(&r.bw.addr, &req).await;
        match status {
            400 => {
                let codes = error_codes(&body).unwrap_or_else(|| panic!("{path}: 400 without JSON error"));
                assert!(codes.iter().any(|c| c == "NAME_INVALID"), "{path}: got {codes:?}");
            }
            404 => {}
            other => {
                panic!("{path}: expected 400 NAME_INVALID or 404, got {other}: {}", String::from_utf8_lossy(&body))
            }
        }
    }

    // Valid names with every separator work.
    for name in ["a", "a0/b-c/d.e/f_g/h__i/j--k", "x/y/z/w/v"] {
        r.push_image(name, "v1", 30).await;
        let (tags, _) = r.list_page(&format!("/v2/{name}/tags/list"), "tags").await;
        assert_eq!(tags, vec!["v1".to_string()], "{name}");
    }
}

#[tokio::test]
async fn unknown_repository_tags_list() {
    let r = Reg::start();
    expect_error(r.get("/v2/does/not/exist/tags/list").await, 404, "NAME_UNKNOWN").await;
}

// ---------------------------------------------------------------------------------------------------------------
// Pagination
// ---------------------------------------------------------------------------------------------------------------

/// Checks a page: its items, and whether a next Link is present and (if so) where it points.
async fn check_page(r: &Reg, path: &str, key: &str, expected: &[&str], more: Option<bool>) -> Option<String> {
    let (items, next) = r.list_page(path, key).await;
    assert_eq!(items, expected, "GET {path}");
    match more {
        Some(true) => {
            let link = next.clone().unwrap_or_else(|| panic!("GET {path}: Link rel=\"next\" expected"));
            let p = r.link_path(&link);
            let last = expected.last().expect("non-empty page");
            let (link_path, query) = p.split_once('?').unwrap_or_else(|| panic!("{path}: Link {link} has no query"));
            assert_eq!(link_path, path.split('?').next().unwrap(), "{path}: Link {link} points elsewhere");
            let params: Vec<(String, String)> = query
                .split('&')
                .map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (percent_decode(k), percent_decode(v))
                })
                .collect();
            let get = |k: &str| params.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.clone());
            assert_eq!(
                get("last").as_deref(),
                Some(*last),
                "{path}: Link {link} must continue after the page's last item"
            );
            if let Some(n) = path.split(['?', '&']).find_map(|kv| kv.strip_prefix("n=")) {
                assert_eq!(get("n").as_deref(), Some(n), "{path}: Link {link} keeps n");
            }
        }
        Some(false) => assert!(next.is_none(), "GET {path}: no Link expected on the last page, got {next:?}"),
        None => {}
    }
    next
}

#[tokio::test]
async fn tags_list_pagination() {
    let r = Reg::start();
    let img = r.push_image("paged", "a", 31).await;
    let all = ["a", "b", "c10", "c2", "latest", "v1.0", "v1.1"];
    for t in &all[1..] {
        r.push_manifest("paged", t, OCI_MANIFEST, &img.manifest).await;
    }
    let tl = "/v2/paged/tags/list";

    // Everything, sorted.
    let resp = r.get(tl).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert!(header(resp.headers(), "link").is_none(), "no Link without n");
    let v: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(v["name"], "paged");
    assert_eq!(v["tags"], json!(all));

    check_page(&r, &format!("{tl}?n=3"), "tags", &all[0..3], Some(true)).await;
    check_page(&r, &format!("{tl}?n=3&last=c10"), "tags", &all[3..6], Some(true)).await;
    check_page(&r, &format!("{tl}?n=3&last=v1.0"), "tags", &all[6..7], Some(false)).await;
    check_page(&r, &format!("{tl}?n=100"), "tags", &all, Some(false)).await;
    check_page(&r, &format!("{tl}?n=1&last=a"), "tags", &["b"], Some(true)).await;
    // `last` needs not be an existing tag: results start strictly after it.
    check_page(&r, &format!("{tl}?n=2&last=c"), "tags", &["c10", "c2"], Some(true)).await;
    check_page(&r, &format!("{tl}?last=c2"), "tags", &all[4..], Some(false)).await;
    // A page that ends exactly at the end: a Link is allowed; following it yields nothing more.
    if let Some(link) = check_page(&r, &format!("{tl}?n=7"), "tags", &all, None).await {
        check_page(&r, &r.link_path(&link), "tags", &[], Some(false)).await;
    }
    if let Some(link) = check_page(&r, &format!("{tl}?n=2&last=latest"), "tags", &["v1.0", "v1.1"], None).await {
        check_page(&r, &r.link_path(&link), "tags", &[], Some(false)).await;
    }
    // last beyond the end.
    check_page(&r, &format!("{tl}?n=3&last=zzz"), "tags", &[], Some(false)).await;
    check_page(&r, &format!("{tl}?last=v1.1"), "tags", &[], Some(false)).await;

    // Following Link pages yields every tag exactly once, in order.
    for n in 1..=8 {
        let got = r.follow_pages(&format!("{tl}?n={n}"), "tags").await;
        assert_eq!(got, all, "following pages of n={n}");
    }

    // n=0: an empty list and no Link (distribution-spec v1.1, listing tags: "When `n` is zero, this endpoint MUST
    // return an empty list, and MUST NOT include a `Link` header").
    check_page(&r, &format!("{tl}?n=0"), "tags", &[], Some(false)).await;
    check_page(&r, &format!("{tl}?n=0&last=b"), "tags", &[], Some(false)).await;
}

#[tokio::test]
async fn catalog_pagination() {
    let r = Reg::start();
    let (empty, next) = r.list_page("/v2/_catalog", "repositories").await;
    assert!(empty.is_empty() && next.is_none(), "an empty registry has an empty catalog");

    let mut repos = vec!["alpha", "beta/one", "beta/two", "gamma", "zeta/x/y", "a-b", "a.b", "a_b", "a0"];
    for (i, repo) in repos.iter().enumerate() {
        r.push_image(repo, "v1", 40 + i as u64).await;
    }
    repos.sort();
    let all: Vec<&str> = repos.clone();

    let (items, next) = r.list_page("/v2/_catalog", "repositories").await;
    assert_eq!(items, all);
    assert!(next.is_none());

    check_page(&r, "/v2/_catalog?n=4", "repositories", &all[0..4], Some(true)).await;
    let last = all[3];
    check_page(&r, &format!("/v2/_catalog?n=4&last={last}"), "repositories", &all[4..8], Some(true)).await;
    let last = all[7];
    check_page(&r, &format!("/v2/_catalog?n=4&last={last}"), "repositories", &all[8..9], Some(false)).await;
    check_page(&r, "/v2/_catalog?n=5&last=zzzz", "repositories", &[], Some(false)).await;
    check_page(&r, "/v2/_catalog?n=2&last=beta", "repositories", &["beta/one", "beta/two"], Some(true)).await;
    for n in 1..=10 {
        let got = r.follow_pages(&format!("/v2/_catalog?n={n}"), "repositories").await;
        assert_eq!(got, all, "following catalog pages of n={n}");
        let unique: BTreeSet<_> = got.iter().collect();
        assert_eq!(unique.len(), got.len());
    }
    // n=0: an empty page and no Link (as for tags/list).
    check_page(&r, "/v2/_catalog?n=0", "repositories", &[], Some(false)).await;
}

// ---------------------------------------------------------------------------------------------------------------
// Referrers
// ---------------------------------------------------------------------------------------------------------------

fn subject_of(img: &Image) -> Value {
    json!({"mediaType": OCI_MANIFEST, "digest": img.digest, "size": img.manifest.len()})
}

#[tokio::test]
async fn referrers_api() {
    let r = Reg::start();
    let repo = "refs/app";
    let subject = r.push_image(repo, "v1", 50).await;
    let empty = b"{}";
    r.push_blob(repo, empty).await;
    let sig_config = br#"{"sig":"config"}"#;
    r.push_blob(repo, sig_config).await;

    // 1. An artifact with artifactType.
    let sbom = manifest_bytes(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.example.sbom.v1",
        "config": descriptor(OCI_EMPTY, empty),
        "layers": [descriptor(OCI_EMPTY, empty)],
        "subject": subject_of(&subject),
        "annotations": {"org.example.kind": "sbom", "org.opencontainers.image.created": "2024-01-01T00:00:00Z"},
    }));
    // 2. No artifactType: the descriptor takes the config's media type.
    let sig = manifest_bytes(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor("application/vnd.example.sig.config.v1+json", sig_config),
        "layers": [],
        "subject": subject_of(&subject),
        "annotations": {"org.example.kind": "signature"},
    }));
    // 3. An index with artifactType.
    let idx = manifest_bytes(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "artifactType": "application/vnd.example.bundle.v1",
        "manifests": [],
        "subject": subject_of(&subject),
    }));
    // 4. An index without artifactType: the descriptor has none.
    let idx_plain = manifest_bytes(&json!({
        "schemaVersion": 2, "mediaType": OCI_INDEX,
        "manifests": [],
        "subject": subject_of(&subject),
        "annotations": {"plain": "index"},
    }));

    let mut pushed = Vec::new();
    for (body, mt) in [(&sbom, OCI_MANIFEST), (&sig, OCI_MANIFEST), (&idx, OCI_INDEX), (&idx_plain, OCI_INDEX)] {
        let d = sha256(body);
        let resp = r.put_manifest(repo, &d, mt, body).await;
        assert_eq!(resp.status().as_u16(), 201, "PUT referrer");
        assert_eq!(must_header(resp.headers(), "oci-subject"), subject.digest, "OCI-Subject on a PUT with subject");
        pushed.push(d);
    }
    // A manifest without subject does not get OCI-Subject.
    let plain = r.push_image(repo, "v2", 51).await;
    let resp = r.put_manifest(repo, "v2", OCI_MANIFEST, &plain.manifest).await;
    assert!(header(resp.headers(), "oci-subject").is_none(), "no OCI-Subject on a manifest without subject");

    // A referrer of the same subject in another repository is not listed here.
    r.push_blob("refs/other", empty).await;
    let elsewhere = manifest_bytes(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.sbom.v1",
        "config": descriptor(OCI_EMPTY, empty), "layers": [], "subject": subject_of(&subject),
    }));
    r.push_manifest("refs/other", &sha256(&elsewhere), OCI_MANIFEST, &elsewhere).await;

    let expected = json!([
        {"mediaType": OCI_MANIFEST, "digest": sha256(&sbom), "size": sbom.len(),
         "artifactType": "application/vnd.example.sbom.v1",
         "annotations": {"org.example.kind": "sbom", "org.opencontainers.image.created": "2024-01-01T00:00:00Z"}},
        {"mediaType": OCI_MANIFEST, "digest": sha256(&sig), "size": sig.len(),
         "artifactType": "application/vnd.example.sig.config.v1+json",
         "annotations": {"org.example.kind": "signature"}},
        {"mediaType": OCI_INDEX, "digest": sha256(&idx), "size": idx.len(),
         "artifactType": "application/vnd.example.bundle.v1"},
        {"mediaType": OCI_INDEX, "digest": sha256(&idx_plain), "size": idx_plain.len(),
         "annotations": {"plain": "index"}},
    ]);

    let referrers = |query: String| {
        let r = &r;
        let subject = subject.digest.clone();
        async move {
            let resp = r.get(&format!("/v2/{repo}/referrers/{subject}{query}")).await;
            let status = resp.status().as_u16();
            let h = resp.headers().clone();
            let body = resp.bytes().await.unwrap();
            assert_eq!(status, 200, "referrers{query}: {}", String::from_utf8_lossy(&body));
            let ct = must_header(&h, "content-type");
            assert_eq!(ct, OCI_INDEX, "referrers Content-Type");
            let v: Value = serde_json::from_slice(&body).expect("referrers JSON");
            assert_eq!(v["schemaVersion"], 2);
            assert_eq!(v["mediaType"], OCI_INDEX);
            (v, h)
        }
    };

    let (v, _) = referrers(String::new()).await;
    assert_eq!(sorted_descriptors(&v["manifests"]), sorted_descriptors(&expected));

    // Filter by artifactType.
    let (v, h) = referrers(format!("?artifactType={}", q("application/vnd.example.sbom.v1"))).await;
    assert_eq!(must_header(&h, "oci-filters-applied"), "artifactType");
    assert_eq!(sorted_descriptors(&v["manifests"]), sorted_descriptors(&json!([expected[0]])));
    // A '+' in the filter value must survive query decoding.
    let (v, h) = referrers(format!("?artifactType={}", q("application/vnd.example.sig.config.v1+json"))).await;
    assert_eq!(must_header(&h, "oci-filters-applied"), "artifactType");
    assert_eq!(sorted_descriptors(&v["manifests"]), sorted_descriptors(&json!([expected[1]])));
    // Filter that matches nothing.
    let (v, h) = referrers(format!("?artifactType={}", q("application/vnd.example.none"))).await;
    assert_eq!(must_header(&h, "oci-filters-applied"), "artifactType");
    assert_eq!(v["manifests"], json!([]));

    // Deleting a referrer removes it from the list.
    assert_eq!(r.delete(&format!("/v2/{repo}/manifests/{}", pushed[1])).await.status().as_u16(), 202);
    let (v, _) = referrers(String::new()).await;
    let remaining = json!([expected[0], expected[2], expected[3]]);
    assert_eq!(sorted_descriptors(&v["manifests"]), sorted_descriptors(&remaining));

    // Unknown subject: 200 and an empty list.
    let resp = r.get(&format!("/v2/{repo}/referrers/{}", sha256(b"no such subject"))).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(must_header(resp.headers(), "content-type"), OCI_INDEX);
    let v: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["mediaType"], OCI_INDEX);
    assert_eq!(v["manifests"], json!([]));

    // Malformed digest: 400.
    let status = r.get(&format!("/v2/{repo}/referrers/sha256:nothex")).await.status().as_u16();
    assert_eq!(status, 400, "referrers with an invalid digest");
}

#[tokio::test]
async fn referrer_pushed_before_its_subject() {
    let r = Reg::start();
    let repo = "refs/dangling";
    let empty = b"{}";
    r.push_blob(repo, empty).await;
    let missing_subject = json!({"mediaType": OCI_MANIFEST, "digest": sha256(b"later"), "size": 5});
    let m = manifest_bytes(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": "application/vnd.example.early",
        "config": descriptor(OCI_EMPTY, empty), "layers": [], "subject": missing_subject,
    }));
    let d = sha256(&m);
    let resp = r.put_manifest(repo, &d, OCI_MANIFEST, &m).await;
    assert_eq!(resp.status().as_u16(), 201, "a manifest whose subject does not exist (yet) must be accepted");
    assert_eq!(must_header(resp.headers(), "oci-subject"), sha256(b"later"));
    let resp = r.get(&format!("/v2/{repo}/referrers/{}", sha256(b"later"))).await;
    assert_eq!(resp.status().as_u16(), 200);
    let v: Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert_eq!(
        v["manifests"],
        json!([{"mediaType": OCI_MANIFEST, "digest": d, "size": m.len(), "artifactType": "application/vnd.example.early"}])
    );
}

/// Descriptors sorted by digest, so that the order of a referrers list does not matter.
fn sorted_descriptors(v: &Value) -> Vec<Value> {
    let mut list = v.as_array().unwrap_or_else(|| panic!("manifests is not a list: {v}")).clone();
    list.sort_by(|a, b| a["digest"].as_str().cmp(&b["digest"].as_str()));
    // An absent annotations map and an empty one are equivalent.
    for d in &mut list {
        if d.get("annotations") == Some(&json!({})) {
            d.as_object_mut().unwrap().remove("annotations");
        }
    }
    list
}

// ---------------------------------------------------------------------------------------------------------------
// --no-delete
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn no_delete_mode() {
    let r = Reg::start_with(&["--no-delete"]);
    let img = r.push_image("keep/all", "v1", 60).await;
    let layer_d = sha256(&img.layer);

    expect_error(r.delete(&format!("/v2/keep/all/manifests/{}", img.digest)).await, 405, "UNSUPPORTED").await;
    expect_error(r.delete("/v2/keep/all/manifests/v1").await, 405, "UNSUPPORTED").await;
    expect_error(r.delete(&format!("/v2/keep/all/blobs/{layer_d}")).await, 405, "UNSUPPORTED").await;

    r.assert_manifest("keep/all", "v1", OCI_MANIFEST, &img.manifest).await;
    r.assert_manifest("keep/all", &img.digest, OCI_MANIFEST, &img.manifest).await;
    assert_eq!(r.blob_bytes("keep/all", &layer_d).await, img.layer);
    let (tags, _) = r.list_page("/v2/keep/all/tags/list", "tags").await;
    assert_eq!(tags, vec!["v1".to_string()]);
}

// ---------------------------------------------------------------------------------------------------------------
// Crash safety, seen from outside
// ---------------------------------------------------------------------------------------------------------------

/// Sends a request head and only part of the declared body, then closes the socket (gracefully, or with a reset).
async fn send_half_and_close(addr: &str, head: &str, partial: &[u8], reset: bool) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(head.as_bytes()).await.expect("write head");
    s.write_all(partial).await.expect("write partial body");
    s.flush().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    if reset {
        // SO_LINGER 0 makes the close send a RST; with a zero timeout it never blocks.
        #[allow(deprecated)]
        s.set_linger(Some(Duration::ZERO)).unwrap();
    } else {
        let _ = s.shutdown().await;
    }
    drop(s);
}

#[tokio::test]
async fn interrupted_uploads_leave_nothing_visible() {
    let r = Reg::start();
    let addr = r.bw.addr.clone();
    let data = bytes_of(70, 1_000_000);
    let digest = sha256(&data);

    for reset in [false, true] {
        // Half a single-POST monolithic upload.
        let head = format!(
            "POST /v2/crash/mono/blobs/uploads/?digest={digest} HTTP/1.1\r\nHost: {addr}\r\n\
             Content-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            data.len()
        );
        send_half_and_close(&addr, &head, &data[..400_000], reset).await;

        // Half of the PUT that closes a POST-then-PUT upload.
        let loc = r.start_upload("crash/mono").await;
        let put = with_query(&loc, &format!("digest={digest}"));
        let path = r.link_path(&put);
        let head = format!(
            "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
            data.len()
        );
        send_half_and_close(&addr, &head, &data[..300_000], reset).await;

        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(r.blob_status("crash/mono", &digest).await, 404, "a half-sent blob must not be visible");
        let status = r.get(&format!("/v2/crash/mono/blobs/{digest}")).await.status().as_u16();
        assert_eq!(status, 404);
    }

    // The server still works, and the same blob can be pushed completely afterwards.
    assert_eq!(r.get("/v2/").await.status().as_u16(), 200);
    let resp = r
        .send(
            Method::POST,
            &r.url(&format!("/v2/crash/mono/blobs/uploads/?digest={digest}")),
            &[("content-type", "application/octet-stream")],
            Some(data.clone()),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(r.blob_bytes("crash/mono", &digest).await, data);
    let img = r.push_image("crash/after", "v1", 71).await;
    r.assert_manifest("crash/after", "v1", OCI_MANIFEST, &img.manifest).await;
}

#[tokio::test]
async fn interrupted_manifest_put_leaves_nothing_visible() {
    let r = Reg::start();
    let addr = r.bw.addr.clone();
    let img = r.push_image("crash/manifest", "v1", 72).await;
    let other = manifest_bytes(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &img.config), "layers": [descriptor(OCI_LAYER, &img.layer)],
        "annotations": {"pad": "p".repeat(20_000)},
    }));
    let head = format!(
        "PUT /v2/crash/manifest/manifests/v1 HTTP/1.1\r\nHost: {addr}\r\nContent-Type: {OCI_MANIFEST}\r\nContent-Length: {}\r\n\r\n",
        other.len()
    );
    send_half_and_close(&addr, &head, &other[..other.len() / 2], false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The tag still points at the old manifest, and the half manifest is nowhere.
    r.assert_manifest("crash/manifest", "v1", OCI_MANIFEST, &img.manifest).await;
    let status = r.get_manifest("crash/manifest", &sha256(&other)).await.status().as_u16();
    assert_eq!(status, 404);
}

// ---------------------------------------------------------------------------------------------------------------
// More edges
// ---------------------------------------------------------------------------------------------------------------

#[tokio::test]
async fn bad_chunks_leave_the_upload_unchanged() {
    let r = Reg::start();
    let data = bytes_of(80, 200);
    let digest = sha256(&data);
    let mut loc = r.start_upload("badchunk").await;

    // The first chunk must start at 0.
    let resp = r.patch_chunk(&loc, Some("10-19"), &data[10..20]).await;
    assert_eq!(resp.status().as_u16(), 416, "first chunk not starting at 0");

    let resp = r.patch_chunk(&loc, Some("0-99"), &data[..100]).await;
    assert_eq!(resp.status().as_u16(), 202);
    loc = r.abs(&must_header(resp.headers(), "location"));

    // Malformed Content-Range values.
    for bad in ["abc", "100-", "-199", "150-100"] {
        let resp = r.patch_chunk(&loc, Some(bad), &data[100..]).await;
        let status = resp.status().as_u16();
        assert!(status == 416 || status == 400, "Content-Range {bad:?}: expected 416 (or 400), got {status}");
    }
    // Content-Range that disagrees with the body length.
    let resp = r.patch_chunk(&loc, Some("100-199"), &data[100..150]).await;
    let status = resp.status().as_u16();
    assert!(status == 416 || status == 400, "Content-Range longer than the body: expected 416 or 400, got {status}");

    // None of that moved the offset, and the upload can still be finished.
    let (status, range) = r.upload_status(&loc).await;
    assert_eq!(status, 204);
    assert_eq!(range.as_deref(), Some("0-99"));
    let resp = r.patch_chunk(&loc, Some("100-199"), &data[100..]).await;
    assert_eq!(resp.status().as_u16(), 202);
    loc = r.abs(&must_header(resp.headers(), "location"));
    let resp = r.send(Method::PUT, &with_query(&loc, &format!("digest={digest}")), &[], None).await;
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(r.blob_bytes("badchunk", &digest).await, data);
}

#[tokio::test]
async fn empty_blob() {
    let r = Reg::start();
    let digest = sha256(b"");
    let resp = r
        .send(
            Method::POST,
            &r.url(&format!("/v2/empty/blob/blobs/uploads/?digest={digest}")),
            &[("content-type", "application/octet-stream")],
            Some(Vec::new()),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 201, "single POST of an empty blob");
    let resp = r.head(&format!("/v2/empty/blob/blobs/{digest}")).await;
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(must_header(resp.headers(), "content-length"), "0");
    assert_eq!(r.blob_bytes("empty/blob", &digest).await, Vec::<u8>::new());
    // POST then PUT of an empty blob too.
    r.push_blob("empty/blob2", b"").await;
    assert_eq!(r.blob_bytes("empty/blob2", &digest).await, Vec::<u8>::new());
    // No byte range of an empty blob is satisfiable.
    let resp = r.get_with(&format!("/v2/empty/blob/blobs/{digest}"), &[("range", "bytes=0-0")]).await;
    expect_error(resp, 416, "RANGE_INVALID").await;
}

#[tokio::test]
async fn tag_names() {
    let r = Reg::start();
    let img = r.push_image("tags/valid", "v1", 81).await;
    // Valid: [a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}
    let longest = format!("A{}", "b".repeat(127));
    for tag in ["Latest_V1.0", "_underscore", "1.2.3-rc.1", "x", longest.as_str()] {
        r.push_manifest("tags/valid", tag, OCI_MANIFEST, &img.manifest).await;
        r.assert_manifest("tags/valid", tag, OCI_MANIFEST, &img.manifest).await;
    }
    // Invalid tags are refused with a 400 and not stored.
    let too_long = format!("a{}", "b".repeat(128));
    for tag in [".dot", "-dash", "bad!", "sp%20ace", too_long.as_str()] {
        let resp = r.put_manifest("tags/invalid", tag, OCI_MANIFEST, &img.manifest).await;
        let status = resp.status().as_u16();
        assert_eq!(status, 400, "PUT with invalid tag {tag:?}: got {status}");
    }
    let (tags, _) = r.list_page("/v2/tags/valid/tags/list", "tags").await;
    let mut expected = vec!["Latest_V1.0", "_underscore", "1.2.3-rc.1", "x", longest.as_str(), "v1"];
    expected.sort();
    assert_eq!(tags, expected);
    assert_eq!(r.get("/v2/tags/invalid/tags/list").await.status().as_u16(), 404, "nothing was stored");
}

#[tokio::test]
async fn concurrent_uploads_of_the_same_blob() {
    let r = Reg::start();
    let data = bytes_of(82, 2 * 1024 * 1024);
    let digest = sha256(&data);
    let mut tasks = Vec::new();
    for i in 0..8 {
        let c = r.c.clone();
        let url = r.url(&format!("/v2/conc/repo{}/blobs/uploads/?digest={digest}", i % 3));
        let body = data.clone();
        tasks.push(tokio::spawn(async move {
            let resp = c.post(url).header("content-type", "application/octet-stream").body(body).send().await.unwrap();
            resp.status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201, "concurrent single-POST uploads of one blob all succeed");
    }
    for i in 0..3 {
        assert!(r.blob_bytes(&format!("conc/repo{i}"), &digest).await == data, "repo{i} serves the exact bytes");
    }
}

#[tokio::test]
async fn state_survives_restart_and_kill() {
    let r = Reg::start();
    let img = r.push_image("persist/app", "v1", 83).await;
    let blob = bytes_of(84, 50_000);
    let blob_d = r.push_blob("persist/app", &blob).await;
    // An upload in flight when the server is killed.
    let loc = r.start_upload("persist/app").await;
    let half = bytes_of(85, 10_000);
    let resp = r.patch_chunk(&loc, Some("0-4999"), &half[..5000]).await;
    assert_eq!(resp.status().as_u16(), 202);

    let Reg { bw, c } = r;
    let data = bw.stop(); // SIGKILL
    let r = Reg { bw: common::Breakwater::start_in(data, &[]), c };

    r.assert_manifest("persist/app", "v1", OCI_MANIFEST, &img.manifest).await;
    r.assert_manifest("persist/app", &img.digest, OCI_MANIFEST, &img.manifest).await;
    assert_eq!(r.blob_bytes("persist/app", &blob_d).await, blob);
    assert_eq!(r.blob_status("persist/app", &sha256(&half)).await, 404);
    assert_eq!(r.blob_status("persist/app", &sha256(&half[..5000])).await, 404);
    let (tags, _) = r.list_page("/v2/persist/app/tags/list", "tags").await;
    assert_eq!(tags, vec!["v1".to_string()]);
    let (repos, _) = r.list_page("/v2/_catalog", "repositories").await;
    assert_eq!(repos, vec!["persist/app".to_string()]);
    // The interrupted session either still works or is gone (404); it never yields a wrong blob.
    let loc = r.url(&r.link_path(&loc)); // same path, new port
    let resp = r.patch_chunk(&loc, Some("5000-9999"), &half[5000..]).await;
    let status = resp.status().as_u16();
    assert!(status == 202 || status == 404 || status == 416, "PATCH on a session from before the restart: {status}");
    // The registry accepts new pushes.
    let img2 = r.push_image("persist/app", "v2", 86).await;
    r.assert_manifest("persist/app", "v2", OCI_MANIFEST, &img2.manifest).await;
}

/// A chunked upload interrupted by a restart and finished after it: the new process carries no digest of the
/// bytes received before (it hashes the stored upload at commit), and the blob is exactly the bytes pushed, under
/// their digest, while a wrong digest is refused.
#[tokio::test]
async fn an_upload_resumed_after_a_restart_commits_the_bytes_on_disk() {
    let r = Reg::start();
    let blob = bytes_of(88, 3 * 1024 * 1024 + 17);
    let (a, b) = blob.split_at(1024 * 1024 + 5);
    let locs = [r.start_upload("resume/app").await, r.start_upload("resume/app").await];
    for loc in &locs {
        let resp = r.patch_chunk(loc, Some(&format!("0-{}", a.len() - 1)), a).await;
        assert_eq!(resp.status().as_u16(), 202);
    }
    let Reg { bw, c } = r;
    let r = Reg { bw: common::Breakwater::start_in(bw.stop(), &[]), c };
    for (loc, digest, want) in [(&locs[0], sha256(&blob), 201), (&locs[1], sha256(b"something else"), 400)] {
        let loc = r.url(&r.link_path(loc));
        let resp = r.patch_chunk(&loc, Some(&format!("{}-{}", a.len(), blob.len() - 1)), b).await;
        assert_eq!(resp.status().as_u16(), 202, "PATCH after the restart");
        let loc = r.abs(&must_header(resp.headers(), "location"));
        let resp = r.send(Method::PUT, &with_query(&loc, &format!("digest={digest}")), &[], None).await;
        assert_eq!(resp.status().as_u16(), want, "commit as {digest}");
    }
    assert!(r.blob_bytes("resume/app", &sha256(&blob)).await == blob, "the blob is the bytes pushed");
    assert_eq!(r.blob_status("resume/app", &sha256(b"something else")).await, 404);
}

#[tokio::test]
async fn large_blob_streams_and_ranges() {
    let r = Reg::start();
    let data = bytes_of(87, 24 * 1024 * 1024 + 123);
    let digest = sha256(&data);
    // Chunked in 5 MiB pieces, then closed.
    let mut loc = r.start_upload("large").await;
    let mut offset = 0;
    for chunk in data.chunks(5 * 1024 * 1024) {
        let range = format!("{}-{}", offset, offset + chunk.len() - 1);
        let resp = r.patch_chunk(&loc, Some(&range), chunk).await;
        assert_eq!(resp.status().as_u16(), 202, "chunk {range}");
        loc = r.abs(&must_header(resp.headers(), "location"));
        offset += chunk.len();
    }
    let resp = r.send(Method::PUT, &with_query(&loc, &format!("digest={digest}")), &[], None).await;
    assert_eq!(resp.status().as_u16(), 201);
    let got = r.blob_bytes("large", &digest).await;
    assert!(got == data, "large blob differs");
    let (a, b) = (10 * 1024 * 1024 + 7, 20 * 1024 * 1024 + 3);
    let resp = r.get_with(&format!("/v2/large/blobs/{digest}"), &[("range", &format!("bytes={a}-{b}"))]).await;
    assert_eq!(resp.status().as_u16(), 206);
    assert_eq!(must_header(resp.headers(), "content-range"), format!("bytes {a}-{b}/{}", data.len()));
    assert!(resp.bytes().await.unwrap().as_ref() == &data[a..=b]);
}

/// Stored blobs are served as slices of a memory map (256 KiB each, `SERVE_SLICE` in `storage/local.rs`), and
/// windows of at most 64 KiB (`SMALL_WINDOW`) are read whole instead: ranges at and across those boundaries, and
/// at offsets that are not on a page, give exactly their bytes, and the whole blob its digest.
#[tokio::test]
async fn ranges_at_serving_slice_boundaries() {
    const SLICE: usize = 256 * 1024;
    const SMALL: usize = 64 * 1024;
    let r = Reg::start();
    let data = bytes_of(89, 5 * SLICE + 17);
    let digest = r.push_blob("slices", &data).await;
    let got = r.blob_bytes("slices", &digest).await;
    assert!(got == data, "whole blob differs");
    assert_eq!(sha256(&got), digest);
    let last = data.len() - 1;
    let cases = [
        (0, SMALL - 1),
        (0, SMALL),
        (1, SMALL + 1),
        (SLICE - 1, SLICE),
        (SLICE, 2 * SLICE - 1),
        (SLICE - 1, 4 * SLICE + 1),
        (4097, 4097 + SMALL),
        (4 * SLICE + 3, last),
        (last, last),
    ];
    for (a, b) in cases {
        let resp = r.get_with(&format!("/v2/slices/blobs/{digest}"), &[("range", &format!("bytes={a}-{b}"))]).await;
        assert_eq!(resp.status().as_u16(), 206, "bytes={a}-{b}");
        assert_eq!(must_header(resp.headers(), "content-length"), (b - a + 1).to_string(), "bytes={a}-{b}");
        assert!(resp.bytes().await.unwrap().as_ref() == &data[a..=b], "bytes={a}-{b}: wrong bytes");
    }
}

#[tokio::test]
async fn interrupted_patch_can_be_resumed_from_the_reported_offset() {
    let r = Reg::start();
    let addr = r.bw.addr.clone();
    let data = bytes_of(88, 600_000);
    let digest = sha256(&data);
    let mut loc = r.start_upload("resume").await;
    let resp = r.patch_chunk(&loc, Some("0-99999"), &data[..100_000]).await;
    assert_eq!(resp.status().as_u16(), 202);
    loc = r.abs(&must_header(resp.headers(), "location"));

    // A PATCH for 100000-599999 that stops after 200000 bytes and closes the connection.
    let head = format!(
        "PATCH {} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Range: 100000-599999\r\nContent-Length: 500000\r\n\r\n",
        r.link_path(&loc)
    );
    send_half_and_close(&addr, &head, &data[100_000..300_000], false).await;
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Whatever offset the registry reports, resuming from it must produce exactly the blob.
    let resp = r.send(Method::GET, &loc, &[], None).await;
    assert_eq!(resp.status().as_u16(), 204, "the session survives a client that went away");
    let range = must_header(resp.headers(), "range");
    loc = r.abs(&must_header(resp.headers(), "location"));
    let end: usize = range.strip_prefix("0-").expect("Range 0-N").parse().expect("numeric end");
    assert!((99_999..300_000).contains(&end), "reported offset {range} is outside what was sent");
    let resp = r.patch_chunk(&loc, Some(&format!("{}-599999", end + 1)), &data[end + 1..]).await;
    assert_eq!(resp.status().as_u16(), 202);
    assert_eq!(must_header(resp.headers(), "range"), "0-599999");
    loc = r.abs(&must_header(resp.headers(), "location"));
    let resp = r.send(Method::PUT, &with_query(&loc, &format!("digest={digest}")), &[], None).await;
    assert_eq!(resp.status().as_u16(), 201);
    assert!(r.blob_bytes("resume", &digest).await == data);
}

/// distribution-spec v1.1, listing tags: the response "MAY return fewer than `<int>` results, but only when the total
/// number of tags attached to the repository is less than `<int>` or a `Link` header is provided". A large `n` is
/// therefore not an error: the registry answers with what it has (capping the page and linking to the rest if it must).
#[tokio::test]
async fn tags_list_with_a_large_n() {
    let r = Reg::start();
    let img = r.push_image("bign", "a", 89).await;
    for t in ["b", "c"] {
        r.push_manifest("bign", t, OCI_MANIFEST, &img.manifest).await;
    }
    for n in [1001, 5000, 100_000] {
        let path = format!("/v2/bign/tags/list?n={n}");
        let (items, next) = r.list_page(&path, "tags").await;
        assert_eq!(items, ["a", "b", "c"], "GET {path}");
        assert!(next.is_none(), "GET {path}: nothing remains, so no Link");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Spec corners (issue 9, item 5)
// ---------------------------------------------------------------------------------------------------------------

/// A closing PUT whose `Content-Range` does not continue the upload is refused like such a PATCH: 416 with the
/// upload's current `Range`, nothing appended, and the session still open for the client to resume.
#[tokio::test]
async fn closing_put_with_a_gap_is_refused_and_the_session_survives() {
    let r = Reg::start();
    let data = bytes_of(91, 100);
    let digest = sha256(&data);
    let mut loc = r.start_upload("corners/put-range").await;
    let resp = r.patch_chunk(&loc, Some("0-49"), &data[..50]).await;
    assert_eq!(resp.status().as_u16(), 202);
    loc = r.abs(&must_header(resp.headers(), "location"));

    for (range, chunk) in [("60-99", &data[60..]), ("40-99", &data[40..])] {
        let resp = r
            .send(
                Method::PUT,
                &with_query(&loc, &format!("digest={digest}")),
                &[("content-type", "application/octet-stream"), ("content-range", range)],
                Some(chunk.to_vec()),
            )
            .await;
        assert_eq!(header(resp.headers(), "range").as_deref(), Some("0-49"), "closing PUT {range}: Range of the 416");
        expect_error(resp, 416, "BLOB_UPLOAD_INVALID").await;
    }
    let (status, range) = r.upload_status(&loc).await;
    assert_eq!((status, range.as_deref()), (204, Some("0-49")), "nothing was appended; the session is open");

    let resp = r
        .send(
            Method::PUT,
            &with_query(&loc, &format!("digest={digest}")),
            &[("content-type", "application/octet-stream"), ("content-range", "50-99")],
            Some(data[50..].to_vec()),
        )
        .await;
    assert_eq!(resp.status().as_u16(), 201, "the closing PUT that continues the upload");
    assert_eq!(r.blob_bytes("corners/put-range", &digest).await, data);
}

/// distribution-spec 1.1: a push by digest with `tag` query parameters tags the manifest with each, and answers an
/// `OCI-Tag` field for each accepted tag.
#[tokio::test]
async fn push_by_digest_with_tags() {
    let r = Reg::start();
    let img = r.push_image("corners/tags", "base", 92).await;
    let other = manifest_bytes(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": descriptor(OCI_CONFIG, &img.config),
        "layers": [],
        "annotations": {"pushed": "with tags"},
    }));
    let digest = sha256(&other);
    let url = r.url(&format!("/v2/corners/tags/manifests/{digest}?tag=1.2.3&tag=1.2&tag=latest"));
    let resp = r.send(Method::PUT, &url, &[("content-type", OCI_MANIFEST)], Some(other.clone())).await;
    assert_eq!(resp.status().as_u16(), 201);
    assert_eq!(must_header(resp.headers(), "docker-content-digest"), digest);
    let tags: Vec<String> = resp
        .headers()
        .get_all("oci-tag")
        .iter()
        .flat_map(|v| v.to_str().unwrap().split(',').map(|t| t.trim().to_string()).collect::<Vec<_>>())
        .collect();
    assert_eq!(tags, ["1.2.3", "1.2", "latest"]);
    for tag in ["1.2.3", "1.2", "latest"] {
        r.assert_manifest("corners/tags", tag, OCI_MANIFEST, &other).await;
    }
    let (listed, _) = r.list_page("/v2/corners/tags/tags/list", "tags").await;
    assert_eq!(listed, ["1.2", "1.2.3", "base", "latest"]);

    // An invalid tag refuses the push before anything is stored.
    let third = manifest_bytes(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": descriptor(OCI_CONFIG, &img.config), "layers": [],
        "annotations": {"pushed": "with a bad tag"},
    }));
    let third_digest = sha256(&third);
    let url = r.url(&format!("/v2/corners/tags/manifests/{third_digest}?tag=ok&tag=-bad"));
    let resp = r.send(Method::PUT, &url, &[("content-type", OCI_MANIFEST)], Some(third)).await;
    assert_eq!(resp.status().as_u16(), 400);
    assert_eq!(r.get_manifest("corners/tags", &third_digest).await.status().as_u16(), 404);
    assert_eq!(r.get_manifest("corners/tags", "ok").await.status().as_u16(), 404);
}

/// A range whose last byte comes before its first names no byte: 416 with `Content-Range: bytes */SIZE`, as from
/// distribution, not the whole blob.
#[tokio::test]
async fn backwards_range_is_unsatisfiable() {
    let r = Reg::start();
    let data = bytes_of(93, 1000);
    let digest = r.push_blob("corners/range", &data).await;
    let resp = r.get_with(&format!("/v2/corners/range/blobs/{digest}"), &[("range", "bytes=500-0")]).await;
    assert_eq!(header(resp.headers(), "content-range").as_deref(), Some("bytes */1000"));
    expect_error(resp, 416, "RANGE_INVALID").await;
}
