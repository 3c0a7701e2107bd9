//! The command-line conventions an operator expects of each of the three binaries: `--version`,
//! shell completions that bash can load, and man pages that `man` renders, one per subcommand.

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
