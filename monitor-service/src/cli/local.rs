//! `watch` without a server: sample with this process's own probe on a fixed schedule.

use std::{future::Future, io::Write, time::Duration};

use tokio::time::{Instant, MissedTickBehavior};

use super::{CliError, output::Printer};
use crate::probe::Probe;

/// Prints a reading at once and then every `interval`, up to and including `duration` after
/// the first (`Duration::ZERO` = until `stop`), numbering them from 1. Returns Ok when the
/// duration is over or `stop` resolves.
///
/// Like the server's streams, the count is decided on the scheduled offsets, not on the clock,
/// so it is exact: 2s every 500ms is 5 readings, however late a tick fires.
pub async fn watch_local<W: Write>(
    mut probe: Probe,
    interval: Duration,
    duration: Duration,
    printer: &mut Printer<W>,
    stop: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let start = Instant::now();
    let mut ticks = tokio::time::interval_at(start, interval);
    // A stalled terminal must not cause a burst of catch-up rows afterwards; rows stay on the
    // interval's grid instead.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Skip);
    let mut stop = std::pin::pin!(stop);
    let mut seq = 0u64;
    loop {
        let tick = tokio::select! {
            // Interruption first: once the user asked to stop, nothing more is printed.
            biased;
            () = &mut stop => return Ok(()),
            tick = ticks.tick() => tick,
        };
        // A reading is a handful of small reads of in-memory kernel files, so it is taken
        // inline; nothing else runs on this task meanwhile.
        let mut sample = probe.sample();
        seq += 1;
        sample.seq = seq;
        printer.sample(&sample)?;
        let offset = tick.saturating_duration_since(start);
        if !duration.is_zero() && offset.saturating_add(interval) > duration {
            return Ok(());
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::probe::ProbeConfig;

    fn fixture_probe(dir: &tempfile::TempDir) -> Probe {
        // An empty tree: readings are fast, deterministic and need no real cgroup.
        Probe::new(ProbeConfig {
            proc_root: dir.path().join("proc"),
            cgroup_root: dir.path().join("cgroup"),
            ..ProbeConfig::default()
        })
    }

    async fn run(interval_ms: u64, duration_ms: u64, json: bool) -> (Vec<String>, Duration) {
        let dir = tempfile::tempdir().unwrap();
        let mut printer = Printer::new(Vec::new(), json, false);
        let started = Instant::now();
        watch_local(
            fixture_probe(&dir),
            Duration::from_millis(interval_ms),
            Duration::from_millis(duration_ms),
            &mut printer,
            std::future::pending(),
        )
        .await
        .unwrap();
        let text = String::from_utf8(printer.into_inner()).unwrap();
        (text.lines().map(str::to_owned).collect(), started.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn readings_at_start_and_every_interval_up_to_the_end() {
        let (lines, elapsed) = run(500, 2000, false).await;
        assert_eq!(lines.len(), 1 + 5, "{lines:#?}");
        assert!(lines[0].starts_with("TIME"));
        assert_eq!(elapsed, Duration::from_secs(2));

        let (lines, elapsed) = run(200, 1000, true).await;
        assert_eq!(lines.len(), 6, "{lines:#?}");
        assert_eq!(elapsed, Duration::from_secs(1));
        let seqs: Vec<u64> = lines
            .iter()
            .map(|line| {
                let json: serde_json::Value = serde_json::from_str(line).unwrap();
                json["seq"].as_u64().unwrap()
            })
            .collect();
        assert_eq!(seqs, [1, 2, 3, 4, 5, 6]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_duration_shorter_than_the_interval_is_one_reading() {
        let (lines, elapsed) = run(30_000, 1000, true).await;
        assert_eq!(lines.len(), 1, "{lines:#?}");
        assert_eq!(elapsed, Duration::ZERO);
        let (lines, _) = run(400, 1000, true).await;
        assert_eq!(lines.len(), 3, "{lines:#?}");
    }

    #[tokio::test(start_paused = true)]
    async fn zero_duration_runs_until_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let mut printer = Printer::new(Vec::new(), true, false);
        watch_local(
            fixture_probe(&dir),
            Duration::from_secs(1),
            Duration::ZERO,
            &mut printer,
            tokio::time::sleep(Duration::from_millis(10_500)),
        )
        .await
        .unwrap();
        let text = String::from_utf8(printer.into_inner()).unwrap();
        // t = 0, 1, ..., 10 s.
        assert_eq!(text.lines().count(), 11, "{text}");
    }
}
