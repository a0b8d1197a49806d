//! Tag lists through the cache: the upstream's tags (every page of its listing, fetched once per repository at a
//! time and held for its tag TTL) merged with the tags the cache holds, and paged by us with `n` and `last`, since
//! registries such as distribution 2.8 ignore them on tags.

use std::sync::Arc;

use super::listing::{merge_page, Listing};
use super::{client_error, count_cache, Cached, Proxy, Target};
use crate::meta::Page;
use crate::oci::Tag;
use crate::registry::RegistryError;
use crate::upstream::UpstreamError;

type Result<T> = std::result::Result<T, RegistryError>;

/// The most tags one cached listing holds; a repository with more is answered from the first this many the
/// upstream listed (logged), rather than held whole.
pub const MAX_LISTED_TAGS: usize = 100_000;

/// The key under which an upstream's "no such repository" for a tag listing is remembered among the missing
/// references: a tag cannot contain `/`, so it is no reference's.
const TAGS_MISSING: &str = "/tags/list";

/// A page of a tag list through the cache.
pub struct TagPage {
    pub page: Page,
    /// Served from the tags the cache holds alone, because the upstream could not be asked (gets a `Warning`).
    pub stale: bool,
}

impl Proxy {
    /// At most `n` tags of the repository `target` names, after `last`. A mirror-mode name (`LocalOrCached`)
    /// lists the local repository of that name if there is one (as its manifests are served from it), else the
    /// default upstream's.
    pub async fn tag_list(&self, target: Target, last: Option<&str>, n: u64) -> Result<TagPage> {
        let local = |page| Ok(TagPage { page, stale: false });
        match target {
            Target::Local(repo) => local(self.registry.tags(&repo, last, n).await?),
            Target::Cached(c) => self.tags(&c, last, n).await,
            Target::LocalOrCached(repo, c) => match self.registry.tags(&repo, last, n).await {
                Err(RegistryError::NameUnknown) => self.tags(&c, last, n).await,
                page => local(page?),
            },
        }
    }

    /// At most `n` tags of `c` after `last`: the upstream's and the cache's own. When the upstream fails, the
    /// tags the cache holds, stale; when it does not know the repository, those too (not stale: that is the
    /// upstream's answer), or `NAME_UNKNOWN` if the cache holds none.
    pub async fn tags(&self, c: &Cached, last: Option<&str>, n: u64) -> Result<TagPage> {
        let held = match self.registry.tags(&c.local, last, n).await {
            Ok(page) => Some(page),
            Err(RegistryError::NameUnknown) => None,
            Err(e) => return Err(e),
        };
        match (self.upstream_tags(c).await, held) {
            (Ok(listed), held) => {
                let (held, held_more) = held.map_or((Vec::new(), false), |p| (p.items, p.more));
                let last = last.map(str::to_string);
                let (items, more) = merge_page(&listed.items, held, held_more, last.as_ref(), n, |t| t);
                Ok(TagPage { page: Page { items, more }, stale: false })
            }
            (Err(RegistryError::NameUnknown), Some(page)) => Ok(TagPage { page, stale: false }),
            (Err(e @ RegistryError::NameUnknown), None) => Err(e),
            (Err(e), Some(page)) => {
                tracing::warn!(upstream = c.upstream.name(), repo = %c.remote, error = %e,
                    "upstream unavailable; listing the cached tags");
                count_cache(c.upstream.stats(), "tags", "stale");
                c.upstream.stats().stale_serve();
                Ok(TagPage { page, stale: true })
            }
            (Err(e), None) => Err(e),
        }
    }

    /// The upstream's tags of `c`, sorted byte-wise: held if listed within the tag TTL, else from the one listing
    /// of the repository in progress.
    async fn upstream_tags(&self, c: &Cached) -> Result<Arc<Listing<String>>> {
        if let Some(listed) = self.tag_lists.fresh(&c.local, c.upstream.config.tag_ttl, c.upstream.stats()) {
            return Ok(listed);
        }
        if self.is_missing(&c.local, TAGS_MISSING).await {
            count_cache(c.upstream.stats(), "tags", "negative");
            return Err(RegistryError::NameUnknown);
        }
        let (upstream, remote) = (Arc::clone(&c.upstream), c.remote.clone());
        let listed = self
            .tag_lists
            .fetch(c.local.clone(), c.upstream.stats(), move || async move {
                let all = upstream.all_tags(&remote, MAX_LISTED_TAGS).await?;
                if all.truncated {
                    tracing::warn!(upstream = upstream.name(), repo = %remote, held = MAX_LISTED_TAGS,
                        "the upstream lists more tags than a cached listing holds; answering with the first");
                }
                Ok(sorted_tags(all.tags))
            })
            .await;
        match listed {
            Ok(tags) => Ok(tags),
            Err(e) => {
                if e == UpstreamError::NotFound {
                    self.mark_missing(&c.local, TAGS_MISSING).await;
                }
                Err(client_error(&c.upstream, e, RegistryError::NameUnknown))
            }
        }
    }
}

/// Tags in byte order (the order of `last=` paging), once each; strings that are not valid tags are dropped (the
/// upstream is not trusted to send only tags).
fn sorted_tags(mut tags: Vec<String>) -> Vec<String> {
    tags.retain(|t| t.parse::<Tag>().is_ok());
    tags.sort_unstable();
    tags.dedup();
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_tags_are_sorted_bytewise_and_valid() {
        let got = sorted_tags(["v2", "V1", "a", "v2", "../x", "", "b:c", "_x"].map(String::from).to_vec());
        assert_eq!(got, vec!["V1", "_x", "a", "v2"]);
    }
}
