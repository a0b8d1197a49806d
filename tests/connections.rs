//! Every wait is bounded: connections of clients that stop half-way (a partial request head, a stalled body, a
//! response nobody reads, an idle keep-alive) are closed by the server, at most `--max-connections` are served at
//! once, and slow clients that keep moving are served to the end. Then the same from the client side: an
//! upstream (behind the fault-injecting relay, or a raw socket that stalls on purpose) that stops sending a
//! catalog, token or blob body, or stops reading an upload, fails the operation instead of hanging it, while a
//! slow upload that keeps moving succeeds. And what a download holds: concurrent downloads of one blob, stored or
//! in flight, share one memory map of its file. Real binary, real sockets.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::Digest as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use common::relay::Relay;
use common::Distribution;

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{:x}", sha2::Sha256::digest(bytes))
}

/// A `breakwater serve` started with extra flags and environment variables (the settings under test are given
/// both ways), killed on drop.
struct Server {
    child: Child,
    addr: String,
    /// Kept so the data directory lives as long as the server.
    _data: tempfile::TempDir,
}

impl Server {
    fn start(args: &[&str], env: &[(&str, &str)]) -> Server {
        let data = tempfile::tempdir().unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_breakwater"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data"]).arg(data.path()).args(args);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.env("RUST_LOG", "breakwater=info").stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let addr = line.trim().strip_prefix("breakwater listening on http://").unwrap_or_else(|| panic!("{line:?}")).to_string();
        Server { child, addr, _data: data }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// What the server's open descriptors point at (`socket:[INODE]`, file paths).
    fn fd_targets(&self) -> Vec<String> {
        let dir = format!("/proc/{}/fd", self.pid());
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter_map(|e| std::fs::read_link(e.path()).ok())
            .map(|p| p.display().to_string())
            .collect()
    }

    /// What the server holds: its descriptors' targets (as `fd_targets`) and the files it has mapped (a stored
    /// blob being served is a memory map of its file, with no descriptor left open).
    fn held(&self) -> Vec<String> {
        self.fd_targets().into_iter().chain(self.mapped()).collect()
    }

    /// The file of each memory map the server has, one entry per map (`/proc/PID/maps`).
    fn mapped(&self) -> Vec<String> {
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid())).unwrap();
        // A line is `range perms offset dev inode path`; the path is the sixth field, if any.
        maps.lines().filter_map(|l| l.split_whitespace().nth(5)).map(str::to_string).collect()
    }

    /// How many of the server's maps are of a file whose name contains `hex` (a stored blob, a flight's spool).
    fn maps_of(&self, hex: &str) -> usize {
        self.mapped().iter().filter(|p| p.contains(hex)).count()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pushes `blob` to `repo` in one POST; returns its digest.
async fn push(server: &Server, repo: &str, blob: &[u8]) -> String {
    let digest = sha256(blob);
    let r = reqwest::Client::new()
        .post(server.url(&format!("/v2/{repo}/blobs/uploads/?digest={digest}")))
        .body(blob.to_vec())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    digest
}

/// Reads until the server closes the connection (EOF or reset); returns what arrived, or `None` if the
/// connection is still open after `bound`.
async fn read_until_closed(s: &mut TcpStream, bound: Duration) -> Option<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let deadline = tokio::time::Instant::now() + bound;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Sends a whole request (`GET`, or `HEAD` for one whose answer has no body to leave behind) and reads one
/// response head (the connection stays open).
async fn get_head(s: &mut TcpStream, method: &str, path: &str) -> String {
    s.write_all(format!("{method} {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = s.read(&mut buf).await.unwrap();
        assert!(n > 0, "closed before a response: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// The inode of the server's end of the connection whose client end is `client` (from /proc/net/tcp).
fn server_socket_inode(client: &TcpStream) -> String {
    let port = client.local_addr().unwrap().port();
    let server_port = client.peer_addr().unwrap().port();
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port_of = |addr: &str| addr.rsplit(':').next().map(|p| u16::from_str_radix(p, 16).unwrap());
    for line in table.lines().skip(1) {
        let cols: Vec<&str> = line.split_whitespace().collect();
        // Both ends must match, and the entry must be a live socket: a TIME_WAIT entry of an earlier connection
        // that used the same ephemeral port (or another server's socket) has inode 0 or other ends.
        if port_of(cols[1]) == Some(server_port) && port_of(cols[2]) == Some(port) && cols[9] != "0" {
            return cols[9].to_string();
        }
    }
    panic!("no server-side socket for client port {port}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_request_heads_are_closed_within_the_header_timeout() {
    let server = Server::start(&[], &[("BREAKWATER_HEADER_TIMEOUT_SECS", "5")]);
    let blob = b"served while 3000 connections dangle".to_vec();
    let digest = push(&server, "busy/app", &blob).await;
    let mut dangling = Vec::new();
    for _ in 0..3000 {
        let mut s = TcpStream::connect(&server.addr).await.unwrap();
        s.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nUser-Agent: slow").await.unwrap();
        dangling.push(s);
    }
    // Normal requests keep working while the 3,000 are open.
    let client = reqwest::Client::new();
    for _ in 0..20 {
        let r = client.get(server.url(&format!("/v2/busy/app/blobs/{digest}"))).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 200);
        assert_eq!(r.bytes().await.unwrap(), blob);
    }
    let closed = futures_util::future::join_all(dangling.iter_mut().map(|s| read_until_closed(s, Duration::from_secs(120)))).await;
    let open = closed.iter().filter(|c| c.is_none()).count();
    assert_eq!(open, 0, "{open} of 3000 partial-head connections are still open");
    let r = client.get(server.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[tokio::test]
async fn connections_beyond_the_cap_wait_until_others_close() {
    let server = Server::start(&["--max-connections", "4"], &[]);
    let mut held = Vec::new();
    for _ in 0..4 {
        let mut s = TcpStream::connect(&server.addr).await.unwrap();
        assert!(get_head(&mut s, "GET", "/v2/").await.starts_with("HTTP/1.1 200"));
        held.push(s);
    }
    // The fifth connects (the kernel's backlog takes it) but is not served while four are open.
    let mut fifth = TcpStream::connect(&server.addr).await.unwrap();
    fifth.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 4096];
    let early = tokio::time::timeout(Duration::from_secs(2), fifth.read(&mut buf)).await;
    assert!(early.is_err(), "the fifth connection was served while four were open: {early:?}");
    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(60), fifth.read(&mut buf)).await.expect("served once one closed").unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
}

/// A herd connecting at once finds room in the listen backlog: with the server serving no one new (its one
/// connection is held), 600 connections still complete their handshakes, queued by the kernel. With the backlog
/// of 128 that `TcpListener::bind` asks for, the kernel dropped the SYNs past it and those clients retried a
/// second, then three, later: the slowest first bytes of an 800-client herd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_herd_of_connections_fits_in_the_listen_backlog() {
    let server = Server::start(&["--max-connections", "1"], &[]);
    let mut held = TcpStream::connect(&server.addr).await.unwrap();
    assert!(get_head(&mut held, "GET", "/v2/").await.starts_with("HTTP/1.1 200"));
    let herd: Vec<_> = (0..600)
        .map(|_| {
            let addr = server.addr.clone();
            // A dropped SYN is retried after 1 s, 3 s, 7 s...: 5 s tells a queued connection from a dropped one.
            tokio::spawn(async move { tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await })
        })
        .collect();
    let mut connected = Vec::new();
    for h in herd {
        if let Ok(Ok(s)) = h.await.unwrap() {
            connected.push(s);
        }
    }
    assert_eq!(connected.len(), 600, "connections left out of the listen backlog");
}

#[tokio::test]
async fn idle_keep_alive_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("breakwater.toml");
    std::fs::write(&config, "idle_timeout_secs = 2\nheader_timeout_secs = 600\n").unwrap();
    let server = Server::start(&["--config", config.to_str().unwrap()], &[]);
    let mut s = TcpStream::connect(&server.addr).await.unwrap();
    assert!(get_head(&mut s, "HEAD", "/healthz").await.starts_with("HTTP/1.1 200"));
    // A connection in use is not idle: a request now and then keeps it (each gap is below the timeout).
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(get_head(&mut s, "HEAD", "/healthz").await.starts_with("HTTP/1.1 200"));
    }
    let rest = read_until_closed(&mut s, Duration::from_secs(120)).await;
    let rest = rest.expect("the idle connection is still open");
    assert!(rest.is_empty(), "{:?}", String::from_utf8_lossy(&rest));
}

#[tokio::test]
async fn a_stalled_request_body_is_dropped_and_the_upload_keeps_its_prefix() {
    let server = Server::start(&["--idle-timeout-secs", "2"], &[]);
    let client = reqwest::Client::new();
    let blob: Vec<u8> = (0..1_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let r = client.post(server.url("/v2/stall/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let mut s = TcpStream::connect(&server.addr).await.unwrap();
    let head = format!(
        "PATCH {location} HTTP/1.1\r\nHost: x\r\nContent-Type: application/octet-stream\r\nContent-Length: {}\r\n\r\n",
        blob.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&blob[..300_000]).await.unwrap();
    // ... and nothing more: the server gives up on the body and closes.
    let answer = read_until_closed(&mut s, Duration::from_secs(120)).await.expect("the stalled upload's connection is still open");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.is_empty() || !answer.starts_with("HTTP/1.1 2"), "a broken body was accepted: {answer}");
    // The session holds a prefix of what was sent; the client resumes from it and the blob is intact.
    let r = client.get(server.url(&location)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let range = r.headers()["range"].to_str().unwrap().to_string();
    let end: u64 = range.strip_prefix("0-").unwrap().parse().unwrap();
    let held = if end == 0 { 0 } else { end as usize + 1 };
    assert!(held <= 300_000, "the session claims {held} bytes of the 300000 sent");
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let r = client.patch(server.url(&location)).body(blob[held..].to_vec()).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = client.put(server.url(&format!("{location}{sep}digest={}", sha256(&blob)))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201, "{}", r.text().await.unwrap());
    let got = client.get(server.url(&format!("/v2/stall/app/blobs/{}", sha256(&blob)))).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&got), sha256(&blob));
}

#[tokio::test]
async fn slow_steady_transfers_outlast_the_idle_timeout() {
    let server = Server::start(&["--idle-timeout-secs", "2"], &[]);
    let client = reqwest::Client::new();
    // Upload: 16 chunks a third of a second apart, over 5 s in all.
    let blob: Vec<u8> = (0..16 * 4096u32).map(|i| (i % 241) as u8).collect();
    let digest = sha256(&blob);
    let r = client.post(server.url("/v2/slow/app/blobs/uploads/")).send().await.unwrap();
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let chunks: Vec<Vec<u8>> = blob.chunks(4096).map(<[u8]>::to_vec).collect();
    let body = futures_util::stream::iter(chunks).then(|c| async move {
        tokio::time::sleep(Duration::from_millis(333)).await;
        Ok::<_, std::io::Error>(c)
    });
    let started = Instant::now();
    let r = client.patch(server.url(&location)).body(reqwest::Body::wrap_stream(body)).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 202);
    assert!(started.elapsed() > Duration::from_secs(2), "the upload was not slower than the idle timeout");
    let location = r.headers()["location"].to_str().unwrap().to_string();
    let sep = if location.contains('?') { '&' } else { '?' };
    let r = client.put(server.url(&format!("{location}{sep}digest={digest}"))).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 201);
    // Download: a reader with a small receive buffer taking 16 KiB every third of a second.
    let big: Vec<u8> = (0..4_000_000u32).map(|i| (i * 31 % 253) as u8).collect();
    let big_digest = push(&server, "slow/app", &big).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(16 * 1024).unwrap();
    let mut s = socket.connect(server.addr.parse().unwrap()).await.unwrap();
    s.write_all(format!("GET /v2/slow/app/blobs/{big_digest} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let started = Instant::now();
    let mut reads = 0;
    loop {
        let n = s.read(&mut buf).await.unwrap();
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
        reads += 1;
        if reads % 16 == 0 && started.elapsed() < Duration::from_secs(6) {
            tokio::time::sleep(Duration::from_millis(333)).await;
        }
    }
    assert!(started.elapsed() > Duration::from_secs(2), "the download was not slower than the idle timeout");
    let split = got.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    assert!(String::from_utf8_lossy(&got[..split]).starts_with("HTTP/1.1 200"));
    assert_eq!(sha256(&got[split..]), big_digest, "the slow reader got the whole blob");
}

#[tokio::test]
async fn a_client_that_stops_reading_is_disconnected_and_its_descriptors_released() {
    let server = Server::start(&[], &[("BREAKWATER_IDLE_TIMEOUT_SECS", "2")]);
    let blob: Vec<u8> = (0..32_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = push(&server, "stuck/app", &blob).await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(8 * 1024).unwrap();
    let mut s = socket.connect(server.addr.parse().unwrap()).await.unwrap();
    s.write_all(format!("GET /v2/stuck/app/blobs/{digest} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = [0u8; 1024];
    let n = s.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    // The server holds our socket and the blob's file (mapped) while it writes...
    let inode = format!("socket:[{}]", server_socket_inode(&s));
    let blob_file = format!("{:x}", sha2::Sha256::digest(&blob));
    let holds = |targets: &[String]| (targets.contains(&inode), targets.iter().any(|t| t.ends_with(&blob_file)));
    assert_eq!(holds(&server.held()), (true, true));
    // ... and, once we stop reading, lets go of both.
    let deadline = Instant::now() + Duration::from_secs(120);
    while holds(&server.held()) != (false, false) {
        assert!(Instant::now() < deadline, "after 120 s the server still holds {:?}", holds(&server.held()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rest = read_until_closed(&mut s, Duration::from_secs(60)).await.expect("closed");
    assert!(rest.len() < blob.len(), "the stopped reader was cut, not served");
    // The server serves others as before.
    let got = reqwest::get(server.url(&format!("/v2/stuck/app/blobs/{digest}"))).await.unwrap().bytes().await.unwrap();
    assert_eq!(got.len(), blob.len());
}

/// Opens `n` connections that each send `GET path`, read the response head and then stop reading (with a small
/// receive buffer, so the server's writes block at once and each download stays in progress).
async fn stalled_downloads(server: &Server, path: &str, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for _ in 0..n {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(8 * 1024).unwrap();
        let mut s = socket.connect(server.addr.parse().unwrap()).await.unwrap();
        let head = get_head(&mut s, "GET", path).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        conns.push(s);
    }
    conns
}

/// Downloads of one stored blob that overlap share one memory map of its file, and the map goes with the last
/// of them: a herd pays the page tables and page faults once, not once per client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overlapping_downloads_of_a_stored_blob_share_one_map() {
    let server = Server::start(&[], &[]);
    let blob: Vec<u8> = (0..16_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let digest = push(&server, "herd/app", &blob).await;
    let hex = digest.strip_prefix("sha256:").unwrap().to_string();
    let conns = stalled_downloads(&server, &format!("/v2/herd/app/blobs/{digest}"), 20).await;
    assert_eq!(server.maps_of(&hex), 1, "20 downloads in progress: {:?}", server.mapped());
    drop(conns);
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.maps_of(&hex) != 0 {
        assert!(Instant::now() < deadline, "the map outlived its downloads: {:?}", server.mapped());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = reqwest::get(server.url(&format!("/v2/herd/app/blobs/{digest}"))).await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&got), digest);
}

/// The clients of a flight (a cold blob being downloaded from upstream) share one map of its spool, made once for
/// the whole blob. (Against the per-client, per-step maps this replaced, the count was 0 or 1 in two runs: those
/// maps were short-lived, so it does not tell the two apart; it guards against a map per client.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_of_a_flight_share_one_map_of_its_spool() {
    let source = Distribution::start();
    let blob: Vec<u8> = (0..16_000_000u32).map(|i| (i * 13 % 251) as u8).collect();
    let digest = common::oci::push_blob(&source.url(""), "lib/app", &blob).await;
    let relay = Relay::start(&source.addr);
    // 8 s for the blob: the flight is in progress while the clients join and stop.
    relay.throttle(2_000_000);
    let server = Server::start(&["--upstream", &format!("up=http://{}", relay.addr)], &[]);
    let hex = digest.strip_prefix("sha256:").unwrap().to_string();
    let conns = stalled_downloads(&server, &format!("/v2/up/lib/app/blobs/{digest}"), 20).await;
    assert_eq!(relay.count("GET", &hex), 1, "one download upstream");
    // Counted once a part of the blob has reached breakwater, so that its clients have had bytes to send.
    let deadline = Instant::now() + Duration::from_secs(30);
    while relay.body_bytes() < 2_000_000 {
        assert!(Instant::now() < deadline, "the download stalled at {} bytes", relay.body_bytes());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(server.maps_of(&hex), 1, "20 clients of one flight: {:?}", server.mapped());
    drop(conns);
    relay.throttle(0);
    let got = reqwest::get(server.url(&format!("/v2/up/lib/app/blobs/{digest}"))).await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&got), digest);
}

#[tokio::test]
async fn sigterm_waits_for_a_request_in_progress_under_the_new_accept_loop() {
    let server = Server::start(&["--idle-timeout-secs", "30"], &[]);
    let mut idle = TcpStream::connect(&server.addr).await.unwrap();
    assert!(get_head(&mut idle, "HEAD", "/healthz").await.starts_with("HTTP/1.1 200"));
    let blob: Vec<u8> = (0..500_000u32).map(|i| (i % 239) as u8).collect();
    let mut s = TcpStream::connect(&server.addr).await.unwrap();
    let head = format!(
        "POST /v2/drain/app/blobs/uploads/?digest={} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        sha256(&blob),
        blob.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(&blob[..100_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap().success());
    // The idle kept-alive connection is closed at once; the upload in progress completes.
    assert!(read_until_closed(&mut idle, Duration::from_secs(20)).await.is_some(), "idle connection kept open on shutdown");
    s.write_all(&blob[100_000..]).await.unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(60)).await.expect("closed after the answer");
    assert!(String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 201"), "{}", String::from_utf8_lossy(&answer));
}

// ---------------------------------------------------------------------------------------------------------------
// The client side: breakwater's upstream client against upstreams that stop half-way.

fn upstream(url: &str, timeout_secs: u64) -> Arc<breakwater::upstream::Upstream> {
    let config = breakwater::config::upstream("up", url, 0, timeout_secs, false, Some(false)).unwrap();
    Arc::new(breakwater::upstream::Upstream::new(config).unwrap())
}

#[tokio::test]
async fn a_stalled_catalog_body_fails_the_listing() {
    let registry = Distribution::start();
    common::oci::push_image(&registry.url(""), "listed/app", "v1", &[1000], 1).await;
    let relay = Relay::start(&registry.addr);
    relay.stall_after("/v2/_catalog", 5, 1);
    let up = upstream(&relay.url(""), 2);
    let r = tokio::time::timeout(Duration::from_secs(120), up.catalog_page(None, 100)).await.expect("the catalog listing hangs");
    assert!(matches!(r, Err(breakwater::upstream::UpstreamError::Unavailable(_))), "{r:?}");
    // The next page request (after the stall is spent) works.
    let page = up.catalog_page(None, 100).await.unwrap();
    assert_eq!(page.items, vec!["listed/app".to_string()]);
}

#[tokio::test]
async fn a_stalled_blob_body_ends_the_stream_with_an_error() {
    let registry = Distribution::start();
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i % 199) as u8).collect();
    let digest = common::oci::push_blob(&registry.url(""), "blobs/app", &blob).await;
    let relay = Relay::start(&registry.addr);
    relay.stall_after("/blobs/sha256:", 50_000, 1);
    let up = upstream(&relay.url(""), 2);
    let (repo, digest): (breakwater::oci::RepoName, breakwater::oci::Digest) = ("blobs/app".parse().unwrap(), digest.parse().unwrap());
    let mut b = up.blob(&repo, &digest, 0).await.unwrap();
    let mut got = 0;
    let end = tokio::time::timeout(Duration::from_secs(120), async {
        use futures_util::StreamExt;
        while let Some(chunk) = b.body.next().await {
            match chunk {
                Ok(c) => got += c.len(),
                Err(e) => return Err(e),
            }
        }
        Ok(())
    })
    .await
    .expect("the blob stream hangs");
    assert!(end.is_err() && got == 50_000, "{end:?} after {got} bytes");
    // Resumed from where it broke, the rest arrives.
    let mut rest = up.blob(&repo, &digest, got as u64).await.unwrap();
    assert!(rest.from_offset);
    let mut n = got;
    use futures_util::StreamExt;
    while let Some(c) = rest.body.next().await {
        n += c.unwrap().len();
    }
    assert_eq!(n, blob.len());
}

/// A raw-socket upstream that challenges for a bearer token and then never finishes the token's body.
async fn stalling_token_upstream() -> (String, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let realm = format!("http://{addr}/token");
    let task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else { return };
            let realm = realm.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                if head.starts_with(b"GET /token") {
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"tok").await;
                    std::future::pending::<()>().await;
                }
                let answer = format!(
                    "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"{realm}\",service=\"raw\"\r\nContent-Length: 0\r\n\r\n"
                );
                let _ = s.write_all(answer.as_bytes()).await;
                std::future::pending::<()>().await;
            });
        }
    });
    (addr, task)
}

#[tokio::test]
async fn a_stalled_token_body_fails_the_request() {
    let (addr, task) = stalling_token_upstream().await;
    let up = upstream(&format!("http://{addr}"), 2);
    let r = tokio::time::timeout(Duration::from_secs(120), up.catalog_page(None, 10)).await.expect("the token fetch hangs");
    assert!(matches!(r, Err(breakwater::upstream::UpstreamError::Unavailable(_))), "{r:?}");
    task.abort();
}

/// An upload source: `chunks` pieces of `size` bytes, each after `gap`.
fn slow_source(chunks: usize, size: usize, gap: Duration) -> (Vec<u8>, breakwater::storage::ByteStream) {
    let data: Vec<u8> = (0..chunks * size).map(|i| (i * 17 % 251) as u8).collect();
    let pieces: Vec<bytes::Bytes> = data.chunks(size).map(bytes::Bytes::copy_from_slice).collect();
    let stream = futures_util::stream::iter(pieces).then(move |c| async move {
        tokio::time::sleep(gap).await;
        Ok::<_, std::io::Error>(c)
    });
    (data, Box::pin(stream))
}

use futures_util::StreamExt as _;

#[tokio::test]
async fn a_slow_steady_upload_outlasts_the_idle_timeout_and_a_stalled_one_fails() {
    let registry = Distribution::start();
    let relay = Relay::start(&registry.addr);
    let up = upstream(&relay.url(""), 2);
    let repo: breakwater::oci::RepoName = "up/slow".parse().unwrap();
    // Slow and steady: 5 s in all, a chunk every 250 ms, with a 2 s idle timeout.
    let (data, body) = slow_source(20, 8192, Duration::from_millis(250));
    let digest: breakwater::oci::Digest = sha256(&data).parse().unwrap();
    let location = up.start_upload(&repo).await.unwrap();
    let started = Instant::now();
    let location = tokio::time::timeout(Duration::from_secs(120), up.patch_blob(&repo, &location, body))
        .await
        .expect("the upload hangs")
        .unwrap_or_else(|e| panic!("a slow but steady upload failed: {e}"));
    assert!(started.elapsed() > Duration::from_secs(2));
    up.finish_blob(&repo, &location, &digest).await.unwrap();
    let got = reqwest::get(registry.url(&format!("/v2/up/slow/blobs/{digest}"))).await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&got), digest.to_string());
    // Stalled: the destination stops reading the body (the relay holds the PATCH unanswered and unread).
    relay.hang_on("PATCH /v2/up/stalled/");
    let repo: breakwater::oci::RepoName = "up/stalled".parse().unwrap();
    let (_, body) = slow_source(64, 256 * 1024, Duration::ZERO);
    let location = up.start_upload(&repo).await.unwrap();
    let r = tokio::time::timeout(Duration::from_secs(120), up.patch_blob(&repo, &location, body)).await.expect("the stalled upload hangs");
    assert!(matches!(r, Err(breakwater::upstream::UpstreamError::Unavailable(_))), "{:?}", r.map(|_| ()));
    relay.clear_faults();
}
