package e2e

// The attack suite: one test per attack from docs/security.md, each against
// a real broker, provisioner and agents, each asserting that the attack
// fails and that nothing changed on the victims' disks.

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/nats-io/nuid"

	"github.com/muster-io/muster/agent"
	"github.com/muster-io/muster/broker"
	"github.com/muster-io/muster/internal/demo"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/token"
)

// arena is a fleet whose provisioner is paused, so its agents wait in
// provisioning mode for the attacker.
type arena struct {
	t       *testing.T
	f       *demo.Fleet
	prov    nkeys.KeyPair // the real provisioner's key
	rogue   nkeys.KeyPair // a key no agent trusts
	issuer  *token.Issuer
	victims []string
	caFile  string
}

func newArena(t *testing.T, nodes int, tweak func(*demo.Options)) *arena {
	t.Helper()
	f := newFleet(t, nodes, "cfssl", func(o *demo.Options) {
		o.StartPaused = true
		if tweak != nil {
			tweak(o)
		}
	})
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if err := f.Start(ctx); err != nil {
		t.Fatal(err)
	}
	a := &arena{t: t, f: f, victims: f.Identities(), caFile: filepath.Join(f.Dir(), "pki", "ca.pem")}
	seed, err := os.ReadFile(filepath.Join(f.Dir(), "pki", broker.ProvisionerSeedFile))
	if err != nil {
		t.Fatal(err)
	}
	if a.prov, err = nkeys.FromSeed(seed); err != nil {
		t.Fatal(err)
	}
	if a.rogue, err = nkeys.CreateUser(); err != nil {
		t.Fatal(err)
	}
	iseed, err := os.ReadFile(filepath.Join(f.Dir(), "pki", broker.TokenIssuerSeedFile))
	if err != nil {
		t.Fatal(err)
	}
	if a.issuer, err = token.NewIssuer(iseed); err != nil {
		t.Fatal(err)
	}
	// Wait until every victim answers on its node subject.
	nc := a.provisionerConn()
	for _, id := range a.victims {
		deadline := time.Now().Add(30 * time.Second)
		for {
			rep, err := a.send(nc, id, a.prov, protocol.AgentRPCUtil, protocol.ActionPing, nil, nil)
			if err == nil && rep.Code == protocol.CodeOK {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("%s never answered: %v", id, err)
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	return a
}

// provisionerConn connects with the provisioner's broker credential: the
// strongest position an attacker can hold on the provisioning broker
// without the provisioner's signing key... which is the same nkey here, so
// attacks sign with a.rogue unless they replay what a.prov signed.
func (a *arena) provisionerConn() *nats.Conn {
	a.t.Helper()
	nc, err := nats.Connect(a.f.Broker().ClientURL(), nats.RootCAs(a.caFile),
		mustNkey(a.t, filepath.Join(a.f.Dir(), "pki", broker.ProvisionerSeedFile)))
	if err != nil {
		a.t.Fatal(err)
	}
	a.t.Cleanup(nc.Close)
	return nc
}

// nodeConn connects as an unprovisioned node named identity holding a
// token for scope; errs receives asynchronous permission errors.
func (a *arena) nodeConn(identity string, scope token.Scope) (*nats.Conn, <-chan error) {
	a.t.Helper()
	tok, _, err := a.issuer.Create(scope, time.Now(), time.Hour)
	if err != nil {
		a.t.Fatal(err)
	}
	errs := make(chan error, 16)
	nc, err := nats.Connect(a.f.Broker().ClientURL(), nats.RootCAs(a.caFile), nats.Name(identity), nats.Token(tok),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case errs <- err:
			default:
			}
		}))
	if err != nil {
		a.t.Fatalf("connect as %s: %v", identity, err)
	}
	a.t.Cleanup(nc.Close)
	return nc, errs
}

// request builds a request to target signed by key (nil: unsigned);
// mutate, when set, changes it after signing.
func request(target string, key nkeys.KeyPair, ag, action string, body any, mutate func(*protocol.Request)) *protocol.Request {
	var raw json.RawMessage
	if body != nil {
		raw, _ = json.Marshal(body)
	}
	r := &protocol.Request{
		Protocol: protocol.RequestProtocol, ID: nuid.Next(), Sender: "attacker", Target: target,
		Agent: ag, Action: action, Time: time.Now().UTC(), TTL: 60, Body: raw,
	}
	if key != nil {
		if err := r.Sign(key); err != nil {
			panic(err)
		}
	}
	if mutate != nil {
		mutate(r)
	}
	return r
}

// send delivers a request on target's node subject and decodes the reply.
func (a *arena) send(nc *nats.Conn, target string, key nkeys.KeyPair, ag, action string, body any, mutate func(*protocol.Request)) (*protocol.Reply, error) {
	return a.deliver(nc, target, request(target, key, ag, action, body, mutate))
}

func (a *arena) deliver(nc *nats.Conn, subjectTarget string, r *protocol.Request) (*protocol.Reply, error) {
	data, err := json.Marshal(r)
	if err != nil {
		return nil, err
	}
	msg, err := nc.Request(protocol.NodeSubject(protocol.ProvisioningCollective, subjectTarget), data, 10*time.Second)
	if err != nil {
		return nil, err
	}
	return protocol.DecodeReply(msg.Data)
}

// snapshot is every file under the victims' state directories: path →
// mode and SHA-256 of the content.
func (a *arena) snapshot() map[string]string {
	a.t.Helper()
	out := map[string]string{}
	for _, id := range a.victims {
		root := a.f.AgentDir(id)
		err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			info, err := d.Info()
			if err != nil {
				return err
			}
			sum := ""
			if d.Type().IsRegular() {
				b, err := os.ReadFile(p)
				if err != nil {
					return err
				}
				h := sha256.Sum256(b)
				sum = hex.EncodeToString(h[:])
			}
			out[p] = fmt.Sprintf("%v %s", info.Mode(), sum)
			return nil
		})
		if err != nil && !errors.Is(err, fs.ErrNotExist) {
			a.t.Fatal(err)
		}
	}
	return out
}

// unchanged fails the test when the victims' files differ from before.
func (a *arena) unchanged(before map[string]string) {
	a.t.Helper()
	after := a.snapshot()
	for p, v := range before {
		if after[p] != v {
			a.t.Errorf("%s changed: %q → %q", p, v, after[p])
		}
	}
	for p := range after {
		if _, ok := before[p]; !ok {
			a.t.Errorf("%s appeared", p)
		}
	}
	for _, id := range a.victims {
		if _, err := os.Stat(filepath.Join(a.f.AgentDir(id), agent.ConfigFileName)); err == nil {
			a.t.Errorf("%s has a configuration file", id)
		}
	}
}

func wantCode(t *testing.T, rep *protocol.Reply, err error, code protocol.Code) {
	t.Helper()
	if err != nil {
		t.Fatalf("no reply: %v", err)
	}
	if rep.Code != code {
		t.Fatalf("reply %s (%s), want %s", rep.Code, rep.Message, code)
	}
}

// expectViolation waits for a permissions violation naming what.
func expectViolation(t *testing.T, errs <-chan error, what string) {
	t.Helper()
	select {
	case err := <-errs:
		if !strings.Contains(strings.ToLower(err.Error()), "permissions violation") || !strings.Contains(err.Error(), what) {
			t.Fatalf("error %v, want a permissions violation for %s", err, what)
		}
	case <-time.After(5 * time.Second):
		t.Fatalf("no permissions violation for %s", what)
	}
}

func configureBody(sslDir string) protocol.ConfigureRequest {
	return protocol.ConfigureRequest{Configuration: map[string]string{"plugin.choria.middleware_hosts": "evil.example.net:4222"}, SSLDir: sslDir}
}

func TestAttackNodeSubscribesToOthers(t *testing.T) {
	a := newArena(t, 1, nil)
	before := a.snapshot()
	nc, errs := a.nodeConn("mallory.demo.muster", token.Scope{Identity: "mallory.demo.muster"})
	for _, subj := range []string{
		protocol.NodeSubject(protocol.ProvisioningCollective, a.victims[0]),
		">",
		"_INBOX.>",
		protocol.MetadataSubject,
	} {
		if _, err := nc.SubscribeSync(subj); err != nil {
			t.Fatal(err)
		}
		expectViolation(t, errs, subj)
	}
	a.unchanged(before)
}

func TestAttackNodePublishesAsAnother(t *testing.T) {
	a := newArena(t, 1, nil)
	nc, errs := a.nodeConn("mallory.demo.muster", token.Scope{Identity: "mallory.demo.muster"})
	// A reply to someone else's request: the inbox is not one it received.
	if err := nc.Publish("_INBOX.stolen.reply", []byte(`{"protocol":"muster:reply:1"}`)); err != nil {
		t.Fatal(err)
	}
	expectViolation(t, errs, "_INBOX.stolen.reply")
	// A request to the victim, as if it were the provisioner.
	if err := nc.Publish(protocol.NodeSubject(protocol.ProvisioningCollective, a.victims[0]), []byte("{}")); err != nil {
		t.Fatal(err)
	}
	expectViolation(t, errs, protocol.NodeSubject(protocol.ProvisioningCollective, a.victims[0]))

	// Metadata naming the victim and a machine that does not exist: the
	// provisioner takes metadata only as a hint and asks the named
	// identity itself, so neither the lie nor the ghost gets anywhere.
	for _, id := range []string{a.victims[0], "ghost.demo.muster"} {
		md, _ := json.Marshal(protocol.Metadata{Protocol: protocol.MetadataProto, Identity: id, Time: time.Now().UTC(), Version: "evil", Facts: map[string]string{"owned": "yes"}})
		if err := nc.Publish(protocol.MetadataSubject, md); err != nil {
			t.Fatal(err)
		}
	}
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	a.f.Provisioner().Resume()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if got := a.f.WaitProduction(ctx, 1); got != 1 {
		t.Fatalf("the victim did not reach production: %v", a.f.Errors())
	}
	for _, ns := range a.f.Provisioner().Nodes() {
		if ns.Identity == "ghost.demo.muster" && (ns.State == "provisioned" || ns.State == "production" || ns.ProvisionedAt != (time.Time{})) {
			t.Errorf("ghost node state %s", ns.State)
		}
	}
	cfg, err := os.ReadFile(filepath.Join(a.f.AgentDir(a.victims[0]), agent.ConfigFileName))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(cfg), "owned") || strings.Contains(string(cfg), "evil") {
		t.Fatalf("forged metadata reached the configuration:\n%s", cfg)
	}
}

func TestAttackRogueProvisioner(t *testing.T) {
	a := newArena(t, 1, nil)
	before := a.snapshot()
	nc := a.provisionerConn()
	v := a.victims[0]
	for _, tc := range []struct {
		name string
		key  nkeys.KeyPair
		mut  func(*protocol.Request)
	}{
		{"unknown key", a.rogue, nil},
		{"unsigned", nil, nil},
		{"claims the real key", a.rogue, func(r *protocol.Request) { r.Signer, _ = a.prov.PublicKey() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rep, err := a.send(nc, v, tc.key, protocol.AgentProvision, protocol.ActionConfigure, configureBody(""), tc.mut)
			wantCode(t, rep, err, protocol.CodeUnauthorized)
			rep, err = a.send(nc, v, tc.key, protocol.AgentProvision, protocol.ActionRestart, protocol.RestartRequest{SplayMillis: 1}, tc.mut)
			wantCode(t, rep, err, protocol.CodeUnauthorized)
			rep, err = a.send(nc, v, tc.key, protocol.AgentProvision, protocol.ActionGenCSR, protocol.GenCSRRequest{}, tc.mut)
			wantCode(t, rep, err, protocol.CodeUnauthorized)
		})
	}
	a.unchanged(before)
}

func TestAttackTamperedRequest(t *testing.T) {
	a := newArena(t, 1, nil)
	before := a.snapshot()
	nc := a.provisionerConn()
	v := a.victims[0]
	// A request the real provisioner signed, altered in flight.
	for name, mut := range map[string]func(*protocol.Request){
		"body":   func(r *protocol.Request) { r.Body = json.RawMessage(`{"configuration":{"x":"y"}}`) },
		"action": func(r *protocol.Request) { r.Action = protocol.ActionRestart },
		"time":   func(r *protocol.Request) { r.Time = r.Time.Add(time.Second) },
		"ttl":    func(r *protocol.Request) { r.TTL = 600 },
	} {
		t.Run(name, func(t *testing.T) {
			rep, err := a.send(nc, v, a.prov, protocol.AgentProvision, protocol.ActionConfigure, configureBody(""), mut)
			wantCode(t, rep, err, protocol.CodeUnauthorized)
		})
	}
	a.unchanged(before)
}

func TestAttackReplay(t *testing.T) {
	a := newArena(t, 2, nil)
	nc := a.provisionerConn()
	v, other := a.victims[0], a.victims[1]
	// Capture: a harmless request the real provisioner signed for v, sent
	// once (it succeeds), then replayed to v and re-addressed to other.
	captured := request(v, a.prov, protocol.AgentProvision, protocol.ActionConfigure,
		protocol.ConfigureRequest{Configuration: map[string]string{"loglevel": "info", "plugin.choria.server.provision": "true"}}, nil)
	rep, err := a.deliver(nc, v, captured)
	wantCode(t, rep, err, protocol.CodeOK)
	a.victims = []string{v, other}
	before := a.snapshot()
	// The legitimate configure wrote v's file; restore the "no config"
	// expectation only for other.
	rep, err = a.deliver(nc, v, captured)
	wantCode(t, rep, err, protocol.CodeBadRequest) // request id already processed
	rep, err = a.deliver(nc, other, captured)
	wantCode(t, rep, err, protocol.CodeBadRequest) // target is not this node
	retargeted := *captured
	retargeted.Target = other
	rep, err = a.deliver(nc, other, &retargeted)
	wantCode(t, rep, err, protocol.CodeUnauthorized) // the signature covers the target
	after := a.snapshot()
	for p, h := range before {
		if after[p] != h {
			t.Errorf("%s changed by a replay", p)
		}
	}
	if _, err := os.Stat(filepath.Join(a.f.AgentDir(other), agent.ConfigFileName)); err == nil {
		t.Error("the other node got a configuration")
	}
}

func TestAttackStaleRequest(t *testing.T) {
	a := newArena(t, 1, nil)
	before := a.snapshot()
	nc := a.provisionerConn()
	for name, at := range map[string]time.Duration{"old": -time.Hour, "future": time.Hour} {
		t.Run(name, func(t *testing.T) {
			rep, err := a.send(nc, a.victims[0], nil, protocol.AgentProvision, protocol.ActionConfigure, configureBody(""), func(r *protocol.Request) {
				r.Time = r.Time.Add(at)
				if err := r.Sign(a.prov); err != nil {
					t.Fatal(err)
				}
			})
			wantCode(t, rep, err, protocol.CodeExpired)
		})
	}
	a.unchanged(before)
}

func TestAttackBadToken(t *testing.T) {
	a := newArena(t, 1, nil)
	before := a.snapshot()
	otherSeed, _, _ := token.GenerateIssuerSeed()
	other, _ := token.NewIssuer(otherSeed)
	mk := func(iss *token.Issuer, s token.Scope, at time.Time, ttl time.Duration) string {
		tok, _, err := iss.Create(s, at, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	now := time.Now()
	for name, tok := range map[string]string{
		"expired":        mk(a.issuer, token.Scope{Identity: "intruder.demo.muster"}, now.Add(-3*time.Hour), time.Hour),
		"out of scope":   mk(a.issuer, token.Scope{Pattern: "web-*.example.net"}, now, time.Hour),
		"other node's":   mk(a.issuer, token.Scope{Identity: a.victims[0]}, now, time.Hour),
		"foreign issuer": mk(other, token.Scope{Identity: "intruder.demo.muster"}, now, time.Hour),
		"none":           "",
	} {
		t.Run(name, func(t *testing.T) {
			opts := []nats.Option{nats.RootCAs(a.caFile), nats.Name("intruder.demo.muster"), nats.NoReconnect()}
			if tok != "" {
				opts = append(opts, nats.Token(tok))
			}
			nc, err := nats.Connect(a.f.Broker().ClientURL(), opts...)
			if err == nil {
				nc.Close()
				t.Fatal("the broker admitted the intruder")
			}
		})
	}
	a.unchanged(before)
}

// TestAttackNodeLiesInCSR runs a fake node (a valid token for its own
// identity) that answers gencsr with a CSR the provisioner must refuse.
func TestAttackNodeLiesInCSR(t *testing.T) {
	cases := []struct {
		name    string
		cn      string
		sans    []string
		wantErr string
	}{
		{"names another identity", "node00000.demo.muster", nil, "CN"},
		{"forbidden SAN", "mallory.demo.muster", []string{"mallory.demo.muster", "login.bank.example"}, "SAN"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := newArena(t, 1, nil)
			const mallory = "mallory.demo.muster"
			nc, _ := a.nodeConn(mallory, token.Scope{Identity: mallory})
			tok, _, _ := a.issuer.Create(token.Scope{Identity: mallory}, time.Now(), time.Hour)
			csr, pub := csrWith(t, tc.cn, tc.sans)
			if _, err := nc.Subscribe(protocol.NodeSubject(protocol.ProvisioningCollective, mallory), func(m *nats.Msg) {
				req, err := protocol.DecodeRequest(m.Data)
				if err != nil {
					return
				}
				var body any
				switch req.Action {
				case protocol.ActionInventory:
					body = protocol.Inventory{Facts: map[string]string{}, ProvisioningToken: tok}
				case protocol.ActionGenCSR:
					body = protocol.GenCSRReply{CSR: csr, PublicKey: pub, SSLDir: "/tmp"}
				}
				rep, _ := protocol.NewReply(req, mallory, protocol.CodeOK, "", body)
				data, _ := json.Marshal(rep)
				_ = m.Respond(data)
			}); err != nil {
				t.Fatal(err)
			}
			md, _ := json.Marshal(protocol.Metadata{Protocol: protocol.MetadataProto, Identity: mallory, Time: time.Now().UTC(), Version: "x", Facts: map[string]string{}})
			if err := nc.Publish(protocol.MetadataSubject, md); err != nil {
				t.Fatal(err)
			}
			a.f.Provisioner().Resume()
			deadline := time.Now().Add(time.Minute)
			for {
				lastErr := ""
				for _, ns := range a.f.Provisioner().Nodes() {
					if ns.Identity == mallory {
						lastErr = ns.LastError
						if ns.State == "provisioned" || ns.State == "production" {
							t.Fatalf("the lying node was provisioned")
						}
					}
				}
				if lastErr != "" {
					if !strings.Contains(lastErr, tc.wantErr) {
						t.Fatalf("refused for %q, want %q", lastErr, tc.wantErr)
					}
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("the lying node was never refused")
				}
				time.Sleep(50 * time.Millisecond)
			}
			// The real node is provisioned normally.
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			defer cancel()
			if got := a.f.WaitProduction(ctx, 1); got != 1 {
				t.Fatalf("victim not provisioned: %v", a.f.Errors())
			}
		})
	}
}

// TestAttackDuplicateIdentity: a second machine (another address) connects
// with a stolen token for a waiting node's identity. The broker refuses it
// and the provisioner holds the identity instead of provisioning whichever
// connection answers first.
func TestAttackDuplicateIdentity(t *testing.T) {
	a := newArena(t, 1, nil)
	before := a.snapshot()
	v := a.victims[0]
	tok, _, _ := a.issuer.Create(token.Scope{Identity: v}, time.Now(), time.Hour)
	other := nats.SetCustomDialer(&net.Dialer{LocalAddr: &net.TCPAddr{IP: net.ParseIP("127.0.0.2")}, Timeout: 5 * time.Second})
	nc, err := nats.Connect(a.f.Broker().ClientURL(), nats.RootCAs(a.caFile), nats.Name(v), nats.Token(tok), nats.NoReconnect(), other)
	if err == nil {
		nc.Close()
		t.Fatal("the broker admitted a second connection for a live identity")
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		held := false
		for _, ns := range a.f.Provisioner().Nodes() {
			if ns.Identity == v && ns.State == "held" && ns.HoldReason == "duplicate_connection" {
				held = true
			}
		}
		if held {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("identity not held: %+v", a.f.Provisioner().Nodes())
		}
		time.Sleep(50 * time.Millisecond)
	}
	a.f.Provisioner().Resume()
	// Held means not provisioned, even once the provisioner runs and the
	// node keeps announcing itself: watch it for a while.
	for end := time.Now().Add(2 * time.Second); time.Now().Before(end); time.Sleep(50 * time.Millisecond) {
		if a.f.ProductionCount() != 0 {
			t.Fatal("a held identity was provisioned")
		}
	}
	a.unchanged(before)
}

func TestAttackHostileConfigure(t *testing.T) {
	a := newArena(t, 1, nil)
	nc := a.provisionerConn()
	v := a.victims[0]
	// gencsr first (signed by the real provisioner) so configure has a key
	// to check against; its key files are part of the snapshot.
	rep, err := a.send(nc, v, a.prov, protocol.AgentProvision, protocol.ActionGenCSR, protocol.GenCSRRequest{}, nil)
	wantCode(t, rep, err, protocol.CodeOK)
	var g protocol.GenCSRReply
	if err := json.Unmarshal(rep.Body, &g); err != nil {
		t.Fatal(err)
	}
	before := a.snapshot()
	cases := []struct {
		name string
		body protocol.ConfigureRequest
	}{
		{"ssldir escapes", protocol.ConfigureRequest{Configuration: map[string]string{"a": "b"}, SSLDir: g.SSLDir + "/../../../etc"}},
		{"ssldir elsewhere", protocol.ConfigureRequest{Configuration: map[string]string{"a": "b"}, SSLDir: "/etc/muster"}},
		{"key with newline", protocol.ConfigureRequest{Configuration: map[string]string{"loglevel\nidentity": "x"}}},
		{"key with equals", protocol.ConfigureRequest{Configuration: map[string]string{"a=b": "x"}}},
		{"value with newline", protocol.ConfigureRequest{Configuration: map[string]string{"loglevel": "info\nidentity = other"}}},
		{"certificate path outside", protocol.ConfigureRequest{Configuration: map[string]string{"plugin.security.file.certificate": "/etc/shadow"}}},
		{"certificate path escapes", protocol.ConfigureRequest{Configuration: map[string]string{"plugin.security.file.key": g.SSLDir + "/../../../../etc/shadow"}}},
		{"policy name with slash", protocol.ConfigureRequest{Configuration: map[string]string{"a": "b"}, ActionPolicies: map[string]string{"../../x": "allow"}}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			rep, err := a.send(nc, v, a.prov, protocol.AgentProvision, protocol.ActionConfigure, tc.body, nil)
			wantCode(t, rep, err, protocol.CodeBadRequest)
		})
	}
	t.Run("oversize for the agent", func(t *testing.T) {
		big := strings.Repeat("x", protocol.MaxMessageSize)
		rep, err := a.send(nc, v, a.prov, protocol.AgentProvision, protocol.ActionConfigure,
			protocol.ConfigureRequest{Configuration: map[string]string{"a": big}}, nil)
		wantCode(t, rep, err, protocol.CodeTooLarge)
	})
	t.Run("10 MB payload", func(t *testing.T) {
		data := make([]byte, 10<<20)
		_, err := nc.Request(protocol.NodeSubject(protocol.ProvisioningCollective, v), data, 5*time.Second)
		if !errors.Is(err, nats.ErrMaxPayload) {
			t.Fatalf("10 MB request: %v, want the broker's max payload refusal", err)
		}
	})
	a.unchanged(before)
}

func TestAttackHelperCertificateForAnotherKey(t *testing.T) {
	f := newFleet(t, 2, "wrong-key", nil)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := f.Start(ctx); err != nil {
		t.Fatal(err)
	}
	for len(f.Errors()) < 2 && ctx.Err() == nil {
		time.Sleep(50 * time.Millisecond)
	}
	for id, err := range f.Errors() {
		if !strings.Contains(err.Error(), "certificate") {
			t.Errorf("%s: %v", id, err)
		}
		for _, name := range []string{agent.ConfigFileName, "ssl/certificate.pem", "ssl/ca.pem"} {
			if _, err := os.Stat(filepath.Join(f.AgentDir(id), name)); err == nil {
				t.Errorf("%s: %s written", id, name)
			}
		}
	}
	if f.ProductionCount() != 0 {
		t.Fatal("a node reached production with a certificate for another key")
	}
}

// csrWith makes a key and a CSR with the given CN and DNS SANs (PEM CSR,
// PEM public key).
func csrWith(t *testing.T, cn string, sans []string) (string, string) {
	key, err := pki.GenerateKey(protocol.KeyECDSAP256, 0)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{Subject: pkix.Name{CommonName: cn}, DNSNames: sans}, key)
	if err != nil {
		t.Fatal(err)
	}
	csr := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
	pub, err := pki.MarshalPublicKey(key.Public())
	if err != nil {
		t.Fatal(err)
	}
	return string(csr), string(pub)
}
