//! No trace can crash, hang or exhaust `mtracer`: damaged variants of real recordings and of a
//! synthetic trace (see `mtrace_tests::fuzz`) are given to `report --json`, `report --partial`,
//! `export --format massif` and `view --print`; every run must end in a success or a clean
//! error, and damage to the file's bytes or frames must be reported, never analysed silently.
//!
//! `fuzz_traces_bounded` is the CI run: every systematic variant (a cut at every frame boundary
//! and inside every frame, every frame removed, duplicated, swapped), then random ones for
//! `MTRACE_FUZZ_SECONDS` (default 40). `fuzz_traces_long` (ignored; `bench/fuzz`) adds a Python
//! recording and runs `MTRACE_FUZZ_VARIANTS` (default 5000) variants to get counts. Both take
//! `MTRACE_FUZZ_SEED` (the default is fixed, so CI runs the same variants every time) and
//! `MTRACE_FUZZ_ONLY=N` (only variant N: to reproduce a failure). Failing variants are saved in
//! `target/fuzz-failures/`.

use mtrace_protocol::event::{Event, EventKind};
use mtrace_tests::fuzz::mutate::Mutation;
use mtrace_tests::fuzz::{self, Base, Config, Limits, Outcome};
use mtrace_tests::*;

const DEFAULT_SEED: u64 = 0x6d74_7261_6365_0004;

/// A recording of `cmd` (in a shell that lives a little longer, so that the trace has several
/// frames), as a base.
fn recorded(name: &str, script: &str, env: &[(&str, &str)]) -> Base {
    let r = record(&[], &["sh", "-c", &format!("{script} && sleep 0.25")], env);
    assert_eq!(r.code(), Some(0), "{name}: {}", r.stderr());
    let bytes = std::fs::read(&r.trace).unwrap();
    let b = Base::new(name, bytes).unwrap_or_else(|| panic!("{name}: the recorded trace does not read"));
    assert!(b.layout.frames.len() >= 3, "{name}: want several frames, got {}", b.layout.frames.len());
    b
}

/// The synthetic trace (deterministic) and small recordings: threads handing blocks over with a
/// fork in the middle, fork + exec, fastbins and `malloc_trim`.
fn bases() -> Vec<Base> {
    let handoff = fixture("handoff");
    let forkexec = fixture("forkexec");
    let fastbins = fixture("ret_fastbins");
    vec![
        Base::new("synthetic", synth::trace(200)).expect("the synthetic trace reads"),
        recorded("handoff", r#""$FX" rounds 2 6"#, &[("FX", handoff.to_str().unwrap()), ("HANDOFF_FORK", "mid")]),
        recorded("forkexec", r#""$FX""#, &[("FX", forkexec.to_str().unwrap())]),
        recorded("fastbins", r#""$FX" 2000"#, &[("FX", fastbins.to_str().unwrap()), ("FIXTURE_PAUSE_MS", "20")]),
    ]
}

fn config(default_seconds: Option<f64>, default_variants: Option<u64>) -> Config {
    let seconds = std::env::var("MTRACE_FUZZ_SECONDS").ok().and_then(|s| s.parse().ok()).or(default_seconds);
    Config {
        seed: fuzz::env_u64("MTRACE_FUZZ_SEED").unwrap_or(DEFAULT_SEED),
        variants: fuzz::env_u64("MTRACE_FUZZ_VARIANTS").or(default_variants),
        seconds,
        only: fuzz::env_u64("MTRACE_FUZZ_ONLY"),
        workers: std::thread::available_parallelism().map_or(2, |n| n.get()),
        limits: Limits::default(),
        failures_dir: paths().bin_dir.parent().unwrap().join("fuzz-failures"),
    }
}

fn run(bases: &[Base], cfg: &Config) {
    let names: Vec<String> = bases.iter().map(|b| format!("{} ({} bytes, {} frames)", b.name, b.layout.bytes.len(), b.layout.frames.len())).collect();
    eprintln!("bases: {}", names.join(", "));
    let stats = fuzz::fuzz(&paths().mtracer(), bases, cfg);
    eprintln!("{}", stats.summary(cfg.seed));
    assert!(stats.variants > 0);
    assert!(stats.clean(), "{} failing runs:\n{}", stats.failures.len(), stats.failures.join("\n"));
}

#[test]
fn fuzz_traces_bounded() {
    let bases = bases();
    run(&bases, &config(Some(40.0), None));
}

#[test]
#[ignore = "long: bench/fuzz runs it"]
fn fuzz_traces_long() {
    let mut bases = bases();
    bases.push(recorded("python3", "python3 -c 'import json; d = {str(i): [i] * 8 for i in range(2000)}; print(len(json.dumps(d)))' > /dev/null", &[]));
    run(&bases, &config(None, Some(5000)));
}

/// An input the fuzzer found crashing, rebuilt from the synthetic trace: what it did, and the
/// mutations that make it (found by what they hit, not by offsets).
struct Crasher {
    what: &'static str,
    recipe: fn(&fuzz::layout::Layout) -> Vec<Mutation>,
    /// A check of `report --json` on it, if any.
    check: Option<fn(&Value)>,
}

/// The size word of the first successful `malloc` set to `value`.
fn malloc_size(l: &fuzz::layout::Layout, value: u64) -> Vec<Mutation> {
    let (frame, record, word) = l.find_event(|e| matches!(e, Event::Alloc { kind: EventKind::Malloc, ptr, .. } if *ptr != 0), 0).expect("a malloc");
    vec![Mutation::EventWord { frame, record, word: word + 2, value }]
}

fn implausible(rep: &Value) {
    let n: u64 = rep["processes"].as_array().unwrap().iter().map(|p| num(&p["anomalies"], "implausible_events")).sum();
    assert!(n >= 1, "the implausible event is not counted: {}", rep["processes"][0]["anomalies"]);
}

const CRASHERS: &[Crasher] = &[
    // handoff variants 1566 and 2121 of the first long run: a malloc of 2^64 - 1 bytes that
    // succeeded made the bytes-allocated clock of the sites' series saturate; each point then
    // was due, the series halved and doubled its spacing until it wrapped to 0: a division by
    // zero (all four commands aborted).
    Crasher { what: "a successful malloc of u64::MAX bytes", recipe: |l| malloc_size(l, u64::MAX), check: Some(implausible) },
];

/// Every crashing input the fuzzer found, as a recipe over the synthetic trace: each command
/// ends in a success or a clean error.
#[test]
fn crashers_found_by_the_fuzzer_stay_fixed() {
    let base = Base::new("synthetic", synth::trace(200)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("crasher.mtr");
    for c in CRASHERS {
        let mut layout = base.layout.clone();
        let mut bytes = layout.bytes.clone();
        for m in (c.recipe)(&layout) {
            bytes = m.apply(&layout).unwrap_or_else(|| panic!("{}: {m} does not apply", c.what));
            if let Some(l) = fuzz::layout::Layout::parse(bytes.clone()) {
                layout = l;
            }
        }
        std::fs::write(&file, &bytes).unwrap();
        for args in fuzz::COMMANDS {
            let r = fuzz::run_mtracer(&paths().mtracer(), args, &file, dir.path(), Limits::default());
            assert!(matches!(r.outcome, Outcome::Success | Outcome::CleanError), "{}: `mtracer {}`: {:?}\n{}", c.what, args.join(" "), r.outcome, r.stderr);
        }
        if let Some(check) = c.check {
            check(&report_json(&file));
        }
    }
}
