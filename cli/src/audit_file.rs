//! Audit log exports: writing them from `Audit.Export`, verifying them offline, and reading one
//! entry back in words.
//!
//! An export is JSON Lines (or CSV with the same columns). The first record is the signed
//! checkpoint the export is relative to; every other record is one entry: its index, its exact
//! bytes (base64), for a partial export its inclusion proof, and its decoded fields.
//! `docs/audit-log.md` specifies the format and the verification.

use std::{
    fs::File,
    io::{self, BufRead, BufReader, BufWriter, IsTerminal, Write},
    path::Path,
};

use anyhow::{Context as _, bail};
use base64::{Engine as _, engine::general_purpose::STANDARD as B64};
use concordat_proto::{
    audit,
    checkpoint::{self, Checkpoint, LogVerifier},
    merkle::{self, Hash},
    pb,
};
use serde::{Deserialize, Serialize};
use tokio_stream::StreamExt;

use concordat_agent::client::Broker;

/// An export's file format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// JSON Lines.
    Jsonl,
    /// Comma-separated values with a header row.
    Csv,
}

/// The first record of an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Head {
    /// The signed checkpoint, as a signed note.
    checkpoint: String,
    /// True when the export is not the whole log (then every entry carries a proof).
    partial: bool,
}

/// One entry of an export.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    index: u64,
    /// The entry's exact bytes, base64.
    entry: String,
    /// The inclusion proof, base64 hashes (partial exports).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    proof: Vec<String>,
    /// The decoded fields (informative; must match the entry).
    decoded: serde_json::Value,
}

/// The longest line (or CSV record) of an export that is read: a longer one is refused, naming
/// it, once this much of it has been read. The longest a real export holds is about 1.4 MB: an
/// entry of at most [`audit::MAX_ENTRY_BYTES`] (64 KiB) in base64, a proof of at most 64 hashes,
/// and the entry's decoded fields, which expand the worst entries about twentyfold (an entry
/// packed with empty consent references: 2 bytes each, about 40 decoded; strings of control
/// characters expand sixfold). `the_longest_legitimate_lines_fit` builds those lines and checks
/// that they stay under a quarter of the limit; a line of the limit costs a few hundred MB to
/// parse, where a hostile 100 MB line cost 3.2 GB.
pub const MAX_LINE_BYTES: u64 = 8 * 1024 * 1024;

const CSV_HEADER: [&str; 4] = ["index", "entry", "proof", "decoded"];

/// What an export wrote.
#[derive(Debug)]
pub struct ExportSummary {
    /// Entries written.
    pub entries: u64,
    /// The checkpoint's tree size.
    pub tree_size: u64,
    /// Whether it is partial (filtered).
    pub partial: bool,
}

enum Writer {
    Jsonl(BufWriter<File>),
    Csv(Box<csv::Writer<BufWriter<File>>>),
}

impl Writer {
    fn head(&mut self, head: &Head) -> anyhow::Result<()> {
        match self {
            Writer::Jsonl(w) => {
                serde_json::to_writer(&mut *w, head)?;
                w.write_all(b"\n")?;
            }
            Writer::Csv(w) => {
                w.write_record(CSV_HEADER)?;
                let kind = if head.partial { "partial" } else { "full" };
                w.write_record(["checkpoint", &B64.encode(&head.checkpoint), "", kind])?;
            }
        }
        Ok(())
    }

    fn line(&mut self, line: &Line) -> anyhow::Result<()> {
        match self {
            Writer::Jsonl(w) => {
                serde_json::to_writer(&mut *w, line)?;
                w.write_all(b"\n")?;
            }
            Writer::Csv(w) => {
                w.write_record([
                    line.index.to_string(),
                    line.entry.clone(),
                    line.proof.join(" "),
                    line.decoded.to_string(),
                ])?;
            }
        }
        Ok(())
    }

    fn finish(self) -> anyhow::Result<()> {
        let file = match self {
            Writer::Jsonl(w) => w.into_inner().map_err(|e| e.into_error())?,
            Writer::Csv(w) => w
                .into_inner()
                .map_err(|e| anyhow::anyhow!("{e}"))?
                .into_inner()
                .map_err(|e| e.into_error())?,
        };
        file.sync_all()?;
        Ok(())
    }
}

/// Streams `Audit.Export` for `request` into `out`. Shows a progress bar when standard error
/// is a terminal.
pub async fn export(
    broker: &Broker,
    request: pb::ExportRequest,
    out: &Path,
    format: Format,
) -> anyhow::Result<ExportSummary> {
    // The deadline bounds the export's start; the stream may take as long as the log is big.
    let mut stream = broker
        .deadline(broker.audit().export(request))
        .await
        .map_err(crate::operator::describe_status)?
        .into_inner();
    let Some(first) = stream.next().await else {
        bail!("the broker sent an empty export");
    };
    let note = match first.map_err(crate::operator::describe_status)?.item {
        Some(pb::export_item::Item::Checkpoint(note)) => note,
        _ => bail!("the export does not start with a checkpoint"),
    };
    // The note's text is the checkpoint body up to the blank line before the signatures.
    let text = note.split("\n\n").next().unwrap_or_default();
    let body = Checkpoint::parse(&format!("{text}\n"))
        .map_err(|e| anyhow::anyhow!("the export's checkpoint does not parse: {e}"))?;
    let file = File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut writer = match format {
        Format::Jsonl => Writer::Jsonl(BufWriter::new(file)),
        Format::Csv => Writer::Csv(Box::new(csv::Writer::from_writer(BufWriter::new(file)))),
    };
    let progress = io::stderr().is_terminal().then(|| {
        let bar = indicatif::ProgressBar::new(body.size());
        if let Ok(style) = indicatif::ProgressStyle::with_template(
            "{bar:40} {pos}/{len} entries ({per_sec}, {eta})",
        ) {
            bar.set_style(style);
        }
        bar
    });
    let mut entries = 0u64;
    let mut partial = None;
    let mut pending_head = Some(note);
    while let Some(item) = stream.next().await {
        let record = match item.map_err(crate::operator::describe_status)?.item {
            Some(pb::export_item::Item::Record(r)) => r,
            _ => bail!("unexpected item in the export stream"),
        };
        if let Some(checkpoint) = pending_head.take() {
            partial = Some(!record.inclusion_proof.is_empty() || record.index != 0);
            writer.head(&Head {
                checkpoint,
                partial: partial.unwrap_or(false),
            })?;
        }
        let entry = audit::decode(&record.entry)
            .map_err(|e| anyhow::anyhow!("entry {}: {e}", record.index))?;
        writer.line(&Line {
            index: record.index,
            entry: B64.encode(&record.entry),
            proof: record
                .inclusion_proof
                .iter()
                .map(|h| B64.encode(h))
                .collect(),
            decoded: audit::to_json(&entry),
        })?;
        entries += 1;
        if let Some(bar) = &progress {
            bar.set_position(record.index + 1);
        }
    }
    if let Some(checkpoint) = pending_head.take() {
        // Nothing matched: an empty partial export still records what it was checked against.
        partial = Some(true);
        writer.head(&Head {
            checkpoint,
            partial: true,
        })?;
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    writer.finish()?;
    Ok(ExportSummary {
        entries,
        tree_size: body.size(),
        partial: partial.unwrap_or(true),
    })
}

/// A successful verification.
#[derive(Debug)]
pub struct Verified {
    /// Entries checked.
    pub entries: u64,
    /// The verified checkpoint.
    pub checkpoint: Checkpoint,
    /// Whether the export was partial (each entry proved) or full (root recomputed).
    pub partial: bool,
}

/// A verification failure, naming the first bad line (1-based; 0 for the file as a whole).
#[derive(Debug, thiserror::Error)]
#[error("line {line}: {problem}")]
pub struct VerifyError {
    /// The line (or CSV record) number.
    pub line: u64,
    /// What is wrong.
    pub problem: String,
}

fn bad(line: u64, problem: impl Into<String>) -> VerifyError {
    VerifyError {
        line,
        problem: problem.into(),
    }
}

/// Builds the RFC 6962 root of a sequence of leaves with O(log n) memory.
#[derive(Default)]
pub struct RootBuilder {
    /// Complete subtrees, left to right: (hash, number of leaves).
    stack: Vec<(Hash, u64)>,
    size: u64,
}

impl RootBuilder {
    /// Adds the next leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut node = (leaf, 1u64);
        while let Some(top) = self.stack.last() {
            if top.1 != node.1 {
                break;
            }
            let left = top.0;
            self.stack.pop();
            node = (merkle::node_hash(&left, &node.0), node.1 * 2);
        }
        self.stack.push(node);
        self.size += 1;
    }

    /// The number of leaves added.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The tree hash of the leaves added so far.
    pub fn root(&self) -> Hash {
        let mut iter = self.stack.iter().rev();
        let Some(last) = iter.next() else {
            return merkle::EMPTY_TREE_HASH;
        };
        iter.fold(last.0, |acc, (h, _)| merkle::node_hash(h, &acc))
    }
}

/// One record of an export file: its line number and its fields (or why it cannot be read).
pub(crate) type Record = (u64, Result<Vec<String>, String>);

/// Reads an export's records.
fn records(path: &Path) -> anyhow::Result<Box<dyn Iterator<Item = Record>>> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let csv = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"));
    Ok(records_from(file, csv))
}

/// Reads the records of an export from `file`: CSV records (after the header row) if `csv`,
/// else JSON Lines.
pub(crate) fn records_from(
    file: impl io::Read + 'static,
    csv: bool,
) -> Box<dyn Iterator<Item = Record>> {
    let file = BoundedLines {
        inner: file,
        length: 0,
        refused: false,
    };
    // A record that cannot be read ends the file: the reader would only fail again.
    let mut ended = false;
    let until_error = move |record: Record| {
        if ended {
            return None;
        }
        ended = record.1.is_err();
        Some(record)
    };
    let records: Box<dyn Iterator<Item = Record>> = if csv {
        let reader = csv::ReaderBuilder::new()
            .has_headers(true)
            .flexible(false)
            .from_reader(file);
        Box::new(reader.into_records().enumerate().map(|(i, r)| {
            (
                i as u64 + 2,
                r.map(|rec| rec.iter().map(str::to_owned).collect())
                    .map_err(|e| e.to_string()),
            )
        }))
    } else {
        Box::new(
            BufReader::new(file)
                .lines()
                .enumerate()
                .map(|(i, l)| (i as u64 + 1, l.map(|l| vec![l]).map_err(|e| e.to_string()))),
        )
    };
    Box::new(records.map_while(until_error))
}

/// A reader that refuses a line longer than [`MAX_LINE_BYTES`]: a read fails, saying so, as
/// soon as that much of one line has been read, and so does every read after it. Line by line,
/// the export is then read in bounded memory whatever the file holds (a CSV record of an export
/// is one line: its decoded JSON has no raw line feed).
struct BoundedLines<R> {
    inner: R,
    /// The bytes of the line being read, so far.
    length: u64,
    refused: bool,
}

impl<R: io::Read> io::Read for BoundedLines<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let too_long = || {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "longer than {MAX_LINE_BYTES} bytes, which no line of an export is: refused \
                     without reading the rest"
                ),
            )
        };
        if self.refused {
            return Err(too_long());
        }
        let n = self.inner.read(buf)?;
        for &byte in buf.get(..n).unwrap_or_default() {
            if byte == b'\n' {
                self.length = 0;
            } else {
                self.length += 1;
                if self.length > MAX_LINE_BYTES {
                    self.refused = true;
                    return Err(too_long());
                }
            }
        }
        Ok(n)
    }
}

fn parse_head(fields: &[String]) -> Result<Head, String> {
    match fields {
        [json] => serde_json::from_str(json).map_err(|e| format!("not a checkpoint record: {e}")),
        [kind, note, _, partial] if kind == "checkpoint" => Ok(Head {
            checkpoint: String::from_utf8(B64.decode(note).map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?,
            partial: partial == "partial",
        }),
        _ => Err("the first record is not the checkpoint".into()),
    }
}

fn parse_line(fields: &[String]) -> Result<Line, String> {
    match fields {
        [json] => serde_json::from_str(json).map_err(|e| format!("not an entry record: {e}")),
        [index, entry, proof, decoded] => Ok(Line {
            index: index
                .parse()
                .map_err(|_| "index is not a number".to_owned())?,
            entry: entry.clone(),
            proof: proof.split_whitespace().map(str::to_owned).collect(),
            decoded: serde_json::from_str(decoded).map_err(|e| format!("decoded column: {e}"))?,
        }),
        _ => Err("wrong number of columns".into()),
    }
}

/// Verifies an export offline against the log key: the checkpoint's signature, every entry's
/// bytes and decoded fields, every inclusion proof (partial exports), and for a full export the
/// recomputed root and size.
pub fn verify(path: &Path, key: &LogVerifier) -> anyhow::Result<Result<Verified, VerifyError>> {
    verify_records(records(path)?, key)
}

/// [`verify`] on records already read (see [`records_from`]).
pub(crate) fn verify_records(
    mut records: Box<dyn Iterator<Item = Record>>,
    key: &LogVerifier,
) -> anyhow::Result<Result<Verified, VerifyError>> {
    let Some((line, first)) = records.next() else {
        return Ok(Err(bad(0, "the file is empty")));
    };
    let head = match first.and_then(|f| parse_head(&f)) {
        Ok(h) => h,
        Err(e) => return Ok(Err(bad(line, e))),
    };
    let cp = match checkpoint::open(&head.checkpoint, key) {
        Ok(cp) => cp,
        Err(e) => {
            return Ok(Err(bad(
                line,
                format!("the checkpoint does not verify with this log key: {e}"),
            )));
        }
    };
    let mut root = RootBuilder::default();
    let mut entries = 0u64;
    let mut previous: Option<u64> = None;
    for (line, fields) in records {
        let record = match fields.and_then(|f| parse_line(&f)) {
            Ok(r) => r,
            Err(e) => return Ok(Err(bad(line, e))),
        };
        let Ok(bytes) = B64.decode(&record.entry) else {
            return Ok(Err(bad(line, "the entry is not base64")));
        };
        let entry = match audit::decode(&bytes) {
            Ok(e) => e,
            Err(e) => return Ok(Err(bad(line, format!("entry {}: {e}", record.index)))),
        };
        if audit::to_json(&entry) != record.decoded {
            return Ok(Err(bad(
                line,
                format!(
                    "entry {}: the decoded fields do not match the entry bytes",
                    record.index
                ),
            )));
        }
        if record.index >= cp.size() {
            return Ok(Err(bad(
                line,
                format!(
                    "entry {} is beyond the checkpoint's size {}",
                    record.index,
                    cp.size()
                ),
            )));
        }
        let leaf = merkle::leaf_hash(&bytes);
        if head.partial {
            if previous.is_some_and(|p| record.index <= p) {
                return Ok(Err(bad(
                    line,
                    format!("entry {} is out of order", record.index),
                )));
            }
            let proof: Result<Vec<Hash>, _> = record
                .proof
                .iter()
                .map(|h| {
                    B64.decode(h)
                        .ok()
                        .and_then(|b| Hash::from_slice(&b).ok())
                        .ok_or(())
                })
                .collect();
            let Ok(proof) = proof else {
                return Ok(Err(bad(
                    line,
                    format!("entry {}: a proof hash is malformed", record.index),
                )));
            };
            if let Err(e) = merkle::check_record(&proof, cp.size(), cp.root(), record.index, &leaf)
            {
                return Ok(Err(bad(
                    line,
                    format!(
                        "entry {} is not in the checkpoint's tree: {e}",
                        record.index
                    ),
                )));
            }
        } else {
            if record.index != entries {
                return Ok(Err(bad(
                    line,
                    format!(
                        "expected entry {entries} of a full export, found entry {}",
                        record.index
                    ),
                )));
            }
            root.push(leaf);
        }
        previous = Some(record.index);
        entries += 1;
    }
    if !head.partial {
        if root.size() != cp.size() {
            return Ok(Err(bad(
                0,
                format!(
                    "a full export must hold {} entries; this one holds {}",
                    cp.size(),
                    root.size()
                ),
            )));
        }
        if &root.root() != cp.root() {
            return Ok(Err(bad(
                0,
                "the recomputed tree root differs from the checkpoint's",
            )));
        }
    }
    Ok(Ok(Verified {
        entries,
        checkpoint: cp,
        partial: head.partial,
    }))
}

/// Reads entry `index` from an export file (without verifying; run `verify` for that).
pub fn entry_from_file(path: &Path, index: u64) -> anyhow::Result<pb::AuditEntry> {
    for (line, fields) in records(path)?.skip(1) {
        let record = fields
            .and_then(|f| parse_line(&f))
            .map_err(|e| anyhow::anyhow!("line {line}: {e}"))?;
        if record.index == index {
            let bytes = B64
                .decode(&record.entry)
                .with_context(|| format!("line {line}: entry is not base64"))?;
            return audit::decode(&bytes).with_context(|| format!("line {line}"));
        }
    }
    bail!("entry {index} is not in {}", path.display())
}

/// Every entry of the export at `path` that `keep` keeps, with its index, in file (log) order.
pub fn entries_from_file(
    path: &Path,
    keep: impl Fn(&pb::AuditEntry) -> bool,
) -> anyhow::Result<Vec<(u64, pb::AuditEntry)>> {
    let mut kept = Vec::new();
    for (line, fields) in records(path)?.skip(1) {
        let record = fields
            .and_then(|f| parse_line(&f))
            .map_err(|e| anyhow::anyhow!("line {line}: {e}"))?;
        let bytes = B64
            .decode(&record.entry)
            .with_context(|| format!("line {line}: entry is not base64"))?;
        let entry = audit::decode(&bytes).with_context(|| format!("line {line}"))?;
        if keep(&entry) {
            kept.push((record.index, entry));
        }
    }
    Ok(kept)
}

/// Every entry the caller may export (an auditor: all; an agency: its own) that `keep` keeps,
/// with its index, in log order. With `key`, the export is verified first (checkpoint,
/// entries, proofs) and a failure is an error. The export goes through a temporary file, so
/// a long log is never held in memory.
pub async fn entries_from_broker(
    broker: &Broker,
    key: Option<&LogVerifier>,
    keep: impl Fn(&pb::AuditEntry) -> bool,
) -> anyhow::Result<Vec<(u64, pb::AuditEntry)>> {
    let dir = tempfile::tempdir().context("creating a temporary directory for the export")?;
    let path = dir.path().join("export.jsonl");
    export(broker, pb::ExportRequest::default(), &path, Format::Jsonl).await?;
    if let Some(key) = key
        && let Err(e) = verify(&path, key)?
    {
        bail!("the broker's export does not verify: {e}");
    }
    entries_from_file(&path, keep)
}

/// Fetches entry `index` from the broker (auditor certificate), verified against its checkpoint
/// when `key` is given.
pub async fn entry_from_broker(
    broker: &Broker,
    index: u64,
    key: Option<&LogVerifier>,
) -> anyhow::Result<pb::AuditEntry> {
    let mut stream = broker
        .deadline(broker.audit().export(pb::ExportRequest {
            index_from: index,
            index_to: index + 1,
            ..Default::default()
        }))
        .await
        .map_err(crate::operator::describe_status)?
        .into_inner();
    let mut note = None;
    while let Some(item) = stream.next().await {
        match item.map_err(crate::operator::describe_status)?.item {
            Some(pb::export_item::Item::Checkpoint(n)) => note = Some(n),
            Some(pb::export_item::Item::Record(r)) if r.index == index => {
                if let (Some(key), Some(note)) = (key, &note) {
                    let cp = checkpoint::open(note, key)
                        .map_err(|e| anyhow::anyhow!("checkpoint: {e}"))?;
                    let proof = r
                        .inclusion_proof
                        .iter()
                        .map(|h| Hash::from_slice(h))
                        .collect::<Result<Vec<_>, _>>()
                        .map_err(|e| anyhow::anyhow!("proof: {e}"))?;
                    merkle::check_record(
                        &proof,
                        cp.size(),
                        cp.root(),
                        index,
                        &merkle::leaf_hash(&r.entry),
                    )
                    .map_err(|e| anyhow::anyhow!("entry {index} does not verify: {e}"))?;
                }
                return Ok(audit::decode(&r.entry)?);
            }
            _ => {}
        }
    }
    bail!("the log has no entry {index}")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn root_builder_matches_the_stored_tree() {
        let mut stored: Vec<Hash> = Vec::new();
        let mut builder = RootBuilder::default();
        for n in 0..70u64 {
            let entry = n.to_be_bytes();
            let new = merkle::stored_hashes(n, &entry, &stored).unwrap();
            stored.extend(new);
            builder.push(merkle::leaf_hash(&entry));
            assert_eq!(
                builder.root(),
                merkle::tree_hash(n + 1, &stored).unwrap(),
                "size {}",
                n + 1
            );
        }
        assert_eq!(RootBuilder::default().root(), merkle::EMPTY_TREE_HASH);
    }

    /// Counts the bytes read through it.
    struct Counted<R> {
        inner: R,
        read: std::rc::Rc<std::cell::Cell<u64>>,
    }

    impl<R: io::Read> io::Read for Counted<R> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read.set(self.read.get() + n as u64);
            Ok(n)
        }
    }

    /// A line far longer than any an export holds is refused, naming the line, once
    /// [`MAX_LINE_BYTES`] of it have been read: not read whole into memory first.
    #[test]
    fn an_overlong_line_is_refused_without_reading_it_whole() {
        let long = 8 * MAX_LINE_BYTES;
        for csv in [false, true] {
            let first: &[u8] = if csv {
                b"index,entry,proof,decoded\ncheckpoint,Y3A=,,full\n"
            } else {
                b"{\"checkpoint\":\"cp\",\"partial\":false}\n"
            };
            let read = std::rc::Rc::new(std::cell::Cell::new(0));
            let data = Counted {
                inner: io::Read::chain(first, io::Read::take(io::repeat(b'a'), long)),
                read: read.clone(),
            };
            let records: Vec<Record> = records_from(data, csv).take(3).collect();
            let second = records
                .get(1)
                .unwrap_or_else(|| panic!("csv {csv}: {records:?}"));
            let line = if csv { 3 } else { 2 };
            assert_eq!(second.0, line, "csv {csv}");
            let err = second.1.as_ref().unwrap_err();
            assert!(err.contains("longer than"), "csv {csv}: {err}");
            assert!(
                read.get() < 2 * MAX_LINE_BYTES,
                "csv {csv}: {} bytes read",
                read.get()
            );
        }
    }

    /// The longest lines a real export can hold fit in a quarter of [`MAX_LINE_BYTES`]: entries
    /// of the largest size whose decoded fields expand the most (strings of control
    /// characters, each written as six bytes; many empty consent references, 2 bytes each
    /// and about 40 decoded), with a proof of the greatest depth.
    #[test]
    fn the_longest_legitimate_lines_fit() {
        let refused = |message: String, consents: usize| pb::AuditEntry {
            time: Some(prost_types::Timestamp {
                seconds: 1,
                nanos: 0,
            }),
            event: Some(pb::audit_entry::Event::TransferRefused(
                pb::TransferRefused {
                    envelope: Some(pb::EnvelopeFacts {
                        consents: vec![pb::ConsentRef::default(); consents],
                        ..Default::default()
                    }),
                    message,
                    ..Default::default()
                },
            )),
        };
        let budget = audit::MAX_ENTRY_BYTES - 64;
        for entry in [
            refused("\u{1}".repeat(budget), 0),
            refused(String::new(), budget / 2),
        ] {
            let bytes = prost::Message::encode_to_vec(&entry);
            assert!(bytes.len() <= audit::MAX_ENTRY_BYTES, "{}", bytes.len());
            let line = serde_json::to_string(&Line {
                index: u64::MAX,
                entry: B64.encode(&bytes),
                proof: vec![B64.encode([0u8; 32]); 64],
                decoded: audit::to_json(&entry),
            })
            .unwrap();
            assert!(
                line.len() < MAX_LINE_BYTES as usize / 4,
                "a legitimate line of {} bytes",
                line.len()
            );
            let text = format!("{{\"checkpoint\":\"cp\",\"partial\":false}}\n{line}\n");
            let records: Vec<Record> = records_from(io::Cursor::new(text), false).collect();
            assert_eq!(records.len(), 2);
            assert_eq!(records[1].1.as_ref().unwrap()[0], line);
        }
    }
}
