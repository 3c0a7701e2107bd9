//! The command-line conventions an operator expects of each of the three binaries: `--version`,
//! shell completions that bash can load, man pages that `man` renders, one per subcommand, and
//! errors that name the file and the key and say the operating system's error once.

use std::process::Command;

use concordat_tests::binary;

/// (binary, a subcommand its completions and pages must know)
const BINARIES: [(&str, &str); 3] = [
    ("concordat-broker", "check-config"),
    ("concordat-agent", "run"),
    ("concordat", "significance"),
];

fn run(bin: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary(bin).unwrap())
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn every_binary_has_a_version_completions_and_man_pages() {
    for (bin, sub) in BINARIES {
        let (ok, out, err) = run(bin, &["--version"]);
        assert!(ok, "{bin} --version: {err}");
        assert_eq!(
            out.trim(),
            format!("{bin} {}", env!("CARGO_PKG_VERSION")),
            "{bin} --version"
        );

        for shell in ["bash", "zsh", "fish"] {
            let (ok, script, err) = run(bin, &["completions", shell]);
            assert!(ok, "{bin} completions {shell}: {err}");
            assert!(script.contains(sub), "{bin} {shell} completions lack {sub}");
        }
        // bash itself loads the script and registers the completion.
        if std::path::Path::new("/bin/bash").exists() {
            let (_, script, _) = run(bin, &["completions", "bash"]);
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("completion.bash");
            std::fs::write(&file, script).unwrap();
            let check = Command::new("/bin/bash")
                .arg("-c")
                .arg(format!("source {} && complete -p {bin}", file.display()))
                .output()
                .unwrap();
            assert!(
                check.status.success(),
                "{bin}: bash could not load its completions: {}",
                String::from_utf8_lossy(&check.stderr)
            );
        }

        let dir = tempfile::tempdir().unwrap();
        let out_dir = dir.path().join("man1");
        let (ok, listed, err) = run(bin, &["man", "--out-dir", out_dir.to_str().unwrap()]);
        assert!(ok, "{bin} man: {err}");
        let main_page = out_dir.join(format!("{bin}.1"));
        let sub_page = out_dir.join(format!("{bin}-{sub}.1"));
        for page in [&main_page, &sub_page] {
            assert!(page.exists(), "{bin}: no {}", page.display());
            assert!(listed.contains(&page.display().to_string()), "{listed}");
        }
        // `man -l` renders the page (where man is installed), and it names the command.
        if std::path::Path::new("/usr/bin/man").exists() {
            let rendered = Command::new("/usr/bin/man")
                .args(["-l", "-P", "cat"])
                .arg(&sub_page)
                .env("MANWIDTH", "100")
                .output()
                .unwrap();
            assert!(rendered.status.success(), "{bin}: man -l failed");
            let text = String::from_utf8_lossy(&rendered.stdout);
            assert!(
                text.contains(sub),
                "{bin}: the rendered page does not name {sub}: {text}"
            );
        } else {
            eprintln!("skipping the man rendering check: /usr/bin/man is not installed");
        }
    }
}

/// A file that names a missing file: each binary's error names the configuration file, the key
/// and the missing file, and says the operating system's error exactly once.
#[test]
fn errors_name_the_file_and_the_key_and_say_the_os_error_once() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let missing = d.join("absent");
    let agent_toml = d.join("agent.toml");
    std::fs::write(
        &agent_toml,
        format!(
            "broker = \"https://127.0.0.1:1\"\nca = \"{}/ca.pem\"\ncert = \"ico.pem\"\nkey = \"ico.key\"\nspool = \"spool\"\n",
            missing.display()
        ),
    )
    .unwrap();
    let broker_toml = d.join("broker.toml");
    std::fs::write(
        &broker_toml,
        format!(
            "listen = \"127.0.0.1:0\"\ndata_dir = \"data\"\n[tls]\ncert = \"{0}/broker.pem\"\nkey = \"{0}/broker.key\"\nclient_ca = \"{0}/ca.pem\"\n",
            missing.display()
        ),
    )
    .unwrap();
    let agent = agent_toml.display().to_string();
    let broker = broker_toml.display().to_string();
    let nowhere = d.join("nowhere.toml").display().to_string();
    let os_error = "(os error 2)";
    // (binary, arguments, what the message must name)
    let cases: [(&str, Vec<&str>, Vec<String>); 5] = [
        (
            "concordat-agent",
            vec!["run", "--config", &agent],
            vec![
                agent.clone(),
                "ca:".into(),
                format!("{}/ca.pem", missing.display()),
            ],
        ),
        (
            "concordat",
            vec!["audit", "export", "--out", "x.jsonl", "--config", &agent],
            vec![
                agent.clone(),
                "ca:".into(),
                format!("{}/ca.pem", missing.display()),
            ],
        ),
        (
            "concordat-broker",
            vec!["check-config", &broker],
            vec![
                broker.clone(),
                "tls.cert".into(),
                format!("{}/broker.pem", missing.display()),
            ],
        ),
        (
            "concordat-agent",
            vec!["run", "--config", &nowhere],
            vec![nowhere.clone()],
        ),
        (
            "concordat-broker",
            vec!["check-config", &nowhere],
            vec![nowhere.clone()],
        ),
    ];
    for (bin, args, names) in cases {
        let (ok, _, err) = run(bin, &args);
        assert!(!ok, "{bin} {args:?} succeeded");
        for name in &names {
            assert!(
                err.contains(name.as_str()),
                "{bin} {args:?}: {name:?} not in {err}"
            );
        }
        assert_eq!(
            err.matches(os_error).count(),
            1,
            "{bin} {args:?}: the OS error is said once: {err}"
        );
    }
}

/// `keygen --help` names the public key file keygen really writes, and keygen says it too; it
/// overwrites neither file and refuses a secret key file named `*.pub`.
#[test]
fn keygen_names_the_public_key_file_it_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, help, err) = run("concordat", &["keygen", "--help"]);
    assert!(ok, "{err}");
    assert!(help.contains("desk.key -> desk.pub"), "{help}");

    let secret = dir.path().join("desk.key");
    let public = dir.path().join("desk.pub");
    let (ok, out, err) = run("concordat", &["keygen", "--out", secret.to_str().unwrap()]);
    assert!(ok, "{err}");
    let written = std::fs::read_to_string(&public).unwrap();
    assert!(written.starts_with("k4.public."), "{written}");
    assert!(out.contains(public.to_str().unwrap()), "{out}");
    assert!(out.contains(written.trim()), "{out}");

    let (ok, _, err) = run("concordat", &["keygen", "--out", secret.to_str().unwrap()]);
    assert!(!ok && err.contains("already exists"), "{err}");
    std::fs::remove_file(&secret).unwrap();
    let (ok, _, err) = run("concordat", &["keygen", "--out", secret.to_str().unwrap()]);
    assert!(!ok && err.contains(public.to_str().unwrap()), "{err}");
    assert!(
        !secret.exists(),
        "nothing written when the public key file exists"
    );

    let bad = dir.path().join("other.pub");
    let (ok, _, err) = run("concordat", &["keygen", "--out", bad.to_str().unwrap()]);
    assert!(!ok && err.contains(".pub"), "{err}");
    assert!(!bad.exists());
}
