//! JSON text into a borrowed tree ([`Value`]), each object's member list and each array
//! allocated once at its final size.
//!
//! `serde_json_borrow`'s own reader grows every member list and array from empty (4, 8,
//! 16, … items, each step a new allocation and a copy), and a STIX bundle is made of small
//! objects: in the relay those reallocations cost more than the rest of the tree. Here the
//! items of every open object and array are gathered on one stack shared by the whole
//! document, and each is moved off it, whole, when its closing bracket is read.
//!
//! The tree is the same as the library's: strings and keys borrow from the text unless
//! they hold escapes, objects keep their members in document order, repeated names
//! included. One exception sends the document to the library's reader instead: a key that
//! holds an escape, which the library's member list cannot take from outside as an owned
//! string (rare: a key spelt with an escape is no STIX property name).
//!
//! Nesting is bounded while reading: an array or object deeper than `max_depth` stops the
//! parse (at most `max_depth` frames deep, below serde_json's own limit of 128, so hostile
//! nesting never reaches the stack's end). The library's reader has no such bound, so a
//! document sent to it is first scanned for its depth by the caller's `check_depth`.

use std::cell::Cell;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};

use super::{JsonObject, Value};

/// Why a text is not read.
#[derive(Debug)]
pub(super) enum Refusal {
    /// Not JSON (serde_json's message).
    NotJson(serde_json::Error),
    /// Nested deeper than asked.
    TooDeep,
    /// A key holds an escape: read the text with the library's reader instead.
    EscapedKey,
}

/// Parses `text` (one JSON value, nothing after it but whitespace), with no array or
/// object nested more than `max_depth` deep.
pub(super) fn parse(text: &str, max_depth: usize) -> Result<Value<'_>, Refusal> {
    let stopped = Cell::new(None);
    // Room for the members and items open at once in a typical document, so that the
    // stack itself is not grown while reading one.
    let mut stack = Stack {
        members: Vec::with_capacity(64),
        items: Vec::with_capacity(64),
    };
    let mut de = serde_json::Deserializer::from_str(text);
    let parsed = Node {
        stack: &mut stack,
        stopped: &stopped,
        room: max_depth,
    }
    .deserialize(&mut de)
    .and_then(|value| de.end().map(|()| value));
    parsed.map_err(|e| match stopped.get() {
        Some(Stop::TooDeep) => Refusal::TooDeep,
        Some(Stop::EscapedKey) => Refusal::EscapedKey,
        None => Refusal::NotJson(e),
    })
}

/// What stopped a parse that serde_json reports only as an error (the first stop ends the
/// parse, so there is at most one).
#[derive(Clone, Copy)]
enum Stop {
    TooDeep,
    EscapedKey,
}

/// The items of the objects and arrays still open, innermost last.
struct Stack<'a> {
    members: Vec<(&'a str, Value<'a>)>,
    items: Vec<Value<'a>>,
}

/// Reads one value, using the document's stack.
struct Node<'s, 'a> {
    stack: &'s mut Stack<'a>,
    stopped: &'s Cell<Option<Stop>>,
    /// How many more levels of arrays and objects may open here.
    room: usize,
}

impl<'a> Node<'_, 'a> {
    /// The node for an item of the array or object being read, one level further in.
    fn inner(&mut self) -> Node<'_, 'a> {
        Node {
            stack: &mut *self.stack,
            stopped: self.stopped,
            room: self.room.saturating_sub(1),
        }
    }

    /// Refuses to open an array or object where no level is left.
    fn open<E: serde::de::Error>(&self) -> Result<(), E> {
        if self.room == 0 {
            self.stopped.set(Some(Stop::TooDeep));
            return Err(E::custom("nested too deep"));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Node<'_, 'de> {
    type Value = Value<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value<'de>, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Node<'_, 'de> {
    type Value = Value<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, v: bool) -> Result<Value<'de>, E> {
        Ok(Value::Bool(v))
    }

    fn visit_i64<E>(self, v: i64) -> Result<Value<'de>, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_u64<E>(self, v: u64) -> Result<Value<'de>, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_f64<E>(self, v: f64) -> Result<Value<'de>, E> {
        Ok(Value::Number(v.into()))
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Value<'de>, E> {
        Ok(Value::Str(v.into()))
    }

    fn visit_str<E>(self, v: &str) -> Result<Value<'de>, E> {
        Ok(Value::Str(v.to_owned().into()))
    }

    fn visit_string<E>(self, v: String) -> Result<Value<'de>, E> {
        Ok(Value::Str(v.into()))
    }

    fn visit_unit<E>(self) -> Result<Value<'de>, E> {
        Ok(Value::Null)
    }

    fn visit_none<E>(self) -> Result<Value<'de>, E> {
        Ok(Value::Null)
    }

    fn visit_seq<A: SeqAccess<'de>>(mut self, mut seq: A) -> Result<Value<'de>, A::Error> {
        self.open()?;
        let from = self.stack.items.len();
        while let Some(item) = seq.next_element_seed(self.inner())? {
            self.stack.items.push(item);
        }
        Ok(Value::Array(self.stack.items.drain(from..).collect()))
    }

    fn visit_map<A: MapAccess<'de>>(mut self, mut map: A) -> Result<Value<'de>, A::Error> {
        self.open()?;
        let from = self.stack.members.len();
        while let Some(key) = map.next_key_seed(Key)? {
            let Some(key) = key else {
                self.stopped.set(Some(Stop::EscapedKey));
                return Err(A::Error::custom("a key holds an escape"));
            };
            let value = map.next_value_seed(self.inner())?;
            self.stack.members.push((key, value));
        }
        let members: JsonObject<'de> = self.stack.members.drain(from..).collect();
        Ok(Value::Object(members))
    }
}

/// Reads a key: the text's own bytes if it holds no escape, else `None`.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Option<&'de str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Option<&'de str>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string")
    }

    fn visit_borrowed_str<E>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Some(v))
    }

    fn visit_str<E>(self, _: &str) -> Result<Self::Value, E> {
        Ok(None)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// The same tree as the library's reader, or the same refusal, on documents of every
    /// shape: nesting, escapes in values and keys, numbers of every kind, repeated names,
    /// and malformed text.
    #[test]
    fn the_tree_is_the_library_s() {
        let docs = [
            r#"{"type":"bundle","id":"bundle--1","objects":[{"a":1,"b":[1,2,{"c":null}],"d":{}},[],{}]}"#,
            r#"[1,-2,3.5,1e300,-0,18446744073709551615,-9223372036854775808,true,false,null]"#,
            r#"{"esc":"a\"b\\c\u00e9\n","plain":"x","nested":{"deeper":{"deepest":["y"]}}}"#,
            r#"{"a":1,"a":2,"b":{"a":1,"a":[1,1]}}"#,
            r#"{"k\u0065y":1,"other":{"n\"ame":"v"}}"#,
            r#"{"outer":[{"k\u0065y":1}]}"#,
            r#""just a string""#,
            "  42  ",
            r#"[[[[[[["deep"]]]]]]]"#,
            r#"{"a":[1,2,3],"b":[{"x":[4,5]},{"y":[]}],"c":[[],[[]]]}"#,
            r#"{"a":1,}"#,
            r#"{"a" 1}"#,
            r#"[1,2"#,
            r#"{"a":1} x"#,
            r#"{"k\u0065y":1,}"#,
            "",
            "nul",
            r#"{"a":"\ud800"}"#,
        ];
        for doc in docs {
            let library: Result<Value<'_>, _> = serde_json::from_str(doc);
            match (parse(doc, 64), &library) {
                (Ok(a), Ok(b)) => assert_eq!(&a, b, "{doc}"),
                (Err(Refusal::NotJson(a)), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
                (Err(Refusal::EscapedKey), _) => assert!(doc.contains("\\u0065"), "{doc}"),
                (ours, _) => panic!("{doc}: ours {ours:?}, the library's {library:?}"),
            }
        }
    }

    /// Arrays and objects may nest `max_depth` deep and no deeper, however they mix, and
    /// a document nested far deeper is stopped at the bound, not at serde_json's own.
    #[test]
    fn nesting_is_bounded_while_reading() {
        for max in [1, 2, 5, 64] {
            for opener in ["[", "{\"k\":"] {
                let closer = if opener == "[" { "]" } else { "}" };
                let nest = |n: usize| format!("{}1{}", opener.repeat(n), closer.repeat(n));
                assert!(parse(&nest(max), max).is_ok(), "{max} {opener}");
                assert!(
                    matches!(parse(&nest(max + 1), max), Err(Refusal::TooDeep)),
                    "{max} {opener}"
                );
            }
        }
        // (Kept below serde_json's own limit of 128 levels.)
        for max in [1, 2, 5, 30] {
            let mixed = "[{\"a\":".repeat(max) + "1" + &"}]".repeat(max);
            assert!(parse(&mixed, 2 * max).is_ok(), "{max}");
            assert!(matches!(parse(&mixed, 2 * max - 1), Err(Refusal::TooDeep)));
        }
        let hostile = "[".repeat(1_000_000);
        assert!(matches!(parse(&hostile, 64), Err(Refusal::TooDeep)));
        // Scalars at the bound's edge do not count as a level.
        assert!(parse("[\"s\",1,null]", 1).is_ok());
        assert!(parse("\"s\"", 0).is_ok());
        assert!(matches!(parse("[]", 0), Err(Refusal::TooDeep)));
    }
}
