//! The trace format across versions: version 4 traces (lz4 frames, raw event words), recorded by
//! the mtracer before the compact encoding and kept in `tests/data/` with what their programs
//! printed, still read exactly; the compact chunks of version 5 are checked, and a damaged one
//! is an error at its frame's offset that `--partial` reads up to.

use mtrace_tests::fuzz::layout::Layout;
use mtrace_tests::*;

fn data(name: &str) -> std::path::PathBuf {
    paths().workspace.join("tests/data").join(name)
}

fn version_of(path: &std::path::Path) -> u32 {
    let b = std::fs::read(path).unwrap();
    u32::from_le_bytes(b[8..12].try_into().unwrap())
}

#[test]
fn version_4_traces_are_still_read_exactly() {
    // The exactness fixture: every entry point, its own truth.
    let t = data("v4-exactness.mtr");
    assert_eq!(version_of(&t), 4);
    let truth = truth(&std::fs::read_to_string(data("v4-exactness.truth")).unwrap());
    assert!(truth.len() >= 25, "{truth:?}");
    let rep = report_json(&t);
    let p = &rep["processes"][0];
    for (k, want) in &truth {
        let got = match k.strip_prefix("calls.") {
            Some(f) => p["calls"][f].as_u64().unwrap_or(0),
            None => num(p, k),
        };
        assert_eq!(got, *want, "{k}");
    }
    assert_eq!((num(p, "unmatched_frees"), num(p, "lost_events")), (0, 0));

    // Three threads handing blocks over (ordering cells, after words, several streams; glibc's
    // stack cache off, so that the DTVs are freed at join).
    let t = data("v4-handoff.mtr");
    assert_eq!(version_of(&t), 4);
    let want = mtrace_tests::truth(&std::fs::read_to_string(data("v4-handoff.truth")).unwrap());
    let rep = report_json(&t);
    let p = &rep["processes"][0];
    assert_eq!(num(p, "final_live_bytes"), want["final_live_bytes"]);
    assert_eq!(num(p, "final_live_blocks"), want["final_live_blocks"]);
    for call in ["malloc", "calloc", "realloc"] {
        assert_eq!(p["final_live_by_call"][call].as_u64().unwrap_or(0), want[&format!("live.{call}")], "{call}");
    }
    assert_eq!(p["calls"]["malloc"].as_u64(), Some(want["calls.malloc"]));
    assert_eq!((num(p, "unmatched_frees"), num(p, "lost_events")), (0, 0));
    assert_eq!(anomalies(p), vec![]);

    // Every other reader takes them too.
    for args in [&["export", "--format", "massif"][..], &["export", "--format", "csv"], &["view", "--print", "100x30"], &["dump"]] {
        let o = std::process::Command::new(paths().mtracer()).args(args).arg(&t).output().unwrap();
        assert!(o.status.success(), "mtracer {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        assert!(!o.stdout.is_empty(), "mtracer {args:?}");
    }
}

/// A recording now is version 5, its chunks compact: far smaller than their words.
#[test]
fn recordings_are_version_5_with_compact_chunks() {
    // glibc's stack cache off: the thread's DTV is freed at join (see tests/tests/threads.rs).
    let r = record(&[], &[fixture("mixed").to_str().unwrap(), "1", "200000"], &[("GLIBC_TUNABLES", "glibc.pthread.stack_cache_size=0")]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    assert_eq!(version_of(&r.trace), 5);
    let bytes = std::fs::read(&r.trace).unwrap();
    let layout = Layout::parse(bytes.clone()).expect("the trace reads");
    let chunks: Vec<_> = layout.frames.iter().flat_map(|f| f.records.iter().filter_map(|r| r.chunk.as_ref())).collect();
    assert!(!chunks.is_empty());
    assert!(chunks.iter().all(|c| c.encoding == mtrace_protocol::tracefile::chunk_encoding::COMPACT));
    let words: usize = chunks.iter().map(|c| c.chunk.words.len()).sum();
    let events: u64 = r.stdout().lines().filter(|l| l.starts_with("thread ")).map(|l| l.split_whitespace().nth(3).unwrap().parse::<u64>().unwrap()).sum();
    // A free and an allocation per iteration, or one realloc (1 in 16).
    assert!(events > 200_000 * 3 / 2, "{events}");
    // The raw words are 3-5 per event; the file holds a fraction of them.
    assert!(words as u64 >= 3 * events, "{words} words for {events} events");
    assert!((bytes.len() as u64) < words as u64 * 8 / 3, "{} bytes for {words} words", bytes.len());
    let rep = r.report();
    let p = &rep["processes"][0];
    assert_eq!((num(p, "unmatched_frees"), num(p, "lost_events")), (0, 0));
    assert_eq!((num(p, "final_live_blocks"), num(p, "final_live_bytes")), (0, 0), "the fixture frees its window");
}

/// A compact chunk whose word count is wrong (its frame's checksum made right: the damage got in
/// before the file was written) is an error at the frame's offset; `--partial` reads the frames
/// before it.
#[test]
fn a_damaged_compact_chunk_is_an_error_at_its_frame() {
    let r = record(&[], &["sh", "-c", r#""$FX" 1 300000 && sleep 0.5"#], &[("FX", fixture("mixed").to_str().unwrap())]);
    assert_eq!(r.code(), Some(0));
    let layout = Layout::parse(std::fs::read(&r.trace).unwrap()).unwrap();
    let (fi, ri) = *layout.chunks().last().expect("a chunk");
    assert!(fi > 0, "the damaged chunk should not be in the first frame");
    let f = &layout.frames[fi];
    let at = f.records[ri].at;
    let mut raw = f.raw.clone();
    // The word count follows the record header (8 bytes) and the chunk's six u32 fields.
    let count_at = at + 8 + 24;
    let n = u32::from_le_bytes(raw[count_at..count_at + 4].try_into().unwrap());
    raw[count_at..count_at + 4].copy_from_slice(&(n + 1).to_le_bytes());
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.mtr");
    std::fs::write(&bad, layout.with_payload(fi, &raw)).unwrap();
    let o = std::process::Command::new(paths().mtracer()).args(["report"]).arg(&bad).output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains(&format!("corrupt at byte offset {}", f.offset)), "{err}");
    assert!(err.contains(&format!("not the {} it announces", n + 1)), "{err}");
    let o = std::process::Command::new(paths().mtracer()).args(["report", "--partial"]).arg(&bad).output().unwrap();
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(out.contains("warning: the trace is damaged"), "{out}");
}
