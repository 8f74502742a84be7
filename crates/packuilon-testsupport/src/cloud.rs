//! What the tests need from a real Keystone + Glance: the deployment
//! ([`crate::openstack`]), an admin session, and helpers that create
//! projects, application credentials, images with data (so they are
//! `active`) and members. Every image and project a [`Cloud`] creates is
//! deleted when it drops. Used by glance-rotate's tests and benchmark and
//! by the workspace's end-to-end tests (`tests/pipeline.rs`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::openstack::OpenStack;
use crate::unique_name;
use glance_rotate::glance::{Glance, Hidden, Image, Member};
use glance_rotate::{Credentials, Session};
use serde_json::{json, Value};

/// An admin's view of the test deployment; what it creates is deleted on drop.
pub struct Cloud {
    pub os: Arc<OpenStack>,
    pub env: BTreeMap<String, String>,
    pub glance: Glance,
    pub http: reqwest::Client,
    pub keystone: String,
    pub image_url: String,
    pub admin_project: String,
    pub admin_user: String,
    images: Mutex<Vec<String>>,
    projects: Mutex<Vec<String>>,
    app_creds: Mutex<Vec<String>>,
}

impl Cloud {
    /// On the shared deployment ([`OpenStack::shared`]).
    pub async fn new() -> Cloud {
        Cloud::on(OpenStack::shared().expect("Keystone + Glance for the tests")).await
    }

    /// On `os` (a private deployment a test may stop).
    pub async fn on(os: Arc<OpenStack>) -> Cloud {
        let env = os.env().expect("sourcing the admin RC file");
        let creds = Credentials::from_env(&env).expect("admin credentials");
        let session = Arc::new(Session::new(creds).unwrap());
        let token = session.token().await.expect("admin token");
        let keystone = env["OS_AUTH_URL"].trim_end_matches('/').to_string();
        let keystone = if keystone.ends_with("/v3") {
            keystone
        } else {
            format!("{keystone}/v3")
        };
        Cloud {
            os,
            glance: Glance::new(session),
            http: reqwest::Client::new(),
            keystone,
            image_url: token.image_url.clone(),
            admin_project: token.project_id.clone().unwrap(),
            admin_user: token.user_id.clone().unwrap(),
            env,
            images: Mutex::new(Vec::new()),
            projects: Mutex::new(Vec::new()),
            app_creds: Mutex::new(Vec::new()),
        }
    }

    /// The admin RC file.
    pub fn openrc(&self) -> PathBuf {
        self.os.openrc.clone()
    }

    async fn token(&self) -> String {
        self.glance.session().token().await.unwrap().value().to_string()
    }

    async fn req(&self, method: reqwest::Method, url: &str, body: Option<Value>) -> Value {
        let mut r = self
            .http
            .request(method.clone(), url)
            .header("X-Auth-Token", self.token().await);
        if let Some(b) = body {
            r = r.json(&b);
        }
        let resp = r.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.is_success(), "{method} {url}: {status}: {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    /// A new project (deleted on drop); returns its ID.
    pub async fn project(&self, prefix: &str) -> String {
        let v = self
            .req(
                reqwest::Method::POST,
                &format!("{}/projects", self.keystone),
                Some(json!({"project": {"name": unique_name(prefix), "domain_id": "default"}})),
            )
            .await;
        let id = v["project"]["id"].as_str().unwrap().to_string();
        self.projects.lock().unwrap().push(id.clone());
        id
    }

    /// An application credential of the admin user (for the admin project): (id, secret).
    pub async fn app_credential(&self) -> (String, String) {
        let v = self
            .req(
                reqwest::Method::POST,
                &format!("{}/users/{}/application_credentials", self.keystone, self.admin_user),
                Some(json!({"application_credential": {"name": unique_name("appcred")}})),
            )
            .await;
        let id = v["application_credential"]["id"].as_str().unwrap().to_string();
        let secret = v["application_credential"]["secret"].as_str().unwrap().to_string();
        self.app_creds.lock().unwrap().push(id.clone());
        (id, secret)
    }

    /// An active image (a few bytes uploaded) named `name`, owned by `owner`.
    pub async fn image(&self, name: &str, owner: &str, visibility: &str) -> Image {
        self.image_with(name, owner, visibility, json!({})).await
    }

    /// An image with no data yet (`queued`), like one still being uploaded.
    pub async fn queued_image(&self, name: &str, owner: &str) -> Image {
        let id = self.create(name, owner, "shared", json!({})).await;
        self.get(&id).await
    }

    /// Creates the image record (deleted on drop); returns its ID.
    async fn create(&self, name: &str, owner: &str, visibility: &str, extra: Value) -> String {
        let mut body = json!({"name": name, "owner": owner, "visibility": visibility,
                              "disk_format": "raw", "container_format": "bare"});
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let v = self
            .req(
                reqwest::Method::POST,
                &format!("{}/v2/images", self.image_url),
                Some(body),
            )
            .await;
        let id = v["id"].as_str().unwrap().to_string();
        self.images.lock().unwrap().push(id.clone());
        id
    }

    /// As [`image`](Self::image), with extra properties.
    pub async fn image_with(&self, name: &str, owner: &str, visibility: &str, extra: Value) -> Image {
        let id = self.create(name, owner, visibility, extra).await;
        let resp = self
            .http
            .put(format!("{}/v2/images/{id}/file", self.image_url))
            .header("X-Auth-Token", self.token().await)
            .header("Content-Type", "application/octet-stream")
            .body("not really a disk")
            .send()
            .await
            .unwrap();
        assert!(resp.status().is_success(), "upload: {}", resp.status());
        self.get(&id).await
    }

    /// The image as Glance shows it now.
    pub async fn get(&self, id: &str) -> Image {
        self.glance.image(id).await.unwrap()
    }

    /// Adds `member` to `image` with `status` (`pending` leaves it as Glance sets it).
    pub async fn share(&self, image: &str, member: &str, status: &str) {
        self.glance.add_member(image, member).await.unwrap();
        if status != "pending" {
            self.glance.set_member_status(image, member, status).await.unwrap();
        }
    }

    /// member id -> status.
    pub async fn members(&self, image: &str) -> BTreeMap<String, String> {
        let v: Vec<Member> = self.glance.members(image).await.unwrap();
        v.into_iter().map(|m| (m.member_id, m.status)).collect()
    }

    /// Every image (visible and hidden) owned by `owner`: id -> (name, hidden, members).
    pub async fn snapshot(&self, owner: &str) -> BTreeMap<String, (String, bool, BTreeMap<String, String>)> {
        let mut out = BTreeMap::new();
        for hidden in ["false", "true"] {
            for img in self
                .glance
                .list(&[("owner", owner), ("os_hidden", hidden)])
                .await
                .unwrap()
            {
                let members = if img.visibility == "shared" {
                    self.members(&img.id).await
                } else {
                    BTreeMap::new()
                };
                out.insert(img.id.clone(), (img.name().to_string(), img.os_hidden, members));
            }
        }
        out
    }

    /// Images of `owner` named exactly `name` (visible ones).
    pub async fn named(&self, name: &str, owner: &str) -> Vec<Image> {
        self.glance
            .list_named(name, Hidden::No, &[("owner", owner)])
            .await
            .unwrap()
    }

    /// Deletes what this Cloud created (also done on drop).
    pub async fn cleanup(&self) {
        let images: Vec<String> = std::mem::take(&mut *self.images.lock().unwrap());
        // Eight at a time.
        let limit = Arc::new(tokio::sync::Semaphore::new(8));
        let mut tasks = tokio::task::JoinSet::new();
        for id in images {
            let (glance, limit) = (self.glance.clone(), limit.clone());
            tasks.spawn(async move {
                let _permit = limit.acquire_owned().await;
                let _ = glance.delete_image(&id).await;
            });
        }
        while tasks.join_next().await.is_some() {}
        let token = self.token().await;
        let projects: Vec<String> = std::mem::take(&mut *self.projects.lock().unwrap());
        for id in projects {
            let _ = self
                .http
                .delete(format!("{}/projects/{id}", self.keystone))
                .header("X-Auth-Token", &token)
                .send()
                .await;
        }
        let creds: Vec<String> = std::mem::take(&mut *self.app_creds.lock().unwrap());
        for id in creds {
            let _ = self
                .http
                .delete(format!(
                    "{}/users/{}/application_credentials/{id}",
                    self.keystone, self.admin_user
                ))
                .header("X-Auth-Token", &token)
                .send()
                .await;
        }
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        let left = !self.images.lock().unwrap().is_empty()
            || !self.projects.lock().unwrap().is_empty()
            || !self.app_creds.lock().unwrap().is_empty();
        if !left {
            return;
        }
        // Drop may run inside a runtime (a failed test): clean up from a thread of our own.
        std::thread::scope(|s| {
            s.spawn(|| {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                rt.block_on(self.cleanup());
            });
        });
    }
}

/// Writes an RC file with these exports into `dir`.
pub fn write_rc(dir: &std::path::Path, name: &str, vars: &[(&str, &str)]) -> PathBuf {
    let path = dir.join(name);
    let mut text = String::new();
    for (k, v) in vars {
        text.push_str(&format!("export {k}='{}'\n", v.replace('\'', "'\\''")));
    }
    std::fs::write(&path, text).unwrap();
    path
}
