//! The trace fuzz harness: damaged variants of real and synthetic traces, each given to the real
//! `mtracer` binary (`report --json`, `report --partial`, `export --format massif`,
//! `view --print`) with a timeout and a memory limit, and every run classified: a success, a
//! clean error (a non-zero exit with a message), a panic (exit 101, "panicked", or a signal), an
//! allocation failure, or a hang. Variants come from a seed and their index alone (see
//! [`mutate`]), so a failure reproduces from what the harness prints; each failing variant is also
//! saved to a file.
//!
//! Damage of the file's bytes and frames is owed an error (the checksums and frame sequence
//! numbers must catch it; `--partial` must say the trace is damaged): a run that succeeds
//! silently on such a variant counts as `undetected`.

pub mod layout;
pub mod mutate;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use layout::Layout;
use mutate::{Mutation, Rng};

/// A trace to mutate.
pub struct Base {
    pub name: String,
    pub layout: Layout,
}

impl Base {
    /// `None` if `bytes` is not a trace that reads cleanly.
    pub fn new(name: &str, bytes: Vec<u8>) -> Option<Base> {
        Some(Base { name: name.to_string(), layout: Layout::parse(bytes)? })
    }
}

/// The commands every variant is given (the file comes last).
pub const COMMANDS: [&[&str]; 4] = [&["report", "--json"], &["report", "--partial"], &["export", "--format", "massif"], &["view", "--print", "100x40"]];

/// What became of one run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    Success,
    /// A non-zero exit with a message (and no panic).
    CleanError,
    /// Exit 101, "panicked" on stderr, or killed by a signal (an abort).
    Panic,
    /// The memory limit was hit ("memory allocation of N bytes failed").
    OutOfMemory,
    /// Still running at the timeout (killed).
    Hang,
    /// A non-zero exit without a word on stderr.
    Silent,
}

/// One run of `mtracer`.
pub struct Run {
    pub outcome: Outcome,
    pub code: Option<i32>,
    pub stderr: String,
    /// Its output says the trace is damaged (`--partial`).
    pub says_damaged: bool,
}

/// Limits of each run.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub timeout: Duration,
    /// Address-space limit (`RLIMIT_AS`), bytes.
    pub memory: u64,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits { timeout: Duration::from_secs(20), memory: 4 << 30 }
    }
}

/// Run `mtracer ARGS FILE` in `dir` (where its output goes) within `limits`.
pub fn run_mtracer(mtracer: &Path, args: &[&str], file: &Path, dir: &Path, limits: Limits) -> Run {
    let (out_path, err_path) = (dir.join("stdout"), dir.join("stderr"));
    let mut cmd = Command::new(mtracer);
    cmd.args(args).arg(file).stdin(Stdio::null());
    cmd.stdout(std::fs::File::create(&out_path).expect("creating the stdout file"));
    cmd.stderr(std::fs::File::create(&err_path).expect("creating the stderr file"));
    limit_memory(&mut cmd, limits.memory);
    let mut child = cmd.spawn().expect("running mtracer");
    let deadline = Instant::now() + limits.timeout;
    let mut nap = Duration::from_millis(1);
    let status = loop {
        if let Some(st) = child.try_wait().expect("waiting for mtracer") {
            break Some(st);
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(nap);
        nap = (nap * 2).min(Duration::from_millis(20));
    };
    let stderr = String::from_utf8_lossy(&std::fs::read(&err_path).unwrap_or_default()).into_owned();
    let says_damaged = std::fs::read(&out_path).is_ok_and(|o| o.windows(20).any(|w| w == b"the trace is damaged"));
    let code = status.and_then(|s| s.code());
    let outcome = match status {
        None => Outcome::Hang,
        Some(_) if stderr.contains("memory allocation of") => Outcome::OutOfMemory,
        Some(_) if code.is_none() || code == Some(101) || stderr.contains("panicked") => Outcome::Panic,
        Some(_) if code == Some(0) => Outcome::Success,
        Some(_) if stderr.trim().is_empty() => Outcome::Silent,
        Some(_) => Outcome::CleanError,
    };
    Run { outcome, code, stderr, says_damaged }
}

/// The child's address space is limited to `bytes`: a length field that makes it allocate
/// without bound fails there (as an allocation failure) instead of taking the machine.
fn limit_memory(cmd: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            let lim = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
            if libc::setrlimit(libc::RLIMIT_AS, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// One damaged variant: which base, the mutations that made it, the bytes.
pub struct Variant {
    pub index: u64,
    pub base: usize,
    pub mutations: Vec<Mutation>,
    pub bytes: Vec<u8>,
    /// Its damage must be reported (see [`Mutation::owes_error`]).
    pub owes_error: bool,
}

/// The systematic mutations of every base, in order: (base, mutation).
fn systematic_list(bases: &[Base]) -> Vec<(usize, Mutation)> {
    bases.iter().enumerate().flat_map(|(i, b)| mutate::systematic(&b.layout).into_iter().map(move |m| (i, m))).collect()
}

/// Variant `index` for `seed`: first the systematic ones, then random draws (one mutation, or
/// up to three stacked while the result still reads as a trace), the bases taken in turn.
pub fn variant(seed: u64, index: u64, bases: &[Base], systematic: &[(usize, Mutation)]) -> Option<Variant> {
    if let Some((base, m)) = systematic.get(index as usize) {
        let l = &bases[*base].layout;
        let bytes = m.apply(l)?;
        let owes_error = m.owes_error(l, &bytes);
        return (bytes != l.bytes).then(|| Variant { index, base: *base, mutations: vec![m.clone()], bytes, owes_error });
    }
    let mut rng = Rng::new(seed ^ index.wrapping_mul(0xa076_1d64_78bd_642f));
    let base = (index % bases.len() as u64) as usize;
    let mut layout = std::borrow::Cow::Borrowed(&bases[base].layout);
    let steps = if rng.chance(80) { 1 } else { 2 + rng.below(2) };
    let (mut mutations, mut owes_error, mut bytes) = (Vec::new(), false, None);
    for _ in 0..steps {
        let Some((m, out)) = (0..20).find_map(|_| mutate::draw(&mut rng, &layout).and_then(|m| m.apply(&layout).map(|o| (m, o)))) else { break };
        owes_error |= m.owes_error(&layout, &out);
        mutations.push(m);
        match Layout::parse(out.clone()) {
            Some(next) => layout = std::borrow::Cow::Owned(next),
            None => {
                bytes = Some(out);
                break;
            }
        }
        bytes = Some(out);
    }
    let bytes = bytes?;
    (bytes != bases[base].layout.bytes).then_some(Variant { index, base, mutations, bytes, owes_error })
}

/// What to run.
#[derive(Clone, Debug)]
pub struct Config {
    pub seed: u64,
    /// Variants to make (systematic ones included); `None`: until `seconds`.
    pub variants: Option<u64>,
    /// Stop drawing new variants after this long.
    pub seconds: Option<f64>,
    /// Only this variant (to reproduce one).
    pub only: Option<u64>,
    pub workers: usize,
    pub limits: Limits,
    /// Where failing variants are saved.
    pub failures_dir: PathBuf,
}

/// Counts over every run.
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub variants: u64,
    pub runs: u64,
    pub outcomes: BTreeMap<String, u64>,
    /// Variants per kind of (first) mutation.
    pub kinds: BTreeMap<String, u64>,
    /// Runs that succeeded silently on damage owed an error.
    pub undetected: u64,
    /// One line per failing run.
    pub failures: Vec<String>,
    pub elapsed: Duration,
}

impl Stats {
    pub fn count(&self, o: Outcome) -> u64 {
        self.outcomes.get(&format!("{o:?}")).copied().unwrap_or(0)
    }

    /// A summary for the test log.
    pub fn summary(&self, seed: u64) -> String {
        let kinds: Vec<String> = self.kinds.iter().map(|(k, n)| format!("{k} {n}")).collect();
        format!(
            "fuzz seed {seed:#x}: {} variants, {} runs in {:.1} s: {} successes, {} clean errors, {} panics, {} out of memory, {} hangs, {} silent exits, {} undetected damage\nmutations: {}",
            self.variants,
            self.runs,
            self.elapsed.as_secs_f64(),
            self.count(Outcome::Success),
            self.count(Outcome::CleanError),
            self.count(Outcome::Panic),
            self.count(Outcome::OutOfMemory),
            self.count(Outcome::Hang),
            self.count(Outcome::Silent),
            self.undetected,
            kinds.join(", ")
        )
    }

    /// No panic, no allocation failure, no hang, no silent exit, no undetected damage.
    pub fn clean(&self) -> bool {
        self.failures.is_empty()
    }
}

/// The kind of a mutation (its variant's name).
fn kind(m: &Mutation) -> String {
    format!("{m:?}").split([' ', '{']).next().unwrap_or("?").to_string()
}

/// Give every variant to every command; count.
pub fn fuzz(mtracer: &Path, bases: &[Base], cfg: &Config) -> Stats {
    assert!(!bases.is_empty(), "no base trace");
    std::fs::create_dir_all(&cfg.failures_dir).expect("creating the failures directory");
    let systematic = systematic_list(bases);
    let next = AtomicU64::new(cfg.only.unwrap_or(0));
    let stats = Mutex::new(Stats::default());
    let start = Instant::now();
    let more = |i: u64| match (cfg.only, cfg.variants, cfg.seconds) {
        (Some(o), _, _) => i == o,
        (None, n, s) => n.is_none_or(|n| i < n) && s.is_none_or(|s| start.elapsed().as_secs_f64() < s),
    };
    std::thread::scope(|scope| {
        for _ in 0..cfg.workers.max(1) {
            scope.spawn(|| {
                let dir = tempfile::tempdir().expect("a temporary directory");
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if !more(i) {
                        return;
                    }
                    let Some(v) = variant(cfg.seed, i, bases, &systematic) else { continue };
                    let lines = check_variant(mtracer, bases, &v, dir.path(), cfg, &stats);
                    if !lines.is_empty() {
                        let saved = cfg.failures_dir.join(format!("{}-{:x}-{}.mtr", bases[v.base].name, cfg.seed, v.index));
                        let _ = std::fs::write(&saved, &v.bytes);
                        let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
                        s.failures.extend(lines.into_iter().map(|l| format!("{l}\n    saved as {}", saved.display())));
                    }
                }
            });
        }
    });
    let mut s = stats.into_inner().unwrap_or_else(|e| e.into_inner());
    s.elapsed = start.elapsed();
    s
}

/// Run every command on variant `v`; count; return a line per failing run.
fn check_variant(mtracer: &Path, bases: &[Base], v: &Variant, dir: &Path, cfg: &Config, stats: &Mutex<Stats>) -> Vec<String> {
    let file = dir.join("variant.mtr");
    std::fs::write(&file, &v.bytes).expect("writing the variant");
    let recipe: Vec<String> = v.mutations.iter().map(|m| m.to_string()).collect();
    let what = format!("seed {:#x} variant {} base {}: {}", cfg.seed, v.index, bases[v.base].name, recipe.join(" + "));
    let mut lines = Vec::new();
    let mut runs = Vec::new();
    for args in COMMANDS {
        let r = run_mtracer(mtracer, args, &file, dir, cfg.limits);
        let partial = args.contains(&"--partial");
        let undetected = v.owes_error && r.outcome == Outcome::Success && (!partial || !r.says_damaged);
        let bad = !matches!(r.outcome, Outcome::Success | Outcome::CleanError) || undetected;
        if bad {
            let why = if undetected { "succeeded without a word on damage it must report".to_string() } else { format!("{:?} (exit {:?})", r.outcome, r.code) };
            let err: String = r.stderr.lines().take(6).collect::<Vec<_>>().join("\n      ");
            lines.push(format!("{what}\n  `mtracer {}`: {why}\n      {err}", args.join(" ")));
        }
        runs.push((r.outcome, undetected));
    }
    let mut s = stats.lock().unwrap_or_else(|e| e.into_inner());
    s.variants += 1;
    *s.kinds.entry(v.mutations.first().map(kind).unwrap_or_default()).or_default() += 1;
    for (o, undetected) in runs {
        s.runs += 1;
        *s.outcomes.entry(format!("{o:?}")).or_default() += 1;
        s.undetected += undetected as u64;
    }
    lines
}

/// A number from the environment (decimal, or hex with `0x`).
pub fn env_u64(name: &str) -> Option<u64> {
    let v = std::env::var(name).ok()?;
    let v = v.trim();
    match v.strip_prefix("0x") {
        Some(h) => u64::from_str_radix(h, 16).ok(),
        None => v.parse().ok(),
    }
}
