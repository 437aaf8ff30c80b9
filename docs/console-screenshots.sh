#!/usr/bin/env bash
# Makes the console screenshots under docs/ from a simulated daemon:
#   docs/console-screenshots.sh target/debug/infinitetalk-batch docs
set -euo pipefail
BIN=$1; OUT=$2; PORT=18701
W=$(mktemp -d); mkdir -p $W/inbox
python3 - "$W" <<'PY'
import sys
w=sys.argv[1]
def man(name, n, fail_every, secs):
    with open(f"{w}/{name}.tmp","w") as f:
        f.write("id,image_url,audio_url,resolution\n")
        for i in range(n):
            tail = "&sim_fail=CONTENT_VIOLATION" if fail_every and i % fail_every == 3 else ""
            f.write(f"{name}-{i:05d},https://cdn.example/portraits/{i}.png,https://cdn.example/voice/{i}.mp3?sim_audio_seconds={secs}{tail},480p\n")
man("spring-campaign", 3000, 40, 8)
man("product-demos", 400, 0, 5)
with open(f"{w}/broken.tmp","w") as f:
    f.write("id,image_url,audio_url\nok-1,https://cdn.example/a.png,https://cdn.example/a.mp3\nbad 2,ftp://cdn.example/b.png,https://cdn.example/b.ogg\n,https://cdn.example/c.png,\n")
PY
$BIN run --simulate --inbox $W/inbox --outbox $W/outbox --state $W/state --listen 127.0.0.1:$PORT --max-concurrent 300 > $W/log 2>&1 &
PID=$!
sleep 2
mv $W/product-demos.tmp $W/inbox/product-demos.csv
sleep 2
mv $W/spring-campaign.tmp $W/inbox/spring-campaign.csv
mv $W/broken.tmp $W/inbox/broken.csv
sleep 25
TOKEN=$(cat $W/state/admin-token)
curl -s -X POST -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' -d '{"priority":"high"}' http://127.0.0.1:$PORT/batches/spring-campaign/priority >/dev/null
sleep 3
shot() { timeout 60 chromium --headless=new --no-sandbox --disable-gpu --hide-scrollbars "$@" 2>/dev/null; }
shot --window-size=1280,800 --screenshot=$OUT/console-overview.png http://127.0.0.1:$PORT/
shot --window-size=1280,800 --screenshot=$OUT/console-batch.png "http://127.0.0.1:$PORT/batches/spring-campaign?state=failed"
ROW=$(curl -s "http://127.0.0.1:$PORT/batches/product-demos?state=done" | grep -o 'data-row-id="[^"]*"' | head -1 | cut -d'"' -f2)
shot --window-size=1280,800 --screenshot=$OUT/console-row.png "http://127.0.0.1:$PORT/batches/product-demos/rows/$ROW"
shot --window-size=390,844 --force-dark-mode --blink-settings=preferredColorScheme=0 --screenshot=$OUT/console-phone-dark.png http://127.0.0.1:$PORT/
kill $PID; wait $PID || true
rm -rf $W
