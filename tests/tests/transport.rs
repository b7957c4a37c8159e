//! The transport under stress: a collector that cannot keep up (lossless: the program waits;
//! lossy: whole blocks are dropped and counted), and a collector that disappears (the program
//! carries on untraced, never hangs).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mtrace_tests::*;

const STARVED: &[&str] = &["--ring-mb", "1", "--block-kb", "4", "--drain-interval-us", "200000"];

#[test]
fn lossy_mode_under_a_starved_collector_reports_its_losses() {
    let mut opts = vec!["--lossy"];
    opts.extend_from_slice(STARVED);
    let r = record(&opts, &[fixture("churn").to_str().unwrap(), "2", "1000000"], &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    assert!(r.stdout().ends_with("done\n"));
    let rep = r.report();
    assert_eq!(rep["lossy"], true);
    let p = &rep["processes"][0];
    let lost = num(p, "lost_events");
    let seen = p["calls"]["malloc"].as_u64().unwrap_or(0) + p["calls"]["free"].as_u64().unwrap_or(0);
    assert!(lost > 0, "a 1 MiB ring drained every 200 ms cannot hold 4 M events: {p}");
    // Every event was either recorded or counted lost (glibc's free(NULL) calls on top).
    assert!(seen + lost >= 4_000_000, "seen {seen} + lost {lost}");
    assert!(seen + lost <= 4_000_010, "seen {seen} + lost {lost}");
    // The text report says the numbers are approximate.
    let text = Command::new(paths().mtracer()).arg("report").arg(&r.trace).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains("lost events") && text.contains("approximate"), "{text}");
}

#[test]
fn lossless_mode_under_a_starved_collector_loses_nothing() {
    let r = record(STARVED, &[fixture("churn").to_str().unwrap(), "2", "100000"], &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let p = &r.report()["processes"][0];
    assert_eq!(num(p, "lost_events"), 0);
    assert_eq!(p["calls"]["malloc"].as_u64(), Some(200_000));
    // Every block the fixture allocated was seen freed (glibc adds a few free(NULL) calls).
    assert_eq!(p["final_live_by_call"]["malloc"].as_u64(), None, "{p}");
    assert!(num(p, "free_count") >= 200_000);
}

/// The collector is killed while the program waits for it (lossless, ring full): the program
/// notices the missing heartbeat, stops tracing and finishes.
#[test]
fn a_collector_that_dies_does_not_hang_the_program() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(paths().mtracer())
        .args(["record", "-q", "-o"])
        .arg(dir.path().join("t.mtr"))
        .args(STARVED)
        .arg("--")
        .arg(fixture("churn"))
        .args(["2", "3000000"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    child.kill().unwrap(); // SIGKILL the recorder, not the program
    child.wait().unwrap();
    let start = Instant::now();
    let mut out = String::new();
    // The program holds the pipe until it exits.
    child.stdout.take().unwrap().read_to_string(&mut out).unwrap();
    assert!(out.ends_with("done\n"), "{out}");
    assert!(start.elapsed() < Duration::from_secs(60), "took {:?}", start.elapsed());
    // Nobody could write why the trace ends: the report says what it can.
    let rep = report_json(&dir.path().join("t.mtr"));
    assert_eq!(rep["complete"], false);
    let p = &rep["processes"][0];
    assert_eq!(p["ending"], "unknown", "{p}");
    let stopped = &p["tracing_stopped"];
    assert!(stopped["why"].as_str().unwrap().contains("the recorder was killed or crashed"), "{stopped}");
    assert_eq!(stopped["untraced_calls"], Value::Null);
}

/// The recorder is stopped (SIGSTOP) while the program runs: the program waits the detach
/// timeout (`--detach-timeout-ms`) for its full ring, stops tracing, finishes untraced and
/// counts what it missed. When the recorder comes back it writes when and why tracing stopped
/// into the trace, and the report shows it: the image exited (its status is known), its events
/// end at that time, and at least N calls are not in the trace.
#[test]
fn a_recorder_that_stops_answering_is_marked_in_the_trace() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.mtr");
    let pairs = 3_000_000u64;
    let child = Command::new(paths().mtracer())
        .args(["record", "-q", "--detach-timeout-ms", "300", "-o"])
        .arg(&trace)
        .args(STARVED)
        .arg("--")
        .arg(fixture("churn"))
        .args(["2", &pairs.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let signal = |s: &str| assert!(Command::new("kill").args([s, &child.id().to_string()]).status().unwrap().success());
    signal("-STOP");
    // The program's ring fills at once; 300 ms later it runs on untraced and ends (6 M calls in
    // well under a second on their own).
    std::thread::sleep(Duration::from_millis(3000));
    signal("-CONT");
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(String::from_utf8_lossy(&o.stdout).ends_with("done\n"));
    assert!(err.contains("tracing stopped: the collector stopped responding (no heartbeat for 300 ms)"), "{err}");
    let rep = report_json(&trace);
    assert_eq!(rep["complete"], false, "events are missing");
    let p = &rep["processes"][0];
    assert_eq!(p["ending"], "exited", "{p}");
    let stopped = &p["tracing_stopped"];
    assert_eq!(stopped["why"], "the recorder did not answer for 0.3 s (its ring full, its clock still)");
    let at = stopped["at_s"].as_f64().unwrap();
    assert!(at > 0.0 && at < p["duration_s"].as_f64().unwrap(), "{stopped} in {p}");
    // The worker threads' calls after the stop were counted as they exited.
    let missed = stopped["untraced_calls"].as_u64().unwrap();
    let seen = p["calls"]["malloc"].as_u64().unwrap_or(0) + p["calls"]["free"].as_u64().unwrap_or(0);
    assert!(missed > 0, "{stopped}");
    // Each thread's call in flight as tracing stopped is in neither count (a lower bound).
    let calls = 2 * 2 * pairs;
    assert!(seen + missed >= calls - 2 && seen + missed <= calls + 100, "seen {seen} + missed {missed} of {calls}");
    let text = Command::new(paths().mtracer()).arg("report").arg(&trace).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&format!("tracing stopped at {at:.2} s: the recorder did not answer for 0.3 s")) && text.contains(&format!("at least {missed} calls after that are not in the trace")), "{text}");
}

/// No collector at the socket named: the program runs untraced, output and status unchanged.
#[test]
fn an_unreachable_collector_leaves_the_program_untouched() {
    let fx = fixture("exactness");
    let bare = Command::new(&fx).output().unwrap();
    let o = Command::new(&fx).env("LD_PRELOAD", paths().preload()).env("MTRACE_SOCK", "@mtrace-nobody-listens-here").output().unwrap();
    assert_eq!(o.status.code(), bare.status.code());
    assert_eq!(o.stdout, bare.stdout);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cannot reach the collector") && err.contains("untraced"), "{err}");
}
