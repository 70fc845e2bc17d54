package agent

import (
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"

	"github.com/muster-io/muster/internal/natstest"
	"github.com/muster-io/muster/internal/protocol"
)

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
	url := "tls://" + natstest.Delayed(t, strings.TrimPrefix(e.url, "tls://"), minConnectTimeout+time.Second)
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
