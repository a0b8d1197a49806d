//! Where an upstream's credentials may go: the token realm a `WWW-Authenticate: Bearer` challenge names is chosen
//! by whoever answers as the upstream, so credentials are sent to it only when it belongs to the upstream.
//!
//! A realm is the upstream's own when its host is the upstream's host or shares its registrable domain
//! (`registry-1.docker.io` and `auth.docker.io` are both `docker.io`), and it does not downgrade an HTTPS
//! upstream to plain HTTP; or when the upstream's configuration lists it (`token_realms`: URLs or hosts). Any
//! other realm gets an anonymous token request (as distribution 3.1 does).
//!
//! The registrable domain is the last two labels of the host, or three (or more) when the last labels are a
//! suffix under which unrelated parties register names: country suffixes like `co.uk`, and shared hosting
//! domains like `azurewebsites.net`, where two tenants' hosts share two labels and nothing else. The list is
//! short and built in, not the whole Public Suffix List: a realm it wrongly refuses can be allowed with
//! `token_realms`, and registries' token services sit on the registry's host or its company's domain.

/// Suffixes under which names are registered by unrelated parties (a registrable domain is one label more).
const SHARED_SUFFIXES: &[&str] = &[
    // Second-level country suffixes.
    "co.uk", "org.uk", "ac.uk", "gov.uk", "me.uk", "ltd.uk", "plc.uk", "net.uk", "com.au", "net.au", "org.au",
    "edu.au", "gov.au", "co.nz", "org.nz", "co.jp", "ne.jp", "or.jp", "ac.jp", "co.kr", "or.kr", "com.cn",
    "net.cn", "org.cn", "com.hk", "com.tw", "com.sg", "com.br", "com.ar", "com.mx", "co.in", "net.in", "co.za",
    "com.tr", "co.il", "com.ua", "com.pl",
    // Shared hosting: every tenant's host is a name under these.
    "amazonaws.com", "s3.amazonaws.com", "cloudfront.net", "azurewebsites.net", "azurecr.io", "cloudapp.net",
    "core.windows.net", "blob.core.windows.net", "azurefd.net", "trafficmanager.net", "appspot.com", "run.app",
    "web.app", "firebaseapp.com", "pkg.dev", "herokuapp.com", "github.io", "gitlab.io", "pages.dev", "workers.dev",
    "r2.dev", "netlify.app", "vercel.app", "fly.dev", "onrender.com", "ngrok.io", "ngrok.app",
];

/// The parts of a URL the decision needs.
struct Origin {
    scheme: String,
    host: String,
}

fn origin_of(url: &str) -> Option<Origin> {
    let u = reqwest::Url::parse(url).ok()?;
    let host = u.host_str()?.trim_end_matches('.').to_ascii_lowercase();
    Some(Origin { scheme: u.scheme().to_string(), host })
}

/// The registrable domain of `host`: an IP address or a one-label name is its own; otherwise the longest
/// shared suffix it is under plus one label, or its last two labels.
pub(crate) fn registrable_domain(host: &str) -> &str {
    let is_ip = host.parse::<std::net::IpAddr>().is_ok() || host.starts_with('[');
    if is_ip {
        return host;
    }
    let labels_from = |n: usize| -> &str {
        // The byte index where the last `n` labels start.
        let mut start = host.len();
        for _ in 0..n {
            match host[..start].rfind('.') {
                Some(dot) => start = dot,
                None => return host,
            }
            if start == 0 {
                return host;
            }
        }
        &host[start + 1..]
    };
    let suffix_labels = SHARED_SUFFIXES
        .iter()
        .filter(|s| host.ends_with(&format!(".{s}")))
        .map(|s| s.split('.').count())
        .max()
        .unwrap_or(1);
    labels_from(suffix_labels + 1)
}

/// Whether the upstream at `upstream_url` may send its credentials to the token realm `realm`, given the
/// upstream's `allowed` realms (URLs, compared without their query, or hosts).
pub(crate) fn may_send_credentials(upstream_url: &str, realm: &str, allowed: &[String]) -> bool {
    let Some(r) = origin_of(realm) else {
        return false;
    };
    if allowed.iter().any(|a| allows(a, realm, &r)) {
        return true;
    }
    let Some(u) = origin_of(upstream_url) else {
        return false;
    };
    let downgrade = u.scheme == "https" && r.scheme != "https";
    !downgrade && (r.host == u.host || registrable_domain(&r.host) == registrable_domain(&u.host))
}

/// Whether one `token_realms` entry allows `realm` (whose origin is `r`).
fn allows(entry: &str, realm: &str, r: &Origin) -> bool {
    let entry = entry.trim();
    if entry.contains("://") {
        let without_query = |s: &str| s.split(['?', '#']).next().unwrap_or("").trim_end_matches('/').to_ascii_lowercase();
        return without_query(entry) == without_query(realm);
    }
    entry.trim_end_matches('.').eq_ignore_ascii_case(&r.host)
}

/// Checks one `token_realms` entry of the configuration: an http(s) URL with a host, or a bare host name.
pub fn check_allowed(entry: &str) -> Result<(), String> {
    let entry = entry.trim();
    let ok = if entry.contains("://") {
        (entry.starts_with("http://") || entry.starts_with("https://")) && origin_of(entry).is_some()
    } else {
        // A host alone (no port: a realm is allowed by host whatever its port), or a bracketed IPv6 address.
        let bracketed = entry.starts_with('[') && entry.ends_with(']');
        !entry.is_empty() && (bracketed || entry.bytes().all(|b| b.is_ascii_alphanumeric() || b"-.".contains(&b)))
    };
    if ok {
        Ok(())
    } else {
        Err(format!("token realm {entry:?} must be an http(s) URL or a host name"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registrable_domains() {
        assert_eq!(registrable_domain("registry-1.docker.io"), "docker.io");
        assert_eq!(registrable_domain("auth.docker.io"), "docker.io");
        assert_eq!(registrable_domain("docker.io"), "docker.io");
        assert_eq!(registrable_domain("ghcr.io"), "ghcr.io");
        assert_eq!(registrable_domain("localhost"), "localhost");
        assert_eq!(registrable_domain("127.0.0.1"), "127.0.0.1");
        assert_eq!(registrable_domain("[::1]"), "[::1]");
        assert_eq!(registrable_domain("registry.example.co.uk"), "example.co.uk");
        assert_eq!(registrable_domain("co.uk"), "co.uk");
        assert_eq!(registrable_domain("mine.azurewebsites.net"), "mine.azurewebsites.net");
        assert_eq!(registrable_domain("bucket.s3.amazonaws.com"), "bucket.s3.amazonaws.com");
        assert_eq!(registrable_domain("a.b.bucket.s3.amazonaws.com"), "bucket.s3.amazonaws.com");
        assert_eq!(registrable_domain(".io"), ".io");
    }

    #[test]
    fn credentials_go_only_to_the_upstreams_own_realms() {
        let hub = "https://registry-1.docker.io";
        assert!(may_send_credentials(hub, "https://auth.docker.io/token", &[]));
        assert!(may_send_credentials("https://ghcr.io", "https://ghcr.io/token?x=y", &[]));
        assert!(may_send_credentials("http://127.0.0.1:5000", "http://127.0.0.1:9999/token", &[]), "another port, same host");
        assert!(!may_send_credentials(hub, "https://auth.evil.example/token", &[]));
        assert!(!may_send_credentials(hub, "http://auth.docker.io/token", &[]), "no downgrade to plain HTTP");
        assert!(!may_send_credentials("http://localhost:5000", "http://127.0.0.1:5001/token", &[]), "two hosts");
        assert!(!may_send_credentials("https://a.example.co.uk", "https://b.other.co.uk/token", &[]));
        assert!(may_send_credentials("https://a.example.co.uk", "https://auth.example.co.uk/token", &[]));
        assert!(!may_send_credentials("https://mine.azurewebsites.net", "https://theirs.azurewebsites.net/t", &[]));
        assert!(!may_send_credentials(hub, "not a url", &[]));
    }

    #[test]
    fn configured_realms_are_allowed() {
        let up = "https://registry.example";
        let by_url = ["https://auth.other.example/token".to_string()];
        assert!(may_send_credentials(up, "https://auth.other.example/token?scope=x", &by_url));
        assert!(!may_send_credentials(up, "https://auth.other.example/elsewhere", &by_url));
        let by_host = ["Auth.Other.Example".to_string()];
        assert!(may_send_credentials(up, "https://auth.other.example/any/path", &by_host));
        assert!(!may_send_credentials(up, "https://evil.other.example/token", &by_host));
        assert!(check_allowed("https://auth.example/token").is_ok());
        assert!(check_allowed("auth.example").is_ok());
        assert!(check_allowed("127.0.0.1").is_ok());
        assert!(check_allowed("[::1]").is_ok());
        assert!(check_allowed("127.0.0.1:8080").is_err(), "a host, without a port");
        assert!(check_allowed("ftp://x").is_err());
        assert!(check_allowed("").is_err());
        assert!(check_allowed("a b").is_err());
    }
}
