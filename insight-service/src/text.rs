//! Text analytics behind the offline `local` backend: tokenization, stop words, theme keywords,
//! extractive summaries, lexicon sentiment and word budgets.
//!
//! Everything here is a pure, synchronous function of its input. Output never depends on hash
//! iteration order: hash maps are used for lookups only, and every ranking is sorted with a total
//! tie-break (score, then text or input position), so the same input always gives the same bytes.
//!
//! The methods are deliberately classic (document frequency, TF-IDF centroid + MMR, a word
//! lexicon with negation) because they are fast enough for the request path, need no model
//! files, and every sentence they return is either copied from the input or built from counts.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::LazyLock;

use crate::domain::{Entry, Sentiment, SentimentLabel};

// ---------------------------------------------------------------------------------------------
// Tokenization
// ---------------------------------------------------------------------------------------------

/// A lowercased word of the input, and whether punctuation separated it from the word before.
///
/// The flag scopes negation ("not bad. great" must not negate "great") and keeps bigrams from
/// spanning a comma ("ads, shuffle" is not a phrase).
#[derive(Clone, Copy, Debug)]
struct Word<'a> {
    text: &'a str,
    after_break: bool,
}

/// The words of a text, lowercased into one buffer: one allocation per text instead of one per
/// word, which was the largest cost of the whole backend.
struct Scanned {
    buffer: String,
    /// (start, end, after_break) of each word in `buffer`.
    spans: Vec<(usize, usize, bool)>,
}

impl Scanned {
    /// Splits `text` into lowercased words, keeping every word (even one-letter ones: sentiment
    /// needs "i like"). Apostrophes are kept only between two alphanumerics ("don't");
    /// typographic apostrophes are folded to ASCII first so "don’t" and "don't" are one word.
    fn new(text: &str) -> Self {
        let mut buffer = String::with_capacity(text.len());
        let mut spans = Vec::new();
        let mut start = 0;
        let mut pending_break = false;
        let mut chars = text.chars().map(fold_apostrophe).peekable();
        while let Some(c) = chars.next() {
            if c.is_ascii_alphanumeric() {
                buffer.push(c.to_ascii_lowercase());
            } else if c.is_alphanumeric() {
                buffer.extend(c.to_lowercase());
            } else if c == '\''
                && buffer.len() > start
                && chars.peek().is_some_and(|next| next.is_alphanumeric())
            {
                buffer.push('\'');
            } else {
                if buffer.len() > start {
                    spans.push((start, buffer.len(), pending_break));
                    start = buffer.len();
                    pending_break = false;
                }
                // Whitespace, stray apostrophes and hyphens join words ("ad-free" reads as
                // "ad free"); anything else (punctuation, emoji, symbols) ends a clause.
                if !(c.is_whitespace() || c == '\'' || c == '-') {
                    pending_break = true;
                }
            }
        }
        if buffer.len() > start {
            spans.push((start, buffer.len(), pending_break));
        }
        Self { buffer, spans }
    }

    fn words(&self) -> Vec<Word<'_>> {
        self.spans
            .iter()
            .filter_map(|&(start, end, after_break)| {
                Some(Word {
                    text: self.buffer.get(start..end)?,
                    after_break,
                })
            })
            .collect()
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
fn is_token(word: &str) -> bool {
    word.chars().nth(1).is_some() && !word.chars().all(char::is_numeric)
}

/// Lowercased tokens of `text`: split on anything that is not a Unicode letter or digit, inner
/// apostrophes kept ("don't"), tokens shorter than two characters and pure numbers dropped.
///
/// Stop words are kept; use [`content_terms`] for the words that carry a topic.
pub fn tokenize(text: &str) -> Vec<String> {
    Scanned::new(text)
        .words()
        .into_iter()
        .filter(|word| is_token(word.text))
        .map(|word| word.text.to_owned())
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

/// FNV-1a, for the fixed word tables only: every word of the input is looked up in several of
/// them, SipHash was a tenth of the run time, and a fixed table cannot be flooded with chosen
/// collisions (maps keyed by input words keep the default, DoS-resistant hasher).
struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Self(0xcbf2_9ce4_8422_2325)
    }
}

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
}

/// A fixed table of words.
type WordSet = HashSet<&'static str, BuildHasherDefault<Fnv>>;

fn word_set(words: &[&'static str]) -> WordSet {
    words.iter().copied().collect()
}

static STOP_SET: LazyLock<WordSet> = LazyLock::new(|| word_set(STOP_WORDS));
static GENERIC_SET: LazyLock<WordSet> = LazyLock::new(|| word_set(GENERIC_WORDS));

/// Whether `token` (lowercase) is an English stop word.
pub fn is_stop_word(token: &str) -> bool {
    STOP_SET.contains(token)
}

/// Whether `token` (lowercase) is a domain-generic word of app feedback that names no theme
/// (see the list's documentation for what is in it and why).
pub fn is_generic_word(token: &str) -> bool {
    GENERIC_SET.contains(token)
}

/// The topic-bearing form of a scanned word, or `None` if it carries no topic. A possessive
/// "'s" is dropped ("spotify's" is "spotify", which is then generic).
fn content_term(word: &str) -> Option<&str> {
    if !is_token(word) || is_stop_word(word) || is_expressive(word) {
        return None;
    }
    let base = word.strip_suffix("'s").unwrap_or(word);
    if !is_token(base) || is_stop_word(base) || is_generic_word(base) {
        return None;
    }
    Some(synonym(base).unwrap_or(base))
}

/// Spellings with a letter repeated three times or more ("yasss", "soooo", "awohoooo") are
/// exclamations, not topics; no English word has such a run.
fn is_expressive(word: &str) -> bool {
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

/// A content term and whether it directly follows the previous content term (same clause, no
/// stop word in between), which is what makes two terms a candidate phrase.
struct Term<'a> {
    text: &'a str,
    joined: bool,
}

fn content_stream<'a>(words: &[Word<'a>]) -> Vec<Term<'a>> {
    let mut terms = Vec::new();
    let mut previous_was_content = false;
    for word in words {
        let joined = previous_was_content && !word.after_break;
        match content_term(word.text) {
            Some(text) => {
                terms.push(Term { text, joined });
                previous_was_content = true;
            }
            None => previous_was_content = false,
        }
    }
    terms
}

/// The topic-bearing terms of `text`, in order: [`tokenize`] minus stop words and
/// domain-generic words, possessive "'s" removed. No stemming is applied here; plural folding
/// needs a corpus (see [`theme_keywords`]).
pub fn content_terms(text: &str) -> Vec<String> {
    let scanned = Scanned::new(text);
    content_stream(&scanned.words())
        .into_iter()
        .map(|term| term.text.to_owned())
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Corpus-checked variant folding
// ---------------------------------------------------------------------------------------------

/// Candidate base forms of `term`, most specific first. Suffix rules alone mangle words ("this",
/// "bus", "news"); they are safe here because a candidate only counts if it occurs in the same
/// corpus (see [`variant_map`]).
fn base_candidates(term: &str) -> Vec<String> {
    let mut out = Vec::new();
    let len = term.chars().count();
    if len > 4
        && let Some(stem) = term.strip_suffix("ies")
    {
        out.push(format!("{stem}y"));
    }
    if let Some(stem) = term.strip_suffix("es") {
        out.push(stem.to_owned());
    }
    if !term.ends_with("ss")
        && let Some(stem) = term.strip_suffix('s')
    {
        out.push(stem.to_owned());
    }
    // Verb forms: "crashing"/"crashed" -> "crash", "updated" -> "update", "stopped" -> "stop".
    for suffix in ["ing", "ed"] {
        if len >= suffix.len() + 3
            && let Some(stem) = term.strip_suffix(suffix)
        {
            out.push(stem.to_owned());
            out.push(format!("{stem}e"));
            let mut chars = stem.chars().rev();
            if let (Some(last), Some(before)) = (chars.next(), chars.next())
                && last == before
                && !"aeiou".contains(last)
            {
                out.push(stem[..stem.len() - last.len_utf8()].to_owned());
            }
        }
    }
    if len > 4
        && let Some(stem) = term.strip_suffix("ied")
    {
        out.push(format!("{stem}y"));
    }
    out.retain(|candidate| candidate.chars().count() >= 2 && candidate != term);
    out
}

/// For each term of `vocab` that has a base form also in `vocab`, that base form ("ads" -> "ad"
/// only when "ad" occurs too). Applied transitively, at most three steps, so "updates" and
/// "updated" both reach "update".
fn variant_map<'v>(vocab: &HashSet<&'v str>) -> HashMap<&'v str, &'v str> {
    let mut map = HashMap::new();
    for &term in vocab {
        let mut current = term;
        for _ in 0..3 {
            let next = base_candidates(current)
                .into_iter()
                .find_map(|candidate| vocab.get(candidate.as_str()).copied());
            match next {
                Some(base) => current = base,
                None => break,
            }
        }
        if current != term {
            map.insert(term, current);
        }
    }
    map
}

fn canonical<'v>(map: &HashMap<&'v str, &'v str>, term: &'v str) -> &'v str {
    map.get(term).copied().unwrap_or(term)
}

// ---------------------------------------------------------------------------------------------
// Theme keywords
// ---------------------------------------------------------------------------------------------

/// Document-level statistics of one canonical term (`K = &str`) or phrase (`K = (&str, &str)`).
struct PhraseStats<K> {
    /// Documents mentioning it.
    df: u32,
    /// Tie-break weight among equal `df`, summed over documents (see [`theme_keywords`]).
    weight: f64,
    /// Surface forms and in how many documents each occurred, for display. Usually one or two,
    /// so a vector beats a map.
    surfaces: Vec<(K, u32)>,
}

impl<K: Copy + Ord> PhraseStats<K> {
    fn new() -> Self {
        Self {
            df: 0,
            weight: 0.0,
            surfaces: Vec::new(),
        }
    }

    /// Adds one document's occurrences: `group` holds (key, surface, run length) triples of one
    /// key, sorted.
    fn add_document(&mut self, group: &[(K, K, u32)], prose: f64) {
        self.df += 1;
        let tf = u32::try_from(group.len()).unwrap_or(u32::MAX);
        let degree = group.iter().map(|&(_, _, run)| run).max().unwrap_or(1);
        let degree = f64::from(degree.min(MAX_DEGREE));
        self.weight += (1.0 + f64::from(tf).ln()) * degree * prose;
        let mut previous = None;
        for &(_, surface, _) in group {
            if previous == Some(surface) {
                continue; // counted once per document
            }
            previous = Some(surface);
            match self.surfaces.iter_mut().find(|(s, _)| *s == surface) {
                Some((_, count)) => *count += 1,
                None => self.surfaces.push((surface, 1)),
            }
        }
    }

    /// The surface form most documents used; the smallest among equals.
    fn display(&self) -> Option<K> {
        self.surfaces
            .iter()
            .max_by(|a, b| a.1.cmp(&b.1).then_with(|| b.0.cmp(&a.0)))
            .map(|&(surface, _)| surface)
    }
}

/// Sorts one document's (key, surface, run) triples and adds each key's group to `stats`.
fn add_groups<K: Copy + Ord>(
    mut items: Vec<(K, K, u32)>,
    prose: f64,
    stats: &mut BTreeMap<K, PhraseStats<K>>,
) {
    items.sort_unstable();
    for group in items.chunk_by(|a, b| a.0 == b.0) {
        if let Some(&(key, _, _)) = group.first() {
            stats
                .entry(key)
                .or_insert_with(PhraseStats::new)
                .add_document(group, prose);
        }
    }
}

/// Runs of content terms longer than this are not phrases but unfiltered text (typically a
/// language the stop-word list does not know), so the degree is capped.
const MAX_DEGREE: u32 = 3;

/// Share of a document's words that are English stop words (one-letter "i" and "a" included:
/// they are the surest sign of English), at least 0.05: about half in English prose, near zero
/// in a one-word review ("PP"), a run of exclamations or another language.
fn prose_share(words: &[Word<'_>]) -> f64 {
    let stops = words.iter().filter(|w| is_stop_word(w.text)).count();
    if words.is_empty() {
        return MIN_PROSE_SHARE;
    }
    (stops as f64 / words.len() as f64).clamp(MIN_PROSE_SHARE, 1.0)
}

/// Floor of [`prose_share`], so terms of non-prose documents still order among themselves.
const MIN_PROSE_SHARE: f64 = 0.05;

/// For each term of `stream`, the length of the run of adjacent content terms it belongs to.
fn run_lengths(stream: &[Term<'_>]) -> Vec<u32> {
    let mut lengths = vec![0u32; stream.len()];
    let mut start = 0;
    for end in 1..=stream.len() {
        if stream.get(end).is_none_or(|term| !term.joined) {
            let length = u32::try_from(end - start).unwrap_or(u32::MAX);
            lengths[start..end].fill(length);
            start = end;
        }
    }
    lengths
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
    let scanned: Vec<Scanned> = documents
        .iter()
        .map(|doc| Scanned::new(doc.as_ref()))
        .collect();
    let words: Vec<Vec<Word<'_>>> = scanned.iter().map(Scanned::words).collect();
    let streams: Vec<Vec<Term<'_>>> = words.iter().map(|words| content_stream(words)).collect();
    let vocab: HashSet<&str> = streams.iter().flatten().map(|term| term.text).collect();
    let variants = variant_map(&vocab);

    // Keys and surfaces borrow from `scanned`: nothing is allocated per occurrence.
    let mut unigrams: BTreeMap<&str, PhraseStats<&str>> = BTreeMap::new();
    let mut bigrams: BTreeMap<(&str, &str), PhraseStats<(&str, &str)>> = BTreeMap::new();
    for (words, stream) in words.iter().zip(&streams) {
        if stream.is_empty() {
            continue;
        }
        let prose = prose_share(words);
        let runs = run_lengths(stream);
        let mut doc_unigrams = Vec::with_capacity(stream.len());
        let mut doc_bigrams = Vec::new();
        for (i, (term, &run)) in stream.iter().zip(&runs).enumerate() {
            let key = canonical(&variants, term.text);
            doc_unigrams.push((key, term.text, run));
            let previous = match i.checked_sub(1).and_then(|p| stream.get(p)) {
                Some(previous) if term.joined => previous,
                _ => continue,
            };
            let previous_key = canonical(&variants, previous.text);
            if previous_key != key {
                // ("ads ads" is emphasis, not a phrase.)
                doc_bigrams.push(((previous_key, key), (previous.text, term.text), run));
            }
        }
        add_groups(doc_unigrams, prose, &mut unigrams);
        add_groups(doc_bigrams, prose, &mut bigrams);
    }

    bigrams.retain(|_, stats| stats.df >= 2);
    let mut absorbed: BTreeSet<&str> = BTreeSet::new();
    for (&(first, second), stats) in &bigrams {
        for part in [first, second] {
            if let Some(single) = unigrams.get(part)
                && 3 * stats.df >= 2 * single.df
            {
                absorbed.insert(part);
            }
        }
    }

    let mut candidates: Vec<(u32, f64, String)> = unigrams
        .iter()
        .filter(|(key, _)| !absorbed.contains(*key))
        .filter_map(|(_, stats)| Some((stats.df, stats.weight, stats.display()?.to_owned())))
        .chain(bigrams.values().filter_map(|stats| {
            let (first, second) = stats.display()?;
            Some((stats.df, stats.weight, format!("{first} {second}")))
        }))
        .collect();
    candidates.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then_with(|| b.1.total_cmp(&a.1))
            .then_with(|| a.2.cmp(&b.2))
    });
    candidates
        .into_iter()
        .take(k)
        .map(|(_, _, text)| text)
        .collect()
}

/// Canonical keys for already-extracted theme strings (possibly phrases), folding case and
/// variants across the whole list: used when merging themes from several chunks, where one chunk
/// said "ads", another "ad" and a remote model "Ads". Returns one key per input theme, in input
/// order.
pub fn theme_keys<S: AsRef<str>>(themes: &[S]) -> Vec<String> {
    let lowered: Vec<Vec<String>> = themes
        .iter()
        .map(|theme| {
            theme
                .as_ref()
                .split_whitespace()
                .map(str::to_lowercase)
                .collect()
        })
        .collect();
    let vocab: HashSet<&str> = lowered.iter().flatten().map(String::as_str).collect();
    let variants = variant_map(&vocab);
    lowered
        .iter()
        .map(|words| {
            words
                .iter()
                .map(|word| canonical(&variants, word))
                .collect::<Vec<_>>()
                .join(" ")
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

/// Splits `text` into sentences on `.`, `!`, `?` (and `…`, CJK full stops) and on line breaks.
/// The terminator stays with its sentence ("Too many ads!!"); a `.` between two digits is not a
/// boundary ("version 8.6.0"). Each sentence is trimmed, inner whitespace collapsed to single
/// spaces, and only sentences of at least [`MIN_SENTENCE_WORDS`] words are kept.
pub fn split_sentences(text: &str) -> Vec<String> {
    let mut sentences = Vec::new();
    let mut push = |segment: &str| {
        if word_count(segment) >= MIN_SENTENCE_WORDS {
            sentences.push(segment.split_whitespace().collect::<Vec<_>>().join(" "));
        }
    };
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let mut start = 0;
    let mut i = 0;
    while let Some(&(at, c)) = chars.get(i) {
        if c == '\n' || c == '\r' {
            push(&text[start..at]);
            start = at + c.len_utf8();
            i += 1;
            continue;
        }
        let decimal_point = c == '.'
            && i > 0
            && chars.get(i - 1).is_some_and(|(_, p)| p.is_ascii_digit())
            && chars.get(i + 1).is_some_and(|(_, n)| n.is_ascii_digit());
        if !is_terminator(c) || decimal_point {
            i += 1;
            continue;
        }
        // Take the whole run "?!..." and any closing quote or bracket with the sentence.
        let mut j = i + 1;
        while chars
            .get(j)
            .is_some_and(|&(_, n)| is_terminator(n) || is_closer(n))
        {
            j += 1;
        }
        let end = chars.get(j).map_or(text.len(), |&(next, _)| next);
        push(&text[start..end]);
        start = end;
        i = j;
    }
    push(&text[start..]);
    sentences
}

/// Number of whitespace-separated words in `text`: what a reader counts, and what `max_words`
/// limits.
pub fn word_count(text: &str) -> usize {
    text.split_whitespace().count()
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
    for (at, c) in text.char_indices() {
        if c.is_whitespace() {
            in_word = false;
            continue;
        }
        if !in_word {
            if words == max_words {
                return with_ellipsis(text[..end_of_last_word].trim());
            }
            words += 1;
            in_word = true;
        }
        end_of_last_word = at + c.len_utf8();
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

/// A sparse, L2-normalized TF-IDF vector: (term id, weight), sorted by term id.
type SparseVector = Vec<(usize, f64)>;

fn sparse_dot(a: &SparseVector, b: &SparseVector) -> f64 {
    let (mut i, mut j, mut sum) = (0, 0, 0.0);
    while let (Some(&(ta, wa)), Some(&(tb, wb))) = (a.get(i), b.get(j)) {
        match ta.cmp(&tb) {
            std::cmp::Ordering::Less => i += 1,
            std::cmp::Ordering::Greater => j += 1,
            std::cmp::Ordering::Equal => {
                sum += wa * wb;
                i += 1;
                j += 1;
            }
        }
    }
    sum
}

/// TF-IDF vectors of `sentences` over their content terms (variants folded across them), with
/// sublinear term frequency and smoothed IDF `ln((1 + n) / (1 + df)) + 1`.
fn sentence_vectors<S: AsRef<str>>(sentences: &[S]) -> (Vec<SparseVector>, usize) {
    let scanned: Vec<Scanned> = sentences
        .iter()
        .map(|sentence| Scanned::new(sentence.as_ref()))
        .collect();
    let terms: Vec<Vec<&str>> = scanned
        .iter()
        .map(|scan| {
            let words = scan.words();
            content_stream(&words)
                .iter()
                .map(|term| term.text)
                .collect()
        })
        .collect();
    let vocab: HashSet<&str> = terms.iter().flatten().copied().collect();
    let variants = variant_map(&vocab);

    // Ids in first-occurrence order, so nothing depends on hash order.
    let mut ids: HashMap<&str, usize> = HashMap::new();
    let mut counts: Vec<BTreeMap<usize, u32>> = Vec::with_capacity(terms.len());
    for sentence_terms in &terms {
        let mut tf = BTreeMap::new();
        for term in sentence_terms {
            let key = canonical(&variants, term);
            let next_id = ids.len();
            let id = *ids.entry(key).or_insert(next_id);
            *tf.entry(id).or_insert(0u32) += 1;
        }
        counts.push(tf);
    }
    let mut df = vec![0u32; ids.len()];
    for tf in &counts {
        for &id in tf.keys() {
            df[id] += 1;
        }
    }
    let n = sentences.len() as f64;
    let vectors = counts
        .iter()
        .map(|tf| {
            let mut vector: SparseVector = tf
                .iter()
                .map(|(&id, &count)| {
                    let idf = ((1.0 + n) / (1.0 + f64::from(df[id]))).ln() + 1.0;
                    (id, (1.0 + f64::from(count).ln()) * idf)
                })
                .collect();
            let norm = vector.iter().map(|(_, w)| w * w).sum::<f64>().sqrt();
            if norm > EPSILON {
                for (_, weight) in &mut vector {
                    *weight /= norm;
                }
            } else {
                vector.clear();
            }
            vector
        })
        .collect();
    (vectors, ids.len())
}

/// What [`select_sentences`] chose.
#[derive(Debug, PartialEq, Eq)]
enum Selection {
    /// Whole sentences, by index, in input order.
    Sentences(Vec<usize>),
    /// The single best sentence did not fit even alone: this one, to be truncated.
    Truncated(usize),
}

/// Centroid + MMR selection under `limits`. Sentences sharing no content term with the centroid
/// are never chosen (they would be noise in a summary), so the selection can be empty.
fn select_sentences<S: AsRef<str>>(sentences: &[S], limits: SummaryLimits) -> Selection {
    if sentences.is_empty() || limits.max_words == 0 || limits.max_sentences == 0 {
        return Selection::Sentences(Vec::new());
    }
    let (vectors, vocab_len) = sentence_vectors(sentences);
    let mut centroid = vec![0.0; vocab_len];
    for vector in &vectors {
        for &(id, weight) in vector {
            centroid[id] += weight;
        }
    }
    let centroid_norm = centroid.iter().map(|w| w * w).sum::<f64>().sqrt();
    let relevance: Vec<f64> = vectors
        .iter()
        .map(|vector| {
            if centroid_norm <= EPSILON {
                return 0.0;
            }
            vector.iter().map(|&(id, w)| w * centroid[id]).sum::<f64>() / centroid_norm
        })
        .collect();

    let mut open: Vec<bool> = relevance.iter().map(|&r| r > EPSILON).collect();
    let mut redundancy = vec![0.0f64; sentences.len()];
    let mut chosen: Vec<usize> = Vec::new();
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
        let words = word_count(sentences[best].as_ref());
        if words > words_left {
            if chosen.is_empty() {
                return Selection::Truncated(best);
            }
            continue; // skip it; a shorter, still representative sentence may fit
        }
        words_left -= words;
        chosen.push(best);
        for (i, vector) in vectors.iter().enumerate() {
            if open[i] {
                let similarity = sparse_dot(vector, &vectors[best]);
                redundancy[i] = redundancy[i].max(similarity);
                if similarity >= NEAR_DUPLICATE {
                    open[i] = false;
                }
            }
        }
    }
    chosen.sort_unstable();
    Selection::Sentences(chosen)
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
    match select_sentences(sentences, limits) {
        Selection::Truncated(i) => sentences
            .get(i)
            .map(|sentence| truncate_words(sentence.as_ref(), limits.max_words))
            .unwrap_or_default(),
        Selection::Sentences(chosen) => chosen
            .iter()
            .filter_map(|&i| sentences.get(i))
            .map(|sentence| {
                let mut sentence = sentence
                    .as_ref()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ");
                if sentence.ends_with(char::is_alphanumeric) {
                    sentence.push('.');
                }
                sentence
            })
            .collect::<Vec<_>>()
            .join(" "),
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

static POSITIVE_SET: LazyLock<WordSet> = LazyLock::new(|| word_set(POSITIVE_WORDS));
static NEGATIVE_SET: LazyLock<WordSet> = LazyLock::new(|| word_set(NEGATIVE_WORDS));
static NEGATOR_SET: LazyLock<WordSet> = LazyLock::new(|| word_set(NEGATORS));

fn is_negator(word: &str) -> bool {
    NEGATOR_SET.contains(word) || word.ends_with("n't")
}

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

fn lexicon_polarity(word: &str) -> i8 {
    if POSITIVE_SET.contains(word) {
        1
    } else if NEGATIVE_SET.contains(word) {
        -1
    } else {
        0
    }
}

/// Polarity (+1, -1 or 0) of `words[i]`, before negation.
fn polarity(words: &[Word<'_>], i: usize) -> i8 {
    let Some(word) = words.get(i) else { return 0 };
    if word.text == "like" {
        let opener = i
            .checked_sub(1)
            .and_then(|p| words.get(p))
            .filter(|_| !word.after_break)
            .is_some_and(|previous| LIKE_OPENERS.contains(&previous.text));
        return i8::from(opener);
    }
    match lexicon_polarity(word.text) {
        0 if is_expressive(word.text) => [2, 1]
            .into_iter()
            .filter_map(|run| squash_runs(word.text, run))
            .map(|squashed| lexicon_polarity(&squashed))
            .find(|&p| p != 0)
            .unwrap_or(0),
        p => p,
    }
}

/// Positive and negative lexicon hits in `text`, after negation: an opinion word with a negator
/// among the previous [`NEGATION_WINDOW`] words of the same clause counts for the other side
/// ("not good" is negative, "no ads" and "never crashes" are positive).
pub fn lexicon_counts(text: &str) -> (u32, u32) {
    let scanned = Scanned::new(text);
    let words = scanned.words();
    let (mut positive, mut negative) = (0u32, 0u32);
    let mut last_negator: Option<usize> = None;
    for (i, word) in words.iter().enumerate() {
        if word.after_break {
            last_negator = None; // punctuation closes the negation's scope
        }
        if is_negator(word.text) {
            last_negator = Some(i);
            continue;
        }
        let negated = last_negator.is_some_and(|n| i - n <= NEGATION_WINDOW);
        match (polarity(&words, i), negated) {
            (1, false) | (-1, true) => positive += 1,
            (-1, false) | (1, true) => negative += 1,
            _ => {}
        }
    }
    (positive, negative)
}

/// Lexicon score of `text` in [-1, 1]: `(pos − neg) / (pos + neg)` over [`lexicon_counts`],
/// 0 when no opinion word occurs.
pub fn lexicon_score(text: &str) -> f64 {
    let (positive, negative) = lexicon_counts(text);
    if positive + negative == 0 {
        return 0.0;
    }
    (f64::from(positive) - f64::from(negative)) / f64::from(positive + negative)
}

/// Weight of the star rating in an entry's score: the rating is the user's own verdict, so it
/// dominates; the words still move an entry (a 3-star "crashes all the time" is negative).
const RATING_WEIGHT: f64 = 0.6;

/// Score above which an entry (or a set) is positive; its negation bounds negative.
const POLARITY_THRESHOLD: f64 = 0.2;

/// Share of positive and of negative entries from which a set is [`SentimentLabel::Mixed`].
const MIXED_SHARE: f64 = 0.3;

/// Score of one entry in [-1, 1]. With a rating `r` in 1..=5: `0.6 · (r − 3) / 2 + 0.4 ·`
/// [`lexicon_score`]; without one (or with a rating outside 1..=5, treated as none) the lexicon
/// score alone.
pub fn entry_score(text: &str, rating: Option<u8>) -> f64 {
    let lexicon = lexicon_score(text);
    match rating.filter(|r| (1..=5).contains(r)) {
        Some(r) => RATING_WEIGHT * ((f64::from(r) - 3.0) / 2.0) + (1.0 - RATING_WEIGHT) * lexicon,
        None => lexicon,
    }
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
    let mut result = Sentiment::default();
    let (mut score_sum, mut rating_sum) = (0.0, 0u64);
    for entry in entries {
        let score = entry_score(&entry.text, entry.rating);
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
    use super::*;

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
