package provisioner

import (
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/muster-io/muster/broker"
	"github.com/muster-io/muster/internal/natstest"
	"github.com/muster-io/muster/internal/testbroker"
)

// TestWaitsForABusyBroker: a broker that answers a new connection only
// after nats.go's default connect timeout (2 s), as one restarted under a
// fleet does while it works through every node's handshake, still gets
// the provisioner: its first attempt may take connectTimeout. With
// nats.go's timeout every attempt would run out the same way.
func TestWaitsForABusyBroker(t *testing.T) {
	b := testbroker.Start(t)
	u, err := url.Parse(b.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	cfg := testConfig()
	cfg.Brokers = []string{"tls://" + natstest.Delayed(t, u.Host, 2500*time.Millisecond)}
	cfg.TLSCA = b.CAFile()
	cfg.NkeySeedFile = b.DevPKI().ProvisionerSeed
	r := runWith(t, Options{Config: cfg, Helper: newTestHelper(newCA(t), nil)}, nil)
	acc, err := b.Server().LookupAccount(broker.PROVISIONING)
	if err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for acc.NumConnections() == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("the provisioner never reached the busy broker:\n%s", r.logs)
		}
		time.Sleep(50 * time.Millisecond)
	}
	if strings.Contains(r.logs.String(), "i/o timeout") {
		t.Errorf("a connection attempt ran out of time:\n%s", r.logs)
	}
}
