//! Parses `/v2/...` paths. Repository names contain slashes, so a path is matched from its end: the last
//! segments say what is asked (`manifests/<ref>`, `blobs/<digest>`, `blobs/uploads/<id>`, `tags/list`,
//! `referrers/<digest>`) and everything before them is the name.

/// What a `/v2/` path addresses. Names, references and digests are still raw strings here; the handlers
/// validate them so that each gets the spec's own error code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route<'a> {
    Base,
    Catalog,
    Tags { name: &'a str },
    Manifest { name: &'a str, reference: &'a str },
    Blob { name: &'a str, digest: &'a str },
    UploadStart { name: &'a str },
    Upload { name: &'a str, id: &'a str },
    Referrers { name: &'a str, digest: &'a str },
}

impl Route<'_> {
    /// A short, bounded label for metrics and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags { .. } => "tags",
            Route::Manifest { .. } => "manifest",
            Route::Blob { .. } => "blob",
            Route::UploadStart { .. } | Route::Upload { .. } => "upload",
            Route::Referrers { .. } => "referrers",
        }
    }
}

/// Parses a full request path; `None` if it is not a distribution API path.
pub fn parse(path: &str) -> Option<Route<'_>> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Route::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Route::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Route::Tags { name });
    }
    if let Some(name) = rest.strip_suffix("/blobs/uploads/").or_else(|| rest.strip_suffix("/blobs/uploads")) {
        return Some(Route::UploadStart { name });
    }
    let (head, last) = rest.rsplit_once('/')?;
    let (name, verb) = head.rsplit_once('/')?;
    if name.is_empty() || last.is_empty() {
        return None;
    }
    match verb {
        "manifests" => Some(Route::Manifest { name, reference: last }),
        "blobs" => Some(Route::Blob { name, digest: last }),
        "referrers" => Some(Route::Referrers { name, digest: last }),
        "uploads" => head.strip_suffix("/blobs/uploads").map(|name| Route::Upload { name, id: last }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(parse("/v2/"), Some(Route::Base));
        assert_eq!(parse("/v2"), Some(Route::Base));
        assert_eq!(parse("/v2/_catalog"), Some(Route::Catalog));
        assert_eq!(parse("/v2/a/b/tags/list"), Some(Route::Tags { name: "a/b" }));
        assert_eq!(parse("/v2/a/manifests/latest"), Some(Route::Manifest { name: "a", reference: "latest" }));
        assert_eq!(
            parse("/v2/x/manifests/y/manifests/z"),
            Some(Route::Manifest { name: "x/manifests/y", reference: "z" })
        );
        assert_eq!(parse("/v2/a/b/blobs/sha256:00"), Some(Route::Blob { name: "a/b", digest: "sha256:00" }));
        assert_eq!(parse("/v2/a/blobs/uploads/"), Some(Route::UploadStart { name: "a" }));
        assert_eq!(parse("/v2/a/b/blobs/uploads/123"), Some(Route::Upload { name: "a/b", id: "123" }));
        assert_eq!(parse("/v2/a/referrers/sha256:00"), Some(Route::Referrers { name: "a", digest: "sha256:00" }));
        // A repository literally named ".../blobs" still has uploads addressed unambiguously.
        assert_eq!(parse("/v2/blobs/blobs/uploads/"), Some(Route::UploadStart { name: "blobs" }));
        assert_eq!(parse("/v2/a/unknown/x"), None);
        assert_eq!(parse("/v2/manifests/x"), None);
        assert_eq!(parse("/v3/a/manifests/x"), None);
        assert_eq!(parse("/v2/a/manifests/"), None);
    }
}
