//! Upstream pools (endpoints with several targets) against real failing upstreams on loopback:
//! weights, ejection and recovery, retries before the first byte with the body replayed, the retry budget, cancellation, and
//! what the management API shows.

mod scripted;
mod support;

use std::time::Duration;

use bytes::Bytes;
use http::{Method, StatusCode};
use http_body_util::{BodyExt, Full};
use scripted::{Act, Scripted, refusing_addr};
use support::*;

/// A gateway whose endpoint `ENDPOINT` has `targets` (TOML inline tables, comma-separated) and
/// the `extra` endpoint fields; its account injects `Authorization: Bearer UP_KEY`, and the key
/// `GW_KEY` manages it.
fn pool_gateway(targets: &str, extra: &str) -> tower_gateway::gateway::Gateway {
    gateway_from_toml(&format!(
        "[[keys]]\nid = \"k\"\nsubject = \"k@example.com\"\nkey = \"{GW_KEY}\"\n\n\
         [[accounts]]\nname = \"{ACCOUNT}\"\nheader_auth = {{ Authorization = \"Bearer {UP_KEY}\" }}\n\
         access = {{ managers = [\"everyone\"] }}\n\n\
         [[accounts.endpoints]]\nname = \"{ENDPOINT}\"\ntargets = [{targets}]\n{extra}\n"
    ))
}

const CHAT: &str = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;

async fn chat(gw: &TestGateway) -> (StatusCode, String) {
    let res = within(
        "a chat completion",
        client().request(post_json(gw.proxy_url("/chat/completions"), CHAT)),
    )
    .await
    .unwrap();
    let status = res.status();
    (status, body_string(res).await)
}

async fn endpoint_view(gw: &TestGateway) -> serde_json::Value {
    let got = send_json(
        Method::GET,
        gw.url(&format!("/manage/accounts/{ACCOUNT}/endpoints/{ENDPOINT}")),
        Some(GW_KEY),
        None,
    )
    .await;
    assert_eq!(got.status, 200, "{}", got.body);
    got.json()
}

fn ok() -> Act {
    Act::Ok {
        delay: Duration::ZERO,
    }
}

#[tokio::test]
async fn weights_hold_and_a_later_priority_waits_its_turn() {
    let (a, b, backup) = (
        Scripted::start(ok()).await,
        Scripted::start(ok()).await,
        Scripted::start(ok()).await,
    );
    let gw = serve_app(pool_gateway(
        &format!(
            "{{ base_url = \"{}\", weight = 3 }}, {{ base_url = \"{}\" }}, {{ base_url = \"{}\", priority = 2 }}",
            a.base_url(),
            b.base_url(),
            backup.base_url()
        ),
        "",
    ))
    .await;
    const N: usize = 1000;
    for _ in 0..N {
        let (status, _) = chat(&gw).await;
        assert_eq!(status, 200);
    }
    let share = a.count() as f64 / N as f64;
    eprintln!(
        "a {} b {} backup {}: a's share {share:.3} (3/4 expected)",
        a.count(),
        b.count(),
        backup.count()
    );
    // 3:1 within 6 points over 1,000 requests (the binomial's σ is 1.4 points; the rest is
    // room for latency noise between two loopback servers).
    assert!((share - 0.75).abs() < 0.06, "a's share {share}");
    assert_eq!(a.count() + b.count(), N);
    assert_eq!(
        backup.count(),
        0,
        "priority 2 waits while priority 1 is live"
    );
}

#[tokio::test]
async fn a_dead_target_is_ejected_and_comes_back_after_its_cool_down() {
    let live = Scripted::start(ok()).await;
    let dead = refusing_addr().await;
    let gw = serve_app(pool_gateway(
        &format!(
            "{{ base_url = \"{}\" }}, {{ base_url = \"http://{dead}/v1\" }}",
            live.base_url()
        ),
        "retry = { attempts = 2 }\neject = { consecutive_failures = 2, base_ms = 1500, max_ms = 60000 }",
    ))
    .await;
    // Every request succeeds: a refused attempt is retried on the live target.
    for _ in 0..40 {
        assert_eq!(chat(&gw).await.0, 200);
    }
    let view = endpoint_view(&gw).await;
    let dead_view = &view["targets"][1];
    assert_eq!(dead_view["state"], "ejected", "{view}");
    assert!(dead_view["ejected_until"].is_string(), "{view}");
    assert_eq!(view["targets"][0]["state"], "live");
    // Attempts on the dead target stopped after two failures: 38 or more went straight to the
    // live target (which saw all 40).
    assert_eq!(live.count(), 40);
    let attempts_before = live.count();
    let revived = Scripted::start_at(dead, ok()).await;
    // After the cool-down (however long this machine took to get here) it gets traffic again.
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut sent = 0;
    while revived.count() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the revived target got no traffic"
        );
        assert_eq!(chat(&gw).await.0, 200);
        sent += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(revived.count() + live.count() - attempts_before, sent);
    assert_eq!(endpoint_view(&gw).await["targets"][1]["state"], "live");
}

#[tokio::test]
async fn a_health_check_brings_a_target_back_before_its_cool_down() {
    let live = Scripted::start(ok()).await;
    let flaky = Scripted::start(Act::Status(503, vec![])).await;
    let gw = serve_app(pool_gateway(
        &format!(
            "{{ base_url = \"{}\", priority = 2 }}, {{ base_url = \"{}\" }}",
            live.base_url(),
            flaky.base_url()
        ),
        "eject = { consecutive_failures = 1, base_ms = 600000, max_ms = 600000 }\nhealth = { path = \"/models\", interval_ms = 100 }",
    ))
    .await;
    for _ in 0..10 {
        assert_eq!(chat(&gw).await.0, 200);
    }
    assert_eq!(endpoint_view(&gw).await["targets"][1]["state"], "ejected");
    let probes_while_down = flaky.count();
    flaky.set(ok());
    // The probe sees a 2xx within a few intervals; the target is live long before 10 min.
    flaky
        .until("a passing probe", |f| {
            f.seen()
                .iter()
                .any(|r| r.path == "/v1/models" && f.count() > probes_while_down)
        })
        .await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while endpoint_view(&gw).await["targets"][1]["state"] != "live" {
        assert!(tokio::time::Instant::now() < deadline, "not back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let probe = flaky
        .seen()
        .into_iter()
        .find(|r| r.path == "/v1/models")
        .unwrap();
    assert_eq!(probe.method, "GET");
    assert_eq!(
        probe.header("authorization"),
        Some(format!("Bearer {UP_KEY}").as_str()),
        "the probe carries the target's credential"
    );
    let before = flaky.count();
    for _ in 0..20 {
        assert_eq!(chat(&gw).await.0, 200);
    }
    assert!(flaky.count() > before, "no traffic after recovery");
}

#[tokio::test]
async fn a_post_body_is_replayed_byte_for_byte_with_the_next_targets_own_credential() {
    let first = Scripted::start(Act::Status(503, vec![])).await;
    let second = Scripted::start(ok()).await;
    let gw = serve_app(pool_gateway(
        &format!(
            "{{ base_url = \"{}\", headers = {{ Authorization = \"Bearer key-FIRST\", X-Only-First = \"1\" }} }}, \
             {{ base_url = \"{}\", priority = 2, headers = {{ Authorization = \"Bearer key-SECOND\" }} }}",
            first.base_url(),
            second.base_url()
        ),
        "retry = { attempts = 2 }",
    ))
    .await;
    // 300 KB that the gateway reads in many frames, sent as a stream of chunks.
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let (tx, stream) = ChannelBody::channel(4);
    let chunks: Vec<Bytes> = body.chunks(7_000).map(Bytes::copy_from_slice).collect();
    tokio::spawn(async move {
        for c in chunks {
            if tx.send(Ok(c)).await.is_err() {
                return;
            }
        }
    });
    let req = http::Request::post(gw.proxy_url("/chat/completions?api-version=1"))
        .header("authorization", format!("Bearer {GW_KEY}"))
        .header("content-type", "application/octet-stream")
        .header("x-client-header", "kept")
        .body(stream)
        .unwrap();
    let streaming =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build_http::<ChannelBody>();
    let res = within("the response", streaming.request(req))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let (a, b) = (first.seen(), second.seen());
    assert_eq!((a.len(), b.len()), (1, 1));
    let (a, b) = (&a[0], &b[0]);
    assert_eq!(a.body.len(), body.len());
    assert!(a.body == body && b.body == body, "the body differs");
    assert_eq!(a.path, "/v1/chat/completions?api-version=1");
    assert_eq!(b.path, a.path);
    assert_eq!(a.header("authorization"), Some("Bearer key-FIRST"));
    assert_eq!(b.header_values("authorization"), ["Bearer key-SECOND"]);
    assert_eq!(
        b.header("x-only-first"),
        None,
        "the first target's header went on"
    );
    for r in [a, b] {
        assert_eq!(r.header("x-client-header"), Some("kept"));
        assert_eq!(r.header("content-type"), Some("application/octet-stream"));
        assert!(!r.headers.iter().any(|(_, v)| v.contains(GW_KEY)));
    }
    // Every header of the first attempt is in the second but the target's own.
    let own = ["authorization", "x-only-first", "host"];
    let rest = |r: &scripted::Request| {
        let mut h: Vec<_> = r
            .headers
            .iter()
            .filter(|(n, _)| !own.contains(&n.as_str()))
            .cloned()
            .collect();
        h.sort();
        h
    };
    assert_eq!(rest(a), rest(b));
}

#[tokio::test]
async fn a_body_over_the_replay_limit_is_sent_once_and_not_retried() {
    let first = Scripted::start(Act::Status(503, vec![])).await;
    let second = Scripted::start(ok()).await;
    let gw = serve_app(pool_gateway(
        &format!(
            "{{ base_url = \"{}\" }}, {{ base_url = \"{}\", priority = 2 }}",
            first.base_url(),
            second.base_url()
        ),
        "retry = { attempts = 2, max_body_bytes = 1024 }",
    ))
    .await;
    let big = format!(r#"{{"model":"m","pad":"{}"}}"#, "x".repeat(4096));
    let res = within(
        "the response",
        client().request(post_json(gw.proxy_url("/chat/completions"), &big)),
    )
    .await
    .unwrap();
    assert_eq!(res.status(), 503, "the first target's answer, not retried");
    assert_eq!(second.count(), 0);
    // A small body is retried.
    let (status, _) = chat(&gw).await;
    assert_eq!(status, 200);
    assert_eq!(second.count(), 1);
}

#[tokio::test]
async fn resets_timeouts_and_statuses_fail_over_but_nothing_after_the_head() {
    let backup = Scripted::start(Act::Sse { events: 3 }).await;
    let primary = Scripted::start(Act::ResetBeforeHead).await;
    let gw = serve_app(pool_gateway(
        &format!(
            "{{ base_url = \"{}\", timeouts = {{ first_byte_ms = 300 }} }}, {{ base_url = \"{}\", priority = 2 }}",
            primary.base_url(),
            backup.base_url()
        ),
        "retry = { attempts = 2 }\neject = { consecutive_failures = 100, error_percent = 0 }",
    ))
    .await;
    let stream = r#"{"model":"m","stream":true,"messages":[]}"#;
    for (act, what) in [
        (Act::ResetBeforeHead, "a reset before the head"),
        (Act::Hang, "no head within the first-byte timeout"),
        (Act::Status(502, vec![]), "a 502"),
        (
            Act::Status(429, vec![("retry-after", "0".to_owned())]),
            "a 429",
        ),
    ] {
        primary.set(act);
        let before = backup.count();
        let res = within(
            what,
            client().request(post_json(gw.proxy_url("/chat/completions"), stream)),
        )
        .await
        .unwrap();
        assert_eq!(res.status(), 200, "{what}");
        let text = body_string(res).await;
        assert!(text.ends_with("data: [DONE]\n\n"), "{what}: {text}");
        assert_eq!(backup.count(), before + 1, "{what}");
    }
    // A stream cut after its head went out is never retried: the client gets the events that
    // came, the error event, and a cut.
    primary.set(Act::CutMidStream);
    let before = backup.count();
    let mut body = open_stream(gw.proxy_url("/chat/completions"), GW_KEY).await;
    let mut got = Vec::new();
    let cut = loop {
        match within("the stream", body.frame()).await {
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                }
            }
            Some(Err(_)) => break true,
            None => break false,
        }
    };
    let text = String::from_utf8_lossy(&got);
    assert!(cut, "the stream ended cleanly: {text}");
    assert!(text.contains("t1 "), "{text}");
    assert!(text.contains(r#"data: {"error""#), "{text}");
    assert!(!text.contains("[DONE]"), "{text}");
    assert_eq!(backup.count(), before, "retried after the head");
}

#[tokio::test]
async fn the_retry_budget_caps_what_a_failing_pool_receives() {
    let (a, b) = (
        Scripted::start(Act::Status(503, vec![])).await,
        Scripted::start(Act::Status(503, vec![])).await,
    );
    let gw = serve_app(pool_gateway(
        &format!(
            "{{ base_url = \"{}\" }}, {{ base_url = \"{}\" }}",
            a.base_url(),
            b.base_url()
        ),
        "retry = { attempts = 3, budget_percent = 20, min_per_second = 0 }\neject = { consecutive_failures = 1000000, error_percent = 0 }",
    ))
    .await;
    const N: usize = 200;
    let requests = (0..N).map(|_| chat(&gw));
    let answers = within("the burst", futures_util::future::join_all(requests)).await;
    assert!(answers.iter().all(|(s, _)| *s == 503));
    let attempts = a.count() + b.count();
    eprintln!("{N} requests, {attempts} attempts upstream");
    // Without a budget: 3 attempts each, 600. With 20%: at most 200 + 40.
    assert!(attempts >= N, "{attempts}");
    assert!(
        attempts <= N + N / 5 + 1,
        "{attempts} attempts for {N} requests"
    );
}

#[tokio::test]
async fn a_client_that_leaves_during_a_retry_leaves_no_attempt_upstream() {
    let first = Scripted::start(Act::Hang).await;
    let second = Scripted::start(Act::Hang).await;
    let third = Scripted::start(ok()).await;
    let gw = serve_app(pool_gateway(
        &format!(
            "{{ base_url = \"{}\" }}, {{ base_url = \"{}\", priority = 2 }}, {{ base_url = \"{}\", priority = 3 }}",
            first.base_url(),
            second.base_url(),
            third.base_url()
        ),
        "retry = { attempts = 3 }\ntimeouts = { first_byte_ms = 1500 }",
    ))
    .await;
    let call = tokio::spawn({
        let uri = gw.proxy_url("/chat/completions");
        async move { client().request(post_json(uri, CHAT)).await }
    });
    // The first attempt times out; the second is in flight: the client goes.
    second.until("the second attempt", |s| s.count() == 1).await;
    call.abort();
    second
        .until("the second attempt's connection to close", |s| {
            s.hung_closed() == 1
        })
        .await;
    // Nothing more is tried: the third target never hears of the request.
    tokio::time::sleep(Duration::from_millis(900)).await;
    assert_eq!(third.count(), 0, "an attempt after the client left");
    assert_eq!(first.hung_closed(), 1, "the timed-out attempt was closed");
}

#[tokio::test]
async fn a_429_with_retry_after_takes_its_target_out_until_then() {
    let limited = Scripted::start(Act::Status(429, vec![("retry-after", "2".to_owned())])).await;
    let other = Scripted::start(ok()).await;
    let gw = serve_app(pool_gateway(
        &format!(
            "{{ base_url = \"{}\" }}, {{ base_url = \"{}\", priority = 2 }}",
            limited.base_url(),
            other.base_url()
        ),
        "",
    ))
    .await;
    assert_eq!(chat(&gw).await.0, 200);
    assert_eq!(limited.count(), 1);
    let view = endpoint_view(&gw).await;
    assert_eq!(view["targets"][0]["state"], "ejected", "{view}");
    for _ in 0..20 {
        assert_eq!(chat(&gw).await.0, 200);
    }
    assert_eq!(limited.count(), 1, "used before its Retry-After");
    limited.set(ok());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(chat(&gw).await.0, 200);
    assert_eq!(limited.count(), 2, "not used again after its Retry-After");
}

#[tokio::test]
async fn the_management_api_reads_and_writes_pools() {
    let (a, b) = (Scripted::start(ok()).await, Scripted::start(ok()).await);
    let gw = serve_app(pool_gateway(
        &format!("{{ base_url = \"{}\" }}", a.base_url()),
        "",
    ))
    .await;
    let path = gw.url(&format!("/manage/accounts/{ACCOUNT}/endpoints/{ENDPOINT}"));
    let body = serde_json::json!({
        "headers": {"Authorization": format!("Bearer {UP_KEY}")},
        "targets": [
            {"base_url": a.base_url(), "weight": 2},
            {"base_url": b.base_url(), "priority": 2, "headers": {"Authorization": "Bearer SECRET-B"},
             "timeouts": {"first_byte_ms": 5000}},
        ],
        "retry": {"attempts": 2, "on_status": [503]},
        "eject": {"consecutive_failures": 3},
        "health": {"path": "/models", "interval_ms": 1000},
    });
    let put = send_json(
        Method::PUT,
        path.clone(),
        Some(GW_KEY),
        Some(&body.to_string()),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert!(
        !put.body.contains("SECRET-B"),
        "a target's header value in {}",
        put.body
    );
    let view = put.json();
    assert_eq!(view["targets"][0]["weight"], 2);
    assert_eq!(view["targets"][1]["priority"], 2);
    assert_eq!(view["targets"][1]["header_names"][0], "authorization");
    assert_eq!(view["targets"][1]["timeouts"]["first_byte_ms"], 5000);
    assert_eq!(view["retry"]["attempts"], 2);
    assert_eq!(view["retry"]["on_status"], serde_json::json!([503]));
    assert_eq!(view["eject"]["consecutive_failures"], 3);
    assert_eq!(view["health"]["path"], "/models");
    // The second target's own credential reaches it (when the first is down).
    a.set(Act::Status(503, vec![]));
    assert_eq!(chat(&gw).await.0, 200);
    assert_eq!(b.seen()[0].header("authorization"), Some("Bearer SECRET-B"));
    // A target sent again without headers keeps its own; a target at a new URL does not
    // inherit them.
    let again = serde_json::json!({
        "targets": [
            {"base_url": a.base_url()},
            {"base_url": b.base_url(), "priority": 2},
        ],
    });
    let put = send_json(
        Method::PUT,
        path.clone(),
        Some(GW_KEY),
        Some(&again.to_string()),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.json()["targets"][1]["header_names"][0], "authorization");
    let moved = serde_json::json!({
        "headers": {"Authorization": format!("Bearer {UP_KEY}")},
        "targets": [
            {"base_url": a.base_url()},
            {"base_url": format!("{}/v2", b.base_url()), "priority": 2},
        ],
    });
    let put = send_json(
        Method::PUT,
        path.clone(),
        Some(GW_KEY),
        Some(&moved.to_string()),
    )
    .await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(
        put.json()["targets"][1]["header_names"],
        serde_json::json!([]),
        "a target at a new URL inherited another's headers"
    );
    // Field errors name the field.
    for (body, field) in [
        (
            serde_json::json!({"targets": [{"base_url": "https://x.example/v1/"}]}),
            "targets[0].base_url",
        ),
        (
            serde_json::json!({"targets": [{"base_url": a.base_url(), "weight": 0}]}),
            "targets[0].weight",
        ),
        (
            serde_json::json!({"base_url": a.base_url(), "targets": [{"base_url": a.base_url()}]}),
            "base_url",
        ),
        (
            serde_json::json!({"base_url": a.base_url(), "retry": {"attempts": 11}}),
            "retry.attempts",
        ),
        (
            serde_json::json!({"base_url": a.base_url(), "health": {"path": "models"}}),
            "health.path",
        ),
        (
            serde_json::json!({"targets": [{"base_url": a.base_url(), "headers": {"x": "a\nb"}}]}),
            "targets[0].headers.x",
        ),
    ] {
        let res = send_json(
            Method::PUT,
            path.clone(),
            Some(GW_KEY),
            Some(&body.to_string()),
        )
        .await;
        assert_eq!(res.status, 400, "{body}: {}", res.body);
        assert!(
            res.error_message().starts_with(&format!("{field}:")),
            "{body}: {}",
            res.error_message()
        );
    }
    // A one-target endpoint shows its one target.
    let one = serde_json::json!({"base_url": a.base_url()});
    let put = send_json(Method::PUT, path, Some(GW_KEY), Some(&one.to_string())).await;
    assert_eq!(put.status, 200, "{}", put.body);
    assert_eq!(put.json()["targets"].as_array().unwrap().len(), 1);
    assert_eq!(put.json()["retry"]["attempts"], 1);
}

#[tokio::test]
async fn a_single_target_endpoint_sees_no_change() {
    // `targets` with one entry behaves as `base_url`: one attempt, no retry, its own header.
    let only = Scripted::start(Act::Status(503, vec![])).await;
    let gw = serve_app(pool_gateway(
        &format!(
            "{{ base_url = \"{}\", headers = {{ X-Target = \"t\" }} }}",
            only.base_url()
        ),
        "",
    ))
    .await;
    assert_eq!(chat(&gw).await.0, 503);
    assert_eq!(only.count(), 1);
    assert_eq!(only.seen()[0].header("x-target"), Some("t"));
    let res = client()
        .request(
            http::Request::get(gw.proxy_url("/models"))
                .header("authorization", format!("Bearer {GW_KEY}"))
                .body(Full::<Bytes>::default())
                .unwrap(),
        )
        .await
        .unwrap();
    assert_eq!(res.status(), 503);
}

#[tokio::test]
async fn a_stored_credential_never_reaches_a_target_that_did_not_get_it() {
    const PLATFORM: &str = "gw-platform-CANARY-1b2c";
    const RESEARCH: &str = "gw-research-CANARY-3d4e";
    let (a, b) = (Scripted::start(ok()).await, Scripted::start(ok()).await);
    let gw = serve_app(gateway_from_toml(&format!(
        "[[keys]]\nid = \"p\"\nsubject = \"p@example.com\"\nteams = [\"platform\"]\nkey = \"{PLATFORM}\"\n\n\
         [[keys]]\nid = \"r\"\nsubject = \"r@example.com\"\nteams = [\"research\"]\nkey = \"{RESEARCH}\"\n\n\
         [[accounts]]\nname = \"{ACCOUNT}\"\naccess = {{ managers = [\"team:platform\"] }}\n\n\
         [[accounts.endpoints]]\nname = \"{ENDPOINT}\"\nheaders = {{ Authorization = \"Bearer EP-SECRET\" }}\n\
         access = {{ managers = [\"team:research\"] }}\n\
         targets = [{{ base_url = \"{}\", headers = {{ Authorization = \"Bearer A-SECRET\" }} }}, {{ base_url = \"{}\" }}]\n",
        a.base_url(),
        b.base_url()
    )))
    .await;
    let path = gw.url(&format!("/manage/accounts/{ACCOUNT}/endpoints/{ENDPOINT}"));
    // Each PUT keeps the endpoint's grant (a PUT replaces what it leaves out).
    let put = |key: &'static str, mut body: serde_json::Value| {
        let path = path.clone();
        body["access"] = serde_json::json!({"managers": ["team:research"]});
        async move { send_json(Method::PUT, path, Some(key), Some(&body.to_string())).await }
    };
    // The same targets, headers left out: each keeps what it had.
    let same =
        serde_json::json!({"targets": [{"base_url": a.base_url()}, {"base_url": b.base_url()}]});
    let res = put(RESEARCH, same).await;
    assert_eq!(res.status, 200, "{}", res.body);
    // Dropping A's own credential would send it the endpoint's: refused to an endpoint
    // manager, and to an account manager unless the header is sent again.
    let dropped = serde_json::json!({"targets": [{"base_url": a.base_url(), "headers": {}}, {"base_url": b.base_url()}]});
    let res = put(RESEARCH, dropped.clone()).await;
    assert_eq!(res.status, 403, "{}", res.body);
    assert!(
        res.error_message().contains("stored credential"),
        "{}",
        res.body
    );
    let res = put(PLATFORM, dropped).await;
    assert_eq!(res.status, 400, "{}", res.body);
    assert!(
        res.error_message().starts_with("headers:"),
        "{}",
        res.error_message()
    );
    // Another path on A's host, without A's own header: the endpoint's would follow.
    let moved = serde_json::json!({"targets": [{"base_url": format!("{}/v2", a.base_url())}, {"base_url": b.base_url()}]});
    let res = put(RESEARCH, moved).await;
    assert_eq!(res.status, 403, "{}", res.body);
    assert!(
        res.error_message().contains("stored credential"),
        "{}",
        res.body
    );
    assert!(!res.body.contains("SECRET"), "a credential in {}", res.body);
    // Typed in the request, a value goes where its manager says (on the hosts it had).
    let typed = serde_json::json!({
        "headers": {"Authorization": "Bearer EP-SECRET"},
        "targets": [{"base_url": a.base_url(), "headers": {"Authorization": "Bearer A-NEW"}}, {"base_url": b.base_url()}],
    });
    let res = put(RESEARCH, typed).await;
    assert_eq!(res.status, 200, "{}", res.body);
    for _ in 0..10 {
        let res = send_json(
            Method::POST,
            gw.proxy_url("/chat/completions"),
            Some(RESEARCH),
            Some(CHAT),
        )
        .await;
        assert_eq!(res.status, 200, "{}", res.body);
    }
    assert!(a.count() > 0 && b.count() > 0);
    for r in a.seen() {
        assert_eq!(r.header("authorization"), Some("Bearer A-NEW"));
    }
    for r in b.seen() {
        assert_eq!(r.header("authorization"), Some("Bearer EP-SECRET"));
    }
}
