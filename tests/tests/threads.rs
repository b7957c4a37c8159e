//! Threads: the history is exact however blocks cross threads. Stress fixtures hand blocks from
//! thread to thread — round hand-offs behind barriers, a mutex queue, realloc of other threads'
//! blocks, swaps through atomic slots, a C++ `shared_ptr`/`unique_ptr` pool — with sizes in and
//! beyond the tcache's range, calloc and realloc, at 8, 16 and 64 threads, under glibc's default
//! set-up, one arena, two arenas and no tcache. Every run must match the fixture's own truth
//! exactly: calls, final live bytes and blocks by the call that made them, no unmatched free,
//! no anomaly of the merger, no lost event (see `mtrace_protocol::order` for why it can).
//!
//! glibc's own thread bookkeeping is excepted, by name: a thread's DTV is `calloc`ed when it is
//! created and freed only when its stack leaves glibc's stack cache, so the runs set
//! `glibc.pthread.stack_cache_size=0` (stacks, and their DTVs, are freed at join) and the
//! fixtures' truth can be compared byte for byte. `bench/stress` runs the same at length.

use mtrace_tests::*;

/// The arena set-ups every pattern runs under: (name, MALLOC_ARENA_MAX, extra tunables).
const SETUPS: [(&str, Option<&str>, &str); 4] = [
    ("default", None, ""),
    ("one arena", Some("1"), ""),
    ("two arenas", Some("2"), ""),
    ("no tcache", None, ":glibc.malloc.tcache_count=0"),
];

/// Record `fixture args` under set-up `setup`; the process's report and the fixture's truth.
fn run(fixture_name: &str, args: &[&str], setup: &(&str, Option<&str>, &str), extra_env: &[(&str, &str)]) -> (Value, std::collections::HashMap<String, u64>) {
    let _turn = heavy();
    let fx = fixture(fixture_name);
    let mut cmd = vec![fx.to_str().unwrap()];
    cmd.extend_from_slice(args);
    let tunables = format!("glibc.pthread.stack_cache_size=0{}", setup.2);
    let mut env = vec![("GLIBC_TUNABLES", tunables.as_str())];
    if let Some(n) = setup.1 {
        env.push(("MALLOC_ARENA_MAX", n));
    }
    env.extend_from_slice(extra_env);
    let r = record(&[], &cmd, &env);
    assert_eq!(r.code(), Some(0), "{fixture_name} {args:?} ({}): {}", setup.0, r.stderr());
    (r.report()["processes"][0].clone(), truth(&r.stdout()))
}

/// Nothing lost, nothing unmatched, nothing the merger had to force.
fn assert_clean(p: &Value, what: &str) {
    assert_eq!(num(p, "unmatched_frees"), 0, "{what}: {:?}", anomalies(p));
    assert_eq!(num(p, "lost_events"), 0, "{what}");
    assert_eq!(anomalies(p), vec![], "{what}");
}

/// The `handoff` fixture: calls and final live bytes and blocks, by call, exactly.
fn handoff(args: &[&str], setup: &(&str, Option<&str>, &str)) {
    handoff_with(args, setup, &[]);
}

fn handoff_with(args: &[&str], setup: &(&str, Option<&str>, &str), env: &[(&str, &str)]) -> Value {
    let (p, t) = run("handoff", args, setup, env);
    let what = format!("handoff {args:?} ({}, {env:?})", setup.0);
    assert_clean(&p, &what);
    for call in ["malloc", "calloc", "realloc"] {
        assert_eq!(p["final_live_by_call"][call].as_u64().unwrap_or(0), t[&format!("live.{call}")], "{what}: {call} bytes");
    }
    assert_eq!(num(&p, "final_live_bytes"), t["final_live_bytes"], "{what}");
    assert_eq!(num(&p, "final_live_blocks"), t["final_live_blocks"], "{what}");
    assert_eq!(p["calls"]["malloc"].as_u64().unwrap_or(0), t["calls.malloc"], "{what}");
    assert_eq!(p["calls"]["realloc"].as_u64().unwrap_or(0), t["calls.realloc"], "{what}");
    // glibc callocs each thread's DTV.
    let threads = num(&p, "threads") - 1;
    assert_eq!(p["calls"]["calloc"].as_u64().unwrap_or(0), t["calls.calloc"] + threads, "{what}");
    // ... and frees it at join, among other things of its own (`free(NULL)` included).
    assert!(p["calls"]["free"].as_u64().unwrap_or(0) >= t["calls.free"] + threads, "{what}");
    p
}

#[test]
fn round_hand_offs_behind_barriers_are_exact_in_every_arena_setup() {
    for s in &SETUPS {
        handoff(&["rounds", "8", "60"], s);
    }
}

/// Sizes all in the tcache's range: the case where glibc hands the same addresses between
/// threads fastest.
#[test]
fn round_hand_offs_of_small_blocks_are_exact() {
    for s in &SETUPS[..2] {
        handoff(&["rounds", "8", "60", "0"], s);
    }
}

#[test]
fn a_mutex_queue_from_producers_to_consumers_is_exact_in_every_arena_setup() {
    for s in &SETUPS {
        handoff(&["queue", "8", "8000"], s);
    }
}

#[test]
fn realloc_of_other_threads_blocks_is_exact_in_every_arena_setup() {
    for s in &SETUPS {
        handoff(&["realloc", "8", "15000"], s);
    }
}

#[test]
fn sixteen_and_sixty_four_threads_are_exact() {
    handoff(&["rounds", "16", "40"], &SETUPS[0]);
    handoff(&["realloc", "64", "1500"], &SETUPS[1]);
    handoff(&["queue", "64", "500"], &SETUPS[0]);
}

/// The `threads` fixture: 8 threads swap blocks through 1024 atomic slots, one operation in 16
/// reallocs another thread's block.
#[test]
fn swaps_through_atomic_slots_are_exact_in_every_arena_setup() {
    for s in &SETUPS {
        let (p, t) = run("threads", &["8", "20000"], s, &[("WITH_REALLOC", "1")]);
        let what = format!("threads ({})", s.0);
        assert_clean(&p, &what);
        assert_eq!(num(&p, "threads"), 9, "main + 8 workers");
        assert_eq!(p["calls"]["malloc"].as_u64(), Some(t["calls.malloc"]), "{what}");
        assert_eq!(p["calls"]["realloc"].as_u64(), Some(t["calls.realloc"]), "{what}");
        let fixture_live = p["final_live_by_call"]["malloc"].as_u64().unwrap_or(0) + p["final_live_by_call"]["realloc"].as_u64().unwrap_or(0);
        assert_eq!(fixture_live, t["final_live_bytes"], "{what}");
        assert_eq!(num(&p, "final_live_blocks"), t["final_live_blocks"], "{what}");
    }
}

/// A C++ pool: `shared_ptr<string>` and `unique_ptr<vector<int>>` through per-worker queues,
/// freed by whichever owner is last. The fixture counts its own `new`/`delete`; what libstdc++
/// holds of its own (its emergency exception pool) is what a run with no items leaves.
#[test]
fn a_cxx_shared_ptr_pool_is_exact_in_every_arena_setup() {
    let (base, bt) = run("shared_pool", &["6", "0"], &SETUPS[0], &[]);
    let own_bytes = num(&base, "final_live_bytes") - bt["live.new"];
    let own_blocks = num(&base, "final_live_blocks") - bt["blocks.new"];
    assert!(own_blocks <= 2, "libstdc++ keeps a block or two of its own: {own_blocks}");
    for s in &SETUPS {
        let (p, t) = run("shared_pool", &["6", "12000"], s, &[]);
        let what = format!("shared_pool ({})", s.0);
        assert_clean(&p, &what);
        assert_eq!(num(&p, "final_live_bytes"), t["live.new"] + own_bytes, "{what}");
        assert_eq!(num(&p, "final_live_blocks"), t["blocks.new"] + own_blocks, "{what}");
        assert_eq!(p["calls"]["malloc"].as_u64(), Some(t["calls.new"] + base["calls"]["malloc"].as_u64().unwrap() - bt["calls.new"]), "{what}");
    }
}

/// `MTRACE_ORDER=0` turns the ordering cells off: still recorded and analysed, and the report
/// says that threads are ordered by time alone.
/// The smallest table (2^10 cells, wrapping every 32 KiB of heap): nearly every cell is shared
/// by many live addresses, and the history is exact all the same — a shared cell only adds true
/// edges (see `mtrace_protocol::order`).
#[test]
fn a_table_whose_every_cell_is_shared_is_exact_all_the_same() {
    for (args, s) in [(&["rounds", "8", "40"][..], &SETUPS[0]), (&["realloc", "8", "10000"][..], &SETUPS[0]), (&["queue", "8", "5000"][..], &SETUPS[1])] {
        let p = handoff_with(args, s, &[("MTRACE_ORDER_CELLS", "10")]);
        assert_eq!(num(&p, "order_table_bytes"), 8 << 10, "{args:?}");
    }
}

#[test]
fn without_ordering_cells_the_report_says_so() {
    let (p, _) = run("handoff", &["queue", "4", "200"], &SETUPS[0], &[("MTRACE_ORDER", "0")]);
    assert_eq!(p["order_cells"], false, "{p}");
    assert_eq!(num(&p, "order_table_bytes"), 0, "{p}");
    let (p, _) = run("handoff", &["queue", "4", "200"], &SETUPS[0], &[]);
    assert_eq!(p["order_cells"], true);
    assert_eq!(num(&p, "order_table_bytes"), 2 << 20, "the default table: 2^18 cells");
    // Not a number of bits: the default, with a warning.
    let (p, _) = run("handoff", &["queue", "4", "200"], &SETUPS[0], &[("MTRACE_ORDER_CELLS", "lots")]);
    assert_eq!(num(&p, "order_table_bytes"), 2 << 20);
}

/// A fork child of a threaded parent: its ordering cells start empty (the parent's positions
/// name streams the child does not have), it inherits the parent's blocks, and its own threads
/// hand those blocks around again. Both images exact.
#[test]
fn a_fork_child_of_a_threaded_parent_is_exact() {
    for pattern in ["rounds", "realloc"] {
        let _turn = heavy();
        let fx = fixture("handoff");
        let r = record(&[], &[fx.to_str().unwrap(), pattern, "6", if pattern == "rounds" { "30" } else { "6000" }], &[("HANDOFF_FORK", "1"), ("GLIBC_TUNABLES", "glibc.pthread.stack_cache_size=0")]);
        assert_eq!(r.code(), Some(0), "{}", r.stderr());
        let rep = r.report();
        let t = truth(&r.stdout());
        let ps = rep["processes"].as_array().unwrap();
        assert_eq!(ps.len(), 2, "parent and fork child");
        for (p, prefix) in [(&ps[0], ""), (&ps[1], "child.")] {
            let what = format!("{pattern} {}", if prefix.is_empty() { "parent" } else { "child" });
            assert_clean(p, &what);
            assert_eq!(num(p, "final_live_bytes"), t[&format!("{prefix}final_live_bytes")], "{what}");
            assert_eq!(num(p, "final_live_blocks"), t[&format!("{prefix}final_live_blocks")], "{what}");
            for call in ["malloc", "calloc", "realloc"] {
                assert_eq!(p["final_live_by_call"][call].as_u64().unwrap_or(0), t[&format!("{prefix}live.{call}")], "{what}: {call}");
            }
        }
        assert_eq!(ps[1]["relation"], "fork", "{}", ps[1]);
    }
}

/// A fork taken while the parent's threads are alive, each with its ring block and events not
/// yet read: worker 0 forks while the other workers wait at a barrier. The child's heap is the
/// parent's at that instant, by the fork's cut (each thread's published position), not by time.
/// Besides the fixture's blocks, the child holds the DTV glibc `calloc`ed for each worker thread
/// of the parent (threads that do not exist in the child).
#[test]
fn a_fork_while_threads_run_starts_the_child_from_the_parents_heap() {
    let _turn = heavy();
    let fx = fixture("handoff");
    let workers = 6;
    let r = record(&[], &[fx.to_str().unwrap(), "rounds", &workers.to_string(), "40"], &[("HANDOFF_FORK", "mid"), ("GLIBC_TUNABLES", "glibc.pthread.stack_cache_size=0")]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let rep = r.report();
    let t = truth(&r.stdout());
    let ps = rep["processes"].as_array().unwrap();
    assert_eq!(ps.len(), 2, "parent and fork child");
    assert_eq!(ps[1]["relation"], "fork");
    for (p, prefix) in [(&ps[0], ""), (&ps[1], "child.")] {
        let what = if prefix.is_empty() { "parent" } else { "child" };
        assert_clean(p, what);
        for call in ["malloc", "realloc"] {
            assert_eq!(p["final_live_by_call"][call].as_u64().unwrap_or(0), t[&format!("{prefix}live.{call}")], "{what}: {call}");
        }
    }
    let child = &ps[1];
    assert_eq!(num(child, "final_live_blocks"), t["child.final_live_blocks"] + workers, "the child's blocks and one DTV per worker");
    let dtvs = child["final_live_by_call"]["calloc"].as_u64().unwrap() - t["child.live.calloc"];
    assert!(dtvs > 0 && dtvs % workers == 0, "{dtvs} bytes of DTVs for {workers} threads");
    assert_eq!(num(&ps[0], "final_live_blocks"), t["final_live_blocks"]);
}
