package agent

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/syncbuf"
	"github.com/muster-io/muster/internal/token"
)

func captureLog() (*logrus.Entry, *syncbuf.Buffer) { return syncbuf.Logger(logrus.InfoLevel) }

// newEnvNamed is newEnv with a broker certificate for hosts only.
func newEnvNamed(t *testing.T, hosts ...string) *env {
	t.Helper()
	c, caFile := newCA(t)
	is, err := c.Issue(hosts[0], hosts)
	if err != nil {
		t.Fatal(err)
	}
	pair, err := tls.X509KeyPair(append(append([]byte{}, is.CertPEM...), c.CertificatePEM()...), is.KeyPEM)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(c.Certificate())
	srv := startServer(t, &server.Options{
		Host: "127.0.0.1", Port: -1, StoreDir: t.TempDir(), NoLog: true, NoSigs: true, TLS: true, TLSTimeout: 5,
		TLSConfig: &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{pair}, ClientAuth: tls.VerifyClientCertIfGiven, ClientCAs: pool},
	})
	port := srv.Addr().(*net.TCPAddr).Port
	return &env{ca: c, caFile: caFile, srv: srv, url: "tls://127.0.0.1:" + strconv.Itoa(port)}
}

// TestBrokerVerificationRequired: an agent that may provision must be told
// how to verify its broker (a CA or a pin) or be told, by name, not to.
func TestBrokerVerificationRequired(t *testing.T) {
	base := ProvisioningSettings{Brokers: []string{"tls://127.0.0.1:4222"}, TrustedKeys: testTrusted, Enabled: true}
	_, err := New(Options{Identity: "n1", StateDir: t.TempDir(), Provisioning: base})
	if err == nil || !strings.Contains(err.Error(), "--ca") || !strings.Contains(err.Error(), "--insecure-skip-tls-verify") {
		t.Fatalf("New without a CA or pin: %v", err)
	}
	for name, p := range map[string]ProvisioningSettings{
		"pin":      {Brokers: base.Brokers, TrustedKeys: testTrusted, Enabled: true, CAPin: "sha256:" + strings.Repeat("ab", 32)},
		"insecure": {Brokers: base.Brokers, TrustedKeys: testTrusted, Enabled: true, InsecureSkipVerify: true},
	} {
		if _, err := New(Options{Identity: "n1", StateDir: t.TempDir(), Provisioning: p}); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestPinChecksTheBrokerName: a certificate from the pinned CA for another
// name is refused, also when the broker is addressed by IP (no SNI).
func TestPinChecksTheBrokerName(t *testing.T) {
	e := newEnvNamed(t, "other.example.net")
	nc := e.clientFor(t, "other.example.net")
	events := record(t, nc, protocol.LifecyclePrefix+".>")
	for i, withCA := range []bool{false, true} {
		id := "pinname" + strconv.Itoa(i)
		p := ProvisioningSettings{Brokers: []string{e.url}, CAPin: e.ca.Pin(), Enabled: true, TrustedKeys: testTrusted}
		if withCA {
			p.CAFile = e.caFile
		}
		log, buf := captureLog()
		log.Logger.SetLevel(logrus.DebugLevel)
		r := startAgent(t, Options{Identity: id, StateDir: t.TempDir(), Provisioning: p, Logger: log, ReconnectWait: 50 * time.Millisecond})
		if !withCA {
			eventually(t, "pin refusal", func() bool { return r.a.tlsRefused.Load() >= 2 })
		} else {
			eventually(t, "verification refusal", func() bool { return strings.Contains(buf.String(), "x509: cannot validate certificate for 127.0.0.1") })
		}
		if n := events.count(eventsOf(protocol.EventStartup, id)); n != 0 {
			t.Fatalf("CA given %t: the agent accepted a broker certificate for another name", withCA)
		}
	}
}

// clientFor connects the test's observer to a broker whose certificate
// names serverName.
func (e *env) clientFor(t *testing.T, serverName string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(e.url, nats.Secure(&tls.Config{ServerName: serverName, MinVersion: tls.VersionTLS12}), nats.RootCAs(e.caFile))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

// TestInsecureWarnsAtEveryStart: the insecure options log a warning every
// time the agent starts a mode, in-process restarts included.
func TestInsecureWarnsAtEveryStart(t *testing.T) {
	const id = "insecure1"
	e := newEnv(t)
	nc := e.client(t)
	events := record(t, nc, protocol.LifecyclePrefix+".>")
	log, buf := captureLog()
	startAgent(t, Options{Identity: id, StateDir: t.TempDir(), Logger: log, ReconnectWait: 50 * time.Millisecond,
		Provisioning: ProvisioningSettings{Brokers: []string{e.url}, Enabled: true, InsecureSkipVerify: true, InsecureUnsignedRequests: true}})
	eventually(t, "startup", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 1 })
	count := func() (int, int) {
		s := buf.String()
		return strings.Count(s, "NOT verified"), strings.Count(s, "insecure_unsigned_requests")
	}
	if tlsW, unsW := count(); tlsW != 1 || unsW != 1 {
		t.Fatalf("after the first start: %d skip-verify and %d unsigned warnings, want 1 each\n%s", tlsW, unsW, buf)
	}
	// An unsigned restart (obeyed: insecure) restarts in process.
	mustOK(t, call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentProvision, protocol.ActionRestart, reqOpts{}, protocol.RestartRequest{SplayMillis: 1}))
	eventually(t, "second startup", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 2 })
	if tlsW, unsW := count(); tlsW != 2 || unsW != 2 {
		t.Fatalf("after a restart: %d skip-verify and %d unsigned warnings, want 2 each\n%s", tlsW, unsW, buf)
	}
}

// TestReplayAcrossReExec: a request replayed to the process that follows a
// re-exec (ExitOnRestart, as the binary does) is still refused.
func TestReplayAcrossReExec(t *testing.T) {
	const id = "reexec1"
	e := newEnv(t)
	nc := e.client(t)
	events := record(t, nc, protocol.LifecyclePrefix+".>")
	stateDir := t.TempDir()
	opts := Options{Identity: id, StateDir: stateDir, ExitOnRestart: true, ReconnectWait: 50 * time.Millisecond,
		Provisioning: ProvisioningSettings{Brokers: []string{e.url}, TrustedKeys: testTrusted, CAFile: e.caFile, Enabled: true}}
	first := startAgent(t, opts)
	eventually(t, "startup", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 1 })
	captured := newRequest("", id, protocol.AgentProvision, protocol.ActionConfigure, testKey, time.Now(),
		protocol.ConfigureRequest{Configuration: map[string]string{"loglevel": "info", "plugin.choria.server.provision": "true"}})
	deliver := func() *protocol.Reply {
		t.Helper()
		msg, err := nc.Request(protocol.NodeSubject(protocol.ProvisioningCollective, id), captured, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		rep, err := protocol.DecodeReply(msg.Data)
		if err != nil {
			t.Fatal(err)
		}
		return rep
	}
	mustOK(t, deliver())
	mustOK(t, call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentProvision, protocol.ActionRestart, reqOpts{key: testKey}, protocol.RestartRequest{SplayMillis: 1}))
	if err := first.wait(t); !errors.Is(err, ErrRestart) {
		t.Fatalf("Run: %v, want ErrRestart", err)
	}
	second := startAgent(t, opts)
	eventually(t, "second startup", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 2 })
	if rep := deliver(); rep.Code != protocol.CodeBadRequest || !strings.Contains(rep.Message, "already processed") {
		t.Fatalf("replay after the re-exec: %s %q", rep.Code, rep.Message)
	}
	if r := second.a.Refusals(); r.Replayed != 1 {
		t.Fatalf("replays counted %d", r.Replayed)
	}
	if _, err := os.Stat(filepath.Join(stateDir, SeenFile)); !os.IsNotExist(err) {
		t.Fatalf("%s left behind: %v", SeenFile, err)
	}
}

// TestTrustFromToken: an agent given only its provisioning token takes the
// brokers, the CA pin and the provisioner keys from it, and trusts several
// keys at once (rotation) but no other.
func TestTrustFromToken(t *testing.T) {
	const id = "tokentrust1"
	e := newEnv(t)
	nc := e.client(t)
	events := record(t, nc, protocol.LifecyclePrefix+".>")
	seed, _, err := token.GenerateIssuerSeed()
	if err != nil {
		t.Fatal(err)
	}
	iss, err := token.NewIssuer(seed)
	if err != nil {
		t.Fatal(err)
	}
	next := mustUserKey()
	tok, _, err := iss.Create(token.Scope{Identity: id, Brokers: []string{e.url}, CAPin: e.ca.Pin(),
		ProvisionerKeys: []string{mustPublic(testKey), mustPublic(next)}}, time.Now(), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	startAgent(t, Options{Identity: id, StateDir: t.TempDir(), ReconnectWait: 50 * time.Millisecond,
		Provisioning: ProvisioningSettings{Token: tok, Enabled: true}})
	eventually(t, "startup", func() bool { return events.count(eventsOf(protocol.EventStartup, id)) == 1 })
	for _, kp := range []nkeys.KeyPair{testKey, next} {
		mustOK(t, call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentRPCUtil, protocol.ActionInventory, reqOpts{key: kp}, nil))
	}
	if rep := call(t, nc, protocol.ProvisioningCollective, id, protocol.AgentRPCUtil, protocol.ActionInventory, reqOpts{key: rogueKey}, nil); rep.Code != protocol.CodeUnauthorized {
		t.Fatalf("rogue key: %s", rep.Code)
	}
}
