//! Fuzzes the proxy path rewrite: for any request target, the upstream URI keeps the base
//! scheme, host, port and path prefix, never holds a dot segment, and nothing panics.
//!
//! ```text
//! cargo install cargo-fuzz
//! cd fuzz && cargo fuzz run rewrite seeds/rewrite      # nightly, or RUSTC_BOOTSTRAP=1
//! ```
//!
//! Interesting inputs go into `seeds/rewrite/`; `tests/rewrite_props.rs` replays every file
//! there in `cargo test`.

#![no_main]

use http::Uri;
use libfuzzer_sys::fuzz_target;
use tower_gateway::registry::UpstreamBase;
use tower_gateway::route::{parse_proxy_path, rewrite};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = parse_proxy_path("/proxy-api", text);
    let _ = parse_proxy_path("", text);
    let Ok(target) = text.parse::<Uri>() else {
        return;
    };
    let base = UpstreamBase::parse("https://api.inference.wandb.ai:8443/v1").unwrap();
    for prefix in ["/proxy-api", ""] {
        if let Ok(up) = rewrite(prefix, &target, &base) {
            assert_eq!(up.scheme_str(), Some("https"));
            assert_eq!(up.host(), Some("api.inference.wandb.ai"));
            assert_eq!(up.port_u16(), Some(8443));
            assert!(up.path() == "/v1" || up.path().starts_with("/v1/"), "{up}");
            for seg in up.path().split('/') {
                let decoded = seg
                    .to_ascii_lowercase()
                    .replace("%2e", ".")
                    .replace("%20", " ");
                let before_params = decoded.split(';').next().unwrap_or("");
                let dot_like = before_params.contains('.')
                    && before_params.chars().all(|c| c == '.' || c == ' ');
                assert!(!dot_like, "dot segment in {up}");
            }
            assert!(!up.path().contains("//"), "{up}");
            assert_eq!(up.query(), target.query());
        }
    }
});
