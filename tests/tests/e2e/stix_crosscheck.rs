//! Cross-check: every bundle of `broker/testdata/stix/` gets the same verdict from the broker as from
//! the OASIS `stix2-validator`, but for the differences listed, with their reasons, in
//! `broker/testdata/stix/oasis-differences.txt` (and explained in `docs/stix.md`).
//!
//! The validator is installed by this test into a virtual environment under the workspace's
//! `target/` (reused by later runs). Without `python3` or PyPI, the test says SKIPPED and why,
//! and passes, unless `CONCORDAT_STIX_CROSSCHECK_REQUIRED` is set (as `.ci/run` does).

use std::{collections::BTreeMap, path::PathBuf, process::Command};

use concordat_broker::content::{Content, ContentKind};

/// The validator's version, pinned so that verdicts do not move under the test.
const VALIDATOR: &str = "stix2-validator==3.3.2";

/// Prints, for each file given, its name, `valid` or `invalid`, and the first errors.
const CHECK_PY: &str = r#"
import os, sys
from stix2validator import validate_file, ValidationOptions
opts = ValidationOptions(version="2.1")
for path in sys.argv[1:]:
    try:
        r = validate_file(path, opts)
        ok = r.is_valid
        why = "; ".join(str(e) for o in (r.object_results or []) for e in o.errors)
    except Exception as e:  # the validator raises on some malformed bundles
        ok, why = False, "exception: %s" % e
    print(os.path.basename(path), "valid" if ok else "invalid", why.replace("\n", " ")[:300], sep="\t")
"#;

fn corpus_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../broker/testdata/stix")
}

/// A Python with the validator, installing it if needed; `Err` says why not.
fn validator_python() -> Result<PathBuf, String> {
    concordat_tests::python_venv("stix2-validator-venv", "stix2validator", VALIDATOR)
}

#[test]
fn the_broker_and_the_oasis_validator_agree_on_the_corpus() {
    let python = match validator_python() {
        Ok(p) => p,
        Err(why) if std::env::var_os("CONCORDAT_STIX_CROSSCHECK_REQUIRED").is_some() => {
            panic!("the OASIS stix2-validator is required (CI) but not available: {why}")
        }
        Err(why) => {
            eprintln!("SKIPPED: the OASIS stix2-validator is not available: {why}");
            return;
        }
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(corpus_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 40, "the corpus has {} bundles", files.len());

    let script = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(script.path(), CHECK_PY).unwrap();
    // Isolated (`-I`): the script's directory (the system's temporary one) is not put on the
    // module path, so no stray `*.py` there can shadow the validator's imports.
    let out = Command::new(&python)
        .arg("-I")
        .arg(script.path())
        .args(&files)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the validator failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let oasis: BTreeMap<String, (bool, String)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut f = l.splitn(3, '\t');
            let file = f.next().unwrap().to_owned();
            let valid = f.next().unwrap() == "valid";
            (file, (valid, f.next().unwrap_or("").to_owned()))
        })
        .collect();

    let listed: BTreeMap<String, String> =
        std::fs::read_to_string(corpus_dir().join("oasis-differences.txt"))
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let (file, why) = l.split_once(char::is_whitespace).unwrap();
                (file.to_owned(), why.trim().to_owned())
            })
            .collect();

    let mut agree = 0;
    let mut problems = Vec::new();
    for path in &files {
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        let bytes = std::fs::read(path).unwrap();
        let broker = Content::read(ContentKind::Stix21, &bytes);
        let (oasis_valid, oasis_why) = oasis
            .get(&file)
            .unwrap_or_else(|| panic!("the validator said nothing about {file}"));
        let same = broker.is_ok() == *oasis_valid;
        match (same, listed.get(&file)) {
            (true, None) => agree += 1,
            (true, Some(_)) => problems.push(format!(
                "{file}: listed as a difference, but both now say {}",
                if *oasis_valid { "valid" } else { "invalid" }
            )),
            (false, Some(why)) => eprintln!("known difference, {file}: {why}"),
            (false, None) => problems.push(format!(
                "{file}: broker says {}, validator says {} ({oasis_why})",
                match &broker {
                    Ok(_) => "valid".to_owned(),
                    Err(e) => format!("invalid: {e}"),
                },
                if *oasis_valid { "valid" } else { "invalid" }
            )),
        }
    }
    eprintln!(
        "{agree} of {} bundles get the same verdict; {} known differences",
        files.len(),
        files.len() - agree - problems.len()
    );
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
