//! The otagw demo. Starts, as real processes on this machine:
//! - three simulated leaves (`leaf-sim`, XMODEM bootloaders behind
//!   pseudo-terminals, running firmware 1.0.0, on a 921600 baud line);
//! - a standalone gateway (`otagw run`): its embedded MQTT broker is the
//!   upstream, so this program plays the cloud;
//! - an HTTP server with firmware 2.0.0.
//!
//! Then it pushes an upgrade notice for every leaf, shows the progress the
//! gateway reports and prints `otagw status`. Second, it rolls 2.1.0 out from
//! the gateway itself, as an operator would (`otagw upgrade --canary 1
//! --follow`: one leaf first, the others once it succeeded). It exits 0 only
//! when every leaf reports 2.0.0 on `inform` and then runs 2.1.0. Run it
//! through `examples/demo.sh`, which builds what it needs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use md5::{Digest, Md5};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

const LEAVES: [&str; 3] = ["press-01", "press-02", "conveyor-01"];
const PK: &str = "a1LeafPK";
const VERSION: &str = "2.0.0";
/// What the rollout of the second act installs.
const ROLLOUT: &str = "2.1.0";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let bin = std::env::current_exe()?
        .parent()
        .context("where the demo binary is")?
        .to_path_buf();
    let plugin = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .context("usage: otagw-demo PATH/TO/otagw_plugin_xmodem.wasm")?;
    let work = tempfile::tempdir()?;
    let plugins = work.path().join("plugins");
    std::fs::create_dir_all(&plugins)?;
    std::fs::copy(&plugin, plugins.join("xmodem.wasm")).context("copy the xmodem plugin")?;

    // Leaves.
    let mut children = Vec::new();
    let mut ptys = Vec::new();
    for _ in LEAVES {
        let mut c = Command::new(bin.join("leaf-sim"));
        c.env("RUST_LOG", "warn")
            .args(["xmodem", "--pty", "--version", "1.0.0", "--baud", "921600"])
            .args([
                "--enter-command",
                "update\\r",
                "--version-command",
                "version\\r",
            ]);
        let (child, line) = spawn_and_read(c, "pty: ").await?;
        children.push(child);
        ptys.push(line);
    }

    // Firmware over HTTP.
    let image = firmware(256 * 1024, VERSION);
    let md5 = hex::encode(Md5::digest(&image));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let http = listener.local_addr()?;
    let served = image.clone();
    tokio::spawn(async move {
        let app = axum::Router::new().route(
            "/fw-2.0.0.bin",
            axum::routing::get(move || {
                let body = served.clone();
                async move { body }
            }),
        );
        let _ = axum::serve(listener, app).await;
    });
    let url = format!("http://{http}/fw-2.0.0.bin");

    // The gateway.
    let config = work.path().join("otagw.toml");
    std::fs::write(&config, gateway_config(work.path(), &plugins, &ptys))?;
    let mut c = Command::new(bin.join("otagw"));
    c.arg("run").arg("--config").arg(&config);
    let (gw, lines) = spawn_lines(c).await?;
    children.push(gw);
    let broker = wait_line(&lines, "broker: ").await?;
    let api = wait_line(&lines, "api: ").await?;
    println!("gateway: broker on {broker}, status API and dashboard on http://{api}/");

    // Play the cloud: watch everything, push one notice per leaf.
    let (host, port) = broker.rsplit_once(':').context("broker address")?;
    let mut opts = MqttOptions::new("demo-cloud", host, port.parse()?);
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(opts, 64);
    client.subscribe("/ota/device/#", QoS::AtLeastOnce).await?;
    let multi = MultiProgress::new();
    let style = ProgressStyle::with_template("{prefix:>12} [{bar:40}] {pos:>3}% {msg}")?
        .progress_chars("=> ");
    let mut bars = BTreeMap::new();
    for name in LEAVES {
        let b = multi.add(
            ProgressBar::new(100)
                .with_style(style.clone())
                .with_prefix(name),
        );
        b.set_message("waiting for the notice");
        bars.insert(name.to_string(), b);
    }
    // Bars on a terminal, plain lines in a log.
    let tty = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let mut sent = false;
    let mut upgraded = BTreeMap::new();
    let outcome = tokio::time::timeout(Duration::from_secs(180), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::SubAck(_))) if !sent => {
                    for (i, name) in LEAVES.iter().enumerate() {
                        let notice = serde_json::json!({
                            "code": "1000", "message": "success", "id": 1000 + i,
                            "data": {"size": image.len(), "version": VERSION, "url": url,
                                     "md5": md5, "sign": md5, "signMethod": "Md5"}
                        });
                        client
                            .publish(
                                format!("/ota/device/upgrade/{PK}/{name}"),
                                QoS::AtLeastOnce,
                                false,
                                notice.to_string(),
                            )
                            .await?;
                    }
                    sent = true;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let v: serde_json::Value =
                        serde_json::from_slice(&p.payload).unwrap_or_default();
                    let name = p.topic.rsplit('/').next().unwrap_or_default().to_string();
                    let Some(bar) = bars.get(&name) else { continue };
                    if p.topic.starts_with("/ota/device/progress/") {
                        let step: i64 = v["params"]["step"]
                            .as_str()
                            .and_then(|s| s.parse().ok())
                            .unwrap_or(0);
                        let desc = v["params"]["desc"].as_str().unwrap_or_default();
                        if !tty {
                            println!("{name:>12}: step {step:>3} {desc}");
                        }
                        if step >= 0 {
                            bar.set_position(step as u64);
                            bar.set_message(desc.to_string());
                        } else {
                            bar.abandon_with_message(format!("FAILED ({step}): {desc}"));
                            upgraded.insert(name, false);
                        }
                    } else if p.topic.starts_with("/ota/device/inform/") && sent {
                        let version = v["params"]["version"].as_str().unwrap_or_default();
                        if version == VERSION {
                            bar.finish_with_message(format!("now runs {version}"));
                            upgraded.insert(name, true);
                        }
                    }
                    if upgraded.len() == LEAVES.len() {
                        return anyhow::Ok(());
                    }
                }
                Ok(_) => {}
                Err(e) => bail!("lost the broker: {e}"),
            }
        }
    })
    .await;
    let status = Command::new(bin.join("otagw"))
        .args(["status", "--api", &format!("http://{api}")])
        .status()
        .await;
    let first = match outcome {
        Err(_) => Err(anyhow::anyhow!(
            "not every leaf reported {VERSION} within 180 s"
        )),
        Ok(Err(e)) => Err(e),
        Ok(Ok(())) if upgraded.values().all(|ok| *ok) => status
            .map(|_| println!("OK: every leaf runs {VERSION}"))
            .map_err(Into::into),
        Ok(Ok(())) => Err(anyhow::anyhow!("some leaves failed")),
    };
    let result = match first {
        Ok(()) => rollout(&bin, &api, work.path()).await,
        Err(e) => Err(e),
    };
    for mut c in children {
        let _ = c.kill().await;
    }
    result
}

/// The second act: the operator rolls 2.1.0 out from the gateway itself, a
/// canary first, following it to the end.
async fn rollout(bin: &Path, api: &str, work: &Path) -> anyhow::Result<()> {
    println!("\n== rolling {ROLLOUT} out from the gateway: one canary leaf first, then the rest");
    let file = work.join(format!("fw-{ROLLOUT}.bin"));
    std::fs::write(&file, firmware(64 * 1024, ROLLOUT))?;
    let api = format!("http://{api}");
    let token = work.join("data").join("api-token");
    let args = [
        "upgrade".as_ref(),
        "--api".as_ref(),
        api.as_ref(),
        "--token-file".as_ref(),
        token.as_os_str(),
        "--image".as_ref(),
        file.as_os_str(),
        "--version".as_ref(),
        ROLLOUT.as_ref(),
        "--canary".as_ref(),
        "1".as_ref(),
        "--follow".as_ref(),
    ];
    println!(
        "$ otagw {}",
        args.iter()
            .map(|a| a.to_string_lossy())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let done = tokio::time::timeout(
        Duration::from_secs(180),
        Command::new(bin.join("otagw")).args(args).status(),
    )
    .await
    .context("the rollout did not end within 180 s")??;
    if !done.success() {
        bail!("the rollout of {ROLLOUT} did not succeed on every leaf ({done})");
    }
    println!("OK: every leaf runs {ROLLOUT}");
    Ok(())
}

/// A firmware image that tells the simulated leaf its version when it boots.
fn firmware(size: usize, version: &str) -> Vec<u8> {
    let mut x: u32 = 0x2545_f491;
    let mut img: Vec<u8> = (0..size)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect();
    let marker = format!("FWVER:{version}\0");
    img[64..64 + marker.len()].copy_from_slice(marker.as_bytes());
    img
}

fn gateway_config(data: &Path, plugins: &Path, ptys: &[String]) -> String {
    let mut c = format!(
        "[gateway]\nproduct_key = \"a1GwPK\"\ndevice_name = \"gw-demo\"\ndata_dir = {:?}\nplugins_dir = {:?}\n\n\
         [local_broker]\nlisten = \"127.0.0.1:0\"\n\n[api]\nlisten = \"127.0.0.1:0\"\n\n",
        data.join("data").display().to_string(),
        plugins.display().to_string()
    );
    for (name, pty) in LEAVES.iter().zip(ptys) {
        c.push_str(&format!(
            "[[device]]\nproduct_key = \"{PK}\"\ndevice_name = \"{name}\"\nfamily = \"xmodem\"\n\
             link = \"serial://{pty}?baud=921600\"\nversion = \"1.0.0\"\n\
             options = {{ enter_command = \"update\\r\", version_command = \"version\\r\" }}\n\n"
        ));
    }
    c
}

/// Spawn a program and return its first stdout line starting with `prefix` (the rest of it).
async fn spawn_and_read(cmd: Command, prefix: &str) -> anyhow::Result<(Child, String)> {
    let (child, lines) = spawn_lines(cmd).await?;
    let line = wait_line(&lines, prefix).await?;
    Ok((child, line))
}

type Lines = tokio::sync::Mutex<tokio::sync::mpsc::Receiver<String>>;

async fn spawn_lines(mut cmd: Command) -> anyhow::Result<(Child, Lines)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("start {:?}", cmd.as_std().get_program()))?;
    let mut out = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        while let Ok(Some(l)) = out.next_line().await {
            let _ = tx.send(l).await;
        }
    });
    Ok((child, tokio::sync::Mutex::new(rx)))
}

async fn wait_line(lines: &Lines, prefix: &str) -> anyhow::Result<String> {
    let mut rx = lines.lock().await;
    tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(l) = rx.recv().await {
            if let Some(rest) = l.strip_prefix(prefix) {
                return Ok(rest.trim().to_string());
            }
        }
        bail!("the program exited before printing {prefix:?}")
    })
    .await
    .with_context(|| format!("waiting for {prefix:?}"))?
}
