//! Command-line client commands. `check` prints one reading, like the old
//! `memory_monitor.py --single`, as a table for people or one JSON line for scripts.

use std::io::{self, Write};

use crate::{
    config::CheckArgs,
    probe::{Probe, Sample, format_rfc3339},
};

/// Why `check` could not print its reading.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The reading could not be encoded as JSON.
    #[error("cannot encode the reading as JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// Standard output is not writable (e.g. a closed pipe).
    #[error("cannot write to stdout: {0}")]
    Stdout(#[from] io::Error),
}

/// Takes one reading and prints it on stdout.
pub fn check(args: &CheckArgs) -> Result<(), CliError> {
    let mut sample = Probe::new(args.probe.probe_config()).sample();
    // This command takes exactly one sample: the first.
    sample.seq = 1;
    let text = if args.json {
        serde_json::to_string(&sample)?
    } else {
        render_table(&sample)
    };
    let mut stdout = io::stdout().lock();
    writeln!(stdout, "{text}")?;
    stdout.flush()?;
    Ok(())
}

const MIB: f64 = 1024.0 * 1024.0;

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB)
}

fn percent(value: Option<f64>) -> String {
    value.map_or_else(|| "n/a".to_owned(), |value| format!("{value:.2}%"))
}

/// The reading as an aligned two-column table (label, value), one figure per line.
pub fn render_table(sample: &Sample) -> String {
    let mut rows: Vec<(String, String)> = Vec::new();
    let mut row = |label: &str, value: String| rows.push((label.to_owned(), value));

    row(
        "time",
        format_rfc3339(sample.at).unwrap_or_else(|| "unknown".to_owned()),
    );
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
            row("cgroup path", group.path.clone());
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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;
    use crate::probe::{CgroupMem, CgroupVersion, Level, ProcessMem, SystemMem};

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
        let table = render_table(&sample(Some(CgroupMem {
            version: CgroupVersion::V2,
            path: "/app".to_owned(),
            current_bytes: 300 * 1024 * 1024,
            max_bytes: 0,
            working_set_bytes: 256 * 1024 * 1024,
            anon_bytes: 0,
            file_bytes: 0,
            inactive_file_bytes: 0,
            oom_kills: 2,
            pressure_some_avg10: Some(1.5),
            pressure_full_avg10: None,
        })));
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
}
