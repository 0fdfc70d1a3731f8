#!/usr/bin/env bash
# The fuzzers' regression replay, run by `make test` (make fuzz-regress):
# every cargo-fuzz target in fuzz/ runs each of its checked-in seeds
# (fuzz/corpus/<target>/) and each input kept in fuzz/artifacts-found/
# (files named <target>-<what>) exactly once, with libFuzzer's -runs=0: no
# mutation, no search, no clock. Fails on any crash, panic or failed
# assertion (or a seed over the 20 s timeout). The same tree gives the same
# verdict every time; the open-ended search is scripts/fuzz.sh (make fuzz).
#
#   scripts/fuzz-regress.sh
#
# Environment: FUZZ_TARGETS="a b" replays only those targets.
#
# Installs cargo-fuzz if missing and builds the targets as scripts/fuzz.sh
# does (same flags, so the two share fuzz/target). Nothing is written outside
# fuzz/target: crash files of a failed replay go to
# fuzz/target/regress-artifacts/<target>/, logs to fuzz/target/logs/.
set -euo pipefail

cd "$(dirname "$0")/.."
export PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz-regress.sh: installing cargo-fuzz (cargo install cargo-fuzz --locked)"
    cargo install cargo-fuzz --locked
fi

TOOLCHAIN=()
if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    TOOLCHAIN=(+nightly)
fi
FLAGS=(--sanitizer none --debug-assertions)

start=$(date +%s)
echo "fuzz-regress.sh: building the fuzz targets ($(cargo "${TOOLCHAIN[@]}" --version))"
cargo "${TOOLCHAIN[@]}" fuzz build "${FLAGS[@]}"
built=$(date +%s)
echo "fuzz-regress.sh: built in $((built - start))s"

# cargo fuzz builds for the host triple.
host=$(rustc "${TOOLCHAIN[@]}" -vV | sed -n 's/^host: //p')
bin="fuzz/target/$host/release"
mapfile -t all < <(cargo fuzz list)
if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a targets <<<"$FUZZ_TARGETS"
else
    targets=("${all[@]}")
fi

# Every kept input must name its target, or it would silently never run.
found=fuzz/artifacts-found
for f in "$found"/*; do
    name=$(basename "$f")
    [ "$name" = README.md ] && continue
    owner=""
    for t in "${all[@]}"; do
        case "$name" in "$t"-*) owner=$t ;; esac
    done
    if [ -z "$owner" ]; then
        echo "fuzz-regress.sh: $f names no fuzz target (expected <target>-<what>; targets: ${all[*]})" >&2
        exit 1
    fi
done

LOGS=fuzz/target/logs
mkdir -p "$LOGS"
failed=()
summary=()
for t in "${targets[@]}"; do
    seeds="fuzz/corpus/$t"
    nseeds=$(find "$seeds" -type f 2>/dev/null | wc -l)
    if [ "$nseeds" -eq 0 ]; then
        echo "fuzz-regress.sh: $t has no checked-in seeds in $seeds" >&2
        failed+=("$t")
        continue
    fi
    kept=()
    for f in "$found/$t"-*; do
        [ -f "$f" ] && kept+=("$f")
    done
    log="$LOGS/regress-$t.log"
    artifacts="fuzz/target/regress-artifacts/$t/"
    mkdir -p "$artifacts"
    t0=$(date +%s%N)
    status=0
    # A directory: its files run once each, then -runs=0 stops before any
    # mutation. libFuzzer reads each seed whole (no -max_len given).
    "$bin/$t" -runs=0 -timeout=20 -rss_limit_mb=4096 -artifact_prefix="$artifacts" "$seeds" >"$log" 2>&1 || status=$?
    # Files: each runs once.
    if [ "$status" -eq 0 ] && [ "${#kept[@]}" -gt 0 ]; then
        "$bin/$t" -timeout=20 -rss_limit_mb=4096 -artifact_prefix="$artifacts" "${kept[@]}" >>"$log" 2>&1 || status=$?
    fi
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    # The empty input runs too: at least one run more than there are seeds.
    runs=$(sed -n 's/^Done \([0-9]*\) runs.*/\1/p' "$log" | head -1)
    replayed=$(grep -c '^Executed ' "$log" || true)
    if [ "$status" -eq 0 ] && { [ -z "$runs" ] || [ "$runs" -le "$nseeds" ] || [ "$replayed" -ne "${#kept[@]}" ]; }; then
        echo "fuzz-regress.sh: $t ran ${runs:-?} inputs for $nseeds seeds and $replayed of ${#kept[@]} kept inputs (log: $log)" >&2
        status=1
    fi
    if [ "$status" -ne 0 ]; then
        failed+=("$t")
        line=$(printf '%-20s FAILED  (exit %s, log %s)' "$t" "$status" "$log")
        echo "fuzz-regress.sh: $t FAILED; the end of its log:"
        tail -n 40 "$log" | sed 's/^/    /'
    else
        line=$(printf '%-20s ok  %4d seeds  %2d kept  %6d ms' "$t" "$nseeds" "${#kept[@]}" "$ms")
    fi
    summary+=("$line")
done

echo
echo "fuzz-regress.sh: replayed in $(( $(date +%s) - built ))s (build $((built - start))s)"
printf '  %s\n' "${summary[@]}"
if [ "${#failed[@]}" -gt 0 ]; then
    echo "fuzz-regress.sh: FAILED: ${failed[*]}"
    exit 1
fi
echo "fuzz-regress.sh: ${#targets[@]} targets, every seed and kept input passes"
