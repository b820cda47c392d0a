//! Remote plugin updates: a notice on the gateway's own upgrade topic for
//! module `plugin.<family>` replaces that family's plugin while the gateway
//! runs, and the next jobs of the family are its probation.
//!
//! 1. **Take** ([`offer`]): refuse what cannot be run (another module of the
//!    gateway, MQTT downloads, too big, no trusted keys, a version rolled back
//!    here); record the update in the ledger (`plugin/ledger.rs`) before
//!    anything else, so a restart runs it again.
//! 2. **Run** ([`run_update`]): download through the cache (digest checked),
//!    the checks of `plugin::update` (signature, manifest, floor, code), then
//!    install (write, fsync, rename, keeping `FILE.prev`) and swap it in; the
//!    platform hears `100` on the module and the new module version.
//! 3. **Watch** ([`job_ended`], the timer): the family's next jobs on the new
//!    plugin; too many plugin faults roll it back ([`roll_back`]): the
//!    previous file returns, the platform hears `-4` on the module with why,
//!    and the version is refused until another arrives. Passing raises the
//!    family's security-version floor.
//!
//! Every step is recorded before the next begins and each is idempotent, so
//! a `kill -9` anywhere leaves one file per family and a ledger that says
//! what to finish.

use std::collections::HashSet;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::Core;
use crate::cache::{Digest, FetchRequest};
use crate::ota::protocol::{Download, Notice, Progress, Step};
use crate::ota::topics;
use crate::plugin::ledger::{Blocked, Ledger, Phase, Probation, ProbationPolicy, Update, Verdict};
use crate::plugin::update::{self, Expect};
use crate::plugin::{ImageSource, file_sha256};
use crate::upstream::Delivery;

/// The module prefix of plugins on the gateway's own topics.
pub(crate) const MODULE_PREFIX: &str = "plugin.";

/// The daemon's state of remote plugin updates.
pub(crate) struct PluginUpdates {
    path: std::path::PathBuf,
    ledger: Mutex<Ledger>,
    policy: ProbationPolicy,
    allow_downgrade: bool,
    /// Families whose update task runs now.
    running: Mutex<HashSet<String>>,
}

impl PluginUpdates {
    /// The ledger in `data_dir` (a broken one is moved aside, reported).
    pub fn open(data_dir: &Path, policy: ProbationPolicy, allow_downgrade: bool) -> PluginUpdates {
        let path = data_dir.join(crate::plugin::ledger::FILE);
        let ledger = Ledger::load(&path).unwrap_or_else(|e| {
            tracing::error!("{e}");
            Ledger::default()
        });
        PluginUpdates {
            path,
            ledger: Mutex::new(ledger),
            policy,
            allow_downgrade,
            running: Mutex::new(HashSet::new()),
        }
    }

    fn save(&self, ledger: &Ledger) {
        if let Err(e) = ledger.save(&self.path) {
            tracing::error!(
                path = %self.path.display(),
                "cannot record the plugin update state ({e}); a restart may repeat or forget it \
                 (check the data directory's disk)"
            );
        }
    }

    fn ledger_guard(&self) -> std::sync::MutexGuard<'_, Ledger> {
        super::lock(&self.ledger)
    }

    /// The ledger as it is now (for the API).
    pub fn snapshot(&self) -> Ledger {
        self.ledger_guard().clone()
    }
}

/// A family name from a module `plugin.<family>`.
fn family_of(module: &str) -> Option<&str> {
    let f = module.strip_prefix(MODULE_PREFIX)?;
    let ok = !f.is_empty()
        && f.len() <= 64
        && f.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    ok.then_some(f)
}

/// Report on the gateway's own progress topic; `id`: durable, with that id.
async fn report(core: &Core, module: &str, step: Step, desc: String, id: Option<u64>) {
    let (id, delivery) = match id {
        Some(id) => (id, Delivery::Durable),
        None => (core.next_id(), Delivery::BestEffort),
    };
    let p = Progress::new(step, desc, module);
    let topic = topics::progress(&core.gw.product_key, &core.gw.device_name);
    core.publish(&topic, p.payload(id), delivery).await;
}

/// Take a notice on the gateway's own upgrade topic.
pub(super) async fn offer(core: &Arc<Core>, notice: Notice) {
    let module = notice.module.clone();
    let gw = core.gw.clone();
    let Some(family) = family_of(&module).map(str::to_string) else {
        let desc = format!(
            "the gateway's own module {module:?} cannot be upgraded over the air; its plugins \
             can (module \"plugin.<family>\")"
        );
        return core.reject(&gw, &module, Step::UpgradeFailed, desc).await;
    };
    if let Download::Mqtt { .. } = notice.download {
        let desc = "download over MQTT (dProtocol mqtt) is not supported; send an http(s) url";
        return core
            .reject(&gw, &module, Step::DownloadFailed, desc.into())
            .await;
    }
    if notice.size > core.limits.max_image_bytes {
        let desc = format!(
            "the plugin is {} bytes, more than this gateway takes ([cache] max_image_mib)",
            notice.size
        );
        return core.reject(&gw, &module, Step::DownloadFailed, desc).await;
    }
    if core.plugins.trust().keys.is_empty() {
        let desc = "this gateway takes no remote plugin updates: [plugins] trusted_keys is \
                    empty (list the public key of the plugins' publisher there)";
        return core
            .reject(&gw, &module, Step::UpgradeFailed, desc.into())
            .await;
    }
    match take(core, &family, notice) {
        Taken::Refused(step, desc) => core.reject(&gw, &module, step, desc).await,
        Taken::UnderWay => {}
        Taken::AlreadyAt(version) => {
            report(
                core,
                &module,
                Step::Percent(100),
                format!("{module} already runs {version}"),
                Some(core.next_id()),
            )
            .await;
            core.inform_plugins().await;
        }
        Taken::Recorded => spawn_update(core, family),
    }
}

/// What [`take`] made of a notice.
enum Taken {
    Refused(Step, String),
    /// The same update runs already (the platform sent it twice).
    UnderWay,
    /// The family runs that version already.
    AlreadyAt(String),
    /// Recorded in the ledger: to run.
    Recorded,
}

/// Decide on a notice for `family` and record it when it is to run.
fn take(core: &Core, family: &str, notice: Notice) -> Taken {
    let gw = &core.gw;
    let module = notice.module.clone();
    let updates = &core.updates;
    let mut ledger = updates.ledger_guard();
    let record = ledger.family(family);
    if let Some(b) = record.blocked(&notice.version) {
        return Taken::Refused(
            Step::UpgradeFailed,
            format!(
                "{module} {} was rolled back on this gateway ({}); publish a newer version",
                notice.version, b.reason
            ),
        );
    }
    if super::lock(&updates.running).contains(family) {
        let same = record
            .update
            .as_ref()
            .is_some_and(|u| u.notice.version == notice.version);
        if same {
            tracing::info!(device = %gw, %module, version = %notice.version, "plugin update already under way");
            return Taken::UnderWay;
        }
        return Taken::Refused(
            Step::UpgradeFailed,
            format!(
                "an update of {module} is under way; send {} again when it has ended",
                notice.version
            ),
        );
    }
    let current = core.plugins.get(family);
    if let Some(p) = &current
        && p.info.version == notice.version
    {
        tracing::info!(device = %gw, %module, version = %notice.version, "plugin already at the notice's version");
        return Taken::AlreadyAt(notice.version);
    }
    if let Some(Update {
        phase: Phase::Probation(p),
        ..
    }) = &record.update
    {
        tracing::info!(device = %gw, %module, "{module} {} leaves probation unfinished: {} replaces it", p.version, notice.version);
    }
    tracing::info!(device = %gw, %module, version = %notice.version, size = notice.size, "plugin update notice");
    record.update = Some(Update {
        previous: current.map(|p| p.info.version.clone()),
        notice,
        report_id: core.next_id(),
        phase: Phase::Received,
    });
    updates.save(&ledger);
    Taken::Recorded
}

fn spawn_update(core: &Arc<Core>, family: String) {
    if super::lock(&core.updates.running).insert(family.clone()) {
        core.tasks.spawn(run_update(core.clone(), family));
    }
}

/// Takes the family out of `running` when the update task ends, however.
struct Running<'a>(&'a PluginUpdates, String);
impl Drop for Running<'_> {
    fn drop(&mut self) {
        super::lock(&self.0.running).remove(&self.1);
    }
}

/// Download, check, install and swap in the update of `family` the ledger
/// holds.
async fn run_update(core: Arc<Core>, family: String) {
    let _running = Running(&core.updates, family.clone());
    let stop = core.abort.clone();
    tokio::select! {
        // Interrupted: the ledger still says Received; the next start resumes.
        _ = stop.cancelled() => {}
        () = update_once(&core, &family) => {}
    }
}

async fn update_once(core: &Arc<Core>, family: &str) {
    let (notice, report_id, previous) = {
        let mut ledger = core.updates.ledger_guard();
        match &ledger.family(family).update {
            Some(Update {
                notice,
                report_id,
                previous,
                phase: Phase::Received,
            }) => (notice.clone(), *report_id, previous.clone()),
            _ => return,
        }
    };
    let module = notice.module.clone();
    let gw = core.gw.clone();
    tracing::info!(device = %gw, %module, version = %notice.version, "plugin update started");
    let fail = async |step: Step, desc: String| {
        let stays = match &previous {
            Some(v) => format!("{v} stays in service"),
            None => "nothing was installed".into(),
        };
        tracing::warn!(device = %gw, %module, version = %notice.version, step = step.code(), "plugin update failed ({step}): {desc}; {stays}");
        {
            let mut ledger = core.updates.ledger_guard();
            let record = ledger.family(family);
            if record.update.as_ref().map(|u| u.report_id) == Some(report_id) {
                record.update = None;
            }
            core.updates.save(&ledger);
        }
        report(core, &module, step, desc, Some(report_id)).await;
    };

    report(
        core,
        &module,
        Step::Percent(1),
        format!("downloading {module} {}", notice.version),
        None,
    )
    .await;
    let bytes = match download(core, &notice).await {
        Ok(b) => b,
        Err((step, desc)) => return fail(step, desc).await,
    };
    report(
        core,
        &module,
        Step::Percent(50),
        "checking the signature and the plugin".into(),
        None,
    )
    .await;
    let floor = core.updates.ledger_guard().floor(family);
    let expect = Expect {
        family: Some(family.to_string()),
        version: Some(notice.version.clone()),
        floor,
        allow_downgrade: core.updates.allow_downgrade,
    };
    let trust = core.plugins.trust();
    let checked =
        match update::check(&core.plugins, &trust, &bytes, &core.plugins_dir, &expect).await {
            Ok(c) => c,
            Err(r) => return fail(r.step, r.desc).await,
        };
    let target = checked.target.clone();
    let sha256 = checked.plugin.sha256.clone();
    // A restart after the rename finds it done: installing again would make
    // the new file its own `.prev`.
    if file_sha256(&target).as_deref() != Some(sha256.as_str())
        && let Err(e) = crate::plugin::install::install(&target, &bytes)
    {
        let desc = format!(
            "cannot write {}: {e}; the previous version stays (check the plugins directory's \
             permissions and disk)",
            target.display()
        );
        return fail(Step::FlashFailed, desc).await;
    }
    // Fault injection: the gateway dies with the new file in place and the
    // ledger still saying Received (`FAILPOINTS=plugin-installed=return`).
    #[cfg(feature = "failpoints")]
    fail::fail_point!("plugin-installed", |_| std::process::abort());
    let probation = Probation {
        path: target.clone(),
        sha256,
        version: checked.manifest.version.clone(),
        security_version: checked.manifest.security_version,
        previous: previous.clone(),
        since_ms: core.table.now_ms(),
        jobs: 0,
        faults: 0,
        last_fault: None,
    };
    let policy = core.updates.policy;
    {
        let mut ledger = core.updates.ledger_guard();
        let record = ledger.family(family);
        if policy.watches() {
            if let Some(u) = record.update.as_mut() {
                u.phase = Phase::Probation(probation.clone());
            }
        } else {
            record.floor = record.floor.max(probation.security_version);
            record.update = None;
        }
        record.blocked.clear();
        core.updates.save(&ledger);
    }
    let signers: Vec<String> = checked
        .signers
        .iter()
        .map(|p| p.display().to_string())
        .collect();
    if let Err(e) = core.plugins.adopt(checked.plugin) {
        // Written but not servable (another file claims the family): put
        // the previous one back.
        let _ = crate::plugin::install::roll_back(&target);
        {
            let mut ledger = core.updates.ledger_guard();
            ledger.family(family).update = None;
            core.updates.save(&ledger);
        }
        let desc = format!("{e}; the previous version stays");
        tracing::warn!(device = %gw, %module, "plugin update failed: {desc}");
        return report(core, &module, Step::FlashFailed, desc, Some(report_id)).await;
    }
    core.table.touch();
    let watch = if policy.watches() {
        format!(
            "; on probation for {} job(s) or {}",
            policy.jobs,
            humantime::format_duration(policy.time)
        )
    } else {
        String::new()
    };
    tracing::info!(
        device = %gw, %module, version = %notice.version,
        previous = previous.as_deref().unwrap_or("none"), path = %target.display(),
        "plugin update succeeded: new jobs of the family use it{watch}"
    );
    report(
        core,
        &module,
        Step::Percent(100),
        format!(
            "{module} {} in service (signed by {}){watch}",
            notice.version,
            signers.join(", ")
        ),
        Some(report_id),
    )
    .await;
    core.inform_plugins().await;
    if policy.watches() && !policy.time.is_zero() {
        spawn_timer(core, family.to_string(), probation);
    }
}

/// The plugin's bytes, through the cache (digest and size checked).
async fn download(core: &Core, notice: &Notice) -> Result<Vec<u8>, (Step, String)> {
    let digest = Digest::from_sign(notice.sign_method.wire_name(), &notice.sign)
        .map_err(|e| (Step::VerifyFailed, e.to_string()))?;
    let url = notice
        .url()
        .ok_or((Step::DownloadFailed, "the notice has no http(s) url".into()))?;
    let req = FetchRequest {
        url: url.to_string(),
        size: notice.size,
        digest,
    };
    let img = core.cache.fetch(req, |_, _| {}).await.map_err(|e| {
        let step = Step::from_code(e.step_code().into()).unwrap_or(Step::DownloadFailed);
        (step, e.to_string())
    })?;
    let size = usize::try_from(img.size()).map_err(|_| (Step::DownloadFailed, "too big".into()))?;
    img.read_at(0, size).map_err(|e| {
        (
            Step::DownloadFailed,
            format!("reading the cached plugin: {e}"),
        )
    })
}

/// A job of `family` ended; `sha256` is the plugin it ran on, `fault` the
/// plugin's own failure in it, if any.
pub(super) async fn job_ended(core: &Arc<Core>, family: &str, sha256: &str, fault: Option<&str>) {
    if observe(&core.updates, family, sha256, fault) {
        roll_back(core, family).await;
    }
}

/// Count a job in the family's probation; true when it must roll back now.
fn observe(updates: &PluginUpdates, family: &str, sha256: &str, fault: Option<&str>) -> bool {
    let policy = updates.policy;
    let mut ledger = updates.ledger_guard();
    let Some(record) = ledger.families.get_mut(family) else {
        return false;
    };
    let Some(update) = record.update.as_mut() else {
        return false;
    };
    let Phase::Probation(p) = &mut update.phase else {
        return false;
    };
    if p.sha256 != sha256 {
        return false; // a job that started on the previous version
    }
    let verdict = p.observe(fault, &policy);
    let failed = match verdict {
        Verdict::Continue => false,
        Verdict::Passed => {
            pass(family, record);
            false
        }
        Verdict::Failed(reason) => {
            let probation = p.clone();
            update.phase = Phase::RollingBack { probation, reason };
            true
        }
    };
    updates.save(&ledger);
    failed
}

/// Probation passed: the floor rises to its security version.
fn pass(family: &str, record: &mut crate::plugin::ledger::FamilyRecord) {
    let Some(Update {
        phase: Phase::Probation(p),
        ..
    }) = record.update.take()
    else {
        return;
    };
    record.floor = record.floor.max(p.security_version);
    tracing::info!(
        module = %format!("{MODULE_PREFIX}{family}"), version = %p.version,
        jobs = p.jobs, faults = p.faults, floor = record.floor,
        "plugin passed probation: the family's security floor is now {}", record.floor
    );
}

/// End `family`'s probation by time, unless something ended it before.
fn spawn_timer(core: &Arc<Core>, family: String, p: Probation) {
    let tasks = core.tasks.clone();
    let core = core.clone();
    let task = async move {
        let policy = core.updates.policy;
        let end = p.since_ms.saturating_add(policy.time.as_millis() as u64);
        let wait = Duration::from_millis(end.saturating_sub(core.table.now_ms()));
        tokio::select! {
            _ = core.shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
        let mut ledger = core.updates.ledger_guard();
        let now = core.table.now_ms();
        let Some(record) = ledger.families.get_mut(&family) else {
            return;
        };
        let current = matches!(&record.update, Some(Update { phase: Phase::Probation(q), .. })
            if q.sha256 == p.sha256 && q.expired(now, &policy));
        if current {
            pass(&family, record);
            core.updates.save(&ledger);
        }
    };
    tasks.spawn(task);
}

/// Put the previous version of `family` back (the ledger says RollingBack),
/// keep the failed one out, and tell the platform why.
async fn roll_back(core: &Arc<Core>, family: &str) {
    let (p, reason, report_id, module) = {
        let mut ledger = core.updates.ledger_guard();
        match &ledger.family(family).update {
            Some(Update {
                phase: Phase::RollingBack { probation, reason },
                report_id,
                notice,
                ..
            }) => (
                probation.clone(),
                reason.clone(),
                *report_id,
                notice.module.clone(),
            ),
            _ => return,
        }
    };
    let gw = core.gw.clone();
    // The file: done already if a restart finds another one there.
    if file_sha256(&p.path).as_deref() == Some(p.sha256.as_str()) {
        let restored = crate::plugin::install::roll_back(&p.path);
        match restored {
            Ok(true) => {}
            Ok(false) => {
                if let Err(e) = std::fs::remove_file(&p.path) {
                    tracing::error!(path = %p.path.display(), "cannot remove the failed plugin: {e}");
                }
            }
            Err(e) => {
                tracing::error!(path = %p.path.display(), "cannot restore the previous plugin: {e}")
            }
        }
    }
    // Fault injection: the gateway dies with the previous file back and the
    // ledger still saying RollingBack (`FAILPOINTS=plugin-restored=return`).
    #[cfg(feature = "failpoints")]
    fail::fail_point!("plugin-restored", |_| std::process::abort());
    // The service: new jobs get the previous version (running ones finish).
    core.plugins.unregister_path(&p.path, None);
    if p.path.exists() {
        match core.plugins.load_file(&p.path).await {
            Ok(back) => {
                tracing::info!(family, version = %back.info.version, "previous plugin back in service")
            }
            Err(e) => tracing::error!(family, "the previous plugin does not load again: {e}"),
        }
    }
    {
        let mut ledger = core.updates.ledger_guard();
        let now = core.table.now_ms();
        let record = ledger.family(family);
        record.blocked.retain(|b| b.version != p.version);
        record.blocked.push(Blocked {
            version: p.version.clone(),
            sha256: p.sha256.clone(),
            reason: reason.clone(),
            at_ms: now,
        });
        record.update = None;
        core.updates.save(&ledger);
    }
    tracing::error!(device = %gw, %module, version = %p.version, "plugin update rolled back: {reason}");
    report(
        core,
        &module,
        Step::FlashFailed,
        reason,
        Some(report_id.wrapping_add(1)),
    )
    .await;
    core.inform_plugins().await;
}

/// At start: finish what the ledger says was under way.
pub(super) async fn resume(core: &Arc<Core>) {
    let (run, back) = triage(core);
    for family in run {
        tracing::info!(family, "resuming a plugin update interrupted by a restart");
        spawn_update(core, family);
    }
    for family in back {
        tracing::info!(
            family,
            "finishing a plugin rollback interrupted by a restart"
        );
        roll_back(core, &family).await;
    }
}

/// The families whose update runs again and those whose rollback
/// finishes; probations go on (or end, by time or a file replaced by hand).
fn triage(core: &Arc<Core>) -> (Vec<String>, Vec<String>) {
    let policy = core.updates.policy;
    let mut ledger = core.updates.ledger_guard();
    let now = core.table.now_ms();
    let mut run = Vec::new();
    let mut back = Vec::new();
    let mut changed = false;
    for (family, record) in ledger.families.iter_mut() {
        match record.update.as_ref().map(|u| &u.phase) {
            None => {}
            Some(Phase::Received) => run.push(family.clone()),
            Some(Phase::RollingBack { .. }) => back.push(family.clone()),
            Some(Phase::Probation(p)) => {
                if file_sha256(&p.path).as_deref() != Some(p.sha256.as_str()) {
                    tracing::warn!(family, version = %p.version, "the plugin on probation was replaced by hand: its probation ends unjudged");
                    record.update = None;
                    changed = true;
                } else if p.expired(now, &policy) {
                    pass(family, record);
                    changed = true;
                } else if !policy.time.is_zero() {
                    spawn_timer(core, family.clone(), p.clone());
                }
            }
        }
    }
    if changed {
        core.updates.save(&ledger);
    }
    (run, back)
}

#[cfg(test)]
mod tests {
    use super::family_of;

    #[test]
    fn only_plugin_modules_name_a_family() {
        assert_eq!(family_of("plugin.xmodem"), Some("xmodem"));
        assert_eq!(family_of("plugin.acme-boot"), Some("acme-boot"));
        assert_eq!(family_of("plugin."), None);
        assert_eq!(family_of("default"), None);
        assert_eq!(family_of("plugin.../../etc"), None);
        assert_eq!(family_of("plugin.a b"), None);
    }
}
