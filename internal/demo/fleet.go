// Package demo assembles a whole Muster deployment in one process: a CA, the
// broker, the provisioner with a helper, and N agents, each with its own
// state directory and connection. `muster demo` runs it for people; the
// end-to-end tests run it with exec'd helpers and inspect every part.
package demo

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/agent"
	"github.com/muster-io/muster/broker"
	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/helper/cfsslhelper"
	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/fsutil"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/token"
	"github.com/muster-io/muster/provisioner"
)

// AdminCN is the certificate name the fleet's operator connection uses on the
// production side.
const AdminCN = "muster-demo-admin"

// Options configure a Fleet.
type Options struct {
	// Nodes is the number of agents.
	Nodes int
	// Dir holds every file of the fleet; a temporary directory when empty
	// (removed by Close).
	Dir string
	// HelperCommand runs an exec'd helper instead of the built-in one. It
	// gets MUSTER_CA_DIR (a directory with ca.pem and ca-key.pem),
	// MUSTER_BROKER (the production broker host:port), MUSTER_BIN (this
	// program) and, when a muster-helper binary sits beside MusterBin,
	// MUSTER_HELPER_BIN in its environment.
	HelperCommand string
	// HelperPersistent runs HelperCommand as one persistent helper process
	// (request lines in, reply lines out) instead of once per node.
	HelperPersistent bool
	// MusterBin is the muster binary exec'd helpers may call (MUSTER_BIN);
	// default: this program.
	MusterBin string
	// HelperTimeout bounds each helper run (default 10s).
	HelperTimeout time.Duration
	// CACert and CAKey use an existing CA instead of a throwaway one.
	CACert, CAKey string
	// Workers is the provisioner's worker count (default 8).
	Workers int
	// KeyType is the node key type (ecdsa-p256 or rsa).
	KeyType string
	// Facts returns the facts of node i; nil gives every node a country
	// and a rack.
	Facts func(i int) map[string]string
	// DeferBackoff is how long a deferred or failed node waits before it is
	// taken again (default 2s, short for a demo).
	DeferBackoff time.Duration
	// Logger receives the components' logs (default: discarded).
	Logger *logrus.Logger
	// OnProvisioned, when set, is called once per node, the first time
	// it reaches production, before ProductionCount counts it.
	OnProvisioned func(identity string, at time.Time)
	// OnNodeDone, when set, receives every provisioner outcome.
	OnNodeDone func(identity string, outcome provisioner.Outcome, stage provisioner.Stage, err error)

	// InProcess connects the agents and the provisioner to the broker with
	// nats.InProcessServer instead of TCP. The provisioning side runs
	// without TLS; production connections run mutual TLS over the pipe, so
	// the broker verifies every node's certificate.
	InProcess bool
	// WrapHelper, when set, wraps the fleet's helper (for timing or fault
	// injection).
	WrapHelper func(helper.Helper) helper.Helper
	// RestartSplay is the provisioner's restart_splay (default 200ms).
	RestartSplay time.Duration
	// QueueSize is the provisioner's queue_size (default: the
	// provisioner's default).
	QueueSize int
	// MetadataInterval is the agents' mean metadata interval (default 5s).
	MetadataInterval time.Duration
	// StartPaused starts the provisioner paused; Provisioner().Resume()
	// lets it work.
	StartPaused bool
	// AgentDelay, when set, delays the start of agent i by the returned
	// duration after Start (agents are launched in order, so delays should
	// not decrease). Nil starts every agent at once.
	AgentDelay func(i int) time.Duration
	// OnAgentStart, when set, is called just before each agent runs.
	OnAgentStart func(identity string, at time.Time)
	// OnModeChanged, when set, receives every mode an agent connects in.
	// With AgentBin it receives production connections only.
	OnModeChanged func(identity string, m agent.Mode, at time.Time)
	// AgentBin, when set, runs every agent as its own muster-agent process
	// (this binary) over TCP + TLS instead of in this process; they
	// restart by re-executing themselves. Not with InProcess.
	AgentBin string
	// FleetHost, when set, is the command line of a fleet host (`muster
	// bench fleet-host`; the program first, then its arguments): every
	// agent then runs in that one other process over TCP + TLS instead of
	// in this process, and this process holds only the provisioning side.
	// FleetHostEnv is added to its environment. Not with InProcess or
	// AgentBin.
	FleetHost    []string
	FleetHostEnv []string
	// FileRegistry keeps the provisioner's identity registry in files
	// under Dir (its state_dir, as a deployment has it) instead of in
	// memory.
	FileRegistry bool
	// KnownNodes is how many identities (other than the fleet's) the file
	// registry holds before the provisioner starts: a fleet that already
	// exists. Written by Prepare; needs FileRegistry.
	KnownNodes int
	// HA is the provisioners' ha.mode: "" or single, claims, or leader.
	// In claims and leader mode they share node state, claims and the
	// identity registry through the broker's JetStream (one broker:
	// replicas 1), as a deployment of several provisioners does.
	HA string
	// Provisioners is how many provisioners run (default 1; more than one
	// needs HA claims or leader). Provisioner i is named
	// demo-provisioner-i and has Workers workers of its own.
	Provisioners int
}

// Fleet is a running demo deployment.
type Fleet struct {
	opts     Options
	dir      string
	tmp      bool
	log      *logrus.Logger
	ca       *ca.CA
	caDir    string
	broker   *broker.Broker
	bcfg     broker.Config
	brokerUp bool
	prepared bool
	specs    []procSpec // process mode: each agent's command line and environment
	provs    []*provisioner.Provisioner
	agents   []*agent.Agent
	ids      []string
	tokens   map[string]string // identity → its provisioning token (in-process agents)
	started  time.Time

	mu         sync.Mutex
	production map[string]time.Time
	outcomes   map[string]provisioner.Outcome
	errs       map[string]error
	prodCh     chan struct{}

	cancel      context.CancelFunc
	provConns   []*nats.Conn
	watchConn   *nats.Conn
	procs       []*agentProc
	host        *fleetHost
	stopping    bool
	closeHelper func() error
	wg          sync.WaitGroup
	runErr      []error
	closed      bool
}

// MaxProvisioners bounds Options.Provisioners.
const MaxProvisioners = 16

// Identity returns the identity of node i.
func Identity(i int) string { return fmt.Sprintf("node%05d.demo.muster", i) }

func defaultFacts(i int) map[string]string {
	// No "mt": the example helpers send Maltese nodes to a broker that
	// does not exist on this machine.
	countries := []string{"de", "us", "jp", "fr"}
	return map[string]string{
		"country": countries[i%len(countries)],
		"rack":    "r" + strconv.Itoa(i/40),
		"demo":    "true",
	}
}

// New prepares a fleet: CA, broker TLS material, provisioner credential,
// helper and agents. Nothing runs until Start.
func New(opts Options) (*Fleet, error) {
	if opts.Nodes < 0 {
		return nil, fmt.Errorf("nodes %d: must not be negative", opts.Nodes)
	}
	if (opts.CACert == "") != (opts.CAKey == "") {
		return nil, errors.New("--ca-cert and --ca-key go together")
	}
	if opts.Workers == 0 {
		opts.Workers = 8
	}
	if opts.DeferBackoff == 0 {
		opts.DeferBackoff = 2 * time.Second
	}
	if opts.HelperTimeout == 0 {
		opts.HelperTimeout = 10 * time.Second
	}
	if opts.Facts == nil {
		opts.Facts = defaultFacts
	}
	if opts.RestartSplay == 0 {
		opts.RestartSplay = 200 * time.Millisecond
	}
	if opts.MetadataInterval == 0 {
		opts.MetadataInterval = 5 * time.Second
	}
	if opts.Provisioners == 0 {
		opts.Provisioners = 1
	}
	switch opts.HA {
	case "", provisioner.HASingle:
		if opts.Provisioners != 1 {
			return nil, fmt.Errorf("%d provisioners: more than one needs ha mode claims or leader", opts.Provisioners)
		}
	case provisioner.HAClaims, provisioner.HALeader:
		if opts.Provisioners < 1 || opts.Provisioners > MaxProvisioners {
			return nil, fmt.Errorf("%d provisioners: must be 1..%d", opts.Provisioners, MaxProvisioners)
		}
		if opts.FileRegistry {
			return nil, fmt.Errorf("ha mode %s keeps the identity registry in JetStream, not in files", opts.HA)
		}
	default:
		return nil, fmt.Errorf("ha mode %q: must be single, claims or leader", opts.HA)
	}
	if len(opts.FleetHost) > 0 && (opts.InProcess || opts.AgentBin != "") {
		return nil, errors.New("a fleet host runs the agents over TCP in one process: FleetHost excludes InProcess and AgentBin")
	}
	if err := checkFileLimit(opts); err != nil {
		return nil, err
	}
	f := &Fleet{
		opts:       opts,
		log:        opts.Logger,
		production: map[string]time.Time{},
		outcomes:   map[string]provisioner.Outcome{},
		errs:       map[string]error{},
		prodCh:     make(chan struct{}, 1),
	}
	if f.log == nil {
		f.log = logrus.New()
		f.log.SetOutput(nopWriter{})
	}
	f.dir = opts.Dir
	if f.dir == "" {
		d, err := os.MkdirTemp("", "muster-demo-")
		if err != nil {
			return nil, err
		}
		f.dir, f.tmp = d, true
	}
	if err := f.prepare(); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

type nopWriter struct{}

func (nopWriter) Write(p []byte) (int, error) { return len(p), nil }

func (f *Fleet) prepare() error {
	var err error
	f.caDir = filepath.Join(f.dir, "ca")
	if f.opts.CACert != "" {
		f.ca, err = ca.Load(f.opts.CACert, f.opts.CAKey, 0)
		if err != nil {
			return err
		}
		// exec'd helpers find the CA in MUSTER_CA_DIR.
		if err := os.MkdirAll(f.caDir, 0o700); err != nil {
			return err
		}
		for src, dst := range map[string]string{f.opts.CACert: ca.CertFile, f.opts.CAKey: ca.KeyFile} {
			b, err := os.ReadFile(src)
			if err != nil {
				return err
			}
			if err := fsutil.WriteFileAtomic(filepath.Join(f.caDir, dst), b, 0o600); err != nil {
				return err
			}
		}
	} else {
		f.ca, err = ca.Init(f.caDir, "Muster demo CA", 0)
		if err != nil {
			return err
		}
	}

	pkiDir := filepath.Join(f.dir, "pki")
	srv, err := f.ca.Issue("localhost", []string{"localhost", "127.0.0.1", "::1"})
	if err != nil {
		return err
	}
	srvCert, srvKey, err := f.ca.WriteIssued(pkiDir, "broker", srv)
	if err != nil {
		return err
	}
	adm, err := f.ca.Issue(AdminCN, []string{AdminCN})
	if err != nil {
		return err
	}
	if _, _, err := f.ca.WriteIssued(pkiDir, "admin", adm); err != nil {
		return err
	}
	caFile := filepath.Join(pkiDir, "ca.pem")
	if err := fsutil.WriteFileAtomic(caFile, f.ca.CertificatePEM(), 0o644); err != nil {
		return err
	}
	nk, err := nkeys.CreateUser()
	if err != nil {
		return err
	}
	seed, err := nk.Seed()
	if err != nil {
		return err
	}
	pub, err := nk.PublicKey()
	if err != nil {
		return err
	}
	seedFile := filepath.Join(pkiDir, "provisioner.nk")
	if err := fsutil.WriteFileAtomic(seedFile, seed, 0o600); err != nil {
		return err
	}

	issuerSeed, issuerPub, err := token.GenerateIssuerSeed()
	if err != nil {
		return err
	}
	if err := fsutil.WriteFileAtomic(filepath.Join(pkiDir, broker.TokenIssuerSeedFile), issuerSeed, 0o600); err != nil {
		return err
	}

	bcfg := broker.DefaultConfig()
	bcfg.TokenIssuers = []string{issuerPub}
	bcfg.Listen = "127.0.0.1:0"
	bcfg.StoreDir = filepath.Join(f.dir, "broker")
	bcfg.TLS.Cert, bcfg.TLS.Key, bcfg.TLS.CA = srvCert, srvKey, caFile
	bcfg.Provisioners = []string{pub}
	bcfg.Admins = []string{AdminCN}
	f.bcfg = bcfg
	f.broker, err = broker.New(bcfg, f.log.WithField("component", "broker"))
	if err != nil {
		return err
	}
	return nil
}

// StartBroker starts only the broker, so a caller can watch it before the
// fleet runs. Start calls it when needed.
func (f *Fleet) StartBroker() error {
	if f.brokerUp {
		return nil
	}
	if err := f.broker.Start(); err != nil {
		return fmt.Errorf("start broker: %w", err)
	}
	f.brokerUp = true
	return nil
}

// RestartBroker stops the broker and starts a new one on the same address
// with the same configuration, as an upgrade does: every connection drops,
// the broker forgets who was connected, and the fleet and the provisioner
// connect again. TCP fleets only: in-process connections belong to the
// server that stopped.
func (f *Fleet) RestartBroker() error {
	if f.opts.InProcess {
		return errors.New("restart broker: in-process connections cannot reach a new server")
	}
	if !f.brokerUp {
		return errors.New("restart broker: not started")
	}
	u, err := url.Parse(f.broker.ClientURL())
	if err != nil {
		return fmt.Errorf("restart broker: %w", err)
	}
	f.broker.Shutdown()
	cfg := f.bcfg
	cfg.Listen = u.Host
	b, err := broker.New(cfg, f.log.WithField("component", "broker"))
	if err != nil {
		return fmt.Errorf("restart broker: %w", err)
	}
	if err := b.Start(); err != nil {
		return fmt.Errorf("restart broker: %w", err)
	}
	f.broker = b
	return nil
}

// Prepare starts the broker and builds the provisioner and every agent
// (in-process agents, or each agent process's state directory, facts file,
// token and command line), so that Start only launches them: what a
// benchmark measures from Start on is provisioning, not setting up the
// simulated machines. Start calls it when needed.
func (f *Fleet) Prepare() error {
	if f.prepared {
		return nil
	}
	if err := f.StartBroker(); err != nil {
		return err
	}
	url := f.broker.ClientURL()
	hostPort := url[len("tls://"):]
	agentBrokers := []string{url}
	if f.opts.InProcess {
		// In-process: no tls:// URL for the provisioning side, and a
		// nats:// production broker (the address is not dialled, the
		// connection is in-process; production still runs mutual TLS
		// over the pipe).
		agentBrokers = nil
		hostPort = "nats://" + hostPort
	}

	issuer, provKey, err := f.trust()
	if err != nil {
		return err
	}
	h, err := f.helper(hostPort)
	if err != nil {
		return err
	}
	pcfg := provisioner.DefaultConfig()
	pcfg.Workers = f.opts.Workers
	pcfg.Brokers = []string{url}
	pcfg.TLSCA = filepath.Join(f.dir, "pki", "ca.pem")
	// Every helper the demo runs signs with the fleet's CA: make it the
	// trust anchor of the provisioner's certificate check.
	pcfg.Policy.CAFile = filepath.Join(f.dir, "pki", "ca.pem")
	pcfg.NkeySeedFile = filepath.Join(f.dir, "pki", "provisioner.nk")
	pcfg.TokenIssuers = []string{issuer.PublicKey()}
	pcfg.Site = "demo"
	pcfg.HelperTimeout = provisioner.Duration(f.opts.HelperTimeout)
	pcfg.DeferBackoff = provisioner.Duration(f.opts.DeferBackoff)
	pcfg.Interval = provisioner.Duration(10 * time.Second)
	pcfg.RestartSplay = provisioner.Duration(f.opts.RestartSplay)
	if f.opts.FileRegistry {
		pcfg.StateDir = filepath.Join(f.dir, "provisioner")
		if err := seedRegistry(pcfg.StateDir, f.opts.KnownNodes); err != nil {
			return err
		}
	}
	if f.opts.KeyType != "" {
		pcfg.KeyType = f.opts.KeyType
	}
	if f.opts.QueueSize > 0 {
		pcfg.QueueSize = f.opts.QueueSize
	}
	if f.opts.WrapHelper != nil {
		h = f.opts.WrapHelper(h)
	}
	if ha := f.opts.HA; ha != "" && ha != provisioner.HASingle {
		pcfg.HA.Mode = ha
		pcfg.HA.Replicas = 1
	}
	for i := 0; i < f.opts.Provisioners; i++ {
		cfg := pcfg
		if f.opts.Provisioners > 1 || f.opts.HA != "" {
			cfg.Name = fmt.Sprintf("demo-provisioner-%d", i)
		}
		p, err := f.newProvisioner(cfg, h, provKey)
		if err != nil {
			return err
		}
		f.provs = append(f.provs, p)
	}
	for i := 0; i < f.opts.Nodes; i++ {
		f.ids = append(f.ids, Identity(i))
	}
	if f.opts.AgentBin != "" || len(f.opts.FleetHost) > 0 {
		prepare := f.prepareProcesses
		if f.opts.AgentBin == "" {
			prepare = f.prepareHost
		}
		if err := prepare(url, issuer, provKey); err != nil {
			return err
		}
		f.prepared = true
		return nil
	}
	var inProcess nats.InProcessConnProvider
	if f.opts.InProcess {
		inProcess = f.broker.Server()
	}
	now := time.Now()
	for i, id := range f.ids {
		tok, err := nodeToken(issuer, id, now)
		if err != nil {
			return err
		}
		a, err := newSimAgent(simAgent{
			Identity: id, StateDir: f.AgentDir(id), Token: tok, Facts: f.opts.Facts(i),
		}, simTrust{brokers: agentBrokers, provKey: provKey, caPEM: f.ca.CertificatePEM()},
			f.opts.MetadataInterval, f.log, observer{f}, inProcess)
		if err != nil {
			return err
		}
		f.agents = append(f.agents, a)
		if f.tokens == nil {
			f.tokens = map[string]string{}
		}
		f.tokens[id] = tok
	}
	f.prepared = true
	return nil
}

// nodeToken is the provisioning token the fleet gives node id: scoped to
// it, valid for a day from now.
func nodeToken(issuer *token.Issuer, id string, now time.Time) (string, error) {
	tok, _, err := issuer.Create(token.Scope{Identity: id, Batch: "demo"}, now, 24*time.Hour)
	if err != nil {
		return "", fmt.Errorf("token for %s: %w", id, err)
	}
	return tok, nil
}

// simTrust is what every simulated agent of a fleet is given: its
// provisioning brokers (none in-process), the provisioner key it trusts
// and the CA it verifies brokers with.
type simTrust struct {
	brokers []string
	provKey string
	caPEM   []byte
}

// newSimAgent builds one simulated agent, in this process or in a fleet
// host, as every fleet runs them: the real agent, provisioning enabled.
func newSimAgent(sa simAgent, tr simTrust, metadata time.Duration, log *logrus.Logger, obs agent.Observer, inProcess nats.InProcessConnProvider) (*agent.Agent, error) {
	a, err := agent.New(agent.Options{
		Identity: sa.Identity,
		StateDir: sa.StateDir,
		Provisioning: agent.ProvisioningSettings{
			Brokers:     tr.brokers,
			Token:       sa.Token,
			TrustedKeys: []string{tr.provKey},
			CAPEM:       tr.caPEM,
			Enabled:     true,
		},
		Facts:            sa.Facts,
		Version:          "demo",
		Logger:           log.WithFields(logrus.Fields{"component": "agent", "identity": sa.Identity}),
		MetadataInterval: metadata,
		Observer:         obs,
		InProcess:        inProcess,
	})
	if err != nil {
		return nil, fmt.Errorf("agent %s: %w", sa.Identity, err)
	}
	return a, nil
}

// newProvisioner builds one of the fleet's provisioners, with its own
// in-process connection when the fleet runs in-process.
func (f *Fleet) newProvisioner(cfg provisioner.Config, h helper.Helper, provKey string) (*provisioner.Provisioner, error) {
	var conn *nats.Conn
	if f.opts.InProcess {
		seed, err := os.ReadFile(cfg.NkeySeedFile)
		if err != nil {
			return nil, fmt.Errorf("provisioner nkey: %w", err)
		}
		kp, err := nkeys.FromSeed(seed)
		if err != nil {
			return nil, fmt.Errorf("provisioner nkey: %w", err)
		}
		nkeyOpt := nats.Nkey(provKey, func(nonce []byte) ([]byte, error) { return protocol.SignNonce(kp, nonce) })
		conn, err = nats.Connect("", nats.InProcessServer(f.broker.Server()), nkeyOpt,
			nats.Name(cfg.Name), nats.MaxReconnects(-1))
		if err != nil {
			return nil, fmt.Errorf("provisioner in-process connection: %w", err)
		}
		f.provConns = append(f.provConns, conn)
	}
	p, err := provisioner.New(provisioner.Options{
		Config:   cfg,
		Helper:   h,
		Conn:     conn,
		Logger:   f.log.WithFields(logrus.Fields{"component": "provisioner", "provisioner": cfg.Name}),
		Observer: observer{f},
	})
	if err != nil {
		return nil, fmt.Errorf("provisioner %s: %w", cfg.Name, err)
	}
	if f.opts.StartPaused {
		p.Pause()
	}
	return p, nil
}

// Start launches the provisioner and every agent (preparing the fleet
// first when Prepare was not called).
func (f *Fleet) Start(ctx context.Context) error {
	if err := f.Prepare(); err != nil {
		return err
	}
	ctx, f.cancel = context.WithCancel(ctx)
	for _, p := range f.provs {
		if err := f.startProvisioner(ctx, p); err != nil {
			return err
		}
	}
	if f.opts.AgentBin != "" {
		return f.startProcessFleet(ctx)
	}
	f.started = time.Now()
	if f.host != nil {
		return f.startHost()
	}
	if f.opts.AgentDelay == nil {
		for i := range f.agents {
			f.runAgent(ctx, i)
		}
		return nil
	}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		t := time.NewTimer(0)
		defer t.Stop()
		for i := range f.agents {
			if wait := time.Until(f.started.Add(f.opts.AgentDelay(i))); wait > 0 {
				t.Reset(wait)
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
			f.runAgent(ctx, i)
		}
	}()
	return nil
}

// processStarters is how many agent processes a storm starts at a time.
const processStarters = 4

// startProcessFleet starts the provisioner and one muster-agent process per
// node (AgentDelay spaces them out as for in-process agents).
func (f *Fleet) startProcessFleet(ctx context.Context) error {
	f.started = time.Now()
	if f.opts.AgentDelay == nil {
		// fork+exec takes a while (tens of ms on a loaded VM): a few
		// starters in parallel so a storm arrives as one.
		var (
			next    atomic.Int64
			wg      sync.WaitGroup
			errOnce sync.Once
			first   error
		)
		for w := 0; w < processStarters; w++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i := int(next.Add(1) - 1); i < len(f.ids); i = int(next.Add(1) - 1) {
					if err := f.startProcess(i); err != nil {
						errOnce.Do(func() { first = err })
						return
					}
				}
			}()
		}
		wg.Wait()
		return first
	}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		t := time.NewTimer(0)
		defer t.Stop()
		for i := range f.ids {
			if wait := time.Until(f.started.Add(f.opts.AgentDelay(i))); wait > 0 {
				t.Reset(wait)
				select {
				case <-ctx.Done():
					return
				case <-t.C:
				}
			}
			if err := f.startProcess(i); err != nil {
				f.mu.Lock()
				f.runErr = append(f.runErr, err)
				f.mu.Unlock()
				return
			}
		}
	}()
	return nil
}

// runAgent runs agent i in its own goroutine.
func (f *Fleet) runAgent(ctx context.Context, i int) {
	a := f.agents[i]
	if f.opts.OnAgentStart != nil {
		f.opts.OnAgentStart(f.ids[i], time.Now())
	}
	f.goRun(f.ids[i], func() error { return a.Run(ctx) })
}

// startProvisioner runs the provisioner and waits until it is ready, so
// that no agent announces itself before the provisioner listens (an agent
// announces again later, but a test's fake node may announce only once).
func (f *Fleet) startProvisioner(ctx context.Context, p *provisioner.Provisioner) error {
	done := make(chan struct{})
	var runErr error
	f.goRun("provisioner", func() error {
		defer close(done)
		runErr = p.Run(ctx)
		return runErr
	})
	select {
	case <-p.Ready():
		return nil
	case <-done:
		return fmt.Errorf("provisioner: %w", runErr)
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *Fleet) goRun(name string, fn func() error) {
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		if err := fn(); err != nil && !errors.Is(err, context.Canceled) {
			f.mu.Lock()
			f.runErr = append(f.runErr, fmt.Errorf("%s: %w", name, err))
			f.mu.Unlock()
		}
	}()
}

func (f *Fleet) helper(brokerHostPort string) (helper.Helper, error) {
	if f.opts.HelperCommand != "" {
		self := f.opts.MusterBin
		if self == "" {
			var err error
			if self, err = os.Executable(); err != nil {
				return nil, err
			}
		}
		env := []string{
			"MUSTER_CA_DIR=" + f.caDir,
			"MUSTER_BROKER=" + brokerHostPort,
			"MUSTER_BIN=" + self,
		}
		// muster-helper beside muster (make build puts both in bin/):
		// the example helpers sign with "muster-helper sign" when they
		// have it, a few milliseconds instead of a muster start.
		if fast := filepath.Join(filepath.Dir(self), "muster-helper"); isExecutable(fast) {
			env = append(env, "MUSTER_HELPER_BIN="+fast)
		}
		eo := helper.ExecOptions{
			Command: f.opts.HelperCommand,
			Timeout: f.opts.HelperTimeout,
			Env:     env,
		}
		if f.opts.HelperPersistent {
			p, err := helper.NewPersistent(helper.PersistentOptions{
				Command: eo.Command, Timeout: eo.Timeout, Env: eo.Env,
				Logger: f.log.WithField("component", "helper"),
			})
			if err != nil {
				return nil, err
			}
			f.closeHelper = p.Close
			return p, nil
		}
		return helper.NewExec(eo)
	}
	cfg := &cfsslhelper.Config{MiddlewareHosts: brokerHostPort}
	return cfsslhelper.NewWithCA(f.ca, cfg)
}

// isExecutable reports whether path is an executable regular file.
func isExecutable(path string) bool {
	st, err := os.Stat(path)
	return err == nil && st.Mode().IsRegular() && st.Mode().Perm()&0o111 != 0
}

type observer struct{ f *Fleet }

func (o observer) ModeChanged(identity string, m agent.Mode, at time.Time) {
	if o.f.opts.OnModeChanged != nil {
		o.f.opts.OnModeChanged(identity, m, at)
	}
	if m != agent.ModeProduction {
		return
	}
	o.f.mu.Lock()
	_, seen := o.f.production[identity]
	o.f.mu.Unlock()
	if seen {
		return
	}
	// The callback runs before the node is counted, so that whoever
	// WaitProduction releases finds it already called for every node
	// (the demo's progress line ends at n/n). An agent's mode changes
	// one at a time, so the node cannot be counted twice meanwhile.
	if o.f.opts.OnProvisioned != nil {
		o.f.opts.OnProvisioned(identity, at)
	}
	o.f.mu.Lock()
	o.f.production[identity] = at
	o.f.mu.Unlock()
	select {
	case o.f.prodCh <- struct{}{}:
	default:
	}
}

func (o observer) NodeDone(identity string, outcome provisioner.Outcome, stage provisioner.Stage, err error) {
	o.f.mu.Lock()
	o.f.outcomes[identity] = outcome
	if err != nil {
		o.f.errs[identity] = err
	} else {
		delete(o.f.errs, identity)
	}
	o.f.mu.Unlock()
	if o.f.opts.OnNodeDone != nil {
		o.f.opts.OnNodeDone(identity, outcome, stage, err)
	}
}

// ProductionCount is how many agents have reached production mode.
func (f *Fleet) ProductionCount() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return len(f.production)
}

// WaitProduction blocks until n agents reached production, ctx ends, or
// the fleet failed. It returns the number reached.
func (f *Fleet) WaitProduction(ctx context.Context, n int) int {
	for {
		if c := f.ProductionCount(); c >= n {
			return c
		}
		select {
		case <-ctx.Done():
			return f.ProductionCount()
		case <-f.prodCh:
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// Identities returns the agents' identities in order.
func (f *Fleet) Identities() []string { return append([]string(nil), f.ids...) }

// Agent returns the in-process agent of identity, nil for process fleets
// and unknown identities.
func (f *Fleet) Agent(identity string) *agent.Agent {
	for i, id := range f.ids {
		if id == identity && i < len(f.agents) {
			return f.agents[i]
		}
	}
	return nil
}

// Token returns the provisioning token an in-process agent was given ("" for
// process fleets), for tests that look for it where it must not be.
func (f *Fleet) Token(identity string) string { return f.tokens[identity] }

// IssueToken makes a provisioning token of the given scope with the
// fleet's issuer, valid for a day.
func (f *Fleet) IssueToken(scope token.Scope) (string, error) {
	issuer, _, err := f.trust()
	if err != nil {
		return "", err
	}
	tok, _, err := issuer.Create(scope, time.Now(), 24*time.Hour)
	return tok, err
}

// TokenIssuer returns the public key of the fleet's token issuer.
func (f *Fleet) TokenIssuer() (string, error) {
	issuer, _, err := f.trust()
	if err != nil {
		return "", err
	}
	return issuer.PublicKey(), nil
}

// Facts returns the facts of node i.
func (f *Fleet) Facts(i int) map[string]string { return f.opts.Facts(i) }

// AgentDir returns node i's state directory.
func (f *Fleet) AgentDir(identity string) string { return filepath.Join(f.dir, "agents", identity) }

// Dir is the fleet's root directory.
func (f *Fleet) Dir() string { return f.dir }

// CA returns the fleet's CA.
func (f *Fleet) CA() *ca.CA { return f.ca }

// Broker returns the fleet's broker.
func (f *Fleet) Broker() *broker.Broker { return f.broker }

// Provisioner returns the fleet's first provisioner (nil before Prepare).
func (f *Fleet) Provisioner() *provisioner.Provisioner {
	if len(f.provs) == 0 {
		return nil
	}
	return f.provs[0]
}

// Provisioners returns every provisioner of the fleet (Options.Provisioners).
func (f *Fleet) Provisioners() []*provisioner.Provisioner {
	return append([]*provisioner.Provisioner(nil), f.provs...)
}

// Started is when Start launched the agents.
func (f *Fleet) Started() time.Time { return f.started }

// ProductionTimes returns when each node reached production.
func (f *Fleet) ProductionTimes() map[string]time.Time {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[string]time.Time, len(f.production))
	for k, v := range f.production {
		out[k] = v
	}
	return out
}

// Errors returns the last provisioner error per node that has not since
// succeeded.
func (f *Fleet) Errors() map[string]error {
	f.mu.Lock()
	defer f.mu.Unlock()
	out := make(map[string]error, len(f.errs))
	for k, v := range f.errs {
		out[k] = v
	}
	return out
}

// AdminConn connects to the production side with the fleet's admin
// certificate (mutual TLS).
func (f *Fleet) AdminConn() (*nats.Conn, error) {
	pkiDir := filepath.Join(f.dir, "pki")
	return nats.Connect(f.broker.ClientURL(),
		nats.Name(AdminCN),
		nats.RootCAs(filepath.Join(pkiDir, "ca.pem")),
		nats.ClientCert(filepath.Join(pkiDir, "admin.pem"), filepath.Join(pkiDir, "admin-key.pem")),
	)
}

// pingResend is how often PingProduction broadcasts its ping again while
// nodes have not answered.
const pingResend = time.Second

// PingProduction broadcasts rpcutil ping on the production side's main
// collective over mutual TLS and returns the identities that answered
// within wait. The ping goes out again every pingResend (with a new
// request ID: agents refuse a replayed one) while some have not answered:
// an agent counts as in production once its subscriptions are sent, and
// a broadcast can reach the broker before them.
func (f *Fleet) PingProduction(ctx context.Context, wait time.Duration) ([]string, error) {
	nc, err := f.AdminConn()
	if err != nil {
		return nil, fmt.Errorf("admin connection: %w", err)
	}
	defer nc.Close()
	inbox := nats.NewInbox()
	sub, err := nc.SubscribeSync(inbox)
	if err != nil {
		return nil, err
	}
	ping := func() error {
		req := protocol.Request{
			Protocol: protocol.RequestProtocol, ID: nats.NewInbox()[len("_INBOX."):], Sender: AdminCN,
			Agent: protocol.AgentRPCUtil, Action: protocol.ActionPing, Time: time.Now().UTC(), TTL: 60,
		}
		b, err := protocol.Marshal(&req)
		if err != nil {
			return err
		}
		return nc.PublishRequest(protocol.BroadcastSubject(protocol.DefaultMainCollective, protocol.AgentRPCUtil), inbox, b)
	}
	if err := ping(); err != nil {
		return nil, err
	}
	seen := map[string]bool{}
	deadline := time.Now().Add(wait)
	resend := time.Now().Add(pingResend)
	for len(seen) < len(f.ids) && ctx.Err() == nil {
		now := time.Now()
		if !now.Before(deadline) {
			break
		}
		if !now.Before(resend) {
			if err := ping(); err != nil {
				return nil, err
			}
			resend = now.Add(pingResend)
		}
		next := min(time.Until(deadline), time.Until(resend))
		if next <= 0 {
			continue
		}
		msg, err := sub.NextMsg(next)
		if errors.Is(err, nats.ErrTimeout) {
			continue
		}
		if err != nil {
			break
		}
		rep, err := protocol.DecodeReply(msg.Data)
		if err != nil || rep.Err() != nil {
			continue
		}
		seen[rep.Sender] = true
	}
	out := make([]string, 0, len(seen))
	for id := range seen {
		out = append(out, id)
	}
	sort.Strings(out)
	return out, nil
}

// Close stops every component, waits for them, and removes a temporary
// directory. It returns the components' run errors. Safe to call twice.
func (f *Fleet) Close() error {
	f.mu.Lock()
	if f.closed {
		f.mu.Unlock()
		return nil
	}
	f.closed = true
	f.mu.Unlock()
	if f.cancel != nil {
		f.cancel()
	}
	f.stopProcesses(10 * time.Second)
	f.stopHost(10 * time.Second)
	f.wg.Wait()
	if f.watchConn != nil {
		f.watchConn.Close()
	}
	for _, c := range f.provConns {
		c.Close()
	}
	if f.closeHelper != nil {
		_ = f.closeHelper()
	}
	if f.broker != nil {
		f.broker.Shutdown()
	}
	if f.tmp {
		os.RemoveAll(f.dir)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	return errors.Join(f.runErr...)
}

// trust reads the development PKI's token issuer and the provisioner's
// public key: the fleet's agents get a token each from the one and trust
// the other.
func (f *Fleet) trust() (*token.Issuer, string, error) {
	seed, err := os.ReadFile(filepath.Join(f.dir, "pki", broker.TokenIssuerSeedFile))
	if err != nil {
		return nil, "", fmt.Errorf("token issuer: %w", err)
	}
	issuer, err := token.NewIssuer(seed)
	if err != nil {
		return nil, "", fmt.Errorf("token issuer: %w", err)
	}
	pseed, err := os.ReadFile(filepath.Join(f.dir, "pki", broker.ProvisionerSeedFile))
	if err != nil {
		return nil, "", fmt.Errorf("provisioner key: %w", err)
	}
	kp, err := nkeys.FromSeed(pseed)
	if err != nil {
		return nil, "", fmt.Errorf("provisioner key: %w", err)
	}
	pub, err := kp.PublicKey()
	return issuer, pub, err
}

// seedRegistry writes n identities that are not the fleet's into the file
// registry in dir, as provisioned a month ago, and folds them into its
// snapshot.
func seedRegistry(dir string, n int) error {
	if n <= 0 {
		return nil
	}
	reg, err := provisioner.OpenFileRegistry(dir)
	if err != nil {
		return err
	}
	at := time.Now().UTC().Add(-30 * 24 * time.Hour).Truncate(time.Second)
	recs := make([]provisioner.Record, n)
	for i := range recs {
		sum := sha256.Sum256([]byte(strconv.Itoa(i)))
		recs[i] = provisioner.Record{
			Identity:       fmt.Sprintf("known%06d.existing.example", i),
			KeyFingerprint: "sha256:" + hex.EncodeToString(sum[:]),
			Serial:         strconv.FormatInt(int64(i)+1, 16),
			ProvisionedAt:  at,
		}
	}
	if err := reg.PutMany(recs); err != nil {
		reg.Close()
		return fmt.Errorf("seed the identity registry: %w", err)
	}
	return reg.Close()
}
