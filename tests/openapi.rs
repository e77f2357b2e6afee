//! The management API's OpenAPI 3 document (`GET /manage/openapi.json`), and a property-based
//! run against it: sequences of operations drawn from the document, with parameters and bodies
//! generated from its schemas (valid, nearly valid and garbage), sent with an admin key to a
//! real gateway on a SQLite store. No answer is a 5xx, no answer holds a secret, and after each
//! sequence the state is consistent: every listed account and endpoint can be read back.
#![cfg(feature = "store")]

mod dbs;
mod support;

use std::collections::BTreeSet;

use http::Method;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestCaseError, TestRng, TestRunner};
use serde_json::{Value, json};
use tower_gateway::config::{GatewayConfig, SecretSource};
use tower_gateway::gateway::Gateway;
use tower_gateway::store::Store;

use support::*;

const ADMIN: &str = "gw-admin-key";
const USER: &str = "gw-user-key";
const UPSTREAM_SECRET: &str = "up-secret-5e1f";

fn config_toml(base_url: &str) -> String {
    format!(
        r#"
admins = ["team:platform"]

[[keys]]
id = "admin"
subject = "admin@example.com"
teams = ["platform"]
key = "{ADMIN}"

[[keys]]
id = "user"
subject = "user@example.com"
teams = ["research"]
key = "{USER}"

[[accounts]]
name = "coreweave-model"
header_auth = {{ Authorization = "Bearer {UPSTREAM_SECRET}" }}
access = {{ managers = ["team:platform"], users = ["team:research"] }}

[[accounts.endpoints]]
name = "inference"
base_url = "{base_url}"
"#
    )
}

async fn gateway(base_url: &str, store_url: &str) -> TestGateway {
    gateway_and_store(base_url, store_url).await.0
}

async fn gateway_and_store(base_url: &str, store_url: &str) -> (TestGateway, Store) {
    let config = GatewayConfig::from_toml(
        &config_toml(base_url),
        &SecretSource::from_vars([] as [(&str, &str); 0], std::env::temp_dir()),
    )
    .unwrap();
    let store = Store::open(store_url).await.unwrap();
    let gw = serve_app(
        Gateway::builder()
            .config(config)
            .build_with_store(store.clone())
            .await
            .unwrap(),
    )
    .await;
    (gw, store)
}

/// Gives the platform team back its grant on the account (a sequence may have taken it away,
/// as any manager may) and the `inference` endpoint, so the next sequence starts with both.
async fn reset(gw: &TestGateway, store: &Store, base_url: &str) {
    store
        .write(|s| {
            let account = s
                .accounts
                .iter_mut()
                .find(|a| a.name == "coreweave-model")
                .expect("the account cannot be deleted through the API");
            account.access = tower_gateway::model::Grants::parse(
                &["team:platform"],
                &["team:research"],
                &[] as &[&str],
                "access",
            )
            .unwrap();
            if !account.endpoints.iter().any(|e| e.name == "inference") {
                account
                    .endpoints
                    .push(tower_gateway::model::EndpointSpec::new(
                        "inference",
                        base_url,
                    ));
            }
            Ok::<_, String>(((), vec![]))
        })
        .await
        .unwrap();
    let path = gw.url("/manage/accounts/coreweave-model/endpoints/inference");
    for _ in 0..500 {
        if send_json(Method::GET, path.clone(), Some(ADMIN), None)
            .await
            .status
            == 200
        {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    panic!("the reset did not reach the gateway");
}

async fn document(gw: &TestGateway) -> Value {
    let ans = send_json(
        Method::GET,
        gw.url("/manage/openapi.json"),
        Some(USER),
        None,
    )
    .await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    assert_eq!(ans.headers["content-type"], "application/json");
    ans.json()
}

/// Every `$ref` in `v`.
fn refs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(map) => {
            for (k, v) in map {
                match (k.as_str(), v) {
                    ("$ref", Value::String(r)) => out.push(r.clone()),
                    _ => refs(v, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_describes_every_route() {
    let file = dbs::SqliteFile::new();
    let (up, _feeds) = sse_upstream().await;
    let gw = gateway(&up.base_url(), &file.url()).await;
    let doc = document(&gw).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{doc}");
    assert_eq!(doc["servers"][0]["url"], "/manage");
    let mut operations = BTreeSet::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            operations.insert(format!("{} {path}", method.to_uppercase()));
            assert_eq!(op["security"], json!([{"bearer": []}]), "{method} {path}");
            assert!(op["responses"]["401"].is_object(), "{method} {path}");
        }
    }
    let want: BTreeSet<String> = [
        "GET /accounts",
        "GET /accounts/{account}",
        "PUT /accounts/{account}/access",
        "PUT /accounts/{account}",
        "GET /accounts/{account}/endpoints/{endpoint}",
        "PUT /accounts/{account}/endpoints/{endpoint}",
        "DELETE /accounts/{account}/endpoints/{endpoint}",
        "GET /accounts/{account}/endpoints/{endpoint}/snippet",
        "GET /keys",
        "POST /keys",
        "DELETE /keys/{id}",
        "POST /keys/{id}/rotate",
        "GET /audit",
        "GET /rate-limits",
        "PUT /rate-limits",
        "GET /rate-limits/usage",
        "GET /usage",
    ]
    .into_iter()
    .map(String::from)
    .collect();
    assert_eq!(operations, want);
    let mut all = Vec::new();
    refs(&doc, &mut all);
    assert!(!all.is_empty());
    for r in all {
        let name = r
            .strip_prefix("#/components/schemas/")
            .expect("a schema reference");
        assert!(
            doc["components"]["schemas"][name].is_object(),
            "{r} does not resolve"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// The property-based run.

/// One operation of a sequence: which operation of the document, and seeds for everything
/// else (so proptest can shrink them).
#[derive(Clone, Debug)]
struct Op {
    operation: usize,
    params: [usize; 2],
    body: u64,
    garbage: bool,
    if_match: usize,
}

fn op() -> impl Strategy<Value = Op> {
    (
        0usize..64,
        [0usize..64, 0usize..64],
        any::<u64>(),
        prop::bool::weighted(0.15),
        0usize..6,
    )
        .prop_map(|(operation, params, body, garbage, if_match)| Op {
            operation,
            params,
            body,
            garbage,
            if_match,
        })
}

/// A small deterministic generator from a seed.
struct Seeded(u64);

impl Seeded {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[(self.next() % items.len() as u64) as usize]
    }
}

const STRINGS: &[&str] = &[
    "https://api.inference.wandb.ai/v1",
    "https://api.inference.wandb.ai/v1",
    "https://api.inference.wandb.ai/v1",
    "http://127.0.0.1:9/v1",
    "everyone",
    "team:research",
    "https://example.com/v1/",
    "ftp://x",
    "everyone",
    "team:research",
    "team:platform",
    "user:user@example.com",
    "team:",
    "nobody",
    "",
    "ops@example.com",
    "2030-01-01T00:00:00Z",
    "1999-01-01T00:00:00Z",
    "not a time",
    "Bearer ${WANDB_API_KEY}",
    "{team}/inference",
    "a\nb",
    "é",
];

const NAMES: &[&str] = &[
    "Authorization",
    "x-org",
    "OpenAI-Project",
    "Host",
    "Connection",
    "bad name",
    "",
];

/// A value for `schema` (resolving references in `doc`), or now and then something else.
fn value_for(doc: &Value, schema: &Value, rng: &mut Seeded, depth: usize) -> Value {
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return value_for(doc, &doc["components"]["schemas"][name], rng, depth + 1);
    }
    for key in ["oneOf", "anyOf", "allOf"] {
        if let Some(options) = schema[key].as_array() {
            return value_for(doc, rng.pick(options), rng, depth + 1);
        }
    }
    if depth > 6 || rng.next() % 17 == 0 {
        return rng
            .pick(&[
                Value::Null,
                json!(7),
                json!("x"),
                json!([]),
                json!({}),
                json!(true),
            ])
            .clone();
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec!["object"],
    };
    match *rng.pick(&types) {
        "null" => Value::Null,
        "string" => json!(rng.pick(STRINGS)),
        "integer" => json!(rng.pick(&[0u64, 1, 1000, 60_000, 4_294_967_295])),
        "boolean" => json!(rng.next() % 2 == 0),
        "array" => {
            let n = rng.next() % 3;
            Value::Array(
                (0..n)
                    .map(|_| value_for(doc, &schema["items"], rng, depth + 1))
                    .collect(),
            )
        }
        _ => {
            let mut map = serde_json::Map::new();
            if let Some(props) = schema["properties"].as_object() {
                let required: Vec<&str> = schema["required"]
                    .as_array()
                    .map(|r| r.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                for (name, prop) in props {
                    // `base_url` (or `targets`) is what an endpoint needs: nearly always there.
                    if required.contains(&name.as_str())
                        || name == "base_url"
                        || rng.next() % 2 == 0
                    {
                        // Most of the time a value the gateway accepts, so that writes apply
                        // and later operations meet what they made.
                        let usual = rng.next() % 4 != 0;
                        let value = match name.as_str() {
                            "base_url" if usual => json!("https://api.inference.wandb.ai/v1"),
                            // A pool instead of `base_url` is drawn as it comes (and mostly
                            // refused); most endpoints keep the one upstream.
                            "targets" | "retry" | "eject" | "health" if usual => Value::Null,
                            "headers" if usual => json!({"Authorization": "Bearer sk-generated"}),
                            "managers" if usual => json!(["team:platform"]),
                            "users" | "viewers" if usual => json!(["team:research"]),
                            "subject" if usual => json!("ci@example.com"),
                            "teams" if usual => json!(["research"]),
                            "expires_at" if usual => json!("2099-01-01T00:00:00Z"),
                            _ => value_for(doc, prop, rng, depth + 1),
                        };
                        map.insert(name.clone(), value);
                    }
                }
            } else if schema["additionalProperties"].is_object() {
                for _ in 0..rng.next() % 3 {
                    let name = rng.pick(NAMES).to_string();
                    let value = value_for(doc, &schema["additionalProperties"], rng, depth + 1);
                    map.insert(name, value);
                }
            }
            Value::Object(map)
        }
    }
}

/// The operations of the document: method, path template, request body schema.
fn operations(doc: &Value) -> Vec<(Method, String, Option<Value>)> {
    let mut ops = Vec::new();
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            let body = op["requestBody"]["content"]["application/json"]["schema"].clone();
            ops.push((
                method.to_uppercase().parse().unwrap(),
                path.clone(),
                (!body.is_null()).then_some(body),
            ));
        }
    }
    ops
}

/// Runs one sequence; `issued` collects the keys the gateway issued, which may appear only in
/// the answer that issued them.
async fn run(
    gw: &TestGateway,
    doc: &Value,
    ops: &[Op],
    issued: &mut Vec<String>,
    seen: &mut BTreeSet<(String, u16)>,
) -> Result<(), TestCaseError> {
    let operations = operations(doc);
    for op in ops {
        let (method, template, body_schema) = &operations[op.operation % operations.len()];
        let ids: Vec<String> = send_json(Method::GET, gw.url("/manage/keys"), Some(ADMIN), None)
            .await
            .json()["keys"]
            .as_array()
            .map(|ks| {
                ks.iter()
                    .map(|k| k["id"].as_str().unwrap().to_owned())
                    .collect()
            })
            .unwrap_or_default();
        let accounts = [
            "coreweave-model",
            "coreweave-model",
            "coreweave-model",
            "other",
            "a%20b",
            "%2e%2e",
        ];
        let endpoints = [
            "inference",
            "inference",
            "fresh",
            "fresh",
            "e-2",
            "a%20b",
            "..",
        ];
        let mut keys: Vec<String> = vec!["admin".into(), "nope".into()];
        keys.extend(ids);
        let path = template
            .replace("{account}", accounts[op.params[0] % accounts.len()])
            .replace("{endpoint}", endpoints[op.params[1] % endpoints.len()])
            .replace("{id}", &keys[op.params[1] % keys.len()]);
        let mut rng = Seeded(op.body | 1);
        let body = body_schema.as_ref().map(|schema| {
            if op.garbage {
                rng.pick(&["not json", "[]", "{\"unknown\": 1}", "", "{"])
                    .to_string()
            } else {
                value_for(doc, schema, &mut rng, 0).to_string()
            }
        });
        let if_match = [
            None,
            Some("\"1\""),
            Some("\"2\""),
            Some("*"),
            Some("garbage"),
            None,
        ][op.if_match % 6];
        let mut req = http::Request::builder()
            .method(method.clone())
            .uri(gw.url(&format!("/manage{path}")))
            .header("authorization", format!("Bearer {ADMIN}"))
            .header("content-type", "application/json");
        if let Some(tag) = if_match {
            req = req.header("if-match", tag);
        }
        let req = req
            .body(http_body_util::Full::from(body.clone().unwrap_or_default()))
            .unwrap();
        let res = within("an answer", client().request(req)).await.unwrap();
        let status = res.status().as_u16();
        let text = body_string(res).await;
        seen.insert((format!("{method} {template}"), status));
        if std::env::var("DEBUG_OPENAPI").is_ok() && template.contains("{endpoint}") {
            eprintln!("{method} {path} {body:?} -> {status} {text}");
        }
        prop_assert!(status < 500, "{method} {path} {body:?}: {status} {text}");
        for secret in [UPSTREAM_SECRET, ADMIN, USER] {
            prop_assert!(
                !text.contains(secret),
                "{method} {path}: a secret in {text}"
            );
        }
        let issuing = status == 201 && (path == "/keys" || path.ends_with("/rotate"));
        for key in issued.iter() {
            prop_assert!(
                !text.contains(key.as_str()),
                "{method} {path}: an issued key in {text}"
            );
        }
        if issuing {
            let v: Value = serde_json::from_str(&text).unwrap();
            issued.push(v["key"].as_str().unwrap().to_owned());
        }
    }
    // Consistency: everything listed can be read back, and the audit log reads.
    let list = send_json(Method::GET, gw.url("/manage/accounts"), Some(ADMIN), None).await;
    prop_assert_eq!(list.status, 200);
    for account in list.json()["accounts"].as_array().unwrap() {
        let name = account["name"].as_str().unwrap();
        let one = send_json(
            Method::GET,
            gw.url(&format!("/manage/accounts/{name}")),
            Some(ADMIN),
            None,
        )
        .await;
        prop_assert_eq!(one.status, 200);
        for ep in account["endpoints"].as_array().unwrap() {
            let path = format!(
                "/manage/accounts/{name}/endpoints/{}",
                ep["name"].as_str().unwrap()
            );
            let got = send_json(Method::GET, gw.url(&path), Some(ADMIN), None).await;
            prop_assert_eq!(got.status, 200);
            prop_assert!(got.headers.contains_key("etag"));
        }
    }
    let audit = send_json(
        Method::GET,
        gw.url("/manage/audit?limit=1000"),
        Some(ADMIN),
        None,
    )
    .await;
    prop_assert_eq!(audit.status, 200);
    for key in issued.iter() {
        prop_assert!(
            !audit.body.contains(key.as_str()),
            "an issued key in the audit log"
        );
    }
    Ok(())
}

#[test]
fn operations_drawn_from_the_document_never_fail_or_leak() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let file = dbs::SqliteFile::new();
    let (gw, store, doc, up) = rt.block_on(async {
        let (up, feeds) = sse_upstream().await;
        let (gw, store) = gateway_and_store(&up.base_url(), &file.url()).await;
        let doc = document(&gw).await;
        (gw, store, doc, (up, feeds))
    });
    // A fixed seed: the same sequences on every run, so what the run covers (checked below)
    // does not depend on luck.
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: 128,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let issued = std::sync::Mutex::new(Vec::new());
    let seen = std::sync::Mutex::new(BTreeSet::new());
    runner
        .run(&prop::collection::vec(op(), 1..8), |ops| {
            let (mut issued, mut seen) = (issued.lock().unwrap(), seen.lock().unwrap());
            rt.block_on(async {
                let result = run(&gw, &doc, &ops, &mut issued, &mut seen).await;
                reset(&gw, &store, &up.0.base_url()).await;
                result
            })
        })
        .unwrap();
    // The run reached every operation, and both sides of it: accepted and refused.
    let seen = seen.into_inner().unwrap();
    eprintln!("answers seen: {seen:?}");
    let operations: BTreeSet<&str> = seen.iter().map(|(op, _)| op.as_str()).collect();
    assert_eq!(
        operations.len(),
        17,
        "every operation was tried: {operations:?}"
    );
    for (op, status) in [
        ("GET /accounts/{account}", 200),
        ("PUT /accounts/{account}/endpoints/{endpoint}", 201),
        ("PUT /accounts/{account}/access", 200),
        ("DELETE /accounts/{account}/endpoints/{endpoint}", 200),
        ("POST /keys", 201),
        ("POST /keys", 400),
    ] {
        assert!(
            seen.contains(&(op.to_owned(), status)),
            "no {status} to {op}"
        );
    }
    for status in [200, 201, 400, 404] {
        assert!(
            seen.iter().any(|(_, s)| *s == status),
            "no {status} in {seen:?}"
        );
    }
}
