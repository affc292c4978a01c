//! Validation of names that come from the network and end up in a file path,
//! a git command line or a make command line: repository owners and names,
//! branches, make targets and environment variable names.
//!
//! Architecture invariant: a value that passed these checks cannot be read as
//! an option (no leading `-`), cannot escape a directory (no `..`, no `/` where
//! a path component is expected) and holds no shell metacharacter, so even a
//! careless caller could not turn it into a command.

/// Why a value was refused, naming the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct ValidationError {
    pub field: String,
    pub reason: String,
}

impl ValidationError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ValidationError {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Longest accepted repository owner or name.
pub const MAX_REPO_NAME_LEN: usize = 100;
/// Longest accepted branch name.
pub const MAX_BRANCH_LEN: usize = 255;
/// Longest accepted make target.
pub const MAX_TARGET_LEN: usize = 100;
/// Longest accepted environment variable name.
pub const MAX_ENV_NAME_LEN: usize = 256;
/// Largest accepted environment variable value, in bytes of UTF-8 (the
/// schema states it as `maxLength` in characters and in its description).
pub const MAX_ENV_VALUE_LEN: usize = 64 * 1024;
/// Most labels an agent, an agent token or a repository's deploy may carry.
pub const MAX_LABELS: usize = 64;
/// Longest accepted label key.
pub const MAX_LABEL_KEY_LEN: usize = 64;
/// Longest accepted label value.
pub const MAX_LABEL_VALUE_LEN: usize = 256;

// The same rules as ECMA-262 regular expressions, for the OpenAPI schema
// (`pattern`). A unit test checks that each pattern and its function agree.

/// [`repo_component`] as a pattern.
pub const REPO_COMPONENT_PATTERN: &str = r"^(?![.-])(?!.*\.\.)[A-Za-z0-9._-]{1,100}$";
/// [`branch`] as a pattern.
pub const BRANCH_PATTERN: &str = r"^(?![./-])(?!HEAD$)(?!.*\.\.)(?!.*//)(?!.*/\.)(?!.*/$)(?!.*\.$)(?!.*\.lock$)(?!.*\.(?:lock)?/)[A-Za-z0-9._/-]{1,255}$";
/// [`target`] as a pattern.
pub const TARGET_PATTERN: &str = r"^(?!-)(?!.*\.\.)[A-Za-z0-9._/-]{1,100}$";
/// [`label_key`] as a pattern.
pub const LABEL_KEY_PATTERN: &str = r"^[A-Za-z0-9._-]{1,64}$";
/// [`label_value`] as a pattern.
pub const LABEL_VALUE_PATTERN: &str = r"^[A-Za-z0-9._/:@+-]{1,256}$";
/// [`env_name`] minus the reserved names ([`crate::env::is_reserved`]): the
/// names a job's variables may have.
pub const ENV_NAME_PATTERN: &str =
    r"^(?!(?:PATH|HOME|CI|HOBOTNICA)$)(?!HOBOTNICA_)[A-Za-z_][A-Za-z0-9_]{0,255}$";

fn common_checks(field: &str, value: &str, max_len: usize) -> Result<(), ValidationError> {
    if value.is_empty() {
        return Err(ValidationError::new(field, "must not be empty"));
    }
    if value.len() > max_len {
        return Err(ValidationError::new(
            field,
            format!("must be at most {max_len} characters"),
        ));
    }
    if value.starts_with('-') {
        return Err(ValidationError::new(field, "must not start with '-'"));
    }
    if value.contains("..") {
        return Err(ValidationError::new(field, "must not contain '..'"));
    }
    Ok(())
}

fn only_chars(
    field: &str,
    value: &str,
    allowed: impl Fn(char) -> bool,
    described: &str,
) -> Result<(), ValidationError> {
    match value.chars().find(|c| !allowed(*c)) {
        None => Ok(()),
        Some(c) => Err(ValidationError::new(
            field,
            format!("character {c:?} is not allowed (use {described})"),
        )),
    }
}

/// A repository owner or name: letters, digits, `.`, `_`, `-`.
pub fn repo_component(field: &str, value: &str) -> Result<(), ValidationError> {
    common_checks(field, value, MAX_REPO_NAME_LEN)?;
    if value.starts_with('.') {
        return Err(ValidationError::new(field, "must not start with '.'"));
    }
    only_chars(
        field,
        value,
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
        "letters, digits, '.', '_' and '-'",
    )
}

/// A branch name: what `git check-ref-format --branch` accepts, restricted to
/// letters, digits and `._/-`.
pub fn branch(field: &str, value: &str) -> Result<(), ValidationError> {
    common_checks(field, value, MAX_BRANCH_LEN)?;
    if value.starts_with('.') {
        return Err(ValidationError::new(field, "must not start with '.'"));
    }
    only_chars(
        field,
        value,
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'),
        "letters, digits, '.', '_', '/' and '-'",
    )?;
    if value.starts_with('/') || value.ends_with('/') || value.contains("//") {
        return Err(ValidationError::new(
            field,
            "must not start or end with '/' or contain '//'",
        ));
    }
    let bad_component = value
        .split('/')
        .any(|part| part.ends_with('.') || part.ends_with(".lock"));
    if bad_component || value.contains("/.") || value == "HEAD" {
        return Err(ValidationError::new(
            field,
            "is not a valid git branch name (no part may end with '.' or '.lock', and HEAD is not a branch)",
        ));
    }
    Ok(())
}

/// A make target: letters, digits and `._/-` (no `=`, which make would read as
/// a variable assignment).
pub fn target(field: &str, value: &str) -> Result<(), ValidationError> {
    common_checks(field, value, MAX_TARGET_LEN)?;
    only_chars(
        field,
        value,
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | '-'),
        "letters, digits, '.', '_', '/' and '-'",
    )
}

/// An environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn env_name(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() || value.len() > MAX_ENV_NAME_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be 1 to {MAX_ENV_NAME_LEN} characters"),
        ));
    }
    let mut chars = value.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(ValidationError::new(
            field,
            "must match [A-Za-z_][A-Za-z0-9_]*",
        ));
    }
    Ok(())
}

/// An environment variable value: at most [`MAX_ENV_VALUE_LEN`] bytes of
/// UTF-8 (so that `NAME=value` stays within the kernel's 128 KiB limit on
/// one environment string: a longer one makes the job's `exec` fail with
/// E2BIG), no NUL.
pub fn env_value(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.len() > MAX_ENV_VALUE_LEN {
        return Err(ValidationError::new(
            field,
            format!("value must be at most {MAX_ENV_VALUE_LEN} bytes (UTF-8)"),
        ));
    }
    if value.contains('\0') {
        return Err(ValidationError::new(field, "value must not contain NUL"));
    }
    Ok(())
}

/// Parses an agent label `key=value`: the key as [`label_key`], the value
/// as [`agent_label_value`] (what the controller accepts at registration).
pub fn label(input: &str) -> Result<(String, String), String> {
    let (key, value) = input
        .split_once('=')
        .ok_or_else(|| format!("label {:?} must be key=value", input.escape_debug()))?;
    label_key("label key", key).map_err(|err| err.to_string())?;
    agent_label_value(&format!("label {key}"), value).map_err(|err| err.to_string())?;
    Ok((key.to_owned(), value.to_owned()))
}

/// A label key given to the controller (a token's or a repository's labels):
/// 1 to 64 letters, digits, `_`, `-`, `.`.
pub fn label_key(field: &str, key: &str) -> Result<(), ValidationError> {
    if key.is_empty() || key.len() > MAX_LABEL_KEY_LEN {
        return Err(ValidationError::new(
            field,
            format!("label keys are 1 to {MAX_LABEL_KEY_LEN} characters"),
        ));
    }
    only_chars(
        field,
        key,
        |c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'),
        "letters, digits, '_', '-' and '.' in a label key",
    )
}

/// A label value given to the controller: 1 to 256 letters, digits and
/// `._/:@+-`.
pub fn label_value(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.is_empty() || value.len() > MAX_LABEL_VALUE_LEN {
        return Err(ValidationError::new(
            field,
            format!("label values are 1 to {MAX_LABEL_VALUE_LEN} characters"),
        ));
    }
    only_chars(
        field,
        value,
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '/' | ':' | '@' | '+' | '-'),
        "letters, digits, '.', '_', '/', ':', '@', '+' and '-' in a label value",
    )
}

/// A set of labels given to the controller (an agent token's, a
/// repository's `deploy_labels`): at most [`MAX_LABELS`], each key as
/// [`label_key`] and each value as [`label_value`]. Errors name
/// `field.key`.
pub fn labels(
    field: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(), ValidationError> {
    labels_each(field, labels, label_value)
}

/// At most [`MAX_LABELS`] labels, each key as [`label_key`] and each value
/// as `value_rule`, which is told `field.key`.
fn labels_each(
    field: &str,
    labels: &std::collections::BTreeMap<String, String>,
    value_rule: fn(&str, &str) -> Result<(), ValidationError>,
) -> Result<(), ValidationError> {
    if labels.len() > MAX_LABELS {
        return Err(ValidationError::new(
            field,
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    for (key, value) in labels {
        label_key(field, key)?;
        value_rule(&format!("{field}.{key}"), value)?;
    }
    Ok(())
}

/// Longest agent version accepted at registration.
pub const MAX_AGENT_VERSION_LEN: usize = 64;

/// Whether `c` would reorder the text around it when shown: the bidi
/// marks (U+061C, U+200E, U+200F), embeddings and overrides (U+202A to
/// U+202E) and isolates (U+2066 to U+2069).
pub fn is_bidi_control(c: char) -> bool {
    matches!(
        c,
        '\u{61c}' | '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
    )
}

/// Whether `c` must not be stored as text an operator will read: a control
/// character (C0, DEL, C1) or a bidi control ([`is_bidi_control`]).
pub fn is_unsafe_in_text(c: char) -> bool {
    c.is_control() || is_bidi_control(c)
}

/// An agent's version, as it registers: at most [`MAX_AGENT_VERSION_LEN`]
/// printable ASCII characters (empty is allowed: it is informational).
pub fn agent_version(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.len() > MAX_AGENT_VERSION_LEN {
        return Err(ValidationError::new(
            field,
            format!("must be at most {MAX_AGENT_VERSION_LEN} characters"),
        ));
    }
    only_chars(
        field,
        value,
        |c| c.is_ascii_graphic() || c == ' ',
        "printable ASCII",
    )
}

/// A label value an agent registers with: at most [`MAX_LABEL_VALUE_LEN`]
/// characters, none of them a control or bidi control character. (Freer
/// than [`label_value`], which tokens and repositories use: an agent
/// describes itself, and a deploy only goes where a token vouches.)
pub fn agent_label_value(field: &str, value: &str) -> Result<(), ValidationError> {
    if value.chars().count() > MAX_LABEL_VALUE_LEN {
        return Err(ValidationError::new(
            field,
            format!("label values are at most {MAX_LABEL_VALUE_LEN} characters"),
        ));
    }
    match value.chars().find(|c| is_unsafe_in_text(*c)) {
        None => Ok(()),
        Some(c) => Err(ValidationError::new(
            field,
            format!("character {c:?} is not allowed (no control or bidi control characters)"),
        )),
    }
}

/// The labels an agent registers with: at most [`MAX_LABELS`], keys as
/// [`label_key`], values as [`agent_label_value`]. Errors name
/// `field.key`.
pub fn agent_labels(
    field: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> Result<(), ValidationError> {
    labels_each(field, labels, agent_label_value)
}

/// `text` as an operator may be shown it: every control character becomes
/// a space (line breaks and tabs) or U+FFFD (the others), every bidi
/// control is dropped, and at most `max_chars` characters are kept.
pub fn sanitize_text(text: &str, max_chars: usize) -> String {
    text.chars()
        .filter(|c| !is_bidi_control(*c))
        .map(|c| match c {
            '\n' | '\r' | '\t' => ' ',
            c if c.is_control() => char::REPLACEMENT_CHARACTER,
            c => c,
        })
        .take(max_chars)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn branches() {
        for ok in ["main", "feature/x-1", "release-1.2", "a_b"] {
            assert_eq!(branch("branch", ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "-x", ".x", "a..b", "a;b", "a b", "$(id)", "`id`", "a|b", "/a", "a/", "a//b",
            "a.lock", "a.lock/b", "a./b", "HEAD", "a/.b", "x\n", "a@{b", "a~1", "a^", "a:b",
        ] {
            assert!(branch("branch", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn targets() {
        for ok in ["test", "deploy", "build-all", "sub/dir.x"] {
            assert_eq!(target("target", ok), Ok(()), "{ok}");
        }
        for bad in [
            "", "-n", "a..b", "x=y", "a;b", "a&&b", "$(id)", "a b", "a'b",
        ] {
            assert!(target("target", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn repo_components() {
        for ok in ["demo", "my.repo", "a-b_c"] {
            assert_eq!(repo_component("name", ok), Ok(()), "{ok}");
        }
        for bad in ["", "a/b", "..", "a..b", ".hidden", "-x", "a b", "a;b"] {
            assert!(repo_component("name", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_names() {
        for ok in ["A", "_x", "FOO_BAR9"] {
            assert_eq!(env_name("env", ok), Ok(()), "{ok}");
        }
        for bad in ["", "9A", "A-B", "A B", "A=B", "ä"] {
            assert!(env_name("env", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn labels() {
        assert_eq!(label("os=linux"), Ok(("os".into(), "linux".into())));
        assert_eq!(label("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(label("o s=linux").is_err());
        assert!(label("=x").is_err());
        assert!(label("novalue").is_err());
        assert!(label("os=lin\u{1b}ux").is_err());
        assert!(label(&format!("os={}", "x".repeat(257))).is_err());
    }

    /// Every pattern accepts exactly what its function accepts, over all
    /// short strings of an alphabet that hits each rule.
    /// 65,536 characters of `€` are 196,608 bytes: as `NAME=value` that is
    /// over the kernel's 128 KiB for one environment string, and the job
    /// failed with E2BIG. The limit is in bytes now.
    #[test]
    fn env_values_are_limited_in_bytes() {
        let ascii = "v".repeat(MAX_ENV_VALUE_LEN);
        assert!(env_value("f", &ascii).is_ok());
        let euros = "€".repeat(MAX_ENV_VALUE_LEN / 3 + 1);
        let refused = env_value("f", &euros).expect_err("over the limit in bytes");
        assert!(refused.reason.contains("bytes"), "{refused}");
        assert!(crate::env::is_reserved("HOBOTNICA"));
    }

    #[test]
    fn patterns_agree_with_functions() {
        type Accepts = fn(&str) -> bool;
        let checks: [(&str, Accepts); 6] = [
            (REPO_COMPONENT_PATTERN, |v| repo_component("f", v).is_ok()),
            (BRANCH_PATTERN, |v| branch("f", v).is_ok()),
            (TARGET_PATTERN, |v| target("f", v).is_ok()),
            (ENV_NAME_PATTERN, |v| {
                env_name("f", v).is_ok() && !crate::env::is_reserved(v)
            }),
            (LABEL_KEY_PATTERN, |v| label_key("f", v).is_ok()),
            (LABEL_VALUE_PATTERN, |v| label_value("f", v).is_ok()),
        ];
        let alphabet = [
            'a', 'Z', '0', '_', '-', '.', '/', ';', ' ', '\n', 'é', ':', '=',
        ];
        let mut corpus: Vec<String> = vec![String::new()];
        let mut layer = corpus.clone();
        for _ in 0..5 {
            layer = layer
                .iter()
                .flat_map(|prefix| alphabet.iter().map(move |c| format!("{prefix}{c}")))
                .collect();
            corpus.extend(layer.iter().cloned());
        }
        corpus.extend(
            [
                "a.lock",
                "a.lockb",
                "a.lock/b",
                "a./b",
                "HEAD",
                "HEADS",
                "PATH",
                "PATHS",
                "HOME",
                "CI",
                "CIA",
                "HOBOTNICA_X",
                "HOBOTNICA",
                "_PATH",
            ]
            .map(str::to_owned),
        );
        corpus.push("a".repeat(100));
        corpus.push("a".repeat(101));
        corpus.push("a".repeat(255));
        corpus.push("a".repeat(256));
        corpus.push("A".repeat(257));
        corpus.push("a".repeat(64));
        corpus.push("a".repeat(65));
        for (pattern, function) in checks {
            let regex = fancy_regex::Regex::new(pattern).unwrap();
            for value in &corpus {
                assert_eq!(
                    regex.is_match(value).unwrap(),
                    function(value),
                    "{pattern} and its function disagree on {value:?}"
                );
            }
        }
    }

    #[test]
    fn agent_strings_are_bounded_and_printable() {
        assert_eq!(agent_version("version", "0.1.0 (abc123)"), Ok(()));
        assert_eq!(agent_version("version", ""), Ok(()));
        assert_eq!(agent_version("version", &"v".repeat(64)), Ok(()));
        let long = agent_version("version", &"v".repeat(65)).unwrap_err();
        assert_eq!(long.field, "version");
        assert!(long.reason.contains("64"), "{long}");
        for bad in [
            "1.0\u{1b}]0;x\u{7}",
            "1.0\n",
            "1.0\u{7f}",
            "é",
            "1.0\u{202e}",
        ] {
            assert!(agent_version("version", bad).is_err(), "{bad:?}");
        }

        for ok in ["linux", "Intel(R) Xeon(R) 8 cores", "café", "🐙"] {
            assert_eq!(agent_label_value("labels.cpu", ok), Ok(()), "{ok:?}");
        }
        assert_eq!(agent_label_value("l", &"é".repeat(256)), Ok(()));
        assert!(agent_label_value("l", &"é".repeat(257)).is_err());
        for bad in [
            "a\u{1b}[2J",
            "a\nb",
            "a\tb",
            "\u{85}",
            "\u{9b}",
            "abc\u{202e}cba",
            "\u{2066}x",
            "\u{200f}",
        ] {
            let err = agent_label_value("labels.os", bad).unwrap_err();
            assert_eq!(err.field, "labels.os", "{bad:?}");
        }
    }

    #[test]
    fn sanitized_text_is_one_bounded_line() {
        assert_eq!(
            sanitize_text("make: *** Error 2", 1000),
            "make: *** Error 2"
        );
        assert_eq!(
            sanitize_text("a\nb\tc\u{1b}]0;t\u{7}\u{202e}d\u{9b}", 1000),
            "a b c\u{fffd}]0;t\u{fffd}d\u{fffd}"
        );
        assert_eq!(sanitize_text(&"é".repeat(2000), 1000), "é".repeat(1000));
    }

    #[test]
    fn errors_name_the_field() {
        let err = branch("branch", "a;b").unwrap_err();
        assert_eq!(err.field, "branch");
        assert!(err.to_string().starts_with("branch: character ';'"));
    }
}
