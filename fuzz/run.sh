#!/usr/bin/env bash
# Run every fuzz target (or the ones named) for SECONDS_PER_TARGET seconds
# each (default 600), one after the other, then minimise each corpus.
#
#   fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
#
# The corpus lives in fuzz/corpus/<target>/ (committed) and grows while a
# target runs; `cargo fuzz cmin` then keeps only inputs that add coverage.
# The first crash (or timeout, or out-of-memory) stops the script, printing
# the reproducer's path under fuzz/artifacts/<target>/; `cargo test
# --workspace` replays that folder too, so the crash is a failing test until
# it is fixed (then move the file to fuzz/regressions/<target>/, which cmin
# never touches: see fuzz/README.md).
#
# "Nightly": cargo-fuzz needs nightly rustc flags (-Z). This machine has only
# the stable toolchain, so the script sets RUSTC_BOOTSTRAP=1, which lets
# stable rustc accept them. Nothing else depends on it: .ci/run never builds
# the fuzz crate.
#
# Environment: FUZZ_SANITIZER (default none: the code is safe Rust, and
# without ASan libFuzzer runs about twice as many inputs; `address` works
# too), FUZZ_NICE (default 19: the fuzzer yields the CPU to everything else).
set -euo pipefail
cd "$(dirname "$0")"

secs="${1:-600}"
shift || true
all=(notice config smp_frame smp_cbor smp_session mcuboot stm32_session xmodem_session)
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${all[@]}")

export RUSTC_BOOTSTRAP=1
# The fuzz crate builds into fuzz/target (its own workspace), never into a
# shared target directory with other flags.
unset CARGO_TARGET_DIR
nice_cmd=(nice -n "${FUZZ_NICE:-19}")
flags=(--sanitizer "${FUZZ_SANITIZER:-none}" --debug-assertions)

if ! cargo fuzz --version >/dev/null 2>&1; then
    "${nice_cmd[@]}" cargo install cargo-fuzz --locked
fi

# Largest input per target: notices, answers and configs are small; MCUboot
# images need room for a header, a payload and signed TLVs.
max_len() {
    case "$1" in
        notice | smp_cbor) echo 4096 ;;
        mcuboot) echo 16384 ;;
        *) echo 8192 ;;
    esac
}

# Build every target first, so a run's time is fuzzing time.
"${nice_cmd[@]}" cargo fuzz build "${flags[@]}"

mkdir -p target/logs
summary=target/logs/summary.txt
printf '%-16s %8s %12s %8s %10s\n' target seconds execs corpus bytes | tee -a "$summary"

for t in "${targets[@]}"; do
    mkdir -p "corpus/$t" "artifacts/$t"
    log="target/logs/$t.log"
    extra=(-max_total_time="$secs" -max_len="$(max_len "$t")" -timeout=10
        -rss_limit_mb=2048 -print_final_stats=1)
    [ -f "dict/$t.dict" ] && extra+=(-dict="dict/$t.dict")
    before=$(ls "artifacts/$t" | wc -l)
    start=$(date +%s)
    set +e
    # New inputs go to corpus/<t>; regressions/<t> (inputs that once crashed)
    # is read, never minimised away.
    dirs=("corpus/$t")
    [ -d "regressions/$t" ] && dirs+=("regressions/$t")
    "${nice_cmd[@]}" cargo fuzz run "${flags[@]}" "$t" "${dirs[@]}" -- "${extra[@]}" >"$log" 2>&1
    rc=$?
    set -e
    took=$(($(date +%s) - start))
    after=$(ls "artifacts/$t" | wc -l)
    if [ "$rc" -ne 0 ] || [ "$after" -gt "$before" ]; then
        echo "fuzz target $t FAILED (exit $rc) after ${took}s; log: fuzz/$log" >&2
        grep -E 'panicked|ERROR|SUMMARY|Test unit written' "$log" | head -20 >&2 || true
        newest=$(ls -t "artifacts/$t" | head -1)
        [ -n "$newest" ] && echo "reproducer: fuzz/artifacts/$t/$newest" \
            "(cargo fuzz run ${flags[*]} $t fuzz/artifacts/$t/$newest)" >&2
        exit 1
    fi
    # Keep an input only for the edges it adds, not for hit counts
    # (-use_counters=0): a third to a sixth of the files, for the same code.
    "${nice_cmd[@]}" cargo fuzz cmin "${flags[@]}" "$t" -- -max_len="$(max_len "$t")" \
        -use_counters=0 >>"$log" 2>&1
    execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$' || echo "?")
    files=$(ls "corpus/$t" | wc -l)
    bytes=$(du -sb "corpus/$t" | cut -f1)
    printf '%-16s %8s %12s %8s %10s\n' "$t" "$took" "$execs" "$files" "$bytes" | tee -a "$summary"
done
