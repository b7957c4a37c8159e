//! Retention fixtures (`tests/fixtures/ret_*`): each reproduces one "free() does not give memory
//! back" report and prints its own ground truth per phase (`<phase>.rss`, the mallinfo2 fields,
//! `<phase>.live_bytes`; see `tests/fixtures/retention.h`). Recorded under `mtracer record`
//! with the default FIXTURE_PAUSE_MS, these tests check that
//! - the trace is exact: exit code 0, final live bytes as the fixture says, every free matched,
//!   no event lost, no anomaly;
//! - glibc really behaved as the fixture's header describes (RSS kept or dropped, mallinfo2
//!   fastbin / top / mmapped numbers, the mmap threshold, the arena count), with margins where
//!   the number includes RSS (it includes the tracer's ring pages and varies by a few pages).
//!
//! What the glibc retention model (issue 3) must conclude from these traces is asserted by the
//! model's own tests.

use mtrace_tests::*;
use std::collections::HashMap;

type Truth = HashMap<String, u64>;

const MIB: u64 = 1 << 20;

/// Record `name args` with `env`; checks exactness and returns the report's process and the
/// fixture's truth.
fn recorded(name: &str, args: &[&str], env: &[(&str, &str)]) -> (Value, Truth) {
    let fx = fixture(name);
    let mut cmd = vec![fx.to_str().unwrap()];
    cmd.extend_from_slice(args);
    let r = record(&[], &cmd, env);
    assert_eq!(r.code(), Some(0), "{name} {args:?}: {}\n{}", r.stderr(), r.stdout());
    let rep = r.report();
    let procs = rep["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1, "{rep}");
    let p = procs[0].clone();
    assert_eq!(p["ending"], "exited");
    assert_eq!(num(&p, "unmatched_frees"), 0);
    assert_eq!(num(&p, "lost_events"), 0);
    assert_eq!(anomalies(&p), vec![]);
    (p, truth(&r.stdout()))
}

fn v(t: &Truth, key: &str) -> u64 {
    *t.get(key).unwrap_or_else(|| panic!("the fixture printed no `{key}`: {t:?}"))
}

/// `a >= frac * b`, naming both values on failure.
fn at_least(t: &Truth, a: &str, frac: f64, b: &str) {
    let (x, y) = (v(t, a), v(t, b));
    assert!(x as f64 >= frac * y as f64, "{a} = {x} < {frac} × {b} = {y}");
}

/// `a < frac * b`, naming both values on failure.
fn below(t: &Truth, a: &str, frac: f64, b: &str) {
    let (x, y) = (v(t, a), v(t, b));
    assert!((x as f64) < frac * y as f64, "{a} = {x} ≥ {frac} × {b} = {y}");
}

/// A single-threaded C fixture's own blocks are all the program allocates: the report's peak is
/// the fixture's peak, and what is live at exit is what the fixture says.
fn live_bytes_exact(p: &Value, t: &Truth, peak_phase: &str) {
    assert_eq!(num(p, "peak_live_bytes"), v(t, &format!("{peak_phase}.live_bytes")));
    assert_eq!(num(p, "final_live_bytes"), v(t, "exit.live_bytes"));
}

/// 1.5 M × malloc(100), all freed: the 112-byte chunks go to fastbins (7 to the tcache), never
/// coalesce, RSS stays; malloc_trim(0) consolidates and gives the heap back.
#[test]
fn ret_fastbins_keeps_small_blocks_until_malloc_trim() {
    let _g = heavy();
    let (p, t) = recorded("ret_fastbins", &[], &[]);
    live_bytes_exact(&p, &t, "allocated");
    let count = v(&t, "allocated.live_bytes") / 100;
    assert_eq!(num(&p, "alloc_count"), count);
    assert_eq!(num(&p, "free_count"), count);
    assert!(v(&t, "allocated.arena") >= count * 112, "{t:?}");
    // Freed: every chunk but the 7 in the tcache sits in a fastbin; RSS stays.
    assert_eq!(v(&t, "freed.smblks"), count - 7);
    assert_eq!(v(&t, "freed.fsmblks"), (count - 7) * 112);
    assert_eq!(v(&t, "freed.arena"), v(&t, "allocated.arena"));
    at_least(&t, "freed.rss", 0.9, "allocated.rss");
    // malloc_trim(0): fastbins consolidated, the brk heap shrunk, RSS down by far more than 80 %.
    assert_eq!(v(&t, "trim.result"), 1);
    assert_eq!(v(&t, "trimmed.smblks"), 0);
    assert!(v(&t, "trimmed.arena") < MIB, "{t:?}");
    below(&t, "trimmed.rss", 0.2, "freed.rss");
}

/// 400 000 × malloc(500), freed in address order: they coalesce, the last free merges into top
/// and systrim gives back all but top_pad — no malloc_trim needed.
#[test]
fn ret_inorder_gives_memory_back_on_free() {
    let _g = heavy();
    let (p, t) = recorded("ret_inorder", &[], &[]);
    live_bytes_exact(&p, &t, "allocated");
    let count = v(&t, "allocated.live_bytes") / 500;
    assert_eq!(num(&p, "alloc_count"), count);
    assert!(v(&t, "allocated.arena") >= count * 512, "{t:?}");
    assert_eq!(v(&t, "freed.smblks"), 0);
    // top_pad (128 KiB) is kept, little more.
    assert!(v(&t, "freed.keepcost") >= 128 << 10, "{t:?}");
    assert!(v(&t, "freed.arena") <= 256 << 10, "{t:?}");
    below(&t, "freed.rss", 0.2, "allocated.rss");
}

/// std::map<std::string, uint64_t> with 1 M entries, clear()ed: node (80-byte chunk) and key
/// buffer (48-byte chunk) both go to fastbins; RSS stays.
#[test]
fn ret_map_clear_keeps_the_memory() {
    let _g = heavy();
    let (p, t) = recorded("ret_map", &[], &[]);
    let per_entry = v(&t, "entry.node_bytes") + v(&t, "entry.key_bytes");
    assert_eq!((v(&t, "entry.node_bytes"), v(&t, "entry.key_bytes")), (72, 33));
    let count = v(&t, "filled.live_bytes") / per_entry;
    // libstdc++ allocates its exception emergency pool before main and never frees it: the
    // map's blocks are exactly the difference between the peak and the end.
    assert_eq!(v(&t, "exit.live_bytes"), 0);
    assert_eq!(num(&p, "peak_live_bytes") - num(&p, "final_live_bytes"), v(&t, "filled.live_bytes"));
    assert_eq!(num(&p, "alloc_count") - num(&p, "free_count"), 1, "only the pool stays live");
    assert!(num(&p, "alloc_count") > 2 * count);
    // Cleared: all but 7 + 7 tcached chunks in fastbins, RSS stays.
    assert_eq!(v(&t, "cleared.smblks"), 2 * count - 14);
    assert_eq!(v(&t, "cleared.fsmblks"), (count - 7) * (80 + 48));
    assert_eq!(v(&t, "cleared.arena"), v(&t, "filled.arena"));
    at_least(&t, "cleared.rss", 0.9, "filled.rss");
}

/// 100 MiB of 8 KiB blocks under a live 100-byte pin at the top: freeing the blocks keeps
/// everything; freeing the pin (into the tcache) changes nothing either; malloc_trim(0)
/// madvises the pages away while `arena` stays.
#[test]
fn ret_pin_small_block_at_the_top_holds_the_heap() {
    let (p, t) = recorded("ret_pin", &[], &[]);
    live_bytes_exact(&p, &t, "allocated");
    assert_eq!(v(&t, "pin.above_last"), 8208, "the pin is the chunk right above the last block");
    let blocks = v(&t, "allocated.live_bytes") / 8192;
    // Freed: one free chunk of all the blocks + top; RSS stays.
    assert_eq!(v(&t, "freed.ordblks"), 2);
    assert!(v(&t, "freed.fordblks") >= blocks * 8208, "{t:?}");
    at_least(&t, "freed.rss", 0.95, "allocated.rss");
    // Unpinned: the pin went to the tcache — nothing moved at all.
    for k in ["arena", "ordblks", "uordblks", "fordblks", "keepcost"] {
        assert_eq!(v(&t, &format!("unpinned.{k}")), v(&t, &format!("freed.{k}")), "{k}");
    }
    at_least(&t, "unpinned.rss", 0.95, "allocated.rss");
    // malloc_trim(0): RSS drops, `arena` still counts the madvised pages.
    assert_eq!(v(&t, "trim.result"), 1);
    below(&t, "trimmed.rss", 0.1, "allocated.rss");
    assert!(v(&t, "trimmed.arena") >= blocks * 8208, "{t:?}");
}

/// The same with a 2000-byte pin (no tcache, no fastbin): its free merges everything into top
/// and systrim gives the heap back.
#[test]
fn ret_pin_freeing_a_large_pin_trims_the_heap() {
    let (p, t) = recorded("ret_pin", &["12800", "2000"], &[]);
    live_bytes_exact(&p, &t, "allocated");
    at_least(&t, "freed.rss", 0.95, "allocated.rss");
    below(&t, "unpinned.rss", 0.1, "allocated.rss");
    assert!(v(&t, "unpinned.arena") <= 256 << 10, "{t:?}");
}

/// ret_thresh in each mode: the 1 MiB block is always mmapped; what differs is where the
/// 512 KiB blocks go and whether their memory survives free().
fn thresh(mode: &str, env: &[(&str, &str)]) -> Truth {
    let (p, t) = recorded("ret_thresh", &[mode], env);
    live_bytes_exact(&p, &t, "allocated");
    assert_eq!(num(&p, "alloc_count"), 100 + 1 + v(&t, "pin.tries"));
    assert_eq!((v(&t, "big.mmapped"), v(&t, "big.chunk")), (1, 1_052_672));
    assert_eq!(v(&t, "big_freed.mmapped"), 0);
    t
}

/// Dynamic threshold: after the 1 MiB mmapped block is freed, 512 KiB blocks come from the brk
/// heap, and a live 64-byte block above them keeps all 50 MiB resident after free().
#[test]
fn ret_thresh_dynamic_threshold_puts_big_blocks_on_the_heap() {
    let t = thresh("dynamic", &[]);
    assert_eq!(v(&t, "mode.env_threshold"), 0);
    assert_eq!(v(&t, "allocated.mmapped_by_header"), 0);
    assert_eq!(v(&t, "allocated.mmapped"), 0);
    assert!(v(&t, "allocated.arena") >= 100 * 524_304, "{t:?}");
    assert!(v(&t, "freed.fordblks") >= 100 * 524_304, "{t:?}");
    at_least(&t, "freed.rss", 0.9, "allocated.rss");
}

/// With the threshold fixed the same blocks are mmapped and free() unmaps them.
fn fixed_threshold(t: &Truth) {
    assert_eq!(v(&t, "allocated.mmapped_by_header"), 100);
    assert_eq!(v(&t, "allocated.mmapped"), 100);
    assert_eq!(v(&t, "allocated.hblkhd"), 100 * 528_384);
    assert!(v(&t, "allocated.arena") < MIB, "{t:?}");
    assert_eq!(v(&t, "freed.mmapped"), 0);
    assert_eq!(v(&t, "freed.hblkhd"), 0);
    below(&t, "freed.rss", 0.2, "allocated.rss");
}

#[test]
fn ret_thresh_mallopt_keeps_big_blocks_mmapped() {
    let t = thresh("mallopt", &[]);
    fixed_threshold(&t);
}

#[test]
fn ret_thresh_env_keeps_big_blocks_mmapped() {
    let t = thresh("env", &[("MALLOC_MMAP_THRESHOLD_", "131072")]);
    assert_eq!(v(&t, "mode.env_threshold"), 1);
    fixed_threshold(&t);
}

/// 8 threads × 8 MiB: the arenas they really use, the memory their tcaches hold after they
/// freed everything, and the release at thread exit.
fn threads(env: &[(&str, &str)]) -> Truth {
    let _g = heavy();
    let (p, t) = recorded("ret_threads", &[], env);
    assert_eq!(num(&p, "threads"), 9, "main + 8 workers");
    // glibc's own blocks are callocs (one DTV per thread): the malloc share is the fixture's.
    assert_eq!(p["calls"]["malloc"].as_u64(), Some(v(&t, "live.blocks")));
    assert_eq!(p["final_live_by_call"]["malloc"].as_u64().unwrap_or(0), v(&t, "exit.live_bytes"));
    assert!(num(&p, "peak_live_bytes") >= v(&t, "live.live_bytes"));
    assert!(v(&t, "live.arena") >= v(&t, "live.live_bytes"));
    // Freed but alive: the tcached chunks pin a good part of every heap.
    at_least(&t, "freed_alive.rss", 0.3, "live.rss");
    at_least(&t, "freed_alive.arena", 0.3, "live.arena");
    // Exited: the tcaches were emptied, the heaps trimmed.
    below(&t, "freed.rss", 0.1, "live.rss");
    assert!(v(&t, "freed.arena") < 2 * MIB, "{t:?}");
    t
}

#[test]
fn ret_threads_get_one_arena_each() {
    let t = threads(&[]);
    assert_eq!((v(&t, "live.arenas"), v(&t, "live.main_arena_used")), (8, 0));
}

#[test]
fn ret_threads_share_two_arenas_with_malloc_arena_max_2() {
    let t = threads(&[("MALLOC_ARENA_MAX", "2")]);
    assert_eq!((v(&t, "live.arenas"), v(&t, "live.main_arena_used")), (2, 1));
}
