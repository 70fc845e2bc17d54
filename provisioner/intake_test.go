package provisioner

import (
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/muster-io/muster/internal/protocol"
)

// TestIntakeCountsWhatItDrops: announcements that come faster than the
// provisioner reads them are held up to the intake's limits; past them
// they are dropped, and every one is either read or counted in
// muster_provisioner_intake_dropped_total and the log, none silently lost.
// Below the limits nothing is dropped.
func TestIntakeCountsWhatItDrops(t *testing.T) {
	url := startServer(t)
	c := newCA(t)
	cfg := testConfig()
	cfg.Interval = Duration(time.Hour) // no discovery broadcasts
	const pending = 20
	r := startProvisioner(t, url, cfg, newTestHelper(c, nil), nil, func(p *Provisioner) {
		p.Pause() // announcements are counted and queued, no node is taken
		p.intake.handoff, p.intake.pendingMsgs, p.intake.reportEvery = 1, pending, 50*time.Millisecond
	})
	nc := connect(t, url)
	publish := func(from, to int) {
		t.Helper()
		for i := from; i < to; i++ {
			id := fmt.Sprintf("n%04d.example.net", i)
			b, _ := json.Marshal(protocol.Metadata{Protocol: protocol.MetadataProto, Identity: id, Time: time.Now().UTC(), Version: "test"})
			if err := nc.Publish(protocol.MetadataSubjectFor(id), b); err != nil {
				t.Fatal(err)
			}
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	discovered := func() int64 { return int64(testutil.ToFloat64(r.p.m.discovered.WithLabelValues(sourceMetadata))) }
	droppedGauge := func() map[string]float64 {
		mfs, err := r.p.Registry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]float64{}
		for _, mf := range mfs {
			if mf.GetName() == "muster_provisioner_intake_dropped_total" {
				for _, m := range mf.GetMetric() {
					out[m.GetLabel()[0].GetValue()] = m.GetCounter().GetValue()
				}
			}
		}
		return out
	}

	// Within the limits, read as they come: nothing dropped.
	publish(0, pending)
	waitFor(t, 10*time.Second, "the first announcements read", func() bool { return discovered() == pending })
	if d := r.p.intake.dropped()[sourceMetadata]; d != 0 {
		t.Fatalf("%d dropped below the limits", d)
	}

	// The provisioner's lock held: messageLoop stops at the first
	// announcement, the callback at the hand-over, and nats.go holds at
	// most `pending` more.
	const burst = 500
	r.p.mu.Lock()
	publish(pending, pending+burst)
	waitFor(t, 10*time.Second, "the burst dropped past the limits", func() bool {
		return r.p.intake.dropped()[sourceMetadata] >= burst-pending-3
	})
	r.p.mu.Unlock()

	waitFor(t, 10*time.Second, "every announcement read or counted as dropped", func() bool {
		return discovered()+r.p.intake.dropped()[sourceMetadata] == pending+burst
	})
	dropped := r.p.intake.dropped()[sourceMetadata]
	g := droppedGauge()
	if len(g) != len(intakeSources) {
		t.Errorf("intake_dropped_total has series %v, want one per source %v", g, intakeSources)
	}
	if g[sourceMetadata] != float64(dropped) || g[sourceStartup] != 0 {
		t.Errorf("intake_dropped_total %v, want metadata %d and no other", g, dropped)
	}
	if q := len(r.p.queue); int64(q) != discovered() {
		t.Errorf("queue depth %d, want every read announcement's node (%d)", q, discovered())
	}
	waitFor(t, 5*time.Second, "the drops logged", func() bool {
		return strings.Contains(r.logs.String(), fmt.Sprintf("dropped_total=%d", dropped))
	})
	// The connection's error handler leaves the intake's slow consumers
	// to the intake and logs the others.
	r.p.intake.mu.Lock()
	intakeSub := r.p.intake.subs[0].sub
	r.p.intake.mu.Unlock()
	other, err := nc.SubscribeSync("other.subject")
	if err != nil {
		t.Fatal(err)
	}
	r.p.asyncError(nc, intakeSub, nats.ErrSlowConsumer)
	if strings.Contains(r.logs.String(), "broker connection error") {
		t.Errorf("the intake's slow consumer was logged as a connection error:\n%s", r.logs.String())
	}
	r.p.asyncError(nc, other, nats.ErrSlowConsumer)
	waitFor(t, 5*time.Second, "another subscription's slow consumer logged", func() bool {
		return strings.Contains(r.logs.String(), "broker connection error") && strings.Contains(r.logs.String(), "other.subject")
	})

	// A new Run keeps the count (the metric is a counter).
	r.cancel()
	<-r.done
	if got := r.p.intake.dropped()[sourceMetadata]; got != dropped {
		t.Errorf("after Run, %d dropped, want %d kept", got, dropped)
	}
}
