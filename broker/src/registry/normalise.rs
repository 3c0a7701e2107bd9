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
//! are not folded. Characters that render as nothing (Unicode's default-ignorable code points:
//! the soft hyphen, zero-width spaces and joiners, …) are left out, so they do not split a word. The work is one pass over the text, appending to a caller's buffer: no
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
    let mut tokens = Vec::new();
    append_identifiers_form_noting(text, out, &mut tokens);
}

/// Where a token of the identifiers form is (`start..end` of the buffer), noted because it
/// holds a digit or a mark: only such a token can be a company or charity number or a
/// domain, so the identifier lookups visit only these.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct NotableToken {
    pub(crate) start: usize,
    pub(crate) end: usize,
}

/// As [`append_identifiers_form`], also noting in `tokens` every token written that holds an
/// ASCII digit or a kept mark (and possibly a few more: a token whose mark was later turned
/// into a space is still noted; callers re-check what they need).
///
/// This is the hot loop of the matcher, so it is one pass with a fast path for ASCII letters
/// and digits, and no work per token beyond a flag and, for notable tokens, one push.
pub(crate) fn append_identifiers_form_noting(
    text: &str,
    out: &mut Vec<u8>,
    tokens: &mut Vec<NotableToken>,
) {
    // Working on a local vector (moved out and back, no copy) keeps its pointer and length in
    // registers: a byte stored through `out` could otherwise alias them, forcing a reload
    // after every byte.
    *out = write_identifiers_form(text, std::mem::take(out), tokens);
}

fn write_identifiers_form(text: &str, mut out: Vec<u8>, tokens: &mut Vec<NotableToken>) -> Vec<u8> {
    out.reserve(text.len() + 2);
    out.push(b' ');
    // The token being written starts at `start`; `notable` says it holds a digit or a mark.
    let mut start = out.len();
    let mut notable = false;
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if is_word_byte(b) {
            // A run of ASCII letters and digits (the common case): find its end with loads
            // only, then copy it and lowercase the copy, both vectorised.
            let run = i;
            let mut digit = false;
            while let Some(&c) = bytes.get(i) {
                if !is_word_byte(c) {
                    break;
                }
                digit |= c.is_ascii_digit();
                i += 1;
            }
            notable |= digit;
            let from = out.len();
            out.extend_from_slice(&bytes[run..i]);
            if let Some(copy) = out.get_mut(from..) {
                copy.make_ascii_lowercase();
            }
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
            if is_invisible(c) {
                continue;
            }
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
            Some(last) if is_mark(*last) => {
                *last = b' ';
                close_token(out.len() - 1, &mut start, &mut notable, tokens);
            }
            _ if is_mark(separator) => {
                out.push(separator);
                notable = true;
            }
            _ => {
                out.push(b' ');
                close_token(out.len() - 1, &mut start, &mut notable, tokens);
            }
        }
    }
    match out.last_mut() {
        Some(last) if is_mark(*last) => {
            *last = b' ';
            close_token(out.len() - 1, &mut start, &mut notable, tokens);
        }
        Some(b' ') => {}
        _ => {
            out.push(b' ');
            close_token(out.len() - 1, &mut start, &mut notable, tokens);
        }
    }
    out
}

/// Ends the token that runs from `*start` to the space at `space`, noting it if notable.
#[inline]
fn close_token(
    space: usize,
    start: &mut usize,
    notable: &mut bool,
    tokens: &mut Vec<NotableToken>,
) {
    if *notable && space > *start {
        tokens.push(NotableToken {
            start: *start,
            end: space,
        });
    }
    *notable = false;
    *start = space + 1;
}

/// Whether `c` renders as nothing: Unicode's default-ignorable code points (the soft hyphen,
/// zero-width spaces and joiners, the word joiner, bidirectional controls, variation
/// selectors, the byte order mark, Hangul fillers, tags). A person reads `Ac\u{ad}me` as
/// `Acme`, so both forms leave such a character out rather than splitting a word at it.
fn is_invisible(c: char) -> bool {
    matches!(
        c,
        '\u{ad}'
            | '\u{34f}'
            | '\u{61c}'
            | '\u{115f}'..='\u{1160}'
            | '\u{17b4}'..='\u{17b5}'
            | '\u{180b}'..='\u{180f}'
            | '\u{200b}'..='\u{200f}'
            | '\u{202a}'..='\u{202e}'
            | '\u{2060}'..='\u{206f}'
            | '\u{3164}'
            | '\u{fe00}'..='\u{fe0f}'
            | '\u{feff}'
            | '\u{ffa0}'
            | '\u{fff0}'..='\u{fff8}'
            | '\u{1bca0}'..='\u{1bca3}'
            | '\u{1d173}'..='\u{1d17a}'
            | '\u{e0000}'..='\u{e0fff}'
    )
}

/// Whether `b` is an ASCII letter or digit, by table (one load, no branches).
#[inline]
fn is_word_byte(b: u8) -> bool {
    WORD_BYTE[usize::from(b)]
}

/// For each byte value: whether it is an ASCII letter or digit.
static WORD_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (b as u8).is_ascii_alphanumeric();
        b += 1;
    }
    t
};

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
pub(crate) mod tests {
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
            // Characters that render as nothing (soft hyphen, zero-width space, joiners, word
            // joiner, variation selector, byte order mark) are not there at all.
            ("Ac\u{00ad}me\u{200b} Lt\u{200d}d\u{2060}", " acme ltd "),
            ("A\u{fe0f}cme\u{feff}\u{200c}", " acme "),
            ("0123\u{00ad}4567", " 01234567 "),
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

    /// Every token of the identifiers form that holds an ASCII digit or a mark is noted, with
    /// its exact span; tokens of letters only are not (a noted token whose mark turned into a
    /// space may remain, which the lookups tolerate).
    #[test]
    fn notable_tokens_are_noted() {
        let cases: &[(&str, &[&str])] = &[
            ("", &[]),
            ("plain words only", &[]),
            ("Company No. 01234567.", &["no", "01234567"]),
            (
                "x@Mail.ACME.example. and vpn.acme.example:443",
                &["x@mail.acme.example", "vpn.acme.example", "443"],
            ),
            ("my-acme.example", &["my-acme.example"]),
            ("acme..example", &["acme"]),
            ("SC012345 \u{e9}t\u{e9} 12", &["sc012345", "12"]),
            ("a1", &["a1"]),
        ];
        for (input, want) in cases {
            let mut out = b"  earlier ".to_vec();
            let mut tokens = Vec::new();
            append_identifiers_form_noting(input, &mut out, &mut tokens);
            let got: Vec<&str> = tokens
                .iter()
                .map(|t| std::str::from_utf8(&out[t.start..t.end]).unwrap())
                .collect();
            assert_eq!(got, *want, "{input:?}");
            // The form is the same as without noting.
            let mut plain = b"  earlier ".to_vec();
            append_identifiers_form(input, &mut plain);
            assert_eq!(out, plain, "{input:?}");
            // Every token with a digit or a mark is among the noted ones.
            let mut at = 0;
            for token in out.split(|&b| b == b' ') {
                if token.iter().any(|b| b.is_ascii_digit() || is_mark(*b)) {
                    assert!(
                        tokens
                            .iter()
                            .any(|t| t.start == at && t.end == at + token.len()),
                        "{input:?}: {:?} not noted",
                        String::from_utf8_lossy(token)
                    );
                }
                at += token.len() + 1;
            }
        }
    }

    /// The identifiers form as the module's doc states it, one character at a time: the
    /// reference the fast loop is compared with.
    fn reference_form(text: &str) -> String {
        let mut out = String::from(" ");
        for c in text.chars() {
            if is_invisible(c) {
                continue;
            }
            if c.is_alphanumeric() {
                out.extend(c.to_lowercase());
                continue;
            }
            let separator = if c.is_ascii() { c } else { ' ' };
            match out.chars().last() {
                Some(' ') => {}
                Some('.' | '@' | '-') => {
                    out.pop();
                    out.push(' ');
                }
                _ if matches!(separator, '.' | '@' | '-') => out.push(separator),
                _ => out.push(' '),
            }
        }
        match out.chars().last() {
            Some(' ') => {}
            Some('.' | '@' | '-') => {
                out.pop();
                out.push(' ');
            }
            _ => out.push(' '),
        }
        out
    }

    /// A small generator of test strings: xorshift over an alphabet that holds every kind
    /// of byte the normaliser treats apart (letters of both cases, digits, marks, other
    /// punctuation, JSON's special characters, multi-byte letters and separators, a
    /// character whose lower case is longer, an emoji).
    pub(crate) struct Gen(pub(crate) u64);

    impl Gen {
        pub(crate) fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }

        fn text(&mut self, max: u64) -> String {
            let alphabet: Vec<char> =
                "aZq09.@-_ ,/:\"\\\n\t\u{0}\u{1f}\u{7f}\u{e9}\u{c9}\u{df}\u{130}\u{2019}\u{a0}\u{1f600}\u{660}K\u{212a}\u{ad}\u{200b}\u{feff}"
                    .chars()
                    .collect();
            let len = self.next() % max;
            (0..len)
                .map(|_| alphabet[(self.next() % alphabet.len() as u64) as usize])
                .collect()
        }

        /// `s` as the body of a JSON string, each character written plainly where JSON
        /// allows it or escaped in one of the ways JSON allows, at random.
        pub(crate) fn escaped(&mut self, s: &str) -> String {
            let mut out = String::new();
            for c in s.chars() {
                let must = c == '"' || c == '\\' || c < ' ';
                match self.next() % 4 {
                    0 | 1 if !must => out.push(c),
                    2 if matches!(c, '"' | '\\' | '/' | '\n' | '\t' | '\r' | '\u{8}' | '\u{c}') => {
                        out.push('\\');
                        out.push(match c {
                            '\n' => 'n',
                            '\t' => 't',
                            '\r' => 'r',
                            '\u{8}' => 'b',
                            '\u{c}' => 'f',
                            c => c,
                        });
                    }
                    _ => {
                        let mut units = [0u16; 2];
                        for u in c.encode_utf16(&mut units) {
                            if self.next().is_multiple_of(2) {
                                out.push_str(&format!("\\u{u:04x}"));
                            } else {
                                out.push_str(&format!("\\u{u:04X}"));
                            }
                        }
                    }
                }
            }
            out
        }
    }

    #[test]
    fn the_form_is_the_reference_form() {
        let mut g = Gen(0x9e37_79b9_7f4a_7c15);
        for _ in 0..50_000 {
            let s = g.text(24);
            assert_eq!(idents(&s), reference_form(&s), "{s:?}");
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
