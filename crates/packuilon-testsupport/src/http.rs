//! A real HTTP/1.1 server (127.0.0.1, a free port) serving a directory the
//! test writes, as the Aquilon broker's web server serves
//! `profiles-info.xml` and the profiles. Faults can be set per path: an HTTP
//! status, a delay (for timeouts), a body cut short, or gzip on the wire.
//! The whole server can be made slow (a latency on every answer) and of
//! limited capacity (requests beyond N at once refused with a 503 or a
//! closed connection), as a real web server under load; it counts the most
//! requests it had under way at once.
//!
//! One thread per connection, serving that connection's requests in order
//! with keep-alive. With tiny_http (used before: its own connection threads
//! feeding a queue that 16 workers drained) 16 concurrent keep-alive
//! clients saw some requests never answered until their timeout
//! (tests/http_server.rs reproduced it in about half the runs; where in
//! tiny_http it stalls was not pinned down). Here no connection waits for
//! another: nothing is shared but the fault table and the request log.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
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
    /// Promise the whole file (Content-Length), send only its first N bytes,
    /// then close the connection: a transfer cut off mid-body.
    Truncate(usize),
    /// Answer `301 Moved Permanently` with this `Location`.
    Redirect(String),
    /// Send the head and half the body at once, the rest after this long:
    /// a large profile on a slow link.
    SlowBody(Duration),
}

/// How a server at capacity refuses a request (see [`ProfileServer::set_capacity`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `503 Service Unavailable`.
    Unavailable,
    /// The connection is closed without an answer.
    Close,
}

/// The server's load: requests under way, the most at once, refusals.
#[derive(Default)]
struct Load {
    latency: Mutex<Duration>,
    capacity: Mutex<Option<(usize, Refusal)>>,
    active: AtomicUsize,
    peak: AtomicUsize,
    refused: AtomicUsize,
}

struct Shared {
    root: PathBuf,
    load: Load,
    faults: Mutex<HashMap<String, Fault>>,
    log: Mutex<Vec<String>>,
    stop: AtomicBool,
    /// Open connections, shut down when the server is dropped.
    conns: Mutex<HashMap<u64, TcpStream>>,
}

pub struct ProfileServer {
    /// `http://127.0.0.1:PORT/`
    pub base: String,
    port: u16,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl ProfileServer {
    /// Serves `root`.
    pub fn serve(root: &Path) -> ProfileServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind test HTTP server");
        let port = listener.local_addr().expect("local address").port();
        let shared = Arc::new(Shared {
            root: root.to_path_buf(),
            load: Load::default(),
            faults: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            conns: Mutex::new(HashMap::new()),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                let mut next_id = 0u64;
                for stream in listener.incoming() {
                    if shared.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    let id = next_id;
                    next_id += 1;
                    if let Ok(clone) = stream.try_clone() {
                        shared.conns.lock().unwrap().insert(id, clone);
                    }
                    let shared = shared.clone();
                    std::thread::spawn(move || {
                        serve_connection(&shared, stream);
                        shared.conns.lock().unwrap().remove(&id);
                    });
                }
            })
        };
        ProfileServer {
            base: format!("http://127.0.0.1:{port}/"),
            port,
            shared,
            acceptor: Some(acceptor),
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

    /// Every answer waits this long first (a server doing real work).
    pub fn set_latency(&self, latency: Duration) {
        *self.shared.load.latency.lock().unwrap() = latency;
    }

    /// At most `max` requests served at once; one more is refused as `how`.
    pub fn set_capacity(&self, max: usize, how: Refusal) {
        *self.shared.load.capacity.lock().unwrap() = Some((max, how));
    }

    /// The most requests under way at once so far (refused ones included).
    pub fn peak_concurrency(&self) -> usize {
        self.shared.load.peak.load(Ordering::SeqCst)
    }

    /// Requests refused for want of capacity so far.
    pub fn refused(&self) -> usize {
        self.shared.load.refused.load(Ordering::SeqCst)
    }
}

impl Drop for ProfileServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the acceptor so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(a) = self.acceptor.take() {
            let _ = a.join();
        }
        // Connection threads end when their socket is shut down.
        for (_, conn) in self.shared.conns.lock().unwrap().drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
    }
}

struct Request {
    path: String,
    head: bool,
    keep_alive: bool,
}

/// Serves one connection's requests until the client closes it, asks to
/// close it, or a fault cuts it off.
fn serve_connection(shared: &Shared, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Ok(write_half) = stream.try_clone() else { return };
    let mut reader = BufReader::new(stream);
    let mut writer = std::io::BufWriter::new(write_half);
    loop {
        let req = match read_request(&mut reader) {
            Ok(Some(r)) => r,
            Ok(None) | Err(_) => return,
        };
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let load = &shared.load;
        let active = load.active.fetch_add(1, Ordering::SeqCst) + 1;
        load.peak.fetch_max(active, Ordering::SeqCst);
        let latency = *load.latency.lock().unwrap();
        std::thread::sleep(latency);
        let capacity = *load.capacity.lock().unwrap();
        let answered = match capacity {
            Some((max, how)) if active > max => {
                load.refused.fetch_add(1, Ordering::SeqCst);
                shared.log.lock().unwrap().push(format!("refused {}", req.path));
                match how {
                    Refusal::Unavailable => send(&mut writer, &req, 503, &[], &[]),
                    Refusal::Close => Ok(false),
                }
            }
            _ => respond(shared, &req, &mut writer),
        };
        load.active.fetch_sub(1, Ordering::SeqCst);
        match answered {
            Ok(true) if req.keep_alive => {}
            _ => {
                let _ = writer.flush();
                let _ = writer.get_ref().shutdown(Shutdown::Both);
                return;
            }
        }
    }
}

/// `Ok(None)`: the client closed the connection between requests.
fn read_request(reader: &mut BufReader<TcpStream>) -> std::io::Result<Option<Request>> {
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Ok(None);
    }
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_string();
    let target = parts.next().unwrap_or("").to_string();
    let version = parts.next().unwrap_or("HTTP/1.0").to_string();
    let mut keep_alive = version == "HTTP/1.1";
    let mut body_len = 0usize;
    loop {
        let mut header = String::new();
        if reader.read_line(&mut header)? == 0 {
            return Ok(None);
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("connection") {
            if value.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if value.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        } else if name.eq_ignore_ascii_case("content-length") {
            body_len = value.parse().unwrap_or(0);
        }
    }
    // GETs have no body, but a request that sends one must not desynchronise the connection.
    std::io::copy(&mut reader.by_ref().take(body_len as u64), &mut std::io::sink())?;
    let raw = target.split('?').next().unwrap_or("").trim_start_matches('/');
    Ok(Some(Request {
        path: percent_decode(raw),
        head: method.eq_ignore_ascii_case("HEAD"),
        keep_alive,
    }))
}

/// Writes the response; `Ok(false)` when the connection must be closed.
fn respond(shared: &Shared, req: &Request, w: &mut impl Write) -> std::io::Result<bool> {
    let path = &req.path;
    shared.log.lock().unwrap().push(path.clone());
    let fault = shared.faults.lock().unwrap().get(path).cloned();
    if let Some(Fault::Delay(d)) = &fault {
        std::thread::sleep(*d);
    }
    if let Some(Fault::Status(code)) = fault {
        return send(w, req, code, &[], &[]);
    }
    if let Some(Fault::Redirect(location)) = &fault {
        return send(w, req, 301, &[("Location", location)], &[]);
    }
    if path.split('/').any(|seg| seg == "..") {
        return send(w, req, 400, &[], &[]);
    }
    let mut body = Vec::new();
    if std::fs::File::open(shared.root.join(path))
        .and_then(|mut f| f.read_to_end(&mut body))
        .is_err()
    {
        return send(w, req, 404, &[], &[]);
    }
    match fault {
        Some(Fault::GzipEncoding) => {
            let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            enc.write_all(&body)?;
            let gz = enc.finish()?;
            send(w, req, 200, &[("Content-Encoding", "gzip")], &gz)
        }
        Some(Fault::SlowBody(pause)) => {
            write_head(w, 200, &[], body.len(), req.keep_alive)?;
            if !req.head {
                let half = body.len() / 2;
                w.write_all(&body[..half])?;
                w.flush()?;
                std::thread::sleep(pause);
                w.write_all(&body[half..])?;
            }
            w.flush()?;
            Ok(true)
        }
        Some(Fault::Truncate(n)) => {
            write_head(w, 200, &[], body.len(), false)?;
            if !req.head {
                w.write_all(&body[..n.min(body.len())])?;
            }
            w.flush()?;
            Ok(false)
        }
        _ => send(w, req, 200, &[], &body),
    }
}

fn send(
    w: &mut impl Write,
    req: &Request,
    status: u16,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<bool> {
    write_head(w, status, headers, body.len(), req.keep_alive)?;
    if !req.head {
        w.write_all(body)?;
    }
    w.flush()?;
    Ok(true)
}

fn write_head(
    w: &mut impl Write,
    status: u16,
    headers: &[(&str, &str)],
    len: usize,
    keep_alive: bool,
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Status",
    };
    write!(w, "HTTP/1.1 {status} {reason}\r\nContent-Length: {len}\r\n")?;
    for (k, v) in headers {
        write!(w, "{k}: {v}\r\n")?;
    }
    let connection = if keep_alive { "keep-alive" } else { "close" };
    write!(w, "Connection: {connection}\r\n\r\n")
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 3 <= bytes.len() {
            let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
            if let Some(b) = hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
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
