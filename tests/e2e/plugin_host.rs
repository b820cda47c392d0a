//! The sandbox: hostile plugins fail their own job with a precise reason while
//! a real job runs to completion beside them; broken plugins are refused at
//! load time; the compile cache makes a second start cheap.

use std::time::Duration;

use otagw::plugin::{JobMeta, LoadedFrom, PluginError, PluginHost};
use otagw_e2e::*;

fn hostile_meta(mode: &str) -> JobMeta {
    JobMeta {
        version: Some("9.9.9".into()),
        module: "default".into(),
        options: opts(&[("hostile", mode), ("hostile_in", "verify")]),
    }
}

/// Run the hostile plugin in `mode` and, at the same time on the same host, a
/// 256 KiB XMODEM job to a simulated leaf. Returns the hostile job's error
/// after checking the good job delivered its image intact.
async fn hostile_beside_a_good_job(mode: &str, deadline: Option<Duration>) -> PluginError {
    hostile_beside_a_good_job_on(EngineKind::for_this_target(), mode, deadline).await
}

async fn hostile_beside_a_good_job_on(
    engine: EngineKind,
    mode: &str,
    deadline: Option<Duration>,
) -> PluginError {
    let dir = PluginsDir::with(&[artifacts::XMODEM, artifacts::HOSTILE]);
    let host = host_on(engine, &dir, None).await;
    let sim = PtySim::spawn(XmodemSimConfig::default()).expect("pty simulator");
    let img = image(256 * 1024, 11);

    let url = sim.url();
    let meta = JobMeta::default();
    let good = otagw::flash::flash(&host, "xmodem", &url, source(&img), &meta, None);
    let bad = async {
        let mut s = host
            .session("hostile", None)
            .await
            .expect("hostile session");
        if let Some(d) = deadline {
            s.set_deadline(d);
        }
        s.verify(source(b"firmware"), &hostile_meta(mode)).await
    };
    let (good, bad) = tokio::join!(good, bad);

    let outcome = good.expect("the good job beside the hostile one");
    assert!(outcome.report.bytes_sent >= img.len() as u64);
    let got = tokio::time::timeout(Duration::from_secs(10), sim.handle().next_image())
        .await
        .expect("the leaf received an image");
    assert_padded(&got.data, &img, 0x1a);

    // The host is still fine: a well-behaved session of the same plugin works.
    let mut again = host
        .session("hostile", None)
        .await
        .expect("host still serves");
    again
        .verify(source(b"firmware"), &hostile_meta("none"))
        .await
        .expect("a later job of the same plugin");
    sim.shutdown().await;
    bad.expect_err("the hostile job must fail")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn infinite_loop_is_stopped_by_the_cpu_limit() {
    let err = hostile_beside_a_good_job("loop", None).await;
    assert!(
        matches!(err, PluginError::Cpu { call: "verify", .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("plugin hostile") && msg.contains("CPU limit"),
        "{msg}"
    );
    assert_eq!(err.step_code(), -1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_bomb_is_stopped_by_the_memory_limit() {
    let err = hostile_beside_a_good_job("membomb", None).await;
    match &err {
        PluginError::Memory {
            plugin,
            wanted,
            limit,
            ..
        } => {
            assert_eq!(plugin, "hostile");
            assert_eq!(limit, "32 MiB");
            assert!(*wanted > 32 << 20, "{wanted}");
        }
        other => panic!("expected a memory limit, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trap_names_the_plugin_and_its_panic() {
    let err = hostile_beside_a_good_job("trap", None).await;
    assert!(
        matches!(err, PluginError::Trap { call: "verify", .. }),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(msg.contains("plugin hostile trapped in verify"), "{msg}");
    assert!(
        msg.contains("panics on purpose"),
        "the panic message is kept: {msg}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endless_sleeper_hits_the_job_deadline() {
    let err = hostile_beside_a_good_job("sleep", Some(Duration::from_secs(2))).await;
    assert!(
        matches!(err, PluginError::Deadline { call: "verify", limit, .. } if limit == Duration::from_secs(2)),
        "{err:?}"
    );
}

/// armv7 gateways run every plugin on Pulley, wasmtime's interpreter: the
/// sandbox holds there as it does in native code (checked here on any
/// machine; under qemu-user on armv7 by packaging/qemu-test.sh).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pulley_interpreter_keeps_the_same_sandbox() {
    let err = hostile_beside_a_good_job_on(EngineKind::Pulley, "loop", None).await;
    assert!(
        matches!(err, PluginError::Cpu { call: "verify", .. }),
        "{err:?}"
    );
    let err = hostile_beside_a_good_job_on(EngineKind::Pulley, "membomb", None).await;
    assert!(
        matches!(&err, PluginError::Memory { wanted, .. } if *wanted > 32 << 20),
        "{err:?}"
    );
    let err = hostile_beside_a_good_job_on(EngineKind::Pulley, "trap", None).await;
    assert!(err.to_string().contains("panics on purpose"), "{err:?}");
}

/// Engines never share compiled code: a cache directory used by a native
/// engine and by Pulley (`[plugins] engine` changed, or a data_dir carried
/// to another machine) gives each its own entry, named after the engine.
#[tokio::test]
async fn a_compile_cache_is_never_loaded_by_another_engine() {
    let dir = PluginsDir::with(&[artifacts::XMODEM]);
    let cache = tempfile::tempdir().unwrap();
    let engines: &[EngineKind] = if EngineKind::native_available() {
        &[EngineKind::Native, EngineKind::Pulley]
    } else {
        &[EngineKind::Pulley]
    };
    let loaded_from = |host: &PluginHost| {
        let p = host.get("xmodem").expect("xmodem loaded");
        p.loaded_from
    };
    for (round, expect) in [("cold", LoadedFrom::Compiled), ("warm", LoadedFrom::Cache)] {
        for &engine in engines {
            let host = host_on(engine, &dir, Some(cache.path().to_path_buf())).await;
            assert_eq!(loaded_from(&host), expect, "{round} start on {engine}");
            // The code it loaded runs on this engine.
            let s = host.session("xmodem", None).await.expect("a session");
            drop(s);
        }
    }
    let mut names: Vec<String> = std::fs::read_dir(cache.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names.len(), engines.len(), "{names:?}");
    for engine in engines {
        assert!(
            names
                .iter()
                .any(|n| n.contains(&format!("-{}-", engine.label()))),
            "no cache entry for {engine}: {names:?}"
        );
    }
}

#[tokio::test]
async fn broken_plugins_are_reported_and_skipped() {
    let dir = PluginsDir::with(&[
        artifacts::XMODEM,
        artifacts::FS_IMPORT,
        artifacts::FUTURE_CONTRACT,
    ]);
    dir.add_raw("garbage.wasm", b"\0asm this is not a component");
    dir.add_raw("notes.txt", b"not a plugin, not even looked at");
    let host = PluginHost::new(test_limits(), None).unwrap();
    let report = host.load_dir(dir.path()).await.unwrap();

    let names: Vec<_> = report.loaded.iter().map(|p| p.info.name.as_str()).collect();
    assert_eq!(names, ["xmodem"]);
    assert_eq!(report.failed.len(), 3, "{:?}", report.failed);
    let mut forbidden = false;
    let mut contract = false;
    let mut malformed = false;
    for e in &report.failed {
        match e {
            PluginError::ForbiddenImport { imports, path } => {
                assert!(
                    imports.iter().any(|i| i.starts_with("wasi:filesystem/")),
                    "{imports:?}"
                );
                assert!(e.to_string().contains("wasi:filesystem/"), "{e}");
                assert!(path.ends_with("otagw_test_plugin_fs_import.wasm"));
                forbidden = true;
            }
            PluginError::Contract { found, .. } => {
                assert_eq!(found, "0.3.0");
                // The operator learns what this gateway runs.
                assert!(e.to_string().contains("0.1.0 to 0.2.0"), "{e}");
                contract = true;
            }
            PluginError::Malformed { path, .. } => {
                assert!(path.ends_with("garbage.wasm"));
                malformed = true;
            }
            other => panic!("unexpected failure {other}"),
        }
    }
    assert!(forbidden && contract && malformed);
    assert!(host.get("snoop").is_none());
    assert!(matches!(
        host.session("nope", None).await,
        Err(PluginError::UnknownFamily(f)) if f == "nope"
    ));
}

#[tokio::test]
async fn second_start_loads_from_the_compile_cache() {
    let dir = PluginsDir::with(&[artifacts::XMODEM, artifacts::HOSTILE]);
    let cache = tempfile::tempdir().unwrap();

    let cold = host_with(&dir, Some(cache.path().to_path_buf())).await;
    let cold_times: Vec<_> = cold
        .families()
        .iter()
        .map(|p| (p.loaded_from, p.load_time))
        .collect();
    assert!(
        cold_times.iter().all(|(f, _)| *f == LoadedFrom::Compiled),
        "{cold_times:?}"
    );
    drop(cold);

    let warm = host_with(&dir, Some(cache.path().to_path_buf())).await;
    let warm_times: Vec<_> = warm
        .families()
        .iter()
        .map(|p| (p.loaded_from, p.load_time))
        .collect();
    assert!(
        warm_times.iter().all(|(f, _)| *f == LoadedFrom::Cache),
        "{warm_times:?}"
    );
    eprintln!("plugin load times: cold {cold_times:?}, warm {warm_times:?}");

    // The cached plugin works.
    let mut s = warm.session("hostile", None).await.unwrap();
    s.verify(source(b"abc"), &hostile_meta("none"))
        .await
        .unwrap();
    // Compiled code is mapped from the cache files: nothing may use them
    // while they are damaged below (the gateway only ever replaces them by
    // renaming a new file into place).
    drop(s);
    drop(warm);

    // A damaged cache entry is noticed and recompiled, never trusted.
    for e in std::fs::read_dir(cache.path()).unwrap() {
        let path = e.unwrap().path();
        let tmp = path.with_extension("damaged");
        std::fs::write(&tmp, b"damaged").unwrap();
        std::fs::rename(&tmp, &path).unwrap();
    }
    let again = host_with(&dir, Some(cache.path().to_path_buf())).await;
    assert!(
        again
            .families()
            .iter()
            .all(|p| p.loaded_from == LoadedFrom::Compiled)
    );
}
