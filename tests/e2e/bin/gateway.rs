//! `otagw` itself, built inside the test package so the tests can run it as a
//! process (Cargo gives integration tests the paths of their own package's
//! binaries only). It is `gateway/src/main.rs` line for line.

fn main() -> std::process::ExitCode {
    otagw::cli::main()
}
