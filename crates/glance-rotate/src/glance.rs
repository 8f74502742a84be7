//! Glance v2, the calls a rotation needs: read and list images (exact name
//! and owner filters, every `next` page followed), JSON-patch an image
//! (rename, properties, `os_hidden`, visibility), members (list, add, set
//! status, remove) and delete. A rejected token (401) is renewed once and the
//! request repeated; any other failure is a [`RotateError::Http`] naming the
//! method, the URL, the HTTP status and Glance's own message.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use reqwest::Method;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::keystone::{error_message, transport_message, Session};
use crate::RotateError;

/// JSON-patch media type of Glance's image API.
pub(crate) const PATCH_CONTENT_TYPE: &str = "application/openstack-images-v2.1-json-patch";

/// An image as Glance describes it (fields a rotation reads; the rest in `extra`).
#[derive(Debug, Clone, Deserialize)]
pub struct Image {
    pub id: String,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub(crate) owner: Option<String>,
    pub status: String,
    pub visibility: String,
    pub(crate) created_at: String,
    #[serde(default)]
    pub os_hidden: bool,
    #[serde(default)]
    pub(crate) protected: bool,
    /// Custom properties and everything else.
    #[serde(flatten)]
    pub(crate) extra: serde_json::Map<String, Value>,
}

impl Image {
    /// The image's name ("" when it has none).
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("")
    }

    /// `created_at` as a time (Glance writes RFC 3339, whole seconds).
    pub(crate) fn created(&self) -> Option<DateTime<Utc>> {
        DateTime::parse_from_rfc3339(&self.created_at)
            .ok()
            .map(|t| t.with_timezone(&Utc))
    }

    /// A string property (`os_hidden` and the like are fields of their own).
    pub fn property(&self, key: &str) -> Option<&str> {
        self.extra.get(key).and_then(Value::as_str)
    }
}

/// A project an image is shared with.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub member_id: String,
    pub(crate) image_id: String,
    pub status: String,
}

/// One JSON-patch operation.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum PatchOp {
    /// `replace` when the image has the property, `add` when not (Glance refuses the other).
    Set { path: String, value: Value, exists: bool },
    /// `remove`: only for a property the image has (Glance refuses the other).
    Remove { path: String },
}

impl PatchOp {
    fn to_json(&self) -> Value {
        match self {
            PatchOp::Set { path, value, exists } => {
                json!({ "op": if *exists { "replace" } else { "add" }, "path": path, "value": value })
            }
            PatchOp::Remove { path } => json!({ "op": "remove", "path": path }),
        }
    }
}

/// How to filter an image list by exact name.
#[derive(Debug, Clone, PartialEq, Eq)]
enum NameFilter {
    /// `name=in:"..."`: exact, even with `:` or `,` in the name.
    Quoted(String),
    /// `name=...`: exact as long as the name holds no `:` (Glance reads `x:` as an operator).
    Plain(String),
    /// Neither works (a name with both `"` and `:`): filter here.
    ClientSide,
}

fn name_filter(name: &str) -> NameFilter {
    if !name.contains('"') && !name.contains('\\') {
        NameFilter::Quoted(format!("in:\"{name}\""))
    } else if !name.contains(':') {
        NameFilter::Plain(name.to_string())
    } else {
        NameFilter::ClientSide
    }
}

/// `in:"a","b"` for names that can be quoted; the rest are returned.
fn names_in_filter<'a>(names: &[&'a str]) -> (Option<String>, Vec<&'a str>) {
    let (quotable, rest): (Vec<&str>, Vec<&str>) = names
        .iter()
        .partition(|n| matches!(name_filter(n), NameFilter::Quoted(_)));
    let filter = (!quotable.is_empty()).then(|| {
        let parts: Vec<String> = quotable.iter().map(|n| format!("\"{n}\"")).collect();
        format!("in:{}", parts.join(","))
    });
    (filter, rest)
}

/// Hidden or visible images in a list (Glance lists one kind per request).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hidden {
    No,
    Yes,
}

/// A Glance v2 client on an authenticated [`Session`].
#[derive(Debug, Clone)]
pub struct Glance {
    session: Arc<Session>,
    /// Images per list page.
    pub page_limit: u32,
}

impl Glance {
    /// A client on `session`'s image endpoint, listing 100 images a page.
    pub fn new(session: Arc<Session>) -> Glance {
        Glance {
            session,
            page_limit: 100,
        }
    }

    /// The Keystone session it authenticates with.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// One request; `path_and_query` starts with `/v2/`. Retries once with a new token on 401.
    async fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<(&'static str, Value)>,
    ) -> Result<(u16, Option<Value>), RotateError> {
        let mut retried = false;
        loop {
            let token = self.session.token().await?;
            let url = format!("{}{}", token.image_url, path_and_query);
            let mut req = self
                .session
                .http()
                .request(method.clone(), &url)
                .header("X-Auth-Token", token.value())
                .header("Accept", "application/json");
            if let Some((ct, v)) = &body {
                req = req.header("Content-Type", *ct).body(v.to_string());
            }
            self.session.count_request();
            let resp = req
                .send()
                .await
                .map_err(|e| RotateError::http("Glance", method.as_str(), &url, None, transport_message(&e)))?;
            let status = resp.status().as_u16();
            if status == 401 && !retried {
                // Expired or revoked early: one fresh token, one more try.
                self.session.invalidate(&token).await;
                retried = true;
                continue;
            }
            let text = resp
                .text()
                .await
                .map_err(|e| RotateError::http("Glance", method.as_str(), &url, Some(status), transport_message(&e)))?;
            if !(200..300).contains(&status) {
                return Err(RotateError::http(
                    "Glance",
                    method.as_str(),
                    &url,
                    Some(status),
                    error_message(&text),
                ));
            }
            let value = if text.trim().is_empty() {
                None
            } else {
                Some(serde_json::from_str(&text).map_err(|e| {
                    RotateError::http(
                        "Glance",
                        method.as_str(),
                        &url,
                        Some(status),
                        format!("answer is not JSON: {e}"),
                    )
                })?)
            };
            return Ok((status, value));
        }
    }

    fn parse<T: serde::de::DeserializeOwned>(what: &str, v: Option<Value>) -> Result<T, RotateError> {
        serde_json::from_value(v.unwrap_or(Value::Null))
            .map_err(|e| RotateError::Other(format!("Glance answered {what} with unexpected JSON: {e}")))
    }

    /// GET /v2/images/{id}.
    pub async fn image(&self, id: &str) -> Result<Image, RotateError> {
        let (_, v) = self.call(Method::GET, &format!("/v2/images/{}", enc(id)), None).await?;
        Self::parse("an image", v)
    }

    /// Every image matching `filters`, following every `next` page, newest first.
    pub async fn list(&self, filters: &[(&str, &str)]) -> Result<Vec<Image>, RotateError> {
        #[derive(Deserialize)]
        struct Page {
            images: Vec<Image>,
            next: Option<String>,
        }
        // The serializer is not Send: finish it before the first await.
        let query = {
            let mut q = url::form_urlencoded::Serializer::new(String::new());
            for (k, v) in filters {
                q.append_pair(k, v);
            }
            q.append_pair("sort_key", "created_at");
            q.append_pair("sort_dir", "desc");
            q.append_pair("limit", &self.page_limit.to_string());
            q.finish()
        };
        let mut next = Some(format!("/v2/images?{query}"));
        let mut out = Vec::new();
        while let Some(path) = next.take() {
            let (_, v) = self.call(Method::GET, &path, None).await?;
            let page: Page = Self::parse("an image list", v)?;
            let n = page.images.len();
            out.extend(page.images);
            // Glance's `next` keeps the filters and adds the marker; an empty page ends the list.
            if n > 0 {
                next = page.next.map(|p| {
                    if p.starts_with("/v2/") {
                        p
                    } else {
                        format!("/v2/{}", p.trim_start_matches('/'))
                    }
                });
            }
        }
        Ok(out)
    }

    /// Images named exactly `name` (visible or hidden ones), with extra filters.
    pub async fn list_named(
        &self,
        name: &str,
        hidden: Hidden,
        filters: &[(&str, &str)],
    ) -> Result<Vec<Image>, RotateError> {
        let mut f: Vec<(&str, &str)> = filters.to_vec();
        let nf = name_filter(name);
        match &nf {
            NameFilter::Quoted(v) | NameFilter::Plain(v) => f.push(("name", v)),
            NameFilter::ClientSide => {}
        }
        if hidden == Hidden::Yes {
            f.push(("os_hidden", "true"));
        }
        let mut images = self.list(&f).await?;
        images.retain(|i| i.name() == name);
        Ok(images)
    }

    /// Every image matching `filters`, visible and hidden ones (two lists).
    pub(crate) async fn list_visible_and_hidden(&self, filters: &[(&str, &str)]) -> Result<Vec<Image>, RotateError> {
        let mut out = self.list(filters).await?;
        let mut f: Vec<(&str, &str)> = filters.to_vec();
        f.push(("os_hidden", "true"));
        out.extend(self.list(&f).await?);
        Ok(out)
    }

    /// Images (visible or hidden) whose name is one of `names`, with extra filters.
    pub(crate) async fn list_names(
        &self,
        names: &[&str],
        hidden: Hidden,
        filters: &[(&str, &str)],
    ) -> Result<Vec<Image>, RotateError> {
        let mut out = Vec::new();
        // Keep URLs well under Glance's 16 KiB request-line limit.
        for chunk in names.chunks(40) {
            let (filter, rest) = names_in_filter(chunk);
            if let Some(filter) = filter {
                let mut f: Vec<(&str, &str)> = filters.to_vec();
                f.push(("name", &filter));
                if hidden == Hidden::Yes {
                    f.push(("os_hidden", "true"));
                }
                out.extend(self.list(&f).await?);
            }
            for n in rest {
                out.extend(self.list_named(n, hidden, filters).await?);
            }
        }
        out.retain(|i| names.contains(&i.name()));
        Ok(out)
    }

    /// PATCH /v2/images/{id}.
    pub(crate) async fn patch(&self, id: &str, ops: &[PatchOp]) -> Result<Image, RotateError> {
        let body = Value::Array(ops.iter().map(PatchOp::to_json).collect());
        let (_, v) = self
            .call(
                Method::PATCH,
                &format!("/v2/images/{}", enc(id)),
                Some((PATCH_CONTENT_TYPE, body)),
            )
            .await?;
        Self::parse("a patch", v)
    }

    /// Makes image `id` `shared`, so that it can receive members (logged).
    pub(crate) async fn make_shared(&self, image: &Image) -> Result<Image, RotateError> {
        let shared = self
            .patch(
                &image.id,
                &[PatchOp::Set {
                    path: "/visibility".into(),
                    value: json!("shared"),
                    exists: true,
                }],
            )
            .await?;
        tracing::info!("Made image {} {:?} shared to receive members", image.id, image.name());
        Ok(shared)
    }

    /// GET /v2/images/{id}/members.
    pub async fn members(&self, image_id: &str) -> Result<Vec<Member>, RotateError> {
        #[derive(Deserialize)]
        struct Members {
            members: Vec<Member>,
        }
        let (_, v) = self
            .call(Method::GET, &format!("/v2/images/{}/members", enc(image_id)), None)
            .await?;
        Ok(Self::parse::<Members>("a member list", v)?.members)
    }

    /// POST /v2/images/{id}/members. `Ok(false)`: it was a member already (409).
    pub async fn add_member(&self, image_id: &str, member: &str) -> Result<bool, RotateError> {
        let r = self
            .call(
                Method::POST,
                &format!("/v2/images/{}/members", enc(image_id)),
                Some(("application/json", json!({ "member": member }))),
            )
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// PUT /v2/images/{id}/members/{member} with a status.
    pub async fn set_member_status(&self, image_id: &str, member: &str, status: &str) -> Result<(), RotateError> {
        self.call(
            Method::PUT,
            &format!("/v2/images/{}/members/{}", enc(image_id), enc(member)),
            Some(("application/json", json!({ "status": status }))),
        )
        .await?;
        Ok(())
    }

    /// DELETE /v2/images/{id}/members/{member}. `Ok(false)`: it was gone already (404).
    pub async fn remove_member(&self, image_id: &str, member: &str) -> Result<bool, RotateError> {
        let r = self
            .call(
                Method::DELETE,
                &format!("/v2/images/{}/members/{}", enc(image_id), enc(member)),
                None,
            )
            .await;
        match r {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// DELETE /v2/images/{id}. `Ok(false)`: it was gone already (404).
    pub async fn delete_image(&self, image_id: &str) -> Result<bool, RotateError> {
        match self
            .call(Method::DELETE, &format!("/v2/images/{}", enc(image_id)), None)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// A path segment, percent-encoded.
fn enc(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes())
        .collect::<String>()
        .replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_filters_stay_exact() {
        assert_eq!(
            name_filter("sl7x-x86_64 inventory"),
            NameFilter::Quoted("in:\"sl7x-x86_64 inventory\"".into())
        );
        assert_eq!(name_filter("a: b, c"), NameFilter::Quoted("in:\"a: b, c\"".into()));
        assert_eq!(
            name_filter("say \"hi\", all"),
            NameFilter::Plain("say \"hi\", all".into())
        );
        assert_eq!(name_filter("say: \"hi\""), NameFilter::ClientSide);
        let (f, rest) = names_in_filter(&["a", "b (2)", "c\"d"]);
        assert_eq!(f.as_deref(), Some("in:\"a\",\"b (2)\""));
        assert_eq!(rest, vec!["c\"d"]);
    }

    #[test]
    fn patch_ops_add_or_replace() {
        let set = |exists| PatchOp::Set {
            path: "/name".into(),
            value: json!("x"),
            exists,
        };
        assert_eq!(set(true).to_json()["op"], "replace");
        assert_eq!(set(false).to_json()["op"], "add");
        let rm = PatchOp::Remove { path: "/x".into() }.to_json();
        assert_eq!(rm, json!({"op": "remove", "path": "/x"}));
    }
}
