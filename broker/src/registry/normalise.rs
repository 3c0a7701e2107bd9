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

/// Which separators the identifiers form keeps.
fn kept_in_identifiers(b: u8) -> bool {
    matches!(b, b'.' | b'@' | b'-')
}

/// Appends the names form of `text` to `out` (which it clears first).
pub(crate) fn names_form(text: &str, out: &mut Vec<u8>) {
    normalise(text, out, false);
}

/// Appends the identifiers form of `text` to `out` (which it clears first).
pub(crate) fn identifiers_form(text: &str, out: &mut Vec<u8>) {
    normalise(text, out, true);
}

fn normalise(text: &str, out: &mut Vec<u8>, keep_marks: bool) {
    out.clear();
    out.reserve(text.len() + 2);
    out.push(b' ');
    // The separator run since the last letter or digit: how many characters, and the first.
    let mut run_len = 0usize;
    let mut run_byte = b' ';
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b.is_ascii() {
            i += 1;
            if b.is_ascii_alphanumeric() {
                end_run(out, run_len, run_byte, keep_marks);
                run_len = 0;
                out.push(b.to_ascii_lowercase());
            } else {
                if run_len == 0 {
                    run_byte = b;
                }
                run_len += 1;
            }
            continue;
        }
        // A multi-byte character: decode it (the slice starts on a boundary, as `i` only ever
        // advances by whole characters).
        let Some(c) = text.get(i..).and_then(|rest| rest.chars().next()) else {
            break;
        };
        i += c.len_utf8();
        if c.is_alphanumeric() {
            end_run(out, run_len, run_byte, keep_marks);
            run_len = 0;
            let mut buf = [0u8; 4];
            for l in c.to_lowercase() {
                out.extend_from_slice(l.encode_utf8(&mut buf).as_bytes());
            }
        } else {
            if run_len == 0 {
                run_byte = b' ';
            }
            run_len += 1;
        }
    }
    if out.last() != Some(&b' ') {
        out.push(b' ');
    }
}

/// Closes a separator run before a letter or digit: a single kept mark between two word
/// characters stays, anything else becomes one space (none at the start, which has one).
fn end_run(out: &mut Vec<u8>, run_len: usize, run_byte: u8, keep_marks: bool) {
    if run_len == 0 {
        return;
    }
    let after_word = out.last().is_some_and(|&b| b != b' ');
    if keep_marks && run_len == 1 && after_word && kept_in_identifiers(run_byte) {
        out.push(run_byte);
    } else if after_word {
        out.push(b' ');
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
