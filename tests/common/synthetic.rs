//! A synthetic source registry for replication tests: it *generates* `count` repository names in byte-sorted order
//! (nothing is stored, so a million repositories cost nothing) and serves a small OCI image under every name.
//!
//! - `/v2/_catalog` pages exactly like CNCF distribution 2.8: `n` defaults to 100, `n` above 1000 is 400
//!   `PAGINATION_NUMBER_INVALID`, `n=0` is an empty list, a bad or negative `n` falls back to 100, `last` need not
//!   exist (any `last` is compared byte-wise, so key ranges can be walked at once), and every page but the last
//!   carries a *relative* `Link: </v2/_catalog?last=X&n=N>; rel="next"` (query escaped as Go's
//!   `url.Values.Encode`). Each request costs O(n + log count). [`Synthetic::delay_on`] `"GET /v2/_catalog"` makes
//!   every catalog page slow (as distribution's rescans of its storage are); [`Synthetic::reverse_catalog`] makes
//!   the catalog unsorted (names in descending order, `last` meaning "before it"), as no registry should be.
//! - `/v2/<name>/tags/list` answers `{"name":..., "tags":["v1"]}`, or with [`Synthetic::start_with_tags`] the given
//!   tags in byte order, paged like breakwater (`n` defaults to and stops at 1000, `last`, a relative `Link`); every
//!   tag is the same image. Manifests by tag or digest, GET and HEAD, with
//!   `Content-Type` and `Docker-Content-Digest`; blobs (config + one layer) GET and HEAD, with single byte ranges.
//! - Images are identical under every name by default ([`Options::unique_images`] gives every repository its own
//!   config and layer, hence its own digests).
//!
//! Every request is recorded as an [`Event`] with a global sequence number, so a test can tell the order of events
//! ("the first manifest GET came before the last catalog page was asked for").
//!
//! Runs on its own thread and runtime ([`super::relay::Background`]); stops when dropped.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::body::Body;
use axum::extract::{Query, Request, State};
use axum::http::{header, Method};
use axum::response::Response;
use axum::Router;

use super::oci::{pseudo_random, sha256, OCI_MANIFEST};
use super::relay::Background;

/// How the synthetic registry names its repositories and what it serves.
#[derive(Clone, Debug)]
pub struct Options {
    /// Number of repositories.
    pub count: u64,
    /// 0: flat names `r0000000`, `r0000001`, ...; k in 1..=10: `ns0/r0000000` ... spread evenly over k namespaces
    /// (`ns{k}/r{j}`, `j` counting from 0 in each namespace); k in 11..=676: over k two-letter namespaces `aa`,
    /// `ab`, ... (`aa/r0000000`), names spread over many prefixes.
    pub namespaces: u64,
    /// Every repository gets its own config and layer (so its own manifest digest); otherwise all share one image.
    pub unique_images: bool,
    /// Size of the one layer.
    pub layer_size: usize,
}

impl Options {
    pub fn flat(count: u64) -> Self {
        Options { count, namespaces: 0, unique_images: false, layer_size: 1024 }
    }
}

/// One image as served (all bytes, all digests).
#[derive(Clone, Debug)]
pub struct SynImage {
    pub config: Vec<u8>,
    pub config_digest: String,
    pub layer: Vec<u8>,
    pub layer_digest: String,
    pub manifest: Vec<u8>,
    pub digest: String,
}

impl SynImage {
    fn build(seed: u64, layer_size: usize) -> SynImage {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{}},"rootfs":{{"type":"layers","diff_ids":[]}},"synthetic":{seed}}}"#
        )
        .into_bytes();
        let layer = pseudo_random(layer_size, 0x5EED_0000 + seed);
        let (config_digest, layer_digest) = (sha256(&config), sha256(&layer));
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{}}}]}}"#,
            config.len(),
            layer.len()
        )
        .into_bytes();
        let digest = sha256(&manifest);
        SynImage { config, config_digest, layer, layer_digest, manifest, digest }
    }
}

/// What a request asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `/v2/_catalog` with its raw `last` and `n` parameters (decoded).
    Catalog { last: Option<String>, n: Option<String> },
    /// A tag list, with its raw `last` parameter.
    Tags { repo: String, last: Option<String> },
    Manifest { repo: String, reference: String },
    Blob { repo: String, digest: String },
    Other { path: String },
}

/// One request the synthetic registry answered.
#[derive(Clone, Debug)]
pub struct Event {
    /// Global order of arrival, from 0.
    pub seq: u64,
    pub method: String,
    pub kind: Kind,
    pub status: u16,
}

struct Shared {
    opts: Options,
    common: SynImage,
    log: Mutex<Vec<Event>>,
    /// The tags of every repository, byte-sorted.
    tags: Vec<String>,
    next_seq: Mutex<u64>,
    /// Requests whose `"METHOD /path"` contains the string wait this long before they are answered (after they are
    /// recorded, so their sequence number is their arrival).
    delay: Mutex<Option<(String, std::time::Duration)>>,
    /// The catalog lists names in descending order (an unsorted source).
    reversed: std::sync::atomic::AtomicBool,
}

/// A running synthetic registry; stops when dropped.
pub struct Synthetic {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    shared: Arc<Shared>,
    _background: Background,
}

pub const TAG: &str = "v1";
const MAX_N: u64 = 1000;
const DEFAULT_N: u64 = 100;

impl Synthetic {
    /// `count` flat repositories sharing one image.
    pub fn start(count: u64) -> Synthetic {
        Self::start_with(Options::flat(count))
    }

    pub fn start_with(opts: Options) -> Synthetic {
        Self::start_with_tags(opts, vec![TAG.to_string()])
    }

    /// Every repository has `tags` (listed in byte order, a page of at most 1000 at a time).
    pub fn start_with_tags(opts: Options, mut tags: Vec<String>) -> Synthetic {
        tags.sort();
        tags.dedup();
        assert!(opts.namespaces <= 26 * 26, "at most 676 namespaces (two letters)");
        assert!(opts.count < 10_000_000 * opts.namespaces.max(1), "names have 7 digits");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind synthetic");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr").to_string();
        let common = SynImage::build(0, opts.layer_size);
        let shared = Arc::new(Shared { opts, common, tags, log: Mutex::new(Vec::new()), next_seq: Mutex::new(0), delay: Mutex::new(None),
            reversed: Default::default() });
        let app_shared = shared.clone();
        let background = Background::spawn("synthetic", 2, move || async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let app = Router::new().fallback(handle).with_state(app_shared);
            let _ = axum::serve(listener, app).await;
        });
        Synthetic { addr, shared, _background: background }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    pub fn count(&self) -> u64 {
        self.shared.opts.count
    }

    /// The name of repository `i` (0-based, in catalog order).
    pub fn name(&self, i: u64) -> String {
        name_of(&self.shared.opts, i)
    }

    /// The catalog position of `name`, if it is one of the generated names.
    pub fn index_of(&self, name: &str) -> Option<u64> {
        index_of(&self.shared.opts, name)
    }

    /// Positions `[start, end)` of the names a catalog request with this `last` and page size returns.
    pub fn page_range(&self, last: Option<&str>, n: u64) -> (u64, u64) {
        let start = last.map(|l| first_after(&self.shared.opts, l)).unwrap_or(0);
        (start, (start + n).min(self.shared.opts.count))
    }

    /// The image served under repository `i`.
    pub fn image(&self, i: u64) -> SynImage {
        image_for(&self.shared, i)
    }

    /// Every request so far, in order.
    pub fn events(&self) -> Vec<Event> {
        self.shared.log.lock().unwrap().clone()
    }

    /// The sequence number the next request will get.
    pub fn seq(&self) -> u64 {
        *self.shared.next_seq.lock().unwrap()
    }

    /// Successful catalog pages: (seq, last) in order.
    pub fn catalog_pages(&self) -> Vec<(u64, Option<String>, Option<String>)> {
        self.events()
            .into_iter()
            .filter(|e| e.status == 200)
            .filter_map(|e| match e.kind {
                Kind::Catalog { last, n } => Some((e.seq, last, n)),
                _ => None,
            })
            .collect()
    }

    /// Manifest GETs (not HEADs): (seq, repo, reference).
    pub fn manifest_gets(&self) -> Vec<(u64, String, String)> {
        self.events()
            .into_iter()
            .filter(|e| e.method == "GET")
            .filter_map(|e| match e.kind {
                Kind::Manifest { repo, reference } => Some((e.seq, repo, reference)),
                _ => None,
            })
            .collect()
    }

    /// Blob GETs: (seq, repo, digest).
    pub fn blob_gets(&self) -> Vec<(u64, String, String)> {
        self.events()
            .into_iter()
            .filter(|e| e.method == "GET")
            .filter_map(|e| match e.kind {
                Kind::Blob { repo, digest } => Some((e.seq, repo, digest)),
                _ => None,
            })
            .collect()
    }

    /// `tags/list` requests: (seq, repo).
    pub fn tag_lists(&self) -> Vec<(u64, String)> {
        self.tag_pages().into_iter().map(|(seq, repo, _)| (seq, repo)).collect()
    }

    /// `tags/list` requests: (seq, repo, last).
    pub fn tag_pages(&self) -> Vec<(u64, String, Option<String>)> {
        self.events()
            .into_iter()
            .filter_map(|e| match e.kind {
                Kind::Tags { repo, last } => Some((e.seq, repo, last)),
                _ => None,
            })
            .collect()
    }

    /// Delays the answers to requests whose `"METHOD /path"` contains `path_contains` by `d` (`Duration::ZERO` turns
    /// it off): a slow source, to make copying slower than walking the catalog.
    pub fn delay_on(&self, path_contains: &str, d: std::time::Duration) {
        *self.shared.delay.lock().unwrap() = (!d.is_zero()).then(|| (path_contains.to_string(), d));
    }

    /// With `true`, the catalog is listed in descending order: `last=X` answers the names before X, highest first,
    /// and the `Link` carries the page's last (lowest) name. An unsorted catalog, for the walk's detection of one.
    pub fn reverse_catalog(&self, on: bool) {
        self.shared.reversed.store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Successful catalog requests per `last` asked (`None`: the catalog's start).
    pub fn catalog_lasts(&self) -> HashMap<Option<String>, usize> {
        let mut out = HashMap::new();
        for (_, last, _) in self.catalog_pages() {
            *out.entry(last).or_default() += 1;
        }
        out
    }

    /// Forgets the recorded events (sequence numbers keep counting).
    pub fn reset(&self) {
        self.shared.log.lock().unwrap().clear();
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Names.

fn per_namespace(o: &Options) -> u64 {
    o.count.div_ceil(o.namespaces.max(1)).max(1)
}

/// The name of namespace `k`: `ns{k}` with up to 10, two letters `aa`.. with more (both byte-sorted).
fn namespace(o: &Options, k: u64) -> String {
    if o.namespaces <= 10 {
        format!("ns{k}")
    } else {
        let letter = |d: u64| char::from(b'a' + d as u8);
        format!("{}{}", letter(k / 26), letter(k % 26))
    }
}

/// The namespace number of `label`, if it is one.
fn namespace_index(o: &Options, label: &str) -> Option<u64> {
    if o.namespaces <= 10 {
        let ns = label.strip_prefix("ns")?;
        return (ns.len() == 1).then(|| ns.parse().ok()).flatten();
    }
    match label.as_bytes() {
        [a @ b'a'..=b'z', b @ b'a'..=b'z'] => Some(u64::from(a - b'a') * 26 + u64::from(b - b'a')),
        _ => None,
    }
}

fn name_of(o: &Options, i: u64) -> String {
    if o.namespaces == 0 {
        format!("r{i:07}")
    } else {
        let per = per_namespace(o);
        format!("{}/r{:07}", namespace(o, i / per), i % per)
    }
}

fn index_of(o: &Options, name: &str) -> Option<u64> {
    let digits = |s: &str| -> Option<u64> {
        (s.len() == 7 && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
    };
    let i = if o.namespaces == 0 {
        digits(name.strip_prefix('r')?)?
    } else {
        let (ns, rest) = name.split_once('/')?;
        let k = namespace_index(o, ns)?;
        let j = digits(rest.strip_prefix('r')?)?;
        let per = per_namespace(o);
        if j >= per {
            return None;
        }
        k * per + j
    };
    (i < o.count).then_some(i)
}

/// The smallest position whose name sorts (byte-wise) after `last`; `count` if none.
fn first_after(o: &Options, last: &str) -> u64 {
    let (mut lo, mut hi) = (0u64, o.count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if name_of(o, mid).as_bytes() > last.as_bytes() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

/// The smallest position whose name sorts (byte-wise) at or after `last`; `count` if none.
fn first_at_or_after(o: &Options, last: &str) -> u64 {
    let (mut lo, mut hi) = (0u64, o.count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if name_of(o, mid).as_bytes() >= last.as_bytes() {
            hi = mid;
        } else {
            lo = mid + 1;
        }
    }
    lo
}

fn image_for(shared: &Shared, i: u64) -> SynImage {
    if shared.opts.unique_images {
        SynImage::build(i + 1, shared.opts.layer_size)
    } else {
        shared.common.clone()
    }
}

/// Go's `url.QueryEscape`.
fn query_escape(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------------------------
// The handler.

/// A page of `tags` (byte-sorted) after `last`, at most `n` (default and largest 1000), with a `Link` to the rest.
fn tags_page(tags: &[String], repo: &str, last: Option<&String>, n: Option<&String>) -> Response {
    let n = n.and_then(|n| n.parse::<usize>().ok()).unwrap_or(MAX_N as usize).min(MAX_N as usize);
    let start = last.map_or(0, |l| tags.partition_point(|t| t <= l));
    let end = (start + n).min(tags.len());
    let page = &tags[start..end];
    let link = (end < tags.len() && end > start)
        .then(|| format!("</v2/{repo}/tags/list?last={}&n={n}>; rel=\"next\"", query_escape(&tags[end - 1])));
    json(serde_json::json!({ "name": repo, "tags": page }).to_string(), link)
}

fn error(status: u16, code: &str, message: &str) -> Response {
    let body = serde_json::json!({"errors": [{"code": code, "message": message, "detail": null}]}).to_string();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header(header::CONTENT_LENGTH, body.len())
        .body(Body::from(body))
        .expect("response")
}

fn json(body: String, link: Option<String>) -> Response {
    let mut b = Response::builder()
        .status(200)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .header(header::CONTENT_LENGTH, body.len())
        .header("docker-distribution-api-version", "registry/2.0");
    if let Some(link) = link {
        b = b.header(header::LINK, link);
    }
    b.body(Body::from(body)).expect("response")
}

/// `(start, end)` of a `Range: bytes=a-b` / `bytes=a-` over `len` bytes.
fn parse_range(v: &str, len: u64) -> Option<(u64, u64)> {
    let spec = v.trim().strip_prefix("bytes=")?;
    let (a, b) = spec.split_once('-')?;
    if a.is_empty() {
        let suffix: u64 = b.parse().ok()?;
        return (suffix > 0 && len > 0).then(|| (len.saturating_sub(suffix), len - 1));
    }
    let a: u64 = a.parse().ok()?;
    let b: u64 = if b.is_empty() { len.checked_sub(1)? } else { b.parse::<u64>().ok()?.min(len.checked_sub(1)?) };
    (a <= b && a < len).then_some((a, b))
}

fn content(method: &Method, media_type: &str, digest: &str, bytes: &[u8], range: Option<&str>) -> Response {
    let len = bytes.len() as u64;
    let mut b = Response::builder()
        .header(header::CONTENT_TYPE, media_type)
        .header("docker-content-digest", digest)
        .header(header::ETAG, format!("\"{digest}\""))
        .header(header::ACCEPT_RANGES, "bytes");
    let (status, body) = match range.map(|r| parse_range(r, len)) {
        None => (200, bytes.to_vec()),
        Some(Some((s, e))) => {
            b = b.header(header::CONTENT_RANGE, format!("bytes {s}-{e}/{len}"));
            (206, bytes[s as usize..=e as usize].to_vec())
        }
        Some(None) => {
            return Response::builder()
                .status(416)
                .header(header::CONTENT_RANGE, format!("bytes */{len}"))
                .body(Body::empty())
                .expect("response");
        }
    };
    b = b.status(status).header(header::CONTENT_LENGTH, body.len());
    let body = if *method == Method::HEAD { Body::empty() } else { Body::from(body) };
    b.body(body).expect("response")
}

async fn handle(State(shared): State<Arc<Shared>>, Query(query): Query<HashMap<String, String>>, req: Request) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).map(str::to_string);
    let o = &shared.opts;
    let read = method == Method::GET || method == Method::HEAD;

    let (kind, resp) = if path == "/v2/" || path == "/v2" {
        (Kind::Other { path: path.clone() }, json("{}".into(), None))
    } else if path == "/v2/_catalog" {
        let kind = Kind::Catalog { last: query.get("last").cloned(), n: query.get("n").cloned() };
        let n = match query.get("n").map(|s| s.parse::<i64>()) {
            None => Ok(DEFAULT_N),
            Some(Err(_)) => Ok(DEFAULT_N),
            Some(Ok(v)) if v < 0 => Ok(DEFAULT_N),
            Some(Ok(v)) if v as u64 > MAX_N => Err(()),
            Some(Ok(v)) => Ok(v as u64),
        };
        let resp = match n {
            Err(()) => error(400, "PAGINATION_NUMBER_INVALID", "invalid number of results requested"),
            Ok(0) => json(r#"{"repositories":[]}"#.into(), None),
            Ok(n) if shared.reversed.load(std::sync::atomic::Ordering::SeqCst) => {
                // Descending: the names before `last`, highest first.
                let below = query.get("last").map(|l| first_at_or_after(o, l)).unwrap_or(o.count);
                let stop = below.saturating_sub(n);
                let names: Vec<String> = (stop..below).rev().map(|i| name_of(o, i)).collect();
                let link = (stop > 0 && below > stop)
                    .then(|| format!("</v2/_catalog?last={}&n={n}>; rel=\"next\"", query_escape(&name_of(o, stop))));
                json(serde_json::json!({ "repositories": names }).to_string(), link)
            }
            Ok(n) => {
                let start = query.get("last").map(|l| first_after(o, l)).unwrap_or(0);
                let end = (start + n).min(o.count);
                let names: Vec<String> = (start..end).map(|i| name_of(o, i)).collect();
                let link = (end < o.count && end > start).then(|| {
                    format!("</v2/_catalog?last={}&n={n}>; rel=\"next\"", query_escape(&name_of(o, end - 1)))
                });
                json(serde_json::json!({ "repositories": names }).to_string(), link)
            }
        };
        (kind, resp)
    } else if let Some(rest) = path.strip_prefix("/v2/") {
        let segs: Vec<&str> = rest.split('/').collect();
        let at = (1..segs.len().saturating_sub(1)).rev().find(|&i| matches!(segs[i], "manifests" | "blobs" | "tags" | "referrers"));
        match at {
            None => (Kind::Other { path: path.clone() }, error(404, "NOT_FOUND", "no such route")),
            Some(i) => {
                let repo = segs[..i].join("/");
                let tail = segs[i + 1..].join("/");
                let known = index_of(o, &repo);
                match segs[i] {
                    "tags" if tail == "list" => {
                        let resp = match known {
                            Some(_) if read && shared.tags.len() == 1 => {
                                json(serde_json::json!({"name": repo, "tags": shared.tags}).to_string(), None)
                            }
                            Some(_) if read => tags_page(&shared.tags, &repo, query.get("last"), query.get("n")),
                            Some(_) => error(405, "UNSUPPORTED", "read-only"),
                            None => error(404, "NAME_UNKNOWN", "repository name not known to registry"),
                        };
                        (Kind::Tags { repo, last: query.get("last").cloned() }, resp)
                    }
                    "manifests" => {
                        let resp = match known {
                            Some(_) if !read => error(405, "UNSUPPORTED", "read-only"),
                            Some(idx) => {
                                let img = image_for(&shared, idx);
                                if tail == img.digest || shared.tags.binary_search(&tail).is_ok() {
                                    content(&method, OCI_MANIFEST, &img.digest, &img.manifest, None)
                                } else {
                                    error(404, "MANIFEST_UNKNOWN", "manifest unknown")
                                }
                            }
                            None => error(404, "NAME_UNKNOWN", "repository name not known to registry"),
                        };
                        (Kind::Manifest { repo, reference: tail }, resp)
                    }
                    "blobs" => {
                        let resp = match known {
                            Some(_) if !read => error(405, "UNSUPPORTED", "read-only"),
                            Some(idx) => {
                                let img = image_for(&shared, idx);
                                if tail == img.config_digest {
                                    content(&method, "application/octet-stream", &img.config_digest, &img.config, range.as_deref())
                                } else if tail == img.layer_digest {
                                    content(&method, "application/octet-stream", &img.layer_digest, &img.layer, range.as_deref())
                                } else {
                                    error(404, "BLOB_UNKNOWN", "blob unknown to registry")
                                }
                            }
                            None => error(404, "NAME_UNKNOWN", "repository name not known to registry"),
                        };
                        (Kind::Blob { repo, digest: tail }, resp)
                    }
                    // distribution 2.8 has no referrers API.
                    _ => (Kind::Other { path: path.clone() }, error(404, "NOT_FOUND", "no such route")),
                }
            }
        }
    } else {
        (Kind::Other { path: path.clone() }, error(404, "NOT_FOUND", "no such route"))
    };

    let status = resp.status().as_u16();
    {
        let mut log = shared.log.lock().unwrap();
        let mut next = shared.next_seq.lock().unwrap();
        let seq = *next;
        *next += 1;
        log.push(Event { seq, method: method.to_string(), kind, status });
    }
    let delay = shared.delay.lock().unwrap().clone();
    if let Some((m, d)) = delay {
        if format!("{method} {path}").contains(m.as_str()) {
            tokio::time::sleep(d).await;
        }
    }
    resp
}
