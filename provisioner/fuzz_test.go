package provisioner

import (
	"encoding/json"
	"testing"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/muster-io/muster/internal/protocol"
)

// FuzzHandleMessage feeds arbitrary messages on arbitrary subjects to the
// provisioner's handler of metadata, startup and production events and
// duplicate identity advisories: it never panics, and every node it comes
// to track has a valid identity.
func FuzzHandleMessage(f *testing.F) {
	md, _ := json.Marshal(protocol.Metadata{Protocol: protocol.MetadataProto, Identity: "n1.example.net", Time: time.Now().UTC()})
	ev, _ := json.Marshal(protocol.Event{Protocol: protocol.EventProtocol, ID: "1", Identity: "n1.example.net", Component: protocol.AgentComponent, Type: protocol.EventStartup})
	pv, _ := json.Marshal(protocol.Event{Protocol: protocol.EventProtocol, ID: "2", Identity: "n1.example.net", Component: protocol.AgentComponent, Type: protocol.EventProvisioned})
	adv, _ := json.Marshal(protocol.DuplicateIdentity{Protocol: protocol.AdvisoryProtocol, Identity: "n1.example.net"})
	f.Add(protocol.MetadataSubjectFor("n1.example.net"), md)
	f.Add(protocol.LifecycleSubject(protocol.EventStartup, protocol.AgentComponent, "n1.example.net"), ev)
	f.Add(productionPrefix+protocol.LifecycleSubject(protocol.EventProvisioned, protocol.AgentComponent, "n1.example.net"), pv)
	f.Add(protocol.AdvisoryDuplicateIdentity, adv)
	f.Add(protocol.MetadataSubjectFor("other.example.net"), md)
	cfg := testConfig()
	cfg.Brokers = []string{"tls://127.0.0.1:1"}
	cfg.QueueSize = 16
	p, err := New(Options{Config: cfg, Helper: newTestHelper(nil, nil)})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, subject string, data []byte) {
		p.handleMessage(&nats.Msg{Subject: subject, Data: data})
		for _, n := range p.Nodes() {
			if err := protocol.ValidateIdentity(n.Identity); err != nil {
				t.Fatalf("tracks node %q: %v", n.Identity, err)
			}
		}
		// Keep the queue from filling up between inputs.
		for {
			select {
			case <-p.queue:
				continue
			default:
			}
			break
		}
	})
}

// FuzzDecodeKVRecord feeds arbitrary identity registry records as read from
// the shared JetStream KV bucket (ha modes).
func FuzzDecodeKVRecord(f *testing.F) {
	f.Add([]byte(`{"identity":"a.example.net","key_fingerprint":"sha256:` + "0000000000000000000000000000000000000000000000000000000000000000" + `","provisioned_at":"2026-01-02T03:04:05Z"}`))
	f.Add([]byte(`{"identity":"../a","denied":true}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		r, err := decodeKVRecord(data)
		if err != nil {
			return
		}
		if err := r.validate(); err != nil {
			t.Fatalf("accepted invalid record: %v", err)
		}
	})
}
