//! Resident memory of the gateway per open stream, and how much of it comes back after the
//! streams close.
//!
//! The gateway runs in a child process of its own (this binary, started again with
//! `--gateway-child`), serving [`Gateway::service`] with one key and one endpoint under
//! [`tower_gateway::server::serve_with_options`]; its RSS (`VmRSS` in `/proc/PID/status`) is
//! therefore the gateway's alone, with nothing of the client or the upstream in it, and no
//! baseline needs subtracting. This process holds the upstream (a hyper server) and the
//! clients (one HTTP/1.1 connection per stream, like one OpenAI SDK per user).
//!
//! For each N the bench starts a fresh gateway, warms it with 10 streams, and then:
//!
//! 1. reads the gateway's RSS (*before*);
//! 2. opens N streams through it (at most 256 being opened at a time); the upstream sends each
//!    an OpenAI-sized SSE event at once and then one every 200 ms;
//! 3. once every stream has delivered its first event, waits 1 s (events keep flowing) and
//!    reads the RSS (*open*);
//! 4. ends every stream (`data: [DONE]`); the clients read to the end and close their
//!    connections; after a 2 s settle it reads the RSS (*after*) and the gateway's open
//!    sockets;
//! 5. asks the gateway to call glibc's `malloc_trim(0)` and reads the RSS again: what that
//!    gives back was free in the allocator but not returned to the system. The gateway here
//!    already does this itself within a second of a burst ending (the bench turns on
//!    [`ServeOptions::release_memory`](tower_gateway::server::ServeOptions::release_memory),
//!    off by default), so the two figures should agree.
//!
//! It prints, per N: the RSS before, its growth with N streams open, that growth per stream,
//! the growth left after they closed, the share of the growth returned, the growth left after
//! `malloc_trim`, and the sockets the gateway still holds: by default its pool keeps idle
//! upstream connections (up to `pool_max_idle_per_host`, 64, for 90 s), and their memory
//! counts as not returned. `--pool-idle-ms MS` sets the gateway's pool idle timeout, to see the
//! allocator's part alone (with `MS` below the 2 s settle the pool is empty when measured).
//!
//! ```text
//! cargo bench --bench memory                           # N = 100, 1000, 5000
//! cargo bench --bench memory -- 100 1000               # chosen N
//! cargo bench --bench memory -- 1000 --pool-idle-ms 500
//! ```
//!
//! Under `cargo test --benches` (no `--bench` argument) it runs N = 10 only, briefly. Each
//! stream needs two file descriptors in each process; the bench raises its soft limit to the
//! hard one and skips an N that does not fit. Linux only (`/proc`).

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

#[path = "support/harness.rs"]
mod harness;

use bytes::Bytes;
use harness::{
    GATEWAY_KEY, Paced, STREAM_CAP, UPSTREAM_AUTHORIZATION, bench_keys, bench_registry, listen,
    raise_fd_limit, serve_each,
};
use http::{HeaderValue, Request, Response, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::sync::watch;
use tower_gateway::forward::ForwardBuilder;
use tower_gateway::gateway::Gateway;
use tower_gateway::server::ServeOptions;

const CHILD_FLAG: &str = "--gateway-child";
const POOL_IDLE_FLAG: &str = "--pool-idle-ms";
const TRIM_COMMAND: &str = "trim\n";

const REQUEST_BODY: &str = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"Say hello"}],"stream":true}"#;
const EVENT: &str = "data: {\"id\":\"chatcmpl-1\",\"object\":\"chat.completion.chunk\",\"model\":\"llama-3.1\",\"choices\":[{\"index\":0,\"delta\":{\"content\":\" tok00042\"},\"finish_reason\":null}]}\n\n";
/// File descriptors each process needs besides two per stream.
const FD_SPARE: u64 = 256;

/// How long to hold the streams open and to let the gateway settle (shorter under `cargo
/// test`), and the gateway's pool idle timeout if not the default.
#[derive(Clone, Copy)]
struct Settings {
    hold: Duration,
    settle: Duration,
    pool_idle_ms: Option<u64>,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(CHILD_FLAG) {
        let upstream = args.get(1).expect("upstream address").parse().unwrap();
        let pool_idle = args
            .get(2)
            .map(|ms| Duration::from_millis(ms.parse().unwrap()));
        return child(upstream, pool_idle);
    }
    let mut bench = false;
    let mut pool_idle_ms = None;
    let mut ns: Vec<usize> = Vec::new();
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        match arg.as_str() {
            "--bench" => bench = true,
            POOL_IDLE_FLAG => {
                let ms = rest.next().and_then(|ms| ms.parse().ok());
                pool_idle_ms = Some(ms.expect("--pool-idle-ms MILLISECONDS"));
            }
            other => ns.extend(other.parse::<usize>().ok()),
        }
    }
    if ns.is_empty() {
        ns = if bench {
            vec![100, 1_000, 5_000]
        } else {
            vec![10]
        };
    }
    let (hold, settle) = if bench {
        (Duration::from_secs(1), Duration::from_secs(2))
    } else {
        (Duration::from_millis(300), Duration::from_millis(300))
    };
    let settings = Settings {
        hold,
        settle,
        pool_idle_ms,
    };
    let fd_limit = raise_fd_limit();

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let rows = rt.block_on(async {
        let (release, released) = watch::channel(0u64);
        let upstream = spawn_upstream(released).await;
        let mut rows = Vec::new();
        for n in ns {
            let need = 2 * n as u64 + FD_SPARE;
            if need > fd_limit {
                println!(
                    "skipping N = {n}: it needs about {need} file descriptors per process and the \
                     limit is {fd_limit} (raise it with `ulimit -n {need}`)"
                );
                continue;
            }
            rows.push(measure(n, upstream, &release, settings).await);
        }
        rows
    });
    print_table(&rows);
}

/// One row of the table, RSS in KiB.
struct Row {
    n: usize,
    before: u64,
    open: u64,
    after: u64,
    /// After `malloc_trim(0)` (glibc).
    trimmed: u64,
    /// The gateway's open file descriptors after the streams closed, less those before.
    fds_left: usize,
    opening: Duration,
}

async fn measure(
    n: usize,
    upstream: SocketAddr,
    release: &watch::Sender<u64>,
    settings: Settings,
) -> Row {
    let mut gateway = tokio::process::Command::new(std::env::current_exe().unwrap());
    gateway.arg(CHILD_FLAG).arg(upstream.to_string());
    if let Some(ms) = settings.pool_idle_ms {
        gateway.arg(ms.to_string());
    }
    let mut gateway = gateway
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the gateway process");
    let pid = gateway.id().expect("the gateway runs");
    let mut replies = BufReader::new(gateway.stdout.take().unwrap()).lines();
    let mut commands = gateway.stdin.take().unwrap();
    let addr: SocketAddr = replies
        .next_line()
        .await
        .unwrap()
        .expect("the gateway prints its address")
        .parse()
        .unwrap();

    // Warm up: first-use initialisation (trust roots, pools, lazily touched code) is not a
    // per-stream cost.
    run_streams(10, addr, release, Duration::ZERO).await;
    tokio::time::sleep(settings.settle).await;
    let before = rss_kib(pid);
    let fds_before = open_fds(pid);

    let start = Instant::now();
    let streams = open_streams(n, addr).await;
    let opening = start.elapsed();
    tokio::time::sleep(settings.hold).await;
    let open = rss_kib(pid);
    release.send_modify(|g| *g += 1);
    for stream in streams {
        stream.await.unwrap();
    }
    tokio::time::sleep(settings.settle).await;
    let after = rss_kib(pid);
    let fds_left = open_fds(pid).saturating_sub(fds_before);
    // What the allocator holds free but has not given back to the system.
    commands.write_all(TRIM_COMMAND.as_bytes()).await.unwrap();
    commands.flush().await.unwrap();
    replies
        .next_line()
        .await
        .unwrap()
        .expect("the gateway trims");
    let trimmed = rss_kib(pid);

    drop(commands); // the gateway stops when its stdin closes
    let _ = tokio::time::timeout(Duration::from_secs(5), gateway.wait()).await;
    Row {
        n,
        before,
        open,
        after,
        trimmed,
        fds_left,
        opening,
    }
}

/// Opens `n` streams (one connection, one streaming request each) and returns once each has
/// delivered its first event (within [`STREAM_CAP`]), with the tasks that read each stream to
/// its end.
async fn open_streams(n: usize, addr: SocketAddr) -> Vec<tokio::task::JoinHandle<()>> {
    let make_request = move || {
        Request::post(format!(
            "http://{addr}/proxy-api/coreweave-model/inference/chat/completions"
        ))
        .header(header::HOST, addr.to_string())
        .header(header::AUTHORIZATION, format!("Bearer {GATEWAY_KEY}"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from_static(REQUEST_BODY.as_bytes())))
        .unwrap()
    };
    harness::open_streams(n, addr, make_request, Some(STREAM_CAP)).await
}

/// Opens `n` streams, waits for each first event, holds them `hold`, ends them and waits until
/// the clients have read them to the end.
async fn run_streams(n: usize, addr: SocketAddr, release: &watch::Sender<u64>, hold: Duration) {
    let streams = open_streams(n, addr).await;
    tokio::time::sleep(hold).await;
    release.send_modify(|g| *g += 1);
    for stream in streams {
        stream.await.unwrap();
    }
}

/// The upstream: every `POST` gets an SSE stream with an event at once, then one every
/// [`harness::PACE`], until the generation in `released` changes (then `[DONE]` and the end).
async fn spawn_upstream(released: watch::Receiver<u64>) -> SocketAddr {
    let listener = listen();
    let addr = listener.local_addr().unwrap();
    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
        let mut released = released.clone();
        released.borrow_and_update();
        async move {
            let _ = req.into_body().collect().await;
            let mut res = Response::new(Paced::new(Bytes::from_static(EVENT.as_bytes()), released));
            res.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/event-stream"),
            );
            Ok::<_, Infallible>(res)
        }
    });
    serve_each(listener, svc);
    addr
}

/// The gateway process: serves the full stack for an endpoint at `upstream`, prints its
/// address and stops when its stdin closes.
fn child(upstream: SocketAddr, pool_idle: Option<Duration>) {
    raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let registry = bench_registry(upstream, HeaderValue::from_static(UPSTREAM_AUTHORIZATION));
        let keys = bench_keys(GATEWAY_KEY);
        let mut forward = ForwardBuilder::default();
        if let Some(idle) = pool_idle {
            forward = forward.pool_idle_timeout(idle);
        }
        let gateway = Gateway::builder()
            .keys(keys)
            .registry(registry.into())
            .forward(forward)
            .build();
        let listener = listen();
        println!("{}", listener.local_addr().unwrap());
        let stdin_closed = async {
            let _ = tokio::task::spawn_blocking(serve_commands).await;
        };
        // Memory release is off by default in the library; the bench measures it on.
        let options = ServeOptions::new()
            .grace_period(Duration::from_millis(100))
            .release_memory(true);
        tower_gateway::server::serve_with_options(
            listener,
            gateway.service(),
            stdin_closed,
            options,
        )
        .await
        .unwrap();
    });
}

/// The gateway process's side of the pipe: answers each `trim` line on stdin with
/// `malloc_trim(0)` and a line on stdout; returns when stdin closes.
fn serve_commands() {
    for line in io::stdin().lines() {
        let Ok(line) = line else { return };
        if line == TRIM_COMMAND.trim_end() {
            trim();
            println!("trimmed");
        }
    }
}

/// Gives the allocator's free pages back to the system (glibc only).
#[allow(unsafe_code)]
fn trim() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim has no preconditions.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `VmRSS` of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// How many file descriptors process `pid` has open.
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, Iterator::count)
}

fn print_table(rows: &[Row]) {
    println!();
    println!("gateway RSS (its own process), full stack, paced SSE streams");
    println!();
    println!(
        "| N | RSS before | growth, N open | per open stream | growth left after close | returned | after malloc_trim | sockets left open | opening took |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let grown = r.open.saturating_sub(r.before);
        let left = r.after.saturating_sub(r.before);
        let returned = if grown == 0 {
            100.0
        } else {
            100.0 * r.open.saturating_sub(r.after) as f64 / grown as f64
        };
        println!(
            "| {} | {:.1} MiB | {:.1} MiB | {:.1} KiB | {:.1} MiB | {:.0}% | {:.1} MiB | {} | {:.2} s |",
            r.n,
            r.before as f64 / 1024.0,
            grown as f64 / 1024.0,
            grown as f64 / r.n as f64,
            left as f64 / 1024.0,
            returned,
            r.trimmed.saturating_sub(r.before) as f64 / 1024.0,
            r.fds_left,
            r.opening.as_secs_f64(),
        );
    }
}
