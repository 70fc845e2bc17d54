// Package natstest starts embedded NATS servers for tests: random loopback
// port, store in the test's temporary directory, shut down at cleanup. It
// also hands out ports for listeners that must be known before they start,
// and wraps key-value buckets so that writes lose their replies.
package natstest

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
)

// Server starts a plain nats-server (JetStream when js is true) and returns
// its client URL.
func Server(t testing.TB, js bool) string {
	t.Helper()
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, JetStream: js, StoreDir: t.TempDir(), NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	t.Cleanup(s.Shutdown)
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	return s.ClientURL()
}

// JetStream starts a JetStream server and returns a JetStream context on a
// connection closed at cleanup.
func JetStream(t testing.TB) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(Server(t, true))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	return js
}

// LosingKV is a key-value bucket whose writes can be made to lose their
// replies (the write is made, and the caller gets a timeout, as when a
// reply is lost or comes after the caller's deadline) or to time out
// unmade.
type LosingKV struct {
	jetstream.KeyValue
	lose, drop atomic.Int32
}

// LoseReplies wraps kv; nothing is lost until Lose or Drop is called.
func LoseReplies(kv jetstream.KeyValue) *LosingKV {
	return &LosingKV{KeyValue: kv}
}

// Lose makes the next n compare-and-set writes (Create, Update) lose their
// replies.
func (l *LosingKV) Lose(n int) { l.lose.Store(int32(n)) }

// Drop makes the next n compare-and-set writes time out without being
// made.
func (l *LosingKV) Drop(n int) { l.drop.Store(int32(n)) }

// Left is how many of the writes Lose and Drop asked for are still to come.
func (l *LosingKV) Left() int { return int(l.lose.Load() + l.drop.Load()) }

// take counts one write off c, if any is left.
func take(c *atomic.Int32) bool {
	for {
		n := c.Load()
		if n <= 0 {
			return false
		}
		if c.CompareAndSwap(n, n-1) {
			return true
		}
	}
}

// write makes a write unless it is to be dropped, and loses its reply when
// it is to be lost.
func (l *LosingKV) write(do func() (uint64, error)) (uint64, error) {
	if take(&l.drop) {
		return 0, context.DeadlineExceeded
	}
	rev, err := do()
	if err == nil && take(&l.lose) {
		return 0, context.DeadlineExceeded
	}
	return rev, err
}

// Create creates key, unless dropped; the reply may be lost.
func (l *LosingKV) Create(ctx context.Context, key string, value []byte, opts ...jetstream.KVCreateOpt) (uint64, error) {
	return l.write(func() (uint64, error) { return l.KeyValue.Create(ctx, key, value, opts...) })
}

// Update updates key, unless dropped; the reply may be lost.
func (l *LosingKV) Update(ctx context.Context, key string, value []byte, revision uint64) (uint64, error) {
	return l.write(func() (uint64, error) { return l.KeyValue.Update(ctx, key, value, revision) })
}
