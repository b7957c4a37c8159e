//! `mtracer export`: one process image of an analysed trace written in another tool's format.
//!
//! * [`massif`] — a `massif.out` file for valgrind's `ms_print` and massif-visualizer;
//! * [`folded`] — folded stacks (`frame;frame;frame bytes`) and a flamegraph SVG drawn from them;
//! * [`csv`] — the timeline.
//!
//! Exports read the analysis and the site aggregation; they never change them.

pub mod csv;
pub mod folded;
pub mod massif;

use std::io::Write;

use anyhow::{bail, Result};

use crate::analysis::image::ImageAnalysis;
use crate::analysis::Analysis;

/// Export formats.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Massif,
    Folded,
    Svg,
    Csv,
}

/// What the folded stacks and the flamegraph weigh.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Weight {
    /// Bytes live at the peak of live bytes.
    #[default]
    Peak,
    /// Bytes still live when the image ended.
    Leaked,
    /// Bytes allocated over the whole run.
    Allocated,
}

#[derive(Clone, Copy, Debug)]
pub struct Options {
    pub format: Format,
    /// Process image by its number (default: the one that allocated the most).
    pub image: Option<u32>,
    /// massif: significance threshold in percent of the snapshot's total.
    pub threshold: f64,
    pub weight: Weight,
    /// massif: the time unit.
    pub time_unit: massif::TimeUnit,
}

impl Default for Options {
    fn default() -> Self {
        Options { format: Format::Massif, image: None, threshold: 1.0, weight: Weight::Peak, time_unit: massif::TimeUnit::Ms }
    }
}

/// The image to export.
pub fn pick<'a>(a: &'a Analysis, image: Option<u32>) -> Result<&'a ImageAnalysis> {
    match image {
        Some(n) => match a.images.iter().find(|i| i.id == n) {
            Some(i) => Ok(i),
            None => bail!("the trace has no process image {n} (images: {})", a.images.iter().map(|i| i.id.to_string()).collect::<Vec<_>>().join(", ")),
        },
        None => a.images.iter().max_by_key(|i| (i.model.c.bytes_allocated_total, std::cmp::Reverse(i.id))).ok_or_else(|| anyhow::anyhow!("the trace has no process image")),
    }
}

/// Write the export of `a` to `out`.
pub fn export(a: &Analysis, opts: &Options, out: &mut dyn Write) -> Result<()> {
    if !(0.0..=100.0).contains(&opts.threshold) {
        bail!("--threshold must be between 0 and 100 (percent), not {}", opts.threshold);
    }
    let img = pick(a, opts.image)?;
    let cmd = if a.session.command.is_empty() { img.meta.exe.clone() } else { a.session.command.join(" ") };
    match opts.format {
        Format::Massif => massif::write(img, &cmd, opts.threshold, opts.time_unit, out)?,
        Format::Folded => {
            for (line, v) in folded::lines(img, opts.weight) {
                writeln!(out, "{line} {v}")?;
            }
        }
        Format::Svg => folded::svg(img, opts.weight, &cmd, out)?,
        Format::Csv => csv::write(img, out)?,
    }
    out.flush()?;
    Ok(())
}
