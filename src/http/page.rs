//! The status page at `/` (README, "Watch it"): one HTML file with its CSS and JavaScript inline, compiled into
//! the binary, which polls `/api/status` and `/api/replication` every second. Nothing is loaded from anywhere
//! else: the Content-Security-Policy allows the page's own script and style only, by their SHA-256, and the
//! page's requests to this server only.

use std::sync::LazyLock;

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use sha2::{Digest, Sha256};

const PAGE: &str = include_str!("page.html");

/// The policy, computed once from the page itself, so that editing the page cannot leave a stale hash.
static POLICY: LazyLock<String> = LazyLock::new(|| policy(PAGE));

/// The text of the page's one `<tag>` element (`script`, `style`): what its hash covers, byte for byte.
fn inline<'a>(page: &'a str, tag: &str) -> &'a str {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let Some(start) = page.find(&open).map(|i| i + open.len()) else { return "" };
    page[start..].find(&close).map_or("", |end| &page[start..start + end])
}

/// `'sha256-BASE64'`, as CSP names an inline element.
fn source_hash(text: &str) -> String {
    format!("'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(Sha256::digest(text.as_bytes())))
}

/// The Content-Security-Policy of `page`: its inline script and style, requests to this server (the API), the
/// empty `data:` favicon, and nothing else.
fn policy(page: &str) -> String {
    format!(
        "default-src 'none'; script-src {}; style-src {}; connect-src 'self'; img-src data:; base-uri 'none'; \
         form-action 'none'; frame-ancestors 'none'",
        source_hash(inline(page, "script")),
        source_hash(inline(page, "style")),
    )
}

/// `GET /`: the page. Never cached: a page from an older binary would poll for fields that moved.
pub async fn page() -> Response {
    let mut resp = PAGE.into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if let Ok(v) = HeaderValue::from_str(&POLICY) {
        h.insert(header::CONTENT_SECURITY_POLICY, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_inline_script_and_style_by_hash() {
        let p = policy("<style>a{}</style><script>x()</script>");
        assert!(p.contains(&source_hash("a{}")) && p.contains(&source_hash("x()")), "{p}");
        assert!(!p.contains("unsafe"));
        // The real page: one script, one style, both non-empty, nothing from elsewhere.
        assert!(!inline(PAGE, "script").is_empty() && !inline(PAGE, "style").is_empty());
        assert_eq!(PAGE.matches("<script").count(), 1);
        assert_eq!(PAGE.matches("<style").count(), 1);
        assert!(!PAGE.contains("http://") && !PAGE.contains("https://") && !PAGE.contains("//cdn"));
    }
}
