// Package testbroker starts a real Muster broker for tests of other
// packages: the defaults, the development PKI, a random loopback port and
// a store in the test's temporary directory, shut down when the test ends.
package testbroker

import (
	"testing"

	"github.com/muster-io/muster/broker"
	"github.com/muster-io/muster/internal/logging"
)

// Start starts a broker with the default configuration on 127.0.0.1 and a
// free port, its log discarded.
func Start(t testing.TB) *broker.Broker {
	t.Helper()
	cfg := broker.DefaultConfig()
	cfg.Listen = "127.0.0.1:0"
	cfg.StoreDir = t.TempDir()
	b, err := broker.New(cfg, logging.Discard().WithField("component", "broker"))
	if err != nil {
		t.Fatalf("broker: %v", err)
	}
	if err := b.Start(); err != nil {
		t.Fatalf("broker start: %v", err)
	}
	t.Cleanup(b.Shutdown)
	return b
}
