//! `otagw status`: the local API's device view as a table.

use std::process::ExitCode;

use anyhow::Context;
use clap::Args;

use crate::api::DeviceStatus;

#[derive(Debug, Args)]
pub struct StatusArgs {
    /// The gateway's local API: what `otagw run` prints as `api: ADDR`
    /// (`http://` may be left out).
    #[arg(long, env = "OTAGW_API", default_value = "http://127.0.0.1:8080")]
    pub api: String,
    /// Print the device list as JSON (the API's `/api/devices`).
    #[arg(long)]
    pub json: bool,
    /// The CA certificate (PEM) of an API served over HTTPS with a
    /// certificate of its own ([api] tls_cert).
    #[arg(long, env = "OTAGW_API_CA")]
    pub ca_file: Option<std::path::PathBuf>,
}

/// The API's base URL from what the operator typed.
fn base_url(api: &str) -> String {
    let api = api.trim_end_matches('/');
    if api.contains("://") {
        api.to_string()
    } else {
        format!("http://{api}")
    }
}

/// Exit status 1 when any device's last job failed.
pub async fn run(a: StatusArgs) -> anyhow::Result<ExitCode> {
    let http = super::campaign::http_client(a.ca_file.as_deref())?;
    let url = format!("{}/api/devices", base_url(&a.api));
    let answer = http.get(&url).send().await.map_err(|e| {
        let why = if e.is_connect() {
            "nothing answers there".to_string()
        } else if e.is_builder() {
            "not a URL".to_string()
        } else {
            e.to_string()
        };
        super::Unavailable(format!(
            "cannot reach the gateway at {url} ({why}): is `otagw run` running? Its API \
             address is the `api:` line it prints at start ([api] listen); pass it with --api"
        ))
    })?;
    let devices: Vec<DeviceStatus> = answer
        .error_for_status()
        .map_err(|e| super::Unavailable(format!("{url}: {e}")))?
        .json()
        .await
        .with_context(|| format!("{url} did not answer with a device list"))?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&devices)?);
    } else {
        print!("{}", table(&devices));
    }
    Ok(if devices.iter().any(|d| d.state == "failed") {
        ExitCode::from(super::exit::FAILED)
    } else {
        ExitCode::SUCCESS
    })
}

/// Render devices as an aligned text table.
pub fn table(devices: &[DeviceStatus]) -> String {
    let header = [
        "DEVICE",
        "MODULE",
        "FAMILY",
        "VERSION",
        "STATE",
        "PROGRESS",
        "TARGET",
        "PLATFORM",
        "LAST ERROR",
    ];
    let rows: Vec<[String; 9]> = devices
        .iter()
        .map(|d| {
            [
                format!("{}/{}", d.product_key, d.device_name),
                d.module.clone(),
                d.family.clone(),
                d.version.clone(),
                d.state.clone(),
                d.progress
                    .map(|p| format!("{p}%"))
                    .unwrap_or_else(|| "-".into()),
                d.target_version.clone().unwrap_or_else(|| "-".into()),
                d.platform.as_ref().map_or_else(
                    || "-".into(),
                    |p| {
                        let s = p.state.as_str().to_owned();
                        if p.parked { format!("{s} (parked)") } else { s }
                    },
                ),
                // The job's error first; else why the platform has it offline.
                d.last_error
                    .clone()
                    .or_else(|| {
                        d.platform
                            .as_ref()
                            .filter(|p| p.state != crate::api::PlatformState::Online)
                            .and_then(|p| p.last_error.clone())
                    })
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    super::aligned(&header, &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_an_aligned_table() {
        let d = DeviceStatus {
            product_key: "pk".into(),
            device_name: "leaf-1".into(),
            device: "pk/leaf-1".into(),
            module: "default".into(),
            family: "xmodem".into(),
            link: "serial:///dev/pts/3".into(),
            version: "1.0.0".into(),
            state: "failed".into(),
            progress: Some(40),
            target_version: Some("2.0.0".into()),
            last_error: Some("device timeout".into()),
            last_job_ms: None,
            platform: None,
            model: None,
            bus: "serial:/dev/pts/3".into(),
            tags: vec![],
        };
        let t = table(&[d]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2);
        assert!(lines[0].starts_with("DEVICE"));
        assert!(lines[1].starts_with("pk/leaf-1"));
        assert!(lines[1].contains("40%") && lines[1].ends_with("device timeout"));
        assert_eq!(
            lines[0].find("STATE"),
            lines[1].find("failed"),
            "columns align"
        );
        assert!(
            lines[1].contains(" - "),
            "no platform state outside aliyun mode"
        );
    }

    #[test]
    fn shows_the_platform_state_and_why_a_leaf_is_offline() {
        let d = DeviceStatus {
            product_key: "pk".into(),
            device_name: "leaf-2".into(),
            device: "pk/leaf-2".into(),
            module: "default".into(),
            family: "xmodem".into(),
            link: "serial:///dev/pts/3".into(),
            version: "1.0.0".into(),
            state: "idle".into(),
            progress: None,
            target_version: None,
            last_error: None,
            last_job_ms: None,
            platform: Some(crate::api::DevicePlatform {
                state: crate::api::PlatformState::InTopology,
                last_error: Some("batch_login refused: 6287 invalid sign".into()),
                parked: true,
                held: 2,
            }),
            model: None,
            bus: "serial:/dev/pts/3".into(),
            tags: vec![],
        };
        let t = table(&[d]);
        let row = t.lines().nth(1).unwrap();
        assert!(row.contains("in topology, offline (parked)"), "{row}");
        assert!(
            row.ends_with("batch_login refused: 6287 invalid sign"),
            "{row}"
        );
        assert!(t.lines().next().unwrap().contains("PLATFORM"));
    }
}
