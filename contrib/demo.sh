#!/usr/bin/env bash
# The main job, end to end on a fresh machine: set up, create a demo volume,
# mount it, use it like any disk, travel back in time (an @ path, log, diff,
# bookmark, restore, a snapshot mount, a tar of a past moment), ship it to a local replica and read the
# replica while it receives, DR-test the replica, back it up and rebuild a lost
# primary from the backup, fail over between two high-availability nodes on
# a 3-member etcd, unmount, remount, verify the store.
set -euo pipefail
cd "$(dirname "$0")/.."
bash contrib/setup.sh
CDPFS="$PWD/.venv/bin/cdpfs"
DEMO=${CDPFS_DEMO_DIR:-/var/tmp/cdpfs-demo}
STORE="$DEMO/store"
MNT="$DEMO/mnt"

for m in "$MNT" "$DEMO/replica-view" "$DEMO/snap" "$DEMO/ha/a.mnt" "$DEMO/ha/b.mnt"; do
  if mountpoint -q "$m" 2>/dev/null; then "$CDPFS" umount "$m"; fi
done
rm -rf "$DEMO"
mkdir -p "$MNT"

step() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

step "create a store and mount it"
"$CDPFS" init "$STORE"
"$CDPFS" mount "$STORE" "$MNT"
trap '"$CDPFS" umount "$MNT" 2>/dev/null || true' EXIT

step "use it like any disk"
echo "hello, cdpfs" > "$MNT/hello.txt"
mkdir -p "$MNT/docs"
cp -r /usr/share/doc/git "$MNT/docs/" 2>/dev/null || cp -r /etc/apt "$MNT/docs/"
dd if=/dev/urandom of="$MNT/random.bin" bs=1M count=16 status=none
sqlite3 "$MNT/app.db" "create table t(x); insert into t values (1),(2),(3);"
ls -la "$MNT"   # history is not listed (it is there when named: see below)
"$CDPFS" sync "$MNT"   # durable now, as fsync makes one file (sync(1) alone does not reach a FUSE mount)
echo "files: $(find "$MNT" -type f | wc -l), bytes: $(du -sb "$MNT" | cut -f1)"
sum_before=$(sha256sum "$MNT/random.bin" | cut -d' ' -f1)

step "unmount, mount again: everything is still there"
"$CDPFS" umount "$MNT"
"$CDPFS" mount "$STORE" "$MNT"
cat "$MNT/hello.txt"
sqlite3 "$MNT/app.db" "select count(*) from t;"
[ "$(sha256sum "$MNT/random.bin" | cut -d' ' -f1)" = "$sum_before" ] && echo "random.bin: same sha256"

step "time travel: every write is kept"
echo "version 1" > "$MNT/notes.txt"; sleep 0.1
T1=$(date +%Y-%m-%dT%H:%M:%S.%N); sleep 1
echo "version 2" > "$MNT/notes.txt"; sleep 1.1
echo "version 3, oops" > "$MNT/notes.txt"
echo "now:           $(cat "$MNT/notes.txt")"
echo "@-1s:          $(cat "$MNT/@-1s/notes.txt")"
echo "@-2s:          $(cat "$MNT/@-2s/notes.txt")"
"$CDPFS" log "$MNT/notes.txt"
"$CDPFS" bookmark before-cleanup --volume "$MNT"
rm -rf "$MNT/docs" "$MNT/hello.txt"
echo "after rm -rf:  $(ls "$MNT" | tr '\n' ' ')"
"$CDPFS" diff before-cleanup now "$MNT" | tail -3
"$CDPFS" restore "$MNT/docs" --at before-cleanup
"$CDPFS" restore "$MNT/hello.txt" --at before-cleanup
echo "restored:      $(cat "$MNT/hello.txt"), $(find "$MNT/docs" -type f | wc -l) files in docs"
mkdir -p "$DEMO/snap"
"$CDPFS" mount --at "$T1" "$STORE" "$DEMO/snap"
echo "snapshot mount of $T1 (read-only, beside the live one): $(cat "$DEMO/snap/notes.txt")"
"$CDPFS" umount "$DEMO/snap"
"$CDPFS" export "$MNT" --at before-cleanup -o "$DEMO/before-cleanup.tar"   # a past moment as a tar
tar -tvf "$DEMO/before-cleanup.tar" | head -5 || true
# the whole history as a stream (a file, or piped to another machine), then an increment
"$CDPFS" send "$MNT" --to before-cleanup -o "$DEMO/vol.full"
"$CDPFS" receive "$DEMO/copy.store" -i "$DEMO/vol.full"
"$CDPFS" send "$STORE" --from before-cleanup | "$CDPFS" receive "$DEMO/copy.store"
"$CDPFS" verify --compare "$STORE" "$DEMO/copy.store"
"$CDPFS" stat "$MNT"

step "a local replica: every change shipped, over TLS, as it happens"
REPLICA="$DEMO/replica"
PORT=${CDPFS_DEMO_PORT:-7390}
"$CDPFS" replica keygen "$STORE" --name primary >/dev/null
"$CDPFS" replica keygen "$REPLICA" --name replica >/dev/null
"$CDPFS" replica trust "$STORE" "$REPLICA/tls/node.crt" --name replica
"$CDPFS" replica trust "$REPLICA" "$STORE/tls/node.crt" --name primary
"$CDPFS" replica serve "$REPLICA" --listen "127.0.0.1:$PORT" 2>"$DEMO/replica.log" &
SERVE=$!
VIEW="$DEMO/replica-view"
mkdir -p "$VIEW"
trap '"$CDPFS" umount "$VIEW" 2>/dev/null || true; "$CDPFS" umount "$MNT" 2>/dev/null || true; kill $SERVE 2>/dev/null || true' EXIT
"$CDPFS" replica add "$STORE" replica --address "127.0.0.1:$PORT"
"$CDPFS" assess "$STORE" --since 1h --lag 1s
for _ in $(seq 1 100); do  # the replica store exists once the first changes arrived
  [ -e "$REPLICA/data.mdb" ] && break
  sleep 0.1
done
"$CDPFS" mount --follow "$REPLICA" "$VIEW"  # read-only, shows what arrives
dd if=/dev/urandom of="$MNT/more.bin" bs=1M count=8 status=none
echo "a change made after the replica was added" > "$MNT/late.txt"
"$CDPFS" bookmark replicated --volume "$MNT"
for _ in $(seq 1 100); do  # the mount ships within moments
  "$CDPFS" status "$STORE" | grep -q 'lag 0 records' && break
  sleep 0.2
done
"$CDPFS" status "$STORE" | grep replica
for _ in $(seq 1 50); do  # the following mount shows changes within a second
  [ -e "$VIEW/late.txt" ] && [ -e "$VIEW/@replicated" ] && break
  sleep 0.2
done
echo "on the replica, while it receives: $(cat "$VIEW/late.txt")"
echo "bookmarks travel too: ls $VIEW/@replicated -> $(ls "$VIEW/@replicated" | tr '\n' ' ')"

step "a writable clone of any moment, and a DR test on the live replica"
CLONE="$DEMO/clone"
mkdir -p "$DEMO/clone.mnt"
"$CDPFS" clone "$MNT" "$CLONE" --at before-cleanup   # no copy: well under a second
"$CDPFS" mount "$CLONE" "$DEMO/clone.mnt"
echo "changed on the clone only" > "$DEMO/clone.mnt/hello.txt"
echo "the clone (read-write): $(cat "$DEMO/clone.mnt/hello.txt"); the live volume: $(cat "$MNT/hello.txt")"
"$CDPFS" umount "$DEMO/clone.mnt"
"$CDPFS" stat "$CLONE" > "$DEMO/clone.stat" && head -2 "$DEMO/clone.stat"
"$CDPFS" status "$STORE" | grep "^clone"   # the base holds the clone's moment until it is deleted
"$CDPFS" clone --delete "$CLONE"
sqlite3 "$MNT/app.db" "create table orders(id integer primary key, item text);
  insert into orders(item) values ('disk'), ('tape'), ('cloud');"
"$CDPFS" bookmark with-orders --volume "$MNT"
for _ in $(seq 1 100); do
  "$CDPFS" status "$STORE" | grep -q 'lag 0 records' && break
  sleep 0.2
done
# Clone the replica while it receives, check the database on the clone, drop the clone.
"$CDPFS" replica test "$REPLICA" --scenario contrib/scenarios/sqlite.toml --set DB=app.db \
  --set TEST_QUERY="select count(*) from orders" --primary "$STORE"
"$CDPFS" status "$REPLICA" | grep "dr test"

step "a verified backup taken from the replica, and a lost primary rebuilt from it"
mkdir -p "$DEMO/backups"
"$CDPFS" backup "$REPLICA" --to "$DEMO/backups"   # read back and checked before it counts
"$CDPFS" backups "$DEMO/backups"
"$CDPFS" umount "$VIEW"
"$CDPFS" umount "$MNT"
"$CDPFS" verify --compare "$STORE" "$REPLICA"
kill $SERVE; wait $SERVE 2>/dev/null || true
trap - EXIT
"$CDPFS" rebuild "$DEMO/rebuilt.store" --from "$(ls "$DEMO"/backups/*.cdpfs)"
"$CDPFS" verify --compare "$STORE" "$DEMO/rebuilt.store"   # the same tree at the backup's point

step "high availability: two nodes, a 3-member etcd, the primary killed, then a switchover back"
HA="$DEMO/ha"
mkdir -p "$HA/a.mnt" "$HA/b.mnt"
.venv/bin/python bench/etcdcluster.py "$HA/etcd" > "$HA/etcd.env" 2>"$HA/etcd.log" &
ETCD=$!
for _ in $(seq 1 300); do grep -q ETCD_KEY "$HA/etcd.env" 2>/dev/null && break; sleep 0.1; done
# shellcheck disable=SC1091
. "$HA/etcd.env"
export CDPFS_ETCD="$ETCD_ENDPOINTS" CDPFS_ETCD_CA="$ETCD_CA" CDPFS_ETCD_CERT="$ETCD_CERT" \
       CDPFS_ETCD_KEY="$ETCD_KEY"
"$CDPFS" init "$HA/a.store"
"$CDPFS" ha create demo --volume "$HA/a.store" --ttl 3 --interval 0.5
"$CDPFS" ha join demo a --store "$HA/a.store" --address "127.0.0.1:$((PORT + 1))" --mount "$HA/a.mnt"
"$CDPFS" ha join demo b --store "$HA/b.store" --address "127.0.0.1:$((PORT + 2))" --mount "$HA/b.mnt"
"$CDPFS" -v ha run demo a 2>"$HA/a.log" &
NODE_A=$!
"$CDPFS" -v ha run demo b 2>"$HA/b.log" &
NODE_B=$!
trap 'kill $NODE_A $NODE_B 2>/dev/null || true; sleep 1; kill $ETCD 2>/dev/null || true; "$CDPFS" umount "$HA/a.mnt" 2>/dev/null || true; "$CDPFS" umount "$HA/b.mnt" 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do mountpoint -q "$HA/a.mnt" && break; sleep 0.1; done
for _ in $(seq 1 300); do "$CDPFS" ha status demo | grep -q "b: replica" && break; sleep 0.1; done
"$CDPFS" ha status demo
echo "written on a just before it dies" | dd of="$HA/a.mnt/last-words.txt" conv=fsync status=none
kill -9 $NODE_A; wait $NODE_A 2>/dev/null || true
"$CDPFS" umount "$HA/a.mnt" 2>/dev/null || true  # the dead daemon's mount
KILLED=$(date +%s.%N)
for _ in $(seq 1 300); do mountpoint -q "$HA/b.mnt" && break; sleep 0.05; done
echo "b took over in $(.venv/bin/python -c "print(round($(date +%s.%N) - $KILLED, 1))") s; on b's mount: $(cat "$HA/b.mnt/last-words.txt")"
"$CDPFS" -v ha run demo a 2>>"$HA/a.log" &  # the old primary comes back: a replica of b
NODE_A=$!
for _ in $(seq 1 300); do "$CDPFS" ha status demo | grep -q "a: replica" && break; sleep 0.1; done
for _ in $(seq 1 300); do "$CDPFS" ha status demo | grep -q "a: replica, at #[0-9]* (lag 0" && break; sleep 0.1; done
"$CDPFS" ha status demo
"$CDPFS" ha switchover demo a  # planned: the role goes back to a with nothing lost
for _ in $(seq 1 300); do mountpoint -q "$HA/a.mnt" && break; sleep 0.05; done
echo "on a's mount again: $(cat "$HA/a.mnt/last-words.txt")"
kill $NODE_A $NODE_B; wait $NODE_A $NODE_B 2>/dev/null || true
kill $ETCD; wait $ETCD 2>/dev/null || true
trap - EXIT

step "every write was journaled"
"$CDPFS" status "$STORE"
"$CDPFS" verify "$STORE"

step "watch it: the node API (health, Prometheus metrics, JSON, events) and the web console"
API_PORT=$((PORT + 20))
TOKEN=$(head -c 18 /dev/urandom | base64 | tr -d '/+=')
printf 'admin demo %s\n' "$TOKEN" > "$DEMO/tokens"
chmod 600 "$DEMO/tokens"
"$CDPFS" mount "$STORE" "$MNT" --api "127.0.0.1:$API_PORT" --api-tokens "$DEMO/tokens"
AUTH="Authorization: Bearer $TOKEN"
echo "GET /primary: $(curl -s "http://127.0.0.1:$API_PORT/primary")"
curl -s -H "$AUTH" "http://127.0.0.1:$API_PORT/metrics" | grep -E '^cdpfs_(journal_last_seq|window_seconds|fsync_seconds_count|commits_total) '
curl -s -H "$AUTH" -H 'Content-Type: application/json' -d '{"name": "demo-api"}' \
    "http://127.0.0.1:$API_PORT/api/v1/bookmarks"; echo
sleep 0.5
curl -s -H "$AUTH" "http://127.0.0.1:$API_PORT/api/v1/events?follow=0" | tail -2
"$CDPFS" status "$STORE" --json | head -12
echo "the console: http://127.0.0.1:$API_PORT/ (token in $DEMO/tokens)"

step "mounted for you at $MNT with its API on 127.0.0.1:$API_PORT (unmount with: $CDPFS umount $MNT)"
