package natstest

import (
	"math/rand/v2"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
)

// Ports hands out loopback TCP ports for listeners whose port must be known
// before they start (cluster routes, subprocesses' flags). Each port is
// chosen below the kernel's ephemeral range and held bound until Release,
// so no two handed out are the same and no connection's or :0 listener's
// ephemeral port can take one between Release and the listener binding it
// (a port that was merely free, picked with :0, could be; the race made
// cluster tests fail with "address already in use" while other packages'
// tests ran alongside).
type Ports struct {
	t   testing.TB
	lns []net.Listener
	low int // first port above the range Next chooses from
}

// portSpan is how many ports below the ephemeral range Next chooses from.
const portSpan = 12000

// NewPorts returns an empty set; Release is registered as a cleanup too.
func NewPorts(t testing.TB) *Ports {
	p := &Ports{t: t, low: ephemeralLow()}
	t.Cleanup(p.Release)
	return p
}

// Next binds a free port and returns it.
func (p *Ports) Next() int {
	p.t.Helper()
	if p.low > 1024+portSpan {
		for range 200 {
			port := p.low - 1 - rand.IntN(portSpan)
			ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
			if err == nil {
				p.lns = append(p.lns, ln)
				return port
			}
		}
	}
	// No room below the ephemeral range (or all taken): a port of it.
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		p.t.Fatal(err)
	}
	p.lns = append(p.lns, ln)
	return ln.Addr().(*net.TCPAddr).Port
}

// Release frees the ports for the listeners about to bind them.
func (p *Ports) Release() {
	for _, ln := range p.lns {
		ln.Close()
	}
	p.lns = nil
}

// FreePorts returns n distinct ports from Next, released.
func FreePorts(t testing.TB, n int) []int {
	t.Helper()
	p := NewPorts(t)
	ports := make([]int, n)
	for i := range ports {
		ports[i] = p.Next()
	}
	p.Release()
	return ports
}

// ephemeralLow is the first port of the kernel's ephemeral range (Linux;
// 32768 elsewhere or when it cannot be read).
func ephemeralLow() int {
	b, err := os.ReadFile("/proc/sys/net/ipv4/ip_local_port_range")
	if err != nil {
		return 32768
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 32768
	}
	n, err := strconv.Atoi(f[0])
	if err != nil || n <= 0 || n > 65535 {
		return 32768
	}
	return n
}
