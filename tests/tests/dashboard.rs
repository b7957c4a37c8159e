//! `mtracer view`: the dashboard's frames printed as plain text (`--print WxH`, or when stdout is
//! not a terminal) on a real recording of the fastbin fixture, and bad input rejected like
//! `report` rejects it, without a panic.

use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;

use mtrace_tests::*;

/// One recording of `ret_fastbins` shared by the tests of this file: 300 000 blocks (33.6 MB of
/// fastbins) instead of 1.5 M keep every `mtracer view` run under a second.
fn trace() -> &'static PathBuf {
    static T: OnceLock<(Recorded, PathBuf)> = OnceLock::new();
    &T.get_or_init(|| {
        let r = record(&[], &[fixture("ret_fastbins").to_str().unwrap(), "300000"], &[("FIXTURE_PAUSE_MS", "100")]);
        assert_eq!(r.code(), Some(0), "{}", r.stderr());
        let t = r.trace.clone();
        (r, t)
    })
    .1
}

fn view(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(paths().mtracer()).arg("view").args(args).output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

/// `mtracer view --print WxH [--panel P] TRACE`: the screen, checked to be plain text of that size.
fn screen(size: &str, panel: Option<&str>) -> String {
    let t = trace().to_str().unwrap().to_string();
    let mut args = vec!["--print", size];
    if let Some(p) = panel {
        args.extend(["--panel", p]);
    }
    args.push(&t);
    let (code, out, err) = view(&args);
    assert_eq!(code, Some(0), "{err}");
    plain(&out, size);
    out
}

fn plain(out: &str, size: &str) {
    let (w, h) = size.split_once('x').unwrap();
    let (w, h): (usize, usize) = (w.parse().unwrap(), h.parse().unwrap());
    assert!(!out.contains('\x1b'), "escape codes in the output:\n{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), h, "{out}");
    assert!(lines.iter().all(|l| l.chars().count() <= w), "{out}");
}

fn has(s: &str, needle: &str) {
    assert!(s.contains(needle), "{needle:?} not on the screen:\n{s}");
}

#[test]
fn retention_panel_shows_the_fastbins_and_the_trim() {
    let s = screen("100x40", Some("retention"));
    has(&s, "▶ Retention");
    has(&s, "ret_fastbins");
    // The category (at the peak of RSS), its cause, and malloc_trim's predicted effect.
    has(&s, "fastbins");
    has(&s, "fastbins of the main arena");
    has(&s, "freed 112-byte chunks");
    has(&s, "malloc_trim(0) at");
    has(&s, "predicted to return");
}

#[test]
fn timeline_panel_has_axes_and_series() {
    let s = screen("100x40", Some("timeline"));
    has(&s, "▶ Timeline");
    for n in ["RSS", "held from the OS (heap + mmapped)", "live", "0.000 s", "MiB", "zoom 1×"] {
        has(&s, n);
    }
}

#[test]
fn other_panels_at_80x24() {
    let s = screen("80x24", Some("arenas"));
    has(&s, "main");
    has(&s, "mallinfo2 at");
    let s = screen("80x24", Some("thresholds"));
    has(&s, "mmap threshold  128.00 KiB");
    has(&s, "trim threshold  128.00 KiB");
    let s = screen("80x24", Some("counters"));
    has(&s, "malloc_trim");
    has(&s, "300000");
    has(&s, "lost events     0");
}

#[test]
fn a_pipe_gets_the_default_frame() {
    let (code, out, err) = view(&[trace().to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    plain(&out, "100x40");
    // 100×40 shows two panels, one above the other.
    has(&out, "▶ Timeline");
    has(&out, " Retention ");
}

#[test]
fn bad_input_is_a_clear_error() {
    let (code, out, err) = view(&["--print", "80x24", "/nonexistent"]);
    assert_eq!(code, Some(2), "{out}");
    assert!(err.contains("cannot open /nonexistent"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("text.mtr");
    std::fs::write(&f, b"hello, this is not a trace at all\n").unwrap();
    // Without --print and with stdout a pipe: the same error, the terminal never touched.
    let (code, _, err) = view(&[f.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("not an mtrace trace file"), "{err}");
    let (code, _, err) = view(&["--print", "5x5", "/nonexistent"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("the width must be 20 to 1000"), "{err}");
    let (code, _, err) = view(&["--print", "80x24", "--panel", "processes", trace().to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("needs more than one process image"), "{err}");
}

/// Drives `mtracer view TRACE` in a real pseudo-terminal (python3's `pty`, 80×24) and runs
/// `stty -a` right after it. Mode `keys`: `?`, any key, Tab, `q`; mode `panic`: nothing (the
/// dashboard is made to panic after its first frame). Prints the steps reached, then everything
/// the terminal received.
const SHELL: &str = r#""$0" view "$1"; echo "view-exit=$?"; stty -a"#;

/// The keys and checks of [`SHELL`]'s run (see `drive_in_pty`).
const BODY: &str = r#"
steps = [read_until(b'Timeline')]
if mode == 'keys':
    os.write(fd, b'?'); steps.append(read_until(b'Keys'))
    os.write(fd, b'x'); time.sleep(0.3)
    os.write(fd, b'\t'); steps.append(read_until(b'category'))
    os.write(fd, b'q')
steps.append(read_until(b'view-exit='))
steps.append(read_until(b'noflsh', 10))
"#;

/// Run [`SHELL`] with [`BODY`] in `mode` with `env`; returns what the terminal showed, checked to have left
/// the alternate screen and to be back in canonical mode with echo.
fn in_a_pty(mode: &str, env: &[(&str, &str)], steps: &str) -> String {
    let (out, err) = drive_in_pty(SHELL, 30.0, BODY, &[paths().mtracer().as_os_str(), trace().as_os_str()], mode, env);
    let first = out.lines().next().unwrap_or("");
    assert_eq!(first, steps, "steps reached:\n{out}\n{err}");
    // Entered and left the alternate screen, hid and showed the cursor.
    assert!(out.contains("\x1b[?1049h") && out.contains("\x1b[?1049l"), "{out}");
    assert!(out.contains("\x1b[?25l") && out.contains("\x1b[?25h"), "{out}");
    assert_terminal_restored(&out[out.find("view-exit=").unwrap()..]);
    out
}

/// The interactive dashboard draws, answers keys, quits on `q` with status 0 and leaves the
/// terminal as it found it.
#[test]
fn interactive_mode_answers_keys_and_restores_the_terminal() {
    let out = in_a_pty("keys", &[], "[True, True, True, True, True]");
    assert!(out.contains("view-exit=0"), "{out}");
}

/// A panic inside the dashboard (forced here) still restores the terminal before the message.
#[test]
fn a_panic_restores_the_terminal() {
    let out = in_a_pty("panic", &[("MTRACE_VIEW_TEST_PANIC", "1")], "[True, True, True]");
    assert!(!out.contains("view-exit=0"), "{out}");
    let restored = out.find("\x1b[?1049l").unwrap();
    let message = out.find("panicked").unwrap_or_else(|| panic!("no panic message:\n{out}"));
    assert!(restored < message, "the message went to the alternate screen:\n{out}");
}

/// The request sizes: in the JSON report every allocation is in one power-of-two bucket (counts
/// and bytes add up to the report's totals), the fixture's 300 000 blocks of 89–104 B in
/// [64, 127]; the sizes panel shows the same numbers.
#[test]
fn size_histogram_in_the_report_and_on_the_screen() {
    let r = report_json(trace());
    let p = &r["processes"][0];
    let h = &p["size_histogram"];
    let buckets = h["buckets"].as_array().unwrap();
    let count: u64 = buckets.iter().map(|b| b["count"].as_u64().unwrap()).sum();
    let bytes: u64 = buckets.iter().map(|b| b["bytes"].as_u64().unwrap()).sum();
    assert_eq!(count, num(p, "alloc_count"), "{h:#}");
    assert_eq!(bytes, num(p, "bytes_allocated_total"), "{h:#}");
    assert_eq!(h["count"].as_u64(), Some(count));
    for b in buckets {
        let (lo, hi) = (b["lo"].as_u64().unwrap(), b["hi"].as_u64().unwrap());
        assert!(lo == hi && lo == 0 || hi == lo * 2 - 1, "{b}");
    }
    let small = buckets.iter().find(|b| b["lo"] == 64).expect("the 64–127 B bucket");
    let n = small["count"].as_u64().unwrap();
    assert!((300_000..300_100).contains(&n), "the fixture's blocks and a few of libc's: {small}");
    let s = screen("80x24", Some("sizes"));
    has(&s, "Allocation sizes · the whole run");
    has(&s, &format!("{count} allocations · median "));
    assert!(s.lines().any(|l| l.contains("64 B–127 B") && l.contains(&format!(" {n} "))), "{s}");
}
