//! `openapi/openapi.yaml` is the generated copy of the schema the controller
//! serves; this test fails when the two drift apart.
//!
//! Regenerate with:
//! `HOBOTNICA_UPDATE_OPENAPI=1 cargo test -p hobotnica-controller --test openapi`

#![allow(clippy::disallowed_methods)] // a test may read its environment

use std::path::PathBuf;

#[test]
fn committed_openapi_yaml_matches_the_code() -> Result<(), Box<dyn std::error::Error>> {
    let generated = hobotnica_controller::http::openapi().to_yaml()?;
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.yaml");
    if std::env::var_os("HOBOTNICA_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated)?;
        return Ok(());
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "openapi/openapi.yaml is out of date; regenerate it with\n  HOBOTNICA_UPDATE_OPENAPI=1 cargo test -p hobotnica-controller --test openapi"
    );
    Ok(())
}

#[test]
fn every_operation_is_secured_documented_and_has_problem_responses() {
    let api = hobotnica_controller::http::openapi();
    let json = serde_json::to_value(&api).expect("the schema serialises");
    let paths = json["paths"].as_object().expect("paths");
    assert!(paths.len() >= 10, "{} paths", paths.len());
    for (path, item) in paths {
        for (method, operation) in item.as_object().expect("path item") {
            let responses = operation["responses"].as_object().expect("responses");
            assert!(!responses.is_empty(), "{method} {path} has no responses");
            if path.starts_with("/api/v1/") {
                assert!(
                    operation.get("security").is_some(),
                    "{method} {path} declares no security"
                );
                assert!(
                    responses.contains_key("401"),
                    "{method} {path} does not document 401"
                );
            }
        }
    }
}
