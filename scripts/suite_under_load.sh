#!/usr/bin/env bash
# Issue 13's check: the whole suite (what CI runs) N times in a row (default 5) while two
# other processes keep both cores busy. Prints one line per run; exit status 1 if any failed.
#   ./scripts/suite_under_load.sh 5 2>&1 | tee /tmp/suite-under-load.txt
set -uo pipefail
cd "$(dirname "$0")/.."
runs="${1:-5}"
python3 -c 'while True: pass' & busy1=$!
python3 -c 'while True: pass' & busy2=$!
trap 'kill $busy1 $busy2 2>/dev/null' EXIT
failed=0
echo "commit $(git rev-parse --short HEAD), $runs runs, busy loops $busy1 $busy2"
for run in $(seq 1 "$runs"); do
    log="$(mktemp /tmp/suite-under-load-run$run.XXXXXX.log)"
    started=$(date +%s)
    CI=true ./scripts/test.sh -q -p no:cacheprovider > "$log" 2>&1
    status=$?
    [ "$status" = 0 ] || failed=1
    echo "run $run: exit $status in $(( $(date +%s) - started )) s, load $(cut -d' ' -f1-3 /proc/loadavg): $(tail -1 "$log") (log $log)"
done
exit "$failed"
