//! A runnable gateway.
//!
//! ```text
//! cargo run --example gateway                                   # offline demo
//! cargo run --release --example gateway -- --config gateway.toml [--store URL]
//!     [--listen ADDR] [--metrics ADDR] [--include-usage] [--log-format json]
//! ```
//!
//! With no arguments it starts a mock W&B Inference upstream on loopback and a gateway in front
//! of it with a demo key, then prints the base URL, the key and ready-to-paste curl and Python
//! snippets. With `--config` it serves a real configuration, and SIGHUP reloads the file
//! (a bad file is refused and the running configuration stays). With `--store URL` (or
//! `GATEWAY_STORE`; `sqlite://PATH` or `postgres://…`) the keys, accounts and grants live in
//! the store, shared by every replica started with the same `--config` and `--store`: the
//! file seeds an empty store once and then gives only the settings, and SIGHUP re-reads only
//! those. A store that cannot be reached at start is an error. Either way, once bound it
//! prints `listening on http://ADDR`, serves the proxy under `/proxy-api` and the management
//! API under `/manage`, and Ctrl-C or SIGTERM stops accepting and lets in-flight streams
//! finish within 30 seconds.
//!
//! Every call logs (stderr) its `gateway.request` span when it closes, with who called, what,
//! the status, the time to first byte, the tokens; and one `usage` event. The logs are in
//! colour only when stderr is a terminal and `NO_COLOR` is unset or empty. `--metrics ADDR`
//! serves Prometheus metrics at `http://ADDR/metrics`; `--include-usage` asks streaming chat
//! completions for their usage (the demo always does); `--log-format json` logs one JSON
//! object per line.

#[path = "support/mock_upstream.rs"]
mod mock_upstream;

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use http::HeaderMap;
use tokio::net::TcpListener;
use tower_gateway::access::{Grants, Subject};
use tower_gateway::auth::{HashedKeyStore, Principal};
use tower_gateway::gateway::{Gateway, GatewayBuilder};
use tower_gateway::manage::{EXAMPLE_MODEL, UsageSnippet};
use tower_gateway::model::LimitBackend;
use tower_gateway::registry::{AccountSpec, EndpointSpec, Registry};
use tower_gateway::server::{ServeOptions, serve_with_options};
use tower_gateway::store::Store;
use tower_gateway::usage::UsageTapLayer;

const USAGE: &str = "\
usage: gateway [--config FILE] [--store URL] [--redis URL] [--listen ADDR] [--metrics ADDR]
               [--include-usage] [--log-format text|json]

  (no arguments)     offline demo: a mock W&B Inference upstream and a gateway in front of it
  --config FILE      serve the gateway described by FILE (TOML; see the README)
  --store URL        keep keys, accounts and grants in sqlite://PATH or postgres://...
                     (also GATEWAY_STORE); with --config, the file seeds an empty store once
  --redis URL        count the rate limits in Redis, shared by every replica: redis://HOST:PORT
                     (also GATEWAY_REDIS); overrides [rate_limits] backend of the file
  --listen ADDR      address to listen on (default 127.0.0.1:8080; 127.0.0.1:0 picks a free port)
  --metrics ADDR     serve Prometheus metrics at http://ADDR/metrics
  --include-usage    ask streaming chat completions for their usage (stream_options.include_usage),
                     hiding the extra event from clients that did not ask (the demo always does)
  --log-format FMT   text (default) or json, one object per line; RUST_LOG filters
";

const DEMO_GATEWAY_KEY: &str = "gw-demo-key";
const DEMO_ADMIN_KEY: &str = "gw-demo-admin-key";
const DEMO_UPSTREAM_KEY: &str = "demo-wandb-upstream-key";
/// The key of the demo's sandbox upstream: printed, so a newcomer can add it in the console.
const DEMO_SANDBOX_KEY: &str = "demo-sandbox-key";

struct Args {
    config: Option<String>,
    store: Option<String>,
    redis: Option<String>,
    listen: SocketAddr,
    metrics: Option<SocketAddr>,
    include_usage: bool,
    json_logs: bool,
}

fn parse_addr(flag: &str, addr: Option<String>) -> Result<SocketAddr, String> {
    let addr = addr.ok_or_else(|| format!("{flag} needs an address"))?;
    addr.parse()
        .map_err(|_| format!("{flag}: {addr:?} is not an address like 127.0.0.1:8080"))
}

fn parse_args() -> Result<Args, String> {
    let mut parsed = Args {
        config: None,
        store: std::env::var("GATEWAY_STORE")
            .ok()
            .filter(|s| !s.is_empty()),
        redis: std::env::var("GATEWAY_REDIS")
            .ok()
            .filter(|s| !s.is_empty()),
        listen: "127.0.0.1:8080".parse().expect("static address"),
        metrics: None,
        include_usage: false,
        json_logs: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => parsed.config = Some(args.next().ok_or("--config needs a file")?),
            "--store" => parsed.store = Some(args.next().ok_or("--store needs a URL")?),
            "--redis" => parsed.redis = Some(args.next().ok_or("--redis needs a URL")?),
            "--listen" => parsed.listen = parse_addr("--listen", args.next())?,
            "--metrics" => parsed.metrics = Some(parse_addr("--metrics", args.next())?),
            "--include-usage" => parsed.include_usage = true,
            "--log-format" => match args.next().as_deref() {
                Some("text") => parsed.json_logs = false,
                Some("json") => parsed.json_logs = true,
                _ => return Err("--log-format needs text or json".into()),
            },
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(parsed)
}

/// Logs to stderr: each request's span when it closes (with all its fields) and every event.
/// Colours only when stderr is a terminal and `NO_COLOR` is unset or empty (no-color.org).
fn init_logging(json: bool) {
    use std::io::IsTerminal;
    use tracing_subscriber::fmt::format::FmtSpan;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,tower_gateway=info".into());
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let fmt = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_span_events(FmtSpan::CLOSE)
        .with_ansi(std::io::stderr().is_terminal() && !no_color)
        .with_writer(std::io::stderr);
    if json {
        fmt.json().flatten_event(true).init();
    } else {
        fmt.init();
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(args) => args,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("error: {message}\n");
            }
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    init_logging(args.json_logs);

    if let Some(addr) = args.metrics {
        let exporter = metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install();
        match exporter {
            Ok(()) => eprintln!("metrics on http://{addr}/metrics"),
            Err(err) => {
                eprintln!("error: cannot serve metrics on {addr}: {err}");
                return ExitCode::FAILURE;
            }
        }
    }

    let (gateway, demo) = match (&args.config, &args.store) {
        (config, Some(url)) => {
            let builder =
                Gateway::builder().usage(UsageTapLayer::new().include_usage(args.include_usage));
            let builder = match config {
                Some(path) => match builder.config_file(path) {
                    Ok(builder) => builder,
                    Err(err) => {
                        eprintln!("error: {path}: {err}");
                        return ExitCode::FAILURE;
                    }
                },
                None => builder,
            };
            let Some(builder) = with_redis(builder, args.redis.as_deref()) else {
                return ExitCode::FAILURE;
            };
            // The URL may hold a password: it is never printed.
            let store = match Store::open(url).await {
                Ok(store) => store,
                Err(err) => {
                    eprintln!(
                        "error: cannot open the store: {err}; refusing to start without the keys it holds"
                    );
                    return ExitCode::FAILURE;
                }
            };
            match builder.build_with_store(store).await {
                Ok(gateway) => {
                    if config.is_some() {
                        reload_on_sighup(gateway.clone());
                    }
                    (gateway, false)
                }
                Err(err) => {
                    eprintln!(
                        "error: cannot load the store: {err}; refusing to start without the keys it holds"
                    );
                    return ExitCode::FAILURE;
                }
            }
        }
        (Some(path), None) => match Gateway::builder()
            .usage(UsageTapLayer::new().include_usage(args.include_usage))
            .config_file(path)
        {
            Ok(builder) => {
                let Some(builder) = with_redis(builder, args.redis.as_deref()) else {
                    return ExitCode::FAILURE;
                };
                let gateway = builder.build();
                reload_on_sighup(gateway.clone());
                (gateway, false)
            }
            Err(err) => {
                eprintln!("error: {path}: {err}");
                return ExitCode::FAILURE;
            }
        },
        (None, None) if args.redis.is_some() => {
            eprintln!("error: --redis needs --config or --store: the demo has no rate limits\n");
            eprint!("{USAGE}");
            return ExitCode::from(2);
        }
        (None, None) => match demo_gateway().await {
            Ok(gateway) => (gateway, true),
            Err(err) => {
                eprintln!("error: could not start the mock upstream: {err}");
                return ExitCode::FAILURE;
            }
        },
    };

    let listener = match TcpListener::bind(args.listen).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!(
                "error: cannot listen on {}: {err} (try --listen 127.0.0.1:0 for a free port)",
                args.listen
            );
            return ExitCode::FAILURE;
        }
    };
    let addr = listener
        .local_addr()
        .expect("bound listener has an address");
    println!("listening on http://{addr}");
    if demo {
        print_demo_help(addr, gateway.path_prefix());
    }

    // The library leaves the allocator alone by default; this application gives glibc's free
    // pages back after a burst of streams ends (`malloc_trim`; see `ServeOptions`).
    let options = ServeOptions::new().release_memory(true);
    match serve_with_options(listener, gateway.app(), shutdown_signal(), options).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}

/// The demo: a mock upstream that requires its own key, and a gateway that holds it.
async fn demo_gateway() -> std::io::Result<Gateway> {
    let upstream = mock_upstream::MockUpstream::new(DEMO_UPSTREAM_KEY, Duration::from_millis(40));
    let upstream_addr = upstream.spawn().await?;
    eprintln!(
        "mock W&B Inference upstream on http://{upstream_addr}/v1 (it requires its own key, which only the gateway holds)"
    );
    // A second mock, whose key is public, to add in the console's wizard (the first one's key
    // stays the gateway's secret).
    let sandbox = mock_upstream::MockUpstream::new(DEMO_SANDBOX_KEY, Duration::from_millis(40))
        .spawn()
        .await?;
    eprintln!(
        "sandbox upstream for the console's wizard: base URL http://{sandbox}/v1, header Authorization = Bearer {DEMO_SANDBOX_KEY}"
    );

    let mut headers = HeaderMap::new();
    headers.insert(
        "authorization",
        format!("Bearer {DEMO_UPSTREAM_KEY}")
            .parse()
            .expect("valid header value"),
    );
    // The platform team manages the account; the research team may call it.
    let registry = Registry::from_accounts(vec![AccountSpec {
        access: Grants {
            managers: vec![Subject::Team("platform".into())],
            users: vec![Subject::Team("research".into())],
            viewers: vec![],
        },
        endpoints: vec![EndpointSpec {
            headers,
            ..EndpointSpec::new("inference", format!("http://{upstream_addr}/v1"))
        }],
        ..AccountSpec::new("coreweave-model")
    }])
    .expect("the demo registry is valid");
    let keys = HashedKeyStore::new()
        .with_key(
            DEMO_GATEWAY_KEY,
            Principal::new("demo", "demo@example.com", ["research"]),
        )
        .expect("one key");
    Ok(Gateway::builder()
        .keys(keys)
        .registry(registry.into())
        // The platform team runs the gateway: it adds accounts and issues keys (the console).
        .admins(vec![Subject::Team("platform".into())])
        // The demo's stream carries its usage, so every call logs its tokens.
        .usage(UsageTapLayer::new().include_usage(true))
        .build())
}

fn print_demo_help(addr: SocketAddr, prefix: &str) {
    let base = format!("http://{addr}{prefix}/coreweave-model/inference");
    let snippet = UsageSnippet::new(&base, DEMO_GATEWAY_KEY, EXAMPLE_MODEL);
    println!(
        r#"
tower-gateway demo: a gateway in front of a mock W&B Inference upstream

  base URL  {base}
  API key   {DEMO_GATEWAY_KEY}   (team research: may call the endpoint)
  admin key {DEMO_ADMIN_KEY}   (team platform: may manage it)
  console   http://{addr}/console/   (sign in with the admin key to add and edit endpoints)

Stream a chat completion with curl:

{curl}

Or with the OpenAI Python client (pip install openai):

{python}

Manage endpoints (list, create, update, delete, usage snippets):

  curl http://{addr}/manage/accounts -H "Authorization: Bearer {DEMO_ADMIN_KEY}"

Press Ctrl-C to stop."#,
        curl = indent(&snippet.curl),
        python = indent(&snippet.python),
    );
}

fn indent(text: &str) -> String {
    text.lines()
        .map(|l| format!("  {l}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reloads the configuration file on SIGHUP; a bad file is refused and the running
/// configuration stays.
/// `--redis URL`: the rate limits are counted in Redis. The URL may hold a password: it is
/// never printed.
fn with_redis(builder: GatewayBuilder, url: Option<&str>) -> Option<GatewayBuilder> {
    let Some(url) = url else {
        return Some(builder);
    };
    match builder.rate_limit_backend(LimitBackend::Redis(url.to_owned())) {
        Ok(builder) => Some(builder),
        Err(err) => {
            eprintln!("error: --redis: {err}");
            None
        }
    }
}

fn reload_on_sighup(gateway: Gateway) {
    #[cfg(unix)]
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            match gateway.reload() {
                Ok(()) => eprintln!("reloaded the configuration"),
                Err(err) => eprintln!("reload refused, the running configuration stays: {err}"),
            }
        }
    });
    #[cfg(not(unix))]
    let _ = gateway;
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
    eprintln!("shutting down: finishing in-flight streams (up to 30 s)");
}
