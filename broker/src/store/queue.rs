//! The recipients' queues: how items are grouped into blocks on disk, and the in-memory index
//! of every item not yet acknowledged.
//!
//! An accepted transfer is not written as a record of its own: the items that one group commit
//! queues for a recipient go into one block (split at [`MAX_BLOCK_ITEMS`] items or
//! [`MAX_BLOCK_BYTES`] of payload), keyed by the recipient and the block's first sequence
//! number. Acknowledgements of part of a block are kept as a small bitmap beside it; the block
//! and its bitmap are deleted once every item is acknowledged. sled's cost is per write, so a
//! burst of transfers costs a few writes per commit rather than two per transfer.
//!
//! [`QueueIndex`] knows, for every recipient, which items of which blocks are still
//! unacknowledged, their transfer ids and kinds. The writer keeps it (it is the only writer)
//! and subscriptions read it, so depths, acknowledgements and claims need no reads of the
//! database; only the blocks being delivered are read.

use std::collections::{BTreeMap, HashMap};

use concordat_proto::{ids::AgencyId, pb};
use prost::Message;

/// The most items in one block.
pub const MAX_BLOCK_ITEMS: usize = 64;
/// A block is closed once its items' payloads reach this many bytes.
pub const MAX_BLOCK_BYTES: usize = 1 << 20;

/// What a queue item carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// A transfer for this recipient alone, held inside the item.
    Inline,
    /// A transfer to several recipients, stored once in `transfers` with a reference count.
    Shared,
    /// A recall notice.
    Recall,
    /// A notice of the broker's own about a workflow.
    Notice,
}

impl ItemKind {
    /// The value stored in [`StoredItem::kind`].
    pub fn to_wire(self) -> i32 {
        match self {
            ItemKind::Inline => 0,
            ItemKind::Shared => 1,
            ItemKind::Recall => 2,
            ItemKind::Notice => 3,
        }
    }

    fn from_wire(v: i32) -> Option<ItemKind> {
        match v {
            0 => Some(ItemKind::Inline),
            1 => Some(ItemKind::Shared),
            2 => Some(ItemKind::Recall),
            3 => Some(ItemKind::Notice),
            _ => None,
        }
    }
}

/// What the index knows of one queued item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ItemMeta {
    /// Its sequence number: the delivery id.
    pub seq: u64,
    /// The transfer it delivers or recalls.
    pub transfer_id: uuid::Uuid,
    /// What it carries.
    pub kind: ItemKind,
}

/// A queue item as stored in a block.
#[derive(Clone, PartialEq, Message)]
pub struct StoredItem {
    /// Its sequence number.
    #[prost(uint64, tag = "1")]
    pub seq: u64,
    /// The transfer id (16 bytes): delivered, or recalled by a notice.
    #[prost(bytes = "vec", tag = "2")]
    pub transfer_id: Vec<u8>,
    /// An [`ItemKind`].
    #[prost(int32, tag = "3")]
    pub kind: i32,
    /// The agreement and clause that allowed the transfer to this recipient.
    #[prost(string, tag = "4")]
    pub agreement_id: String,
    /// See `agreement_id`.
    #[prost(string, tag = "5")]
    pub clause: String,
    /// The transfer, for [`ItemKind::Inline`].
    #[prost(message, optional, tag = "6")]
    pub transfer: Option<pb::Transfer>,
    /// The notice, for [`ItemKind::Recall`].
    #[prost(message, optional, tag = "7")]
    pub recall: Option<pb::RecallNotice>,
    /// The index of the audit entry it was queued under (the transfer's `transfer_accepted`,
    /// the notice's `recall_queued`), whose proof goes with the delivery. Absent in items
    /// queued by a broker older than the field.
    #[prost(uint64, optional, tag = "8")]
    pub log_index: Option<u64>,
    /// The notice, for [`ItemKind::Notice`] (whose `transfer_id` is the notice's id).
    #[prost(message, optional, tag = "9")]
    pub notice: Option<pb::Notice>,
}

impl ItemMeta {
    /// The index entry of a stored item's first three fields, or `None` if they are malformed.
    fn from_stored(seq: u64, transfer_id: &[u8], kind: i32) -> Option<ItemMeta> {
        Some(ItemMeta {
            seq,
            transfer_id: uuid::Uuid::from_slice(transfer_id).ok()?,
            kind: ItemKind::from_wire(kind)?,
        })
    }
}

impl StoredItem {
    /// The item's index entry, or `None` if it is malformed.
    pub fn meta(&self) -> Option<ItemMeta> {
        ItemMeta::from_stored(self.seq, &self.transfer_id, self.kind)
    }

    fn payload_len(&self) -> usize {
        self.transfer.as_ref().map_or(0, |t| t.payload.len())
    }
}

/// A block as stored: its items in sequence order.
#[derive(Clone, PartialEq, Message)]
pub struct StoredBlock {
    /// The items.
    #[prost(message, repeated, tag = "1")]
    pub items: Vec<StoredItem>,
}

/// The first three fields of a [`StoredItem`]: decoding a block as a [`BlockHeader`] skips
/// the transfers and notices, for building the index at start-up.
#[derive(Clone, PartialEq, Message)]
struct ItemHeader {
    #[prost(uint64, tag = "1")]
    seq: u64,
    #[prost(bytes = "vec", tag = "2")]
    transfer_id: Vec<u8>,
    #[prost(int32, tag = "3")]
    kind: i32,
}

/// A [`StoredBlock`] read for its items' [`ItemMeta`] only.
#[derive(Clone, PartialEq, Message)]
pub struct BlockHeader {
    #[prost(message, repeated, tag = "1")]
    items: Vec<ItemHeader>,
}

impl BlockHeader {
    /// The items' index entries, or `None` if one is malformed.
    pub fn metas(&self) -> Option<Vec<ItemMeta>> {
        self.items
            .iter()
            .map(|h| ItemMeta::from_stored(h.seq, &h.transfer_id, h.kind))
            .collect()
    }
}

/// The blocks one transaction queues, per recipient, filled in sequence order.
#[derive(Default)]
pub struct BlockBuilder {
    open: HashMap<AgencyId, (Vec<StoredItem>, usize)>,
    done: Vec<(AgencyId, Vec<StoredItem>)>,
}

impl BlockBuilder {
    /// Adds `item` to `recipient`'s open block, closing it first if it is full.
    pub fn push(&mut self, recipient: &AgencyId, item: StoredItem) {
        let size = item.payload_len();
        let (items, bytes) = self.open.entry(recipient.clone()).or_default();
        if !items.is_empty() && (items.len() >= MAX_BLOCK_ITEMS || *bytes + size > MAX_BLOCK_BYTES)
        {
            self.done.push((recipient.clone(), std::mem::take(items)));
            *bytes = 0;
        }
        *bytes += size;
        items.push(item);
    }

    /// Every block, each with its recipient; items in sequence order within a block.
    pub fn finish(mut self) -> Vec<(AgencyId, Vec<StoredItem>)> {
        let mut open: Vec<_> = self.open.into_iter().collect();
        open.sort_by(|a, b| a.0.cmp(&b.0));
        self.done.extend(
            open.into_iter()
                .filter(|(_, (items, _))| !items.is_empty())
                .map(|(r, (items, _))| (r, items)),
        );
        self.done
    }
}

/// The key of `recipient`'s block whose first item has sequence number `first`.
pub fn block_key(recipient: &AgencyId, first: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(recipient.as_str().len() + 9);
    k.extend_from_slice(recipient.as_str().as_bytes());
    k.push(0);
    k.extend_from_slice(&first.to_be_bytes());
    k
}

/// The recipient and first sequence number of a block key, or `None` if it is malformed.
pub fn parse_block_key(key: &[u8]) -> Option<(AgencyId, u64)> {
    let split = key.len().checked_sub(9)?;
    let (name, rest) = key.split_at(split);
    let (zero, seq) = rest.split_first()?;
    if *zero != 0 {
        return None;
    }
    let recipient = std::str::from_utf8(name).ok()?.parse().ok()?;
    Some((recipient, u64::from_be_bytes(seq.try_into().ok()?)))
}

/// Which items of a block are acknowledged, as stored beside it: bit `k` is item `k`.
pub fn encode_acked(acked: &[bool]) -> Vec<u8> {
    let mut out = vec![0u8; acked.len().div_ceil(8)];
    for (k, _) in acked.iter().enumerate().filter(|(_, a)| **a) {
        out[k / 8] |= 1 << (k % 8);
    }
    out
}

/// The inverse of [`encode_acked`] for a block of `len` items.
pub fn decode_acked(bytes: &[u8], len: usize) -> Vec<bool> {
    (0..len)
        .map(|k| bytes.get(k / 8).is_some_and(|b| b & (1 << (k % 8)) != 0))
        .collect()
}

/// One block as the index sees it.
#[derive(Debug, Clone)]
struct Block {
    items: Vec<ItemMeta>,
    acked: Vec<bool>,
    remaining: usize,
}

/// Where an unacknowledged item is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The first sequence number of its block (the block's key).
    pub block: u64,
    /// Its position in the block.
    pub position: usize,
    /// The item.
    pub item: ItemMeta,
}

/// What an acknowledgement leaves of a block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AckOutcome {
    /// Some items remain: the block's new bitmap.
    Partial(Vec<bool>),
    /// Every item is acknowledged: the block goes, and its bitmap if it had one.
    Complete {
        /// Whether a bitmap had been stored for the block.
        had_bitmap: bool,
    },
}

/// Every recipient's unacknowledged items.
#[derive(Debug, Default)]
pub struct QueueIndex {
    queues: HashMap<AgencyId, BTreeMap<u64, Block>>,
    depths: HashMap<AgencyId, u64>,
}

impl QueueIndex {
    /// How many unacknowledged items `recipient` has.
    pub fn depth(&self, recipient: &AgencyId) -> u64 {
        self.depths.get(recipient).copied().unwrap_or(0)
    }

    /// Adds a block of `recipient` (items in sequence order), with those already acknowledged.
    /// A block with nothing left is not kept.
    pub fn add_block(&mut self, recipient: &AgencyId, items: Vec<ItemMeta>, acked: Vec<bool>) {
        let Some(first) = items.first().map(|i| i.seq) else {
            return;
        };
        let acked: Vec<bool> = (0..items.len())
            .map(|k| acked.get(k).copied().unwrap_or(false))
            .collect();
        let remaining = acked.iter().filter(|a| !**a).count();
        if remaining == 0 {
            return;
        }
        *self.depths.entry(recipient.clone()).or_default() += remaining as u64;
        self.queues.entry(recipient.clone()).or_default().insert(
            first,
            Block {
                items,
                acked,
                remaining,
            },
        );
    }

    /// Where `recipient`'s item `seq` is, if it is queued and unacknowledged.
    pub fn locate(&self, recipient: &AgencyId, seq: u64) -> Option<Location> {
        let (first, block) = self.queues.get(recipient)?.range(..=seq).next_back()?;
        let position = block.items.binary_search_by_key(&seq, |i| i.seq).ok()?;
        if block.acked.get(position).copied().unwrap_or(true) {
            return None;
        }
        Some(Location {
            block: *first,
            position,
            item: block.items.get(position)?.clone(),
        })
    }

    /// What acknowledging `positions` of `recipient`'s `block` would leave, or `None` if
    /// there is no such block.
    pub fn after_ack(
        &self,
        recipient: &AgencyId,
        block: u64,
        positions: &[usize],
    ) -> Option<AckOutcome> {
        let b = self.queues.get(recipient)?.get(&block)?;
        let had_bitmap = b.acked.iter().any(|a| *a);
        let mut acked = b.acked.clone();
        for p in positions {
            if let Some(a) = acked.get_mut(*p) {
                *a = true;
            }
        }
        Some(if acked.iter().all(|a| *a) {
            AckOutcome::Complete { had_bitmap }
        } else {
            AckOutcome::Partial(acked)
        })
    }

    /// Marks `positions` of `recipient`'s `block` acknowledged; drops the block once it has
    /// nothing left. Returns how many were newly acknowledged.
    pub fn ack(&mut self, recipient: &AgencyId, block: u64, positions: &[usize]) -> usize {
        let Some(blocks) = self.queues.get_mut(recipient) else {
            return 0;
        };
        let Some(b) = blocks.get_mut(&block) else {
            return 0;
        };
        let mut newly = 0;
        for p in positions {
            if let Some(a) = b.acked.get_mut(*p)
                && !*a
            {
                *a = true;
                newly += 1;
            }
        }
        b.remaining = b.remaining.saturating_sub(newly);
        if b.remaining == 0 {
            blocks.remove(&block);
        }
        if let Some(d) = self.depths.get_mut(recipient) {
            *d = d.saturating_sub(newly as u64);
        }
        newly
    }

    /// Up to `limit` of `recipient`'s oldest unacknowledged items with sequence numbers up to
    /// `durable` for which `skip` is false.
    pub fn claimable(
        &self,
        recipient: &AgencyId,
        durable: u64,
        limit: usize,
        skip: &dyn Fn(u64) -> bool,
    ) -> Vec<Location> {
        let mut out = Vec::new();
        let Some(blocks) = self.queues.get(recipient) else {
            return out;
        };
        for (first, block) in blocks.range(..=durable) {
            for (position, item) in block.items.iter().enumerate() {
                if out.len() >= limit || item.seq > durable {
                    return out;
                }
                if block.acked.get(position).copied().unwrap_or(true) || skip(item.seq) {
                    continue;
                }
                out.push(Location {
                    block: *first,
                    position,
                    item: item.clone(),
                });
            }
        }
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn agency(s: &str) -> AgencyId {
        s.parse().unwrap()
    }

    fn meta(seq: u64) -> ItemMeta {
        ItemMeta {
            seq,
            transfer_id: uuid::Uuid::from_u128(u128::from(seq)),
            kind: ItemKind::Inline,
        }
    }

    fn item(seq: u64, payload: usize) -> StoredItem {
        StoredItem {
            seq,
            transfer_id: uuid::Uuid::from_u128(u128::from(seq)).as_bytes().to_vec(),
            kind: ItemKind::Inline.to_wire(),
            transfer: Some(pb::Transfer {
                payload: vec![1; payload],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn block_keys_round_trip_and_sort_by_sequence() {
        let ico = agency("ico");
        let k = block_key(&ico, 258);
        assert_eq!(parse_block_key(&k), Some((ico.clone(), 258)));
        assert!(block_key(&ico, 9) < block_key(&ico, 258));
        assert_eq!(parse_block_key(b"short"), None);
        let mut bad = k.clone();
        bad[3] = 1;
        assert_eq!(parse_block_key(&bad), None);
    }

    #[test]
    fn acked_bitmaps_round_trip() {
        let acked = vec![
            true, false, false, true, true, false, false, false, true, false,
        ];
        let bytes = encode_acked(&acked);
        assert_eq!(bytes.len(), 2);
        assert_eq!(decode_acked(&bytes, acked.len()), acked);
        // Missing bytes read as unacknowledged.
        assert_eq!(decode_acked(&[], 3), vec![false; 3]);
    }

    #[test]
    fn blocks_close_at_the_item_and_byte_limits() {
        let (ico, nca) = (agency("ico"), agency("nca"));
        assert!(BlockBuilder::default().finish().is_empty());
        let mut b = BlockBuilder::default();
        for seq in 0..(MAX_BLOCK_ITEMS as u64 + 3) {
            b.push(&ico, item(seq, 10));
        }
        b.push(&nca, item(1000, MAX_BLOCK_BYTES - 1));
        b.push(&nca, item(1001, 2));
        b.push(&nca, item(1002, 0));
        let blocks = b.finish();
        let shape: Vec<(String, Vec<u64>)> = blocks
            .iter()
            .map(|(r, items)| (r.to_string(), items.iter().map(|i| i.seq).collect()))
            .collect();
        assert_eq!(shape.len(), 4);
        assert_eq!(shape[0].1.len(), MAX_BLOCK_ITEMS);
        assert!(shape.contains(&("nca".into(), vec![1000])));
        assert!(shape.contains(&("nca".into(), vec![1001, 1002])));
        assert!(shape.contains(&("ico".into(), vec![64, 65, 66])));
    }

    #[test]
    fn the_index_tracks_acknowledgements_and_depths() {
        let ico = agency("ico");
        let mut q = QueueIndex::default();
        q.add_block(&ico, vec![meta(1), meta(3), meta(5)], vec![]);
        q.add_block(&ico, vec![meta(7), meta(8)], vec![false, true]);
        // A block with nothing left is not kept.
        q.add_block(&ico, vec![meta(9)], vec![true]);
        assert_eq!(q.depth(&ico), 4);
        assert_eq!(q.locate(&ico, 3).unwrap().position, 1);
        assert_eq!(q.locate(&ico, 8), None, "already acknowledged");
        assert_eq!(q.locate(&ico, 4), None, "not queued");
        assert_eq!(q.locate(&ico, 9), None);

        let seqs = |v: Vec<Location>| v.into_iter().map(|l| l.item.seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(q.claimable(&ico, 100, 10, &|_| false)),
            vec![1, 3, 5, 7]
        );
        assert_eq!(seqs(q.claimable(&ico, 4, 10, &|_| false)), vec![1, 3]);
        assert_eq!(seqs(q.claimable(&ico, 100, 2, &|s| s == 1)), vec![3, 5]);

        assert_eq!(
            q.after_ack(&ico, 1, &[0, 2]),
            Some(AckOutcome::Partial(vec![true, false, true]))
        );
        assert_eq!(
            q.after_ack(&ico, 1, &[0, 1, 2]),
            Some(AckOutcome::Complete { had_bitmap: false })
        );
        assert_eq!(
            q.after_ack(&ico, 7, &[0]),
            Some(AckOutcome::Complete { had_bitmap: true })
        );
        assert_eq!(q.after_ack(&ico, 2, &[0]), None);
        assert_eq!(q.ack(&ico, 1, &[0, 2]), 2);
        assert_eq!(q.ack(&ico, 1, &[0]), 0, "acknowledging twice counts once");
        assert_eq!(q.depth(&ico), 2);
        assert_eq!(q.ack(&ico, 1, &[1]), 1);
        assert_eq!(q.locate(&ico, 3), None);
        assert_eq!(q.ack(&ico, 7, &[0]), 1);
        assert_eq!(q.depth(&ico), 0);
        assert!(q.claimable(&ico, 100, 10, &|_| false).is_empty());
    }

    #[test]
    fn a_block_header_reads_the_index_entries_without_the_transfers() {
        let block = StoredBlock {
            items: vec![item(5, 100), item(6, 0)],
        };
        let header = BlockHeader::decode(block.encode_to_vec().as_slice()).unwrap();
        assert_eq!(header.metas(), Some(vec![meta(5), meta(6)]));
    }

    #[test]
    fn stored_items_give_their_meta() {
        let i = item(42, 3);
        assert_eq!(i.meta(), Some(meta(42)));
        let mut bad = i.clone();
        bad.kind = 9;
        assert_eq!(bad.meta(), None);
        bad = i;
        bad.transfer_id.pop();
        assert_eq!(bad.meta(), None);
    }
}
