//! Access control at the HTTP boundary: the gate every request passes (credentials checked, the action it needs
//! allowed, or the spec's 401/403), the token endpoint (`/auth/token`, GET and the OAuth2 POST form), and the
//! audit line of every write.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};

use super::error::error_body;
use super::route::{self, Route};
use super::App;
use crate::auth::{Action, Actions, Auth, AuthError, Credentials, Identity, Mode, Scope};

/// What a request needs to be let through.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Need {
    /// Health checks, the token endpoint, paths that are answered 404 anyway.
    Public,
    /// `/api/` (and `/metrics` unless opened).
    Admin,
    /// `POST /api/replication/{name}/events`: an admin, unless the policy's `events_secret` came as a bearer
    /// token (which the gate checks before any credentials).
    PolicyEvents { name: String },
    /// `/v2/`: any valid credentials (a login check).
    Base,
    Catalog,
    Repo { name: String, action: Action },
}

fn need_of(method: &Method, path: &str, metrics_public: bool) -> Need {
    if path == "/metrics" {
        return if metrics_public { Need::Public } else { Need::Admin };
    }
    if let Some(name) = events_policy(method, path) {
        return Need::PolicyEvents { name: name.to_string() };
    }
    // The status page shows what `/api/` does, and its button starts runs: an operator's page, like the API.
    if path == "/" || path == "/api" || path.starts_with("/api/") {
        return Need::Admin;
    }
    let Some(route) = route::parse(path) else { return Need::Public };
    let read = matches!(*method, Method::GET | Method::HEAD);
    let (name, action) = match route {
        Route::Base => return Need::Base,
        Route::Catalog => return Need::Catalog,
        Route::Tags { name } | Route::Referrers { name, .. } => (name, Action::Pull),
        Route::Manifest { name, .. } | Route::Blob { name, .. } if read => (name, Action::Pull),
        Route::Manifest { name, .. } | Route::Blob { name, .. } if *method == Method::DELETE => (name, Action::Delete),
        Route::Manifest { name, .. } | Route::Blob { name, .. } | Route::UploadStart { name } | Route::Upload { name, .. } => {
            (name, Action::Push)
        }
    };
    Need::Repo { name: name.to_string(), action }
}

/// The policy whose notifications a request posts (`POST /api/replication/{name}/events`), if it does.
fn events_policy<'a>(method: &Method, path: &'a str) -> Option<&'a str> {
    let name = path.strip_prefix("/api/replication/")?.strip_suffix("/events")?;
    (*method == Method::POST && !name.is_empty() && !name.contains('/')).then_some(name)
}

/// Whether a request posting notifications carries its policy's `events_secret` (`Authorization: Bearer
/// SECRET`); `None` when it posts none, or the policy has no secret (or no queue: the handler says why).
fn events_secret(app: &App, method: &Method, path: &str, authorization: Option<&str>) -> Option<bool> {
    let queue = app.replication.events_of(events_policy(method, path)?).ok()?;
    queue.secret_matches(authorization)
}

/// Whether a browser sent the request for a page of another origin. The status page makes the admin API a
/// browser's: another site's form or `fetch` would carry the browser's saved credentials (CSRF), and browsers name
/// the page's origin in `Origin` on such writes. Clients that are not browsers (curl, a registry's notifications)
/// send none, and are let through.
fn cross_site(req: &Request) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else { return false };
    let host = req.uri().authority().map(|a| a.as_str()).or_else(|| req.headers().get(header::HOST).and_then(|h| h.to_str().ok()));
    // `Origin: null` (a sandboxed or file page) and an unreadable one are another site's too.
    let origin_host = origin.to_str().ok().and_then(|o| o.split_once("://")).map(|(_, h)| h);
    match (origin_host, host) {
        (Some(o), Some(h)) => !o.eq_ignore_ascii_case(h),
        _ => true,
    }
}

/// The gate: with access control on, a request reaches its handler only with an `Identity` allowed what it
/// needs (inserted into the request's extensions for the handlers that filter or check more: the catalog, a
/// cross-repository mount). Writes that succeed get an audit line, with access control on or off.
pub async fn gate(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    if path.starts_with("/api/") && !matches!(method, Method::GET | Method::HEAD) && cross_site(&req) {
        return denied("a write to /api/ from another site's page is refused (its Origin is not this server)");
    }
    let header = req.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok());
    // A policy's own secret lets its notifications in, with access control on or off; once set, it is required
    // of everyone but an admin.
    let secret = events_secret(&app, &method, &path, header);
    if secret == Some(true) {
        return next.run(req).await;
    }
    let Some(auth) = app.auth.clone() else {
        if secret == Some(false) {
            return wrong_events_secret();
        }
        let resp = next.run(req).await;
        audit("anonymous", &method, &path, &resp);
        return resp;
    };
    let need = need_of(&method, &path, auth.metrics_public);
    if need == Need::Public {
        return next.run(req).await;
    }
    let creds = Credentials::parse(header);
    let from = req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let mount_from = mount_source(&method, &need, req.uri().query());
    let challenge = Challenge { auth: &auth, scheme: app.scheme(), host: host(&req), need: &need, mount_from: mount_from.as_deref() };
    let id = match auth.identify(&creds, from).await {
        Ok(id) => id,
        Err(e) => return api_version(challenge.refuse(&e, matches!(creds, Credentials::Bearer(_)))),
    };
    if let Err(resp) = challenge.check(&id) {
        return api_version(resp);
    }
    let subject = id.subject.display().to_string();
    req.extensions_mut().insert(id);
    let resp = next.run(req).await;
    audit(&subject, &method, &path, &resp);
    resp
}

/// A refusal carries `Docker-Distribution-API-Version` like every `/v2/` answer: Docker's client reads it from
/// the 401 of its first `/v2/` request to know it speaks to a v2 registry.
fn api_version(mut resp: Response) -> Response {
    resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
    resp
}

/// The host the client addressed, for the realm: HTTP/1's `Host`, or HTTP/2's `:authority` (which hyper puts in
/// the URI, not the headers).
fn host(req: &Request) -> Option<String> {
    let header = req.headers().get(header::HOST).and_then(|v| v.to_str().ok());
    header.map(str::to_string).or_else(|| req.uri().authority().map(|a| a.as_str().to_string()))
}

/// The repository a cross-repository mount (`POST .../blobs/uploads/?mount=DIGEST&from=REPO`) would read: it
/// needs pull there too, as distribution asks, so the challenge names it and a token lacking it is worth another.
fn mount_source(method: &Method, need: &Need, query: Option<&str>) -> Option<String> {
    if *method != Method::POST || !matches!(need, Need::Repo { action: Action::Push, .. }) {
        return None;
    }
    let params: HashMap<String, String> = serde_urlencoded::from_str(query?).ok()?;
    params.get("mount")?;
    params.get("from").filter(|f| !f.is_empty()).cloned()
}

/// Builds the refusals of one request.
struct Challenge<'a> {
    auth: &'a Auth,
    scheme: &'static str,
    host: Option<String>,
    need: &'a Need,
    /// The source of a cross-repository mount, whose pull the request asks for on top of `need`.
    mount_from: Option<&'a str>,
}

impl Challenge<'_> {
    /// Lets `id` through, or answers: 401 with a challenge when other credentials could do it (none given, or a
    /// token lacking a scope the subject would be granted), 403 `DENIED` when the subject may not.
    fn check(&self, id: &Identity) -> Result<(), Response> {
        let anonymous = id.subject.is_anonymous();
        // In token mode every client comes with a token, if only an anonymous one: the 401 sends it for one.
        if anonymous && id.token_access.is_none() && self.auth.mode == Mode::Token {
            return Err(self.unauthorized(None, "authentication required"));
        }
        let allowed = match self.need {
            Need::Public => true,
            // Any valid token; with passwords, a login check needs a user.
            Need::Base => id.token_access.is_some() || !anonymous,
            Need::Admin | Need::PolicyEvents { .. } => self.auth.is_admin(id),
            Need::Catalog => self.auth.may_list_catalog(id),
            Need::Repo { name, action } => self.auth.actions(id, name).contains(*action),
        };
        if allowed {
            return self.check_mount_source(id);
        }
        if anonymous {
            return Err(self.unauthorized(None, "authentication required"));
        }
        let subject_may = match self.need {
            Need::Repo { name, action } => self.auth.policy_actions(id, name).contains(*action),
            Need::Catalog => true,
            _ => false,
        };
        if id.token_access.is_some() && subject_may {
            return Err(self.unauthorized(Some("insufficient_scope"), "the token does not grant this access"));
        }
        Err(denied(&format!("{} may not do this", id.subject.display())))
    }

    /// A mount whose token lacks pull on the source repository: 401 `insufficient_scope` (naming both scopes)
    /// when the subject would be granted it, so the client fetches a token that lets the mount happen, as it
    /// would from distribution. Otherwise the request goes on, and the mount falls back to an upload (202).
    fn check_mount_source(&self, id: &Identity) -> Result<(), Response> {
        let Some(from) = self.mount_from else { return Ok(()) };
        if id.token_access.is_none() || self.auth.actions(id, from).contains(Action::Pull) {
            return Ok(());
        }
        if !id.subject.is_anonymous() && self.auth.policy_actions(id, from).contains(Action::Pull) {
            return Err(self.unauthorized(Some("insufficient_scope"), "the token does not grant pull on the mount's source"));
        }
        Ok(())
    }

    fn refuse(&self, e: &AuthError, bearer: bool) -> Response {
        match e {
            AuthError::TooManyFailures => too_many(e),
            AuthError::Missing | AuthError::BadCredentials | AuthError::BadToken(_) => {
                self.unauthorized(bearer.then_some("invalid_token"), &e.to_string())
            }
            AuthError::Users(_) | AuthError::Token(_) | AuthError::Policy(_) | AuthError::Meta(_) | AuthError::Issuer(_) => {
                tracing::error!(error = %e, "access control failed");
                (StatusCode::INTERNAL_SERVER_ERROR, json_type(), error_body("UNKNOWN", "access control failed")).into_response()
            }
        }
    }

    /// 401 `UNAUTHORIZED` with the challenge that tells the client how to get in.
    fn unauthorized(&self, error: Option<&str>, message: &str) -> Response {
        let basic = self.auth.mode == Mode::Basic || matches!(self.need, Need::Admin | Need::PolicyEvents { .. });
        let value = if basic {
            format!("Basic realm=\"{}\"", self.auth.service())
        } else {
            let mut v = format!("Bearer realm=\"{}\",service=\"{}\"", self.auth.realm(self.scheme, self.host.as_deref()), self.auth.service());
            let scopes: Vec<String> = self.scope().into_iter().chain(self.mount_scope()).map(|s| s.render()).collect();
            if !scopes.is_empty() {
                v.push_str(&format!(",scope=\"{}\"", scopes.join(" ")));
            }
            if let Some(e) = error {
                v.push_str(&format!(",error=\"{e}\""));
            }
            v
        };
        let mut resp = (StatusCode::UNAUTHORIZED, json_type(), error_body("UNAUTHORIZED", message)).into_response();
        if let Ok(v) = HeaderValue::from_str(&value) {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
        }
        resp
    }

    /// The scope a client should ask for. A push asks for pull too, as clients do (they read before they
    /// write).
    fn scope(&self) -> Option<Scope> {
        match self.need {
            Need::Catalog => Some(Scope::Catalog),
            Need::Repo { name, action } => {
                let actions = match action {
                    Action::Push => Actions::of(&[Action::Pull, Action::Push]),
                    a => Actions::of(&[*a]),
                };
                // A name that could not be put in a header unescaped gets no scope (the request fails later anyway).
                name.bytes().all(|b| b.is_ascii_graphic() && b != b'"').then(|| Scope::Repository { name: name.clone(), actions })
            }
            _ => None,
        }
    }

    /// Pull on a mount's source repository, asked for after the request's own scope (space-separated in the
    /// challenge's `scope`, as distribution writes several).
    fn mount_scope(&self) -> Option<Scope> {
        let from = self.mount_from?;
        from.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'"')
            .then(|| Scope::Repository { name: from.to_string(), actions: Actions::of(&[Action::Pull]) })
    }
}

/// 401 for notifications without their policy's secret while access control is off (with it on, an admin may
/// send them too, and the usual challenge answers).
fn wrong_events_secret() -> Response {
    let mut resp = (StatusCode::UNAUTHORIZED, json_type(), error_body("UNAUTHORIZED", "this policy's events need its secret: Authorization: Bearer SECRET")).into_response();
    resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"events\""));
    resp
}

/// 429 after too many failed logins, with the window's length as `Retry-After`.
fn too_many(e: &AuthError) -> Response {
    let retry = crate::auth::FAILURE_WINDOW.as_secs().to_string();
    (StatusCode::TOO_MANY_REQUESTS, [(header::CONTENT_TYPE, "application/json".to_string()), (header::RETRY_AFTER, retry)], error_body("TOOMANYREQUESTS", &e.to_string()))
        .into_response()
}

fn json_type() -> [(header::HeaderName, &'static str); 1] {
    [(header::CONTENT_TYPE, "application/json")]
}

fn denied(message: &str) -> Response {
    (StatusCode::FORBIDDEN, json_type(), error_body("DENIED", message)).into_response()
}

/// One line per successful write (pushes, tag moves, deletes), under the `audit` target: who, what, where.
fn audit(subject: &str, method: &Method, path: &str, resp: &Response) {
    if !resp.status().is_success() || !matches!(*method, Method::PUT | Method::DELETE | Method::POST) {
        return;
    }
    let Some(route) = route::parse(path) else { return };
    let digest = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).unwrap_or("");
    let (action, repository, reference) = match (&route, method.as_str()) {
        (Route::Manifest { name, reference }, "PUT") => ("push manifest", *name, *reference),
        (Route::Manifest { name, reference }, "DELETE") => ("delete manifest", *name, *reference),
        (Route::Blob { name, digest }, "DELETE") => ("delete blob", *name, *digest),
        // An upload's commit, a one-request push or a mount answer 201 with the blob's digest.
        (Route::Upload { name, .. } | Route::UploadStart { name }, _) if resp.status() == StatusCode::CREATED => ("push blob", *name, ""),
        _ => return,
    };
    tracing::info!(target: "breakwater::audit", subject, action, repository, reference, digest, "audit");
}

/// The GET form's parameters (the spec's `token.md`).
fn params(query: &[(String, String)]) -> (HashMap<&str, &str>, Vec<&str>) {
    let mut one = HashMap::new();
    let mut scopes = Vec::new();
    for (k, v) in query {
        if k == "scope" {
            scopes.push(v.as_str());
        } else {
            one.insert(k.as_str(), v.as_str());
        }
    }
    (one, scopes)
}

/// `GET /auth/token`: a token for the asked scopes, with basic credentials or anonymously.
pub async fn token_get(
    State(app): State<Arc<App>>,
    connect: Option<Extension<ConnectInfo<SocketAddr>>>,
    Query(query): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    let Some(auth) = app.auth.clone() else { return token_endpoint_off() };
    let (one, scopes) = params(&query);
    if let Some(resp) = wrong_service(&auth, one.get("service").copied()) {
        return resp;
    }
    let creds = Credentials::parse(headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()));
    let subject = match creds {
        Credentials::None => crate::auth::Subject::anonymous(),
        Credentials::Basic { user, password } => match auth.login(&user, &password, connect.map(|c| c.0 .0.ip())).await {
            Ok(s) => s,
            Err(e) => return token_refused(&auth, &e),
        },
        Credentials::Bearer(_) | Credentials::Malformed => return token_refused(&auth, &AuthError::BadCredentials),
    };
    let offline = one.get("offline_token").is_some_and(|v| *v == "true");
    issue(&auth, &subject, &Scope::parse_all(scopes), offline && !subject.is_anonymous(), None)
}

/// The OAuth2 form (`grant_type=password` or `refresh_token`), which containerd uses when it has credentials.
#[derive(serde::Deserialize)]
struct TokenForm {
    grant_type: String,
    service: Option<String>,
    #[serde(default)]
    scope: String,
    username: Option<String>,
    password: Option<String>,
    refresh_token: Option<String>,
    access_type: Option<String>,
}

/// Bound on the POST form's size: a few scopes and credentials.
const MAX_FORM_BYTES: usize = 64 * 1024;

/// `POST /auth/token`.
pub async fn token_post(State(app): State<Arc<App>>, connect: Option<Extension<ConnectInfo<SocketAddr>>>, body: Body) -> Response {
    let Some(auth) = app.auth.clone() else { return token_endpoint_off() };
    let form: TokenForm = match axum::body::to_bytes(body, MAX_FORM_BYTES).await.ok().and_then(|b| serde_urlencoded::from_bytes(&b).ok()) {
        Some(f) => f,
        None => return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "expected an application/x-www-form-urlencoded token request"),
    };
    if let Some(resp) = wrong_service(&auth, form.service.as_deref()) {
        return resp;
    }
    let scopes = Scope::parse_all([form.scope.as_str()]);
    match form.grant_type.as_str() {
        "password" => {
            let (Some(user), Some(password)) = (&form.username, &form.password) else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "username and password are required");
            };
            match auth.login(user, password, connect.map(|c| c.0 .0.ip())).await {
                Ok(s) => issue(&auth, &s, &scopes, form.access_type.as_deref() == Some("offline"), None),
                Err(e) => token_refused(&auth, &e),
            }
        }
        "refresh_token" => {
            let Some(refresh) = &form.refresh_token else {
                return oauth_error(StatusCode::BAD_REQUEST, "invalid_request", "refresh_token is required");
            };
            match auth.refresh(refresh).await {
                Ok(s) => issue(&auth, &s, &scopes, false, Some(refresh.clone())),
                Err(e) => oauth_error(StatusCode::UNAUTHORIZED, "invalid_grant", &e.to_string()),
            }
        }
        other => oauth_error(StatusCode::BAD_REQUEST, "unsupported_grant_type", &format!("grant type {other:?} is not supported")),
    }
}

/// The token answer. `refresh`: issue a refresh token too; `keep`: the refresh token the client used, sent back.
fn issue(auth: &Auth, subject: &crate::auth::Subject, scopes: &[Scope], refresh: bool, keep: Option<String>) -> Response {
    let granted = match auth.issue(subject, scopes) {
        Ok(g) => g,
        Err(e) => {
            tracing::error!(error = %e, "issuing a token failed");
            return oauth_error(StatusCode::INTERNAL_SERVER_ERROR, "server_error", "issuing a token failed");
        }
    };
    let mut body = serde_json::json!({
        "token": granted.token,
        "access_token": granted.token,
        "expires_in": auth.token_ttl().as_secs(),
        "issued_at": crate::auth::token::rfc3339(granted.claims.iat),
        "scope": granted.scopes.iter().map(Scope::render).collect::<Vec<_>>().join(" "),
    });
    let refresh_token = match keep {
        Some(t) => Some(t),
        None if refresh => auth.issue_refresh(subject).ok(),
        None => None,
    };
    if let Some(t) = refresh_token {
        body["refresh_token"] = t.into();
    }
    let mut resp = Json(body).into_response();
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

fn wrong_service(auth: &Auth, asked: Option<&str>) -> Option<Response> {
    let asked = asked.filter(|s| *s != auth.service())?;
    Some(oauth_error(StatusCode::BAD_REQUEST, "invalid_request", &format!("this server issues tokens for service {:?}, not {asked:?}", auth.service())))
}

fn token_refused(auth: &Auth, e: &AuthError) -> Response {
    if let AuthError::TooManyFailures = e {
        return too_many(e);
    }
    let mut resp = (StatusCode::UNAUTHORIZED, json_type(), error_body("UNAUTHORIZED", &e.to_string())).into_response();
    if let Ok(v) = HeaderValue::from_str(&format!("Basic realm=\"{}\"", auth.service())) {
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, v);
    }
    resp
}

/// An OAuth2 error answer (RFC 6749 section 5.2), with the registry error body beside it for clients that read
/// that.
fn oauth_error(status: StatusCode, error: &str, description: &str) -> Response {
    let code = if status == StatusCode::UNAUTHORIZED { "UNAUTHORIZED" } else { "UNSUPPORTED" };
    let body = serde_json::json!({
        "error": error, "error_description": description,
        "errors": [{ "code": code, "message": description, "detail": null }],
    });
    (status, Json(body)).into_response()
}

fn token_endpoint_off() -> Response {
    (StatusCode::NOT_FOUND, json_type(), error_body("UNSUPPORTED", "access control is off: this server issues no tokens")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_route_needs_its_action() {
        let repo = |name: &str, action| Need::Repo { name: name.into(), action };
        assert_eq!(need_of(&Method::GET, "/v2/", false), Need::Base);
        assert_eq!(need_of(&Method::GET, "/v2/_catalog", false), Need::Catalog);
        assert_eq!(need_of(&Method::GET, "/v2/a/b/manifests/x", false), repo("a/b", Action::Pull));
        assert_eq!(need_of(&Method::HEAD, "/v2/a/blobs/sha256:0", false), repo("a", Action::Pull));
        assert_eq!(need_of(&Method::PUT, "/v2/a/manifests/x", false), repo("a", Action::Push));
        assert_eq!(need_of(&Method::DELETE, "/v2/a/manifests/x", false), repo("a", Action::Delete));
        assert_eq!(need_of(&Method::DELETE, "/v2/a/blobs/sha256:0", false), repo("a", Action::Delete));
        assert_eq!(need_of(&Method::POST, "/v2/a/blobs/uploads/", false), repo("a", Action::Push));
        // Reading an upload's status or cancelling it is the pusher's business.
        assert_eq!(need_of(&Method::GET, "/v2/a/blobs/uploads/id", false), repo("a", Action::Push));
        assert_eq!(need_of(&Method::DELETE, "/v2/a/blobs/uploads/id", false), repo("a", Action::Push));
        assert_eq!(need_of(&Method::GET, "/v2/a/tags/list", false), repo("a", Action::Pull));
        assert_eq!(need_of(&Method::GET, "/v2/a/referrers/sha256:0", false), repo("a", Action::Pull));
        // Unknown methods on a manifest are not reads.
        assert_eq!(need_of(&Method::PATCH, "/v2/a/manifests/x", false), repo("a", Action::Push));
        assert_eq!(need_of(&Method::GET, "/api/replication", false), Need::Admin);
        assert_eq!(need_of(&Method::POST, "/api/replication/p/events", false), Need::PolicyEvents { name: "p".into() });
        assert_eq!(need_of(&Method::GET, "/api/replication/p/events", false), Need::Admin);
        assert_eq!(need_of(&Method::POST, "/api/replication/a/b/events", false), Need::Admin);
        assert_eq!(need_of(&Method::POST, "/api/replication/p/run", false), Need::Admin);
        assert_eq!(need_of(&Method::GET, "/", false), Need::Admin);
        assert_eq!(need_of(&Method::GET, "/metrics", false), Need::Admin);
        assert_eq!(need_of(&Method::GET, "/metrics", true), Need::Public);
        assert_eq!(need_of(&Method::GET, "/healthz", false), Need::Public);
        assert_eq!(need_of(&Method::GET, "/auth/token", false), Need::Public);
    }
}
