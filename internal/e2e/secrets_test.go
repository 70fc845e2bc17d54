package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/common/expfmt"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/agent"
	"github.com/muster-io/muster/broker"
	"github.com/muster-io/muster/internal/demo"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/syncbuf"
)

// jwtShape is any compact JWS: a provisioning token, or a piece of one.
var jwtShape = regexp.MustCompile(`eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}`)

// TestSecretsNeverLogged provisions nodes with every component at its most
// verbose (broker at trace, so nats-server traces every protocol line and
// payload; provisioner and agents at trace) and then looks for every secret
// of the fleet in the captured logs and in the metrics expositions: the
// nodes' provisioning tokens, the provisioner's nkey seed, the token
// issuer's seed, and the private keys of the nodes, the CA, the broker and
// the admin. Messages sent to nodes are searched too.
func TestSecretsNeverLogged(t *testing.T) {
	sink := &syncbuf.Buffer{}
	log := logrus.New()
	log.SetOutput(sink)
	log.SetLevel(logrus.TraceLevel)
	const n = 2
	f := newFleet(t, n, "cfssl", func(o *demo.Options) { o.Logger = log })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	// Everything sent to nodes (requests, broadcasts) is captured too.
	if err := f.StartBroker(); err != nil {
		t.Fatal(err)
	}
	toNodes := &syncbuf.Buffer{}
	pc, err := nats.Connect(f.Broker().ClientURL(), nats.RootCAs(filepath.Join(f.Dir(), "pki", "ca.pem")), nats.Timeout(connectTimeout),
		mustNkey(t, filepath.Join(f.Dir(), "pki", broker.ProvisionerSeedFile)))
	if err != nil {
		t.Fatal(err)
	}
	defer pc.Close()
	if _, err := pc.Subscribe(protocol.ProvisioningCollective+".>", func(m *nats.Msg) {
		fmt.Fprintf(toNodes, "%s %s\n", m.Subject, m.Data)
	}); err != nil {
		t.Fatal(err)
	}
	if err := pc.Flush(); err != nil {
		t.Fatal(err)
	}
	if err := f.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.WaitProduction(ctx, n); got != n {
		t.Fatalf("%d of %d nodes reached production: %v", got, n, f.Errors())
	}
	// Exercise a refusal too: its log line must not carry the token either.
	if err := f.Provisioner().Hold(f.Identities()[0], "test_hold"); err != nil {
		t.Fatal(err)
	}

	secrets := map[string]string{}
	for _, id := range f.Identities() {
		tok := f.Token(id)
		if tok == "" {
			t.Fatalf("no token recorded for %s", id)
		}
		secrets[id+" token"] = tok
		secrets[id+" token signature"] = tok[strings.LastIndexByte(tok, '.')+1:]
		addPEMSecret(t, secrets, id+" private key", filepath.Join(f.AgentDir(id), "ssl", agent.KeyFile))
	}
	for name, file := range map[string]string{
		"provisioner seed":  filepath.Join(f.Dir(), "pki", broker.ProvisionerSeedFile),
		"token issuer seed": filepath.Join(f.Dir(), "pki", broker.TokenIssuerSeedFile),
	} {
		b, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		secrets[name] = strings.TrimSpace(string(b))
	}
	addPEMSecret(t, secrets, "CA key", filepath.Join(f.Dir(), "ca", "ca-key.pem"))
	addPEMSecret(t, secrets, "broker key", filepath.Join(f.Dir(), "pki", "broker-key.pem"))
	addPEMSecret(t, secrets, "admin key", filepath.Join(f.Dir(), "pki", "admin-key.pem"))

	// Every metrics exposition of the fleet.
	expo := map[string]string{
		"provisioner": exposition(t, f.Provisioner().Registry()),
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(broker.NewCollector(f.Broker()))
	expo["broker"] = exposition(t, reg)
	for _, id := range f.Identities() {
		var b strings.Builder
		if err := agent.WriteMetrics(&b, f.Agent(id)); err != nil {
			t.Fatal(err)
		}
		expo["agent "+id] = b.String()
	}

	logs := sink.String()
	// The capture must really hold nats-server's traces and the payloads
	// that carried the tokens, or this test proves nothing.
	for _, want := range []string{"source=nats-server", "[CONNECT", "MSG_PAYLOAD", "provisioning_token", "node provisioned"} {
		if !strings.Contains(logs, want) {
			t.Fatalf("the captured logs lack %q: the fleet did not log at trace level", want)
		}
	}
	expo["logs"] = logs
	if !strings.Contains(toNodes.String(), protocol.ActionConfigure) {
		t.Fatal("no configure request was captured")
	}
	expo["messages to nodes"] = toNodes.String()
	for where, text := range expo {
		for name, secret := range secrets {
			if strings.Contains(text, secret) {
				t.Errorf("%s: the %s appears", where, name)
			}
		}
		if m := jwtShape.FindString(text); m != "" {
			t.Errorf("%s: a token-shaped string appears: %.40s…", where, m)
		}
		if strings.Contains(text, "PRIVATE KEY") {
			t.Errorf("%s: a private key block appears", where)
		}
	}
}

// addPEMSecret records every base64 line of a PEM file's body.
func addPEMSecret(t *testing.T, secrets map[string]string, name, file string) {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatal(err)
	}
	for i, line := range strings.Split(string(b), "\n") {
		if len(line) >= 32 && !strings.HasPrefix(line, "-----") {
			secrets[name+" line "+string(rune('0'+i))] = line
		}
	}
}

func exposition(t *testing.T, g prometheus.Gatherer) string {
	t.Helper()
	mfs, err := g.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var b bytes.Buffer
	enc := expfmt.NewEncoder(&b, expfmt.NewFormat(expfmt.TypeTextPlain))
	for _, mf := range mfs {
		if err := enc.Encode(mf); err != nil {
			t.Fatal(err)
		}
	}
	if b.Len() == 0 {
		t.Fatal("empty exposition")
	}
	return b.String()
}
