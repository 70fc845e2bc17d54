package agent

import (
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/muster-io/muster/internal/natstest"
	"github.com/muster-io/muster/internal/protocol"
)

// listen starts a loopback listener that hands every connection it accepts
// to serve, closed at cleanup with every connection still open; it returns
// the listener's host:port.
func listen(t *testing.T, serve func(net.Conn)) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var open []net.Conn
	var wg sync.WaitGroup
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range open {
			c.Close()
		}
		mu.Unlock()
		wg.Wait()
	})
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			open = append(open, c)
			mu.Unlock()
			wg.Add(1)
			go func() {
				defer wg.Done()
				serve(c)
			}()
		}
	}()
	return l.Addr().String()
}

// slowBroker is a real nats-server behind a proxy that takes delay before
// it passes a new connection on: a broker busy with a backlog of
// handshakes, which accepts at once and answers late.
func slowBroker(t *testing.T, delay time.Duration) string {
	t.Helper()
	return "nats://" + delayed(t, strings.TrimPrefix(natstest.Server(t, false), "nats://"), delay)
}

// delayed is a proxy to the broker at backend (host:port) that passes a new
// connection on after delay; it returns the proxy's host:port.
func delayed(t *testing.T, backend string, delay time.Duration) string {
	t.Helper()
	return listen(t, func(c net.Conn) {
		defer c.Close()
		time.Sleep(delay)
		b, err := net.Dial("tcp", backend)
		if err != nil {
			return
		}
		defer b.Close()
		go func() {
			_, _ = io.Copy(b, c)
			b.Close()
		}()
		_, _ = io.Copy(c, b)
	})
}

// patienceOf is a patience whose first attempt and TCP connect may take
// base, below the bounds of a link's.
func patienceOf(base time.Duration, inProcess nats.InProcessConnProvider) *patience {
	log, _ := captureLog()
	return &patience{base: base, current: base, dialer: net.Dialer{Timeout: base}, inProcess: inProcess, log: log}
}

func dialWith(p *patience, url string) (*nats.Conn, error) {
	return nats.Connect(url, nats.SetCustomDialer(p), nats.Timeout(p.base), nats.NoReconnect())
}

// TestPatienceGrowsWithABusyBroker: attempts that run out of time double
// the next attempt's time until one completes, which sets it back, and
// the time nats.go was given does not cut them short.
func TestPatienceGrowsWithABusyBroker(t *testing.T) {
	const base = 50 * time.Millisecond
	// Every attempt of 50, 100 and 200 ms ends before the broker answers.
	url := slowBroker(t, 300*time.Millisecond)
	log, buf := captureLog()
	p := patienceOf(base, nil)
	p.log = log
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
		timeouts = append(timeouts, p.timeout())
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
	if got := p.timeout(); got != base {
		t.Errorf("after the connection the timeout is %s, want %s again", got, base)
	}
	if n := strings.Count(buf.String(), "the next attempt may take longer"); n != len(timeouts) {
		t.Errorf("logged the growth %d times, want %d:\n%s", n, len(timeouts), buf)
	}
}

// TestPatienceOnlyGrowsForTimeouts: a broker that accepts and closes (a
// refusal, a reset) sets the timeout back; a broker that cannot be
// reached leaves it as it is; the timeout never passes its cap.
func TestPatienceOnlyGrowsForTimeouts(t *testing.T) {
	const base = 50 * time.Millisecond
	silent := "nats://" + listen(t, func(c net.Conn) { _, _ = io.Copy(io.Discard, c) })
	closing := "nats://" + listen(t, func(c net.Conn) { c.Close() })
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	gone := "nats://" + l.Addr().String()
	l.Close()

	p := patienceOf(base, nil)
	step := func(url string, want time.Duration) {
		t.Helper()
		nc, err := dialWith(p, url)
		if err == nil {
			nc.Close()
			t.Fatalf("%s: connected", url)
		}
		if got := p.timeout(); got != want {
			t.Errorf("%s (%v): timeout %s, want %s", url, err, got, want)
		}
	}
	step(silent, 2*base)
	step(gone, 2*base)
	step(closing, base)

	p.current = maxPatience
	p.ended(true)
	if got := p.timeout(); got != maxPatience {
		t.Errorf("timeout past the cap: %s", got)
	}
	slow := patienceOf(10*time.Minute, nil)
	slow.ended(true)
	if got := slow.timeout(); got != 10*time.Minute {
		t.Errorf("a base above the cap: timeout %s after a timeout, want the base", got)
	}
}

// TestPatienceInProcess: in-process connections go through the patience
// too, and a completed connect process leaves it at its base.
func TestPatienceInProcess(t *testing.T) {
	s := startServer(t, &server.Options{DontListen: true, NoLog: true, NoSigs: true})
	p := patienceOf(time.Second, s)
	p.current = 4 * time.Second
	nc, err := nats.Connect("", nats.InProcessServer(p), nats.SetCustomDialer(p), nats.NoReconnect())
	if err != nil {
		t.Fatal(err)
	}
	defer nc.Close()
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := p.timeout(); got != time.Second {
		t.Errorf("timeout after an in-process connection %s, want the base", got)
	}
}

// TestAgentWaitsForABusyBroker: an agent whose provisioning broker answers
// only after the first attempt's time gives that attempt up, allows the
// next one longer, and reaches the broker over TLS; with a fixed timeout
// every attempt would end the same way.
func TestAgentWaitsForABusyBroker(t *testing.T) {
	const id = "patient1"
	e := newEnv(t)
	nc := e.client(t)
	events := record(t, nc, protocol.LifecyclePrefix+".>")
	// The shortest alive interval gives the shortest first attempt: 2 s.
	url := "tls://" + delayed(t, strings.TrimPrefix(e.url, "tls://"), minConnectTimeout+time.Second)
	log, buf := captureLog()
	startAgent(t, Options{Identity: id, StateDir: t.TempDir(), Logger: log, AliveInterval: MinAliveInterval, ReconnectWait: 50 * time.Millisecond,
		Provisioning: ProvisioningSettings{Brokers: []string{url}, CAFile: e.caFile, Enabled: true, TrustedKeys: testTrusted}})
	eventually(t, "startup through the slow broker", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 1 })
	if n := strings.Count(buf.String(), "the next attempt may take longer"); n < 1 {
		t.Errorf("no attempt ran out of time first:\n%s", buf)
	}
}

// refuser refuses the first connections named id.
type refuser struct {
	id   string
	left atomic.Int32
}

func (r *refuser) Check(c server.ClientAuthentication) bool {
	return c.GetOpts().Name != r.id || r.left.Add(-1) < 0
}

// TestProvisioningOutlastsRefusals: a provisioning broker that refuses the
// agent more than twice does not end its attempts, as nats.go does by
// default after the same authorization error twice from one broker. A
// broker refuses a node for a while when it still holds the node's
// connection from an attempt the node gave up (an identity already
// connected), or when the node's token is not valid yet by the broker's
// clock; in an 8,900-node storm over TCP 41 agents stopped that way.
func TestProvisioningOutlastsRefusals(t *testing.T) {
	const id = "refused1"
	r := &refuser{id: id}
	r.left.Store(4)
	e := newEnvWith(t, func(o *server.Options) { o.CustomClientAuthentication = r })
	nc := e.client(t)
	events := record(t, nc, protocol.LifecyclePrefix+".>")
	startAgent(t, Options{Identity: id, StateDir: t.TempDir(), ReconnectWait: 10 * time.Millisecond, ReconnectMaxWait: 20 * time.Millisecond,
		Provisioning: ProvisioningSettings{Brokers: []string{e.url}, CAFile: e.caFile, Enabled: true, TrustedKeys: testTrusted}})
	eventually(t, "startup after the refusals", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 1 })
	if n := r.left.Load(); n >= 0 {
		t.Errorf("%d refusals left", n+1)
	}
}

// TestProvisioningSaysWhyItWaits: a node its broker keeps refusing logs,
// every other metadata interval, that it is not connected and why.
func TestProvisioningSaysWhyItWaits(t *testing.T) {
	const id = "refused2"
	r := &refuser{id: id}
	r.left.Store(1 << 30)
	e := newEnvWith(t, func(o *server.Options) { o.CustomClientAuthentication = r })
	log, buf := captureLog()
	startAgent(t, Options{Identity: id, StateDir: t.TempDir(), Logger: log, MetadataInterval: 20 * time.Millisecond,
		ReconnectWait: 10 * time.Millisecond, ReconnectMaxWait: 20 * time.Millisecond,
		Provisioning: ProvisioningSettings{Brokers: []string{e.url}, CAFile: e.caFile, Enabled: true, TrustedKeys: testTrusted}})
	eventually(t, "a warning with the refusal", func() bool {
		for _, line := range strings.Split(buf.String(), "\n") {
			if strings.Contains(line, "not connected to a provisioning broker yet") && strings.Contains(strings.ToLower(line), "authorization violation") {
				return true
			}
		}
		return false
	})
}
