//! Which repositories and tags a replication policy copies, and under which destination names.

use std::cmp::Ordering;
use std::collections::BTreeSet;

use globset::GlobSet;
use regex::Regex;

use crate::pattern::{glob, glob_set};

/// Repository include/exclude globs. No include pattern means every repository.
pub struct RepoFilter {
    include: Option<GlobSet>,
    exclude: GlobSet,
}

impl RepoFilter {
    pub fn new(include: &[String], exclude: &[String]) -> Result<RepoFilter, String> {
        let include = if include.is_empty() { None } else { Some(glob_set(include)?) };
        Ok(RepoFilter { include, exclude: glob_set(exclude)? })
    }

    pub fn matches(&self, repo: &str) -> bool {
        self.include.as_ref().is_none_or(|i| i.is_match(repo)) && !self.exclude.is_match(repo)
    }
}

/// A tag pattern: a glob, or a regular expression after `regex:` (anchored: it must match the whole tag).
enum TagPattern {
    Glob(globset::GlobMatcher),
    Regex(Regex),
}

impl TagPattern {
    fn parse(p: &str) -> Result<TagPattern, String> {
        match p.strip_prefix("regex:") {
            Some(re) => Regex::new(&format!("^(?:{re})$")).map(TagPattern::Regex).map_err(|e| format!("tag regex {re:?}: {e}")),
            None => Ok(TagPattern::Glob(glob(p)?.compile_matcher())),
        }
    }

    fn matches(&self, tag: &str) -> bool {
        match self {
            TagPattern::Glob(g) => g.is_match(tag),
            TagPattern::Regex(r) => r.is_match(tag),
        }
    }
}

/// Tag selection: include and exclude patterns, then the latest N by tag order.
pub struct TagFilter {
    include: Vec<TagPattern>,
    exclude: Vec<TagPattern>,
    latest: Option<usize>,
}

impl TagFilter {
    pub fn new(include: &[String], exclude: &[String], latest: Option<usize>) -> Result<TagFilter, String> {
        let parse = |ps: &[String]| ps.iter().map(|p| TagPattern::parse(p)).collect::<Result<Vec<_>, _>>();
        Ok(TagFilter { include: parse(include)?, exclude: parse(exclude)?, latest })
    }

    /// The tags of one listing page to copy (include and exclude patterns), in tag order. With `--latest` they
    /// are only candidates: [`Latest`] keeps the last N across every page.
    pub fn select_page(&self, mut tags: Vec<String>) -> Vec<String> {
        tags.retain(|t| (self.include.is_empty() || self.include.iter().any(|p| p.matches(t))) && !self.exclude.iter().any(|p| p.matches(t)));
        tags.sort_by(|a, b| natural_cmp(a, b));
        tags.dedup();
        tags
    }

    /// `--latest N`: how many of the last tags to keep, if limited.
    pub fn latest(&self) -> Option<usize> {
        self.latest
    }

    /// The tags to copy out of all of them, in tag order.
    pub fn select(&self, tags: Vec<String>) -> Vec<String> {
        let selected = self.select_page(tags);
        match self.latest {
            None => selected,
            Some(n) => {
                let mut latest = Latest::new(n);
                selected.into_iter().for_each(|t| latest.offer(t));
                latest.into_sorted()
            }
        }
    }
}

/// A tag ordered by [`natural_cmp`] (which is equal only for identical tags, so a set of them deduplicates).
#[derive(PartialEq, Eq)]
struct NaturalTag(String);

impl Ord for NaturalTag {
    fn cmp(&self, other: &Self) -> Ordering {
        natural_cmp(&self.0, &other.0)
    }
}

impl PartialOrd for NaturalTag {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// The last N tags in tag order among those offered: a bounded set (at most N entries however many tags a
/// repository has), so `--latest N` holds N tags rather than the whole listing.
pub struct Latest {
    n: usize,
    kept: BTreeSet<NaturalTag>,
}

impl Latest {
    pub fn new(n: usize) -> Latest {
        Latest { n, kept: BTreeSet::new() }
    }

    pub fn offer(&mut self, tag: String) {
        if self.n == 0 {
            return;
        }
        let tag = NaturalTag(tag);
        if self.kept.len() == self.n && self.kept.first().is_some_and(|least| tag <= *least) {
            return;
        }
        self.kept.insert(tag);
        if self.kept.len() > self.n {
            self.kept.pop_first();
        }
    }

    /// Tags held now (never more than N).
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// The kept tags, in tag order.
    pub fn into_sorted(self) -> Vec<String> {
        self.kept.into_iter().map(|t| t.0).collect()
    }
}

/// What `--latest N` counts as the latest tags.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LatestBy {
    /// The last N in tag order ([`natural_cmp`]): nothing fetched to decide.
    #[default]
    Tag,
    /// The N whose image config says they were `created` last (a manifest and a config GET per candidate).
    Created,
}

/// When an image was created, as its config's `created` says (nanoseconds since the epoch); `None` (no `created`,
/// or not RFC 3339) sorts before every time.
pub type Created = Option<i128>;

/// The N newest tags by creation time among those offered, ties going to the later tag in tag order: a bounded set
/// like [`Latest`] (at most N entries however many tags are offered).
pub struct NewestCreated {
    n: usize,
    kept: BTreeSet<(Created, NaturalTag)>,
}

impl NewestCreated {
    pub fn new(n: usize) -> NewestCreated {
        NewestCreated { n, kept: BTreeSet::new() }
    }

    pub fn offer(&mut self, created: Created, tag: String) {
        if self.n == 0 {
            return;
        }
        let entry = (created, NaturalTag(tag));
        if self.kept.len() == self.n && self.kept.first().is_some_and(|least| entry <= *least) {
            return;
        }
        self.kept.insert(entry);
        if self.kept.len() > self.n {
            self.kept.pop_first();
        }
    }

    /// Tags held now (never more than N).
    pub fn len(&self) -> usize {
        self.kept.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kept.is_empty()
    }

    /// The kept tags, in tag order.
    pub fn into_sorted(self) -> Vec<String> {
        let mut tags: Vec<String> = self.kept.into_iter().map(|(_, t)| t.0).collect();
        tags.sort_by(|a, b| natural_cmp(a, b));
        tags
    }
}

/// Parses an image config's `created` (RFC 3339); anything else is `None`.
pub fn parse_created(s: &str) -> Created {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).ok().map(|t| t.unix_timestamp_nanos())
}

/// Orders tags as people number them: digit runs compare by value, so `v1.10` comes after `v1.9`.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut a, mut b) = (a.as_bytes(), b.as_bytes());
    loop {
        match (a.first(), b.first()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x.is_ascii_digit() && y.is_ascii_digit() => {
                let da = a.iter().take_while(|c| c.is_ascii_digit()).count();
                let db = b.iter().take_while(|c| c.is_ascii_digit()).count();
                let (na, nb) = (trim_zeros(&a[..da]), trim_zeros(&b[..db]));
                let ord = na.len().cmp(&nb.len()).then(na.cmp(nb)).then(da.cmp(&db));
                if ord != Ordering::Equal {
                    return ord;
                }
                a = &a[da..];
                b = &b[db..];
            }
            (Some(x), Some(y)) => {
                if x != y {
                    return x.cmp(y);
                }
                a = &a[1..];
                b = &b[1..];
            }
        }
    }
}

fn trim_zeros(d: &[u8]) -> &[u8] {
    let i = d.iter().position(|c| *c != b'0').unwrap_or(d.len());
    &d[i..]
}

/// Namespace rewrites `FROM=TO`: the first rule whose `FROM` prefixes the name replaces that prefix.
pub struct Rewrite(Vec<(String, String)>);

impl Rewrite {
    pub fn new(rules: &[String]) -> Result<Rewrite, String> {
        rules
            .iter()
            .map(|r| r.split_once('=').map(|(f, t)| (f.to_string(), t.to_string())).ok_or_else(|| format!("rewrite {r:?}: expected FROM=TO")))
            .collect::<Result<_, _>>()
            .map(Rewrite)
    }

    pub fn apply(&self, name: &str) -> String {
        for (from, to) in &self.0 {
            if let Some(rest) = name.strip_prefix(from.as_str()) {
                return format!("{to}{rest}");
            }
        }
        name.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn repository_globs() {
        let f = RepoFilter::new(&s(&["team/*", "lib/**", "r???0", "{a,b}/x"]), &s(&["team/secret"])).unwrap();
        assert!(f.matches("team/app"));
        assert!(!f.matches("team/app/deep"), "* stays in one component");
        assert!(f.matches("lib/x/y/z"));
        assert!(f.matches("r1230"));
        assert!(!f.matches("r12300"));
        assert!(f.matches("a/x") && f.matches("b/x") && !f.matches("c/x"));
        assert!(!f.matches("team/secret"));
        assert!(RepoFilter::new(&[], &[]).unwrap().matches("anything/at/all"));
        assert!(RepoFilter::new(&s(&["a{"]), &[]).is_err());
    }

    #[test]
    fn tags_filter_sort_and_latest() {
        let f = TagFilter::new(&s(&["v*", "regex:[0-9]+\\.[0-9]+"]), &s(&["*-rc*"]), Some(3)).unwrap();
        let tags = s(&["latest", "v1.9", "v1.10", "v1.2", "v2.0-rc1", "1.5", "1.50", "x1.5"]);
        assert_eq!(f.select(tags), s(&["v1.2", "v1.9", "v1.10"]));
        let all = TagFilter::new(&[], &[], None).unwrap();
        assert_eq!(all.select(s(&["b", "a", "a"])), s(&["a", "b"]));
        assert!(TagFilter::new(&s(&["regex:("]), &[], None).is_err());
    }

    #[test]
    fn latest_holds_at_most_n_tags() {
        let mut latest = Latest::new(5);
        let mut most = 0;
        // Offered in byte order, as a registry lists them: the natural last five are spread over the listing.
        let mut tags: Vec<String> = (0..100_000).map(|i| format!("v{i}")).collect();
        tags.sort();
        for t in tags.iter().chain(tags.iter()) {
            latest.offer(t.clone());
            most = most.max(latest.len());
        }
        assert_eq!(most, 5, "never more than N tags held");
        assert_eq!(latest.into_sorted(), s(&["v99995", "v99996", "v99997", "v99998", "v99999"]));
        let mut none = Latest::new(0);
        none.offer("v1".into());
        assert!(none.is_empty());
    }

    #[test]
    fn newest_created_holds_n_and_breaks_ties_by_tag_order() {
        let mut newest = NewestCreated::new(2);
        let t = |s: &str| parse_created(s);
        assert!(t("2024-01-01T00:00:00+02:00") < t("2024-01-01T00:00:00.5Z"), "offsets and fractions compare as times");
        newest.offer(t("2024-03-01T00:00:00Z"), "v1".into());
        newest.offer(None, "v9".into());
        newest.offer(t("2024-01-01T00:00:00Z"), "v2".into());
        newest.offer(t("2024-02-01T00:00:00Z"), "v3".into());
        newest.offer(t("garbage"), "v10".into());
        assert!(newest.len() <= 2);
        assert_eq!(newest.into_sorted(), s(&["v1", "v3"]));
        let mut tie = NewestCreated::new(1);
        tie.offer(t("2024-01-01T00:00:00Z"), "v10".into());
        tie.offer(t("2024-01-01T00:00:00Z"), "v9".into());
        assert_eq!(tie.into_sorted(), s(&["v10"]), "a tie goes to the later tag");
        let mut none = NewestCreated::new(1);
        none.offer(None, "v1".into());
        none.offer(None, "v2".into());
        assert_eq!(none.into_sorted(), s(&["v2"]), "without created, tag order");
    }

    #[test]
    fn natural_order() {
        assert_eq!(natural_cmp("v1.9", "v1.10"), Ordering::Less);
        assert_eq!(natural_cmp("v01", "v1"), Ordering::Greater);
        assert_eq!(natural_cmp("a", "a1"), Ordering::Less);
    }

    #[test]
    fn rewrites() {
        let r = Rewrite::new(&s(&["src/=mirror/", "=all/"])).unwrap();
        assert_eq!(r.apply("src/app"), "mirror/app");
        assert_eq!(r.apply("other"), "all/other");
        assert!(Rewrite::new(&s(&["nope"])).is_err());
    }
}
