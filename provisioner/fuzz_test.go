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
	md, _ := json.Marshal(protocol.Metadata{Protocol: protocol.MetadataProto, Identity: "n1.example.net", Time: time.Now().UTC(), Life: protocol.NewLife()})
	ev, _ := json.Marshal(protocol.Event{Protocol: protocol.EventProtocol, ID: "1", Identity: "n1.example.net", Component: protocol.AgentComponent, Type: protocol.EventStartup, Life: protocol.NewLife()})
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

// FuzzDecodePing feeds arbitrary discovery replies: an identity comes back
// only from a well-formed reply to the request, naming its sender, with a
// well-formed life ID or none.
func FuzzDecodePing(f *testing.F) {
	now := time.Now().UTC()
	req := &protocol.Request{ID: "r1"}
	for _, body := range []protocol.PingReply{
		{Identity: "n1.example.net", Mode: "provisioning", Time: now, Life: protocol.NewLife()},
		{Identity: "n1.example.net", Mode: "production", Time: now},
		{Identity: "n2.example.net", Mode: "provisioning", Time: now},
	} {
		rep, err := protocol.NewReply(req, "n1.example.net", protocol.CodeOK, "", body)
		if err != nil {
			f.Fatal(err)
		}
		b, _ := json.Marshal(rep)
		f.Add(b)
	}
	cfg := testConfig()
	cfg.Brokers = []string{"tls://127.0.0.1:1"}
	p, err := New(Options{Config: cfg, Helper: newTestHelper(nil, nil)})
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		id, life, err := p.decodePing(data, "r1")
		if err != nil || id == "" {
			return
		}
		if protocol.ValidateIdentity(id) != nil || !protocol.ValidLife(life) {
			t.Fatalf("accepted identity %q, life %q", id, life)
		}
		var rep protocol.Reply
		if json.Unmarshal(data, &rep) != nil || rep.Sender != id || rep.ID != "r1" {
			t.Fatalf("identity %q from %s", id, data)
		}
	})
}

// FuzzDecodeInventory feeds arbitrary inventory reply bodies: what is
// accepted has a well-formed life ID or none.
func FuzzDecodeInventory(f *testing.F) {
	b, _ := json.Marshal(protocol.Inventory{Agents: []string{"rpcutil"}, Facts: map[string]string{"a": "b"}, Life: protocol.NewLife()})
	f.Add(b)
	f.Add([]byte(`{"life":"ABC"}`))
	f.Fuzz(func(t *testing.T, data []byte) {
		inv, err := decodeInventory(data)
		if err == nil && !protocol.ValidLife(inv.Life) {
			t.Fatalf("accepted life %q", inv.Life)
		}
	})
}
