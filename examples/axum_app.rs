//! Adding the gateway to an existing axum app.
//!
//! ```text
//! WANDB_API_KEY=... GATEWAY_KEY=gw-... cargo run --example axum_app -- [--listen ADDR]
//! ```
//!
//! The app keeps its own routes (`/` and `/health`) and gains the proxy under `/proxy-api`
//! and the management API under `/manage` (e.g. `GET /manage/accounts`):
//! clients call `http://ADDR/proxy-api/coreweave-model/inference/chat/completions` with the
//! gateway key, and the gateway forwards to W&B Inference with the W&B key. Without
//! `WANDB_API_KEY` it still starts (the upstream will answer 401, which the gateway reports as
//! a 502 `upstream_auth_failed`).

use std::net::SocketAddr;

use axum::Router;
use axum::routing::get;
use http::{HeaderMap, HeaderValue};
use tower_gateway::access::{Grants, Subject};
use tower_gateway::auth::{HashedKeyStore, Principal};
use tower_gateway::gateway::Gateway;
use tower_gateway::registry::{AccountSpec, EndpointSpec, Registry};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let listen: SocketAddr = match std::env::args().skip_while(|a| a != "--listen").nth(1) {
        Some(addr) => addr.parse()?,
        None => "127.0.0.1:8080".parse()?,
    };

    // The upstream credential comes from the environment and never reaches clients.
    let wandb_key = std::env::var("WANDB_API_KEY").unwrap_or_default();
    let mut headers = HeaderMap::new();
    let mut auth = HeaderValue::from_str(&format!("Bearer {wandb_key}"))?;
    auth.set_sensitive(true);
    headers.insert("authorization", auth);
    let registry = Registry::from_accounts(vec![AccountSpec {
        endpoints: vec![EndpointSpec {
            headers,
            ..EndpointSpec::new("inference", "https://api.inference.wandb.ai/v1")
        }],
        // Only the research team may call it.
        access: Grants {
            users: vec![Subject::Team("research".into())],
            ..Grants::default()
        },
        ..AccountSpec::new("coreweave-model")
    }])?;

    // Clients hold only gateway keys.
    let gateway_key = std::env::var("GATEWAY_KEY").unwrap_or_else(|_| "gw-axum-demo".to_owned());
    let keys = HashedKeyStore::new().with_key(
        &gateway_key,
        Principal::new("axum-demo", "demo@example.com", ["research"]),
    )?;
    let gateway = Gateway::builder()
        .keys(keys)
        .registry(registry.into())
        .build();

    // The app's own routes, and the gateway beside them. `route_service` on a wildcard keeps
    // the whole path (axum's `nest_service` would strip the prefix).
    let app = Router::new()
        .route(
            "/",
            get(|| async { "my app, with an LLM gateway under /proxy-api\n" }),
        )
        .route("/health", get(|| async { "ok\n" }))
        .route_service("/proxy-api/{*path}", gateway.service::<axum::body::Body>());

    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
