//! Real programs run unchanged under the tracer: same stdout and exit code as without it, through
//! `mtracer record` and through a plain `LD_PRELOAD`; and their traces read back. A hang or an
//! exit 134 would be a bug of ours.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use mtrace_tests::*;

fn bare(cmd: &[&str], dir: &Path) -> Output {
    Command::new(cmd[0]).args(&cmd[1..]).current_dir(dir).stdin(Stdio::null()).output().unwrap()
}

fn preloaded(cmd: &[&str], dir: &Path, trace: &Path) -> Output {
    Command::new(cmd[0])
        .args(&cmd[1..])
        .current_dir(dir)
        .env("LD_PRELOAD", paths().preload())
        .env("MTRACE_OUTPUT", trace)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// Run `cmd` bare, under `mtracer record` and under plain LD_PRELOAD; compare; check the traces:
/// nothing lost, nothing unmatched, no anomaly at all, and exactly one thread in every image —
/// unless the program starts threads: then at least one image ran two or more.
fn same_behaviour(name: &str, cmd: &[&str], dir: &Path) {
    let threaded = ["python3", "xz", "zstd", "sort", "git-gc"].contains(&name);
    let want = bare(cmd, dir);
    assert!(want.status.success(), "{name} fails even without the tracer: {}", String::from_utf8_lossy(&want.stderr));
    let r = {
        let trace = dir.join(format!("{name}.record.mtr"));
        let o = Command::new(paths().mtracer())
            .args(["record", "-q", "-o"])
            .arg(&trace)
            .arg("--")
            .args(cmd)
            .current_dir(dir)
            .stdin(Stdio::null())
            .output()
            .unwrap();
        (o, trace)
    };
    let p = {
        let trace = dir.join(format!("{name}.preload.mtr"));
        (preloaded(cmd, dir, &trace), trace)
    };
    for (how, (o, trace)) in [("record", &r), ("LD_PRELOAD", &p)] {
        assert_eq!(o.status.code(), want.status.code(), "{name} under {how}: {}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&want.stdout), "{name} under {how}: stdout differs");
        let rep = report_json(trace);
        let procs = rep["processes"].as_array().unwrap();
        assert!(!procs.is_empty(), "{name} under {how}: no process in the trace");
        let allocs: u64 = procs.iter().map(|p| num(p, "alloc_count")).sum();
        assert!(allocs > 0, "{name} under {how}: no allocation seen");
        if threaded {
            // Else the program did not exercise what this test is for.
            let most = procs.iter().map(|p| num(p, "threads")).max().unwrap();
            assert!(most >= 2, "{name} under {how}: no image ran more than {most} thread(s)");
        }
        for p in procs {
            assert_eq!(num(p, "lost_events"), 0, "{name} under {how}");
            assert_eq!(num(p, "unmatched_frees"), 0, "{name} under {how}: {}", p["exe"]);
            assert_eq!(anomalies(p), vec![], "{name} under {how}: {}", p["exe"]);
            if !threaded {
                assert_eq!(num(p, "threads"), 1, "{name} under {how}: {}", p["exe"]);
            }
        }
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {tool}")]).output().is_ok_and(|o| o.status.success())
}

#[test]
fn python3() {
    let dir = tempfile::tempdir().unwrap();
    let script = "import json, threading\n\
        d = {str(i): [i] * (i % 7) for i in range(20000)}\n\
        out = []\n\
        def work(n): out.append(sum(len(v) for k, v in d.items() if int(k) % n == 0))\n\
        ts = [threading.Thread(target=work, args=(n,)) for n in range(1, 5)]\n\
        [t.start() for t in ts]; [t.join() for t in ts]\n\
        print(json.dumps(sorted(out)))\n";
    std::fs::write(dir.path().join("s.py"), script).unwrap();
    same_behaviour("python3", &["python3", "s.py"], dir.path());
}

#[test]
fn perl() {
    let dir = tempfile::tempdir().unwrap();
    same_behaviour("perl", &["perl", "-e", "my %h; $h{$_} = [1..($_ % 9)] for 1..20000; my $n = 0; $n += @$_ for values %h; print \"$n\\n\";"], dir.path());
}

/// A fresh git repository in `d` with a committer set; returns a runner of git commands there.
fn git_repo(d: &Path) -> impl Fn(&[&str]) + '_ {
    let git = move |args: &[&str]| assert!(Command::new("git").args(args).current_dir(d).output().unwrap().status.success(), "git {args:?}");
    git(&["init", "-q"]);
    git(&["config", "user.email", "t@example.com"]);
    git(&["config", "user.name", "t"]);
    git
}

#[test]
fn git() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let git = git_repo(d);
    std::fs::write(d.join("a.txt"), "hello\n").unwrap();
    git(&["add", "a.txt"]);
    git(&["commit", "-q", "-m", "first"]);
    same_behaviour("git", &["git", "log", "--format=%s %an", "--stat"], d);
}

#[test]
fn sqlite3() {
    assert!(have("sqlite3"), "sqlite3 is needed (apt-get install sqlite3)");
    let dir = tempfile::tempdir().unwrap();
    same_behaviour(
        "sqlite3",
        &["sqlite3", ":memory:", "create table t(a, b); with recursive c(x) as (select 1 union all select x + 1 from c where x < 20000) insert into t select x, hex(randomblob(16)) from c; select count(*), sum(a) from t;"],
        dir.path(),
    );
}

#[test]
fn gcc_compiling_a_small_file() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.c"), "#include <stdio.h>\nint main(void) { puts(\"hi\"); return 0; }\n").unwrap();
    // gcc runs cc1, as and ld: exec'd and spawned images join the trace.
    same_behaviour("gcc", &["gcc", "-O2", "-o", "hello", "hello.c"], dir.path());
    let o = Command::new(dir.path().join("hello")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&o.stdout), "hi\n");
}

/// Text that compresses and sorts: `n` lines of pseudo-random words.
fn text(n: usize) -> String {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut out = String::new();
    for i in 0..n {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push_str(&format!("{:08x} line {i} {}\n", x >> 32, "word ".repeat((x % 13) as usize)));
    }
    out
}

/// Multi-threaded real programs: their threads hand blocks to each other; every trace has no
/// unmatched free and no anomaly (and the output is the untraced one).
#[test]
fn xz_and_zstd_with_two_threads() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data"), text(300_000)).unwrap();
    assert!(have("xz"), "xz is needed (apt-get install xz-utils)");
    // Blocks of 1 MiB: the input is split between the two threads.
    same_behaviour("xz", &["xz", "-T2", "--block-size=1MiB", "-1", "-c", "data"], dir.path());
    assert!(have("zstd"), "zstd is needed (apt-get install zstd)");
    same_behaviour("zstd", &["zstd", "-T2", "-1", "-q", "-c", "data"], dir.path());
}

#[test]
fn sort_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("data"), text(200_000)).unwrap();
    same_behaviour("sort", &["sort", "--parallel=2", "-S", "64M", "data"], dir.path());
}

#[test]
fn gxx_with_parallel_lto() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.cpp"), "#include <string>\n#include <vector>\nint f(int);\nint main() { std::vector<std::string> v(10, \"x\"); return f(v.size()) == 70 ? 0 : 1; }\n").unwrap();
    std::fs::write(dir.path().join("b.cpp"), "int f(int x) { return x * 7; }\n").unwrap();
    same_behaviour("g++", &["g++", "-O2", "-flto=2", "-o", "lto", "a.cpp", "b.cpp"], dir.path());
    assert!(Command::new(dir.path().join("lto")).status().unwrap().success());
}

#[test]
fn git_gc() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let git = git_repo(d);
    git(&["config", "pack.threads", "2"]);
    for i in 0..40 {
        std::fs::write(d.join(format!("f{}", i % 7)), text(200 + i * 10)).unwrap();
        git(&["add", "-A"]);
        git(&["commit", "-q", "-m", &format!("c{i}")]);
    }
    same_behaviour("git-gc", &["git", "gc", "-q", "--aggressive"], d);
}
