#!/usr/bin/env bash
# Optimises the filter's .wasm in place with binaryen's wasm-opt.
#
#   scripts/wasm-opt.sh WASM_OPT FILE [wasm-opt flags...]
#
# cargo re-links its output over FILE on every `cargo build`, even when
# nothing changed (FILE is a hard link into target/.../deps/), so an
# in-place result would silently be replaced by rustc's. The optimised copy
# is kept beside it (FILE.opt) with the SHA-256 of the input it came from
# (FILE.opt.input): when FILE is that input again, the copy is put back;
# when FILE is new, it is optimised again. FILE is replaced by rename, never
# written through, so the hard-linked cargo output stays rustc's.
set -euo pipefail
opt="$1"; file="$2"; shift 2
sum() { sha256sum "$1" | cut -d' ' -f1; }
current=$(sum "$file")
if [ -f "$file.opt" ] && [ "$current" = "$(sum "$file.opt")" ]; then
    exit 0                                    # already the optimised file
fi
if [ -f "$file.opt" ] && [ -f "$file.opt.input" ] && [ "$current" = "$(cat "$file.opt.input")" ]; then
    cp "$file.opt" "$file.tmp" && mv "$file.tmp" "$file"
    exit 0                                    # cargo re-linked the same build
fi
echo "wasm-opt: $(stat -c %s "$file") bytes from rustc"
"$opt" "$@" "$file" -o "$file.opt.tmp"
mv "$file.opt.tmp" "$file.opt"
echo "$current" > "$file.opt.input"
cp "$file.opt" "$file.tmp" && mv "$file.tmp" "$file"
