package patience

import (
	"io"
	"net"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/natstest"
	"github.com/muster-io/muster/internal/syncbuf"
)

func captureLog() (*logrus.Entry, *syncbuf.Buffer) { return syncbuf.Logger(logrus.InfoLevel) }

// slowBroker is a real nats-server behind a proxy that takes delay before
// it passes a new connection on: a broker busy with a backlog of
// handshakes, which accepts at once and answers late.
func slowBroker(t *testing.T, delay time.Duration) string {
	t.Helper()
	return "nats://" + natstest.Delayed(t, strings.TrimPrefix(natstest.Server(t, false), "nats://"), delay)
}

func dialWith(p *Patience, url string) (*nats.Conn, error) {
	return nats.Connect(url, nats.SetCustomDialer(p), nats.Timeout(p.base), nats.NoReconnect())
}

// TestGrowsWithABusyBroker: attempts that run out of time double the next
// attempt's time until one completes, which sets it back, and the time
// nats.go was given does not cut them short.
func TestGrowsWithABusyBroker(t *testing.T) {
	const base = 50 * time.Millisecond
	// Every attempt of 50, 100 and 200 ms ends before the broker answers.
	url := slowBroker(t, 300*time.Millisecond)
	log, buf := captureLog()
	p := New(base, base, nil, log)
	var timeouts []time.Duration
	for len(timeouts) < 10 {
		nc, err := dialWith(p, url)
		if err == nil {
			if err := nc.Flush(); err != nil {
				t.Fatalf("flush through the attempt's connection: %v", err)
			}
			nc.Close()
			break
		}
		timeouts = append(timeouts, p.Timeout())
	}
	if len(timeouts) < 3 || len(timeouts) == 10 {
		t.Fatalf("timeouts after each failed attempt %v: want at least 3 failures, then a connection", timeouts)
	}
	want := base
	for i, got := range timeouts {
		want *= 2
		if got != want {
			t.Errorf("after failure %d the timeout is %s, want %s", i+1, got, want)
		}
	}
	if got := p.Timeout(); got != base {
		t.Errorf("after the connection the timeout is %s, want %s again", got, base)
	}
	if n := strings.Count(buf.String(), "the next attempt may take longer"); n != len(timeouts) {
		t.Errorf("logged the growth %d times, want %d:\n%s", n, len(timeouts), buf)
	}
}

// TestOnlyGrowsForTimeouts: a broker that accepts and closes (a refusal,
// a reset) sets the timeout back; a broker that cannot be reached leaves
// it as it is; the timeout never passes its cap.
func TestOnlyGrowsForTimeouts(t *testing.T) {
	const base = 50 * time.Millisecond
	silent := "nats://" + natstest.Listen(t, func(c net.Conn) { _, _ = io.Copy(io.Discard, c) })
	closing := "nats://" + natstest.Listen(t, func(c net.Conn) { c.Close() })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gone := "nats://" + l.Addr().String()
	l.Close()

	log, _ := captureLog()
	p := New(base, base, nil, log)
	step := func(url string, want time.Duration) {
		t.Helper()
		nc, err := dialWith(p, url)
		if err == nil {
			nc.Close()
			t.Fatalf("%s: connected", url)
		}
		if got := p.Timeout(); got != want {
			t.Errorf("%s (%v): timeout %s, want %s", url, err, got, want)
		}
	}
	step(silent, 2*base)
	step(gone, 2*base)
	step(closing, base)

	p.current = Max
	p.ended(true)
	if got := p.Timeout(); got != Max {
		t.Errorf("timeout past the cap: %s", got)
	}
	slow := New(10*time.Minute, base, nil, log)
	slow.ended(true)
	if got := slow.Timeout(); got != 10*time.Minute {
		t.Errorf("a base above the cap: timeout %s after a timeout, want the base", got)
	}
}

// TestInProcess: in-process connections go through the patience too, and
// a completed connect process leaves it at its base.
func TestInProcess(t *testing.T) {
	s := natstest.Start(t, &server.Options{DontListen: true, NoLog: true, NoSigs: true})
	log, _ := captureLog()
	p := New(time.Second, time.Second, s, log)
	p.current = 4 * time.Second
	nc, err := nats.Connect("", nats.InProcessServer(p), nats.SetCustomDialer(p), nats.NoReconnect())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := p.Timeout(); got != time.Second {
		t.Errorf("timeout after an in-process connection %s, want the base", got)
	}
}
