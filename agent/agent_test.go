package agent

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/muster-io/muster/agent/config"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
)

func TestNewValidates(t *testing.T) {
	_, err := New(Options{Identity: "bad id", StateDir: "", Provisioning: ProvisioningSettings{Enabled: true, CAPin: "md5:x"}, MetadataInterval: -1})
	if err == nil {
		t.Fatal("no error")
	}
	for _, want := range []string{"identity", "state_dir", "provisioning brokers", "pin", "metadata interval"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %q", err, want)
		}
	}
	if !errors.Is(err, ErrInvalidOptions) {
		t.Error("not ErrInvalidOptions")
	}
}

// TestLifecycle drives one agent through provisioning, configure, restart
// into production, reprovision and shutdown.
func TestLifecycle(t *testing.T) {
	const id = "node1.example.net"
	e := newEnv(t)
	nc := e.client(t)
	events := record(t, nc, protocol.LifecyclePrefix+".>")
	metadata := record(t, nc, protocol.MetadataSubjectFor(">"))
	stateDir := filepath.Join(t.TempDir(), "state")
	factsFile := filepath.Join(t.TempDir(), "facts.yaml")
	if err := os.WriteFile(factsFile, []byte("country: mt\nrack: 12\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	r := startAgent(t, Options{
		Identity: id,
		StateDir: stateDir,
		Provisioning: ProvisioningSettings{
			Brokers: []string{e.url}, TrustedKeys: testTrusted, CAFile: e.caFile, FactsFile: factsFile, Enabled: true,
		},
		Facts:            map[string]string{"role": "web"},
		Version:          "1.2.3",
		MetadataInterval: 200 * time.Millisecond,
		ReconnectWait:    50 * time.Millisecond,
	})
	a := r.a
	tok := reqOpts{key: testKey}

	eventually(t, "startup event", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 1 })
	eventually(t, "two metadata messages", func() bool { return metadata.count(nil) >= 2 })
	md, err := protocol.DecodeMetadata(metadata.msgs[0].Data)
	if err != nil {
		t.Fatal(err)
	}
	if md.Identity != id || md.Facts["country"] != "mt" || md.Facts["rack"] != "12" || md.Facts["role"] != "web" || md.Version != "1.2.3" {
		t.Fatalf("metadata %+v", md)
	}
	// Every announcement of a life says when that life started: at or
	// before its startup event.
	firstLife := md.Started
	metadata.mu.Lock()
	second := metadata.msgs[1]
	metadata.mu.Unlock()
	md2, err := protocol.DecodeMetadata(second.Data)
	if err != nil {
		t.Fatal(err)
	}
	startup, err := protocol.DecodeEvent(events.first(eventsOf(protocol.EventStartup, id)).Data)
	if err != nil {
		t.Fatal(err)
	}
	if firstLife.IsZero() || !md2.Started.Equal(firstLife) || firstLife.After(startup.Time) {
		t.Fatalf("metadata started %s and %s, startup event at %s", firstLife, md2.Started, startup.Time)
	}
	// And names it by one ID: the startup event, metadata, discovery
	// replies and inventory alike.
	lifeID := md.Life
	if len(lifeID) != protocol.LifeLen || md2.Life != lifeID || startup.Life != lifeID {
		t.Fatalf("life IDs: metadata %q and %q, startup event %q", lifeID, md2.Life, startup.Life)
	}
	if a.Mode() != ModeProvisioning {
		t.Fatalf("mode %s", a.Mode())
	}

	t.Run("discovery", func(t *testing.T) {
		inbox := nats.NewInbox()
		sub, err := nc.SubscribeSync(inbox)
		if err != nil {
			t.Fatal(err)
		}
		defer sub.Unsubscribe()
		data := newRequest("", "", protocol.AgentDiscovery, protocol.ActionPing, nil, time.Now(), nil)
		if err := nc.PublishRequest(protocol.BroadcastSubject(protocol.ProvisioningCollective, protocol.AgentDiscovery), inbox, data); err != nil {
			t.Fatal(err)
		}
		m, err := sub.NextMsg(20 * time.Second)
		if err != nil {
			t.Fatal(err)
		}
		rep, err := protocol.DecodeReply(m.Data)
		if err != nil {
			t.Fatal(err)
		}
		var pr protocol.PingReply
		if err := json.Unmarshal(rep.Body, &pr); err != nil || pr.Identity != id || pr.Mode != "provisioning" || pr.Life != lifeID {
			t.Fatalf("ping reply %+v (%v)", pr, err)
		}
	})

	t.Run("inventory", func(t *testing.T) {
		rep := call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentRPCUtil, protocol.ActionInventory, tok, nil)
		mustOK(t, rep)
		var inv protocol.Inventory
		if err := json.Unmarshal(rep.Body, &inv); err != nil {
			t.Fatal(err)
		}
		if inv.MainCollective != "provisioning" || len(inv.Collectives) != 1 || inv.Facts["country"] != "mt" || inv.Version != "1.2.3" || inv.Life != lifeID {
			t.Fatalf("inventory %+v", inv)
		}
	})

	t.Run("refusals", func(t *testing.T) {
		cases := []struct {
			name string
			o    reqOpts
			want protocol.Code
		}{
			{"untrusted signer", reqOpts{key: rogueKey}, protocol.CodeUnauthorized},
			{"unsigned", reqOpts{}, protocol.CodeUnauthorized},
			{"stale", reqOpts{key: testKey, time: time.Now().Add(-time.Hour)}, protocol.CodeExpired},
			{"future", reqOpts{key: testKey, time: time.Now().Add(time.Hour)}, protocol.CodeExpired},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				rep := call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentRPCUtil, protocol.ActionPing, tc.o, nil)
				if rep.Code != tc.want {
					t.Fatalf("code %s (%s), want %s", rep.Code, rep.Message, tc.want)
				}
			})
		}
		t.Run("duplicate id", func(t *testing.T) {
			o := reqOpts{key: testKey, id: "dup-1"}
			mustOK(t, call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentRPCUtil, protocol.ActionPing, o, nil))
			rep := call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentRPCUtil, protocol.ActionPing, o, nil)
			if rep.Code != protocol.CodeBadRequest {
				t.Fatalf("duplicate: %s", rep.Code)
			}
		})
		t.Run("unknown field in body", func(t *testing.T) {
			rep := call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentProvision, protocol.ActionGenCSR, tok, map[string]any{"nope": 1})
			if rep.Code != protocol.CodeBadRequest {
				t.Fatalf("code %s", rep.Code)
			}
		})
	})

	cert, _ := signedFor(t, e.ca, id)
	t.Run("configure before gencsr", func(t *testing.T) {
		rep := call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentProvision, protocol.ActionConfigure, tok,
			protocol.ConfigureRequest{Certificate: string(cert), CA: string(e.ca.CertificatePEM())})
		if rep.Code != protocol.CodeConflict {
			t.Fatalf("code %s (%s)", rep.Code, rep.Message)
		}
	})

	var gen protocol.GenCSRReply
	t.Run("gencsr", func(t *testing.T) {
		rep := call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentProvision, protocol.ActionGenCSR, tok, protocol.GenCSRRequest{})
		mustOK(t, rep)
		if bytes.Contains(rep.Body, []byte("PRIVATE KEY")) {
			t.Fatal("private key in the reply")
		}
		if err := json.Unmarshal(rep.Body, &gen); err != nil {
			t.Fatal(err)
		}
		if gen.SSLDir != filepath.Join(stateDir, SSLDirName) || !strings.Contains(gen.CSR, "CERTIFICATE REQUEST") {
			t.Fatalf("gencsr reply %+v", gen)
		}
		// The key is written by configure, with its certificate.
		if _, err := os.Stat(filepath.Join(gen.SSLDir, KeyFile)); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("key on disk before configure: %v", err)
		}
	})

	nodeCert, err := e.ca.SignCSR([]byte(gen.CSR), nil)
	if err != nil {
		t.Fatal(err)
	}
	caPEM := string(e.ca.CertificatePEM())
	hostPort := strings.TrimPrefix(e.url, "tls://")
	t.Run("configure", func(t *testing.T) {
		rep := call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentProvision, protocol.ActionConfigure, tok, protocol.ConfigureRequest{
			Configuration: map[string]string{config.KeyMiddlewareHosts: hostPort, "custom.thing": "kept", "plugin.choria.token": "hush"},
			Certificate:   string(nodeCert),
			CA:            caPEM,
			SSLDir:        gen.SSLDir,
		})
		mustOK(t, rep)
		cfg, err := config.Load(filepath.Join(stateDir, ConfigFileName))
		if err != nil {
			t.Fatal(err)
		}
		want := map[string]string{
			config.KeyProvision:    "false",
			config.KeyIdentity:     id,
			config.KeySecurityProv: "file",
			config.KeyCertificate:  filepath.Join(gen.SSLDir, CertFile),
			config.KeyKey:          filepath.Join(gen.SSLDir, KeyFile),
			config.KeyCA:           filepath.Join(gen.SSLDir, CAFile),
			"custom.thing":         "kept",
		}
		for k, v := range want {
			if cfg.Value(k) != v {
				t.Errorf("%s = %q, want %q", k, cfg.Value(k), v)
			}
		}
		if b, _ := os.ReadFile(filepath.Join(gen.SSLDir, CertFile)); !bytes.Equal(b, nodeCert) {
			t.Error("certificate not written")
		}
		keyPEM, err := os.ReadFile(filepath.Join(gen.SSLDir, KeyFile))
		if err != nil {
			t.Fatal(err)
		}
		key, err := pki.ParsePrivateKey(keyPEM)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := pki.VerifyLeaf(nodeCert, []byte(caPEM), key.Public(), id, time.Now()); err != nil {
			t.Errorf("written key does not match the certificate: %v", err)
		}
		if st, err := os.Stat(filepath.Join(gen.SSLDir, KeyFile)); err != nil {
			t.Error(err)
		} else if st.Mode().Perm() != 0o600 {
			t.Errorf("key mode %v", st.Mode().Perm())
		}
		inv := call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentRPCUtil, protocol.ActionInventory, tok, nil)
		if !bytes.Contains(inv.Body, []byte(`"custom.thing":"kept"`)) || bytes.Contains(inv.Body, []byte("hush")) {
			t.Errorf("inventory config: %s", inv.Body)
		}
	})

	t.Run("configure rejections leave files alone", func(t *testing.T) {
		other, _ := newCA(t)
		otherCert, _ := signedFor(t, other, id)
		anotherKeyCert, _ := signedFor(t, e.ca, id)
		before := snapshot(t, stateDir)
		cases := []struct {
			name string
			body protocol.ConfigureRequest
			want protocol.Code
		}{
			{"bad PEM", protocol.ConfigureRequest{Certificate: "-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n", CA: caPEM}, protocol.CodeInvalidCert},
			{"wrong CA", protocol.ConfigureRequest{Certificate: string(otherCert), CA: caPEM}, protocol.CodeInvalidCert},
			{"cert for another key", protocol.ConfigureRequest{Certificate: string(anotherKeyCert), CA: caPEM}, protocol.CodeInvalidCert},
			{"no CA", protocol.ConfigureRequest{Certificate: string(nodeCert)}, protocol.CodeInvalidCert},
			{"ssldir escape", protocol.ConfigureRequest{Certificate: string(nodeCert), CA: caPEM, SSLDir: "../x"}, protocol.CodeBadRequest},
			{"ssldir elsewhere", protocol.ConfigureRequest{Certificate: string(nodeCert), CA: caPEM, SSLDir: "/etc/ssl"}, protocol.CodeBadRequest},
			{"key with newline", protocol.ConfigureRequest{Configuration: map[string]string{"a\nb": "1"}, Certificate: string(nodeCert), CA: caPEM}, protocol.CodeBadRequest},
			{"value with newline", protocol.ConfigureRequest{Configuration: map[string]string{"a": "1\nplugin.choria.server.provision = true"}}, protocol.CodeBadRequest},
			{"other identity", protocol.ConfigureRequest{Configuration: map[string]string{"identity": "evil"}}, protocol.CodeBadRequest},
			{"bad policy name", protocol.ConfigureRequest{ActionPolicies: map[string]string{"../x": "allow"}}, protocol.CodeBadRequest},
		}
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				rep := call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentProvision, protocol.ActionConfigure, tok, tc.body)
				if rep.Code != tc.want {
					t.Fatalf("code %s (%s), want %s", rep.Code, rep.Message, tc.want)
				}
				if rep.Message == "" || strings.Contains(rep.Message, stateDir) {
					t.Fatalf("message %q is empty or names a path", rep.Message)
				}
				after := snapshot(t, stateDir)
				if len(after) != len(before) {
					t.Fatalf("files changed: %d before, %d after", len(before), len(after))
				}
				for p, v := range before {
					if after[p] != v {
						t.Fatalf("%s changed", p)
					}
				}
			})
		}
	})

	t.Run("restart into production", func(t *testing.T) {
		mustOK(t, call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentProvision, protocol.ActionRestart, tok, protocol.RestartRequest{SplayMillis: 20}))
		eventually(t, "provisioned event", func() bool { return events.count(eventsOf(protocol.EventProvisioned, id)) == 1 })
		if a.Mode() != ModeProduction {
			t.Fatalf("mode %s", a.Mode())
		}
		rep := call(t, nc, protocol.DefaultMainCollective, id, protocol.AgentRPCUtil, protocol.ActionPing, reqOpts{}, nil)
		mustOK(t, rep)
		var pr protocol.PingReply
		if err := json.Unmarshal(rep.Body, &pr); err != nil || pr.Mode != "production" || pr.Life != "" {
			t.Fatalf("ping %+v %v", pr, err)
		}
		cz, err := e.srv.Connz(&server.ConnzOptions{Username: true})
		if err != nil {
			t.Fatal(err)
		}
		mtls := false
		for _, c := range cz.Conns {
			if c.Name == id && len(c.TLSPeerCerts) > 0 && strings.Contains(c.TLSPeerCerts[0].Subject, id) {
				mtls = true
			}
		}
		if !mtls {
			t.Fatal("production connection did not present the node certificate")
		}
		rep = call(t, nc, protocol.DefaultMainCollective, id, protocol.AgentProvision, protocol.ActionGenCSR, tok, nil)
		if rep.Code != protocol.CodeUnknownAction {
			t.Fatalf("gencsr in production: %s", rep.Code)
		}
	})

	t.Run("reprovision", func(t *testing.T) {
		mustOK(t, call(t, nc, protocol.DefaultMainCollective, id, protocol.AgentProvision, protocol.ActionReprovision, tok, protocol.RestartRequest{SplayMillis: 20}))
		eventually(t, "second startup event", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 2 })
		if a.Mode() != ModeProvisioning {
			t.Fatalf("mode %s", a.Mode())
		}
		// The new life's announcements say it started after the first,
		// and name it by a new ID, as its startup event does.
		var md *protocol.Metadata
		eventually(t, "metadata of the new life", func() bool {
			metadata.mu.Lock()
			defer metadata.mu.Unlock()
			var err error
			md, err = protocol.DecodeMetadata(metadata.msgs[len(metadata.msgs)-1].Data)
			return err == nil && md.Started.After(firstLife)
		})
		events.mu.Lock()
		var startups []*protocol.Event
		for _, m := range events.msgs {
			if ev, err := protocol.DecodeEvent(m.Data); err == nil && ev.Type == protocol.EventStartup {
				startups = append(startups, ev)
			}
		}
		events.mu.Unlock()
		if md.Life == lifeID || !protocol.ValidLife(md.Life) || md.Life == "" || len(startups) != 2 || startups[1].Life != md.Life {
			t.Fatalf("the new life's ID: metadata %q, startup events %+v (the first life's %q)", md.Life, startups, lifeID)
		}
		cfg, err := config.Load(filepath.Join(stateDir, ConfigFileName))
		if err != nil {
			t.Fatal(err)
		}
		if v, _ := cfg.Bool(config.KeyProvision); !v {
			t.Fatal("provision not set to true")
		}
		if _, err := os.Stat(filepath.Join(gen.SSLDir, CertFile)); err != nil {
			t.Fatal("certificate deleted by reprovision")
		}
	})

	t.Run("shutdown", func(t *testing.T) {
		mustOK(t, call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentProvision, protocol.ActionShutdown, tok, protocol.ShutdownRequest{Reason: "test"}))
		if err := r.wait(t); !errors.Is(err, ErrShutdown) {
			t.Fatalf("Run = %v, want ErrShutdown", err)
		}
		if _, err := os.Stat(filepath.Join(stateDir, ShutdownMarker)); err != nil {
			t.Fatalf("marker: %v", err)
		}
		eventually(t, "shutdown event", func() bool { return events.count(eventsOf(protocol.EventShutdown, id)) == 1 })
		a2, err := New(Options{Identity: id, StateDir: stateDir, Provisioning: ProvisioningSettings{Brokers: []string{e.url}, CAFile: e.caFile, Enabled: true, TrustedKeys: testTrusted}})
		if err != nil {
			t.Fatal(err)
		}
		if err := a2.Run(t.Context()); !errors.Is(err, ErrStayDown) {
			t.Fatalf("second Run = %v, want ErrStayDown", err)
		}
	})
}

func TestCAPin(t *testing.T) {
	e := newEnv(t)
	nc := e.client(t)
	events := record(t, nc, protocol.LifecyclePrefix+".>")
	cases := []struct {
		name    string
		pin     string
		withCA  bool
		connect bool
	}{
		{"pin only", e.ca.Pin(), false, true},
		{"pin and CA", e.ca.Pin(), true, true},
		{"wrong pin", "sha256:" + strings.Repeat("ab", 32), false, false},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			id := "pin" + string(rune('a'+i))
			p := ProvisioningSettings{Brokers: []string{e.url}, CAPin: tc.pin, Enabled: true, TrustedKeys: testTrusted}
			if tc.withCA {
				p.CAFile = e.caFile
			}
			r := startAgent(t, Options{Identity: id, StateDir: t.TempDir(), Provisioning: p, ReconnectWait: 50 * time.Millisecond})
			if tc.connect {
				eventually(t, "startup", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 1 })
				return
			}
			eventually(t, "pin refusal", func() bool { return r.a.tlsRefused.Load() >= 2 })
			if n := events.count(eventsOf(protocol.EventStartup, id)); n != 0 {
				t.Fatalf("agent with a wrong pin connected (%d startup events)", n)
			}
		})
	}
}

func TestProductionFallback(t *testing.T) {
	const id = "node-fb"
	e := newEnv(t)
	nc := e.client(t)
	events := record(t, nc, protocol.LifecyclePrefix+".>")
	stateDir := t.TempDir()
	sslDir := filepath.Join(stateDir, SSLDirName)
	if err := os.MkdirAll(sslDir, 0o700); err != nil {
		t.Fatal(err)
	}
	// A certificate from a CA the broker does not trust: the agent's own
	// checks pass (it chains to the configured CA), the broker refuses it.
	other, _ := newCA(t)
	cert, key := signedFor(t, other, id)
	for name, data := range map[string][]byte{CertFile: cert, KeyFile: key, CAFile: append(append([]byte{}, other.CertificatePEM()...), e.ca.CertificatePEM()...)} {
		if err := os.WriteFile(filepath.Join(sslDir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfg, err := config.FromMap(map[string]string{
		config.KeyMiddlewareHosts: strings.TrimPrefix(e.url, "tls://"),
		config.KeyCertificate:     filepath.Join(sslDir, CertFile),
		config.KeyKey:             filepath.Join(sslDir, KeyFile),
		config.KeyCA:              filepath.Join(sslDir, CAFile),
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Save(filepath.Join(stateDir, ConfigFileName)); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, stateDir)
	r := startAgent(t, Options{
		Identity: id, StateDir: stateDir, ReconnectWait: 20 * time.Millisecond, ProductionFallbackAfter: 2,
		Provisioning: ProvisioningSettings{Brokers: []string{e.url}, CAFile: e.caFile, TrustedKeys: testTrusted},
	})
	eventually(t, "fallback to provisioning", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 1 })
	if r.a.Mode() != ModeProvisioning {
		t.Fatalf("mode %s", r.a.Mode())
	}
	after := snapshot(t, stateDir)
	for p, v := range before {
		if after[p] != v {
			t.Fatalf("%s changed by the fallback", p)
		}
	}
}

// TestManyInProcessAgents runs 200 agents in one process over in-process
// connections.
func TestManyInProcessAgents(t *testing.T) {
	const n = 200
	srv := startServer(t, &server.Options{Host: "127.0.0.1", Port: -1, StoreDir: t.TempDir(), NoLog: true, NoSigs: true})
	nc, err := nats.Connect(srv.ClientURL())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	metadata := record(t, nc, protocol.MetadataSubjectFor(">"))
	base := t.TempDir()
	goroutinesBefore := runtime.NumGoroutine()
	agents := make([]*running, n)
	for i := range n {
		id := "bulk-" + strings.Repeat("0", 3-len(itoa(i))) + itoa(i)
		agents[i] = startAgent(t, Options{
			Identity: id, StateDir: filepath.Join(base, id), InProcess: srv,
			Provisioning: ProvisioningSettings{Enabled: true, TrustedKeys: testTrusted},
		})
	}
	eventually(t, "metadata from every agent", func() bool {
		seen := map[string]bool{}
		metadata.mu.Lock()
		for _, m := range metadata.msgs {
			if md, err := protocol.DecodeMetadata(m.Data); err == nil {
				seen[md.Identity] = true
			}
		}
		metadata.mu.Unlock()
		return len(seen) == n
	})
	// Every agent answers a broadcast discovery.
	inbox := nats.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		t.Fatal(err)
	}
	if err := sub.SetPendingLimits(-1, -1); err != nil {
		t.Fatal(err)
	}
	data := newRequest("", "", protocol.AgentDiscovery, protocol.ActionPing, nil, time.Now(), nil)
	if err := nc.PublishRequest(protocol.BroadcastSubject(protocol.ProvisioningCollective, protocol.AgentDiscovery), inbox, data); err != nil {
		t.Fatal(err)
	}
	replies := map[string]bool{}
	for len(replies) < n {
		m, err := sub.NextMsg(20 * time.Second)
		if err != nil {
			t.Fatalf("after %d replies: %v", len(replies), err)
		}
		rep, err := protocol.DecodeReply(m.Data)
		if err != nil {
			t.Fatal(err)
		}
		replies[rep.Sender] = true
	}
	for _, r := range agents {
		r.cancel()
	}
	for _, r := range agents {
		if err := r.wait(t); err != nil {
			t.Fatalf("Run = %v", err)
		}
	}
	// Every agent's goroutines (its Run and its connection's) end.
	eventually(t, "agent goroutines to end", func() bool { return runtime.NumGoroutine() <= goroutinesBefore+10 })
}

func itoa(i int) string { return strconv.Itoa(i) }
