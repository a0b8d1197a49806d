//! Retention policies (`[[gc.retention]]`): per repository glob, the tags matching a glob are kept if they are
//! among the `keep_last` most recently pushed, or were pushed or pulled within `keep_within`; the others go,
//! with the manifests only they kept, whose bytes the same run's sweep then frees (whatever `delete_untagged`
//! says: "delete the rest" means their space comes back).
//!
//! A tag several rules match is kept if any of them keeps it (each rule counts its own matches for
//! `keep_last`): retention deletes, so overlapping rules add protection, never remove it. Tags no rule matches,
//! and the caches' namespaces (eviction's), are left alone.
//!
//! The phase runs after older manifests' references are read (an index's children are then known to be kept)
//! and before the untagged policy. It walks the repositories in name order and each matching repository's
//! tags newest first, a page at a time (memory does not grow with the number of tags), and removes each tag in
//! a transaction of its own that re-checks it under its manifest digest's row lock (`Meta::gc_untag`).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use globset::GlobMatcher;

use super::{GcError, Run, BATCH};
use crate::meta::TagAge;

/// A retention rule, resolved from the config (globs compiled, keep conditions checked).
#[derive(Debug, Clone)]
pub struct Rule {
    /// The `repositories` glob as written: for the log and for errors.
    repositories: String,
    repo_glob: GlobMatcher,
    tag_glob: GlobMatcher,
    /// Tags kept by rank: the N most recently pushed or moved among those this rule matches.
    keep_last: Option<u64>,
    /// Tags kept by age: pushed, moved or pulled (by tag) within this long.
    keep_within: Option<Duration>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RuleError {
    #[error("[[gc.retention]] for {0:?} keeps nothing: give keep_last or keep_within_secs (without either, every matching tag would be deleted)")]
    KeepsNothing(String),
    #[error("[[gc.retention]] for {0:?}: keep_last must be at least 1 (leave it out to keep by age only)")]
    KeepLastZero(String),
    #[error("[[gc.retention]]: {0}")]
    Pattern(String),
}

impl Rule {
    /// A rule over the repositories `repositories` matches and their tags `tags` matches (the glob syntax of
    /// `crate::pattern`). Refused if it has no keep condition: it would delete every tag it matches.
    pub fn new(repositories: &str, tags: &str, keep_last: Option<u64>, keep_within: Option<Duration>) -> Result<Rule, RuleError> {
        if keep_last.is_none() && keep_within.is_none() {
            return Err(RuleError::KeepsNothing(repositories.to_string()));
        }
        if keep_last == Some(0) {
            return Err(RuleError::KeepLastZero(repositories.to_string()));
        }
        let matcher = |p: &str| crate::pattern::glob(p).map(|g| g.compile_matcher()).map_err(RuleError::Pattern);
        Ok(Rule { repositories: repositories.to_string(), repo_glob: matcher(repositories)?, tag_glob: matcher(tags)?, keep_last, keep_within })
    }

    fn matches_repo(&self, repo: &str) -> bool {
        self.repo_glob.is_match(repo)
    }

    /// Whether the rule keeps `t`, the `rank`th newest of the tags it matches, at `now` (Unix seconds).
    fn keeps(&self, rank: u64, t: &TagAge, now: i64) -> bool {
        let recent = |w: Duration| {
            let since = now.saturating_sub(w.as_secs().min(i64::MAX as u64) as i64);
            t.updated_at >= since || t.pulled_at >= since
        };
        self.keep_last.is_some_and(|n| rank <= n) || self.keep_within.is_some_and(recent)
    }
}

/// Whether tag `t` goes under `rules` (those matching its repository): some rule matches it and none keeps it.
/// Counts it, in `seen`, for every rule that matches it; tags come newest first, so the count is its rank.
fn doomed(rules: &[&Rule], seen: &mut [u64], t: &TagAge, now: i64) -> bool {
    let (mut matched, mut kept) = (false, false);
    for (rule, n) in rules.iter().zip(seen.iter_mut()) {
        if rule.tag_glob.is_match(&t.tag) {
            matched = true;
            *n += 1;
            kept |= rule.keeps(*n, t, now);
        }
    }
    matched && !kept
}

impl Run<'_> {
    /// The retention phase: every repository some rule matches, outside the caches' namespaces.
    pub(super) async fn apply_retention(&mut self) -> Result<(), GcError> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs() as i64;
        let mut last: Option<String> = None;
        loop {
            let page = self.meta.list_repos(last.as_deref(), BATCH as u64).await?;
            for repo in &page.items {
                let rules: Vec<&Rule> = self.opts.retention.iter().filter(|r| r.matches_repo(repo)).collect();
                if !rules.is_empty() && !self.is_cache_repo(repo) {
                    self.retain_repo(repo, &rules, now).await?;
                }
            }
            if !page.more {
                return Ok(());
            }
            last = page.items.last().cloned();
        }
    }

    /// Walks `repo`'s tags newest first and removes those `rules` let go.
    async fn retain_repo(&mut self, repo: &str, rules: &[&Rule], now: i64) -> Result<(), GcError> {
        let mut seen = vec![0u64; rules.len()];
        let mut after: Option<(i64, String)> = None;
        loop {
            let page = self.meta.tags_by_age(repo, after.as_ref().map(|(at, t)| (*at, t.as_str())), BATCH as u64).await?;
            let Some(last) = page.last() else { return Ok(()) };
            after = Some((last.updated_at, last.tag.clone()));
            self.renew().await?;
            for t in &page {
                if !doomed(rules, &mut seen, t, now) {
                    continue;
                }
                // `None`: pushed, moved or pulled since it was read, or its manifest is being pushed: it stays.
                let Some(done) = self.meta.gc_untag(repo, t, self.cut, self.opts.dry_run).await? else { continue };
                tracing::info!(repo, tag = t.tag, digest = %t.digest, manifests = done.manifests, dry_run = self.opts.dry_run,
                    rule = rules.iter().map(|r| r.repositories.as_str()).collect::<Vec<_>>().join(","), "tag removed by retention");
                self.report.tags_removed += 1;
                self.report.manifests_retired += done.manifests;
                self.report.retention_bytes += done.bytes;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::{Algorithm, Digest};

    fn tag(name: &str, updated_at: i64, pulled_at: i64) -> TagAge {
        TagAge { tag: name.into(), digest: Digest::of(Algorithm::Sha256, name.as_bytes()), updated_at, pulled_at }
    }

    #[test]
    fn a_rule_without_a_keep_condition_is_refused() {
        assert_eq!(Rule::new("team/**", "*", None, None).unwrap_err(), RuleError::KeepsNothing("team/**".into()));
        assert_eq!(Rule::new("team/**", "*", Some(0), None).unwrap_err(), RuleError::KeepLastZero("team/**".into()));
        assert!(matches!(Rule::new("team/{a", "*", Some(1), None), Err(RuleError::Pattern(_))));
        assert!(Rule::new("team/**", "*", Some(1), None).is_ok());
        assert!(Rule::new("team/**", "*", None, Some(Duration::from_secs(60))).is_ok());
    }

    #[test]
    fn globs_match_repositories_by_component_and_tags() {
        let r = Rule::new("team/*", "v*", Some(1), None).unwrap();
        assert!(r.matches_repo("team/app"));
        assert!(!r.matches_repo("team/app/sub"), "* stays within one component");
        assert!(!r.matches_repo("other/app"));
        assert!(r.tag_glob.is_match("v1.2") && !r.tag_glob.is_match("latest"));
    }

    #[test]
    fn keep_last_keeps_the_newest_matching_tags_and_keep_within_the_recent_or_pulled() {
        let now = 1_000_000;
        let last2 = Rule::new("a", "*", Some(2), None).unwrap();
        let hour = Rule::new("a", "*", None, Some(Duration::from_secs(3600))).unwrap();
        let old = tag("old", now - 7200, 0);
        assert!(last2.keeps(2, &old, now) && !last2.keeps(3, &old, now));
        assert!(!hour.keeps(1, &old, now), "pushed two hours ago, never pulled");
        assert!(hour.keeps(9, &tag("pulled", now - 7200, now - 60), now), "pulled a minute ago");
        assert!(hour.keeps(9, &tag("pushed", now - 60, 0), now));
        let both = Rule::new("a", "*", Some(1), Some(Duration::from_secs(3600))).unwrap();
        assert!(both.keeps(1, &old, now) && !both.keeps(2, &old, now), "either condition keeps");
    }

    #[test]
    fn a_tag_goes_only_if_some_rule_matches_it_and_none_keeps_it() {
        let now = 1_000_000;
        let releases = Rule::new("a", "v*", Some(1), None).unwrap();
        let all = Rule::new("a", "*", Some(3), None).unwrap();
        let rules = [&releases, &all];
        let mut seen = [0, 0];
        let tags = [tag("latest", now, 0), tag("v3", now - 1, 0), tag("v2", now - 2, 0), tag("v1", now - 3, 0)];
        let gone: Vec<&str> = tags.iter().filter(|t| doomed(&rules, &mut seen, t, now)).map(|t| t.tag.as_str()).collect();
        // v2 is not among the newest "v*", but is the third newest of all: the second rule keeps it.
        assert_eq!(gone, ["v1"]);
        assert_eq!(seen, [3, 4]);
        let only_releases = [&releases];
        let mut seen = [0];
        assert!(!doomed(&only_releases, &mut seen, &tag("latest", 0, 0), now), "no rule matches: untouched");
    }
}
