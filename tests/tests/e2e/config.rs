//! Configuration errors name the file and the key, through the real binary.

use std::process::Command;

#[test]
fn check_config_names_the_bad_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broker.toml");
    std::fs::write(
        &path,
        r#"listen = "127.0.0.1:7443"
data_dir = "data"
[tls]
cert = "broker.pem"
key = "broker.key"
client_ca = "ca.pem"
[limits]
max_message_bytes = 0
[[agencies]]
id = "ico"
name = "ICO"
"#,
    )
    .unwrap();
    let mut pki = concordat_tests::TestPki::new().unwrap();
    let _ = pki.client_cert("ico").unwrap();
    std::fs::write(dir.path().join("broker.pem"), &pki.broker.cert_pem).unwrap();
    std::fs::write(dir.path().join("broker.key"), &pki.broker.key_pem).unwrap();
    std::fs::write(dir.path().join("ca.pem"), pki.ca_pem()).unwrap();

    let out = Command::new(concordat_tests::binary("concordat-broker").unwrap())
        .args(["check-config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains(&format!(
            "{}: limits.max_message_bytes: must be between",
            path.display()
        )),
        "stderr: {stderr}"
    );

    // Fixed, the same file passes and the summary lists the agency.
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("max_message_bytes = 0", "max_message_bytes = 1024");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(concordat_tests::binary("concordat-broker").unwrap())
        .args(["check-config"])
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("ico"), "{stdout}");
    assert!(stdout.trim_end().ends_with("ok"), "{stdout}");
}
