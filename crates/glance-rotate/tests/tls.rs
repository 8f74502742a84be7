//! TLS: Keystone behind a real TLS terminator (socat with a certificate of a
//! throw-away CA made by openssl). With OS_CACERT naming that CA the token is
//! issued; without it the certificate is refused and the error says so.

use glance_rotate::{Credentials, Session};
use packuilon_testsupport::cloud::Cloud;
use packuilon_testsupport::free_port;
use packuilon_testsupport::tls::{make_certs, TlsProxy};

#[tokio::test]
async fn keystone_over_tls_is_trusted_through_os_cacert_only() {
    let cloud = Cloud::new().await;
    let dir = tempfile::tempdir().unwrap();
    let certs = make_certs(dir.path());
    let keystone = url::Url::parse(&cloud.env["OS_AUTH_URL"]).unwrap();
    let target = format!("127.0.0.1:{}", keystone.port().unwrap());
    let port = free_port();
    let _proxy = TlsProxy::start(&certs, port, &target);

    let mut env = cloud.env.clone();
    env.insert("OS_AUTH_URL".into(), format!("https://127.0.0.1:{port}/v3"));
    env.insert("OS_CACERT".into(), certs.ca.display().to_string());
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
