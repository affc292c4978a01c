//! Log offset arithmetic: how an idempotent append treats a chunk.
//!
//! A chunk is `(offset, data)`. The receiver knows how many bytes it has
//! committed. A chunk entirely below that is a duplicate (a resend after a
//! reconnect); one that overlaps is appended from where the committed bytes
//! end; one that starts past the end is a gap, which the sender must fill by
//! resending from the committed length.

/// What to do with a chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendPlan {
    /// Append `data[skip..]`.
    Append { skip: usize },
    /// Every byte is already committed: acknowledge, write nothing.
    Duplicate,
    /// The chunk starts past the committed end.
    Gap,
}

pub fn plan_append(committed: u64, offset: u64, len: usize) -> AppendPlan {
    let end = offset.saturating_add(len as u64);
    if offset > committed {
        AppendPlan::Gap
    } else if end <= committed {
        AppendPlan::Duplicate
    } else {
        // offset <= committed < end, so the difference fits in `len`.
        AppendPlan::Append {
            skip: usize::try_from(committed - offset).unwrap_or(len),
        }
    }
}

/// Largest log chunk an agent sends, in bytes.
pub const MAX_CHUNK_BYTES: usize = 64 * 1024;

/// A job's log limit when neither the controller nor the repository sets
/// one (and an agent's when its controller sends none): 1 GiB.
pub const DEFAULT_MAX_LOG_BYTES: u64 = 1 << 30;

/// The smallest log limit a repository may set.
pub const MIN_MAX_LOG_BYTES: u64 = 1024;

/// What the controller stores past a job's log limit: room for the notice
/// that ends such a log (which is not counted against the limit). Bytes
/// beyond limit + this are discarded.
pub const LOG_NOTICE_ALLOWANCE: u64 = 1024;

/// How the message of a job whose log reached its limit starts.
const LOG_LIMIT_REACHED: &str = "the log reached its limit of ";

/// The job's message when its log reached `limit` bytes.
pub fn log_limit_message(limit: u64) -> String {
    format!(
        "{LOG_LIMIT_REACHED}{} ({limit} bytes); output stopped and the job was stopped",
        crate::size::human_size(limit)
    )
}

/// `the log reached its limit of 64.0 KiB` when `message` is a job's
/// [`log_limit_message`] (a short form, for GitHub's commit status).
pub fn log_limit_summary(message: &str) -> Option<&str> {
    let rest = message.strip_prefix(LOG_LIMIT_REACHED)?;
    let human = rest.split(" (").next()?;
    message.get(..LOG_LIMIT_REACHED.len() + human.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_message_has_a_summary() {
        let message = log_limit_message(65536);
        assert_eq!(
            message,
            "the log reached its limit of 64.0 KiB (65536 bytes); output stopped and the job was stopped"
        );
        assert_eq!(
            log_limit_summary(&message),
            Some("the log reached its limit of 64.0 KiB")
        );
        assert_eq!(log_limit_summary("make test exited with code 2"), None);
    }

    #[test]
    fn append_plans() {
        let cases = [
            // committed, offset, len, plan
            (0, 0, 10, AppendPlan::Append { skip: 0 }),
            (10, 10, 5, AppendPlan::Append { skip: 0 }),
            (10, 5, 10, AppendPlan::Append { skip: 5 }),
            (10, 0, 10, AppendPlan::Duplicate),
            (10, 3, 4, AppendPlan::Duplicate),
            (10, 11, 4, AppendPlan::Gap),
            (0, 0, 0, AppendPlan::Duplicate),
        ];
        for (committed, offset, len, plan) in cases {
            assert_eq!(
                plan_append(committed, offset, len),
                plan,
                "committed={committed} offset={offset} len={len}"
            );
        }
    }

    #[test]
    fn applying_plans_in_any_order_reconstructs_the_log() {
        let log: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
        // Chunks of 7 sent in order, each also resent once, and some
        // overlapping re-chunked ranges.
        let mut sends = Vec::new();
        for start in (0..log.len()).step_by(7) {
            let end = (start + 7).min(log.len());
            sends.push((start, end));
            sends.push((start, end));
            sends.push((start.saturating_sub(3), end));
        }
        let mut stored = Vec::new();
        for (start, end) in sends {
            match plan_append(stored.len() as u64, start as u64, end - start) {
                AppendPlan::Append { skip } => stored.extend_from_slice(&log[start + skip..end]),
                AppendPlan::Duplicate => {}
                AppendPlan::Gap => panic!("no gap expected"),
            }
        }
        assert_eq!(stored, log);
    }
}
