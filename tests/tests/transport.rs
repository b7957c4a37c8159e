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
