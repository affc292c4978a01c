//! A snapshot of a whole store, as records: what `hobot admin export` writes,
//! `hobot admin import` reads and `hobot admin migrate` pipes from one store
//! into another of any kind.
//!
//! Each backend turns itself into records ([`Store::export`], from one
//! consistent view) and writes records back as they are ([`Store::import`],
//! ids kept, into an empty store). Everything between (the file format, the
//! order, what becomes of a job that was running) is here, once, for every
//! backend.
//!
//! Secrets stay sealed: repository variables are exported in their sealed
//! form, agent tokens and sessions as the hashes the store keeps. A snapshot
//! is as safe as the store it came from, and only a controller with the same
//! secret key reads its secrets.
//!
//! [`Store::export`]: super::Store::export
//! [`Store::import`]: super::Store::import

use std::collections::HashSet;
use std::io::{BufRead, BufReader, Read, Write};

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

use hobotnica_common::ids::JobId;
use hobotnica_common::job::{Job, Repo};

use super::{
    AgentRecord, AgentTokenRecord, NotificationDelivery, SessionRecord, Store, StoreError,
    transitions,
};

/// One thing a store holds. A job's log follows its job, in order from
/// offset 0, in pieces of at most [`LOG_PIECE`] bytes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Record {
    Repo {
        repo: Repo,
    },
    Job {
        job: Job,
    },
    /// `data` at `offset` of `job`'s log.
    Log {
        job: JobId,
        offset: u64,
        #[serde(with = "base64_bytes")]
        data: Bytes,
    },
    Agent {
        agent: AgentRecord,
    },
    AgentToken {
        token: AgentTokenRecord,
    },
    /// A remembered webhook delivery id or scoped idempotency key, and when
    /// it arrived (it is forgotten after `DELIVERY_RETENTION`).
    Key {
        key: String,
        at: DateTime<Utc>,
    },
    /// A name under which a job was recorded (`Store::key_job`).
    KeyJob {
        name: String,
        job: JobId,
    },
    /// A signed-in web session, under the hash of its id.
    Session {
        id_hash: String,
        session: SessionRecord,
    },
    /// A notification not yet delivered.
    Notification {
        delivery: NotificationDelivery,
    },
    /// The id the store gives its next job (at least one above every
    /// job's id, and never lowered by an import).
    NextJobId {
        next: u64,
    },
    /// Never in a file: the marker of an import under way, written into
    /// the target by the import's first batch. A store that still holds it
    /// is the remains of an import that did not finish: a controller does
    /// not start on it and another import refuses it.
    ImportStarted,
    /// Never in a file: the import's last batch; the store drops the
    /// marker.
    ImportFinished,
}

/// The largest piece of a log one record carries.
pub const LOG_PIECE: usize = 256 * 1024;

/// The snapshot file of `store`, as a stream of its bytes (for a download):
/// exported on a task of its own, ending with an error instead of the
/// trailer when the export fails (so the receiver never holds a file that
/// looks complete). The export stops when the stream is dropped.
pub fn export_stream(
    store: std::sync::Arc<dyn Store>,
    source: &'static str,
) -> mpsc::Receiver<Result<Bytes, std::io::Error>> {
    let (chunks, stream) = mpsc::channel(CHANNEL_RECORDS);
    // Ends when the export does; a dropped receiver fails its next write.
    tokio::spawn(async move {
        let writer = ChannelWriter {
            chunks: chunks.clone(),
        };
        if let Err(err) = export_to_writer(store.as_ref(), source, writer, |_| {}).await {
            tracing::warn!(error = %err, "a snapshot download failed");
            let _ = chunks
                .send(Err(std::io::Error::other(err.to_string())))
                .await;
        }
    });
    stream
}

/// Sends what is written, a chunk at a time (from a blocking thread).
struct ChannelWriter {
    chunks: mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl Write for ChannelWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.chunks
            .blocking_send(Ok(Bytes::copy_from_slice(buf)))
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Bytes as a base64 string (standard alphabet, padded).
mod base64_bytes {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(data: &Bytes, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(data))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Bytes, D::Error> {
        let text = String::deserialize(deserializer)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(Bytes::from)
            .map_err(serde::de::Error::custom)
    }
}

/// The first line of a snapshot file names its format and version.
pub const FORMAT: &str = "hobotnica-snapshot";
/// The version of the file format this Hobotnica writes and reads (see
/// `docs/snapshot-format.md`).
pub const VERSION: u32 = 1;

/// Records one import batch holds at most.
const BATCH_RECORDS: usize = 512;
/// Bytes of log one import batch holds at most (a few pieces).
const BATCH_LOG_BYTES: usize = 4 * LOG_PIECE;
/// Records in flight between a store and a file (bounded memory: at most
/// this many pieces of [`LOG_PIECE`]).
const CHANNEL_RECORDS: usize = 64;

/// The header line of a snapshot file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub format: String,
    pub version: u32,
    pub created_at: DateTime<Utc>,
    /// The kind of store it was exported from: `embedded`, `redis` or
    /// `postgres`.
    pub source: String,
    /// The version of Hobotnica that wrote it.
    pub hobotnica: String,
}

/// The last line of a snapshot file: without it the file is truncated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Trailer {
    End { records: u64 },
}

/// Why an export, an import or a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("cannot read or write the snapshot: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a Hobotnica snapshot (the first line is not a snapshot header)")]
    NotASnapshot,
    #[error(
        "the snapshot has format version {version}: it was made by a newer Hobotnica \
         ({made_by}); this one reads version {VERSION}"
    )]
    NewerVersion { version: u32, made_by: String },
    #[error(
        "the snapshot is truncated: it ends after {records} records without its last line \
         (was the export interrupted, or the copy cut short?)"
    )]
    Truncated { records: u64 },
    #[error("the snapshot is corrupt at line {line}: {reason}")]
    Corrupt { line: u64, reason: String },
    #[error("the snapshot is invalid: {0}")]
    Invalid(String),
    #[error("the target store is not empty: import only into a new store")]
    TargetNotEmpty,
    #[error(
        "an earlier import into this store did not finish; empty it (or use a new one) \
         and import again"
    )]
    UnfinishedImport,
}

/// What was exported or imported so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    pub records: u64,
    pub jobs: u64,
    pub log_bytes: u64,
}

impl Progress {
    fn count(&mut self, record: &Record) {
        self.records += 1;
        match record {
            Record::Job { .. } => self.jobs += 1,
            Record::Log { data, .. } => self.log_bytes += data.len() as u64,
            _ => {}
        }
    }
}

impl std::fmt::Display for Progress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records, {} jobs, {} of logs",
            self.records,
            self.jobs,
            hobotnica_common::size::human_size(self.log_bytes)
        )
    }
}

/// How often progress is reported: every this many records.
const PROGRESS_EVERY: u64 = 1000;

/// Exports `store` into `out` as a snapshot file (gzip of JSON lines:
/// header, records, trailer). The file is written on a blocking thread
/// while the store exports: at most [`CHANNEL_RECORDS`] records are in
/// memory between them.
pub async fn export_to_writer<W: Write + Send + 'static>(
    store: &dyn Store,
    source: &str,
    out: W,
    progress: impl Fn(&Progress) + Send + 'static,
) -> Result<Progress, SnapshotError> {
    let header = Header {
        format: FORMAT.to_owned(),
        version: VERSION,
        created_at: Utc::now(),
        source: source.to_owned(),
        hobotnica: env!("CARGO_PKG_VERSION").to_owned(),
    };
    let (sink, mut records) = mpsc::channel::<Record>(CHANNEL_RECORDS);
    // Whether the export went to its end: only then is the trailer written
    // (a file without it is refused as truncated).
    let (complete_tx, complete_rx) = std::sync::mpsc::channel::<bool>();
    let writer = tokio::task::spawn_blocking(move || -> Result<Progress, SnapshotError> {
        let mut gz = flate2::write::GzEncoder::new(
            std::io::BufWriter::new(out),
            flate2::Compression::default(),
        );
        write_line(&mut gz, &header)?;
        let mut done = Progress::default();
        while let Some(record) = records.blocking_recv() {
            write_line(&mut gz, &record)?;
            done.count(&record);
            if done.records.is_multiple_of(PROGRESS_EVERY) {
                progress(&done);
            }
        }
        if complete_rx.recv() != Ok(true) {
            return Err(SnapshotError::Io(std::io::Error::other(
                "the export stopped before its end",
            )));
        }
        write_line(
            &mut gz,
            &Trailer::End {
                records: done.records,
            },
        )?;
        let mut buffered = gz.finish()?;
        buffered.flush()?;
        progress(&done);
        Ok(done)
    });
    let exported = store.export(sink).await;
    let _ = complete_tx.send(exported.is_ok());
    let written = writer
        .await
        .map_err(|err| SnapshotError::Io(std::io::Error::other(err.to_string())))?;
    exported?;
    written
}

fn write_line<T: Serialize>(out: &mut impl Write, value: &T) -> Result<(), SnapshotError> {
    serde_json::to_writer(&mut *out, value)
        .map_err(|err| SnapshotError::Io(std::io::Error::other(err)))?;
    out.write_all(b"\n")?;
    Ok(())
}

/// Reads a snapshot file: its header at once (a foreign or newer file is
/// refused before anything is imported), then its records through the
/// receiver, read on a blocking thread as they are consumed. A file that
/// ends early, or with a count that does not match, ends the records with
/// an error.
pub async fn read_file<R: Read + Send + 'static>(
    input: R,
) -> Result<(Header, mpsc::Receiver<Result<Record, SnapshotError>>), SnapshotError> {
    let (header_tx, header_rx) = tokio::sync::oneshot::channel();
    let (records_tx, records_rx) = mpsc::channel(CHANNEL_RECORDS);
    tokio::task::spawn_blocking(move || {
        let mut lines = BufReader::new(flate2::read::GzDecoder::new(input));
        let header = read_header(&mut lines);
        let ok = header.is_ok();
        if header_tx.send(header).is_err() || !ok {
            return;
        }
        read_records(lines, &records_tx);
    });
    let header = header_rx
        .await
        .map_err(|_| SnapshotError::Io(std::io::Error::other("the snapshot reader stopped")))??;
    Ok((header, records_rx))
}

/// One line, without its newline; `None` at the end of the file.
fn next_line(lines: &mut impl BufRead, buffer: &mut Vec<u8>) -> Result<bool, SnapshotError> {
    buffer.clear();
    let read = lines.read_until(b'\n', buffer)?;
    if read == 0 {
        return Ok(false);
    }
    if buffer.last() == Some(&b'\n') {
        buffer.pop();
    }
    Ok(true)
}

fn read_header(lines: &mut impl BufRead) -> Result<Header, SnapshotError> {
    let mut buffer = Vec::new();
    // A file that is not gzip fails its first read.
    let read = next_line(lines, &mut buffer).map_err(|err| match err {
        SnapshotError::Io(io) if io.kind() == std::io::ErrorKind::InvalidInput => {
            SnapshotError::NotASnapshot
        }
        other => other,
    });
    match read {
        Ok(true) => {}
        Ok(false) | Err(SnapshotError::NotASnapshot) => return Err(SnapshotError::NotASnapshot),
        Err(SnapshotError::Io(_)) => return Err(SnapshotError::NotASnapshot),
        Err(other) => return Err(other),
    }
    #[derive(Deserialize)]
    struct Probe {
        format: String,
        version: u32,
        #[serde(default)]
        hobotnica: String,
    }
    let probe: Probe = serde_json::from_slice(&buffer).map_err(|_| SnapshotError::NotASnapshot)?;
    if probe.format != FORMAT {
        return Err(SnapshotError::NotASnapshot);
    }
    if probe.version > VERSION {
        return Err(SnapshotError::NewerVersion {
            version: probe.version,
            made_by: format!("Hobotnica {}", probe.hobotnica),
        });
    }
    serde_json::from_slice(&buffer).map_err(|err| SnapshotError::Corrupt {
        line: 1,
        reason: err.to_string(),
    })
}

fn read_records(mut lines: impl BufRead, records: &mpsc::Sender<Result<Record, SnapshotError>>) {
    let mut buffer = Vec::new();
    let mut count: u64 = 0;
    loop {
        let line = count + 2;
        let outcome = match next_line(&mut lines, &mut buffer) {
            Err(SnapshotError::Io(err)) if err.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(SnapshotError::Truncated { records: count })
            }
            Err(err) => Err(err),
            Ok(false) => Err(SnapshotError::Truncated { records: count }),
            Ok(true) => match serde_json::from_slice::<Record>(&buffer) {
                Ok(Record::ImportStarted | Record::ImportFinished) => Err(SnapshotError::Corrupt {
                    line,
                    reason: "an import marker has no place in a file".to_owned(),
                }),
                Ok(record) => {
                    count += 1;
                    Ok(Some(record))
                }
                Err(record_error) => match serde_json::from_slice::<Trailer>(&buffer) {
                    Ok(Trailer::End { records }) if records == count => {
                        // Nothing may follow the trailer.
                        match next_line(&mut lines, &mut buffer) {
                            Ok(false) => Ok(None),
                            Ok(true) => Err(SnapshotError::Corrupt {
                                line: line + 1,
                                reason: "lines after the end of the snapshot".to_owned(),
                            }),
                            Err(err) => Err(err),
                        }
                    }
                    Ok(Trailer::End { records }) => Err(SnapshotError::Corrupt {
                        line,
                        reason: format!("the file says {records} records, it holds {count}"),
                    }),
                    Err(_) => Err(SnapshotError::Corrupt {
                        line,
                        reason: record_error.to_string(),
                    }),
                },
            },
        };
        match outcome {
            Ok(Some(record)) => {
                if records.blocking_send(Ok(record)).is_err() {
                    return;
                }
            }
            Ok(None) => return,
            Err(err) => {
                let _ = records.blocking_send(Err(err));
                return;
            }
        }
    }
}

/// The import rules, the same for every backend, applied to records on
/// their way into the target store: every log piece belongs to the job just
/// before it and continues it without a gap; a job that was running comes
/// in `lost` (`transitions::lose_on_import`), with a controller line at the
/// end of its log saying why.
struct Rules {
    now: DateTime<Utc>,
    seen_jobs: HashSet<JobId>,
    /// The job whose log may follow, and its length so far.
    current: Option<(JobId, u64)>,
    /// The line to append to the current job's log once its log ends.
    pending_line: Option<String>,
    max_job_id: u64,
    next_job_id: Option<u64>,
}

impl Rules {
    fn new(now: DateTime<Utc>) -> Rules {
        Rules {
            now,
            seen_jobs: HashSet::new(),
            current: None,
            pending_line: None,
            max_job_id: 0,
            next_job_id: None,
        }
    }

    /// The records to write for `record` (itself, changed or not, after
    /// the controller line of the job before it, if any).
    fn apply(&mut self, record: Record, out: &mut Vec<Record>) -> Result<(), SnapshotError> {
        if !matches!(record, Record::Log { .. }) {
            self.end_log(out);
        }
        match record {
            Record::Job { mut job } => {
                if !self.seen_jobs.insert(job.id) {
                    return Err(SnapshotError::Invalid(format!(
                        "job {} appears twice",
                        job.id
                    )));
                }
                self.max_job_id = self.max_job_id.max(job.id.0);
                self.pending_line = transitions::lose_on_import(&mut job, self.now);
                self.current = Some((job.id, 0));
                out.push(Record::Job { job });
            }
            Record::Log { job, offset, data } => {
                let Some((current, length)) = self.current.as_mut().filter(|(id, _)| *id == job)
                else {
                    return Err(SnapshotError::Invalid(if self.seen_jobs.contains(&job) {
                        format!("a piece of job {job}'s log is not right after the job")
                    } else {
                        format!("a piece of log for job {job}, which the snapshot does not hold")
                    }));
                };
                if offset != *length {
                    return Err(SnapshotError::Invalid(format!(
                        "job {current}'s log has a gap: a piece at offset {offset} after {length} bytes"
                    )));
                }
                *length += data.len() as u64;
                out.push(Record::Log { job, offset, data });
            }
            Record::NextJobId { next } => {
                self.next_job_id = Some(next);
                out.push(Record::NextJobId {
                    next: next.max(self.max_job_id + 1),
                });
            }
            Record::ImportStarted | Record::ImportFinished => {
                return Err(SnapshotError::Invalid(
                    "an import marker among the records".to_owned(),
                ));
            }
            other => out.push(other),
        }
        Ok(())
    }

    /// Ends the current job's log: its controller line, if it has one.
    fn end_log(&mut self, out: &mut Vec<Record>) {
        if let (Some((job, length)), Some(line)) = (self.current.take(), self.pending_line.take()) {
            out.push(Record::Log {
                job,
                offset: length,
                data: Bytes::from(format!("[hobotnica] {line}\n")),
            });
        }
    }

    /// What the end of the records adds: the last controller line, and the
    /// next job id if the snapshot lacked it.
    fn finish(&mut self, out: &mut Vec<Record>) {
        self.end_log(out);
        if self.next_job_id.is_none() {
            out.push(Record::NextJobId {
                next: self.max_job_id + 1,
            });
        }
    }
}

/// Whether `store` may be imported into: empty, and not the remains of an
/// import that did not finish.
pub async fn check_target(store: &dyn Store) -> Result<(), SnapshotError> {
    if store.import_unfinished().await? {
        return Err(SnapshotError::UnfinishedImport);
    }
    if !store.is_empty().await? {
        return Err(SnapshotError::TargetNotEmpty);
    }
    Ok(())
}

/// Imports `records` into the empty `store` under the import rules, batch
/// by batch. The store is marked first and unmarked last: an import that
/// fails midway leaves a store that says so (a controller refuses to start
/// on it, and so does another import).
pub async fn import_records(
    store: &dyn Store,
    mut records: mpsc::Receiver<Result<Record, SnapshotError>>,
    progress: impl Fn(&Progress),
) -> Result<Progress, SnapshotError> {
    check_target(store).await?;
    store.import(vec![Record::ImportStarted]).await?;
    let mut rules = Rules::new(Utc::now());
    let mut done = Progress::default();
    let mut batch = Vec::new();
    let mut batch_bytes = 0;
    let mut reported = 0;
    while let Some(record) = records.recv().await {
        let record = record?;
        done.count(&record);
        let before = batch.len();
        rules.apply(record, &mut batch)?;
        for written in &batch[before..] {
            if let Record::Log { data, .. } = written {
                batch_bytes += data.len();
            }
        }
        if batch.len() >= BATCH_RECORDS || batch_bytes >= BATCH_LOG_BYTES {
            store.import(std::mem::take(&mut batch)).await?;
            batch_bytes = 0;
        }
        if done.records >= reported + PROGRESS_EVERY {
            reported = done.records;
            progress(&done);
        }
    }
    rules.finish(&mut batch);
    batch.push(Record::ImportFinished);
    store.import(batch).await?;
    progress(&done);
    Ok(done)
}

/// Copies everything in `from` into the empty `to` (export piped into
/// import: no file, the same rules).
pub async fn migrate(
    from: &dyn Store,
    to: &dyn Store,
    progress: impl Fn(&Progress),
) -> Result<Progress, SnapshotError> {
    check_target(to).await?;
    let (records_tx, records_rx) = mpsc::channel(CHANNEL_RECORDS);
    let produce = async move {
        let (sink, mut exported) = mpsc::channel(CHANNEL_RECORDS);
        let pump = async {
            while let Some(record) = exported.recv().await {
                if records_tx.send(Ok(record)).await.is_err() {
                    break;
                }
            }
        };
        let (result, ()) = tokio::join!(from.export(sink), pump);
        // A failed export ends the records with its error: the import
        // fails too, and never marks the target finished.
        if let Err(err) = result {
            let _ = records_tx.send(Err(err.into())).await;
        }
    };
    let ((), imported) = tokio::join!(produce, import_records(to, records_rx, progress));
    imported
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use std::sync::Arc;

    use super::super::embedded::EmbeddedStore;
    use super::*;

    fn store() -> (Arc<dyn Store>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        (Arc::new(EmbeddedStore::open(dir.path()).unwrap()), dir)
    }

    /// A snapshot file of a store holding everything.
    async fn file() -> Vec<u8> {
        let (source, _dir) = store();
        super::super::conformance::fill_with_everything(&source).await;
        let out = Arc::new(std::sync::Mutex::new(Vec::new()));
        struct Shared(Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Shared {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let done = export_to_writer(
            source.as_ref(),
            "embedded",
            Shared(Arc::clone(&out)),
            |_| {},
        )
        .await
        .unwrap();
        assert_eq!(done.jobs, 6);
        out.lock().unwrap().clone()
    }

    fn gzip(text: &str) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(text.as_bytes()).unwrap();
        gz.finish().unwrap()
    }

    async fn import(
        bytes: Vec<u8>,
    ) -> (
        Result<Progress, SnapshotError>,
        Arc<dyn Store>,
        tempfile::TempDir,
    ) {
        let (target, dir) = store();
        let result = match read_file(std::io::Cursor::new(bytes)).await {
            Ok((_, records)) => import_records(target.as_ref(), records, |_| {}).await,
            Err(err) => Err(err),
        };
        (result, target, dir)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_round_trips_and_its_header_says_what_it_is() {
        let bytes = file().await;
        let (header, _) = read_file(std::io::Cursor::new(bytes.clone()))
            .await
            .unwrap();
        assert_eq!(header.format, FORMAT);
        assert_eq!(header.version, VERSION);
        assert_eq!(header.source, "embedded");
        let (imported, target, _dir) = import(bytes).await;
        let imported = imported.unwrap();
        assert_eq!(imported.jobs, 6);
        assert!(!target.import_unfinished().await.unwrap());
        assert_eq!(
            target
                .list_jobs(&super::super::JobFilter {
                    limit: 10,
                    ..Default::default()
                })
                .await
                .unwrap()
                .len(),
            6
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_truncated_file_is_refused_and_the_target_says_the_import_did_not_finish() {
        let bytes = file().await;
        let cut = bytes[..bytes.len() * 2 / 3].to_vec();
        let (result, target, _dir) = import(cut).await;
        let err = result.unwrap_err();
        assert!(matches!(err, SnapshotError::Truncated { .. }), "{err}");
        assert!(err.to_string().contains("truncated"), "{err}");
        assert!(target.import_unfinished().await.unwrap());
        let again = check_target(target.as_ref()).await.unwrap_err();
        assert_eq!(
            again.to_string(),
            "an earlier import into this store did not finish; empty it (or use a new one) and import again"
        );
    }

    #[tokio::test]
    async fn foreign_and_newer_files_are_refused_before_anything_is_written() {
        for (bytes, expected) in [
            (b"not gzip at all".to_vec(), "not a Hobotnica snapshot"),
            (gzip("{\"hello\":1}\n"), "not a Hobotnica snapshot"),
            (gzip(""), "not a Hobotnica snapshot"),
            (
                gzip(
                    "{\"format\":\"hobotnica-snapshot\",\"version\":9,\"created_at\":\"2026-01-01T00:00:00Z\",\"source\":\"redis\",\"hobotnica\":\"9.0.0\"}\n",
                ),
                "made by a newer Hobotnica (Hobotnica 9.0.0)",
            ),
        ] {
            let (result, target, _dir) = import(bytes).await;
            let err = result.unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
            assert!(target.is_empty().await.unwrap());
        }
    }

    fn header() -> String {
        format!(
            "{{\"format\":\"hobotnica-snapshot\",\"version\":1,\"created_at\":\"2026-01-01T00:00:00Z\",\"source\":\"embedded\",\"hobotnica\":\"{}\"}}\n",
            env!("CARGO_PKG_VERSION")
        )
    }

    #[tokio::test]
    async fn a_log_without_its_job_or_with_a_gap_is_refused() {
        let job = serde_json::to_string(&Record::Job {
            job: transitions::new_job(
                JobId(1),
                super::super::conformance::new_job("test"),
                Utc::now(),
            ),
        })
        .unwrap();
        let log = |job: u64, offset: u64| {
            serde_json::to_string(&Record::Log {
                job: JobId(job),
                offset,
                data: Bytes::from_static(b"abc"),
            })
            .unwrap()
        };
        for (lines, expected) in [
            (vec![log(2, 0)], "which the snapshot does not hold"),
            (vec![job.clone(), log(1, 0), log(1, 5)], "gap"),
        ] {
            let count = lines.len();
            let text = format!(
                "{}{}\n{{\"type\":\"end\",\"records\":{count}}}\n",
                header(),
                lines.join("\n")
            );
            let (result, _, _dir) = import(gzip(&text)).await;
            let err = result.unwrap_err().to_string();
            assert!(err.contains(expected), "{err}");
        }
    }

    #[test]
    fn log_pieces_round_trip_byte_exact() {
        let record = Record::Log {
            job: JobId(7),
            offset: 3,
            data: Bytes::from_static(b"\x00\xffnot utf-8\n"),
        };
        let line = serde_json::to_string(&record).unwrap();
        assert!(
            line.starts_with(r#"{"type":"log","job":7,"offset":3,"data":""#),
            "{line}"
        );
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), record);
    }
}
