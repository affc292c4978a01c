//! `hobot logs [-f]`: a job's log over gRPC `LogService.Tail`.
//!
//! When stdout is not a terminal (a file, a pipe) or with `--raw`, the
//! bytes go to stdout unchanged. On a terminal they go through
//! [`TerminalFilter`]: colours and text pass, every other escape sequence
//! (clipboard writes, title changes, screen clears) is dropped. When
//! following, a broken stream (a controller restart, say) is resumed from
//! the last byte written, and the exit code is the job's.

use std::fmt;
use std::io::IsTerminal as _;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use hobotnica_common::logs::{AppendPlan, plan_append};
use hobotnica_common::proto::log_service_client::LogServiceClient;
use hobotnica_common::proto::{JobEnd, TailRequest, tail_response};
use tokio::io::AsyncWriteExt as _;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::client::{Client, Unreachable};
use crate::terminal::TerminalFilter;

/// How long a followed tail keeps trying to reconnect before giving up.
pub const RECONNECT_TIMEOUT: Duration = Duration::from_secs(60);
/// First pause between reconnection attempts; doubles up to
/// [`MAX_RECONNECT_INTERVAL`].
const RECONNECT_INTERVAL: Duration = Duration::from_millis(100);
/// Longest pause between reconnection attempts.
const MAX_RECONNECT_INTERVAL: Duration = Duration::from_secs(2);
/// Time allowed to open the gRPC connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A gRPC error answer, printed like a REST one (`title: detail`).
#[derive(Debug)]
pub struct GrpcError {
    code: Code,
    message: String,
}

impl fmt::Display for GrpcError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let title = match self.code {
            Code::NotFound => "Not Found",
            Code::Unauthenticated => "Unauthorized",
            Code::PermissionDenied => "Forbidden",
            Code::InvalidArgument => "Bad Request",
            Code::Unavailable => "Service Unavailable",
            _ => "gRPC error",
        };
        write!(f, "{title}: {}", self.message)
    }
}

impl std::error::Error for GrpcError {}

/// Why one tail attempt stopped without a `JobEnd`.
enum Interrupted {
    /// Worth retrying from the current offset (connection lost, gap).
    Retry(anyhow::Error),
    /// Not worth retrying (bad token, unknown job, stdout closed).
    Fatal(anyhow::Error),
}

/// Where the log goes: stdout, through a [`TerminalFilter`] when stdout is a
/// terminal and `--raw` was not given.
struct Output {
    stdout: tokio::io::Stdout,
    filter: Option<TerminalFilter>,
    filtered: Vec<u8>,
}

impl Output {
    fn new(raw: bool) -> Output {
        let terminal = std::io::stdout().is_terminal();
        Output {
            stdout: tokio::io::stdout(),
            filter: (terminal && !raw).then(TerminalFilter::new),
            filtered: Vec::new(),
        }
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), Interrupted> {
        let data = match &mut self.filter {
            Some(filter) => {
                self.filtered.clear();
                filter.filter(data, &mut self.filtered);
                &self.filtered[..]
            }
            None => data,
        };
        let result = async {
            self.stdout.write_all(data).await?;
            self.stdout.flush().await
        }
        .await;
        result.map_err(|err| {
            Interrupted::Fatal(anyhow::Error::new(err).context("cannot write the log to stdout"))
        })
    }
}

/// Prints job `job_id`'s log from `offset`; with `follow`, until the job
/// ends, returning its exit code. With `raw`, escape sequences reach a
/// terminal unfiltered.
pub async fn tail(
    client: &Client,
    job_id: u64,
    offset: u64,
    follow: bool,
    raw: bool,
) -> anyhow::Result<ExitCode> {
    // One filter for the whole log: a sequence split across a reconnect
    // is still recognised.
    let mut output = Output::new(raw);
    let mut written = offset;
    let mut failing_since: Option<Instant> = None;
    let mut pause = RECONNECT_INTERVAL;
    let mut connected_once = false;
    loop {
        let before = written;
        let attempt = tail_once(
            client,
            job_id,
            &mut written,
            follow,
            &mut connected_once,
            &mut output,
        );
        match attempt.await {
            Ok(Some(end)) => return Ok(report_end(job_id, &end, follow)),
            // The stream ended without a JobEnd: done, or resume when following.
            Ok(None) if !follow => return Ok(ExitCode::SUCCESS),
            Ok(None) => {}
            Err(Interrupted::Fatal(err)) => return Err(err),
            // Never reached the controller, or not following: nothing to resume.
            Err(Interrupted::Retry(err)) if !follow || !connected_once => return Err(err),
            Err(Interrupted::Retry(err)) => {
                if written > before {
                    failing_since = None;
                    pause = RECONNECT_INTERVAL;
                }
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > RECONNECT_TIMEOUT {
                    return Err(err);
                }
                tracing::debug!(error = %err, "log stream interrupted; resuming");
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(MAX_RECONNECT_INTERVAL);
    }
}

/// One `Tail` call. Advances `written`; returns the job's end when the
/// stream delivered it.
async fn tail_once(
    client: &Client,
    job_id: u64,
    written: &mut u64,
    follow: bool,
    connected_once: &mut bool,
    output: &mut Output,
) -> Result<Option<JobEnd>, Interrupted> {
    let grpc_url = &client.connection.grpc_url;
    let unreachable = |cause: String| {
        Interrupted::Retry(anyhow::Error::new(Unreachable {
            url: grpc_url.clone(),
            source_hint: client.connection.grpc_source.clone(),
            option: "--grpc-url / HOBOTNICA_GRPC_URL",
            cause,
        }))
    };
    let mut endpoint = Endpoint::from_shared(grpc_url.clone())
        .map_err(|err| Interrupted::Fatal(anyhow::anyhow!("invalid gRPC URL {grpc_url}: {err}")))?
        .connect_timeout(CONNECT_TIMEOUT)
        // A followed job may print nothing for a long time: ping the idle
        // connection, so a controller that vanished is noticed (and the
        // tail resumes elsewhere) instead of waiting forever.
        .http2_keep_alive_interval(client.connection.keepalive)
        .keep_alive_timeout(client.connection.keepalive)
        .keep_alive_while_idle(true);
    if endpoint.uri().scheme_str() == Some("https") {
        // The given CA, else the system's roots: verification is never off.
        let tls = ClientTlsConfig::new();
        let tls = match &client.connection.ca_cert {
            Some(pem) => tls.ca_certificate(Certificate::from_pem(pem)),
            None => tls.with_native_roots(),
        };
        endpoint = endpoint.tls_config(tls).map_err(|err| {
            Interrupted::Fatal(anyhow::anyhow!(
                "cannot set up TLS for {grpc_url}: {err} (give the CA with --ca-cert / \
                 HOBOTNICA_CA_CERT)"
            ))
        })?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|err| unreachable(root_cause(&err)))?;
    let mut service = LogServiceClient::new(channel);
    let mut request = tonic::Request::new(TailRequest {
        job_id,
        from_offset: *written,
        follow,
    });
    if let Some(token) = &client.connection.token {
        let value =
            MetadataValue::try_from(format!("Bearer {}", token.expose())).map_err(|_| {
                Interrupted::Fatal(anyhow::anyhow!(
                    "the token holds characters not allowed in a header"
                ))
            })?;
        request.metadata_mut().insert("authorization", value);
    }
    let mut stream = service
        .tail(request)
        .await
        .map_err(status_error)?
        .into_inner();
    *connected_once = true;
    loop {
        let message = match stream.message().await {
            Ok(Some(message)) => message,
            Ok(None) => return Ok(None),
            Err(status) => return Err(status_error(status)),
        };
        match message.kind {
            Some(tail_response::Kind::Chunk(chunk)) => {
                match plan_append(*written, chunk.offset, chunk.data.len()) {
                    AppendPlan::Append { skip } => {
                        let data = &chunk.data[skip..];
                        output.write(data).await?;
                        *written += data.len() as u64;
                    }
                    AppendPlan::Duplicate => {}
                    AppendPlan::Gap => {
                        return Err(Interrupted::Retry(anyhow::anyhow!(
                            "the log stream skipped from byte {} to {}",
                            written,
                            chunk.offset
                        )));
                    }
                }
            }
            Some(tail_response::Kind::End(end)) => return Ok(Some(end)),
            None => {}
        }
    }
}

fn status_error(status: tonic::Status) -> Interrupted {
    let error = anyhow::Error::new(GrpcError {
        code: status.code(),
        message: status.message().to_owned(),
    });
    match status.code() {
        Code::Unavailable | Code::Unknown | Code::Internal | Code::Aborted | Code::Cancelled => {
            Interrupted::Retry(error)
        }
        _ => Interrupted::Fatal(error),
    }
}

fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut current = err;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// `hobot`'s exit status for a followed job that was cancelled (as a shell
/// reports a command ended by Ctrl-C: 128 + SIGINT).
pub const EXIT_CANCELLED: u8 = 130;
/// `hobot`'s exit status for a followed job that ran past its time limit
/// (as timeout(1)).
pub const EXIT_TIMED_OUT: u8 = 124;
/// `hobot`'s exit status for a followed job that did not succeed and has no
/// exit code of its own (lost, or failed before or outside make), and for
/// `hobot`'s own errors.
pub const EXIT_FAILED: u8 = 1;

/// Says how the job ended (on stderr, stdout is the log) and picks the exit
/// status ([`job_exit_status`]).
fn report_end(job_id: u64, end: &JobEnd, follow: bool) -> ExitCode {
    if !follow {
        return ExitCode::SUCCESS;
    }
    let mut line = format!("job {job_id} {}", end.state);
    if end.state == "failed"
        && let Some(exit_code) = end.exit_code
    {
        line.push_str(&format!(" (exit code {exit_code})"));
    }
    // "cancelled" alone says nothing the state did not.
    if !end.message.is_empty() && end.message != end.state {
        line.push_str(&format!(": {}", crate::output::printable(&end.message)));
    }
    eprintln!("{line}");
    ExitCode::from(job_exit_status(&end.state, end.exit_code))
}

/// The exit status of a command that followed a job to its end, from the
/// job's state alone, however it got there (cancelled while queued, while
/// its tree was prepared or while make ran): succeeded 0; failed: make's
/// exit code (GNU make exits 2 when a recipe fails), 1 without one;
/// cancelled [`EXIT_CANCELLED`]; timed_out [`EXIT_TIMED_OUT`]; lost and
/// anything else [`EXIT_FAILED`].
pub fn job_exit_status(state: &str, exit_code: Option<i32>) -> u8 {
    match state {
        "succeeded" => 0,
        "failed" => exit_code
            .and_then(|code| u8::try_from(code).ok())
            .filter(|&code| code != 0)
            .unwrap_or(EXIT_FAILED),
        "cancelled" => EXIT_CANCELLED,
        "timed_out" => EXIT_TIMED_OUT,
        _ => EXIT_FAILED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_statuses_follow_the_state() {
        assert_eq!(job_exit_status("succeeded", Some(0)), 0);
        assert_eq!(job_exit_status("succeeded", None), 0);
        assert_eq!(job_exit_status("failed", Some(2)), 2);
        assert_eq!(job_exit_status("failed", Some(3)), 3);
        assert_eq!(job_exit_status("failed", None), 1);
        assert_eq!(
            job_exit_status("failed", Some(0)),
            1,
            "a failed job never exits 0"
        );
        assert_eq!(job_exit_status("failed", Some(300)), 1);
        assert_eq!(job_exit_status("failed", Some(-1)), 1);
        // One status per state, whatever exit code it carries.
        for exit_code in [None, Some(0), Some(2), Some(143)] {
            assert_eq!(job_exit_status("cancelled", exit_code), 130);
            assert_eq!(job_exit_status("timed_out", exit_code), 124);
            assert_eq!(job_exit_status("lost", exit_code), 1);
        }
    }
}
