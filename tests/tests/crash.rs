//! Crashes: a traced program killed by SIGSEGV or SIGKILL mid-run leaves a readable trace holding
//! every event up to the crash; mtracer exits with the status a shell would give.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use mtrace_tests::*;

fn ready_line(line: &str) -> (i32, u64, u64) {
    let v: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(v[0], "ready", "{line}");
    (v[1].parse().unwrap(), v[2].parse().unwrap(), v[3].parse().unwrap())
}

fn check(trace: &std::path::Path, live: u64, blocks: u64) {
    let rep = report_json(trace);
    let p = &rep["processes"][0];
    assert_eq!(num(p, "final_live_bytes"), live);
    assert_eq!(num(p, "final_live_blocks"), blocks);
    assert_eq!(num(p, "unmatched_frees"), 0);
    assert_eq!(p["ending"], "vanished");
    assert_eq!(rep["complete"], true, "the recorder itself ended normally");
}

#[test]
fn segfault_keeps_every_event_before_it() {
    let r = record(&[], &[fixture("crash").to_str().unwrap(), "segv"], &[]);
    assert_eq!(r.code(), Some(128 + 11), "{}", r.stderr());
    let (_, live, blocks) = ready_line(r.stdout().lines().next().unwrap());
    check(&r.trace, live, blocks);
}

#[test]
fn sigkill_keeps_every_event_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("k.mtr");
    let mut child = Command::new(paths().mtracer())
        .args(["record", "-q", "-o"])
        .arg(&trace)
        .arg("--")
        .arg(fixture("crash"))
        .arg("kill")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let (pid, live, blocks) = ready_line(&line);
    // SAFETY: kill(2) on the pid the fixture printed (our grandchild).
    assert_eq!(unsafe { kill(pid, 9) }, 0);
    let st = child.wait().unwrap();
    assert_eq!(st.code(), Some(128 + 9));
    check(&trace, live, blocks);
}

unsafe extern "C" {
    fn kill(pid: i32, sig: i32) -> i32;
}
