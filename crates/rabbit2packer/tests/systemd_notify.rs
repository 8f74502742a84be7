//! The systemd notify protocol without systemd: the test binds the Unix
//! datagram socket systemd would (NOTIFY_SOCKET), sets WATCHDOG_USEC as
//! systemd does for `WatchdogSec=`, and reads what the daemon tells it:
//! READY=1, WATCHDOG=1 pings, and `STATUS=N building, M waiting` lines
//! (what `systemctl status` shows) as jobs start and end.

mod support;

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use support::{prod, profile, succeeded, Site, Step};

const T: Duration = Duration::from_secs(60);

fn wait_for(got: &Mutex<Vec<String>>, what: &str, f: impl Fn(&[String]) -> bool) {
    let deadline = Instant::now() + T;
    loop {
        if f(&got.lock().unwrap()) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}; got {:?}",
            got.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn watchdog_pings_and_status_lines_reach_systemd() {
    let site = Site::new(1, "");
    site.template("a.json", Step { sleep: 2.0, exit: 0 });
    let sock_path = site.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    {
        let got = got.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 1024];
            while let Ok(n) = sock.recv(&mut buf) {
                got.lock()
                    .unwrap()
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        });
    }
    // WatchdogSec=1s: pings every 0.5 s.
    let mut d = site.start_with_env(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "1000000"),
    ]);
    wait_for(&got, "READY=1", |g| g.first().is_some_and(|m| m == "READY=1\n"));
    wait_for(&got, "two watchdog pings", |g| {
        g.iter().filter(|m| *m == "WATCHDOG=1\n").count() >= 2
    });
    site.publish(&profile("inventory", "7x", "a", prod()), None);
    site.publish(&profile("other", "7x", "a", prod()), None);
    site.publish(&profile("other", "7x", "a", prod()), None);
    wait_for(&got, "a job building and one waiting", |g| {
        g.iter().any(|m| m == "STATUS=1 building, 1 waiting\n")
    });
    site.wait_jobs("the builds", T, |j| succeeded(j) == 2);
    wait_for(&got, "nothing building", |g| {
        g.iter().rev().find(|m| m.starts_with("STATUS=")).map(String::as_str) == Some("STATUS=0 building, 0 waiting\n")
    });
    d.stop();
    assert!(got.lock().unwrap().iter().any(|m| m == "STOPPING=1\n"));
}

#[test]
fn no_watchdog_ping_for_another_process() {
    // WATCHDOG_PID names another process: the watchdog is not ours.
    let site = Site::new(1, "");
    let sock_path = site.dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut d = site.start_with_env(&[
        ("NOTIFY_SOCKET", sock_path.to_str().unwrap()),
        ("WATCHDOG_USEC", "200000"),
        ("WATCHDOG_PID", "1"),
    ]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"READY=1\n");
    // Ten intervals pass without a ping.
    assert!(sock.recv(&mut buf).is_err(), "{:?}", String::from_utf8_lossy(&buf));
    d.stop();
}
