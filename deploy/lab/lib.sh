# shellcheck shell=bash
# Variables here are used by the scripts that source this file.
# shellcheck disable=SC2034
# Shared definitions for the vmha multi-host KVM lab (sourced by up, down, virsh).
#
# The lab runs three libvirt "hosts" on this one machine. libvirt refuses to
# migrate to "the same host" (it compares hostname and host UUID), so every lab
# host gets its own network, UTS and mount namespace, its own libvirtd and its
# own copies of libvirt's state directories. See /work/shared/LAB.md.
#
# Callers are expected to run with `set -euo pipefail`; nothing here changes
# shell options, so sourcing this file from an interactive shell is harmless.

LAB_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VMHA_LAB_DIR=${VMHA_LAB_DIR:-${TMPDIR:-/tmp}/vmha-lab}
LAB_DIR=$VMHA_LAB_DIR
LAB_BIN_DIR=${CARGO_TARGET_DIR:-$LAB_REPO_ROOT/target}/debug

LAB_HOSTS=(kvm1 kvm2 kvm3)
# A /24 that exists only on the lab bridge and inside the lab's namespaces;
# nothing routes it anywhere else.
LAB_NET_PREFIX=10.213.77
LAB_BRIDGE=vmhabr0
LAB_BRIDGE_IP=$LAB_NET_PREFIX.1
LAB_CONTROLLER_ADDR=$LAB_BRIDGE_IP:7400
LAB_CONTROLLER_URL=http://$LAB_CONTROLLER_ADDR
LAB_GUEST_MIB=64

# libvirt's directories that must be private per lab host; each is bind-mounted
# from $LAB_DIR/<host>/<subdir> inside the host's mount namespace.
LAB_PRIVATE_DIRS=(etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt
  log:/var/log/libvirt cache:/var/cache/libvirt)

# Pids stopped or killed by this shell (lab_stop_pidfiles, lab_kill_host), for
# a final lab_wait_gone.
LAB_KILLED_PIDS=()

lab_log() { printf 'lab: %s\n' "$*" >&2; }
lab_die() { printf 'lab: error: %s\n' "$*" >&2; exit 1; }

lab_check_host() {
  local h
  for h in "${LAB_HOSTS[@]}"; do [[ $1 == "$h" ]] && return 0; done
  lab_die "unknown lab host '$1' (known: ${LAB_HOSTS[*]})"
}

# kvm1 -> 10.213.77.11: the host number is the last digit of the name.
lab_host_ip() { lab_check_host "$1"; printf '%s.1%s\n' "$LAB_NET_PREFIX" "${1#kvm}"; }
lab_host_uri() {
  local ip
  ip=$(lab_host_ip "$1")
  printf 'qemu+tcp://%s/system\n' "$ip"
}
lab_host_netns() { lab_check_host "$1"; printf 'vmha-%s\n' "$1"; }
# The bridge-side end of the host's veth has the same name as its netns, so a
# partition is simply `ip link set vmha-kvm2 down`.
lab_host_veth() { lab_host_netns "$1"; }
lab_host_dir() { lab_check_host "$1"; printf '%s/%s\n' "$LAB_DIR" "$1"; }

# True if the pid in FILE is alive and its command line contains NAME (guards
# against a recycled pid after a crash). Prints the pid.
lab_pid_alive() {
  local file=$1 name=${2:-} pid
  [[ -r $file ]] || return 1
  pid=$(<"$file") || return 1
  [[ $pid =~ ^[0-9]+$ ]] || return 1
  [[ -d /proc/$pid ]] || return 1
  # A zombie still has a /proc entry but is already dead.
  [[ $(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
  if [[ -n $name ]]; then
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -qF -- "$name" || return 1
  fi
  printf '%s\n' "$pid"
}

# A pid is dead when it is gone or a zombie. A zombie holds no memory, sockets
# or namespaces any more; it only waits for its parent to reap it, and PID 1
# in this sandbox reaps orphans only every ~2 s.
lab_pid_dead() {
  [[ ! -d /proc/$1 || $(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || echo Z) == Z ]]
}

# lab_wait_dead PID...: wait (<= LAB_WAIT_SECS, default 20) until all are dead.
lab_wait_dead() { _lab_wait lab_pid_dead "$@"; }
# lab_wait_gone PID...: same, but zombies must have been reaped too, so that
# nothing of the lab shows up in ps/pgrep any more.
lab_wait_gone() { _lab_wait _lab_pid_gone "$@"; }
_lab_pid_gone() { [[ ! -d /proc/$1 ]]; }
_lab_wait() {
  local test=$1 deadline=$((SECONDS + ${LAB_WAIT_SECS:-20})) pid left
  shift
  while (($# > 0)); do
    left=()
    for pid in "$@"; do "$test" "$pid" || left+=("$pid"); done
    ((${#left[@]} == 0)) && return 0
    if ((SECONDS >= deadline)); then
      lab_log "warning: still present after kill: ${left[*]}"
      return 1
    fi
    set -- "${left[@]}"
    sleep 0.05
  done
}

# lab_stop_pidfiles NAME PIDFILE...: graceful stop of daemons we started (all
# at once, so several slow ones cost one grace period): TERM, then KILL those
# still there after ${LAB_STOP_GRACE_SECS:-3} s. Removes the pid files.
# Returns once they are dead; their pids (and their reapers') are appended
# to LAB_KILLED_PIDS.
lab_stop_pidfiles() {
  local name=$1 file pid ppid pids=() left deadline
  shift
  for file in "$@"; do
    if pid=$(lab_pid_alive "$file" "$name"); then
      pids+=("$pid")
      # Its reaper (see spawn in up) exits right after; remember it for
      # callers that wait for everything to be gone.
      ppid=$(ps -o ppid= -p "$pid" 2>/dev/null | tr -d ' ') || true
      [[ -n $ppid ]] && grep -qF reaper "/proc/$ppid/cmdline" 2>/dev/null && LAB_KILLED_PIDS+=("$ppid")
      kill -TERM "$pid" 2>/dev/null || true
    fi
  done
  deadline=$((SECONDS + ${LAB_STOP_GRACE_SECS:-3}))
  while ((${#pids[@]} > 0)); do
    left=()
    for pid in "${pids[@]}"; do lab_pid_dead "$pid" || left+=("$pid"); done
    ((${#left[@]} == 0)) && break
    if ((SECONDS >= deadline)); then
      lab_log "$name did not exit on SIGTERM within ${LAB_STOP_GRACE_SECS:-3} s; killing ${left[*]}"
      kill -KILL "${left[@]}" 2>/dev/null || true
      break
    fi
    sleep 0.05
  done
  ((${#pids[@]} == 0)) || lab_wait_dead "${pids[@]}" || true
  LAB_KILLED_PIDS+=("${pids[@]}")
  rm -f "$@"
}

lab_netns_exists() {
  local ns
  ns=$(lab_host_netns "$1")
  [[ -e /run/netns/$ns ]]
}

# All processes in the host's network namespace: its anchor, libvirtd, QEMU
# guests and agent. QEMU gets a private mount namespace from libvirt, so the
# network namespace is the reliable way to find everything of a host.
lab_netns_pids() {
  lab_netns_exists "$1" || return 0
  ip netns pids "$(lab_host_netns "$1")" 2>/dev/null || true
}

# Pid of the host's anchor process (the process whose namespaces lab_exec
# enters), if it is alive and still sits in the host's current netns.
lab_anchor_pid() {
  local dir pid ns
  dir=$(lab_host_dir "$1")
  pid=$(lab_pid_alive "$dir/anchor.pid" "sleep") || return 1
  ns=/run/netns/$(lab_host_netns "$1")
  [[ -e $ns ]] || return 1
  [[ $(stat -L -c %i "/proc/$pid/ns/net" 2>/dev/null) == "$(stat -L -c %i "$ns")" ]] || return 1
  printf '%s\n' "$pid"
}

# lab_exec HOST CMD...: run CMD as if on that lab host (its network, hostname
# and libvirt directories). Does not enter a pid namespace, so no fork: when
# backgrounded, $! is the command's pid.
lab_exec() {
  local host=$1 pid
  shift
  pid=$(lab_anchor_pid "$host") || lab_die "lab host $host is not up (no anchor process)"
  nsenter -t "$pid" -n -u -m -- "$@"
}

# lab_virsh HOST ARGS...: virsh against the host's libvirtd over TCP, from the
# root namespace (the way the controller and other hosts see it).
lab_virsh() {
  local host=$1
  shift
  virsh -q -c "$(lab_host_uri "$host")" "$@"
}

# lab_kill_host HOST: a host death. SIGKILLs every process in the host's
# network namespace (anchor, libvirtd, its reaper, guests, agent) and returns
# once all are dead (zombies count as dead). The pids are appended to the
# array LAB_KILLED_PIDS for callers that want to wait for the zombies too.
# Leaves of the process tree die first, so their still-living parents (reaper,
# anchor) reap them at once instead of leaving them to PID 1. `up` brings the
# host back.
lab_kill_host() {
  local host=$1 round pids=() leaves=() parents pid ppid
  for ((round = 0; round < 20; round++)); do
    # ip netns pids does not list zombies (they have left the namespace).
    mapfile -t pids < <(lab_netns_pids "$host")
    ((${#pids[@]} == 0)) && break
    parents=" "
    while read -r pid ppid; do parents+="$ppid "; done < <(ps -o pid=,ppid= -p "$(
      IFS=,
      echo "${pids[*]}"
    )" 2>/dev/null || true)
    leaves=()
    for pid in "${pids[@]}"; do [[ $parents == *" $pid "* ]] || leaves+=("$pid"); done
    # A cycle cannot happen, but never loop without killing something.
    ((${#leaves[@]} > 0)) || leaves=("${pids[@]}")
    kill -KILL "${leaves[@]}" 2>/dev/null || true
    LAB_KILLED_PIDS+=("${leaves[@]}")
    lab_wait_dead "${leaves[@]}" || true
  done
  rm -f "$(lab_host_dir "$host")/anchor.pid"
}

# Network partition of a host from the bridge (controller and other hosts),
# and its healing.
lab_partition() { ip link set "$(lab_host_veth "$1")" down; }
lab_heal() { ip link set "$(lab_host_veth "$1")" up; }

# Newest installed PostgreSQL server binaries.
lab_pg_bindir() {
  local d
  d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n1)
  [[ -n $d && -x $d/postgres ]] || lab_die "no PostgreSQL server under /usr/lib/postgresql (run deploy/lab/deps)"
  printf '%s\n' "$d"
}

lab_pg_port() { [[ -r $LAB_DIR/pg/port ]] && cat "$LAB_DIR/pg/port"; }
lab_database_url() { printf 'postgres://postgres@127.0.0.1:%s/vmha\n' "$(lab_pg_port)"; }
