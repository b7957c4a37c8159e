//! Rebuilding what happened from a trace: one [`ImageAnalysis`] per process image, fed record by
//! record. The same code serves offline reports and (later) the live dashboard: it consumes
//! records in the order the recorder wrote them and never needs the whole trace in memory.

pub mod glibc;
pub mod image;
pub mod live;
pub mod merge;
pub mod meta;
pub mod sanity;
pub mod sizes;
pub mod sites;
pub mod stacks;

use std::fs::File;
use std::io::BufReader;
use std::path::Path;

use anyhow::Result;
use crate::trace::{Record, TraceError, TraceReader};

use image::{ImageAnalysis, Relation};
use meta::{ProcessMeta, SessionMeta};

/// The analysis of a whole trace.
pub struct Analysis {
    pub session: SessionMeta,
    /// Process images in registration order.
    pub images: Vec<ImageAnalysis>,
    /// Notes the recorder wrote (registration failures and the like).
    pub notes: Vec<String>,
    /// The recording ended normally (a SessionEnd record is present).
    pub complete: bool,
    pub exit_status: Option<i64>,
    /// Set when the trace was cut short or damaged and `partial` analysis was asked for.
    pub damage: Option<String>,
}

/// Feeds records to the per-image analyses.
#[derive(Default)]
pub struct Analyzer {
    session: SessionMeta,
    images: Vec<ImageAnalysis>,
    /// image id → index in `images`.
    index: rustc_hash::FxHashMap<u32, usize>,
    notes: Vec<String>,
    complete: bool,
    exit_status: Option<i64>,
    /// Records for images not announced (yet): a damaged trace.
    orphans: u64,
}

impl Analyzer {
    pub fn new() -> Analyzer {
        Analyzer::default()
    }

    pub fn push(&mut self, rec: Record) {
        match rec {
            Record::Session(tlvs) => self.session = SessionMeta::parse(&tlvs),
            Record::ProcessStart(ps) => {
                let Some((_, mut meta)) = ProcessMeta::from_hello(&ps.hello) else {
                    self.notes.push(format!("image {}: malformed registration", ps.image));
                    return;
                };
                let parent = ps.parent_image.and_then(|p| self.index.get(&p).map(|&i| &self.images[i]));
                let relation = match parent {
                    None => Relation::Root,
                    Some(_) if ps.origin == mtrace_protocol::control::Origin::Fork as u32 => Relation::Fork,
                    Some(p) if p.pid == ps.pid => Relation::Exec,
                    Some(_) => Relation::Spawn,
                };
                if relation == Relation::Fork {
                    if let Some(p) = parent {
                        meta.inherit(&p.meta);
                    }
                }
                self.index.insert(ps.image, self.images.len());
                self.images.push(ImageAnalysis::new(&ps, meta, relation));
                self.resolve_forks();
            }
            Record::Chunk(c) => match self.index.get(&c.image) {
                Some(&i) => self.images[i].add_chunk(c),
                None => self.orphans += 1,
            },
            Record::Sync { image, time_ns } => {
                if let Some(&i) = self.index.get(&image) {
                    self.images[i].sync(time_ns);
                    self.resolve_forks();
                }
            }
            Record::Rss { image, time_ns, rss_bytes } => {
                if let Some(&i) = self.index.get(&image) {
                    self.images[i].add_rss(time_ns, rss_bytes);
                }
            }
            Record::Smaps { image, time_ns, maps } => {
                if let Some(&i) = self.index.get(&image) {
                    self.images[i].add_smaps(time_ns, maps);
                }
            }
            Record::ProcessEnd(e) => {
                if let Some(&i) = self.index.get(&e.image) {
                    self.images[i].set_end(e);
                    self.resolve_forks();
                }
            }
            Record::SessionEnd { exit_status, .. } => {
                self.complete = true;
                self.exit_status = (exit_status >= 0).then_some(exit_status);
            }
            Record::Note { text, .. } => self.notes.push(text),
            Record::TracingStopped { image, reason, time_ns, untraced_calls, timeout_ms } => {
                if let Some(&i) = self.index.get(&image) {
                    self.images[i].set_tracing_stopped(image::TracingStopped { reason, time_ns, untraced_calls, timeout_ms });
                }
            }
            Record::Unknown(_) => {}
        }
    }

    /// Look at the analysis so far without finishing it (the live dashboard): `f` sees every
    /// image as it stands now, `damage` none. Nothing is copied.
    pub fn peek<R>(&mut self, f: impl FnOnce(&Analysis) -> R) -> R {
        let a = Analysis {
            session: std::mem::take(&mut self.session),
            images: std::mem::take(&mut self.images),
            notes: std::mem::take(&mut self.notes),
            complete: self.complete,
            exit_status: self.exit_status,
            damage: None,
        };
        let r = f(&a);
        self.session = a.session;
        self.images = a.images;
        self.notes = a.notes;
        r
    }

    /// Hooked calls applied so far, over every image.
    pub fn calls(&self) -> u64 {
        self.images.iter().map(|i| i.model.c.calls.values().sum::<u64>()).sum()
    }

    /// Hand fork children their parent's heap as soon as the parent reached the fork.
    fn resolve_forks(&mut self) {
        loop {
            let mut progressed = false;
            for ci in 0..self.images.len() {
                let Some((parent, seq)) = self.images[ci].awaiting() else { continue };
                let Some(&pi) = self.index.get(&parent) else {
                    self.images[ci].start_from(None);
                    progressed = true;
                    continue;
                };
                let snap = self.images[pi].fork_snapshots.remove(&seq);
                // A parent that is itself waiting for its heap has not replayed its fork yet.
                let parent_done = self.images[pi].end.is_some() && self.images[pi].awaiting().is_none() && snap.is_none();
                if snap.is_some() || parent_done {
                    self.images[ci].start_from(snap);
                    progressed = true;
                }
            }
            if !progressed {
                return;
            }
        }
    }

    pub fn finish(mut self, damage: Option<String>) -> Analysis {
        // Parents first, so children get their snapshots.
        for i in 0..self.images.len() {
            if self.images[i].awaiting().is_none() {
                self.images[i].finish();
            }
            self.resolve_forks();
        }
        for img in &mut self.images {
            img.finish();
        }
        // Fork children inherit their parent's stack and module definitions (parents first:
        // images are in registration order).
        for ci in 0..self.images.len() {
            if self.images[ci].relation != Relation::Fork {
                continue;
            }
            let Some(&pi) = self.images[ci].parent.and_then(|p| self.index.get(&p)) else { continue };
            if pi < ci {
                let parent = self.images[pi].stacks().clone();
                self.images[ci].stacks_mut().inherit(&parent);
            }
        }
        if self.orphans > 0 {
            self.notes.push(format!("{} records name process images the trace never announced", self.orphans));
        }
        Analysis {
            session: self.session,
            images: self.images,
            notes: self.notes,
            complete: self.complete,
            exit_status: self.exit_status,
            damage,
        }
    }
}

/// Analyse a trace file. A truncated or corrupt file is an error naming the offset, unless
/// `partial` asks for the analysis of everything before the damage.
pub fn analyze_file(path: &Path, partial: bool) -> Result<Analysis> {
    analyze_file_observed(path, partial, &mut |_| {})
}

/// How far the reading of a trace has come (for a progress display).
#[derive(Clone, Copy, Debug, Default)]
pub struct ReadProgress {
    /// File bytes read.
    pub bytes: u64,
    /// Events read (in chunks).
    pub events: u64,
}

/// [`analyze_file`], telling `observe` how far it has read: once before the first frame (after
/// any wait for the recorder), then after each frame.
pub fn analyze_file_observed(path: &Path, partial: bool, observe: &mut dyn FnMut(ReadProgress)) -> Result<Analysis> {
    let f = File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    wait_for_recorder(&f, path, std::time::Duration::from_secs(30));
    observe(ReadProgress::default());
    analyze_open(f, path, partial, observe)
}

/// Analyse a trace that is still being written (`mtracer run`): no waiting for the recorder, and
/// the tail — a frame the recorder has not finished writing — is the end of the data, not damage.
pub fn analyze_live(path: &Path) -> Result<Analysis> {
    let f = File::open(path).map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
    let mut a = analyze_open(f, path, true, &mut |_| {})?;
    a.damage = None;
    Ok(a)
}

/// Analyse an open trace file (see [`analyze_file`]).
fn analyze_open(f: File, path: &Path, partial: bool, observe: &mut dyn FnMut(ReadProgress)) -> Result<Analysis> {
    let mut reader = TraceReader::new(BufReader::with_capacity(1 << 20, f)).map_err(|e| describe(path, e, false))?;
    let mut a = Analyzer::new();
    let mut damage = None;
    let mut progress = ReadProgress::default();
    loop {
        match reader.next_frame() {
            Ok(Some(frame)) => {
                let mut bad = None;
                for r in frame.records() {
                    match r {
                        Ok(rec) => {
                            if let Record::Chunk(c) = &rec {
                                progress.events += mtrace_protocol::event::count_events(&c.words);
                            }
                            a.push(rec)
                        }
                        Err(e) => {
                            bad = Some(e);
                            break;
                        }
                    }
                }
                if let Some(e) = bad {
                    if !partial {
                        return Err(describe(path, e, true));
                    }
                    damage = Some(e.to_string());
                    break;
                }
                progress.bytes = reader.offset();
                observe(progress);
            }
            Ok(None) => break,
            Err(e) => {
                if !partial || matches!(e, TraceError::Io(_)) {
                    return Err(describe(path, e, true));
                }
                damage = Some(e.to_string());
                break;
            }
        }
    }
    Ok(a.finish(damage))
}

/// A recorder holds an exclusive lock on the trace it writes. If it is still at work (a standalone
/// agent finishing up after the program exited, say), wait for it — up to `limit` — so that what
/// we read is the whole recording.
pub fn wait_for_recorder(f: &File, path: &Path, limit: std::time::Duration) {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; the shared lock is dropped with the file.
    let try_lock = || unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) == 0 };
    if try_lock() {
        return;
    }
    eprintln!("mtracer: {} is still being recorded; waiting for the recorder to finish", path.display());
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        std::thread::sleep(std::time::Duration::from_millis(20));
        if try_lock() {
            return;
        }
    }
    eprintln!("mtracer: still recording after {} s; reading what is there", limit.as_secs());
}

fn describe(path: &Path, e: TraceError, hint: bool) -> anyhow::Error {
    let hint = if hint && e.offset().is_some() { "\n(use --partial to analyse what comes before the damage)" } else { "" };
    anyhow::anyhow!("{}: {e}{hint}", path.display())
}
