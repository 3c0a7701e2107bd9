//! STIX 2.1 bundles: validation of the specification's MUST rules, and a validated view.
//!
//! What is checked, for the bundle and then for each object in order (the first failure is
//! reported, naming the object's index in `objects`, its `id` and the property):
//! - the bundle: a JSON object with `type` `bundle`, an `id` `bundle--<UUID>` and, if present,
//!   `objects` an array of at most [`MAX_OBJECTS`] JSON objects;
//! - every object: `type` a valid type name (3–250 of `a-z 0-9 -`, starting with a letter);
//!   `id` `<type>--<UUID>` (RFC 4122 variant) with the same type; top-level property names
//!   of `a-z A-Z 0-9 _`;
//! - `spec_version` `2.1`, required on every object but cyber-observables (SCOs) and custom
//!   objects, and when present on those;
//! - `created`/`modified` where required (SDOs, SROs, language content, extension definitions;
//!   `created` on marking definitions): RFC 3339 UTC timestamps with at least millisecond
//!   precision, `modified` not before `created`; other timestamp properties RFC 3339 UTC;
//! - the properties each specified type requires (`name`, `pattern`, `source_ref`, …);
//! - every `*_ref` property, at any depth, is an identifier and every `*_refs` a non-empty
//!   list of identifiers, of a type the specification allows for that property;
//! - lists at the top level of an object are not empty;
//! - marking definitions: a TLP marking is exactly one of the four the specification
//!   defines; a statement marking has a `statement`; any other has a definition or
//!   extensions. `object_marking_refs` name marking definitions; every `granular_markings`
//!   entry has non-empty `selectors` that each select something present in the object, and a
//!   `marking_ref` (a marking definition) or a `lang`.
//!
//! - `ipv4-addr` and `ipv6-addr` values are addresses or CIDR blocks;
//! - no object, at any depth, holds a member name twice (the broker's own rule: JSON leaves
//!   repeated names undefined, and readers disagree on which one counts).
//!
//! STIX patterns are not parsed and other SCO property formats (hashes, MAC addresses) are not checked:
//! see `docs/stix.md` for where this differs from the OASIS validator.

use super::{JsonObject, Value, member};

use super::{ObjectAt, StringAt, walk_strings};

/// Why a repeated member name is refused.
const REPEATED: &str = "repeats a member name of its object: JSON leaves repeated names \
     undefined and parsers disagree on which value counts";

/// The most objects a bundle may hold.
pub const MAX_OBJECTS: usize = 10_000;

/// A STIX 2.1 bundle whose every object passed validation.
#[derive(Debug, Clone)]
pub struct Bundle<'a> {
    value: Value<'a>,
    /// The objects' ids: borrowed from the payload unless written with escapes.
    ids: Vec<std::borrow::Cow<'a, str>>,
}

impl<'a> Bundle<'a> {
    /// Validates `value` as a STIX 2.1 bundle.
    pub fn validate(value: Value<'a>) -> Result<Bundle<'a>, StixError> {
        let ids = check_bundle(&value)?;
        Ok(Bundle { value, ids })
    }

    /// The ids of the objects, in order.
    pub fn object_ids(&self) -> &[std::borrow::Cow<'a, str>] {
        &self.ids
    }

    /// The bundle as JSON.
    pub fn as_json(&self) -> &Value<'a> {
        &self.value
    }

    /// Calls `f` with every string in the bundle, each object's with its index and id.
    pub fn for_each_string(&self, f: &mut dyn FnMut(StringAt<'_>)) {
        let Value::Object(bundle) = &self.value else {
            return;
        };
        for (key, item) in bundle.iter() {
            if key == "objects" {
                continue;
            }
            let mut path = super::JsonPath(format!("$.{key}"));
            f(StringAt {
                object: None,
                path: &path.0,
                is_key: true,
                text: key,
            });
            walk_strings(item, &mut path, None, f);
        }
        let objects = bundle.get("objects").and_then(Value::as_array);
        for (index, (object, id)) in objects
            .into_iter()
            .flatten()
            .zip(self.ids.iter())
            .enumerate()
        {
            let at = ObjectAt { index, id };
            walk_strings(object, &mut super::JsonPath::root(), Some(at), f);
        }
    }
}

/// A broken MUST rule, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("STIX bundle{}: {message}", where_(.index, .id, .property))]
pub struct StixError {
    /// The object's index in `objects`; `None` for the bundle itself.
    pub index: Option<usize>,
    /// The object's id, if it has a usable one.
    pub id: Option<String>,
    /// The property at fault (a path such as `granular_markings[0].selectors`).
    pub property: String,
    /// What is wrong.
    pub message: String,
}

fn where_(index: &Option<usize>, id: &Option<String>, property: &str) -> String {
    let mut s = String::new();
    if let Some(i) = index {
        s.push_str(&format!(" objects[{i}]"));
        if let Some(id) = id {
            s.push_str(&format!(" ({id})"));
        }
    }
    if !property.is_empty() {
        s.push_str(&format!(" property `{property}`"));
    }
    s
}

/// Domain objects (SDOs) of STIX 2.1, with the properties each requires beyond the common ones.
const SDOS: &[(&str, &[&str])] = &[
    ("attack-pattern", &["name"]),
    ("campaign", &["name"]),
    ("course-of-action", &["name"]),
    ("grouping", &["context", "object_refs"]),
    ("identity", &["name"]),
    ("incident", &["name"]),
    ("indicator", &["pattern", "pattern_type", "valid_from"]),
    ("infrastructure", &["name"]),
    ("intrusion-set", &["name"]),
    ("location", &[]),
    ("malware", &["is_family"]),
    ("malware-analysis", &["product"]),
    ("note", &["content", "object_refs"]),
    (
        "observed-data",
        &["first_observed", "last_observed", "number_observed"],
    ),
    ("opinion", &["opinion", "object_refs"]),
    ("report", &["name", "published", "object_refs"]),
    ("threat-actor", &["name"]),
    ("tool", &["name"]),
    ("vulnerability", &["name"]),
];

/// Relationship objects (SROs), with their required properties.
const SROS: &[(&str, &[&str])] = &[
    (
        "relationship",
        &["relationship_type", "source_ref", "target_ref"],
    ),
    ("sighting", &["sighting_of_ref"]),
];

/// Cyber-observable objects (SCOs), with their required properties.
const SCOS: &[(&str, &[&str])] = &[
    ("artifact", &[]),
    ("autonomous-system", &["number"]),
    ("directory", &["path"]),
    ("domain-name", &["value"]),
    ("email-addr", &["value"]),
    ("email-message", &["is_multipart"]),
    ("file", &[]),
    ("ipv4-addr", &["value"]),
    ("ipv6-addr", &["value"]),
    ("mac-addr", &["value"]),
    ("mutex", &["name"]),
    ("network-traffic", &["protocols"]),
    ("process", &[]),
    ("software", &["name"]),
    ("url", &["value"]),
    ("user-account", &[]),
    ("windows-registry-key", &[]),
    ("x509-certificate", &[]),
];

/// Meta objects, with their required properties beyond `type`, `id`, `spec_version`.
const META: &[(&str, &[&str])] = &[
    ("marking-definition", &["created"]),
    (
        "language-content",
        &["created", "modified", "object_ref", "contents"],
    ),
    (
        "extension-definition",
        &[
            "created",
            "modified",
            "created_by_ref",
            "name",
            "schema",
            "version",
            "extension_types",
        ],
    ),
];

/// Properties holding timestamps (besides `created` and `modified`).
const TIMESTAMPS: &[&str] = &[
    "valid_from",
    "valid_until",
    "first_seen",
    "last_seen",
    "published",
    "first_observed",
    "last_observed",
    "start_time",
    "stop_time",
    "submitted",
    "analysis_started",
    "analysis_ended",
];

/// Whether `name` is one of [`TIMESTAMPS`] (a `match`, which the compiler turns into a jump
/// on the length, where `TIMESTAMPS.contains` compares with every entry).
fn is_timestamp_property(name: &str) -> bool {
    matches!(
        name,
        "valid_from"
            | "valid_until"
            | "first_seen"
            | "last_seen"
            | "published"
            | "first_observed"
            | "last_observed"
            | "start_time"
            | "stop_time"
            | "submitted"
            | "analysis_started"
            | "analysis_ended"
    )
}

/// The four TLP marking definitions of STIX 2.1: level, id.
const TLP: &[(&str, &str)] = &[
    (
        "white",
        "marking-definition--613f2e26-407d-48c7-9eca-b8e91df99dc9",
    ),
    (
        "green",
        "marking-definition--34098fce-860f-48ae-8e50-ebd3cc5e41da",
    ),
    (
        "amber",
        "marking-definition--f88d31f6-486f-44da-b317-01333bde0b82",
    ),
    (
        "red",
        "marking-definition--5e57c739-391a-4eb3-b6be-7d15ca92d5ed",
    ),
];
/// When the TLP marking definitions were created.
const TLP_CREATED: &str = "2017-01-20T00:00:00.000Z";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Category {
    Sdo,
    Sro,
    Sco,
    Meta,
    Custom,
}

fn category(t: &str) -> (Category, &'static [&'static str]) {
    for (table, c) in [
        (SDOS, Category::Sdo),
        (SROS, Category::Sro),
        (SCOS, Category::Sco),
        (META, Category::Meta),
    ] {
        if let Some((_, req)) = table.iter().find(|(n, _)| *n == t) {
            return (c, req);
        }
    }
    (Category::Custom, &[])
}

fn is_sco(t: &str) -> bool {
    SCOS.iter().any(|(n, _)| *n == t)
}

/// Which types a reference property may point at, if the specification restricts it.
#[derive(Debug, Clone, Copy)]
enum Allowed {
    Only(&'static [&'static str]),
    /// Any SDO, SCO or custom object, but no relationship, sighting or meta object.
    NotSroOrMeta,
    /// Only SCOs.
    Sco,
    /// Any SDO (or custom object).
    Sdo,
    Any,
}

fn allowed(object_type: &str, property: &str) -> Allowed {
    match (object_type, property) {
        (_, "created_by_ref") => Allowed::Only(&["identity"]),
        (_, "object_marking_refs" | "marking_ref") => Allowed::Only(&["marking-definition"]),
        ("relationship", "source_ref" | "target_ref") => Allowed::NotSroOrMeta,
        ("sighting", "sighting_of_ref") => Allowed::Sdo,
        ("sighting", "where_sighted_refs") => Allowed::Only(&["identity", "location"]),
        ("sighting", "observed_data_refs") => Allowed::Only(&["observed-data"]),
        ("malware", "sample_refs") => Allowed::Only(&["file", "artifact"]),
        ("malware", "operating_system_refs") => Allowed::Only(&["software"]),
        ("malware-analysis", "sample_ref") => {
            Allowed::Only(&["file", "artifact", "network-traffic"])
        }
        ("malware-analysis", "host_vm_ref" | "operating_system_ref") => {
            Allowed::Only(&["software"])
        }
        ("malware-analysis", "installed_software_refs") => Allowed::Only(&["software"]),
        ("malware-analysis", "analysis_sco_refs") => Allowed::Sco,
        ("observed-data", "object_refs") => Allowed::Sco,
        _ => Allowed::Any,
    }
}

fn check_bundle<'a>(value: &Value<'a>) -> Result<Vec<std::borrow::Cow<'a, str>>, StixError> {
    let top = |property: &str, message: String| StixError {
        index: None,
        id: None,
        property: property.to_owned(),
        message,
    };
    let Value::Object(bundle) = value else {
        return Err(top("", "is not a JSON object".into()));
    };
    // Repeated member names, in the bundle itself and below its members but `objects`, whose
    // every object is checked for them on its own.
    let repeated = super::repeated_name(bundle).map(str::to_owned).or_else(|| {
        bundle
            .iter()
            .filter(|(key, _)| *key != "objects")
            .find_map(|(key, item)| {
                super::repeated_member(item).map(|path| format!("{key}{}", &path[1..]))
            })
    });
    if let Some(property) = repeated {
        return Err(top(&property, REPEATED.into()));
    }
    match bundle.get("type") {
        Some(Value::Str(t)) if t == "bundle" => {}
        _ => return Err(top("type", "must be \"bundle\"".into())),
    }
    match bundle.get("id") {
        Some(Value::Str(id)) if identifier(id).is_some_and(|(t, _)| t == "bundle") => {}
        _ => return Err(top("id", "must be bundle--<UUID>".into())),
    }
    let objects = match bundle.get("objects") {
        None => return Ok(Vec::new()),
        Some(Value::Array(objects)) => objects,
        Some(_) => return Err(top("objects", "must be an array".into())),
    };
    if objects.len() > MAX_OBJECTS {
        return Err(top(
            "objects",
            format!(
                "holds {} objects; at most {MAX_OBJECTS} are accepted",
                objects.len()
            ),
        ));
    }
    let mut ids = Vec::with_capacity(objects.len());
    for (index, object) in objects.iter().enumerate() {
        ids.push(check_object(index, object)?);
    }
    Ok(ids)
}

/// Checks one object; returns its id.
fn check_object<'a>(
    index: usize,
    value: &Value<'a>,
) -> Result<std::borrow::Cow<'a, str>, StixError> {
    let mut at = ObjectCheck { index, id: None };
    let Value::Object(o) = value else {
        return Err(at.err("", "is not a JSON object"));
    };
    let members = Members::of(o);
    let t = match members.type_ {
        Some(Value::Str(t)) if is_type_name(t) => t.as_ref(),
        Some(Value::Str(t)) => {
            return Err(at.err(
                "type",
                format!("{t:?} is not a type name (3-250 of a-z 0-9 -, starting with a letter)"),
            ));
        }
        Some(_) => return Err(at.err("type", "must be a string")),
        None => return Err(at.err("type", "is required")),
    };
    let id = match members.id {
        Some(Value::Str(id)) => match identifier(id) {
            Some((it, _)) if it == t => id,
            Some((it, _)) => {
                return Err(at.err(
                    "id",
                    format!("{id:?} names type {it}, but the object is a {t}"),
                ));
            }
            None => return Err(at.err("id", format!("{id:?} is not {t}--<UUID>"))),
        },
        Some(_) => return Err(at.err("id", "must be a string")),
        None => return Err(at.err("id", "is required")),
    };
    at.id = Some(id.as_ref());
    if let Some(path) = super::repeated_member(value) {
        let property = path.strip_prefix("$.").unwrap_or(&path);
        return Err(at.err(property, REPEATED));
    }
    if let Some(name) = members.bad_name {
        return Err(at.err(name, "is not a property name (a-z A-Z 0-9 _)"));
    }
    let (cat, required) = category(t);
    match (members.spec_version, cat) {
        (Some(Value::Str(v)), _) if v == "2.1" => {}
        (Some(v), _) => {
            return Err(at.err("spec_version", format!("is {v}; this is a STIX 2.1 bundle")));
        }
        (None, Category::Sco | Category::Custom) => {}
        (None, _) => return Err(at.err("spec_version", "is required")),
    }
    if matches!(cat, Category::Sdo | Category::Sro) {
        for (p, v) in [("created", members.created), ("modified", members.modified)] {
            if v.is_none() {
                return Err(at.err(p, "is required"));
            }
        }
    }
    for p in required {
        if !o.contains_key(p) {
            return Err(at.err(p, "is required"));
        }
    }
    let created = timestamp_value(&at, "created", members.created, true)?;
    let modified = timestamp_value(&at, "modified", members.modified, true)?;
    if let (Some(c), Some(m)) = (created, modified)
        && m < c
    {
        return Err(at.err("modified", "is before created"));
    }
    // One pass over the object's members finds its timestamps (a lookup per name in
    // TIMESTAMPS would search the object a dozen times); only if one is bad are they checked
    // again in TIMESTAMPS' order, so that the first bad one in that order is reported.
    let timestamps_ok = o
        .iter()
        .all(|(name, v)| !is_timestamp_property(name) || v.as_str().and_then(timestamp).is_some());
    if !timestamps_ok {
        for p in TIMESTAMPS {
            timestamp_prop(&at, o, p, false)?;
        }
    }
    // No list at the top level is empty; references, at any depth but inside observed-data's
    // deprecated `objects` map (whose references are keys into that map, not identifiers).
    for (name, v) in o.iter() {
        if let Value::Array(items) = v
            && items.is_empty()
        {
            return Err(at.err(name, "is an empty list; a list property must not be empty"));
        }
        if t == "observed-data" && name == "objects" {
            continue;
        }
        check_refs(&at, t, name, PropPath::Top(name), v)?;
    }
    if t == "marking-definition" {
        check_marking_definition(&at, id, o)?;
    }
    if t == "ipv4-addr" || t == "ipv6-addr" {
        let v4 = t == "ipv4-addr";
        match o.get("value") {
            Some(Value::Str(v)) if is_address(v, v4) => {}
            _ => {
                return Err(at.err(
                    "value",
                    format!(
                        "must be an {} address or CIDR block",
                        if v4 { "IPv4" } else { "IPv6" }
                    ),
                ));
            }
        }
    }
    if let Some(g) = members.granular_markings {
        check_granular_markings(&at, o, g)?;
    }
    Ok(id.clone())
}

/// The object being checked, for the errors that name it.
struct ObjectCheck<'a> {
    index: usize,
    id: Option<&'a str>,
}

impl ObjectCheck<'_> {
    fn err(&self, property: &str, message: impl Into<String>) -> StixError {
        StixError {
            index: Some(self.index),
            id: self.id.map(str::to_owned),
            property: property.to_owned(),
            message: message.into(),
        }
    }
}

/// The members of an object that every object's check reads, found in one pass over its
/// member list (a `get` for each would search the list again each time): the first of each
/// name, as `get` finds it; and the first member name that is not a property name.
#[derive(Default)]
struct Members<'v, 'a> {
    type_: Option<&'v Value<'a>>,
    id: Option<&'v Value<'a>>,
    spec_version: Option<&'v Value<'a>>,
    created: Option<&'v Value<'a>>,
    modified: Option<&'v Value<'a>>,
    granular_markings: Option<&'v Value<'a>>,
    bad_name: Option<&'v str>,
}

impl<'v, 'a> Members<'v, 'a> {
    fn of(o: &'v JsonObject<'a>) -> Self {
        let mut m = Members::default();
        for (name, v) in o.iter() {
            let slot = match name {
                "type" => &mut m.type_,
                "id" => &mut m.id,
                "spec_version" => &mut m.spec_version,
                "created" => &mut m.created,
                "modified" => &mut m.modified,
                "granular_markings" => &mut m.granular_markings,
                _ => {
                    if m.bad_name.is_none() && !is_property_name(name) {
                        m.bad_name = Some(name);
                    }
                    continue;
                }
            };
            slot.get_or_insert(v);
        }
        m
    }
}

/// A STIX property name: 1 to 250 of `a-z A-Z 0-9 _`.
fn is_property_name(name: &str) -> bool {
    (1..=250).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
}

/// Checks the timestamp property `name` if present; `created`/`modified` need millisecond
/// precision. Returns its value as comparable parts.
fn timestamp_prop(
    at: &ObjectCheck<'_>,
    o: &JsonObject<'_>,
    name: &str,
    millis: bool,
) -> Result<Option<Timestamp>, StixError> {
    timestamp_value(at, name, o.get(name), millis)
}

/// As [`timestamp_prop`], given the property's value if present.
fn timestamp_value(
    at: &ObjectCheck<'_>,
    name: &str,
    value: Option<&Value<'_>>,
    millis: bool,
) -> Result<Option<Timestamp>, StixError> {
    let Some(v) = value else {
        return Ok(None);
    };
    let Value::Str(s) = v else {
        return Err(at.err(name, "must be a timestamp string"));
    };
    match timestamp(s) {
        Some(ts) if !millis || ts.fraction_digits >= 3 => Ok(Some(ts)),
        Some(_) => Err(at.err(
            name,
            format!("{s:?} must be precise to at least the millisecond"),
        )),
        None => Err(at.err(
            name,
            format!("{s:?} is not an RFC 3339 timestamp in UTC (YYYY-MM-DDTHH:MM:SS[.s]Z)"),
        )),
    }
}

/// A parsed STIX timestamp: comparable as (date-time digits, fraction).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Timestamp {
    seconds: (i32, u8, u8, u8, u8, u8),
    /// The fraction's digits, right-padded to 9.
    nanos: u32,
    fraction_digits: usize,
}

/// Whether `s` is `YYYY-MM-DDTHH:MM:SS[.fraction]Z`: RFC 3339 in UTC, as STIX writes it.
pub(crate) fn is_utc_timestamp(s: &str) -> bool {
    timestamp(s).is_some()
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.fraction]Z`, the only timestamp form STIX allows. Every
/// bundle object has two or three timestamps, so the digits are read in place, without a
/// number parser, and the date is checked against the Gregorian calendar directly.
fn timestamp(s: &str) -> Option<Timestamp> {
    let b = s.as_bytes();
    let (head, rest) = b.split_at_checked(19)?;
    let [
        y0,
        y1,
        y2,
        y3,
        b'-',
        m0,
        m1,
        b'-',
        d0,
        d1,
        b'T',
        h0,
        h1,
        b':',
        n0,
        n1,
        b':',
        s0,
        s1,
    ] = *head
    else {
        return None;
    };
    let [year, month, day, hour, minute, second] = [
        digits([y0, y1, y2, y3])?,
        digits([m0, m1])?,
        digits([d0, d1])?,
        digits([h0, h1])?,
        digits([n0, n1])?,
        digits([s0, s1])?,
    ];
    let (nanos, fraction_digits) = match rest {
        [b'Z'] => (0, 0),
        [b'.', digits @ .., b'Z']
            if !digits.is_empty() && digits.iter().all(u8::is_ascii_digit) =>
        {
            let mut n: u32 = 0;
            for i in 0..9 {
                n = n * 10 + digits.get(i).map_or(0, |d| u32::from(d - b'0'));
            }
            (n, digits.len())
        }
        _ => return None,
    };
    if !(1..=12).contains(&month)
        || day == 0
        || day > days_in_month(year, month)
        || hour > 23
        || minute > 59
        || second > 59
    {
        return None;
    }
    Some(Timestamp {
        seconds: (
            i32::try_from(year).ok()?,
            u8::try_from(month).ok()?,
            u8::try_from(day).ok()?,
            u8::try_from(hour).ok()?,
            u8::try_from(minute).ok()?,
            u8::try_from(second).ok()?,
        ),
        nanos,
        fraction_digits,
    })
}

/// The number that the ASCII digits `d` write, if they are all digits.
fn digits<const N: usize>(d: [u8; N]) -> Option<u32> {
    d.iter().try_fold(0u32, |n, &c| {
        c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0'))
    })
}

/// The days of `month` (1–12) in `year` of the proleptic Gregorian calendar.
fn days_in_month(year: u32, month: u32) -> u32 {
    match month {
        2 if year.is_multiple_of(4) && (!year.is_multiple_of(100) || year.is_multiple_of(400)) => {
            29
        }
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Where a property is inside an object (`external_references[0].source_ref`), spelt out
/// only when an error names it.
#[derive(Debug, Clone, Copy)]
enum PropPath<'a> {
    /// A top-level property.
    Top(&'a str),
    /// A member of the object at the path.
    Key(&'a PropPath<'a>, &'a str),
    /// An item of the list at the path.
    Index(&'a PropPath<'a>, usize),
}

impl std::fmt::Display for PropPath<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PropPath::Top(name) => f.write_str(name),
            PropPath::Key(parent, key) => write!(f, "{parent}.{key}"),
            PropPath::Index(parent, i) => write!(f, "{parent}[{i}]"),
        }
    }
}

/// Checks reference properties under `value` (the property `name` at `path`).
fn check_refs(
    at: &ObjectCheck<'_>,
    object_type: &str,
    name: &str,
    path: PropPath<'_>,
    value: &Value<'_>,
) -> Result<(), StixError> {
    if name.ends_with("_ref") {
        let Value::Str(r) = value else {
            return Err(at.err(&path.to_string(), "must be an identifier string"));
        };
        return check_ref(at, object_type, name, path, r);
    }
    if name.ends_with("_refs") {
        let Value::Array(items) = value else {
            return Err(at.err(&path.to_string(), "must be a list of identifiers"));
        };
        if items.is_empty() {
            return Err(at.err(&path.to_string(), "must not be empty"));
        }
        for (i, item) in items.iter().enumerate() {
            let p = PropPath::Index(&path, i);
            let Value::Str(r) = item else {
                return Err(at.err(&p.to_string(), "must be an identifier string"));
            };
            check_ref(at, object_type, name, p, r)?;
        }
        return Ok(());
    }
    match value {
        Value::Object(m) => {
            for (k, v) in m.iter() {
                check_refs(at, object_type, k, PropPath::Key(&path, k), v)?;
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                if let Value::Object(m) = v {
                    let item = PropPath::Index(&path, i);
                    for (k, v) in m.iter() {
                        check_refs(at, object_type, k, PropPath::Key(&item, k), v)?;
                    }
                }
            }
        }
        _ => {}
    }
    Ok(())
}

fn check_ref(
    at: &ObjectCheck<'_>,
    object_type: &str,
    name: &str,
    path: PropPath<'_>,
    r: &str,
) -> Result<(), StixError> {
    let Some((target, _)) = identifier(r) else {
        return Err(at.err(
            &path.to_string(),
            format!("{r:?} is not an identifier (type--UUID)"),
        ));
    };
    let ok = match allowed(object_type, name) {
        Allowed::Any => true,
        Allowed::Only(types) => types.contains(&target),
        Allowed::Sco => is_sco(target),
        Allowed::Sdo => {
            matches!(category(target).0, Category::Sdo | Category::Custom) && !is_sco(target)
        }
        Allowed::NotSroOrMeta => {
            !matches!(category(target).0, Category::Sro | Category::Meta) && target != "bundle"
        }
    };
    if ok {
        Ok(())
    } else {
        Err(at.err(
            &path.to_string(),
            format!("refers to a {target}, which {object_type}.{name} may not reference"),
        ))
    }
}

fn check_marking_definition(
    at: &ObjectCheck<'_>,
    id: &str,
    o: &JsonObject<'_>,
) -> Result<(), StixError> {
    let definition_type = o.get("definition_type");
    let definition = o.get("definition");
    match definition_type {
        Some(Value::Str(dt)) if dt == "tlp" => {
            let level = definition
                .and_then(|d| member(d, "tlp"))
                .and_then(Value::as_str)
                .unwrap_or_default();
            let Some((_, tlp_id)) = TLP.iter().find(|(l, _)| *l == level) else {
                return Err(at.err("definition.tlp", "must be white, green, amber or red"));
            };
            if *tlp_id != id {
                return Err(at.err(
                    "id",
                    format!(
                        "a TLP:{} marking must be the one STIX defines, {tlp_id}",
                        level.to_uppercase()
                    ),
                ));
            }
            if o.get("created").and_then(Value::as_str) != Some(TLP_CREATED) {
                return Err(at.err(
                    "created",
                    format!("a TLP marking defined by STIX was created {TLP_CREATED}"),
                ));
            }
            Ok(())
        }
        Some(Value::Str(dt)) if dt == "statement" => {
            match definition.and_then(|d| member(d, "statement")) {
                Some(Value::Str(_)) => Ok(()),
                _ => Err(at.err("definition.statement", "is required and must be a string")),
            }
        }
        Some(Value::Str(_)) => match definition {
            Some(Value::Object(_)) => Ok(()),
            _ => Err(at.err("definition", "is required with definition_type")),
        },
        Some(_) => Err(at.err("definition_type", "must be a string")),
        None if o.contains_key("extensions") => {
            if definition.is_some() {
                return Err(at.err("definition", "requires definition_type"));
            }
            Ok(())
        }
        None => Err(at.err(
            "definition_type",
            "a marking definition needs definition_type and definition, or extensions",
        )),
    }
}

fn check_granular_markings(
    at: &ObjectCheck<'_>,
    o: &JsonObject<'_>,
    g: &Value<'_>,
) -> Result<(), StixError> {
    let Value::Array(markings) = g else {
        return Err(at.err("granular_markings", "must be a list"));
    };
    let mut lookup = Lookup::default();
    for (i, m) in markings.iter().enumerate() {
        let p = |k: &str| format!("granular_markings[{i}]{k}");
        let Value::Object(m) = m else {
            return Err(at.err(&p(""), "must be an object"));
        };
        match m.get("marking_ref") {
            Some(_) => {}
            None if matches!(m.get("lang"), Some(Value::Str(_))) => {}
            None => return Err(at.err(&p(""), "needs a marking_ref or a lang")),
        }
        if let Some(lang) = m.get("lang")
            && !lang.is_string()
        {
            return Err(at.err(&p(".lang"), "must be a string"));
        }
        let selectors = match m.get("selectors") {
            Some(Value::Array(s)) if !s.is_empty() => s,
            _ => return Err(at.err(&p(".selectors"), "must be a non-empty list")),
        };
        for (j, s) in selectors.iter().enumerate() {
            let Value::Str(s) = s else {
                return Err(at.err(&p(&format!(".selectors[{j}]")), "must be a string"));
            };
            if !selects(&mut lookup, o, s) {
                return Err(at.err(
                    &p(&format!(".selectors[{j}]")),
                    format!("{s:?} selects nothing present in the object"),
                ));
            }
        }
    }
    Ok(())
}

/// Finds members by name for selectors. An object's members are a list, searched from the
/// start, and a bundle may hold one object of many thousands of members and as many
/// selectors into it: each object of more than [`super::SMALL_OBJECT`] members is indexed once, the first time a
/// selector steps into it, so that the selectors cost time linear in their length, not in the
/// objects' sizes. (Repeated member names were refused before, so the index is unambiguous.)
#[derive(Default)]
struct Lookup<'v, 'a> {
    /// Indexes by the object's address, which is stable while the document is borrowed.
    indexes: std::collections::HashMap<usize, std::collections::HashMap<&'v str, &'v Value<'a>>>,
}

impl<'v, 'a> Lookup<'v, 'a> {
    fn get(&mut self, object: &'v JsonObject<'a>, key: &str) -> Option<&'v Value<'a>> {
        if object.len() <= super::SMALL_OBJECT {
            return object.get(key);
        }
        let index = self
            .indexes
            .entry(std::ptr::from_ref(object) as usize)
            .or_insert_with(|| object.iter().collect());
        index.get(key).copied()
    }
}

/// Whether the selector `s` (`a.b.[2].c`) selects something present in `object`.
fn selects<'v, 'a>(lookup: &mut Lookup<'v, 'a>, object: &'v JsonObject<'a>, s: &str) -> bool {
    let mut steps = s.split('.');
    let Some(mut here) = steps.next().and_then(|first| lookup.get(object, first)) else {
        return false;
    };
    for step in steps {
        let next = if let Some(i) = step.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            match (i.parse::<usize>(), here) {
                (Ok(i), Value::Array(items)) => items.get(i),
                _ => None,
            }
        } else {
            match here {
                Value::Object(m) => lookup.get(m, step),
                _ => None,
            }
        };
        match next {
            Some(v) => here = v,
            None => return false,
        }
    }
    true
}

/// An IPv4 (or IPv6) address, optionally with a CIDR prefix length.
fn is_address(s: &str, v4: bool) -> bool {
    let (addr, prefix) = match s.split_once('/') {
        Some((a, p)) => (a, Some(p)),
        None => (s, None),
    };
    let (parsed, max) = if v4 {
        (addr.parse::<std::net::Ipv4Addr>().is_ok(), 32)
    } else {
        (addr.parse::<std::net::Ipv6Addr>().is_ok(), 128)
    };
    parsed
        && prefix.is_none_or(|p| {
            !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && p.parse::<u32>().is_ok_and(|n| n <= max)
        })
}

/// A STIX type name: 3 to 250 of `a-z 0-9 -`, starting with a letter.
fn is_type_name(t: &str) -> bool {
    (3..=250).contains(&t.len())
        && t.as_bytes()[0].is_ascii_lowercase()
        && t.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Splits an identifier `type--UUID` into its type and UUID, if well-formed (the UUID of the
/// RFC 4122 variant).
pub(crate) fn identifier(s: &str) -> Option<(&str, &str)> {
    // The UUID is the last 36 bytes, after `--`; it holds no `--` itself, so this is the
    // split at the last `--` (without a substring search, which costs more here than the
    // rest of the check: every id and reference of a bundle comes through).
    let at = s.len().checked_sub(38)?;
    let t = s.get(..at)?;
    if s.get(at..at + 2)? != "--" {
        return None;
    }
    let uuid = s.get(at + 2..)?;
    if !is_type_name(t) {
        return None;
    }
    // Eight bytes at a time: the groups of 8, 4 + 4, 4 + 4 and 8 hex digits around the
    // dashes at 8, 13, 18 and 23 (every id and reference of a bundle comes through here).
    let b = uuid.as_bytes();
    let word = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?))
    };
    let half = |at: usize| -> Option<u64> {
        Some(u64::from(u32::from_le_bytes(
            b.get(at..at + 4)?.try_into().ok()?,
        )))
    };
    let hex = [
        word(0)?,
        half(9)? | half(14)? << 32,
        half(19)? | half(24)? << 32,
        word(28)?,
    ];
    if !hex.into_iter().all(all_hex) || [8, 13, 18, 23].iter().any(|&i| b.get(i) != Some(&b'-')) {
        return None;
    }
    // The variant: the first digit of the fourth group is 8, 9, a or b.
    if !matches!(b[19], b'8' | b'9' | b'a' | b'b' | b'A' | b'B') {
        return None;
    }
    Some((t, uuid))
}

/// Whether each of the eight bytes of `x` is an ASCII hex digit. Each range test is done on
/// all bytes at once by addition: adding `0x80 - lo` to a byte below 0x80 sets its top bit
/// exactly when it is at least `lo`, and carries into no other byte.
fn all_hex(x: u64) -> bool {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const TOP: u64 = 0x8080_8080_8080_8080;
    if x & TOP != 0 {
        return false;
    }
    let digit = (x + (0x80 - 0x30) * ONES) & !(x + (0x80 - 0x3a) * ONES);
    // `A`–`F` and `a`–`f`, and nothing else, become `a`–`f` with bit 0x20 set.
    let lower = x | (0x20 * ONES);
    let letter = (lower + (0x80 - 0x61) * ONES) & !(lower + (0x80 - 0x67) * ONES);
    (digit | letter) & TOP == TOP
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn all_hex_agrees_with_the_byte_test_on_every_byte() {
        for c in 0..=255u8 {
            for at in 0..8 {
                let mut bytes = *b"0a9FfA5c";
                bytes[at] = c;
                assert_eq!(
                    all_hex(u64::from_le_bytes(bytes)),
                    c.is_ascii_hexdigit(),
                    "byte {c:#x} at {at}"
                );
            }
        }
    }

    #[test]
    fn timestamps() {
        let rows = [
            ("2026-01-01T00:00:00Z", Some(0)),
            ("2026-01-01T00:00:00.123Z", Some(3)),
            ("2026-01-01T00:00:00.123456789Z", Some(9)),
            ("2026-01-01t00:00:00Z", None),
            ("2026-01-01T00:00:00z", None),
            ("2026-01-01T00:00:00+00:00", None),
            ("2026-02-30T00:00:00Z", None),
            // The calendar: leap years, month lengths, months and days out of range.
            ("2024-02-29T00:00:00Z", Some(0)),
            ("2000-02-29T00:00:00Z", Some(0)),
            ("2100-02-29T00:00:00Z", None),
            ("2026-02-29T00:00:00Z", None),
            ("2026-04-31T00:00:00Z", None),
            ("2026-12-31T23:59:59.999Z", Some(3)),
            ("2026-00-10T00:00:00Z", None),
            ("2026-13-10T00:00:00Z", None),
            ("2026-01-00T00:00:00Z", None),
            ("2026-01-01T00:60:00Z", None),
            ("2026-01-01T00:00:00.1234567891Z", Some(10)),
            ("2026-01-01T00:00:00.12aZ", None),
            ("-026-01-01T00:00:00Z", None),
            ("2026-01-01T00:00:00ZZ", None),
            ("2026-01-01T00:00:60Z", None),
            ("2026-01-01T24:00:00Z", None),
            ("2026-01-01T00:00:00.Z", None),
            ("20260101T000000Z", None),
            ("", None),
            (
                "\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}\u{e9}Z",
                None,
            ),
        ];
        for (s, want) in rows {
            assert_eq!(timestamp(s).map(|t| t.fraction_digits), want, "{s}");
        }
        assert!(timestamp("2026-01-01T00:00:00.1Z") > timestamp("2026-01-01T00:00:00.099Z"));
    }

    #[test]
    fn identifiers() {
        let rows = [
            ("indicator--4b3e2a1c-5d6f-4a7b-8c9d-0e1f2a3b4c5d", true),
            ("indicator--4B3E2A1C-5D6F-4A7B-8C9D-0E1F2A3B4C5D", true),
            ("indicator--4b3e2a1c-5d6f-4a7b-0c9d-0e1f2a3b4c5d", false),
            ("indicator--4b3e2a1c5d6f-4a7b-8c9d-0e1f2a3b4c5d-", false),
            ("in--4b3e2a1c-5d6f-4a7b-8c9d-0e1f2a3b4c5d", false),
            ("indicator-4b3e2a1c-5d6f-4a7b-8c9d-0e1f2a3b4c5d", false),
            ("indicator--", false),
            ("--", false),
        ];
        for (s, ok) in rows {
            assert_eq!(identifier(s).is_some(), ok, "{s}");
        }
        // Every byte at every place of the UUID, against the rule read byte by byte.
        let valid = "4b3e2a1c-5d6f-4a7b-8c9d-0e1f2a3b4c5d";
        for at in 0..valid.len() {
            for c in (0..=255u8).filter(|c| c.is_ascii()) {
                let mut uuid = valid.as_bytes().to_vec();
                uuid[at] = c;
                let want = uuid.iter().enumerate().all(|(i, b)| match i {
                    8 | 13 | 18 | 23 => *b == b'-',
                    19 => b"89abAB".contains(b),
                    _ => b.is_ascii_hexdigit(),
                });
                let id = format!("tool--{}", String::from_utf8(uuid).unwrap());
                assert_eq!(identifier(&id).is_some(), want, "{id}");
            }
        }
    }

    #[test]
    fn repeated_member_names_are_refused_in_the_bundle_and_in_objects() {
        let object = r#"{"type":"malware","spec_version":"2.1","id":"malware--9a8b7c6d-5e4f-4321-9fed-cba987654321","created":"2026-11-30T09:15:00.000Z","modified":"2026-11-30T09:15:00.000Z","name":"LockBit","is_family":true,"x_meta":{"k":[{"v":1,"v":2}]}}"#;
        let rows = [
            (
                r#"{"type":"bundle","id":"bundle--b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e","type":"bundle","objects":[]}"#.to_owned(),
                None,
                "type",
            ),
            (
                r#"{"type":"bundle","id":"bundle--b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e","x":{"a":1,"a":1},"objects":[]}"#.to_owned(),
                None,
                "x.a",
            ),
            (
                format!(
                    r#"{{"type":"bundle","id":"bundle--b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e","objects":[{object}]}}"#
                ),
                Some(0),
                "x_meta.k[0].v",
            ),
        ];
        for (text, index, property) in rows {
            let value = crate::content::parse_json(text.as_bytes()).unwrap();
            let e = Bundle::validate(value).expect_err(&text);
            assert_eq!((e.index, e.property.as_str()), (index, property), "{e}");
            assert!(e.message.contains("repeats a member name"), "{e}");
        }
    }

    /// `identifier` splits at the last `--` without searching: it agrees with the split by
    /// search on ids and near-ids (a `-` too many or too few, other characters, other lengths).
    #[test]
    fn identifier_agrees_with_the_split_at_the_last_double_hyphen() {
        fn by_search(s: &str) -> Option<(&str, &str)> {
            let (t, uuid) = s.rsplit_once("--")?;
            let well_formed = is_type_name(t)
                && uuid.len() == 36
                && uuid.bytes().enumerate().all(|(i, c)| {
                    if matches!(i, 8 | 13 | 18 | 23) {
                        c == b'-'
                    } else {
                        c.is_ascii_hexdigit()
                    }
                })
                && matches!(uuid.as_bytes()[19], b'8' | b'9' | b'a' | b'b' | b'A' | b'B');
            well_formed.then_some((t, uuid))
        }
        let base = "indicator--4b3e2a1c-5d6f-4a7b-8c9d-0e1f2a3b4c5d";
        let alphabet = ["a", "-", "--", "4", "8", "\u{e9}", "x-", "B"];
        let mut state = 0x9e37_79b9_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let (mut checked, mut valid) = (0, 0);
        for _ in 0..200_000 {
            let mut s = base.to_owned();
            for _ in 0..(next() % 3) {
                let at = (next() as usize) % (s.len() + 1);
                let piece = alphabet[(next() as usize) % alphabet.len()];
                match next() % 3 {
                    0 if s.is_char_boundary(at) => s.insert_str(at, piece),
                    1 if at < s.len() && s.is_char_boundary(at) && s.is_char_boundary(at + 1) => {
                        s.remove(at);
                    }
                    _ => s = format!("{piece}{s}"),
                }
            }
            assert_eq!(identifier(&s), by_search(&s), "{s}");
            checked += 1;
            valid += usize::from(by_search(&s).is_some());
        }
        assert!(
            valid > 10_000 && checked - valid > 10_000,
            "{valid} of {checked} valid"
        );
    }

    /// Every property of the list is recognised (one the `match` had and the list lacked
    /// would only be checked again and pass).
    #[test]
    fn the_timestamp_properties_are_the_list() {
        assert!(TIMESTAMPS.iter().all(|p| is_timestamp_property(p)));
        for other in ["created", "modified", "valid_from_", "name", ""] {
            assert!(!is_timestamp_property(other), "{other}");
        }
    }

    /// Selectors into large objects go through an index built once per object: the same
    /// answers as in small objects, and a bundle of one object with 50,000 members and 50,000
    /// selectors into it is validated at once (searched member by member, as before the index,
    /// it took seconds; found by review).
    #[test]
    fn selectors_into_large_objects() {
        let members: Vec<String> = (0..40)
            .map(|i| format!("\"k{i}\":{{\"n{i}\":[{i}]}}"))
            .collect();
        let text = format!(
            "{{{},\"big\":{{{}}}}}",
            members.join(","),
            members.join(",")
        );
        let v = crate::content::parse_json(text.as_bytes()).unwrap();
        let o = v.as_object().unwrap();
        let mut lookup = Lookup::default();
        for (s, ok) in [
            ("k0", true),
            ("k39", true),
            ("k40", false),
            ("k7.n7", true),
            ("k7.n8", false),
            ("k7.n7.[0]", true),
            ("big.k39.n39.[0]", true),
            ("big.k39.n38", false),
            ("big", true),
        ] {
            assert_eq!(selects(&mut lookup, o, s), ok, "{s}");
        }

        let n = 50_000;
        let names: Vec<String> = (0..n).map(|i| format!("x_{i:06}")).collect();
        let selectors: Vec<String> = names.iter().rev().map(|m| format!("\"{m}\"")).collect();
        let fields: Vec<String> = names.iter().map(|m| format!("\"{m}\":0")).collect();
        let bundle = format!(
            r#"{{"type":"bundle","id":"bundle--b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e","objects":[{{"type":"x-foo","id":"x-foo--4b3e2a1c-5d6f-4a7b-8c9d-0e1f2a3b4c5d","granular_markings":[{{"lang":"en","selectors":[{}]}}],{}}}]}}"#,
            selectors.join(","),
            fields.join(",")
        );
        let value = crate::content::parse_json(bundle.as_bytes()).unwrap();
        let got = Bundle::validate(value).unwrap();
        assert_eq!(got.object_ids().len(), 1);
    }

    #[test]
    fn selectors() {
        let v = crate::content::parse_json(br#"{"a":{"b":[1,{"c":2}]},"l":["x"]}"#).unwrap();
        let o = v.as_object().unwrap();
        for (s, ok) in [
            ("a", true),
            ("a.b", true),
            ("a.b.[1].c", true),
            ("a.b.[2]", false),
            ("l.[0]", true),
            ("l.0", false),
            ("z", false),
            ("", false),
        ] {
            assert_eq!(selects(&mut Lookup::default(), o, s), ok, "{s}");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod corpus {
    //! The corpus of `broker/testdata/stix/`: each bundle's verdict, as its manifest says.

    use std::path::PathBuf;

    use crate::content::{Content, ContentError, ContentKind, fuzz_stix};

    fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/stix")
    }

    /// `(file, valid, property)` rows of the manifest.
    fn manifest() -> Vec<(String, bool, String)> {
        let text = std::fs::read_to_string(dir().join("manifest.txt")).unwrap();
        text.lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(|l| {
                let mut f = l.split_whitespace();
                let file = f.next().unwrap().to_owned();
                let verdict = f.next().unwrap();
                assert!(verdict == "valid" || verdict == "invalid", "{l}");
                (file, verdict == "valid", f.next().unwrap_or("").to_owned())
            })
            .collect()
    }

    #[test]
    fn every_bundle_gets_its_verdict() {
        let rows = manifest();
        assert!(rows.len() >= 40, "the corpus has {} bundles", rows.len());
        for (file, valid, property) in rows {
            let bytes = std::fs::read(dir().join(&file)).unwrap();
            let got = Content::read(ContentKind::Stix21, &bytes);
            match (valid, got) {
                (true, Ok(_)) => {}
                (true, Err(e)) => panic!("{file}: refused: {e}"),
                (false, Ok(_)) => panic!("{file}: accepted"),
                (false, Err(ContentError::Stix(e))) => {
                    assert!(
                        e.property.contains(&property),
                        "{file}: names {:?}, not {property:?}: {e}",
                        e.property
                    );
                    // An object's refusal names its index (and its id, when it has one).
                    if let Some(i) = e.index {
                        assert!(e.to_string().contains(&format!("objects[{i}]")), "{e}");
                    }
                }
                (false, Err(ContentError::NotJson(_))) => {
                    assert!(
                        property.is_empty(),
                        "{file}: not JSON, but expected {property}"
                    )
                }
                (false, Err(e)) => panic!("{file}: unexpected error {e}"),
            }
        }
    }

    #[test]
    fn a_refusal_names_the_object_its_id_and_the_property() {
        let bytes = std::fs::read(dir().join("invalid-created-no-millis.json")).unwrap();
        let e = Content::read(ContentKind::Stix21, &bytes)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "STIX bundle objects[0] (indicator--4b3e2a1c-5d6f-4a7b-8c9d-0e1f2a3b4c5d) property \
             `created`: \"2026-11-30T09:15:00Z\" must be precise to at least the millisecond"
        );
    }

    #[test]
    fn bounds_on_objects() {
        let object = r#"{"type":"ipv4-addr","id":"ipv4-addr--4b3e2a1c-5d6f-4a7b-8c9d-0e1f2a3b4c5d","value":"10.0.0.1"}"#;
        let bundle = |n: usize| {
            format!(
                r#"{{"type":"bundle","id":"bundle--b1c2d3e4-f5a6-4b7c-8d9e-0f1a2b3c4d5e","objects":[{}]}}"#,
                vec![object; n].join(",")
            )
        };
        assert!(Content::read(ContentKind::Stix21, bundle(super::MAX_OBJECTS).as_bytes()).is_ok());
        let e = Content::read(
            ContentKind::Stix21,
            bundle(super::MAX_OBJECTS + 1).as_bytes(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("at most 10000"), "{e}");
    }

    #[test]
    fn every_string_of_a_bundle_is_visited_with_its_object() {
        let bytes = std::fs::read(dir().join("valid-external-reference.json")).unwrap();
        let content = Content::read(ContentKind::Stix21, &bytes).unwrap();
        let mut seen = Vec::new();
        content.for_each_string(&mut |s| {
            if !s.is_key {
                seen.push((
                    s.object.map(|o| (o.index, o.id.to_owned())),
                    s.path.to_owned(),
                    s.text.to_owned(),
                ));
            }
        });
        let malware = Some((
            0,
            "malware--9a8b7c6d-5e4f-4321-9fed-cba987654321".to_owned(),
        ));
        for want in [
            (None, "$.type".to_owned(), "bundle".to_owned()),
            (malware.clone(), "$.name".to_owned(), "LockBit".to_owned()),
            (
                malware.clone(),
                "$.malware_types[0]".to_owned(),
                "ransomware".to_owned(),
            ),
            (
                malware,
                "$.external_references[0].external_id".to_owned(),
                "CAPEC-163".to_owned(),
            ),
        ] {
            assert!(seen.contains(&want), "{want:?} not in {seen:?}");
        }
    }

    /// Random byte changes and copied pieces in the valid bundles (a fixed-seed generator,
    /// so that a failure repeats) must go through without a panic.
    #[test]
    fn mutated_bundles_do_not_panic() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for entry in std::fs::read_dir(dir()).unwrap() {
            let path = entry.unwrap().path();
            if !path
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("valid-")
            {
                continue;
            }
            let original = std::fs::read(&path).unwrap();
            for _ in 0..200 {
                let mut bytes = original.clone();
                for _ in 0..1 + next() % 4 {
                    let at = (next() % bytes.len() as u64) as usize;
                    if next() % 3 == 0 {
                        // A piece of the text copied elsewhere: repeated members, nested
                        // objects where strings were, unbalanced brackets.
                        let from = (next() % bytes.len() as u64) as usize;
                        let len = (next() % 64) as usize;
                        let piece = bytes[from..(from + len).min(bytes.len())].to_vec();
                        bytes.splice(at..at, piece);
                    } else {
                        const BYTES: &[u8] = b"{}[]\",:0aZ-\x00\xff";
                        bytes[at] = BYTES[(next() % BYTES.len() as u64) as usize];
                    }
                }
                fuzz_stix(&bytes);
            }
        }
    }

    /// The fuzz target's replay: every corpus file, and every prefix of a few of them, must
    /// go through without a panic.
    #[test]
    fn fuzz_replay() {
        for entry in std::fs::read_dir(dir()).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            fuzz_stix(&bytes);
            if path.to_string_lossy().contains("valid-") {
                for cut in (0..bytes.len()).step_by(7) {
                    fuzz_stix(&bytes[..cut]);
                }
            }
        }
    }
}
