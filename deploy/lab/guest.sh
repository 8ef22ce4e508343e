# shellcheck shell=bash
# How a guest built by deploy/lab/guest-image is booted: its kernel command line
# and the pieces of its libvirt domain XML. Sourced (by guest-image-test now,
# by `up` for the lab's demo guests); defines functions only.
#
#   guest_image_dir                        where guest-image builds by default
#   guest_accel                            kvm, or tcg where KVM cannot run a Linux guest
#   guest_cmdline NAME IP/PREFIX [GW [ARG...]]  the kernel command line (ARGs appended,
#                                          e.g. vmha.radius=1)
#   guest_mac NAME                         a fixed MAC for NAME (52:54:00 + 3 bytes of its hash)
#   guest_os_xml DIR NAME IP/PREFIX [GW [ARG...]]  <os> with <kernel>, <initrd>, <cmdline>
#   guest_devices_xml MAC BRIDGE [LOG]     the NIC on BRIDGE, the agent's channel, the serial
#                                          console (copied to the file LOG on the host it runs on)
#
# Example, a guest dns1 on the lab bridge:
#   <domain type='kvm'>
#     <name>dns1</name>
#     <memory unit='MiB'>128</memory>
#     <vcpu>1</vcpu>
#     $(guest_os_xml "$(guest_image_dir)" dns1 10.213.77.21/24 10.213.77.1)
#     <devices>
#       <emulator>/usr/bin/qemu-system-x86_64</emulator>
#       $(guest_devices_xml "$(guest_mac dns1)" vmhabr0)
#     </devices>
#   </domain>
# libvirt reads the kernel and initrd when it starts the guest, on the host it
# starts on: DIR must be at the same path on every host (the lab hosts share
# the root filesystem). The channel has no <source>: libvirt picks the socket's
# path and connects to the agent itself (virsh qemu-agent-command, virsh
# shutdown --mode agent).

guest_image_dir() { echo "${VMHA_LAB_DIR:-${TMPDIR:-/tmp}/vmha-lab}/guest-image"; }

# QEMU's accelerator for these guests on this machine (libvirt: <domain
# type='kvm'> or type='qemu'). Where /dev/kvm is kvm_pvm (KVM nested without
# VMX, as on these sandboxes) it runs firmware (SeaBIOS, the lab's warm-up) but
# emulates a guest kernel instruction by instruction: Debian's kernel takes
# about a minute just to decompress, and KVM stops the guest with an internal
# error at its first cmpxchg16b (SLUB) or xrstor (FPU init), which that
# emulator does not know. TCG boots the same guest in ~10 s there.
guest_accel() {
  if [[ -w /dev/kvm && ! -d /sys/module/kvm_pvm ]]; then echo kvm; else echo tcg; fi
}

guest_cmdline() {
  local name=$1 ip=$2 gw=${3:-}
  shift $(($# < 3 ? $# : 3))
  # No panic=: a guest whose kernel panics hangs, as Debian's kernel does by default. vmha's
  # guest heartbeat notices (its agent falls silent, its I/O stops) and resets it.
  echo "console=ttyS0 vmha.name=$name vmha.ip=$ip${gw:+ vmha.gw=$gw}${*:+ $*}"
}

guest_mac() {
  local h
  h=$(printf '%s' "$1" | sha256sum)
  echo "52:54:00:${h:0:2}:${h:2:2}:${h:4:2}"
}

guest_os_xml() {
  local dir=$1
  shift
  cat <<EOF
<os>
  <type arch='x86_64' machine='pc'>hvm</type>
  <kernel>$dir/vmlinuz</kernel>
  <initrd>$dir/initrd.img</initrd>
  <cmdline>$(guest_cmdline "$@")</cmdline>
</os>
EOF
}

guest_devices_xml() {
  cat <<EOF
<interface type='bridge'>
  <mac address='$1'/>
  <source bridge='$2'/>
  <model type='virtio'/>
</interface>
<channel type='unix'>
  <target type='virtio' name='org.qemu.guest_agent.0'/>
</channel>
<serial type='pty'>${3:+<log file='$3' append='on'/>}</serial>
<console type='pty'/>
EOF
}
