//! The `otagw` binary. No logic lives here: see [`otagw::cli::main`].

fn main() -> std::process::ExitCode {
    otagw::cli::main()
}
