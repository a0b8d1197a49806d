//! Bearer tokens: JWTs with the distribution token specification's `access` claim, signed with an Ed25519 key
//! (EdDSA) that is generated at first start and kept in the data directory, or given in the config.
//!
//! Verifying a signature costs tens of microseconds; a pull makes dozens of requests with one token, so a
//! verified token is remembered (bounded, until it expires) and checked again only by a map lookup.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

use super::scope::AccessEntry;
use crate::bounded::BoundedMap;

/// The `typ` claim of a refresh token: it names a subject, grants nothing, and is accepted only by the token
/// endpoint's `refresh_token` grant.
const REFRESH: &str = "refresh";

/// Clock skew tolerated between issuer and verifier (a small one: our own tokens live minutes).
const LEEWAY_SECS: u64 = 5;

/// A token's claims (RFC 7519's registered claims and the spec's `access`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub sub: String,
    pub aud: String,
    pub exp: u64,
    pub nbf: u64,
    pub iat: u64,
    pub jti: String,
    #[serde(default)]
    pub access: Vec<AccessEntry>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub typ: Option<String>,
    /// `access`, parsed: filled in when the token is verified (never signed or read from a token).
    #[serde(skip)]
    pub grants: Arc<super::scope::Grants>,
}

impl Claims {
    pub fn is_refresh(&self) -> bool {
        self.typ.as_deref() == Some(REFRESH)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("reading the token signing key {path}: {why}")]
    Key { path: String, why: String },
    #[error("the token is not valid: {0}")]
    Invalid(String),
    #[error("signing a token failed: {0}")]
    Sign(String),
}

/// Issues and verifies this server's tokens.
pub struct Tokens {
    encoding: EncodingKey,
    decoding: DecodingKey,
    /// The `kid` header: which key signed (a verifier holding several keys picks by it).
    kid: String,
    /// `iss` of issued tokens, and the only issuer accepted.
    issuer: String,
    /// `aud` of issued tokens (the `service` of the challenge), and the only audience accepted.
    service: String,
    pub ttl: Duration,
    pub refresh_ttl: Duration,
    verified: BoundedMap<String, Arc<Claims>>,
}

pub fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

impl Tokens {
    /// Loads the signing key at `key_file`, generating it first if there is none.
    pub fn open(key_file: &Path, issuer: &str, service: &str, ttl: Duration, memory_entries: u64) -> Result<Tokens, TokenError> {
        let der = load_or_generate(key_file)?;
        let bad = |why: String| TokenError::Key { path: key_file.display().to_string(), why };
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
            .map_err(|e| bad(format!("not an Ed25519 PKCS#8 private key ({e})")))?;
        let public = ring::signature::KeyPair::public_key(&pair).as_ref().to_vec();
        let kid = {
            use sha2::Digest as _;
            let hash = sha2::Sha256::digest(&public);
            hash[..8].iter().map(|b| format!("{b:02x}")).collect()
        };
        Ok(Tokens {
            encoding: EncodingKey::from_ed_der(&der),
            decoding: DecodingKey::from_ed_der(&public),
            kid,
            issuer: issuer.to_string(),
            service: service.to_string(),
            ttl,
            refresh_ttl: Duration::from_secs(7 * 24 * 3600),
            verified: BoundedMap::new("verified_tokens", memory_entries, Some(ttl.max(Duration::from_secs(1)))),
        })
    }

    pub fn service(&self) -> &str {
        &self.service
    }

    /// An access token for `sub` granting `access`.
    pub fn issue(&self, sub: &str, access: Vec<AccessEntry>) -> Result<(String, Claims), TokenError> {
        self.sign(sub, access, None, self.ttl)
    }

    /// A refresh token for `sub` (OAuth2's `access_type=offline`, the GET form's `offline_token=true`).
    pub fn issue_refresh(&self, sub: &str) -> Result<String, TokenError> {
        Ok(self.sign(sub, Vec::new(), Some(REFRESH.to_string()), self.refresh_ttl)?.0)
    }

    fn sign(&self, sub: &str, access: Vec<AccessEntry>, typ: Option<String>, ttl: Duration) -> Result<(String, Claims), TokenError> {
        let now = now_secs();
        let claims = Claims {
            iss: self.issuer.clone(),
            sub: sub.to_string(),
            aud: self.service.clone(),
            exp: now.saturating_add(ttl.as_secs()),
            nbf: now.saturating_sub(LEEWAY_SECS),
            iat: now,
            jti: uuid::Uuid::new_v4().to_string(),
            grants: Arc::new(super::scope::Grants::of(&access)),
            access,
            typ,
        };
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(self.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding).map_err(|e| TokenError::Sign(e.to_string()))?;
        Ok((token, claims))
    }

    /// The claims of `token` if this server signed it, for this service, and it has not expired.
    pub fn verify(&self, token: &str) -> Result<Arc<Claims>, TokenError> {
        if let Some(c) = self.verified.get(token) {
            if c.exp > now_secs() {
                return Ok(c);
            }
            self.verified.remove(token);
            return Err(TokenError::Invalid("expired".into()));
        }
        let mut v = Validation::new(Algorithm::EdDSA);
        v.set_audience(&[&self.service]);
        v.set_issuer(&[&self.issuer]);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &v).map_err(|e| TokenError::Invalid(e.to_string()))?;
        let mut claims = data.claims;
        claims.grants = Arc::new(super::scope::Grants::of(&claims.access));
        let claims = Arc::new(claims);
        self.verified.insert(token.to_string(), Arc::clone(&claims));
        Ok(claims)
    }
}

/// The PKCS#8 DER of the key in `path` (PEM, `PRIVATE KEY`), generated and written first (mode 0600) if the
/// file does not exist. Two instances starting at once on one directory agree on one key: the new key is linked
/// into place only if no key is there yet.
fn load_or_generate(path: &Path) -> Result<Vec<u8>, TokenError> {
    let bad = |why: String| TokenError::Key { path: path.display().to_string(), why };
    if !path.exists() {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).map_err(|e| bad(format!("generating: {e}")))?;
        let text = pem::encode(&pem::Pem::new("PRIVATE KEY", pkcs8.as_ref().to_vec()));
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| bad(e.to_string()))?;
        }
        let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
        write_private(&tmp, text.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => tracing::info!(path = %path.display(), "generated the token signing key"),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(bad(e.to_string())),
        }
    }
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let pem = pem::parse(text).map_err(|e| bad(e.to_string()))?;
    if pem.tag() != "PRIVATE KEY" {
        return Err(bad(format!("expected a PEM PRIVATE KEY (PKCS#8), found {}", pem.tag())));
    }
    Ok(pem.into_contents())
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    let mut f = opts.open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

/// RFC 3339 for `issued_at`.
pub fn rfc3339(secs: u64) -> String {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).unwrap_or(i64::MAX))
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::scope::Scope;

    fn tokens(dir: &Path, ttl: Duration) -> Tokens {
        Tokens::open(&dir.join("auth/key.pem"), "breakwater", "svc", ttl, 100).unwrap()
    }

    #[test]
    fn a_token_verifies_with_its_claims_and_the_key_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokens(dir.path(), Duration::from_secs(300));
        let access = vec![AccessEntry::from_scope(&Scope::parse("repository:a:pull").unwrap())];
        let (token, _) = t.issue("alice", access.clone()).unwrap();
        let c = t.verify(&token).unwrap();
        assert_eq!((c.sub.as_str(), c.access.clone()), ("alice", access));
        // The key file is kept and private: a restart verifies the same tokens.
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.path().join("auth/key.pem")).unwrap().permissions().mode();
            assert_eq!(mode & 0o077, 0, "mode {mode:o}");
        }
        let again = tokens(dir.path(), Duration::from_secs(300));
        assert!(again.verify(&token).is_ok());
    }

    #[test]
    fn tokens_of_another_key_service_or_issuer_or_tampered_are_refused() {
        let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let t = tokens(a.path(), Duration::from_secs(300));
        let (token, _) = t.issue("alice", vec![]).unwrap();
        assert!(tokens(b.path(), Duration::from_secs(300)).verify(&token).is_err());
        let other_service = Tokens::open(&a.path().join("auth/key.pem"), "breakwater", "other", Duration::from_secs(60), 10).unwrap();
        assert!(other_service.verify(&token).is_err());
        let other_issuer = Tokens::open(&a.path().join("auth/key.pem"), "someone", "svc", Duration::from_secs(60), 10).unwrap();
        assert!(other_issuer.verify(&token).is_err());
        let mut parts: Vec<String> = token.split('.').map(String::from).collect();
        let forged = serde_json::json!({"iss":"breakwater","sub":"root","aud":"svc","exp":now_secs()+300,"nbf":0,"iat":0,"jti":"x","access":[]});
        parts[1] = base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, forged.to_string());
        assert!(t.verify(&parts.join(".")).is_err());
    }

    #[test]
    fn expired_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokens(dir.path(), Duration::from_secs(0));
        let (token, claims) = t.issue("alice", vec![]).unwrap();
        assert_eq!(claims.exp, claims.iat);
        std::thread::sleep(Duration::from_millis(1100) + Duration::from_secs(LEEWAY_SECS));
        assert!(t.verify(&token).is_err());
    }

    #[test]
    fn issued_at_is_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(1_700_000_000), "2023-11-14T22:13:20Z");
    }
}
