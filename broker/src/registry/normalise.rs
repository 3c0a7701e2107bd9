//! The two normal forms that registered names, identifiers and scanned text are compared in.
//!
//! Both forms lowercase letters, turn every run of whitespace and punctuation into one space, and
//! put a space at each end, so that a pattern padded with spaces (`" acme "`) can only match
//! whole words. They differ in what survives between two letters or digits:
//!
//! - the **names form** keeps nothing: `"ACME-Widgets, Ltd."` becomes `" acme widgets ltd "`;
//! - the **identifiers form** keeps a single `.`, `@` or `-` that stands between two letters or
//!   digits, so that domains and e-mail addresses keep their shape:
//!   `"mail@Mail.ACME.example."` becomes `" mail@mail.acme.example "`.
//!
//! Letters and digits are Unicode-aware (`char::is_alphanumeric`, `char::to_lowercase`); accents
//! are not folded. The work is one pass over the text, appending to a caller's buffer: no
//! allocation per byte, and none at all once the buffer has grown to the text's size.

/// Whether a byte of the identifiers form is a kept mark.
pub(crate) fn is_mark(b: u8) -> bool {
    matches!(b, b'.' | b'@' | b'-')
}

/// Writes the names form of `text` to `out` (which it clears first).
pub(crate) fn names_form(text: &str, out: &mut Vec<u8>) {
    identifiers_form(text, out);
    names_from_identifiers(out);
}

/// Turns an identifiers form into the names form in place: a kept mark stands for exactly one
/// separator run, which the names form writes as one space.
pub(crate) fn names_from_identifiers(form: &mut [u8]) {
    for b in form.iter_mut() {
        if is_mark(*b) {
            *b = b' ';
        }
    }
}

/// Writes the identifiers form of `text` to `out` (which it clears first).
///
/// One pass: a letter or digit is written lowercased; a separator after a letter or digit is
/// written as itself if it is a mark, else as a space; a second separator in a row turns a
/// mark just written into a space (so only a single mark between two word characters stays);
/// a mark at the very end becomes a space.
pub(crate) fn identifiers_form(text: &str, out: &mut Vec<u8>) {
    out.clear();
    append_identifiers_form(text, out);
}

/// Appends the identifiers form of `text` to `out`. Forms appended one after another are
/// separated by two spaces, which no pattern contains: nothing matches across them.
pub(crate) fn append_identifiers_form(text: &str, out: &mut Vec<u8>) {
    out.reserve(text.len() + 2);
    out.push(b' ');
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii_alphanumeric() {
            // A run of ASCII letters and digits is copied in one go (the common case).
            let run = bytes[i..]
                .iter()
                .position(|c| !c.is_ascii_alphanumeric())
                .unwrap_or(bytes.len() - i);
            out.extend(bytes[i..i + run].iter().map(u8::to_ascii_lowercase));
            i += run;
            continue;
        }
        let separator = if b.is_ascii() {
            i += 1;
            b
        } else {
            // A multi-byte character (`i` only ever advances by whole characters).
            let Some(c) = text.get(i..).and_then(|rest| rest.chars().next()) else {
                break;
            };
            i += c.len_utf8();
            if c.is_alphanumeric() {
                let mut buf = [0u8; 4];
                for l in c.to_lowercase() {
                    out.extend_from_slice(l.encode_utf8(&mut buf).as_bytes());
                }
                continue;
            }
            b' '
        };
        match out.last_mut() {
            Some(last) if *last == b' ' => {}
            Some(last) if is_mark(*last) => *last = b' ',
            _ => out.push(if is_mark(separator) { separator } else { b' ' }),
        }
    }
    match out.last_mut() {
        Some(last) if is_mark(*last) => *last = b' ',
        Some(b' ') => {}
        _ => out.push(b' '),
    }
}

/// Legal-form suffixes stripped from the end of a registered name, as word sequences in the
/// names form, longest first.
const SUFFIXES: &[&[&str]] = &[
    &["public", "limited", "company"],
    &["limited", "liability", "partnership"],
    &["limited"],
    &["ltd"],
    &["plc"],
    &["llp"],
    &["inc"],
    &["incorporated"],
];

/// The words of a registered name in the names form with its legal-form suffixes removed
/// (`"ACME Limited"` → `["acme"]`). Empty when nothing but suffixes (or nothing) remains.
pub(crate) fn name_words(name: &str) -> Vec<String> {
    let mut form = Vec::new();
    names_form(name, &mut form);
    let text = String::from_utf8_lossy(&form);
    let mut words: Vec<String> = text.split_whitespace().map(str::to_owned).collect();
    'strip: loop {
        for suffix in SUFFIXES {
            if words.len() >= suffix.len() && words.ends_with(&suffix_owned(suffix)) {
                words.truncate(words.len() - suffix.len());
                continue 'strip;
            }
        }
        break;
    }
    words
}

fn suffix_owned(suffix: &[&str]) -> Vec<String> {
    suffix.iter().map(|s| (*s).to_owned()).collect()
}

/// The pattern a list of words is searched as: the words joined by spaces, a space at each end.
pub(crate) fn word_pattern(words: &[String]) -> Vec<u8> {
    let mut p = Vec::with_capacity(words.iter().map(|w| w.len() + 1).sum::<usize>() + 1);
    p.push(b' ');
    for w in words {
        p.extend_from_slice(w.as_bytes());
        p.push(b' ');
    }
    p
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn names(s: &str) -> String {
        let mut out = Vec::new();
        names_form(s, &mut out);
        String::from_utf8(out).unwrap()
    }

    fn idents(s: &str) -> String {
        let mut out = Vec::new();
        identifiers_form(s, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn names_form_table() {
        let cases: &[(&str, &str)] = &[
            ("", " "),
            ("Acme", " acme "),
            ("  ACME   Limited ", " acme limited "),
            ("Acme Ltd.", " acme ltd "),
            ("acme\tltd\n", " acme ltd "),
            ("ACME-Widgets, Ltd.", " acme widgets ltd "),
            ("O'Reilly & Sons", " o reilly sons "),
            ("x@mail.acme.example", " x mail acme example "),
            ("Société Générale", " société générale "),
            ("ÉCOLE", " école "),
            ("a\u{00a0}b\u{2019}c", " a b c "),
            ("...", " "),
        ];
        for (input, want) in cases {
            assert_eq!(names(input), *want, "names form of {input:?}");
        }
    }

    #[test]
    fn identifiers_form_table() {
        let cases: &[(&str, &str)] = &[
            ("acme.example", " acme.example "),
            ("x@Mail.ACME.example.", " x@mail.acme.example "),
            (
                "https://www.acme.example/path?q=1",
                " https www.acme.example path q 1 ",
            ),
            ("my-acme.example", " my-acme.example "),
            ("acme..example", " acme example "),
            (".acme.example", " acme.example "),
            ("acme .example", " acme example "),
            ("Company No. 01234567.", " company no 01234567 "),
            ("@acme", " acme "),
        ];
        for (input, want) in cases {
            assert_eq!(idents(input), *want, "identifiers form of {input:?}");
        }
    }

    #[test]
    fn suffixes_are_stripped() {
        let cases: &[(&str, &[&str])] = &[
            ("Acme Ltd", &["acme"]),
            ("ACME Limited", &["acme"]),
            ("Acme Ltd.", &["acme"]),
            ("Globex PLC", &["globex"]),
            ("Globex Public Limited Company", &["globex"]),
            ("Initech Inc.", &["initech"]),
            ("Hooli Holdings Limited", &["hooli", "holdings"]),
            ("Smith LLP", &["smith"]),
            ("Limited", &[]),
            ("Ltd Ltd", &[]),
            ("", &[]),
        ];
        for (name, want) in cases {
            assert_eq!(name_words(name), *want, "{name:?}");
        }
    }
}
