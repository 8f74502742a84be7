//! Keystone v3: issues a token for the credentials, finds the image endpoint
//! in the token's catalog, and hands the token out again until shortly before
//! it expires (or until Glance rejects it with 401, then a new one is issued).
//! Every HTTP request made through the [`Session`] is counted, so a rotation
//! can report how many it needed.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{json, Value};

use crate::credentials::{AppCredentialRef, AuthMethod, Credentials, Domain, Named, Secret};
use crate::RotateError;

/// A token and what came with it.
#[derive(Debug, Clone)]
pub struct Token {
    value: Secret,
    pub(crate) expires_at: DateTime<Utc>,
    pub(crate) issued_at: DateTime<Utc>,
    /// Glance's base URL (without `/v2`).
    pub image_url: String,
    pub project_id: Option<String>,
    pub user_id: Option<String>,
}

impl Token {
    /// The token itself (`X-Auth-Token`).
    pub fn value(&self) -> &str {
        self.value.expose()
    }

    /// Still good for a while: a token is renewed 5 minutes before it expires
    /// (or after 4/5 of its life when it lives less than 25 minutes), so a
    /// request never starts with a token about to expire.
    fn fresh(&self, now: DateTime<Utc>) -> bool {
        let life = self.expires_at - self.issued_at;
        let margin = std::cmp::min(chrono::Duration::minutes(5), life / 5);
        now + margin < self.expires_at
    }
}

/// An authenticated session: one HTTP client, the cached token, the request counter.
#[derive(Debug)]
pub struct Session {
    http: reqwest::Client,
    creds: Credentials,
    requests: Arc<AtomicU64>,
    token: tokio::sync::Mutex<Option<Token>>,
}

impl Session {
    /// Builds the HTTP client (trusting OS_CACERT when set). Makes no request.
    pub fn new(creds: Credentials) -> Result<Session, RotateError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(120))
            .user_agent(concat!("packuilon-rename-old-images/", env!("CARGO_PKG_VERSION")));
        if let Some(path) = &creds.cacert {
            let pem = std::fs::read(path)
                .map_err(|e| RotateError::Credentials(format!("OS_CACERT {}: cannot read: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                RotateError::Credentials(format!("OS_CACERT {}: not PEM certificates: {e}", path.display()))
            })?;
            if certs.is_empty() {
                return Err(RotateError::Credentials(format!(
                    "OS_CACERT {}: no certificate in it",
                    path.display()
                )));
            }
            // Only the configured CAs: that is what OS_CACERT means to the OpenStack clients.
            builder = builder.tls_built_in_root_certs(false);
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder
            .build()
            .map_err(|e| RotateError::Credentials(format!("cannot set up HTTPS: {e}")))?;
        Ok(Session {
            http,
            creds,
            requests: Arc::new(AtomicU64::new(0)),
            token: tokio::sync::Mutex::new(None),
        })
    }

    pub(crate) fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// HTTP requests made so far (Keystone and Glance).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub(crate) fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// The cached token if still fresh, else a new one.
    pub async fn token(&self) -> Result<Token, RotateError> {
        let mut guard = self.token.lock().await;
        if let Some(t) = guard.as_ref() {
            if t.fresh(Utc::now()) {
                return Ok(t.clone());
            }
        }
        let t = self.issue().await?;
        *guard = Some(t.clone());
        Ok(t)
    }

    /// Forgets `rejected` (Glance said 401) unless another task already replaced it.
    pub(crate) async fn invalidate(&self, rejected: &Token) {
        let mut guard = self.token.lock().await;
        if guard.as_ref().map(|t| t.value()) == Some(rejected.value()) {
            *guard = None;
        }
    }

    /// POST /v3/auth/tokens.
    async fn issue(&self) -> Result<Token, RotateError> {
        let url = format!("{}/auth/tokens", self.creds.auth_url);
        let body = auth_body(&self.creds.method);
        // A connection the server (or a proxy in front of it) closes before
        // answering is tried again, twice: issuing a token changes nothing
        // else, and a Keystone under load or restarting (uwsgi, Apache,
        // HAProxy) does that. A timeout or an answer is never repeated.
        let mut pauses = [Duration::from_millis(500), Duration::from_secs(2)].into_iter();
        let resp = loop {
            self.count_request();
            match self.http.post(&url).json(&body).send().await {
                Ok(resp) => break resp,
                Err(e) if !e.is_timeout() && (e.is_request() || e.is_connect()) => {
                    let message = transport_message(&e);
                    let Some(pause) = pauses.next() else {
                        return Err(RotateError::http("Keystone", "POST", &url, None, message));
                    };
                    tracing::warn!("Keystone POST {url}: {message}; trying again in {pause:?}");
                    tokio::time::sleep(pause).await;
                }
                Err(e) => return Err(RotateError::http("Keystone", "POST", &url, None, transport_message(&e))),
            }
        };
        let status = resp.status();
        let header = resp
            .headers()
            .get("x-subject-token")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let text = resp.text().await.unwrap_or_default();
        if !status.is_success() {
            let mut message = error_message(&text);
            if status.as_u16() == 401 {
                message = format!("{message} (check the user, project and password or application credential)");
            }
            return Err(RotateError::http(
                "Keystone",
                "POST",
                &url,
                Some(status.as_u16()),
                message,
            ));
        }
        let bad = |what: &str| RotateError::http("Keystone", "POST", &url, Some(status.as_u16()), what.to_string());
        let value = header.ok_or_else(|| bad("no X-Subject-Token header in the answer"))?;
        let body: Value = serde_json::from_str(&text).map_err(|_| bad("the token answer is not JSON"))?;
        let token = &body["token"];
        let time = |key: &str| {
            token[key]
                .as_str()
                .and_then(|s| DateTime::parse_from_rfc3339(s).ok())
                .map(|t| t.with_timezone(&Utc))
        };
        let expires_at = time("expires_at").ok_or_else(|| bad("the token has no expires_at"))?;
        let issued_at = time("issued_at").unwrap_or_else(Utc::now);
        let image_url = match &self.creds.image_url {
            Some(u) => u.clone(),
            // The token was issued (HTTP 201): naming that status next to a
            // catalog problem reads like a failed login.
            None => image_endpoint(&token["catalog"], &self.creds.interface, self.creds.region.as_deref())
                .map_err(|m| RotateError::Other(format!("Keystone token from {url}: {m}")))?,
        };
        Ok(Token {
            value: Secret::new(value),
            expires_at,
            issued_at,
            image_url: glance_base(&image_url),
            project_id: token["project"]["id"].as_str().map(str::to_string),
            user_id: token["user"]["id"].as_str().map(str::to_string),
        })
    }
}

fn named_json(n: &Named) -> Value {
    match n {
        Named::Id(id) => json!({ "id": id }),
        Named::Name { name, domain } => json!({ "name": name, "domain": domain_json(domain) }),
    }
}

fn domain_json(d: &Domain) -> Value {
    match d {
        Domain::Id(id) => json!({ "id": id }),
        Domain::Name(name) => json!({ "name": name }),
    }
}

fn auth_body(method: &AuthMethod) -> Value {
    match method {
        AuthMethod::Password {
            user,
            password,
            project,
        } => {
            let mut u = named_json(user);
            u["password"] = json!(password.expose());
            let mut auth = json!({ "identity": { "methods": ["password"], "password": { "user": u } } });
            if let Some(p) = project {
                auth["scope"] = json!({ "project": named_json(p) });
            }
            json!({ "auth": auth })
        }
        AuthMethod::ApplicationCredential { credential, secret } => {
            let mut c = match credential {
                AppCredentialRef::Id(id) => json!({ "id": id }),
                AppCredentialRef::Name { name, user } => json!({ "name": name, "user": named_json(user) }),
            };
            c["secret"] = json!(secret.expose());
            json!({ "auth": { "identity": { "methods": ["application_credential"], "application_credential": c } } })
        }
    }
}

/// The image service's URL for `interface` (and `region` when given).
fn image_endpoint(catalog: &Value, interface: &str, region: Option<&str>) -> Result<String, String> {
    let services = catalog
        .as_array()
        .ok_or("the token has no catalog (is it project-scoped?)")?;
    for svc in services.iter().filter(|s| s["type"] == "image") {
        for ep in svc["endpoints"].as_array().into_iter().flatten() {
            let region_ok = match region {
                None => true,
                Some(r) => ep["region_id"] == r || ep["region"] == r,
            };
            if ep["interface"] == interface && region_ok {
                if let Some(url) = ep["url"].as_str() {
                    return Ok(url.to_string());
                }
            }
        }
    }
    Err(format!(
        "no image endpoint with interface {interface}{} in the token's catalog (set OS_IMAGE_URL to override)",
        region.map(|r| format!(" in region {r}")).unwrap_or_default()
    ))
}

/// Catalog URLs come with or without a version (`http://g:9292`, `.../v2`, `.../v2/`).
fn glance_base(url: &str) -> String {
    let t = url.trim_end_matches('/');
    match t.rsplit_once('/') {
        Some((head, last)) if last.starts_with("v2") => head.to_string(),
        _ => t.to_string(),
    }
}

/// What a service said in an error body: OpenStack's JSON shapes, else the text itself.
pub(crate) fn error_message(text: &str) -> String {
    if let Ok(v) = serde_json::from_str::<Value>(text) {
        for ptr in [
            "/error/message",
            "/message",
            "/badRequest/message",
            "/itemNotFound/message",
        ] {
            if let Some(m) = v.pointer(ptr).and_then(Value::as_str) {
                return plain_text(m);
            }
        }
    }
    plain_text(text)
}

/// Words of a message that may be HTML, at most 400 characters.
fn plain_text(text: &str) -> String {
    // Glance's errors are small HTML pages: keep their words, drop the tags.
    let mut plain = String::with_capacity(text.len());
    let mut in_tag = false;
    for c in text.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                plain.push(' ');
            }
            _ if !in_tag => plain.push(c),
            _ => {}
        }
    }
    let words: Vec<&str> = plain.split_whitespace().collect();
    // "<title>403 Forbidden</title> ... <h1>403 Forbidden</h1>": say the status once.
    let mut words = words.as_slice();
    if words.len() >= 4 && words[0..2] == words[2..4] {
        words = &words[2..];
    }
    let collapsed = words.join(" ");
    let mut s: String = collapsed.chars().take(400).collect();
    if s.is_empty() {
        s = "(empty answer)".to_string();
    }
    s
}

/// A transport error in words, without the request (the URL is named by the caller).
pub(crate) fn transport_message(e: &reqwest::Error) -> String {
    use std::error::Error as _;
    let mut msg = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "cannot connect".to_string()
    } else {
        "request failed".to_string()
    };
    let mut src = e.source();
    while let Some(s) = src {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        src = s.source();
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_endpoint_honours_interface_and_region() {
        let cat = json!([
            {"type": "identity", "endpoints": [{"interface": "public", "region_id": "R1", "url": "http://k"}]},
            {"type": "image", "endpoints": [
                {"interface": "internal", "region_id": "R1", "url": "http://g-int:9292"},
                {"interface": "public", "region_id": "R2", "url": "http://g-r2:9292/v2/"},
                {"interface": "public", "region_id": "R1", "url": "http://g-r1:9292"}
            ]}
        ]);
        assert_eq!(image_endpoint(&cat, "public", Some("R1")).unwrap(), "http://g-r1:9292");
        assert_eq!(image_endpoint(&cat, "internal", None).unwrap(), "http://g-int:9292");
        assert_eq!(
            glance_base(&image_endpoint(&cat, "public", Some("R2")).unwrap()),
            "http://g-r2:9292"
        );
        assert!(image_endpoint(&cat, "admin", None)
            .unwrap_err()
            .contains("interface admin"));
    }

    #[test]
    fn error_messages_from_openstack_bodies() {
        assert_eq!(
            error_message(
                r#"{"error": {"code": 401, "message": "The request you have made requires authentication.", "title": "Unauthorized"}}"#
            ),
            "The request you have made requires authentication."
        );
        assert_eq!(
            error_message(r#"{"message": "Attempted: 129, Maximum: 128:<br /><br />", "code": "413"}"#),
            "Attempted: 129, Maximum: 128:"
        );
        assert_eq!(
            error_message(
                "<html>\n <head>\n  <title>403 Forbidden</title>\n </head>\n <body>\n  <h1>403 Forbidden</h1>\n  \
                 Only shared images have members.<br /><br />\n\n\n\n </body>\n</html>"
            ),
            "403 Forbidden Only shared images have members."
        );
    }

    #[test]
    fn tokens_are_renewed_before_they_expire() {
        let t0 = Utc::now();
        let tok = |life_min: i64| Token {
            value: Secret::new("t"),
            issued_at: t0,
            expires_at: t0 + chrono::Duration::minutes(life_min),
            image_url: String::new(),
            project_id: None,
            user_id: None,
        };
        assert!(tok(60).fresh(t0 + chrono::Duration::minutes(54)));
        assert!(!tok(60).fresh(t0 + chrono::Duration::minutes(56)));
        assert!(tok(10).fresh(t0 + chrono::Duration::minutes(7)));
        assert!(!tok(10).fresh(t0 + chrono::Duration::minutes(9)));
    }
}
