//! The gateway against nginx on nginx's own ground: each proxy in a process of its own, pinned to
//! core 0, with the upstream and the load generator in this process, pinned to core 1.
//!
//! ```text
//! apt-get install -y nginx                       # once
//! cargo run --release --example nginx_compare    # 3 runs; --runs N, --memory-streams N, --quick
//! ```
//!
//! The proxies, started afresh for every run (so every memory figure starts from a fresh
//! process) and stopped at its end:
//!
//! - `nginx`: one worker (`worker_processes 1`), `proxy_buffering off`,
//!   `proxy_request_buffering off`, `proxy_http_version 1.1`, an upstream block with
//!   `keepalive 64`, `access_log off`, and a `proxy_set_header Authorization` standing in for
//!   the gateway's credential injection; the config is generated into a temporary directory
//!   and printed with `--print-nginx-config`;
//! - `bare`: a bare hyper proxy, this binary started again with `--bare-proxy`: hyper-util's
//!   auto server and pooled legacy client, `TCP_NODELAY`, responses forwarded frame by frame,
//!   nothing else (with `--bare-forward`, the crate's `Forward` behind `RescueLayer` instead,
//!   like `bare_forward` in `benches/streaming.rs`);
//! - `gateway`: the example binary `gateway` (built with `cargo build --release --example
//!   gateway` first when run through cargo) with a generated TOML config: one key, one account,
//!   one endpoint that injects an upstream credential.
//!
//! Each is started with `taskset -c 0`; this process pins itself (all its threads) to core 1.
//! The upstream is a hyper server answering canned frames: OpenAI `chat.completion.chunk` SSE
//! events (~150 B), a 64 MiB body in 16 KiB frames, a small JSON completion, and paced SSE
//! streams for the memory workload. The clients are hyper-util's pooled legacy client
//! (`TCP_NODELAY`), one HTTP/1.1 connection per concurrent request.
//!
//! Workloads, in every run (the proxies' order rotates from run to run). Memory is measured
//! one proxy after the other; every other workload is split into 5 passes in which the proxies
//! take turns, and each proxy's passes are added up, so a load that comes and goes on the
//! machine weighs on all of them alike:
//!
//! 1. memory: 10 streams to warm up, then 1,000 streams paced at one event per 200 ms, each on
//!    its own connection; RSS (`VmRSS`, summed over the proxy's processes) before, with all of
//!    them open, and 2 s after they end; per open stream and the share returned;
//! 2. SSE: 64 concurrent streams × 1,000 events, unpaced, twice per pass (640,000 events per
//!    proxy): events/s, and the proxy's CPU time (utime + stime from `/proc/PID/stat`, summed
//!    over its processes) per event, and the kernel's share of it;
//! 3. completions: 64 concurrent clients × 40 small non-streaming completions per pass
//!    (12,800 per proxy): requests/s and proxy CPU per request;
//! 4. first event: one stream at a time, 60 per pass (after 20 to warm up): time from sending
//!    the request to the first event, p50 over the 300;
//! 5. bytes: a 64 MiB response in 16 KiB frames, once per pass: bytes/s.
//!
//! Every response is checked (status 200 and every byte there). It prints a table per run and
//! then the medians over the runs, with min–max, the ratios gateway ÷ nginx and bare ÷ nginx
//! (each from one run, then the median), and how busy each core was, so a load generator that
//! became the bottleneck shows. Every workload has a time limit; the proxies are killed when it
//! ends, on a panic too, and (via `PR_SET_PDEATHSIG`) if this process is killed. Linux only.
//! If nginx is not installed it says how to install it and exits 0.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::{Future, pending};
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::mpsc as std_mpsc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

#[path = "../benches/support/harness.rs"]
mod harness;

use bytes::Bytes;
use harness::{
    BenchClient, COMPLETION, DONE, Frames, GATEWAY_KEY, Paced, UPSTREAM_AUTHORIZATION, absolute_to,
    big_frames, client, discard, drain, frames_len, leak, listen, pin_to, raise_fd_limit, request,
    send, serve_each, sse_event, sse_events,
};
use http::uri::Authority;
use http::{HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::runtime::Runtime;
use tokio::sync::watch;
use tower::Layer;
use tower::util::MapRequest;
use tower_gateway::error::RescueLayer;
use tower_gateway::forward::Forward;

const PROXY_CORE: usize = 0;
const LOAD_CORE: usize = 1;

const SSE_EVENTS: usize = 1_000;
const SSE_STREAMS: usize = 64;
const BIG_LEN: usize = 64 << 20;
const BIG_FRAME: usize = 16 << 10;
const CLIENTS: usize = 64;
/// No workload runs longer than this.
const WORKLOAD_LIMIT: Duration = Duration::from_secs(180);
/// How long a proxy may take to start listening.
const START_LIMIT: Duration = Duration::from_secs(30);

const PATH_SSE: &str = "sse";
const PATH_BIG: &str = "bytes";
const PATH_COMPLETION: &str = "completions";
const PATH_FIRST: &str = "first";
const PATH_PACED: &str = "paced";

const BARE_FLAG: &str = "--bare-proxy";

/// How much of each workload to run.
#[derive(Clone, Copy)]
struct Sizes {
    runs: usize,
    /// Each throughput and latency workload is split into this many passes, the proxies
    /// taking turns.
    passes: usize,
    sse_rounds: usize,
    requests_per_client: usize,
    first_samples: usize,
    memory_streams: usize,
    hold: Duration,
    settle: Duration,
}

impl Sizes {
    const FULL: Self = Self {
        runs: 3,
        passes: 5,
        sse_rounds: 2,
        requests_per_client: 40,
        first_samples: 300,
        memory_streams: 1_000,
        hold: Duration::from_secs(1),
        settle: Duration::from_secs(2),
    };
    /// A smoke test: every workload once, small.
    const QUICK: Self = Self {
        runs: 1,
        passes: 1,
        sse_rounds: 1,
        requests_per_client: 20,
        first_samples: 50,
        memory_streams: 100,
        hold: Duration::from_millis(300),
        settle: Duration::from_millis(500),
    };
}

const USAGE: &str = "\
usage: nginx_compare [--runs N] [--memory-streams N] [--sse-rounds N] [--quick]
                     [--only WORKLOADS] [--proxies PROXIES] [--bare-forward]
                     [--gateway-bin PATH] [--nginx PATH] [--print-nginx-config]

  --runs N             repeat every workload N times (default 3); medians and min-max
  --memory-streams N   paced streams held open for the memory figure (default 1000)
  --sse-rounds N       64-stream SSE rounds per proxy per pass (default 2, 5 passes)
  --quick              a short smoke run (1 run, small workloads)
  --only WORKLOADS     comma-separated: memory,sse,completions,first,bytes (default all)
  --proxies PROXIES    comma-separated: nginx,bare,gateway (default all; ratios need nginx)
  --bare-forward       the bare arm runs the crate's Forward instead of plain hyper-util
  --gateway-bin PATH   the gateway example binary (default: built with cargo, release)
  --nginx PATH         the nginx binary (default: nginx on PATH, or /usr/sbin/nginx)
  --print-nginx-config print the nginx config used (with placeholder ports) and exit
";

struct Options {
    sizes: Sizes,
    workloads: Vec<Workload>,
    proxies: Vec<Kind>,
    bare_forward: bool,
    gateway_bin: Option<PathBuf>,
    nginx: Option<PathBuf>,
}

fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut sizes = Sizes::FULL;
    let mut runs = None;
    let mut memory_streams = None;
    let mut sse_rounds = None;
    let mut workloads = Workload::ALL.to_vec();
    let mut proxies = KINDS.to_vec();
    let mut bare_forward = false;
    let mut gateway_bin = None;
    let mut nginx = None;
    let mut rest = args.iter();
    while let Some(arg) = rest.next() {
        let mut value = |name: &str| {
            rest.next()
                .cloned()
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let number = |name: &str, v: String| {
            v.parse::<usize>()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("{name}: {v:?} is not a positive number"))
        };
        match arg.as_str() {
            "--runs" => runs = Some(number("--runs", value("--runs")?)?),
            "--memory-streams" => {
                memory_streams = Some(number("--memory-streams", value("--memory-streams")?)?);
            }
            "--sse-rounds" => sse_rounds = Some(number("--sse-rounds", value("--sse-rounds")?)?),
            "--quick" => sizes = Sizes::QUICK,
            "--only" => {
                workloads = list(&value("--only")?, &Workload::ALL, Workload::name)?;
            }
            "--proxies" => proxies = list(&value("--proxies")?, &KINDS, Kind::name)?,
            "--bare-forward" => bare_forward = true,
            "--gateway-bin" => gateway_bin = Some(PathBuf::from(value("--gateway-bin")?)),
            "--nginx" => nginx = Some(PathBuf::from(value("--nginx")?)),
            // `cargo bench`-style harness flags are ignored.
            "--bench" => {}
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if let Some(runs) = runs {
        sizes.runs = runs;
    }
    if let Some(n) = memory_streams {
        sizes.memory_streams = n;
    }
    if let Some(n) = sse_rounds {
        sizes.sse_rounds = n;
    }
    Ok(Options {
        sizes,
        workloads,
        proxies,
        bare_forward,
        gateway_bin,
        nginx,
    })
}

/// Parses a comma-separated list of names out of `all`, keeping `all`'s order.
fn list<T: Copy>(text: &str, all: &[T], name: fn(T) -> &'static str) -> Result<Vec<T>, String> {
    let names: Vec<&str> = text.split(',').map(str::trim).collect();
    if let Some(unknown) = names.iter().find(|n| !all.iter().any(|&t| name(t) == **n)) {
        let known: Vec<&str> = all.iter().map(|&t| name(t)).collect();
        return Err(format!("{unknown:?} is not one of {}", known.join(", ")));
    }
    Ok(all
        .iter()
        .copied()
        .filter(|&t| names.contains(&name(t)))
        .collect())
}

/// The workloads, in the order they run.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Workload {
    Memory,
    Sse,
    Completions,
    First,
    Bytes,
}

impl Workload {
    const ALL: [Workload; 5] = [
        Workload::Memory,
        Workload::Sse,
        Workload::Completions,
        Workload::First,
        Workload::Bytes,
    ];

    fn name(self) -> &'static str {
        match self {
            Workload::Memory => "memory",
            Workload::Sse => "sse",
            Workload::Completions => "completions",
            Workload::First => "first",
            Workload::Bytes => "bytes",
        }
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(BARE_FLAG) {
        let upstream = args.get(1).and_then(|a| a.parse().ok());
        let Some(upstream) = upstream else {
            eprintln!("{BARE_FLAG} UPSTREAM_ADDR [forward]");
            return ExitCode::from(2);
        };
        bare_proxy(upstream, args.get(2).is_some_and(|a| a == "forward"));
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--print-nginx-config") {
        print!(
            "{}",
            nginx_config(
                Path::new("/tmp/nginx-compare"),
                "127.0.0.1:PROXY_PORT".parse::<Authority>().unwrap(),
                "127.0.0.1:UPSTREAM_PORT".parse::<Authority>().unwrap(),
            )
        );
        return ExitCode::SUCCESS;
    }
    let options = match parse_args(&args) {
        Ok(options) => options,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("error: {message}\n");
            }
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };

    let Some(nginx) = find_nginx(options.nginx.as_deref()) else {
        println!(
            "nginx is not installed, so there is nothing to compare against; skipping.\n\
             Install it (Debian/Ubuntu: `apt-get install -y nginx`) or pass --nginx PATH, then \
             run again:\n  cargo run --release --example nginx_compare"
        );
        return ExitCode::SUCCESS;
    };
    if Command::new("taskset")
        .arg("-V")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        println!("taskset (util-linux) is not installed; it pins the proxies to core 0. Skipping.");
        return ExitCode::SUCCESS;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    if cores < 2 {
        println!("this comparison needs two cores (proxy on one, load on the other); skipping.");
        return ExitCode::SUCCESS;
    }
    if cfg!(debug_assertions) {
        eprintln!(
            "error: a debug build of the load generator would be the bottleneck; run\n  \
             cargo run --release --example nginx_compare"
        );
        return ExitCode::from(2);
    }
    let gateway_bin = match options.gateway_bin.clone() {
        Some(path) => path,
        None => match build_gateway() {
            Ok(path) => path,
            Err(message) => {
                eprintln!("error: {message}");
                return ExitCode::FAILURE;
            }
        },
    };

    // Everything of this process (its runtime's threads are started below and inherit this)
    // runs on the load core.
    pin_to(LOAD_CORE);
    let fd_limit = raise_fd_limit();
    let mut sizes = options.sizes;
    let need = 2 * sizes.memory_streams as u64 + 512;
    if need > fd_limit {
        let fit = (fd_limit.saturating_sub(512) / 2) as usize;
        eprintln!(
            "note: {} streams need about {need} file descriptors and the limit is {fd_limit}; \
             holding {fit} instead (raise it with `ulimit -n {need}`)",
            sizes.memory_streams
        );
        sizes.memory_streams = fit.max(1);
    }

    let bench = Bench::new(sizes, nginx, gateway_bin, options.bare_forward);
    bench.run(&options.workloads, &options.proxies);
    ExitCode::SUCCESS
}

// ---------------------------------------------------------------------------------------------
// The proxies.

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Kind {
    Nginx,
    Bare,
    Gateway,
}

const KINDS: [Kind; 3] = [Kind::Nginx, Kind::Bare, Kind::Gateway];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Nginx => "nginx",
            Kind::Bare => "bare",
            Kind::Gateway => "gateway",
        }
    }
}

/// A proxy process (and, for nginx, its worker), killed with its process group on drop.
struct Proxy {
    kind: Kind,
    child: Child,
    addr: SocketAddr,
    /// What comes before the workload's path segment, e.g. `/v1`.
    prefix: &'static str,
    client: BenchClient,
}

impl Proxy {
    fn uri(&self, path: &str) -> Uri {
        format!("http://{}{}/{path}", self.addr, self.prefix)
            .parse()
            .unwrap()
    }

    /// The proxy's processes: the one started and its children (nginx's worker).
    fn pids(&self) -> Vec<u32> {
        let leader = self.child.id();
        let mut pids = vec![leader];
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                if proc_stat(pid).is_some_and(|s| s.ppid == leader) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// CPU time (user + system, and system alone) of the proxy's processes so far.
    fn cpu(&self) -> (Duration, Duration) {
        self.pids()
            .into_iter()
            .filter_map(proc_stat)
            .fold((Duration::ZERO, Duration::ZERO), |(cpu, sys), s| {
                (cpu + s.cpu, sys + s.sys)
            })
    }

    /// Resident memory of the proxy's processes, in KiB.
    fn rss_kib(&self) -> u64 {
        self.pids().into_iter().map(rss_kib).sum()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let pgid = self.child.id() as i32;
        signal_group(pgid, libc::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // Whatever is left of the group (a worker whose master went first, a slow drain).
        signal_group(pgid, libc::SIGKILL);
        let _ = self.child.wait();
    }
}

/// Sends `signal` to process group `pgid`.
#[allow(unsafe_code)]
fn signal_group(pgid: i32, signal: i32) {
    // SAFETY: kill has no memory-safety preconditions; a group that is gone gives ESRCH.
    unsafe {
        libc::kill(-pgid, signal);
    }
}

/// A command pinned to the proxy core with `taskset`, in a process group of its own (so it
/// and its children can be killed together), that gets SIGTERM if this process dies.
#[allow(unsafe_code)]
fn pinned_command(program: &Path) -> Command {
    let mut cmd = Command::new("taskset");
    cmd.arg("-c").arg(PROXY_CORE.to_string()).arg(program);
    cmd.process_group(0).stdin(Stdio::null());
    // SAFETY: the closure runs between fork and exec and only calls prctl, which is
    // async-signal-safe. The death signal survives `taskset`'s exec of the program.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd
}

/// Starts `cmd` and waits for the `listening on http://ADDR` line on its stdout.
fn spawn_listening(mut cmd: Command, name: &str, log: &Path) -> (Child, SocketAddr) {
    let log_file = std::fs::File::create(log).unwrap();
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(log_file)
        .spawn()
        .unwrap_or_else(|e| panic!("could not start {name}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std_mpsc::channel();
    // Reads the address, then keeps draining stdout so the child never blocks on it.
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(addr) = line.strip_prefix("listening on http://")
                && let Some(tx) = tx.take()
            {
                let _ = tx.send(addr.trim().to_owned());
            }
        }
    });
    match rx.recv_timeout(START_LIMIT) {
        Ok(addr) => (child, addr.parse().expect("a socket address")),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            let log = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{name} did not print `listening on http://ADDR` in time; its stderr:\n{log}");
        }
    }
}

fn find_nginx(given: Option<&Path>) -> Option<PathBuf> {
    let runs = |p: &Path| {
        Command::new(p)
            .arg("-v")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if let Some(path) = given {
        return runs(path).then(|| path.to_owned());
    }
    ["nginx", "/usr/sbin/nginx", "/usr/local/nginx/sbin/nginx"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| runs(p))
}

/// Builds the gateway example (release) with the cargo that runs us; returns its path.
fn build_gateway() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    // <target>/release/examples/nginx_compare
    let target = exe
        .ancestors()
        .nth(3)
        .ok_or("cannot find the target directory")?;
    let bin = target.join("release/examples/gateway");
    match std::env::var_os("CARGO") {
        Some(cargo) => {
            eprintln!("building the gateway: cargo build --release --example gateway");
            let mut build = Command::new(cargo);
            build
                .args(["build", "--release", "--example", "gateway"])
                .current_dir(env!("CARGO_MANIFEST_DIR"));
            // What `cargo run` sets for this binary would look like changed inputs to build
            // scripts that read them (ring's reads CARGO_MANIFEST_DIR) and rebuild half the tree.
            for (name, _) in std::env::vars_os() {
                let name = name.to_string_lossy();
                if name.starts_with("CARGO_PKG_")
                    || [
                        "CARGO_MANIFEST_DIR",
                        "CARGO_MANIFEST_PATH",
                        "CARGO_CRATE_NAME",
                        "CARGO_BIN_NAME",
                        "CARGO_PRIMARY_PACKAGE",
                    ]
                    .contains(&&*name)
                {
                    build.env_remove(&*name);
                }
            }
            let status = build.status().map_err(|e| format!("cargo: {e}"))?;
            if !status.success() {
                return Err("cargo build --release --example gateway failed".into());
            }
        }
        None if bin.exists() => eprintln!(
            "note: not run through cargo; using {} as built (rebuild it with \
             `cargo build --release --example gateway` if the sources changed)",
            bin.display()
        ),
        None => {
            return Err(format!(
                "{} is missing: run `cargo build --release --example gateway`, or start this \
                 with `cargo run --release --example nginx_compare`",
                bin.display()
            ));
        }
    }
    Ok(bin)
}

/// The nginx configuration: one worker, no buffering either way, HTTP/1.1 with a keep-alive
/// pool to the upstream, no access log (the gateway logs nothing per request either).
fn nginx_config(dir: &Path, listen: Authority, upstream: Authority) -> String {
    let dir = dir.display();
    format!(
        r#"# Generated by examples/nginx_compare.rs
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile 20000;

events {{
    worker_connections 10000;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;

    upstream llm {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
    }}

    server {{
        listen {listen};
        location / {{
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "{UPSTREAM_AUTHORIZATION}";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"#
    )
}

fn gateway_config(upstream: SocketAddr) -> String {
    format!(
        r#"# Generated by examples/nginx_compare.rs
path_prefix = "/proxy-api"

[[keys]]
id = "bench"
subject = "bench@example.com"
teams = ["research"]
key = "{GATEWAY_KEY}"

[[accounts]]
name = "bench"
endpoint_type = "none"

[accounts.access]
users = ["everyone"]

[[accounts.endpoints]]
name = "llm"
base_url = "http://{upstream}/v1"
headers = {{ Authorization = "{UPSTREAM_AUTHORIZATION}" }}
"#
    )
}

/// A port free right now (nginx needs one in its config).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("nginx-compare-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).unwrap();
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The bare proxy (a child process of this binary).

/// hyper-util's auto server and pooled legacy client, `TCP_NODELAY` both ways, every request
/// sent to `upstream` and the response body passed on as it comes; or, with `forward`, the
/// crate's `Forward` behind `RescueLayer`.
fn bare_proxy(upstream: SocketAddr, forward: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        println!("listening on http://{}", listener.local_addr().unwrap());
        let absolute = absolute_to(upstream);
        if forward {
            let svc =
                RescueLayer::new().layer(MapRequest::new(Forward::<Incoming>::new(), absolute));
            tower_gateway::server::serve(listener, svc, pending())
                .await
                .unwrap();
            return;
        }
        let mut http = HttpConnector::new();
        http.set_nodelay(true);
        let client: Client<HttpConnector, Incoming> =
            Client::builder(TokioExecutor::new()).build(http);
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let client = client.clone();
            let absolute = absolute.clone();
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let fut = client.request(absolute(req));
                    async move {
                        Ok::<_, Infallible>(match fut.await {
                            Ok(res) => res.map(Either::Left),
                            Err(_) => {
                                let mut res = Response::new(Either::Right(Empty::<Bytes>::new()));
                                *res.status_mut() = StatusCode::BAD_GATEWAY;
                                res
                            }
                        })
                    }
                });
                let _ = auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
}

// ---------------------------------------------------------------------------------------------
// The upstream (in this process, on the load core).

/// The upstream's answers, built once, over static memory: serving a frame costs neither an
/// allocation nor a copy.
struct Canned {
    sse: Arc<[Bytes]>,
    big: Arc<[Bytes]>,
    completion: Arc<[Bytes]>,
    first: Arc<[Bytes]>,
    paced_event: Bytes,
}

impl Canned {
    fn new() -> Self {
        let mut sse = sse_events(SSE_EVENTS - 1);
        sse.push(Bytes::from_static(DONE.as_bytes()));
        Self {
            sse: sse.into(),
            big: big_frames(BIG_LEN, BIG_FRAME),
            completion: vec![Bytes::from_static(COMPLETION.as_bytes())].into(),
            first: vec![leak(sse_event(0).into_bytes())].into(),
            paced_event: leak(sse_event(42).into_bytes()),
        }
    }
}

/// An upstream response body: canned frames, or a paced stream fed by a task.
enum UpBody {
    Frames(Frames),
    Paced(Paced),
}

impl Body for UpBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        match self.get_mut() {
            UpBody::Frames(body) => Pin::new(body).poll_frame(cx),
            UpBody::Paced(body) => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Frames(body) => body.is_end_stream(),
            UpBody::Paced(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpBody::Frames(body) => body.size_hint(),
            UpBody::Paced(body) => body.size_hint(),
        }
    }
}

/// Drains the request body, then answers for the last path segment.
async fn answer(
    req: Request<Incoming>,
    canned: Arc<Canned>,
    mut released: watch::Receiver<u64>,
) -> Result<Response<UpBody>, Infallible> {
    released.borrow_and_update();
    let (parts, body) = req.into_parts();
    discard(body).await;
    let frames = |frames: &Arc<[Bytes]>, exact| UpBody::Frames(Frames::new(frames.clone(), exact));
    let (body, content_type) = match parts.uri.path().rsplit('/').next() {
        Some(PATH_SSE) => (frames(&canned.sse, false), "text/event-stream"),
        Some(PATH_BIG) => (frames(&canned.big, true), "application/octet-stream"),
        Some(PATH_COMPLETION) => (frames(&canned.completion, true), "application/json"),
        Some(PATH_FIRST) => (frames(&canned.first, false), "text/event-stream"),
        Some(PATH_PACED) => (
            UpBody::Paced(Paced::new(canned.paced_event.clone(), released)),
            "text/event-stream",
        ),
        _ => {
            let mut res = Response::new(frames(&Arc::from([]), true));
            *res.status_mut() = StatusCode::NOT_FOUND;
            return Ok(res);
        }
    };
    let mut res = Response::new(body);
    res.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(res)
}

async fn spawn_upstream(canned: Arc<Canned>, released: watch::Receiver<u64>) -> SocketAddr {
    let listener = listen();
    let addr = listener.local_addr().unwrap();
    serve_each(
        listener,
        hyper::service::service_fn(move |req| answer(req, canned.clone(), released.clone())),
    );
    addr
}

// ---------------------------------------------------------------------------------------------
// The clients.

/// Runs `per_task` fetches of `uri` on each of `tasks` tasks and checks every body's length.
async fn fetch_concurrently(
    client: &BenchClient,
    uri: &Uri,
    tasks: usize,
    per_task: usize,
    expected: usize,
) {
    harness::fetch_concurrently(client, uri, tasks, per_task, Some(expected)).await;
}

/// Time from sending the request to the first data frame; the rest is read untimed.
async fn time_to_first_event(client: &BenchClient, uri: &Uri, expected: usize) -> Duration {
    let (elapsed, first, body) = harness::time_to_first_event(client, uri).await;
    let n = first.len() + drain(body).await;
    assert_eq!(n, expected, "{uri}: body length");
    elapsed
}

/// Opens `n` paced streams, each on a connection of its own, and returns once each has
/// delivered its first event, with the tasks that read each stream to its end.
async fn open_streams(n: usize, addr: SocketAddr, uri: Uri) -> Vec<tokio::task::JoinHandle<()>> {
    let make_request = move || {
        let mut req = request(&uri);
        req.headers_mut().insert(
            header::HOST,
            HeaderValue::from_str(&addr.to_string()).unwrap(),
        );
        *req.uri_mut() = uri.path().parse().unwrap();
        req
    };
    harness::open_streams(n, addr, make_request, None).await
}

// ---------------------------------------------------------------------------------------------
// Measuring.

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Metric {
    SseEventsPerSec,
    SseCpuPerEvent,
    SseProxyBusy,
    SseProxyKernel,
    SseLoadBusy,
    CompletionsPerSec,
    CompletionsCpuPerRequest,
    CompletionsProxyBusy,
    CompletionsLoadBusy,
    FirstEventP50,
    BytesPerSec,
    BytesProxyBusy,
    BytesLoadBusy,
    MemoryPerStream,
    MemoryReturned,
}

/// What the issue asks of the gateway for a metric.
enum Target {
    /// gateway ÷ nginx at least this.
    RatioAtLeast(f64),
    /// gateway ÷ nginx at most this.
    RatioAtMost(f64),
    /// gateway − nginx at most this (in the metric's unit).
    PlusAtMost(f64),
    /// The gateway's own figure at most this.
    AtMost(f64),
    /// The gateway's own figure at least this.
    AtLeast(f64),
    /// A diagnostic, no target.
    None,
}

impl Metric {
    const ALL: [Metric; 15] = [
        Metric::SseEventsPerSec,
        Metric::SseCpuPerEvent,
        Metric::CompletionsPerSec,
        Metric::FirstEventP50,
        Metric::BytesPerSec,
        Metric::MemoryPerStream,
        Metric::MemoryReturned,
        Metric::CompletionsCpuPerRequest,
        Metric::SseProxyKernel,
        Metric::SseProxyBusy,
        Metric::SseLoadBusy,
        Metric::CompletionsProxyBusy,
        Metric::CompletionsLoadBusy,
        Metric::BytesProxyBusy,
        Metric::BytesLoadBusy,
    ];

    fn label(self) -> &'static str {
        match self {
            Metric::SseEventsPerSec => "SSE 64×1,000 events/s",
            Metric::SseCpuPerEvent => "SSE proxy CPU µs/event",
            Metric::SseProxyBusy => "SSE proxy core busy %",
            Metric::SseProxyKernel => "SSE proxy CPU in the kernel %",
            Metric::SseLoadBusy => "SSE load core busy %",
            Metric::CompletionsPerSec => "completions c64 req/s",
            Metric::CompletionsCpuPerRequest => "completions proxy CPU µs/request",
            Metric::CompletionsProxyBusy => "completions proxy core busy %",
            Metric::CompletionsLoadBusy => "completions load core busy %",
            Metric::FirstEventP50 => "first event p50 µs",
            Metric::BytesPerSec => "64 MiB in 16 KiB frames MiB/s",
            Metric::BytesProxyBusy => "bytes proxy core busy %",
            Metric::BytesLoadBusy => "bytes load core busy %",
            Metric::MemoryPerStream => "memory KiB per open stream",
            Metric::MemoryReturned => "memory returned after close %",
        }
    }

    fn target(self) -> Target {
        match self {
            Metric::SseEventsPerSec | Metric::CompletionsPerSec => Target::RatioAtLeast(1.0),
            Metric::SseCpuPerEvent => Target::RatioAtMost(1.0),
            Metric::FirstEventP50 => Target::PlusAtMost(50.0),
            Metric::BytesPerSec => Target::RatioAtLeast(2.0),
            Metric::MemoryPerStream => Target::AtMost(24.0),
            Metric::MemoryReturned => Target::AtLeast(90.0),
            _ => Target::None,
        }
    }

    fn target_text(self) -> String {
        match self.target() {
            Target::RatioAtLeast(r) => format!("gw÷nginx ≥ {r}"),
            Target::RatioAtMost(r) => format!("gw÷nginx ≤ {r}"),
            Target::PlusAtMost(d) => format!("gw ≤ nginx + {d}"),
            Target::AtMost(v) => format!("gw ≤ {v}"),
            Target::AtLeast(v) => format!("gw ≥ {v}"),
            Target::None => String::new(),
        }
    }

    /// Whether the gateway's `gw` meets the target against nginx's `nginx`.
    fn met(self, gw: f64, nginx: f64) -> Option<bool> {
        Some(match self.target() {
            Target::RatioAtLeast(r) => gw / nginx >= r,
            Target::RatioAtMost(r) => gw / nginx <= r,
            Target::PlusAtMost(d) => gw - nginx <= d,
            Target::AtMost(v) => gw <= v,
            Target::AtLeast(v) => gw >= v,
            Target::None => return None,
        })
    }
}

/// One run's figures.
type Figures = BTreeMap<(Metric, Kind), f64>;

/// A timed workload: wall time and the CPU time of the proxy and of this (the load) process.
#[derive(Default)]
struct Sample {
    wall: Duration,
    proxy_cpu: Duration,
    /// The part of `proxy_cpu` spent in the kernel.
    proxy_sys: Duration,
    load_cpu: Duration,
}

impl Sample {
    fn proxy_busy(&self) -> f64 {
        100.0 * self.proxy_cpu.as_secs_f64() / self.wall.as_secs_f64()
    }
    fn proxy_kernel_share(&self) -> f64 {
        100.0 * self.proxy_sys.as_secs_f64() / self.proxy_cpu.as_secs_f64().max(1e-9)
    }
    fn load_busy(&self) -> f64 {
        100.0 * self.load_cpu.as_secs_f64() / self.wall.as_secs_f64()
    }
}

struct Expected {
    sse: usize,
    big: usize,
    completion: usize,
    first: usize,
}

struct Bench {
    sizes: Sizes,
    nginx: PathBuf,
    gateway_bin: PathBuf,
    bare_forward: bool,
    rt: Runtime,
    upstream: SocketAddr,
    release: watch::Sender<u64>,
    expected: Expected,
    dir: TempDir,
}

impl Bench {
    fn new(sizes: Sizes, nginx: PathBuf, gateway_bin: PathBuf, bare_forward: bool) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let canned = Arc::new(Canned::new());
        let expected = Expected {
            sse: frames_len(&canned.sse),
            big: frames_len(&canned.big),
            completion: frames_len(&canned.completion),
            first: frames_len(&canned.first),
        };
        let (release, released) = watch::channel(0u64);
        let upstream = rt.block_on(spawn_upstream(canned, released));
        Self {
            sizes,
            nginx,
            gateway_bin,
            bare_forward,
            rt,
            upstream,
            release,
            expected,
            dir: TempDir::new(),
        }
    }

    fn start(&self, kind: Kind) -> Proxy {
        let dir = &self.dir.0;
        let (child, addr, prefix) = match kind {
            Kind::Nginx => {
                let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
                let config = dir.join("nginx.conf");
                std::fs::write(
                    &config,
                    nginx_config(
                        dir,
                        addr.to_string().parse().unwrap(),
                        self.upstream.to_string().parse().unwrap(),
                    ),
                )
                .unwrap();
                let mut cmd = pinned_command(&self.nginx);
                let prefix = format!("{}/", dir.display());
                cmd.arg("-p")
                    .arg(&prefix)
                    .arg("-e")
                    .arg(dir.join("error.log"));
                cmd.arg("-c").arg(&config);
                let log = std::fs::File::create(dir.join("nginx.stderr")).unwrap();
                let mut child = cmd
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()
                    .expect("start nginx");
                let deadline = Instant::now() + START_LIMIT;
                while StdTcpStream::connect(addr).is_err() {
                    let exited = child.try_wait().ok().flatten();
                    if exited.is_some() || Instant::now() > deadline {
                        let _ = child.kill();
                        let _ = child.wait();
                        let log =
                            |name| std::fs::read_to_string(dir.join(name)).unwrap_or_default();
                        panic!(
                            "nginx did not start ({exited:?}):\n{}{}",
                            log("nginx.stderr"),
                            log("error.log")
                        );
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (child, addr, "/v1")
            }
            Kind::Bare => {
                let mut cmd = pinned_command(&std::env::current_exe().unwrap());
                cmd.arg(BARE_FLAG).arg(self.upstream.to_string());
                if self.bare_forward {
                    cmd.arg("forward");
                }
                let (child, addr) = spawn_listening(cmd, "bare proxy", &dir.join("bare.log"));
                (child, addr, "/v1")
            }
            Kind::Gateway => {
                let config = dir.join("gateway.toml");
                std::fs::write(&config, gateway_config(self.upstream)).unwrap();
                let mut cmd = pinned_command(&self.gateway_bin);
                cmd.arg("--config")
                    .arg(&config)
                    .arg("--listen")
                    .arg("127.0.0.1:0")
                    // Like nginx's `access_log off`: no line per request (the spans and the
                    // usage tap still run; only their output is filtered). Set
                    // NGINX_COMPARE_GATEWAY_LOG=info to measure with a line per request.
                    .env(
                        "RUST_LOG",
                        std::env::var("NGINX_COMPARE_GATEWAY_LOG")
                            .unwrap_or_else(|_| "warn".into()),
                    );
                let (child, addr) = spawn_listening(cmd, "gateway", &dir.join("gateway.log"));
                (child, addr, "/proxy-api/bench/llm")
            }
        };
        let proxy = Proxy {
            kind,
            child,
            addr,
            prefix,
            client: self.rt.block_on(async { client() }),
        };
        // Every workload is answered in full before anything is measured.
        self.block_on(async {
            let e = &self.expected;
            for (path, len) in [
                (PATH_SSE, e.sse),
                (PATH_BIG, e.big),
                (PATH_COMPLETION, e.completion),
                (PATH_FIRST, e.first),
            ] {
                let n = drain(send(&proxy.client, &proxy.uri(path)).await).await;
                assert_eq!(n, len, "{} {path}: body length", kind.name());
            }
        });
        proxy
    }

    /// Runs `fut` on the load runtime, failing if it takes longer than [`WORKLOAD_LIMIT`].
    fn block_on<F: Future>(&self, fut: F) -> F::Output {
        self.rt
            .block_on(async { tokio::time::timeout(WORKLOAD_LIMIT, fut).await })
            .unwrap_or_else(|_| panic!("a workload took longer than {WORKLOAD_LIMIT:?}"))
    }

    fn measure<F: Future>(&self, proxy: &Proxy, fut: F) -> Sample {
        let (proxy0, sys0) = proxy.cpu();
        let load0 = self_cpu();
        let start = Instant::now();
        self.block_on(fut);
        let wall = start.elapsed();
        let (proxy1, sys1) = proxy.cpu();
        Sample {
            wall,
            proxy_cpu: proxy1.saturating_sub(proxy0),
            proxy_sys: sys1.saturating_sub(sys0),
            load_cpu: self_cpu().saturating_sub(load0),
        }
    }

    fn run(&self, workloads: &[Workload], kinds: &[Kind]) {
        let s = self.sizes;
        println!(
            "nginx_compare: {} run(s); proxies pinned to core {PROXY_CORE}, upstream and load to \
             core {LOAD_CORE}; bare = {}; load average before: {}",
            s.runs,
            if self.bare_forward {
                "tower_gateway Forward"
            } else {
                "hyper-util"
            },
            load_average()
        );
        println!(
            "nginx: {}; gateway: {}",
            nginx_version(&self.nginx),
            self.gateway_bin.display()
        );
        let mut runs = Vec::new();
        for run in 0..s.runs {
            // Rotate the order so that none is always first or last.
            let mut order = kinds.to_vec();
            order.rotate_left(run % kinds.len());
            let proxies: Vec<Proxy> = order.iter().map(|&k| self.start(k)).collect();
            for proxy in &proxies {
                eprintln!("{}: pid {}", proxy.kind.name(), proxy.child.id());
            }
            let mut figures = Figures::new();
            for &workload in workloads {
                match workload {
                    Workload::Memory => {
                        for proxy in &proxies {
                            self.memory(proxy, &mut figures);
                        }
                    }
                    Workload::Sse => self.sse(&proxies, &mut figures),
                    Workload::Completions => self.completions(&proxies, &mut figures),
                    Workload::First => self.first_event(&proxies, &mut figures),
                    Workload::Bytes => self.bytes(&proxies, &mut figures),
                }
            }
            drop(proxies);
            println!();
            println!(
                "run {} of {} (order: {}; load average after: {})",
                run + 1,
                s.runs,
                order
                    .iter()
                    .map(|k| k.name())
                    .collect::<Vec<_>>()
                    .join(", "),
                load_average()
            );
            print_run(&figures);
            runs.push(figures);
        }
        print_summary(&runs);
    }

    fn memory(&self, proxy: &Proxy, figures: &mut Figures) {
        let s = self.sizes;
        let uri = proxy.uri(PATH_PACED);
        let run_streams = |n| self.block_on(open_streams(n, proxy.addr, uri.clone()));
        let finish = |streams: Vec<tokio::task::JoinHandle<()>>| {
            self.release.send_modify(|g| *g += 1);
            self.block_on(async {
                for stream in streams {
                    stream.await.unwrap();
                }
            });
        };
        // Warm up: first-use initialisation is not a per-stream cost.
        finish(run_streams(10));
        std::thread::sleep(s.settle);
        let before = proxy.rss_kib();
        let streams = run_streams(s.memory_streams);
        std::thread::sleep(s.hold);
        let open = proxy.rss_kib();
        finish(streams);
        std::thread::sleep(s.settle);
        let after = proxy.rss_kib();
        let grown = open.saturating_sub(before);
        let returned = if grown == 0 {
            100.0
        } else {
            100.0 * open.saturating_sub(after).min(grown) as f64 / grown as f64
        };
        figures.insert(
            (Metric::MemoryPerStream, proxy.kind),
            grown as f64 / s.memory_streams as f64,
        );
        figures.insert((Metric::MemoryReturned, proxy.kind), returned);
    }

    /// Runs `pass` for each proxy in turn, `passes` times over, and adds up each proxy's
    /// samples: a load that comes and goes on the machine then weighs on every proxy alike.
    fn interleaved(
        &self,
        proxies: &[Proxy],
        mut pass: impl FnMut(&Proxy) -> Sample,
    ) -> BTreeMap<Kind, Sample> {
        let mut sums: BTreeMap<Kind, Sample> = BTreeMap::new();
        for _ in 0..self.sizes.passes {
            for proxy in proxies {
                let sample = pass(proxy);
                let sum = sums.entry(proxy.kind).or_default();
                sum.wall += sample.wall;
                sum.proxy_cpu += sample.proxy_cpu;
                sum.proxy_sys += sample.proxy_sys;
                sum.load_cpu += sample.load_cpu;
            }
        }
        sums
    }

    fn sse(&self, proxies: &[Proxy], figures: &mut Figures) {
        let expected = self.expected.sse;
        for proxy in proxies {
            // Warm up (and open the 64 connections).
            let uri = proxy.uri(PATH_SSE);
            self.block_on(fetch_concurrently(
                &proxy.client,
                &uri,
                SSE_STREAMS,
                1,
                expected,
            ));
        }
        let rounds = self.sizes.sse_rounds;
        let sums = self.interleaved(proxies, |proxy| {
            let uri = proxy.uri(PATH_SSE);
            self.measure(proxy, async {
                for _ in 0..rounds {
                    fetch_concurrently(&proxy.client, &uri, SSE_STREAMS, 1, expected).await;
                }
            })
        });
        let events = (self.sizes.passes * rounds * SSE_STREAMS * SSE_EVENTS) as f64;
        for (k, sample) in sums {
            figures.insert(
                (Metric::SseEventsPerSec, k),
                events / sample.wall.as_secs_f64(),
            );
            figures.insert(
                (Metric::SseCpuPerEvent, k),
                sample.proxy_cpu.as_secs_f64() * 1e6 / events,
            );
            figures.insert((Metric::SseProxyBusy, k), sample.proxy_busy());
            figures.insert((Metric::SseProxyKernel, k), sample.proxy_kernel_share());
            figures.insert((Metric::SseLoadBusy, k), sample.load_busy());
        }
    }

    fn completions(&self, proxies: &[Proxy], figures: &mut Figures) {
        let expected = self.expected.completion;
        for proxy in proxies {
            let uri = proxy.uri(PATH_COMPLETION);
            self.block_on(fetch_concurrently(
                &proxy.client,
                &uri,
                CLIENTS,
                4,
                expected,
            ));
        }
        let per_client = self.sizes.requests_per_client;
        let sums = self.interleaved(proxies, |proxy| {
            let uri = proxy.uri(PATH_COMPLETION);
            self.measure(
                proxy,
                fetch_concurrently(&proxy.client, &uri, CLIENTS, per_client, expected),
            )
        });
        let requests = (self.sizes.passes * CLIENTS * per_client) as f64;
        for (k, sample) in sums {
            figures.insert(
                (Metric::CompletionsPerSec, k),
                requests / sample.wall.as_secs_f64(),
            );
            figures.insert(
                (Metric::CompletionsCpuPerRequest, k),
                sample.proxy_cpu.as_secs_f64() * 1e6 / requests,
            );
            figures.insert((Metric::CompletionsProxyBusy, k), sample.proxy_busy());
            figures.insert((Metric::CompletionsLoadBusy, k), sample.load_busy());
        }
    }

    fn first_event(&self, proxies: &[Proxy], figures: &mut Figures) {
        let expected = self.expected.first;
        for proxy in proxies {
            let uri = proxy.uri(PATH_FIRST);
            self.block_on(async {
                for _ in 0..20 {
                    time_to_first_event(&proxy.client, &uri, expected).await;
                }
            });
        }
        let per_pass = self.sizes.first_samples.div_ceil(self.sizes.passes);
        let mut times: BTreeMap<Kind, Vec<Duration>> = BTreeMap::new();
        for _ in 0..self.sizes.passes {
            for proxy in proxies {
                let uri = proxy.uri(PATH_FIRST);
                let pass = self.block_on(async {
                    let mut times = Vec::with_capacity(per_pass);
                    for _ in 0..per_pass {
                        times.push(time_to_first_event(&proxy.client, &uri, expected).await);
                    }
                    times
                });
                times.entry(proxy.kind).or_default().extend(pass);
            }
        }
        for (k, mut times) in times {
            times.sort();
            figures.insert(
                (Metric::FirstEventP50, k),
                times[times.len() / 2].as_secs_f64() * 1e6,
            );
        }
    }

    fn bytes(&self, proxies: &[Proxy], figures: &mut Figures) {
        let expected = self.expected.big;
        let sums = self.interleaved(proxies, |proxy| {
            let uri = proxy.uri(PATH_BIG);
            self.measure(proxy, async {
                let n = drain(send(&proxy.client, &uri).await).await;
                assert_eq!(n, expected, "{uri}: body length");
            })
        });
        let bytes = (self.sizes.passes * BIG_LEN) as f64;
        for (k, sample) in sums {
            figures.insert(
                (Metric::BytesPerSec, k),
                bytes / (1 << 20) as f64 / sample.wall.as_secs_f64(),
            );
            figures.insert((Metric::BytesProxyBusy, k), sample.proxy_busy());
            figures.insert((Metric::BytesLoadBusy, k), sample.load_busy());
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reporting.

fn fmt(v: f64) -> String {
    let a = v.abs();
    if a >= 10_000.0 {
        // Thousands separators.
        let s = format!("{:.0}", v);
        let (sign, digits) = s.split_at(usize::from(s.starts_with('-')));
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        format!("{sign}{out}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

fn print_run(figures: &Figures) {
    println!();
    println!("| workload | nginx | bare | gateway | gateway ÷ nginx | bare ÷ nginx |");
    println!("|---|---:|---:|---:|---:|---:|");
    for m in Metric::ALL {
        let get = |k| figures.get(&(m, k)).copied();
        let (n, b, g) = (get(Kind::Nginx), get(Kind::Bare), get(Kind::Gateway));
        if n.is_none() && b.is_none() && g.is_none() {
            continue;
        }
        let value = |v: Option<f64>| v.map_or_else(|| "–".to_owned(), fmt);
        let ratio = |v: Option<f64>| match (v, n) {
            (Some(v), Some(n)) => format!("{:.2}", v / n),
            _ => "–".to_owned(),
        };
        println!(
            "| {} | {} | {} | {} | {} | {} |",
            m.label(),
            value(n),
            value(b),
            value(g),
            ratio(g),
            ratio(b)
        );
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n % 2 == 1 {
        values[n / 2]
    } else {
        (values[n / 2 - 1] + values[n / 2]) / 2.0
    }
}

/// `median [min–max]` of `values` (just the value when there is one).
fn spread(mut values: Vec<f64>, format: fn(f64) -> String) -> String {
    let m = median(&mut values);
    if values.len() < 2 {
        return format(m);
    }
    format!(
        "{} [{}–{}]",
        format(m),
        format(values[0]),
        format(values[values.len() - 1])
    )
}

fn print_summary(runs: &[Figures]) {
    println!();
    println!(
        "summary over {} run(s): median [min–max]; ratios are taken within each run, then the \
         median; 'met' compares the gateway's medians with the issue's targets",
        runs.len()
    );
    println!();
    println!(
        "| workload | nginx | bare | gateway | gateway ÷ nginx | bare ÷ nginx | target | met |"
    );
    println!("|---|---:|---:|---:|---:|---:|---|---|");
    for m in Metric::ALL {
        let values = |k| -> Vec<f64> {
            runs.iter()
                .filter_map(|f| f.get(&(m, k)).copied())
                .collect()
        };
        let ratios = |k| -> Vec<f64> {
            runs.iter()
                .filter_map(|f| Some(f.get(&(m, k))? / f.get(&(m, Kind::Nginx))?))
                .collect()
        };
        let (n, b, g) = (
            values(Kind::Nginx),
            values(Kind::Bare),
            values(Kind::Gateway),
        );
        if n.is_empty() && b.is_empty() && g.is_empty() {
            continue;
        }
        let met = if n.is_empty() || g.is_empty() {
            None
        } else {
            m.met(median(&mut g.clone()), median(&mut n.clone()))
        };
        let met = met.map_or("", |met| if met { "yes" } else { "no" });
        let cell = |v: Vec<f64>, f: fn(f64) -> String| {
            if v.is_empty() {
                "–".to_owned()
            } else {
                spread(v, f)
            }
        };
        let ratio = |r: f64| format!("{r:.2}");
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            m.label(),
            cell(n, fmt),
            cell(b, fmt),
            cell(g, fmt),
            cell(ratios(Kind::Gateway), ratio),
            cell(ratios(Kind::Bare), ratio),
            m.target_text(),
            met
        );
    }
    println!();
    let added: Vec<String> = runs
        .iter()
        .filter_map(|f| {
            let g = f.get(&(Metric::FirstEventP50, Kind::Gateway))?;
            let n = f.get(&(Metric::FirstEventP50, Kind::Nginx))?;
            Some(format!("{:+.0} µs", g - n))
        })
        .collect();
    if !added.is_empty() {
        println!(
            "first event p50, gateway − nginx, run by run: {}",
            added.join(", ")
        );
    }
    for (m, workload) in [
        (Metric::SseLoadBusy, "SSE"),
        (Metric::CompletionsLoadBusy, "completions"),
        (Metric::BytesLoadBusy, "bytes"),
    ] {
        for k in KINDS {
            let mut busy: Vec<f64> = runs
                .iter()
                .filter_map(|f| f.get(&(m, k)).copied())
                .collect();
            if !busy.is_empty() && median(&mut busy) >= 90.0 {
                println!(
                    "note: in the {workload} workload against {} the load core was {:.0}% busy: \
                     the load generator, not the proxy, set the pace, so {}'s figure is a lower \
                     bound",
                    k.name(),
                    median(&mut busy),
                    k.name()
                );
            }
        }
    }
    println!("load average at the end: {}", load_average());
}

// ---------------------------------------------------------------------------------------------
// /proc and friends.

struct ProcStat {
    ppid: u32,
    /// User and system time.
    cpu: Duration,
    /// System time alone.
    sys: Duration,
}

fn clock_ticks() -> u64 {
    #[allow(unsafe_code)]
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// The parent and the CPU time (utime + stime) of process `pid`, from `/proc/PID/stat`.
fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces), from field 3 (state) on.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ppid = fields.get(1)?.parse().ok()?;
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = clock_ticks();
    let time = |t: u64| {
        Duration::from_secs(t / ticks) + Duration::from_nanos((t % ticks) * 1_000_000_000 / ticks)
    };
    Some(ProcStat {
        ppid,
        cpu: time(utime + stime),
        sys: time(stime),
    })
}

fn self_cpu() -> Duration {
    proc_stat(std::process::id()).map_or(Duration::ZERO, |s| s.cpu)
}

/// `VmRSS` of process `pid`, in KiB (0 if it is gone).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

fn nginx_version(nginx: &Path) -> String {
    Command::new(nginx)
        .arg("-v")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_owned())
        .unwrap_or_default()
}
