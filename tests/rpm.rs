//! The RPM for EL8/EL9 and the portable tarball, checked with the tools an
//! EL packager uses, as Debian ships them (`rpm`, `rpm2cpio`, `rpmlint`).
//! `make test` builds both first (`make rpm dist`, from the same portable
//! binaries as `make deb`) and names them in `PACKUILON_TEST_RPM` and
//! `PACKUILON_TEST_DIST`; the .deb is `PACKUILON_TEST_DEB`.
//!
//! No EL machine is at hand, so the promise "runs on EL8" is checked as the
//! dynamic linker would check it: no versioned glibc symbol newer than 2.28,
//! and nothing required that EL8 lacks.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use packuilon_testsupport::command::{ok, run};

const BINARIES: [&str; 3] = ["cdb2rabbit", "rabbit2packer", "rename-old-images"];
/// EL8's glibc: the newest symbol version the binaries may need.
const GLIBC_FLOOR: (u32, u32) = (2, 28);
const CONFIG_FILES: [&str; 3] = [
    "/etc/packer-utils/config.ini",
    "/etc/packer-utils/template-map.json",
    "/etc/packer-utils/source-images.json",
];

/// rpmlint warnings accepted, each with its reason in README ("Install on
/// EL8/EL9"). Any other warning, and every error, fails the test.
const ACCEPTED_WARNINGS: [&str; 4] = [
    // The units and the preset go where EL puts them, /usr/lib/systemd.
    "only-non-binary-in-usr-lib",
    // config.ini holds RABBIT_PW: root:packuilon 0640 on purpose.
    "non-standard-gid",
    // rpmlint 2.4 records a man page's section, not its name, so it misses
    // every page; the pages are checked below.
    "no-manual-page-for-binary",
    // %post makes the daemons' directories with `install -d`.
    "dangerous-command-in-%post",
];
/// What rpmlint reports as errors without rpm/rpmlint.toml (Debian's
/// openSUSE defaults), and that file filters, each with its reason there.
const FILTERED_ERRORS: [&str; 2] = ["non-readable /etc/packer-utils/config.ini 640", "no-signature"];

fn artifact(var: &str, make: &str) -> PathBuf {
    let path = std::env::var_os(var)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{var} is not set: run `make test` (it runs `{make}` first)"));
    assert!(path.exists(), "{} does not exist", path.display());
    path
}

fn rpm() -> PathBuf {
    artifact("PACKUILON_TEST_RPM", "make rpm")
}

fn query(args: &[&str]) -> String {
    ok(Command::new("rpm").arg("-qp").args(args).arg(rpm()))
}

/// The RPM's payload unpacked (rpm2cpio | cpio) into a temp dir.
fn unpack_rpm() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let mut rpm2cpio = Command::new("rpm2cpio")
        .arg(rpm())
        .stdout(Stdio::piped())
        .spawn()
        .expect("rpm2cpio");
    let out = Command::new("cpio")
        .args(["-idm", "--quiet", "--no-absolute-filenames"])
        .current_dir(dir.path())
        .stdin(rpm2cpio.stdout.take().unwrap())
        .output()
        .expect("cpio");
    assert!(rpm2cpio.wait().expect("rpm2cpio").success(), "rpm2cpio failed");
    assert!(out.status.success(), "cpio: {}", String::from_utf8_lossy(&out.stderr));
    dir
}

/// The highest `GLIBC_x.y` symbol version `objdump -T` finds in `bin`.
fn newest_glibc(bin: &Path) -> (u32, u32) {
    let dump = ok(Command::new("objdump").arg("-T").arg(bin));
    dump.split("GLIBC_")
        .skip(1)
        .filter_map(|rest| {
            let v: String = rest.chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
            let mut parts = v.split('.').map(|p| p.parse::<u32>().ok());
            Some((parts.next()??, parts.next().flatten().unwrap_or(0)))
        })
        .max()
        .unwrap_or_else(|| panic!("{}: no GLIBC symbol versions (not dynamically linked?)", bin.display()))
}

#[test]
fn the_rpm_is_named_as_el_expects() {
    let name = rpm().file_name().unwrap().to_string_lossy().into_owned();
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(name, format!("packuilon-{version}-1.x86_64.rpm"));
    assert_eq!(
        query(&["--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}"]),
        format!("packuilon {version} 1 x86_64")
    );
}

/// rpmlint's findings: (level, the rest of the line) for each E: or W: line.
fn rpmlint(args: &[&str]) -> (Vec<(String, String)>, String) {
    let out = run(Command::new("rpmlint").args(args).arg(rpm()));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let findings = text
        .lines()
        .filter_map(|line| {
            // "packuilon.x86_64: E: tag detail"
            let (_, rest) = line.split_once(": ")?;
            let (level, detail) = rest.split_once(": ")?;
            matches!(level, "E" | "W").then(|| (level.to_string(), detail.to_string()))
        })
        .collect();
    (findings, text)
}

#[test]
fn rpmlint_reports_no_errors_and_only_the_warnings_readme_accepts() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("rpm/rpmlint.toml");
    let (findings, text) = rpmlint(&["-c", config.to_str().unwrap()]);
    let unexpected: Vec<_> = findings
        .iter()
        .filter(|(level, detail)| {
            let tag = detail.split_whitespace().next().unwrap_or("");
            level == "E" || !ACCEPTED_WARNINGS.contains(&tag)
        })
        .collect();
    assert!(unexpected.is_empty(), "rpmlint: {unexpected:?}\n(full output:\n{text})");
    assert!(
        text.contains(" 0 errors,"),
        "rpmlint did not report its summary:\n{text}"
    );

    // What rpm/rpmlint.toml filters is exactly what README accepts: without
    // it, those errors and no others.
    let (findings, text) = rpmlint(&[]);
    let errors: Vec<&str> = findings
        .iter()
        .filter(|(l, _)| l == "E")
        .map(|(_, d)| d.as_str())
        .collect();
    assert_eq!(errors, FILTERED_ERRORS, "rpmlint without rpm/rpmlint.toml:\n{text}");
}

#[test]
fn the_rpm_holds_the_binaries_man_pages_completions_units_and_config() {
    let files: BTreeSet<String> = query(&["-l"]).lines().map(str::to_string).collect();
    let mut expected: Vec<String> = Vec::new();
    for b in BINARIES {
        expected.push(format!("/usr/bin/{b}"));
        expected.push(format!("/usr/share/man/man1/{b}.1.gz"));
        expected.push(format!("/usr/share/bash-completion/completions/{b}"));
    }
    for unit in ["rabbit2packer.service", "cdb2rabbit.service", "cdb2rabbit.timer"] {
        expected.push(format!("/usr/lib/systemd/system/{unit}"));
    }
    expected.push("/usr/lib/systemd/system-preset/50-packuilon.preset".into());
    expected.push("/usr/libexec/packuilon/cdp-hook".into());
    expected.push("/usr/share/packuilon/image-smoke-test.sh".into());
    expected.extend(CONFIG_FILES.iter().map(|f| f.to_string()));
    expected.push("/usr/share/doc/packuilon/README.md".into());
    expected.push("/usr/share/doc/packuilon/examples/prometheus-alerts.yml".into());
    expected.push("/usr/share/licenses/packuilon/LICENSE".into());
    let missing: Vec<_> = expected.iter().filter(|f| !files.contains(*f)).collect();
    assert!(
        missing.is_empty(),
        "missing from the RPM: {missing:?}\nit lists: {files:#?}"
    );

    // The preset enables what the .deb enables: the daemon and the timer.
    let preset = unpack_rpm();
    let text =
        std::fs::read_to_string(preset.path().join("usr/lib/systemd/system-preset/50-packuilon.preset")).unwrap();
    let enabled: Vec<&str> = text.lines().filter_map(|l| l.strip_prefix("enable ")).collect();
    assert_eq!(enabled, ["rabbit2packer.service", "cdb2rabbit.timer"]);
}

#[test]
fn config_files_are_noreplace_and_config_ini_is_not_world_readable() {
    let listed: BTreeSet<String> = query(&["--configfiles"]).lines().map(str::to_string).collect();
    let expected: BTreeSet<String> = CONFIG_FILES.iter().map(|f| f.to_string()).collect();
    assert_eq!(listed, expected, "rpm -qp --configfiles");

    // %config(noreplace): an operator's edit survives an upgrade.
    let flags = query(&[
        "--qf",
        "[%{FILENAMES} %{FILEFLAGS:fflags} %{FILEMODES:perms} %{FILEUSERNAME}:%{FILEGROUPNAME}\n]",
    ]);
    for file in CONFIG_FILES {
        let line = flags
            .lines()
            .find(|l| l.starts_with(&format!("{file} ")))
            .unwrap_or_else(|| panic!("{file} not in:\n{flags}"));
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(
            fields[1].contains('c') && fields[1].contains('n'),
            "{file} is not %config(noreplace): {line}"
        );
        if file.ends_with("config.ini") {
            assert_eq!(&fields[2..], ["-rw-r-----", "root:packuilon"], "{line}");
        } else {
            assert_eq!(&fields[2..], ["-rw-r--r--", "root:root"], "{line}");
        }
    }
}

#[test]
fn scriptlets_create_the_user_enable_the_units_the_el_way_and_reload_systemd() {
    let scripts = query(&["--scripts"]);
    let section = |name: &str| -> String {
        let start = scripts
            .find(&format!("{name} scriptlet"))
            .unwrap_or_else(|| panic!("no {name} scriptlet in:\n{scripts}"));
        let rest = &scripts[start..];
        let body_start = rest.find('\n').unwrap() + 1;
        let end = rest[body_start..].find(" scriptlet (using").map(|i| {
            // back up to the start of that header line
            rest[..body_start + i].rfind('\n').unwrap()
        });
        rest[body_start..end.unwrap_or(rest.len())].to_string()
    };
    let pre = section("preinstall");
    assert!(
        pre.contains("groupadd -r packuilon") && pre.contains("useradd -r -g packuilon"),
        "%pre:\n{pre}"
    );
    let post = section("postinstall");
    assert!(
        post.contains("systemctl --no-reload preset rabbit2packer.service cdb2rabbit.timer"),
        "%post:\n{post}"
    );
    assert!(post.contains("systemctl daemon-reload"), "%post:\n{post}");
    assert!(
        post.contains("install -d -o packuilon -g packuilon -m 0750 \"$d\""),
        "%post:\n{post}"
    );
    for dir in [
        "/var/lib/packuilon",
        "/var/lib/packuilon/build-files",
        "/var/cache/packuilon/profiles",
        "/var/log/packer-utils",
    ] {
        assert!(post.contains(dir), "%post does not make {dir}:\n{post}");
    }
    let preun = section("preuninstall");
    assert!(
        preun.contains("disable --now rabbit2packer.service cdb2rabbit.timer"),
        "%preun:\n{preun}"
    );
    let postun = section("postuninstall");
    assert!(postun.contains("systemctl daemon-reload"), "%postun:\n{postun}");
    assert!(
        postun.contains("try-restart rabbit2packer.service"),
        "%postun:\n{postun}"
    );

    // Each is a valid shell script, and does nothing on a machine without
    // systemd running but what it must (checked with sh -n: syntax only).
    for (name, body) in [("pre", &pre), ("post", &post), ("preun", &preun), ("postun", &postun)] {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), body).unwrap();
        let out = run(Command::new("sh").arg("-n").arg(file.path()));
        assert!(
            out.status.success(),
            "%{name} is not valid sh: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn requires_only_what_el8_has_and_recommends_packer() {
    let requires = query(&["--requires"]);
    for req in requires.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let name = req.split_whitespace().next().unwrap();
        let allowed = name.starts_with("rpmlib(")
            || ["/bin/sh", "shadow-utils", "coreutils"].contains(&name)
            // image-smoke-test.sh's interpreter; bash is in EL's @core, and
            // rabbit2packer sources RC files with it anyway.
            || name == "/bin/bash"
            // rpmbuild's own, for %config files: met by the package itself.
            || name == "config(packuilon)"
            || name.starts_with("libc.so.6")
            || name.starts_with("libgcc_s.so.1")
            || name.starts_with("libm.so.6")
            || name.starts_with("libpthread.so.0")
            || name.starts_with("libdl.so.2")
            || name.starts_with("librt.so.1")
            || name.starts_with("ld-linux-x86-64.so.2")
            || name.starts_with("rtld(");
        assert!(
            allowed,
            "the RPM requires {req:?}, which EL8's base may not have:\n{requires}"
        );
        if let Some(v) = name.split("(GLIBC_").nth(1) {
            let v: Vec<u32> = v
                .trim_end_matches(")(64bit)")
                .trim_end_matches(')')
                .split('.')
                .filter_map(|p| p.parse().ok())
                .collect();
            assert!(
                (v[0], v.get(1).copied().unwrap_or(0)) <= GLIBC_FLOOR,
                "{req} is newer than EL8's glibc 2.28"
            );
        }
    }
    let recommends = query(&["--recommends"]);
    assert!(
        recommends.lines().any(|l| l.trim() == "packer"),
        "rpm -qp --recommends:\n{recommends}"
    );
}

#[test]
fn the_rpms_binaries_need_no_glibc_newer_than_2_28_and_run_here() {
    let root = unpack_rpm();
    for b in BINARIES {
        let bin = root.path().join("usr/bin").join(b);
        let newest = newest_glibc(&bin);
        assert!(
            newest <= GLIBC_FLOOR,
            "{b} needs GLIBC_{}.{}, newer than EL8's 2.28",
            newest.0,
            newest.1
        );
        let version = ok(Command::new(&bin).arg("--version"));
        assert_eq!(version.trim(), format!("{b} {}", env!("CARGO_PKG_VERSION")));
        let help = ok(Command::new(&bin).arg("--help"));
        assert!(help.contains("Usage:"), "{b} --help:\n{help}");
    }
}

#[test]
fn the_deb_and_the_dist_tarball_carry_the_same_binaries_as_the_rpm() {
    let rpm_root = unpack_rpm();
    let deb_root = tempfile::tempdir().unwrap();
    ok(Command::new("dpkg-deb")
        .arg("-x")
        .arg(artifact("PACKUILON_TEST_DEB", "make deb"))
        .arg(deb_root.path()));
    let dist = artifact("PACKUILON_TEST_DIST", "make dist");
    let dist_root = tempfile::tempdir().unwrap();
    ok(Command::new("tar")
        .arg("-xzf")
        .arg(&dist)
        .arg("-C")
        .arg(dist_root.path()));
    let top = format!("packuilon-{}-x86_64-linux", env!("CARGO_PKG_VERSION"));
    assert_eq!(dist.file_name().unwrap().to_string_lossy(), format!("{top}.tar.gz"));
    let top = dist_root.path().join(top);

    for b in BINARIES {
        let from_rpm = std::fs::read(rpm_root.path().join("usr/bin").join(b)).unwrap();
        let from_deb = std::fs::read(deb_root.path().join("usr/bin").join(b)).unwrap();
        let from_dist = std::fs::read(top.join("bin").join(b)).unwrap();
        assert!(from_rpm == from_deb, "{b}: the .deb's binary differs from the RPM's");
        assert!(
            from_rpm == from_dist,
            "{b}: the tarball's binary differs from the RPM's"
        );
    }
    // The rest an operator needs without a package manager.
    let mut expected = vec![
        "README.md".to_string(),
        "LICENSE".into(),
        "libexec/cdp-hook".into(),
        "libexec/image-smoke-test.sh".into(),
        "systemd/rabbit2packer.service".into(),
        "systemd/cdb2rabbit.service".into(),
        "systemd/cdb2rabbit.timer".into(),
        "config/config.ini".into(),
        "config/template-map.json".into(),
        "config/source-images.json".into(),
        "config/prometheus-alerts.yml".into(),
    ];
    for b in BINARIES {
        expected.push(format!("man/man1/{b}.1.gz"));
        expected.push(format!("completions/bash/{b}"));
    }
    for f in expected {
        assert!(top.join(&f).is_file(), "{f} is missing from the tarball");
    }
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(top.join("config/config.ini"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o640, "config.ini in the tarball holds RABBIT_PW");
}
