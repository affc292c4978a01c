//! The one transport-security rule for controller URLs, applied by the agent
//! and `hobot`: `https://` is TLS with a verified certificate; plain
//! `http://` is allowed only to a loopback host, unless the user gave
//! `--insecure`.

use std::net::IpAddr;

use tonic::codegen::http::Uri;

/// Whether `host` (a URL's host, IPv6 in brackets or not) is this machine:
/// `localhost` or a loopback address.
pub fn is_loopback_host(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.eq_ignore_ascii_case("localhost") || host.eq_ignore_ascii_case("localhost.") {
        return true;
    }
    host.parse::<IpAddr>()
        .is_ok_and(|ip| ip.to_canonical().is_loopback())
}

/// Checks a controller URL given with `option` and says whether it uses
/// TLS. `http://` to a host other than loopback is refused unless
/// `insecure`.
pub fn check_url(option: &str, url: &str, insecure: bool) -> Result<bool, String> {
    let uri: Uri = url
        .parse()
        .map_err(|_| format!("{option} {url:?} is not a valid URL"))?;
    let host = uri
        .host()
        .filter(|host| !host.is_empty())
        .ok_or_else(|| format!("{option} {url:?} has no host"))?;
    match uri.scheme_str() {
        Some("https") => Ok(true),
        Some("http") if insecure || is_loopback_host(host) => Ok(false),
        Some("http") => Err(format!(
            "{option} {url:?} is plaintext http:// to {host}, which is not a loopback address: \
             use https:// (a controller started with --tls-cert), or --insecure \
             (HOBOTNICA_INSECURE=true) to send tokens and logs unencrypted"
        )),
        _ => Err(format!(
            "{option} {url:?} must start with https:// or http://"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_hosts() {
        for host in [
            "localhost",
            "LOCALHOST",
            "127.0.0.1",
            "127.1.2.3",
            "::1",
            "[::1]",
        ] {
            assert!(is_loopback_host(host), "{host}");
        }
        for host in [
            "0.0.0.0",
            "10.0.0.1",
            "example.com",
            "localhost.example.com",
            "[::]",
        ] {
            assert!(!is_loopback_host(host), "{host}");
        }
    }

    #[test]
    fn plaintext_only_to_loopback_unless_insecure() {
        let cases = [
            ("https://ci.example.com:8081", false, Ok(true)),
            ("https://127.0.0.1:8081", false, Ok(true)),
            ("http://127.0.0.1:8081", false, Ok(false)),
            ("http://localhost:8081", false, Ok(false)),
            ("http://[::1]:8081", false, Ok(false)),
            ("http://ci.example.com:8081", true, Ok(false)),
        ];
        for (url, insecure, expected) in cases {
            assert_eq!(check_url("--controller", url, insecure), expected, "{url}");
        }
        let error = check_url("--controller", "http://ci.example.com:8081", false)
            .expect_err("plaintext off loopback");
        assert!(
            error.contains("--insecure") && error.contains("https://"),
            "{error}"
        );
        assert!(check_url("--controller", "ftp://host/", true).is_err());
        assert!(check_url("--controller", "not a url", true).is_err());
    }
}
