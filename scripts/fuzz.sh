#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS_PER_TARGET seconds each
# (default 60), one after the other, and fails if any target crashes. This is
# the open-ended search (make fuzz); what it finds depends on luck and time.
# `make test` runs scripts/fuzz-regress.sh instead: every checked-in seed and
# kept crash input once, the same verdict every time.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET]
#
# Installs cargo-fuzz if missing (`cargo install cargo-fuzz --locked`) and
# builds with the nightly toolchain when one is installed (falling back to
# the default toolchain: with `--sanitizer none` cargo-fuzz needs no
# unstable flag). Targets are built with debug assertions (so integer
# overflow panics) and without a sanitizer: the code under test is safe
# Rust, and the coverage-guided search is what finds its panics.
#
# Each target reads the checked-in seeds in fuzz/corpus/<target>/ and grows
# its own working corpus in fuzz/target/corpus/<target>/ (git-ignored, kept
# between runs), so the seeds stay small. A crash is written by libFuzzer to
# fuzz/artifacts/<target>/ and reproduced with
#   cargo +nightly fuzz run -s none -a <target> fuzz/artifacts/<target>/<file>
# Environment: FUZZ_TARGETS="a b" runs only those targets (one target at a
# time: the machines have 2 cores).
set -euo pipefail

cd "$(dirname "$0")/.."
SECS="${1:-60}"
case "$SECS" in
    ''|*[!0-9]*|0) echo "usage: $0 [SECONDS_PER_TARGET>0]" >&2; exit 2 ;;
esac

export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
fi

TOOLCHAIN=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    TOOLCHAIN=(+nightly)
else
    echo "fuzz.sh: no nightly toolchain installed; building with the default toolchain (sanitizer none needs no nightly)"
fi

FLAGS=(--sanitizer none --debug-assertions)
LOGS=fuzz/target/logs
mkdir -p "$LOGS"

echo "fuzz.sh: building the fuzz targets ($(cargo "${TOOLCHAIN[@]}" --version))"
build_start=$(date +%s)
cargo "${TOOLCHAIN[@]}" fuzz build "${FLAGS[@]}"
echo "fuzz.sh: built in $(( $(date +%s) - build_start ))s"

if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    mapfile -t targets < <(cargo fuzz list)
fi

failed=()
summary=()
for t in "${targets[@]}"; do
    work="fuzz/target/corpus/$t"
    seeds="fuzz/corpus/$t"
    mkdir -p "$work" "$seeds" "fuzz/artifacts/$t"
    log="$LOGS/$t.log"
    echo "fuzz.sh: $t for ${SECS}s (seeds: $(find "$seeds" -type f | wc -l), log: $log)"
    status=0
    # libFuzzer writes new inputs to the first corpus directory only.
    cargo "${TOOLCHAIN[@]}" fuzz run "${FLAGS[@]}" "$t" "$work" "$seeds" -- \
        -max_total_time="$SECS" -timeout=20 -rss_limit_mb=4096 -print_final_stats=1 >"$log" 2>&1 || status=$?
    # Executions: libFuzzer's final stats, else its last "#N ... DONE/pulse" line.
    execs=$(sed -n 's/^stat::number_of_executed_units: *\([0-9]*\).*/\1/p' "$log" | tail -1)
    [ -n "$execs" ] || execs=$(sed -n 's/^#\([0-9]*\)[[:space:]].*/\1/p' "$log" | tail -1)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *\([0-9]*\).*/\1/p' "$log" | tail -1)
    done_line=$(grep -E '^#[0-9]+[[:space:]]+DONE' "$log" | tail -1 || true)
    cov=$(sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\) corp: \([0-9]*\).*/cov \1, ft \2, corpus \3/p' <<<"$done_line")
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        line=$(printf '%-16s CRASH  %12s execs  (exit %s)' "$t" "${execs:-?}" "$status")
        echo "fuzz.sh: $t FAILED (exit $status); the end of its log:"
        tail -n 40 "$log" | sed 's/^/    /'
        grep -h -E 'Test unit written to|artifact_prefix' "$log" | sed 's/^/    /' || true
    else
        line=$(printf '%-16s ok     %12s execs  %8s/s  %s' "$t" "${execs:-?}" "${rate:-?}" "$cov")
    fi
    summary+=("$line")
    echo "fuzz.sh: $line"
done

echo
echo "fuzz.sh: ${SECS}s per target"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz.sh: CRASHED: ${failed[*]} (inputs in fuzz/artifacts/<target>/)"
    exit 1
fi
echo "fuzz.sh: ${#targets[@]} passed, 0 failed"
