//! The store off the hot path: how long a full snapshot takes to load, and how long a change
//! takes to reach another replica.
//!
//! - `snapshot` group: loading 10,000 keys and 1,000 endpoints (10 accounts) from SQLite and
//!   from PostgreSQL, against the baseline `compile`, the same snapshot compiled into the live
//!   registry and keys without a database (what every replica does after each load).
//! - `propagation`: 100 changes written through one PostgreSQL replica; for each, the time
//!   until a second replica (its own connections and listener) has it in its live registry.
//!   Printed as p50 and p99, with the write's own time beside it.
//!
//! PostgreSQL is the machine's (`TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`); each run makes a database of its own and drops
//! it. Without it the PostgreSQL arms are skipped, and say so.
//!
//! ```text
//! cargo bench --bench store
//! ```

use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue};
use sqlx::Connection;
use tower_gateway::model::{AccountSpec, EndpointSpec, Grants, KeyDigest, KeyRecord, Snapshot};
use tower_gateway::registry::{Live, SharedKeyStore, SharedRegistry};
use tower_gateway::store::Store;

fn state(keys: usize, accounts: usize, endpoints_each: usize) -> Snapshot {
    let access = Grants::parse(&["team:platform"], &["everyone"], &[], "access").unwrap();
    let accounts = (0..accounts)
        .map(|a| AccountSpec {
            access: access.clone(),
            endpoints: (0..endpoints_each)
                .map(|e| {
                    let mut headers = HeaderMap::new();
                    headers.insert(
                        "authorization",
                        HeaderValue::from_static("Bearer upstream-key-0123456789"),
                    );
                    EndpointSpec {
                        headers,
                        ..EndpointSpec::new(
                            format!("endpoint-{e}"),
                            "https://api.inference.wandb.ai/v1",
                        )
                    }
                })
                .collect(),
            ..AccountSpec::new(format!("account-{a}"))
        })
        .collect();
    let keys = (0..keys)
        .map(|i| KeyRecord {
            created_at: Some(SystemTime::now()),
            ..KeyRecord::new(
                format!("key-{i}"),
                KeyDigest::of(&format!("gw-bench-{i}")),
                format!("user-{i}@example.com"),
                vec![format!("team-{}", i % 50)],
            )
        })
        .collect();
    Snapshot {
        accounts,
        keys,
        rate_limits: None,
    }
}

fn seed_entry() -> tower_gateway::model::AuditEntry {
    tower_gateway::model::AuditEntry {
        actor: "bench".into(),
        action: "seed".into(),
        target: "store".into(),
        changes: serde_json::json!({}),
    }
}

/// A database of its own on the machine's PostgreSQL: its URL and how to drop it.
async fn postgres() -> Option<(String, impl AsyncFnOnce())> {
    let admin = std::env::var("TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let Ok(mut conn) = sqlx::PgConnection::connect(&admin).await else {
        eprintln!("SKIPPED: PostgreSQL is not reachable; the PostgreSQL arms did not run");
        return None;
    };
    let name = format!("gw_bench_{}", std::process::id());
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&mut conn)
        .await
        .unwrap();
    let (base, _) = admin.rsplit_once('/').unwrap();
    let url = format!("{base}/{name}");
    Some((url, async move || {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut conn)
            .await
            .unwrap();
    }))
}

fn snapshot(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let big = state(10_000, 10, 100);
    let dir =
        std::env::temp_dir().join(format!("tower-gateway-bench-store-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let sqlite = rt.block_on(async {
        let store = Store::open(&format!("sqlite://{}", dir.join("state.db").display()))
            .await
            .unwrap();
        store.seed(&big, seed_entry()).await.unwrap();
        store
    });
    let pg = rt.block_on(async {
        let (url, drop_db) = postgres().await?;
        let store = Store::open(&url).await.unwrap();
        store.seed(&big, seed_entry()).await.unwrap();
        Some((store, drop_db))
    });
    let live = Live::new(
        SharedRegistry::default(),
        SharedKeyStore::default(),
        Vec::new(),
    );
    let mut g = c.benchmark_group("snapshot_10k_keys_1k_endpoints");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    g.bench_function("compile", |b| b.iter(|| live.apply(big.clone()).unwrap()));
    g.bench_function("sqlite_load", |b| {
        b.to_async(&rt)
            .iter(|| async { sqlite.load().await.unwrap() })
    });
    if let Some((store, _)) = &pg {
        g.bench_function("postgres_load", |b| {
            b.to_async(&rt)
                .iter(|| async { store.load().await.unwrap() })
        });
    }
    g.finish();
    rt.block_on(async {
        sqlite.close().await;
        if let Some((store, drop_db)) = pg {
            store.close().await;
            drop_db().await;
        }
    });
    let _ = std::fs::remove_dir_all(&dir);
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

fn propagation(_c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let Some((url, drop_db)) = postgres().await else {
            return;
        };
        let writer = Store::open(&url).await.unwrap();
        writer.seed(&state(100, 1, 10), seed_entry()).await.unwrap();
        let reader = Store::open(&url).await.unwrap();
        let live = Live::new(
            SharedRegistry::default(),
            SharedKeyStore::default(),
            Vec::new(),
        );
        reader.follow(live.clone()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (mut reach, mut writes) = (Vec::new(), Vec::new());
        for i in 0..100u64 {
            let start = Instant::now();
            writer
                .write(|s| {
                    s.accounts[0].endpoints[0].timeouts.idle =
                        Some(Duration::from_millis(1000 + i));
                    Ok::<_, String>(((), vec![]))
                })
                .await
                .unwrap();
            writes.push(start.elapsed());
            let want = Some(Duration::from_millis(1000 + i));
            loop {
                let seen = live
                    .registry()
                    .load()
                    .endpoint("account-0", "endpoint-0")
                    .map(|e| e.timeouts().idle);
                if seen == Some(want) {
                    break;
                }
                assert!(
                    start.elapsed() < Duration::from_secs(10),
                    "change {i} never arrived"
                );
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            reach.push(start.elapsed());
        }
        reach.sort_unstable();
        writes.sort_unstable();
        println!(
            "propagation over 100 changes (PostgreSQL, two replicas): write p50 {:?} p99 {:?}; \
             in the other replica's live registry p50 {:?} p99 {:?}",
            percentile(&writes, 0.5),
            percentile(&writes, 0.99),
            percentile(&reach, 0.5),
            percentile(&reach, 0.99),
        );
        writer.close().await;
        reader.close().await;
        drop_db().await;
    });
}

criterion_group!(benches, snapshot, propagation);
criterion_main!(benches);
