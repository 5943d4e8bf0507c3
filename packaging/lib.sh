# Shell helpers shared by packaging/check-* (sourced, not run). Bash only.
#
# Every process started here is recorded and killed by `lib_cleanup` (call it from an EXIT
# trap), by its own pid, so a failing check never leaves a gateway or relay behind.

LIB_PIDS=()

log() { printf '==> %s\n' "$*" >&2; }
die() { printf '%s: FAILED: %s\n' "${0##*/}" "$*" >&2; exit 1; }

lib_cleanup() {
  local p
  for p in "${LIB_PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${LIB_PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$p" 2>/dev/null || true
  done
  LIB_PIDS=()
}

# A TCP port on 127.0.0.1 that nothing listens on now (random, so parallel runs coexist).
free_port() {
  local p
  for _ in $(seq 200); do
    p=$(( 20000 + RANDOM % 40000 ))
    # Nothing accepts a connection there (bash's /dev/tcp: no iproute2 needed).
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
  die "no free TCP port found"
}

# start_bg NAME LOGFILE CMD... : starts CMD in the background; sets BG_PID.
start_bg() {
  local name="$1" logf="$2"; shift 2
  "$@" >"$logf" 2>&1 &
  BG_PID=$!
  LIB_PIDS+=("$BG_PID")
  log "started $name (pid $BG_PID): $*"
}

# wait_http NAME PID URL SECONDS LOGFILE: waits for URL to answer 200 while PID lives.
# A process that dies or never answers fails the check loudly, with the end of its log.
wait_http() {
  local name="$1" pid="$2" url="$3" secs="$4" logf="$5" t0=$SECONDS
  while (( SECONDS - t0 < secs )); do
    if ! kill -0 "$pid" 2>/dev/null; then
      wait "$pid" 2>/dev/null; local rc=$?
      printf -- '--- last lines of %s ---\n' "$logf" >&2; tail -n 30 "$logf" >&2
      die "$name exited (status $rc) before serving $url: the binary does not start"
    fi
    if [ "$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url" 2>/dev/null)" = 200 ]; then
      log "$name answers on $url after $(( SECONDS - t0 )) s"
      return 0
    fi
    sleep 0.3
  done
  printf -- '--- last lines of %s ---\n' "$logf" >&2; tail -n 30 "$logf" >&2
  die "$name did not answer $url within $secs s"
}

# stop_pid NAME PID SECONDS: SIGTERM and wait; fails if it does not exit 0 in time.
stop_pid() {
  local name="$1" pid="$2" secs="$3" rc
  kill -TERM "$pid" 2>/dev/null || die "$name (pid $pid) is not running"
  for _ in $(seq $(( secs * 10 ))); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  if kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid"; die "$name did not stop within $secs s of SIGTERM"; fi
  wait "$pid" 2>/dev/null && rc=0 || rc=$?
  local keep=() p; for p in "${LIB_PIDS[@]}"; do [ "$p" = "$pid" ] || keep+=("$p"); done
  LIB_PIDS=("${keep[@]}")
  [ "$rc" = 0 ] || die "$name exited with status $rc after SIGTERM"
}

# rss_kb PID: resident set size in KiB (for a qemu-user process: emulator + guest).
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status" 2>/dev/null || echo 0; }

# punches_json DEVICE FROM TO: a JSON array of punches with seq FROM..TO.
punches_json() {
  local dev="$1" from="$2" to="$3" i sep=""
  printf '['
  for (( i = from; i <= to; i++ )); do
    printf '%s{"device_id":"%s","seq":%d,"subject":"EMP-%04d","kind":"%s","verify":"card","time":"2026-11-22T07:%02d:%02d+02:00"}' \
      "$sep" "$dev" "$i" "$(( i % 50 ))" "$([ $(( i % 2 )) = 0 ] && echo in || echo out)" "$(( i / 60 % 60 ))" "$(( i % 60 ))"
    sep=","
  done
  printf ']'
}

# --- systemd SystemCallFilter= ------------------------------------------------------------
expand() { # ITEM -> syscall names, one a line (groups recursively)
  if [[ "$1" == @* ]]; then
    systemd-analyze syscall-filter "$1" 2>/dev/null | sed -n '2,$p' | sed 's/#.*//' | tr -s ' \t' '\n' | grep . |
      while read -r item; do expand "$item"; done
  else
    echo "$1"
  fi
}
allowed_by_unit() { # UNIT -> the syscalls its SystemCallFilter= lines allow
  local set="" line neg items item
  while IFS= read -r line; do
    line="${line#SystemCallFilter=}"; neg=0
    [[ "$line" == "~"* ]] && { neg=1; line="${line#\~}"; }
    items="$(for item in $line; do expand "$item"; done | sort -u)"
    if [ "$neg" = 0 ]; then set="$(printf '%s\n%s\n' "$set" "$items" | grep . | sort -u)"
    else set="$(comm -23 <(printf '%s\n' "$set") <(printf '%s\n' "$items"))"; fi
  done < <(grep '^SystemCallFilter=' "$1")
  printf '%s\n' "$set"
}

# denied_syscalls UNITFILE NAMES_FILE: the names (one a line) the unit's filter refuses.
denied_syscalls() {
  comm -23 <(sort -u "$2") <(allowed_by_unit "$1")
}
