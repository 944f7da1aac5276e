# Step bookkeeping shared by the offline demos (sourced by scripts/demo.sh and scripts/demo_temporal.sh):
# each step's wall-clock seconds and peak RSS, lanes side by side sharing the cores (share_cores), and
# the json files the report cards read. Call steps_init DIR once; everything is written under DIR:
#   DIR/demo_times.json {step: seconds, "total", "peak_rss_gb", "lanes"}, DIR/demo_rss.json {step: GB},
#   DIR/demo_settings.json (write_settings NAME...).
# The caller sets `set -euo pipefail`; nothing here runs on sourcing.

now() {   # seconds since the epoch, with a fraction where date has %N (GNU; BSD date has none)
  local t; t=$(date +%s.%N)
  case $t in *N) date +%s ;; *) echo "$t" ;; esac
}

steps_init() {   # steps_init DIR: start the clock, pick the lane thread count and the memory timer
  STEPS_DIR=$1
  # Spinning OpenMP threads stall whenever the other core is busy (a 2-core box); sleeping ones do not.
  export OMP_WAIT_POLICY=PASSIVE
  export PYTHONUNBUFFERED=1
  mkdir -p "$STEPS_DIR"
  STEPS_TSV=$STEPS_DIR/.demo_steps.tsv   # name, seconds, peak RSS kB, lane (one line per finished step)
  : > "$STEPS_TSV"
  START=$(now)
  CORES=$(nproc 2>/dev/null || getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)
  share_cores 2
  LANE=-                                            # the lane of the steps being run ("-": alone)
  LANE_PIDS=()
  # /usr/bin/time -v gives each step's peak resident memory (package `time`); optional.
  if [ -x /usr/bin/time ] && /usr/bin/time -v -o /dev/null true 2>/dev/null; then
    TIMER=(/usr/bin/time -v -o)
  else
    TIMER=()
    echo "note: /usr/bin/time not found (apt package 'time'): peak memory is not recorded" >&2
  fi
}

share_cores() {   # share_cores N: torch threads per lane while N lanes run at once (at least 1)
  LANE_THREADS=$(( CORES / $1 > 1 ? CORES / $1 : 1 ))
  if [ -n "${OMP_NUM_THREADS:-}" ] && [ "$OMP_NUM_THREADS" -lt "$LANE_THREADS" ]; then
    LANE_THREADS=$OMP_NUM_THREADS                   # never more than the caller allows
  fi
}

write_settings() {   # write_settings NAME...: DIR/demo_settings.json {NAME: value of $NAME}
  local pairs=() v
  for v in "$@"; do pairs+=("$v=${!v}"); done
  python -c 'import json, sys; print(json.dumps(dict(a.split("=", 1) for a in sys.argv[1:]), indent=1))' \
    "${pairs[@]}" > "$STEPS_DIR/demo_settings.json"
}

write_times() {   # DIR/demo_times.json and DIR/demo_rss.json from the finished steps
  python - "$STEPS_TSV" "$START" "$(now)" "$STEPS_DIR" <<'PY'
import collections, json, sys
rows = [line.split("\t") for line in open(sys.argv[1]).read().splitlines() if line]
times = {name: round(float(sec), 2) for name, sec, _, _ in rows}
times["total"] = round(float(sys.argv[3]) - float(sys.argv[2]), 2)
rss = {name: round(int(kb) / 1024 ** 2, 3) for name, _, kb, _ in rows if kb.strip()}
if rss:
    # Side-by-side lanes (group:lane) hold memory at the same time: a group's peak is the sum of
    # its lanes' largest steps (an upper bound); the demo's peak is the largest step or group.
    lanes = collections.defaultdict(float)
    for name, _, _, lane in rows:
        if name in rss and lane != "-":
            lanes[lane] = max(lanes[lane], rss[name])
    groups = collections.defaultdict(float)
    for lane, gb in lanes.items():
        groups[lane.split(":")[0]] += gb
    times["peak_rss_gb"] = round(max(list(rss.values()) + list(groups.values())), 3)
times["lanes"] = {name: lane for name, _, _, lane in rows if lane != "-"}
open(f"{sys.argv[4]}/demo_times.json", "w").write(json.dumps(times, indent=1) + "\n")
open(f"{sys.argv[4]}/demo_rss.json", "w").write(json.dumps(rss, indent=1) + "\n")
PY
}

step() {   # step NAME COMMAND...: run it, time it, record seconds, peak RSS and $LANE
  local name=$1; shift
  echo "==> [$name] $*"
  local t0 t1 kb="" line timing="$STEPS_DIR/.demo_step.$name.time"
  t0=$(now)
  ${TIMER[@]+"${TIMER[@]}" "$timing"} "$@"
  t1=$(now)
  if [ ${#TIMER[@]} -gt 0 ]; then
    kb=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$timing")
    rm -f "$timing"
  fi
  line=$(printf '%s\t%s\t%s\t%s' "$name" "$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')" "$kb" "$LANE")
  echo "$line" >> "$STEPS_TSV"   # one short append per step: lanes never interleave within a line
  [ "$LANE" != - ] || write_times   # lanes: once all are done (join_lanes), so no write misses a step
  echo "    [$name] $(cut -f2 <<< "$line") s"
}

lane() {   # lane GROUP TAG COMMAND...: start COMMAND (a function or program) as lane GROUP:TAG in the background
  local group=$1 tag=$2
  shift 2
  ( set -o pipefail
    export LANE="$group:$tag" OMP_NUM_THREADS=$LANE_THREADS
    "$@" 2>&1 | awk -v tag="[$tag] " '{ print tag $0; fflush() }' ) &
  LANE_PIDS+=($!)
}

join_lanes() {   # join_lanes GROUP: wait for every lane started; exit 1 if any failed (the others finish first)
  local pid failed=0
  for pid in "${LANE_PIDS[@]}"; do wait "$pid" || failed=1; done
  LANE_PIDS=()
  write_times
  [ "$failed" = 0 ] || { echo "error: a lane of '$1' failed (see its [tag] lines above)" >&2; exit 1; }
}
