package demo

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/muster-io/muster/agent"
)

// TestOnProvisionedBeforeCounted: a node reaching production is passed to
// OnProvisioned before ProductionCount counts it, and only the first time,
// so whoever WaitProduction releases finds the callback run for every
// node. (The demo's progress line once ended at 9/10 with all 10 nodes
// provisioned: the count came first.)
func TestOnProvisionedBeforeCounted(t *testing.T) {
	entered, release := make(chan struct{}), make(chan struct{})
	var calls atomic.Int32
	f := &Fleet{
		production: map[string]time.Time{},
		prodCh:     make(chan struct{}, 1),
		opts: Options{OnProvisioned: func(string, time.Time) {
			if calls.Add(1) == 1 {
				close(entered)
				<-release
			}
		}},
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		observer{f}.ModeChanged("node1", agent.ModeProduction, time.Now())
	}()
	<-entered
	if n := f.ProductionCount(); n != 0 {
		t.Errorf("node counted (%d) while its OnProvisioned still runs", n)
	}
	close(release)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if n := f.WaitProduction(ctx, 1); n != 1 {
		t.Fatalf("WaitProduction = %d, want 1", n)
	}
	<-done
	observer{f}.ModeChanged("node1", agent.ModeProduction, time.Now())
	if n := calls.Load(); n != 1 {
		t.Errorf("OnProvisioned called %d times for one node", n)
	}
}
