//! glibc malloc's tunable parameters as the traced process had them: defaults, the environment
//! (`MALLOC_*_` variables and `GLIBC_TUNABLES`), `mallopt` calls, and the dynamic mmap threshold
//! rule of `__libc_free`. Values and rules are glibc 2.36's (`../shared/docs/glibc-malloc-facts.md`
//! §2, §3, §5).

/// `DEFAULT_MMAP_THRESHOLD_MAX` on 64-bit: the dynamic rule never raises the threshold past it.
pub const MMAP_THRESHOLD_MAX: u64 = 32 << 20;
/// `FASTBIN_CONSOLIDATION_THRESHOLD`: a free that merges to this size consolidates and trims.
pub const CONSOLIDATION_THRESHOLD: u64 = 64 << 10;
/// The largest chunk a tcache holds at default settings (request 1032 B).
pub const TCACHE_MAX_CHUNK: u64 = 1040;
pub const MINSIZE: u64 = 32;
/// `HEAP_MAX_SIZE`: thread-arena heaps are reservations of this size, aligned to it.
pub const HEAP_MAX_SIZE: u64 = 64 << 20;

// mallopt parameter numbers (malloc.h).
const M_MXFAST: i32 = 1;
const M_TRIM_THRESHOLD: i32 = -1;
const M_TOP_PAD: i32 = -2;
const M_MMAP_THRESHOLD: i32 = -3;
const M_MMAP_MAX: i32 = -4;
const M_ARENA_TEST: i32 = -7;
const M_ARENA_MAX: i32 = -8;

/// One change of the mmap threshold (and with it the trim threshold).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize)]
pub struct ThresholdChange {
    #[serde(skip)]
    pub time_ns: u64,
    pub t_s: f64,
    pub old: u64,
    pub new: u64,
    pub cause: String,
    /// Made by the dynamic rule (a free), not by `mallopt`.
    pub dynamic: bool,
    /// Heap (not mmapped) allocations since this change whose chunk size lies in `[old, new)`:
    /// under the old threshold they would have been mmapped and returned to the OS on free.
    pub heap_allocations_between: u64,
    pub heap_bytes_between: u64,
}

#[derive(Clone, Debug)]
pub struct Params {
    pub mmap_threshold: u64,
    pub trim_threshold: u64,
    pub top_pad: u64,
    pub mmap_max: u64,
    /// `no_dyn_threshold == 0`.
    pub dynamic: bool,
    /// Why the dynamic rule is off, in words.
    pub fixed_by: Option<String>,
    /// Largest chunk size that goes to a fastbin (`global_max_fast`; 128 by default, 16 = none).
    pub max_fast: u64,
    /// Entries per tcache bin, and the largest chunk size a tcache holds.
    pub tcache_count: u64,
    pub tcache_max_chunk: u64,
    /// `arena_max` when set, else `8 × cores`.
    pub arena_limit: u64,
    pub arena_limit_source: String,
    pub changes: Vec<ThresholdChange>,
    /// Settings whose effect the model cannot follow exactly, in words.
    pub uncertain: Vec<String>,
}

fn parse_num(s: &str) -> Option<u64> {
    let s = s.trim();
    if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// glibc's `request2size`.
pub fn request2size(n: u64) -> u64 {
    mtrace_protocol::event::chunk::request2size(n)
}

impl Params {
    /// Defaults for a process with `ncpus` CPUs and environment `env` (`NAME=value` strings).
    pub fn from_env(env: &[String], ncpus: u64) -> Params {
        let ncpus = ncpus.max(1);
        let mut p = Params {
            mmap_threshold: 128 << 10,
            trim_threshold: 128 << 10,
            top_pad: 128 << 10,
            mmap_max: 65536,
            dynamic: true,
            fixed_by: None,
            max_fast: 128,
            tcache_count: 7,
            tcache_max_chunk: TCACHE_MAX_CHUNK,
            arena_limit: 8 * ncpus,
            arena_limit_source: format!("8 × {ncpus} cores"),
            changes: Vec::new(),
            uncertain: Vec::new(),
        };
        // The MALLOC_*_ aliases first, then GLIBC_TUNABLES, which wins when both are given.
        let mut settings: Vec<(String, String, String)> = Vec::new();
        for e in env {
            let Some((k, v)) = e.split_once('=') else { continue };
            let name = match k {
                "MALLOC_MMAP_THRESHOLD_" => "mmap_threshold",
                "MALLOC_TRIM_THRESHOLD_" => "trim_threshold",
                "MALLOC_TOP_PAD_" => "top_pad",
                "MALLOC_MMAP_MAX_" => "mmap_max",
                "MALLOC_ARENA_MAX" => "arena_max",
                "MALLOC_ARENA_TEST" => "arena_test",
                "MALLOC_PERTURB_" => "perturb",
                _ => continue,
            };
            settings.push((name.into(), v.into(), k.into()));
        }
        for e in env {
            let Some(t) = e.strip_prefix("GLIBC_TUNABLES=") else { continue };
            for item in t.split(':') {
                let Some((k, v)) = item.split_once('=') else { continue };
                if let Some(name) = k.strip_prefix("glibc.malloc.") {
                    settings.push((name.into(), v.into(), format!("GLIBC_TUNABLES {k}")));
                }
            }
        }
        for (name, v, source) in settings {
            let Some(n) = parse_num(&v) else { continue };
            let fix = |p: &mut Params| {
                p.dynamic = false;
                p.fixed_by = Some(format!("{source}={v}"));
            };
            match name.as_str() {
                "mmap_threshold" => {
                    p.mmap_threshold = n;
                    fix(&mut p);
                }
                "trim_threshold" => {
                    p.trim_threshold = n;
                    fix(&mut p);
                }
                "top_pad" => {
                    p.top_pad = n;
                    fix(&mut p);
                }
                "mmap_max" => {
                    p.mmap_max = n;
                    fix(&mut p);
                }
                "arena_max" if n > 0 => {
                    p.arena_limit = n;
                    p.arena_limit_source = format!("{source}={v}");
                }
                "mxfast" => p.set_max_fast(n),
                // glibc ignores counts above its maximum.
                "tcache_count" if n <= 65535 => p.tcache_count = n,
                "tcache_max" => p.tcache_max_chunk = request2size(n.min(1 << 20)).min(TCACHE_MAX_CHUNK),
                "hugetlb" if n != 0 => p.uncertain.push(format!(
                    "{source}={v}: huge-page heaps change heap alignment and the main arena's use of brk; the arena model may be wrong"
                )),
                "perturb" if n != 0 => {}
                _ => {}
            }
        }
        p
    }

    fn set_max_fast(&mut self, v: u64) {
        // do_set_mxfast ignores values above MAX_FAST_SIZE (160); set_max_fast: a value under
        // SIZE_SZ → MINSIZE/2 (no chunk qualifies), else (v + SIZE_SZ) & ~MALLOC_ALIGN_MASK.
        if v > 160 {
            return;
        }
        self.max_fast = if v < 8 { 16 } else { (v + 8) & !15 };
    }

    /// A `mallopt(param, value)` call that returned `result`.
    pub fn mallopt(&mut self, param: i32, value: i32, result: i64, time_ns: u64, t_s: f64) {
        if result != 1 {
            return;
        }
        let v = value as i64 as u64;
        let fix = |p: &mut Params, what: &str| {
            p.dynamic = false;
            p.fixed_by = Some(format!("mallopt({what}, {value}) at {t_s:.3} s"));
        };
        match param {
            M_MXFAST => self.set_max_fast(v),
            M_TRIM_THRESHOLD => {
                self.trim_threshold = v;
                fix(self, "M_TRIM_THRESHOLD");
            }
            M_TOP_PAD => {
                self.top_pad = v;
                fix(self, "M_TOP_PAD");
            }
            M_MMAP_THRESHOLD => {
                let old = self.mmap_threshold;
                self.mmap_threshold = v;
                fix(self, "M_MMAP_THRESHOLD");
                if old != v {
                    self.changes.push(ThresholdChange {
                        time_ns,
                        t_s,
                        old,
                        new: v,
                        cause: format!("mallopt(M_MMAP_THRESHOLD, {value})"),
                        dynamic: false,
                        heap_allocations_between: 0,
                        heap_bytes_between: 0,
                    });
                }
            }
            M_MMAP_MAX => {
                self.mmap_max = v;
                fix(self, "M_MMAP_MAX");
            }
            M_ARENA_MAX if value > 0 => {
                self.arena_limit = v;
                self.arena_limit_source = format!("mallopt(M_ARENA_MAX, {value})");
            }
            M_ARENA_TEST => {}
            _ => {}
        }
    }

    /// `__libc_free` of an mmapped chunk whose size field (flags included) is `size_field`.
    /// Returns true when the thresholds moved.
    pub fn free_mmapped(&mut self, size_field: u64, time_ns: u64, t_s: f64) -> bool {
        if self.dynamic && size_field > self.mmap_threshold && size_field <= MMAP_THRESHOLD_MAX {
            let old = self.mmap_threshold;
            let new = size_field & !7;
            self.mmap_threshold = new;
            self.trim_threshold = 2 * new;
            self.changes.push(ThresholdChange {
                time_ns,
                t_s,
                old,
                new,
                cause: format!("free() of a {} mmapped block (the dynamic threshold rule)", super::human(new)),
                dynamic: true,
                heap_allocations_between: 0,
                heap_bytes_between: 0,
            });
            return true;
        }
        false
    }

    /// A heap (not mmapped) allocation of chunk size `csize`: count it against threshold rises
    /// that made it a heap allocation.
    pub fn note_heap_allocation(&mut self, csize: u64) {
        for c in self.changes.iter_mut().filter(|c| c.dynamic && c.new > c.old) {
            if csize >= c.old && csize < c.new {
                c.heap_allocations_between += 1;
                c.heap_bytes_between += csize;
            }
        }
    }

    /// Does a chunk of this size go to a fastbin?
    pub fn is_fast(&self, csize: u64) -> bool {
        csize <= self.max_fast
    }

    /// tcache bin index of a chunk size, when a tcache holds it.
    pub fn tcache_index(&self, csize: u64) -> Option<usize> {
        (self.tcache_count > 0 && csize <= self.tcache_max_chunk && csize >= MINSIZE).then(|| ((csize - MINSIZE) / 16) as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn environment_fixes_the_threshold() {
        let p = Params::from_env(&["MALLOC_MMAP_THRESHOLD_=131072".into()], 2);
        assert!(!p.dynamic);
        assert_eq!(p.mmap_threshold, 131072);
        assert_eq!(p.arena_limit, 16);
        let p = Params::from_env(&["GLIBC_TUNABLES=glibc.malloc.arena_max=4:glibc.malloc.trim_threshold=0x1000".into()], 2);
        assert_eq!(p.arena_limit, 4);
        assert_eq!(p.trim_threshold, 4096);
        assert!(!p.dynamic);
        let p = Params::from_env(&["MALLOC_ARENA_MAX=2".into()], 2);
        assert!(p.dynamic);
        assert_eq!(p.arena_limit, 2);
    }

    #[test]
    fn dynamic_rule_follows_glibc() {
        let mut p = Params::from_env(&[], 2);
        // 1 MiB mmapped chunk: size 1 052 672 | IS_MMAPPED.
        assert!(p.free_mmapped(1_052_672 | 2, 5, 0.0));
        assert_eq!((p.mmap_threshold, p.trim_threshold), (1_052_672, 2_105_344));
        // Never down, never above 32 MiB.
        assert!(!p.free_mmapped(200_000 | 2, 6, 0.0));
        assert!(!p.free_mmapped((40 << 20) | 2, 7, 0.0));
        p.note_heap_allocation(600_000);
        p.note_heap_allocation(100_000);
        assert_eq!(p.changes[0].heap_allocations_between, 1);
        // mallopt fixes it.
        p.mallopt(M_MMAP_THRESHOLD, 131072, 1, 8, 0.0);
        assert!(!p.dynamic);
        assert!(!p.free_mmapped((2 << 20) | 2, 9, 0.0));
        assert_eq!(p.mmap_threshold, 131072);
    }

    #[test]
    fn mxfast_and_tcache_classes() {
        let mut p = Params::from_env(&[], 1);
        assert!(p.is_fast(128) && !p.is_fast(144));
        assert_eq!(p.tcache_index(32), Some(0));
        assert_eq!(p.tcache_index(1040), Some(63));
        assert_eq!(p.tcache_index(1056), None);
        p.mallopt(M_MXFAST, 0, 1, 0, 0.0);
        assert!(!p.is_fast(32));
    }
}
