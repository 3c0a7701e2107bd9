//! Refused calls in the audit log, with floods folded.
//!
//! Every refused call that is not a refused envelope (those are `TransferRefused` entries, written
//! by [`crate::service`]) goes through [`RefusalLog::refuse`]: the gate's refusals (a certificate
//! that names no caller, a request that does not decode or is too large) and the handlers' (an
//! auditor sending, an agency exporting, an invalid revocation, …). Each becomes a `CallRefused`
//! entry naming the certificate's subject and SHA-256 fingerprint.
//!
//! So that a flood cannot fill the log, identical refusals — same certificate fingerprint, RPC
//! and reason — are folded within a window of [`FOLD_WINDOW`] that opens with the first one: the
//! first is written at once (`count` 1) and answered only once it is durable; the ones after it
//! in the window are only counted. When the window has passed, the count is written as one entry
//! (`count` = how many were folded, `first_at`/`last_at` their times, the message of the first of
//! them): by the next identical refusal, by [`RefusalLog::flush_expired`] (which the broker runs
//! every [`FLUSH_EVERY`]), when the key is evicted to keep at most [`MAX_KEYS`] windows (the
//! oldest goes first), or at shutdown ([`RefusalLog::flush_all`]).

use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

use concordat_proto::pb;
use time::OffsetDateTime;
use tonic::Status;

use crate::{
    identity::{Call, Caller, Certificate},
    refusal::{Reason, Refusal},
    store::{self, Op, Store},
};

/// How long identical refusals are folded into one entry after the first.
pub const FOLD_WINDOW: Duration = Duration::from_secs(60);
/// How often the broker writes the counts of windows that have passed.
pub const FLUSH_EVERY: Duration = Duration::from_secs(10);
/// The most windows held at once; beyond it the oldest is written and dropped.
pub const MAX_KEYS: usize = 10_000;

/// A refused call, as far as the broker knows who made it.
#[derive(Debug, Clone, Copy)]
pub struct RefusedCall<'a> {
    /// The RPC, e.g. `Exchange.Send`.
    pub rpc: &'static str,
    /// Who the certificate was recognised as, if anyone.
    pub caller: Option<&'a Caller>,
    /// The connection's certificate.
    pub certificate: Option<&'a Certificate>,
    /// The peer's address, for the operational log only.
    pub peer: Option<SocketAddr>,
}

impl<'a> RefusedCall<'a> {
    /// The refused call of an authenticated [`Call`].
    pub fn of(call: &'a Call) -> Self {
        RefusedCall {
            rpc: call.rpc,
            caller: Some(&call.caller),
            certificate: call.certificate.as_deref(),
            peer: None,
        }
    }
}

/// Writes refused calls to the audit log, folding identical ones.
pub struct RefusalLog {
    store: Store,
    folder: Mutex<Folder>,
}

impl RefusalLog {
    /// A log writing through `store`.
    pub fn new(store: Store) -> Self {
        RefusalLog {
            store,
            folder: Mutex::new(Folder::new(FOLD_WINDOW, MAX_KEYS)),
        }
    }

    /// Logs `refusal` of `call` (tracing, and the audit log unless folded) and returns the status
    /// to answer with. The refusal stands even if its entry cannot be written; that is logged.
    pub async fn refuse(&self, call: RefusedCall<'_>, refusal: Refusal) -> Status {
        let now = OffsetDateTime::now_utc();
        let entry = pb::CallRefused {
            rpc: call.rpc.into(),
            caller: call.caller.map(|c| c.id().to_string()).unwrap_or_default(),
            cert_subject: call
                .certificate
                .map(|c| c.subject.clone())
                .unwrap_or_default(),
            cert_sha256: call
                .certificate
                .map(|c| c.sha256.to_vec())
                .unwrap_or_default(),
            reason: refusal.reason.as_str().into(),
            message: refusal.message.clone(),
            count: 1,
            first_at: Some(store::timestamp(now)),
            last_at: Some(store::timestamp(now)),
        };
        let key = Key {
            certificate: call.certificate.map_or([0; 32], |c| c.sha256),
            rpc: call.rpc,
            reason: refusal.reason,
        };
        let (verdict, due) = self.folder().observe(key, Instant::now(), &entry);
        let caller = call.caller.map(|c| c.id().to_string()).unwrap_or_default();
        let peer = call.peer.map(|p| p.to_string()).unwrap_or_default();
        let fingerprint = call
            .certificate
            .map(Certificate::sha256_hex)
            .unwrap_or_default();
        match verdict {
            Verdict::Log => tracing::warn!(
                rpc = call.rpc, caller = %caller, peer = %peer, subject = %entry.cert_subject,
                cert_sha256 = %fingerprint, reason = %refusal.reason,
                "refused: {}", refusal.message
            ),
            Verdict::Folded => tracing::debug!(
                rpc = call.rpc, caller = %caller, peer = %peer, cert_sha256 = %fingerprint,
                reason = %refusal.reason, "refused again (folded into the audit log's count)"
            ),
        }
        self.write(due).await;
        if verdict == Verdict::Log {
            self.write(vec![entry]).await;
        }
        refusal.into()
    }

    /// Writes the counts of the windows that have passed.
    pub async fn flush_expired(&self) {
        let due = self.folder().expired(Instant::now());
        self.write(due).await;
    }

    /// Writes every count still held (at shutdown).
    pub async fn flush_all(&self) {
        let due = self.folder().drain();
        self.write(due).await;
    }

    fn folder(&self) -> MutexGuard<'_, Folder> {
        // The folder's state stays consistent even if a holder panicked: use it anyway.
        self.folder
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    async fn write(&self, entries: Vec<pb::CallRefused>) {
        for entry in entries {
            if entry.count > 1 {
                tracing::warn!(
                    rpc = %entry.rpc, caller = %entry.caller, subject = %entry.cert_subject,
                    cert_sha256 = %hex::encode(&entry.cert_sha256), reason = %entry.reason,
                    count = entry.count, "refused calls folded into one audit entry"
                );
            }
            let op = Op::Log(Box::new(pb::audit_entry::Event::CallRefused(entry)));
            if let Err(e) = self.store.commit(op).await {
                tracing::error!(error = ?e, "a refused call could not be written to the audit log");
            }
        }
    }
}

/// What makes refusals identical.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Key {
    certificate: [u8; 32],
    rpc: &'static str,
    reason: Reason,
}

/// One key's window: when it opened, its place in the eviction order, and the refusals folded
/// into it so far (an entry whose count grows).
#[derive(Debug)]
struct Window {
    opened: Instant,
    seq: u64,
    folded: Option<pb::CallRefused>,
}

/// Whether a refusal is written now or counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    /// Write its entry now.
    Log,
    /// Counted in its window.
    Folded,
}

/// The folding windows, without I/O or clocks of their own (times are passed in).
#[derive(Debug)]
struct Folder {
    window: Duration,
    max_keys: usize,
    windows: HashMap<Key, Window>,
    /// Keys by the order their windows opened: the first is the oldest.
    order: BTreeMap<u64, Key>,
    next_seq: u64,
}

impl Folder {
    fn new(window: Duration, max_keys: usize) -> Self {
        Folder {
            window,
            max_keys: max_keys.max(1),
            windows: HashMap::new(),
            order: BTreeMap::new(),
            next_seq: 0,
        }
    }

    /// Takes one refusal with this `key` at `now` (`entry` is its own entry, count 1). Returns
    /// whether to write it now, and the folded counts that are due first.
    fn observe(
        &mut self,
        key: Key,
        now: Instant,
        entry: &pb::CallRefused,
    ) -> (Verdict, Vec<pb::CallRefused>) {
        if let Some(w) = self.windows.get_mut(&key)
            && now.saturating_duration_since(w.opened) < self.window
        {
            match &mut w.folded {
                Some(folded) => {
                    folded.count = folded.count.saturating_add(1);
                    folded.last_at = entry.last_at;
                }
                None => w.folded = Some(entry.clone()),
            }
            return (Verdict::Folded, Vec::new());
        }
        let mut due = Vec::new();
        if let Some(old) = self.remove(&key) {
            due.extend(old.folded);
        }
        while self.windows.len() >= self.max_keys {
            let Some((_, oldest)) = self.order.pop_first() else {
                break;
            };
            if let Some(w) = self.windows.remove(&oldest) {
                due.extend(w.folded);
            }
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, key.clone());
        self.windows.insert(
            key,
            Window {
                opened: now,
                seq,
                folded: None,
            },
        );
        (Verdict::Log, due)
    }

    /// Removes the windows that have passed by `now` and returns their folded counts.
    fn expired(&mut self, now: Instant) -> Vec<pb::CallRefused> {
        let mut due = Vec::new();
        // Windows open in `order`'s order, so the passed ones are a prefix of it.
        while let Some((_, key)) = self.order.first_key_value() {
            let passed = self
                .windows
                .get(key)
                .is_none_or(|w| now.saturating_duration_since(w.opened) >= self.window);
            if !passed {
                break;
            }
            if let Some((_, key)) = self.order.pop_first()
                && let Some(w) = self.windows.remove(&key)
            {
                due.extend(w.folded);
            }
        }
        due
    }

    /// Removes every window and returns the folded counts.
    fn drain(&mut self) -> Vec<pb::CallRefused> {
        self.order.clear();
        let mut windows: Vec<Window> = self.windows.drain().map(|(_, w)| w).collect();
        windows.sort_by_key(|w| w.seq);
        windows.into_iter().filter_map(|w| w.folded).collect()
    }

    fn remove(&mut self, key: &Key) -> Option<Window> {
        let w = self.windows.remove(key)?;
        self.order.remove(&w.seq);
        Some(w)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(cert: u8, reason: Reason) -> Key {
        Key {
            certificate: [cert; 32],
            rpc: "Exchange.Send",
            reason,
        }
    }

    fn entry(at: i64) -> pb::CallRefused {
        let t = Some(prost_types::Timestamp {
            seconds: at,
            nanos: 0,
        });
        pb::CallRefused {
            count: 1,
            first_at: t,
            last_at: t,
            ..Default::default()
        }
    }

    /// One step: which key refuses at which second, and what is expected: the verdict and the
    /// counts written before it.
    struct Step {
        at: u64,
        key: Key,
        verdict: Verdict,
        due: &'static [u32],
    }

    #[test]
    fn identical_refusals_fold_within_the_window() {
        let a = key(1, Reason::UnknownAgency);
        let b = key(2, Reason::UnknownAgency);
        let a_other_reason = key(1, Reason::Malformed);
        let steps = [
            // The first of a key is written at once; the rest of its window are counted.
            Step {
                at: 0,
                key: a.clone(),
                verdict: Verdict::Log,
                due: &[],
            },
            Step {
                at: 1,
                key: a.clone(),
                verdict: Verdict::Folded,
                due: &[],
            },
            Step {
                at: 59,
                key: a.clone(),
                verdict: Verdict::Folded,
                due: &[],
            },
            // Another certificate, or another reason, is another key.
            Step {
                at: 2,
                key: b.clone(),
                verdict: Verdict::Log,
                due: &[],
            },
            Step {
                at: 3,
                key: a_other_reason.clone(),
                verdict: Verdict::Log,
                due: &[],
            },
            // After the window: the count of the folded ones, then a new window.
            Step {
                at: 60,
                key: a.clone(),
                verdict: Verdict::Log,
                due: &[2],
            },
            Step {
                at: 61,
                key: a.clone(),
                verdict: Verdict::Folded,
                due: &[],
            },
            // A window with nothing folded leaves nothing to write.
            Step {
                at: 62,
                key: b.clone(),
                verdict: Verdict::Log,
                due: &[],
            },
        ];
        let start = Instant::now();
        let mut folder = Folder::new(Duration::from_secs(60), 100);
        for (i, step) in steps.iter().enumerate() {
            let now = start + Duration::from_secs(step.at);
            let (verdict, due) = folder.observe(step.key.clone(), now, &entry(step.at as i64));
            assert_eq!(verdict, step.verdict, "step {i}");
            let counts: Vec<u32> = due.iter().map(|e| e.count).collect();
            assert_eq!(counts, step.due, "step {i}");
        }
        // The count written says when the folded ones happened.
        let (_, due) = folder.observe(a.clone(), start + Duration::from_secs(200), &entry(200));
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, 1);
        assert_eq!(due[0].first_at.unwrap().seconds, 61);
        // Passed windows are written by the periodic flush; open ones wait.
        let (_, _) = folder.observe(b.clone(), start + Duration::from_secs(201), &entry(201));
        folder.observe(b.clone(), start + Duration::from_secs(202), &entry(202));
        folder.observe(a.clone(), start + Duration::from_secs(230), &entry(230));
        assert!(folder.expired(start + Duration::from_secs(250)).is_empty());
        let due = folder.expired(start + Duration::from_secs(261));
        assert_eq!(due.iter().map(|e| e.count).collect::<Vec<_>>(), [1, 1]);
        assert!(folder.windows.is_empty() && folder.order.is_empty());
    }

    #[test]
    fn a_flood_is_one_entry_now_and_one_count_later() {
        let a = key(1, Reason::UnknownAgency);
        let start = Instant::now();
        let mut folder = Folder::new(Duration::from_secs(60), 100);
        let mut written = 0;
        for i in 0..100 {
            let (verdict, due) = folder.observe(a.clone(), start, &entry(i));
            assert!(due.is_empty());
            written += u32::from(verdict == Verdict::Log);
        }
        assert_eq!(written, 1);
        let due = folder.drain();
        assert_eq!(due.len(), 1);
        assert_eq!(due[0].count, 99);
        assert_eq!(
            (
                due[0].first_at.unwrap().seconds,
                due[0].last_at.unwrap().seconds
            ),
            (1, 99)
        );
    }

    #[test]
    fn the_oldest_window_is_evicted_and_written() {
        let start = Instant::now();
        let mut folder = Folder::new(Duration::from_secs(60), 3);
        for cert in 0..3u8 {
            let k = key(cert, Reason::UnknownAgency);
            folder.observe(k.clone(), start, &entry(0));
            folder.observe(k, start, &entry(1));
        }
        // A fourth key evicts the oldest (certificate 0), whose count is written.
        let (verdict, due) = folder.observe(key(3, Reason::UnknownAgency), start, &entry(2));
        assert_eq!(verdict, Verdict::Log);
        assert_eq!(due.len(), 1);
        assert_eq!(folder.windows.len(), 3);
        assert!(!folder.windows.contains_key(&key(0, Reason::UnknownAgency)));
        // Certificate 0 starts over: written at once.
        let (verdict, due) = folder.observe(key(0, Reason::UnknownAgency), start, &entry(3));
        assert_eq!(verdict, Verdict::Log);
        assert_eq!(due.len(), 1, "certificate 1 is evicted in turn");
    }
}
