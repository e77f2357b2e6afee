//! The one-way rule of the crate's modules, checked on the source: arrows run
//! **model ← layers ← gateway** (DESIGN.md, "Layout").
//!
//! Each top-level module of `src/` belongs to one tier, and a tier may import only the tiers
//! listed for it in [`allowed`]. On top of the tiers: no layer imports another layer, no two
//! top-level modules import each other through any path (no cycle), and no two files of one
//! folder import each other (a folder's `mod.rs` aside). An import is any `crate::NAME` path
//! or `use crate::NAME…` outside comments, strings and test code (`#[cfg(test)]` items and
//! `tests.rs` files): a test may use any layer to drive the one it tests.
//!
//! A failure names the edge, e.g. `src/access/layer.rs imports auth: a layer imports only the
//! model, the extensions, error and leaves`. The checker itself is tested on small sources
//! below, so it cannot pass by finding nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The tier of each top-level module.
fn tier(module: &str) -> Option<Tier> {
    Some(match module {
        "error" | "hop" | "request_id" | "metric" | "tls" | "rfc3339" => Tier::Leaf,
        "model" => Tier::Model,
        "registry" | "ext" => Tier::State,
        "auth" | "route" | "access" | "inject" | "encoding" | "usage" | "trace" | "forward"
        | "limits" | "pool" => Tier::Layer,
        "config" | "store" => Tier::Source,
        "manage" | "console" => Tier::Management,
        "server" => Tier::Server,
        "gateway" => Tier::Assembly,
        _ => return None,
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Tier {
    /// Helpers that import nothing but other leaves: errors, hop-by-hop headers, request-id
    /// and metric names, TLS settings.
    Leaf,
    /// The declarative types and their validation.
    Model,
    /// The compiled snapshot and the request extensions, built from the model.
    State,
    /// The tower layers, telemetry and transport.
    Layer,
    /// Where the model comes from: the TOML file, a store.
    Source,
    /// The management API.
    Management,
    /// The listener.
    Server,
    /// `gateway.rs`, the only module that assembles every layer.
    Assembly,
}

/// What a module of `from` may import, and the sentence a violation is reported with.
fn allowed(from: Tier, to: Tier) -> Result<(), &'static str> {
    use Tier::*;
    let ok = match from {
        Leaf => to == Leaf,
        Model => to == Leaf,
        State => matches!(to, Leaf | Model | State),
        // No layer imports another layer: the edge to a layer is refused below.
        Layer => matches!(to, Leaf | Model | State),
        Source => matches!(to, Leaf | Model | State),
        Management => matches!(to, Leaf | Model | State),
        Server => to == Leaf,
        Assembly => true,
    };
    if ok {
        return Ok(());
    }
    Err(match from {
        Leaf => "a leaf imports only other leaves",
        Model => "the model imports no layer, no transport and no state built from it",
        State => "the snapshot and the extensions import only the model and leaves",
        Layer if to == Layer => "no layer imports another layer",
        Layer => "a layer imports only the model, the extensions, error and leaves",
        Source => "a source of the model imports the model and nothing of the layers",
        Management => "the management API imports the model, the registry and leaves",
        Server => "the server imports only leaves",
        Assembly => unreachable!(),
    })
}

/// Removes comments, string and character literals, and test code, keeping line breaks.
fn code_of(source: &str) -> String {
    let bytes = source.as_bytes();
    let mut out = String::with_capacity(source.len());
    let mut i = 0;
    while i < bytes.len() {
        let rest = &source[i..];
        if rest.starts_with("//") {
            let end = rest.find('\n').unwrap_or(rest.len());
            i += end;
        } else if rest.starts_with("/*") {
            let mut depth = 0;
            let mut j = 0;
            while j < rest.len() {
                if rest[j..].starts_with("/*") {
                    depth += 1;
                    j += 2;
                } else if rest[j..].starts_with("*/") {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    if rest.as_bytes()[j] == b'\n' {
                        out.push('\n');
                    }
                    j += 1;
                }
            }
            i += j;
        } else if let Some(len) = raw_string_len(rest) {
            out.extend(rest[..len].chars().filter(|&c| c == '\n'));
            out.push_str("\"\"");
            i += len;
        } else if rest.starts_with('"') {
            let mut j = 1;
            while j < rest.len() && rest.as_bytes()[j] != b'"' {
                if rest.as_bytes()[j] == b'\\' {
                    j += 1;
                } else if rest.as_bytes()[j] == b'\n' {
                    out.push('\n');
                }
                j += 1;
            }
            out.push_str("\"\"");
            i += j + 1;
        } else if let Some(len) = char_literal_len(rest) {
            out.push_str("' '");
            i += len;
        } else {
            let c = rest.chars().next().expect("not at the end");
            out.push(c);
            i += c.len_utf8();
        }
    }
    without_test_items(&out)
}

/// The length of a raw string literal (`r"…"`, `r#"…"#`, `br"…"`) at the start of `s`.
fn raw_string_len(s: &str) -> Option<usize> {
    let after_r = s.strip_prefix("br").or_else(|| s.strip_prefix('r'))?;
    let hashes = after_r.bytes().take_while(|&b| b == b'#').count();
    let body = after_r[hashes..].strip_prefix('"')?;
    let close = format!("\"{}", "#".repeat(hashes));
    let end = body.find(&close)?;
    Some(s.len() - body.len() + end + close.len())
}

/// The length of a character literal at the start of `s` (`'a'`, `'\n'`, `'\''`), or `None`
/// for a lifetime.
fn char_literal_len(s: &str) -> Option<usize> {
    let body = s.strip_prefix('\'')?;
    if let Some(escaped) = body.strip_prefix('\\') {
        let end = escaped[1..].find('\'')? + 1;
        return Some(2 + end + 1);
    }
    let c = body.chars().next()?;
    body[c.len_utf8()..]
        .starts_with('\'')
        .then(|| 1 + c.len_utf8() + 1)
}

/// Removes every item marked `#[cfg(test)]`: up to its `;`, or its whole `{ … }` block.
fn without_test_items(code: &str) -> String {
    let mut out = String::with_capacity(code.len());
    let mut rest = code;
    while let Some(at) = rest.find("#[cfg(test)]") {
        out.push_str(&rest[..at]);
        let item = &rest[at..];
        let mut depth = 0usize;
        let mut end = item.len();
        for (k, b) in item.bytes().enumerate() {
            match b {
                b'{' => depth += 1,
                b'}' => {
                    depth -= 1;
                    if depth == 0 {
                        end = k + 1;
                        break;
                    }
                }
                b';' if depth == 0 => {
                    end = k + 1;
                    break;
                }
                _ => {}
            }
        }
        out.extend(item[..end].chars().filter(|&c| c == '\n'));
        rest = &item[end..];
    }
    out.push_str(rest);
    out
}

/// The first segment of every `crate::NAME` path in `code`, with its line number.
fn crate_paths(code: &str) -> Vec<(String, usize)> {
    path_heads(code, "crate::")
}

/// The first segment of every `super::NAME` path in `code`, with its line number.
fn super_paths(code: &str) -> Vec<(String, usize)> {
    path_heads(code, "super::")
}

fn path_heads(code: &str, prefix: &str) -> Vec<(String, usize)> {
    let mut found = Vec::new();
    for (n, line) in code.lines().enumerate() {
        let mut rest = line;
        while let Some(at) = rest.find(prefix) {
            let before = rest[..at].chars().next_back();
            let after = &rest[at + prefix.len()..];
            rest = after;
            if before.is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':') {
                continue;
            }
            let names: Vec<&str> = if let Some(group) = after.strip_prefix('{') {
                // `use crate::{a, b::c}`: the first segment of each entry.
                let group = &group[..group.find('}').unwrap_or(group.len())];
                group
                    .split(',')
                    .filter_map(|e| e.trim().split("::").next())
                    .collect()
            } else {
                vec![
                    after
                        .split(|c: char| !(c.is_alphanumeric() || c == '_'))
                        .next()
                        .unwrap_or(""),
                ]
            };
            for name in names {
                if !name.is_empty() {
                    found.push((name.to_owned(), n + 1));
                }
            }
        }
    }
    found
}

/// A source file: its path relative to the crate, its top-level module (`None` for `lib.rs`)
/// and, inside a folder, its own name (`None` for `mod.rs`).
struct File {
    path: String,
    top: Option<String>,
    sibling: Option<String>,
    code: String,
}

fn files(src: &Path) -> Vec<File> {
    let mut paths = Vec::new();
    collect(src, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            let rel = path.strip_prefix(src).expect("under src").to_owned();
            let parts: Vec<String> = rel
                .iter()
                .map(|p| p.to_string_lossy().trim_end_matches(".rs").to_owned())
                .collect();
            // A folder's test files hold test code only.
            if parts.last().is_some_and(|p| p == "tests") {
                return None;
            }
            let (top, sibling) = match parts.as_slice() {
                [lib] if lib == "lib" => (None, None),
                [one] => (Some(one.clone()), None),
                [dir, file] if file == "mod" => (Some(dir.clone()), None),
                [dir, file] => (Some(dir.clone()), Some(file.clone())),
                // Deeper files are parts of their folder's files.
                [dir, file, ..] => (Some(dir.clone()), Some(file.clone())),
                [] => return None,
            };
            let text = std::fs::read_to_string(&path).expect("readable source");
            Some(File {
                path: format!("src/{}", rel.display()),
                top,
                sibling,
                code: code_of(&text),
            })
        })
        .collect()
}

fn collect(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("readable src") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            collect(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// Every violation of the rule in `files`, one sentence each.
fn violations(files: &[File]) -> Vec<String> {
    let tops: BTreeSet<&str> = files.iter().filter_map(|f| f.top.as_deref()).collect();
    let mut problems = Vec::new();
    let mut graph: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for file in files {
        let Some(from) = file.top.as_deref() else {
            continue;
        };
        let Some(from_tier) = tier(from) else {
            problems.push(format!(
                "{}: module `{from}` has no tier; add it to `tier` in tests/architecture.rs",
                file.path
            ));
            continue;
        };
        for (to, line) in crate_paths(&file.code) {
            if to == from || !tops.contains(to.as_str()) {
                continue;
            }
            let to = *tops.get(to.as_str()).expect("a module");
            graph.entry(from).or_default().insert(to);
            let Some(to_tier) = tier(to) else { continue };
            if let Err(why) = allowed(from_tier, to_tier) {
                problems.push(format!("{}:{line} imports {to}: {why}", file.path));
            }
        }
    }
    for cycle in cycles(&graph) {
        problems.push(format!("import cycle: {}", cycle.join(" → ")));
    }
    // Within a folder: sibling files never import each other both ways, through any path.
    let mut folders: BTreeMap<&str, BTreeMap<&str, BTreeSet<&str>>> = BTreeMap::new();
    for file in files {
        let (Some(top), Some(me)) = (file.top.as_deref(), file.sibling.as_deref()) else {
            continue;
        };
        let siblings: BTreeSet<&str> = files
            .iter()
            .filter(|f| f.top.as_deref() == Some(top))
            .filter_map(|f| f.sibling.as_deref())
            .collect();
        let mut targets: Vec<String> = super_paths(&file.code)
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        let own = format!("crate::{top}::");
        targets.extend(path_heads(&file.code, &own).into_iter().map(|(n, _)| n));
        let edges = folders.entry(top).or_default().entry(me).or_default();
        for t in targets {
            if let Some(&t) = siblings.get(t.as_str())
                && t != me
            {
                edges.insert(t);
            }
        }
    }
    for (top, graph) in &folders {
        for cycle in cycles(graph) {
            problems.push(format!(
                "import cycle inside src/{top}/: {}",
                cycle.join(" → ")
            ));
        }
    }
    problems
}

/// The cycles of a graph, one per strongly connected component with more than one node, each
/// as a path that starts and ends at the same node.
fn cycles<'a>(graph: &BTreeMap<&'a str, BTreeSet<&'a str>>) -> Vec<Vec<&'a str>> {
    let nodes: BTreeSet<&str> = graph
        .iter()
        .flat_map(|(k, v)| std::iter::once(*k).chain(v.iter().copied()))
        .collect();
    let reach = |from: &'a str| -> BTreeMap<&'a str, &'a str> {
        // Breadth-first, remembering the parent of each node reached.
        let mut parent = BTreeMap::new();
        let mut queue = std::collections::VecDeque::from([from]);
        while let Some(n) = queue.pop_front() {
            for &m in graph.get(n).into_iter().flatten() {
                if let std::collections::btree_map::Entry::Vacant(v) = parent.entry(m) {
                    v.insert(n);
                    queue.push_back(m);
                }
            }
        }
        parent
    };
    let mut seen = BTreeSet::new();
    let mut found = Vec::new();
    for &n in &nodes {
        if seen.contains(n) {
            continue;
        }
        let parent = reach(n);
        if !parent.contains_key(n) {
            continue;
        }
        // Walk back from n to n through the parents: one cycle through n.
        let mut cycle = vec![n];
        let mut cur = parent[n];
        while cur != n {
            cycle.push(cur);
            cur = parent[cur];
        }
        cycle.push(n);
        cycle.reverse();
        seen.extend(cycle.iter().copied());
        found.push(cycle);
    }
    found
}

#[test]
fn modules_import_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let files = files(&src);
    assert!(
        files.len() > 20,
        "found only {} files under src/",
        files.len()
    );
    let problems = violations(&files);
    assert!(
        problems.is_empty(),
        "the one-way rule (model ← layers ← gateway) is broken:\n  {}",
        problems.join("\n  ")
    );
}

// The checker, on small sources: each rule fails when broken.

fn file(path: &str, source: &str) -> File {
    let parts: Vec<&str> = path.trim_end_matches(".rs").split('/').collect();
    let (top, sibling) = match parts.as_slice() {
        [one] => (Some(one.to_string()), None),
        [dir, "mod"] => (Some(dir.to_string()), None),
        [dir, file] => (Some(dir.to_string()), Some(file.to_string())),
        _ => unreachable!(),
    };
    File {
        path: format!("src/{path}"),
        top,
        sibling,
        code: code_of(source),
    }
}

#[test]
fn a_layer_importing_a_layer_is_named() {
    let files = [
        file("auth/mod.rs", "pub struct GatewayAuth;"),
        file(
            "access/layer.rs",
            "use std::fmt;\nuse crate::auth::GatewayAuth;\n",
        ),
    ];
    assert_eq!(
        violations(&files),
        ["src/access/layer.rs:2 imports auth: no layer imports another layer"]
    );
}

#[test]
fn the_model_importing_a_layer_or_transport_is_named() {
    let files = [
        file("forward/mod.rs", ""),
        file("inject.rs", ""),
        file(
            "model/account.rs",
            "fn f() { let _ = crate::forward::x(); }\nuse crate::{inject::T, hop};",
        ),
        file("hop.rs", ""),
    ];
    let problems = violations(&files);
    assert_eq!(problems.len(), 2, "{problems:?}");
    assert!(problems[0].starts_with("src/model/account.rs:1 imports forward: the model"));
    assert!(problems[1].starts_with("src/model/account.rs:2 imports inject: the model"));
}

#[test]
fn comments_strings_and_test_code_are_not_imports() {
    let source = r##"
        //! See [`crate::auth::Principal`].
        /// Like [`crate::route::RouteMatch`].
        /* crate::forward::Forward */
        const S: &str = "crate::forward::Forward";
        const R: &str = r#"use crate::auth::X;"#;
        const C: char = '"';
        fn f<'a>(x: &'a str) -> &'a str { x }
        #[cfg(test)]
        mod tests {
            use crate::auth::HashedKeyStore;
            fn g() { crate::route::x(); }
        }
        #[cfg(test)]
        fn helper() { crate::forward::y() }
        use crate::error::GatewayError;
    "##;
    let code = code_of(source);
    let heads: Vec<String> = crate_paths(&code).into_iter().map(|(n, _)| n).collect();
    assert_eq!(heads, ["error"], "{code}");
}

#[test]
fn cycles_are_named_between_modules_and_between_sibling_files() {
    let files = [
        file("registry.rs", "use crate::model::AccountSpec;"),
        file("ext.rs", "use crate::registry::Endpoint;"),
        file("model/grants.rs", "use crate::ext::Principal;"),
        file("forward/pool.rs", "use super::body::UpstreamBody;"),
        file("forward/body.rs", "use crate::forward::pool::H1Conn;"),
        file(
            "forward/mod.rs",
            "mod body; mod pool; pub use self::body::X;",
        ),
    ];
    let problems = violations(&files);
    assert!(
        problems.contains(&"src/model/grants.rs:1 imports ext: the model imports no layer, no transport and no state built from it".to_owned()),
        "{problems:?}"
    );
    assert!(
        problems.iter().any(|p| p.starts_with("import cycle: ")
            && ["ext", "model", "registry"].iter().all(|m| p.contains(m))),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.starts_with("import cycle inside src/forward/: ")
                && p.contains("body")
                && p.contains("pool")),
        "{problems:?}"
    );
}
