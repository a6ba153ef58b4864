#!/usr/bin/env bash
# Runs each target in turn for SECONDS (default 600), niced, one worker,
# with a scratch corpus in work/<target> (the seeds in corpus/<target> are
# read, not written). Logs: work/logs/<target>/fuzz-0.log.
set -u
cd "$(dirname "$0")/.."
root=$PWD
seconds=${SECONDS_PER_TARGET:-600}
targets=${*:-frames gunzip json urls broker_http registry_http registry_grpc}
for t in $targets; do
    mkdir -p "work/$t" "work/logs/$t" "artifacts/$t"
    (cd "work/logs/$t" && nice -n 19 "$root/target/x86_64-unknown-linux-gnu/release/$t" \
        -max_total_time="$seconds" -timeout=20 -jobs=1 -workers=1 \
        -artifact_prefix="$root/artifacts/$t/" "$root/work/$t" "$root/corpus/$t" >/dev/null 2>&1)
    echo "$t: $(grep -E '^#[0-9]+' "work/logs/$t/fuzz-0.log" | tail -1)"
    grep -E 'panicked|ERROR: libFuzzer|SUMMARY' "work/logs/$t/fuzz-0.log" | head -3
done
