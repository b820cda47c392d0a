//! Rollouts at the edge: campaigns that upgrade a selection of leaves group
//! by group (a canary first, then waves), pausing on failures, under the
//! operator's control (`otagw upgrade`, `otagw campaign`, the API).
//!
//! - [`plan`]: selections, plans and the campaign state machine, without I/O;
//! - [`CampaignStore`]: their persistence (sled tree `campaigns`, one JSON
//!   document per campaign, flushed after every change), so a restart resumes
//!   every campaign where it was;
//! - the API's request and answer types ([`CampaignRequest`],
//!   [`CampaignView`]), shared by the daemon and the CLI.
//!
//! The daemon's driver (`daemon::campaigns`) hands members to the job table
//! as notices and learns their ends from the journal; a job keeps reporting
//! to the platform as any other.

pub mod plan;

use serde::{Deserialize, Serialize};

pub use plan::{Campaign, CampaignState, Counts, Image, MemberState, PlanSpec, Selection, Size};

use crate::store::{Store, StoreError};

/// The sled tree of campaigns.
const TREE: &str = "campaigns";

/// Campaigns that are over kept for the record (`otagw campaigns`); older
/// ones are forgotten when a new one starts.
pub const KEEP_ENDED: usize = 50;

/// Campaigns as persisted.
#[derive(Debug, Clone)]
pub struct CampaignStore {
    tree: sled::Tree,
}

/// Why a campaign could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum CampaignStoreError {
    #[error("campaign store: {0}")]
    Store(#[from] StoreError),
    #[error("campaign store: cannot {op} campaign {id}: {source}")]
    Sled {
        op: &'static str,
        id: String,
        #[source]
        source: sled::Error,
    },
}

impl CampaignStore {
    pub fn open(store: &Store) -> Result<CampaignStore, CampaignStoreError> {
        Ok(CampaignStore {
            tree: store.tree(TREE)?,
        })
    }

    /// Every campaign; one that does not parse is logged and skipped.
    pub fn all(&self) -> Vec<Campaign> {
        let mut out = Vec::new();
        for entry in self.tree.iter() {
            match entry {
                Ok((k, v)) => match serde_json::from_slice::<Campaign>(&v) {
                    Ok(c) => out.push(c),
                    Err(e) => tracing::error!(
                        campaign = %String::from_utf8_lossy(&k),
                        "unreadable campaign skipped: {e}"
                    ),
                },
                Err(e) => tracing::error!("cannot read the campaigns: {e}"),
            }
        }
        out.sort_by_key(|c| (c.created_ms, c.id.clone()));
        out
    }

    /// Forget campaign `id` (flushed with the next write).
    pub fn remove(&self, id: &str) -> Result<(), CampaignStoreError> {
        self.tree
            .remove(id.as_bytes())
            .map(|_| ())
            .map_err(|source| CampaignStoreError::Sled {
                op: "remove",
                id: id.to_string(),
                source,
            })
    }

    /// Write `c` and make it durable.
    pub async fn put(&self, c: &Campaign) -> Result<(), CampaignStoreError> {
        let value = serde_json::to_vec(c).expect("a campaign serialises");
        let err = |op| {
            let id = c.id.clone();
            move |source| CampaignStoreError::Sled { op, id, source }
        };
        self.tree
            .insert(c.id.as_bytes(), value)
            .map_err(err("write"))?;
        crate::store::flush_tree(&self.tree)
            .await
            .map_err(err("flush"))?;
        Ok(())
    }
}

/// The image of a campaign request: a URL the gateway downloads it from, or
/// an image already uploaded (`POST /api/images`), by its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// Lowercase hex SHA-256 of the image.
    pub sha256: String,
    pub size: u64,
}

/// `POST /api/campaigns`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CampaignRequest {
    /// The version the image installs (what the leaves report afterwards).
    pub version: String,
    pub image: ImageRequest,
    #[serde(default)]
    pub selection: Selection,
    #[serde(default)]
    pub plan: PlanSpec,
}

/// `POST /api/images`: what the gateway stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadedImage {
    pub sha256: String,
    pub size: u64,
}

/// A verb of `POST /api/campaigns/{id}/{verb}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Verb {
    /// Nothing new starts; jobs under way finish.
    Pause,
    /// Go on after a pause (also one at the error threshold).
    Resume,
    /// Nothing new starts, ever; leaves not started stay as they are.
    Stop,
    /// Let the next group start: at once when the campaign waits for an
    /// approval (or stopped at the error threshold), else as soon as the
    /// current group ends, whatever its success.
    Approve,
    /// Run the failed leaves again.
    Retry,
}

impl Verb {
    pub fn name(self) -> &'static str {
        match self {
            Verb::Pause => "pause",
            Verb::Resume => "resume",
            Verb::Stop => "stop",
            Verb::Approve => "approve",
            Verb::Retry => "retry",
        }
    }

    pub fn parse(s: &str) -> Option<Verb> {
        [
            Verb::Pause,
            Verb::Resume,
            Verb::Stop,
            Verb::Approve,
            Verb::Retry,
        ]
        .into_iter()
        .find(|v| v.name() == s)
    }
}

/// The body of a verb (optional): why, for the campaign's record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerbRequest {
    #[serde(default)]
    pub reason: Option<String>,
}

/// `url` without its query (a signed URL's signature is a credential).
pub fn without_query(url: &str) -> String {
    match url.split_once('?') {
        Some((bare, _)) => format!("{bare}?…"),
        None => url.to_string(),
    }
}

/// One member as the API shows it, with its job's progress.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberView {
    /// `pk/dn`.
    pub device: String,
    pub module: String,
    pub bus: String,
    pub from_version: String,
    /// pending, running, succeeded, failed, not_started, superseded.
    pub state: String,
    /// The job's phase while running (queued, downloading, ..., flashing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The job's overall percent while running, 100 once succeeded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<u8>,
    /// The version read back after success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Whether its failure counts against the error threshold.
    #[serde(default)]
    pub counted: bool,
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
}

/// One group as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    pub name: String,
    pub counts: Counts,
    pub approved: bool,
    pub members: Vec<MemberView>,
}

/// A campaign as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignView {
    pub id: String,
    pub origin: plan::Origin,
    pub version: String,
    pub module: String,
    pub image: Image,
    /// collecting, running, paused, stopped, finished.
    pub state: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
    /// The newest group allowed to start (0-based).
    pub current_group: usize,
    pub counts: Counts,
    pub groups: Vec<GroupView>,
    pub selection: Selection,
    pub plan: PlanSpec,
    pub created_ms: u64,
    pub transitions: Vec<plan::Transition>,
}

impl CampaignView {
    /// The view of `c`; `job(device, module)` gives a running member's
    /// phase and percent.
    pub fn of(c: &Campaign, job: impl Fn(&str, &str) -> Option<(String, Option<u8>)>) -> Self {
        let groups = c
            .groups
            .iter()
            .map(|g| GroupView {
                name: g.name.clone(),
                counts: g.counts(),
                approved: g.approved,
                members: g
                    .members
                    .iter()
                    .map(|m| {
                        let device = m.device();
                        let (phase, progress) = match &m.state {
                            MemberState::Running => match job(&device, &m.module) {
                                Some((p, pct)) => (Some(p), pct),
                                None => (None, None),
                            },
                            MemberState::Succeeded { .. } => (None, Some(100)),
                            _ => (None, None),
                        };
                        let (version, reason, counted) = match &m.state {
                            MemberState::Succeeded { version } => {
                                (Some(version.clone()), None, false)
                            }
                            MemberState::Failed { reason, counted } => {
                                (None, Some(reason.clone()), *counted)
                            }
                            MemberState::Superseded { reason } => {
                                (None, Some(reason.clone()), false)
                            }
                            _ => (None, None, false),
                        };
                        MemberView {
                            device,
                            module: m.module.clone(),
                            bus: m.bus.clone(),
                            from_version: m.from_version.clone(),
                            state: m.state.name().into(),
                            phase,
                            progress,
                            version,
                            reason,
                            counted,
                            attempts: m.attempts,
                            started_ms: m.started_ms,
                            ended_ms: m.ended_ms,
                        }
                    })
                    .collect(),
            })
            .collect();
        // A platform URL is signed (a credential for a day): the view shows
        // where it points, not its query.
        let mut image = c.image.clone();
        if let Some(u) = &mut image.url {
            *u = without_query(u);
        }
        CampaignView {
            id: c.id.clone(),
            origin: c.origin,
            version: c.version.clone(),
            module: c.module.clone(),
            image,
            state: c.state.name().into(),
            pause_reason: c.pause_reason.clone(),
            current_group: c.current_group,
            counts: c.counts(),
            groups,
            selection: c.selection.clone(),
            plan: c.plan.clone(),
            created_ms: c.created_ms,
            transitions: c.transitions.clone(),
        }
    }

    /// Every member, group by group.
    pub fn members(&self) -> impl Iterator<Item = &MemberView> {
        self.groups.iter().flat_map(|g| g.members.iter())
    }
}

/// One line of `GET /api/versions`: how many leaves of a family and model
/// run a version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionCount {
    pub family: String,
    /// The hardware id or model read from the leaves; none when unknown.
    pub model: Option<String>,
    pub module: String,
    pub version: String,
    pub count: usize,
    pub devices: Vec<String>,
}
