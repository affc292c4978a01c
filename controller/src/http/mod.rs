//! EDGE: the REST API (`/api/v1`), health endpoints, the OpenAPI document and
//! Swagger UI. Handlers are thin: decode, call the core, encode, map the
//! error (once, in `problem`).

mod admin;
mod agents;
mod auth;
mod env;
mod jobs;
mod notifications;
pub use jobs::accepted;
pub mod problem;
mod repos;
pub mod request_id;
mod schemas;
pub mod server;

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::IntoResponse;
use serde::Serialize;
use tokio_util::task::TaskTracker;
use utoipa::openapi::security::{ApiKey, ApiKeyValue, Http, HttpAuthScheme, SecurityScheme};
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
        description = "CI/CD for repositories whose recipes live in a Makefile: register repositories, run make targets on agents, follow their logs.\n\nAuthenticate with `Authorization: Bearer <token>` (the admin token printed by `hobot up`, or kept in `<data-dir>/admin-token`). Errors are `application/problem+json` (RFC 9457).\n\nEvery answer carries an `X-Request-Id` header: the request's own when it is well-formed (1 to 128 of `[A-Za-z0-9._:-]`), else one the controller made. A problem document repeats it as `request_id`, and every line the controller logs about the request carries it: quote it when reporting a problem."
    ),
    modifiers(&SecuritySchemes),
    paths(crate::webhook::receive),
    components(schemas(
        schemas::Owner,
        schemas::RepoName,
        schemas::FullRepoName,
        schemas::EnvName,
        schemas::JobId,
        schemas::PageSize,
        schemas::Cursor,
        schemas::IdempotencyKey,
    )),
    tags(
        (name = "repos", description = "Registered repositories"),
        (name = "jobs", description = "Jobs: make targets run at a commit"),
        (name = "agents", description = "Build agents and their tokens"),
        (name = "env", description = "Repository variables; secrets are encrypted at rest and write-only"),
        (name = "notifications", description = "Where finished jobs are told about (Slack-compatible or signed JSON webhooks); URLs and secrets are encrypted at rest and write-only"),
        (name = "admin", description = "The whole installation: a snapshot of the store (admin token only)"),
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
                    .description(Some(
                        "The admin token: printed by `hobot up` and kept in `<data-dir>/admin-token` (or the controller's `--admin-token`). It may do everything.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "github_token",
            SecurityScheme::Http(
                Http::builder()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "A GitHub user's token (a personal access token, or an OAuth or GitHub App user token), sent with `X-GitHub-Username`. The caller may read what the token can read on GitHub and run jobs where it can push; the answers are cached for 60 seconds.",
                    ))
                    .build(),
            ),
        );
        components.add_security_scheme(
            "github_login",
            SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::with_description(
                "X-GitHub-Username",
                "The GitHub login the bearer token belongs to (`github_token`).",
            ))),
        );
    }
}

/// The REST router with its OpenAPI document, and `pages` (the web
/// dashboard's routes, which set their own stricter headers). Changes run
/// on `requests` (see `shield`), which the graceful stop waits for.
pub fn router(services: Services, requests: TaskTracker, pages: axum::Router) -> axum::Router {
    let tls = services.config.tls_enabled();
    let metrics = services.metrics.clone();
    let (router, mut api) = api_router().split_for_parts();
    finish_document(&mut api);
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
        .merge(pages)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::middleware::from_fn_with_state(requests, shield))
        .layer(axum::middleware::from_fn_with_state(metrics, timed))
        .layer(axum::middleware::map_response(
            move |response: axum::response::Response| async move {
                with_security_headers(response, tls)
            },
        ))
        .layer(axum::middleware::from_fn(request_id::with_request_id))
}

/// The headers every answer carries, API and pages alike: no framing
/// (clickjacking), no MIME sniffing, no referrer, a content security policy
/// that allows only the controller's own scripts and styles (what the API
/// docs page needs), and over TLS, HSTS. A header the answer already has
/// (the dashboard's pages set a stricter policy) is kept.
fn with_security_headers(
    mut response: axum::response::Response,
    tls: bool,
) -> axum::response::Response {
    let headers = response.headers_mut();
    let set = [
        (
            header::CONTENT_SECURITY_POLICY,
            "default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; \
             object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    for (name, value) in set {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    if tls {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
    response
}

/// Times each request until its answer's head, by route template (never
/// the raw path: ids and names would make a series each).
async fn timed(
    State(metrics): State<std::sync::Arc<crate::metrics::Metrics>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map(|path| path.as_str().to_owned());
    let method = request.method().clone();
    let response = next.run(request).await;
    metrics.http_request(
        route.as_deref(),
        &method,
        response.status(),
        started.elapsed(),
    );
    response
}

/// Carries every request that may change something (any method but GET,
/// HEAD, OPTIONS) through to its end in a task of its own. A client that
/// disconnects drops only the wait for the answer: the change is made whole
/// or, if the body never arrived complete, not at all. The task is tracked
/// on `requests`, so the controller's stop waits for it (within its grace)
/// even after the connection is gone.
async fn shield(
    State(requests): State<TaskTracker>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    if request.method().is_safe() {
        return next.run(request).await;
    }
    // The request's span goes along, so the handler's logs keep it.
    let handled = tracing::Instrument::in_current_span(next.run(request));
    match requests.spawn(handled).await {
        Ok(response) => response,
        Err(err) => {
            tracing::error!(error = %err, "request handler failed");
            problem::ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the request failed; see the controller's log",
            )
            .into_response()
        }
    }
}

fn api_router() -> OpenApiRouter<Services> {
    OpenApiRouter::with_openapi(ApiDoc::openapi())
        .merge(repos::router())
        .merge(jobs::router())
        .merge(agents::router())
        .merge(env::router())
        .merge(notifications::router())
        .merge(admin::router())
        .routes(routes!(healthz))
        .routes(routes!(readyz))
}

/// The OpenAPI document (for the committed `openapi/openapi.yaml`).
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut api = api_router().split_for_parts().1;
    finish_document(&mut api);
    api
}

/// Completes every operation with the responses that come from the edge
/// rather than the handler (credentials, body parsing, the store), each a
/// problem document, and gives every response without a description its
/// reason phrase (OpenAPI requires one).
fn finish_document(api: &mut utoipa::openapi::OpenApi) {
    for (path, item) in &mut api.paths.paths {
        let operations = [
            &mut item.get,
            &mut item.put,
            &mut item.post,
            &mut item.delete,
            &mut item.patch,
        ];
        for operation in operations.into_iter().flatten() {
            let mut edge = Vec::new();
            if let Some(security) = &operation.security {
                edge.push((401, "Missing or wrong credentials"));
                if accepts_github_credentials(security) {
                    edge.push((
                        429,
                        "Too many failed authentications from this address or with this token (20, then one more every 3 s): retry after `Retry-After` seconds; or GitHub's rate limit for this token is exhausted",
                    ));
                    edge.push((502, "GitHub could not be reached to check the token"));
                } else {
                    edge.push((
                        429,
                        "Too many failed authentications from this address or with this token (20, then one more every 3 s): retry after `Retry-After` seconds",
                    ));
                    edge.push((403, "This needs the admin token"));
                }
            }
            if operation.request_body.is_some() {
                edge.push((400, "Malformed JSON"));
                edge.push((413, "The body is too large"));
                edge.push((
                    415,
                    "The body is not JSON (send Content-Type: application/json)",
                ));
                edge.push((422, "A field is invalid: `errors` names it"));
            }
            if operation
                .parameters
                .as_ref()
                .is_some_and(|parameters| !parameters.is_empty())
            {
                edge.push((400, "A parameter is malformed: `errors` names it"));
            }
            if path.contains("{owner}") {
                // A repository's name is checked (the same rules as
                // registering it) before anything else.
                edge.push((
                    422,
                    "`owner` or `name` is not a valid repository name: `errors` names it",
                ));
            }
            if path.as_str() != "/healthz" {
                edge.push((503, "The store is unavailable; retry later"));
            }
            for parameter in operation.parameters.iter_mut().flatten() {
                if let utoipa::openapi::RefOr::T(parameter) = parameter {
                    not_nullable(parameter);
                }
            }
            for (status, description) in edge {
                operation
                    .responses
                    .responses
                    .entry(status.to_string())
                    .or_insert_with(|| problem_response(description).into());
            }
            if let Some(utoipa::openapi::RefOr::T(unauthorized)) =
                operation.responses.responses.get_mut("401")
            {
                unauthorized.headers.insert(
                    "WWW-Authenticate".to_owned(),
                    response_header(utoipa::openapi::schema::Type::String, "`Bearer`"),
                );
            }
            if operation.security.is_some()
                && let Some(utoipa::openapi::RefOr::T(throttled)) =
                    operation.responses.responses.get_mut("429")
            {
                throttled.headers.insert(
                    "Retry-After".to_owned(),
                    response_header(
                        utoipa::openapi::schema::Type::Integer,
                        "Seconds until another attempt is allowed (after failed authentications)",
                    ),
                );
            }
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

/// A documented response header.
fn response_header(
    schema_type: utoipa::openapi::schema::Type,
    description: &str,
) -> utoipa::openapi::RefOr<utoipa::openapi::header::Header> {
    utoipa::openapi::header::HeaderBuilder::new()
        .schema(Some(
            utoipa::openapi::schema::ObjectBuilder::new().schema_type(schema_type),
        ))
        .description(Some(description))
        .build()
        .into()
}

/// Whether one of the alternatives is the `github_token` scheme (utoipa keeps
/// a requirement's schemes private; its JSON form names them).
fn accepts_github_credentials(security: &[utoipa::openapi::security::SecurityRequirement]) -> bool {
    security.iter().any(|requirement| {
        serde_json::to_value(requirement)
            .ok()
            .and_then(|value| value.get("github_token").cloned())
            .is_some()
    })
}

/// An optional parameter is absent or a value, never `null` (a header or
/// query string cannot carry one): `oneOf: [T, null]` becomes `T`.
fn not_nullable(parameter: &mut utoipa::openapi::path::Parameter) {
    use utoipa::openapi::schema::{Schema, Type};
    use utoipa::openapi::{RefOr, schema::SchemaType};
    let Some(RefOr::T(Schema::OneOf(one_of))) = &parameter.schema else {
        return;
    };
    let is_null = |item: &RefOr<Schema>| matches!(item, RefOr::T(Schema::Object(object)) if object.schema_type == SchemaType::Type(Type::Null));
    let mut values = one_of.items.iter().filter(|item| !is_null(item));
    if let (Some(value), None) = (values.next(), values.next()) {
        parameter.schema = Some(value.clone());
    }
}

/// A response whose body is a problem document.
fn problem_response(description: &str) -> utoipa::openapi::Response {
    utoipa::openapi::ResponseBuilder::new()
        .description(description)
        .content(
            "application/problem+json",
            utoipa::openapi::ContentBuilder::new()
                .schema(Some(utoipa::openapi::Ref::from_schema_name("Problem")))
                .build(),
        )
        .build()
}

async fn not_found() -> problem::ApiError {
    problem::ApiError::new(StatusCode::NOT_FOUND, "no such route")
}

async fn method_not_allowed(method: axum::http::Method) -> problem::ApiError {
    problem::ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{method} is not allowed here (the Allow header lists what is)"),
    )
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
    match services.ready().await {
        Ok(()) => Json(Health { status: "ready" }).into_response(),
        Err(err) => problem::ApiError::from(err).into_response(),
    }
}
