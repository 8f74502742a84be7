//! OpenStack credentials as an RC file or the environment gives them (`OS_*`
//! variables): Keystone v3 password or application-credential auth, the
//! project scope, and where the image endpoint is (interface, region,
//! `OS_IMAGE_URL`). Secrets are wrapped in `Secret` so that no `Debug`,
//! `Display` or error ever shows them.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

/// A password or application-credential secret: printed as `***`.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Secret(String);

impl Secret {
    pub(crate) fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The value, for the one place that sends it to Keystone.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// A name within a domain, or an ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Named {
    Id(String),
    Name { name: String, domain: Domain },
}

/// A domain by ID or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Domain {
    Id(String),
    Name(String),
}

/// How to prove who we are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AuthMethod {
    Password {
        user: Named,
        password: Secret,
        /// `None`: an unscoped request (Keystone then uses the user's default project).
        project: Option<Named>,
    },
    /// Application credentials are already scoped to their project.
    ApplicationCredential {
        /// By ID, or by name with the owning user.
        credential: AppCredentialRef,
        secret: Secret,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AppCredentialRef {
    Id(String),
    Name { name: String, user: Named },
}

/// Everything needed to get a token and find Glance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Keystone v3 base URL (`OS_AUTH_URL`, `/v3` added when missing).
    pub(crate) auth_url: String,
    pub(crate) method: AuthMethod,
    /// `OS_INTERFACE` (`public` by default; `publicURL` style accepted).
    pub(crate) interface: String,
    /// `OS_REGION_NAME`: only endpoints of that region.
    pub(crate) region: Option<String>,
    /// `OS_IMAGE_URL`: use this Glance instead of the catalog's.
    pub image_url: Option<String>,
    /// `OS_CACERT`: trust these CA certificates (PEM) instead of the system roots.
    pub(crate) cacert: Option<PathBuf>,
}

/// The variables do not describe usable credentials. Names variables, never values of secrets.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialsError {
    #[error("{0} is not set (source an OpenStack RC file or pass --auth-file)")]
    Missing(&'static str),
    #[error("{0}")]
    Invalid(String),
}

fn get<'a>(env: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    env.get(key).map(|s| s.trim()).filter(|s| !s.is_empty())
}

/// The user (ID, or name with OS_USER_DOMAIN_ID/NAME, falling back to OS_DEFAULT_DOMAIN_*).
fn user_from(env: &BTreeMap<String, String>) -> Result<Named, CredentialsError> {
    if let Some(id) = get(env, "OS_USER_ID") {
        return Ok(Named::Id(id.to_string()));
    }
    let name = get(env, "OS_USERNAME").ok_or(CredentialsError::Missing("OS_USERNAME (or OS_USER_ID)"))?;
    let domain = domain_from(env, "OS_USER_DOMAIN_ID", "OS_USER_DOMAIN_NAME")
        .ok_or(CredentialsError::Missing("OS_USER_DOMAIN_NAME (or OS_USER_DOMAIN_ID)"))?;
    Ok(Named::Name {
        name: name.to_string(),
        domain,
    })
}

fn domain_from(env: &BTreeMap<String, String>, id_key: &str, name_key: &str) -> Option<Domain> {
    get(env, id_key)
        .map(|v| Domain::Id(v.to_string()))
        .or_else(|| get(env, name_key).map(|v| Domain::Name(v.to_string())))
        .or_else(|| get(env, "OS_DEFAULT_DOMAIN_ID").map(|v| Domain::Id(v.to_string())))
        .or_else(|| get(env, "OS_DEFAULT_DOMAIN_NAME").map(|v| Domain::Name(v.to_string())))
}

impl Credentials {
    /// Reads `OS_*` variables (an RC file's exports merged over the process
    /// environment, or the environment alone).
    pub fn from_env(env: &BTreeMap<String, String>) -> Result<Credentials, CredentialsError> {
        let auth_url = get(env, "OS_AUTH_URL").ok_or(CredentialsError::Missing("OS_AUTH_URL"))?;
        if let Some(v) = get(env, "OS_IDENTITY_API_VERSION") {
            if !v.starts_with('3') {
                return Err(CredentialsError::Invalid(format!(
                    "OS_IDENTITY_API_VERSION={v}: only Keystone v3 is supported"
                )));
            }
        }
        let auth_url = normalise_auth_url(auth_url)?;
        let auth_type = get(env, "OS_AUTH_TYPE").unwrap_or("");
        let has_app_cred =
            get(env, "OS_APPLICATION_CREDENTIAL_ID").is_some() || get(env, "OS_APPLICATION_CREDENTIAL_NAME").is_some();
        let method = if auth_type.contains("applicationcredential") || (auth_type.is_empty() && has_app_cred) {
            let secret = get(env, "OS_APPLICATION_CREDENTIAL_SECRET")
                .ok_or(CredentialsError::Missing("OS_APPLICATION_CREDENTIAL_SECRET"))?;
            let credential = match get(env, "OS_APPLICATION_CREDENTIAL_ID") {
                Some(id) => AppCredentialRef::Id(id.to_string()),
                None => AppCredentialRef::Name {
                    name: get(env, "OS_APPLICATION_CREDENTIAL_NAME")
                        .ok_or(CredentialsError::Missing("OS_APPLICATION_CREDENTIAL_ID"))?
                        .to_string(),
                    user: user_from(env)?,
                },
            };
            AuthMethod::ApplicationCredential {
                credential,
                secret: Secret::new(secret),
            }
        } else if auth_type.is_empty() || auth_type.contains("password") {
            let password = env
                .get("OS_PASSWORD")
                .filter(|p| !p.is_empty())
                .ok_or(CredentialsError::Missing("OS_PASSWORD"))?;
            let user = user_from(env)?;
            let project = if let Some(id) = get(env, "OS_PROJECT_ID").or_else(|| get(env, "OS_TENANT_ID")) {
                Some(Named::Id(id.to_string()))
            } else if let Some(name) = get(env, "OS_PROJECT_NAME").or_else(|| get(env, "OS_TENANT_NAME")) {
                let domain = domain_from(env, "OS_PROJECT_DOMAIN_ID", "OS_PROJECT_DOMAIN_NAME").ok_or(
                    CredentialsError::Missing("OS_PROJECT_DOMAIN_NAME (or OS_PROJECT_DOMAIN_ID)"),
                )?;
                Some(Named::Name {
                    name: name.to_string(),
                    domain,
                })
            } else {
                None
            };
            AuthMethod::Password {
                user,
                password: Secret::new(password.clone()),
                project,
            }
        } else {
            return Err(CredentialsError::Invalid(format!(
                "OS_AUTH_TYPE={auth_type}: only password and v3applicationcredential are supported"
            )));
        };
        let interface = get(env, "OS_INTERFACE")
            .or_else(|| get(env, "OS_ENDPOINT_TYPE"))
            .unwrap_or("public");
        let interface = interface.strip_suffix("URL").unwrap_or(interface).to_string();
        if !matches!(interface.as_str(), "public" | "internal" | "admin") {
            return Err(CredentialsError::Invalid(format!(
                "OS_INTERFACE={interface}: expected public, internal or admin"
            )));
        }
        Ok(Credentials {
            auth_url,
            method,
            interface,
            region: get(env, "OS_REGION_NAME").map(str::to_string),
            image_url: get(env, "OS_IMAGE_URL").map(str::to_string),
            cacert: get(env, "OS_CACERT").map(PathBuf::from),
        })
    }

    /// The process environment's `OS_*` variables.
    pub fn process_env() -> BTreeMap<String, String> {
        std::env::vars().filter(|(k, _)| k.starts_with("OS_")).collect()
    }
}

/// `http://host:5000`, `.../v3`, `.../v3/` all become `.../v3`.
fn normalise_auth_url(url: &str) -> Result<String, CredentialsError> {
    let parsed = url::Url::parse(url).map_err(|e| CredentialsError::Invalid(format!("OS_AUTH_URL={url}: {e}")))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(CredentialsError::Invalid(format!(
            "OS_AUTH_URL={url}: not an http(s) URL"
        )));
    }
    let trimmed = url.trim_end_matches('/');
    if trimmed.ends_with("/v3") {
        Ok(trimmed.to_string())
    } else if trimmed.ends_with("/v2.0") {
        Err(CredentialsError::Invalid(format!(
            "OS_AUTH_URL={url}: Keystone v2.0 is not supported, use the /v3 URL"
        )))
    } else {
        Ok(format!("{trimmed}/v3"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn password_credentials_with_domain_names() {
        let c = Credentials::from_env(&env(&[
            ("OS_AUTH_URL", "http://127.0.0.1:5000/v3/"),
            ("OS_USERNAME", "admin"),
            ("OS_PASSWORD", "hunter2"),
            ("OS_PROJECT_NAME", "admin"),
            ("OS_USER_DOMAIN_NAME", "Default"),
            ("OS_PROJECT_DOMAIN_ID", "default"),
            ("OS_INTERFACE", "publicURL"),
        ]))
        .unwrap();
        assert_eq!(c.auth_url, "http://127.0.0.1:5000/v3");
        assert_eq!(c.interface, "public");
        let AuthMethod::Password { user, project, .. } = &c.method else {
            panic!("{c:?}")
        };
        assert_eq!(
            user,
            &Named::Name {
                name: "admin".into(),
                domain: Domain::Name("Default".into())
            }
        );
        assert_eq!(
            project,
            &Some(Named::Name {
                name: "admin".into(),
                domain: Domain::Id("default".into())
            })
        );
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn application_credential_wins_when_its_id_is_set() {
        let c = Credentials::from_env(&env(&[
            ("OS_AUTH_URL", "http://127.0.0.1:5000"),
            ("OS_AUTH_TYPE", "v3applicationcredential"),
            ("OS_APPLICATION_CREDENTIAL_ID", "abc"),
            ("OS_APPLICATION_CREDENTIAL_SECRET", "topsecret"),
        ]))
        .unwrap();
        assert_eq!(c.auth_url, "http://127.0.0.1:5000/v3");
        assert!(matches!(c.method, AuthMethod::ApplicationCredential { .. }));
        assert!(!format!("{c:?}").contains("topsecret"));
    }

    #[test]
    fn missing_variables_are_named() {
        let e = Credentials::from_env(&env(&[("OS_AUTH_URL", "http://k/v3"), ("OS_USERNAME", "u")])).unwrap_err();
        assert!(e.to_string().contains("OS_PASSWORD"), "{e}");
        let e = Credentials::from_env(&env(&[])).unwrap_err();
        assert!(e.to_string().contains("OS_AUTH_URL"), "{e}");
        let e = Credentials::from_env(&env(&[
            ("OS_AUTH_URL", "http://k/v3"),
            ("OS_USERNAME", "u"),
            ("OS_PASSWORD", "p"),
        ]))
        .unwrap_err();
        assert!(e.to_string().contains("OS_USER_DOMAIN_NAME"), "{e}");
    }
}
