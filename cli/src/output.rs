//! How results are shown: tables for people, JSON for scripts, CSV for spreadsheets (the
//! availability report only).

use comfy_table::{Table, presets::UTF8_BORDERS_ONLY};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Json,
    /// `vmha report` only.
    Csv,
}

pub fn json<T: Serialize + ?Sized>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

pub fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY).set_header(header.to_vec());
    for r in rows {
        t.add_row(r);
    }
    println!("{t}");
}

pub fn mib(m: u64) -> String {
    if m >= 10 * 1024 { format!("{:.1} GiB", m as f64 / 1024.0) } else { format!("{m} MiB") }
}
