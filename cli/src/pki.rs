//! Certificates for a federation: a CA, the broker's server certificate, one client certificate
//! per agency and auditor (Common Name = id), and CRLs. Used by `concordat certs dev`, by the
//! demo and by the test harness (which also makes the bad cases: another CA, expired, revoked).
//!
//! This is development tooling: production federations run their own PKI.

use std::{
    fs,
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevocationReason, RevokedCertParams, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// Why certificates could not be made or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    /// rcgen refused the parameters or failed to sign.
    #[error("certificate generation: {0}")]
    Generate(#[from] rcgen::Error),
    /// A file could not be written.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// How long development certificates are valid: ten years, like the development CA.
pub const DEV_VALIDITY_DAYS: i64 = 3650;

/// A certificate and its private key, PEM-encoded.
#[derive(Clone)]
pub struct Issued {
    /// The certificate.
    pub cert_pem: String,
    /// The private key (PKCS#8).
    pub key_pem: String,
    /// The certificate's serial number, for revocation.
    pub serial: u64,
}

/// A certificate authority that issues the federation's certificates.
pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
    key_pem: String,
    next_serial: u64,
}

impl Ca {
    /// A new self-signed CA named `name`, valid for ten years.
    pub fn generate(name: &str) -> Result<Ca, PkiError> {
        let key = KeyPair::generate()?;
        let key_pem = key.serialize_pem();
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, name);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Concordat federation");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        params.serial_number = Some(SerialNumber::from(1u64));
        Ok(Ca {
            issuer: CertifiedIssuer::self_signed(params, key)?,
            key_pem,
            next_serial: 2,
        })
    }

    /// The CA certificate.
    pub fn cert_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA's private key.
    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    fn leaf(
        &mut self,
        cn: &str,
        sans: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        let mut subject = DistinguishedName::new();
        subject.push(DnType::CommonName, cn);
        self.leaf_with(subject, sans, usage, not_before, not_after)
    }

    fn leaf_with(
        &mut self,
        subject: DistinguishedName,
        sans: Vec<String>,
        usage: ExtendedKeyUsagePurpose,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(sans)?;
        params.distinguished_name = subject;
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        params.not_before = not_before;
        params.not_after = not_after;
        let serial = self.next_serial;
        self.next_serial += 1;
        params.serial_number = Some(SerialNumber::from(serial));
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &self.issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            serial,
        })
    }

    /// A server certificate for the broker with the given DNS names / IP addresses, valid for
    /// `days` days.
    pub fn issue_server(&mut self, sans: &[&str], days: i64) -> Result<Issued, PkiError> {
        let now = OffsetDateTime::now_utc();
        self.leaf(
            "concordat-broker",
            sans.iter().map(|s| (*s).to_owned()).collect(),
            ExtendedKeyUsagePurpose::ServerAuth,
            now - Duration::days(1),
            now + Duration::days(days),
        )
    }

    /// A client certificate whose Common Name is `cn`, valid for `days` days.
    pub fn issue_client(&mut self, cn: &str, days: i64) -> Result<Issued, PkiError> {
        let now = OffsetDateTime::now_utc();
        self.issue_client_valid(cn, now - Duration::days(1), now + Duration::days(days))
    }

    /// A client certificate whose Common Name is `cn`, valid in the given window (tests use a
    /// window in the past for an expired certificate).
    pub fn issue_client_valid(
        &mut self,
        cn: &str,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, PkiError> {
        self.leaf(
            cn,
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            not_before,
            not_after,
        )
    }

    /// A client certificate with exactly this subject, valid for `days` days. Tests use it for
    /// subjects no agency has, such as two Common Names (push a second one as
    /// `DnType::CustomDnType(vec![2, 5, 4, 3])`).
    pub fn issue_client_subject(
        &mut self,
        subject: DistinguishedName,
        days: i64,
    ) -> Result<Issued, PkiError> {
        let now = OffsetDateTime::now_utc();
        self.leaf_with(
            subject,
            Vec::new(),
            ExtendedKeyUsagePurpose::ClientAuth,
            now - Duration::days(1),
            now + Duration::days(days),
        )
    }

    /// A CRL revoking the certificates with these serial numbers, valid for 30 days.
    pub fn crl_pem(&self, revoked: &[u64]) -> Result<String, PkiError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - Duration::minutes(5),
            next_update: now + Duration::days(30),
            crl_number: SerialNumber::from(now.unix_timestamp().unsigned_abs()),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|serial| RevokedCertParams {
                    serial_number: SerialNumber::from(*serial),
                    revocation_time: now - Duration::minutes(5),
                    reason_code: Some(RevocationReason::KeyCompromise),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer)?.pem()?)
    }
}

/// Writes a development PKI to `dir`: `ca.pem`/`ca.key`, `broker.pem`/`broker.key` (SANs
/// `localhost` and `127.0.0.1`) and `<id>.pem`/`<id>.key` for every agency and auditor.
/// Everything is valid for [`DEV_VALIDITY_DAYS`] so that a committed development PKI keeps
/// working. Private keys are written with mode 0600. Returns the files written.
pub fn write_dev_pki(
    dir: &Path,
    agencies: &[String],
    auditors: &[String],
) -> Result<Vec<PathBuf>, PkiError> {
    fs::create_dir_all(dir).map_err(|source| PkiError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    let mut ca = Ca::generate("Concordat development CA")?;
    let mut written = Vec::new();
    let mut put = |name: String, text: &str, secret: bool| -> Result<(), PkiError> {
        let path = dir.join(name);
        write_file(&path, text.as_bytes(), secret)?;
        written.push(path);
        Ok(())
    };
    put("ca.pem".into(), &ca.cert_pem(), false)?;
    put("ca.key".into(), ca.key_pem(), true)?;
    let broker = ca.issue_server(&["localhost", "127.0.0.1"], DEV_VALIDITY_DAYS)?;
    put("broker.pem".into(), &broker.cert_pem, false)?;
    put("broker.key".into(), &broker.key_pem, true)?;
    for id in agencies.iter().chain(auditors) {
        let client = ca.issue_client(id, DEV_VALIDITY_DAYS)?;
        put(format!("{id}.pem"), &client.cert_pem, false)?;
        put(format!("{id}.key"), &client.key_pem, true)?;
    }
    Ok(written)
}

/// Writes `bytes` to `path`, with mode 0600 when `secret`.
pub fn write_file(path: &Path, bytes: &[u8], secret: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if secret {
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(err)?;
    file.write_all(bytes).map_err(err)?;
    file.sync_all().map_err(err)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn dev_pki_files_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        let files = write_dev_pki(
            dir.path(),
            &["ico".into(), "nca".into()],
            &["auditor".into()],
        )
        .unwrap();
        let names: Vec<String> = files
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            names,
            [
                "ca.pem",
                "ca.key",
                "broker.pem",
                "broker.key",
                "ico.pem",
                "ico.key",
                "nca.pem",
                "nca.key",
                "auditor.pem",
                "auditor.key"
            ]
        );
        for f in &files {
            let mode = fs::metadata(f).unwrap().permissions().mode() & 0o777;
            if f.extension().unwrap() == "key" {
                assert_eq!(mode, 0o600, "{}", f.display());
            }
        }
        assert!(
            fs::read_to_string(dir.path().join("ico.pem"))
                .unwrap()
                .starts_with("-----BEGIN CERTIFICATE-----")
        );
    }
}
