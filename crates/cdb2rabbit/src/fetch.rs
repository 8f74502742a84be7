//! Downloading the index and profiles from the Aquilon broker's web server.
//!
//! One HTTP client for the run (connections are reused), verifying HTTPS
//! with the built-in roots plus CA_BUNDLE, each request bounded by
//! HTTP_TIMEOUT. Bodies are streamed and cut off past a size limit, so a
//! hostile or broken server cannot exhaust memory. gzip is undone whether the
//! server says so (`Content-Encoding`) or the file itself is gzip (a `.gz`
//! name, recognised by its magic bytes). `file://` URLs read the local disk,
//! for sites that copy the profiles directory to the image factory.

use std::path::PathBuf;
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

/// The run's HTTP client.
#[derive(Debug, Clone)]
pub struct Fetcher {
    client: reqwest::Client,
    timeout: Duration,
}

impl Fetcher {
    pub fn new(config: &Cdb2RabbitConfig) -> Result<Fetcher, FetchError> {
        let mut builder = reqwest::Client::builder()
            .timeout(config.http_timeout)
            .connect_timeout(config.http_timeout.min(Duration::from_secs(30)))
            .pool_max_idle_per_host(config.download_concurrency)
            .user_agent(concat!("cdb2rabbit/", env!("CARGO_PKG_VERSION")));
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
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        Ok(Fetcher {
            client: builder.build().map_err(FetchError::Client)?,
            timeout: config.http_timeout,
        })
    }

    /// GETs `url` whole (at most `limit` bytes, gzip undone).
    pub async fn get(&self, url: &Url, limit: u64) -> Result<Vec<u8>, FetchError> {
        let raw = if url.scheme() == "file" {
            self.read_file(url, limit).await?
        } else {
            self.get_http(url, limit).await?
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

    async fn get_http(&self, url: &Url, limit: u64) -> Result<Vec<u8>, FetchError> {
        let http = |source: reqwest::Error| {
            if source.is_timeout() {
                FetchError::Timeout {
                    url: url.clone(),
                    timeout: self.timeout,
                }
            } else {
                FetchError::Http {
                    url: url.clone(),
                    source,
                }
            }
        };
        let mut resp = self.client.get(url.clone()).send().await.map_err(http)?;
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
/// [`crate::index::check_name`].
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
