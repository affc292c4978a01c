//! The browser's side of a session: the cookie, the `Viewer` extractor
//! (the caller of a page, from the cookie through
//! `Services::web_session`), and the checks every state-changing request
//! passes: same origin (`Sec-Fetch-Site`, `Origin`) and the session's CSRF
//! token in the form.

use std::net::{IpAddr, SocketAddr};

use axum::Form;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request};
use axum::http::{HeaderMap, HeaderValue, header, request::Parts};
use serde::de::DeserializeOwned;

use super::PageError;
use crate::services::Services;
use crate::sessions::{SESSION_LIFETIME, SessionId, WebSession};

/// The session cookie's name.
pub const COOKIE: &str = "hobotnica_session";

/// The signed-in caller of a page.
pub struct Viewer(pub WebSession);

/// The client's address (for the failed-authentication limits).
pub fn client_ip(parts: &Parts) -> Option<IpAddr> {
    parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip())
}

/// The session id the request's cookie carries, if any.
pub fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|value| !value.is_empty())
}

impl FromRequestParts<Services> for Viewer {
    type Rejection = PageError;

    async fn from_request_parts(
        parts: &mut Parts,
        services: &Services,
    ) -> Result<Self, Self::Rejection> {
        let id = session_cookie(&parts.headers).ok_or(PageError::SignInFirst)?;
        services
            .web_session(id, client_ip(parts))
            .await?
            .map(Viewer)
            .ok_or(PageError::SignInFirst)
    }
}

/// Refuses a request another site made the browser send: `Sec-Fetch-Site`
/// must say `same-origin` (or `none`: typed by the user), and `Origin`,
/// when sent, must name this host. A client that sends neither is not a
/// browser acting for another site (and browsers send both on a POST).
pub fn check_same_origin(parts: &Parts) -> Result<(), PageError> {
    const REFUSED: &str = "This request came from another site, so it was refused.";
    if let Some(site) = parts.headers.get("sec-fetch-site")
        && !matches!(site.as_bytes(), b"same-origin" | b"none")
    {
        return Err(PageError::Refused(REFUSED));
    }
    if let Some(origin) = parts.headers.get(header::ORIGIN) {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|host| host.to_str().ok())
            .or_else(|| parts.uri.authority().map(|authority| authority.as_str()));
        let origin_host = origin
            .to_str()
            .ok()
            .and_then(|origin| origin.split_once("://"))
            .map(|(_, host)| host);
        match (origin_host, host) {
            (Some(origin_host), Some(host)) if origin_host.eq_ignore_ascii_case(host) => {}
            _ => return Err(PageError::Refused(REFUSED)),
        }
    }
    Ok(())
}

/// A form that carries a CSRF token.
pub trait CsrfCarrier {
    /// The token the form was sent with (empty when missing).
    fn csrf(&self) -> &str;
}

/// A state-changing form post, checked the one way every such post is:
/// from this site ([`check_same_origin`]), by a signed-in caller, carrying
/// that session's CSRF token ([`check_csrf`]). A handler that takes it
/// cannot forget a check.
pub struct Posted<T> {
    pub session: WebSession,
    pub form: T,
}

impl<T> FromRequest<Services> for Posted<T>
where
    T: DeserializeOwned + CsrfCarrier + Send,
{
    type Rejection = PageError;

    async fn from_request(request: Request, services: &Services) -> Result<Self, PageError> {
        let (mut parts, body) = request.into_parts();
        check_same_origin(&parts)?;
        let Viewer(session) = Viewer::from_request_parts(&mut parts, services).await?;
        let Form(form) = Form::<T>::from_request(Request::from_parts(parts, body), services)
            .await
            .map_err(|_| PageError::Refused("The form could not be read."))?;
        check_csrf(&session, form.csrf())?;
        Ok(Posted { session, form })
    }
}

/// Refuses a form that does not carry the session's CSRF token.
fn check_csrf(session: &WebSession, given: &str) -> Result<(), PageError> {
    if given.is_empty() || !session.csrf_matches(given) {
        return Err(PageError::Refused(
            "This form did not carry this session's security token (CSRF), so it was refused.",
        ));
    }
    Ok(())
}

/// The cookie that holds a new session: not readable by scripts, never
/// sent along with another site's requests, `Secure` when the controller
/// serves TLS, gone when the session expires.
pub fn set_cookie(id: &SessionId, tls: bool) -> HeaderValue {
    cookie(id.expose(), SESSION_LIFETIME.as_secs(), tls)
}

/// The cookie that removes the session's cookie.
pub fn clear_cookie(tls: bool) -> HeaderValue {
    cookie("", 0, tls)
}

fn cookie(value: &str, max_age: u64, tls: bool) -> HeaderValue {
    let secure = if tls { "; Secure" } else { "" };
    let cookie =
        format!("{COOKIE}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={max_age}{secure}");
    // A session id is hex: always a valid header value.
    HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use axum::http::Request;

    use super::*;

    fn parts(headers: &[(&str, &str)]) -> Parts {
        let mut request = Request::builder().uri("/sign-out").method("POST");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.body(()).unwrap().into_parts().0
    }

    #[test]
    fn only_same_origin_requests_pass() {
        let host = ("host", "ci.example.com:8080");
        let cases: &[(&[(&str, &str)], bool)] = &[
            (&[host], true),
            (&[host, ("origin", "http://ci.example.com:8080")], true),
            (
                &[
                    host,
                    ("origin", "https://ci.example.com:8080"),
                    ("sec-fetch-site", "same-origin"),
                ],
                true,
            ),
            (&[host, ("sec-fetch-site", "none")], true),
            (&[host, ("origin", "http://evil.example:8080")], false),
            (&[host, ("origin", "null")], false),
            (&[host, ("sec-fetch-site", "cross-site")], false),
            (
                &[
                    host,
                    ("sec-fetch-site", "same-site"),
                    ("origin", "http://ci.example.com:8080"),
                ],
                false,
            ),
            (&[host, ("origin", "http://ci.example.com:9090")], false),
        ];
        for (headers, allowed) in cases {
            assert_eq!(
                check_same_origin(&parts(headers)).is_ok(),
                *allowed,
                "{headers:?}"
            );
        }
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let headers = parts(&[("cookie", "a=1; hobotnica_session=abc123; b=2")]).headers;
        assert_eq!(session_cookie(&headers), Some("abc123"));
        let headers = parts(&[("cookie", "hobotnica_session=")]).headers;
        assert_eq!(session_cookie(&headers), None);
        assert_eq!(session_cookie(&parts(&[]).headers), None);
    }

    #[test]
    fn the_cookie_is_http_only_strict_and_secure_over_tls() {
        let plain = clear_cookie(false);
        assert_eq!(
            plain.to_str().unwrap(),
            "hobotnica_session=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0"
        );
        assert!(clear_cookie(true).to_str().unwrap().ends_with("; Secure"));
    }
}
