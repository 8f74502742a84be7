//! A real HTTP server (tiny_http on 127.0.0.1, a free port) serving a
//! directory the test writes, as the Aquilon broker's web server serves
//! `profiles-info.xml` and the profiles. Faults can be set per path: an HTTP
//! status, a delay (for timeouts), a body cut short, or gzip on the wire.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// What to do instead of (or on top of) serving a file.
#[derive(Debug, Clone)]
pub enum Fault {
    /// Answer with this status and no body.
    Status(u16),
    /// Wait this long before answering (then serve normally).
    Delay(Duration),
    /// Serve the file gzip-compressed with `Content-Encoding: gzip`.
    GzipEncoding,
    /// Serve only the first N bytes of the file.
    Truncate(usize),
}

struct Shared {
    root: PathBuf,
    faults: Mutex<HashMap<String, Fault>>,
    log: Mutex<Vec<String>>,
    stop: AtomicBool,
}

pub struct ProfileServer {
    /// `http://127.0.0.1:PORT/`
    pub base: String,
    server: Arc<tiny_http::Server>,
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
}

impl ProfileServer {
    /// Serves `root` with 16 worker threads.
    pub fn serve(root: &Path) -> ProfileServer {
        let server = Arc::new(tiny_http::Server::http("127.0.0.1:0").expect("bind test HTTP server"));
        let port = server.server_addr().to_ip().expect("ip listener").port();
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            faults: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
        });
        let workers = (0..16)
            .map(|_| {
                let server = server.clone();
                let shared = shared.clone();
                std::thread::spawn(move || {
                    while let Ok(req) = server.recv() {
                        if shared.stop.load(Ordering::Relaxed) {
                            break;
                        }
                        handle(&shared, req);
                    }
                })
            })
            .collect();
        ProfileServer {
            base: format!("http://127.0.0.1:{port}/"),
            server,
            shared,
            workers,
        }
    }

    /// Absolute URL of `path` (relative to the served root).
    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path.trim_start_matches('/'))
    }

    /// Sets a fault for one path (relative, as in the URL, e.g. `profiles/a.json`).
    pub fn set_fault(&self, path: &str, fault: Fault) {
        self.shared
            .faults
            .lock()
            .unwrap()
            .insert(path.trim_start_matches('/').to_string(), fault);
    }

    pub fn clear_faults(&self) {
        self.shared.faults.lock().unwrap().clear();
    }

    /// Paths requested so far, in order.
    pub fn requests(&self) -> Vec<String> {
        self.shared.log.lock().unwrap().clone()
    }

    pub fn clear_requests(&self) {
        self.shared.log.lock().unwrap().clear();
    }
}

impl Drop for ProfileServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        for _ in &self.workers {
            self.server.unblock();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

fn handle(shared: &Shared, req: tiny_http::Request) {
    let raw = req
        .url()
        .split('?')
        .next()
        .unwrap_or("")
        .trim_start_matches('/')
        .to_string();
    let path = percent_decode(&raw);
    shared.log.lock().unwrap().push(path.clone());
    let fault = shared.faults.lock().unwrap().get(&path).cloned();
    if let Some(Fault::Delay(d)) = &fault {
        std::thread::sleep(*d);
    }
    if let Some(Fault::Status(code)) = fault {
        let _ = req.respond(tiny_http::Response::empty(code));
        return;
    }
    if path.split('/').any(|seg| seg == "..") {
        let _ = req.respond(tiny_http::Response::empty(400));
        return;
    }
    let mut body = Vec::new();
    match std::fs::File::open(shared.root.join(&path)).and_then(|mut f| f.read_to_end(&mut body)) {
        Ok(_) => {}
        Err(_) => {
            let _ = req.respond(tiny_http::Response::empty(404));
            return;
        }
    }
    let mut headers = Vec::new();
    match fault {
        Some(Fault::GzipEncoding) => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&body).unwrap();
            body = enc.finish().unwrap();
            headers.push(tiny_http::Header::from_bytes("Content-Encoding", "gzip").unwrap());
        }
        Some(Fault::Truncate(n)) => {
            // Promise the whole length, send less, close: a cut-off transfer.
            let full = body.len();
            body.truncate(n);
            let resp = tiny_http::Response::new(
                tiny_http::StatusCode(200),
                headers,
                std::io::Cursor::new(body),
                Some(full),
                None,
            );
            let _ = req.respond(resp);
            return;
        }
        _ => {}
    }
    let mut resp = tiny_http::Response::from_data(body);
    for h in headers {
        resp.add_header(h);
    }
    let _ = req.respond(resp);
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&s[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}
