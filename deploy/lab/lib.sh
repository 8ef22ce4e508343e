# shellcheck shell=bash
# Variables here are used by the scripts that source this file.
# shellcheck disable=SC2034
# Shared definitions for the vmha multi-host KVM lab (sourced by up, down,
# virsh and the chaos verbs kill, cut, heal, revive).
#
# The lab runs three libvirt "hosts" on this one machine. libvirt refuses to
# migrate to "the same host" (it compares hostname and host UUID), so every lab
# host gets its own network, UTS and mount namespace, its own libvirtd and its
# own copies of libvirt's state directories.
#
# Callers are expected to run with `set -euo pipefail`; nothing here changes
# shell options, so sourcing this file from an interactive shell is harmless.

LAB_REPO_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
VMHA_LAB_DIR=${VMHA_LAB_DIR:-${TMPDIR:-/tmp}/vmha-lab}
LAB_DIR=$VMHA_LAB_DIR
LAB_SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
LAB_BIN_DIR=${CARGO_TARGET_DIR:-$LAB_REPO_ROOT/target}/debug
LAB_CONTROLLER_BIN=$LAB_BIN_DIR/vmha-controller
LAB_AGENT_BIN=$LAB_BIN_DIR/vmha-agent
LAB_CLI_BIN=$LAB_BIN_DIR/vmha

LAB_HOSTS=(kvm1 kvm2 kvm3)
# A /24 that exists only on the lab bridge and inside the lab's namespaces;
# nothing routes it anywhere else.
LAB_NET_PREFIX=10.213.77
LAB_BRIDGE=vmhabr0
LAB_BRIDGE_IP=$LAB_NET_PREFIX.1
# Two controllers on one database, ctl1 and ctl2: one leads, the other stands by
# (deploy/lab/ctl stops, kills and starts them). Both in the root namespaces.
LAB_CONTROLLERS=(1 2)
lab_controller_addr() { echo "$LAB_BRIDGE_IP:$((7400 + ($1 - 1) * 10))"; }
# Controller N's Prometheus metrics (plaintext, loopback only): 127.0.0.1:7401, :7411, ...
lab_controller_metrics_addr() { echo "127.0.0.1:$((7401 + ($1 - 1) * 10))"; }
# lab_agent_metrics_addr HOST: where the host's agent serves its Prometheus metrics
# (its address on the lab bridge, reachable from the root namespace).
lab_agent_metrics_addr() { echo "$(lab_host_ip "$1"):9741"; }
# VMHA_LAB_INSECURE=1 (benchmarks only, bench/mtls): the controllers, agents and
# CLI run with --insecure-dev, in plaintext. Take the lab down before switching.
if [[ ${VMHA_LAB_INSECURE:-0} == 1 ]]; then
  LAB_SCHEME=http
else
  LAB_SCHEME=https
fi
lab_controller_url() { echo "$LAB_SCHEME://$(lab_controller_addr "$1")"; }
# Every controller's endpoint, comma-separated: what agents and the CLI are given.
LAB_CONTROLLER_URLS=$(for n in "${LAB_CONTROLLERS[@]}"; do lab_controller_url "$n"; done | paste -sd,)
# Mutual TLS, as in production: one cluster CA and every certificate in
# LAB_PKI_DIR, made by `vmha ca` (lab_make_pki). The CLI runs as the lab's admin
# (lab_cli); a viewer and an operator certificate are there for tests.
LAB_PKI_DIR=$VMHA_LAB_DIR/pki
# The CA's own directory (ca.key, issued.txt, crl.pem): the certificates it issues go to
# LAB_PKI_DIR, never beside its key.
LAB_CA_DIR=$VMHA_LAB_DIR/ca
LAB_OPERATORS=(lab-admin:admin lab-operator:operator lab-viewer:viewer)
# Every agent serves its peer endpoint on <host address>:LAB_AGENT_PEER_PORT.
LAB_AGENT_PEER_PORT=7401
# The demo guests boot deploy/lab/guest-image's kernel and initramfs (a real
# DNS server and the QEMU guest agent); 96 MiB is the least that image boots in.
LAB_GUEST_MIB=128
# name:home host:address. Every guest has a fixed address on the lab network,
# which it keeps wherever it runs: the hosts' guests are bridged onto it
# (LAB_HOST_BRIDGE), so the machine itself reaches them over LAB_BRIDGE.
LAB_DEMO_GUESTS=(dns1:kvm1:21 radius1:kvm1:23 dns2:kvm2:22)
# The guests that also run FreeRADIUS (UDP 1812, secret vmha-lab, user lab/lab).
LAB_RADIUS_GUESTS=(radius1)
# The bridge inside every host's netns: its eth0 (the veth to LAB_BRIDGE) and its
# guests' taps are its ports, the host's address is on it.
LAB_HOST_BRIDGE=br0
# Storage every lab host sees at the same path (NFS in production): the guests'
# disk images and virtlockd's lockspace (libvirt's lockd lock manager, see
# lab_write_host_config). Outside the per-host private libvirt directories.
LAB_SHARED_DIR=$VMHA_LAB_DIR/san
# The images are on a FUSE mount (lab_mount_images) of LAB_IMAGES_BACKING.
LAB_IMAGES_DIR=$LAB_SHARED_DIR/images
LAB_IMAGES_BACKING=$LAB_SHARED_DIR/.images
LAB_LOCKSPACE_DIR=$LAB_SHARED_DIR/lockspace
# The demo guests' kernel and initramfs (deploy/lab/guest-image), on the shared storage.
LAB_GUEST_BOOT_DIR=$LAB_IMAGES_DIR/boot
LAB_DISK_MIB=64

# libvirt's directories that must be private per lab host; each is bind-mounted
# from $LAB_DIR/<host>/<subdir> inside the host's mount namespace.
LAB_PRIVATE_DIRS=(etc:/etc/libvirt run:/run/libvirt lib:/var/lib/libvirt
  log:/var/log/libvirt cache:/var/cache/libvirt pki:/etc/pki)

# Pids stopped or killed by this shell (lab_stop_pidfiles, lab_kill_host), for
# a final lab_wait_gone.
LAB_KILLED_PIDS=()

# lab_guest_ip NAME: a demo guest's address on the lab network.
lab_guest_ip() {
  local g
  for g in "${LAB_DEMO_GUESTS[@]}"; do
    [[ ${g%%:*} == "$1" ]] && { printf '%s.%s\n' "$LAB_NET_PREFIX" "${g##*:}"; return 0; }
  done
  lab_die "unknown demo guest '$1'"
}

lab_log() { printf 'lab: %s\n' "$*" >&2; }
lab_die() { printf 'lab: error: %s\n' "$*" >&2; exit 1; }

lab_check_host() {
  local h
  for h in "${LAB_HOSTS[@]}"; do [[ $1 == "$h" ]] && return 0; done
  lab_die "unknown lab host '$1' (known: ${LAB_HOSTS[*]})"
}

# kvm1 -> 10.213.77.11: the host number is the last digit of the name.
lab_host_ip() { lab_check_host "$1"; printf '%s.1%s\n' "$LAB_NET_PREFIX" "${1#kvm}"; }
# libvirt between the lab hosts is TLS with the hosts' vmha certificates, as the
# README shows for real hosts; libvirtd takes no other client (lab_write_host_config).
# lab_host_uri HOST: how the lab's own tools (tests, deploy/lab/virsh) reach the host's
# libvirtd from the root namespaces, with the client files in LAB_PKI_DIR/libvirt-tools
# (the controller's certificate: the lab's administrative client).
lab_host_uri() {
  local ip
  ip=$(lab_host_ip "$1")
  printf 'qemu+tls://%s/system?pkipath=%s\n' "$ip" "$LAB_PKI_DIR/libvirt-tools"
}
# lab_migration_uri HOST: how other hosts' libvirtd reach it (the agent's
# --migration-uri). pkipath is read by the source's libvirtd, in the source's
# namespaces, where /etc/libvirt/pki holds the source's own host certificate.
lab_migration_uri() {
  printf 'qemu+tls://%s/system?pkipath=/etc/libvirt/pki\n' "$(lab_host_ip "$1")"
}
lab_host_netns() { lab_check_host "$1"; printf 'vmha-%s\n' "$1"; }
# The bridge-side end of the host's veth has the same name as its netns, so a
# partition is simply `ip link set vmha-kvm2 down`.
lab_host_veth() { lab_host_netns "$1"; }
lab_host_dir() { lab_check_host "$1"; printf '%s/%s\n' "$LAB_DIR" "$1"; }
# While this file exists, the host's agent reports its lab-flag check as failing
# (a stand-in for any operator check: a dead multipath, a full disk, ...). The
# agent sees it at the same path: the host's mount namespace only bind-mounts
# libvirt's directories over the root one.
lab_host_fail_file() { printf '%s/fail\n' "$(lab_host_dir "$1")"; }

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
      # Its reaper (see lab_spawn) exits right after; remember it for
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
# anchor) reap them at once instead of leaving them to PID 1. `revive` (or
# `up`) brings the host back; deploy/lab/kill is the power-pull verb.
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

# --- booting a lab host (up, revive) -----------------------------------------
# lab_libvirt_client_files DIR STEM: DIR as a libvirt pkipath presenting the
# certificate LAB_PKI_DIR/STEM.pem.
lab_libvirt_client_files() {
  cp "$LAB_PKI_DIR/ca.pem" "$1/cacert.pem"
  cp "$LAB_PKI_DIR/$2.pem" "$1/clientcert.pem"
  install -m 0600 "$LAB_PKI_DIR/$2.key" "$1/clientkey.pem"
}

# lab_write_host_config HOST: the host's libvirt configuration and /etc/hosts.
lab_write_host_config() {
  local h=$1 dir ip sub
  dir=$(lab_host_dir "$h")
  ip=$(lab_host_ip "$h")
  for sub in "${LAB_PRIVATE_DIRS[@]}"; do mkdir -p "$dir/${sub%%:*}"; done
  # Kept across restarts: libvirt identifies the host by it, and a host whose
  # UUID changed would look like a different machine to running migrations.
  [[ -s $dir/host_uuid ]] || cat /proc/sys/kernel/random/uuid >"$dir/host_uuid"

  # libvirt's qemu hook, as on a production host: a protected VM starts or arrives by live
  # migration only while the host's agent holds a lease (see agent/src/hook.rs). libvirtd
  # reads the hooks directory when it starts.
  mkdir -p "$dir/etc/hooks"
  cat >"$dir/etc/hooks/qemu" <<EOF
#!/bin/sh
exec $LAB_AGENT_BIN --libvirt-hook $dir/agent-state "\$@"
EOF
  chmod 755 "$dir/etc/hooks/qemu"

  # libvirt's TLS client files, under the names libvirt looks for in a pkipath:
  # this host's certificate, for the migrations it starts (lab_migration_uri).
  mkdir -p "$dir/etc/pki"
  lab_libvirt_client_files "$dir/etc/pki" "host-$h"
  # libvirtd's server files where libvirt looks by default (the host's private
  # /etc/pki), as on a real host (README): `virt-admin server-update-tls`, with
  # which the agent has libvirtd take a new CRL (/etc/pki/CA/cacrl.pem), reloads
  # only from these paths.
  mkdir -p "$dir/pki/CA" "$dir/pki/libvirt/private"
  cp "$LAB_PKI_DIR/ca.pem" "$dir/pki/CA/cacert.pem"
  cp "$LAB_PKI_DIR/host-$h.pem" "$dir/pki/libvirt/servercert.pem"
  install -m 0600 "$LAB_PKI_DIR/host-$h.key" "$dir/pki/libvirt/private/serverkey.pem"
  cat >"$dir/etc/libvirtd.conf" <<EOF
# Generated by deploy/lab/up. TLS only, from the cluster's hosts (and the lab's
# tools, which connect as the controller); the README shows the same on real hosts.
host_uuid = "$(<"$dir/host_uuid")"
listen_tls = 1
listen_tcp = 0
listen_addr = "$ip"
tls_allowed_dn_list = ["*OU=host-*", "*OU=controller-ctl1*"]
auth_unix_rw = "none"
auth_unix_ro = "none"
log_outputs = "3:file:/var/log/libvirt/libvirtd.log"
EOF
  cat >"$dir/etc/qemu.conf" <<EOF
# Generated by deploy/lab/up.
migration_address = "$ip"
migration_host = "$ip"
# No virtlogd runs in the lab.
stdio_handler = "file"
security_driver = "none"
user = "root"
group = "root"
dynamic_ownership = 0
# No systemd/cgroup manager here.
cgroup_controllers = [ ]
# Disk leases held by the host's virtlockd (lab_start_virtlockd): a guest whose
# disk is in use by a QEMU on another host does not start.
lock_manager = "lockd"
EOF
  mkdir -p "$LAB_IMAGES_DIR" "$LAB_LOCKSPACE_DIR"
  # Every disk gets a lease automatically, in a lockspace all hosts share (one
  # file per disk path, fcntl-locked by the virtlockd of the host running it).
  cat >"$dir/etc/qemu-lockd.conf" <<EOF
# Generated by deploy/lab/up.
auto_disk_leases = 1
require_lease_for_disks = 1
file_lockspace_dir = "$LAB_LOCKSPACE_DIR"
EOF
  # The lab hosts resolve each other and the controller without DNS (there is
  # no DNS server reachable from the lab namespaces).
  {
    printf '127.0.0.1\tlocalhost\n%s\t%s\n' "$LAB_BRIDGE_IP" controller
    local o
    for o in "${LAB_HOSTS[@]}"; do printf '%s\t%s\n' "$(lab_host_ip "$o")" "$o"; done
  } >"$dir/hosts"
}

# lab_start_anchor HOST: the process owning the host's UTS and mount
# namespaces (its network namespace is the named netns).
lab_start_anchor() {
  local h=$1 dir ns i
  dir=$(lab_host_dir "$h")
  ns=$(lab_host_netns "$h")
  rm -f "$dir/anchor.pid"
  if [[ -z $(lab_netns_pids "$h") ]]; then
    # Nothing of the host runs, so this is a boot. /run is a tmpfs on a real
    # host: libvirt's runtime state (pid file, sockets, status XML of guests
    # that died with the host) starts empty, and libvirtd finds only the
    # persistent definitions, shut off. The qemu driver's "autostarted" marker
    # (see virDriverShouldAutostart) is set beforehand so that libvirtd never
    # autostarts a guest: a lab host does not start VMs on its own, vmha does.
    rm -rf --one-file-system "$dir/run"
    mkdir -p "$dir/run/qemu"
    touch "$dir/run/qemu/autostarted"
  fi
  lab_log "starting namespaces of $h"
  # The bind-mount targets must exist; /run/libvirt does not without a
  # running system libvirtd. An empty directory in the root fs is harmless.
  mkdir -p /run/libvirt /var/cache/libvirt /var/log/libvirt /etc/pki
  # The anchor owns the host's UTS and mount namespaces (the network one is
  # the named netns) and keeps them alive; everything of the host is started
  # by entering its namespaces (lab_exec).
  # shellcheck disable=SC2016  # expanded by the inner shell
  setsid ip netns exec "$ns" unshare --uts --mount --propagation private --fork \
    /bin/sh -c '
      set -e
      hostname "$1"
      shift
      dir=$1
      shift
      for pair in "$@"; do mount --bind "$dir/${pair%%:*}" "${pair#*:}"; done
      mount --bind "$dir/hosts" /etc/hosts
      echo $$ >"$dir/anchor.pid.tmp"
      mv "$dir/anchor.pid.tmp" "$dir/anchor.pid"
      exec sleep infinity
    ' vmha-anchor "$h" "$dir" "${LAB_PRIVATE_DIRS[@]}" \
    </dev/null >>"$dir/anchor.log" 2>&1 9>&- &
  for ((i = 0; i < 100; i++)); do
    lab_anchor_pid "$h" >/dev/null && return 0
    sleep 0.05
  done
  cat "$dir/anchor.log" >&2 || true
  lab_die "anchor of $h did not come up"
}

# --- shared storage -------------------------------------------------------------
# libvirt refuses a live migration whose disks are on a local filesystem
# ("Unsafe migration: Migration without shared storage is unsafe"), cache='none'
# or not; libvirt 9.0 has no setting to call a directory shared. So the images
# directory is a bindfs (FUSE) mount of LAB_IMAGES_BACKING typed
# fuse.glusterfs, which libvirt counts as shared storage, as it counts NFS in
# production. Mounted in the root namespaces before the hosts' anchors start,
# so every host's mount namespace has a copy of the same mount: one kernel
# superblock, so QEMU's image locks between hosts work as on NFS.
lab_images_mounted() { # [PID]: in that process's mount namespace (default ours)
  grep -qF " $LAB_IMAGES_DIR fuse.glusterfs " "/proc/${1:-self}/mounts" 2>/dev/null
}

lab_mount_images() {
  lab_images_mounted self && return 0
  command -v bindfs >/dev/null || lab_die "bindfs not installed (run deploy/lab/deps)"
  mkdir -p "$LAB_IMAGES_BACKING" "$LAB_IMAGES_DIR"
  lab_log "mounting the shared images directory $LAB_IMAGES_DIR (bindfs, typed fuse.glusterfs)"
  bindfs -o subtype=glusterfs,fsname=vmha-lab-shared "$LAB_IMAGES_BACKING" "$LAB_IMAGES_DIR" \
    </dev/null >/dev/null 2>&1 9>&- || lab_die "bindfs mount of $LAB_IMAGES_DIR failed"
  lab_images_mounted self || lab_die "$LAB_IMAGES_DIR is not mounted after bindfs"
}

# lab_unmount_images: after the hosts are gone (their namespaces hold copies).
lab_unmount_images() {
  if lab_images_mounted self; then
    umount "$LAB_IMAGES_DIR" 2>/dev/null || umount -l "$LAB_IMAGES_DIR"
  fi
  # A bindfs whose mount went lazily can outlive it and spin (seen: most of a core, for
  # hours, under the next lab and CI run): stop whatever still serves this lab's images,
  # and kill it if it has not gone after 2 s (the mount is gone: nothing is lost).
  local serving="^bindfs .*fsname=vmha-lab-shared $LAB_IMAGES_BACKING "
  pkill -f "$serving" 2>/dev/null || return 0
  local _
  for _ in 1 2 3 4 5 6 7 8 9 10; do
    pgrep -f "$serving" >/dev/null 2>&1 || return 0
    sleep 0.2
  done
  pkill -KILL -f "$serving" 2>/dev/null || true
}

lab_virtlockd_pid() { lab_pid_alive "$(lab_host_dir "$1")/run/virtlockd.pid" virtlockd; }

# lab_start_virtlockd HOST: the host's lock daemon, which libvirtd's lockd
# plugin connects to at /run/libvirt/virtlockd-sock (libvirt 9.0 does not spawn
# it without systemd socket activation). Foreground under the reaper, like
# libvirtd; it lives in the host's netns, so kill/down kill it with the host.
# Returns once its socket is there.
lab_start_virtlockd() {
  local h=$1 dir anchor job i
  dir=$(lab_host_dir "$h")
  lab_virtlockd_pid "$h" >/dev/null && return 0
  lab_log "starting virtlockd on $h"
  rm -f "$dir/run/virtlockd-sock" "$dir/run/virtlockd-admin-sock"
  anchor=$(lab_anchor_pid "$h")
  setsid nsenter -t "$anchor" -n -u -m -- "$LAB_SCRIPT_DIR/reaper" \
    virtlockd -p /run/libvirt/virtlockd.pid \
    </dev/null >>"$dir/log/virtlockd.stdout" 2>&1 9>&- &
  job=$!
  for ((i = 0; i < 100; i++)); do
    [[ -S $dir/run/virtlockd-sock ]] && lab_virtlockd_pid "$h" >/dev/null && return 0
    [[ $(awk '{print $3}' "/proc/$job/stat" 2>/dev/null || echo Z) == Z ]] && break
    sleep 0.05
  done
  tail -n 20 "$dir/log/virtlockd.stdout" >&2 || true
  lab_die "virtlockd on $h did not come up"
}

lab_libvirtd_pid() { lab_pid_alive "$(lab_host_dir "$1")/run/libvirtd.pid" libvirtd; }

lab_libvirt_answers() { timeout 5 virsh -q -c "$(lab_host_uri "$1")" version >/dev/null 2>&1; }

# lab_start_libvirtd HOST: start the host's libvirtd; returns once it answers
# over TCP (so the host's link must be up).
lab_start_libvirtd() {
  local h=$1 dir job i anchor
  dir=$(lab_host_dir "$h")
  lab_log "starting libvirtd on $h ..."
  # Foreground under the reaper (not --daemon), so that the QEMUs it
  # double-forks are reaped at once (see deploy/lab/reaper). The default pid
  # file /run/libvirtd.pid would be shared by all instances; ours lives in the
  # host's private /run/libvirt.
  # A simple command rather than lab_exec: a backgrounded shell function
  # would leave a bash subshell waiting as the daemon's parent.
  # libvirtd's lockd plugin needs the lock daemon from its start.
  lab_start_virtlockd "$h"
  anchor=$(lab_anchor_pid "$h")
  setsid nsenter -t "$anchor" -n -u -m -- "$LAB_SCRIPT_DIR/reaper" \
    libvirtd --listen -p /run/libvirt/libvirtd.pid \
    </dev/null >>"$dir/log/libvirtd.stdout" 2>&1 9>&- &
  job=$!
  for ((i = 0; i < 200; i++)); do
    lab_libvirt_answers "$h" && return 0
    # Our own child: a zombie until waited for, so look at its state.
    if [[ $(awk '{print $3}' "/proc/$job/stat" 2>/dev/null || echo Z) == Z ]]; then
      break
    fi
    sleep 0.1
  done
  tail -n 20 "$dir/log/libvirtd.stdout" "$dir/log/libvirtd.log" >&2 || true
  lab_die "libvirtd on $h does not answer on $(lab_host_uri "$h")"
}

# lab_spawn PIDFILE LOG HOST|- CMD...: start CMD in the background, detached,
# under a reaper (so that its exit is reaped at once, see deploy/lab/reaper),
# in the root namespaces (-) or in lab host HOST's. The inner shell records
# its own pid and then execs CMD, so PIDFILE holds CMD's pid whatever sits in
# between. NO_COLOR keeps ANSI escapes out of the logs.
lab_spawn() {
  local pidfile=$1 log=$2 host=$3 prefix=() i
  shift 3
  [[ $host == - ]] || prefix=(nsenter -t "$(lab_anchor_pid "$host")" -n -u -m --)
  rm -f "$pidfile"
  # shellcheck disable=SC2016  # expanded by the inner shell
  setsid "${prefix[@]}" "$LAB_SCRIPT_DIR/reaper" /bin/sh -c 'echo $$ >"$0"; export NO_COLOR=1; exec "$@"' \
    "$pidfile" "$@" </dev/null >>"$log" 2>&1 9>&- &
  for ((i = 0; i < 100; i++)); do
    [[ -s $pidfile ]] && return 0
    sleep 0.02
  done
  lab_die "failed to start $1 (see $log)"
}

# A daemon is reused when alive and not older than its binary; after a
# rebuild it is restarted so the lab runs the code just built.
lab_daemon_current() {
  local pidfile=$1 bin=$2
  lab_pid_alive "$pidfile" "$(basename "$bin")" >/dev/null && [[ ! $bin -nt $pidfile ]]
}

# lab_make_pki: the lab's CA and the certificates of its controller, hosts
# (naming their addresses) and operators; what exists already is kept.
lab_make_pki() {
  local h o
  lab_issue() {
    local stem=$1
    shift
    [[ -e $LAB_PKI_DIR/$stem.pem ]] ||
      "$LAB_CLI_BIN" ca issue "$@" --dir "$LAB_CA_DIR" --out "$LAB_PKI_DIR" >/dev/null ||
      lab_die "cannot issue the lab's certificate $stem"
  }
  # A lab made before the CA had a directory of its own: its key moves there.
  if [[ -e $LAB_PKI_DIR/ca.key && ! -e $LAB_CA_DIR/ca.key ]]; then
    mkdir -p "$LAB_CA_DIR"
    cp "$LAB_PKI_DIR/ca.pem" "$LAB_CA_DIR/ca.pem"
    mv "$LAB_PKI_DIR/ca.key" "$LAB_CA_DIR/ca.key"
  fi
  if [[ ! -e $LAB_CA_DIR/ca.pem ]]; then
    lab_log "making the lab's cluster CA in $LAB_CA_DIR"
    "$LAB_CLI_BIN" ca init --dir "$LAB_CA_DIR" >/dev/null || lab_die "cannot make the lab's CA"
    rm -rf "$LAB_PKI_DIR"
  fi
  for n in "${LAB_CONTROLLERS[@]}"; do
    lab_issue "controller-ctl$n" controller "ctl$n" --ip "$LAB_BRIDGE_IP"
  done
  for h in "${LAB_HOSTS[@]}"; do
    lab_issue "host-$h" host "$h" --ip "$(lab_host_ip "$h")"
  done
  for o in "${LAB_OPERATORS[@]}"; do
    lab_issue "operator-${o%%:*}" operator "${o%%:*}" --role "${o#*:}"
  done
  # The lab's own libvirt client (lab_host_uri); here, once: the hosts are set up in
  # parallel.
  mkdir -p "$LAB_PKI_DIR/libvirt-tools"
  lab_libvirt_client_files "$LAB_PKI_DIR/libvirt-tools" controller-ctl1
}

# lab_tls_flags STEM: a daemon's flags for its certificate LAB_PKI_DIR/STEM.pem.
lab_tls_flags() {
  if [[ ${VMHA_LAB_INSECURE:-0} == 1 ]]; then
    printf '%s\n' --insecure-dev
  else
    printf '%s\n' --tls-ca "$LAB_PKI_DIR/ca.pem" --tls-cert "$LAB_PKI_DIR/$1.pem" --tls-key "$LAB_PKI_DIR/$1.key"
  fi
}

# The environment of the CLI as the lab operator NAME (lab-admin by default).
lab_cli_env() {
  local who=${1:-lab-admin}
  printf '%s\n' "VMHA_CONTROLLER=$LAB_CONTROLLER_URLS" "VMHA_CA=$LAB_PKI_DIR/ca.pem" \
    "VMHA_CERT=$LAB_PKI_DIR/operator-$who.pem" "VMHA_KEY=$LAB_PKI_DIR/operator-$who.key"
  [[ ${VMHA_LAB_INSECURE:-0} != 1 ]] || printf '%s\n' VMHA_INSECURE_DEV=1
}

# lab_cli ARG...: the vmha CLI as the lab's admin.
lab_cli() {
  local env
  mapfile -t env < <(lab_cli_env)
  env "${env[@]}" "$LAB_CLI_BIN" "$@"
}

# lab_start_agent HOST: start the vmha agent inside the host's namespaces, as
# `up` and `revive` do. Each agent also serves a small peer endpoint on
# <host address>:LAB_AGENT_PEER_PORT that the other agents poll. Its probes run
# every second, with one operator check that fails while the host's fail file
# (lab_host_fail_file) exists. It feeds the host's emulated watchdog (start
# lab_start_watchdog first, or its open fails with ENXIO); a FIFO takes no
# WDIOC_SETTIMEOUT, so the agent is told the monitor's timeout.
lab_start_agent() {
  local h=$1
  lab_log "starting agent on $h"
  lab_spawn "$LAB_DIR/agent-$h.pid" "$LAB_DIR/agent-$h.log" "$h" \
    "$LAB_AGENT_BIN" --host-name "$h" --libvirt-uri qemu:///system \
    --migration-uri "$(lab_migration_uri "$h")" --controller "$LAB_CONTROLLER_URLS" \
    $(lab_tls_flags "host-$h") \
    --peer-listen "$(lab_host_ip "$h"):$LAB_AGENT_PEER_PORT" \
    --metrics-listen "$(lab_agent_metrics_addr "$h")" \
    --probe-interval 1s --state-dir "$(lab_host_dir "$h")/agent-state" --allow-exec-probes \
    --check "lab-flag=test ! -e $(printf '%q' "$(lab_host_fail_file "$h")")" \
    --watchdog-device "$(lab_watchdog_path "$h")" --watchdog-timeout "$(lab_watchdog_secs)s"
}

# lab_start_controller N [FLAG...]: start the lab's controller ctlN in the root
# namespaces with the lab's profile (lab_profile) and FLAGs appended, as `up`
# does (up first stops one that runs with other flags). The FLAGs are recorded
# in $LAB_DIR/controller-N.args (lab_controller_extra_args N). Returns once its
# pid file is written, not once it serves: wait for `vmha host ls` to answer.
# It stands by until it wins the leader lock.
lab_start_controller() {
  local n=$1 profile_args
  shift
  read -ra profile_args <<<"$(lab_controller_profile_args "$(lab_profile)")"
  lab_log "starting controller ctl$n on $(lab_controller_addr "$n") (profile $(lab_profile)${*:+, extra flags $*})"
  printf '%s\n' "$*" >"$LAB_DIR/controller-$n.args"
  lab_spawn "$(lab_controller_pidfile "$n")" "$LAB_DIR/controller-$n.log" - \
    "$LAB_CONTROLLER_BIN" --listen "$(lab_controller_addr "$n")" --database-url "$(lab_database_url)" \
    --advertise "$(lab_controller_url "$n")" --name "ctl$n" \
    $(lab_tls_flags "controller-ctl$n") \
    --shared-storage "$LAB_IMAGES_DIR" --metrics-listen "$(lab_controller_metrics_addr "$n")" \
    --degraded-after 3s --recover-after 5s "${profile_args[@]}" "$@"
}

lab_controller_pidfile() { echo "$LAB_DIR/controller-$1.pid"; }

# The extra flags the lab's controller N was last started with (empty: none).
lab_controller_extra_args() { cat "$LAB_DIR/controller-$1.args" 2>/dev/null || true; }

# Whether any of the lab's controllers runs.
lab_any_controller() {
  local n
  for n in "${LAB_CONTROLLERS[@]}"; do
    lab_pid_alive "$(lab_controller_pidfile "$n")" vmha-controller >/dev/null && return 0
  done
  return 1
}

# --- timing profiles -----------------------------------------------------------
# VMHA_LAB_PROFILE picks the cluster's timings; `up` records it in
# $LAB_DIR/profile, so revive and later `up`s without the variable keep it.
# The flags are written out even for `default` (they are the binaries'
# defaults), so that a daemon's command line tells which profile it runs and
# `up` restarts exactly the daemons that run another one.
LAB_PROFILES=(default fast)

lab_check_profile() {
  local p
  for p in "${LAB_PROFILES[@]}"; do [[ $1 == "$p" ]] && return 0; done
  lab_die "unknown VMHA_LAB_PROFILE '$1' (known: ${LAB_PROFILES[*]})"
}

# The lab's current profile (default for a lab that never recorded one).
lab_profile() {
  local p
  p=$(cat "$LAB_DIR/profile" 2>/dev/null) || p=default
  lab_check_profile "$p"
  printf '%s\n' "$p"
}

lab_controller_profile_args() {
  case ${1:-$(lab_profile)} in
    default) echo --heartbeat-interval 1s --lease-ttl 5s --fence-margin 1s ;;
    fast) echo --heartbeat-interval 500ms --lease-ttl 2s --fence-margin 500ms ;;
  esac
}

# Seconds without a feed before a lab host's watchdog resets it.
lab_watchdog_secs() {
  case ${1:-$(lab_profile)} in
    default) echo 3 ;;
    fast) echo 1 ;;
  esac
}

# --- emulated hardware watchdog (deploy/lab/watchdog) ---------------------------
# The device the host's agent opens: a FIFO the host's monitor reads. The
# agent sees the same path (its mount namespace only bind-mounts libvirt's
# directories).
lab_watchdog_path() { printf '%s/watchdog\n' "$(lab_host_dir "$1")"; }
lab_watchdog_pidfile() { printf '%s/watchdog-%s.pid\n' "$LAB_DIR" "$1"; }
# What a monitor's command line contains (python3 .../watchdog HOST SECS), so
# that a monitor with another timeout counts as not current.
lab_watchdog_cmd() { printf '%s/watchdog %s %s\n' "$LAB_SCRIPT_DIR" "$1" "$(lab_watchdog_secs "${2:-}")"; }

# True if HOST's monitor runs with the profile's timeout and is not older than
# the script (an edited monitor is restarted, like a rebuilt binary).
lab_watchdog_current() {
  local pidfile
  pidfile=$(lab_watchdog_pidfile "$1")
  lab_pid_alive "$pidfile" "$(lab_watchdog_cmd "$1" "${2:-}") " >/dev/null &&
    [[ ! $LAB_SCRIPT_DIR/watchdog -nt $pidfile ]]
}

# lab_start_watchdog HOST: start the host's monitor in the root namespaces (a
# watchdog is outside the software it guards), disarmed until the agent opens
# it. Start it before the agent and stop it before the agent (a stopped agent
# may leave it armed, and a lab command must not turn into a reset).
lab_start_watchdog() {
  local h=$1
  lab_log "starting watchdog of $h ($(lab_watchdog_secs) s)"
  lab_spawn "$(lab_watchdog_pidfile "$h")" "$LAB_DIR/watchdog-$h.log" - \
    env VMHA_LAB_DIR="$LAB_DIR" "$LAB_SCRIPT_DIR/watchdog" "$h" "$(lab_watchdog_secs)"
}

# lab_stop_watchdogs HOST...: stop these hosts' monitors (SIGTERM: no reset,
# armed or not). Like lab_stop_pidfiles, adds their pids to LAB_KILLED_PIDS.
lab_stop_watchdogs() {
  local h files=()
  for h in "$@"; do files+=("$(lab_watchdog_pidfile "$h")"); done
  ((${#files[@]} == 0)) || lab_stop_pidfiles "$LAB_SCRIPT_DIR/watchdog" "${files[@]}"
}

# lab_lock_host HOST: serialize the chaos verbs (kill, cut, heal, revive) on
# one host, e.g. a revive from an interrupted bench's exit trap and one typed
# by hand. Held on fd 9 until the calling script exits. Whatever the lab
# starts in the background closes fd 9 (`9>&-`), or a daemon would hold the
# lock for ever.
lab_lock_host() {
  exec 9>"$LAB_DIR/.lock-$1"
  flock -n 9 && return 0
  lab_log "waiting for another lab command on $1 to finish ..."
  flock -w 120 9 || lab_die "another lab command on $1 still runs after 120 s (lock $LAB_DIR/.lock-$1)"
}

# lab_require_host HOST: die with a clear message unless HOST is a lab host
# and the lab is up (lab dir, bridge and the host's netns exist).
lab_require_host() {
  lab_check_host "$1"
  [[ -e $LAB_DIR/.vmha-lab ]] || lab_die "the lab is not up (no lab dir $LAB_DIR): run deploy/lab/up first"
  ip link show "$LAB_BRIDGE" >/dev/null 2>&1 || lab_die "the lab is not up (no bridge $LAB_BRIDGE): run deploy/lab/up first"
  lab_netns_exists "$1" || lab_die "lab host $1 does not exist (no netns $(lab_host_netns "$1")): run deploy/lab/up first"
}

# True if the bridge-side end of the host's veth is administratively up, i.e.
# the host is not cut (or killed) off the lab network.
lab_link_up() {
  local flags
  flags=$(ip -o link show dev "$(lab_host_veth "$1")" 2>/dev/null) || return 1
  flags=${flags#*<}
  flags=${flags%%>*}
  [[ ,$flags, == *,UP,* ]]
}

# lab_ms_since START: milliseconds since START (an $EPOCHREALTIME value).
lab_ms_since() { printf '%d\n' $(((${EPOCHREALTIME//[.,]/} - ${1//[.,]/}) / 1000)); }
# lab_secs MS: 1234 -> 1.234
lab_secs() { printf '%d.%03d\n' $(($1 / 1000)) $(($1 % 1000)); }

# Newest installed PostgreSQL server binaries.
lab_pg_bindir() {
  local d
  d=$(find /usr/lib/postgresql -mindepth 2 -maxdepth 2 -name bin -type d 2>/dev/null | sort -V | tail -n1)
  [[ -n $d && -x $d/postgres ]] || lab_die "no PostgreSQL server under /usr/lib/postgresql (run deploy/lab/deps)"
  printf '%s\n' "$d"
}

lab_pg_port() { [[ -r $LAB_DIR/pg/port ]] && cat "$LAB_DIR/pg/port"; }
lab_database_url() { printf 'postgres://postgres@127.0.0.1:%s/vmha\n' "$(lab_pg_port)"; }
