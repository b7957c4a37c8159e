//! The retention section of the report: why the process holds more than it uses, from the glibc
//! model of each image ([`crate::analysis::glibc`]).

use std::collections::BTreeMap;

use serde::Serialize;

use crate::analysis::glibc::breakdown::Breakdown;
use crate::analysis::glibc::explain::{Cause, Remedy};
use crate::analysis::glibc::params::ThresholdChange;
use crate::analysis::image::ImageAnalysis;

#[derive(Serialize)]
pub struct Retention {
    /// The state at the end of the image.
    #[serde(flatten)]
    pub at_end: Breakdown,
    pub causes: Vec<Cause>,
    pub remedies: Vec<Remedy>,
    pub thresholds: Thresholds,
    /// The last `mallinfo2()` checkpoint whose order in the stream is exact, field by field.
    pub mallinfo2: BTreeMap<&'static str, FieldPair>,
    pub mallinfo2_checkpoint: Option<CheckpointInfo>,
    /// Every checkpoint: does the model agree with glibc?
    pub checkpoints: Vec<CheckpointInfo>,
    /// `malloc_trim` calls: predicted and measured effect.
    pub trims: Vec<TrimInfo>,
    /// The state when RSS peaked.
    pub at_peak_rss: Option<PeakState>,
    /// The last `/proc/<pid>/smaps` sample, classified, with the model's heap estimate.
    pub resident: Option<crate::analysis::glibc::breakdown::Resident>,
    /// Contradictions between the trace and the model (0 in a healthy model).
    pub model_conflicts: u64,
    /// The first few, described.
    pub model_conflict_examples: Vec<String>,
    /// Reports of the program break or a heap's size that lay below the model's top chunk:
    /// stale (merged after a newer one) or a sign the model holds in use what glibc trimmed.
    pub stale_observations: u64,
    /// Where a rule may not hold for this process, in words.
    pub uncertain: Vec<String>,
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq)]
pub struct FieldPair {
    pub model: u64,
    pub glibc: u64,
}

#[derive(Serialize)]
pub struct CheckpointInfo {
    pub t_s: f64,
    pub reason: &'static str,
    pub exact_order: bool,
    /// All compared fields equal.
    pub matches: bool,
    /// Fields that differ: model − glibc.
    pub differences: BTreeMap<&'static str, i64>,
}

#[derive(Serialize, Clone, Debug, Default)]
pub struct Thresholds {
    pub mmap_threshold: u64,
    pub trim_threshold: u64,
    pub top_pad: u64,
    pub dynamic: bool,
    /// What fixed the thresholds (mallopt, environment), when `dynamic` is false.
    pub fixed_by: Option<String>,
    pub arena_limit: u64,
    pub arena_limit_source: String,
    pub changes: Vec<ThresholdChange>,
}

#[derive(Serialize)]
pub struct TrimInfo {
    pub t_s: f64,
    pub pad: u64,
    pub result: i64,
    pub predicted_release_bytes: u64,
    pub predicted_madvise_bytes: u64,
    pub predicted_shrink_bytes: u64,
    /// RSS samples around the call (0 when none).
    pub rss_before: u64,
    pub rss_after: u64,
    /// Why the process held what it held right before the call.
    pub causes_before: Vec<Cause>,
}

#[derive(Serialize)]
pub struct PeakState {
    pub rss_bytes: u64,
    #[serde(flatten)]
    pub breakdown: Breakdown,
    pub causes: Vec<Cause>,
}

const FIELDS: [&str; 9] = ["arena", "ordblks", "smblks", "hblks", "hblkhd", "fsmblks", "uordblks", "fordblks", "keepcost"];

fn fields(m: &mtrace_protocol::event::Mallinfo2) -> [u64; 9] {
    [m.arena, m.ordblks, m.smblks, m.hblks, m.hblkhd, m.fsmblks, m.uordblks, m.fordblks, m.keepcost]
}

fn secs(ns: u64) -> f64 {
    (ns as f64 / 1e9 * 1e6).round() / 1e6
}

pub fn build(img: &ImageAnalysis) -> Option<Retention> {
    let g = &img.glibc;
    if !g.enabled {
        return None;
    }
    let end_ns = img.model.now_ns;
    let at_end = g.breakdown(end_ns);
    let checkpoints: Vec<CheckpointInfo> = g
        .checkpoints
        .iter()
        .map(|cp| {
            let (m, gl) = (fields(&cp.model), fields(&cp.glibc));
            let differences: BTreeMap<&'static str, i64> =
                FIELDS.iter().zip(m.iter().zip(gl.iter())).filter(|(_, (a, b))| a != b).map(|(k, (a, b))| (*k, (*a as i128 - *b as i128).clamp(i64::MIN as i128, i64::MAX as i128) as i64)).collect();
            CheckpointInfo {
                t_s: secs(cp.time_ns.saturating_sub(img.start_ns)),
                reason: cp.reason.label(),
                exact_order: cp.exact_order.unwrap_or(false),
                matches: differences.is_empty(),
                differences,
            }
        })
        .collect();
    let last = g.checkpoints.iter().rev().find(|c| c.exact_order == Some(true));
    let mallinfo2 = last
        .map(|cp| {
            let (m, gl) = (fields(&cp.model), fields(&cp.glibc));
            FIELDS.iter().zip(m.iter().zip(gl.iter())).map(|(k, (a, b))| (*k, FieldPair { model: *a, glibc: *b })).collect()
        })
        .unwrap_or_default();
    let mallinfo2_checkpoint = last.and_then(|cp| {
        let i = g.checkpoints.iter().position(|c| std::ptr::eq(c, cp))?;
        let c = &checkpoints[i];
        Some(CheckpointInfo { t_s: c.t_s, reason: c.reason, exact_order: c.exact_order, matches: c.matches, differences: c.differences.clone() })
    });
    let tl = &img.samples.timeline;
    let rss_at = |t: u64, after: bool| -> u64 {
        if after {
            tl.get(tl.partition_point(|p| p.time_ns <= t)).map_or(0, |p| p.rss_bytes)
        } else {
            tl.partition_point(|p| p.time_ns < t).checked_sub(1).map_or(0, |i| tl[i].rss_bytes)
        }
    };
    let trims = g
        .trims
        .iter()
        .enumerate()
        .map(|(i, t)| TrimInfo {
            causes_before: img.samples.before_trims.get(i).cloned().unwrap_or_default(),
            t_s: secs(t.time_ns.saturating_sub(img.start_ns)),
            pad: t.pad,
            result: t.result,
            predicted_release_bytes: t.predicted(),
            predicted_madvise_bytes: t.predicted_madvise,
            predicted_shrink_bytes: t.predicted_shrink,
            rss_before: rss_at(t.start_ns, false),
            rss_after: rss_at(t.time_ns, true),
        })
        .collect();
    let p = &g.params;
    Some(Retention {
        causes: crate::analysis::glibc::explain::causes(g, &img.model, &at_end, img.start_ns),
        remedies: crate::analysis::glibc::explain::remedies(g, &at_end),
        at_end,
        thresholds: Thresholds {
            mmap_threshold: p.mmap_threshold,
            trim_threshold: p.trim_threshold,
            top_pad: p.top_pad,
            dynamic: p.dynamic,
            fixed_by: p.fixed_by.clone(),
            arena_limit: p.arena_limit,
            arena_limit_source: p.arena_limit_source.clone(),
            changes: p.changes.clone(),
        },
        mallinfo2,
        mallinfo2_checkpoint,
        checkpoints,
        trims,
        at_peak_rss: img.samples.peak_retention.as_ref().map(|(rss, b, causes)| PeakState { rss_bytes: *rss, breakdown: b.clone(), causes: causes.clone() }),
        resident: img.samples.resident.last().cloned(),
        stale_observations: g.stale_observations,
        model_conflicts: g.conflicts(),
        model_conflict_examples: g.arenas.iter().flat_map(|a| a.conflict_log.iter().map(move |l| format!("{}: {l}", if a.is_main() { "main".to_string() } else { format!("{:#x}", a.id) }))).take(10).collect(),
        uncertain: g.uncertain.clone(),
    })
}
