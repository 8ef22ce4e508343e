# shellcheck shell=bash
# The load and the client the live-migration benchmarks (bench/migrate, bench/drain) put on
# the lab's demo guests, which run Linux with a real DNS server (deploy/lab/guest-image).
# Sourced after `eval "$(deploy/lab/up)"`; defines functions only.
#
#   uri_of HOST                    the host's libvirt URI
#   guest_ip GUEST                 the guest's address (it serves DNS there, wherever it runs)
#   writer_start GUEST HOST MIB    in the guest, through its QEMU agent: /usr/lib/vmha/dirty
#                                  rewrites MIB of its RAM with random bytes, over and over,
#                                  until writer_stop (or an hour): a live migration has to
#                                  send those pages again and again, as with a busy guest
#   writer_stop GUEST HOST         stops it and frees its memory
#   client_start GUEST FILE        a DNS client asking the guest every 20 ms
#                                  (deploy/lab/dns-probe) in the background, until
#                                  client_stop; its summary goes to FILE
#   client_stop FILE               stops it; prints "LONGEST_GAP_MS LOST" from its summary

uri_of() { local v="VMHA_LAB_${1^^}_URI"; printf '%s\n' "${!v}"; }
guest_ip() {
  local v="VMHA_LAB_GUEST_${1^^}"
  [[ -n ${!v:-} ]] || { echo "bench: $1 is not a lab demo guest (no $v from deploy/lab/up)" >&2; return 1; }
  printf '%s\n' "${!v}"
}

_guest_exec() {
  local guest=$1 host=$2 path=$3
  shift 3
  local args
  args=$(python3 -c 'import json, sys; print(json.dumps(sys.argv[1:]))' "$@")
  # Right after a migration libvirt says the agent is "not available for now" until the
  # guest's agent has answered on the new host.
  local try
  for try in $(seq 20); do
    virsh -q -c "$(uri_of "$host")" qemu-agent-command "$guest" --timeout 10 \
      "{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"$path\",\"arg\":$args}}" >/dev/null 2>&1 && return 0
    sleep 0.5
  done
  echo "bench: the guest agent of $guest on $host did not run $path" >&2
  return 1
}
writer_start() { _guest_exec "$1" "$2" /usr/lib/vmha/dirty "$3" 3600; }
# The guest's busybox has killall, not pkill.
writer_stop() { _guest_exec "$1" "$2" /bin/sh -c 'killall dirty dd; rm -f /run/dirty'; }

declare -A _client_pid=()
client_start() {
  deploy/lab/dns-probe "$(guest_ip "$1")" --json >"$2" &
  _client_pid[$2]=$!
  # Answered at least once before the move starts, so a gap is the move's.
  sleep 0.3
}
client_stop() {
  kill -TERM "${_client_pid[$1]}"
  wait "${_client_pid[$1]}" || true
  unset "_client_pid[$1]"
  python3 -c 'import json, sys; s = json.load(open(sys.argv[1])); print(round(s["longest_gap_ms"]), s["lost"])' "$1"
}
