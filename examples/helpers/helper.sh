#!/usr/bin/env bash
# Example Muster / Choria provisioning helper in bash + jq.
#
# Reads the request JSON on stdin and writes the reply JSON on stdout:
#   - defers the node when its fact "defer" is "true";
#   - picks plugin.choria.middleware_hosts by the "country" fact
#     (mt -> choria1.mt.example.net:4223, otherwise $MUSTER_BROKER,
#     default localhost:4222);
#   - signs the node's CSR with the CA in $MUSTER_CA_DIR and returns the
#     certificate, the CA and the ssldir. It signs with "muster-helper sign"
#     ($MUSTER_HELPER_BIN, else muster-helper on the PATH), which starts in
#     a few milliseconds, else with "${MUSTER_BIN:-muster} ca sign".
# Diagnostics go to stderr (Muster keeps a bounded copy); exit 1 on error.
#
# Each request costs two jq runs and one signer run: every process a helper
# starts is paid once per node (docs/performance.md).
#
# With --persistent it is a persistent helper (docs/helpers.md): one request
# per stdin line, one reply line per request tagged with its request_id,
# {"request_id": ..., "error": ...} for a request it cannot answer. It
# answers one line at a time, in order.
set -euo pipefail

die() { echo "helper.sh: $*" >&2; exit 1; }
command -v jq >/dev/null || die "jq is required"

if [ -n "${MUSTER_HELPER_BIN:-}" ]; then
  signer=("$MUSTER_HELPER_BIN" sign --ca-dir)
elif command -v muster-helper >/dev/null; then
  signer=(muster-helper sign --ca-dir)
else
  signer=("${MUSTER_BIN:-muster}" ca sign --csr - --dir)
fi

# answer writes the reply to the request in $1 as one line of JSON; it runs
# in a subshell, so die ends only this request.
answer() {
  local request=$1 fields identity defer country has_csr ssldir csr brokers certificate="" ca=""
  # One jq run reads every field. Each value is made a string first
  # (tostring) and then quoted by @sh as one shell word, so eval only ever
  # assigns: facts come from the node and must never become shell code. The
  # CSR spans lines, which @sh keeps. The inventory is a JSON *string*
  # holding an object.
  fields=$(jq -r '
    ((.inventory // "") | if . == "" then {} else fromjson end | .facts // {}) as $facts
    | @sh "identity=\(.identity // "" | tostring)",
      @sh "defer=\($facts.defer // "" | tostring)",
      @sh "country=\($facts.country // "" | tostring)",
      @sh "has_csr=\(if .csr == null then "no" else "yes" end)",
      @sh "ssldir=\(.csr.ssldir // "/etc/muster/ssl" | tostring)",
      @sh "csr=\(.csr.csr // "" | tostring)"' <<<"$request") || die "request is not JSON, or its inventory is not a JSON object"
  eval "$fields"
  [ -n "$identity" ] || die "request has no identity"

  if [ "$defer" = "true" ]; then
    jq -cn --arg id "$identity" '{defer: true, msg: ("node " + $id + " asked to be deferred")}'
    return 0
  fi

  case "$country" in
    mt) brokers="choria1.mt.example.net:4223" ;;
    *) brokers="${MUSTER_BROKER:-localhost:4222}" ;;
  esac

  if [ "$has_csr" = "yes" ]; then
    : "${MUSTER_CA_DIR:?MUSTER_CA_DIR must name the CA directory}"
    certificate=$("${signer[@]}" "$MUSTER_CA_DIR" <<<"$csr") || die "signing the CSR of $identity failed"
    ca=$(<"$MUSTER_CA_DIR/ca.pem") || die "cannot read the CA certificate"
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
  answer "$(</dev/stdin)"
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
