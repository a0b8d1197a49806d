//! Bounded memory: no response and no in-memory map grows with what is stored or with what clients send.
//! Tag lists and referrers are paged with `Link` (and clients that follow it, skopeo and breakwater's own
//! replication, still get everything), replication lists tags a page at a time, the replication API pages its
//! failures, every in-memory map of the cache holds at most `--cache-memory-entries` entries (read back from the
//! `breakwater_cache_entries{kind}` gauges), and made-up HTTP methods share one metrics label. Every test drives
//! the real binary over real sockets and asserts counts, never time.

mod common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use common::auth::TokenServer;
use common::oci::{metric, push_blob, push_image, push_manifest, OCI_MANIFEST};
use common::relay::Relay;
use common::synthetic::{Options, Synthetic};
use common::{Breakwater, Distribution};
use serde_json::Value;

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
/// Largest page breakwater serves for names (and its default for tags).
const MAX_PAGE: usize = 1000;
/// Largest page of referrers.
const MAX_REFERRERS_PAGE: usize = 100;

fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().build().unwrap()
}

/// GETs `url`: status, JSON body, and the `Link` header.
async fn get_json(url: &str) -> (u16, Value, Option<String>) {
    let r = client().get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let link = r.headers().get("link").map(|v| v.to_str().unwrap().to_string());
    let body = r.bytes().await.unwrap();
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null), link)
}

/// The target of `Link: <target>; rel="next"`.
fn link_target(link: &str) -> String {
    assert!(link.ends_with("rel=\"next\""), "{link}");
    link.split(';').next().unwrap().trim().trim_start_matches('<').trim_end_matches('>').to_string()
}

/// Follows `Link` from `first` (a path) to the end; returns every page's `key` array.
async fn pages(base: &str, first: &str, key: &str) -> Vec<Vec<Value>> {
    let mut out = Vec::new();
    let mut next = Some(first.to_string());
    while let Some(path) = next.take() {
        let (status, body, link) = get_json(&format!("{base}{path}")).await;
        assert_eq!(status, 200, "{path}: {body}");
        out.push(body[key].as_array().unwrap_or_else(|| panic!("{path}: no {key}: {body}")).clone());
        next = link.map(|l| link_target(&l));
        assert!(out.len() < 10_000, "the Link chain does not end");
    }
    out
}

/// Runs `n` async jobs, `width` at a time.
async fn concurrently<F, Fut>(n: u64, width: u64, f: F)
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let f = Arc::new(f);
    let mut tasks = Vec::new();
    for w in 0..width {
        let f = Arc::clone(&f);
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < n {
                f(i).await;
                i += width;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

/// Pushes one image and tags it `count` times as `t0000`, `t0001`, ...; returns the tags in byte order.
async fn push_many_tags(base: &str, repo: &str, count: u64) -> Vec<String> {
    let image = push_image(base, repo, "t0000", &[100], 7).await;
    let (base_s, repo_s, bytes) = (base.to_string(), repo.to_string(), Arc::new(image.manifest));
    concurrently(count - 1, 8, move |i| {
        let (base, repo, bytes) = (base_s.clone(), repo_s.clone(), Arc::clone(&bytes));
        async move {
            push_manifest(&base, &repo, &format!("t{:04}", i + 1), OCI_MANIFEST, &bytes).await;
        }
    })
    .await;
    (0..count).map(|i| format!("t{i:04}")).collect()
}

// ---------------------------------------------------------------------------------------------------------------
// Tag lists.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_list_without_n_is_paged_and_link_lists_every_tag() {
    const TAGS: u64 = 2500;
    let bw = Breakwater::start_logged(&[], "breakwater=warn", &std::env::temp_dir().join(format!("bounds-tags-{}.log", std::process::id())));
    let base = bw.url("");
    let want = push_many_tags(&base, "many/tags", TAGS).await;

    // Without `n`: a bounded first page and a Link to the rest.
    let (status, first, link) = get_json(&bw.url("/v2/many/tags/tags/list")).await;
    assert_eq!(status, 200);
    let first_len = first["tags"].as_array().unwrap().len();
    assert!(first_len <= MAX_PAGE, "one answer without n holds {first_len} tags (bound {MAX_PAGE})");
    assert!(link.is_some(), "a partial list comes with a Link to the rest");

    // Following Link lists every tag once, in byte order, every page bounded.
    let all = pages(&base, "/v2/many/tags/tags/list", "tags").await;
    assert!(all.iter().all(|p| p.len() <= MAX_PAGE && !p.is_empty()), "page sizes {:?}", all.iter().map(Vec::len).collect::<Vec<_>>());
    assert_eq!(all.len(), 3, "2500 tags in pages of 1000");
    let listed: Vec<String> = all.into_iter().flatten().map(|t| t.as_str().unwrap().to_string()).collect();
    assert_eq!(listed, want);

    // `n` and `last` keep their meaning: n=10 after t0100 gives t0101..t0110, with a Link carrying n=10.
    let (_, page, link) = get_json(&bw.url("/v2/many/tags/tags/list?n=10&last=t0100")).await;
    let tags: Vec<&str> = page["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap()).collect();
    assert_eq!(tags, (101..=110).map(|i| format!("t{i:04}")).collect::<Vec<_>>());
    assert_eq!(link_target(&link.unwrap()), "/v2/many/tags/tags/list?n=10&last=t0110");
    let (_, last_page, link) = get_json(&bw.url("/v2/many/tags/tags/list?last=t2400")).await;
    assert_eq!(last_page["tags"].as_array().unwrap().len(), 99);
    assert_eq!(link, None, "no Link after the last page");

    // skopeo follows the Link and sees every tag.
    let tmp = common::images::scratch();
    let out = common::images::output(common::images::skopeo(tmp.path()).args([
        "list-tags",
        "--tls-verify=false",
        &format!("docker://{}/many/tags", bw.addr),
    ]));
    assert!(out.status.success(), "skopeo list-tags: {}", String::from_utf8_lossy(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tags: Vec<String> = listed["Tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()).collect();
    assert_eq!(tags.len() as u64, TAGS, "skopeo list-tags got every tag");
    assert_eq!(tags, want);
}

// ---------------------------------------------------------------------------------------------------------------
// Referrers.

/// Pushes `count` artifacts referring to `subject` (digest and size of an OCI manifest) in `repo`, alternating two
/// artifact types; returns (digest, artifact type) of each.
async fn push_referrers(base: &str, repo: &str, subject: (&str, usize), count: u64, types: [&'static str; 2]) -> Vec<(String, &'static str)> {
    let empty = push_blob(base, repo, b"{}").await;
    let out = Arc::new(std::sync::Mutex::new(Vec::new()));
    let (base_s, repo_s, subject_s, sink) = (base.to_string(), repo.to_string(), (subject.0.to_string(), subject.1), Arc::clone(&out));
    concurrently(count, 8, move |i| {
        let (base, repo, empty, subject, sink) = (base_s.clone(), repo_s.clone(), empty.clone(), subject_s.clone(), Arc::clone(&sink));
        async move {
            let artifact_type = types[(i % 2) as usize];
            let manifest = serde_json::json!({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": artifact_type,
                "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
                "layers": [{"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2}],
                "subject": {"mediaType": OCI_MANIFEST, "digest": subject.0, "size": subject.1},
                "annotations": {"n": i.to_string()},
            })
            .to_string();
            let digest = push_manifest(&base, &repo, &common::oci::sha256(manifest.as_bytes()), OCI_MANIFEST, manifest.as_bytes()).await;
            sink.lock().unwrap().push((digest, artifact_type));
        }
    })
    .await;
    let mut v = out.lock().unwrap().clone();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn referrers_are_paged_with_link_and_replication_follows_it() {
    const REFERRERS: u64 = 250;
    // A `+` in the type: it must survive the round trip through the Link's query.
    const TYPES: [&str; 2] = ["application/vnd.example.sig+json", "application/vnd.example.sbom"];
    let src = Breakwater::start_logged(&[], "breakwater=warn", &std::env::temp_dir().join(format!("bounds-refs-{}.log", std::process::id())));
    let base = src.url("");
    let image = push_image(&base, "signed/app", "v1", &[100], 8).await;
    let referrers = push_referrers(&base, "signed/app", (&image.digest, image.manifest.len()), REFERRERS, TYPES).await;
    let path = format!("/v2/signed/app/referrers/{}", image.digest);

    // Without `n`: a bounded index, with a Link to the rest.
    let (status, index, link) = get_json(&src.url(&path)).await;
    assert_eq!(status, 200);
    assert_eq!(index["mediaType"], OCI_INDEX);
    let first_len = index["manifests"].as_array().unwrap().len();
    assert!(first_len <= MAX_REFERRERS_PAGE, "one referrers answer holds {first_len} descriptors (bound {MAX_REFERRERS_PAGE})");
    assert!(link.is_some(), "a partial referrers list comes with a Link");

    // Following Link: every referrer once, in digest order, every page bounded.
    let all = pages(&base, &path, "manifests").await;
    assert!(all.iter().all(|p| p.len() <= MAX_REFERRERS_PAGE && !p.is_empty()));
    let listed: Vec<String> = all.iter().flatten().map(|d| d["digest"].as_str().unwrap().to_string()).collect();
    assert_eq!(listed, referrers.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), "all referrers, in digest order");
    assert!(all.iter().flatten().all(|d| d["annotations"]["n"].is_string()), "descriptors keep their annotations");

    // With the artifactType filter, the Link keeps the filter.
    let filtered = pages(&base, &format!("{path}?artifactType=application%2Fvnd.example.sig%2Bjson"), "manifests").await;
    assert!(filtered.len() >= 2, "125 signatures take two pages");
    let sigs: Vec<String> = filtered.iter().flatten().map(|d| d["digest"].as_str().unwrap().to_string()).collect();
    let want: Vec<String> = referrers.iter().filter(|r| r.1 == TYPES[0]).map(|r| r.0.clone()).collect();
    assert_eq!(sigs, want);
    assert!(filtered.iter().flatten().all(|d| d["artifactType"] == TYPES[0]));

    // `n` and `last`: bad values are the spec's error, `n=0` is an empty page without a Link.
    let (status, body, _) = get_json(&src.url(&format!("{path}?n=x"))).await;
    assert_eq!((status, body["errors"][0]["code"].as_str()), (400, Some("PAGINATION_NUMBER_INVALID")));
    let (status, body, _) = get_json(&src.url(&format!("{path}?last=nope"))).await;
    assert_eq!((status, body["errors"][0]["code"].as_str()), (400, Some("PAGINATION_NUMBER_INVALID")));
    let (status, body, link) = get_json(&src.url(&format!("{path}?n=0"))).await;
    assert_eq!((status, body["manifests"].as_array().map(Vec::len), link), (200, Some(0), None));

    // Replication with --referrers follows the pages: the destination gets all 250.
    let dst = Breakwater::start_logged(&[], "breakwater=warn", &std::env::temp_dir().join(format!("bounds-refs-dst-{}.log", std::process::id())));
    let jobs = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["replicate", "--from", &src.url(""), "--to", &dst.url(""), "--referrers", "--data"])
        .arg(jobs.path())
        .env("RUST_LOG", "breakwater=warn")
        .output()
        .unwrap();
    assert!(out.status.success(), "replicate: {}", String::from_utf8_lossy(&out.stderr));
    let copied: Vec<String> =
        pages(&dst.url(""), &path, "manifests").await.iter().flatten().map(|d| d["digest"].as_str().unwrap().to_string()).collect();
    assert_eq!(copied.len() as u64, REFERRERS, "every referrer replicated");
    assert_eq!(copied, listed);
}

// ---------------------------------------------------------------------------------------------------------------
// Replication: tags a page at a time, `--latest N` in a bounded set.

/// `breakwater replicate` to completion; returns its JSON summary (and panics with its stderr if it failed).
async fn replicate(args: Vec<String>) -> Value {
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_breakwater")).args(&args).env("RUST_LOG", "breakwater=warn").output().unwrap()
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "replicate failed\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("no summary ({e}): {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replication_streams_tags_page_by_page_and_latest_keeps_n() {
    const TAGS: u64 = 1200;
    // v0..v1199 in byte order (v0, v1, v10, v100, ...): the natural last tags are spread over both pages.
    let tags: Vec<String> = (0..TAGS).map(|i| format!("v{i}")).collect();
    let src = Synthetic::start_with_tags(Options::flat(1), tags);
    let repo = src.name(0);
    let tmp = tempfile::tempdir().unwrap();
    let dst = Breakwater::start_logged(&[], "breakwater=warn", &tmp.path().join("dst.log"));
    let from = format!("http://{}", src.addr);

    // Every tag: the tags of the first page are copied before the second page is asked for.
    let summary = replicate(
        ["replicate", "--from", &from, "--to", &dst.url(""), "--job", "all", "--data"]
            .iter()
            .map(|s| s.to_string())
            .chain([tmp.path().join("jobs-all").display().to_string()])
            .collect(),
    )
    .await;
    assert_eq!(summary["copied"], TAGS, "{summary}");
    let tag_pages = src.tag_pages();
    assert_eq!(tag_pages.len(), 2, "two pages of tags: {tag_pages:?}");
    let second_page = tag_pages[1].0;
    let gets_before = src.manifest_gets().iter().filter(|g| g.0 < second_page).count();
    // The lister hands a page on through a bounded channel (32 at the default concurrency of 8) before it asks
    // for the next: most of the first page must have been fetched by then, however the tasks were scheduled.
    assert!(gets_before >= 900, "only {gets_before} manifests of the first page were fetched before the second page was listed");
    let held = summary["tags_held_max"].as_u64().unwrap_or_else(|| panic!("no tags_held_max: {summary}"));
    assert!(held <= MAX_PAGE as u64, "a listing held {held} tags at once");
    let listed: usize = pages(&dst.url(""), &format!("/v2/{repo}/tags/list"), "tags").await.iter().map(Vec::len).sum();
    assert_eq!(listed as u64, TAGS);

    // `--latest 3`: the natural last three of all pages, and never more than three held.
    let dst2 = Breakwater::start_logged(&[], "breakwater=warn", &tmp.path().join("dst2.log"));
    src.reset();
    let summary = replicate(
        ["replicate", "--from", &from, "--to", &dst2.url(""), "--latest", "3", "--job", "latest", "--data"]
            .iter()
            .map(|s| s.to_string())
            .chain([tmp.path().join("jobs-latest").display().to_string()])
            .collect(),
    )
    .await;
    assert_eq!(summary["copied"], 3, "{summary}");
    assert_eq!(src.tag_pages().len(), 2, "latest reads every page");
    assert_eq!(summary["tags_held_max"], 3, "the --latest set holds N tags: {summary}");
    let (_, body, _) = get_json(&dst2.url(&format!("/v2/{repo}/tags/list"))).await;
    assert_eq!(body["tags"], serde_json::json!(["v1197", "v1198", "v1199"]));
}

// ---------------------------------------------------------------------------------------------------------------
// The replication API.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_failures_are_counted_and_paged() {
    const REPOS: u64 = 250;
    let src = Synthetic::start(REPOS);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bw.toml");
    // Every destination name is invalid (upper case): each tag fails at once, without network retries.
    std::fs::write(
        &config,
        format!("[[replication]]\nname = \"broken\"\nfrom = \"http://{}\"\nto = \"local\"\nrewrite = [\"r=BAD\"]\n", src.addr),
    )
    .unwrap();
    let bw = Breakwater::start_logged(&["--config", config.to_str().unwrap()], "breakwater=warn", &dir.path().join("bw.log"));
    let r = client().post(bw.url("/api/replication/broken/run")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let mut job = Value::Null;
    for _ in 0..6000 {
        job = get_json(&bw.url("/api/replication/broken")).await.1;
        if job["running"] == false && job["progress"]["status"] != "never run" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(job["progress"]["status"], "failed", "{job}");
    assert_eq!(job["progress"]["failed"], REPOS);

    // The status: the count, the first 100, and where the rest is.
    assert_eq!(job["failure_count"], REPOS);
    assert_eq!(job["failures"].as_array().unwrap().len(), 100, "the status shows a bounded number of failures");
    let next = job["failures_next"].as_str().unwrap_or_else(|| panic!("no failures_next: {job}")).to_string();
    let (_, all, _) = get_json(&bw.url("/api/replication")).await;
    let listed = &all["jobs"][0];
    assert_eq!((listed["failure_count"].as_u64(), listed["failures"].as_array().map(Vec::len)), (Some(REPOS), Some(100)));

    // Paging from the status's link to the end: every failure once, in order.
    let mut seen: Vec<String> = job["failures"].as_array().unwrap().iter().map(|f| f["repo"].as_str().unwrap().to_string()).collect();
    let mut next = Some(next);
    let mut pages_read = 0;
    while let Some(path) = next.take() {
        let (status, page, link) = get_json(&bw.url(&path)).await;
        assert_eq!(status, 200, "{path}: {page}");
        let items = page["failures"].as_array().unwrap();
        assert!(items.len() <= 100);
        seen.extend(items.iter().map(|f| f["repo"].as_str().unwrap().to_string()));
        assert_eq!(page["next"].as_str().map(|n| format!("<{n}>; rel=\"next\"")), link, "next and Link agree");
        next = page["next"].as_str().map(str::to_string);
        pages_read += 1;
        assert!(pages_read < 100);
    }
    let want: Vec<String> = (0..REPOS).map(|i| src.name(i)).collect();
    assert_eq!(seen, want);
    assert!(
        get_json(&bw.url("/api/replication/broken/failures")).await.1["failures"][0]["reason"].as_str().unwrap().contains("invalid"),
        "a failure says why"
    );

    // n and last, and their errors.
    let (_, page, _) = get_json(&bw.url(&format!("/api/replication/broken/failures?n=5&last={}:v1", src.name(9)))).await;
    let repos: Vec<&str> = page["failures"].as_array().unwrap().iter().map(|f| f["repo"].as_str().unwrap()).collect();
    assert_eq!(repos, (10..15).map(|i| src.name(i)).collect::<Vec<_>>());
    assert_eq!(get_json(&bw.url("/api/replication/broken/failures?n=many")).await.0, 400);
    assert_eq!(get_json(&bw.url("/api/replication/broken/failures?last=nocolon")).await.0, 400);
    assert_eq!(get_json(&bw.url("/api/replication/nope/failures")).await.0, 404);
}

// ---------------------------------------------------------------------------------------------------------------
// In-memory maps.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_in_memory_map_of_the_cache_is_bounded() {
    const CAP: u64 = 20;
    const DISTINCT: u64 = 80;
    let upstream = Distribution::start();
    let relay = Relay::start(&upstream.addr);
    let up = format!("http://{}", upstream.addr);
    // Tags and blobs the cache will pull: DISTINCT tags of one image, DISTINCT small blobs.
    let tags = push_many_tags(&up, "team/app", DISTINCT).await;
    let mut blobs = Vec::new();
    for i in 0..DISTINCT {
        blobs.push(push_blob(&up, "team/blobs", format!("blob {i}").as_bytes()).await);
    }
    // Bearer auth: every repository scope gets its own token.
    let ts = TokenServer::anonymous(Duration::from_secs(600));
    relay.require_bearer(&ts);
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("up=http://{}", relay.addr);
    let bw = Breakwater::start_logged(
        &["--upstream", &spec, "--cache-memory-entries", &CAP.to_string(), "--tag-ttl-secs", "600", "--negative-ttl-secs", "600"],
        "breakwater=warn",
        &dir.path().join("bw.log"),
    );
    let base = bw.url("");
    let get = |path: String| {
        let url = format!("{base}{path}");
        async move { client().get(url).send().await.unwrap().status().as_u16() }
    };

    // Not-found answers and tokens: DISTINCT missing repositories, each its own scope.
    for i in 0..DISTINCT {
        assert_eq!(get(format!("/v2/up/missing/n{i}/manifests/v1")).await, 404);
    }
    assert!(ts.issued() as u64 >= DISTINCT, "one token per scope: {}", ts.issued());
    // Tag validations: DISTINCT tags pulled.
    for t in &tags {
        assert_eq!(get(format!("/v2/up/team/app/manifests/{t}")).await, 200, "{t}");
    }
    // Access times: DISTINCT blobs cached, then hit.
    for d in &blobs {
        assert_eq!(get(format!("/v2/up/team/blobs/blobs/{d}")).await, 200);
    }
    for _ in 0..3 {
        for d in &blobs {
            assert_eq!(get(format!("/v2/up/team/blobs/blobs/{d}")).await, 200);
        }
    }

    for kind in ["not_found", "upstream_tokens", "tag_validations", "blob_accesses"] {
        let label = format!("kind=\"{kind}\"");
        let held = metric(&base, "breakwater_cache_entries", &[&label]).await;
        assert!(held > 0.0, "{kind}: the gauge shows the map in use ({held})");
        assert!(held <= CAP as f64, "{kind}: {held} entries held (bound {CAP}) after {DISTINCT} distinct keys");
    }
    // Bounded, still correct: what was forgotten is asked again.
    assert_eq!(get("/v2/up/missing/n0/manifests/v1".into()).await, 404);
    assert_eq!(get(format!("/v2/up/team/app/manifests/{}", tags[0])).await, 200);
}

// ---------------------------------------------------------------------------------------------------------------
// Metrics labels.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn made_up_methods_share_one_metrics_label() {
    let dir = tempfile::tempdir().unwrap();
    let bw = Breakwater::start_logged(&[], "breakwater=warn", &dir.path().join("bw.log"));
    let c = client();
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    for i in 0..100 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let name = format!("M{:X}{i}", seed & 0xFFFF_FFFF);
        let method = reqwest::Method::from_bytes(name.as_bytes()).unwrap();
        let r = c.request(method, bw.url("/v2/")).send().await.unwrap();
        assert!(r.status().is_client_error() || r.status().is_success(), "{name}: {}", r.status());
    }
    c.get(bw.url("/v2/")).send().await.unwrap();
    let text = c.get(bw.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let methods: BTreeSet<String> = text
        .lines()
        .filter(|l| l.starts_with("breakwater_http_requests_total{"))
        .filter_map(|l| l.split("method=\"").nth(1)?.split('"').next().map(str::to_string))
        .collect();
    assert!(methods.len() <= 10, "method labels: {methods:?}");
    assert!(methods.contains("other") && methods.contains("GET"), "{methods:?}");
    let other = metric(&bw.url(""), "breakwater_http_requests_total", &["method=\"other\""]).await;
    assert_eq!(other, 100.0, "every made-up method is counted, as `other`");
}
