//! Trains the zstd dictionary that ships in `outpost-protocol` as `frame::DICT_BATCH_V1`.
//!
//! ```text
//! cargo run --release -p outpost-tests --bin train-dict [-- --size BYTES] [--out PATH]
//! ```
//!
//! Samples are raw (uncompressed) CBOR batches from many simulated sites: seeds 1000–1199
//! (never the seeds `wire-sizes` measures with), every badge-code style, 60–600 staff,
//! 2–8 devices, and batches of 1–128 records, the sizes where a dictionary can pay. The
//! result is deterministic: the same samples give the same dictionary.
//!
//! After retraining, run `wire-sizes` and check that `frame::DICT_MAX_RAW` still marks where
//! the dictionary stops paying; the golden vectors for codec 2 must be re-blessed too.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use outpost_protocol::cbor;
use outpost_tests::workload::{Site, SubjectStyle};

const DEFAULT_SIZE: usize = 4096;

fn samples() -> Vec<Vec<u8>> {
    let styles = [
        SubjectStyle::EmployeeCode,
        SubjectStyle::CardNumber,
        SubjectStyle::Personnel,
    ];
    let sizes = [1usize, 1, 2, 3, 5, 8, 13, 21, 34, 64, 128];
    let mut out = Vec::new();
    for seed in 1000u64..1200 {
        let style = styles[(seed % 3) as usize];
        let staff = 60 + (seed as usize * 37) % 540;
        let devices = 2 + (seed as usize % 7);
        let mut site = Site::with_style(seed, staff, devices, style);
        for &n in &sizes {
            out.push(cbor::to_vec(&site.batch(n)));
        }
    }
    out
}

fn main() -> Result<()> {
    let mut size = DEFAULT_SIZE;
    let mut path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../firmware-protocol/dict/batch-v1.zdict");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--size" => {
                size = args
                    .next()
                    .context("--size needs a number of bytes")?
                    .parse()
                    .context("--size must be a number of bytes")?
            }
            "--out" => path = args.next().context("--out needs a path")?.into(),
            other => bail!("unknown argument {other:?}; use --size BYTES and --out PATH"),
        }
    }
    let samples = samples();
    let total: usize = samples.iter().map(Vec::len).sum();
    let dict = zstd::dict::from_samples(&samples, size).context("zstd dictionary training")?;
    std::fs::write(&path, &dict).with_context(|| format!("writing {}", path.display()))?;
    println!(
        "trained a {} byte dictionary on {} samples ({} bytes) -> {}",
        dict.len(),
        samples.len(),
        total,
        path.display()
    );
    Ok(())
}
