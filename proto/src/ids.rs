//! Identifiers as validated newtypes: parse, don't validate.
//!
//! Agency ids name the parties of the federation (`ico`, `ncsc`, `nca`); they are also the Common
//! Names of the agencies' client certificates. Organisation ids name the organisations that
//! information is about and that give consent. Both are short, lowercase and safe to log.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// Why an identifier was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum IdError {
    /// The identifier was empty.
    #[error("is empty")]
    Empty,
    /// The identifier was longer than allowed.
    #[error("is longer than {max} characters")]
    TooLong {
        /// The maximum length.
        max: usize,
    },
    /// The identifier contained a character outside the allowed set.
    #[error("must be lowercase letters, digits, '-' or '_' and start with a letter or digit")]
    BadCharacter,
    /// A message id was not a UUID.
    #[error("is not a UUID")]
    NotUuid,
}

fn check_id(s: &str, max: usize) -> Result<(), IdError> {
    if s.is_empty() {
        return Err(IdError::Empty);
    }
    if s.len() > max {
        return Err(IdError::TooLong { max });
    }
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_';
    let first_ok = s
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !first_ok || !s.chars().all(ok_char) {
        return Err(IdError::BadCharacter);
    }
    Ok(())
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $max:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// The longest id accepted.
            pub const MAX_LEN: usize = $max;

            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, IdError> {
                check_id(s, $max)?;
                Ok(Self(s.to_owned()))
            }
        }

        impl TryFrom<String> for $name {
            type Error = IdError;
            fn try_from(s: String) -> Result<Self, IdError> {
                check_id(&s, $max)?;
                Ok(Self(s))
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

string_id!(
    /// An agency of the federation (or an auditor): the Common Name of its client certificate.
    AgencyId,
    64
);
string_id!(
    /// An organisation that information is about, and whose consent it needs.
    OrgId,
    128
);

/// A sender-chosen message id (a UUID): the idempotency key of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct MessageId(uuid::Uuid);

impl MessageId {
    /// A fresh random id (UUID version 4).
    pub fn new_random() -> Self {
        Self(uuid::Uuid::new_v4())
    }

    /// A fresh id that begins with the Unix time `at` in milliseconds, the rest random (UUID
    /// version 7, RFC 9562). Ids made one after another sort in the order they were made, so
    /// the broker's record of each (keyed by sender and id) lands next to the previous one
    /// instead of at a random place in its store. A time before 1970 counts as 1970.
    pub fn new_time_ordered(at: OffsetDateTime) -> Self {
        let nanos = at.unix_timestamp_nanos().max(0);
        let seconds = u64::try_from(nanos / 1_000_000_000).unwrap_or(u64::MAX);
        let subsec = u32::try_from(nanos % 1_000_000_000).unwrap_or(0);
        Self(uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            seconds,
            subsec,
        )))
    }

    /// The id's 16 bytes, for use as a storage key.
    pub fn as_bytes(&self) -> &[u8; 16] {
        self.0.as_bytes()
    }
}

impl FromStr for MessageId {
    type Err = IdError;
    fn from_str(s: &str) -> Result<Self, IdError> {
        uuid::Uuid::parse_str(s)
            .map(Self)
            .map_err(|_| IdError::NotUuid)
    }
}

impl fmt::Display for MessageId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn agency_ids() {
        let cases: &[(&str, Result<(), IdError>)] = &[
            ("ico", Ok(())),
            ("ncsc", Ok(())),
            ("nca-2", Ok(())),
            ("9lives", Ok(())),
            ("", Err(IdError::Empty)),
            ("ICO", Err(IdError::BadCharacter)),
            ("-ico", Err(IdError::BadCharacter)),
            ("ico ncsc", Err(IdError::BadCharacter)),
            ("ico\n", Err(IdError::BadCharacter)),
            ("é", Err(IdError::BadCharacter)),
        ];
        for (input, expected) in cases {
            let got = input.parse::<AgencyId>().map(|_| ());
            assert_eq!(&got, expected, "input {input:?}");
        }
        let long = "a".repeat(65);
        assert_eq!(long.parse::<AgencyId>(), Err(IdError::TooLong { max: 64 }));
        assert!("a".repeat(128).parse::<OrgId>().is_ok());
    }

    #[test]
    fn time_ordered_ids_sort_by_time_and_carry_it() {
        let t = OffsetDateTime::from_unix_timestamp(1_764_633_600).unwrap();
        let a = MessageId::new_time_ordered(t);
        let b = MessageId::new_time_ordered(t + time::Duration::milliseconds(1));
        let c = MessageId::new_time_ordered(t + time::Duration::seconds(1));
        assert!(a < b && b < c, "{a} {b} {c}");
        assert_eq!(a.0.get_version_num(), 7);
        // It carries the time, to the millisecond.
        let carried = |id: MessageId| id.0.get_timestamp().map(|ts| ts.to_unix());
        assert_eq!(carried(a), Some((1_764_633_600, 0)));
        assert_eq!(carried(b), Some((1_764_633_600, 1_000_000)));
        // Two ids of the same millisecond still differ.
        assert_ne!(MessageId::new_time_ordered(t), a);
        // Before 1970 counts as 1970.
        let early = OffsetDateTime::from_unix_timestamp(-5).unwrap();
        assert_eq!(carried(MessageId::new_time_ordered(early)), Some((0, 0)));
    }

    #[test]
    fn message_ids_round_trip() {
        let id = MessageId::new_random();
        assert_eq!(id.to_string().parse::<MessageId>().unwrap(), id);
        assert_eq!("nope".parse::<MessageId>(), Err(IdError::NotUuid));
    }
}
