//! The console in a real browser: headless Chromium driven through WebDriver (chromedriver and
//! the `fantoccini` client), against a real gateway and a mock W&B Inference upstream that
//! wants its own key.
//!
//! A manager signs in, walks the wizard to create `coreweave-model`/`inference` with a custom
//! `Authorization` header and a grant to `team:research`, reads the usage snippet and runs its
//! curl command (the call succeeds through the gateway), edits the endpoint and meets the field
//! error for a trailing slash, and deletes it; a user-only key sees no edit controls; a team
//! named like markup shows as text; the header value never reaches the page. Each step's
//! screenshot is written to `target/console-screenshots/`.
//!
//! Needs `chromium` and `chromium-driver` (Debian), which `.ci/run` installs. Without them the
//! test says so and passes, except under `CI=true`, where it fails.

mod support;

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;
use support::*;

const ADMIN: &str = "gw-console-admin-CANARY-4f2a";
const USER: &str = "gw-console-user-CANARY-8b1c";
const XSS: &str = "<img/src=x/onerror=alert(1)>";

fn find_tool(env: &str, names: &[&str]) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env) {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in names {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// chromedriver on a free loopback port, killed when dropped.
struct Driver {
    child: tokio::process::Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

async fn driver() -> Option<(Driver, PathBuf)> {
    let chromedriver = find_tool("CHROMEDRIVER", &["chromedriver"]);
    let chromium = find_tool(
        "CHROMIUM",
        &["chromium", "chromium-browser", "google-chrome"],
    );
    let (Some(chromedriver), Some(chromium)) = (chromedriver, chromium) else {
        let how = "apt-get install chromium chromium-driver";
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!("Chromium and chromedriver are not installed (CI=true): {how}");
        }
        eprintln!("SKIPPED: the console's browser test needs Chromium and chromedriver: {how}");
        return None;
    };
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let child = tokio::process::Command::new(chromedriver)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("chromedriver starts");
    let url = format!("http://127.0.0.1:{port}");
    within("chromedriver to listen", async {
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    Some((Driver { child, url }, chromium))
}

async fn browser(driver: &Driver, chromium: &PathBuf) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1280,800", "--lang=en-US"],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a browser session")
}

/// Saves a screenshot of the page as `target/console-screenshots/{name}.png`.
async fn shot(c: &Client, name: &str) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    c.execute("window.scrollTo(0, 0)", vec![]).await.unwrap();
    let png = c.screenshot().await.expect("a screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

async fn wait_css(c: &Client, css: &str) -> fantoccini::elements::Element {
    within(css, c.wait().for_element(Locator::Css(css)))
        .await
        .unwrap_or_else(|e| panic!("{css}: {e}"))
}

/// Waits until the main region's text contains `text`.
async fn wait_text(c: &Client, text: &str) {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let main = c
            .find(Locator::Id("main"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if main.contains(text) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited for {text:?}; the page says: {main}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn button(c: &Client, text: &str) -> fantoccini::elements::Element {
    let xpath = format!(
        "//main//button[normalize-space()='{text}'] | //main//a[normalize-space()='{text}']"
    );
    within(text, c.wait().for_element(Locator::XPath(&xpath)))
        .await
        .unwrap_or_else(|e| panic!("button {text}: {e}"))
}

/// The input of the field labelled `label`.
async fn input(c: &Client, label: &str) -> fantoccini::elements::Element {
    let xpath = format!("//label[normalize-space()='{label}']/following-sibling::*[1]");
    within(label, c.wait().for_element(Locator::XPath(&xpath)))
        .await
        .unwrap_or_else(|e| panic!("field {label}: {e}"))
}

async fn fill(c: &Client, label: &str, text: &str) {
    let el = input(c, label).await;
    el.clear().await.unwrap();
    el.send_keys(text).await.unwrap();
}

async fn sign_in(c: &Client, gw: &TestGateway, key: &str) {
    c.goto(&gw.url("/console/").to_string()).await.unwrap();
    fill(c, "Gateway key", key).await;
    button(c, "Sign in").await.click().await.unwrap();
    wait_css(c, "main h1").await;
    wait_text(c, "Endpoints").await;
}

/// Asserts that `secret` is neither in the page's markup nor in any input's value.
async fn assert_no_secret(c: &Client, secret: &str) {
    assert!(
        !c.source().await.unwrap().contains(secret),
        "a secret in the markup"
    );
    let in_inputs = c
        .execute(
            "return [...document.querySelectorAll('input, textarea')].some(i => i.value.includes(arguments[0]))",
            vec![json!(secret)],
        )
        .await
        .unwrap();
    assert_eq!(in_inputs, json!(false), "a secret in an input");
}

/// Clicks the element at `xpath`.
async fn click(c: &Client, xpath: &str) {
    c.find(Locator::XPath(xpath))
        .await
        .unwrap_or_else(|e| panic!("{xpath}: {e}"))
        .click()
        .await
        .unwrap();
}

/// Follows the navigation link `text`.
async fn nav(c: &Client, text: &str) {
    let xpath = format!("//nav//a[normalize-space()='{text}']");
    click(c, &xpath).await;
}

async fn sign_out(c: &Client) {
    let out = c
        .find(Locator::XPath(
            "//nav//button[normalize-space()='Sign out']",
        ))
        .await
        .unwrap();
    out.click().await.unwrap();
    wait_text(c, "Sign in").await;
}

#[tokio::test]
async fn a_manager_adds_uses_edits_and_deletes_an_endpoint_in_the_browser() {
    let Some((driver, chromium)) = driver().await else {
        return;
    };
    let upstream = MockUpstream::new(UP_KEY, Duration::from_millis(1))
        .spawn()
        .await
        .unwrap();
    let upstream_url = format!("http://{upstream}/v1");
    let gw = serve_app(gateway_from_toml(&format!(
        "admins = [\"team:platform\"]\n\n\
         [[keys]]\nid = \"admin\"\nsubject = \"ada@example.com\"\nteams = [\"platform\"]\nkey = \"{ADMIN}\"\n\n\
         [[keys]]\nid = \"rita\"\nsubject = \"rita@example.com\"\nteams = [\"research\"]\nkey = \"{USER}\"\n\n\
         [[accounts]]\nname = \"markup\"\naccess = {{ managers = [\"team:platform\"], users = [\"team:{XSS}\"] }}\n\n\
         [[accounts.endpoints]]\nname = \"shown-as-text\"\nbase_url = \"https://example.com/v1\"\n"
    )))
    .await;
    let c = browser(&driver, &chromium).await;

    // Sign in as a manager (a gateway admin of team platform).
    c.goto(&gw.url("/console/").to_string()).await.unwrap();
    wait_text(&c, "Sign in").await;
    shot(&c, "01-sign-in").await;
    sign_in(&c, &gw, ADMIN).await;
    // The markup in a team's name is text, not an element.
    wait_text(&c, XSS).await;
    let injected = c.find_all(Locator::Css("main img")).await.unwrap();
    assert!(injected.is_empty(), "a team name became markup");

    // The wizard: a new account, its endpoint with a custom Authorization header, access.
    nav(&c, "Add a Custom Endpoint").await;
    wait_text(&c, "Configure account").await;
    c.find(Locator::Css("input[type=radio][value=new]"))
        .await
        .unwrap()
        .click()
        .await
        .unwrap();
    fill(&c, "Account name", "coreweave-model").await;
    shot(&c, "02-wizard-account").await;
    button(&c, "Next").await.click().await.unwrap();
    fill(&c, "Endpoint name", "inference").await;
    fill(&c, "Base URL", &upstream_url).await;
    button(&c, "Add a header").await.click().await.unwrap();
    fill(&c, "Header name", "Authorization").await;
    fill(&c, "Value (write-only)", &format!("Bearer {UP_KEY}")).await;
    shot(&c, "03-wizard-endpoint").await;
    button(&c, "Next").await.click().await.unwrap();
    wait_text(&c, "Use the account's grants").await;
    click(
        &c,
        "//label[contains(., \"Use the account's grants\")]/input",
    )
    .await;
    let teams = c
        .find_all(Locator::XPath(
            "//label[normalize-space()='Teams (comma-separated)']/following-sibling::input",
        ))
        .await
        .unwrap();
    assert_eq!(teams.len(), 3, "managers, users, viewers");
    teams[0].send_keys("platform").await.unwrap();
    teams[1].send_keys("research").await.unwrap();
    shot(&c, "04-wizard-access").await;
    button(&c, "Create endpoint").await.click().await.unwrap();

    // The usage snippet, right after saving.
    wait_text(&c, "Use coreweave-model/inference").await;
    shot(&c, "05-usage-snippet").await;
    let base = c
        .find(Locator::Id("snippet-base-url"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(base, gw.base_url());
    let curl = c
        .find(Locator::Id("snippet-curl"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(curl.contains("$GATEWAY_KEY") && !curl.contains(USER) && !curl.contains(ADMIN));
    // The header value is nowhere in the page: not in its markup, not in an input.
    assert_no_secret(&c, UP_KEY).await;
    // The admin who made the account manages it.
    let account = send_json(
        http::Method::GET,
        gw.url("/manage/accounts/coreweave-model"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(account.json()["your_role"], "manager", "{}", account.body);
    // Run the snippet as a caller would, with the research user's key.
    let out = tokio::process::Command::new("sh")
        .args(["-c", &curl])
        .env("GATEWAY_KEY", USER)
        .output()
        .await
        .expect("sh runs the curl snippet");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && said.contains("data: [DONE]"),
        "the snippet's call: {said}"
    );

    // A user-only key sees the endpoint and no edit controls.
    sign_out(&c).await;
    sign_in(&c, &gw, USER).await;
    wait_text(&c, "coreweave-model").await;
    let controls = c
        .find_all(Locator::XPath("//tr[@data-endpoint='coreweave-model/inference']//*[normalize-space()='Edit' or normalize-space()='Delete']"))
        .await
        .unwrap();
    assert!(controls.is_empty(), "a user sees edit controls");
    let add = c
        .find_all(Locator::XPath(
            "//nav//a[normalize-space()='Add a Custom Endpoint']",
        ))
        .await
        .unwrap();
    assert!(add.is_empty(), "a user is offered the wizard");
    shot(&c, "06-user-view").await;
    sign_out(&c).await;

    // Edit: a trailing slash is refused, named next to the field; then it saves.
    sign_in(&c, &gw, ADMIN).await;
    wait_text(&c, "coreweave-model").await;
    click(
        &c,
        "//tr[@data-endpoint='coreweave-model/inference']//a[normalize-space()='Edit']",
    )
    .await;
    wait_text(&c, "Edit coreweave-model/inference").await;
    button(&c, "Next").await.click().await.unwrap();
    fill(&c, "Base URL", &format!("{upstream_url}/")).await;
    button(&c, "Next").await.click().await.unwrap();
    button(&c, "Save changes").await.click().await.unwrap();
    let error = wait_css(&c, "[data-for='base_url'] .error:not([hidden])").await;
    let text = error.text().await.unwrap();
    assert!(
        text.starts_with("base_url:") && text.contains("slash"),
        "{text}"
    );
    shot(&c, "07-field-error").await;
    fill(&c, "Base URL", &upstream_url).await;
    button(&c, "Next").await.click().await.unwrap();
    button(&c, "Save changes").await.click().await.unwrap();
    wait_text(&c, "Use coreweave-model/inference").await;
    assert_no_secret(&c, UP_KEY).await;

    // Delete.
    nav(&c, "Endpoints").await;
    wait_text(&c, "coreweave-model").await;
    click(
        &c,
        "//tr[@data-endpoint='coreweave-model/inference']//button[normalize-space()='Delete']",
    )
    .await;
    button(&c, "Delete it").await.click().await.unwrap();
    wait_text(&c, "Deleted coreweave-model/inference.").await;
    shot(&c, "08-deleted").await;
    let gone = send_json(
        http::Method::GET,
        gw.url("/manage/accounts/coreweave-model/endpoints/inference"),
        Some(ADMIN),
        None,
    )
    .await;
    assert_eq!(gone.status, 404);
    c.close().await.unwrap();
}

#[tokio::test]
async fn keys_the_audit_log_a_stale_edit_and_a_phone_screen() {
    let Some((driver, chromium)) = driver().await else {
        return;
    };
    let upstream = MockUpstream::new(UP_KEY, Duration::from_millis(1))
        .spawn()
        .await
        .unwrap();
    let gw = serve_app(gateway_from_toml(&format!(
        "admins = [\"team:platform\"]\n\n\
         [[keys]]\nid = \"admin\"\nsubject = \"ada@example.com\"\nteams = [\"platform\"]\nkey = \"{ADMIN}\"\n\n\
         [[accounts]]\nname = \"{ACCOUNT}\"\naccess = {{ managers = [\"team:platform\"], users = [\"team:research\"] }}\n\n\
         [[accounts.endpoints]]\nname = \"{ENDPOINT}\"\nbase_url = \"http://{upstream}/v1\"\n\
         headers = {{ Authorization = \"Bearer {UP_KEY}\" }}\n"
    )))
    .await;
    let c = browser(&driver, &chromium).await;
    sign_in(&c, &gw, ADMIN).await;

    // A key, shown once; it works; rotated, the new one is shown once; revoked.
    nav(&c, "Keys").await;
    wait_text(&c, "Create a key").await;
    fill(
        &c,
        "Subject (who holds it, e.g. an email)",
        "bob@example.com",
    )
    .await;
    fill(&c, "Teams (comma-separated)", "research").await;
    button(&c, "Create key").await.click().await.unwrap();
    wait_text(&c, "This is the only time the key is shown").await;
    shot(&c, "09-key-shown-once").await;
    let issued = c
        .find(Locator::Id("issued-key"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(issued.len() >= 32, "{issued}");
    let call = send_json(
        http::Method::POST,
        gw.proxy_url("/chat/completions"),
        Some(&issued),
        Some(r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#),
    )
    .await;
    assert_eq!(
        call.status, 200,
        "the new key calls the endpoint: {}",
        call.body
    );
    button(&c, "Done").await.click().await.unwrap();
    wait_text(&c, "Create a key").await;
    assert!(
        !c.source().await.unwrap().contains(&issued),
        "the key is shown again"
    );
    click(
        &c,
        "//tr[td[normalize-space()='bob@example.com']]//button[normalize-space()='Rotate']",
    )
    .await;
    fill(
        &c,
        "Grace period in seconds (0: the old key stops now)",
        "0",
    )
    .await;
    button(&c, "Rotate it").await.click().await.unwrap();
    wait_text(&c, "Key rotated").await;
    let rotated = c
        .find(Locator::Id("issued-key"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_ne!(rotated, issued);
    let rotated_id = c
        .find(Locator::Css("main p code"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    button(&c, "Done").await.click().await.unwrap();
    wait_text(&c, "expires").await;
    click(
        &c,
        &format!(
            "//tr[td/code[normalize-space()='{rotated_id}']]//button[normalize-space()='Revoke']"
        ),
    )
    .await;
    wait_text(&c, "Revoked").await;
    for key in [&issued, &rotated] {
        let call = send_json(
            http::Method::POST,
            gw.proxy_url("/chat/completions"),
            Some(key),
            Some("{}"),
        )
        .await;
        assert_eq!(call.status, 401, "a revoked key still works");
    }

    // Usage at a glance: the one call that went through, and its chart.
    nav(&c, "Usage").await;
    wait_text(&c, "Last hour").await;
    let hour = c
        .find(Locator::Css(&format!(
            "section[data-endpoint='{ACCOUNT}/{ENDPOINT}'] dd.hour"
        )))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(hour.starts_with("requests 1 ·"), "{hour}");
    let bars = c
        .find_all(Locator::Css("svg.chart rect.bar"))
        .await
        .unwrap();
    assert_eq!(bars.len(), 60 + 24, "a bar a minute and a bar an hour");
    shot(&c, "10-usage").await;

    // The audit log, newest first.
    nav(&c, "Audit log").await;
    wait_text(&c, "key.revoke").await;
    let first = c
        .find(Locator::Css("main tbody tr td:nth-child(3)"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(first, "key.revoke");
    shot(&c, "11-audit-log").await;

    // A stale edit: someone else saves first; the console says so and shows their version.
    nav(&c, "Endpoints").await;
    wait_text(&c, ACCOUNT).await;
    click(
        &c,
        &format!("//tr[@data-endpoint='{ACCOUNT}/{ENDPOINT}']//a[normalize-space()='Edit']"),
    )
    .await;
    wait_text(&c, "Configure account").await;
    let meanwhile = send_json(
        http::Method::PUT,
        gw.url(&format!("/manage/accounts/{ACCOUNT}/endpoints/{ENDPOINT}")),
        Some(ADMIN),
        Some(&format!(
            r#"{{"base_url": "http://{upstream}/v1", "timeouts": {{"connect_ms": 4321}}, "access": {{"users": ["team:research"]}}}}"#
        )),
    )
    .await;
    assert_eq!(meanwhile.status, 200, "{}", meanwhile.body);
    button(&c, "Next").await.click().await.unwrap();
    button(&c, "Next").await.click().await.unwrap();
    button(&c, "Save changes").await.click().await.unwrap();
    wait_text(&c, "Someone else changed this endpoint").await;
    let connect = input(&c, "Connect").await.prop("value").await.unwrap();
    assert_eq!(
        connect.as_deref(),
        Some("4321"),
        "the current version is shown"
    );
    shot(&c, "12-stale-edit").await;

    // On a phone: nothing wider than the screen.
    c.set_window_size(390, 844).await.unwrap();
    nav(&c, "Endpoints").await;
    wait_text(&c, ACCOUNT).await;
    let fits = c
        .execute(
            "return document.documentElement.scrollWidth <= window.innerWidth + 1",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        fits,
        serde_json::Value::Bool(true),
        "the page scrolls sideways on a phone"
    );
    shot(&c, "13-phone-endpoints").await;
    c.close().await.unwrap();
}
