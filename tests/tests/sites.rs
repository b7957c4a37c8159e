//! Allocation sites and exports, end to end: C, C++ and Rust fixtures with known call paths run
//! under the tracer; the report names the right functions, files, lines and inlined frames at the
//! peak, at exit and for temporaries; `mtracer export` writes a massif file that valgrind's
//! `ms_print` reads, whose peak is the report's; folded stacks, SVG and CSV; bad input is an
//! error, never a panic.

use std::path::{Path, PathBuf};
use std::process::Command;

use mtrace_tests::*;

/// The C fixture and its dlopen'd library, built once.
fn sites_c() -> (PathBuf, PathBuf) {
    // Tests of this binary run in parallel: one builds the library at a time, under a temporary
    // name of its own, renamed into place.
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let exe = fixture("sites");
    let lib = paths().fixtures_out.join("libsites_plugin.so");
    let src = paths().workspace.join("tests/fixtures/sites_plugin.c");
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let tmp = lib.with_extension(format!("tmp{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed)));
    let o = Command::new("gcc").args(["-O2", "-g", "-shared", "-fPIC", "-o"]).arg(&tmp).arg(&src).output().expect("gcc");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::rename(&tmp, &lib).unwrap();
    (exe, lib)
}

fn mtracer(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(paths().mtracer()).args(args).output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn no_panic(stderr: &str) {
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

/// The entry of `list` whose function is `f`.
fn entry<'a>(list: &'a Value, f: &str) -> &'a Value {
    list.as_array().unwrap().iter().find(|e| s(&e["function"]) == f).unwrap_or_else(|| panic!("no site {f} in {list:#}"))
}

fn assert_by_bytes(list: &Value) {
    let b: Vec<u64> = list.as_array().unwrap().iter().map(|e| e["bytes"].as_u64().unwrap()).collect();
    assert!(b.windows(2).all(|w| w[0] >= w[1]), "not ordered by bytes: {b:?}");
}

/// `ms_print FILE`: the snapshot it marks as the peak and that snapshot's useful-heap bytes.
fn ms_print_peak(massif: &Path) -> (usize, u64, String) {
    let o = Command::new("ms_print").arg(massif).output().expect("ms_print (valgrind) is needed");
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    assert!(o.status.success(), "ms_print failed:\n{}\n{out}", String::from_utf8_lossy(&o.stderr));
    let det = out.lines().find(|l| l.starts_with(" Detailed snapshots: [")).unwrap_or_else(|| panic!("{out}"));
    let peak: usize = det.split([',', '[']).find(|p| p.contains("(peak)")).unwrap().trim().split(' ').next().unwrap().parse().unwrap();
    let row = out
        .lines()
        .find(|l| l.split_whitespace().next() == Some(&peak.to_string()) && l.split_whitespace().count() == 6)
        .unwrap_or_else(|| panic!("no row for snapshot {peak}:\n{out}"));
    let useful: u64 = row.split_whitespace().nth(3).unwrap().replace(',', "").parse().unwrap();
    (peak, useful, out)
}

#[test]
fn massif_export_is_read_by_ms_print_and_its_peak_is_the_reports() {
    let (exe, lib) = sites_c();
    // Without stacks (one "(no stack)" entry) and with them.
    for stacks in ["0", "1"] {
        let r = record(&[], &[exe.to_str().unwrap(), lib.to_str().unwrap()], &[("MTRACE_STACKS", stacks)]);
        assert_eq!(r.code(), Some(0), "{}", r.stderr());
        let rep = r.report();
        let p = &rep["processes"][0];
        assert_eq!(p["stacks"].as_bool(), Some(stacks == "1"), "{p:#}");
        if stacks == "0" {
            assert!(s(&p["stacks_note"]).contains("no allocation stacks"), "{}", p["stacks_note"]);
            assert_eq!(p["top_sites_at_peak"].as_array().unwrap().len(), 0);
        }
        // In bytes allocated, the peak comes after the temporaries' 100,000 B and the table.
        let out = r.trace.with_extension("massif-b");
        let (code, _, err) = mtracer(&["export", r.trace.to_str().unwrap(), "--format", "massif", "--time-unit", "B", "-o", out.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{err}");
        let (peak, useful, ms) = ms_print_peak(&out);
        assert_eq!(useful, num(p, "peak_live_bytes"), "ms_print's peak:\n{ms}");
        assert!(peak >= 20, "snapshots evenly spaced in bytes: the peak is snapshot {peak}:\n{ms}");
        assert!(std::fs::read_to_string(&out).unwrap().contains("\ntime_unit: B\n"));
        let out = r.trace.with_extension("massif");
        let (code, _, err) = mtracer(&["export", r.trace.to_str().unwrap(), "--format", "massif", "-o", out.to_str().unwrap()]);
        assert_eq!(code, Some(0), "{err}");
        let (_, useful, ms) = ms_print_peak(&out);
        assert_eq!(useful, num(p, "peak_live_bytes"), "ms_print's peak:\n{ms}");
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text.matches("heap_tree=peak").count(), 1);
        assert!(text.starts_with("desc: ") && text.contains("\ntime_unit: ms\n"));
        if stacks == "0" {
            assert!(text.contains(" 0x0: (no stack)\n"), "{text}");
        } else {
            // The peak's tree: the inlined helper, its caller, main.
            let tree: Vec<&str> = text.split("heap_tree=peak\n").nth(1).unwrap().lines().take_while(|l| !l.starts_with('#')).collect();
            assert!(tree[1].starts_with(" n1: 1000000 0x") && tree[1].ends_with(": fill_row (sites.c:20)"), "{tree:#?}");
            assert!(tree[2].starts_with("  n1: 1000000 0x") && tree[2].ends_with(": build_table (sites.c:28)"), "{tree:#?}");
            assert!(tree[3].contains(": main (sites.c:"), "{tree:#?}");
        }
    }
}

#[test]
fn c_sites_name_functions_files_lines_inlined_frames_and_the_dlopened_library() {
    let (exe, lib) = sites_c();
    let r = record(&[], &[exe.to_str().unwrap(), lib.to_str().unwrap()], &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let t = truth(&r.stdout());
    let rep = r.report();
    let p = &rep["processes"][0];
    assert_eq!(p["stacks"].as_bool(), Some(true));
    assert_eq!(p["symbols_missing"].as_array().unwrap().len(), 0, "{}", p["symbols_missing"]);

    // The top site at the peak: 100 rows from the always-inlined fill_row inside build_table.
    let top = &p["top_sites_at_peak"];
    assert_by_bytes(top);
    let t0 = &top[0];
    assert_eq!(s(&t0["function"]), "fill_row");
    assert!(s(&t0["file"]).ends_with("tests/fixtures/sites.c"), "{t0:#}");
    assert_eq!(t0["line"].as_u64(), Some(20));
    assert_eq!(t0["bytes"].as_u64(), Some(t["peak_rows_bytes"]));
    assert_eq!(t0["blocks"].as_u64(), Some(100));
    let f = t0["frames"].as_array().unwrap();
    assert_eq!((s(&f[0]["function"]), f[0]["inlined"].as_bool()), ("fill_row", Some(true)), "{t0:#}");
    assert_eq!((s(&f[1]["function"]), f[1]["inlined"].as_bool(), f[1]["line"].as_u64()), ("build_table", Some(false), Some(28)));
    assert_eq!(s(&f[2]["function"]), "main");
    assert!(s(&f[0]["module"]).ends_with("/sites"));
    // The row array, the other site of build_table.
    let arr = entry(top, "build_table");
    assert_eq!((arr["bytes"].as_u64(), arr["line"].as_u64()), (Some(800), Some(26)));
    assert_eq!(s(&p["top_functions_at_peak"][0]["function"]), "fill_row");

    // Leaked at exit: the dlopen'd library's block and the ten names.
    let leaked = &p["leaked_sites"];
    assert_by_bytes(leaked);
    let plugin = entry(leaked, "plugin_alloc");
    assert_eq!((plugin["bytes"].as_u64(), plugin["blocks"].as_u64()), (Some(t["leaked_plugin"]), Some(1)));
    assert!(s(&plugin["file"]).ends_with("sites_plugin.c"), "{plugin:#}");
    assert!(s(&plugin["frames"][0]["module"]).ends_with("libsites_plugin.so"), "{plugin:#}");
    assert_eq!(s(&plugin["frames"][1]["function"]), "main");
    let names = entry(leaked, "leak_name");
    assert_eq!((names["bytes"].as_u64(), names["blocks"].as_u64(), names["line"].as_u64()), (Some(t["leaked_names"]), Some(10), Some(39)));
    assert!(leaked.as_array().unwrap().iter().all(|e| s(&e["function"]) != "fill_row" && s(&e["function"]) != "temporaries"));

    // Temporaries: exactly the 1000 blocks freed right after their allocation.
    let temp = &p["temporary_sites"];
    let tmp = entry(temp, "temporaries");
    assert_eq!((tmp["blocks"].as_u64(), tmp["bytes"].as_u64(), tmp["allocations"].as_u64()), (Some(1000), Some(100_000), Some(1000)));
    assert_eq!(temp.as_array().unwrap().iter().map(|e| e["blocks"].as_u64().unwrap()).sum::<u64>(), 1000, "{temp:#}");
    assert_eq!(tmp["size_classes"]["65-256"].as_u64(), Some(1000));

    // The text report has the sections.
    let (code, text, err) = mtracer(&["report", r.trace.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    for needle in ["-- top sites at the peak", "fill_row (sites.c:20)", "-- leaked at exit", "plugin_alloc (sites_plugin.c:", "-- temporary allocations", "temporaries (sites.c:"] {
        assert!(text.contains(needle), "no {needle:?} in:\n{text}");
    }

    // Folded stacks (root first) and the flamegraph.
    let (code, folded, err) = mtracer(&["export", r.trace.to_str().unwrap(), "--format", "folded"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(folded.lines().any(|l| l.ends_with(";main;build_table;fill_row 1000000")), "{folded}");
    let (code, leaks, _) = mtracer(&["export", r.trace.to_str().unwrap(), "--format", "folded", "--weight", "leaked"]);
    assert_eq!(code, Some(0));
    assert!(leaks.lines().any(|l| l.ends_with(";main;plugin_alloc 5000")), "{leaks}");
    assert!(leaks.lines().any(|l| l.ends_with(";main;leak_name 400")), "{leaks}");
    let (code, svg, err) = mtracer(&["export", r.trace.to_str().unwrap(), "--format", "svg"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(svg.starts_with("<?xml") && svg.contains("fill_row") && svg.trim_end().ends_with("</svg>"));
}

#[test]
fn cpp_site_names_are_demangled() {
    let exe = fixture("sites_cpp");
    let r = record(&[], &[exe.to_str().unwrap()], &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let rep = r.report();
    let p = &rep["processes"][0];
    let top = &p["top_sites_at_peak"][0];
    // std::vector's storage is named by the method that made the vector.
    assert_eq!(s(&top["function"]), "geo::Grid<int>::scratch(unsigned long)", "{top:#}");
    assert_eq!(top["bytes"].as_u64(), Some(200_000));
    assert!(s(&top["file"]).ends_with("sites_cpp.cpp"));
    let frames: Vec<&str> = top["frames"].as_array().unwrap().iter().map(|f| s(&f["function"])).collect();
    assert!(frames.iter().any(|f| f.starts_with("std::vector<int, std::allocator<int> >::vector(")), "{frames:?}");
    let leak = entry(&p["leaked_sites"], "geo::Grid<int>::alloc_cells(unsigned long)");
    assert_eq!((leak["bytes"].as_u64(), leak["blocks"].as_u64(), leak["line"].as_u64()), (Some(4000), Some(1), Some(11)));
    // operator new[] tail-calls operator new: the innermost frame is operator new's.
    assert!(s(&leak["frames"][0]["function"]).starts_with("operator new"), "{leak:#}");
}

#[test]
fn rust_site_names_are_demangled() {
    let src = paths().workspace.join("tests/fixtures/sites_rust.rs");
    let exe = paths().fixtures_out.join("sites_rust");
    let tmp = exe.with_extension(format!("tmp{}", std::process::id()));
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let o = Command::new(rustc).args(["-g", "--edition", "2021", "-o"]).arg(&tmp).arg(&src).output().expect("rustc");
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    std::fs::rename(&tmp, &exe).unwrap();
    let r = record(&[], &[exe.to_str().unwrap()], &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let rep = r.report();
    let p = &rep["processes"][0];
    let top = &p["top_sites_at_peak"][0];
    assert_eq!(s(&top["function"]), "sites_rust::store::scratch", "{top:#}");
    assert_eq!((top["bytes"].as_u64(), top["line"].as_u64()), (Some(100_000), Some(14)));
    assert!(s(&top["file"]).ends_with("sites_rust.rs"));
    // vec![i; 3000] allocates with calloc for 0 and malloc otherwise: two stacks that differ
    // only inside alloc:: (hidden plumbing) are one site, with both stack ids.
    let leaked: Vec<&Value> = p["leaked_sites"].as_array().unwrap().iter().filter(|e| s(&e["function"]) == "sites_rust::store::keep_buffers").collect();
    assert_eq!(leaked.len(), 1, "{:#}", p["leaked_sites"]);
    let k = leaked[0];
    assert_eq!((k["bytes"].as_u64(), k["blocks"].as_u64(), k["allocations"].as_u64()), (Some(9000), Some(3), Some(3)), "{k:#}");
    let ids = k["stack_ids"].as_array().unwrap();
    assert_eq!(ids.len(), 2, "{k:#}");
    assert!(ids.contains(&k["stack_id"]), "{k:#}");
    let f = entry(&p["top_functions_at_peak"], "sites_rust::store::keep_buffers");
    assert_eq!((f["bytes"].as_u64(), f["sites"].as_u64()), (Some(9000), Some(1)));
}

#[test]
fn export_bad_input_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = mtracer(&["export", "/nonexistent/t.mtr", "--format", "massif"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot open /nonexistent/t.mtr"), "{err}");
    no_panic(&err);
    let junk = dir.path().join("junk.mtr");
    std::fs::write(&junk, b"not a trace").unwrap();
    let (code, _, err) = mtracer(&["export", junk.to_str().unwrap(), "--format", "folded"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not an mtrace trace"), "{err}");
    no_panic(&err);
    let (code, _, err) = mtracer(&["export", junk.to_str().unwrap(), "--format", "pdf"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("invalid value 'pdf'"), "{err}");
    no_panic(&err);

    // A good trace, a process image it does not have, a bad threshold, a truncated copy.
    let (exe, lib) = sites_c();
    let r = record(&[], &[exe.to_str().unwrap(), lib.to_str().unwrap()], &[]);
    let t = r.trace.to_str().unwrap();
    let (code, _, err) = mtracer(&["export", t, "--format", "massif", "--image", "7"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no process image 7"), "{err}");
    let (code, _, err) = mtracer(&["export", t, "--format", "massif", "--threshold", "150"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("--threshold"), "{err}");
    let bytes = std::fs::read(&r.trace).unwrap();
    let cut = dir.path().join("cut.mtr");
    std::fs::write(&cut, &bytes[..bytes.len() * 2 / 3]).unwrap();
    let (code, _, err) = mtracer(&["export", cut.to_str().unwrap(), "--format", "csv"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("truncated") || err.contains("corrupt"), "{err}");
    no_panic(&err);
    // With --partial: what comes before the damage (this short trace may not even have its image
    // announced there).
    let (code, csv, err) = mtracer(&["export", cut.to_str().unwrap(), "--format", "csv", "--partial"]);
    if code == Some(0) {
        assert!(csv.starts_with("t_s,live_bytes,heap_bytes,mmapped_bytes,rss_bytes,live,overhead,tcache"), "{csv}");
    } else {
        assert_eq!(code, Some(2));
        assert!(err.contains("the trace has no process image"), "{err}");
    }
    no_panic(&err);
    let (code, csv, err) = mtracer(&["export", t, "--format", "csv"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(csv.starts_with("t_s,live_bytes,heap_bytes,mmapped_bytes,rss_bytes,live,overhead,tcache,fastbins,bins,top,released,metadata,mmapped_rounding\n"), "{csv}");
    // An unwritable output.
    let (code, _, err) = mtracer(&["export", t, "--format", "csv", "-o", "/nonexistent/dir/x.csv"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot write the export: /nonexistent/dir/x.csv: No such file or directory"), "{err}");
}

/// The retention explanation names the site of the block that pins the heap top: ret_pin's live
/// 2000-byte pin while RSS is at its peak (allocated by `pin_above` in retention.h).
#[test]
fn the_block_pinning_the_heap_top_is_named_by_its_site() {
    let r = record(&[], &[fixture("ret_pin").to_str().unwrap(), "2000", "2000"], &[("FIXTURE_PAUSE_MS", "100")]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let rep = r.report();
    let p = &rep["processes"][0];
    let pins = &p["retention_by_site"]["top_pinned_at_peak_rss"];
    let pin = &pins[0];
    assert_eq!((pin["live"].as_bool(), pin["size"].as_u64()), (Some(true), Some(2000)), "{pins:#}");
    assert_eq!(s(&pin["site"]["function"]), "pin_above", "{pin:#}");
    assert!(s(&pin["site"]["file"]).ends_with("retention.h"), "{pin:#}");
    let causes = p["retention"]["at_peak_rss"]["causes"].as_array().unwrap();
    let c = causes.iter().find(|c| c["kind"] == "top_pinned").unwrap_or_else(|| panic!("{causes:#?}"));
    let who = format!("a live 2000-byte block at {:#x} (allocated in pin_above (retention.h:", pin["address"].as_u64().unwrap());
    assert!(s(&c["text"]).contains(&who), "{} should contain {who}", c["text"]);
}

/// `mtracer view --print 120x40 --panel sites`: the dashboard's sites panel on the C fixture
/// names the top site at the peak (the table's rows from the inlined fill_row, 1,000,000 B) and
/// the leaks at exit; without stacks it says so.
#[test]
fn dashboard_sites_panel_shows_the_top_site_at_the_peak_and_the_leaks() {
    let (exe, lib) = sites_c();
    let r = record(&[], &[exe.to_str().unwrap(), lib.to_str().unwrap()], &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let (code, out, err) = mtracer(&["view", "--print", "120x40", "--panel", "sites", r.trace.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    no_panic(&err);
    assert_eq!(out.lines().count(), 40, "{out}");
    assert!(out.lines().all(|l| l.chars().count() <= 120), "{out}");
    assert!(out.contains("▶ Sites · leaked at exit and at the peak"), "{out}");
    // The peak's list (on the right): 1,000,000 B = 976.56 KiB in 100 blocks at fill_row, first.
    let first = out.lines().find(|l| l.contains("fill_row")).unwrap_or_else(|| panic!("{out}"));
    assert!(first.contains("976.56 KiB     100 fill_row") && first.trim_end_matches('┃').trim_end().ends_with("sites.c:20"), "{out}");
    assert!(out.lines().position(|l| l.contains("fill_row")) < out.lines().position(|l| l.contains("build_table")), "{out}");
    // At exit (on the left): the plugin's 5000 B and the ten 40-byte names.
    assert!(out.lines().any(|l| l.contains("4.88 KiB       1 plugin_alloc") && l.contains("sites_plugin.c:6")), "{out}");
    assert!(out.lines().any(|l| l.contains("400 B      10 leak_name") && l.contains("sites.c:39")), "{out}");

    let r = record(&[], &[exe.to_str().unwrap(), lib.to_str().unwrap()], &[("MTRACE_STACKS", "0")]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let (code, out, err) = mtracer(&["view", "--print", "80x24", "--panel", "sites", r.trace.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("no allocation stacks in this trace (recorded with --no-stacks?)"), "{out}");
}
