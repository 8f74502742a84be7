//! TLS on both of cdb2rabbit's connections, against real TLS servers (socat
//! terminating TLS with a throw-away CA's certificate in front of the test's
//! HTTP server and of the shared RabbitMQ): the broker's web server trusted
//! through CA_BUNDLE, RabbitMQ through RABBIT_CA_FILE (amqps).

#[allow(dead_code)] // support serves the other test files too
mod support;

use packuilon_testsupport::free_port;
use packuilon_testsupport::tls::{make_certs, TlsProxy};
use support::{profile, Site};

#[test]
fn profiles_come_over_https_trusting_ca_bundle_and_go_to_rabbitmq_over_amqps() {
    let site = Site::new("ci-");
    site.put("ci-a.example.org.json", &profile("a", 1), 100);
    let certs = make_certs(site.dir.path());
    let http_port = free_port();
    let amqp_port = free_port();
    let plain_http = site
        .server
        .base
        .trim_end_matches('/')
        .trim_start_matches("http://")
        .to_string();
    let _https = TlsProxy::start(&certs, http_port, &plain_http);
    let _amqps = TlsProxy::start(&certs, amqp_port, &format!("127.0.0.1:{}", site.queue.broker.port));

    let tls_config = |ca_bundle: bool| {
        let mut text = site
            .config_text()
            .replace(&site.server.base, &format!("https://127.0.0.1:{http_port}/"))
            .replace(
                &format!("RABBIT_PORT = {}", site.queue.broker.port),
                &format!("RABBIT_PORT = {amqp_port}\nRABBIT_CA_FILE = {}", certs.ca.display()),
            );
        if ca_bundle {
            text = with_ca_bundle(&text, &certs.ca);
        }
        let path = site.dir.path().join(format!("tls-{ca_bundle}.ini"));
        std::fs::write(&path, text).unwrap();
        path
    };
    let with_ca = tls_config(true);
    let without_ca = tls_config(false);

    site.run_with_config(&with_ca, &[]).assert_status(0);
    site.put("ci-a.example.org.json", &profile("a", 2), 200);

    // The system roots do not know this CA: the index cannot be fetched,
    // the run fails naming the certificate problem and changes nothing.
    let out = site.run_with_config(&without_ca, &[]);
    out.assert_status(1);
    assert!(out.stderr.to_lowercase().contains("certificate"), "{}", out.stderr);
    assert!(site.published().is_empty());
    assert_eq!(site.cached_mtime("ci-a.example.org.json"), Some(100));

    // With CA_BUNDLE: fetched over HTTPS, published over amqps, confirmed.
    let out = site.run_with_config(&with_ca, &[]);
    out.assert_status(0);
    out.assert_logs_in_order(&[
        "Profile has updated: ci-a.example.org.json",
        "Pushing message to queue for build",
    ]);
    assert_eq!(site.published_names(), vec!["ci-a.example.org.json".to_string()]);
    assert_eq!(site.cached_mtime("ci-a.example.org.json"), Some(200));
}

#[test]
fn plain_http_urls_that_redirect_to_https_are_followed_with_ca_bundle_trusted() {
    use packuilon_testsupport::http::Fault;
    let site = Site::new("ci-");
    site.put("ci-a.example.org.json", &profile("a", 1), 100);
    let certs = make_certs(site.dir.path());
    let https_port = free_port();
    let plain = site.server.base.trim_end_matches('/').to_string();
    let _https = TlsProxy::start(&certs, https_port, plain.trim_start_matches("http://"));
    // The configured URLs are plain http, under /old/; the server sends
    // every one of them to the same file over https (index and profile), or
    // over plain http (/moved/).
    let https = format!("https://127.0.0.1:{https_port}");
    site.server.set_fault(
        "old/profiles-info.xml",
        Fault::Redirect(format!("{https}/profiles-info.xml")),
    );
    site.server.set_fault(
        "old/profiles/ci-a.example.org.json",
        Fault::Redirect(format!("{https}/profiles/ci-a.example.org.json")),
    );
    site.server.set_fault(
        "moved/profiles-info.xml",
        Fault::Redirect(format!("{plain}/profiles-info.xml")),
    );
    let config = |info: &str, ca_bundle: bool| {
        let mut text = site
            .config_text()
            .replace(&format!("{plain}/profiles-info.xml"), &format!("{plain}/{info}"))
            .replace(&format!("{plain}/profiles/"), &format!("{plain}/old/profiles/"));
        if ca_bundle {
            text = with_ca_bundle(&text, &certs.ca);
        }
        assert!(text.contains(&format!("{plain}/{info}")), "{text}");
        let path = site
            .dir
            .path()
            .join(format!("redirect-{}-{ca_bundle}.ini", info.replace('/', "-")));
        std::fs::write(&path, text).unwrap();
        path
    };

    // A plain redirect to plain http: followed as before.
    site.run_with_config(&config("moved/profiles-info.xml", true), &[])
        .assert_status(0);
    site.put("ci-a.example.org.json", &profile("a", 2), 200);

    // To https, without CA_BUNDLE: the system roots do not know this CA.
    let out = site.run_with_config(&config("old/profiles-info.xml", false), &[]);
    out.assert_status(1);
    assert!(out.stderr.to_lowercase().contains("certificate"), "{}", out.stderr);
    assert_eq!(site.cached_mtime("ci-a.example.org.json"), Some(100));

    // With CA_BUNDLE: index and profile both fetched over https after the redirect.
    let out = site.run_with_config(&config("old/profiles-info.xml", true), &[]);
    out.assert_status(0);
    out.assert_logs_in_order(&["Profile has updated: ci-a.example.org.json"]);
    assert_eq!(site.published_names(), vec!["ci-a.example.org.json".to_string()]);
    assert_eq!(site.cached_mtime("ci-a.example.org.json"), Some(200));
}

/// `config` with CA_BUNDLE = `ca` in its [cdb2rabbit] section.
fn with_ca_bundle(config: &str, ca: &std::path::Path) -> String {
    config.replace(
        "[cdb2rabbit]\n",
        &format!("[cdb2rabbit]\nCA_BUNDLE = {}\n", ca.display()),
    )
}
