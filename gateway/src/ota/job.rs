//! The state machine of one leaf's upgrade of one module, sans-I/O
//! (CONVENTIONS 4): [`Job::on`] takes an [`Event`] and the current time and
//! returns the [`Action`]s the driver must perform. Every change of phase is
//! recorded in the job's history, and the job is serde-serialisable so the
//! journal can persist it *before* the driver performs the actions.
//!
//! What it is not: it starts no download, runs no plugin, publishes nothing and
//! reads no clock (`now` is milliseconds since the unix epoch, given by the
//! caller). Which job runs when (parallel limits, one job per link) is the
//! scheduler's business; which notice becomes a job is [`super::queue`]'s.
//!
//! # Rules (from `shared/protocol.md`)
//! - Success is only the new version read back from the leaf: `Identified`
//!   with the notice's version succeeds and reports it on `inform`; another
//!   version fails with -4 and reports the version the leaf really has;
//!   `IdentifyUnsupported` trusts the notice's version.
//! - Failures report their step code and a `desc`: download -2, verify -3,
//!   flash what the caller says (-1 or -4), identify -4, cancel -1.
//! - Progress: overall percent = download 0–30, verify 30–35, flash 35–95,
//!   identify 95–100 (see [`overall_percent`]); reported when it rose by 5
//!   points or 2 s passed since the last report ([`report_due`]), never going
//!   backwards, never 0 (the platform's percentages start at 1) and never 100
//!   before success. Terminal states are always reported.
//! - Restart: a job persisted mid-way resumes its phase (download resumes with
//!   HTTP Range in the cache; a flash starts again from the beginning). A
//!   flash survives [`Restart::max_flash_restarts`] *unclean* restarts (the
//!   gateway died while flashing); more fail it with -4, so a flash that
//!   crashes the gateway cannot loop for ever. A clean stop does not count.
//! - Order: the actions of one event are listed in the order the driver must
//!   perform them: a report of the state just entered comes before that
//!   state's long-running action, so progress never goes backwards on the wire.
//! - Truth about the leaf: the version read back from the leaf is part of the
//!   record ([`Job::leaf_version`]), so the journal stores the terminal state
//!   and the leaf's version in one write. [`Job::terminal_reports`] rebuilds a
//!   terminal job's reports, byte for byte (same message ids), for a restart
//!   that does not know whether they went out.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::protocol::{Notice, Progress, Step};

/// Minimum rise of the overall percentage between two progress reports...
pub const REPORT_EVERY_PERCENT: u8 = 5;
/// ...or minimum time between two reports, in milliseconds.
pub const REPORT_EVERY_MS: u64 = 2_000;

/// Unclean restarts of the gateway during flashing that a job survives by
/// default (`[jobs] flash_restarts`).
pub const DEFAULT_FLASH_RESTARTS: u32 = 3;

/// How the gateway came back up, told to a persisted job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Restart {
    /// The previous run ended without a clean shutdown (a crash, a kill, power
    /// loss): only these count against [`Restart::max_flash_restarts`].
    pub unclean: bool,
    /// Unclean restarts during one flash that the job survives.
    pub max_flash_restarts: u32,
}

/// Where a job is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum State {
    /// Waiting for a slot (or, after an expired URL, for a fresh notice).
    Queued,
    /// `done` of `total` bytes downloaded.
    Downloading { done: u64, total: u64 },
    /// The image is checked (digest, then the family's own checks).
    Verifying,
    /// `done` of `total` units (as the plugin counts them) written to the leaf.
    Flashing { done: u64, total: u64 },
    /// Reading the version back from the leaf.
    Identifying,
    /// The leaf runs `version` (terminal).
    Succeeded { version: String },
    /// The upgrade failed with `step` (-1..-4) for the reason `desc` (terminal).
    Failed { step: Step, desc: String },
}

impl State {
    pub fn is_terminal(&self) -> bool {
        matches!(self, State::Succeeded { .. } | State::Failed { .. })
    }

    /// True while the job holds a slot (its phase is being worked on).
    pub fn is_running(&self) -> bool {
        !self.is_terminal() && *self != State::Queued
    }

    /// A short name: `queued`, `downloading`, `verifying`, `flashing`,
    /// `identifying`, `succeeded`, `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Downloading { .. } => "downloading",
            State::Verifying => "verifying",
            State::Flashing { .. } => "flashing",
            State::Identifying => "identifying",
            State::Succeeded { .. } => "succeeded",
            State::Failed { .. } => "failed",
        }
    }
}

impl fmt::Display for State {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            State::Downloading { done, total } | State::Flashing { done, total } => {
                write!(f, "{} {done}/{total}", self.name())
            }
            State::Succeeded { version } => write!(f, "succeeded ({version})"),
            State::Failed { step, desc } => write!(f, "failed ({step}: {desc})"),
            _ => f.write_str(self.name()),
        }
    }
}

/// What happened to a job, told by the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The scheduler gave the job a slot.
    Start,
    DownloadProgress {
        done: u64,
        total: u64,
    },
    /// The image is complete in the cache (its digest is checked in `Verifying`).
    Downloaded,
    DownloadFailed {
        desc: String,
    },
    /// The download URL expired: the job goes back to `Queued` and asks for a
    /// fresh notice.
    UrlExpired,
    /// A fresh notice (same version and sign, new URL) arrived for a job
    /// waiting for one: it may be started again.
    NoticeRefreshed,
    VerifyFailed {
        desc: String,
    },
    Verified,
    FlashProgress {
        done: u64,
        total: u64,
    },
    Flashed,
    /// Flashing failed; `step` is -1 (the plugin failed) or -4 (the device did).
    /// While verifying: the plugin could not run at all (always -1).
    FlashFailed {
        step: Step,
        desc: String,
    },
    /// The leaf reports `version` after flashing.
    Identified {
        version: String,
    },
    /// The leaf's family cannot read a version back.
    IdentifyUnsupported,
    IdentifyFailed {
        desc: String,
    },
    /// The image was downloaded but is not the one the notice describes
    /// (digest mismatch, an unusable `sign`): a verification failure (-3).
    ImageRejected {
        desc: String,
    },
    /// The gateway came back up with this job persisted.
    Restarted(Restart),
    /// The job is abandoned (an operator, or the platform no longer has the package).
    Cancelled {
        desc: String,
    },
    /// The gateway itself failed while running the job (its task panicked or
    /// hit an error the job has no state for): a generic failure (-1).
    Crashed {
        desc: String,
    },
}

/// How the desc of a job the gateway itself failed begins (`Event::Crashed`).
pub const CRASH_PREFIX: &str = "the gateway failed while";

/// What the driver must do after an event, in this order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Start (or resume, with HTTP Range) the download of the notice's image.
    StartDownload,
    /// Check the downloaded image (digest, then the family's `verify`).
    StartVerify,
    /// Flash the leaf from the start.
    StartFlash,
    /// Read the version back from the leaf.
    StartIdentify,
    /// Publish this progress report on the leaf's `progress` topic.
    Report(Progress),
    /// Publish this version on the leaf's `inform` topic (the job's module).
    ReportInform { version: String },
    /// Publish `firmware/get` for the job's module: the URL expired.
    AskFirmwareGet,
    /// The job no longer holds a slot (it ended, or waits for a fresh notice).
    Done,
}

/// One recorded change of a job's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    /// Milliseconds since the unix epoch.
    pub at_ms: u64,
    pub from: State,
    pub to: State,
    pub note: String,
}

/// The last progress report sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reported {
    pub percent: u8,
    pub at_ms: u64,
}

/// One leaf's upgrade of one module to one version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Job {
    /// The version the notice asks for.
    version: String,
    module: String,
    /// Image size in bytes (the download's total until the cache says otherwise).
    size: u64,
    state: State,
    history: Vec<Transition>,
    /// Restarts of the gateway while this job was flashing.
    flash_restarts: u32,
    /// Queued after an expired URL, until a fresh notice arrives.
    awaiting_notice: bool,
    last_report: Option<Reported>,
    /// The version the leaf reported after flashing (whatever it was).
    #[serde(default)]
    read_back: Option<String>,
    /// The restart rule gave up on the flash (this is its reason): the leaf
    /// is asked for its version first, because the flash may have completed
    /// just before the last stop, and then the leaf runs the new version.
    #[serde(default)]
    giving_up: Option<String>,
}

impl Job {
    /// A queued job for `notice`; the history starts with the queueing.
    pub fn new(notice: &Notice, now: u64) -> Job {
        Job {
            version: notice.version.clone(),
            module: notice.module.clone(),
            size: notice.size,
            state: State::Queued,
            history: vec![Transition {
                at_ms: now,
                from: State::Queued,
                to: State::Queued,
                note: format!("queued: version {} ({} bytes)", notice.version, notice.size),
            }],
            flash_restarts: 0,
            awaiting_notice: false,
            last_report: None,
            read_back: None,
            giving_up: None,
        }
    }

    pub fn state(&self) -> &State {
        &self.state
    }

    pub fn history(&self) -> &[Transition] {
        &self.history
    }

    /// The version the notice asks for.
    pub fn version(&self) -> &str {
        &self.version
    }

    pub fn module(&self) -> &str {
        &self.module
    }

    pub fn is_terminal(&self) -> bool {
        self.state.is_terminal()
    }

    /// Queued after an expired URL: it must not start before `NoticeRefreshed`.
    pub fn awaiting_notice(&self) -> bool {
        self.awaiting_notice
    }

    /// Queued and startable: what the scheduler looks for.
    pub fn ready(&self) -> bool {
        self.state == State::Queued && !self.awaiting_notice
    }

    /// The last progress report sent, if any.
    pub fn last_report(&self) -> Option<Reported> {
        self.last_report
    }

    /// The overall percentage of the job's current state (see [`overall_percent`]).
    pub fn percent(&self) -> Option<u8> {
        overall_percent(&self.state)
    }

    /// How far the job got: its percentage now, or for a failed job the
    /// last one reported before it failed.
    pub fn furthest_percent(&self) -> u8 {
        self.percent()
            .or_else(|| self.last_report.map(|r| r.percent))
            .unwrap_or(0)
    }

    /// The version this job learnt the leaf runs, once terminal: the new one
    /// after a success (read back, or trusted when the family cannot read it),
    /// or the one a lying leaf reported. The journal stores it with the
    /// terminal record in one write: it is what the gateway informs from then
    /// on.
    pub fn leaf_version(&self) -> Option<&str> {
        match &self.state {
            State::Succeeded { version } => Some(version),
            State::Failed { .. } => self.read_back.as_deref(),
            _ => None,
        }
    }

    /// The message id of a terminal job's progress report (its inform takes the
    /// next one): derived from the terminal transition, so a report published
    /// again after a restart is the same message, not a second outcome.
    pub fn terminal_id(&self) -> Option<u64> {
        if !self.is_terminal() {
            return None;
        }
        // Four ids per millisecond: above any id the gateway's counter (which
        // starts at the clock in ms and counts one per message) will reach.
        self.history.last().map(|t| t.at_ms.saturating_mul(4))
    }

    /// The reports of a terminal state, in order: its progress report, then
    /// the leaf's version on `inform` when it is known. Empty for a job that
    /// is not terminal.
    pub fn terminal_reports(&self) -> Vec<Action> {
        match &self.state {
            State::Succeeded { version } => vec![
                Action::Report(Progress::new(
                    Step::Percent(100),
                    format!("upgraded to {version}"),
                    self.module.clone(),
                )),
                Action::ReportInform {
                    version: version.clone(),
                },
            ],
            State::Failed { step, desc } => {
                let mut a = vec![Action::Report(Progress::new(
                    *step,
                    desc.clone(),
                    self.module.clone(),
                ))];
                if let Some(version) = &self.read_back {
                    a.push(Action::ReportInform {
                        version: version.clone(),
                    });
                }
                a
            }
            _ => Vec::new(),
        }
    }

    /// Apply `event` at `now` (ms since the unix epoch) and return what to do.
    /// An event that does not apply to the current state (a late progress
    /// event, anything after a terminal state) changes nothing and returns no
    /// action.
    pub fn on(&mut self, event: Event, now: u64) -> Vec<Action> {
        use Action as A;
        use State as S;
        let before = self.state.clone();
        let mut actions = match (before.clone(), event) {
            (s, event) if s.is_terminal() => return self.ignore(&event),
            (_, Event::Cancelled { desc }) => {
                return self.fail(Step::UpgradeFailed, format!("cancelled: {desc}"), now);
            }
            (_, Event::Crashed { desc }) => {
                return self.fail(Step::UpgradeFailed, desc, now);
            }

            (S::Queued, Event::Start) if !self.awaiting_notice => {
                let to = S::Downloading {
                    done: 0,
                    total: self.size,
                };
                self.go(to, "download started", now);
                vec![A::StartDownload]
            }
            (S::Queued, Event::NoticeRefreshed) if self.awaiting_notice => {
                self.awaiting_notice = false;
                self.go(S::Queued, "fresh notice received: ready to resume", now);
                vec![]
            }
            (S::Queued, Event::Restarted(_)) if self.awaiting_notice => {
                // The earlier request may have been lost with the connection.
                vec![A::AskFirmwareGet]
            }
            (S::Queued, Event::Restarted(_)) => vec![],

            (S::Downloading { .. }, Event::DownloadProgress { done, total }) => {
                self.state = S::Downloading { done, total };
                vec![]
            }
            (S::Downloading { .. }, Event::Downloaded) => {
                self.go(S::Verifying, "downloaded", now);
                vec![A::StartVerify]
            }
            (S::Downloading { .. }, Event::DownloadFailed { desc }) => {
                return self.fail(Step::DownloadFailed, desc, now);
            }
            (S::Downloading { .. }, Event::ImageRejected { desc }) => {
                return self.fail(Step::VerifyFailed, desc, now);
            }
            (S::Downloading { .. }, Event::UrlExpired) => {
                self.awaiting_notice = true;
                self.go(
                    S::Queued,
                    "download URL expired: asking for a fresh notice",
                    now,
                );
                vec![A::AskFirmwareGet, A::Done]
            }
            (S::Downloading { done, total }, Event::Restarted(_)) => {
                let note = format!("gateway restarted: resuming the download at {done} bytes");
                self.go(S::Downloading { done, total }, note, now);
                vec![A::StartDownload]
            }

            (S::Verifying, Event::Verified) => {
                self.go(S::Flashing { done: 0, total: 0 }, "image verified", now);
                vec![A::StartFlash]
            }
            (S::Verifying, Event::VerifyFailed { desc }) => {
                return self.fail(Step::VerifyFailed, desc, now);
            }
            // The family's plugin could not check the image at all (there is
            // none, it would not start): not the image's fault, so not -3.
            (S::Verifying, Event::FlashFailed { desc, .. }) => {
                return self.fail(Step::UpgradeFailed, desc, now);
            }
            (S::Verifying, Event::Restarted(_)) => {
                self.go(S::Verifying, "gateway restarted: verifying again", now);
                vec![A::StartVerify]
            }

            (S::Flashing { .. }, Event::FlashProgress { done, total }) => {
                self.state = S::Flashing { done, total };
                vec![]
            }
            (S::Flashing { .. }, Event::Flashed) => {
                self.go(S::Identifying, "flashed", now);
                vec![A::StartIdentify]
            }
            (S::Flashing { .. }, Event::FlashFailed { step, desc }) => {
                // A percentage is not a failure code: the device failed.
                let step = if step.is_failure() {
                    step
                } else {
                    Step::FlashFailed
                };
                return self.fail(step, desc, now);
            }
            (S::Flashing { total, .. }, Event::Restarted(restart)) => {
                if restart.unclean {
                    self.flash_restarts += 1;
                }
                if self.flash_restarts > restart.max_flash_restarts {
                    let desc = format!(
                        "the gateway stopped uncleanly {} times while flashing this leaf \
                         (limit [jobs] flash_restarts = {}); not trying again",
                        self.flash_restarts, restart.max_flash_restarts
                    );
                    // Not flashed again; but the last attempt may have
                    // completed before the stop: ask the leaf before saying
                    // anything (campaign: a -4 while the leaf ran the new
                    // version left the platform with the old one).
                    self.giving_up = Some(desc);
                    self.go(
                        S::Identifying,
                        "too many unclean stops while flashing: reading the version back \
                         before giving up",
                        now,
                    );
                    return vec![A::StartIdentify];
                }
                let to = S::Flashing { done: 0, total };
                let note = if restart.unclean {
                    "gateway restarted after an unclean stop: flashing again from the start"
                } else {
                    "gateway restarted: flashing again from the start"
                };
                self.go(to, note, now);
                vec![A::StartFlash]
            }

            (S::Identifying, Event::Identified { version }) if version == self.version => {
                self.read_back = Some(version.clone());
                let note = if self.giving_up.take().is_some() {
                    "the leaf reports the new version: the flash completed before the gateway stopped"
                } else {
                    "the leaf reports the new version"
                };
                return self.succeed(version, note, now);
            }
            (S::Identifying, Event::Identified { version }) => {
                let desc = self.giving_up.take().unwrap_or_else(|| {
                    format!(
                        "leaf reports version {version} after flashing, expected {}",
                        self.version
                    )
                });
                // Tell the platform the truth: the failure, then the version
                // the leaf really runs (see `terminal_reports`).
                self.read_back = Some(version);
                return self.fail(Step::FlashFailed, desc, now);
            }
            // Giving up: an unread version is not trusted (the flash was
            // interrupted); the failure stands.
            (S::Identifying, Event::IdentifyUnsupported) if self.giving_up.is_some() => {
                let desc = self.giving_up.take().unwrap_or_default();
                return self.fail(Step::FlashFailed, desc, now);
            }
            (S::Identifying, Event::IdentifyFailed { desc }) if self.giving_up.is_some() => {
                let why = self.giving_up.take().unwrap_or_default();
                return self.fail(
                    Step::FlashFailed,
                    format!("{why}; reading the version back failed too: {desc}"),
                    now,
                );
            }
            (S::Identifying, Event::IdentifyUnsupported) => {
                let version = self.version.clone();
                return self.succeed(
                    version,
                    "the leaf cannot report its version: trusting the notice",
                    now,
                );
            }
            (S::Identifying, Event::IdentifyFailed { desc }) => {
                return self.fail(
                    Step::FlashFailed,
                    format!(
                        "the plugin flashed the image and reported success, but reading the \
                         version back failed: {desc}"
                    ),
                    now,
                );
            }
            (S::Identifying, Event::Restarted(_)) => {
                self.go(S::Identifying, "gateway restarted: identifying again", now);
                vec![A::StartIdentify]
            }

            (_, event) => return self.ignore(&event),
        };
        // The report describes the state just entered: it goes out before the
        // state's long-running action starts.
        if let Some(report) = self.progress_due(now) {
            actions.insert(0, A::Report(report));
        }
        actions
    }

    fn ignore(&self, event: &Event) -> Vec<Action> {
        tracing::debug!(state = %self.state, ?event, "event ignored by the job in this state");
        Vec::new()
    }

    fn go(&mut self, to: State, note: impl Into<String>, now: u64) {
        let from = std::mem::replace(&mut self.state, to.clone());
        self.history.push(Transition {
            at_ms: now,
            from,
            to,
            note: note.into(),
        });
    }

    fn fail(&mut self, step: Step, desc: impl Into<String>, now: u64) -> Vec<Action> {
        let desc = desc.into();
        let to = State::Failed {
            step,
            desc: desc.clone(),
        };
        self.go(to, desc.clone(), now);
        self.last_report = Some(Reported {
            percent: self.last_report.map_or(0, |r| r.percent),
            at_ms: now,
        });
        let mut actions = self.terminal_reports();
        actions.push(Action::Done);
        actions
    }

    fn succeed(&mut self, version: String, note: &str, now: u64) -> Vec<Action> {
        self.go(
            State::Succeeded {
                version: version.clone(),
            },
            note,
            now,
        );
        self.last_report = Some(Reported {
            percent: 100,
            at_ms: now,
        });
        let mut actions = self.terminal_reports();
        actions.push(Action::Done);
        actions
    }

    /// The progress report to send now, if one is due; records it as sent.
    fn progress_due(&mut self, now: u64) -> Option<Progress> {
        if self.state.is_terminal() {
            return None; // reported by fail/succeed
        }
        // Never 0, never 100 before success.
        let percent = overall_percent(&self.state)?.clamp(1, 99);
        if !report_due(self.last_report, percent, now) {
            return None;
        }
        self.last_report = Some(Reported {
            percent,
            at_ms: now,
        });
        Some(Progress::new(
            Step::Percent(percent),
            describe(&self.state),
            self.module.clone(),
        ))
    }
}

/// `done` of `total` as a share of `span` points.
fn share(done: u64, total: u64, span: u8) -> u8 {
    if total == 0 {
        return 0;
    }
    let share = u128::from(done.min(total)) * u128::from(span) / u128::from(total);
    u8::try_from(share).unwrap_or(span)
}

/// The overall percentage of a state: download 0–30, verify 30–35, flash
/// 35–95, identify 95–100, success 100. `None` for `Queued` and `Failed`
/// (nothing to report as a percentage).
pub fn overall_percent(state: &State) -> Option<u8> {
    match state {
        State::Queued | State::Failed { .. } => None,
        State::Downloading { done, total } => Some(share(*done, *total, 30)),
        State::Verifying => Some(30),
        State::Flashing { done, total } => Some(35 + share(*done, *total, 60)),
        State::Identifying => Some(95),
        State::Succeeded { .. } => Some(100),
    }
}

/// Whether a progress report at `percent` is due at `now`, given the last one
/// sent: the first one always; then only going up, by at least
/// [`REPORT_EVERY_PERCENT`] points or after [`REPORT_EVERY_MS`].
pub fn report_due(last: Option<Reported>, percent: u8, now: u64) -> bool {
    let Some(last) = last else {
        return true;
    };
    percent > last.percent
        && (percent - last.percent >= REPORT_EVERY_PERCENT
            || now.saturating_sub(last.at_ms) >= REPORT_EVERY_MS)
}

/// The `desc` of an in-progress report.
fn describe(state: &State) -> String {
    match state {
        State::Downloading { done, total } => format!("downloading {}%", share(*done, *total, 100)),
        State::Verifying => "verifying the image".to_string(),
        State::Flashing { done, total } => format!("flashing {}%", share(*done, *total, 100)),
        State::Identifying => "reading the version back".to_string(),
        other => other.name().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ota::protocol::{Download, SignMethod};

    const UNCLEAN: Restart = Restart {
        unclean: true,
        max_flash_restarts: 1,
    };

    fn notice() -> Notice {
        Notice {
            id: 1,
            version: "2.0.0".into(),
            size: 1000,
            download: Download::Http {
                url: "http://h/f".into(),
            },
            sign_method: SignMethod::Md5,
            sign: "0".repeat(32),
            module: "MCU".into(),
            is_diff: false,
            ext_data: None,
        }
    }

    fn reports(actions: &[Action]) -> Vec<(i32, String)> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Report(p) => Some((p.step.code(), p.desc.clone())),
                _ => None,
            })
            .collect()
    }

    fn without_reports(actions: Vec<Action>) -> Vec<Action> {
        actions
            .into_iter()
            .filter(|a| !matches!(a, Action::Report(_)))
            .collect()
    }

    /// A job driven to `Flashing`, the clock at 10 s.
    fn flashing() -> Job {
        let mut job = Job::new(&notice(), 0);
        job.on(Event::Start, 1_000);
        job.on(Event::Downloaded, 2_000);
        job.on(Event::Verified, 3_000);
        assert_eq!(job.state(), &State::Flashing { done: 0, total: 0 });
        job
    }

    fn identifying() -> Job {
        let mut job = flashing();
        job.on(Event::Flashed, 4_000);
        assert_eq!(job.state(), &State::Identifying);
        job
    }

    fn failed(step: Step, desc: &str) -> State {
        State::Failed {
            step,
            desc: desc.into(),
        }
    }

    #[test]
    fn happy_path() {
        let mut job = Job::new(&notice(), 0);
        assert!(job.ready());
        let a = job.on(Event::Start, 1_000);
        assert_eq!(without_reports(a.clone()), [Action::StartDownload]);
        assert_eq!(reports(&a), [(1, "downloading 0%".to_string())]);
        job.on(
            Event::DownloadProgress {
                done: 500,
                total: 1000,
            },
            1_100,
        );
        assert_eq!(
            without_reports(job.on(Event::Downloaded, 2_000)),
            [Action::StartVerify]
        );
        assert_eq!(
            without_reports(job.on(Event::Verified, 3_000)),
            [Action::StartFlash]
        );
        job.on(Event::FlashProgress { done: 1, total: 2 }, 3_500);
        assert_eq!(
            without_reports(job.on(Event::Flashed, 4_000)),
            [Action::StartIdentify]
        );
        let a = job.on(
            Event::Identified {
                version: "2.0.0".into(),
            },
            5_000,
        );
        assert_eq!(
            a,
            [
                Action::Report(Progress::new(
                    Step::Percent(100),
                    "upgraded to 2.0.0",
                    "MCU"
                )),
                Action::ReportInform {
                    version: "2.0.0".into()
                },
                Action::Done,
            ]
        );
        assert_eq!(
            job.state(),
            &State::Succeeded {
                version: "2.0.0".into()
            }
        );
        let names: Vec<_> = job.history().iter().map(|t| t.to.name()).collect();
        assert_eq!(
            names,
            [
                "queued",
                "downloading",
                "verifying",
                "flashing",
                "identifying",
                "succeeded"
            ]
        );
        assert_eq!(job.history().last().unwrap().at_ms, 5_000);
        // Nothing moves a terminal job.
        assert!(job.on(Event::Restarted(UNCLEAN), 6_000).is_empty());
        assert!(
            job.on(Event::Cancelled { desc: "x".into() }, 6_000)
                .is_empty()
        );
    }

    #[test]
    fn each_failure_reports_its_step_and_desc() {
        let mut job = Job::new(&notice(), 0);
        job.on(Event::Start, 1);
        let a = job.on(
            Event::DownloadFailed {
                desc: "HTTP 404".into(),
            },
            2,
        );
        assert_eq!(
            a,
            [
                Action::Report(Progress::new(Step::DownloadFailed, "HTTP 404", "MCU")),
                Action::Done
            ]
        );
        assert_eq!(job.state(), &failed(Step::DownloadFailed, "HTTP 404"));

        let mut job = Job::new(&notice(), 0);
        job.on(Event::Start, 1);
        job.on(Event::Downloaded, 2);
        let a = job.on(
            Event::VerifyFailed {
                desc: "md5 mismatch".into(),
            },
            3,
        );
        assert_eq!(reports(&a), [(-3, "md5 mismatch".to_string())]);
        assert_eq!(a.last(), Some(&Action::Done));

        // No plugin to verify with: -1, not a verification failure.
        let mut job = Job::new(&notice(), 0);
        job.on(Event::Start, 1);
        job.on(Event::Downloaded, 2);
        let a = job.on(
            Event::FlashFailed {
                step: Step::FlashFailed,
                desc: "no plugin for device family \"esp32\"".into(),
            },
            3,
        );
        assert_eq!(reports(&a)[0].0, -1);

        for (step, expect) in [
            (Step::FlashFailed, -4),
            (Step::UpgradeFailed, -1),
            (Step::Percent(50), -4),
        ] {
            let mut job = flashing();
            let a = job.on(
                Event::FlashFailed {
                    step,
                    desc: "no answer".into(),
                },
                5,
            );
            assert_eq!(reports(&a), [(expect, "no answer".to_string())]);
        }

        let mut job = identifying();
        let a = job.on(
            Event::IdentifyFailed {
                desc: "timeout".into(),
            },
            5,
        );
        assert_eq!(
            reports(&a),
            [(
                -4,
                "the plugin flashed the image and reported success, but reading the version back failed: timeout".to_string()
            )]
        );

        let mut job = flashing();
        let a = job.on(
            Event::Cancelled {
                desc: "by operator".into(),
            },
            5,
        );
        assert_eq!(reports(&a), [(-1, "cancelled: by operator".to_string())]);
        assert_eq!(a.last(), Some(&Action::Done));
    }

    #[test]
    fn a_lying_leaf_fails_and_its_real_version_is_reported() {
        let mut job = identifying();
        let a = job.on(
            Event::Identified {
                version: "1.0.0".into(),
            },
            5_000,
        );
        let desc = "leaf reports version 1.0.0 after flashing, expected 2.0.0";
        assert_eq!(
            a,
            [
                Action::Report(Progress::new(Step::FlashFailed, desc, "MCU")),
                Action::ReportInform {
                    version: "1.0.0".into()
                },
                Action::Done,
            ]
        );
        assert_eq!(job.state(), &failed(Step::FlashFailed, desc));
    }

    #[test]
    fn identify_unsupported_trusts_the_notice() {
        let mut job = identifying();
        let a = job.on(Event::IdentifyUnsupported, 5_000);
        assert!(a.contains(&Action::ReportInform {
            version: "2.0.0".into()
        }));
        assert_eq!(reports(&a), [(100, "upgraded to 2.0.0".to_string())]);
        assert_eq!(
            job.state(),
            &State::Succeeded {
                version: "2.0.0".into()
            }
        );
    }

    #[test]
    fn an_expired_url_asks_for_a_fresh_notice_and_waits() {
        let mut job = Job::new(&notice(), 0);
        job.on(Event::Start, 1);
        let a = job.on(Event::UrlExpired, 2);
        assert_eq!(a, [Action::AskFirmwareGet, Action::Done]);
        assert_eq!(job.state(), &State::Queued);
        assert!(job.awaiting_notice() && !job.ready());
        // Not startable before a fresh notice.
        assert!(job.on(Event::Start, 3).is_empty());
        // A restart asks again.
        assert_eq!(
            job.on(Event::Restarted(UNCLEAN), 4),
            [Action::AskFirmwareGet]
        );
        assert!(job.on(Event::NoticeRefreshed, 5).is_empty());
        assert!(job.ready());
        assert_eq!(
            without_reports(job.on(Event::Start, 6)),
            [Action::StartDownload]
        );
    }

    #[test]
    fn restart_resumes_each_phase() {
        let mut job = Job::new(&notice(), 0);
        assert!(job.on(Event::Restarted(UNCLEAN), 1).is_empty());
        assert_eq!(job.state(), &State::Queued);

        job.on(Event::Start, 1);
        job.on(
            Event::DownloadProgress {
                done: 400,
                total: 1000,
            },
            2,
        );
        assert_eq!(
            job.on(Event::Restarted(UNCLEAN), 3),
            [Action::StartDownload]
        );
        assert_eq!(
            job.state(),
            &State::Downloading {
                done: 400,
                total: 1000
            }
        );
        assert!(job.history().last().unwrap().note.contains("resuming"));

        job.on(Event::Downloaded, 4);
        assert_eq!(job.on(Event::Restarted(UNCLEAN), 5), [Action::StartVerify]);
        assert_eq!(job.state(), &State::Verifying);

        let mut job = identifying();
        assert_eq!(
            job.on(Event::Restarted(UNCLEAN), 5),
            [Action::StartIdentify]
        );
        assert_eq!(job.state(), &State::Identifying);
    }

    #[test]
    fn restart_during_flashing_flashes_again_up_to_the_limit() {
        let mut job = flashing();
        job.on(Event::FlashProgress { done: 7, total: 10 }, 4_000);
        assert_eq!(
            job.on(Event::Restarted(UNCLEAN), 5_000),
            [Action::StartFlash]
        );
        assert_eq!(job.state(), &State::Flashing { done: 0, total: 10 });
        // It survives serialisation (the journal) with its counter.
        let mut job: Job = serde_json::from_str(&serde_json::to_string(&job).unwrap()).unwrap();
        // Over the limit: not flashed again, but the leaf is asked first.
        let a = job.on(Event::Restarted(UNCLEAN), 6_000);
        assert_eq!(a.last(), Some(&Action::StartIdentify), "{a:?}");
        assert_eq!(job.state(), &State::Identifying);
        // It still runs the old version: the failure, and the truth.
        let mut old = job.clone();
        let a = old.on(
            Event::Identified {
                version: "1.0".into(),
            },
            7_000,
        );
        assert_eq!(
            reports(&a),
            [(
                -4,
                "the gateway stopped uncleanly 2 times while flashing this leaf \
                 (limit [jobs] flash_restarts = 1); not trying again"
                    .to_string()
            )]
        );
        assert!(a.contains(&Action::ReportInform {
            version: "1.0".into()
        }));
        assert_eq!(a.last(), Some(&Action::Done));
        assert_eq!(old.leaf_version(), Some("1.0"));
        // The last flash had completed: a success.
        let mut done = job.clone();
        let v = done.version().to_string();
        done.on(Event::Identified { version: v.clone() }, 7_000);
        assert_eq!(done.state(), &State::Succeeded { version: v.clone() });
        assert_eq!(done.leaf_version(), Some(v.as_str()));
        // A family that cannot read the version: the failure stands (an
        // interrupted flash is not trusted), and no version is claimed.
        let mut blind = job.clone();
        blind.on(Event::IdentifyUnsupported, 7_000);
        assert!(matches!(blind.state(), State::Failed { step, .. } if step.code() == -4));
        assert_eq!(blind.leaf_version(), None);
        // Killed again while asking: asked again (the reason survives the
        // journal).
        let mut again: Job = serde_json::from_str(&serde_json::to_string(&job).unwrap()).unwrap();
        assert_eq!(
            again.on(Event::Restarted(UNCLEAN), 8_000).last(),
            Some(&Action::StartIdentify)
        );
        let a = again.on(
            Event::IdentifyFailed {
                desc: "no answer".into(),
            },
            9_000,
        );
        assert_eq!(reports(&a)[0].0, -4);
        assert!(
            matches!(again.state(), State::Failed { desc, .. }
                if desc.ends_with("reading the version back failed too: no answer")),
            "{:?}",
            again.state()
        );
    }

    #[test]
    fn clean_restarts_do_not_count_against_the_flash_limit() {
        let mut job = flashing();
        let clean = Restart {
            unclean: false,
            ..UNCLEAN
        };
        for t in 0..5 {
            assert_eq!(
                job.on(Event::Restarted(clean), 5_000 + t),
                [Action::StartFlash]
            );
        }
        assert_eq!(
            job.on(Event::Restarted(UNCLEAN), 6_000),
            [Action::StartFlash]
        );
        let limit = Restart {
            max_flash_restarts: 3,
            ..UNCLEAN
        };
        assert_eq!(job.on(Event::Restarted(limit), 7_000), [Action::StartFlash]);
        assert_eq!(job.on(Event::Restarted(limit), 8_000), [Action::StartFlash]);
        assert_eq!(
            job.on(Event::Restarted(limit), 9_000).last(),
            Some(&Action::StartIdentify)
        );
    }

    #[test]
    fn restart_after_a_completed_flash_does_not_count() {
        let mut job = flashing();
        job.on(Event::Restarted(UNCLEAN), 5_000);
        job.on(Event::Flashed, 6_000);
        assert_eq!(
            job.on(Event::Restarted(UNCLEAN), 7_000),
            [Action::StartIdentify]
        );
    }

    #[test]
    fn events_out_of_place_are_ignored() {
        let mut job = Job::new(&notice(), 0);
        let before = job.clone();
        for event in [
            Event::Downloaded,
            Event::Verified,
            Event::Flashed,
            Event::FlashProgress { done: 1, total: 2 },
            Event::Identified {
                version: "2.0.0".into(),
            },
            Event::NoticeRefreshed,
        ] {
            assert!(job.on(event, 1).is_empty());
        }
        assert_eq!(job, before);
    }

    #[test]
    fn progress_is_rate_limited_and_never_goes_backwards() {
        let mut job = Job::new(&notice(), 0);
        let mut sent = reports(&job.on(Event::Start, 10_000));
        let mut now = 10_000;
        // 1000 bytes in steps of 10 (1 % of the download, 0.3 overall) every 100 ms.
        for done in (10..=1000).step_by(10) {
            now += 100;
            sent.extend(reports(
                &job.on(Event::DownloadProgress { done, total: 1000 }, now),
            ));
        }
        let percents: Vec<i32> = sent.iter().map(|(p, _)| *p).collect();
        // Every 2 s at 0.3 %/100 ms gives +6, so the 5-point rule fires first.
        assert!(percents.windows(2).all(|w| w[1] > w[0]), "{percents:?}");
        assert!(
            percents.windows(2).all(|w| w[1] - w[0] >= 5),
            "{percents:?}"
        );
        assert!(*percents.last().unwrap() >= 25, "{percents:?}");

        // Slow progress: one point at a time, reported every 2 s.
        let mut job = flashing();
        let mut now = 20_000;
        let mut times = vec![];
        for done in 1..=60 {
            now += 500;
            let a = job.on(Event::FlashProgress { done, total: 100 }, now);
            if !reports(&a).is_empty() {
                times.push(now);
            }
        }
        assert!(
            times.windows(2).all(|w| w[1] - w[0] >= REPORT_EVERY_MS),
            "{times:?}"
        );
        assert!(times.len() >= 10, "{times:?}");

        // A flash restarted from the start does not report lower percentages.
        let last = job.last_report().unwrap().percent;
        job.on(Event::Restarted(UNCLEAN), now + 10_000);
        for done in 1..=50 {
            let a = job.on(
                Event::FlashProgress { done, total: 100 },
                now + 10_000 + 3_000 * done,
            );
            for (p, _) in reports(&a) {
                assert!(p > i32::from(last), "{p} after {last}");
            }
        }
    }

    #[test]
    fn report_due_rules() {
        let last = Some(Reported {
            percent: 40,
            at_ms: 1_000,
        });
        assert!(report_due(None, 1, 0));
        assert!(!report_due(last, 44, 2_999));
        assert!(report_due(last, 45, 1_001));
        assert!(report_due(last, 41, 3_000));
        assert!(
            !report_due(last, 40, 9_000),
            "no repeat of the same percentage"
        );
        assert!(!report_due(last, 30, 9_000), "never backwards");
        assert!(!report_due(last, 41, 0), "a clock going back is not a pass");
    }

    #[test]
    fn overall_percent_split() {
        let d = |done| State::Downloading { done, total: 100 };
        let f = |done| State::Flashing { done, total: 100 };
        assert_eq!(overall_percent(&State::Queued), None);
        assert_eq!(overall_percent(&d(0)), Some(0));
        assert_eq!(overall_percent(&d(50)), Some(15));
        assert_eq!(overall_percent(&d(100)), Some(30));
        assert_eq!(
            overall_percent(&d(500)),
            Some(30),
            "done past total is capped"
        );
        assert_eq!(
            overall_percent(&State::Downloading { done: 5, total: 0 }),
            Some(0)
        );
        assert_eq!(overall_percent(&State::Verifying), Some(30));
        assert_eq!(overall_percent(&f(0)), Some(35));
        assert_eq!(overall_percent(&f(50)), Some(65));
        assert_eq!(overall_percent(&f(100)), Some(95));
        assert_eq!(overall_percent(&State::Identifying), Some(95));
        assert_eq!(
            overall_percent(&State::Succeeded {
                version: "1".into()
            }),
            Some(100)
        );
        assert_eq!(
            overall_percent(&State::Downloading {
                done: u64::MAX,
                total: u64::MAX
            }),
            Some(30)
        );
    }

    #[test]
    fn a_job_round_trips_through_json() {
        let mut job = flashing();
        job.on(Event::FlashProgress { done: 3, total: 9 }, 9_000);
        let json = serde_json::to_string(&job).unwrap();
        assert!(json.contains(r#""state":"flashing""#), "{json}");
        assert_eq!(serde_json::from_str::<Job>(&json).unwrap(), job);
        let mut failed_job = job.clone();
        failed_job.on(
            Event::FlashFailed {
                step: Step::FlashFailed,
                desc: "x".into(),
            },
            10_000,
        );
        let json = serde_json::to_string(&failed_job).unwrap();
        assert!(json.contains(r#""step":"-4""#), "{json}");
        assert_eq!(serde_json::from_str::<Job>(&json).unwrap(), failed_job);
    }

    #[test]
    fn a_report_of_the_state_entered_comes_before_its_action() {
        let mut job = Job::new(&notice(), 0);
        let a = job.on(Event::Start, 1_000);
        assert!(matches!(a[0], Action::Report(_)), "{a:?}");
        assert_eq!(a[1], Action::StartDownload);
        let mut job = flashing();
        let a = job.on(Event::Flashed, 10_000);
        assert!(matches!(a[0], Action::Report(_)), "{a:?}");
        assert_eq!(a.last(), Some(&Action::StartIdentify));
    }

    #[test]
    fn the_leaf_version_is_part_of_the_terminal_record() {
        let mut job = identifying();
        assert_eq!(job.leaf_version(), None);
        job.on(
            Event::Identified {
                version: "2.0.0".into(),
            },
            5_000,
        );
        assert_eq!(job.leaf_version(), Some("2.0.0"));

        // A lying leaf: the version it really runs is recorded and reported.
        let mut job = identifying();
        let a = job.on(
            Event::Identified {
                version: "1.0.0".into(),
            },
            5_000,
        );
        assert_eq!(job.leaf_version(), Some("1.0.0"));
        assert_eq!(
            a[1],
            Action::ReportInform {
                version: "1.0.0".into()
            }
        );
        // A failure before identify learnt nothing about the leaf.
        let mut job = flashing();
        job.on(
            Event::FlashFailed {
                step: Step::FlashFailed,
                desc: "NAK".into(),
            },
            5_000,
        );
        assert_eq!(job.leaf_version(), None);
        // The record round-trips with it.
        let back: Job = serde_json::from_str(&serde_json::to_string(&job).unwrap()).unwrap();
        assert_eq!(back, job);
    }

    #[test]
    fn terminal_reports_are_the_reports_sent_at_the_end_with_stable_ids() {
        for ev in [
            Event::Identified {
                version: "2.0.0".into(),
            },
            Event::Identified {
                version: "0.9.0".into(),
            },
            Event::IdentifyUnsupported,
            Event::IdentifyFailed {
                desc: "silent".into(),
            },
        ] {
            let mut job = identifying();
            assert_eq!(job.terminal_id(), None);
            let mut sent = job.on(ev, 5_000);
            assert_eq!(sent.pop(), Some(Action::Done));
            assert_eq!(job.terminal_reports(), sent);
            let id = job.terminal_id().unwrap();
            let back: Job = serde_json::from_str(&serde_json::to_string(&job).unwrap()).unwrap();
            assert_eq!(back.terminal_id(), Some(id));
            assert_eq!(back.terminal_reports(), sent);
        }
        assert!(identifying().terminal_reports().is_empty());
    }

    #[test]
    fn a_rejected_image_is_a_verify_failure_and_a_crash_a_generic_one() {
        let mut job = Job::new(&notice(), 0);
        job.on(Event::Start, 1);
        let a = job.on(
            Event::ImageRejected {
                desc: "md5 mismatch".into(),
            },
            2,
        );
        assert_eq!(reports(&a), [(-3, "md5 mismatch".to_string())]);

        let mut job = flashing();
        let a = job.on(
            Event::Crashed {
                desc: "the gateway failed while flashing: boom".into(),
            },
            2,
        );
        assert_eq!(
            reports(&a),
            [(-1, "the gateway failed while flashing: boom".to_string())]
        );
        assert_eq!(a.last(), Some(&Action::Done));
        // Nothing is left to crash once terminal.
        assert!(job.on(Event::Crashed { desc: "x".into() }, 3).is_empty());
    }
}
