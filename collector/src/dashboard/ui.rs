//! Drawing the dashboard with ratatui widgets: the layout (header, panels, footer, help and
//! details overlays) and one renderer per panel. Reads a [`DashboardModel`] and the [`App`]
//! state; changes neither.

use ratatui::buffer::Buffer;
use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::symbols::Marker;
use ratatui::text::{Line, Span};
use ratatui::widgets::{Axis, Block, BorderType, Cell, Chart, Clear, Dataset, Gauge, GraphType, Paragraph, Row, Table, TableState, Wrap};
use ratatui::Frame;

use super::app::{App, Panel};
use super::model::{DashboardModel, Indexing, Point, ProcessModel, RetentionModel, Site, SitesStatus, Snapshot};
use crate::report::text::bytes;

/// Terminals at least this wide show two panels side by side.
const TWO_COLUMNS: u16 = 140;
/// Terminals at least this high show two rows of panels.
const TWO_ROWS: u16 = 34;

#[derive(Clone, Copy)]
struct Theme {
    color: bool,
}

impl Theme {
    fn fg(self, c: Color) -> Style {
        if self.color { Style::default().fg(c) } else { Style::default() }
    }
    fn focus(self) -> Style {
        self.fg(Color::Cyan).add_modifier(Modifier::BOLD)
    }
    fn heading(self) -> Style {
        Style::default().add_modifier(Modifier::BOLD)
    }
    fn dim(self) -> Style {
        if self.color { Style::default().fg(Color::DarkGray) } else { Style::default() }
    }
}

/// Draw one frame.
pub fn draw(f: &mut Frame, m: &DashboardModel, app: &App) {
    let th = Theme { color: app.color };
    let area = f.area();
    if let Some(ix) = &m.indexing {
        indexing(f, area, m, ix, th);
        return;
    }
    let Some(p) = m.processes.get(app.process) else {
        if let Some(live) = &app.live {
            let text = format!("mtracer run · {live} · no process image recorded yet · q quit");
            f.render_widget(Paragraph::new(text).wrap(Wrap { trim: false }), area);
            return;
        }
        f.render_widget(Paragraph::new("the trace holds no process image (nothing was recorded)").wrap(Wrap { trim: false }), area);
        return;
    };
    let header_h = 1 + u16::from(!m.warnings.is_empty());
    let [header, body, footer] = Layout::vertical([Constraint::Length(header_h), Constraint::Min(1), Constraint::Length(1)]).areas(area);
    // The states that matter most first, where a narrow terminal still shows them.
    let mut first = vec![Span::styled(app.live.as_ref().map_or_else(|| "mtracer view".to_string(), |l| format!("mtracer run · {l}")), th.heading())];
    if app.paused {
        first.push(Span::styled(" · [paused]", th.fg(Color::Yellow)));
    }
    if let Some(st) = app.stream.as_ref().filter(|st| st.behind_s >= 1.0) {
        first.push(Span::styled(format!(" · analysis behind by {:.0} s", st.behind_s), th.fg(Color::Yellow)));
    }
    // The image's number as `report`, `--image` and the Processes panel give it; its place among
    // the images in parentheses.
    first.push(Span::raw(format!(" · image {} ({} of {}): {} · {:.3} s · {}", p.image, app.process + 1, m.processes.len(), p.title(), p.duration_s, p.ending)));
    let mut head = vec![Line::from(first)];
    if let Some(w) = m.warnings.first() {
        let more = if m.warnings.len() > 1 { format!(" (+{} more)", m.warnings.len() - 1) } else { String::new() };
        head.push(Line::styled(format!("warning: {w}{more}"), th.fg(Color::Yellow)));
    }
    f.render_widget(Paragraph::new(head), header);
    let keys = if app.details {
        "Esc/Enter close · ↑/↓ PgUp/PgDn scroll · Tab next panel · ? help · q quit"
    } else {
        match app.focused() {
            Panel::Timeline => "q quit · ? help · Tab panel · ←/→ cursor · h/l scroll · +/- zoom · s stack",
            Panel::Sites => "q quit · ? help · Tab panel · ↑/↓ site · Enter stack · t end/peak · [/] image",
            _ => "q quit · ? help · Tab panel · +/- zoom · ←/→ panel · [/] image · Enter details",
        }
    };
    f.render_widget(Paragraph::new(Line::styled(keys, th.dim())), footer);

    if app.details {
        details(f, body, m, p, app, th);
    } else {
        let (cols, rows) = if app.single { (1, 1) } else { (usize::from(body.width >= TWO_COLUMNS) + 1, usize::from(body.height >= TWO_ROWS) + 1) };
        // Panels go in pages of `slots`, in Tab order; the page shown is the focused panel's.
        let slots = cols * rows;
        let page = app.focus / slots;
        let visible: Vec<Panel> = app.panels.iter().copied().skip(page * slots).take(slots).collect();
        for (panel, rect) in visible.iter().zip(grid(body, visible.len(), body.width >= TWO_COLUMNS && !app.single)) {
            let focused = *panel == app.focused();
            render_panel(f, rect, *panel, focused, m, p, app, th);
        }
    }
    if app.help {
        help(f, area, th);
    }
}

/// Split `area` for `n` panels: rows first, then two columns when `wide`.
fn grid(area: Rect, n: usize, wide: bool) -> Vec<Rect> {
    match n {
        0 => vec![],
        1 => vec![area],
        2 if !wide => Layout::vertical([Constraint::Ratio(1, 2); 2]).split(area).to_vec(),
        2 => Layout::horizontal([Constraint::Ratio(1, 2); 2]).split(area).to_vec(),
        _ => {
            let rows = Layout::vertical([Constraint::Ratio(1, 2); 2]).split(area);
            let mut v = Vec::new();
            for r in rows.iter() {
                v.extend(Layout::horizontal([Constraint::Ratio(1, 2); 2]).split(*r).iter().copied());
            }
            v.truncate(n);
            v
        }
    }
}

fn panel_block(panel: Panel, extra: String, focused: bool, th: Theme) -> Block<'static> {
    let title = if focused { format!(" ▶ {}{extra} ", panel.title()) } else { format!(" {}{extra} ", panel.title()) };
    let b = Block::bordered().title(title);
    if focused { b.border_type(BorderType::Thick).border_style(th.focus()) } else { b }
}

#[allow(clippy::too_many_arguments)]
fn render_panel(f: &mut Frame, area: Rect, panel: Panel, focused: bool, m: &DashboardModel, p: &ProcessModel, app: &App, th: Theme) {
    match panel {
        Panel::Timeline => timeline(f, area, p, app, focused, th),
        Panel::Retention => retention(f, area, p, app, focused, th),
        Panel::Counters => counters(f, area, p, app, focused, th),
        Panel::Sizes => sizes(f, area, p, focused, th),
        Panel::Sites => sites(f, area, p, app, focused, th),
        Panel::Arenas => arenas(f, area, p, focused, th),
        Panel::Thresholds => {
            let block = panel_block(panel, " · at the end".to_string(), focused, th);
            let lines = match &p.retention {
                Some(r) => threshold_lines(r, th),
                None => no_model(),
            };
            f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).block(block), area);
        }
        Panel::Processes => processes(f, area, m, app, focused, th),
    }
}

fn no_model() -> Vec<Line<'static>> {
    vec![Line::raw("no glibc model for this image: its allocator is not glibc's")]
}

/// The time window in seconds, and the image's duration.
fn window(p: &ProcessModel, app: &App) -> (f64, f64) {
    let dur = p.timeline.last().map_or(0.0, |q| q.t_s).max(p.duration_s).max(1e-6);
    let (lo, hi) = app.window();
    (lo * dur, hi * dur)
}

fn in_window(p: &ProcessModel, t0: f64, t1: f64) -> &[Point] {
    let a = p.timeline.partition_point(|q| q.t_s < t0);
    let b = p.timeline.partition_point(|q| q.t_s <= t1);
    &p.timeline[a..b.max(a)]
}

/// The retention categories stacked under the timeline's lines, in four bands from the bottom:
/// name, colour, fill without colour, and the bytes of a sample.
type Band = (&'static str, Color, Marker, fn(&Point) -> u64);

const BANDS: [Band; 4] = [
    ("live", Color::Green, Marker::Block, |q| q.categories.live),
    ("overhead", Color::Blue, Marker::Bar, |q| q.categories.overhead + q.categories.metadata + q.categories.mmapped_rounding),
    ("free in bins/tcache", Color::Magenta, Marker::Dot, |q| q.categories.tcache + q.categories.fastbins + q.categories.bins + q.categories.released),
    ("top", Color::Cyan, Marker::Braille, |q| q.categories.top),
];

/// Is there a category series to stack (the glibc model ran and classified something)?
fn has_categories(p: &ProcessModel) -> bool {
    p.retention.is_some() && p.timeline.iter().any(|q| q.categories.sum() > 0)
}

/// `live 1.2 MiB · held … · RSS …` of one sample (heap and mmapped apart: in the details).
fn point_values(q: &Point) -> String {
    format!("live {} · held {} · RSS {}", bytes(q.live_bytes), bytes(q.os_held_bytes()), bytes(q.rss_bytes))
}

/// The non-zero bands of a sample, `live 1 MiB · top 3 MiB`.
fn band_values(q: &Point) -> String {
    let v: Vec<String> = BANDS.iter().map(|(n, _, _, f)| (n, f(q))).filter(|(_, b)| *b > 0).map(|(n, b)| format!("{n} {}", bytes(b))).collect();
    if v.is_empty() { "no categories".to_string() } else { v.join(" · ") }
}

/// `calls/s 1.2M (malloc 600k, free 600k)` over the second before `t`.
fn rate_text(p: &ProcessModel, t: f64, top: usize) -> String {
    match p.call_rates(t, 1.0) {
        Some((total, v)) => {
            let each: Vec<String> = v.iter().take(top).map(|(k, r)| format!("{k} {}", per_s(*r))).collect();
            if each.is_empty() { "calls/s 0".to_string() } else { format!("calls/s {} ({})", per_s(total), each.join(", ")) }
        }
        None => "calls/s n/a".to_string(),
    }
}

/// A rate, short: `950`, `12.3k`, `4.56M`.
fn per_s(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2}M", r / 1e6)
    } else if r >= 1e4 {
        format!("{:.1}k", r / 1e3)
    } else {
        format!("{r:.0}")
    }
}

fn timeline(f: &mut Frame, area: Rect, p: &ProcessModel, app: &App, focused: bool, th: Theme) {
    let (t0, t1) = window(p, app);
    let extra = format!(" · {t0:.3}–{t1:.3} s · zoom {}×", 1u32 << app.zoom);
    let block = panel_block(Panel::Timeline, extra, focused, th);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let pts = in_window(p, t0, t1);
    if p.timeline.is_empty() {
        f.render_widget(Paragraph::new("no samples: the image ended within one sampling period").wrap(Wrap { trim: false }), inner);
        return;
    }
    let stacked = app.stack && has_categories(p);
    let legend_h = 1 + u16::from(stacked);
    let [legend_area, chart_area, status] = Layout::vertical([Constraint::Length(legend_h), Constraint::Min(1), Constraint::Length(2)]).areas(inner);
    // Two braille dots per cell across: more points than that only cost time.
    let buckets = usize::from(chart_area.width) * 2;
    let live = thin(pts, t0, t1, buckets, |q| q.live_bytes);
    let held = thin(pts, t0, t1, buckets, Point::os_held_bytes);
    let rss = thin(pts, t0, t1, buckets, |q| q.rss_bytes);
    let ymax = pts.iter().map(|q| q.live_bytes.max(q.os_held_bytes()).max(q.rss_bytes).max(q.categories.sum())).max().unwrap_or(0).max(1024) as f64 * 1.05;
    let (mr, mh, ml) = if th.color { (Marker::Braille, Marker::Braille, Marker::Braille) } else { (Marker::HalfBlock, Marker::Dot, Marker::Braille) };
    // The bands: each drawn as the area under the sum of it and the bands below it, the highest
    // sum first, so that each lower band paints over the part of the higher ones it covers.
    let mut sums: Vec<Vec<(f64, f64)>> = Vec::new();
    if stacked {
        for k in 0..BANDS.len() {
            sums.push(thin(pts, t0, t1, buckets, |q| BANDS[..=k].iter().map(|b| b.3(q)).sum()));
        }
    }
    let mut datasets = Vec::new();
    for k in (0..sums.len()).rev() {
        let (_, color, fill, _) = BANDS[k];
        let marker = if th.color { Marker::HalfBlock } else { fill };
        datasets.push(Dataset::default().marker(marker).graph_type(GraphType::Area).fill_to_y(0.0).style(th.fg(color)).data(&sums[k]));
    }
    let lines = [
        Dataset::default().name("RSS").marker(mr).graph_type(GraphType::Line).style(th.fg(Color::Red)).data(&rss),
        Dataset::default().name("held (heap+mmapped)").marker(mh).graph_type(GraphType::Line).style(th.fg(Color::Yellow)).data(&held),
        Dataset::default().name("live").marker(ml).graph_type(GraphType::Line).style(th.fg(if stacked { Color::LightGreen } else { Color::Green })).data(&live),
    ];
    datasets.extend(lines);
    let cursor_line: Vec<(f64, f64)> = match app.cursor {
        Some(c) if (t0..=t1).contains(&c) => vec![(c, 0.0), (c, ymax)],
        _ => vec![],
    };
    if !cursor_line.is_empty() {
        datasets.push(Dataset::default().marker(Marker::Braille).graph_type(GraphType::Line).style(th.fg(Color::White).add_modifier(Modifier::BOLD)).data(&cursor_line));
    }
    let mid = (t0 + t1) / 2.0;
    let chart = Chart::new(datasets)
        .x_axis(Axis::default().bounds([t0, t1]).labels([format!("{t0:.3} s"), format!("{mid:.3} s"), format!("{t1:.3} s")]).style(th.dim()))
        .y_axis(Axis::default().bounds([0.0, ymax]).labels([bytes(0), bytes((ymax / 2.0) as u64), bytes(ymax as u64)]).style(th.dim()))
        .legend_position(None);
    f.render_widget(chart, chart_area);
    let marker = |m: Marker| match m {
        Marker::HalfBlock | Marker::Block => "█",
        Marker::Bar => "▄",
        Marker::Dot => "•",
        _ => "⣿",
    };
    let mut legend = vec![Line::from(vec![
        Span::styled(format!("{} RSS", if th.color { "⣿" } else { "▀" }), th.fg(Color::Red)),
        Span::raw("  "),
        Span::styled(format!("{} held from the OS (heap + mmapped)", marker(mh)), th.fg(Color::Yellow)),
        Span::raw("  "),
        Span::styled(format!("{} live", marker(ml)), th.fg(if stacked { Color::LightGreen } else { Color::Green })),
    ])];
    if stacked {
        let mut spans = vec![Span::styled("held, stacked (s hides): ", th.dim())];
        for (name, color, fill, _) in BANDS {
            spans.push(Span::styled(format!("{} {name}  ", if th.color { "█" } else { marker(fill) }), th.fg(color)));
        }
        legend.push(Line::from(spans));
    }
    f.render_widget(Paragraph::new(legend), legend_area);
    let text = match app.cursor {
        Some(c) => match p.point_at(c) {
            Some(q) => vec![
                Line::styled(format!("cursor {c:.3} s: {}", point_values(q)), th.heading()),
                Line::raw(format!("{} · {}", band_values(q), rate_text(p, c, 2))),
            ],
            None => vec![Line::raw(format!("cursor {c:.3} s: no sample"))],
        },
        None => match pts.last() {
            Some(q) => vec![
                Line::raw(format!("at {:.3} s: {}", q.t_s, point_values(q))),
                Line::styled(format!("{} · ←/→ cursor, g peak", rate_text(p, q.t_s, 2)), th.dim()),
            ],
            None => vec![Line::raw("no sample in this window (+/- zoom, h/l scroll)")],
        },
    };
    f.render_widget(Paragraph::new(text), status);
}

/// A category: its name, bytes and percent at the end, and at the peak when known.
type CategoryRow<'a> = (&'a str, (u64, f64), Option<(u64, f64)>);

/// `(t, value)` of `pts` for a chart, at most about `buckets` of them: where several samples
/// share one of `buckets` equal slices of `[t0, t1]`, the largest value stands for them (peaks
/// are what the chart is read for), at the time of the slice's first sample.
fn thin(pts: &[Point], t0: f64, t1: f64, buckets: usize, value: impl Fn(&Point) -> u64) -> Vec<(f64, f64)> {
    if pts.len() <= buckets.max(1) * 2 {
        return pts.iter().map(|q| (q.t_s, value(q) as f64)).collect();
    }
    let span = (t1 - t0).max(f64::MIN_POSITIVE);
    let slice = |t: f64| (((t - t0) / span * buckets as f64) as usize).min(buckets - 1);
    let mut out: Vec<(f64, f64)> = Vec::with_capacity(buckets + 1);
    let mut cur = usize::MAX;
    for q in pts {
        let (b, v) = (slice(q.t_s), value(q) as f64);
        match out.last_mut() {
            Some(last) if b == cur => last.1 = last.1.max(v),
            _ => {
                out.push((q.t_s, v));
                cur = b;
            }
        }
    }
    out
}

/// The categories with bytes at the end and at the peak, the non-zero ones (all when none is).
fn category_rows(r: &RetentionModel) -> Vec<CategoryRow<'_>> {
    let peak = |k: &str| r.at_peak.as_ref().and_then(|s| s.categories.iter().find(|c| c.0 == k)).map(|c| (c.1, c.2));
    let all: Vec<_> = r.at_end.categories.iter().map(|(k, v, pct)| (k.as_str(), (*v, *pct), peak(k))).collect();
    let nonzero: Vec<_> = all.iter().filter(|(_, e, pk)| e.0 > 0 || pk.is_some_and(|x| x.0 > 0)).cloned().collect();
    if nonzero.is_empty() { all } else { nonzero }
}

fn snapshot_summary(label: &str, s: &Snapshot) -> String {
    let rss = if s.rss_bytes > 0 { format!(", RSS {}", bytes(s.rss_bytes)) } else { String::new() };
    format!("{label} ({:.3} s{rss}): {} held, {} live", s.t_s, bytes(s.os_held_bytes), bytes(s.live_bytes))
}

/// Causes, malloc_trim calls and remedies, as lines to wrap. `full`: every cause before each
/// trim and the model's caveats too.
fn cause_lines(r: &RetentionModel, full: bool, th: Theme) -> Vec<Line<'static>> {
    let mut v = Vec::new();
    if !r.at_end.causes.is_empty() {
        v.push(Line::styled("why, at the end:", th.heading()));
        v.extend(r.at_end.causes.iter().map(|c| Line::raw(format!("· {}", c.text))));
    }
    for t in &r.trims {
        let measured = if t.rss_before > 0 && t.rss_after > 0 { format!(", RSS {} → {}", bytes(t.rss_before), bytes(t.rss_after)) } else { String::new() };
        v.push(Line::styled(format!("malloc_trim({}) at {:.3} s: predicted to return {}{measured}", t.pad, t.t_s, bytes(t.predicted_release_bytes)), th.heading()));
        for c in t.causes_before.iter().take(if full { usize::MAX } else { 1 }) {
            v.push(Line::raw(format!("  before it · {}", c.text)));
        }
    }
    if let Some(pk) = r.at_peak.as_ref().filter(|pk| !pk.causes.is_empty()) {
        v.push(Line::styled(format!("why, at peak RSS ({:.3} s):", pk.t_s), th.heading()));
        v.extend(pk.causes.iter().map(|c| Line::raw(format!("· {}", c.text))));
    }
    if !r.remedies.is_empty() {
        v.push(Line::styled("what would change it:", th.heading()));
        v.extend(r.remedies.iter().map(|m| Line::raw(format!("· {}", m.text))));
    }
    if full {
        for u in &r.uncertain {
            v.push(Line::raw(format!("uncertain: {u}")));
        }
        if r.model_conflicts > 0 {
            v.push(Line::raw(format!("model: {} contradictions with the trace (approximate in places)", r.model_conflicts)));
        }
    }
    if v.is_empty() {
        v.push(Line::raw("nothing retained worth a sentence"));
    }
    v
}

fn retention(f: &mut Frame, area: Rect, p: &ProcessModel, app: &App, focused: bool, th: Theme) {
    let at_cursor = app.cursor.and_then(|c| p.point_at(c).map(|q| (c, q)));
    let extra = match at_cursor {
        Some((c, _)) => format!(" · at the end and at the cursor ({c:.3} s)"),
        None => " · at the end and at peak RSS".to_string(),
    };
    let block = panel_block(Panel::Retention, extra, focused, th);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let Some(r) = &p.retention else {
        f.render_widget(Paragraph::new(no_model()), inner);
        return;
    };
    let mut rows = category_rows(r);
    let mut summary = vec![Line::raw(snapshot_summary("at the end", &r.at_end))];
    match at_cursor {
        Some((c, q)) => {
            summary.push(Line::styled(format!("at the cursor ({c:.3} s): {} held, {} live, RSS {}", bytes(q.os_held_bytes()), bytes(q.live_bytes), bytes(q.rss_bytes)), th.heading()));
            // The second pair of columns shows the cursor's sample instead of the peak.
            let held = q.categories.sum().max(1) as f64;
            let pairs = q.categories.pairs();
            for row in &mut rows {
                row.2 = pairs.iter().find(|(k, _)| *k == row.0).map(|(_, v)| (*v, *v as f64 * 100.0 / held));
            }
        }
        None => {
            if let Some(pk) = &r.at_peak {
                summary.push(Line::raw(snapshot_summary("at peak RSS", pk)));
            }
        }
    }
    let table_h = rows.len() as u16 + 1;
    let side = inner.width >= 110;
    let (left, right) = if side {
        let [l, r] = Layout::horizontal([Constraint::Length(62), Constraint::Min(20)]).spacing(2).areas(inner);
        (l, r)
    } else {
        let [l, r] = Layout::vertical([Constraint::Length(summary.len() as u16 + table_h), Constraint::Min(0)]).areas(inner);
        (l, r)
    };
    let [sum_area, table_area] = Layout::vertical([Constraint::Length(summary.len() as u16), Constraint::Min(0)]).areas(left);
    f.render_widget(Paragraph::new(summary).wrap(Wrap { trim: false }), sum_area);
    let second = if at_cursor.is_some() { "at cursor" } else if r.at_peak.is_some() { "at peak" } else { "" };
    let bar = |pct: f64| "█".repeat(((pct / 10.0).round() as usize).min(10));
    let header = Row::new(["category", "at end", "%", second, if second.is_empty() { "" } else { "%" }, "share"]).style(th.heading());
    let table_rows: Vec<Row> = rows
        .iter()
        .map(|(k, (v, pct), pk)| {
            Row::new(vec![
                Cell::from(k.to_string()),
                Cell::from(Line::raw(bytes(*v)).right_aligned()),
                Cell::from(Line::raw(format!("{pct:.1}")).right_aligned()),
                Cell::from(Line::raw(pk.map_or(String::new(), |x| bytes(x.0))).right_aligned()),
                Cell::from(Line::raw(pk.map_or(String::new(), |x| format!("{:.1}", x.1))).right_aligned()),
                Cell::from(Span::styled(bar(*pct), th.fg(Color::Blue))),
            ])
        })
        .collect();
    let widths = [Constraint::Length(16), Constraint::Length(10), Constraint::Length(5), Constraint::Length(10), Constraint::Length(5), Constraint::Length(10)];
    f.render_widget(Table::new(table_rows, widths).header(header).column_spacing(1), table_area);
    f.render_widget(Paragraph::new(cause_lines(r, false, th)).wrap(Wrap { trim: false }), right);
}

fn arena_table<'a>(s: &Snapshot, th: Theme) -> (Table<'a>, u16) {
    let header = Row::new(["arena", "heaps", "held", "live", "free", "top", "threads"]).style(th.heading());
    let rows: Vec<Row> = s
        .arenas
        .iter()
        .map(|a| {
            Row::new(vec![
                Cell::from(a.id.clone()),
                Cell::from(Line::raw(a.heaps.to_string()).right_aligned()),
                Cell::from(Line::raw(bytes(a.held_bytes)).right_aligned()),
                Cell::from(Line::raw(bytes(a.live_bytes)).right_aligned()),
                Cell::from(Line::raw(bytes(a.free_bytes)).right_aligned()),
                Cell::from(Line::raw(bytes(a.top_bytes)).right_aligned()),
                Cell::from(Line::raw(a.threads.to_string()).right_aligned()),
            ])
        })
        .collect();
    let n = rows.len() as u16 + 1;
    let widths = [Constraint::Length(14), Constraint::Length(5), Constraint::Length(10), Constraint::Length(10), Constraint::Length(10), Constraint::Length(10), Constraint::Length(7)];
    (Table::new(rows, widths).header(header).column_spacing(1), n)
}

fn mallinfo_lines(r: &RetentionModel, th: Theme) -> Vec<Line<'static>> {
    let mut v = Vec::new();
    if let Some((t, reason, ok)) = &r.mallinfo2_at {
        let verdict = if *ok { "model and glibc agree" } else { "model and glibc differ" };
        v.push(Line::styled(format!("mallinfo2 at {t:.3} s ({reason}): {verdict}"), th.heading()));
        v.push(Line::raw(format!("  {:<10} {:>14} {:>14} {:>12}", "field", "model", "glibc", "difference")));
        for (k, model, glibc) in &r.mallinfo2 {
            let d = *model as i128 - *glibc as i128;
            v.push(Line::raw(format!("  {k:<10} {model:>14} {glibc:>14} {:>12}", if d == 0 { "=".to_string() } else { format!("{d:+}") })));
        }
    }
    if r.checkpoints_exact > 0 {
        v.push(Line::raw(format!("mallinfo2 checkpoints: {} of {} in exact order agree with the model", r.checkpoints_agreeing, r.checkpoints_exact)));
    }
    v
}

fn arenas(f: &mut Frame, area: Rect, p: &ProcessModel, focused: bool, th: Theme) {
    let block = panel_block(Panel::Arenas, " · at the end".to_string(), focused, th);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let Some(r) = &p.retention else {
        f.render_widget(Paragraph::new(no_model()), inner);
        return;
    };
    let (table, h) = arena_table(&r.at_end, th);
    let [title, t, rest] = Layout::vertical([Constraint::Length(1), Constraint::Length(h), Constraint::Min(0)]).areas(inner);
    f.render_widget(Paragraph::new(Line::styled(snapshot_summary("at the end", &r.at_end), th.heading())), title);
    f.render_widget(table, t);
    let mut lines = vec![Line::raw("")];
    lines.extend(mallinfo_lines(r, th));
    f.render_widget(Paragraph::new(lines), rest);
}

fn threshold_lines(r: &RetentionModel, th: Theme) -> Vec<Line<'static>> {
    let t = &r.thresholds;
    let rule = if t.dynamic { "dynamic (raised by frees of mmapped blocks, up to 32 MiB)".to_string() } else { format!("fixed by {}", t.fixed_by.as_deref().unwrap_or("a setting")) };
    let mut v = vec![
        Line::raw(format!("mmap threshold  {}", bytes(t.mmap_threshold))),
        Line::raw(format!("trim threshold  {}", bytes(t.trim_threshold))),
        Line::raw(format!("top pad         {}", bytes(t.top_pad))),
        Line::raw(format!("rule            {rule}")),
        Line::raw(format!("arena limit     {} ({})", t.arena_limit, t.arena_limit_source)),
        Line::raw(""),
    ];
    if t.changes.is_empty() {
        v.push(Line::raw("no threshold changes"));
    } else {
        v.push(Line::styled(format!("{} change(s):", t.changes.len()), th.heading()));
        for c in &t.changes {
            let by = if c.dynamic { "dynamic rule" } else { "setting" };
            let mut s = format!("· {:.3} s: mmap threshold {} → {} ({by}: {})", c.t_s, bytes(c.old), bytes(c.new), c.cause);
            if c.heap_allocations_between > 0 {
                s += &format!("; {} later allocation(s) in between ({}) came from the heap", c.heap_allocations_between, bytes(c.heap_bytes_between));
            }
            v.push(Line::raw(s));
        }
    }
    v
}

fn counter_lines(p: &ProcessModel) -> Vec<Line<'static>> {
    let mut v = vec![
        Line::raw(format!("allocations     {}", p.alloc_count)),
        Line::raw(format!("frees           {}", p.free_count)),
        Line::raw(format!("failed          {}", p.failed_allocs)),
        Line::raw(format!("allocated       {}", bytes(p.bytes_allocated_total))),
        Line::raw(format!("peak live       {} at {:.3} s", bytes(p.peak_live_bytes), p.peak_live_time_s)),
        Line::raw(format!("final live      {} in {} blocks", bytes(p.final_live_bytes), p.final_live_blocks)),
        Line::raw(format!("final heap      {}", bytes(p.final_heap_bytes))),
        Line::raw(format!("final mmapped   {}", bytes(p.final_mmapped_bytes))),
    ];
    if p.peak_rss_bytes == 0 && p.final_rss_bytes == 0 {
        v.push(Line::raw("RSS             not sampled"));
    } else {
        v.push(Line::raw(format!("peak RSS        {}", bytes(p.peak_rss_bytes))));
        v.push(Line::raw(format!("final RSS       {}", bytes(p.final_rss_bytes))));
    }
    v.push(Line::raw(format!("threads         {}", p.threads)));
    v.push(Line::raw(format!("lost events     {}", p.lost_events)));
    v.push(Line::raw(format!("unmatched frees {}", p.unmatched_frees)));
    for (k, n) in &p.anomalies {
        v.push(Line::raw(format!("anomaly: {k} {n}")));
    }
    v
}

/// The recorder's backlog, in words (`n/a` when the trace does not say).
fn backlog_text(app: &App) -> String {
    match app.stream.as_ref().and_then(|st| st.backlog_bytes.map(|b| (b, st.writers_waiting.unwrap_or(0)))) {
        Some((b, 0)) => bytes(b),
        Some((b, w)) => format!("{}, {w} threads wait", bytes(b)),
        None => "n/a".to_string(),
    }
}

fn counters(f: &mut Frame, area: Rect, p: &ProcessModel, app: &App, focused: bool, th: Theme) {
    // Rates over the second before the cursor, or before the last sample.
    let (t, label) = match app.cursor {
        Some(c) => (c, format!(" · calls/s in the second before the cursor ({c:.3} s)")),
        None => (p.timeline.last().map_or(0.0, |q| q.t_s), " · calls/s in the last second".to_string()),
    };
    let block = panel_block(Panel::Counters, label, focused, th);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let [left, right] = Layout::horizontal([Constraint::Length(34), Constraint::Min(10)]).spacing(2).areas(inner);
    let rates = p.call_rates(t, 1.0);
    let rate_of = |k: &str| rates.as_ref().map_or("n/a".to_string(), |(_, v)| v.iter().find(|x| x.0 == k).map_or("0".to_string(), |x| per_s(x.1)));
    let rows: Vec<Row> = p
        .calls
        .iter()
        .map(|(k, n)| Row::new(vec![Cell::from(k.clone()), Cell::from(Line::raw(n.to_string()).right_aligned()), Cell::from(Line::raw(rate_of(k)).right_aligned())]))
        .collect();
    let table = Table::new(rows, [Constraint::Length(14), Constraint::Length(10), Constraint::Length(8)]).header(Row::new(["function", "calls", "/s"]).style(th.heading()));
    f.render_widget(table, left);
    let mut lines = vec![
        Line::raw(format!("events          {}", p.calls.iter().map(|(_, n)| n).sum::<u64>())),
        Line::raw(format!("calls/s         {}", rates.as_ref().map_or("n/a".to_string(), |r| per_s(r.0)))),
        Line::raw(format!("live blocks     {}", p.final_live_blocks)),
        Line::raw(format!("backlog         {}", backlog_text(app))),
    ];
    if let Some(st) = &app.stream {
        lines.push(Line::raw(format!("analysis behind {:.1} s", st.behind_s)));
    }
    lines.extend(counter_lines(p));
    f.render_widget(Paragraph::new(lines), right);
}

/// `32 B–63 B`, `0 B`.
fn size_range(lo: u64, hi: u64) -> String {
    if lo == hi { bytes(lo) } else { format!("{}–{}", bytes(lo), bytes(hi)) }
}

fn sizes(f: &mut Frame, area: Rect, p: &ProcessModel, focused: bool, th: Theme) {
    let block = panel_block(Panel::Sizes, " · the whole run".to_string(), focused, th);
    let inner = block.inner(area);
    f.render_widget(block, area);
    let z = &p.sizes;
    if z.count == 0 {
        f.render_widget(Paragraph::new("no allocations"), inner);
        return;
    }
    let mut lines = vec![Line::styled(format!("{} allocations · median {} · p99 {} · max {}", z.count, bytes(z.p50), bytes(z.p99), bytes(z.max)), th.heading())];
    lines.push(Line::styled(format!("{:<21} {:>11} {:>6} {:>11}  count", "request size", "count", "%", "bytes"), th.heading()));
    let most = z.buckets.iter().map(|b| b.2).max().unwrap_or(1).max(1);
    let bar_w = usize::from(inner.width.saturating_sub(55)).clamp(4, 60);
    for &(lo, hi, count, b) in &z.buckets {
        let n = ((count as f64 / most as f64) * bar_w as f64).ceil() as usize;
        lines.push(Line::from(vec![
            Span::raw(format!("{:<21} {count:>11} {:>6.1} {:>11}  ", size_range(lo, hi), count as f64 * 100.0 / z.count as f64, bytes(b))),
            Span::styled("█".repeat(n.max(1)), th.fg(Color::Blue)),
        ]));
    }
    f.render_widget(Paragraph::new(lines), inner);
}

/// `sites.c:20` (the file's name), the module's name when there is no file, or nothing.
fn site_place(s: &Site) -> String {
    match (&s.file, s.line) {
        (Some(f), Some(l)) => format!("{}:{l}", crate::symbols::base_name(f)),
        (Some(f), None) => crate::symbols::base_name(f).to_string(),
        _ => String::new(),
    }
}

/// Which sites a list holds, in words: `(title, summary)` of the list at the peak or at the end.
fn sites_heading(p: &ProcessModel, app: &App, at_peak: bool) -> (&'static str, String) {
    if at_peak {
        return ("at the peak", format!("at the peak of live bytes: {} at {:.3} s", bytes(p.peak_live_bytes), p.peak_live_time_s));
    }
    let amount = format!("{} in {} blocks", bytes(p.final_live_bytes), p.final_live_blocks);
    if p.ending == "exited" {
        ("leaked at exit", format!("leaked (live at exit): {amount}"))
    } else if app.live.is_some() {
        ("live now", format!("live now: {amount}"))
    } else {
        ("at the end", format!("live at the end of the trace: {amount}"))
    }
}

/// The list of sites at the peak or at the end.
fn site_list(p: &ProcessModel, at_peak: bool) -> &[Site] {
    if at_peak { &p.sites.at_peak } else { &p.sites.at_end }
}

const NO_STACKS: &str = "no allocation stacks in this trace (recorded with --no-stacks?)";

/// Why there are no sites to show, if there are none.
fn sites_absent(p: &ProcessModel, app: &App) -> Option<&'static str> {
    match p.sites.status {
        SitesStatus::NoStacks => Some(NO_STACKS),
        SitesStatus::Pending if app.live.is_some() => Some("allocation sites: being symbolised (they refresh about once a second)"),
        SitesStatus::Pending => Some("allocation sites were not computed for this view"),
        SitesStatus::Ready => None,
    }
}

/// Inner widths from which the sites at the end and at the peak stand side by side.
const SITES_SIDE_BY_SIDE: u16 = 110;

fn sites(f: &mut Frame, area: Rect, p: &ProcessModel, app: &App, focused: bool, th: Theme) {
    let both = area.width.saturating_sub(2) >= SITES_SIDE_BY_SIDE;
    let extra = if both {
        format!(" · {} and at the peak", sites_heading(p, app, false).0)
    } else {
        format!(" · {}", sites_heading(p, app, app.sites_at_peak).0)
    };
    let block = panel_block(Panel::Sites, extra, focused, th);
    let inner = block.inner(area);
    f.render_widget(block, area);
    if let Some(why) = sites_absent(p, app) {
        f.render_widget(Paragraph::new(why).wrap(Wrap { trim: false }), inner);
        return;
    }
    let [lists, foot] = Layout::vertical([Constraint::Min(1), Constraint::Length(1)]).areas(inner);
    let other = if both { "t: select in the other list" } else if app.sites_at_peak { "t: at the end" } else { "t: at the peak" };
    let hint = if p.sites.symbols_missing.is_empty() {
        format!("↑/↓ select · Enter: its stack · {other}")
    } else {
        format!("symbols missing for {} module(s) (Enter) · {other}", p.sites.symbols_missing.len())
    };
    f.render_widget(Paragraph::new(Line::styled(hint, th.dim())), foot);
    if both {
        let [l, r] = Layout::horizontal([Constraint::Ratio(1, 2); 2]).spacing(2).areas(lists);
        sites_table(f, l, p, app, false, focused && !app.sites_at_peak, th);
        sites_table(f, r, p, app, true, focused && app.sites_at_peak, th);
    } else {
        sites_table(f, lists, p, app, app.sites_at_peak, focused, th);
    }
}

/// One list of sites (at the peak or at the end) with its summary line; `selected`: show the
/// selection.
fn sites_table(f: &mut Frame, area: Rect, p: &ProcessModel, app: &App, at_peak: bool, selected: bool, th: Theme) {
    let [head, table_area] = Layout::vertical([Constraint::Length(1), Constraint::Min(0)]).areas(area);
    f.render_widget(Paragraph::new(Line::styled(sites_heading(p, app, at_peak).1, th.heading())), head);
    let list = site_list(p, at_peak);
    if list.is_empty() {
        let none = if at_peak { "no live blocks at the peak" } else if p.ending == "exited" { "no live blocks at exit: nothing leaked" } else { "no live blocks" };
        f.render_widget(Paragraph::new(none), table_area);
        return;
    }
    let rows: Vec<Row> = list
        .iter()
        .map(|s| {
            Row::new(vec![
                Cell::from(Line::raw(bytes(s.bytes)).right_aligned()),
                Cell::from(Line::raw(s.blocks.to_string()).right_aligned()),
                Cell::from(s.function.clone()),
                Cell::from(site_place(s)),
            ])
        })
        .collect();
    let place_w = list.iter().map(|s| site_place(s).chars().count()).max().unwrap_or(0).clamp(9, 24) as u16;
    let widths = [Constraint::Length(10), Constraint::Length(7), Constraint::Min(10), Constraint::Length(place_w)];
    let header = Row::new(vec![Cell::from(Line::raw("bytes").right_aligned()), Cell::from(Line::raw("blocks").right_aligned()), Cell::from("function"), Cell::from("file:line")]).style(th.heading());
    let table = Table::new(rows, widths).header(header).column_spacing(1).row_highlight_style(Style::default().add_modifier(Modifier::REVERSED)).highlight_symbol("▶ ");
    // The selection is shown where the keys move it (the focused panel's chosen list).
    let mut state = TableState::default().with_selected(selected.then_some(app.site.min(list.len() - 1)));
    f.render_stateful_widget(table, table_area, &mut state);
}

/// The details of the sites panel: the selected site's numbers and every frame of its stack.
fn site_detail_lines(p: &ProcessModel, app: &App, th: Theme) -> Vec<Line<'static>> {
    if let Some(why) = sites_absent(p, app) {
        return vec![Line::raw(why)];
    }
    let summary = sites_heading(p, app, app.sites_at_peak).1;
    let list = site_list(p, app.sites_at_peak);
    let mut v = vec![Line::raw(summary)];
    let Some(s) = list.get(app.site.min(list.len().saturating_sub(1))) else {
        v.push(Line::raw("no sites in this list"));
        return v;
    };
    let i = app.site.min(list.len() - 1);
    v.push(Line::styled(format!("site {} of {}: {} in {} blocks · {}{}", i + 1, list.len(), bytes(s.bytes), s.blocks, s.function, match site_place(s) { x if x.is_empty() => String::new(), x => format!(" ({x})") }), th.heading()));
    v.push(Line::raw(format!("{} allocations here in all ({}) · stack {:#x}", s.allocations, bytes(s.allocated_bytes), s.stack_id)));
    v.push(Line::styled("stack, innermost frame first (inlined: a call the compiler inlined into the next frame):", th.heading()));
    for (k, fr) in s.frames.iter().enumerate() {
        let inl = if fr.inlined { " [inlined]" } else { "" };
        v.push(Line::raw(format!("#{k:<3}{}{inl}", fr.function)));
        let place = match (&fr.file, fr.line) {
            (Some(f), Some(l)) => format!("{f}:{l}"),
            (Some(f), None) => f.clone(),
            _ => String::new(),
        };
        let module = crate::symbols::base_name(&fr.module);
        let at = match (place.is_empty(), module.is_empty()) {
            (false, false) => format!("{place} · {module}"),
            (false, true) => place,
            (true, false) => module.to_string(),
            (true, true) => continue,
        };
        v.push(Line::styled(format!("     {at}"), th.dim()));
    }
    for m in &p.sites.symbols_missing {
        v.push(Line::raw(m.clone()));
    }
    v
}

/// `mtracer view` reading a large trace: a gauge of the bytes read, the rate, and how to quit.
fn indexing(f: &mut Frame, area: Rect, m: &DashboardModel, ix: &Indexing, th: Theme) {
    let [title, gauge, text, rest] = Layout::vertical([Constraint::Length(2), Constraint::Length(3), Constraint::Length(3), Constraint::Min(0)]).areas(area);
    let _ = rest;
    f.render_widget(Paragraph::new(Line::styled(format!("mtracer view · reading the trace of: {}", m.command), th.heading())), title);
    let ratio = if ix.bytes_total > 0 { (ix.bytes_done as f64 / ix.bytes_total as f64).clamp(0.0, 1.0) } else { 0.0 };
    let label = format!("{} of {} ({:.0} %)", bytes(ix.bytes_done), bytes(ix.bytes_total), ratio * 100.0);
    f.render_widget(Gauge::default().block(Block::bordered().title(" Analysing ")).gauge_style(th.fg(Color::Cyan)).ratio(ratio).label(label), gauge);
    let mb_s = ix.bytes_done as f64 / ix.elapsed_s.max(1e-3) / (1 << 20) as f64;
    let lines = vec![
        Line::raw(format!("{} events analysed · {} events/s · {mb_s:.1} MiB/s · {:.1} s", ix.events, per_s(ix.events_per_s), ix.elapsed_s)),
        Line::styled("q quit", th.dim()),
    ];
    f.render_widget(Paragraph::new(lines), text);
}

fn process_row(p: &ProcessModel, depth: usize) -> String {
    format!("{:>5} {:>10} {:>11}  {}{}", p.image, p.alloc_count, bytes(p.peak_rss_bytes), "  ".repeat(depth.min(10)), p.title())
}

fn processes(f: &mut Frame, area: Rect, m: &DashboardModel, app: &App, focused: bool, th: Theme) {
    let block = panel_block(Panel::Processes, format!(" · {} images", m.processes.len()), focused, th);
    let depths = m.depths();
    let rows: Vec<Row> = m.processes.iter().zip(&depths).map(|(p, d)| Row::new([process_row(p, *d)])).collect();
    let header = Row::new([format!("{:>5} {:>10} {:>11}  {}", "image", "allocs", "peak RSS", "process (tree)")]).style(th.heading());
    let table = Table::new(rows, [Constraint::Percentage(100)])
        .header(header)
        .block(block)
        .row_highlight_style(Style::default().add_modifier(Modifier::REVERSED))
        .highlight_symbol("▶ ");
    let mut state = TableState::default().with_selected(Some(app.process));
    f.render_stateful_widget(table, area, &mut state);
}

/// Every line of a panel's details view.
pub fn detail_lines(m: &DashboardModel, p: &ProcessModel, app: &App, panel: Panel, color: bool) -> Vec<Line<'static>> {
    let th = Theme { color };
    let mut v: Vec<Line<'static>> = Vec::new();
    match panel {
        Panel::Timeline => {
            let (t0, t1) = window(p, app);
            v.push(Line::styled(format!("{:>10} {:>12} {:>12} {:>12} {:>12} {:>12}", "t (s)", "live", "heap", "mmapped", "RSS", "free cached"), th.heading()));
            for q in in_window(p, t0, t1) {
                let c = &q.categories;
                v.push(Line::raw(format!(
                    "{:>10.3} {:>12} {:>12} {:>12} {:>12} {:>12}",
                    q.t_s,
                    bytes(q.live_bytes),
                    bytes(q.heap_bytes),
                    bytes(q.mmapped_bytes),
                    bytes(q.rss_bytes),
                    bytes(c.tcache + c.fastbins + c.bins)
                )));
            }
            if v.len() == 1 {
                v.push(Line::raw("no samples in this window"));
            }
        }
        Panel::Retention => match &p.retention {
            Some(r) => {
                for (label, s) in [("at the end", Some(&r.at_end)), ("at peak RSS", r.at_peak.as_ref())] {
                    let Some(s) = s else { continue };
                    v.push(Line::styled(snapshot_summary(label, s), th.heading()));
                    for (k, b, pct) in &s.categories {
                        v.push(Line::raw(format!("  {k:<17}{:>12} {pct:>6.1} %", bytes(*b))));
                    }
                }
                v.push(Line::raw(""));
                v.extend(cause_lines(r, true, th));
            }
            None => v.extend(no_model()),
        },
        Panel::Arenas => match &p.retention {
            Some(r) => {
                for (label, s) in [("at the end", Some(&r.at_end)), ("at peak RSS", r.at_peak.as_ref())] {
                    let Some(s) = s else { continue };
                    v.push(Line::styled(snapshot_summary(label, s), th.heading()));
                    v.push(Line::raw(format!(
                        "  {:<16} {:>5} {:>11} {:>11} {:>11} {:>11} {:>13} {:>11} {:>7}",
                        "arena", "heaps", "held", "live", "free", "top", "top>trim thr", "resident", "threads"
                    )));
                    for a in &s.arenas {
                        v.push(Line::raw(format!(
                            "  {:<16} {:>5} {:>11} {:>11} {:>11} {:>11} {:>13} {:>11} {:>7}",
                            a.id,
                            a.heaps,
                            bytes(a.held_bytes),
                            bytes(a.live_bytes),
                            bytes(a.free_bytes),
                            bytes(a.top_bytes),
                            bytes(a.top_above_trim_threshold_bytes),
                            bytes(a.resident_estimate_bytes),
                            a.threads
                        )));
                    }
                    v.push(Line::raw(""));
                }
                v.extend(mallinfo_lines(r, th));
            }
            None => v.extend(no_model()),
        },
        Panel::Thresholds => match &p.retention {
            Some(r) => v.extend(threshold_lines(r, th)),
            None => v.extend(no_model()),
        },
        Panel::Counters => {
            v.push(Line::raw(format!("args: {}", p.args.join(" "))));
            v.push(Line::raw(format!("calls: {}", p.calls.iter().map(|(k, n)| format!("{k} {n}")).collect::<Vec<_>>().join(", "))));
            v.extend(counter_lines(p));
        }
        Panel::Sizes => {
            let z = &p.sizes;
            v.push(Line::styled(format!("{} allocations · median {} · p99 {} · max {}", z.count, bytes(z.p50), bytes(z.p99), bytes(z.max)), th.heading()));
            for &(lo, hi, count, b) in &z.buckets {
                v.push(Line::raw(format!("{:<21} {count:>11} {:>11}", size_range(lo, hi), bytes(b))));
            }
        }
        Panel::Sites => v.extend(site_detail_lines(p, app, th)),
        Panel::Processes => {
            v.push(Line::styled(format!("{:>5} {:>10} {:>11}  {}", "image", "allocs", "peak RSS", "process (tree)"), th.heading()));
            for (q, d) in m.processes.iter().zip(m.depths()) {
                v.push(Line::raw(process_row(q, d)));
                v.push(Line::raw(format!("{:30}{}args: {}", "", "  ".repeat(d.min(10)), q.args.join(" "))));
            }
        }
    }
    if app.focused() != Panel::Processes {
        for w in &m.warnings {
            v.push(Line::raw(format!("warning: {w}")));
        }
    }
    v
}

fn details(f: &mut Frame, area: Rect, m: &DashboardModel, p: &ProcessModel, app: &App, th: Theme) {
    let panel = app.focused();
    let lines = detail_lines(m, p, app, panel, th.color);
    let block = panel_block(panel, " · details".to_string(), true, th);
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }).scroll((app.scroll, 0)).block(block), area);
}

fn help(f: &mut Frame, area: Rect, th: Theme) {
    let text = [
        "q, Esc        quit (Esc first closes help and details)",
        "?             this help (any key closes it)",
        "Tab, S-Tab    next / previous panel",
        "←, →          timeline: move the time cursor; elsewhere: next / previous panel",
        "Home, End     timeline: cursor to the start / the end",
        "g, G          timeline: cursor to the peak of live bytes / of RSS",
        "x             timeline: remove the cursor (panels show the end again)",
        "h, l          scroll the time window",
        "s             stack the retention categories under the lines (or not)",
        "+, -, 0       zoom the time window in / out / reset",
        "[, ], ↑, ↓    previous / next process image (sites panel: ↑/↓ select a site)",
        "t             sites: live at the end (leaked) / at the peak of live bytes",
        "Enter         details of the focused panel (sites: the selected site's",
        "              stack; ↑/↓, PgUp/PgDn scroll)",
        "p             pause the refreshing (mtracer run)",
    ];
    let w = (text.iter().map(|s| s.chars().count()).max().unwrap_or(0) as u16 + 4).min(area.width);
    let h = (text.len() as u16 + 2).min(area.height);
    let r = Rect { x: area.x + (area.width - w) / 2, y: area.y + (area.height - h) / 2, width: w, height: h };
    f.render_widget(Clear, r);
    let lines: Vec<Line> = text.iter().map(|s| Line::raw(*s)).collect();
    f.render_widget(Paragraph::new(lines).block(Block::bordered().title(" Keys ").border_style(th.focus())), r);
}

/// A rendered buffer as plain text lines, trailing blanks trimmed.
pub fn buffer_lines(b: &Buffer) -> Vec<String> {
    let w = b.area.width as usize;
    b.content
        .chunks(w.max(1))
        .map(|row| {
            let s: String = row.iter().map(|c| c.symbol()).collect();
            s.trim_end().to_string()
        })
        .collect()
}

/// Draw one frame at `width`×`height` off-screen and return it as plain text lines.
pub fn render_text(m: &DashboardModel, app: &App, width: u16, height: u16) -> Vec<String> {
    let mut term = ratatui::Terminal::new(ratatui::backend::TestBackend::new(width, height)).expect("the test backend cannot fail");
    term.draw(|f| draw(f, m, app)).expect("the test backend cannot fail");
    buffer_lines(term.backend().buffer())
}

#[cfg(test)]
pub(super) fn thin_for_test(pts: &[Point], t0: f64, t1: f64, buckets: usize) -> Vec<(f64, f64)> {
    thin(pts, t0, t1, buckets, |q| q.rss_bytes)
}
