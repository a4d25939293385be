#!/usr/bin/env bash
# Two OpenSSH servers on loopback, for the remote tests and CI:  sshd-local.sh start|stop|status|env
#
#   login   the cluster's login node: scepsy runs here over SSH, tunnels end here
#   jump    a bastion in front of it, for ProxyJump
#
# Both are Debian's sshd (openssh-server) on 127.0.0.1, each on a free high port, with generated ed25519 host
# keys and one generated client key (no passphrase) that both accept. Any user can run them: as root they are
# ordinary privilege-separated sshds that admit root by key; as another user sshd runs unprivileged and admits
# only that user.
#
#   state   ${SCEPSY_SSHD_DIR:-/tmp/scepsy-sshd-$(id -u)} (mode 0700):
#             id_ed25519{,.pub}  the client key; authorized_keys holds it
#             known_hosts        both host keys, under [127.0.0.1]:PORT and [ALIAS]:PORT (how OpenSSH and
#                                paramiko look up a host on a port other than 22)
#             ssh_config         Host scepsy-login, scepsy-jump, scepsy-via-jump (login through ProxyJump)
#             login/, jump/      ssh_host_ed25519_key{,.pub}, sshd_config, sshd.pid, sshd.log (LogLevel
#                                DEBUG1: logins, and each forward a server opens, ProxyJump's included)
#   keys are kept across runs; ports are reused when still free; sshd_config, known_hosts and ssh_config are
#   rewritten by every fresh start, and the logs emptied.
#
# start   installs openssh-server when /usr/sbin/sshd is absent and we are root, starts both servers, and proves
#         with OpenSSH's client that each admits the client key (directly and through ProxyJump). With both
#         already up and admitting the key it does nothing.
# stop    stops both servers and their per-connection processes (only processes this script started: found
#         through our pid files and the parent chain, each checked to be sshd with our config). Idempotent.
# status  liveness, ports and a login through each; exit 0 when both admit the client key.
# env     export lines for a shell: eval "$(scripts/sshd-local.sh env)"; then ssh -F "$SCEPSY_SSH_CONFIG" scepsy-login
#
# Environment: SCEPSY_SSHD_DIR (the state directory), SCEPSY_SSHD_TIMEOUT_S (default 10), how long `start`
# waits for a server to listen.
set -euo pipefail
umask 077

readonly DIR=${SCEPSY_SSHD_DIR:-/tmp/scepsy-sshd-$(id -u)}
readonly SSHD=/usr/sbin/sshd
readonly SERVERS=(login jump)
readonly TIMEOUT_S=${SCEPSY_SSHD_TIMEOUT_S:-10}
readonly MARKER="# written by scepsy_hpc scripts/sshd-local.sh; \`start\` rewrites it"
USER_NAME=$(id -un)
readonly USER_NAME

T0=$EPOCHREALTIME

say() { printf 'sshd-local: %s\n' "$*"; }
die() { printf 'sshd-local: error: %s\n' "$*" >&2; exit 1; }
elapsed_s() { awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

config_of() { echo "$DIR/$1/sshd_config"; }
pidfile_of() { echo "$DIR/$1/sshd.pid"; }
logfile_of() { echo "$DIR/$1/sshd.log"; }
port_of() { awk '$1 == "Port" { print $2 }' "$(config_of "$1")" 2>/dev/null || true; }

# --- processes ------------------------------------------------------------------------------------------

# sshd_alive PID: running (a zombie counts as dead: PID 1 in a container may never reap) and an sshd.
sshd_alive() {
  local pid=$1 stat comm
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
  [[ $comm == sshd || $comm == sshd-session ]] || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# our_pid NAME: the PID of NAME's listener when it runs with our config, else nothing. The check on the
# command line keeps a recycled PID (or another sshd) from ever being signalled.
our_pid() {
  local pid
  pid=$(cat "$(pidfile_of "$1")" 2>/dev/null || true)
  sshd_alive "$pid" || return 0
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "-f $(config_of "$1") " || return 0
  echo "$pid"
}

# connection_pids PID: the sshd processes below a listener, one subtree per client connection (sshd-session
# from OpenSSH 9.8 on). sshd retitles them ("sshd: root [priv]", "sshd: root@notty"), so the parent chain is
# what ties them to our listener.
connection_pids() {
  ps -A -o pid= -o ppid= -o comm= | awk -v root="$1" '
    { parent[$1] = $2; comm[$1] = $3 }
    END {
      for (p in parent) {
        if (comm[p] != "sshd" && comm[p] != "sshd-session") continue
        for (q = parent[p]; q > 1 && q in parent; q = parent[q]) if (q == root) { print p; break }
      }
    }'
}

# stop_server NAME: SIGTERM to the listener and its connections, SIGKILL what is left after 5 s.
stop_server() {
  local name=$1 pid p deadline left
  pid=$(our_pid "$name")
  [[ -n $pid ]] || { rm -f "$(pidfile_of "$name")"; return 0; }
  local pids=("$pid")
  while read -r p; do [[ -n $p ]] && pids+=("$p"); done < <(connection_pids "$pid")
  kill -TERM "${pids[@]}" 2>/dev/null || true
  deadline=$(( SECONDS + 5 ))
  while :; do
    left=()
    for p in "${pids[@]}"; do if sshd_alive "$p"; then left+=("$p"); fi; done
    (( ${#left[@]} )) || break
    if (( SECONDS >= deadline )); then
      say "$name: still running after 5 s, sending SIGKILL to ${left[*]}"
      kill -KILL "${left[@]}" 2>/dev/null || true
      sleep 0.2
      break
    fi
    sleep 0.05
  done
  rm -f "$(pidfile_of "$name")"
  say "stopped $name (listener pid $pid, and $(( ${#pids[@]} - 1 )) connection processes)"
}

# --- setup ----------------------------------------------------------------------------------------------

ensure_dir() {
  [[ ! -L $DIR ]] || die "$DIR is a symlink; refusing to use it (set SCEPSY_SSHD_DIR to a directory of yours)"
  mkdir -p "$DIR"
  [[ $(stat -c %u "$DIR") == "$(id -u)" ]] || die "$DIR belongs to uid $(stat -c %u "$DIR"), not to us ($(id -u)); \
set SCEPSY_SSHD_DIR to a directory of yours"
  chmod 700 "$DIR"
  local name
  for name in "${SERVERS[@]}"; do mkdir -p "$DIR/$name"; done
}

ensure_sshd() {
  command -v ssh >/dev/null || die "OpenSSH's client (ssh) is not installed; it proves the servers admit the key. \
Install openssh-client."
  [[ -x $SSHD ]] && return 0
  if (( EUID != 0 )) || ! command -v apt-get >/dev/null; then
    die "$SSHD is absent; install openssh-server (sudo apt-get install openssh-server), or run \`sudo $0 start\`"
  fi
  local log=$DIR/apt.log made_policy=0
  say "installing openssh-server (apt, --no-install-recommends; log: $log)"
  # Its postinst would start the system's sshd on port 22; ours are started by hand below.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    made_policy=1
  fi
  apt-get update >> "$log" 2>&1 || say "apt-get update failed (see $log); installing from the cached lists"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends openssh-server >> "$log" 2>&1; then
    (( made_policy )) && rm -f /usr/sbin/policy-rc.d
    tail -n 25 "$log" >&2
    die "apt-get install openssh-server failed; see $log"
  fi
  (( made_policy )) && rm -f /usr/sbin/policy-rc.d
  say "openssh-server installed at $(elapsed_s) s"
}

ensure_keys() {
  local name
  if [[ ! -s $DIR/id_ed25519 || ! -s $DIR/id_ed25519.pub ]]; then
    rm -f "$DIR/id_ed25519" "$DIR/id_ed25519.pub"
    ssh-keygen -q -t ed25519 -N '' -C "scepsy-sshd-client@$(hostname)" -f "$DIR/id_ed25519"
  fi
  cp "$DIR/id_ed25519.pub" "$DIR/authorized_keys"
  for name in "${SERVERS[@]}"; do
    if [[ ! -s $DIR/$name/ssh_host_ed25519_key || ! -s $DIR/$name/ssh_host_ed25519_key.pub ]]; then
      rm -f "$DIR/$name/ssh_host_ed25519_key" "$DIR/$name/ssh_host_ed25519_key.pub"
      ssh-keygen -q -t ed25519 -N '' -C "scepsy-$name-host" -f "$DIR/$name/ssh_host_ed25519_key"
    fi
  done
}

# free_ports PREFERRED...: one free loopback port per argument, the preferred one when it is still free. All
# are held open together while choosing, so no two come out equal. SO_REUSEADDR as sshd binds: a port whose
# last connections linger in TIME_WAIT is free to it.
free_ports() {
  python3 - "$@" <<'EOF'
import socket, sys
held = []
for want in sys.argv[1:]:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", int(want) if want.isdigit() else 0))
    except OSError:
        s.bind(("127.0.0.1", 0))
    held.append(s)
print(" ".join(str(s.getsockname()[1]) for s in held))
EOF
}

render_sshd_config() {
  local name=$1 port=$2
  cat <<EOF
$MARKER
# The "$name" server of the local SSH test setup: loopback only, key authentication only.
ListenAddress 127.0.0.1
Port $port
HostKey $DIR/$name/ssh_host_ed25519_key
PidFile $(pidfile_of "$name")
AuthorizedKeysFile $DIR/authorized_keys
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
# CI runs as root; as any other user sshd runs unprivileged and admits only that user anyway.
PermitRootLogin prohibit-password
# StrictModes refuses keys below a world-writable directory, and the state directory lives in /tmp.
StrictModes no
AllowTcpForwarding yes
# No external sftp-server binary needed: the remote commands copy files over SFTP.
Subsystem sftp internal-sftp
X11Forwarding no
PrintMotd no
# Accepted forwards (direct-tcpip: ProxyJump, tunnels) are logged only from DEBUG1 on; VERBOSE would hide them.
LogLevel DEBUG1
EOF
}

# host_entry NAME NAMES...: one known_hosts line with NAME's host key under every given name.
host_entry() {
  local name=$1 names
  shift
  names=$(IFS=,; echo "$*")
  printf '%s %s\n' "$names" "$(awk '{ print $1, $2 }' "$DIR/$name/ssh_host_ed25519_key.pub")"
}

render_known_hosts() {
  local login=$1 jump=$2
  host_entry login "[127.0.0.1]:$login" "[scepsy-login]:$login" "[scepsy-via-jump]:$login"
  host_entry jump "[127.0.0.1]:$jump" "[scepsy-jump]:$jump"
}

host_block() {
  local alias=$1 port=$2
  cat <<EOF
Host $alias
  HostName 127.0.0.1
  Port $port
  User $USER_NAME
  IdentityFile $DIR/id_ed25519
  IdentitiesOnly yes
  UserKnownHostsFile $DIR/known_hosts
  GlobalKnownHostsFile /dev/null
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 5
EOF
}

render_ssh_config() {
  local login=$1 jump=$2
  echo "$MARKER"
  host_block scepsy-login "$login"
  echo
  host_block scepsy-jump "$jump"
  echo
  host_block scepsy-via-jump "$login"
  echo "  ProxyJump scepsy-jump"
}

# --- start ----------------------------------------------------------------------------------------------

fail_start() {
  local name
  printf 'sshd-local: error: %s\n' "$1" >&2
  for name in "${SERVERS[@]}"; do
    if [[ -s $(logfile_of "$name") ]]; then
      printf -- '--- last lines of %s ---\n' "$(logfile_of "$name")" >&2
      tail -n 15 "$(logfile_of "$name")" >&2
    fi
  done
  printf -- '---\nsshd-local: state and logs are in %s; "%s stop" stops what was started\n' "$DIR" "$0" >&2
  exit 1
}

# launch NAME: start NAME's sshd with its config; 0 once it listens (sshd writes its pid file only after
# binding), 2 when its port was taken meanwhile, 1 on any other failure.
launch() {
  local name=$1 cfg log pidfile out deadline
  cfg=$(config_of "$name") log=$(logfile_of "$name") pidfile=$(pidfile_of "$name")
  rm -f "$pidfile"
  : > "$log"
  out=$("$SSHD" -t -f "$cfg" 2>&1) || fail_start "$name: sshd -t rejects $cfg: $out"
  # sshd re-executes itself for each connection, so it must be started by its absolute path.
  "$SSHD" -f "$cfg" -E "$log" || fail_start "$name: $SSHD -f $cfg exited $?"
  deadline=$(( EPOCHSECONDS + TIMEOUT_S ))
  until [[ -s $pidfile ]]; do
    if grep -q 'Address already in use' "$log"; then return 2; fi
    if grep -q 'fatal' "$log" || (( EPOCHSECONDS >= deadline )); then return 1; fi
    sleep 0.05
  done
  sshd_alive "$(cat "$pidfile")" || return 1
}

start_servers() {
  local name rc ports
  local -A port=()
  for name in "${SERVERS[@]}"; do
    for _ in 1 2 3; do
      read -r ports < <(free_ports "$(port_of "$name")")
      port[$name]=$ports
      render_sshd_config "$name" "${port[$name]}" > "$(config_of "$name")"
      rc=0
      launch "$name" || rc=$?
      (( rc == 2 )) || break
      say "$name: port ${port[$name]} was taken meanwhile, trying another"
    done
    (( rc == 0 )) || fail_start "$name: sshd did not start listening on 127.0.0.1:${port[$name]} within ${TIMEOUT_S} s"
  done
  render_known_hosts "${port[login]}" "${port[jump]}" > "$DIR/known_hosts"
  render_ssh_config "${port[login]}" "${port[jump]}" > "$DIR/ssh_config"
}

# login_ok ALIAS: OpenSSH's client logs in through the ssh_config and runs `true`; its errors on stderr.
login_ok() { ssh -F "$DIR/ssh_config" -o ConnectTimeout=5 "$1" true 2>&1 >/dev/null < /dev/null; }

both_up() {
  local name
  for name in "${SERVERS[@]}"; do [[ -n $(our_pid "$name") ]] || return 1; done
  [[ -s $DIR/ssh_config && -s $DIR/known_hosts ]]
}

healthy() {
  both_up || return 1
  local alias
  for alias in scepsy-login scepsy-via-jump; do login_ok "$alias" >/dev/null || return 1; done
}

# --- commands -------------------------------------------------------------------------------------------

cmd_start() {
  ensure_dir
  ensure_sshd
  if healthy; then
    say "already up ($(elapsed_s) s): login on 127.0.0.1:$(port_of login), jump on 127.0.0.1:$(port_of jump); state in $DIR"
    return 0
  fi
  local name alias err
  for name in "${SERVERS[@]}"; do stop_server "$name" >/dev/null; done
  # Root's sshd checks for its privilege-separation directory even before it listens.
  if (( EUID == 0 )); then mkdir -p /run/sshd && chmod 755 /run/sshd; fi
  ensure_keys
  start_servers
  for alias in scepsy-login scepsy-via-jump; do
    err=$(login_ok "$alias") || fail_start "\`ssh -F $DIR/ssh_config $alias true\` failed: ${err:-no message}"
  done
  say "up in $(elapsed_s) s: login on 127.0.0.1:$(port_of login), jump on 127.0.0.1:$(port_of jump) \
(ssh -F $DIR/ssh_config scepsy-login | scepsy-jump | scepsy-via-jump)"
}

cmd_stop() {
  local name any=0
  for name in "${SERVERS[@]}"; do [[ -z $(our_pid "$name") ]] || any=1; done
  if (( ! any )); then
    say "nothing to stop (no sshd started by this script is running)"
    return 0
  fi
  for name in "${SERVERS[@]}"; do stop_server "$name"; done
  say "stopped in $(elapsed_s) s (keys and logs stay in $DIR)"
}

cmd_status() {
  local name pid ok=1 alias err
  echo "state: $DIR"
  for name in "${SERVERS[@]}"; do
    pid=$(our_pid "$name")
    if [[ -n $pid ]]; then
      printf '  %-6s running, pid %s, 127.0.0.1:%s, log %s\n' "$name" "$pid" "$(port_of "$name")" "$(logfile_of "$name")"
    else
      printf '  %-6s not running\n' "$name"
      ok=0
    fi
  done
  if (( ok )); then
    for alias in scepsy-login scepsy-via-jump; do
      if err=$(login_ok "$alias"); then
        printf '  %-16s admits the client key\n' "$alias"
      else
        printf '  %-16s login failed: %s\n' "$alias" "${err:-no message}"
        ok=0
      fi
    done
  fi
  if (( ok )); then echo "sshd-local: up"; return 0; fi
  echo "sshd-local: not ready"
  return 1
}

cmd_env() {
  both_up || die "not running; start with: $0 start"
  printf 'export SCEPSY_SSHD_DIR=%q\n' "$DIR"
  printf 'export SCEPSY_SSH_CONFIG=%q\n' "$DIR/ssh_config"
  printf 'export SCEPSY_SSHD_LOGIN_PORT=%s\n' "$(port_of login)"
  printf 'export SCEPSY_SSHD_JUMP_PORT=%s\n' "$(port_of jump)"
}

main() {
  case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    env) cmd_env ;;
    *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
  esac
}

main "$@"
