//! The HTTP header git sends to a private repository's host
//! (`Assignment.git_http_header`), e.g. `Authorization: Basic
//! <base64(x-access-token:TOKEN)>`. It is a secret: git gets it only through
//! `GIT_CONFIG_*` (`http.<clone url>.extraHeader`), never argv, a URL or a config file,
//! and everything the agent prints or ships is masked with its
//! [`GitHttpHeader::secret_parts`].

use std::fmt;

use base64::Engine as _;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig};
use hobotnica_common::mask_forms::mask_forms;

/// A header line `Name: value`. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct GitHttpHeader(String);

impl fmt::Debug for GitHttpHeader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("GitHttpHeader([REDACTED])")
    }
}

/// Why a header is refused. Never contains the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InvalidHeader {
    #[error("the git HTTP header is not of the form `Name: value`")]
    Form,
    #[error("the git HTTP header contains a control character")]
    ControlCharacter,
}

/// Decodes standard or URL-safe base64, with or without padding.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);
const LENIENT_URL_SAFE: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

impl GitHttpHeader {
    /// Wraps the header as received; see [`GitHttpHeader::validate`].
    pub fn new(header: impl Into<String>) -> GitHttpHeader {
        GitHttpHeader(header.into())
    }

    /// Checks the form `Name: value` (an HTTP token as the name, a non-empty
    /// value, no control character but tab anywhere), so that the value can
    /// neither inject a second header nor confuse git's configuration.
    pub fn validate(&self) -> Result<(), InvalidHeader> {
        if self.0.chars().any(|c| c.is_control() && c != '\t') {
            return Err(InvalidHeader::ControlCharacter);
        }
        let (name, value) = self.0.split_once(':').ok_or(InvalidHeader::Form)?;
        let token_char = |c: char| c.is_ascii_alphanumeric() || "!#$%&'*+-.^_`|~".contains(c);
        if name.is_empty() || !name.chars().all(token_char) || value.trim().is_empty() {
            return Err(InvalidHeader::Form);
        }
        Ok(())
    }

    /// The header as git's `http.extraHeader` takes it.
    pub(super) fn as_config_value(&self) -> &str {
        &self.0
    }

    /// Everything of the header that must never be shown: the whole header,
    /// its value, the credentials after the scheme; for `Basic` the decoded
    /// `user:password` and the password; for other schemes (`Bearer`,
    /// `token`) the token; and the forms of the decoded parts
    /// ([`mask_forms`]: their base64 at every alignment, both alphabets).
    pub fn secret_parts(&self) -> Vec<String> {
        let mut parts = vec![self.0.clone()];
        let Some((_, value)) = self.0.split_once(':') else {
            return parts;
        };
        let value = value.trim();
        parts.push(value.to_owned());
        let (scheme, credentials) = match value.split_once([' ', '\t']) {
            Some((scheme, credentials)) => (scheme, credentials.trim()),
            None => ("", value),
        };
        parts.push(credentials.to_owned());
        let mut tokens = Vec::new();
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = LENIENT
                .decode(credentials)
                .or_else(|_| LENIENT_URL_SAFE.decode(credentials));
            if let Ok(decoded) = decoded {
                let decoded = String::from_utf8_lossy(&decoded).into_owned();
                if let Some((_, password)) = decoded.split_once(':') {
                    tokens.push(password.to_owned());
                }
                tokens.push(decoded);
            }
        } else {
            tokens.push(credentials.to_owned());
        }
        for token in tokens {
            parts.extend(mask_forms(&token));
        }
        parts.retain(|part| !part.is_empty());
        parts.sort();
        parts.dedup();
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::engine::general_purpose::STANDARD;
    use hobotnica_common::mask_forms::base64_cores;

    fn basic(user_password: &str) -> GitHttpHeader {
        GitHttpHeader::new(format!(
            "Authorization: Basic {}",
            STANDARD.encode(user_password)
        ))
    }

    #[test]
    fn basic_credentials_yield_the_password_and_its_encodings() {
        let header = basic("x-access-token:ghp_SECRET0123456789");
        let parts = header.secret_parts();
        let encoded = STANDARD.encode("x-access-token:ghp_SECRET0123456789");
        for expected in [
            header.as_config_value().to_owned(),
            format!("Basic {encoded}"),
            encoded,
            "x-access-token:ghp_SECRET0123456789".to_owned(),
            "ghp_SECRET0123456789".to_owned(),
        ] {
            assert!(parts.contains(&expected), "{expected} not in the parts");
        }
        // The password's base64 at every alignment (`user:password` encoded
        // by a job hides it at any offset).
        for core in base64_cores(b"ghp_SECRET0123456789") {
            assert!(parts.contains(&core), "{core} not in the parts");
        }
        // The user name alone is not a secret.
        assert!(!parts.contains(&"x-access-token".to_owned()));
    }

    #[test]
    fn bearer_and_token_schemes_yield_the_token() {
        for scheme in ["Bearer", "token", "BEARER"] {
            let header = GitHttpHeader::new(format!("Authorization: {scheme} ghs_abcdef123456"));
            let parts = header.secret_parts();
            assert!(parts.contains(&"ghs_abcdef123456".to_owned()), "{scheme}");
            for core in base64_cores(b"ghs_abcdef123456") {
                assert!(parts.contains(&core), "{scheme}: {core}");
            }
        }
    }

    #[test]
    fn debug_never_prints_the_header() {
        let header = basic("u:p4ssw0rd");
        assert_eq!(format!("{header:?}"), "GitHttpHeader([REDACTED])");
    }

    #[test]
    fn validation() {
        assert_eq!(basic("u:p").validate(), Ok(()));
        assert_eq!(GitHttpHeader::new("X-Token: abc").validate(), Ok(()),);
        for (header, error) in [
            ("Authorization Basic abc", InvalidHeader::Form),
            (": Basic abc", InvalidHeader::Form),
            ("Bad Name: abc", InvalidHeader::Form),
            ("Authorization:   ", InvalidHeader::Form),
            (
                "Authorization: Basic abc\r\nX-Other: 1",
                InvalidHeader::ControlCharacter,
            ),
            (
                "Authorization: Basic abc\n",
                InvalidHeader::ControlCharacter,
            ),
            (
                "Authorization: Basic \0abc",
                InvalidHeader::ControlCharacter,
            ),
        ] {
            assert_eq!(
                GitHttpHeader::new(header).validate(),
                Err(error),
                "{header:?}"
            );
        }
    }
}
