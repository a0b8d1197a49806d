//! Replication inside `breakwater serve`: `[[replication]]` policies started through the HTTP API, progress
//! read back from it, and `breakwater replicate --policy` running the same policy from the command line.

mod common;

use std::time::Duration;

use common::oci::push_image;
use common::{Breakwater, Distribution};

async fn job(bw: &Breakwater, name: &str) -> serde_json::Value {
    let r = reqwest::get(bw.url(&format!("/api/replication/{name}"))).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_policy_runs_through_the_api_into_this_breakwater() {
    let source = Distribution::start();
    let src = format!("http://{}", source.addr);
    let mut images = Vec::new();
    for (i, repo) in ["team/a", "team/b", "other/c"].iter().enumerate() {
        images.push(push_image(&src, repo, "v1", &[2_000], 300 + i as u64).await);
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bw.toml");
    std::fs::write(
        &config,
        format!("[[replication]]\nname = \"mirror-team\"\nfrom = \"{src}\"\nto = \"local\"\ninclude = [\"team/**\"]\nrewrite = [\"team/=copy/\"]\nwalkers = 3\n"),
    )
    .unwrap();
    let bw = Breakwater::start_with(&["--config", config.to_str().unwrap()]);
    let client = reqwest::Client::new();

    let before = job(&bw, "mirror-team").await;
    assert_eq!(before["running"], false);
    assert_eq!(before["progress"]["status"], "never run");
    assert_eq!(client.post(bw.url("/api/replication/nope/run")).send().await.unwrap().status().as_u16(), 404);

    let r = client.post(bw.url("/api/replication/mirror-team/run")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let mut done = serde_json::Value::Null;
    for _ in 0..2000 {
        done = job(&bw, "mirror-team").await;
        if done["running"] == false && done["progress"]["status"] != "never run" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(done["progress"]["status"], "finished", "{done}");
    assert_eq!(done["progress"]["copied"], 2, "{done}");
    assert_eq!(done["progress"]["repos_matched"], 2, "{done}");
    assert_eq!(done["failures"].as_array().unwrap().len(), 0);
    // The policy's three walkers listed the catalog whole: no range is left.
    assert_eq!(done["progress"]["walk"]["ranges"], serde_json::json!([]), "{done}");
    for (repo, image) in [("copy/a", &images[0]), ("copy/b", &images[1])] {
        let r = client.get(bw.url(&format!("/v2/{repo}/manifests/v1"))).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200, "{repo}");
        assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), image.digest);
    }
    let catalog = client.get(bw.url("/v2/_catalog")).send().await.unwrap().text().await.unwrap();
    assert!(!catalog.contains("other/c"), "{catalog}");
    let all = client.get(bw.url("/api/replication")).send().await.unwrap().text().await.unwrap();
    assert!(all.contains("mirror-team"), "{all}");

    // The command line runs the same policy by name: everything is up to date now, one HEAD per tag.
    let data = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["replicate", "--policy", "mirror-team", "--config", config.to_str().unwrap(), "--local-url", &bw.url("")])
        .arg("--data")
        .arg(data.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    let summary: serde_json::Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    assert_eq!((summary["copied"].as_u64(), summary["skipped"].as_u64()), (Some(0), Some(2)), "{summary}");
}
