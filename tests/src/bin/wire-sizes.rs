//! Prints the uplink size per punch for batches of 1, 10, 100 and 1000 realistic punches.
//!
//! ```text
//! cargo run --profile bench-fast -p outpost-tests --bin wire-sizes
//! ```
//!
//! The workload is `workload::Site::new(42, 300, 5)` (300 staff, 5 devices, punches
//! clustered at shift changes); seed 42 is not among the seeds the dictionary was trained
//! on. For each batch size the site's first 10 000 punches are cut into consecutive batches
//! and the bytes are summed, so every column is an average over the same punches.
//!
//! Columns:
//! - `JSON`: NDJSON, one export object per record (docs/design.md's JSON form plus `site`,
//!   `gateway_id`, `gateway_seq` and `received_at`, the fields a batch also carries);
//! - `CBOR`: the uplink frame with codec 0 (14-byte header + columnar CBOR batch);
//! - `CBOR+zstd`: codec 1; `CBOR+zstd+dict`: codec 2 with `DICT_BATCH_V1`;
//! - `auto`: what `frame::encode_batch_auto` picks (the gateway's default).
//!
//! A second table gives the same for ten-digit card numbers as badge codes (the least
//! compressible style), and a last line the old row-wise CBOR layout for comparison.

use anyhow::Result;
use outpost_protocol::frame::{self, Codec, DICT_BATCH_V1};
use outpost_protocol::json::{format_time, punch_to_json};
use outpost_protocol::{Batch, Record};
use outpost_tests::workload::{Site, SubjectStyle};
use serde_json::Value;

const TOTAL: usize = 10_000;
const SIZES: [usize; 4] = [1, 10, 100, 1000];

fn ndjson(batch: &Batch) -> usize {
    batch
        .records
        .iter()
        .map(|r| {
            let mut m = punch_to_json(&r.punch);
            m.insert("site".into(), batch.site_id.as_str().into());
            m.insert("gateway_id".into(), batch.gateway_id.as_str().into());
            m.insert("gateway_seq".into(), r.gateway_seq.into());
            m.insert(
                "received_at".into(),
                format_time(r.received.wall_ms, None).into(),
            );
            Value::Object(m).to_string().len() + 1
        })
        .sum()
}

/// The pre-columnar layout: CBOR array of records in their row form, zstd-compressed.
fn row_wise_zstd(batch: &Batch) -> Result<usize> {
    let rows: &Vec<Record> = &batch.records;
    let raw = outpost_protocol::cbor::to_vec(rows);
    Ok(frame::encode_payload(&raw, Codec::Zstd)?.len())
}

fn table(style: SubjectStyle, title: &str) -> Result<()> {
    println!("{title}");
    println!(
        "{:>6} | {:>8} | {:>8} | {:>10} | {:>15} | {:>8}",
        "batch", "JSON", "CBOR", "CBOR+zstd", "CBOR+zstd+dict", "auto"
    );
    println!("{}", "-".repeat(71));
    for n in SIZES {
        let mut site = Site::with_style(42, 300, 5, style);
        let mut sums = [0usize; 5];
        for _ in 0..TOTAL / n {
            let b = site.batch(n);
            sums[0] += ndjson(&b);
            sums[1] += frame::encode_batch(&b, Codec::None)?.len();
            sums[2] += frame::encode_batch(&b, Codec::Zstd)?.len();
            sums[3] += frame::encode_batch(&b, Codec::ZstdDict(DICT_BATCH_V1))?.len();
            sums[4] += frame::encode_batch_auto(&b)?.len();
        }
        let per = |i: usize| sums[i] as f64 / TOTAL as f64;
        println!(
            "{:>6} | {:>8.1} | {:>8.1} | {:>10.1} | {:>15.1} | {:>8.1}",
            n,
            per(0),
            per(1),
            per(2),
            per(3),
            per(4)
        );
    }
    println!();
    Ok(())
}

fn main() -> Result<()> {
    println!("uplink bytes per punch (frame header included), 300 staff, 5 devices, seed 42\n");
    table(SubjectStyle::EmployeeCode, "badge codes like EMP-0042:")?;
    table(
        SubjectStyle::CardNumber,
        "badge codes are 10-digit card numbers:",
    )?;
    let mut site = Site::new(42, 300, 5);
    let mut rows = 0;
    for _ in 0..TOTAL / 1000 {
        rows += row_wise_zstd(&site.batch(1000))?;
    }
    println!(
        "for comparison, row-wise CBOR+zstd (one CBOR array per record) at 1000: {:.1}",
        rows as f64 / TOTAL as f64
    );
    Ok(())
}
