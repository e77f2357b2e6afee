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

fn is_dot_segment(seg: &str) -> bool {
    let decoded = seg.to_ascii_lowercase().replace("%2e", ".");
    let before_params = decoded.split(';').next().unwrap_or("");
    before_params == "." || before_params == ".."
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4096, ..ProptestConfig::default() })]

    #[test]
    fn the_rewrite_never_leaves_the_base(target in target()) {
        let base = UpstreamBase::parse(BASE).unwrap();
        // Anything that does not parse as a request target never reaches the layer.
        if let Ok(uri) = target.parse::<Uri>() {
            if let Ok(up) = rewrite("/proxy-api", &uri, &base) {
                prop_assert_eq!(up.scheme_str(), Some("https"));
                prop_assert_eq!(up.host(), Some("api.inference.wandb.ai"));
                prop_assert_eq!(up.port_u16(), Some(8443));
                prop_assert!(up.path() == "/v1" || up.path().starts_with("/v1/"), "{}", up);
                prop_assert!(!up.path().split('/').any(is_dot_segment), "{}", up);
                prop_assert!(!up.path().contains("//"), "{}", up);
                let lower = up.path().to_ascii_lowercase();
                prop_assert!(!lower.contains("%2f") && !lower.contains("%5c") && !lower.contains('\\'), "{}", up);
                prop_assert_eq!(up.query(), uri.query());
            }
        }
    }

    #[test]
    fn parsing_raw_paths_never_panics(path in ".*") {
        let _ = parse_proxy_path("/proxy-api", &path);
        let _ = parse_proxy_path("", &path);
    }
}
