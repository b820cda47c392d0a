//! The upstream OTA protocol and the upgrade job, sans-I/O (CONVENTIONS 4).
//!
//! What is here: the topic scheme ([`topics`]), the payloads as they go on the
//! wire ([`protocol`]), the state machine of one leaf's upgrade ([`job`]), the
//! per-leaf dedupe and replacement rules for incoming notices ([`queue`]), and
//! the typed sled wrapper that persists jobs ([`journal`]).
//!
//! What is not: no sockets, no files, no clocks. Time is passed in as
//! milliseconds since the unix epoch. The only I/O is [`journal`], which writes
//! to the sled tree it is given. The driver (the daemon) turns incoming MQTT
//! messages and plugin results into [`job::Event`]s, persists the job, and
//! then performs the [`job::Action`]s it gets back.

pub mod job;
pub mod journal;
pub mod protocol;
pub mod queue;
pub mod topics;

pub use job::{Action, Event, Job, State, Transition};
pub use journal::{JobRecord, Journal, JournalError};
pub use protocol::{DEFAULT_MODULE, Download, Notice, NoticeError, Progress, SignMethod, Step};
pub use queue::{Duplicate, Offer, Queue};
pub use topics::{DeviceId, TopicKind};
