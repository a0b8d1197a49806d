//! Access control: who a request is from (users, robots, tokens) and what they may do (the policy).
//!
//! Two modes, as registry clients know them:
//! - **token** (the default when users exist): the distribution token flow. A request without a valid bearer
//!   token is answered 401 with a `Bearer` challenge naming this server's `/auth/token`; the client fetches a
//!   token there (with its password, or anonymously) for the scopes it needs and retries with it. A token grants
//!   exactly the scopes in its `access` claim.
//! - **basic**: every request carries its user's password (`Authorization: Basic`), checked against the policy.
//!
//! Architecture invariant: this module decides, the HTTP layer asks. No handler compares names or reads a
//! policy; `Auth` answers "who is this" and "may they", and nothing else grants access.

pub mod issuer;
pub mod policy;
pub mod robots;
pub mod scope;
pub mod token;
pub mod users;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use policy::{AccessRule, Policy, PolicyConfig, Subject, SubjectKind};
pub use scope::{AccessEntry, Action, Actions, Scope};
pub use token::{Claims, TokenError, Tokens};
pub use users::{UserEntry, Users, UsersConfig};

use crate::bounded::BoundedMap;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Token,
    Basic,
}

/// The resolved access-control settings.
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub mode: Mode,
    pub users: UsersConfig,
    pub policy: PolicyConfig,
    /// The `service` of challenges and the audience of tokens.
    pub service: String,
    /// The token endpoint clients are sent to; `None`: `/auth/token` on the host the client addressed.
    pub realm: Option<String>,
    pub token_ttl: Duration,
    /// The Ed25519 signing key (PKCS#8 PEM); generated there at first start if missing.
    pub signing_key: PathBuf,
    /// `/metrics` without credentials (for a scraper on a trusted network).
    pub metrics_public: bool,
    /// Bound on each in-memory map (verified passwords and tokens, failed-login counts).
    pub memory_entries: u64,
    /// Tokens of another auth server, accepted beside (or, without users, instead of) this server's own.
    pub issuer: Option<issuer::IssuerConfig>,
}

pub const DEFAULT_SERVICE: &str = "breakwater";
pub const DEFAULT_TOKEN_TTL_SECS: u64 = 300;

/// Failed logins allowed per user name within `FAILURE_WINDOW` before further attempts are refused with 429 (a
/// password guesser gets a handful of tries a minute, a mistyping human is not locked out for long).
pub const MAX_FAILURES_PER_USER: u32 = 10;
/// Failed logins allowed per client address in the window: higher, since many clients may share one address
/// (a NAT, a CI runner), and one of them mistyping must not lock out the rest.
pub const MAX_FAILURES_PER_ADDRESS: u32 = 50;
pub const FAILURE_WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("authentication required")]
    Missing,
    #[error("invalid username or password")]
    BadCredentials,
    #[error("{0}")]
    BadToken(String),
    #[error("too many failed logins; try again in a minute")]
    TooManyFailures,
    #[error(transparent)]
    Users(#[from] users::UsersError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error("access policy: {0}")]
    Policy(String),
    #[error(transparent)]
    Meta(#[from] crate::meta::MetaError),
    #[error(transparent)]
    Issuer(#[from] issuer::IssuerError),
}

/// Credentials as a request presents them.
pub enum Credentials<'a> {
    None,
    Basic { user: String, password: String },
    /// Borrowed from the header: a token is hundreds of bytes, and every request of a pull carries one.
    Bearer(&'a str),
    /// An `Authorization` header that is neither (or cannot be decoded).
    Malformed,
}

impl<'a> Credentials<'a> {
    pub fn parse(header: Option<&'a str>) -> Credentials<'a> {
        let Some(h) = header else { return Credentials::None };
        let (scheme, value) = h.trim().split_once(' ').unwrap_or((h, ""));
        let value = value.trim();
        if scheme.eq_ignore_ascii_case("bearer") && !value.is_empty() {
            return Credentials::Bearer(value);
        }
        if scheme.eq_ignore_ascii_case("basic") {
            use base64::Engine;
            let decoded = base64::engine::general_purpose::STANDARD.decode(value).ok().and_then(|b| String::from_utf8(b).ok());
            if let Some((user, password)) = decoded.as_deref().and_then(|d| d.split_once(':')) {
                return Credentials::Basic { user: user.to_string(), password: password.to_string() };
            }
        }
        Credentials::Malformed
    }
}

/// Who made a request and what their credentials grant.
#[derive(Debug, Clone)]
pub struct Identity {
    pub subject: Subject,
    /// The `access` claim of the bearer token used; `None` when the request carried a password (or nothing),
    /// whose rights are the policy's.
    pub token_access: Option<Arc<scope::Grants>>,
}

/// A granted token, as the token endpoint answers it.
pub struct Granted {
    pub token: String,
    pub claims: Claims,
    pub scopes: Vec<Scope>,
}

pub struct Auth {
    pub mode: Mode,
    users: Arc<Users>,
    /// Where robots are kept.
    meta: Arc<dyn crate::meta::Meta>,
    policy: Policy,
    tokens: Tokens,
    external: Option<issuer::ExternalIssuer>,
    realm: Option<String>,
    pub metrics_public: bool,
    /// Failed logins per address and per name, in the current window.
    failures: BoundedMap<FailureKey, u32>,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq)]
enum FailureKey {
    Address(IpAddr),
    User(String),
}

impl FailureKey {
    fn limit(&self) -> u32 {
        match self {
            FailureKey::Address(_) => MAX_FAILURES_PER_ADDRESS,
            FailureKey::User(_) => MAX_FAILURES_PER_USER,
        }
    }
}

impl Auth {
    pub fn open(config: AuthConfig, meta: Arc<dyn crate::meta::Meta>) -> Result<Auth, AuthError> {
        let has_users = !config.users.is_empty();
        let users = Arc::new(Users::open(config.users, config.memory_entries)?);
        let policy = Policy::new(config.policy).map_err(AuthError::Policy)?;
        let tokens = Tokens::open(&config.signing_key, DEFAULT_SERVICE, &config.service, config.token_ttl, config.memory_entries)?;
        let external = match &config.issuer {
            Some(i) => Some(issuer::ExternalIssuer::open(i, &config.service, config.memory_entries)?),
            None => None,
        };
        // Without users of its own the server sends clients to the other server's realm.
        let realm = config.realm.or_else(|| external.as_ref().filter(|_| !has_users).map(|e| e.realm.clone()));
        Ok(Auth {
            mode: config.mode,
            users,
            meta,
            policy,
            tokens,
            external,
            realm,
            metrics_public: config.metrics_public,
            failures: BoundedMap::new("failed_logins", config.memory_entries, Some(FAILURE_WINDOW)),
        })
    }

    pub fn service(&self) -> &str {
        self.tokens.service()
    }

    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The realm of challenges: the configured one, or the token endpoint on the host the client addressed
    /// (so a client reaching this server by any name is sent back to the same name).
    pub fn realm(&self, scheme: &str, host: Option<&str>) -> String {
        if let Some(r) = &self.realm {
            return r.clone();
        }
        let host = host.filter(|h| is_host(h)).unwrap_or("localhost");
        format!("{scheme}://{host}/auth/token")
    }

    /// Checks a user's password; counts failures against `from` and the name, and refuses outright past
    /// `MAX_FAILURES` in a window (before checking, so a guesser learns nothing more).
    pub async fn login(&self, user: &str, password: &str, from: Option<IpAddr>) -> Result<Subject, AuthError> {
        let keys: Vec<FailureKey> =
            from.map(FailureKey::Address).into_iter().chain(std::iter::once(FailureKey::User(user.to_string()))).collect();
        if keys.iter().any(|k| self.failures.get(k).unwrap_or(0) >= k.limit()) {
            return Err(AuthError::TooManyFailures);
        }
        let verified = match user.strip_prefix(robots::PREFIX) {
            Some(robot) => robots::verify(&self.meta, robot, password)
                .await?
                .map(|grants| Subject { name: user.to_string(), groups: Vec::new(), kind: SubjectKind::Robot(grants) }),
            None => self.users.verify(user, password).await.map(|groups| Subject { name: user.to_string(), groups, kind: SubjectKind::User }),
        };
        match verified {
            Some(subject) => Ok(subject),
            None => {
                for k in keys {
                    let n = self.failures.get(&k).unwrap_or(0);
                    self.failures.insert(k, n.saturating_add(1));
                }
                tracing::warn!(user, address = ?from, "failed login");
                Err(AuthError::BadCredentials)
            }
        }
    }

    /// The identity of a bearer token this server issued, or the configured other server did.
    pub fn bearer(&self, token: &str) -> Result<Identity, AuthError> {
        let own = match self.tokens.verify(token) {
            Ok(claims) => claims,
            Err(e) => return self.foreign(token, e),
        };
        if own.is_refresh() {
            return Err(AuthError::BadToken("a refresh token is not an access token".into()));
        }
        Ok(Identity { subject: self.subject_of(&own.sub), token_access: Some(Arc::clone(&own.grants)) })
    }

    /// A token this server did not sign: the other server's, if one is configured and it verifies.
    fn foreign(&self, token: &str, own_error: TokenError) -> Result<Identity, AuthError> {
        let Some(ext) = &self.external else { return Err(AuthError::BadToken(own_error.to_string())) };
        let v = ext.verify(token).map_err(|e| AuthError::BadToken(format!("the token is not valid: {e}")))?;
        let subject = Subject { name: v.sub, groups: Vec::new(), kind: SubjectKind::External };
        Ok(Identity { subject, token_access: Some(v.access) })
    }

    /// The subject a token names. A token carries no groups (what it grants was decided when it was issued), so
    /// none are looked up here, on every request: `policy_actions` looks them up when a refusal needs them.
    fn subject_of(&self, sub: &str) -> Subject {
        if sub.is_empty() {
            Subject::anonymous()
        } else if sub.starts_with(robots::PREFIX) {
            Subject { name: sub.to_string(), groups: Vec::new(), kind: SubjectKind::Robot(Vec::new()) }
        } else {
            Subject { name: sub.to_string(), groups: Vec::new(), kind: SubjectKind::User }
        }
    }

    /// The subject of `id` as the policy sees it now: a user who came with a token gets their current groups
    /// (a token carries none). For the few decisions that read the policy past the token: admin rights, the
    /// catalog's filter, and whether a token lacking a scope is worth a new token (401) or a refusal (403).
    pub fn current_subject(&self, id: &Identity) -> Subject {
        let mut s = id.subject.clone();
        if id.token_access.is_some() && matches!(s.kind, SubjectKind::User) {
            s.groups = self.users.groups(&s.name).unwrap_or_default();
        }
        s
    }

    /// What the policy allows the subject of `id` on `repo` now.
    pub fn policy_actions(&self, id: &Identity, repo: &str) -> Actions {
        self.policy.actions(&self.current_subject(id), repo)
    }

    /// The identity behind a request's credentials: a token (in token mode; or a password, accepted in both
    /// modes), or the anonymous client.
    pub async fn identify(&self, creds: &Credentials<'_>, from: Option<IpAddr>) -> Result<Identity, AuthError> {
        match creds {
            Credentials::None => Ok(Identity { subject: Subject::anonymous(), token_access: None }),
            Credentials::Bearer(t) if self.mode == Mode::Token => self.bearer(t),
            Credentials::Bearer(_) => Err(AuthError::BadToken("this server takes passwords, not bearer tokens".into())),
            Credentials::Basic { user, password } => {
                Ok(Identity { subject: self.login(user, password, from).await?, token_access: None })
            }
            Credentials::Malformed => Err(AuthError::BadToken("malformed Authorization header".into())),
        }
    }

    /// The actions `id` may take on `repo`: what its token grants, or else what the policy allows it.
    pub fn actions(&self, id: &Identity, repo: &str) -> Actions {
        match &id.token_access {
            Some(grants) => grants.actions(repo),
            None => self.policy.actions(&id.subject, repo),
        }
    }

    /// Whether `id` may list the catalog (which is then filtered to what the subject may pull).
    pub fn may_list_catalog(&self, id: &Identity) -> bool {
        match &id.token_access {
            Some(grants) => grants.catalog(),
            None => !id.subject.is_anonymous() || self.policy.anonymous_may_pull(),
        }
    }

    /// Whether `subject` (from `current_subject`, not a token) may pull `repo`: what the filtered catalog shows.
    pub fn subject_may_pull(&self, subject: &Subject, repo: &str) -> bool {
        self.policy.actions(subject, repo).contains(Action::Pull)
    }

    pub fn is_admin(&self, id: &Identity) -> bool {
        self.policy.is_admin(&self.current_subject(id))
    }

    /// The intersection of what `subject` asked for and what the policy allows them; scopes granted nothing
    /// are left out (a partial grant is not an error, per the spec).
    pub fn grant(&self, subject: &Subject, asked: &[Scope]) -> Vec<Scope> {
        asked
            .iter()
            .filter_map(|s| match s {
                Scope::Repository { name, actions } => {
                    let allowed = actions.intersect(self.policy.actions(subject, name));
                    (!allowed.is_empty()).then(|| Scope::Repository { name: name.clone(), actions: allowed })
                }
                Scope::Catalog => (!subject.is_anonymous() || self.policy.anonymous_may_pull()).then_some(Scope::Catalog),
            })
            .collect()
    }

    /// An access token for `subject` with what `grant` allows of `asked`.
    pub fn issue(&self, subject: &Subject, asked: &[Scope]) -> Result<Granted, AuthError> {
        let scopes = self.grant(subject, asked);
        let access = scopes.iter().map(AccessEntry::from_scope).collect();
        let (token, claims) = self.tokens.issue(&subject.name, access)?;
        Ok(Granted { token, claims, scopes })
    }

    pub fn issue_refresh(&self, subject: &Subject) -> Result<String, AuthError> {
        Ok(self.tokens.issue_refresh(&subject.name)?)
    }

    /// The subject of a refresh token, if it is valid and its user still exists (or its robot is still usable,
    /// with the grants it has now).
    pub async fn refresh(&self, token: &str) -> Result<Subject, AuthError> {
        let claims = self.tokens.verify(token).map_err(|e| AuthError::BadToken(e.to_string()))?;
        if !claims.is_refresh() {
            return Err(AuthError::BadToken("not a refresh token".into()));
        }
        if let Some(robot) = claims.sub.strip_prefix(robots::PREFIX) {
            let record = self.meta.robot(robot).await?.filter(robots::usable);
            let record = record.ok_or_else(|| AuthError::BadToken("the token's robot was revoked or has expired".into()))?;
            return Ok(Subject { name: claims.sub.clone(), groups: Vec::new(), kind: SubjectKind::Robot(robots::grants(&record)) });
        }
        if !self.users.exists(&claims.sub) {
            return Err(AuthError::BadToken("the token's user no longer exists".into()));
        }
        Ok(self.subject_of(&claims.sub))
    }

    /// Seconds an access token lives.
    pub fn token_ttl(&self) -> Duration {
        self.tokens.ttl
    }
}

/// Whether `h` may be put into a realm URL: a host name or address with an optional port.
fn is_host(h: &str) -> bool {
    !h.is_empty() && h.len() <= 255 && h.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.:[]_".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_parse() {
        assert!(matches!(Credentials::parse(None), Credentials::None));
        assert!(matches!(Credentials::parse(Some("Bearer abc")), Credentials::Bearer("abc")));
        // "alice:pa:ss" — a password may hold a colon.
        match Credentials::parse(Some("Basic YWxpY2U6cGE6c3M=")) {
            Credentials::Basic { user, password } => assert_eq!((user.as_str(), password.as_str()), ("alice", "pa:ss")),
            _ => panic!("not basic"),
        }
        assert!(matches!(Credentials::parse(Some("Basic !!!")), Credentials::Malformed));
        assert!(matches!(Credentials::parse(Some("Digest x")), Credentials::Malformed));
    }

    #[tokio::test]
    async fn realms_use_only_a_sane_host() {
        let dir = tempfile::tempdir().unwrap();
        let meta = crate::meta::open(&crate::config::sqlite_url(dir.path())).await.unwrap();
        let auth = Auth::open(AuthConfig {
            mode: Mode::Token,
            users: UsersConfig::default(),
            policy: PolicyConfig::default(),
            service: "svc".into(),
            realm: None,
            token_ttl: Duration::from_secs(60),
            signing_key: dir.path().join("k.pem"),
            metrics_public: false,
            memory_entries: 10,
            issuer: None,
        }, meta)
        .unwrap();
        assert_eq!(auth.realm("http", Some("127.0.0.1:5000")), "http://127.0.0.1:5000/auth/token");
        assert_eq!(auth.realm("https", Some("evil\"host")), "https://localhost/auth/token");
    }
}
