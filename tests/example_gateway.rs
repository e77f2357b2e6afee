//! The runnable example, as a user runs it: the offline demo, `--config`, `--listen`, the
//! `listening on` line, graceful shutdown on SIGTERM, and logs without colour codes when they
//! do not go to a terminal or `NO_COLOR` is set.

mod dbs;
mod support;

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use sha2::Digest as _;

use support::*;

/// A plain `cargo test` builds the examples next to the test binaries; a filtered run
/// (`cargo test --test example_gateway`) does not, so build it then.
fn example_binary() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap();
    let bin = dir
        .join("examples")
        .join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
    BUILT.call_once(|| {
        if !bin.exists() {
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
            let status = Command::new(cargo)
                .args(["build", "--example", "gateway"])
                .status()
                .unwrap();
            assert!(status.success(), "building the example failed");
        }
    });
    assert!(bin.exists(), "{} is missing", bin.display());
    bin
}

struct Running {
    child: Child,
    addr: SocketAddr,
    stdout: Vec<String>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts the example and reads stdout up to the `listening on` line. `Running`'s `Drop`
/// kills and waits for the child.
fn start(args: &[&str], env: &[(&str, &str)]) -> Running {
    start_with(args, env, Stdio::piped())
}

/// Like [`start`], with the child's stderr going to `stderr`. `NO_COLOR` is not passed on
/// unless `env` sets it.
#[allow(clippy::zombie_processes)]
fn start_with(args: &[&str], env: &[(&str, &str)], stderr: Stdio) -> Running {
    let mut cmd = Command::new(example_binary());
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .env("RUST_LOG", "warn")
        .env_remove("NO_COLOR");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    let mut stdout = Vec::new();
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("no `listening on` line; stdout so far: {stdout:?}"));
        let addr = line
            .strip_prefix("listening on http://")
            .map(|a| a.parse().unwrap());
        stdout.push(line);
        if let Some(addr) = addr {
            // Collect what the demo prints after the line, briefly.
            while let Ok(more) = rx.recv_timeout(Duration::from_millis(300)) {
                stdout.push(more);
            }
            return Running {
                child,
                addr,
                stdout,
            };
        }
    }
}

fn sigterm(child: &Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "the example did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

const STREAM: &str = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","stream":true,"messages":[{"role":"user","content":"Say hello"}]}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_offline_demo_serves_and_drains_streams_on_sigterm() {
    let mut demo = start(&["--listen", "127.0.0.1:0"], &[]);
    let printed = demo.stdout.join("\n");
    let base = format!("http://{}/proxy-api/coreweave-model/inference", demo.addr);
    assert!(printed.contains(&base), "{printed}");
    assert!(
        printed.contains("gw-demo-key")
            && printed.contains("curl")
            && printed.contains("from openai import OpenAI"),
        "{printed}"
    );

    let res = within("demo response", client().request(stream_request(&base)))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let mut body = res.into_body();
    let first = next_data(&mut body).await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));

    // Shut down while the stream is in flight: it must still finish cleanly.
    sigterm(&demo.child);
    let rest = String::from_utf8(
        read_to_end(&mut body)
            .await
            .expect("stream finished during the grace period"),
    )
    .unwrap();
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
    let status = tokio::task::block_in_place(|| wait_exit(&mut demo.child));
    assert!(status.success(), "{status}");
}

/// The issue's "done when": a streamed call through the demo makes one span and one usage
/// record, with the caller's identity and the tokens the upstream counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_streamed_call_through_the_demo_logs_one_span_and_one_usage_record() {
    let mut demo = start(
        &["--listen", "127.0.0.1:0", "--log-format", "json"],
        &[("RUST_LOG", "info")],
    );
    let mut stderr = demo.child.stderr.take().unwrap();
    let logs = std::thread::spawn(move || {
        let mut all = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut all).unwrap();
        all
    });
    let base = format!("http://{}/proxy-api/coreweave-model/inference", demo.addr);
    let res = within("demo response", client().request(stream_request(&base)))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let request_id = res.headers()["x-request-id"].to_str().unwrap().to_owned();
    let mut body = res.into_body();
    let stream = String::from_utf8(read_to_end(&mut body).await.unwrap()).unwrap();
    assert!(stream.ends_with("data: [DONE]\n\n"), "{stream}");
    assert!(
        !stream.contains("\"usage\""),
        "the client did not ask for usage, so it sees none: {stream}"
    );
    // The upstream counts one output token per content event.
    let tokens = stream
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
        .filter(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty())
        })
        .count() as u64;
    assert!(tokens > 0);
    drop(body);
    // Let the span close before stopping.
    tokio::time::sleep(Duration::from_millis(200)).await;
    sigterm(&demo.child);
    let status = tokio::task::block_in_place(|| wait_exit(&mut demo.child));
    assert!(status.success(), "{status}");
    let logs = logs.join().unwrap();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();

    let usage: Vec<_> = lines
        .iter()
        .filter(|l| l["target"] == "tower_gateway::usage")
        .collect();
    assert_eq!(usage.len(), 1, "one usage record: {logs}");
    let u = usage[0];
    assert_eq!(u["key_id"], "demo", "{u}");
    assert_eq!(u["subject"], "demo@example.com", "{u}");
    assert_eq!(u["account"], "coreweave-model", "{u}");
    assert_eq!(u["endpoint"], "inference", "{u}");
    assert_eq!(u["request_id"], request_id.as_str(), "{u}");
    assert_eq!(u["gen_ai.usage.output_tokens"], tokens, "{u}");
    assert!(u["gen_ai.usage.input_tokens"].as_u64().unwrap() > 0, "{u}");
    assert_eq!(u["outcome"], "complete", "{u}");

    let spans: Vec<_> = lines
        .iter()
        .filter(|l| l["message"] == "close" && l["span"]["name"] == "gateway.request")
        .collect();
    assert_eq!(spans.len(), 1, "one request span: {logs}");
    let span = &spans[0]["span"];
    assert_eq!(span["request_id"], request_id.as_str(), "{span}");
    assert_eq!(span["gateway.key_id"], "demo", "{span}");
    assert_eq!(span["http.response.status_code"], 200, "{span}");
    assert_eq!(span["gen_ai.usage.output_tokens"], tokens, "{span}");
    assert!(
        span["gateway.time_to_first_byte_ms"].as_f64().is_some(),
        "{span}"
    );
    assert!(!logs.contains("demo-wandb-upstream-key") && !logs.contains("gw-demo-key"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_serves_a_config_file() {
    let mock = MockUpstream::new("wandb-from-env-CANARY-3d1e", Duration::ZERO);
    let upstream = mock.spawn().await.unwrap();
    let dir = std::env::temp_dir().join(format!("tower-gateway-example-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            r#"
[[keys]]
id = "ci"
subject = "ci@example.com"
key = "${{GATEWAY_KEY}}"

[[accounts]]
name = "coreweave-model"
access = {{ users = ["everyone"] }}

[[accounts.endpoints]]
name = "inference"
base_url = "http://{upstream}/v1"
headers = {{ Authorization = "Bearer ${{WANDB_API_KEY}}" }}
"#
        ),
    )
    .unwrap();
    let env = [
        ("GATEWAY_KEY", "gw-from-env-CANARY-8a2c"),
        ("WANDB_API_KEY", "wandb-from-env-CANARY-3d1e"),
    ];
    let mut gw = start(
        &[
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &env,
    );
    let req = Request::get(format!(
        "http://{}/proxy-api/coreweave-model/inference/models",
        gw.addr
    ))
    .header("authorization", "Bearer gw-from-env-CANARY-8a2c")
    .body(Full::<Bytes>::default())
    .unwrap();
    let res = within("response", client().request(req)).await.unwrap();
    assert_eq!(res.status(), 200);
    assert_eq!(mock.requests(), 1);
    sigterm(&gw.child);
    assert!(tokio::task::block_in_place(|| wait_exit(&mut gw.child)).success());

    // A bad file: a clear error naming the field, no secret, non-zero exit.
    std::fs::write(
        &path,
        "[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\nname = \"e\"\nbase_url = \"https://x/v1/\"\nheaders = { Authorization = \"Bearer ${WANDB_API_KEY}\" }\n",
    )
    .unwrap();
    let out = Command::new(example_binary())
        .args([
            "--config",
            path.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ])
        .env("WANDB_API_KEY", "wandb-from-env-CANARY-3d1e")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("accounts[0].endpoints[0].base_url"),
        "{stderr}"
    );
    assert!(!stderr.contains("CANARY"), "{stderr}");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// `--store sqlite://…` keeps what is changed through the API across a restart (the second
/// start names the store with `GATEWAY_STORE`); a store that cannot be reached stops the
/// gateway from starting, with a clear message that never shows the URL's password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_example_keeps_its_state_in_a_store() {
    let mock = MockUpstream::new("wandb-store-CANARY-41ab", Duration::ZERO);
    let upstream = mock.spawn().await.unwrap();
    let dir = std::env::temp_dir().join(format!(
        "tower-gateway-example-store-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            r#"
admins = ["user:ops@example.com"]

[[keys]]
id = "ops"
subject = "ops@example.com"
key = "gw-ops-CANARY-77c1"

[[accounts]]
name = "coreweave-model"
access = {{ users = ["everyone"] }}

[[accounts.endpoints]]
name = "inference"
base_url = "http://{upstream}/v1"
headers = {{ Authorization = "Bearer wandb-store-CANARY-41ab" }}
"#
        ),
    )
    .unwrap();
    let store = format!("sqlite://{}", dir.join("state.db").display());
    let config = path.to_str().unwrap().to_owned();
    let models = |addr: SocketAddr, key: &str| {
        Request::get(format!(
            "http://{addr}/proxy-api/coreweave-model/inference/models"
        ))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::<Bytes>::default())
        .unwrap()
    };

    // Everything it logs at debug, the store's own logs included, goes to a file to search.
    let log = dir.join("first.log");
    let mut gw = start_with(
        &[
            "--config",
            &config,
            "--store",
            &store,
            "--listen",
            "127.0.0.1:0",
        ],
        &[("RUST_LOG", "debug")],
        Stdio::from(std::fs::File::create(&log).unwrap()),
    );
    let ans = send_json(
        http::Method::POST,
        format!("http://{}/manage/keys", gw.addr).parse().unwrap(),
        Some("gw-ops-CANARY-77c1"),
        Some(r#"{"subject": "ci@example.com"}"#),
    )
    .await;
    assert_eq!(ans.status, 201, "{}", ans.body);
    let key = ans.json()["key"].as_str().unwrap().to_owned();
    let res = within("response", client().request(models(gw.addr, &key)))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    let ans = send_json(
        http::Method::POST,
        format!(
            "http://{}/manage/keys/{}/rotate",
            gw.addr,
            ans.json()["id"].as_str().unwrap()
        )
        .parse()
        .unwrap(),
        Some("gw-ops-CANARY-77c1"),
        Some(r#"{"grace_seconds": 3600}"#),
    )
    .await;
    assert_eq!(ans.status, 201, "{}", ans.body);
    let rotated = ans.json()["key"].as_str().unwrap().to_owned();
    sigterm(&gw.child);
    assert!(tokio::task::block_in_place(|| wait_exit(&mut gw.child)).success());
    let logged = std::fs::read_to_string(&log).unwrap();
    assert!(logged.contains("DEBUG"), "the log was written at debug");
    for secret in [
        key.as_str(),
        rotated.as_str(),
        "gw-ops-CANARY-77c1",
        "wandb-store-CANARY-41ab",
    ] {
        let digest: String = sha2::Sha256::digest(secret.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        assert!(!logged.contains(secret), "a secret in the log");
        assert!(!logged.contains(&digest), "a key's digest in the log");
    }

    let gw = start(
        &["--config", &config, "--listen", "127.0.0.1:0"],
        &[("GATEWAY_STORE", &store)],
    );
    let res = within("response", client().request(models(gw.addr, &key)))
        .await
        .unwrap();
    assert_eq!(res.status(), 200, "the issued key survived the restart");
    drop(gw);

    let out = Command::new(example_binary())
        .args([
            "--config",
            &config,
            "--store",
            "postgres://ops:pw-CANARY-9f0d@127.0.0.1:1/gateway",
            "--listen",
            "127.0.0.1:0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot open the store"), "{stderr}");
    assert!(stderr.contains("refusing to start"), "{stderr}");
    assert!(!stderr.contains("CANARY"), "{stderr}");
    assert!(out.stdout.is_empty(), "it never listened");
    std::fs::remove_dir_all(&dir).unwrap();
}

/// The README's three replicas: three example processes started at once with the same
/// `--config` and `--store postgres://…`; an endpoint and a key created through the first are
/// usable through the other two at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_example_replicas_share_one_postgres() {
    let Some(db) = dbs::PgDatabase::new().await else {
        return;
    };
    let mock = MockUpstream::new("wandb-pg-CANARY-5b2e", Duration::ZERO);
    let upstream = mock.spawn().await.unwrap();
    let dir = std::env::temp_dir().join(format!(
        "tower-gateway-example-replicas-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("gateway.toml");
    std::fs::write(
        &path,
        format!(
            r#"
admins = ["team:platform"]

[[keys]]
id = "platform"
subject = "ops@example.com"
teams = ["platform"]
key = "gw-platform-key"

[[accounts]]
name = "coreweave-model"
access = {{ managers = ["team:platform"], users = ["everyone"] }}

[[accounts.endpoints]]
name = "inference"
base_url = "http://{upstream}/v1"
headers = {{ Authorization = "Bearer wandb-pg-CANARY-5b2e" }}
"#
        ),
    )
    .unwrap();
    let config = path.to_str().unwrap().to_owned();
    let starting: Vec<_> = (0..3)
        .map(|_| {
            let (config, url) = (config.clone(), db.url.clone());
            std::thread::spawn(move || {
                start_with(
                    &[
                        "--config",
                        &config,
                        "--store",
                        &url,
                        "--listen",
                        "127.0.0.1:0",
                    ],
                    &[],
                    // Nobody reads it: a full pipe would stop the replica.
                    Stdio::null(),
                )
            })
        })
        .collect();
    let replicas: Vec<Running> = starting.into_iter().map(|t| t.join().unwrap()).collect();
    let url = |r: &Running, path: &str| -> http::Uri {
        format!("http://{}{path}", r.addr).parse().unwrap()
    };
    let body = format!(
        r#"{{"base_url": "http://{upstream}/v1", "headers": {{"Authorization": "Bearer wandb-pg-CANARY-5b2e"}}}}"#
    );
    let ans = send_json(
        http::Method::PUT,
        url(
            &replicas[0],
            "/manage/accounts/coreweave-model/endpoints/llama",
        ),
        Some("gw-platform-key"),
        Some(&body),
    )
    .await;
    assert_eq!(ans.status, 201, "{}", ans.body);
    let ans = send_json(
        http::Method::POST,
        url(&replicas[0], "/manage/keys"),
        Some("gw-platform-key"),
        Some(r#"{"subject": "ci@example.com"}"#),
    )
    .await;
    assert_eq!(ans.status, 201, "{}", ans.body);
    let key = ans.json()["key"].as_str().unwrap().to_owned();
    for r in &replicas[1..] {
        let start = Instant::now();
        loop {
            let ans = send_json(
                http::Method::GET,
                url(r, "/proxy-api/coreweave-model/llama/models"),
                Some(&key),
                None,
            )
            .await;
            if ans.status == 200 {
                break;
            }
            assert!(start.elapsed() < Duration::from_secs(10), "{}", ans.body);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let ans = send_json(
        http::Method::GET,
        url(&replicas[2], "/manage/audit"),
        Some("gw-platform-key"),
        None,
    )
    .await;
    let seeds = ans.json()["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "seed")
        .count();
    assert_eq!(seeds, 1, "one replica seeded the store: {}", ans.body);
    drop(replicas);
    db.drop_it().await;
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Where the demo's stderr goes.
#[derive(Clone, Copy, Debug)]
enum LogsTo {
    Pipe,
    /// A pseudo-terminal, as when a user runs the example in a shell.
    #[cfg(target_os = "linux")]
    Terminal,
}

/// What a child writes to its stderr, read on a thread as it comes.
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn read_from(mut from: impl Read + Send + 'static) -> Self {
        let all = Arc::new(Mutex::new(Vec::new()));
        let into = Arc::clone(&all);
        std::thread::spawn(move || {
            let mut chunk = [0; 4096];
            // EOF on a pipe; on a pty's master, EIO once the child has exited.
            while let Ok(n @ 1..) = from.read(&mut chunk) {
                into.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Self(all)
    }

    /// Everything read, once it contains `text` (or after [`WAIT`]).
    fn until(&self, text: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let all = String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned();
            if all.contains(text) || Instant::now() >= deadline {
                return all;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A pseudo-terminal: the child's end (for its stderr) and ours, to read what it writes.
#[cfg(target_os = "linux")]
fn pty() -> (Stdio, std::fs::File) {
    use std::os::fd::{FromRawFd, OwnedFd};
    let (mut ours, mut theirs) = (-1, -1);
    // SAFETY: openpty writes two new descriptors into the ints it is given; null name, termios
    // and window size are allowed. Each descriptor is then owned exactly once.
    let (ours, theirs) = unsafe {
        let made = libc::openpty(
            &mut ours,
            &mut theirs,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        );
        assert_eq!(made, 0, "openpty: {}", std::io::Error::last_os_error());
        // Not inherited by children other tests spawn meanwhile.
        libc::fcntl(ours, libc::F_SETFD, libc::FD_CLOEXEC);
        libc::fcntl(theirs, libc::F_SETFD, libc::FD_CLOEXEC);
        (OwnedFd::from_raw_fd(ours), OwnedFd::from_raw_fd(theirs))
    };
    (Stdio::from(theirs), std::fs::File::from(ours))
}

/// Runs the demo with `RUST_LOG=info` and `env`, its stderr going to `to`; makes one call (its
/// `gateway.request` span logs when it closes), stops it with SIGTERM and returns what it wrote
/// to stderr, up to the server's last log line.
async fn demo_logs(env: &[(&str, &str)], to: LogsTo) -> String {
    let mut env = env.to_vec();
    env.push(("RUST_LOG", "info"));
    let args = ["--listen", "127.0.0.1:0"];
    let (mut demo, stderr) = match to {
        LogsTo::Pipe => {
            let mut demo = start_with(&args, &env, Stdio::piped());
            let stderr = Captured::read_from(demo.child.stderr.take().unwrap());
            (demo, stderr)
        }
        #[cfg(target_os = "linux")]
        LogsTo::Terminal => {
            let (theirs, ours) = pty();
            (start_with(&args, &env, theirs), Captured::read_from(ours))
        }
    };
    let req = Request::get(format!(
        "http://{}/proxy-api/coreweave-model/inference/models",
        demo.addr
    ))
    .header("authorization", "Bearer gw-demo-key")
    .body(Full::<Bytes>::default())
    .unwrap();
    let res = within("demo response", client().request(req))
        .await
        .unwrap();
    assert_eq!(res.status(), 200);
    drop(res);
    sigterm(&demo.child);
    let status = tokio::task::block_in_place(|| wait_exit(&mut demo.child));
    assert!(status.success(), "{status}");
    let logs = stderr.until(DRAINED);
    // The lines a colour code would be in are there: the request's span, closing, and the
    // server's own events.
    assert!(logs.contains(DRAINED), "{logs:?}");
    assert!(logs.contains("gateway.request"), "{logs:?}");
    assert!(logs.contains("close"), "{logs:?}");
    assert!(logs.contains("INFO"), "{logs:?}");
    logs
}

/// The server's last log line on a clean shutdown.
const DRAINED: &str = "all connections drained";

/// Logs piped to a file or another program (as here) carry no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_to_a_pipe_have_no_colour_codes() {
    let logs = demo_logs(&[], LogsTo::Pipe).await;
    assert!(!logs.contains("\x1b["), "{logs:?}");
}

/// `NO_COLOR=1` turns colour codes off, even when stderr is a terminal.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_color_turns_colour_codes_off() {
    let logs = demo_logs(&[("NO_COLOR", "1")], LogsTo::Pipe).await;
    assert!(!logs.contains("\x1b["), "{logs:?}");
    #[cfg(target_os = "linux")]
    {
        let logs = demo_logs(&[("NO_COLOR", "1")], LogsTo::Terminal).await;
        assert!(!logs.contains("\x1b["), "{logs:?}");
        // The control: on a terminal, with NO_COLOR unset or empty (no-color.org), colour.
        for env in [&[][..], &[("NO_COLOR", "")][..]] {
            let logs = demo_logs(env, LogsTo::Terminal).await;
            assert!(logs.contains("\x1b["), "{env:?}: {logs:?}");
        }
    }
}

/// A streaming chat completion with the demo's key.
fn stream_request(base: &str) -> Request<Full<Bytes>> {
    Request::post(format!("{base}/chat/completions"))
        .header("authorization", "Bearer gw-demo-key")
        .header("content-type", "application/json")
        .body(Full::<Bytes>::from(STREAM))
        .unwrap()
}

/// A wrong flag or value stops the example with exit code 2, a line naming the flag, and the
/// usage, before anything listens.
#[test]
fn bad_flags_are_refused_with_the_flag_named() {
    for (args, said) in [
        (
            &["--log-format", "xml"][..],
            "--log-format needs text or json",
        ),
        (&["--log-format"][..], "--log-format needs text or json"),
        (
            &["--metrics", "not-an-address"][..],
            "--metrics: \"not-an-address\"",
        ),
        (&["--metrics"][..], "--metrics needs an address"),
        (&["--listen", "8080"][..], "--listen: \"8080\""),
        (
            &["--include-usage", "--bogus"][..],
            "unknown argument \"--bogus\"",
        ),
        (&["--redis"][..], "--redis needs a URL"),
        (
            &["--redis", "redis://127.0.0.1:6379"][..],
            "--redis needs --config or --store",
        ),
    ] {
        let out = Command::new(example_binary()).args(args).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(said), "{args:?}: {stderr}");
        assert!(stderr.contains("usage: gateway"), "{args:?}: {stderr}");
        assert!(out.stdout.is_empty(), "{args:?} printed {:?}", out.stdout);
    }
}

/// A `--redis` URL the client cannot parse stops the example before it listens, naming the
/// flag and the field, and never printing the URL (it may hold a password).
#[test]
fn a_bad_redis_url_is_refused_without_showing_it() {
    let dir = std::env::temp_dir().join(format!(
        "tower-gateway-example-redis-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let config = dir.join("gateway.toml");
    std::fs::write(
        &config,
        "[[rate_limits.rules]]\nscope = \"everyone\"\nrequests_per_minute = 60\n",
    )
    .unwrap();
    let out = Command::new(example_binary())
        .args(["--config", config.to_str().unwrap()])
        .args(["--redis", "redis://:hunter2@127.0.0.1:not-a-port"])
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--redis: rate_limits.backend"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(out.stdout.is_empty(), "it listened: {:?}", out.stdout);
}
