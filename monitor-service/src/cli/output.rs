//! Where `watch` and `alerts` write: a table or JSON lines, flushed line by line so a pipe
//! (`| jq`, `| tee`) sees each reading as it happens.

use std::io::{self, IsTerminal, Write};

use spotifai_proto::monitor::{MemoryAlert, MemorySample};

use super::{
    CliError,
    alert_text::format_alert,
    json::{AlertJson, SampleJson},
    table::{SampleRow, dropped_note, format_row, header},
};
use crate::probe::Sample;

/// Whether stdout should get ANSI colours: only a terminal, and not when the user opted out
/// through the `NO_COLOR` convention (<https://no-color.org>).
pub fn stdout_wants_colour() -> bool {
    io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|value| value.is_empty())
}

/// Prints readings and alert events in one of the two formats.
#[derive(Debug)]
pub struct Printer<W> {
    out: W,
    json: bool,
    colour: bool,
    header_printed: bool,
}

impl<W: Write> Printer<W> {
    /// A printer writing to `out`: JSON lines when `json`, else text, with ANSI colours when
    /// `colour` (never in JSON, which scripts parse).
    pub fn new(out: W, json: bool, colour: bool) -> Self {
        Self {
            out,
            json,
            colour: colour && !json,
            header_printed: false,
        }
    }

    /// A reading taken here: the `check --json` object, or a table row (after the header).
    pub fn sample(&mut self, sample: &Sample) -> Result<(), CliError> {
        if self.json {
            let line = serde_json::to_string(sample)?;
            self.line(&line)
        } else {
            self.row(&SampleRow::from(sample))
        }
    }

    /// A reading from a server. JSON gains a `dropped` count when samples were missed; the
    /// table gets a note line before the row.
    pub fn server_sample(&mut self, message: &MemorySample) -> Result<(), CliError> {
        if self.json {
            let line = serde_json::to_string(&SampleJson::from(message))?;
            return self.line(&line);
        }
        if message.dropped > 0 {
            self.print_header_once()?;
            self.line(&dropped_note(message.dropped))?;
        }
        self.row(&SampleRow::from(message))
    }

    /// An alert event: one JSON object, or its text block.
    pub fn alert(&mut self, alert: &MemoryAlert) -> Result<(), CliError> {
        let text = if self.json {
            serde_json::to_string(&AlertJson::from(alert))?
        } else {
            format_alert(alert, self.colour)
        };
        self.line(&text)
    }

    /// The writer, e.g. a buffer a test inspects.
    pub fn into_inner(self) -> W {
        self.out
    }

    fn row(&mut self, row: &SampleRow) -> Result<(), CliError> {
        self.print_header_once()?;
        let text = format_row(row, self.colour);
        self.line(&text)
    }

    fn print_header_once(&mut self) -> Result<(), CliError> {
        if !self.header_printed {
            self.line(&header())?;
            self.header_printed = true;
        }
        Ok(())
    }

    fn line(&mut self, text: &str) -> Result<(), CliError> {
        writeln!(self.out, "{text}")?;
        self.out.flush()?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn message(seq: u64, dropped: u64) -> MemorySample {
        MemorySample {
            seq,
            dropped,
            ..MemorySample::default()
        }
    }

    fn text(printer: Printer<Vec<u8>>) -> String {
        String::from_utf8(printer.into_inner()).unwrap()
    }

    #[test]
    fn table_has_one_header_then_rows_and_notes() {
        let mut printer = Printer::new(Vec::new(), false, false);
        printer.server_sample(&message(1, 0)).unwrap();
        printer.server_sample(&message(4, 2)).unwrap();
        let text = text(printer);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("TIME"), "{text}");
        assert!(lines[1].contains("  1  "), "{text}");
        assert!(lines[2].contains("2 samples missed"), "{text}");
        assert!(lines[3].contains("  4  "), "{text}");
    }

    #[test]
    fn a_note_before_the_first_row_still_comes_after_the_header() {
        let mut printer = Printer::new(Vec::new(), false, false);
        printer.server_sample(&message(9, 1)).unwrap();
        let text = text(printer);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("TIME"), "{text}");
        assert!(lines[1].contains("1 sample missed"), "{text}");
        assert_eq!(lines.len(), 3, "{text}");
    }

    #[test]
    fn json_is_one_object_per_line_without_colour_or_header() {
        // Colour asked for, but JSON wins: scripts must never see escape codes.
        let mut printer = Printer::new(Vec::new(), true, true);
        printer.server_sample(&message(1, 0)).unwrap();
        printer.server_sample(&message(2, 5)).unwrap();
        printer.alert(&MemoryAlert::default()).unwrap();
        let text = text(printer);
        assert!(!text.contains('\x1b'), "{text}");
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        assert_eq!(lines[0]["seq"], 1);
        assert!(lines[0].get("dropped").is_none(), "{text}");
        assert_eq!(lines[1]["dropped"], 5);
        assert_eq!(lines[2]["id"], "");
    }

    #[test]
    fn a_closed_pipe_is_reported_as_a_write_error() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let mut printer = Printer::new(Closed, true, false);
        let error = printer.server_sample(&message(1, 0)).unwrap_err();
        assert!(error.is_closed_stdout(), "{error}");
    }
}
