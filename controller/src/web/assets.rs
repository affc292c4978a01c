//! The dashboard's CSS and JavaScript, compiled into the binary and served
//! as `/assets/<name>.<hash>.<ext>`: the name changes with the content, so
//! browsers may keep a file for a year (`immutable`) and never see a stale
//! one after an upgrade.

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

/// One file served under its content-hashed name.
pub struct Asset {
    /// `/assets/app.<hash>.css`
    pub url: String,
    content_type: &'static str,
    bytes: &'static [u8],
}

impl Asset {
    fn new(stem: &str, extension: &str, content_type: &'static str, bytes: &'static [u8]) -> Asset {
        let hash = hex::encode(Sha256::digest(bytes));
        Asset {
            url: format!("/assets/{stem}.{}.{extension}", &hash[..16]),
            content_type,
            bytes,
        }
    }
}

pub static STYLESHEET: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "app",
        "css",
        "text/css; charset=utf-8",
        include_bytes!("../../assets/app.css"),
    )
});

pub static SCRIPT: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "app",
        "js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/app.js"),
    )
});

pub static LOG_SCRIPT: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "log",
        "js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/log.js"),
    )
});

pub static JOBS_SCRIPT: LazyLock<Asset> = LazyLock::new(|| {
    Asset::new(
        "jobs",
        "js",
        "text/javascript; charset=utf-8",
        include_bytes!("../../assets/jobs.js"),
    )
});

/// `GET /assets/{name}`.
pub async fn serve(Path(name): Path<String>) -> Response {
    let path = format!("/assets/{name}");
    let Some(asset) = [&*STYLESHEET, &*SCRIPT, &*LOG_SCRIPT, &*JOBS_SCRIPT]
        .into_iter()
        .find(|asset| asset.url == path)
    else {
        return (StatusCode::NOT_FOUND, "no such asset").into_response();
    };
    (
        [
            (
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            ),
            (
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=31536000, immutable"),
            ),
        ],
        asset.bytes,
    )
        .into_response()
}
