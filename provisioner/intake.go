package provisioner

import (
	"context"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sirupsen/logrus"
)

// The intake is how announcements and events reach messageLoop: one
// subscription per subject, each with a callback that hands its messages
// over one at a time, in order. While messageLoop is busy (a storm of
// arrivals with every core doing TLS handshakes), nats.go holds a
// subscription's messages in its pending list, up to a count and a number
// of bytes; past either it drops them (a slow consumer), and the intake
// counts what it dropped.
const (
	// intakeHandoff is the buffer between the callbacks and messageLoop.
	intakeHandoff = 4096
	// intakeMinPending is the least a subscription may hold: the pending
	// count is twice queue_size (metadata and a startup event per node)
	// but no less.
	intakeMinPending = 4096
	// intakePendingBytes bounds the bytes a subscription holds.
	intakePendingBytes = 64 << 20
	// intakeReportEvery is how often dropped messages are logged (when
	// there are new ones).
	intakeReportEvery = 10 * time.Second
)

// intakeSources are the sources an intake subscription can have, in the
// order of their series.
var intakeSources = []string{sourceMetadata, sourceStartup, sourceProduction, sourceAdvisory}

type intakeSub struct {
	sub    *nats.Subscription
	source string
}

// intake holds the subscriptions of one Run and what earlier ones dropped.
type intake struct {
	// Limits, set by New (tests make them small).
	handoff      int
	pendingMsgs  int
	pendingBytes int
	reportEvery  time.Duration

	mu       sync.Mutex
	subs     []intakeSub
	retired  map[string]int64 // dropped by subscriptions already gone
	reported map[string]int64 // dropped counts already logged
}

func newIntake(queueSize int) *intake {
	return &intake{
		handoff:      intakeHandoff,
		pendingMsgs:  max(intakeMinPending, 2*queueSize),
		pendingBytes: intakePendingBytes,
		reportEvery:  intakeReportEvery,
		retired:      map[string]int64{},
		reported:     map[string]int64{},
	}
}

// subscribe subscribes to subject for source, handing every message to
// msgs until ctx ends.
func (in *intake) subscribe(ctx context.Context, nc *nats.Conn, subject, source string, msgs chan<- *nats.Msg) error {
	sub, err := nc.Subscribe(subject, func(m *nats.Msg) {
		select {
		case msgs <- m:
		case <-ctx.Done():
		}
	})
	if err != nil {
		return err
	}
	if err := sub.SetPendingLimits(in.pendingMsgs, in.pendingBytes); err != nil {
		_ = sub.Unsubscribe()
		return err
	}
	in.mu.Lock()
	in.subs = append(in.subs, intakeSub{sub: sub, source: source})
	in.mu.Unlock()
	return nil
}

// isIntake reports whether sub is one of the intake's.
func (in *intake) isIntake(sub *nats.Subscription) bool {
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, s := range in.subs {
		if s.sub == sub {
			return true
		}
	}
	return false
}

// unsubscribe ends every subscription, keeping what each dropped.
func (in *intake) unsubscribe() {
	in.mu.Lock()
	defer in.mu.Unlock()
	for _, s := range in.subs {
		if d, err := s.sub.Dropped(); err == nil {
			in.retired[s.source] += int64(d)
		}
		_ = s.sub.Unsubscribe()
	}
	in.subs = nil
}

// dropped returns the messages dropped so far, by source.
func (in *intake) dropped() map[string]int64 {
	in.mu.Lock()
	defer in.mu.Unlock()
	return in.droppedLocked()
}

func (in *intake) droppedLocked() map[string]int64 {
	out := make(map[string]int64, len(intakeSources))
	for src, n := range in.retired {
		out[src] = n
	}
	for _, s := range in.subs {
		if d, err := s.sub.Dropped(); err == nil {
			out[s.source] += int64(d)
		}
	}
	return out
}

// report logs the messages dropped since the last report, by source.
func (in *intake) report(log logrus.FieldLogger, queueSize int) {
	in.mu.Lock()
	now := in.droppedLocked()
	fresh := map[string]int64{}
	for src, n := range now {
		if d := n - in.reported[src]; d > 0 {
			fresh[src] = d
		}
		in.reported[src] = n
	}
	in.mu.Unlock()
	for _, src := range intakeSources {
		if fresh[src] == 0 {
			continue
		}
		log.WithFields(logrus.Fields{"source": src, "dropped": fresh[src], "dropped_total": now[src], "pending_limit": in.pendingMsgs}).
			Warnf("intake full: dropped %d %s messages the provisioner could not read in time; their nodes are taken when they announce again (the intake holds %d messages a subject, twice queue_size %d but at least %d: a larger queue_size holds more)", fresh[src], src, in.pendingMsgs, queueSize, intakeMinPending)
	}
}
