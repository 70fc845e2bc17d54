#!/usr/bin/env bash
# Example Muster / Choria provisioning helper in bash + jq.
#
# Reads the request JSON on stdin and writes the reply JSON on stdout:
#   - defers the node when its fact "defer" is "true";
#   - picks plugin.choria.middleware_hosts by the "country" fact
#     (mt -> choria1.mt.example.net:4223, otherwise $MUSTER_BROKER,
#     default localhost:4222);
#   - signs the node's CSR with "${MUSTER_BIN:-muster} ca sign" using the CA
#     in $MUSTER_CA_DIR and returns the certificate, the CA and the ssldir.
# Diagnostics go to stderr (Muster keeps a bounded copy); exit 1 on error.
#
# With --persistent it is a persistent helper (docs/helpers.md): one request
# per stdin line, one reply line per request tagged with its request_id,
# {"request_id": ..., "error": ...} for a request it cannot answer. It
# answers one line at a time, in order.
set -euo pipefail

die() { echo "helper.sh: $*" >&2; exit 1; }
command -v jq >/dev/null || die "jq is required"

# answer writes the reply to the request in $1 as one line of JSON; it runs
# in a subshell, so die ends only this request.
answer() {
  local request=$1 identity inventory facts brokers has_csr ssldir certificate ca
  identity=$(jq -er '.identity' <<<"$request") || die "request has no identity"
  # The inventory is a JSON *string* holding an object.
  inventory=$(jq -r '.inventory // "{}" | if . == "" then "{}" else . end' <<<"$request") || die "request has no inventory string"
  facts=$(jq -c '.facts // {}' <<<"$inventory") || die "inventory is not JSON"

  if [ "$(jq -r '.defer // ""' <<<"$facts")" = "true" ]; then
    jq -cn --arg id "$identity" '{defer: true, msg: ("node " + $id + " asked to be deferred")}'
    return 0
  fi

  case "$(jq -r '.country // ""' <<<"$facts")" in
    mt) brokers="choria1.mt.example.net:4223" ;;
    *) brokers="${MUSTER_BROKER:-localhost:4222}" ;;
  esac

  has_csr=$(jq -r 'if .csr == null then "no" else "yes" end' <<<"$request") || die "request csr unreadable"
  ssldir=$(jq -r '.csr.ssldir // "/etc/muster/ssl"' <<<"$request")
  certificate=""
  ca=""
  if [ "$has_csr" = "yes" ]; then
    : "${MUSTER_CA_DIR:?MUSTER_CA_DIR must name the CA directory}"
    certificate=$(jq -r '.csr.csr' <<<"$request" |
      "${MUSTER_BIN:-muster}" ca sign --dir "$MUSTER_CA_DIR" --csr -) || die "signing the CSR of $identity failed"
    ca=$(cat "$MUSTER_CA_DIR/ca.pem") || die "cannot read the CA certificate"
  fi

  jq -cn \
    --arg id "$identity" --arg brokers "$brokers" --arg ssldir "$ssldir" \
    --arg cert "$certificate" --arg ca "$ca" --arg has_csr "$has_csr" '
    {
      defer: false,
      msg: ("configured " + $id),
      configuration: {
        "identity": $id,
        "plugin.choria.middleware_hosts": $brokers,
        "plugin.security.provider": "file",
        "plugin.security.file.certificate": ($ssldir + "/certificate.pem"),
        "plugin.security.file.key": ($ssldir + "/private.pem"),
        "plugin.security.file.ca": ($ssldir + "/ca.pem"),
        "plugin.choria.server.provision": "false"
      }
    }
    + (if $has_csr == "yes" then {certificate: $cert, ca: $ca, ssldir: $ssldir} else {} end)'
}

if [ "${1:-}" != "--persistent" ]; then
  answer "$(cat)"
  exit 0
fi

errors=$(mktemp)
trap 'rm -f "$errors"' EXIT
while IFS= read -r line || [ -n "$line" ]; do
  [ -n "${line//[[:space:]]/}" ] || continue
  request_id=$(jq -r '.request_id // ""' <<<"$line" 2>/dev/null) || request_id=""
  if reply=$(answer "$line" 2>"$errors"); then
    jq -c --arg rid "$request_id" '. + {request_id: $rid}' <<<"$reply"
  else
    cat "$errors" >&2
    why=$(tail -n 1 "$errors")
    jq -cn --arg rid "$request_id" --arg why "${why:-request failed}" '{request_id: $rid, error: $why}'
  fi
done
