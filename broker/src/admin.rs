//! The administration socket: a Unix domain socket in the data directory (`admin.sock`, mode
//! 0600, removed when the broker stops) through which the operator's own tools ask a running
//! broker for what only it can give while it holds the database's lock: today, a backup
//! (`concordat-broker backup`).
//!
//! Whoever can open the data directory already holds everything in it (the database and the
//! log key), so the file's permissions are the authentication, and the broker also refuses a
//! peer whose uid is neither its own nor root. It is never served over the network.
//!
//! The protocol is one request per connection. The client sends one line, `backup 1`; the
//! broker answers one line, `ok <length> <paused-microseconds>`, followed by exactly `length`
//! bytes of backup file ([`crate::backup`]), or `error <message>`. Unlike the gRPC services'
//! internal errors, the message names the cause: the only peer is the broker's own operator,
//! who can read everything it would hide.

use std::{
    io::{self, Read, Write},
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{UnixListener, UnixStream},
    sync::watch,
};

use crate::{backup, store::Store};

/// The socket's file name in the data directory.
pub const SOCKET_FILE: &str = "admin.sock";
/// The request for a backup in format version 1.
const BACKUP_REQUEST: &str = "backup 1";
/// The longest request or status line.
const MAX_LINE: usize = 4096;
/// How long a client may take to send its request.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the client waits for the broker's status line (the snapshot is taken meanwhile).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// How long the client waits for each read of the backup's bytes.
const TRANSFER_TIMEOUT: Duration = Duration::from_secs(60);

/// Why a request over the administration socket failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AdminError {
    /// Talking to the socket, or writing the output, failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The I/O error.
        source: io::Error,
    },
    /// The broker refused or failed the request, and said why.
    #[error("the broker answered: {0}")]
    Refused(String),
    /// The broker's answer does not follow the protocol.
    #[error("unexpected answer from the broker: {0}")]
    Protocol(String),
}

/// The socket file, removed when dropped (when the broker stops).
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
}

impl SocketFile {
    /// The uid that owns the socket: the broker's user.
    pub fn owner(&self) -> Option<u32> {
        std::fs::metadata(&self.path).map(|m| m.uid()).ok()
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `data_dir/admin.sock`, mode 0600, replacing one left by a broker that was killed (only
/// one broker opens a data directory: it holds the database's lock before this is called). The
/// socket is bound under a temporary name, restricted, then renamed into place, so that it is
/// never reachable with looser permissions.
pub fn bind(data_dir: &Path) -> io::Result<(UnixListener, SocketFile)> {
    use std::os::unix::fs::PermissionsExt;
    let path = data_dir.join(SOCKET_FILE);
    let staging = data_dir.join(format!(".{SOCKET_FILE}.{}", std::process::id()));
    let _ = std::fs::remove_file(&staging);
    let listener = UnixListener::bind(&staging)?;
    let placed = std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&staging, &path));
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staging);
        return Err(e);
    }
    Ok((listener, SocketFile { path }))
}

/// Answers requests on `listener` until `stop` turns true. Backups are written to an unlinked
/// temporary file in `data_dir` while the writer pauses, and streamed from it afterwards, so
/// the pause lasts as long as the local copy, not as long as the client takes to read.
/// Peers must be the socket's `owner` (the broker's user, [`SocketFile::owner`]) or root.
pub async fn serve(
    listener: UnixListener,
    owner: Option<u32>,
    store: Store,
    data_dir: PathBuf,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let (store, dir) = (store.clone(), data_dir.clone());
                    tokio::spawn(async move { handle(stream, owner, store, dir).await });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting on the admin socket");
                    // Out of file descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            () = async { let _ = stop.wait_for(|s| *s).await; } => return,
        }
    }
}

async fn handle(mut stream: UnixStream, owner: Option<u32>, store: Store, data_dir: PathBuf) {
    let peer = stream.peer_cred().map(|c| c.uid()).ok();
    if peer.is_none() || (peer != owner && peer != Some(0)) {
        tracing::warn!(
            peer_uid = ?peer,
            "refused a connection to the admin socket from another user"
        );
        let _ = stream
            .write_all(b"error only the broker's own user may use this socket\n")
            .await;
        return;
    }
    let line = match tokio::time::timeout(REQUEST_TIMEOUT, read_line(&mut stream)).await {
        Ok(Ok(line)) => line,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "reading an admin request");
            return;
        }
        Err(_) => {
            let _ = stream.write_all(b"error no request within 10 s\n").await;
            return;
        }
    };
    if line != BACKUP_REQUEST {
        let answer = format!(
            "error unknown request {:?}: this broker answers {BACKUP_REQUEST:?}\n",
            line.chars().take(64).collect::<String>()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
        return;
    }
    if let Err(e) = send_backup(&mut stream, &store, &data_dir).await {
        tracing::warn!(error = %e, "a backup over the admin socket failed");
        let _ = stream.write_all(format!("error {e}\n").as_bytes()).await;
    }
}

/// Takes the snapshot between two batches into an unlinked file, then streams it.
async fn send_backup(stream: &mut UnixStream, store: &Store, data_dir: &Path) -> io::Result<()> {
    let file = tempfile::tempfile_in(data_dir)?;
    let requested = Instant::now();
    let (header, counts, paused) =
        backup::snapshot_running(store, &file)
            .await
            .map_err(|f| match f {
                crate::refusal::Failure::Refused(r) => io::Error::other(r.message),
                crate::refusal::Failure::Internal(e) => io::Error::other(e.to_string()),
            })?;
    let len = file.metadata()?.len();
    tracing::info!(
        log_size = header.log_size,
        trees = counts.trees,
        pairs = counts.pairs,
        bytes = len,
        paused_ms = paused.as_millis() as u64,
        waited_ms = requested.elapsed().as_millis() as u64,
        "backup snapshot taken; the writer paused while it was written"
    );
    let mut file = tokio::fs::File::from_std(file);
    use tokio::io::AsyncSeekExt;
    file.seek(io::SeekFrom::Start(0)).await?;
    stream
        .write_all(format!("ok {len} {}\n", paused.as_micros()).as_bytes())
        .await?;
    let copied = tokio::io::copy(&mut file.take(len), stream).await?;
    if copied != len {
        return Err(io::Error::other(
            "the snapshot file shrank while it was sent",
        ));
    }
    stream.shutdown().await
}

async fn read_line(stream: &mut UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        if stream.read(&mut byte).await? == 0 {
            break;
        }
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
        if line.len() > MAX_LINE {
            return Err(io::Error::other("request line too long"));
        }
    }
    Ok(String::from_utf8_lossy(&line).trim().to_owned())
}

/// What a broker sent for a backup.
#[derive(Debug, Clone, Copy)]
pub struct Fetched {
    /// The backup's size in bytes.
    pub bytes: u64,
    /// How long the broker's writer paused (sends waited) while the snapshot was written.
    pub paused: Duration,
}

/// Asks the broker running on `data_dir` for a backup, and writes it to `out`. `Ok(None)`
/// when no broker listens there (no socket, or one left by a broker that is gone).
pub fn request_backup(data_dir: &Path, out: &mut dyn Write) -> Result<Option<Fetched>, AdminError> {
    let path = data_dir.join(SOCKET_FILE);
    let io = |what: &str| {
        let what = format!("{what} ({})", path.display());
        move |source| AdminError::Io { what, source }
    };
    let mut stream = match std::os::unix::net::UnixStream::connect(&path) {
        Ok(s) => s,
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
            ) =>
        {
            return Ok(None);
        }
        Err(e) => return Err(io("connecting to the admin socket")(e)),
    };
    stream
        .set_write_timeout(Some(REQUEST_TIMEOUT))
        .and_then(|()| stream.write_all(format!("{BACKUP_REQUEST}\n").as_bytes()))
        .map_err(io("sending the request"))?;
    stream
        .set_read_timeout(Some(SNAPSHOT_TIMEOUT))
        .map_err(io("reading the answer"))?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte).map_err(io("reading the answer"))? {
            0 => break,
            _ if byte[0] == b'\n' => break,
            _ => line.push(byte[0]),
        }
        if line.len() > MAX_LINE {
            return Err(AdminError::Protocol("status line too long".into()));
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    if let Some(why) = line.strip_prefix("error ") {
        return Err(AdminError::Refused(why.to_owned()));
    }
    let mut words = line.strip_prefix("ok ").unwrap_or_default().split(' ');
    let (Some(Ok(bytes)), Some(Ok(paused_us)), None) = (
        words.next().map(str::parse::<u64>),
        words.next().map(str::parse::<u64>),
        words.next(),
    ) else {
        return Err(AdminError::Protocol(format!(
            "{:?}",
            line.chars().take(80).collect::<String>()
        )));
    };
    stream
        .set_read_timeout(Some(TRANSFER_TIMEOUT))
        .map_err(io("reading the backup"))?;
    let copied = io::copy(&mut (&mut stream).take(bytes), out).map_err(io("reading the backup"))?;
    if copied != bytes {
        return Err(AdminError::Protocol(format!(
            "the broker announced {bytes} bytes and sent {copied}"
        )));
    }
    Ok(Some(Fetched {
        bytes,
        paused: Duration::from_micros(paused_us),
    }))
}
