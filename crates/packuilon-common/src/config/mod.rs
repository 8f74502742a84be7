//! `config.ini`: the original's file, keys and sections, loaded once and
//! validated into typed structs.
//!
//! The file is INI as Python's `ConfigParser` reads it (the `configparser`
//! module emulates it): keys are case-insensitive, `#` and `;` start comment
//! lines, `key = value` and `key: value` both work. Every error names the
//! file, the section and the key, so an operator can go straight to the line. Keys this version does
//! not know are reported as warnings (the binary logs them), never errors:
//! a config shared with the original or a later version still loads.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ini::Properties;

mod configparser;

pub use configparser::IniFile;
use configparser::DEFAULT_SECTION;

/// Where the original kept its configuration, and where operators expect it.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/packer-utils/config.ini";
/// Environment variable that overrides [`DEFAULT_CONFIG_PATH`] (`--config` wins over it).
pub const CONFIG_ENV: &str = "PACKER_UTILS_CONFIG";

/// A problem with the configuration: which file, where in it, and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub section: Option<String>,
    pub key: Option<String>,
    pub problem: String,
}

impl ConfigError {
    pub fn new(file: &Path, section: Option<&str>, key: Option<&str>, problem: impl Into<String>) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            section: section.map(str::to_string),
            key: key.map(str::to_string),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file.display())?;
        if let Some(section) = &self.section {
            write!(f, " [{section}]")?;
        }
        if let Some(key) = &self.key {
            write!(f, " {key}:")?;
        }
        write!(f, " {}", self.problem)
    }
}

impl std::error::Error for ConfigError {}

pub type Result<T, E = ConfigError> = std::result::Result<T, E>;

/// `[global]`: the queue and how to reach RabbitMQ.
#[derive(Debug, Clone)]
pub struct GlobalConfig {
    /// QUEUE: the durable queue cdb2rabbit publishes to and rabbit2packer consumes.
    pub queue: String,
    /// QUEUE_TYPE: how both binaries declare QUEUE (and `<QUEUE>.rejected`).
    pub queue_type: QueueType,
    pub rabbit: RabbitSettings,
    /// PUBLISH_TIMEOUT: the longest a publish waits for the broker's
    /// confirm (default 60 s); a broker that blocks or stalls fails the run.
    pub publish_timeout: Duration,
}

/// QUEUE_TYPE: the kind of queue QUEUE is declared as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QueueType {
    /// Durable, no arguments: as the original declared it (the default).
    #[default]
    Classic,
    /// `x-queue-type: quorum`: replicated over a cluster's nodes.
    Quorum,
}

impl QueueType {
    /// The name RabbitMQ gives the type (`x-queue-type`), and QUEUE_TYPE's value.
    pub fn as_str(self) -> &'static str {
        match self {
            QueueType::Classic => "classic",
            QueueType::Quorum => "quorum",
        }
    }
}

impl fmt::Display for QueueType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One RabbitMQ node of RABBIT_HOST.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RabbitNode {
    pub host: String,
    pub port: u16,
}

/// How to reach the broker (`[global]` RABBIT_* keys).
#[derive(Clone)]
pub struct RabbitSettings {
    /// RABBIT_HOST: one node, or a cluster's nodes in the order they are
    /// tried (each `host` or `host:port`; RABBIT_PORT where none is given).
    pub nodes: Vec<RabbitNode>,
    pub user: String,
    pub password: String,
    /// RABBIT_VHOST, default `/`.
    pub vhost: String,
    /// RABBIT_TLS: connect with `amqps`.
    pub tls: bool,
    /// RABBIT_CA_FILE: PEM bundle to verify the broker with (implies TLS).
    pub ca_file: Option<PathBuf>,
    /// RABBIT_RETRIES: connection attempts before giving up (original: 10).
    pub retries: u32,
    /// RABBIT_RETRY_DELAY: pause between attempts (original: 2 s).
    pub retry_delay: Duration,
    /// RABBIT_CONNECT_TIMEOUT: bounds each attempt, the AMQP handshake
    /// included (default 30 s).
    pub connect_timeout: Duration,
}

impl fmt::Debug for RabbitSettings {
    // The password never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RabbitSettings")
            .field("nodes", &self.nodes)
            .field("user", &self.user)
            .field("password", &"<hidden>")
            .field("vhost", &self.vhost)
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("retries", &self.retries)
            .field("retry_delay", &self.retry_delay)
            .field("connect_timeout", &self.connect_timeout)
            .finish()
    }
}

/// Where rabbit2packer's alerts go (`[global]` ADMIN_MAIL, MAIL_FROM,
/// SMTP_*, SENDMAIL_PATH, ALERT_WEBHOOK) and the status page they link to
/// (`[rabbit2packer]` STATUS_URL). No ADMIN_MAIL and no ALERT_WEBHOOK: no alerts.
#[derive(Clone)]
pub struct AlertsConfig {
    /// ADMIN_MAIL: addresses (comma- or space-separated); empty: no mail.
    pub admin_mail: Vec<String>,
    /// MAIL_FROM, default `rabbit2packer@<host name>`.
    pub mail_from: String,
    /// How mail leaves the host.
    pub mail_transport: MailTransport,
    /// ALERT_WEBHOOK: a URL that takes `{"text": ...}` (Slack, Mattermost).
    pub webhook: Option<url::Url>,
    /// STATUS_URL, default `http://<host name>:8150/`: the link in every alert.
    pub status_url: String,
}

impl fmt::Debug for AlertsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AlertsConfig")
            .field("admin_mail", &self.admin_mail)
            .field("mail_from", &self.mail_from)
            .field("mail_transport", &self.mail_transport)
            // A webhook URL is a credential (Slack's carry their token).
            .field("webhook", &self.webhook.as_ref().map(|_| "<hidden>"))
            .field("status_url", &self.status_url)
            .finish()
    }
}

/// SMTP_SERVER (with SMTP_USER/SMTP_PASSWORD) or SENDMAIL_PATH.
#[derive(Clone)]
pub enum MailTransport {
    /// SMTP to `host:port` (default `localhost:25`), STARTTLS when offered.
    Smtp {
        host: String,
        port: u16,
        /// SMTP_USER and SMTP_PASSWORD, both or neither.
        credentials: Option<(String, String)>,
    },
    /// SENDMAIL_PATH: a sendmail-compatible program (`-i -f FROM -- TO...`).
    Sendmail(PathBuf),
}

impl fmt::Debug for MailTransport {
    // The password never reaches a log line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MailTransport::Smtp {
                host,
                port,
                credentials,
            } => f
                .debug_struct("Smtp")
                .field("host", host)
                .field("port", port)
                .field("user", &credentials.as_ref().map(|c| &c.0))
                .finish(),
            MailTransport::Sendmail(p) => f.debug_tuple("Sendmail").field(p).finish(),
        }
    }
}

/// The default port of STATUS_URL (the status server's default listen port).
pub const DEFAULT_STATUS_PORT: u16 = 8150;

/// This host's name (for MAIL_FROM's and STATUS_URL's defaults).
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer outlives the call, its length is passed.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..end]) {
        Ok(n) if rc == 0 && !n.is_empty() => n.to_string(),
        _ => "localhost".to_string(),
    }
}

/// A plain `local@domain` address: no display name, no space, no control
/// character, nothing that could end or add a mail header.
fn plain_address(a: &str) -> bool {
    let Some((local, domain)) = a.rsplit_once('@') else {
        return false;
    };
    !local.is_empty()
        && !domain.is_empty()
        && a.chars().all(|c| {
            c.is_ascii_graphic() && !matches!(c, '<' | '>' | '(' | ')' | ',' | ';' | ':' | '"' | '[' | ']' | '\\')
        })
}

/// A TCP port number (1-65535).
fn parse_port(v: &str) -> Option<u16> {
    v.parse::<u16>().ok().filter(|p| *p != 0)
}

/// RABBIT_HOST: `host[:port]` entries separated by commas, whitespace
/// around them ignored; `[v6 address]:port` for an IPv6 address with a
/// port (an address without brackets is a host without port, as before).
fn parse_nodes(value: &str) -> std::result::Result<Vec<(String, Option<u16>)>, String> {
    let mut nodes = Vec::new();
    for (i, entry) in value.split(',').map(str::trim).enumerate() {
        let n = i + 1;
        if entry.is_empty() {
            return Err(format!(
                "entry {n} is empty in {value:?} (a comma-separated list of host or host:port)"
            ));
        }
        if entry
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '/' || c == '@')
        {
            return Err(format!("entry {n}, {entry:?}, is not a host or host:port"));
        }
        let (host, port) = if let Some(rest) = entry.strip_prefix('[') {
            let Some((host, after)) = rest.split_once(']') else {
                return Err(format!("entry {n}, {entry:?}: a '[' without ']'"));
            };
            match after {
                "" => (host, None),
                _ => match after.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return Err(format!("entry {n}, {entry:?}, is not a host or host:port")),
                },
            }
        } else {
            match entry.split_once(':') {
                // More than one colon: an IPv6 address, no port.
                Some((host, p)) if !p.contains(':') => (host, Some(p)),
                _ => (entry, None),
            }
        };
        if host.is_empty() {
            return Err(format!("entry {n}, {entry:?}, has no host"));
        }
        let port = match port {
            None => None,
            Some(p) => Some(
                parse_port(p)
                    .ok_or_else(|| format!("entry {n}, {entry:?}: the port must be a TCP port number (1-65535)"))?,
            ),
        };
        nodes.push((host.to_string(), port));
    }
    Ok(nodes)
}

/// `[cdb2rabbit]`.
#[derive(Debug, Clone)]
pub struct Cdb2RabbitConfig {
    /// PROFILE_INFO_URL: the broker's `profiles-info.xml` (or `.xml.gz`).
    pub profile_info_url: url::Url,
    /// PROFILE_DIR_URL: base URL profile names are joined to (always ends in `/`).
    pub profile_dir_url: url::Url,
    /// PROFILE_MATCH: substring of the profile name; empty matches all.
    pub profile_match: String,
    /// CACHE_DIR: cached index, cached profiles and the run lock.
    pub cache_dir: PathBuf,
    /// CA_BUNDLE: extra PEM roots for HTTPS to the broker.
    pub ca_bundle: Option<PathBuf>,
    /// HTTP_TIMEOUT: per request (default 60 s).
    pub http_timeout: Duration,
    /// DOWNLOAD_CONCURRENCY: profile downloads at once (default 8).
    pub download_concurrency: usize,
    /// METRICS_FILE: a Prometheus text file written after each run (for
    /// node_exporter's textfile collector); `None`: not written.
    pub metrics_file: Option<PathBuf>,
}

/// `[rabbit2packer]`.
#[derive(Debug, Clone)]
pub struct Rabbit2PackerConfig {
    /// THREAD_COUNT: builds at once (>= 1).
    pub thread_count: usize,
    pub log_dir: PathBuf,
    pub build_file_dir: PathBuf,
    /// PACKER_AUTH_FILE: OpenStack RC file sourced for every packer run.
    pub packer_auth_file: PathBuf,
    /// PACKER_TEMPLATE_MAP: `template-map.json`.
    pub packer_template_map: PathBuf,
    /// IMAGES_CONFIG: `source-images.json`.
    pub images_config: PathBuf,
    /// PACKER_PATH, default `packer` (looked up in PATH).
    pub packer_path: PathBuf,
    /// STATE_DIR, default `/var/lib/packuilon`: the job journal and rejected messages.
    pub state_dir: PathBuf,
    /// LOG_KEEP: build logs kept per image and template (default 30).
    pub log_keep: usize,
    /// BUILD_TIMEOUT, default 6 h.
    pub build_timeout: Duration,
    /// STOP_TIMEOUT, default 5 min: how long a stop waits for packer to clean up.
    pub stop_timeout: Duration,
    pub rotation: RotationConfig,
    /// STATUS_LISTEN and STATUS_URL: the status page, API and metrics.
    pub status: StatusConfig,
    /// TEST_COMMAND, TEST_TIMEOUT, STAGED_NAME: the test gate before an image goes live.
    pub gate: GateConfig,
    /// REBUILD_OUTDATED: when IMAGES_CONFIG changes, rebuild the images
    /// built from a source image that is no longer the current one.
    pub rebuild_outdated: bool,
    /// STATE_DB, STATE_DB_PASSWORD_FILE, JOB_LEASE, HOST_NAME: the shared
    /// site journal of several daemons; `None`: this host's SQLite journal.
    pub site: Option<SiteConfig>,
}

/// The site journal (`[rabbit2packer] STATE_DB` and its keys): the job
/// journal in PostgreSQL, shared by every daemon that names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteConfig {
    /// STATE_DB: `postgresql://user@host:port/db?sslmode=...`.
    pub url: String,
    /// STATE_DB_PASSWORD_FILE: the password, when the URL has none.
    pub password_file: Option<PathBuf>,
    /// JOB_LEASE, default 60 s: a running job is this daemon's while it
    /// renews the lease (every third of it); then another daemon takes it over.
    pub job_lease: Duration,
    /// HOST_NAME, default the machine's host name: this daemon's name in
    /// the site journal (unique per daemon).
    pub host_name: Option<String>,
}

/// Default of JOB_LEASE.
pub const DEFAULT_JOB_LEASE: Duration = Duration::from_secs(60);

/// The test gate (`[rabbit2packer] TEST_*`, STAGED_NAME): after a build and
/// before the rotation, the new image waits under STAGED_NAME while
/// TEST_COMMAND runs; it goes live only if the command exits 0.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GateConfig {
    /// TEST_COMMAND: run by bash; `None` (unset or empty): no gate.
    pub test_command: Option<String>,
    /// TEST_TIMEOUT, default 1 h: a test running longer fails.
    pub test_timeout: Duration,
    /// STAGED_NAME, default `next-{name}`: the image's name while it is tested.
    pub staged_name: String,
}

/// Default of STAGED_NAME.
pub const DEFAULT_STAGED_NAME: &str = "next-{name}";

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            test_command: None,
            test_timeout: Duration::from_secs(3600),
            staged_name: DEFAULT_STAGED_NAME.to_string(),
        }
    }
}

/// The status server of rabbit2packer (`[rabbit2packer] STATUS_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusConfig {
    /// STATUS_LISTEN, default `127.0.0.1:8150`; empty turns the server off (`None`).
    pub listen: Option<std::net::SocketAddr>,
    /// STATUS_URL: the address people reach the page by (links in alerts);
    /// `None`: `http://<host name>:<port>/`.
    pub url: Option<String>,
}

/// Default of STATUS_LISTEN.
pub const DEFAULT_STATUS_LISTEN: &str = "127.0.0.1:8150";

impl Default for StatusConfig {
    fn default() -> Self {
        StatusConfig {
            listen: DEFAULT_STATUS_LISTEN.parse().ok(),
            url: None,
        }
    }
}

impl StatusConfig {
    /// STATUS_URL, else `http://<host name>:<port>/`, `port` being the one
    /// the server is bound to (or STATUS_LISTEN's).
    pub fn public_url(&self, port: u16) -> String {
        self.url
            .clone()
            .unwrap_or_else(|| format!("http://{}:{port}/", host_name()))
    }
}

/// The rename-old-images step (`[rabbit2packer]` keys it reads).
#[derive(Debug, Clone)]
pub struct RotationConfig {
    /// PACKER_ADMIN_AUTH_FILE: admin RC file. `None` means rotation is off.
    pub admin_auth_file: Option<PathBuf>,
    /// ARCHIVE_NAME: `{name}`, `{date}` (YYYY-MM-DD), `{datetime}`.
    pub archive_name: String,
    /// HIDE_ARCHIVED: set `os_hidden` on archived images.
    pub hide_archived: bool,
    /// KEEP_ARCHIVES: delete archives of a name beyond the newest N.
    pub keep_archives: Option<u32>,
    /// BROKEN_NAME: `{name}`, `{date}`, `{datetime}`; the name of an image
    /// that failed its test, or that a rollback took off its name.
    pub broken_name: String,
}

/// Default of PACKER_ADMIN_AUTH_FILE (used when that file exists).
pub const DEFAULT_ADMIN_AUTH_FILE: &str = "/etc/packer-utils/admin-auth.sh";
/// Default of ARCHIVE_NAME: the original's archive name.
pub const DEFAULT_ARCHIVE_NAME: &str = "archive-{name} {date}";
/// Default of BROKEN_NAME.
pub const DEFAULT_BROKEN_NAME: &str = "broken-{name} {datetime}";

impl Default for RotationConfig {
    fn default() -> Self {
        RotationConfig {
            admin_auth_file: None,
            archive_name: DEFAULT_ARCHIVE_NAME.to_string(),
            hide_archived: false,
            keep_archives: None,
            broken_name: DEFAULT_BROKEN_NAME.to_string(),
        }
    }
}

impl IniFile {
    fn section(&self, name: &'static str) -> Section<'_> {
        Section {
            file: &self.path,
            name,
            props: self.ini.section(Some(name)),
            defaults: self.ini.section(Some(DEFAULT_SECTION)),
            duplicates: &self.duplicates,
        }
    }

    /// `[global]`. `warnings` receives unknown keys.
    pub fn global(&self, warnings: &mut Vec<String>) -> Result<GlobalConfig> {
        let s = self.section("global");
        s.require_present()?;
        let queue = s.required_nonempty("QUEUE")?;
        let queue_type = s
            .parse_optional("QUEUE_TYPE", "classic or quorum", |v| {
                match v.to_ascii_lowercase().as_str() {
                    "classic" => Some(QueueType::Classic),
                    "quorum" => Some(QueueType::Quorum),
                    _ => None,
                }
            })?
            .unwrap_or_default();
        let hosts = s.required_nonempty("RABBIT_HOST")?;
        let entries = parse_nodes(&hosts).map_err(|problem| s.err("RABBIT_HOST", problem))?;
        // RABBIT_PORT is required, as in the original, unless every node names its port.
        let port = if entries.iter().all(|(_, port)| port.is_some()) && s.optional("RABBIT_PORT").is_none() {
            None
        } else {
            Some(s.parse_required("RABBIT_PORT", "a TCP port number (1-65535)", parse_port)?)
        };
        let nodes = entries
            .into_iter()
            .map(|(host, p)| RabbitNode {
                host,
                port: p.or(port).expect("RABBIT_PORT is read when a node has no port"),
            })
            .collect();
        let user = s.required_nonempty("RABBIT_USER")?;
        let password = s.required("RABBIT_PW")?;
        let vhost = s.optional("RABBIT_VHOST").unwrap_or_else(|| "/".to_string());
        let ca_file = s.optional_path("RABBIT_CA_FILE");
        let tls = s
            .parse_optional("RABBIT_TLS", "true or false", parse_bool)?
            .unwrap_or(false)
            || ca_file.is_some();
        if let Some(ca) = &ca_file {
            s.must_exist("RABBIT_CA_FILE", ca)?;
        }
        let retries = s
            .parse_optional("RABBIT_RETRIES", "a whole number >= 1", |v| {
                v.parse::<u32>().ok().filter(|n| *n >= 1)
            })?
            .unwrap_or(10);
        let retry_delay = s
            .duration_optional("RABBIT_RETRY_DELAY")?
            .unwrap_or(Duration::from_secs(2));
        let connect_timeout = s
            .positive_duration_optional("RABBIT_CONNECT_TIMEOUT")?
            .unwrap_or(Duration::from_secs(30));
        let publish_timeout = s
            .positive_duration_optional("PUBLISH_TIMEOUT")?
            .unwrap_or(Duration::from_secs(60));
        warnings.extend(s.unknown_keys(
            &[
                "QUEUE",
                "QUEUE_TYPE",
                "RABBIT_HOST",
                "RABBIT_PORT",
                "RABBIT_USER",
                "RABBIT_PW",
                "RABBIT_VHOST",
                "RABBIT_TLS",
                "RABBIT_CA_FILE",
                "RABBIT_RETRIES",
                "RABBIT_RETRY_DELAY",
                "RABBIT_CONNECT_TIMEOUT",
                "PUBLISH_TIMEOUT",
                "ADMIN_MAIL",
                "MAIL_FROM",
                "SMTP_SERVER",
                "SMTP_USER",
                "SMTP_PASSWORD",
                "SENDMAIL_PATH",
                "ALERT_WEBHOOK",
            ],
            // Later versions of the original kept other mail keys here.
            |k| k.to_ascii_uppercase().contains("MAIL"),
        ));
        Ok(GlobalConfig {
            queue,
            queue_type,
            rabbit: RabbitSettings {
                nodes,
                user,
                password,
                vhost,
                tls,
                ca_file,
                retries,
                retry_delay,
                connect_timeout,
            },
            publish_timeout,
        })
    }

    /// `[cdb2rabbit]`. `warnings` receives unknown keys.
    pub fn cdb2rabbit(&self, warnings: &mut Vec<String>) -> Result<Cdb2RabbitConfig> {
        let s = self.section("cdb2rabbit");
        s.require_present()?;
        let profile_info_url = s.url("PROFILE_INFO_URL")?;
        let mut profile_dir_url = s.url("PROFILE_DIR_URL")?;
        // Profile names are joined to the path; a query (an access token,
        // a CGI argument) or a fragment would be silently dropped.
        if profile_dir_url.query().is_some() || profile_dir_url.fragment().is_some() {
            return Err(s.err(
                "PROFILE_DIR_URL",
                format!(
                    "a ?query or #fragment is not supported (profile names are joined to the URL's path): {:?}",
                    profile_dir_url.as_str()
                ),
            ));
        }
        // Joining "a.json" to ".../profiles" would replace the last segment.
        if !profile_dir_url.path().ends_with('/') {
            let p = format!("{}/", profile_dir_url.path());
            profile_dir_url.set_path(&p);
        }
        let profile_match = s.required("PROFILE_MATCH")?;
        let cache_dir = PathBuf::from(s.required_nonempty("CACHE_DIR")?);
        let ca_bundle = s.optional_path("CA_BUNDLE");
        if let Some(ca) = &ca_bundle {
            s.must_exist("CA_BUNDLE", ca)?;
        }
        let http_timeout = s.duration_optional("HTTP_TIMEOUT")?.unwrap_or(Duration::from_secs(60));
        let download_concurrency = s
            .parse_optional("DOWNLOAD_CONCURRENCY", "a whole number >= 1", positive_usize)?
            .unwrap_or(8);
        let metrics_file = s.optional_path("METRICS_FILE");
        warnings.extend(s.unknown_keys(
            &[
                "PROFILE_INFO_URL",
                "PROFILE_DIR_URL",
                "PROFILE_MATCH",
                "CACHE_DIR",
                "CA_BUNDLE",
                "HTTP_TIMEOUT",
                "DOWNLOAD_CONCURRENCY",
                "METRICS_FILE",
            ],
            |_| false,
        ));
        Ok(Cdb2RabbitConfig {
            profile_info_url,
            profile_dir_url,
            profile_match,
            cache_dir,
            ca_bundle,
            http_timeout,
            download_concurrency,
            metrics_file,
        })
    }

    /// `[rabbit2packer]`. `warnings` receives unknown keys. Paths named by
    /// required keys must exist (the daemon checks their contents itself).
    pub fn rabbit2packer(&self, warnings: &mut Vec<String>) -> Result<Rabbit2PackerConfig> {
        let s = self.section("rabbit2packer");
        s.require_present()?;
        let thread_count = s.parse_required("THREAD_COUNT", "a whole number >= 1", positive_usize)?;
        let log_dir = PathBuf::from(s.required_nonempty("LOG_DIR")?);
        let build_file_dir = PathBuf::from(s.required_nonempty("BUILD_FILE_DIR")?);
        let packer_auth_file = PathBuf::from(s.required_nonempty("PACKER_AUTH_FILE")?);
        s.must_exist("PACKER_AUTH_FILE", &packer_auth_file)?;
        let packer_template_map = PathBuf::from(s.required_nonempty("PACKER_TEMPLATE_MAP")?);
        s.must_exist("PACKER_TEMPLATE_MAP", &packer_template_map)?;
        let images_config = PathBuf::from(s.required_nonempty("IMAGES_CONFIG")?);
        s.must_exist("IMAGES_CONFIG", &images_config)?;
        let packer_path = s
            .optional_path("PACKER_PATH")
            .unwrap_or_else(|| PathBuf::from("packer"));
        let state_dir = s
            .optional_path("STATE_DIR")
            .unwrap_or_else(|| PathBuf::from("/var/lib/packuilon"));
        let log_keep = s
            .parse_optional("LOG_KEEP", "a whole number >= 1", positive_usize)?
            .unwrap_or(30);
        let build_timeout = s
            .duration_optional("BUILD_TIMEOUT")?
            .unwrap_or(Duration::from_secs(6 * 3600));
        let stop_timeout = s.duration_optional("STOP_TIMEOUT")?.unwrap_or(Duration::from_secs(300));
        let rotation = rotation_from(&s)?;
        let status = status_from(&s)?;
        let gate = gate_from(&s)?;
        let rebuild_outdated = s
            .parse_optional("REBUILD_OUTDATED", "true or false", parse_bool)?
            .unwrap_or(false);
        let site = site_from(&s)?;
        warnings.extend(s.unknown_keys(
            &[
                "THREAD_COUNT",
                "LOG_DIR",
                "BUILD_FILE_DIR",
                "PACKER_AUTH_FILE",
                "PACKER_TEMPLATE_MAP",
                "IMAGES_CONFIG",
                "PACKER_PATH",
                "STATE_DIR",
                "LOG_KEEP",
                "BUILD_TIMEOUT",
                "STOP_TIMEOUT",
                "PACKER_ADMIN_AUTH_FILE",
                "ARCHIVE_NAME",
                "HIDE_ARCHIVED",
                "KEEP_ARCHIVES",
                "STATUS_LISTEN",
                "STATUS_URL",
                "BROKEN_NAME",
                "TEST_COMMAND",
                "TEST_TIMEOUT",
                "STAGED_NAME",
                "REBUILD_OUTDATED",
                "STATE_DB",
                "STATE_DB_PASSWORD_FILE",
                "JOB_LEASE",
                "HOST_NAME",
            ],
            |_| false,
        ));
        Ok(Rabbit2PackerConfig {
            thread_count,
            log_dir,
            build_file_dir,
            packer_auth_file,
            packer_template_map,
            images_config,
            packer_path,
            state_dir,
            log_keep,
            build_timeout,
            stop_timeout,
            rotation,
            status,
            gate,
            rebuild_outdated,
            site,
        })
    }

    /// The alert keys of `[global]` and `[rabbit2packer]` STATUS_URL (unknown
    /// keys are reported by [`IniFile::global`] and [`IniFile::rabbit2packer`]).
    pub fn alerts(&self) -> Result<AlertsConfig> {
        let g = self.section("global");
        let admin_mail: Vec<String> = g
            .optional("ADMIN_MAIL")
            .unwrap_or_default()
            .split(|c: char| c == ',' || c.is_whitespace())
            .filter(|a| !a.is_empty())
            .map(str::to_string)
            .collect();
        if let Some(bad) = admin_mail.iter().find(|a| !plain_address(a)) {
            return Err(g.err("ADMIN_MAIL", format!("{bad:?} is not a plain address (user@domain)")));
        }
        let host = host_name();
        let mail_from = g
            .optional("MAIL_FROM")
            .unwrap_or_else(|| format!("rabbit2packer@{host}"));
        if !plain_address(&mail_from) {
            return Err(g.err(
                "MAIL_FROM",
                format!("{mail_from:?} is not a plain address (user@domain)"),
            ));
        }
        let sendmail = g.optional_path("SENDMAIL_PATH");
        let server = g.optional("SMTP_SERVER");
        let user = g.optional("SMTP_USER");
        let password = g.optional("SMTP_PASSWORD");
        let mail_transport = match (sendmail, server) {
            (Some(_), Some(_)) => {
                return Err(g.err("SENDMAIL_PATH", "set SMTP_SERVER or SENDMAIL_PATH, not both"));
            }
            (Some(path), None) => MailTransport::Sendmail(path),
            (None, server) => {
                let server = server.unwrap_or_else(|| "localhost:25".to_string());
                let (host, port) = match server.rsplit_once(':') {
                    Some((h, p)) if !h.contains(':') || h.starts_with('[') => {
                        let port = p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| {
                            g.err(
                                "SMTP_SERVER",
                                format!("{server:?}: the port must be a TCP port number (1-65535)"),
                            )
                        })?;
                        (h.trim_start_matches('[').trim_end_matches(']').to_string(), port)
                    }
                    _ => (server.clone(), 25),
                };
                if host.is_empty() || host.chars().any(|c| c.is_whitespace() || c.is_control()) {
                    return Err(g.err("SMTP_SERVER", format!("{server:?} is not host[:port]")));
                }
                let credentials = match (user, password) {
                    (Some(u), Some(p)) => Some((u, p)),
                    (None, None) => None,
                    (Some(_), None) => return Err(g.err("SMTP_PASSWORD", "missing (SMTP_USER is set)")),
                    (None, Some(_)) => return Err(g.err("SMTP_USER", "missing (SMTP_PASSWORD is set)")),
                };
                MailTransport::Smtp {
                    host,
                    port,
                    credentials,
                }
            }
        };
        let webhook = match g.optional("ALERT_WEBHOOK") {
            Some(_) => {
                let u = g.url("ALERT_WEBHOOK")?;
                if !matches!(u.scheme(), "http" | "https") {
                    return Err(g.err("ALERT_WEBHOOK", "must be an http:// or https:// URL"));
                }
                Some(u)
            }
            None => None,
        };
        let status = status_from(&self.section("rabbit2packer"))?;
        let status_url = status.public_url(status.listen.map_or(DEFAULT_STATUS_PORT, |a| a.port()));
        Ok(AlertsConfig {
            admin_mail,
            mail_from,
            mail_transport,
            webhook,
            status_url,
        })
    }

    /// Only the rotation keys of `[rabbit2packer]` (for `rename-old-images`,
    /// which does not need the rest of the section). A missing section gives
    /// the defaults.
    pub fn rotation(&self) -> Result<RotationConfig> {
        rotation_from(&self.section("rabbit2packer"))
    }
}

fn rotation_from(s: &Section<'_>) -> Result<RotationConfig> {
    let admin_auth_file = match s.optional_path("PACKER_ADMIN_AUTH_FILE") {
        Some(p) => {
            s.must_exist("PACKER_ADMIN_AUTH_FILE", &p)?;
            Some(p)
        }
        None => Some(PathBuf::from(DEFAULT_ADMIN_AUTH_FILE)).filter(|p| p.exists()),
    };
    let archive_name = s
        .optional("ARCHIVE_NAME")
        .unwrap_or_else(|| DEFAULT_ARCHIVE_NAME.to_string());
    check_archive_name(&archive_name).map_err(|p| s.err("ARCHIVE_NAME", p))?;
    let broken_name = s
        .optional("BROKEN_NAME")
        .unwrap_or_else(|| DEFAULT_BROKEN_NAME.to_string());
    check_archive_name(&broken_name).map_err(|p| s.err("BROKEN_NAME", p))?;
    let hide_archived = s
        .parse_optional("HIDE_ARCHIVED", "true or false", parse_bool)?
        .unwrap_or(false);
    let keep_archives = s.parse_optional("KEEP_ARCHIVES", "a whole number >= 1", |v| {
        v.parse::<u32>().ok().filter(|n| *n >= 1)
    })?;
    Ok(RotationConfig {
        admin_auth_file,
        archive_name,
        hide_archived,
        keep_archives,
        broken_name,
    })
}

fn site_from(s: &Section<'_>) -> Result<Option<SiteConfig>> {
    let password_file = s.optional_path("STATE_DB_PASSWORD_FILE");
    let job_lease = s.positive_duration_optional("JOB_LEASE")?;
    if job_lease.is_some_and(|l| l < Duration::from_secs(1)) {
        // Renewed every third of it: less than a second would be a busy loop.
        return Err(s.err("JOB_LEASE", "must be at least 1 s"));
    }
    let host_name = s.optional("HOST_NAME");
    if let Some(h) = &host_name {
        if h.len() > 255 || h.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(s.err("HOST_NAME", "must be one word of at most 255 characters"));
        }
    }
    let Some(url) = s.optional("STATE_DB") else {
        return Ok(None);
    };
    if !(url.starts_with("postgresql://") || url.starts_with("postgres://")) {
        return Err(s.err(
            "STATE_DB",
            "must be a postgresql:// URL (unset: the SQLite journal in STATE_DIR)",
        ));
    }
    if let Some(p) = &password_file {
        s.must_exist("STATE_DB_PASSWORD_FILE", p)?;
    }
    Ok(Some(SiteConfig {
        url,
        password_file,
        job_lease: job_lease.unwrap_or(DEFAULT_JOB_LEASE),
        host_name,
    }))
}

fn gate_from(s: &Section<'_>) -> Result<GateConfig> {
    let test_command = s.optional("TEST_COMMAND").filter(|c| !c.trim().is_empty());
    let test_timeout = s
        .duration_optional("TEST_TIMEOUT")?
        .unwrap_or(Duration::from_secs(3600));
    let staged_name = s
        .optional("STAGED_NAME")
        .unwrap_or_else(|| DEFAULT_STAGED_NAME.to_string());
    check_archive_name(&staged_name).map_err(|p| s.err("STAGED_NAME", p))?;
    Ok(GateConfig {
        test_command,
        test_timeout,
        staged_name,
    })
}

fn status_from(s: &Section<'_>) -> Result<StatusConfig> {
    // Present but empty turns the server off; absent gives the default.
    let listen = match s.raw("STATUS_LISTEN") {
        None => DEFAULT_STATUS_LISTEN.parse().ok(),
        Some("") => None,
        Some(v) => Some(v.parse::<std::net::SocketAddr>().map_err(|_| {
            s.err(
                "STATUS_LISTEN",
                format!("must be an address and port such as 127.0.0.1:8150 or [::]:8150, got {v:?}"),
            )
        })?),
    };
    let url = match s.optional("STATUS_URL") {
        None => None,
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => Some(u),
        Some(u) => {
            return Err(s.err(
                "STATUS_URL",
                format!("must be an http:// or https:// address, got {u:?}"),
            ))
        }
    };
    Ok(StatusConfig { listen, url })
}

/// ARCHIVE_NAME must say which image it archived (`{name}`) and may use only
/// the placeholders we fill in.
fn check_archive_name(template: &str) -> std::result::Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            return Err(format!("unclosed '{{' in {template:?}"));
        };
        let placeholder = &rest[open + 1..open + close];
        if !matches!(placeholder, "name" | "date" | "datetime") {
            return Err(format!(
                "unknown placeholder {{{placeholder}}} in {template:?}; use {{name}}, {{date}}, {{datetime}}"
            ));
        }
        rest = &rest[open + close + 1..];
    }
    if !template.contains("{name}") {
        return Err(format!("{template:?} must contain {{name}}"));
    }
    if template == "{name}" {
        return Err("must differ from the image name".to_string());
    }
    Ok(())
}

/// Resolves the config path: `--config` > `$PACKER_UTILS_CONFIG` > default.
pub fn resolve_path(cli: Option<PathBuf>) -> PathBuf {
    cli.or_else(|| {
        std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| PathBuf::from(DEFAULT_CONFIG_PATH))
}

/// `true/false`, `yes/no`, `on/off`, `1/0`, as ConfigParser's getboolean.
pub fn parse_bool(v: &str) -> Option<bool> {
    match v.to_ascii_lowercase().as_str() {
        "1" | "yes" | "true" | "on" => Some(true),
        "0" | "no" | "false" | "off" => Some(false),
        _ => None,
    }
}

/// Seconds (`90`, `0.5`) or a duration with units (`90s`, `5m`, `6h`, `1h 30m`).
pub fn parse_duration(v: &str) -> Option<Duration> {
    if let Ok(secs) = v.parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    humantime::parse_duration(v).ok()
}

fn positive_usize(v: &str) -> Option<usize> {
    v.parse::<usize>().ok().filter(|n| *n >= 1)
}

/// One section being read: values are trimmed; empty optional values count
/// as unset; keys missing here come from `[DEFAULT]`, as in ConfigParser.
struct Section<'a> {
    file: &'a Path,
    name: &'static str,
    props: Option<&'a Properties>,
    defaults: Option<&'a Properties>,
    duplicates: &'a [(String, String, String)],
}

impl Section<'_> {
    fn err(&self, key: &str, problem: impl Into<String>) -> ConfigError {
        ConfigError::new(self.file, Some(self.name), Some(key), problem)
    }

    fn require_present(&self) -> Result<()> {
        if self.props.is_none() {
            return Err(ConfigError::new(self.file, Some(self.name), None, "section is missing"));
        }
        Ok(())
    }

    fn raw(&self, key: &str) -> Option<&str> {
        // The last of a key given twice wins (see `check_lines`).
        self.props
            .and_then(|p| p.get_all(key).last())
            .or_else(|| self.defaults.and_then(|p| p.get_all(key).last()))
            .map(str::trim)
    }

    fn required(&self, key: &str) -> Result<String> {
        self.raw(key)
            .map(str::to_string)
            .ok_or_else(|| self.err(key, "missing (this key is required)"))
    }

    fn required_nonempty(&self, key: &str) -> Result<String> {
        let v = self.required(key)?;
        if v.is_empty() {
            return Err(self.err(key, "is empty (a value is required)"));
        }
        Ok(v)
    }

    fn optional(&self, key: &str) -> Option<String> {
        self.raw(key).filter(|v| !v.is_empty()).map(str::to_string)
    }

    fn optional_path(&self, key: &str) -> Option<PathBuf> {
        self.optional(key).map(PathBuf::from)
    }

    fn parse_required<T>(&self, key: &str, what: &str, parse: impl Fn(&str) -> Option<T>) -> Result<T> {
        let v = self.required_nonempty(key)?;
        parse(&v).ok_or_else(|| self.err(key, format!("must be {what}, got {v:?}")))
    }

    fn parse_optional<T>(&self, key: &str, what: &str, parse: impl Fn(&str) -> Option<T>) -> Result<Option<T>> {
        match self.optional(key) {
            None => Ok(None),
            Some(v) => parse(&v)
                .map(Some)
                .ok_or_else(|| self.err(key, format!("must be {what}, got {v:?}"))),
        }
    }

    fn duration_optional(&self, key: &str) -> Result<Option<Duration>> {
        self.parse_optional(
            key,
            "a duration in seconds or with units (e.g. 90, 2.5, 5m, 6h)",
            parse_duration,
        )
    }

    /// A duration that must not be zero (a timeout of nothing fails everything).
    fn positive_duration_optional(&self, key: &str) -> Result<Option<Duration>> {
        self.parse_optional(
            key,
            "a duration above zero, in seconds or with units (e.g. 90, 2.5, 5m)",
            |v| parse_duration(v).filter(|d| !d.is_zero()),
        )
    }

    fn url(&self, key: &str) -> Result<url::Url> {
        let v = self.required_nonempty(key)?;
        let u = url::Url::parse(&v).map_err(|e| self.err(key, format!("not a valid URL ({e}): {v:?}")))?;
        if !matches!(u.scheme(), "http" | "https" | "file") {
            return Err(self.err(key, format!("URL scheme must be http, https or file: {v:?}")));
        }
        Ok(u)
    }

    fn must_exist(&self, key: &str, path: &Path) -> Result<()> {
        match std::fs::metadata(path) {
            Ok(_) => Ok(()),
            Err(e) => Err(self.err(key, format!("{}: {e}", path.display()))),
        }
    }

    /// Unknown keys, and keys set twice, as warnings.
    fn unknown_keys(&self, known: &[&str], tolerated: impl Fn(&str) -> bool) -> Vec<String> {
        let Some(props) = self.props else { return Vec::new() };
        let twice = self
            .duplicates
            .iter()
            .filter(|(section, _, _)| section.eq_ignore_ascii_case(self.name))
            .map(|(_, _, warning)| warning.clone());
        let mut seen = Vec::new();
        let unknown = props
            .iter()
            .map(|(k, _)| k)
            .filter(|k| !known.iter().any(|n| n.eq_ignore_ascii_case(k)) && !tolerated(k))
            .map(|k| {
                format!(
                    "{}: [{}] {}: unknown key, ignored",
                    self.file.display(),
                    self.name,
                    k.to_ascii_uppercase()
                )
            })
            // A key set twice is listed twice by ini.
            .filter(|w| {
                let new = !seen.contains(w);
                seen.push(w.clone());
                new
            });
        twice.chain(unknown.collect::<Vec<_>>()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "\
# the original's file
[global]
queue = build-queue
RABBIT_HOST: localhost
rabbit_port = 5672
RABBIT_USER = guest
; comment
RABBIT_PW = p#ss;word
ADMIN_MAIL = ops@example.org

[cdb2rabbit]
PROFILE_INFO_URL = http://aquilon.example.org/profiles/profiles-info.xml
PROFILE_DIR_URL = http://aquilon.example.org/profiles
PROFILE_MATCH =
CACHE_DIR = /etc/packer-utils/profiles/
";

    fn load(text: &str) -> IniFile {
        IniFile::parse(Path::new("/etc/packer-utils/config.ini"), text).unwrap()
    }

    #[test]
    fn reads_the_originals_file() {
        let f = load(GOOD);
        let mut w = Vec::new();
        let g = f.global(&mut w).unwrap();
        assert_eq!(g.queue, "build-queue");
        assert_eq!(
            g.rabbit.nodes,
            [RabbitNode {
                host: "localhost".into(),
                port: 5672
            }]
        );
        assert_eq!(g.queue_type, QueueType::Classic);
        assert_eq!(g.rabbit.password, "p#ss;word");
        assert_eq!(g.rabbit.vhost, "/");
        assert_eq!(g.rabbit.retries, 10);
        assert_eq!(g.rabbit.retry_delay, Duration::from_secs(2));
        assert_eq!(g.rabbit.connect_timeout, Duration::from_secs(30));
        assert_eq!(g.publish_timeout, Duration::from_secs(60));
        let c = f.cdb2rabbit(&mut w).unwrap();
        assert_eq!(c.profile_match, "");
        assert_eq!(c.profile_dir_url.as_str(), "http://aquilon.example.org/profiles/");
        assert_eq!(c.download_concurrency, 8);
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn alert_keys_have_defaults_and_bad_values_are_named() {
        let a = load(GOOD).alerts().unwrap();
        assert_eq!(a.admin_mail, vec!["ops@example.org"]);
        assert!(a.mail_from.starts_with("rabbit2packer@"), "{}", a.mail_from);
        assert!(
            matches!(&a.mail_transport, MailTransport::Smtp { host, port: 25, credentials: None } if host == "localhost")
        );
        assert!(a.webhook.is_none());
        assert!(a.status_url.ends_with(":8150/"), "{}", a.status_url);
        let with = |lines: &str| load(&GOOD.replace("[cdb2rabbit]", &format!("{lines}\n[cdb2rabbit]"))).alerts();
        let a = with(
            "ADMIN_MAIL = a@x.org,b@y.org  c@z.org\nSMTP_SERVER = mail.x.org:587\nSMTP_USER = u\nSMTP_PASSWORD = p",
        )
        .unwrap();
        assert_eq!(a.admin_mail, vec!["a@x.org", "b@y.org", "c@z.org"]);
        assert!(matches!(
            &a.mail_transport,
            MailTransport::Smtp {
                port: 587,
                credentials: Some(_),
                ..
            }
        ));
        assert!(!format!("{a:?}").contains("\"p\""), "the password is not shown");
        for (line, key) in [
            ("ADMIN_MAIL = Ops <ops@x.org>", "ADMIN_MAIL"),
            ("MAIL_FROM = nobody", "MAIL_FROM"),
            ("SMTP_SERVER = mail:0", "SMTP_SERVER"),
            ("SMTP_USER = u", "SMTP_PASSWORD"),
            ("SENDMAIL_PATH = /usr/sbin/sendmail\nSMTP_SERVER = m", "SENDMAIL_PATH"),
            ("ALERT_WEBHOOK = ftp://x/", "ALERT_WEBHOOK"),
        ] {
            let e = with(line).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{line}: {e}");
        }
        let mut w = Vec::new();
        with("SMTP_SERVER = m\nALERT_WEBHOOK = https://chat/hook").unwrap();
        load(&GOOD.replace(
            "[cdb2rabbit]",
            "SMTP_SERVER = m\nALERT_WEBHOOK = https://chat/h\n[cdb2rabbit]",
        ))
        .global(&mut w)
        .unwrap();
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn missing_key_names_file_section_and_key() {
        let f = load(&GOOD.replace("RABBIT_HOST: localhost\n", ""));
        let e = f.global(&mut Vec::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/packer-utils/config.ini: [global] RABBIT_HOST: missing (this key is required)"
        );
    }

    #[test]
    fn bad_values_are_named() {
        let f = load(&GOOD.replace("rabbit_port = 5672", "rabbit_port = 56x72"));
        let e = f.global(&mut Vec::new()).unwrap_err();
        assert!(
            e.to_string().contains("[global] RABBIT_PORT: must be a TCP port"),
            "{e}"
        );
        let f = load(&format!("{GOOD}DOWNLOAD_CONCURRENCY = 0\n"));
        let e = f.cdb2rabbit(&mut Vec::new()).unwrap_err();
        assert!(e.to_string().contains("[cdb2rabbit] DOWNLOAD_CONCURRENCY"), "{e}");
    }

    #[test]
    fn site_journal_keys_have_defaults_and_bad_values_are_named() {
        let section = |lines: &str| load(&format!("{GOOD}\n[rabbit2packer]\n{lines}\n"));
        assert_eq!(
            site_from(&section("JOB_LEASE = 5s").section("rabbit2packer")).unwrap(),
            None
        );
        let f = section("STATE_DB = postgresql://packuilon@db.example.org/packuilon?sslmode=require");
        let site = site_from(&f.section("rabbit2packer")).unwrap().unwrap();
        assert_eq!(
            site.url,
            "postgresql://packuilon@db.example.org/packuilon?sslmode=require"
        );
        assert_eq!(site.job_lease, DEFAULT_JOB_LEASE);
        assert_eq!((site.password_file, site.host_name), (None, None));
        let f = section("STATE_DB = postgres://db/p\nJOB_LEASE = 2m\nHOST_NAME = factory-2");
        let site = site_from(&f.section("rabbit2packer")).unwrap().unwrap();
        assert_eq!(site.job_lease, Duration::from_secs(120));
        assert_eq!(site.host_name.as_deref(), Some("factory-2"));
        for (lines, key) in [
            ("STATE_DB = /var/lib/packuilon/journal.db", "STATE_DB"),
            ("STATE_DB = postgres://db/p\nJOB_LEASE = 0", "JOB_LEASE"),
            ("STATE_DB = postgres://db/p\nJOB_LEASE = soon", "JOB_LEASE"),
            ("STATE_DB = postgres://db/p\nJOB_LEASE = 200ms", "JOB_LEASE"),
            ("STATE_DB = postgres://db/p\nHOST_NAME = two words", "HOST_NAME"),
            (
                "STATE_DB = postgres://db/p\nSTATE_DB_PASSWORD_FILE = /nonexistent/pw",
                "STATE_DB_PASSWORD_FILE",
            ),
        ] {
            let e = site_from(&section(lines).section("rabbit2packer")).unwrap_err();
            assert!(
                e.to_string().contains(&format!("[rabbit2packer] {key}: ")),
                "{lines}: {e}"
            );
        }
    }

    #[test]
    fn gate_and_broken_name_keys_have_defaults_and_bad_values_are_named() {
        let section = |lines: &str| load(&format!("{GOOD}\n[rabbit2packer]\n{lines}\n"));
        let d = section("");
        let g = gate_from(&d.section("rabbit2packer")).unwrap();
        assert_eq!(g, GateConfig::default());
        assert_eq!(g.test_command, None);
        assert_eq!(g.test_timeout, Duration::from_secs(3600));
        assert_eq!(d.rotation().unwrap().broken_name, "broken-{name} {datetime}");
        let f = section(
            "TEST_COMMAND = /usr/local/bin/boot-test --flavor m1\nTEST_TIMEOUT = 20m\nSTAGED_NAME = staging {name}",
        );
        let g = gate_from(&f.section("rabbit2packer")).unwrap();
        assert_eq!(g.test_command.as_deref(), Some("/usr/local/bin/boot-test --flavor m1"));
        assert_eq!(g.test_timeout, Duration::from_secs(1200));
        assert_eq!(g.staged_name, "staging {name}");
        assert_eq!(
            gate_from(&section("TEST_COMMAND =   ").section("rabbit2packer"))
                .unwrap()
                .test_command,
            None
        );
        for (line, key) in [
            ("STAGED_NAME = {name}", "STAGED_NAME"),
            ("STAGED_NAME = next", "STAGED_NAME"),
            ("TEST_TIMEOUT = soon", "TEST_TIMEOUT"),
        ] {
            let e = gate_from(&section(line).section("rabbit2packer")).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(key), "{line}: {e}");
        }
        let e = section("BROKEN_NAME = broken {when}").rotation().unwrap_err();
        assert_eq!(e.key.as_deref(), Some("BROKEN_NAME"), "{e}");
    }

    #[test]
    fn status_listen_defaults_to_loopback_8150_and_empty_turns_it_off() {
        let status = |lines: &str| {
            let f = load(&format!("{GOOD}\n[rabbit2packer]\n{lines}\n"));
            status_from(&f.section("rabbit2packer"))
        };
        let d = status("").unwrap();
        assert_eq!(d.listen, Some("127.0.0.1:8150".parse().unwrap()));
        assert_eq!(d.url, None);
        assert_eq!(status("STATUS_LISTEN =").unwrap().listen, None);
        let s = status("STATUS_LISTEN = [::]:9000\nSTATUS_URL = https://img.example.org/p/").unwrap();
        assert_eq!(s.listen, Some("[::]:9000".parse().unwrap()));
        assert_eq!(s.url.as_deref(), Some("https://img.example.org/p/"));
        let e = status("STATUS_LISTEN = localhost").unwrap_err();
        assert!(
            e.to_string()
                .contains("[rabbit2packer] STATUS_LISTEN: must be an address"),
            "{e}"
        );
        let e = status("STATUS_URL = img.example.org").unwrap_err();
        assert!(e.to_string().contains("[rabbit2packer] STATUS_URL"), "{e}");
    }

    #[test]
    fn broker_timeouts_are_durations_above_zero() {
        let with = |lines: &str| load(&GOOD.replace("[cdb2rabbit]", &format!("{lines}\n[cdb2rabbit]")));
        let g = with("PUBLISH_TIMEOUT = 2m\nRABBIT_CONNECT_TIMEOUT = 2.5")
            .global(&mut Vec::new())
            .unwrap();
        assert_eq!(g.publish_timeout, Duration::from_secs(120));
        assert_eq!(g.rabbit.connect_timeout, Duration::from_millis(2500));
        for (line, key) in [
            ("PUBLISH_TIMEOUT = 0", "PUBLISH_TIMEOUT"),
            ("PUBLISH_TIMEOUT = soon", "PUBLISH_TIMEOUT"),
            ("RABBIT_CONNECT_TIMEOUT = 0s", "RABBIT_CONNECT_TIMEOUT"),
        ] {
            let e = with(line).global(&mut Vec::new()).unwrap_err();
            assert!(
                e.to_string().starts_with(&format!(
                    "/etc/packer-utils/config.ini: [global] {key}: must be a duration above zero"
                )),
                "{e}"
            );
        }
    }

    #[test]
    fn missing_section_is_named() {
        let f = load("[global]\n");
        let e = f.cdb2rabbit(&mut Vec::new()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/packer-utils/config.ini: [cdb2rabbit] section is missing"
        );
    }

    #[test]
    fn unknown_keys_are_warnings() {
        let f = load(&format!("{GOOD}PROFILE_MACTH = ci\n"));
        let mut w = Vec::new();
        f.cdb2rabbit(&mut w).unwrap();
        assert_eq!(w.len(), 1);
        assert!(w[0].contains("[cdb2rabbit] PROFILE_MACTH: unknown key"), "{w:?}");
    }

    #[test]
    fn a_byte_order_mark_is_ignored() {
        let f = load(&format!("\u{feff}{GOOD}"));
        assert_eq!(f.global(&mut Vec::new()).unwrap().queue, "build-queue");
    }

    #[test]
    fn crlf_line_endings_and_tabs_are_read() {
        let f = load(&GOOD.replace(" = ", "\t=\t").replace('\n', "\r\n"));
        let g = f.global(&mut Vec::new()).unwrap();
        assert_eq!(g.rabbit.password, "p#ss;word");
        assert_eq!(
            f.cdb2rabbit(&mut Vec::new()).unwrap().cache_dir,
            Path::new("/etc/packer-utils/profiles/")
        );
    }

    #[test]
    fn default_section_values_are_inherited_as_configparser_does() {
        let f = load(&format!(
            "[DEFAULT]\nRABBIT_HOST = rabbit.example.org\n{}",
            GOOD.replace("RABBIT_HOST: localhost\n", "")
        ));
        assert_eq!(
            f.global(&mut Vec::new()).unwrap().rabbit.nodes[0].host,
            "rabbit.example.org"
        );
    }

    #[test]
    fn rabbit_host_takes_a_list_of_nodes_with_rabbit_port_as_their_default() {
        let with_host = |hosts: &str| load(&GOOD.replace("RABBIT_HOST: localhost", &format!("RABBIT_HOST: {hosts}")));
        let nodes = |hosts: &str| {
            with_host(hosts)
                .global(&mut Vec::new())
                .unwrap()
                .rabbit
                .nodes
                .into_iter()
                .map(|n| (n.host, n.port))
                .collect::<Vec<_>>()
        };
        let owned = |v: &[(&str, u16)]| v.iter().map(|(h, p)| (h.to_string(), *p)).collect::<Vec<_>>();
        assert_eq!(
            nodes("rabbit1.example.org, rabbit2.example.org:5673 ,10.0.0.3"),
            owned(&[
                ("rabbit1.example.org", 5672),
                ("rabbit2.example.org", 5673),
                ("10.0.0.3", 5672)
            ])
        );
        assert_eq!(
            nodes("[::1]:5673,[fe80::1],::1"),
            owned(&[("::1", 5673), ("fe80::1", 5672), ("::1", 5672)])
        );
        // Every node names its port: RABBIT_PORT may be left out.
        let f = load(
            &GOOD
                .replace("RABBIT_HOST: localhost", "RABBIT_HOST = a:5701, b:5702")
                .replace("rabbit_port = 5672\n", ""),
        );
        let g = f.global(&mut Vec::new()).unwrap();
        assert_eq!(g.rabbit.nodes.iter().map(|n| n.port).collect::<Vec<_>>(), [5701, 5702]);
        // A node without one needs it.
        let f = load(
            &GOOD
                .replace("RABBIT_HOST: localhost", "RABBIT_HOST = a:5701, b")
                .replace("rabbit_port = 5672\n", ""),
        );
        let e = f.global(&mut Vec::new()).unwrap_err();
        assert_eq!(e.key.as_deref(), Some("RABBIT_PORT"), "{e}");
        for bad in ["a,,b", "a,", " , a", "a:0", "a:x", "a b", "[::1", ":5672", "amqp://a"] {
            let e = with_host(bad).global(&mut Vec::new()).unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("/etc/packer-utils/config.ini: [global] RABBIT_HOST: "),
                "{bad:?}: {e}"
            );
        }
        let e = with_host("a,,b").global(&mut Vec::new()).unwrap_err();
        assert!(e.problem.contains("entry 2 is empty"), "{e}");
    }

    #[test]
    fn queue_type_is_classic_or_quorum() {
        let with = |line: &str| load(&GOOD.replace("[cdb2rabbit]", &format!("{line}\n[cdb2rabbit]")));
        let mut w = Vec::new();
        assert_eq!(
            with("QUEUE_TYPE = quorum").global(&mut w).unwrap().queue_type,
            QueueType::Quorum
        );
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            with("QUEUE_TYPE = Classic").global(&mut w).unwrap().queue_type,
            QueueType::Classic
        );
        assert_eq!(
            with("QUEUE_TYPE =").global(&mut w).unwrap().queue_type,
            QueueType::Classic
        );
        let e = with("QUEUE_TYPE = stream").global(&mut w).unwrap_err();
        assert_eq!(
            e.to_string(),
            "/etc/packer-utils/config.ini: [global] QUEUE_TYPE: must be classic or quorum, got \"stream\""
        );
    }

    #[test]
    fn percent_signs_follow_configparser_interpolation() {
        // The original (Python's SafeConfigParser) needed `%%` for a `%`.
        let f = load(&GOOD.replace("RABBIT_PW = p#ss;word", "RABBIT_PW = 50%%off"));
        assert_eq!(f.global(&mut Vec::new()).unwrap().rabbit.password, "50%off");
        let f = load(&GOOD.replace("RABBIT_PW = p#ss;word", "RABBIT_PW = a%b"));
        assert_eq!(f.global(&mut Vec::new()).unwrap().rabbit.password, "a%b");
        let f = load(&GOOD.replace(
            "PROFILE_DIR_URL = http://aquilon.example.org/profiles",
            "BASE = http://aquilon.example.org\nPROFILE_DIR_URL = %(base)s/profiles",
        ));
        let mut w = Vec::new();
        let c = f.cdb2rabbit(&mut w).unwrap();
        assert_eq!(c.profile_dir_url.as_str(), "http://aquilon.example.org/profiles/");
        let e = IniFile::parse(
            Path::new("/etc/packer-utils/config.ini"),
            &GOOD.replace("RABBIT_PW = p#ss;word", "RABBIT_PW = %(nope)s"),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .contains("[global] RABBIT_PW: %(nope)s refers to a key that is not set"),
            "{e}"
        );
    }

    #[test]
    fn a_key_given_twice_uses_the_last_and_warns_naming_both_lines() {
        let f = load(&format!("{GOOD}CACHE_DIR = /srv/cache\n"));
        let mut w = Vec::new();
        assert_eq!(f.cdb2rabbit(&mut w).unwrap().cache_dir, Path::new("/srv/cache"));
        assert_eq!(
            w,
            [
                "/etc/packer-utils/config.ini: [cdb2rabbit] CACHE_DIR: set on line 15 and again on line 16; \
              the last one is used"
            ]
        );
        let mut w = Vec::new();
        f.global(&mut w).unwrap();
        assert!(w.is_empty(), "{w:?}");
        let e = IniFile::parse(Path::new("c.ini"), &format!("{GOOD}[global]\nQUEUE = q\n")).unwrap_err();
        assert!(
            e.to_string()
                .contains("section [global] appears again (first on line 2)"),
            "{e}"
        );
    }

    #[test]
    fn a_line_without_equals_is_named_not_glued_to_the_next_section() {
        let text = GOOD.replace("RABBIT_PW = p#ss;word\n", "RABBIT_PW = secret\n  continued\n");
        let e = IniFile::parse(Path::new("c.ini"), &text).unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.ini: [global] line 9: \"continued\" is not `KEY = value`, a [section] or a comment \
             (continuation lines are not supported)"
        );
        let e = IniFile::parse(Path::new("c.ini"), &GOOD.replace("PROFILE_MATCH =", "PROFILE_MATCH")).unwrap_err();
        assert!(
            e.to_string()
                .contains("[cdb2rabbit] line 14: \"PROFILE_MATCH\" is not `KEY = value`"),
            "{e}"
        );
        let e = IniFile::parse(Path::new("c.ini"), &format!("QUEUE = q\n{GOOD}")).unwrap_err();
        assert!(
            e.to_string().contains("QUEUE: line 1: key before any [section] header"),
            "{e}"
        );
    }

    #[test]
    fn indented_comments_do_not_swallow_the_next_key() {
        let f = load(
            &GOOD
                .replace("; comment\n", "  ; indented comment\n\t# tab-indented comment\n")
                .replace("[global]\n", "[global]   ; the queue and the broker\n"),
        );
        let mut w = Vec::new();
        let g = f.global(&mut w).unwrap();
        assert_eq!((g.rabbit.password.as_str(), w.len()), ("p#ss;word", 0));
    }

    #[test]
    fn a_query_in_profile_dir_url_is_refused_not_dropped() {
        for url in [
            "http://aquilon.example.org/profiles?token=abc",
            "http://aquilon.example.org/profiles/#top",
        ] {
            let f = load(&GOOD.replace("http://aquilon.example.org/profiles\n", &format!("{url}\n")));
            let e = f.cdb2rabbit(&mut Vec::new()).unwrap_err().to_string();
            assert!(
                e.contains("[cdb2rabbit] PROFILE_DIR_URL: a ?query or #fragment is not supported"),
                "{e}"
            );
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2"), Some(Duration::from_secs(2)));
        assert_eq!(parse_duration("0.25"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("6h"), Some(Duration::from_secs(21600)));
        assert_eq!(parse_duration("-1"), None);
        assert_eq!(parse_duration("soon"), None);
    }

    #[test]
    fn archive_names() {
        assert!(check_archive_name(DEFAULT_ARCHIVE_NAME).is_ok());
        assert!(check_archive_name("old {name} {datetime}").is_ok());
        assert!(check_archive_name("archive {date}").is_err());
        assert!(check_archive_name("{name} {when}").is_err());
        assert!(check_archive_name("{name}").is_err());
    }
}
