//! A real S3 server for the tests: `s3s-fs` (crates.io, `cargo install s3s-fs@0.14.1 --features binary`; installed
//! by `scripts/test.sh`), which checks SigV4 signatures (headers and presigned URLs) against its one key pair and
//! keeps objects as files. Started on a free port with its own directory; killed on drop.

use std::process::{Child, Command, Stdio};

pub const ACCESS_KEY: &str = "breakwater-test";
pub const SECRET_KEY: &str = "breakwater-test-secret";
pub const BUCKET: &str = "breakwater";

pub struct S3Server {
    child: Child,
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    /// The server's root: one directory per bucket, one file per object.
    pub root: tempfile::TempDir,
}

impl S3Server {
    /// A server holding the empty bucket `BUCKET`.
    pub fn start() -> S3Server {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join(BUCKET)).expect("bucket dir");
        let port = super::free_port();
        let child = Command::new("s3s-fs")
            .args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(root.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn s3s-fs (cargo install s3s-fs@0.14.1 --features binary --locked)");
        let addr = format!("127.0.0.1:{port}");
        super::wait_for_port(&addr);
        S3Server { child, endpoint: format!("http://{addr}"), root }
    }

    /// `serve` flags for a breakwater on this server, under key prefix `prefix`.
    pub fn flags(&self, prefix: &str) -> Vec<String> {
        vec!["--storage".into(), format!("s3://{BUCKET}/{prefix}"), "--s3-endpoint".into(), self.endpoint.clone()]
    }

    /// The environment that carries the credentials (as a user would set them).
    pub fn env(&self) -> Vec<(&'static str, &'static str)> {
        vec![("AWS_ACCESS_KEY_ID", ACCESS_KEY), ("AWS_SECRET_ACCESS_KEY", SECRET_KEY), ("AWS_REGION", "us-east-1")]
    }

    /// Every object key under the bucket (relative paths of its files).
    pub fn keys(&self) -> Vec<String> {
        let base = self.root.path().join(BUCKET);
        let mut out = Vec::new();
        let mut dirs = vec![base.clone()];
        while let Some(d) = dirs.pop() {
            for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
                let p = e.path();
                if p.is_dir() {
                    dirs.push(p);
                } else {
                    out.push(p.strip_prefix(&base).expect("under base").to_string_lossy().into_owned());
                }
            }
        }
        out.sort();
        out
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
