#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, in a directory of its own, for trying (and testing)
# `vlm-launch slurm` without a cluster. Needs root (the daemons run as root, jobs as you).
#
#   launch/local_slurm.sh install      apt-get the packages (skipped when they are there)
#   launch/local_slurm.sh start DIR    write DIR/etc/*.conf, start munged, mariadbd, slurmdbd,
#                                      slurmctld, slurmd; wait until the node is idle
#   launch/local_slurm.sh stop DIR     stop them (DIR is kept: logs in DIR/log)
#
# After start: `export SLURM_CONF=DIR/etc/slurm.conf`, then sbatch/srun/squeue/sacct/scancel
# talk to this cluster. Its files are all in DIR (no /etc/slurm) and its ports are free ones
# chosen at start, so several clusters can run side by side. Accounting (sacct) goes through
# slurmdbd into a private MariaDB in DIR/db. Authentication uses the host's munged (the
# package's /etc/munge/munge.key, default socket), started if it is not running and left
# running by stop, as on any SLURM node: SLURM 22.05's connections to slurmdbd ignore
# AuthInfo=socket=, so a private munged cannot serve them.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client slurmdbd munge mariadb-server)
COMMANDS=(slurmctld slurmd sbatch slurmdbd munged mariadbd mariadb-install-db)
CLUSTER=vlmjax

die() { echo "local_slurm.sh: $*" >&2; exit 1; }

install_packages() {
  [ "$(id -u)" = 0 ] || die "install needs root (apt-get)."
  local missing=0 cmd
  for cmd in "${COMMANDS[@]}"; do command -v "$cmd" >/dev/null || missing=1; done
  [ "$missing" = 0 ] && return 0
  # Several test workers may install at once: one apt-get at a time.
  (
    flock 9
    for cmd in "${COMMANDS[@]}"; do command -v "$cmd" >/dev/null || missing=2; done
    if [ "$missing" = 2 ]; then
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -q
      apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"
    fi
  ) 9>/var/lock/vlm_jax_local_slurm_install.lock
}

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])'
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...: until COMMAND succeeds
  local deadline=$((SECONDS + $1)) what=$2; shift 2
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "$what did not come up; see $DIR/log/."
    sleep 0.5
  done
}

write_configs() {
  local host cpus
  host=$(hostname -s)
  # jax's SLURM detection puts its coordinator on the job's first node, by name.
  getent hosts "$host" >/dev/null || die "this host's name $host does not resolve; add \
'127.0.0.1 $host' to /etc/hosts."
  # At least 2 CPUs, so a 2-task job fits on a 1-CPU machine; config_overrides makes slurmd
  # take the configured count instead of declaring the node invalid.
  cpus=$(nproc); [ "$cpus" -ge 2 ] || cpus=2
  cat >"$DIR/etc/slurm.conf" <<EOF
ClusterName=$CLUSTER
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$(free_port)
SlurmdPort=$(free_port)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
# Job ids start at a random number: jax's SLURM detection puts the coordinator on a port
# derived from the job id, which must differ between clusters running side by side.
FirstJobId=$((RANDOM * 4 % 100000 + 1000))
# No cgroups (containers rarely allow them): processes tracked by parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
JobCompType=jobcomp/none
MailProg=/bin/true
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$host
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"  # slurmdbd refuses a readable one (it may hold a password)
}

munge_works() { { munge -n </dev/null | unmunge; } >/dev/null 2>&1; }

start_munged() {
  munge_works && return 0
  [ -s /etc/munge/munge.key ] || runuser -u munge -- mungekey --create
  install -d -o munge -g munge -m 755 /run/munge
  runuser -u munge -- munged
  wait_for 30 munged munge_works
}

start() {
  command -v slurmctld >/dev/null || die "SLURM is not installed; run: $0 install"
  [ ! -e "$DIR/etc/slurm.conf" ] || die "$DIR already holds a cluster; stop it or use another DIR."
  mkdir -p "$DIR"/{etc,db,state,spool,run,log}
  DIR=$(cd "$DIR" && pwd)
  DB_PORT=$(free_port)
  DBD_PORT=$(free_port)
  write_configs
  export SLURM_CONF=$DIR/etc/slurm.conf

  start_munged

  mariadb-install-db --no-defaults --datadir="$DIR/db" --user=root --skip-test-db \
    --auth-root-authentication-method=normal >"$DIR/log/mariadb-install.log" 2>&1 \
    || die "mariadb-install-db failed; see $DIR/log/mariadb-install.log"
  # Grant checks off: it listens on 127.0.0.1 only and serves slurmdbd alone.
  setsid mariadbd --no-defaults --datadir="$DIR/db" --user=root --bind-address=127.0.0.1 \
    --port="$DB_PORT" --socket="$DIR/db/mariadb.sock" --pid-file="$DIR/run/mariadbd.pid" \
    --log-error="$DIR/log/mariadbd.log" --skip-grant-tables --innodb-buffer-pool-size=16M \
    </dev/null >/dev/null 2>&1 &
  wait_for 60 mariadbd test -S "$DIR/db/mariadb.sock"

  slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
  sacctmgr -i add cluster "$CLUSTER" >/dev/null
  slurmctld -c
  slurmd
  wait_for 60 "the node" bash -c "sinfo -h -o %T | grep -qx idle"
  echo "export SLURM_CONF=$SLURM_CONF"
}

stop() {
  local name pid
  export SLURM_CONF=$DIR/etc/slurm.conf
  # Job steps outlive slurmd (by design): end the jobs first, within KillWait.
  if [ -f "$DIR/run/slurmctld.pid" ] && scancel --partition=local 2>/dev/null; then
    for _ in $(seq 120); do [ -z "$(squeue -h 2>/dev/null)" ] && break; sleep 0.5; done
  fi
  for name in slurmd slurmctld slurmdbd mariadbd; do
    [ -f "$DIR/run/$name.pid" ] || continue
    pid=$(cat "$DIR/run/$name.pid")
    kill "$pid" 2>/dev/null || continue
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
}

case "${1:-}" in
  install) install_packages ;;
  start) [ $# = 2 ] || die "usage: $0 start DIR"; DIR=$2; start ;;
  stop) [ $# = 2 ] || die "usage: $0 stop DIR"; DIR=$2; stop ;;
  *) die "usage: $0 install | start DIR | stop DIR" ;;
esac
