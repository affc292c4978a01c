//! EDGE: the REST API (`/api/v1`), health endpoints, the OpenAPI document and
//! Swagger UI. Handlers are thin: decode, call the core, encode, map the
//! error (once, in `problem`).

mod agents;
mod auth;
mod env;
mod jobs;
pub use jobs::accepted;
pub mod problem;
mod repos;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::services::Services;

/// Largest request body accepted, in bytes.
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "Hobotnica",
        description = "CI/CD for repositories whose recipes live in a Makefile: register repositories, run make targets on agents, follow their logs.\n\nAuthenticate with `Authorization: Bearer <token>` (the admin token printed by `hobot up`, or kept in `<data-dir>/admin-token`). Errors are `application/problem+json` (RFC 9457)."
    ),
    modifiers(&SecuritySchemes),
    paths(crate::webhook::receive),
    tags(
        (name = "repos", description = "Registered repositories"),
        (name = "jobs", description = "Jobs: make targets run at a commit"),
        (name = "agents", description = "Build agents and their tokens"),
        (name = "env", description = "Repository variables; secrets are encrypted at rest and write-only"),
        (name = "health", description = "Liveness and readiness"),
        (name = "webhooks", description = "GitHub webhook deliveries (signed with the repository's webhook secret; no token)"),
    )
)]
pub struct ApiDoc;

struct SecuritySchemes;

impl Modify for SecuritySchemes {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "token",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("The admin token"))
                    .build(),
            ),
        );
    }
}

/// The REST router with its OpenAPI document.
pub fn router(services: Services) -> axum::Router {
    let (router, mut api) = api_router().split_for_parts();
    describe_responses(&mut api);
    let webhooks = crate::webhook::router().with_state(services.clone());
    let router = router.with_state(services);
    let api_json = api.clone();
    router
        .route(
            "/api/openapi.json",
            axum::routing::get(move || async move { Json(api_json) }),
        )
        .merge(utoipa_swagger_ui::SwaggerUi::new("/api/docs").url("/api/docs/openapi.json", api))
        // API bodies are small; webhooks set their own (larger) limit.
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .merge(webhooks)
        .fallback(not_found)
        .layer(tower_http::trace::TraceLayer::new_for_http())
}

fn api_router() -> OpenApiRouter<Services> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(repos::router())
        .merge(jobs::router())
        .merge(agents::router())
        .merge(env::router())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// The OpenAPI document (for the committed `openapi/openapi.yaml`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut api = api_router().split_for_parts().1;
    describe_responses(&mut api);
    api
}

/// Gives every response without a description (OpenAPI requires one) the
/// reason phrase of its status.
fn describe_responses(api: &mut utoipa::openapi::OpenApi) {
    for item in api.paths.paths.values_mut() {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            for (status, response) in &mut operation.responses.responses {
                if let utoipa::openapi::RefOr::T(response) = response
                    && response.description.is_empty()
                {
                    response.description = status
                        .parse::<u16>()
                        .ok()
                        .and_then(|code| StatusCode::from_u16(code).ok())
                        .and_then(|code| code.canonical_reason())
                        .unwrap_or("Response")
                        .to_owned();
                }
            }
        }
    }
}

async fn not_found() -> problem::ApiError {
    problem::ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

#[derive(Serialize, ToSchema)]
struct Health {
    status: &'static str,
}

#[utoipa::path(get, path = "/healthz", tag = "health",
    responses((status = 200, description = "The process is alive", body = Health)))]
async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[utoipa::path(get, path = "/readyz", tag = "health",
    responses(
        (status = 200, description = "The store answers", body = Health),
        (status = 503, description = "The store does not answer", body = problem::Problem, content_type = "application/problem+json"),
    ))]
async fn readyz(State(services): State<Services>) -> impl IntoResponse {
    match services.store.ping().await {
        Ok(()) => Json(Health { status: "ready" }).into_response(),
        Err(err) => problem::ApiError::from(err).into_response(),
    }
}
