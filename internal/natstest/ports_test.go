package natstest

import (
	"net"
	"strconv"
	"testing"
)

// TestPorts: ports are distinct, held until Release, below the ephemeral
// range when there is room, and bindable once released.
func TestPorts(t *testing.T) {
	p := NewPorts(t)
	low := ephemeralLow()
	seen := map[int]bool{}
	for range 20 {
		port := p.Next()
		if seen[port] {
			t.Fatalf("port %d handed out twice", port)
		}
		seen[port] = true
		if low > 1024+portSpan && (port >= low || port < low-portSpan) {
			t.Errorf("port %d outside [%d, %d)", port, low-portSpan, low)
		}
		if ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port))); err == nil {
			ln.Close()
			t.Fatalf("port %d not held before Release", port)
		}
	}
	p.Release()
	for port := range seen {
		ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(port)))
		if err != nil {
			t.Fatalf("port %d not free after Release: %v", port, err)
		}
		ln.Close()
	}
	if got := FreePorts(t, 3); len(got) != 3 || got[0] == got[1] || got[1] == got[2] || got[0] == got[2] {
		t.Fatalf("FreePorts(3) = %v", got)
	}
}
