//! Keeps a job's lease: RenewLease every `renew_interval` until stopped,
//! turning answers into [`JobEvent`]s for the supervisor. An unavailable
//! controller is retried (with fail-over) while the job keeps running.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{JobController, JobEvent, JobKey};
use crate::connection::RpcError;

/// Renews until `stop` is cancelled or the controller says the job is gone.
pub async fn renew_lease<C: JobController>(
    controller: C,
    key: JobKey,
    interval: Duration,
    events: mpsc::UnboundedSender<JobEvent>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
        let renewed = tokio::select! {
            renewed = controller.renew(key) => renewed,
            () = stop.cancelled() => return,
        };
        match renewed {
            Ok(status) => {
                tracing::trace!(cancel_requested = status.cancel_requested, "lease renewed");
                let _ = events.send(JobEvent::LeaseRenewed {
                    cancel_requested: status.cancel_requested,
                });
            }
            Err(
                error @ (RpcError::FailedPrecondition(_)
                | RpcError::Refused { .. }
                | RpcError::UnknownAgent(_)),
            ) => {
                let _ = events.send(JobEvent::JobGone {
                    reason: error.to_string(),
                });
                return;
            }
            Err(error) => {
                // Not retried by `retry` and not a verdict on the job (e.g.
                // ABORTED): try again at the next interval.
                tracing::warn!(%error, "renewing the lease failed");
            }
        }
    }
}
