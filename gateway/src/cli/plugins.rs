//! `otagw plugins`: what the plugins directory holds (each family's version,
//! contract, transports and device options with their defaults and docs), and
//! why broken plugins are skipped. `--family NAME` shows one family, `--json`
//! prints the same as one JSON document. Exit status 1 when any plugin is
//! broken, 64 when `--family` names none that loaded.

use std::process::ExitCode;

use clap::Args;
use serde_json::json;

use super::PluginArgs;
use crate::plugin::schema::{self, OptionSpec};
use crate::plugin::{LoadedPlugin, PluginError};

#[derive(Debug, Args)]
pub struct PluginsArgs {
    #[command(flatten)]
    pub plugins: PluginArgs,
    /// Show only this device family (e.g. `smp`).
    #[arg(long)]
    pub family: Option<String>,
    /// Print JSON instead of text (for scripts and the API's consumers).
    #[arg(long)]
    pub json: bool,
}

pub async fn run(a: PluginsArgs) -> anyhow::Result<ExitCode> {
    let host =
        crate::plugin::PluginHost::new(a.plugins.limits()?, Some(a.plugins.cache_dir.clone()))?;
    let report = host.load_dir(&a.plugins.plugins_dir).await?;
    let loaded: Vec<&LoadedPlugin> = report
        .loaded
        .iter()
        .map(AsRef::as_ref)
        .filter(|p| a.family.as_ref().is_none_or(|f| *f == p.info.name))
        .collect();
    if let Some(family) = &a.family
        && loaded.is_empty()
    {
        let known: Vec<&str> = report.loaded.iter().map(|p| p.info.name.as_str()).collect();
        eprintln!(
            "error: no plugin in {} is for family {family:?} (loaded: {}); \
             copy its .wasm there, or see `otagw plugins` for what is broken",
            a.plugins.plugins_dir.display(),
            if known.is_empty() {
                "none".to_string()
            } else {
                known.join(", ")
            }
        );
        return Ok(ExitCode::from(64));
    }
    if a.json {
        let doc = json!({
            "plugins": loaded.iter().map(|p| plugin_json(p)).collect::<Vec<_>>(),
            "broken": report.failed.iter().map(broken_json).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        let dir = a.plugins.plugins_dir.display();
        if report.loaded.is_empty() && report.failed.is_empty() {
            eprintln!(
                "error: no plugins in {dir}: copy the device families' .wasm files there \
                 (`otagw plugin new` writes a new family)"
            );
            return Ok(ExitCode::from(super::exit::FAILED));
        }
        println!(
            "{dir}: {} plugin{} loaded{}\n",
            report.loaded.len(),
            if report.loaded.len() == 1 { "" } else { "s" },
            if report.failed.is_empty() {
                String::new()
            } else {
                format!(", {} broken (listed last)", report.failed.len())
            }
        );
        for (i, p) in loaded.iter().enumerate() {
            if i > 0 {
                println!();
            }
            print!("{}", plugin_text(p));
        }
        for e in &report.failed {
            println!("\nbroken: {e}");
        }
    }
    Ok(if report.failed.is_empty() && !report.loaded.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::exit::FAILED)
    })
}

fn transports(p: &LoadedPlugin) -> Vec<String> {
    p.transport_names()
}

/// One family as text: a header line, then its options, one per line.
fn plugin_text(p: &LoadedPlugin) -> String {
    let i = &p.info;
    let mut out = format!(
        "{} {}  (contract {}, {})\n  {}\n  transports: {}\n  file: {} ({}, {:.1} ms)\n",
        i.name,
        i.version,
        i.contract_claimed,
        i.contract,
        i.description,
        transports(p).join(", "),
        p.path.display(),
        format!("{:?}", p.loaded_from).to_lowercase(),
        p.load_time.as_secs_f64() * 1e3,
    );
    match &i.options {
        None => out
            .push_str("  options: not declared (contract 0.1): the plugin reads them as written\n"),
        Some(specs) if specs.is_empty() => out.push_str("  options: none\n"),
        Some(specs) => {
            out.push_str("  options:\n");
            let width = specs.iter().map(|s| s.name.len()).max().unwrap_or(0);
            for s in specs {
                out.push_str(&format!(
                    "    {:<width$}  {}{}\n",
                    s.name,
                    option_summary(s),
                    if s.doc.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", s.doc)
                    }
                ));
            }
        }
    }
    out
}

/// "a whole number from 0 to 1000, default 10" / "..., required".
fn option_summary(s: &OptionSpec) -> String {
    let mut text = s.kind.describe();
    match &s.default {
        Some(v) => text.push_str(&format!(", default {}", schema::shown(s, v))),
        None if s.required => text.push_str(", required"),
        None => text.push_str(", not set by default"),
    }
    if s.secret {
        text.push_str(", secret");
    }
    text
}

fn plugin_json(p: &LoadedPlugin) -> serde_json::Value {
    let i = &p.info;
    json!({
        "family": i.name,
        "version": i.version,
        "contract": i.contract_claimed,
        "description": i.description,
        "transports": transports(p),
        "path": p.path.display().to_string(),
        "sha256": p.sha256,
        "options": i.options_json(),
    })
}

fn broken_json(e: &PluginError) -> serde_json::Value {
    json!({ "error": e.to_string() })
}
