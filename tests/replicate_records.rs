//! Replication job records inside `breakwater serve`: what a run does with the failures and the checkpoint its
//! predecessor left. A retry that succeeds clears its failure (the job's status is what still fails); a run after
//! an interrupted or failed one continues it rather than starting over; a failure that persists does not stop
//! the schedule from starting new passes. Real registries (`docker-registry`, breakwater itself), with
//! `common/relay.rs` in front of the source to inject faults and record what the runs asked for.

mod common;

use std::path::Path;
use std::time::Duration;

use common::oci::push_image;
use common::relay::Relay;
use common::{Breakwater, Distribution};
use serde_json::Value;

async fn job(bw: &Breakwater, name: &str) -> Value {
    let r = reqwest::get(bw.url(&format!("/api/replication/{name}"))).await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
    serde_json::from_slice(&r.bytes().await.unwrap()).unwrap()
}

/// Polls the job until `done` holds (generous bound: the machine is loaded).
async fn wait_job(bw: &Breakwater, name: &str, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..6000 {
        last = job(bw, name).await;
        if done(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("job {name}: {what} did not happen: {last}");
}

/// Starts a run through the API and waits for it to end.
async fn run(bw: &Breakwater, name: &str) -> Value {
    let r = reqwest::Client::new().post(bw.url(&format!("/api/replication/{name}/run"))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    wait_job(bw, name, "the run ending", |j| j["running"] == false).await
}

/// The failures the API reports, as `repo:tag`.
fn failures(j: &Value) -> Vec<String> {
    j["failures"].as_array().unwrap().iter().map(|f| format!("{}:{}", f["repo"].as_str().unwrap(), f["tag"].as_str().unwrap())).collect()
}

fn config(dir: &Path, body: &str) -> String {
    let path = dir.join("bw.toml");
    std::fs::write(&path, body).unwrap();
    path.display().to_string()
}

/// The digest breakwater serves for `repo:tag`, if it has it.
async fn local_digest(bw: &Breakwater, repo: &str, tag: &str) -> Option<String> {
    let r = reqwest::Client::new()
        .head(bw.url(&format!("/v2/{repo}/manifests/{tag}")))
        .header("accept", common::oci::OCI_MANIFEST)
        .send()
        .await
        .unwrap();
    (r.status().as_u16() == 200).then(|| r.headers()["docker-content-digest"].to_str().unwrap().to_string())
}

/// Paths (with query) of the source requests of one kind that the relay saw.
fn paths(relay: &Relay, contains: &str) -> Vec<String> {
    relay.requests().into_iter().filter(|r| r.path.contains(contains)).map(|r| r.path).collect()
}

/// A run is killed while one tag of a repository has failed and another is still being copied. The next run
/// (the predecessor was interrupted: it resumes and copies the repository again) succeeds at the failed tag: its
/// failure must be gone and the job finished, not still "failed" over a record of something now copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resumed_run_that_copies_a_failed_tag_clears_its_failure() {
    let source = Distribution::start();
    let src = format!("http://{}", source.addr);
    let v1 = push_image(&src, "app/x", "v1", &[1_000], 11).await;
    let v2 = push_image(&src, "app/x", "v2", &[1_000], 12).await;
    let y = push_image(&src, "app/y", "v1", &[1_000], 13).await;
    let relay = Relay::start(&source.addr);
    relay.fail("GET /v2/app/x/manifests/v1", 500, None, 1000);
    relay.hang_on("/v2/app/x/manifests/v2");

    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &format!("[[replication]]\nname = \"rec\"\nfrom = \"{}\"\nto = \"local\"\nconcurrency = 1\n", relay.url("")));
    let bw = Breakwater::start_with(&["--config", &cfg]);
    let r = reqwest::Client::new().post(bw.url("/api/replication/rec/run")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    // app/x:v1 has failed for good (its failure is recorded) and app/x:v2 hangs: app/x is unfinished.
    let during = wait_job(&bw, "rec", "the v1 failure", |j| failures(j) == ["app/x:v1"]).await;
    assert!(relay.wait_for_async("", "/v2/app/x/manifests/v2", 1, Duration::from_secs(120)).await, "v2 was asked for");
    assert_eq!(during["running"], true, "{during}");
    // kill -9 mid-run: the saved job says "running", with app/x among the unfinished repositories.
    let data = bw.stop();
    relay.hang(false);
    relay.clear_faults();
    relay.reset();

    let bw = Breakwater::start_in(data, &["--config", &cfg]);
    assert_eq!(job(&bw, "rec").await["progress"]["status"], "running", "the killed run left its checkpoint");
    let done = run(&bw, "rec").await;
    for (repo, tag, image) in [("app/x", "v1", &v1), ("app/x", "v2", &v2), ("app/y", "v1", &y)] {
        assert_eq!(local_digest(&bw, repo, tag).await.as_deref(), Some(image.digest.as_str()), "{repo}:{tag}");
    }
    assert_eq!(failures(&done), Vec::<String>::new(), "the failure of a tag that was then copied is cleared: {done}");
    assert_eq!(done["progress"]["status"], "finished", "{done}");
    assert_eq!(done["progress"]["failed"], 0, "{done}");
}

/// Runs after a failed one retry what failed (and touch nothing else) instead of walking the source again; each
/// retry that succeeds clears its failure and the job's status is what still fails. A failed pass is retried
/// once: if that retry fails too, the next run starts a new pass, so a failure that persists cannot stop the
/// job from copying what is new.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_after_a_failed_one_retries_its_failures_and_touches_nothing_else() {
    let source = Distribution::start();
    let src = format!("http://{}", source.addr);
    let mut good = Vec::new();
    for i in 0..6u64 {
        let repo = format!("app/r{i}");
        good.push((repo.clone(), push_image(&src, &repo, "v1", &[500], 100 + i).await.digest));
    }
    let one = push_image(&src, "bad/one", "v1", &[500], 200).await;
    let two = push_image(&src, "bad/two", "v1", &[500], 201).await;
    let relay = Relay::start(&source.addr);
    relay.fail("GET /v2/bad/one/manifests/v1", 500, None, 100_000);
    relay.fail("GET /v2/bad/two/manifests/v1", 500, None, 100_000);

    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &format!("[[replication]]\nname = \"rt\"\nfrom = \"{}\"\nto = \"local\"\npage_size = 3\n", relay.url("")));
    let bw = Breakwater::start_with(&["--config", &cfg]);

    // Run 1: a whole pass; two items fail.
    let first = run(&bw, "rt").await;
    assert_eq!(first["progress"]["status"], "failed", "{first}");
    assert_eq!(failures(&first), ["bad/one:v1", "bad/two:v1"], "{first}");
    for (repo, digest) in &good {
        assert_eq!(local_digest(&bw, repo, "v1").await.as_ref(), Some(digest), "{repo}");
    }

    // Run 2: bad/one heals, bad/two does not. Only the failed items are tried.
    relay.clear_faults();
    relay.fail("GET /v2/bad/two/manifests/v1", 500, None, 100_000);
    relay.reset();
    let second = run(&bw, "rt").await;
    assert_eq!(paths(&relay, "/v2/_catalog"), Vec::<String>::new(), "the retry walked the catalog again");
    let others: Vec<String> =
        relay.requests().into_iter().map(|r| r.path).filter(|p| p.starts_with("/v2/app/")).collect();
    assert_eq!(others, Vec::<String>::new(), "the retry touched repositories that had not failed");
    assert_eq!(local_digest(&bw, "bad/one", "v1").await, Some(one.digest.clone()));
    assert_eq!(failures(&second), ["bad/two:v1"], "the healed failure is cleared, the other kept: {second}");
    assert_eq!(second["progress"]["status"], "failed", "{second}");
    assert_eq!(second["progress"]["failed"], 1, "the count is what still fails: {second}");
    assert_eq!(second["progress"]["retries"], 1, "{second}");

    // Run 3: the pass was retried once already and still fails: a new pass walks the whole source.
    relay.reset();
    let third = run(&bw, "rt").await;
    let catalog = paths(&relay, "/v2/_catalog");
    // (Its walkers list key ranges at once: one of them from the catalog's start.)
    assert!(catalog.iter().any(|p| !p.contains("last=")), "a new pass starts at the catalog's start: {catalog:?}");
    for (repo, _) in &good {
        assert!(relay.count("", &format!("/v2/{repo}/tags/list")) >= 1, "the new pass lists {repo}");
    }
    assert_eq!(failures(&third), ["bad/two:v1"], "{third}");
    assert_eq!(third["progress"]["status"], "failed", "{third}");
    assert_eq!(third["progress"]["retries"], 0, "{third}");

    // Run 4: bad/two heals; the new pass's failure is retried, alone, and the job is finished.
    relay.clear_faults();
    relay.reset();
    let fourth = run(&bw, "rt").await;
    assert_eq!(paths(&relay, "/v2/_catalog"), Vec::<String>::new());
    assert_eq!(local_digest(&bw, "bad/two", "v1").await, Some(two.digest.clone()));
    assert_eq!(failures(&fourth), Vec::<String>::new(), "{fourth}");
    assert_eq!(fourth["progress"]["status"], "finished", "{fourth}");
    assert_eq!(fourth["progress"]["failed"], 0, "{fourth}");

    // Run 5: the job finished: the next run is a new pass.
    relay.reset();
    let fifth = run(&bw, "rt").await;
    assert!(paths(&relay, "/v2/_catalog").iter().any(|p| !p.contains("last=")));
    assert_eq!(fifth["progress"]["status"], "finished", "{fifth}");
}

/// A scheduled run whose predecessor stopped at a catalog page the source would not give (status "failed")
/// continues the walk from there, in a new process: it neither lists the catalog from its start nor lists the
/// tags of repositories the predecessor finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scheduled_run_after_a_failed_walk_continues_it() {
    let source = Distribution::start();
    let src = format!("http://{}", source.addr);
    let mut images = Vec::new();
    for i in 0..12u64 {
        let repo = format!("r{i:02}");
        images.push((repo.clone(), push_image(&src, &repo, "v1", &[500], 300 + i).await.digest));
    }
    let relay = Relay::start(&source.addr);
    relay.fail("last=r05", 500, None, 100_000);
    let dir = tempfile::tempdir().unwrap();
    // Due at start-up, then not again during the test.
    let cfg = config(
        dir.path(),
        &format!("[[replication]]\nname = \"sched\"\nfrom = \"{}\"\nto = \"local\"\npage_size = 3\nschedule_secs = 3600\n", relay.url("")),
    );
    let bw = Breakwater::start_with(&["--config", &cfg]);
    let first = wait_job(&bw, "sched", "the first scheduled run ending", |j| j["running"] == false && j["progress"]["status"] != "never run").await;
    assert_eq!(first["progress"]["status"], "failed", "{first}");
    assert_eq!(first["progress"]["mark"], "r05", "{first}");
    let data = bw.stop();
    relay.clear_faults();
    relay.reset();

    let bw = Breakwater::start_in(data, &["--config", &cfg]);
    let second = wait_job(&bw, "sched", "the second scheduled run ending", |j| j["running"] == false && j["progress"]["status"] != "failed").await;
    assert_eq!(second["progress"]["status"], "finished", "{second}");
    let catalog = paths(&relay, "/v2/_catalog");
    assert!(catalog.first().is_some_and(|p| p.contains("last=r05")), "the walk continued after r05: {catalog:?}");
    for (repo, _) in &images[..6] {
        assert_eq!(relay.count("", &format!("/v2/{repo}/")), 0, "{repo} was finished before and touched again");
    }
    for (repo, digest) in &images {
        assert_eq!(local_digest(&bw, repo, "v1").await.as_ref(), Some(digest), "{repo}");
    }
    assert_eq!(failures(&second), Vec::<String>::new(), "{second}");
}
