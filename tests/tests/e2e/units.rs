//! The systemd units in `dist/systemd/` are what `systemd-analyze verify` accepts without a
//! single warning, start the binaries this build makes with the arguments they take, and carry
//! the hardening an operator expects (a dedicated user, a read-only system, no new privileges,
//! write access to the data or spool directory only).

use std::{path::PathBuf, process::Command};

use concordat_tests::binary;

const UNITS: [(&str, &str); 2] = [
    ("concordat-broker.service", "concordat-broker"),
    ("concordat-agent.service", "concordat-agent"),
];

fn dist() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd")
}

#[test]
fn the_systemd_units_verify_and_are_hardened() {
    for (unit, bin) in UNITS {
        let text = std::fs::read_to_string(dist().join(unit)).unwrap();
        for key in [
            "User=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ReadWritePaths=/var/lib/",
            "ProtectHome=yes",
            "CapabilityBoundingSet=\n",
        ] {
            assert!(text.contains(key), "{unit} lacks {key:?}");
        }
        // The arguments of ExecStart are ones the binary accepts: ask it, with --help appended
        // to the same subcommand.
        // So are those of ExecReload, where it runs the binary (the broker's `reload`).
        let execs = text.lines().filter_map(|l| {
            l.strip_prefix("ExecStart=")
                .or_else(|| l.strip_prefix("ExecReload="))
                .filter(|e| e.starts_with(&format!("/usr/local/bin/{bin} ")))
        });
        let mut checked = 0;
        for exec in execs {
            let mut words = exec.split_whitespace();
            assert_eq!(words.next(), Some(format!("/usr/local/bin/{bin}").as_str()));
            let args: Vec<&str> = words.collect();
            let subcommand = args[0];
            let help = Command::new(binary(bin).unwrap())
                .args([subcommand, "--help"])
                .output()
                .unwrap();
            assert!(help.status.success(), "{bin} {subcommand} --help failed");
            let help = String::from_utf8_lossy(&help.stdout);
            for flag in args.iter().filter(|a| a.starts_with("--")) {
                assert!(
                    help.contains(flag),
                    "{unit}: {bin} {subcommand} takes no {flag}"
                );
            }
            checked += 1;
        }
        assert!(checked >= 1, "{unit} has no ExecStart running {bin}");
        if bin == "concordat-broker" {
            assert!(
                text.contains("ExecReload=/usr/local/bin/concordat-broker reload "),
                "{unit}: systemctl reload does not run concordat-broker reload"
            );
        }

        if !std::path::Path::new("/usr/bin/systemd-analyze").exists() {
            eprintln!("SKIPPED systemd-analyze verify of {unit}: systemd-analyze is not installed");
            continue;
        }
        // systemd-analyze checks that ExecStart's program exists: point it at this build's.
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join(unit);
        let built = binary(bin).unwrap();
        std::fs::write(
            &copy,
            text.replace(&format!("/usr/local/bin/{bin}"), built.to_str().unwrap()),
        )
        .unwrap();
        let out = Command::new("/usr/bin/systemd-analyze")
            .arg("verify")
            .arg(&copy)
            .output()
            .unwrap();
        let said = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{unit}: {said}");
        // Unknown keys and bad values are only warnings: there must be none.
        assert!(
            said.trim().is_empty(),
            "{unit}: systemd-analyze said: {said}"
        );
    }
}
