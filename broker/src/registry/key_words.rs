//! A quick first look at a whole JSON text for the leak check: could it name a registered
//! organisation at all?
//!
//! Every name pattern and identifier the [`super::Matcher`] looks for contributes one *key
//! word*: one of its words, a maximal run of ASCII letters and digits, lowercased (for a name,
//! its longest word; for a domain, its longest label but the last, `acme` for
//! `acme.co.uk`). Whenever the matcher finds a name or an identifier in a string of a
//! document, that string holds the key word as a whole word (a name's words are exactly the
//! maximal letter-and-digit runs of the string's normal form; an identifier is a whole
//! token, or the part of one after a `.` or `@`, and its letter-and-digit runs are whole runs
//! of that token).
//!
//! In a JSON text that is pure ASCII and has no backslash (no escape), every string of the
//! document and every integer is written out byte for byte between punctuation, so each of
//! its words is a whole word of the text. A number with a fraction that is an integer
//! (`1234567.0`) keeps its integer digits as a word; one written with an exponent
//! (`1.234567e6`) does not, nor one whose fraction a double cannot hold (`1234566.9999999999`
//! parses as 1234567), so a text with such a number outside its strings always "may name". So if no word of the text is a key word, the
//! matcher finds nobody in the document, and its string-by-string walk can be skipped. An
//! escape that stands for punctuation (`\n`, `\"`, `\u0020`) is blanked out first, which
//! separates words as the character it stands for does. Any other text (a byte beyond
//! ASCII, an escaped letter, digit or character beyond ASCII) is always "may name": the
//! walk decides.
//! Words that the text's punctuation puts side by side across two strings only make a false
//! alarm, which the walk then settles.
//!
//! The test hashes each word of the text whose length is that of some key word (the others
//! cannot be one) and looks it up in a bitmap of the key words' hashes (128 KiB), then, for
//! the few words that hit, in the set of their full hashes: linear in the text, with no
//! automaton and no normal form written. A hash collision can only raise a false alarm.

use std::collections::HashSet;

/// log2 of the bitmap's size in bits: 2^20 bits (128 KiB) hold the key words of 10,000
/// organisations (about 40,000) at about one bit in 25 set.
const BITS: u32 = 20;

/// The key words of a registry.
#[derive(Debug)]
pub(crate) struct KeyWords {
    /// Bit `h >> (64 - BITS)` is set for the hash `h` of every key word.
    bits: Vec<u64>,
    /// The full hash of every key word.
    hashes: HashSet<u64, foldhash::fast::FixedState>,
    /// Bit `n` set if a key word is `n` bytes long (bit 63: 63 bytes or more): a word of
    /// any other length is no key word, and is not hashed.
    lengths: u64,
    /// A pattern with no usable key word (a name of no words): every text may name.
    always: bool,
}

impl Default for KeyWords {
    fn default() -> Self {
        KeyWords {
            bits: vec![0; 1 << (BITS - 6)],
            hashes: HashSet::default(),
            lengths: 0,
            always: false,
        }
    }
}

impl KeyWords {
    /// Adds the key word of a name pattern, given as its words in the names form.
    pub(crate) fn add_name(&mut self, words: &[String]) {
        if words.iter().any(|w| !w.is_ascii()) {
            // No pure-ASCII text can hold a word beyond ASCII (its lower case is not ASCII
            // either), so the name cannot occur in a text that this test answers for.
            return;
        }
        // The first of the longest words: the longest is usually the least common.
        let key = words
            .iter()
            .map(String::as_bytes)
            .fold(None::<&[u8]>, |best, w| match best {
                Some(b) if b.len() >= w.len() => Some(b),
                _ => Some(w),
            });
        self.add_key(key);
    }

    /// Adds the key word of a company or charity number (lowercase).
    pub(crate) fn add_number(&mut self, number: &[u8]) {
        if !number.is_ascii() {
            // Not a token of any pure-ASCII text.
            return;
        }
        let runs: Vec<&[u8]> = runs(number).collect();
        self.add_runs(&runs);
    }

    /// Adds the key word of a domain (lowercase): its longest label but the last (the
    /// top-level domain is shared by too many), or the only one.
    pub(crate) fn add_domain(&mut self, domain: &[u8]) {
        if !domain.is_ascii() {
            // Neither a token of any pure-ASCII text nor the end of one.
            return;
        }
        let runs: Vec<&[u8]> = runs(domain).collect();
        match runs.split_last() {
            Some((_, rest)) if !rest.is_empty() => self.add_runs(rest),
            _ => self.add_runs(&runs),
        }
    }

    /// Adds the longest of `runs` (an identifier's letter-and-digit runs).
    fn add_runs(&mut self, runs: &[&[u8]]) {
        let key = runs
            .iter()
            .copied()
            .fold(None::<&[u8]>, |best, w| match best {
                Some(b) if b.len() >= w.len() => Some(b),
                _ => Some(w),
            });
        self.add_key(key);
    }

    fn add_key(&mut self, key: Option<&[u8]>) {
        match key {
            Some(word) if !word.is_empty() => {
                let h = word_hash(word);
                if let Some(slot) = self.bits.get_mut(bit_word(h)) {
                    *slot |= bit(h);
                }
                self.hashes.insert(h);
                self.lengths |= length_bit(word);
            }
            // A pattern without a word would match between any two words.
            _ => self.always = true,
        }
    }

    /// Whether the JSON text `text` may name someone: false only if it is pure ASCII, its
    /// escapes all stand for punctuation, and none of its words is a key word.
    pub(crate) fn may_name(&self, text: &[u8]) -> bool {
        if self.always || !text.is_ascii() {
            return true;
        }
        if self.hashes.is_empty() {
            return false;
        }
        let is_key = |word: &[u8]| {
            if self.lengths & length_bit(word) == 0 {
                return false;
            }
            let h = word_hash(word);
            self.bits
                .get(bit_word(h))
                .is_none_or(|slot| slot & bit(h) != 0)
                && self.hashes.contains(&h)
        };
        match memchr::memchr(b'\\', text) {
            None => any_key_word_or_exponent(text, is_key),
            Some(first) => match without_escapes(text, first) {
                Some(plain) => any_key_word_or_exponent(&plain, is_key),
                None => true,
            },
        }
    }
}

/// Whether a word of `text` (ASCII, its escapes blanked) is a key word, or a number outside
/// its strings is written so that the integer the walk reads from it is no word of the text:
/// with an exponent (`1.234567e6` is 1234567), or with more significant digits than a double
/// holds (`1234566.9999999999` parses as 1234567). A number of at most 15 significant digits
/// parses to an integer only if it is that integer written out, whose digits are a word.
fn any_key_word_or_exponent(text: &[u8], is_key: impl Fn(&[u8]) -> bool) -> bool {
    // Whether the text is inside a string at `at`, counting quotes from the last place asked
    // (words come in order, so the text is counted once). With escapes blanked, every quote
    // opens or closes a string.
    let (mut counted, mut inside) = (0usize, false);
    let mut in_string = |at: usize| {
        let quotes = text
            .get(counted..at)
            .map_or(0, |between| memchr::memchr_iter(b'"', between).count());
        inside ^= quotes % 2 == 1;
        counted = at;
        inside
    };
    any_run(text, |word| {
        // Both forms of number begin with a digit.
        is_key(word)
            || (word.first().is_some_and(u8::is_ascii_digit) && {
                let at = word.as_ptr().addr().saturating_sub(text.as_ptr().addr());
                (is_exponent_word(word) || is_long_fraction(text, at, word)) && !in_string(at)
            })
    })
}

/// Whether `word`, at `at` in `text`, is the fraction of a number of more than 15 digits in
/// all: digits after a `.` that follows digits.
fn is_long_fraction(text: &[u8], at: usize, word: &[u8]) -> bool {
    // The byte before first: most words that begin with a digit follow no `.`.
    if at == 0 || text.get(at - 1) != Some(&b'.') || !word.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let integer = text
        .get(..at - 1)
        .unwrap_or_default()
        .iter()
        .rev()
        .take_while(|b| b.is_ascii_digit())
        .count();
    integer > 0 && integer + word.len() > 15
}

/// Whether `word` is how a number written with an exponent shows in the words of a text:
/// digits, `e` or `E`, and digits unless a sign follows (`1.5e3`, `2e+7` give `5e3`, `2e`).
fn is_exponent_word(word: &[u8]) -> bool {
    let Some(e) = word.iter().position(|b| matches!(b, b'e' | b'E')) else {
        return false;
    };
    let (mantissa, exponent) = word.split_at(e);
    !mantissa.is_empty()
        && mantissa.iter().all(u8::is_ascii_digit)
        && exponent.iter().skip(1).all(u8::is_ascii_digit)
}

/// A copy of the JSON text `text` (whose first backslash is at `first`) with every escape
/// blanked out, if every escape stands for an ASCII character other than a letter or digit
/// (`\n`, `\"`, `\/`, `\u0020`, …): in the document such a character separates words as
/// the blanks do, so the copy's words are the document's. `None` for any other escape (a
/// letter, a digit or a character beyond ASCII written as `\u`), which the caller cannot
/// answer for. A backslash only ever starts an escape in a text the parser accepted, and
/// escapes are read from left to right, so `\\n` is an escaped backslash, then `n`.
fn without_escapes(text: &[u8], first: usize) -> Option<Vec<u8>> {
    let mut out = text.to_vec();
    let mut i = first;
    while let Some(at) = memchr::memchr(b'\\', out.get(i..)?) {
        i += at;
        let len = match out.get(i + 1)? {
            b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't' => 2,
            b'u' => {
                let digits = std::str::from_utf8(out.get(i + 2..i + 6)?).ok()?;
                let c = u8::try_from(u32::from_str_radix(digits, 16).ok()?).ok()?;
                if !c.is_ascii() || c.is_ascii_alphanumeric() {
                    return None;
                }
                6
            }
            _ => return None,
        };
        out.get_mut(i..i + len)?.fill(b' ');
        i += len;
    }
    Some(out)
}

/// Bit k set where byte k of `x` (little-endian) is an ASCII letter or digit, for eight
/// ASCII bytes at once (a byte beyond ASCII is read without its top bit). Each test is a
/// range check by addition: adding `0x80 - lo` sets a byte's top bit from `lo` on, and no
/// byte below 0x80 carries into the next.
fn alnum_bits(x: u64) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const TOP: u64 = 0x8080_8080_8080_8080;
    let x = x & !TOP;
    let digit = (x + (0x80 - 0x30) * ONES) & !(x + (0x80 - 0x3a) * ONES);
    let lower = x | (0x20 * ONES);
    let letter = (lower + (0x80 - 0x61) * ONES) & !(lower + (0x80 - 0x7b) * ONES);
    // Gather the top bit of each byte into the top byte, byte k's at bit 56 + k.
    ((((digit | letter) & TOP) >> 7).wrapping_mul(0x0102_0408_1020_4080)) >> 56
}

/// Whether `f` holds for any of the maximal runs of ASCII letters and digits in `text`, in
/// order; as `runs(text).any(f)`, but faster. `text` must be ASCII. The text is classified 64 bytes at a time
/// into a bit mask (no branch per byte), and the runs' starts and ends are read off its
/// transitions; a run may cross from one 64-byte block into the next.
fn any_run<'t>(text: &'t [u8], mut f: impl FnMut(&'t [u8]) -> bool) -> bool {
    // Whether the byte before the block is a letter or digit (then a run is open, from
    // `start`).
    let mut carry = 0u64;
    let mut start = 0usize;
    for (block, bytes) in text.chunks(64).enumerate() {
        let base = block * 64;
        // Whole eights by plain loads; only a last, short block pads its tail (a copy of
        // a length not known in advance is a call to `memcpy`).
        let mut mask = 0u64;
        let mut eights = bytes.chunks_exact(8);
        let mut shift = 0;
        for eight in &mut eights {
            let mut b = [0u8; 8];
            b.copy_from_slice(eight);
            mask |= alnum_bits(u64::from_le_bytes(b)) << shift;
            shift += 8;
        }
        let rest = eights.remainder();
        if !rest.is_empty() {
            let mut b = [0u8; 8];
            if let Some(to) = b.get_mut(..rest.len()) {
                to.copy_from_slice(rest);
            }
            mask |= alnum_bits(u64::from_le_bytes(b)) << shift;
        }
        let before = (mask << 1) | carry;
        // Bit j of `starts`: a run starts at j; of `ends`: a run ended at j - 1. Past the
        // block's last byte the mask is clear, so a run still open at a short (last) block's
        // end ends there.
        let mut starts = mask & !before;
        let mut ends = !mask & before;
        // Starts and ends alternate. A run open from the blocks before ends at the first
        // end; each other end closes the run of the start before it, with no branch per
        // word on which comes next.
        if carry == 1 && ends != 0 {
            let end = base + ends.trailing_zeros() as usize;
            ends &= ends - 1;
            if text.get(start..end).is_some_and(&mut f) {
                return true;
            }
        }
        while ends != 0 {
            // (Here a start always precedes the end; wrapping keeps even a broken
            // invariant from panicking.)
            let from = base + starts.trailing_zeros() as usize;
            starts &= starts.wrapping_sub(1);
            let end = base + ends.trailing_zeros() as usize;
            ends &= ends - 1;
            if text.get(from..end).is_some_and(&mut f) {
                return true;
            }
        }
        // A start left over opens a run that goes on into the next block.
        if starts != 0 {
            start = base + starts.trailing_zeros() as usize;
        }
        carry = mask >> 63;
    }
    // A run open at the end of a text whose last block is whole.
    carry == 1 && text.get(start..).is_some_and(f)
}

/// The maximal runs of ASCII letters and digits in `text` (other bytes separate them).
fn runs(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|b| !b.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
}

/// A hash of an ASCII word that ignores case: every byte is taken with its 0x20 bit set,
/// which lowercases a letter and leaves a digit as it is.
fn word_hash(word: &[u8]) -> u64 {
    const K: u64 = 0x9e37_79b9_7f4a_7c15;
    const LOWER: u64 = 0x2020_2020_2020_2020;
    let mut h = (word.len() as u64).wrapping_mul(K);
    let mut chunks = word.chunks_exact(8);
    for chunk in &mut chunks {
        let mut b = [0u8; 8];
        b.copy_from_slice(chunk);
        h = (h ^ (u64::from_le_bytes(b) | LOWER))
            .wrapping_mul(K)
            .rotate_left(29);
    }
    let mut last = 0u64;
    for (i, &b) in chunks.remainder().iter().enumerate() {
        last |= u64::from(b | 0x20) << (8 * i);
    }
    h = (h ^ last).wrapping_mul(K);
    h ^ (h >> 31)
}

/// The bit of [`KeyWords::lengths`] for `word`'s length.
fn length_bit(word: &[u8]) -> u64 {
    1 << word.len().min(63)
}

/// The bitmap's word that holds `h`'s bit.
fn bit_word(h: u64) -> usize {
    usize::try_from((h >> (64 - BITS)) / 64).unwrap_or(0)
}

/// `h`'s bit within its bitmap word.
fn bit(h: u64) -> u64 {
    1 << ((h >> (64 - BITS)) % 64)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn key_words() -> KeyWords {
        let mut k = KeyWords::default();
        k.add_name(&["acme".into()]);
        k.add_name(&["initech".into(), "software".into()]);
        k.add_name(&["soci\u{e9}t\u{e9}".into(), "g\u{e9}n\u{e9}rale".into()]);
        k.add_number(b"01234567");
        k.add_number(b"sc012345");
        k.add_domain(b"globex-mail.example");
        k.add_domain(b"northwind.co.uk");
        k.add_domain("b\u{fc}cher.example".as_bytes());
        k
    }

    #[test]
    fn key_words_are_found_as_whole_words_in_any_case() {
        let k = key_words();
        let rows: &[(&str, bool)] = &[
            (r#"{"a":"nothing here"}"#, false),
            (r#"{"a":"ACME"}"#, true),
            (r#"{"a":"acme"}"#, true),
            (r#"{"a":"pacmen"}"#, false),
            (r#"{"a":"acmeltd"}"#, false),
            // The longest word is the key: "software" alone alarms, "initech" alone not.
            (r#"{"a":"Software"}"#, true),
            (r#"{"a":"Initech"}"#, false),
            (r#"{"n":1234567}"#, false),
            (r#"{"n":"No. 01234567"}"#, true),
            (r#"{"SC012345":1}"#, true),
            (r#"{"a":"x@GLOBEX-mail.example"}"#, true),
            (r#"{"a":"mail.example"}"#, false),
            (r#"{"a":"see northwind"}"#, true),
            (r#"{"a":"co.uk"}"#, false),
            // Beyond ASCII, the text always may name.
            ("{\"a\":\"caf\u{e9}\"}", true),
            // An escape of punctuation separates words; of anything else, may name.
            (r#"{"a":"x\ny"}"#, false),
            (r#"{"a":"x\nacme"}"#, true),
            (r#"{"a":"x\u0020acme\"\\\/"}"#, true),
            (r#"{"a":"\\nacme"}"#, false),
            (r#"{"a":"\u0041cme"}"#, true),
            (r#"{"a":"\u00e9"}"#, true),
            (r#"{"a":"\x"}"#, true),
            // A name or domain beyond ASCII adds no key word.
            (r#"{"a":"Societe Generale"}"#, false),
            (r#"{"a":"b.cher.example"}"#, false),
        ];
        for (text, want) in rows {
            assert_eq!(k.may_name(text.as_bytes()), *want, "{text}");
        }
    }

    /// The block-wise run finder yields exactly the runs that splitting does, across and at
    /// the edges of 64-byte blocks.
    #[test]
    fn runs_are_found_across_blocks() {
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        for len in (0..200).chain([255, 256, 257, 1000]) {
            for _ in 0..50 {
                let text: Vec<u8> = (0..len)
                    .map(|_| {
                        state ^= state << 13;
                        state ^= state >> 7;
                        state ^= state << 17;
                        // Mostly letters, so that long runs cross blocks too.
                        b"aZ9aaaaabbbbcccc-. :\"{"[(state % 22) as usize]
                    })
                    .collect();
                let want: Vec<&[u8]> = runs(&text).collect();
                let mut got: Vec<&[u8]> = Vec::new();
                assert!(!any_run(&text, |w| {
                    got.push(w);
                    false
                }));
                assert_eq!(got, want, "{:?}", String::from_utf8_lossy(&text));
            }
        }
        // Runs that cover whole blocks (no start or end in them), and that end on an edge.
        for len in [1usize, 62, 63, 64, 65, 127, 128, 129, 192, 300] {
            for (before, after) in [("", ""), (" ", ""), ("x ", " y"), (&"-".repeat(63), ".")] {
                let text = format!("{before}{}{after}", "a".repeat(len));
                let want: Vec<&[u8]> = runs(text.as_bytes()).collect();
                let mut got: Vec<&[u8]> = Vec::new();
                assert!(!any_run(text.as_bytes(), |w| {
                    got.push(w);
                    false
                }));
                assert_eq!(got, want, "{len} {before:?} {after:?}");
            }
        }
        assert!(any_run(b"x yz", |w| w == b"yz"));
        assert!(!any_run(b"", |_| true));
    }

    #[test]
    fn alnum_bits_classify_every_ascii_byte() {
        for b in 0..=0x7fu8 {
            for k in 0..8 {
                let mut bytes = [b'.'; 8];
                bytes[k] = b;
                let want = u64::from(b.is_ascii_alphanumeric()) << k;
                assert_eq!(alnum_bits(u64::from_le_bytes(bytes)), want, "{b:#x} at {k}");
            }
        }
        assert_eq!(alnum_bits(u64::from_le_bytes(*b"a0Z9 /:@")), 0b1111);
    }

    /// Words are hashed only at the lengths of key words: every length up to 62 on its own,
    /// all from 63 on together.
    #[test]
    fn key_words_are_found_at_every_length() {
        for len in [1usize, 2, 7, 8, 9, 62, 63, 64, 100] {
            let key = "k".repeat(len);
            let mut k = KeyWords::default();
            k.add_name(std::slice::from_ref(&key));
            let text = |w: &str| format!(r#"{{"a":"x {w} y"}}"#);
            assert!(k.may_name(text(&key.to_uppercase()).as_bytes()), "{len}");
            assert!(!k.may_name(text(&"k".repeat(len + 1)).as_bytes()), "{len}");
            assert!(!k.may_name(text(&format!("{}j", "k".repeat(len - 1))).as_bytes()));
            // The numbers that always may name are found whatever the key words' lengths.
            assert!(k.may_name(br#"{"n":1.5e3}"#), "{len}");
            assert!(k.may_name(br#"{"n":1234566.9999999999}"#), "{len}");
            assert!(!k.may_name(br#"{"n":"1.5e3"}"#), "{len}");
        }
    }

    #[test]
    fn a_name_of_no_words_makes_every_text_suspect() {
        let mut k = KeyWords::default();
        assert!(!k.may_name(b"{}"));
        k.add_name(&[]);
        assert!(k.may_name(b"{}"));
    }

    #[test]
    fn the_hash_ignores_case_only() {
        assert_eq!(word_hash(b"AcMe"), word_hash(b"acme"));
        assert_eq!(
            word_hash(b"NorvexalHoldings2026"),
            word_hash(b"norvexalholdings2026")
        );
        assert_ne!(word_hash(b"acme"), word_hash(b"acmf"));
        assert_ne!(word_hash(b"acme"), word_hash(b"acme0"));
        assert_ne!(word_hash(b"abcdefgh"), word_hash(b"abcdefgh0"));
    }
}
