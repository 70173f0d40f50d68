//! The deterministic music profile: what the `local` backend answers, and the fallback when a
//! model fails. Every word is derived from [`ListeningStats`] by fixed rules, so the same data
//! always gives the same bytes and nothing is invented.
//!
//! - **Mood** places the mean valence and energy on the valence-arousal plane (Russell's
//!   circumplex model of affect, which is also how Spotify describes these two features): high
//!   valence and energy is "upbeat", low valence and energy "melancholic", and so on, with one
//!   texture word (danceable, acoustic, instrumental) when a feature stands out.
//! - **Personality** combines when the listener listens (night owl, early bird), how they
//!   behave (restless when they skip a lot, on repeat when they replay) and how widely they
//!   roam (superfan, loyalist, all-rounder, explorer, from the artist diversity).
//! - **Recommendations** are triggered by the data: genres adjacent to the top ones, a calmer
//!   set when late-night listening is high-energy, brighter tracks when valence is low, etc.
//! - **Summary** is a few sentences of the numbers that matter, cut to `max_words`.

use super::{
    play::AudioFeatures,
    prompt::{ASKED_LIST_ITEMS, Draft, percent, shown_char},
    stats::{
        AFTERNOON_HOURS, EARLY_HOURS, EVENING_HOURS, LATE_NIGHT_HOURS, ListeningStats,
        MORNING_HOURS, NIGHT_HOURS, RankedItem,
    },
};
use crate::text::truncate_words;

/// Below this a valence or energy mean is "low".
const LOW: f64 = 0.4;
/// At or above this a valence or energy mean is "high".
const HIGH: f64 = 0.6;

/// Genres one step away from a listener's genre: (genre, neighbours). Looked up by exact name,
/// then by a key contained as whole words (so "dance pop" finds "pop"); the order of the table
/// decides which key wins, which keeps the answer deterministic.
const ADJACENT_GENRES: &[(&str, [&str; 3])] = &[
    ("hip hop", ["jazz rap", "neo soul", "trap"]),
    ("r&b", ["neo soul", "funk", "alternative r&b"]),
    ("dance/electronic", ["house", "synthwave", "drum and bass"]),
    (
        "folk/acoustic",
        ["indie folk", "singer-songwriter", "americana"],
    ),
    ("world/traditional", ["afrobeats", "flamenco", "highlife"]),
    ("easy listening", ["soft rock", "vocal jazz", "bossa nova"]),
    ("k-pop", ["j-pop", "city pop", "electropop"]),
    ("pop", ["indie pop", "electropop", "synth-pop"]),
    ("rap", ["jazz rap", "boom bap", "neo soul"]),
    ("trap", ["drill", "cloud rap", "hip hop"]),
    ("rock", ["indie rock", "post-punk", "alternative rock"]),
    ("metal", ["progressive metal", "post-rock", "hard rock"]),
    ("punk", ["post-punk", "garage rock", "hardcore"]),
    ("indie", ["dream pop", "shoegaze", "indie folk"]),
    ("house", ["deep house", "disco", "techno"]),
    ("techno", ["minimal techno", "electro", "house"]),
    ("edm", ["progressive house", "future bass", "trance"]),
    ("electronic", ["ambient", "downtempo", "techno"]),
    ("dance", ["house", "disco", "nu-disco"]),
    ("latin", ["reggaeton", "bossa nova", "salsa"]),
    ("reggaeton", ["latin trap", "dembow", "moombahton"]),
    ("country", ["americana", "bluegrass", "folk"]),
    ("folk", ["indie folk", "singer-songwriter", "americana"]),
    (
        "acoustic",
        ["singer-songwriter", "indie folk", "chamber pop"],
    ),
    ("jazz", ["soul", "funk", "bossa nova"]),
    ("soul", ["funk", "neo soul", "motown"]),
    ("funk", ["disco", "soul", "jazz funk"]),
    ("blues", ["soul", "classic rock", "jazz"]),
    ("classical", ["film scores", "ambient", "minimalism"]),
    ("ambient", ["modern classical", "downtempo", "post-rock"]),
    ("reggae", ["dub", "ska", "dancehall"]),
];

/// The neighbours of `genre` in [`ADJACENT_GENRES`], if it is known.
fn adjacent(genre: &str) -> Option<&'static [&'static str; 3]> {
    let genre = genre.trim().to_lowercase();
    if let Some((_, next)) = ADJACENT_GENRES.iter().find(|(key, _)| *key == genre) {
        return Some(next);
    }
    let padded = format!(" {} ", genre.replace(['/', '-', ',', '_'], " "));
    ADJACENT_GENRES
        .iter()
        .find(|(key, _)| padded.contains(&format!(" {key} ")))
        .map(|(_, next)| next)
}

/// Low, middle or high band of a mean in `0..=1`.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Band {
    Low,
    Mid,
    High,
}

fn band(value: f64) -> Band {
    if value < LOW {
        Band::Low
    } else if value >= HIGH {
        Band::High
    } else {
        Band::Mid
    }
}

/// The mood label from the feature means (see the module docs).
pub fn mood(mean: Option<&AudioFeatures>) -> String {
    let Some(m) = mean else {
        return "undetermined (no audio features)".to_owned();
    };
    let base = match (band(m.valence), band(m.energy)) {
        (Band::High, Band::High) => "upbeat",
        (Band::High, Band::Mid) => "cheerful",
        (Band::High, Band::Low) => "mellow",
        (Band::Mid, Band::High) => "energetic",
        (Band::Mid, Band::Mid) => "balanced",
        (Band::Mid, Band::Low) => "calm",
        (Band::Low, Band::High) => "intense",
        (Band::Low, Band::Mid) => "brooding",
        (Band::Low, Band::Low) => "melancholic",
    };
    let texture = if m.danceability >= 0.7 {
        Some("danceable")
    } else if m.acousticness >= HIGH {
        Some("acoustic")
    } else if m.instrumentalness >= 0.5 {
        Some("instrumental")
    } else {
        None
    };
    match texture {
        Some(texture) => format!("{base} and {texture}"),
        None => base.to_owned(),
    }
}

/// When the listener listens, if late night or early morning clearly dominates: about 1.5 times
/// the share of an even spread (29% and 21%), so a flat pattern earns no label.
fn time_label(stats: &ListeningStats) -> Option<&'static str> {
    if stats.plays_with_time == 0 {
        None
    } else if stats.share_of_hours(LATE_NIGHT_HOURS) >= 0.45 {
        Some("night owl")
    } else if stats.share_of_hours(EARLY_HOURS) >= 0.35 {
        Some("early bird")
    } else {
        None
    }
}

/// The personality label (see the module docs).
pub fn personality(stats: &ListeningStats) -> String {
    let behaviour = if stats.skip_rate >= 0.3 {
        Some("restless")
    } else if stats.repeat_rate() >= 0.5 {
        Some("on-repeat")
    } else {
        None
    };
    let range = if stats.unique_artists <= 1 || stats.top_artist_share() >= 0.5 {
        "superfan"
    } else if stats.diversity >= 0.85 && stats.unique_artists >= 8 {
        "explorer"
    } else if stats.diversity < 0.6 {
        "loyalist"
    } else {
        "all-rounder"
    };
    [time_label(stats), behaviour, Some(range)]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Up to [`ASKED_LIST_ITEMS`] recommendations, most specific first; never empty.
pub fn recommendations(stats: &ListeningStats) -> Vec<String> {
    let mut out = Vec::new();
    let mean = stats.feature_mean;
    let top_artist = stats.top_artists.first().map(|a| a.name.as_str());
    let top_genre = stats.top_genres.first().map(|g| g.name.as_str());
    let night = stats.share_of_hours(LATE_NIGHT_HOURS);

    // Three in ten plays after 22:00 is a habit worth a wind-down suggestion.
    if let Some(m) = mean
        && night >= 0.3
        && m.energy >= 0.65
    {
        out.push(format!(
            "{} of your timed plays fall late at night (22:00-05:00 UTC) and your music is \
             high-energy (mean energy {:.2}): try a calmer acoustic or ambient set for those hours.",
            percent(night),
            m.energy
        ));
    }
    out.extend(adjacent_genres(stats));
    if let Some(m) = mean
        && m.valence < 0.35
    {
        out.push(format!(
            "Your music leans dark (mean valence {:.2}): mix in a few brighter tracks (valence \
             above 0.6) from the genres you already like when you want a lift.",
            m.valence
        ));
    }
    if stats.skip_rate >= 0.25 {
        out.push(format!(
            "You skip {} of plays: keep a playlist of the tracks you finish and start radio from \
             it, so suggestions match what you actually listen to.",
            percent(stats.skip_rate)
        ));
    }
    if let Some(artist) = top_artist {
        let share = stats.top_artist_share();
        if share >= 0.3 && stats.unique_artists > 1 {
            out.push(format!(
                "{} of your plays go to {artist}: try artists from the same scene{} to widen the \
                 rotation.",
                percent(share),
                top_genre.map(|g| format!(" in {g}")).unwrap_or_default()
            ));
        } else if stats.diversity < 0.5 && stats.unique_artists > 1 {
            out.push(format!(
                "Your plays concentrate on a few artists (diversity {:.2}): add one new artist a \
                 week{}.",
                stats.diversity,
                top_genre.map(|g| format!(" from {g}")).unwrap_or_default()
            ));
        }
    }
    if stats.diversity >= 0.85 && stats.unique_artists >= 20 {
        out.push(format!(
            "Your taste is broad (diversity {:.2} across {} artists): collect the tracks you \
             return to in a core playlist so favourites do not get lost.",
            stats.diversity, stats.unique_artists
        ));
    }
    if let Some(m) = mean {
        if m.danceability >= 0.7 {
            out.push(format!(
                "Your music is very danceable (mean danceability {:.2}): a dance or workout mix{} \
                 suits it.",
                m.danceability,
                top_genre
                    .map(|g| format!(" built on {g}"))
                    .unwrap_or_default()
            ));
        }
        if m.acousticness >= HIGH {
            out.push(format!(
                "You favour acoustic sound (mean acousticness {:.2}): explore unplugged and \
                 live-session recordings.",
                m.acousticness
            ));
        }
        if m.energy < 0.35 {
            out.push(format!(
                "Your listening is low-energy (mean energy {:.2}): it suits focus and reading \
                 playlists; add a few mid-tempo tracks for workouts.",
                m.energy
            ));
        }
    }
    if stats.repeat_rate() >= 0.5 {
        out.push(format!(
            "{} of your plays repeat a track: the deeper albums of {} hold more of what you \
             replay.",
            percent(stats.repeat_rate()),
            top_artist.unwrap_or("your favourite artists")
        ));
    }
    if out.len() < 2 {
        out.push(match top_artist {
            Some(artist) => format!(
                "Explore the deeper catalogue of {artist}, your most played artist: albums and \
                 B-sides beyond the hits."
            ),
            None => "Tag more of your plays with genres and audio features to get sharper \
                     recommendations."
                .to_owned(),
        });
    }
    out.truncate(ASKED_LIST_ITEMS);
    out
}

/// "Explore X and Y, close to your top genre Z." for the first top genres with known
/// neighbours that the listener does not already play.
fn adjacent_genres(stats: &ListeningStats) -> Option<String> {
    let known: Vec<String> = stats
        .top_genres
        .iter()
        .map(|g| g.name.to_lowercase())
        .collect();
    stats.top_genres.iter().take(3).find_map(|genre| {
        let fresh: Vec<&str> = adjacent(&genre.name)?
            .iter()
            .copied()
            .filter(|n| !known.iter().any(|k| k == n))
            .take(2)
            .collect();
        match fresh.as_slice() {
            [] => None,
            [one] => Some(format!(
                "Explore {one}, close to your top genre {}.",
                genre.name
            )),
            [one, two, ..] => Some(format!(
                "Explore {one} and {two}, close to your top genre {}.",
                genre.name
            )),
        }
    })
}

/// "a", "a and b", "a, b and c".
fn list_phrase(items: &[&str]) -> String {
    match items {
        [] => String::new(),
        [one] => (*one).to_owned(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// `n` with the singular or plural noun.
fn count(n: u32, one: &str, many: &str) -> String {
    if n == 1 {
        format!("1 {one}")
    } else {
        format!("{n} {many}")
    }
}

/// `ms` as "3 h 05 min" or "42 min" (or "under a minute").
fn duration(ms: u64) -> String {
    let minutes = ms / 60_000;
    match minutes {
        0 => "under a minute".to_owned(),
        m if m < 60 => format!("{m} min"),
        m => format!("{} h {:02} min", m / 60, m % 60),
    }
}

/// The summary: a few sentences of the numbers that matter, at most `max_words` words.
pub fn summary(stats: &ListeningStats, mood: &str, personality: &str, max_words: usize) -> String {
    let mut sentences = vec![format!(
        "{} of {} by {} ({} of listening).",
        count(stats.plays, "play", "plays"),
        count(stats.unique_tracks, "distinct track", "distinct tracks"),
        count(stats.unique_artists, "artist", "artists"),
        duration(stats.total_ms_played)
    )];
    if let Some((top, rest)) = stats.top_artists.split_first() {
        let others: Vec<&str> = rest.iter().take(2).map(|a| a.name.as_str()).collect();
        let then = if others.is_empty() {
            String::new()
        } else {
            format!(", followed by {}", list_phrase(&others))
        };
        sentences.push(format!(
            "Your most played artist is {} ({}){then}.",
            top.name,
            count(top.plays, "play", "plays")
        ));
    }
    if let Some(top) = stats.top_genres.first() {
        let names: Vec<&str> = stats
            .top_genres
            .iter()
            .take(3)
            .map(|g| g.name.as_str())
            .collect();
        let share = if stats.plays > 0 {
            f64::from(top.plays) / f64::from(stats.plays)
        } else {
            0.0
        };
        sentences.push(format!(
            "Top genres: {} ({} is on {} of plays).",
            list_phrase(&names),
            top.name,
            percent(share)
        ));
    }
    match stats.feature_mean {
        Some(m) => sentences.push(format!(
            "The music is {mood} on average: valence {:.2}, energy {:.2}, danceability {:.2}, \
             around {:.0} bpm.",
            m.valence, m.energy, m.danceability, m.tempo
        )),
        None => sentences.push("No audio features were given, so the mood is undetermined.".into()),
    }
    if stats.plays_with_time > 0 {
        let parts = [
            ("at night", stats.share_of_hours(NIGHT_HOURS)),
            ("in the morning", stats.share_of_hours(MORNING_HOURS)),
            ("in the afternoon", stats.share_of_hours(AFTERNOON_HOURS)),
            ("in the evening", stats.share_of_hours(EVENING_HOURS)),
        ];
        // First maximum wins, so equal shares resolve the same way every time.
        let (when, share) = parts
            .iter()
            .fold(parts[0], |best, &p| if p.1 > best.1 { p } else { best });
        // A quarter of the day holds 25% of an even spread; below 35% there is no real peak.
        if share >= 0.35 {
            sentences.push(format!(
                "Listening peaks {when} ({} of timed plays, UTC).",
                percent(share)
            ));
        } else {
            sentences.push(
                "Listening is spread across the day (no quarter of the day above 35% of timed \
                 plays, UTC)."
                    .to_owned(),
            );
        }
    }
    let spread = if stats.diversity >= 0.85 {
        "high"
    } else if stats.diversity >= 0.6 {
        "moderate"
    } else {
        "low"
    };
    sentences.push(format!(
        "Artist diversity is {spread} ({:.2}) and {} of plays were skipped.",
        stats.diversity,
        percent(stats.skip_rate)
    ));
    sentences.push(format!("Listening profile: {personality}."));
    truncate_words(&sentences.join(" "), max_words)
}

/// A stored name as an answer shows it: characters as the prompt quotes them
/// ([`shown_char`]), ends trimmed; the stats keep names exactly as stored.
pub fn display_name(name: &str) -> String {
    name.trim()
        .chars()
        .map(shown_char)
        .collect::<String>()
        .trim()
        .to_owned()
}

/// Ranked names as an answer lists them ([`display_name`]), best first: a name with nothing
/// visible left (control or zero-width characters only) is left out, and one that shows the
/// same as a higher-ranked name (`"A"` and `"A\u{0}"`) is not listed twice.
pub fn shown_items(items: &[RankedItem]) -> Vec<RankedItem> {
    let invisible = |c: char| {
        c.is_whitespace() || matches!(c, '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}')
    };
    let mut shown: Vec<RankedItem> = Vec::with_capacity(items.len());
    for item in items {
        let name = display_name(&item.name);
        if name.chars().all(invisible) || shown.iter().any(|seen| seen.name == name) {
            continue;
        }
        shown.push(RankedItem {
            name,
            ..item.clone()
        });
    }
    shown
}

/// The whole deterministic analysis of `stats`.
pub fn local_draft(stats: &ListeningStats, max_words: usize) -> Draft {
    // Names as an answer shows them, in every sentence and list.
    let shown = ListeningStats {
        top_artists: shown_items(&stats.top_artists),
        top_genres: shown_items(&stats.top_genres),
        ..stats.clone()
    };
    let stats = &shown;
    let mood = mood(stats.feature_mean.as_ref());
    let personality = personality(stats);
    Draft {
        summary: summary(stats, &mood, &personality, max_words),
        mood,
        top_genres: stats.top_genres.iter().map(|g| g.name.clone()).collect(),
        top_artists: stats.top_artists.iter().map(|a| a.name.clone()).collect(),
        listening_personality: personality,
        recommendations: recommendations(stats),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{music::stats::RankedItem, text::word_count};

    fn features(valence: f64, energy: f64, danceability: f64, acousticness: f64) -> AudioFeatures {
        AudioFeatures {
            danceability,
            energy,
            valence,
            acousticness,
            tempo: 120.0,
            loudness: -6.0,
            ..AudioFeatures::default()
        }
    }

    fn ranked(name: &str, plays: u32) -> RankedItem {
        RankedItem {
            name: name.into(),
            plays,
            ms_played: u64::from(plays) * 200_000,
        }
    }

    /// 100 plays, 60 distinct tracks, 25 artists, evenly-ish spread, mostly at night.
    fn night_owl() -> ListeningStats {
        let mut hours = [0u32; 24];
        hours[23] = 30;
        hours[1] = 20;
        hours[15] = 50;
        ListeningStats {
            plays: 100,
            unique_tracks: 60,
            unique_artists: 25,
            unique_genres: 4,
            total_ms_played: 100 * 200_000,
            top_artists: vec![ranked("Daft Punk", 9), ranked("Robyn", 8), ranked("Air", 7)],
            top_genres: vec![ranked("dance pop", 70), ranked("electropop", 20)],
            plays_with_features: 100,
            feature_mean: Some(features(0.7, 0.8, 0.75, 0.1)),
            feature_stddev: Some(features(0.1, 0.1, 0.1, 0.1)),
            plays_by_hour: hours,
            plays_with_time: 100,
            untracked_plays: 0,
            diversity: 0.9,
            skips: 5,
            skip_rate: 0.05,
        }
    }

    #[test]
    fn mood_follows_valence_and_energy() {
        let cases = [
            ((0.8, 0.8, 0.5, 0.1), "upbeat"),
            ((0.8, 0.8, 0.8, 0.1), "upbeat and danceable"),
            ((0.2, 0.2, 0.3, 0.1), "melancholic"),
            ((0.2, 0.2, 0.3, 0.8), "melancholic and acoustic"),
            ((0.2, 0.9, 0.5, 0.1), "intense"),
            ((0.8, 0.2, 0.5, 0.1), "mellow"),
            ((0.5, 0.5, 0.5, 0.1), "balanced"),
            ((0.5, 0.2, 0.5, 0.1), "calm"),
            ((0.6, 0.4, 0.5, 0.1), "cheerful"),
        ];
        for ((v, e, d, a), expected) in cases {
            assert_eq!(
                mood(Some(&features(v, e, d, a))),
                expected,
                "{v} {e} {d} {a}"
            );
        }
        assert!(mood(None).starts_with("undetermined"));
    }

    #[test]
    fn personality_combines_time_behaviour_and_range() {
        assert_eq!(personality(&night_owl()), "night owl explorer");
        let restless = ListeningStats {
            skip_rate: 0.4,
            ..night_owl()
        };
        assert_eq!(personality(&restless), "night owl restless explorer");
        let mut daytime = night_owl();
        daytime.plays_by_hour = [0; 24];
        daytime.plays_by_hour[8] = 60;
        daytime.plays_by_hour[14] = 40;
        daytime.diversity = 0.4;
        assert_eq!(personality(&daytime), "early bird loyalist");
        let fan = ListeningStats {
            top_artists: vec![ranked("Robyn", 80)],
            plays_with_time: 0,
            ..night_owl()
        };
        assert_eq!(personality(&fan), "superfan");
        let replay = ListeningStats {
            unique_tracks: 30,
            plays_with_time: 0,
            diversity: 0.7,
            ..night_owl()
        };
        assert_eq!(personality(&replay), "on-repeat all-rounder");
    }

    #[test]
    fn recommendations_are_derived_from_the_data() {
        let recs = recommendations(&night_owl());
        assert!(
            recs[0].starts_with("50.0% of your timed plays fall late at night"),
            "{recs:?}"
        );
        assert!(recs[0].contains("calmer acoustic or ambient"));
        // "dance pop" is adjacent to pop; electropop is already played, so it is not suggested.
        assert_eq!(
            recs[1],
            "Explore indie pop and synth-pop, close to your top genre dance pop."
        );
        assert!(
            recs.iter()
                .any(|r| r.contains("danceable (mean danceability 0.75)"))
        );
        assert!(recs.len() <= ASKED_LIST_ITEMS);

        let sad = ListeningStats {
            feature_mean: Some(features(0.2, 0.3, 0.4, 0.7)),
            plays_by_hour: [0; 24],
            plays_with_time: 0,
            top_genres: vec![ranked("zydeco", 3)],
            ..night_owl()
        };
        let recs = recommendations(&sad);
        assert!(
            recs[0].contains("leans dark (mean valence 0.20)"),
            "{recs:?}"
        );
        assert!(recs.iter().any(|r| r.contains("acoustic sound")));
        assert!(recs.iter().any(|r| r.contains("low-energy")));

        let bare = ListeningStats {
            plays: 1,
            unique_tracks: 1,
            unique_artists: 1,
            top_artists: vec![ranked("Solo", 1)],
            ..ListeningStats::default()
        };
        assert_eq!(
            recommendations(&bare),
            [
                "Explore the deeper catalogue of Solo, your most played artist: albums and B-sides \
              beyond the hits."
            ]
        );
        assert_eq!(recommendations(&ListeningStats::default()).len(), 1);
    }

    #[test]
    fn summary_is_built_from_numbers_and_respects_the_budget() {
        let stats = night_owl();
        let text = summary(&stats, "upbeat and danceable", "night owl explorer", 300);
        assert_eq!(
            text,
            "100 plays of 60 distinct tracks by 25 artists (5 h 33 min of listening). \
             Your most played artist is Daft Punk (9 plays), followed by Robyn and Air. Top \
             genres: dance pop and electropop (dance pop is on 70.0% of plays). The music is \
             upbeat and danceable on average: valence 0.70, energy 0.80, danceability 0.75, \
             around 120 bpm. Listening peaks in the afternoon (50.0% of timed plays, UTC). \
             Artist diversity is high (0.90) and 5.0% of plays were skipped. Listening profile: \
             night owl explorer."
        );
        for budget in 1..80 {
            assert!(word_count(&summary(&stats, "x", "y", budget)) <= budget);
        }
    }

    #[test]
    fn the_profile_lists_the_computed_names() {
        let first = local_draft(&night_owl(), 300);
        assert_eq!(first.top_artists, ["Daft Punk", "Robyn", "Air"]);
        assert_eq!(first.top_genres, ["dance pop", "electropop"]);
    }

    #[test]
    fn genre_lookup_is_exact_then_by_whole_words() {
        assert_eq!(adjacent("Hip Hop").map(|n| n[0]), Some("jazz rap"));
        assert_eq!(adjacent("Dance/Electronic").map(|n| n[0]), Some("house"));
        assert_eq!(adjacent("canadian pop").map(|n| n[0]), Some("indie pop"));
        assert_eq!(adjacent("poppunk"), None);
        assert_eq!(adjacent(""), None);
    }
}
