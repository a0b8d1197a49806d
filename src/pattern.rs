//! Repository-name patterns, the one glob syntax of every setting that names repositories (replication filters,
//! access rules): `*` and `?` stay within one path component, `**` crosses them, `{a,b}` alternates.

use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};

pub fn glob(pattern: &str) -> Result<Glob, String> {
    GlobBuilder::new(pattern).literal_separator(true).build().map_err(|e| format!("pattern {pattern:?}: {e}"))
}

pub fn glob_set(patterns: &[String]) -> Result<GlobSet, String> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        b.add(glob(p)?);
    }
    b.build().map_err(|e| e.to_string())
}
