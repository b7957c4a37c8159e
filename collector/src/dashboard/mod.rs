//! `mtracer view`: a full-screen terminal dashboard on a recorded trace, or one frame of it as
//! plain text (`--print`).
//!
//! * [`model`] — the data the panels show, taken from the report; no terminal types.
//! * [`app`] — UI state and key handling, pure.
//! * [`ui`] — drawing with ratatui widgets.
//! * this file — the terminal loop: raw mode and the alternate screen, restored on every way
//!   out (return, error, panic), redraw on resize, keys polled with a timeout.

pub mod app;
pub mod feed;
pub mod model;
pub mod ui;

#[cfg(test)]
mod tests;

use std::io::{self, Stdout};
use std::time::Duration;

use ratatui::backend::CrosstermBackend;
use ratatui::crossterm::event::{self, Event, KeyEventKind};
use ratatui::crossterm::terminal::{disable_raw_mode, enable_raw_mode, EnterAlternateScreen, LeaveAlternateScreen};
use ratatui::crossterm::{cursor, execute};
use ratatui::Terminal;

use app::{Action, App};
use model::DashboardModel;

/// Colours unless `NO_COLOR` is set to something non-empty (<https://no-color.org>).
pub fn color_wanted() -> bool {
    std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Put the terminal back: cooked mode, main screen, cursor shown. Safe to call twice.
fn restore() {
    let _ = disable_raw_mode();
    let _ = execute!(io::stdout(), LeaveAlternateScreen, cursor::Show);
}

/// Raw mode and the alternate screen for as long as it lives.
struct TerminalGuard;

impl TerminalGuard {
    fn enter() -> io::Result<TerminalGuard> {
        // The guard first: if entering the alternate screen fails, raw mode is undone.
        enable_raw_mode()?;
        let g = TerminalGuard;
        execute!(io::stdout(), EnterAlternateScreen, cursor::Hide)?;
        Ok(g)
    }
}

impl Drop for TerminalGuard {
    fn drop(&mut self) {
        restore();
    }
}

/// Restore the terminal before a panic message is printed (the release profile aborts on panic,
/// so no destructor would run).
fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        restore();
        previous(info);
    }));
}

/// What a live source has after a poll ([`run_live`]).
pub enum Refresh {
    Nothing,
    /// The app's state changed (its `live` status, say): draw again.
    Redraw,
    /// A new model to show.
    Model(DashboardModel),
    /// Leave the dashboard (the source failed; its owner says why).
    Stop,
}

/// Run the dashboard until the user quits.
pub fn run(model: &DashboardModel, app: App) -> io::Result<()> {
    run_live(model.clone(), app, &mut |_| Refresh::Nothing)
}

/// Run the dashboard until the user quits, asking `source` for news at least every 50 ms; the
/// UI state (panel, zoom, selected image) is kept across new models.
pub fn run_live(model: DashboardModel, mut app: App, source: &mut dyn FnMut(&mut App) -> Refresh) -> io::Result<()> {
    install_panic_hook();
    let _guard = TerminalGuard::enter()?;
    let mut term = Terminal::new(CrosstermBackend::new(io::stdout()))?;
    event_loop(&mut term, model, &mut app, source)
}

fn event_loop(term: &mut Terminal<CrosstermBackend<Stdout>>, mut model: DashboardModel, app: &mut App, source: &mut dyn FnMut(&mut App) -> Refresh) -> io::Result<()> {
    let mut dirty = true;
    let mut stats = Stats::new();
    app.observe(&model);
    loop {
        match source(app) {
            Refresh::Nothing => {}
            Refresh::Redraw => dirty = true,
            Refresh::Model(m) => {
                app.observe(&m);
                model = m;
                stats.models += 1;
                dirty = true;
            }
            Refresh::Stop => {
                stats.save();
                return Ok(());
            }
        }
        if dirty {
            // `draw` follows the terminal's size.
            term.draw(|f| ui::draw(f, &model, app))?;
            stats.frame();
            dirty = false;
            // For the end-to-end test that a panic restores the terminal (once the panels are
            // up, past `view`'s progress gauge).
            if model.indexing.is_none() && std::env::var_os("MTRACE_VIEW_TEST_PANIC").is_some() {
                panic!("MTRACE_VIEW_TEST_PANIC is set");
            }
        }
        // Wait for a key ourselves, at most 50 ms (the timeout keeps the loop ready for the live
        // mode's updates): crossterm's reader spins for ever on a terminal that hung up (its
        // window closed, the tmux server killed), where there is nobody to show anything to.
        if terminal_gone(50) {
            stats.save();
            return Ok(());
        }
        // Keys, and resizes (which come by a signal, not on the terminal).
        if !event::poll(Duration::ZERO)? {
            continue;
        }
        match event::read()? {
            Event::Key(k) if k.kind == KeyEventKind::Press => match app.on_key(k) {
                Action::Quit => {
                    stats.save();
                    return Ok(());
                }
                Action::Redraw => dirty = true,
                Action::None => {}
            },
            Event::Resize(..) => {
                term.autoresize()?;
                dirty = true;
            }
            _ => {}
        }
    }
}

/// Wait up to `ms` for input on our terminal (stdin, where the keys come from); has it hung up?
fn terminal_gone(ms: i32) -> bool {
    let mut p = libc::pollfd { fd: 0, events: libc::POLLIN, revents: 0 };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, ms) };
    r > 0 && p.revents & (libc::POLLHUP | libc::POLLERR | libc::POLLNVAL) != 0
}

/// Frames drawn and models received, written to the file `$MTRACE_DASH_STATS` names (for the
/// tests and the benchmark that measure how often the live dashboard refreshes).
struct Stats {
    path: Option<std::ffi::OsString>,
    started: std::time::Instant,
    frames: u64,
    models: u64,
    models_seen: u64,
    first_frame: Option<std::time::Instant>,
    last_frame: Option<std::time::Instant>,
    /// The longest time between two frames.
    max_gap_s: f64,
}

impl Stats {
    fn new() -> Stats {
        Stats { path: std::env::var_os("MTRACE_DASH_STATS"), started: std::time::Instant::now(), frames: 0, models: 0, models_seen: 0, first_frame: None, last_frame: None, max_gap_s: 0.0 }
    }

    fn frame(&mut self) {
        let now = std::time::Instant::now();
        self.frames += 1;
        self.models_seen = self.models;
        self.first_frame.get_or_insert(now);
        if let Some(l) = self.last_frame {
            self.max_gap_s = self.max_gap_s.max((now - l).as_secs_f64());
        }
        self.last_frame = Some(now);
        if self.path.is_some() {
            self.save();
        }
    }

    /// One `name value` per line: `frames`, `models` (new models drawn), `span_s` (first to
    /// last frame), `max_gap_s` (longest time between two frames), `seconds` (since start).
    fn save(&self) {
        let Some(p) = &self.path else { return };
        let span = match (self.first_frame, self.last_frame) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        let text = format!(
            "frames {}\nmodels {}\nspan_s {span:.3}\nmax_gap_s {:.3}\nseconds {:.3}\n",
            self.frames,
            self.models_seen,
            self.max_gap_s,
            self.started.elapsed().as_secs_f64()
        );
        // Whole or not at all for a reader: write aside, then rename.
        let mut tmp = p.clone();
        tmp.push(".tmp");
        if std::fs::write(&tmp, text).is_ok() {
            let _ = std::fs::rename(&tmp, p);
        }
    }
}
