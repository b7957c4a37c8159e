//! Progress of the offline commands: on a terminal, a line on stderr with the bytes and events
//! read once the reading takes longer than `MTRACE_PROGRESS_AFTER_MS` (1 s by default); never on
//! a pipe, never in the output.

use mtrace_tests::*;

/// A recorded trace of the mixed workload (a few hundred thousand events).
fn trace() -> (tempfile::TempDir, std::path::PathBuf) {
    let r = record(&[], &[fixture("mixed").to_str().unwrap(), "1", "200000"], &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("mixed.mtr");
    std::fs::copy(&r.trace, &t).unwrap();
    (dir, t)
}

/// `mtracer ARGS TRACE` in a pseudo-terminal with stdout to /dev/null: what the terminal got
/// (stderr), up to the exit marker.
fn on_a_terminal(args: &str, trace: &std::path::Path, env: &[(&str, &str)]) -> String {
    let shell = format!(r#""$0" {args} "$1" > /dev/null; echo "exit=$?""#);
    let body = "steps = [read_until(b'exit=')]\n";
    let (out, err) = drive_in_pty(&shell, 60.0, body, &[paths().mtracer().as_os_str(), trace.as_os_str()], "", env);
    assert!(out.starts_with("[True]"), "{out}\n{err}");
    out
}

#[test]
fn a_terminal_sees_progress_and_a_pipe_does_not() {
    let (_dir, t) = trace();
    let size = std::fs::metadata(&t).unwrap().len();
    for args in ["report", "report --json", "export --format massif", "view --print 100x30"] {
        let out = on_a_terminal(args, &t, &[("MTRACE_PROGRESS_AFTER_MS", "0")]);
        assert!(out.contains("exit=0"), "{args}: {out}");
        assert!(out.contains("mtracer: analysing") && out.contains("M events ("), "{args}: no progress line:\n{out}");
        // The last update has read the whole file.
        let total = format!("{:.2} KiB", size as f64 / 1024.0);
        let whole = format!("{:.2} MiB", size as f64 / 1024.0 / 1024.0);
        assert!(out.contains(&format!("{total}/{total}")) || out.contains(&format!("{whole}/{whole}")), "{args}: the file's {size} bytes never all read:\n{out}");
        // The same command on pipes: nothing on stderr, the output as always.
        let o = std::process::Command::new(paths().mtracer()).args(args.split(' ')).arg(&t).env("MTRACE_PROGRESS_AFTER_MS", "0").output().unwrap();
        assert!(o.status.success(), "{args}");
        assert_eq!(String::from_utf8_lossy(&o.stderr), "", "{args}: progress on a pipe");
        assert!(!String::from_utf8_lossy(&o.stdout).contains("analysing"), "{args}");
    }
    // A JSON report on a pipe is still plain JSON.
    let rep = report_json(&t);
    assert_eq!(num(&rep["processes"][0], "unmatched_frees"), 0);
}

#[test]
fn a_short_read_shows_no_progress() {
    // The default delay (1 s) is far longer than this 3 KB trace takes.
    let t = paths().workspace.join("tests/data/v4-exactness.mtr");
    let out = on_a_terminal("report", &t, &[]);
    assert!(out.contains("exit=0"), "{out}");
    assert!(!out.contains("analysing"), "{out}");
}
