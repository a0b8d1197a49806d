//! Small, hot requests (issue 10, item 6): a manifest GET by tag and by digest, and a manifest HEAD by digest,
//! from 64 concurrent keep-alive connections, breakwater against Debian's `docker-registry` (distribution 2.8.2),
//! in one run. The GETs are driven by wrk; HEADs by tasks of this process (reqwest), because wrk cannot drive
//! HEAD: its parser waits for the body a `Content-Length` announces, so every connection hangs after its first
//! answer.
//!
//! Run with `cargo bench --bench small_requests` (needs `wrk`, Debian's package). Environment:
//! - `BENCH_SECS`: seconds per measurement (default `10`);
//! - `BENCH_REPEAT`: rounds; each round measures both servers once per request kind, in rotating order (default `3`);
//! - `BENCH_CONNECTIONS`: concurrent connections (default `64`).
//!
//! Both registries hold the same small OCI image (pushed the same way). wrk (`-t2`) drives each for `BENCH_SECS`
//! with an OCI `Accept` (distribution serves an OCI manifest only to a client that accepts one); its
//! `Requests/sec` is the figure, and a run with any non-2xx answer or socket error is refused. breakwater logs at
//! `warn` (its request lines at info would be the figure at this rate), distribution at `warn` (the harness's
//! setting). wrk shares the 2 cores with the servers: the ratio is the point.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;


const REPO: &str = "bench/small";

fn main() {
    let secs: u64 = support::env_parse("BENCH_SECS", 10);
    let repeat: usize = support::env_parse("BENCH_REPEAT", 3).max(1);
    let connections: usize = support::env_parse("BENCH_CONNECTIONS", 64);
    println!("== small_requests: manifest GET by tag and by digest, HEAD by digest, {connections} connections ==");
    println!("machine : {}", support::machine());
    println!("source  : {}", support::source_state());
    println!("load    : {} (1, 5, 15 min) before", support::loadavg());

    let dir = tempfile::tempdir().expect("tempdir");
    // Request lines are logged at info; at tens of thousands of requests a second that would be the figure.
    let bw = common::Breakwater::start_logged(&[], "warn", &dir.path().join("breakwater.log"));
    let dist = common::Distribution::start();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let bases = [("breakwater", format!("http://{}", bw.addr)), ("distribution 2.8.2", format!("http://{}", dist.addr))];
    let mut digest = String::new();
    for (_, base) in &bases {
        let image = rt.block_on(common::oci::push_image(base, REPO, "v1", &[4096], 7));
        // The same bytes pushed to both: the same digest.
        digest = image.digest;
    }
    let kinds = [
        ("manifest GET by tag", format!("/v2/{REPO}/manifests/v1")),
        ("manifest GET by digest", format!("/v2/{REPO}/manifests/{digest}")),
        ("manifest HEAD by digest", format!("/v2/{REPO}/manifests/{digest}")),
    ];
    let mut results: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); bases.len()]; kinds.len()];
    for round in 0..repeat {
        for (k, (kind, path)) in kinds.iter().enumerate() {
            for i in 0..bases.len() {
                let s = (i + round) % bases.len();
                let (name, base) = &bases[s];
                let url = format!("{base}{path}");
                let rps = if kind.contains("HEAD") { rt.block_on(heads(&url, connections, secs)) } else { support::wrk(&url, &[format!("Accept: {}", common::oci::OCI_MANIFEST)], connections, secs) };
                println!("round {} {kind:<24} {name:<18} {rps:>10.0} req/s  (load {})", round + 1, support::loadavg());
                results[k][s].push(rps);
            }
        }
    }
    println!("load    : {} (1, 5, 15 min) after", support::loadavg());
    println!("\nmedians ({repeat} rounds of {secs}s, {connections} connections):");
    for (k, (kind, _)) in kinds.iter().enumerate() {
        let anchor = support::pct(&mut results[k][1], 50.0);
        for (s, (name, _)) in bases.iter().enumerate() {
            let m = support::pct(&mut results[k][s], 50.0);
            println!("  {kind:<24} {name:<18} {m:>10.0} req/s  {:.2}x of distribution", m / anchor);
        }
    }
}

/// HEADs per second `connections` keep-alive connections get answered from `url` in `secs`, each task sending
/// its next request when the last is answered (as wrk does); any answer but 200 fails the run.
async fn heads(url: &str, connections: usize, secs: u64) -> f64 {
    let client = reqwest::Client::builder().pool_max_idle_per_host(connections).build().expect("client");
    let start = std::time::Instant::now();
    let until = start + std::time::Duration::from_secs(secs);
    let tasks: Vec<_> = (0..connections)
        .map(|_| {
            let (client, url) = (client.clone(), url.to_string());
            tokio::spawn(async move {
                let mut n = 0u64;
                while std::time::Instant::now() < until {
                    let r = client.head(&url).header("accept", common::oci::OCI_MANIFEST).send().await.expect("HEAD");
                    assert_eq!(r.status().as_u16(), 200, "HEAD {url}");
                    n += 1;
                }
                n
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("HEAD task");
    }
    total as f64 / start.elapsed().as_secs_f64()
}
