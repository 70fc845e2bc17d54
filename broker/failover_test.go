package broker

import (
	"context"
	"encoding/json"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nuid"

	"github.com/muster-io/muster/agent"
	"github.com/muster-io/muster/agent/config"
	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/provisioner"
)

// modes records the modes an agent reached.
type modes struct {
	mu   sync.Mutex
	seen []agent.Mode
}

func (m *modes) ModeChanged(_ string, md agent.Mode, _ time.Time) {
	m.mu.Lock()
	m.seen = append(m.seen, md)
	m.mu.Unlock()
}

func (m *modes) reached(md agent.Mode) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, s := range m.seen {
		if s == md {
			return true
		}
	}
	return false
}

// runAgent runs an agent until the end of the test and checks that Run
// returns once its context is cancelled.
func runAgent(t *testing.T, opts agent.Options) {
	t.Helper()
	a, err := agent.New(opts)
	if err != nil {
		t.Fatalf("agent.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("agent Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("agent did not stop")
		}
	})
}

// fastFailover are failover settings small enough for tests.
func fastFailover(o *agent.Options) {
	o.AliveInterval = 600 * time.Millisecond
	o.ReconnectWait = 50 * time.Millisecond
	o.ReconnectMaxWait = 400 * time.Millisecond
	o.MetadataInterval = 500 * time.Millisecond
}

// ping sends rpcutil ping to identity in collective from nc and reports
// whether an ok reply from that identity came back.
func ping(nc *nats.Conn, collective, identity string) bool {
	data, _ := json.Marshal(protocol.Request{
		Protocol: protocol.RequestProtocol, ID: nuid.Next(), Sender: "failover-test", Target: identity,
		Agent: protocol.AgentRPCUtil, Action: "ping", Time: time.Now().UTC(), TTL: 60,
	})
	msg, err := nc.Request(protocol.NodeSubject(collective, identity), data, time.Second)
	if err != nil {
		return false
	}
	rep, err := protocol.DecodeReply(msg.Data)
	return err == nil && rep.Sender == identity && rep.Code == protocol.CodeOK
}

// signingHelper is an in-process helper that signs every CSR with the
// broker's CA and sends the node to the given production brokers.
type signingHelper struct {
	ca    *ca.CA
	hosts string
}

func (h *signingHelper) Provision(_ context.Context, req *helper.Request) (*helper.Reply, error) {
	cert, err := h.ca.SignCSR([]byte(req.CSR.CSR), nil)
	if err != nil {
		return nil, err
	}
	return &helper.Reply{
		Configuration: map[string]string{
			config.KeyIdentity:         req.Identity,
			config.KeyMiddlewareHosts:  h.hosts,
			config.KeyRandomizeHosts:   "false",
			config.KeyAliveInterval:    "600ms",
			config.KeyReconnectWait:    "50ms",
			config.KeyReconnectMaxWait: "400ms",
		},
		Certificate: string(cert),
		CA:          string(h.ca.CertificatePEM()),
		SSLDir:      req.CSR.SSLDir,
		RequestID:   req.RequestID,
	}, nil
}

// outcomes records the provisioner's node outcomes.
type outcomes struct {
	mu   sync.Mutex
	done map[string]provisioner.Outcome
}

func (o *outcomes) NodeDone(id string, out provisioner.Outcome, _ provisioner.Stage, _ error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	if o.done == nil {
		o.done = map[string]provisioner.Outcome{}
	}
	o.done[id] = out
}

func (o *outcomes) provisioned(id string) bool {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.done[id] == provisioner.OutcomeProvisioned
}

// runProvisioner runs a provisioner dialling brokers with the cluster's
// development credentials until the end of the test.
// It returns the provisioner's connection name.
func runProvisioner(t *testing.T, b *Broker, brokers []string, h helper.Helper, obs provisioner.Observer) string {
	t.Helper()
	cfg := provisioner.DefaultConfig()
	cfg.Brokers = brokers
	cfg.TLSCA = b.CAFile()
	cfg.NkeySeedFile = b.DevPKI().ProvisionerSeed
	cfg.TokenIssuers = []string{b.DevPKI().TokenIssuerPublicKey}
	cfg.Workers = 2
	cfg.Interval = provisioner.Duration(time.Second)
	cfg.RPCTimeout = provisioner.Duration(time.Second)
	cfg.DeferBackoff = provisioner.Duration(200 * time.Millisecond)
	cfg.RestartSplay = provisioner.Duration(10 * time.Millisecond)
	cfg.Name = "muster-provisioner-" + nuid.Next()
	p, err := provisioner.New(provisioner.Options{Config: cfg, Helper: h, Observer: obs, Logger: testLog()})
	if err != nil {
		t.Fatalf("provisioner.New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("provisioner Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Errorf("provisioner did not stop")
		}
	})
	return cfg.Name
}

// TestAgentFailoverProvisioning: an agent on broker A (list [A, B], in
// order) fails over to B when A shuts down, and a provisioner connected
// only to C provisions it through the cluster into production mode.
func TestAgentFailoverProvisioning(t *testing.T) {
	brokers := startCluster(t, clusterConfigs(t, 3))
	a, b, c := brokers[0], brokers[1], brokers[2]
	const id = "failover1.example.net"
	obs := &modes{}
	opts := agent.Options{
		Identity: id,
		StateDir: t.TempDir(),
		Provisioning: agent.ProvisioningSettings{
			Brokers: []string{a.ClientURL(), b.ClientURL()}, CAFile: a.CAFile(),
			Token: nodeToken(t, a, id), TrustedKeys: []string{a.DevPKI().ProvisionerPublicKey}, Enabled: true, NoShuffle: true,
		},
		Observer: obs,
		Logger:   testLog(),
	}
	fastFailover(&opts)
	runAgent(t, opts)
	waitUntil(t, 20*time.Second, "the agent on broker A", func() bool { return connectedTo(t, a, id) })

	a.Shutdown()
	waitUntil(t, 20*time.Second, "the agent failed over to broker B", func() bool { return connectedTo(t, b, id) })

	out := &outcomes{}
	h := &signingHelper{ca: devCA(t, c), hosts: strings.Join([]string{b.ClientURL(), c.ClientURL()}, ",")}
	runProvisioner(t, c, []string{c.ClientURL()}, h, out)
	waitUntil(t, 60*time.Second, "the agent provisioned by the provisioner on C", func() bool { return out.provisioned(id) })
	waitUntil(t, 30*time.Second, "the agent in production mode", func() bool { return obs.reached(agent.ModeProduction) })

	// In production it uses its configured brokers in order: B, over mTLS,
	// and answers an admin connected to C.
	waitUntil(t, 20*time.Second, "the production agent on B", func() bool { return connectedTo(t, b, id) })
	account, user := connUser(t, b, id)
	if account != PRODUCTION || user != id {
		t.Fatalf("production connection in %s as %q", account, user)
	}
	admin := connect(t, c, adminOpt(c))
	waitUntil(t, 20*time.Second, "a production ping across the cluster", func() bool {
		return ping(admin, protocol.DefaultMainCollective, id)
	})
}

// writeProductionConfig gives identity a certificate from the broker's CA
// and a production configuration naming hosts, so the agent starts in
// production mode.
func writeProductionConfig(t *testing.T, b *Broker, stateDir, identity string, hosts []string) {
	t.Helper()
	ssl := filepath.Join(stateDir, agent.SSLDirName)
	is, err := devCA(t, b).Issue(identity, []string{identity})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(ssl, 0o700); err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := filepath.Join(ssl, agent.CertFile), filepath.Join(ssl, agent.KeyFile)
	caFile := filepath.Join(ssl, agent.CAFile)
	for f, data := range map[string][]byte{certFile: is.CertPEM, keyFile: is.KeyPEM, caFile: b.CAPEM()} {
		if err := os.WriteFile(f, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfg, err := config.FromMap(map[string]string{
		config.KeyIdentity:         identity,
		config.KeyMiddlewareHosts:  strings.Join(hosts, ","),
		config.KeySecurityProv:     "file",
		config.KeyCertificate:      certFile,
		config.KeyKey:              keyFile,
		config.KeyCA:               caFile,
		config.KeyProvision:        "false",
		config.KeyRandomizeHosts:   "false",
		config.KeyAliveInterval:    "600ms",
		config.KeyReconnectWait:    "50ms",
		config.KeyReconnectMaxWait: "400ms",
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := cfg.Save(filepath.Join(stateDir, agent.ConfigFileName)); err != nil {
		t.Fatal(err)
	}
}

// TestAgentFailoverProduction: a production agent (mutual TLS) on broker A
// fails over to B when A shuts down and keeps answering an admin on C.
func TestAgentFailoverProduction(t *testing.T) {
	brokers := startCluster(t, clusterConfigs(t, 3))
	a, b, c := brokers[0], brokers[1], brokers[2]
	const id = "prod1.example.net"
	dir := t.TempDir()
	writeProductionConfig(t, a, dir, id, []string{a.ClientURL(), b.ClientURL()})
	obs := &modes{}
	opts := agent.Options{Identity: id, StateDir: dir, Observer: obs, Logger: testLog()}
	fastFailover(&opts)
	// The library default, overridden by the configuration's 600ms.
	opts.AliveInterval = time.Minute
	runAgent(t, opts)
	waitUntil(t, 20*time.Second, "the production agent on broker A", func() bool { return connectedTo(t, a, id) })
	if account, user := connUser(t, a, id); account != PRODUCTION || user != id {
		t.Fatalf("connection in %s as %q", account, user)
	}
	admin := connect(t, c, adminOpt(c))
	waitUntil(t, 20*time.Second, "a ping across the cluster before the failover", func() bool {
		return ping(admin, protocol.DefaultMainCollective, id)
	})

	killedAt := time.Now()
	a.Shutdown()
	waitUntil(t, 20*time.Second, "the agent failed over to broker B", func() bool { return connectedTo(t, b, id) })
	t.Logf("production agent on B %s after A began shutting down", time.Since(killedAt).Round(time.Millisecond))
	if account, user := connUser(t, b, id); account != PRODUCTION || user != id {
		t.Fatalf("connection after failover in %s as %q", account, user)
	}
	waitUntil(t, 20*time.Second, "a ping across the cluster after the failover", func() bool {
		return ping(admin, protocol.DefaultMainCollective, id)
	})
	if obs.reached(agent.ModeProvisioning) {
		t.Errorf("the agent fell back to provisioning mode")
	}
}

// blackhole is a TCP proxy that can stop forwarding while keeping its
// connections open: a broker that hangs rather than dies, which only the
// alive interval's pings detect.
type blackhole struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	frozen bool
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newBlackhole(t *testing.T, target string) *blackhole {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &blackhole{ln: ln, target: target}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(p.close)
	return p
}

func (p *blackhole) accept() {
	defer p.wg.Done()
	for {
		in, err := p.ln.Accept()
		if err != nil {
			return
		}
		out, err := net.Dial("tcp", p.target)
		if err != nil {
			in.Close()
			continue
		}
		p.mu.Lock()
		p.conns = append(p.conns, in, out)
		p.mu.Unlock()
		p.wg.Add(2)
		go p.pipe(in, out)
		go p.pipe(out, in)
	}
}

// pipe copies src to dst until either closes; once frozen it reads and
// drops everything.
func (p *blackhole) pipe(dst, src net.Conn) {
	defer p.wg.Done()
	buf := make([]byte, 32*1024)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			p.mu.Lock()
			frozen := p.frozen
			p.mu.Unlock()
			if !frozen {
				if _, werr := dst.Write(buf[:n]); werr != nil {
					return
				}
			}
		}
		if err != nil {
			return
		}
	}
}

func (p *blackhole) freeze() {
	p.mu.Lock()
	p.frozen = true
	p.mu.Unlock()
}

func (p *blackhole) close() {
	p.ln.Close()
	p.mu.Lock()
	for _, c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	p.wg.Wait()
}

// TestAgentDetectsHungBroker: the broker behind the first URL stops
// answering without closing the connection; the alive interval's pings
// give it up and the agent fails over to the second broker. The time it
// took is logged, not asserted.
func TestAgentDetectsHungBroker(t *testing.T) {
	brokers := startCluster(t, clusterConfigs(t, 2))
	a, b := brokers[0], brokers[1]
	proxy := newBlackhole(t, strings.TrimPrefix(a.ClientURL(), "tls://"))
	const id = "hung1.example.net"
	opts := agent.Options{
		Identity: id,
		StateDir: t.TempDir(),
		Provisioning: agent.ProvisioningSettings{
			Brokers: []string{"tls://" + proxy.ln.Addr().String(), b.ClientURL()}, CAFile: a.CAFile(),
			Token: nodeToken(t, a, id), TrustedKeys: []string{a.DevPKI().ProvisionerPublicKey}, Enabled: true, NoShuffle: true,
		},
		Logger: testLog(),
	}
	obs := &modes{}
	opts.Observer = obs
	fastFailover(&opts)
	runAgent(t, opts)
	// The observer is told once the connection handshake has completed,
	// so what follows measures the alive interval, not the connect timeout.
	waitUntil(t, 20*time.Second, "the agent on broker A through the proxy", func() bool {
		return obs.reached(agent.ModeProvisioning) && connectedTo(t, a, id)
	})
	if connectedTo(t, b, id) {
		t.Fatal("the agent is on B before the freeze")
	}
	frozenAt := time.Now()
	proxy.freeze()
	waitUntil(t, 30*time.Second, "the agent failed over to broker B", func() bool { return connectedTo(t, b, id) })
	t.Logf("hung broker given up and agent on B after %s (alive interval %s)", time.Since(frozenAt).Round(time.Millisecond), opts.AliveInterval)
}

// TestProvisionerReconnects: a provisioner given [A, B, C] moves to another
// broker when its broker dies and keeps provisioning.
func TestProvisionerReconnects(t *testing.T) {
	brokers := startCluster(t, clusterConfigs(t, 3))
	var urls []string
	for _, br := range brokers {
		urls = append(urls, br.ClientURL())
	}
	out := &outcomes{}
	h := &signingHelper{ca: devCA(t, brokers[0]), hosts: strings.Join(urls, ",")}
	name := runProvisioner(t, brokers[0], urls, h, out)
	// A first node proves the provisioner is fully up (its Run fails when
	// its broker dies while it is still subscribing; see docs/ha.md).
	early := agent.Options{
		Identity: "early1.example.net",
		StateDir: t.TempDir(),
		Provisioning: agent.ProvisioningSettings{
			Brokers: urls, CAFile: brokers[0].CAFile(), Enabled: true,
			Token: nodeToken(t, brokers[0], "early1.example.net"), TrustedKeys: []string{brokers[0].DevPKI().ProvisionerPublicKey},
		},
		Logger: testLog(),
	}
	fastFailover(&early)
	runAgent(t, early)
	waitUntil(t, 60*time.Second, "the first node provisioned", func() bool { return out.provisioned(early.Identity) })
	var on *Broker
	waitUntil(t, 20*time.Second, "the provisioner connected", func() bool {
		for _, br := range brokers {
			if connectedTo(t, br, name) {
				on = br
				return true
			}
		}
		return false
	})
	killedAt := time.Now()
	on.Shutdown()
	var rest []*Broker
	for _, br := range brokers {
		if br != on {
			rest = append(rest, br)
		}
	}
	waitUntil(t, 20*time.Second, "the provisioner on another broker", func() bool {
		return connectedTo(t, rest[0], name) || connectedTo(t, rest[1], name)
	})
	t.Logf("provisioner on another broker %s after its broker began shutting down", time.Since(killedAt).Round(time.Millisecond))

	// A node arriving on each surviving broker is provisioned.
	for i, br := range rest {
		id := []string{"late1.example.net", "late2.example.net"}[i]
		opts := agent.Options{
			Identity: id,
			StateDir: t.TempDir(),
			Provisioning: agent.ProvisioningSettings{
				Brokers: []string{br.ClientURL()}, CAFile: br.CAFile(), Enabled: true,
				Token: nodeToken(t, br, id), TrustedKeys: []string{br.DevPKI().ProvisionerPublicKey},
			},
			Logger: testLog(),
		}
		fastFailover(&opts)
		runAgent(t, opts)
		waitUntil(t, 60*time.Second, id+" provisioned after the provisioner's broker died", func() bool { return out.provisioned(id) })
	}
}
