//! Text analytics behind the offline `local` backend: tokenization, stop words, theme keywords,
//! extractive summaries, lexicon sentiment and word budgets.
//!
//! Everything here is a pure, synchronous function of its input, and output never depends on
//! memory layout or hashing: terms are interned by sorting, and every ranking is sorted with a
//! total tie-break (score, then text or input position), so the same input always gives the same
//! bytes.
//!
//! The methods are deliberately classic (document frequency, TF-IDF centroid + MMR, a word
//! lexicon with negation) because they need no model files and every sentence they return is
//! either copied from the input or built from counts.
//!
//! They run on the request path of every `local` summary, so the implementation is built for
//! that (issue 4 asks the service to stay within 80% of a bare gRPC echo): each text is scanned
//! once, byte by byte with a Unicode path only for non-ASCII characters, into one lowercase
//! buffer; each word is looked up once in one static table that holds all the word lists as
//! flags; content terms are interned into dense ids by one sort (no map keyed by input words,
//! so no hash flooding either), and the map step's themes, sentiment and sentence vectors all
//! reuse that one scan ([`digest_chunk`]).

use std::cmp::Ordering;
use std::ops::Range;
use std::sync::LazyLock;

use crate::domain::{Entry, Sentiment, SentimentLabel};

// ---------------------------------------------------------------------------------------------
// Tokenization
// ---------------------------------------------------------------------------------------------

/// Bytes of a word that its packed key holds (see [`pack`]); every word of the static lists is
/// at most this long, so a longer word is in none of them.
const KEY_BYTES: usize = 16;

/// The first [`KEY_BYTES`] bytes of `bytes`, big-endian and zero-padded. Words never contain a
/// NUL byte, so two words of at most 16 bytes are equal exactly when their keys are, and keys
/// order like the words themselves: comparing and hashing a word costs one integer operation.
fn pack(bytes: &[u8]) -> u128 {
    pack_concat(bytes, &[])
}

/// [`pack`] of `stem` followed by `suffix`, without building the concatenation.
fn pack_concat(stem: &[u8], suffix: &[u8]) -> u128 {
    let mut buffer = [0u8; KEY_BYTES];
    let n = stem.len().min(KEY_BYTES);
    if let (Some(to), Some(from)) = (buffer.get_mut(..n), stem.get(..n)) {
        to.copy_from_slice(from);
    }
    for (to, &from) in buffer.iter_mut().skip(n).zip(suffix) {
        *to = from;
    }
    u128::from_be_bytes(buffer)
}

/// A byte offset into a text or a [`Scan`] buffer, stored as `u32` to keep [`Word`] at 16
/// bytes. Texts are far below 4 GiB (the gRPC layer caps requests at megabytes); a larger
/// offset saturates, which can only mislabel words, never panic (every slice is checked).
fn offset(at: usize) -> u32 {
    u32::try_from(at).unwrap_or(u32::MAX)
}

/// A lowercased word of the input.
#[derive(Clone, Copy, Debug)]
struct Word {
    /// Byte range of the word in [`Scan::lower`].
    start: u32,
    end: u32,
    /// Byte offset of the word's first character in its source text: which sentence it is in.
    source: u32,
    /// Its lexicon flags ([`STOP`], [`GENERIC`], ...) and [`TOKEN`], [`EXPRESSIVE`], [`ASCII`].
    flags: u16,
    /// Whether punctuation separated it from the word before. The flag scopes negation ("not
    /// bad. great" must not negate "great") and keeps bigrams from spanning a comma ("ads,
    /// shuffle" is not a phrase).
    after_break: bool,
}

impl Word {
    fn is(&self, flag: u16) -> bool {
        self.flags & flag != 0
    }

    fn range(&self) -> Range<usize> {
        self.start as usize..self.end as usize
    }
}

/// Word flag: at least two characters and not a pure number ([`is_token`]).
const TOKEN: u16 = 1 << 8;
/// Word flag: a character repeated three times or more in a row ([`is_expressive`]).
const EXPRESSIVE: u16 = 1 << 9;
/// Word flag: the lowercased word is ASCII.
const ASCII: u16 = 1 << 10;

/// Zero bytes after each text's copy in [`Scan::lower`], so that the key of any word in it can
/// be read as one 16-byte load.
const PADDING: &str = "\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0\0";

/// The words of one or more texts, lowercased into one buffer: one allocation for all of them
/// instead of one per word.
///
/// The buffer holds each text whole, ASCII-lowercased (one pass the compiler vectorizes), so a
/// word of ASCII letters, digits and apostrophes (nearly all of them) is a range of it at its
/// source offset; only a word with other characters ("café", "don’t") gets its Unicode
/// lowercase form appended after the text.
#[derive(Default)]
struct Scan {
    lower: String,
    words: Vec<Word>,
}

impl Scan {
    /// A scan with room for `texts` texts of `bytes` bytes in all.
    fn with_capacity(bytes: usize, texts: usize) -> Self {
        Self {
            lower: String::with_capacity(bytes + (texts + 4) * PADDING.len()),
            words: Vec::with_capacity(bytes / 5),
        }
    }

    fn clear(&mut self) {
        self.lower.clear();
        self.words.clear();
    }

    fn text(&self, word: &Word) -> &str {
        self.lower.get(word.range()).unwrap_or_default()
    }

    /// [`pack`] of a range of the buffer: one 16-byte load and a mask when the padding is
    /// there, a copy otherwise.
    fn key(&self, range: Range<usize>) -> u128 {
        let bytes = self.lower.as_bytes();
        let len = range.end - range.start;
        match bytes
            .get(range.start..range.start + KEY_BYTES)
            .and_then(|window| <[u8; KEY_BYTES]>::try_from(window).ok())
        {
            Some(window) if len >= KEY_BYTES => u128::from_be_bytes(window),
            Some(window) if len > 0 => {
                u128::from_be_bytes(window) & !(u128::MAX >> (8 * len as u32))
            }
            _ => pack(bytes.get(range).unwrap_or_default()),
        }
    }

    /// Appends the words of `text` and returns their index range in [`Scan::words`]: every word
    /// is kept, even one-letter ones (sentiment needs "i like"). Apostrophes are kept only
    /// between two alphanumerics ("don't"); typographic apostrophes are folded to ASCII first so
    /// "don’t" and "don't" are one word. Whitespace, stray apostrophes and hyphens join words
    /// ("ad-free" reads as "ad free"); anything else (punctuation, emoji, symbols) ends a clause.
    fn push(&mut self, text: &str) -> Range<usize> {
        let lexicon = &*LEXICON;
        let first = self.words.len();
        let base = self.lower.len();
        self.lower.push_str(text);
        if let Some(copy) = self.lower.get_mut(base..) {
            copy.make_ascii_lowercase();
        }
        self.lower.push_str(PADDING);
        let bytes = text.as_bytes();
        let mut pending_break = false;
        let mut i = 0;
        while let Some(&byte) = bytes.get(i) {
            let (c, len) = if byte.is_ascii() {
                (char::from(byte), 1)
            } else {
                match char_at(text, i) {
                    Some(c) => (fold_apostrophe(c), c.len_utf8()),
                    None => break, // unreachable: `i` is always a character boundary
                }
            };
            if !c.is_alphanumeric() {
                // Not inside a word (a word's apostrophes are taken below, with the word).
                if !(c.is_whitespace() || c == '\'' || c == '-') {
                    pending_break = true;
                }
                i += len;
                continue;
            }
            let start = i;
            let mut simple = true;
            loop {
                while bytes.get(i).is_some_and(u8::is_ascii_alphanumeric) {
                    i += 1;
                }
                let Some(&next) = bytes.get(i) else { break };
                if next == b'\'' && is_alphanumeric_at(text, i + 1) {
                    i += 1;
                    continue;
                }
                if next.is_ascii() {
                    break;
                }
                let Some(c) = char_at(text, i) else { break };
                let continues = c.is_alphanumeric()
                    || (fold_apostrophe(c) == '\'' && is_alphanumeric_at(text, i + c.len_utf8()));
                if !continues {
                    break;
                }
                simple = false;
                i += c.len_utf8();
            }
            self.finish_word(lexicon, text, base, start..i, simple, pending_break);
            pending_break = false;
        }
        first..self.words.len()
    }

    /// Records the word at `source` in `text`, whose ASCII-lowercased copy starts at `base` in
    /// the buffer; a word that is not `simple` (ASCII alphanumerics and apostrophes) is
    /// lowercased character by character after the copy.
    fn finish_word(
        &mut self,
        lexicon: &Lexicon,
        text: &str,
        base: usize,
        source: Range<usize>,
        simple: bool,
        after_break: bool,
    ) {
        let range = if simple {
            base + source.start..base + source.end
        } else {
            let from = self.lower.len();
            for c in text.get(source.clone()).unwrap_or_default().chars() {
                match fold_apostrophe(c) {
                    '\'' => self.lower.push('\''),
                    c if c.is_ascii() => self.lower.push(c.to_ascii_lowercase()),
                    c => self.lower.extend(c.to_lowercase()),
                }
            }
            from..self.lower.len()
        };
        let word = self.lower.get(range.clone()).unwrap_or_default();
        let ascii = simple || word.is_ascii();
        let len = range.end - range.start;
        let key = self.key(range.clone());
        let mut flags = if len <= KEY_BYTES {
            lexicon.flags(key)
        } else {
            0
        };
        if ascii {
            flags |= ASCII;
        }
        if is_token(word, ascii) {
            flags |= TOKEN;
        }
        // No listed word has a triple letter (a test checks), so only unknown words are checked.
        let expressive = if flags & LISTED != 0 {
            false
        } else if ascii && len <= KEY_BYTES {
            has_triple(key, len)
        } else {
            is_expressive(word, ascii)
        };
        if expressive {
            flags |= EXPRESSIVE;
        }
        // Anything ending in "n't" negates, like the listed negators.
        if word.ends_with("n't") {
            flags |= NEGATOR;
        }
        self.words.push(Word {
            start: offset(range.start),
            end: offset(range.end),
            source: offset(source.start),
            flags,
            after_break,
        });
    }
}

/// Whether the word packed in `key` (ASCII, `len` bytes, at most 16) has a byte three times in
/// a row: [`is_expressive`] without a loop. Byte `i` of `k ^ (k << 8)` is zero where bytes `i`
/// and `i + 1` are equal, of `k ^ (k << 16)` where `i` and `i + 2` are; positions past
/// `len - 3` are forced non-zero, and the classic zero-byte test answers for all positions at
/// once.
fn has_triple(key: u128, len: usize) -> bool {
    if len < 3 {
        return false;
    }
    const ONES: u128 = u128::MAX / 0xFF;
    let differs = (key ^ (key << 8)) | (key ^ (key << 16));
    // The last 18 - len byte positions hold no triple start: mark them non-zero.
    let tail = 8 * (KEY_BYTES + 2 - len) as u32;
    let invalid = if tail >= 128 {
        u128::MAX
    } else {
        ONES & !(u128::MAX << tail)
    };
    let v = differs | invalid;
    (v.wrapping_sub(ONES) & !v & (ONES << 7)) != 0
}

fn char_at(text: &str, at: usize) -> Option<char> {
    text.get(at..)?.chars().next()
}

fn is_alphanumeric_at(text: &str, at: usize) -> bool {
    match text.as_bytes().get(at) {
        Some(byte) if byte.is_ascii() => byte.is_ascii_alphanumeric(),
        Some(_) => char_at(text, at).is_some_and(char::is_alphanumeric),
        None => false,
    }
}

fn fold_apostrophe(c: char) -> char {
    match c {
        '\u{2018}' | '\u{2019}' | '\u{02BC}' | '\u{FF07}' => '\'',
        other => other,
    }
}

/// Whether a scanned word is a token at all: at least two characters and not a pure number
/// (version numbers and prices carry no theme).
#[inline]
fn is_token(word: &str, ascii: bool) -> bool {
    if ascii {
        word.len() >= 2 && !word.bytes().all(|b| b.is_ascii_digit())
    } else {
        word.chars().nth(1).is_some() && !word.chars().all(char::is_numeric)
    }
}

/// Lowercased tokens of `text`: split on anything that is not a Unicode letter or digit, inner
/// apostrophes kept ("don't"), tokens shorter than two characters and pure numbers dropped.
///
/// Stop words are kept; use [`content_terms`] for the words that carry a topic.
pub fn tokenize(text: &str) -> Vec<String> {
    let mut scan = Scan::with_capacity(text.len(), 1);
    scan.push(text);
    scan.words
        .iter()
        .filter(|word| word.is(TOKEN))
        .map(|word| scan.text(word).to_owned())
        .collect()
}

/// English function words (about 220), plus contractions with and without the apostrophe
/// (reviews are typed on phones: "dont", "im", "cant") and chat fillers ("lol", "idk").
/// Negators are here too: they carry no topic, and the sentiment scorer reads them from the raw
/// word stream, not from content terms.
#[rustfmt::skip] // a sorted paragraph; one word per line would be a thousand lines
const STOP_WORDS: &[&str] = &[
    "a", "about", "above", "actually", "after", "again", "against", "ain't", "aint", "all",
    "almost", "along", "already", "also", "although", "always", "am", "among", "an", "and",
    "another", "any", "anybody", "anymore", "anyone", "anything", "anyway", "anyways", "are",
    "aren't", "arent", "around", "as", "at", "away", "back", "bc", "be", "became", "because",
    "become", "been", "before", "being", "below", "between", "both", "btw", "but", "by", "can",
    "can't", "cannot", "cant", "cos", "could", "could've", "couldn't", "couldnt", "coz", "cuz",
    "did", "didn't", "didnt", "do", "does", "doesn't", "doesnt", "doing", "don't", "done", "dont",
    "down", "during", "each", "either", "else", "enough", "etc", "even", "ever", "every",
    "everyone", "everything", "everytime", "few", "for", "from", "further", "gonna", "got", "gotta",
    "gotten", "had", "hadn't", "hadnt", "has", "hasn't", "hasnt", "have", "haven't", "havent",
    "having", "he", "he'd", "he'll", "he's", "her", "here", "here's", "hers", "herself", "him",
    "himself", "his", "how", "how's", "however", "i", "i'd", "i'll", "i'm", "i've", "idk", "ie",
    "if", "im", "in", "into", "is", "isn't", "isnt", "it", "it'd", "it'll", "it's", "its", "itself",
    "ive", "just", "let's", "lets", "lol", "lot", "lots", "many", "may", "maybe", "me", "might",
    "mine", "more", "most", "much", "must", "mustn't", "my", "myself", "neither", "never", "no",
    "nobody", "none", "nor", "not", "nothing", "now", "of", "off", "often", "oh", "ok", "okay",
    "omg", "on", "once", "one", "only", "or", "other", "others", "otherwise", "ought", "our",
    "ours", "ourselves", "out", "over", "own", "per", "perhaps", "please", "pls", "plz", "quite",
    "rather", "really", "said", "same", "say", "says", "see", "seem", "seems", "shall", "shan't",
    "she", "she'd", "she'll", "she's", "should", "should've", "shouldn't", "shouldnt", "since",
    "so", "some", "somebody", "someone", "something", "sometimes", "somewhat", "soon", "still",
    "such", "than", "that", "that's", "thats", "the", "their", "theirs", "them", "themselves",
    "then", "there", "there's", "theres", "these", "they", "they'd", "they'll", "they're",
    "they've", "theyre", "thing", "things", "this", "tho", "those", "though", "through", "thus",
    "till", "to", "too", "toward", "towards", "u", "under", "until", "up", "upon", "ur", "us",
    "very", "via", "wanna", "was", "wasn't", "wasnt", "we", "we'd", "we'll", "we're", "we've",
    "well", "were", "weren't", "werent", "what", "what's", "whatever", "whats", "when", "when's",
    "whenever", "where", "where's", "whether", "which", "while", "who", "who's", "whoever", "whole",
    "whom", "whose", "why", "why's", "will", "with", "within", "without", "won't", "wont", "would",
    "would've", "wouldn't", "wouldnt", "ya", "yeah", "yes", "yet", "you", "you'd", "you'll",
    "you're", "you've", "your", "youre", "yours", "yourself", "yourselves",
];

/// Words that occur in nearly every piece of feedback about a music app, or only grade it, and so
/// name no theme. Excluded from themes and from summary sentence vectors (never from sentiment).
///
/// - the product and its medium: "app", "spotify", "music", "song(s)", "track(s)": a theme list
///   that says "songs" tells a product team nothing; "playlist", "podcast", "lyrics" stay.
/// - generic verbs of use: "play", "listen", "use", "work" ("not working" is captured by
///   sentiment; the theme is whatever does not work).
/// - pure grades, emotions and review meta: "good", "love", "worst", "annoying", "favorite",
///   "star(s)": the sentiment already reports them, and in themes they crowd out topics.
///   Complaint words that name a topic ("ads", "expensive", "crash", "bug", "slow") are kept.
#[rustfmt::skip] // a sorted paragraph; one word per line would be a thousand lines
const GENERIC_WORDS: &[&str] = &[
    "amazing", "annoyed", "annoying", "app", "application", "applications", "apps", "awesome",
    "awful", "bad", "best", "better", "come", "comes", "cool", "day", "days", "disappointed",
    "disappointing", "excellent", "fantastic", "fav", "fave", "favorite", "favorites", "favourite",
    "favourites", "feel", "find", "fine", "frustrating", "gave", "get", "gets", "getting", "give",
    "glad", "go", "goes", "going", "good", "great", "happy", "hate", "hated", "horrible",
    "irritating", "keep", "keeps", "kept", "know", "let", "like", "liked", "likes", "listen",
    "listened", "listening", "listens", "love", "loved", "loves", "loving", "made", "make", "makes",
    "making", "music", "need", "needed", "needs", "new", "nice", "people", "perfect", "play",
    "played", "playing", "plays", "pretty", "rate", "rating", "review", "reviews", "song", "songs",
    "spotify", "star", "stars", "suck", "sucks", "super", "take", "takes", "terrible", "thank",
    "thanks", "think", "time", "times", "track", "tracks", "tried", "try", "trying", "use", "used",
    "useful", "useless", "user", "users", "uses", "using", "want", "wanted", "wants", "way", "went",
    "wonderful", "work", "worked", "working", "works", "worse", "worst", "wow", "year", "years",
];

/// Lexicon flag: an English stop word ([`STOP_WORDS`]).
const STOP: u16 = 1;
/// Lexicon flag: a domain-generic word ([`GENERIC_WORDS`]).
const GENERIC: u16 = 1 << 1;
/// Lexicon flag: a positive opinion word ([`POSITIVE_WORDS`]).
const POSITIVE: u16 = 1 << 2;
/// Lexicon flag: a negative opinion word ([`NEGATIVE_WORDS`]).
const NEGATIVE: u16 = 1 << 3;
/// Lexicon flag: a negator ([`NEGATORS`]).
const NEGATOR: u16 = 1 << 4;
/// Lexicon flag: a word after which "like" is a verb ([`LIKE_OPENERS`]).
const LIKE_OPENER: u16 = 1 << 5;
/// Lexicon flag: a spelling that [`synonym`] folds.
const SYNONYM: u16 = 1 << 6;
/// Lexicon flag: the word "like", whose polarity depends on the word before it.
const LIKE: u16 = 1 << 7;
/// Every lexicon flag: the word is in some list.
const LISTED: u16 = 0xFF;

/// The spellings [`synonym`] folds onto "ads" (kept in step with it by a test).
const AD_SYNONYMS: &[&str] = &[
    "advert",
    "adverts",
    "advertisement",
    "advertisements",
    "advertising",
    "commercial",
    "commercials",
];

/// Slots of the lexicon table, a power of two about three times the number of words, so that a
/// lookup, hit or miss, almost always reads one or two slots.
const LEXICON_SLOTS: usize = 2048;

/// Every static word list in one open-addressing table of packed keys, each with the flags of
/// the lists it is in: one lookup per word of the input answers "stop word? generic? positive?
/// negative? negator?" at once. The table is fixed, so input cannot lengthen its probe
/// sequences: a miss stops at the first empty slot of a table built from these lists.
struct Lexicon {
    keys: Vec<u128>,
    flags: Vec<u16>,
}

impl Lexicon {
    fn new() -> Self {
        let mut lexicon = Self {
            keys: vec![0; LEXICON_SLOTS],
            flags: vec![0; LEXICON_SLOTS],
        };
        let lists = [
            (STOP_WORDS, STOP),
            (GENERIC_WORDS, GENERIC),
            (POSITIVE_WORDS, POSITIVE),
            (NEGATIVE_WORDS, NEGATIVE),
            (NEGATORS, NEGATOR),
            (LIKE_OPENERS, LIKE_OPENER),
            (AD_SYNONYMS, SYNONYM),
            (&["like"], LIKE),
        ];
        for (list, flag) in lists {
            for word in list {
                lexicon.insert(pack(word.as_bytes()), flag);
            }
        }
        lexicon
    }

    fn slot(key: u128) -> usize {
        // Fibonacci hashing of the key folded to 64 bits: words up to 8 bytes (most of them)
        // differ in the high half, which the multiplication spreads over the top bits.
        let folded = ((key >> 64) as u64) ^ (key as u64).rotate_left(29);
        (folded.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - LEXICON_SLOTS.trailing_zeros()))
            as usize
    }

    fn insert(&mut self, key: u128, flag: u16) {
        let mut slot = Self::slot(key);
        loop {
            match self.keys.get(slot) {
                Some(&0) => {
                    self.keys[slot] = key;
                    self.flags[slot] = flag;
                    return;
                }
                Some(&existing) if existing == key => {
                    self.flags[slot] |= flag;
                    return;
                }
                _ => slot = (slot + 1) % LEXICON_SLOTS,
            }
        }
    }

    /// The flags of the word whose key is `key` (0 when it is in no list). The word must be at
    /// most [`KEY_BYTES`] long: a longer word's key is only its prefix.
    fn flags(&self, key: u128) -> u16 {
        let mut slot = Self::slot(key);
        loop {
            match self.keys.get(slot) {
                Some(&existing) if existing == key => return self.flags[slot],
                Some(&0) | None => return 0,
                Some(_) => slot = (slot + 1) % LEXICON_SLOTS,
            }
        }
    }

    /// The flags of `word` (lowercase).
    fn word_flags(&self, word: &str) -> u16 {
        // A NUL byte would pack like the padding ("the\0" like "the"); scanned words have none.
        if word.is_empty() || word.len() > KEY_BYTES || word.as_bytes().contains(&0) {
            return 0;
        }
        self.flags(pack(word.as_bytes()))
    }
}

static LEXICON: LazyLock<Lexicon> = LazyLock::new(Lexicon::new);

/// Whether `token` (lowercase) is an English stop word.
pub fn is_stop_word(token: &str) -> bool {
    LEXICON.word_flags(token) & STOP != 0
}

/// Whether `token` (lowercase) is a domain-generic word of app feedback that names no theme
/// (see the list's documentation for what is in it and why).
pub fn is_generic_word(token: &str) -> bool {
    LEXICON.word_flags(token) & GENERIC != 0
}

/// A content term: the topic-bearing form of a word, and its [`pack`] key.
#[derive(Clone, Copy, Debug)]
struct TermText<'s> {
    text: &'s str,
    key: u128,
}

/// The topic-bearing form of a scanned word, or `None` if it carries no topic. A possessive
/// "'s" is dropped ("spotify's" is "spotify", which is then generic).
#[inline]
fn content_term<'s>(scan: &'s Scan, word: &Word) -> Option<TermText<'s>> {
    let text = scan.text(word);
    if word.is(STOP) || !word.is(TOKEN) || word.is(EXPRESSIVE) {
        return None;
    }
    let (base, flags) = match text.strip_suffix("'s") {
        Some(base) => {
            if !is_token(base, word.is(ASCII)) {
                return None;
            }
            (base, LEXICON.word_flags(base))
        }
        None => (text, word.flags),
    };
    if flags & (STOP | GENERIC) != 0 {
        return None;
    }
    let folded = if flags & SYNONYM != 0 {
        synonym(base)
    } else {
        None
    };
    Some(match folded {
        Some(text) => TermText {
            text,
            key: pack(text.as_bytes()),
        },
        None if base.len() == text.len() => TermText {
            text,
            key: scan.key(word.range()),
        },
        None => TermText {
            text: base,
            key: pack(base.as_bytes()),
        },
    })
}

/// Spellings with a letter repeated three times or more ("yasss", "soooo", "awohoooo") are
/// exclamations, not topics; no English word has such a run.
fn is_expressive(word: &str, ascii: bool) -> bool {
    if ascii {
        return word
            .as_bytes()
            .windows(3)
            .any(|w| w[0] == w[1] && w[1] == w[2]);
    }
    let mut run = 0;
    let mut previous = None;
    for c in word.chars() {
        run = if previous == Some(c) { run + 1 } else { 1 };
        if run >= 3 {
            return true;
        }
        previous = Some(c);
    }
    false
}

/// Unambiguous synonyms of one theme in app feedback, folded so that "Way too many
/// advertisements" and "Too many ads" count as the same theme. Ambiguous spellings ("adds") are
/// deliberately left alone.
fn synonym(term: &str) -> Option<&'static str> {
    match term {
        "advert" | "adverts" | "advertisement" | "advertisements" | "advertising"
        | "commercial" | "commercials" => Some("ads"),
        _ => None,
    }
}

/// The topic-bearing terms of `text`, in order: [`tokenize`] minus stop words and
/// domain-generic words, possessive "'s" removed. No stemming is applied here; plural folding
/// needs a corpus (see [`theme_keywords`]).
pub fn content_terms(text: &str) -> Vec<String> {
    let mut scan = Scan::with_capacity(text.len(), 1);
    scan.push(text);
    scan.words
        .iter()
        .filter_map(|word| content_term(&scan, word))
        .map(|term| term.text.to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Corpus: the content terms of a set of texts, interned
// ---------------------------------------------------------------------------------------------

/// One occurrence of a content term.
#[derive(Clone, Copy, Debug)]
struct Occurrence<'s> {
    term: TermText<'s>,
    /// Byte offset of its word in the source text.
    source: usize,
    /// Whether it directly follows the previous content term (same clause, no stop word in
    /// between), which is what makes two terms a candidate phrase.
    joined: bool,
}

/// One text of a [`Corpus`].
struct Document {
    /// Its words, in [`Scan::words`].
    words: Range<usize>,
    /// Its content terms, in [`Corpus::occurrences`] and [`Corpus::ids`].
    terms: Range<usize>,
}

/// The content terms of some scanned texts, interned: `vocab` holds every distinct term once,
/// in string order, and `ids[i]` is the index in `vocab` of occurrence `i`. Everything after
/// this works on dense ids: vectors instead of maps keyed by words.
struct Corpus<'s> {
    scan: &'s Scan,
    documents: Vec<Document>,
    occurrences: Vec<Occurrence<'s>>,
    ids: Vec<usize>,
    vocab: Vec<TermText<'s>>,
    /// [`variant_ids`] of the whole vocabulary.
    canonical: Vec<usize>,
}

impl<'s> Corpus<'s> {
    /// The corpus of `documents`, each a range of [`Scan::words`] returned by [`Scan::push`].
    fn new(scan: &'s Scan, documents: &[Range<usize>]) -> Self {
        let mut occurrences = Vec::with_capacity(scan.words.len() / 2);
        let documents = documents
            .iter()
            .map(|words| {
                let first = occurrences.len();
                let mut previous_was_content = false;
                for word in scan.words.get(words.clone()).unwrap_or_default() {
                    match content_term(scan, word) {
                        Some(term) => {
                            occurrences.push(Occurrence {
                                term,
                                source: word.source as usize,
                                joined: previous_was_content && !word.after_break,
                            });
                            previous_was_content = true;
                        }
                        None => previous_was_content = false,
                    }
                }
                Document {
                    words: words.clone(),
                    terms: first..occurrences.len(),
                }
            })
            .collect();
        let (ids, vocab) = intern(occurrences.iter().map(|occurrence| occurrence.term));
        let canonical = variant_ids(&vocab, None);
        Self {
            scan,
            documents,
            occurrences,
            ids,
            vocab,
            canonical,
        }
    }

    fn words(&self, document: &Document) -> &'s [Word] {
        self.scan
            .words
            .get(document.words.clone())
            .unwrap_or_default()
    }
}

/// The total order of terms, which is the order of their text: keys order like the text
/// whenever they differ ([`pack`]); equal keys of equal length up to [`KEY_BYTES`] are equal
/// texts, and anything else (a long word, a NUL byte in a theme string) compares the text.
fn term_order(a: &TermText<'_>, b: &TermText<'_>) -> Ordering {
    a.key.cmp(&b.key).then_with(|| {
        if a.text.len() == b.text.len() && a.text.len() <= KEY_BYTES {
            Ordering::Equal
        } else {
            a.text.cmp(b.text)
        }
    })
}

/// Dense ids for `terms`: one per term, indexing the returned vocabulary of distinct terms in
/// string order. Interning by sorting costs O(n log n) whatever the input, where a map keyed
/// by input words with a cheap hash could be flooded with collisions.
fn intern<'s>(terms: impl Iterator<Item = TermText<'s>>) -> (Vec<usize>, Vec<TermText<'s>>) {
    let mut order: Vec<(TermText<'s>, usize)> = terms.zip(0..).collect();
    order.sort_unstable_by(|a, b| term_order(&a.0, &b.0));
    let mut ids = vec![0; order.len()];
    let mut vocab: Vec<TermText<'s>> = Vec::with_capacity(order.len());
    for (term, at) in order {
        if vocab
            .last()
            .is_none_or(|last| term_order(last, &term) != Ordering::Equal)
        {
            vocab.push(term);
        }
        if let Some(id) = ids.get_mut(at) {
            *id = vocab.len() - 1;
        }
    }
    (ids, vocab)
}

// ---------------------------------------------------------------------------------------------
// Corpus-checked variant folding
// ---------------------------------------------------------------------------------------------

/// The id of `stem` + `suffix` in `vocab` if it is there and `present`, and has at least two
/// characters (`suffix` is ASCII).
fn find_candidate(
    vocab: &[TermText<'_>],
    present: Option<&[bool]>,
    stem: &str,
    suffix: &str,
) -> Option<usize> {
    if stem.chars().take(2).count() + suffix.len() < 2 {
        return None;
    }
    let length = stem.len() + suffix.len();
    let key = pack_concat(stem.as_bytes(), suffix.as_bytes());
    let id = vocab
        .binary_search_by(|term| {
            term.key.cmp(&key).then_with(|| {
                if term.text.len() == length && length <= KEY_BYTES {
                    Ordering::Equal
                } else {
                    term.text.bytes().cmp(stem.bytes().chain(suffix.bytes()))
                }
            })
        })
        .ok()?;
    present
        .is_none_or(|present| present.get(id).copied().unwrap_or(false))
        .then_some(id)
}

/// The first candidate base form of `term` found in `vocab`, trying the most specific first.
/// Suffix rules alone mangle words ("this", "bus", "news"); they are safe here because a
/// candidate only counts if it occurs in the same corpus.
fn find_base(vocab: &[TermText<'_>], present: Option<&[bool]>, term: &str) -> Option<usize> {
    // Every rule below strips a suffix ending in "s", "g" or "d": most terms have none.
    if !matches!(term.as_bytes().last(), Some(b's' | b'g' | b'd')) {
        return None;
    }
    let find = |stem: &str, suffix: &str| find_candidate(vocab, present, stem, suffix);
    let len = term.chars().count();
    if len > 4
        && let Some(stem) = term.strip_suffix("ies")
        && let Some(id) = find(stem, "y")
    {
        return Some(id);
    }
    if let Some(stem) = term.strip_suffix("es")
        && let Some(id) = find(stem, "")
    {
        return Some(id);
    }
    if !term.ends_with("ss")
        && let Some(stem) = term.strip_suffix('s')
        && let Some(id) = find(stem, "")
    {
        return Some(id);
    }
    // Verb forms: "crashing"/"crashed" -> "crash", "updated" -> "update", "stopped" -> "stop".
    for suffix in ["ing", "ed"] {
        if len >= suffix.len() + 3
            && let Some(stem) = term.strip_suffix(suffix)
        {
            if let Some(id) = find(stem, "").or_else(|| find(stem, "e")) {
                return Some(id);
            }
            let mut chars = stem.chars().rev();
            if let (Some(last), Some(before)) = (chars.next(), chars.next())
                && last == before
                && !"aeiou".contains(last)
                && let Some(undoubled) = stem.get(..stem.len() - last.len_utf8())
                && let Some(id) = find(undoubled, "")
            {
                return Some(id);
            }
        }
    }
    if len > 4
        && let Some(stem) = term.strip_suffix("ied")
        && let Some(id) = find(stem, "y")
    {
        return Some(id);
    }
    None
}

/// For each term of `vocab` (only those `present`, when given), the id of its base form if
/// that base form is also in the corpus ("ads" -> "ad" only when "ad" occurs too), else its own
/// id. Applied transitively, at most three steps, so "updates" and "updated" both reach
/// "update".
fn variant_ids(vocab: &[TermText<'_>], present: Option<&[bool]>) -> Vec<usize> {
    (0..vocab.len())
        .map(|id| {
            if present.is_some_and(|present| !present.get(id).copied().unwrap_or(false)) {
                id
            } else {
                base_of(vocab, present, id)
            }
        })
        .collect()
}

/// The end of the chain of base forms of term `id` (see [`variant_ids`]).
fn base_of(vocab: &[TermText<'_>], present: Option<&[bool]>, id: usize) -> usize {
    let mut current = id;
    for _ in 0..3 {
        match vocab
            .get(current)
            .and_then(|term| find_base(vocab, present, term.text))
        {
            Some(base) => current = base,
            None => break,
        }
    }
    current
}

// ---------------------------------------------------------------------------------------------
// Theme keywords
// ---------------------------------------------------------------------------------------------

/// Runs of content terms longer than this are not phrases but unfiltered text (typically a
/// language the stop-word list does not know), so the degree is capped.
const MAX_DEGREE: u32 = 3;

/// Share of a document's words that are English stop words (one-letter "i" and "a" included:
/// they are the surest sign of English), at least 0.05: about half in English prose, near zero
/// in a one-word review ("PP"), a run of exclamations or another language.
fn prose_share(words: &[Word]) -> f64 {
    let stops = words.iter().filter(|word| word.is(STOP)).count();
    if words.is_empty() {
        return MIN_PROSE_SHARE;
    }
    (stops as f64 / words.len() as f64).clamp(MIN_PROSE_SHARE, 1.0)
}

/// Floor of [`prose_share`], so terms of non-prose documents still order among themselves.
const MIN_PROSE_SHARE: f64 = 0.05;

/// Document-level statistics of one canonical term or phrase.
#[derive(Clone, Copy, Debug, Default)]
struct PhraseStats {
    /// Documents mentioning it.
    df: u32,
    /// Tie-break weight among equal `df`, summed over documents (see [`theme_keywords`]).
    weight: f64,
}

impl PhraseStats {
    /// Adds one document's occurrences, given as their run lengths.
    fn add_document(&mut self, runs: impl Iterator<Item = u32>, prose: f64) {
        let (mut tf, mut degree) = (0u32, 1u32);
        for (i, run) in runs.enumerate() {
            tf += 1;
            degree = if i == 0 { run } else { degree.max(run) };
        }
        self.df += 1;
        let degree = f64::from(degree.min(MAX_DEGREE));
        self.weight += (1.0 + f64::from(tf).ln()) * degree * prose;
    }
}

/// An adjacent pair of content terms with different keys: (key pair, document, surface pair,
/// run length).
type PhraseOccurrence = ((usize, usize), usize, (usize, usize), u32);

/// A theme candidate's display text as vocabulary ids: a term, or the two terms of a phrase.
/// Words contain no byte at or below the space, so comparing these ids in order compares the
/// displayed texts ("a" < "a b" < "ab").
type Label = (usize, Option<usize>);

impl Corpus<'_> {
    /// [`theme_keywords`] of the corpus's documents.
    fn themes(&self, k: usize) -> Vec<String> {
        if k == 0 || self.vocab.is_empty() {
            return Vec::new();
        }
        let canonical = &self.canonical;

        // (key, document, surface, run) of every occurrence, and (key pair, document, surface
        // pair, run) of every adjacent pair of different keys in one run. Sorted, each key's
        // occurrences are grouped by document, documents in input order.
        let mut prose = Vec::with_capacity(self.documents.len());
        let mut unigrams: Vec<(usize, usize, usize, u32)> = Vec::with_capacity(self.ids.len());
        let mut bigrams: Vec<PhraseOccurrence> = Vec::with_capacity(self.ids.len());
        for (document, doc) in self.documents.iter().enumerate() {
            let terms = self.occurrences.get(doc.terms.clone()).unwrap_or_default();
            let ids = self.ids.get(doc.terms.clone()).unwrap_or_default();
            prose.push(if terms.is_empty() {
                MIN_PROSE_SHARE
            } else {
                prose_share(self.words(doc))
            });
            let mut start = 0;
            for end in 1..=terms.len() {
                if terms.get(end).is_some_and(|term| term.joined) {
                    continue;
                }
                let run = u32::try_from(end - start).unwrap_or(u32::MAX);
                let mut previous: Option<(usize, usize)> = None;
                for &id in ids.get(start..end).unwrap_or_default() {
                    let key = canonical[id];
                    unigrams.push((key, document, id, run));
                    // ("ads ads" is emphasis, not a phrase.)
                    if let Some((previous_key, previous_id)) = previous
                        && previous_key != key
                    {
                        bigrams.push(((previous_key, key), document, (previous_id, id), run));
                    }
                    previous = Some((key, id));
                }
                start = end;
            }
        }
        unigrams.sort_unstable();
        bigrams.sort_unstable();

        let mut single = vec![PhraseStats::default(); self.vocab.len()];
        let mut surface_documents = vec![0u32; self.vocab.len()];
        let mut candidates: Vec<(PhraseStats, Label)> =
            Vec::with_capacity(self.vocab.len() + bigrams.len());
        let mut single_at: Vec<Option<usize>> = vec![None; self.vocab.len()];
        for group in unigrams.chunk_by(|a, b| a.0 == b.0) {
            let Some(&(key, ..)) = group.first() else {
                continue;
            };
            let mut stats = PhraseStats::default();
            for in_document in group.chunk_by(|a, b| a.1 == b.1) {
                let Some(&(_, document, ..)) = in_document.first() else {
                    continue;
                };
                let share = prose.get(document).copied().unwrap_or(MIN_PROSE_SHARE);
                stats.add_document(in_document.iter().map(|o| o.3), share);
                // Each surface form counts once per document (the group is sorted by surface).
                let mut previous = None;
                for &(_, _, surface, _) in in_document {
                    if previous != Some(surface) {
                        surface_documents[surface] += 1;
                        previous = Some(surface);
                    }
                }
            }
            // The surface form most documents used; the smallest among equals.
            let display = group
                .iter()
                .map(|o| o.2)
                .max_by(|&a, &b| {
                    surface_documents[a]
                        .cmp(&surface_documents[b])
                        .then_with(|| b.cmp(&a))
                })
                .unwrap_or(key);
            single[key] = stats;
            single_at[key] = Some(candidates.len());
            candidates.push((stats, (display, None)));
        }

        // Phrases in at least two documents; a single term the phrase covers in at least two
        // thirds of its documents is absorbed by it.
        let mut absorbed = vec![false; self.vocab.len()];
        let mut surfaces: Vec<((usize, usize), u32)> = Vec::new();
        for group in bigrams.chunk_by(|a, b| a.0 == b.0) {
            let Some(&((first, second), ..)) = group.first() else {
                continue;
            };
            let mut stats = PhraseStats::default();
            surfaces.clear();
            for in_document in group.chunk_by(|a, b| a.1 == b.1) {
                let Some(&(_, document, ..)) = in_document.first() else {
                    continue;
                };
                let share = prose.get(document).copied().unwrap_or(MIN_PROSE_SHARE);
                stats.add_document(in_document.iter().map(|o| o.3), share);
                let mut previous = None;
                for &(_, _, surface, _) in in_document {
                    if previous == Some(surface) {
                        continue;
                    }
                    previous = Some(surface);
                    match surfaces.iter_mut().find(|(s, _)| *s == surface) {
                        Some((_, count)) => *count += 1,
                        None => surfaces.push((surface, 1)),
                    }
                }
            }
            if stats.df < 2 {
                continue;
            }
            for part in [first, second] {
                if 3 * stats.df >= 2 * single[part].df {
                    absorbed[part] = true;
                }
            }
            if let Some(&((a, b), _)) = surfaces
                .iter()
                .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
            {
                candidates.push((stats, (a, Some(b))));
            }
        }
        for (key, at) in single_at.iter().enumerate() {
            if absorbed[key]
                && let Some(candidate) = at.and_then(|at| candidates.get_mut(at))
            {
                candidate.0.df = 0; // marks it for removal: a candidate has df >= 1
            }
        }
        candidates.retain(|(stats, _)| stats.df > 0);

        // Document frequency, then weight, then alphabetical: a total order.
        let order = |a: &(PhraseStats, Label), b: &(PhraseStats, Label)| {
            b.0.df
                .cmp(&a.0.df)
                .then_with(|| b.0.weight.total_cmp(&a.0.weight))
                .then_with(|| a.1.cmp(&b.1))
        };
        if candidates.len() > k {
            candidates.select_nth_unstable_by(k - 1, order);
            candidates.truncate(k);
        }
        candidates.sort_unstable_by(order);
        let text = |id: usize| self.vocab.get(id).map_or("", |term| term.text);
        candidates
            .iter()
            .map(|&(_, (first, second))| match second {
                None => text(first).to_owned(),
                Some(second) => format!("{} {}", text(first), text(second)),
            })
            .collect()
    }
}

/// The `k` most salient theme terms of `documents`, most salient first.
///
/// Ranking, each step only breaking ties of the one before:
/// 1. document frequency (how many entries mention the term): a theme is what many users talk
///    about, not what one user repeats;
/// 2. a TF-IDF-style weight summed over the documents: sublinear term frequency `1 + ln tf`,
///    times the term's RAKE degree (the length, capped at 3, of the run of adjacent content
///    terms it occurs in: words inside "student discount" or "search option" are likelier feature
///    names than a lone word), times the document's share of English stop words (junk one-word
///    reviews and text in languages the lists do not cover weigh little). The "IDF" side is the
///    stop-word and generic-word lists: a chunk of five entries is too small to estimate rarity;
/// 3. alphabetical, so the order is total and deterministic.
///
/// Variants are folded only when the base form occurs in the same documents ("ads" + "ad",
/// "crashes" + "crashing" + "crash"), plus a few unambiguous synonyms ("advertisements" is
/// "ads"); the form most documents used is shown.
///
/// Phrases: two content terms adjacent in the same clause in at least two documents form a
/// candidate bigram ("offline mode"). A single term that the bigram covers in at least two thirds
/// of its documents is replaced by the bigram, so "mode" does not appear beside "offline mode".
pub fn theme_keywords<S: AsRef<str>>(documents: &[S], k: usize) -> Vec<String> {
    if k == 0 {
        return Vec::new();
    }
    let bytes = documents.iter().map(|doc| doc.as_ref().len()).sum();
    let mut scan = Scan::with_capacity(bytes, documents.len());
    let ranges: Vec<Range<usize>> = documents
        .iter()
        .map(|doc| scan.push(doc.as_ref()))
        .collect();
    Corpus::new(&scan, &ranges).themes(k)
}

/// Canonical keys for already-extracted theme strings (possibly phrases), folding case and
/// variants across the whole list: used when merging themes from several chunks, where one chunk
/// said "ads", another "ad" and a remote model "Ads". Returns one key per input theme, in input
/// order.
pub fn theme_keys<S: AsRef<str>>(themes: &[S]) -> Vec<String> {
    let mut lower = String::new();
    let mut words: Vec<Range<usize>> = Vec::new();
    let mut per_theme: Vec<Range<usize>> = Vec::with_capacity(themes.len());
    for theme in themes {
        let first = words.len();
        for word in theme.as_ref().split_whitespace() {
            let start = lower.len();
            if word.is_ascii() {
                lower.extend(word.bytes().map(|b| char::from(b.to_ascii_lowercase())));
            } else {
                lower.push_str(&word.to_lowercase());
            }
            words.push(start..lower.len());
        }
        per_theme.push(first..words.len());
    }
    let terms = words.iter().map(|range| {
        let text = lower.get(range.clone()).unwrap_or_default();
        TermText {
            text,
            key: pack(text.as_bytes()),
        }
    });
    let (ids, vocab) = intern(terms);
    let canonical = variant_ids(&vocab, None);
    per_theme
        .into_iter()
        .map(|range| {
            let mut key = String::new();
            for (n, &id) in ids.get(range).unwrap_or_default().iter().enumerate() {
                if n > 0 {
                    key.push(' ');
                }
                key.push_str(vocab.get(canonical[id]).map_or("", |term| term.text));
            }
            key
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Sentences and word budgets
// ---------------------------------------------------------------------------------------------

/// Sentences shorter than this many words ("Great app.", "Excellent") say nothing extractable.
pub const MIN_SENTENCE_WORDS: usize = 3;

fn is_terminator(c: char) -> bool {
    matches!(c, '.' | '!' | '?' | '…' | '。' | '！' | '？')
}

fn is_closer(c: char) -> bool {
    matches!(c, '"' | '\'' | ')' | ']' | '”' | '’' | '»')
}

/// Calls `segment(start, end)` with the byte range of every raw sentence of `text`, in order,
/// empty ones included (see [`split_sentences`] for the rules). A word never spans two
/// segments: every boundary follows a terminator, a closer after one, or a line break.
fn sentence_spans(text: &str, mut segment: impl FnMut(usize, usize)) {
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut i = 0;
    while let Some(&byte) = bytes.get(i) {
        let len = match byte {
            b'\n' | b'\r' => {
                segment(start, i);
                start = i + 1;
                i += 1;
                continue;
            }
            b'.' if i > 0
                && bytes.get(i - 1).is_some_and(u8::is_ascii_digit)
                && bytes.get(i + 1).is_some_and(u8::is_ascii_digit) =>
            {
                i += 1; // a decimal point: "version 8.6.0"
                continue;
            }
            b'.' | b'!' | b'?' => 1,
            _ if byte.is_ascii() => {
                i += 1;
                continue;
            }
            _ => match char_at(text, i) {
                Some(c) if is_terminator(c) => c.len_utf8(),
                Some(c) => {
                    i += c.len_utf8();
                    continue;
                }
                None => break, // unreachable: `i` is always a character boundary
            },
        };
        // Take the whole run "?!..." and any closing quote or bracket with the sentence.
        let mut end = i + len;
        while let Some(c) = char_at(text, end)
            && (is_terminator(c) || is_closer(c))
        {
            end += c.len_utf8();
        }
        segment(start, end);
        start = end;
        i = end;
    }
    segment(start, bytes.len());
}

/// Splits `text` into sentences on `.`, `!`, `?` (and `…`, CJK full stops) and on line breaks.
/// The terminator stays with its sentence ("Too many ads!!"); a `.` between two digits is not a
/// boundary ("version 8.6.0"). Each sentence is trimmed, inner whitespace collapsed to single
/// spaces, and only sentences of at least [`MIN_SENTENCE_WORDS`] words are kept.
pub fn split_sentences(text: &str) -> Vec<String> {
    let mut sentences = Vec::new();
    sentence_spans(text, |start, end| {
        let segment = text.get(start..end).unwrap_or_default();
        if word_count(segment) >= MIN_SENTENCE_WORDS {
            let mut sentence = String::with_capacity(segment.len());
            push_normalized(&mut sentence, segment);
            sentences.push(sentence);
        }
    });
    sentences
}

/// Appends `text` trimmed, with each run of whitespace inside it collapsed to one space.
fn push_normalized(out: &mut String, text: &str) {
    for (n, word) in text.split_whitespace().enumerate() {
        if n > 0 {
            out.push(' ');
        }
        out.push_str(word);
    }
}

/// Whether the ASCII byte `byte` is whitespace as [`char::is_whitespace`] (and so
/// [`str::split_whitespace`]) defines it: tab, line feed, vertical tab, form feed, carriage
/// return and space. Branch-free, for the byte loops below.
fn is_ascii_space(byte: u8) -> bool {
    const SPACES: u64 = (0b11111 << 9) | (1 << 32);
    byte < 64 && (SPACES >> byte) & 1 == 1
}

/// Whether the character at byte `at` of `text` is whitespace, and its length in bytes: the
/// byte itself when it is ASCII, a decoded character otherwise.
fn space_at(text: &str, at: usize) -> (bool, usize) {
    match text.as_bytes().get(at) {
        Some(&byte) if byte.is_ascii() => (is_ascii_space(byte), 1),
        _ => char_at(text, at).map_or((false, 1), |c| (c.is_whitespace(), c.len_utf8())),
    }
}

/// Number of whitespace-separated words in `text`: what a reader counts, and what `max_words`
/// limits.
pub fn word_count(text: &str) -> usize {
    if !text.is_ascii() {
        return text.split_whitespace().count();
    }
    // A word starts at each non-space byte after a space (or at the start).
    let mut count = 0;
    let mut after_space = true;
    for &byte in text.as_bytes() {
        let space = is_ascii_space(byte);
        count += usize::from(after_space & !space);
        after_space = space;
    }
    count
}

/// `text` cut to at most `max_words` words. Unchanged (trimmed) when it fits; otherwise cut at a
/// word boundary, trailing `,;:` dropped and `…` appended to the last kept word, so the result
/// has exactly `max_words` words. Whitespace inside the kept part is preserved (paragraphs of a
/// model's answer survive). `max_words == 0` gives an empty string.
pub fn truncate_words(text: &str, max_words: usize) -> String {
    if max_words == 0 {
        return String::new();
    }
    let mut words = 0;
    let mut in_word = false;
    let mut end_of_last_word = 0;
    let mut i = 0;
    while i < text.len() {
        let (space, len) = space_at(text, i);
        i += len;
        if space {
            in_word = false;
            continue;
        }
        if !in_word {
            if words == max_words {
                return with_ellipsis(text.get(..end_of_last_word).unwrap_or_default().trim());
            }
            words += 1;
            in_word = true;
        }
        end_of_last_word = i;
    }
    text.trim().to_owned()
}

/// `kept` (non-empty, trimmed) with trailing `,;:` dropped and "…" appended.
fn with_ellipsis(kept: &str) -> String {
    let stripped = kept.trim_end_matches([',', ';', ':']);
    // If the last word was nothing but separators, dropping them would lose a word: keep it.
    let kept = if stripped.is_empty() || stripped.ends_with(char::is_whitespace) {
        kept
    } else {
        stripped
    };
    format!("{kept}…")
}

// ---------------------------------------------------------------------------------------------
// Extractive summary: TF-IDF centroid + MMR
// ---------------------------------------------------------------------------------------------

/// Limits of an extractive summary.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SummaryLimits {
    /// Words at most; never exceeded.
    pub max_words: usize,
    /// Sentences at most.
    pub max_sentences: usize,
}

/// MMR trade-off between closeness to the centroid and novelty. 0.7, the textbook setting, was
/// measured too weak for review chunks: when four of five reviews mention ads, the centroid is
/// mostly "ads" and every pick stayed on ads while shuffle, offline and price complaints were
/// lost. 0.6 still takes the most central sentence first but lets a second topic in.
const MMR_LAMBDA: f64 = 0.6;

/// Cosine above which a candidate is a near-duplicate of a chosen sentence: reviews repeat each
/// other verbatim ("Too many ads"), and MMR alone would still take the copy of a very central one.
const NEAR_DUPLICATE: f64 = 0.9;

/// Below this, a cosine is treated as zero (no shared content term).
const EPSILON: f64 = 1e-9;

/// Dot product of two sparse vectors, each sorted by term id.
fn sparse_dot(a: &[(usize, f64)], b: &[(usize, f64)]) -> f64 {
    let (mut i, mut j, mut sum) = (0, 0, 0.0);
    while let (Some(&(ta, wa)), Some(&(tb, wb))) = (a.get(i), b.get(j)) {
        match ta.cmp(&tb) {
            Ordering::Less => i += 1,
            Ordering::Greater => j += 1,
            Ordering::Equal => {
                sum += wa * wb;
                i += 1;
                j += 1;
            }
        }
    }
    sum
}

/// A candidate sentence of an extractive summary, within a [`Corpus`].
struct Sentence {
    /// Its content terms, in [`Corpus::ids`].
    terms: Range<usize>,
    /// Its [`word_count`].
    words: usize,
    /// The corpus document it is in, and its byte range in that document's text.
    document: usize,
    bytes: Range<usize>,
}

/// L2-normalized TF-IDF vectors of sentences, stored flat: sentence `i` is
/// `entries[bounds[i].clone()]`, (term id, weight) sorted by term id.
struct SentenceVectors {
    entries: Vec<(usize, f64)>,
    bounds: Vec<Range<usize>>,
    terms: usize,
}

impl SentenceVectors {
    fn get(&self, sentence: usize) -> &[(usize, f64)] {
        self.bounds
            .get(sentence)
            .and_then(|range| self.entries.get(range.clone()))
            .unwrap_or_default()
    }
}

/// What [`select_sentences`] chose.
#[derive(Debug, PartialEq, Eq)]
enum Selection {
    /// Whole sentences, by index, in input order.
    Sentences(Vec<usize>),
    /// The single best sentence did not fit even alone: this one, to be truncated.
    Truncated(usize),
}

impl Corpus<'_> {
    /// TF-IDF vectors of `sentences` over their content terms (variants folded across them,
    /// not across the whole corpus), with sublinear term frequency and smoothed IDF
    /// `ln((1 + n) / (1 + df)) + 1`. Term ids are given in first-occurrence order, so the
    /// floating-point sums run in the same order for the same input.
    fn sentence_vectors(&self, sentences: &[Sentence]) -> SentenceVectors {
        let ids_of = |sentence: &Sentence| self.ids.get(sentence.terms.clone()).unwrap_or_default();
        let mut present = vec![false; self.vocab.len()];
        for sentence in sentences {
            for &id in ids_of(sentence) {
                present[id] = true;
            }
        }
        // Folding only sees the sentences' own terms: a base form that occurs only outside
        // them (in a sentence too short to keep) does not count.
        // A term with no base form in the whole corpus has none among the sentences' terms
        // either: only the (few) folded terms are searched again.
        let partial;
        let canonical = if present.iter().all(|&p| p) {
            &self.canonical
        } else {
            partial = (self.canonical.iter().enumerate())
                .map(|(id, &full)| {
                    if full == id || !present[id] {
                        id
                    } else {
                        base_of(&self.vocab, Some(&present), id)
                    }
                })
                .collect::<Vec<_>>();
            &partial
        };

        let mut dense = vec![usize::MAX; self.vocab.len()];
        let mut terms = 0;
        let mut counts: Vec<(usize, u32)> = Vec::with_capacity(self.ids.len());
        let mut bounds = Vec::with_capacity(sentences.len());
        let mut scratch = Vec::with_capacity(64);
        for sentence in sentences {
            scratch.clear();
            for &id in ids_of(sentence) {
                let key = canonical[id];
                if dense[key] == usize::MAX {
                    dense[key] = terms;
                    terms += 1;
                }
                scratch.push(dense[key]);
            }
            scratch.sort_unstable();
            let start = counts.len();
            for group in scratch.chunk_by(|a, b| a == b) {
                if let Some(&id) = group.first() {
                    counts.push((id, u32::try_from(group.len()).unwrap_or(u32::MAX)));
                }
            }
            bounds.push(start..counts.len());
        }
        let mut df = vec![0u32; terms];
        for &(id, _) in &counts {
            df[id] += 1;
        }

        let n = sentences.len() as f64;
        let mut entries = Vec::with_capacity(counts.len());
        for range in &mut bounds {
            let start = entries.len();
            for &(id, count) in counts.get(range.clone()).unwrap_or_default() {
                let idf = ((1.0 + n) / (1.0 + f64::from(df[id]))).ln() + 1.0;
                entries.push((id, (1.0 + f64::from(count).ln()) * idf));
            }
            let vector = entries.get_mut(start..).unwrap_or_default();
            let norm = vector.iter().map(|(_, w)| w * w).sum::<f64>().sqrt();
            if norm > EPSILON {
                for (_, weight) in vector.iter_mut() {
                    *weight /= norm;
                }
            } else {
                entries.truncate(start);
            }
            *range = start..entries.len();
        }
        SentenceVectors {
            entries,
            bounds,
            terms,
        }
    }

    /// Centroid + MMR selection under `limits`. Sentences sharing no content term with the
    /// centroid are never chosen (they would be noise in a summary), so the selection can be
    /// empty.
    fn select(&self, sentences: &[Sentence], limits: SummaryLimits) -> Selection {
        if sentences.is_empty() || limits.max_words == 0 || limits.max_sentences == 0 {
            return Selection::Sentences(Vec::new());
        }
        let vectors = self.sentence_vectors(sentences);
        let mut centroid = vec![0.0; vectors.terms];
        for &(id, weight) in &vectors.entries {
            centroid[id] += weight;
        }
        let centroid_norm = centroid.iter().map(|w| w * w).sum::<f64>().sqrt();
        let relevance: Vec<f64> = (0..sentences.len())
            .map(|i| {
                if centroid_norm <= EPSILON {
                    return 0.0;
                }
                vectors
                    .get(i)
                    .iter()
                    .map(|&(id, w)| w * centroid[id])
                    .sum::<f64>()
                    / centroid_norm
            })
            .collect();

        let mut open: Vec<bool> = relevance.iter().map(|&r| r > EPSILON).collect();
        let mut redundancy = vec![0.0f64; sentences.len()];
        let mut chosen: Vec<usize> = Vec::with_capacity(limits.max_sentences.min(sentences.len()));
        let mut words_left = limits.max_words;
        while chosen.len() < limits.max_sentences && words_left > 0 {
            let best = (0..sentences.len())
                .filter(|&i| open[i])
                .map(|i| {
                    (
                        i,
                        MMR_LAMBDA * relevance[i] - (1.0 - MMR_LAMBDA) * redundancy[i],
                    )
                })
                // Highest score; the earlier sentence among equals.
                .max_by(|a, b| a.1.total_cmp(&b.1).then_with(|| b.0.cmp(&a.0)));
            let Some((best, score)) = best else { break };
            if !chosen.is_empty() && score <= 0.0 {
                break; // everything left mostly repeats what is already chosen
            }
            open[best] = false;
            let words = sentences.get(best).map_or(0, |sentence| sentence.words);
            if words > words_left {
                // Only the first pick can be too long: after each pick, the pass below closes
                // every sentence that no longer fits.
                debug_assert!(chosen.is_empty(), "a closed sentence was picked");
                return Selection::Truncated(best);
            }
            words_left -= words;
            chosen.push(best);
            let picked = vectors.get(best);
            for (i, is_open) in open.iter_mut().enumerate() {
                if *is_open {
                    // The budget only shrinks, so a sentence longer than the words left never
                    // fits. Closed now, it is not found best and skipped one scan per sentence
                    // (quadratic in the sentences: 0.8 s for one 400 KB chunk with a 4-word
                    // budget); skipped in score order it would give the same selection, since
                    // scores do not change between picks.
                    if sentences.get(i).map_or(0, |sentence| sentence.words) > words_left {
                        *is_open = false;
                        continue;
                    }
                    let similarity = sparse_dot(vectors.get(i), picked);
                    redundancy[i] = redundancy[i].max(similarity);
                    if similarity >= NEAR_DUPLICATE {
                        *is_open = false;
                    }
                }
            }
        }
        chosen.sort_unstable();
        Selection::Sentences(chosen)
    }
}

/// Writes a selection: chosen sentences whitespace-normalized, in input order, joined with
/// spaces, a full stop after one that ends in a letter or digit; or the one truncated sentence,
/// normalized first when `normalize_truncated` (as [`split_sentences`] would have). `text(i)` is
/// sentence `i`'s text.
fn render<'t>(
    selection: Selection,
    limits: SummaryLimits,
    normalize_truncated: bool,
    text: impl Fn(usize) -> &'t str,
) -> String {
    match selection {
        Selection::Truncated(i) if normalize_truncated => {
            let mut sentence = String::new();
            push_normalized(&mut sentence, text(i));
            truncate_words(&sentence, limits.max_words)
        }
        Selection::Truncated(i) => truncate_words(text(i), limits.max_words),
        Selection::Sentences(chosen) => {
            let mut out = String::with_capacity(chosen.iter().map(|&i| text(i).len() + 2).sum());
            for (n, &i) in chosen.iter().enumerate() {
                if n > 0 {
                    out.push(' ');
                }
                let start = out.len();
                push_normalized(&mut out, text(i));
                if out
                    .get(start..)
                    .is_some_and(|s| s.ends_with(char::is_alphanumeric))
                {
                    out.push('.');
                }
            }
            out
        }
    }
}

/// Scans each of `sentences` as one document: the corpus and the candidate sentences for
/// [`Corpus::select`].
fn sentence_corpus<S: AsRef<str>>(sentences: &[S], scan: &mut Scan) -> Vec<Range<usize>> {
    sentences
        .iter()
        .map(|sentence| scan.push(sentence.as_ref()))
        .collect()
}

/// Centroid + MMR selection of whole `sentences` (see [`extractive_summary`]).
fn select_sentences<S: AsRef<str>>(sentences: &[S], limits: SummaryLimits) -> Selection {
    let bytes = sentences.iter().map(|s| s.as_ref().len()).sum();
    let mut scan = Scan::with_capacity(bytes, sentences.len());
    let ranges = sentence_corpus(sentences, &mut scan);
    let corpus = Corpus::new(&scan, &ranges);
    let candidates: Vec<Sentence> = corpus
        .documents
        .iter()
        .zip(sentences)
        .enumerate()
        .map(|(document, (doc, sentence))| Sentence {
            terms: doc.terms.clone(),
            words: word_count(sentence.as_ref()),
            document,
            bytes: 0..sentence.as_ref().len(),
        })
        .collect();
    corpus.select(&candidates, limits)
}

/// An extractive summary of `sentences` (typically from [`split_sentences`]): the sentences most
/// representative of the whole set, by cosine similarity of TF-IDF vectors to their centroid,
/// chosen greedily with Maximal Marginal Relevance (λ = 0.6, see `MMR_LAMBDA`) so a second
/// sentence must add something; near-duplicates are never both chosen.
///
/// The chosen sentences keep their input order and are joined with spaces (a sentence that ends
/// in a letter or digit gets a full stop so sentences do not run together). Never more than
/// `limits.max_words` words: a sentence that does not fit is skipped; if the best sentence alone
/// does not fit, it is truncated at a word boundary with "…".
///
/// Returns an empty string when no sentence carries a content term (only stop words, or no
/// sentences): the caller decides on a fallback.
pub fn extractive_summary<S: AsRef<str>>(sentences: &[S], limits: SummaryLimits) -> String {
    let selection = select_sentences(sentences, limits);
    render(selection, limits, false, |i| {
        sentences.get(i).map_or("", AsRef::as_ref)
    })
}

impl Corpus<'_> {
    /// [`extractive_summary`] of the [`split_sentences`] of the corpus's documents, whose texts
    /// `text(i)` gives, leaving out those for which `skip` (given the sentence as written) is
    /// true. The sentences are never copied or scanned again: a sentence's terms are those of
    /// its document whose words start inside it (a word never spans two sentences).
    fn summarize<'t>(
        &self,
        text: impl Fn(usize) -> &'t str,
        limits: SummaryLimits,
        mut skip: impl FnMut(&str) -> bool,
    ) -> String {
        let mut sentences = Vec::with_capacity(2 * self.documents.len());
        for (document, doc) in self.documents.iter().enumerate() {
            let text = text(document);
            let mut cursor = doc.terms.start;
            let source_at = |at: usize| self.occurrences.get(at).map(|o| o.source);
            sentence_spans(text, |start, end| {
                let raw = text.get(start..end).unwrap_or_default();
                let words = word_count(raw);
                if words < MIN_SENTENCE_WORDS || skip(raw) {
                    return;
                }
                while cursor < doc.terms.end && source_at(cursor).is_some_and(|s| s < start) {
                    cursor += 1;
                }
                let first = cursor;
                while cursor < doc.terms.end && source_at(cursor).is_some_and(|s| s < end) {
                    cursor += 1;
                }
                sentences.push(Sentence {
                    terms: first..cursor,
                    words,
                    document,
                    bytes: start..end,
                });
            });
        }
        let selection = self.select(&sentences, limits);
        render(selection, limits, true, |i| {
            sentences
                .get(i)
                .and_then(|s| text(s.document).get(s.bytes.clone()))
                .unwrap_or_default()
        })
    }
}

/// [`extractive_summary`] of the [`split_sentences`] of all `texts`, except the sentences for
/// which `skip` is true; `skip` sees a sentence as it is written in its text, before its
/// whitespace is collapsed. Gives exactly what those calls would, with one scan of each text
/// and no copy of any sentence but the chosen ones.
pub fn summarize_texts<S: AsRef<str>>(
    texts: &[S],
    limits: SummaryLimits,
    skip: impl FnMut(&str) -> bool,
) -> String {
    let bytes = texts.iter().map(|text| text.as_ref().len()).sum();
    let mut scan = Scan::with_capacity(bytes, texts.len());
    let ranges: Vec<Range<usize>> = texts.iter().map(|text| scan.push(text.as_ref())).collect();
    let corpus = Corpus::new(&scan, &ranges);
    corpus.summarize(|i| texts.get(i).map_or("", AsRef::as_ref), limits, skip)
}

// ---------------------------------------------------------------------------------------------
// The map step in one pass
// ---------------------------------------------------------------------------------------------

/// What the `local` backend's map step reports about one chunk of entries.
#[derive(Clone, Debug, PartialEq)]
pub struct ChunkDigest {
    /// [`theme_keywords`] of the entries' texts.
    pub themes: Vec<String>,
    /// [`sentiment`] of the entries.
    pub sentiment: Sentiment,
    /// [`extractive_summary`] of the sentences of all the texts ([`split_sentences`]); empty
    /// when none carries a content term.
    pub summary: String,
}

/// Themes, sentiment and extractive summary of `entries`, exactly as [`theme_keywords`],
/// [`sentiment`] and [`extractive_summary`] over [`split_sentences`] would give them, from one
/// scan of the texts: the three share the words, the lexicon lookups and the interned terms
/// (a sentence's terms are the terms of the text whose words start inside it), which is most of
/// the cost of a summary on the request path.
pub fn digest_chunk(entries: &[Entry], themes: usize, limits: SummaryLimits) -> ChunkDigest {
    let bytes = entries.iter().map(|entry| entry.text.len()).sum();
    let mut scan = Scan::with_capacity(bytes, entries.len());
    let ranges: Vec<Range<usize>> = entries.iter().map(|entry| scan.push(&entry.text)).collect();
    let corpus = Corpus::new(&scan, &ranges);

    let sentiment = sentiment_with(entries, |i, _| {
        let words = corpus
            .documents
            .get(i)
            .map_or(&[][..], |doc| corpus.words(doc));
        lexicon_counts_of(&scan, words)
    });
    let themes = corpus.themes(themes);

    let summary = corpus.summarize(
        |i| entries.get(i).map_or("", |e| e.text.as_str()),
        limits,
        |_| false,
    );
    ChunkDigest {
        themes,
        sentiment,
        summary,
    }
}

// ---------------------------------------------------------------------------------------------
// Sentiment
// ---------------------------------------------------------------------------------------------

/// Positive words of app reviews. "like" is handled separately (see [`polarity`]); "liked" is
/// absent on purpose: "Liked Songs" is a Spotify feature, not an opinion. "work(s)" is here so
/// that the commonest complaint, "doesn't work" / "never works", flips to negative; the price is
/// a rare false positive ("I listen at work").
#[rustfmt::skip] // a sorted paragraph; one word per line would be a thousand lines
const POSITIVE_WORDS: &[&str] = &[
    "addictive", "affordable", "amazing", "amazingly", "appreciate", "appreciated", "awesome",
    "beautiful", "beautifully", "best", "better", "brilliant", "calm", "clean", "comfortable",
    "convenient", "cool", "dope", "easier", "easiest", "easy", "effortless", "enjoy", "enjoyable",
    "enjoyed", "enjoying", "enjoys", "excellent", "exceptional", "fab", "fabulous", "fantastic",
    "fast", "faster", "fav", "fave", "favorite", "favorites", "favourite", "favourites", "fine",
    "flawless", "flawlessly", "fun", "genius", "glad", "good", "gorgeous", "grateful", "great",
    "greatest", "handy", "happy", "helpful", "ideal", "impressed", "impressive", "improved",
    "incredible", "incredibly", "innovative", "intuitive", "joy", "legendary", "lifesaver", "lit",
    "love", "loved", "lovely", "loves", "loving", "magnificent", "marvelous", "masterpiece", "neat",
    "nice", "nicely", "outstanding", "perfect", "perfection", "perfectly", "phenomenal", "pleasant",
    "pleased", "pleasure", "quick", "recommend", "recommended", "relaxing", "reliable",
    "responsive", "satisfied", "satisfying", "seamless", "seamlessly", "simple", "smooth",
    "smoothly", "solid", "spectacular", "splendid", "stable", "stellar", "superb", "terrific",
    "thank", "thankful", "thanks", "top", "unbeatable", "useful", "valuable", "versatile",
    "wonderful", "wonderfully", "work", "worked", "working", "works", "worth", "worthwhile", "wow",
];

/// Negative words of app reviews: defects, money, ads, frustration, leaving.
#[rustfmt::skip] // a sorted paragraph; one word per line would be a thousand lines
const NEGATIVE_WORDS: &[&str] = &[
    "abysmal", "ad", "ads", "advert", "advertisement", "advertisements", "adverts", "angry",
    "annoy", "annoyed", "annoying", "annoys", "awful", "bad", "badly", "bloated", "boring", "broke",
    "broken", "bs", "bug", "buggy", "bugs", "cancel", "canceled", "cancelled", "clunky",
    "complicated", "confusing", "crap", "crappy", "crash", "crashed", "crashes", "crashing", "damn",
    "delete", "deleted", "deleting", "difficult", "disappoint", "disappointed", "disappointing",
    "disappointment", "disconnect", "disconnects", "disgusting", "dislike", "disrespect",
    "downgrade", "drain", "drains", "dreadful", "dumb", "error", "errors", "expensive", "fail",
    "failed", "failing", "fails", "failure", "fix", "forced", "forcing", "freeze", "freezes",
    "freezing", "froze", "frozen", "frustrated", "frustrating", "garbage", "glitch", "glitches",
    "glitchy", "greedy", "hate", "hated", "hates", "hell", "horrendous", "horrible", "interrupt",
    "interrupted", "interruption", "interruptions", "interrupts", "irritate", "irritated",
    "irritating", "issue", "issues", "junk", "lag", "lagging", "laggy", "lags", "limited", "lousy",
    "mess", "messed", "messy", "nightmare", "nonsense", "outdated", "overpriced", "pathetic",
    "paywall", "pointless", "poor", "poorly", "pricey", "problem", "problems", "refund",
    "ridiculous", "rubbish", "ruin", "ruined", "ruins", "sad", "scam", "shame", "slow", "slower",
    "sluggish", "spam", "stop", "stopped", "stopping", "stops", "stuck", "stupid", "suck", "sucked",
    "sucks", "terrible", "trash", "ugly", "unable", "unacceptable", "unfair", "uninstall",
    "uninstalled", "uninstalling", "unstable", "unusable", "upset", "useless", "waste", "wasted",
    "worse", "worst", "worthless", "wrong", "wtf",
];

/// Words that negate an opinion word up to [`NEGATION_WINDOW`] words later. Anything ending in
/// "n't" also negates.
#[rustfmt::skip] // a sorted paragraph; one word per line would be a thousand lines
const NEGATORS: &[&str] = &[
    "aint", "arent", "barely", "cannot", "cant", "couldnt", "didnt", "doesnt", "dont", "hardly",
    "hasnt", "havent", "isnt", "neither", "never", "no", "nobody", "none", "nor", "not", "nothing",
    "shouldnt", "wasnt", "werent", "without", "wont", "wouldnt",
];

/// Words after which "like" is the verb of an opinion ("I like", "really like", "don't like")
/// rather than a preposition ("sounds like a scam"). "i'd like" (a wish) is deliberately absent.
#[rustfmt::skip] // a sorted paragraph; one word per line would be a thousand lines
const LIKE_OPENERS: &[&str] = &[
    "absolutely", "also", "definitely", "didn't", "didnt", "do", "does", "doesn't", "doesnt",
    "don't", "dont", "i", "just", "really", "still", "they", "totally", "truly", "we", "you",
];

/// How many preceding words a negator reaches: "don't really like", "not a good app".
const NEGATION_WINDOW: usize = 3;

/// `word` with every run of three or more equal characters shortened to `run` characters:
/// "suckssss" -> "sucks" (run 1), "goooood" -> "good" (run 2).
fn squash_runs(word: &str, run: usize) -> Option<String> {
    let mut out = String::with_capacity(word.len());
    let mut changed = false;
    let chars: Vec<char> = word.chars().collect();
    let mut i = 0;
    while let Some(&c) = chars.get(i) {
        let mut j = i;
        while chars.get(j) == Some(&c) {
            j += 1;
        }
        let length = j - i;
        let keep = if length >= 3 { run } else { length };
        changed |= keep != length;
        out.extend(std::iter::repeat_n(c, keep));
        i = j;
    }
    changed.then_some(out)
}

fn flag_polarity(flags: u16) -> i8 {
    if flags & POSITIVE != 0 {
        1
    } else if flags & NEGATIVE != 0 {
        -1
    } else {
        0
    }
}

fn lexicon_polarity(word: &str) -> i8 {
    flag_polarity(LEXICON.word_flags(word))
}

/// Polarity (+1, -1 or 0) of `words[i]`, before negation.
#[inline]
fn polarity(scan: &Scan, words: &[Word], i: usize) -> i8 {
    let Some(word) = words.get(i) else { return 0 };
    if word.is(LIKE) {
        let opener = i
            .checked_sub(1)
            .and_then(|p| words.get(p))
            .filter(|_| !word.after_break)
            .is_some_and(|previous| previous.is(LIKE_OPENER));
        return i8::from(opener);
    }
    match flag_polarity(word.flags) {
        0 if word.is(EXPRESSIVE) => [2, 1]
            .into_iter()
            .filter_map(|run| squash_runs(scan.text(word), run))
            .map(|squashed| lexicon_polarity(&squashed))
            .find(|&p| p != 0)
            .unwrap_or(0),
        p => p,
    }
}

/// [`lexicon_counts`] of scanned words.
fn lexicon_counts_of(scan: &Scan, words: &[Word]) -> (u32, u32) {
    let (mut positive, mut negative) = (0u32, 0u32);
    let mut last_negator: Option<usize> = None;
    for (i, word) in words.iter().enumerate() {
        if word.after_break {
            last_negator = None; // punctuation closes the negation's scope
        }
        if word.is(NEGATOR) {
            last_negator = Some(i);
            continue;
        }
        let negated = last_negator.is_some_and(|n| i - n <= NEGATION_WINDOW);
        match (polarity(scan, words, i), negated) {
            (1, false) | (-1, true) => positive += 1,
            (-1, false) | (1, true) => negative += 1,
            _ => {}
        }
    }
    (positive, negative)
}

/// Positive and negative lexicon hits in `text`, after negation: an opinion word with a negator
/// among the previous [`NEGATION_WINDOW`] words of the same clause counts for the other side
/// ("not good" is negative, "no ads" and "never crashes" are positive).
pub fn lexicon_counts(text: &str) -> (u32, u32) {
    let mut scan = Scan::with_capacity(text.len(), 1);
    let words = scan.push(text);
    lexicon_counts_of(&scan, scan.words.get(words).unwrap_or_default())
}

/// [`lexicon_score`] of counts.
fn score_of_counts((positive, negative): (u32, u32)) -> f64 {
    if positive + negative == 0 {
        return 0.0;
    }
    (f64::from(positive) - f64::from(negative)) / f64::from(positive + negative)
}

/// Lexicon score of `text` in [-1, 1]: `(pos − neg) / (pos + neg)` over [`lexicon_counts`],
/// 0 when no opinion word occurs.
pub fn lexicon_score(text: &str) -> f64 {
    score_of_counts(lexicon_counts(text))
}

/// Weight of the star rating in an entry's score: the rating is the user's own verdict, so it
/// dominates; the words still move an entry (a 3-star "crashes all the time" is negative).
const RATING_WEIGHT: f64 = 0.6;

/// Score above which an entry (or a set) is positive; its negation bounds negative.
const POLARITY_THRESHOLD: f64 = 0.2;

/// Share of positive and of negative entries from which a set is [`SentimentLabel::Mixed`].
const MIXED_SHARE: f64 = 0.3;

/// [`entry_score`] from the lexicon score.
fn blend(lexicon: f64, rating: Option<u8>) -> f64 {
    match rating.filter(|r| (1..=5).contains(r)) {
        Some(r) => RATING_WEIGHT * ((f64::from(r) - 3.0) / 2.0) + (1.0 - RATING_WEIGHT) * lexicon,
        None => lexicon,
    }
}

/// Score of one entry in [-1, 1]. With a rating `r` in 1..=5: `0.6 · (r − 3) / 2 + 0.4 ·`
/// [`lexicon_score`]; without one (or with a rating outside 1..=5, treated as none) the lexicon
/// score alone.
pub fn entry_score(text: &str, rating: Option<u8>) -> f64 {
    blend(lexicon_score(text), rating)
}

/// Label of one entry's score: positive above 0.2, negative below −0.2, else neutral (never
/// [`SentimentLabel::Mixed`]).
pub fn entry_label(score: f64) -> SentimentLabel {
    if score > POLARITY_THRESHOLD {
        SentimentLabel::Positive
    } else if score < -POLARITY_THRESHOLD {
        SentimentLabel::Negative
    } else {
        SentimentLabel::Neutral
    }
}

/// Label of a set: [`SentimentLabel::Mixed`] when at least 30% of the `total` entries are
/// positive and at least 30% negative; otherwise by the mean `score` like [`entry_label`].
pub fn sentiment_label(score: f64, positive: u32, negative: u32, total: u32) -> SentimentLabel {
    if total == 0 {
        return SentimentLabel::Neutral;
    }
    let share = |count: u32| f64::from(count) / f64::from(total);
    if share(positive) >= MIXED_SHARE && share(negative) >= MIXED_SHARE {
        SentimentLabel::Mixed
    } else {
        entry_label(score)
    }
}

/// Sentiment of a set of entries: per-entry [`entry_score`] and [`entry_label`] counts, the mean
/// score, the [`sentiment_label`], and the mean of the ratings in 1..=5 (0 when none).
pub fn sentiment(entries: &[Entry]) -> Sentiment {
    let mut scan = Scan::default();
    sentiment_with(entries, |_, entry| {
        scan.clear();
        let words = scan.push(&entry.text);
        lexicon_counts_of(&scan, scan.words.get(words).unwrap_or_default())
    })
}

/// [`sentiment`], given each entry's [`lexicon_counts`].
fn sentiment_with(
    entries: &[Entry],
    mut counts: impl FnMut(usize, &Entry) -> (u32, u32),
) -> Sentiment {
    let mut result = Sentiment::default();
    let (mut score_sum, mut rating_sum) = (0.0, 0u64);
    for (i, entry) in entries.iter().enumerate() {
        let score = blend(score_of_counts(counts(i, entry)), entry.rating);
        score_sum += score;
        match entry_label(score) {
            SentimentLabel::Positive => result.positive += 1,
            SentimentLabel::Negative => result.negative += 1,
            SentimentLabel::Neutral | SentimentLabel::Mixed => result.neutral += 1,
        }
        if let Some(r) = entry.rating.filter(|r| (1..=5).contains(r)) {
            result.rated += 1;
            rating_sum += u64::from(r);
        }
    }
    let total = result.entries();
    if total > 0 {
        result.score = score_sum / f64::from(total);
    }
    if result.rated > 0 {
        result.average_rating = rating_sum as f64 / f64::from(result.rated);
    }
    result.label = sentiment_label(result.score, result.positive, result.negative, total);
    result
}

/// Combines the sentiments of disjoint sets (chunks) into the sentiment of their union, exactly
/// as [`sentiment`] over all entries would: counts add up, the score is the entry-weighted mean,
/// the average rating the rating-weighted mean, and the label is recomputed.
pub fn merge_sentiments<'a>(parts: impl IntoIterator<Item = &'a Sentiment>) -> Sentiment {
    let mut result = Sentiment::default();
    let (mut score_sum, mut rating_sum) = (0.0, 0.0);
    for part in parts {
        result.positive += part.positive;
        result.neutral += part.neutral;
        result.negative += part.negative;
        result.rated += part.rated;
        score_sum += part.score * f64::from(part.entries());
        rating_sum += part.average_rating * f64::from(part.rated);
    }
    let total = result.entries();
    if total > 0 {
        result.score = score_sum / f64::from(total);
    }
    if result.rated > 0 {
        result.average_rating = rating_sum / f64::from(result.rated);
    }
    result.label = sentiment_label(result.score, result.positive, result.negative, total);
    result
}

#[cfg(test)]
mod tests {
    use std::collections::{HashMap, HashSet};

    use super::*;

    /// The variant folding of a vocabulary: each folded term and the base form it reaches.
    fn variant_map<'v>(vocab: &HashSet<&'v str>) -> HashMap<&'v str, &'v str> {
        let terms = vocab.iter().map(|&text| TermText {
            text,
            key: pack(text.as_bytes()),
        });
        let (_, interned) = intern(terms);
        let canonical = variant_ids(&interned, None);
        interned
            .iter()
            .zip(canonical)
            .filter_map(|(term, base)| {
                let base = interned[base].text;
                (base != term.text).then_some((term.text, base))
            })
            .collect()
    }

    fn entry(text: &str, rating: Option<u8>) -> Entry {
        Entry {
            id: String::new(),
            user_id: String::new(),
            text: text.to_owned(),
            rating,
            created_at: None,
            source: String::new(),
        }
    }

    fn limits(max_words: usize, max_sentences: usize) -> SummaryLimits {
        SummaryLimits {
            max_words,
            max_sentences,
        }
    }

    #[test]
    fn ascii_space_is_char_whitespace_and_word_count_is_split_whitespace() {
        for byte in 0..=127u8 {
            assert_eq!(
                is_ascii_space(byte),
                char::from(byte).is_whitespace(),
                "{byte:#x}"
            );
        }
        for text in [
            "",
            " ",
            "a",
            " two  words ",
            "tab\tvt\x0bff\x0cfs\x1cus\x1f end",
            "line\r\nbreaks\n\n",
            "no\u{a0}break\u{3000}ideographic",
        ] {
            assert_eq!(
                word_count(text),
                text.split_whitespace().count(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn every_listed_word_is_found_with_its_flags_and_fits_a_key() {
        let lists = [
            (STOP_WORDS, STOP),
            (GENERIC_WORDS, GENERIC),
            (POSITIVE_WORDS, POSITIVE),
            (NEGATIVE_WORDS, NEGATIVE),
            (NEGATORS, NEGATOR),
            (LIKE_OPENERS, LIKE_OPENER),
            (AD_SYNONYMS, SYNONYM),
        ];
        for (list, flag) in lists {
            for word in list {
                // A longer word would need a longer key; a triple letter would be missed, since
                // listed words skip the expressive check.
                assert!(word.len() <= KEY_BYTES, "{word}");
                assert!(!is_expressive(word, word.is_ascii()), "{word}");
                assert_ne!(LEXICON.word_flags(word) & flag, 0, "{word}");
            }
        }
        for word in AD_SYNONYMS {
            assert_eq!(synonym(word), Some("ads"), "{word}");
        }
        for word in [
            "",
            "playlist",
            "the\0",
            "supercalifragilistic",
            "advertiser",
        ] {
            assert_eq!(LEXICON.word_flags(word), 0, "{word:?}");
        }
    }

    #[test]
    fn packed_triple_check_agrees_with_the_character_loop() {
        let words = [
            "",
            "a",
            "aa",
            "aaa",
            "aab",
            "baaa",
            "abbba",
            "yasss",
            "soooo",
            "goood",
            "good",
            "bookkeeper",
            "abcdefghijklmnop",
            "abcdefghijklmnpp",
            "abcdefghijklmppp",
            "aaabcdefghijklmn",
            "zzz'",
            "'''",
            "ab'''",
        ];
        for word in words {
            assert_eq!(
                has_triple(pack(word.as_bytes()), word.len()),
                is_expressive(word, true),
                "{word}"
            );
        }
    }

    /// Entries for the one-pass functions: prose, repeats, line breaks, decimals, non-ASCII,
    /// possessives, a too-short sentence holding the only "ad".
    fn mixed_entries() -> Vec<Entry> {
        [
            (
                "Too many ads. The ads play after every second song, even at night.",
                Some(1),
            ),
            (
                "Shuffle is broken:\nit repeats the same ten songs. Ad! Offline mode fails.",
                Some(2),
            ),
            (
                "Version 8.6.0 crashes; Café’s ÉLAN playlist don’t load… Premium's price?!",
                None,
            ),
            (
                "offline mode never syncs, offline mode is slow \"really\" (again)",
                Some(3),
            ),
            ("", Some(5)),
            ("Excellent", Some(5)),
            ("日本語のレビューです。広告が多すぎる！", Some(4)),
        ]
        .iter()
        .map(|(text, rating)| entry(text, *rating))
        .collect()
    }

    #[test]
    fn one_pass_digest_equals_the_separate_functions() {
        let entries = mixed_entries();
        for n in 1..=entries.len() {
            let chunk = &entries[..n];
            let texts: Vec<&str> = chunk.iter().map(|e| e.text.as_str()).collect();
            let sentences: Vec<String> = texts.iter().flat_map(|t| split_sentences(t)).collect();
            for limits in [limits(60, 3), limits(4, 2), limits(0, 1), limits(300, 1)] {
                let digest = digest_chunk(chunk, 5, limits);
                assert_eq!(digest.themes, theme_keywords(&texts, 5), "{n}");
                assert_eq!(digest.sentiment, sentiment(chunk), "{n}");
                assert_eq!(
                    digest.summary,
                    extractive_summary(&sentences, limits),
                    "{n} {limits:?}"
                );
                let skip = |s: &str| s.contains("mode");
                let kept: Vec<&String> = sentences.iter().filter(|s| !skip(s)).collect();
                assert_eq!(
                    summarize_texts(&texts, limits, skip),
                    extractive_summary(&kept, limits),
                    "{n} {limits:?}"
                );
            }
        }
    }

    #[test]
    fn tokenize_lowercases_keeps_inner_apostrophes_and_drops_short_and_numeric_tokens() {
        assert_eq!(
            tokenize("I DON’T love the ads!!! 2 stars, v8 'quoted' users' x Café's"),
            [
                "don't", "love", "the", "ads", "stars", "v8", "quoted", "users", "café's"
            ]
        );
        // Unicode-aware: CJK runs are one token, emoji separate, nothing panics.
        assert_eq!(tokenize("日本語 🎵🎵 ok"), ["日本語", "ok"]);
        assert!(tokenize("").is_empty());
        assert!(tokenize("1 22 333 . , !").is_empty());
    }

    #[test]
    fn stop_and_generic_words_are_removed_from_content_terms() {
        assert!(STOP_WORDS.len() >= 150, "{} stop words", STOP_WORDS.len());
        for word in ["the", "don't", "dont", "im", "it's", "not", "never"] {
            assert!(is_stop_word(word), "{word}");
        }
        for word in [
            "shuffle", "ads", "offline", "premium", "podcast", "playlist",
        ] {
            assert!(!is_stop_word(word) && !is_generic_word(word), "{word}");
        }
        assert_eq!(
            content_terms("The ads in Spotify's app are SO annoying, I can't shuffle my playlist"),
            ["ads", "shuffle", "playlist"]
        );
        assert!(content_terms("it is what it is, and I love this app").is_empty());
    }

    #[test]
    fn word_lists_are_sorted_unique_lowercase_and_disjoint() {
        let lists = [
            STOP_WORDS,
            GENERIC_WORDS,
            POSITIVE_WORDS,
            NEGATIVE_WORDS,
            NEGATORS,
            LIKE_OPENERS,
        ];
        for list in lists {
            // Sorted and unique keeps the lists reviewable; lowercase is what lookups see.
            assert!(list.windows(2).all(|pair| pair[0] < pair[1]), "{list:?}");
            assert!(list.iter().all(|w| w.to_lowercase() == *w));
        }
        // A negator is read before the opinion word it flips; it must not be one itself.
        assert!(NEGATORS.iter().all(|w| lexicon_polarity(w) == 0));
        assert!(POSITIVE_WORDS.len() >= 100 && NEGATIVE_WORDS.len() >= 100);
        let both: Vec<_> = POSITIVE_WORDS
            .iter()
            .filter(|w| NEGATIVE_WORDS.contains(w))
            .collect();
        assert!(both.is_empty(), "{both:?}");
    }

    #[test]
    fn variants_fold_only_onto_forms_present_in_the_corpus() {
        let vocab: HashSet<&str> = [
            "ads", "ad", "this", "bus", "crashes", "crashing", "crash", "updated", "update",
            "stopped", "stop", "stories", "story", "news",
        ]
        .into_iter()
        .collect();
        let map = variant_map(&vocab);
        assert_eq!(map.get("ads"), Some(&"ad"));
        assert_eq!(map.get("crashes"), Some(&"crash"));
        assert_eq!(map.get("crashing"), Some(&"crash"));
        assert_eq!(map.get("updated"), Some(&"update"));
        assert_eq!(map.get("stopped"), Some(&"stop"));
        assert_eq!(map.get("stories"), Some(&"story"));
        // No "thi", "bu" or "new" in the corpus: left alone.
        for word in ["this", "bus", "news", "ad", "crash"] {
            assert_eq!(map.get(word), None, "{word}");
        }
        // Without the singular, a plural stays as written.
        let lonely: HashSet<&str> = ["ads"].into_iter().collect();
        assert!(variant_map(&lonely).is_empty());
    }

    #[test]
    fn themes_rank_by_document_frequency_then_weight_then_alphabet() {
        let docs = [
            "Too many ads, and shuffle is broken.",
            "An ad after every track. Offline downloads vanish.",
            "The ads ads ads are loud; premium is expensive.",
            "Shuffle repeats the same artist.",
        ];
        // "ad"/"ads" merge (3 documents, shown as the commoner "ads"), then shuffle (2);
        // the df=1 terms follow by weight, then alphabetically.
        let themes = theme_keywords(&docs, 3);
        assert_eq!(themes[..2], ["ads", "shuffle"]);
        assert_eq!(theme_keywords(&docs, 0), Vec::<String>::new());
        assert!(theme_keywords::<&str>(&[], 5).is_empty());
        assert!(theme_keywords(&["", "the and of"], 5).is_empty());
        // Exact tie: same df and weight -> alphabetical.
        assert_eq!(theme_keywords(&["zebra apple"], 2), ["apple", "zebra"]);
    }

    #[test]
    fn theme_keys_fold_case_and_variants_across_chunks() {
        assert_eq!(
            theme_keys(&["Ads", "ad", "offline modes", "Offline Mode", "shuffle"]),
            ["ad", "ad", "offline mode", "offline mode", "shuffle"]
        );
        assert!(theme_keys::<&str>(&[]).is_empty());
    }

    #[test]
    fn recurring_phrases_replace_the_words_they_cover() {
        let docs = [
            "Offline mode is broken again",
            "offline mode never syncs",
            "Fix offline mode, and the lyrics",
            "lyrics are wrong",
        ];
        // Among the single mentions, "fix" sits in the phrase "fix offline mode" (degree 3).
        let themes = theme_keywords(&docs, 3);
        assert_eq!(themes, ["offline mode", "lyrics", "fix"]);
        // Punctuation breaks a phrase: "ads, shuffle" twice is not the phrase "ads shuffle".
        let themes = theme_keywords(&["ads, shuffle", "ads; shuffle"], 5);
        assert_eq!(themes, ["ads", "shuffle"]);
    }

    #[test]
    fn sentences_split_on_terminators_and_lines_and_keep_three_words_or_more() {
        let text = "Great app. Ads are   too loud!! What? The shuffle is broken\n\
                    version 8.6.0 crashes a lot... \"Fix it now!\" they said";
        assert_eq!(
            split_sentences(text),
            [
                "Ads are too loud!!",
                "The shuffle is broken",
                "version 8.6.0 crashes a lot...",
                "\"Fix it now!\"",
            ]
        );
        assert!(split_sentences("").is_empty());
        assert!(split_sentences("Excellent").is_empty());
        assert_eq!(
            split_sentences("。。 日本語 です よ。"),
            ["日本語 です よ。"]
        );
    }

    #[test]
    fn word_count_and_truncation_respect_every_budget() {
        assert_eq!(word_count("  one two\nthree\t"), 3);
        assert_eq!(word_count(""), 0);
        assert_eq!(truncate_words("one two three", 5), "one two three");
        assert_eq!(truncate_words("  one two three  ", 3), "one two three");
        assert_eq!(truncate_words("one, two, three", 2), "one, two…");
        assert_eq!(truncate_words("one\n\ntwo three", 2), "one\n\ntwo…");
        assert_eq!(truncate_words("one ,,, three", 2), "one ,,,…");
        assert_eq!(truncate_words("one two", 0), "");
        let long = "🎵 word, another; and: more words here. 日本語 end";
        for budget in 0..12 {
            let cut = truncate_words(long, budget);
            assert_eq!(
                word_count(&cut),
                budget.min(word_count(long)),
                "{budget}: {cut}"
            );
        }
        let huge = "x".repeat(8 * 1024);
        assert_eq!(truncate_words(&huge, 1), huge);
    }

    #[test]
    fn mmr_prefers_the_representative_sentence_over_an_outlier_and_skips_duplicates() {
        let sentences = [
            "My cat sleeps on the blue kitchen lamp every afternoon.",
            "The ads interrupt my playlists constantly.",
            "Too many ads between playlists, it interrupts everything.",
            "Too many ads between playlists, it interrupts everything.",
            "Ads are loud and interrupt the offline playlists.",
        ];
        assert_eq!(
            select_sentences(&sentences, limits(100, 1)),
            Selection::Sentences(vec![2])
        );
        // Two picks: the verbatim copy of the first pick is never the second.
        let Selection::Sentences(two) = select_sentences(&sentences, limits(100, 2)) else {
            panic!("expected whole sentences");
        };
        assert_eq!(two.len(), 2);
        assert!(
            two.contains(&2) && !two.contains(&3) && !two.contains(&0),
            "{two:?}"
        );
        assert_eq!(
            extractive_summary(&sentences, limits(100, 1)),
            "Too many ads between playlists, it interrupts everything."
        );
    }

    #[test]
    fn extractive_summary_never_exceeds_the_word_budget() {
        let sentences = [
            "Shuffle keeps playing the same five songs from my playlist over and over again",
            "Ads every two songs even after I paid for premium",
            "Offline downloads disappear when the phone restarts",
            "The new update broke shuffle and the offline mode",
            "Podcasts load slowly",
            "Premium price went up again without any new feature",
        ];
        for budget in 0..60 {
            for max_sentences in 1..5 {
                let summary = extractive_summary(&sentences, limits(budget, max_sentences));
                assert!(word_count(&summary) <= budget, "{budget}: {summary}");
                assert_eq!(summary.is_empty(), budget == 0, "{budget}: {summary}");
            }
        }
        // The best sentence alone does not fit: it is cut, not dropped.
        let one = ["Shuffle keeps playing the same five songs from my playlist over and over"];
        assert_eq!(
            extractive_summary(&one, limits(4, 3)),
            "Shuffle keeps playing the…"
        );
        // Only stop words: nothing representative, the caller falls back.
        assert_eq!(extractive_summary(&["it is what it is"], limits(10, 2)), "");
        assert_eq!(extractive_summary::<&str>(&[], limits(10, 2)), "");
    }

    #[test]
    fn extractive_summary_is_deterministic() {
        let text = "Ads are everywhere. Shuffle is broken and repeats. Offline mode fails on \
                    trains. Premium costs too much now. Ads again and again, shuffle too. \
                    Podcasts are fine but the ads in them are not.";
        let sentences = split_sentences(text);
        let first = extractive_summary(&sentences, limits(30, 3));
        for _ in 0..20 {
            assert_eq!(extractive_summary(&sentences, limits(30, 3)), first);
        }
        assert_eq!(
            theme_keywords(&[text, text], 5),
            theme_keywords(&[text, text], 5)
        );
    }

    #[test]
    fn lexicon_handles_negation_like_and_elongation() {
        let cases = [
            ("great app", (1, 0)),
            ("not good", (0, 1)),
            ("I don't like it", (0, 1)),
            ("never works offline", (0, 1)),
            ("no ads, love it", (2, 0)),
            ("not a good app", (0, 1)),
            ("good but crashes", (1, 1)),
            ("sounds like a scam", (0, 1)),
            ("I like it", (1, 0)),
            ("I'd like a refund", (0, 1)),
            ("Not bad. Great", (2, 0)),
            ("not. great", (1, 0)),
            ("no one two three great", (1, 0)),
            ("New update suckssss!", (0, 1)),
            ("goooood", (1, 0)),
            ("", (0, 0)),
            ("日本語 🎵", (0, 0)),
        ];
        for (text, expected) in cases {
            assert_eq!(lexicon_counts(text), expected, "{text}");
        }
        assert_eq!(lexicon_score("great app"), 1.0);
        assert_eq!(lexicon_score("I don't like it"), -1.0);
        assert_eq!(lexicon_score("good but crashes"), 0.0);
        assert_eq!(lexicon_score("love it, but the ads, the ads"), -1.0 / 3.0);
        assert_eq!(lexicon_score("nothing here"), 0.0);
    }

    #[test]
    fn entry_scores_blend_rating_and_words() {
        assert_eq!(entry_score("terrible", None), -1.0);
        assert_eq!(entry_score("", Some(4)), 0.3);
        assert_eq!(entry_score("", Some(3)), 0.0);
        assert!((entry_score("love it", Some(1)) - -0.2).abs() < 1e-12);
        assert!((entry_score("crashes", Some(5)) - 0.2).abs() < 1e-12);
        assert_eq!(entry_score("great", Some(0)), 1.0); // out of range: unrated
        assert_eq!(entry_label(0.3), SentimentLabel::Positive);
        assert_eq!(
            entry_label(entry_score("love it", Some(1))),
            SentimentLabel::Neutral
        );
        assert_eq!(entry_label(-0.21), SentimentLabel::Negative);
        assert_eq!(entry_label(0.2), SentimentLabel::Neutral);
    }

    #[test]
    fn set_sentiment_counts_labels_and_averages() {
        let entries = [
            entry("love it", Some(5)),
            entry("great playlists", Some(4)),
            entry("crashes constantly", Some(1)),
            entry("too many ads", Some(2)),
            entry("it is a music app", None),
        ];
        let s = sentiment(&entries);
        assert_eq!((s.positive, s.neutral, s.negative), (2, 1, 2));
        assert_eq!(s.label, SentimentLabel::Mixed);
        assert_eq!(s.rated, 4);
        assert_eq!(s.average_rating, 3.0);
        // (1.0 + 0.7 - 1.0 - 0.7 + 0.0) / 5
        assert!(s.score.abs() < 1e-12, "{}", s.score);

        let happy = sentiment(&[entry("love it", Some(5)), entry("ok", None)]);
        assert_eq!(happy.label, SentimentLabel::Positive);
        assert_eq!((happy.positive, happy.neutral, happy.rated), (1, 1, 1));
        assert_eq!(happy.score, 0.5);

        assert_eq!(sentiment(&[]), Sentiment::default());
    }

    #[test]
    fn merged_sentiment_equals_sentiment_of_the_union() {
        let entries = [
            entry("love it", Some(5)),
            entry("crashes", Some(1)),
            entry("ads everywhere", None),
            entry("great", Some(4)),
            entry("fine", Some(3)),
        ];
        let whole = sentiment(&entries);
        let merged = merge_sentiments([&sentiment(&entries[..2]), &sentiment(&entries[2..])]);
        assert_eq!(merged.label, whole.label);
        assert_eq!(
            (
                merged.positive,
                merged.neutral,
                merged.negative,
                merged.rated
            ),
            (whole.positive, whole.neutral, whole.negative, whole.rated)
        );
        assert!((merged.score - whole.score).abs() < 1e-12);
        assert!((merged.average_rating - whole.average_rating).abs() < 1e-12);
        assert_eq!(merge_sentiments([]), Sentiment::default());
    }
}
