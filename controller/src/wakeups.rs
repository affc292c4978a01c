//! CORE: which idle dispatch session tries to claim when a job is queued (or
//! a finished job may free a deploy): one at a time, in turn, instead of all
//! of them. With a thousand idle agents connected, waking every session on
//! every job made a thousand store reads per event, all but one for nothing.
//!
//! Each controller keeps its own line of idle sessions ([`IdleSessions`]);
//! the [`wake_idle_sessions`] task hears the store's events (on every
//! controller, through Redis) and wakes the session at the head of the
//! line. A woken session that finds nothing it may take passes the wake-up
//! on to the next session whose agent might (another set of vouched
//! labels: only those decide what an agent may claim), so a job only some
//! agents may run still finds one. A woken session that took a job and is
//! full passes it on as it came (more may be queued). Nothing is lost for
//! good: a session that was not waiting when a wake-up came (mid-claim) is
//! handed it when it next waits, missed events wake every session, and each
//! idle session also tries on its own every [`SAFETY_POLL`] or so.
//!
//! The same task relays to sessions and log streams only the events they
//! act on (cancels, revocations, missed events), so that they no longer
//! wake for every job queued, started or finished and every log append.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::broadcast::error::RecvError;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::services::Services;
use crate::store::StoreEvent;

/// How often an idle session tries to claim on its own, whatever it was
/// told: the net under a wake-up lost on the way (jittered per session, so
/// that a thousand sessions do not all try at once).
pub const SAFETY_POLL: Duration = Duration::from_secs(30);

/// What decides which queued jobs an agent may claim: the labels its token
/// vouches for (see `transitions::may_claim`).
pub type ClaimKey = BTreeMap<String, String>;

/// One wake-up on its way along the line.
#[derive(Debug, Clone, Default)]
pub struct Wake {
    /// Claim keys of sessions that tried for this wake-up and found
    /// nothing: a session with the same key would find nothing too.
    tried: Vec<ClaimKey>,
}

impl Wake {
    /// This wake-up, once a session with `key` found nothing to take.
    pub fn tried_by(mut self, key: &ClaimKey) -> Wake {
        if !self.tried.contains(key) {
            self.tried.push(key.clone());
        }
        self
    }

    fn wants(&self, key: &ClaimKey) -> bool {
        !self.tried.contains(key)
    }
}

/// A session in the line.
struct Waiter {
    id: u64,
    key: ClaimKey,
    wake: oneshot::Sender<Wake>,
}

#[derive(Default)]
struct Line {
    next_id: u64,
    waiting: VecDeque<Waiter>,
    /// A wake-up that came while no session waited: the next one to wait
    /// (whose key it still wants) takes it at once.
    pending: Option<Wake>,
}

/// This controller's idle sessions, oldest first.
#[derive(Default)]
pub struct IdleSessions {
    line: Mutex<Line>,
}

/// A session's place in the line; dropping it leaves the line.
pub struct Waiting<'a> {
    sessions: &'a IdleSessions,
    id: u64,
    woken: oneshot::Receiver<Wake>,
}

impl Waiting<'_> {
    /// Resolves when this session is woken (cancel-safe). Never resolves
    /// after the line dropped the session without a wake-up (it does not).
    pub async fn woken(&mut self) -> Wake {
        match (&mut self.woken).await {
            Ok(wake) => wake,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut line = self.sessions.lock();
        line.waiting.retain(|waiter| waiter.id != self.id);
        // A wake-up sent but never acted on (the session went away, or
        // left the line to do something else first) goes on to the next.
        if let Ok(wake) = self.woken.try_recv() {
            self.sessions.pass_on(&mut line, wake);
        }
    }
}

impl IdleSessions {
    fn lock(&self) -> std::sync::MutexGuard<'_, Line> {
        self.line.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Joins the end of the line as a session whose agent claims with
    /// `key`; a wake-up that came while nobody waited is handed over at
    /// once.
    pub fn wait(&self, key: &ClaimKey) -> Waiting<'_> {
        let (sender, woken) = oneshot::channel();
        let mut line = self.lock();
        line.next_id += 1;
        let id = line.next_id;
        match line.pending.take() {
            Some(wake) if wake.wants(key) => {
                let _ = sender.send(wake);
            }
            pending => {
                line.pending = pending;
                line.waiting.push_back(Waiter {
                    id,
                    key: key.clone(),
                    wake: sender,
                });
            }
        }
        Waiting {
            sessions: self,
            id,
            woken,
        }
    }

    /// Wakes the first waiting session that `wake` still wants.
    pub fn wake_one(&self, wake: Wake) {
        let mut line = self.lock();
        self.pass_on(&mut line, wake);
    }

    /// Wakes every waiting session (events were missed: any job may wait).
    pub fn wake_all(&self) {
        let mut line = self.lock();
        line.pending = Some(Wake::default());
        for waiter in std::mem::take(&mut line.waiting) {
            let _ = waiter.wake.send(Wake::default());
        }
    }

    /// How many sessions wait (for tests and figures).
    pub fn waiting(&self) -> usize {
        self.lock().waiting.len()
    }

    fn pass_on(&self, line: &mut Line, wake: Wake) {
        let mut index = 0;
        while index < line.waiting.len() {
            if !wake.wants(&line.waiting[index].key) {
                index += 1;
                continue;
            }
            let Some(waiter) = line.waiting.remove(index) else {
                break;
            };
            match waiter.wake.send(wake) {
                Ok(()) => return,
                // That session is gone (its drop will find it removed).
                Err(wake) => return self.pass_on(line, wake),
            }
        }
        if line.waiting.is_empty() {
            // Nobody waits: every session is busy, or between two waits.
            // The next one to wait takes it. Two wake-ups kept are one:
            // either means "someone look".
            line.pending = Some(match line.pending.take() {
                Some(kept) if kept.tried.len() < wake.tried.len() => kept,
                _ => wake,
            });
        }
        // Otherwise every waiting session's agent already found nothing
        // for this wake-up: it is done.
    }
}

/// A jittered [`SAFETY_POLL`]: between 3/4 and 5/4 of it.
pub fn safety_poll_interval() -> Duration {
    let mut bytes = [0u8; 2];
    let spread = match getrandom::fill(&mut bytes) {
        Ok(()) => f64::from(u16::from_le_bytes(bytes)) / f64::from(u16::MAX),
        Err(_) => 0.5,
    };
    SAFETY_POLL.mul_f64(0.75 + spread / 2.0)
}

/// Events kept for sessions and log streams that have not read them yet.
pub const SESSION_EVENT_CAPACITY: usize = 1024;

/// Whether an agent's session or log stream acts on `event`: a cancel, a
/// revoked token, a repository gone, missed events. Not the many others
/// (every job queued, started, finished, every log append): a thousand
/// sessions each woken for each of those cost more than the job did.
fn for_sessions(event: &StoreEvent) -> bool {
    matches!(
        event,
        StoreEvent::CancelRequested { .. }
            | StoreEvent::AgentTokenRevoked { .. }
            | StoreEvent::RepoDisabled { .. }
            | StoreEvent::Resync
    )
}

/// Wakes one idle session of this controller per queued job and per
/// finished job (which may free a deploy that waited for it), and all of
/// them when events were missed; relays to `Services::session_events` the
/// events that sessions and log streams act on (a lag becomes `Resync`).
/// Ends at `shutdown`, or when the event feed closes. It hears every event
/// from the moment it is made, before it is first polled.
pub fn wake_idle_sessions(
    services: Services,
    shutdown: CancellationToken,
) -> impl std::future::Future<Output = ()> + Send {
    let events = services.store.subscribe();
    wake_on_events(services, events, shutdown)
}

async fn wake_on_events(
    services: Services,
    mut events: tokio::sync::broadcast::Receiver<StoreEvent>,
    shutdown: CancellationToken,
) {
    loop {
        let event = tokio::select! {
            () = shutdown.cancelled() => return,
            event = events.recv() => event,
        };
        let event = match event {
            Ok(event) => event,
            Err(RecvError::Lagged(_)) => StoreEvent::Resync,
            Err(RecvError::Closed) => return,
        };
        match &event {
            StoreEvent::JobQueued { .. } | StoreEvent::JobFinished { .. } => {
                services.idle_sessions.wake_one(Wake::default());
            }
            StoreEvent::Resync => services.idle_sessions.wake_all(),
            _ => {}
        }
        if for_sessions(&event) {
            // No session listening is fine.
            let _ = services.session_events.send(event);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(pairs: &[(&str, &str)]) -> ClaimKey {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn is_woken(waiting: &mut Waiting<'_>) -> Option<Wake> {
        waiting.woken.try_recv().ok()
    }

    #[test]
    fn one_wake_up_wakes_the_session_that_waited_longest() {
        let sessions = IdleSessions::default();
        let mut first = sessions.wait(&key(&[]));
        let mut second = sessions.wait(&key(&[]));
        sessions.wake_one(Wake::default());
        assert!(is_woken(&mut first).is_some());
        assert!(is_woken(&mut second).is_none());
        assert_eq!(sessions.waiting(), 1);
    }

    #[test]
    fn a_wake_up_passes_over_sessions_whose_agents_already_found_nothing() {
        let sessions = IdleSessions::default();
        let deploy = key(&[("pool", "deploy")]);
        let mut plain = sessions.wait(&key(&[]));
        let mut plain_too = sessions.wait(&key(&[]));
        let mut deployer = sessions.wait(&deploy);
        sessions.wake_one(Wake::default());
        let wake = is_woken(&mut plain).expect("the first is woken");
        // It found nothing: the next plain agent would not either.
        sessions.wake_one(wake.tried_by(&key(&[])));
        assert!(is_woken(&mut plain_too).is_none());
        let wake = is_woken(&mut deployer).expect("an agent with other labels is tried");
        // Nobody left to try: the wake-up ends, nothing is kept.
        sessions.wake_one(wake.tried_by(&deploy));
        assert!(is_woken(&mut plain_too).is_none());
        drop(plain_too);
        let mut later = sessions.wait(&key(&[]));
        assert!(is_woken(&mut later).is_none());
    }

    #[test]
    fn a_wake_up_while_nobody_waits_goes_to_the_next_session_that_waits() {
        let sessions = IdleSessions::default();
        sessions.wake_one(Wake::default());
        let mut next = sessions.wait(&key(&[]));
        assert!(is_woken(&mut next).is_some());
        assert_eq!(sessions.waiting(), 0);
    }

    #[test]
    fn a_kept_wake_up_is_not_handed_back_to_an_agent_that_found_nothing() {
        let sessions = IdleSessions::default();
        sessions.wake_one(Wake::default().tried_by(&key(&[])));
        let mut same = sessions.wait(&key(&[]));
        assert!(is_woken(&mut same).is_none(), "no busy loop");
        drop(same);
        let mut other = sessions.wait(&key(&[("os", "mac")]));
        assert!(is_woken(&mut other).is_some());
    }

    #[test]
    fn a_session_that_leaves_with_a_wake_up_unused_passes_it_on() {
        let sessions = IdleSessions::default();
        let first = sessions.wait(&key(&[]));
        let mut second = sessions.wait(&key(&[]));
        sessions.wake_one(Wake::default());
        drop(first);
        assert!(is_woken(&mut second).is_some());
    }

    #[test]
    fn missed_events_wake_every_session() {
        let sessions = IdleSessions::default();
        let mut waiting: Vec<_> = (0..3).map(|_| sessions.wait(&key(&[]))).collect();
        sessions.wake_all();
        assert!(waiting.iter_mut().all(|w| is_woken(w).is_some()));
    }
}
