//! Operating `breakwater serve`: configuration sources, ops endpoints, graceful shutdown, restarts, crash
//! safety, and PostgreSQL as the metadata store. Every test runs the real binary over real sockets.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::Breakwater;
use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

/// Sends a request head for a monolithic upload of `total` bytes and the first `first` bytes of `body`, returning
/// the open connection (the rest of the body has not been sent).
async fn start_upload(addr: &str, repo: &str, body: &[u8], first: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /v2/{repo}/blobs/uploads/?digest={} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        sha256(body),
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&body[..first]).await.unwrap();
    s.flush().await.unwrap();
    s
}

/// Waits until `dir` holds a non-empty file: the server has begun writing what it received.
async fn wait_for_staged_bytes(dir: &std::path::Path) {
    for _ in 0..400 {
        if let Ok(entries) = std::fs::read_dir(dir) {
            if entries.flatten().any(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false)) {
                return;
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the server never staged any bytes in {}", dir.display());
}

async fn status_of(url: &str, method: reqwest::Method) -> u16 {
    reqwest::Client::new().request(method, url).send().await.unwrap().status().as_u16()
}

#[tokio::test]
async fn ops_endpoints_and_metrics() {
    let bw = Breakwater::start();
    assert_eq!(status_of(&bw.url("/healthz"), reqwest::Method::GET).await, 200);
    assert_eq!(status_of(&bw.url("/readyz"), reqwest::Method::GET).await, 200);
    let blob = b"metrics blob".to_vec();
    let client = reqwest::Client::new();
    let r = client
        .post(bw.url(&format!("/v2/m/blobs/uploads/?digest={}", sha256(&blob))))
        .body(blob.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    for _ in 0..3 {
        let r = client.get(bw.url(&format!("/v2/m/blobs/{}", sha256(&blob)))).send().await.unwrap();
        assert_eq!(r.bytes().await.unwrap(), blob);
    }
    let text = client.get(bw.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let line = text
        .lines()
        .find(|l| {
            l.starts_with("breakwater_http_requests_total")
                && l.contains("route=\"blob\"")
                && l.contains("method=\"GET\"")
                && l.contains("status=\"200\"")
        })
        .unwrap_or_else(|| panic!("no blob GET counter in:\n{text}"));
    assert!(line.ends_with(" 3"), "{line}");
    let bytes = text
        .lines()
        .find(|l| l.starts_with("breakwater_http_response_bytes_total") && l.contains("route=\"blob\""))
        .unwrap_or_else(|| panic!("no blob bytes counter in:\n{text}"));
    assert!(bytes.ends_with(&format!(" {}", 3 * blob.len())), "{bytes}");
}

#[tokio::test]
async fn config_file_and_environment() {
    // The file disables deletes; the environment picks the address; the file's data dir is used.
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("from-file");
    let config = dir.path().join("breakwater.toml");
    std::fs::write(&config, format!("data = {:?}\ndelete_enabled = false\nlog_format = \"json\"\n", data.display().to_string()))
        .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("BREAKWATER_LISTEN", "127.0.0.1:0")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(child.stdout.take().unwrap()), &mut line).unwrap();
    let addr = line.trim().strip_prefix("breakwater listening on http://").unwrap().to_string();
    let url = format!("http://{addr}/v2/x/manifests/latest");
    let r = reqwest::Client::new().delete(&url).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 405);
    assert!(r.text().await.unwrap().contains("UNSUPPORTED"));
    assert!(data.join("metadata.db").exists(), "the data directory from the file is used");
    child.kill().unwrap();
    let out = child.wait_with_output().unwrap();
    let logs = String::from_utf8_lossy(&out.stderr);
    let first = logs.lines().next().expect("some log line");
    let parsed: serde_json::Value = serde_json::from_str(first).unwrap_or_else(|e| panic!("{first:?} is not JSON: {e}"));
    assert!(parsed.get("level").is_some(), "{parsed}");
}

#[tokio::test]
async fn bad_config_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "listen = \"127.0.0.1:0\"\nno_such_key = 1\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_breakwater")).args(["serve", "--config"]).arg(&config).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no_such_key"), "{err}");
}

#[tokio::test]
async fn sigterm_finishes_in_flight_requests() {
    let bw = Breakwater::start();
    let body: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let mut conn = start_upload(&bw.addr, "drain/me", &body, 300_000).await;
    wait_for_staged_bytes(&bw.data.path().join("content/tmp")).await;
    let kill = Command::new("kill").args(["-TERM", &bw.pid().to_string()]).status().unwrap();
    assert!(kill.success());
    // The request that was in flight when the signal came completes.
    conn.write_all(&body[300_000..]).await.unwrap();
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = conn.read(&mut buf).await.unwrap();
        resp.extend_from_slice(&buf[..n]);
        if n == 0 || resp.windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 201"), "{text}");
    drop(conn);
    // And the server then exits, without accepting new connections.
    let data = bw.stop_after_exit();
    let restarted = Breakwater::start_in(data, &[]);
    let r = reqwest::Client::new().head(restarted.url(&format!("/v2/drain/me/blobs/{}", sha256(&body)))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "the drained upload is durable");
}

#[tokio::test]
async fn kill_9_mid_upload_leaves_no_visible_blob() {
    let bw = Breakwater::start();
    let body: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 253) as u8).collect();
    let conn = start_upload(&bw.addr, "crash/me", &body, 700_000).await;
    wait_for_staged_bytes(&bw.data.path().join("content/tmp")).await;
    let kill = Command::new("kill").args(["-KILL", &bw.pid().to_string()]).status().unwrap();
    assert!(kill.success());
    drop(conn);
    let data = bw.stop();
    let restarted = Breakwater::start_in(data, &[]);
    let url = restarted.url(&format!("/v2/crash/me/blobs/{}", sha256(&body)));
    assert_eq!(status_of(&url, reqwest::Method::HEAD).await, 404);
    let staged: Vec<_> = std::fs::read_dir(restarted.data.path().join("content/tmp")).unwrap().collect();
    assert!(staged.is_empty(), "start-up removes interrupted writes");
    // The same blob can then be pushed whole and read back intact.
    let r = reqwest::Client::new()
        .post(restarted.url(&format!("/v2/crash/me/blobs/uploads/?digest={}", sha256(&body))))
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let got = reqwest::get(&url).await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&got), sha256(&body));
}

#[tokio::test]
async fn state_survives_restart_and_content_is_stored_once() {
    let bw = Breakwater::start();
    let blob = b"shared layer".to_vec();
    let client = reqwest::Client::new();
    for repo in ["one", "two/deep", "three"] {
        let r = client
            .post(bw.url(&format!("/v2/{repo}/blobs/uploads/?digest={}", sha256(&blob))))
            .body(blob.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    let files = count_files(&bw.data.path().join("content/blobs"));
    assert_eq!(files, 1, "a blob pushed to three repositories is stored once");
    let data = bw.stop();
    let bw = Breakwater::start_in(data, &[]);
    let catalog = client.get(bw.url("/v2/_catalog")).send().await.unwrap().text().await.unwrap();
    assert_eq!(catalog, r#"{"repositories":["one","three","two/deep"]}"#);
}

fn count_files(dir: &std::path::Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        n += if p.is_dir() { count_files(&p) } else { 1 };
    }
    n
}

#[tokio::test]
async fn postgres_metadata_end_to_end() {
    sqlx::any::install_default_drivers();
    let name = format!("bw_serve_{}", uuid::Uuid::new_v4().simple());
    let admin = sqlx::AnyPool::connect("postgres://postgres@127.0.0.1:5432/test").await.unwrap();
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&admin).await.unwrap();
    let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
    {
        let bw = Breakwater::start_with(&["--metadata", &url]);
        let client = reqwest::Client::new();
        let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
        let r = client
            .post(bw.url(&format!("/v2/pg/app/blobs/uploads/?digest={}", sha256(&config))))
            .body(config.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let manifest = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[]}}"#,
            sha256(&config),
            config.len()
        );
        let r = client
            .put(bw.url("/v2/pg/app/manifests/v1"))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(manifest.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
        let got = client.get(bw.url("/v2/pg/app/manifests/v1")).send().await.unwrap().text().await.unwrap();
        assert_eq!(got, manifest);
        // The state is in PostgreSQL, not in the data directory's SQLite file.
        assert!(!bw.data.path().join("metadata.db").exists());
    }
    let pg = sqlx::AnyPool::connect(&url).await.unwrap();
    let row: (String,) = sqlx::query_as("SELECT tag FROM tags WHERE repo = 'pg/app'").fetch_one(&pg).await.unwrap();
    assert_eq!(row.0, "v1");
    pg.close().await;
    sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)")).execute(&admin).await.unwrap();
}

#[tokio::test]
async fn abandoned_upload_sessions_are_discarded() {
    let bw = Breakwater::start_with(&["--upload-ttl-secs", "1"]);
    let client = reqwest::Client::new();
    let r = client.post(bw.url("/v2/slow/client/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let location = bw.url(r.headers()["location"].to_str().unwrap());
    let r = client.patch(&location).body(vec![7u8; 1000]).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    // The client never comes back: within a few sweeps the session and its bytes are gone.
    let mut status = 0;
    for _ in 0..300 {
        status = client.get(&location).send().await.unwrap().status().as_u16();
        if status == 404 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 404, "the abandoned session was discarded");
    let left: Vec<_> = std::fs::read_dir(bw.data.path().join("content/uploads")).unwrap().collect();
    assert!(left.is_empty(), "its bytes were removed too");
}
