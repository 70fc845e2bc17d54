#!/usr/bin/env bash
# Installs what the test suite needs beyond Go: the interpreters of the example
# helpers (jq and gojq for the shell helper, which runs either, python3, ruby). Tests skip an example whose
# interpreter is missing, with a message, so a developer without root still
# gets a green run; CI (CI=true) must have them all and fails if it cannot.
set -euo pipefail

missing=()
command -v jq >/dev/null 2>&1 || missing+=(jq)
command -v gojq >/dev/null 2>&1 || missing+=(gojq)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
command -v ruby >/dev/null 2>&1 || missing+=(ruby)

if [ ${#missing[@]} -eq 0 ]; then
  exit 0
fi

if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "install-test-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  exit 0
fi

if [ "${CI:-}" = "true" ]; then
  echo "install-test-deps: ${missing[*]} missing and cannot be installed (not root or no apt-get)" >&2
  exit 1
fi
echo "install-test-deps: ${missing[*]} not installed; the example helper tests for them will be skipped"
