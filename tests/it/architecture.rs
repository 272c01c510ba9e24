//! The dependency rules of ARCHITECTURE.md, checked on the source: the gateway's top-level
//! modules form no cycle, the domain never names a transport, only `http/` knows axum, the job
//! state machine names no job kind, and the user commands (`cli/`) are only a client of the
//! HTTP API. Reads `src/` as text; needs no service.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Modules that hold the domain: they take a connection and values, and reach transports only
/// through interfaces they define.
const DOMAIN: &[&str] = &[
    "accounts",
    "epochs",
    "files",
    "jobs",
    "kinds",
    "ledger",
    "nodes",
    "registry",
    "retention",
    "transfers",
];
/// Adapters and the edge: what the domain must never reach into.
const OUTSIDE_DOMAIN: &[&str] = &[
    "broker", "cli", "events", "http", "presence", "startup", "up", "verify", "webhooks",
];
/// Crates and types that are transports.
const TRANSPORTS: &[&str] = &["axum", "redis", "rumqttc", "AppState", "reqwest"];

struct SourceFile {
    path: PathBuf,
    /// `jobs` for `src/jobs/dispatch.rs`, `epochs` for `src/epochs.rs`.
    module: String,
    /// The file without comment lines and schema examples.
    code: String,
}

fn sources() -> Vec<SourceFile> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src/ is readable") {
            let path = entry.expect("a directory entry").path();
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut paths = Vec::new();
    walk(&root, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .filter_map(|path| {
            let relative = path.strip_prefix(&root).expect("under src/");
            let first = relative.components().next()?.as_os_str().to_str()?;
            let module = first.trim_end_matches(".rs").to_string();
            if module == "lib" || module == "main" {
                return None;
            }
            let text = std::fs::read_to_string(&path).expect("a source file is readable");
            // Comments and OpenAPI examples are documentation, not dependencies.
            let code = text
                .lines()
                .filter(|l| {
                    let l = l.trim_start();
                    !l.starts_with("//") && !l.starts_with("#[schema(")
                })
                .collect::<Vec<_>>()
                .join("\n");
            Some(SourceFile { path, module, code })
        })
        .collect()
}

/// The files of each of `modules`: a rule that scanned none of a module's files (renamed, moved,
/// or its code filtered away) would pass whatever that module does, so each must have some.
fn scanned<'a>(files: &'a [SourceFile], modules: &[&str]) -> Vec<&'a SourceFile> {
    for module in modules {
        let code: usize = files
            .iter()
            .filter(|f| f.module == *module)
            .map(|f| f.code.trim().len())
            .sum();
        assert!(code > 0, "no code of module {module} found under src/");
    }
    files
        .iter()
        .filter(|f| modules.contains(&f.module.as_str()))
        .collect()
}

/// The top-level modules `code` names through `crate::…` paths (`use crate::{a, b::c}` too).
fn crate_references(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            // The group up to its closing brace, split at its top-level commas.
            let mut depth = 0;
            let mut parts = vec![String::new()];
            for c in group.chars() {
                match c {
                    '}' if depth == 0 => break,
                    ',' if depth == 0 => parts.push(String::new()),
                    '{' => depth += 1,
                    '}' => depth -= 1,
                    _ => {}
                }
                if depth > 0 || !matches!(c, ',' | '{') {
                    parts.last_mut().expect("one part at least").push(c);
                }
            }
            for part in parts {
                let name: String = part
                    .trim_start()
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if !name.is_empty() {
                    found.insert(name);
                }
            }
        } else {
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// Whether `code` names `word` as a whole identifier.
fn names(code: &str, word: &str) -> bool {
    code.match_indices(word).any(|(at, _)| {
        let before = code[..at].chars().next_back();
        let after = code[at + word.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !ident(before) && !ident(after)
    })
}

fn module_graph(files: &[SourceFile]) -> BTreeMap<String, BTreeSet<String>> {
    let modules: BTreeSet<&str> = files.iter().map(|f| f.module.as_str()).collect();
    let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for file in files {
        let edges = graph.entry(file.module.clone()).or_default();
        for target in crate_references(&file.code) {
            if target != file.module && modules.contains(target.as_str()) {
                edges.insert(target);
            }
        }
    }
    graph
}

/// A cycle in `graph`, as the path that closes it, if there is one.
fn find_cycle(graph: &BTreeMap<String, BTreeSet<String>>) -> Option<Vec<String>> {
    fn visit(
        node: &str,
        graph: &BTreeMap<String, BTreeSet<String>>,
        done: &mut BTreeSet<String>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        if let Some(start) = path.iter().position(|n| n == node) {
            let mut cycle = path[start..].to_vec();
            cycle.push(node.to_string());
            return Some(cycle);
        }
        if done.contains(node) {
            return None;
        }
        path.push(node.to_string());
        for next in graph.get(node).into_iter().flatten() {
            if let Some(cycle) = visit(next, graph, done, path) {
                return Some(cycle);
            }
        }
        path.pop();
        done.insert(node.to_string());
        None
    }
    let mut done = BTreeSet::new();
    graph
        .keys()
        .find_map(|node| visit(node, graph, &mut done, &mut Vec::new()))
}

#[test]
fn the_module_graph_has_no_cycle() {
    let graph = module_graph(&sources());
    assert!(graph.len() > 15, "the walk found the modules: {graph:?}");
    if let Some(cycle) = find_cycle(&graph) {
        panic!(
            "modules depend on each other in a cycle: {}",
            cycle.join(" → ")
        );
    }
}

#[test]
fn the_domain_names_no_transport_and_no_adapter() {
    let files = sources();
    let domain = scanned(&files, DOMAIN);
    // Adapters do use transports and the domain: the rule would see them if the domain did.
    let adapters = scanned(&files, &["broker", "http", "presence"]);
    for word in ["redis", "rumqttc", "axum"] {
        assert!(
            adapters.iter().any(|f| names(&f.code, word)),
            "no adapter names {word}: the check cannot see it"
        );
    }
    let mut broken = Vec::new();
    for file in domain {
        for word in TRANSPORTS {
            if names(&file.code, word) {
                broken.push(format!("{} names {word}", file.path.display()));
            }
        }
        for target in crate_references(&file.code) {
            if OUTSIDE_DOMAIN.contains(&target.as_str()) {
                broken.push(format!("{} uses crate::{target}", file.path.display()));
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

#[test]
fn only_http_knows_axum() {
    let files = sources();
    let http = scanned(&files, &["http"]);
    assert!(
        http.iter().any(|f| names(&f.code, "axum")),
        "src/http/ names no axum: the check cannot see it"
    );
    let others = files.iter().filter(|f| f.module != "http");
    assert!(
        others.clone().count() > 15,
        "the walk found the other modules"
    );
    let broken: Vec<String> = others
        .filter(|f| names(&f.code, "axum"))
        .map(|f| f.path.display().to_string())
        .collect();
    assert!(broken.is_empty(), "axum outside src/http/: {broken:#?}");
}

#[test]
fn the_job_state_machine_names_no_kind() {
    let files = sources();
    let jobs = scanned(&files, &["jobs"]);
    assert!(jobs.len() >= 5, "the state machine's files: {}", jobs.len());
    // The words are there to find where kinds live.
    assert!(scanned(&files, &["kinds"])
        .iter()
        .any(|f| f.code.to_lowercase().contains("forecast")));
    let mut broken = Vec::new();
    for file in jobs {
        let lower = file.code.to_lowercase();
        for word in ["forecast", "anonymize", "video", "kinds::"] {
            if lower.contains(word) {
                broken.push(format!("{} names {word:?}", file.path.display()));
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

#[test]
fn the_cli_is_only_a_client_of_the_api() {
    let files = sources();
    let cli = scanned(&files, &["cli"]);
    assert!(
        cli.iter().any(|f| names(&f.code, "reqwest")),
        "src/cli/ names no reqwest: the check does not see its files"
    );
    let mut broken = Vec::new();
    for file in cli {
        for target in crate_references(&file.code) {
            if target != "cli" {
                broken.push(format!("{} uses crate::{target}", file.path.display()));
            }
        }
        // `super::super::…` from a file under `src/cli/` would be the crate's root.
        if file.code.contains("super::super") {
            broken.push(format!(
                "{} climbs out with super::super",
                file.path.display()
            ));
        }
        for word in ["sqlx", "axum", "redis", "rumqttc", "AppState"] {
            if names(&file.code, word) {
                broken.push(format!("{} names {word}", file.path.display()));
            }
        }
    }
    assert!(broken.is_empty(), "{broken:#?}");
}

#[test]
fn the_checks_see_what_they_look_for() {
    let refs = crate_references("use crate::{accounts, ledger::{self, Posting}};\ncrate::jobs::x");
    let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
    assert_eq!(refs, ["accounts", "jobs", "ledger"]);
    assert!(names("let x: redis::Cmd;", "redis"));
    assert!(!names("let redis_prefix = 1;", "redis"));
    let cyclic: BTreeMap<String, BTreeSet<String>> = [
        ("a".to_string(), BTreeSet::from(["b".to_string()])),
        ("b".to_string(), BTreeSet::from(["a".to_string()])),
    ]
    .into();
    assert_eq!(find_cycle(&cyclic).unwrap(), ["a", "b", "a"]);
}
