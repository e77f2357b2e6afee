//! Rate limits shared by replicas in the machine's real Redis (`TEST_REDIS_URL`, default
//! `redis://127.0.0.1:6379`), each test under a key prefix of its own that it removes at the
//! end; and a private `redis-server` of the test's own, stopped and started again, for the
//! outage policy. Several gateways on real hyper servers share one Redis, as replicas behind a
//! load balancer would.
#![cfg(feature = "redis")]

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use http::Method;
use metrics_util::debugging::{DebugValue, DebuggingRecorder, Snapshotter};
use tower_gateway::gateway::Gateway;

use support::*;

const RES: &str = "gw-research";
const RES2: &str = "gw-research-2";

fn redis_url() -> String {
    std::env::var("TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A key prefix of this test's own in the shared Redis; its keys are deleted on drop.
struct Prefix(String);

impl Prefix {
    /// A new prefix, or `None` (said loudly) when Redis is not reachable outside CI.
    fn new() -> Option<Self> {
        static N: AtomicUsize = AtomicUsize::new(0);
        let reachable = redis::Client::open(redis_url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)))
            .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
        if let Err(err) = reachable {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(
                !ci,
                "Redis is required under CI and is not reachable: {err}"
            );
            eprintln!("SKIPPED: Redis is not reachable ({err}); this test did not run");
            return None;
        }
        Some(Self(format!(
            "gw-test-{}-{}-{}:",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        )))
    }

    fn keys(&self) -> Vec<String> {
        let Ok(mut conn) = redis::Client::open(redis_url()).and_then(|c| c.get_connection()) else {
            return Vec::new();
        };
        redis::cmd("KEYS")
            .arg(format!("{}*", self.0))
            .query(&mut conn)
            .unwrap_or_default()
    }
}

impl Drop for Prefix {
    fn drop(&mut self) {
        let keys = self.keys();
        if keys.is_empty() {
            return;
        }
        if let Ok(mut conn) = redis::Client::open(redis_url()).and_then(|c| c.get_connection()) {
            let _: Result<i64, _> = redis::cmd("DEL").arg(&keys).query(&mut conn);
        }
    }
}

fn gateway(base_url: &str, rate_limits: &str) -> Gateway {
    let keys = [("res", "research", RES), ("res2", "research", RES2)];
    gateway_from_toml(&format!(
        "{}{rate_limits}",
        one_account_toml(base_url, &keys)
    ))
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

fn header(ans: &Answer, name: &str) -> String {
    ans.headers[name].to_str().unwrap().to_owned()
}

/// Three replicas share one Redis: a burst spread over all of them admits exactly the team's
/// limit, the rest get 429 with a `Retry-After` after which a request succeeds, and the
/// remaining count every replica reports goes down across them.
#[tokio::test]
async fn three_replicas_admit_exactly_the_limit_from_a_spread_burst() {
    let Some(prefix) = Prefix::new() else { return };
    let (up, _feeds) = sse_upstream().await;
    let limits = format!(
        "[rate_limits]\nbackend = \"{}\"\nkey_prefix = \"{}\"\n[[rate_limits.rules]]\nscope = \"team:research\"\nrequests_per_minute = 30",
        redis_url(),
        prefix.0
    );
    let replicas = [
        serve_gateway(gateway(&up.base_url(), &limits)).await,
        serve_gateway(gateway(&up.base_url(), &limits)).await,
        serve_gateway(gateway(&up.base_url(), &limits)).await,
    ];
    let started = Instant::now();
    // 90 requests at once, round robin over the replicas and the team's two keys.
    let burst = (0..90).map(|i| {
        let gw = &replicas[i % 3];
        let key = if i % 2 == 0 { RES } else { RES2 };
        models(gw, key)
    });
    let answers = within("the burst", futures_util::future::join_all(burst)).await;
    let elapsed = started.elapsed();
    let admitted: Vec<&Answer> = answers.iter().filter(|a| a.status == 200).collect();
    let refused: Vec<&Answer> = answers.iter().filter(|a| a.status == 429).collect();
    assert_eq!(admitted.len() + refused.len(), 90, "only 200s and 429s");
    // 30 a minute: a burst of 30, then one every 2 s; the burst took `elapsed`.
    let refills = (elapsed.as_secs_f64() / 2.0).floor() as usize;
    assert!(
        (30..=30 + refills).contains(&admitted.len()),
        "admitted {} in {elapsed:?} (a limit of 30 a minute)",
        admitted.len()
    );
    assert_eq!(
        up.count(),
        admitted.len(),
        "a refused request never reaches the upstream"
    );
    let mut remaining: Vec<u64> = admitted
        .iter()
        .map(|a| header(a, "x-ratelimit-remaining-requests").parse().unwrap())
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining[0], 0);
    assert_eq!(
        *remaining.last().unwrap(),
        29,
        "the first admitted saw 29 left"
    );
    let refusal = refused[0];
    assert_eq!(refusal.json()["error"]["type"], "rate_limit_exceeded");
    let wait: u64 = header(refusal, "retry-after-ms").parse().unwrap();
    assert!(wait <= 2000, "one request every 2 s: {wait} ms");
    // After the wait the refused say, a request succeeds (on another replica).
    let wait: u64 = answers
        .iter()
        .filter(|a| a.status == 429)
        .map(|a| header(a, "retry-after-ms").parse::<u64>().unwrap())
        .max()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    let after = models(&replicas[1], RES).await;
    assert_eq!(after.status, 200, "Retry-After was honest: {}", after.body);
    drop(prefix);
}

/// A team's daily token budget across replicas: streams are charged what the usage tap reads
/// when they end; the stream that crosses the line finishes intact; the next request, on
/// another replica, is refused with `insufficient_quota`; the usage read back says so.
#[tokio::test]
async fn a_token_budget_holds_across_replicas_and_never_cuts_a_stream() {
    let Some(prefix) = Prefix::new() else { return };
    let (up, mut feeds) = sse_upstream().await;
    let limits = format!(
        "[rate_limits]\nbackend = \"{}\"\nkey_prefix = \"{}\"\nreserve_tokens = 10\n[[rate_limits.rules]]\nscope = \"team:research\"\ntokens_per_day = 100",
        redis_url(),
        prefix.0
    );
    let a = gateway(&up.base_url(), &limits);
    let replicas = [
        serve_gateway(a.clone()).await,
        serve_gateway(gateway(&up.base_url(), &limits)).await,
    ];
    let usage_event = |tokens: u64| {
        format!(
            "data: {{\"choices\":[],\"usage\":{{\"prompt_tokens\":{},\"completion_tokens\":{}}}}}\n\n",
            tokens / 2,
            tokens - tokens / 2
        )
    };
    // One stream of 60 tokens on each replica, the second started while the first runs.
    let chat =
        |gw: &TestGateway| gw.url(&format!("/proxy-api/{ACCOUNT}/{ENDPOINT}/chat/completions"));
    let mut first = open_stream(chat(&replicas[0]), RES).await;
    let (_, first_events) = within("the first stream", feeds.recv()).await.unwrap();
    let mut second = open_stream(chat(&replicas[1]), RES2).await;
    let (_, second_events) = within("the second stream", feeds.recv()).await.unwrap();
    for (events, body) in [(first_events, &mut first), (second_events, &mut second)] {
        events.send(Ok(sse_event(0).into())).await.unwrap();
        events.send(Ok(usage_event(60).into())).await.unwrap();
        events.send(Ok(SSE_DONE.into())).await.unwrap();
        drop(events);
        let bytes = within("a stream's end", read_to_end(body)).await.unwrap();
        assert!(
            bytes.ends_with(SSE_DONE.as_bytes()),
            "the stream finished intact: {}",
            String::from_utf8_lossy(&bytes)
        );
    }
    drop((first, second));
    // 120 of 100 used once both settle (on a task of their own, right after the end).
    let mut refused = None;
    for _ in 0..100 {
        let ans = models(&replicas[1], RES).await;
        if ans.status == 429 {
            refused = Some(ans);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = refused.expect("the spent budget was refused");
    assert_eq!(refused.headers["x-gateway-error"], "insufficient_quota");
    let err = refused.json();
    assert_eq!(err["error"]["type"], "insufficient_quota");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("100 tokens per day"),
        "{err}"
    );
    let retry: u64 = header(&refused, "retry-after").parse().unwrap();
    assert!(retry <= 86_400, "until the end of the UTC day: {retry}");
    // The usage, read without charging, from the other replica's limiter.
    let usage = a.rate_limits_usage("team:research").await.unwrap();
    assert_eq!(usage.len(), 1);
    assert_eq!(usage[0].limit, "tokens_per_day");
    assert_eq!(usage[0].remaining, 0);
    drop(prefix);
}

/// Streams per key across replicas: the second stream of a key is refused on another replica
/// while the first runs, and admitted once it ended.
#[tokio::test]
async fn concurrent_streams_are_counted_across_replicas() {
    let Some(prefix) = Prefix::new() else { return };
    let (up, mut feeds) = sse_upstream().await;
    let limits = format!(
        "[rate_limits]\nbackend = \"{}\"\nkey_prefix = \"{}\"\n[[rate_limits.rules]]\nscope = \"everyone\"\nconcurrent_streams = 1",
        redis_url(),
        prefix.0
    );
    let replicas = [
        serve_gateway(gateway(&up.base_url(), &limits)).await,
        serve_gateway(gateway(&up.base_url(), &limits)).await,
    ];
    let chat =
        |gw: &TestGateway| gw.url(&format!("/proxy-api/{ACCOUNT}/{ENDPOINT}/chat/completions"));
    let mut body = open_stream(chat(&replicas[0]), RES).await;
    let (_, events) = within("the stream", feeds.recv()).await.unwrap();
    let refused = send_json(Method::POST, chat(&replicas[1]), Some(RES), Some("{}")).await;
    assert_eq!(refused.status, 429, "{}", refused.body);
    assert!(
        refused.body.contains("1 concurrent streams"),
        "{}",
        refused.body
    );
    assert_eq!(models(&replicas[1], RES2).await.status, 200, "another key");
    events.send(Ok(SSE_DONE.into())).await.unwrap();
    drop(events);
    read_to_end(&mut body).await.unwrap();
    drop(body);
    let mut again = false;
    for _ in 0..100 {
        if models(&replicas[1], RES).await.status == 200 {
            again = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        again,
        "the slot was freed across replicas when the stream ended"
    );
    drop(prefix);
}

/// The private server's password.
const PRIVATE_PASSWORD: &str = "redis-pw-CANARY-5a4b3c2d";

/// A private `redis-server` on a free port, with a password, stopped on drop.
struct PrivateRedis {
    port: u16,
    child: Option<Child>,
}

impl PrivateRedis {
    fn start() -> Option<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut redis = Self { port, child: None };
        if !redis.restart() {
            let ci = std::env::var("CI").is_ok_and(|v| v == "true");
            assert!(!ci, "redis-server is required under CI and did not start");
            eprintln!("SKIPPED: redis-server did not start; this test did not run");
            return None;
        }
        Some(redis)
    }

    /// Its URL, with its password (which no log may show).
    fn url(&self) -> String {
        format!("redis://:{PRIVATE_PASSWORD}@127.0.0.1:{}", self.port)
    }

    /// Starts the server (again) on its port; whether it answers within 5 s.
    fn restart(&mut self) -> bool {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--requirepass", PRIVATE_PASSWORD])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
        let Ok(child) = child else { return false };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            let ping = redis::Client::open(self.url())
                .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(200)))
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if ping.is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Whether `gw:SUFFIX` exists.
    fn has_key(&self, suffix: &str) -> bool {
        redis::Client::open(self.url())
            .and_then(|c| c.get_connection_with_timeout(Duration::from_millis(500)))
            .and_then(|mut c| {
                redis::cmd("EXISTS")
                    .arg(format!("gw:{suffix}"))
                    .query::<i64>(&mut c)
            })
            .is_ok_and(|n| n == 1)
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A log sink for `tracing_subscriber::fmt`.
#[derive(Clone, Default)]
struct Logs(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Logs {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl std::io::Write for Logs {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The metrics this test binary records (one recorder for the whole binary).
fn snapshotter() -> &'static Snapshotter {
    static SNAP: OnceLock<Snapshotter> = OnceLock::new();
    SNAP.get_or_init(|| {
        let recorder = DebuggingRecorder::new();
        let snapshotter = recorder.snapshotter();
        recorder
            .install()
            .expect("the only recorder of this binary");
        snapshotter
    })
}

fn backend_errors(policy: &str) -> u64 {
    snapshotter()
        .snapshot()
        .into_vec()
        .into_iter()
        .filter(|(key, ..)| {
            key.key().name() == "gateway_rate_limit_backend_errors_total"
                && key
                    .key()
                    .labels()
                    .any(|l| l.key() == "policy" && l.value() == policy)
        })
        .map(|(.., value)| match value {
            DebugValue::Counter(n) => n,
            _ => 0,
        })
        .sum()
}

/// Redis stopped mid-test: the fail-open gateway keeps serving (counting in its own memory,
/// and saying so in its metrics), the fail-closed one answers 503; Redis back, the limits are
/// shared again.
#[tokio::test]
async fn a_redis_outage_fails_open_or_closed_as_configured_and_limits_resume() {
    let _ = snapshotter();
    // This test's logs (a current-thread runtime: the gateways' tasks run on this thread).
    let logs = Logs::default();
    let sink = logs.clone();
    let _logging = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_writer(move || sink.clone())
            .with_ansi(false)
            .finish(),
    );
    let Some(mut redis) = PrivateRedis::start() else {
        return;
    };
    let (up, _feeds) = sse_upstream().await;
    let limits = |policy: &str| {
        format!(
            "[rate_limits]\nbackend = \"{}\"\non_backend_error = \"{policy}\"\n[[rate_limits.rules]]\nscope = \"everyone\"\nrequests_per_minute = 5",
            redis.url()
        )
    };
    let open = serve_gateway(gateway(&up.base_url(), &limits("open"))).await;
    let closed = serve_gateway(gateway(&up.base_url(), &limits("closed"))).await;
    // Both count in Redis: one request on each, 3 left of 5.
    assert_eq!(models(&open, RES).await.status, 200);
    let ans = models(&closed, RES).await;
    assert_eq!(ans.status, 200);
    assert_eq!(header(&ans, "x-ratelimit-remaining-requests"), "3");

    redis.stop();
    let errors_before = backend_errors("open");
    let ans = within("a request while Redis is down", models(&open, RES)).await;
    assert_eq!(ans.status, 200, "fail open serves: {}", ans.body);
    assert!(
        backend_errors("open") > errors_before,
        "the outage is counted in the metrics"
    );
    assert!(
        logs.text()
            .contains("the rate-limit backend (Redis) cannot be reached"),
        "the outage is in the logs: {}",
        logs.text()
    );
    let ans = within("a request while Redis is down", models(&closed, RES)).await;
    assert_eq!(ans.status, 503, "fail closed refuses: {}", ans.body);
    assert!(!ans.body.contains(PRIVATE_PASSWORD), "{}", ans.body);
    assert_eq!(
        ans.headers["x-gateway-error"],
        "rate_limit_backend_unavailable"
    );
    assert_eq!(
        ans.json()["error"]["code"],
        "rate_limit_backend_unavailable"
    );

    assert!(redis.restart(), "redis-server came back");
    // The new server is empty: limits count from 5 again, shared by both gateways, once
    // each has tried Redis again (after a second at most).
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ans = models(&closed, RES).await;
        if ans.status == 200 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the closed gateway never recovered: {}",
            ans.body
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The open gateway uses Redis again once a request of another key lands there.
    let probe = "rpm:everyone:res2";
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        assert_eq!(models(&open, RES2).await.status, 200);
        if redis.has_key(probe) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the open gateway never went back to Redis"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut statuses = Vec::new();
    for i in 0..6 {
        let gw = if i % 2 == 0 { &open } else { &closed };
        statuses.push(models(gw, RES).await.status);
    }
    // 1 used above, 4 more admitted, then refused: the two gateways count together again.
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429], "{statuses:?}");
    assert!(
        logs.text().contains("answers again"),
        "the recovery is in the logs: {}",
        logs.text()
    );
    assert!(
        !logs.text().contains(PRIVATE_PASSWORD),
        "the Redis URL's password reached the logs"
    );
}

/// The OpenAI client library against a limit counted in Redis by two replicas: the burst is
/// spent on one replica, the client calls the other, is refused, waits as told and succeeds,
/// with no code of ours on its side.
#[tokio::test]
async fn the_openai_client_recovers_from_a_shared_429_by_itself() {
    use async_openai::Client;
    use async_openai::config::OpenAIConfig;
    use async_openai::types::chat::{
        ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
    };
    let Some(prefix) = Prefix::new() else { return };
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mock = MockUpstream::new(UP_KEY, Duration::from_millis(1));
    let addr = mock.spawn().await.unwrap();
    let limits = format!(
        "[rate_limits]\nbackend = \"{}\"\nkey_prefix = \"{}\"\n[[rate_limits.rules]]\nscope = \"key:res\"\nrequests_per_minute = 20",
        redis_url(),
        prefix.0
    );
    let base = format!("http://{addr}/v1");
    let spent_on = serve_gateway(gateway(&base, &limits)).await;
    let called = serve_gateway(gateway(&base, &limits)).await;
    for _ in 0..20 {
        assert_eq!(models(&spent_on, RES).await.status, 200);
    }
    assert_eq!(
        models(&called, RES).await.status,
        429,
        "spent on the other replica"
    );
    let client = Client::with_config(
        OpenAIConfig::new()
            .with_api_base(called.base_url())
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
    drop(prefix);
}

/// A stream longer than its tokens-per-minute counter lives (the counter expires once the
/// reservation has aged out) is still charged what it used when it ends.
#[tokio::test]
async fn a_long_stream_is_charged_after_its_counter_expired() {
    let Some(prefix) = Prefix::new() else { return };
    let (up, mut feeds) = sse_upstream().await;
    let limits = format!(
        "[rate_limits]\nbackend = \"{}\"\nkey_prefix = \"{}\"\nreserve_tokens = 10\n[[rate_limits.rules]]\nscope = \"key:res\"\ntokens_per_minute = 600000",
        redis_url(),
        prefix.0
    );
    let gw = serve_gateway(gateway(&up.base_url(), &limits)).await;
    let chat = gw.url(&format!("/proxy-api/{ACCOUNT}/{ENDPOINT}/chat/completions"));
    let mut body = open_stream(chat, RES).await;
    let (_, events) = within("the stream", feeds.recv()).await.unwrap();
    events.send(Ok(sse_event(0).into())).await.unwrap();
    // 10 tokens at 600,000 a minute: the counter lives about a second.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        prefix.keys().is_empty(),
        "the counter expired: {:?}",
        prefix.keys()
    );
    events
        .send(Ok(
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":300000,\"completion_tokens\":310000}}\n\n".into(),
        ))
        .await
        .unwrap();
    events.send(Ok(SSE_DONE.into())).await.unwrap();
    drop(events);
    read_to_end(&mut body).await.unwrap();
    drop(body);
    let mut refused = None;
    for _ in 0..100 {
        let ans = models(&gw, RES).await;
        if ans.status == 429 {
            refused = Some(ans);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let refused = refused.expect("610,000 tokens in a minute of 600,000 were charged");
    assert_eq!(refused.json()["error"]["type"], "rate_limit_exceeded");
    drop(prefix);
}
