//! The broker says it is ready only when it is: `concordat-broker serve` prints its
//! `listening on` line (which scripts and supervisors wait for) only after the store is open and
//! checked and every listener is bound. A database locked by another broker, or a metrics port
//! already taken, ends the process with an error and without that line.

use std::{fs, time::Duration};

use concordat_broker::config::Limits;
use concordat_tests::process::{BrokerProcess, write_broker_files};

fn setup(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let data_dir = dir.join("data");
    let (_, config) =
        write_broker_files(dir, &["ico", "nca"], &data_dir, &Limits::default()).unwrap();
    (config, data_dir)
}

#[test]
fn a_locked_database_ends_the_broker_before_it_says_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data_dir) = setup(dir.path());
    let mut first = BrokerProcess::start(&config, &data_dir).unwrap();
    // A second broker on the same data directory (its own log file: another config name).
    let second_config = dir.path().join("second").join("broker.toml");
    fs::create_dir_all(second_config.parent().unwrap()).unwrap();
    fs::copy(&config, &second_config).unwrap();
    let e = BrokerProcess::start(&second_config, &data_dir)
        .expect_err("a second broker started on a locked database");
    let text = format!("{e:#}");
    assert!(text.contains("exited before listening"), "{text}");
    assert!(first.is_running());
    assert!(first.terminate(Duration::from_secs(10)).unwrap().success());
}

#[test]
fn a_busy_metrics_port_ends_the_broker_before_it_says_it_listens() {
    let dir = tempfile::tempdir().unwrap();
    let (config, data_dir) = setup(dir.path());
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = fs::read_to_string(&config).unwrap().replace(
        "auditors = [\"auditor\"]",
        &format!(
            "auditors = [\"auditor\"]\nmetrics_listen = \"{}\"",
            taken.local_addr().unwrap()
        ),
    );
    fs::write(&config, text).unwrap();
    let e = BrokerProcess::start(&config, &data_dir)
        .expect_err("the broker started with its metrics port taken");
    let text = format!("{e:#}");
    assert!(
        text.contains("exited before listening") && text.contains("metrics"),
        "{text}"
    );
}
