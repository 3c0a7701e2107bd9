//! The offline check of a stopped broker's store (`concordat-broker verify`): the whole tree
//! recomputed from the stored entries, every stored hash compared with it, both checkpoints
//! (the database's and the published one) checked against it, every queue item matched with
//! the audit entry that queued it, every receipt with the acceptance it names, and every TLP
//! record (`tlp_received`) with the acceptance it says the object first arrived in.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use concordat_proto::{
    merkle::{self, Hash},
    pb::{self, audit_entry::Event},
};
use prost::Message;

use super::{SledStorage, StoredReceipt, StoredReceived};
use crate::store::kv::KvError;
use crate::{
    audit_log::{self, SignedCheckpoint},
    refusal::Internal,
    store::queue::{ItemKind, StoredBlock, parse_block_key},
};

/// The most problems a report lists (it counts them all).
const MAX_LISTED: usize = 50;

/// What [`SledStorage::verify`] found.
#[derive(Debug, Default)]
pub struct StoreReport {
    /// Audit entries read and rehashed.
    pub entries: u64,
    /// Stored hashes compared with the recomputed tree.
    pub hashes: u64,
    /// The recomputed root of the whole log.
    pub root: Option<Hash>,
    /// The checkpoint kept in the database: size and root.
    pub checkpoint: Option<(u64, Hash)>,
    /// The checkpoint published beside the database: size and root.
    pub published: Option<(u64, Hash)>,
    /// Queue items checked against their audit entries.
    pub queue_items: u64,
    /// Receipts checked against their acceptances.
    pub receipts: u64,
    /// TLP records (objects delivered under AMBER+STRICT or RED) checked against the
    /// acceptances they name.
    pub tlp_records: u64,
    /// How long the check took.
    pub elapsed: Duration,
    /// Everything that does not hold, up to the first fifty.
    pub problems: Vec<String>,
    /// How many problems there were in all.
    pub problem_count: u64,
    /// True if the log has entries but no checkpoint was published beside it: a store written
    /// by an older broker, or one whose published checkpoint was deleted.
    pub unpublished: bool,
}

impl StoreReport {
    fn problem(&mut self, p: String) {
        self.problem_count += 1;
        if self.problems.len() < MAX_LISTED {
            self.problems.push(p);
        }
    }

    /// Whether the store is whole.
    pub fn ok(&self) -> bool {
        self.problem_count == 0
    }
}

/// What the log says of an accepted transfer, for the queue and receipt checks.
struct Accepted {
    index: u64,
    sender: String,
    message_id: String,
    recipients: Vec<String>,
}

impl SledStorage {
    /// Checks the whole store, as described in the module documentation. Only a store no
    /// broker is serving should be checked (sled lets one process open it anyway).
    pub fn verify(&self) -> Result<StoreReport, Internal> {
        let started = Instant::now();
        let mut report = StoreReport::default();
        let read = |e: KvError| Internal::new("reading the store", e);

        // The tree, from the entries alone.
        let (entry_tree, hash_tree) = self.log.trees();
        let mut recomputed: Vec<Hash> = Vec::new();
        let mut accepted: HashMap<uuid::Uuid, Accepted> = HashMap::new();
        let mut by_index: HashMap<u64, uuid::Uuid> = HashMap::new();
        let mut recalls: HashSet<(String, String)> = HashSet::new();
        let mut next = 0u64;
        for item in entry_tree.iter() {
            let (key, bundle) = item.map_err(read)?;
            let Some(start) = be_u64(&key) else {
                report.problem("an entry bundle has a malformed key".into());
                continue;
            };
            if start != next {
                report.problem(format!(
                    "entries {next}..{start} are missing (a bundle starts at {start})"
                ));
                // The tree cannot be recomputed past a gap.
                break;
            }
            let Some(entries) = audit_log::bundle_entries(&bundle) else {
                report.problem(format!("the entry bundle at {start} is malformed"));
                break;
            };
            for bytes in entries {
                let index = next;
                match merkle::stored_hashes(index, bytes, &recomputed) {
                    Ok(hashes) => recomputed.extend(hashes),
                    Err(e) => {
                        report.problem(format!("hashing entry {index}: {e}"));
                        break;
                    }
                }
                match concordat_proto::audit::decode(bytes) {
                    Ok(entry) => {
                        note_entry(index, entry, &mut accepted, &mut by_index, &mut recalls)
                    }
                    Err(e) => report.problem(format!("entry {index} does not decode: {e}")),
                }
                next += 1;
            }
        }
        report.entries = next;
        let size = self.log.size()?;
        if size != next {
            report.problem(format!(
                "the database says the log has {size} entries, but {next} were read in order"
            ));
        }
        match merkle::tree_hash(next, &recomputed) {
            Ok(root) => report.root = Some(root),
            Err(e) => report.problem(format!("the recomputed tree of {next} entries: {e}")),
        }

        // Every stored hash against the recomputed tree, and none missing.
        let mut covered = 0u64;
        for item in hash_tree.iter() {
            let (key, bundle) = item.map_err(read)?;
            let Some(start) = be_u64(&key) else {
                report.problem("a hash bundle has a malformed key".into());
                continue;
            };
            if start != covered {
                report.problem(format!(
                    "stored hashes {covered}..{start} are missing (a bundle starts at {start})"
                ));
            }
            if bundle.len() % 32 != 0 {
                report.problem(format!("the hash bundle at {start} is malformed"));
                continue;
            }
            for (k, chunk) in bundle.chunks_exact(32).enumerate() {
                let i = start + k as u64;
                let expected = usize::try_from(i).ok().and_then(|i| recomputed.get(i));
                match expected {
                    Some(h) if h.0 == chunk => {}
                    Some(_) => report.problem(format!(
                        "stored hash {i} differs from the one recomputed from the entries"
                    )),
                    None => report.problem(format!("stored hash {i} lies beyond the log")),
                }
                report.hashes += 1;
            }
            covered = start + (bundle.len() / 32) as u64;
        }
        let expected_hashes = merkle::stored_hash_count(next);
        if covered < expected_hashes {
            report.problem(format!(
                "{} of the log's {expected_hashes} stored hashes are missing",
                expected_hashes - covered
            ));
        }

        // Both checkpoints against the recomputed tree.
        let stored = self.log.latest();
        let published = self.log.published();
        for (what, cp, is_published) in [
            ("the database's checkpoint", stored, false),
            ("the published checkpoint", published, true),
        ] {
            match cp {
                Err(e) => report.problem(format!("{what} does not verify: {e}")),
                Ok(None) => {}
                Ok(Some(SignedCheckpoint {
                    size: cps, root, ..
                })) => {
                    if is_published {
                        report.published = Some((cps, root));
                    } else {
                        report.checkpoint = Some((cps, root));
                    }
                    if cps > next {
                        report.problem(format!(
                            "{what} has {cps} entries (root {}), but the log only {next}",
                            root.to_hex()
                        ));
                    } else {
                        match merkle::tree_hash(cps, &recomputed) {
                            Ok(r) if r == root => {}
                            Ok(r) => report.problem(format!(
                                "{what} of {cps} entries has root {}, but the entries give {}",
                                root.to_hex(),
                                r.to_hex()
                            )),
                            Err(e) => report.problem(format!("{what}: {e}")),
                        }
                    }
                }
            }
        }
        report.unpublished = report.published.is_none() && next > 0;

        // Every queue item has the audit entry that queued it.
        for item in self.queues.iter() {
            let (key, value) = item.map_err(read)?;
            let Some((recipient, first)) = parse_block_key(&key) else {
                report.problem("a queue block has a malformed key".into());
                continue;
            };
            let block = match StoredBlock::decode(value.as_ref()) {
                Ok(b) => b,
                Err(e) => {
                    report.problem(format!("the queue block {recipient}/{first}: {e}"));
                    continue;
                }
            };
            for stored in block.items {
                report.queue_items += 1;
                let seq = stored.seq;
                let Some(meta) = stored.meta() else {
                    report.problem(format!("queue item {recipient}/{seq} is malformed"));
                    continue;
                };
                let recipient = recipient.to_string();
                let transfer = meta.transfer_id;
                match meta.kind {
                    ItemKind::Notice => {
                        if !recalls.contains(&(recipient.clone(), transfer.to_string())) {
                            report.problem(format!(
                                "notice {recipient}/{seq} ({transfer}) has no notice_queued \
                                 entry"
                            ));
                        }
                    }
                    ItemKind::Recall => {
                        if !recalls.contains(&(recipient.clone(), transfer.to_string())) {
                            report.problem(format!(
                                "recall notice {recipient}/{seq} for transfer {transfer} has \
                                 no recall_queued entry"
                            ));
                        }
                    }
                    kind => {
                        match accepted.get(&transfer) {
                            Some(a) if a.recipients.contains(&recipient) => {}
                            Some(a) => report.problem(format!(
                                "queue item {recipient}/{seq}: transfer {transfer} (entry {}) \
                                 was not accepted for {recipient}",
                                a.index
                            )),
                            None => report.problem(format!(
                                "queue item {recipient}/{seq}: transfer {transfer} has no \
                                 transfer_accepted entry"
                            )),
                        }
                        if kind == ItemKind::Shared
                            && self
                                .transfers
                                .get(transfer.as_bytes())
                                .map_err(read)?
                                .is_none()
                        {
                            report.problem(format!(
                                "queue item {recipient}/{seq}: the shared transfer {transfer} \
                                 is missing"
                            ));
                        }
                        if kind == ItemKind::Inline && stored.transfer.is_none() {
                            report.problem(format!(
                                "queue item {recipient}/{seq}: its transfer is missing"
                            ));
                        }
                    }
                }
            }
        }

        // Every receipt names the acceptance of its own message.
        for item in self.receipts.iter() {
            let (key, value) = item.map_err(read)?;
            report.receipts += 1;
            let Some(split) = key.iter().position(|b| *b == 0) else {
                report.problem("a receipt has a malformed key".into());
                continue;
            };
            let sender = String::from_utf8_lossy(&key[..split]).into_owned();
            let message_id = <[u8; 16]>::try_from(&key[split + 1..])
                .map(|b| uuid::Uuid::from_bytes(b).to_string())
                .unwrap_or_default();
            let index = match StoredReceipt::decode(value.as_ref()) {
                Ok(r) => r.log_index,
                Err(e) => {
                    report.problem(format!("the receipt of {sender}/{message_id}: {e}"));
                    continue;
                }
            };
            let found = by_index.get(&index).and_then(|t| accepted.get(t));
            match found {
                Some(a) if a.sender == sender && a.message_id == message_id => {}
                _ => report.problem(format!(
                    "the receipt of {sender}/{message_id} names entry {index}, which is not \
                     that message's acceptance"
                )),
            }
        }
        // Every TLP record names an acceptance of a transfer to its holder, from its first sender.
        for item in self.tlp_received.iter() {
            let (key, value) = item.map_err(read)?;
            report.tlp_records += 1;
            let Some(split) = key.iter().position(|b| *b == 0) else {
                report.problem("a TLP record has a malformed key".into());
                continue;
            };
            let holder = String::from_utf8_lossy(&key[..split]).into_owned();
            let object = String::from_utf8_lossy(&key[split + 1..]).into_owned();
            let record = match StoredReceived::decode(value.as_ref()) {
                Ok(r) => r,
                Err(e) => {
                    report.problem(format!("the TLP record of {object} held by {holder}: {e}"));
                    continue;
                }
            };
            let found = record
                .first_transfer
                .parse::<uuid::Uuid>()
                .ok()
                .and_then(|t| accepted.get(&t));
            match found {
                Some(a)
                    if a.recipients.contains(&holder) && record.from.first() == Some(&a.sender) => {
                }
                _ => report.problem(format!(
                    "the TLP record of {object} held by {holder} names transfer {}, which was \
                     not accepted for {holder} from {}",
                    record.first_transfer,
                    record.from.first().map_or("anyone", String::as_str)
                )),
            }
        }
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Publishes the database's own latest checkpoint beside it (for a store written by a
    /// broker that did not publish one), after [`SledStorage::verify`] found it whole.
    pub fn publish_latest(&self) -> Result<Option<SignedCheckpoint>, Internal> {
        self.log.publish_latest()
    }
}

fn be_u64(bytes: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(bytes.try_into().ok()?))
}

fn note_entry(
    index: u64,
    entry: pb::AuditEntry,
    accepted: &mut HashMap<uuid::Uuid, Accepted>,
    by_index: &mut HashMap<u64, uuid::Uuid>,
    recalls: &mut HashSet<(String, String)>,
) {
    match entry.event {
        Some(Event::TransferAccepted(t)) => {
            let Ok(id) = t.transfer_id.parse::<uuid::Uuid>() else {
                return;
            };
            let facts = t.envelope.unwrap_or_default();
            by_index.insert(index, id);
            accepted.insert(
                id,
                Accepted {
                    index,
                    sender: facts.sender,
                    message_id: facts.message_id,
                    recipients: t.authorities.into_iter().map(|a| a.recipient).collect(),
                },
            );
        }
        Some(Event::RecallQueued(r)) => {
            recalls.insert((r.recipient, r.transfer_id));
        }
        // A notice is proved like a recall notice: by the entry naming its recipient and id.
        Some(Event::NoticeQueued(q)) => {
            if let Some(n) = q.notice {
                recalls.insert((q.recipient, n.notice_id));
            }
        }
        _ => {}
    }
}
