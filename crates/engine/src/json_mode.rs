//! Constrained decoding to one JSON object (OpenAI's `response_format: {"type": "json_object"}`):
//! a byte-level recognizer of the prefixes of JSON texts whose value is an object (RFC 8259),
//! and the mask it puts on a step's logits: a token may be drawn only if its bytes keep the
//! output a prefix of such a text, and a stop token only once the object is complete (then
//! nothing else may be). So a generation that stops, stops on one complete object; one cut by
//! `max_tokens` is a prefix of one (as OpenAI's JSON mode).
//!
//! Whitespace between tokens is allowed as JSON allows it, up to [`MAX_WHITESPACE_RUN`] bytes in
//! a row (a small model under the constraint otherwise fills its tokens with newlines), and
//! nesting up to [`MAX_DEPTH`] containers. Inside strings any byte from 0x20 up is accepted (a
//! token of a multi-byte character is a piece of it), escapes as JSON defines them.
//!
//! Owns the grammar and the mask; knows nothing of models beyond each token's bytes.

use std::sync::Arc;

/// Open containers a prefix may hold.
pub const MAX_DEPTH: u32 = 128;
/// Whitespace bytes outside strings allowed in a row.
pub const MAX_WHITESPACE_RUN: u8 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Number {
    Minus,
    Zero,
    Int,
    Dot,
    Frac,
    E,
    ESign,
    Exp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Escape {
    No,
    Backslash,
    /// Hex digits of a `\u` escape still to come.
    Hex(u8),
    /// Inside a multi-byte UTF-8 character: continuation bytes still to come, and the range
    /// the next one must be in (narrower after some lead bytes: no overlong forms, no
    /// surrogates, nothing past U+10FFFF), as `str::from_utf8` checks.
    Utf8 {
        need: u8,
        lo: u8,
        hi: u8,
    },
}

/// A JSON scalar being read, byte by byte (shared by JSON mode and [`crate::json_schema`]): a
/// string after its opening quote, a number (an integer only, when a schema says so), or
/// `true` / `false` / `null`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Scalar {
    Str(Escape),
    Number {
        state: Number,
        integer: bool,
    },
    /// Which word, and the bytes matched.
    Word {
        word: u8,
        at: u8,
    },
}

/// What a byte does to a [`Scalar`].
pub(crate) enum Read {
    /// Taken; the scalar goes on.
    More,
    /// Taken; the scalar is whole (a closing quote, a word's last letter).
    Whole,
    /// Not the scalar's: it was whole before this byte (a number ends at what follows it).
    EndedBefore,
    Invalid,
}

const WORDS: [&[u8]; 3] = [b"true", b"false", b"null"];

impl Scalar {
    /// The scalar a value's first byte begins, of the kinds allowed.
    pub(crate) fn start(b: u8, string: bool, number: Option<bool>, words: &[u8]) -> Option<Self> {
        let state = match b {
            b'"' if string => return Some(Scalar::Str(Escape::No)),
            b't' | b'f' | b'n' => {
                let word = match b {
                    b't' => 0,
                    b'f' => 1,
                    _ => 2,
                };
                return words
                    .contains(&word)
                    .then_some(Scalar::Word { word, at: 1 });
            }
            b'-' => Number::Minus,
            b'0' => Number::Zero,
            b'1'..=b'9' => Number::Int,
            _ => return None,
        };
        number.map(|integer| Scalar::Number { state, integer })
    }

    /// Inside a string, outside an escape: any byte from 0x20 up but `"` and `\` keeps it so.
    pub(crate) fn in_plain_string(&self) -> bool {
        *self == Scalar::Str(Escape::No)
    }

    pub(crate) fn read(&mut self, b: u8) -> Read {
        match *self {
            Scalar::Str(escape) => {
                *self = Scalar::Str(match (escape, b) {
                    (Escape::No, b'"') => return Read::Whole,
                    (Escape::No, b'\\') => Escape::Backslash,
                    (Escape::No, 0x00..=0x1f) => return Read::Invalid,
                    (Escape::No, 0x20..=0x7f) => Escape::No,
                    // A lead byte: how many continuation bytes follow, and the range of the
                    // first of them.
                    (Escape::No, lead) => {
                        let (need, lo, hi) = match lead {
                            0xC2..=0xDF => (1, 0x80, 0xBF),
                            0xE0 => (2, 0xA0, 0xBF),
                            0xE1..=0xEC | 0xEE..=0xEF => (2, 0x80, 0xBF),
                            0xED => (2, 0x80, 0x9F),
                            0xF0 => (3, 0x90, 0xBF),
                            0xF1..=0xF3 => (3, 0x80, 0xBF),
                            0xF4 => (3, 0x80, 0x8F),
                            _ => return Read::Invalid,
                        };
                        Escape::Utf8 { need, lo, hi }
                    }
                    (Escape::Utf8 { need, lo, hi }, c) if (lo..=hi).contains(&c) => {
                        if need == 1 {
                            Escape::No
                        } else {
                            Escape::Utf8 {
                                need: need - 1,
                                lo: 0x80,
                                hi: 0xBF,
                            }
                        }
                    }
                    (Escape::Utf8 { .. }, _) => return Read::Invalid,
                    (Escape::Backslash, b'u') => Escape::Hex(4),
                    (Escape::Backslash, b'"' | b'\\' | b'/' | b'b' | b'f' | b'n' | b'r' | b't') => {
                        Escape::No
                    }
                    (Escape::Backslash, _) => return Read::Invalid,
                    (Escape::Hex(n), c) if c.is_ascii_hexdigit() => {
                        if n == 1 {
                            Escape::No
                        } else {
                            Escape::Hex(n - 1)
                        }
                    }
                    (Escape::Hex(_), _) => return Read::Invalid,
                });
                Read::More
            }
            Scalar::Number { state, integer } => {
                let next = match (state, b) {
                    (Number::Minus, b'0') => Number::Zero,
                    (Number::Minus, b'1'..=b'9') => Number::Int,
                    (Number::Int, b'0'..=b'9') => Number::Int,
                    (Number::Zero | Number::Int, b'.') if !integer => Number::Dot,
                    (Number::Dot | Number::Frac, b'0'..=b'9') => Number::Frac,
                    (Number::Zero | Number::Int | Number::Frac, b'e' | b'E') if !integer => {
                        Number::E
                    }
                    (Number::E, b'+' | b'-') => Number::ESign,
                    (Number::E | Number::ESign | Number::Exp, b'0'..=b'9') => Number::Exp,
                    (Number::Zero | Number::Int | Number::Frac | Number::Exp, _) => {
                        return Read::EndedBefore
                    }
                    _ => return Read::Invalid,
                };
                *self = Scalar::Number {
                    state: next,
                    integer,
                };
                Read::More
            }
            Scalar::Word { word, at } => {
                let w = WORDS[word as usize];
                if w[at as usize] != b {
                    return Read::Invalid;
                }
                if at as usize + 1 == w.len() {
                    return Read::Whole;
                }
                *self = Scalar::Word { word, at: at + 1 };
                Read::More
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Mode {
    /// Before the object's `{`.
    Start,
    /// A value (after `:`, `[` or an array's `,`); `]` too right after `[`.
    Value { or_close: bool },
    /// A key (after `{` or an object's `,`); `}` too right after `{`.
    Key { or_close: bool },
    /// The `:` after a key.
    Colon,
    /// After a value inside a container: `,` or its closer.
    AfterValue,
    /// A scalar value, or (`key`) an object's key.
    Scalar { scalar: Scalar, key: bool },
    /// The object is complete.
    Done,
}

/// Where a JSON text's prefix stands: small and `Copy`, so that every token of a vocabulary can
/// be tried from it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct JsonPrefix {
    mode: Mode,
    /// Open containers, the innermost in bit 0: 1 an object, 0 an array.
    stack: u128,
    depth: u32,
    whitespace_run: u8,
}

impl Default for JsonPrefix {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonPrefix {
    /// Nothing written yet.
    pub fn new() -> Self {
        Self {
            mode: Mode::Start,
            stack: 0,
            depth: 0,
            whitespace_run: 0,
        }
    }

    /// Whether the object is complete.
    pub fn is_complete(&self) -> bool {
        self.mode == Mode::Done
    }

    /// Whether the text may continue with these bytes (and then moves past them).
    pub fn feed_all(&mut self, bytes: &[u8]) -> bool {
        bytes.iter().all(|&b| JsonPrefix::feed(self, b))
    }

    fn in_object(&self) -> bool {
        self.stack & 1 == 1
    }

    fn open(&mut self, object: bool) -> bool {
        if self.depth >= MAX_DEPTH {
            return false;
        }
        self.stack = self.stack << 1 | object as u128;
        self.depth += 1;
        self.mode = if object {
            Mode::Key { or_close: true }
        } else {
            Mode::Value { or_close: true }
        };
        true
    }

    fn close(&mut self) -> bool {
        self.stack >>= 1;
        self.depth -= 1;
        self.value_done();
        true
    }

    fn value_done(&mut self) {
        self.mode = if self.depth == 0 {
            Mode::Done
        } else {
            Mode::AfterValue
        };
    }

    /// Whether the text may continue with `b` (and then moves past it).
    pub fn feed(&mut self, b: u8) -> bool {
        if let Mode::Scalar { mut scalar, key } = self.mode {
            return match scalar.read(b) {
                Read::More => {
                    self.mode = Mode::Scalar { scalar, key };
                    true
                }
                Read::Whole if key => {
                    self.mode = Mode::Colon;
                    true
                }
                Read::Whole => {
                    self.value_done();
                    true
                }
                Read::EndedBefore => {
                    self.value_done();
                    self.feed(b)
                }
                Read::Invalid => false,
            };
        }
        if matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            if self.mode == Mode::Done || self.whitespace_run >= MAX_WHITESPACE_RUN {
                return false;
            }
            self.whitespace_run += 1;
            return true;
        }
        self.whitespace_run = 0;
        match self.mode {
            Mode::Start => b == b'{' && self.open(true),
            Mode::Value { or_close } => match b {
                b'{' => self.open(true),
                b'[' => self.open(false),
                b']' if or_close => self.close(),
                _ => match Scalar::start(b, true, Some(false), &[0, 1, 2]) {
                    Some(scalar) => {
                        self.mode = Mode::Scalar { scalar, key: false };
                        true
                    }
                    None => false,
                },
            },
            Mode::Key { or_close } => match b {
                b'"' => {
                    self.mode = Mode::Scalar {
                        scalar: Scalar::Str(Escape::No),
                        key: true,
                    };
                    true
                }
                b'}' if or_close => self.close(),
                _ => false,
            },
            Mode::Colon => {
                if b == b':' {
                    self.mode = Mode::Value { or_close: false };
                }
                b == b':'
            }
            Mode::AfterValue => match b {
                b',' => {
                    self.mode = if self.in_object() {
                        Mode::Key { or_close: false }
                    } else {
                        Mode::Value { or_close: false }
                    };
                    true
                }
                b'}' if self.in_object() => self.close(),
                b']' if !self.in_object() => self.close(),
                _ => false,
            },
            Mode::Scalar { .. } | Mode::Done => false,
        }
    }
}

/// A recognizer of output prefixes, byte by byte, that the constraints' masks are computed
/// from: small and `Copy` (every token is tried from a copy), hashable (the allowed tokens of
/// each state are kept).
pub trait BytePrefix: Copy + Eq + std::hash::Hash {
    /// Whether the output may continue with `b` (and then moves past it).
    fn feed(&mut self, b: u8) -> bool;
    /// Whether any byte from 0x20 up but `"` and `\` keeps the state as it is (inside a
    /// string, outside an escape): a token of such bytes is then accepted without trying it.
    fn in_plain_string(&self) -> bool;
    /// Whether the output is complete (only a stop token may follow).
    fn is_complete(&self) -> bool;

    /// Whether a token of these bytes may follow (without moving).
    fn accepts(&self, bytes: &[u8], plain: bool) -> bool {
        if bytes.is_empty() {
            return false;
        }
        if plain && self.in_plain_string() {
            return true;
        }
        let mut s = *self;
        bytes.iter().all(|&b| s.feed(b))
    }
}

impl BytePrefix for JsonPrefix {
    fn feed(&mut self, b: u8) -> bool {
        JsonPrefix::feed(self, b)
    }
    fn in_plain_string(&self) -> bool {
        matches!(self.mode, Mode::Scalar { scalar, .. } if scalar.in_plain_string())
    }
    fn is_complete(&self) -> bool {
        JsonPrefix::is_complete(self)
    }
}

/// The tokens each state of a [`BytePrefix`] allows, one bit a token, computed once per state
/// and kept (an output returns to the same few states: after a value, before a key, inside a
/// string), up to a number of states (then it starts afresh).
#[derive(Debug)]
pub struct MaskCache<P> {
    masks: std::sync::Mutex<std::collections::HashMap<P, Arc<[u64]>>>,
    kept: usize,
}

impl<P> Default for MaskCache<P> {
    /// [`MASKS_KEPT`] states.
    fn default() -> Self {
        Self::keeping(MASKS_KEPT)
    }
}

impl<P> MaskCache<P> {
    /// Keeping up to `kept` states.
    pub fn keeping(kept: usize) -> Self {
        Self {
            masks: Default::default(),
            kept: kept.max(1),
        }
    }
}

impl<P: Copy + Eq + std::hash::Hash> MaskCache<P> {
    /// Whether each of `tokens` may follow `state`: `follows(state, bytes)` says whether bytes
    /// may (`plain_string`: the state is inside a string, where a token without `"`, `\` or
    /// control bytes needs no trying).
    pub fn allowed_with(
        &self,
        tokens: &TokenBytes,
        state: &P,
        plain_string: bool,
        follows: impl Fn(&P, &[u8]) -> bool,
    ) -> Arc<[u64]> {
        let lock = || self.masks.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(bits) = lock().get(state) {
            return bits.clone();
        }
        // The bytes a token may begin with, tried once each; where few may (between values),
        // the pairs too: most tokens then fail on a table instead of a copy of the state.
        let first: Vec<bool> = (0..=255u8).map(|b| follows(state, &[b])).collect();
        let starts: Vec<u8> = (0..=255u8).filter(|&b| first[b as usize]).collect();
        let mut second = vec![true; 256 * 256];
        if starts.len() <= 16 {
            for &a in &starts {
                for b in 0..=255u8 {
                    second[a as usize * 256 + b as usize] = follows(state, &[a, b]);
                }
            }
        }
        let mut bits = vec![0u64; tokens.len().div_ceil(64)];
        for id in 0..tokens.len() {
            let t = tokens.get(id);
            let ok = t.first().is_some_and(|&b| first[b as usize])
                && (t.len() < 2 || second[t[0] as usize * 256 + t[1] as usize])
                && ((plain_string && tokens.plain[id]) || follows(state, t));
            if ok {
                bits[id / 64] |= 1 << (id % 64);
            }
        }
        let bits: Arc<[u64]> = bits.into();
        let mut masks = lock();
        if masks.len() >= self.kept {
            masks.clear();
        }
        masks.insert(*state, bits.clone());
        bits
    }
}

impl<P: BytePrefix> MaskCache<P> {
    /// [`Self::allowed_with`] the state's own bytes.
    pub fn allowed(&self, tokens: &TokenBytes, state: &P) -> Arc<[u64]> {
        self.allowed_with(tokens, state, state.in_plain_string(), |s, t| {
            s.accepts(t, false)
        })
    }

    /// Masks `logits` by what `state` allows ([`apply_mask`]).
    pub fn mask(
        &self,
        tokens: &TokenBytes,
        state: &P,
        logits: &mut [f32],
        stop_ids: &[u32],
    ) -> bool {
        apply_mask(
            &self.allowed(tokens, state),
            state.is_complete(),
            logits,
            stop_ids,
        )
    }
}

/// Sets every logit `allowed` (one bit a token) forbids to −∞, and the stop tokens' unless the
/// output is `complete` (after it, the other tokens are forbidden by `allowed`: no bytes may
/// follow). Returns whether any token is left.
pub fn apply_mask(allowed: &[u64], complete: bool, logits: &mut [f32], stop_ids: &[u32]) -> bool {
    let stops: Vec<(usize, f32)> = stop_ids
        .iter()
        .filter_map(|&i| logits.get(i as usize).map(|&l| (i as usize, l)))
        .collect();
    for (id, l) in logits.iter_mut().enumerate() {
        if allowed.get(id / 64).is_none_or(|w| w >> (id % 64) & 1 == 0) {
            *l = f32::NEG_INFINITY;
        }
    }
    for (id, l) in stops {
        logits[id] = if complete { l } else { f32::NEG_INFINITY };
    }
    logits.iter().any(|&l| l > f32::NEG_INFINITY)
}

/// Every token's bytes (what it adds to the output), for the constraints' recognizers to try,
/// and JSON mode's allowed tokens by state.
#[derive(Debug)]
pub struct TokenBytes {
    offsets: Vec<usize>,
    bytes: Vec<u8>,
    /// Tokens of printable ASCII without `"` or `\` (inside a string, outside an escape or a
    /// multi-byte character, they leave the state as it is).
    plain: Vec<bool>,
    /// JSON mode's allowed tokens by state.
    json_masks: MaskCache<JsonPrefix>,
    /// Token ids by their first byte (made on the first [`Self::can_spell`]).
    by_first: std::sync::OnceLock<Vec<Vec<u32>>>,
}

/// Prefix states whose allowed tokens JSON mode keeps per checkpoint (a bit a token: 6 KiB each
/// for 49152 tokens, 3 MiB in all).
pub const MASKS_KEPT: usize = 512;

impl TokenBytes {
    /// From each token's bytes, in id order.
    pub fn new(tokens: impl IntoIterator<Item = Vec<u8>>) -> Self {
        let (mut offsets, mut bytes, mut plain) = (vec![0], vec![], vec![]);
        for t in tokens {
            plain.push(
                t.iter()
                    .all(|&b| (0x20..0x80).contains(&b) && b != b'"' && b != b'\\'),
            );
            bytes.extend_from_slice(&t);
            offsets.push(bytes.len());
        }
        Self {
            offsets,
            bytes,
            plain,
            json_masks: Default::default(),
            by_first: Default::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.plain.len()
    }

    pub fn is_empty(&self) -> bool {
        self.plain.is_empty()
    }

    pub fn get(&self, id: usize) -> &[u8] {
        &self.bytes[self.offsets[id]..self.offsets[id + 1]]
    }

    /// Whether a sequence of tokens spells `text` exactly (as a choice must be written): which
    /// positions of it are reachable, token by token.
    pub fn can_spell(&self, text: &[u8]) -> bool {
        let by_first = self.by_first.get_or_init(|| {
            let mut index = vec![vec![]; 256];
            for id in 0..self.len() {
                if let Some(&b) = self.get(id).first() {
                    index[b as usize].push(id as u32);
                }
            }
            index
        });
        let mut reach = vec![false; text.len() + 1];
        reach[0] = true;
        for at in 0..text.len() {
            if !reach[at] {
                continue;
            }
            for &id in &by_first[text[at] as usize] {
                let t = self.get(id as usize);
                if text[at..].starts_with(t) {
                    reach[at + t.len()] = true;
                }
            }
        }
        reach[text.len()]
    }

    /// Whether some token can open an object (so a checkpoint can write JSON at all).
    pub fn can_open_object(&self) -> bool {
        let start = JsonPrefix::new();
        (0..self.len()).any(|i| start.accepts(self.get(i), false))
    }
}

/// A sequence's JSON constraint: where its output stands and the vocabulary's bytes.
#[derive(Debug, Clone)]
pub struct JsonConstraint {
    prefix: JsonPrefix,
    tokens: Arc<TokenBytes>,
}

impl JsonConstraint {
    pub fn new(tokens: Arc<TokenBytes>) -> Self {
        Self {
            prefix: JsonPrefix::new(),
            tokens,
        }
    }

    /// Sets every logit the constraint forbids to −∞: tokens that would leave no JSON object,
    /// and until the object is complete the stop tokens (after it, every other token). Returns
    /// whether any token is left.
    pub fn mask(&self, logits: &mut [f32], stop_ids: &[u32]) -> bool {
        self.tokens
            .json_masks
            .mask(&self.tokens, &self.prefix, logits, stop_ids)
    }

    /// Moves past a drawn token (one the mask allowed).
    pub fn accept(&mut self, id: u32) {
        if (id as usize) < self.tokens.len() {
            let ok = self.prefix.feed_all(self.tokens.get(id as usize));
            debug_assert!(ok, "a token the mask forbade");
        }
    }

    pub fn is_complete(&self) -> bool {
        self.prefix.is_complete()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Every prefix of `text` accepted, and complete exactly at its end.
    fn accepted(text: &str) -> bool {
        let mut p = JsonPrefix::new();
        for (i, &b) in text.as_bytes().iter().enumerate() {
            if p.is_complete() || !p.feed(b) {
                return false;
            }
            let _ = i;
        }
        p.is_complete()
    }

    /// Where the recognizer first refuses `text` (None: never).
    fn refused_at(text: &str) -> Option<usize> {
        let mut p = JsonPrefix::new();
        text.as_bytes().iter().position(|&b| !p.feed(b))
    }

    #[test]
    fn objects_serde_json_parses_are_accepted_whole() {
        for text in [
            "{}",
            " {\"a\": 1}",
            "{\"a\":[1,2.5,-0.25e+3,0,true,false,null,\"x\"]}",
            "{\"nested\": {\"k\": [[], {}, [{}]], \"e\": \"\\u00e9\\n\\\"q\\\" \\\\ /\"}}",
            "{\"caption\": \"A red flash, then a blue one.\", \"frames\": 8}",
            "{\n    \"a\": 1E5,\n    \"b\": -0\n}",
            "{\"ünï\": \"cødé 漢字\"}",
        ] {
            let v: serde_json::Value = serde_json::from_str(text).unwrap();
            assert!(v.is_object(), "{text}");
            assert!(accepted(text), "{text}");
        }
    }

    #[test]
    fn what_is_not_an_object_is_refused_where_it_goes_wrong() {
        for (text, at) in [
            ("[1, 2]", 0),
            ("\"x\"", 0),
            ("{a: 1}", 1),
            ("{\"a\" 1}", 5),
            ("{\"a\": 01}", 7),
            ("{\"a\": 1.}", 8),
            ("{\"a\": .5}", 6),
            ("{\"a\": tru}", 9),
            ("{\"a\": 1,}", 8),
            ("{\"a\": [1,]}", 9),
            ("{\"a\": \"\\x\"}", 8),
            ("{\"a\": \"\\u12g4\"}", 11),
            ("{\"a\": \"line\nbreak\"}", 11),
            ("{\"a\": 1}}", 8),
            ("{\"a\": 1} x", 8),
            ("{\"a\": [1}", 8),
            ("{\"a\": -}", 7),
            ("{\"a\": 1e}", 8),
        ] {
            assert!(
                serde_json::from_str::<serde_json::Value>(text).is_err() || !text.starts_with('{'),
                "{text}"
            );
            assert_eq!(refused_at(text), Some(at), "{text}");
        }
        // Prefixes are not complete; nesting and whitespace have their limits.
        let mut p = JsonPrefix::new();
        assert!(p.feed_all(b"{\"a\": [1, {\"b\": \"c") && !p.is_complete());
        let deep = "{\"a\":".to_string() + &"[".repeat(MAX_DEPTH as usize - 1);
        let mut p = JsonPrefix::new();
        assert!(p.feed_all(deep.as_bytes()));
        assert!(!p.feed(b'['), "past the depth limit");
        let mut p = JsonPrefix::new();
        assert!(p.feed_all(&[b' '; MAX_WHITESPACE_RUN as usize]));
        assert!(!p.feed(b' '), "past the whitespace limit");
        assert!(p.feed(b'{'));
    }

    /// A deterministic generator for the random tests (64-bit LCG, high bits).
    pub(crate) struct Lcg(pub u64);

    impl Lcg {
        pub(crate) fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((self.0 >> 33) as usize) % n.max(1)
        }
    }

    /// A random JSON value, nested up to `depth`.
    pub(crate) fn random_value(r: &mut Lcg, depth: usize) -> serde_json::Value {
        use serde_json::Value;
        let strings = ["", "a", "é \"q\"", "line\nbreak", "tab\t\\", "漢字", "}]"];
        match r.below(if depth == 0 { 5 } else { 7 }) {
            0 => Value::Null,
            1 => Value::Bool(r.below(2) == 0),
            2 => serde_json::json!((r.below(2000) as i64) - 1000),
            3 => serde_json::json!((r.below(100000) as f64 - 50000.0) / 997.0),
            4 => Value::String(strings[r.below(strings.len())].into()),
            5 => Value::Array(
                (0..r.below(4))
                    .map(|_| random_value(r, depth - 1))
                    .collect(),
            ),
            _ => Value::Object(
                (0..r.below(4))
                    .map(|i| {
                        (
                            format!("k{i}{}", strings[r.below(strings.len())]),
                            random_value(r, depth - 1),
                        )
                    })
                    .collect(),
            ),
        }
    }

    #[test]
    fn random_objects_and_their_mutations_agree_with_serde_json() {
        // 2000 random objects, compact and pretty: accepted whole. Each with one byte changed,
        // dropped or doubled: complete exactly when serde_json parses an object from it (or
        // refused: JSON mode takes no trailing whitespace).
        let mut r = Lcg(7);
        let noise = b"{}[]\":,0123456789-.eE+tfn \\ux\n";
        for i in 0..2000 {
            let v = serde_json::Value::Object(match random_value(&mut r, 4) {
                serde_json::Value::Object(o) => o,
                other => [("v".to_string(), other)].into_iter().collect(),
            });
            let text = if i % 2 == 0 {
                serde_json::to_string(&v).unwrap()
            } else {
                serde_json::to_string_pretty(&v).unwrap()
            };
            assert!(accepted(&text), "{text}");
            let mut bytes = text.clone().into_bytes();
            let at = r.below(bytes.len());
            match r.below(3) {
                0 => bytes[at] = noise[r.below(noise.len())],
                1 => {
                    bytes.remove(at);
                }
                _ => bytes.insert(at, bytes[at]),
            }
            let mut p = JsonPrefix::new();
            let fed = bytes.iter().all(|&b| p.feed(b));
            let parsed = serde_json::from_slice::<serde_json::Value>(&bytes);
            // JSON's grammar has no bound on a number; serde_json's f64 has (1e400): not ours.
            if parsed
                .as_ref()
                .is_err_and(|e| e.to_string().contains("number out of range"))
            {
                continue;
            }
            let object = parsed.as_ref().is_ok_and(|v| v.is_object());
            let trailing_space = bytes.last().is_some_and(|b| b.is_ascii_whitespace());
            assert_eq!(
                fed && p.is_complete(),
                object && !trailing_space,
                "{:?}",
                String::from_utf8_lossy(&bytes)
            );
        }
    }

    #[test]
    fn strings_hold_valid_utf8_as_std_checks_it() {
        // Every 1-3 byte sequence over bytes that matter to UTF-8 (ASCII, continuation ranges,
        // each kind of lead byte, bytes never valid) inside a string: accepted whole exactly
        // when `str::from_utf8` accepts it.
        let bytes = [
            b'a', 0x7f, 0x80, 0x8f, 0x90, 0x9f, 0xa0, 0xbf, 0xc0, 0xc1, 0xc2, 0xdf, 0xe0, 0xe1,
            0xec, 0xed, 0xee, 0xef, 0xf0, 0xf1, 0xf3, 0xf4, 0xf5, 0xff,
        ];
        let mut checked = 0;
        for len in 1..=3 {
            for n in 0..bytes.len().pow(len as u32) {
                let mut v = vec![];
                let mut k = n;
                for _ in 0..len {
                    v.push(bytes[k % bytes.len()]);
                    k /= bytes.len();
                }
                let mut text = b"{\"a\": \"".to_vec();
                text.extend(&v);
                text.extend(b"\"}");
                let mut p = JsonPrefix::new();
                let whole = text.iter().all(|&b| p.feed(b)) && p.is_complete();
                assert_eq!(whole, std::str::from_utf8(&v).is_ok(), "{v:02x?}");
                checked += 1;
            }
        }
        assert_eq!(checked, 24 + 24 * 24 + 24 * 24 * 24);
        // Four-byte characters too.
        assert!(accepted("{\"emoji\": \"🎥 ok\"}"));
    }

    #[test]
    fn every_byte_string_agrees_with_serde_json() {
        // All strings over a small alphabet up to length 6 (and the complete ones checked
        // against serde_json): complete means serde_json parses an object; a refused string has
        // no extension serde_json parses; an accepted prefix is a prefix of some object.
        let alphabet = b"{}[]\":,1-.e tn";
        let mut count = 0;
        let mut frontier = vec![(vec![], JsonPrefix::new())];
        for _ in 0..6 {
            let mut next = vec![];
            for (text, p) in &frontier {
                for &b in alphabet {
                    let mut q = *p;
                    let mut t = text.clone();
                    t.push(b);
                    if q.feed(b) {
                        let parsed = serde_json::from_slice::<serde_json::Value>(&t);
                        assert_eq!(
                            q.is_complete(),
                            parsed.as_ref().is_ok_and(|v| v.is_object()),
                            "{:?}",
                            String::from_utf8_lossy(&t)
                        );
                        count += 1;
                        next.push((t, q));
                    } else if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&t) {
                        // Refused yet JSON: only what JSON mode rules out (not an object at
                        // the top, or trailing whitespace after the object).
                        assert!(
                            !v.is_object() || t.ends_with(b" "),
                            "{:?}",
                            String::from_utf8_lossy(&t)
                        );
                    }
                }
            }
            frontier = next;
        }
        assert!(count > 1000, "{count} accepted prefixes");
    }

    fn tokens_spell(vocab: &[&str], text: &str) -> bool {
        TokenBytes::new(vocab.iter().map(|t| t.as_bytes().to_vec())).can_spell(text.as_bytes())
    }

    #[test]
    fn the_mask_allows_what_continues_an_object_and_stops_only_when_complete() {
        use crate::constraint::{testing, OutputConstraint};
        let words = [
            "<eos>", "{", "}", "\"", "a", "\":", " 1", "[", "x", "", "\"}",
        ];
        let tokens = testing::vocab(&words);
        assert!(tokens.can_open_object());
        let mut c = OutputConstraint::Json(JsonConstraint::new(tokens));
        let allowed = |c: &OutputConstraint| testing::allowed(c, &words);
        assert_eq!(allowed(&c), vec!["{"]);
        c.accept(1);
        // (A key may begin with `:` or `}`.)
        assert_eq!(allowed(&c), vec!["}", "\"", "\":", "\"}"]);
        for id in [3, 4, 5] {
            c.accept(id);
        }
        assert_eq!(allowed(&c), vec!["{", "\"", "\":", " 1", "[", "\"}"]);
        c.accept(6);
        assert_eq!(allowed(&c), vec!["}"]);
        c.accept(2);
        assert!(c.is_complete());
        assert_eq!(allowed(&c), vec!["<eos>"]);
        // What the tokens can spell, and not.
        assert!(tokens_spell(&["ab", "a", "b"], "abba"));
        assert!(!tokens_spell(&["ab", "a"], "abba"));
        assert!(!tokens_spell(&["red", " cross"], "redcross"));
        assert!(tokens_spell(&["red", " cross"], "red cross"));
        // A vocabulary without `{` cannot write JSON.
        assert!(!TokenBytes::new([b"a".to_vec(), b"}".to_vec()]).can_open_object());
    }
}
