//! Shared test harness: starts the real `breakwater` binary and a real Debian `docker-registry` on free loopback
//! ports, each with its own temporary data directory, and stops them when the handle is dropped.
#![allow(dead_code)]

pub mod auth;
pub mod browser;
pub mod containerd;
pub mod harbor;
pub mod images;
pub mod imds;
pub mod oci;
pub mod pg;
pub mod pki;
pub mod relay;
pub mod s3;
pub mod synthetic;
pub mod tls_front;

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `breakwater serve`, killed on drop.
pub struct Breakwater {
    child: Child,
    /// `127.0.0.1:PORT`, as printed by the server once it listens.
    pub addr: String,
    /// `https` when it serves TLS, else `http` (also as printed).
    pub scheme: &'static str,
    /// Where the server keeps its blobs and its SQLite database; removed on drop.
    pub data: tempfile::TempDir,
}

impl Breakwater {
    /// A registry with its defaults (embedded SQLite, local disk).
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A registry with extra `serve` flags.
    pub fn start_with(extra: &[&str]) -> Self {
        let data = tempfile::tempdir().expect("tempdir");
        Self::start_in(data, extra)
    }

    /// Starts on an existing data directory (to test restarts over the same state).
    pub fn start_in(data: tempfile::TempDir, extra: &[&str]) -> Self {
        Self::spawn(data, extra, "breakwater=debug", Stdio::inherit())
    }

    /// A registry with extra `serve` flags, `RUST_LOG=rust_log`, and its stderr (the log) written to the file
    /// `log` instead of the test's output, for tests that read what it logged.
    pub fn start_logged(extra: &[&str], rust_log: &str, log: &Path) -> Self {
        let file = std::fs::File::create(log).expect("create log file");
        Self::spawn(tempfile::tempdir().expect("tempdir"), extra, rust_log, Stdio::from(file))
    }

    /// A registry with extra `serve` flags and environment variables, logging to the file `log`.
    pub fn start_env(extra: &[&str], env: &[(&str, &str)], log: &Path) -> Self {
        let file = std::fs::File::create(log).expect("create log file");
        Self::spawn_env(tempfile::tempdir().expect("tempdir"), extra, env, "breakwater=info", Stdio::from(file))
    }

    /// A registry on an existing data directory with extra flags and environment variables, logging to `log`
    /// (appended to, so that a restart's lines follow the first run's).
    pub fn start_env_in(data: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)], log: &Path) -> Self {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(log).expect("open log file");
        Self::spawn_env(data, extra, env, "breakwater=info", Stdio::from(file))
    }

    fn spawn(data: tempfile::TempDir, extra: &[&str], rust_log: &str, stderr: Stdio) -> Self {
        Self::spawn_env(data, extra, &[], rust_log, stderr)
    }

    fn spawn_env(data: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)], rust_log: &str, stderr: Stdio) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_breakwater"));
        // The machine's own AWS settings (some set AWS_CA_BUNDLE, say) are not the test's: it passes its own.
        for (k, _) in std::env::vars().filter(|(k, _)| k.starts_with("AWS_")) {
            cmd.env_remove(k);
        }
        let mut child = cmd
            .arg("serve")
            .args(["--listen", "127.0.0.1:0", "--data"])
            .arg(data.path())
            .args(extra)
            .envs(env.iter().copied())
            .env("RUST_LOG", rust_log)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .expect("spawn breakwater");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read listen line");
        let url = line.trim().strip_prefix("breakwater listening on ");
        let (scheme, addr) = url
            .and_then(|u| u.split_once("://"))
            .unwrap_or_else(|| panic!("unexpected first line from breakwater: {line:?}"));
        let scheme = if scheme == "https" { "https" } else { "http" };
        Breakwater { child, addr: addr.to_string(), scheme, data }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Stops the server and hands back its data directory (for restart tests).
    pub fn stop(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::mem::replace(&mut self.data, tempfile::tempdir().expect("tempdir"))
    }
}

impl Breakwater {
    /// Waits for the server to exit by itself (after a signal), asserts it exited cleanly, and hands back its
    /// data directory.
    pub fn stop_after_exit(mut self) -> tempfile::TempDir {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.child.try_wait().expect("wait") {
                Some(status) => {
                    assert!(status.success(), "breakwater exited with {status}");
                    break;
                }
                None if Instant::now() > deadline => panic!("breakwater did not exit after the signal"),
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        std::mem::replace(&mut self.data, tempfile::tempdir().expect("tempdir"))
    }
}

impl Drop for Breakwater {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port (bound then released): free a moment ago, so another process may take it before the
/// caller does. For a server, use [`spawn_listening`], which makes sure the server got it.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Starts a server that cannot report its own port on a free one: `command(port)` is spawned, and it is ready when
/// the socket listening on `127.0.0.1:port` is the child's own. Between picking a port and the child binding it,
/// another test's server can take it (the child then exits, or a check for "something listens" would be answered
/// by a stranger, and the test would talk to another test's server until that one stops): then it starts again
/// on another port. Returns the child and its port.
pub fn spawn_listening(what: &str, mut command: impl FnMut(u16) -> Command) -> (Child, u16) {
    for _ in 0..5 {
        let port = free_port();
        let mut child = command(port).spawn().unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if child.try_wait().expect("try_wait").is_some() {
                break; // It could not bind (the port was taken): another port.
            }
            if listener_inode(port).is_some_and(|inode| owns_socket(child.id(), inode)) {
                return (child, port);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{what} does not listen on 127.0.0.1:{port}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.wait();
    }
    panic!("{what} did not start on any of 5 free ports");
}

/// The inode of the socket listening on `127.0.0.1:port` (or `0.0.0.0:port`), from `/proc/net/tcp`.
fn listener_inode(port: u16) -> Option<u64> {
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    let ours = [format!("0100007F:{port:04X}"), format!("00000000:{port:04X}")];
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        // sl local_address rem_address st tx_queue:rx_queue tr:tm->when retrnsmt uid timeout inode; st 0A = LISTEN.
        (f.len() > 9 && ours.iter().any(|o| o == f[1]) && f[3] == "0A").then(|| f[9].parse().ok()).flatten()
    })
}

/// Whether process `pid` holds socket `inode` among its open files.
fn owns_socket(pid: u32, inode: u64) -> bool {
    let want = format!("socket:[{inode}]");
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|fd| std::fs::read_link(fd.path()).is_ok_and(|l| l.to_string_lossy() == want))
}

/// Waits until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listens on {addr}");
}

/// A running Debian `docker-registry` (CNCF distribution 2.8), killed on drop.
pub struct Distribution {
    child: Child,
    pub addr: String,
    pub dir: tempfile::TempDir,
}

impl Distribution {
    pub fn start() -> Self {
        Self::start_proxy(None)
    }

    /// With `Some(url)`, distribution runs as a pull-through cache of `url`.
    pub fn start_proxy(remote: Option<&str>) -> Self {
        Self::start_with(&remote.map(|r| format!("proxy:\n  remoteurl: {r}\n")).unwrap_or_default())
    }

    /// Sends its notifications (every push, pull and delete) to `url` with `Authorization: <authorization>`, the
    /// way an operator configures distribution's `notifications.endpoints`.
    pub fn start_notifying(url: &str, authorization: &str) -> Self {
        Self::start_with(&format!(
            "notifications:\n  endpoints:\n    - name: breakwater\n      url: {url}\n      headers:\n        Authorization: [{authorization}]\n      timeout: 2s\n      threshold: 3\n      backoff: 1s\n"
        ))
    }

    /// With `extra`, YAML appended to its configuration (top-level sections).
    pub fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let (child, port) = spawn_listening("docker-registry (apt-get install docker-registry)", |port| {
            let mut config = format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
                dir.path().join("storage").display()
            );
            config.push_str(extra);
            let config_path = dir.path().join("config.yml");
            std::fs::write(&config_path, config).expect("write config");
            let mut c = Command::new(registry_binary());
            c.arg("serve").arg(&config_path).stdout(Stdio::null()).stderr(Stdio::null());
            c
        });
        Distribution { child, addr: format!("127.0.0.1:{port}"), dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }
}

impl Drop for Distribution {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn registry_binary() -> PathBuf {
    for candidate in ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"] {
        if Path::new(candidate).exists() {
            return PathBuf::from(candidate);
        }
    }
    PathBuf::from("docker-registry")
}
