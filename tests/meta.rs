//! The metadata layer against both of its backends: the embedded SQLite and a real PostgreSQL
//! (127.0.0.1:5432, trust auth; each run creates its own database and drops it afterwards).

use std::sync::Arc;

use breakwater::meta::{ManifestRecord, Meta, Page};
use breakwater::oci::{Algorithm, Digest, RepoName, Tag};

const PG_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

fn repo(s: &str) -> RepoName {
    s.parse().unwrap()
}

fn tag(s: &str) -> Tag {
    s.parse().unwrap()
}

fn digest(s: &str) -> Digest {
    Digest::of(Algorithm::Sha256, s.as_bytes())
}

fn record(content: &str, subject: Option<&str>, artifact_type: Option<&str>) -> ManifestRecord {
    ManifestRecord {
        digest: digest(content),
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        size: content.len() as u64,
        subject: subject.map(digest),
        artifact_type: artifact_type.map(str::to_string),
        annotations: Some(r#"{"k":"v"}"#.into()),
    }
}

/// A fresh PostgreSQL database, dropped when the guard goes.
struct PgDatabase {
    name: String,
}

impl PgDatabase {
    async fn create() -> (PgDatabase, String) {
        sqlx::any::install_default_drivers();
        let name = format!("bw_test_{}", uuid::Uuid::new_v4().simple());
        let admin = sqlx::AnyPool::connect(PG_ADMIN_URL).await.expect("PostgreSQL on 127.0.0.1:5432");
        sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
        admin.close().await;
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        (PgDatabase { name }, url)
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside the test's runtime; a small one of its own removes the database.
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                if let Ok(admin) = sqlx::AnyPool::connect(PG_ADMIN_URL).await {
                    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&admin).await;
                }
            });
        })
        .join()
        .unwrap();
    }
}

/// The behaviour every backend must have.
async fn exercise(meta: Arc<dyn Meta>) {
    let a = repo("team/app");
    let b = repo("team/other");

    // Blob links are per repository.
    assert!(!meta.blob_linked(&a, &digest("layer")).await.unwrap());
    meta.link_blob(&a, &digest("layer"), 5).await.unwrap();
    meta.link_blob(&a, &digest("layer"), 5).await.unwrap(); // idempotent
    assert!(meta.blob_linked(&a, &digest("layer")).await.unwrap());
    assert!(!meta.blob_linked(&b, &digest("layer")).await.unwrap());
    assert!(meta.repo_exists(&a).await.unwrap());
    assert!(!meta.repo_exists(&b).await.unwrap());

    // Manifests, tags, re-tagging.
    let m1 = record("m1", None, None);
    let m2 = record("m2", None, None);
    meta.put_manifest(&a, &m1, None, Some(&tag("v1"))).await.unwrap();
    meta.put_manifest(&a, &m2, None, Some(&tag("latest"))).await.unwrap();
    assert_eq!(meta.resolve_tag(&a, &tag("v1")).await.unwrap(), Some(m1.digest.clone()));
    assert_eq!(meta.manifest(&a, &m1.digest).await.unwrap(), Some(m1.clone()));
    assert_eq!(meta.manifest(&b, &m1.digest).await.unwrap(), None);
    meta.put_manifest(&a, &m1, None, Some(&tag("latest"))).await.unwrap();
    assert_eq!(meta.resolve_tag(&a, &tag("latest")).await.unwrap(), Some(m1.digest.clone()));

    // Tags sort byte-wise (uppercase before lowercase, '-' before digits), and page with `last`.
    for t in ["B", "a", "a-1", "a1", "Z9", "_x"] {
        meta.put_manifest(&a, &m2, None, Some(&tag(t))).await.unwrap();
    }
    let all = meta.list_tags(&a, None, 100).await.unwrap();
    assert_eq!(all.items, ["B", "Z9", "_x", "a", "a-1", "a1", "latest", "v1"]);
    assert!(!all.more);
    let first = meta.list_tags(&a, None, 3).await.unwrap();
    assert_eq!(first, Page { items: vec!["B".into(), "Z9".into(), "_x".into()], more: true });
    let next = meta.list_tags(&a, Some("_x"), 5).await.unwrap();
    assert_eq!(next, Page { items: vec!["a".into(), "a-1".into(), "a1".into(), "latest".into(), "v1".into()], more: false });
    assert_eq!(meta.list_tags(&a, Some("zzz"), 5).await.unwrap().items, Vec::<String>::new());
    assert_eq!(meta.list_tags(&a, None, 0).await.unwrap(), Page { items: vec![], more: true });

    // Deleting a tag keeps the manifest; deleting the manifest drops its tags.
    assert!(meta.delete_tag(&a, &tag("v1")).await.unwrap());
    assert!(!meta.delete_tag(&a, &tag("v1")).await.unwrap());
    assert!(meta.manifest(&a, &m1.digest).await.unwrap().is_some());
    assert!(meta.delete_manifest(&a, &m2.digest).await.unwrap());
    assert!(!meta.delete_manifest(&a, &m2.digest).await.unwrap());
    assert_eq!(meta.resolve_tag(&a, &tag("a1")).await.unwrap(), None);
    assert_eq!(meta.list_tags(&a, None, 100).await.unwrap().items, ["latest"]);

    // Referrers, with the artifact type filter.
    let sig = record("sig", Some("m1"), Some("application/vnd.example.sig"));
    let sbom = record("sbom", Some("m1"), Some("application/vnd.example.sbom"));
    meta.put_manifest(&a, &sig, None, None).await.unwrap();
    meta.put_manifest(&a, &sbom, None, None).await.unwrap();
    let all = meta.referrers(&a, &m1.digest, None, None, 100).await.unwrap();
    let mut want = vec![sig.clone(), sbom.clone()];
    want.sort_by(|x, y| x.digest.to_string().cmp(&y.digest.to_string()));
    assert_eq!(all, Page { items: want.clone(), more: false }, "in digest order");
    // Paged in digest order after `last`.
    let first = meta.referrers(&a, &m1.digest, None, None, 1).await.unwrap();
    assert_eq!(first, Page { items: vec![want[0].clone()], more: true });
    let after = want[0].digest.to_string();
    let second = meta.referrers(&a, &m1.digest, None, Some(&after), 1).await.unwrap();
    assert_eq!(second, Page { items: vec![want[1].clone()], more: false });
    let sigs = meta.referrers(&a, &m1.digest, Some("application/vnd.example.sig"), None, 100).await.unwrap();
    assert_eq!(sigs.items, vec![sig]);
    assert!(meta.referrers(&b, &m1.digest, None, None, 100).await.unwrap().items.is_empty());

    // Catalog paging.
    for r in ["z", "team/a-b", "team/a_b", "0"] {
        meta.link_blob(&repo(r), &digest("layer"), 5).await.unwrap();
    }
    let names = meta.list_repos(None, 100).await.unwrap().items;
    assert_eq!(names, ["0", "team/a-b", "team/a_b", "team/app", "z"]);
    assert_eq!(meta.list_repos(Some("team/a_b"), 2).await.unwrap(), Page { items: vec!["team/app".into(), "z".into()], more: false });

    // Unlinking.
    assert!(meta.unlink_blob(&a, &digest("layer")).await.unwrap());
    assert!(!meta.unlink_blob(&a, &digest("layer")).await.unwrap());

    // Upload sessions.
    meta.create_upload("u-1", &a).await.unwrap();
    assert_eq!(meta.upload_repo("u-1").await.unwrap().as_deref(), Some("team/app"));
    meta.delete_upload("u-1").await.unwrap();
    assert_eq!(meta.upload_repo("u-1").await.unwrap(), None);
}

#[tokio::test]
async fn sqlite_backend() {
    let dir = tempfile::tempdir().unwrap();
    let meta = breakwater::meta::open(&breakwater::config::sqlite_url(dir.path())).await.unwrap();
    exercise(meta).await;
    // State survives reopening the file.
    let meta = breakwater::meta::open(&breakwater::config::sqlite_url(dir.path())).await.unwrap();
    assert!(meta.repo_exists(&repo("team/app")).await.unwrap());
}

#[tokio::test]
async fn postgres_backend() {
    let (_db, url) = PgDatabase::create().await;
    let meta = breakwater::meta::open(&url).await.unwrap();
    exercise(meta).await;
    // Opening again over an existing schema works (the schema is created idempotently).
    let meta = breakwater::meta::open(&url).await.unwrap();
    assert!(meta.repo_exists(&repo("team/app")).await.unwrap());
}

/// Cut-offs under which everything stored so far is old, and no claim made before `claims_before_ms` holds.
fn cut_after_now(claims_before_ms: i64) -> breakwater::meta::Cutoffs {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    breakwater::meta::Cutoffs { links_before: now.as_secs() as i64 + 100, claims_before: claims_before_ms }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

/// Retention's SQL: tags newest first in pages, and a tag's removal, which a change since it was read, or a
/// claim of its manifest, prevents, and which retires the manifests only that tag kept.
async fn retention(meta: Arc<dyn Meta>) {
    let r = repo("keep/app");
    let cut = cut_after_now(now_ms() + 60_000);
    for i in 0..5 {
        meta.put_manifest(&r, &record(&format!("m{i}"), None, None), Some(&[]), Some(&tag(&format!("t{i}")))).await.unwrap();
    }
    // Paged newest first; within one second, by tag descending.
    let mut seen = Vec::new();
    let mut after: Option<(i64, String)> = None;
    loop {
        let page = meta.tags_by_age(r.as_str(), after.as_ref().map(|(a, t)| (*a, t.as_str())), 2).await.unwrap();
        let Some(last) = page.last() else { break };
        after = Some((last.updated_at, last.tag.clone()));
        seen.extend(page.into_iter().map(|t| t.tag));
    }
    assert_eq!(seen, ["t4", "t3", "t2", "t1", "t0"]);
    let tags = meta.tags_by_age(r.as_str(), None, 10).await.unwrap();
    let t0 = tags.iter().find(|t| t.tag == "t0").unwrap().clone();
    assert_eq!(t0.pulled_at, 0, "never pulled");

    // Changed since it was read (a push moved it, a pull touched it): it stays.
    let moved = breakwater::meta::TagAge { digest: digest("elsewhere"), ..t0.clone() };
    let touched = breakwater::meta::TagAge { pulled_at: t0.pulled_at + 1, ..t0.clone() };
    let older = breakwater::meta::TagAge { updated_at: t0.updated_at - 1, ..t0.clone() };
    for stale in [&moved, &touched, &older] {
        assert_eq!(meta.gc_untag(r.as_str(), stale, cut, false).await.unwrap(), None, "{stale:?}");
    }
    meta.note_pull(&r, &tag("t0")).await.unwrap();
    let pulled = meta.tags_by_age(r.as_str(), None, 10).await.unwrap().into_iter().find(|t| t.tag == "t0").unwrap();
    assert!(pulled.pulled_at > 0, "a pull is recorded");
    assert_eq!(meta.gc_untag(r.as_str(), &t0, cut, false).await.unwrap(), None, "pulled since it was read");

    // Its manifest claimed by a push in progress: it stays.
    let t1 = tags.iter().find(|t| t.tag == "t1").unwrap().clone();
    meta.claim(&[&t1.digest], true).await.unwrap();
    assert_eq!(meta.gc_untag(r.as_str(), &t1, cut_after_now(now_ms() - 60_000), false).await.unwrap(), None);

    // A dry run says, and changes nothing; the real thing removes the tag and its manifest.
    let gone = breakwater::meta::Untagged { manifests: 1, bytes: 2 };
    assert_eq!(meta.gc_untag(r.as_str(), &pulled, cut, true).await.unwrap(), Some(gone));
    assert!(meta.resolve_tag(&r, &tag("t0")).await.unwrap().is_some());
    assert_eq!(meta.gc_untag(r.as_str(), &pulled, cut, false).await.unwrap(), Some(gone));
    assert_eq!(meta.resolve_tag(&r, &tag("t0")).await.unwrap(), None);
    assert!(meta.manifest(&r, &digest("m0")).await.unwrap().is_none());
    assert_eq!(meta.gc_untag(r.as_str(), &pulled, cut, false).await.unwrap(), None, "removed once");

    // A manifest two tags share goes with the second; an index goes with its child, a layer only it lists and
    // its referrer, but not a layer another image lists.
    let (layer, shared) = (digest("layer"), digest("shared"));
    meta.link_blob(&r, &layer, 1000).await.unwrap();
    meta.link_blob(&r, &shared, 500).await.unwrap();
    meta.put_manifest(&r, &record("child", None, None), Some(&[layer.clone(), shared.clone()]), None).await.unwrap();
    meta.put_manifest(&r, &record("other", None, None), Some(&[shared.clone()]), Some(&tag("other"))).await.unwrap();
    meta.put_manifest(&r, &record("index", None, None), Some(&[digest("child")]), Some(&tag("a"))).await.unwrap();
    meta.put_manifest(&r, &record("index", None, None), None, Some(&tag("b"))).await.unwrap();
    meta.put_manifest(&r, &record("sig", Some("index"), None), Some(&[]), None).await.unwrap();
    let tags = meta.tags_by_age(r.as_str(), None, 20).await.unwrap();
    let by = |name: &str| tags.iter().find(|t| t.tag == name).unwrap().clone();
    assert_eq!(meta.gc_untag(r.as_str(), &by("a"), cut, false).await.unwrap(), Some(Default::default()), "b keeps the index");
    let all = breakwater::meta::Untagged { manifests: 3, bytes: ("index".len() + "child".len() + "sig".len()) as u64 + 1000 };
    assert_eq!(meta.gc_untag(r.as_str(), &by("b"), cut, true).await.unwrap(), Some(all), "a dry run counts the tree");
    assert_eq!(meta.gc_untag(r.as_str(), &by("b"), cut, false).await.unwrap(), Some(all));
    for m in ["index", "child", "sig"] {
        assert!(meta.manifest(&r, &digest(m)).await.unwrap().is_none(), "{m} retired");
    }
    assert!(meta.manifest(&r, &digest("other")).await.unwrap().is_some());
}

#[tokio::test]
async fn sqlite_retention() {
    let dir = tempfile::tempdir().unwrap();
    retention(breakwater::meta::open(&breakwater::config::sqlite_url(dir.path())).await.unwrap()).await;
}

#[tokio::test]
async fn postgres_retention() {
    let (_db, url) = PgDatabase::create().await;
    retention(breakwater::meta::open(&url).await.unwrap()).await;
}

/// Claims of the same digests listed in different orders (a manifest's layers in its order, another manifest's in
/// another) run at once on PostgreSQL without deadlocking: each claim locks its rows in one order, digest order,
/// the order the collector's marks take them too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_in_any_order_never_deadlock_on_postgres() {
    let (_db, url) = PgDatabase::create().await;
    let meta = breakwater::meta::open(&url).await.unwrap();
    let digests: Vec<Digest> = (0..64u32).map(|i| Digest::of(Algorithm::Sha256, &i.to_le_bytes())).collect();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let (meta, mut mine) = (Arc::clone(&meta), digests.clone());
        if t % 2 == 1 {
            mine.reverse();
        }
        tasks.push(tokio::spawn(async move {
            let refs: Vec<&Digest> = mine.iter().collect();
            for _ in 0..20 {
                meta.claim(&refs, true).await.map_err(|e| e.to_string())?;
            }
            Ok::<(), String>(())
        }));
    }
    for task in tasks {
        assert_eq!(task.await.unwrap(), Ok(()), "a claim failed");
    }
}
