//! One play of a track, and the input rules a play must meet before it is analyzed.
//!
//! The rules are strict on purpose: every number that reaches the statistics is finite and in a
//! plausible range, and every string is bounded, so that no input can turn a mean into NaN, a sum
//! into an overflow, or a name into a megabyte of prompt.

use std::time::SystemTime;

use super::MusicError;

/// Longest accepted `track_id`, in bytes: catalogue ids are short (Spotify's are 22 characters),
/// and ids are kept per distinct track.
pub const MAX_TRACK_ID_BYTES: usize = 256;
/// Longest accepted artist or track name, in bytes: far above real names, low enough that the
/// per-artist table stays small.
pub const MAX_NAME_BYTES: usize = 512;
/// Most genres on one play: real catalogues tag an artist with a handful, rarely twenty.
pub const MAX_GENRES_PER_PLAY: usize = 32;
/// Longest accepted genre name, in bytes.
pub const MAX_GENRE_BYTES: usize = 128;
/// Longest plausible play or track, in milliseconds (24 hours): anything longer is a unit
/// mistake, and the bound keeps sums of 100,000 plays far from overflowing.
pub const MAX_PLAY_MS: u64 = 24 * 60 * 60 * 1000;
/// Highest accepted loudness in dB. Mastered tracks sit between about -60 and 0 dB; a few
/// measure slightly above 0, so a little headroom is allowed, but not values that cannot be dB.
pub const MAX_LOUDNESS_DB: f64 = 5.0;
/// Lowest accepted loudness in dB (below the quietest real master).
pub const MIN_LOUDNESS_DB: f64 = -100.0;
/// Highest accepted tempo in beats per minute: well above any real track (~250), it only
/// rejects values that are not tempos.
pub const MAX_TEMPO_BPM: f64 = 1000.0;

/// Spotify-style audio features of a track. The ratio features are in `0..=1`; `tempo` is in
/// beats per minute and `loudness` in dB. Kept as plain numbers so they can be averaged.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AudioFeatures {
    /// How suitable for dancing, 0..=1.
    pub danceability: f64,
    /// Perceived intensity, 0..=1.
    pub energy: f64,
    /// Musical positiveness, 0..=1.
    pub valence: f64,
    /// Confidence the track is acoustic, 0..=1.
    pub acousticness: f64,
    /// Likelihood of no vocals, 0..=1.
    pub instrumentalness: f64,
    /// Presence of spoken words, 0..=1.
    pub speechiness: f64,
    /// Presence of an audience, 0..=1.
    pub liveness: f64,
    /// Beats per minute, >= 0.
    pub tempo: f64,
    /// Overall loudness in dB, typically -60..=0.
    pub loudness: f64,
}

/// Number of features in [`AudioFeatures`]; the statistics keep one accumulator per feature.
pub(crate) const FEATURE_COUNT: usize = 9;

impl AudioFeatures {
    /// Names of the features in [`Self::to_array`] order, as the proto and prompts spell them.
    pub(crate) const NAMES: [&'static str; FEATURE_COUNT] = [
        "danceability",
        "energy",
        "valence",
        "acousticness",
        "instrumentalness",
        "speechiness",
        "liveness",
        "tempo",
        "loudness",
    ];

    /// The features as an array, so statistics and validation can loop instead of repeating
    /// themselves nine times.
    pub(crate) fn to_array(self) -> [f64; FEATURE_COUNT] {
        [
            self.danceability,
            self.energy,
            self.valence,
            self.acousticness,
            self.instrumentalness,
            self.speechiness,
            self.liveness,
            self.tempo,
            self.loudness,
        ]
    }

    /// The inverse of [`Self::to_array`].
    pub(crate) fn from_array(values: [f64; FEATURE_COUNT]) -> Self {
        let [
            danceability,
            energy,
            valence,
            acousticness,
            instrumentalness,
            speechiness,
            liveness,
            tempo,
            loudness,
        ] = values;
        Self {
            danceability,
            energy,
            valence,
            acousticness,
            instrumentalness,
            speechiness,
            liveness,
            tempo,
            loudness,
        }
    }

    /// The accepted range and unit of the feature called `name`.
    fn range(name: &str) -> (f64, f64, &'static str) {
        match name {
            "tempo" => (0.0, MAX_TEMPO_BPM, " bpm"),
            "loudness" => (MIN_LOUDNESS_DB, MAX_LOUDNESS_DB, " dB"),
            _ => (0.0, 1.0, ""),
        }
    }

    /// The first feature outside its range, with its value; `None` when all are plausible.
    fn first_implausible(&self) -> Option<(&'static str, f64)> {
        Self::NAMES
            .iter()
            .zip(self.to_array())
            .find(|(name, value)| {
                let (low, high, _) = Self::range(name);
                // `contains` is false for NaN, so NaN and infinities are out of range too.
                !(low..=high).contains(value)
            })
            .map(|(name, value)| (*name, value))
    }

    /// Whether every feature is finite and in range. Statistics ignore feature sets that are
    /// not, so that one bad value cannot distort every mean even if validation was skipped.
    pub fn is_plausible(&self) -> bool {
        self.first_implausible().is_none()
    }

    /// Checks ranges: ratio features in `0..=1`, tempo in `0..=MAX_TEMPO_BPM`, loudness in
    /// `MIN_LOUDNESS_DB..=MAX_LOUDNESS_DB`, all finite. Field paths are relative (`"energy"`).
    pub fn validate(&self) -> Result<(), MusicError> {
        match self.first_implausible() {
            None => Ok(()),
            Some((name, value)) => {
                let (low, high, unit) = Self::range(name);
                // Far out of range in scientific notation: `1e308` as written by `{}` is 309
                // digits of a number nobody needs to read in full.
                let got = if value.is_finite() && (value.abs() >= 1e6 || value.abs() < 1e-6) {
                    format!("{value:e}")
                } else {
                    format!("{value}")
                };
                Err(MusicError::invalid(
                    name,
                    format!("must be a number in {low}..={high}{unit}, got {got}"),
                ))
            }
        }
    }
}

/// One play of a track by the listener.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Play {
    /// Catalogue id of the track; required. Counts distinct tracks; never sent to an LLM.
    pub track_id: String,
    /// Track title; may be empty.
    pub track_name: String,
    /// Main artist; required.
    pub artist: String,
    /// Genres of the track or its artist; may be empty.
    pub genres: Vec<String>,
    /// When the play started, if known (feeds the time-of-day pattern).
    pub played_at: Option<SystemTime>,
    /// How long it was played, in milliseconds (0 = unknown).
    pub ms_played: u64,
    /// Audio features, when known.
    pub features: Option<AudioFeatures>,
    /// The listener skipped the track (as reported by the client).
    pub skipped: bool,
    /// Full track length in milliseconds, when known; lets a short play count as a skip.
    pub duration_ms: Option<u64>,
}

impl Play {
    /// Checks one play against the input rules. Field paths are relative to the play
    /// (`"artist"`, `"features.energy"`); see [`MusicError::within`] to prefix them.
    pub fn validate(&self) -> Result<(), MusicError> {
        check_text("track_id", &self.track_id, MAX_TRACK_ID_BYTES, true)?;
        check_text("artist", &self.artist, MAX_NAME_BYTES, true)?;
        check_text("track_name", &self.track_name, MAX_NAME_BYTES, false)?;
        if self.genres.len() > MAX_GENRES_PER_PLAY {
            return Err(MusicError::invalid(
                "genres",
                format!(
                    "at most {MAX_GENRES_PER_PLAY} genres per play, got {}",
                    self.genres.len()
                ),
            ));
        }
        for (i, genre) in self.genres.iter().enumerate() {
            check_text(&format!("genres[{i}]"), genre, MAX_GENRE_BYTES, true)?;
        }
        if self.ms_played > MAX_PLAY_MS {
            return Err(MusicError::invalid(
                "ms_played",
                format!(
                    "must be at most {MAX_PLAY_MS} (24 hours), got {}",
                    self.ms_played
                ),
            ));
        }
        if let Some(duration) = self.duration_ms
            && duration > MAX_PLAY_MS
        {
            return Err(MusicError::invalid(
                "duration_ms",
                format!("must be at most {MAX_PLAY_MS} (24 hours), got {duration}"),
            ));
        }
        if let Some(features) = &self.features {
            features.validate().map_err(|e| e.within("features"))?;
        }
        Ok(())
    }

    /// Whether this play counts as a skip: the client said so, or less than
    /// [`super::SKIP_THRESHOLD_MS`] (30 s, the threshold streaming services use for a "stream")
    /// of a track of known length was played. A track shorter than 30 s counts as skipped only
    /// when it was not played to its end. A play with `ms_played == 0` is not judged by length,
    /// because proto3 cannot tell 0 from "not reported".
    pub fn is_skip(&self) -> bool {
        if self.skipped {
            return true;
        }
        match self.duration_ms {
            Some(duration) if duration > 0 && self.ms_played > 0 => {
                self.ms_played < duration.min(super::SKIP_THRESHOLD_MS)
            }
            _ => false,
        }
    }
}

/// Checks a string field: non-empty (when required) after trimming, at most `max_bytes`.
fn check_text(
    field: &str,
    value: &str,
    max_bytes: usize,
    required: bool,
) -> Result<(), MusicError> {
    if required && value.trim().is_empty() {
        return Err(MusicError::invalid(field, "must not be empty"));
    }
    if value.len() > max_bytes {
        return Err(MusicError::invalid(
            field,
            format!("must be at most {max_bytes} bytes, got {}", value.len()),
        ));
    }
    Ok(())
}

/// Checks a whole inline history: at least one play, at most `max_plays` (the server cap), and
/// every play valid. Field paths are `history.plays` and `history.plays[i].<field>`, as the
/// caller wrote the request.
pub fn validate_plays(plays: &[Play], max_plays: usize) -> Result<(), MusicError> {
    check_play_count(plays.len(), max_plays)?;
    for (i, play) in plays.iter().enumerate() {
        play.validate()
            .map_err(|e| e.within(&format!("history.plays[{i}]")))?;
    }
    Ok(())
}

/// The count rule of [`validate_plays`], on its own so the gRPC adapter can apply it before
/// converting a single play.
pub fn check_play_count(count: usize, max_plays: usize) -> Result<(), MusicError> {
    if count == 0 {
        return Err(MusicError::invalid(
            "history.plays",
            "at least one play is required",
        ));
    }
    if count > max_plays {
        return Err(MusicError::invalid(
            "history.plays",
            format!("at most {max_plays} plays are accepted (server cap), got {count}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn play() -> Play {
        Play {
            track_id: "t1".into(),
            track_name: "Song".into(),
            artist: "Artist".into(),
            genres: vec!["pop".into()],
            ms_played: 200_000,
            features: Some(AudioFeatures {
                danceability: 0.5,
                energy: 0.5,
                valence: 0.5,
                tempo: 120.0,
                loudness: -6.0,
                ..AudioFeatures::default()
            }),
            duration_ms: Some(200_000),
            ..Play::default()
        }
    }

    fn field_of(result: Result<(), MusicError>) -> String {
        match result {
            Err(MusicError::InvalidArgument { field, .. }) => field,
            other => panic!("expected InvalidArgument, got {other:?}"),
        }
    }

    #[test]
    fn far_out_of_range_features_are_shown_short() {
        let reason = |value: f64| {
            let mut p = play();
            set_feature(&mut p, |f| &mut f.tempo, value);
            match p.features.as_ref().map(AudioFeatures::validate) {
                Some(Err(MusicError::InvalidArgument { reason, .. })) => reason,
                other => panic!("expected InvalidArgument, got {other:?}"),
            }
        };
        assert!(reason(1e308).ends_with("got 1e308"), "{}", reason(1e308));
        assert!(
            reason(-1e-300).ends_with("got -1e-300"),
            "{}",
            reason(-1e-300)
        );
        assert!(
            reason(f64::NAN).ends_with("got NaN"),
            "{}",
            reason(f64::NAN)
        );
        assert!(reason(-2.5).ends_with("got -2.5"), "{}", reason(-2.5));
    }

    #[test]
    fn a_plausible_play_is_valid() {
        assert!(play().validate().is_ok());
        assert!(validate_plays(&[play()], 1).is_ok());
    }

    /// A mutation of a valid play that breaks one rule.
    type Breakage = fn(&mut Play);

    /// Sets the feature picked by `pick` to `value`.
    fn set_feature(p: &mut Play, pick: fn(&mut AudioFeatures) -> &mut f64, value: f64) {
        if let Some(f) = p.features.as_mut() {
            *pick(f) = value;
        }
    }

    #[test]
    fn each_rule_names_its_field() {
        let cases: [(Breakage, &str); 13] = [
            (|p| p.track_id = " ".into(), "track_id"),
            (|p| p.artist = String::new(), "artist"),
            (|p| p.track_id = "x".repeat(300), "track_id"),
            (|p| p.track_name = "x".repeat(600), "track_name"),
            (|p| p.genres = vec!["pop".into(), "".into()], "genres[1]"),
            (|p| p.genres = vec!["g".into(); 33], "genres"),
            (|p| p.ms_played = MAX_PLAY_MS + 1, "ms_played"),
            (|p| p.duration_ms = Some(u64::MAX), "duration_ms"),
            (
                |p| set_feature(p, |f| &mut f.energy, f64::NAN),
                "features.energy",
            ),
            (
                |p| set_feature(p, |f| &mut f.valence, 1.01),
                "features.valence",
            ),
            (|p| set_feature(p, |f| &mut f.tempo, -1.0), "features.tempo"),
            (
                |p| set_feature(p, |f| &mut f.loudness, f64::INFINITY),
                "features.loudness",
            ),
            (
                |p| set_feature(p, |f| &mut f.loudness, 12.0),
                "features.loudness",
            ),
        ];
        for (mutate, field) in cases {
            let mut p = play();
            mutate(&mut p);
            assert_eq!(field_of(p.validate()), field);
            let plays = [play(), play(), play(), p];
            assert_eq!(
                field_of(validate_plays(&plays, 10)),
                format!("history.plays[3].{field}")
            );
        }
    }

    #[test]
    fn history_size_is_bounded_on_both_sides() {
        assert_eq!(field_of(validate_plays(&[], 10)), "history.plays");
        let err = validate_plays(&[play(), play(), play()], 2);
        assert!(
            matches!(&err, Err(MusicError::InvalidArgument { reason, .. }) if reason.contains("at most 2")),
            "{err:?}"
        );
    }

    #[test]
    fn skips_come_from_the_flag_or_a_short_play_of_known_length() {
        let base = play();
        assert!(!base.is_skip());
        assert!(
            Play {
                skipped: true,
                ..play()
            }
            .is_skip()
        );
        assert!(
            Play {
                ms_played: 29_999,
                ..play()
            }
            .is_skip()
        );
        assert!(
            !Play {
                ms_played: 30_000,
                ..play()
            }
            .is_skip()
        );
        // Unknown length or unreported time: only the flag counts.
        assert!(
            !Play {
                ms_played: 1_000,
                duration_ms: None,
                ..play()
            }
            .is_skip()
        );
        assert!(
            !Play {
                ms_played: 0,
                ..play()
            }
            .is_skip()
        );
        // A 20 s jingle played to its end is not a skip; half of it is.
        let jingle = Play {
            duration_ms: Some(20_000),
            ms_played: 20_000,
            ..play()
        };
        assert!(!jingle.is_skip());
        assert!(
            Play {
                ms_played: 10_000,
                ..jingle
            }
            .is_skip()
        );
    }
}
