//! `vmha`: the operator's command line.

mod ca;
mod commands;
mod drain;
mod output;
mod power;
mod probe;
mod report;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    // `vmha status | head`: a closed pipe ends the command quietly, as it does any Unix tool,
    // instead of panicking in println! (Rust ignores SIGPIPE by default).
    // SAFETY: called before any other thread exists; restores the default disposition.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let cli = commands::Cli::parse();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    match rt.block_on(commands::run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("vmha: {}", e.message);
            ExitCode::from(e.exit_code)
        }
    }
}
