//! Campaigns without I/O: which leaves a selection takes, how a plan cuts
//! them into groups, and the campaign's state machine (which member may start
//! now, what a member's end does to its group's thresholds, the operator's
//! verbs). The manager (`rollout::Manager`) persists a [`Campaign`] after
//! every change and performs what it decides; nothing here publishes, opens
//! or waits.
//!
//! The plan follows hawkBit's rollout groups and AWS IoT's job rollouts:
//! - groups run in order: a canary group (explicit devices, or a count or
//!   share of the selection), then waves (counts or shares of the rest, the
//!   last size repeating until every leaf has a group);
//! - the next group opens once the share of the current group that
//!   succeeded reaches `success_threshold`; a group that ends below it waits
//!   for an approval (so do all groups after the first with `approve`);
//! - device and plugin failures above `error_threshold` percent of a group,
//!   counted once `min_executed` of the group have finished, pause the whole
//!   campaign; download and gateway trouble never count;
//! - at most `rate_per_minute` members start in any minute.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::ota::protocol::Notice;

/// A group's size: a count of leaves or a share of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Count(u32),
    Percent(u8),
}

impl Size {
    /// `"2"` or `"50%"`; zero is refused (an empty group never ends).
    pub fn parse(s: &str) -> Result<Size, String> {
        let t = s.trim();
        let size = if let Some(p) = t.strip_suffix('%') {
            let p: u8 = p
                .trim()
                .parse()
                .map_err(|_| format!("{s:?} is not a share: write 1% to 100%"))?;
            if p > 100 {
                return Err(format!("{s:?} is more than 100%"));
            }
            Size::Percent(p)
        } else {
            Size::Count(
                t.parse()
                    .map_err(|_| format!("{s:?} is not a count or a share (\"3\", \"25%\")"))?,
            )
        };
        if size.is_zero() {
            return Err(format!("{s:?} is an empty group: give at least 1 or 1%"));
        }
        Ok(size)
    }

    pub fn is_zero(self) -> bool {
        matches!(self, Size::Count(0) | Size::Percent(0))
    }

    /// How many of `n` leaves: a share is rounded up, so it is never empty
    /// while leaves are left.
    pub fn of(self, n: usize) -> usize {
        match self {
            Size::Count(c) => (c as usize).min(n),
            Size::Percent(p) => (n * p as usize).div_ceil(100).min(n),
        }
    }
}

impl std::fmt::Display for Size {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Size::Count(c) => write!(f, "{c}"),
            Size::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u32),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Size::parse(&n.to_string()),
            Raw::S(s) => Size::parse(&s),
        }
        .map_err(serde::de::Error::custom)
    }
}

/// One leaf as a selection sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    pub product_key: String,
    pub device_name: String,
    pub module: String,
    pub family: String,
    /// The hardware id (else the model) last read from it, if any.
    pub model: Option<String>,
    /// The version it runs as far as the gateway knows.
    pub version: String,
    pub tags: Vec<String>,
    /// Its bus: a `[[bus]]` name, `ble` or its link.
    pub bus: String,
}

impl Candidate {
    /// `product_key/device_name`.
    pub fn device(&self) -> String {
        format!("{}/{}", self.product_key, self.device_name)
    }
}

/// Which leaves a campaign upgrades: all of the given criteria must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selection {
    /// The module the image is for (default `default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// The hardware id or model read from the leaf by `identify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// The version now: `1.2.0` (exactly), `!1.2.0` (anything else) or a
    /// range such as `>=1.0, <2.0`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_version: Option<String>,
    /// `pk/dn`, or a glob on `pk/dn` or on the device name (`press-*`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<String>,
    /// Every one of these `[[device]] tags`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The leaf's bus (`[[bus]]` name, `ble`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bus: Option<String>,
}

/// How a version is compared.
#[derive(Debug, Clone)]
enum VersionMatch {
    Exact(String),
    Not(String),
    Range(semver::VersionReq),
}

/// `1.2` as `1.2.0`: firmware versions are often short.
fn lenient_version(v: &str) -> Option<semver::Version> {
    let v = v.trim().trim_start_matches(['v', 'V']);
    if let Ok(x) = semver::Version::parse(v) {
        return Some(x);
    }
    let dots = v.matches('.').count();
    let padded = match dots {
        0 => format!("{v}.0.0"),
        1 => format!("{v}.0"),
        _ => return None,
    };
    semver::Version::parse(&padded).ok()
}

impl VersionMatch {
    fn parse(s: &str) -> Result<VersionMatch, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err("from_version is empty".into());
        }
        if let Some(v) = t.strip_prefix('!') {
            return Ok(VersionMatch::Not(v.trim().to_string()));
        }
        if t.starts_with(['<', '>', '=', '~', '^']) || t.contains(',') {
            return semver::VersionReq::parse(t)
                .map(VersionMatch::Range)
                .map_err(|e| format!("from_version {s:?} is not a version range: {e}"));
        }
        Ok(VersionMatch::Exact(t.to_string()))
    }

    fn matches(&self, v: &str) -> bool {
        match self {
            VersionMatch::Exact(x) => x == v,
            VersionMatch::Not(x) => x != v,
            VersionMatch::Range(r) => lenient_version(v).is_some_and(|v| r.matches(&v)),
        }
    }
}

fn glob(p: &str) -> Result<glob::Pattern, String> {
    glob::Pattern::new(p).map_err(|e| format!("device pattern {p:?}: {e}"))
}

impl Selection {
    /// The module selected leaves must have.
    pub fn module(&self) -> &str {
        self.module
            .as_deref()
            .unwrap_or(crate::ota::protocol::DEFAULT_MODULE)
    }

    /// Check the selection's own syntax (not whether it selects anything).
    pub fn check(&self) -> Result<(), String> {
        if let Some(v) = &self.from_version {
            VersionMatch::parse(v)?;
        }
        for d in &self.devices {
            if d.trim().is_empty() {
                return Err("an empty device name in the selection".into());
            }
            glob(d)?;
        }
        if self.tags.iter().any(|t| t.trim().is_empty()) {
            return Err("an empty tag in the selection".into());
        }
        Ok(())
    }

    /// Whether `c` is selected (call [`Selection::check`] first: a bad
    /// pattern or range selects nothing).
    pub fn matches(&self, c: &Candidate) -> bool {
        if c.module != self.module() {
            return false;
        }
        if self.family.as_ref().is_some_and(|f| *f != c.family) {
            return false;
        }
        if let Some(m) = &self.model
            && c.model.as_ref() != Some(m)
        {
            return false;
        }
        if let Some(v) = &self.from_version {
            match VersionMatch::parse(v) {
                Ok(vm) if vm.matches(&c.version) => {}
                _ => return false,
            }
        }
        if !self.devices.is_empty() {
            let device = c.device();
            let hit = self.devices.iter().any(|d| {
                *d == device
                    || glob(d).is_ok_and(|p| p.matches(&device) || p.matches(&c.device_name))
            });
            if !hit {
                return false;
            }
        }
        if !self.tags.iter().all(|t| c.tags.contains(t)) {
            return false;
        }
        if self.bus.as_ref().is_some_and(|b| *b != c.bus) {
            return false;
        }
        true
    }
}

/// How a campaign proceeds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PlanSpec {
    /// The canary group by size (none, with no devices: no canary group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<Size>,
    /// The canary group by name (`pk/dn`), instead of a size.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub canary_devices: Vec<String>,
    /// The waves after the canary; the last size repeats. None: one wave of
    /// the rest.
    #[serde(default)]
    pub waves: Vec<Size>,
    /// Percent of a group that must succeed before the next one starts.
    #[serde(default = "hundred")]
    pub success_threshold: u8,
    /// Pause when counted failures exceed this percent of a group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_threshold: Option<u8>,
    /// ... once at least this many of the group have finished.
    #[serde(default = "one")]
    pub min_executed: u32,
    /// Wait for an approval before every group after the first.
    #[serde(default)]
    pub approve: bool,
    /// Most starts in any minute.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_minute: Option<u32>,
}

fn hundred() -> u8 {
    100
}
fn one() -> u32 {
    1
}

impl Default for PlanSpec {
    fn default() -> Self {
        PlanSpec {
            canary: None,
            canary_devices: Vec::new(),
            waves: Vec::new(),
            success_threshold: 100,
            error_threshold: None,
            min_executed: 1,
            approve: false,
            rate_per_minute: None,
        }
    }
}

impl PlanSpec {
    /// The plan of `[jobs.plan]`.
    pub fn from_config(c: &crate::config::PlanConfig) -> Result<PlanSpec, String> {
        let canary = Size::parse(&c.canary).ok();
        if canary.is_none() && c.canary.trim() != "0" {
            Size::parse(&c.canary).map_err(|e| format!("canary: {e}"))?;
        }
        let waves = c
            .waves
            .iter()
            .map(|w| Size::parse(w).map_err(|e| format!("waves: {e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let plan = PlanSpec {
            canary,
            canary_devices: Vec::new(),
            waves,
            success_threshold: c.success_threshold,
            error_threshold: Some(c.error_threshold),
            min_executed: c.min_executed,
            approve: c.approve,
            rate_per_minute: c.rate_per_minute,
        };
        plan.check()?;
        Ok(plan)
    }

    /// Check the plan's numbers.
    pub fn check(&self) -> Result<(), String> {
        if self.canary.is_some_and(Size::is_zero) || self.waves.iter().any(|w| w.is_zero()) {
            return Err("a group of size 0 never ends: give at least 1 or 1%".into());
        }
        if self.canary.is_some() && !self.canary_devices.is_empty() {
            return Err("give the canary as a size or as devices, not both".into());
        }
        if !(1..=100).contains(&self.success_threshold) {
            return Err(format!(
                "success_threshold {} must be 1..=100 (percent)",
                self.success_threshold
            ));
        }
        if let Some(e) = self.error_threshold
            && e > 100
        {
            return Err(format!("error_threshold {e} must be 0..=100 (percent)"));
        }
        if self.min_executed == 0 {
            return Err("min_executed must be at least 1".into());
        }
        if self.rate_per_minute == Some(0) {
            return Err("rate_per_minute 0 would start nothing: leave it out for no limit".into());
        }
        Ok(())
    }

    /// Cut `selected` into groups: the canary, then the waves. Leaves are
    /// taken in an order that alternates between buses, so a group keeps
    /// several buses busy.
    pub fn groups(&self, selected: &[Candidate]) -> Result<Vec<Vec<Candidate>>, String> {
        let mut rest = spread_over_buses(selected);
        let mut groups = Vec::new();
        if !self.canary_devices.is_empty() {
            let mut canary = Vec::new();
            for d in &self.canary_devices {
                let Some(i) = rest.iter().position(|c| c.device() == *d) else {
                    return Err(format!(
                        "canary device {d} is not among the selected leaves"
                    ));
                };
                canary.push(rest.remove(i));
            }
            groups.push(canary);
        } else if let Some(size) = self.canary {
            let n = size.of(rest.len());
            groups.push(rest.drain(..n).collect());
        }
        let total = rest.len();
        let mut i = 0;
        while !rest.is_empty() {
            let n = match self.waves.get(i).or(self.waves.last()) {
                Some(size) => size.of(total).max(1),
                None => rest.len(),
            };
            groups.push(rest.drain(..n.min(rest.len())).collect());
            i += 1;
        }
        groups.retain(|g| !g.is_empty());
        Ok(groups)
    }
}

/// Leaves ordered by name, then interleaved bus by bus.
fn spread_over_buses(selected: &[Candidate]) -> Vec<Candidate> {
    let mut by_bus: BTreeMap<&str, VecDeque<&Candidate>> = BTreeMap::new();
    let mut sorted: Vec<&Candidate> = selected.iter().collect();
    sorted.sort_by_key(|c| (c.device(), c.module.clone()));
    for c in sorted {
        by_bus.entry(&c.bus).or_default().push_back(c);
    }
    let mut out = Vec::with_capacity(selected.len());
    while out.len() < selected.len() {
        for q in by_bus.values_mut() {
            if let Some(c) = q.pop_front() {
                out.push(c.clone());
            }
        }
    }
    out
}

/// Where a campaign came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// The operator (API, `otagw upgrade`).
    Local,
    /// Upgrade notices of the platform under `[jobs] policy = "plan"`.
    Platform,
}

/// The image a campaign installs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Image {
    /// Where it is downloaded from; none: uploaded to the gateway's cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// `sha256` (or `md5`, in platform notices).
    pub sign_method: String,
    /// Lowercase hex digest.
    pub sign: String,
    pub size: u64,
}

/// A campaign's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CampaignState {
    /// Collecting platform notices before the plan is drawn up.
    Collecting,
    Running,
    Paused,
    /// Stopped by the operator: nothing new starts.
    Stopped,
    /// Every member ended.
    Finished,
}

impl CampaignState {
    pub fn name(self) -> &'static str {
        match self {
            CampaignState::Collecting => "collecting",
            CampaignState::Running => "running",
            CampaignState::Paused => "paused",
            CampaignState::Stopped => "stopped",
            CampaignState::Finished => "finished",
        }
    }
}

/// Why a campaign is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseKind {
    /// `otagw campaign pause`.
    Operator,
    /// Too many failures in a group.
    ErrorThreshold,
    /// The next group waits for `otagw campaign approve`.
    Approval,
}

/// A member's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum MemberState {
    /// Not started yet.
    Pending,
    /// Its job was handed to the gateway (it may wait for its bus).
    Running,
    Succeeded {
        version: String,
    },
    Failed {
        reason: String,
        /// A device or plugin failure, counted against the error threshold
        /// (download and gateway trouble is not).
        counted: bool,
    },
    /// The campaign was stopped before it started: the leaf is untouched.
    NotStarted,
    /// Another notice for the leaf took its place (a newer package from the
    /// platform), or the leaf left the configuration: neither a success nor
    /// a failure of this campaign, and never retried by it.
    Superseded {
        reason: String,
    },
}

impl MemberState {
    pub fn name(&self) -> &'static str {
        match self {
            MemberState::Pending => "pending",
            MemberState::Running => "running",
            MemberState::Succeeded { .. } => "succeeded",
            MemberState::Failed { .. } => "failed",
            MemberState::NotStarted => "not_started",
            MemberState::Superseded { .. } => "superseded",
        }
    }

    pub fn is_ended(&self) -> bool {
        !matches!(self, MemberState::Pending | MemberState::Running)
    }
}

/// One leaf of a campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub product_key: String,
    pub device_name: String,
    pub module: String,
    pub bus: String,
    /// The version it ran when selected.
    pub from_version: String,
    #[serde(flatten)]
    pub state: MemberState,
    /// The message id of the notice its job runs (what ties the job to it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice_id: Option<u64>,
    /// Jobs started for it (a retry starts another).
    #[serde(default)]
    pub attempts: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// The platform's notice for it (platform campaigns: what its job runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notice: Option<Notice>,
}

impl Member {
    pub fn device(&self) -> String {
        format!("{}/{}", self.product_key, self.device_name)
    }

    /// A pending member for `c`.
    pub fn of(c: &Candidate) -> Member {
        Member {
            product_key: c.product_key.clone(),
            device_name: c.device_name.clone(),
            module: c.module.clone(),
            bus: c.bus.clone(),
            from_version: c.version.clone(),
            state: MemberState::Pending,
            notice_id: None,
            attempts: 0,
            started_ms: None,
            ended_ms: None,
            notice: None,
        }
    }
}

/// A group of a campaign.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Group {
    /// `canary`, `wave 1`, ...
    pub name: String,
    pub members: Vec<Member>,
    /// The operator approved starting this group.
    #[serde(default)]
    pub approved: bool,
    /// The counted failures the operator went on past (resume or approve
    /// after the error threshold): only failures beyond these pause the
    /// campaign again.
    #[serde(default)]
    pub errors_acknowledged: usize,
}

/// A group's account.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub total: usize,
    pub pending: usize,
    pub running: usize,
    pub succeeded: usize,
    pub failed: usize,
    /// Failures that count against the error threshold.
    pub failed_counted: usize,
    pub not_started: usize,
    #[serde(default)]
    pub superseded: usize,
}

impl Counts {
    fn add(&mut self, s: &MemberState) {
        self.total += 1;
        match s {
            MemberState::Pending => self.pending += 1,
            MemberState::Running => self.running += 1,
            MemberState::Succeeded { .. } => self.succeeded += 1,
            MemberState::Failed { counted, .. } => {
                self.failed += 1;
                if *counted {
                    self.failed_counted += 1;
                }
            }
            MemberState::NotStarted => self.not_started += 1,
            MemberState::Superseded { .. } => self.superseded += 1,
        }
    }

    /// The members the group's shares are taken of: all but those another
    /// notice took over.
    pub fn counted_total(&self) -> usize {
        self.total - self.superseded
    }

    /// Members that finished (succeeded or failed).
    pub fn executed(&self) -> usize {
        self.succeeded + self.failed
    }

    fn ended(&self) -> bool {
        self.pending == 0 && self.running == 0
    }
}

impl Group {
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for m in &self.members {
            c.add(&m.state);
        }
        c
    }
}

/// One change of a campaign's state, with why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at_ms: u64,
    pub from: CampaignState,
    pub to: CampaignState,
    pub reason: String,
}

/// A campaign: an image, a target version, the leaves in groups, and where
/// it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Campaign {
    pub id: String,
    pub origin: Origin,
    pub image: Image,
    pub version: String,
    pub module: String,
    pub selection: Selection,
    pub plan: PlanSpec,
    pub groups: Vec<Group>,
    pub state: CampaignState,
    /// Why it is paused, while it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause: Option<PauseKind>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_reason: Option<String>,
    /// The newest group allowed to start members (the ones before it too).
    pub current_group: usize,
    pub created_ms: u64,
    /// When collecting platform notices ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub collect_until_ms: Option<u64>,
    /// Start times within the last minute (the rate limit).
    #[serde(default)]
    pub recent_starts: VecDeque<u64>,
    pub transitions: Vec<Transition>,
}

/// A verb the campaign's state does not allow, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// Where a member is: group and index.
pub type At = (usize, usize);

impl Campaign {
    /// A running campaign of `groups`, its first group open.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: String,
        origin: Origin,
        image: Image,
        version: String,
        selection: Selection,
        plan: PlanSpec,
        groups: Vec<Vec<Candidate>>,
        now: u64,
    ) -> Campaign {
        let module = selection.module().to_string();
        let canary = plan.canary.is_some() || !plan.canary_devices.is_empty();
        let groups = groups
            .iter()
            .enumerate()
            .map(|(i, g)| Group {
                name: match (canary, i) {
                    (true, 0) => "canary".into(),
                    (true, i) => format!("wave {i}"),
                    (false, i) => format!("wave {}", i + 1),
                },
                members: g.iter().map(Member::of).collect(),
                approved: false,
                errors_acknowledged: 0,
            })
            .collect();
        let mut c = Campaign {
            id,
            origin,
            image,
            version,
            module,
            selection,
            plan,
            groups,
            state: CampaignState::Running,
            pause: None,
            pause_reason: None,
            current_group: 0,
            created_ms: now,
            collect_until_ms: None,
            recent_starts: VecDeque::new(),
            transitions: Vec::new(),
        };
        let n: usize = c.groups.iter().map(|g| g.members.len()).sum();
        c.transitions.push(Transition {
            at_ms: now,
            from: CampaignState::Running,
            to: CampaignState::Running,
            reason: format!("created: {n} leaves in {} groups", c.groups.len()),
        });
        c
    }

    fn set(&mut self, to: CampaignState, now: u64, reason: String) {
        self.transitions.push(Transition {
            at_ms: now,
            from: self.state,
            to,
            reason,
        });
        self.state = to;
    }

    fn pause_for(&mut self, kind: PauseKind, now: u64, reason: String) {
        self.pause = Some(kind);
        self.pause_reason = Some(reason.clone());
        self.set(CampaignState::Paused, now, reason);
    }

    /// Every member with where it is.
    pub fn members(&self) -> impl Iterator<Item = (At, &Member)> {
        self.groups.iter().enumerate().flat_map(|(g, grp)| {
            grp.members
                .iter()
                .enumerate()
                .map(move |(i, m)| ((g, i), m))
        })
    }

    pub fn member(&self, at: At) -> &Member {
        &self.groups[at.0].members[at.1]
    }

    pub(crate) fn member_mut(&mut self, at: At) -> &mut Member {
        &mut self.groups[at.0].members[at.1]
    }

    /// The whole campaign's account.
    pub fn counts(&self) -> Counts {
        let mut c = Counts::default();
        for (_, m) in self.members() {
            c.add(&m.state);
        }
        c
    }

    /// Whether the campaign will start nothing more by itself.
    pub fn is_over(&self) -> bool {
        matches!(self.state, CampaignState::Stopped | CampaignState::Finished)
    }

    /// The members that may start now: at most `free[bus]` per bus and
    /// `global` in all (both taken from), oldest group first, within the
    /// rate limit.
    pub fn due(
        &mut self,
        now: u64,
        free: &mut BTreeMap<String, usize>,
        global: &mut usize,
    ) -> Vec<At> {
        if self.state != CampaignState::Running {
            return Vec::new();
        }
        while self
            .recent_starts
            .front()
            .is_some_and(|t| now.saturating_sub(*t) >= 60_000)
        {
            self.recent_starts.pop_front();
        }
        let mut budget = match self.plan.rate_per_minute {
            Some(r) => (r as usize).saturating_sub(self.recent_starts.len()),
            None => usize::MAX,
        };
        let mut out = Vec::new();
        for g in 0..=self.current_group.min(self.groups.len().saturating_sub(1)) {
            for (i, m) in self.groups[g].members.iter().enumerate() {
                if budget == 0 || *global == 0 {
                    return out;
                }
                if m.state != MemberState::Pending {
                    continue;
                }
                let slots = free.entry(m.bus.clone()).or_insert(1);
                if *slots == 0 {
                    continue;
                }
                *slots -= 1;
                *global -= 1;
                budget -= 1;
                out.push((g, i));
            }
        }
        out
    }

    /// `at`'s job was handed over with notice id `notice_id`.
    pub fn started(&mut self, at: At, notice_id: u64, now: u64) {
        self.recent_starts.push_back(now);
        let m = self.member_mut(at);
        m.state = MemberState::Running;
        m.notice_id = Some(notice_id);
        m.attempts += 1;
        m.started_ms = Some(now);
        m.ended_ms = None;
    }

    /// `at` was recorded as started but its job never came to be (a crash
    /// in between, or its notice was dropped behind another job): it starts
    /// again (or, in a stopped campaign, never).
    pub fn unstart(&mut self, at: At) {
        let stopped = self.state == CampaignState::Stopped;
        let m = self.member_mut(at);
        m.state = if stopped {
            MemberState::NotStarted
        } else {
            MemberState::Pending
        };
        m.notice_id = None;
        m.attempts = m.attempts.saturating_sub(1);
        m.started_ms = None;
    }

    /// The member whose job runs notice `notice_id` on `device`/`module`.
    pub fn find(&self, device: &str, module: &str, notice_id: u64) -> Option<At> {
        self.members()
            .find(|(_, m)| {
                m.device() == device
                    && m.module == module
                    && m.notice_id == Some(notice_id)
                    && m.state == MemberState::Running
            })
            .map(|(at, _)| at)
    }

    /// `at`'s job ended; then see what its group's thresholds say.
    pub fn ended(&mut self, at: At, state: MemberState, now: u64) {
        let m = self.member_mut(at);
        m.state = state;
        m.ended_ms = Some(now);
        self.advance(now);
    }

    /// The open groups.
    fn open_groups(&self) -> std::ops::RangeInclusive<usize> {
        0..=self.current_group.min(self.groups.len().saturating_sub(1))
    }

    /// Why the error threshold is crossed, if it is: in an open group, more
    /// counted failures than the operator went on past, and more than
    /// `error_threshold` percent of the group, once `min_executed` finished.
    fn error_breach(&self) -> Option<String> {
        let limit = self.plan.error_threshold?;
        for g in self.open_groups() {
            let grp = &self.groups[g];
            let c = grp.counts();
            if c.failed_counted <= grp.errors_acknowledged
                || c.executed() < self.plan.min_executed as usize
                || c.failed_counted * 100 <= limit as usize * c.counted_total()
            {
                continue;
            }
            return Some(format!(
                "error threshold: {} of {} leaves in {} failed on the device or plugin (more \
                 than {limit}%; {} finished); look at the failures, then `otagw campaign \
                 resume` or `stop`",
                c.failed_counted,
                c.counted_total(),
                grp.name,
                c.executed()
            ));
        }
        None
    }

    /// The failures so far are seen: only more of them pause again.
    fn acknowledge_errors(&mut self) {
        for g in self.open_groups() {
            self.groups[g].errors_acknowledged = self.groups[g].counts().failed_counted;
        }
    }

    /// Apply the thresholds: pause on errors (also while waiting for an
    /// approval: the error pause replaces it), open the next group on
    /// success, finish when everything ended.
    pub fn advance(&mut self, now: u64) {
        if self.groups.is_empty() {
            if !self.is_over() {
                self.set(CampaignState::Finished, now, "no leaves".into());
            }
            return;
        }
        loop {
            let awaiting_approval =
                self.state == CampaignState::Paused && self.pause == Some(PauseKind::Approval);
            if self.state != CampaignState::Running && !awaiting_approval {
                return;
            }
            if let Some(reason) = self.error_breach() {
                self.pause_for(PauseKind::ErrorThreshold, now, reason);
                return;
            }
            if awaiting_approval {
                return;
            }
            let g = self.current_group;
            let grp = &self.groups[g];
            let c = grp.counts();
            let last = g + 1 == self.groups.len();
            if last {
                if self.groups.iter().all(|g| g.counts().ended()) {
                    let all = self.counts();
                    self.set(
                        CampaignState::Finished,
                        now,
                        format!(
                            "every leaf ended: {} succeeded, {} failed",
                            all.succeeded, all.failed
                        ),
                    );
                }
                return;
            }
            let total = c.counted_total();
            let reached = c.succeeded * 100 >= self.plan.success_threshold as usize * total;
            let next = &self.groups[g + 1];
            if reached || (c.ended() && next.approved) {
                if self.plan.approve && !next.approved {
                    let reason = format!(
                        "{} reached its success threshold ({} of {} succeeded); `otagw \
                         campaign approve` starts {}",
                        grp.name, c.succeeded, total, next.name
                    );
                    self.pause_for(PauseKind::Approval, now, reason);
                    return;
                }
                let reason = format!(
                    "{} opened: {} of {} in {} succeeded",
                    next.name, c.succeeded, total, grp.name
                );
                self.current_group += 1;
                self.transitions.push(Transition {
                    at_ms: now,
                    from: self.state,
                    to: self.state,
                    reason,
                });
                continue;
            }
            if c.ended() {
                let reason = format!(
                    "{} ended below its success threshold: {} of {} succeeded (needs {}%); \
                     `otagw campaign approve` starts {} anyway, `retry` runs the failed again",
                    grp.name, c.succeeded, total, self.plan.success_threshold, next.name
                );
                self.pause_for(PauseKind::Approval, now, reason);
            }
            return;
        }
    }

    /// `pause`: nothing new starts; jobs under way finish.
    pub fn pause(&mut self, now: u64, reason: &str) -> Result<(), Refused> {
        match self.state {
            CampaignState::Running | CampaignState::Collecting => {
                self.pause_for(PauseKind::Operator, now, format!("paused: {reason}"));
                Ok(())
            }
            CampaignState::Paused => Ok(()),
            s => Err(Refused(format!(
                "the campaign is {}: nothing to pause",
                s.name()
            ))),
        }
    }

    /// `resume` after a pause by the operator or the error threshold (then
    /// the failures so far are taken as seen: only more of them pause again).
    pub fn resume(&mut self, now: u64, reason: &str) -> Result<(), Refused> {
        match (self.state, self.pause) {
            (CampaignState::Paused, Some(PauseKind::Approval)) => Err(Refused(format!(
                "the campaign waits for an approval ({}): use approve",
                self.pause_reason.as_deref().unwrap_or("")
            ))),
            (CampaignState::Paused, kind) => {
                if kind == Some(PauseKind::ErrorThreshold) {
                    self.acknowledge_errors();
                }
                self.unpause(now, format!("resumed: {reason}"));
                Ok(())
            }
            (CampaignState::Running | CampaignState::Collecting, _) => Ok(()),
            (s, _) => Err(Refused(format!(
                "the campaign is {}: it cannot be resumed",
                s.name()
            ))),
        }
    }

    fn unpause(&mut self, now: u64, reason: String) {
        self.pause = None;
        self.pause_reason = None;
        // A platform campaign still collecting (drawn up, it has no end of
        // collection any more) goes back to collecting.
        let to = if self.collect_until_ms.is_some() {
            CampaignState::Collecting
        } else {
            CampaignState::Running
        };
        self.set(to, now, reason);
        self.advance(now);
    }

    /// `approve`: the next group may start once the current one reached its
    /// success threshold or ended, whatever its success (at once when the
    /// campaign waits for this approval); after an error-threshold pause the
    /// failures so far are taken as seen and the campaign goes on.
    pub fn approve(&mut self, now: u64, reason: &str) -> Result<(), Refused> {
        if self.is_over() {
            return Err(Refused(format!(
                "the campaign is {}: nothing to approve",
                self.state.name()
            )));
        }
        let next = self.current_group + 1;
        let what = match self.groups.get_mut(next) {
            Some(g) => {
                g.approved = true;
                g.name.clone()
            }
            None => "no further group".into(),
        };
        let reason = format!("approved ({what}): {reason}");
        match self.pause {
            Some(PauseKind::Operator) => {
                // An approval does not end the operator's own pause.
                self.transitions.push(Transition {
                    at_ms: now,
                    from: self.state,
                    to: self.state,
                    reason,
                });
            }
            Some(kind) => {
                if kind == PauseKind::ErrorThreshold {
                    self.acknowledge_errors();
                }
                self.unpause(now, reason);
            }
            None => {
                self.transitions.push(Transition {
                    at_ms: now,
                    from: self.state,
                    to: self.state,
                    reason,
                });
                self.advance(now);
            }
        }
        Ok(())
    }

    /// `stop`: nothing new starts, jobs under way finish; the members not
    /// started stay on their version and are `not_started`.
    pub fn stop(&mut self, now: u64, reason: &str) -> Result<(), Refused> {
        if self.is_over() {
            return Err(Refused(format!(
                "the campaign is already {}",
                self.state.name()
            )));
        }
        for g in &mut self.groups {
            for m in &mut g.members {
                if m.state == MemberState::Pending {
                    m.state = MemberState::NotStarted;
                }
            }
        }
        self.pause = None;
        self.pause_reason = None;
        self.set(CampaignState::Stopped, now, format!("stopped: {reason}"));
        Ok(())
    }

    /// `retry`: the failed members of the open groups run again (their
    /// failures no longer count); a pause for an approval or for errors ends
    /// with it, an operator's pause stays.
    pub fn retry(&mut self, now: u64, reason: &str) -> Result<usize, Refused> {
        if self.state == CampaignState::Stopped {
            return Err(Refused("the campaign is stopped: start a new one".into()));
        }
        let mut n = 0;
        for g in self.open_groups() {
            for m in &mut self.groups[g].members {
                if matches!(m.state, MemberState::Failed { .. }) {
                    m.state = MemberState::Pending;
                    m.ended_ms = None;
                    n += 1;
                }
            }
            self.groups[g].errors_acknowledged = 0;
        }
        if n == 0 {
            return Err(Refused("no failed leaves to retry".into()));
        }
        let why = format!("retry of {n} failed leaves: {reason}");
        match (self.state, self.pause) {
            (CampaignState::Finished, _) => self.set(CampaignState::Running, now, why),
            (CampaignState::Paused, Some(PauseKind::Approval | PauseKind::ErrorThreshold)) => {
                self.unpause(now, why)
            }
            _ => self.transitions.push(Transition {
                at_ms: now,
                from: self.state,
                to: self.state,
                reason: why,
            }),
        }
        Ok(n)
    }
}

/// How a job's end counts for its member: the job's last transition says
/// in which phase it failed. A failure while downloading (or queued) is
/// download trouble; a crash of the gateway's own is the gateway's; neither
/// counts against the error threshold.
pub fn outcome(job: &crate::ota::job::Job) -> Option<MemberState> {
    use crate::ota::job::State;
    match job.state() {
        State::Succeeded { version } => Some(MemberState::Succeeded {
            version: version.clone(),
        }),
        State::Failed { step, desc } => {
            let phase = job.history().last().map(|t| t.from.clone());
            let device_phase = matches!(
                phase,
                Some(State::Verifying | State::Flashing { .. } | State::Identifying)
            );
            let crash = desc.starts_with(crate::ota::job::CRASH_PREFIX);
            Some(MemberState::Failed {
                reason: format!("{step}: {desc}"),
                counted: device_phase && !crash,
            })
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests;
