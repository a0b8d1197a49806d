//! Harbor's own API, for listing a Harbor source: its `/v2/_catalog` is admin-only and unpaged in practice, so
//! replication lists projects and their repositories through `/api/v2.0`, page by page, sorted by name.

use reqwest::header::{self, HeaderMap};
use reqwest::Method;

use super::{Upstream, UpstreamError};

/// Harbor's largest page.
pub const HARBOR_PAGE: u64 = 100;

impl Upstream {
    /// GETs a Harbor API path (credentials, if configured, as basic auth: Harbor's API does not use tokens).
    async fn harbor_names(&self, path: &str) -> Result<Vec<String>, UpstreamError> {
        let mut h = HeaderMap::new();
        if let Some(basic) = self.basic_header() {
            h.insert(header::AUTHORIZATION, basic);
        }
        let resp = self.exchange(Method::GET, "", path, h, None).await?;
        let body = resp.bytes().await.map_err(|e| UpstreamError::Unavailable(format!("harbor listing: {e}")))?;
        let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| UpstreamError::Invalid(format!("harbor listing: {e}")))?;
        Ok(v.as_array()
            .map(|a| a.iter().filter_map(|x| x.get("name")?.as_str().map(str::to_string)).collect())
            .unwrap_or_default())
    }

    /// Page `page` (from 1) of the projects, by name.
    pub async fn harbor_projects(&self, page: u64) -> Result<Vec<String>, UpstreamError> {
        self.harbor_names(&format!("/api/v2.0/projects?page={page}&page_size={HARBOR_PAGE}&sort=name")).await
    }

    /// Page `page` (from 1) of a project's repositories (full names, `project/repo`), by name.
    pub async fn harbor_repositories(&self, project: &str, page: u64) -> Result<Vec<String>, UpstreamError> {
        self.harbor_names(&format!("/api/v2.0/projects/{project}/repositories?page={page}&page_size={HARBOR_PAGE}&sort=name")).await
    }
}
