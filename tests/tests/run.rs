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

/// Drives `mtracer run -o TRACE -- FIXTURE` in a real pseudo-terminal (python3's `pty`, 80×24)
/// and runs `stty -a` after it. Mode `wait`: wait for "running", then for the exit status, then
/// `q`; mode `early`: `q` while the command still runs. Prints the steps reached, then everything
/// the terminal received.
const SHELL: &str = r#""$0" run -o "$1" -- "$2"; echo "run-exit=$?"; stty -a"#;

/// The keys and checks of [`SHELL`]'s run (see `drive_in_pty`).
const BODY: &str = r#"
steps = [read_until(b'mtracer run \xc2\xb7 running')]
if mode == 'wait':
    steps.append(read_until(b'exited with status 3'))
    time.sleep(0.3)
steps.append(b'run-exit=' not in out)
os.write(fd, b'q')
steps.append(read_until(b'run-exit='))
steps.append(read_until(b'noflsh', 5))
"#;

/// Run [`SHELL`] with [`BODY`] in `mode`; returns what the terminal showed and the trace, checked: the
/// alternate screen left, the terminal back in canonical mode with echo, exit status 3, and the
/// trace complete with the fixture's final live bytes.
fn in_a_pty(mode: &str, steps: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let t = dir.path().join("t.mtr");
    let fx = fixture("run_demo");
    let (out, err) = drive_in_pty(SHELL, 8.0, BODY, &[paths().mtracer().as_os_str(), t.as_os_str(), fx.as_os_str()], mode, &[]);
    let first = out.lines().next().unwrap_or("");
    assert_eq!(first, steps, "steps reached:\n{out}\n{err}");
    assert!(out.contains("\x1b[?1049h") && out.contains("\x1b[?1049l"), "{out}");
    let after = &out[out.find("run-exit=").unwrap()..];
    assert!(after.starts_with("run-exit=3"), "{after}");
    assert_terminal_restored(after);
    let r = report_json(&t);
    assert_eq!(num(&r["processes"][0], "final_live_bytes"), 100000, "{r:#}");
    // The command's output went to the log, not over the dashboard.
    let log = std::fs::read_to_string(dir.path().join("t.mtr.log")).unwrap();
    assert!(log.contains("run_demo: allocated") && log.contains("run_demo: done"), "{log}");
    assert!(out.contains("the command's output is in"), "{out}");
    out
}

/// The live dashboard says "running" while the command sleeps, then its exit status; `q` ends
/// mtracer with the command's status and the terminal restored.
#[test]
fn the_live_dashboard_follows_the_command_to_its_end() {
    in_a_pty("wait", "[True, True, True, True, True]");
}

/// `q` while the command runs: the dashboard closes, the recording goes on to the end.
#[test]
fn quitting_early_keeps_recording() {
    let out = in_a_pty("early", "[True, True, True, True]");
    assert!(out.contains("dashboard closed; still recording"), "{out}");
}
