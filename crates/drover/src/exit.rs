//! Exit codes scripts can rely on, shared by the `drover` and `drover-agent` binaries.

/// The command did what was asked.
pub const OK: u8 = 0;
/// The request was refused or failed (invalid fleet file, server error, ...).
pub const FAILED: u8 = 1;
/// Bad command-line usage (also what clap uses).
pub const USAGE: u8 = 2;
/// The server could not be reached.
pub const UNREACHABLE: u8 = 3;

/// The command line as `C`, or the exit code to leave with: clap's message is printed, and
/// `--help`/`--version` exit 0, bad usage [`USAGE`].
pub fn parse<C: clap::Parser>() -> Result<C, std::process::ExitCode> {
    C::try_parse().map_err(|e| {
        let _ = e.print();
        std::process::ExitCode::from(if e.use_stderr() { USAGE } else { OK })
    })
}
