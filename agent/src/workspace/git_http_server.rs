//! Test only: git's smart HTTP protocol over `git http-backend` behind a
//! minimal HTTP/1.1 server (one request per connection) that demands an
//! exact `Authorization` header and answers 401 without it.
//!
//! Paths under `/echo-auth/` answer every request with a git `ERR` packet
//! that repeats the request's `Authorization` header, as a careless server
//! might: git prints it in its error output, which the agent must mask.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// One request the server saw.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub path: String,
    pub authorization: Option<String>,
}

pub struct GitHttpServer {
    /// `http://127.0.0.1:<port>`
    pub base_url: String,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    _connections: JoinSet<()>,
}

impl GitHttpServer {
    /// Serves the bare repositories under `project_root` to requests that
    /// carry exactly `authorization` (the header's value).
    pub async fn start(project_root: PathBuf, authorization: String) -> GitHttpServer {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base_url = format!("http://{}", listener.local_addr().unwrap());
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut connections = JoinSet::new();
        let server_seen = seen.clone();
        connections.spawn(async move {
            let mut handlers = JoinSet::new();
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let root = project_root.clone();
                let expected = authorization.clone();
                let seen = server_seen.clone();
                handlers.spawn(async move {
                    let _ = handle(stream, &root, &expected, &seen).await;
                });
                while handlers.try_join_next().is_some() {}
            }
        });
        GitHttpServer {
            base_url,
            seen,
            _connections: connections,
        }
    }

    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }
}

async fn handle(
    stream: TcpStream,
    root: &std::path::Path,
    expected: &str,
    seen: &Mutex<Vec<SeenRequest>>,
) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream);
    let mut request_line = String::new();
    reader.read_line(&mut request_line).await?;
    let mut parts = request_line.split_whitespace();
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();
    let mut headers = HashMap::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).await?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.insert(name.trim().to_ascii_lowercase(), value.trim().to_owned());
        }
    }
    let body = read_body(&mut reader, &headers).await?;
    let (path, query) = target.split_once('?').unwrap_or((&target, ""));
    let authorization = headers.get("authorization").cloned();
    seen.lock().unwrap().push(SeenRequest {
        path: path.to_owned(),
        authorization: authorization.clone(),
    });
    let mut stream = reader.into_inner();

    if authorization.as_deref() != Some(expected) {
        let body = b"authentication required\n";
        let head = format!(
            "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Basic realm=\"git\"\r\n\
             Content-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        return stream.shutdown().await;
    }

    if path.starts_with("/echo-auth/") {
        let mut body = pkt_line("# service=git-upload-pack\n");
        body.extend_from_slice(b"0000");
        body.extend_from_slice(&pkt_line(&format!(
            "ERR access denied for Authorization: {}",
            authorization.unwrap_or_default()
        )));
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-advertisement\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        );
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(&body).await?;
        return stream.shutdown().await;
    }

    let output = http_backend(root, &method, path, query, &headers, body).await?;
    let split = find(&output, b"\r\n\r\n")
        .map(|at| (at, at + 4))
        .or_else(|| find(&output, b"\n\n").map(|at| (at, at + 2)))
        .unwrap_or((output.len(), output.len()));
    let cgi_headers = String::from_utf8_lossy(&output[..split.0]).into_owned();
    let body = &output[split.1..];
    let mut status = "200 OK".to_owned();
    let mut head = String::new();
    for line in cgi_headers.lines() {
        match line.split_once(':') {
            Some((name, value)) if name.eq_ignore_ascii_case("status") => {
                status = value.trim().to_owned();
            }
            Some(_) => {
                head.push_str(line);
                head.push_str("\r\n");
            }
            None => {}
        }
    }
    let head = format!(
        "HTTP/1.1 {status}\r\n{head}Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}

async fn read_body(
    reader: &mut BufReader<TcpStream>,
    headers: &HashMap<String, String>,
) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    if let Some(length) = headers.get("content-length") {
        body.resize(length.parse().unwrap_or(0), 0);
        reader.read_exact(&mut body).await?;
    } else if headers
        .get("transfer-encoding")
        .is_some_and(|te| te.eq_ignore_ascii_case("chunked"))
    {
        loop {
            let mut size = String::new();
            reader.read_line(&mut size).await?;
            let size = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
            let mut chunk = vec![0; size + 2];
            reader.read_exact(&mut chunk).await?;
            if size == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..size]);
        }
    }
    Ok(body)
}

/// Runs `git http-backend` as a CGI program. Not through `process::spawn`,
/// which gives processes no stdin by design; the request body goes there.
#[allow(clippy::disallowed_methods)]
async fn http_backend(
    root: &std::path::Path,
    method: &str,
    path: &str,
    query: &str,
    headers: &HashMap<String, String>,
    body: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    let mut command = tokio::process::Command::new("git");
    command
        .arg("http-backend")
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("GIT_PROJECT_ROOT", root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", method)
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_LENGTH", body.len().to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true);
    for (header, variable) in [
        ("content-type", "CONTENT_TYPE"),
        ("content-encoding", "HTTP_CONTENT_ENCODING"),
        ("git-protocol", "GIT_PROTOCOL"),
    ] {
        if let Some(value) = headers.get(header) {
            command.env(variable, value);
        }
    }
    let mut child = command.spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = tokio::spawn(async move {
        let _ = stdin.write_all(&body).await;
    });
    let output = child.wait_with_output().await?;
    let _ = writer.await;
    Ok(output.stdout)
}

fn pkt_line(text: &str) -> Vec<u8> {
    let mut line = format!("{:04x}", text.len() + 4).into_bytes();
    line.extend_from_slice(text.as_bytes());
    line
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}
