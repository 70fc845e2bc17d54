// Package patience gives a nats.go connection a connect deadline that
// grows while a busy broker keeps running out of it, for the agent's
// connections and the provisioner's.
package patience

import (
	"errors"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/sirupsen/logrus"
)

// Max caps how long one connection attempt may take once attempts keep
// running out of time.
const Max = 2 * time.Minute

// Patience decides how long one connection attempt may take, from the
// moment the TCP connection (or in-process pipe) is up to the broker's
// answer to CONNECT: the TLS handshake, the broker's authentication and
// the first PONG.
//
// The first attempt may take the base timeout. An attempt that runs out
// of time doubles it for the next attempt, up to Max; an
// attempt that ends in time, connected or refused, sets it back. With a
// fixed timeout, a broker whose backlog of handshakes is longer than the
// timeout never catches up: the attempts given up come back as new
// handshakes and keep the backlog as long as it was. A dead broker is found
// as fast as before: the TCP connect keeps its own dial timeout, and a
// refused or reset connection does not grow the patience.
//
// A Patience is the connection's dialer (nats.SetCustomDialer) and, for an
// in-process broker, its connection provider (nats.InProcessServer); both
// hand nats.go a connection that holds the deadline. nats.go sets a
// deadline on a new connection for the whole connect process and clears it
// once that process ends; the connection replaces the deadline with its
// own and, at the clearing, reports whether the process ran out of time.
// One Patience serves every attempt of one connection, so it lasts across
// nats.go's reconnections.
type Patience struct {
	base      time.Duration
	dialer    net.Dialer
	inProcess nats.InProcessConnProvider
	log       *logrus.Entry

	mu      sync.Mutex
	current time.Duration
}

// New returns the patience of one connection: its first attempt may take
// base, and a TCP connect dial. inProcess, when set, provides the
// connections instead of TCP. Growth is logged to log at info level.
func New(base, dial time.Duration, inProcess nats.InProcessConnProvider, log *logrus.Entry) *Patience {
	return &Patience{base: base, dialer: net.Dialer{Timeout: dial}, inProcess: inProcess, log: log, current: base}
}

// Dial connects over TCP; the TCP connect itself may take the dial
// timeout.
func (p *Patience) Dial(network, address string) (net.Conn, error) {
	c, err := p.dialer.Dial(network, address)
	if err != nil {
		return nil, err
	}
	return p.attempt(c), nil
}

// InProcessConn connects to the in-process broker.
func (p *Patience) InProcessConn() (net.Conn, error) {
	c, err := p.inProcess.InProcessConn()
	if err != nil {
		return nil, err
	}
	return p.attempt(c), nil
}

// Timeout is how long the next attempt may take.
func (p *Patience) Timeout() time.Duration {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.current
}

// InProcess reports whether the connections are in-process.
func (p *Patience) InProcess() bool { return p.inProcess != nil }

// DialTimeout is how long a TCP connect may take.
func (p *Patience) DialTimeout() time.Duration { return p.dialer.Timeout }

func (p *Patience) attempt(c net.Conn) net.Conn {
	a := &attemptConn{Conn: c, p: p, deadline: time.Now().Add(p.Timeout())}
	a.connecting.Store(true)
	return a
}

// ended records how an attempt's connect process ended.
func (p *Patience) ended(timedOut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !timedOut {
		p.current = p.base
		return
	}
	next := min(2*p.current, max(Max, p.base))
	if next > p.current {
		p.log.WithField("timeout", next).Info("the broker did not complete the connection in time; the next attempt may take longer")
	}
	p.current = next
}

// attemptConn is a connection to a broker that holds the deadline of its
// connect process (Patience).
type attemptConn struct {
	net.Conn
	p        *Patience
	deadline time.Time
	// connecting is set until nats.go clears the connect process's
	// deadline; timedOut records a read or write that ran into it.
	connecting, timedOut atomic.Bool
}

// SetDeadline replaces the deadline nats.go sets for the connect process
// with the attempt's own, and reports the process's end to the Patience
// when nats.go clears it. Deadlines set after that pass through.
func (c *attemptConn) SetDeadline(t time.Time) error {
	if !c.connecting.Load() {
		return c.Conn.SetDeadline(t)
	}
	if !t.IsZero() {
		return c.Conn.SetDeadline(c.deadline)
	}
	if c.connecting.CompareAndSwap(true, false) {
		c.p.ended(c.timedOut.Load())
	}
	return c.Conn.SetDeadline(t)
}

func (c *attemptConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	if err != nil {
		c.noteTimeout(err)
	}
	return n, err
}

func (c *attemptConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	if err != nil {
		c.noteTimeout(err)
	}
	return n, err
}

func (c *attemptConn) noteTimeout(err error) {
	if c.connecting.Load() && errors.Is(err, os.ErrDeadlineExceeded) {
		c.timedOut.Store(true)
	}
}
