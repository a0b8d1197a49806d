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
        let (child, port) = super::spawn_listening("s3s-fs (cargo install s3s-fs@0.14.1 --features binary --locked)", |port| {
            let mut c = Command::new("s3s-fs");
            c.args(["--host", "127.0.0.1", "--port", &port.to_string(), "--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
                .arg(root.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            c
        });
        S3Server { child, endpoint: format!("http://127.0.0.1:{port}"), root }
    }

    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.endpoint.trim_start_matches("http://").parse().expect("the endpoint is an address")
    }

    /// The storage URL of key prefix `prefix` in the bucket.
    pub fn url(&self, prefix: &str) -> String {
        format!("s3://{BUCKET}/{prefix}")
    }

    /// The standard AWS environment that points a client at this server, as a user would set it.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY.into()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_KEY.into()),
            ("AWS_REGION", "us-east-1".into()),
        ]
    }

    /// Multipart uploads begun and neither completed nor aborted (s3s-fs keeps one `.upload-ID.json` each).
    pub fn multipart_in_progress(&self) -> usize {
        std::fs::read_dir(self.root.path())
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(".upload-"))
            .count()
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
