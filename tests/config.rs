//! The TOML configuration as a user writes it: a full config loads, every mistake names its
//! field, and no error ever shows a secret.

#![cfg(feature = "config")]

use std::path::PathBuf;
use std::time::Duration;

use tower_gateway::access::{Grants, Subject};
use tower_gateway::auth::KeyDigest;
use tower_gateway::config::{ConfigError, GatewayConfig, SecretSource};

/// An upstream secret read from the environment.
const ENV_CANARY: &str = "sk-CANARY-5e3f9a7c1d2b";
/// A gateway key written literally in the file.
const KEY_CANARY: &str = "gw-CANARY-8d4c2e6f0a1b";

/// A fresh directory under the system temp dir, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tower-gateway-config-{name}-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn subjects(list: &[&str]) -> Vec<Subject> {
    list.iter().map(|s| s.parse().unwrap()).collect()
}

const GOOD: &str = r#"
path_prefix = "/proxy-api"

[[keys]]
id = "alice-laptop"
subject = "alice@example.com"
teams = ["research"]
key = "${ALICE_GATEWAY_KEY}"

[[keys]]
id = "ci-bot"
subject = "ci@example.com"
teams = ["platform", "ci"]
sha256 = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"  # "test"

[[keys]]
id = "bob"
subject = "bob@example.com"
sha256 = "${BOB_SHA256}"

[[accounts]]
name = "coreweave-model"
endpoint_type = "none"
[accounts.access]
managers = ["team:platform"]
users = ["everyone"]
viewers = []

[[accounts.endpoints]]
name = "inference"
base_url = "https://api.inference.wandb.ai/v1"
headers = { Authorization = "Bearer ${WANDB_API_KEY}" }
timeouts = { connect_ms = 10000, first_byte_ms = 600000, idle_ms = 300000 }

[[accounts]]
name = "internal"
header_auth = { Authorization = "Bearer ${SHARED_KEY}", X-Org = "acme" }
access = { users = ["team:research"], viewers = ["user:bob@example.com"] }

[[accounts.endpoints]]
name = "llama"
base_url = "http://127.0.0.1:8000/v1"
access = { users = ["user:alice@example.com"] }
timeouts = { idle_ms = 5000 }

[[accounts.endpoints]]
name = "own-key"
base_url = "https://own.example.com"
headers = { authorization = "Bearer own-${SHARED_KEY}" }
"#;

fn good_vars() -> SecretSource {
    SecretSource::from_vars(
        [
            ("ALICE_GATEWAY_KEY", "gw-alice"),
            ("BOB_SHA256", &KeyDigest::of("gw-bob").to_hex()),
            ("WANDB_API_KEY", ENV_CANARY),
            ("SHARED_KEY", "shared-secret"),
        ],
        std::env::temp_dir(),
    )
}

#[test]
fn a_full_config_loads() {
    let config = GatewayConfig::from_toml(GOOD, &good_vars()).unwrap();
    assert_eq!(config.path_prefix, "/proxy-api");

    // Keys: by key, by digest, by digest from a variable.
    assert_eq!(config.keys.len(), 3);
    let alice = config.keys.get(&KeyDigest::of("gw-alice")).unwrap();
    assert_eq!(&*alice.key_id, "alice-laptop");
    assert_eq!(&*alice.subject, "alice@example.com");
    assert!(alice.in_team("research"));
    let ci = config.keys.get(&KeyDigest::of("test")).unwrap();
    assert_eq!(&*ci.key_id, "ci-bot");
    assert!(ci.in_team("platform") && ci.in_team("ci"));
    let bob = config.keys.get(&KeyDigest::of("gw-bob")).unwrap();
    assert!(bob.teams.is_empty());

    // The W&B endpoint.
    let ep = config
        .registry
        .endpoint("coreweave-model", "inference")
        .unwrap();
    assert_eq!(ep.base_url(), "https://api.inference.wandb.ai/v1");
    assert_eq!(ep.headers().len(), 1);
    let auth = &ep.headers()["authorization"];
    assert_eq!(auth, &format!("Bearer {ENV_CANARY}"));
    assert!(auth.is_sensitive());
    assert_eq!(ep.timeouts().connect, Some(Duration::from_secs(10)));
    assert_eq!(ep.timeouts().first_byte, Some(Duration::from_secs(600)));
    assert_eq!(ep.timeouts().idle, Some(Duration::from_secs(300)));
    assert!(ep.access().is_none());
    let account = config.registry.account("coreweave-model").unwrap();
    assert_eq!(
        account.access(),
        &Grants {
            managers: subjects(&["team:platform"]),
            users: subjects(&["everyone"]),
            viewers: vec![],
        }
    );
    // Debug output of the loaded config holds no secret.
    let dbg = format!("{config:?}");
    assert!(
        !dbg.contains(ENV_CANARY) && !dbg.contains("shared-secret"),
        "{dbg}"
    );

    // The second account: inherited header_auth, a per-endpoint override of grants and of
    // the Authorization header.
    let internal = config.registry.account("internal").unwrap();
    assert_eq!(
        internal.access(),
        &Grants {
            managers: vec![],
            users: subjects(&["team:research"]),
            viewers: subjects(&["user:bob@example.com"]),
        }
    );
    let llama = config.registry.endpoint("internal", "llama").unwrap();
    assert_eq!(llama.base_url(), "http://127.0.0.1:8000/v1");
    assert_eq!(llama.headers()["authorization"], "Bearer shared-secret");
    assert_eq!(llama.headers()["x-org"], "acme");
    assert_eq!(
        llama.access(),
        Some(&Grants {
            users: subjects(&["user:alice@example.com"]),
            ..Grants::default()
        })
    );
    assert_eq!(llama.timeouts().idle, Some(Duration::from_millis(5000)));
    assert_eq!(llama.timeouts().connect, None);
    let own = config.registry.endpoint("internal", "own-key").unwrap();
    assert_eq!(
        own.headers().get_all("authorization").iter().count(),
        1,
        "the endpoint's header replaces the account's"
    );
    assert_eq!(own.headers()["authorization"], "Bearer own-shared-secret");
    assert_eq!(own.headers()["x-org"], "acme");
}

#[test]
fn defaults() {
    let config = GatewayConfig::from_toml("", &good_vars()).unwrap();
    assert_eq!(config.path_prefix, "/proxy-api");
    assert!(config.keys.is_empty());
    assert!(config.registry.accounts().is_empty());

    let config = GatewayConfig::from_toml(
        "path_prefix = \"\"\n[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\nname = \"e\"\nbase_url = \"http://127.0.0.1:1\"\n",
        &good_vars(),
    )
    .unwrap();
    assert_eq!(config.path_prefix, "");
    let account = config.registry.account("a").unwrap();
    assert_eq!(account.access(), &Grants::default());
    let ep = config.registry.endpoint("a", "e").unwrap();
    assert!(ep.headers().is_empty() && ep.access().is_none());
    assert_eq!(ep.timeouts(), Default::default());
}

/// Appended to every bad config: a literal key and an upstream key from the environment, so
/// a message that leaked either would be caught. Each case comes first, so its indices start
/// at 0.
const CANARIES: &str = r#"
[[keys]]
id = "canary"
subject = "canary@example.com"
key = "gw-CANARY-8d4c2e6f0a1b"

[[accounts]]
name = "canary-account"
header_auth = { Authorization = "Bearer ${CANARY}" }
[[accounts.endpoints]]
name = "canary-endpoint"
base_url = "https://canary.example.com/v1"
headers = { X-Canary = "gw-CANARY-8d4c2e6f0a1b ${CANARY}" }
"#;

fn assert_no_secret(err: &ConfigError, what: &str) {
    let shown = err.to_string();
    let debug = format!("{err:?}");
    for secret in [ENV_CANARY, KEY_CANARY, "CANARY-"] {
        assert!(!shown.contains(secret), "{what}: Display leaks: {shown}");
        assert!(!debug.contains(secret), "{what}: Debug leaks: {debug}");
    }
}

#[test]
fn bad_configs_name_the_field_and_never_a_secret() {
    let dir = TempDir::new("bad");
    std::fs::write(dir.0.join("cert.pem"), "not really a certificate\n").unwrap();
    let secrets = SecretSource::from_vars(
        [
            ("CANARY", ENV_CANARY.to_owned()),
            ("NEWLINE", format!("Bearer {ENV_CANARY}\r\nX-Evil: 1")),
            ("EMPTY", String::new()),
        ],
        &dir.0,
    );
    let canary_sha = KeyDigest::of(ENV_CANARY).to_hex();

    let endpoint = |extra: &str| {
        format!(
            "[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\nname = \"e\"\n\
             base_url = \"https://x.example.com/v1\"\n{extra}\n"
        )
    };
    let key = |extra: &str| format!("[[keys]]\nid = \"k\"\nsubject = \"k@example.com\"\n{extra}\n");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "unknown top-level field",
            "pat_prefix = \"/x\"\n".into(),
            "pat_prefix",
        ),
        (
            "unknown field in endpoint",
            endpoint("base_ulr = \"https://y\""),
            "accounts[0].endpoints[0].base_ulr",
        ),
        (
            "unknown field in a key, next to a literal secret",
            key(&format!("kye = \"{KEY_CANARY}\"")),
            "keys[0].kye",
        ),
        (
            "wrong type for a field next to a literal secret",
            key(&format!("teams = \"{KEY_CANARY}\"\nkey = \"{KEY_CANARY}\"")),
            "keys[0].teams",
        ),
        (
            "wrong type for a secret-bearing field",
            format!("[[accounts]]\nname = \"a\"\nheader_auth = \"Bearer {KEY_CANARY}\"\n"),
            "accounts[0].header_auth",
        ),
        (
            "wrong type for a header value",
            endpoint(&format!(
                "headers = {{ Authorization = [\"{KEY_CANARY}\"] }}"
            )),
            "accounts[0].endpoints[0].headers.Authorization",
        ),
        (
            "wrong type for a key",
            key(&format!("key = [\"{KEY_CANARY}\"]")),
            "keys[0].key",
        ),
        (
            "TOML syntax error on a line holding a secret",
            key(&format!("key = \"{KEY_CANARY}")),
            "line 4",
        ),
        (
            "missing required field",
            "[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\n".into(),
            "accounts[0].endpoints[0]",
        ),
        (
            "neither base_url nor targets",
            "[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\nname = \"e\"\n".into(),
            "accounts[0].endpoints[0].base_url",
        ),
        (
            "both base_url and targets",
            endpoint("targets = [{ base_url = \"https://b.example/v1\" }]"),
            "accounts[0].endpoints[0].base_url",
        ),
        (
            "a target's bad base_url",
            "[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\nname = \"e\"\ntargets = [{ base_url = \"https://b.example/v1\" }, { base_url = \"https://c.example/v1/\" }]\n".into(),
            "accounts[0].endpoints[0].targets[1].base_url",
        ),
        (
            "a zero weight",
            "[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\nname = \"e\"\ntargets = [{ base_url = \"https://b.example/v1\", weight = 0 }]\n".into(),
            "accounts[0].endpoints[0].targets[0].weight",
        ),
        (
            "an unknown target field",
            "[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\nname = \"e\"\ntargets = [{ base_url = \"https://b.example/v1\", wieght = 2 }]\n".into(),
            "accounts[0].endpoints[0].targets[0].wieght",
        ),
        (
            "a template in a target header",
            "[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\nname = \"e\"\ntargets = [{ base_url = \"https://b.example/v1\", headers = { X-User = \"{subject}\" } }]\n".into(),
            "accounts[0].endpoints[0].targets[0].headers.x-user",
        ),
        (
            "a retried status that is not an error",
            endpoint("retry = { attempts = 2, on_status = [503, 200] }"),
            "accounts[0].endpoints[0].retry.on_status[1]",
        ),
        (
            "zero attempts",
            endpoint("retry = { attempts = 0 }"),
            "accounts[0].endpoints[0].retry.attempts",
        ),
        (
            "a health check without a slash",
            endpoint("health = { path = \"models\" }"),
            "accounts[0].endpoints[0].health.path",
        ),
        (
            "an error share over 100 percent",
            endpoint("eject = { error_percent = 101 }"),
            "accounts[0].endpoints[0].eject.error_percent",
        ),
        (
            "an error window of one attempt",
            endpoint("eject = { window = 1 }"),
            "accounts[0].endpoints[0].eject.window",
        ),
        (
            "no failures at all eject",
            endpoint("eject = { consecutive_failures = 0 }"),
            "accounts[0].endpoints[0].eject.consecutive_failures",
        ),
        (
            "a health check every millisecond",
            endpoint("health = { path = \"/models\", interval_ms = 1 }"),
            "accounts[0].endpoints[0].health.interval_ms",
        ),
        (
            "an ejection cool-down below its base",
            endpoint("eject = { base_ms = 1000, max_ms = 10 }"),
            "accounts[0].endpoints[0].eject.max_ms",
        ),
        (
            "unknown endpoint_type",
            "[[accounts]]\nname = \"a\"\nendpoint_type = \"openai\"\n".into(),
            "accounts[0].endpoint_type",
        ),
        (
            "a secret pasted as endpoint_type",
            format!("[[accounts]]\nname = \"a\"\nendpoint_type = \"{KEY_CANARY}\"\n"),
            "accounts[0].endpoint_type",
        ),
        (
            "negative timeout",
            endpoint("timeouts = { connect_ms = -1 }"),
            "accounts[0].endpoints[0].timeouts.connect_ms",
        ),
        (
            "missing env var",
            endpoint("headers = { Authorization = \"Bearer ${WANDB_API_KEY}\" }"),
            "accounts[0].endpoints[0].headers.Authorization",
        ),
        (
            "missing secret file",
            key("key = \"${file:no-such-secret.txt}\""),
            "keys[0].key",
        ),
        (
            "unterminated ${",
            endpoint(&format!(
                "headers = {{ Authorization = \"Bearer {KEY_CANARY}${{CANARY\" }}"
            )),
            "accounts[0].endpoints[0].headers.Authorization",
        ),
        (
            "a literal secret inside ${}",
            key(&format!("key = \"${{{KEY_CANARY}}}\"")),
            "keys[0].key",
        ),
        (
            "bad base_url",
            "[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\nname = \"e\"\n\
             base_url = \"api.inference.wandb.ai/v1\"\n"
                .into(),
            "accounts[0].endpoints[0].base_url",
        ),
        (
            "trailing slash",
            "[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\nname = \"e\"\n\
             base_url = \"https://api.inference.wandb.ai/v1/\"\n"
                .into(),
            "accounts[0].endpoints[0].base_url",
        ),
        (
            "bad account name",
            "[[accounts]]\nname = \"a/b\"\n".into(),
            "accounts[0].name",
        ),
        (
            "duplicate account",
            "[[accounts]]\nname = \"a\"\n[[accounts]]\nname = \"a\"\n".into(),
            "accounts[1].name",
        ),
        (
            "duplicate endpoint",
            format!(
                "{}[[accounts.endpoints]]\nname = \"e\"\nbase_url = \"https://y.example.com\"\n",
                endpoint("")
            ),
            "accounts[0].endpoints[1].name",
        ),
        (
            "duplicate key id",
            format!("{}{}", key("key = \"${CANARY}\""), key("key = \"other\"")),
            "keys[1].id",
        ),
        (
            "the same key twice",
            format!(
                "[[keys]]\nid = \"one\"\nsubject = \"a@x\"\nkey = \"${{CANARY}}\"\n\
                 [[keys]]\nid = \"two\"\nsubject = \"b@x\"\nsha256 = \"{canary_sha}\"\n"
            ),
            "keys[1]",
        ),
        (
            "the same literal key twice",
            format!(
                "[[keys]]\nid = \"one\"\nsubject = \"a@x\"\nkey = \"{KEY_CANARY}\"\n\
                 [[keys]]\nid = \"two\"\nsubject = \"b@x\"\nkey = \"{KEY_CANARY}\"\n"
            ),
            "keys[1]",
        ),
        (
            "both sha256 and key",
            key(&format!(
                "sha256 = \"{canary_sha}\"\nkey = \"{KEY_CANARY}\""
            )),
            "keys[0]",
        ),
        ("neither sha256 nor key", key(""), "keys[0]"),
        (
            "bad sha256 hex",
            key(&format!("sha256 = \"{KEY_CANARY}\"")),
            "keys[0].sha256",
        ),
        (
            "bad sha256 hex from a variable",
            key("sha256 = \"${CANARY}\""),
            "keys[0].sha256",
        ),
        ("empty key", key("key = \"${EMPTY}\""), "keys[0].key"),
        (
            "empty id",
            "[[keys]]\nid = \"\"\nsubject = \"a@x\"\nkey = \"x\"\n".into(),
            "keys[0].id",
        ),
        (
            "subject with a space",
            "[[keys]]\nid = \"i\"\nsubject = \"Alice Smith\"\nkey = \"x\"\n".into(),
            "keys[0].subject",
        ),
        (
            "empty team",
            key("teams = [\"research\", \"\"]\nkey = \"x\""),
            "keys[0].teams[1]",
        ),
        (
            "bad subject in account access",
            format!(
                "[[accounts]]\nname = \"a\"\n[accounts.access]\nusers = [\"everyone\", \"{KEY_CANARY}\"]\n"
            ),
            "accounts[0].access.users[1]",
        ),
        (
            "bad subject in endpoint access",
            endpoint("access = { viewers = [\"group:x\"] }"),
            "accounts[0].endpoints[0].access.viewers[0]",
        ),
        (
            "unknown role",
            "[[accounts]]\nname = \"a\"\naccess = { admins = [\"everyone\"] }\n".into(),
            "accounts[0].access.admins",
        ),
        (
            "bad header name",
            endpoint("headers = { \"Bad Header\" = \"${CANARY}\" }"),
            "accounts[0].endpoints[0].headers.Bad Header",
        ),
        (
            "header names differing only by case",
            endpoint(&format!(
                "headers = {{ Authorization = \"${{CANARY}}\", authorization = \"{KEY_CANARY}\" }}"
            )),
            "accounts[0].endpoints[0].headers.authorization",
        ),
        (
            "header value with a newline from a variable",
            endpoint("headers = { Authorization = \"${NEWLINE}\" }"),
            "accounts[0].endpoints[0].headers.Authorization",
        ),
        (
            "header value with a newline written literally",
            format!(
                "[[accounts]]\nname = \"a\"\nheader_auth = {{ X-Key = \"{KEY_CANARY}\\nX-Evil: 1\" }}\n"
            ),
            "accounts[0].header_auth.X-Key",
        ),
        (
            "forbidden header: Host",
            endpoint("headers = { Host = \"evil.example.com\" }"),
            "accounts[0].endpoints[0].headers.host",
        ),
        (
            "forbidden header: Connection",
            "[[accounts]]\nname = \"a\"\nheader_auth = { Connection = \"${CANARY}\" }\n".into(),
            "accounts[0].header_auth.connection",
        ),
        (
            "zero timeout",
            endpoint("timeouts = { idle_ms = 0 }"),
            "accounts[0].endpoints[0].timeouts.idle_ms",
        ),
        (
            "bad path_prefix: trailing slash",
            "path_prefix = \"/proxy-api/\"\n".into(),
            "path_prefix",
        ),
        (
            "bad path_prefix: relative",
            "path_prefix = \"proxy-api\"\n".into(),
            "path_prefix",
        ),
        (
            "tls cert without key",
            endpoint("tls = { client_cert_file = \"cert.pem\" }"),
            "accounts[0].endpoints[0].tls.client_key_file",
        ),
        (
            "unreadable ca_file",
            endpoint("tls = { ca_file = \"no-such-ca.pem\" }"),
            "accounts[0].endpoints[0].tls.ca_file",
        ),
        (
            "unknown tls field",
            endpoint("tls = { ca = \"ca.pem\" }"),
            "accounts[0].endpoints[0].tls.ca",
        ),
    ];
    assert!(cases.len() >= 20);

    for (what, case, field) in &cases {
        let text = format!("{case}{CANARIES}");
        let err = match GatewayConfig::from_toml(&text, &secrets) {
            Ok(_) => panic!("{what}: loaded"),
            Err(err) => err,
        };
        assert_eq!(err.field(), *field, "{what}: {err}");
        assert!(!err.message().is_empty(), "{what}");
        assert_eq!(
            err.to_string(),
            format!("{}: {}", err.field(), err.message())
        );
        assert_no_secret(&err, what);
    }

    // The canaries themselves are a valid configuration.
    GatewayConfig::from_toml(CANARIES, &secrets).unwrap();
}

#[test]
fn messages_say_what_is_wrong() {
    let secrets = SecretSource::from_vars([("K", "v")], std::env::temp_dir());
    let cases = [
        (
            "[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\nname = \"e\"\n\
             base_url = \"https://x.example.com/v1/\"\n",
            "accounts[0].endpoints[0].base_url: must not end with a slash",
        ),
        (
            "[[accounts]]\nname = \"a\"\n[[accounts.endpoints]]\nname = \"e\"\n\
             base_url = \"https://x.example.com\"\nheaders = { Authorization = \"${WANDB_API_KEY}\" }\n",
            "accounts[0].endpoints[0].headers.Authorization: environment variable WANDB_API_KEY is not set",
        ),
        (
            "[[keys]]\nid = \"x\"\nsubject = \"a\"\nkey = \"1\"\n[[keys]]\nid = \"x\"\nsubject = \"b\"\nkey = \"2\"\n",
            "keys[1].id: duplicate id \"x\"",
        ),
        (
            "[[keys]]\nid = \"alice-laptop\"\nsubject = \"a\"\nkey = \"${K}\"\n\
             [[keys]]\nid = \"b\"\nsubject = \"b\"\nkey = \"v\"\n",
            "keys[1]: the same key is already registered as \"alice-laptop\"",
        ),
        (
            "[[keys]]\nid = \"x\"\nsubject = \"a\"\n",
            "keys[0]: set exactly one of sha256 or key",
        ),
    ];
    for (text, want) in cases {
        let err = GatewayConfig::from_toml(text, &secrets).unwrap_err();
        assert_eq!(err.to_string(), want);
    }

    // Unknown fields are named with what is expected.
    let err = GatewayConfig::from_toml("[[keys]]\nkye = \"x\"\n", &secrets).unwrap_err();
    assert!(err.message().contains("unknown field `kye`"), "{err}");

    // Type errors redact the quoted value and give a position.
    let err = GatewayConfig::from_toml("path_prefix = \"/a\"\nkeys = \"sk-value\"\n", &secrets)
        .unwrap_err();
    assert_eq!(err.field(), "keys");
    assert!(err.message().contains("\"<redacted>\""), "{err}");
    assert!(err.message().contains("line 2, column"), "{err}");
    assert!(!err.to_string().contains("sk-value"), "{err}");

    // A syntax error gives the position and still says what was expected.
    let err =
        GatewayConfig::from_toml("[[keys]]\nid = \"x\"\nkey = \"sk-value\n", &secrets).unwrap_err();
    assert_eq!(err.field(), "line 3");
    assert_eq!(
        err.message(),
        "invalid basic string, expected `\"` (line 3, column 16)"
    );
}

#[test]
fn load_reads_secret_files_next_to_the_config() {
    let dir = TempDir::new("load");
    std::fs::write(dir.0.join("secret.txt"), "gw-file-key\n").unwrap();
    std::fs::create_dir_all(dir.0.join("secrets")).unwrap();
    std::fs::write(dir.0.join("secrets/upstream"), "upstream-key\r\n").unwrap();
    let path = dir.0.join("gateway.toml");
    std::fs::write(
        &path,
        r#"
[[keys]]
id = "from-file"
subject = "svc@example.com"
key = "${file:secret.txt}"

[[accounts]]
name = "coreweave-model"
access = { users = ["everyone"] }
[[accounts.endpoints]]
name = "inference"
base_url = "https://api.inference.wandb.ai/v1"
headers = { Authorization = "Bearer ${file:secrets/upstream}" }
"#,
    )
    .unwrap();
    let config = GatewayConfig::load(&path).unwrap();
    let who = config.keys.get(&KeyDigest::of("gw-file-key")).unwrap();
    assert_eq!(&*who.key_id, "from-file");
    let ep = config
        .registry
        .endpoint("coreweave-model", "inference")
        .unwrap();
    assert_eq!(ep.headers()["authorization"], "Bearer upstream-key");

    // A relative TLS path is resolved against the config file's directory.
    let path = dir.0.join("tls.toml");
    std::fs::write(
        &path,
        r#"
[[accounts]]
name = "a"
[[accounts.endpoints]]
name = "e"
base_url = "https://x.example.com"
tls = { ca_file = "missing-ca.pem" }
"#,
    )
    .unwrap();
    let err = GatewayConfig::load(&path).unwrap_err();
    assert_eq!(err.field(), "accounts[0].endpoints[0].tls.ca_file");
    let expected = dir.0.join("missing-ca.pem");
    assert!(
        err.message().contains(&expected.display().to_string()),
        "{err}"
    );

    // A missing config file names the file.
    let missing = dir.0.join("nope.toml");
    let err = GatewayConfig::load(&missing).unwrap_err();
    assert_eq!(err.field(), missing.display().to_string());
}

#[test]
fn the_example_config_stays_valid() {
    let text = include_str!("../examples/gateway.toml");
    let secrets = SecretSource::from_vars(
        [("GATEWAY_KEY", "gw-demo"), ("WANDB_API_KEY", ENV_CANARY)],
        "examples",
    );
    let config = GatewayConfig::from_toml(text, &secrets).unwrap();
    assert_eq!(config.path_prefix, "/proxy-api");
    assert!(config.keys.get(&KeyDigest::of("gw-demo")).is_some());
    let ep = config
        .registry
        .endpoint("coreweave-model", "inference")
        .unwrap();
    assert_eq!(ep.base_url(), "https://api.inference.wandb.ai/v1");
    assert_eq!(
        ep.headers()["authorization"],
        &format!("Bearer {ENV_CANARY}")
    );
    let account = config.registry.account("coreweave-model").unwrap();
    assert_eq!(account.access().users, subjects(&["everyone"]));

    // Without its variables it fails, naming the first one.
    let err =
        GatewayConfig::from_toml(text, &SecretSource::from_vars([] as [(&str, &str); 0], "."))
            .unwrap_err();
    assert_eq!(
        err.to_string(),
        "keys[0].key: environment variable GATEWAY_KEY is not set"
    );
}

#[test]
fn the_body_limit_is_read_and_validated() {
    let secrets = SecretSource::from_vars(Vec::<(String, String)>::new(), std::env::temp_dir());
    let cfg =
        GatewayConfig::from_toml("[limits]\nmax_request_body_bytes = 1048576\n", &secrets).unwrap();
    assert_eq!(cfg.max_request_body, Some(1_048_576));
    assert_eq!(
        GatewayConfig::from_toml("", &secrets)
            .unwrap()
            .max_request_body,
        None
    );
    for (text, field) in [
        (
            "[limits]\nmax_request_body_bytes = 0\n",
            "limits.max_request_body_bytes",
        ),
        ("[limits]\nmax_body = 1\n", "limits.max_body"),
        (
            "[limits]\nmax_request_body_bytes = -1\n",
            "limits.max_request_body_bytes",
        ),
    ] {
        let err = GatewayConfig::from_toml(text, &secrets).unwrap_err();
        assert_eq!(err.field(), field, "{err}");
    }
}
