//! HTTPS end to end: the real binary with a CA and server certificates made at test time (rcgen), driven by real
//! clients (skopeo and podman verifying with `--cert-dir`, curl negotiating HTTP/2) and by raw sockets (a silent
//! or half-sent handshake, plain HTTP on the TLS port, an HTTP/2 client that stops reading). Certificate reloads
//! are checked by which certificate a fresh handshake presents, with a rustls client that trusts one CA only.
//!
//! The tools are required, not optional: a missing tool fails the test (run `scripts/test.sh`, which installs them).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use common::images::{build_image, host_arch, oci_ref, output, require, run, scratch, sha256, skopeo, Podman};
use common::oci::pseudo_random;
use common::pki::{path, Pki};
use common::Breakwater;

/// How long a test waits for something that should happen at once, before it calls it a hang (never a measure).
const GUARD: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------------------------

fn start_tls(pki: &Pki, extra: &[&str]) -> Breakwater {
    let flags = pki.flags(extra);
    let bw = Breakwater::start_with(&flags.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(bw.scheme, "https", "the server announces an https:// address");
    bw
}

// ---------------------------------------------------------------------------------------------------------------
// A rustls client, to see the handshake itself
// ---------------------------------------------------------------------------------------------------------------

/// A client trusting the CA in `ca_pem` only, offering `alpn`.
fn connector(ca_pem: &Path, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(ca_pem).unwrap();
    for cert in <CertificateDer as rustls::pki_types::pem::PemObject>::pem_slice_iter(&pem) {
        roots.add(cert.unwrap()).unwrap();
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

type Tls = tokio_rustls::client::TlsStream<tokio::net::TcpStream>;

/// A TLS connection to `addr` that verifies the server against `ca_pem`; the error is the handshake's.
async fn handshake(addr: &str, ca_pem: &Path, alpn: &[&[u8]]) -> std::io::Result<Tls> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    tokio::time::timeout(GUARD, connector(ca_pem, alpn).connect(name, tcp)).await.expect("handshake hangs")
}

/// The certificate the server presents to a new connection that trusts `ca_pem`, if the handshake succeeds.
async fn presented(addr: &str, ca_pem: &Path) -> std::io::Result<Vec<u8>> {
    let tls = handshake(addr, ca_pem, &[b"http/1.1"]).await?;
    let certs = tls.get_ref().1.peer_certificates().expect("a certificate");
    Ok(certs[0].to_vec())
}

/// Sends `GET /v2/` on an HTTP/1.1 connection and returns the status line.
async fn get_v2(tls: &mut Tls) -> String {
    tls.write_all(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = Vec::new();
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = tokio::time::timeout(GUARD, tls.read(&mut buf)).await.expect("response hangs").unwrap();
        assert!(n > 0, "connection closed before the response head: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    // The body of /v2/ is `{}`; read it too, so the connection is ready for another request.
    let text = String::from_utf8_lossy(&got).into_owned();
    if text.contains("content-length: 2") && got.ends_with(b"\r\n\r\n") {
        let mut body = [0u8; 2];
        tls.read_exact(&mut body).await.unwrap();
    }
    text.lines().next().unwrap_or_default().to_string()
}

/// Waits until a new handshake presents `want` (the server reloads in the background), or panics after `GUARD`.
async fn await_presented(addr: &str, ca_pem: &Path, want: &[u8]) {
    let deadline = Instant::now() + GUARD;
    loop {
        if presented(addr, ca_pem).await.is_ok_and(|der| der == want) {
            return;
        }
        assert!(Instant::now() < deadline, "the server never presented the new certificate");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn wait_for_log(log: &Path, needle: &str, times: usize) {
    let deadline = Instant::now() + GUARD;
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.matches(needle).count() >= times {
            return;
        }
        assert!(Instant::now() < deadline, "the log never said {needle:?} {times} times:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn sighup(bw: &Breakwater) {
    run(Command::new("kill").args(["-HUP", &bw.pid().to_string()]));
}

// ---------------------------------------------------------------------------------------------------------------
// curl
// ---------------------------------------------------------------------------------------------------------------

/// curl, verifying the server against `ca`; `extra` then the URL arguments. Returns stdout (`-w` output).
fn curl(ca: &Path, args: &[&str]) -> String {
    require("curl");
    run(Command::new("curl").args(["-sS", "--fail", "--max-time", "120", "--cacert"]).arg(ca).args(args))
}

/// Pushes `bytes` as a blob of `repo` over HTTP/2, in one POST, and returns its digest.
fn push_blob_h2(bw: &Breakwater, pki: &Pki, repo: &str, bytes: &[u8], dir: &Path) -> String {
    let digest = sha256(bytes);
    let file = dir.join(format!("upload-{}", &digest[7..19]));
    std::fs::write(&file, bytes).unwrap();
    let url = bw.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}"));
    let data = format!("@{}", path(&file));
    let written = curl(
        &pki.ca(),
        &[
            "--http2",
            "-X",
            "POST",
            "-H",
            "Content-Type: application/octet-stream",
            "--data-binary",
            &data,
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{http_version}",
            &url,
        ],
    );
    assert_eq!(written, "201 2", "the upload over HTTP/2");
    digest
}

// ---------------------------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------------------------

/// skopeo pushes an image over HTTPS verifying the server with `--dest-cert-dir`, and copies it back with
/// `--src-cert-dir`: same digest. Without the CA, verification fails with a certificate error.
#[test]
fn skopeo_copies_over_https_verifying_with_the_cert_dir() {
    let pki = Pki::new(1);
    let bw = start_tls(&pki, &[]);
    let dir = scratch();
    let tmp = dir.path();
    let layout = tmp.join("src");
    let digest = build_image(&layout, "v1", host_arch(), &[("etc/motd", "served over TLS\n")]);
    let remote = format!("docker://{}/tls/app:v1", bw.addr);
    let cert_dir = path(&pki.cert_dir());

    run(skopeo(tmp).args(["copy", "--dest-cert-dir", &cert_dir, &oci_ref(&layout, "v1"), &remote]));
    let out = tmp.join("out");
    run(skopeo(tmp).args(["copy", "--preserve-digests", "--src-cert-dir", &cert_dir, &remote, &oci_ref(&out, "v1")]));
    assert_eq!(common::images::layout_digest(&out, "v1"), digest);
    let inspected = run(skopeo(tmp).args(["inspect", "--cert-dir", &cert_dir, &remote]));
    let v: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(v["Digest"], digest.as_str());

    // Verification really happens: without the CA the same copy fails on the certificate.
    let refused = output(skopeo(tmp).args(["copy", &remote, &oci_ref(&tmp.join("refused"), "v1")]));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "a copy without the CA succeeded");
    assert!(stderr.contains("certificate"), "not a certificate error: {stderr}");
}

/// podman pulls over HTTPS with `--cert-dir` and records the pushed digest.
#[test]
fn podman_pulls_over_https_with_the_cert_dir() {
    let pki = Pki::new(2);
    let bw = start_tls(&pki, &[]);
    let dir = scratch();
    let tmp = dir.path();
    let layout = tmp.join("src");
    let digest = build_image(&layout, "v1", host_arch(), &[("etc/motd", "pulled by podman over TLS\n")]);
    let cert_dir = path(&pki.cert_dir());
    run(skopeo(tmp).args(["copy", "--dest-cert-dir", &cert_dir, &oci_ref(&layout, "v1"), &format!("docker://{}/tls/pod:v1", bw.addr)]));

    let podman = Podman::new();
    let image = format!("{}/tls/pod:v1", bw.addr);
    run(podman.cmd().args(["pull", "--cert-dir", &cert_dir, &image]));
    assert_eq!(podman.inspect(&image)["Digest"], digest.as_str());
}

/// curl negotiates HTTP/2 through ALPN; blobs of several MB pushed and pulled over h2, several at once on one
/// connection, and pulled over HTTP/1.1, hash to their digests.
#[test]
fn curl_speaks_http2_and_large_blobs_arrive_whole() {
    let pki = Pki::new(3);
    let bw = start_tls(&pki, &[]);
    let dir = scratch();
    let ca = pki.ca();
    assert_eq!(curl(&ca, &["--http2", "-o", "/dev/null", "-w", "%{http_version}", &bw.url("/v2/")]), "2");
    assert_eq!(curl(&ca, &["--http1.1", "-o", "/dev/null", "-w", "%{http_version}", &bw.url("/v2/")]), "1.1");

    let big = pseudo_random(12 << 20, 0x7150);
    let digest = push_blob_h2(&bw, &pki, "tls/big", &big, dir.path());
    for (flag, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let file = dir.path().join(format!("get{flag}"));
        let url = bw.url(&format!("/v2/tls/big/blobs/{digest}"));
        let got = curl(&ca, &[flag, "-o", &path(&file), "-w", "%{http_version}", &url]);
        assert_eq!(got, version);
        assert_eq!(sha256(&std::fs::read(&file).unwrap()), digest, "the blob over {flag}");
    }

    // Several blobs at once, multiplexed on one HTTP/2 connection.
    let blobs: Vec<(String, Vec<u8>)> = (0..6u64)
        .map(|i| {
            let bytes = pseudo_random((1 << 20) + i as usize * 4099, 0x100 + i);
            (push_blob_h2(&bw, &pki, "tls/many", &bytes, dir.path()), bytes)
        })
        .collect();
    let mut args = vec!["--http2".to_string(), "--parallel".to_string(), "--parallel-max".to_string(), "6".to_string()];
    for (digest, _) in &blobs {
        args.push("-o".into());
        args.push(path(&dir.path().join(&digest[7..])));
        args.push(bw.url(&format!("/v2/tls/many/blobs/{digest}")));
    }
    args.extend(["-w".to_string(), "%{http_version}\n".to_string()]);
    let versions = curl(&ca, &args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(versions.lines().collect::<Vec<_>>(), vec!["2"; blobs.len()]);
    for (digest, bytes) in &blobs {
        let got = std::fs::read(dir.path().join(&digest[7..])).unwrap();
        assert_eq!(got.len(), bytes.len());
        assert_eq!(&sha256(&got), digest);
    }
}

/// SIGHUP makes new handshakes present a replaced certificate, while a connection made before goes on with the
/// old one; a bad new pair is refused and the good one kept; a replacement without a signal is found by the poll.
#[tokio::test]
async fn certificates_reload_on_sighup_and_on_file_change() {
    let first = Pki::new(10);
    let dir = scratch();
    let log = dir.path().join("server.log");
    let flags = first.flags(&[]);
    let bw = Breakwater::start_logged(&flags.iter().map(String::as_str).collect::<Vec<_>>(), "breakwater=info", &log);
    assert_eq!(presented(&bw.addr, &first.ca()).await.unwrap(), first.der);
    let mut before = handshake(&bw.addr, &first.ca(), &[b"http/1.1"]).await.unwrap();
    assert_eq!(get_v2(&mut before).await, "HTTP/1.1 200 OK");

    // A new pair from another CA, then SIGHUP.
    let second = Pki::new(11);
    second.install_over(&first);
    sighup(&bw);
    await_presented(&bw.addr, &second.ca(), &second.der).await;
    assert!(presented(&bw.addr, &first.ca()).await.is_err(), "the old CA still verifies a new connection");
    // The connection made before the reload is undisturbed.
    assert_eq!(get_v2(&mut before).await, "HTTP/1.1 200 OK");

    // A bad pair (the certificate without its key) is refused, and the second pair still served.
    let third = Pki::new(12);
    std::fs::copy(third.cert(), first.cert()).unwrap();
    sighup(&bw);
    wait_for_log(&log, "TLS certificate not reloaded", 1);
    assert_eq!(presented(&bw.addr, &second.ca()).await.unwrap(), second.der);
    // Garbage for a key as well: still the second pair.
    std::fs::write(first.key(), "not a key").unwrap();
    sighup(&bw);
    wait_for_log(&log, "TLS certificate not reloaded", 2);
    assert_eq!(presented(&bw.addr, &second.ca()).await.unwrap(), second.der);

    // The whole third pair, with no signal: the file poll finds it.
    third.install_over(&first);
    await_presented(&bw.addr, &third.ca(), &third.der).await;
    wait_for_log(&log, "files changed", 1);
}

/// The handshake is bounded by the header timeout: a connection that sends nothing, or half a ClientHello, is
/// closed; a normal client meanwhile is served.
#[tokio::test]
async fn silent_and_half_handshakes_are_closed_at_the_header_timeout() {
    let pki = Pki::new(20);
    let bw = start_tls(&pki, &["--header-timeout-secs", "1"]);

    // A real ClientHello, made by rustls in memory.
    let mut client = rustls::ClientConnection::new(
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
        ),
        ServerName::try_from("127.0.0.1").unwrap(),
    )
    .unwrap();
    let mut hello = Vec::new();
    client.write_tls(&mut hello).unwrap();
    assert!(hello.len() > 100, "a ClientHello of {} bytes", hello.len());

    let silent = TcpStream::connect(&bw.addr).unwrap();
    let mut half = TcpStream::connect(&bw.addr).unwrap();
    half.write_all(&hello[..hello.len() / 2]).unwrap();

    // Meanwhile a complete client is served.
    let mut ok = handshake(&bw.addr, &pki.ca(), &[b"http/1.1"]).await.unwrap();
    assert_eq!(get_v2(&mut ok).await, "HTTP/1.1 200 OK");

    for (what, mut sock) in [("silent", silent), ("half ClientHello", half)] {
        let closed = tokio::task::spawn_blocking(move || closed_by_server(&mut sock)).await.unwrap();
        assert!(closed, "the {what} connection was not closed");
    }
}

/// Reads until the server closes (EOF or reset); false if it is still open after `GUARD`.
fn closed_by_server(sock: &mut TcpStream) -> bool {
    sock.set_read_timeout(Some(GUARD)).unwrap();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => return false,
            Err(_) => return true,
        }
    }
}

/// Plain HTTP sent to the TLS port gets no HTTP response and a closed connection, not a hang.
#[test]
fn plain_http_on_the_tls_port_is_closed() {
    let pki = Pki::new(30);
    let bw = start_tls(&pki, &[]);
    let mut sock = TcpStream::connect(&bw.addr).unwrap();
    sock.write_all(b"GET /v2/ HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    sock.set_read_timeout(Some(GUARD)).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match sock.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                panic!("the server neither answered nor closed")
            }
            Err(_) => break,
        }
    }
    assert!(!got.starts_with(b"HTTP/"), "an HTTP answer on the TLS port: {}", String::from_utf8_lossy(&got));
    // And curl, asked for http://, fails rather than waits.
    let out = output(Command::new("curl").args(["-sS", "--max-time", "60", &format!("http://{}/v2/", bw.addr)]));
    assert!(!out.status.success(), "curl got an answer over plain HTTP");
}

/// The `[tls]` example of the README, and the BREAKWATER_TLS_* variables, serve HTTPS.
#[test]
fn tls_from_the_config_file_and_the_environment() {
    let pki = Pki::new(40);
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let example = readme
        .split("```toml\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap_or(""))
        .find(|b| b.contains("[tls]"))
        .expect("the README shows a [tls] example");
    let dir = pki.dir.path();
    let config = example
        .replace("/etc/breakwater/tls/server.pem", &path(&pki.cert()))
        .replace("/etc/breakwater/tls/server.key", &path(&pki.key()));
    assert_ne!(config, example, "the example names /etc/breakwater/tls/server.pem and server.key");
    let config_file = dir.join("breakwater.toml");
    std::fs::write(&config_file, &config).unwrap();
    // The harness's --listen 127.0.0.1:0 overrides the example's address.
    let from_file = Breakwater::start_with(&["--config", &path(&config_file)]);
    assert_eq!(from_file.scheme, "https");
    assert_eq!(curl(&pki.ca(), &["-o", "/dev/null", "-w", "%{http_code}", &from_file.url("/v2/")]), "200");

    let log = dir.join("env.log");
    let env = [("BREAKWATER_TLS_CERT", path(&pki.cert())), ("BREAKWATER_TLS_KEY", path(&pki.key()))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let from_env = Breakwater::start_env(&[], &env, &log);
    assert_eq!(from_env.scheme, "https");
    assert_eq!(curl(&pki.ca(), &["-o", "/dev/null", "-w", "%{http_code}", &from_env.url("/v2/")]), "200");
}

/// A certificate without its key, or a key that is not the certificate's, stops the start with an error.
#[test]
fn a_bad_pair_stops_the_start() {
    let (a, b) = (Pki::new(50), Pki::new(51));
    for flags in [
        vec!["--tls-cert".to_string(), path(&a.cert())],
        vec!["--tls-cert".to_string(), path(&a.cert()), "--tls-key".to_string(), path(&b.key())],
    ] {
        let data = scratch();
        let out = output(
            Command::new(env!("CARGO_BIN_EXE_breakwater"))
                .args(["serve", "--listen", "127.0.0.1:0", "--data", &path(data.path())])
                .args(&flags),
        );
        assert!(!out.status.success(), "started with {flags:?}");
        assert!(String::from_utf8_lossy(&out.stdout).is_empty(), "it listened with {flags:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("key"), "{flags:?}: {stderr}");
    }
}

// ---------------------------------------------------------------------------------------------------------------
// An HTTP/2 client that stops reading, written frame by frame
// ---------------------------------------------------------------------------------------------------------------

/// An HTTP/2 frame header: length, type, flags, stream.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A HEADERS block of literal fields (HPACK "without indexing, new name", no Huffman coding).
fn hpack(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127);
        out.push(0);
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out.push(value.len() as u8);
        out.extend_from_slice(value.as_bytes());
    }
    out
}

/// A client that asks for a large blob over HTTP/2 and then grants no flow-control window (it answers pings and
/// settings, so it is alive, and reads the socket, so no write is stuck): the server closes the connection after
/// the idle timeout instead of holding the response forever. The same request with a normal client succeeds.
#[tokio::test]
async fn an_http2_client_that_stops_reading_is_closed() {
    let pki = Pki::new(60);
    let bw = start_tls(&pki, &["--idle-timeout-secs", "1"]);
    let dir = scratch();
    let blob = pseudo_random(4 << 20, 0x60);
    let digest = push_blob_h2(&bw, &pki, "tls/stall", &blob, dir.path());

    let mut tls = handshake(&bw.addr, &pki.ca(), &[b"h2"]).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(0x4, 0, 0, &[]));
    let path = format!("/v2/tls/stall/blobs/{digest}");
    let headers = hpack(&[(":method", "GET"), (":scheme", "https"), (":path", &path), (":authority", "127.0.0.1")]);
    hello.extend(frame(0x1, 0x4 | 0x1, 1, &headers));
    tls.write_all(&hello).await.unwrap();

    let mut data = 0usize;
    let mut status_seen = false;
    let closed = tokio::time::timeout(GUARD, async {
        loop {
            let mut head = [0u8; 9];
            if tls.read_exact(&mut head).await.is_err() {
                return;
            }
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let mut payload = vec![0u8; len];
            if tls.read_exact(&mut payload).await.is_err() {
                return;
            }
            match (head[3], head[4] & 1) {
                (0x0, _) => data += len,
                (0x1, _) => status_seen = true,
                (0x4, 0) => tls.write_all(&frame(0x4, 0x1, 0, &[])).await.unwrap(),
                (0x6, 0) => tls.write_all(&frame(0x6, 0x1, 0, &payload)).await.unwrap(),
                // GOAWAY, RST_STREAM: the server gave up on us.
                (0x7, _) | (0x3, _) => return,
                _ => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept a connection whose client stopped reading");
    assert!(status_seen, "the response started");
    assert!(data < blob.len(), "the whole blob arrived ({data} bytes) though no window was granted");

    // A client that reads gets the whole blob from the same server.
    let file = dir.path().join("whole");
    let url = bw.url(&path);
    assert_eq!(curl(&pki.ca(), &["--http2", "-o", &self::path(&file), "-w", "%{http_version}", &url]), "2");
    assert_eq!(sha256(&std::fs::read(&file).unwrap()), digest);
}

// ---------------------------------------------------------------------------------------------------------------
// breakwater as the client of registries with a private CA
// ---------------------------------------------------------------------------------------------------------------

/// `[[upstream]] ca = FILE`: the cache pulls from an HTTPS upstream whose certificate a private CA signed; the
/// same upstream without `ca` fails verification and the pull fails.
#[test]
fn an_upstream_with_a_private_ca() {
    let pki = Pki::new(70);
    let upstream = start_tls(&pki, &[]);
    let dir = scratch();
    let blob = pseudo_random(3 << 20, 0x70);
    let digest = push_blob_h2(&upstream, &pki, "tls/up", &blob, dir.path());

    let config = dir.path().join("cache.toml");
    let upstream_url = format!("https://{}", upstream.addr);
    std::fs::write(
        &config,
        format!("[[upstream]]\nname = \"secure\"\nurl = \"{upstream_url}\"\nca = \"{}\"\n", path(&pki.ca())),
    )
    .unwrap();
    let cache = Breakwater::start_with(&["--config", &path(&config)]);
    let file = dir.path().join("through-cache");
    let url = cache.url(&format!("/v2/secure/tls/up/blobs/{digest}"));
    require("curl");
    run(Command::new("curl").args(["-sS", "--fail", "-o", &path(&file), &url]));
    assert_eq!(sha256(&std::fs::read(&file).unwrap()), digest);

    let untrusting = Breakwater::start_with(&["--upstream", &format!("secure={upstream_url}")]);
    let code = run(Command::new("curl").args([
        "-sS",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        &untrusting.url(&format!("/v2/secure/tls/up/blobs/{digest}")),
    ]));
    assert_ne!(code, "200", "the upstream's certificate was not verified");
}

/// `[[replication]] from_ca` / `to_ca`: `breakwater replicate` copies between two HTTPS registries, each with
/// its own private CA.
#[test]
fn replication_between_registries_with_private_cas() {
    let (src_pki, dst_pki) = (Pki::new(80), Pki::new(81));
    let (src, dst) = (start_tls(&src_pki, &[]), start_tls(&dst_pki, &[]));
    let dir = scratch();
    let tmp = dir.path();
    let layout = tmp.join("src");
    let digest = build_image(&layout, "v1", host_arch(), &[("etc/motd", "replicated over TLS\n")]);
    let src_cert_dir = path(&src_pki.cert_dir());
    run(skopeo(tmp).args(["copy", "--dest-cert-dir", &src_cert_dir, &oci_ref(&layout, "v1"), &format!("docker://{}/tls/rep:v1", src.addr)]));

    let config = tmp.join("replicate.toml");
    std::fs::write(
        &config,
        format!(
            "[[replication]]\nname = \"secure\"\nfrom = \"https://{}\"\nto = \"https://{}\"\nfrom_ca = \"{}\"\nto_ca = \"{}\"\n",
            src.addr,
            dst.addr,
            path(&src_pki.ca()),
            path(&dst_pki.ca())
        ),
    )
    .unwrap();
    let data = scratch();
    run(Command::new(env!("CARGO_BIN_EXE_breakwater"))
        .args(["replicate", "--policy", "secure", "--config", &path(&config), "--data", &path(data.path())]));
    let inspected = run(skopeo(tmp).args(["inspect", "--cert-dir", &path(&dst_pki.cert_dir()), &format!("docker://{}/tls/rep:v1", dst.addr)]));
    let v: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(v["Digest"], digest.as_str());
}

/// A policy inside a TLS `serve` with `to = "local"` replicates into the server itself over HTTPS
/// (`https://127.0.0.1:PORT`, verified with `to_ca`).
#[test]
fn replication_into_local_over_https() {
    let (src_pki, local_pki) = (Pki::new(90), Pki::new(91));
    let src = start_tls(&src_pki, &[]);
    let dir = scratch();
    let tmp = dir.path();
    let layout = tmp.join("src");
    let digest = build_image(&layout, "v1", host_arch(), &[("etc/motd", "replicated into local\n")]);
    run(skopeo(tmp).args(["copy", "--dest-cert-dir", &path(&src_pki.cert_dir()), &oci_ref(&layout, "v1"), &format!("docker://{}/tls/in:v1", src.addr)]));

    let config = tmp.join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "[tls]\ncert = \"{}\"\nkey = \"{}\"\n\n[[replication]]\nname = \"pull-in\"\nfrom = \"https://{}\"\nto = \"local\"\nfrom_ca = \"{}\"\nto_ca = \"{}\"\n",
            path(&local_pki.cert()),
            path(&local_pki.key()),
            src.addr,
            path(&src_pki.ca()),
            path(&local_pki.ca())
        ),
    )
    .unwrap();
    let local = Breakwater::start_with(&["--config", &path(&config)]);
    let ca = local_pki.ca();
    curl(&ca, &["-X", "POST", "-o", "/dev/null", &local.url("/api/replication/pull-in/run")]);
    let deadline = Instant::now() + GUARD;
    let status = loop {
        let v: serde_json::Value = serde_json::from_str(&curl(&ca, &[&local.url("/api/replication/pull-in")])).unwrap();
        if v["running"] == false && v["progress"]["status"] != "never run" {
            break v;
        }
        assert!(Instant::now() < deadline, "the run did not end: {v}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(status["progress"]["status"], "finished", "{status}");
    let inspected = run(skopeo(tmp).args(["inspect", "--cert-dir", &path(&local_pki.cert_dir()), &format!("docker://{}/tls/in:v1", local.addr)]));
    let v: serde_json::Value = serde_json::from_str(&inspected).unwrap();
    assert_eq!(v["Digest"], digest.as_str());
}

/// With TLS and access control, the token realm clients are sent to is https, skopeo logs in through it, and
/// `breakwater warm --ca` verifies the server with the private CA and logs in with a password.
#[test]
fn the_token_flow_over_https_and_warm_with_a_private_ca() {
    let pki = Pki::new(9);
    let dir = scratch();
    let tmp = dir.path();
    common::images::require("htpasswd");
    let users = tmp.join("users");
    run(Command::new("htpasswd").args(["-B", "-b", "-c"]).arg(&users).args(["alice", "tls-pw-1"]));
    let bw = start_tls(&pki, &["--htpasswd", &path(&users)]);
    // Over HTTP/2 the host the client used comes as `:authority`, not `Host`.
    let v2 = output(Command::new("curl").args(["-s", "--http2", "-D", "-", "-o", "/dev/null", "--cacert"]).arg(pki.ca()).arg(format!("https://{}/v2/", bw.addr)));
    let v2 = String::from_utf8_lossy(&v2.stdout).to_string();
    assert!(v2.starts_with("HTTP/2 401"), "{v2}");
    assert!(v2.to_lowercase().contains(&format!("www-authenticate: bearer realm=\"https://{}/auth/token\"", bw.addr)), "{v2}");

    let layout = tmp.join("src");
    let digest = build_image(&layout, "v1", host_arch(), &[("etc/motd", "tls and a login\n")]);
    let cert_dir = path(&pki.cert_dir());
    let remote = format!("docker://{}/team/app:v1", bw.addr);
    run(skopeo(tmp).args(["copy", "--dest-cert-dir", &cert_dir, "--dest-creds", "alice:tls-pw-1", &oci_ref(&layout, "v1"), &remote]));
    let warm = |ca: Option<&Path>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_breakwater"));
        cmd.args(["warm", "--server", &format!("https://{}", bw.addr), "--username", "alice", "--password", "tls-pw-1", "team/app:v1"]);
        if let Some(ca) = ca {
            cmd.arg("--ca").arg(ca);
        }
        cmd.env("RUST_LOG", "warn").output().unwrap()
    };
    assert!(!warm(None).status.success(), "warm trusted a private CA it was not given");
    let out = warm(Some(&pki.ca()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let blobs = common::images::layout_image_blobs(&layout, &digest).len();
    assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("warmed 1 manifests and {blobs} blobs")), "{}", String::from_utf8_lossy(&out.stderr));
}
