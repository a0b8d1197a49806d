//! breakwater: an OCI Distribution registry that will also be a coalescing pull-through cache and a resumable
//! replication engine. See ARCHITECTURE.md for the map of this crate.

pub mod auth;
pub mod bounded;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod connection;
pub mod flight;
pub mod fsck;
pub mod gc;
pub mod http;
pub mod meta;
pub mod oci;
pub mod pace;
pub mod pattern;
pub mod proxy;
pub mod registry;
pub mod replicate;
pub mod secret;
pub mod server;
pub mod shutdown;
pub mod storage;
pub mod tls;
pub mod upstream;
pub mod warm;

/// The parsers of untrusted input, reachable by the fuzz targets in `fuzz/` (cargo-fuzz) without making their
/// modules public. Not an API: the targets are its only users (see FUZZING.md).
#[doc(hidden)]
pub mod fuzzing {
    pub use crate::http::range::{parse as parse_range, RangeRequest};
    pub use crate::http::route::{parse as parse_route, Route};
    pub use crate::upstream::challenge::{parse as parse_challenge, Challenge};

    /// A PATCH's `Content-Range` header as the upload handler reads it; `None` when `value` cannot be a header
    /// value at all (the HTTP layer would have refused the request).
    pub fn parse_content_range(value: &[u8]) -> Option<Result<(u64, u64), String>> {
        let mut headers = axum::http::HeaderMap::new();
        headers.insert(axum::http::header::CONTENT_RANGE, axum::http::HeaderValue::from_bytes(value).ok()?);
        match crate::http::v2::content_range(&headers) {
            Ok(Some(range)) => Some(Ok(range)),
            Ok(None) => Some(Err("header not seen".into())),
            Err(e) => Some(Err(e.to_string())),
        }
    }

    /// The `last` of a listing's `Link` header, as the upstream client reads it; `None` as well when `value`
    /// cannot be a header value.
    pub fn parse_link_last(value: &[u8]) -> Option<String> {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(reqwest::header::LINK, reqwest::header::HeaderValue::from_bytes(value).ok()?);
        crate::upstream::catalog::next_last(&headers)
    }

    /// The `%XX` decoding applied to a `Link`'s `last`.
    pub fn percent_decode(s: &str) -> String {
        crate::upstream::catalog::percent_decode(s)
    }

    /// A configuration file's text, parsed as `--config` does.
    pub fn parse_config(text: &str) -> Result<crate::config::FileConfig, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }
}
