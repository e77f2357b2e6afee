//! The official OpenAI Python SDK against a pool whose primary is down, and against a stream
//! cut in the middle: the client changes nothing and sees a success through the fallback, and
//! a cut stream raises instead of returning a short answer.
//!
//! The SDK comes from `TOWER_GATEWAY_PYTHON` (a Python that imports `openai`), else from the
//! virtualenv `target/py` that `.ci/run` makes (`python3 -m venv target/py &&
//! target/py/bin/pip install openai`). Without it the tests say so and pass, except under
//! `CI=true`, where they fail.

mod scripted;
mod support;

use std::path::PathBuf;
use std::time::Duration;

use scripted::{Act, Scripted, refusing_addr};
use support::*;

/// A Python interpreter that imports `openai`, or `None` (said loudly; a failure in CI).
fn python() -> Option<PathBuf> {
    let candidates = std::env::var_os("TOWER_GATEWAY_PYTHON")
        .map(PathBuf::from)
        .into_iter()
        .chain([
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/py/bin/python"),
            PathBuf::from("python3"),
        ]);
    for candidate in candidates {
        let ok = std::process::Command::new(&candidate)
            .args(["-c", "import openai"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            return Some(candidate);
        }
    }
    let how = "python3 -m venv target/py && target/py/bin/pip install openai";
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("the OpenAI Python SDK is not installed (CI=true): {how}");
    }
    eprintln!("SKIPPED: the OpenAI Python SDK is not installed; to run this test: {how}");
    None
}

/// Runs `script` with `BASE_URL` and `API_KEY` set; its exit status and output.
async fn run_python(python: &PathBuf, script: &str, base_url: &str) -> (bool, String) {
    let out = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(python)
            .args(["-c", script])
            .env("BASE_URL", base_url)
            .env("API_KEY", GW_KEY)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the Python SDK finished within a minute")
    .expect("python runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn pool_toml(targets: &str) -> String {
    format!(
        "[[keys]]\nid = \"k\"\nsubject = \"k@example.com\"\nkey = \"{GW_KEY}\"\n\n\
         [[accounts]]\nname = \"{ACCOUNT}\"\nheader_auth = {{ Authorization = \"Bearer {UP_KEY}\" }}\n\
         access = {{ users = [\"everyone\"] }}\n\n\
         [[accounts.endpoints]]\nname = \"{ENDPOINT}\"\ntargets = [{targets}]\n"
    )
}

const SDK_CALLS: &str = r#"
import os, openai
client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"], max_retries=0)
messages = [{"role": "user", "content": "Say hello"}]
r = client.chat.completions.create(model="meta-llama/Llama-3.1-8B-Instruct", messages=messages)
print("COMPLETION", r.choices[0].message.content)
s = client.chat.completions.create(model="meta-llama/Llama-3.1-8B-Instruct", messages=messages, stream=True)
print("STREAM", "".join(c.choices[0].delta.content or "" for c in s if c.choices))
"#;

#[tokio::test]
async fn the_sdk_succeeds_through_the_fallback_when_the_primary_is_down() {
    let Some(python) = python() else { return };
    let dead = refusing_addr().await;
    let backup = MockUpstream::new(UP_KEY, Duration::from_millis(1))
        .spawn()
        .await
        .unwrap();
    let gw = serve_gateway(gateway_from_toml(&pool_toml(&format!(
        "{{ base_url = \"http://{dead}/v1\" }}, {{ base_url = \"http://{backup}/v1\", priority = 2 }}"
    ))))
    .await;
    let (ok, out) = run_python(&python, SDK_CALLS, &gw.base_url()).await;
    assert!(ok, "the SDK failed: {out}");
    let completion = out
        .lines()
        .find_map(|l| l.strip_prefix("COMPLETION "))
        .unwrap_or_else(|| panic!("{out}"));
    let stream = out
        .lines()
        .find_map(|l| l.strip_prefix("STREAM "))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(!completion.is_empty(), "{out}");
    assert!(!stream.is_empty(), "{out}");
}

#[tokio::test]
async fn a_stream_cut_midway_raises_in_the_sdk() {
    let Some(python) = python() else { return };
    let cut = Scripted::start(Act::CutMidStream).await;
    let backup = Scripted::start(Act::Sse { events: 3 }).await;
    let gw = serve_gateway(gateway_from_toml(&pool_toml(&format!(
        "{{ base_url = \"{}\" }}, {{ base_url = \"{}\", priority = 2 }}",
        cut.base_url(),
        backup.base_url()
    ))))
    .await;
    let script = r#"
import os, sys, openai
client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"], max_retries=0)
got = []
try:
    s = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    for c in s:
        if c.choices:
            got.append(c.choices[0].delta.content or "")
except openai.APIError as e:
    print("RAISED", type(e).__name__, "after", repr("".join(got)), "|", e.message)
    sys.exit(0)
print("NO EXCEPTION: a short answer", repr("".join(got)))
sys.exit(3)
"#;
    let (ok, out) = run_python(&python, script, &gw.base_url()).await;
    assert!(ok, "{out}");
    assert!(out.contains("RAISED APIError after 't0 t1 '"), "{out}");
    assert!(out.contains("incomplete"), "{out}");
    assert_eq!(backup.count(), 0, "retried after the head went out");
}
