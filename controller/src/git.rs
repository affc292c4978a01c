//! PORT: the git questions the controller asks a repository (which commit a
//! branch points at), answered by `git ls-remote` spawned with an argument
//! vector and a minimal environment.

use std::time::Duration;

use hobotnica_common::ids::CommitSha;
use tokio::process::Command;

/// How long `git ls-remote` may take before the request fails.
pub const LS_REMOTE_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("branch {branch:?} does not exist in the repository")]
    NoSuchBranch { branch: String },
    #[error("could not read the repository: {0}")]
    Unreachable(String),
}

/// The commit `branch` points at in the repository at `git_url`.
#[allow(clippy::disallowed_methods)] // the controller's one place that spawns processes
pub async fn resolve_branch(git_url: &str, branch: &str) -> Result<CommitSha, GitError> {
    let reference = format!("refs/heads/{branch}");
    let mut command = Command::new("git");
    command
        .args(["ls-remote", "--exit-code", git_url, &reference])
        .env_clear()
        .envs(crate::config::process_base_env())
        .env("GIT_TERMINAL_PROMPT", "0")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(LS_REMOTE_TIMEOUT, command.output())
        .await
        .map_err(|_| GitError::Unreachable("git ls-remote timed out".to_owned()))?
        .map_err(|err| GitError::Unreachable(format!("cannot run git: {err}")))?;
    // --exit-code: 2 means the repository answered but has no such ref.
    if output.status.code() == Some(2) {
        return Err(GitError::NoSuchBranch {
            branch: branch.to_owned(),
        });
    }
    if !output.status.success() {
        let stderr = String::from_utf8_lossy(&output.stderr);
        let first_line = stderr.lines().next().unwrap_or_default();
        tracing::warn!(error = %without_userinfo(first_line), "git ls-remote failed");
        return Err(GitError::Unreachable(why_unreachable(&stderr).to_owned()));
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    stdout
        .lines()
        .find_map(|line| {
            let (sha, name) = line.split_once('\t')?;
            (name == reference).then(|| sha.parse::<CommitSha>().ok())?
        })
        .ok_or(GitError::NoSuchBranch {
            branch: branch.to_owned(),
        })
}

/// `text` with the user and password of every `scheme://user:pw@host` in it
/// replaced (git echoes the URL; one stored before credentials in URLs were
/// refused may carry them).
fn without_userinfo(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("://") {
        let (before, after) = rest.split_at(start + 3);
        out.push_str(before);
        let authority_end = after
            .find(|c: char| c == '/' || c == '\'' || c == '"' || c.is_whitespace())
            .unwrap_or(after.len());
        match after[..authority_end].rfind('@') {
            Some(at) => {
                out.push_str("***");
                rest = &after[at..];
            }
            None => rest = after,
        }
    }
    out.push_str(rest);
    out
}

/// What went wrong reading a remote, in our words: git's messages can carry
/// the remote's own bytes (an HTTP server answering the git protocol, an SSH
/// banner), which a caller must not be shown.
fn why_unreachable(stderr: &str) -> &'static str {
    let stderr = stderr.to_ascii_lowercase();
    let known: [(&[&str], &str); 6] = [
        (
            &[
                "could not resolve host",
                "name or service not known",
                "temporary failure in name resolution",
            ],
            "its host name does not resolve",
        ),
        (&["connection refused"], "its host refused the connection"),
        (&["timed out"], "the connection timed out"),
        (
            &[
                "authentication failed",
                "permission denied",
                "could not read username",
                "terminal prompts disabled",
                "403",
            ],
            "it needs credentials the controller does not have",
        ),
        (
            &[
                "not found",
                "does not appear to be a git repository",
                "does not exist",
            ],
            "there is no repository at that URL",
        ),
        (
            &["certificate", "ssl", "tls"],
            "its TLS certificate is not trusted",
        ),
    ];
    known
        .iter()
        .find(|(needles, _)| needles.iter().any(|needle| stderr.contains(needle)))
        .map_or(
            "git could not read it (the remote did not answer as a git server)",
            |(_, why)| why,
        )
}

/// [`check_git_url`] as an ECMA-262 pattern, for the OpenAPI schema.
/// Whitespace and control characters are listed as Rust's `char` methods see
/// them, since regex engines disagree on `\s`.
pub const GIT_URL_PATTERN: &str = concat!(
    r"^(?!-)",
    r"(?=[^\u0000-\u0020\u007f-\u009f\u00a0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]{1,2048}$)",
    r"(?:(?:https://|http://|git://|file://)(?![^/]*@)|ssh://(?![^/@]*:[^/]*@)|/|(?!.*://)(?!.*::)[^:]*@[^:]*:)",
);

/// Whether `url` is a git URL the controller accepts: http(s), ssh, git,
/// file, scp-like `user@host:path`, or an absolute path. Transports that run
/// commands (`ext::`) and anything that looks like an option are refused.
pub fn check_git_url(url: &str) -> Result<(), &'static str> {
    if url.is_empty() || url.chars().count() > 2048 {
        return Err("must be 1 to 2048 characters");
    }
    if url.starts_with('-') {
        return Err("must not start with '-'");
    }
    if url.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err("must not contain whitespace or control characters");
    }
    let allowed_scheme = ["https://", "http://", "ssh://", "git://", "file://"]
        .iter()
        .any(|scheme| url.starts_with(scheme));
    let scp_like = !url.contains("://")
        && !url.contains("::")
        && url
            .split_once(':')
            .is_some_and(|(host, _)| host.contains('@'));
    if allowed_scheme && carries_credentials(url) {
        return Err(
            "must not carry credentials (user@ or user:password@): they would be stored and shown in the clear; register the repository on GitHub, or give the agents' hosts access another way (an SSH key, a git credential helper)",
        );
    }
    if allowed_scheme || scp_like || url.starts_with('/') {
        Ok(())
    } else {
        Err(
            "must be an https://, http://, ssh://, git:// or file:// URL, user@host:path, or an absolute path",
        )
    }
}

/// Whether a `scheme://` URL has credentials before its host: any user
/// (`https://TOKEN@host` is how tokens travel) except ssh's, which names an
/// account, not a secret, unless it carries a password.
fn carries_credentials(url: &str) -> bool {
    let Some((scheme, rest)) = url.split_once("://") else {
        return false;
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let Some((userinfo, _host)) = authority.split_once('@') else {
        return false;
    };
    scheme != "ssh" || userinfo.contains(':')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logged_git_messages_hold_no_credentials() {
        assert_eq!(
            without_userinfo("fatal: unable to access 'https://user:s3cret@host/r.git/': 403"),
            "fatal: unable to access 'https://***@host/r.git/': 403"
        );
        assert_eq!(
            without_userinfo("fatal: 'https://host/r' and git://ghp_tok@h/x"),
            "fatal: 'https://host/r' and git://***@h/x"
        );
    }

    #[test]
    fn credentials_in_urls_are_refused() {
        for bad in [
            "https://user:s3cret@git.example.com/r.git",
            "https://ghp_token@github.com/o/r.git",
            "http://u:p@host/r",
            "git://u@host/r",
            "ssh://git:s3cret@host/r",
            "file://u@localhost/srv/r.git",
        ] {
            let refused = check_git_url(bad).expect_err(bad);
            assert!(refused.contains("credentials"), "{bad}: {refused}");
        }
        for ok in [
            "ssh://git@host/r",
            "ssh://host:22/r",
            "git@github.com:o/r.git",
            "https://host/path@v1/r.git",
        ] {
            assert_eq!(check_git_url(ok), Ok(()), "{ok}");
        }
    }

    /// A remote that answers the git protocol with an HTTP response: git
    /// says "bad line length character: HTTP", the remote's own bytes. The
    /// answer says what failed in our words instead.
    #[tokio::test]
    async fn an_unreachable_remote_is_described_without_its_own_bytes() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("address");
        let server = tokio::spawn(async move {
            while let Ok((mut socket, _)) = listener.accept().await {
                let mut request = [0u8; 512];
                let _ = socket.read(&mut request).await;
                let _ = socket
                    .write_all(b"HTTP/1.1 400 Bad Request\r\nServer: SECRET-BANNER-42\r\n\r\n")
                    .await;
            }
        });
        let err = resolve_branch(&format!("git://{addr}/r.git"), "main")
            .await
            .expect_err("not a git server");
        let shown = err.to_string();
        assert!(
            !shown.contains("HTTP") && !shown.contains("SECRET-BANNER"),
            "{shown}"
        );
        assert!(shown.contains("could not read the repository"), "{shown}");
        server.abort();
    }

    #[test]
    fn git_urls() {
        for ok in [
            "https://github.com/o/r.git",
            "file:///tmp/x.git",
            "git@github.com:o/r.git",
            "/srv/git/r.git",
            "ssh://git@host/r",
        ] {
            assert_eq!(check_git_url(ok), Ok(()), "{ok}");
        }
        for bad in [
            "",
            "-uhttps://x",
            "ext::sh -c touch% /tmp/pwned",
            "ext::sh",
            "fd::17",
            "relative/path",
            "https://x y",
            "ftp://host/r",
        ] {
            assert!(check_git_url(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn pattern_agrees_with_check() {
        let regex = fancy_regex::Regex::new(GIT_URL_PATTERN).unwrap();
        let pieces = [
            "https://", "http://", "ssh://", "git://", "file://", "ftp://", "ext::", "::", "/",
            "@", ":", "-", "h", "x y", "\t", "\u{85}", "\u{a0}", "\u{3000}", "\u{feff}", "é",
        ];
        let mut corpus = vec![String::new()];
        let mut layer = corpus.clone();
        for _ in 0..4 {
            layer = layer
                .iter()
                .flat_map(|prefix| pieces.iter().map(move |p| format!("{prefix}{p}")))
                .collect();
            corpus.extend(layer.iter().cloned());
        }
        corpus.push(format!("https://{}", "a".repeat(2040)));
        corpus.push(format!("https://{}", "a".repeat(2041)));
        corpus.push(format!("https://{}", "é".repeat(2040)));
        for url in &corpus {
            assert_eq!(
                regex.is_match(url).unwrap(),
                check_git_url(url).is_ok(),
                "pattern and check disagree on {url:?}"
            );
        }
    }
}
