#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for the `slurm` tests and for trying the launchers of
# workflows/slurm/ by hand. Everything (config, munge key and socket, state, spool, logs, job
# records) lives in one folder; apart from installing packages, nothing outside it is touched.
#
#   scripts/slurm-local.sh up [DIR]      start munged, slurmctld and slurmd; wait for the node
#   scripts/slurm-local.sh down [DIR]    cancel jobs, stop the daemons and what they started,
#                                        remove DIR (AURORA_SLURM_KEEP=1 keeps it, logs included)
#   scripts/slurm-local.sh status [DIR]  sinfo and squeue of that cluster
#
# DIR defaults to $AURORA_SLURM_DIR or /tmp/aurora-slurm-$UID (keep it short: the munge socket's
# path must fit a Unix socket name). `up` prints the line to use the cluster from a shell (sbatch
# reads SLURM_CONF, the slurm tests AURORA_SLURM_CONF):
#   export SLURM_CONF=DIR/slurm.conf AURORA_SLURM_CONF=DIR/slurm.conf
# As root, `up` installs the Debian packages it lacks (slurmctld slurmd slurm-client munge)
# unless AURORA_SLURM_INSTALL=0. A failed `up` stops what it started and exits non-zero with
# the reason on stderr.
set -euo pipefail

cmd=${1:-}
DIR=${2:-${AURORA_SLURM_DIR:-/tmp/aurora-slurm-$(id -u)}}
CONF=$DIR/slurm.conf
PARTITION=${AURORA_SLURM_PARTITION:-aurora}
PACKAGES=(slurmctld slurmd slurm-client munge)

die() {
  echo "slurm-local: $*" >&2
  exit 1
}

install_packages() {
  local need=()
  command -v munged >/dev/null 2>&1 || need+=(munge)
  command -v slurmctld >/dev/null 2>&1 || need+=(slurmctld)
  command -v slurmd >/dev/null 2>&1 || need+=(slurmd)
  command -v sbatch >/dev/null 2>&1 || need+=(slurm-client)
  [ "${#need[@]}" = 0 ] && return 0
  if [ "${AURORA_SLURM_INSTALL:-1}" = 0 ] || [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null; then
    die "not installed: ${need[*]} (as root on Debian: apt-get install ${PACKAGES[*]})"
  fi
  echo "slurm-local: installing ${need[*]}" >&2
  # The packages' postinst may try to start the system daemons; forbid it, as a container's
  # policy-rc.d does: the daemons run from DIR only.
  local policy=/usr/sbin/policy-rc.d made_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && made_policy=1
  fi
  local rc=0
  (timeout 300 apt-get update -qq && DEBIAN_FRONTEND=noninteractive timeout 300 \
    apt-get install -y -qq --no-install-recommends "${need[@]}") >"$DIR.install.log" 2>&1 || rc=$?
  [ "$made_policy" = 1 ] && rm -f "$policy"
  if [ "$rc" != 0 ]; then
    tail -n 5 "$DIR.install.log" >&2
    die "apt-get install ${need[*]} failed (exit $rc)"
  fi
  rm -f "$DIR.install.log"
}

free_port() {
  python3 - <<'EOF' 2>/dev/null || echo "$1"
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
EOF
}

# PIDs of what this cluster runs: its daemons (munged, slurmctld, slurmd, and the slurmstepd of
# each job, found by the files they hold open in DIR) and the job processes (SLURM_JOB_ID with
# this cluster's SLURM_CONF in their environment). Never this script or its callers.
cluster_pids() {
  local d fd f pid comm ancestors=" " p=$$
  while [ -n "$p" ] && [ "$p" != 0 ]; do
    ancestors+="$p "
    p=$(awk '/^PPid:/ {print $2}' "/proc/$p/status" 2>/dev/null || true)
  done
  {
    for d in /proc/[0-9]*; do
      { read -r comm <"$d/comm"; } 2>/dev/null || continue
      case "$comm" in
        munged | slurmctld | slurmd | slurmstepd | slurmscriptd) ;;
        *) continue ;;
      esac
      for fd in "$d/cwd" "$d"/fd/*; do
        case "$(readlink "$fd" 2>/dev/null)" in "$DIR" | "$DIR"/*)
          echo "${d#/proc/}"
          break
          ;;
        esac
      done
    done
    # grep fails on the processes it may not read (and those that end meanwhile)
    { grep -lzxF "SLURM_CONF=$CONF" /proc/[0-9]*/environ 2>/dev/null || true; } | while read -r f; do
      if grep -qz "^SLURM_JOB_ID=" "$f" 2>/dev/null; then
        pid=${f#/proc/}
        echo "${pid%/environ}"
      fi
    done
  } | while read -r pid; do
    case "$ancestors" in *" $pid "*) ;; *) echo "$pid" ;; esac
  done
  return 0
}

down() {
  if [ -f "$CONF" ] && command -v scancel >/dev/null; then
    # Cancel the jobs first, so that slurmd ends their steps; then wait a little for it.
    SLURM_CONF=$CONF timeout 10 scancel --quiet --full --user="$(id -un)" 2>/dev/null || true
    for _ in $(seq 20); do
      [ -z "$(SLURM_CONF=$CONF timeout 5 squeue -h -o %i 2>/dev/null)" ] && break
      sleep 0.5
    done
  fi
  local pids sig
  for sig in TERM TERM TERM KILL; do
    pids=$(cluster_pids | sort -u | tr '\n' ' ') || pids=
    [ -z "${pids// /}" ] && break
    # shellcheck disable=SC2086
    kill -s "$sig" $pids 2>/dev/null || true
    sleep 1
  done
  pids=$(cluster_pids | sort -u | tr '\n' ' ') || pids=
  [ -n "${pids// /}" ] && echo "slurm-local: still running after SIGKILL: $pids" >&2
  if [ "${AURORA_SLURM_KEEP:-0}" = 1 ]; then
    echo "slurm-local: stopped; kept $DIR" >&2
  elif [ -d "$DIR" ]; then
    rm -rf "$DIR"
  fi
  return 0
}

up() {
  if [ -f "$CONF" ] && SLURM_CONF=$CONF timeout 5 sinfo -h >/dev/null 2>&1; then
    echo "slurm-local: already up in $DIR" >&2
    echo "export SLURM_CONF=$CONF AURORA_SLURM_CONF=$CONF"
    return 0
  fi
  [ -e "$DIR" ] && down
  install_packages
  trap 'rc=$?; [ $rc != 0 ] && { show_logs; AURORA_SLURM_KEEP=0 down; }; exit $rc' EXIT
  trap 'exit 143' TERM INT # a timeout or Ctrl-C also stops what was started
  mkdir -p "$DIR"
  chmod 700 "$DIR"
  mkdir -p "$DIR"/{munge,state,spool,run,log,tmp}
  export SLURM_CONF=$CONF

  # munge: a fresh key and a private socket; slurm.conf's AuthInfo points every client at it.
  mungekey --create --keyfile="$DIR/munge/munge.key" >/dev/null 2>&1 ||
    dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1 count=1024 status=none
  chmod 400 "$DIR/munge/munge.key"
  munged --force --key-file="$DIR/munge/munge.key" --socket="$DIR/munge/munge.socket" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munged.seed" >"$DIR/log/munged.out" 2>&1 ||
    die "munged did not start: $(tail -n 3 "$DIR/log/munged.out" "$DIR/log/munged.log" 2>/dev/null)"

  # The node: this machine's memory and cores, but at least 4 CPUs: batch mode needs three
  # tasks on a node (scheduler, client, a worker), which a 2-core machine then oversubscribes.
  local host node cpus mem user ctld_port slurmd_port
  host=$(hostname -s)
  node=$host
  cpus=${AURORA_SLURM_CPUS:-$(nproc)}
  [ "$cpus" -ge 4 ] || cpus=4
  mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n 1)
  [ -n "$mem" ] || mem=$(awk '/MemTotal/ {print int($2 / 1024)}' /proc/meminfo)
  user=$(id -un)
  ctld_port=$(free_port 16817)
  slurmd_port=$(free_port 16818)
  cat >"$CONF" <<EOF
# Written by scripts/slurm-local.sh: a one-node cluster on $host, all state under $DIR.
ClusterName=aurora-local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
SlurmUser=$user
SlurmdUser=$user
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
TmpFS=$DIR/tmp
# No cgroups in a container: track a job's processes by their parents, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# No slurmdbd: finished jobs go to a text file that \`sacct --completion\` reads.
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/log/jobcomp.txt
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
# The node may declare more CPUs than the machine has (see above).
SlurmdParameters=config_overrides
KillWait=5
MinJobAge=600
NodeName=$node NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=$node Default=YES MaxTime=INFINITE State=UP
EOF

  slurmctld -f "$CONF" -i >"$DIR/log/slurmctld.out" 2>&1 ||
    die "slurmctld did not start: $(tail -n 3 "$DIR/log/slurmctld.log" 2>/dev/null)"
  slurmd -f "$CONF" -N "$node" >"$DIR/log/slurmd.out" 2>&1 ||
    die "slurmd did not start: $(tail -n 3 "$DIR/log/slurmd.log" 2>/dev/null)"

  local state=""
  for _ in $(seq 60); do
    state=$(timeout 5 sinfo -h -N -o %t 2>/dev/null | head -n 1 || true)
    [ "$state" = idle ] && break
    sleep 1
  done
  [ "$state" = idle ] || die "node $node is '${state:-unknown}' after 60 s, not idle"
  # An idle node can still fail to run jobs (slurmd cannot start a step): run one.
  local job
  # shellcheck disable=SC2016 # $SLURMD_NODENAME is the job's
  job=$(cd "$DIR/tmp" && timeout 10 sbatch --parsable --job-name=slurm-local-smoke \
    --output="$DIR/log/smoke.out" --wrap 'echo ran on $SLURMD_NODENAME') || die "sbatch failed"
  for _ in $(seq 300); do
    [ -z "$(timeout 5 squeue -h -j "$job" 2>/dev/null)" ] && break
    sleep 0.2
  done
  grep -q "^ran on $node" "$DIR/log/smoke.out" 2>/dev/null ||
    die "test job $job did not run: $(cat "$DIR/log/smoke.out" 2>/dev/null)"
  trap - EXIT
  echo "slurm-local: up in $DIR (node $node, partition $PARTITION)" >&2
  echo "export SLURM_CONF=$CONF AURORA_SLURM_CONF=$CONF"
}

show_logs() {
  local f
  for f in "$DIR"/log/*.log; do
    [ -f "$f" ] && { echo "--- $f" >&2; tail -n 15 "$f" >&2; }
  done
  return 0
}

case "$cmd" in
  up) up ;;
  down) down ;;
  status)
    export SLURM_CONF=$CONF
    sinfo && squeue
    ;;
  *)
    sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac
