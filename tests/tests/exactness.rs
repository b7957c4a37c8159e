//! Exactness: the exactness fixture calls every hooked entry point (edge cases included) and
//! prints its own ground truth; the report must match it number for number — through the
//! launcher and through a bare `LD_PRELOAD`.

use mtrace_tests::*;

fn check(p: &Value, truth: &std::collections::HashMap<String, u64>) {
    assert!(truth.len() >= 25, "fixture printed too little:\n{truth:?}");
    for (k, want) in truth {
        let got = match k.strip_prefix("calls.") {
            Some(f) => p["calls"][f].as_u64().unwrap_or(0),
            None => num(p, k),
        };
        assert_eq!(got, *want, "{k}: report {got}, fixture {want}");
    }
    assert_eq!(num(p, "unmatched_frees"), 0);
    assert_eq!(num(p, "lost_events"), 0);
    assert_eq!(anomalies(p), vec![]);
}

#[test]
fn every_entry_point_is_counted_exactly_under_record() {
    let r = record(&[], &[fixture("exactness").to_str().unwrap()], &[]);
    assert_eq!(r.code(), Some(0), "{}", r.stderr());
    let rep = r.report();
    let procs = rep["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1);
    check(&procs[0], &truth(&r.stdout()));
    assert_eq!(procs[0]["ending"], "exited");
    assert_eq!(rep["complete"], true);
}

#[test]
fn every_entry_point_is_counted_exactly_under_plain_ld_preload() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("plain.mtr");
    let o = std::process::Command::new(fixture("exactness"))
        .env("LD_PRELOAD", paths().preload())
        .env("MTRACE_OUTPUT", &out)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&o.stderr);
    // One line on stderr says where the trace goes.
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains(out.to_str().unwrap()), "{stderr}");
    // The report waits for the agent to finish writing.
    let rep = report_json(&out);
    let procs = rep["processes"].as_array().unwrap();
    assert_eq!(procs.len(), 1);
    check(&procs[0], &truth(&String::from_utf8_lossy(&o.stdout)));
}

#[test]
fn default_trace_name_is_mtrace_pid_in_the_working_directory() {
    let dir = tempfile::tempdir().unwrap();
    let o = std::process::Command::new(fixture("exactness")).current_dir(dir.path()).env("LD_PRELOAD", paths().preload()).output().unwrap();
    assert_eq!(o.status.code(), Some(0));
    let names: Vec<String> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(names[0].starts_with("mtrace.") && names[0].ends_with(".mtr"), "{names:?}");
    let pid: u32 = names[0].trim_start_matches("mtrace.").trim_end_matches(".mtr").parse().unwrap();
    let rep = report_json(&dir.path().join(&names[0]));
    assert_eq!(num(&rep["processes"][0], "pid"), pid as u64);
}
