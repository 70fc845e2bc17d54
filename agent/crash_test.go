package agent

import (
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"

	"github.com/muster-io/muster/agent/config"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
)

// provisionedEvents decodes the provisioned events r recorded for id.
func provisionedEvents(t *testing.T, r *recorder, id string) []protocol.Event {
	t.Helper()
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []protocol.Event
	for _, m := range r.msgs {
		ev, err := protocol.DecodeEvent(m.Data)
		if err == nil && ev.Type == protocol.EventProvisioned && ev.Identity == id {
			out = append(out, *ev)
		}
	}
	return out
}

// configureOnce runs gencsr and configure against a waiting agent, as a
// provisioner would, and returns the serial of the certificate installed.
func configureOnce(t *testing.T, e *env, nc *nats.Conn, id string) string {
	t.Helper()
	tok := reqOpts{key: testKey}
	rep := call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentProvision, protocol.ActionGenCSR, tok, protocol.GenCSRRequest{})
	mustOK(t, rep)
	var gen protocol.GenCSRReply
	if err := json.Unmarshal(rep.Body, &gen); err != nil {
		t.Fatal(err)
	}
	certPEM, err := e.ca.SignCSR([]byte(gen.CSR), nil)
	if err != nil {
		t.Fatal(err)
	}
	mustOK(t, call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentProvision, protocol.ActionConfigure, tok, protocol.ConfigureRequest{
		Configuration: map[string]string{config.KeyMiddlewareHosts: strings.TrimPrefix(e.url, "tls://")},
		Certificate:   string(certPEM),
		CA:            string(e.ca.CertificatePEM()),
		SSLDir:        gen.SSLDir,
	}))
	certs, err := pki.ParseCertificates(certPEM)
	if err != nil {
		t.Fatal(err)
	}
	return certs[0].SerialNumber.Text(16)
}

func agentOptions(e *env, id, stateDir string) Options {
	return Options{
		Identity:         id,
		StateDir:         stateDir,
		Provisioning:     ProvisioningSettings{Brokers: []string{e.url}, TrustedKeys: testTrusted, CAFile: e.caFile, Enabled: true},
		MetadataInterval: 200 * time.Millisecond,
		ReconnectWait:    50 * time.Millisecond,
	}
}

// TestRunRemovesStaleTemps: the temporaries a killed configure leaves in
// the agent's directories (some hold key material) are removed at start;
// the files they were replacing, unrelated dot files and other programs'
// temporaries next to a configuration file outside the state directory are
// left alone.
func TestRunRemovesStaleTemps(t *testing.T) {
	const id = "node1.example.net"
	e := newEnv(t)
	nc := e.client(t)
	events := record(t, nc, protocol.LifecyclePrefix+".>")
	stateDir := filepath.Join(t.TempDir(), "state")
	etc := t.TempDir()
	cfgFile := filepath.Join(etc, "agent.cfg")
	sslDir := filepath.Join(stateDir, SSLDirName)
	polDir := filepath.Join(stateDir, PoliciesDir)
	for _, d := range []string{sslDir, polDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	write := func(path, data string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	stale := []string{
		filepath.Join(sslDir, ".private.pem.tmp-123"),
		filepath.Join(sslDir, ".certificate.pem.tmp-456"),
		filepath.Join(polDir, ".web.policy.tmp-7"),
		filepath.Join(stateDir, ".shutdown.tmp-8"),
		filepath.Join(etc, ".agent.cfg.tmp-9"),
	}
	kept := []string{
		filepath.Join(sslDir, "private.pem.bak"),
		filepath.Join(stateDir, ".hidden"),
		filepath.Join(etc, ".other.conf.tmp-10"),
	}
	for _, p := range stale {
		write(p, "-----BEGIN EC PRIVATE KEY-----\nhalf")
	}
	for _, p := range kept {
		write(p, "keep")
	}
	opts := agentOptions(e, id, stateDir)
	opts.ConfigFile = cfgFile
	startAgent(t, opts)
	eventually(t, "startup event", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 1 })
	for _, p := range stale {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s left in place: %v", p, err)
		}
	}
	for _, p := range kept {
		if b, err := os.ReadFile(p); err != nil || string(b) != "keep" {
			t.Errorf("%s removed or changed: %q %v", p, b, err)
		}
	}
}

// TestConfiguredNeverRestarted is a provisioner that died between configure
// and restart: the node stays in provisioning mode and keeps announcing
// itself, and the next provisioner re-runs it from gencsr with the same key
// (so the key it recorded is still the node's) and restarts it.
func TestConfiguredNeverRestarted(t *testing.T) {
	const id = "node1.example.net"
	e := newEnv(t)
	nc := e.client(t)
	events := record(t, nc, protocol.LifecyclePrefix+".>")
	metadata := record(t, nc, protocol.MetadataSubjectFor(id))
	stateDir := filepath.Join(t.TempDir(), "state")
	r := startAgent(t, agentOptions(e, id, stateDir))
	eventually(t, "startup event", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 1 })

	configureOnce(t, e, nc, id)
	keyBefore, err := os.ReadFile(filepath.Join(stateDir, SSLDirName, KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	// The first provisioner is gone: no restart comes. The node keeps
	// waiting and announcing.
	n := metadata.count(nil)
	eventually(t, "metadata after configure", func() bool { return metadata.count(nil) >= n+2 })
	if r.a.Mode() != ModeProvisioning {
		t.Fatalf("mode %s before any restart", r.a.Mode())
	}

	serial := configureOnce(t, e, nc, id)
	keyAfter, err := os.ReadFile(filepath.Join(stateDir, SSLDirName, KeyFile))
	if err != nil {
		t.Fatal(err)
	}
	if string(keyAfter) != string(keyBefore) {
		t.Fatal("the second provisioning changed the node's key")
	}
	mustOK(t, call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentProvision, protocol.ActionRestart, reqOpts{key: testKey}, protocol.RestartRequest{SplayMillis: 10}))
	eventually(t, "provisioned event", func() bool { return len(provisionedEvents(t, events, id)) == 1 })
	if ev := provisionedEvents(t, events, id)[0]; ev.Serial != serial {
		t.Fatalf("provisioned event serial %q, want the second certificate's %q", ev.Serial, serial)
	}
}

// TestArrivalRepeated: a production connection's provisioned event is
// published again three times, with the same ID and serial, at the growing
// delays ArrivalRepeat sets, and then no more.
func TestArrivalRepeated(t *testing.T) {
	const id = "node1.example.net"
	e := newEnv(t)
	nc := e.client(t)
	events := record(t, nc, protocol.LifecyclePrefix+".>")
	opts := agentOptions(e, id, filepath.Join(t.TempDir(), "state"))
	opts.ArrivalRepeat = 50 * time.Millisecond // then 250 ms and 1.25 s later
	startAgent(t, opts)
	eventually(t, "startup event", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 1 })
	serial := configureOnce(t, e, nc, id)
	mustOK(t, call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentProvision, protocol.ActionRestart, reqOpts{key: testKey}, protocol.RestartRequest{SplayMillis: 10}))
	eventually(t, "the provisioned event and its three repeats", func() bool { return len(provisionedEvents(t, events, id)) >= 4 })
	// The last repeat came at most 1.25 × (50 + 250 + 1250) ms after
	// the first event; as long again shows that no fifth follows.
	time.Sleep(2 * time.Second)
	evs := provisionedEvents(t, events, id)
	if len(evs) != 4 {
		t.Fatalf("%d provisioned events, want 4", len(evs))
	}
	for _, ev := range evs {
		if ev.ID != evs[0].ID || ev.Serial != serial {
			t.Fatalf("events %+v: want one ID and serial %s", evs, serial)
		}
	}
}

// TestKilledBeforeRestartComesUpInProduction is an agent that went away
// after configure but before restart (killed, rebooted): at its next start
// the configuration is complete, so it runs in production and its
// provisioned event names the certificate configure installed. After a lost
// connection it announces the same arrival again, with the same ID.
func TestKilledBeforeRestartComesUpInProduction(t *testing.T) {
	const id = "node1.example.net"
	e := newEnv(t)
	nc := e.client(t)
	events := record(t, nc, protocol.LifecyclePrefix+".>")
	stateDir := filepath.Join(t.TempDir(), "state")
	first := startAgent(t, agentOptions(e, id, stateDir))
	eventually(t, "startup event", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 1 })
	serial := configureOnce(t, e, nc, id)
	first.cancel()
	if err := first.wait(t); err != nil {
		t.Fatalf("first run: %v", err)
	}

	second := startAgent(t, agentOptions(e, id, stateDir))
	eventually(t, "provisioned event", func() bool { return len(provisionedEvents(t, events, id)) == 1 })
	if second.a.Mode() != ModeProduction {
		t.Fatalf("mode %s", second.a.Mode())
	}
	ev := provisionedEvents(t, events, id)[0]
	if ev.Serial != serial || ev.ID == "" {
		t.Fatalf("provisioned event %+v, want serial %q", ev, serial)
	}

	// Drop the node's production connection: it reconnects and announces
	// the same arrival again.
	cz, err := e.srv.Connz(&server.ConnzOptions{})
	if err != nil {
		t.Fatal(err)
	}
	kicked := false
	for _, c := range cz.Conns {
		if c.Name == id {
			if err := e.srv.DisconnectClientByID(c.Cid); err != nil {
				t.Fatal(err)
			}
			kicked = true
		}
	}
	if !kicked {
		t.Fatal("no production connection to drop")
	}
	eventually(t, "the arrival announced again", func() bool { return len(provisionedEvents(t, events, id)) == 2 })
	again := provisionedEvents(t, events, id)[1]
	if again.ID != ev.ID || again.Serial != serial {
		t.Fatalf("announced again as %+v, first %+v", again, ev)
	}
}
