//! Progress of the offline commands that read a whole trace (`report`, `export`, `view --print`,
//! and the summary `mtracer run` prints when it is not interactive): a line on stderr with the bytes and events read, the rate
//! and the time left — only when stderr is a terminal, and only once the reading has taken more
//! than a second (`MTRACE_PROGRESS_AFTER_MS`, default 1000), so that short runs print nothing.
//! Nothing of it ever goes to a pipe, a file or stdout. The analysis reports what it read
//! through [`crate::analysis::ReadProgress`]; it does not know about this view.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::analysis::ReadProgress;

/// The progress line of one command.
pub struct ReadBar {
    bar: ProgressBar,
    /// When the reading began (the first update: after any wait for the recorder).
    start: Option<Instant>,
    delay: Duration,
    shown: bool,
    path: std::path::PathBuf,
}

impl ReadBar {
    /// A bar for reading the trace at `path`, if stderr is a terminal (else `None`).
    pub fn new(path: &std::path::Path) -> Option<ReadBar> {
        if !std::io::stderr().is_terminal() {
            return None;
        }
        let delay = std::env::var("MTRACE_PROGRESS_AFTER_MS").ok().and_then(|v| v.parse().ok()).map_or(Duration::from_secs(1), Duration::from_millis);
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
        let style = ProgressStyle::with_template("mtracer: analysing {wide_bar} {binary_bytes}/{binary_total_bytes}, {msg}, {eta} left")
            .unwrap_or_else(|_| ProgressStyle::default_bar());
        bar.set_style(style);
        Some(ReadBar { bar, start: None, delay, shown: false, path: path.to_path_buf() })
    }

    /// What the analysis has read so far.
    pub fn update(&mut self, p: ReadProgress) {
        let start = *self.start.get_or_insert_with(|| {
            // The file's size once the recorder is done with it (the analysis waits for that
            // before its first update).
            self.bar.set_length(std::fs::metadata(&self.path).map_or(0, |m| m.len()));
            Instant::now()
        });
        if p.bytes > self.bar.length().unwrap_or(0) {
            self.bar.set_length(p.bytes);
        }
        if !self.shown && start.elapsed() >= self.delay {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
            self.shown = true;
        }
        let secs = start.elapsed().as_secs_f64().max(1e-3);
        self.bar.set_message(format!("{:.1} M events ({:.2} M/s)", p.events as f64 / 1e6, p.events as f64 / secs / 1e6));
        self.bar.set_position(p.bytes);
    }

    /// Remove the line (the command's own output follows).
    pub fn finish(self) {
        self.bar.finish_and_clear();
    }
}

/// Run `f` with a progress observer for reading the trace at `path`: a [`ReadBar`] on a terminal,
/// nothing otherwise.
pub fn reading<T>(path: &std::path::Path, f: impl FnOnce(&mut dyn FnMut(ReadProgress)) -> T) -> T {
    match ReadBar::new(path) {
        Some(mut bar) => {
            let r = f(&mut |p| bar.update(p));
            bar.finish();
            r
        }
        None => f(&mut |_| {}),
    }
}
