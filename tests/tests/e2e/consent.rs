//! The decision path over real mTLS: one row per rule, each with its reason code; what an
//! accepted transfer cites; idempotent retries; revocation and recall; tokens made by another
//! PASETO implementation; and random corruptions of a token on the wire.
//!
//! Every test starts its own brokers with the federation of [`federation`]: agreements in force,
//! overdue and not yet signed, and consent issuers of each sort (an agency's desk, an
//! organisation's own key), plus a key the broker does not trust.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::Path,
    time::Duration as StdDuration,
};

use concordat_agent::client::Broker;
use concordat_broker::{
    config::Config,
    policy::{Agreement, ConsentIssuer, Flow, Organisations, Policy},
    refusal::reason_of,
};
use concordat_proto::{
    consent::{
        self, CONSENT_TYP, ConsentBuilder, ConsentClaims, ConsentError, Revocation,
        RevocationTarget,
    },
    envelope::Kind,
    ids::MessageId,
    paserk::SecretKey,
    paseto, pb,
};
use concordat_tests::{BrokerHandle, TestPki, federation_config, spawn_broker};
use time::{Duration, OffsetDateTime};
use tonic::{Code, Status};

/// The organisation the baseline envelope is about.
const ORG: &str = "acme-ltd";
/// Another organisation, which the organisation-held key may not speak for.
const OTHER_ORG: &str = "beta-plc";
/// The baseline incident reference.
const INCIDENT: &str = "INC-1";
/// The baseline payload, bound to the baseline token by `pdh`.
const PAYLOAD: &[u8] = br#"{"summary":"ransomware on the file servers","hosts":12}"#;
/// The agreement between the ICO and the NCSC: in force, review due next year.
const MOU_ICO_NCSC: &str = "mou-ico-ncsc-2024";
/// The agreement between the ICO and the NCA: in force, but its review is overdue.
const MOU_ICO_NCA: &str = "mou-ico-nca-2019";
/// The agreement between the NCSC and the NCA: in force.
const MOU_NCSC_NCA: &str = "mou-ncsc-nca-2023";
/// A draft between the NCA and the NCSC that is only signed next month.
const MOU_DRAFT: &str = "mou-nca-ncsc-draft";
/// The queue depth of the strict broker, where the queue-full rule is tested.
const SMALL_QUEUE: u64 = 2;
/// How long a test waits for one delivery before failing rather than hanging.
const DELIVERY_TIMEOUT: StdDuration = StdDuration::from_secs(10);

/// The consent keys of one test.
struct Keys {
    /// The NCSC's consent desk: authorises transfers from `ncsc` for any organisation.
    desk: SecretKey,
    /// The NCA's consent desk: authorises transfers from `nca` only.
    nca_desk: SecretKey,
    /// `acme-ltd`'s own key: authorises any sender, for `acme-ltd` only.
    org: SecretKey,
    /// A key the broker does not trust.
    untrusted: SecretKey,
}

impl Keys {
    fn generate() -> Self {
        Keys {
            desk: SecretKey::generate(),
            nca_desk: SecretKey::generate(),
            org: SecretKey::generate(),
            untrusted: SecretKey::generate(),
        }
    }
}

/// The agreements and trusted issuers of the test federation.
fn policy(keys: &Keys, enforce_review: bool) -> Policy {
    let today = OffsetDateTime::now_utc().date();
    let days = Duration::days;
    let flow = |from: &str, to: &str, kinds: &[Kind], clause: &str| Flow {
        from: from.parse().unwrap(),
        to: to.parse().unwrap(),
        kinds: kinds.iter().copied().collect(),
        clause: clause.into(),
        opaque: false,
        max_tlp: None,
        legal_bases: Default::default(),
        consent_refusal_note: None,
    };
    let parties = |a: &str, b: &str| -> BTreeSet<_> {
        [a.parse().unwrap(), b.parse().unwrap()]
            .into_iter()
            .collect()
    };
    let agreements = vec![
        Agreement {
            id: MOU_ICO_NCSC.into(),
            title: "ICO and NCSC memorandum of understanding".into(),
            parties: parties("ico", "ncsc"),
            signed: today - days(400),
            review_by: today + days(365),
            review: Default::default(),
            flows: vec![
                flow(
                    "ncsc",
                    "ico",
                    &[Kind::IncidentRecord, Kind::ThreatAssessment],
                    "4.2",
                ),
                flow("ico", "ncsc", &[Kind::DsarConsultation], "5.1"),
            ],
        },
        Agreement {
            id: MOU_ICO_NCA.into(),
            title: "ICO and NCA memorandum of understanding".into(),
            parties: parties("ico", "nca"),
            signed: today - days(2000),
            // Past its review date and its 90-day grace period: lapsed.
            review_by: today - days(120),
            review: Default::default(),
            flows: vec![flow("nca", "ico", &[Kind::IncidentRecord], "3.1")],
        },
        Agreement {
            id: MOU_NCSC_NCA.into(),
            title: "NCSC and NCA memorandum of understanding".into(),
            parties: parties("ncsc", "nca"),
            signed: today - days(100),
            review_by: today + days(200),
            review: Default::default(),
            flows: vec![flow("ncsc", "nca", &[Kind::IncidentRecord], "2.1")],
        },
        Agreement {
            id: MOU_DRAFT.into(),
            title: "NCA and NCSC draft, not yet signed".into(),
            parties: parties("ncsc", "nca"),
            signed: today + days(30),
            review_by: today + days(400),
            review: Default::default(),
            flows: vec![flow("nca", "ncsc", &[Kind::ThreatAssessment], "1.1")],
        },
    ];
    let issuer = |key: &SecretKey, agency: Option<&str>, orgs: Organisations| {
        (
            key.key_id(),
            ConsentIssuer {
                key: key.public(),
                agency: agency.map(|a| a.parse().unwrap()),
                organisations: orgs,
            },
        )
    };
    let only_org = Organisations::Only([ORG.parse().unwrap()].into_iter().collect());
    Policy {
        agreements,
        issuers: HashMap::from([
            issuer(&keys.desk, Some("ncsc"), Organisations::Any),
            issuer(&keys.nca_desk, Some("nca"), Organisations::Any),
            issuer(&keys.org, None, only_org),
        ]),
        clock_skew: Duration::seconds(60),
        enforce_review,
        ..Policy::default()
    }
}

/// The test federation's broker configuration, data in `dir`.
fn federation(pki: &TestPki, dir: &Path, keys: &Keys, enforce_review: bool) -> Config {
    let mut config = federation_config(pki, dir, None).unwrap();
    config.policy = Policy {
        agencies: config.policy.agencies.clone(),
        ..policy(keys, enforce_review)
    };
    config
}

/// A running broker and a connection per caller, made on first use.
struct Site {
    broker: BrokerHandle,
    clients: HashMap<String, Broker>,
}

impl Site {
    async fn start(config: Config) -> Self {
        Site {
            broker: spawn_broker(config).await.unwrap(),
            clients: HashMap::new(),
        }
    }

    async fn client(&mut self, pki: &mut TestPki, cn: &str) -> Broker {
        if let Some(client) = self.clients.get(cn) {
            return client.clone();
        }
        let client = pki.connect(self.broker.addr, cn).await.unwrap();
        self.clients.insert(cn.to_owned(), client.clone());
        client
    }
}

/// The baseline claims: `sub` consents to `from` sending the baseline incident record to `ico`,
/// bound to the incident and the payload, valid for an hour.
fn claims(sub: &str, from: &str) -> ConsentBuilder {
    ConsentClaims::builder(sub, from, "Joint response to the ransomware incident INC-1")
        .recipient("ico")
        .kind(Kind::IncidentRecord)
        .incident_ref(INCIDENT)
        .payload(PAYLOAD)
        .valid_for(Duration::hours(1))
}

/// Signs `builder` with `key`, issued now.
fn sign(key: &SecretKey, builder: ConsentBuilder) -> String {
    sign_at(key, builder, OffsetDateTime::now_utc())
}

/// Signs `builder` with `key`, issued at `iat`.
fn sign_at(key: &SecretKey, builder: ConsentBuilder, iat: OffsetDateTime) -> String {
    builder.build(key.key_id(), iat).unwrap().sign(key).unwrap()
}

/// The baseline token from the NCSC desk.
fn baseline_token(keys: &Keys) -> String {
    sign(&keys.desk, claims(ORG, "ncsc"))
}

/// The baseline envelope (ncsc → ico, an incident record about `acme-ltd`), with a fresh id.
fn envelope(token: String) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        recipients: vec!["ico".into()],
        kind: pb::MessageKind::IncidentRecord as i32,
        organisation: ORG.into(),
        incident_ref: INCIDENT.into(),
        content_type: "application/json".into(),
        tlp: pb::Tlp::Amber as i32,
        payload: PAYLOAD.to_vec(),
        consent_token: token,
        ..Default::default()
    }
}

/// An anonymised threat assessment or record: no organisation, so no token.
fn anonymised(recipient: &str, kind: pb::MessageKind) -> pb::Envelope {
    pb::Envelope {
        recipients: vec![recipient.into()],
        kind: kind as i32,
        organisation: String::new(),
        incident_ref: String::new(),
        payload: br#"{"summary":"aggregate: 14 ransomware incidents this week"}"#.to_vec(),
        consent_token: String::new(),
        ..envelope(String::new())
    }
}

/// The same envelope under a new message id.
fn with_new_id(e: &pb::Envelope) -> pb::Envelope {
    pb::Envelope {
        message_id: MessageId::new_random().to_string(),
        ..e.clone()
    }
}

async fn send(client: &Broker, e: pb::Envelope) -> Result<pb::Receipt, Status> {
    client
        .exchange()
        .send(e)
        .await
        .map(tonic::Response::into_inner)
}

async fn accepted(client: &Broker, e: pb::Envelope) -> pb::Receipt {
    match send(client, e).await {
        Ok(receipt) => receipt,
        Err(status) => panic!(
            "expected acceptance, got {:?} {:?}: {}",
            status.code(),
            reason_of(&status),
            status.message()
        ),
    }
}

/// Sends `e` and returns the refusal's gRPC code and reason, failing if it was accepted.
async fn refused(client: &Broker, e: pb::Envelope) -> (Code, String) {
    match send(client, e).await {
        Ok(receipt) => panic!("expected a refusal, got receipt {receipt:?}"),
        Err(status) => (
            status.code(),
            reason_of(&status).unwrap_or_else(|| {
                panic!(
                    "refusal without a concordat ErrorInfo: {:?} {}",
                    status.code(),
                    status.message()
                )
            }),
        ),
    }
}

/// Revokes with the signed statement `revocation`, as `client`.
async fn revoke(client: &Broker, revocation: String) -> Result<pb::RevokeResponse, Status> {
    client
        .consent()
        .revoke(pb::RevokeRequest { revocation })
        .await
        .map(tonic::Response::into_inner)
}

/// A revocation of the token `token` by `key`.
fn revocation_of(key: &SecretKey, token: &str) -> String {
    let jti = consent::verify(token, &key.public()).unwrap().jti();
    Revocation::new(
        key.key_id(),
        RevocationTarget::Token(jti),
        OffsetDateTime::now_utc(),
    )
    .unwrap()
    .sign(key)
    .unwrap()
}

/// Signs `claims_json` as a consent token with `key`'s footer, bypassing the claim rules of the
/// builder: how a careless or hostile issuer could make a token.
fn sign_raw(key: &SecretKey, claims_json: &str) -> String {
    let footer = format!(r#"{{"kid":"{}"}}"#, key.key_id());
    paseto::sign(
        key.signing_key(),
        claims_json.as_bytes(),
        footer.as_bytes(),
        CONSENT_TYP.as_bytes(),
    )
}

/// The claims JSON of a token, as its issuer wrote it.
fn claims_json(token: &str) -> String {
    String::from_utf8(paseto::message_unverified(token).unwrap()).unwrap()
}

/// `token` with one character of its signature changed, still valid base64url.
fn flip_signature_char(token: &str) -> String {
    let (body, footer) = token.rsplit_once('.').unwrap();
    // The last 86 characters of the body encode the 64-byte signature; this one lies well inside
    // it and carries six data bits, so the change is canonical base64url.
    let at = body.len() - 20;
    let mut chars: Vec<char> = body.chars().collect();
    chars[at] = if chars[at] == 'A' { 'B' } else { 'A' };
    format!("{}.{footer}", chars.into_iter().collect::<String>())
}

/// An asynchronous precondition of a row, run just before its send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Setup {
    /// Nothing: the row's envelope is sent as it is.
    None,
    /// The issuer revokes the row's token through `Consent.Revoke`.
    RevokeToken,
    /// The row's envelope is first sent (and accepted) under another message id.
    SpendOnce,
    /// The baseline envelope is first sent (and accepted) under the row's message id.
    SendBaselineWithSameId,
    /// The recipient's queue is filled to the strict broker's limit with accepted sends.
    FillQueue,
}

/// Which broker a row is sent to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// `enforce_review = false`, default limits but a small payload limit.
    Lenient,
    /// `enforce_review = true`, and a queue of [`SMALL_QUEUE`] items per recipient.
    Strict,
}

/// One rule: a change to the valid baseline, and the exact refusal it must cause.
struct Row {
    name: &'static str,
    target: Target,
    sender: &'static str,
    setup: Setup,
    mutate: fn(&Keys, &mut pb::Envelope),
    reason: &'static str,
    code: Code,
}

const fn row(
    name: &'static str,
    mutate: fn(&Keys, &mut pb::Envelope),
    reason: &'static str,
    code: Code,
) -> Row {
    Row {
        name,
        target: Target::Lenient,
        sender: "ncsc",
        setup: Setup::None,
        mutate,
        reason,
        code,
    }
}

impl Row {
    const fn on(mut self, target: Target) -> Self {
        self.target = target;
        self
    }
    const fn from(mut self, sender: &'static str) -> Self {
        self.sender = sender;
        self
    }
    const fn after(mut self, setup: Setup) -> Self {
        self.setup = setup;
        self
    }
}

/// The payload limit of the lenient broker.
const MAX_PAYLOAD: usize = 16 * 1024;

fn rows() -> Vec<Row> {
    use Code::{InvalidArgument as Invalid, PermissionDenied as Denied};
    vec![
        // The caller and the envelope's shape.
        row(
            "an auditor cannot send",
            |_, _| {},
            "NOT_AUTHORISED",
            Denied,
        )
        .from("auditor"),
        row(
            "message id is not a UUID",
            |_, e| e.message_id = "not-a-uuid".into(),
            "MALFORMED",
            Invalid,
        ),
        row(
            "TLP not set",
            |_, e| e.tlp = pb::Tlp::Unspecified as i32,
            "MALFORMED",
            Invalid,
        ),
        row(
            "payload over the limit",
            |_, e| e.payload = vec![b'x'; MAX_PAYLOAD + 1],
            "PAYLOAD_TOO_LARGE",
            Invalid,
        ),
        // Recipients and agreements.
        row(
            "recipient is not an agency",
            |_, e| e.recipients = vec!["fca".into()],
            "UNKNOWN_RECIPIENT",
            Denied,
        ),
        row(
            "agreement does not cover the kind",
            |_, e| e.kind = pb::MessageKind::DsarConsultation as i32,
            "NO_AGREEMENT",
            Denied,
        ),
        row(
            "no flow in this direction",
            |_, e| *e = anonymised("ncsc", pb::MessageKind::IncidentRecord),
            "NO_AGREEMENT",
            Denied,
        )
        .from("ico"),
        row(
            "the only agreement is not signed yet",
            |_, e| *e = anonymised("ncsc", pb::MessageKind::ThreatAssessment),
            "NO_AGREEMENT",
            Denied,
        )
        .from("nca"),
        row(
            "the only agreement is overdue for review, and reviews are enforced",
            |_, e| *e = anonymised("ico", pb::MessageKind::IncidentRecord),
            "AGREEMENT_REVIEW_OVERDUE",
            Denied,
        )
        .from("nca")
        .on(Target::Strict),
        row(
            "recipient's queue is full",
            |_, _| {},
            "RECIPIENT_QUEUE_FULL",
            Code::ResourceExhausted,
        )
        .on(Target::Strict)
        .after(Setup::FillQueue),
        // The token's form and signature.
        row(
            "organisation-specific without a token",
            |_, e| e.consent_token.clear(),
            "CONSENT_MISSING",
            Denied,
        ),
        row(
            "token longer than 8192 bytes",
            |_, e| e.consent_token = format!("v4.public.{}", "A".repeat(8990)),
            "CONSENT_TOO_LONG",
            Invalid,
        ),
        row(
            "v4.local token",
            |_, e| e.consent_token = e.consent_token.replacen("v4.public.", "v4.local.", 1),
            "CONSENT_UNSUPPORTED_VERSION",
            Invalid,
        ),
        row(
            "v3.public token",
            |_, e| e.consent_token = e.consent_token.replacen("v4.public.", "v3.public.", 1),
            "CONSENT_UNSUPPORTED_VERSION",
            Invalid,
        ),
        row(
            "token without a footer",
            |_, e| e.consent_token = e.consent_token.rsplit_once('.').unwrap().0.to_owned(),
            "CONSENT_MALFORMED",
            Invalid,
        ),
        row(
            "token body is not base64url",
            |_, e| e.consent_token = e.consent_token.replacen("v4.public.", "v4.public.*", 1),
            "CONSENT_MALFORMED",
            Invalid,
        ),
        row(
            "signed claims are not JSON",
            |k, e| e.consent_token = sign_raw(&k.desk, "{\"typ\":"),
            "CONSENT_MALFORMED",
            Invalid,
        ),
        row(
            "one character of the signature changed",
            |k, e| {
                let flipped = flip_signature_char(&e.consent_token);
                assert_eq!(
                    consent::verify(&flipped, &k.desk.public()),
                    Err(ConsentError::BadSignature)
                );
                e.consent_token = flipped;
            },
            "CONSENT_BAD_SIGNATURE",
            Denied,
        ),
        row(
            "a revocation statement presented as consent",
            |k, e| e.consent_token = revocation_of(&k.desk, &e.consent_token),
            "CONSENT_BAD_SIGNATURE",
            Denied,
        ),
        row(
            "signed by a key the broker does not trust",
            |k, e| e.consent_token = sign(&k.untrusted, claims(ORG, "ncsc")),
            "CONSENT_UNKNOWN_ISSUER",
            Denied,
        ),
        row(
            "iss claim names another key than the footer",
            |k, e| {
                let json = claims_json(&e.consent_token).replace(
                    &k.desk.key_id().to_string(),
                    &k.nca_desk.key_id().to_string(),
                );
                e.consent_token = sign_raw(&k.desk, &json);
            },
            "CONSENT_UNKNOWN_ISSUER",
            Denied,
        ),
        row(
            "claims with an unknown member",
            |k, e| {
                let json = claims_json(&e.consent_token);
                let json = format!("{},\"scope\":\"all\"}}", json.strip_suffix('}').unwrap());
                e.consent_token = sign_raw(&k.desk, &json);
            },
            "CONSENT_INVALID_CLAIMS",
            Denied,
        ),
        row(
            "claims of a future typ",
            |k, e| {
                let json = claims_json(&e.consent_token)
                    .replace("concordat.consent.v1", "concordat.consent.v2");
                e.consent_token = sign_raw(&k.desk, &json);
            },
            "CONSENT_INVALID_CLAIMS",
            Denied,
        ),
        // The issuer's authority.
        row(
            "another agency's consent desk",
            |k, e| e.consent_token = sign(&k.nca_desk, claims(ORG, "ncsc")),
            "CONSENT_ISSUER_NOT_ALLOWED",
            Denied,
        ),
        row(
            "an organisation's key speaking for another organisation",
            |k, e| {
                e.organisation = OTHER_ORG.into();
                e.consent_token = sign(&k.org, claims(OTHER_ORG, "ncsc"));
            },
            "CONSENT_ISSUER_NOT_ALLOWED",
            Denied,
        ),
        // What the claims cover.
        row(
            "token for another organisation",
            |k, e| e.consent_token = sign(&k.desk, claims(OTHER_ORG, "ncsc")),
            "CONSENT_WRONG_ORGANISATION",
            Denied,
        ),
        row(
            "token for another sender",
            |k, e| e.consent_token = sign(&k.desk, claims(ORG, "nca")),
            "CONSENT_WRONG_SENDER",
            Denied,
        ),
        row(
            "a recipient the token does not name",
            |_, e| e.recipients.push("nca".into()),
            "CONSENT_WRONG_RECIPIENT",
            Denied,
        ),
        row(
            "a kind the token does not name",
            |_, e| e.kind = pb::MessageKind::ThreatAssessment as i32,
            "CONSENT_WRONG_KIND",
            Denied,
        ),
        row(
            "another incident",
            |_, e| e.incident_ref = "INC-2".into(),
            "CONSENT_WRONG_INCIDENT",
            Denied,
        ),
        row(
            "no incident, token bound to one",
            |_, e| e.incident_ref.clear(),
            "CONSENT_WRONG_INCIDENT",
            Denied,
        ),
        row(
            "another payload",
            |_, e| e.payload = b"{\"summary\":\"something else\"}".to_vec(),
            "CONSENT_PAYLOAD_MISMATCH",
            Denied,
        ),
        row(
            "not valid for another two hours",
            |k, e| {
                let now = OffsetDateTime::now_utc();
                e.consent_token = sign(
                    &k.desk,
                    claims(ORG, "ncsc").not_before(now + Duration::hours(2)),
                );
            },
            "CONSENT_NOT_YET_VALID",
            Denied,
        ),
        row(
            "expired two hours ago",
            |k, e| {
                let now = OffsetDateTime::now_utc();
                let builder = claims(ORG, "ncsc").expires_at(now - Duration::hours(2));
                e.consent_token = sign_at(&k.desk, builder, now - Duration::hours(3));
            },
            "CONSENT_EXPIRED",
            Denied,
        ),
        // What the broker has recorded.
        row("revoked", |_, _| {}, "CONSENT_REVOKED", Denied).after(Setup::RevokeToken),
        row(
            "single-use token used once already",
            |k, e| e.consent_token = sign(&k.desk, claims(ORG, "ncsc").max_uses(1)),
            "CONSENT_USED_UP",
            Denied,
        )
        .after(Setup::SpendOnce),
        row(
            "message id reused for another payload",
            |_, e| e.payload = b"{\"summary\":\"a different payload\"}".to_vec(),
            "MESSAGE_ID_REUSED",
            Invalid,
        )
        .after(Setup::SendBaselineWithSameId),
    ]
}

/// Every reason code that a request to `Exchange.Send` can cause; the table must reach each one.
/// (`UNKNOWN_AGENCY` and `UNAUTHENTICATED` come from certificates: see the `mtls` module.)
const SEND_REASONS: [&str; 26] = [
    "NOT_AUTHORISED",
    "MALFORMED",
    "PAYLOAD_TOO_LARGE",
    "UNKNOWN_RECIPIENT",
    "NO_AGREEMENT",
    "AGREEMENT_REVIEW_OVERDUE",
    "RECIPIENT_QUEUE_FULL",
    "CONSENT_MISSING",
    "CONSENT_TOO_LONG",
    "CONSENT_UNSUPPORTED_VERSION",
    "CONSENT_MALFORMED",
    "CONSENT_BAD_SIGNATURE",
    "CONSENT_UNKNOWN_ISSUER",
    "CONSENT_INVALID_CLAIMS",
    "CONSENT_ISSUER_NOT_ALLOWED",
    "CONSENT_WRONG_ORGANISATION",
    "CONSENT_WRONG_SENDER",
    "CONSENT_WRONG_RECIPIENT",
    "CONSENT_WRONG_KIND",
    "CONSENT_WRONG_INCIDENT",
    "CONSENT_PAYLOAD_MISMATCH",
    "CONSENT_NOT_YET_VALID",
    "CONSENT_EXPIRED",
    "CONSENT_REVOKED",
    "CONSENT_USED_UP",
    "MESSAGE_ID_REUSED",
];

#[tokio::test]
async fn every_rule_refuses_with_its_exact_reason() {
    let mut pki = TestPki::new().unwrap();
    let keys = Keys::generate();
    let (lenient_dir, strict_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut lenient = federation(&pki, lenient_dir.path(), &keys, false);
    lenient.limits.max_message_bytes = MAX_PAYLOAD;
    let mut strict = federation(&pki, strict_dir.path(), &keys, true);
    strict.limits.max_queue_depth = SMALL_QUEUE;
    let mut lenient = Site::start(lenient).await;
    let mut strict = Site::start(strict).await;

    // The baseline itself is accepted, so each refusal below is caused by its row's change.
    let ncsc = lenient.client(&mut pki, "ncsc").await;
    let receipt = accepted(&ncsc, envelope(baseline_token(&keys))).await;
    assert_eq!(receipt.authorities.len(), 1);

    let rows = rows();
    let mut failures = Vec::new();
    for row in &rows {
        let site = match row.target {
            Target::Lenient => &mut lenient,
            Target::Strict => &mut strict,
        };
        let baseline = envelope(baseline_token(&keys));
        let mut e = baseline.clone();
        (row.mutate)(&keys, &mut e);
        let client = site.client(&mut pki, row.sender).await;
        match row.setup {
            Setup::None => {}
            Setup::RevokeToken => {
                let ncsc = site.client(&mut pki, "ncsc").await;
                let response = revoke(&ncsc, revocation_of(&keys.desk, &e.consent_token))
                    .await
                    .unwrap();
                assert!(!response.duplicate, "{}", row.name);
            }
            Setup::SpendOnce => {
                accepted(&client, with_new_id(&e)).await;
            }
            Setup::SendBaselineWithSameId => {
                assert_eq!(baseline.message_id, e.message_id);
                accepted(&client, baseline.clone()).await;
            }
            Setup::FillQueue => {
                for _ in 0..SMALL_QUEUE {
                    let filler = anonymised("ico", pb::MessageKind::ThreatAssessment);
                    accepted(&client, filler).await;
                }
            }
        }
        let (code, reason) = match send(&client, e).await {
            Ok(receipt) => {
                failures.push(format!("{}: accepted ({receipt:?})", row.name));
                continue;
            }
            Err(status) => (status.code(), reason_of(&status).unwrap_or_default()),
        };
        if (code, reason.as_str()) != (row.code, row.reason) {
            failures.push(format!(
                "{}: expected {:?} {}, got {code:?} {reason}",
                row.name, row.code, row.reason
            ));
        }
    }
    assert!(failures.is_empty(), "rows failed:\n{}", failures.join("\n"));

    // The table reaches every reason of the send path that a request can cause.
    let reached: BTreeSet<&str> = rows.iter().map(|r| r.reason).collect();
    let missing: Vec<&str> = SEND_REASONS
        .iter()
        .copied()
        .filter(|r| !reached.contains(r))
        .collect();
    assert!(missing.is_empty(), "no row for {missing:?}");

    // The refusals left the broker serving.
    accepted(&ncsc, envelope(baseline_token(&keys))).await;
}

#[tokio::test]
async fn accepted_transfers_cite_their_agreement_and_consent() {
    let mut pki = TestPki::new().unwrap();
    let keys = Keys::generate();
    let dir = tempfile::tempdir().unwrap();
    let mut site = Site::start(federation(&pki, dir.path(), &keys, false)).await;
    let ncsc = site.client(&mut pki, "ncsc").await;
    let nca = site.client(&mut pki, "nca").await;
    let authority = |recipient: &str, agreement: &str, clause: &str| pb::Authority {
        recipient: recipient.into(),
        agreement_id: agreement.into(),
        clause: clause.into(),
    };

    // Anonymised: no token needed, the agreement and clause are cited, no consent.
    let e = anonymised("ico", pb::MessageKind::IncidentRecord);
    let receipt = accepted(&ncsc, e.clone()).await;
    assert_eq!(receipt.message_id, e.message_id);
    assert_eq!(receipt.authorities, [authority("ico", MOU_ICO_NCSC, "4.2")]);
    assert!(receipt.consent_jti.is_empty() && receipt.consent_issuer.is_empty());
    assert!(!receipt.duplicate);
    assert!(receipt.transfer_id.parse::<MessageId>().is_ok(), "a UUID");

    // Consented: the receipt names the token and its issuer.
    let token = baseline_token(&keys);
    let jti = consent::verify(&token, &keys.desk.public()).unwrap().jti();
    let receipt = accepted(&ncsc, envelope(token)).await;
    assert_eq!(receipt.authorities, [authority("ico", MOU_ICO_NCSC, "4.2")]);
    assert_eq!(receipt.consent_jti, jti.to_string());
    assert_eq!(receipt.consent_issuer, keys.desk.key_id().to_string());

    // Two recipients under two agreements, cited in the envelope's order.
    let token = sign(&keys.desk, claims(ORG, "ncsc").recipient("nca"));
    let mut e = envelope(token);
    e.recipients = vec!["nca".into(), "ico".into()];
    let receipt = accepted(&ncsc, e).await;
    assert_eq!(
        receipt.authorities,
        [
            authority("nca", MOU_NCSC_NCA, "2.1"),
            authority("ico", MOU_ICO_NCSC, "4.2")
        ]
    );

    // The organisation's own key authorises a transfer from any agency, for itself.
    let receipt = accepted(&ncsc, envelope(sign(&keys.org, claims(ORG, "ncsc")))).await;
    assert_eq!(receipt.consent_issuer, keys.org.key_id().to_string());
    // From the NCA, too, relying on an agreement overdue for review: allowed while reviews are
    // not enforced, and still cited.
    let receipt = accepted(&nca, envelope(sign(&keys.org, claims(ORG, "nca")))).await;
    assert_eq!(receipt.authorities, [authority("ico", MOU_ICO_NCA, "3.1")]);
    assert_eq!(receipt.consent_issuer, keys.org.key_id().to_string());
    let receipt = accepted(&nca, anonymised("ico", pb::MessageKind::IncidentRecord)).await;
    assert_eq!(receipt.authorities, [authority("ico", MOU_ICO_NCA, "3.1")]);

    // Clock skew: a token that expired 20 s ago, or starts in 20 s, is still accepted
    // (policy.clock_skew is 60 s); the table shows the same tokens hours off are refused.
    let now = OffsetDateTime::now_utc();
    let late = claims(ORG, "ncsc").expires_at(now - Duration::seconds(20));
    accepted(
        &ncsc,
        envelope(sign_at(&keys.desk, late, now - Duration::hours(1))),
    )
    .await;
    let early = claims(ORG, "ncsc").not_before(now + Duration::seconds(20));
    accepted(&ncsc, envelope(sign(&keys.desk, early))).await;

    // A token without incident or payload binding covers any incident and payload.
    let loose = ConsentClaims::builder(ORG, "ncsc", "Ongoing support")
        .recipient("ico")
        .kind(Kind::IncidentRecord)
        .valid_for(Duration::hours(1));
    let mut e = envelope(sign(&keys.desk, loose));
    e.incident_ref = "INC-99".into();
    e.payload = br#"{"summary":"anything"}"#.to_vec();
    accepted(&ncsc, e).await;
}

#[tokio::test]
async fn retries_return_the_first_receipt_without_spending_consent() {
    let mut pki = TestPki::new().unwrap();
    let keys = Keys::generate();
    let dir = tempfile::tempdir().unwrap();
    let mut site = Site::start(federation(&pki, dir.path(), &keys, false)).await;
    let ncsc = site.client(&mut pki, "ncsc").await;

    // A single-use token: the retry returns the first receipt instead of being refused as used.
    let e = envelope(sign(&keys.desk, claims(ORG, "ncsc").max_uses(1)));
    let first = accepted(&ncsc, e.clone()).await;
    assert!(!first.duplicate);
    let again = accepted(&ncsc, e.clone()).await;
    assert!(again.duplicate);
    assert_eq!(again.transfer_id, first.transfer_id);
    assert_eq!(again.accepted_at, first.accepted_at);
    assert_eq!(again.consent_jti, first.consent_jti);
    // The same content with a freshly issued token is the same envelope: the first receipt.
    let mut reissued = e.clone();
    reissued.consent_token = sign(&keys.desk, claims(ORG, "ncsc").max_uses(1));
    assert_ne!(reissued.consent_token, e.consent_token);
    let third = accepted(&ncsc, reissued).await;
    assert!(third.duplicate);
    assert_eq!(third.transfer_id, first.transfer_id);
    // The same id for another payload is refused; so is another recipient list.
    let mut other = e.clone();
    other.payload = br#"{"summary":"a different payload"}"#.to_vec();
    assert_eq!(
        refused(&ncsc, other).await,
        (Code::InvalidArgument, "MESSAGE_ID_REUSED".into())
    );
    let mut other = e.clone();
    other.kind = pb::MessageKind::ThreatAssessment as i32;
    assert_eq!(
        refused(&ncsc, other).await,
        (Code::InvalidArgument, "MESSAGE_ID_REUSED".into())
    );
    // The one use is spent: a new message under the token is refused.
    assert_eq!(
        refused(&ncsc, with_new_id(&e)).await,
        (Code::PermissionDenied, "CONSENT_USED_UP".into())
    );

    // Two uses: the retry of the first does not count, so a second message still fits.
    let e = envelope(sign(&keys.desk, claims(ORG, "ncsc").max_uses(2)));
    let first = accepted(&ncsc, e.clone()).await;
    assert!(accepted(&ncsc, e.clone()).await.duplicate);
    let second = accepted(&ncsc, with_new_id(&e)).await;
    assert!(!second.duplicate);
    assert_ne!(second.transfer_id, first.transfer_id);
    assert_eq!(
        refused(&ncsc, with_new_id(&e)).await,
        (Code::PermissionDenied, "CONSENT_USED_UP".into())
    );

    // Concurrent retries of one message, pipelined on one stream so that they are decided
    // before any of them is stored: one transfer, one first receipt, the rest duplicates.
    let e = envelope(sign(&keys.desk, claims(ORG, "ncsc").max_uses(1)));
    let results = send_stream(&ncsc, vec![e; PIPELINED]).await;
    let receipts: Vec<&pb::Receipt> = results
        .iter()
        .map(|r| match r {
            Ok(receipt) => receipt,
            Err(refusal) => panic!("a retry was refused: {refusal:?}"),
        })
        .collect();
    let transfers: BTreeSet<&str> = receipts.iter().map(|r| r.transfer_id.as_str()).collect();
    assert_eq!(transfers.len(), 1, "{receipts:?}");
    assert_eq!(receipts.iter().filter(|r| !r.duplicate).count(), 1);

    // The same when the first attempt fills the recipient's queue: retries are answered with the
    // first receipt, not refused as if they were new transfers.
    let small_dir = tempfile::tempdir().unwrap();
    let mut config = federation(&pki, small_dir.path(), &keys, false);
    config.limits.max_queue_depth = 1;
    let mut small = Site::start(config).await;
    let to_small = small.client(&mut pki, "ncsc").await;
    let e = anonymised("ico", pb::MessageKind::ThreatAssessment);
    let results = send_stream(&to_small, vec![e; PIPELINED]).await;
    assert!(
        results.iter().all(|r| r.is_ok()),
        "a retry was refused: {:?}",
        results.iter().find(|r| r.is_err())
    );

    // Concurrent different messages under a single-use token: the store's atomic re-check lets
    // exactly one through, whatever the decisions made before it saw the others.
    let token = sign(&keys.desk, claims(ORG, "ncsc").max_uses(1));
    let envelopes = (0..PIPELINED).map(|_| envelope(token.clone())).collect();
    let results = send_stream(&ncsc, envelopes).await;
    assert_eq!(
        results.iter().filter(|r| r.is_ok()).count(),
        1,
        "{results:?}"
    );
    for refusal in results.iter().filter_map(|r| r.as_ref().err()) {
        assert_eq!(refusal.reason, "CONSENT_USED_UP", "{refusal:?}");
    }
}

/// How many envelopes the concurrency checks pipeline on one `SendStream`.
const PIPELINED: usize = 32;

/// Sends `envelopes` on one `SendStream` and returns the outcomes in order.
async fn send_stream(
    client: &Broker,
    envelopes: Vec<pb::Envelope>,
) -> Vec<Result<pb::Receipt, pb::Refusal>> {
    let ids: Vec<String> = envelopes.iter().map(|e| e.message_id.clone()).collect();
    let mut results = client
        .exchange()
        .send_stream(tokio_stream::iter(envelopes))
        .await
        .unwrap()
        .into_inner();
    let mut outcomes = Vec::new();
    while let Some(result) = results.message().await.unwrap() {
        assert_eq!(result.message_id, ids[outcomes.len()], "results in order");
        outcomes.push(match result.outcome.unwrap() {
            pb::send_result::Outcome::Receipt(r) => Ok(r),
            pb::send_result::Outcome::Refusal(r) => Err(r),
        });
    }
    assert_eq!(outcomes.len(), ids.len());
    outcomes
}

/// Reads deliveries until `done` says enough, failing after [`DELIVERY_TIMEOUT`] without one.
async fn read_until(
    stream: &mut tonic::Streaming<pb::Delivery>,
    mut done: impl FnMut(&[pb::delivery::Body]) -> bool,
) -> Vec<pb::delivery::Body> {
    let mut seen = Vec::new();
    while !done(&seen) {
        let delivery = tokio::time::timeout(DELIVERY_TIMEOUT, stream.message())
            .await
            .unwrap_or_else(|_| panic!("no delivery within {DELIVERY_TIMEOUT:?}; seen {seen:?}"))
            .unwrap()
            .unwrap_or_else(|| panic!("subscription ended; seen {seen:?}"));
        seen.push(delivery.body.unwrap());
    }
    seen
}

#[tokio::test]
async fn revocation_recalls_the_transfers_already_made() {
    let mut pki = TestPki::new().unwrap();
    let keys = Keys::generate();
    let dir = tempfile::tempdir().unwrap();
    let mut site = Site::start(federation(&pki, dir.path(), &keys, false)).await;
    let ncsc = site.client(&mut pki, "ncsc").await;
    let ico = site.client(&mut pki, "ico").await;

    // Two transfers under one token, and one under another token that stays valid.
    let token = baseline_token(&keys);
    let jti = consent::verify(&token, &keys.desk.public()).unwrap().jti();
    let first = envelope(token.clone());
    let second = envelope(token.clone());
    let mut sent: BTreeMap<String, String> = BTreeMap::new();
    for e in [&first, &second] {
        let receipt = accepted(&ncsc, e.clone()).await;
        sent.insert(receipt.transfer_id, e.message_id.clone());
    }
    let unrelated = accepted(&ncsc, envelope(baseline_token(&keys))).await;

    // Revoking the token queues a recall notice per transfer and recipient; again, nothing.
    let revocation = revocation_of(&keys.desk, &token);
    let response = revoke(&ncsc, revocation.clone()).await.unwrap();
    assert_eq!((response.recall_notices, response.duplicate), (2, false));
    let response = revoke(&ncsc, revocation).await.unwrap();
    assert_eq!((response.recall_notices, response.duplicate), (0, true));
    assert_eq!(
        refused(&ncsc, envelope(token.clone())).await,
        (Code::PermissionDenied, "CONSENT_REVOKED".into())
    );

    // The recipient receives both transfers, then a recall notice for each of them.
    let mut stream = ico
        .exchange()
        .subscribe(pb::SubscribeRequest { window: 16 })
        .await
        .unwrap()
        .into_inner();
    let recalls = |seen: &[pb::delivery::Body]| {
        seen.iter()
            .filter(|b| matches!(b, pb::delivery::Body::RecallNotice(_)))
            .count()
    };
    let seen = read_until(&mut stream, |seen| recalls(seen) == 2).await;
    let mut transfers: BTreeMap<String, String> = BTreeMap::new();
    let mut recalled: BTreeMap<String, String> = BTreeMap::new();
    for body in seen {
        match body {
            pb::delivery::Body::Transfer(t) => {
                assert_eq!(t.sender, "ncsc");
                if t.transfer_id != unrelated.transfer_id {
                    assert_eq!(t.consent_jti, jti.to_string());
                    transfers.insert(t.transfer_id, t.message_id);
                }
            }
            pb::delivery::Body::RecallNotice(n) => {
                assert!(
                    transfers.contains_key(&n.transfer_id),
                    "recall of {} before its transfer",
                    n.transfer_id
                );
                assert_eq!(n.consent_jti, jti.to_string());
                assert_eq!(n.consent_issuer, keys.desk.key_id().to_string());
                assert_eq!(n.sender, "ncsc");
                assert_eq!(n.organisation, ORG);
                assert!(n.revoked_at.is_some());
                recalled.insert(n.transfer_id, n.message_id);
            }
            pb::delivery::Body::Notice(n) => panic!("an unexpected notice {n:?}"),
        }
    }
    assert_eq!(transfers, sent);
    assert_eq!(recalled, sent);
    assert!(!recalled.contains_key(&unrelated.transfer_id));

    // "Every token issued before T": an old token is revoked and its transfer recalled; a token
    // issued after T is not.
    let now = OffsetDateTime::now_utc();
    let old = sign_at(
        &keys.desk,
        claims(ORG, "ncsc").valid_for(Duration::hours(4)),
        now - Duration::hours(2),
    );
    let old_transfer = accepted(&ncsc, envelope(old.clone())).await;
    let young = baseline_token(&keys);
    let before = Revocation::new(
        keys.desk.key_id(),
        RevocationTarget::IssuedBefore(now - Duration::hours(1)),
        now,
    )
    .unwrap()
    .sign(&keys.desk)
    .unwrap();
    let response = revoke(&ncsc, before.clone()).await.unwrap();
    // Only the old token's transfer: every other token of this issuer was issued after T.
    assert_eq!((response.recall_notices, response.duplicate), (1, false));
    assert!(revoke(&ncsc, before).await.unwrap().duplicate);
    assert_eq!(
        refused(&ncsc, envelope(old)).await,
        (Code::PermissionDenied, "CONSENT_REVOKED".into())
    );
    accepted(&ncsc, envelope(young)).await;
    let seen = read_until(&mut stream, |seen| recalls(seen) == 1).await;
    let notice = seen
        .iter()
        .find_map(|b| match b {
            pb::delivery::Body::RecallNotice(n) => Some(n),
            pb::delivery::Body::Transfer(_) | pb::delivery::Body::Notice(_) => None,
        })
        .unwrap();
    assert_eq!(notice.transfer_id, old_transfer.transfer_id);

    // Revocations must be signed by a trusted issuer, as revocations.
    let status = revoke(
        &ncsc,
        revocation_of(&keys.untrusted, &sign(&keys.untrusted, claims(ORG, "ncsc"))),
    )
    .await
    .unwrap_err();
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::PermissionDenied, Some("CONSENT_UNKNOWN_ISSUER"))
    );
    let status = revoke(&ncsc, baseline_token(&keys)).await.unwrap_err();
    assert_eq!(
        (status.code(), reason_of(&status).as_deref()),
        (Code::PermissionDenied, Some("REVOCATION_INVALID"))
    );
}

#[tokio::test]
async fn tokens_made_with_pasetors_are_accepted() {
    use pasetors::{
        keys::{AsymmetricPublicKey, AsymmetricSecretKey},
        paserk::{FormatAsPaserk, Id},
        version4::{PublicToken, V4},
    };

    let mut pki = TestPki::new().unwrap();
    let keys = Keys::generate();
    let dir = tempfile::tempdir().unwrap();
    let mut site = Site::start(federation(&pki, dir.path(), &keys, false)).await;
    let ncsc = site.client(&mut pki, "ncsc").await;

    // The organisation's key as pasetors sees it, and the key id pasetors derives from it.
    let secret =
        AsymmetricSecretKey::<V4>::from(&keys.org.signing_key().to_keypair_bytes()).unwrap();
    let public = AsymmetricPublicKey::<V4>::try_from(&secret).unwrap();
    let mut kid = String::new();
    Id::from(&public).fmt(&mut kid).unwrap();
    let footer = format!(r#"{{"kid":"{kid}"}}"#);

    let rfc3339 = |t: OffsetDateTime| {
        t.replace_nanosecond(0)
            .unwrap()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    let now = OffsetDateTime::now_utc();
    let pdh = ConsentClaims::payload_digest(PAYLOAD);
    let jti = "0123456789abcdef0123456789abcdef";
    // The claims in the documented order, without whitespace, as issuers write them.
    let canonical = format!(
        concat!(
            r#"{{"typ":"concordat.consent.v1","jti":"{jti}","iss":"{kid}","sub":"{org}","#,
            r#""from":"ncsc","to":["ico"],"kinds":["incident_record"],"#,
            r#""purpose":"Joint response","iat":"{iat}","nbf":"{nbf}","exp":"{exp}","#,
            r#""incident_refs":["{incident}"],"pdh":"{pdh}","max_uses":3}}"#
        ),
        jti = jti,
        kid = kid,
        org = ORG,
        iat = rfc3339(now),
        nbf = rfc3339(now - Duration::minutes(5)),
        exp = rfc3339(now + Duration::hours(1)),
        incident = INCIDENT,
        pdh = pdh,
    );
    // The same claims in another order, with whitespace, an offset and fractional seconds:
    // the format says verifiers must not depend on order, spacing or the issuers' style.
    let offset = time::UtcOffset::from_hms(1, 0, 0).unwrap();
    let styled_jti = "fedcba9876543210fedcba9876543210";
    let styled = format!(
        concat!(
            "{{ \"max_uses\": 3, \"pdh\": \"{pdh}\", \"to\": [\"ico\"], \"from\": \"ncsc\",\n",
            "  \"sub\": \"{org}\", \"iss\": \"{kid}\", \"typ\": \"concordat.consent.v1\",\n",
            "  \"jti\": \"{styled_jti}\", \"kinds\": [\"incident_record\"],\n",
            "  \"purpose\": \"Joint response\", \"exp\": \"{exp}\", \"nbf\": \"{nbf}\",\n",
            "  \"iat\": \"{iat}\", \"incident_refs\": [\"{incident}\"] }}"
        ),
        pdh = pdh,
        org = ORG,
        kid = kid,
        exp = (now + Duration::hours(1))
            .to_offset(offset)
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap(),
        nbf = rfc3339(now - Duration::minutes(5)),
        iat = (now - Duration::seconds(1))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap(),
        incident = INCIDENT,
        styled_jti = styled_jti,
    );
    for (name, claims, jti) in [
        ("canonical", &canonical, jti),
        ("styled", &styled, styled_jti),
    ] {
        let token = PublicToken::sign(
            &secret,
            claims.as_bytes(),
            Some(footer.as_bytes()),
            Some(CONSENT_TYP.as_bytes()),
        )
        .unwrap();
        let receipt = match send(&ncsc, envelope(token)).await {
            Ok(receipt) => receipt,
            Err(status) => panic!(
                "{name} pasetors token refused: {:?} {}",
                reason_of(&status),
                status.message()
            ),
        };
        assert_eq!(receipt.consent_jti, jti, "{name}");
        assert_eq!(receipt.consent_issuer, kid, "{name}");
    }
    // pasetors and the broker agree on the key id.
    assert_eq!(kid, keys.org.key_id().to_string());

    // Signed by pasetors with the revocation assertion, the same claims are no consent.
    let wrong = PublicToken::sign(
        &secret,
        canonical.as_bytes(),
        Some(footer.as_bytes()),
        Some(consent::REVOCATION_TYP.as_bytes()),
    )
    .unwrap();
    assert_eq!(
        refused(&ncsc, envelope(wrong)).await,
        (Code::PermissionDenied, "CONSENT_BAD_SIGNATURE".into())
    );
}

/// A small deterministic generator (SplitMix64), so a failing run can be replayed from its seed.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[tokio::test]
async fn random_token_corruptions_are_refused_over_the_wire() {
    const MUTATIONS: usize = 200;
    let mut pki = TestPki::new().unwrap();
    let keys = Keys::generate();
    let dir = tempfile::tempdir().unwrap();
    let mut site = Site::start(federation(&pki, dir.path(), &keys, false)).await;
    let ncsc = site.client(&mut pki, "ncsc").await;

    let seed = OffsetDateTime::now_utc().unix_timestamp_nanos() as u64;
    let mut rng = SplitMix(seed);
    let token = baseline_token(&keys);
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..MUTATIONS {
        // One byte replaced by another ASCII byte (so the token stays a protobuf string).
        let mut bytes = token.clone().into_bytes();
        let at = rng.below(bytes.len());
        let old = bytes[at];
        bytes[at] = loop {
            let b = rng.below(128) as u8;
            if b != old {
                break b;
            }
        };
        let corrupted = String::from_utf8(bytes).unwrap();
        let what = format!(
            "seed {seed}: byte {at} {:?} → {:?}",
            old as char,
            corrupted.as_bytes()[at] as char
        );
        let status = send(&ncsc, envelope(corrupted))
            .await
            .expect_err(&format!("{what}: accepted"));
        let reason = reason_of(&status).unwrap_or_else(|| panic!("{what}: no reason"));
        assert!(reason.starts_with("CONSENT_"), "{what}: {reason}");
        assert!(
            matches!(
                status.code(),
                Code::PermissionDenied | Code::InvalidArgument
            ),
            "{what}: {:?}",
            status.code()
        );
        *reasons.entry(reason).or_default() += 1;
    }
    // Most bytes are in the signed body: both a broken encoding and a broken signature occur.
    for expected in ["CONSENT_BAD_SIGNATURE", "CONSENT_MALFORMED"] {
        assert!(reasons.contains_key(expected), "seed {seed}: {reasons:?}");
    }
    // The broker is still serving, and the uncorrupted token was never spent or spoiled.
    accepted(&ncsc, envelope(token)).await;
}
