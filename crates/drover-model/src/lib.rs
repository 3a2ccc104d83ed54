//! drover's vocabulary: the fleet file, its validation, plans, ids, events and API types. No I/O.

pub mod api;
pub mod boot;
pub mod cron;
pub mod diff;
pub mod duration;
pub mod event;
pub mod fleet;
pub mod ids;
pub mod image;
pub mod lograte;
pub mod logs;
pub mod merge;
pub mod plan;
pub mod record;
pub mod secret;
pub mod subst;
pub mod token;
pub mod validate;

pub use duration::Dur;
pub use event::{Event, EventKind, NewEvent};
pub use fleet::Fleet;
pub use ids::GroupId;
pub use plan::{Plan, PlanComponent};
pub use validate::{parse_fleet, FleetError, FleetErrors};

/// The number of a signal name (`SIGTERM` or `TERM`), for the signals a stop may use.
pub fn signal_number(name: &str) -> Option<i32> {
    let n = name.strip_prefix("SIG").unwrap_or(name);
    Some(match n {
        "HUP" => 1,
        "INT" => 2,
        "QUIT" => 3,
        "KILL" => 9,
        "USR1" => 10,
        "USR2" => 12,
        "TERM" => 15,
        _ => return None,
    })
}

/// The signals a component may be asked to drain with (`drain_signal`): any a stop may use
/// but SIGKILL, which ends a process at once.
pub const DRAIN_SIGNALS: &str = "SIGUSR1, SIGUSR2, SIGHUP, SIGINT, SIGQUIT, SIGTERM";

/// The number of a drain signal's name (`SIGUSR1` or `USR1`); None for SIGKILL or an unknown name.
pub fn drain_signal_number(name: &str) -> Option<i32> {
    signal_number(name).filter(|n| *n != 9)
}

/// Milliseconds since the Unix epoch, the time unit of events and status.
pub type Millis = u64;
