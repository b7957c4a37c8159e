//! Rendering tests: every panel drawn at 80×24 off-screen from a model built by hand, checked for
//! the strings a user must see.

use super::app::{App, Panel};
use super::model::*;
use super::ui::render_text;
use crate::analysis::glibc::breakdown::Categories;
use crate::analysis::image::{call_index, CALL_KINDS};
use mtrace_protocol::event::EventKind;
use ratatui::crossterm::event::{KeyCode, KeyEvent};

const MIB: u64 = 1 << 20;

fn cats(end: bool) -> Vec<(String, u64, f64)> {
    let v: [(&str, u64, f64); 4] = if end {
        [("live", 0, 0.0), ("tcache", 784, 19.1), ("fastbins", 0, 0.0), ("top", 2140, 52.3)]
    } else {
        [("live", 0, 0.0), ("tcache", 784, 0.0), ("fastbins", 168_000_000, 99.9), ("top", 12_656, 0.0)]
    };
    v.iter().map(|(k, b, p)| (k.to_string(), *b, *p)).collect()
}

/// Running call counts: `n` mallocs and `n` frees.
fn calls(n: u64) -> [u64; CALL_KINDS] {
    let mut c = [0; CALL_KINDS];
    c[call_index(EventKind::Malloc).unwrap()] = n;
    c[call_index(EventKind::Free).unwrap()] = n;
    c
}

fn model(images: usize) -> DashboardModel {
    let timeline: Vec<Point> = (0..=100)
        .map(|i| {
            let t = i as f64 / 100.0;
            let live = if i < 50 { i as u64 * 2 * MIB } else { 0 };
            Point {
                t_s: t,
                live_bytes: live,
                heap_bytes: if i < 80 { 160 * MIB } else { 4096 },
                mmapped_bytes: 0,
                rss_bytes: if i < 80 { 170 * MIB } else { 13 * MIB },
                categories: Categories { live, fastbins: if (50..80).contains(&i) { 160 * MIB } else { 0 }, ..Categories::default() },
                // 15 000 mallocs and frees every 10 ms: 1.5 M calls/s of each.
                calls: calls(i as u64 * 15_000),
            }
        })
        .collect();
    let fast = Cause {
        kind: "fastbins".into(),
        bytes: 168_000_000,
        text: "160.2 MiB of freed 112-byte chunks (1499993 chunks, requests of 89–104 B) sit in fastbins of the main arena".into(),
    };
    let retention = RetentionModel {
        at_end: Snapshot {
            t_s: 1.131,
            rss_bytes: 0,
            os_held_bytes: 4096,
            live_bytes: 0,
            categories: cats(true),
            arenas: vec![
                Arena { id: "main".into(), heaps: 1, held_bytes: 4096, live_bytes: 0, free_bytes: 2928, top_bytes: 2140, threads: 1, ..Arena::default() },
                Arena { id: "0x7f12a4000030".into(), heaps: 3, held_bytes: 3 * MIB, live_bytes: MIB, free_bytes: 2 * MIB, top_bytes: 100 << 10, threads: 4, ..Arena::default() },
            ],
            causes: vec![Cause { kind: "returned".into(), bytes: 160 * MIB, text: "160.2 MiB of the 160.2 MiB held at the peak went back to the OS".into() }],
        },
        at_peak: Some(Snapshot { t_s: 0.811, rss_bytes: 173 * MIB, os_held_bytes: 168 * MIB, live_bytes: 0, categories: cats(false), arenas: vec![], causes: vec![fast.clone()] }),
        thresholds: ThresholdsModel {
            mmap_threshold: 160 << 10,
            trim_threshold: 320 << 10,
            top_pad: 128 << 10,
            dynamic: true,
            fixed_by: None,
            arena_limit: 16,
            arena_limit_source: "8 × 2 cores".into(),
            changes: vec![ThresholdChange { time_ns: 21_000_000, t_s: 0.021, old: 128 << 10, new: 160 << 10, cause: "free() of a 160.0 KiB mmapped block".into(), dynamic: true, heap_allocations_between: 2, heap_bytes_between: 290_000 }],
        },
        remedies: vec![Remedy { action: "malloc_trim(0)".into(), bytes_returned: 1 << 20, text: "calling malloc_trim(0) would return about 1.0 MiB".into() }],
        trims: vec![Trim { t_s: 0.830, pad: 0, predicted_release_bytes: 168_000_000, rss_before: 173 * MIB, rss_after: 13 * MIB, causes_before: vec![fast] }],
        mallinfo2_at: Some((1.131, "exit".into(), true)),
        mallinfo2: vec![("arena".into(), 4096, 4096), ("fsmblks".into(), 0, 0), ("uordblks".into(), 1952, 1952)],
        checkpoints_exact: 5,
        checkpoints_agreeing: 5,
        model_conflicts: 0,
        uncertain: vec![],
    };
    let p = ProcessModel {
        image: 0,
        pid: 4242,
        ppid: 1,
        parent_image: None,
        relation: "root".into(),
        exe: "/tmp/ret_fastbins".into(),
        args: vec!["/tmp/ret_fastbins".into()],
        duration_s: 1.0,
        ending: "exited".into(),
        threads: 1,
        calls: vec![("free".into(), 1_500_000), ("malloc".into(), 1_500_000), ("malloc_trim".into(), 1)],
        alloc_count: 1_500_000,
        free_count: 1_500_000,
        bytes_allocated_total: 150_000_000,
        peak_live_bytes: 150_000_000,
        peak_live_time_s: 0.136,
        peak_rss_bytes: 179 * MIB,
        final_rss_bytes: 19 * MIB,
        lost_events: 17,
        unmatched_frees: 3,
        timeline,
        retention: Some(retention),
        sizes: SizesModel { count: 1_500_010, p50: 96, p99: 104, max: 160 << 10, buckets: vec![(64, 127, 1_500_000, 150_000_000), (131_072, 262_143, 10, 1_638_400)] },
        ..ProcessModel::default()
    };
    let mut processes = vec![p];
    for i in 1..images {
        processes.push(ProcessModel {
            image: i as u32,
            pid: 5000 + i as u32,
            parent_image: Some(i as u32 - 1),
            relation: "fork".into(),
            exe: format!("/usr/bin/child{i}"),
            alloc_count: 10,
            ..ProcessModel::default()
        });
    }
    DashboardModel { command: "/tmp/ret_fastbins".into(), warnings: vec![], processes, indexing: None }
}

/// Render `panel` alone at 80×24 and return the screen as one string.
fn screen(m: &DashboardModel, panel: Panel, setup: impl FnOnce(&mut App)) -> String {
    let mut app = App::new(m.processes.len(), 0);
    app.color = false;
    app.single = true;
    assert!(app.focus_panel(panel));
    setup(&mut app);
    let lines = render_text(m, &app, 80, 24);
    assert_eq!(lines.len(), 24);
    assert!(lines.iter().all(|l| l.chars().count() <= 80), "{lines:#?}");
    lines.join("\n")
}

fn has(s: &str, needle: &str) {
    assert!(s.contains(needle), "{needle:?} not on the screen:\n{s}");
}

#[test]
fn timeline_shows_axes_series_and_window() {
    let m = model(1);
    let s = screen(&m, Panel::Timeline, |_| {});
    for n in ["Timeline · 0.000–1.000 s · zoom 1×", "RSS", "held from the OS (heap + mmapped)", "live", "0.000 s", "0.500 s", "1.000 s", "0 B", "at 1.000 s: live 0 B"] {
        has(&s, n);
    }
    // The y axis ends 5 % above the largest value (170 MiB RSS).
    has(&s, "178.50 MiB");
    // Zoomed in on the middle and scrolled right by a quarter window.
    let s = screen(&m, Panel::Timeline, |a| {
        a.on_key(ratatui::crossterm::event::KeyEvent::from(ratatui::crossterm::event::KeyCode::Char('+')));
        a.on_key(ratatui::crossterm::event::KeyEvent::from(ratatui::crossterm::event::KeyCode::Char('l')));
    });
    has(&s, "0.375–0.875 s · zoom 2×");
    has(&s, "0.625 s");
    has(&s, "at 0.870 s");
}

#[test]
fn retention_shows_categories_causes_and_the_trim() {
    let s = screen(&model(1), Panel::Retention, |_| {});
    has(&s, "at the end (1.131 s): 4.00 KiB held, 0 B live");
    has(&s, "at peak RSS (0.811 s, RSS 173.00 MiB): 168.00 MiB held");
    has(&s, "fastbins");
    has(&s, "160.22 MiB");
    has(&s, "99.9");
    has(&s, "784 B");
    has(&s, "19.1");
    // A zero category at both times is left out; wrapped cause text.
    assert!(!s.contains("┃live "), "{s}");
    has(&s, "went back to the OS");
    has(&s, "malloc_trim(0) at 0.830 s: predicted to return 160.22 MiB");
    has(&s, "112-byte chunks");
}

#[test]
fn arenas_table_and_mallinfo2() {
    let s = screen(&model(1), Panel::Arenas, |_| {});
    for n in ["arena", "heaps", "held", "threads", "main", "0x7f12a4000030", "3.00 MiB", "2.86 KiB", "2.09 KiB", "100.00 KiB", "mallinfo2 at 1.131 s (exit): model and glibc agree", "5 of 5"] {
        has(&s, n);
    }
}

#[test]
fn thresholds_values_and_changes() {
    let s = screen(&model(1), Panel::Thresholds, |_| {});
    for n in ["mmap threshold  160.00 KiB", "trim threshold  320.00 KiB", "top pad         128.00 KiB", "dynamic", "arena limit     16 (8 × 2 cores)", "0.021 s: mmap threshold 128.00 KiB → 160.00 KiB", "dynamic rule: free() of a", "2 later allocation(s)"] {
        has(&s, n);
    }
}

#[test]
fn counters_calls_and_losses() {
    let s = screen(&model(1), Panel::Counters, |_| {});
    for n in ["malloc_trim", "1500000", "allocations     1500000", "lost events     17", "unmatched frees 3", "peak RSS        179.00 MiB", "peak live       143.05 MiB at 0.136 s"] {
        has(&s, n);
    }
}

#[test]
fn processes_tree_only_with_several_images() {
    let one = model(1);
    assert!(!App::new(1, 0).focus_panel(Panel::Processes));
    let m = model(3);
    let s = screen(&m, Panel::Processes, |a| a.process = 2);
    has(&s, "Processes · 3 images");
    has(&s, "pid 4242 /tmp/ret_fastbins");
    // Each fork one level deeper; the selected image is marked.
    has(&s, "  pid 5001 /usr/bin/child1 (fork of image 0)");
    has(&s, "    pid 5002 /usr/bin/child2 (fork of image 1)");
    has(&s, "▶");
    // Numbered as `report` and `--image` number it (from 0), its place after it.
    has(&s, "image 2 (3 of 3)");
    drop(one);
}

#[test]
fn layouts_at_80x24_and_larger() {
    let m = model(2);
    let mut app = App::new(2, 0);
    app.color = false;
    // 80×24: one panel at a time; Tab shows the next.
    let s = render_text(&m, &app, 80, 24).join("\n");
    has(&s, "▶ Timeline");
    assert!(!s.contains("Retention"), "{s}");
    has(&s, "q quit");
    app.on_key(ratatui::crossterm::event::KeyEvent::from(ratatui::crossterm::event::KeyCode::Tab));
    let s = render_text(&m, &app, 80, 24).join("\n");
    has(&s, "▶ Retention");
    // 100×40: two rows; 160×50: two by two.
    let s = render_text(&m, &app, 100, 40).join("\n");
    has(&s, " Timeline ");
    has(&s, "▶ Retention");
    let s = render_text(&m, &app, 160, 50).join("\n");
    for n in [" Timeline ", "▶ Retention", " Counters ", " Allocation sizes "] {
        has(&s, n);
    }
    // Tiny terminals do not panic.
    for (w, h) in [(20, 5), (30, 8), (1, 1)] {
        render_text(&m, &app, w, h);
    }
}

#[test]
fn help_and_details_overlays() {
    let m = model(1);
    let s = screen(&m, Panel::Retention, |a| a.help = true);
    has(&s, "Keys");
    has(&s, "zoom the time window");
    // Details of the retention panel: every category, the full causes.
    let s = screen(&m, Panel::Retention, |a| a.details = true);
    has(&s, "Retention · details");
    has(&s, "fastbins");
    has(&s, "before it · 160.2 MiB of freed 112-byte chunks");
    let s = screen(&m, Panel::Arenas, |a| a.details = true);
    has(&s, "top>trim thr");
    let s = screen(&m, Panel::Timeline, |a| a.details = true);
    has(&s, "t (s)");
    has(&s, "170.00 MiB");
}

#[test]
fn no_glibc_model_and_no_samples() {
    let mut m = model(1);
    m.processes[0].retention = None;
    m.processes[0].timeline.clear();
    m.warnings.push("the trace is damaged".into());
    has(&screen(&m, Panel::Retention, |_| {}), "allocator is not glibc's");
    has(&screen(&m, Panel::Arenas, |_| {}), "allocator is not glibc's");
    let s = screen(&m, Panel::Timeline, |_| {});
    has(&s, "no samples");
    has(&s, "warning: the trace is damaged");
    let empty = DashboardModel::default();
    let app = App::new(0, 0);
    has(&render_text(&empty, &app, 80, 24).join("\n"), "no process image");
}

#[test]
fn long_timelines_are_thinned_to_the_chart_keeping_peaks() {
    let m = model(1);
    let mut p = m.processes[0].clone();
    // 100 000 samples over 100 s, one spike of RSS at 50 s.
    p.timeline = (0..100_000u64).map(|i| Point { t_s: i as f64 / 1000.0, rss_bytes: if i == 50_000 { 999 * MIB } else { MIB }, ..Point::default() }).collect();
    p.duration_s = 100.0;
    let thinned = super::ui::thin_for_test(&p.timeline, 0.0, 100.0, 160);
    assert!(thinned.len() <= 161, "{}", thinned.len());
    assert_eq!(thinned.iter().map(|x| x.1 as u64).max(), Some(999 * MIB), "the spike survives");
    let m = DashboardModel { processes: vec![p], ..m };
    let s = screen(&m, Panel::Timeline, |_| {});
    has(&s, "1.02 GiB");
}

fn key(a: &mut App, c: KeyCode) {
    a.on_key(KeyEvent::from(c));
}

#[test]
fn timeline_stacks_the_categories_with_a_legend_and_a_toggle() {
    let m = model(1);
    let s = screen(&m, Panel::Timeline, |_| {});
    // Without colour the bands differ by their fill.
    has(&s, "held, stacked (s hides): █ live  ▄ overhead  • free in bins/tcache  ⣿ top");
    // The fastbins band (160 MiB between 0.5 and 0.8 s) fills cells under the lines.
    assert!(s.lines().filter(|l| l.contains("••••")).count() >= 5, "{s}");
    let s = screen(&m, Panel::Timeline, |a| key(a, KeyCode::Char('s')));
    assert!(!s.contains("stacked"), "{s}");
    // Only the held line's plateau is left of the dots.
    assert_eq!(s.lines().filter(|l| l.contains("••••")).count(), 1, "{s}");
    // No category series (another allocator): no bands, no band legend.
    let mut other = model(1);
    other.processes[0].retention = None;
    assert!(!screen(&other, Panel::Timeline, |_| {}).contains("stacked"));
}

#[test]
fn timeline_cursor_shows_the_values_there() {
    let m = model(1);
    let s = screen(&m, Panel::Timeline, |a| {
        a.observe(&m);
        // The first → puts the cursor mid-window, four more move it by 1/40 each: 0.6 s.
        for _ in 0..5 {
            key(a, KeyCode::Right);
        }
    });
    has(&s, "cursor 0.600 s: live 0 B · held 160.00 MiB · RSS 170.00 MiB");
    has(&s, "free in bins/tcache 160.00 MiB · calls/s 3.00M (malloc 1.50M, free 1.50M)");
    let s = screen(&m, Panel::Timeline, |a| {
        a.observe(&m);
        key(a, KeyCode::Char('g'));
    });
    // The peak of live bytes is at 0.136 s: the sample in force there is 0.130 s's.
    has(&s, "cursor 0.136 s: live 26.00 MiB");
    // Without a cursor: the last sample and the rate of the last second.
    let s = screen(&m, Panel::Timeline, |_| {});
    has(&s, "at 1.000 s: live 0 B");
    has(&s, "calls/s 3.00M (malloc 1.50M, free 1.50M) · ←/→ cursor, g peak");
}

#[test]
fn retention_at_the_cursor() {
    let m = model(1);
    let s = screen(&m, Panel::Retention, |a| {
        a.observe(&m);
        a.cursor = Some(0.6);
    });
    has(&s, "Retention · at the end and at the cursor (0.600 s)");
    has(&s, "at the cursor (0.600 s): 160.00 MiB held, 0 B live, RSS 170.00 MiB");
    has(&s, "at cursor");
    // fastbins: 784 B... at the end (from the report), 160 MiB = 100 % at the cursor.
    assert!(s.lines().any(|l| l.contains("fastbins") && l.contains("160.00 MiB") && l.contains("100.0")), "{s}");
    assert!(!s.contains("at peak RSS (0.811 s, RSS"), "the peak's summary gives way to the cursor's:\n{s}");
}

#[test]
fn counters_rates_backlog_and_what_they_cover() {
    let m = model(1);
    let s = screen(&m, Panel::Counters, |_| {});
    has(&s, "Counters · calls/s in the last second");
    assert!(s.lines().any(|l| l.contains("malloc") && l.contains("1500000") && l.contains("1.50M")), "{s}");
    assert!(s.lines().any(|l| l.contains("malloc_trim") && l.contains(" 0 ")), "{s}");
    has(&s, "events          3000001");
    has(&s, "calls/s         3.00M");
    // `view`: the trace does not record the backlog.
    has(&s, "backlog         n/a");
    assert!(!s.contains("analysis behind"), "{s}");
    // `run`: the recorder's backlog and how far behind the analysis is.
    let s = screen(&m, Panel::Counters, |a| {
        a.live = Some("running".into());
        a.stream = Some(StreamStatus { behind_s: 3.0, backlog_bytes: Some(64 << 10), writers_waiting: Some(2) });
        a.cursor = Some(0.5);
    });
    has(&s, "Counters · calls/s in the second before the cursor (0.500 s)");
    has(&s, "backlog         64.00 KiB, 2 threads wait");
    has(&s, "analysis behind 3.0 s");
    has(&s, "mtracer run · running");
    has(&s, "analysis behind by 3 s");
}

#[test]
fn sizes_histogram_panel() {
    let m = model(1);
    let s = screen(&m, Panel::Sizes, |_| {});
    has(&s, "Allocation sizes · the whole run");
    has(&s, "1500010 allocations · median 96 B · p99 104 B · max 160.00 KiB");
    has(&s, "64 B–127 B");
    assert!(s.lines().any(|l| l.contains("64 B–127 B") && l.contains("1500000") && l.contains("100.0") && l.contains("143.05 MiB") && l.contains("████")), "{s}");
    // The small bucket still gets a bar of one cell.
    assert!(s.lines().any(|l| l.contains("128.00 KiB–256.00 KiB") && l.contains(" 10 ") && l.contains("1.56 MiB  █ ")), "{s}");
    let d = screen(&m, Panel::Sizes, |a| a.details = true);
    has(&d, "Allocation sizes · details");
    has(&d, "64 B–127 B");
    let mut empty = model(1);
    empty.processes[0].sizes = SizesModel::default();
    has(&screen(&empty, Panel::Sizes, |_| {}), "no allocations");
}

#[test]
fn indexing_shows_a_gauge_and_the_rate() {
    let m = DashboardModel {
        command: "/tmp/big.mtr".into(),
        indexing: Some(Indexing { bytes_done: 512 * MIB, bytes_total: 1024 * MIB, events: 1_000_000, events_per_s: 2.5e6, elapsed_s: 4.0 }),
        ..DashboardModel::default()
    };
    let s = render_text(&m, &App::new(0, 0), 80, 24).join("\n");
    has(&s, "reading the trace of: /tmp/big.mtr");
    has(&s, "Analysing");
    has(&s, "512.00 MiB of 1.00 GiB (50 %)");
    has(&s, "1000000 events analysed · 2.50M events/s · 128.0 MiB/s · 4.0 s");
    has(&s, "q quit");
}

#[test]
fn call_rates_from_the_running_counts() {
    let p = &model(1).processes[0];
    let (total, v) = p.call_rates(1.0, 1.0).unwrap();
    assert_eq!((total.round(), v.len()), (3_000_000.0, 2));
    assert_eq!(v[0], ("malloc", 1_500_000.0));
    // Over the first 0.1 s only.
    let (total, _) = p.call_rates(0.1, 1.0).unwrap();
    assert_eq!(total.round(), 3_000_000.0);
    // One sample: no rate.
    assert!(p.call_rates(0.0, 1.0).is_none());
    assert_eq!(p.point_at(0.555).map(|q| q.t_s), Some(0.55));
    assert_eq!(p.point_at(-1.0).map(|q| q.t_s), Some(0.0));
}

fn frame(function: &str, file: Option<&str>, line: Option<u32>, module: &str, inlined: bool) -> SiteFrame {
    SiteFrame { function: function.into(), file: file.map(Into::into), line, module: module.into(), inlined }
}

/// Sites as the report gives them for the `sites` fixture: the table's rows at the peak (from an
/// inlined helper), the leaked names at exit.
fn with_sites(mut m: DashboardModel) -> DashboardModel {
    let rows = Site {
        function: "fill_row".into(),
        file: Some("/src/tests/fixtures/sites.c".into()),
        line: Some(20),
        bytes: 1_000_000,
        blocks: 100,
        allocations: 100,
        allocated_bytes: 1_000_000,
        stack_id: 0xabc,
        frames: vec![
            frame("malloc", None, None, "/usr/lib/libmtrace.so", false),
            frame("fill_row", Some("/src/tests/fixtures/sites.c"), Some(20), "/tmp/sites", true),
            frame("build_table", Some("/src/tests/fixtures/sites.c"), Some(28), "/tmp/sites", false),
            frame("main", Some("/src/tests/fixtures/sites.c"), Some(64), "/tmp/sites", false),
            frame("libc.so.6+0x271ca", None, None, "/lib/x86_64-linux-gnu/libc.so.6", false),
        ],
    };
    let table = Site { function: "build_table".into(), file: Some("/src/tests/fixtures/sites.c".into()), line: Some(26), bytes: 800, blocks: 1, allocations: 1, allocated_bytes: 800, stack_id: 0xdef, frames: vec![] };
    let names = Site { function: "leak_name".into(), file: Some("/src/tests/fixtures/sites.c".into()), line: Some(39), bytes: 400, blocks: 10, allocations: 10, allocated_bytes: 400, stack_id: 0x123, frames: vec![frame("leak_name", Some("/src/tests/fixtures/sites.c"), Some(39), "/tmp/sites", false)] };
    let plugin = Site { function: "plugin_alloc".into(), file: Some("/src/tests/fixtures/sites_plugin.c".into()), line: Some(6), bytes: 5000, blocks: 1, allocations: 1, allocated_bytes: 5000, stack_id: 0x456, frames: vec![] };
    let unknown = Site { function: "libfoo.so+0x1234".into(), bytes: 16, blocks: 1, allocations: 3, allocated_bytes: 48, stack_id: 0x789, ..Site::default() };
    let p = &mut m.processes[0];
    p.final_live_bytes = 5416;
    p.final_live_blocks = 12;
    p.peak_live_bytes = 1_000_800;
    p.peak_live_time_s = 0.012;
    p.sites = SitesModel { status: SitesStatus::Ready, at_end: vec![plugin, names, unknown], at_peak: vec![rows, table], allocations_with_stack: 1122, symbols_missing: vec![] };
    m
}

/// The lines of a screen between its first and last line (the panel's inside, borders cut).
fn inside(s: &str) -> Vec<String> {
    s.lines().map(|l| l.trim_start_matches(['┃', '│']).trim_end().trim_end_matches(['┃', '│']).trim_end().to_string()).collect()
}

#[test]
fn sites_panel_lists_the_top_sites_at_exit_and_at_the_peak() {
    let m = with_sites(model(1));
    let s = screen(&m, Panel::Sites, |a| a.observe(&m));
    let lines = inside(&s);
    assert_eq!(lines[1], "┏ ▶ Sites · leaked at exit ━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━━┓".trim_start_matches('┃'), "{s}");
    assert_eq!(lines[2], "leaked (live at exit): 5.29 KiB in 12 blocks", "{s}");
    assert_eq!(lines[3], "       bytes  blocks function                                 file:line", "{s}");
    assert_eq!(lines[4], "▶   4.88 KiB       1 plugin_alloc                             sites_plugin.c:6", "{s}");
    assert_eq!(lines[5], "       400 B      10 leak_name                                sites.c:39", "{s}");
    assert_eq!(lines[6], "        16 B       1 libfoo.so+0x1234", "{s}");
    assert_eq!(lines[21], "↑/↓ select · Enter: its stack · t: at the peak", "{s}");
    assert_eq!(lines[23], "q quit · ? help · Tab panel · ↑/↓ site · Enter stack · t end/peak · [/] image", "{s}");
    // `t`: the sites live at the peak; ↓ selects the next one.
    let s = screen(&m, Panel::Sites, |a| {
        a.observe(&m);
        key(a, KeyCode::Char('t'));
        key(a, KeyCode::Down);
        key(a, KeyCode::Down);
    });
    let lines = inside(&s);
    assert!(lines[1].starts_with("┏ ▶ Sites · at the peak ━"), "{s}");
    assert_eq!(lines[2], "at the peak of live bytes: 977.34 KiB at 0.012 s", "{s}");
    assert_eq!(lines[3], "       bytes  blocks function                                       file:line", "{s}");
    assert_eq!(lines[4], "  976.56 KiB     100 fill_row                                       sites.c:20", "{s}");
    assert_eq!(lines[5], "▶      800 B       1 build_table                                    sites.c:26", "{s}");
    assert_eq!(lines[21], "↑/↓ select · Enter: its stack · t: at the end", "{s}");
}

#[test]
fn sites_side_by_side_when_wide_and_in_the_tab_order() {
    let m = with_sites(model(1));
    let mut app = App::new(1, 0);
    app.color = false;
    app.observe(&m);
    // The fifth panel in the Tab order: at 160×50 (four per page) the second page's first.
    for _ in 0..4 {
        key(&mut app, KeyCode::Tab);
    }
    assert_eq!(app.focused(), Panel::Sites);
    let s = render_text(&m, &app, 160, 50).join("\n");
    for n in ["▶ Sites · leaked at exit", " Arenas ", " Thresholds ", "leaked (live at exit): 5.29 KiB in 12 blocks", "▶   4.88 KiB       1 plugin_alloc"] {
        has(&s, n);
    }
    assert!(!s.contains(" Timeline "), "{s}");
    // Alone at 120 columns: the sites at exit and at the peak side by side.
    app.single = true;
    let s = render_text(&m, &app, 120, 40).join("\n");
    for n in ["▶ Sites · leaked at exit and at the peak", "leaked (live at exit): 5.29 KiB in 12 blocks", "at the peak of live bytes: 977.34 KiB at 0.012 s"] {
        has(&s, n);
    }
    // Both lists on one row: the leaked plugin block and the table's rows at the peak.
    assert!(s.lines().any(|l| l.contains("▶   4.88 KiB       1 plugin_alloc") && l.contains("976.56 KiB     100 fill_row") && l.contains("sites.c:20")), "{s}");
    has(&s, "t: select in the other list");
}

#[test]
fn sites_details_show_the_selected_sites_frames_with_inlined_ones_marked() {
    let m = with_sites(model(1));
    let s = screen(&m, Panel::Sites, |a| {
        a.observe(&m);
        key(a, KeyCode::Char('t'));
        key(a, KeyCode::Enter);
    });
    let lines = inside(&s);
    assert!(lines[1].starts_with("┏ ▶ Sites · details ━"), "{s}");
    let want = [
        "at the peak of live bytes: 977.34 KiB at 0.012 s",
        "site 1 of 2: 976.56 KiB in 100 blocks · fill_row (sites.c:20)",
        "100 allocations here in all (976.56 KiB) · stack 0xabc",
        "stack, innermost frame first (inlined: a call the compiler inlined into the",
        "next frame):",
        "#0  malloc",
        "     libmtrace.so",
        "#1  fill_row [inlined]",
        "     /src/tests/fixtures/sites.c:20 · sites",
        "#2  build_table",
        "     /src/tests/fixtures/sites.c:28 · sites",
        "#3  main",
        "     /src/tests/fixtures/sites.c:64 · sites",
        "#4  libc.so.6+0x271ca",
        "     libc.so.6",
    ];
    assert_eq!(&lines[2..2 + want.len()], &want[..], "{s}");
}

#[test]
fn sites_without_stacks_pending_and_empty() {
    let mut m = with_sites(model(1));
    m.processes[0].sites = SitesModel { status: SitesStatus::NoStacks, ..SitesModel::default() };
    let s = screen(&m, Panel::Sites, |a| a.observe(&m));
    assert_eq!(inside(&s)[2], "no allocation stacks in this trace (recorded with --no-stacks?)", "{s}");
    let d = screen(&m, Panel::Sites, |a| a.details = true);
    assert_eq!(inside(&d)[2], "no allocation stacks in this trace (recorded with --no-stacks?)", "{d}");
    // Live, before the first symbolisation.
    m.processes[0].sites = SitesModel::default();
    m.processes[0].ending = "unknown (the trace ends first)".into();
    let s = screen(&m, Panel::Sites, |a| a.live = Some("running".into()));
    assert!(inside(&s)[1].starts_with("┏ ▶ Sites · live now ━"), "{s}");
    assert_eq!(inside(&s)[2], "allocation sites: being symbolised (they refresh about once a second)", "{s}");
    // Nothing leaked.
    m.processes[0].sites = SitesModel { status: SitesStatus::Ready, ..SitesModel::default() };
    m.processes[0].ending = "exited".into();
    let s = screen(&m, Panel::Sites, |_| {});
    assert_eq!(inside(&s)[3], "no live blocks at exit: nothing leaked", "{s}");
    // Tiny terminals do not panic.
    let m = with_sites(model(1));
    let mut app = App::new(1, 0);
    app.focus_panel(Panel::Sites);
    for (w, h) in [(20, 5), (30, 8), (1, 1), (200, 3)] {
        render_text(&m, &app, w, h);
        app.details = true;
        render_text(&m, &app, w, h);
        app.details = false;
    }
}

#[test]
fn help_lists_the_sites_keys() {
    let s = screen(&model(1), Panel::Sites, |a| a.help = true);
    let lines = inside(&s);
    assert_eq!(lines[14], "[, ], ↑, ↓    previous / next process image (sites panel: ↑/↓ select a site)", "{s}");
    assert_eq!(lines[15], "t             sites: live at the end (leaked) / at the peak of live bytes", "{s}");
    assert_eq!(lines[16], "Enter         details of the focused panel (sites: the selected site's", "{s}");
}

/// The image shown first is the one that allocated the most bytes — the one `export` picks —
/// not the one that made the most calls (a shell's many small allocations).
#[test]
fn the_first_image_is_the_one_that_allocated_the_most_bytes() {
    let mut m = model(3);
    m.processes[0].alloc_count = 1_000_000;
    m.processes[0].bytes_allocated_total = 10 << 20;
    m.processes[1].alloc_count = 10;
    m.processes[1].bytes_allocated_total = 500 << 20;
    m.processes[2].alloc_count = 20;
    m.processes[2].bytes_allocated_total = 500 << 20;
    assert_eq!(m.busiest(), 1, "the most bytes, the first of a tie");
}
