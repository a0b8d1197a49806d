//! Authentication of requests between members: a header naming the sending member, the time, and an
//! HMAC-SHA256 with the cluster secret over both and the request's method and path (query included):
//!
//! `X-Breakwater-Member: MEMBER-ID UNIX-SECONDS HEX-HMAC`
//!
//! The secret itself never crosses the network. A signature is accepted within `MAX_SKEW` of its time (clocks
//! of members may differ a little); within that window it could be replayed, which is why only reads that
//! change nothing are signed this way.

use std::time::Duration;

use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const HEADER: &str = "x-breakwater-member";
/// How far a signature's time may be from the receiver's clock.
pub const MAX_SKEW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("not a cluster member's request (no {HEADER} header)")]
    Missing,
    #[error("{HEADER}: expected MEMBER-ID UNIX-SECONDS HMAC")]
    Malformed,
    #[error("{HEADER}: signed at {0}, too far from this member's clock")]
    Stale(i64),
    #[error("{HEADER}: wrong signature (another cluster secret?)")]
    Signature,
}

fn mac(secret: &str, member: &str, at: i64, method: &str, path: &str) -> Hmac<Sha256> {
    // Any key length is valid for HMAC; `new_from_slice` cannot fail.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(format!("{member}\n{at}\n{method}\n{path}").as_bytes());
    mac
}

/// The signature of `method path` by `member` at `at`, in lower-case hex.
fn tag(secret: &str, member: &str, at: i64, method: &str, path: &str) -> String {
    mac(secret, member, at, method, path).finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// The header value by which `member` signs `method path` at `now` (Unix seconds).
pub fn sign(secret: &str, member: &str, method: &str, path: &str, now: i64) -> String {
    format!("{member} {now} {}", tag(secret, member, now, method, path))
}

/// Checks `header` for `method path` at `now`; the sending member's id if it holds.
pub fn verify(secret: &str, header: Option<&str>, method: &str, path: &str, now: i64) -> Result<String, PeerError> {
    let header = header.ok_or(PeerError::Missing)?;
    let mut fields = header.split(' ');
    let (Some(member), Some(at), Some(tag), None) = (fields.next(), fields.next(), fields.next(), fields.next()) else {
        return Err(PeerError::Malformed);
    };
    if member.is_empty() || !member.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return Err(PeerError::Malformed);
    }
    let at: i64 = at.parse().map_err(|_| PeerError::Malformed)?;
    if tag.len() != 64 || !tag.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(PeerError::Malformed);
    }
    if at.abs_diff(now) > MAX_SKEW.as_secs() {
        return Err(PeerError::Stale(at));
    }
    // Constant-time comparison: the time to refuse says nothing about the right tag.
    let expected = self::tag(secret, member, at, method, path);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_bytes(), tag.as_bytes())) {
        return Err(PeerError::Signature);
    }
    Ok(member.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    #[test]
    fn a_signature_holds_for_its_request_only() {
        let h = sign("s3cret", "m-1", "GET", "/internal/cluster/ping", NOW);
        assert_eq!(verify("s3cret", Some(&h), "GET", "/internal/cluster/ping", NOW + 30), Ok("m-1".into()));
        assert_eq!(verify("other", Some(&h), "GET", "/internal/cluster/ping", NOW), Err(PeerError::Signature));
        assert_eq!(verify("s3cret", Some(&h), "GET", "/internal/cluster/ping?x=1", NOW), Err(PeerError::Signature));
        assert_eq!(verify("s3cret", Some(&h), "POST", "/internal/cluster/ping", NOW), Err(PeerError::Signature));
        let forged = h.replacen("m-1", "m-2", 1);
        assert_eq!(verify("s3cret", Some(&forged), "GET", "/internal/cluster/ping", NOW), Err(PeerError::Signature));
    }

    #[test]
    fn old_missing_and_malformed_signatures_are_refused() {
        let h = sign("k", "m", "GET", "/p", NOW);
        assert_eq!(verify("k", Some(&h), "GET", "/p", NOW + 61), Err(PeerError::Stale(NOW)));
        assert_eq!(verify("k", Some(&h), "GET", "/p", NOW - 61), Err(PeerError::Stale(NOW)));
        assert_eq!(verify("k", None, "GET", "/p", NOW), Err(PeerError::Missing));
        let tag = h.rsplit(' ').next().unwrap();
        let upper = format!("m {NOW} {}", tag.to_uppercase());
        for bad in ["", "m", "m 1", "m x abcd", "m 1 zz", "m 1 ab cd", "m\n 1 ab", "m/x 1 ab", &upper, &format!("m {NOW} {tag}0")] {
            assert_eq!(verify("k", Some(bad), "GET", "/p", NOW), Err(PeerError::Malformed), "{bad:?}");
        }
    }
}
