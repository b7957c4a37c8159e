//! Rendering tests: every panel drawn at 80×24 off-screen from a model built by hand, checked for
//! the strings a user must see.

use super::app::{App, Panel};
use super::model::*;
use super::ui::render_text;
use crate::analysis::glibc::breakdown::Categories;

const MIB: u64 = 1 << 20;

fn cats(end: bool) -> Vec<(String, u64, f64)> {
    let v: [(&str, u64, f64); 4] = if end {
        [("live", 0, 0.0), ("tcache", 784, 19.1), ("fastbins", 0, 0.0), ("top", 2140, 52.3)]
    } else {
        [("live", 0, 0.0), ("tcache", 784, 0.0), ("fastbins", 168_000_000, 99.9), ("top", 12_656, 0.0)]
    };
    v.iter().map(|(k, b, p)| (k.to_string(), *b, *p)).collect()
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
    DashboardModel { command: "/tmp/ret_fastbins".into(), warnings: vec![], processes }
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
        a.on_key(ratatui::crossterm::event::KeyEvent::from(ratatui::crossterm::event::KeyCode::Right));
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
    has(&s, "image 3 of 3");
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
    for n in [" Timeline ", "▶ Retention", " Counters ", " Arenas "] {
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
