//! EDGE: the one conversion from errors to RFC 9457 `application/problem+json`
//! responses, and extractors whose rejections are problems too.

use axum::Json;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request};
use axum::http::{HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde::de::DeserializeOwned;
use utoipa::ToSchema;

use crate::error::CoreError;

/// An RFC 9457 problem document.
#[derive(Clone, Debug, Serialize, ToSchema)]
#[schema(example = json!({"type": "about:blank", "title": "Unprocessable Entity", "status": 422, "detail": "branch: character ';' is not allowed (use letters, digits, '.', '_', '/' and '-')", "errors": [{"field": "branch", "message": "character ';' is not allowed (use letters, digits, '.', '_', '/' and '-')"}]}))]
pub struct Problem {
    /// Always `about:blank`: the status code says what kind of problem it is.
    #[serde(rename = "type")]
    pub problem_type: String,
    /// The HTTP reason phrase.
    pub title: String,
    pub status: u16,
    /// What went wrong, in words a person can act on.
    pub detail: String,
    /// The fields that were refused, when the request had invalid fields.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<FieldError>>,
    /// The request's id: the client's `X-Request-Id` when it was well-formed
    /// (1 to 128 of `[A-Za-z0-9._:-]`), else one the controller made. The
    /// answer's `X-Request-Id` header carries it too, and so does every line
    /// the controller logged about the request: quote it when reporting a
    /// problem.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[A-Za-z0-9._:-]{1,128}$")]
    pub request_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct FieldError {
    pub field: String,
    pub message: String,
}

/// An error on its way to becoming a problem response.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub detail: String,
    pub errors: Option<Vec<FieldError>>,
    /// Sent as `Retry-After` (seconds).
    pub retry_after: Option<std::time::Duration>,
}

impl ApiError {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> ApiError {
        ApiError {
            status,
            detail: detail.into(),
            errors: None,
            retry_after: None,
        }
    }

    pub fn field(status: StatusCode, field: &str, message: impl Into<String>) -> ApiError {
        let message = message.into();
        ApiError {
            status,
            detail: format!("{field}: {message}"),
            errors: Some(vec![FieldError {
                field: field.to_owned(),
                message,
            }]),
            retry_after: None,
        }
    }

    pub fn unauthorized(detail: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, detail)
    }

    /// Adds the field a serde message is about to `errors`, when it names one.
    fn naming_field(mut self, serde_message: &str) -> ApiError {
        self.errors = named_field(serde_message).map(|field| vec![field]);
        self
    }
}

impl From<CoreError> for ApiError {
    fn from(err: CoreError) -> ApiError {
        match err {
            CoreError::NotFound(what) => {
                ApiError::new(StatusCode::NOT_FOUND, format!("{what} not found"))
            }
            CoreError::Conflict(detail) => ApiError::new(StatusCode::CONFLICT, detail),
            CoreError::Unauthorized(detail) => ApiError::unauthorized(detail),
            CoreError::Forbidden(detail) => ApiError::new(StatusCode::FORBIDDEN, detail),
            CoreError::Gone(detail) => ApiError::new(StatusCode::GONE, detail),
            CoreError::RateLimited(detail) => ApiError::new(StatusCode::TOO_MANY_REQUESTS, detail),
            CoreError::TooManyFailures { retry_after } => ApiError {
                retry_after: Some(retry_after),
                ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, err.to_string())
            },
            CoreError::Invalid(invalid) => ApiError::field(
                StatusCode::UNPROCESSABLE_ENTITY,
                &invalid.field,
                invalid.reason,
            ),
            CoreError::Upstream(detail) => ApiError::new(StatusCode::BAD_GATEWAY, detail),
            CoreError::Unavailable(cause) => {
                tracing::error!(error = %cause, "store unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "the store is unavailable; retry later",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let problem = Problem {
            problem_type: "about:blank".to_owned(),
            title: self.status.canonical_reason().unwrap_or("Error").to_owned(),
            status: self.status.as_u16(),
            detail: self.detail,
            errors: self.errors,
            request_id: None,
        };
        // The request-id middleware finds the document here and writes the
        // body again with the request's id.
        let mut response = (self.status, Json(problem.clone())).into_response();
        response.extensions_mut().insert(problem);
        response.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/problem+json"),
        );
        if let Some(retry_after) = self.retry_after {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from(retry_after.as_secs().max(1)),
            );
        }
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

/// `Json<T>` whose rejection is a problem naming what was wrong.
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(value)) => Ok(ApiJson(value)),
            Err(rejection) => Err(json_rejection(&rejection)),
        }
    }
}

fn json_rejection(rejection: &JsonRejection) -> ApiError {
    let text = rejection.body_text();
    // axum prefixes serde's message; serde's message names the field.
    let cause = text
        .split_once(": ")
        .map_or(text.as_str(), |(_, cause)| cause)
        .to_owned();
    match rejection {
        JsonRejection::JsonDataError(_) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!("invalid request body: {cause}"),
        )
        .naming_field(&cause),
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::new(StatusCode::BAD_REQUEST, format!("malformed JSON: {cause}"))
        }
        JsonRejection::MissingJsonContentType(_) => ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the request body must be JSON with Content-Type: application/json",
        ),
        _ => ApiError::new(
            rejection.status(),
            format!("unreadable request body: {cause}"),
        ),
    }
}

/// `Query<T>` whose rejection is a problem.
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(ApiQuery(value)),
            Err(rejection) => Err(query_rejection(&rejection)),
        }
    }
}

/// `Path<T>` whose rejection is a problem (a path that is not UTF-8, a
/// parameter of the wrong type), not axum's plain text.
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Path::<T>::from_request_parts(parts, state).await {
            Ok(Path(value)) => Ok(ApiPath(value)),
            Err(rejection) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("invalid path: {}", rejection.body_text()),
            )),
        }
    }
}

fn query_rejection(rejection: &QueryRejection) -> ApiError {
    let text = rejection.body_text();
    let cause = text
        .split_once(": ")
        .map_or(text.as_str(), |(_, cause)| cause);
    ApiError::new(
        StatusCode::BAD_REQUEST,
        format!("invalid query string: {cause}"),
    )
    .naming_field(cause)
}

/// The field serde's message is about: it starts with the field's path
/// (`env.FOO: invalid type ...`) or says "missing field `name`".
fn named_field(cause: &str) -> Option<FieldError> {
    let cause = cause.split(" at line ").next().unwrap_or(cause);
    if let Some((path, message)) = cause.split_once(": ")
        && !path.is_empty()
        && path
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '[' | ']'))
    {
        return Some(FieldError {
            field: path.to_owned(),
            message: message.to_owned(),
        });
    }
    let (field, _) = cause.strip_prefix("missing field `")?.split_once('`')?;
    Some(FieldError {
        field: field.to_owned(),
        message: "is required".to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::named_field;

    #[test]
    fn serde_messages_name_their_field() {
        for (message, field) in [
            (
                "brnach: unknown field `brnach`, expected one of `name` at line 1 column 42",
                Some("brnach"),
            ),
            (
                "env.FOO: invalid type: integer `1`, expected a string at line 1 column 9",
                Some("env.FOO"),
            ),
            ("missing field `name` at line 1 column 20", Some("name")),
            ("limit: invalid digit found in string", Some("limit")),
            ("expected value at line 1 column 1", None),
        ] {
            assert_eq!(
                named_field(message).map(|f| f.field),
                field.map(str::to_owned),
                "{message}"
            );
        }
        let missing = named_field("missing field `name` at line 1 column 20").unwrap();
        assert_eq!(missing.message, "is required");
    }
}
