//! Keeps credentials embedded in git URLs (`https://user:token@host/...`)
//! out of logs, job output and error messages.

/// The URL with any `user:password@` part replaced by `***@`.
pub fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        // scp-like `git@host:owner/repo` or a path: no password possible.
        return url.to_owned();
    };
    let authority_start = scheme_end + 3;
    let rest = &url[authority_start..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => format!("{}***{}", &url[..authority_start], &rest[at..]),
        None => url.to_owned(),
    }
}

/// `text` with the URL, and its user information alone, replaced by their
/// redacted forms.
pub fn scrub(text: &str, url: &str) -> String {
    let redacted = redact_url(url);
    if redacted == url {
        return text.to_owned();
    }
    let mut text = text.replace(url, &redacted);
    if let Some(scheme_end) = url.find("://") {
        let rest = &url[scheme_end + 3..];
        let authority_end = rest.find('/').unwrap_or(rest.len());
        if let Some(at) = rest[..authority_end].rfind('@') {
            let userinfo = &rest[..at];
            for secret in [Some(userinfo), userinfo.split_once(':').map(|(_, p)| p)]
                .into_iter()
                .flatten()
            {
                if secret.len() >= 4 {
                    text = text.replace(secret, "***");
                }
            }
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_redacted() {
        let cases = [
            (
                "https://x-access-token:ghp_abc@github.com/o/r.git",
                "https://***@github.com/o/r.git",
            ),
            ("https://github.com/o/r.git", "https://github.com/o/r.git"),
            ("git@github.com:o/r.git", "git@github.com:o/r.git"),
            ("/srv/git/r.git", "/srv/git/r.git"),
            ("file:///srv/git/r@1.git", "file:///srv/git/r@1.git"),
            ("ssh://git@host:22/r.git", "ssh://***@host:22/r.git"),
        ];
        for (url, expected) in cases {
            assert_eq!(redact_url(url), expected, "{url}");
        }
    }

    #[test]
    fn scrubbing_removes_the_password_everywhere() {
        let url = "https://user:ghp_secret1@github.com/o/r.git";
        let text = format!("fatal: could not read from {url}; password ghp_secret1 rejected");
        let scrubbed = scrub(&text, url);
        assert!(!scrubbed.contains("ghp_secret1"), "{scrubbed}");
        assert!(scrubbed.contains("https://***@github.com/o/r.git"));
    }
}
