//! TLS: Keystone behind a real TLS terminator (socat with a certificate of a
//! throw-away CA made by openssl). With OS_CACERT naming that CA the token is
//! issued; without it the certificate is refused and the error says so.

mod support;

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use glance_rotate::{Credentials, Session};
use packuilon_testsupport::free_port;
use support::Cloud;

fn sh(dir: &Path, script: &str) {
    let out = Command::new("bash")
        .args(["-euc", script])
        .current_dir(dir)
        .output()
        .expect("bash");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA and a certificate for 127.0.0.1 signed by it, in `dir`.
fn make_certs(dir: &Path) {
    sh(
        dir,
        "ec='-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes'
         openssl req -x509 $ec -keyout ca.key -out ca.pem -days 1 -subj /CN=packuilon-test-ca \
           -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign 2>/dev/null
         openssl req $ec -keyout srv.key -out srv.csr -subj /CN=127.0.0.1 2>/dev/null
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' >ext
         openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 1 -extfile ext 2>/dev/null",
    );
}

/// socat terminating TLS on `port` in front of `target` (host:port); killed on drop.
struct TlsProxy(Child);

impl TlsProxy {
    fn start(dir: &Path, port: u16, target: &str) -> TlsProxy {
        let child = Command::new("socat")
            .arg(format!(
                "OPENSSL-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,cert={},key={},verify=0",
                dir.join("srv.pem").display(),
                dir.join("srv.key").display()
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

#[tokio::test]
async fn keystone_over_tls_is_trusted_through_os_cacert_only() {
    let cloud = Cloud::new().await;
    let dir = tempfile::tempdir().unwrap();
    make_certs(dir.path());
    let keystone = url::Url::parse(&cloud.env["OS_AUTH_URL"]).unwrap();
    let target = format!("127.0.0.1:{}", keystone.port().unwrap());
    let port = free_port();
    let _proxy = TlsProxy::start(dir.path(), port, &target);

    let mut env = cloud.env.clone();
    env.insert("OS_AUTH_URL".into(), format!("https://127.0.0.1:{port}/v3"));
    env.insert("OS_CACERT".into(), dir.path().join("ca.pem").display().to_string());
    let token = Session::new(Credentials::from_env(&env).unwrap())
        .unwrap()
        .token()
        .await
        .expect("a token over TLS with OS_CACERT");
    assert_eq!(token.project_id.as_deref(), Some(cloud.admin_project.as_str()));

    // The system roots do not know this CA.
    env.remove("OS_CACERT");
    let err = Session::new(Credentials::from_env(&env).unwrap())
        .unwrap()
        .token()
        .await
        .unwrap_err();
    assert_eq!(err.status(), None, "{err}");
    assert!(err.to_string().to_lowercase().contains("certificate"), "{err}");

    // A CA file that is not PEM is a credentials (configuration) error naming it.
    let bogus = dir.path().join("bogus.pem");
    std::fs::write(&bogus, "not a certificate").unwrap();
    env.insert("OS_CACERT".into(), bogus.display().to_string());
    let err = Session::new(Credentials::from_env(&env).unwrap()).unwrap_err();
    assert!(err.is_config() && err.to_string().contains("bogus.pem"), "{err}");
}
