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

use base64::Engine as _;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use hobotnica_common::ids::JobId;
use hobotnica_common::job::{Job, Repo};

use super::{AgentRecord, AgentTokenRecord, NotificationDelivery, SessionRecord};

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
}

/// The largest piece of a log one record carries.
pub const LOG_PIECE: usize = 256 * 1024;

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

#[cfg(test)]
mod tests {
    use super::*;

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
