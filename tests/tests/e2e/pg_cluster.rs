//! The PostgreSQL test cluster (`concordat_tests::postgres`) against real servers: what a
//! storage backend on PostgreSQL will rely on it for. A commit acknowledged by the primary is on
//! the synchronous standby; after the primary is killed and the standby promoted every
//! acknowledged row is there and the multi-host URL finds the new primary; the old primary
//! restarted is stale, cannot acknowledge a write, and is still what that URL picks first.
//!
//! Nothing here is skipped: without PostgreSQL, `PgCluster::start` fails with how to install it.

use std::{
    future::Future,
    path::Path,
    time::{Duration, Instant},
};

use concordat_tests::{
    postgres::{PgCluster, STANDBY_NAME},
    process::POLL_INTERVAL,
};
use tokio_postgres::{Client, NoTls, error::SqlState};

/// How long an outcome (a row replayed on the standby, a backend waiting) may take.
const OUTCOME_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to `url`; the connection is driven by a task of its own.
async fn connect(url: &str) -> Result<Client, tokio_postgres::Error> {
    let (client, connection) = tokio_postgres::connect(url, NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Polls `check` every `POLL_INTERVAL` until it returns `Ok`, for at most `OUTCOME_TIMEOUT`;
/// panics with `what` and the last state seen.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + OUTCOME_TIMEOUT;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(state) if Instant::now() >= deadline => {
                panic!("timed out waiting for {what}; last seen: {state}")
            }
            Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// One text value from `sql`.
async fn text(client: &Client, sql: &str) -> String {
    client.query_one(sql, &[]).await.unwrap().get(0)
}

/// The timeline the server at `client` writes on, from the name of its current WAL file.
async fn timeline(client: &Client) -> String {
    text(
        client,
        "SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)",
    )
    .await
}

/// The pids of the PostgreSQL processes working under `dir` (found independently of the
/// harness: by command line and working directory).
fn postgres_processes_under(dir: &Path) -> Vec<String> {
    let dir = std::fs::canonicalize(dir).unwrap();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter(|entry| {
            let path = entry.path();
            let cmdline = std::fs::read(path.join("cmdline")).unwrap_or_default();
            let state = std::fs::read_to_string(path.join("stat")).unwrap_or_default();
            let zombie = state
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            cmdline.starts_with(b"postgres")
                && !zombie
                && std::fs::read_link(path.join("cwd")).is_ok_and(|cwd| cwd.starts_with(&dir))
        })
        .map(|entry| entry.file_name().to_string_lossy().into_owned())
        .collect()
}

#[tokio::test]
async fn a_row_committed_on_the_primary_is_on_the_synchronous_standby() {
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let cluster = PgCluster::start(dir.path()).unwrap();
    eprintln!("cluster up in {:?}", started.elapsed());

    let primary = connect(&cluster.primary_url()).await.unwrap();
    // The durability settings, as the primary reports them.
    for (setting, expected) in [
        ("fsync", "on"),
        ("full_page_writes", "on"),
        ("synchronous_commit", "on"),
        ("wal_level", "replica"),
        ("synchronous_standby_names", "ANY 1 (standby1)"),
    ] {
        assert_eq!(
            text(&primary, &format!("SHOW {setting}")).await,
            expected,
            "{setting}"
        );
    }
    // The standby streams and counts for synchronous commit, as the client under test sees it.
    let row = primary
        .query_one(
            "SELECT state, sync_state FROM pg_stat_replication WHERE application_name = $1",
            &[&STANDBY_NAME],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>("state"), "streaming");
    let sync_state: String = row.get("sync_state");
    assert!(
        ["sync", "quorum"].contains(&sync_state.as_str()),
        "{sync_state}"
    );

    primary
        .batch_execute(
            "SET synchronous_commit = on;
             CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL);
             INSERT INTO notes VALUES (1, 'committed on the primary');",
        )
        .await
        .unwrap();

    let standby = connect(&cluster.standby_url()).await.unwrap();
    assert_eq!(
        text(&standby, "SELECT pg_is_in_recovery()::text").await,
        "true"
    );
    // The commit waited for the standby to flush it; replaying it there may take a moment more.
    let body = eventually("the row on the standby", || async {
        match standby
            .query_opt("SELECT body FROM notes WHERE id = 1", &[])
            .await
        {
            Ok(Some(row)) => Ok(row.get::<_, String>(0)),
            Ok(None) => Err("no row yet".into()),
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    assert_eq!(body, "committed on the primary");
    let refused = standby
        .execute("INSERT INTO notes VALUES (2, 'on the standby')", &[])
        .await
        .unwrap_err();
    assert_eq!(
        refused.code(),
        Some(&SqlState::READ_ONLY_SQL_TRANSACTION),
        "{refused}"
    );
}

#[tokio::test]
async fn after_the_primary_is_killed_the_promoted_standby_has_every_acknowledged_row() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = PgCluster::start(dir.path()).unwrap();
    let primary = connect(&cluster.primary_url()).await.unwrap();
    primary
        .batch_execute("CREATE TABLE notes (id int PRIMARY KEY)")
        .await
        .unwrap();
    // Each insert its own transaction, acknowledged only once the standby has flushed it.
    const ROWS: i32 = 100;
    for id in 0..ROWS {
        primary
            .execute("INSERT INTO notes VALUES ($1)", &[&id])
            .await
            .unwrap();
    }

    let started = Instant::now();
    cluster.kill_primary().unwrap();
    eprintln!("primary killed in {:?}", started.elapsed());
    assert_eq!(
        postgres_processes_under(cluster.primary_data_dir()),
        Vec::<String>::new(),
        "a process of the killed primary is still running"
    );
    assert!(primary.execute("SELECT 1", &[]).await.is_err());
    assert!(connect(&cluster.primary_url()).await.is_err());
    // Before the promotion no server takes writes: the multi-host URL finds none.
    let no_writer = connect(&cluster.multi_host_url()).await.unwrap_err();
    eprintln!("multi-host URL before the promotion: {no_writer}");

    let started = Instant::now();
    cluster.promote_standby().unwrap();
    eprintln!("standby promoted in {:?}", started.elapsed());

    let writer = connect(&cluster.multi_host_url()).await.unwrap();
    assert_eq!(
        text(&writer, "SELECT inet_server_port()::text").await,
        cluster.standby_port().to_string(),
        "the multi-host URL connects to the promoted standby"
    );
    assert_eq!(
        text(&writer, "SELECT pg_is_in_recovery()::text").await,
        "false"
    );
    assert_eq!(
        text(&writer, "SELECT count(*)::text FROM notes").await,
        ROWS.to_string(),
        "every acknowledged row survived the failover"
    );
    // The new primary commits alone: no standby is left to wait for.
    writer
        .execute("INSERT INTO notes VALUES ($1)", &[&ROWS])
        .await
        .unwrap();
}

#[tokio::test]
async fn the_old_primary_restarted_is_stale_cannot_acknowledge_and_is_still_picked_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = PgCluster::start(dir.path()).unwrap();
    let primary = connect(&cluster.primary_url()).await.unwrap();
    primary
        .batch_execute(
            "CREATE TABLE notes (id int PRIMARY KEY, body text NOT NULL);
             INSERT INTO notes VALUES (1, 'before the failover');",
        )
        .await
        .unwrap();
    cluster.kill_primary().unwrap();
    cluster.promote_standby().unwrap();
    let promoted = connect(&cluster.standby_url()).await.unwrap();
    promoted
        .execute("INSERT INTO notes VALUES (2, 'after the failover')", &[])
        .await
        .unwrap();

    let started = Instant::now();
    cluster.restart_old_primary().unwrap();
    eprintln!("old primary restarted in {:?}", started.elapsed());
    let stale = connect(&cluster.primary_url()).await.unwrap();
    // It believes it is a primary, on the timeline the promotion left behind, without the row
    // written since.
    assert_eq!(
        text(&stale, "SELECT pg_is_in_recovery()::text").await,
        "false"
    );
    assert_eq!(timeline(&stale).await, "00000001");
    assert_eq!(timeline(&promoted).await, "00000002");
    assert_eq!(
        text(
            &stale,
            "SELECT string_agg(body, ', ' ORDER BY id) FROM notes"
        )
        .await,
        "before the failover"
    );

    // target_session_attrs=read-write does not fence it: it takes writes, and it is listed
    // first. A backend must tell it apart by other means (its timeline, say).
    let picked = connect(&cluster.multi_host_url()).await.unwrap();
    assert_eq!(
        text(&picked, "SELECT inet_server_port()::text").await,
        cluster.primary_port().to_string(),
        "the multi-host URL picks the stale primary"
    );

    // A write there waits for `standby1`, which never comes back: it is never acknowledged.
    let writer = connect(&cluster.primary_url()).await.unwrap();
    let writer_pid: i32 = writer
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let write = tokio::spawn(async move {
        writer
            .execute("INSERT INTO notes VALUES (3, 'on the stale primary')", &[])
            .await
    });
    let wait_event = eventually(
        "the stale primary's commit to wait for a standby",
        || async {
            let row = stale
                .query_one(
                    "SELECT coalesce(wait_event, 'none') FROM pg_stat_activity WHERE pid = $1",
                    &[&writer_pid],
                )
                .await
                .map_err(|e| e.to_string())?;
            let event: String = row.get(0);
            if event == "SyncRep" {
                Ok(event)
            } else {
                Err(format!("wait_event {event}"))
            }
        },
    )
    .await;
    assert_eq!(wait_event, "SyncRep");
    assert!(
        !write.is_finished(),
        "the stale primary acknowledged a write"
    );
    write.abort();

    drop((stale, picked, promoted, primary));
    let started = Instant::now();
    drop(cluster);
    eprintln!("cluster stopped in {:?}", started.elapsed());
    assert_eq!(
        postgres_processes_under(dir.path()),
        Vec::<String>::new(),
        "a PostgreSQL process outlived the cluster"
    );
}
