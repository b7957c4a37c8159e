//! Ground truth for the glibc retention model: the preload's `mallinfo2()` checkpoints (around
//! `malloc_trim`, periodic, at exit) must hold exactly what the program itself reads from
//! `mallinfo2()`, and the recorder's `/proc/<pid>/smaps` samples must show the brk heap resident.
//! The trace is read back with `mtracer dump`, which prints every event and record.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Stdio};

use mtrace_tests::*;

/// The mallinfo2 fields the fixture prints and the checkpoints carry.
const FIELDS: [&str; 9] = ["arena", "ordblks", "smblks", "hblks", "hblkhd", "fsmblks", "uordblks", "fordblks", "keepcost"];

/// One event of a dumped trace: the stream it is in and its text (`Mallinfo { reason: … }`).
struct Ev {
    image: u32,
    stream: u32,
    text: String,
}

/// One `Smaps` record: (kind, rss) per mapping.
struct Smaps {
    image: u32,
    maps: Vec<(String, u64)>,
}

struct Dumped {
    events: Vec<Ev>,
    smaps: Vec<Smaps>,
}

impl Dumped {
    fn checkpoints(&self, reason: &str) -> Vec<&Ev> {
        self.events.iter().filter(|e| e.text.starts_with(&format!("Mallinfo {{ reason: {reason},"))).collect()
    }
}

fn dump(trace: &Path) -> Dumped {
    let o = Command::new(paths().mtracer()).arg("dump").arg(trace).output().unwrap();
    assert!(o.status.success(), "mtracer dump failed:\n{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8(o.stdout).unwrap();
    let mut d = Dumped { events: Vec::new(), smaps: Vec::new() };
    let mut chunk = None;
    let mut in_smaps = false;
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if line.starts_with("chunk image ") {
            chunk = Some((w[2].parse().unwrap(), w[4].parse().unwrap()));
            in_smaps = false;
        } else if line.starts_with("smaps image ") {
            d.smaps.push(Smaps { image: w[2].parse().unwrap(), maps: Vec::new() });
            in_smaps = true;
        } else if line.starts_with("  ") && in_smaps {
            // `  0x…-0x… KIND rss N`
            d.smaps.last_mut().unwrap().maps.push((w[1].to_string(), w[3].parse().unwrap()));
        } else if line.starts_with("  ") {
            // `  seq:word Event…`
            let (image, stream) = chunk.expect("an event outside a chunk");
            d.events.push(Ev { image, stream, text: line.trim_start().split_once(' ').unwrap().1.to_string() });
        } else {
            chunk = None;
            in_smaps = false;
        }
    }
    d
}

/// `name: number` pairs of an event's text.
fn fields(text: &str) -> HashMap<String, u64> {
    text.split([',', '{', '}'])
        .filter_map(|kv| {
            let (k, v) = kv.split_once(':')?;
            Some((k.trim().to_string(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The checkpoints around the one malloc_trim: on the trimming thread, in the order
/// BeforeTrim, MallocTrim, AfterTrim, each holding what the fixture's own mallinfo2() said.
fn check_trim(d: &Dumped, stdout: &str) -> (u32, u32) {
    let trims: Vec<&Ev> = d.events.iter().filter(|e| e.text.starts_with("MallocTrim ")).collect();
    assert_eq!(trims.len(), 1, "one malloc_trim");
    let (image, stream) = (trims[0].image, trims[0].stream);
    let mine: Vec<&Ev> = d.events.iter().filter(|e| e.image == image && e.stream == stream).collect();
    let at = |prefix: &str| {
        let i: Vec<usize> = mine.iter().enumerate().filter(|(_, e)| e.text.starts_with(prefix)).map(|(i, _)| i).collect();
        assert_eq!(i.len(), 1, "exactly one `{prefix}` on the trimming thread");
        i[0]
    };
    let (b, t, a) = (at("Mallinfo { reason: BeforeTrim,"), at("MallocTrim "), at("Mallinfo { reason: AfterTrim,"));
    assert!(b < t && t < a, "order: before {b}, trim {t}, after {a}");
    assert!(mine[b + 1..a].iter().all(|e| !e.text.starts_with("Mallinfo")), "nothing else checkpointed in between");
    assert_eq!(fields(&mine[t].text)["result"], truth(stdout)["trim"], "malloc_trim's result");
    for (role, i) in [("before", b), ("after", a)] {
        let want = role_line(stdout, role);
        let got = fields(&mine[i].text);
        for k in ["arena", "fordblks", "uordblks", "hblkhd"].iter().chain(FIELDS.iter()) {
            assert_eq!(got[*k], want[*k], "{role} malloc_trim: `{k}` of the checkpoint vs the program's mallinfo2()\n{}", mine[i].text);
        }
    }
    let (before, after) = (role_line(stdout, "before"), role_line(stdout, "after"));
    assert!(before["hblkhd"] > 0, "the fixture keeps an mmapped chunk: {before:?}");
    assert!(after["arena"] < before["arena"] || after["fordblks"] < before["fordblks"], "the trim released something: {before:?} {after:?}");
    (image, stream)
}

fn heap_resident(d: &Dumped, image: u32) -> bool {
    d.smaps.iter().filter(|s| s.image == image).any(|s| s.maps.iter().any(|(k, rss)| k == "heap" && *rss > 0))
}

#[test]
fn checkpoints_hold_glibc_books_and_smaps_shows_the_heap() {
    let fx = fixture("mallinfo");
    let r = record(&[], &[fx.to_str().unwrap()], &[("MTRACE_MALLINFO_MS", "100")]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let out = r.stdout();
    assert_eq!(truth(&out)["threads"], 2, "the program and the preload's sampler thread:\n{out}");
    let d = dump(&r.trace);
    let (image, main) = check_trim(&d, &out);

    let periodic = d.checkpoints("Periodic");
    assert!(!periodic.is_empty(), "a 300 ms sleep with a 100 ms period");
    assert!(periodic.iter().all(|e| e.image == image && e.stream != main), "periodic checkpoints come from the sampler's own stream");
    assert!(periodic.iter().all(|e| fields(&e.text)["arena"] > 0));
    let exit = d.checkpoints("Exit");
    assert_eq!(exit.len(), 1, "one exit checkpoint per process");
    assert_eq!((exit[0].image, exit[0].stream), (image, main), "on the exiting thread");

    assert!(d.smaps.iter().any(|s| s.image == image), "smaps samples (every 100 ms by default)");
    assert!(heap_resident(&d, image), "a sample with the [heap] resident");

    let rep = r.report();
    let p = &rep["processes"][0];
    assert_eq!(num(p, "threads"), 1, "the sampler thread is not an application thread");
    assert_eq!(num(p, "unmatched_frees"), 0);
    assert_eq!(anomalies(p), vec![]);
}

#[test]
fn no_sampler_thread_and_no_smaps_when_disabled() {
    let fx = fixture("mallinfo");
    let r = record(&["--smaps-interval-ms", "0"], &[fx.to_str().unwrap()], &[("MTRACE_MALLINFO_MS", "0")]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let out = r.stdout();
    assert_eq!(truth(&out)["threads"], 1, "no extra thread:\n{out}");
    let d = dump(&r.trace);
    check_trim(&d, &out);
    assert!(d.checkpoints("Periodic").is_empty());
    assert_eq!(d.checkpoints("Exit").len(), 1);
    assert!(d.smaps.is_empty(), "--smaps-interval-ms 0 samples nothing");
    let rep = r.report();
    assert_eq!(num(&rep["processes"][0], "threads"), 1);
}

/// Plain LD_PRELOAD: the standalone agent samples smaps too, and takes its last sample while the
/// exiting program waits for it.
#[test]
fn standalone_preload_records_checkpoints_and_smaps() {
    let fx = fixture("mallinfo");
    let dir = tempfile::tempdir().unwrap();
    let trace = dir.path().join("t.mtr");
    let o = Command::new(&fx)
        .env("LD_PRELOAD", paths().preload())
        .env("MTRACE_OUTPUT", &trace)
        .env("MTRACE_MALLINFO_MS", "100")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let out = String::from_utf8_lossy(&o.stdout).into_owned();
    // The report waits for the agent to finish the file.
    let rep = report_json(&trace);
    assert_eq!(num(&rep["processes"][0], "threads"), 1);
    let d = dump(&trace);
    let (image, _) = check_trim(&d, &out);
    assert!(!d.checkpoints("Periodic").is_empty());
    assert_eq!(d.checkpoints("Exit").len(), 1);
    assert!(heap_resident(&d, image), "a sample with the [heap] resident");
}
