//! Git's smart HTTP protocol at `/{owner}/{name}.git/...`, served by the real
//! `git http-backend` run as a CGI program (an argument vector, a cleared
//! environment), behind GitHub's rules: `Authorization: Basic
//! base64(<any user>:<token>)` with a known token, else 401 with
//! `WWW-Authenticate: Basic realm="GitHub"`; a token without access to the
//! repository gets GitHub's 404 `Repository not found.`; pushing needs push
//! access.

use std::process::Stdio;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::Response;
use base64::Engine as _;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio_stream::StreamExt as _;
use tokio_util::io::ReaderStream;

use super::{Permission, Shared};

/// `("owner/name", "rest")` of `/owner/name.git/rest`, when every part is a
/// plain name.
pub(super) fn split_path(path: &str) -> Option<(String, String)> {
    let mut parts = path.trim_start_matches('/').splitn(3, '/');
    let owner = parts.next()?;
    let name = parts.next()?.strip_suffix(".git")?;
    let rest = parts.next()?;
    let plain = |part: &str| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b))
    };
    (plain(owner) && plain(name) && rest.split('/').all(plain))
        .then(|| (format!("{owner}/{name}"), rest.to_owned()))
}

/// The password of `Authorization: Basic base64(user:password)`.
fn basic_password(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let decoded = String::from_utf8(decoded).ok()?;
    let (_user, password) = decoded.split_once(':')?;
    Some(password.to_owned())
}

fn text(status: StatusCode, body: &str) -> Response {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(body.to_owned()))
        .expect("a response")
}

fn unauthorized() -> Response {
    let mut response = text(
        StatusCode::UNAUTHORIZED,
        "Invalid username or token. Password authentication is not supported for Git operations.\n",
    );
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"GitHub\""),
    );
    response
}

/// Serves `rest` of repository `repo` (`owner/name`).
pub(super) async fn serve(
    shared: Arc<Shared>,
    repo: String,
    rest: String,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let query = parts.uri.query().unwrap_or_default().to_owned();
    let push = query.contains("service=git-receive-pack") || rest.ends_with("git-receive-pack");
    let needed = if push {
        Permission::Push
    } else {
        Permission::Pull
    };
    let login = {
        let state = shared.lock();
        let Some((token, login)) = basic_password(&parts.headers)
            .and_then(|token| state.tokens.get(&token).map(|login| (token, login.clone())))
        else {
            return unauthorized();
        };
        let permission = state.permission(&token, &repo);
        if !state.repos.contains_key(&repo) || permission == Permission::None {
            return text(StatusCode::NOT_FOUND, "Repository not found.\n");
        }
        if permission < needed {
            return text(
                StatusCode::FORBIDDEN,
                &format!("Permission to {repo}.git denied to {login}.\n"),
            );
        }
        login
    };

    let header_text = |name: &HeaderName| {
        parts
            .headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let mut command = tokio::process::Command::new("git");
    command
        .arg("http-backend")
        .env_clear()
        .env("GIT_PROJECT_ROOT", &shared.project_root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("PATH_INFO", format!("/{repo}.git/{rest}"))
        .env("QUERY_STRING", &query)
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("REMOTE_USER", &login)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", &shared.project_root)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    if let Some(path) = std::env::var_os("PATH") {
        command.env("PATH", path);
    }
    for (name, variable) in [
        (header::CONTENT_TYPE, "CONTENT_TYPE"),
        (header::CONTENT_LENGTH, "CONTENT_LENGTH"),
        (header::CONTENT_ENCODING, "HTTP_CONTENT_ENCODING"),
        (HeaderName::from_static("git-protocol"), "GIT_PROTOCOL"),
    ] {
        if let Some(value) = header_text(&name) {
            command.env(variable, value);
        }
    }
    let mut child = match command.spawn() {
        Ok(child) => child,
        Err(err) => {
            shared
                .lock()
                .git_errors
                .push(format!("cannot start git http-backend: {err}"));
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                "git http-backend failed\n",
            );
        }
    };
    let (Some(mut stdin), Some(stdout), Some(mut stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "git http-backend failed\n",
        );
    };

    // The request body goes to its stdin while its answer is read.
    tokio::spawn(async move {
        let mut body = body.into_data_stream();
        while let Some(Ok(chunk)) = body.next().await {
            if stdin.write_all(&chunk).await.is_err() {
                return;
            }
        }
        let _ = stdin.shutdown().await;
    });
    // Reap it, keeping what it complained about.
    let reaper_shared = Arc::clone(&shared);
    let what = format!("{} /{repo}.git/{rest}?{query}", parts.method);
    tokio::spawn(async move {
        let mut errors = String::new();
        let _ = stderr.read_to_string(&mut errors).await;
        let status = child.wait().await;
        let failed = !status.as_ref().is_ok_and(std::process::ExitStatus::success);
        if failed || !errors.trim().is_empty() {
            reaper_shared
                .lock()
                .git_errors
                .push(format!("{what}: {status:?}: {errors}"));
        }
    });

    // CGI headers, then the body as it comes.
    let mut reader = BufReader::new(stdout);
    let mut response = Response::builder();
    let mut status = StatusCode::OK;
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let line = line.trim_end_matches(['\r', '\n']);
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            status = value
                .split(' ')
                .next()
                .and_then(|code| code.parse::<u16>().ok())
                .and_then(|code| StatusCode::from_u16(code).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            response = response.header(name, value);
        }
    }
    response
        .status(status)
        .body(Body::from_stream(ReaderStream::new(reader)))
        .expect("a response")
}
