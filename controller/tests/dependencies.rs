//! The dependency rules of ARCHITECTURE.md, checked over `cargo metadata`:
//! `common` links no other Hobotnica crate, the agent never links the
//! controller and the controller never links the agent.

#![allow(clippy::disallowed_methods)] // runs `cargo metadata`

use std::collections::{BTreeMap, BTreeSet};
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
