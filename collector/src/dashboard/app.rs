//! The dashboard's UI state (selected image, focused panel, time window, overlays) and what each
//! key does to it. Pure: no terminal I/O, so every key is unit-tested.

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// The panels, in Tab order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Panel {
    /// Live bytes, OS-held heap bytes and RSS over time.
    Timeline,
    /// Where the held bytes are (categories) and why (causes, remedies, malloc_trim calls).
    Retention,
    /// Calls per function (totals and per second), allocations, frees, lost events, unmatched
    /// frees, the recorder's backlog.
    Counters,
    /// Request sizes of the allocations, by power-of-two bucket.
    Sizes,
    /// Top allocation sites by live bytes, at the end (or now) and at the peak.
    Sites,
    /// glibc's arenas, and the mallinfo2 check.
    Arenas,
    /// mmap and trim thresholds, their changes, the arena limit.
    Thresholds,
    /// The process tree (only when the trace has more than one image).
    Processes,
}

impl Panel {
    pub fn title(self) -> &'static str {
        match self {
            Panel::Timeline => "Timeline",
            Panel::Retention => "Retention",
            Panel::Counters => "Counters",
            Panel::Sizes => "Allocation sizes",
            Panel::Sites => "Sites",
            Panel::Arenas => "Arenas",
            Panel::Thresholds => "Thresholds",
            Panel::Processes => "Processes",
        }
    }
}

/// What the terminal loop should do after a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Nothing changed.
    None,
    /// The state changed: draw again.
    Redraw,
    Quit,
}

/// Zoom levels: the window is the image's duration / 2^zoom.
pub const MAX_ZOOM: u32 = 12;

#[derive(Clone, Debug)]
pub struct App {
    /// The panels this trace has, in Tab order.
    pub panels: Vec<Panel>,
    /// Index into `panels`.
    pub focus: usize,
    /// Index of the selected process image.
    pub process: usize,
    pub process_count: usize,
    /// The time window is `[offset, offset + 1/2^zoom]` of the image's duration.
    pub zoom: u32,
    /// Start of the window as a fraction of the duration.
    pub offset: f64,
    pub help: bool,
    /// The details view of the focused panel, and how far it is scrolled.
    pub details: bool,
    pub scroll: u16,
    /// Only the focused panel, whatever the terminal size (`--panel`).
    pub single: bool,
    /// Live mode (`mtracer run`): the refreshing is paused (the view, not the program).
    pub paused: bool,
    /// Live mode: the command's state in words (`running`, `exited with status 3`).
    pub live: Option<String>,
    /// Colours (off under `NO_COLOR`).
    pub color: bool,
    /// The time cursor on the timeline, in seconds since the image started; none: the panels
    /// show the end.
    pub cursor: Option<f64>,
    /// Retention categories stacked under the timeline's lines.
    pub stack: bool,
    /// Per image: its duration and the times of its peaks (what the cursor keys need).
    pub times: Vec<Times>,
    /// Live mode: how the analysis keeps up, and the recorder's backlog.
    pub stream: Option<super::model::StreamStatus>,
    /// The sites panel lists the sites live at the peak (else: at the end, or now).
    pub sites_at_peak: bool,
    /// The selected row of the sites panel (its details show that site's stack).
    pub site: usize,
}

/// The times of one image the cursor can go to.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Times {
    pub duration_s: f64,
    pub peak_live_s: f64,
    /// The highest RSS sample, if RSS was sampled.
    pub peak_rss_s: Option<f64>,
    /// Rows of the sites panel: at the end, at the peak.
    pub sites: (usize, usize),
}

impl Times {
    pub fn of(p: &super::model::ProcessModel) -> Times {
        let duration_s = p.timeline.last().map_or(0.0, |q| q.t_s).max(p.duration_s);
        let mut peak: Option<&super::model::Point> = None;
        for q in &p.timeline {
            if q.rss_bytes > 0 && peak.is_none_or(|b| q.rss_bytes > b.rss_bytes) {
                peak = Some(q);
            }
        }
        Times { duration_s, peak_live_s: p.peak_live_time_s, peak_rss_s: peak.map(|q| q.t_s), sites: (p.sites.at_end.len(), p.sites.at_peak.len()) }
    }
}

impl App {
    /// The state for a trace of `process_count` images, showing image `process` first.
    pub fn new(process_count: usize, process: usize) -> App {
        let mut panels = vec![Panel::Timeline, Panel::Retention, Panel::Counters, Panel::Sizes, Panel::Sites, Panel::Arenas, Panel::Thresholds];
        if process_count > 1 {
            panels.push(Panel::Processes);
        }
        App {
            panels,
            focus: 0,
            process: process.min(process_count.saturating_sub(1)),
            process_count,
            zoom: 0,
            offset: 0.0,
            help: false,
            details: false,
            scroll: 0,
            single: false,
            paused: false,
            live: None,
            color: true,
            cursor: None,
            stack: true,
            times: Vec::new(),
            stream: None,
            sites_at_peak: false,
            site: 0,
        }
    }

    /// Rows in the sites list shown now.
    fn site_rows(&self) -> usize {
        let t = self.cur_times();
        if self.sites_at_peak { t.sites.1 } else { t.sites.0 }
    }

    /// Move the sites panel's selection by `d` rows (kept in the list).
    fn move_site(&mut self, d: isize) -> Action {
        let old = self.site;
        let last = self.site_rows().saturating_sub(1);
        self.site = self.site.min(last).saturating_add_signed(d).min(last);
        if self.site == old { Action::None } else { Action::Redraw }
    }

    /// Follow a (new) model: the number of images and their times.
    pub fn observe(&mut self, m: &super::model::DashboardModel) {
        self.set_process_count(m.processes.len());
        self.times = m.processes.iter().map(Times::of).collect();
        self.site = self.site.min(self.site_rows().saturating_sub(1));
    }

    fn cur_times(&self) -> Times {
        self.times.get(self.process).copied().unwrap_or_default()
    }

    /// Put the cursor at `t` seconds (clamped to the image) and scroll the window to show it.
    fn set_cursor(&mut self, t: f64) -> Action {
        let dur = self.cur_times().duration_s;
        if dur <= 0.0 {
            return Action::None;
        }
        let t = t.clamp(0.0, dur);
        self.cursor = Some(t);
        let f = t / dur;
        let (lo, hi) = self.window();
        if f < lo || f > hi {
            let w = self.width();
            self.set_offset(f - w / 2.0);
        }
        Action::Redraw
    }

    /// Move the cursor one step (1/40 of the window) back or forward; the first press puts it
    /// in the middle of the window.
    fn step_cursor(&mut self, forward: bool) -> Action {
        let dur = self.cur_times().duration_s;
        let (lo, hi) = self.window();
        let step = (hi - lo) * dur / 40.0;
        match self.cursor {
            None => self.set_cursor((lo + hi) / 2.0 * dur),
            Some(t) => {
                let old = self.cursor;
                self.set_cursor(if forward { t + step } else { t - step });
                if self.cursor == old { Action::None } else { Action::Redraw }
            }
        }
    }

    /// Follow a refreshed model of `count` images (live mode): the Processes panel appears when
    /// a second image does; the focus, zoom and selected image are kept (the image clamped).
    pub fn set_process_count(&mut self, count: usize) {
        if count > 1 && !self.panels.contains(&Panel::Processes) {
            self.panels.push(Panel::Processes);
        }
        self.process_count = count;
        self.process = self.process.min(count.saturating_sub(1));
    }

    pub fn focused(&self) -> Panel {
        self.panels[self.focus]
    }

    /// Focus `p` if this trace has it.
    pub fn focus_panel(&mut self, p: Panel) -> bool {
        match self.panels.iter().position(|&q| q == p) {
            Some(i) => {
                self.focus = i;
                true
            }
            None => false,
        }
    }

    /// The time window as fractions of the duration.
    pub fn window(&self) -> (f64, f64) {
        let w = self.width();
        (self.offset, self.offset + w)
    }

    fn width(&self) -> f64 {
        1.0 / f64::from(1u32 << self.zoom)
    }

    fn set_offset(&mut self, o: f64) {
        self.offset = o.clamp(0.0, 1.0 - self.width());
    }

    fn zoom_to(&mut self, z: u32) {
        // Keep the window's centre where it was.
        let centre = self.offset + self.width() / 2.0;
        self.zoom = z.min(MAX_ZOOM);
        self.set_offset(centre - self.width() / 2.0);
    }

    fn next_panel(&mut self, forward: bool) {
        let n = self.panels.len();
        self.focus = if forward { (self.focus + 1) % n } else { (self.focus + n - 1) % n };
    }

    fn select_process(&mut self, forward: bool) -> Action {
        let old = self.process;
        if forward {
            self.process = (self.process + 1).min(self.process_count.saturating_sub(1));
        } else {
            self.process = self.process.saturating_sub(1);
        }
        self.scroll = 0;
        if old == self.process {
            return Action::None;
        }
        // Another image, another time line, other sites.
        self.cursor = None;
        self.site = 0;
        Action::Redraw
    }

    /// Apply one key press.
    pub fn on_key(&mut self, key: KeyEvent) -> Action {
        if key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL) {
            return Action::Quit;
        }
        if self.help {
            // Any key closes the help; q still quits.
            return match key.code {
                KeyCode::Char('q') => Action::Quit,
                _ => {
                    self.help = false;
                    Action::Redraw
                }
            };
        }
        if self.details {
            match key.code {
                KeyCode::Char('q') => return Action::Quit,
                KeyCode::Esc | KeyCode::Enter => {
                    self.details = false;
                    self.scroll = 0;
                    return Action::Redraw;
                }
                KeyCode::Up | KeyCode::Char('k') => {
                    self.scroll = self.scroll.saturating_sub(1);
                    return Action::Redraw;
                }
                KeyCode::Down | KeyCode::Char('j') => {
                    self.scroll = self.scroll.saturating_add(1);
                    return Action::Redraw;
                }
                KeyCode::PageUp => {
                    self.scroll = self.scroll.saturating_sub(10);
                    return Action::Redraw;
                }
                KeyCode::PageDown | KeyCode::Char(' ') => {
                    self.scroll = self.scroll.saturating_add(10);
                    return Action::Redraw;
                }
                KeyCode::Home => {
                    self.scroll = 0;
                    return Action::Redraw;
                }
                // Everything else works as in the overview (the details follow the focus).
                _ => {}
            }
        }
        match key.code {
            KeyCode::Char('q') | KeyCode::Esc => Action::Quit,
            KeyCode::Char('?') => {
                self.help = true;
                Action::Redraw
            }
            KeyCode::Tab => {
                self.next_panel(true);
                self.scroll = 0;
                Action::Redraw
            }
            KeyCode::BackTab => {
                self.next_panel(false);
                self.scroll = 0;
                Action::Redraw
            }
            // Left/Right move the time cursor when the timeline has the focus, and move between
            // panels elsewhere.
            KeyCode::Left | KeyCode::Right if self.focused() != Panel::Timeline => {
                self.next_panel(key.code == KeyCode::Right);
                self.scroll = 0;
                Action::Redraw
            }
            KeyCode::Left | KeyCode::Right => self.step_cursor(key.code == KeyCode::Right),
            KeyCode::Home => self.set_cursor(0.0),
            KeyCode::End => self.set_cursor(f64::MAX),
            KeyCode::Char('g') => {
                let t = self.cur_times().peak_live_s;
                self.set_cursor(t)
            }
            KeyCode::Char('G') => match self.cur_times().peak_rss_s {
                Some(t) => self.set_cursor(t),
                None => Action::None,
            },
            KeyCode::Char('x') => {
                if self.cursor.take().is_some() { Action::Redraw } else { Action::None }
            }
            KeyCode::Char('s') => {
                self.stack = !self.stack;
                Action::Redraw
            }
            KeyCode::Char('h') | KeyCode::Char('l') => {
                let step = self.width() / 4.0;
                let old = self.offset;
                let forward = key.code == KeyCode::Char('l');
                self.set_offset(if forward { old + step } else { old - step });
                if self.offset == old { Action::None } else { Action::Redraw }
            }
            KeyCode::Char('+') | KeyCode::Char('=') => {
                let z = self.zoom;
                self.zoom_to(z + 1);
                if self.zoom == z { Action::None } else { Action::Redraw }
            }
            KeyCode::Char('-') | KeyCode::Char('_') => {
                let z = self.zoom;
                self.zoom_to(z.saturating_sub(1));
                if self.zoom == z { Action::None } else { Action::Redraw }
            }
            KeyCode::Char('0') => {
                self.zoom = 0;
                self.offset = 0.0;
                Action::Redraw
            }
            // On the sites panel ↑/↓ select a site ([/] still switch images).
            KeyCode::Down | KeyCode::Char('j') if self.focused() == Panel::Sites => self.move_site(1),
            KeyCode::Up | KeyCode::Char('k') if self.focused() == Panel::Sites => self.move_site(-1),
            KeyCode::PageDown if self.focused() == Panel::Sites => self.move_site(10),
            KeyCode::PageUp if self.focused() == Panel::Sites => self.move_site(-10),
            KeyCode::Char('t') => {
                self.sites_at_peak = !self.sites_at_peak;
                self.site = 0;
                Action::Redraw
            }
            KeyCode::Char(']') | KeyCode::Down | KeyCode::Char('j') => self.select_process(true),
            KeyCode::Char('[') | KeyCode::Up | KeyCode::Char('k') => self.select_process(false),
            KeyCode::Char('p') => {
                self.paused = !self.paused;
                Action::Redraw
            }
            KeyCode::Enter => {
                self.details = !self.details;
                self.scroll = 0;
                Action::Redraw
            }
            _ => Action::None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(c: KeyCode) -> KeyEvent {
        KeyEvent::new(c, KeyModifiers::NONE)
    }

    fn ch(c: char) -> KeyEvent {
        key(KeyCode::Char(c))
    }

    #[test]
    fn quit_keys() {
        let mut a = App::new(1, 0);
        assert_eq!(a.on_key(ch('q')), Action::Quit);
        assert_eq!(a.on_key(key(KeyCode::Esc)), Action::Quit);
        assert_eq!(a.on_key(KeyEvent::new(KeyCode::Char('c'), KeyModifiers::CONTROL)), Action::Quit);
        assert_eq!(a.on_key(ch('x')), Action::None);
    }

    #[test]
    fn help_overlay_opens_and_any_key_closes_it() {
        let mut a = App::new(1, 0);
        assert_eq!(a.on_key(ch('?')), Action::Redraw);
        assert!(a.help);
        // Esc closes the help rather than quitting.
        assert_eq!(a.on_key(key(KeyCode::Esc)), Action::Redraw);
        assert!(!a.help);
        a.on_key(ch('?'));
        assert_eq!(a.on_key(ch('q')), Action::Quit);
    }

    #[test]
    fn tab_and_arrows_move_between_panels() {
        let mut a = App::new(1, 0);
        assert_eq!(a.panels.len(), 7, "no process panel for one image");
        assert_eq!(a.focused(), Panel::Timeline);
        a.on_key(key(KeyCode::Tab));
        assert_eq!(a.focused(), Panel::Retention);
        a.on_key(key(KeyCode::Right));
        assert_eq!(a.focused(), Panel::Counters);
        a.on_key(key(KeyCode::Left));
        a.on_key(key(KeyCode::Left));
        assert_eq!(a.focused(), Panel::Timeline);
        a.on_key(key(KeyCode::BackTab));
        assert_eq!(a.focused(), Panel::Thresholds, "Shift-Tab wraps around");
        a.on_key(key(KeyCode::Tab));
        assert_eq!(a.focused(), Panel::Timeline);
        let mut b = App::new(3, 0);
        assert_eq!(b.panels.last(), Some(&Panel::Processes));
        b.on_key(key(KeyCode::BackTab));
        assert_eq!(b.focused(), Panel::Processes);
    }

    #[test]
    fn zoom_and_scroll_the_time_window() {
        let mut a = App::new(1, 0);
        assert_eq!(a.window(), (0.0, 1.0));
        // Nothing to scroll at full width; nothing below zoom 0.
        assert_eq!(a.on_key(ch('l')), Action::None);
        assert_eq!(a.on_key(ch('-')), Action::None);
        assert_eq!(a.on_key(ch('+')), Action::Redraw);
        // Zooming keeps the centre.
        assert_eq!(a.window(), (0.25, 0.75));
        a.on_key(ch('l'));
        assert_eq!(a.window(), (0.375, 0.875));
        a.on_key(ch('l'));
        a.on_key(ch('l'));
        assert_eq!(a.window(), (0.5, 1.0), "clamped at the end");
        a.on_key(ch('h'));
        assert_eq!(a.window(), (0.375, 0.875));
        a.on_key(ch('-'));
        assert_eq!(a.window(), (0.0, 1.0));
        for _ in 0..20 {
            a.on_key(ch('+'));
        }
        assert_eq!(a.zoom, MAX_ZOOM);
        a.on_key(ch('0'));
        assert_eq!(a.window(), (0.0, 1.0));
        // Elsewhere the arrows move the focus, not the window.
        a.on_key(ch('+'));
        a.on_key(key(KeyCode::Tab));
        a.on_key(key(KeyCode::Right));
        assert_eq!(a.window(), (0.25, 0.75));
    }

    #[test]
    fn the_time_cursor_moves_follows_the_window_and_goes_to_the_peaks() {
        let mut a = App::new(2, 0);
        a.times = vec![Times { duration_s: 8.0, peak_live_s: 6.0, peak_rss_s: Some(7.5), ..Times::default() }, Times { duration_s: 1.0, peak_live_s: 0.5, peak_rss_s: None, ..Times::default() }];
        assert_eq!(a.cursor, None);
        // The first arrow puts the cursor in the middle of the window, the next move it by 1/40.
        assert_eq!(a.on_key(key(KeyCode::Right)), Action::Redraw);
        assert_eq!(a.cursor, Some(4.0));
        a.on_key(key(KeyCode::Right));
        assert_eq!(a.cursor, Some(4.2));
        a.on_key(key(KeyCode::Left));
        a.on_key(key(KeyCode::Left));
        assert_eq!(a.cursor, Some(3.8));
        a.on_key(key(KeyCode::End));
        assert_eq!(a.cursor, Some(8.0));
        assert_eq!(a.on_key(key(KeyCode::Right)), Action::None, "stops at the end");
        a.on_key(key(KeyCode::Home));
        assert_eq!(a.cursor, Some(0.0));
        // Zoomed in, going to a peak outside the window scrolls the window to it.
        a.on_key(ch('+'));
        a.on_key(ch('+'));
        assert_eq!(a.window(), (0.375, 0.625));
        a.on_key(ch('g'));
        assert_eq!(a.cursor, Some(6.0));
        assert_eq!(a.window(), (0.625, 0.875));
        a.on_key(ch('G'));
        assert_eq!(a.cursor, Some(7.5));
        assert_eq!(a.window(), (0.75, 1.0), "clamped at the end");
        assert_eq!(a.on_key(ch('x')), Action::Redraw);
        assert_eq!(a.cursor, None);
        assert_eq!(a.on_key(ch('x')), Action::None);
        // Another image: no RSS peak to go to; switching images drops the cursor.
        a.on_key(ch('g'));
        a.on_key(ch(']'));
        assert_eq!(a.cursor, None);
        assert_eq!(a.on_key(ch('G')), Action::None);
        // The stacked categories toggle.
        assert!(a.stack);
        a.on_key(ch('s'));
        assert!(!a.stack);
        // Elsewhere the arrows still move between panels and leave the cursor alone.
        a.on_key(key(KeyCode::Tab));
        a.on_key(key(KeyCode::Right));
        assert_eq!((a.focused(), a.cursor), (Panel::Counters, None));
    }

    #[test]
    fn brackets_and_up_down_switch_the_image() {
        let mut a = App::new(3, 1);
        assert_eq!(a.process, 1);
        a.on_key(ch(']'));
        assert_eq!(a.process, 2);
        assert_eq!(a.on_key(key(KeyCode::Down)), Action::None, "stops at the last");
        a.on_key(ch('['));
        a.on_key(key(KeyCode::Up));
        assert_eq!(a.process, 0);
        assert_eq!(a.on_key(key(KeyCode::Up)), Action::None);
        assert_eq!(App::new(2, 9).process, 1);
    }

    #[test]
    fn a_refreshed_model_keeps_the_state() {
        let mut a = App::new(0, 0);
        a.set_process_count(1);
        assert!(!a.panels.contains(&Panel::Processes));
        a.on_key(ch('+'));
        a.on_key(key(KeyCode::Tab));
        let (zoom, focus) = (a.zoom, a.focused());
        a.set_process_count(3);
        assert_eq!(a.panels.last(), Some(&Panel::Processes));
        assert_eq!((a.zoom, a.focused(), a.process), (zoom, focus, 0));
        a.on_key(ch(']'));
        a.on_key(ch(']'));
        a.set_process_count(2);
        assert_eq!(a.process, 1, "clamped");
    }

    #[test]
    fn sites_keys_select_a_site_and_toggle_end_and_peak() {
        let mut a = App::new(2, 0);
        a.times = vec![Times { sites: (3, 2), ..Times::default() }, Times { sites: (1, 1), ..Times::default() }];
        assert!(a.focus_panel(Panel::Sites));
        assert_eq!(a.panels[4], Panel::Sites, "after the sizes in the Tab order");
        // ↓/↑ move the selection within the list (not the image).
        assert_eq!(a.on_key(key(KeyCode::Down)), Action::Redraw);
        a.on_key(ch('j'));
        assert_eq!((a.site, a.process), (2, 0));
        assert_eq!(a.on_key(key(KeyCode::Down)), Action::None, "stops at the last site");
        a.on_key(key(KeyCode::Up));
        assert_eq!(a.site, 1);
        // t: the list at the peak (its own rows), from the top.
        assert_eq!(a.on_key(ch('t')), Action::Redraw);
        assert!(a.sites_at_peak);
        assert_eq!(a.site, 0);
        a.on_key(key(KeyCode::PageDown));
        assert_eq!(a.site, 1, "clamped to the 2 sites at the peak");
        // Enter: the selected site's details; ↓ scrolls them there.
        a.on_key(key(KeyCode::Enter));
        assert!(a.details);
        a.on_key(key(KeyCode::Down));
        assert_eq!((a.scroll, a.site), (1, 1));
        a.on_key(key(KeyCode::Esc));
        // [/] still switch images, and the selection starts again.
        a.on_key(ch(']'));
        assert_eq!((a.process, a.site), (1, 0));
        a.on_key(ch('t'));
        assert!(!a.sites_at_peak);
    }

    #[test]
    fn pause_toggles_a_marker() {
        let mut a = App::new(1, 0);
        a.on_key(ch('p'));
        assert!(a.paused);
        a.on_key(ch('p'));
        assert!(!a.paused);
    }

    #[test]
    fn enter_opens_details_which_scroll_and_close() {
        let mut a = App::new(2, 0);
        a.on_key(key(KeyCode::Tab));
        assert_eq!(a.on_key(key(KeyCode::Enter)), Action::Redraw);
        assert!(a.details);
        a.on_key(key(KeyCode::Down));
        a.on_key(key(KeyCode::Down));
        assert_eq!((a.scroll, a.process), (2, 0), "arrows scroll the details");
        a.on_key(key(KeyCode::Up));
        assert_eq!(a.scroll, 1);
        a.on_key(key(KeyCode::Tab));
        assert_eq!((a.focused(), a.scroll, a.details), (Panel::Counters, 0, true), "Tab moves the details to the next panel");
        assert_eq!(a.on_key(key(KeyCode::Esc)), Action::Redraw, "Esc closes the details");
        assert!(!a.details);
        a.on_key(key(KeyCode::Enter));
        a.on_key(key(KeyCode::Enter));
        assert!(!a.details);
    }
}
