//! TLS for tests: a throw-away CA and a certificate for 127.0.0.1 made by
//! openssl, and socat terminating TLS in front of a plain service (HTTP,
//! AMQP, Keystone), so that clients are tested against real TLS servers.
//! Needs the Debian packages `openssl` and `socat` (make test installs them).

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The files of a throw-away CA and a server certificate for 127.0.0.1.
pub struct Certs {
    /// The CA certificate (PEM): what a client must trust.
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

/// Makes a CA and a certificate for 127.0.0.1 signed by it, in `dir`.
pub fn make_certs(dir: &Path) -> Certs {
    let script = "ec='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'
         openssl req -x509 $ec -keyout ca.key -out ca.pem -days 1 -subj /CN=packuilon-test-ca \
           -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
         openssl req $ec -keyout srv.key -out srv.csr -subj /CN=127.0.0.1 2>/dev/null
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' >ext
         openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 1 -extfile ext 2>/dev/null";
    let out = Command::new("bash")
        .args(["-euc", script])
        .current_dir(dir)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "making test certificates with openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Certs {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("srv.pem"),
        server_key: dir.join("srv.key"),
    }
}

/// socat terminating TLS on 127.0.0.1:`port` in front of `target`
/// (`host:port`); it and its forked connection handlers are killed on drop.
pub struct TlsProxy(Child);

impl TlsProxy {
    pub fn start(certs: &Certs, port: u16, target: &str) -> TlsProxy {
        let child = Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                certs.server_cert.display(),
                certs.server_key.display()
            ))
            .arg(format!("TCP:{target}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("socat (Debian package socat) must be installed for this test");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "socat did not listen on {port}");
            std::thread::sleep(Duration::from_millis(20));
        }
        TlsProxy(child)
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        // The group: socat's forked connection handlers too.
        unsafe { libc::kill(-(self.0.id() as i32), libc::SIGTERM) };
        let _ = self.0.wait();
    }
}
