//! EDGE: named string schemas for the OpenAPI document. Their patterns are the
//! validation rules the controller applies (`hobotnica_common::validate`), so
//! a client can check a value before sending it and a schema-valid value is
//! never refused for its form.

use std::borrow::Cow;

use hobotnica_common::validate::{
    BRANCH_PATTERN, ENV_NAME_PATTERN, LABEL_KEY_PATTERN, LABEL_VALUE_PATTERN, MAX_BRANCH_LEN,
    MAX_ENV_VALUE_LEN, MAX_LABEL_KEY_LEN, MAX_LABEL_VALUE_LEN, MAX_LABELS, MAX_REPO_NAME_LEN,
    MAX_TARGET_LEN, REPO_COMPONENT_PATTERN, TARGET_PATTERN,
};
use serde_json::json;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::{KnownFormat, RefOr, SchemaFormat};

use crate::git::GIT_URL_PATTERN;
use crate::jobs::{MAX_ENV_VARS, MAX_IDEMPOTENCY_KEY_LEN, MAX_PAGE_SIZE};

fn string(pattern: &str, max_length: usize, description: &str, example: &str) -> ObjectBuilder {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .pattern(Some(pattern))
        .min_length(Some(1))
        .max_length(Some(max_length))
        .description(Some(description))
        .examples([json!(example)])
}

/// A schema built from an `ObjectBuilder`, named in `components.schemas`.
macro_rules! named_schema {
    ($(#[$doc:meta])* $name:ident = $schema:expr) => {
        $(#[$doc])*
        pub struct $name;

        impl utoipa::PartialSchema for $name {
            fn schema() -> RefOr<Schema> {
                RefOr::T(Schema::Object($schema.build()))
            }
        }

        impl utoipa::ToSchema for $name {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed(stringify!($name))
            }
        }
    };
}

named_schema!(
    /// A repository's owner, or `local` for repositories registered by URL.
    Owner = string(
        REPO_COMPONENT_PATTERN,
        MAX_REPO_NAME_LEN,
        "A repository's owner: the GitHub owner, or `local` for repositories registered by git URL. Letters, digits, `.`, `_`, `-`; not starting with `.` or `-`, no `..`.",
        "local"
    )
);

named_schema!(
    /// A repository's name.
    RepoName = string(
        REPO_COMPONENT_PATTERN,
        MAX_REPO_NAME_LEN,
        "A repository's name. Letters, digits, `.`, `_`, `-`; not starting with `.` or `-`, no `..`.",
        "demo"
    )
);

named_schema!(
    /// What an agent token is for.
    TokenName = string(
        REPO_COMPONENT_PATTERN,
        MAX_REPO_NAME_LEN,
        "What the token is for, e.g. the build host's name. Letters, digits, `.`, `_`, `-`; not starting with `.` or `-`, no `..`.",
        "build-1"
    )
);

named_schema!(
    /// `owner/name`.
    FullRepoName = string(
        &format!(
            "^{}/{}$",
            strip_anchors(REPO_COMPONENT_PATTERN),
            strip_anchors(REPO_COMPONENT_PATTERN)
        ),
        2 * MAX_REPO_NAME_LEN + 1,
        "A repository as `owner/name`.",
        "local/demo"
    )
);

named_schema!(
    /// A git branch.
    Branch = string(
        BRANCH_PATTERN,
        MAX_BRANCH_LEN,
        "A branch name: letters, digits, `.`, `_`, `/`, `-`, as `git check-ref-format --branch` accepts them.",
        "main"
    )
);

named_schema!(
    /// A make target.
    Target = string(
        TARGET_PATTERN,
        MAX_TARGET_LEN,
        "A make target: letters, digits, `.`, `_`, `/`, `-` (no `=`, which make would read as a variable).",
        "test"
    )
);

named_schema!(
    /// An environment variable's name.
    EnvName = string(
        ENV_NAME_PATTERN,
        256,
        "A variable name, `[A-Za-z_][A-Za-z0-9_]*`. `PATH`, `HOME`, `CI`, `HOBOTNICA` and `HOBOTNICA_*` are set by Hobotnica and cannot be overridden.",
        "API_URL"
    )
);

named_schema!(
    /// A full commit sha.
    CommitSha = string(
        "^[0-9a-fA-F]{40}$",
        40,
        "A full commit sha: 40 hexadecimal characters.",
        "2f6f3c1f0a1b2c3d4e5f60718293a4b5c6d7e8f9"
    )
    .min_length(Some(40))
);

named_schema!(
    /// A git URL the controller accepts.
    GitUrl = string(
        GIT_URL_PATTERN,
        2048,
        "Anything git can clone: `https://`, `http://`, `ssh://`, `git://` or `file://` URLs, `user@host:path`, or an absolute path. Transports that run commands (`ext::`) are refused.",
        "https://git.example.com/demo.git"
    )
);

named_schema!(
    /// An `Idempotency-Key`.
    IdempotencyKey = string(
        "^[!-~]+$",
        MAX_IDEMPOTENCY_KEY_LEN,
        "Visible ASCII characters, e.g. a UUID. Retrying a request with the same key and the same body returns the first request's job; the same key with another body is refused (422). Keys are kept for 7 days.",
        "9b2c6d0e-4f1a-4c55-8e0b-3d5f2a7c1e94"
    )
);

named_schema!(
    /// A page cursor.
    Cursor = string(
        "^[1-9][0-9]{0,18}$",
        19,
        "`next_cursor` of the previous page.",
        "1042"
    )
);

named_schema!(
    /// One-time (job-level) variables: names as [`EnvName`], values as in
    /// `SetEnvRequest`.
    JobEnv = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "One-time variables for this job only, over the repository's. Values are at most 65536 bytes as UTF-8, without NUL; they are not shown again; names appear in `env_keys`.",
        ))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .max_length(Some(MAX_ENV_VALUE_LEN))
                .pattern(Some("^[^\\u0000]*$")),
        ))
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .pattern(Some(ENV_NAME_PATTERN)),
        ))
        .max_properties(Some(MAX_ENV_VARS))
        .examples([json!({"GREETING": "hello"})])
);

named_schema!(
    /// Labels given to the controller: an agent token's, a repository's
    /// `deploy_labels` (`validate::labels`).
    Labels = ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "Labels as `{key: value}`: keys of letters, digits, `.`, `_`, `-`; values of letters, digits and `._/:@+-`.",
        ))
        .additional_properties(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_LABEL_VALUE_LEN))
                .pattern(Some(LABEL_VALUE_PATTERN)),
        ))
        .property_names(Some(
            ObjectBuilder::new()
                .schema_type(Type::String)
                .min_length(Some(1))
                .max_length(Some(MAX_LABEL_KEY_LEN))
                .pattern(Some(LABEL_KEY_PATTERN)),
        ))
        .max_properties(Some(MAX_LABELS))
        .examples([json!({"pool": "deploy"})])
);

named_schema!(
    /// A job id (a positive integer).
    JobId = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(SchemaFormat::KnownFormat(KnownFormat::Int64)))
        .minimum(Some(1))
        .maximum(Some(i64::MAX))
        .description(Some("A job id"))
        .examples([json!(42)])
);

named_schema!(
    /// A page size.
    PageSize = ObjectBuilder::new()
        .schema_type(Type::Integer)
        .minimum(Some(1))
        .maximum(Some(MAX_PAGE_SIZE as u64))
        .description(Some("Page size (default 50)."))
        .examples([json!(50)])
);

fn strip_anchors(pattern: &str) -> &str {
    pattern
        .strip_prefix('^')
        .and_then(|p| p.strip_suffix('$'))
        .unwrap_or(pattern)
}
