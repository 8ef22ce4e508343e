//! How vmha's daemons log (`--log-format`). Text by default, as journald stores it: no ANSI
//! colour codes unless standard error is a terminal, and no timestamp under systemd (journald
//! stamps every line itself). JSON, one object per line, for log shippers: the fields
//! (`host`, `vm`, `operation`, `kind`, ...) stay fields. `RUST_LOG` picks the levels (default
//! `info`).

use std::io::IsTerminal;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Lines for people and journalctl.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber; call once, first thing.
pub fn init(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).init(),
        LogFormat::Text => {
            let terminal = std::io::stderr().is_terminal();
            // Under systemd (JOURNAL_STREAM set), journald adds the time.
            let journald = std::env::var_os("JOURNAL_STREAM").is_some();
            let builder = builder.with_ansi(terminal);
            if journald && !terminal { builder.without_time().init() } else { builder.init() }
        }
    }
}
