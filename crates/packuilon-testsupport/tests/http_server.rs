//! ProfileServer under the load cdb2rabbit puts on it: many keep-alive
//! clients downloading at once must each get every file promptly, and a
//! cut-off transfer must end (not hang until the client's timeout).

use std::time::{Duration, Instant};

use futures::stream::{self, StreamExt};
use packuilon_testsupport::http::{Fault, ProfileServer};

const FILES: usize = 200;

fn site() -> (tempfile::TempDir, ProfileServer) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("profiles")).unwrap();
    for i in 0..FILES {
        // Sizes vary so that some responses span several TCP segments.
        let body = format!("{{\"n\": {i}, \"pad\": \"{}\"}}", "x".repeat(i * 97 % 20_000));
        std::fs::write(dir.path().join(format!("profiles/p{i}.json")), body).unwrap();
    }
    let server = ProfileServer::serve(dir.path());
    (dir, server)
}

async fn fetch_all(server: &ProfileServer, clients: usize, concurrency: usize) {
    let clients: Vec<reqwest::Client> = (0..clients)
        .map(|_| {
            reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .pool_max_idle_per_host(concurrency)
                .build()
                .unwrap()
        })
        .collect();
    let results: Vec<Result<(), String>> = stream::iter(0..FILES * 3)
        .map(|k| {
            let client = clients[k % clients.len()].clone();
            let i = k % FILES;
            let url = server.url(&format!("profiles/p{i}.json"));
            async move {
                let resp = client.get(&url).send().await.map_err(|e| format!("{url}: {e:?}"))?;
                if !resp.status().is_success() {
                    return Err(format!("{url}: {}", resp.status()));
                }
                let body = resp.bytes().await.map_err(|e| format!("{url}: {e:?}"))?;
                let v: serde_json::Value = serde_json::from_slice(&body).map_err(|e| format!("{url}: {e}"))?;
                if v["n"] != i {
                    return Err(format!("{url}: wrong file {v}"));
                }
                Ok(())
            }
        })
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} failed: {failed:?}",
        failed.len(),
        results.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_concurrent_keep_alive_downloads_never_hang() {
    let (_dir, server) = site();
    let start = Instant::now();
    fetch_all(&server, 1, 16).await;
    assert!(start.elapsed() < Duration::from_secs(20), "took {:?}", start.elapsed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_clients_with_their_own_connections_never_hang() {
    let (_dir, server) = site();
    fetch_all(&server, 8, 8).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_connections_than_a_worker_pool_never_hang() {
    // More keep-alive connections than any fixed pool of worker threads.
    let (_dir, server) = site();
    fetch_all(&server, 40, 40).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_response_is_cut_off_at_once() {
    let (_dir, server) = site();
    server.set_fault("profiles/p150.json", Fault::Truncate(100));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let start = Instant::now();
    let resp = client.get(server.url("profiles/p150.json")).send().await.unwrap();
    let err = resp.bytes().await.unwrap_err();
    assert!(!err.is_timeout(), "{err:?}");
    assert!(start.elapsed() < Duration::from_secs(5), "took {:?}", start.elapsed());
    // The connection is gone, the server is not: the next request works.
    let ok = client.get(server.url("profiles/p1.json")).send().await.unwrap();
    assert!(ok.status().is_success());
    assert_eq!(
        server.requests(),
        ["profiles/p150.json".to_string(), "profiles/p1.json".to_string()]
    );
}
