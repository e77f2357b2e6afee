//! Property tests on the rewrite: for any request target, the upstream URI keeps the base
//! scheme, host, port and path prefix, never holds a dot segment, and nothing panics.

use http::Uri;
use proptest::prelude::*;
use tower_gateway::registry::UpstreamBase;
use tower_gateway::route::{parse_proxy_path, rewrite};

const BASE: &str = "https://api.inference.wandb.ai:8443/v1";

/// Pieces that path attacks are made of, mixed with ordinary characters.
fn piece() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("..".to_owned()),
        Just(".".to_owned()),
        Just("%2e".to_owned()),
        Just("%2E".to_owned()),
        Just("%2f".to_owned()),
        Just("%2F".to_owned()),
        Just("%5c".to_owned()),
        Just("\\".to_owned()),
        Just("/".to_owned()),
        Just("//".to_owned()),
        Just("@".to_owned()),
        Just("?".to_owned()),
        Just("#".to_owned()),
        Just("%00".to_owned()),
        Just("%252e".to_owned()),
        Just(";".to_owned()),
        Just("\t".to_owned()),
        Just("\n".to_owned()),
        Just("%".to_owned()),
        Just("%20".to_owned()),
        Just(" ".to_owned()),
        Just("%c0%ae".to_owned()),
        Just("http://evil.example".to_owned()),
        Just("cw".to_owned()),
        Just("inference".to_owned()),
        "[a-zA-Z0-9._~-]{1,8}",
        any::<char>().prop_map(|c| c.to_string()),
    ]
}

fn target() -> impl Strategy<Value = String> {
    (prop::collection::vec(piece(), 0..12), any::<bool>()).prop_map(|(pieces, rooted)| {
        let body = pieces.concat();
        if rooted {
            format!("/proxy-api/{body}")
        } else {
            body
        }
    })
}

/// `.`, `..` and their look-alikes (`...`, `.. `), plain or percent-encoded, before `;params`.
fn is_dot_segment(seg: &str) -> bool {
    let decoded = seg
        .to_ascii_lowercase()
        .replace("%2e", ".")
        .replace("%20", " ");
    let before_params = decoded.split(';').next().unwrap_or("");
    before_params.contains('.') && before_params.chars().all(|c| c == '.' || c == ' ')
}

/// The invariants, for one request target; `Err` says which broke.
fn check(target: &str) -> Result<(), String> {
    let _ = parse_proxy_path("/proxy-api", target);
    let _ = parse_proxy_path("", target);
    let Ok(uri) = target.parse::<Uri>() else {
        return Ok(());
    };
    let base = UpstreamBase::parse(BASE).unwrap();
    for prefix in ["/proxy-api", ""] {
        if let Ok(up) = rewrite(prefix, &uri, &base) {
            let path = up.path();
            let lower = path.to_ascii_lowercase();
            let ok = up.scheme_str() == Some("https")
                && up.host() == Some("api.inference.wandb.ai")
                && up.port_u16() == Some(8443)
                && (path == "/v1" || path.starts_with("/v1/"))
                && !path.split('/').any(is_dot_segment)
                && !path.contains("//")
                && !lower.contains("%2f")
                && !lower.contains("%5c")
                && !lower.contains('\\')
                && up.query() == uri.query();
            if !ok {
                return Err(format!("{target:?} became {up}"));
            }
        }
    }
    Ok(())
}

/// The fuzzing corpus's interesting cases (`fuzz/seeds/rewrite`, seeded with `.. %2e %2E %2f
/// %5c \ // @ ? # %00 %252e ; \t \n` and absolute-form targets), replayed on every test run.
#[test]
fn the_fuzzing_corpus_stays_safe() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds/rewrite");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let bytes = std::fs::read(entry.unwrap().path()).unwrap();
        if let Ok(text) = std::str::from_utf8(&bytes) {
            check(text).unwrap();
            n += 1;
        }
    }
    assert!(n >= 20, "the corpus in {} has {n} cases", dir.display());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn the_rewrite_never_leaves_the_base(target in target()) {
        // Anything that does not parse as a request target never reaches the layer.
        if let Err(broken) = check(&target) {
            prop_assert!(false, "{}", broken);
        }
    }

    #[test]
    fn parsing_raw_paths_never_panics(path in ".*") {
        let _ = parse_proxy_path("/proxy-api", &path);
        let _ = parse_proxy_path("", &path);
    }
}
