//! The call stacks and loaded modules of one process image, as the preload defined them
//! (`Stack`, `Module`, `ModuleUnload` events; see `mtrace_protocol::event`).
//!
//! Definitions are not ordered against the allocations that use them: a stack id may be used
//! before its definition arrives, and may be defined twice (identically). The table is therefore
//! collected from every chunk as it is decoded (not in merged order) and consulted only after
//! the analysis. Modules keep the time they were loaded and unloaded, so that an address is
//! resolved against the object that was mapped there when the stack was taken (a library
//! unloaded and another loaded at the same place).

use mtrace_protocol::event::{module_build_id, module_path, stack_frames};
use rustc_hash::FxHashMap;

/// One loaded object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModuleDef {
    /// Load bias (`dlpi_addr`): file virtual address = runtime address − bias.
    pub bias: u64,
    /// Lowest and highest runtime address of its `PT_LOAD` segments.
    pub lo: u64,
    pub hi: u64,
    /// GNU build id (empty if none).
    pub build_id: Vec<u8>,
    pub path: String,
    /// Time mark of the stream that announced it.
    pub loaded_ns: u64,
    /// When a `ModuleUnload` with its bias followed.
    pub unloaded_ns: Option<u64>,
}

/// A stack definition: return addresses, innermost first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StackDef {
    pub frames: Box<[u64]>,
    /// Time mark of the stream that defined it (to pick the module mapped then).
    pub time_ns: u64,
}

/// Stack and module definitions of one image.
#[derive(Clone, Debug, Default)]
pub struct StackTable {
    pub stacks: FxHashMap<u64, StackDef>,
    /// In the order they were announced.
    pub modules: Vec<ModuleDef>,
    /// Definitions of one id that disagreed (a preload bug; the first is kept).
    pub conflicting: u64,
}

impl StackTable {
    /// Record a `Stack` event whose words start at `w[0]`.
    pub fn define_stack(&mut self, id: u64, w: &[u64], time_ns: u64) {
        let frames = stack_frames(w);
        match self.stacks.get(&id) {
            Some(d) if *d.frames == *frames => {}
            Some(_) => self.conflicting += 1,
            None => {
                self.stacks.insert(id, StackDef { frames: frames.into(), time_ns });
            }
        }
    }

    /// Record a `Module` event whose words start at `w[0]`.
    pub fn define_module(&mut self, bias: u64, lo: u64, hi: u64, w: &[u64], time_ns: u64) {
        let mut buf = vec![0u8; 256];
        let n = module_build_id(w, &mut buf);
        let build_id = buf[..n].to_vec();
        let (_, len, aux) = mtrace_protocol::event::split_header(w[0]);
        let _ = len;
        let mut pbuf = vec![0u8; (aux & 0xffff) as usize];
        let n = module_path(w, &mut pbuf);
        let path = String::from_utf8_lossy(&pbuf[..n]).into_owned();
        // The same object announced again (registration, then a dlopen that listed it too).
        if self.modules.iter().any(|m| m.unloaded_ns.is_none() && m.bias == bias && m.lo == lo && m.hi == hi && m.path == path) {
            return;
        }
        self.modules.push(ModuleDef { bias, lo, hi, build_id, path, loaded_ns: time_ns, unloaded_ns: None });
    }

    pub fn unload_module(&mut self, bias: u64, time_ns: u64) {
        if let Some(m) = self.modules.iter_mut().rev().find(|m| m.bias == bias && m.unloaded_ns.is_none()) {
            m.unloaded_ns = Some(time_ns);
        }
    }

    /// The module that held runtime address `ip` at `time_ns` (the one mapped then if several
    /// objects were mapped there over time; else any that covers it).
    pub fn module_of(&self, ip: u64, time_ns: u64) -> Option<usize> {
        let covers = |m: &ModuleDef| m.lo <= ip && ip <= m.hi;
        let mapped = |m: &ModuleDef| m.loaded_ns <= time_ns && m.unloaded_ns.is_none_or(|u| time_ns <= u);
        self.modules
            .iter()
            .rposition(|m| covers(m) && mapped(m))
            .or_else(|| self.modules.iter().rposition(covers))
    }

    /// A fork child inherits its parent's definitions (its ids continue the parent's).
    pub fn inherit(&mut self, parent: &StackTable) {
        for (id, d) in &parent.stacks {
            self.stacks.entry(*id).or_insert_with(|| d.clone());
        }
        let mut mods = parent.modules.clone();
        for m in self.modules.drain(..) {
            if !mods.contains(&m) {
                mods.push(m);
            }
        }
        self.modules = mods;
    }

    pub fn is_empty(&self) -> bool {
        self.stacks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mtrace_protocol::event::{encode_module, header, EventKind, MAX_EVENT_WORDS};

    #[test]
    fn definitions_duplicates_and_modules() {
        let mut t = StackTable::default();
        let w = [header(EventKind::Stack, 4, 2), 7, 0x1000, 0x2000];
        t.define_stack(7, &w, 5);
        t.define_stack(7, &w, 9);
        assert_eq!(t.conflicting, 0);
        assert_eq!(&*t.stacks[&7].frames, &[0x1000, 0x2000]);
        let w2 = [header(EventKind::Stack, 3, 1), 7, 0x1000];
        t.define_stack(7, &w2, 9);
        assert_eq!(t.conflicting, 1);

        let mut out = [0u64; MAX_EVENT_WORDS];
        let n = encode_module(0x400000, 0x400000, 0x401fff, &[1, 2, 3], b"/bin/a", &mut out);
        t.define_module(0x400000, 0x400000, 0x401fff, &out[..n], 1);
        t.define_module(0x400000, 0x400000, 0x401fff, &out[..n], 2);
        assert_eq!(t.modules.len(), 1);
        assert_eq!(t.modules[0].path, "/bin/a");
        assert_eq!(t.modules[0].build_id, vec![1, 2, 3]);
        // Unloaded, and another object at the same place.
        t.unload_module(0x400000, 10);
        let n = encode_module(0x400000, 0x400000, 0x401fff, &[], b"/lib/b.so", &mut out);
        t.define_module(0x400000, 0x400000, 0x401fff, &out[..n], 20);
        assert_eq!(t.module_of(0x400100, 5), Some(0));
        assert_eq!(t.module_of(0x400100, 25), Some(1));
        assert_eq!(t.module_of(0x500000, 25), None);
    }
}
