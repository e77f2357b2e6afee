//! Reloading the configuration file while the gateway serves: `Gateway::load` from a real
//! file, `Gateway::app()` on a real hyper server, real upstreams on loopback.

mod support;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Method;
use tower_gateway::gateway::Gateway;

use support::*;

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A directory of its own under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "tower-gateway-reload-{name}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, file: &str) -> PathBuf {
        self.0.join(file)
    }

    /// Writes `file` whole (to a temporary name, then renamed over it).
    fn write(&self, file: &str, text: &str) -> PathBuf {
        let path = self.path(file);
        let tmp = self.path(&format!(".{file}.tmp"));
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

const ALICE: &str = "gw-alice-CANARY-0a1b2c3d";
const BOB: &str = "gw-bob-CANARY-4e5f6a7b";
const CAROL: &str = "gw-carol-CANARY-8c9d0e1f";
const DAVE: &str = "gw-dave-CANARY-2a3b4c5d";
const PAT: &str = "gw-pat-CANARY-6e7f8a9b";
const MALLORY: &str = "gw-mallory-CANARY-13579bdf";
/// The upstream credential, read from `upstream.key` with `${file:…}`.
const UPSTREAM_KEY: &str = "up-reload-CANARY-2468ace0";

fn key(id: &str, teams: &str, key: &str) -> String {
    format!(
        "[[keys]]\nid = \"{id}\"\nsubject = \"{id}@example.com\"\nteams = [{teams}]\nkey = \"{key}\"\n\n"
    )
}

/// A file with `keys` and one account whose `header_auth` comes from a secret file, managed by
/// platform and usable by everyone, with `endpoints` (the TOML of its `[[accounts.endpoints]]`).
fn file(keys: &[String], endpoints: &str) -> String {
    format!(
        r#"{}
[[accounts]]
name = "coreweave-model"
header_auth = {{ Authorization = "Bearer ${{file:upstream.key}}" }}
access = {{ managers = ["team:platform"], users = ["everyone"] }}
{endpoints}"#,
        keys.concat()
    )
}

/// An endpoint `name` of [`file`]'s account at `http://{upstream}/v1`, with `extra` lines.
fn endpoint(name: &str, upstream: &str, extra: &str) -> String {
    format!(
        "\n[[accounts.endpoints]]\nname = \"{name}\"\nbase_url = \"http://{upstream}/v1\"\n{extra}"
    )
}

/// The first configuration: alice (research), bob (sales) and pat (platform); one account
/// whose `header_auth` comes from a secret file, usable by everyone, with endpoint `one`.
fn v1(upstream: &str) -> String {
    file(
        &[
            key("alice", "\"research\"", ALICE),
            key("bob", "\"sales\"", BOB),
            key("pat", "\"platform\"", PAT),
        ],
        &endpoint("one", upstream, ""),
    )
}

/// A gateway loaded from `v1` in `dir`, served with the proxy and the management API.
async fn start(dir: &TempDir, upstream: &str) -> (PathBuf, TestGateway) {
    dir.write("upstream.key", &format!("{UPSTREAM_KEY}\n"));
    let path = dir.write("gateway.toml", &v1(upstream));
    let gateway = Gateway::load(&path).unwrap_or_else(|e| panic!("load: {e}"));
    assert_eq!(gateway.source(), Some(path.as_path()));
    (path, serve_app(gateway).await)
}

/// A non-streaming chat completion through `/proxy-api/coreweave-model/{endpoint}`.
async fn chat(gw: &TestGateway, endpoint: &str, key: &str) -> Answer {
    send_json(
        Method::POST,
        gw.url(&format!(
            "/proxy-api/coreweave-model/{endpoint}/chat/completions"
        )),
        Some(key),
        Some(r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"Say hello"}]}"#),
    )
    .await
}

/// `GET path` with `key`.
async fn get(gw: &TestGateway, path: &str, key: &str) -> Answer {
    send_json(Method::GET, gw.url(path), Some(key), None).await
}

/// The management listing as `key` sees it.
async fn listing(gw: &TestGateway, key: &str) -> serde_json::Value {
    let ans = get(gw, "/manage/accounts", key).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    ans.json()
}

fn endpoint_names(list: &serde_json::Value) -> Vec<String> {
    list["accounts"][0]["endpoints"]
        .as_array()
        .map(|eps| {
            eps.iter()
                .map(|e| e["name"].as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

async fn mock() -> (MockUpstream, String) {
    let mock = MockUpstream::new(UPSTREAM_KEY, Duration::ZERO);
    let addr = mock.spawn().await.unwrap();
    (mock, addr.to_string())
}

// ---------------------------------------------------------------------------------------------
// A good file.

/// A good new file takes effect on the next request: a new key works, a removed key gets a
/// 401, a new endpoint routes, a new per-endpoint grant is enforced, and the management API
/// shows the new configuration.
#[tokio::test]
async fn a_good_file_takes_effect() {
    let dir = TempDir::new("good");
    let (mock, up) = mock().await;
    let (path, gw) = start(&dir, &up).await;

    assert_eq!(chat(&gw, "one", ALICE).await.status, 200);
    assert_eq!(chat(&gw, "one", BOB).await.status, 200);
    assert_eq!(chat(&gw, "two", ALICE).await.status, 404);
    assert_eq!(chat(&gw, "one", CAROL).await.status, 401);
    assert_eq!(mock.requests(), 2);

    // v2: bob is gone, carol (platform) and dave (sales) are new; `one` is for research only
    // now, `two` is new.
    let v2 = file(
        &[
            key("alice", "\"research\"", ALICE),
            key("carol", "\"platform\"", CAROL),
            key("dave", "\"sales\"", DAVE),
            key("pat", "\"platform\"", PAT),
        ],
        &[
            endpoint("one", &up, "access = { users = [\"team:research\"] }\n"),
            endpoint("two", &up, ""),
        ]
        .concat(),
    );
    dir.write("gateway.toml", &v2);
    gw.gateway
        .reload()
        .unwrap_or_else(|e| panic!("reload: {e}"));
    assert_eq!(gw.gateway.source(), Some(path.as_path()));

    let bob = chat(&gw, "one", BOB).await;
    assert_eq!(bob.status, 401, "a removed key: {}", bob.body);
    assert_eq!(bob.headers["x-gateway-error"], "invalid_api_key");
    for (endpoint, key, status) in [
        ("two", CAROL, 200),
        ("one", CAROL, 200), // account managers keep using every endpoint
        ("two", ALICE, 200),
        ("one", ALICE, 200),
        ("two", DAVE, 200),
        ("one", DAVE, 403),
    ] {
        let ans = chat(&gw, endpoint, key).await;
        assert_eq!(ans.status, status, "{endpoint} with {key}: {}", ans.body);
    }
    assert_eq!(mock.requests(), 2 + 5, "the 403 never reached the upstream");

    assert_eq!(endpoint_names(&listing(&gw, CAROL).await), ["one", "two"]);
    assert_eq!(
        endpoint_names(&listing(&gw, DAVE).await),
        ["two"],
        "the override hides `one` from sales"
    );
}

/// Reloading replaces changes made through the management API (they live in memory only),
/// and reloading the same file again is harmless.
#[tokio::test]
async fn a_reload_replaces_run_time_changes() {
    let dir = TempDir::new("runtime");
    let (mock, up) = mock().await;
    let (_path, gw) = start(&dir, &up).await;

    let ans = send_json(
        Method::PUT,
        gw.url("/manage/accounts/coreweave-model/endpoints/added"),
        Some(PAT),
        Some(&format!(r#"{{"base_url": "http://{up}/v1"}}"#)),
    )
    .await;
    assert_eq!(ans.status, 201, "{}", ans.body);
    assert_eq!(chat(&gw, "added", ALICE).await.status, 200);

    gw.gateway.reload().unwrap();
    assert_eq!(chat(&gw, "added", ALICE).await.status, 404);
    assert_eq!(chat(&gw, "one", ALICE).await.status, 200);
    gw.gateway.reload().unwrap();
    assert_eq!(chat(&gw, "one", ALICE).await.status, 200);
    assert_eq!(mock.requests(), 3);
}

// ---------------------------------------------------------------------------------------------
// Bad files.

/// Each bad file is refused by `reload()` with an error naming the field and the problem (and
/// no secret), and the running configuration keeps serving exactly as before: old keys and
/// endpoints work, the bad file's new key and endpoint do not exist.
#[tokio::test]
async fn a_bad_file_is_refused_and_changes_nothing() {
    let dir = TempDir::new("bad");
    let (mock, up) = mock().await;
    let (path, gw) = start(&dir, &up).await;
    let listing_before = listing(&gw, PAT).await;
    assert_eq!(endpoint_names(&listing_before), ["one"]);

    // Every bad file also drops bob and `one`, and adds mallory and `elsewhere`: none of it
    // may take effect.
    let keys = format!(
        "{}{}{}",
        key("alice", "\"research\"", ALICE),
        key("pat", "\"platform\"", PAT),
        key("mallory", "\"research\"", MALLORY)
    );
    let account = |header: &str, endpoint_extra: &str, base_url: &str| {
        format!(
            r#"{keys}
[[accounts]]
name = "coreweave-model"
header_auth = {{ Authorization = "{header}" }}
access = {{ managers = ["team:platform"], users = ["everyone"] }}

[[accounts.endpoints]]
name = "elsewhere"
base_url = "{base_url}"
{endpoint_extra}
"#
        )
    };
    let good_header = "Bearer ${file:upstream.key}";
    let good_url = format!("http://{up}/v1");
    let unset = "TOWER_GATEWAY_RELOAD_TEST_SURELY_UNSET_7C1F";
    // (what, file text, the field, a piece of the message)
    let cases: Vec<(&str, String, String, &str)> = vec![
        (
            "a trailing slash",
            account(good_header, "", &format!("http://{up}/v1/")),
            "accounts[0].endpoints[0].base_url".into(),
            "slash",
        ),
        (
            "an unknown field",
            account(good_header, "colour = \"red\"", &good_url),
            "accounts[0].endpoints[0]".into(),
            "colour",
        ),
        (
            "a missing environment variable",
            account(&format!("Bearer ${{{unset}}}"), "", &good_url),
            "accounts[0].header_auth.Authorization".into(),
            "is not set",
        ),
        (
            "a missing secret file",
            account("Bearer ${file:no-such.key}", "", &good_url),
            "accounts[0].header_auth.Authorization".into(),
            "cannot read secret file",
        ),
        (
            "a bad subject",
            account(
                good_header,
                "access = { users = [\"research\"] }",
                &good_url,
            ),
            "accounts[0].endpoints[0].access.users[0]".into(),
            "subject",
        ),
        (
            "a duplicate key id",
            format!(
                "{}{}",
                account(good_header, "", &good_url),
                key("alice", "", "gw-another-CANARY-24680")
            ),
            "keys[3].id".into(),
            "duplicate",
        ),
        (
            "a managed header",
            account(
                good_header,
                "headers = { Host = \"evil.example\" }",
                &good_url,
            ),
            "accounts[0].endpoints[0].headers.host".into(),
            "managed by the gateway",
        ),
        (
            "a TOML syntax error",
            format!(
                "{}\n[[accounts]\nname = \"coreweave-model\"\n",
                key("mallory", "", MALLORY)
            ),
            "line ".into(),
            "",
        ),
    ];
    for (what, text, field, message) in cases {
        dir.write("gateway.toml", &text);
        let err = gw
            .gateway
            .reload()
            .expect_err(&format!("{what}: the bad file was accepted"));
        let shown = err.to_string();
        assert!(
            err.field().starts_with(&field),
            "{what}: field {:?}, wanted {field:?} ({shown})",
            err.field()
        );
        assert!(
            shown.contains(message),
            "{what}: {shown:?} does not say {message:?}"
        );
        if what == "an unknown field" {
            assert!(shown.contains("colour"), "{what}: {shown}");
        }
        if what == "a missing environment variable" {
            assert!(shown.contains(unset), "{what}: {shown}");
        }
        for secret in [ALICE, PAT, MALLORY, UPSTREAM_KEY, "gw-another-CANARY-24680"] {
            assert!(!shown.contains(secret), "{what}: {shown}");
            assert!(!format!("{err:?}").contains(secret), "{what}: {err:?}");
        }

        // Nothing changed.
        assert_eq!(chat(&gw, "one", ALICE).await.status, 200, "{what}");
        assert_eq!(chat(&gw, "one", BOB).await.status, 200, "{what}");
        assert_eq!(chat(&gw, "one", MALLORY).await.status, 401, "{what}");
        assert_eq!(chat(&gw, "elsewhere", ALICE).await.status, 404, "{what}");
        assert_eq!(listing(&gw, PAT).await, listing_before, "{what}");
    }

    // An unreadable file: refused, naming the file.
    std::fs::remove_file(&path).unwrap();
    let err = gw
        .gateway
        .reload()
        .expect_err("a missing file was accepted");
    assert!(err.message().contains("cannot read"), "{err}");
    assert_eq!(chat(&gw, "one", BOB).await.status, 200);

    // And a good file afterwards still applies.
    dir.write("gateway.toml", &v1(&up));
    gw.gateway.reload().unwrap();
    assert_eq!(chat(&gw, "one", BOB).await.status, 200);
    assert_eq!(mock.requests(), 8 * 2 + 2);
}

/// The path prefix cannot change while running: the file is refused whole (its new key does
/// not apply either) and the old prefix keeps routing. A file that spells out the current
/// prefix is fine.
#[tokio::test]
async fn a_path_prefix_change_is_refused() {
    let dir = TempDir::new("prefix");
    let (mock, up) = mock().await;
    let (_path, gw) = start(&dir, &up).await;

    let with_prefix = |prefix: &str| {
        format!(
            "path_prefix = \"{prefix}\"\n{}{}",
            key("mallory", "\"research\"", MALLORY),
            v1(&up)
        )
    };
    dir.write("gateway.toml", &with_prefix("/v2-api"));
    let err = gw.gateway.reload().expect_err("a new prefix was accepted");
    assert_eq!(err.field(), "path_prefix", "{err}");
    assert!(err.message().contains("restart"), "{err}");
    assert_eq!(chat(&gw, "one", ALICE).await.status, 200);
    assert_eq!(chat(&gw, "one", MALLORY).await.status, 401);
    let moved = send_json(
        Method::POST,
        gw.url("/v2-api/coreweave-model/one/chat/completions"),
        Some(ALICE),
        Some("{}"),
    )
    .await;
    assert_eq!(moved.status, 404, "{}", moved.body);

    dir.write("gateway.toml", &with_prefix(""));
    let err = gw
        .gateway
        .reload()
        .expect_err("an empty prefix was accepted");
    assert_eq!(err.field(), "path_prefix", "{err}");

    dir.write("gateway.toml", &with_prefix("/proxy-api"));
    gw.gateway
        .reload()
        .unwrap_or_else(|e| panic!("same prefix: {e}"));
    assert_eq!(chat(&gw, "one", MALLORY).await.status, 200);
    assert_eq!(mock.requests(), 2);
}

/// A reload applies the file's rate-limit rules (a tighter one holds at once, and a rule kept
/// keeps its counts); where and how limits are counted cannot change without a restart.
#[tokio::test]
async fn a_reload_applies_rate_limit_rules_and_refuses_a_new_backend() {
    let dir = TempDir::new("rate-limits");
    let (_mock, up) = mock().await;
    let with_rules =
        |head: &str, rules: &str| format!("{}\n[rate_limits]\n{head}\n{rules}", v1(&up));
    let rule = |rpm: u32| {
        format!("[[rate_limits.rules]]\nscope = \"key:alice\"\nrequests_per_minute = {rpm}\n")
    };
    dir.write("upstream.key", &format!("{UPSTREAM_KEY}\n"));
    let path = dir.write("gateway.toml", &with_rules("", &rule(3)));
    let gw = serve_app(Gateway::load(&path).unwrap()).await;
    assert_eq!(chat(&gw, "one", ALICE).await.status, 200);
    assert_eq!(chat(&gw, "one", ALICE).await.status, 200);

    // Down to 2 a minute: the two already made count, the next is refused.
    dir.write("gateway.toml", &with_rules("", &rule(2)));
    gw.gateway
        .reload()
        .unwrap_or_else(|e| panic!("new rules: {e}"));
    let refused = chat(&gw, "one", ALICE).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.headers["x-gateway-error"], "rate_limit_exceeded");
    assert_eq!(chat(&gw, "one", BOB).await.status, 200, "another key");

    // No rule: nothing is limited.
    dir.write("gateway.toml", &with_rules("", ""));
    gw.gateway.reload().unwrap();
    assert_eq!(chat(&gw, "one", ALICE).await.status, 200);

    // A new backend needs a restart; the file is refused whole.
    dir.write(
        "gateway.toml",
        &with_rules("backend = \"redis://127.0.0.1:6379\"", &rule(1)),
    );
    let err = gw.gateway.reload().expect_err("a new backend was accepted");
    assert_eq!(err.field(), "rate_limits", "{err}");
    assert!(err.message().contains("restart"), "{err}");
    assert_eq!(
        chat(&gw, "one", ALICE).await.status,
        200,
        "the old rules stay"
    );
}

/// A gateway built in code has no file to reload: the error says so.
#[tokio::test]
async fn a_gateway_without_a_file_cannot_reload() {
    let err = Gateway::builder().build().reload().unwrap_err();
    assert_eq!(err.field(), "reload", "{err}");
    assert!(err.message().contains("Gateway::load"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// In-flight traffic.

/// Streams in flight survive a reload that removes their endpoint and their key: both finish
/// with `data: [DONE]` and a clean end; the next requests see the new file.
#[tokio::test]
async fn in_flight_streams_survive_a_reload() {
    let dir = TempDir::new("inflight");
    let (upstream, mut streams) = sse_upstream().await;
    let up = upstream.addr.to_string();
    dir.write("upstream.key", UPSTREAM_KEY);
    let with_endpoints = |keys: &str, endpoints: &[&str]| {
        let mut text = format!(
            r#"{keys}
[[accounts]]
name = "coreweave-model"
header_auth = {{ Authorization = "Bearer ${{file:upstream.key}}" }}
access = {{ users = ["everyone"] }}
"#
        );
        for ep in endpoints {
            text.push_str(&format!(
                "\n[[accounts.endpoints]]\nname = \"{ep}\"\nbase_url = \"http://{up}/{ep}\"\n"
            ));
        }
        text
    };
    let both_keys = format!(
        "{}{}",
        key("alice", "\"research\"", ALICE),
        key("bob", "\"sales\"", BOB)
    );
    let path = dir.write("gateway.toml", &with_endpoints(&both_keys, &["one", "two"]));
    let gw = serve_app(Gateway::load(&path).unwrap()).await;

    // Alice streams through `one`, bob through `two`.
    let mut alice = open_stream(
        gw.url("/proxy-api/coreweave-model/one/chat/completions"),
        ALICE,
    )
    .await;
    let (path_a, events_a) = within("alice's upstream stream", streams.recv())
        .await
        .unwrap();
    assert_eq!(path_a, "/one/chat/completions");
    let mut bob = open_stream(
        gw.url("/proxy-api/coreweave-model/two/chat/completions"),
        BOB,
    )
    .await;
    let (path_b, events_b) = within("bob's upstream stream", streams.recv())
        .await
        .unwrap();
    assert_eq!(path_b, "/two/chat/completions");
    for (events, body) in [(&events_a, &mut alice), (&events_b, &mut bob)] {
        events.send(Ok(sse_event(0).into())).await.unwrap();
        assert_eq!(
            next_data(body).await.unwrap().unwrap(),
            sse_event(0).as_bytes()
        );
    }

    // The new file has neither `one` nor bob's key.
    dir.write(
        "gateway.toml",
        &with_endpoints(&key("alice", "\"research\"", ALICE), &["two"]),
    );
    gw.gateway
        .reload()
        .unwrap_or_else(|e| panic!("reload: {e}"));

    for (events, body) in [(events_a, &mut alice), (events_b, &mut bob)] {
        let mut want = String::new();
        for i in 1..4 {
            events.send(Ok(sse_event(i).into())).await.unwrap();
            want.push_str(&sse_event(i));
        }
        events.send(Ok(SSE_DONE.into())).await.unwrap();
        want.push_str(SSE_DONE);
        drop(events);
        let rest = read_to_end(body).await.expect("a clean end");
        let rest = String::from_utf8(rest).unwrap();
        assert_eq!(rest, want);
        assert!(rest.ends_with("data: [DONE]\n\n"));
    }

    let ans = get(&gw, "/proxy-api/coreweave-model/one/models", ALICE).await;
    assert_eq!(ans.status, 404, "{}", ans.body);
    let ans = get(&gw, "/proxy-api/coreweave-model/two/models", BOB).await;
    assert_eq!(ans.status, 401, "{}", ans.body);
    let ans = get(&gw, "/proxy-api/coreweave-model/two/models", ALICE).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    assert_eq!(upstream.count(), 3);
    assert_eq!(
        upstream.last().headers["authorization"],
        format!("Bearer {UPSTREAM_KEY}").as_str(),
        "the secret file's trailing newline is trimmed"
    );
}

/// Requests flowing while the file is reloaded over and over (alternating between two good
/// files that both keep alice and `one`) never see a gap: every one is a 200.
#[tokio::test]
async fn requests_during_reloads_never_fail() {
    let dir = TempDir::new("churn");
    let (mock, up) = mock().await;
    let (_path, gw) = start(&dir, &up).await;
    let other = format!(
        "{}{}\n[[accounts.endpoints]]\nname = \"extra\"\nbase_url = \"http://{up}/v1\"\n",
        key("carol", "\"platform\"", CAROL),
        v1(&up)
    );
    let url = gw.url("/proxy-api/coreweave-model/one/chat/completions");
    let traffic = tokio::spawn(async move {
        let mut statuses = Vec::new();
        for _ in 0..40 {
            let ans = send_json(
                Method::POST,
                url.clone(),
                Some(ALICE),
                Some(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#),
            )
            .await;
            statuses.push(ans.status.as_u16());
            tokio::task::yield_now().await;
        }
        statuses
    });
    let mut reloads = 0;
    while !traffic.is_finished() && reloads < 400 {
        let text = if reloads % 2 == 0 {
            other.clone()
        } else {
            v1(&up)
        };
        dir.write("gateway.toml", &text);
        gw.gateway.reload().unwrap();
        reloads += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let statuses = within("the traffic", traffic).await.unwrap();
    assert!(reloads > 1, "the reloads did not overlap the traffic");
    assert!(statuses.iter().all(|s| *s == 200), "{statuses:?}");
    assert_eq!(mock.requests(), 40);
}
