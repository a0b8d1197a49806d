//! The source's repositories, in a fixed order, a page at a time, starting after the checkpoint.
//!
//! A registry is listed through `/v2/_catalog` (names in byte order, paged with `last`); a Harbor instance
//! through its project and repository API (projects by name, then each project's repositories by name).

use std::collections::VecDeque;

use super::copy::retry;
use crate::upstream::{Upstream, UpstreamError, HARBOR_PAGE};

/// What kind of listing the source offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// The distribution API's `/v2/_catalog`.
    #[default]
    Registry,
    /// Harbor's `/api/v2.0/projects` and `/api/v2.0/projects/{p}/repositories`.
    Harbor,
}

/// A walk over the source's repositories.
pub enum Lister {
    Catalog { last: Option<String>, done: bool },
    Harbor(HarborWalk),
}

/// Where a Harbor walk is.
pub struct HarborWalk {
    /// The checkpoint as (project, repository): everything up to it is done.
    after: Option<(String, String)>,
    project_page: u64,
    projects: VecDeque<String>,
    projects_done: bool,
    /// The project being listed, its next repository page, and whether its repositories are exhausted.
    current: Option<(String, u64, bool)>,
    buffer: VecDeque<String>,
}

fn project_of(name: &str) -> &str {
    name.split_once('/').map_or(name, |(p, _)| p)
}

impl Lister {
    /// A walk of `kind` starting after `mark` (a repository name).
    pub fn new(kind: SourceKind, mark: Option<String>) -> Lister {
        match kind {
            SourceKind::Registry => Lister::Catalog { last: mark, done: false },
            SourceKind::Harbor => Lister::Harbor(HarborWalk {
                after: mark.map(|m| (project_of(&m).to_string(), m)),
                project_page: 1,
                projects: VecDeque::new(),
                projects_done: false,
                current: None,
                buffer: VecDeque::new(),
            }),
        }
    }

    /// Whether the walk has listed its last page, as far as it knows (a Harbor walk learns it by asking again).
    pub fn exhausted(&self) -> bool {
        matches!(self, Lister::Catalog { done: true, .. })
    }

    /// The next page of at most `n` repository names; `None` when the walk is over.
    pub async fn next_page(&mut self, src: &Upstream, n: u64) -> Result<Option<Vec<String>>, UpstreamError> {
        match self {
            Lister::Catalog { last, done } => {
                if *done {
                    return Ok(None);
                }
                let page = retry([src, src], || src.catalog_page(last.as_deref(), n)).await?;
                match page.next {
                    Some(next) if !page.items.is_empty() && Some(&next) != last.as_ref() => *last = Some(next),
                    _ => *done = true,
                }
                Ok(Some(page.items))
            }
            Lister::Harbor(w) => w.next_page(src, n as usize).await,
        }
    }
}

impl HarborWalk {
    async fn next_page(&mut self, src: &Upstream, n: usize) -> Result<Option<Vec<String>>, UpstreamError> {
        while self.buffer.len() < n.max(1) {
            let (project, page) = match self.current.take() {
                Some((project, page, false)) => (project, page),
                _ => match self.next_project(src).await? {
                    Some(p) => (p, 1),
                    None => break,
                },
            };
            let names = retry([src, src], || src.harbor_repositories(&project, page)).await?;
            let last_page = (names.len() as u64) < HARBOR_PAGE;
            for name in names {
                let skip = self.after.as_ref().is_some_and(|(ap, an)| project == *ap && name <= *an);
                if !skip {
                    self.buffer.push_back(name);
                }
            }
            self.current = Some((project, page + 1, last_page));
        }
        if self.buffer.is_empty() {
            return Ok(None);
        }
        let take = n.max(1).min(self.buffer.len());
        Ok(Some(self.buffer.drain(..take).collect()))
    }

    /// The next project to list, skipping those before the checkpoint's.
    async fn next_project(&mut self, src: &Upstream) -> Result<Option<String>, UpstreamError> {
        loop {
            if let Some(p) = self.projects.pop_front() {
                if self.after.as_ref().is_some_and(|(ap, _)| p < *ap) {
                    continue;
                }
                return Ok(Some(p));
            }
            if self.projects_done {
                return Ok(None);
            }
            let page = self.project_page;
            let projects = retry([src, src], || src.harbor_projects(page)).await?;
            self.projects_done = (projects.len() as u64) < HARBOR_PAGE;
            self.project_page += 1;
            self.projects.extend(projects);
        }
    }
}
