package agent

import (
	"bytes"
	"encoding/json"
	"maps"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/nats-io/nkeys"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"

	"github.com/muster-io/muster/internal/protocol"
)

func fuzzSession(t testing.TB, mode Mode) *session {
	a, err := New(Options{Identity: "fuzz.node", StateDir: t.TempDir(), Provisioning: ProvisioningSettings{TrustedKeys: testTrusted}})
	if err != nil {
		t.Fatal(err)
	}
	coll := protocol.ProvisioningCollective
	if mode == ModeProduction {
		coll = protocol.DefaultMainCollective
	}
	return &session{
		a: a, mode: mode, facts: map[string]string{}, collectives: []string{coll}, mainCollective: coll,
		nodeSubject: protocol.NodeSubject(coll, a.id), agents: []string{protocol.AgentRPCUtil},
	}
}

func TestHandleBroadcastErrorsAreSilent(t *testing.T) {
	s := fuzzSession(t, ModeProvisioning)
	bcast := protocol.BroadcastSubject(protocol.ProvisioningCollective, protocol.AgentRPCUtil)
	cases := []struct {
		name      string
		subject   string
		data      []byte
		wantReply bool
		wantCode  protocol.Code
	}{
		{"garbage directed", s.nodeSubject, []byte("{"), true, protocol.CodeBadRequest},
		{"garbage broadcast", bcast, []byte("{"), false, ""},
		{"untrusted signer broadcast", bcast, newRequest("", "", protocol.AgentRPCUtil, protocol.ActionPing, rogueKey, time.Now(), nil), false, ""},
		{"ok broadcast", bcast, newRequest("", "", protocol.AgentRPCUtil, protocol.ActionPing, testKey, time.Now(), nil), true, protocol.CodeOK},
		{"other target broadcast", bcast, newRequest("", "other", protocol.AgentRPCUtil, protocol.ActionPing, testKey, time.Now(), nil), false, ""},
		{"other target directed", s.nodeSubject, newRequest("", "other", protocol.AgentRPCUtil, protocol.ActionPing, testKey, time.Now(), nil), true, protocol.CodeBadRequest},
		{"unknown action", s.nodeSubject, newRequest("", "fuzz.node", protocol.AgentRPCUtil, "reboot", testKey, time.Now(), nil), true, protocol.CodeUnknownAction},
		{"discovery needs no signature", protocol.BroadcastSubject(protocol.ProvisioningCollective, protocol.AgentDiscovery), newRequest("", "", protocol.AgentDiscovery, protocol.ActionPing, nil, time.Now(), nil), true, protocol.CodeOK},
		{"negative splay", s.nodeSubject, newRequest("", "fuzz.node", protocol.AgentProvision, protocol.ActionRestart, testKey, time.Now(), protocol.RestartRequest{SplayMillis: -1}), true, protocol.CodeBadRequest},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := s.handle(tc.subject, tc.data, time.Now())
			if (res.reply != nil) != tc.wantReply {
				t.Fatalf("reply %q, want reply %v", res.reply, tc.wantReply)
			}
			if !tc.wantReply {
				return
			}
			rep, err := protocol.DecodeReply(res.reply)
			if err != nil {
				t.Fatal(err)
			}
			if rep.Code != tc.wantCode {
				t.Fatalf("code %s (%s), want %s", rep.Code, rep.Message, tc.wantCode)
			}
		})
	}
}

// TestBroadcastServesOnlyItsAgent: a broadcast subject serves the agent it
// is named after, never choria_provision, however well signed: a request
// signed for every node must not configure, shut down or restart them all.
func TestBroadcastServesOnlyItsAgent(t *testing.T) {
	s := fuzzSession(t, ModeProvisioning)
	rpc := protocol.BroadcastSubject(protocol.ProvisioningCollective, protocol.AgentRPCUtil)
	disc := protocol.BroadcastSubject(protocol.ProvisioningCollective, protocol.AgentDiscovery)
	cfg := protocol.ConfigureRequest{Configuration: map[string]string{"plugin.choria.middleware_hosts": "evil.example.net:4222"}}
	cases := []struct {
		name, subject, agent, action string
		body                         any
	}{
		{"configure on rpcutil", rpc, protocol.AgentProvision, protocol.ActionConfigure, cfg},
		{"shutdown on rpcutil", rpc, protocol.AgentProvision, protocol.ActionShutdown, nil},
		{"restart on discovery", disc, protocol.AgentProvision, protocol.ActionRestart, nil},
		{"configure on its own agent's subject", protocol.BroadcastSubject(protocol.ProvisioningCollective, protocol.AgentProvision), protocol.AgentProvision, protocol.ActionConfigure, cfg},
		{"rpcutil on discovery", disc, protocol.AgentRPCUtil, protocol.ActionInventory, nil},
		{"discovery on rpcutil", rpc, protocol.AgentDiscovery, protocol.ActionPing, nil},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			res := s.handle(tc.subject, newRequest("", "", tc.agent, tc.action, testKey, time.Now(), tc.body), time.Now())
			if res.reply != nil || res.act != actNone {
				t.Fatalf("served: reply %s, action %v", res.reply, res.act)
			}
		})
	}
	entries, err := os.ReadDir(s.a.stateDir)
	if err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	if len(entries) != 0 {
		t.Fatalf("broadcasts wrote %d entries in the state directory", len(entries))
	}
}

func TestRestartSplayCapped(t *testing.T) {
	cases := []struct {
		name string
		ms   int
		max  time.Duration
	}{
		{"default", 0, DefaultRestartSplay},
		{"small", 5, 5 * time.Millisecond},
		{"capped", 10_000_000, MaxRestartSplay},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			for range 50 {
				d, an := splayOf(protocol.RestartRequest{SplayMillis: tc.ms})
				if an != nil || d < 0 || d > tc.max {
					t.Fatalf("splay %s (%v), max %s", d, an, tc.max)
				}
			}
		})
	}
}

// FuzzHandleRequest feeds arbitrary bytes to the dispatcher: it never
// panics and always produces a valid reply from this node, or none.
func FuzzHandleRequest(f *testing.F) {
	now := time.Now()
	f.Add([]byte("{}"), true)
	f.Add([]byte("not json"), false)
	f.Add(newRequest("a", "fuzz.node", protocol.AgentRPCUtil, protocol.ActionInventory, testKey, now, nil), true)
	f.Add(newRequest("b", "fuzz.node", protocol.AgentProvision, protocol.ActionConfigure, testKey, now, map[string]any{"configuration": map[string]string{"a": "b"}}), true)
	f.Add(newRequest("c", "", protocol.AgentDiscovery, protocol.ActionPing, nil, now, nil), false)
	f.Add(newRequest("d", "fuzz.node", protocol.AgentProvision, protocol.ActionRestart, testKey, now, map[string]int{"splay_ms": 1}), true)
	s := fuzzSession(f, ModeProvisioning)
	f.Fuzz(func(t *testing.T, data []byte, directed bool) {
		subject := protocol.BroadcastSubject(protocol.ProvisioningCollective, protocol.AgentRPCUtil)
		if directed {
			subject = s.nodeSubject
		}
		res := s.handle(subject, data, now)
		if res.reply == nil {
			if directed {
				t.Fatal("directed request without a reply")
			}
			return
		}
		rep, err := protocol.DecodeReply(res.reply)
		if err != nil {
			t.Fatalf("invalid reply %q: %v", res.reply, err)
		}
		if rep.Sender != "fuzz.node" {
			t.Fatalf("reply sender %q", rep.Sender)
		}
	})
}

func TestRefusalsCounted(t *testing.T) {
	s := fuzzSession(t, ModeProvisioning)
	now := time.Now()
	inv := func(key nkeys.KeyPair, id string, at time.Time) []byte {
		return newRequest(id, "fuzz.node", protocol.AgentRPCUtil, protocol.ActionInventory, key, at, nil)
	}
	send := func(data []byte) protocol.Code {
		t.Helper()
		res := s.handle(s.nodeSubject, data, now)
		rep, err := protocol.DecodeReply(res.reply)
		if err != nil {
			t.Fatal(err)
		}
		return rep.Code
	}
	if c := send(inv(nil, "", now)); c != protocol.CodeUnauthorized {
		t.Errorf("unsigned: %s", c)
	}
	if c := send(inv(rogueKey, "", now)); c != protocol.CodeUnauthorized {
		t.Errorf("rogue: %s", c)
	}
	tampered := inv(testKey, "", now)
	tampered = []byte(string(tampered[:len(tampered)-1]) + `,"sender":"x"}`)
	if c := send(tampered); c != protocol.CodeUnauthorized { // the later "sender" wins when decoding
		t.Errorf("tampered: %s", c)
	}
	if c := send(inv(testKey, "", now.Add(-time.Hour))); c != protocol.CodeExpired {
		t.Errorf("stale: %s", c)
	}
	once := inv(testKey, "once", now)
	if c := send(once); c != protocol.CodeOK {
		t.Errorf("first: %s", c)
	}
	if c := send(once); c != protocol.CodeBadRequest {
		t.Errorf("replay: %s", c)
	}
	got := s.a.Refusals()
	want := Refusals{Unsigned: 1, UntrustedKey: 1, BadSignature: 1, Stale: 1, Replayed: 1}
	if got != want {
		t.Errorf("refusals %+v, want %+v", got, want)
	}
	checkMetrics(t, s.a, map[string]float64{
		`muster_agent_refused_requests_total{reason="unsigned"}`:      1,
		`muster_agent_refused_requests_total{reason="bad_signature"}`: 1,
		`muster_agent_refused_requests_total{reason="untrusted_key"}`: 1,
		`muster_agent_refused_requests_total{reason="stale"}`:         1,
		`muster_agent_refused_requests_total{reason="replayed"}`:      1,
		`muster_agent_mode`: float64(ModeProvisioning),
	})
}

// checkMetrics parses WriteMetrics's output with the Prometheus text parser,
// lints it as promtool would, and compares every sample with want (and
// want with every sample).
func checkMetrics(t *testing.T, a *Agent, want map[string]float64) {
	t.Helper()
	var buf bytes.Buffer
	if err := WriteMetrics(&buf, a); err != nil {
		t.Fatal(err)
	}
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(bytes.NewReader(buf.Bytes()))
	if err != nil {
		t.Fatalf("exposition does not parse: %v\n%s", err, buf.Bytes())
	}
	gather := prometheus.GathererFunc(func() ([]*dto.MetricFamily, error) {
		var out []*dto.MetricFamily
		for _, mf := range mfs {
			out = append(out, mf)
		}
		return out, nil
	})
	problems, err := testutil.GatherAndLint(gather)
	if err != nil || len(problems) > 0 {
		t.Errorf("lint: %v %+v", err, problems)
	}
	types := map[string]dto.MetricType{
		"muster_agent_refused_requests_total": dto.MetricType_COUNTER,
		"muster_agent_mode":                   dto.MetricType_GAUGE,
	}
	seen := map[string]float64{}
	for name, mf := range mfs {
		if mf.GetType() != types[name] {
			t.Errorf("%s: type %s, want %s", name, mf.GetType(), types[name])
		}
		for _, m := range mf.GetMetric() {
			key := name
			for _, l := range m.GetLabel() {
				key += "{" + l.GetName() + "=\"" + l.GetValue() + "\"}"
			}
			v := m.GetGauge().GetValue()
			if mf.GetType() == dto.MetricType_COUNTER {
				v = m.GetCounter().GetValue()
			}
			seen[key] = v
		}
	}
	if !maps.Equal(seen, want) {
		t.Errorf("metrics %v, want %v\n%s", seen, want, buf.Bytes())
	}
}

func TestDeferQuietsAnnouncements(t *testing.T) {
	s := fuzzSession(t, ModeProvisioning)
	now := time.Now()
	res := s.handle(s.nodeSubject, newRequest("", "fuzz.node", protocol.AgentProvision, protocol.ActionDefer, testKey, now,
		protocol.DeferRequest{RetryAfter: 90, Reason: "rack not ready"}), now)
	if rep, err := protocol.DecodeReply(res.reply); err != nil || rep.Code != protocol.CodeOK {
		t.Fatalf("defer: %+v %v", rep, err)
	}
	if res.act != actQuiet || res.splay != 90*time.Second {
		t.Fatalf("result %+v, want quiet for 90s", res)
	}
	for _, bad := range []int{0, -1, protocol.MaxRetryAfter + 1} {
		res := s.handle(s.nodeSubject, newRequest("", "fuzz.node", protocol.AgentProvision, protocol.ActionDefer, testKey, now,
			protocol.DeferRequest{RetryAfter: bad}), now)
		if rep, _ := protocol.DecodeReply(res.reply); rep == nil || rep.Code != protocol.CodeBadRequest || res.act != actNone {
			t.Errorf("retry_after %d accepted: %+v", bad, rep)
		}
	}
	// Unsigned defers are refused like everything else.
	res = s.handle(s.nodeSubject, newRequest("", "fuzz.node", protocol.AgentProvision, protocol.ActionDefer, nil, now,
		protocol.DeferRequest{RetryAfter: 90}), now)
	if rep, _ := protocol.DecodeReply(res.reply); rep == nil || rep.Code != protocol.CodeUnauthorized || res.act != actNone {
		t.Errorf("unsigned defer: %+v", rep)
	}
}

func TestGenCSRKeepsTheNodesKey(t *testing.T) {
	s := fuzzSession(t, ModeProvisioning)
	pub := func(body protocol.GenCSRRequest) string {
		t.Helper()
		now := time.Now()
		res := s.handle(s.nodeSubject, newRequest("", "fuzz.node", protocol.AgentProvision, protocol.ActionGenCSR, testKey, now, body), now)
		rep, err := protocol.DecodeReply(res.reply)
		if err != nil || rep.Code != protocol.CodeOK {
			t.Fatalf("gencsr: %+v %v", rep, err)
		}
		var g protocol.GenCSRReply
		if err := json.Unmarshal(rep.Body, &g); err != nil {
			t.Fatal(err)
		}
		return g.PublicKey
	}
	first := pub(protocol.GenCSRRequest{})
	if again := pub(protocol.GenCSRRequest{}); again != first {
		t.Fatal("a second gencsr before configure made a new key")
	}
	// As after a configure: the key is on disk, none pending.
	if err := os.MkdirAll(s.a.sslDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(s.a.sslDir, KeyFile), s.a.pending.pem, 0o600); err != nil {
		t.Fatal(err)
	}
	s.a.pending = nil
	if onDisk := pub(protocol.GenCSRRequest{}); onDisk != first {
		t.Fatal("reprovisioning made a new key although the node has one")
	}
	if rotated := pub(protocol.GenCSRRequest{Rotate: true}); rotated == first {
		t.Fatal("rotate kept the old key")
	}
	if rsaKey := pub(protocol.GenCSRRequest{KeyType: protocol.KeyRSA}); rsaKey == first {
		t.Fatal("a request for another key type got the old key")
	}
}
