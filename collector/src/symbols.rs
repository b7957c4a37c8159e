//! Symbolisation of allocation stacks: return addresses → function, file:line, inlined frames,
//! with Rust and C++ names demangled (blazesym on the modules' ELF files and their DWARF).
//!
//! Each module is checked once: its file must still have the build id the preload recorded
//! (else the separate debug file `/usr/lib/debug/.build-id/xx/yyyy.debug` is used when present,
//! else the module's frames stay unresolved and [`Symbols::missing`] says why — a rebuilt binary
//! never gives wrong names). Each distinct address is symbolised once (batched per module) and
//! cached. Unresolved frames read `module+0xoffset`.
//!
//! Return addresses point after the call: the address looked up is `ip − 1`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use blazesym::symbolize::source::{Elf, Source};
use blazesym::symbolize::{Input, Symbolized, Symbolizer};
use rustc_hash::FxHashMap;
use serde::Serialize;

use crate::analysis::stacks::{ModuleDef, StackTable};

/// One symbolised frame (a physical frame expands into several when calls were inlined).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Frame {
    /// Demangled function name, or `module+0xoffset` when unknown.
    pub function: String,
    pub file: Option<String>,
    pub line: Option<u32>,
    /// Path of the module (empty when no module covers the address).
    pub module: String,
    /// This frame was inlined into the next one (same address).
    pub inlined: bool,
    /// The return address (runtime).
    #[serde(skip)]
    pub ip: u64,
}

impl Frame {
    /// `function (file:line)` (file name only), or the function alone.
    pub fn label(&self) -> String {
        match (&self.file, self.line) {
            (Some(f), Some(l)) => format!("{} ({}:{l})", self.function, base_name(f)),
            (Some(f), None) => format!("{} ({})", self.function, base_name(f)),
            _ => self.function.clone(),
        }
    }

    /// Resolved to a function name (not `module+0xoffset`).
    pub fn resolved(&self) -> bool {
        !self.function.contains("+0x") || self.file.is_some()
    }
}

pub fn base_name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

#[derive(Clone, Debug)]
enum ModState {
    Unchecked,
    /// Symbolise from this file.
    Usable(PathBuf),
    Missing,
}

/// Symbols for the stacks of one process image.
pub struct Symbols<'a> {
    table: &'a StackTable,
    /// Shared between images (it caches the files it parsed).
    symbolizer: Rc<Symbolizer>,
    states: Vec<ModState>,
    cache: FxHashMap<(Option<usize>, u64), Rc<[Frame]>>,
    /// Modules whose symbols could not be had, with the reason, by path.
    missing: BTreeMap<String, String>,
    debug_root: PathBuf,
}

/// What [`Symbols`] learnt about one image's table (module checks, symbolised addresses), kept
/// apart from the table so that a table that grows (a trace being analysed while it is written)
/// is symbolised again only for its new addresses: [`Symbols::resume`], [`Symbols::into_cache`].
#[derive(Default)]
pub struct SymbolCache {
    /// `(path, bias)` of the modules the cache was made with, in the table's order (module
    /// indices are part of the keys: a table whose modules differ starts afresh).
    modules: Vec<(String, u64)>,
    states: Vec<ModState>,
    cache: FxHashMap<(Option<usize>, u64), Rc<[Frame]>>,
    missing: BTreeMap<String, String>,
}

impl SymbolCache {
    /// Addresses symbolised so far.
    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }
}

impl<'a> Symbols<'a> {
    pub fn new(table: &'a StackTable) -> Symbols<'a> {
        Symbols::shared(table, Rc::new(symbolizer()))
    }

    /// With a symbolizer shared with other images (one per report: libraries are parsed once).
    pub fn shared(table: &'a StackTable, symbolizer: Rc<Symbolizer>) -> Symbols<'a> {
        Symbols::with_debug_root(table, symbolizer, PathBuf::from("/usr/lib/debug"))
    }

    /// `debug_root`: where `.build-id/xx/yyyy.debug` files are looked for.
    pub fn with_debug_root(table: &'a StackTable, symbolizer: Rc<Symbolizer>, debug_root: PathBuf) -> Symbols<'a> {
        Symbols { table, symbolizer, states: vec![ModState::Unchecked; table.modules.len()], cache: FxHashMap::default(), missing: BTreeMap::new(), debug_root }
    }

    /// Go on with what an earlier [`Symbols`] of the same image learnt (the table may have grown
    /// since: new modules are checked when needed; a table whose earlier modules changed —
    /// reordered, as a fork child's when it inherits — starts afresh).
    pub fn resume(table: &'a StackTable, symbolizer: Rc<Symbolizer>, c: SymbolCache) -> Symbols<'a> {
        let mut s = Symbols::shared(table, symbolizer);
        let same = c.modules.len() <= table.modules.len() && c.modules.iter().zip(&table.modules).all(|((p, b), m)| *p == m.path && *b == m.bias);
        if same {
            let n = table.modules.len();
            s.states = c.states;
            s.states.resize(n, ModState::Unchecked);
            s.cache = c.cache;
            // An address outside every module then may be in one now.
            s.cache.retain(|k, _| k.0.is_some());
            s.missing = c.missing;
        }
        s
    }

    /// What this one learnt, for [`Symbols::resume`].
    pub fn into_cache(self) -> SymbolCache {
        let modules = self.table.modules.iter().map(|m| (m.path.clone(), m.bias)).collect();
        SymbolCache { modules, states: self.states, cache: self.cache, missing: self.missing }
    }

    /// `symbols missing: PATH (reason)` for each module whose frames could not be resolved.
    pub fn missing(&self) -> Vec<String> {
        self.missing.iter().map(|(p, why)| format!("symbols missing: {p} ({why})")).collect()
    }

    /// The frames of stack `id`, innermost first, inlined frames expanded; `None` if the id was
    /// never defined.
    pub fn stack(&mut self, id: u64) -> Option<Vec<Frame>> {
        let def = self.table.stacks.get(&id)?;
        let (ips, t) = (def.frames.clone(), def.time_ns);
        let mut out = Vec::with_capacity(ips.len());
        for &ip in ips.iter() {
            out.extend(self.ip(ip, t).iter().cloned());
        }
        Some(out)
    }

    /// Symbolise every address of these stacks in one batch per module (optional: [`stack`]
    /// does it address by address otherwise).
    pub fn prepare(&mut self, ids: impl IntoIterator<Item = u64>) {
        let mut per_module: FxHashMap<Option<usize>, Vec<u64>> = FxHashMap::default();
        for id in ids {
            let Some(def) = self.table.stacks.get(&id) else { continue };
            for &ip in def.frames.iter() {
                let m = self.table.module_of(ip.saturating_sub(1), def.time_ns);
                if !self.cache.contains_key(&(m, ip)) {
                    per_module.entry(m).or_default().push(ip);
                }
            }
        }
        for (m, mut ips) in per_module {
            ips.sort_unstable();
            ips.dedup();
            self.resolve(m, &ips);
        }
    }

    fn ip(&mut self, ip: u64, time_ns: u64) -> Rc<[Frame]> {
        let m = self.table.module_of(ip.saturating_sub(1), time_ns);
        if let Some(f) = self.cache.get(&(m, ip)) {
            return f.clone();
        }
        self.resolve(m, &[ip]);
        self.cache.get(&(m, ip)).cloned().unwrap_or_else(|| Rc::from(vec![unknown(ip, None)]))
    }

    /// Symbolise `ips` (all in module `m`) into the cache.
    fn resolve(&mut self, m: Option<usize>, ips: &[u64]) {
        let Some(mi) = m else {
            for &ip in ips {
                self.cache.insert((m, ip), Rc::from(vec![unknown(ip, None)]));
            }
            return;
        };
        let module = &self.table.modules[mi];
        let path = match self.check(mi) {
            Some(p) => p,
            None => {
                for &ip in ips {
                    self.cache.insert((m, ip), Rc::from(vec![unknown(ip, Some(module))]));
                }
                return;
            }
        };
        let offsets: Vec<u64> = ips.iter().map(|ip| ip.saturating_sub(1).wrapping_sub(module.bias)).collect();
        let src = Source::Elf(Elf::new(&path));
        let results = self.symbolizer.symbolize(&src, Input::VirtOffset(&offsets[..]));
        let results = match results {
            Ok(r) => r,
            Err(e) => {
                self.missing.entry(module.path.clone()).or_insert_with(|| format!("cannot read: {e}"));
                for &ip in ips {
                    self.cache.insert((m, ip), Rc::from(vec![unknown(ip, Some(module))]));
                }
                return;
            }
        };
        for (&ip, r) in ips.iter().zip(results) {
            let frames = match r {
                Symbolized::Sym(sym) => {
                    let mut v = Vec::with_capacity(1 + sym.inlined.len());
                    // Innermost first: the inlined calls (last is innermost), then the function.
                    for f in sym.inlined.iter().rev() {
                        let (file, line) = code(f.code_info.as_ref());
                        v.push(Frame { function: f.name.to_string(), file, line, module: module.path.clone(), inlined: true, ip });
                    }
                    let (file, line) = code(sym.code_info.as_deref());
                    v.push(Frame { function: sym.name.to_string(), file, line, module: module.path.clone(), inlined: false, ip });
                    v
                }
                Symbolized::Unknown(_) => vec![unknown(ip, Some(module))],
            };
            self.cache.insert((m, ip), Rc::from(frames));
        }
    }

    /// The file to symbolise module `mi` from, checking its build id once.
    fn check(&mut self, mi: usize) -> Option<PathBuf> {
        if let ModState::Unchecked = self.states[mi] {
            let m = &self.table.modules[mi];
            let st = match file_for(m, &self.debug_root) {
                Ok(p) => ModState::Usable(p),
                Err(why) => {
                    if m.path.starts_with('/') {
                        self.missing.insert(m.path.clone(), why);
                    }
                    ModState::Missing
                }
            };
            self.states[mi] = st;
        }
        match &self.states[mi] {
            ModState::Usable(p) => Some(p.clone()),
            _ => None,
        }
    }
}

/// A symbolizer as [`Symbols`] uses it: code locations, inlined frames, demangled names.
pub fn symbolizer() -> Symbolizer {
    Symbolizer::builder().enable_code_info(true).enable_inlined_fns(true).enable_demangling(true).build()
}

/// Where the symbols of module `m` are: its file if its build id matches (or none was recorded),
/// else the debug file of its build id; the reason otherwise.
fn file_for(m: &ModuleDef, debug_root: &Path) -> Result<PathBuf, String> {
    let path = PathBuf::from(&m.path);
    let debug = || -> Option<PathBuf> {
        if m.build_id.len() < 2 {
            return None;
        }
        let hex: String = m.build_id.iter().map(|b| format!("{b:02x}")).collect();
        let p = debug_root.join(".build-id").join(&hex[..2]).join(format!("{}.debug", &hex[2..]));
        p.is_file().then_some(p)
    };
    if !path.is_file() {
        return debug().ok_or_else(|| "file not found".to_string());
    }
    if m.build_id.is_empty() {
        return Ok(path);
    }
    match blazesym::helper::read_elf_build_id(&path) {
        Ok(Some(b)) if b[..] == m.build_id[..] => Ok(path),
        Ok(Some(_)) => debug().ok_or_else(|| "build id mismatch".to_string()),
        Ok(None) => debug().ok_or_else(|| "the file has no build id".to_string()),
        Err(e) => debug().ok_or_else(|| format!("cannot read: {e}")),
    }
}

fn code(ci: Option<&blazesym::symbolize::CodeInfo<'_>>) -> (Option<String>, Option<u32>) {
    match ci {
        Some(c) => (Some(c.to_path().to_string_lossy().into_owned()), c.line),
        None => (None, None),
    }
}

fn unknown(ip: u64, m: Option<&ModuleDef>) -> Frame {
    match m {
        Some(m) => Frame {
            function: format!("{}+{:#x}", base_name(&m.path), ip.saturating_sub(1).wrapping_sub(m.bias)),
            file: None,
            line: None,
            module: m.path.clone(),
            inlined: false,
            ip,
        },
        None => Frame { function: format!("{:#x}", ip), file: None, line: None, module: String::new(), inlined: false, ip },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::stacks::{ModuleDef, StackDef};
    use std::process::Command;

    /// Compile `src` with gcc (extra `args`), return the binary's path.
    fn compile(dir: &Path, name: &str, src: &str, args: &[&str]) -> PathBuf {
        let c = dir.join(format!("{name}.c"));
        std::fs::write(&c, src).unwrap();
        let out = dir.join(name);
        let st = Command::new("gcc").args(args).arg("-o").arg(&out).arg(&c).status().expect("gcc");
        assert!(st.success());
        out
    }

    /// Return addresses (file virtual addresses) of the calls to `callee` inside `func`.
    fn return_addresses(bin: &Path, func: &str, callee: &str) -> Vec<u64> {
        let out = Command::new("objdump").arg("-d").arg("--no-show-raw-insn").arg(bin).output().expect("objdump");
        let text = String::from_utf8_lossy(&out.stdout);
        let mut in_func = false;
        let mut lines = text.lines().peekable();
        let mut ras = Vec::new();
        while let Some(l) = lines.next() {
            if l.ends_with(&format!("<{func}>:")) {
                in_func = true;
                continue;
            }
            if in_func && l.trim().is_empty() {
                break;
            }
            if in_func && l.contains("call") && l.contains(&format!("<{callee}")) {
                let next = lines.peek().unwrap();
                let addr = next.trim().split(':').next().unwrap();
                ras.push(u64::from_str_radix(addr, 16).unwrap());
            }
        }
        ras
    }

    fn table(bin: &Path, bias: u64, build_id: Vec<u8>, ips: &[u64]) -> StackTable {
        let mut t = StackTable::default();
        t.modules.push(ModuleDef { bias, lo: bias, hi: bias + 0x100000, build_id, path: bin.to_string_lossy().into_owned(), loaded_ns: 0, unloaded_ns: None });
        t.stacks.insert(1, StackDef { frames: ips.iter().map(|ip| ip + bias).collect(), time_ns: 1 });
        t
    }

    const SRC: &str = r#"
#include <stdlib.h>
void *volatile sink;
static inline void *helper(size_t n) { void *p = malloc(n); sink = p; return p; }
__attribute__((noinline)) void *outer(size_t n) { void *p = helper(n * 3); sink = p; return p; }
int main(void) { outer(10); return 0; }
"#;

    #[test]
    fn names_files_lines_and_inlined_frames_and_refuses_a_rebuilt_binary() {
        let dir = tempfile_dir();
        let bin = compile(&dir, "inl", SRC, &["-g", "-O2"]);
        let ras = return_addresses(&bin, "outer", "malloc");
        assert_eq!(ras.len(), 1, "one call to malloc in outer");
        let bid = blazesym::helper::read_elf_build_id(&bin).unwrap().unwrap().to_vec();
        let bias = 0x5555_0000_0000;
        let t = table(&bin, bias, bid.clone(), &ras);
        let mut s = Symbols::new(&t);
        s.prepare([1]);
        let f = s.stack(1).unwrap();
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].function, "helper");
        assert!(f[0].inlined);
        assert_eq!(f[0].line, Some(4));
        assert!(f[0].file.as_deref().unwrap().ends_with("inl.c"));
        assert_eq!(f[1].function, "outer");
        assert!(!f[1].inlined);
        assert_eq!(f[1].line, Some(5));
        assert!(s.missing().is_empty());
        assert!(s.stack(2).is_none());

        // The same path with another build id: no names, and the reason.
        let mut wrong = bid.clone();
        wrong[0] ^= 0xff;
        let t = table(&bin, bias, wrong, &ras);
        let mut s = Symbols::with_debug_root(&t, Rc::new(symbolizer()), dir.join("nodebug"));
        let f = s.stack(1).unwrap();
        assert_eq!(f.len(), 1);
        assert_eq!(f[0].function, format!("inl+{:#x}", ras[0] - 1));
        assert_eq!(s.missing(), vec![format!("symbols missing: {} (build id mismatch)", bin.display())]);

        // A debug file found by build id is used instead.
        let hex: String = bid.iter().map(|b| format!("{b:02x}")).collect();
        let dbg = dir.join("debug/.build-id").join(&hex[..2]);
        std::fs::create_dir_all(&dbg).unwrap();
        std::fs::copy(&bin, dbg.join(format!("{}.debug", &hex[2..]))).unwrap();
        let gone = dir.join("gone");
        let mut t = table(&gone, bias, bid, &ras);
        t.modules[0].path = gone.to_string_lossy().into_owned();
        let mut s = Symbols::with_debug_root(&t, Rc::new(symbolizer()), dir.join("debug"));
        let f = s.stack(1).unwrap();
        assert_eq!(f[1].function, "outer", "{f:?}");
        assert!(s.missing().is_empty());
    }

    #[test]
    fn a_resumed_cache_does_not_look_addresses_up_again_and_starts_afresh_on_other_modules() {
        let dir = tempfile_dir().join("resume");
        std::fs::create_dir_all(&dir).unwrap();
        let bin = compile(&dir, "inl", SRC, &["-g", "-O2"]);
        let ras = return_addresses(&bin, "outer", "malloc");
        let bias = 0x5555_0000_0000;
        let mut t = table(&bin, bias, vec![], &ras);
        let sym = Rc::new(symbolizer());
        let mut s = Symbols::shared(&t, sym.clone());
        assert_eq!(s.stack(1).unwrap()[1].function, "outer");
        let c = s.into_cache();
        assert_eq!(c.len(), 1);
        // The file is gone: only the cache can still name the frames.
        std::fs::remove_file(&bin).unwrap();
        // The table grew meanwhile (a new module, a new stack).
        t.modules.push(ModuleDef { bias: 1 << 40, lo: 1 << 40, hi: (1 << 40) + 0x1000, build_id: vec![], path: "/nonexistent/libnew.so".into(), loaded_ns: 0, unloaded_ns: None });
        t.stacks.insert(2, StackDef { frames: vec![(1 << 40) + 0x10].into(), time_ns: 1 });
        let mut s = Symbols::resume(&t, sym.clone(), c);
        assert_eq!(s.stack(1).unwrap()[1].function, "outer", "from the cache");
        assert_eq!(s.stack(2).unwrap()[0].function, "libnew.so+0xf");
        let c = s.into_cache();
        assert_eq!(c.len(), 2);
        // Other modules in front: the cache is dropped.
        t.modules.swap(0, 1);
        let mut s = Symbols::resume(&t, sym, c);
        assert_eq!(s.stack(1).unwrap()[0].function, format!("inl+{:#x}", ras[0] - 1));
    }

    fn tempfile_dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("mtrace-symbols-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }
}
