//! The private PostgreSQL of packuilon-testsupport: it starts, takes a
//! password login over TCP, stops and starts again with its data, and goes
//! away on drop.

use packuilon_testsupport::postgres::PrivatePostgres;

#[test]
fn a_private_cluster_keeps_its_data_across_a_restart_and_is_removed_on_drop() {
    let pg = PrivatePostgres::start().unwrap();
    let url = pg.database("ts").unwrap();
    let db = url.rsplit('/').next().unwrap().to_string();
    pg.psql(&db, "CREATE TABLE t (n int); INSERT INTO t VALUES (42)")
        .unwrap();
    pg.stop(true).unwrap();
    assert!(std::net::TcpStream::connect(("127.0.0.1", pg.port())).is_err());
    pg.start_again().unwrap();
    assert_eq!(pg.psql(&db, "SELECT n FROM t").unwrap().trim(), "42");
    // Over TCP with the password, as a daemon would (psql reads PGPASSWORD).
    let out = std::process::Command::new(packuilon_testsupport::postgres::bin_dir().unwrap().join("psql"))
        .args(["-X", "-A", "-t", "-c", "SELECT current_user", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "packuilon");
    let wrong = url.replace(pg.password(), "wrong");
    let out = std::process::Command::new(packuilon_testsupport::postgres::bin_dir().unwrap().join("psql"))
        .args(["-X", "-c", "SELECT 1", &wrong])
        .output()
        .unwrap();
    assert!(!out.status.success(), "a wrong password must be refused");
    let dir = pg.dir().to_path_buf();
    drop(pg);
    assert!(!dir.exists());
}
