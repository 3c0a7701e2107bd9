//! Finding registered organisations in text and in JSON documents.
//!
//! The [`Matcher`] is built once from a [`Registry`]: every name becomes a pattern in the names
//! form (`" acme "`, suffixes stripped). Because both the patterns and the scanned text carry a
//! space at every word boundary (see `normalise`), a pattern can only match whole words:
//! `"macme"` and `"acmeltd"` never match. The names form of a text is searched once with an
//! Aho–Corasick automaton (overlapping, so no match hides another). Identifiers are whole
//! tokens of the identifiers form (which keeps the `.`, `@` and `-` inside a token), so they
//! are looked up by hashing: a number is a whole token (`01234567`); a domain is a whole token
//! or the part of one after a `.` or `@` (`vpn.acme.example`, `x@acme.example`), which is why
//! `notacme.example` and `not-acme.example` never match `acme.example`. The work is linear in
//! the text (plus the matches found), and a [`Scratch`] reused across texts means no
//! allocation per text once its buffers have grown.
//!
//! Among name matches, one that lies strictly inside a longer name match is dropped ("Acme
//! Holdings Ltd" names Acme Holdings, not also Acme), and so is one inside a `not_names` phrase
//! (which names nobody). Identifier matches always count.

use std::{
    collections::HashMap,
    fmt::{self, Write as _},
};

use aho_corasick::{AhoCorasick, AhoCorasickKind, MatchKind as AcMatchKind};
use concordat_proto::ids::OrgId;
use serde_json_borrow::Value;

use super::{
    MatchOn, Registry, RegistryError,
    key_words::KeyWords,
    normalise::{NotableToken, append_identifiers_form_noting, is_mark, name_words, word_pattern},
};

/// What kind of evidence identified an organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum MatchKind {
    /// Its legal name or one of its other names.
    Name,
    /// Its company number.
    CompanyNumber,
    /// Its charity number.
    CharityNumber,
    /// One of its web domains or a subdomain of one.
    Domain,
    /// One of its e-mail domains or a subdomain of one.
    EmailDomain,
}

impl MatchKind {
    /// A stable lower-case name, for messages and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            MatchKind::Name => "name",
            MatchKind::CompanyNumber => "company number",
            MatchKind::CharityNumber => "charity number",
            MatchKind::Domain => "domain",
            MatchKind::EmailDomain => "e-mail domain",
        }
    }
}

impl fmt::Display for MatchKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One organisation found in a text, and by what. Never carries the matched text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OrgMatch<'m> {
    /// The organisation.
    pub org: &'m OrgId,
    /// What matched.
    pub kind: MatchKind,
}

/// Where in a JSON document a match was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JsonSite {
    /// In the string (or the number that is an integer) at the path.
    Value,
    /// In the name of one of the properties of the object at the path.
    Key,
}

/// The first place in a JSON document where an organisation was found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JsonMatch<'m> {
    /// The organisation.
    pub org: &'m OrgId,
    /// What matched there.
    pub kind: MatchKind,
    /// The JSON path, e.g. `$.objects[3].description`. Property names that are not plain
    /// identifiers (ASCII letters, digits, `_`, `-`; at most 64) or that themselves name an
    /// organisation are shown as `[?]`, so a path never repeats what matched.
    pub path: String,
    /// Whether the value at the path or one of its property names matched.
    pub site: JsonSite,
}

impl fmt::Display for JsonMatch<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.site {
            JsonSite::Value => write!(f, "{} ({}) at {}", self.org, self.kind, self.path),
            JsonSite::Key => write!(
                f,
                "{} ({}) in a property name of {}",
                self.org, self.kind, self.path
            ),
        }
    }
}

/// What a pattern means for one organisation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// It identifies the organisation.
    Identifies(MatchKind),
    /// A `not_names` phrase: where it matches, no name inside it counts.
    NotName,
}

#[derive(Debug, Clone, Copy)]
struct Owner {
    org: u32,
    role: Role,
}

/// A set of patterns with, for each, who it belongs to (several organisations may share one).
#[derive(Debug, Default)]
struct PatternSet {
    patterns: Vec<Vec<u8>>,
    owners: Vec<Vec<Owner>>,
    index: HashMap<Vec<u8>, usize>,
}

impl PatternSet {
    fn add(&mut self, pattern: Vec<u8>, owner: Owner) {
        let i = match self.index.get(&pattern) {
            Some(&i) => i,
            None => {
                let i = self.patterns.len();
                self.index.insert(pattern.clone(), i);
                self.patterns.push(pattern);
                self.owners.push(Vec::new());
                i
            }
        };
        self.owners[i].push(owner);
    }

    fn build(self, dfa_max_pattern_bytes: usize) -> Result<Option<Automaton>, RegistryError> {
        if self.patterns.is_empty() {
            return Ok(None);
        }
        // A DFA costs one table lookup per byte, where the NFA the crate would otherwise pick
        // for a large registry follows sparse transitions and failure links. On `bench gate`
        // (10,000 organisations, 400 KiB of patterns, 20 MiB of DFA) it scanned as fast or up
        // to 1.2x faster, on a shared machine whose noise is of the same order. Its memory
        // is roughly 50 bytes per pattern byte, so beyond `DFA_MAX_PATTERN_BYTES` a
        // contiguous NFA (what the crate picks for a large set) is built.
        let pattern_bytes: usize = self.patterns.iter().map(Vec::len).sum();
        let kind = if pattern_bytes <= dfa_max_pattern_bytes {
            AhoCorasickKind::DFA
        } else {
            AhoCorasickKind::ContiguousNFA
        };
        let ac = AhoCorasick::builder()
            .match_kind(AcMatchKind::Standard)
            .kind(Some(kind))
            .build(&self.patterns)
            .map_err(|e| RegistryError::Build(e.to_string()))?;
        Ok(Some(Automaton {
            ac,
            owners: self.owners,
        }))
    }
}

#[derive(Debug)]
struct Automaton {
    ac: AhoCorasick,
    owners: Vec<Vec<Owner>>,
}

/// A name match in the names form of a text: its span and pattern.
#[derive(Debug, Clone, Copy)]
struct Span {
    start: usize,
    end: usize,
    pattern: usize,
}

/// Buffers reused from one scan to the next. One per thread; [`Matcher::scan_with`] takes it.
#[derive(Debug, Default)]
pub struct Scratch {
    names: Vec<u8>,
    identifiers: Vec<u8>,
    tokens: Vec<NotableToken>,
    spans: Vec<Span>,
    found: Vec<(u32, MatchKind)>,
    number: String,
    nodes: Vec<Node>,
    pieces: Vec<Piece>,
    hits: Vec<(u32, usize, MatchKind)>,
}

/// The registry compiled for searching. Build once, share (it is `Send + Sync`).
#[derive(Debug)]
pub struct Matcher {
    ids: Vec<OrgId>,
    names: Option<Automaton>,
    identifiers: Identifiers,
    /// A word of every name and identifier, for the first look at a whole JSON text.
    key_words: KeyWords,
}

/// The most pattern bytes compiled into a DFA (about 50 MiB of automaton); a larger
/// registry's names are compiled into a contiguous NFA, slower but far smaller.
const DFA_MAX_PATTERN_BYTES: usize = 1 << 20;

/// How much of a JSON document's normal form is scanned at once (see `scan_json_with`).
const JSON_CHUNK: usize = 64 * 1024;

/// The integer a JSON number stands for, if it stands for one: JSON has one kind of number,
/// so `1234567`, `1234567.0` and `1.234567e6` are the same integer to whoever reads them
/// (JavaScript prints all three as `1234567`). Beyond 10^15 a float has no digits to spare,
/// and no identifier is that long.
fn integer_of(n: &serde_json_borrow::Number) -> Option<i128> {
    if let Some(u) = n.as_u64() {
        return Some(i128::from(u));
    }
    if let Some(i) = n.as_i64() {
        return Some(i128::from(i));
    }
    let f = n.as_f64()?;
    // Exactly integral and well inside i64, so the cast is exact.
    #[allow(clippy::cast_possible_truncation)]
    (f.fract() == 0.0 && f.abs() < 1e15).then_some(f as i128)
}

/// The longest token looked up as a company or charity number.
const MAX_NUMBER_LEN: usize = 11;
/// The longest domain (RFC 1035), so the longest suffix of a token looked up as one.
const MAX_DOMAIN_LEN: usize = 253;

/// Identifiers are single tokens of the identifiers form, so they are looked up by hashing
/// tokens rather than searched for: a number is a whole token; a domain is a whole token or
/// the part of one after a `.` or `@` (a subdomain, an e-mail address). Only suffixes of at
/// most 253 bytes are looked up, so the work per token is bounded by its length times that.
#[derive(Debug, Default)]
struct Identifiers {
    numbers: TokenMap,
    domains: TokenMap,
}

/// Identifier tokens to their owners. Hashed with foldhash rather than SipHash: every notable
/// token of a payload is looked up (SipHash was 4 % of `bench gate`), and the keys come from
/// the registry, not from the payload, so there is nothing for a flooding attack to insert.
type TokenMap = HashMap<Box<[u8]>, Vec<Owner>, foldhash::fast::RandomState>;

impl Identifiers {
    fn add(map: &mut TokenMap, key: &str, owner: Owner) {
        map.entry(key.to_ascii_lowercase().into_bytes().into_boxed_slice())
            .or_default()
            .push(owner);
    }

    /// Calls `emit(position, organisation, kind)` for every identifier in the identifiers
    /// form `form`, among its `tokens` (those that hold a digit or a mark: no other token can
    /// be a number or a domain).
    fn scan(
        &self,
        form: &[u8],
        tokens: &[NotableToken],
        emit: &mut impl FnMut(usize, u32, MatchKind),
    ) {
        let mut push = |at: usize, owners: Option<&Vec<Owner>>| {
            for owner in owners.into_iter().flatten() {
                if let Role::Identifies(kind) = owner.role {
                    emit(at, owner.org, kind);
                }
            }
        };
        for t in tokens {
            let token_at = t.start;
            let Some(token) = form.get(t.start..t.end) else {
                continue;
            };
            if token.len() < 3 {
                continue;
            }
            if !self.numbers.is_empty()
                && token.len() <= MAX_NUMBER_LEN
                && token.iter().any(u8::is_ascii_digit)
            {
                push(token_at, self.numbers.get(token));
            }
            if self.domains.is_empty() || !token.contains(&b'.') {
                continue;
            }
            if token.len() <= MAX_DOMAIN_LEN {
                push(token_at, self.domains.get(token));
            }
            let start = token.len().saturating_sub(MAX_DOMAIN_LEN + 1);
            for (i, &b) in token.iter().enumerate().skip(start) {
                if b == b'.' || b == b'@' {
                    push(token_at, self.domains.get(&token[i + 1..]));
                }
            }
        }
    }
}

impl Matcher {
    /// Compiles the registry's names and identifiers.
    pub fn new(registry: &Registry) -> Result<Self, RegistryError> {
        Self::with_dfa_limit(registry, DFA_MAX_PATTERN_BYTES)
    }

    /// As [`Matcher::new`], compiling the names into a DFA only up to `dfa_max_pattern_bytes`
    /// of patterns (the tests compare both automata on the same registry).
    fn with_dfa_limit(
        registry: &Registry,
        dfa_max_pattern_bytes: usize,
    ) -> Result<Self, RegistryError> {
        let mut names = PatternSet::default();
        let mut identifiers = Identifiers::default();
        let mut key_words = KeyWords::default();
        let mut ids = Vec::with_capacity(registry.len());
        for (i, o) in registry.organisations().iter().enumerate() {
            let org = u32::try_from(i)
                .map_err(|_| RegistryError::Build("too many organisations".into()))?;
            ids.push(o.id.clone());
            if o.match_on == MatchOn::NamesAndIdentifiers {
                for name in o.names() {
                    let role = Role::Identifies(MatchKind::Name);
                    let words = name_words(name);
                    key_words.add_name(&words);
                    names.add(word_pattern(&words), Owner { org, role });
                }
                for phrase in &o.not_names {
                    let role = Role::NotName;
                    names.add(word_pattern(&name_words(phrase)), Owner { org, role });
                }
            }
            let mut token = |text: &str, kind: MatchKind| {
                let role = Role::Identifies(kind);
                key_words.add_number(text.to_ascii_lowercase().as_bytes());
                Identifiers::add(&mut identifiers.numbers, text, Owner { org, role });
            };
            if let Some(n) = &o.company_number {
                token(n.as_str(), MatchKind::CompanyNumber);
                let unpadded = n.as_str().trim_start_matches('0');
                if unpadded.len() != n.as_str().len() && unpadded.len() >= 6 {
                    token(unpadded, MatchKind::CompanyNumber);
                }
            }
            if let Some(n) = &o.charity_number {
                token(n.as_str(), MatchKind::CharityNumber);
            }
            for (list, kind) in [
                (&o.domains, MatchKind::Domain),
                (&o.email_domains, MatchKind::EmailDomain),
            ] {
                for d in list {
                    let role = Role::Identifies(kind);
                    key_words.add_domain(d.as_str().to_ascii_lowercase().as_bytes());
                    Identifiers::add(&mut identifiers.domains, d.as_str(), Owner { org, role });
                }
            }
        }
        Ok(Matcher {
            ids,
            names: names.build(dfa_max_pattern_bytes)?,
            identifiers,
            key_words,
        })
    }

    /// The heap memory of the compiled names automaton, in bytes (for operators and the
    /// benchmark; the identifier tables are not counted).
    pub fn memory_usage(&self) -> usize {
        self.names.as_ref().map_or(0, |n| n.ac.memory_usage())
    }

    /// The organisations `text` names, each with each kind of evidence once, in registry order.
    pub fn scan<'m>(&'m self, text: &str) -> impl Iterator<Item = OrgMatch<'m>> + 'm {
        let mut scratch = Scratch::default();
        self.scan_into(&mut scratch, text);
        let found = std::mem::take(&mut scratch.found);
        found.into_iter().filter_map(move |(org, kind)| {
            let org = self.ids.get(usize::try_from(org).ok()?)?;
            Some(OrgMatch { org, kind })
        })
    }

    /// As [`Matcher::scan`], reusing `scratch`'s buffers, appending to `out` (not cleared).
    pub fn scan_with<'m>(&'m self, scratch: &mut Scratch, text: &str, out: &mut Vec<OrgMatch<'m>>) {
        self.scan_into(scratch, text);
        out.extend(scratch.found.iter().filter_map(|&(org, kind)| {
            let org = self.ids.get(usize::try_from(org).ok()?)?;
            Some(OrgMatch { org, kind })
        }));
    }

    /// Scans every string of a JSON document (every property name, every string value, the
    /// decimal form of every number that is an integer, however written) and returns, for
    /// each organisation found, the first place it was found, in document order. At most one
    /// entry per organisation.
    pub fn scan_json<'m>(&'m self, value: &Value<'_>) -> Vec<JsonMatch<'m>> {
        let mut scratch = Scratch::default();
        self.scan_json_with(&mut scratch, value)
    }

    /// As [`Matcher::scan_json`], reusing `scratch`'s buffers.
    ///
    /// The walk appends the normal form of every string to one buffer (two spaces apart, so
    /// nothing matches across two strings), noting where each ends; the buffer is then
    /// scanned once, and each match is placed in its string by binary search. Scanning once
    /// rather than string by string keeps many short strings as fast as one long text.
    pub fn scan_json_with<'m>(
        &'m self,
        scratch: &mut Scratch,
        value: &Value<'_>,
    ) -> Vec<JsonMatch<'m>> {
        // The walk is iterative (no recursion, whatever the depth); `nodes` records each
        // value's parent and path segment, so a path is only spelt out when it is reported.
        // Its vectors live in `scratch`, so a walk allocates nothing once they have grown.
        let mut nodes = std::mem::take(&mut scratch.nodes);
        let mut pieces = std::mem::take(&mut scratch.pieces);
        let mut hits = std::mem::take(&mut scratch.hits);
        nodes.clear();
        pieces.clear();
        hits.clear();
        nodes.push(Node {
            parent: 0,
            segment: Segment::Root,
        });
        scratch.identifiers.clear();
        scratch.tokens.clear();
        // Where `scratch.identifiers` starts in the whole document's form: the buffer is
        // scanned and emptied whenever it reaches `JSON_CHUNK` (at a string boundary, which no
        // match crosses), so that a large document is scanned while it is still in cache.
        let mut base = 0;
        let mut stack: Vec<(&Value<'_>, usize)> = vec![(value, 0)];
        while let Some((v, node)) = stack.pop() {
            if scratch.identifiers.len() >= JSON_CHUNK {
                self.scan_chunk(scratch, &pieces, &mut hits, &mut base);
            }
            match v {
                Value::Str(s) => {
                    append_identifiers_form_noting(
                        s,
                        &mut scratch.identifiers,
                        &mut scratch.tokens,
                    );
                    pieces.push(Piece {
                        end: base + scratch.identifiers.len(),
                        node,
                        site: JsonSite::Value,
                    });
                }
                Value::Number(n) => {
                    if let Some(integer) = integer_of(n) {
                        scratch.number.clear();
                        let _ = write!(scratch.number, "{integer}");
                        append_identifiers_form_noting(
                            &scratch.number,
                            &mut scratch.identifiers,
                            &mut scratch.tokens,
                        );
                        pieces.push(Piece {
                            end: base + scratch.identifiers.len(),
                            node,
                            site: JsonSite::Value,
                        });
                    }
                }
                Value::Array(items) => {
                    for (i, item) in items.iter().enumerate().rev() {
                        nodes.push(Node {
                            parent: node,
                            segment: Segment::Index(i),
                        });
                        stack.push((item, nodes.len() - 1));
                    }
                }
                Value::Object(map) => {
                    // Keys first (they come before their values in the document).
                    let first_key = pieces.len();
                    for key in map.keys() {
                        append_identifiers_form_noting(
                            key,
                            &mut scratch.identifiers,
                            &mut scratch.tokens,
                        );
                        pieces.push(Piece {
                            end: base + scratch.identifiers.len(),
                            node,
                            site: JsonSite::Key,
                        });
                    }
                    for (k, (_, item)) in map.as_vec().iter().enumerate().rev() {
                        nodes.push(Node {
                            parent: node,
                            segment: Segment::Key {
                                position: k,
                                piece: first_key + k,
                            },
                        });
                        stack.push((item, nodes.len() - 1));
                    }
                }
                Value::Null | Value::Bool(_) => {}
            }
        }

        self.scan_chunk(scratch, &pieces, &mut hits, &mut base);
        let mut named: Vec<usize> = hits.iter().map(|h| h.1).collect();
        named.sort_unstable();
        named.dedup();
        // The first place of each organisation, then in document order.
        hits.sort_unstable();
        hits.dedup_by_key(|h| h.0);
        hits.sort_unstable_by_key(|h| (h.1, h.0));
        let found = hits
            .iter()
            .filter_map(|&(org, piece, kind)| {
                let id = self.ids.get(usize::try_from(org).ok()?)?;
                let p = pieces.get(piece)?;
                Some(JsonMatch {
                    org: id,
                    kind,
                    path: path_of(value, &nodes, p.node, &named),
                    site: p.site,
                })
            })
            .collect();
        scratch.nodes = nodes;
        scratch.pieces = pieces;
        scratch.hits = hits;
        found
    }

    /// As [`Matcher::scan_json_with`], for a document parsed from `json_text`, first looking
    /// at that text whole: only if it could name an organisation is the document walked
    /// string by string (which finds and places each match). The finding is the same.
    ///
    /// `value` must be what the JSON parser made of `json_text` (it is not checked): a text
    /// that says less than its document would hide matches.
    ///
    /// The first look (see `key_words`) answers for pure-ASCII texts whose escapes all stand
    /// for punctuation (`\n`, `\"`), which write every word of every string and integer of
    /// their document as it is: if none of the text's words is the key word of a registered
    /// name or identifier, no string of the document can hold one. Any other text is walked.
    pub fn scan_json_text_with<'m>(
        &'m self,
        scratch: &mut Scratch,
        json_text: &[u8],
        value: &Value<'_>,
    ) -> Vec<JsonMatch<'m>> {
        if !self.text_may_name(json_text) {
            return Vec::new();
        }
        self.scan_json_with(scratch, value)
    }

    /// Whether the JSON text `text` could name an organisation (true when unsure).
    fn text_may_name(&self, text: &[u8]) -> bool {
        self.key_words.may_name(text)
    }

    /// Scans the part of a JSON document's form in `scratch.identifiers`, which starts at
    /// `*base` in the whole form, adding (organisation, piece, kind) to `hits` for every
    /// match; then empties the buffer and moves `*base` past it.
    fn scan_chunk(
        &self,
        scratch: &mut Scratch,
        pieces: &[Piece],
        hits: &mut Vec<(u32, usize, MatchKind)>,
        base: &mut usize,
    ) {
        let start = *base;
        self.scan_form(scratch, |at, org, kind| {
            let piece = pieces.partition_point(|p| p.end <= start + at);
            hits.push((org, piece, kind));
        });
        *base += scratch.identifiers.len();
        scratch.identifiers.clear();
        scratch.tokens.clear();
    }

    /// Fills `scratch.found` with the distinct (organisation, kind) pairs `text` names.
    fn scan_into(&self, scratch: &mut Scratch, text: &str) {
        scratch.identifiers.clear();
        scratch.tokens.clear();
        append_identifiers_form_noting(text, &mut scratch.identifiers, &mut scratch.tokens);
        let mut found = std::mem::take(&mut scratch.found);
        found.clear();
        self.scan_form(scratch, |_, org, kind| found.push((org, kind)));
        found.sort_unstable();
        found.dedup();
        scratch.found = found;
    }

    /// Scans the identifiers form in `scratch.identifiers` (and the names form made from it),
    /// calling `emit(position, organisation, kind)` for every match that counts.
    fn scan_form(&self, scratch: &mut Scratch, mut emit: impl FnMut(usize, u32, MatchKind)) {
        if let Some(names) = &self.names {
            // The names form is the identifiers form with its kept marks as spaces.
            scratch.names.clear();
            scratch.names.extend(
                scratch
                    .identifiers
                    .iter()
                    .map(|&b| if is_mark(b) { b' ' } else { b }),
            );
            scratch.spans.clear();
            if let Ok(iter) = names.ac.try_find_overlapping_iter(scratch.names.as_slice()) {
                scratch.spans.extend(iter.map(|m| Span {
                    start: m.start(),
                    end: m.end(),
                    pattern: m.pattern().as_usize(),
                }));
            }
            // Longest first among equal starts; then a span is inside a longer one exactly
            // when an earlier span reaches at least as far (patterns are distinct, so no two
            // spans are equal).
            scratch
                .spans
                .sort_unstable_by(|a, b| a.start.cmp(&b.start).then(b.end.cmp(&a.end)));
            let mut reach = 0usize;
            for span in &scratch.spans {
                let inside = reach >= span.end;
                reach = reach.max(span.end);
                if inside {
                    continue;
                }
                for owner in names.owners.get(span.pattern).into_iter().flatten() {
                    if let Role::Identifies(kind) = owner.role {
                        emit(span.start, owner.org, kind);
                    }
                }
            }
        }
        self.identifiers
            .scan(&scratch.identifiers, &scratch.tokens, &mut emit);
    }
}

/// Where one string of a JSON document ends in the scanned buffer, and whose it is.
#[derive(Debug)]
struct Piece {
    end: usize,
    node: usize,
    site: JsonSite,
}

/// A value of the walked document: its parent's node (the root is its own parent) and how
/// it is reached from there.
#[derive(Debug)]
struct Node {
    parent: usize,
    segment: Segment,
}

#[derive(Debug)]
enum Segment {
    Root,
    Index(usize),
    /// The `position`th property of its object (in the map's order), whose name was scanned
    /// as `piece`. The name itself is looked up only when a path is spelt out.
    Key {
        position: usize,
        piece: usize,
    },
}

/// A property name shown as itself in a path: a plain identifier of at most 64 characters.
fn plain_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 64
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// Spells out the path of `node`, descending from `root` along the recorded segments. A
/// property name is shown only if it is plain and its piece is not in `named` (sorted).
fn path_of(root: &Value<'_>, nodes: &[Node], mut node: usize, named: &[usize]) -> String {
    let mut segments = Vec::new();
    while let Some(n) = nodes.get(node) {
        segments.push(&n.segment);
        if n.parent == node {
            break;
        }
        node = n.parent;
    }
    let mut path = String::new();
    let mut at = Some(root);
    for s in segments.iter().rev() {
        let _ = match s {
            Segment::Root => write!(path, "$"),
            Segment::Index(i) => {
                at = at.and_then(|v| v.as_array()).and_then(|a| a.get(*i));
                write!(path, "[{i}]")
            }
            Segment::Key { position, piece } => {
                let entry = at
                    .and_then(Value::as_object)
                    .and_then(|m| m.as_vec().get(*position))
                    .map(|(k, v)| (&**k, v));
                at = entry.map(|(_, v)| v);
                match entry {
                    Some((k, _)) if plain_key(k) && named.binary_search(piece).is_err() => {
                        write!(path, ".{k}")
                    }
                    _ => write!(path, "[?]"),
                }
            }
        };
    }
    path
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    // The generated documents are built, edited and written as serde_json values; the matcher
    // walks the broker's own document type (`Doc`), parsed from text or converted.
    use serde_json::Value;
    use serde_json_borrow::Value as Doc;

    use super::*;
    use crate::registry::{Organisation, OrganisationSpec, normalise::tests as normalise_tests};

    fn org(id: &str, name: &str, edit: impl FnOnce(&mut OrganisationSpec)) -> Organisation {
        let mut s = OrganisationSpec {
            id: id.into(),
            legal_name: name.into(),
            ..OrganisationSpec::default()
        };
        edit(&mut s);
        Organisation::new(s).unwrap()
    }

    /// The issue's two organisations plus neighbours that make the negatives meaningful.
    fn matcher() -> Matcher {
        let registry = Registry::new(vec![
            org("acme-ltd", "Acme Ltd", |s| {
                s.other_names = vec!["ACME Limited".into()];
                s.company_number = Some("01234567".into());
                s.domains = vec!["acme.example".into(), "acmecorp.example".into()];
                s.not_names = vec!["Acme Road".into()];
            }),
            org("globex-plc", "Globex PLC", |s| {
                s.domains = vec!["globex.example".into()];
                s.email_domains = vec!["globex-mail.example".into()];
                s.charity_number = Some("SC012345".into());
            }),
            org("acme-holdings", "Acme Holdings Limited", |_| {}),
            org("apple-charity", "Apple", |s| {
                s.match_on = Some("identifiers".into());
                s.company_number = Some("SC123456".into());
            }),
        ])
        .unwrap();
        Matcher::new(&registry).unwrap()
    }

    fn found(m: &Matcher, text: &str) -> Vec<(String, MatchKind)> {
        m.scan(text).map(|f| (f.org.to_string(), f.kind)).collect()
    }

    #[test]
    fn matching_table() {
        use MatchKind::*;
        let m = matcher();
        /// A row: what it shows, the text, and the (organisation, kind) pairs it must yield.
        type Row = (
            &'static str,
            &'static str,
            &'static [(&'static str, MatchKind)],
        );
        let cases: &[Row] = &[
            // Positives. A domain's labels are words too, so a domain whose label is a
            // registered name also matches the name.
            ("plain name", "Acme Ltd", &[("acme-ltd", Name)]),
            (
                "name hidden in a description",
                "The actor phished staff at acme limited last week.",
                &[("acme-ltd", Name)],
            ),
            ("mixed case", "aCmE LtD.", &[("acme-ltd", Name)]),
            (
                "name without suffix",
                "breach at ACME, then",
                &[("acme-ltd", Name)],
            ),
            ("other name", "ACME   Limited", &[("acme-ltd", Name)]),
            ("plc suffix", "GLOBEX plc", &[("globex-plc", Name)]),
            (
                "company number",
                "Company No. 01234567.",
                &[("acme-ltd", CompanyNumber)],
            ),
            (
                "company number unpadded",
                "reg 1234567",
                &[("acme-ltd", CompanyNumber)],
            ),
            (
                "charity number",
                "charity sc012345",
                &[("globex-plc", CharityNumber)],
            ),
            (
                "domain",
                "see acme.example",
                &[("acme-ltd", Domain), ("acme-ltd", Name)],
            ),
            (
                "domain in a URL",
                "https://ACME.example/login?x=1",
                &[("acme-ltd", Domain), ("acme-ltd", Name)],
            ),
            (
                "subdomain",
                "vpn.eu.acme.example:443",
                &[("acme-ltd", Domain), ("acme-ltd", Name)],
            ),
            (
                "email on a subdomain",
                "from x@mail.acme.example",
                &[("acme-ltd", Domain), ("acme-ltd", Name)],
            ),
            (
                "email domain",
                "to: j.doe@globex-mail.example",
                &[("globex-plc", EmailDomain), ("globex-plc", Name)],
            ),
            (
                "trailing dot",
                "visit acme.example.",
                &[("acme-ltd", Domain), ("acme-ltd", Name)],
            ),
            (
                "two organisations",
                "Acme and Globex",
                &[("acme-ltd", Name), ("globex-plc", Name)],
            ),
            (
                "name and identifier",
                "Acme (01234567)",
                &[("acme-ltd", Name), ("acme-ltd", CompanyNumber)],
            ),
            (
                "longer name wins",
                "Acme Holdings Ltd was hit",
                &[("acme-holdings", Name)],
            ),
            (
                "shorter name elsewhere still counts",
                "Acme Holdings and Acme",
                &[("acme-ltd", Name), ("acme-holdings", Name)],
            ),
            (
                "identifiers-only by number",
                "SC123456",
                &[("apple-charity", CompanyNumber)],
            ),
            // Negatives.
            ("word boundary before", "macme", &[]),
            ("word boundary after", "acmeltd", &[]),
            ("inside a word", "the pacmen", &[]),
            // (acmecorp.example's label is not a name, so these rows show the domain rules.)
            ("look-alike domain", "notacmecorp.example", &[]),
            ("issue's look-alike domain", "notacme.example", &[]),
            ("hyphenated look-alike domain", "not-acmecorp.example", &[]),
            ("domain as a prefix", "acmecorp.example.evil.test", &[]),
            ("domain in a longer label", "acmecorp.examples", &[]),
            (
                "acmecorp subdomain",
                "a.b.acmecorp.example",
                &[("acme-ltd", Domain)],
            ),
            (
                "a hyphen is a word boundary for names",
                "not-acme.example",
                &[("acme-ltd", Name)],
            ),
            ("number inside a longer number", "901234567", &[]),
            ("number with a suffix", "01234567-2", &[]),
            ("common-word name, identifiers only", "an apple a day", &[]),
            ("not_names phrase", "12 Acme Road, London", &[]),
            ("empty", "", &[]),
            ("separators only", " .-@ ", &[]),
        ];
        for (what, text, want) in cases {
            let want: Vec<(String, MatchKind)> =
                want.iter().map(|(o, k)| ((*o).to_owned(), *k)).collect();
            let mut got = found(&m, text);
            got.sort();
            let mut want = want;
            want.sort();
            assert_eq!(got, want, "{what}: {text:?}");
        }
    }

    #[test]
    fn json_paths_name_where_not_what() {
        let m = matcher();
        let doc: Doc<'_> = serde_json::from_str(
            r#"{
                "type": "bundle",
                "objects": [
                    {"type": "indicator", "description": "nothing here"},
                    {"type": "identity", "identity_class": "organization", "name": "Globex PLC"},
                    {"type": "note", "content": "later: Globex again"},
                    {"type": "x", "refs": [{"url": "https://www.acme.example/"}]},
                    {"Acme Ltd": true, "odd key!": "01234567"}
                ],
                "count": 1234567
            }"#,
        )
        .unwrap();
        let got: Vec<String> = m.scan_json(&doc).iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "globex-plc (name) at $.objects[1].name",
                "acme-ltd (name) at $.objects[3].refs[0].url",
            ],
            "document order: the first place of each organisation"
        );

        let doc: Doc<'_> = serde_json::from_str(
            r#"{"objects": [{"x": 1}, {"x": 2}, {"x": 3}, {"refs": [{"url": "https://www.acme.example/"}]}]}"#,
        )
        .unwrap();
        let got = m.scan_json(&doc);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].path, "$.objects[3].refs[0].url");
        assert_eq!(got[0].kind, MatchKind::Name, "the first kind in order");

        // A key that names an organisation is reported on its object and never spelt out.
        let doc: Doc<'_> =
            serde_json::from_str(r#"{"a": [{"Acme Ltd": {"note": "globex"}}]}"#).unwrap();
        let got: Vec<String> = m.scan_json(&doc).iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "acme-ltd (name) in a property name of $.a[0]",
                "globex-plc (name) at $.a[0][?].note",
            ]
        );
        assert!(got.iter().all(|s| !s.contains("Acme Ltd")));
    }

    /// A document much larger than `JSON_CHUNK` is scanned in parts: matches in every part,
    /// including right after a part's end, are found and placed in the right string.
    #[test]
    fn large_json_is_scanned_in_parts() {
        let m = matcher();
        let filler = "lorem ipsum dolor sit amet consectetur adipiscing elit";
        let mut items: Vec<Value> = (0..6000).map(|_| Value::from(filler)).collect();
        let total: usize = items.len() * (filler.len() + 2);
        assert!(total > 4 * JSON_CHUNK, "the test needs several parts");
        // The strings whose form starts near a part's boundary, and elsewhere.
        let per_chunk = JSON_CHUNK / (filler.len() + 2);
        let places = [3, per_chunk, per_chunk + 1, 2 * per_chunk + 7, 5999];
        let texts = [
            "contact soc@mail.acme.example",
            "Globex PLC",
            "Hooli Holdings",
            "company 01234567",
            "Acme Holdings Ltd",
        ];
        for (&i, &t) in places.iter().zip(&texts) {
            items[i] = Value::from(t);
        }
        let doc = serde_json::json!({ "items": items });
        let got: Vec<String> = m
            .scan_json(&Doc::from(&doc))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [
                "acme-ltd (name) at $.items[3]".to_owned(),
                format!("globex-plc (name) at $.items[{per_chunk}]"),
                "acme-holdings (name) at $.items[5999]".to_owned(),
            ]
        );
        // Every part is scanned: with only the number late in the document, it is found.
        let mut items: Vec<Value> = (0..6000).map(|_| Value::from(filler)).collect();
        items[2 * per_chunk + 7] = Value::from("company 01234567");
        let got: Vec<String> = m
            .scan_json(&Doc::from(&Value::Array(items)))
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(
            got,
            [format!(
                "acme-ltd (company number) at $[{}]",
                2 * per_chunk + 7
            )]
        );
    }

    /// A registry too large for a DFA gets an NFA, which finds exactly the same.
    #[test]
    fn nfa_and_dfa_agree() {
        let registry = Registry::new(vec![
            org("acme-ltd", "Acme Ltd", |s| {
                s.company_number = Some("01234567".into());
                s.domains = vec!["acme.example".into()];
                s.not_names = vec!["Acme Road".into()];
            }),
            org("acme-holdings", "Acme Holdings Limited", |_| {}),
            org("globex-plc", "Globex PLC", |_| {}),
        ])
        .unwrap();
        let dfa = Matcher::new(&registry).unwrap();
        let nfa = Matcher::with_dfa_limit(&registry, 0).unwrap();
        let kind = |m: &Matcher| m.names.as_ref().map(|n| n.ac.kind());
        assert_eq!(kind(&dfa), Some(AhoCorasickKind::DFA));
        assert_eq!(kind(&nfa), Some(AhoCorasickKind::ContiguousNFA));
        for text in [
            "Acme Holdings Ltd and Globex, 12 Acme Road",
            "acme and acme holdings; mail x@vpn.acme.example",
            "company 01234567 of globexplc",
            "",
        ] {
            let found = |m: &Matcher| {
                let mut v: Vec<(String, MatchKind)> =
                    m.scan(text).map(|f| (f.org.to_string(), f.kind)).collect();
                v.sort();
                v
            };
            assert_eq!(found(&nfa), found(&dfa), "{text:?}");
        }
    }

    /// `matcher()`'s registry and two more: a two-word name whose first word names no one
    /// alone, and an accented name.
    fn wider_matcher() -> Matcher {
        let registry = Registry::new(vec![
            org("acme-ltd", "Acme Ltd", |s| {
                s.other_names = vec!["ACME Limited".into()];
                s.company_number = Some("01234567".into());
                s.domains = vec!["acme.example".into(), "acmecorp.example".into()];
                s.not_names = vec!["Acme Road".into()];
            }),
            org("globex-plc", "Globex PLC", |s| {
                s.domains = vec!["globex.example".into()];
                s.email_domains = vec!["globex-mail.example".into()];
                s.charity_number = Some("SC012345".into());
            }),
            org("acme-holdings", "Acme Holdings Limited", |_| {}),
            org("apple-charity", "Apple", |s| {
                s.match_on = Some("identifiers".into());
                s.company_number = Some("SC123456".into());
            }),
            org("initech", "Initech Software Ltd", |_| {}),
            org("socgen", "Soci\u{e9}t\u{e9} G\u{e9}n\u{e9}rale", |_| {}),
        ])
        .unwrap();
        Matcher::new(&registry).unwrap()
    }

    /// Checks that the whole-text scan and the walk find the same in the JSON text `text`,
    /// and that the text alone is never judged to name no one where the walk finds someone.
    /// Returns (what the walk found, whether the text could name someone).
    fn agree(m: &Matcher, text: &str) -> (Vec<String>, bool) {
        let value: Doc<'_> = serde_json::from_str(text).unwrap();
        let mut scratch = Scratch::default();
        let walked: Vec<String> = m
            .scan_json_with(&mut scratch, &value)
            .iter()
            .map(ToString::to_string)
            .collect();
        let fast: Vec<String> = m
            .scan_json_text_with(&mut scratch, text.as_bytes(), &value)
            .iter()
            .map(ToString::to_string)
            .collect();
        assert_eq!(fast, walked, "{text}");
        let may = m.text_may_name(text.as_bytes());
        assert!(may || walked.is_empty(), "missed {walked:?} in {text}");
        (walked, may)
    }

    #[test]
    fn the_whole_text_scan_misses_nothing_the_walk_finds() {
        let m = wider_matcher();
        // (what, JSON text, whether the walk finds someone, whether the text could)
        let rows: &[(&str, &str, bool, bool)] = &[
            (
                "nobody",
                r#"{"a":"plain words","n":[1,2.5,true,null]}"#,
                false,
                false,
            ),
            ("a name", r#"{"a":"Acme Ltd"}"#, true, true),
            ("mixed case", r#"{"a":"aCmE lTd"}"#, true, true),
            ("in a key", r#"{"x":{"Acme Ltd":1}}"#, true, true),
            (
                "split by a \\u escape",
                r#"{"a":"Acme\u0020Ltd"}"#,
                true,
                true,
            ),
            ("a letter escaped", r#"{"a":"\u0041cme"}"#, true, true),
            ("after \\n", r#"{"a":"x\nAcme"}"#, true, true),
            ("after \\t, in a key", r#"{"x\tGlobex":0}"#, true, true),
            ("an escaped backslash", r#"{"a":"\\nAcme"}"#, false, false),
            (
                "an escaped quote before an n",
                r#"{"a":"\"nAcme"}"#,
                false,
                false,
            ),
            ("escaped quotes", r#"{"a":"\"Acme\""}"#, true, true),
            (
                "a surrogate pair",
                r#"{"a":"\ud83d\ude00Acme"}"#,
                true,
                true,
            ),
            (
                "accents escaped",
                r#"{"a":"Soci\u00e9t\u00e9 G\u00e9n\u00e9rale"}"#,
                true,
                true,
            ),
            (
                "accents plain",
                "{\"a\":\"SOCI\u{c9}T\u{c9} G\u{c9}N\u{c9}RALE\"}",
                true,
                true,
            ),
            (
                "a URL, slashes escaped",
                r#"{"u":"https:\/\/vpn.acmecorp.example\/x"}"#,
                true,
                true,
            ),
            (
                "a dot escaped",
                r#"{"u":"acmecorp\u002eexample"}"#,
                true,
                true,
            ),
            (
                "a subdomain",
                r#"{"a":"mail.vpn.acmecorp.example"}"#,
                true,
                true,
            ),
            (
                "an e-mail domain",
                r#"{"a":"x@globex-mail.example"}"#,
                true,
                true,
            ),
            (
                "a look-alike domain",
                r#"{"a":"notacmecorp.example"}"#,
                false,
                false,
            ),
            ("a company number", r#"{"a":"No. 01234567"}"#, true, true),
            ("an integer", r#"{"a":1234567}"#, true, true),
            ("a negative integer", r#"[-1234567]"#, true, true),
            // JSON has one kind of number: 1234567.0 and 1.234567e6 are the integer 1234567
            // to whoever reads them (JavaScript prints them so).
            (
                "an integral float is that integer",
                r#"{"a":1234567.0}"#,
                true,
                true,
            ),
            (
                "so is one with an exponent",
                r#"{"a":1234567e0}"#,
                true,
                true,
            ),
            (
                "or with a fraction and an exponent",
                r#"{"a":1.234567e6}"#,
                true,
                true,
            ),
            ("or a signed exponent", r#"[-12345.67E+2]"#, true, true),
            // A fraction is not an integer, but its digits are a word.
            (
                "a fraction is not an integer",
                r#"{"a":1234567.5}"#,
                false,
                true,
            ),
            // A fraction too long for a double rounds: to the reader too, 1234567.
            (
                "a fraction that rounds to the integer",
                r#"{"a":1234566.9999999999}"#,
                true,
                true,
            ),
            ("a negative one", r#"[-1234566.99999999999]"#, true, true),
            (
                "a long fraction in a string is words",
                r#"{"a":"1234566.9999999999"}"#,
                false,
                false,
            ),
            (
                "an exponent in a string is a word",
                r#"{"a":"1234567e0","b":"2.5e3"}"#,
                false,
                false,
            ),
            (
                "a number's digits escaped",
                r#"{"a":"0123\u00345\u00367"}"#,
                true,
                true,
            ),
            ("a charity number", r#"["sc012345"]"#, true, true),
            (
                "an identifiers-only name",
                r#"{"a":"an apple a day"}"#,
                false,
                false,
            ),
            ("a number split in two", r#"["0123","4567"]"#, false, false),
            (
                "a domain split in two",
                r#"["acmecorp",".example"]"#,
                false,
                true,
            ),
            // Punctuation between two strings joins their words: a false alarm that the
            // walk settles.
            (
                "a name across two strings",
                r#"["Initech","Software"]"#,
                false,
                true,
            ),
            (
                "across a key and its value",
                r#"{"Initech":"Software"}"#,
                false,
                true,
            ),
            // A name that the text's punctuation puts inside a not_names phrase or a longer
            // name still alarms, though there it would not count.
            (
                "in one string, a not_names phrase beside the next",
                r#"["12 Acme","Road"]"#,
                true,
                true,
            ),
            (
                "beside the next string's longer name",
                r#"["Acme","Holdings"]"#,
                true,
                true,
            ),
            (
                "a not_names phrase in one string",
                r#"["12 Acme Road"]"#,
                false,
                true,
            ),
        ];
        for (what, text, walk, may) in rows {
            let (found, alarmed) = agree(&m, text);
            assert_eq!(
                (!found.is_empty(), alarmed),
                (*walk, *may),
                "{what}: {text}"
            );
        }
        // A text the parser did not make (a bad escape) is walked, not trusted.
        let value: Doc<'_> = serde_json::from_str(r#"{"a": "Acme"}"#).unwrap();
        let mut scratch = Scratch::default();
        assert_eq!(
            m.scan_json_text_with(&mut scratch, br#"{"a":"\x"}"#, &value)
                .len(),
            1
        );
    }

    /// Writes `v` as JSON with random whitespace between tokens, each string escaped at
    /// random (see `Gen::escaped`) if `escape`, else only where JSON requires.
    fn write_json(v: &Value, g: &mut normalise_tests::Gen, escape: bool, out: &mut String) {
        let space = |g: &mut normalise_tests::Gen, out: &mut String| {
            if g.next().is_multiple_of(3) {
                out.push_str([" ", "\n  ", "\t"][(g.next() % 3) as usize]);
            }
        };
        space(g, out);
        match v {
            Value::String(s) if escape => {
                out.push('"');
                out.push_str(&g.escaped(s));
                out.push('"');
            }
            Value::Array(items) => {
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    write_json(item, g, escape, out);
                }
                out.push(']');
            }
            Value::Object(map) => {
                out.push('{');
                for (i, (k, item)) in map.iter().enumerate() {
                    if i > 0 {
                        out.push(',');
                    }
                    space(g, out);
                    if escape {
                        out.push('"');
                        out.push_str(&g.escaped(k));
                        out.push('"');
                    } else {
                        out.push_str(&Value::from(k.as_str()).to_string());
                    }
                    out.push(':');
                    write_json(item, g, escape, out);
                }
                out.push('}');
            }
            // An integer spelled as JSON allows: plainly, with a fraction, with an exponent,
            // with a fraction that rounds to it.
            Value::Number(n) if n.as_i64().is_some() => {
                let n = n.as_i64().unwrap_or(0);
                let (sign, digits) = (if n < 0 { "-" } else { "" }, n.unsigned_abs().to_string());
                let (head, tail) = digits.split_at(1);
                let spelled = match g.next() % 8 {
                    // Too many digits for a double: the parser rounds it up to the integer.
                    6 if n != 0 => format!("{sign}{}.{}", n.unsigned_abs() - 1, "9".repeat(20)),
                    0 => format!("{sign}{digits}.0"),
                    1 => format!("{sign}{digits}e0"),
                    2 if !tail.is_empty() => format!("{sign}{head}.{tail}e{}", tail.len()),
                    3 if !tail.is_empty() => format!("{sign}{head}.{tail}E+{}", tail.len()),
                    4 if n != 0 => format!("{sign}{digits}0e-1"),
                    5 => format!("{sign}0.{digits}e{}", digits.len()),
                    _ => format!("{sign}{digits}"),
                };
                out.push_str(&spelled);
            }
            other => out.push_str(&other.to_string()),
        }
        space(g, out);
    }

    /// Pieces of the generated documents' strings: every registered name, identifier and
    /// not_names phrase in pieces, separators, and (from `SPECIAL`) characters beyond ASCII
    /// or that JSON escapes.
    const PIECES: &[&str] = &[
        "Acme",
        "aCME",
        "Ltd",
        "Limited",
        "Holdings",
        "Road",
        "12",
        "01234567",
        "1234567",
        "0123",
        "4567",
        "SC012345",
        "sc123456",
        "acme.example",
        "acmecorp",
        ".example",
        "x@",
        "mail.",
        "globex-mail",
        "Globex",
        "PLC",
        "Initech",
        "Software",
        "Apple",
        "Soci",
        "Generale",
        ".",
        "@",
        "-",
        " ",
        "/",
        "'",
        "nobody",
        "quiet",
        "words",
        "",
    ];
    const SPECIAL: &[&str] = &[
        "Soci\u{e9}t\u{e9}",
        "G\u{c9}n\u{e9}rale",
        "\n",
        "\"",
        "\\",
        "\u{2019}",
        "\u{1f600}",
        "\u{130}",
    ];

    /// A generated document; with `special`, its strings may hold `SPECIAL` pieces.
    fn generated_value(g: &mut normalise_tests::Gen, depth: u32, special: bool) -> Value {
        let text = |g: &mut normalise_tests::Gen| -> String {
            (0..g.next() % 5)
                .map(|_| {
                    let k = g.next() as usize;
                    if special && k.is_multiple_of(4) {
                        SPECIAL[(k / 4) % SPECIAL.len()]
                    } else {
                        PIECES[k % PIECES.len()]
                    }
                })
                .collect()
        };
        match g.next() % if depth == 0 { 3 } else { 6 } {
            0 | 1 => Value::String(text(g)),
            2 => Value::from([1234567_i64, -1234567, 1234567, 42, 0][(g.next() % 5) as usize]),
            3 | 4 => Value::Object(
                (0..g.next() % 4)
                    .map(|_| (text(g), generated_value(g, depth - 1, special)))
                    .collect(),
            ),
            _ => Value::Array(
                (0..g.next() % 4)
                    .map(|_| generated_value(g, depth - 1, special))
                    .collect(),
            ),
        }
    }

    /// A property test: on generated documents (half of them pure ASCII without escapes,
    /// the others with characters beyond ASCII and every kind of escape), written with
    /// random whitespace, the whole-text look and walk find exactly what the walk alone
    /// finds, and the look alarms wherever the walk finds someone.
    #[test]
    fn the_whole_text_scan_agrees_on_generated_documents() {
        let m = wider_matcher();
        let mut g = normalise_tests::Gen(0xdead_beef_cafe_f00d);
        let (mut named, mut quiet) = (0, 0);
        for i in 0..40_000 {
            let special = i % 2 == 1;
            let v = generated_value(&mut g, 3, special);
            let mut text = String::new();
            write_json(&v, &mut g, special, &mut text);
            let (found, may) = agree(&m, &text);
            named += usize::from(!found.is_empty());
            quiet += usize::from(!may);
        }
        // The generator must exercise both verdicts to prove anything.
        assert!(
            named > 4_000 && quiet > 4_000,
            "{named} named, {quiet} quiet"
        );
    }

    /// The same over the STIX test corpus: every bundle as it is, then with each of its
    /// strings in turn replaced by texts that name someone (or almost), written plainly
    /// and with random escapes.
    #[test]
    fn the_whole_text_scan_agrees_on_the_stix_corpus() {
        let m = wider_matcher();
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("testdata/stix");
        let mut g = normalise_tests::Gen(0x0123_4567_89ab_cdef);
        let mut documents = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            let text = std::fs::read_to_string(&path).unwrap();
            let Ok(value) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            agree(&m, &text);
            documents += 1;
            let strings = count_strings(&value);
            for k in 0..strings {
                for replacement in [
                    "breach at ACME, then",
                    "see x@mail.acmecorp.example.",
                    "12 Acme Road",
                    "Company No. 01234567",
                    "Initech",
                    "no one at all",
                ] {
                    let mut v = value.clone();
                    replace_string(&mut v, k, replacement);
                    agree(&m, &serde_json::to_string(&v).unwrap());
                    let mut escaped = String::new();
                    write_json(&v, &mut g, true, &mut escaped);
                    agree(&m, &escaped);
                }
            }
        }
        assert!(documents > 30, "the corpus was not read: {documents}");
    }

    fn count_strings(v: &Value) -> usize {
        match v {
            Value::String(_) => 1,
            Value::Array(items) => items.iter().map(count_strings).sum(),
            Value::Object(map) => map.values().map(count_strings).sum(),
            _ => 0,
        }
    }

    /// Replaces the `k`th string value of `v` (in `count_strings`' order) with `with`.
    fn replace_string(v: &mut Value, k: usize, with: &str) {
        fn walk(v: &mut Value, k: &mut usize, with: &str) -> bool {
            match v {
                Value::String(s) => {
                    if *k == 0 {
                        *s = with.to_owned();
                        return true;
                    }
                    *k -= 1;
                    false
                }
                Value::Array(items) => items.iter_mut().any(|i| walk(i, k, with)),
                Value::Object(map) => map.values_mut().any(|i| walk(i, k, with)),
                _ => false,
            }
        }
        let mut k = k;
        walk(v, &mut k, with);
    }

    #[test]
    fn deep_json_does_not_recurse() {
        let m = matcher();
        let mut v = Doc::Str("acme.example".into());
        for _ in 0..100_000 {
            v = Doc::Array(vec![v]);
        }
        let got = m.scan_json(&v);
        assert_eq!(got.len(), 1);
        assert!(got[0].path.ends_with("[0][0]"));
        // Dropping a deeply nested value recurses; leak it instead.
        std::mem::forget(v);
    }

    /// A name or number broken by characters that render as nothing (a soft hyphen, a
    /// zero-width space or joiner) reads as the name to a person, so it is found: in text, and
    /// in JSON whether the characters are written plainly or escaped.
    #[test]
    fn invisible_characters_do_not_hide_a_name() {
        let m = matcher();
        for text in [
            "Ac\u{00ad}me Ltd",
            "Ac\u{200b}me Ltd",
            "A\u{200d}cme\u{2060} Ltd",
            "company 0123\u{00ad}4567",
            "mail@ac\u{00ad}me.example",
        ] {
            assert!(
                found(&m, text).iter().any(|(org, _)| org == "acme-ltd"),
                "{text:?}"
            );
            for json in [
                serde_json::json!({ "a": text }).to_string(),
                serde_json::json!({ "a": text })
                    .to_string()
                    .replace('\u{00ad}', "\\u00ad")
                    .replace('\u{200b}', "\\u200B")
                    .replace('\u{200d}', "\\u200d")
                    .replace('\u{2060}', "\\u2060"),
            ] {
                let value: Doc<'_> = serde_json::from_str(&json).unwrap();
                let got = m.scan_json_text_with(&mut Scratch::default(), json.as_bytes(), &value);
                assert!(
                    got.iter().any(|f| f.to_string().contains("acme-ltd")),
                    "{json} {got:?}"
                );
            }
        }
    }

    #[test]
    fn large_inputs_are_scanned_whole() {
        let m = matcher();
        let filler = "lorem ipsum dolor sit amet, consectetur adipiscing elit. ";
        let mut text = filler.repeat(20_000);
        assert!(found(&m, &text).is_empty());
        text.push_str("contact soc@mail.acme.example ");
        text.push_str(&filler.repeat(20_000));
        assert_eq!(
            found(&m, &text),
            [
                ("acme-ltd".to_owned(), MatchKind::Name),
                ("acme-ltd".to_owned(), MatchKind::Domain)
            ]
        );
        // Many matches of one organisation report it once.
        let many = "Acme Ltd ".repeat(200_000);
        assert_eq!(found(&m, &many), [("acme-ltd".to_owned(), MatchKind::Name)]);
    }

    /// A property-style check: arbitrary UTF-8, including every separator and multi-byte
    /// characters spliced into names, never panics, and a name placed between separators is
    /// always found.
    #[test]
    fn arbitrary_text_never_panics() {
        let m = matcher();
        let alphabet: Vec<char> =
            "aAcmeE lt.d@-_/\u{e9}\u{df}\u{130}\u{2019}\u{a0}\u{1f600}0123456789\t\n\"\\"
                .chars()
                .collect();
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut scratch = Scratch::default();
        let mut out = Vec::new();
        for _ in 0..20_000 {
            let len = (next() % 40) as usize;
            let s: String = (0..len)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            out.clear();
            m.scan_with(&mut scratch, &s, &mut out);
            let with_name = format!("{s} acme ltd {s}");
            out.clear();
            m.scan_with(&mut scratch, &with_name, &mut out);
            // "acme" can be absorbed only by a longer phrase around it (Acme Holdings, Acme
            // Road), which the alphabet cannot spell; so it must be found.
            assert!(
                out.iter().any(|f| f.org.as_str() == "acme-ltd"),
                "{with_name:?}"
            );
        }
    }
}
