package main

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/muster-io/muster/broker"
	"github.com/muster-io/muster/internal/natstest"
	"github.com/muster-io/muster/internal/syncbuf"
)

// TestRunBrokerClustered runs a one-broker cluster (route listener, no
// peers yet) through runBroker and checks what it prints.
func TestRunBrokerClustered(t *testing.T) {
	cfg := broker.DefaultConfig()
	cfg.Listen = "127.0.0.1:0"
	cfg.StoreDir = t.TempDir()
	cfg.LogLevel = "error"
	cfg.LogFile = filepath.Join(t.TempDir(), "broker.log")
	// The peer does not exist: the broker keeps trying it and runs alone.
	peer := fmt.Sprintf("nats-route://127.0.0.1:%d", natstest.FreePorts(t, 1)[0])
	cfg.Cluster = broker.ClusterConfig{Name: "cli-test", ServerName: "solo", Listen: "127.0.0.1:0", Routes: []string{peer}}
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	out := &syncbuf.Buffer{}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- runBroker(ctx, out, cfg) }()
	deadline := time.Now().Add(30 * time.Second)
	for !strings.Contains(out.String(), "cluster CA file") {
		if time.Now().After(deadline) {
			cancel()
			t.Fatalf("no cluster lines:\n%s", out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("runBroker: %v", err)
	}
	got := out.String()
	for _, want := range []string{"cluster           cli-test as solo, route URL nats-route://127.0.0.1:", "JetStream replicas 2", "pki/cluster/ca.pem"} {
		if !strings.Contains(got, want) {
			t.Errorf("output lacks %q:\n%s", want, got)
		}
	}
	if strings.Contains(got, "nats-route://127.0.0.1:0\n") {
		t.Errorf("route URL without the real port:\n%s", got)
	}
}
