// Package provisioner is Muster's provisioner: it discovers waiting nodes
// (metadata, startup events and broadcast discovery), queues each one at most
// once, and runs every node through the pipeline inventory → gencsr → helper
// → validate → configure → restart (or defer, or shutdown) in a bounded
// worker pool, with retries, backoff, a grace period, pause/resume,
// Prometheus metrics and an HTTP monitor. docs/provisioner.md describes it
// for operators.
package provisioner

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/logging"
	"github.com/muster-io/muster/internal/patience"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/token"
)

// Outcome is how a node's provisioning attempt ended.
type Outcome string

// Outcomes reported to the Observer.
const (
	OutcomeProvisioned Outcome = "provisioned"
	OutcomeDeferred    Outcome = "deferred"
	OutcomeShutdown    Outcome = "shutdown"
	OutcomeFailed      Outcome = "failed"
	// OutcomeHeld: the node is held for an operator (or denied).
	OutcomeHeld Outcome = "held"
)

// Stage is a step of the pipeline; a failure is recorded with its stage.
type Stage string

// Pipeline stages, in order.
const (
	StageDiscovery Stage = "discovery"
	StageQueue     Stage = "queue"
	// StageClaim (ha modes): claiming the node and reading its shared
	// record, right after it leaves the queue.
	StageClaim     Stage = "claim"
	StageInventory Stage = "inventory"
	StageGenCSR    Stage = "gencsr"
	StageHelper    Stage = "helper"
	StageValidate  Stage = "validate"
	StageConfigure Stage = "configure"
	StageRestart   Stage = "restart"
	StageShutdown  Stage = "shutdown"
)

var allStages = []Stage{StageDiscovery, StageQueue, StageClaim, StageInventory, StageGenCSR, StageHelper, StageValidate, StageConfigure, StageRestart, StageShutdown}

// rpcStages are the stages that send RPCs (and so may retry).
var rpcStages = []Stage{StageInventory, StageGenCSR, StageConfigure, StageRestart, StageShutdown}

// rpcActions are the label values of rpc_duration_seconds.
var rpcActions = []string{protocol.ActionInventory, protocol.ActionGenCSR, protocol.ActionConfigure, protocol.ActionRestart, protocol.ActionShutdown, protocol.ActionDefer}

// State is where a node stands in the provisioner.
type State string

// Node states.
const (
	// StateQueued: waiting in the queue.
	StateQueued State = "queued"
	// StateInProgress: a worker is running its pipeline.
	StateInProgress State = "in_progress"
	// StateDeferred: the helper deferred it; taken again after RetryAt.
	StateDeferred State = "deferred"
	// StateFailed: the last attempt failed; taken again after RetryAt.
	StateFailed State = "failed"
	// StateProvisioned: configured and restarting; not taken again during
	// the grace period.
	StateProvisioned State = "provisioned"
	// StateProduction: its provisioned lifecycle event arrived from the
	// production side; not taken again unless it starts up in provisioning
	// mode later (reprovisioned).
	StateProduction State = "production"
	// StateShutdown: told to shut down; not taken again during the grace
	// period.
	StateShutdown State = "shutdown"
	// StateAbandoned: the provisioner stopped before the node was done.
	StateAbandoned State = "abandoned"
	// StateHeld: waiting for an operator to approve or deny it (HoldReason
	// says why); never taken meanwhile.
	StateHeld State = "held"
	// StateDenied: an operator denied it; never provisioned.
	StateDenied State = "denied"
)

// allStates are the node states, the label values of
// muster_provisioner_nodes.
var allStates = []State{StateQueued, StateInProgress, StateDeferred, StateFailed, StateProvisioned, StateProduction, StateShutdown, StateAbandoned, StateHeld, StateDenied, StateElsewhere}

// States returns every node state.
func States() []State { return slices.Clone(allStates) }

// Sentinel errors.
var (
	ErrNoHelper       = errors.New("no helper")
	ErrNotRunning     = errors.New("provisioner not running")
	ErrAlreadyRunning = errors.New("provisioner already running")
	ErrWrongSender    = errors.New("reply from the wrong sender")
	ErrBadReply       = errors.New("bad reply")
	ErrBadCSR         = errors.New("node returned a bad CSR")
	ErrAbandoned      = errors.New("abandoned at shutdown")
	ErrHelperRejected = errors.New("helper reply rejected")
)

// Observer receives a callback each time a node's attempt ends (for the demo
// and benchmarks). Calls come from worker goroutines and must be quick.
type Observer interface {
	NodeDone(identity string, outcome Outcome, stage Stage, err error)
}

// Options are New's inputs.
type Options struct {
	// Config is the provisioner's configuration.
	Config Config
	// Helper turns node requests into replies. Required.
	Helper helper.Helper
	// Conn is an optional pre-dialled connection to the provisioning
	// account; without it Run dials Config.Brokers with TLSCA and the nkey.
	Conn *nats.Conn
	// Logger is the base logger; nil uses the config's log level on stderr.
	Logger *logrus.Entry
	// Observer receives node outcomes; optional.
	Observer Observer
	// Registry is the identity registry; nil opens a file registry in
	// Config.StateDir, or keeps it in memory when that is empty.
	Registry Registry
	// DrainTimeout bounds how long Run waits at shutdown for nodes in
	// progress before abandoning them; 0 means RPCTimeout + HelperTimeout.
	DrainTimeout time.Duration
}

// NodeStatus is the provisioner's view of one node.
type NodeStatus struct {
	Identity  string `json:"identity"`
	State     State  `json:"state"`
	Stage     Stage  `json:"stage,omitempty"`
	Attempts  int    `json:"attempts"`
	LastError string `json:"last_error,omitempty"`
	// HelperStderr is the start of the helper's standard error when the
	// last attempt failed in the helper (bounded).
	HelperStderr  string    `json:"helper_stderr,omitempty"`
	Updated       time.Time `json:"updated"`
	ProvisionedAt time.Time `json:"provisioned_at,omitzero"`
	// RetryAt is when a deferred, failed, provisioned or shut down node may
	// be taken again.
	RetryAt time.Time `json:"retry_at,omitzero"`
	// Source is how the node was last discovered.
	Source string `json:"source,omitempty"`
	// KeyFingerprint is the fingerprint of the key the node last presented
	// in gencsr ("sha256:<hex>").
	KeyFingerprint string `json:"key_fingerprint,omitempty"`
	// HoldReason says why a held node is held (key_changed,
	// duplicate_connection).
	HoldReason string    `json:"hold_reason,omitempty"`
	HeldAt     time.Time `json:"held_at,omitzero"`
	// Life is the ID of the provisioning-mode life the node was last
	// configured in (by this provisioner, or as the shared state says);
	// empty when unknown.
	Life string `json:"life,omitempty"`
}

type node struct {
	NodeStatus
	queuedAt time.Time
	// arrivedSerial and arrivedAt are the certificate serial and time of
	// the node's last provisioned event from production, arrivalID its ID.
	arrivedSerial string
	arrivedAt     time.Time
	arrivalID     string
	// productionSince is when the node last arrived in production, by
	// its clock (its provisioned event's time; this provisioner's when
	// the event has none): a provisioning life started after it is a new
	// one. Not Updated, which a late attempt result moves.
	productionSince time.Time

	// heldCSR is the gencsr reply of a node held for a changed key.
	heldCSR *approval
	// approval is an operator's approval for the next attempt.
	approval *approval
}

// addNode adds a node without a state yet, replacing any it had; p.mu is
// held.
func (p *Provisioner) addNode(identity string) *node {
	if old := p.nodes[identity]; old != nil {
		p.counts[old.State]--
	}
	n := &node{NodeStatus: NodeStatus{Identity: identity}}
	p.nodes[identity] = n
	p.counts[""]++
	return n
}

// setState moves n to state s; p.mu is held.
func (p *Provisioner) setState(n *node, s State) {
	p.counts[n.State]--
	p.counts[s]++
	n.State = s
}

// dropNode forgets a node; p.mu is held.
func (p *Provisioner) dropNode(identity string) {
	if n := p.nodes[identity]; n != nil {
		p.counts[n.State]--
		delete(p.nodes, identity)
	}
}

// stateCounts returns the nodes known by state, leaving out states no node
// is in.
func (p *Provisioner) stateCounts() map[State]int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stateCountsLocked()
}

// stateCountsLocked is stateCounts with p.mu held.
func (p *Provisioner) stateCountsLocked() map[State]int {
	out := make(map[State]int, len(p.counts))
	for s, c := range p.counts {
		if c != 0 {
			out[s] = c
		}
	}
	return out
}

type queueItem struct {
	identity string
	queuedAt time.Time
	// life is the node's provisioning life, as named by the startup
	// event, metadata or discovery reply that queued it.
	life nodeLife
}

// nodeLife is a node's provisioning-mode life as an announcement names it:
// its ID and its start by the node's clock, either unknown (empty, zero)
// from agents that do not send it.
type nodeLife struct {
	id      string
	started time.Time
}

// newer reports whether l is a life the node began after it arrived in
// production, provisioned in the life with ID known ("" when unknown) and
// arriving at arrivedAt by its clock. Known IDs decide alone: no clock is
// involved, so a node whose clock went back across a reinstall is still
// taken again, and an old life's late announcement is never taken for a
// new one whatever the node's clock did. Otherwise the life must have
// started after the arrival.
func (l nodeLife) newer(known string, arrivedAt time.Time) bool {
	if l.id != "" && known != "" {
		return l.id != known
	}
	return !l.started.IsZero() && l.started.After(arrivedAt)
}

// Provisioner discovers and provisions nodes. Build it with New; run it
// with Run.
type Provisioner struct {
	cfg       Config
	helper    helper.Helper
	observer  Observer
	log       *logrus.Entry
	m         *metrics
	guard     *guard
	reg       Registry
	fileReg   *FileRegistry // opened by New in state_dir (else nil); Run folds its journal at stop
	queue     chan queueItem
	helperSem chan struct{}
	drain     time.Duration

	mu      sync.Mutex
	nc      *nats.Conn
	ownConn bool
	running bool
	nodes   map[string]*node
	// counts counts nodes by state (a node just created has none yet),
	// kept by addNode, setState and dropNode so that /status and the
	// metrics never walk nodes.
	counts    map[State]int
	paused    bool
	gateCh    chan struct{} // closed and replaced on every pause/resume
	monAddr   string
	invalidAt map[string]logThrottle

	connOverride *nats.Conn
	// intake holds the subscriptions announcements and events come in by.
	intake *intake
	// signer signs every request to nodes (the provisioner's nkey).
	signer *protocol.Signer
	// tokens verifies provisioning tokens; nil with insecure_tokenless.
	tokens *token.Verifier
	// shared is the JetStream state shared with other provisioners (nil
	// in single mode); standby is set while not the leader (leader mode).
	shared  *shared
	standby bool
	// tokenUses maps a token's jti to the identities it provisioned.
	tokenUses map[string]map[string]struct{}
	// ready is closed once Run has subscribed and started its workers.
	ready chan struct{}
	// seenArrivals are the arrivals this provisioner's subscription saw,
	// to be recorded in the shared state (ha modes). arrivalsLoop records
	// them too, from the arrivals stream: either is enough, and each
	// covers a loss of the other (the stream misses events while its
	// leader changes; subscriptions miss events while no provisioner
	// runs).
	seenArrivals chan *protocol.Event
}

type logThrottle struct {
	last       time.Time
	suppressed int
}

// New validates the options and builds a provisioner. It starts nothing.
func New(opts Options) (*Provisioner, error) {
	var errs []error
	if err := opts.Config.validate(opts.Conn == nil); err != nil {
		errs = append(errs, err)
	}
	if opts.Helper == nil {
		errs = append(errs, fmt.Errorf("provisioner: helper: %w", ErrNoHelper))
	}
	if opts.DrainTimeout < 0 {
		errs = append(errs, fmt.Errorf("%w: drain timeout %s: must not be negative", ErrConfig, opts.DrainTimeout))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	cfg := opts.Config
	signer, err := loadSigner(cfg.NkeySeedFile)
	if err != nil {
		return nil, err
	}
	var tokens *token.Verifier
	if len(cfg.TokenIssuers) > 0 {
		if tokens, err = token.NewVerifier(cfg.TokenIssuers); err != nil {
			return nil, fmt.Errorf("%w: token_issuers: %w", ErrConfig, err)
		}
	}
	g, err := newGuard(cfg.Policy)
	if err != nil {
		return nil, err
	}
	reg := opts.Registry
	var fileReg *FileRegistry
	if reg == nil && cfg.StateDir != "" {
		fr, err := OpenFileRegistry(cfg.StateDir)
		if err != nil {
			return nil, fmt.Errorf("provisioner state_dir: %w", err)
		}
		reg, fileReg = fr, fr
	}
	fail := func(err error) (*Provisioner, error) {
		if fileReg != nil {
			fileReg.Close()
		}
		return nil, err
	}
	if reg == nil {
		reg = NewMemoryRegistry()
	}
	log := opts.Logger
	if log == nil {
		l, _, err := logging.New(cfg.LogLevel, "")
		if err != nil {
			return fail(err)
		}
		log = logrus.NewEntry(l)
	}
	log = log.WithField("component", "provisioner")
	p := &Provisioner{
		cfg:          cfg,
		helper:       opts.Helper,
		observer:     opts.Observer,
		log:          log,
		guard:        g,
		reg:          reg,
		fileReg:      fileReg,
		queue:        make(chan queueItem, cfg.QueueSize),
		helperSem:    make(chan struct{}, cfg.helperConcurrency()),
		drain:        opts.DrainTimeout,
		nodes:        map[string]*node{},
		counts:       map[State]int{},
		gateCh:       make(chan struct{}),
		invalidAt:    map[string]logThrottle{},
		connOverride: opts.Conn,
		signer:       signer,
		tokens:       tokens,
		tokenUses:    map[string]map[string]struct{}{},
		ready:        make(chan struct{}),
		seenArrivals: make(chan *protocol.Event, seenArrivalsBuffer),
	}
	if cfg.InsecureTokenless {
		log.Warn("INSECURE: insecure_tokenless is on; any node that reaches the broker is provisioned without a provisioning token")
	}
	if p.drain == 0 {
		p.drain = cfg.RPCTimeout.D() + cfg.HelperTimeout.D()
	}
	p.intake = newIntake(cfg.QueueSize)
	m, err := newMetrics(func() float64 { return float64(len(p.queue)) }, p.stateCounts, p.intake.dropped, cfg.QueueSize, cfg.Workers)
	if err != nil {
		return fail(fmt.Errorf("provisioner metrics: %w", err))
	}
	p.m = m
	// In the ha modes the shared registry is the one in force: Run loads
	// it (after importing a state_dir registry into it), not this one.
	if mode := cfg.HA.Mode; mode == "" || mode == HASingle {
		if err := p.loadDenied(); err != nil {
			return fail(fmt.Errorf("identity registry: %w", err))
		}
	}
	return p, nil
}

// loadSigner reads the provisioner's nkey seed, the key it signs requests
// with. The seed never appears in errors.
func loadSigner(path string) (*protocol.Signer, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: nkey_seed_file %q: %s", ErrConfig, path, errText(err))
	}
	kp, err := nkeys.ParseDecoratedNKey(b)
	if err != nil {
		return nil, fmt.Errorf("%w: nkey_seed_file %q: not an nkey seed", ErrConfig, path)
	}
	if _, err := kp.Seed(); err != nil {
		return nil, fmt.Errorf("%w: nkey_seed_file %q: holds no seed", ErrConfig, path)
	}
	s, err := protocol.NewSigner(kp)
	kp.Wipe()
	if err != nil {
		return nil, fmt.Errorf("%w: nkey_seed_file %q: %w", ErrConfig, path, err)
	}
	return s, nil
}

// SignerKey is the public nkey the provisioner signs requests with; agents
// must trust it.
func (p *Provisioner) SignerKey() string {
	pub, _ := p.signer.PublicKey()
	return pub
}

// Registry returns the provisioner's private Prometheus registry.
func (p *Provisioner) Registry() *prometheus.Registry { return p.m.reg }

// Ready is closed once Run has subscribed to the nodes' announcements and
// started its workers: from then on no announcement is missed.
func (p *Provisioner) Ready() <-chan struct{} { return p.ready }

// MonitorAddr returns the HTTP monitor's listen address once Run has opened
// it, else "".
func (p *Provisioner) MonitorAddr() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.monAddr
}

// Pause stops workers from taking new nodes; nodes in progress finish and
// discovery keeps queueing.
func (p *Provisioner) Pause() { p.setPaused(true) }

// Resume lets workers take nodes again.
func (p *Provisioner) Resume() { p.setPaused(false) }

// Paused reports whether the provisioner is paused.
func (p *Provisioner) Paused() bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.paused
}

func (p *Provisioner) setPaused(v bool) {
	if p.setGateFlag(&p.paused, v, p.m.paused) {
		p.log.WithField("paused", v).Info("provisioner pause state changed")
	}
}

// setGateFlag sets one of the flags that stop workers (paused, standby) and
// its gauge, and wakes the workers to look again. It reports whether the
// flag changed.
func (p *Provisioner) setGateFlag(flag *bool, v bool, g prometheus.Gauge) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if *flag == v {
		return false
	}
	*flag = v
	close(p.gateCh)
	p.gateCh = make(chan struct{})
	if v {
		g.Set(1)
	} else {
		g.Set(0)
	}
	return true
}

func (p *Provisioner) gate() (bool, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.paused || p.standby, p.gateCh
}

// Nodes returns every known node's status, sorted by identity.
func (p *Provisioner) Nodes() []NodeStatus {
	p.mu.Lock()
	out := make([]NodeStatus, 0, len(p.nodes))
	for _, n := range p.nodes {
		out = append(out, n.NodeStatus)
	}
	p.mu.Unlock()
	sortNodes(out)
	return out
}

func (p *Provisioner) conn() *nats.Conn {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.nc
}

// connected reports whether the provisioner has a live broker connection.
func (p *Provisioner) connected() bool {
	nc := p.conn()
	return nc != nil && nc.IsConnected()
}

// Run connects (unless a connection was given), subscribes to discovery
// sources, runs broadcast discovery every Interval, serves the HTTP monitor
// and works the queue until ctx is done. Then it stops discovery, lets nodes
// in progress finish for a drain period, abandons the rest, waits for every
// goroutine and closes the connection if it dialled it. It returns nil on a
// clean shutdown. Run may be called once.
func (p *Provisioner) Run(ctx context.Context) error {
	p.mu.Lock()
	if p.running {
		p.mu.Unlock()
		return ErrAlreadyRunning
	}
	p.running = true
	p.mu.Unlock()

	nc, own, err := p.connect()
	if err != nil {
		return err
	}
	p.mu.Lock()
	p.nc, p.ownConn = nc, own
	p.mu.Unlock()
	defer func() {
		if own {
			nc.Close()
		}
	}()
	if err := p.openShared(ctx, nc); err != nil {
		return err
	}
	if p.shared != nil && p.shared.mode == HALeader {
		p.setStandby(true)
	}

	type subSpec struct {
		subject, source string
	}
	specs := []subSpec{
		{protocol.MetadataSubjectFor(">"), sourceMetadata},
		{protocol.LifecycleSubject(protocol.EventStartup, "*", ">"), sourceStartup},
		{productionPrefix + protocol.LifecycleSubject(protocol.EventProvisioned, "*", ">"), sourceProduction},
		{protocol.AdvisoryDuplicateIdentity, sourceAdvisory},
	}
	msgs := make(chan *nats.Msg, p.intake.handoff)
	intakeCtx, stopIntake := context.WithCancel(ctx)
	defer stopIntake()
	unsubscribe := func() {
		stopIntake() // a callback waiting to hand a message over gives up
		p.intake.unsubscribe()
	}
	for _, s := range specs {
		if err := p.intake.subscribe(intakeCtx, nc, s.subject, s.source, msgs); err != nil {
			unsubscribe()
			return fmt.Errorf("subscribe %s: %w", s.subject, err)
		}
	}
	// Make sure the server holds the subscriptions before Run reports ready,
	// so an announcement made after that is never missed.
	// A broker that dies right now is not fatal: the client reconnects to
	// another and re-subscribes, so retry until the flush goes through.
	for {
		err := nc.FlushTimeout(p.cfg.RPCTimeout.D())
		if err == nil {
			break
		}
		if ctx.Err() != nil || nc.IsClosed() {
			unsubscribe()
			return fmt.Errorf("subscribe: flush: %w", err)
		}
		p.log.WithError(err).Warn("subscribe: broker not reachable yet; retrying")
		t := time.NewTimer(time.Second)
		select {
		case <-ctx.Done():
			t.Stop()
		case <-t.C:
		}
	}

	var srv *http.Server
	var ln net.Listener
	if p.cfg.MonitorPort != 0 {
		port := p.cfg.MonitorPort
		if port < 0 {
			port = 0
		}
		ln, err = net.Listen("tcp", net.JoinHostPort(p.cfg.MonitorHost, strconv.Itoa(port)))
		if err != nil {
			unsubscribe()
			return fmt.Errorf("monitor listen: %w", err)
		}
		srv = &http.Server{Handler: p.Handler(), ReadHeaderTimeout: 5 * time.Second}
		p.mu.Lock()
		p.monAddr = ln.Addr().String()
		p.mu.Unlock()
		p.log.WithField("addr", ln.Addr().String()).Info("monitor listening")
	}

	// workCtx outlives ctx by at most the drain period so nodes in progress
	// can finish.
	workCtx, cancelWork := context.WithCancel(context.WithoutCancel(ctx))
	defer cancelWork()

	var wg sync.WaitGroup
	var workers sync.WaitGroup
	var srvErr error
	if srv != nil {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := srv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				srvErr = fmt.Errorf("monitor: %w", err)
			}
		}()
	}
	wg.Add(2)
	go func() {
		defer wg.Done()
		p.messageLoop(ctx, msgs)
	}()
	go func() {
		defer wg.Done()
		p.discoveryLoop(ctx)
	}()
	if p.shared != nil && p.shared.mode == HALeader {
		wg.Add(1)
		go func() {
			defer wg.Done()
			p.leaderLoop(ctx)
		}()
	}
	if p.shared != nil {
		wg.Add(2)
		go func() {
			defer wg.Done()
			p.arrivalsLoop(ctx)
		}()
		go func() {
			defer wg.Done()
			p.seenArrivalsLoop(ctx)
		}()
	}
	for i := 0; i < p.cfg.Workers; i++ {
		workers.Add(1)
		go func() {
			defer workers.Done()
			p.worker(ctx, workCtx)
		}()
	}
	p.log.WithFields(logrus.Fields{"workers": p.cfg.Workers, "queue_size": p.cfg.QueueSize}).Info("provisioner started")
	close(p.ready)

	<-ctx.Done()
	p.log.Info("provisioner stopping")
	unsubscribe()

	// Wait for in-flight nodes up to the drain period, then abandon them.
	done := make(chan struct{})
	go func() {
		workers.Wait()
		close(done)
	}()
	timer := time.NewTimer(p.drain)
	select {
	case <-done:
		timer.Stop()
	case <-timer.C:
		p.log.WithField("drain", p.drain.String()).Warn("drain period over; abandoning nodes in progress")
		cancelWork()
		<-done
	}
	if srv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = srv.Shutdown(sctx)
		cancel()
	}
	wg.Wait()
	p.abandonQueued()
	if p.fileReg != nil {
		if err := p.fileReg.Compact(); err != nil {
			p.log.WithError(err).Warn("identity registry: folding the journal into registry.json failed; the next start folds it")
		}
	}
	p.mu.Lock()
	p.monAddr = ""
	p.mu.Unlock()
	p.log.Info("provisioner stopped")
	return srvErr
}

// connectTimeout is how long the provisioner's first attempt to connect
// to a broker may take, from TCP connect to the broker's first PONG:
// the broker's default tls_timeout, and the agents' default first attempt.
// Attempts that run out of it get longer (internal/patience). dialTimeout
// bounds the TCP connect itself, so a dead broker is passed over as fast
// as with nats.go's default.
const (
	connectTimeout = 30 * time.Second
	dialTimeout    = 2 * time.Second
)

func (p *Provisioner) connect() (*nats.Conn, bool, error) {
	if p.connOverride != nil {
		return p.connOverride, false, nil
	}
	opts := []nats.Option{
		nats.Name(p.cfg.Name),
		nats.MaxReconnects(-1),
		nats.RetryOnFailedConnect(true),
		nats.ReconnectWait(time.Second),
		// A broker restarted under a fleet does every node's handshake
		// at once; an attempt that runs out of time gives the next one
		// longer instead of queueing behind the fleet again.
		nats.Timeout(connectTimeout),
		nats.SetCustomDialer(patience.New(connectTimeout, dialTimeout, nil, p.log)),
		nats.DisconnectErrHandler(func(_ *nats.Conn, err error) {
			if err != nil {
				p.log.WithError(err).Warn("disconnected from broker")
			}
		}),
		nats.ReconnectHandler(func(c *nats.Conn) {
			p.log.WithField("broker", c.ConnectedUrlRedacted()).Info("reconnected to broker")
		}),
		// Asynchronous errors go to the log, not to nats.go's default of
		// standard error; the intake's slow consumers are counted and
		// reported by the intake.
		nats.ErrorHandler(p.asyncError),
	}
	// TLS always: the broker requires it, and whoever could talk to the
	// provisioner in the clear would see every request and could pose as
	// the broker.
	opts = append(opts, nats.Secure(&tls.Config{MinVersion: tls.VersionTLS12}))
	if p.cfg.TLSCA != "" {
		opts = append(opts, nats.RootCAs(p.cfg.TLSCA))
	}
	// The broker credential is the signing key: sign only what is shaped
	// like a nonce (protocol.SignNonce), never a request a rogue broker
	// passes off as one.
	opts = append(opts, nats.Nkey(p.SignerKey(), func(nonce []byte) ([]byte, error) { return protocol.SignNonce(p.signer, nonce) }))
	nc, err := nats.Connect(strings.Join(p.cfg.Brokers, ","), opts...)
	if err != nil {
		return nil, false, fmt.Errorf("connect to brokers: %w", err)
	}
	return nc, true, nil
}

// asyncError logs an asynchronous error of the broker connection (instead
// of nats.go's default, standard error). The intake's slow consumers are
// left to the intake, which counts and reports them.
func (p *Provisioner) asyncError(_ *nats.Conn, sub *nats.Subscription, err error) {
	if errors.Is(err, nats.ErrSlowConsumer) && sub != nil && p.intake.isIntake(sub) {
		return
	}
	l := p.log.WithError(err)
	if sub != nil {
		l = l.WithField("subject", sub.Subject)
	}
	l.Warn("broker connection error")
}

// abandonQueued marks nodes that were still queued at shutdown.
func (p *Provisioner) abandonQueued() {
	for {
		select {
		case it := <-p.queue:
			p.mu.Lock()
			if n, ok := p.nodes[it.identity]; ok && n.State == StateQueued {
				p.setState(n, StateAbandoned)
				n.Updated = time.Now()
			}
			p.mu.Unlock()
		default:
			return
		}
	}
}

// worker takes nodes from the queue while not paused, until ctx is done.
func (p *Provisioner) worker(ctx, workCtx context.Context) {
	for {
		if ctx.Err() != nil {
			return
		}
		paused, changed := p.gate()
		if paused {
			select {
			case <-ctx.Done():
				return
			case <-changed:
			}
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case it := <-p.queue:
			p.process(workCtx, it)
		}
	}
}
