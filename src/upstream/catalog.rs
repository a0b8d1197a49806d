//! Listing a registry: the catalog and tag lists, page by page, following `Link` headers (relative or absolute)
//! as distribution sends them.

use reqwest::header::{self, HeaderMap};
use reqwest::Method;

use super::{Upstream, UpstreamError};
use crate::oci::RepoName;

/// The largest listing page read: a page of 1000 names of up to 255 bytes each, with room to spare. A bigger
/// body is refused rather than held.
const MAX_LISTING_BODY: usize = 16 << 20;

/// Tags asked for per page when listing a repository's tags whole: distribution's largest page (registries
/// that ignore `n`, as distribution 2.8 does on tags, send everything at once).
const TAGS_PAGE: u64 = 1000;

/// One page of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    pub items: Vec<String>,
    /// The `last` to ask for the next page with, from the `Link` header; `None` on the last page.
    pub next: Option<String>,
}

/// The target of a `Link: <...>; rel="next"` header: a path on the registry or an absolute URL.
pub(crate) fn next_target(headers: &HeaderMap) -> Option<String> {
    let link = headers.get(header::LINK)?.to_str().ok()?;
    Some(link.split(';').next()?.trim().strip_prefix('<')?.strip_suffix('>')?.to_string())
}

/// The `last` query parameter of a `Link: <...>; rel="next"` header.
pub(crate) fn next_last(headers: &HeaderMap) -> Option<String> {
    let target = next_target(headers)?;
    let query = target.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == "last").then(|| percent_decode(v))
    })
}

/// Decodes `%XX` escapes (names and tags are ASCII; a registry may still escape `/` or `:`).
pub(crate) fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        // Digit by digit on bytes: slicing the `str` could cut a character, and `from_str_radix` takes a sign.
        let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
        if b[i] == b'%' {
            if let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2)) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(if b[i] == b'+' { b' ' } else { b[i] });
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Upstream {
    async fn list(&self, scope: &str, path: &str, field: &str, last: Option<&str>, n: u64) -> Result<Page, UpstreamError> {
        let mut url = format!("{path}?n={n}");
        if let Some(last) = last {
            url.push_str("&last=");
            url.push_str(last);
        }
        let resp = self.exchange(Method::GET, scope, &url, HeaderMap::new(), None).await?;
        let next = next_last(resp.headers());
        let body = super::read_limited(resp, MAX_LISTING_BODY, self.config.timeout).await?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| UpstreamError::Invalid(format!("listing: {e}")))?;
        let items = v
            .get(field)
            .and_then(|x| x.as_array())
            .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_string)).collect())
            .unwrap_or_default();
        Ok(Page { items, next })
    }

    /// A page of the catalog: at most `n` names after `last`.
    pub async fn catalog_page(&self, last: Option<&str>, n: u64) -> Result<Page, UpstreamError> {
        self.list("registry:catalog:*", "/v2/_catalog", "repositories", last, n).await
    }

    /// A page of `repo`'s tags. Registries that ignore `n`/`last` on tags (distribution) return all of them at
    /// once, without a `Link`.
    pub async fn tags_page(&self, repo: &RepoName, last: Option<&str>, n: u64) -> Result<Page, UpstreamError> {
        self.list(&format!("repository:{repo}:pull"), &format!("/v2/{repo}/tags/list"), "tags", last, n).await
    }

    /// Every tag of `repo`, following the registry's pages, at most `max` (then `truncated`), in the registry's
    /// order.
    pub async fn all_tags(&self, repo: &RepoName, max: usize) -> Result<AllTags, UpstreamError> {
        let mut all = AllTags { tags: Vec::new(), truncated: false };
        let mut last: Option<String> = None;
        loop {
            let page = self.tags_page(repo, last.as_deref(), TAGS_PAGE).await?;
            let added = page.items.len();
            all.tags.extend(page.items);
            if all.tags.len() > max || (all.tags.len() == max && page.next.is_some()) {
                all.tags.truncate(max);
                all.truncated = true;
                return Ok(all);
            }
            match page.next {
                // A page that adds nothing, or a `last` that does not move, ends the walk rather than loop.
                Some(next) if added > 0 && last.as_deref() != Some(next.as_str()) => last = Some(next),
                _ => return Ok(all),
            }
        }
    }
}

/// A repository's tags listed whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllTags {
    pub tags: Vec<String>,
    /// The listing stopped at the caller's bound; the registry has more.
    pub truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn link_headers() {
        let mut h = HeaderMap::new();
        assert_eq!(next_last(&h), None);
        h.insert(header::LINK, HeaderValue::from_static(r#"</v2/_catalog?last=a%2Fb&n=100>; rel="next""#));
        assert_eq!(next_last(&h).as_deref(), Some("a/b"));
        h.insert(header::LINK, HeaderValue::from_static(r#"<https://r.example/v2/x/tags/list?n=2&last=v1.0>; rel="next""#));
        assert_eq!(next_last(&h).as_deref(), Some("v1.0"));
        h.insert(header::LINK, HeaderValue::from_static(r#"</v2/_catalog?n=2>; rel="next""#));
        assert_eq!(next_last(&h), None);
    }

    /// Found by fuzz/link: a `%` whose next two bytes end inside a multi-byte character sliced the string there
    /// (a panic), and `%+1` decoded as byte 1, since `from_str_radix` takes a sign. Only `%` and two hex digits
    /// is an escape.
    #[test]
    fn percent_decode_takes_two_hex_digits_only() {
        assert_eq!(percent_decode("a%0\u{dd}="), "a%0\u{dd}=");
        assert_eq!(percent_decode("%+1x"), "% 1x");
        assert_eq!(percent_decode("%2f%2F%zz%4"), "//%zz%4");
    }
}
