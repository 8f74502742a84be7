//! Downloading the index and profiles from the Aquilon broker's web server.
//!
//! One HTTP client for the run (connections are reused), verifying HTTPS
//! with the system's roots plus CA_BUNDLE, each request bounded by
//! HTTP_TIMEOUT. Loading the system's roots (some 150 certificates) takes
//! 5-10 ms, on every run: plain `http://` URLs, the usual case for an
//! Aquilon broker, are fetched by a client without them, and the HTTPS
//! client is only built for an `https://` URL or when a plain URL
//! redirects to one. Bodies are streamed and cut off past a size limit, so a
//! hostile or broken server cannot exhaust memory. gzip is undone whether the
//! server says so (`Content-Encoding`) or the file itself is gzip (a `.gz`
//! name, recognised by its magic bytes). `file://` URLs read the local disk,
//! for sites that copy the profiles directory to the image factory.

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use packuilon_common::config::Cdb2RabbitConfig;
use url::Url;

use crate::index::{gunzip_if_gzip, GunzipError};

/// Largest profile accepted (download and decompressed).
pub const PROFILE_LIMIT: u64 = 64 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("[cdb2rabbit] CA_BUNDLE: cannot use {path}: {message}")]
    CaBundle { path: PathBuf, message: String },
    #[error("cannot build the HTTP client: {}", error_chain(.0))]
    Client(reqwest::Error),
    #[error("{url}: cannot build the HTTPS client: {message}")]
    Https { url: Url, message: String },
    #[error("{url}: HTTP status {status}")]
    Status { url: Url, status: reqwest::StatusCode },
    /// Shown with its whole source chain: reqwest's own message alone
    /// ("error decoding response body") does not say what went wrong.
    #[error("{url}: {}", error_chain(source))]
    Http { url: Url, source: reqwest::Error },
    #[error("{url}: timed out after {timeout:?} (HTTP_TIMEOUT)")]
    Timeout { url: Url, timeout: Duration },
    #[error("{url}: larger than {limit} bytes")]
    TooLarge { url: Url, limit: u64 },
    #[error("{url}: not valid gzip: {source}")]
    Gzip { url: Url, source: std::io::Error },
    #[error("{url}: {source}")]
    File { url: Url, source: std::io::Error },
    #[error("profile name {name:?} cannot be joined to PROFILE_DIR_URL {base}")]
    Join { name: String, base: Url },
}

impl FetchError {
    /// Whether the server looks overloaded: a connect error, a timeout, a
    /// connection reset or cut off, a 5xx. (A 404 or a bad redirect says
    /// nothing about its load.)
    pub fn is_overload(&self) -> bool {
        match self {
            FetchError::Timeout { .. } => true,
            FetchError::Status { status, .. } => status.is_server_error(),
            FetchError::Http { source, .. } => !source.is_redirect() && !source.is_builder(),
            _ => false,
        }
    }
}

/// `err` and its sources, outermost first, joined by ": " (a cause already
/// part of the text so far is not repeated).
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = err.to_string();
    let mut next = err.source();
    while let Some(cause) = next {
        let msg = cause.to_string();
        if !msg.is_empty() && !text.contains(&msg) {
            text.push_str(": ");
            text.push_str(&msg);
        }
        next = cause.source();
    }
    text
}

/// Redirects followed at most, as reqwest's default policy.
const MAX_REDIRECTS: usize = 10;

/// The run's HTTP clients.
#[derive(Debug)]
pub struct Fetcher {
    /// For `http://` URLs: no TLS roots, and stops at a redirect to `https://`.
    plain: reqwest::Client,
    /// For `https://` URLs (and plain ones that redirect there): the
    /// system's roots plus CA_BUNDLE. Built when first needed.
    secure: OnceLock<Result<reqwest::Client, String>>,
    /// What the secure client is built from.
    settings: ClientSettings,
}

#[derive(Debug)]
struct ClientSettings {
    timeout: Duration,
    concurrency: usize,
    ca_bundle: Vec<reqwest::Certificate>,
}

impl ClientSettings {
    fn builder(&self) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .timeout(self.timeout)
            .connect_timeout(self.timeout.min(Duration::from_secs(30)))
            .pool_max_idle_per_host(self.concurrency)
            .user_agent(concat!("cdb2rabbit/", env!("CARGO_PKG_VERSION")))
    }

    fn secure(&self) -> Result<reqwest::Client, reqwest::Error> {
        // What was asked for over HTTPS (with CA_BUNDLE to trust) is never
        // fetched over plain HTTP: a redirect that downgrades is an error.
        let policy = reqwest::redirect::Policy::custom(|attempt| {
            let previous = attempt.previous();
            if attempt.url().scheme() != "https" && previous.iter().any(|u| u.scheme() == "https") {
                let from = previous.last().map(|u| u.to_string()).unwrap_or_default();
                let message = format!(
                    "refusing the redirect from {from} to {}: HTTPS is not downgraded to plain HTTP",
                    attempt.url()
                );
                attempt.error(message)
            } else if previous.len() > MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else {
                attempt.follow()
            }
        });
        let mut builder = self.builder().redirect(policy);
        for cert in &self.ca_bundle {
            builder = builder.add_root_certificate(cert.clone());
        }
        builder.build()
    }

    fn plain(&self) -> Result<reqwest::Client, reqwest::Error> {
        let policy = reqwest::redirect::Policy::custom(|attempt| {
            if attempt.url().scheme() == "https" {
                // Answered as it is: the request is made again by the secure client.
                attempt.stop()
            } else if attempt.previous().len() > MAX_REDIRECTS {
                attempt.error("too many redirects")
            } else {
                attempt.follow()
            }
        });
        self.builder().tls_built_in_root_certs(false).redirect(policy).build()
    }
}

impl Fetcher {
    pub fn new(config: &Cdb2RabbitConfig) -> Result<Fetcher, FetchError> {
        let mut ca_bundle = Vec::new();
        if let Some(path) = &config.ca_bundle {
            let pem = std::fs::read(path).map_err(|e| FetchError::CaBundle {
                path: path.clone(),
                message: e.to_string(),
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| FetchError::CaBundle {
                path: path.clone(),
                message: e.to_string(),
            })?;
            if certs.is_empty() {
                return Err(FetchError::CaBundle {
                    path: path.clone(),
                    message: "no PEM certificate in it".into(),
                });
            }
            ca_bundle = certs;
        }
        let settings = ClientSettings {
            timeout: config.http_timeout,
            concurrency: config.download_concurrency,
            ca_bundle,
        };
        let fetcher = Fetcher {
            plain: settings.plain().map_err(FetchError::Client)?,
            secure: OnceLock::new(),
            settings,
        };
        // An https URL in the configuration: the secure client is needed
        // anyway, and a failure to build it is a configuration matter.
        if [&config.profile_info_url, &config.profile_dir_url]
            .iter()
            .any(|u| u.scheme() == "https")
        {
            let client = fetcher.settings.secure().map_err(FetchError::Client)?;
            let _ = fetcher.secure.set(Ok(client));
        }
        Ok(fetcher)
    }

    /// The client with TLS roots, built on first use.
    fn secure(&self, url: &Url) -> Result<&reqwest::Client, FetchError> {
        self.secure
            .get_or_init(|| self.settings.secure().map_err(|e| error_chain(&e)))
            .as_ref()
            .map_err(|message| FetchError::Https {
                url: url.clone(),
                message: message.clone(),
            })
    }

    /// GETs `url` whole (at most `limit` bytes, gzip undone).
    pub async fn get(&self, url: &Url, limit: u64) -> Result<Vec<u8>, FetchError> {
        self.get_noting(url, limit, &Cell::new(false)).await
    }

    /// [`Fetcher::get`], setting `answered` once the server's answer
    /// (its status and headers) is in, before the body.
    pub async fn get_noting(&self, url: &Url, limit: u64, answered: &Cell<bool>) -> Result<Vec<u8>, FetchError> {
        let raw = if url.scheme() == "file" {
            self.read_file(url, limit).await?
        } else {
            self.get_http(url, limit, answered).await?
        };
        gunzip_if_gzip(raw, limit).map_err(|e| match e {
            GunzipError::Corrupt(source) => FetchError::Gzip {
                url: url.clone(),
                source,
            },
            GunzipError::TooLarge => FetchError::TooLarge {
                url: url.clone(),
                limit,
            },
        })
    }

    async fn get_http(&self, url: &Url, limit: u64, answered: &Cell<bool>) -> Result<Vec<u8>, FetchError> {
        let http = |source: reqwest::Error| {
            if source.is_timeout() {
                FetchError::Timeout {
                    url: url.clone(),
                    timeout: self.settings.timeout,
                }
            } else {
                FetchError::Http {
                    url: url.clone(),
                    source,
                }
            }
        };
        let mut resp = if url.scheme() == "https" {
            self.secure(url)?.get(url.clone()).send().await.map_err(http)?
        } else {
            self.plain.get(url.clone()).send().await.map_err(http)?
        };
        if resp.status().is_redirection() && url.scheme() != "https" {
            // A redirect to https (the plain client does not follow those):
            // the whole request again, by the client that can.
            resp = self.secure(url)?.get(url.clone()).send().await.map_err(http)?;
        }
        answered.set(true);
        let status = resp.status();
        if !status.is_success() {
            return Err(FetchError::Status {
                url: url.clone(),
                status,
            });
        }
        let too_large = || FetchError::TooLarge {
            url: url.clone(),
            limit,
        };
        // Content-Length is only a hint (and absent when gzip is undone on the fly).
        let hint = resp.content_length().unwrap_or(0);
        if hint > limit {
            return Err(too_large());
        }
        let mut body = Vec::with_capacity(hint as usize);
        while let Some(chunk) = resp.chunk().await.map_err(http)? {
            if (body.len() + chunk.len()) as u64 > limit {
                return Err(too_large());
            }
            body.extend_from_slice(&chunk);
        }
        // Without a Content-Length the buffer grew by doubling (see gunzip_if_gzip).
        if body.capacity() - body.len() > body.len() / 8 {
            body.shrink_to_fit();
        }
        Ok(body)
    }

    async fn read_file(&self, url: &Url, limit: u64) -> Result<Vec<u8>, FetchError> {
        use tokio::io::AsyncReadExt;
        let file_err = |source| FetchError::File {
            url: url.clone(),
            source,
        };
        let path = url.to_file_path().map_err(|()| {
            file_err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a local file path",
            ))
        })?;
        let file = tokio::fs::File::open(&path).await.map_err(file_err)?;
        let mut body = Vec::new();
        file.take(limit + 1).read_to_end(&mut body).await.map_err(file_err)?;
        if body.len() as u64 > limit {
            return Err(FetchError::TooLarge {
                url: url.clone(),
                limit,
            });
        }
        Ok(body)
    }
}

/// PROFILE_DIR_URL + name, segment by segment: each segment is
/// percent-encoded, so `?`, `#` or `%` in a name stay part of the path.
/// `base` ends in `/` (the config guarantees it); `name` passed
/// [`crate::names::check_name`].
pub fn profile_url(base: &Url, name: &str) -> Result<Url, FetchError> {
    let mut url = base.clone();
    let join_err = || FetchError::Join {
        name: name.to_string(),
        base: base.clone(),
    };
    {
        let mut segments = url.path_segments_mut().map_err(|()| join_err())?;
        segments.pop_if_empty();
        segments.extend(name.split('/'));
    }
    url.set_query(None);
    url.set_fragment(None);
    Ok(url)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_join_below_the_directory() {
        let base = Url::parse("http://aq.example.org/profiles/").unwrap();
        assert_eq!(
            profile_url(&base, "ns/a.json").unwrap().as_str(),
            "http://aq.example.org/profiles/ns/a.json"
        );
        assert_eq!(
            profile_url(&base, "we?ird#x%.json").unwrap().as_str(),
            "http://aq.example.org/profiles/we%3Fird%23x%25.json"
        );
        let root = Url::parse("http://aq.example.org/").unwrap();
        assert_eq!(
            profile_url(&root, "a.json").unwrap().as_str(),
            "http://aq.example.org/a.json"
        );
    }
}
