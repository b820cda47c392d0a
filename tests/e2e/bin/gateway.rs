//! `otagw` itself, built inside the test package so the tests can run it as a
//! process (Cargo gives integration tests the paths of their own package's
//! binaries only). It is `gateway/src/main.rs` plus the fault injection points
//! of the `failpoints` feature, set from the `FAILPOINTS` environment variable
//! (e.g. `FAILPOINTS=runner-flash=1*panic`).

fn main() -> std::process::ExitCode {
    let scenario = fail::FailScenario::setup();
    let code = otagw::cli::main();
    scenario.teardown();
    code
}
