#!/usr/bin/env bash
# Start (or stop) a local Prefect server (SQLite) and a process worker, and register the deployments.
#   scripts/serve.sh start   -> prints the UI URL; then: prefect deployment run kgmel/full-pipeline
#   scripts/serve.sh stop
# Env: KGMEL_PREFECT_PORT (4200), PREFECT_HOME (~/.prefect), KGMEL_BIN (.venv/bin).
#
# The server's URL goes into ./prefect.toml, Prefect's project-level settings file: prefect and kgmel
# commands run from this folder reach the server, nothing else does, and the user's Prefect profile is
# never touched. `stop` removes the file, so later runs go back to Prefect's server-less mode.
set -euo pipefail
cd "$(dirname "$0")/.."
export KGMEL_PROJECT_DIR="$PWD"
BIN="${KGMEL_BIN:-$PWD/.venv/bin}"
PORT="${KGMEL_PREFECT_PORT:-4200}"
STATE="${PREFECT_HOME:-$HOME/.prefect}/kgmel-serve"
export PREFECT_API_URL="http://127.0.0.1:${PORT}/api"
eval "$("$BIN/python" -c 'from kgmel_core.environment import shell_exports; print(shell_exports())')"  # the server never imports kgmel: give it the offline settings
SETTINGS="$PWD/prefect.toml"
MARK="# written by scripts/serve.sh (make serve); removed by make stop"
mkdir -p "$STATE"

remove_settings() {
  if [[ -f "$SETTINGS" ]] && [[ "$(head -n 1 "$SETTINGS")" == "$MARK" ]]; then rm -f "$SETTINGS"; fi
}

stop() {
  for name in worker server; do
    if [[ -f "$STATE/$name.pid" ]]; then
      pid=$(cat "$STATE/$name.pid")
      # the worker wants two interrupts; then make sure
      kill -INT -- "-$pid" 2>/dev/null || true; sleep 1; kill -INT -- "-$pid" 2>/dev/null || true
      for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
      kill -KILL -- "-$pid" 2>/dev/null || true
      rm -f "$STATE/$name.pid"
    fi
  done
}

case "${1:-start}" in
  stop) stop; remove_settings; echo "stopped"; exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac

if [[ -f "$SETTINGS" ]] && [[ "$(head -n 1 "$SETTINGS")" != "$MARK" ]]; then
  echo "$SETTINGS exists and was not written by this script; move it away first" >&2; exit 1
fi
stop
remove_settings
setsid "$BIN/prefect" server start --host 127.0.0.1 --port "$PORT" >"$STATE/server.log" 2>&1 &
echo $! >"$STATE/server.pid"
for _ in $(seq 120); do
  if curl -sf "http://127.0.0.1:${PORT}/api/health" >/dev/null; then break; fi
  sleep 1
done
curl -sf "http://127.0.0.1:${PORT}/api/health" >/dev/null || { echo "server did not start; see $STATE/server.log" >&2; exit 1; }
printf '%s\n[api]\nurl = "%s"\n' "$MARK" "$PREFECT_API_URL" >"$SETTINGS"
"$BIN/prefect" work-pool inspect kgmel-local >/dev/null 2>&1 || "$BIN/prefect" work-pool create kgmel-local --type process >/dev/null
"$BIN/prefect" --no-prompt deploy --all >"$STATE/deploy.log" 2>&1 || { cat "$STATE/deploy.log" >&2; exit 1; }
PATH="$BIN:$PATH" setsid "$BIN/prefect" worker start --pool kgmel-local --type process >"$STATE/worker.log" 2>&1 &
echo $! >"$STATE/worker.pid"
CRON=$(sed -n 's/^ *- cron: *"\(.*\)".*/\1/p' prefect.yaml | head -n 1)  # the schedule as deployed, not as first written
cat <<MSG
Prefect UI:   http://127.0.0.1:${PORT}
Deployments:  kgmel/full-pipeline, kgmel/reindex-kb (cron "${CRON}" UTC, from prefect.yaml), kgmel/link
Run:          prefect deployment run kgmel/full-pipeline --watch
Settings:     $SETTINGS (this folder's prefect/kgmel commands use the server; your profile is untouched)
Logs:         $STATE/{server,worker,deploy}.log      Stop: make stop
MSG
