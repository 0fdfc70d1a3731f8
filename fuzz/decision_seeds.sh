#!/usr/bin/env bash
# Rebuilds fuzz/corpus/decision/ from the working corpus that a run grew
# (fuzz/target/corpus/decision/). It takes the coverage-minimal set
# (libFuzzer -merge=1) and keeps up to 8 inputs for each way a request ends
# ("allow apikey paid hold after 2 calls", "deny 401 unauthorized after 0
# calls", …): the 4 smallest and 4 of middling size. Each seed is named after
# its outcome. Run it after changing the `Input` struct of
# fuzz_targets/decision.rs: the old seeds mean something else once the
# struct changes.
#
#   FUZZ_TARGETS=decision scripts/fuzz.sh 300 && fuzz/decision_seeds.sh
set -euo pipefail
cd "$(dirname "$0")/.."
bin=fuzz/target/x86_64-unknown-linux-gnu/release/decision
work=fuzz/target/corpus/decision
[ -x "$bin" ] && [ -d "$work" ] || { echo "run scripts/fuzz.sh first" >&2; exit 1; }
merged=$(mktemp -d)
trap 'rm -rf "$merged"' EXIT
"$bin" -merge=1 "$merged" "$work" fuzz/corpus/decision >/dev/null 2>&1
rm -rf fuzz/corpus/decision
mkdir -p fuzz/corpus/decision
for f in "$merged"/*; do
    o=$(DIALTONE_FUZZ_OUTCOMES=1 "$bin" "$f" 2>&1 | sed -n 's/^outcome: //p' | head -1)
    [ -n "$o" ] && printf '%s\t%s\t%s\n' "$(stat -c %s "$f")" "$f" "${o// /-}"
done | sort -t$'\t' -k3,3 -k1,1n | awk -F'\t' '
    { rows[$3] = rows[$3] "\n" $2; n[$3]++ }
    END {
        for (o in rows) {
            split(substr(rows[o], 2), f, "\n"); c = n[o]; k = 0
            for (i = 1; i <= c; i++) {
                mid = int(c / 2) + 1
                if (c <= 8 || i <= 4 || (i >= mid && i < mid + 4)) print f[i] "\t" o "-" k++
            }
        }
    }' | while IFS=$'\t' read -r src name; do cp "$src" "fuzz/corpus/decision/$name"; done
echo "fuzz/corpus/decision: $(ls fuzz/corpus/decision | wc -l) seeds, $(du -sb fuzz/corpus/decision | cut -f1) bytes"
