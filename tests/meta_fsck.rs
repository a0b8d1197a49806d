//! The metadata layer's enumeration methods (what `fsck` and the sweep walk) against both backends: the
//! embedded SQLite and a real PostgreSQL (127.0.0.1:5432, trust auth; each run creates its own database).
//! Pages are asked for in small sizes so that every walk crosses page boundaries, and rows are removed between
//! pages, as a repair does, to show that no row is skipped or repeated.

mod common;

use std::sync::Arc;

use breakwater::meta::{ManifestRecord, Meta};
use breakwater::oci::{Algorithm, Digest, RepoName, Tag};

fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

fn digest(s: &str) -> Digest {
    Digest::of(Algorithm::Sha256, s.as_bytes())
}

fn record(content: &str) -> ManifestRecord {
    ManifestRecord {
        digest: digest(content),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: content.len() as u64,
        subject: None,
        artifact_type: None,
        annotations: None,
    }
}

/// Every (repo, digest) of `blob_links`, walked two rows at a time, unlinking every third row seen on the way.
async fn walk_links(meta: &dyn Meta) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let mut after: Option<(String, String)> = None;
    loop {
        let page = meta.links_page(after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), 2).await.unwrap();
        assert!(page.len() <= 2, "a page holds at most its limit");
        let Some(last) = page.last() else { break };
        after = Some((last.repo.clone(), last.digest.to_string()));
        for l in page {
            assert_eq!(l.size, 7);
            if seen.len() % 3 == 0 {
                meta.unlink_blob(&repo(&l.repo), &l.digest).await.unwrap();
            }
            seen.push((l.repo, l.digest.to_string()));
        }
    }
    seen
}

async fn exercise(meta: Arc<dyn Meta>) {
    // Names that sort differently byte-wise and under a locale's collation ('-' vs '_', '.', digits).
    let repos = ["a", "a-b", "a.b", "a_b", "a/b", "b0", "team/app"];
    let contents = ["one", "two", "three"];
    let mut want = Vec::new();
    for r in repos {
        for c in contents {
            meta.link_blob(&repo(r), &digest(c), 7).await.unwrap();
            want.push((r.to_string(), digest(c).to_string()));
        }
    }
    let mut sorted = want.clone();
    sorted.sort();
    let seen = walk_links(meta.as_ref()).await;
    let mut seen_sorted = seen.clone();
    seen_sorted.sort();
    assert_eq!(seen_sorted, sorted, "every link once, none skipped or repeated, with rows removed on the way");
    // Unlinked rows are gone; the others remain (a second walk sees exactly them).
    let remaining: Vec<_> = seen.iter().enumerate().filter(|(i, _)| i % 3 != 0).map(|(_, x)| x.clone()).collect();
    let mut again = Vec::new();
    let mut after: Option<(String, String)> = None;
    loop {
        let page = meta.links_page(after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), 5).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some((last.repo.clone(), last.digest.to_string()));
        again.extend(page.into_iter().map(|l| (l.repo, l.digest.to_string())));
    }
    again.sort();
    let mut remaining_sorted = remaining;
    remaining_sorted.sort();
    assert_eq!(again, remaining_sorted);
    let still_linked: Digest = remaining_sorted[0].1.parse().unwrap();

    // Manifest records and tags, paged.
    for r in ["x", "x-y", "x/y"] {
        for (c, t) in [("m1", "v1"), ("m2", "v2"), ("m3", "latest")] {
            meta.put_manifest(&repo(r), &record(c), None, Some(&t.parse::<Tag>().unwrap())).await.unwrap();
        }
    }
    let mut manifests = Vec::new();
    let mut after: Option<(String, String)> = None;
    loop {
        let page = meta.manifests_page(after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), 2).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some((last.repo.clone(), last.record.digest.to_string()));
        for m in page {
            assert_eq!(m.record, record(match m.record.digest.clone() {
                d if d == digest("m1") => "m1",
                d if d == digest("m2") => "m2",
                _ => "m3",
            }));
            manifests.push((m.repo, m.record.digest.to_string()));
        }
    }
    assert_eq!(manifests.len(), 9);
    let mut dedup = manifests.clone();
    dedup.sort();
    dedup.dedup();
    assert_eq!(dedup.len(), 9, "no manifest record repeated");

    let mut tags = Vec::new();
    let mut after: Option<(String, String)> = None;
    loop {
        let page = meta.tags_page(after.as_ref().map(|(a, b)| (a.as_str(), b.as_str())), 4).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some((last.repo.clone(), last.tag.clone()));
        tags.extend(page.into_iter().map(|t| (t.repo, t.tag, t.digest)));
    }
    assert_eq!(tags.len(), 9);
    assert!(tags.contains(&("x-y".to_string(), "latest".to_string(), digest("m3"))));
    assert!(tags.contains(&("x/y".to_string(), "v1".to_string(), digest("m1"))));

    // Which repositories hold a manifest; whether anything refers to some bytes.
    assert_eq!(meta.manifest_repos(&digest("m2")).await.unwrap(), ["x", "x-y", "x/y"].map(String::from).to_vec());
    assert!(meta.manifest_repos(&digest("nothing")).await.unwrap().is_empty());
    assert!(meta.bytes_referenced(&digest("m1")).await.unwrap(), "a manifest record refers to its bytes");
    assert!(meta.bytes_referenced(&still_linked).await.unwrap(), "a link refers to its bytes");
    assert!(!meta.bytes_referenced(&digest("never linked")).await.unwrap());
    assert!(!meta.bytes_referenced(&digest("cached")).await.unwrap());
    meta.cache_record(&digest("cached"), 11).await.unwrap();
    assert!(meta.bytes_referenced(&digest("cached")).await.unwrap(), "a cache record refers to its bytes");

    // Cache records, paged by digest.
    for c in ["c1", "c2", "c3", "c4"] {
        meta.cache_record(&digest(c), 3).await.unwrap();
    }
    let mut cached = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = meta.cache_page(after.as_deref(), 2).await.unwrap();
        let Some((last, _)) = page.last() else { break };
        after = Some(last.to_string());
        cached.extend(page);
    }
    let mut want: Vec<(Digest, u64)> = ["c1", "c2", "c3", "c4"].iter().map(|c| (digest(c), 3)).collect();
    want.push((digest("cached"), 11));
    want.sort();
    cached.sort();
    assert_eq!(cached, want);

    // Upload sessions, paged by id, with their creation time.
    let before = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() as i64;
    for id in ["u-3", "u-1", "u-2"] {
        meta.create_upload(id, &repo("team/app")).await.unwrap();
    }
    let first = meta.uploads_page(None, 2).await.unwrap();
    assert_eq!(first.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(), ["u-1", "u-2"]);
    assert!(first.iter().all(|u| u.repo == "team/app" && u.created_at >= before));
    let rest = meta.uploads_page(Some("u-2"), 2).await.unwrap();
    assert_eq!(rest.iter().map(|u| u.id.as_str()).collect::<Vec<_>>(), ["u-3"]);
    assert!(meta.uploads_page(Some("u-3"), 2).await.unwrap().is_empty());
}

#[tokio::test]
async fn sqlite_enumerates_in_pages() {
    let dir = tempfile::tempdir().unwrap();
    let meta = breakwater::meta::open(&breakwater::config::sqlite_url(dir.path())).await.unwrap();
    exercise(meta).await;
}

#[tokio::test]
async fn postgres_enumerates_in_pages() {
    let db = common::pg::PgDatabase::create().await;
    let meta = breakwater::meta::open(&db.url).await.unwrap();
    exercise(meta).await;
}
