//! Tokens issued by another server (`[auth.issuer]`): breakwater behind an existing auth service (Harbor-,
//! GitLab- or distribution-style token servers). Clients are sent to that server's realm; breakwater only
//! verifies what comes back: the signature against the configured public keys (a PEM bundle of public keys or
//! certificates, as distribution's `rootcertbundle`, or a JWKS file), the issuer, the service, the expiry.
//!
//! Only asymmetric algorithms are accepted: a verifier that took HS256 could be handed a token "signed" with a
//! public key as the HMAC secret.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::scope::AccessEntry;
use crate::bounded::BoundedMap;

/// The resolved `[auth.issuer]` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssuerConfig {
    /// Where clients get tokens (the realm of our challenges).
    pub realm: String,
    /// The `iss` its tokens carry.
    pub issuer: String,
    /// PEM bundle: `PUBLIC KEY`, `RSA PUBLIC KEY` or `CERTIFICATE` blocks.
    pub keys: Option<PathBuf>,
    /// A JWKS document (`{"keys": [...]}`).
    pub jwks: Option<PathBuf>,
}

/// Clock skew tolerated with another server's clock.
const LEEWAY_SECS: u64 = 30;

const ASYMMETRIC: [Algorithm; 9] = [
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::EdDSA,
];

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("reading {path}: {why}")]
    Keys { path: String, why: String },
    #[error("[auth.issuer] needs keys (a PEM bundle) or jwks (a JWKS file)")]
    NoKeys,
}

/// One verification key, with the key id it is known by (JWKS keys have one; PEM keys do not).
struct Key {
    key: DecodingKey,
    kid: Option<String>,
}

/// What breakwater reads of a foreign token; the registered claims are checked by the library.
#[derive(Debug, Deserialize)]
struct ForeignClaims {
    #[serde(default)]
    sub: String,
    #[serde(default)]
    access: Vec<AccessEntry>,
    exp: u64,
}

/// A foreign token's subject and grants, as verified.
#[derive(Debug, Clone)]
pub struct Verified {
    pub sub: String,
    pub access: Arc<super::scope::Grants>,
    exp: u64,
}

pub struct ExternalIssuer {
    keys: Vec<Key>,
    issuer: String,
    service: String,
    pub realm: String,
    verified: BoundedMap<String, Verified>,
}

impl ExternalIssuer {
    pub fn open(config: &IssuerConfig, service: &str, memory_entries: u64) -> Result<ExternalIssuer, IssuerError> {
        let mut keys = Vec::new();
        if let Some(path) = &config.keys {
            keys.extend(pem_keys(path)?);
        }
        if let Some(path) = &config.jwks {
            keys.extend(jwks_keys(path)?);
        }
        if keys.is_empty() {
            return Err(IssuerError::NoKeys);
        }
        Ok(ExternalIssuer {
            keys,
            issuer: config.issuer.clone(),
            service: service.to_string(),
            realm: config.realm.clone(),
            verified: BoundedMap::new("verified_foreign_tokens", memory_entries, Some(Duration::from_secs(300))),
        })
    }

    /// The subject and grants of `token` if one of the keys signed it, for our service, by the configured
    /// issuer, and it has not expired.
    pub fn verify(&self, token: &str) -> Result<Verified, String> {
        let now = super::token::now_secs();
        if let Some(v) = self.verified.get(token) {
            if v.exp > now {
                return Ok(v);
            }
            return Err("expired".into());
        }
        let header = jsonwebtoken::decode_header(token).map_err(|e| e.to_string())?;
        if !ASYMMETRIC.contains(&header.alg) {
            return Err(format!("algorithm {:?} is not accepted", header.alg));
        }
        let mut v = Validation::new(header.alg);
        v.set_audience(&[&self.service]);
        v.set_issuer(&[&self.issuer]);
        v.leeway = LEEWAY_SECS;
        v.validate_nbf = true;
        let mut last = "no key matches the token's key id".to_string();
        let candidates = self.keys.iter().filter(|k| k.kid.is_none() || header.kid.is_none() || k.kid == header.kid);
        for k in candidates {
            match jsonwebtoken::decode::<ForeignClaims>(token, &k.key, &v) {
                Ok(data) => {
                    let c = data.claims;
                    let verified = Verified { sub: c.sub, access: Arc::new(super::scope::Grants::of(&c.access)), exp: c.exp };
                    self.verified.insert(token.to_string(), verified.clone());
                    return Ok(verified);
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(last)
    }
}

fn read(path: &PathBuf) -> Result<String, IssuerError> {
    std::fs::read_to_string(path).map_err(|e| IssuerError::Keys { path: path.display().to_string(), why: e.to_string() })
}

/// Every key of a PEM bundle, each tried as EC, RSA and Ed25519 (whichever it is).
fn pem_keys(path: &PathBuf) -> Result<Vec<Key>, IssuerError> {
    let bad = |why: String| IssuerError::Keys { path: path.display().to_string(), why };
    let blocks = pem::parse_many(read(path)?).map_err(|e| bad(e.to_string()))?;
    let mut keys = Vec::new();
    for block in blocks {
        let text = pem::encode(&block);
        let key = DecodingKey::from_ec_pem(text.as_bytes())
            .or_else(|_| DecodingKey::from_rsa_pem(text.as_bytes()))
            .or_else(|_| DecodingKey::from_ed_pem(text.as_bytes()))
            .map_err(|e| bad(format!("a {} block is not a public key or certificate this server reads: {e}", block.tag())))?;
        keys.push(Key { key, kid: None });
    }
    Ok(keys)
}

fn jwks_keys(path: &PathBuf) -> Result<Vec<Key>, IssuerError> {
    let bad = |why: String| IssuerError::Keys { path: path.display().to_string(), why };
    let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&read(path)?).map_err(|e| bad(e.to_string()))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        if let jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_) = jwk.algorithm {
            return Err(bad("symmetric (oct) keys are not accepted".into()));
        }
        let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(e.to_string()))?;
        keys.push(Key { key, kid: jwk.common.key_id.clone() });
    }
    Ok(keys)
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};

    fn claims(aud: &str, iss: &str, exp: u64) -> serde_json::Value {
        serde_json::json!({"iss": iss, "sub": "ci", "aud": aud, "exp": exp, "access": [{"type":"repository","name":"a","actions":["pull"]}]})
    }

    #[test]
    fn tokens_of_the_configured_keys_issuer_and_service_only() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["issuer.test".to_string()]).unwrap().self_signed(&key).unwrap();
        let other = rcgen::KeyPair::generate().unwrap();
        // One bundle with the public key of one and the certificate of the other, as distribution's rootcertbundle.
        std::fs::write(dir.path().join("bundle.pem"), cert.pem()).unwrap();
        let config = IssuerConfig {
            realm: "https://auth.test/token".into(),
            issuer: "auth.test".into(),
            keys: Some(dir.path().join("bundle.pem")),
            jwks: None,
        };
        let ext = ExternalIssuer::open(&config, "registry.test", 10).unwrap();
        let now = super::super::token::now_secs();
        let sign = |k: &rcgen::KeyPair, c| encode(&Header::new(Algorithm::ES256), &c, &EncodingKey::from_ec_pem(k.serialize_pem().as_bytes()).unwrap()).unwrap();
        let good = ext.verify(&sign(&key, claims("registry.test", "auth.test", now + 60))).unwrap();
        assert_eq!((good.sub.as_str(), good.access.actions("a")), ("ci", super::super::scope::Actions::of(&[super::super::scope::Action::Pull])));
        assert!(ext.verify(&sign(&other, claims("registry.test", "auth.test", now + 60))).is_err(), "another key");
        assert!(ext.verify(&sign(&key, claims("elsewhere", "auth.test", now + 60))).is_err(), "another service");
        assert!(ext.verify(&sign(&key, claims("registry.test", "someone", now + 60))).is_err(), "another issuer");
        assert!(ext.verify(&sign(&key, claims("registry.test", "auth.test", now - 120))).is_err(), "expired");
        // The public key as a PEM PUBLIC KEY block works too.
        std::fs::write(dir.path().join("pub.pem"), other.public_key_pem()).unwrap();
        let ext2 = ExternalIssuer::open(&IssuerConfig { keys: Some(dir.path().join("pub.pem")), ..config.clone() }, "registry.test", 10).unwrap();
        assert!(ext2.verify(&sign(&other, claims("registry.test", "auth.test", now + 60))).is_ok());
        // The same key as a JWKS document, found by its key id.
        let raw = other.public_key_raw();
        assert_eq!((raw.len(), raw[0]), (65, 4), "an uncompressed P-256 point");
        let b64 = |b: &[u8]| base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, b);
        let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "k1", "alg": "ES256", "x": b64(&raw[1..33]), "y": b64(&raw[33..])}]});
        std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).unwrap();
        let ext3 = ExternalIssuer::open(&IssuerConfig { keys: None, jwks: Some(dir.path().join("jwks.json")), ..config.clone() }, "registry.test", 10).unwrap();
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some("k1".into());
        let with_kid = encode(&header, &claims("registry.test", "auth.test", now + 60), &EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap()).unwrap();
        assert!(ext3.verify(&with_kid).is_ok());
        header.kid = Some("k2".into());
        let wrong_kid = encode(&header, &claims("registry.test", "auth.test", now + 60), &EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap()).unwrap();
        assert!(ext3.verify(&wrong_kid).is_err(), "a key id no key has");
        assert!(ext3.verify(&sign(&key, claims("registry.test", "auth.test", now + 60))).is_err(), "not a key of the set");
        let oct = serde_json::json!({"keys": [{"kty": "oct", "k": "c2VjcmV0"}]});
        std::fs::write(dir.path().join("oct.json"), oct.to_string()).unwrap();
        assert!(ExternalIssuer::open(&IssuerConfig { keys: None, jwks: Some(dir.path().join("oct.json")), ..config.clone() }, "registry.test", 10).is_err());
        // A symmetric token is refused whatever its signature.
        let hs = encode(&Header::new(Algorithm::HS256), &claims("registry.test", "auth.test", now + 60), &EncodingKey::from_secret(b"k")).unwrap();
        assert!(ext.verify(&hs).is_err());
    }
}
