//! Folded stacks (`outermost;…;innermost bytes`, the input of flamegraph tools) and a
//! flamegraph SVG drawn from them with inferno.

use std::collections::BTreeMap;
use std::io::Write;

use anyhow::{bail, Result};

use super::Weight;
use crate::analysis::image::ImageAnalysis;
use crate::analysis::sites::SiteAmount;
use crate::report::sites::SiteNamer;
use crate::symbols::Frame;

/// A frame's name in folded stacks (no `;`, no line breaks).
fn name(f: &Frame) -> String {
    f.function.replace([';', '\n', '\r'], ":")
}

/// The path of a stack, outermost first.
pub fn path(frames: &[Frame]) -> String {
    frames.iter().rev().map(name).collect::<Vec<_>>().join(";")
}

/// Fold weighted stacks into sorted lines, one per distinct path (stacks whose frames read the
/// same — two stack ids, or return addresses in the same functions — are summed into one line).
pub fn fold(stacks: impl IntoIterator<Item = (Vec<Frame>, u64)>) -> Vec<(String, u64)> {
    let mut m: BTreeMap<String, u64> = BTreeMap::new();
    for (frames, v) in stacks {
        if v > 0 {
            *m.entry(path(&frames)).or_insert(0) += v;
        }
    }
    m.into_iter().collect()
}

/// The amounts of one image by site for `w`.
pub fn amounts(img: &ImageAnalysis, w: Weight) -> Vec<SiteAmount> {
    let s = &img.model.sites;
    match w {
        Weight::Peak => s.at_peak(),
        Weight::Leaked => s.live_now(),
        Weight::Allocated => s.by_stack.iter().map(|(&stack, st)| SiteAmount { stack, bytes: st.allocated_bytes, blocks: st.allocs }).collect(),
    }
}

pub fn lines(img: &ImageAnalysis, w: Weight) -> Vec<(String, u64)> {
    let amounts = amounts(img, w);
    let mut namer = SiteNamer::new(img);
    namer.symbols.prepare(amounts.iter().map(|a| a.stack));
    fold(amounts.iter().map(|a| (namer.frames(a.stack), a.bytes)))
}

pub fn svg(img: &ImageAnalysis, w: Weight, cmd: &str, out: &mut dyn Write) -> Result<()> {
    let lines: Vec<String> = lines(img, w).into_iter().map(|(l, v)| format!("{l} {v}")).collect();
    if lines.is_empty() {
        bail!("nothing to draw: no bytes {} in image {}", match w { Weight::Peak => "live at the peak", Weight::Leaked => "leaked", Weight::Allocated => "allocated" }, img.id);
    }
    let mut o = inferno::flamegraph::Options::default();
    o.title = match w {
        Weight::Peak => "Live bytes at the peak".into(),
        Weight::Leaked => "Bytes leaked at exit".into(),
        Weight::Allocated => "Bytes allocated".into(),
    };
    o.subtitle = Some(cmd.to_string());
    o.count_name = "bytes".into();
    o.colors = inferno::flamegraph::color::Palette::Basic(inferno::flamegraph::color::BasicPalette::Mem);
    inferno::flamegraph::from_lines(&mut o, lines.iter().map(|s| s.as_str()), out)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(name: &str) -> Frame {
        Frame { function: name.into(), file: None, line: None, module: String::new(), inlined: false, ip: 0 }
    }

    #[test]
    fn folds_outermost_first_merges_and_sorts() {
        let lines = fold([
            (vec![f("inner"), f("mid"), f("main")], 100),
            (vec![f("other;x"), f("main")], 7),
            (vec![f("inner"), f("mid"), f("main")], 20),
            (vec![f("zero"), f("main")], 0),
        ]);
        assert_eq!(lines, vec![("main;mid;inner".to_string(), 120), ("main;other:x".to_string(), 7)]);
    }
}
