//! The leak check: which organisations a transfer identifies. They are those its envelope
//! declares (`organisation`, `organisations`) together with those its payload names: every
//! string of an inspectable payload (a STIX bundle, an incident record, any JSON, keys
//! included; text as one string) is scanned once for every registered organisation's names
//! and identifiers ([`crate::registry::Matcher`]), and an incident record's `organisations`
//! name theirs by id. A workflow step's free text (an objection's ground or reason,
//! [`Step::text`]) is scanned like a payload's string, whatever the payload: it cannot carry
//! an organisation's name without that organisation's consent either.
//! Each organisation identified needs its own consent token (the consent step); one the payload
//! names without a token is refused `ORGANISATION_IDENTIFIED`, with where it was found (the
//! STIX object's index, id and property, or a JSON path) and never the matched text.

use std::cell::RefCell;

use concordat_proto::{envelope::Envelope, ids::OrgId, workflow::Step};

use crate::{
    content::Content,
    registry::{JsonMatch, JsonSite, Matcher, OrgMatch, Scratch},
};

/// One organisation a transfer identifies, and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identified {
    /// The organisation.
    pub org: OrgId,
    /// Whether the envelope declares it (`organisation` or `organisations`).
    pub declared: bool,
    /// Where the payload names it first (never the matched text), if it does.
    pub found_at: Option<String>,
}

thread_local! {
    /// The matcher's buffers, reused by every scan on this thread.
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The organisations `envelope` identifies: those it declares first, in its order, then those
/// only its payload names, in document order, then those only its workflow step's text names.
/// `content` is what `envelope.payload` reads as ([`Content::read`]).
pub fn identified(
    matcher: &Matcher,
    envelope: &Envelope,
    content: &Content<'_>,
) -> Vec<Identified> {
    let mut out: Vec<Identified> = envelope
        .declared_organisations()
        .map(|org| Identified {
            org: org.clone(),
            declared: true,
            found_at: None,
        })
        .collect();
    let mut add = |org: &OrgId, place: String| match out.iter_mut().find(|i| &i.org == org) {
        Some(i) => {
            i.found_at.get_or_insert(place);
        }
        None => out.push(Identified {
            org: org.clone(),
            declared: false,
            found_at: Some(place),
        }),
    };
    if let Content::Incident(record, _) = content {
        for org in &record.organisations {
            add(org, "the record's organisations".into());
        }
    }
    let value = match content {
        Content::Stix(bundle) => Some(bundle.as_json()),
        Content::Incident(_, value) | Content::Json(value) => Some(value),
        Content::Text(_) | Content::Opaque => None,
    };
    if let Some(value) = value {
        // `content` is what the payload read as, so the payload is the document's text, which
        // the matcher scans whole first and walks only if it could name someone.
        let found = SCRATCH.with(|s| match s.try_borrow_mut() {
            Ok(mut scratch) => matcher.scan_json_text_with(&mut scratch, &envelope.payload, value),
            // Only re-entered if a scan panicked mid-way on this thread; start afresh.
            Err(_) => matcher.scan_json(value),
        });
        for m in &found {
            let place = match content {
                Content::Stix(bundle) => stix_place(m, bundle.object_ids()),
                _ => json_place(m),
            };
            add(m.org, place);
        }
    }
    if let Content::Text(text) = content {
        for m in scan_text(matcher, text) {
            add(m.org, format!("its {} in the text", m.kind));
        }
    }
    if let Some((field, text)) = envelope.workflow.as_ref().and_then(step_text) {
        for m in scan_text(matcher, text) {
            add(m.org, format!("its {} in {field}", m.kind));
        }
    }
    // The incident reference is delivered with the payload (the recipient's inbox file holds
    // it): a name in it identifies as one in the payload does.
    if let Some(reference) = &envelope.incident_ref {
        for m in scan_text(matcher, reference) {
            add(m.org, format!("its {} in incident_ref", m.kind));
        }
    }
    out
}

/// The organisations `text` names, scanned as one string (as a JSON string value is).
fn scan_text<'m>(matcher: &'m Matcher, text: &str) -> Vec<OrgMatch<'m>> {
    SCRATCH.with(|s| match s.try_borrow_mut() {
        Ok(mut scratch) => {
            let mut found = Vec::new();
            matcher.scan_with(&mut scratch, text, &mut found);
            found
        }
        // Only re-entered if a scan panicked mid-way on this thread; start afresh.
        Err(_) => matcher.scan(text).collect(),
    })
}

/// A workflow step's free text, with the envelope field it travels in.
fn step_text(step: &Step) -> Option<(&'static str, &str)> {
    let field = match step {
        Step::DsarAnswer { .. } => "workflow.dsar_answer.objection",
        Step::CommsAnswer { .. } => "workflow.comms_answer.objection",
        _ => "workflow",
    };
    step.text().map(|text| (field, text))
}

/// Where a match is in a JSON document, in words.
fn json_place(m: &JsonMatch<'_>) -> String {
    match m.site {
        JsonSite::Value => format!("its {} at {}", m.kind, m.path),
        JsonSite::Key => format!("its {} in a property name of {}", m.kind, m.path),
    }
}

/// Where a match is in a STIX bundle: the object's index and id, and the property inside it,
/// when it is inside an object of `objects`.
fn stix_place(m: &JsonMatch<'_>, ids: &[std::borrow::Cow<'_, str>]) -> String {
    let object = m.path.strip_prefix("$.objects[").and_then(|rest| {
        let (index, rest) = rest.split_once(']')?;
        let index: usize = index.parse().ok()?;
        Some((
            index,
            ids.get(index)?,
            rest.strip_prefix('.').unwrap_or(rest),
        ))
    });
    match object {
        Some((index, id, property)) => {
            let property = if property.is_empty() {
                "the object itself".to_owned()
            } else {
                format!("property {property}")
            };
            let key = match m.site {
                JsonSite::Value => "",
                JsonSite::Key => " (in a property name)",
            };
            format!("its {} in object {index} ({id}), {property}{key}", m.kind)
        }
        None => json_place(m),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use concordat_proto::pb;

    use super::*;
    use crate::{
        content::ContentKind,
        registry::{Organisation, OrganisationSpec, Registry},
    };

    fn matcher() -> Matcher {
        let org = |id: &str, name: &str, number: Option<&str>, domain: &str| {
            Organisation::new(OrganisationSpec {
                id: id.into(),
                legal_name: name.into(),
                company_number: number.map(Into::into),
                domains: vec![domain.into()],
                ..Default::default()
            })
            .unwrap()
        };
        let registry = Registry::new(vec![
            org("acme-ltd", "Acme Ltd", Some("01234567"), "acme.example"),
            org("globex-plc", "Globex PLC", None, "globex.example"),
        ])
        .unwrap();
        Matcher::new(&registry).unwrap()
    }

    fn envelope(organisation: Option<&str>, content_type: &str, payload: &[u8]) -> Envelope {
        Envelope::try_from(pb::Envelope {
            message_id: "0b0f5a0e-7d3c-4f7e-9a55-1c2d3e4f5a6b".into(),
            recipients: vec!["ico".into()],
            kind: pb::MessageKind::ThreatAssessment as i32,
            organisation: organisation.unwrap_or_default().into(),
            content_type: content_type.into(),
            tlp: pb::Tlp::Amber as i32,
            payload: payload.to_vec(),
            ..Default::default()
        })
        .unwrap()
    }

    const STIX_BUNDLE: &str = r#"{"type":"bundle","id":"bundle--b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e","objects":[
        {"type":"indicator","spec_version":"2.1","id":"indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f",
         "created":"2026-11-30T09:15:00.000Z","modified":"2026-11-30T09:15:00.000Z",
         "pattern":"[domain-name:value = 'vpn.ACME.example']","pattern_type":"stix",
         "valid_from":"2026-11-30T09:15:00Z","description":"Seen against Globex plc's mail gateway"}]}"#;

    /// A bundle whose only name is written with JSON escapes (`\u0020`, `\n`), which the
    /// raw text hides from a naive scan.
    const STIX_ESCAPED: &str = r#"{"type":"bundle","id":"bundle--b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e","objects":[
        {"type":"indicator","spec_version":"2.1","id":"indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f",
         "created":"2026-11-30T09:15:00.000Z","modified":"2026-11-30T09:15:00.000Z",
         "pattern":"[domain-name:value = 'vpn.example.test']","pattern_type":"stix",
         "valid_from":"2026-11-30T09:15:00Z","description":"Seen against\nAcme\u0020Ltd's mail gateway"}]}"#;

    #[test]
    fn declared_then_named_each_once_with_where() {
        let m = matcher();
        // (what, declared, content type, payload, [(organisation, declared, found at)])
        type Want<'a> = Vec<(&'a str, bool, Option<&'a str>)>;
        type Case<'a> = (&'a str, Option<&'a str>, &'a str, &'a [u8], Want<'a>);
        let cases: Vec<Case<'_>> = vec![
            (
                "json: a name in a description, mixed case",
                None,
                "application/json",
                br#"{"notes":[{"description":"a breach at ACME limited"}]}"#,
                vec![(
                    "acme-ltd",
                    false,
                    Some("its name at $.notes[0].description"),
                )],
            ),
            (
                "json: a company number",
                None,
                "application/json",
                br#"{"company":"01234567"}"#,
                vec![("acme-ltd", false, Some("its company number at $.company"))],
            ),
            (
                "json: a company number as a number with an exponent",
                None,
                "application/json",
                br#"{"company":1.234567e6}"#,
                vec![("acme-ltd", false, Some("its company number at $.company"))],
            ),
            (
                "declared and named",
                Some("acme-ltd"),
                "application/json",
                br#"{"url":"https://portal.acme.example/login"}"#,
                vec![("acme-ltd", true, Some("its name at $.url"))],
            ),
            (
                "stix: object, id and property, in document order",
                None,
                "application/stix+json;version=2.1",
                STIX_BUNDLE.as_bytes(),
                vec![
                    (
                        "acme-ltd",
                        false,
                        Some(
                            "its name in object 0 \
                             (indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f), property pattern",
                        ),
                    ),
                    (
                        "globex-plc",
                        false,
                        Some(
                            "its name in object 0 \
                             (indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f), property description",
                        ),
                    ),
                ],
            ),
            (
                "stix: a name written with escapes",
                None,
                "application/stix+json;version=2.1",
                STIX_ESCAPED.as_bytes(),
                vec![(
                    "acme-ltd",
                    false,
                    Some(
                        "its name in object 0 \
                         (indicator--8e2e2d2b-17d4-4cbf-938f-98ee46b3cd3f), property description",
                    ),
                )],
            ),
            (
                "json: a name split by an escape, in a key",
                None,
                "application/json",
                br#"{"notes":{"ACME\tLimited":"x"}}"#,
                vec![(
                    "acme-ltd",
                    false,
                    Some("its name in a property name of $.notes"),
                )],
            ),
            (
                "opaque: only what is declared",
                Some("globex-plc"),
                "application/pdf",
                b"Acme Ltd",
                vec![("globex-plc", true, None)],
            ),
            (
                "markdown: a name in the text",
                None,
                "text/markdown",
                b"# Statement\n\nThe ICO and the NCSC are aware of an incident at **ACME Limited**.",
                vec![("acme-ltd", false, Some("its name in the text"))],
            ),
            (
                "plain text: a domain",
                None,
                "text/plain; charset=utf-8",
                b"Phishing from login.globex.example continues.",
                vec![("globex-plc", false, Some("its name in the text"))],
            ),
            (
                "nobody",
                None,
                "application/json",
                br#"{"text":"acmeltd notacme.example 012345678"}"#,
                vec![],
            ),
        ];
        for (what, org, content_type, payload, want) in cases {
            let e = envelope(org, content_type, payload);
            let content =
                Content::read(ContentKind::of(content_type).unwrap(), &e.payload).unwrap();
            let got: Vec<(String, bool, Option<String>)> = identified(&m, &e, &content)
                .into_iter()
                .map(|i| (i.org.to_string(), i.declared, i.found_at))
                .collect();
            let want: Vec<(String, bool, Option<String>)> = want
                .into_iter()
                .map(|(o, d, f)| (o.to_owned(), d, f.map(str::to_owned)))
                .collect();
            assert_eq!(got, want, "{what}");
        }
    }

    /// The envelope's incident reference is delivered with the payload (it is in the
    /// recipient's inbox file), so a name or number in it identifies the organisation as the
    /// payload would: before, `Acme-Ltd-breach` passed unscanned.
    #[test]
    fn an_incident_reference_is_scanned_whatever_the_payload() {
        let m = matcher();
        let cases: [(&str, &str, Option<&str>); 4] = [
            (
                "ncsc:Acme-Ltd-breach",
                "application/octet-stream",
                Some("acme-ltd"),
            ),
            ("ncsc:01234567", "application/json", Some("acme-ltd")),
            ("ncsc:acme.example", "text/plain", Some("acme-ltd")),
            ("ncsc:INC-2026-0042", "application/octet-stream", None),
        ];
        for (incident_ref, content_type, want) in cases {
            let mut e = envelope(None, content_type, b"{}");
            e.incident_ref = Some(incident_ref.into());
            let content =
                Content::read(ContentKind::of(content_type).unwrap(), &e.payload).unwrap();
            let got: Vec<(String, Option<String>)> = identified(&m, &e, &content)
                .into_iter()
                .map(|i| (i.org.to_string(), i.found_at))
                .collect();
            match want {
                Some(org) => {
                    assert_eq!(got.len(), 1, "{incident_ref}: {got:?}");
                    assert_eq!(got[0].0, org, "{incident_ref}");
                    let place = got[0].1.as_deref().unwrap_or_default();
                    assert!(
                        place.ends_with("in incident_ref"),
                        "{incident_ref}: {place}"
                    );
                }
                None => assert!(got.is_empty(), "{incident_ref}: {got:?}"),
            }
        }
    }

    #[test]
    fn a_workflow_steps_text_is_scanned_whatever_the_payload() {
        use concordat_proto::workflow::{CommsAnswer, DsarAnswer};
        let m = matcher();
        // (what, step, content type, [(organisation, found at)])
        type Case<'a> = (&'a str, Step, &'a str, Vec<(&'a str, &'a str)>);
        let cases: Vec<Case<'_>> = vec![
            (
                "a DSAR objection naming an organisation, opaque payload",
                Step::DsarAnswer {
                    consultation: "nca:DSAR-1".parse().unwrap(),
                    answer: DsarAnswer::Objection(
                        "Schedule 2: it would prejudice the inquiry into Acme Ltd".into(),
                    ),
                },
                "application/octet-stream",
                vec![("acme-ltd", "its name in workflow.dsar_answer.objection")],
            ),
            (
                "a statement objection naming a company number, JSON payload",
                Step::CommsAnswer {
                    statement: "ico:press-1".parse().unwrap(),
                    answer: CommsAnswer::Objection("not before 01234567 is told".into()),
                },
                "application/json",
                vec![(
                    "acme-ltd",
                    "its company number in workflow.comms_answer.objection",
                )],
            ),
            (
                "an objection naming nobody",
                Step::CommsAnswer {
                    statement: "ico:press-1".parse().unwrap(),
                    answer: CommsAnswer::Objection("the date is too early".into()),
                },
                "application/json",
                vec![],
            ),
            (
                "no text: an approval",
                Step::CommsAnswer {
                    statement: "ico:press-1".parse().unwrap(),
                    answer: CommsAnswer::Approve,
                },
                "application/json",
                vec![],
            ),
        ];
        for (what, step, content_type, want) in cases {
            let mut e = envelope(None, content_type, b"{}");
            e.workflow = Some(step);
            let content =
                Content::read(ContentKind::of(content_type).unwrap(), &e.payload).unwrap();
            let got: Vec<(String, bool, Option<String>)> = identified(&m, &e, &content)
                .into_iter()
                .map(|i| (i.org.to_string(), i.declared, i.found_at))
                .collect();
            let want: Vec<(String, bool, Option<String>)> = want
                .into_iter()
                .map(|(o, f)| (o.to_owned(), false, Some(f.to_owned())))
                .collect();
            assert_eq!(got, want, "{what}");
        }
    }
}
