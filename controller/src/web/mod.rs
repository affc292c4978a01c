//! EDGE: the web dashboard — server-rendered pages (askama templates in
//! `controller/templates/`, compiled into the binary and HTML-escaped) and
//! their few assets (`controller/assets/`, served from the binary under a
//! content-hashed name). Like `http/`, handlers only translate: a page
//! signs the caller in through `Services::sign_in`, finds the caller of
//! each request through `Services::web_session`, and reads what it shows
//! from the same core functions the REST API calls, with the same
//! authorisation.
//!
//! Every answer carries the headers of [`with_page_headers`]; every
//! state-changing request passes [`session::check_same_origin`] and, once
//! signed in, the session's CSRF token: handlers take the form as
//! [`session::Posted`], which checks both (see `session.rs`).

mod assets;
mod job;
mod jobs;
mod live;
mod pages;
mod repo;
mod session;

use axum::Router;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use tokio_util::sync::CancellationToken;

use crate::error::CoreError;
use crate::services::Services;

/// The dashboard's routes, to be merged into the controller's HTTP router;
/// `shutdown` ends the pages' event streams.
pub fn router(services: Services, shutdown: CancellationToken) -> Router {
    Router::new()
        .route("/", axum::routing::get(pages::home))
        .route(
            "/sign-in",
            axum::routing::get(pages::sign_in_form).post(pages::sign_in),
        )
        .route("/sign-out", axum::routing::post(pages::sign_out))
        .route("/repos", axum::routing::get(pages::repos))
        .route("/repos/{owner}/{name}", axum::routing::get(repo::show))
        .route(
            "/repos/{owner}/{name}/deploy",
            axum::routing::get(repo::confirm).post(repo::deploy),
        )
        .route(
            "/repos/{owner}/{name}/variables",
            axum::routing::post(repo::set_variable),
        )
        .route(
            "/repos/{owner}/{name}/variables/remove",
            axum::routing::post(repo::remove_variable),
        )
        .route("/agents", axum::routing::get(pages::agents))
        .route("/jobs", axum::routing::get(jobs::list))
        .route("/jobs/events", axum::routing::get(jobs::events))
        .route("/jobs/{id}", axum::routing::get(job::show))
        .route("/jobs/{id}/cancel", axum::routing::post(job::cancel))
        .route("/jobs/{id}/retry", axum::routing::post(job::retry))
        .route("/jobs/{id}/log/events", axum::routing::get(live::events))
        .route("/jobs/{id}/log/raw", axum::routing::get(live::raw))
        .route("/assets/{name}", axum::routing::get(assets::serve))
        .with_state(services)
        .layer(axum::Extension(live::Shutdown(shutdown)))
        .layer(axum::middleware::map_response(with_page_headers))
}

/// The content security policy of every page: only the controller's own
/// scripts, styles and images (no inline script or style), no framing, no
/// `<base>`, forms post only here.
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; script-src 'self'; \
     style-src 'self'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; \
     base-uri 'none'; form-action 'self'";

/// The headers every dashboard answer carries. Pages are not cached
/// (`no-store`: they show one user's data); assets set their own caching.
async fn with_page_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    let set = [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "same-origin"),
        (header::X_FRAME_OPTIONS, "DENY"),
    ];
    for (name, value) in set {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers
        .entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

/// Why a page could not be shown; each becomes a page of its own (or, for
/// a request without a valid session, the way to the sign-in page).
#[derive(Debug, thiserror::Error)]
pub enum PageError {
    /// No valid session: sign in first.
    #[error("sign in first")]
    SignInFirst,
    /// A cross-site request, or a form without this session's CSRF token.
    #[error("{0}")]
    Refused(&'static str),
    #[error(transparent)]
    Core(#[from] CoreError),
    /// A template failed to render (a bug).
    #[error("rendering failed: {0}")]
    Render(#[from] askama::Error),
}

impl IntoResponse for PageError {
    fn into_response(self) -> Response {
        let (status, title, message) = match self {
            PageError::SignInFirst | PageError::Core(CoreError::Unauthorized(_)) => {
                return Redirect::to("/sign-in").into_response();
            }
            PageError::Refused(why) => (
                StatusCode::FORBIDDEN,
                "Request refused",
                format!("{why} Nothing was changed. Go back, reload the page and try again."),
            ),
            PageError::Core(err) => core_error_page(err),
            PageError::Render(err) => {
                tracing::error!(error = %err, "a page failed to render");
                internal_error()
            }
        };
        pages::error_page(status, title, &message)
    }
}

/// A core error as a page: the status and a sentence for the user; a 5xx
/// never shows internal error text.
fn core_error_page(err: CoreError) -> (StatusCode, &'static str, String) {
    match err {
        CoreError::NotFound(what) => (
            StatusCode::NOT_FOUND,
            "Not found",
            format!("{what} not found."),
        ),
        CoreError::Forbidden(why) => (StatusCode::FORBIDDEN, "Not allowed", why),
        CoreError::Conflict(why) => (StatusCode::CONFLICT, "Conflict", why),
        CoreError::Gone(why) => (StatusCode::GONE, "Gone", why),
        CoreError::Invalid(why) => (StatusCode::UNPROCESSABLE_ENTITY, "Invalid", why.to_string()),
        err @ (CoreError::RateLimited(_) | CoreError::TooManyFailures { .. }) => (
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests",
            err.to_string(),
        ),
        CoreError::Upstream(why) => (StatusCode::BAD_GATEWAY, "GitHub could not be reached", why),
        CoreError::Unavailable(cause) => {
            tracing::warn!(%cause, "a page could not read the store");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                "Temporarily unavailable",
                "The controller's store is unavailable; try again in a moment.".to_owned(),
            )
        }
        CoreError::Unauthorized(_) => internal_error(),
    }
}

fn internal_error() -> (StatusCode, &'static str, String) {
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "The page could not be shown; see the controller's log.".to_owned(),
    )
}
