//! Allocation stacks recorded by the preload: the frames of known call chains (with and without
//! frame pointers), interning (one definition per distinct stack, every allocation carrying its
//! id), modules loaded and unloaded at run time, threads, `--no-stacks` and byte sampling.
//!
//! The fixture prints the run-time addresses of its functions; `nm -S` gives their sizes, so a
//! return address `ip` is "in f" when `ip - 1` lies in f's range.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use mtrace_protocol::event::EventKind;
use mtrace_tests::*;

/// Compile `src` (in tests/fixtures/) with `compiler` and `flags` into `out` (in the fixtures
/// directory), unless `out` is newer than the source; atomically (concurrent test binaries).
fn compile(compiler: &str, src: &Path, flags: &[&str], out_name: &str) -> PathBuf {
    let p = paths();
    let out = p.fixtures_out.join(out_name);
    let mtime = |f: &Path| std::fs::metadata(f).and_then(|m| m.modified()).ok();
    if mtime(&out).is_none() || mtime(&out) < mtime(src) {
        let tmp = out.with_extension(format!("tmp{}", std::process::id()));
        let o = Command::new(compiler).args(flags).args(["-g", "-o"]).arg(&tmp).arg(src).output().expect(compiler);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::rename(&tmp, &out).unwrap();
    }
    out
}

/// The fixture compiled with `flags`, named `name`.
fn build(name: &str, flags: &[&str]) -> PathBuf {
    let src = paths().workspace.join("tests/fixtures/stacks.c");
    let mut f = flags.to_vec();
    f.extend_from_slice(&["-pthread", "-ldl"]);
    compile("gcc", &src, &f, name)
}

fn build_lib() -> PathBuf {
    let src = paths().workspace.join("tests/fixtures/stacks_lib.c");
    compile("gcc", &src, &["-O2", "-shared", "-fPIC", "-Wl,--build-id"], "libstackslib.so")
}

/// Run-time ranges of the fixture's functions: (start, end) by name.
fn ranges(bin: &Path, stdout: &str) -> HashMap<String, (u64, u64)> {
    let syms = symbol_ranges(bin);
    let printed: HashMap<String, u64> = stdout
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() == 3 && f[0] == "sym").then(|| (f[1].to_string(), u64::from_str_radix(f[2].trim_start_matches("0x"), 16).unwrap()))
        })
        .collect();
    let bias = printed["main"] - syms["main"].0;
    printed.keys().map(|k| (k.clone(), (syms[k].0 + bias, syms[k].1 + bias))).collect()
}

fn inside(ip: u64, r: (u64, u64)) -> bool {
    r.0 <= ip - 1 && ip - 1 < r.1
}

fn run(bin: &Path, args: &[&str], opts: &[&str], env: &[(&str, &str)]) -> (Recorded, RawImage) {
    let mut cmd = vec![bin.to_str().unwrap()];
    cmd.extend_from_slice(args);
    let r = record(opts, &cmd, env);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let mut images = raw_events(&r.trace);
    assert_eq!(images.len(), 1);
    let img = images.remove(0);
    (r, img)
}

/// main → chain_a → chain_b → malloc(24), a million times: one stack, defined once, on every
/// one of those allocations, with ip[0] in chain_b, ip[1] in chain_a, ip[2] in main.
fn check_chain(flags: &[&str], tag: &str) {
    let _turn = heavy();
    let bin = build(tag, flags);
    let (r, img) = run(&bin, &["chain", "1000000"], &[], &[]);
    let fns = ranges(&bin, &r.stdout());
    let ours: Vec<u64> = img.allocs.iter().filter(|a| a.1 == EventKind::Malloc && a.2 == 24).map(|a| a.3).collect();
    assert!(ours.len() >= 1_000_000, "{}", ours.len());
    let id = ours[ours.len() - 1];
    assert_ne!(id, 0);
    let n_with_id = ours.iter().filter(|&&s| s == id).count();
    assert_eq!(n_with_id, 1_000_000, "every allocation of the loop carries the loop's stack id");
    assert_eq!(img.stack_defs.get(&id), Some(&1), "the loop's stack is defined exactly once");
    assert!(img.stack_defs.values().all(|&n| n == 1), "no stack defined twice");
    let f = &img.stacks[&id];
    assert!(f.len() >= 3, "{f:x?}");
    assert!(inside(f[0], fns["chain_b"]), "ip[0] {:#x} not in chain_b {:x?}", f[0], fns["chain_b"]);
    assert!(inside(f[1], fns["chain_a"]), "ip[1] {:#x} not in chain_a {:x?}", f[1], fns["chain_a"]);
    assert!(inside(f[2], fns["main"]), "ip[2] {:#x} not in main {:x?}", f[2], fns["main"]);
    // Every allocation after registration carries a stack; every id used is defined.
    for a in &img.allocs {
        assert!(a.3 == 0 || img.stacks.contains_key(&a.3), "undefined stack id {:#x}", a.3);
    }
    // The executable is among the modules, with its path and a build id.
    let exe = std::fs::canonicalize(&bin).unwrap();
    assert!(img.modules.iter().any(|m| Path::new(&m.4) == exe && m.3.len() == 20 && m.1 <= f[0] && f[0] < m.2), "{:?}", img.modules);
}

#[test]
fn chain_without_frame_pointers() {
    check_chain(&["-O2", "-fomit-frame-pointer"], "stacks-o2");
}

#[test]
fn chain_with_frame_pointers() {
    check_chain(&["-O2", "-fno-omit-frame-pointer"], "stacks-o2-fp");
}

fn build_id_of(lib: &Path) -> Vec<u8> {
    let o = Command::new("readelf").arg("-n").arg(lib).output().expect("readelf (binutils)");
    let text = String::from_utf8_lossy(&o.stdout);
    let hex = text.lines().find_map(|l| l.trim().strip_prefix("Build ID: ")).expect("a build id").trim().to_string();
    (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect()
}

/// A library loaded with dlopen allocates: its Module event (path, build id) is there, the
/// allocation's ip[0] lies in it (in lib_alloc), and its ModuleUnload follows the dlclose.
#[test]
fn dlopen_module_and_unload() {
    let _turn = heavy();
    let bin = build("stacks-o2", &["-O2", "-fomit-frame-pointer"]);
    let lib = build_lib();
    let (r, img) = run(&bin, &["dl", lib.to_str().unwrap()], &[], &[]);
    let m = img.modules.iter().find(|m| Path::new(&m.4) == lib).unwrap_or_else(|| panic!("no Module for {}: {:?}", lib.display(), img.modules));
    assert_eq!(m.3, build_id_of(&lib));
    let a = img.allocs.iter().find(|a| a.2 == 777).expect("the library's allocation");
    assert_ne!(a.3, 0);
    let f = &img.stacks[&a.3];
    assert!(m.1 <= f[0] && f[0] < m.2, "ip[0] {:#x} not in the library {:#x}..{:#x}", f[0], m.1, m.2);
    let lib_alloc = r.stdout().lines().find_map(|l| l.strip_prefix("lib_alloc ")).map(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).unwrap()).unwrap();
    let size = symbol_ranges(&lib)["lib_alloc"];
    assert!(inside(f[0], (lib_alloc, lib_alloc + size.1 - size.0)), "ip[0] {:#x} not in lib_alloc", f[0]);
    let fns = ranges(&bin, &r.stdout());
    assert!(inside(f[1], fns["main"]), "ip[1] {:#x} not in main", f[1]);
    assert!(img.unloads.contains(&m.0), "no ModuleUnload for bias {:#x}: {:?}", m.0, img.unloads);
}

/// 8 threads, each allocating from its own function: each thread's allocations carry a stack
/// whose ip[0] is in its function.
#[test]
fn threads_have_their_own_stacks() {
    let _turn = heavy();
    let bin = build("stacks-o2", &["-O2", "-fomit-frame-pointer"]);
    let (r, img) = run(&bin, &["threads", "20000"], &[], &[]);
    let fns = ranges(&bin, &r.stdout());
    for i in 0..8u64 {
        let mine: Vec<_> = img.allocs.iter().filter(|a| a.2 == 1000 + i).collect();
        assert_eq!(mine.len(), 20000, "worker {i}");
        let streams: std::collections::HashSet<u32> = mine.iter().map(|a| a.0).collect();
        assert_eq!(streams.len(), 1);
        for a in &mine {
            assert_ne!(a.3, 0, "worker {i}: allocation without a stack");
        }
        let ids: std::collections::HashSet<u64> = mine.iter().map(|a| a.3).collect();
        for id in ids {
            let f = &img.stacks[&id];
            assert!(inside(f[0], fns[&format!("worker_{i}")]), "worker {i}: ip[0] {:#x}", f[0]);
        }
    }
    assert!(img.stack_defs.values().all(|&n| n == 1), "no stack defined twice");
}

/// `--no-stacks`: no Stack event, no stack word.
#[test]
fn no_stacks() {
    let _turn = heavy();
    let bin = build("stacks-o2", &["-O2", "-fomit-frame-pointer"]);
    let (_, img) = run(&bin, &["chain", "1000"], &["--no-stacks"], &[]);
    assert!(img.stacks.is_empty());
    assert_eq!(img.with_stack_flag, 0);
    assert!(img.allocs.iter().all(|a| a.3 == 0));
    assert!(img.allocs.len() >= 1000);
}

/// `--stack-sample-bytes N`: a thread's allocation that crosses each N bytes gets a stack:
/// floor(bytes / N) of them, less at most what the thread allocated before recording began.
#[test]
fn sampled_by_bytes() {
    let _turn = heavy();
    let bin = build("stacks-o2", &["-O2", "-fomit-frame-pointer"]);
    let (_, img) = run(&bin, &["sample", "100000"], &["--stack-sample-bytes", "10000"], &[]);
    let main = img.allocs.iter().find(|a| a.2 == 100).unwrap().0;
    let bytes: u64 = img.allocs.iter().filter(|a| a.0 == main).map(|a| a.2).sum();
    let sampled = img.allocs.iter().filter(|a| a.0 == main && a.3 != 0).count() as u64;
    let expected = bytes / 10000;
    assert!(bytes >= 10_000_000);
    assert!(sampled <= expected && sampled + 1 >= expected, "sampled {sampled}, bytes {bytes}, expected {expected}");
    // The loop's samples all carry the loop's stack.
    let loop_ids: std::collections::HashSet<u64> = img.allocs.iter().filter(|a| a.2 == 100 && a.3 != 0).map(|a| a.3).collect();
    assert_eq!(loop_ids.len(), 1);
    let n_loop = img.allocs.iter().filter(|a| a.2 == 100 && a.3 != 0).count();
    assert!((999..=1000).contains(&n_loop), "{n_loop}");
}

/// A fork child's stack ids continue its parent's: the same chain has the same id in both
/// images (defined in the parent), a stack new in the child is defined in the child's stream,
/// and the child's stream has the modules again.
#[test]
fn fork_child_ids_continue() {
    let _turn = heavy();
    let bin = build("stacks-o2", &["-O2", "-fomit-frame-pointer"]);
    let mut cmd = vec![bin.to_str().unwrap()];
    cmd.extend_from_slice(&["fork", "1000"]);
    let r = record(&[], &cmd, &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let fns = ranges(&bin, &r.stdout());
    let images = raw_events(&r.trace);
    assert_eq!(images.len(), 2);
    let (parent, child) = (&images[0], &images[1]);
    let chain_id = |img: &RawImage| {
        let ids: std::collections::HashSet<u64> = img.allocs.iter().filter(|a| a.2 == 24).map(|a| a.3).collect();
        assert_eq!(ids.len(), 1, "{ids:?}");
        ids.into_iter().next().unwrap()
    };
    let id = chain_id(parent);
    assert_ne!(id, 0);
    assert_eq!(chain_id(child), id, "the child's id for the same stack is its parent's: {:x?} vs {:x?}", parent.stacks.get(&id), child.stacks.get(&chain_id(child)));
    assert_eq!(parent.stack_defs.get(&id), Some(&1));
    assert_eq!(child.stack_defs.get(&id), None, "inherited, not defined again");
    let own = child.allocs.iter().find(|a| a.2 == 4242).expect("the child's own allocation").3;
    assert_ne!(own, 0);
    assert!(inside(child.stacks[&own][0], fns["child_only"]));
    let exe = std::fs::canonicalize(&bin).unwrap();
    assert!(child.modules.iter().any(|m| Path::new(&m.4) == exe), "the child's stream lists the modules");
}

/// C++ `new`: ip[0] is in libstdc++'s operator new (the caller of malloc), ip[1] in the program.
#[test]
fn cxx_operator_new() {
    let _turn = heavy();
    let src = paths().workspace.join("tests/fixtures/stacks_new.cpp");
    let bin = compile("g++", &src, &["-O2"], "stacks_new");
    let (r, img) = run(&bin, &[], &[], &[]);
    let fns = ranges(&bin, &r.stdout());
    let a = img.allocs.iter().find(|a| a.2 == 4000).expect("new int[1000]");
    let f = &img.stacks[&a.3];
    let stdcxx = img.modules.iter().find(|m| m.4.contains("libstdc++")).expect("libstdc++ module");
    assert!(stdcxx.1 <= f[0] && f[0] < stdcxx.2, "ip[0] {:#x} not in libstdc++", f[0]);
    assert!(inside(f[1], fns["make"]), "ip[1] {:#x} not in make", f[1]);
}

/// A successful malloc leaves errno alone, also on each thread's first allocation with a stack
/// (the preload's per-thread set-up makes system calls that may fail).
#[test]
fn errno_is_kept_across_allocations() {
    let bin = fixture("stacks_errno");
    let r = record(&[], &[bin.to_str().unwrap()], &[]);
    assert_eq!(r.code(), Some(0), "{}{}", String::from_utf8_lossy(&r.output.stdout), r.stderr());
    assert_eq!(String::from_utf8_lossy(&r.output.stdout), "errno kept\n");
}

/// Every exported entry point written in assembly (the allocation trampolines, dlopen and
/// dlmopen) has call-frame information: debuggers, profilers and crash handlers unwind through
/// them.
#[test]
fn assembly_entry_points_have_unwind_info() {
    let lib = paths().preload();
    let nm = Command::new("nm").arg("-D").arg("--defined-only").arg(&lib).output().expect("nm");
    let nm = String::from_utf8_lossy(&nm.stdout);
    let fde = Command::new("readelf").arg("--debug-dump=frames").arg(&lib).output().expect("readelf");
    let fde = String::from_utf8_lossy(&fde.stdout);
    // "... FDE cie=00000000 pc=000000000001112c..000000000001114e"
    let ranges: Vec<(u64, u64)> = fde
        .lines()
        .filter_map(|l| l.split("pc=").nth(1))
        .filter_map(|r| r.split_once(".."))
        .filter_map(|(a, b)| Some((u64::from_str_radix(a.trim(), 16).ok()?, u64::from_str_radix(b.trim(), 16).ok()?)))
        .collect();
    assert!(!ranges.is_empty(), "no FDEs in {}", lib.display());
    for name in ["malloc", "calloc", "realloc", "reallocarray", "memalign", "aligned_alloc", "valloc", "pvalloc", "posix_memalign", "dlopen", "dlmopen"] {
        let addr = nm
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 3 && f[2] == name).then(|| u64::from_str_radix(f[0], 16).unwrap())
            })
            .unwrap_or_else(|| panic!("{name} not exported"));
        assert!(ranges.iter().any(|&(lo, hi)| lo <= addr && addr < hi), "{name} at {addr:#x} has no FDE");
    }
}
