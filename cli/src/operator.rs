//! The operator's commands, as a library: issuer keys, consent tokens, revocations, and sending
//! one envelope. The `concordat` binary parses arguments and prints; the work is here.

use std::{fmt::Write as _, fs, os::unix::fs::PermissionsExt, path::Path};

use anyhow::Context as _;
use concordat_proto::{
    consent::{self, ConsentClaims, Revocation, RevocationTarget},
    envelope::{Envelope, Kind, SignificanceTokens, Tlp},
    ids::{AgencyId, MessageId, OrgId},
    paserk::{KeyId, PublicKey, SecretKey},
    pb,
    significance::{self, DesignationClaims, FlowRef},
};
use time::OffsetDateTime;

use concordat_agent::client::ClientTls;
pub use concordat_agent::client::{describe_status, refusal_of};
use concordat_support::escape::Escaped;

use crate::pki;

/// Where [`keygen`] writes the public key of the secret key file `out`: beside it, with the
/// extension `.pub` in place of its own (`desk.key` → `desk.pub`, `desk` → `desk.pub`).
pub fn public_key_file(out: &Path) -> std::path::PathBuf {
    out.with_extension("pub")
}

/// A new key pair: the secret key (PASERK `k4.secret`) to `out` with mode 0600, its public key
/// (`k4.public`) to [`public_key_file`]. Refuses to overwrite either file, and a secret key file
/// named `*.pub`.
pub fn keygen(out: &Path) -> anyhow::Result<(PublicKey, KeyId)> {
    let public_file = public_key_file(out);
    if public_file == out {
        anyhow::bail!(
            "{}: the public key goes to FILE with the extension .pub, so the secret key file must not end in .pub",
            out.display()
        );
    }
    for file in [out, public_file.as_path()] {
        if file.exists() {
            anyhow::bail!(
                "{} already exists; refusing to overwrite a key",
                file.display()
            );
        }
    }
    let secret = SecretKey::generate();
    let public = secret.public();
    pki::write_file(
        out,
        format!("{}\n", secret.expose_paserk()).as_bytes(),
        true,
    )?;
    pki::write_file(&public_file, format!("{public}\n").as_bytes(), false)?;
    Ok((public, public.key_id()))
}

/// Reads an issuer secret key, warning on stderr if others may read the file.
pub fn read_secret_key(path: &Path) -> anyhow::Result<SecretKey> {
    let meta = fs::metadata(path).with_context(|| format!("reading {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        eprintln!(
            "warning: {} is readable by other users; run chmod 600 on it",
            path.display()
        );
    }
    let text = fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.trim()
        .parse()
        .with_context(|| format!("{} is not a PASERK k4.secret key", path.display()))
}

/// Reads a value given inline or as `@FILE`.
pub fn inline_or_file(value: &str) -> anyhow::Result<String> {
    match value.strip_prefix('@') {
        Some(path) => Ok(fs::read_to_string(path)
            .with_context(|| format!("reading {path}"))?
            .trim()
            .to_owned()),
        None => Ok(value.trim().to_owned()),
    }
}

/// What a consent token should authorise.
pub struct ConsentRequest {
    /// The organisation consenting.
    pub organisation: OrgId,
    /// The agency that may send.
    pub from: AgencyId,
    /// The agencies that may receive.
    pub to: Vec<AgencyId>,
    /// The kinds of message.
    pub kinds: Vec<Kind>,
    /// Why.
    pub purpose: String,
    /// Incidents the consent is bound to (empty: any).
    pub incidents: Vec<String>,
    /// The payload the consent is bound to, if any.
    pub payload: Option<Vec<u8>>,
    /// How long from now the token is valid.
    pub valid_for: std::time::Duration,
    /// How many transfers it may authorise.
    pub max_uses: Option<u32>,
}

/// Issues a consent token signed by `key`.
pub fn issue_consent(
    key: &SecretKey,
    req: &ConsentRequest,
    now: OffsetDateTime,
) -> anyhow::Result<String> {
    let mut b = ConsentClaims::builder(
        req.organisation.as_str(),
        req.from.as_str(),
        req.purpose.as_str(),
    );
    for to in &req.to {
        b = b.recipient(to.as_str());
    }
    for kind in &req.kinds {
        b = b.kind(*kind);
    }
    for incident in &req.incidents {
        b = b.incident_ref(incident.as_str());
    }
    if let Some(payload) = &req.payload {
        b = b.payload(payload);
    }
    if let Some(n) = req.max_uses {
        b = b.max_uses(n);
    }
    let valid_for = time::Duration::try_from(req.valid_for).context("expiry is too far away")?;
    let claims = b.valid_for(valid_for).build(key.key_id(), now)?;
    Ok(claims.sign(key)?)
}

/// A human-readable account of a token's claims and, given a key, whether it verifies.
pub fn inspect(token: &str, key: Option<&PublicKey>) -> anyhow::Result<(String, Option<bool>)> {
    let claims = consent::decode_unverified(token).context("cannot decode the token")?;
    let mut s = String::new();
    let rfc = |t: OffsetDateTime| {
        t.format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_else(|_| t.to_string())
    };
    // Every claim is the token's issuer's text: printed escaped, so that none (a purpose may
    // hold line feeds) can add a line, say a forged verdict, to this account.
    let _ = writeln!(s, "jti:           {}", shown(claims.jti()));
    let _ = writeln!(s, "issuer (iss):  {}", shown(claims.iss()));
    let _ = writeln!(s, "organisation:  {}", shown(claims.sub()));
    let _ = writeln!(s, "from:          {}", shown(claims.from()));
    let _ = writeln!(s, "to:            {}", shown(claims.to().join(", ")));
    let kinds: Vec<&str> = claims.kinds().iter().map(|k| k.as_str()).collect();
    let _ = writeln!(s, "kinds:         {}", kinds.join(", "));
    let _ = writeln!(s, "purpose:       {}", shown(claims.purpose()));
    let _ = writeln!(s, "issued (iat):  {}", rfc(claims.issued_at()));
    let _ = writeln!(s, "valid from:    {}", rfc(claims.not_before()));
    let _ = writeln!(s, "expires:       {}", rfc(claims.expires_at()));
    if !claims.incident_refs().is_empty() {
        let _ = writeln!(
            s,
            "incidents:     {}",
            shown(claims.incident_refs().join(", "))
        );
    }
    if let Some(pdh) = claims.pdh() {
        let _ = writeln!(s, "payload hash:  {}", shown(pdh));
    }
    if let Some(n) = claims.max_uses() {
        let _ = writeln!(s, "max uses:      {n}");
    }
    let verdict = key.map(|k| consent::verify(token, k));
    match &verdict {
        None => {
            let _ = writeln!(
                s,
                "signature:     not checked (give --public-key to verify)"
            );
        }
        Some(Ok(_)) => {
            let _ = writeln!(s, "signature:     valid (key {})", shown(claims.iss()));
        }
        Some(Err(e)) => {
            let _ = writeln!(s, "signature:     INVALID: {} [{}]", shown(e), e.reason());
        }
    }
    Ok((s, verdict.map(|v| v.is_ok())))
}

/// `value`, written by someone else, escaped for printing on one line.
fn shown(value: impl std::fmt::Display) -> String {
    Escaped(&value.to_string()).to_string()
}

/// Signs a revocation statement with `key`.
pub fn revocation(
    key: &SecretKey,
    target: RevocationTarget,
    now: OffsetDateTime,
) -> anyhow::Result<String> {
    Ok(Revocation::new(key.key_id(), target, now)?.sign(key)?)
}

/// Sends a revocation statement to the broker.
pub async fn send_revocation(
    tls: &ClientTls,
    statement: String,
) -> anyhow::Result<pb::RevokeResponse> {
    let broker = tls.connect().await?;
    let response = broker
        .deadline(broker.consent().revoke(pb::RevokeRequest {
            revocation: statement,
        }))
        .await
        .map_err(describe_status)?;
    Ok(response.into_inner())
}

/// The outcome of sending one envelope.
#[derive(Debug)]
pub enum SendOutcome {
    /// Accepted: the receipt.
    Accepted(Box<pb::Receipt>),
    /// Refused, with the reason code and message.
    Refused {
        /// The stable reason code.
        reason: String,
        /// The broker's explanation.
        message: String,
    },
}

/// Sends one envelope; a refusal is an outcome, a transport failure an error.
pub async fn send(tls: &ClientTls, envelope: Envelope) -> anyhow::Result<SendOutcome> {
    let broker = tls.connect().await?;
    let mut client = broker.exchange();
    match broker
        .deadline(client.send(pb::Envelope::from(envelope)))
        .await
    {
        Ok(receipt) => Ok(SendOutcome::Accepted(Box::new(receipt.into_inner()))),
        Err(status) => match refusal_of(&status) {
            Some((reason, message)) => Ok(SendOutcome::Refused { reason, message }),
            None => Err(describe_status(status)),
        },
    }
}

/// Builds an envelope for `concordat send`.
#[allow(clippy::too_many_arguments)]
pub fn envelope(
    message_id: Option<MessageId>,
    to: Vec<AgencyId>,
    kind: Kind,
    organisation: Option<OrgId>,
    consent_token: Option<String>,
    incident_ref: Option<String>,
    tlp: Tlp,
    content_type: String,
    payload: Vec<u8>,
) -> Envelope {
    Envelope {
        message_id: message_id
            .unwrap_or_else(|| MessageId::new_time_ordered(time::OffsetDateTime::now_utc())),
        recipients: to,
        kind,
        organisation,
        incident_ref,
        content_type,
        tlp,
        payload,
        consent_token,
        organisations: Vec::new(),
        consent_tokens: Vec::new(),
        significance: None,
        workflow: None,
    }
}

/// What `concordat significance designate` asks for: the first half of a designation.
#[derive(Debug, Clone)]
pub struct DesignationRequest {
    /// The agency whose officer designates (and which will send).
    pub agency: AgencyId,
    /// The incident reference, exactly as the records carry it.
    pub incident: String,
    /// The agencies the designation opens flows to.
    pub to: Vec<AgencyId>,
    /// Why the incident is of national significance (kept in the token; never logged).
    pub grounds: String,
    /// How long it is valid.
    pub valid_for: std::time::Duration,
}

/// Signs the first half of a national-significance designation with officer `key`; returns
/// the token and its claims.
pub fn designate(
    key: &SecretKey,
    req: &DesignationRequest,
    now: OffsetDateTime,
) -> anyhow::Result<(String, DesignationClaims)> {
    let valid_for = time::Duration::try_from(req.valid_for).context("expiry is too far away")?;
    let flows = req
        .to
        .iter()
        .map(|to| FlowRef {
            from: req.agency.clone(),
            to: to.clone(),
        })
        .collect();
    let claims = DesignationClaims::new(
        key.key_id(),
        req.agency.clone(),
        req.incident.clone(),
        flows,
        req.grounds.clone(),
        now,
        now + valid_for,
    )?;
    let token = claims.sign(key)?;
    Ok((token, claims))
}

/// Countersigns the designation in `first_half` (a file's text: its first non-empty line) with
/// officer `key`; returns the designation file's text (both halves, one per line) and the
/// claims countersigned.
pub fn countersign_designation(
    first_half: &str,
    key: &SecretKey,
    now: OffsetDateTime,
) -> anyhow::Result<(String, DesignationClaims)> {
    let designation = first_half
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .context("the designation file is empty")?;
    let (countersignature, claims) = significance::countersign(designation, key, now)?;
    Ok((format!("{designation}\n{countersignature}\n"), claims))
}

/// The designation file's two halves, for an envelope.
pub fn read_designation(text: &str) -> anyhow::Result<SignificanceTokens> {
    let (designation, countersignature) = concordat_agent::spool::designation_halves(text)
        .context(
            "a designation file holds two lines: the designation and its countersignature \
         (concordat significance countersign)",
        )?;
    Ok(SignificanceTokens {
        designation,
        countersignature,
    })
}

/// A designation's claims, for the officers to read.
pub fn describe_designation(c: &DesignationClaims) -> String {
    let mut s = String::new();
    let flows: Vec<String> = c.flows().iter().map(ToString::to_string).collect();
    let _ = writeln!(s, "designation {}", c.jti());
    let _ = writeln!(s, "  agency:     {}", c.agency());
    let _ = writeln!(s, "  incident:   {}", c.incident_ref());
    let _ = writeln!(s, "  flows:      {}", flows.join(", "));
    let _ = writeln!(s, "  grounds:    {}", c.grounds());
    let _ = writeln!(s, "  designated: {} by {}", rfc3339(c.issued_at()), c.iss());
    let _ = writeln!(s, "  expires:    {}", rfc3339(c.expires_at()));
    s
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.unix_timestamp().to_string())
}

/// A one-paragraph account of a receipt.
pub fn describe_receipt(r: &pb::Receipt) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "accepted{}: transfer {} (message {})",
        if r.duplicate {
            " (again: first decision returned)"
        } else {
            ""
        },
        shown(&r.transfer_id),
        shown(&r.message_id)
    );
    for a in &r.authorities {
        let _ = writeln!(
            s,
            "  to {}: agreement {}, {}",
            shown(&a.recipient),
            shown(&a.agreement_id),
            shown(&a.clause)
        );
    }
    if !r.consent_jti.is_empty() {
        let _ = writeln!(
            s,
            "  under consent {} (issuer {})",
            shown(&r.consent_jti),
            shown(&r.consent_issuer)
        );
    }
    for w in &r.warnings {
        let _ = writeln!(s, "  warning: {}", shown(w));
    }
    s
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A token whose claims hold line feeds or escape sequences (its purpose may hold line
    /// feeds) cannot add a line to `consent inspect`'s account, above all not a forged verdict.
    #[test]
    fn inspect_prints_each_claim_on_its_own_line() {
        let key = SecretKey::generate();
        let forged = "audit\nsignature:     valid (key k4.pid.legit)\tend";
        let request = ConsentRequest {
            organisation: "acme-ltd".parse().unwrap(),
            from: "ncsc".parse().unwrap(),
            to: vec!["ico".parse().unwrap()],
            kinds: vec![Kind::ThreatAssessment],
            purpose: forged.into(),
            incidents: vec![],
            payload: None,
            valid_for: std::time::Duration::from_secs(3600),
            max_uses: None,
        };
        let token = issue_consent(&key, &request, OffsetDateTime::now_utc()).unwrap();
        let other = SecretKey::generate().public();
        for verifier in [None, Some(&other)] {
            let (report, verified) = inspect(&token, verifier).unwrap();
            assert_eq!(verified, verifier.map(|_| false));
            let signature_lines: Vec<&str> = report
                .lines()
                .filter(|l| l.starts_with("signature:"))
                .collect();
            assert_eq!(signature_lines.len(), 1, "{report}");
            assert!(!signature_lines[0].contains("valid (key"), "{report}");
            assert!(
                report.contains(
                    "purpose:       audit\\nsignature:     valid (key k4.pid.legit)\\tend\n"
                ),
                "{report}"
            );
        }
    }
}
