//! A stand-in for EC2's instance metadata service (IMDSv2), which cannot run off EC2: a session token for
//! `PUT /latest/api/token`, then the role and its temporary credentials for requests that carry that token. Only
//! the three requests of the credential flow are answered; each is counted.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const TOKEN: &str = "imds-session-token";
const ROLE: &str = "breakwater-node";

pub struct Imds {
    pub endpoint: String,
    /// Credential documents served (the last step of the flow).
    served: Arc<AtomicUsize>,
}

impl Imds {
    /// Hands out `key`/`secret` with session token `session` (expiring far in the future).
    pub fn start(key: &str, secret: &str, session: &str) -> Imds {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let served = Arc::new(AtomicUsize::new(0));
        let expiration = "2100-01-01T00:00:00Z";
        let document = format!(
            r#"{{"Code":"Success","Type":"AWS-HMAC","AccessKeyId":"{key}","SecretAccessKey":"{secret}","Token":"{session}","Expiration":"{expiration}"}}"#
        );
        let count = Arc::clone(&served);
        // Detached: it ends with the test process (a blocked accept holds nothing else).
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                let _ = answer(conn, &document, &count);
            }
        });
        Imds { endpoint, served }
    }

    pub fn served(&self) -> usize {
        self.served.load(Ordering::SeqCst)
    }
}

fn answer(mut conn: std::net::TcpStream, document: &str, served: &AtomicUsize) -> std::io::Result<()> {
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut token = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line == "\r\n" {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.eq_ignore_ascii_case("x-aws-ec2-metadata-token") {
                token = Some(v.trim().to_string());
            }
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let authorized = token.as_deref() == Some(TOKEN);
    let (status, body) = match (method, path.trim_end_matches('/')) {
        ("PUT", "/latest/api/token") => ("200 OK", TOKEN.to_string()),
        (_, _) if !authorized => ("401 Unauthorized", String::new()),
        ("GET", "/latest/meta-data/iam/security-credentials") => ("200 OK", ROLE.to_string()),
        ("GET", p) if p == format!("/latest/meta-data/iam/security-credentials/{ROLE}") => {
            served.fetch_add(1, Ordering::SeqCst);
            ("200 OK", document.to_string())
        }
        _ => ("404 Not Found", String::new()),
    };
    write!(conn, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())
}
