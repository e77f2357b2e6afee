//! The management API and access control through the real stack: `Gateway::app()` (proxy and
//! management on one port) on a real hyper server, real upstreams on loopback, a real client.

mod support;

use std::collections::BTreeSet;

use http::Method;
use serde_json::{Value, json};
use tower_gateway::config::{GatewayConfig, SecretSource};
use tower_gateway::gateway::Gateway;

use support::*;

// ---------------------------------------------------------------------------------------------
// Helpers.

/// A gateway from TOML text, with `${VAR}` taken from `vars` only.
fn gateway_from(toml: &str, vars: &[(&str, &str)]) -> Gateway {
    let secrets = SecretSource::from_vars(vars.iter().copied(), std::env::temp_dir());
    let config = GatewayConfig::from_toml(toml, &secrets).unwrap_or_else(|e| panic!("config: {e}"));
    Gateway::builder().config(config).build()
}

/// A management call: `path` is under `/manage`.
async fn manage(
    gw: &TestGateway,
    method: Method,
    path: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> Answer {
    send_json(method, gw.url(&format!("/manage{path}")), key, body).await
}

/// A proxy call to `/proxy-api/{account}/{endpoint}{rest}`.
async fn proxy(
    gw: &TestGateway,
    method: Method,
    account: &str,
    endpoint: &str,
    rest: &str,
    key: Option<&str>,
    body: Option<&str>,
) -> Answer {
    send_json(
        method,
        gw.url(&format!("/proxy-api/{account}/{endpoint}{rest}")),
        key,
        body,
    )
    .await
}

/// `GET /manage{path}` with `key`.
async fn get(gw: &TestGateway, path: &str, key: &str) -> Answer {
    manage(gw, Method::GET, path, Some(key), None).await
}

/// `PUT /manage{path}` with `key` and a JSON `body`.
async fn put(gw: &TestGateway, path: &str, key: &str, body: &str) -> Answer {
    manage(gw, Method::PUT, path, Some(key), Some(body)).await
}

const CHAT: &str = r#"{"model":"meta-llama/Llama-3.1-8B-Instruct","messages":[{"role":"user","content":"Say hello"}]}"#;

/// A [`CHAT`] completion through `/proxy-api/{account}/{endpoint}` with `key` (if any).
async fn chat(gw: &TestGateway, account: &str, endpoint: &str, key: Option<&str>) -> Answer {
    proxy(
        gw,
        Method::POST,
        account,
        endpoint,
        "/chat/completions",
        key,
        Some(CHAT),
    )
    .await
}

/// A `[[keys]]` entry of a configuration file (no `teams` line when `teams` is empty).
fn key_toml(id: &str, subject: &str, teams: &[&str], key: &str) -> String {
    let teams = if teams.is_empty() {
        String::new()
    } else {
        format!("teams = [\"{}\"]\n", teams.join("\", \""))
    };
    format!("\n[[keys]]\nid = \"{id}\"\nsubject = \"{subject}\"\n{teams}key = \"{key}\"\n")
}

/// The keys of the platform manager (pat) and the research user (rita).
fn staff_keys_toml(manager_key: &str, research_key: &str) -> String {
    [
        key_toml(
            "platform-manager",
            "pat@example.com",
            &["platform"],
            manager_key,
        ),
        key_toml(
            "research-user",
            "rita@example.com",
            &["research"],
            research_key,
        ),
    ]
    .concat()
}

/// Asserts a gateway-made error: status, `x-gateway-error` code, JSON error shape.
fn assert_gateway_error(ans: &Answer, status: u16, code: &str, context: &str) {
    assert_eq!(ans.status.as_u16(), status, "{context}: {}", ans.body);
    assert_eq!(
        ans.headers
            .get("x-gateway-error")
            .map(|v| v.to_str().unwrap()),
        Some(code),
        "{context}: {}",
        ans.body
    );
    let body = ans.json();
    assert_eq!(body["error"]["code"], code, "{context}: {}", ans.body);
    assert!(
        body["error"]["message"].is_string(),
        "{context}: {}",
        ans.body
    );
}

/// The (account, endpoint) pairs a listing shows.
fn listed(list: &Value) -> BTreeSet<(String, String)> {
    let mut out = BTreeSet::new();
    for account in list["accounts"].as_array().expect("accounts array") {
        let name = account["name"].as_str().unwrap().to_owned();
        for ep in account["endpoints"].as_array().expect("endpoints array") {
            out.insert((name.clone(), ep["name"].as_str().unwrap().to_owned()));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Roles: a platform manager, a research user, a viewer and an outsider.

const MGR: &str = "gw-mgr-CANARY-5f1c0b7e";
const RES: &str = "gw-res-CANARY-9a2d4e61";
const VIEW: &str = "gw-view-CANARY-3b8f7c02";
const OUT: &str = "gw-out-CANARY-c4e1a9d5";
const SALES: &str = "gw-sales-CANARY-7e0b2f93";

const ACCOUNT_SECRET: &str = "sk-CANARY-acct-71f0c9e2b4";
const ENDPOINT_SECRET: &str = "sk-CANARY-endp-a83d5f10c6";
const CUSTOM_SECRET: &str = "sk-CANARY-cust-2e9b7d4a18";

const ROLE_KEYS: [(&str, &str); 4] = [
    ("platform manager", MGR),
    ("research user", RES),
    ("viewer", VIEW),
    ("outsider", OUT),
];

fn roles_toml() -> String {
    staff_keys_toml("${MGR_KEY}", "${RES_KEY}")
        + &key_toml("viewer", "vic@example.com", &["finance"], "${VIEW_KEY}")
        + &key_toml("outsider", "otto@example.com", &["sales"], "${OUT_KEY}")
        + ROLES_ACCOUNTS_TOML
}

const ROLES_ACCOUNTS_TOML: &str = r#"
[[accounts]]
name = "coreweave-model"
header_auth = { Authorization = "Bearer ${ACCOUNT_SECRET}" }

[accounts.access]
managers = ["team:platform"]
users = ["team:research"]
viewers = ["user:vic@example.com"]

[[accounts.endpoints]]
name = "inference"
base_url = "http://127.0.0.1:9/v1"
headers = { Authorization = "Bearer ${ENDPOINT_SECRET}", X-Custom-Secret = "${CUSTOM_SECRET}" }

[[accounts.endpoints]]
name = "research-only"
base_url = "http://127.0.0.1:9/research"
access = { users = ["team:research"] }

[[accounts]]
name = "platform-internal"
access = { managers = ["team:platform"] }

[[accounts.endpoints]]
name = "admin"
base_url = "http://127.0.0.1:9/admin"
"#;

fn role_vars() -> [(&'static str, &'static str); 7] {
    [
        ("MGR_KEY", MGR),
        ("RES_KEY", RES),
        ("VIEW_KEY", VIEW),
        ("OUT_KEY", OUT),
        ("ACCOUNT_SECRET", ACCOUNT_SECRET),
        ("ENDPOINT_SECRET", ENDPOINT_SECRET),
        ("CUSTOM_SECRET", CUSTOM_SECRET),
    ]
}

async fn role_gateway() -> TestGateway {
    serve_app(gateway_from(&roles_toml(), &role_vars())).await
}

/// One management operation and the status each role gets, in [`ROLE_KEYS`] order.
struct Op {
    what: &'static str,
    method: Method,
    path: &'static str,
    body: Option<&'static str>,
    expect: [u16; 4],
    /// After a success: a `GET` path (as the manager), a JSON pointer into its answer and the
    /// value expected there.
    effect: Option<(&'static str, &'static str, Value)>,
}

fn ops() -> Vec<Op> {
    const ALL_OK: [u16; 4] = [200, 200, 200, 200];
    const MANAGER_ONLY: [u16; 4] = [200, 403, 403, 403];
    const NOT_FOUND: [u16; 4] = [404, 404, 404, 404];
    let ep = "/accounts/coreweave-model/endpoints/inference";
    vec![
        Op {
            what: "list",
            method: Method::GET,
            path: "/accounts",
            body: None,
            expect: ALL_OK,
            effect: None,
        },
        Op {
            what: "get account",
            method: Method::GET,
            path: "/accounts/coreweave-model",
            body: None,
            expect: [200, 200, 200, 403],
            effect: None,
        },
        Op {
            what: "get an account granted to the platform team only",
            method: Method::GET,
            path: "/accounts/platform-internal",
            body: None,
            expect: [200, 403, 403, 403],
            effect: None,
        },
        Op {
            what: "get endpoint",
            method: Method::GET,
            path: "/accounts/coreweave-model/endpoints/inference",
            body: None,
            expect: [200, 200, 200, 403],
            effect: None,
        },
        Op {
            what: "get an endpoint whose override drops the viewers",
            method: Method::GET,
            path: "/accounts/coreweave-model/endpoints/research-only",
            body: None,
            expect: [200, 200, 403, 403],
            effect: None,
        },
        Op {
            what: "get snippet",
            method: Method::GET,
            path: "/accounts/coreweave-model/endpoints/inference/snippet",
            body: None,
            expect: [200, 200, 200, 403],
            effect: None,
        },
        Op {
            what: "create endpoint",
            method: Method::PUT,
            path: "/accounts/coreweave-model/endpoints/fresh",
            body: Some(r#"{"base_url": "http://127.0.0.1:9/fresh"}"#),
            expect: [201, 403, 403, 403],
            effect: Some((
                "/accounts/coreweave-model/endpoints/fresh",
                "/base_url",
                json!("http://127.0.0.1:9/fresh"),
            )),
        },
        Op {
            what: "update endpoint",
            method: Method::PUT,
            path: "/accounts/coreweave-model/endpoints/inference",
            body: Some(r#"{"base_url": "http://127.0.0.1:9/v2"}"#),
            expect: MANAGER_ONLY,
            effect: Some((ep, "/base_url", json!("http://127.0.0.1:9/v2"))),
        },
        Op {
            what: "update an endpoint with its own grants (account managers stay managers)",
            method: Method::PUT,
            path: "/accounts/coreweave-model/endpoints/research-only",
            body: Some(
                r#"{"base_url": "http://127.0.0.1:9/research-v2", "access": {"users": ["team:research"]}}"#,
            ),
            expect: MANAGER_ONLY,
            effect: Some((
                "/accounts/coreweave-model/endpoints/research-only",
                "/base_url",
                json!("http://127.0.0.1:9/research-v2"),
            )),
        },
        Op {
            what: "delete endpoint",
            method: Method::DELETE,
            path: "/accounts/coreweave-model/endpoints/inference",
            body: None,
            expect: MANAGER_ONLY,
            effect: Some((ep, "/error/code", json!("not_found"))),
        },
        Op {
            what: "put account access",
            method: Method::PUT,
            path: "/accounts/coreweave-model/access",
            body: Some(r#"{"managers": ["team:platform"], "users": ["everyone"]}"#),
            expect: MANAGER_ONLY,
            effect: Some((
                "/accounts/coreweave-model",
                "/access/users",
                json!(["everyone"]),
            )),
        },
        Op {
            what: "a method the resource does not have",
            method: Method::POST,
            path: "/accounts",
            body: Some("{}"),
            expect: [405, 405, 405, 405],
            effect: None,
        },
        Op {
            what: "get an unknown account",
            method: Method::GET,
            path: "/accounts/no-such-account",
            body: None,
            expect: NOT_FOUND,
            effect: None,
        },
        Op {
            what: "get an unknown endpoint",
            method: Method::GET,
            path: "/accounts/coreweave-model/endpoints/no-such-endpoint",
            body: None,
            expect: NOT_FOUND,
            effect: None,
        },
        Op {
            what: "snippet of an unknown endpoint",
            method: Method::GET,
            path: "/accounts/coreweave-model/endpoints/no-such-endpoint/snippet",
            body: None,
            expect: NOT_FOUND,
            effect: None,
        },
        Op {
            what: "delete an unknown endpoint",
            method: Method::DELETE,
            path: "/accounts/coreweave-model/endpoints/no-such-endpoint",
            body: None,
            expect: NOT_FOUND,
            effect: None,
        },
        Op {
            what: "put an endpoint into an unknown account",
            method: Method::PUT,
            path: "/accounts/no-such-account/endpoints/x",
            body: Some(r#"{"base_url": "http://127.0.0.1:9/x"}"#),
            expect: NOT_FOUND,
            effect: None,
        },
        Op {
            what: "put access of an unknown account",
            method: Method::PUT,
            path: "/accounts/no-such-account/access",
            body: Some(r#"{"users": ["everyone"]}"#),
            expect: NOT_FOUND,
            effect: None,
        },
    ]
}

/// Every operation, by every role, on a fresh gateway: the status, the error shape of a
/// refusal, that a refusal changes nothing, and that an allowed change took effect. Without a
/// key, or with an unknown one, every operation is a 401.
#[tokio::test]
async fn each_operation_is_allowed_or_denied_per_role() {
    for op in ops() {
        for (i, (who, key)) in ROLE_KEYS.iter().enumerate() {
            let gw = role_gateway().await;
            let before = get(&gw, "/accounts", MGR).await;
            assert_eq!(before.status, 200);
            let context = format!("{} by the {who}", op.what);
            let ans = manage(&gw, op.method.clone(), op.path, Some(key), op.body).await;
            assert_eq!(ans.status.as_u16(), op.expect[i], "{context}: {}", ans.body);
            assert_eq!(ans.headers["content-type"], "application/json", "{context}");
            match ans.status.as_u16() {
                200 | 201 => {
                    ans.json();
                    if let Some((path, pointer, want)) = &op.effect {
                        let after = get(&gw, path, MGR).await;
                        assert_eq!(
                            after.json().pointer(pointer),
                            Some(want),
                            "{context}: effect not seen in {path}: {}",
                            after.body
                        );
                    }
                }
                status => {
                    let code = match status {
                        403 => "permission_denied",
                        404 => "not_found",
                        405 => "method_not_allowed",
                        _ => panic!("{context}: unexpected {status}"),
                    };
                    assert_gateway_error(&ans, status, code, &context);
                    let after = get(&gw, "/accounts", MGR).await;
                    assert_eq!(
                        after.json(),
                        before.json(),
                        "{context}: a refused operation changed the configuration"
                    );
                }
            }
        }
        let gw = role_gateway().await;
        for key in [None, Some("gw-unknown-key")] {
            let ans = manage(&gw, op.method.clone(), op.path, key, op.body).await;
            assert_gateway_error(
                &ans,
                401,
                "invalid_api_key",
                &format!("{} with key {key:?}", op.what),
            );
        }
    }
}

/// The listing holds exactly what each caller may view, with the caller's role, and never an
/// account the caller has no grant on.
#[tokio::test]
async fn list_shows_only_what_the_caller_may_view() {
    let gw = role_gateway().await;
    let pairs = |list: &[(&str, &str)]| -> BTreeSet<(String, String)> {
        list.iter()
            .map(|(a, e)| ((*a).to_owned(), (*e).to_owned()))
            .collect()
    };
    // (key, endpoints listed, (account, your_role) per listed account)
    type Case = (
        &'static str,
        BTreeSet<(String, String)>,
        Vec<(&'static str, Value)>,
    );
    let cases: [Case; 4] = [
        (
            MGR,
            pairs(&[
                ("coreweave-model", "inference"),
                ("coreweave-model", "research-only"),
                ("platform-internal", "admin"),
            ]),
            vec![
                ("coreweave-model", json!("manager")),
                ("platform-internal", json!("manager")),
            ],
        ),
        (
            RES,
            pairs(&[
                ("coreweave-model", "inference"),
                ("coreweave-model", "research-only"),
            ]),
            vec![("coreweave-model", json!("user"))],
        ),
        (
            VIEW,
            pairs(&[("coreweave-model", "inference")]),
            vec![("coreweave-model", json!("viewer"))],
        ),
        (OUT, pairs(&[]), vec![]),
    ];
    for (key, endpoints, accounts) in cases {
        let ans = get(&gw, "/accounts", key).await;
        assert_eq!(ans.status, 200, "{}", ans.body);
        let list = ans.json();
        assert_eq!(listed(&list), endpoints, "{key}: {list:#}");
        let got: Vec<(String, Value)> = list["accounts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                (
                    a["name"].as_str().unwrap().to_owned(),
                    a["your_role"].clone(),
                )
            })
            .collect();
        let want: Vec<(String, Value)> = accounts
            .into_iter()
            .map(|(a, r)| (a.to_owned(), r))
            .collect();
        assert_eq!(got, want, "{key}: {list:#}");
    }

    // One account, seen by the viewer: the endpoint whose override drops viewers is hidden.
    let ans = get(&gw, "/accounts/coreweave-model", VIEW).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    let account = ans.json();
    let names: Vec<&str> = account["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["inference"]);
    assert_eq!(account["your_role"], "viewer");
    assert_eq!(
        account["access"],
        json!({"managers": ["team:platform"], "users": ["team:research"], "viewers": ["user:vic@example.com"]})
    );

    // The endpoint's JSON: the override as configured and the grants in force.
    let ans = get(
        &gw,
        "/accounts/coreweave-model/endpoints/research-only",
        RES,
    )
    .await;
    let ep = ans.json();
    assert_eq!(ep["your_role"], "user");
    assert_eq!(ep["proxy_path"], "/proxy-api/coreweave-model/research-only");
    assert_eq!(
        ep["access"],
        json!({"managers": [], "users": ["team:research"], "viewers": []})
    );
    assert_eq!(
        ep["effective_access"],
        json!({"managers": ["team:platform"], "users": ["team:research"], "viewers": []})
    );
}

/// The snippet gives the base URL clients configure and ready-to-paste code with a key
/// placeholder, never a key.
#[tokio::test]
async fn the_snippet_names_the_proxy_base_url() {
    let gw = role_gateway().await;
    let base = format!("http://{}/proxy-api/coreweave-model/inference", gw.addr);
    for key in [MGR, RES, VIEW] {
        let ans = get(
            &gw,
            "/accounts/coreweave-model/endpoints/inference/snippet",
            key,
        )
        .await;
        assert_eq!(ans.status, 200, "{}", ans.body);
        let snippet = ans.json();
        assert_eq!(snippet["base_url"], base.as_str());
        for lang in ["curl", "python", "rust"] {
            let text = snippet[lang].as_str().unwrap();
            assert!(text.contains(&base), "{lang}: {text}");
            assert!(text.contains("$GATEWAY_KEY"), "{lang}: {text}");
            assert!(!text.contains(key), "{lang} holds the caller's key");
        }
        assert!(
            snippet["curl"]
                .as_str()
                .unwrap()
                .contains(&format!("{base}/chat/completions"))
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Redaction.

/// Header values are write-only: no management answer (success or error, to any role) holds a
/// configured or submitted secret, nor any 8-character piece of one, nor a gateway key; the
/// header *names* are listed.
#[tokio::test]
async fn no_management_answer_holds_a_header_value() {
    const PUT_SECRET: &str = "sk-CANARY-put-0c7d1e5b93";
    const PUT_SECRET_2: &str = "sk-CANARY-put2-b61f8a2d47";
    const NEWLINE_SECRET: &str = "sk-CANARY-nl-4a9e3c7f20";
    const TYPE_SECRET: &str = "sk-CANARY-type-e8b20d6f15";
    const FIELD_SECRET: &str = "sk-CANARY-field-93c5a1e07d";
    const NAME_SECRET: &str = "sk-CANARY-name-5d02f7b9c4";
    const USERINFO_SECRET: &str = "sk-CANARY-userinfo-1f6e8a0c";
    const TWICE_SECRET: &str = "sk-CANARY-twice-7a3b9d5e21";
    let secrets = [
        ACCOUNT_SECRET,
        ENDPOINT_SECRET,
        CUSTOM_SECRET,
        PUT_SECRET,
        PUT_SECRET_2,
        NEWLINE_SECRET,
        TYPE_SECRET,
        FIELD_SECRET,
        NAME_SECRET,
        USERINFO_SECRET,
        TWICE_SECRET,
        MGR,
        RES,
        VIEW,
        OUT,
    ];

    let gw = role_gateway().await;
    let ep = "/accounts/coreweave-model/endpoints/inference";
    let minted = "/accounts/coreweave-model/endpoints/minted";
    let put_headers = format!(
        r#"{{"base_url": "http://127.0.0.1:9/m", "headers": {{"Authorization": "Bearer {PUT_SECRET}", "X-Put-Secret": "{PUT_SECRET_2}"}}}}"#
    );
    let calls: Vec<(&str, Method, String, Option<String>, u16)> = vec![
        (MGR, Method::GET, "/accounts".into(), None, 200),
        (RES, Method::GET, "/accounts".into(), None, 200),
        (VIEW, Method::GET, "/accounts".into(), None, 200),
        (MGR, Method::GET, "/accounts/coreweave-model".into(), None, 200),
        (VIEW, Method::GET, "/accounts/coreweave-model".into(), None, 200),
        (MGR, Method::GET, ep.into(), None, 200),
        (RES, Method::GET, ep.into(), None, 200),
        (VIEW, Method::GET, ep.into(), None, 200),
        (OUT, Method::GET, ep.into(), None, 403),
        (MGR, Method::GET, format!("{ep}/snippet"), None, 200),
        (MGR, Method::PUT, minted.into(), Some(put_headers.clone()), 201),
        // A refused PUT carrying secrets does not echo them either.
        (RES, Method::PUT, minted.into(), Some(put_headers.clone()), 403),
        // Leaving out `headers` keeps them; the answer still shows names only.
        (
            MGR,
            Method::PUT,
            minted.into(),
            Some(r#"{"base_url": "http://127.0.0.1:9/m2"}"#.into()),
            200,
        ),
        (MGR, Method::GET, minted.into(), None, 200),
        (
            MGR,
            Method::PUT,
            "/accounts/coreweave-model/access".into(),
            Some(r#"{"managers": ["team:platform"], "users": ["team:research"], "viewers": ["user:vic@example.com"]}"#.into()),
            200,
        ),
        // Invalid input whose offending value is a secret.
        (
            MGR,
            Method::PUT,
            ep.into(),
            Some(format!(
                r#"{{"base_url": "http://127.0.0.1:9/v1", "headers": {{"X-Secret": "{NEWLINE_SECRET}\nInjected: 1"}}}}"#
            )),
            400,
        ),
        (
            MGR,
            Method::PUT,
            ep.into(),
            Some(format!(
                r#"{{"base_url": "http://127.0.0.1:9/v1", "headers": "Bearer {TYPE_SECRET}"}}"#
            )),
            400,
        ),
        (
            MGR,
            Method::PUT,
            ep.into(),
            Some(format!(
                r#"{{"base_url": "http://127.0.0.1:9/v1", "headers": {{"Authorization": ["Bearer {TYPE_SECRET}"]}}}}"#
            )),
            400,
        ),
        (
            MGR,
            Method::PUT,
            ep.into(),
            Some(format!(
                r#"{{"base_url": "http://127.0.0.1:9/v1", "api_key": "{FIELD_SECRET}"}}"#
            )),
            400,
        ),
        (
            MGR,
            Method::PUT,
            ep.into(),
            Some(format!(
                r#"{{"base_url": "http://127.0.0.1:9/v1", "headers": {{"Bearer {NAME_SECRET}": "x"}}}}"#
            )),
            400,
        ),
        (
            MGR,
            Method::PUT,
            ep.into(),
            Some(format!(
                r#"{{"base_url": "http://user:{USERINFO_SECRET}@127.0.0.1:9/v1"}}"#
            )),
            400,
        ),
        (
            MGR,
            Method::PUT,
            ep.into(),
            Some(format!(
                r#"{{"base_url": "http://127.0.0.1:9/v1", "headers": {{"Authorization": "Bearer {TWICE_SECRET}", "authorization": "Bearer {TWICE_SECRET}"}}}}"#
            )),
            400,
        ),
        (
            MGR,
            Method::PUT,
            "/accounts/coreweave-model/access".into(),
            Some(format!(r#"{{"users": ["{FIELD_SECRET}"]}}"#)),
            400,
        ),
        (MGR, Method::DELETE, minted.into(), None, 200),
        (MGR, Method::GET, "/accounts".into(), None, 200),
    ];
    let mut answers = Vec::new();
    for (key, method, path, body, status) in calls {
        let ans = manage(&gw, method.clone(), &path, Some(key), body.as_deref()).await;
        assert_eq!(ans.status.as_u16(), status, "{method} {path}: {}", ans.body);
        answers.push((format!("{method} {path}"), ans));
    }
    for (what, ans) in &answers {
        let text = format!("{:?}\n{}", ans.headers, ans.body);
        for secret in secrets {
            for piece in secret.as_bytes().windows(8) {
                let piece = std::str::from_utf8(piece).unwrap();
                assert!(
                    !text.contains(piece),
                    "{what}: the answer holds {piece:?} of a secret: {text}"
                );
            }
        }
        assert!(!text.contains("Injected"), "{what}: {text}");
    }

    // Names are listed: the account's header_auth, the endpoint's merged headers.
    let by_what = |what: &str, n: usize| -> Value {
        answers
            .iter()
            .filter(|(w, _)| w == what)
            .nth(n)
            .unwrap()
            .1
            .json()
    };
    let account = by_what("GET /accounts/coreweave-model", 0);
    assert_eq!(account["header_names"], json!(["authorization"]));
    let inference = by_what(&format!("GET {ep}"), 0);
    assert_eq!(
        inference["header_names"],
        json!(["authorization", "x-custom-secret"])
    );
    let created = by_what(&format!("PUT {minted}"), 0);
    assert_eq!(
        created["header_names"],
        json!(["authorization", "x-put-secret"])
    );
    let kept = by_what(&format!("PUT {minted}"), 2);
    assert_eq!(kept["base_url"], "http://127.0.0.1:9/m2");
    assert_eq!(
        kept["header_names"],
        json!(["authorization", "x-put-secret"]),
        "a PUT without headers keeps them"
    );
    let list = by_what("GET /accounts", 0);
    let research_only = list["accounts"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "research-only")
        .unwrap()
        .clone();
    assert_eq!(
        research_only["header_names"],
        json!(["authorization"]),
        "inherited from header_auth"
    );
}

// ---------------------------------------------------------------------------------------------
// Run-time registration.

const UP_KEY_RT: &str = "up-manage-CANARY-d1e2f3a4";

fn runtime_toml() -> String {
    staff_keys_toml("${MGR_KEY}", "${RES_KEY}")
        + &key_toml("sales-user", "sid@example.com", &["sales"], "${SALES_KEY}")
        + r#"
[[accounts]]
name = "coreweave-model"
access = { managers = ["team:platform"] }
"#
}

/// Issue 3's "done when": a manager registers an endpoint at run time and a user of the
/// granted team can call it at once, while a user of another team gets 403 that never reaches
/// the upstream. A grant change takes effect on the next request too.
#[tokio::test]
async fn a_manager_registers_an_endpoint_and_the_granted_team_can_call_it_at_once() {
    let mock = MockUpstream::new(UP_KEY_RT, std::time::Duration::ZERO);
    let addr = mock.spawn().await.unwrap();
    let gw = serve_app(gateway_from(
        &runtime_toml(),
        &[("MGR_KEY", MGR), ("RES_KEY", RES), ("SALES_KEY", SALES)],
    ))
    .await;
    let path = "/accounts/coreweave-model/endpoints/llama";
    let body = format!(
        r#"{{"base_url": "http://{addr}/v1", "headers": {{"Authorization": "Bearer {UP_KEY_RT}"}}, "access": {{"users": ["team:research"]}}}}"#
    );
    let call = |key: &'static str| chat(&gw, "coreweave-model", "llama", Some(key));

    assert_gateway_error(&call(RES).await, 404, "not_found", "before registration");

    // A user may not register endpoints.
    let ans = put(&gw, path, RES, &body).await;
    assert_gateway_error(&ans, 403, "permission_denied", "PUT by a user");
    let ans = get(&gw, path, MGR).await;
    assert_eq!(ans.status, 404, "a refused PUT created the endpoint");

    let ans = put(&gw, path, MGR, &body).await;
    assert_eq!(ans.status, 201, "{}", ans.body);
    let ep = ans.json();
    assert_eq!(ep["base_url"], format!("http://{addr}/v1"));
    assert_eq!(ep["header_names"], json!(["authorization"]));
    assert_eq!(ep["proxy_path"], "/proxy-api/coreweave-model/llama");
    assert_eq!(
        ep["effective_access"],
        json!({"managers": ["team:platform"], "users": ["team:research"], "viewers": []})
    );
    assert_eq!(ep["your_role"], "manager");

    let ans = call(RES).await;
    assert_eq!(
        ans.status, 200,
        "research right after the PUT: {}",
        ans.body
    );
    assert!(
        ans.json()["choices"][0]["message"]["content"]
            .as_str()
            .unwrap()
            .contains("You said: Say hello"),
        "{}",
        ans.body
    );
    assert_eq!(mock.requests(), 1);

    let ans = call(SALES).await;
    assert_gateway_error(&ans, 403, "permission_denied", "sales");
    let message = ans.error_message();
    assert!(message.contains("sales-user"), "{message}");
    assert!(message.contains("llama"), "{message}");
    assert_eq!(mock.requests(), 1, "a denied request reached the upstream");

    let ans = call(MGR).await;
    assert_eq!(ans.status, 200, "managers may use: {}", ans.body);
    assert_eq!(mock.requests(), 2);

    // Hand the endpoint to sales, keeping the headers (a manager never re-sends secrets).
    let ans = put(
        &gw,
        path,
        MGR,
        &format!(r#"{{"base_url": "http://{addr}/v1", "access": {{"users": ["team:sales"]}}}}"#),
    )
    .await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    assert_eq!(call(SALES).await.status, 200);
    assert_gateway_error(&call(RES).await, 403, "permission_denied", "research after");
    assert_eq!(mock.requests(), 3);

    // Delete: the next request is a 404 and does not reach the upstream.
    let ans = manage(&gw, Method::DELETE, path, Some(MGR), None).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    assert_eq!(
        ans.json(),
        json!({"deleted": {"account": "coreweave-model", "endpoint": "llama"}})
    );
    assert_gateway_error(&call(SALES).await, 404, "not_found", "after delete");
    assert_eq!(mock.requests(), 3);
}

// ---------------------------------------------------------------------------------------------
// Changes while a stream is in flight.

fn stream_toml(base_url: &str) -> String {
    format!(
        r#"{}
[[accounts]]
name = "coreweave-model"
access = {{ managers = ["team:platform"], users = ["team:research"] }}

[[accounts.endpoints]]
name = "inference"
base_url = "{base_url}"
headers = {{ Authorization = "Bearer up-key" }}
"#,
        staff_keys_toml(MGR, RES)
    )
}

/// Sends events 1..5 and `[DONE]` on `events`, ends the body, and asserts the client reads
/// exactly that to a clean end.
async fn finish_stream(
    events: tokio::sync::mpsc::Sender<Result<bytes::Bytes, std::io::Error>>,
    body: &mut hyper::body::Incoming,
) {
    let mut want = String::new();
    for i in 1..5 {
        want.push_str(&sse_event(i));
        events.send(Ok(sse_event(i).into())).await.unwrap();
    }
    want.push_str(SSE_DONE);
    events.send(Ok(SSE_DONE.into())).await.unwrap();
    drop(events);
    let rest = read_to_end(body)
        .await
        .expect("the stream in flight ended cleanly");
    assert_eq!(String::from_utf8(rest).unwrap(), want);
}

/// PUT the endpoint to another upstream, then DELETE it, each while a stream runs through it:
/// the stream finishes on the configuration it started with, the next request sees the change.
#[tokio::test]
async fn a_change_mid_stream_leaves_the_stream_intact_and_the_next_request_sees_it() {
    let (a, mut a_streams) = sse_upstream().await;
    let (b, _b_streams) = sse_upstream().await;
    let gw = serve_app(gateway_from(&stream_toml(&a.base_url()), &[])).await;
    let ep = "/accounts/coreweave-model/endpoints/inference";

    // 1. Move the endpoint to B while a stream runs on A.
    let mut body = open_stream(
        gw.url("/proxy-api/coreweave-model/inference/chat/completions"),
        RES,
    )
    .await;
    let (path, events) = within("A's stream", a_streams.recv()).await.unwrap();
    assert_eq!(path, "/v1/chat/completions");
    events.send(Ok(sse_event(0).into())).await.unwrap();
    assert_eq!(
        next_data(&mut body).await.unwrap().unwrap(),
        sse_event(0).as_bytes()
    );
    let to_b = format!(
        r#"{{"base_url": "{}", "headers": {{"Authorization": "Bearer up-key-b"}}}}"#,
        b.base_url()
    );
    let ans = put(&gw, ep, MGR, &to_b).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    finish_stream(events, &mut body).await;
    assert_eq!((a.count(), b.count()), (1, 0));

    let ans = proxy(
        &gw,
        Method::GET,
        "coreweave-model",
        "inference",
        "/models",
        Some(RES),
        None,
    )
    .await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    assert_eq!((a.count(), b.count()), (1, 1), "the next request goes to B");
    assert_eq!(
        b.last().headers["authorization"],
        "Bearer up-key-b",
        "the new headers are in force"
    );

    // 2. Back to A; delete the endpoint while a stream runs on it.
    let to_a = format!(
        r#"{{"base_url": "{}", "headers": {{"Authorization": "Bearer up-key"}}}}"#,
        a.base_url()
    );
    let ans = put(&gw, ep, MGR, &to_a).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    let mut body = open_stream(
        gw.url("/proxy-api/coreweave-model/inference/chat/completions"),
        RES,
    )
    .await;
    let (_, events) = within("A's second stream", a_streams.recv()).await.unwrap();
    events.send(Ok(sse_event(0).into())).await.unwrap();
    next_data(&mut body).await.unwrap().unwrap();
    let ans = manage(&gw, Method::DELETE, ep, Some(MGR), None).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    finish_stream(events, &mut body).await;

    let ans = chat(&gw, "coreweave-model", "inference", Some(RES)).await;
    assert_gateway_error(&ans, 404, "not_found", "after the delete");
    assert_eq!((a.count(), b.count()), (2, 1));
}

// ---------------------------------------------------------------------------------------------
// Invalid updates.

/// Each invalid update is a 400 that names the field (and never repeats a header value), and
/// changes nothing: the whole listing and the endpoint are as before, and traffic still flows.
#[tokio::test]
async fn invalid_updates_are_rejected_with_the_field_named_and_change_nothing() {
    let upstream = RecordingUpstream::start(|_| async { full(200, &[], "{}") }).await;
    let gw = serve_app(gateway_from(&stream_toml(&upstream.base_url()), &[])).await;
    let ep = "/accounts/coreweave-model/endpoints/inference";
    let access = "/accounts/coreweave-model/access";
    let fresh = "/accounts/coreweave-model/endpoints/fresh";
    let good = format!(r#""base_url": "{}""#, upstream.base_url());
    // (path, body, a piece the message must hold, pieces it must not hold)
    let cases: Vec<(&str, String, &str, Vec<&str>)> = vec![
        (
            ep,
            format!(r#"{{"base_url": "{}/"}}"#, upstream.base_url()),
            "base_url",
            vec![],
        ),
        (
            ep,
            r#"{"base_url": "ftp://127.0.0.1/v1"}"#.into(),
            "base_url",
            vec![],
        ),
        (
            ep,
            r#"{"base_url": "http://me:sk-pw-CANARY-0f3e@127.0.0.1/v1"}"#.into(),
            "base_url",
            vec!["sk-pw-CANARY"],
        ),
        (ep, r#"{"base_url": 5}"#.into(), "base_url", vec![]),
        (ep, "{}".into(), "base_url", vec![]),
        (
            ep,
            format!(r#"{{{good}, "access": {{"users": ["research"]}}}}"#),
            "access.users[0]",
            vec![],
        ),
        (
            ep,
            format!(r#"{{{good}, "access": {{"managers": ["team:ok", "team:not ok"]}}}}"#),
            "access.managers[1]",
            vec![],
        ),
        (
            ep,
            format!(r#"{{{good}, "access": {{"owners": ["team:x"]}}}}"#),
            "owners",
            vec![],
        ),
        (
            ep,
            format!(r#"{{{good}, "colour": "red"}}"#),
            "colour",
            vec![],
        ),
        (
            ep,
            format!(r#"{{{good}, "headers": {{"bad header": "x"}}}}"#),
            "headers",
            vec![],
        ),
        (
            ep,
            format!(r#"{{{good}, "headers": {{"X-Secret": "sk-nl-CANARY-77\nInjected: 1"}}}}"#),
            "headers.X-Secret",
            vec!["sk-nl-CANARY", "Injected"],
        ),
        (
            ep,
            format!(r#"{{{good}, "headers": {{"Host": "evil.example"}}}}"#),
            "headers.host",
            vec!["evil.example"],
        ),
        (
            ep,
            format!(r#"{{{good}, "headers": {{"Connection": "close"}}}}"#),
            "headers.connection",
            vec![],
        ),
        (
            ep,
            format!(r#"{{{good}, "timeouts": {{"connect_ms": 0}}}}"#),
            "timeouts.connect_ms",
            vec![],
        ),
        (ep, "not json".into(), "JSON", vec![]),
        // A new endpoint with a bad name or URL is not created.
        (
            "/accounts/coreweave-model/endpoints/has%20space",
            format!("{{{good}}}"),
            "name",
            vec![],
        ),
        (
            fresh,
            format!(r#"{{"base_url": "{}/"}}"#, upstream.base_url()),
            "base_url",
            vec![],
        ),
        (
            access,
            r#"{"managers": ["root"]}"#.into(),
            "access.managers[0]",
            vec![],
        ),
        (
            access,
            r#"{"users": ["everyone"], "editors": []}"#.into(),
            "editors",
            vec![],
        ),
    ];

    let list_before = get(&gw, "/accounts", MGR).await.json();
    let ep_before = get(&gw, ep, MGR).await.json();
    for (path, body, field, forbidden) in cases {
        let context = format!("PUT {path} {body:?}");
        let ans = put(&gw, path, MGR, &body).await;
        assert_gateway_error(&ans, 400, "invalid_request", &context);
        let message = ans.error_message();
        assert!(
            message.to_lowercase().contains(&field.to_lowercase()),
            "{context}: the message does not name {field:?}: {message}"
        );
        for piece in forbidden {
            assert!(!ans.body.contains(piece), "{context}: {}", ans.body);
        }
        let list = get(&gw, "/accounts", MGR).await.json();
        assert_eq!(list, list_before, "{context} changed the configuration");
    }
    let ep_after = get(&gw, ep, MGR).await.json();
    assert_eq!(ep_after, ep_before);
    let ans = get(&gw, fresh, MGR).await;
    assert_eq!(ans.status, 404);

    // A body over 64 KiB is refused whole.
    let huge = format!(r#"{{{good}, "colour": "{}"}}"#, "x".repeat(70 * 1024));
    let ans = put(&gw, ep, MGR, &huge).await;
    assert_eq!(ans.status, 413, "{}", ans.body);

    // Traffic still flows to the unchanged endpoint, with its headers.
    let ans = chat(&gw, "coreweave-model", "inference", Some(RES)).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    assert_eq!(upstream.count(), 1);
    assert_eq!(upstream.last().uri.path(), "/v1/chat/completions");
    assert_eq!(upstream.last().headers["authorization"], "Bearer up-key");
}

fn handover_toml() -> String {
    key_toml(
        "platform-manager",
        "pat@example.com",
        &["platform"],
        "gw-pat",
    ) + &key_toml(
        "research-lead",
        "rita@example.com",
        &["research"],
        "gw-rita",
    ) + HANDOVER_ACCOUNTS_TOML
}

const HANDOVER_ACCOUNTS_TOML: &str = r#"
[[accounts]]
name = "shared"
access = { managers = ["team:platform"] }

[[accounts.endpoints]]
name = "research"
base_url = "http://127.0.0.1:9/v1"
access = { managers = ["team:research"] }

[[accounts]]
name = "handover"
access = { managers = ["team:platform"] }

[[accounts.endpoints]]
name = "ep"
base_url = "http://127.0.0.1:9/v1"
"#;

/// A change that succeeds is never answered with a 403, even when it removes the caller's own
/// view of what changed: a 403 says "nothing happened". Here an endpoint manager (through the
/// endpoint's override) replaces the endpoint's grants with none.
#[tokio::test]
async fn an_endpoint_manager_dropping_their_own_grant_gets_a_success() {
    let gw = serve_app(gateway_from(&handover_toml(), &[])).await;
    let ans = put(
        &gw,
        "/accounts/shared/endpoints/research",
        "gw-rita",
        r#"{"base_url": "http://127.0.0.1:9/v2", "access": {"users": []}}"#,
    )
    .await;
    let after = get(&gw, "/accounts/shared/endpoints/research", "gw-pat")
        .await
        .json();
    assert_eq!(
        after["base_url"], "http://127.0.0.1:9/v2",
        "the change was applied"
    );
    assert!(
        ans.status.is_success(),
        "the PUT was applied but answered {}: {}",
        ans.status,
        ans.body
    );
    let answered = ans.json();
    assert_eq!(
        answered["base_url"], "http://127.0.0.1:9/v2",
        "the new state"
    );
    assert_eq!(answered["your_role"], Value::Null);
    assert_eq!(
        answered["effective_access"],
        json!({"managers": ["team:platform"], "users": [], "viewers": []})
    );
    // The caller has indeed lost the endpoint.
    let ans = get(&gw, "/accounts/shared/endpoints/research", "gw-rita").await;
    assert_eq!(ans.status, 403, "{}", ans.body);
}

/// Like the above for the account's grants: a platform manager hands an account over to
/// another team; the change is applied and must be answered as a success.
#[tokio::test]
async fn a_manager_handing_an_account_over_gets_a_success() {
    let gw = serve_app(gateway_from(&handover_toml(), &[])).await;
    let ans = put(
        &gw,
        "/accounts/handover/access",
        "gw-pat",
        r#"{"managers": ["team:research"]}"#,
    )
    .await;
    let after = get(&gw, "/accounts/handover", "gw-rita").await.json();
    assert_eq!(after["access"]["managers"], json!(["team:research"]));
    assert!(
        ans.status.is_success(),
        "the access PUT was applied but answered {}: {}",
        ans.status,
        ans.body
    );
    let answered = ans.json();
    assert_eq!(answered["access"]["managers"], json!(["team:research"]));
    assert_eq!(answered["your_role"], Value::Null);
    assert_eq!(
        answered["endpoints"],
        json!([]),
        "no endpoint is viewable now"
    );
    let ans = get(&gw, "/accounts/handover", "gw-pat").await;
    assert_eq!(ans.status, 403, "{}", ans.body);
}

// ---------------------------------------------------------------------------------------------
// The decision matrix: keys × teams × roles × accounts × endpoints, through the proxy.

const MATRIX_KEYS: [(&str, &str); 6] = [
    ("pat", "gw-pat-CANARY-0001"),
    ("rita", "gw-rita-CANARY-0002"),
    ("sam", "gw-sam-CANARY-0003"),
    ("dana", "gw-dana-CANARY-0004"),
    ("mo", "gw-mo-CANARY-0005"),
    ("nobody", "gw-nobody-CANARY-0006"),
];

fn matrix_toml(upstream: &str) -> String {
    let keys = [
        key_toml(
            "pat",
            "pat@example.com",
            &["platform"],
            "gw-pat-CANARY-0001",
        ),
        key_toml(
            "rita",
            "rita@example.com",
            &["research"],
            "gw-rita-CANARY-0002",
        ),
        key_toml("sam", "sam@example.com", &["sales"], "gw-sam-CANARY-0003"),
        key_toml("dana", "dana@example.com", &[], "gw-dana-CANARY-0004"),
        key_toml(
            "mo",
            "mo@example.com",
            &["sales", "research"],
            "gw-mo-CANARY-0005",
        ),
        key_toml(
            "nobody",
            "nobody@example.com",
            &["marketing"],
            "gw-nobody-CANARY-0006",
        ),
    ]
    .concat();
    format!(
        r#"{keys}
[[accounts]]
name = "alpha"
header_auth = {{ X-Caller = "{{key_id}}" }}
access = {{ managers = ["team:platform"], users = ["team:research"], viewers = ["team:sales"] }}

[[accounts.endpoints]]
name = "open"
base_url = "http://{upstream}/alpha-open"

[[accounts.endpoints]]
name = "restricted"
base_url = "http://{upstream}/alpha-restricted"
access = {{ users = ["user:sam@example.com"], viewers = ["everyone"] }}

[[accounts]]
name = "beta"
header_auth = {{ X-Caller = "{{key_id}}" }}
access = {{ managers = ["user:dana@example.com"], users = ["everyone"] }}

[[accounts.endpoints]]
name = "shared"
base_url = "http://{upstream}/beta-shared"

[[accounts.endpoints]]
name = "locked"
base_url = "http://{upstream}/beta-locked"
access = {{ managers = ["team:research"] }}
"#
    )
}

/// The endpoints of the matrix, with the PUT body that re-saves each one unchanged.
fn matrix_endpoints(upstream: &str) -> [(&'static str, &'static str, String); 4] {
    [
        (
            "alpha",
            "open",
            format!(r#"{{"base_url": "http://{upstream}/alpha-open"}}"#),
        ),
        (
            "alpha",
            "restricted",
            format!(
                r#"{{"base_url": "http://{upstream}/alpha-restricted", "access": {{"users": ["user:sam@example.com"], "viewers": ["everyone"]}}}}"#
            ),
        ),
        (
            "beta",
            "shared",
            format!(r#"{{"base_url": "http://{upstream}/beta-shared"}}"#),
        ),
        (
            "beta",
            "locked",
            format!(
                r#"{{"base_url": "http://{upstream}/beta-locked", "access": {{"managers": ["team:research"]}}}}"#
            ),
        ),
    ]
}

/// Each key's role on each endpoint, worked out by hand from `matrix_toml`
/// ('-' none, 'V' viewer, 'U' user, 'M' manager), in `matrix_endpoints` order:
///
/// - alpha grants managers platform, users research, viewers sales; `open` inherits them;
///   `restricted` replaces users with sam and viewers with everyone (platform stays manager);
/// - beta grants manager dana, users everyone; `shared` inherits them; `locked` adds research
///   as managers and replaces users and viewers with nobody (dana stays manager).
const MATRIX: [(&str, [char; 4]); 6] = [
    //         alpha/open alpha/restricted beta/shared beta/locked
    ("pat", ['M', 'M', 'U', '-']),
    ("rita", ['U', 'V', 'U', 'M']),
    ("sam", ['V', 'U', 'U', '-']),
    ("dana", ['-', 'V', 'M', 'M']),
    ("mo", ['U', 'V', 'U', 'M']),
    ("nobody", ['-', 'V', 'U', '-']),
];

fn role_name(role: char) -> Value {
    match role {
        'M' => json!("manager"),
        'U' => json!("user"),
        'V' => json!("viewer"),
        '-' => Value::Null,
        other => panic!("bad role {other:?}"),
    }
}

/// Every (key, account, endpoint) through the proxy (Use), the endpoint's GET (View) and an
/// unchanged re-save (Manage), against a table written by hand; every denied proxy call is a
/// 403 that never reaches the upstream, and the upstream saw exactly the allowed calls, each
/// once, with the caller's `{key_id}` injected.
#[tokio::test]
async fn matrix_of_keys_teams_roles_accounts_and_endpoints() {
    let upstream = RecordingUpstream::start(|_| async { full(200, &[], "{}") }).await;
    let up = upstream.addr.to_string();
    let gw = serve_app(gateway_from(&matrix_toml(&up), &[])).await;
    let endpoints = matrix_endpoints(&up);

    let mut expected_seen = Vec::new();
    for ((id, key), (row_id, roles)) in MATRIX_KEYS.iter().zip(MATRIX) {
        assert_eq!(*id, row_id);
        let mut viewable = BTreeSet::new();
        for ((account, endpoint, put_body), role) in endpoints.iter().zip(roles) {
            let context = format!("{id} on {account}/{endpoint} (role {role})");
            let may_view = role != '-';
            let may_use = matches!(role, 'U' | 'M');
            let may_manage = role == 'M';

            let before = upstream.count();
            let ans = chat(&gw, account, endpoint, Some(key)).await;
            if may_use {
                assert_eq!(ans.status, 200, "use: {context}: {}", ans.body);
                assert_eq!(upstream.count(), before + 1, "use: {context}");
                expected_seen.push((format!("/{account}-{endpoint}/chat/completions"), *id));
            } else {
                assert_gateway_error(&ans, 403, "permission_denied", &format!("use: {context}"));
                assert!(ans.error_message().contains(id), "{context}");
                assert_eq!(
                    upstream.count(),
                    before,
                    "use: {context}: a denied request reached the upstream"
                );
            }

            let path = format!("/accounts/{account}/endpoints/{endpoint}");
            let ans = get(&gw, &path, key).await;
            if may_view {
                assert_eq!(ans.status, 200, "view: {context}: {}", ans.body);
                assert_eq!(ans.json()["your_role"], role_name(role), "view: {context}");
                viewable.insert(((*account).to_owned(), (*endpoint).to_owned()));
            } else {
                assert_gateway_error(&ans, 403, "permission_denied", &format!("view: {context}"));
            }

            let ans = put(&gw, &path, key, put_body).await;
            if may_manage {
                assert_eq!(ans.status, 200, "manage: {context}: {}", ans.body);
            } else {
                assert_gateway_error(
                    &ans,
                    403,
                    "permission_denied",
                    &format!("manage: {context}"),
                );
            }
        }
        let list = get(&gw, "/accounts", key).await;
        assert_eq!(listed(&list.json()), viewable, "list of {id}");
    }

    // Without a key nothing gets through.
    for (account, endpoint, _) in &endpoints {
        let ans = chat(&gw, account, endpoint, None).await;
        assert_gateway_error(&ans, 401, "invalid_api_key", "no key");
    }

    let allowed = MATRIX
        .iter()
        .flat_map(|(_, roles)| roles)
        .filter(|r| matches!(r, 'U' | 'M'))
        .count();
    assert_eq!(allowed, 14, "the table itself");
    assert_eq!(upstream.count(), allowed);
    let mut seen: Vec<(String, String)> = upstream
        .seen
        .lock()
        .unwrap()
        .iter()
        .map(|s| {
            let caller: Vec<_> = s.headers.get_all("x-caller").iter().collect();
            assert_eq!(caller.len(), 1);
            (
                s.uri.path().to_owned(),
                caller[0].to_str().unwrap().to_owned(),
            )
        })
        .collect();
    let mut expected: Vec<(String, String)> = expected_seen
        .into_iter()
        .map(|(p, id)| (p, id.to_owned()))
        .collect();
    seen.sort();
    expected.sort();
    assert_eq!(seen, expected);
}

// ---------------------------------------------------------------------------------------------
// Header templates.

fn templates_toml(upstream: &str) -> String {
    let keys = [
        key_toml("pat", "pat@example.com", &["platform"], "gw-t-pat"),
        key_toml("rita", "rita@example.com", &["research"], "gw-t-rita"),
        key_toml("sam", "sam@example.com", &["sales"], "gw-t-sam"),
        key_toml("mo", "mo@example.com", &["sales", "research"], "gw-t-mo"),
        key_toml("dana", "dana@example.com", &[], "gw-t-dana"),
    ]
    .concat();
    format!(
        r#"{keys}
[[accounts]]
name = "coreweave-model"
access = {{ managers = ["team:platform"], users = ["everyone"] }}

[[accounts.endpoints]]
name = "inference"
base_url = "http://{upstream}/v1"
headers = {{ Authorization = "Bearer up-key", OpenAI-Project = "{{team}}/inference", X-Caller = "{{subject}} via {{key_id}}" }}

[[accounts.endpoints]]
name = "plain"
base_url = "http://{upstream}/plain"
headers = {{ Authorization = "Bearer up-key" }}
"#
    )
}

/// `{team}`, `{subject}` and `{key_id}` are filled per caller through the real stack (and
/// replace what the client sent); a caller with no team gets a 403 naming `{team}` that never
/// reaches the upstream; a template set at run time works the same, and `${VAR}` in a value
/// set through the API is kept literally.
#[tokio::test]
async fn header_templates_are_filled_per_caller() {
    let upstream = RecordingUpstream::start(|_| async { full(200, &[], "{}") }).await;
    let gw = serve_app(gateway_from(
        &templates_toml(&upstream.addr.to_string()),
        &[],
    ))
    .await;
    let call = |endpoint: &'static str, key: &'static str| {
        let req = http::Request::post(gw.url(&format!(
            "/proxy-api/coreweave-model/{endpoint}/chat/completions"
        )))
        .header("authorization", format!("Bearer {key}"))
        .header("openai-project", "client/spoofed")
        .header("x-caller", "client-spoofed")
        .body(http_body_util::Full::from(CHAT))
        .unwrap();
        async move {
            let res = within("a response", client().request(req)).await.unwrap();
            let status = res.status();
            let headers = res.headers().clone();
            Answer {
                status,
                headers,
                body: body_string(res).await,
            }
        }
    };
    let values = |seen: &Seen, name: &str| -> Vec<String> {
        seen.headers
            .get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_owned())
            .collect()
    };

    for (key, project, caller) in [
        (
            "gw-t-rita",
            "research/inference",
            "rita@example.com via rita",
        ),
        ("gw-t-sam", "sales/inference", "sam@example.com via sam"),
        ("gw-t-mo", "sales/inference", "mo@example.com via mo"),
        ("gw-t-pat", "platform/inference", "pat@example.com via pat"),
    ] {
        let ans = call("inference", key).await;
        assert_eq!(ans.status, 200, "{key}: {}", ans.body);
        let seen = upstream.last();
        assert_eq!(values(&seen, "openai-project"), [project], "{key}");
        assert_eq!(values(&seen, "x-caller"), [caller], "{key}");
        assert_eq!(values(&seen, "authorization"), ["Bearer up-key"], "{key}");
    }
    assert_eq!(upstream.count(), 4);

    // No team: a clear 403, nothing upstream.
    let ans = call("inference", "gw-t-dana").await;
    assert_gateway_error(&ans, 403, "permission_denied", "a key with no team");
    let message = ans.error_message();
    assert!(message.contains("{team}"), "{message}");
    assert!(
        message.to_lowercase().contains("openai-project"),
        "{message}"
    );
    assert_eq!(
        upstream.count(),
        4,
        "the template refusal reached the upstream"
    );
    // The same key may call an endpoint without templates.
    assert_eq!(call("plain", "gw-t-dana").await.status, 200);
    assert_eq!(upstream.count(), 5);

    // A template set at run time; `${HOME}` is not expanded by the management API.
    let runtime = format!(
        r#"{{"base_url": "http://{}/plain", "headers": {{"Authorization": "Bearer up-key", "OpenAI-Project": "{{team}}/runtime", "X-Literal": "${{HOME}} {{unknown}}"}}}}"#,
        upstream.addr
    );
    let path = "/accounts/coreweave-model/endpoints/plain";
    let ans = put(&gw, path, "gw-t-pat", &runtime).await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    assert_eq!(
        ans.json()["header_names"],
        json!(["authorization", "openai-project", "x-literal"])
    );
    let ans = call("plain", "gw-t-rita").await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    let seen = upstream.last();
    assert_eq!(values(&seen, "openai-project"), ["research/runtime"]);
    assert_eq!(values(&seen, "x-literal"), ["${HOME} {unknown}"]);
    assert_eq!(seen.uri.path(), "/plain/chat/completions");
    let ans = call("plain", "gw-t-dana").await;
    assert_gateway_error(&ans, 403, "permission_denied", "no team, run-time template");
    assert!(ans.error_message().contains("{team}"));
    assert_eq!(upstream.count(), 6);
}

/// Credentials never follow an endpoint to a host its manager picked: an endpoint-level
/// manager may not move it to another host at all, and an account manager must send the
/// headers again to do so.
#[tokio::test]
async fn moving_an_endpoint_to_another_host_does_not_carry_its_credentials() {
    let gw = serve_app(gateway_from(&handover_toml(), &[])).await;
    let path = "/accounts/shared/endpoints/research";
    let evil = r#"{"base_url": "http://127.0.0.2:9/v1"}"#;
    // The endpoint's own manager (research) may change the path, not the host.
    let ans = put(&gw, path, "gw-rita", evil).await;
    assert_gateway_error(
        &ans,
        403,
        "permission_denied",
        "endpoint manager moving the host",
    );
    let ans = put(
        &gw,
        path,
        "gw-rita",
        r#"{"base_url": "http://127.0.0.2:9/v1", "headers": {"Authorization": "Bearer mine"}}"#,
    )
    .await;
    assert_gateway_error(&ans, 403, "permission_denied", "even with new headers");
    // The account's manager must send headers with a new host.
    let ans = put(&gw, path, "gw-pat", evil).await;
    assert_gateway_error(
        &ans,
        400,
        "invalid_request",
        "account manager without headers",
    );
    assert!(ans.body.contains("headers"), "{}", ans.body);
    let after = get(&gw, path, "gw-pat").await.json();
    assert_eq!(
        after["base_url"], "http://127.0.0.1:9/v1",
        "nothing changed"
    );
    let ans = put(
        &gw,
        path,
        "gw-pat",
        r#"{"base_url": "http://127.0.0.2:9/v1", "headers": {"Authorization": "Bearer new"}}"#,
    )
    .await;
    assert_eq!(ans.status, 200, "{}", ans.body);
    assert_eq!(ans.json()["base_url"], "http://127.0.0.2:9/v1");
}

#[tokio::test]
async fn admins_create_accounts_and_managers_change_their_header_auth() {
    const ADMIN: &str = "gw-admin-CANARY-0e1f2a3b";
    let toml = format!(
        "admins = [\"team:platform\"]\n{}\n[[accounts]]\nname = \"existing\"\naccess = {{ managers = [\"team:research\"] }}\n",
        [
            key_toml("admin", "ada@example.com", &["platform"], ADMIN),
            key_toml("research", "rita@example.com", &["research"], RES),
        ]
        .concat()
    );
    let gw = serve_app(gateway_from(&toml, &[])).await;
    let body = format!(
        r#"{{"header_auth": {{"Authorization": "Bearer {ACCOUNT_SECRET}"}}, "access": {{"managers": ["team:platform"], "users": ["team:research"]}}}}"#
    );
    // Only an admin creates one.
    let res = put(&gw, "/accounts/coreweave-model", RES, &body).await;
    assert_gateway_error(
        &res,
        403,
        "permission_denied",
        "a non-admin creating an account",
    );
    let res = put(&gw, "/accounts/coreweave-model", ADMIN, &body).await;
    assert_eq!(res.status, 201, "{}", res.body);
    assert!(!res.body.contains(ACCOUNT_SECRET), "{}", res.body);
    let view = res.json();
    assert_eq!(view["header_names"], serde_json::json!(["authorization"]));
    assert_eq!(
        view["access"]["users"],
        serde_json::json!(["team:research"])
    );
    assert_eq!(res.headers["etag"], "\"1\"");
    // Its manager replaces the header auth; leaving out access keeps it.
    let res = put(
        &gw,
        "/accounts/existing",
        RES,
        r#"{"header_auth": {"X-Org": "acme"}}"#,
    )
    .await;
    assert_eq!(res.status, 200, "{}", res.body);
    assert_eq!(res.json()["header_names"], serde_json::json!(["x-org"]));
    assert_eq!(
        res.json()["access"]["managers"],
        serde_json::json!(["team:research"])
    );
    // A stale version, a bad name and a bad header are refused, naming the field.
    let res = manage(
        &gw,
        Method::PUT,
        "/accounts/existing",
        Some(RES),
        Some("{}"),
    )
    .await;
    assert_eq!(res.status, 200);
    let stale = send_json_with(&gw, "/manage/accounts/existing", RES, "{}", "\"999\"").await;
    assert_eq!(stale.0, 409, "{}", stale.1);
    let res = put(&gw, "/accounts/..", ADMIN, "{}").await;
    assert_eq!(res.status, 400);
    assert!(
        res.error_message().starts_with("name:"),
        "{}",
        res.error_message()
    );
    let res = put(
        &gw,
        "/accounts/new-one",
        ADMIN,
        r#"{"header_auth": {"bad name": "x"}}"#,
    )
    .await;
    assert_eq!(res.status, 400);
    assert!(
        res.error_message().starts_with("header_auth"),
        "{}",
        res.error_message()
    );
    // A new account with its first endpoint: both or neither.
    let bad = r#"{"endpoint": {"name": "inference", "base_url": "https://x.example/v1/"}}"#;
    let res = put(&gw, "/accounts/second", ADMIN, bad).await;
    assert_eq!(res.status, 400, "{}", res.body);
    assert!(
        res.error_message().starts_with("base_url:"),
        "{}",
        res.error_message()
    );
    assert_eq!(get(&gw, "/accounts/second", ADMIN).await.status, 404);
    let good = format!(
        r#"{{"access": {{"managers": ["team:platform"]}}, "endpoint": {{"name": "inference", "base_url": "https://x.example/v1", "headers": {{"Authorization": "Bearer {ENDPOINT_SECRET}"}}}}}}"#
    );
    let res = put(&gw, "/accounts/second", ADMIN, &good).await;
    assert_eq!(res.status, 201, "{}", res.body);
    assert_eq!(res.json()["endpoints"][0]["name"], "inference");
    assert!(!res.body.contains(ENDPOINT_SECRET));
    let res = put(&gw, "/accounts/second", ADMIN, &good).await;
    assert_eq!(
        res.status, 400,
        "an endpoint with an existing account: {}",
        res.body
    );
    // Create-only writes never replace: 412, naming the field.
    let (status, body) = send_with(
        &gw,
        "/manage/accounts/second",
        ADMIN,
        "{}",
        "if-none-match",
        "*",
    )
    .await;
    assert_eq!(status, 412, "{body}");
    assert!(
        body.contains("\"name: an account with this name exists already"),
        "{body}"
    );
    let (status, body) = send_with(
        &gw,
        "/manage/accounts/second/endpoints/inference",
        ADMIN,
        r#"{"base_url": "https://y.example/v1"}"#,
        "if-none-match",
        "*",
    )
    .await;
    assert_eq!(status, 412, "{body}");
    // Without grants, the admin who creates an account manages it.
    let res = put(&gw, "/accounts/third", ADMIN, "{}").await;
    assert_eq!(res.status, 201, "{}", res.body);
    assert_eq!(
        res.json()["access"]["managers"],
        serde_json::json!(["user:ada@example.com"])
    );
    assert_eq!(res.json()["your_role"], "manager");
    // Audited with header names, never values.
    let audit = get(&gw, "/audit", ADMIN).await;
    assert!(audit.body.contains("account.put"), "{}", audit.body);
    assert!(!audit.body.contains(ACCOUNT_SECRET));
    assert!(!audit.body.contains(ENDPOINT_SECRET));
}

/// `PUT path` with `If-Match: tag`; the status and body.
async fn send_json_with(
    gw: &TestGateway,
    path: &str,
    key: &str,
    body: &str,
    tag: &str,
) -> (u16, String) {
    send_with(gw, path, key, body, "if-match", tag).await
}

/// `PUT path` with the header `name: value`; the status and body.
async fn send_with(
    gw: &TestGateway,
    path: &str,
    key: &str,
    body: &str,
    name: &str,
    value: &str,
) -> (u16, String) {
    let req = http::Request::put(gw.url(path))
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .header(name, value)
        .body(http_body_util::Full::new(bytes::Bytes::from(
            body.to_owned(),
        )))
        .unwrap();
    let res = client().request(req).await.unwrap();
    let status = res.status().as_u16();
    (status, body_string(res).await)
}

#[tokio::test]
async fn usage_counts_show_only_the_endpoints_the_caller_may_view() {
    let upstream = MockUpstream::new(UP_KEY, std::time::Duration::ZERO)
        .spawn()
        .await
        .unwrap();
    let toml = format!(
        "{}\n[[accounts]]\nname = \"shared\"\nheader_auth = {{ Authorization = \"Bearer {UP_KEY}\" }}\n\
         access = {{ managers = [\"team:platform\"], users = [\"team:research\"] }}\n\n\
         [[accounts.endpoints]]\nname = \"open\"\nbase_url = \"http://{upstream}/v1\"\n\n\
         [[accounts.endpoints]]\nname = \"closed\"\nbase_url = \"http://{upstream}/v1\"\n\
         access = {{ users = [] }}\n",
        staff_keys_toml(MGR, RES)
    );
    let gw = serve_app(gateway_from(&toml, &[])).await;
    for (endpoint, times) in [("open", 2), ("closed", 3)] {
        for _ in 0..times {
            let ans = chat(&gw, "shared", endpoint, Some(MGR)).await;
            assert_eq!(ans.status, 200, "{}", ans.body);
        }
    }
    let count = |body: &Value, endpoint: &str| {
        body["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["endpoint"] == endpoint)
            .map(|e| e["hour"]["requests"].as_u64().unwrap())
    };
    let mgr = get(&gw, "/usage", MGR).await;
    assert_eq!(mgr.status, 200, "{}", mgr.body);
    assert_eq!(count(&mgr.json(), "open"), Some(2));
    assert_eq!(count(&mgr.json(), "closed"), Some(3));
    // The research user may use "open" only: "closed" and its counts are not theirs to see.
    let res = get(&gw, "/usage", RES).await;
    assert_eq!(count(&res.json(), "open"), Some(2));
    assert_eq!(count(&res.json(), "closed"), None, "{}", res.body);
    assert_eq!(
        manage(&gw, Method::GET, "/usage", None, None).await.status,
        401
    );
}
