//! Threads: 8 threads swap blocks through shared slots, so most blocks are freed by another
//! thread than the one that allocated them and addresses are reused across threads all the time.
//! The final live bytes of the fixture's blocks must be exact, every free matched, no event lost.
//!
//! glibc itself keeps a few blocks (one calloc'd DTV per thread, some freed at join): the
//! fixture's truth is compared with the report's `malloc` share of the final live bytes.

use mtrace_tests::*;

fn run(env: &[(&str, &str)], args: &[&str]) -> (Value, std::collections::HashMap<String, u64>) {
    let _turn = heavy();
    let fx = fixture("threads");
    let mut cmd = vec![fx.to_str().unwrap()];
    cmd.extend_from_slice(args);
    let r = record(&[], &cmd, env);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let rep = r.report();
    (rep["processes"][0].clone(), truth(&r.stdout()))
}

/// Interventions of the merger (blocks admitted out of order, forced frees, dropped stamp
/// edges): each is flagged in the report.
fn interventions(p: &Value) -> u64 {
    ["reordered_blocks", "forced_events", "ignored_stamps"].iter().map(|k| p["anomalies"][k].as_u64().unwrap()).sum()
}

fn check_exact(p: &Value, t: &std::collections::HashMap<String, u64>) {
    assert_eq!(num(p, "threads"), 9, "main + 8 workers");
    assert_eq!(p["calls"]["malloc"].as_u64(), Some(t["calls.malloc"]));
    assert_eq!(p["final_live_by_call"]["malloc"].as_u64(), Some(t["final_live_bytes"]), "{p}");
    assert_eq!(num(p, "unmatched_frees"), 0);
    assert_eq!(num(p, "lost_events"), 0);
    // Rare (measured: 2 of 60 runs needed one; the result was exact all the same).
    assert!(interventions(p) <= 10, "{:?}", anomalies(p));
}

#[test]
fn cross_thread_frees_with_per_thread_arenas() {
    let (p, t) = run(&[], &["8", "20000"]);
    check_exact(&p, &t);
}

/// One arena for all threads and no tcache: every freed block goes back to shared bins, and the
/// next thread to allocate that size gets the address another thread just freed, thousands of
/// times per millisecond — the hardest case for ordering. Measured over 140 runs: exact in ~99 %;
/// in the rest a few blocks were admitted out of order and the report said so. Never silent.
#[test]
fn cross_thread_address_reuse_through_one_shared_arena() {
    let (p, t) = run(&[("MALLOC_ARENA_MAX", "1"), ("GLIBC_TUNABLES", "glibc.malloc.tcache_count=0")], &["8", "20000"]);
    assert_eq!(p["calls"]["malloc"].as_u64(), Some(t["calls.malloc"]));
    assert_eq!(num(&p, "lost_events"), 0);
    let exact = p["final_live_by_call"]["malloc"].as_u64() == Some(t["final_live_bytes"]) && num(&p, "unmatched_frees") == 0;
    assert!(exact || interventions(&p) > 0, "inexact and unflagged: {p}");
    assert!(interventions(&p) <= 50, "{:?}", anomalies(&p));
}

#[test]
fn cross_thread_address_reuse_through_two_arenas() {
    let (p, t) = run(&[("MALLOC_ARENA_MAX", "2")], &["8", "20000"]);
    check_exact(&p, &t);
}

/// Cross-thread realloc of other threads' blocks in a storm: the copy a moving realloc makes can
/// erase the stamps that order the reuse of its new address, and within one pass of the
/// collector nothing else may. Counts stay exact and the report never hides a guess: either the
/// result is exact or the ordering anomalies say the merger had to reorder.
#[test]
fn realloc_storm_is_exact_or_says_it_is_not() {
    let (p, t) = run(&[("WITH_REALLOC", "1")], &["8", "20000"]);
    assert_eq!(p["calls"]["malloc"].as_u64(), Some(t["calls.malloc"]));
    assert_eq!(p["calls"]["realloc"].as_u64(), Some(t["calls.realloc"]));
    assert_eq!(num(&p, "lost_events"), 0);
    let fixture_live = p["final_live_by_call"]["malloc"].as_u64().unwrap_or(0) + p["final_live_by_call"]["realloc"].as_u64().unwrap_or(0);
    if fixture_live != t["final_live_bytes"] {
        let a = anomalies(&p);
        assert!(a.iter().any(|(k, _)| k == "reordered_blocks" || k == "forced_events"), "inexact and unflagged: {a:?}");
    }
}
