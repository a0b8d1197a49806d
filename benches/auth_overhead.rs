//! What access control costs a warm registry: small, hot requests (a manifest by tag, a 4 KiB blob) from 64
//! concurrent keep-alive connections, against breakwater without access control (the anchor), with the token
//! flow (a bearer token on every request) and with basic auth (a password on every request), in one run.
//!
//! Run with `cargo bench --bench auth_overhead` (needs `wrk`, Debian's package, and `htpasswd`). Environment:
//! - `BENCH_SECS`: seconds per measurement (default `10`);
//! - `BENCH_REPEAT`: rounds; each round measures every server once per request kind, in rotating order (default `3`);
//! - `BENCH_CONNECTIONS`: concurrent connections (default `64`).
//!
//! The three servers run side by side from the same binary and data of the same shape. wrk (`-t2`) drives each
//! for `BENCH_SECS`; its `Requests/sec` is the figure, and a run with any non-2xx answer or socket error is
//! refused. The medians and the ratio to the anchor are printed last. wrk shares the 2 cores with the server, as
//! clients of a real registry do not; the ratio, not the absolute figure, is the point.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/mod.rs"]
mod support;

use std::process::Command;

use common::Breakwater;

const REPO: &str = "bench/app";
const USER: &str = "bench";
const PASSWORD: &str = "bench-password";

fn main() {
    let secs: u64 = support::env_parse("BENCH_SECS", 10);
    let repeat: usize = support::env_parse("BENCH_REPEAT", 3).max(1);
    let connections: usize = support::env_parse("BENCH_CONNECTIONS", 64);
    println!("== auth_overhead: warm manifest and small blob GETs, {connections} connections, access control off / token / basic ==");
    println!("machine : {}", support::machine());
    println!("source  : {}", support::source_state());
    println!("load    : {} (1, 5, 15 min) before", support::loadavg());

    let dir = tempfile::tempdir().expect("tempdir");
    let users = dir.path().join("users");
    let status = Command::new("htpasswd").args(["-B", "-b", "-c"]).arg(&users).args([USER, PASSWORD]).status().expect("htpasswd (apache2-utils)");
    assert!(status.success(), "htpasswd failed");
    let users = users.to_str().expect("UTF-8 path").to_string();
    // Request lines are logged at info; at tens of thousands of requests a second that would be the figure.
    let start = |name: &str, extra: &[&str]| Breakwater::start_logged(extra, "warn", &dir.path().join(format!("{name}.log")));
    let servers = [
        ("off", start("off", &[])),
        ("token", start("token", &["--htpasswd", &users])),
        ("basic", start("basic", &["--htpasswd", &users, "--auth", "basic"])),
    ];
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let basic = format!("Basic {}", base64::Engine::encode(&base64::engine::general_purpose::STANDARD, format!("{USER}:{PASSWORD}")));
    let mut headers = Vec::new();
    let mut blob = String::new();
    for (name, bw) in &servers {
        let auth = (*name != "off").then_some(basic.as_str());
        blob = rt.block_on(push(bw, auth));
        headers.push(match *name {
            "off" => None,
            "token" => Some(format!("Bearer {}", rt.block_on(token(bw, &basic)))),
            _ => Some(basic.clone()),
        });
    }

    let kinds = [("manifest by tag", format!("/v2/{REPO}/manifests/v1")), ("4 KiB blob", format!("/v2/{REPO}/blobs/{blob}"))];
    let mut results: Vec<Vec<Vec<f64>>> = vec![vec![Vec::new(); servers.len()]; kinds.len()];
    for round in 0..repeat {
        for (k, (kind, path)) in kinds.iter().enumerate() {
            for i in 0..servers.len() {
                let s = (i + round) % servers.len();
                let (name, bw) = &servers[s];
                let auth: Vec<String> = headers[s].iter().map(|a| format!("Authorization: {a}")).collect();
                let rps = support::wrk(&bw.url(path), &auth, connections, secs);
                println!("round {} {kind:<16} {name:<6} {rps:>10.0} req/s", round + 1);
                results[k][s].push(rps);
            }
        }
    }
    println!("load    : {} (1, 5, 15 min) after", support::loadavg());
    println!("\nmedians ({repeat} rounds of {secs}s, {connections} connections):");
    for (k, (kind, _)) in kinds.iter().enumerate() {
        let anchor = median(&mut results[k][0]);
        for (s, (name, _)) in servers.iter().enumerate() {
            let m = median(&mut results[k][s]);
            println!("  {kind:<16} {name:<6} {m:>10.0} req/s  {:.2}x of off", m / anchor);
        }
    }
}

fn median(v: &mut [f64]) -> f64 {
    support::pct(v, 50.0)
}

/// Pushes a small image (a config and a 4 KiB layer) to `bw` with `auth` on every request; returns the layer's
/// digest.
async fn push(bw: &Breakwater, auth: Option<&str>) -> String {
    let client = reqwest::Client::new();
    let with = |r: reqwest::RequestBuilder| match auth {
        Some(a) => r.header("authorization", a),
        None => r,
    };
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let layer = common::oci::pseudo_random(4096, 7);
    for b in [&config, &layer] {
        let url = bw.url(&format!("/v2/{REPO}/blobs/uploads/?digest={}", common::oci::sha256(b)));
        let r = with(client.post(url)).body(b.clone()).send().await.expect("push blob");
        assert_eq!(r.status().as_u16(), 201, "blob push");
    }
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{m}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{}","size":4096}}]}}"#,
        common::oci::sha256(&config),
        config.len(),
        common::oci::sha256(&layer),
        m = common::oci::OCI_MANIFEST
    );
    let r = with(client.put(bw.url(&format!("/v2/{REPO}/manifests/v1"))))
        .header("content-type", common::oci::OCI_MANIFEST)
        .body(manifest)
        .send()
        .await
        .expect("push manifest");
    assert_eq!(r.status().as_u16(), 201, "manifest push");
    common::oci::sha256(&layer)
}

/// A pull token for the bench repository.
async fn token(bw: &Breakwater, basic: &str) -> String {
    let url = bw.url(&format!("/auth/token?service=breakwater&scope=repository:{REPO}:pull"));
    let r = reqwest::Client::new().get(url).header("authorization", basic).send().await.expect("token");
    assert_eq!(r.status().as_u16(), 200, "token");
    let v: serde_json::Value = serde_json::from_slice(&r.bytes().await.expect("token body")).expect("token JSON");
    v["token"].as_str().expect("a token").to_string()
}
