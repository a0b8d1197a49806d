//! The TOML configuration file: any text is parsed or refused without a panic, and what it accepts resolves
//! to settings that keep their promises (valid upstream names and URLs, a timeout of at least a second,
//! replication concurrency and page size in range, filters that compile or are refused).
#![no_main]

use std::time::Duration;

use breakwater::fuzzing::parse_config;
use breakwater::oci::RepoName;
use breakwater::replicate::{RepoFilter, Rewrite, TagFilter};
use breakwater::upstream::UpstreamConfig;
use libfuzzer_sys::fuzz_target;

fn check_upstream(u: &UpstreamConfig) {
    assert!(!u.name.contains('/') && u.name.parse::<RepoName>().is_ok(), "upstream name {:?}", u.name);
    assert!(u.url.starts_with("http://") || u.url.starts_with("https://"), "url {:?}", u.url);
    assert!(u.timeout >= Duration::from_secs(1));
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(file) = parse_config(text) else { return };
    for r in &file.replication {
        let Ok(p) = r.policy("http://127.0.0.1:5000") else { continue };
        assert!(!p.job.is_empty());
        assert!(p.concurrency >= 1);
        assert!((1..=1000).contains(&p.page_size));
        check_upstream(&p.from);
        check_upstream(&p.to);
        // What `replicate::run` builds first; refusing is fine, panicking is not.
        let _ = RepoFilter::new(&p.include, &p.exclude).map(|f| f.matches("library/alpine"));
        let _ = TagFilter::new(&p.tags, &p.exclude_tags, p.latest).map(|f| f.select(vec!["v1.10".into(), "v1.9".into(), "latest".into()]));
        let _ = Rewrite::new(&p.rewrite).map(|w| w.apply("library/alpine"));
    }
    for u in file.upstream {
        if let Ok(u) = u.resolve() {
            check_upstream(&u);
        }
    }
});
