//! Rate limits through the real stack: a gateway from a TOML file with `[[rate_limits.rules]]`
//! on a real hyper server, real upstreams on loopback, real clients (hyper, and the OpenAI
//! client library async-openai, which must recover from a 429 by itself).

mod support;

use std::time::Duration;

use async_openai::Client;
use async_openai::config::OpenAIConfig;
use async_openai::types::chat::{
    ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
};
use http::Method;
use tower_gateway::config::{GatewayConfig, SecretSource};
use tower_gateway::gateway::Gateway;

use support::*;

const RES: &str = "gw-research";
const SALES: &str = "gw-sales";

fn gateway(base_url: &str, rules: &str) -> Gateway {
    let keys = [("res", "research", RES), ("sales", "sales", SALES)];
    gateway_from_toml(&format!("{}{rules}", one_account_toml(base_url, &keys)))
}

async fn models(gw: &TestGateway, key: &str) -> Answer {
    send_json(
        Method::GET,
        gw.url(&format!("/proxy-api/{ACCOUNT}/{ENDPOINT}/models")),
        Some(key),
        None,
    )
    .await
}

/// A team's requests per minute: its keys share one bucket; the request over the limit gets
/// 429 in the OpenAI shape with an honest `Retry-After`, and never reaches the upstream;
/// another team is not affected; every answer says what is left.
#[tokio::test]
async fn a_team_limit_admits_its_rate_and_refuses_the_rest() {
    let (up, _feeds) = sse_upstream().await;
    let gw = serve_gateway(gateway(
        &up.base_url(),
        &format!(
            "[[rate_limits.rules]]\nscope = \"team:research\"\nendpoint = \"{ACCOUNT}/{ENDPOINT}\"\nrequests_per_minute = 3"
        ),
    ))
    .await;
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let ans = models(&gw, RES).await;
        assert_eq!(ans.status, 200, "{}", ans.body);
        assert_eq!(ans.headers["x-ratelimit-limit-requests"], "3");
        assert!(ans.headers.contains_key("x-ratelimit-reset-requests"));
        remaining.push(
            ans.headers["x-ratelimit-remaining-requests"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let seen = up.count();
    let ans = models(&gw, RES).await;
    assert_eq!(ans.status, 429, "{}", ans.body);
    assert_eq!(ans.headers["x-gateway-error"], "rate_limit_exceeded");
    let err = ans.json();
    assert_eq!(err["error"]["type"], "rate_limit_exceeded");
    assert_eq!(err["error"]["code"], "rate_limit_exceeded");
    let retry: u64 = ans.headers["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    let retry_ms: u64 = ans.headers["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (19..=20).contains(&retry),
        "one request every 20 s: {retry}"
    );
    assert!(
        retry_ms <= retry * 1000 && retry_ms > (retry - 1) * 1000,
        "{retry_ms}"
    );
    assert_eq!(
        up.count(),
        seen,
        "a refused request never reaches the upstream"
    );
    assert_eq!(
        models(&gw, SALES).await.status,
        200,
        "another team's bucket"
    );
}

/// One stream at a time per key: a second is refused while the first runs, and admitted once
/// it has ended.
#[tokio::test]
async fn concurrent_streams_are_held_until_the_body_ends() {
    let (up, mut feeds) = sse_upstream().await;
    let gw = serve_gateway(gateway(
        &up.base_url(),
        "[[rate_limits.rules]]\nscope = \"everyone\"\nconcurrent_streams = 1",
    ))
    .await;
    let chat = gw.url(&format!("/proxy-api/{ACCOUNT}/{ENDPOINT}/chat/completions"));
    let mut body = open_stream(chat.clone(), RES).await;
    let (_, events) = within("the stream", feeds.recv()).await.unwrap();
    let refused = send_json(Method::POST, chat.clone(), Some(RES), Some("{}")).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(
        models(&gw, SALES).await.status,
        200,
        "each key has its own slot"
    );
    events.send(Ok(sse_event(0).into())).await.unwrap();
    events.send(Ok(SSE_DONE.into())).await.unwrap();
    drop(events);
    read_to_end(&mut body).await.unwrap();
    drop(body);
    let mut again = None;
    for _ in 0..100 {
        let ans = models(&gw, RES).await;
        if ans.status == 200 {
            again = Some(ans);
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(again.is_some(), "the slot was freed when the stream ended");
}

/// A token budget through the real stack, in memory: a request reserves tokens when it starts
/// and the headers say what is left; a stream is charged the usage it reports when it ends; a
/// client gone mid-stream leaves its reservation charged; a spent budget is 429
/// `insufficient_quota`, and the refusal is on the request's span.
#[tokio::test]
async fn a_token_budget_is_charged_from_the_stream_and_refuses_when_spent() {
    let (up, mut feeds) = sse_upstream().await;
    let gw = gateway(
        &up.base_url(),
        "[rate_limits]\nreserve_tokens = 40\n[[rate_limits.rules]]\nscope = \"key:res\"\ntokens_per_day = 100",
    );
    let served = serve_gateway(gw.clone()).await;
    let chat = served.url(&format!("/proxy-api/{ACCOUNT}/{ENDPOINT}/chat/completions"));
    let used = || async {
        let usage = gw.rate_limits_usage("key:res").await.unwrap();
        assert_eq!(usage[0].limit, "tokens_per_day");
        100 - usage[0].remaining
    };

    // A stream that reports 50 tokens: 40 reserved, then 50 charged.
    let req = http::Request::post(chat.clone())
        .header("authorization", format!("Bearer {RES}"))
        .header("content-type", "application/json")
        .body(http_body_util::Full::from(
            r#"{"model":"m","stream":true,"messages":[]}"#,
        ))
        .unwrap();
    let res = within("the stream's head", client().request(req))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["x-ratelimit-limit-tokens"], "100");
    assert_eq!(res.headers()["x-ratelimit-remaining-tokens"], "60");
    assert!(res.headers().contains_key("x-ratelimit-reset-tokens"));
    let mut body = res.into_body();
    let (_, events) = within("the stream", feeds.recv()).await.unwrap();
    events.send(Ok(sse_event(0).into())).await.unwrap();
    events
        .send(Ok(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":20,\"completion_tokens\":30}}\n\n"
                .into(),
        ))
        .await
        .unwrap();
    events.send(Ok(SSE_DONE.into())).await.unwrap();
    drop(events);
    read_to_end(&mut body).await.unwrap();
    drop(body);
    let mut settled = false;
    for _ in 0..100 {
        if used().await == 50 {
            settled = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        settled,
        "charged the 50 the stream reported, not the 40 reserved"
    );

    // A client gone mid-stream: nothing reports its usage, its 40 reserved stay charged.
    let mut body = open_stream(chat.clone(), RES).await;
    let (_, events) = within("the second stream", feeds.recv()).await.unwrap();
    events.send(Ok(sse_event(0).into())).await.unwrap();
    within("the first event", next_data(&mut body)).await;
    drop(body);
    // The gateway lets go of the upstream once it sees the client gone.
    let mut gone = false;
    for i in 0..200 {
        if events.send(Ok(sse_event(i).into())).await.is_err() {
            gone = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(gone, "the gateway dropped the upstream stream");
    assert_eq!(used().await, 90);

    // 90 of 100: one more request may start (it reserves 40), then the budget is spent.
    assert_eq!(models(&served, RES).await.status, 200);
    let refused = models(&served, RES).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert_eq!(refused.headers["x-gateway-error"], "insufficient_quota");
    assert_eq!(refused.json()["error"]["type"], "insufficient_quota");
    assert!(refused.headers.contains_key("retry-after"));
    assert_eq!(
        models(&served, SALES).await.status,
        200,
        "another key's budget"
    );
}

/// The OpenAI client library hits the limit, waits and retries by itself, and succeeds.
#[tokio::test]
async fn the_openai_client_recovers_from_a_429_by_itself() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mock = MockUpstream::new(UP_KEY, Duration::from_millis(1));
    let addr = mock.spawn().await.unwrap();
    // 20 a minute: after a burst of 20, one every 3 s.
    let gw = serve_gateway(gateway(
        &format!("http://{addr}/v1"),
        "[[rate_limits.rules]]\nscope = \"key:res\"\nrequests_per_minute = 20",
    ))
    .await;
    for _ in 0..20 {
        assert_eq!(models(&gw, RES).await.status, 200);
    }
    // Exhausted: the client's first attempt, right after, is refused too.
    let refused = models(&gw, RES).await;
    assert_eq!(refused.status, 429);
    let wait: u64 = refused.headers["retry-after-ms"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(wait >= 2000, "{wait}");
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(format!(
                "{}/proxy-api/{ACCOUNT}/{ENDPOINT}",
                gw.base_url()
                    .trim_end_matches(&format!("/proxy-api/{ACCOUNT}/{ENDPOINT}"))
            ))
            .with_api_key(RES),
    );
    let request = CreateChatCompletionRequestArgs::default()
        .model("meta-llama/Llama-3.1-8B-Instruct")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("Say hello")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let response = within(
        "a completion after the client's own retries",
        client.chat().create(request),
    )
    .await
    .expect("the client retried past the 429");
    assert!(response.choices[0].message.content.is_some());
}

#[test]
fn bad_limit_configs_are_refused_with_the_field_named() {
    let load = |rules: &str| {
        GatewayConfig::from_toml(
            rules,
            &SecretSource::from_vars([("PW", "hunter2")], std::env::temp_dir()),
        )
    };
    for (toml, field) in [
        (
            "[rate_limits]\nbackend = \"http://:${PW}@127.0.0.1:6379\"",
            "rate_limits.backend",
        ),
        (
            "[rate_limits]\nbackend = \"redis://:${PW}@127.0.0.1:port\"",
            "rate_limits.backend",
        ),
        (
            "[rate_limits]\non_backend_error = \"maybe\"",
            "rate_limits.on_backend_error",
        ),
        (
            "[rate_limits]\nkey_prefix = \"a b\"",
            "rate_limits.key_prefix",
        ),
        (
            "[[rate_limits.rules]]\nscope = \"everyone\"\nrequests_per_minute = 0",
            "rate_limits.rules[0].requests_per_minute",
        ),
        (
            "[[rate_limits.rules]]\nscope = \"team:\"\ntokens_per_day = 10",
            "rate_limits.rules[0].scope",
        ),
        (
            "[[rate_limits.rules]]\nscope = \"everyone\"\ntokens_per_month = -1",
            "rate_limits.rules[0].tokens_per_month",
        ),
        (
            "[[rate_limits.rules]]\nscope = \"everyone\"\nendpoint = \"a/b/c\"\nconcurrent_streams = 2",
            "rate_limits.rules[0].endpoint",
        ),
    ] {
        let err = load(toml).unwrap_err();
        assert_eq!(err.field(), field, "{toml}: {err}");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }
    let ok = load(
        "[rate_limits]\nbackend = \"redis://:${PW}@127.0.0.1:6379\"\n[[rate_limits.rules]]\nscope = \"everyone\"\ntokens_per_minute = 1000",
    )
    .unwrap();
    assert!(!format!("{ok:?}").contains("hunter2"));
}
