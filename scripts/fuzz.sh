#!/usr/bin/env bash
# Runs every Go fuzz target in the module for the given time each (default 5s).
#
# Go 1.26's fuzzing coordinator can fail a target with a bare "context
# deadline exceeded" when -fuzztime expires while a worker is mid-call on a
# loaded machine (golang/go#75804, fixed in Go 1.27): no input is written
# and nothing reproduces. A run that failed that way and only that way (no
# failing input written, no panic, no other test output) is run once more;
# any other failure, or the same one twice, fails the script.
set -euo pipefail
t=${1:-5s}
cd "$(dirname "$0")/.."
log=$(mktemp)
trap 'rm -f "$log"' EXIT

# deadline_flake reports whether the log in $1 is the coordinator's race
# and nothing else.
deadline_flake() {
  grep -qx '[[:space:]]*context deadline exceeded' "$1" &&
    ! grep -q 'Failing input written to' "$1" &&
    ! grep -qE '^(panic:|[[:space:]]+[A-Za-z0-9_]+\.go:[0-9]+:)' "$1"
}

for pkg in $(go list ./...); do
  dir=$(go list -f '{{.Dir}}' "$pkg")
  for f in $(grep -ho '^func Fuzz[A-Za-z0-9_]*' "$dir"/*_test.go 2>/dev/null | sed 's/^func //' | sort -u); do
    echo "fuzz $pkg $f ($t)"
    for try in 1 2; do
      if go test -run '^$' -fuzz "^${f}\$" -fuzztime "$t" "$pkg" >"$log" 2>&1; then
        break
      fi
      if [ "$try" = 1 ] && deadline_flake "$log"; then
        echo "fuzz $pkg $f: bare 'context deadline exceeded' at the end of -fuzztime (golang/go#75804); running it again"
        continue
      fi
      cat "$log"
      exit 1
    done
  done
done
echo "fuzz: all targets ran clean"
