#!/usr/bin/env bash
# A real Slurm cluster on this one machine, for CI and for trying the templates.
#
#   slurm/local_cluster.sh up              install (Debian: slurmctld slurmd slurm-client munge) if needed,
#                                          write the config, start munged + slurmctld + the slurmd(s),
#                                          wait until every node is idle, print `export SLURM_CONF=...`
#   eval "$(slurm/local_cluster.sh env)"   export SLURM_CONF for the client commands (sbatch, squeue, ...)
#   slurm/local_cluster.sh wait JOBID [S]  poll until the job ends; exit 0 iff it COMPLETED with 0:0
#   slurm/local_cluster.sh status | down | purge
#
# Knobs (environment):
#   FLIP_SLURM_DIR       everything lives here: etc/ state/ run/ log/ munge/  (default /tmp/flip-ds-slurm)
#   FLIP_SLURM_NODES     1 or 2 slurmd "nodes" on this host, named $(hostname) and localhost (default 2)
#   FLIP_SLURM_CPUS      CPUs each node advertises; may exceed the real cores          (default 8)
#   FLIP_SLURM_PORT      slurmctld port; the slurmd use PORT+1 and PORT+2             (default 6817)
#   FLIP_SLURM_KILLWAIT  seconds between SIGTERM and SIGKILL on cancel or time limit  (default 10)
#
# Runs as root without systemd or cgroups (proctrack/linuxproc, task/none), so it works in containers
# and VMs alike. Daemons are started with setsid and stopped by the PIDs in their pid files, only
# when /proc shows they were started with this directory's config.
set -euo pipefail

DIR=${FLIP_SLURM_DIR:-/tmp/flip-ds-slurm}
NODES=${FLIP_SLURM_NODES:-2}
CPUS=${FLIP_SLURM_CPUS:-8}
PORT=${FLIP_SLURM_PORT:-6817}
KILLWAIT=${FLIP_SLURM_KILLWAIT:-10}
case "$DIR" in /?*) DIR=${DIR%/} ;; *) echo "FLIP_SLURM_DIR must be an absolute path" >&2; exit 2 ;; esac
CONF=$DIR/etc/slurm.conf
SOCK=$DIR/munge/munge.socket.2
export SLURM_CONF=$CONF
HOST=$(uname -n)
HOST=${HOST%%.*}

log() { printf '[local_cluster %s] %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

node_names() {
  case "$NODES" in
    1) echo "$HOST" ;;
    # Both names must resolve: the first node of an allocation becomes MASTER_ADDR.
    2) [ "$HOST" != localhost ] || die "hostname is 'localhost'; two nodes need a second name that resolves"
       echo "$HOST localhost" ;;
    *) die "FLIP_SLURM_NODES must be 1 or 2 (more nodes need more names that resolve to this host)" ;;
  esac
}

# The PID in a pid file, if that process lives and was started with our directory on its command line.
our_pid() {
  local pid
  pid=$(cat "$1" 2>/dev/null) || return 1
  [ -n "$pid" ] && [ -r "/proc/$pid/cmdline" ] || return 1
  local cmd
  cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null) || return 1
  [[ "$cmd" == *"$DIR/"* ]] || return 1
  echo "$pid"
}

# Alive and not a zombie: an exited daemon stays a zombie until init reaps it, and kill -0 succeeds on it.
alive() {
  local state
  state=$(sed -n 's/^.*) \([A-Za-z]\).*/\1/p' "/proc/$1/stat" 2>/dev/null) && [ -n "$state" ] && [ "$state" != Z ]
}

stop_pidfile() {
  local name=$1 file=$2 pid
  pid=$(our_pid "$file") || { rm -f "$file"; return 0; }
  log "stopping $name (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 50); do alive "$pid" || break; sleep 0.1; done
  if alive "$pid"; then log "$name ignored SIGTERM for 5 s; SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
  rm -f "$file"
}

install_packages() {
  local missing=0 cmd
  for cmd in munged mungekey slurmctld slurmd sbatch srun scontrol sinfo; do
    command -v "$cmd" >/dev/null || missing=1
  done
  # `slurmd -V`, not `sbatch --version`: clients read SLURM_CONF first and retry for 60 s while it is missing.
  [ "$missing" = 1 ] || { log "packages present: $(slurmd -V)"; return 0; }
  [ "$(id -u)" = 0 ] || die "installing Slurm needs root (apt-get)"
  command -v apt-get >/dev/null || die "no apt-get: install slurmctld, slurmd, slurm-client and munge yourself"
  # Keep the packages' init scripts from starting system-wide daemons during the install.
  local policy_added=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d && policy_added=1
  fi
  log "apt-get install slurmctld slurmd slurm-client munge"
  local ok=1
  DEBIAN_FRONTEND=noninteractive apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      slurmctld slurmd slurm-client munge >/dev/null || ok=0
  [ "$policy_added" = 0 ] || rm -f /usr/sbin/policy-rc.d
  [ "$ok" = 1 ] || die "apt-get install failed"
  log "installed $(slurmd -V)"
}

write_config() {
  local names i mem
  read -r -a names <<<"$(node_names)"
  mem=$(awk -v n="$NODES" '/MemTotal/ {printf "%d", $2 / 1024 * 0.8 / n}' /proc/meminfo)
  {
    cat <<EOF
# written by slurm/local_cluster.sh
ClusterName=flipds
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire: a requeued job may start again this many seconds (+1) after its requeue (default 120)
AuthInfo=socket=$SOCK,cred_expire=10
SlurmctldPort=$PORT
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/slurmd-%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
# no cgroups: processes are tracked through /proc, tasks are not confined
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
# finished jobs stay visible to 'scontrol show job' for an hour (there is no sacct without slurmdbd)
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
MinJobAge=3600
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# start jobs as soon as they are submitted (the default waits up to 3 s) or become eligible
# (a requeued job's BeginTime passes; the default pass over pending jobs runs every 60 s)
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=2
# a dependency that can never be satisfied cancels the dependant instead of leaving it pending
DependencyParameters=kill_invalid_depend
# reject at submission what the partition can never run, instead of pending forever
EnforcePartLimits=ALL
JobRequeue=1
MpiDefault=none
ReturnToService=2
KillWait=$KILLWAIT
MailProg=/bin/true
# trust the CPU counts below even where they exceed the real cores
SlurmdParameters=config_overrides
EOF
    for i in "${!names[@]}"; do
      echo "NodeName=${names[$i]} NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + 1 + i)) CPUs=$CPUS" \
        "Boards=1 SocketsPerBoard=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=$(IFS=,; echo "${names[*]}") Default=YES MaxTime=INFINITE State=UP"
  } >"$CONF"
}

wait_until() {  # wait_until SECONDS WHAT COMMAND...
  local seconds=$1 what=$2
  shift 2
  for _ in $(seq $((seconds * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  log "gave up after ${seconds} s waiting for $what"
  return 1
}

nodes_idle() {
  local states
  states=$(sinfo -h -N -o '%T' 2>/dev/null) || return 1
  [ -n "$states" ] && ! grep -qv '^idle$' <<<"$states"
}

daemons_running() {
  our_pid "$DIR/run/munged.pid" >/dev/null && our_pid "$DIR/run/slurmctld.pid" >/dev/null || return 1
  local n
  for n in $(node_names); do our_pid "$DIR/run/slurmd-$n.pid" >/dev/null || return 1; done
  scontrol ping 2>/dev/null | grep -q UP
}

show_logs() {
  local f
  for f in "$DIR"/log/*; do [ -f "$f" ] && { echo "==== $f"; tail -n 30 "$f"; }; done >&2
}

port_in_use() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }

up() {
  [ "$(id -u)" = 0 ] || die "run as root (the daemons run as root here)"
  local t0=$SECONDS n p
  install_packages
  if daemons_running; then log "already up"; echo "export SLURM_CONF=$CONF"; return 0; fi
  down
  rm -rf "${DIR:?}/etc" "${DIR:?}/state" "${DIR:?}/run" "${DIR:?}/log"  # fresh state: job ids start at 1
  mkdir -p "$DIR"/{etc,state/ctld,run,log,munge}
  for n in $(node_names); do mkdir -p "$DIR/state/slurmd-$n"; done  # slurmd does not create its own spool
  chmod 755 "$DIR" "$DIR/munge"
  [ -s "$DIR/munge/munge.key" ] || mungekey --create --keyfile="$DIR/munge/munge.key"
  chmod 600 "$DIR/munge/munge.key"
  write_config
  for p in $(seq "$PORT" $((PORT + NODES))); do
    ! port_in_use "$p" || die "TCP port $p is in use (another cluster? set FLIP_SLURM_PORT)"
  done

  rm -f "$SOCK"
  setsid munged --foreground --socket="$SOCK" --key-file="$DIR/munge/munge.key" --pid-file="$DIR/run/munged.pid" \
    --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/munged.seed" </dev/null >"$DIR/log/munged.out" 2>&1 &
  wait_until 10 munged bash -c "munge -S '$SOCK' -n | unmunge -S '$SOCK'" || { show_logs; die "munged did not start"; }
  setsid slurmctld -D -f "$CONF" </dev/null >"$DIR/log/slurmctld.out" 2>&1 &
  wait_until 30 slurmctld bash -c "scontrol ping | grep -q UP" || { show_logs; die "slurmctld did not start"; }
  for n in $(node_names); do
    setsid slurmd -D -N "$n" -f "$CONF" </dev/null >"$DIR/log/slurmd-$n.out" 2>&1 &
  done
  wait_until 30 "idle nodes" nodes_idle || { sinfo -N >&2 || true; show_logs; die "nodes did not become idle"; }
  sinfo -N >&2
  log "up in $((SECONDS - t0)) s"
  echo "export SLURM_CONF=$CONF"
}

down() {
  local f ids
  if our_pid "$DIR/run/slurmctld.pid" >/dev/null; then
    ids=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ') || true
    if [ -n "${ids// /}" ]; then
      log "cancelling jobs $ids"
      # shellcheck disable=SC2086
      scancel $ids 2>/dev/null || true
      # shellcheck disable=SC2016
      wait_until $((KILLWAIT + 20)) "jobs to end" bash -c '[ -z "$(squeue -h 2>/dev/null)" ]' || true
    fi
  fi
  for f in "$DIR"/run/slurmd-*.pid; do
    [ -e "$f" ] || continue
    n=${f##*/slurmd-}
    stop_pidfile "slurmd ${n%.pid}" "$f"
  done
  stop_pidfile slurmctld "$DIR/run/slurmctld.pid"
  stop_pidfile munged "$DIR/run/munged.pid"
}

# Finished jobs stay in slurmctld's memory for MinJobAge; poll every 0.2 s (sbatch --wait polls every 2-10 s).
wait_job() {
  local job=$1 seconds=${2:-300} line
  for _ in $(seq $((seconds * 5))); do
    line=$(scontrol -o show job "$job" 2>/dev/null) || die "no job $job"
    case "$line" in
      *JobState=PENDING* | *JobState=RUNNING* | *JobState=COMPLETING* | *JobState=CONFIGURING* | \
        *JobState=REQUEUE* | *JobState=SUSPENDED*) sleep 0.2 ;;
      *) grep -oE 'JobState=[A-Z_]+|ExitCode=[0-9:]+' <<<"$line" | tr '\n' ' ' >&2; echo >&2
         [[ "$line" == *JobState=COMPLETED* && "$line" == *ExitCode=0:0* ]]
         return ;;
    esac
  done
  log "job $job has not ended after ${seconds} s"
  return 1
}

need_config() { [ -f "$CONF" ] || die "$CONF does not exist: run '$0 up' first (same FLIP_SLURM_DIR)"; }

case "${1:-}" in
  up) up ;;
  down) down; log "down" ;;
  purge) down; rm -rf "${DIR:?}"; log "removed $DIR" ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  status) need_config
          for f in "$DIR"/run/*.pid; do [ -e "$f" ] && printf '%-20s %s\n' "${f##*/}" "$(our_pid "$f" || echo 'not running')"; done
          sinfo -N && squeue ;;
  wait) need_config; [ -n "${2:-}" ] || die "usage: $0 wait JOBID [SECONDS]"; wait_job "$2" "${3:-300}" ;;
  *) echo "usage: $0 up | env | status | wait JOBID [SECONDS] | down | purge" >&2; exit 2 ;;
esac
