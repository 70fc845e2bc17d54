package bench

import (
	"bufio"
	"net"
	"net/url"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/muster-io/muster/internal/testbroker"
)

// TestBrokerTrafficCountsUnauthenticated: a client that connects and
// goes away before its TLS handshake is counted as a connection that
// closed before authenticating; one that is refused is not.
func TestBrokerTrafficCountsUnauthenticated(t *testing.T) {
	b := testbroker.Start(t)
	before := readBrokerCounters(b)

	u, err := url.Parse(b.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	for range 3 {
		raw, err := net.DialTimeout("tcp", u.Host, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		raw.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := bufio.NewReader(raw).ReadString('\n'); err != nil {
			t.Fatalf("no INFO: %v", err)
		}
		raw.Close()
	}
	// A client without a certificate or a provisioning token gets as far
	// as its CONNECT and is refused: counted as rejected, not as closed
	// before authenticating.
	if nc, err := nats.Connect(b.ClientURL(), nats.RootCAs(b.CAFile())); err == nil {
		nc.Close()
		t.Fatal("a client without a token was let in")
	}

	tr := brokerTraffic(before, readBrokerCounters(b), 1)
	if tr == nil {
		t.Fatal("no traffic")
	}
	if tr.Connections != 4 || tr.Unauthenticated != 3 || tr.Authentications["rejected"] != 1 {
		t.Errorf("%d connections, %d closed before authenticating; want 4 and 3, one refused (authentications %v)", tr.Connections, tr.Unauthenticated, tr.Authentications)
	}
}
