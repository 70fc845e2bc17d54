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
	"maps"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
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
	"github.com/muster-io/muster/provisioner"
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
	nc, err := nats.Connect(a.f.Broker().ClientURL(), nats.RootCAs(a.caFile), nats.Timeout(connectTimeout),
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
	nc, err := nats.Connect(a.f.Broker().ClientURL(), nats.RootCAs(a.caFile), nats.Timeout(connectTimeout), nats.Name(identity), nats.Token(tok),
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
		maps.Copy(out, snapshotDir(a.t, a.f.AgentDir(id)))
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

// holdVictims holds every real node in the provisioner and resumes it, so
// the provisioner works for the attacker while the victims' disks stay as
// they are (a held node is never taken).
func (a *arena) holdVictims() {
	a.t.Helper()
	for _, id := range a.victims {
		if err := a.f.Provisioner().Hold(id, "attack_test"); err != nil {
			a.t.Fatal(err)
		}
	}
	a.f.Provisioner().Resume()
}

// refusals sums the refusal counters of the victims' agents.
func (a *arena) refusals() agent.Refusals {
	var r agent.Refusals
	for _, id := range a.victims {
		x := a.f.Agent(id).Refusals()
		r.Unsigned += x.Unsigned
		r.BadSignature += x.BadSignature
		r.UntrustedKey += x.UntrustedKey
		r.Stale += x.Stale
		r.Replayed += x.Replayed
	}
	return r
}

// nodeState returns the provisioner's status of identity.
func (a *arena) nodeState(identity string) (provisioner.NodeStatus, bool) {
	for _, ns := range a.f.Provisioner().Nodes() {
		if ns.Identity == identity {
			return ns, true
		}
	}
	return provisioner.NodeStatus{}, false
}

// waitNode polls the provisioner until cond holds for identity's status.
func (a *arena) waitNode(identity, what string, cond func(provisioner.NodeStatus) bool) provisioner.NodeStatus {
	a.t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		ns, ok := a.nodeState(identity)
		if ok && cond(ns) {
			return ns
		}
		if time.Now().After(deadline) {
			a.t.Fatalf("%s: %s never happened (status %+v)", identity, what, ns)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// metric returns the value of the provisioner's counter name{label=value}.
func (a *arena) metric(name, label, value string) float64 {
	a.t.Helper()
	mfs, err := a.f.Provisioner().Registry().Gather()
	if err != nil {
		a.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == label && l.GetValue() == value {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// fakeNode is an attacker's node: a connection with a valid token for its
// own identity that answers the provisioner's requests itself.
type fakeNode struct {
	nc   *nats.Conn
	errs <-chan error
	mu   sync.Mutex
	seen []string // actions requested
}

func (f *fakeNode) actions() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.seen...)
}

// fake connects a fake node named identity; answer returns the reply's
// sender and body for each request it receives (an empty sender: the
// node's own identity).
func (a *arena) fake(identity string, answer func(req *protocol.Request) (sender string, body any)) *fakeNode {
	a.t.Helper()
	nc, errs := a.nodeConn(identity, token.Scope{Identity: identity})
	fn := &fakeNode{nc: nc, errs: errs}
	if _, err := nc.Subscribe(protocol.NodeSubject(protocol.ProvisioningCollective, identity), func(m *nats.Msg) {
		req, err := protocol.DecodeRequest(m.Data)
		if err != nil {
			return
		}
		fn.mu.Lock()
		fn.seen = append(fn.seen, req.Action)
		fn.mu.Unlock()
		sender, body := answer(req)
		if sender == "" {
			sender = identity
		}
		rep, _ := protocol.NewReply(req, sender, protocol.CodeOK, "", body)
		data, _ := json.Marshal(rep)
		_ = m.Respond(data)
	}); err != nil {
		a.t.Fatal(err)
	}
	md, _ := json.Marshal(protocol.Metadata{Protocol: protocol.MetadataProto, Identity: identity, Time: time.Now().UTC(), Version: "x", Facts: map[string]string{}})
	if err := nc.Publish(protocol.MetadataSubjectFor(identity), md); err != nil {
		a.t.Fatal(err)
	}
	if err := nc.Flush(); err != nil {
		a.t.Fatal(err)
	}
	return fn
}

// productionConn connects with a production certificate from the fleet's
// CA for identity (mutual TLS: the broker puts it in PRODUCTION as
// identity).
func (a *arena) productionConn(identity string) (*nats.Conn, <-chan error) {
	a.t.Helper()
	is, err := a.f.CA().Issue(identity, []string{identity})
	if err != nil {
		a.t.Fatal(err)
	}
	dir := a.t.TempDir()
	certFile, keyFile, err := a.f.CA().WriteIssued(dir, "node", is)
	if err != nil {
		a.t.Fatal(err)
	}
	errs := make(chan error, 16)
	nc, err := nats.Connect(a.f.Broker().ClientURL(), nats.RootCAs(a.caFile), nats.Timeout(connectTimeout), nats.ClientCert(certFile, keyFile),
		nats.ErrorHandler(func(_ *nats.Conn, _ *nats.Subscription, err error) {
			select {
			case errs <- err:
			default:
			}
		}))
	if err != nil {
		a.t.Fatal(err)
	}
	a.t.Cleanup(nc.Close)
	return nc, errs
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
	var subs []*nats.Subscription
	for _, subj := range []string{
		protocol.NodeSubject(protocol.ProvisioningCollective, a.victims[0]),
		">",
		"_INBOX.>",
		protocol.MetadataSubjectFor(">"),
		protocol.LifecycleSubject("*", "*", ">"),
		"production.>",
	} {
		sub, err := nc.SubscribeSync(subj)
		if err != nil {
			t.Fatal(err)
		}
		expectViolation(t, errs, subj)
		subs = append(subs, sub)
	}
	// The victim is asked for its inventory (which carries its token):
	// none of the attacker's subscriptions sees the request or the reply.
	rep, err := a.send(a.provisionerConn(), a.victims[0], a.prov, protocol.AgentRPCUtil, protocol.ActionInventory, nil, nil)
	wantCode(t, rep, err, protocol.CodeOK)
	if err := nc.Flush(); err != nil {
		t.Fatal(err)
	}
	for _, sub := range subs {
		if m, err := sub.NextMsg(200 * time.Millisecond); err == nil {
			t.Fatalf("the attacker received %s", m.Subject)
		}
	}
	a.unchanged(before)
}

// TestAttackNodePublishesMetadataAsAnother: waiting and production nodes
// try to announce themselves, start up or arrive in production as someone
// else. The broker lets a node publish only on subjects that end in its own
// identity; what it may publish there but names another identity in its
// body is dropped by the provisioner.
func TestAttackNodePublishesMetadataAsAnother(t *testing.T) {
	a := newArena(t, 1, nil)
	before := a.snapshot()
	v := a.victims[0]
	const mallory, ghost = "mallory.demo.muster", "ghost.demo.muster"
	nc, errs := a.nodeConn(mallory, token.Scope{Identity: mallory})
	prod, prodErrs := a.productionConn("mallory-prod.demo.muster")
	md := func(id string) []byte {
		b, _ := json.Marshal(protocol.Metadata{Protocol: protocol.MetadataProto, Identity: id, Time: time.Now().UTC(), Version: "evil", Facts: map[string]string{"owned": "yes"}})
		return b
	}
	ev := func(typ, id string) []byte {
		b, _ := json.Marshal(protocol.Event{Protocol: protocol.EventProtocol, ID: nuid.Next(), Identity: id, Component: protocol.AgentComponent, Type: typ, Time: time.Now().Add(time.Hour).UTC()})
		return b
	}
	// On the other identity's subjects: refused by the broker.
	for _, m := range []struct {
		subject string
		data    []byte
	}{
		{protocol.MetadataSubjectFor(v), md(v)},
		{protocol.MetadataSubject, md(v)},
		{protocol.LifecycleSubject(protocol.EventStartup, protocol.AgentComponent, ghost), ev(protocol.EventStartup, ghost)},
	} {
		if err := nc.Publish(m.subject, m.data); err != nil {
			t.Fatal(err)
		}
		expectViolation(t, errs, m.subject)
	}
	provisioned := protocol.LifecycleSubject(protocol.EventProvisioned, protocol.AgentComponent, ghost)
	if err := prod.Publish(provisioned, ev(protocol.EventProvisioned, ghost)); err != nil {
		t.Fatal(err)
	}
	expectViolation(t, prodErrs, provisioned)

	// On its own subjects, naming someone else: dropped by the provisioner.
	invalid := func() float64 {
		return a.metric("muster_provisioner_invalid_messages_total", "source", "metadata") +
			a.metric("muster_provisioner_invalid_messages_total", "source", "startup") +
			a.metric("muster_provisioner_invalid_messages_total", "source", "production")
	}
	was := invalid()
	for _, m := range []struct {
		nc      *nats.Conn
		subject string
		data    []byte
	}{
		{nc, protocol.MetadataSubjectFor(mallory), md(ghost)},
		{nc, protocol.LifecycleSubject(protocol.EventStartup, protocol.AgentComponent, mallory), ev(protocol.EventStartup, ghost)},
		{prod, protocol.LifecycleSubject(protocol.EventProvisioned, protocol.AgentComponent, "mallory-prod.demo.muster"), ev(protocol.EventProvisioned, ghost)},
		{prod, protocol.LifecycleSubject(protocol.EventProvisioned, protocol.AgentComponent, "mallory-prod.demo.muster"), ev(protocol.EventProvisioned, v)},
	} {
		if err := m.nc.Publish(m.subject, m.data); err != nil {
			t.Fatal(err)
		}
		if err := m.nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(30 * time.Second)
	for invalid() < was+4 {
		if time.Now().After(deadline) {
			t.Fatalf("the provisioner dropped %v of 4 forged messages", invalid()-was)
		}
		time.Sleep(20 * time.Millisecond)
	}
	if ns, ok := a.nodeState(ghost); ok {
		t.Errorf("the provisioner tracks the ghost: %+v", ns)
	}
	if ns, _ := a.nodeState(v); ns.State == provisioner.StateProduction {
		t.Error("a forged provisioned event put the waiting victim in production")
	}
	a.unchanged(before)
}

// TestAttackNodeRepliesAsAnother: a node replies to requests it did not
// receive, or answers its own requests in another identity's name.
func TestAttackNodeRepliesAsAnother(t *testing.T) {
	a := newArena(t, 1, nil)
	before := a.snapshot()
	v := a.victims[0]
	nc, errs := a.nodeConn("mallory.demo.muster", token.Scope{Identity: "mallory.demo.muster"})
	// A reply to someone else's request: the inbox is not one it received.
	if err := nc.Publish("_INBOX.stolen.reply", []byte(`{"protocol":"muster:reply:1"}`)); err != nil {
		t.Fatal(err)
	}
	expectViolation(t, errs, "_INBOX.stolen.reply")
	// A request to the victim, as if it were the provisioner.
	if err := nc.Publish(protocol.NodeSubject(protocol.ProvisioningCollective, v), []byte("{}")); err != nil {
		t.Fatal(err)
	}
	expectViolation(t, errs, protocol.NodeSubject(protocol.ProvisioningCollective, v))

	// Asked as itself, it answers in the victim's name (with a valid token
	// of its own, so only the sender gives it away).
	const liar = "liar.demo.muster"
	tok, _, _ := a.issuer.Create(token.Scope{Identity: liar, Batch: "demo"}, time.Now(), time.Hour)
	fn := a.fake(liar, func(req *protocol.Request) (string, any) {
		return v, protocol.Inventory{Facts: map[string]string{}, ProvisioningToken: tok}
	})
	a.holdVictims()
	ns := a.waitNode(liar, "refusal", func(ns provisioner.NodeStatus) bool { return ns.LastError != "" })
	if !strings.Contains(ns.LastError, "sender") || ns.State == provisioner.StateProvisioned {
		t.Fatalf("liar: state %s, error %q", ns.State, ns.LastError)
	}
	for _, act := range fn.actions() {
		if act != protocol.ActionInventory {
			t.Fatalf("the liar was asked to %s", act)
		}
	}
	a.unchanged(before)
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
			was := a.refusals()
			rep, err := a.send(nc, v, tc.key, protocol.AgentProvision, protocol.ActionConfigure, configureBody(""), tc.mut)
			wantCode(t, rep, err, protocol.CodeUnauthorized)
			rep, err = a.send(nc, v, tc.key, protocol.AgentProvision, protocol.ActionRestart, protocol.RestartRequest{SplayMillis: 1}, tc.mut)
			wantCode(t, rep, err, protocol.CodeUnauthorized)
			rep, err = a.send(nc, v, tc.key, protocol.AgentProvision, protocol.ActionGenCSR, protocol.GenCSRRequest{}, tc.mut)
			wantCode(t, rep, err, protocol.CodeUnauthorized)
			now := a.refusals()
			if got := (now.Unsigned + now.UntrustedKey + now.BadSignature) - (was.Unsigned + was.UntrustedKey + was.BadSignature); got != 3 {
				t.Fatalf("%d refusals counted, want 3", got)
			}
		})
	}
	if r := a.refusals(); r.Unsigned != 3 || r.UntrustedKey != 3 || r.BadSignature != 3 {
		t.Errorf("refusals by reason %+v, want 3 unsigned, 3 untrusted, 3 bad signatures", r)
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
	if r := a.f.Agent(v).Refusals(); r.Replayed != 1 {
		t.Errorf("replays counted: %d", r.Replayed)
	}
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
	if r := a.refusals(); r.Stale != 2 {
		t.Errorf("stale requests counted: %d", r.Stale)
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
			opts := []nats.Option{nats.RootCAs(a.caFile), nats.Timeout(connectTimeout), nats.Name("intruder.demo.muster"), nats.NoReconnect()}
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
// identity) that answers gencsr with a CSR the provisioner must refuse: no
// helper signs it, no configure reaches the node, the victims' disks do not
// change.
func TestAttackNodeLiesInCSR(t *testing.T) {
	cases := []struct {
		name    string
		cn      string
		sans    []string
		wantErr string
	}{
		{"names another identity", demo.Identity(0), nil, "CN"},
		{"forbidden SAN", "mallory.demo.muster", []string{"mallory.demo.muster", "login.bank.example"}, "SAN"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			a := newArena(t, 1, nil)
			before := a.snapshot()
			const mallory = "mallory.demo.muster"
			tok, _, _ := a.issuer.Create(token.Scope{Identity: mallory}, time.Now(), time.Hour)
			csr, pub := csrWith(t, tc.cn, tc.sans)
			fn := a.fake(mallory, func(req *protocol.Request) (string, any) {
				switch req.Action {
				case protocol.ActionInventory:
					return "", protocol.Inventory{Facts: map[string]string{}, ProvisioningToken: tok}
				case protocol.ActionGenCSR:
					return "", protocol.GenCSRReply{CSR: csr, PublicKey: pub, SSLDir: "/tmp"}
				}
				return "", nil
			})
			a.holdVictims()
			ns := a.waitNode(mallory, "refusal", func(ns provisioner.NodeStatus) bool { return ns.LastError != "" })
			if !strings.Contains(ns.LastError, tc.wantErr) || ns.State != provisioner.StateFailed {
				t.Fatalf("state %s, refused for %q, want %q", ns.State, ns.LastError, tc.wantErr)
			}
			if got := strings.Join(fn.actions(), ","); got != "inventory,gencsr" {
				t.Fatalf("the lying node was asked for %s", got)
			}
			if n := a.metric("muster_provisioner_policy_rejections_total", "reason", map[string]string{"CN": "csr", "SAN": "san"}[tc.wantErr]); n != 1 {
				t.Errorf("policy rejections counted: %v", n)
			}
			a.unchanged(before)
		})
	}
}

// TestAttackBadTokenAtProvisioner: a node the broker admitted (a valid
// token for its connection) hands the provisioner a token that is expired,
// out of scope or from another issuer in its inventory. The provisioner
// verifies it again and provisions nothing.
func TestAttackBadTokenAtProvisioner(t *testing.T) {
	a := newArena(t, 1, nil)
	before := a.snapshot()
	otherSeed, _, _ := token.GenerateIssuerSeed()
	other, _ := token.NewIssuer(otherSeed)
	now := time.Now()
	mk := func(iss *token.Issuer, id string, s token.Scope, at time.Time) string {
		tok, _, err := iss.Create(s, at, time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		return tok
	}
	cases := map[string]struct {
		tok, reason string
	}{
		"expired.demo.muster":   {mk(a.issuer, "", token.Scope{Identity: "expired.demo.muster"}, now.Add(-3*time.Hour)), "expired"},
		"scope.demo.muster":     {mk(a.issuer, "", token.Scope{Identity: a.victims[0]}, now), "out_of_scope"},
		"pattern.demo.muster":   {mk(a.issuer, "", token.Scope{Pattern: "web-*.example.net"}, now), "out_of_scope"},
		"foreign.demo.muster":   {mk(other, "", token.Scope{Identity: "foreign.demo.muster"}, now), "unknown_issuer"},
		"tokenless.demo.muster": {"", "missing"},
	}
	fakes := map[string]*fakeNode{}
	for id, tc := range cases {
		tok := tc.tok
		fakes[id] = a.fake(id, func(req *protocol.Request) (string, any) {
			return "", protocol.Inventory{Facts: map[string]string{}, ProvisioningToken: tok}
		})
	}
	a.holdVictims()
	for id, tc := range cases {
		ns := a.waitNode(id, "token refusal", func(ns provisioner.NodeStatus) bool { return ns.LastError != "" })
		if ns.State != provisioner.StateFailed || ns.Stage != provisioner.StageInventory || !strings.Contains(ns.LastError, "token") {
			t.Errorf("%s: state %s at %s: %q", id, ns.State, ns.Stage, ns.LastError)
		}
		if got := strings.Join(fakes[id].actions(), ","); got != "inventory" {
			t.Errorf("%s was asked for %s", id, got)
		}
		if n := a.metric("muster_provisioner_token_refusals_total", "reason", tc.reason); n < 1 {
			t.Errorf("%s: no token refusal counted as %s", id, tc.reason)
		}
	}
	a.unchanged(before)
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
	nc, err := nats.Connect(a.f.Broker().ClientURL(), nats.RootCAs(a.caFile), nats.Timeout(connectTimeout), nats.Name(v), nats.Token(tok), nats.NoReconnect(), other)
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
		{"key with a slash", protocol.ConfigureRequest{Configuration: map[string]string{"plugin/../../x": "x"}}},
		{"key with dot dot", protocol.ConfigureRequest{Configuration: map[string]string{"plugin..x": "x"}}},
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
	t.Run("unknown body field", func(t *testing.T) {
		rep, err := a.send(nc, v, a.prov, protocol.AgentProvision, protocol.ActionConfigure,
			map[string]any{"configuration": map[string]string{"a": "b"}, "run_as_root": true}, nil)
		wantCode(t, rep, err, protocol.CodeBadRequest)
	})
	t.Run("unknown envelope field", func(t *testing.T) {
		r := request(v, a.prov, protocol.AgentProvision, protocol.ActionConfigure, configureBody(""), nil)
		data, _ := json.Marshal(r)
		data = append(data[:len(data)-1], []byte(`,"exec":"sh"}`)...)
		msg, err := nc.Request(protocol.NodeSubject(protocol.ProvisioningCollective, v), data, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		rep, err := protocol.DecodeReply(msg.Data)
		wantCode(t, rep, err, protocol.CodeBadRequest)
	})
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
		// Nothing on disk: gencsr keeps the key in memory until a
		// configure that never comes.
		err := filepath.WalkDir(f.AgentDir(id), func(p string, d fs.DirEntry, err error) error {
			if err == nil && !d.IsDir() {
				t.Errorf("%s: %s written", id, p)
			}
			return err
		})
		if err != nil {
			t.Fatal(err)
		}
	}
	if f.ProductionCount() != 0 {
		t.Fatal("a node reached production with a certificate for another key")
	}
	// The provisioner itself refused the certificate (the node's own check
	// is a second line): nothing was sent, the reason is on the status.
	for _, ns := range f.Provisioner().Nodes() {
		if ns.State != provisioner.StateFailed || ns.Stage != provisioner.StageValidate || !strings.Contains(ns.LastError, "cert_key") {
			t.Errorf("%s: state %s at %s: %q", ns.Identity, ns.State, ns.Stage, ns.LastError)
		}
	}
}

// TestAttackSignedBroadcast: a request the real provisioner's key signed
// for every node (no target) and sent on a broadcast subject configures,
// restarts and shuts down nobody.
func TestAttackSignedBroadcast(t *testing.T) {
	a := newArena(t, 2, nil)
	before := a.snapshot()
	nc := a.provisionerConn()
	for _, action := range []string{protocol.ActionConfigure, protocol.ActionShutdown, protocol.ActionRestart} {
		for _, ag := range []string{protocol.AgentRPCUtil, protocol.AgentDiscovery} {
			r := request("", a.prov, protocol.AgentProvision, action, configureBody(""), nil)
			data, _ := json.Marshal(r)
			inbox := nats.NewInbox()
			sub, err := nc.SubscribeSync(inbox)
			if err != nil {
				t.Fatal(err)
			}
			if err := nc.PublishRequest(protocol.BroadcastSubject(protocol.ProvisioningCollective, ag), inbox, data); err != nil {
				t.Fatal(err)
			}
			if m, err := sub.NextMsg(500 * time.Millisecond); err == nil {
				t.Fatalf("%s on the %s broadcast answered: %s", action, ag, m.Data)
			}
			_ = sub.Unsubscribe()
		}
	}
	// Every victim still answers as a waiting node.
	for _, v := range a.victims {
		rep, err := a.send(nc, v, a.prov, protocol.AgentRPCUtil, protocol.ActionPing, nil, nil)
		wantCode(t, rep, err, protocol.CodeOK)
	}
	a.unchanged(before)
}

// TestAttackNodeReturnsWithChangedKey: a provisioned identity comes back
// from another machine (or a reinstalled one) with another key. The
// provisioner holds it: no helper, no configure, nothing written on the
// newcomer, until an operator approves or denies it.
func TestAttackNodeReturnsWithChangedKey(t *testing.T) {
	for _, decision := range []string{"deny", "approve"} {
		t.Run(decision, func(t *testing.T) {
			a := newArena(t, 1, nil)
			v := a.victims[0]
			a.f.Provisioner().Resume()
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			if a.f.WaitProduction(ctx, 1) != 1 {
				t.Fatalf("the victim never reached production: %v", a.f.Errors())
			}
			first := a.waitNode(v, "registered key", func(ns provisioner.NodeStatus) bool { return ns.KeyFingerprint != "" })
			was := first.KeyFingerprint
			// The provisioner knows the provisioning life it configured:
			// the other machine's is another.
			if len(first.Life) != protocol.LifeLen {
				t.Fatalf("the victim's life is not recorded: %+v", first)
			}

			// The impostor: a real agent with the victim's identity, a
			// valid token for it, and a disk (so a key) of its own.
			dir := t.TempDir()
			tok, _, err := a.issuer.Create(token.Scope{Identity: v, Batch: "demo"}, time.Now(), time.Hour)
			if err != nil {
				t.Fatal(err)
			}
			pub, _ := a.prov.PublicKey()
			imp, err := agent.New(agent.Options{Identity: v, StateDir: dir, Version: "impostor",
				Provisioning: agent.ProvisioningSettings{Brokers: []string{a.f.Broker().ClientURL()}, Token: tok,
					TrustedKeys: []string{pub}, CAPEM: a.f.CA().CertificatePEM(), Enabled: true}})
			if err != nil {
				t.Fatal(err)
			}
			ictx, icancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- imp.Run(ictx) }()
			t.Cleanup(func() { icancel(); <-done })
			ns := a.waitNode(v, "hold", func(ns provisioner.NodeStatus) bool { return ns.State == provisioner.StateHeld })
			if ns.HoldReason != provisioner.HoldKeyChanged || ns.KeyFingerprint == was {
				t.Fatalf("held for %q with key %s (was %s)", ns.HoldReason, ns.KeyFingerprint, was)
			}
			// The impostor's disk is what must not change now.
			before := snapshotDir(t, dir)
			// Held means held, however often it announces itself.
			if _, err := a.f.Provisioner().Discover(ctx); err != nil {
				t.Fatal(err)
			}
			if ns, _ := a.nodeState(v); ns.State != provisioner.StateHeld {
				t.Fatalf("state %s after discovery", ns.State)
			}
			if got := snapshotDir(t, dir); !equalSnapshots(before, got) {
				t.Fatalf("a held node's disk changed: %v → %v", before, got)
			}
			if _, err := os.Stat(filepath.Join(dir, agent.ConfigFileName)); err == nil {
				t.Fatal("the held impostor has a configuration")
			}
			switch decision {
			case "deny":
				if err := a.f.Provisioner().Deny(v); err != nil {
					t.Fatal(err)
				}
				if _, err := a.f.Provisioner().Discover(ctx); err != nil {
					t.Fatal(err)
				}
				if ns, _ := a.nodeState(v); ns.State != provisioner.StateDenied {
					t.Fatalf("state %s after deny", ns.State)
				}
				if got := snapshotDir(t, dir); !equalSnapshots(before, got) {
					t.Fatalf("a denied node's disk changed")
				}
			case "approve":
				if err := a.f.Provisioner().Approve(v); err != nil {
					t.Fatal(err)
				}
				ns := a.waitNode(v, "provisioning after approval", func(ns provisioner.NodeStatus) bool {
					return ns.State == provisioner.StateProvisioned || ns.State == provisioner.StateProduction
				})
				if len(ns.Life) != protocol.LifeLen || ns.Life == first.Life {
					t.Fatalf("the approved machine's life %q (the victim's %q)", ns.Life, first.Life)
				}
				if _, err := os.Stat(filepath.Join(dir, agent.ConfigFileName)); err != nil {
					t.Fatalf("the approved node was not configured: %v", err)
				}
			}
		})
	}
}

// snapshotDir is every file under dir: path → mode and SHA-256.
func snapshotDir(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
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
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func equalSnapshots(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
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
