//! The one typed stream of job events (CONVENTIONS 7): what a plugin reports
//! while it works. The CLI's progress bar, the MQTT reporter, the API and the
//! tests all consume these same events.

/// The phase of a job a progress report belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    Prepare,
    Erase,
    Transfer,
    Verify,
    Finish,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Prepare => "prepare",
            Phase::Erase => "erase",
            Phase::Transfer => "transfer",
            Phase::Verify => "verify",
            Phase::Finish => "finish",
        }
    }
}

/// Severity of a plugin's log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
}

impl LogLevel {
    /// Forward a plugin's line to the gateway's own log.
    pub fn trace(self, plugin: &str, message: &str) {
        match self {
            LogLevel::Trace => tracing::trace!(plugin, "{message}"),
            LogLevel::Debug => tracing::debug!(plugin, "{message}"),
            LogLevel::Info => tracing::info!(plugin, "{message}"),
            LogLevel::Warn => tracing::warn!(plugin, "{message}"),
            LogLevel::Error => tracing::error!(plugin, "{message}"),
        }
    }
}

/// One event of a running job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobEvent {
    /// `done` of `total` units in `phase`.
    Progress { done: u64, total: u64, phase: Phase },
    /// A line the plugin logged.
    Log { level: LogLevel, message: String },
}
