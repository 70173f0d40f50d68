//! Text for people: the `check` table, and the one-row-per-reading table of `watch`.
//!
//! `watch` prints its header before it knows any reading, so its columns have fixed widths
//! wide enough for every realistic figure; a wider one only shifts the rest of its own row.

use std::time::SystemTime;

use spotifai_proto::monitor::{self as pb, MemorySample};

use crate::probe::{Level, Sample, format_rfc3339};

const MIB: f64 = 1024.0 * 1024.0;

/// `bytes` in MiB with one decimal, without the unit (for table cells under a "MiB" header).
pub fn mib_figure(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / MIB)
}

fn mib(bytes: u64) -> String {
    format!("{} MiB", mib_figure(bytes))
}

fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_owned(), |value| format!("{value:.2}%"))
}

/// `at` as RFC 3339 with milliseconds, or "unknown" when absent or unformattable.
pub fn time_cell(at: Option<SystemTime>) -> String {
    at.and_then(format_rfc3339)
        .unwrap_or_else(|| "unknown".to_owned())
}

/// The reading as an aligned two-column table (label, value), one figure per line.
pub fn render_table(sample: &Sample) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |label: &str, value: String| rows.push((label.to_owned(), value));

    row("time", time_cell(Some(sample.at)));
    row("process pid", sample.process.pid.to_string());
    row("process rss", mib(sample.process.rss_bytes));
    row("process virtual", mib(sample.process.virtual_bytes));
    for target in &sample.targets {
        row(&format!("pid {} rss", target.pid), mib(target.rss_bytes));
        row(
            &format!("pid {} virtual", target.pid),
            mib(target.virtual_bytes),
        );
    }
    match &sample.cgroup {
        None => row("cgroup", "no memory controller found".to_owned()),
        Some(group) => {
            row("cgroup version", group.version.as_str().to_owned());
            row("cgroup path", group.path.to_string());
            row("cgroup current", mib(group.current_bytes));
            row(
                "cgroup limit",
                if group.max_bytes == 0 {
                    "unlimited".to_owned()
                } else {
                    mib(group.max_bytes)
                },
            );
            row("cgroup working set", mib(group.working_set_bytes));
            row("cgroup anon", mib(group.anon_bytes));
            row("cgroup file", mib(group.file_bytes));
            row("cgroup oom kills", group.oom_kills.to_string());
            row(
                "cgroup pressure",
                format!(
                    "some {} / full {} (avg10)",
                    percent(group.pressure_some_avg10),
                    percent(group.pressure_full_avg10)
                ),
            );
        }
    }
    row("system total", mib(sample.system.total_bytes));
    row("system available", mib(sample.system.available_bytes));
    row("system swap total", mib(sample.system.swap_total_bytes));
    row("system swap used", mib(sample.system.swap_used_bytes));
    let basis = match &sample.cgroup {
        Some(group) if group.max_bytes > 0 => "working set / cgroup limit",
        _ => "used / system total",
    };
    row(
        "usage ratio",
        format!("{:.1}% ({basis})", sample.usage_ratio * 100.0),
    );
    row("level", sample.level.as_str().to_owned());

    let width = rows.iter().map(|(label, _)| label.len()).max().unwrap_or(0);
    rows.iter()
        .map(|(label, value)| format!("{label:<width$}  {value}"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// The figures of one `watch` row, from a local [`Sample`] or a server's [`MemorySample`].
#[derive(Clone, Debug, PartialEq)]
pub struct SampleRow {
    /// When the reading was taken; `None` if the server sent no time.
    pub at: Option<SystemTime>,
    /// Sequence number.
    pub seq: u64,
    /// Resident set of the monitored process, in bytes.
    pub rss_bytes: u64,
    /// Cgroup working set and limit (0 = unlimited) in bytes; `None` without a cgroup.
    pub cgroup: Option<(u64, u64)>,
    /// Usage ratio (0..=1, may briefly exceed 1).
    pub usage_ratio: f64,
    /// PSI "some" avg10 in percent; `None` when unknown.
    pub pressure_some_avg10: Option<f64>,
    /// Level; `None` when the server left it unspecified.
    pub level: Option<Level>,
}

impl From<&Sample> for SampleRow {
    fn from(sample: &Sample) -> Self {
        Self {
            at: Some(sample.at),
            seq: sample.seq,
            rss_bytes: sample.process.rss_bytes,
            cgroup: sample
                .cgroup
                .as_ref()
                .map(|group| (group.working_set_bytes, group.max_bytes)),
            usage_ratio: sample.usage_ratio,
            pressure_some_avg10: sample
                .cgroup
                .as_ref()
                .and_then(|group| group.pressure_some_avg10),
            level: Some(sample.level),
        }
    }
}

impl From<&MemorySample> for SampleRow {
    fn from(message: &MemorySample) -> Self {
        Self {
            at: message.at.and_then(|at| SystemTime::try_from(at).ok()),
            seq: message.seq,
            rss_bytes: message.process.map_or(0, |process| process.rss_bytes),
            cgroup: message
                .cgroup
                .as_ref()
                .map(|group| (group.working_set_bytes, group.max_bytes)),
            usage_ratio: message.usage_ratio,
            // The proto has no "absent" for doubles, so a server without PSI sends 0.
            pressure_some_avg10: message
                .cgroup
                .as_ref()
                .map(|group| group.pressure_some_avg10),
            level: level_from_proto(message.level()),
        }
    }
}

/// The domain level of a proto level; `None` for UNSPECIFIED (or a value this build does not
/// know), which a table shows as "?" rather than guessing.
pub fn level_from_proto(level: pb::Level) -> Option<Level> {
    match level {
        pb::Level::Ok => Some(Level::Ok),
        pb::Level::Warning => Some(Level::Warning),
        pb::Level::Critical => Some(Level::Critical),
        pb::Level::Unspecified => None,
    }
}

/// ANSI colours; only ever written when stdout is a terminal.
pub mod ansi {
    /// Green, for OK and RESOLVED.
    pub const GREEN: &str = "\x1b[32m";
    /// Yellow, for WARNING.
    pub const YELLOW: &str = "\x1b[33m";
    /// Red, for CRITICAL.
    pub const RED: &str = "\x1b[31m";
    /// Back to the terminal's default.
    pub const RESET: &str = "\x1b[0m";
}

/// `text` wrapped in `colour` when `enabled`.
pub fn paint(text: &str, colour: &str, enabled: bool) -> String {
    if enabled {
        format!("{colour}{text}{}", ansi::RESET)
    } else {
        text.to_owned()
    }
}

/// The colour of a level: green, yellow, red.
pub fn level_colour(level: Level) -> &'static str {
    match level {
        Level::Ok => ansi::GREEN,
        Level::Warning => ansi::YELLOW,
        Level::Critical => ansi::RED,
    }
}

// Column widths: RFC 3339 with milliseconds is 24 characters; the others fit figures up to
// terabytes of memory and a million readings.
const TIME_WIDTH: usize = 24;
const SEQ_WIDTH: usize = 7;
const RSS_WIDTH: usize = 10;
const CGROUP_WIDTH: usize = 23;
const USAGE_WIDTH: usize = 7;
const PSI_WIDTH: usize = 9;

/// The header of the `watch` table, printed once before the first row.
pub fn header() -> String {
    format!(
        "{:<TIME_WIDTH$}  {:>SEQ_WIDTH$}  {:>RSS_WIDTH$}  {:>CGROUP_WIDTH$}  {:>USAGE_WIDTH$}  \
         {:>PSI_WIDTH$}  LEVEL",
        "TIME", "SEQ", "RSS MiB", "CGROUP WS/LIMIT MiB", "USAGE", "PSI SOME%"
    )
}

/// One `watch` row, aligned under [`header`]; the level is coloured when `colour` is set.
pub fn format_row(row: &SampleRow, colour: bool) -> String {
    let cgroup = match row.cgroup {
        None => "n/a".to_owned(),
        Some((working_set, 0)) => format!("{} / unlimited", mib_figure(working_set)),
        Some((working_set, limit)) => {
            format!("{} / {}", mib_figure(working_set), mib_figure(limit))
        }
    };
    let psi = row
        .pressure_some_avg10
        .map_or_else(|| "n/a".to_owned(), |psi| format!("{psi:.2}"));
    let level = match row.level {
        Some(level) => paint(level.as_str(), level_colour(level), colour),
        None => "?".to_owned(),
    };
    format!(
        "{:<TIME_WIDTH$}  {:>SEQ_WIDTH$}  {:>RSS_WIDTH$}  {cgroup:>CGROUP_WIDTH$}  \
         {:>USAGE_WIDTH$}  {psi:>PSI_WIDTH$}  {level}",
        time_cell(row.at),
        row.seq,
        mib_figure(row.rss_bytes),
        format!("{:.1}%", row.usage_ratio * 100.0),
    )
}

/// The line `watch` prints before a server's sample that reports `dropped` missed samples.
pub fn dropped_note(dropped: u64) -> String {
    let samples = if dropped == 1 { "sample" } else { "samples" };
    format!("-- {dropped} {samples} missed: this client read slower than the server sampled --")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::probe::{CgroupMem, CgroupVersion, ProcessMem, SystemMem};

    fn group(max_bytes: u64, pressure: Option<f64>) -> CgroupMem {
        CgroupMem {
            version: CgroupVersion::V2,
            path: "/app".into(),
            current_bytes: 300 * 1024 * 1024,
            max_bytes,
            working_set_bytes: 256 * 1024 * 1024,
            anon_bytes: 0,
            file_bytes: 0,
            inactive_file_bytes: 0,
            oom_kills: 2,
            pressure_some_avg10: pressure,
            pressure_full_avg10: None,
        }
    }

    fn sample(cgroup: Option<CgroupMem>) -> Sample {
        Sample {
            seq: 1,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            process: ProcessMem {
                pid: 42,
                rss_bytes: 10 * 1024 * 1024,
                virtual_bytes: 100 * 1024 * 1024,
            },
            targets: vec![],
            cgroup,
            system: SystemMem {
                total_bytes: 1024 * 1024 * 1024,
                available_bytes: 512 * 1024 * 1024,
                swap_total_bytes: 0,
                swap_used_bytes: 0,
            },
            usage_ratio: 0.5,
            level: Level::Ok,
        }
    }

    #[test]
    fn table_is_aligned_and_in_mib() {
        let table = render_table(&sample(Some(group(0, Some(1.5)))));
        let lines: Vec<&str> = table.lines().collect();
        let value_column = lines[0].find("2023").unwrap();
        for line in &lines {
            assert!(line.len() > value_column, "{line:?}");
            assert_ne!(&line[value_column..=value_column], " ", "{line:?}");
            assert_eq!(&line[value_column - 2..value_column], "  ", "{line:?}");
        }
        assert!(table.contains("process rss") && table.contains("10.0 MiB"));
        assert!(table.contains("unlimited"));
        assert!(table.contains("256.0 MiB"));
        assert!(table.contains("some 1.50% / full n/a (avg10)"));
        assert!(table.contains("50.0% (used / system total)"));
        assert!(table.lines().last().unwrap().ends_with("OK"));
    }

    #[test]
    fn table_without_cgroup() {
        let table = render_table(&sample(None));
        assert!(table.contains("no memory controller found"));
        assert!(!table.contains("cgroup limit"));
    }

    /// The byte offsets at which each cell of `line` ends (cells are separated by 2+ spaces).
    fn cell_ends(line: &str) -> Vec<usize> {
        let bytes = line.as_bytes();
        (1..bytes.len())
            .filter(|&i| {
                bytes[i - 1] != b' ' && bytes[i] == b' ' && bytes.get(i + 1) == Some(&b' ')
            })
            .collect()
    }

    #[test]
    fn rows_line_up_under_the_header() {
        let header = header();
        let rows = [
            format_row(&SampleRow::from(&sample(None)), false),
            format_row(&SampleRow::from(&sample(Some(group(0, None)))), false),
            format_row(
                &SampleRow::from(&sample(Some(group(1024 * 1024 * 1024, Some(12.5))))),
                false,
            ),
        ];
        // Right-aligned numeric columns end where their header ends (the time column is
        // left-aligned, so its end is compared separately).
        let header_ends = cell_ends(&header);
        assert_eq!(header_ends.len(), 6, "{header}");
        for row in &rows {
            let ends = cell_ends(row);
            assert_eq!(ends.len(), 6, "{row}");
            assert_eq!(ends[1..], header_ends[1..], "{header}\n{row}");
            assert_eq!(row.find("  ").unwrap(), TIME_WIDTH, "{row}");
        }
        assert!(rows[0].contains(" n/a "), "{}", rows[0]);
        assert!(rows[1].contains("256.0 / unlimited"), "{}", rows[1]);
        assert!(rows[2].contains("256.0 / 1024.0"), "{}", rows[2]);
        assert!(rows[2].contains("12.50"), "{}", rows[2]);
        assert!(rows[2].contains("50.0%"), "{}", rows[2]);
        assert!(
            rows[2].starts_with("2023-11-14T22:13:20.000Z"),
            "{}",
            rows[2]
        );
        assert!(rows[2].ends_with("  OK"), "{}", rows[2]);
    }

    #[test]
    fn level_is_coloured_only_when_asked() {
        let mut critical = sample(None);
        critical.level = Level::Critical;
        let plain = format_row(&SampleRow::from(&critical), false);
        assert!(!plain.contains('\x1b'), "{plain:?}");
        let coloured = format_row(&SampleRow::from(&critical), true);
        assert!(
            coloured.ends_with("\x1b[31mCRITICAL\x1b[0m"),
            "{coloured:?}"
        );
        critical.level = Level::Warning;
        let coloured = format_row(&SampleRow::from(&critical), true);
        assert!(coloured.ends_with("\x1b[33mWARNING\x1b[0m"), "{coloured:?}");
        critical.level = Level::Ok;
        let coloured = format_row(&SampleRow::from(&critical), true);
        assert!(coloured.ends_with("\x1b[32mOK\x1b[0m"), "{coloured:?}");
    }

    #[test]
    fn a_server_sample_makes_the_same_row_as_the_local_one() {
        let local = sample(Some(group(1024 * 1024 * 1024, Some(3.25))));
        let message = MemorySample::from(local.clone());
        assert_eq!(SampleRow::from(&message), SampleRow::from(&local));
        assert_eq!(
            format_row(&SampleRow::from(&message), true),
            format_row(&SampleRow::from(&local), true)
        );
    }

    #[test]
    fn a_sparse_server_sample_still_makes_a_row() {
        let row = SampleRow::from(&MemorySample {
            seq: 7,
            ..MemorySample::default()
        });
        assert_eq!(
            row,
            SampleRow {
                at: None,
                seq: 7,
                rss_bytes: 0,
                cgroup: None,
                usage_ratio: 0.0,
                pressure_some_avg10: None,
                level: None,
            }
        );
        let text = format_row(&row, true);
        assert!(text.starts_with("unknown "), "{text}");
        assert!(text.ends_with("  ?"), "{text}");
    }

    #[test]
    fn dropped_note_counts() {
        assert_eq!(
            dropped_note(1),
            "-- 1 sample missed: this client read slower than the server sampled --"
        );
        assert!(dropped_note(3).contains("3 samples missed"));
    }
}
