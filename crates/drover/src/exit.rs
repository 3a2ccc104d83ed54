//! Exit codes scripts can rely on, shared by the `drover` and `drover-agent` binaries.

/// The command did what was asked.
pub const OK: u8 = 0;
/// The request was refused or failed (invalid fleet file, server error, ...).
pub const FAILED: u8 = 1;
/// Bad command-line usage (also what clap uses).
pub const USAGE: u8 = 2;
/// The server could not be reached.
pub const UNREACHABLE: u8 = 3;
