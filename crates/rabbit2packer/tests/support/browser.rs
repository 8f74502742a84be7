//! Test helpers for the status server: blocking HTTP, and a real headless
//! Chromium driven over WebDriver by Debian's `chromedriver` (a few calls of
//! the W3C protocol: a session, navigate, run a script, a screenshot).

use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::T;

pub const CHROMIUM: &str = "/usr/bin/chromium";
pub const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Blocking HTTP for the tests (a runtime of its own: the support module's
/// helpers start theirs).
pub struct Http {
    pub rt: tokio::runtime::Runtime,
    pub client: reqwest::Client,
    pub base: String,
}

impl Http {
    pub fn new(addr: SocketAddr) -> Http {
        Http {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            client: reqwest::Client::new(),
            base: format!("http://{addr}"),
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.rt.block_on(async {
            let r = self.client.get(format!("{}{path}", self.base)).send().await.unwrap();
            (r.status().as_u16(), r.text().await.unwrap())
        })
    }

    pub fn json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        serde_json::from_str(&body).unwrap()
    }
}

/// chromedriver on a port of its own, and one headless Chromium session.
pub struct Browser {
    driver: Child,
    http: Http,
    session: String,
    _profile: tempfile::TempDir,
}

impl Browser {
    pub fn start() -> Browser {
        for (path, package) in [(CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")] {
            assert!(
                Path::new(path).exists(),
                "{path} is missing: install Debian's {package} package (scripts/install-packages.sh {package})"
            );
        }
        let port = packuilon_testsupport::free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let http = Http::new(format!("127.0.0.1:{port}").parse().unwrap());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ready = http.rt.block_on(async {
                let r = http.client.get(format!("{}/status", http.base)).send().await.ok()?;
                r.json::<Value>().await.ok()
            });
            if ready.is_some_and(|v| v["value"]["ready"] == true) {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": [
                    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    "--disable-dev-shm-usage", "--window-size=1280,900",
                    format!("--user-data-dir={}", profile.path().display())
                ]
            }
        }}});
        let mut b = Browser {
            driver,
            http,
            session: String::new(),
            _profile: profile,
        };
        let v = b.call("POST", "/session", Some(caps));
        b.session = v["sessionId"].as_str().expect("a WebDriver session").to_string();
        b
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}{path}", self.http.base);
        self.http.rt.block_on(async {
            let req = match method {
                "POST" => self.http.client.post(url).json(&body.unwrap_or(json!({}))),
                "DELETE" => self.http.client.delete(url),
                _ => self.http.client.get(url),
            };
            let r = req.send().await.unwrap();
            let v: Value = r.json().await.unwrap();
            assert!(v["value"].get("error").is_none(), "WebDriver {path}: {v:#}");
            v["value"].clone()
        })
    }

    pub fn goto(&self, url: &str) {
        self.call(
            "POST",
            &format!("/session/{}/url", self.session),
            Some(json!({ "url": url })),
        );
    }

    pub fn eval(&self, script: &str) -> Value {
        self.call(
            "POST",
            &format!("/session/{}/execute/sync", self.session),
            Some(json!({"script": script, "args": []})),
        )
    }

    /// Polls `script` in the loaded page until `ok` holds for its value.
    pub fn wait(&self, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + T;
        loop {
            let v = self.eval(script);
            if ok(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}; last: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn screenshot(&self, to: &Path) {
        let v = self.call("GET", &format!("/session/{}/screenshot", self.session), None);
        std::fs::write(to, base64_decode(v.as_str().unwrap())).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if !self.session.is_empty() {
            let url = format!("{}/session/{}", self.http.base, self.session);
            let _ = self.http.rt.block_on(self.http.client.delete(url).send());
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

pub fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace() && *c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let v: Vec<u32> = chunk.iter().map(|c| val(*c) as u32).collect();
        let n = v.iter().enumerate().fold(0u32, |acc, (i, x)| acc | (x << (18 - 6 * i)));
        out.extend_from_slice(&n.to_be_bytes()[1..chunk.len()]);
    }
    out
}
