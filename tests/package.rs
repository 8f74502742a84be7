//! The Debian package as an operator meets it. `make test` builds it first
//! (`make deb`) and names it in `PACKUILON_TEST_DEB`; these tests check it
//! with `lintian`, install it with `dpkg -i` on this machine (the test run
//! is root), look at what landed where with which owner and mode, verify
//! the units with `systemd-analyze verify`, run the installed binaries,
//! upgrade it over itself with an operator's edit in config.ini, remove it,
//! and purge it. Installing is global to the machine, so the life cycle is
//! one test, in order.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use packuilon_testsupport::command::{ok, run as sh};

const BINARIES: [&str; 3] = ["cdb2rabbit", "rabbit2packer", "rename-old-images"];
const UNITS: [&str; 3] = ["rabbit2packer.service", "cdb2rabbit.service", "cdb2rabbit.timer"];
const CONFFILES: [&str; 3] = [
    "/etc/packer-utils/config.ini",
    "/etc/packer-utils/template-map.json",
    "/etc/packer-utils/source-images.json",
];
/// Directories of the shipped config, owned by the packuilon user.
const OWNED_DIRS: [&str; 5] = [
    "/var/lib/packuilon",
    "/var/lib/packuilon/build-files",
    "/var/cache/packuilon",
    "/var/cache/packuilon/profiles",
    "/var/log/packer-utils",
];

/// lintian warnings accepted, each with its reason in README ("Install the
/// package"). Any other warning, and every error, fails the test.
const ACCEPTED_WARNINGS: [&str; 1] = [
    // config.ini holds RABBIT_PW: root:packuilon 0640 on purpose.
    "non-standard-file-perm",
];

fn deb() -> PathBuf {
    let deb = std::env::var_os("PACKUILON_TEST_DEB")
        .map(PathBuf::from)
        .expect("PACKUILON_TEST_DEB is not set: run `make test` (it builds the package with `make deb` first)");
    assert!(deb.exists(), "{} does not exist", deb.display());
    deb
}

fn installed() -> bool {
    sh(Command::new("dpkg-query").args(["-W", "-f=${Status}", "packuilon"]))
        .stdout
        .starts_with(b"install ok installed")
}

fn user_exists(name: &str) -> bool {
    sh(Command::new("getent").args(["passwd", name])).status.success()
}

fn group_exists(name: &str) -> bool {
    sh(Command::new("getent").args(["group", name])).status.success()
}

fn id_of(what: &str, name: &str) -> u32 {
    let out = ok(Command::new("getent").args([what, name]));
    out.split(':').nth(2).unwrap().trim().parse().unwrap()
}

fn mode(path: &str) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .permissions()
        .mode()
        & 0o7777
}

fn owner(path: &str) -> (u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    (m.uid(), m.gid())
}

fn assert_root() {
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "the package tests install a package: run them as root (CI and make test do)"
    );
}

#[test]
fn lintian_reports_no_errors_and_only_the_warnings_readme_accepts() {
    let deb = deb();
    let out = sh(Command::new("lintian")
        .args(["--no-tag-display-limit", "--display-info"])
        .arg(&deb));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E:")).collect();
    assert!(errors.is_empty(), "lintian errors:\n{text}");
    let unexpected: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("W:"))
        .filter(|l| {
            let tag = l.split_whitespace().nth(2).unwrap_or("");
            !ACCEPTED_WARNINGS.contains(&tag)
        })
        .collect();
    assert!(
        unexpected.is_empty(),
        "lintian warnings not accepted in README:\n{}\n\nall of lintian's output:\n{text}",
        unexpected.join("\n")
    );
}

#[test]
fn the_package_installs_runs_upgrades_keeping_config_edits_and_purges_clean() {
    assert_root();
    let deb = deb();
    if installed() {
        // Left by an earlier, interrupted run of this test.
        ok(Command::new("dpkg").args(["--purge", "packuilon"]));
    }
    let packer_cfg_existed = Path::new("/etc/packer-utils").exists();

    // The control fields: computed Depends, packer recommended, no broker.
    let fields =
        ok(Command::new("dpkg-deb")
            .args(["-f"])
            .arg(&deb)
            .args(["Package", "Version", "Depends", "Recommends"]));
    assert!(fields.contains("Package: packuilon"), "{fields}");
    let depends = fields.lines().find(|l| l.starts_with("Depends:")).unwrap_or_default();
    assert!(
        depends.contains("libc6"),
        "Depends not computed for the binaries: {fields}"
    );
    assert!(depends.contains("adduser"), "{fields}");
    assert!(
        !fields.contains("rabbitmq"),
        "RabbitMQ must not be a dependency: {fields}"
    );
    assert!(fields.lines().any(|l| l == "Recommends: packer"), "{fields}");
    let name = deb.file_name().unwrap().to_string_lossy().into_owned();
    let version = fields
        .lines()
        .find_map(|l| l.strip_prefix("Version: "))
        .unwrap()
        .to_string();
    assert_eq!(version, env!("CARGO_PKG_VERSION"));
    assert_eq!(name, format!("packuilon_{version}_amd64.deb"));
    // The changelog shipped in the package names the same version.
    let changelog = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("debian/changelog")).unwrap();
    assert!(
        changelog.starts_with(&format!("packuilon ({version}) ")),
        "debian/changelog's newest entry is not {version}"
    );

    // Install.
    ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert!(installed());

    // The binaries, with --version and --help, as installed.
    for bin in BINARIES {
        let path = format!("/usr/bin/{bin}");
        assert_eq!(mode(&path), 0o755, "{path}");
        assert_eq!(owner(&path), (0, 0), "{path}");
        let v = ok(Command::new(&path).arg("--version"));
        assert_eq!(v.trim(), format!("{bin} {version}"), "{path} --version");
        let help = ok(Command::new(&path).arg("--help"));
        assert!(help.contains("Usage:"), "{help}");
        // A man page generated from the same definitions, found by man.
        let page = ok(Command::new("man").args(["-w", bin]));
        assert_eq!(page.trim(), format!("/usr/share/man/man1/{bin}.1.gz"), "man -w {bin}");
        let completion = format!("/usr/share/bash-completion/completions/{bin}");
        assert_eq!(mode(&completion), 0o644, "{completion}");
        assert!(std::fs::read_to_string(&completion).unwrap().contains(bin));
    }
    // cdp-listend's hook: without systemd running it runs cdb2rabbit as the
    // packuilon user, passing cdp-listend's argument on.
    let hook = "/usr/libexec/packuilon/cdp-hook";
    assert_eq!(mode(hook), 0o755, "{hook}");
    let v = ok(Command::new(hook).arg("--version"));
    assert_eq!(v.trim(), format!("cdb2rabbit {version}"), "{hook} --version");
    // The test gate's example TEST_COMMAND: installed runnable, and it
    // refuses to run unconfigured with a clear reason (exit 2).
    let smoke = "/usr/share/packuilon/image-smoke-test.sh";
    assert_eq!(mode(smoke), 0o755, "{smoke}");
    let out = sh(Command::new(smoke)
        .env("PACKUILON_IMAGE_ID", "x")
        .env_remove("SMOKE_FLAVOR"));
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SMOKE_FLAVOR is not set"),
        "{out:?}"
    );
    for sub in ["status", "history", "run"] {
        ok(Command::new("man").args(["-w", &format!("rabbit2packer-{sub}")]));
    }
    let manual = ok(Command::new("man")
        .args(["-P", "cat", "rabbit2packer"])
        .env("MANWIDTH", "100"));
    assert!(manual.contains("STATE_DIR/rabbit2packer.sqlite"), "{manual}");

    // The user, a system account without a login shell.
    assert!(user_exists("packuilon") && group_exists("packuilon"));
    let uid = id_of("passwd", "packuilon");
    let gid = id_of("group", "packuilon");
    assert!(uid < 1000, "packuilon is not a system user: uid {uid}");
    let passwd = ok(Command::new("getent").args(["passwd", "packuilon"]));
    assert!(passwd.trim().ends_with("/usr/sbin/nologin"), "{passwd}");

    // Config files: conffiles; config.ini (RABBIT_PW) not world-readable.
    let conffiles = ok(Command::new("dpkg-query").args(["-W", "-f=${Conffiles}", "packuilon"]));
    for f in CONFFILES {
        assert!(conffiles.contains(f), "{f} is not a conffile: {conffiles}");
    }
    assert_eq!(mode("/etc/packer-utils/config.ini"), 0o640);
    assert_eq!(owner("/etc/packer-utils/config.ini"), (0, gid));
    assert_eq!(mode("/etc/packer-utils/template-map.json"), 0o644);
    assert_eq!(mode("/etc/packer-utils/source-images.json"), 0o644);
    let config = std::fs::read_to_string("/etc/packer-utils/config.ini").unwrap();
    assert!(
        config.contains("CACHE_DIR = /var/cache/packuilon/profiles/"),
        "{config}"
    );
    assert!(
        config.contains("BUILD_FILE_DIR = /var/lib/packuilon/build-files/"),
        "{config}"
    );
    for d in OWNED_DIRS {
        assert_eq!(owner(d), (uid, gid), "{d}");
        assert_eq!(mode(d), 0o750, "{d}");
    }

    // The units: installed, valid, enabled (the timer and the daemon), not started.
    for unit in UNITS {
        let path = format!("/lib/systemd/system/{unit}");
        assert_eq!(mode(&path), 0o644, "{path}");
        ok(Command::new("systemd-analyze").args(["verify", &path]));
    }
    for (target, unit) in [
        ("multi-user.target.wants", "rabbit2packer.service"),
        ("timers.target.wants", "cdb2rabbit.timer"),
    ] {
        let link = format!("/etc/systemd/system/{target}/{unit}");
        let dest = std::fs::read_link(&link).unwrap_or_else(|e| panic!("{unit} is not enabled ({link}: {e})"));
        assert_eq!(dest, Path::new(&format!("/lib/systemd/system/{unit}")));
    }
    let daemon_unit = std::fs::read_to_string("/lib/systemd/system/rabbit2packer.service").unwrap();
    for line in [
        "User=packuilon",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
    ] {
        assert!(
            daemon_unit.lines().any(|l| l == line),
            "rabbit2packer.service lacks {line}"
        );
    }

    // Started on a host nobody has configured yet, the daemon fails loudly:
    // exit 2 (a configuration error, which systemd does not retry), naming
    // what is missing.
    let out = sh(Command::new("runuser")
        .args(["-u", "packuilon", "--", "/usr/bin/rabbit2packer", "--log", "stderr"])
        .env("PACKER_UTILS_CONFIG", "/etc/packer-utils/config.ini"));
    let said = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{said}");
    assert!(
        said.contains("PACKER_AUTH_FILE") && said.contains("/etc/packer-utils/auth.sh"),
        "{said}"
    );

    // State written while installed survives an upgrade, and so does an
    // operator's edit of config.ini (a conffile), with its owner and mode.
    std::fs::write("/var/lib/packuilon/marker", "state").unwrap();
    let edited = config.replace("QUEUE = build-queue", "QUEUE = site-build-queue");
    assert_ne!(edited, config);
    std::fs::write("/etc/packer-utils/config.ini", &edited).unwrap();
    ok(Command::new("dpkg").arg("-i").arg(&deb));
    assert_eq!(std::fs::read_to_string("/etc/packer-utils/config.ini").unwrap(), edited);
    assert_eq!(mode("/etc/packer-utils/config.ini"), 0o640);
    assert_eq!(owner("/etc/packer-utils/config.ini"), (0, gid));
    assert!(Path::new("/var/lib/packuilon/marker").exists());
    assert_eq!(id_of("passwd", "packuilon"), uid, "the user was made anew");

    // remove keeps config, state and the user.
    ok(Command::new("dpkg").args(["--remove", "packuilon"]));
    for bin in BINARIES {
        assert!(
            !Path::new(&format!("/usr/bin/{bin}")).exists(),
            "{bin} left after remove"
        );
    }
    assert_eq!(std::fs::read_to_string("/etc/packer-utils/config.ini").unwrap(), edited);
    assert!(Path::new("/var/lib/packuilon/marker").exists());
    assert!(user_exists("packuilon"));

    // purge removes state, logs, cache, config, the user, and the enablement.
    ok(Command::new("dpkg").args(["--purge", "packuilon"]));
    let status = sh(Command::new("dpkg-query").args(["-W", "-f=${Status}", "packuilon"]));
    assert!(
        !status.status.success() || String::from_utf8_lossy(&status.stdout).contains("not-installed"),
        "{status:?}"
    );
    for gone in OWNED_DIRS.iter().chain(CONFFILES.iter()) {
        assert!(!Path::new(gone).exists(), "{gone} left after purge");
    }
    if !packer_cfg_existed {
        assert!(
            !Path::new("/etc/packer-utils").exists(),
            "/etc/packer-utils left after purge"
        );
    }
    for unit in UNITS {
        assert!(!Path::new(&format!("/lib/systemd/system/{unit}")).exists());
        let leftover = ok(Command::new("find").args(["/etc/systemd/system", "-name", unit]));
        assert!(
            leftover.trim().is_empty(),
            "{unit} still linked after purge: {leftover}"
        );
    }
    assert!(!user_exists("packuilon"), "the user is left after purge");
    assert!(!group_exists("packuilon"), "the group is left after purge");
}
