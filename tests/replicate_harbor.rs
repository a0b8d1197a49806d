//! Replication from a Harbor source, listed through Harbor's project and repository API page by page.

mod common;

use common::harbor::FakeHarbor;
use common::oci::push_image;
use common::{Breakwater, Distribution};

async fn summary(args: &[String]) -> (bool, serde_json::Value, String) {
    let args = args.to_vec();
    let out = tokio::task::spawn_blocking(move || std::process::Command::new(env!("CARGO_BIN_EXE_breakwater")).args(&args).output())
        .await
        .unwrap()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    let v = serde_json::from_str(stdout.lines().last().unwrap_or("{}")).unwrap_or(serde_json::Value::Null);
    (out.status.success(), v, String::from_utf8_lossy(&out.stderr).to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_harbor_source_is_listed_through_its_api_page_by_page() {
    let registry = Distribution::start();
    let src = format!("http://{}", registry.addr);
    // 230 repositories in three projects: more than one API page (100) in two of them.
    let mut repos = Vec::new();
    for i in 0..230u64 {
        let project = ["alpha", "beta", "gamma"][(i % 3) as usize];
        repos.push(format!("{project}/app-{i:03}"));
    }
    let mut pushes = Vec::new();
    for chunk in repos.chunks(20) {
        let (src, chunk) = (src.clone(), chunk.to_vec());
        pushes.push(tokio::spawn(async move {
            for (j, r) in chunk.iter().enumerate() {
                push_image(&src, r, "v1", &[64], 9_000 + j as u64).await;
            }
        }));
    }
    for p in pushes {
        p.await.unwrap();
    }
    let harbor = FakeHarbor::start(&registry.addr, &repos);
    let bw = Breakwater::start();
    let data = tempfile::tempdir().unwrap();
    let base = |extra: &[&str]| {
        let mut a: Vec<String> = ["replicate", "--from-kind", "harbor", "--from"].iter().map(|s| s.to_string()).collect();
        a.push(format!("http://{}", harbor.addr));
        a.extend(["--to".to_string(), bw.url(""), "--data".to_string(), data.path().display().to_string()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // One project first, then everything: the second run finds the first project's tags up to date.
    let (ok, s, err) = summary(&base(&["--job", "beta", "--include", "beta/**"])).await;
    assert!(ok, "{err}");
    assert_eq!((s["repos_seen"].as_u64(), s["copied"].as_u64()), (Some(230), Some(77)), "{s}");
    let (ok, s, err) = summary(&base(&["--job", "all"])).await;
    assert!(ok, "{err}");
    assert_eq!((s["copied"].as_u64(), s["skipped"].as_u64(), s["failed"].as_u64()), (Some(153), Some(77), Some(0)), "{s}");
    assert_eq!(s["mark"], "gamma/app-227", "the checkpoint is the last repository in (project, name) order");
    assert_eq!(harbor.catalog_requests(), 0, "Harbor is listed through its API, not the catalog");
    // Projects: one page; repositories: two pages each for alpha and beta (77 and 77 fit in one; 230/3 → 77,77,76).
    assert!(harbor.api_requests() >= 4);
    let catalog: serde_json::Value =
        serde_json::from_str(&reqwest::get(bw.url("/v2/_catalog?n=1000")).await.unwrap().text().await.unwrap()).unwrap();
    assert_eq!(catalog["repositories"].as_array().unwrap().len(), 230);

    // Resuming after the end lists nothing new.
    let (ok, s, err) = summary(&base(&["--job", "all", "--resume"])).await;
    assert!(ok, "{err}");
    assert_eq!(s["copied"].as_u64(), Some(153), "nothing copied again: {s}");
}
