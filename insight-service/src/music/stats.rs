//! The key data points of a listening history, computed in Rust in one pass.
//!
//! [`StatsBuilder`] is an accumulator: plays are added one at a time and never stored, so the
//! same code serves an inline history and a stream of stored plays. Its memory grows with the
//! number of distinct artists and genres (one counter each, at most [`MAX_TRACKED_NAMES`] of
//! each) and distinct tracks (an 8-byte fingerprint each), never with the number of plays;
//! [`StatsBuilder::max_heap_bytes`] bounds it.
//!
//! Output is deterministic: hash maps are only used for lookups; rankings sort with a total
//! tie-break (plays, then time, then name); feature sums are exact fixed-point integers and the
//! entropy sums counts in sorted order, so the same plays in any order give the same bytes.

use std::{
    collections::{HashMap, HashSet},
    hash::{DefaultHasher, Hash, Hasher},
    time::{SystemTime, UNIX_EPOCH},
};

use super::play::{AudioFeatures, FEATURE_COUNT, Play};

/// Artists and genres reported in the statistics (and in the prompt).
pub const TOP_ITEMS: usize = 5;

/// Most distinct artists, and most distinct genres, counted one by one. A play tagged with 32
/// new 128-byte genres is valid, so 100,000 stored plays could otherwise grow the genre counts
/// to 3.2 million names (about a gigabyte) behind a request of a few bytes. Listeners have a few
/// thousand artists at most, and catalogues about 6,000 genres; past this many, plays of names
/// not seen yet still count in the totals, but not as a name of their own (see
/// [`ListeningStats::untracked_plays`]).
pub const MAX_TRACKED_NAMES: usize = 10_000;

/// UTC hours 00:00-05:59. The four quarters of the day have equal length, so their shares can
/// be compared with each other (and with 25%, the share of an even spread).
pub const NIGHT_HOURS: std::ops::Range<usize> = 0..6;
/// UTC hours 06:00-11:59.
pub const MORNING_HOURS: std::ops::Range<usize> = 6..12;
/// UTC hours 12:00-17:59.
pub const AFTERNOON_HOURS: std::ops::Range<usize> = 12..18;
/// UTC hours 18:00-23:59.
pub const EVENING_HOURS: std::ops::Range<usize> = 18..24;
/// UTC hours 22:00-04:59: "late at night" for the night-owl label and the wind-down advice
/// (7 hours, 29% of plays for an even spread).
pub const LATE_NIGHT_HOURS: [usize; 7] = [22, 23, 0, 1, 2, 3, 4];
/// UTC hours 05:00-09:59: "early" for the early-bird label (5 hours, 21% for an even spread).
pub const EARLY_HOURS: std::ops::Range<usize> = 5..10;

/// A name ranked by plays and listening time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RankedItem {
    /// Artist name (trimmed; artists are told apart by exact name), or genre name (trimmed,
    /// lowercased, since catalogues disagree on the case of genres).
    pub name: String,
    /// Plays of this artist, or plays tagged with this genre.
    pub plays: u32,
    /// Milliseconds played.
    pub ms_played: u64,
}

/// The data points an analysis is built from, and that the prompt carries instead of the plays.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ListeningStats {
    /// Plays analyzed.
    pub plays: u32,
    /// Distinct track ids.
    pub unique_tracks: u32,
    /// Distinct artists.
    pub unique_artists: u32,
    /// Distinct genres.
    pub unique_genres: u32,
    /// Total listening time in milliseconds.
    pub total_ms_played: u64,
    /// Up to [`TOP_ITEMS`] artists by plays, then time, then name.
    pub top_artists: Vec<RankedItem>,
    /// Up to [`TOP_ITEMS`] genres by plays, then time, then name. A play counts once for each of
    /// its (distinct) genres, with its full time.
    pub top_genres: Vec<RankedItem>,
    /// Plays that carried audio features: the sample behind the means.
    pub plays_with_features: u32,
    /// Mean of each audio feature; `None` when no play had features.
    pub feature_mean: Option<AudioFeatures>,
    /// Population standard deviation of each audio feature; `None` when no play had features.
    pub feature_stddev: Option<AudioFeatures>,
    /// Plays per hour of day (UTC), index 0 = 00:00..00:59.
    pub plays_by_hour: [u32; 24],
    /// Plays with a known start time: the sample behind `plays_by_hour`.
    pub plays_with_time: u32,
    /// Artist diversity in `0..=1`: Shannon entropy of the plays per artist divided by its
    /// maximum `ln(unique_artists)`; 0 for a single artist, 1 when plays are spread evenly.
    pub diversity: f64,
    /// Plays of an artist, or tags of a genre, first met after [`MAX_TRACKED_NAMES`] others:
    /// counted in the totals but in no artist's or genre's tally; `unique_artists` and
    /// `unique_genres` then stop at the cap. 0 for any real listener.
    pub untracked_plays: u32,
    /// Plays counted as skipped (see [`Play::is_skip`]).
    pub skips: u32,
    /// `skips / plays`, 0 when there are no plays.
    pub skip_rate: f64,
}

impl ListeningStats {
    /// Statistics of a slice of plays (a convenience over [`StatsBuilder`]).
    pub fn from_plays<'a>(plays: impl IntoIterator<Item = &'a Play>) -> Self {
        let mut builder = StatsBuilder::new();
        for play in plays {
            builder.add(play);
        }
        builder.finish()
    }

    /// Share of timed plays whose UTC hour falls in `hours` (0 when no play had a time).
    pub fn share_of_hours(&self, hours: impl IntoIterator<Item = usize>) -> f64 {
        if self.plays_with_time == 0 {
            return 0.0;
        }
        let count: u64 = hours
            .into_iter()
            .filter_map(|h| self.plays_by_hour.get(h))
            .map(|&n| u64::from(n))
            .sum();
        count as f64 / f64::from(self.plays_with_time)
    }

    /// Share of plays that went to the most played artist (0 when there are no plays).
    pub fn top_artist_share(&self) -> f64 {
        match self.top_artists.first() {
            Some(top) if self.plays > 0 => f64::from(top.plays) / f64::from(self.plays),
            _ => 0.0,
        }
    }

    /// Share of plays that repeated a track already played: `1 - unique_tracks / plays`.
    pub fn repeat_rate(&self) -> f64 {
        if self.plays == 0 {
            return 0.0;
        }
        1.0 - f64::from(self.unique_tracks) / f64::from(self.plays)
    }
}

/// Plays and time of one artist or genre.
#[derive(Clone, Debug, Default)]
struct Tally {
    plays: u32,
    ms_played: u64,
}

/// Units per feature unit of the fixed-point sums (micro-units: Spotify publishes features with
/// at most about six significant decimals, so nothing of meaning is lost).
const FEATURE_SCALE: f64 = 1e6;

/// Exact running sums of one feature, in fixed point.
///
/// Integer sums are exact, so the mean and spread do not depend on the order of the plays (a
/// floating-point running mean such as Welford's differs in the last bits when the same plays
/// arrive in another order), and the variance `(n·Σq² − (Σq)²) / n²` is computed without the
/// cancellation that makes the naive floating formula lose precision. Features are validated to
/// |x| ≤ 1000, so |q| ≤ 10⁹ and the i128 sums hold billions of plays.
#[derive(Clone, Copy, Debug, Default)]
struct Moments {
    sum: i128,
    sum_sq: i128,
}

impl Moments {
    /// Adds one value (finite, |x| ≤ 1000: see [`AudioFeatures::is_plausible`]).
    fn add(&mut self, x: f64) {
        // A float-to-int `as` saturates; with the validated range it is exact to a micro-unit.
        let q = i128::from((x * FEATURE_SCALE).round() as i64);
        self.sum = self.sum.saturating_add(q);
        self.sum_sq = self.sum_sq.saturating_add(q * q);
    }

    /// Mean over `n` values.
    fn mean(&self, n: u64) -> f64 {
        if n == 0 {
            return 0.0;
        }
        self.sum as f64 / n as f64 / FEATURE_SCALE
    }

    /// Population standard deviation over `n` values (the plays are the whole population being
    /// described, not a sample of a larger one).
    fn stddev(&self, n: u64) -> f64 {
        if n == 0 {
            return 0.0;
        }
        let n_f = n as f64;
        let exact = i128::from(n)
            .checked_mul(self.sum_sq)
            .zip(self.sum.checked_mul(self.sum))
            .and_then(|(a, b)| a.checked_sub(b));
        let variance = match exact {
            Some(scaled) => scaled.max(0) as f64 / (n_f * n_f),
            // Only past billions of plays: the floating formula, still order-independent.
            None => {
                let mean = self.sum as f64 / n_f;
                (self.sum_sq as f64 / n_f - mean * mean).max(0.0)
            }
        };
        variance.sqrt() / FEATURE_SCALE
    }
}

/// One-pass accumulator of [`ListeningStats`]; see the module docs for its memory bound.
#[derive(Clone, Debug, Default)]
pub struct StatsBuilder {
    plays: u64,
    total_ms: u64,
    /// 64-bit fingerprints of the distinct track ids: 8 bytes per track instead of the id
    /// itself. Two ids collide with probability about n²/2⁶⁵ (≈3·10⁻¹⁰ for 100,000 tracks),
    /// which would undercount `unique_tracks` by one: an acceptable price for the bound.
    tracks: HashSet<u64>,
    artists: HashMap<String, Tally>,
    genres: HashMap<String, Tally>,
    untracked: u64,
    features: [Moments; FEATURE_COUNT],
    with_features: u64,
    by_hour: [u64; 24],
    with_time: u64,
    skips: u64,
}

impl StatsBuilder {
    /// An empty accumulator.
    pub fn new() -> Self {
        Self::default()
    }

    /// Upper bound of the heap an accumulator of up to `plays` plays holds: the artist and
    /// genre counts at their cap and longest names, and a fingerprint per track (hash tables
    /// at their largest load, counted twice for the growth that rehashes them).
    pub fn max_heap_bytes(plays: usize) -> u64 {
        const ENTRY: u64 = 24 + 16 + 8; // String, Tally, table slot and control byte, rounded up
        let names = MAX_TRACKED_NAMES as u64;
        let artists = names * (super::play::MAX_NAME_BYTES as u64 + ENTRY);
        let genres = names * (super::play::MAX_GENRE_BYTES as u64 + ENTRY);
        let tracks = plays as u64 * 16;
        2 * (artists + genres + tracks)
    }

    /// Adds one play. Never fails and never panics: sums saturate, and a feature set with a
    /// value out of range (NaN included) is ignored (validation rejects those earlier with a
    /// field path; this is the last line of defence for the means).
    pub fn add(&mut self, play: &Play) {
        self.plays = self.plays.saturating_add(1);
        self.total_ms = self.total_ms.saturating_add(play.ms_played);
        self.tracks.insert(fingerprint(&play.track_id));

        self.untracked += u64::from(!tally(
            &mut self.artists,
            play.artist.trim(),
            play.ms_played,
        ));
        // A play tagged ["pop", "Pop "] is one pop play: dedupe after normalizing. Plays carry
        // a handful of genres, so a linear scan beats a set here.
        let mut seen: Vec<String> = Vec::with_capacity(play.genres.len());
        for genre in &play.genres {
            let key = genre.trim().to_lowercase();
            if key.is_empty() || seen.contains(&key) {
                continue;
            }
            self.untracked += u64::from(!tally(&mut self.genres, &key, play.ms_played));
            seen.push(key);
        }

        if let Some(features) = play.features.filter(AudioFeatures::is_plausible) {
            self.with_features += 1;
            for (acc, x) in self.features.iter_mut().zip(features.to_array()) {
                acc.add(x);
            }
        }

        if let Some(at) = play.played_at {
            self.by_hour[utc_hour(at)] += 1;
            self.with_time += 1;
        }

        if play.is_skip() {
            self.skips += 1;
        }
    }

    /// The statistics of every play added so far.
    pub fn finish(self) -> ListeningStats {
        let (feature_mean, feature_stddev) = if self.with_features == 0 {
            (None, None)
        } else {
            (
                Some(AudioFeatures::from_array(
                    self.features.map(|m| m.mean(self.with_features)),
                )),
                Some(AudioFeatures::from_array(
                    self.features.map(|m| m.stddev(self.with_features)),
                )),
            )
        };
        let skip_rate = if self.plays == 0 {
            0.0
        } else {
            self.skips as f64 / self.plays as f64
        };
        ListeningStats {
            plays: saturate(self.plays),
            unique_tracks: saturate(self.tracks.len() as u64),
            unique_artists: saturate(self.artists.len() as u64),
            unique_genres: saturate(self.genres.len() as u64),
            total_ms_played: self.total_ms,
            diversity: normalized_entropy(&self.artists),
            top_artists: top(self.artists, TOP_ITEMS),
            top_genres: top(self.genres, TOP_ITEMS),
            plays_with_features: saturate(self.with_features),
            feature_mean,
            feature_stddev,
            plays_by_hour: self.by_hour.map(saturate),
            plays_with_time: saturate(self.with_time),
            untracked_plays: saturate(self.untracked),
            skips: saturate(self.skips),
            skip_rate,
        }
    }
}

/// Counts a play for `name`, allocating the key only the first time it is seen; `false` (not
/// counted) for a new name once [`MAX_TRACKED_NAMES`] are.
fn tally(map: &mut HashMap<String, Tally>, name: &str, ms_played: u64) -> bool {
    if let Some(entry) = map.get_mut(name) {
        entry.plays = entry.plays.saturating_add(1);
        entry.ms_played = entry.ms_played.saturating_add(ms_played);
        return true;
    }
    if map.len() >= MAX_TRACKED_NAMES {
        return false;
    }
    map.insert(
        name.to_owned(),
        Tally {
            plays: 1,
            ms_played,
        },
    );
    true
}

/// The `k` largest tallies by plays, then time, then name (so ties are broken the same way on
/// every run).
fn top(map: HashMap<String, Tally>, k: usize) -> Vec<RankedItem> {
    let mut items: Vec<RankedItem> = map
        .into_iter()
        .map(|(name, t)| RankedItem {
            name,
            plays: t.plays,
            ms_played: t.ms_played,
        })
        .collect();
    let order = |a: &RankedItem, b: &RankedItem| {
        b.plays
            .cmp(&a.plays)
            .then(b.ms_played.cmp(&a.ms_played))
            .then_with(|| a.name.cmp(&b.name))
    };
    if k == 0 {
        return Vec::new();
    }
    // Partition first so that only the k winners are fully sorted (10,000 artists, 5 shown).
    if items.len() > k {
        items.select_nth_unstable_by(k - 1, order);
        items.truncate(k);
    }
    items.sort_unstable_by(order);
    items
}

/// Shannon entropy of the play counts divided by `ln(distinct)`, in `0..=1`; 0 for fewer than
/// two artists. Uses `H = ln N - (1/N) Σ c ln c` over counts sorted ascending, so the floating
/// sum does not depend on hash order.
fn normalized_entropy(map: &HashMap<String, Tally>) -> f64 {
    if map.len() < 2 {
        return 0.0;
    }
    let mut counts: Vec<u32> = map.values().map(|t| t.plays).filter(|&c| c > 0).collect();
    counts.sort_unstable();
    let total: f64 = counts.iter().map(|&c| f64::from(c)).sum();
    if total <= 0.0 {
        return 0.0;
    }
    let sum_c_ln_c: f64 = counts
        .iter()
        .map(|&c| {
            let c = f64::from(c);
            c * c.ln()
        })
        .sum();
    let entropy = total.ln() - sum_c_ln_c / total;
    (entropy / (map.len() as f64).ln()).clamp(0.0, 1.0)
}

/// A stable 64-bit fingerprint of a track id. `DefaultHasher::new()` is SipHash with fixed
/// keys, so the count of distinct tracks does not vary from run to run.
fn fingerprint(track_id: &str) -> u64 {
    let mut hasher = DefaultHasher::new();
    track_id.hash(&mut hasher);
    hasher.finish()
}

/// Hour of day (UTC) of an instant, also for instants before 1970.
fn utc_hour(at: SystemTime) -> usize {
    const DAY: i128 = 86_400;
    let seconds: i128 = match at.duration_since(UNIX_EPOCH) {
        Ok(after) => i128::from(after.as_secs()),
        // Before the epoch: -1.5 s is hour 23 of 1969-12-31, so round toward minus infinity.
        Err(before) => {
            let d = before.duration();
            -i128::from(d.as_secs()) - i128::from(d.subsec_nanos() > 0)
        }
    };
    // rem_euclid of a positive modulus is in 0..86_400, so the hour is in 0..24 and the cast
    // and the array index cannot fail.
    (seconds.rem_euclid(DAY) / 3_600) as usize
}

/// Counts are accumulated in u64 (a stream may be long); the proto reports u32.
fn saturate(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn at(hour: u64, minute: u64) -> Option<SystemTime> {
        // 2024-01-01T00:00:00Z plus the given time of day.
        Some(UNIX_EPOCH + Duration::from_secs(1_704_067_200 + hour * 3_600 + minute * 60))
    }

    fn features(energy: f64, valence: f64, tempo: f64) -> Option<AudioFeatures> {
        Some(AudioFeatures {
            danceability: 0.5,
            energy,
            valence,
            acousticness: 0.1,
            instrumentalness: 0.0,
            speechiness: 0.05,
            liveness: 0.1,
            tempo,
            loudness: -6.0,
        })
    }

    #[test]
    fn names_past_the_cap_count_in_the_totals_but_not_as_names() {
        let mut builder = StatsBuilder::new();
        for i in 0..MAX_TRACKED_NAMES {
            builder.add(&play(
                &format!("t{i}"),
                &format!("artist {i}"),
                &[],
                None,
                1,
                None,
                false,
                None,
            ));
        }
        // A new artist past the cap: not tallied. A known one: still counted.
        let late = play(
            "late",
            "newcomer",
            &["new genre"],
            None,
            1,
            None,
            false,
            None,
        );
        builder.add(&late);
        builder.add(&late);
        let known = play("t0", "artist 0", &[], None, 1, None, false, None);
        builder.add(&known);
        let stats = builder.finish();
        assert_eq!(stats.plays as usize, MAX_TRACKED_NAMES + 3);
        assert_eq!(stats.unique_artists as usize, MAX_TRACKED_NAMES);
        assert_eq!(stats.untracked_plays, 2);
        assert_eq!(stats.top_artists[0].name, "artist 0");
        assert_eq!(stats.top_artists[0].plays, 2);
        assert!(stats.top_artists.iter().all(|a| a.name != "newcomer"));
        // Genres were not full: the new one is counted.
        assert_eq!(stats.unique_genres, 1);
    }

    #[allow(clippy::too_many_arguments)]
    fn play(
        track: &str,
        artist: &str,
        genres: &[&str],
        hour: Option<(u64, u64)>,
        ms_played: u64,
        duration: Option<u64>,
        skipped: bool,
        f: Option<AudioFeatures>,
    ) -> Play {
        Play {
            track_id: track.into(),
            track_name: format!("Song {track}"),
            artist: artist.into(),
            genres: genres.iter().map(|g| (*g).to_owned()).collect(),
            played_at: hour.and_then(|(h, m)| at(h, m)),
            ms_played,
            features: f,
            skipped,
            duration_ms: duration,
        }
    }

    /// Six plays, hand-made so every expected value below can be checked by hand.
    fn history() -> Vec<Play> {
        vec![
            // A: 3 plays, 600 s; B: 2 plays, 400 s; C: 1 play, 10 s (a skip by length).
            play(
                "t1",
                "A",
                &["pop", "dance"],
                Some((23, 10)),
                200_000,
                Some(200_000),
                false,
                features(0.8, 0.6, 120.0),
            ),
            play(
                "t1",
                "A",
                &["Pop "],
                Some((23, 50)),
                200_000,
                Some(200_000),
                false,
                features(0.6, 0.4, 100.0),
            ),
            play(
                "t2",
                " A",
                &["pop", "pop"],
                Some((1, 0)),
                200_000,
                None,
                false,
                None,
            ),
            play(
                "t3",
                "B",
                &["rock"],
                Some((14, 5)),
                300_000,
                Some(300_000),
                false,
                features(1.0, 0.2, 140.0),
            ),
            play(
                "t4",
                "B",
                &["rock", "pop"],
                None,
                100_000,
                Some(250_000),
                true,
                None,
            ),
            play(
                "t5",
                "C",
                &[],
                Some((9, 59)),
                10_000,
                Some(180_000),
                false,
                features(0.6, 0.8, 100.0),
            ),
        ]
    }

    #[test]
    fn hand_made_history_gives_exact_values() {
        let stats = ListeningStats::from_plays(&history());
        assert_eq!(stats.plays, 6);
        assert_eq!(stats.unique_tracks, 5);
        assert_eq!(stats.unique_artists, 3, "\" A\" and \"A\" are one artist");
        assert_eq!(stats.unique_genres, 3);
        assert_eq!(stats.total_ms_played, 1_010_000);
        assert_eq!(
            stats.top_artists,
            [
                RankedItem {
                    name: "A".into(),
                    plays: 3,
                    ms_played: 600_000
                },
                RankedItem {
                    name: "B".into(),
                    plays: 2,
                    ms_played: 400_000
                },
                RankedItem {
                    name: "C".into(),
                    plays: 1,
                    ms_played: 10_000
                },
            ]
        );
        assert_eq!(
            stats.top_genres,
            [
                RankedItem {
                    name: "pop".into(),
                    plays: 4,
                    ms_played: 700_000
                },
                RankedItem {
                    name: "rock".into(),
                    plays: 2,
                    ms_played: 400_000
                },
                RankedItem {
                    name: "dance".into(),
                    plays: 1,
                    ms_played: 200_000
                },
            ]
        );
        // Features on 4 plays: energy 0.8, 0.6, 1.0, 0.6 -> mean 0.75, variance 0.0275.
        assert_eq!(stats.plays_with_features, 4);
        let mean = stats.feature_mean.unwrap_or_default();
        let sd = stats.feature_stddev.unwrap_or_default();
        assert!((mean.energy - 0.75).abs() < 1e-12, "{}", mean.energy);
        assert!(
            (sd.energy - 0.0275f64.sqrt()).abs() < 1e-12,
            "{}",
            sd.energy
        );
        // Valence 0.6, 0.4, 0.2, 0.8 -> mean 0.5, variance 0.05.
        assert!((mean.valence - 0.5).abs() < 1e-12);
        assert!((sd.valence - 0.05f64.sqrt()).abs() < 1e-12);
        // Tempo 120, 100, 140, 100 -> mean 115, variance 275.
        assert!((mean.tempo - 115.0).abs() < 1e-9);
        assert!((sd.tempo - 275f64.sqrt()).abs() < 1e-9);
        // Constant features have zero spread.
        assert_eq!(mean.loudness, -6.0);
        assert_eq!(sd.loudness, 0.0);
        let mut hours = [0u32; 24];
        hours[23] = 2;
        hours[1] = 1;
        hours[14] = 1;
        hours[9] = 1;
        assert_eq!(stats.plays_by_hour, hours);
        assert_eq!(stats.plays_with_time, 5);
        // Counts 3, 2, 1 of 6: H = ln 6 - (3 ln 3 + 2 ln 2) / 6, normalized by ln 3.
        let h = 6f64.ln() - (3.0 * 3f64.ln() + 2.0 * 2f64.ln()) / 6.0;
        assert!(
            (stats.diversity - h / 3f64.ln()).abs() < 1e-12,
            "{}",
            stats.diversity
        );
        // t4 flagged, t5 10 s of 180 s.
        assert_eq!(stats.skips, 2);
        assert!((stats.skip_rate - 2.0 / 6.0).abs() < 1e-12);
        assert!((stats.share_of_hours([23, 0, 1]) - 0.6).abs() < 1e-12);
        assert!((stats.top_artist_share() - 0.5).abs() < 1e-12);
        assert!((stats.repeat_rate() - 1.0 / 6.0).abs() < 1e-12);
    }

    #[test]
    fn order_of_plays_does_not_change_a_single_bit() {
        let plays = history();
        let forward = ListeningStats::from_plays(&plays);
        let backward = ListeningStats::from_plays(plays.iter().rev());
        assert_eq!(format!("{forward:?}"), format!("{backward:?}"));
    }

    #[test]
    fn edge_cases_stay_finite() {
        let empty = StatsBuilder::new().finish();
        assert_eq!(empty.plays, 0);
        assert_eq!(empty.skip_rate, 0.0);
        assert_eq!(empty.diversity, 0.0);
        assert_eq!(empty.feature_mean, None);
        assert_eq!(empty.top_artist_share(), 0.0);
        assert_eq!(empty.repeat_rate(), 0.0);
        assert_eq!(empty.share_of_hours(0..24), 0.0);

        // One artist: diversity 0. Even spread: diversity 1.
        let one = ListeningStats::from_plays(&[play("t", "A", &[], None, 1, None, false, None)]);
        assert_eq!(one.diversity, 0.0);
        let even: Vec<Play> = ["A", "B", "C", "D"]
            .iter()
            .map(|a| play("t", a, &[], None, 1, None, false, None))
            .collect();
        assert!((ListeningStats::from_plays(&even).diversity - 1.0).abs() < 1e-12);

        // NaN features are ignored, huge times saturate, names may be empty.
        let mut builder = StatsBuilder::new();
        builder.add(&play(
            "",
            "",
            &[""],
            None,
            u64::MAX,
            Some(1),
            false,
            features(f64::NAN, 0.5, 1.0),
        ));
        builder.add(&play("", "", &[], None, u64::MAX, None, false, None));
        let odd = builder.finish();
        assert_eq!(odd.total_ms_played, u64::MAX);
        assert_eq!(odd.feature_mean, None);
        assert_eq!(odd.unique_genres, 0);
    }

    #[test]
    fn hours_are_utc_and_work_before_the_epoch() {
        assert_eq!(utc_hour(UNIX_EPOCH), 0);
        assert_eq!(
            utc_hour(UNIX_EPOCH + Duration::from_secs(3_600 * 25 + 1)),
            1
        );
        assert_eq!(utc_hour(UNIX_EPOCH - Duration::from_millis(1_500)), 23);
        assert_eq!(utc_hour(UNIX_EPOCH - Duration::from_secs(3_600)), 23);
        assert_eq!(utc_hour(UNIX_EPOCH - Duration::from_secs(3_601)), 22);
    }

    #[test]
    fn top_keeps_only_k_with_total_tie_break() {
        let mut builder = StatsBuilder::new();
        for (i, artist) in ["d", "c", "b", "a", "e", "f", "g"].iter().enumerate() {
            for _ in 0..(i % 2 + 1) {
                builder.add(&play("t", artist, &[], None, 1_000, None, false, None));
            }
        }
        let names: Vec<String> = builder
            .finish()
            .top_artists
            .into_iter()
            .map(|i| i.name)
            .collect();
        // Two plays: c, a, f; one play: b, d, e, g (by name).
        assert_eq!(names, ["a", "c", "f", "b", "d"]);
    }
}
