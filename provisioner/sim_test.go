package provisioner

import (
	"context"
	"crypto"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/syncbuf"
)

// startServer runs an embedded nats-server on a random loopback port.
func startServer(t *testing.T) string {
	t.Helper()
	s, err := server.NewServer(&server.Options{Host: "127.0.0.1", Port: -1, StoreDir: t.TempDir(), NoLog: true, NoSigs: true})
	if err != nil {
		t.Fatal(err)
	}
	s.Start()
	if !s.ReadyForConnections(10 * time.Second) {
		t.Fatal("nats-server not ready")
	}
	t.Cleanup(s.Shutdown)
	return s.ClientURL()
}

func connect(t *testing.T, url string) *nats.Conn {
	t.Helper()
	nc, err := nats.Connect(url)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	return nc
}

func newCA(t *testing.T) *ca.CA {
	t.Helper()
	ca.Silence()
	c, err := ca.Init(t.TempDir(), "Muster Test CA", 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// waitFor polls cond until it holds or the deadline passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// nodeBehaviour lets a test change how a simulated node answers: return
// drop to send nothing (the provisioner times out), or a non-ok code.
type nodeBehaviour func(action string, n int) (drop bool, code protocol.Code)

// simNode is a simulated waiting node answering the provisioning protocol.
type simNode struct {
	id     string
	caPEM  []byte
	token  string
	behave nodeBehaviour

	mu         sync.Mutex
	key        crypto.Signer
	counts     map[string]int // requests received per action
	configured int            // configure requests with a verified certificate
	restarted  int
	shutdowns  int
	badConfig  []string
	// silent nodes do not answer broadcast discovery (they announce
	// themselves instead).
	silent bool
	// clock is how far the node's clock is ahead of the real time (its
	// freshness checks and reply times use it).
	clock time.Duration
	// life is the node's provisioning-mode life ID, in its discovery
	// replies, inventory and announcements (empty: an agent that sends
	// none).
	life string
	// makeCSR, when set, makes the node's key and CSR in gencsr (a hostile
	// or unusual node); default: a key of the requested type and a CSR
	// from pki.CreateCSR.
	makeCSR func(id string) (crypto.Signer, []byte, error)
	// reuseKey makes gencsr keep the node's key once it has one, as
	// Muster's agent does.
	reuseKey bool
	// serials are the serials of the certificates configured, in order.
	serials []string
	// senders counts configure and restart requests per provisioner.
	senders map[string]map[string]int
	// subs are its subscriptions on the provisioning side.
	subs []*nats.Subscription
	// arrive, when set, makes the node go to production at its first
	// restart, as an agent does: it stops answering on the provisioning
	// side and arrive announces it there with its certificate's serial.
	arrive func(serial string)
}

// leave ends the node's provisioning-side subscriptions, as a node that
// went to production does: requests to it find no responders.
func (n *simNode) leave(t *testing.T) {
	t.Helper()
	if err := n.unsubscribe(); err != nil {
		t.Fatal(err)
	}
}

// unsubscribe ends the node's provisioning-side subscriptions (safe from
// any goroutine, its own handlers included).
func (n *simNode) unsubscribe() error {
	var errs []error
	for _, sub := range n.subs {
		errs = append(errs, sub.Unsubscribe())
	}
	return errors.Join(errs...)
}

// sendersOf returns how many requests for action each provisioner sent.
func (n *simNode) sendersOf(action string) map[string]int {
	n.mu.Lock()
	defer n.mu.Unlock()
	out := map[string]int{}
	for k, v := range n.senders[action] {
		out[k] = v
	}
	return out
}

func (n *simNode) count(action string) int {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.counts[action]
}

func (n *simNode) stats() (configured, restarted, shutdowns int) {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.configured, n.restarted, n.shutdowns
}

// simFleet is a set of simulated nodes sharing one NATS connection.
type simFleet struct {
	t     *testing.T
	nc    *nats.Conn
	caPEM []byte
	nodes map[string]*simNode
}

func newSimFleet(t *testing.T, url string, caPEM []byte) *simFleet {
	t.Helper()
	return &simFleet{t: t, nc: connect(t, url), caPEM: caPEM, nodes: map[string]*simNode{}}
}

// add starts a simulated node subscribed to its node subject and to the
// discovery broadcast.
func (f *simFleet) add(id string, behave nodeBehaviour) *simNode {
	f.t.Helper()
	n := &simNode{id: id, caPEM: f.caPEM, token: nodeToken(f.t, id), behave: behave, counts: map[string]int{}}
	for _, subj := range []string{
		protocol.NodeSubject(protocol.ProvisioningCollective, id),
		protocol.BroadcastSubject(protocol.ProvisioningCollective, protocol.AgentDiscovery),
	} {
		sub, err := f.nc.Subscribe(subj, n.handle)
		if err != nil {
			f.t.Fatal(err)
		}
		n.subs = append(n.subs, sub)
	}
	if err := f.nc.Flush(); err != nil {
		f.t.Fatal(err)
	}
	f.nodes[id] = n
	return n
}

// publishMetadata publishes a node's metadata with its life ID and no
// start.
func (f *simFleet) publishMetadata(id string) {
	f.t.Helper()
	f.publishLifeMetadata(id, nodeLife{id: f.life(id)})
}

// publishLifeMetadata publishes a node's metadata naming the provisioning
// life l (its ID and start; either may be unknown: not said). Its time is
// now, or the start when that is later (a node clock ahead).
func (f *simFleet) publishLifeMetadata(id string, l nodeLife) {
	f.t.Helper()
	now := time.Now().UTC()
	if l.started.After(now) {
		now = l.started
	}
	b, _ := json.Marshal(protocol.Metadata{Protocol: protocol.MetadataProto, Identity: id, Time: now, Started: l.started, Life: l.id, Version: "test", Facts: map[string]string{"rack": "r1"}})
	if err := f.nc.Publish(protocol.MetadataSubjectFor(id), b); err != nil {
		f.t.Fatal(err)
	}
}

// life is the life ID of the fleet's node id ("" for none, or no such
// node).
func (f *simFleet) life(id string) string {
	n := f.nodes[id]
	if n == nil {
		return ""
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.life
}

// publishStartup publishes a node's startup event, with its life ID.
func (f *simFleet) publishStartup(id string) {
	f.t.Helper()
	b, _ := json.Marshal(protocol.Event{Protocol: protocol.EventProtocol, ID: nuid.Next(), Identity: id, Component: protocol.AgentComponent, Type: protocol.EventStartup, Time: time.Now().UTC(), Life: f.life(id)})
	if err := f.nc.Publish(protocol.LifecycleSubject(protocol.EventStartup, protocol.AgentComponent, id), b); err != nil {
		f.t.Fatal(err)
	}
}

func (n *simNode) handle(m *nats.Msg) {
	req, err := protocol.DecodeRequest(m.Data)
	if err != nil {
		n.respond(m, nil, protocol.CodeBadRequest, err.Error(), nil)
		return
	}
	n.mu.Lock()
	clock := n.clock
	n.mu.Unlock()
	if err := req.CheckFresh(time.Now().Add(clock), 30*time.Second); err != nil {
		n.respond(m, req, protocol.CodeExpired, err.Error(), nil)
		return
	}
	broadcast := req.Target == ""
	if req.Agent != protocol.AgentDiscovery {
		if err := req.VerifySignature(testTrusted); err != nil {
			n.respond(m, req, protocol.CodeUnauthorized, err.Error(), nil)
			return
		}
	}
	if !broadcast && req.Target != n.id {
		n.respond(m, req, protocol.CodeBadRequest, "wrong target", nil)
		return
	}
	n.mu.Lock()
	n.counts[req.Action]++
	if req.Action == protocol.ActionConfigure || req.Action == protocol.ActionRestart {
		if n.senders == nil {
			n.senders = map[string]map[string]int{}
		}
		if n.senders[req.Action] == nil {
			n.senders[req.Action] = map[string]int{}
		}
		n.senders[req.Action][req.Sender]++
	}
	c := n.counts[req.Action]
	n.mu.Unlock()
	if n.behave != nil && !broadcast {
		drop, code := n.behave(req.Action, c)
		if drop {
			return
		}
		if code != "" && code != protocol.CodeOK {
			n.respond(m, req, code, "simulated failure", nil)
			return
		}
	}
	switch {
	case req.Agent == protocol.AgentDiscovery && req.Action == protocol.ActionPing:
		n.mu.Lock()
		silent, life := n.silent, n.life
		n.mu.Unlock()
		if silent {
			return
		}
		n.respond(m, req, protocol.CodeOK, "", protocol.PingReply{Identity: n.id, Mode: "provisioning", Time: time.Now().UTC(), Life: life})
	case req.Agent == protocol.AgentRPCUtil && req.Action == protocol.ActionInventory:
		n.mu.Lock()
		life := n.life
		n.mu.Unlock()
		n.respond(m, req, protocol.CodeOK, "", protocol.Inventory{
			Agents: []string{"rpcutil", "choria_provision"}, Facts: map[string]string{"identity": n.id},
			Classes: []string{}, Collectives: []string{"provisioning"}, MainCollective: "provisioning",
			Version: "test", DataPlugins: []string{}, ProvisioningToken: n.token, Life: life,
		})
	case req.Agent == protocol.AgentProvision && req.Action == protocol.ActionGenCSR:
		var g protocol.GenCSRRequest
		if err := protocol.DecodeStrict(req.Body, protocol.MaxMessageSize, &g); err != nil {
			n.respond(m, req, protocol.CodeBadRequest, "body", nil)
			return
		}
		n.mu.Lock()
		key := n.key
		if !n.reuseKey {
			key = nil
		}
		n.mu.Unlock()
		var csr []byte
		if key != nil {
			csr, err = pki.CreateCSR(key, n.id, pki.CSRSubject{})
		} else if n.makeCSR != nil {
			key, csr, err = n.makeCSR(n.id)
		} else if key, err = pki.GenerateKey(g.KeyType, 0); err == nil {
			csr, err = pki.CreateCSR(key, n.id, pki.CSRSubject{})
		}
		if err != nil {
			n.respond(m, req, protocol.CodeInternal, "csr", nil)
			return
		}
		pub, _ := pki.MarshalPublicKey(key.Public())
		n.mu.Lock()
		n.key = key
		n.mu.Unlock()
		n.respond(m, req, protocol.CodeOK, "", protocol.GenCSRReply{CSR: string(csr), PublicKey: string(pub), SSLDir: "/var/lib/sim/" + n.id})
	case req.Agent == protocol.AgentProvision && req.Action == protocol.ActionConfigure:
		var c protocol.ConfigureRequest
		if err := protocol.DecodeStrict(req.Body, protocol.MaxMessageSize, &c); err != nil {
			n.respond(m, req, protocol.CodeBadRequest, "body", nil)
			return
		}
		n.mu.Lock()
		key := n.key
		n.mu.Unlock()
		if key == nil {
			n.respond(m, req, protocol.CodeConflict, "no key", nil)
			return
		}
		leaf, err := pki.VerifyLeaf([]byte(c.Certificate), n.caPEM, key.Public(), n.id, time.Now())
		if err != nil {
			n.mu.Lock()
			n.badConfig = append(n.badConfig, err.Error())
			n.mu.Unlock()
			n.respond(m, req, protocol.CodeInvalidCert, "certificate", nil)
			return
		}
		n.mu.Lock()
		n.configured++
		n.serials = append(n.serials, leaf.SerialNumber.Text(16))
		n.mu.Unlock()
		n.respond(m, req, protocol.CodeOK, "", nil)
	case req.Agent == protocol.AgentProvision && req.Action == protocol.ActionRestart:
		n.mu.Lock()
		n.restarted++
		arrive, serial := n.arrive, ""
		if n.restarted == 1 && len(n.serials) > 0 {
			serial = n.serials[len(n.serials)-1]
		}
		n.mu.Unlock()
		n.respond(m, req, protocol.CodeOK, "", nil)
		if arrive != nil && serial != "" {
			_ = n.unsubscribe() // the restart's reply is out; it leaves
			arrive(serial)
		}
	case req.Agent == protocol.AgentProvision && req.Action == protocol.ActionShutdown:
		n.mu.Lock()
		n.shutdowns++
		n.mu.Unlock()
		n.respond(m, req, protocol.CodeOK, "", nil)
	default:
		n.respond(m, req, protocol.CodeUnknownAction, "unknown", nil)
	}
}

func (n *simNode) respond(m *nats.Msg, req *protocol.Request, code protocol.Code, msg string, body any) {
	if m.Reply == "" {
		return
	}
	rep, err := protocol.NewReply(req, n.id, code, msg, body)
	if err != nil {
		return
	}
	n.mu.Lock()
	rep.Time = rep.Time.Add(n.clock)
	n.mu.Unlock()
	b, err := protocol.Marshal(rep)
	if err != nil {
		return
	}
	_ = m.Respond(b)
}

// helperHook may answer a helper request instead of the default signer;
// handled false falls through to signing.
type helperHook func(req *helper.Request, call int) (rep *helper.Reply, err error, handled bool)

// testHelper is an in-process helper signing CSRs with a real CA.
type testHelper struct {
	ca   *ca.CA
	hook helperHook

	mu    sync.Mutex
	calls map[string]int
	bad   []string
}

func newTestHelper(c *ca.CA, hook helperHook) *testHelper {
	return &testHelper{ca: c, hook: hook, calls: map[string]int{}}
}

func (h *testHelper) callCount(id string) int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.calls[id]
}

// Provision implements helper.Helper.
func (h *testHelper) Provision(ctx context.Context, req *helper.Request) (*helper.Reply, error) {
	h.mu.Lock()
	h.calls[req.Identity]++
	call := h.calls[req.Identity]
	h.mu.Unlock()
	var inv protocol.Inventory
	if err := json.Unmarshal([]byte(req.Inventory), &inv); err != nil || inv.Facts["identity"] != req.Identity {
		h.mu.Lock()
		h.bad = append(h.bad, fmt.Sprintf("%s: inventory %q: %v", req.Identity, req.Inventory, err))
		h.mu.Unlock()
		return nil, errors.New("bad inventory")
	}
	var claims struct {
		Subject string `json:"sub"`
		Issuer  string `json:"iss"`
	}
	_ = json.Unmarshal(req.JWT, &claims)
	if req.RequestID == "" || req.Site != "test-site" || claims.Subject != req.Identity || claims.Issuer != testIssuer.PublicKey() ||
		inv.ProvisioningToken != "" || strings.Contains(req.Inventory, "eyJ") {
		h.mu.Lock()
		h.bad = append(h.bad, fmt.Sprintf("%s: request fields: id %q site %q jwt %s", req.Identity, req.RequestID, req.Site, req.JWT))
		h.mu.Unlock()
	}
	if h.hook != nil {
		if rep, err, ok := h.hook(req, call); ok {
			return rep, err
		}
	}
	return h.sign(req, []byte(req.CSR.CSR))
}

func (h *testHelper) sign(req *helper.Request, csr []byte) (*helper.Reply, error) {
	cert, err := h.ca.SignCSR(csr, nil)
	if err != nil {
		return nil, err
	}
	return &helper.Reply{
		Configuration: map[string]string{
			"identity":                       req.Identity,
			"plugin.choria.middleware_hosts": "prod.example.net:4222",
			"plugin.security.provider":       "file",
		},
		Certificate: string(cert),
		CA:          string(h.ca.CertificatePEM()),
		SSLDir:      req.CSR.SSLDir,
		RequestID:   req.RequestID,
	}, nil
}

// debugLogger captures everything at debug level.
func debugLogger() (*logrus.Entry, *syncbuf.Buffer) { return syncbuf.Logger(logrus.DebugLevel) }

// observed records observer callbacks.
type observed struct {
	mu     sync.Mutex
	events map[string][]string // identity -> "outcome/stage"
}

func newObserved() *observed { return &observed{events: map[string][]string{}} }

func (o *observed) NodeDone(id string, out Outcome, stage Stage, _ error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.events[id] = append(o.events[id], string(out)+"/"+string(stage))
}

// of returns the events of id so far.
func (o *observed) of(id string) []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return slices.Clone(o.events[id])
}

func (o *observed) has(id, ev string) bool {
	return slices.Contains(o.of(id), ev)
}

// testConfig is a fast configuration for tests.
func testConfig() Config {
	c := DefaultConfig()
	c.Workers = 4
	c.Interval = Duration(time.Second)
	c.NkeySeedFile = testSeedFile
	c.TokenIssuers = []string{testIssuer.PublicKey()}
	c.Site = "test-site"
	c.RPCTimeout = Duration(300 * time.Millisecond)
	c.RPCRetries = 2
	c.DeferBackoff = Duration(200 * time.Millisecond)
	c.HelperTimeout = Duration(5 * time.Second)
	c.RestartSplay = Duration(10 * time.Millisecond)
	c.Name = "muster-provisioner@test"
	return c
}

// running is a provisioner running in a goroutine.
type running struct {
	p      *Provisioner
	cancel context.CancelFunc
	done   chan struct{} // closed when Run returned
	err    error         // Run's result, set before done is closed
	logs   *syncbuf.Buffer
}

func (r *running) stop(t *testing.T) {
	t.Helper()
	r.cancel()
	select {
	case <-r.done:
		if r.err != nil {
			t.Errorf("Run: %v", r.err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return after cancel")
	}
	if strings.Contains(r.logs.String(), "eyJ") {
		t.Errorf("a provisioning token (JWT) was found in the logs")
	}
}

func startProvisioner(t *testing.T, url string, cfg Config, h helper.Helper, obs Observer, before func(*Provisioner)) *running {
	t.Helper()
	return runWith(t, Options{Config: cfg, Helper: h, Conn: connect(t, url), Observer: obs}, before)
}

// runWith builds a provisioner from opts (with a debug logger captured in
// running.logs), calls before on it, runs it until the test ends and waits
// until it is ready.
func runWith(t *testing.T, opts Options, before func(*Provisioner)) *running {
	t.Helper()
	log, buf := debugLogger()
	opts.Logger = log
	p, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	if before != nil {
		before(p)
	}
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{p: p, cancel: cancel, done: make(chan struct{}), logs: buf}
	go func() {
		r.err = p.Run(ctx)
		close(r.done)
	}()
	t.Cleanup(func() {
		cancel()
		<-r.done
	})
	select {
	case <-p.ready:
	case <-r.done:
		t.Fatalf("Run returned early: %v", r.err)
	case <-time.After(30 * time.Second):
		t.Fatal("provisioner not ready")
	}
	return r
}

func nodeState(p *Provisioner, id string) (NodeStatus, bool) {
	for _, n := range p.Nodes() {
		if n.Identity == id {
			return n, true
		}
	}
	return NodeStatus{}, false
}
