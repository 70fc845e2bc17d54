package natstest

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"
)

// Listen starts a loopback listener that hands every connection it
// accepts to serve, closed at cleanup with every connection still open; it
// returns the listener's host:port.
func Listen(t testing.TB, serve func(net.Conn)) string {
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

// Delayed is a proxy to the broker at backend (host:port) that passes a
// new connection on after delay, as a broker busy with a backlog of
// handshakes accepts at once and answers late; it returns the proxy's
// host:port. TLS passes through it untouched.
func Delayed(t testing.TB, backend string, delay time.Duration) string {
	t.Helper()
	return Listen(t, func(c net.Conn) {
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
