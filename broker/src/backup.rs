//! Backups: a consistent snapshot of the broker's store in one file, and restoring it into a
//! new data directory (format and procedure: `docs/backup.md`).
//!
//! A backup file is written by [`Writer`] while the store's writer thread pauses between two
//! batches ([`snapshot_running`], [`Store::between_batches`]), so it holds complete batches
//! only: every receipt with its audit entry, every entry under the checkpoint in its header.
//! The audit log's trees are append-only, so they are copied after the writer has resumed, up
//! to the keys they held during the pause; the pause lasts as long as copying the rest. It carries the
//! log's signing key, so a backup is as secret as the data directory itself.
//!
//! [`check`] and [`restore`] read a file as hostile: the magic, the version and a SHA-256 over
//! everything are checked before anything is imported, and every length is bounded by the
//! limits here and by what is left of the file before it is allocated. Nothing panics.
//! [`restore`] imports into a fresh directory beside the target, opens the result with the
//! broker's full start-up check and the offline verification, and only then moves it into place.

use std::{
    fs,
    io::{self, BufReader, BufWriter, Read, Write},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::{
    audit_log,
    refusal::{Failure, Internal},
    store::{
        self, SledStorage, Storage, Store, StoreReport,
        kv::{Kv, Tree},
    },
};

/// The first bytes of every backup file.
pub const MAGIC: &[u8; 16] = b"CONCORDAT-BACKUP";
/// The format this broker writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// The largest header (JSON).
const MAX_HEADER: usize = 64 * 1024;
/// The longest tree or file name.
const MAX_NAME: usize = 1024;
/// The largest data-directory file carried (the log key is about a hundred bytes).
const MAX_FILE: usize = 1024 * 1024;
/// The largest key.
const MAX_KEY: usize = 1024 * 1024;
/// The largest value (queue blocks carry payloads: generous, and bounded by the file too).
const MAX_VALUE: usize = 1024 * 1024 * 1024;
/// The most trees a backup may name (the broker has about fifteen).
const MAX_TREES: u64 = 1024;

/// The data-directory files a backup carries besides the database, and the only names
/// [`restore`] writes.
pub const FILES: [&str; 1] = [audit_log::LOG_KEY_FILE];

/// Record tags.
const TAG_FILE: u8 = b'F';
const TAG_TREE: u8 = b'T';
const TAG_PAIR: u8 = b'K';
const TAG_END: u8 = b'E';

/// What a backup says about itself, before the data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    /// The format version (also in the binary prefix).
    pub format: u32,
    /// The broker version that wrote it.
    pub broker_version: String,
    /// When the snapshot was taken (RFC 3339).
    pub created_at: String,
    /// The audit log's origin (the checkpoints' first line, the log key's name).
    pub log_origin: String,
    /// The number of audit entries in the snapshot.
    pub log_size: u64,
    /// The signed checkpoint of exactly those entries (a C2SP signed note).
    pub checkpoint: String,
}

impl Header {
    /// The header of a snapshot taken now of a log of `log_size` entries sealed by `checkpoint`.
    pub fn now(log_origin: &str, log_size: u64, checkpoint: &str) -> Header {
        let now = time::OffsetDateTime::now_utc();
        Header {
            format: FORMAT_VERSION,
            broker_version: env!("CARGO_PKG_VERSION").into(),
            created_at: now
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap_or_else(|_| now.unix_timestamp().to_string()),
            log_origin: log_origin.into(),
            log_size,
            checkpoint: checkpoint.into(),
        }
    }
}

/// How much a backup holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Trees of the store.
    pub trees: u64,
    /// Key/value pairs over all trees.
    pub pairs: u64,
    /// Data-directory files.
    pub files: u64,
}

/// Why a backup could not be written, read or restored.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackupError {
    /// Reading or writing a file failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done, naming the file.
        what: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The file does not start with the backup magic.
    #[error("{0} is not a Concordat backup (it does not start with {MAGIC:?})", MAGIC = String::from_utf8_lossy(MAGIC))]
    NotABackup(String),
    /// The file is in a format version this broker does not read.
    #[error(
        "{file} is a backup in format version {found}; this broker reads version {FORMAT_VERSION}"
    )]
    Version {
        /// The file.
        file: String,
        /// Its version.
        found: u32,
    },
    /// The trailing SHA-256 does not match the contents: the file was damaged or cut short.
    #[error(
        "{0} is damaged: its SHA-256 does not match its contents (changed or truncated); nothing was restored"
    )]
    Checksum(String),
    /// The contents do not follow the format.
    #[error("{file} is malformed: {problem}")]
    Malformed {
        /// The file.
        file: String,
        /// What is wrong, and where.
        problem: String,
    },
    /// The target data directory already holds something.
    #[error(
        "refusing to restore into {0}: it is not empty (restore only into a new or empty directory)"
    )]
    NotEmpty(String),
    /// The restored store did not pass the broker's start-up check or its verification.
    #[error(
        "the restored store in {dir} does not verify, so it was not moved into place: {problem}"
    )]
    Unverified {
        /// The directory it was restored into (left for investigation).
        dir: String,
        /// What failed.
        problem: String,
    },
    /// The store could not be read or written.
    #[error(transparent)]
    Store(#[from] Internal),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BackupError {
    let what = what.into();
    move |source| BackupError::Io { what, source }
}

/// A writer that hashes what passes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a backup: the prefix and header at once, then files, trees and pairs, then
/// [`Writer::finish`] adds the end record and the SHA-256.
pub struct Writer<W: Write> {
    out: Hashing<W>,
    counts: Counts,
}

impl<W: Write> Writer<W> {
    /// Starts a backup with `header` on `out`.
    pub fn new(out: W, header: &Header) -> io::Result<Writer<W>> {
        let mut out = Hashing {
            inner: out,
            hash: Sha256::new(),
        };
        let json = serde_json::to_vec(header).map_err(io::Error::other)?;
        if json.len() > MAX_HEADER {
            return Err(io::Error::other("the backup header is too large"));
        }
        out.write_all(MAGIC)?;
        out.write_all(&FORMAT_VERSION.to_be_bytes())?;
        out.write_all(&(json.len() as u32).to_be_bytes())?;
        out.write_all(&json)?;
        Ok(Writer {
            out,
            counts: Counts::default(),
        })
    }

    fn name(&mut self, tag: u8, name: &str) -> io::Result<()> {
        if name.len() > MAX_NAME {
            return Err(io::Error::other(format!("name too long: {name:?}")));
        }
        self.out.write_all(&[tag])?;
        self.out.write_all(&(name.len() as u16).to_be_bytes())?;
        self.out.write_all(name.as_bytes())
    }

    fn bytes(&mut self, bytes: &[u8], max: usize) -> io::Result<()> {
        if bytes.len() > max {
            return Err(io::Error::other(format!(
                "a record of {} bytes is above the format's limit of {max}",
                bytes.len()
            )));
        }
        self.out.write_all(&(bytes.len() as u32).to_be_bytes())?;
        self.out.write_all(bytes)
    }

    /// A data-directory file.
    pub fn file(&mut self, name: &str, bytes: &[u8]) -> io::Result<()> {
        self.name(TAG_FILE, name)?;
        self.bytes(bytes, MAX_FILE)?;
        self.counts.files += 1;
        Ok(())
    }

    /// Starts a tree: the pairs that follow belong to it.
    pub fn tree(&mut self, name: &str) -> io::Result<()> {
        self.name(TAG_TREE, name)?;
        self.counts.trees += 1;
        Ok(())
    }

    /// A key and its value in the current tree.
    pub fn pair(&mut self, key: &[u8], value: &[u8]) -> io::Result<()> {
        self.out.write_all(&[TAG_PAIR])?;
        self.bytes(key, MAX_KEY)?;
        self.bytes(value, MAX_VALUE)?;
        self.counts.pairs += 1;
        Ok(())
    }

    /// Ends the backup: the end record with the counts, then the SHA-256 of everything before.
    pub fn finish(mut self) -> io::Result<(W, Counts)> {
        let c = self.counts;
        self.out.write_all(&[TAG_END])?;
        for n in [c.trees, c.pairs, c.files] {
            self.out.write_all(&n.to_be_bytes())?;
        }
        let digest = self.out.hash.finalize_reset();
        self.out.inner.write_all(&digest)?;
        self.out.inner.flush()?;
        Ok((self.out.inner, c))
    }
}

/// One record of a backup, as [`read`] hands it over.
#[derive(Debug, PartialEq, Eq)]
pub enum Record<'a> {
    /// A data-directory file.
    File {
        /// Its name.
        name: &'a str,
        /// Its contents.
        bytes: &'a [u8],
    },
    /// The start of a tree.
    Tree(&'a str),
    /// A key and its value in the current tree.
    Pair {
        /// The key.
        key: &'a [u8],
        /// The value.
        value: &'a [u8],
    },
}

/// Reads a backup's records with a bound on everything, knowing how many bytes remain before
/// the trailing SHA-256.
struct Bounded<'f, R> {
    inner: R,
    remaining: u64,
    file: &'f str,
}

impl<R: Read> Bounded<'_, R> {
    fn malformed(&self, problem: impl Into<String>) -> BackupError {
        BackupError::Malformed {
            file: self.file.into(),
            problem: problem.into(),
        }
    }

    fn exact(&mut self, buf: &mut [u8]) -> Result<(), BackupError> {
        if (buf.len() as u64) > self.remaining {
            return Err(self.malformed("it ends in the middle of a record"));
        }
        self.inner
            .read_exact(buf)
            .map_err(io_err(format!("reading {}", self.file)))?;
        self.remaining -= buf.len() as u64;
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, BackupError> {
        let mut b = [0; 1];
        self.exact(&mut b)?;
        Ok(b[0])
    }

    fn u16(&mut self) -> Result<usize, BackupError> {
        let mut b = [0; 2];
        self.exact(&mut b)?;
        Ok(usize::from(u16::from_be_bytes(b)))
    }

    fn u32(&mut self) -> Result<u32, BackupError> {
        let mut b = [0; 4];
        self.exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    fn u64(&mut self) -> Result<u64, BackupError> {
        let mut b = [0; 8];
        self.exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    /// Reads `len` bytes into `buf`, refusing more than `max` (naming `what`) or more than the
    /// file holds, before allocating.
    fn bytes_into(
        &mut self,
        buf: &mut Vec<u8>,
        len: usize,
        max: usize,
        what: &str,
    ) -> Result<(), BackupError> {
        if len > max {
            return Err(
                self.malformed(format!("{what} of {len} bytes is above the limit of {max}"))
            );
        }
        if len as u64 > self.remaining {
            return Err(self.malformed(format!(
                "{what} of {len} bytes is longer than the rest of the file"
            )));
        }
        buf.clear();
        buf.resize(len, 0);
        self.exact(buf)
    }

    fn name_into(&mut self, buf: &mut Vec<u8>, what: &str) -> Result<(), BackupError> {
        let len = self.u16()?;
        self.bytes_into(buf, len, MAX_NAME, what)?;
        if std::str::from_utf8(buf).is_err() {
            return Err(self.malformed(format!("{what} is not UTF-8")));
        }
        Ok(())
    }
}

/// Opens `path` and checks its prefix, version and SHA-256; returns the file (positioned after
/// the version), its length, and the name to report.
fn open_checked(path: &Path) -> Result<(fs::File, u64), BackupError> {
    let shown = path.display().to_string();
    let mut f = fs::File::open(path).map_err(io_err(format!("opening {shown}")))?;
    let len = f
        .metadata()
        .map_err(io_err(format!("reading {shown}")))?
        .len();
    let mut prefix = [0u8; 20];
    if len < 20 + 32 || f.read_exact(&mut prefix).is_err() || &prefix[..16] != MAGIC {
        return Err(BackupError::NotABackup(shown));
    }
    let mut version = [0u8; 4];
    version.copy_from_slice(&prefix[16..20]);
    let version = u32::from_be_bytes(version);
    if version != FORMAT_VERSION {
        return Err(BackupError::Version {
            file: shown,
            found: version,
        });
    }
    // The checksum first, over everything but itself: nothing is imported from a damaged file.
    let mut hash = Sha256::new();
    hash.update(prefix);
    let mut body = (&mut f).take(len - 20 - 32);
    io::copy(&mut body, &mut HashSink(&mut hash)).map_err(io_err(format!("reading {shown}")))?;
    let mut stored = [0u8; 32];
    f.read_exact(&mut stored)
        .map_err(io_err(format!("reading {shown}")))?;
    if hash.finalize().as_slice() != stored {
        return Err(BackupError::Checksum(shown));
    }
    use io::Seek;
    f.seek(io::SeekFrom::Start(20))
        .map_err(io_err(format!("reading {shown}")))?;
    Ok((f, len))
}

struct HashSink<'a>(&'a mut Sha256);

impl Write for HashSink<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads the backup at `path`: checks it whole (prefix, version, SHA-256), parses its header,
/// then hands each record to `visit` in order, and checks the end record's counts. A pair
/// before any tree, a duplicate or unknown file, anything after the end record is refused.
pub fn read(
    path: &Path,
    mut visit: impl FnMut(Record<'_>) -> Result<(), BackupError>,
) -> Result<(Header, Counts), BackupError> {
    let shown = path.display().to_string();
    let (f, len) = open_checked(path)?;
    let mut r = Bounded {
        inner: BufReader::with_capacity(1 << 20, f),
        remaining: len - 20 - 32,
        file: &shown,
    };
    let header_len = r.u32()? as usize;
    let mut buf = Vec::new();
    r.bytes_into(&mut buf, header_len, MAX_HEADER, "the header")?;
    let header: Header = serde_json::from_slice(&buf)
        .map_err(|e| r.malformed(format!("its header is not the expected JSON: {e}")))?;
    if header.format != FORMAT_VERSION {
        return Err(r.malformed(format!(
            "its header says format {} but its prefix says {FORMAT_VERSION}",
            header.format
        )));
    }
    let mut counts = Counts::default();
    let mut in_tree = false;
    let mut files_seen: Vec<String> = Vec::new();
    let (mut key, mut value) = (Vec::new(), Vec::new());
    loop {
        match r.u8()? {
            TAG_FILE => {
                r.name_into(&mut buf, "a file name")?;
                let name = String::from_utf8_lossy(&buf).into_owned();
                if !FILES.contains(&name.as_str()) || files_seen.contains(&name) {
                    return Err(r.malformed(format!(
                        "it carries a file {name:?} that a backup does not (or twice)"
                    )));
                }
                let len = r.u32()? as usize;
                r.bytes_into(&mut value, len, MAX_FILE, "a file")?;
                visit(Record::File {
                    name: &name,
                    bytes: &value,
                })?;
                files_seen.push(name);
                counts.files += 1;
            }
            TAG_TREE => {
                r.name_into(&mut buf, "a tree name")?;
                counts.trees += 1;
                if counts.trees > MAX_TREES {
                    return Err(r.malformed(format!("it names more than {MAX_TREES} trees")));
                }
                in_tree = true;
                visit(Record::Tree(std::str::from_utf8(&buf).unwrap_or_default()))?;
            }
            TAG_PAIR => {
                if !in_tree {
                    return Err(r.malformed("a key/value pair comes before any tree"));
                }
                let n = r.u32()? as usize;
                r.bytes_into(&mut key, n, MAX_KEY, "a key")?;
                let n = r.u32()? as usize;
                r.bytes_into(&mut value, n, MAX_VALUE, "a value")?;
                visit(Record::Pair {
                    key: &key,
                    value: &value,
                })?;
                counts.pairs += 1;
            }
            TAG_END => {
                let said = Counts {
                    trees: r.u64()?,
                    pairs: r.u64()?,
                    files: r.u64()?,
                };
                if said != counts {
                    return Err(r.malformed(format!(
                        "its end record counts {said:?}, but it holds {counts:?}"
                    )));
                }
                if r.remaining != 0 {
                    return Err(r.malformed(format!("{} bytes follow its end record", r.remaining)));
                }
                return Ok((header, counts));
            }
            other => {
                return Err(r.malformed(format!(
                    "unknown record tag {other:#04x} at byte {}",
                    len - 32 - r.remaining - 1
                )));
            }
        }
    }
}

/// Checks the backup at `path` whole without importing it; returns its header and counts.
pub fn check(path: &Path) -> Result<(Header, Counts), BackupError> {
    read(path, |_| Ok(()))
}

/// Where [`Storage::snapshot`] writes.
pub type Output = Box<dyn Write + Send>;
/// What [`Storage::snapshot`] leaves to write once writes may go on.
pub type Rest = Box<dyn FnOnce() -> Result<(Header, Counts), Internal> + Send>;

/// Writes a snapshot of a store that nothing else writes to (no broker running) to `file`.
pub fn write_snapshot(
    storage: &dyn Storage,
    file: &fs::File,
) -> Result<(Header, Counts), Internal> {
    let out = file
        .try_clone()
        .map_err(|e| Internal::new("writing the backup", e))?;
    let rest = storage.snapshot(Box::new(BufWriter::with_capacity(1 << 20, out)))?;
    rest()
}

/// A snapshot of a running store written to `file`: what changes is copied while the writer
/// thread pauses between two batches ([`Store::between_batches`]), the audit log's append-only
/// trees after it has resumed. Returns the header, the counts and how long the writer paused.
pub async fn snapshot_running(
    store: &Store,
    file: &fs::File,
) -> Result<(Header, Counts, Duration), Failure> {
    let out = file
        .try_clone()
        .map_err(|e| Internal::new("writing the backup", e))?;
    let (started, paused) = store
        .between_batches(move |storage| {
            let t = Instant::now();
            let rest = storage.snapshot(Box::new(BufWriter::with_capacity(1 << 20, out)));
            (rest, t.elapsed())
        })
        .await?;
    let rest = started?;
    let (header, counts) = tokio::task::spawn_blocking(rest)
        .await
        .map_err(|e| Internal::new("writing the backup", e))??;
    Ok((header, counts, paused))
}

/// What [`restore`] brought back.
#[derive(Debug)]
pub struct Restored {
    /// The backup's header.
    pub header: Header,
    /// How much it held.
    pub counts: Counts,
    /// The offline verification of the restored store.
    pub report: StoreReport,
}

/// Restores the backup at `from` into `data_dir`, which must not exist or be empty: checks the
/// file whole, imports it into a new directory beside `data_dir`, writes the log key and
/// publishes the snapshot's checkpoint there, makes everything durable, opens it with the
/// broker's start-up check ([`store::check_recovered`]) and the offline verification, and only
/// then renames it to `data_dir`. On any failure `data_dir` is left as it was.
pub fn restore(from: &Path, data_dir: &Path) -> Result<Restored, BackupError> {
    if !is_empty_or_missing(data_dir)? {
        return Err(BackupError::NotEmpty(data_dir.display().to_string()));
    }
    // Checked whole before anything is created.
    let (header, _) = check(from)?;
    let parent = match data_dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = data_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "data".into());
    fs::create_dir_all(&parent).map_err(io_err(format!("creating {}", parent.display())))?;
    let staging = parent.join(format!(".{name}.restoring-{}", std::process::id()));
    if staging.exists() {
        fs::remove_dir_all(&staging).map_err(io_err(format!("removing {}", staging.display())))?;
    }
    {
        use std::os::unix::fs::DirBuilderExt;
        fs::DirBuilder::new()
            .mode(0o700)
            .create(&staging)
            .map_err(io_err(format!("creating {}", staging.display())))?;
    }
    let outcome = import_and_verify(from, &staging, &header);
    let restored = match outcome {
        Ok(r) => r,
        Err(e) => {
            // Unverified: left for investigation; anything else: nothing worth keeping.
            if !matches!(e, BackupError::Unverified { .. }) {
                let _ = fs::remove_dir_all(&staging);
            }
            return Err(e);
        }
    };
    if data_dir.exists() {
        // Empty (checked above): rename(2) replaces an empty directory.
        fs::remove_dir(data_dir).map_err(io_err(format!("replacing {}", data_dir.display())))?;
    }
    fs::rename(&staging, data_dir).map_err(io_err(format!(
        "moving {} to {}",
        staging.display(),
        data_dir.display()
    )))?;
    fs::File::open(&parent)
        .and_then(|d| d.sync_all())
        .map_err(io_err(format!("syncing {}", parent.display())))?;
    Ok(restored)
}

fn is_empty_or_missing(dir: &Path) -> Result<bool, BackupError> {
    match fs::read_dir(dir) {
        Ok(mut entries) => Ok(entries.next().is_none()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(BackupError::Io {
            what: format!("reading {}", dir.display()),
            source: e,
        }),
    }
}

fn import_and_verify(from: &Path, dir: &Path, header: &Header) -> Result<Restored, BackupError> {
    let db = Kv::open_sled(&dir.join(audit_log::DB_DIR))
        .map_err(|e| Internal::new("creating the database", e))?;
    let mut tree: Option<Tree> = None;
    let (_, counts) = read(from, |record| {
        match record {
            Record::File { name, bytes } => {
                write_new_secret(&dir.join(name), bytes)?;
            }
            Record::Tree(name) => {
                tree = Some(
                    db.open_tree(name)
                        .map_err(|e| Internal::new("creating a tree", e))?,
                );
            }
            Record::Pair { key, value } => {
                if let Some(t) = &tree {
                    t.insert(key, value)
                        .map_err(|e| Internal::new("importing a key", e))?;
                }
            }
        }
        Ok(())
    })?;
    drop(tree);
    db.flush()
        .map_err(|e| Internal::new("flushing the database", e))?;
    drop(db);
    let unverified = |problem: String| BackupError::Unverified {
        dir: dir.display().to_string(),
        problem,
    };
    // sled gives its lock back once its background threads have finished with the import.
    if !store::wait_until_closed(dir, crate::CLOSE_WAIT, || true) {
        return Err(unverified(
            "the imported database is still locked after closing it".into(),
        ));
    }
    if !dir.join(audit_log::LOG_KEY_FILE).exists() {
        return Err(unverified("the backup carries no log key".into()));
    }
    // The snapshot's checkpoint is the one published beside the restored database.
    let verifier = audit_log::load_key(dir, &header.log_origin)
        .map_err(|e| unverified(e.to_string()))?
        .verifier();
    let cp = concordat_proto::checkpoint::open(&header.checkpoint, &verifier)
        .map_err(|e| unverified(format!("the header's checkpoint does not verify: {e}")))?;
    if cp.size() != header.log_size {
        return Err(unverified(format!(
            "the header's checkpoint covers {} entries, the header says {}",
            cp.size(),
            header.log_size
        )));
    }
    audit_log::publish(
        dir,
        &audit_log::SignedCheckpoint {
            note: header.checkpoint.clone(),
            size: cp.size(),
            root: *cp.root(),
        },
    )
    .map_err(io_err("publishing the snapshot's checkpoint"))?;
    let storage = SledStorage::open(dir, &header.log_origin)?;
    // sled's flush, then fdatasync and fsync of its files and directories.
    storage.sync()?;
    store::check_recovered(&storage, dir).map_err(|e| unverified(e.to_string()))?;
    let size = storage.log_size()?;
    let latest = storage.latest_checkpoint()?;
    if size != header.log_size || latest.as_ref().map(|c| &c.note) != Some(&header.checkpoint) {
        return Err(unverified(format!(
            "the restored log has {size} entries and checkpoint {:?}, the header says {} entries",
            latest.map(|c| c.size),
            header.log_size
        )));
    }
    let report = storage.verify()?;
    if !report.ok() {
        return Err(unverified(report.problems.join("; ")));
    }
    Ok(Restored {
        header: header.clone(),
        counts,
        report,
    })
}

/// Writes a secret file that must not exist yet, mode 0600, and syncs it.
fn write_new_secret(path: &Path, bytes: &[u8]) -> Result<(), BackupError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(io_err(format!("creating {}", path.display())))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io_err(format!("writing {}", path.display())))
}

/// The warning `restore` prints: what serving an older snapshot does to those who hold later
/// checkpoints, and how to check for them.
pub fn fork_warning(h: &Header) -> String {
    format!(
        "WARNING: this snapshot's audit log ends at {size} entries. If the broker it was taken \
         from signed checkpoints beyond {size} entries after the backup (it did if it relayed \
         anything since), serving this directory forks the log: the restored broker will sign \
         different entries at the same sizes, and every agent or auditor holding a later \
         checkpoint will alarm (its witness refuses the fork). Before serving it, compare with \
         the latest checkpoint any agency holds (each agent's .state/checkpoint, the \
         checkpoints in its sent/*.receipt.json, an auditor's last export): if any is larger \
         than {size}, restore a newer backup or recover the original data directory instead \
         (docs/backup.md, section 6).",
        size = h.log_size
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn header() -> Header {
        Header {
            created_at: "2026-12-02T12:00:00Z".into(),
            ..Header::now("concordat-broker/audit", 3, "note\n")
        }
    }

    /// A small backup: one file, two trees.
    fn sample() -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), &header()).unwrap();
        w.file(audit_log::LOG_KEY_FILE, b"secret").unwrap();
        w.tree("meta").unwrap();
        w.pair(b"log_size", &3u64.to_be_bytes()).unwrap();
        w.pair(b"next_seq", &[]).unwrap();
        w.tree("receipts").unwrap();
        w.pair(b"nca\0m1", b"value").unwrap();
        let (bytes, counts) = w.finish().unwrap();
        assert_eq!(
            counts,
            Counts {
                trees: 2,
                pairs: 3,
                files: 1
            }
        );
        bytes
    }

    fn records(bytes: &[u8]) -> Result<(Header, Vec<String>), BackupError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("b");
        fs::write(&path, bytes).unwrap();
        let mut seen = Vec::new();
        let (h, _) = read(&path, |r| {
            seen.push(format!("{r:?}"));
            Ok(())
        })?;
        Ok((h, seen))
    }

    /// Appends a correct checksum to `body`.
    fn sealed(body: &[u8]) -> Vec<u8> {
        let mut out = body.to_vec();
        out.extend_from_slice(&Sha256::digest(body));
        out
    }

    #[test]
    fn a_backup_reads_back_record_by_record() {
        let (h, seen) = records(&sample()).unwrap();
        assert_eq!(h, header());
        assert_eq!(
            seen,
            [
                "File { name: \"log-key\", bytes: [115, 101, 99, 114, 101, 116] }",
                "Tree(\"meta\")",
                "Pair { key: [108, 111, 103, 95, 115, 105, 122, 101], value: [0, 0, 0, 0, 0, 0, 0, 3] }",
                "Pair { key: [110, 101, 120, 116, 95, 115, 101, 113], value: [] }",
                "Tree(\"receipts\")",
                "Pair { key: [110, 99, 97, 0, 109, 49], value: [118, 97, 108, 117, 101] }",
            ]
        );
    }

    #[test]
    fn every_flipped_byte_and_every_truncation_is_refused() {
        let good = sample();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x20;
            let e = records(&bad).unwrap_err();
            assert!(
                matches!(
                    e,
                    BackupError::Checksum(_)
                        | BackupError::NotABackup(_)
                        | BackupError::Version { .. }
                ),
                "byte {i}: {e}"
            );
        }
        for len in 0..good.len() {
            let e = records(&good[..len]).unwrap_err();
            assert!(
                matches!(e, BackupError::Checksum(_) | BackupError::NotABackup(_)),
                "{len}: {e}"
            );
        }
    }

    /// Files with a valid checksum whose contents break the format: each refused with its
    /// reason, none panics or allocates what it claims.
    #[test]
    fn hostile_contents_with_a_valid_checksum_are_refused() {
        let good = sample();
        let body = &good[..good.len() - 32];
        let prefix = |header: &[u8]| {
            let mut b = MAGIC.to_vec();
            b.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
            b.extend_from_slice(&(header.len() as u32).to_be_bytes());
            b.extend_from_slice(header);
            b
        };
        let json = serde_json::to_vec(&header()).unwrap();
        let end = |b: &mut Vec<u8>, c: [u64; 3]| {
            b.push(TAG_END);
            for n in c {
                b.extend_from_slice(&n.to_be_bytes());
            }
        };
        let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
        let mut v = prefix(&json);
        v.extend_from_slice(&[TAG_PAIR, 0, 0, 0, 1, b'k', 0, 0, 0, 0]);
        end(&mut v, [0, 1, 0]);
        cases.push(("pair first", v, "before any tree"));
        let mut v = prefix(&json);
        v.extend_from_slice(&[TAG_TREE, 0, 1, b't', TAG_PAIR, 0xff, 0xff, 0xff, 0xff]);
        cases.push(("huge key", v, "above the limit"));
        let mut v = prefix(&json);
        v.extend_from_slice(&[TAG_TREE, 0, 1, b't', TAG_PAIR, 0, 0, 0, 1, b'k']);
        v.extend_from_slice(&(64u32 << 20).to_be_bytes());
        cases.push(("value past the end", v, "longer than the rest"));
        let mut v = prefix(&json);
        v.extend_from_slice(&[TAG_FILE, 0, 5, b'.', b'.', b'/', b'x', b'y', 0, 0, 0, 0]);
        end(&mut v, [0, 0, 1]);
        cases.push(("other file", v, "carries a file"));
        let mut v = prefix(b"{\"format\":1}");
        end(&mut v, [0, 0, 0]);
        cases.push(("bad header", v, "header is not"));
        let mut v = prefix(&json);
        end(&mut v, [1, 0, 0]);
        cases.push(("wrong counts", v, "end record counts"));
        let mut v = body.to_vec();
        v.push(0);
        cases.push(("trailing", v, "follow its end record"));
        let mut v = prefix(&json);
        v.push(b'Z');
        cases.push(("unknown tag", v, "unknown record tag"));
        let mut v = prefix(&json);
        v.push(TAG_TREE);
        cases.push(("cut record", v, "ends in the middle"));
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&FORMAT_VERSION.to_be_bytes());
        v.extend_from_slice(&u32::MAX.to_be_bytes());
        cases.push(("huge header", v, "above the limit"));
        for (what, body, expected) in cases {
            let e = records(&sealed(&body)).unwrap_err();
            assert!(
                matches!(e, BackupError::Malformed { .. }) && e.to_string().contains(expected),
                "{what}: {e}"
            );
        }
        // Another version and another kind of file, named as such.
        let mut v = body.to_vec();
        v[16..20].copy_from_slice(&2u32.to_be_bytes());
        let e = records(&sealed(&v)).unwrap_err();
        assert!(e.to_string().contains("format version 2"), "{e}");
        let e = records(&sealed(b"SQLite format 3\0 and more bytes here")).unwrap_err();
        assert!(e.to_string().contains("not a Concordat backup"), "{e}");
    }

    /// A snapshot taken while writers commit holds complete batches only: its log size is the
    /// size its checkpoint covers, the restored store passes the start-up check and the
    /// offline verification, and its entries are the original's first ones.
    #[test]
    fn a_snapshot_under_writes_restores_whole() {
        use crate::store::{Op, Store, StoreOptions};
        use concordat_proto::pb;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        fs::create_dir(&live).unwrap();
        let storage =
            std::sync::Arc::new(SledStorage::open(&live, audit_log::DEFAULT_ORIGIN).unwrap());
        let store = Store::start(
            storage.clone(),
            StoreOptions::new(&live, Duration::from_secs(10)),
        )
        .unwrap();
        let file = dir.path().join("backup");
        let header = rt.block_on(async {
            let writers: Vec<_> = (0..8)
                .map(|w| {
                    let store = store.clone();
                    tokio::spawn(async move {
                        for i in 0..400 {
                            let op = Op::ConfigLoaded(pb::ConfigLoaded {
                                // Large enough that a snapshot takes a while.
                                source: format!("writer {w} commit {i} {}", "x".repeat(4096)),
                                ..Default::default()
                            });
                            store.commit(op).await.unwrap();
                        }
                    })
                })
                .collect();
            // Once some batches are in, snapshot in the middle of the rest.
            while store.checkpoint().map_or(0, |c| c.size) <= 1000 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            let out = fs::File::create(&file).unwrap();
            let (header, _, _) = snapshot_running(&store, &out).await.unwrap();
            for w in writers {
                w.await.unwrap();
            }
            header
        });
        assert!(header.log_size > 1000, "{header:?}");
        assert!(
            storage.log_size().unwrap() > header.log_size,
            "taken mid-way"
        );
        let restored_dir = dir.path().join("restored");
        let restored = restore(&file, &restored_dir).unwrap();
        assert!(restored.report.ok());
        assert_eq!(restored.report.entries, header.log_size);
        let copy = SledStorage::open(&restored_dir, audit_log::DEFAULT_ORIGIN).unwrap();
        assert_eq!(
            copy.log_entries(0, usize::MAX).unwrap(),
            storage.log_entries(0, header.log_size as usize).unwrap()
        );
        // The restored key is the live one, and its file is private.
        assert_eq!(copy.log_verifier_key(), storage.log_verifier_key());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(restored_dir.join(audit_log::LOG_KEY_FILE))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn restore_refuses_a_non_empty_directory_and_a_damaged_file_leaving_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let live = dir.path().join("live");
        fs::create_dir(&live).unwrap();
        let storage = SledStorage::open(&live, audit_log::DEFAULT_ORIGIN).unwrap();
        let file = dir.path().join("backup");
        write_snapshot(&storage, &fs::File::create(&file).unwrap()).unwrap();
        let busy = dir.path().join("busy");
        fs::create_dir(&busy).unwrap();
        fs::write(busy.join("x"), b"mine").unwrap();
        let e = restore(&file, &busy).unwrap_err();
        assert!(matches!(e, BackupError::NotEmpty(_)), "{e}");
        assert_eq!(fs::read(busy.join("x")).unwrap(), b"mine");
        let mut bytes = fs::read(&file).unwrap();
        let middle = bytes.len() / 2;
        bytes[middle] ^= 1;
        let damaged = dir.path().join("damaged");
        fs::write(&damaged, bytes).unwrap();
        let target = dir.path().join("new");
        let e = restore(&damaged, &target).unwrap_err();
        assert!(matches!(e, BackupError::Checksum(_)), "{e}");
        assert!(!target.exists());
        let leftovers: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("restoring"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
        // An empty directory is fine.
        fs::create_dir(&target).unwrap();
        restore(&file, &target).unwrap();
    }
}
