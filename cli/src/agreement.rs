//! `concordat agreement reviewed`: records a completed review of an agreement in the broker's
//! configuration file, which moves its review date two years on (docs/workflows.md, "Reviews").
//!
//! The file is edited in place with `toml_edit`, so its comments and layout stay as they were:
//! the agreement's table gets `reviewed = DATE` (where its `review_by` was, or after `signed`),
//! and an explicit `review_by`, which would win over it, is removed. The edited text is checked
//! with the broker's own loader ([`Config::parse_as`]) before anything is written, then written
//! atomically (a temporary file beside it, synced, renamed over it, with the file's mode). A
//! running broker applies it on reload (`--reload`, [`control::request_reload`]).

use std::{
    io::Write,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use concordat_broker::{config::Config, control};
use time::Date;
use toml_edit::{DocumentMut, Item, Key, Table};

/// What `record_review` changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewRecorded {
    /// The agreement.
    pub id: String,
    /// Its review date before.
    pub old_review_by: Date,
    /// Its review date now.
    pub new_review_by: Date,
    /// The explicit `review_by` removed from the file, if there was one.
    pub removed_review_by: Option<String>,
    /// The broker's data directory, as the file names it (for `--reload`).
    pub data_dir: PathBuf,
}

/// Records that agreement `id` was reviewed `on` in the configuration file `path`, today being
/// `today`. Refuses an unknown id, a review before the agreement was signed or after today,
/// and a file that is not a valid configuration before or after the edit; writes nothing then.
pub fn record_review(
    path: &Path,
    id: &str,
    on: Date,
    today: Date,
) -> anyhow::Result<ReviewRecorded> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let before = Config::parse_as(&text, path)
        .with_context(|| format!("{} is not a valid configuration now", path.display()))?;
    let Some(agreement) = before.policy.agreement(id) else {
        let known: Vec<&str> = before
            .policy
            .agreements
            .iter()
            .map(|a| a.id.as_str())
            .collect();
        bail!(
            "no agreement {id} in {}; its agreements are: {}",
            path.display(),
            known.join(", ")
        );
    };
    if on < agreement.signed {
        bail!(
            "--on {on} is before agreement {id} was signed ({})",
            agreement.signed
        );
    }
    if on > today {
        bail!("--on {on} is in the future (today is {today}): record a review once it is done");
    }

    let mut doc: DocumentMut = text
        .parse()
        .with_context(|| format!("{} is not TOML", path.display()))?;
    let table = agreement_table(&mut doc, id)?;
    let removed_review_by = set_reviewed(table, on)?;
    let edited = doc.to_string();

    let after = Config::parse_as(&edited, path)
        .context("the edited configuration does not load; nothing was written")?;
    let new_review_by = after
        .policy
        .agreement(id)
        .map(|a| a.review_by)
        .context("the edited configuration lost the agreement; nothing was written")?;
    write_in_place(path, edited.as_bytes())?;
    Ok(ReviewRecorded {
        id: id.to_owned(),
        old_review_by: agreement.review_by,
        new_review_by,
        removed_review_by,
        data_dir: after.data_dir,
    })
}

/// The `[[agreements]]` table whose `id` is `id`.
fn agreement_table<'a>(doc: &'a mut DocumentMut, id: &str) -> anyhow::Result<&'a mut Table> {
    let Some(agreements) = doc
        .get_mut("agreements")
        .and_then(Item::as_array_of_tables_mut)
    else {
        bail!("the agreements are not written as [[agreements]] tables: edit the file by hand");
    };
    agreements
        .iter_mut()
        .find(|t| t.get("id").and_then(Item::as_str) == Some(id))
        .with_context(|| {
            format!("agreement {id} is not an [[agreements]] table of the file: edit it by hand")
        })
}

/// Sets `reviewed = on` in an agreement's table, where its `review_by` was or after `signed`,
/// and removes `review_by`; returns the removed `review_by` as written.
fn set_reviewed(table: &mut Table, on: Date) -> anyhow::Result<Option<String>> {
    let date: toml_edit::Datetime = on
        .to_string()
        .parse()
        .with_context(|| format!("{on} as a TOML date"))?;
    // The keys in their order, with `reviewed` where it will go.
    let mut order: Vec<String> = table.iter().map(|(k, _)| k.to_owned()).collect();
    let has_reviewed = order.iter().any(|k| k == "reviewed");
    let removed = table.remove_entry("review_by");
    if !has_reviewed {
        let at = match order.iter().position(|k| k == "review_by") {
            Some(i) => i,
            None => order
                .iter()
                .position(|k| k == "signed")
                .map_or(0, |i| i + 1),
        };
        order.insert(at, "reviewed".to_owned());
    }
    order.retain(|k| k != "review_by");
    match (&removed, has_reviewed) {
        // Taking `review_by`'s place: its comments and indentation too.
        (Some((key, _)), false) => {
            let mut new_key = Key::new("reviewed");
            *new_key.leaf_decor_mut() = key.leaf_decor().clone();
            table.insert_formatted(&new_key, toml_edit::value(date));
        }
        _ => match table.get_mut("reviewed").and_then(Item::as_value_mut) {
            // Replacing a recorded review: the value's own comment stays.
            Some(value) => {
                let decor = value.decor().clone();
                *value = toml_edit::Value::from(date);
                *value.decor_mut() = decor;
            }
            None => {
                table.insert("reviewed", toml_edit::value(date));
            }
        },
    }
    table.sort_values_by(|a, _, b, _| {
        let at = |k: &Key| {
            order
                .iter()
                .position(|o| o == k.get())
                .unwrap_or(usize::MAX)
        };
        at(a).cmp(&at(b))
    });
    Ok(removed.map(|(_, item)| item.to_string().trim().to_owned()))
}

/// Replaces `path` with `bytes` atomically: a temporary file in the same directory with the
/// file's permissions, synced, renamed over it, and the directory synced.
fn write_in_place(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let permissions = std::fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .permissions();
    let mut tmp = tempfile::Builder::new()
        .prefix(".concordat-edit-")
        .tempfile_in(&dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .and_then(|()| tmp.as_file().set_permissions(permissions))
        .and_then(|()| tmp.as_file().sync_all())
        .with_context(|| format!("writing a temporary file in {}", dir.display()))?;
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("replacing {}", path.display()))?;
    std::fs::File::open(&dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {}", dir.display()))?;
    Ok(())
}

/// Asks the broker serving `data_dir` to reload, and its outcome as `concordat-broker reload`
/// prints it; an error if it could not be asked or the reload failed.
pub fn reload(data_dir: &Path) -> anyhow::Result<String> {
    let outcome = control::request_reload(data_dir, control::DEFAULT_RELOAD_TIMEOUT)
        .context("asking the broker to reload")?;
    let text = outcome.describe();
    if !outcome.ok() {
        bail!("{}", text.trim_end());
    }
    Ok(text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use time::macros::date;

    use super::*;

    const AGREEMENT: &str = r#"# The MoU.
[[agreements]]
id = "mou"  # kept
title = "T"
signed = 2024-09-10
# The date the parties set.
review_by = 2026-09-10
parties = ["ico", "nca"]

[[agreements.flows]]
# A flow.
from = "nca"
"#;

    /// Each row: an agreement table and what `set_reviewed` makes of it. Comments, the other
    /// keys and their order stay; `reviewed` takes `review_by`'s place, or follows `signed`.
    #[test]
    fn reviewed_replaces_review_by_in_place_and_keeps_the_rest() {
        let rows: &[(&str, &str, Option<&str>)] = &[
            (
                AGREEMENT,
                "# The MoU.\n[[agreements]]\nid = \"mou\"  # kept\ntitle = \"T\"\nsigned = \
                 2024-09-10\n# The date the parties set.\nreviewed = 2026-11-30\nparties = \
                 [\"ico\", \"nca\"]\n\n[[agreements.flows]]\n# A flow.\nfrom = \"nca\"\n",
                Some("2026-09-10"),
            ),
            (
                "[[agreements]]\nid = \"mou\"\nsigned = 2024-09-10\ntitle = \"T\"\n",
                "[[agreements]]\nid = \"mou\"\nsigned = 2024-09-10\nreviewed = \
                 2026-11-30\ntitle = \"T\"\n",
                None,
            ),
            (
                "[[agreements]]\nid = \"mou\"\nreviewed = 2025-01-01 # last\nsigned = \
                 2024-09-10\n",
                "[[agreements]]\nid = \"mou\"\nreviewed = 2026-11-30 # last\nsigned = \
                 2024-09-10\n",
                None,
            ),
        ];
        for (before, after, removed) in rows {
            let mut doc: DocumentMut = before.parse().unwrap();
            let table = agreement_table(&mut doc, "mou").unwrap();
            let got = set_reviewed(table, date!(2026 - 11 - 30)).unwrap();
            assert_eq!(got.as_deref(), *removed, "{before}");
            assert_eq!(doc.to_string(), *after, "{before}");
        }
        let mut doc: DocumentMut = AGREEMENT.parse().unwrap();
        assert!(agreement_table(&mut doc, "other").is_err());
    }

    /// The embedded default as a file beside the development PKI: each row a request and the
    /// start of its error, or the dates it records. A refused request leaves the file as it was;
    /// an accepted one loads, with its comments.
    #[test]
    fn record_review_refuses_what_it_must_and_writes_a_loadable_file() {
        let dir = tempfile::tempdir().unwrap();
        let certs = Path::new(env!("CARGO_MANIFEST_DIR")).join("../certs-dev");
        for name in ["ca.pem", "broker.pem", "broker.key"] {
            std::fs::copy(certs.join(name), dir.path().join(name)).unwrap();
        }
        std::fs::create_dir(dir.path().join("consent")).unwrap();
        for agency in ["ico", "ncsc", "nca"] {
            let name = format!("consent/{agency}.pub");
            std::fs::copy(certs.join(&name), dir.path().join(&name)).unwrap();
        }
        let path = dir.path().join("broker.toml");
        let original = include_str!("../../broker/src/default.toml");
        std::fs::write(&path, original).unwrap();
        let today = date!(2026 - 12 - 02);
        type Row<'a> = (&'a str, Date, Result<(Date, Date), &'a str>);
        let rows: [Row<'_>; 5] = [
            ("ico-mi5", today, Err("no agreement ico-mi5 in ")),
            (
                "ico-nca-2024",
                date!(2024 - 09 - 09),
                Err("--on 2024-09-09 is before agreement ico-nca-2024 was signed (2024-09-10)"),
            ),
            (
                "ico-nca-2024",
                date!(2026 - 12 - 03),
                Err("--on 2026-12-03 is in the future"),
            ),
            (
                "ico-nca-2024",
                date!(2026 - 11 - 30),
                Ok((date!(2026 - 09 - 10), date!(2028 - 11 - 30))),
            ),
            // Again, a later review: the recorded one is replaced.
            (
                "ico-nca-2024",
                today,
                Ok((date!(2028 - 11 - 30), date!(2028 - 12 - 02))),
            ),
        ];
        for (id, on, want) in rows {
            let before = std::fs::read_to_string(&path).unwrap();
            match (record_review(&path, id, on, today), want) {
                (Err(e), Err(start)) => {
                    assert!(e.to_string().starts_with(start), "{id} {on}: {e:#}");
                    assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
                }
                (Ok(done), Ok((old, new))) => {
                    assert_eq!((done.old_review_by, done.new_review_by), (old, new));
                    assert_eq!(done.removed_review_by, None);
                }
                (got, want) => panic!("{id} {on}: got {got:?}, want {want:?}"),
            }
        }
        let after = std::fs::read_to_string(&path).unwrap();
        // One line added, every comment kept.
        assert_eq!(after.lines().count(), original.lines().count() + 1);
        assert!(after.contains("signed = 2024-09-10\nreviewed = 2026-12-02\n# No review"));
        let config = Config::load(&path).unwrap();
        let nca = config.policy.agreement("ico-nca-2024").unwrap();
        assert_eq!(nca.review_by, date!(2028 - 12 - 02));
    }
}
