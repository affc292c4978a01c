//! A job's log for the browser, authenticated by the session cookie:
//! server-sent events that follow it live (`/jobs/{id}/log/events`) and
//! the raw bytes (`/jobs/{id}/log/raw`, a download, and the ranges "Load
//! earlier" fetches).
//!
//! The events come from the core's log tail (`Services::tail_log`, the
//! stream `LogService.Tail` serves), which wakes on the store's events:
//! no polling per client. Each `log` event's data is a piece of the log in
//! base64 (bytes, not text: a piece may end inside a UTF-8 character) and
//! its `id` is the byte offset where the piece ends. A client resumes from
//! that offset: the browser sends it back as `Last-Event-ID`, or the page
//! asks with `?from=`; pieces start exactly there, so no byte is lost or
//! sent twice. One `end` event (the job's final facts as JSON) closes the
//! stream once the job has ended and every byte was sent.
//!
//! A page that follows the log's end asks with `catch_up=true`: when it
//! falls more than [`CATCH_UP_LAG_BYTES`] behind (a job writes faster than
//! the browser draws), a `skip` event jumps it to the log's last part
//! instead (`Services::tail_log_catching_up`); the page loads what it
//! skipped on demand, as it does the part before its first line.

use std::convert::Infallible;
use std::time::Duration;

use axum::Extension;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use futures_util::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::PageError;
use super::job::{JobFacts, LOG_WINDOW_BYTES, job_id};
use super::session::Viewer;
use crate::logs::{TailItem, ViewerItem};
use crate::services::Services;

/// How often an idle event stream sends a comment, so that proxies keep
/// it open.
pub const EVENTS_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(15);

/// How long a browser waits before reconnecting an event stream that broke.
pub const EVENTS_RETRY: Duration = Duration::from_secs(1);

/// The signal that ends every event stream: the controller is stopping.
#[derive(Clone)]
pub struct Shutdown(pub CancellationToken);

/// How far behind the log's end a page that follows it may fall before
/// the stream skips ahead to its last part ([`LOG_WINDOW_BYTES`]).
pub const CATCH_UP_LAG_BYTES: u64 = 1024 * 1024;

#[derive(Debug, Deserialize)]
pub struct EventsQuery {
    /// The offset to resume from when the request has no `Last-Event-ID`.
    from: Option<u64>,
    /// Whether to skip ahead when the page falls far behind (it follows
    /// the log's end), rather than send every byte.
    #[serde(default)]
    catch_up: bool,
}

/// The offset a request resumes from: `Last-Event-ID` (the browser's own
/// reconnect) first, then `?from=`, else the start.
fn resume_offset(headers: &HeaderMap, query: &EventsQuery) -> u64 {
    headers
        .get("last-event-id")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.trim().parse().ok())
        .or(query.from)
        .unwrap_or(0)
}

/// What a `skip` event says: the page jumps from `from` to `to`, over
/// `lines` line ends, and applies the SGR parameters `colours`.
#[derive(Serialize)]
struct SkipEvent {
    from: u64,
    to: u64,
    lines: u64,
    colours: String,
}

/// The SSE event of one item of a viewer's tail.
fn event_of(item: ViewerItem) -> Event {
    let item = match item {
        ViewerItem::Log(item) => item,
        ViewerItem::Skipped(skip) => {
            let data = SkipEvent {
                from: skip.from,
                to: skip.to,
                lines: skip.lines,
                colours: skip.colours.params(),
            };
            return Event::default()
                .event("skip")
                .id(skip.to.to_string())
                .data(serde_json::to_string(&data).unwrap_or_else(|_| "{}".to_owned()));
        }
    };
    match item {
        TailItem::Chunk { offset, data } => Event::default()
            .event("log")
            .id((offset + data.len() as u64).to_string())
            .data(base64::engine::general_purpose::STANDARD.encode(&data)),
        TailItem::End(job) => {
            let facts = JobFacts::from(job.as_ref());
            Event::default()
                .event("end")
                .data(serde_json::to_string(&facts).unwrap_or_else(|_| "{}".to_owned()))
        }
    }
}

/// `GET /jobs/{id}/log/events`: the log from the resume offset, live.
pub async fn events(
    State(services): State<Services>,
    Extension(Shutdown(shutdown)): Extension<Shutdown>,
    Viewer(session): Viewer,
    Path(id): Path<String>,
    Query(query): Query<EventsQuery>,
    headers: HeaderMap,
) -> Result<Response, PageError> {
    let id = job_id(&id)?;
    let offset = resume_offset(&headers, &query);
    let lag = query.catch_up.then_some(CATCH_UP_LAG_BYTES);
    let tail = services
        .tail_log_catching_up(&session.caller, id, offset, lag, LOG_WINDOW_BYTES)
        .await?;
    let first = futures_util::stream::once(async {
        Ok::<_, Infallible>(Event::default().retry(EVENTS_RETRY).comment("log"))
    });
    let events = tail
        .take_while(move |item| {
            if let Err(err) = item {
                // The browser reconnects and resumes from the last piece.
                tracing::warn!(job_id = id.0, error = %err, "a log event stream ended early");
            }
            std::future::ready(item.is_ok())
        })
        .filter_map(|item| std::future::ready(item.ok().map(|item| Ok(event_of(item)))));
    Ok(Sse::new(until_shutdown(first.chain(events), shutdown))
        .keep_alive(KeepAlive::new().interval(EVENTS_KEEPALIVE_INTERVAL))
        .into_response())
}

/// `stream` until `shutdown`: a stopping controller ends its event streams
/// (browsers resume elsewhere, or here once it is back).
pub fn until_shutdown<T: Send + 'static>(
    stream: impl Stream<Item = T> + Send + 'static,
    shutdown: CancellationToken,
) -> impl Stream<Item = T> + Send + 'static {
    futures_util::stream::unfold(Some((Box::pin(stream), shutdown)), |state| async move {
        let (mut stream, shutdown) = state?;
        tokio::select! {
            biased;
            () = shutdown.cancelled() => None,
            item = stream.next() => item.map(|item| (item, Some((stream, shutdown)))),
        }
    })
}

#[derive(Debug, Deserialize)]
pub struct RawQuery {
    /// The first byte (default 0).
    offset: Option<u64>,
    /// The byte after the last (default: the log's length now).
    end: Option<u64>,
}

/// `GET /jobs/{id}/log/raw`: the log's bytes as stored, as a download
/// (`text/plain`, an attachment). `X-Log-Length` is the log's length when
/// the answer started.
pub async fn raw(
    State(services): State<Services>,
    Viewer(session): Viewer,
    Path(id): Path<String>,
    Query(query): Query<RawQuery>,
) -> Result<Response, PageError> {
    let id = job_id(&id)?;
    let log = services
        .read_log(&session.caller, id, query.offset.unwrap_or(0), query.end)
        .await?;
    let mut response = Response::new(Body::from_stream(log.body));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    if let Ok(disposition) =
        HeaderValue::from_str(&format!("attachment; filename=\"job-{id}.log\""))
    {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    headers.insert("x-log-length", HeaderValue::from(log.length));
    Ok(response)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_reconnect_resumes_from_last_event_id_before_the_query() {
        let mut headers = HeaderMap::new();
        let query = EventsQuery {
            from: Some(7),
            catch_up: false,
        };
        assert_eq!(resume_offset(&headers, &query), 7);
        let start = EventsQuery {
            from: None,
            catch_up: false,
        };
        assert_eq!(resume_offset(&headers, &start), 0);
        headers.insert("last-event-id", HeaderValue::from_static("1234"));
        assert_eq!(resume_offset(&headers, &query), 1234);
        headers.insert("last-event-id", HeaderValue::from_static("not a number"));
        assert_eq!(resume_offset(&headers, &query), 7);
    }
}
