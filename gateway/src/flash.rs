//! One flashing job on one leaf: verify the image, open the link, flash, read
//! the version back. `otagw flash` runs exactly this, and so will the daemon.
//!
//! The image is verified before the link is opened, so a rejected image never
//! touches the device.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::link::Opener;
use crate::plugin::{
    DeviceInfo, FlashError, FlashReport, ImageInfo, ImageSource, JobMeta, PluginError, PluginHost,
};
use crate::progress::JobEvent;

/// What a successful job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FlashOutcome {
    pub image: ImageInfo,
    pub report: FlashReport,
    /// The version read back from the device; `None` when the family cannot
    /// read versions (`identify` answered unsupported) or reading it failed.
    pub device: Option<DeviceInfo>,
    /// Why reading the version back failed, after a flash the plugin
    /// reported as done: the image went in; only the read-back did not.
    pub read_back_error: Option<String>,
}

/// Run verify → flash → identify with `family`'s plugin on the device at
/// `link_url` (serial or TCP links; [`flash_with`] opens BLE links too).
pub async fn flash(
    host: &PluginHost,
    family: &str,
    link_url: &str,
    image: Arc<dyn ImageSource>,
    meta: &JobMeta,
    events: Option<mpsc::UnboundedSender<JobEvent>>,
) -> Result<FlashOutcome, PluginError> {
    flash_with(
        host,
        &Opener::default(),
        (family, link_url),
        image,
        meta,
        events,
        tokio_util::sync::CancellationToken::new(),
    )
    .await
}

/// [`flash`], opening the link with `opener`; cancelling `stop` stops the
/// link's reads so the plugin ends the transfer its protocol's way.
pub async fn flash_with(
    host: &PluginHost,
    opener: &Opener,
    (family, link_url): (&str, &str),
    image: Arc<dyn ImageSource>,
    meta: &JobMeta,
    events: Option<mpsc::UnboundedSender<JobEvent>>,
    stop: tokio_util::sync::CancellationToken,
) -> Result<FlashOutcome, PluginError> {
    let mut session = host.session(family, events).await?;
    let info = session.verify(image.clone(), meta).await?;
    let plan = session.plugin().info.gatt_plan();
    let mut link = opener.open(link_url, plan.as_ref()).await?;
    link.stop_on(stop);
    let (link, report) = session.flash(link, image, meta).await;
    let report = report?;
    let (_link, identified) = session.identify(link, &meta.options).await;
    let (device, read_back_error) = match identified {
        Ok(d) => (Some(d), None),
        Err(PluginError::Failed {
            error: FlashError::Unsupported(_),
            ..
        }) => (None, None),
        Err(e) => (None, Some(e.to_string())),
    };
    Ok(FlashOutcome {
        image: info,
        report,
        device,
        read_back_error,
    })
}

/// Read the running version of the device at `link_url`.
pub async fn identify(
    host: &PluginHost,
    family: &str,
    link_url: &str,
    options: &[(String, String)],
) -> Result<DeviceInfo, PluginError> {
    identify_with(host, &Opener::default(), family, link_url, options).await
}

/// [`identify`], opening the link with `opener`.
pub async fn identify_with(
    host: &PluginHost,
    opener: &Opener,
    family: &str,
    link_url: &str,
    options: &[(String, String)],
) -> Result<DeviceInfo, PluginError> {
    let mut session = host.session(family, None).await?;
    let plan = session.plugin().info.gatt_plan();
    let link = opener.open(link_url, plan.as_ref()).await?;
    let (_link, r) = session.identify(link, options).await;
    r
}
