//! `leaf-sim` (examples/leaf-sim) built inside the test package, so tests can
//! hand its path to processes that spawn it (the BLE simulator runs one per
//! device): Cargo gives tests the paths of their own package's binaries only.

#[path = "../../../examples/leaf-sim/src/main.rs"]
mod leaf_sim;

fn main() -> std::process::ExitCode {
    leaf_sim::main()
}
