//! A real headless browser for tests of the status page: Debian's `chromium`, driven by `chromedriver` over the
//! W3C WebDriver protocol, which is plain HTTP and JSON (spoken here with reqwest; no WebDriver crate).
//!
//! `Browser::start()` runs chromedriver on a free port in a process group of its own and opens a session of a
//! headless chromium that records its console. Dropping it ends the session and kills the group (chromedriver and
//! every chromium process it started).
#![allow(dead_code)]

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::images;

/// The W3C name of an element reference in WebDriver answers.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

pub struct Browser {
    driver: Child,
    base: String,
    session: String,
    http: reqwest::Client,
}

/// One console entry of the page (`level` is `SEVERE` for errors: uncaught exceptions, refused resources).
#[derive(Debug, Clone)]
pub struct LogEntry {
    pub level: String,
    pub message: String,
}

impl Browser {
    pub async fn start() -> Browser {
        images::require("chromium");
        images::require("chromedriver");
        let (driver, port) = super::spawn_listening("chromedriver", |port| {
            let mut c = Command::new("chromedriver");
            c.arg(format!("--port={port}")).stdout(Stdio::null()).stderr(Stdio::null()).process_group(0);
            c
        });
        let mut b = Browser { driver, base: format!("http://127.0.0.1:{port}"), session: String::new(), http: reqwest::Client::new() };
        let caps = json!({ "capabilities": { "alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1400,1000"],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        }}});
        let v = b.call("POST", "/session", Some(caps)).await.unwrap_or_else(|e| panic!("starting a chromium session: {e}"));
        b.session = v["sessionId"].as_str().expect("a session id").to_string();
        b
    }

    /// One WebDriver command; its `value`, or the WebDriver error as text.
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.http.get(&url),
            "DELETE" => self.http.delete(&url),
            _ => self.http.post(&url).header("content-type", "application/json").body(body.unwrap_or(json!({})).to_string()),
        };
        let resp = req.send().await.map_err(|e| e.to_string())?;
        let status = resp.status();
        let v: Value = serde_json::from_slice(&resp.bytes().await.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        if !status.is_success() {
            return Err(format!("{} {}: {}", v["value"]["error"], status, v["value"]["message"]));
        }
        Ok(v["value"].clone())
    }

    async fn session_call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, String> {
        self.call(method, &format!("/session/{}{path}", self.session), body).await
    }

    pub async fn goto(&self, url: &str) {
        self.session_call("POST", "/url", Some(json!({ "url": url }))).await.unwrap();
    }

    /// The element with id `id`, if the page has one now.
    async fn element(&self, id: &str) -> Option<String> {
        let found = self.session_call("POST", "/element", Some(json!({ "using": "css selector", "value": format!("#{id}") }))).await;
        found.ok().and_then(|v| v[ELEMENT].as_str().map(str::to_string))
    }

    /// The rendered text of element `id`; `None` while there is no such element. (The page redraws every second,
    /// so an element found can be replaced before it is read: that is `None` too.)
    pub async fn text(&self, id: &str) -> Option<String> {
        let e = self.element(id).await?;
        self.session_call("GET", &format!("/element/{e}/text"), None).await.ok()?.as_str().map(str::to_string)
    }

    /// Attribute `name` of element `id`.
    pub async fn attribute(&self, id: &str, name: &str) -> Option<String> {
        let e = self.element(id).await?;
        self.session_call("GET", &format!("/element/{e}/attribute/{name}"), None).await.ok()?.as_str().map(str::to_string)
    }

    /// Clicks element `id`; whether it was there to click.
    pub async fn click(&self, id: &str) -> bool {
        match self.element(id).await {
            Some(e) => self.session_call("POST", &format!("/element/{e}/click"), Some(json!({}))).await.is_ok(),
            None => false,
        }
    }

    /// Runs `script` (a function body) in the page; what it returns.
    pub async fn execute(&self, script: &str) -> Value {
        self.session_call("POST", "/execute/sync", Some(json!({ "script": script, "args": [] }))).await.unwrap()
    }

    /// Polls `what` until it gives `Some`, at most `within`; the value, or a panic naming `describe`.
    pub async fn wait_for<T, F, Fut>(&self, describe: &str, within: Duration, mut what: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + within;
        loop {
            if let Some(v) = what().await {
                return v;
            }
            assert!(Instant::now() < deadline, "the page never showed {describe}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The console entries since the last call (chromedriver's log endpoint; each is returned once).
    pub async fn console(&self) -> Vec<LogEntry> {
        let v = self.session_call("POST", "/se/log", Some(json!({ "type": "browser" }))).await.unwrap();
        v.as_array()
            .into_iter()
            .flatten()
            .map(|e| LogEntry { level: e["level"].as_str().unwrap_or("").to_string(), message: e["message"].as_str().unwrap_or("").to_string() })
            .collect()
    }

    /// A PNG of the window.
    pub async fn screenshot(&self) -> Vec<u8> {
        use base64::Engine;
        let v = self.session_call("GET", "/screenshot", None).await.unwrap();
        base64::engine::general_purpose::STANDARD.decode(v.as_str().unwrap()).unwrap()
    }

    /// Sets the window's size (for a screenshot of the whole page).
    pub async fn resize(&self, width: u32, height: u32) {
        self.session_call("POST", "/window/rect", Some(json!({ "width": width, "height": height }))).await.unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ends the session (chromium quits) from a thread of its own: drop may run inside the test's runtime,
        // which cannot be blocked on. Then the whole group goes, whatever was left.
        let url = format!("{}/session/{}", self.base, self.session);
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().ok()?;
            rt.block_on(async { reqwest::Client::new().delete(&url).timeout(Duration::from_secs(10)).send().await.ok() })
        })
        .join();
        unsafe {
            libc::kill(-(self.driver.id() as i32), libc::SIGKILL);
        }
        let _ = self.driver.wait();
    }
}
