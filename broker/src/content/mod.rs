//! What a payload says: its media type, and the parsed, checked content behind it.
//!
//! The broker understands three kinds of payload by their `content_type`
//! ([`ContentKind`]):
//! - `application/stix+json;version=2.1`: a STIX 2.1 bundle, validated against the
//!   specification's MUST rules ([`stix`]);
//! - `application/vnd.concordat.incident+json;version=1`: a Concordat incident record
//!   ([`incident`], schema in `docs/incident-record.md`);
//! - any other JSON (`application/json`, `*/*+json`): no schema, but parsed, so that every
//!   string in it can be inspected;
//! - text (`text/plain`, `text/markdown`; `charset` absent or `utf-8`): UTF-8, read whole as
//!   one string (a draft public statement, say), so that it can be inspected like a JSON
//!   string.
//!
//! Anything else is opaque: nobody can check what it says. Whether an opaque payload may be
//! relayed is the policy's call ([`crate::policy::decide`]), not this module's.
//!
//! Every payload is hostile. JSON nesting is bounded ([`MAX_DEPTH`]) while the tree is read
//! (`tree`), well below `serde_json`'s own recursion limit of 128, so a deeply nested
//! document can neither overflow the stack nor reach that limit; the rare document read by
//! the library's reader instead (a key spelt with an escape) is first scanned for its depth.
//! Size is bounded by the broker's message limit before this module sees the payload.
//!
//! [`Content::for_each_string`] visits every string (values and object keys) with its location,
//! for checks that look for what a payload must not say.

pub mod incident;
pub mod stix;
mod tree;

use std::fmt;

pub use serde_json_borrow::{ObjectAsVec as JsonObject, Value};

pub use incident::{Granularity, IncidentRecord};
pub use stix::Bundle;

/// The deepest nesting of arrays and objects accepted in a JSON payload.
pub const MAX_DEPTH: usize = 64;

/// The media type of STIX 2.1 bundles (without its `version` parameter).
pub const STIX_MEDIA_TYPE: &str = "application/stix+json";
/// The media type of Concordat incident records (without its `version` parameter).
pub const INCIDENT_MEDIA_TYPE: &str = "application/vnd.concordat.incident+json";
/// The text media types the broker reads (without their `charset` parameter).
pub const TEXT_MEDIA_TYPES: [&str; 2] = ["text/plain", "text/markdown"];

/// What the broker knows how to read, by media type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ContentKind {
    /// A STIX 2.1 bundle.
    Stix21,
    /// A Concordat incident record, version 1.
    IncidentRecord,
    /// Some other JSON document.
    Json,
    /// UTF-8 text (`text/plain`, `text/markdown`).
    Text,
    /// Anything else: the broker cannot read it.
    Opaque,
}

impl ContentKind {
    /// Classifies a `content_type` string. Type, subtype and parameter names compare
    /// case-insensitively, parameter values may be quoted; a malformed media type, or a
    /// version of STIX or of the incident record this broker does not know, is an error.
    pub fn of(content_type: &str) -> Result<ContentKind, ContentError> {
        let media = MediaType::parse(content_type)?;
        let version = media.param("version");
        let essence = media.essence();
        if essence == STIX_MEDIA_TYPE {
            utf8_only(&media, STIX_MEDIA_TYPE)?;
            return match version {
                // The version parameter is what STIX 2.1 specifies; without it the bundle is
                // still validated as 2.1 rather than waved through as plain JSON.
                None | Some("2.1") => Ok(ContentKind::Stix21),
                Some(v) => Err(ContentError::UnsupportedVersion {
                    media_type: STIX_MEDIA_TYPE,
                    version: v.to_owned(),
                }),
            };
        }
        if essence == INCIDENT_MEDIA_TYPE {
            utf8_only(&media, INCIDENT_MEDIA_TYPE)?;
            return match version {
                None | Some("1") => Ok(ContentKind::IncidentRecord),
                Some(v) => Err(ContentError::UnsupportedVersion {
                    media_type: INCIDENT_MEDIA_TYPE,
                    version: v.to_owned(),
                }),
            };
        }
        if let Some(&media_type) = TEXT_MEDIA_TYPES.iter().find(|t| **t == essence) {
            utf8_only(&media, media_type)?;
            return Ok(ContentKind::Text);
        }
        if essence == "application/json" || media.subtype.ends_with("+json") {
            utf8_only(&media, "JSON")?;
            return Ok(ContentKind::Json);
        }
        Ok(ContentKind::Opaque)
    }

    /// Whether the broker can read what a payload of this kind says.
    pub fn is_inspectable(self) -> bool {
        self != ContentKind::Opaque
    }
}

/// Only UTF-8 is read: a payload the broker reads, in another charset, could name an
/// organisation in bytes the matcher would not recognise, so its type is refused rather than
/// waved through. That covers a `charset` other than `utf-8`, and any extended parameter (RFC
/// 2231's `name*` and `name*0`), which a MIME reader may take for the charset
/// (`charset*=''utf-7`) while this reader would see none.
fn utf8_only(media: &MediaType, media_type: &'static str) -> Result<(), ContentError> {
    for (name, value) in &media.params {
        if name.contains('*') {
            return Err(ContentError::BadMediaType(format!(
                "{media_type}: the extended parameter {name:?} (RFC 2231) is not read; give \
                 charset=utf-8, or no charset"
            )));
        }
        if name == "charset" && value != "utf-8" {
            return Err(ContentError::UnsupportedCharset {
                media_type,
                charset: value.clone(),
            });
        }
    }
    Ok(())
}

impl fmt::Display for ContentKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ContentKind::Stix21 => "a STIX 2.1 bundle",
            ContentKind::IncidentRecord => "a Concordat incident record",
            ContentKind::Json => "JSON",
            ContentKind::Text => "text",
            ContentKind::Opaque => "opaque content",
        })
    }
}

/// A parsed media type (RFC 9110 §8.3.1): `type/subtype *( OWS ";" OWS name=value )`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaType {
    /// The type, lower-cased.
    pub kind: String,
    /// The subtype, lower-cased.
    pub subtype: String,
    /// The parameters in order: names lower-cased, values unquoted and lower-cased (every
    /// parameter the broker reads is case-insensitive).
    pub params: Vec<(String, String)>,
}

impl MediaType {
    /// Parses `s`.
    pub fn parse(s: &str) -> Result<MediaType, ContentError> {
        let bad = |why: &str| ContentError::BadMediaType(format!("{s:?}: {why}"));
        let (essence, mut rest) = match s.find(';') {
            Some(i) => (&s[..i], &s[i..]),
            None => (s, ""),
        };
        let essence = essence.trim_matches(|c| c == ' ' || c == '\t');
        let (kind, subtype) = essence
            .split_once('/')
            .ok_or_else(|| bad("no '/' between type and subtype"))?;
        if !is_token(kind) || !is_token(subtype) {
            return Err(bad("type and subtype must be non-empty tokens"));
        }
        let mut params: Vec<(String, String)> = Vec::new();
        while let Some(after) = rest.strip_prefix(';') {
            let after = after.trim_start_matches([' ', '\t']);
            if after.is_empty() || after.starts_with(';') {
                // An empty parameter (`a/b;` or `a/b;;c=d`) is allowed by the grammar.
                rest = after;
                continue;
            }
            let eq = after
                .find('=')
                .ok_or_else(|| bad("a parameter has no '='"))?;
            let name = &after[..eq];
            if !is_token(name) {
                return Err(bad("a parameter name is not a token"));
            }
            let value_and_rest = &after[eq + 1..];
            let (value, tail) = if let Some(quoted) = value_and_rest.strip_prefix('"') {
                let mut value = String::new();
                let mut chars = quoted.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '"' => {
                            end = Some(i + 1);
                            break;
                        }
                        '\\' => match chars.next() {
                            Some((_, escaped)) => value.push(escaped),
                            None => break,
                        },
                        c if c == '\t' || (' '..='~').contains(&c) => value.push(c),
                        _ => return Err(bad("a quoted value holds a control character")),
                    }
                }
                let end = end.ok_or_else(|| bad("a quoted value is not closed"))?;
                (value, &quoted[end..])
            } else {
                let end = value_and_rest.find(';').unwrap_or(value_and_rest.len());
                let value = value_and_rest[..end].trim_end_matches([' ', '\t']);
                if !is_token(value) {
                    return Err(bad("a parameter value is neither a token nor quoted"));
                }
                (value.to_owned(), &value_and_rest[end..])
            };
            let tail = tail.trim_start_matches([' ', '\t']);
            if !tail.is_empty() && !tail.starts_with(';') {
                return Err(bad("text after a parameter value"));
            }
            let name = name.to_ascii_lowercase();
            if params.iter().any(|(n, _)| *n == name) {
                return Err(bad(&format!("the parameter {name:?} is given twice")));
            }
            params.push((name, value.to_ascii_lowercase()));
            rest = tail;
        }
        if !rest.is_empty() {
            return Err(bad("text after the media type"));
        }
        Ok(MediaType {
            kind: kind.to_ascii_lowercase(),
            subtype: subtype.to_ascii_lowercase(),
            params,
        })
    }

    /// `type/subtype`, lower-cased.
    pub fn essence(&self) -> String {
        format!("{}/{}", self.kind, self.subtype)
    }

    /// The value of the parameter `name` (lower-case), if given.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// RFC 9110 `token`: one or more `tchar`.
fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

/// Why a payload is not what its content type says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ContentError {
    /// The `content_type` is not a well-formed media type.
    #[error("content type {0}")]
    BadMediaType(String),
    /// A media type the broker knows, in a version it does not.
    #[error("{media_type} version {version:?} is not supported")]
    UnsupportedVersion {
        /// The media type.
        media_type: &'static str,
        /// The version asked for.
        version: String,
    },
    /// Text in a charset other than UTF-8.
    #[error("{media_type} is read as UTF-8 only, not charset {charset:?}")]
    UnsupportedCharset {
        /// The media type.
        media_type: &'static str,
        /// The charset asked for.
        charset: String,
    },
    /// A text payload that is not UTF-8.
    #[error("the payload is not valid UTF-8 text: {0}")]
    NotUtf8(String),
    /// JSON nested deeper than [`MAX_DEPTH`].
    #[error("the JSON is nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
    /// The payload is not JSON (or not UTF-8).
    #[error("the payload is not valid JSON: {0}")]
    NotJson(String),
    /// A STIX bundle breaks a rule of the specification.
    #[error("{0}")]
    Stix(#[from] stix::StixError),
    /// An incident record breaks its schema.
    #[error("{0}")]
    Incident(#[from] incident::IncidentError),
}

/// A payload the broker has read. Its strings borrow from the payload wherever the JSON
/// text holds them unescaped.
#[derive(Debug, Clone)]
pub enum Content<'a> {
    /// A valid STIX 2.1 bundle.
    Stix(Bundle<'a>),
    /// A valid incident record, with the JSON it was read from.
    Incident(Box<IncidentRecord>, Value<'a>),
    /// Some other JSON document.
    Json(Value<'a>),
    /// UTF-8 text.
    Text(&'a str),
    /// Bytes the broker cannot read.
    Opaque,
}

impl<'a> Content<'a> {
    /// Reads `payload` as `kind`, enforcing the depth bound and, for STIX and incident
    /// records, every rule of their schema.
    pub fn read(kind: ContentKind, payload: &'a [u8]) -> Result<Content<'a>, ContentError> {
        match kind {
            ContentKind::Opaque => Ok(Content::Opaque),
            ContentKind::Json => Ok(Content::Json(parse_json(payload)?)),
            ContentKind::Text => std::str::from_utf8(payload)
                .map(Content::Text)
                .map_err(|e| ContentError::NotUtf8(e.to_string())),
            ContentKind::Stix21 => Ok(Content::Stix(Bundle::validate(parse_json(payload)?)?)),
            ContentKind::IncidentRecord => {
                let (text, value) = parse_json_text(payload)?;
                let record = IncidentRecord::read(text, &value)?;
                Ok(Content::Incident(Box::new(record), value))
            }
        }
    }

    /// The kind of content.
    pub fn kind(&self) -> ContentKind {
        match self {
            Content::Stix(_) => ContentKind::Stix21,
            Content::Incident(..) => ContentKind::IncidentRecord,
            Content::Json(_) => ContentKind::Json,
            Content::Text(_) => ContentKind::Text,
            Content::Opaque => ContentKind::Opaque,
        }
    }

    /// Calls `f` with every string in the content (object keys and string values), with
    /// where it is. Opaque content has none.
    pub fn for_each_string(&self, f: &mut dyn FnMut(StringAt<'_>)) {
        match self {
            Content::Stix(bundle) => bundle.for_each_string(f),
            Content::Incident(_, value) | Content::Json(value) => {
                walk_strings(value, &mut JsonPath::root(), None, f)
            }
            // The whole text is one string, at the document's root.
            Content::Text(text) => f(StringAt {
                object: None,
                path: "$",
                is_key: false,
                text,
            }),
            Content::Opaque => {}
        }
    }
}

/// One string found in a payload, and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StringAt<'a> {
    /// For a STIX bundle, the object it is in: its index in `objects` and its `id`.
    pub object: Option<ObjectAt<'a>>,
    /// The JSON path of the string inside that object (or the document), e.g.
    /// `$.external_references[0].description`. For a key, the path of the member it names.
    pub path: &'a str,
    /// Whether the string is an object key rather than a value.
    pub is_key: bool,
    /// The string.
    pub text: &'a str,
}

/// A STIX object in its bundle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ObjectAt<'a> {
    /// Its index in the bundle's `objects`.
    pub index: usize,
    /// Its `id`.
    pub id: &'a str,
}

/// A JSON path being walked: `$`, `$.a`, `$.a[3]`.
struct JsonPath(String);

impl JsonPath {
    fn root() -> Self {
        JsonPath("$".to_owned())
    }
}

/// Visits every string under `value`, extending `path` as it goes.
fn walk_strings(
    value: &Value<'_>,
    path: &mut JsonPath,
    object: Option<ObjectAt<'_>>,
    f: &mut dyn FnMut(StringAt<'_>),
) {
    match value {
        Value::Str(s) => f(StringAt {
            object,
            path: &path.0,
            is_key: false,
            text: s,
        }),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                let len = path.0.len();
                path.0.push_str(&format!("[{i}]"));
                walk_strings(item, path, object, f);
                path.0.truncate(len);
            }
        }
        Value::Object(members) => {
            for (key, item) in members.iter() {
                let len = path.0.len();
                path.0.push('.');
                path.0.push_str(key);
                f(StringAt {
                    object,
                    path: &path.0,
                    is_key: true,
                    text: key,
                });
                walk_strings(item, path, object, f);
                path.0.truncate(len);
            }
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => {}
    }
}

/// Parses `payload` as JSON after checking its nesting depth. Strings and keys borrow from
/// `payload` unless they hold escapes; objects keep their members in document order, repeated
/// names included (see [`repeated_member`]).
pub fn parse_json(payload: &[u8]) -> Result<Value<'_>, ContentError> {
    parse_json_text(payload).map(|(_, value)| value)
}

/// As [`parse_json`], also giving the payload as the UTF-8 text it was read as.
fn parse_json_text(payload: &[u8]) -> Result<(&str, Value<'_>), ContentError> {
    // serde_json reads a byte slice as UTF-8 too, but only text it has checked whole can
    // lend its strings to the document.
    let text = std::str::from_utf8(payload).map_err(|e| {
        ContentError::NotJson(format!(
            "invalid UTF-8 at byte {} of the payload",
            e.valid_up_to()
        ))
    })?;
    let value = match tree::parse(text, MAX_DEPTH) {
        Ok(value) => value,
        Err(tree::Refusal::TooDeep) => return Err(ContentError::TooDeep),
        Err(tree::Refusal::NotJson(e)) => return Err(ContentError::NotJson(e.to_string())),
        // A key spelt with an escape: the library's reader, which bounds no depth of its
        // own (only serde_json's 128), after a scan for the depth.
        Err(tree::Refusal::EscapedKey) => {
            check_depth(payload, MAX_DEPTH)?;
            serde_json::from_str(text).map_err(|e| ContentError::NotJson(e.to_string()))?
        }
    };
    Ok((text, value))
}

/// The member `key` of `value`, if `value` is an object that has it.
pub fn member<'v, 'a>(value: &'v Value<'a>, key: &str) -> Option<&'v Value<'a>> {
    value.as_object()?.get(key)
}

/// The path (`$.objects[2].name`) of the first object member, in document order, whose name
/// its object already holds. JSON leaves repeated names undefined, and parsers disagree on
/// which one counts (the first, the last, both), so a document whose schema the broker checks
/// must not hold any: another reader could see a value the broker did not check.
pub fn repeated_member(value: &Value<'_>) -> Option<String> {
    /// The path below `value` of a repeated name, if any; built only when one is found.
    fn walk(value: &Value<'_>) -> Option<String> {
        match value {
            Value::Object(members) => {
                if let Some(key) = repeated_name(members) {
                    return Some(format!(".{key}"));
                }
                members
                    .iter()
                    .find_map(|(key, item)| walk(item).map(|below| format!(".{key}{below}")))
            }
            Value::Array(items) => items
                .iter()
                .enumerate()
                .find_map(|(i, item)| walk(item).map(|below| format!("[{i}]{below}"))),
            _ => None,
        }
    }
    walk(value).map(|below| format!("${below}"))
}

/// Objects of at most this many members are searched member by member; larger ones go
/// through a set or an index, so that one huge object costs linear time, not quadratic.
pub(crate) const SMALL_OBJECT: usize = 16;

/// The first member name of `object`, in document order, that an earlier member already has.
pub fn repeated_name<'o>(object: &'o JsonObject<'_>) -> Option<&'o str> {
    let members = object.as_vec();
    if members.len() <= SMALL_OBJECT {
        // Nearly every object: compared pairwise, without allocating, and only when an
        // earlier name set the same bit of `seen` (chosen by length plus last byte, so equal
        // names always share it; unequal ones seldom do, and then only cost a comparison).
        let mut seen = 0u64;
        return members.iter().enumerate().find_map(|(i, (key, _))| {
            let key: &str = key;
            let last = key.as_bytes().last().copied().unwrap_or(0);
            let bit = 1u64 << ((key.len() + usize::from(last)) % 64);
            let repeated = seen & bit != 0
                && members[..i].iter().any(|(k, _)| {
                    let k: &str = k;
                    k == key
                });
            seen |= bit;
            repeated.then_some(key)
        });
    }
    let mut seen = std::collections::HashSet::with_capacity(members.len());
    object.keys().find(|key| !seen.insert(*key))
}

/// Checks, in one pass and without recursion, that no array or object in `payload` is nested
/// deeper than `max`. Brackets inside strings do not count. Malformed JSON passes here and is
/// refused by the parser.
fn check_depth(payload: &[u8], max: usize) -> Result<(), ContentError> {
    let mut depth = 0usize;
    let mut i = 0;
    while let Some(&b) = payload.get(i) {
        i += 1;
        match b {
            b'"' => {
                // Skip the string in jumps to its next quote or backslash (most of a STIX
                // bundle is strings); a backslash escapes the byte after it.
                loop {
                    let rest = payload.get(i..).unwrap_or_default();
                    match memchr::memchr2(b'"', b'\\', rest) {
                        Some(at) if rest[at] == b'\\' => i += at + 2,
                        Some(at) => {
                            i += at + 1;
                            break;
                        }
                        // An unterminated string: the parser refuses it.
                        None => return Ok(()),
                    }
                }
            }
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(ContentError::TooDeep);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// The body of the STIX fuzz target: classifies and reads arbitrary bytes as every kind of
/// content, and walks the strings of whatever is accepted. It must never panic.
#[doc(hidden)]
pub fn fuzz_stix(data: &[u8]) {
    for kind in [
        ContentKind::Stix21,
        ContentKind::IncidentRecord,
        ContentKind::Json,
        ContentKind::Text,
    ] {
        if let Ok(content) = Content::read(kind, data) {
            let mut n = 0usize;
            content.for_each_string(&mut |s| n = n.wrapping_add(s.text.len() + s.path.len()));
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = ContentKind::of(s);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn repeated_member_names_are_found_wherever_they_are() {
        let wide = |repeat: bool| {
            let mut members: Vec<String> = (0..40).map(|i| format!("\"m{i}\":{i}")).collect();
            if repeat {
                members.push("\"m7\":0".into());
            }
            format!("{{\"w\":{{{}}}}}", members.join(","))
        };
        let rows: Vec<(String, Option<&str>)> = vec![
            (r#"{"a":1,"b":{"a":2},"c":[{"a":3}]}"#.into(), None),
            (r#"{"a":1,"b":2,"a":3}"#.into(), Some("$.a")),
            // Names of the same length and last byte, repeated or not.
            (r#"{"ab":1,"cb":2,"db":{"xy":1,"zy":2}}"#.into(), None),
            (
                r#"{"ab":1,"cb":2,"db":{"xy":1,"zy":2,"xy":3}}"#.into(),
                Some("$.db.xy"),
            ),
            (r#"{"":1,"b":2,"":3}"#.into(), Some("$.")),
            (
                r#"{"x":[{"b":1},{"b":1,"c":{},"b":2}]}"#.into(),
                Some("$.x[1].b"),
            ),
            // The same name once plain and once escaped is the same name.
            (r#"{"o":{"name":1,"n\u0061me":2}}"#.into(), Some("$.o.name")),
            (wide(false), None),
            (wide(true), Some("$.w.m7")),
        ];
        for (text, want) in rows {
            let value = parse_json(text.as_bytes()).unwrap();
            assert_eq!(repeated_member(&value).as_deref(), want, "{text}");
        }
    }

    #[test]
    fn content_types_are_classified() {
        use ContentKind::*;
        let rows: &[(&str, Result<ContentKind, ()>)] = &[
            ("application/stix+json;version=2.1", Ok(Stix21)),
            ("Application/STIX+JSON; Version=\"2.1\"", Ok(Stix21)),
            (
                "application/stix+json ; version=2.1 ; charset=utf-8",
                Ok(Stix21),
            ),
            ("application/stix+json", Ok(Stix21)),
            ("application/stix+json;version=2.0", Err(())),
            ("application/stix+json;version=2.1;version=2.0", Err(())),
            (
                "application/vnd.concordat.incident+json;version=1",
                Ok(IncidentRecord),
            ),
            (
                "application/vnd.concordat.incident+json;VERSION=\"1\"",
                Ok(IncidentRecord),
            ),
            ("application/vnd.concordat.incident+json;version=2", Err(())),
            ("application/json", Ok(Json)),
            ("application/json; charset=\"utf-8\"", Ok(Json)),
            ("application/geo+json", Ok(Json)),
            ("APPLICATION/LD+JSON", Ok(Json)),
            ("application/octet-stream", Ok(Opaque)),
            ("text/plain", Ok(Text)),
            ("text/markdown", Ok(Text)),
            ("Text/Markdown; charset=UTF-8", Ok(Text)),
            ("text/plain; charset=\"utf-8\"", Ok(Text)),
            ("text/plain; charset=iso-8859-1", Err(())),
            ("text/markdown; charset=utf-16", Err(())),
            // Every type the broker reads is read as UTF-8: an extended parameter (RFC 2231),
            // which a MIME reader takes for the charset, and any other charset are refused.
            ("text/plain; charset*0=utf-7", Err(())),
            ("text/plain; charset*=''utf-7", Err(())),
            ("text/markdown; charset*0=\"utf-7\"", Err(())),
            ("text/plain; charset=utf-8; charset*=''utf-7", Err(())),
            ("application/json; charset=utf-7", Err(())),
            ("application/json; charset*=''utf-7", Err(())),
            ("application/geo+json; charset=utf-16", Err(())),
            ("application/stix+json;version=2.1;charset=utf-7", Err(())),
            (
                "application/vnd.concordat.incident+json;version=1;charset=utf-7",
                Err(()),
            ),
            ("application/octet-stream; name*=utf-8''a.bin", Ok(Opaque)),
            ("text/html", Ok(Opaque)),
            ("text/csv", Ok(Opaque)),
            ("application/jsonx", Ok(Opaque)),
            ("application/json-seq", Ok(Opaque)),
            ("application/pdf; name=\"a \\\"b\\\" c.pdf\"", Ok(Opaque)),
            ("application", Err(())),
            ("/json", Err(())),
            ("application/json;charset", Err(())),
            ("application/json;charset=\"utf-8", Err(())),
            ("application/json;charset=utf 8", Err(())),
            ("application/json x", Err(())),
            ("", Err(())),
        ];
        for (ct, want) in rows {
            let got = ContentKind::of(ct).map_err(|_| ());
            assert_eq!(&got, want, "{ct:?}");
        }
    }

    #[test]
    fn quoted_values_are_unescaped() {
        let m = MediaType::parse(r#"a/b; x="q\"uo;te"; y=Z"#).unwrap();
        assert_eq!(m.param("x"), Some("q\"uo;te"));
        assert_eq!(m.param("y"), Some("z"));
    }

    #[test]
    fn depth_is_bounded() {
        let deep = "[".repeat(100_000) + &"]".repeat(100_000);
        assert_eq!(parse_json(deep.as_bytes()), Err(ContentError::TooDeep));
        let ok = "[".repeat(MAX_DEPTH) + &"]".repeat(MAX_DEPTH);
        assert!(parse_json(ok.as_bytes()).is_ok());
        let over = "[".repeat(MAX_DEPTH + 1) + &"]".repeat(MAX_DEPTH + 1);
        assert_eq!(parse_json(over.as_bytes()), Err(ContentError::TooDeep));
        // Brackets in strings, and escaped quotes, do not count.
        let s = format!("[\"{}\\\"{}\"]", "[".repeat(200), "{".repeat(200));
        assert!(parse_json(s.as_bytes()).is_ok());
        // A document with a key spelt with an escape is read by the library's reader, after
        // the depth scan: the same bound.
        let escaped = |n: usize| format!("{{\"k\\u0065y\":{}1{}}}", "[".repeat(n), "]".repeat(n));
        assert!(parse_json(escaped(MAX_DEPTH - 1).as_bytes()).is_ok());
        assert_eq!(
            parse_json(escaped(MAX_DEPTH).as_bytes()),
            Err(ContentError::TooDeep)
        );
        assert_eq!(
            parse_json(escaped(200).as_bytes()),
            Err(ContentError::TooDeep)
        );
    }

    /// The depth check that skips strings in jumps agrees with a byte-by-byte one on
    /// generated inputs full of quotes, backslashes and brackets.
    #[test]
    fn depth_check_agrees_with_a_byte_by_byte_one() {
        fn byte_by_byte(payload: &[u8], max: usize) -> bool {
            let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
            for &b in payload {
                if in_string {
                    match (escaped, b) {
                        (true, _) => escaped = false,
                        (false, b'\\') => escaped = true,
                        (false, b'"') => in_string = false,
                        _ => {}
                    }
                    continue;
                }
                match b {
                    b'"' => in_string = true,
                    b'[' | b'{' => {
                        depth += 1;
                        if depth > max {
                            return false;
                        }
                    }
                    b']' | b'}' => depth = depth.saturating_sub(1),
                    _ => {}
                }
            }
            true
        }
        let alphabet = b"[]{}\"\\ax";
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..100_000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let len = (state % 24) as usize;
            let mut x = state;
            let input: Vec<u8> = (0..len)
                .map(|_| {
                    x = x.rotate_left(3).wrapping_mul(0x2545_f491_4f6c_dd1d);
                    alphabet[(x >> 60) as usize % alphabet.len()]
                })
                .collect();
            assert_eq!(
                check_depth(&input, 3).is_ok(),
                byte_by_byte(&input, 3),
                "{:?}",
                String::from_utf8_lossy(&input)
            );
        }
    }

    #[test]
    fn every_string_is_visited_with_its_path() {
        let content = Content::read(ContentKind::Json, br#"{"a":["x",{"b":"y"}],"n":1}"#).unwrap();
        let mut seen = Vec::new();
        content
            .for_each_string(&mut |s| seen.push((s.path.to_owned(), s.is_key, s.text.to_owned())));
        assert_eq!(
            seen,
            [
                ("$.a".to_owned(), true, "a".to_owned()),
                ("$.a[0]".to_owned(), false, "x".to_owned()),
                ("$.a[1].b".to_owned(), true, "b".to_owned()),
                ("$.a[1].b".to_owned(), false, "y".to_owned()),
                ("$.n".to_owned(), true, "n".to_owned()),
            ]
        );
        assert!(matches!(
            Content::read(ContentKind::Opaque, b"\x00"),
            Ok(Content::Opaque)
        ));
    }

    #[test]
    fn text_is_read_whole_as_one_string_and_must_be_utf8() {
        let statement = "# Statement\n\nAcme Ltd reported a breach; caf\u{e9} opens.\n";
        let content = Content::read(ContentKind::Text, statement.as_bytes()).unwrap();
        assert_eq!(content.kind(), ContentKind::Text);
        let mut seen = Vec::new();
        content
            .for_each_string(&mut |s| seen.push((s.path.to_owned(), s.is_key, s.text.to_owned())));
        assert_eq!(seen, [("$".to_owned(), false, statement.to_owned())]);
        assert!(matches!(
            Content::read(ContentKind::Text, b"caf\xe9"),
            Err(ContentError::NotUtf8(_))
        ));
        assert!(Content::read(ContentKind::Text, b"").is_ok());
    }

    #[test]
    fn hostile_bytes_do_not_panic() {
        let cases: &[&[u8]] = &[
            b"",
            b"\xff\xfe",
            b"{",
            b"{\"type\":\"bundle\",\"id\":",
            b"\"\\",
            b"[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[",
            b"{\"type\":\"bundle\",\"id\":\"bundle--00000000-0000-4000-8000-000000000000\",\"objects\":[1,[],{}]}",
            b"1e999999",
        ];
        for c in cases {
            fuzz_stix(c);
        }
    }
}
