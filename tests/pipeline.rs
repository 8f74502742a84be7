//! End to end, every part real: an Aquilon site served over HTTP,
//! `cdb2rabbit` publishing to RabbitMQ, the `rabbit2packer` daemon building
//! with Debian's `packer`, and the rename-old-images step against a real
//! Keystone + Glance on loopback. The build's shell-local step creates the
//! image `$NAME` in that Glance, as the openstack builder would.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use packuilon_testsupport::broker::TestQueue;
use packuilon_testsupport::cloud::Cloud;
use packuilon_testsupport::http::ProfileServer;
use packuilon_testsupport::site::{profile, write_index};
use packuilon_testsupport::{unique_name, workspace_bin};
use serde_json::{json, Value};

const SOURCE_IMAGE: &str = "0b10e583-9e13-4878-9116-f4002846fa73";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn run(bin: &str, config: &Path, args: &[&str]) -> (i32, String) {
    let out = Command::new(workspace_bin(bin))
        .arg("--config")
        .arg(config)
        .arg("--log")
        .arg("stderr")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

fn history(config: &Path) -> Vec<Value> {
    let (code, out) = run("rabbit2packer", config, &["history", "--json"]);
    assert_eq!(code, 0, "{out}");
    let start = out
        .find('[')
        .unwrap_or_else(|| panic!("no JSON in history output: {out}"));
    serde_json::from_str(&out[start..]).unwrap_or_else(|e| panic!("history --json: {e}: {out}"))
}

struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    fn start(config: &Path, log: PathBuf) -> Daemon {
        let child = Command::new(workspace_bin("rabbit2packer"))
            .arg("--config")
            .arg(config)
            .arg("--log")
            .arg("stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Daemon { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM and wait: a clean stop exits 0.
    fn stop(mut self) -> i32 {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_profile_is_published_built_once_and_the_older_image_archived_with_its_members() {
    let cloud = Cloud::new().await;
    let owner = cloud.admin_project.clone();
    let personality = unique_name("e2e");
    let name = format!("sl7x-x86_64 {personality}");

    // What the cloud holds before: the previous image of that name, shared
    // with a project, and the managed build's "<name> AQ" image beside it.
    let older = cloud.image(&name, &owner, "shared").await;
    let consumer = cloud.project("e2e-consumer").await;
    cloud.share(&older.id, &consumer, "accepted").await;
    let aq = cloud.image(&format!("{name} AQ"), &owner, "shared").await;
    cloud.share(&aq.id, &consumer, "accepted").await;

    // The broker's site: this personality's CI profile and a plain host.
    let dir = tempfile::tempdir().unwrap();
    let site = dir.path().join("site");
    std::fs::create_dir_all(&site).unwrap();
    let ci = format!("{personality}-sl-7x-x86-64.ci.example.org.json");
    std::fs::write(site.join(&ci), profile(&personality, &["openssh-server"]).to_string()).unwrap();
    std::fs::write(
        site.join("node001.example.org.json"),
        profile("compute", &[]).to_string(),
    )
    .unwrap();
    write_index(
        &site,
        &[(&ci, 1_700_000_000), ("node001.example.org.json", 1_700_000_000)],
    );
    let server = ProfileServer::serve(&site);

    // Packuilon's files, as an operator lays them out.
    let queue = TestQueue::new("e2e-build-queue");
    let template = dir.path().join("glance-null.json");
    let text = std::fs::read_to_string(repo().join("templates/demo/glance-null.json")).unwrap();
    std::fs::write(
        &template,
        text.replace("@TEMPLATES@", &repo().join("templates").display().to_string()),
    )
    .unwrap();
    let map = dir.path().join("template-map.json");
    std::fs::write(&map, json!({"DEFAULT": [template]}).to_string()).unwrap();
    let images = dir.path().join("source-images.json");
    std::fs::write(&images, json!({"sl7x-x86_64": SOURCE_IMAGE}).to_string()).unwrap();
    for d in ["cache", "logs", "build-files", "state"] {
        std::fs::create_dir_all(dir.path().join(d)).unwrap();
    }
    let rc = cloud.openrc();
    let config = dir.path().join("config.ini");
    std::fs::write(
        &config,
        format!(
            "{global}\n[cdb2rabbit]\nPROFILE_INFO_URL = {index}\nPROFILE_DIR_URL = {base}\nPROFILE_MATCH = .ci.\n\
             CACHE_DIR = {d}/cache\n\n[rabbit2packer]\nTHREAD_COUNT = 2\nLOG_DIR = {d}/logs\n\
             BUILD_FILE_DIR = {d}/build-files\nSTATE_DIR = {d}/state\nPACKER_AUTH_FILE = {rc}\n\
             PACKER_ADMIN_AUTH_FILE = {rc}\nPACKER_TEMPLATE_MAP = {map}\nIMAGES_CONFIG = {images}\n\
             STATUS_LISTEN = 127.0.0.1:0\n",
            global = queue.broker.global_section(&queue.name),
            index = server.url("profiles-info.xml"),
            base = server.base,
            d = dir.path().display(),
            rc = rc.display(),
            map = map.display(),
            images = images.display(),
        ),
    )
    .unwrap();

    // First run: the baseline, nothing published.
    let (code, out) = run("cdb2rabbit", &config, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Cached info file does not exist, creating one and exiting"),
        "{out}"
    );
    assert_eq!(queue.broker.message_count(&queue.name).await.unwrap_or(0), 0);

    // The daemon is up and idle before the change arrives.
    let daemon = Daemon::start(&config, dir.path().join("rabbit2packer.log"));

    // The CI profile changes on the broker.
    std::fs::write(
        site.join(&ci),
        profile(&personality, &["openssh-server", "htop"]).to_string(),
    )
    .unwrap();
    write_index(
        &site,
        &[(&ci, 1_700_000_600), ("node001.example.org.json", 1_700_000_000)],
    );
    let (code, out) = run("cdb2rabbit", &config, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(&format!("Profile has updated: {ci}")), "{out}");
    assert!(out.contains("Pushing message to queue for build"), "{out}");
    assert!(!out.contains("node001"), "a non-CI profile was looked at: {out}");

    // rabbit2packer builds it and rotates.
    let deadline = Instant::now() + Duration::from_secs(180);
    let job = loop {
        let jobs = history(&config);
        if let Some(job) = jobs
            .into_iter()
            .find(|j| j["state"] == "succeeded" || j["state"] == "failed")
        {
            break job;
        }
        assert!(
            Instant::now() < deadline,
            "no finished build after 3 min; daemon log:\n{}",
            daemon.log()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let log = daemon.log();
    assert_eq!(job["state"], "succeeded", "{job:#}\n{log}");
    assert_eq!(job["image_key"], format!("{personality}-sl7x-x86_64"));
    assert_eq!(job["profile"], ci.as_str());
    assert!(
        log.contains(&format!(
            "image built successfully: {personality}-sl7x-x86_64.glance-null.json"
        )),
        "{log}"
    );

    // The build log, under the name and with the trailer operators know.
    let build = &job["builds"][0];
    let build_log = std::fs::read_to_string(build["log_path"].as_str().unwrap()).unwrap();
    assert!(
        build_log.contains(&format!("building {name} from source image {SOURCE_IMAGE}")),
        "{build_log}"
    );
    assert!(build_log.trim_end().ends_with("with exit code 0"), "{build_log}");

    // Glance: one image of that name (the new one), the older one archived
    // under the original's name, its member moved and accepted; the AQ
    // image of the managed build untouched.
    let current = cloud.named(&name, &owner).await;
    assert_eq!(current.len(), 1, "{current:?}");
    let new = &current[0];
    assert_ne!(new.id, older.id);
    let archived = cloud.get(&older.id).await;
    let today = chrono::Utc::now().format("%Y-%m-%d");
    assert_eq!(archived.name(), format!("archive-{name} {today}"));
    assert!(cloud.members(&older.id).await.is_empty());
    assert_eq!(
        cloud.members(&new.id).await.get(&consumer).map(String::as_str),
        Some("accepted")
    );
    assert_eq!(cloud.get(&aq.id).await.name(), format!("{name} AQ"));
    assert_eq!(
        cloud.members(&aq.id).await.get(&consumer).map(String::as_str),
        Some("accepted")
    );

    // Nothing changed since: the next run publishes nothing, nothing is rebuilt.
    let (code, out) = run("cdb2rabbit", &config, &[]);
    assert_eq!(code, 0, "{out}");
    assert!(!out.contains("Pushing message"), "{out}");
    assert_eq!(history(&config).len(), 1);

    assert_eq!(daemon.stop(), 0);
    cloud.glance.delete_image(&new.id).await.unwrap();
    cloud.cleanup().await;
}
