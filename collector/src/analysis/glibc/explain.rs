//! Causes in plain words, each tied to evidence in the model, and what would change them, with
//! the bytes the model expects back.

use super::arena::{Arena, State};
use super::breakdown::Breakdown;
use super::{human, GlibcModel};
use crate::analysis::live::LiveModel;

#[derive(Clone, Debug, serde::Serialize)]
pub struct Cause {
    /// `fastbins`, `tcache`, `bins`, `top_pinned`, `top`, `mmap_threshold`, `arenas`,
    /// `released`, `mmapped_rounding`, `metadata`, `returned` (memory that went back since the
    /// peak).
    pub kind: &'static str,
    /// The arena it is about ("main", an address), when one.
    pub arena: Option<String>,
    pub bytes: u64,
    pub text: String,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Remedy {
    /// `malloc_trim(0)`, `M_MMAP_THRESHOLD`, `MALLOC_ARENA_MAX`, `M_MXFAST`.
    pub action: &'static str,
    /// Resident bytes the model expects to go back to the OS (an upper bound where so said).
    pub bytes_returned: u64,
    pub text: String,
}

fn arena_name(a: &Arena) -> String {
    if a.is_main() { "the main arena".into() } else { format!("thread arena {:#x}", a.id) }
}

fn arena_id(a: &Arena) -> Option<String> {
    Some(if a.is_main() { "main".into() } else { format!("{:#x}", a.id) })
}

/// Is `bytes` worth a sentence, for a process holding `held`?
fn significant(bytes: u64, held: u64) -> bool {
    bytes >= 64 << 10 && bytes * 50 >= held
}

/// Causes, largest first.
pub fn causes(g: &GlibcModel, live: &LiveModel, b: &Breakdown, start_ns: u64) -> Vec<Cause> {
    let held = b.os_held_bytes;
    let mut out = Vec::new();
    let t_of = |ptr: u64| live.live.get(&ptr).map(|bl| bl.time_ns.saturating_sub(start_ns) as f64 / 1e9);
    for a in &g.arenas {
        // Fastbins, by size class.
        if significant(a.t.fast, held) {
            let mut by: Vec<(u64, u64)> = a.fastbins.iter().enumerate().map(|(i, v)| ((i as u64 + 2) * 16, v.len() as u64)).filter(|&(_, n)| n > 0).collect();
            by.sort_by_key(|&(s, n)| std::cmp::Reverse(s * n));
            let what = match by.as_slice() {
                [(s, n)] => format!("{} of freed {s}-byte chunks ({n} chunks, requests of {}–{} B)", human(s * n), if *s > 32 { s - 23 } else { 0 }, s - 8),
                [(s, n), ..] => format!("{} of freed small chunks (mostly {s}-byte: {})", human(a.t.fast), human(s * n)),
                [] => human(a.t.fast),
            };
            out.push(Cause {
                kind: "fastbins",
                arena: arena_id(a),
                bytes: a.t.fast,
                text: format!(
                    "{what} sit in fastbins of {}; fastbin chunks never coalesce or go back to the OS until consolidated, which only a request of 1009 B or more, a request the top cannot serve, a free that merges to 64 KiB, mallopt or malloc_trim does",
                    arena_name(a)
                ),
            });
        }
        // Free chunks in the bins.
        let bins = a.t.free - a.t.released.min(a.t.free);
        if significant(bins, held) {
            let largest = a.bins.iter().next_back().map_or(0, |&(s, _)| s);
            out.push(Cause {
                kind: "bins",
                arena: arena_id(a),
                bytes: bins,
                text: format!(
                    "{} are free inside the heap of {} in {} free chunks between live blocks (the largest {}); glibc reuses them but returns them only with malloc_trim",
                    human(bins),
                    arena_name(a),
                    a.t.free_count,
                    human(largest)
                ),
            });
        }
        // The top, and what pins it.
        let free_below = a.t.tcache + a.t.fast + a.t.free;
        if significant(free_below, held) {
            // A fast chunk at the top is the fastbins' story, told above.
            if let Some((addr, c)) = a.top_neighbour().filter(|(_, c)| c.state != State::Fast) {
                let (who, when) = match c.state {
                    State::InUse { req } => {
                        let t = t_of(addr + 16).map(|t| format!(" allocated at {t:.2} s")).unwrap_or_default();
                        (format!("a live {req}-byte block at {:#x}", addr + 16), t)
                    }
                    State::Tcache { .. } => (format!("a freed {}-byte chunk held in a thread's tcache", c.size), String::new()),
                    State::Fast => (format!("a freed {}-byte chunk in a fastbin", c.size), String::new()),
                    State::Meta => (format!("glibc's own {}-byte chunk", c.size), String::new()),
                    State::Unseen => (format!("a {}-byte chunk the trace did not show being allocated", c.size), String::new()),
                    State::Free => (String::from("a free chunk"), String::new()),
                };
                out.push(Cause {
                    kind: "top_pinned",
                    arena: arena_id(a),
                    bytes: free_below,
                    text: format!(
                        "the heap top of {} is pinned by {who}{when}: the {} of free chunks below it (the tcache, fastbin and bin bytes) cannot be given back by shrinking the heap",
                        arena_name(a),
                        human(free_below)
                    ),
                });
            }
        }
        let top = a.top_size();
        if significant(top, held) {
            let thr = g.params.trim_threshold;
            let text = if top >= thr {
                format!(
                    "the top chunk of {} holds {}, above the trim threshold of {}: glibc trims only when a free merges 64 KiB or more{}",
                    arena_name(a),
                    human(top),
                    human(thr),
                    if a.is_main() { ", or on malloc_trim" } else { "" }
                )
            } else {
                format!(
                    "the top chunk of {} keeps {}, under the trim threshold of {}{}: glibc keeps that much for reuse",
                    arena_name(a),
                    human(top),
                    human(thr),
                    if g.params.changes.iter().any(|c| c.dynamic && c.new > c.old) { " (raised by the dynamic mmap threshold)" } else { "" }
                )
            };
            out.push(Cause { kind: "top", arena: arena_id(a), bytes: top, text });
        }
    }
    if significant(b.categories.tcache, held) {
        let n = g.tcache_threads();
        out.push(Cause {
            kind: "tcache",
            arena: None,
            bytes: b.categories.tcache,
            text: format!(
                "{} of freed chunks sit in the tcaches of {n} thread(s): up to {} chunks per size class up to {} B per thread, kept until the thread exits; malloc_trim does not touch them",
                human(b.categories.tcache),
                g.params.tcache_count,
                g.params.tcache_max_chunk
            ),
        });
    }
    for c in &g.params.changes {
        if c.dynamic && c.new > c.old && c.heap_allocations_between > 0 {
            out.push(Cause {
                kind: "mmap_threshold",
                arena: None,
                bytes: c.heap_bytes_between,
                text: format!(
                    "the mmap threshold rose from {} to {} at {:.2} s ({}); {} later allocations between {} and {} ({}) came from the heap, where freed memory stays, instead of their own mappings",
                    human(c.old),
                    human(c.new),
                    c.t_s,
                    c.cause,
                    c.heap_allocations_between,
                    human(c.old),
                    human(c.new),
                    human(c.heap_bytes_between)
                ),
            });
        }
    }
    let thread_arenas: Vec<&Arena> = g.arenas.iter().filter(|a| !a.is_main()).collect();
    let ta_held: u64 = thread_arenas.iter().map(|a| a.held()).sum();
    if !thread_arenas.is_empty() && significant(ta_held, held) {
        out.push(Cause {
            kind: "arenas",
            arena: None,
            bytes: ta_held,
            text: format!(
                "{} thread arena(s) hold {} ({} of it free); the arena limit is {} ({}){}",
                thread_arenas.len(),
                human(ta_held),
                human(thread_arenas.iter().map(|a| a.held() - a.t.inuse.min(a.held())).sum()),
                g.params.arena_limit,
                g.params.arena_limit_source,
                if g.params.arena_limit > 2 { "; MALLOC_ARENA_MAX=2 would cap arenas at 2" } else { "" }
            ),
        });
    }
    if significant(b.categories.released, held) {
        out.push(Cause {
            kind: "released",
            arena: None,
            bytes: b.categories.released,
            text: format!(
                "{} inside free chunks were already returned to the OS with madvise (malloc_trim): still part of the heap and of mallinfo2().arena, but not resident",
                human(b.categories.released)
            ),
        });
    }
    if significant(b.categories.mmapped_rounding, held) {
        out.push(Cause {
            kind: "mmapped_rounding",
            arena: None,
            bytes: b.categories.mmapped_rounding,
            text: format!("{} are page rounding and headers of {} mmapped blocks", human(b.categories.mmapped_rounding), g.mmapped.len()),
        });
    }
    if significant(b.categories.metadata, held) {
        out.push(Cause {
            kind: "metadata",
            arena: None,
            bytes: b.categories.metadata,
            text: format!("{} are glibc's own: arena and heap headers, tcache structs, and chunks the trace did not show", human(b.categories.metadata)),
        });
    }
    // What went back.
    let gone = g.peak_os_held.saturating_sub(held);
    if gone >= 1 << 20 && gone * 2 >= g.peak_os_held {
        out.push(Cause {
            kind: "returned",
            arena: None,
            bytes: gone,
            text: format!(
                "{} of the {} held at the peak ({:.2} s) went back to the OS: freed memory merged into the top and glibc trimmed the heap, or freed mmapped blocks were unmapped",
                human(gone),
                human(g.peak_os_held),
                g.peak_os_held_ns.saturating_sub(start_ns) as f64 / 1e9
            ),
        });
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.bytes));
    out
}

/// What `malloc_trim(0)` would return now: (madvised, heap shrink), resident bytes.
pub fn predict_trim(g: &GlibcModel, pad: u64) -> (u64, u64) {
    g.arenas.iter().map(|a| a.predict_trim(pad)).fold((0, 0), |(m, s), (a, b)| (m + a, s + b))
}

/// Remedies, most effective first.
pub fn remedies(g: &GlibcModel, b: &Breakdown) -> Vec<Remedy> {
    let mut out = Vec::new();
    let (madv, shrink) = predict_trim(g, 0);
    if madv + shrink > 0 {
        out.push(Remedy {
            action: "malloc_trim(0)",
            bytes_returned: madv + shrink,
            text: format!(
                "calling malloc_trim(0) would return about {}: {} of whole free pages inside the heaps (madvise) and {} by shrinking the main heap's top; tcache chunks stay",
                human(madv + shrink),
                human(madv),
                human(shrink)
            ),
        });
    }
    let rises: Vec<_> = g.params.changes.iter().filter(|c| c.dynamic && c.new > c.old && c.heap_allocations_between > 0).collect();
    if !rises.is_empty() {
        let bytes: u64 = rises.iter().map(|c| c.heap_bytes_between).sum();
        let free_heap: u64 = g.arenas.iter().map(|a| a.t.free + a.t.fast + a.top_size()).sum();
        out.push(Remedy {
            action: "M_MMAP_THRESHOLD",
            bytes_returned: bytes.min(free_heap),
            text: format!(
                "mallopt(M_MMAP_THRESHOLD, {0}) at startup, or MALLOC_MMAP_THRESHOLD_={0} in the environment, fixes the threshold: blocks of {1} and more get their own mappings, returned to the OS on free (up to {2} now free in the heap)",
                rises[0].old,
                human(rises[0].old),
                human(bytes.min(free_heap))
            ),
        });
    }
    let thread_arenas: Vec<&Arena> = g.arenas.iter().filter(|a| !a.is_main()).collect();
    if thread_arenas.len() >= 2 && g.params.arena_limit > 2 {
        let free: u64 = thread_arenas.iter().map(|a| a.held() - a.t.inuse.min(a.held())).sum();
        out.push(Remedy {
            action: "MALLOC_ARENA_MAX",
            bytes_returned: free,
            text: format!(
                "MALLOC_ARENA_MAX=2 caps arenas at 2 (now {} in use): threads share arenas and their free space (up to {} held free by thread arenas now), at the cost of lock contention",
                thread_arenas.len() + 1,
                human(free)
            ),
        });
    }
    if significant(b.categories.fastbins, b.os_held_bytes) && g.params.max_fast > 16 {
        out.push(Remedy {
            action: "M_MXFAST",
            bytes_returned: 0,
            text: "mallopt(M_MXFAST, 0) or GLIBC_TUNABLES=glibc.malloc.mxfast=0 turns fastbins off: small frees coalesce at once and the heap can shrink".into(),
        });
    }
    out.sort_by_key(|r| std::cmp::Reverse(r.bytes_returned));
    out
}
