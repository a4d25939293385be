#!/usr/bin/env bash
# A real Slurm cluster on this host, for the integration tests and CI:  slurm-local.sh start|stop|status
#
# The shape mirrors configs/clusters/local.yaml: cluster scepsy-local, nodes node1..node4 (one slurmd each on
# 127.0.0.1, ports 17001-17004), 4 fake H100s per node (symlinks to /dev/null), partition gpu, topology/tree with
# leaf1 = node[1-2], leaf2 = node[3-4] under spine; accounting through slurmdbd + MariaDB so that sacct works.
# Written for Debian 12 (Slurm 22.05) and hosts without systemd: every daemon is started by hand.
#
#   config  /etc/slurm/{slurm,gres,topology,slurmdbd}.conf  (clients read /etc/slurm/slurm.conf; each file
#           carries the marker below, and a file without it is never overwritten)
#   state   /var/lib/scepsy-slurm   (ctld state, slurmd spools, fake GPU devices, DB password)
#   pids    /run/scepsy-slurm/state (what `start` started; `stop` stops only those)
#   logs    /var/log/scepsy-slurm
#
# start   installs missing packages, renders the config, starts what is not running, waits until every node is
#         idle and sacct answers. With everything up and the config unchanged it does nothing. Otherwise the
#         Slurm daemons are restarted from a wiped state: bad node states (INVAL, DRAIN) persist in the ctld
#         state, and job IDs restart at 1, so the accounting DB is emptied with it. munged and MariaDB are
#         reused when already running, and then left alone by `stop`.
# stop    cancels the jobs, stops what `start` started, waits for it to exit. Packages stay installed.
# status  daemon liveness and sinfo; exit 0 when the controller is up and every node idle, mixed or allocated.
#
# Environment: SCEPSY_SLURM_TIMEOUT_S (default 60), how long `start` waits for the daemons.
set -euo pipefail

readonly CLUSTER=scepsy-local
readonly MARKER="# scepsy-local: written by scepsy_hpc scripts/slurm-local.sh; \`start\` rewrites it"
readonly ETC=/etc/slurm
readonly LIB=/var/lib/scepsy-slurm
readonly RUN=/run/scepsy-slurm
readonly LOG=/var/log/scepsy-slurm
readonly STATE=$RUN/state
readonly NODES=(node1 node2 node3 node4)
readonly NODE_PORT0=17001
readonly GPUS_PER_NODE=4 GPU_TYPE=h100 CPUS_PER_NODE=16 MEM_MB_PER_NODE=64000
readonly CTLD_PORT=6817 DBD_PORT=6819
# Our own database and user, so that a MariaDB we reuse keeps any slurm_acct_db of its own.
readonly DB_NAME=scepsy_local_acct DB_USER=scepsy_slurm
readonly PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
readonly TIMEOUT_S=${SCEPSY_SLURM_TIMEOUT_S:-60}
readonly MARIADB_PIDFILE=/run/mysqld/mysqld.pid

T0=$EPOCHREALTIME
DEADLINE=0
TMP=""
MADE_POLICY=0

say() { printf 'slurm-local: %s\n' "$*"; }
die() { printf 'slurm-local: error: %s\n' "$*" >&2; exit 1; }
elapsed_s() { awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }

cleanup() {
  [[ -n $TMP ]] && rm -rf "$TMP"
  # Only the policy-rc.d this script created; a host's own (Docker images ship one) stays.
  if (( MADE_POLICY )); then rm -f /usr/sbin/policy-rc.d; fi
}
trap cleanup EXIT

need_root() {
  (( EUID == 0 )) || die "\`$1\` needs root: it installs packages, writes $ETC and starts daemons. Run: sudo $0 $1"
}

# --- processes ------------------------------------------------------------------------------------------

# alive PID COMM: running and still the program we started. A zombie counts as dead: when PID 1 does not reap
# (containers, this kind of VM), a killed daemon stays <defunct> and `kill -0` still succeeds.
alive() {
  local pid=$1 comm=$2 stat
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
  stat=${stat##*) }
  [[ ${stat:0:1} != Z ]]
}

# The state file has one "name pid" line per daemon we started; the process name is the part before '@'.
state_pid() { if [[ -r $STATE ]]; then awk -v n="$1" '$1 == n { p = $2 } END { print p }' "$STATE"; fi; }

state_put() {
  mkdir -p "$RUN"
  { if [[ -f $STATE ]]; then awk -v n="$1" '$1 != n' "$STATE"; fi; printf '%s %s\n' "$1" "$2"; } > "$STATE.tmp"
  chmod 644 "$STATE.tmp"
  mv "$STATE.tmp" "$STATE"
}

state_del() {
  if [[ -f $STATE ]]; then awk -v n="$1" '$1 != n' "$STATE" > "$STATE.tmp"; mv "$STATE.tmp" "$STATE"; fi
}

pidfile_of() {
  case $1 in
    munged) echo /run/munge/munged.pid ;;
    slurmd@*) echo "$RUN/slurmd-${1#slurmd@}.pid" ;;
    *) echo "$RUN/$1.pid" ;;
  esac
}

logfile_of() {
  case $1 in
    slurmd@*) echo "$LOG/slurmd-${1#slurmd@}.log" ;;
    mariadbd) echo "$LOG/mariadb.log" ;;
    *) echo "$LOG/$1.log" ;;
  esac
}

# our_pid NAME: the live PID of a daemon we started, else nothing. Slurm daemons are also found through their
# pid files, which live in our private $RUN and so belong to a daemon started with our config.
our_pid() {
  local name=$1 comm=${1%@*} pid
  pid=$(state_pid "$name")
  if alive "$pid" "$comm"; then echo "$pid"; return; fi
  if [[ $comm == slurm* ]]; then
    pid=$(cat "$(pidfile_of "$name")" 2>/dev/null || true)
    if alive "$pid" "$comm"; then echo "$pid"; fi
  fi
}

slurm_names() { local n; for n in "${NODES[@]}"; do echo "slurmd@$n"; done; echo slurmctld; echo slurmdbd; }

# stop_daemons NAME...: SIGTERM to each one we started, wait for all to exit, SIGKILL what is left after 30 s.
stop_daemons() {
  local name pid left deadline
  local -A pids=()
  for name in "$@"; do
    pid=$(our_pid "$name")
    if [[ -n $pid ]]; then pids[$name]=$pid; kill -TERM "$pid" 2>/dev/null || true; fi
  done
  deadline=$(( SECONDS + 30 ))
  while :; do
    left=()
    for name in "${!pids[@]}"; do
      if alive "${pids[$name]}" "${name%@*}"; then left+=("$name"); fi
    done
    (( ${#left[@]} )) || break
    if (( SECONDS >= deadline )); then
      say "still running after 30 s, sending SIGKILL: ${left[*]}"
      for name in "${left[@]}"; do kill -KILL "${pids[$name]}" 2>/dev/null || true; done
      sleep 0.5
      break
    fi
    sleep 0.1
  done
  for name in "${!pids[@]}"; do say "stopped $name (pid ${pids[$name]})"; done
  for name in "$@"; do state_del "$name"; done
}

# Jobs left running would outlive their slurmd (slurmstepd is a separate process) and linger after a restart.
cancel_jobs() {
  ctld_up || return 0
  local ids
  ids=$(timeout 10 squeue -h -o %A 2>/dev/null | tr '\n' ' ') || return 0
  [[ -n ${ids// } ]] || return 0
  say "cancelling jobs: $ids"
  # shellcheck disable=SC2086  # one argument per job ID
  timeout 10 scancel $ids 2>/dev/null || true
  local deadline=$(( SECONDS + 15 ))
  while (( SECONDS < deadline )) && [[ -n $(timeout 10 squeue -h -o %A 2>/dev/null) ]]; do sleep 0.2; done
}

# --- readiness checks -----------------------------------------------------------------------------------

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
mariadb_ok() { mariadb-admin --connect-timeout=2 ping >/dev/null 2>&1; }
ctld_up() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
dbd_up() { timeout 10 sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
# sacct reports a missing slurmdbd on stderr, sometimes with exit 0.
sacct_ok() { local err; err=$(timeout 10 sacct -n -X -o JobID 2>&1 >/dev/null) && [[ -z $err ]]; }

# nodes_in STATE...: sinfo lists exactly our nodes, each in one of the given (compact) states.
nodes_in() {
  local out name st n
  local -A seen=()
  out=$(timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  while read -r name st; do
    [[ -n $name ]] || continue
    [[ " $* " == *" $st "* ]] || return 1
    seen[$name]=1
  done <<< "$out"
  (( ${#seen[@]} == ${#NODES[@]} )) || return 1
  for n in "${NODES[@]}"; do [[ -n ${seen[$n]:-} ]] || return 1; done
}

# wait_for WHAT NAME CMD...: poll CMD until it succeeds; past the deadline, show NAME's log and fail.
wait_for() { say "waiting for $1"; poll "$@"; }

poll() {
  local what=$1 name=$2
  shift 2
  until "$@"; do
    if (( EPOCHSECONDS >= DEADLINE )); then fail_start "timed out after ${TIMEOUT_S} s waiting for $what" "$name"; fi
    sleep 0.2
  done
}

fail_start() {
  local log
  log=$(logfile_of "$2")
  printf 'slurm-local: error: %s\n' "$1" >&2
  if [[ -f $log ]]; then
    printf -- '--- last lines of %s ---\n' "$log" >&2
    tail -n 25 "$log" >&2
    printf -- '---\n' >&2
  fi
  printf 'slurm-local: logs are in %s; "%s stop" stops what was started\n' "$LOG" "$0" >&2
  exit 1
}

# --- packages -------------------------------------------------------------------------------------------

ensure_packages() {
  local p missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  (( ${#missing[@]} )) || return 0
  say "installing ${missing[*]} (apt, --no-install-recommends; log: $LOG/apt.log)"
  # The postinst scripts would start the services; our daemons are started by hand below.
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    MADE_POLICY=1
  fi
  apt-get update >> "$LOG/apt.log" 2>&1 || say "apt-get update failed (see $LOG/apt.log); installing from the cached lists"
  if ! DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}" >> "$LOG/apt.log" 2>&1; then
    tail -n 25 "$LOG/apt.log" >&2
    die "apt-get install ${missing[*]} failed; see $LOG/apt.log"
  fi
  if (( MADE_POLICY )); then rm -f /usr/sbin/policy-rc.d; MADE_POLICY=0; fi
  say "packages installed at $(elapsed_s) s"
}

# --- configuration --------------------------------------------------------------------------------------

refuse_foreign_config() {
  local f
  for f in slurm.conf gres.conf topology.conf slurmdbd.conf; do
    if [[ -e $ETC/$f ]] && ! grep -qF "$MARKER" "$ETC/$f"; then
      die "$ETC/$f exists and was not written by this script (no '# scepsy-local' marker line); refusing to \
overwrite another Slurm setup. Move it aside to use the local test cluster."
    fi
  done
}

db_pass() {
  if [[ ! -s $LIB/dbpass ]]; then
    (umask 077; tr -dc 'A-Za-z0-9' < /dev/urandom | head -c 24 > "$LIB/dbpass")
  fi
  cat "$LIB/dbpass"
}

render_slurm_conf() {
  local i
  cat <<EOF
$MARKER
# The local test cluster of configs/clusters/local.yaml: ${#NODES[@]} nodes x $GPUS_PER_NODE fake ${GPU_TYPE^^}s, one slurmd each.
ClusterName=$CLUSTER
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job may start again cred_expire + 1 s after it ended (121 s by default).
AuthInfo=cred_expire=5
CredType=cred/munge
StateSaveLocation=$LIB/ctld
# %n: one spool, pid and log file per slurmd, as several run on this host.
SlurmdSpoolDir=$LIB/d/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
# Nodes advertise the CPUs and memory written below, not this host's.
SlurmdParameters=config_overrides
# No cgroups, so it runs in any VM or container; memory limits are then not enforced.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStorageTRES=gres/gpu
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
# Schedule a job at once instead of on the default 3 s (batch) and 60 s (main loop) cadence.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1,sched_min_interval=100000
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=$(( MEM_MB_PER_NODE / CPUS_PER_NODE ))
KillWait=5
ReturnToService=2
TopologyPlugin=topology/tree
GresTypes=gpu
NodeName=DEFAULT CPUs=$CPUS_PER_NODE Boards=1 SocketsPerBoard=2 CoresPerSocket=$(( CPUS_PER_NODE / 2 )) ThreadsPerCore=1 RealMemory=$MEM_MB_PER_NODE Gres=gpu:$GPU_TYPE:$GPUS_PER_NODE State=UNKNOWN
EOF
  # NodeHostname/NodeAddr are refused on NodeName=DEFAULT, so every node line repeats them.
  for i in "${!NODES[@]}"; do
    echo "NodeName=${NODES[$i]} NodeHostname=localhost NodeAddr=127.0.0.1 Port=$(( NODE_PORT0 + i ))"
  done
  echo "PartitionName=gpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
}

render_gres_conf() {
  local n
  echo "$MARKER"
  echo "# gres/gpu needs character devices: plain files are rejected and Count= alone leaves the nodes INVAL."
  echo "AutoDetect=off"
  for n in "${NODES[@]}"; do
    echo "NodeName=$n Name=gpu Type=$GPU_TYPE File=$LIB/fakegpu/$n/nvidia[0-$(( GPUS_PER_NODE - 1 ))]"
  done
}

render_topology_conf() {
  echo "$MARKER"
  echo "SwitchName=leaf1 Nodes=node[1-2]"
  echo "SwitchName=leaf2 Nodes=node[3-4]"
  echo "SwitchName=spine Switches=leaf[1-2]"
}

render_slurmdbd_conf() {
  cat <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=$DB_USER
StoragePass=$1
StorageLoc=$DB_NAME
EOF
}

# render_config DIR: the four files into DIR (slurmdbd.conf holds the DB password: mode 600, as slurmdbd demands).
render_config() {
  local dir=$1
  render_slurm_conf > "$dir/slurm.conf"
  render_gres_conf > "$dir/gres.conf"
  render_topology_conf > "$dir/topology.conf"
  (umask 077; render_slurmdbd_conf "$(db_pass)" > "$dir/slurmdbd.conf")
}

config_current() {
  local f
  for f in slurm.conf gres.conf topology.conf slurmdbd.conf; do cmp -s "$TMP/$f" "$ETC/$f" || return 1; done
}

install_config() {
  local f
  mkdir -p "$ETC"
  for f in slurm.conf gres.conf topology.conf; do install -m 644 "$TMP/$f" "$ETC/$f"; done
  install -m 600 "$TMP/slurmdbd.conf" "$ETC/slurmdbd.conf"
}

# A wiped ctld state forgets bad node states and restarts job IDs at 1; each slurmd needs its spool dir.
reset_slurm_state() {
  local n g
  rm -rf "$LIB/ctld" "$LIB/d" "$LIB/fakegpu"
  mkdir -p "$LIB/ctld"
  for n in "${NODES[@]}"; do
    mkdir -p "$LIB/d/$n" "$LIB/fakegpu/$n"
    for (( g = 0; g < GPUS_PER_NODE; g++ )); do ln -sfn /dev/null "$LIB/fakegpu/$n/nvidia$g"; done
  done
}

# --- daemons --------------------------------------------------------------------------------------------

ensure_munge() {
  local pid
  pid=$(our_pid munged)
  if munge_ok; then
    [[ -n $pid ]] && return 0
    say "munged: already running (not started by this script), reusing it"
    return 0
  fi
  [[ -z $pid ]] || stop_daemons munged   # ours, but not answering
  if [[ ! -s /etc/munge/munge.key ]]; then   # the munge postinst normally creates it
    (umask 077; dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none)
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
  fi
  mkdir -p /run/munge
  chown munge:munge /run/munge
  chmod 755 /run/munge
  touch "$LOG/munged.log"
  chown munge:munge "$LOG/munged.log"
  say "starting munged"
  rm -f /run/munge/munged.pid
  runuser -u munge -- /usr/sbin/munged --log-file="$LOG/munged.log" || fail_start "munged did not start" munged
  record_pid munged
  wait_for "munge to answer" munged munge_ok
}

ensure_mariadb() {
  local pid
  pid=$(our_pid mariadbd)
  if mariadb_ok; then
    [[ -n $pid ]] && return 0
    say "MariaDB: already running (not started by this script), reusing it"
    return 0
  fi
  [[ -z $pid ]] || stop_daemons mariadbd   # ours, but not answering
  mkdir -p /run/mysqld
  chown mysql:mysql /run/mysqld
  touch "$LOG/mariadb.log"
  chown mysql:mysql "$LOG/mariadb.log"
  if [[ ! -d /var/lib/mysql/mysql ]]; then   # the mariadb-server postinst normally creates it
    say "initialising /var/lib/mysql"
    mariadb-install-db --user=mysql --datadir=/var/lib/mysql --skip-test-db >> "$LOG/mariadb.log" 2>&1 \
      || fail_start "mariadb-install-db failed" mariadbd
  fi
  say "starting MariaDB"
  # mariadbd stays in the foreground, so $! is its PID: setsid only forks when it leads a process group, and
  # without job control a background command does not.
  setsid /usr/sbin/mariadbd --user=mysql --bind-address=127.0.0.1 --pid-file="$MARIADB_PIDFILE" \
    --log-error="$LOG/mariadb.log" < /dev/null >> "$LOG/mariadb.log" 2>&1 &
  state_put mariadbd "$!"
  wait_for "MariaDB to answer" mariadbd mariadb_ok
}

# An empty accounting DB to go with the wiped ctld state, so sacct never shows two jobs with one ID.
reset_database() {
  local pass
  pass=$(db_pass)
  mariadb --protocol=socket -u root <<EOF || fail_start "could not set up the accounting database $DB_NAME" mariadbd
CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$pass';
ALTER USER '$DB_USER'@'localhost' IDENTIFIED BY '$pass';
DROP DATABASE IF EXISTS $DB_NAME;
CREATE DATABASE $DB_NAME;
GRANT ALL ON $DB_NAME.* TO '$DB_USER'@'localhost';
EOF
}

# record_pid NAME: once the daemon has written its pid file, put the PID in the state file. This comes before
# any wait for the daemon to answer, so that `stop` finds it even when that wait fails.
record_pid() {
  local name=$1 pidfile pid
  pidfile=$(pidfile_of "$name")
  poll "$name to write $pidfile" "$name" test -s "$pidfile"
  pid=$(cat "$pidfile")
  alive "$pid" "${name%@*}" || fail_start "$name exited right after starting" "$name"
  state_put "$name" "$pid"
}

# start_slurm_daemon NAME CMD...: run a self-daemonising Slurm daemon and record its PID.
start_slurm_daemon() {
  local name=$1
  shift
  rm -f "$(pidfile_of "$name")"
  "$@" || fail_start "$name did not start: $*" "$name"
  record_pid "$name"
}

slurm_healthy() {
  local name
  config_current || return 1
  while read -r name; do [[ -n $(our_pid "$name") ]] || return 1; done < <(slurm_names)
  ctld_up && nodes_in idle mix alloc && sacct_ok
}

start_slurm() {
  local n
  # shellcheck disable=SC2046  # one argument per daemon name
  stop_daemons $(slurm_names)
  install_config
  reset_slurm_state
  reset_database
  say "starting slurmdbd"
  start_slurm_daemon slurmdbd /usr/sbin/slurmdbd
  wait_for "slurmdbd to answer" slurmdbd dbd_up
  if ! timeout 10 sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER"; then
    timeout 10 sacctmgr -i -Q add cluster "$CLUSTER" >/dev/null || fail_start "sacctmgr add cluster $CLUSTER failed" slurmdbd
  fi
  say "starting slurmctld"
  start_slurm_daemon slurmctld /usr/sbin/slurmctld
  wait_for "slurmctld to answer (scontrol ping)" slurmctld ctld_up
  say "starting slurmd ${NODES[*]}"
  for n in "${NODES[@]}"; do start_slurm_daemon "slurmd@$n" /usr/sbin/slurmd -N "$n"; done
  wait_for "nodes ${NODES[*]} to be idle (sinfo)" slurmctld nodes_in idle
  wait_for "sacct to answer" slurmdbd sacct_ok
}

# --- commands -------------------------------------------------------------------------------------------

cmd_start() {
  need_root start
  mkdir -p "$LIB" "$RUN" "$LOG"
  chmod 755 "$RUN"
  refuse_foreign_config
  ensure_packages
  DEADLINE=$(( EPOCHSECONDS + TIMEOUT_S ))
  TMP=$(mktemp -d)
  render_config "$TMP"
  ensure_munge
  ensure_mariadb
  if slurm_healthy; then
    say "already up ($(elapsed_s) s): ${#NODES[@]} nodes idle or busy, sacct answers; logs in $LOG"
    return 0
  fi
  start_slurm
  say "cluster $CLUSTER up in $(elapsed_s) s: ${NODES[*]} idle in partition gpu; logs in $LOG"
}

cmd_stop() {
  need_root stop
  local name running=()
  while read -r name; do
    if [[ -n $(our_pid "$name") ]]; then running+=("$name"); fi
  done < <(slurm_names; echo mariadbd; echo munged)
  if (( ${#running[@]} == 0 )); then
    say "nothing to stop (no daemon started by this script is running)"
    rm -f "$STATE"
    return 0
  fi
  cancel_jobs
  # shellcheck disable=SC2046  # one argument per daemon name
  stop_daemons $(slurm_names)
  stop_daemons mariadbd munged
  rm -f "$STATE"
  say "stopped in $(elapsed_s) s (packages stay installed; logs in $LOG)"
}

# describe NAME CHECK: one status line; CHECK tells whether the service answers.
describe() {
  local name=$1 pid
  pid=$(our_pid "$name")
  if [[ -n $pid ]]; then
    printf '  %-14s running, pid %s\n' "$name" "$pid"
  elif [[ -n ${2:-} ]] && "$2"; then
    printf '  %-14s running (not started by this script)\n' "$name"
  else
    printf '  %-14s not running\n' "$name"
  fi
}

cmd_status() {
  local ok=0 name
  if ! command -v sinfo >/dev/null; then
    say "Slurm is not installed here; run: sudo $0 start"
    return 1
  fi
  echo "daemons (state: $STATE, logs: $LOG):"
  describe munged munge_ok
  describe mariadbd mariadb_ok
  while read -r name; do describe "$name"; done < <(slurm_names)
  if ctld_up; then
    echo "controller: $(timeout 10 scontrol ping 2>&1 | head -n1)"
    timeout 10 sinfo -N -o '%N %P %t %G %c %m' 2>&1 || true
    if nodes_in idle mix alloc; then ok=1; fi
  else
    echo "controller: down"
  fi
  if (( ok )); then echo "cluster $CLUSTER: up"; return 0; fi
  echo "cluster $CLUSTER: not ready"
  return 1
}

main() {
  case ${1:-} in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
  esac
}

main "$@"
