//! Bad input gets a clear error, never a panic: a missing program, a missing, truncated, corrupt
//! or foreign trace, an unknown format version. A damaged trace can still be analysed up to the
//! damage with `--partial`.

use std::process::Command;

use mtrace_protocol::tracefile::{FILE_HEADER_LEN, FRAME_HEADER_LEN};
use mtrace_tests::*;

fn mtracer(args: &[&str]) -> (Option<i32>, String, String) {
    let o = Command::new(paths().mtracer()).args(args).output().unwrap();
    (o.status.code(), String::from_utf8_lossy(&o.stdout).into_owned(), String::from_utf8_lossy(&o.stderr).into_owned())
}

fn no_panic(stderr: &str) {
    assert!(!stderr.contains("panicked") && !stderr.contains("RUST_BACKTRACE"), "{stderr}");
}

#[test]
fn a_missing_program_is_reported_like_a_shell_would() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.mtr");
    let (code, _, err) = mtracer(&["record", "-o", out.to_str().unwrap(), "--", "/nonexistent/program"]);
    assert_eq!(code, Some(127));
    assert!(err.contains("cannot run `/nonexistent/program`"), "{err}");
    no_panic(&err);
}

#[test]
fn a_missing_trace_is_a_clear_error() {
    let (code, _, err) = mtracer(&["report", "/nonexistent/trace.mtr"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("cannot open /nonexistent/trace.mtr"), "{err}");
    no_panic(&err);
}

#[test]
fn foreign_and_empty_files_are_not_traces() {
    let dir = tempfile::tempdir().unwrap();
    for (name, content) in [("text.mtr", &b"hello, this is not a trace at all\n"[..]), ("empty.mtr", &b""[..])] {
        let f = dir.path().join(name);
        std::fs::write(&f, content).unwrap();
        let (code, _, err) = mtracer(&["report", f.to_str().unwrap()]);
        assert_eq!(code, Some(2), "{name}");
        assert!(err.contains("not an mtrace trace file"), "{name}: {err}");
        no_panic(&err);
    }
}

/// A trace that spans several frames: the writer cuts a frame every 100 ms while the recorder
/// has something to write (the RSS samples of a live process, every 10 ms, are enough), and the
/// shell lives half a second after the churn.
fn big_trace() -> (tempfile::TempDir, std::path::PathBuf, Vec<u8>) {
    let r = record(&[], &["sh", "-c", r#""$FX" 1 300000 && sleep 0.5"#], &[("FX", fixture("churn").to_str().unwrap())]);
    assert_eq!(r.code(), Some(0));
    let bytes = std::fs::read(&r.trace).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.mtr");
    std::fs::write(&path, &bytes).unwrap();
    (dir, path, bytes)
}

/// Offsets and stored lengths of the frames (the format: a 16-byte file header, then `MTFR`
/// frames of a 24-byte header and the stored bytes).
fn frames_of(bytes: &[u8]) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    let mut at = FILE_HEADER_LEN;
    while at + FRAME_HEADER_LEN <= bytes.len() {
        assert_eq!(&bytes[at..at + 4], b"MTFR");
        let stored = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        v.push((at, stored));
        at += FRAME_HEADER_LEN + stored;
    }
    v
}

#[test]
fn a_truncated_trace_names_the_offset_and_partial_reads_before_it() {
    let (dir, _, bytes) = big_trace();
    let frames = frames_of(&bytes);
    assert!(frames.len() >= 3, "want several frames, got {}", frames.len());
    let cut_frame = frames[frames.len() / 2].0;
    let cut = dir.path().join("cut.mtr");
    std::fs::write(&cut, &bytes[..cut_frame + 40]).unwrap();
    let (code, _, err) = mtracer(&["report", cut.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains(&format!("truncated at byte offset {cut_frame}")), "{err}");
    assert!(err.contains("--partial"), "{err}");
    no_panic(&err);
    let (code, out, err) = mtracer(&["report", "--partial", cut.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(out.contains("warning: the trace is damaged"), "{out}");
    assert!(out.contains("== image 0"), "{out}");
}

#[test]
fn a_corrupt_frame_is_caught_by_its_checksum() {
    let (dir, _, mut bytes) = big_trace();
    let frames = frames_of(&bytes);
    let (victim, stored) = frames[1];
    bytes[victim + FRAME_HEADER_LEN + stored / 2] ^= 0x5a;
    let bad = dir.path().join("bad.mtr");
    std::fs::write(&bad, &bytes).unwrap();
    let (code, _, err) = mtracer(&["report", bad.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains(&format!("corrupt at byte offset {victim}")) && err.contains("checksum"), "{err}");
    no_panic(&err);
}

#[test]
fn an_unknown_format_version_is_named() {
    let (dir, _, mut bytes) = big_trace();
    bytes[8..12].copy_from_slice(&7u32.to_le_bytes());
    let f = dir.path().join("v7.mtr");
    std::fs::write(&f, &bytes).unwrap();
    let (code, _, err) = mtracer(&["report", f.to_str().unwrap()]);
    assert_eq!(code, Some(2));
    assert!(err.contains("trace format version 7 is not supported"), "{err}");
    no_panic(&err);
}

#[test]
fn garbage_after_a_valid_prefix_never_panics() {
    let (dir, _, bytes) = big_trace();
    let frames = frames_of(&bytes);
    let f = dir.path().join("g.mtr");
    // A few deterministic mutations of header fields, lengths and payloads.
    for (i, &(at, _)) in frames.iter().take(4).enumerate() {
        for delta in [4usize, 8, 12, 20, 200] {
            let mut b = bytes.clone();
            let pos = (at + delta).min(b.len() - 1);
            b[pos] = b[pos].wrapping_add(17 * (i as u8 + 1));
            std::fs::write(&f, &b).unwrap();
            for args in [vec!["report", f.to_str().unwrap()], vec!["report", "--partial", "--json", f.to_str().unwrap()]] {
                let (code, _, err) = mtracer(&args);
                assert!(code == Some(0) || code == Some(2), "{code:?}: {err}");
                no_panic(&err);
            }
        }
    }
}

#[test]
fn a_reader_that_stops_early_is_not_an_error() {
    // `mtracer report f | head -1`: stdout closes before mtracer is done writing; mtracer must
    // exit 0 quietly, not panic on the broken pipe. `report` is closed on before it has analysed
    // the trace (its output is small enough to fit a pipe otherwise); `dump` after its first byte.
    let (_dir, path, _) = big_trace();
    for (args, read_first) in [(vec!["report", "--json"], false), (vec!["report"], false), (vec!["dump"], true)] {
        let mut child = Command::new(paths().mtracer())
            .args(&args)
            .arg(&path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        if read_first {
            let mut first = [0u8; 1];
            std::io::Read::read_exact(child.stdout.as_mut().unwrap(), &mut first).unwrap();
        }
        drop(child.stdout.take());
        let o = child.wait_with_output().unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
        no_panic(&err);
    }
}
