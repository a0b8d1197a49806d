//! A client for upstream registries: what the pull-through cache (and later the replicator) uses to fetch.
//!
//! It speaks the distribution API with anonymous, basic or bearer-token auth (the `WWW-Authenticate` challenge
//! flow, tokens cached per scope until they expire), bounds every wait, honours `Retry-After`, and follows
//! redirects (blob CDNs) with reqwest's policy, which drops `Authorization` when the host changes.
//!
//! Credentials never reach a log: `Upstream`'s `Debug` omits them and no URL carrying them is ever built.

pub(crate) mod catalog;
pub(crate) mod challenge;
mod harbor;
mod push;
mod referrers;
pub mod realm;
pub mod stats;

pub use catalog::{AllTags, Page as ListPage};
pub use harbor::HARBOR_PAGE;
pub use push::{Mount, Posted};
pub use referrers::{fallback_tag, Referrers, RemoteReferrer};

use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, StatusCode};

use crate::bounded::BoundedMap;
use crate::oci::{Algorithm, Digest, RepoName, DOCKER_LIST, DOCKER_MANIFEST, MAX_MANIFEST_BYTES, OCI_INDEX, OCI_MANIFEST};
use crate::storage::ByteStream;

/// Settings of one upstream registry.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// The name clients use as the first path component (`HOST/NAME/repo`) and as containerd's `ns=`.
    pub name: String,
    /// Base URL, e.g. `https://registry-1.docker.io`.
    pub url: String,
    pub username: Option<String>,
    pub password: Option<crate::secret::Secret>,
    /// How long a tag fetched from upstream is trusted before it is revalidated.
    pub tag_ttl: Duration,
    /// Bound on waiting for an upstream answer (and on silence in the middle of a body).
    pub timeout: Duration,
    /// Whether un-prefixed names (mirror mode without `ns=`) go to this upstream.
    pub default: bool,
    /// Docker Hub's shorthand: a one-component name `x` means `library/x`.
    pub library_shorthand: bool,
    /// Requests per second at most (replication's `--rate`), if limited.
    pub requests_per_sec: Option<f64>,
    /// Bearer tokens cached at most (one per repository scope): a bound on the token cache's memory.
    pub token_entries: u64,
    /// PEM CA certificates trusted for this registry besides the system's roots: for one whose certificate a
    /// private CA signed.
    pub ca: Option<std::path::PathBuf>,
    /// Repository globs (`crate::pattern`) that may be proxied from this registry; empty means all. Other names
    /// are unknown to the cache, so a public cache is not an open relay to everything the upstream serves.
    pub repositories: Vec<String>,
    /// Whether a HEAD of an uncached blob starts its download (and is answered from it), as before HEADs were
    /// answered by an upstream HEAD: for clients that HEAD every blob just before they GET it, where starting
    /// early saves a round trip. Off by default: a HEAD alone (an existence check, `docker manifest inspect`,
    /// a replication's "is it there already") must not pull gigabytes that nobody asked for.
    pub prefetch_on_head: bool,
    /// Token realms (URLs, or hosts) besides the upstream's own host and registrable domain that may receive
    /// the upstream's credentials: for a registry whose token service lives on another company domain.
    pub token_realms: Vec<String>,
    /// Tag revalidations are deferred (the cached tag is served) while the upstream's `ratelimit-remaining`
    /// is at most this: the last requests of a rate-limit window are kept for what the cache does not hold.
    pub ratelimit_reserve: u64,
}

/// What an upstream last said of its rate limit (Docker Hub's `ratelimit-limit` / `ratelimit-remaining`).
#[derive(Debug, Clone, Copy)]
struct RateLimitSeen {
    remaining: u64,
    at: Instant,
}

/// How long a low `ratelimit-remaining` defers revalidations at least (then one request looks again); an
/// upstream's tag TTL is used when longer.
const RATELIMIT_MEMORY: Duration = Duration::from_secs(60);

/// The count of a rate-limit header: `100;w=21600` (Docker Hub, after the IETF RateLimit draft) or `100`.
fn ratelimit_count(headers: &HeaderMap, name: &str) -> Option<u64> {
    let v = headers.get(name)?.to_str().ok()?;
    v.split([';', ',']).next()?.trim().parse().ok()
}

/// Why an upstream request did not give what was asked.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    #[error("not found upstream")]
    NotFound,
    #[error("upstream refused our credentials: {0}")]
    Unauthorized(String),
    #[error("upstream is rate-limiting us")]
    RateLimited,
    #[error("upstream unavailable: {0}")]
    Unavailable(String),
    #[error("upstream answered something invalid: {0}")]
    Invalid(String),
    /// A 4xx other than 401/403/404/429: the request itself was refused (e.g. a manifest the registry rejects).
    #[error("{0}")]
    Refused(String),
}

/// A shared exchange (token fetch, manifest fetch, replication transfer) that panicked is, to each of its waiters,
/// an exchange that failed and may be tried again: the next try starts a new one.
impl From<crate::flight::GroupError> for UpstreamError {
    fn from(e: crate::flight::GroupError) -> Self {
        UpstreamError::Unavailable(e.to_string())
    }
}

/// A manifest as the upstream has it.
#[derive(Debug, Clone)]
pub struct RemoteManifest {
    pub digest: Digest,
    pub media_type: String,
    /// The exact bytes (absent for a HEAD).
    pub bytes: Option<Bytes>,
}

/// A blob body from upstream, starting at the requested offset (or at 0 if the upstream ignored `Range`).
pub struct RemoteBlob {
    pub total: Option<u64>,
    pub from_offset: bool,
    pub body: ByteStream,
}

#[derive(Clone)]
struct Token {
    value: String,
    expires: Instant,
}

pub struct Upstream {
    pub config: UpstreamConfig,
    base: String,
    client: reqwest::Client,
    /// Another client with the same settings, for flights' blob GETs only ([`Upstream::flight_blob`]): a
    /// flight's download runs on the download runtime (`flight::downloads`), and a client's connections are
    /// driven by the runtime that opened them, so a download must not reuse a connection that a manifest
    /// request, a replication copy or a warm run opened on the serving runtime.
    downloads: reqwest::Client,
    /// Bearer tokens by scope (`repository:NAME:pull`), at most `token_entries` of them.
    tokens: Arc<BoundedMap<String, Token>>,
    /// Set once the upstream asked for basic auth, so later requests send it up front.
    basic_preferred: Mutex<bool>,
    /// No request is sent before this instant (`Retry-After` of a 429 or 503).
    not_before: Mutex<Option<Instant>>,
    /// Spaces requests out to the configured rate, if any.
    pacer: Option<crate::pace::Pacer>,
    /// One token request per scope at a time, shared by every request that needs it.
    token_fetches: crate::flight::Group<String, Result<String, UpstreamError>>,
    /// Until when the token endpoint's refusal of our credentials is taken as the answer.
    refused_until: Mutex<Option<Instant>>,
    /// `config.repositories` compiled; `None` when every repository may be proxied.
    allowed: Option<globset::GlobSet>,
    /// Whether the warning that a realm was asked anonymously (it is not the upstream's own) was logged: once,
    /// not once per token request.
    foreign_realm_warned: std::sync::atomic::AtomicBool,
    /// The last `ratelimit-remaining` the upstream sent, and when.
    ratelimit: Mutex<Option<RateLimitSeen>>,
    /// Requests, bytes, cache answers and the last success and error, kept once for `/api/status` and the
    /// metrics (shared with token fetches and blob bodies, which outlive a borrow of the upstream).
    stats: Arc<stats::Stats>,
}


impl fmt::Debug for Upstream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.config.fmt(f)
    }
}

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";

/// `MANIFEST_ACCEPT` followed by the media ranges of `extra` it does not list already; a range that is not a
/// valid header value (it came from one, so it should be) is left out.
fn manifest_accept(extra: &[String]) -> HeaderValue {
    let mut value = MANIFEST_ACCEPT.to_string();
    for range in extra {
        let known = MANIFEST_ACCEPT.split(',').any(|t| t.trim() == range);
        if !known && HeaderValue::from_str(range).is_ok() {
            value.push_str(", ");
            value.push_str(range);
        }
    }
    HeaderValue::from_str(&value).unwrap_or_else(|_| HeaderValue::from_static(MANIFEST_ACCEPT))
}

/// How long an upstream's `Retry-After` may hold us off at most (a broken header must not disable the cache).
const MAX_RETRY_AFTER: Duration = Duration::from_secs(300);

/// How long a refusal by the token endpoint is remembered before credentials are tried again.
const AUTH_REFUSAL_MEMORY: Duration = Duration::from_secs(30);

/// The largest token response read (JWTs are a few KiB; a body beyond this is not a token answer).
const MAX_TOKEN_BODY: usize = 1 << 20;

/// The longest a token is trusted, whatever `expires_in` says (a huge value must neither overflow an `Instant`
/// nor pin a token that the endpoint may have revoked long since).
const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// A token's lifetime from its `expires_in`: the spec's default of 60 s when absent, at least 10 s, at most
/// `MAX_TOKEN_LIFETIME`.
/// The token cached for `scope`, unless it has expired (each token has its own lifetime, so expiry is checked
/// here rather than by the map).
fn live_token(tokens: &BoundedMap<String, Token>, scope: &str) -> Option<Token> {
    tokens.get(scope).filter(|t| t.expires > Instant::now())
}

/// The token for `scope` from a token request shared by every caller that needs one now (`fetch`, run only if
/// no live token is cached by the time the shared run starts), cached for its lifetime before the run ends.
///
/// A caller looks in the cache and then joins the run in flight or starts one; between those two steps a run can
/// cache its token and end. The run therefore looks in the cache again before it asks the token endpoint, so such
/// a caller gets the cached token rather than a second request.
async fn shared_token(
    tokens: &Arc<BoundedMap<String, Token>>,
    fetches: &crate::flight::Group<String, Result<String, UpstreamError>>,
    scope: &str,
    fetch: impl Future<Output = Result<(String, Duration), UpstreamError>> + Send + 'static,
) -> Result<String, UpstreamError> {
    let (tokens, key) = (Arc::clone(tokens), scope.to_string());
    let (fetched, _) = fetches
        .run(scope.to_string(), move || async move {
            if let Some(t) = live_token(&tokens, &key) {
                return Ok(t.value);
            }
            let (value, lifetime) = fetch.await?;
            tokens.insert(key, Token { value: value.clone(), expires: renew_at(Instant::now(), lifetime) });
            Ok(value)
        })
        .await;
    fetched.unwrap_or_else(|e| Err(e.into()))
}

/// `Authorization: Bearer TOKEN`, marked sensitive (kept out of debug output).
fn bearer(token: &str) -> Result<HeaderValue, UpstreamError> {
    let mut v = HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| UpstreamError::Invalid("token is not a header value".into()))?;
    v.set_sensitive(true);
    Ok(v)
}

fn token_lifetime(expires_in: Option<u64>) -> Duration {
    Duration::from_secs(expires_in.unwrap_or(60).max(10)).min(MAX_TOKEN_LIFETIME)
}

/// When a token fetched at `now` with `lifetime` is renewed: a tenth early, so that it never expires in flight.
fn renew_at(now: Instant, lifetime: Duration) -> Instant {
    let early = lifetime.saturating_sub(lifetime / 10);
    now.checked_add(early).unwrap_or(now)
}

/// Asks a token endpoint for a bearer token; returns it with its lifetime. `timeout` bounds the wait for the
/// answer and each silence in its body.
async fn fetch_token(req: reqwest::RequestBuilder, stats: Arc<stats::Stats>, timeout: Duration) -> Result<(String, Duration), UpstreamError> {
    let resp = match tokio::time::timeout(timeout, req.send()).await {
        Err(_) => return Err(UpstreamError::Unavailable(format!("token request: no answer within {timeout:?}"))),
        Ok(r) => r.map_err(|e| UpstreamError::Unavailable(format!("token request: {}", without_url(&e))))?,
    };
    stats.request("GET", resp.status().as_str());
    if resp.status() == StatusCode::UNAUTHORIZED || resp.status() == StatusCode::FORBIDDEN {
        return Err(UpstreamError::Unauthorized(format!("token endpoint answered {}", resp.status())));
    }
    if !resp.status().is_success() {
        return Err(UpstreamError::Unavailable(format!("token endpoint answered {}", resp.status())));
    }
    let body = read_limited(resp, MAX_TOKEN_BODY, timeout).await.map_err(|e| match e {
        UpstreamError::Unavailable(m) => UpstreamError::Unavailable(format!("token body: {m}")),
        other => other,
    })?;
    #[derive(serde::Deserialize)]
    struct TokenResponse {
        token: Option<String>,
        access_token: Option<String>,
        expires_in: Option<u64>,
    }
    let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| UpstreamError::Invalid(format!("token response: {e}")))?;
    let value = t.token.or(t.access_token).ok_or_else(|| UpstreamError::Invalid("token response without token".into()))?;
    Ok((value, token_lifetime(t.expires_in)))
}

/// The CA certificates of the PEM file `path`; at least one.
fn private_roots(path: &std::path::Path) -> Result<Vec<reqwest::Certificate>, UpstreamError> {
    let invalid = |what: String| UpstreamError::Invalid(format!("CA file {}: {what}", path.display()));
    let pem = std::fs::read(path).map_err(|e| invalid(e.to_string()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| invalid(e.to_string()))?;
    if certs.is_empty() {
        return Err(invalid("holds no PEM certificate".into()));
    }
    Ok(certs)
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    let d = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v).ok()?.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO),
    };
    Some(d.min(MAX_RETRY_AFTER))
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Result<Upstream, UpstreamError> {
        let roots = match &config.ca {
            Some(path) => private_roots(path)?,
            None => Vec::new(),
        };
        let build = || {
            let builder = reqwest::Client::builder()
                .connect_timeout(config.timeout)
                .user_agent(concat!("breakwater/", env!("CARGO_PKG_VERSION")));
            roots
                .iter()
                .fold(builder, |b, cert| b.add_root_certificate(cert.clone()))
                .build()
                .map_err(|e| UpstreamError::Invalid(format!("building the HTTP client: {e}")))
        };
        let (client, downloads) = (build()?, build()?);
        let base = config.url.trim_end_matches('/').to_string();
        let rate = config.requests_per_sec;
        let allowed = match config.repositories.is_empty() {
            true => None,
            false => Some(crate::pattern::glob_set(&config.repositories).map_err(|e| UpstreamError::Invalid(format!("repositories: {e}")))?),
        };
        let tokens = Arc::new(BoundedMap::new("upstream_tokens", config.token_entries, None));
        Ok(Upstream {
            base,
            client,
            downloads,
            tokens,
            basic_preferred: Mutex::new(false),
            not_before: Mutex::new(None),
            pacer: rate.filter(|r| *r > 0.0).map(crate::pace::Pacer::per_second),
            token_fetches: crate::flight::Group::default(),
            refused_until: Mutex::new(None),
            allowed,
            foreign_realm_warned: std::sync::atomic::AtomicBool::new(false),
            ratelimit: Mutex::new(None),
            stats: Arc::new(stats::Stats::new(&config.name)),
            config,
        })
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// Whether the operator lets `repo` (a name on this registry) be proxied.
    pub fn allows(&self, repo: &RepoName) -> bool {
        self.allowed.as_ref().is_none_or(|set| set.is_match(repo.as_str()))
    }

    fn count(&self, method: &Method, status: &str) {
        self.stats.request(method.as_str(), status);
    }

    /// What this upstream has done: requests, bytes, cache answers, last success and error (shared: a blob
    /// streamed to a client counts its bytes as they go).
    pub fn stats(&self) -> &Arc<stats::Stats> {
        &self.stats
    }

    /// The last `ratelimit-remaining` the upstream sent, if it ever sent one.
    pub fn ratelimit_remaining(&self) -> Option<u64> {
        self.ratelimit.lock().unwrap_or_else(|p| p.into_inner()).map(|s| s.remaining)
    }

    fn basic_header(&self) -> Option<HeaderValue> {
        let (user, pass) = (self.config.username.as_ref()?, self.config.password.as_deref().unwrap_or(""));
        let mut v = HeaderValue::from_str(&format!("Basic {}", base64(&format!("{user}:{pass}")))).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// Bearer tokens held now.
    pub fn cached_tokens(&self) -> u64 {
        self.tokens.len()
    }

    fn cached_token(&self, scope: &str) -> Option<HeaderValue> {
        bearer(&live_token(&self.tokens, scope)?.value).ok()
    }

    /// Authorization to send up front for `scope`, from what earlier challenges taught us.
    fn known_auth(&self, scope: &str) -> Option<HeaderValue> {
        if *self.basic_preferred.lock().unwrap_or_else(|p| p.into_inner()) {
            return self.basic_header();
        }
        self.cached_token(scope)
    }

    /// Answers a 401's challenge: returns the Authorization to retry with.
    /// `refused` is the Authorization the upstream just answered 401 to, if any: a token it no longer accepts
    /// (revoked, or expired early) is dropped from the cache rather than offered again.
    async fn authorize(&self, challenge: &str, scope: &str, refused: Option<&HeaderValue>) -> Result<HeaderValue, UpstreamError> {
        let c = challenge::parse(challenge).ok_or_else(|| UpstreamError::Invalid(format!("unparsable challenge {challenge:?}")))?;
        match c.scheme.as_str() {
            "basic" => {
                *self.basic_preferred.lock().unwrap_or_else(|p| p.into_inner()) = true;
                self.basic_header().ok_or_else(|| UpstreamError::Unauthorized("upstream wants credentials; none are configured".into()))
            }
            "bearer" => {
                if let Some(until) = *self.refused_until.lock().unwrap_or_else(|p| p.into_inner()) {
                    if Instant::now() < until {
                        return Err(UpstreamError::Unauthorized("the token endpoint refused our credentials moments ago".into()));
                    }
                }
                let realm = c.params.get("realm").ok_or_else(|| UpstreamError::Invalid("bearer challenge without realm".into()))?.clone();
                let mut query: Vec<(String, String)> = Vec::new();
                if let Some(service) = c.params.get("service") {
                    query.push(("service".into(), service.clone()));
                }
                query.push(("scope".into(), c.params.get("scope").cloned().unwrap_or_else(|| scope.to_string())));
                let req = self.client.get(&realm).query(&query);
                let req = match self.basic_header() {
                    Some(basic) if self.realm_is_ours(&realm) => req.header(header::AUTHORIZATION, basic),
                    _ => req,
                };
                if let Some(refused) = refused {
                    // Only the token that was refused goes: another request may have cached a fresh one already.
                    self.tokens.remove_if(&scope.to_string(), |t| refused.as_bytes() == format!("Bearer {}", t.value).as_bytes());
                }
                // A request that was answered 401 just before another one obtained a token finds it here.
                if let Some(v) = self.cached_token(scope) {
                    return Ok(v);
                }
                let fetch = fetch_token(req, Arc::clone(&self.stats), self.config.timeout);
                let value = match shared_token(&self.tokens, &self.token_fetches, scope, fetch).await {
                    Ok(value) => value,
                    Err(e) => {
                        if matches!(e, UpstreamError::Unauthorized(_)) {
                            // Do not knock again at once: a refused login per request is how accounts get locked.
                            *self.refused_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + AUTH_REFUSAL_MEMORY);
                        }
                        return Err(e);
                    }
                };
                bearer(&value)
            }
            other => Err(UpstreamError::Unauthorized(format!("unsupported auth scheme {other}"))),
        }
    }

    /// Whether our credentials may go to the token realm `realm` (see `realm.rs`); warns once when they may not
    /// (the token is then asked for anonymously, which suffices for public images).
    fn realm_is_ours(&self, realm: &str) -> bool {
        if realm::may_send_credentials(&self.config.url, realm, &self.config.token_realms) {
            return true;
        }
        if !self.foreign_realm_warned.swap(true, std::sync::atomic::Ordering::Relaxed) {
            // The realm's host only: its query may carry anything.
            let host = reqwest::Url::parse(realm).ok().and_then(|u| u.host_str().map(str::to_string)).unwrap_or_default();
            tracing::warn!(upstream = self.config.name, realm_host = %host,
                "the token realm is neither the upstream's host nor its domain nor in token_realms; asking for tokens anonymously");
        }
        false
    }

    /// Sends `method path` for `repo` with pull rights, answering one auth challenge, and classifies failures.
    async fn send(&self, method: Method, repo: &RepoName, path: &str, headers: HeaderMap) -> Result<reqwest::Response, UpstreamError> {
        self.exchange(method, &format!("repository:{repo}:pull"), path, headers, None).await
    }

    /// [`Upstream::send`] of a GET through `client`.
    async fn get_with(&self, client: &reqwest::Client, repo: &RepoName, path: &str, headers: HeaderMap) -> Result<reqwest::Response, UpstreamError> {
        let scope = format!("repository:{repo}:pull");
        self.exchange_watched(client, Method::GET, &scope, path, headers, None, None).await
    }

    /// Sends a request needing `scope` (a token scope such as `repository:x:pull,push`). `target` is a path on
    /// the registry or an absolute URL (an upload `Location`). A 401 is answered once: with a byte body the
    /// request is replayed; a streamed body cannot be, so callers stream only after a bodiless request (the
    /// upload's POST) has settled the credentials.
    pub(crate) async fn exchange(
        &self,
        method: Method,
        scope: &str,
        target: &str,
        headers: HeaderMap,
        body: Option<reqwest::Body>,
    ) -> Result<reqwest::Response, UpstreamError> {
        self.exchange_watched(&self.client, method, scope, target, headers, body, None).await
    }

    /// [`Upstream::exchange`] with a streamed body (an upload). The request may take as long as the body
    /// keeps moving: it fails when the registry stops taking bytes for the timeout, or does not answer within
    /// the timeout once it has them all.
    pub(crate) async fn exchange_stream(
        &self,
        method: Method,
        scope: &str,
        target: &str,
        headers: HeaderMap,
        body: ByteStream,
    ) -> Result<reqwest::Response, UpstreamError> {
        let watch = Arc::new(UploadWatch::new());
        let body = reqwest::Body::wrap_stream(WatchedBody { inner: body, watch: Arc::clone(&watch) });
        self.exchange_watched(&self.client, method, scope, target, headers, Some(body), Some(watch)).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn exchange_watched(
        &self,
        client: &reqwest::Client,
        method: Method,
        scope: &str,
        target: &str,
        headers: HeaderMap,
        mut body: Option<reqwest::Body>,
        mut watch: Option<Arc<UploadWatch>>,
    ) -> Result<reqwest::Response, UpstreamError> {
        // Whether the upstream answered (its last success) or not (its last error: unreachable, 5xx, 429,
        // credentials refused, an answer that makes no sense), whichever way the exchange below ends.
        let result = async {
            if let Some(t) = *self.not_before.lock().unwrap_or_else(|p| p.into_inner()) {
                if Instant::now() < t {
                    return Err(UpstreamError::RateLimited);
                }
            }
            if let Some(pacer) = &self.pacer {
                pacer.spend(1.0).await;
            }
            let absolute = target.starts_with("http://") || target.starts_with("https://");
            let url = if absolute { target.to_string() } else { format!("{}{target}", self.base) };
            // An upload `Location` may point at another host (a storage service); our credentials stay with the
            // registry they belong to.
            let foreign = absolute && origin(target) != origin(&self.base);
            let mut auth = if foreign { None } else { self.known_auth(scope) };
            for attempt in 0..2 {
                let replay = body.as_ref().and_then(|b| b.as_bytes()).map(Bytes::copy_from_slice);
                let mut req = client.request(method.clone(), &url).headers(headers.clone());
                if let Some(a) = &auth {
                    req = req.header(header::AUTHORIZATION, a.clone());
                }
                if let Some(b) = body.take() {
                    req = req.body(b);
                }
                let timeout = self.config.timeout;
                let answer = match &watch {
                    None => tokio::time::timeout(timeout, req.send()).await.map_err(|_| format!("no answer within {timeout:?}")),
                    Some(w) => tokio::select! {
                        r = req.send() => Ok(r),
                        stalled = w.stalled(timeout) => Err(stalled),
                    },
                };
                let resp = match answer {
                    Err(why) => {
                        self.count(&method, "timeout");
                        return Err(UpstreamError::Unavailable(why));
                    }
                    Ok(Err(e)) => {
                        self.count(&method, "error");
                        return Err(UpstreamError::Unavailable(without_url(&e)));
                    }
                    Ok(Ok(r)) => r,
                };
                let status = resp.status();
                self.count(&method, status.as_str());
                self.observe_ratelimit(resp.headers());
                if status == StatusCode::UNAUTHORIZED && attempt == 0 && !foreign {
                    let challenge = resp.headers().get(header::WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).map(str::to_string);
                    match challenge {
                        Some(c) => {
                            auth = Some(self.authorize(&c, scope, auth.as_ref()).await?);
                            body = replay.map(reqwest::Body::from);
                            // A streamed body is not replayed, so nothing is left to watch: the plain timeout applies.
                            watch = None;
                            continue;
                        }
                        None => return Err(UpstreamError::Unauthorized("401 without a challenge".into())),
                    }
                }
                if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::SERVICE_UNAVAILABLE {
                    if let Some(wait) = retry_after(resp.headers()) {
                        *self.not_before.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + wait);
                    }
                }
                return match status {
                    s if s.is_success() => Ok(resp),
                    StatusCode::NOT_FOUND => Err(UpstreamError::NotFound),
                    s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                        Err(UpstreamError::Unauthorized(format!("upstream answered {s}")))
                    }
                    StatusCode::TOO_MANY_REQUESTS => Err(UpstreamError::RateLimited),
                    s if s.is_server_error() => Err(UpstreamError::Unavailable(format!("upstream answered {s}"))),
                    s => {
                        let text = read_limited(resp, 64 * 1024, timeout).await.unwrap_or_default();
                        let text = String::from_utf8_lossy(&text);
                        Err(UpstreamError::Refused(format!("{method} answered {s}: {}", text.chars().take(300).collect::<String>())))
                    }
                };
            }
            Err(UpstreamError::Unauthorized("credentials refused after the challenge was answered".into()))
        }
        .await;
        match &result {
            Ok(_) | Err(UpstreamError::NotFound | UpstreamError::Refused(_)) => self.stats.succeeded(),
            Err(e) => self.stats.failed(e.to_string()),
        }
        result
    }

    /// Records the rate-limit headers of an answer: as gauges, and the remaining count for `ratelimit_low`.
    fn observe_ratelimit(&self, headers: &HeaderMap) {
        let upstream = self.config.name.clone();
        if let Some(limit) = ratelimit_count(headers, "ratelimit-limit") {
            metrics::gauge!("breakwater_upstream_ratelimit_limit", "upstream" => upstream.clone()).set(limit as f64);
        }
        if let Some(remaining) = ratelimit_count(headers, "ratelimit-remaining") {
            metrics::gauge!("breakwater_upstream_ratelimit_remaining", "upstream" => upstream).set(remaining as f64);
            *self.ratelimit.lock().unwrap_or_else(|p| p.into_inner()) = Some(RateLimitSeen { remaining, at: Instant::now() });
        }
    }

    /// Whether the upstream said recently that at most `ratelimit_reserve` requests remain in its window, so a
    /// request that can be done without (a tag revalidation) should be. "Recently" is the tag TTL, at least
    /// `RATELIMIT_MEMORY`: after that one request is spent to learn the count again (every answer carries it).
    pub fn ratelimit_low(&self) -> bool {
        let seen = *self.ratelimit.lock().unwrap_or_else(|p| p.into_inner());
        let memory = self.config.tag_ttl.max(RATELIMIT_MEMORY);
        seen.is_some_and(|s| s.remaining <= self.config.ratelimit_reserve && s.at.elapsed() < memory)
    }

    /// How long requests are held off by a `Retry-After`, if they are.
    pub fn retry_after_remaining(&self) -> Option<Duration> {
        let t = (*self.not_before.lock().unwrap_or_else(|p| p.into_inner()))?;
        t.checked_duration_since(Instant::now())
    }

    /// GETs (or HEADs) the manifest `reference` of `repo`. A GET's bytes are verified against the digest the
    /// reference names, or hashed to find it.
    pub async fn manifest(&self, repo: &RepoName, reference: &str, head: bool) -> Result<RemoteManifest, UpstreamError> {
        self.manifest_accepting(repo, reference, head, &[]).await
    }

    /// [`Upstream::manifest`], accepting the media ranges `extra` (a client's `Accept`, forwarded) after every
    /// type breakwater stores, which always come first so that the answer is one it can keep.
    pub async fn manifest_accepting(
        &self,
        repo: &RepoName,
        reference: &str,
        head: bool,
        extra: &[String],
    ) -> Result<RemoteManifest, UpstreamError> {
        let mut h = HeaderMap::new();
        h.insert(header::ACCEPT, manifest_accept(extra));
        let method = if head { Method::HEAD } else { Method::GET };
        let resp = self.send(method, repo, &format!("/v2/{repo}/manifests/{reference}"), h).await?;
        let media_type = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or("").trim().to_string())
            .unwrap_or_default();
        let header_digest = resp
            .headers()
            .get("docker-content-digest")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<Digest>().ok());
        if head {
            let digest = header_digest.ok_or_else(|| UpstreamError::Invalid("HEAD without Docker-Content-Digest".into()))?;
            return Ok(RemoteManifest { digest, media_type, bytes: None });
        }
        if resp.content_length().is_some_and(|l| l > MAX_MANIFEST_BYTES as u64) {
            return Err(UpstreamError::Invalid("manifest larger than 4 MiB".into()));
        }
        let bytes = read_limited(resp, MAX_MANIFEST_BYTES, self.config.timeout).await?;
        let digest = match reference.parse::<Digest>() {
            Ok(want) => {
                let got = Digest::of(want.algorithm(), &bytes);
                if got != want {
                    return Err(UpstreamError::Invalid(format!("manifest digest is {got}, not {want}")));
                }
                got
            }
            Err(_) => {
                let alg = header_digest.as_ref().map_or(Algorithm::Sha256, Digest::algorithm);
                Digest::of(alg, &bytes)
            }
        };
        let media_type = if [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST].contains(&media_type.as_str()) {
            media_type
        } else {
            // Some registries label manifests application/json; the body says what it is.
            crate::oci::ManifestInfo::parse(&bytes, None).map(|m| m.media_type).map_err(UpstreamError::Invalid)?
        };
        Ok(RemoteManifest { digest, media_type, bytes: Some(bytes) })
    }

    /// HEADs blob `digest` of `repo`: its size, without its bytes. A `Docker-Content-Digest` other than `digest`
    /// is an invalid answer (the size would be another blob's).
    pub async fn blob_head(&self, repo: &RepoName, digest: &Digest) -> Result<u64, UpstreamError> {
        let resp = self.send(Method::HEAD, repo, &format!("/v2/{repo}/blobs/{digest}"), HeaderMap::new()).await?;
        let named = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok());
        if let Some(named) = named.filter(|n| n.trim() != digest.to_string()) {
            return Err(UpstreamError::Invalid(format!("HEAD of {digest} answered the digest {named}")));
        }
        // Read from the header itself: for a HEAD, reqwest's `content_length` is that of the (empty) body.
        resp.headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| UpstreamError::Invalid(format!("HEAD of {digest} without a Content-Length")))
    }

    /// GETs blob `digest` of `repo` from byte `offset` on. The body is streamed; a silence longer than the
    /// timeout ends it with an error (so the caller can resume).
    pub async fn blob(&self, repo: &RepoName, digest: &Digest, offset: u64) -> Result<RemoteBlob, UpstreamError> {
        self.blob_with(&self.client, repo, digest, offset).await
    }

    /// [`Upstream::blob`] for a flight's download, which runs on `flight::downloads`: through the client whose
    /// connections that runtime opened and drives (see `downloads`).
    pub async fn flight_blob(&self, repo: &RepoName, digest: &Digest, offset: u64) -> Result<RemoteBlob, UpstreamError> {
        self.blob_with(&self.downloads, repo, digest, offset).await
    }

    async fn blob_with(&self, client: &reqwest::Client, repo: &RepoName, digest: &Digest, offset: u64) -> Result<RemoteBlob, UpstreamError> {
        let mut h = HeaderMap::new();
        if offset > 0 {
            if let Ok(v) = HeaderValue::from_str(&format!("bytes={offset}-")) {
                h.insert(header::RANGE, v);
            }
        }
        let resp = self.get_with(client, repo, &format!("/v2/{repo}/blobs/{digest}"), h).await?;
        let partial = resp.status() == StatusCode::PARTIAL_CONTENT;
        let total = if partial {
            let value = resp.headers().get(header::CONTENT_RANGE).and_then(|v| v.to_str().ok()).unwrap_or("");
            let range = content_range(value).ok_or_else(|| UpstreamError::Invalid(format!("Content-Range {value:?}")))?;
            // Bytes from anywhere but the offset asked for would be spliced in at the wrong place.
            if range.start != offset || resp.content_length().is_some_and(|l| Some(l) != range.len()) {
                return Err(UpstreamError::Invalid(format!("Content-Range {value:?} does not answer bytes={offset}-")));
            }
            range.total
        } else {
            resp.content_length()
        };
        let stats = Arc::clone(&self.stats);
        let idle = self.config.timeout;
        let stream = resp.bytes_stream();
        let body = futures_util::stream::unfold(Some(stream), move |s| {
            let stats = Arc::clone(&stats);
            async move {
                let mut s = s?;
                match tokio::time::timeout(idle, s.next()).await {
                    Err(_) => Some((Err(std::io::Error::other(format!("upstream silent for {idle:?}"))), None)),
                    Ok(None) => None,
                    Ok(Some(Err(e))) => Some((Err(std::io::Error::other(without_url(&e))), None)),
                    Ok(Some(Ok(b))) => {
                        stats.fetched(b.len() as u64);
                        Some((Ok(b), Some(s)))
                    }
                }
            }
        });
        Ok(RemoteBlob { total, from_offset: partial, body: Box::pin(body) })
    }
}

/// A `Content-Range: bytes START-END/TOTAL` (TOTAL may be `*`), checked to be a range within the total.
#[derive(Debug, PartialEq, Eq)]
struct ContentRange {
    start: u64,
    /// Inclusive.
    end: u64,
    total: Option<u64>,
}

impl ContentRange {
    /// How many bytes the range holds; `None` if that does not fit a u64 (`0-18446744073709551615`).
    fn len(&self) -> Option<u64> {
        (self.end - self.start).checked_add(1)
    }
}

fn content_range(value: &str) -> Option<ContentRange> {
    let (range, total) = value.trim().strip_prefix("bytes ")?.split_once('/')?;
    let (start, end) = range.split_once('-')?;
    let (start, end) = (start.trim().parse::<u64>().ok()?, end.trim().parse::<u64>().ok()?);
    let total = match total.trim() {
        "*" => None,
        t => Some(t.parse::<u64>().ok()?),
    };
    if start > end || total.is_some_and(|t| end >= t) {
        return None;
    }
    Some(ContentRange { start, end, total })
}

/// How far a streamed request body has got: waiting on its source (whose own timeouts bound it), handed to the
/// connection and waiting for it to take the next chunk, or all sent and waiting for the answer.
struct UploadWatch {
    stage: Mutex<(UploadStage, Instant)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum UploadStage {
    Source,
    Writer,
    Sent,
}

impl UploadWatch {
    /// Starts as waiting on the connection: it must begin taking the body within the timeout.
    fn new() -> UploadWatch {
        UploadWatch { stage: Mutex::new((UploadStage::Writer, Instant::now())) }
    }

    fn set(&self, stage: UploadStage) {
        *self.stage.lock().unwrap_or_else(|p| p.into_inner()) = (stage, Instant::now());
    }

    /// Resolves, with the reason, once the connection has taken nothing for `timeout`, or the answer has not come
    /// within `timeout` of the last byte.
    async fn stalled(&self, timeout: Duration) -> String {
        loop {
            let (stage, since) = *self.stage.lock().unwrap_or_else(|p| p.into_inner());
            let at = since.checked_add(timeout).unwrap_or_else(|| since + Duration::from_secs(365 * 24 * 3600));
            if stage != UploadStage::Source && Instant::now() >= at {
                return match stage {
                    UploadStage::Sent => format!("no answer within {timeout:?} of the upload's end"),
                    _ => format!("the registry took no upload bytes for {timeout:?}"),
                };
            }
            // Waiting on the source: look again later (the stage changes without waking us).
            let next = if stage == UploadStage::Source { Instant::now() + timeout.min(Duration::from_secs(1)) } else { at };
            tokio::time::sleep_until(next.into()).await;
        }
    }
}

/// An upload body that reports its progress to an `UploadWatch`.
struct WatchedBody {
    inner: ByteStream,
    watch: Arc<UploadWatch>,
}

impl futures_util::Stream for WatchedBody {
    type Item = std::io::Result<Bytes>;

    fn poll_next(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let r = self.inner.as_mut().poll_next(cx);
        match &r {
            Poll::Pending => self.watch.set(UploadStage::Source),
            Poll::Ready(Some(_)) => self.watch.set(UploadStage::Writer),
            Poll::Ready(None) => self.watch.set(UploadStage::Sent),
        }
        r
    }
}

/// `scheme://host[:port]` of a URL.
fn origin(url: &str) -> &str {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let end = url[after_scheme..].find('/').map_or(url.len(), |i| after_scheme + i);
    &url[..end]
}

/// Reads a response body of at most `limit` bytes.
async fn read_limited(resp: reqwest::Response, limit: usize, idle: Duration) -> Result<Bytes, UpstreamError> {
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    loop {
        match tokio::time::timeout(idle, stream.next()).await {
            Err(_) => return Err(UpstreamError::Unavailable(format!("upstream silent for {idle:?}"))),
            Ok(None) => return Ok(out.into()),
            Ok(Some(Err(e))) => return Err(UpstreamError::Unavailable(without_url(&e))),
            Ok(Some(Ok(b))) => {
                if out.len() + b.len() > limit {
                    return Err(UpstreamError::Invalid(format!("body larger than {limit} bytes")));
                }
                out.extend_from_slice(&b);
            }
        }
    }
}

/// A reqwest error's text without its URL (a URL could carry a token in its query).
fn without_url(e: &reqwest::Error) -> String {
    let mut s = e.to_string();
    if let Some(url) = e.url() {
        s = s.replace(url.as_str(), "<url>");
    }
    let kind = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "request"
    };
    format!("{kind}: {s}")
}

/// Standard base64, for the basic `Authorization` header (the one place we need it).
fn base64(input: &str) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = input.as_bytes();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (b[0] as u32) << 16 | (b[1] as u32) << 8 | b[2] as u32;
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_token_run_takes_a_token_cached_before_it_started() {
        let tokens = Arc::new(BoundedMap::new("upstream_token", 10, None));
        let fetches = crate::flight::Group::default();
        let scope = "repository:team/app:pull";
        // Cached by a run that ended after this caller found the cache empty and before it started its own run.
        tokens.insert(scope.to_string(), Token { value: "cached".into(), expires: Instant::now() + Duration::from_secs(60) });
        let asked = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = Arc::clone(&asked);
        let fetch = async move {
            counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(("fresh".to_string(), Duration::from_secs(60)))
        };
        assert_eq!(shared_token(&tokens, &fetches, scope, fetch).await.unwrap(), "cached");
        assert_eq!(asked.load(std::sync::atomic::Ordering::SeqCst), 0, "the token endpoint was not asked again");

        // An expired token is no answer: the endpoint is asked, and its token cached.
        tokens.insert(scope.to_string(), Token { value: "old".into(), expires: Instant::now() });
        let fetch = async { Ok(("fresh".to_string(), Duration::from_secs(60))) };
        assert_eq!(shared_token(&tokens, &fetches, scope, fetch).await.unwrap(), "fresh");
        assert_eq!(live_token(&tokens, scope).map(|t| t.value).as_deref(), Some("fresh"));
    }

    #[test]
    fn origins() {
        assert_eq!(origin("http://a:5000/v2/x?y=z"), "http://a:5000");
        assert_eq!(origin("https://a"), "https://a");
        assert_ne!(origin("http://a:5000/u"), origin("http://a:5001/u"));
    }

    #[test]
    fn manifest_accept_puts_the_stored_types_first_and_adds_the_clients() {
        assert_eq!(manifest_accept(&[]).to_str().unwrap(), MANIFEST_ACCEPT);
        let extra = ["*/*".to_string(), DOCKER_MANIFEST.to_string(), "application/vnd.example+json".to_string()];
        assert_eq!(
            manifest_accept(&extra).to_str().unwrap(),
            format!("{MANIFEST_ACCEPT}, */*, application/vnd.example+json")
        );
        assert_eq!(manifest_accept(&["bad\nvalue".to_string()]).to_str().unwrap(), MANIFEST_ACCEPT);
    }

    #[test]
    fn ratelimit_headers() {
        let mut h = HeaderMap::new();
        h.insert("ratelimit-limit", HeaderValue::from_static("100;w=21600"));
        h.insert("ratelimit-remaining", HeaderValue::from_static(" 7 ;w=21600"));
        assert_eq!(ratelimit_count(&h, "ratelimit-limit"), Some(100));
        assert_eq!(ratelimit_count(&h, "ratelimit-remaining"), Some(7));
        h.insert("ratelimit-remaining", HeaderValue::from_static("0"));
        assert_eq!(ratelimit_count(&h, "ratelimit-remaining"), Some(0));
        h.insert("ratelimit-remaining", HeaderValue::from_static("lots"));
        assert_eq!(ratelimit_count(&h, "ratelimit-remaining"), None);
        assert_eq!(ratelimit_count(&h, "absent"), None);
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(""), "");
        assert_eq!(base64("f"), "Zg==");
        assert_eq!(base64("fo"), "Zm8=");
        assert_eq!(base64("foo"), "Zm9v");
        assert_eq!(base64("user:pa:ss"), "dXNlcjpwYTpzcw==");
    }

    #[test]
    fn content_ranges_are_checked_without_overflow() {
        let max = u64::MAX;
        assert_eq!(content_range("bytes 5-9/10"), Some(ContentRange { start: 5, end: 9, total: Some(10) }));
        assert_eq!(content_range("bytes 5-9/*").map(|r| r.total), Some(None));
        assert_eq!(content_range(&format!("bytes 0-{}/{max}", max - 1)).and_then(|r| r.len()), Some(max));
        // The whole u64 range has a length that does not fit a u64: no panic, no wrap to 0.
        assert_eq!(content_range(&format!("bytes 0-{max}/*")).map(|r| r.len()), Some(None));
        assert_eq!(content_range(&format!("bytes {max}-{max}/*")).and_then(|r| r.len()), Some(1));
        assert_eq!(content_range(&format!("bytes 0-{max}/{max}")), None, "end beyond the total");
        assert_eq!(content_range("bytes 0-18446744073709551616/*"), None, "beyond u64");
        assert_eq!(content_range("bytes 9-5/10"), None);
        assert_eq!(content_range("bytes 5-/10"), None);
        assert_eq!(content_range("items 0-1/2"), None);
        assert_eq!(content_range("bytes 0-1"), None);
    }

    #[test]
    fn token_lifetimes_from_any_expires_in() {
        assert_eq!(token_lifetime(None), Duration::from_secs(60));
        assert_eq!(token_lifetime(Some(0)), Duration::from_secs(10));
        assert_eq!(token_lifetime(Some(300)), Duration::from_secs(300));
        assert_eq!(token_lifetime(Some(u64::MAX)), MAX_TOKEN_LIFETIME);
        let now = Instant::now();
        let at = renew_at(now, token_lifetime(Some(u64::MAX)));
        assert!(at > now && at < now + MAX_TOKEN_LIFETIME);
        // Even an unclamped lifetime saturates instead of panicking.
        assert_eq!(renew_at(now, Duration::MAX), now);
    }

    #[test]
    fn retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        let later = SystemTime::now() + Duration::from_secs(120);
        h.insert(header::RETRY_AFTER, HeaderValue::from_str(&httpdate::fmt_http_date(later)).unwrap());
        let d = retry_after(&h).unwrap();
        assert!(d > Duration::from_secs(100) && d <= Duration::from_secs(120), "{d:?}");
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("999999"));
        assert_eq!(retry_after(&h), Some(MAX_RETRY_AFTER));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h), None);
    }
}
