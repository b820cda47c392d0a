//! `leaf-sim`: runs one simulated leaf device on a pty or a TCP port until SIGINT/SIGTERM.
//!
//! Only argument parsing and the run loop live here; the device is in the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use otagw_leaf_sim::smp::{ResetCause, Swap};
use otagw_leaf_sim::{
    EraseCommand, Faults, Mode, Protocol, PtySim, SimHandle, SmpEvent, SmpFaults, SmpFraming,
    SmpHandle, SmpSimConfig, Stm32Event, Stm32Faults, Stm32Handle, Stm32SimConfig, TcpSim,
    XmodemSimConfig,
};
use tokio::signal::unix::{SignalKind, signal};

#[derive(Parser, Debug)]
#[command(name = "leaf-sim", about = "Simulated leaf devices for otagw")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// The device side of XMODEM / XMODEM-1K / YMODEM.
    Xmodem(XmodemArgs),
    /// An MCUmgr SMP device (serial transport, or raw SMP packets with --raw-tcp) with
    /// MCUboot behind it.
    Smp(SmpArgs),
    /// An STM32 ROM bootloader (AN3155 UART protocol), 8N1 on a pty (no parity there).
    Stm32(Stm32Args),
}

#[derive(clap::Args, Debug)]
struct Stm32Args {
    /// Serve on a new pseudo-terminal (prints `pty: /dev/pts/N`).
    #[arg(long, conflicts_with = "tcp", required_unless_present = "tcp")]
    pty: bool,
    /// Serve on a TCP address (prints `tcp: ADDR`), e.g. 127.0.0.1:0.
    #[arg(long)]
    tcp: Option<String>,
    /// Product ID answered by GET ID (decimal or 0x hex).
    #[arg(long, default_value = "0x410", value_parser = parse_u16)]
    pid: u16,
    /// Bootloader version answered by GET (0x22 = 2.2).
    #[arg(long, default_value = "0x22", value_parser = parse_u8)]
    bootloader_version: u8,
    /// Flash size in KiB.
    #[arg(long, default_value_t = 128)]
    flash_kib: usize,
    /// Flash page size in bytes.
    #[arg(long, default_value_t = 2048)]
    page_size: usize,
    /// Implement EXTENDED ERASE (0x44) instead of ERASE (0x43).
    #[arg(long)]
    extended_erase: bool,
    /// Two flash banks (bank erase codes of EXTENDED ERASE).
    #[arg(long)]
    dual_bank: bool,
    /// Milliseconds to erase one page.
    #[arg(long, default_value_t = 1)]
    erase_ms: u64,
    /// Simulated line rate (bits per second, 11 bits a byte as at 8E1).
    #[arg(long)]
    baud: Option<u32>,
    /// A fault: nack-write=K, silent=K, corrupt-read=K (repeatable).
    #[arg(long = "fault")]
    faults: Vec<String>,
    /// Write the flash contents here whenever GO runs the application.
    #[arg(long)]
    out: Option<PathBuf>,
}

fn parse_u32(s: &str) -> Result<u32, String> {
    let r = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) => u32::from_str_radix(hex, 16),
        None => s.parse(),
    };
    r.map_err(|e| format!("`{s}`: {e}"))
}

fn parse_u16(s: &str) -> Result<u16, String> {
    u16::try_from(parse_u32(s)?).map_err(|e| format!("`{s}`: {e}"))
}

fn parse_u8(s: &str) -> Result<u8, String> {
    u8::try_from(parse_u32(s)?).map_err(|e| format!("`{s}`: {e}"))
}

#[derive(clap::Args, Debug)]
struct SmpArgs {
    /// Serve on a new pseudo-terminal (prints `pty: /dev/pts/N`).
    #[arg(
        long,
        conflicts_with_all = ["tcp", "raw_tcp"],
        required_unless_present_any = ["tcp", "raw_tcp"]
    )]
    pty: bool,
    /// Serve on a TCP address (prints `tcp: ADDR`), e.g. 127.0.0.1:0.
    #[arg(long, conflicts_with = "raw_tcp")]
    tcp: Option<String>,
    /// Serve RAW SMP packets (header + CBOR, no console framing: the Bluetooth LE form) on a
    /// TCP address (prints `raw-tcp: ADDR`), one session per connection. Packets are
    /// reassembled by the header's length; a device reset closes the connection once the
    /// answer is written, and the next connection is accepted when the device has booted.
    #[arg(long, value_name = "ADDR")]
    raw_tcp: Option<String>,
    /// Print every device event as one JSON object per line on stdout (after the address line).
    #[arg(long)]
    json_events: bool,
    /// Write the slot-0 image here at start and after every boot (replaced atomically).
    #[arg(long, value_name = "PATH")]
    slot0_out: Option<PathBuf>,
    /// The version of the initial slot-0 image (MAJOR.MINOR.REVISION[+BUILD]).
    #[arg(long, default_value = "1.0.0")]
    version: String,
    /// The largest SMP packet the device takes (reported as buf_size).
    #[arg(long, default_value_t = 1024)]
    buf_size: usize,
    /// Milliseconds the device is silent after a reset.
    #[arg(long, default_value_t = 200)]
    boot_ms: u64,
    /// Keep a partial upload across resets (Zephyr does not).
    #[arg(long)]
    keep_upload: bool,
    /// Simulated line rate (bits per second, 8N1): each answer is written no sooner than
    /// the request and the answer take on such a wire.
    #[arg(long, conflicts_with = "raw_tcp")]
    baud: Option<u32>,
    /// A fault: drop-request=K, drop=K, garble=K, reset=K, refuse-upload, refuse-test,
    /// no-boot (repeatable).
    #[arg(long = "fault")]
    faults: Vec<String>,
}

#[derive(clap::Args, Debug)]
struct XmodemArgs {
    /// Serve on a new pseudo-terminal (prints `pty: /dev/pts/N`).
    #[arg(long, conflicts_with = "tcp", required_unless_present = "tcp")]
    pty: bool,
    /// Serve on a TCP address (prints `tcp: ADDR`), e.g. 127.0.0.1:0.
    #[arg(long)]
    tcp: Option<String>,
    #[arg(long, value_enum, default_value = "xmodem")]
    protocol: ProtocolArg,
    #[arg(long, value_enum, default_value = "crc")]
    mode: ModeArg,
    /// Bytes that enter the bootloader from application mode (escapes: \r \n \xNN \\).
    #[arg(long)]
    enter_command: Option<String>,
    /// The running firmware version.
    #[arg(long, default_value = "1.0.0")]
    version: String,
    /// Bytes that make the application answer its version (escapes as above).
    #[arg(long)]
    version_command: Option<String>,
    /// A fault: drop=K:N, corrupt=K, nak=K, stall=K, disconnect=K, cancel=K (repeatable).
    #[arg(long = "fault")]
    faults: Vec<String>,
    /// Milliseconds between start polls.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
    /// Milliseconds the receiver waits inside or for a block before NAKing.
    #[arg(long, default_value_t = 1000)]
    block_timeout_ms: u64,
    /// Write each received image here (overwritten by the next one).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Simulated line rate (bits per second, 8N1): blocks are acknowledged no
    /// faster than such a wire carries them.
    #[arg(long)]
    baud: Option<u32>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ProtocolArg {
    Xmodem,
    Ymodem,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum ModeArg {
    Crc,
    Crc128,
    Checksum,
}

/// Decodes `\r`, `\n`, `\t`, `\\`, `\0` and `\xNN` in a command-line byte string.
fn unescape(s: &str) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            let mut buf = [0; 4];
            out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
            continue;
        }
        match chars.next() {
            Some('r') => out.push(b'\r'),
            Some('n') => out.push(b'\n'),
            Some('t') => out.push(b'\t'),
            Some('0') => out.push(0),
            Some('\\') => out.push(b'\\'),
            Some('x') => {
                let hex: String = chars.by_ref().take(2).collect();
                let byte = u8::from_str_radix(&hex, 16)
                    .with_context(|| format!("bad \\x escape `\\x{hex}` in `{s}`"))?;
                out.push(byte);
            }
            other => anyhow::bail!("unknown escape `\\{}` in `{s}`", other.unwrap_or(' ')),
        }
    }
    Ok(out)
}

fn config(args: &XmodemArgs) -> anyhow::Result<XmodemSimConfig> {
    let mut faults = Faults::default();
    for spec in &args.faults {
        faults.add(spec)?;
    }
    Ok(XmodemSimConfig {
        protocol: match args.protocol {
            ProtocolArg::Xmodem => Protocol::Xmodem,
            ProtocolArg::Ymodem => Protocol::Ymodem,
        },
        mode: match args.mode {
            ModeArg::Crc => Mode::Crc,
            ModeArg::Crc128 => Mode::Crc128,
            ModeArg::Checksum => Mode::Checksum,
        },
        enter_command: args.enter_command.as_deref().map(unescape).transpose()?,
        version: args.version.clone(),
        version_command: args.version_command.as_deref().map(unescape).transpose()?,
        poll_interval: Duration::from_millis(args.poll_ms),
        block_timeout: Duration::from_millis(args.block_timeout_ms),
        faults,
        line_rate: args.baud,
        ..XmodemSimConfig::default()
    })
}

async fn run(args: XmodemArgs) -> anyhow::Result<()> {
    let cfg = config(&args)?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let (pty, tcp) = match &args.tcp {
        Some(addr) => {
            let sim = TcpSim::bind(addr.as_str(), cfg)
                .await
                .with_context(|| format!("binding {addr}"))?;
            println!("tcp: {}", sim.local_addr());
            (None, Some(sim))
        }
        None => {
            let sim = PtySim::spawn(cfg).context("opening a pty")?;
            println!("pty: {}", sim.path().display());
            (Some(sim), None)
        }
    };
    let handle: SimHandle = match (&pty, &tcp) {
        (Some(p), _) => p.handle().clone(),
        (_, Some(t)) => t.handle().clone(),
        _ => unreachable!("one transport is always set"),
    };
    serve_until_signal(&handle, pty.as_ref(), args.out.as_deref(), &mut sigterm).await?;
    if let Some(p) = pty {
        p.shutdown().await;
    }
    if let Some(t) = tcp {
        t.shutdown().await;
    }
    Ok(())
}

/// Logs (and writes) images until a signal arrives or the pty device dies.
async fn serve_until_signal(
    handle: &SimHandle,
    pty: Option<&PtySim>,
    out: Option<&std::path::Path>,
    sigterm: &mut tokio::signal::unix::Signal,
) -> anyhow::Result<()> {
    let dead = async {
        match pty {
            Some(p) => p.dead().await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(dead);
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => break,
            _ = sigterm.recv() => break,
            () = &mut dead => {
                tracing::warn!("the pty device stopped");
                break;
            }
            image = handle.next_image() => {
                tracing::info!(
                    bytes = image.data.len(), name = ?image.name, blocks = image.blocks,
                    naks = image.naks, version = %handle.version(), "image received"
                );
                if let Some(out) = out {
                    tokio::fs::write(out, &image.data)
                        .await
                        .with_context(|| format!("writing {}", out.display()))?;
                }
            }
            reason = handle.next_abort() => tracing::warn!(%reason, "transfer aborted"),
        }
    }
    Ok(())
}

fn smp_config(args: &SmpArgs) -> anyhow::Result<SmpSimConfig> {
    let mut faults = SmpFaults::default();
    for spec in &args.faults {
        faults.add(spec)?;
    }
    Ok(SmpSimConfig {
        version: args.version.clone(),
        buf_size: args.buf_size,
        boot_time: Duration::from_millis(args.boot_ms),
        keep_upload_across_reset: args.keep_upload,
        faults,
        line_rate: args.baud,
        framing: if args.raw_tcp.is_some() {
            SmpFraming::Raw
        } else {
            SmpFraming::Console
        },
        ..SmpSimConfig::default()
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// One device event as a JSON object (`--json-events`): `{"event": NAME, ...fields}`.
fn event_json(event: &SmpEvent) -> serde_json::Value {
    use serde_json::json;
    match event {
        SmpEvent::Request { op, group, id, seq } => {
            json!({"event": "request", "op": op, "group": group, "id": id, "seq": seq})
        }
        SmpEvent::Dropped { reason } => json!({"event": "dropped", "reason": reason}),
        SmpEvent::UploadStarted { len, sha } => {
            json!({"event": "upload_started", "len": len, "sha": sha.as_deref().map(hex)})
        }
        SmpEvent::UploadResumed { off } => json!({"event": "upload_resumed", "off": off}),
        SmpEvent::OffsetMismatch { got, expected } => {
            json!({"event": "offset_mismatch", "got": got, "expected": expected})
        }
        SmpEvent::UploadComplete { version, hash } => {
            json!({"event": "upload_complete", "version": version, "hash": hex(hash)})
        }
        SmpEvent::UploadRejected { reason } => {
            json!({"event": "upload_rejected", "reason": reason})
        }
        SmpEvent::TestMarked { hash } => json!({"event": "test_marked", "hash": hex(hash)}),
        SmpEvent::PermanentMarked { hash } => {
            json!({"event": "permanent_marked", "hash": hex(hash)})
        }
        SmpEvent::Confirmed { hash } => json!({"event": "confirmed", "hash": hex(hash)}),
        SmpEvent::Erased => json!({"event": "erased"}),
        SmpEvent::Fault(what) => json!({"event": "fault", "what": what}),
        SmpEvent::Reset { cause } => json!({
            "event": "reset",
            "cause": match cause {
                ResetCause::Command => "command",
                ResetCause::Fault => "fault",
            },
        }),
        SmpEvent::Booted(boot) => json!({
            "event": "booted",
            "version": boot.version,
            "hash": hex(&boot.hash),
            "confirmed": boot.confirmed,
            "swap": match boot.swap {
                Swap::None => "none",
                Swap::Test => "test",
                Swap::Permanent => "permanent",
                Swap::Revert => "revert",
                Swap::NoBoot => "no_boot",
            },
        }),
    }
}

/// Writes the running image to `path` through a temporary file, so that a reader never sees
/// half of it.
async fn write_slot0(handle: &SmpHandle, path: &std::path::Path) -> anyhow::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    tokio::fs::write(&tmp, handle.slot0().data)
        .await
        .with_context(|| format!("writing {}", PathBuf::from(&tmp).display()))?;
    tokio::fs::rename(&tmp, path)
        .await
        .with_context(|| format!("renaming onto {}", path.display()))
}

async fn run_smp(args: SmpArgs) -> anyhow::Result<()> {
    let cfg = smp_config(&args)?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let (pty, tcp, where_) = match (&args.tcp, &args.raw_tcp) {
        (Some(addr), _) | (_, Some(addr)) => {
            let sim = TcpSim::bind_smp(addr.as_str(), cfg)
                .await
                .with_context(|| format!("binding {addr}"))?;
            let label = if args.raw_tcp.is_some() {
                "raw-tcp"
            } else {
                "tcp"
            };
            let where_ = format!("{label}: {}", sim.local_addr());
            (None, Some(sim), where_)
        }
        (None, None) => {
            let sim = PtySim::spawn_smp(cfg).context("opening a pty")?;
            let where_ = format!("pty: {}", sim.path().display());
            (Some(sim), None, where_)
        }
    };
    let handle: SmpHandle = match (&pty, &tcp) {
        (Some(p), _) => p.handle().clone(),
        (_, Some(t)) => t.handle().clone(),
        _ => unreachable!("one transport is always set"),
    };
    // The slot-0 file exists once the address line is out.
    if let Some(path) = &args.slot0_out {
        write_slot0(&handle, path).await?;
    }
    println!("{where_}");
    {
        let dead = async {
            match &pty {
                Some(p) => p.dead().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(dead);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
                () = &mut dead => {
                    tracing::warn!("the pty device stopped");
                    break;
                }
                event = handle.next_event() => {
                    match event {
                        SmpEvent::Request { .. } => tracing::debug!(?event, "smp"),
                        _ => tracing::info!(?event, "smp"),
                    }
                    if let (SmpEvent::Booted(_), Some(path)) = (&event, &args.slot0_out) {
                        write_slot0(&handle, path).await?;
                    }
                    if args.json_events {
                        println!("{}", event_json(&event));
                    }
                }
            }
        }
    }
    if let Some(p) = pty {
        p.shutdown().await;
    }
    if let Some(t) = tcp {
        t.shutdown().await;
    }
    Ok(())
}

fn stm32_config(args: &Stm32Args) -> anyhow::Result<Stm32SimConfig> {
    let mut faults = Stm32Faults::default();
    for spec in &args.faults {
        faults.add(spec)?;
    }
    Ok(Stm32SimConfig {
        pid: args.pid,
        bootloader_version: args.bootloader_version,
        erase: if args.extended_erase {
            EraseCommand::Extended
        } else {
            EraseCommand::Standard
        },
        flash_size: args.flash_kib * 1024,
        page_size: args.page_size,
        dual_bank: args.dual_bank,
        erase_time: Duration::from_millis(args.erase_ms),
        line_rate: args.baud,
        faults,
        ..Stm32SimConfig::default()
    })
}

async fn run_stm32(args: Stm32Args) -> anyhow::Result<()> {
    let cfg = stm32_config(&args)?;
    let mut sigterm = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let (pty, tcp) = match &args.tcp {
        Some(addr) => {
            let sim = TcpSim::bind_stm32(addr.as_str(), cfg)
                .await
                .with_context(|| format!("binding {addr}"))?;
            println!("tcp: {}", sim.local_addr());
            (None, Some(sim))
        }
        None => {
            let sim = PtySim::spawn_stm32(cfg).context("opening a pty")?;
            println!("pty: {}", sim.path().display());
            (Some(sim), None)
        }
    };
    let handle: Stm32Handle = match (&pty, &tcp) {
        (Some(p), _) => p.handle().clone(),
        (_, Some(t)) => t.handle().clone(),
        _ => unreachable!("one transport is always set"),
    };
    {
        let dead = async {
            match &pty {
                Some(p) => p.dead().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(dead);
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => break,
                _ = sigterm.recv() => break,
                () = &mut dead => {
                    tracing::warn!("the pty device stopped");
                    break;
                }
                event = handle.next_event() => match event {
                    Stm32Event::Go { address } => {
                        tracing::info!(address = format_args!("0x{address:08x}"), counters = ?handle.counters(), "go");
                        if let Some(out) = &args.out {
                            tokio::fs::write(out, handle.flash())
                                .await
                                .with_context(|| format!("writing {}", out.display()))?;
                        }
                    }
                    Stm32Event::Command { .. } | Stm32Event::Read { .. } | Stm32Event::Written { .. } => {
                        tracing::debug!(?event, "stm32");
                    }
                    _ => tracing::info!(?event, "stm32"),
                },
            }
        }
    }
    if let Some(p) = pty {
        p.shutdown().await;
    }
    if let Some(t) = tcp {
        t.shutdown().await;
    }
    Ok(())
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Xmodem(args) => runtime.block_on(run(args)),
        Command::Smp(args) => runtime.block_on(run_smp(args)),
        Command::Stm32(args) => runtime.block_on(run_stm32(args)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(64)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_decodes_escapes() {
        assert_eq!(unescape(r"update\r").unwrap(), b"update\r");
        assert_eq!(unescape(r"a\x1bb\n\\").unwrap(), b"a\x1bb\n\\");
        assert!(unescape(r"\xZZ").is_err());
        assert!(unescape(r"\q").is_err());
    }

    #[test]
    fn numbers_take_hex() {
        assert_eq!(parse_u16("0x410"), Ok(0x410));
        assert_eq!(parse_u16("1040"), Ok(1040));
        assert!(parse_u8("0x100").is_err());
    }
}
