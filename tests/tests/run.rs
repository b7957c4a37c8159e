//! `mtracer run`: with stdout a pipe, `record` followed by the text summary.

use std::process::{Command, Stdio};

use mtrace_tests::*;

/// `mtracer run -q -o T -- run_demo` into a pipe: the fixture's status, its output, then the summary.
#[test]
fn a_pipe_gets_the_recording_and_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t.mtr");
    let o = Command::new(paths().mtracer())
        .args(["run", "-q", "-o"])
        .arg(&t)
        .arg("--")
        .arg(fixture("run_demo"))
        .env("RUN_DEMO_SLEEP_MS", "50")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{out}\n{err}");
    assert!(out.contains("run_demo: done"), "{out}");
    assert!(out.contains("run_demo"), "{out}");
    let report = Command::new(paths().mtracer()).arg("report").arg(&t).output().unwrap();
    let summary = String::from_utf8_lossy(&report.stdout);
    assert!(!summary.is_empty());
    assert!(out.ends_with(&*summary), "the summary is not `mtracer report`'s:\n{out}\n---\n{summary}");
    let r = report_json(&t);
    assert_eq!(num(&r["processes"][0], "final_live_bytes"), 100000, "{r:#}");
}

/// A program that does not exist: 127 and a clear error, no summary.
#[test]
fn a_missing_program_exits_127() {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t.mtr");
    let o = Command::new(paths().mtracer()).args(["run", "-o"]).arg(&t).args(["--", "/nonexistent/prog"]).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(127), "{err}");
    assert!(err.contains("cannot run `/nonexistent/prog`"), "{err}");
    assert!(o.stdout.is_empty());
}
