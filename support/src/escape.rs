//! Text written by others, made safe to print on one line of a log or a terminal.
//!
//! File names from the agency's outbox, claims of a consent token and strings a peer sends may
//! hold line feeds, escape sequences or bidirectional overrides: printed raw, they forge log
//! lines, repaint a terminal, or show a verdict that was never given. [`Escaped`] prints them
//! with every such character escaped as Rust escapes it (`\n`, `\u{1b}`, `\u{202e}`), and the
//! backslash doubled so that an escape cannot be forged either; ordinary text, accented letters
//! included, prints unchanged.

use std::fmt;

/// Displays a string with its control, line-separating and bidirectional-formatting characters
/// escaped (see the module docs): `tracing::info!(file = %Escaped(&name), …)`.
#[derive(Debug, Clone, Copy)]
pub struct Escaped<'a>(pub &'a str);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(at) = rest.find(needs_escape) {
            f.write_str(&rest[..at])?;
            let mut chars = rest[at..].chars();
            if let Some(c) = chars.next() {
                match c {
                    '\\' => f.write_str("\\\\")?,
                    c => write!(f, "{}", c.escape_default())?,
                }
            }
            rest = chars.as_str();
        }
        f.write_str(rest)
    }
}

/// Whether `c` is printed escaped: controls (C0, DEL, C1), the line and paragraph separators,
/// the bidirectional marks, embeddings, overrides and isolates, and the backslash.
fn needs_escape(c: char) -> bool {
    c == '\\'
        || c.is_control()
        || matches!(
            c,
            '\u{061c}' | '\u{200e}' | '\u{200f}' | '\u{2028}' | '\u{2029}'
                | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}'
        )
}

/// A file name that may not be UTF-8, as text that says exactly which bytes it holds: its
/// UTF-8 runs as they are, every other byte as `\xNN` (and a backslash as `\\`, so that the
/// result reads back unambiguously). Not escaped for printing: wrap the result in [`Escaped`].
pub fn lossless_name(name: &std::ffi::OsStr) -> String {
    use std::os::unix::ffi::OsStrExt as _;
    let mut out = String::with_capacity(name.len());
    for chunk in name.as_bytes().utf8_chunks() {
        out.push_str(&chunk.valid().replace('\\', "\\\\"));
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn escapes_what_could_forge_a_line_and_nothing_else() {
        let rows = [
            ("report.json", "report.json"),
            ("rapport-été.json", "rapport-été.json"),
            (
                "x\n2026-12-05T21:20:00Z ERROR forged",
                "x\\n2026-12-05T21:20:00Z ERROR forged",
            ),
            ("a\r\tb", "a\\r\\tb"),
            ("\u{1b}[31mred", "\\u{1b}[31mred"),
            ("\u{9b}c1", "\\u{9b}c1"),
            ("txt.\u{202e}exe", "txt.\\u{202e}exe"),
            ("line\u{2028}sep", "line\\u{2028}sep"),
            ("back\\nslash", "back\\\\nslash"),
            ("", ""),
        ];
        for (raw, shown) in rows {
            assert_eq!(Escaped(raw).to_string(), shown, "{raw:?}");
        }
    }

    #[test]
    fn names_that_are_not_utf8_keep_every_byte() {
        use std::os::unix::ffi::OsStrExt as _;
        let name = std::ffi::OsStr::from_bytes(b"caf\xe9\\x.json");
        assert_eq!(lossless_name(name), "caf\\xe9\\\\x.json");
        let ok = std::ffi::OsStr::from_bytes("café.json".as_bytes());
        assert_eq!(lossless_name(ok), "café.json");
    }
}
