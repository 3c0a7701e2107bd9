//! The registry of protected organisations, and the matcher that finds them in payloads.
//!
//! The configuration registers each organisation whose consent the federation protects: its id,
//! legal name, other names, and identifiers (UK company number, charity number, web domains,
//! e-mail domains). [`Registry`] holds them validated; [`Matcher`], built once from a registry,
//! finds which of them a text or a JSON document names, and where. The policy decides what a
//! match means (a payload that names an organisation needs that organisation's consent); this
//! module only answers "who is named, by what kind of evidence, and where".
//!
//! The module reads no configuration file: the configuration builds [`Organisation`]s with
//! [`Organisation::new`] and a [`Registry`] with [`Registry::new`], mapping their errors to its
//! keys. See `docs/registry.md` for the matching rules as an operator sees them.

mod key_words;
mod matcher;
mod normalise;

use std::{collections::BTreeSet, fmt, str::FromStr};

use concordat_proto::ids::OrgId;

pub use matcher::{JsonMatch, JsonSite, MatchKind, Matcher, OrgMatch, Scratch};

/// The longest name, other name or `not_names` phrase accepted, in bytes.
pub const MAX_NAME_LEN: usize = 256;
/// The most words a name may have once normalised (bounds the matcher's work per position).
pub const MAX_NAME_WORDS: usize = 16;

/// A registry entry, an identifier or a registry that could not be accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RegistryError {
    /// A field of one organisation is wrong. `field` is its configuration key
    /// (`legal_name`, `other_names[1]`, `company_number`, `domains[0]`, ...).
    #[error("{field}: {problem}")]
    Field {
        /// The configuration key of the field, relative to the organisation.
        field: String,
        /// What is wrong.
        problem: String,
    },
    /// Two organisations share an id. `index` is the second one's position.
    #[error("{id} is registered twice")]
    Duplicate {
        /// The position of the second entry in the list given to [`Registry::new`].
        index: usize,
        /// The id.
        id: OrgId,
    },
    /// The matcher could not be built (the automaton would be too large).
    #[error("the registry's patterns could not be compiled: {0}")]
    Build(String),
}

fn field_error(field: impl Into<String>, problem: impl Into<String>) -> RegistryError {
    RegistryError::Field {
        field: field.into(),
        problem: problem.into(),
    }
}

/// Which of an organisation's registered facts identify it in a payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MatchOn {
    /// Its names and its identifiers (the default).
    #[default]
    NamesAndIdentifiers,
    /// Only its identifiers: for an organisation whose name is a common word.
    Identifiers,
}

impl FromStr for MatchOn {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "names_and_identifiers" => Ok(MatchOn::NamesAndIdentifiers),
            "identifiers" => Ok(MatchOn::Identifiers),
            other => Err(format!(
                "{other:?} is not \"names_and_identifiers\" or \"identifiers\""
            )),
        }
    }
}

/// A UK company number as Companies House writes it: eight characters, either eight digits
/// (`01234567`) or two capital letters and six digits (`SC123456`). A payload matches it in that
/// form, case-insensitively, as a whole token; an all-digit number also matches without its
/// leading zeros (`1234567`) when at least six digits remain.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CompanyNumber(String);

impl CompanyNumber {
    /// The number as registered (upper case).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CompanyNumber {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let up = s.trim().to_ascii_uppercase();
        let b = up.as_bytes();
        let ok = b.len() == 8
            && (b.iter().all(u8::is_ascii_digit)
                || (b[..2].iter().all(u8::is_ascii_uppercase)
                    && b[2..].iter().all(u8::is_ascii_digit)));
        if ok {
            Ok(CompanyNumber(up))
        } else {
            Err(format!(
                "{s:?} is not a company number: eight digits (01234567) or two letters and six digits (SC123456)"
            ))
        }
    }
}

/// A charity number: up to three letters (`SC`, `NIC`) followed by five to eight digits
/// (`1234567`, `SC012345`). Matched as a whole token, case-insensitively, as written.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CharityNumber(String);

impl CharityNumber {
    /// The number as registered (upper case).
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for CharityNumber {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let up = s.trim().to_ascii_uppercase();
        let letters = up.bytes().take_while(u8::is_ascii_uppercase).count();
        let digits = &up.as_bytes()[letters..];
        if letters <= 3 && (5..=8).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit)
        {
            Ok(CharityNumber(up))
        } else {
            Err(format!(
                "{s:?} is not a charity number: up to three letters and five to eight digits (1234567, SC012345)"
            ))
        }
    }
}

/// A DNS domain, lower case, in ASCII (an internationalised domain is registered in its
/// `xn--` form): at least two labels of letters, digits and inner hyphens, each at most 63
/// characters, at most 253 in all. It matches itself and every subdomain, on label boundaries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Domain(String);

impl Domain {
    /// The domain.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Domain {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let d = s.trim().trim_end_matches('.').to_ascii_lowercase();
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        };
        let labels: Vec<&str> = d.split('.').collect();
        if d.len() <= 253 && labels.len() >= 2 && labels.iter().all(|l| label_ok(l)) {
            Ok(Domain(d))
        } else {
            Err(format!(
                "{s:?} is not a domain: two or more dot-separated labels of ASCII letters, digits and inner hyphens (use the xn-- form for international names)"
            ))
        }
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The facts of one organisation, as written in the configuration, before validation.
#[derive(Debug, Clone, Default)]
pub struct OrganisationSpec {
    /// The id, e.g. `acme-ltd`.
    pub id: String,
    /// The legal name, e.g. "Acme Ltd".
    pub legal_name: String,
    /// Other names it is known by.
    pub other_names: Vec<String>,
    /// Its UK company number, if any.
    pub company_number: Option<String>,
    /// Its charity number, if any.
    pub charity_number: Option<String>,
    /// Its web domains.
    pub domains: Vec<String>,
    /// Its e-mail domains.
    pub email_domains: Vec<String>,
    /// `"names_and_identifiers"` (the default when `None`) or `"identifiers"`.
    pub match_on: Option<String>,
    /// Phrases that contain one of its names but do not name it (see `docs/registry.md`).
    pub not_names: Vec<String>,
}

/// A validated registry entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Organisation {
    /// The id consent tokens and envelopes name it by.
    pub id: OrgId,
    /// The legal name.
    pub legal_name: String,
    /// Other names it is known by.
    pub other_names: Vec<String>,
    /// Its UK company number.
    pub company_number: Option<CompanyNumber>,
    /// Its charity number.
    pub charity_number: Option<CharityNumber>,
    /// Its web domains.
    pub domains: Vec<Domain>,
    /// Its e-mail domains.
    pub email_domains: Vec<Domain>,
    /// Whether its names identify it, or only its identifiers.
    pub match_on: MatchOn,
    /// Phrases that contain one of its names but do not name it.
    pub not_names: Vec<String>,
}

impl Organisation {
    /// Validates one organisation. Errors name the field (`legal_name`, `domains[1]`, ...).
    pub fn new(spec: OrganisationSpec) -> Result<Self, RegistryError> {
        let id: OrgId = spec
            .id
            .parse()
            .map_err(|e| field_error("id", format!("{:?} {e}", spec.id)))?;
        let check_name = |field: String, name: &str| -> Result<Vec<String>, RegistryError> {
            if name.len() > MAX_NAME_LEN {
                return Err(field_error(
                    field,
                    format!("is longer than {MAX_NAME_LEN} bytes"),
                ));
            }
            let words = normalise::name_words(name);
            if words.is_empty() {
                return Err(field_error(
                    field,
                    "must contain a word other than a legal-form suffix (Ltd, Limited, PLC, LLP, Inc)",
                ));
            }
            if words.len() > MAX_NAME_WORDS {
                return Err(field_error(
                    field,
                    format!("has more than {MAX_NAME_WORDS} words"),
                ));
            }
            Ok(words)
        };
        let mut name_forms = vec![check_name("legal_name".into(), &spec.legal_name)?];
        for (i, n) in spec.other_names.iter().enumerate() {
            name_forms.push(check_name(format!("other_names[{i}]"), n)?);
        }
        for (i, phrase) in spec.not_names.iter().enumerate() {
            let field = format!("not_names[{i}]");
            let words = check_name(field.clone(), phrase)?;
            // A phrase must be longer than one of the names and contain it, or it suppresses
            // nothing (or everything): both are mistakes worth refusing.
            let contains_a_name = name_forms.iter().any(|name| {
                name.len() < words.len() && words.windows(name.len()).any(|w| w == name.as_slice())
            });
            if !contains_a_name {
                return Err(field_error(
                    field,
                    "must contain one of the organisation's names and at least one more word",
                ));
            }
        }
        let company_number = spec
            .company_number
            .as_deref()
            .map(|n| n.parse().map_err(|p| field_error("company_number", p)))
            .transpose()?;
        let charity_number = spec
            .charity_number
            .as_deref()
            .map(|n| n.parse().map_err(|p| field_error("charity_number", p)))
            .transpose()?;
        let domains = parse_domains("domains", &spec.domains)?;
        let email_domains = parse_domains("email_domains", &spec.email_domains)?;
        let match_on = match spec.match_on.as_deref() {
            None => MatchOn::default(),
            Some(m) => m.parse().map_err(|p| field_error("match", p))?,
        };
        if match_on == MatchOn::Identifiers
            && company_number.is_none()
            && charity_number.is_none()
            && domains.is_empty()
            && email_domains.is_empty()
        {
            return Err(field_error(
                "match",
                "\"identifiers\" needs at least one identifier (company_number, charity_number, domains or email_domains)",
            ));
        }
        Ok(Organisation {
            id,
            legal_name: spec.legal_name,
            other_names: spec.other_names,
            company_number,
            charity_number,
            domains,
            email_domains,
            match_on,
            not_names: spec.not_names,
        })
    }

    /// The legal name and the other names.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.legal_name.as_str()).chain(self.other_names.iter().map(String::as_str))
    }
}

fn parse_domains(key: &str, list: &[String]) -> Result<Vec<Domain>, RegistryError> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for (i, d) in list.iter().enumerate() {
        let domain: Domain = d
            .parse()
            .map_err(|p| field_error(format!("{key}[{i}]"), p))?;
        if !seen.insert(domain.clone()) {
            return Err(field_error(
                format!("{key}[{i}]"),
                format!("{domain} is listed twice"),
            ));
        }
        out.push(domain);
    }
    Ok(out)
}

/// The registered organisations, in the order given, with distinct ids.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registry {
    organisations: Vec<Organisation>,
}

impl Registry {
    /// A registry of `organisations`, refused if two share an id.
    pub fn new(organisations: Vec<Organisation>) -> Result<Self, RegistryError> {
        let mut ids = BTreeSet::new();
        for (index, o) in organisations.iter().enumerate() {
            if !ids.insert(&o.id) {
                return Err(RegistryError::Duplicate {
                    index,
                    id: o.id.clone(),
                });
            }
        }
        Ok(Registry { organisations })
    }

    /// The organisations, in the order registered.
    pub fn organisations(&self) -> &[Organisation] {
        &self.organisations
    }

    /// The organisation with this id.
    pub fn get(&self, id: &OrgId) -> Option<&Organisation> {
        self.organisations.iter().find(|o| &o.id == id)
    }

    /// How many organisations are registered.
    pub fn len(&self) -> usize {
        self.organisations.len()
    }

    /// Whether none are.
    pub fn is_empty(&self) -> bool {
        self.organisations.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    pub(super) fn spec(id: &str, name: &str) -> OrganisationSpec {
        OrganisationSpec {
            id: id.into(),
            legal_name: name.into(),
            ..OrganisationSpec::default()
        }
    }

    /// Each row: a change to a valid organisation and the field its error must name.
    #[test]
    fn invalid_fields_are_named() {
        type Edit = fn(&mut OrganisationSpec);
        let cases: &[(&str, Edit, &str)] = &[
            ("bad id", |s| s.id = "Acme Ltd".into(), "id"),
            ("empty name", |s| s.legal_name = "  ".into(), "legal_name"),
            (
                "suffix only",
                |s| s.legal_name = "Ltd.".into(),
                "legal_name",
            ),
            (
                "empty other name",
                |s| s.other_names = vec!["ACME".into(), "".into()],
                "other_names[1]",
            ),
            (
                "short company number",
                |s| s.company_number = Some("1234567".into()),
                "company_number",
            ),
            (
                "letters in company number",
                |s| s.company_number = Some("0123456X".into()),
                "company_number",
            ),
            (
                "bad charity number",
                |s| s.charity_number = Some("12".into()),
                "charity_number",
            ),
            (
                "single-label domain",
                |s| s.domains = vec!["acme.example".into(), "localhost".into()],
                "domains[1]",
            ),
            (
                "domain with a space",
                |s| s.email_domains = vec!["acme .example".into()],
                "email_domains[0]",
            ),
            (
                "domain with a leading hyphen",
                |s| s.domains = vec!["-acme.example".into()],
                "domains[0]",
            ),
            (
                "duplicate domain",
                |s| s.domains = vec!["acme.example".into(), "ACME.example".into()],
                "domains[1]",
            ),
            (
                "unknown match",
                |s| s.match_on = Some("names".into()),
                "match",
            ),
            (
                "identifiers without identifiers",
                |s| {
                    s.match_on = Some("identifiers".into());
                    s.domains.clear();
                },
                "match",
            ),
            (
                "not_names without the name",
                |s| s.not_names = vec!["road runner".into()],
                "not_names[0]",
            ),
            (
                "not_names equal to the name",
                |s| s.not_names = vec!["Acme".into()],
                "not_names[0]",
            ),
        ];
        for (what, edit, field) in cases {
            let mut s = spec("acme-ltd", "Acme Ltd");
            s.domains = vec!["acme.example".into()];
            edit(&mut s);
            match Organisation::new(s) {
                Err(RegistryError::Field { field: f, .. }) => assert_eq!(f, *field, "{what}"),
                other => panic!("{what}: expected an error on {field}, got {other:?}"),
            }
        }
    }

    #[test]
    fn valid_identifiers_are_normalised() {
        let mut s = spec("acme-ltd", "Acme Ltd");
        s.company_number = Some("sc123456".into());
        s.charity_number = Some("sc012345".into());
        s.domains = vec!["ACME.Example.".into()];
        s.not_names = vec!["Acme Road".into()];
        let o = Organisation::new(s).unwrap();
        assert_eq!(o.company_number.unwrap().as_str(), "SC123456");
        assert_eq!(o.charity_number.unwrap().as_str(), "SC012345");
        assert_eq!(o.domains[0].as_str(), "acme.example");
    }

    #[test]
    fn duplicate_ids_are_refused_at_the_second() {
        let a = Organisation::new(spec("acme-ltd", "Acme Ltd")).unwrap();
        let b = Organisation::new(spec("globex-plc", "Globex PLC")).unwrap();
        let err = Registry::new(vec![a.clone(), b, a]).unwrap_err();
        assert!(
            matches!(err, RegistryError::Duplicate { index: 2, ref id } if id.as_str() == "acme-ltd"),
            "{err:?}"
        );
    }
}
