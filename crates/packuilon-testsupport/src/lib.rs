//! Test harness for Packuilon's suites and benchmarks. Everything here is
//! real: a real RabbitMQ (the shared node `make test` starts, or a private
//! node a test may stop and kill), a real HTTP server for profiles, real
//! temp dirs, a real Keystone and Glance. Each test gets its own queue
//! names, ports and directories and cleans up what it declares.
//!
//! - [`broker`]: RabbitMQ queues and private nodes.
//! - [`command`]: running a real program, failing with what it printed.
//! - [`http`]: the profiles' web server (profiles-info.xml and the profiles).
//! - [`tls`]: certificates and a TLS proxy in front of a plain server.
//! - [`openstack`]: the Keystone + Glance deployment.
//! - [`cloud`]: an admin session on it that creates projects, images and members.
//! - [`postgres`]: a private PostgreSQL cluster (the shared site journal's tests).

pub mod broker;
pub mod cloud;
pub mod command;
pub mod http;
pub mod openstack;
pub mod postgres;
pub mod site;
pub mod tls;

use std::sync::atomic::{AtomicU32, Ordering};

/// A name no other test (in this or another process) uses: `prefix-pid-n-rand`.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let rand = &uuid::Uuid::new_v4().simple().to_string()[..8];
    format!("{prefix}-{}-{n}-{rand}", std::process::id())
}

/// A free TCP port on 127.0.0.1 (bound then released; good enough for tests
/// that start a server on it at once).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .unwrap()
        .port()
}

/// A binary of the workspace (`cdb2rabbit`, `rabbit2packer`,
/// `rename-old-images`), for tests of another package that run it: it sits
/// next to the test executable's `deps/` directory. `make test` (and
/// `cargo test --workspace`) build every binary before running tests.
pub fn workspace_bin(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("path of the test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps");
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (make test does)",
        bin.display()
    );
    bin
}
