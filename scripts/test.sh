#!/usr/bin/env bash
# The whole test suite, as the README's quick start and CI run it:
# test dependencies, formatting, vet, the race-enabled tests, and every fuzz
# target for a few seconds.
set -euo pipefail
cd "$(dirname "$0")/.."

./scripts/install-test-deps.sh

echo "== gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' 2>/dev/null || find . -name '*.go' -not -path './.git/*'))
if [ -n "$unformatted" ]; then
  echo "gofmt needed:"; echo "$unformatted"; exit 1
fi

echo "== go vet"
go vet ./...

race=-race
if ! command -v gcc >/dev/null 2>&1 && [ "${CGO_ENABLED:-}" != "1" ]; then
  if [ "${CI:-}" = "true" ]; then
    echo "go test -race needs a C compiler (gcc) and none is installed" >&2; exit 1
  fi
  echo "== no C compiler: running the tests without -race"
  race=
fi

echo "== go test $race"
go test $race -count=1 -timeout 20m ./...

echo "== fuzz (${FUZZTIME:-5s} per target)"
./scripts/fuzz.sh "${FUZZTIME:-5s}"
