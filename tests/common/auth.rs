//! A small Docker-style token server for tests of registry authentication.
//!
//! `TokenServer` answers `GET /token?service=...&scope=...` the way Docker Hub's `auth.docker.io` does: with HTTP
//! Basic credentials (or anonymously, for a server made with [`TokenServer::anonymous`]) it issues an opaque bearer
//! token for the requested scopes, as `{"token", "access_token", "expires_in", "issued_at"}`; wrong or missing
//! credentials get a 401. It runs on its own thread with its own tokio runtime (like [`super::relay::Relay`]), so it
//! works from plain `#[test]`s and from `#[tokio::test]`s alike, and stops when dropped.
//!
//! It is meant to sit next to a [`super::relay::Relay`] with `relay.require_bearer(&token_server)`: the relay
//! challenges clients with `WWW-Authenticate: Bearer realm="http://TOKEN_ADDR/token",...` and checks the tokens
//! presented against this server ([`TokenServer::validate`]). Tokens expire `ttl` after issue (exactly, to the
//! millisecond; `expires_in` is that rounded up to whole seconds), and [`TokenServer::revoke_all`] invalidates every
//! token at once, to test that a client re-authenticates after a 401.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::relay::Background;

/// One request the token server answered.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// The `service` parameter, if any.
    pub service: Option<String>,
    /// Every `scope` parameter, as sent (e.g. `repository:library/alpine:pull`).
    pub scopes: Vec<String>,
    /// Whether the request carried an `Authorization` header.
    pub authorization: bool,
    /// Whether a token was issued.
    pub granted: bool,
}

#[derive(Clone, Debug)]
struct Scope {
    kind: String,
    name: String,
    actions: Vec<String>,
}

fn parse_scope(s: &str) -> Option<Scope> {
    // `repository:name/with/slashes:pull,push` (names may contain ':' only in a port, which registries forbid).
    let (kind, rest) = s.split_once(':')?;
    let (name, actions) = rest.rsplit_once(':')?;
    Some(Scope {
        kind: kind.to_string(),
        name: name.to_string(),
        actions: actions.split(',').filter(|a| !a.is_empty()).map(str::to_string).collect(),
    })
}

struct Grant {
    scopes: Vec<Scope>,
    expires: Instant,
}

/// The token table shared between a [`TokenServer`] and the relays that check its tokens.
pub struct TokenState {
    /// `Some("Basic base64(user:pass)")`, or `None` for an anonymous server.
    expected: Option<String>,
    ttl: Duration,
    tokens: Mutex<HashMap<String, Grant>>,
    issued: AtomicUsize,
    denied: AtomicUsize,
    log: Mutex<Vec<TokenRequest>>,
}

impl TokenState {
    /// True if `token` was issued by this server, has not expired or been revoked, and grants every action in
    /// `actions` on `repository:<repo>` (an action `*` grants all). With `repo == None`, any live token will do
    /// (for `/v2/` and the like).
    pub fn check(&self, token: &str, repo: Option<&str>, actions: &[&str]) -> bool {
        let tokens = self.tokens.lock().unwrap();
        let Some(grant) = tokens.get(token) else {
            return false;
        };
        if Instant::now() >= grant.expires {
            return false;
        }
        let Some(repo) = repo else { return true };
        actions.iter().all(|wanted| {
            grant.scopes.iter().any(|s| s.kind == "repository" && s.name == repo && s.actions.iter().any(|a| a == wanted || a == "*"))
        })
    }
}

/// A running token server; stops when dropped.
pub struct TokenServer {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    state: Arc<TokenState>,
    _background: Background,
}

impl TokenServer {
    /// A token server that issues tokens only to HTTP Basic `user:pass`; tokens live for `ttl`.
    pub fn start(user: &str, pass: &str, ttl: Duration) -> TokenServer {
        Self::start_inner(Some(format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))), ttl)
    }

    /// A token server that issues tokens to anyone (credentials, if sent, are ignored), like Docker Hub does for
    /// public images.
    pub fn anonymous(ttl: Duration) -> TokenServer {
        Self::start_inner(None, ttl)
    }

    fn start_inner(expected: Option<String>, ttl: Duration) -> TokenServer {
        let state = Arc::new(TokenState {
            expected,
            ttl,
            tokens: Mutex::new(HashMap::new()),
            issued: AtomicUsize::new(0),
            denied: AtomicUsize::new(0),
            log: Mutex::new(Vec::new()),
        });
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind token server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr").to_string();
        let app_state = state.clone();
        let background = Background::spawn("token-server", 1, move || async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("tokio listener");
            let app = Router::new().route("/token", get(token)).with_state(app_state);
            let _ = axum::serve(listener, app).await;
        });
        TokenServer { addr, state, _background: background }
    }

    /// The realm to put in a `WWW-Authenticate: Bearer realm="..."` challenge: `http://ADDR/token`.
    pub fn realm(&self) -> String {
        format!("http://{}/token", self.addr)
    }

    /// How many tokens were issued.
    pub fn issued(&self) -> usize {
        self.state.issued.load(Ordering::SeqCst)
    }

    /// How many token requests were refused (wrong or missing credentials).
    pub fn denied(&self) -> usize {
        self.state.denied.load(Ordering::SeqCst)
    }

    /// Every token request so far, in order.
    pub fn requests(&self) -> Vec<TokenRequest> {
        self.state.log.lock().unwrap().clone()
    }

    /// True if `token` is live and grants `pull` on `repository:<repo>`.
    pub fn validate(&self, token: &str, repo: &str) -> bool {
        self.state.check(token, Some(repo), &["pull"])
    }

    /// Forgets every token issued so far (clients presenting one get 401 from a relay that requires bearer auth).
    pub fn revoke_all(&self) {
        self.state.tokens.lock().unwrap().clear();
    }

    /// The shared token table, for [`super::relay::Relay::require_bearer`].
    pub fn state(&self) -> Arc<TokenState> {
        self.state.clone()
    }
}

async fn token(State(state): State<Arc<TokenState>>, Query(params): Query<Vec<(String, String)>>, headers: HeaderMap) -> Response {
    let presented = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    let service = params.iter().find(|(k, _)| k == "service").map(|(_, v)| v.clone());
    let scopes: Vec<String> = params
        .iter()
        .filter(|(k, _)| k == "scope")
        .flat_map(|(_, v)| v.split(' ').filter(|s| !s.is_empty()).map(str::to_string).collect::<Vec<_>>())
        .collect();
    let ok = match &state.expected {
        None => true,
        Some(expected) => presented.is_some_and(|p| {
            // The scheme is case-insensitive; the credentials are not.
            p.len() == expected.len() && p[..6].eq_ignore_ascii_case("basic ") && p[6..] == expected[6..]
        }),
    };
    state.log.lock().unwrap().push(TokenRequest { service, scopes: scopes.clone(), authorization: presented.is_some(), granted: ok });
    if !ok {
        state.denied.fetch_add(1, Ordering::SeqCst);
        return (
            StatusCode::UNAUTHORIZED,
            [(header::WWW_AUTHENTICATE, "Basic realm=\"token\"".to_string()), (header::CONTENT_TYPE, "application/json".to_string())],
            r#"{"details":"incorrect username or password"}"#,
        )
            .into_response();
    }
    let token = format!("tok-{}", uuid::Uuid::new_v4().simple());
    let grant = Grant { scopes: scopes.iter().filter_map(|s| parse_scope(s)).collect(), expires: Instant::now() + state.ttl };
    state.tokens.lock().unwrap().insert(token.clone(), grant);
    state.issued.fetch_add(1, Ordering::SeqCst);
    let expires_in = state.ttl.as_millis().div_ceil(1000) as u64;
    let body = serde_json::json!({
        "token": token,
        "access_token": token,
        "expires_in": expires_in,
        "issued_at": rfc3339(SystemTime::now()),
    });
    ([(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

/// `YYYY-MM-DDTHH:MM:SSZ` (UTC).
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0) as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + if m <= 2 { 1 } else { 0 };
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Standard base64 with padding (for Basic credentials).
pub fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(ALPHABET[(n >> 18) as usize & 63] as char);
        out.push(ALPHABET[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 { ALPHABET[(n >> 6) as usize & 63] as char } else { '=' });
        out.push(if chunk.len() > 2 { ALPHABET[n as usize & 63] as char } else { '=' });
    }
    out
}

/// An htpasswd file of `users` (name, password) in `dir`, written by the real `htpasswd -B`.
pub fn htpasswd(dir: &std::path::Path, users: &[(&str, &str)]) -> std::path::PathBuf {
    super::images::require("htpasswd");
    let file = dir.join("htpasswd");
    for (i, (user, pass)) in users.iter().enumerate() {
        let mut cmd = std::process::Command::new("htpasswd");
        cmd.arg("-B").arg("-b");
        if i == 0 {
            cmd.arg("-c");
        }
        super::images::run(cmd.arg(&file).args([user, pass]));
    }
    file
}

/// The `Authorization` value of HTTP Basic credentials.
pub fn basic(user: &str, pass: &str) -> String {
    format!("Basic {}", base64(format!("{user}:{pass}").as_bytes()))
}
