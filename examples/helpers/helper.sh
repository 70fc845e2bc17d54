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
# Each request costs one jq run and one signer run: every process a helper
# starts is paid once per node (docs/performance.md). jq reads the request
# and also JSON-encodes every value taken from it; bash only puts the reply
# together from those pieces, without starting a subshell of its own.
#
# The jq it runs is $JQ if set, else gojq (the Go implementation of jq) when
# it is on the PATH, else jq. The start is most of what a run costs: jq 1.6
# (Debian 12) takes ~35 ms to start, gojq ~3 ms.
#
# With --persistent it is a persistent helper (docs/helpers.md): one request
# per stdin line, one reply line per request tagged with its request_id,
# {"request_id": ..., "error": ...} for a request it cannot answer. It
# answers one line at a time, in order.
set -euo pipefail

persistent=no
[ "${1:-}" = "--persistent" ] && persistent=yes
j_rid='""' # the request's request_id, JSON-encoded (persistent mode)

# json_str sets the variable named $1 to $2 as a JSON string (printf -v: no
# subshell). Only for text of this script and of the operator's
# environment: values from the request are encoded by jq.
json_str() {
  local s=$2
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\r'/\\r}
  s=${s//$'\t'/\\t}
  s=${s//[$'\001'-$'\037']/}
  printf -v "$1" '"%s"' "$s"
}

# pem_str sets the variable named $1 to the PEM text $2 as a JSON string:
# PEM is base64 lines between BEGIN/END lines, so newlines are all there is
# to escape; anything else is refused.
pem_str() {
  case $2 in
  *[!A-Za-z0-9+/=\ $'\n'-]*) return 1 ;;
  esac
  printf -v "$1" '"%s"' "${2//$'\n'/\\n}"
}

die() {
  echo "helper.sh: $*" >&2
  if [ "$persistent" = yes ]; then
    local j_err
    json_str j_err "helper.sh: $*"
    printf '{"request_id":%s,"error":%s}\n' "$j_rid" "$j_err"
  fi
  exit 1
}
if [ -n "${JQ:-}" ]; then
  jq=$JQ
elif command -v gojq >/dev/null; then
  jq=gojq
else
  jq=jq
fi
command -v "$jq" >/dev/null || die "jq is required (tried $jq)"

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
  # Whatever else fails still gets an answer (set -e ends the request).
  trap 'die "failed at line $LINENO"' ERR
  local request=$1 fields
  local identity="" defer="" country="" has_csr="" csr="" inventory_ok=""
  local j_id="" j_ssldir="" j_cert_file="" j_key_file="" j_ca_file="" j_msg="" j_defer_msg=""
  # One jq run reads every field. Each value is made a string first
  # (tostring) and then quoted by @sh as one shell word, so eval only ever
  # assigns: facts come from the node and must never become shell code.
  # The j_* values are JSON texts (@json) of what goes back in the reply.
  # The CSR spans lines, which @sh keeps. The inventory is a JSON *string*
  # holding an object; a bad one is reported after the request_id is known.
  fields=$(exec "$jq" -r '
    (.request_id // "" | tostring) as $rid
    | ((.inventory // "") | if . == "" then {} else (try fromjson catch null) end) as $inv
    | (if ($inv | type) == "object" then ($inv.facts // {}) else {} end) as $facts
    | (.identity // "" | tostring) as $id
    | (.csr.ssldir // "/etc/muster/ssl" | tostring) as $ssldir
    | @sh "j_rid=\($rid | @json)",
      @sh "inventory_ok=\(if ($inv | type) == "object" then "yes" else "no" end)",
      @sh "identity=\($id)",
      @sh "defer=\($facts.defer // "" | tostring)",
      @sh "country=\($facts.country // "" | tostring)",
      @sh "has_csr=\(if .csr == null then "no" else "yes" end)",
      @sh "csr=\(.csr.csr // "" | tostring)",
      @sh "j_id=\($id | @json)",
      @sh "j_ssldir=\($ssldir | @json)",
      @sh "j_cert_file=\($ssldir + "/certificate.pem" | @json)",
      @sh "j_key_file=\($ssldir + "/private.pem" | @json)",
      @sh "j_ca_file=\($ssldir + "/ca.pem" | @json)",
      @sh "j_msg=\("configured " + $id | @json)",
      @sh "j_defer_msg=\("node " + $id + " asked to be deferred" | @json)"' <<<"$request") || die "request is not JSON"
  eval "$fields"
  [ "$inventory_ok" = yes ] || die "the request's inventory is not a JSON object"
  [ -n "$identity" ] || die "request has no identity"

  local tag=""
  [ "$persistent" = yes ] && tag=",\"request_id\":$j_rid"

  if [ "$defer" = "true" ]; then
    printf '{"defer":true,"msg":%s%s}\n' "$j_defer_msg" "$tag"
    return 0
  fi

  local brokers j_brokers
  case "$country" in
  mt) brokers="choria1.mt.example.net:4223" ;;
  *) brokers="${MUSTER_BROKER:-localhost:4222}" ;;
  esac
  json_str j_brokers "$brokers"

  local tls=""
  if [ "$has_csr" = "yes" ]; then
    [ -n "${MUSTER_CA_DIR:-}" ] || die "MUSTER_CA_DIR must name the CA directory"
    local certificate ca j_cert j_ca
    certificate=$(exec "${signer[@]}" "$MUSTER_CA_DIR" <<<"$csr") || die "signing the CSR of $identity failed"
    ca=$(<"$MUSTER_CA_DIR/ca.pem") || die "cannot read the CA certificate"
    pem_str j_cert "$certificate" || die "the signer's output is not PEM"
    pem_str j_ca "$ca" || die "$MUSTER_CA_DIR/ca.pem is not PEM"
    tls=",\"certificate\":$j_cert,\"ca\":$j_ca,\"ssldir\":$j_ssldir"
  fi

  printf '{"defer":false,"msg":%s,"configuration":{"identity":%s,"plugin.choria.middleware_hosts":%s,"plugin.security.provider":"file","plugin.security.file.certificate":%s,"plugin.security.file.key":%s,"plugin.security.file.ca":%s,"plugin.choria.server.provision":"false"}%s%s}\n' \
    "$j_msg" "$j_id" "$j_brokers" "$j_cert_file" "$j_key_file" "$j_ca_file" "$tls" "$tag"
}

if [ "$persistent" = no ]; then
  answer "$(</dev/stdin)"
  exit 0
fi

while IFS= read -r line || [ -n "$line" ]; do
  [ -n "${line//[[:space:]]/}" ] || continue
  (answer "$line") || true
done
