//! Gateways on a store, through the real stack: `Gateway::app()` on real hyper servers, real
//! upstreams on loopback, a real client; the store on a SQLite file or on the machine's
//! PostgreSQL (see `tests/dbs`), a fresh database per test.
#![cfg(feature = "store")]

mod dbs;
mod support;

use std::time::{Duration, Instant};

use http::Method;
use tower_gateway::config::{GatewayConfig, SecretSource};
use tower_gateway::gateway::Gateway;
use tower_gateway::store::Store;

use dbs::{PgDatabase, SqliteFile};
use support::*;

const MGR: &str = "gw-manager";
const RES: &str = "gw-research";
const EP: &str = "/manage/accounts/coreweave-model/endpoints/inference";

fn config_toml(base_url: &str) -> String {
    format!(
        r#"
admins = ["team:platform"]

[[keys]]
id = "mgr"
subject = "mgr@example.com"
teams = ["platform"]
key = "{MGR}"

[[keys]]
id = "res"
subject = "res@example.com"
teams = ["research"]
key = "{RES}"

[[accounts]]
name = "coreweave-model"
access = {{ managers = ["team:platform"], users = ["team:research"] }}

[[accounts.endpoints]]
name = "inference"
base_url = "{base_url}"
headers = {{ Authorization = "Bearer up-key" }}
"#
    )
}

fn config(base_url: &str) -> GatewayConfig {
    GatewayConfig::from_toml(
        &config_toml(base_url),
        &SecretSource::from_vars([] as [(&str, &str); 0], std::env::temp_dir()),
    )
    .unwrap()
}

/// A gateway replica on `url`, seeded from the configuration if the store is empty. The
/// resync is long, so only a notification brings another replica's change quickly.
async fn replica(base_url: &str, url: &str) -> TestGateway {
    let store = Store::open_with(url, Duration::from_secs(60))
        .await
        .unwrap();
    let gateway = Gateway::builder()
        .config(config(base_url))
        .build_with_store(store)
        .await
        .unwrap();
    serve_app(gateway).await
}

async fn call(
    gw: &TestGateway,
    method: Method,
    path: &str,
    key: &str,
    body: Option<&str>,
) -> Answer {
    send_json(method, gw.url(path), Some(key), body).await
}

async fn chat(gw: &TestGateway, endpoint: &str, key: &str) -> Answer {
    call(
        gw,
        Method::GET,
        &format!("/proxy-api/coreweave-model/{endpoint}/models"),
        key,
        None,
    )
    .await
}

/// Polls `check` until it holds, for at most 10 s; how long it took.
async fn until(what: &str, mut check: impl AsyncFnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !check().await {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what}: not within 10 s"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    start.elapsed()
}

/// `PUT` of [`EP`] by the manager, with `If-Match: tag` if given: the status, the `ETag`
/// answered and the body.
fn put_endpoint(
    gw: &TestGateway,
    tag: Option<String>,
    body: String,
) -> impl std::future::Future<Output = (u16, Option<String>, String)> + use<> {
    let mut req = http::Request::put(gw.url(EP))
        .header("authorization", format!("Bearer {MGR}"))
        .header("content-type", "application/json");
    if let Some(tag) = tag {
        req = req.header("if-match", tag);
    }
    let req = req.body(http_body_util::Full::from(body)).unwrap();
    async move {
        let res = client().request(req).await.unwrap();
        let status = res.status().as_u16();
        let tag = res
            .headers()
            .get("etag")
            .map(|t| t.to_str().unwrap().to_owned());
        (status, tag, body_string(res).await)
    }
}

fn etag(ans: &Answer) -> String {
    ans.headers["etag"].to_str().unwrap().to_owned()
}

/// Creates and deletes endpoints through one gateway, restarts it on the same store with the
/// same file: the changes are there, and the file did not seed the store again.
async fn changes_survive_a_restart(url: &str) {
    let (up, _feeds) = sse_upstream().await;
    let gw = replica(&up.base_url(), url).await;
    let fresh = format!(
        r#"{{"base_url": "{}", "access": {{"users": ["everyone"]}}}}"#,
        up.base_url()
    );
    let ans = call(
        &gw,
        Method::PUT,
        "/manage/accounts/coreweave-model/endpoints/fresh",
        MGR,
        Some(&fresh),
    )
    .await;
    assert_eq!(ans.status, 201, "{}", ans.body);
    let ans = call(&gw, Method::DELETE, EP, MGR, None).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    drop(gw);

    let gw = replica(&up.base_url(), url).await;
    let ans = call(
        &gw,
        Method::GET,
        "/manage/accounts/coreweave-model",
        MGR,
        None,
    )
    .await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    let names: Vec<String> = ans.json()["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names,
        ["fresh"],
        "the deleted endpoint was not seeded again"
    );
    assert_eq!(chat(&gw, "fresh", RES).await.status, 200);
    assert_eq!(chat(&gw, "inference", RES).await.status, 404);
    let ready = call(&gw, Method::GET, "/readyz", RES, None).await;
    assert_eq!(
        (ready.status.as_u16(), ready.json()["store"].as_str()),
        (200, Some("ok"))
    );
}

#[tokio::test]
async fn sqlite_changes_survive_a_restart() {
    let file = SqliteFile::new();
    changes_survive_a_restart(&file.url()).await;
}

#[tokio::test]
async fn postgres_changes_survive_a_restart() {
    let Some(db) = PgDatabase::new().await else {
        return;
    };
    changes_survive_a_restart(&db.url).await;
    db.drop_it().await;
}

/// A `PUT` with a stale `If-Match` gets 409 with the current `ETag` and changes nothing; with
/// the current one, or none, it applies.
async fn stale_if_match_conflicts(a: &TestGateway, b: &TestGateway) {
    let first = call(a, Method::GET, EP, MGR, None).await;
    assert_eq!(first.status, 200);
    let v1 = etag(&first);
    let base = first.json()["base_url"].as_str().unwrap().to_owned();
    let put = |gw: &TestGateway, tag: Option<String>, ms: u64| {
        let body = format!(
            r#"{{"base_url": "{base}", "access": {{"users": ["team:research"]}}, "timeouts": {{"idle_ms": {ms}}}}}"#
        );
        put_endpoint(gw, tag, body)
    };
    let (status, v2, body) = put(a, Some(v1.clone()), 1000).await;
    assert_eq!(status, 200, "{body}");
    let v2 = v2.unwrap();
    assert_ne!(v1, v2);
    // The other manager still holds v1, through the other replica.
    let (status, current, body) = put(b, Some(v1.clone()), 2000).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(
        current.as_deref(),
        Some(v2.as_str()),
        "the 409 carries the current ETag"
    );
    let err: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(err["error"]["type"], "conflict");
    assert_eq!(err["error"]["code"], "conflict");
    let now = call(b, Method::GET, EP, MGR, None).await;
    assert_eq!(
        now.json()["timeouts"]["idle_ms"],
        1000,
        "the stale write changed nothing"
    );
    assert_eq!(etag(&now), v2);
    // Without If-Match, as before: it applies.
    let (status, _, body) = put(b, None, 3000).await;
    assert_eq!(status, 200, "{body}");
    // A malformed If-Match is a 400.
    let (status, _, _) = put(a, Some("seven".into()), 4000).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_stale_if_match_conflicts_in_memory() {
    let (up, _feeds) = sse_upstream().await;
    let gw = serve_app(Gateway::builder().config(config(&up.base_url())).build()).await;
    stale_if_match_conflicts(&gw, &gw).await;
    let ready = call(&gw, Method::GET, "/readyz", RES, None).await;
    assert_eq!(
        (ready.status.as_u16(), ready.json()["store"].as_str()),
        (200, Some("none"))
    );
    let live = call(&gw, Method::GET, "/healthz", RES, None).await;
    assert_eq!(live.status, 200);
}

#[tokio::test]
async fn postgres_a_stale_if_match_conflicts_across_replicas() {
    let Some(db) = PgDatabase::new().await else {
        return;
    };
    let (up, _feeds) = sse_upstream().await;
    let a = replica(&up.base_url(), &db.url).await;
    let b = replica(&up.base_url(), &db.url).await;
    stale_if_match_conflicts(&a, &b).await;
    drop((a, b));
    db.drop_it().await;
}

/// Two managers, each through their own replica, read the endpoint and write it with what
/// they read, at once, ten times over: each round one wins and one gets 409, and no change is
/// lost (the version moves by exactly one a round).
#[tokio::test]
async fn postgres_concurrent_managers_through_two_replicas_never_lose_a_change() {
    let Some(db) = PgDatabase::new().await else {
        return;
    };
    let (up, _feeds) = sse_upstream().await;
    let a = replica(&up.base_url(), &db.url).await;
    let b = replica(&up.base_url(), &db.url).await;
    let base = up.base_url();
    for round in 0..10u64 {
        let seen = call(&a, Method::GET, EP, MGR, None).await;
        let tag = etag(&seen);
        let write = |gw: &TestGateway, ms: u64| {
            let body = format!(r#"{{"base_url": "{base}", "timeouts": {{"idle_ms": {ms}}}}}"#);
            let answer = put_endpoint(gw, Some(tag.clone()), body);
            async move { answer.await.0 }
        };
        let (sa, sb) = tokio::join!(write(&a, 1000 + round), write(&b, 2000 + round));
        let mut statuses = [sa, sb];
        statuses.sort_unstable();
        assert_eq!(statuses, [200, 409], "round {round}");
        let after = call(&b, Method::GET, EP, MGR, None).await;
        let want = if sa == 200 {
            1000 + round
        } else {
            2000 + round
        };
        assert_eq!(after.json()["timeouts"]["idle_ms"], want, "round {round}");
        let version: u64 = etag(&after).trim_matches('"').parse().unwrap();
        assert_eq!(version, 2 + round, "round {round}: one change per round");
    }
    drop((a, b));
    db.drop_it().await;
}

/// Three replicas on one PostgreSQL: an endpoint created through the first is callable through
/// the others, a grant removed through the second is denied by the first, each within a second
/// (measured and printed); a stream open through the first all the while ends byte for byte.
#[tokio::test]
async fn postgres_three_replicas_agree() {
    let Some(db) = PgDatabase::new().await else {
        return;
    };
    let (up, mut streams) = sse_upstream().await;
    let r1 = replica(&up.base_url(), &db.url).await;
    let r2 = replica(&up.base_url(), &db.url).await;
    let r3 = replica(&up.base_url(), &db.url).await;
    // Let the replicas' listeners connect.
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut body = open_stream(
        r1.url("/proxy-api/coreweave-model/inference/chat/completions"),
        RES,
    )
    .await;
    let (_, events) = within("the stream", streams.recv()).await.unwrap();
    events.send(Ok(sse_event(0).into())).await.unwrap();
    assert_eq!(
        next_data(&mut body).await.unwrap().unwrap(),
        sse_event(0).as_bytes()
    );

    let fresh = format!(
        r#"{{"base_url": "{}", "access": {{"users": ["team:research"]}}}}"#,
        up.base_url()
    );
    let ans = call(
        &r1,
        Method::PUT,
        "/manage/accounts/coreweave-model/endpoints/fresh",
        MGR,
        Some(&fresh),
    )
    .await;
    assert_eq!(ans.status, 201, "{}", ans.body);
    assert_eq!(
        chat(&r1, "fresh", RES).await.status,
        200,
        "read your own write"
    );
    let mut times = Vec::new();
    for other in [&r2, &r3] {
        times.push(
            until("the new endpoint on another replica", async || {
                chat(other, "fresh", RES).await.status == 200
            })
            .await,
        );
    }

    let ans = call(
        &r2,
        Method::PUT,
        "/manage/accounts/coreweave-model/access",
        MGR,
        Some(r#"{"managers": ["team:platform"], "users": []}"#),
    )
    .await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    times.push(
        until("the removed grant on replica 1", async || {
            chat(&r1, "inference", RES).await.status == 403
        })
        .await,
    );
    eprintln!("changes reached the other replicas after {times:?}");

    let mut want = sse_event(0);
    for i in 1..5 {
        want.push_str(&sse_event(i));
        events.send(Ok(sse_event(i).into())).await.unwrap();
    }
    want.push_str(SSE_DONE);
    events.send(Ok(SSE_DONE.into())).await.unwrap();
    drop(events);
    let rest = read_to_end(&mut body)
        .await
        .expect("the stream ended cleanly");
    assert_eq!(
        format!("{}{}", sse_event(0), String::from_utf8(rest).unwrap()),
        want
    );
    drop((r1, r2, r3));
    db.drop_it().await;
}

/// Admins issue, list, rotate and revoke keys through `/manage/keys`, and read the audit log;
/// a new key works at once on every replica given, a revoked one gets 401 everywhere, a
/// rotated one works for its grace period only. Nothing secret is ever answered or logged.
async fn keys_through_the_api(replicas: &[&TestGateway]) {
    let first = replicas[0];
    let last = replicas[replicas.len() - 1];
    // Not an admin.
    let ans = call(first, Method::GET, "/manage/keys", RES, None).await;
    assert_eq!(ans.status, 403, "{}", ans.body);
    let ans = call(first, Method::GET, "/manage/audit", RES, None).await;
    assert_eq!(ans.status, 403, "{}", ans.body);

    let ans = call(
        first,
        Method::POST,
        "/manage/keys",
        MGR,
        Some(r#"{"subject": "ci@example.com", "teams": ["research"]}"#),
    )
    .await;
    assert_eq!(ans.status, 201, "{}", ans.body);
    let issued = ans.json();
    let (id, key) = (
        issued["id"].as_str().unwrap().to_owned(),
        issued["key"].as_str().unwrap().to_owned(),
    );
    assert!(key.starts_with("gw-") && key.len() == 67, "{key}");
    assert_eq!(issued["subject"], "ci@example.com");
    for gw in replicas {
        until("the new key on every replica", async || {
            chat(gw, "inference", &key).await.status == 200
        })
        .await;
    }

    let ans = call(last, Method::GET, "/manage/keys", MGR, None).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    assert!(!ans.body.contains(&key), "a listing never holds a key");
    let listed = ans.json();
    let sources: Vec<(String, String)> = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                k["id"].as_str().unwrap().to_owned(),
                k["source"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert!(
        sources.contains(&("mgr".into(), "file".into())),
        "{sources:?}"
    );
    assert!(
        sources.contains(&(id.clone(), "store".into())),
        "{sources:?}"
    );
    let today =
        tower_gateway::rfc3339::day(tower_gateway::model::day_of(std::time::SystemTime::now()));
    let new_key = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == id.as_str())
        .unwrap();
    assert_eq!(new_key["last_used_day"], today.as_str(), "{new_key}");

    // Keys of the file are changed in the file.
    let ans = call(first, Method::DELETE, "/manage/keys/res", MGR, None).await;
    assert_eq!(ans.status, 403, "{}", ans.body);

    // Rotate with a short grace: both work, then only the new one.
    let ans = call(
        last,
        Method::POST,
        &format!("/manage/keys/{id}/rotate"),
        MGR,
        Some(r#"{"grace_seconds": 1}"#),
    )
    .await;
    assert_eq!(ans.status, 201, "{}", ans.body);
    let rotated = ans.json()["key"].as_str().unwrap().to_owned();
    let rotated_id = ans.json()["id"].as_str().unwrap().to_owned();
    assert_ne!(rotated_id, id);
    for gw in replicas {
        until("the rotated key on every replica", async || {
            chat(gw, "inference", &rotated).await.status == 200
        })
        .await;
    }
    for gw in replicas {
        until("the old key past its grace", async || {
            chat(gw, "inference", &key).await.status == 401
        })
        .await;
    }

    // Revoke through the last replica: 401 everywhere.
    let ans = call(
        last,
        Method::DELETE,
        &format!("/manage/keys/{rotated_id}"),
        MGR,
        None,
    )
    .await;
    assert_eq!(ans.status, 204, "{}", ans.body);
    let mut times = Vec::new();
    for gw in replicas {
        times.push(
            until("the revoked key on every replica", async || {
                chat(gw, "inference", &rotated).await.status == 401
            })
            .await,
        );
    }
    eprintln!("the revocation reached every replica after {times:?}");
    let ans = chat(first, "inference", &rotated).await;
    assert_eq!(
        ans.json()["error"]["code"],
        "invalid_api_key",
        "the same 401 as an unknown key"
    );

    let ans = call(first, Method::GET, "/manage/audit?limit=2", MGR, None).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    let page = ans.json();
    let actions: Vec<&str> = page["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["key.revoke", "key.rotate"], "newest first");
    let next = page["next"].as_str().unwrap().to_owned();
    let ans = call(
        first,
        Method::GET,
        &format!("/manage/audit?before={next}"),
        MGR,
        None,
    )
    .await;
    let older = ans.json();
    assert!(
        older["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "key.create")
    );
    for body in [&page.to_string(), &older.to_string()] {
        for secret in [key.as_str(), rotated.as_str(), "up-key", MGR, RES] {
            assert!(!body.contains(secret), "the audit log holds a secret");
        }
    }
}

#[tokio::test]
async fn keys_through_the_api_in_memory() {
    let (up, _feeds) = sse_upstream().await;
    let gw = serve_app(Gateway::builder().config(config(&up.base_url())).build()).await;
    keys_through_the_api(&[&gw]).await;
}

#[tokio::test]
async fn sqlite_keys_through_the_api_survive_a_restart() {
    let file = SqliteFile::new();
    let (up, _feeds) = sse_upstream().await;
    let gw = replica(&up.base_url(), &file.url()).await;
    keys_through_the_api(&[&gw]).await;
    drop(gw);
    let gw = replica(&up.base_url(), &file.url()).await;
    let ans = call(&gw, Method::GET, "/manage/keys", MGR, None).await;
    let keys = ans.json()["keys"].as_array().unwrap().len();
    assert_eq!(
        keys, 4,
        "two from the file, the issued and the rotated: {}",
        ans.body
    );
}

#[tokio::test]
async fn postgres_keys_through_three_replicas() {
    let Some(db) = PgDatabase::new().await else {
        return;
    };
    let (up, _feeds) = sse_upstream().await;
    let r1 = replica(&up.base_url(), &db.url).await;
    let r2 = replica(&up.base_url(), &db.url).await;
    let r3 = replica(&up.base_url(), &db.url).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    keys_through_the_api(&[&r1, &r2, &r3]).await;
    drop((r1, r2, r3));
    db.drop_it().await;
}

/// A TCP forwarder to PostgreSQL that a test can cut (every connection closed, new ones
/// refused) and restore: a database outage for one replica, without touching the server.
struct Cuttable {
    port: u16,
    cut: std::sync::Arc<std::sync::atomic::AtomicBool>,
    conns: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Cuttable {
    async fn to(target: std::net::SocketAddr) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let cut = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let conns = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let (cut, conns) = (cut.clone(), conns.clone());
            async move {
                loop {
                    let Ok((mut client, _)) = listener.accept().await else {
                        return;
                    };
                    if cut.load(std::sync::atomic::Ordering::SeqCst) {
                        continue; // dropped: the connection is refused
                    }
                    let task = tokio::spawn(async move {
                        if let Ok(mut server) = tokio::net::TcpStream::connect(target).await {
                            let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                        }
                    });
                    conns.lock().unwrap().push(task);
                }
            }
        });
        Self {
            port,
            cut,
            conns,
            accept,
        }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
        for task in self.conns.lock().unwrap().drain(..) {
            task.abort();
        }
    }

    fn restore(&self) {
        self.cut.store(false, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Cuttable {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

/// One replica loses its database mid-traffic: its requests keep succeeding on the last
/// snapshot (a key revoked before the outage stays revoked), its management writes get 503,
/// `/readyz` says the store is stale; a change made meanwhile through another replica reaches
/// it within seconds of the database returning, and nothing is lost.
#[tokio::test]
async fn postgres_an_outage_keeps_traffic_flowing_and_recovers() {
    let Some(db) = PgDatabase::new().await else {
        return;
    };
    let (up, _feeds) = sse_upstream().await;
    let direct = replica(&up.base_url(), &db.url).await;
    // A key revoked before the outage.
    let ans = call(
        &direct,
        Method::POST,
        "/manage/keys",
        MGR,
        Some(r#"{"subject": "old@example.com"}"#),
    )
    .await;
    let (old_id, old_key) = (
        ans.json()["id"].as_str().unwrap().to_owned(),
        ans.json()["key"].as_str().unwrap().to_owned(),
    );
    let ans = call(
        &direct,
        Method::DELETE,
        &format!("/manage/keys/{old_id}"),
        MGR,
        None,
    )
    .await;
    assert_eq!(ans.status, 204);

    let target: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
    let link = Cuttable::to(target).await;
    let url = db
        .url
        .replacen("127.0.0.1:5432", &format!("127.0.0.1:{}", link.port), 1);
    assert_ne!(url, db.url, "the test database URL names 127.0.0.1:5432");
    let store = Store::open_with(&url, Duration::from_millis(200))
        .await
        .unwrap();
    let cut_off = serve_app(
        Gateway::builder()
            .config(config(&up.base_url()))
            .build_with_store(store)
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(chat(&cut_off, "inference", RES).await.status, 200);
    assert_eq!(chat(&cut_off, "inference", &old_key).await.status, 401);

    link.cut();
    until("the replica to notice", async || {
        call(&cut_off, Method::GET, "/readyz", RES, None)
            .await
            .status
            == 503
    })
    .await;
    let ready = call(&cut_off, Method::GET, "/readyz", RES, None).await;
    assert_eq!(ready.json()["store"], "stale");
    assert!(ready.json()["since"].as_str().unwrap().ends_with('Z'));
    for _ in 0..20 {
        assert_eq!(
            chat(&cut_off, "inference", RES).await.status,
            200,
            "traffic flows"
        );
        assert_eq!(
            chat(&cut_off, "inference", &old_key).await.status,
            401,
            "revoked stays revoked"
        );
    }
    let fresh = format!(r#"{{"base_url": "{}"}}"#, up.base_url());
    let ans = call(
        &cut_off,
        Method::PUT,
        "/manage/accounts/coreweave-model/endpoints/lost",
        MGR,
        Some(&fresh),
    )
    .await;
    assert_eq!(ans.status, 503, "{}", ans.body);
    assert_eq!(ans.json()["error"]["code"], "store_unavailable");
    // Meanwhile, through a replica that still reaches the database.
    let ans = call(
        &direct,
        Method::PUT,
        "/manage/accounts/coreweave-model/endpoints/during",
        MGR,
        Some(&fresh),
    )
    .await;
    assert_eq!(ans.status, 201, "{}", ans.body);

    link.restore();
    let caught_up = until("the replica to catch up", async || {
        chat(&cut_off, "during", MGR).await.status == 200
    })
    .await;
    eprintln!("caught up {caught_up:?} after the database returned");
    until("readiness", async || {
        call(&cut_off, Method::GET, "/readyz", RES, None)
            .await
            .status
            == 200
    })
    .await;
    let ans = call(
        &cut_off,
        Method::PUT,
        "/manage/accounts/coreweave-model/endpoints/after",
        MGR,
        Some(&fresh),
    )
    .await;
    assert_eq!(ans.status, 201, "writes work again: {}", ans.body);
    // The other replica has it within a second (its notification is on its way).
    until("the write on the other replica", async || {
        chat(&direct, "after", MGR).await.status == 200
    })
    .await;
    let listed = call(
        &direct,
        Method::GET,
        "/manage/accounts/coreweave-model",
        MGR,
        None,
    )
    .await;
    let names: Vec<String> = listed.json()["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        names.contains(&"during".to_owned()) && names.contains(&"after".to_owned()),
        "{names:?}"
    );
    assert!(
        !names.contains(&"lost".to_owned()),
        "the refused write was not applied later"
    );
    drop((direct, cut_off, link));
    db.drop_it().await;
}

/// The day a key was last used reaches the store off the hot path, and is listed after a
/// restart.
#[tokio::test]
async fn sqlite_the_last_day_of_use_is_kept() {
    let file = SqliteFile::new();
    let (up, _feeds) = sse_upstream().await;
    let store = Store::open_with(&file.url(), Duration::from_millis(100))
        .await
        .unwrap();
    let gw = serve_app(
        Gateway::builder()
            .config(config(&up.base_url()))
            .build_with_store(store.clone())
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(chat(&gw, "inference", RES).await.status, 200);
    let today = tower_gateway::model::day_of(std::time::SystemTime::now());
    until("the day of use in the store", async || {
        let loaded = store.load().await.unwrap();
        loaded
            .state
            .keys
            .iter()
            .any(|k| k.id == "res" && k.last_used_day == Some(today))
    })
    .await;
    let unused = store.load().await.unwrap();
    let mgr = unused.state.keys.iter().find(|k| k.id == "mgr").unwrap();
    assert_eq!(mgr.last_used_day, None, "a key not used has no day");
    drop(gw);
    store.close().await;

    let gw = replica(&up.base_url(), &file.url()).await;
    let ans = call(&gw, Method::GET, "/manage/keys", MGR, None).await;
    let res = ans.json()["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == "res")
        .cloned()
        .unwrap();
    assert_eq!(
        res["last_used_day"],
        tower_gateway::rfc3339::day(today).as_str()
    );
}

/// A reload replaces the admins, on a store as in memory; on a store it leaves the keys and
/// endpoints to the store.
#[tokio::test]
async fn sqlite_a_reload_takes_the_settings_and_leaves_the_state_to_the_store() {
    let file = SqliteFile::new();
    let (up, _feeds) = sse_upstream().await;
    let store = Store::open(&file.url()).await.unwrap();
    let gateway = Gateway::builder()
        .config(config(&up.base_url()))
        .build_with_store(store)
        .await
        .unwrap();
    let gw = serve_app(gateway.clone()).await;
    let fresh = format!(r#"{{"base_url": "{}"}}"#, up.base_url());
    let ans = call(
        &gw,
        Method::PUT,
        "/manage/accounts/coreweave-model/endpoints/fresh",
        MGR,
        Some(&fresh),
    )
    .await;
    assert_eq!(ans.status, 201, "{}", ans.body);
    assert_eq!(
        call(&gw, Method::GET, "/manage/keys", MGR, None)
            .await
            .status,
        200
    );

    // The same file without admins, without the research key, with another endpoint.
    let toml = config_toml(&up.base_url())
        .replace("admins = [\"team:platform\"]", "")
        .replace("name = \"inference\"", "name = \"other\"");
    let reloaded = GatewayConfig::from_toml(
        &toml,
        &SecretSource::from_vars([] as [(&str, &str); 0], std::env::temp_dir()),
    )
    .unwrap();
    gateway.apply(reloaded).unwrap();
    assert_eq!(
        call(&gw, Method::GET, "/manage/keys", MGR, None)
            .await
            .status,
        403,
        "the admins come from the file"
    );
    assert_eq!(
        chat(&gw, "fresh", RES).await.status,
        200,
        "the store's endpoints stay"
    );
    assert_eq!(chat(&gw, "inference", RES).await.status, 200);
    assert_eq!(
        chat(&gw, "other", RES).await.status,
        404,
        "the file's endpoints are not applied"
    );
}

/// What the key and audit endpoints refuse, each with a 400 (or 409) that says why and changes
/// nothing.
#[tokio::test]
async fn keys_and_the_audit_log_refuse_bad_input() {
    let (up, _feeds) = sse_upstream().await;
    let gw = serve_app(Gateway::builder().config(config(&up.base_url())).build()).await;
    for (body, field) in [
        (
            r#"{"subject": "ci@example.com", "expires_at": "tomorrow"}"#,
            "expires_at",
        ),
        (
            r#"{"subject": "ci@example.com", "expires_at": "2001-01-01T00:00:00Z"}"#,
            "expires_at",
        ),
        (r#"{"subject": "has space"}"#, "subject"),
        (
            r#"{"subject": "ci@example.com", "teams": [""]}"#,
            "teams[0]",
        ),
        (
            r#"{"subject": "ci@example.com", "key": "mine"}"#,
            "unknown field",
        ),
    ] {
        let ans = call(&gw, Method::POST, "/manage/keys", MGR, Some(body)).await;
        assert_eq!(ans.status, 400, "{body}: {}", ans.body);
        assert!(ans.error_message().contains(field), "{body}: {}", ans.body);
    }
    let listed = call(&gw, Method::GET, "/manage/keys", MGR, None).await;
    assert_eq!(
        listed.json()["keys"].as_array().unwrap().len(),
        2,
        "nothing was issued"
    );
    for query in ["limit=x", "limit=-1", "before=abc"] {
        let ans = call(
            &gw,
            Method::GET,
            &format!("/manage/audit?{query}"),
            MGR,
            None,
        )
        .await;
        assert_eq!(ans.status, 400, "{query}: {}", ans.body);
    }
    // A revoked key cannot be rotated; revoking it again changes nothing.
    let ans = call(
        &gw,
        Method::POST,
        "/manage/keys",
        MGR,
        Some(r#"{"subject": "ci@example.com"}"#),
    )
    .await;
    let id = ans.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        call(
            &gw,
            Method::DELETE,
            &format!("/manage/keys/{id}"),
            MGR,
            None
        )
        .await
        .status,
        204
    );
    assert_eq!(
        call(
            &gw,
            Method::DELETE,
            &format!("/manage/keys/{id}"),
            MGR,
            None
        )
        .await
        .status,
        204
    );
    let ans = call(
        &gw,
        Method::POST,
        &format!("/manage/keys/{id}/rotate"),
        MGR,
        Some("{}"),
    )
    .await;
    assert_eq!(ans.status, 409, "{}", ans.body);
    let ans = call(
        &gw,
        Method::POST,
        "/manage/keys/nope/rotate",
        MGR,
        Some("{}"),
    )
    .await;
    assert_eq!(ans.status, 404, "{}", ans.body);
}

/// `PUT` of the rate-limit rules by `key`, with `If-Match: tag` if given.
async fn put_rules(gw: &TestGateway, key: &str, tag: Option<&str>, body: &str) -> Answer {
    let mut req = http::Request::put(gw.url("/manage/rate-limits"))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json");
    if let Some(tag) = tag {
        req = req.header("if-match", tag);
    }
    let req = req
        .body(http_body_util::Full::from(body.to_owned()))
        .unwrap();
    let res = client().request(req).await.unwrap();
    let status = res.status();
    let headers = res.headers().clone();
    let body = body_string(res).await;
    Answer {
        status,
        headers,
        body,
    }
}

/// Rate-limit rules changed through the management API of one replica: validated (400 naming
/// the rule's field), versioned (409 on a stale `If-Match`), admins only, audited, enforced by
/// the other replica as soon as the store's notification arrives, read back with their usage,
/// and kept across a restart.
#[tokio::test]
async fn rate_limit_rules_changed_on_one_replica_hold_on_another() {
    let Some(db) = PgDatabase::new().await else {
        return;
    };
    let (up, _feeds) = sse_upstream().await;
    let a = replica(&up.base_url(), &db.url).await;
    let b = replica(&up.base_url(), &db.url).await;

    let denied = call(&a, Method::GET, "/manage/rate-limits", RES, None).await;
    assert_eq!(denied.status, 403, "admins only: {}", denied.body);
    let none = call(&a, Method::GET, "/manage/rate-limits", MGR, None).await;
    assert_eq!(none.status, 200, "{}", none.body);
    assert_eq!(none.json()["rules"], serde_json::json!([]));
    assert_eq!(etag(&none), "\"0\"");

    let bad = put_rules(
        &a,
        MGR,
        None,
        r#"{"rules":[{"scope":"team:research","requests_per_minute":2},{"scope":"team:research","endpoint":"coreweave-model/inference","requests_per_minute":0}]}"#,
    )
    .await;
    assert_eq!(bad.status, 400, "{}", bad.body);
    assert!(
        bad.error_message()
            .starts_with("rules[1].requests_per_minute"),
        "{}",
        bad.body
    );
    let unknown = put_rules(
        &a,
        MGR,
        None,
        r#"{"rules":[{"scope":"team:research","rpm":2}]}"#,
    )
    .await;
    assert_eq!(unknown.status, 400);
    assert!(
        unknown.error_message().starts_with("rules[0].rpm"),
        "{}",
        unknown.body
    );

    let rules = r#"{"rules":[{"scope":"team:research","requests_per_minute":2}]}"#;
    let put = put_rules(&a, MGR, Some("\"0\""), rules).await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(etag(&put), "\"1\"");
    assert_eq!(
        put.json()["rules"],
        serde_json::json!([{"scope": "team:research", "requests_per_minute": 2}])
    );
    let stale = put_rules(&a, MGR, Some("\"0\""), rules).await;
    assert_eq!(stale.status, 409, "{}", stale.body);
    assert_eq!(etag(&stale), "\"1\"");

    // The other replica enforces the rule once the notification arrives.
    let took = until("the rule reaching the other replica", async || {
        let ans = call(&b, Method::GET, "/manage/rate-limits", MGR, None).await;
        etag(&ans) == "\"1\""
    })
    .await;
    eprintln!("a rate-limit change reached the other replica in {took:?}");
    assert_eq!(chat(&b, "inference", RES).await.status, 200);
    assert_eq!(chat(&b, "inference", RES).await.status, 200);
    let refused = chat(&b, "inference", RES).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    let usage = call(
        &b,
        Method::GET,
        "/manage/rate-limits/usage?scope=team%3Aresearch",
        MGR,
        None,
    )
    .await;
    assert_eq!(usage.status, 200, "{}", usage.body);
    let limits = &usage.json()["limits"];
    assert_eq!(limits[0]["limit"], "requests_per_minute");
    assert_eq!(limits[0]["value"], 2);
    assert_eq!(limits[0]["remaining"], 0);
    assert_eq!(limits[0]["used"], 2);
    let bad_scope = call(
        &b,
        Method::GET,
        "/manage/rate-limits/usage?scope=group:x",
        MGR,
        None,
    )
    .await;
    assert_eq!(bad_scope.status, 400, "{}", bad_scope.body);
    for query in ["", "?scope=team%zz", "?scope=team%3", "?other=1"] {
        let path = format!("/manage/rate-limits/usage{query}");
        let ans = call(&b, Method::GET, &path, MGR, None).await;
        assert_eq!(ans.status, 400, "{query}: {}", ans.body);
        assert!(
            ans.error_message().starts_with("scope:"),
            "{query}: {}",
            ans.body
        );
    }
    let not_a_rule = put_rules(&a, MGR, None, r#"{"rules":[7]}"#).await;
    assert_eq!(not_a_rule.status, 400);
    assert!(
        not_a_rule
            .error_message()
            .starts_with("rules[0]: must be an object"),
        "{}",
        not_a_rule.body
    );
    let not_a_list = put_rules(&a, MGR, None, r#"{"rules":{"scope":"all"}}"#).await;
    assert_eq!(not_a_list.status, 400, "{}", not_a_list.body);

    let audit = call(&a, Method::GET, "/manage/audit", MGR, None).await;
    assert_eq!(audit.json()["entries"][0]["action"], "rate_limits.put");

    // A replica started later on the same store has the rules, not the file's (none).
    let c = replica(&up.base_url(), &db.url).await;
    let kept = call(&c, Method::GET, "/manage/rate-limits", MGR, None).await;
    assert_eq!(etag(&kept), "\"1\"");
    assert_eq!(kept.json()["rules"][0]["requests_per_minute"], 2);
    drop((a, b, c));
    db.drop_it().await;
}
