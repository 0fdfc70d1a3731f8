#!/usr/bin/env bash
# Starts and stops dialtone's local x402 stack: anvil (a local chain, from the npm package
# @foundry-rs/anvil), the TestUSDC EIP-3009 token, and an x402 v2 facilitator built on the
# reference library (x402/facilitator.mjs). Needs only node >= 20 and npm; the only download
# is `npm ci` from the npm registry, when x402/node_modules is missing or stale.
#
#   scripts/x402-stack.sh start DIR [ANVIL_PORT FACILITATOR_PORT]
#   scripts/x402-stack.sh stop DIR
#   scripts/x402-stack.sh install
#
# start: (re)starts everything, logs to DIR/anvil.log and DIR/facilitator.log, PIDs in
#   DIR/anvil.pid and DIR/facilitator.pid, and when every part answers writes DIR/x402.env
#   (KEY=value lines) and DIR/x402.json (see x402/README.md). Ports default to 8545 and 4022;
#   0 picks a free port. A start on a DIR whose stack runs stops that stack first. On failure
#   it stops what it started, prints the logs' tails and exits non-zero.
# stop: stops what start started in DIR (by its PID files), waiting for each to exit.
# install: only the npm ci step.
# env: X402_PAYER_FUNDS (units minted to the payer, default 1000000000 = 1,000 USDC),
#      X402_WAIT_SECONDS (how long start waits for each part, default 60),
#      X402_STOP_SECONDS (how long stop waits before SIGKILL, default 10).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
x402="$root/x402"
stop_wait=${X402_STOP_SECONDS:-10}

die() { echo "x402-stack: $*" >&2; exit 1; }

anvil_bin() {
    local os arch
    case "$(uname -s)" in Linux) os=linux ;; Darwin) os=darwin ;; *) die "unsupported OS $(uname -s)" ;; esac
    case "$(uname -m)" in x86_64|amd64) arch=amd64 ;; aarch64|arm64) arch=arm64 ;; *) die "unsupported CPU $(uname -m)" ;; esac
    echo "$x402/node_modules/@foundry-rs/anvil-$os-$arch/bin/anvil"
}

# npm ci from x402/package-lock.json when node_modules is missing or older than the lock file.
# --ignore-scripts: @foundry-rs/anvil's postinstall would only download a binary that its
# optional dependency @foundry-rs/anvil-<os>-<arch> already ships.
cmd_install() {
    command -v node >/dev/null || die "node (>= 20) is required"
    command -v npm >/dev/null || die "npm is required"
    local stamp="$x402/node_modules/.package-lock.json"
    if [ ! -f "$stamp" ] || [ "$x402/package-lock.json" -nt "$stamp" ]; then
        echo "x402-stack: npm ci in x402/ (pinned: $(cd "$x402" && node -p 'Object.entries(require("./package.json").dependencies).map(([n,v])=>n+"@"+v).join(" ")'))"
        (cd "$x402" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    fi
    [ -x "$(anvil_bin)" ] || die "no anvil binary at $(anvil_bin) (its npm package did not install)"
}

# alive PID: the process exists and is not a zombie.
alive() {
    local state
    state=$(ps -o stat= -p "$1" 2>/dev/null) || return 1
    [ -n "$state" ] && [ "${state:0:1}" != Z ]
}

# ours PID NAME: the PID still runs what start started (guards against a reused PID).
ours() {
    local args
    args=$(ps -o args= -p "$1" 2>/dev/null) || return 1
    case "$2" in
        anvil) [[ "$args" == *"/bin/anvil "* ]] ;;
        facilitator) [[ "$args" == *"x402/facilitator.mjs"* ]] ;;
    esac
}

stop_one() {
    local dir=$1 name=$2 pidfile pid i
    pidfile="$dir/$name.pid"
    [ -f "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if [[ "$pid" =~ ^[0-9]+$ ]] && alive "$pid" && ours "$pid" "$name"; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < stop_wait * 10; i++)); do
            alive "$pid" || break
            sleep 0.1
        done
        if alive "$pid"; then
            echo "x402-stack: $name (pid $pid) did not exit on SIGTERM within ${stop_wait}s; SIGKILL" >&2
            kill -KILL "$pid" 2>/dev/null || true
        fi
        wait "$pid" 2>/dev/null || true   # reap it when this shell started it
    fi
    rm -f "$pidfile"
}

cmd_stop() {
    local dir=$1
    [ -d "$dir" ] || return 0
    stop_one "$dir" facilitator
    stop_one "$dir" anvil
    rm -f "$dir/x402.env" "$dir/x402.json"
}

free_port() {
    node -e 'const s=require("net").createServer().listen(0,"127.0.0.1",()=>{console.log(s.address().port);s.close()})'
}

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

cmd_start() {
    local dir=$1 anvil_port=${2:-8545} fac_port=${3:-4022} anvil_pid fac_pid t0
    t0=$(date +%s%N)
    [[ "$dir" != *[[:space:]]* ]] || die "DIR must not contain whitespace (x402.env is plain KEY=value)"
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    cmd_stop "$dir"
    cmd_install

    [ "$anvil_port" = 0 ] && anvil_port=$(free_port)
    [ "$fac_port" = 0 ] && fac_port=$(free_port)
    [[ "$anvil_port" =~ ^[0-9]+$ && "$fac_port" =~ ^[0-9]+$ ]] || die "ports must be numbers"
    [ "$anvil_port" != "$fac_port" ] || die "anvil and the facilitator need different ports"
    port_in_use "$anvil_port" && die "port $anvil_port (anvil) is in use"
    port_in_use "$fac_port" && die "port $fac_port (facilitator) is in use"

    # anvil: chain id 31337, the default mnemonic's 10 well-known accounts, automine, loopback.
    "$(anvil_bin)" --host 127.0.0.1 --port "$anvil_port" --chain-id 31337 --accounts 10 \
        >"$dir/anvil.log" 2>&1 </dev/null &
    anvil_pid=$!
    echo "$anvil_pid" >"$dir/anvil.pid"

    X402_RPC_URL="http://127.0.0.1:$anvil_port" X402_FACILITATOR_PORT="$fac_port" X402_FACILITATOR_HOST=127.0.0.1 \
        node "$x402/facilitator.mjs" >"$dir/facilitator.log" 2>&1 </dev/null &
    fac_pid=$!
    echo "$fac_pid" >"$dir/facilitator.pid"

    if ! X402_DIR="$dir" X402_ANVIL_PORT="$anvil_port" X402_FACILITATOR_PORT="$fac_port" \
        X402_ANVIL_PID="$anvil_pid" X402_FACILITATOR_PID="$fac_pid" node "$x402/setup.mjs"; then
        echo "--- $dir/anvil.log (tail)" >&2; tail -n 20 "$dir/anvil.log" >&2 || true
        echo "--- $dir/facilitator.log (tail)" >&2; tail -n 20 "$dir/facilitator.log" >&2 || true
        cmd_stop "$dir"
        die "start failed"
    fi
    echo "x402-stack: up in $(( ($(date +%s%N) - t0) / 1000000 )) ms: anvil http://127.0.0.1:$anvil_port (pid $anvil_pid), facilitator http://127.0.0.1:$fac_port (pid $fac_pid); $dir/x402.env"
}

case "${1:-}" in
    start) [ $# -ge 2 ] || die "usage: $0 start DIR [ANVIL_PORT FACILITATOR_PORT]"; cmd_start "$2" "${3:-}" "${4:-}" ;;
    stop) [ $# -ge 2 ] || die "usage: $0 stop DIR"; cmd_stop "$2"; echo "x402-stack: stopped ($2)" ;;
    install) cmd_install ;;
    *) die "usage: $0 start DIR [ANVIL_PORT FACILITATOR_PORT] | stop DIR | install" ;;
esac
