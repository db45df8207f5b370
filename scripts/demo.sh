#!/usr/bin/env bash
# make demo: Redis (REDIS_URL, else localhost:6379, started if nothing answers),
# demo data, the nightly job, then the service on PORT with a ready-to-paste curl.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
PORT="${PORT:-8000}"
DATA=var/demo
mkdir -p var

if [ -z "${REDIS_URL:-}" ]; then
  export REDIS_URL="redis://localhost:6379/0"
  if ! $PY -c "import redis,sys; sys.exit(0 if redis.Redis(socket_connect_timeout=1).ping() else 1)" 2>/dev/null; then
    scripts/ensure-redis-server.sh
    mkdir -p var/redis
    echo "starting a local redis-server on 6379 (data and AOF in var/redis)"
    # noeviction: at the memory limit Redis refuses writes (the API answers 503) instead of dropping data.
    redis-server --port 6379 --bind 127.0.0.1 --dir "$PWD/var/redis" --appendonly yes --daemonize yes \
      --maxmemory "${REDIS_MAXMEMORY:-1gb}" --maxmemory-policy noeviction \
      --logfile "$PWD/var/redis/redis.log" >/dev/null
    for _ in $(seq 50); do
      $PY -c "import redis; redis.Redis().ping()" 2>/dev/null && break
      sleep 0.1
    done
  fi
fi
echo "Redis: ${REDIS_URL%%@*}@…" | sed 's/@…$//'

# Events posted to the service are archived here by the nightly job, then trimmed from Redis.
export EVENTS_ARCHIVE="${EVENTS_ARCHIVE:-$PWD/var/events-archive}"
# POST /events needs a bearer token; the demo makes one (kept in var/events-token) unless you set EVENTS_TOKEN.
if [ -z "${EVENTS_TOKEN:-}" ]; then
  [ -s var/events-token ] || (umask 077; $PY -c 'import secrets; print(secrets.token_urlsafe(24))' > var/events-token)
  EVENTS_TOKEN=$(cat var/events-token)
  export EVENTS_TOKEN
fi

if [ ! -f "$DATA/events.csv" ]; then
  $PY -m jobs.make_demo_data --out "$DATA"
fi
$PY -m jobs.nightly --events "$DATA/events.csv" --catalog "$DATA/catalog.csv"

USER_ID=$(sed -n '2p' "$DATA/events.csv" | cut -d, -f1)
ITEM_ID=$(sed -n '2p' "$DATA/catalog.csv" | cut -d, -f1 | tr -d '"')  # the catalogue quotes its strings
export PORT
if $PY -c "import socket,sys; s=socket.socket(); sys.exit(0 if s.connect_ex(('127.0.0.1', int(sys.argv[1]))) == 0 else 1)" "$PORT"; then
  echo "error: port $PORT is already in use; run with another, e.g. PORT=8001 make demo" >&2
  exit 1
fi
.venv/bin/gunicorn -c gunicorn.conf.py 'app:create_app()' &
GUNICORN=$!
trap 'kill $GUNICORN 2>/dev/null' INT TERM EXIT
ready=""
for _ in $(seq 150); do
  kill -0 $GUNICORN 2>/dev/null || { echo "error: gunicorn exited; see the log above" >&2; exit 1; }
  if curl -fs "http://localhost:$PORT/readyz" >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.2
done
[ -n "$ready" ] || { echo "error: the service did not become ready in 30 s" >&2; exit 1; }
cat <<MSG

The service is up on port $PORT. Try:

  curl 'http://localhost:$PORT/recommend?user=$USER_ID&k=5'

Post a viewing (writes need the token in EVENTS_TOKEN, kept in var/events-token):

  curl -X POST 'http://localhost:$PORT/events' -H "Authorization: Bearer \$(cat var/events-token)" \\
       -H 'Content-Type: application/json' \\
       -d '{"user_id": "$USER_ID", "item_id": "$ITEM_ID", "timestamp": '\$(date +%s)', "watch_seconds": 1500}'

Press Ctrl-C to stop.
MSG
wait $GUNICORN
