//! The report as text for a terminal.

use std::fmt::Write;

use super::{Ending, ProcessReport, Report};

/// `1234567` → `1.18 MiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.2} {}", UNITS[u]) }
}

pub fn render(r: &Report) -> String {
    let mut s = String::new();
    if !r.command.is_empty() {
        let _ = writeln!(s, "command: {}", r.command.join(" "));
    }
    if let Some(st) = r.exit_status {
        let _ = writeln!(s, "exit status: {st}");
    }
    if let Some(d) = &r.damage {
        let _ = writeln!(s, "warning: the trace is damaged; showing what comes before: {d}");
    } else if !r.complete {
        let _ = writeln!(s, "warning: the recording did not end normally (recorder killed?); showing what was saved");
    }
    for n in &r.notes {
        let _ = writeln!(s, "note: {n}");
    }
    for p in &r.processes {
        s.push('\n');
        process(&mut s, p, r.lossy);
    }
    s
}

fn process(s: &mut String, p: &ProcessReport, lossy: bool) {
    let relation = match p.relation {
        crate::analysis::image::Relation::Root => String::new(),
        rel => format!(" ({} of image {})", serde_json::to_value(rel).unwrap().as_str().unwrap_or(""), p.parent_image.unwrap_or(0)),
    };
    let _ = writeln!(s, "== image {}: pid {} {}{}", p.image, p.pid, p.exe, relation);
    if !p.args.is_empty() {
        let _ = writeln!(s, "   args: {}", p.args.join(" "));
    }
    let ending = match p.ending {
        Ending::Exited => "exited".to_string(),
        Ending::Vanished => "vanished (killed or crashed)".to_string(),
        Ending::Exec => "replaced by exec".to_string(),
        Ending::Detached => "still running when the recording stopped".to_string(),
        Ending::Unknown => "unknown (the trace ends first)".to_string(),
    };
    let _ = writeln!(s, "   {:.3} s, {} thread(s), {ending}; glibc {}", p.duration_s, p.threads, p.glibc_version);
    if !p.malloc_env.is_empty() {
        let _ = writeln!(s, "   malloc settings: {}", p.malloc_env.join(" "));
    }
    let _ = writeln!(
        s,
        "   allocations {}  frees {}  failed {}  allocated in total {}",
        p.alloc_count,
        p.free_count,
        p.failed_allocs,
        bytes(p.bytes_allocated_total)
    );
    let _ = writeln!(s, "   peak live      {:>12}  at {:.3} s", bytes(p.peak_live_bytes), p.peak_live_time_s);
    let _ = writeln!(s, "   final live     {:>12}  in {} blocks", bytes(p.final_live_bytes), p.final_live_blocks);
    if p.inherited_live_bytes > 0 {
        let _ = writeln!(s, "   inherited      {:>12}  from the parent at fork", bytes(p.inherited_live_bytes));
    }
    let _ = writeln!(s, "   final heap     {:>12}  (brk heap + arena heaps held from the OS)", bytes(p.final_heap_bytes));
    let _ = writeln!(s, "   final mmapped  {:>12}  (large blocks mapped on their own)", bytes(p.final_mmapped_bytes));
    if p.peak_rss_bytes == 0 && p.final_rss_bytes == 0 {
        let _ = writeln!(s, "   RSS            not sampled (the image ended within one sampling period)");
    } else {
        let _ = writeln!(s, "   peak RSS       {:>12}  final RSS {}", bytes(p.peak_rss_bytes), bytes(p.final_rss_bytes));
    }
    let calls: Vec<String> = p.calls.iter().map(|(k, v)| format!("{k} {v}")).collect();
    let _ = writeln!(s, "   calls: {}", calls.join(", "));
    if p.lost_events > 0 || lossy {
        let _ = writeln!(s, "   lost events: {} (lossy recording: numbers above are approximate)", p.lost_events);
    }
    if p.unmatched_frees > 0 {
        let _ = writeln!(s, "   unmatched frees: {} (frees of blocks allocated before tracing, or lost)", p.unmatched_frees);
    }
    let a = &p.anomalies;
    if a.stream_gaps + a.undecodable_chunks + a.ignored_stamps + a.forced_events > 0 {
        let _ = writeln!(
            s,
            "   anomalies: {} stream gaps, {} undecodable chunks, {} ignored stamps, {} forced events",
            a.stream_gaps, a.undecodable_chunks, a.ignored_stamps, a.forced_events
        );
    }
    if a.reordered_blocks + a.forced_events > 0 {
        let _ = writeln!(
            s,
            "   ordering: {} blocks admitted out of order, {} undecidable orders (threads reusing one address within a tick)",
            a.reordered_blocks, a.ambiguous_orders
        );
    }
}
