//! Who is calling: the agency (or auditor) named by the client certificate, never by a message.
//!
//! [`Authenticator`] matches the Common Name of the [`crate::tls::PeerIdentity`] that the TLS accept loop
//! attached to the connection against the federation. [`crate::gate`] runs it in front of every
//! Concordat service and puts the resulting [`Call`] (the [`Caller`], the certificate, the RPC) in
//! the request's extensions; any other certificate is refused with `UNAUTHENTICATED` and logged,
//! in the audit log too. [`Certificate`] is what the log records of a certificate: its subject and
//! SHA-256 fingerprint.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use concordat_proto::ids::AgencyId;
use sha2::{Digest, Sha256};
use tonic::{Request, Status};

use crate::{
    config::Agency,
    refusal::{Reason, Refusal},
};

/// The longest certificate subject recorded, in characters; longer ones are cut and end in `…`.
pub const MAX_SUBJECT_CHARS: usize = 512;

/// What the broker records of a client certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Certificate {
    /// The Subject as an RFC 4514 string (`CN=ico,O=…`), at most [`MAX_SUBJECT_CHARS`].
    pub subject: String,
    /// SHA-256 of the certificate's DER encoding.
    pub sha256: [u8; 32],
}

impl Certificate {
    /// The subject and fingerprint of a DER certificate. A certificate whose subject does not
    /// parse (the TLS verifier accepted it, so this should not happen) gets an empty subject.
    pub fn from_der(der: &[u8]) -> Certificate {
        let subject = x509_parser::parse_x509_certificate(der)
            .map(|(_, cert)| rfc4514(cert.subject()))
            .unwrap_or_default();
        Certificate {
            subject,
            sha256: Sha256::digest(der).into(),
        }
    }

    /// The fingerprint in lowercase hex.
    pub fn sha256_hex(&self) -> String {
        hex::encode(self.sha256)
    }
}

/// A distinguished name as an RFC 4514 string: the last RDN first, attributes of one RDN joined
/// by `+`, well-known attribute types by their short names (others as dotted OIDs), and the
/// special characters escaped. A value that is not a string is written as `#` and the hex of its
/// content octets. Cut to [`MAX_SUBJECT_CHARS`].
fn rfc4514(name: &x509_parser::x509::X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|attr| {
                    let oid = attr.attr_type().to_id_string();
                    let ty = match oid.as_str() {
                        "2.5.4.3" => "CN",
                        "2.5.4.6" => "C",
                        "2.5.4.7" => "L",
                        "2.5.4.8" => "ST",
                        "2.5.4.9" => "STREET",
                        "2.5.4.10" => "O",
                        "2.5.4.11" => "OU",
                        "0.9.2342.19200300.100.1.25" => "DC",
                        "0.9.2342.19200300.100.1.1" => "UID",
                        other => other,
                    };
                    let value = match attr.as_str() {
                        Ok(s) => escape_value(s),
                        Err(_) => format!("#{}", hex::encode(attr.as_slice())),
                    };
                    format!("{ty}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    let full = rdns.into_iter().rev().collect::<Vec<_>>().join(",");
    if full.chars().count() <= MAX_SUBJECT_CHARS {
        full
    } else {
        let mut cut: String = full.chars().take(MAX_SUBJECT_CHARS - 1).collect();
        cut.push('…');
        cut
    }
}

/// Escapes an attribute value as RFC 4514 §2.4 asks.
fn escape_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    let _ = write!(out, "\\{b:02x}");
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// An agency of the federation.
    Agency(AgencyId),
    /// An auditor: may read the audit log, may not send.
    Auditor(AgencyId),
}

impl Caller {
    /// The caller's id (its certificate's Common Name).
    pub fn id(&self) -> &AgencyId {
        match self {
            Caller::Agency(id) | Caller::Auditor(id) => id,
        }
    }

    /// The caller's agency id, or a refusal if it is an auditor.
    pub fn agency(&self) -> Result<&AgencyId, Refusal> {
        match self {
            Caller::Agency(id) => Ok(id),
            Caller::Auditor(id) => Err(Refusal::new(
                Reason::NotAuthorised,
                format!("{id} is an auditor certificate; only agencies may use this service"),
            )),
        }
    }
}

/// Matches certificates against the federation's agencies and auditors.
#[derive(Clone)]
pub struct Authenticator {
    agencies: Arc<BTreeMap<AgencyId, Agency>>,
    auditors: Arc<BTreeSet<AgencyId>>,
}

impl Authenticator {
    /// An authenticator for the given federation.
    pub fn new(agencies: BTreeMap<AgencyId, Agency>, auditors: BTreeSet<AgencyId>) -> Self {
        Authenticator {
            agencies: Arc::new(agencies),
            auditors: Arc::new(auditors),
        }
    }

    /// Matches a certificate Common Name against the federation.
    pub fn identify(&self, common_name: Option<&str>) -> Result<Caller, Refusal> {
        let Some(cn) = common_name else {
            return Err(Refusal::new(
                Reason::Unauthenticated,
                "the client certificate has no single Subject Common Name",
            ));
        };
        let unknown = || {
            Refusal::new(
                Reason::UnknownAgency,
                format!(
                    "certificate Common Name {:?} is not an agency or auditor of this federation",
                    cn.chars().take(64).collect::<String>()
                ),
            )
        };
        let id: AgencyId = cn.parse().map_err(|_| unknown())?;
        if self.agencies.contains_key(&id) {
            Ok(Caller::Agency(id))
        } else if self.auditors.contains(&id) {
            Ok(Caller::Auditor(id))
        } else {
            Err(unknown())
        }
    }

    /// The display name of an agency.
    pub fn display_name(&self, id: &AgencyId) -> Option<&str> {
        self.agencies.get(id).map(|a| a.name.as_str())
    }
}

/// An authenticated call, as the gate attaches it to a request.
#[derive(Debug, Clone)]
pub struct Call {
    /// Who is calling.
    pub caller: Caller,
    /// The RPC, e.g. `Exchange.Send`.
    pub rpc: &'static str,
    /// The connection's certificate.
    pub certificate: Option<Arc<Certificate>>,
    /// Set once a handler has taken the call: what the gate sees answered before then came
    /// from the transport (a body that does not decode, one too large).
    pub(crate) reached: Arc<AtomicBool>,
}

impl Call {
    /// A call by `caller` of `rpc` over a connection with `certificate`.
    pub fn new(caller: Caller, rpc: &'static str, certificate: Option<Arc<Certificate>>) -> Call {
        Call {
            caller,
            rpc,
            certificate,
            reached: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether a handler has taken the call.
    pub fn reached(&self) -> bool {
        self.reached.load(Ordering::Relaxed)
    }
}

/// The call that the gate attached to a request, marked as taken by its handler.
pub fn call<T>(request: &Request<T>) -> Result<Call, Status> {
    let call = request.extensions().get::<Call>().cloned().ok_or_else(|| {
        // Every service is behind the gate; reaching this is a wiring bug.
        tracing::error!("request reached a service without an authenticated caller");
        Status::internal("internal error")
    })?;
    call.reached.store(true, Ordering::Relaxed);
    Ok(call)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn auth() -> Authenticator {
        let mut agencies = BTreeMap::new();
        agencies.insert("ico".parse().unwrap(), Agency { name: "ICO".into() });
        let auditors = ["auditor".parse().unwrap()].into_iter().collect();
        Authenticator::new(agencies, auditors)
    }

    #[test]
    fn common_names_map_to_callers() {
        let a = auth();
        let cases: &[(Option<&str>, Result<&str, Reason>)] = &[
            (Some("ico"), Ok("agency ico")),
            (Some("auditor"), Ok("auditor auditor")),
            (Some("nca"), Err(Reason::UnknownAgency)),
            (Some("ICO"), Err(Reason::UnknownAgency)),
            (Some(""), Err(Reason::UnknownAgency)),
            (None, Err(Reason::Unauthenticated)),
        ];
        for (cn, expected) in cases {
            let got = a.identify(*cn).map_err(|r| r.reason);
            let got = got.map(|c| match c {
                Caller::Agency(id) => format!("agency {id}"),
                Caller::Auditor(id) => format!("auditor {id}"),
            });
            assert_eq!(
                got.as_deref().map_err(|r| *r),
                expected.as_ref().map(|s| *s).map_err(|r| *r),
                "cn {cn:?}"
            );
        }
    }

    #[test]
    fn subjects_are_rfc4514_strings() {
        use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair};
        let der = |attrs: &[(DnType, &str)]| {
            let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
            let mut dn = DistinguishedName::new();
            for (ty, value) in attrs {
                dn.push(ty.clone(), *value);
            }
            params.distinguished_name = dn;
            let key = KeyPair::generate().unwrap();
            params.self_signed(&key).unwrap().der().to_vec()
        };
        let second_cn = DnType::CustomDnType(vec![2, 5, 4, 3]);
        let long = "x".repeat(600);
        let cases: &[(&[(DnType, &str)], &str)] = &[
            (&[(DnType::CommonName, "mi6")], "CN=mi6"),
            (
                &[
                    (DnType::CountryName, "GB"),
                    (DnType::OrganizationName, "Acme, Ltd"),
                    (DnType::CommonName, "ico"),
                ],
                "CN=ico,O=Acme\\, Ltd,C=GB",
            ),
            (
                &[(DnType::CommonName, "ico"), (second_cn, "ncsc")],
                "CN=ncsc,CN=ico",
            ),
            (&[(DnType::CommonName, " #a+b ")], "CN=\\ #a\\+b\\ "),
            (&[(DnType::CommonName, "#x")], "CN=\\#x"),
            (&[], ""),
        ];
        for (attrs, expected) in cases {
            let cert = der(attrs);
            let got = Certificate::from_der(&cert);
            assert_eq!(got.subject, *expected);
            assert_eq!(got.sha256, <[u8; 32]>::from(Sha256::digest(&cert)));
        }
        let got = Certificate::from_der(&der(&[(DnType::CommonName, long.as_str())]));
        assert_eq!(got.subject.chars().count(), MAX_SUBJECT_CHARS);
        assert!(got.subject.starts_with("CN=xxx") && got.subject.ends_with('…'));
        assert_eq!(Certificate::from_der(b"not a certificate").subject, "");
    }

    #[test]
    fn auditors_may_not_act_as_agencies() {
        let caller = Caller::Auditor("auditor".parse().unwrap());
        assert_eq!(caller.agency().unwrap_err().reason, Reason::NotAuthorised);
    }
}
