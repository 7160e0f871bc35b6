//! What `roam get` shows while it works: a progress bar on a terminal, a line every 5 s
//! otherwise, and its notes (reconnects, restarts, waiting for a digest).

use super::Observer;
use std::io;
use std::time::{Duration, Instant};

/// Writes progress to a terminal bar or to plain log lines.
pub struct Reporter {
    bar: Option<indicatif::ProgressBar>,
    quiet: bool,
    last_line: Instant,
    reconnects: u64,
}

impl Reporter {
    /// A bar when stderr is a terminal (and not quiet), plain lines otherwise.
    pub fn new(quiet: bool) -> Reporter {
        use std::io::IsTerminal;
        let bar = (!quiet && io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(0);
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        Reporter {
            bar,
            quiet,
            last_line: Instant::now(),
            reconnects: 0,
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Observer for Reporter {
    fn length_known(&mut self, length: u64) {
        if let Some(bar) = &self.bar {
            bar.set_length(length);
        }
    }

    fn progress(&mut self, on_disk: u64) {
        if let Some(bar) = &self.bar {
            bar.set_position(on_disk);
        } else if !self.quiet && self.last_line.elapsed() >= Duration::from_secs(5) {
            self.last_line = Instant::now();
            eprintln!("roam get: {on_disk} bytes on disk");
        }
    }

    fn note(&mut self, message: &str) {
        if message.starts_with("connection lost") {
            self.reconnects += 1;
            if let Some(bar) = &self.bar {
                bar.set_message(format!("reconnects: {}", self.reconnects));
            }
        }
        if self.quiet {
            return;
        }
        match &self.bar {
            Some(bar) => bar.println(format!("roam get: {message}")),
            None => eprintln!("roam get: {message}"),
        }
    }
}
