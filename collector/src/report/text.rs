//! The report as text for a terminal.

use std::fmt::Write;

use super::retention::Retention;
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
        // An image that stopped tracing by itself says so (with when and why) below.
        let stopped_itself = r.processes.iter().any(|p| p.tracing_stopped.as_ref().is_some_and(|t| t.untraced_calls.is_some()));
        if stopped_itself && r.exit_status.is_some() {
            let _ = writeln!(s, "warning: tracing stopped early in some processes (see `tracing stopped` below); showing what was saved");
        } else {
            let _ = writeln!(s, "warning: the recording did not end normally (recorder killed?); showing what was saved");
        }
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
    if let Some(t) = &p.tracing_stopped {
        let missed = match t.untraced_calls {
            Some(n) => format!("; at least {n} calls after that are not in the trace"),
            None => String::new(),
        };
        let _ = writeln!(s, "   tracing stopped at {:.2} s: {}{missed}", t.at_s, t.why);
    }
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
    if !p.order_cells && p.threads > 1 {
        let _ = writeln!(s, "   threads ordered by time alone (no ordering cells): blocks handed between threads may be misattributed");
    }
    let a = &p.anomalies;
    if a.stream_gaps + a.undecodable_chunks + a.missing_predecessors + a.broken_cycles + a.forced_events + a.reordered_blocks + a.implausible_events > 0 {
        let _ = writeln!(
            s,
            "   anomalies: {} stream gaps, {} undecodable chunks, {} missing predecessors, {} broken cycles, {} forced frees, {} blocks admitted out of order, {} implausible events left out",
            a.stream_gaps, a.undecodable_chunks, a.missing_predecessors, a.broken_cycles, a.forced_events, a.reordered_blocks, a.implausible_events
        );
    }
    if let Some(r) = &p.retention {
        retention(s, r);
    } else if let Some(why) = &p.retention_unavailable {
        wrap(s, "   -- retention: not modelled: ", "      ", why);
    }
    sites(s, &p.sites, p.peak_live_bytes);
}

/// Sites shown per list in text.
const TEXT_SITES: usize = 10;

/// Callers shown after a site's name.
const TEXT_CALLERS: usize = 3;

fn site_head(v: &super::sites::SiteView) -> String {
    let loc = match (&v.file, v.line) {
        (Some(f), Some(l)) => format!(" ({}:{l})", crate::symbols::base_name(f)),
        (Some(f), None) => format!(" ({})", crate::symbols::base_name(f)),
        _ => String::new(),
    };
    format!("{}{loc}", v.function)
}

/// The path shown under each entry of a list: the first callers beyond the naming frame, and
/// where two entries would read the same, the first caller where they differ (after `…`); an
/// entry still reading like another (frames that differ only in what text does not show: a
/// directory, a module) gets its stack id.
fn paths(list: &[&super::sites::SiteView]) -> Vec<String> {
    let heads: Vec<String> = list.iter().map(|v| site_head(v)).collect();
    let callers: Vec<Vec<String>> = list.iter().map(|v| super::sites::shown_frames(&v.frames).iter().skip(1).map(|f| f.label()).collect()).collect();
    let mut shown: Vec<Vec<usize>> = callers.iter().map(|c| (0..c.len().min(TEXT_CALLERS)).collect()).collect();
    for i in 0..list.len() {
        for j in 0..list.len() {
            let (a, b) = (&callers[i], &callers[j]);
            if i == j || heads[i] != heads[j] || a.is_empty() {
                continue;
            }
            let d = a.iter().zip(b).position(|(x, y)| x != y).unwrap_or(a.len().min(b.len()));
            if d >= TEXT_CALLERS {
                shown[i].push(d.min(a.len() - 1));
            }
        }
        shown[i].sort_unstable();
        shown[i].dedup();
    }
    let mut texts: Vec<String> = shown
        .iter()
        .zip(&callers)
        .map(|(idx, c)| {
            let mut parts: Vec<&str> = Vec::new();
            for (n, &k) in idx.iter().enumerate() {
                if n > 0 && k > idx[n - 1] + 1 {
                    parts.push("…");
                }
                parts.push(&c[k]);
            }
            parts.join(" <- ")
        })
        .collect();
    let full: Vec<String> = heads.iter().zip(&texts).map(|(h, t)| format!("{h} {t}")).collect();
    for (i, t) in texts.iter_mut().enumerate() {
        if full.iter().enumerate().any(|(j, o)| j != i && *o == full[i]) {
            let id = format!("[stack {:#x}]", list[i].stack_id);
            *t = if t.is_empty() { id } else { format!("{t} {id}") };
        }
    }
    texts
}

/// One list's entries, `extra` after each site's name.
fn site_list<'a>(s: &mut String, list: impl IntoIterator<Item = &'a super::sites::SiteView>, extra: impl Fn(usize) -> String) {
    let list: Vec<&super::sites::SiteView> = list.into_iter().take(TEXT_SITES).collect();
    for (i, (v, path)) in list.iter().zip(paths(&list)).enumerate() {
        let _ = writeln!(s, "      {:>12} {:>8} blocks  {}{}", bytes(v.bytes), v.blocks, site_head(v), extra(i));
        if !path.is_empty() {
            wrap(s, "                                 <- ", "                                    ", &path);
        }
    }
}

/// The allocation-site sections.
fn sites(s: &mut String, r: &super::sites::SitesReport, peak: u64) {
    if !r.stacks {
        if let Some(n) = &r.stacks_note {
            let _ = writeln!(s, "   -- sites: {n}");
        }
        return;
    }
    let _ = writeln!(s, "   -- top sites at the peak ({} live):", bytes(peak));
    site_list(s, &r.top_sites_at_peak, |_| String::new());
    if r.leaked_sites.is_empty() {
        let _ = writeln!(s, "   -- leaked at exit: nothing");
    } else {
        let total: u64 = r.leaked_sites.iter().map(|v| v.bytes).sum();
        let _ = writeln!(s, "   -- leaked at exit (still live when the image ended), {} in the sites below:", bytes(total));
        site_list(s, &r.leaked_sites, |_| String::new());
    }
    if !r.temporary_sites.is_empty() {
        let _ = writeln!(s, "   -- temporary allocations (freed by their thread right after, with no call in between):");
        site_list(s, &r.temporary_sites, |i| format!(", of {} allocations", r.temporary_sites[i].allocations));
    }
    if let Some(rb) = &r.retention_by_site {
        if !rb.sites.is_empty() {
            let _ = writeln!(s, "   -- freed memory glibc keeps at the end, by the site that allocated it:");
            site_list(s, rb.sites.iter().map(|v| &v.site), |i| {
                let v = &rb.sites[i];
                format!(" [tcache {}, fastbins {}, bins {}]", bytes(v.tcache), bytes(v.fastbins), bytes(v.bins))
            });
        }
        for p in &rb.top_pinned_by {
            let site = p.site.as_ref().map(|v| format!(", allocated in {}", v.frames.first().map(|_| v.function.as_str()).unwrap_or("?"))).unwrap_or_default();
            let loc = p.site.as_ref().and_then(|v| v.file.as_ref().map(|f| format!(" ({}:{})", crate::symbols::base_name(f), v.line.unwrap_or(0)))).unwrap_or_default();
            let _ = writeln!(s, "   -- the heap top of the {} arena is pinned by the live {}-byte block at {:#x}{site}{loc}", p.arena, p.size, p.address);
        }
    }
    for m in &r.symbols_missing {
        let _ = writeln!(s, "   note: {m}");
    }
}

/// Wrap `text` at about 96 columns, indenting continuation lines.
fn wrap(s: &mut String, first: &str, rest: &str, text: &str) {
    let mut line = String::from(first);
    for w in text.split_whitespace() {
        if line.len() + w.len() + 1 > 100 && line.len() > rest.len() {
            let _ = writeln!(s, "{line}");
            line = String::from(rest);
        } else if line.len() > first.len().min(rest.len()) && !line.ends_with(' ') {
            line.push(' ');
        }
        line.push_str(w);
    }
    let _ = writeln!(s, "{line}");
}

fn retention(s: &mut String, r: &Retention) {
    let b = &r.at_end;
    let _ = writeln!(s, "   -- retention at the end: {} held from the OS, {} live", bytes(b.os_held_bytes), bytes(b.live_bytes));
    for (k, v) in b.categories.pairs() {
        if v > 0 {
            let pct = b.percent.get(k).copied().unwrap_or(0.0);
            let _ = writeln!(s, "      {k:<17}{:>12}  {pct:>5.1} %", bytes(v));
        }
    }
    if b.arenas.len() > 1 {
        let _ = writeln!(s, "      {:<16} {:>5} {:>11} {:>11} {:>11} {:>11} {:>7}", "arena", "heaps", "held", "live", "free", "top", "threads");
        for a in &b.arenas {
            let _ = writeln!(
                s,
                "      {:<16} {:>5} {:>11} {:>11} {:>11} {:>11} {:>7}",
                a.id,
                a.heaps,
                bytes(a.os_held_bytes),
                bytes(a.live_bytes),
                bytes(a.free_bytes),
                bytes(a.top_bytes),
                a.threads
            );
        }
    }
    let t = &r.thresholds;
    let how = if t.dynamic { "dynamic".to_string() } else { format!("fixed by {}", t.fixed_by.as_deref().unwrap_or("a setting")) };
    let _ = writeln!(
        s,
        "      thresholds: mmap {}, trim {} ({how}); arena limit {} ({})",
        bytes(t.mmap_threshold),
        bytes(t.trim_threshold),
        t.arena_limit,
        t.arena_limit_source
    );
    if let Some(pk) = &r.at_peak_rss {
        let _ = writeln!(
            s,
            "      at peak RSS ({} at {:.3} s): {} held, {} live",
            bytes(pk.rss_bytes),
            pk.breakdown.t_s,
            bytes(pk.breakdown.os_held_bytes),
            bytes(pk.breakdown.live_bytes)
        );
        for c in pk.causes.iter().take(3) {
            wrap(s, "        · ", "          ", &c.text);
        }
    }
    if !r.causes.is_empty() {
        let _ = writeln!(s, "      why:");
        for c in &r.causes {
            wrap(s, "        · ", "          ", &c.text);
        }
    }
    if !r.remedies.is_empty() {
        let _ = writeln!(s, "      what would change it:");
        for m in &r.remedies {
            wrap(s, "        · ", "          ", &m.text);
        }
    }
    for t in &r.trims {
        let measured = if t.rss_before > 0 && t.rss_after > 0 {
            format!(", RSS {} → {}", bytes(t.rss_before), bytes(t.rss_after))
        } else {
            String::new()
        };
        let _ = writeln!(s, "      malloc_trim({}) at {:.3} s: predicted to return {}{measured}", t.pad, t.t_s, bytes(t.predicted_release_bytes));
        for c in t.causes_before.iter().take(3) {
            wrap(s, "        before it · ", "          ", &c.text);
        }
    }
    if let Some(cp) = &r.mallinfo2_checkpoint {
        let verdict = if cp.matches { "model and glibc agree" } else { "model and glibc differ" };
        let _ = writeln!(s, "      mallinfo2 at {:.3} s ({}): {verdict}", cp.t_s, cp.reason);
        let _ = writeln!(s, "        {:<10} {:>14} {:>14} {:>12}", "field", "model", "glibc", "difference");
        for k in ["arena", "hblkhd", "uordblks", "fordblks", "fsmblks", "keepcost"] {
            if let Some(v) = r.mallinfo2.get(k) {
                let d = v.model as i128 - v.glibc as i128;
                let _ = writeln!(s, "        {k:<10} {:>14} {:>14} {:>12}", v.model, v.glibc, if d == 0 { "=".to_string() } else { format!("{d:+}") });
            }
        }
    }
    if let Some(res) = &r.resident {
        let d = if res.heap_measured > 0 { (res.heap_model as f64 - res.heap_measured as f64) * 100.0 / res.heap_measured as f64 } else { 0.0 };
        let _ = writeln!(
            s,
            "      resident at {:.3} s (smaps): heap {} (model {}, {d:+.1} %), mmapped blocks {}, own mmaps {}, other {}",
            res.t_s,
            bytes(res.heap_measured),
            bytes(res.heap_model),
            bytes(res.mmapped_chunks),
            bytes(res.app_mmaps),
            bytes(res.other)
        );
    }
    let bad = r.checkpoints.iter().filter(|c| c.exact_order && !c.matches).count();
    let exact = r.checkpoints.iter().filter(|c| c.exact_order).count();
    if exact > 0 {
        let _ = writeln!(s, "      mallinfo2 checkpoints: {} of {exact} in exact order agree with the model", exact - bad);
    }
    if r.model_conflicts > 0 {
        let _ = writeln!(s, "      model: {} contradictions with the trace (approximate in places)", r.model_conflicts);
    }
    for u in &r.uncertain {
        wrap(s, "      uncertain: ", "        ", u);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::sites::SiteView;
    use crate::symbols::Frame;

    fn view(id: u64, names: &[&str]) -> SiteView {
        let frames = names
            .iter()
            .map(|n| Frame { function: n.to_string(), file: Some(format!("/src/{n}.c")), line: Some(1), module: "/bin/a".into(), inlined: false, ip: 0 })
            .collect();
        SiteView {
            function: names[1].into(),
            file: Some(format!("/src/{}.c", names[1])),
            line: Some(1),
            bytes: 1,
            blocks: 1,
            stack_id: id,
            stack_ids: vec![id],
            allocations: 1,
            allocated_bytes: 1,
            temporary: 0,
            size_classes: Default::default(),
            frames,
        }
    }

    #[test]
    fn entries_reading_alike_show_where_their_paths_differ() {
        // "operator new" is plumbing: the site is the second frame.
        let a = view(1, &["operator new", "f", "g", "h", "i", "j", "x", "main"]);
        let b = view(2, &["operator new", "f", "g", "h", "i", "j", "y", "main"]);
        let c = view(3, &["operator new", "k", "g", "h", "i", "j", "y", "main"]);
        let d = view(4, &["operator new", "f", "g", "h", "i"]);
        let p = paths(&[&a, &b, &c]);
        assert_eq!(p[0], "g (g.c:1) <- h (h.c:1) <- i (i.c:1) <- … <- x (x.c:1)");
        assert_eq!(p[1], "g (g.c:1) <- h (h.c:1) <- i (i.c:1) <- … <- y (y.c:1)");
        // Another naming frame: the first callers only.
        assert_eq!(p[2], "g (g.c:1) <- h (h.c:1) <- i (i.c:1)");
        // A path that ends where another goes on: the other shows its next frame.
        let p = paths(&[&a, &b, &d]);
        assert_eq!(p[0], "g (g.c:1) <- h (h.c:1) <- i (i.c:1) <- j (j.c:1) <- x (x.c:1)");
        assert_eq!(p[1], "g (g.c:1) <- h (h.c:1) <- i (i.c:1) <- j (j.c:1) <- y (y.c:1)");
        assert_eq!(p[2], "g (g.c:1) <- h (h.c:1) <- i (i.c:1)");
        // Frames that read the same in text (another directory): the stack ids tell them apart.
        let mut e = view(5, &["operator new", "k", "g", "h", "i", "j", "y", "main"]);
        e.frames[3].file = Some("/other/h.c".into());
        let p = paths(&[&c, &e]);
        assert_eq!(p[0], "g (g.c:1) <- h (h.c:1) <- i (i.c:1) <- … <- main (main.c:1) [stack 0x3]");
        assert_eq!(p[1], "g (g.c:1) <- h (h.c:1) <- i (i.c:1) <- … <- main (main.c:1) [stack 0x5]");
    }
}
