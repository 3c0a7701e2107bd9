//! Step 3 of the decision: TLP 2.0, enforced (the rules in `docs/tlp.md`).
//!
//! In order, each with its reason:
//! 1. a STIX bundle's markings agree with its envelope: the envelope's `tlp` is the most
//!    restrictive TLP marking that any object of the bundle references (in
//!    `object_marking_refs` or a granular marking's `marking_ref`), otherwise
//!    `TLP_MISMATCH`. A bundle that references no TLP marking leaves the envelope's `tlp` in
//!    force for all of it;
//! 2. no flow of the transfer carries more than its `max_tlp`, and a TLP:RED transfer names
//!    exactly one recipient, otherwise `TLP_NOT_PERMITTED`;
//! 3. no STIX object the broker delivered to the sender under TLP:AMBER+STRICT or TLP:RED
//!    goes on to an agency other than the one(s) it came from, otherwise
//!    `TLP_ONWARD_FORBIDDEN`, naming the object and the transfer it first arrived in.
//!
//! Before the third rule, a bundle whose object ids do not fit in its audit entry
//! ([`MAX_AUDITED_ID_BYTES`]) is refused `PAYLOAD_TOO_LARGE`: every accepted bundle's ids are
//! recorded, so that an auditor can trace where an object went.
//!
//! The markings are recognised by their fixed ids ([`MARKINGS`]: the five TLP 2.0 marking
//! definitions of the STIX extension [`TLP2_EXTENSION`] and the four TLP 1.0 ones of STIX 2.1,
//! WHITE read as CLEAR), and by a marking definition inside the bundle that declares its level
//! (the TLP 2.0 extension's `tlp_2_0`, or TLP 1.0's `definition.tlp`). A bundle that defines
//! one of the fixed ids with another level than its own is refused too.
//!
//! What was delivered under AMBER+STRICT or RED is remembered per recipient by the store, in
//! the transaction that accepts the transfer ([`Provenance`], which the store implements).

use std::collections::BTreeSet;

use concordat_proto::{
    envelope::{Envelope, Tlp},
    ids::AgencyId,
};

use super::{Context, refuse};
use crate::{
    content::{Bundle, Content, JsonObject, Value, member},
    refusal::{Failure, Internal, Reason},
};

/// The STIX extension definition of TLP 2.0 (OASIS `cti-stix-common-objects`).
pub const TLP2_EXTENSION: &str = "extension-definition--60a3c5c5-0d10-413e-aab3-9e08dde9e88d";

/// The TLP marking definitions whose ids fix their level: TLP 2.0 (the extension's five,
/// created 2022-10-01) and TLP 1.0 (STIX 2.1 §7.2.1.4, created 2017-01-20), WHITE as CLEAR.
pub const MARKINGS: &[(&str, Tlp)] = &[
    (
        "marking-definition--94868c89-83c2-464b-929b-a1a8aa3c8487",
        Tlp::Clear,
    ),
    (
        "marking-definition--bab4a63c-aed9-4cf5-a766-dfca5abac2bb",
        Tlp::Green,
    ),
    (
        "marking-definition--55d920b0-5e8b-4f79-9ee9-91f868d9b421",
        Tlp::Amber,
    ),
    (
        "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003",
        Tlp::AmberStrict,
    ),
    (
        "marking-definition--e828b379-4e03-4974-9ac4-e53a884c97c1",
        Tlp::Red,
    ),
    (
        "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9",
        Tlp::Clear,
    ),
    (
        "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da",
        Tlp::Green,
    ),
    (
        "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82",
        Tlp::Amber,
    ),
    (
        "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed",
        Tlp::Red,
    ),
];

/// The level at and above which the broker remembers what it delivered, and refuses to let
/// the recipient pass it on.
pub const RESTRICTED_FROM: Tlp = Tlp::AmberStrict;

/// The most bytes of object ids one acceptance's audit entry records (`stix_object_ids`).
/// An entry is at most `concordat_proto::audit::MAX_ENTRY_BYTES` (64 KiB); the rest of it
/// (envelope facts, authorities) keeps the remaining 16 KiB. About a thousand typical ids fit.
pub const MAX_AUDITED_ID_BYTES: usize = 48 * 1024;

/// The object types that define rather than inform (shared by every bundle that uses them):
/// never remembered, never refused as onward sharing.
const DEFINITIONS: &[&str] = &["marking-definition", "extension-definition"];

/// What the broker delivered of one STIX object to one agency under AMBER+STRICT or RED.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    /// The transfer it first arrived in.
    pub first_transfer: String,
    /// The agencies it came from: it may go back to them (returning it to its originator is
    /// not onward sharing).
    pub from: BTreeSet<AgencyId>,
    /// The most restrictive marking it arrived under.
    pub tlp: Tlp,
}

/// The store's memory of restricted objects delivered, which the policy reads.
pub trait Provenance: Send + Sync {
    /// What was delivered of `object_id` to `holder` under AMBER+STRICT or RED, if anything.
    fn received(&self, holder: &AgencyId, object_id: &str) -> Result<Option<Received>, Internal>;

    /// What was delivered of each of `object_ids` to `holder` under AMBER+STRICT or RED, in
    /// their order.
    fn received_many(
        &self,
        holder: &AgencyId,
        object_ids: &[&str],
    ) -> Result<Vec<Option<Received>>, Internal> {
        object_ids
            .iter()
            .map(|id| self.received(holder, id))
            .collect()
    }

    /// Whether anything at all was delivered to `holder` under AMBER+STRICT or RED: when
    /// not, no object of a bundle it sends need be looked up. A store that cannot answer
    /// more cheaply than by its objects says yes.
    fn holds_any(&self, _holder: &AgencyId) -> Result<bool, Internal> {
        Ok(true)
    }
}

/// One STIX object a transfer delivers under AMBER+STRICT or RED.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restricted {
    /// Its id.
    pub object_id: String,
    /// Its marking: its own most restrictive TLP marking, or the envelope's when it has none.
    pub tlp: Tlp,
}

/// The STIX objects a transfer carries, for the audit entry and the store.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Carried {
    /// Every object's id, in bundle order (the audit entry's `stix_object_ids`); empty for
    /// anything but a STIX bundle.
    pub object_ids: Vec<String>,
    /// The objects delivered under AMBER+STRICT or RED, which each recipient may not pass on.
    pub restricted: Vec<Restricted>,
}

/// The TLP limit of one recipient's flow.
#[derive(Debug, Clone)]
pub(super) struct FlowLimit {
    pub(super) recipient: AgencyId,
    pub(super) agreement_id: String,
    pub(super) clause: String,
    pub(super) max_tlp: Option<Tlp>,
}

/// Applies the TLP rules to `envelope` from `sender`, whose payload was read as `content`
/// and whose flows are `limits` (one per recipient, in order).
pub(super) fn check(
    cx: &Context<'_>,
    sender: &AgencyId,
    envelope: &Envelope,
    content: &Content<'_>,
    limits: &[FlowLimit],
) -> Result<Carried, Failure> {
    let bundle = match content {
        Content::Stix(bundle) => Some(bundle),
        _ => None,
    };
    // 1. The bundle's markings agree with the envelope.
    let marked = match bundle {
        Some(b) => Some(markings(b)?),
        None => None,
    };
    if let Some(Some(highest)) = marked.as_ref().map(|m| &m.highest)
        && highest.tlp != envelope.tlp
    {
        return Err(refuse(
            Reason::TlpMismatch,
            format!(
                "the bundle's most restrictive marking is {} (objects[{}] {}, {}), but the \
                 envelope says {}: the envelope must carry the bundle's most restrictive marking \
                 ({})",
                label(highest.tlp),
                highest.index,
                highest.object_id,
                highest.property,
                label(envelope.tlp),
                cite(limits.iter())
            ),
        ));
    }

    // 2. Every flow permits the marking, and TLP:RED names one recipient.
    for limit in limits {
        if let Some(max) = limit.max_tlp
            && envelope.tlp > max
        {
            return Err(refuse(
                Reason::TlpNotPermitted,
                format!(
                    "agreement {}, clause {}, permits at most {} from {sender} to {}; this \
                     transfer is marked {}",
                    limit.agreement_id,
                    limit.clause,
                    label(max),
                    limit.recipient,
                    label(envelope.tlp)
                ),
            ));
        }
    }
    if envelope.tlp == Tlp::Red && envelope.recipients.len() != 1 {
        let names: Vec<String> = envelope.recipients.iter().map(|r| r.to_string()).collect();
        return Err(refuse(
            Reason::TlpNotPermitted,
            format!(
                "TLP:RED goes to exactly one recipient per transfer; this one names {} ({}): \
                 send it to each named recipient separately, if each may have it ({})",
                names.len(),
                names.join(", "),
                cite(limits.iter())
            ),
        ));
    }

    let (Some(bundle), Some(marked)) = (bundle, marked) else {
        return Ok(Carried::default());
    };

    // Every accepted bundle's object ids go into its audit entry, which is bounded: a bundle
    // whose ids do not fit cannot be traced, and is refused before anything is looked up.
    // (Each id costs its length plus at most three bytes of protobuf framing.)
    let id_bytes: usize = bundle.object_ids().iter().map(|id| id.len() + 3).sum();
    if id_bytes > MAX_AUDITED_ID_BYTES {
        return Err(refuse(
            Reason::PayloadTooLarge,
            format!(
                "the bundle's {} object ids take {id_bytes} bytes, more than the {} an audit \
                 entry records: split it into smaller bundles",
                bundle.object_ids().len(),
                MAX_AUDITED_ID_BYTES
            ),
        ));
    }

    // 3. Nothing the sender received under AMBER+STRICT or RED goes to a third agency.
    let mut looked_up: Vec<&str> = marked
        .objects
        .iter()
        .map(|o| o.id)
        .filter(|id| !is_definition(id))
        .collect();
    if !looked_up.is_empty() && !cx.provenance.holds_any(sender)? {
        looked_up.clear();
    }
    let found = cx.provenance.received_many(sender, &looked_up)?;
    if found.len() != looked_up.len() {
        return Err(Internal::new(
            "reading TLP records",
            format!("{} answers for {} objects", found.len(), looked_up.len()),
        )
        .into());
    }
    for (object_id, received) in looked_up.iter().zip(found) {
        let Some(received) = received else {
            continue;
        };
        if let Some(third) = envelope
            .recipients
            .iter()
            .find(|r| !received.from.contains(*r))
        {
            let from: Vec<String> = received.from.iter().map(|a| a.to_string()).collect();
            return Err(refuse(
                Reason::TlpOnwardForbidden,
                format!(
                    "{object_id} was delivered to {sender} under {} in transfer {} (from {}): \
                     it may go back to {} but not on to {third} ({})",
                    label(received.tlp),
                    received.first_transfer,
                    from.join(", "),
                    from.join(" or "),
                    cite(limits.iter().filter(|l| &l.recipient == third))
                ),
            ));
        }
    }

    let restricted = marked
        .objects
        .iter()
        .filter(|o| !is_definition(o.id))
        .filter_map(|o| {
            let tlp = o.own.unwrap_or(envelope.tlp);
            (tlp >= RESTRICTED_FROM).then(|| Restricted {
                object_id: o.id.to_owned(),
                tlp,
            })
        })
        .collect();
    Ok(Carried {
        object_ids: bundle
            .object_ids()
            .iter()
            .map(|id| id.to_string())
            .collect(),
        restricted,
    })
}

/// The agreements and clauses of `limits`' flows, for refusals:
/// `to nca: agreement test-tlp, clause 3.1`.
fn cite<'a>(limits: impl Iterator<Item = &'a FlowLimit>) -> String {
    let cited: Vec<String> = limits
        .map(|l| {
            format!(
                "to {}: agreement {}, clause {}",
                l.recipient, l.agreement_id, l.clause
            )
        })
        .collect();
    cited.join("; ")
}

/// `TLP:AMBER+STRICT`.
fn label(tlp: Tlp) -> String {
    format!("TLP:{}", tlp.as_str().to_uppercase())
}

/// Whether the object `id` (a validated STIX identifier, `type--UUID`) is a marking or
/// extension definition. Its type is all before the UUID: a custom type may itself hold `--`
/// (`marking-definition--x--<UUID>` is a custom object, not a marking definition).
fn is_definition(id: &str) -> bool {
    crate::content::stix::identifier(id).is_some_and(|(kind, _)| DEFINITIONS.contains(&kind))
}

/// Where the most restrictive marking of a bundle is referenced.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Highest {
    tlp: Tlp,
    index: usize,
    object_id: String,
    property: MarkingSite,
}

/// The property of an object that references a marking, spelt out only in a refusal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MarkingSite {
    /// `object_marking_refs[i]`.
    ObjectMarkingRef(usize),
    /// `granular_markings[i].marking_ref`.
    GranularMarking(usize),
}

impl std::fmt::Display for MarkingSite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MarkingSite::ObjectMarkingRef(i) => write!(f, "object_marking_refs[{i}]"),
            MarkingSite::GranularMarking(i) => write!(f, "granular_markings[{i}].marking_ref"),
        }
    }
}

/// One object of a bundle and its own TLP marking.
#[derive(Debug)]
struct ObjectMarking<'b> {
    /// Its id.
    id: &'b str,
    /// The most restrictive TLP marking it references itself, if any.
    own: Option<Tlp>,
}

/// The TLP markings of a bundle.
#[derive(Debug, Default)]
struct Marked<'b> {
    /// Every object, in bundle order, with its own marking.
    objects: Vec<ObjectMarking<'b>>,
    /// The most restrictive marking referenced anywhere, and where first.
    highest: Option<Highest>,
}

/// The level a marking definition object of the bundle declares, if it is a TLP one.
fn declared_level(o: &JsonObject<'_>) -> Result<Option<Tlp>, String> {
    if let Some(ext) = o
        .get("extensions")
        .and_then(|e| member(e, TLP2_EXTENSION))
        .and_then(|x| member(x, "tlp_2_0"))
    {
        let level = ext.as_str().unwrap_or_default();
        return match level.parse::<Tlp>() {
            Ok(t) if level == t.as_str() => Ok(Some(t)),
            _ => Err(format!("tlp_2_0 {level:?} is not a TLP 2.0 level")),
        };
    }
    if o.get("definition_type").and_then(Value::as_str) == Some("tlp") {
        // The STIX validation already allows only the four TLP 1.0 definitions here.
        return Ok(o
            .get("definition")
            .and_then(|d| member(d, "tlp"))
            .and_then(Value::as_str)
            .and_then(|l| match l {
                "white" => Some(Tlp::Clear),
                other => other.parse().ok(),
            }));
    }
    Ok(None)
}

/// Reads the TLP markings of `bundle`: the levels its marking definitions declare, checked
/// against the fixed ids, then each object's references.
fn markings<'b>(bundle: &'b Bundle<'_>) -> Result<Marked<'b>, Failure> {
    let objects: &[Value<'_>] = member(bundle.as_json(), "objects")
        .and_then(Value::as_array)
        .unwrap_or_default();
    let ids = bundle.object_ids();
    let mismatch = |m: String| refuse(Reason::TlpMismatch, m);
    // The levels the bundle's own marking definitions declare (the first of an id counts), by
    // id: every reference of every object is looked up here, and a bundle may hold thousands
    // of each.
    let mut defined: std::collections::HashMap<&str, Tlp> = std::collections::HashMap::new();
    for (index, (object, id)) in objects.iter().zip(ids).enumerate() {
        let Some(o) = object.as_object() else {
            continue;
        };
        if o.get("type").and_then(Value::as_str) != Some("marking-definition") {
            continue;
        }
        let level =
            declared_level(o).map_err(|why| mismatch(format!("objects[{index}] {id}: {why}")))?;
        let Some(level) = level else { continue };
        if let Some((_, fixed)) = MARKINGS.iter().find(|(m, _)| *m == id)
            && *fixed != level
        {
            return Err(mismatch(format!(
                "objects[{index}] {id} defines {}, but that id is {}'s",
                label(level),
                label(*fixed)
            )));
        }
        defined.entry(id.as_ref()).or_insert(level);
    }
    let level_of = |marking: &str| -> Option<Tlp> {
        MARKINGS
            .iter()
            .find(|(m, _)| *m == marking)
            .map(|(_, t)| *t)
            .or_else(|| defined.get(marking).copied())
    };
    let mut marked = Marked {
        objects: Vec::with_capacity(ids.len()),
        highest: None,
    };
    for (index, (object, id)) in objects.iter().zip(ids).enumerate() {
        let mut own: Option<Tlp> = None;
        let mut note = |tlp: Tlp, property: MarkingSite, marked: &mut Marked<'b>| {
            own = own.max(Some(tlp));
            if marked.highest.as_ref().is_none_or(|h| tlp > h.tlp) {
                marked.highest = Some(Highest {
                    tlp,
                    index,
                    object_id: id.to_string(),
                    property,
                });
            }
        };
        let refs = member(object, "object_marking_refs")
            .and_then(Value::as_array)
            .unwrap_or_default();
        for (i, r) in refs.iter().enumerate() {
            if let Some(tlp) = r.as_str().and_then(level_of) {
                note(tlp, MarkingSite::ObjectMarkingRef(i), &mut marked);
            }
        }
        let granular = member(object, "granular_markings")
            .and_then(Value::as_array)
            .unwrap_or_default();
        for (i, g) in granular.iter().enumerate() {
            if let Some(tlp) = member(g, "marking_ref")
                .and_then(Value::as_str)
                .and_then(level_of)
            {
                note(tlp, MarkingSite::GranularMarking(i), &mut marked);
            }
        }
        marked.objects.push(ObjectMarking { id, own });
    }
    Ok(marked)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::{collections::HashMap, sync::Mutex};

    use concordat_proto::{envelope::Kind, ids::MessageId};
    use serde_json::{Value, json};
    use time::OffsetDateTime;

    use super::*;
    use crate::{
        content::ContentKind,
        policy::{ConsentLedger, Policy, VerifiedTokens},
    };

    const RED: &str = "marking-definition--e828b379-4e03-4974-9ac4-e53a884c97c1";
    const AMBER_STRICT: &str = "marking-definition--939a9414-2ddd-4d32-a0cd-375ea402b003";
    const AMBER: &str = "marking-definition--55d920b0-5e8b-4f79-9ee9-91f868d9b421";
    const GREEN1: &str = "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da";
    const WHITE: &str = "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9";
    const RED1: &str = "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed";
    const INDICATOR: &str = "indicator--6f1e5a2b-3c4d-4e5f-8a6b-7c8d9e0f1a2b";
    const MALWARE: &str = "malware--9a8b7c6d-5e4f-4321-9fed-cba987654321";
    const CUSTOM: &str = "marking-definition--0b1c2d3e-4f5a-4b6c-8d7e-9f0a1b2c3d4e";

    struct NoLedger;

    impl ConsentLedger for NoLedger {
        fn is_revoked(
            &self,
            _: &concordat_proto::paserk::KeyId,
            _: &concordat_proto::consent::TokenId,
            _: OffsetDateTime,
        ) -> Result<bool, Internal> {
            Ok(false)
        }
        fn uses(
            &self,
            _: &concordat_proto::paserk::KeyId,
            _: &concordat_proto::consent::TokenId,
        ) -> Result<u32, Internal> {
            Ok(0)
        }
    }

    /// Provenance in memory: (holder, object id) → what was received.
    #[derive(Default)]
    struct Memory(Mutex<HashMap<(String, String), Received>>);

    impl Provenance for Memory {
        fn received(&self, holder: &AgencyId, id: &str) -> Result<Option<Received>, Internal> {
            Ok(self
                .0
                .lock()
                .unwrap()
                .get(&(holder.to_string(), id.to_owned()))
                .cloned())
        }
    }

    fn agency(s: &str) -> AgencyId {
        s.parse().unwrap()
    }

    /// A bundle: an indicator marked `indicator`, a malware with granular markings `malware`,
    /// and `extra` objects.
    fn bundle(indicator: &[&str], malware: &[&str], extra: &[Value]) -> Vec<u8> {
        let mut i = json!({
            "type": "indicator", "spec_version": "2.1", "id": INDICATOR,
            "created": "2026-11-30T09:15:00.000Z", "modified": "2026-11-30T10:00:00.000Z",
            "pattern": "[ipv4-addr:value = '198.51.100.7']", "pattern_type": "stix",
            "valid_from": "2026-11-30T09:00:00Z"
        });
        if !indicator.is_empty() {
            i["object_marking_refs"] = json!(indicator);
        }
        let mut m = json!({
            "type": "malware", "spec_version": "2.1", "id": MALWARE,
            "created": "2026-11-30T09:15:00.000Z", "modified": "2026-11-30T09:15:00.000Z",
            "name": "LockBit", "is_family": true
        });
        if !malware.is_empty() {
            m["granular_markings"] = json!(
                malware
                    .iter()
                    .map(|r| json!({"marking_ref": r, "selectors": ["name"]}))
                    .collect::<Vec<_>>()
            );
        }
        let mut objects = vec![i, m];
        objects.extend(extra.iter().cloned());
        serde_json::to_vec(&json!({
            "type": "bundle",
            "id": "bundle--b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e",
            "objects": objects,
        }))
        .unwrap()
    }

    /// A TLP 2.0 marking definition object `id` declaring `level`.
    fn tlp2(id: &str, level: &str) -> Value {
        json!({
            "type": "marking-definition", "spec_version": "2.1", "id": id,
            "created": "2022-10-01T00:00:00.000Z", "name": format!("TLP:{}", level.to_uppercase()),
            "extensions": {TLP2_EXTENSION: {"extension_type": "property-extension", "tlp_2_0": level}}
        })
    }

    fn limit(to: &str, max: Option<Tlp>) -> FlowLimit {
        FlowLimit {
            recipient: agency(to),
            agreement_id: "mou".into(),
            clause: "4.2".into(),
            max_tlp: max,
        }
    }

    struct Row {
        what: &'static str,
        from: &'static str,
        to: &'static [&'static str],
        tlp: Tlp,
        /// A STIX bundle, or JSON without markings when `None`.
        payload: Option<Vec<u8>>,
        max_tlp: Option<Tlp>,
        want: Result<&'static [(&'static str, Tlp)], (Reason, &'static str)>,
    }

    fn run(row: Row, memory: &Memory) -> Result<Carried, Failure> {
        let policy = Policy::default();
        let verified = VerifiedTokens::default();
        let matcher = crate::registry::Matcher::new(&crate::registry::Registry::default()).unwrap();
        let cx = Context {
            policy: &policy,
            organisations: &matcher,
            verified: &verified,
            max_payload_bytes: 1 << 20,
            ledger: &NoLedger,
            provenance: memory,
            now: OffsetDateTime::now_utc(),
            payload_digest: [0; 32],
        };
        let (content_type, payload) = match row.payload {
            Some(p) => ("application/stix+json;version=2.1", p),
            None => ("application/json", b"{}".to_vec()),
        };
        let envelope = Envelope {
            message_id: MessageId::new_random(),
            recipients: row.to.iter().map(|r| agency(r)).collect(),
            kind: Kind::ThreatAssessment,
            organisation: None,
            incident_ref: None,
            content_type: content_type.into(),
            tlp: row.tlp,
            payload,
            consent_token: None,
            organisations: Vec::new(),
            consent_tokens: Vec::new(),
            significance: None,
            workflow: None,
        };
        let content =
            Content::read(ContentKind::of(content_type).unwrap(), &envelope.payload).unwrap();
        let limits: Vec<FlowLimit> = row.to.iter().map(|r| limit(r, row.max_tlp)).collect();
        check(&cx, &agency(row.from), &envelope, &content, &limits)
    }

    #[test]
    fn definitions_are_known_by_the_whole_type() {
        let uuid = "4b3e2a1c-5d6f-4a7b-8c9d-0e1f2a3b4c5d";
        for (id, want) in [
            (format!("marking-definition--{uuid}"), true),
            (format!("extension-definition--{uuid}"), true),
            (format!("indicator--{uuid}"), false),
            (format!("marking-definition--x--{uuid}"), false),
            (format!("x-marking-definition--{uuid}"), false),
        ] {
            assert_eq!(is_definition(&id), want, "{id}");
        }
    }

    #[test]
    fn the_rules_in_order() {
        let memory = Memory::default();
        // The ICO received the malware from the NCA under RED; the NCSC received the indicator
        // from the ICO under RED.
        memory.0.lock().unwrap().insert(
            ("ncsc".into(), INDICATOR.into()),
            Received {
                first_transfer: "t-first".into(),
                from: [agency("ico")].into_iter().collect(),
                tlp: Tlp::Red,
            },
        );
        let rows = vec![
            Row {
                what: "unmarked bundle: the envelope's TLP stands, and covers every object",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::AmberStrict,
                payload: Some(bundle(&[], &[], &[])),
                max_tlp: None,
                want: Ok(&[(INDICATOR, Tlp::AmberStrict), (MALWARE, Tlp::AmberStrict)]),
            },
            Row {
                what: "marked RED, envelope AMBER",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::Amber,
                payload: Some(bundle(&[RED], &[], &[])),
                max_tlp: None,
                want: Err((Reason::TlpMismatch, "objects[0] indicator--6f1e5a2b")),
            },
            Row {
                what: "granular AMBER+STRICT beats object-level AMBER",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::Amber,
                payload: Some(bundle(&[AMBER], &[AMBER_STRICT], &[])),
                max_tlp: None,
                want: Err((Reason::TlpMismatch, "granular_markings[0].marking_ref")),
            },
            Row {
                what: "envelope above the bundle's markings",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::Red,
                payload: Some(bundle(&[AMBER], &[], &[])),
                max_tlp: None,
                want: Err((Reason::TlpMismatch, "the envelope says TLP:RED")),
            },
            Row {
                what: "the most restrictive wins; only objects at AMBER+STRICT and above are kept",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::AmberStrict,
                payload: Some(bundle(&[AMBER], &[GREEN1, AMBER_STRICT], &[])),
                max_tlp: None,
                want: Ok(&[(MALWARE, Tlp::AmberStrict)]),
            },
            Row {
                what: "TLP 1.0 WHITE is CLEAR",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::Clear,
                payload: Some(bundle(&[WHITE], &[], &[])),
                max_tlp: None,
                want: Ok(&[]),
            },
            Row {
                what: "TLP 1.0 RED is RED",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::Red,
                payload: Some(bundle(&[RED1], &[], &[])),
                max_tlp: None,
                want: Ok(&[(INDICATOR, Tlp::Red), (MALWARE, Tlp::Red)]),
            },
            Row {
                what: "a marking an object defines in the bundle with the TLP 2.0 extension",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::Amber,
                payload: Some(bundle(&[CUSTOM], &[], &[tlp2(CUSTOM, "red")])),
                max_tlp: None,
                want: Err((Reason::TlpMismatch, "TLP:RED")),
            },
            Row {
                what: "a bundle redefining a fixed TLP id",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::Clear,
                payload: Some(bundle(&[RED], &[], &[tlp2(RED, "clear")])),
                max_tlp: None,
                want: Err((Reason::TlpMismatch, "that id is TLP:RED's")),
            },
            Row {
                what: "the official RED definition, included, is fine",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::Red,
                payload: Some(bundle(&[RED], &[], &[tlp2(RED, "red")])),
                max_tlp: None,
                want: Ok(&[(INDICATOR, Tlp::Red), (MALWARE, Tlp::Red)]),
            },
            Row {
                what: "an unknown tlp_2_0 level",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::Red,
                payload: Some(bundle(&[CUSTOM], &[], &[tlp2(CUSTOM, "orange")])),
                max_tlp: None,
                want: Err((Reason::TlpMismatch, "\"orange\" is not a TLP 2.0 level")),
            },
            Row {
                what: "a non-TLP marking changes nothing",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::Green,
                payload: Some(bundle(
                    &[CUSTOM],
                    &[],
                    &[
                        json!({"type": "marking-definition", "spec_version": "2.1", "id": CUSTOM,
                        "created": "2026-11-30T09:15:00.000Z", "definition_type": "statement",
                        "definition": {"statement": "Copyright NCSC"}}),
                    ],
                )),
                max_tlp: None,
                want: Ok(&[]),
            },
            Row {
                what: "above the flow's max_tlp",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::AmberStrict,
                payload: None,
                max_tlp: Some(Tlp::Amber),
                want: Err((Reason::TlpNotPermitted, "permits at most TLP:AMBER")),
            },
            Row {
                what: "at the flow's max_tlp",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::Amber,
                payload: None,
                max_tlp: Some(Tlp::Amber),
                want: Ok(&[]),
            },
            Row {
                what: "RED to two recipients",
                from: "ico",
                to: &["ncsc", "nca"],
                tlp: Tlp::Red,
                payload: None,
                max_tlp: None,
                want: Err((
                    Reason::TlpNotPermitted,
                    "exactly one recipient per transfer; this one names 2 (ncsc, nca): send it to \
                     each named recipient separately, if each may have it (to ncsc: agreement \
                     mou, clause 4.2; to nca: agreement mou, clause 4.2)",
                )),
            },
            Row {
                what: "received under RED, on to a third agency",
                from: "ncsc",
                to: &["nca"],
                tlp: Tlp::Green,
                payload: Some(bundle(&[], &[], &[])),
                max_tlp: None,
                want: Err((
                    Reason::TlpOnwardForbidden,
                    "in transfer t-first (from ico): it may go back to ico but not on to nca (to \
                     nca: agreement mou, clause 4.2)",
                )),
            },
            Row {
                what: "received under RED, back to where it came from",
                from: "ncsc",
                to: &["ico"],
                tlp: Tlp::Red,
                payload: Some(bundle(&[RED], &[], &[])),
                max_tlp: None,
                want: Ok(&[(INDICATOR, Tlp::Red), (MALWARE, Tlp::Red)]),
            },
            Row {
                what: "a mismatch is found before onward sharing",
                from: "ncsc",
                to: &["nca"],
                tlp: Tlp::Green,
                payload: Some(bundle(&[RED], &[], &[])),
                max_tlp: None,
                want: Err((Reason::TlpMismatch, "TLP:RED")),
            },
        ];
        for row in rows {
            let what = row.what;
            let want = row.want;
            let got = run(row, &memory);
            match (got, want) {
                (Ok(carried), Ok(restricted)) => {
                    let got: Vec<(&str, Tlp)> = carried
                        .restricted
                        .iter()
                        .map(|r| (r.object_id.as_str(), r.tlp))
                        .collect();
                    assert_eq!(got, restricted, "{what}");
                }
                (Err(Failure::Refused(r)), Err((reason, says))) => {
                    assert_eq!(r.reason, reason, "{what}: {}", r.message);
                    assert!(r.message.contains(says), "{what}: {}", r.message);
                }
                (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn a_bundle_s_object_ids_are_carried_but_definitions_never_restricted() {
        let memory = Memory::default();
        let got = run(
            Row {
                what: "",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::Red,
                payload: Some(bundle(&[RED], &[], &[tlp2(RED, "red")])),
                max_tlp: None,
                want: Ok(&[]),
            },
            &memory,
        )
        .unwrap();
        assert_eq!(got.object_ids, [INDICATOR, MALWARE, RED]);
        assert!(got.restricted.iter().all(|r| r.object_id != RED));
        // JSON carries no objects.
        let got = run(
            Row {
                what: "",
                from: "ico",
                to: &["nca"],
                tlp: Tlp::Red,
                payload: None,
                max_tlp: None,
                want: Ok(&[]),
            },
            &memory,
        )
        .unwrap();
        assert_eq!(got, Carried::default());
    }

    #[test]
    fn a_bundle_whose_ids_do_not_fit_in_its_audit_entry_is_refused() {
        let indicator = |i: usize| {
            json!({
                "type": "indicator", "spec_version": "2.1",
                "id": format!("indicator--00000000-0000-4000-8000-{i:012}"),
                "created": "2026-11-30T09:15:00.000Z", "modified": "2026-11-30T10:00:00.000Z",
                "pattern": "[ipv4-addr:value = '198.51.100.7']", "pattern_type": "stix",
                "valid_from": "2026-11-30T09:00:00Z"
            })
        };
        // Each id is 47 bytes, 50 counted.
        let fits = MAX_AUDITED_ID_BYTES / 50;
        for (n, refused) in [(fits - 2, false), (fits + 1, true)] {
            let objects: Vec<Value> = (0..n).map(indicator).collect();
            let got = run(
                Row {
                    what: "",
                    from: "ico",
                    to: &["nca"],
                    tlp: Tlp::Green,
                    payload: Some(
                        serde_json::to_vec(&json!({
                            "type": "bundle",
                            "id": "bundle--b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e",
                            "objects": objects,
                        }))
                        .unwrap(),
                    ),
                    max_tlp: None,
                    want: Ok(&[]),
                },
                &Memory::default(),
            );
            match got {
                Err(Failure::Refused(r)) if refused => {
                    assert_eq!(r.reason, Reason::PayloadTooLarge, "{}", r.message);
                    assert!(r.message.contains("split it"), "{}", r.message);
                }
                Ok(c) if !refused => {
                    // What is accepted fits in an audit entry, with room to spare.
                    let entry = concordat_proto::pb::TransferAccepted {
                        stix_object_ids: c.object_ids,
                        ..Default::default()
                    };
                    use prost::Message as _;
                    assert!(entry.encoded_len() <= MAX_AUDITED_ID_BYTES);
                }
                other => panic!("{n} objects: {other:?}"),
            }
        }
    }

    #[test]
    fn the_fixed_ids_are_the_published_ones() {
        // Each level once in TLP 2.0, and TLP 1.0 without AMBER+STRICT.
        let v2: Vec<Tlp> = MARKINGS[..5].iter().map(|(_, t)| *t).collect();
        assert_eq!(v2, Tlp::ALL);
        assert!(MARKINGS.iter().all(|(id, _)| id.len() == 56));
    }
}
