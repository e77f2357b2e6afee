//! The store against real databases: SQLite in a temporary file (always runs) and the
//! PostgreSQL of the machine (`TEST_POSTGRES_URL`, default
//! `postgres://postgres@127.0.0.1:5432/test`), each test in a fresh database of its own that it
//! drops at the end. Without a reachable PostgreSQL the PostgreSQL tests say so and do not
//! run; under `CI=true` that is a failure.
#![cfg(feature = "store")]

use std::time::{Duration, SystemTime};

use http::{HeaderMap, HeaderValue};
use tower_gateway::model::{
    AccountSpec, AuditEntry, EjectPolicy, EndpointSpec, Grants, HealthCheck, KeyDigest, KeyRecord,
    KeySource, RetryPolicy, Snapshot, TargetSpec,
};
use tower_gateway::store::{Store, WriteError};

mod dbs;

use dbs::{PgDatabase, SqliteFile};

const WAIT: Duration = Duration::from_secs(10);

fn entry(action: &str, target: &str) -> AuditEntry {
    AuditEntry {
        actor: "tester".into(),
        action: action.into(),
        target: target.into(),
        changes: serde_json::json!({}),
    }
}

fn account(name: &str, endpoints: &[&str]) -> AccountSpec {
    AccountSpec {
        access: Grants::parse(&["team:platform"], &["everyone"], &[], "access").unwrap(),
        endpoints: endpoints
            .iter()
            .map(|e| {
                let mut headers = HeaderMap::new();
                headers.insert("authorization", HeaderValue::from_static("Bearer upstream"));
                EndpointSpec {
                    headers,
                    ..EndpointSpec::new(*e, "https://api.inference.wandb.ai/v1")
                }
            })
            .collect(),
        ..AccountSpec::new(name)
    }
}

/// The endpoint `inference` as a pool of `urls` (the second with its own credential), with
/// every policy set away from its default.
fn pool_of(urls: &[&str]) -> EndpointSpec {
    let mut own = HeaderMap::new();
    own.insert("authorization", HeaderValue::from_static("Bearer b"));
    EndpointSpec {
        targets: urls
            .iter()
            .enumerate()
            .map(|(i, u)| TargetSpec {
                weight: 3 - i as u32,
                priority: 1 + i as u32,
                headers: if i == 1 {
                    own.clone()
                } else {
                    HeaderMap::new()
                },
                timeouts: tower_gateway::model::Timeouts::from_millis(Some(5), None, Some(7)),
                ..TargetSpec::new(*u)
            })
            .collect(),
        retry: Some(RetryPolicy {
            attempts: 4,
            on_status: vec![500, 503],
            budget_percent: 50,
            min_per_second: 2,
            max_body_bytes: 4096,
        }),
        eject: EjectPolicy {
            consecutive_failures: 2,
            error_percent: 30,
            window: 40,
            base: Duration::from_millis(1500),
            max: Duration::from_secs(60),
        },
        health: Some(HealthCheck {
            path: "/models".into(),
            interval: Duration::from_millis(250),
        }),
        ..EndpointSpec::new("inference", "")
    }
}

fn key(id: &str, secret: &str) -> KeyRecord {
    KeyRecord {
        created_at: Some(SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
        source: KeySource::Store,
        ..KeyRecord::new(
            id,
            KeyDigest::of(secret),
            "alice@example.com",
            vec!["research".into()],
        )
    }
}

/// Writes an account with two endpoints and a key, changes one endpoint, reopens the store and
/// finds everything as it was left, versions included.
async fn changes_survive_a_restart(url: &str) {
    let store = Store::open(url).await.unwrap();
    store
        .write(|s| {
            s.accounts
                .push(account("coreweave-model", &["inference", "embed"]));
            s.keys.push(key("alice", "gw-alice"));
            Ok::<_, String>(((), vec![entry("account.create", "coreweave-model")]))
        })
        .await
        .unwrap();
    store
        .write(|s| {
            s.accounts[0].endpoints[1].base_url = "https://example.com/v2".into();
            Ok::<_, String>(((), vec![entry("endpoint.put", "coreweave-model/embed")]))
        })
        .await
        .unwrap();
    // The first endpoint becomes a pool.
    let pool = pool_of(&["https://a.example/v1", "https://b.example/v1"]);
    store
        .write(|s| {
            let ep = &mut s.accounts[0].endpoints[0];
            ep.base_url.clear();
            ep.targets = pool.targets.clone();
            ep.retry = pool.retry.clone();
            ep.eject = pool.eject;
            ep.health = pool.health.clone();
            Ok::<_, String>(((), vec![entry("endpoint.put", "coreweave-model/inference")]))
        })
        .await
        .unwrap();
    let before = store.load().await.unwrap();
    store.close().await;
    drop(store);

    let store = Store::open(url).await.unwrap();
    let after = store.load().await.unwrap();
    assert_eq!(after.revision, before.revision);
    assert_eq!(after.revision, 3);
    let a = &after.state.accounts[0];
    assert_eq!(a.name, "coreweave-model");
    assert_eq!(a.version, 1);
    assert_eq!(a.access.users.len(), 1);
    let names: Vec<(&str, u64)> = a
        .endpoints
        .iter()
        .map(|e| (e.name.as_str(), e.version))
        .collect();
    assert_eq!(names, [("inference", 2), ("embed", 2)]);
    let ep = &a.endpoints[0];
    assert!(ep.same_content(&EndpointSpec {
        headers: ep.headers.clone(),
        ..pool_of(&["https://a.example/v1", "https://b.example/v1"])
    }));
    assert_eq!(ep.targets[1].headers["authorization"], "Bearer b");
    assert!(ep.targets[1].headers["authorization"].is_sensitive());
    assert_eq!(a.endpoints[1].base_url, "https://example.com/v2");
    assert_eq!(a.endpoints[0].headers["authorization"], "Bearer upstream");
    assert!(a.endpoints[0].headers["authorization"].is_sensitive());
    assert_eq!(after.state.keys, [key("alice", "gw-alice")]);
    let log = store.audit_log(10, None).await.unwrap();
    let actions: Vec<&str> = log.iter().map(|(_, _, e)| e.action.as_str()).collect();
    assert_eq!(
        actions,
        ["endpoint.put", "endpoint.put", "account.create"],
        "newest first"
    );
    let older = store.audit_log(10, Some(log[0].0)).await.unwrap();
    assert_eq!(older.len(), 2, "the cursor pages");
    store.close().await;
}

/// A change that the edit refuses, or that fails validation, changes nothing.
async fn a_refused_or_invalid_change_changes_nothing(url: &str) {
    let store = Store::open(url).await.unwrap();
    store
        .write(|s| {
            s.accounts.push(account("a", &["e"]));
            Ok::<_, String>(((), vec![]))
        })
        .await
        .unwrap();
    let before = store.load().await.unwrap();
    let refused = store
        .write(|s| {
            s.accounts.clear();
            Err::<((), Vec<AuditEntry>), _>("no".to_owned())
        })
        .await;
    assert!(matches!(refused, Err(WriteError::Rejected(ref e)) if e == "no"));
    let invalid = store
        .write(|s| {
            s.accounts[0].endpoints[0].base_url = "https://example.com/v1/".into();
            s.keys.push(key("k", "gw-k"));
            Ok::<_, String>(((), vec![entry("endpoint.put", "a/e")]))
        })
        .await;
    match invalid {
        Err(WriteError::Invalid(e)) => {
            assert_eq!(e.field(), "accounts[0].endpoints[0].base_url")
        }
        other => panic!("{other:?}"),
    }
    let after = store.load().await.unwrap();
    assert_eq!(after.revision, before.revision, "no revision was committed");
    assert_eq!(
        after.state.accounts[0].endpoints[0].base_url,
        "https://api.inference.wandb.ai/v1"
    );
    assert!(after.state.keys.is_empty());
    assert!(store.audit_log(10, None).await.unwrap().is_empty());
    store.close().await;
}

/// `writers` tasks over `stores` each add one header to the same endpoint, reading the count
/// inside their write: none is lost.
async fn concurrent_writers_lose_nothing(stores: &[Store], writers: usize) {
    stores[0]
        .write(|s| {
            s.accounts.push(account("a", &["e"]));
            Ok::<_, String>(((), vec![]))
        })
        .await
        .unwrap();
    let tasks: Vec<_> = (0..writers)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            tokio::spawn(async move {
                store
                    .write(|s| {
                        let headers = &mut s.accounts[0].endpoints[0].headers;
                        let n = headers.len();
                        headers.insert(
                            http::HeaderName::try_from(format!("x-writer-{n}")).unwrap(),
                            HeaderValue::from_static("1"),
                        );
                        Ok::<_, String>(((), vec![entry("endpoint.put", "a/e")]))
                    })
                    .await
                    .unwrap();
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(WAIT * 3, t).await.unwrap().unwrap();
    }
    let loaded = stores[0].load().await.unwrap();
    let ep = &loaded.state.accounts[0].endpoints[0];
    assert_eq!(
        ep.headers.len(),
        1 + writers,
        "every writer's header is there"
    );
    assert_eq!(
        ep.version,
        1 + writers as u64,
        "every write bumped the version once"
    );
    assert_eq!(
        stores[0].audit_log(1000, None).await.unwrap().len(),
        writers
    );
}

#[tokio::test]
async fn sqlite_changes_survive_a_restart() {
    let file = SqliteFile::new();
    changes_survive_a_restart(&file.url()).await;
}

#[tokio::test]
async fn sqlite_a_refused_or_invalid_change_changes_nothing() {
    let file = SqliteFile::new();
    a_refused_or_invalid_change_changes_nothing(&file.url()).await;
}

#[tokio::test]
async fn sqlite_concurrent_writers_lose_nothing() {
    let file = SqliteFile::new();
    let a = Store::open(&file.url()).await.unwrap();
    let b = Store::open(&file.url()).await.unwrap();
    concurrent_writers_lose_nothing(&[a, b], 20).await;
}

#[tokio::test]
async fn postgres_changes_survive_a_restart() {
    let Some(db) = PgDatabase::new().await else {
        return;
    };
    changes_survive_a_restart(&db.url).await;
    db.drop_it().await;
}

#[tokio::test]
async fn postgres_a_refused_or_invalid_change_changes_nothing() {
    let Some(db) = PgDatabase::new().await else {
        return;
    };
    a_refused_or_invalid_change_changes_nothing(&db.url).await;
    db.drop_it().await;
}

#[tokio::test]
async fn postgres_concurrent_writers_through_three_replicas_lose_nothing() {
    let Some(db) = PgDatabase::new().await else {
        return;
    };
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(Store::open(&db.url).await.unwrap());
    }
    concurrent_writers_lose_nothing(&stores, 30).await;
    for s in &stores {
        s.close().await;
    }
    db.drop_it().await;
}

#[tokio::test]
async fn postgres_replicas_starting_at_once_migrate_an_empty_database_once() {
    let Some(db) = PgDatabase::new().await else {
        return;
    };
    let opens: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url.clone();
            tokio::spawn(async move { Store::open(&url).await })
        })
        .collect();
    let mut stores = Vec::new();
    for o in opens {
        stores.push(o.await.unwrap().expect("every replica starts"));
    }
    let seeds: Vec<_> = stores
        .iter()
        .map(|s| {
            let s = s.clone();
            tokio::spawn(async move {
                let seed = Snapshot {
                    accounts: vec![account("seeded", &["e"])],
                    keys: vec![KeyRecord::new(
                        "file-key",
                        KeyDigest::of("gw-file"),
                        "ops@example.com",
                        vec![],
                    )],
                    rate_limits: None,
                };
                s.seed(&seed, entry("seed", "config")).await.unwrap()
            })
        })
        .collect();
    let mut seeded = 0;
    for s in seeds {
        seeded += usize::from(s.await.unwrap());
    }
    assert_eq!(seeded, 1, "one replica seeds, the others find it seeded");
    let loaded = stores[0].load().await.unwrap();
    assert_eq!(loaded.state.accounts.len(), 1);
    assert_eq!(loaded.state.keys.len(), 1);
    assert_eq!(loaded.state.keys[0].source, KeySource::File);
    for s in &stores {
        s.close().await;
    }
    db.drop_it().await;
}

#[tokio::test]
async fn postgres_a_change_reaches_another_replica_by_notification() {
    let Some(db) = PgDatabase::new().await else {
        return;
    };
    // A resync far longer than the wait: only the notification can bring the change.
    let writer = Store::open_with(&db.url, Duration::from_secs(600))
        .await
        .unwrap();
    let reader = Store::open_with(&db.url, Duration::from_secs(600))
        .await
        .unwrap();
    let mut revisions = reader.revisions();
    // Let the reader's listener connect.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for i in 0..5 {
        writer
            .write(|s| {
                s.accounts.push(account(&format!("a{i}"), &["e"]));
                Ok::<_, String>(((), vec![]))
            })
            .await
            .unwrap();
        tokio::time::timeout(WAIT, revisions.wait_for(|r| *r > i))
            .await
            .expect("the notification arrives")
            .unwrap();
    }
    assert_eq!(reader.load().await.unwrap().state.accounts.len(), 5);
    writer.close().await;
    reader.close().await;
    db.drop_it().await;
}

#[tokio::test]
async fn sqlite_a_second_store_on_the_same_file_catches_up_by_resync() {
    let file = SqliteFile::new();
    let writer = Store::open(&file.url()).await.unwrap();
    let reader = Store::open_with(&file.url(), Duration::from_millis(100))
        .await
        .unwrap();
    let mut revisions = reader.revisions();
    writer
        .write(|s| {
            s.accounts.push(account("a", &["e"]));
            Ok::<_, String>(((), vec![]))
        })
        .await
        .unwrap();
    tokio::time::timeout(WAIT, revisions.wait_for(|r| *r >= 1))
        .await
        .expect("the resync sees the change")
        .unwrap();
}

/// A write refused on a state newer than this process knew (another process committed it)
/// makes that revision known at once, so the writer can catch up without waiting for a
/// notification or a resync.
#[tokio::test]
async fn sqlite_a_refused_write_makes_the_newer_revision_known() {
    let file = SqliteFile::new();
    let long = Duration::from_secs(600);
    let a = Store::open_with(&file.url(), long).await.unwrap();
    let b = Store::open_with(&file.url(), long).await.unwrap();
    a.write(|s| {
        s.accounts.push(account("a", &["e"]));
        Ok::<_, String>(((), vec![]))
    })
    .await
    .unwrap();
    assert_eq!(*b.revisions().borrow(), 0, "nothing told b yet");
    let refused = b
        .write(|_| Err::<((), Vec<AuditEntry>), _>("stale".to_owned()))
        .await;
    assert!(matches!(refused, Err(WriteError::Rejected(_))));
    assert_eq!(*b.revisions().borrow(), 1, "the refusal saw revision 1");
    assert_eq!(
        b.load().await.unwrap().revision,
        1,
        "and nothing was committed"
    );
}
