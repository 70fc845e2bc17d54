// Package natstest starts embedded NATS servers for tests: random loopback
// port, store in the test's temporary directory, shut down at cleanup. It
// also hands out ports for listeners that must be known before they start,
// and wraps key-value buckets so that writes lose their replies.
package natstest

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"strconv"
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
	return Start(t, &server.Options{Host: "127.0.0.1", Port: -1, JetStream: js, StoreDir: t.TempDir(), NoLog: true, NoSigs: true}).ClientURL()
}

// Start starts a server with opts, shut down at cleanup, and waits until it takes
// connections.
func Start(t testing.TB, opts *server.Options) *server.Server {
	t.Helper()
	s, err := server.NewServer(opts)
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	t.Cleanup(s.Shutdown)
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	return s
}

// JetStream starts a JetStream server and returns a JetStream context on a
// connection closed at cleanup.
func JetStream(t testing.TB) jetstream.JetStream {
	t.Helper()
	return ConnectJetStream(t, Server(t, true))
}

// ConnectJetStream returns a JetStream context on a connection to url,
// closed at cleanup.
func ConnectJetStream(t testing.TB, url string) jetstream.JetStream {
	t.Helper()
	nc, err := nats.Connect(url)
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

// Cluster starts n plain JetStream nats-servers routed to each other on
// loopback, waits until they have formed the cluster and elected a
// JetStream meta leader, and returns their client URLs.
func Cluster(t testing.TB, n int) []string {
	t.Helper()
	ports := FreePorts(t, n)
	routes := make([]*url.URL, n)
	for i, p := range ports {
		routes[i] = &url.URL{Scheme: "nats-route", Host: net.JoinHostPort("127.0.0.1", strconv.Itoa(p))}
	}
	servers := make([]*server.Server, n)
	urls := make([]string, n)
	for i := range servers {
		s := Start(t, &server.Options{
			ServerName: fmt.Sprintf("s%d", i), Host: "127.0.0.1", Port: -1,
			JetStream: true, StoreDir: t.TempDir(), NoLog: true, NoSigs: true,
			Cluster: server.ClusterOpts{Name: "natstest", Host: "127.0.0.1", Port: ports[i]},
			Routes:  routes,
		})
		servers[i], urls[i] = s, s.ClientURL()
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		formed := true
		for _, s := range servers {
			if s.NumRoutes() < n-1 || !s.JetStreamIsCurrent() {
				formed = false
			}
		}
		if formed && jsLeaderKnown(servers) {
			return urls
		}
		if time.Now().After(deadline) {
			t.Fatalf("cluster of %d not formed in 30 s", n)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// jsLeaderKnown reports whether one of servers is the JetStream meta
// leader.
func jsLeaderKnown(servers []*server.Server) bool {
	for _, s := range servers {
		if s.JetStreamIsLeader() {
			return true
		}
	}
	return false
}
