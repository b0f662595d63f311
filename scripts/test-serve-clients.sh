#!/usr/bin/env bash
# `flux2 serve` against real clients: the official `openai` Python package (pinned, installed into
# a local venv under target/) and plain curl, on the tiny fixture pipeline. Needs the release
# binary (scripts/test.sh builds it) and PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
OPENAI_VERSION=3.57.0
VENV=target/serve-clients-venv
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$OPENAI_VERSION')"; then
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "openai==$OPENAI_VERSION"
fi
BIN=target/release/flux2
WORK=$(mktemp -d)
LOG="$WORK/server.log"
FLUX2_CACHE_DIR="$WORK/cache" "$BIN" serve --model tests/fixtures/pipeline --device cpu --port 0 >"$WORK/stdout" 2>"$LOG" &
PID=$!
cleanup() { kill "$PID" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
for _ in $(seq 1 300); do
    URL=$(sed -n 's/^flux2 serve: listening on //p' "$WORK/stdout")
    [ -n "$URL" ] && break
    kill -0 "$PID" 2>/dev/null || { cat "$LOG"; echo "the server did not start"; exit 1; }
    sleep 0.1
done
[ -n "$URL" ] || { echo "the server printed no address"; exit 1; }
echo "server: $URL"

# A 64x64 reference image.
"$VENV/bin/python" - "$WORK/ref.png" <<'PY'
import struct, sys, zlib
w = h = 64
raw = b"".join(b"\x00" + bytes((x * 4 + y) % 256 for x in range(w) for _ in range(3)) for y in range(h))
chunk = lambda t, d: struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)
png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
open(sys.argv[1], "wb").write(png)
PY

"$VENV/bin/python" scripts/serve/openai_client_check.py "$URL" "$WORK/ref.png"

# curl: a generation, an edit, an error.
curl -sS -f "$URL/v1/images/generations" -H 'content-type: application/json' \
    -d '{"prompt": "a red fox", "size": "32x32", "seed": 7}' | "$VENV/bin/python" -c \
    'import json, sys, base64; r = json.load(sys.stdin); assert r["seeds"] == [7]; assert base64.b64decode(r["data"][0]["b64_json"])[:4] == b"\x89PNG"'
echo "curl: generation ok"
curl -sS -f "$URL/v1/images/edits" -F prompt="a red fox" -F seed=3 -F "image[]=@$WORK/ref.png" | "$VENV/bin/python" -c \
    'import json, sys; r = json.load(sys.stdin); assert len(r["data"]) == 1'
echo "curl: edit ok"
STATUS=$(curl -sS -o /dev/null -w '%{http_code}' "$URL/v1/images/generations" -d '{"prompt": "x", "n": 0}')
[ "$STATUS" = 400 ] || { echo "curl: expected 400, got $STATUS"; exit 1; }
echo "curl: bad request answered 400 ok"

kill -TERM "$PID"
wait "$PID" || { echo "the server did not exit 0 after SIGTERM"; exit 1; }
echo "server: exited 0 after SIGTERM"
