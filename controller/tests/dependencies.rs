//! The dependency rules of ARCHITECTURE.md: over `cargo metadata`, `common`
//! links no other Hobotnica crate, the agent never links the controller and
//! the controller never links the agent; over the sources, the controller's
//! edges (`http/`, `grpc/`, `web/`, `webhook.rs`, `metrics.rs`) never name the store — they call
//! the core, and the core calls the store.

#![allow(clippy::disallowed_methods)] // runs `cargo metadata`

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Every workspace crate's Hobotnica dependencies, transitively.
fn hobotnica_closure() -> BTreeMap<String, BTreeSet<String>> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let output = Command::new(cargo)
        // The workspace's own manifests are enough: no registry access needed.
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--offline",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo metadata runs");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let metadata: serde_json::Value =
        serde_json::from_slice(&output.stdout).expect("cargo metadata prints JSON");
    let mut direct: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for package in metadata["packages"].as_array().expect("packages") {
        let name = package["name"].as_str().expect("name").to_owned();
        if !(name.starts_with("hobotnica") || name == "hobot") {
            continue;
        }
        let deps = package["dependencies"]
            .as_array()
            .expect("dependencies")
            .iter()
            // Normal dependencies only: tests may link anything.
            .filter(|d| d["kind"].is_null())
            .filter_map(|d| d["name"].as_str())
            .filter(|d| d.starts_with("hobotnica"))
            .map(str::to_owned)
            .collect();
        direct.insert(name, deps);
    }
    let mut closure = BTreeMap::new();
    for name in direct.keys() {
        let mut seen = BTreeSet::new();
        let mut todo = vec![name.clone()];
        while let Some(next) = todo.pop() {
            for dep in direct.get(&next).into_iter().flatten() {
                if seen.insert(dep.clone()) {
                    todo.push(dep.clone());
                }
            }
        }
        closure.insert(name.clone(), seen);
    }
    closure
}

#[test]
fn crates_depend_only_in_the_allowed_direction() {
    let closure = hobotnica_closure();
    let deps = |name: &str| closure.get(name).cloned().unwrap_or_default();
    assert!(
        deps("hobotnica-common").is_empty(),
        "common links {:?}",
        deps("hobotnica-common")
    );
    assert!(
        !deps("hobotnica-agent").contains("hobotnica-controller"),
        "the agent must not link the controller"
    );
    assert!(
        !deps("hobotnica-controller").contains("hobotnica-agent"),
        "the controller must not link the agent"
    );
    assert!(
        deps("hobot").contains("hobotnica-controller") && deps("hobot").contains("hobotnica-agent")
    );
}

/// The controller's edge modules: `src/http/**`, `src/grpc/**`,
/// `src/web/**`, `src/webhook.rs`, `src/metrics.rs` (`/metrics`).
fn edge_files(src: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}", dir.display()))
            .map(|entry| entry.expect("a directory entry").path())
            .collect();
        entries.sort();
        for path in entries {
            if path.is_dir() {
                walk(&path, out);
            } else if path.extension().is_some_and(|ext| ext == "rs") {
                out.push(path);
            }
        }
    }
    let mut files = Vec::new();
    walk(&src.join("http"), &mut files);
    walk(&src.join("grpc"), &mut files);
    walk(&src.join("web"), &mut files);
    files.push(src.join("webhook.rs"));
    files.push(src.join("metrics.rs"));
    files
}

/// Where a line of code names the store: a path through `store::`, the
/// `Store` trait or its types (`StoreError`, ...), or the `store` field of
/// `Services` (`.store.`, or `.store` ending a line of a split chain).
/// Comments do not count.
fn names_the_store(line: &str) -> bool {
    let code = line.split("//").next().unwrap_or("");
    code.contains("store::")
        || code.contains("Store")
        || code.contains(".store.")
        || code.trim_end().ends_with(".store")
}

/// Where a line of code decides who may do what (the core's job: core
/// functions take the caller and check access themselves): an access
/// check, the admin rule, or the admin token.
fn decides_access(line: &str) -> bool {
    let code = line.split("//").next().unwrap_or("");
    [
        "require_access",
        "require_job_access",
        "require_admin",
        "admin_token_hash",
        "Caller::Admin",
        "Caller::GitHub",
    ]
    .iter()
    .any(|rule| code.contains(rule))
}

/// The edge lines for which `offends` holds, as `file:line: code`.
fn edge_lines(offends: fn(&str) -> bool) -> Vec<String> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut offences = Vec::new();
    for file in edge_files(&src) {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|err| panic!("cannot read {}: {err}", file.display()));
        let relative = file
            .strip_prefix(env!("CARGO_MANIFEST_DIR"))
            .unwrap_or(&file);
        for (number, line) in text.lines().enumerate() {
            if offends(line) {
                offences.push(format!(
                    "{}:{}: {}",
                    relative.display(),
                    number + 1,
                    line.trim()
                ));
            }
        }
    }
    offences
}

#[test]
fn edges_never_name_the_store() {
    let offences = edge_lines(names_the_store);
    assert!(
        offences.is_empty(),
        "edges call the core, never the store (move the call into a core module: agents, jobs, repos, variables, secrets, deliveries, logs, auth):\n{}",
        offences.join("\n")
    );
}

#[test]
fn edges_never_decide_access() {
    let offences = edge_lines(decides_access);
    assert!(
        offences.is_empty(),
        "edges pass the caller to the core, which checks access (crate::auth):\n{}",
        offences.join("\n")
    );
}

#[test]
fn the_access_check_sees_every_form() {
    for named in [
        "    services.require_access(&caller, &repo, Access::Push).await?;",
        "    if !matches!(caller, Caller::Admin) {",
        "        hash_token(token).as_bytes() == services.admin_token_hash.as_bytes()",
    ] {
        assert!(decides_access(named), "{named}");
    }
    for clean in [
        "//! the admin token (`Caller::Admin`)",
        "    let job = services.job_for(&caller, id, Access::Read).await?;",
    ] {
        assert!(!decides_access(clean), "{clean}");
    }
}

#[test]
fn the_store_check_sees_every_form() {
    for named in [
        "use crate::store::JobFilter;",
        "    let x = services.store.get_job(id).await?;",
        "            .store",
        "fn status(err: StoreError) -> Status {",
        "    let store: Arc<dyn Store> = todo!();",
    ] {
        assert!(names_the_store(named), "{named}");
    }
    for clean in [
        "// the store answers",
        "    let length = services.log_length(job.id).await?; // not the store::",
        "    restore(x);",
        "    let stored = 1;",
    ] {
        assert!(!names_the_store(clean), "{clean}");
    }
}
