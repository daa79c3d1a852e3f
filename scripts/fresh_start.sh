#!/usr/bin/env bash
# Time from a fresh clone to the first 200 from /predict with `make run`, and the size of the .venv it made.
# Usage: scripts/fresh_start.sh [REPO] [PORT]   (REPO defaults to this checkout; PORT to a free one)
# The pip cache is whatever this machine has: run it twice and take the second figure for a warm cache.
set -euo pipefail
repo=${1:-$(cd "$(dirname "$0")/.." && pwd)}
port=${2:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
folder=$(mktemp -d /tmp/fresh-start.XXXXXX)
body='{"sepal_length_cm": 5.1, "sepal_width_cm": 3.5, "petal_length_cm": 1.4, "petal_width_cm": 0.2}'
start=$(date +%s.%N)
git clone --quiet "$repo" "$folder/clone"
cd "$folder/clone"
setsid make run PORT="$port" >"$folder/run.log" 2>&1 &
run_pid=$!
trap 'kill -- -$run_pid 2>/dev/null || true; wait $run_pid 2>/dev/null || true' EXIT
installed=""
until curl -sf -o /dev/null -X POST "http://127.0.0.1:$port/predict" -H 'Content-Type: application/json' -d "$body"; do
  kill -0 "$run_pid" 2>/dev/null || { echo "make run exited; see $folder/run.log"; exit 1; }
  if [ -z "$installed" ] && grep -q "gunicorn --config" "$folder/run.log"; then installed=$(date +%s.%N); fi
  sleep 0.5
done
end=$(date +%s.%N)
echo "first prediction after $(python3 -c "print(round($end - $start, 1))") s" \
  "(install $(python3 -c "print(round(${installed:-$end} - $start, 1))") s, then start-up to the first answer" \
  "$(python3 -c "print(round($end - ${installed:-$end}, 1))") s); load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
echo ".venv: $(du -sh .venv | cut -f1), $(.venv/bin/uv pip list --python .venv/bin/python --format=freeze 2>/dev/null | wc -l) packages"
echo "(folder $folder)"
