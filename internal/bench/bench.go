// Package bench measures a whole Muster deployment in one process: it runs
// the broker, the provisioner and N real agents (internal/demo's Fleet),
// provisions every agent, and reports throughput, time to production,
// per-stage latency, CPU and memory costs, and errors. `muster bench` prints
// its Result.
package bench

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime"
	"runtime/debug"
	"slices"
	"sort"
	"sync"
	"syscall"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/agent"
	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/demo"
	"github.com/muster-io/muster/internal/progress"
	"github.com/muster-io/muster/provisioner"
)

// Helper modes.
const (
	HelperBuiltin    = "builtin"
	HelperExec       = "exec"
	HelperPersistent = "persistent"
)

// Arrival modes.
const (
	ArrivalStorm = "storm"
	ArrivalRamp  = "ramp"
)

// Transports.
const (
	TransportTCP       = "tcp"
	TransportInProcess = "inprocess"
)

// ErrOptions wraps every option error.
var ErrOptions = errors.New("invalid bench options")

// Options configure a benchmark run.
type Options struct {
	// Nodes is the number of agents to provision (at least 1).
	Nodes int
	// Workers is the provisioner's worker count (default 16).
	Workers int
	// Helper is builtin, exec or persistent (default builtin).
	Helper string
	// HelperCmd is the command of an exec or persistent helper.
	HelperCmd string
	// HelperTimeout bounds one helper run (default 10s).
	HelperTimeout time.Duration
	// Arrival is storm (every agent at once) or ramp (Rate agents a second).
	Arrival string
	// Rate is the ramp's agents per second.
	Rate float64
	// KeyType is the node key type: ecdsa-p256 or rsa (default ecdsa-p256).
	KeyType string
	// Transport is tcp (TLS over loopback) or inprocess
	// (nats.InProcessServer; mutual TLS in production).
	Transport string
	// Timeout bounds the provisioning phase (default 10 minutes).
	Timeout time.Duration
	// IdleAgents is how many agents the idle-memory phase starts; 0 uses
	// Nodes, a negative value skips the phase.
	IdleAgents int
	// RestartSplay is the provisioner's restart_splay (default 1ms, the
	// smallest that counts: a bench measures the pipeline, not the splay).
	RestartSplay time.Duration
	// DeferBackoff is how long a failed node waits before it is taken
	// again (default 2s).
	DeferBackoff time.Duration
	// Settle is how long the run keeps watching after the last node reached
	// production, to catch duplicate provisioning (default 1s; negative
	// skips). It is not part of the measured time.
	Settle time.Duration
	// MetadataInterval is the agents' mean metadata interval, their
	// periodic re-announcement (default 30s).
	MetadataInterval time.Duration
	// MusterBin is the muster binary exec'd helpers get as MUSTER_BIN
	// (default: this program).
	MusterBin string
	// Processes runs every agent as its own muster-agent process over TCP +
	// TLS (restarted by re-exec, as in production) instead of in this
	// process. It implies transport tcp and skips the idle phase.
	Processes bool
	// AgentBin is the muster-agent binary for Processes; empty: built with
	// `go build` into a temporary directory.
	AgentBin string
	// FleetProcess runs every agent in one other process, the fleet host
	// (FleetCommand), over TCP + TLS, so that this process's CPU is the
	// provisioning side's (broker, provisioner; helpers are counted apart)
	// and the fleet's is read from /proc. It implies transport tcp and
	// skips the idle phase.
	FleetProcess bool
	// FleetCommand is the fleet host's command line (`muster bench
	// fleet-host`: the program, then its arguments), FleetEnv what it
	// gets in its environment besides this process's.
	FleetCommand []string
	FleetEnv     []string
	// StateDir is the directory under which each phase's fleet (CA, agent
	// state directories) gets a fresh temporary directory, removed after
	// the phase; default: the system temporary directory. Agents write
	// their key, certificate and configuration durably (fsync), so the
	// filesystem here is part of what is measured: a tmpfs (/dev/shm)
	// takes the shared disk out and leaves the orchestration.
	StateDir string
	// Progress receives progress lines; nil shows none.
	Progress io.Writer
	// Logger receives the components' logs (default: discarded).
	Logger *logrus.Logger
	// WrapHelper, when set, wraps the helper inside the timing wrapper
	// (tests inject failures with it).
	WrapHelper func(helper.Helper) helper.Helper
	// NoFloor skips measuring the Floor before the provisioning phase.
	NoFloor bool
	// Registry is where the provisioner keeps its identity registry:
	// file (the default: registry.json and its journal in the provisioner's
	// state_dir under StateDir, as a deployment has it) or memory.
	Registry string
	// KnownNodes is how many identities the file registry holds before the
	// run (a fleet that already exists; written before the clock starts).
	KnownNodes int
	// HA is the provisioners' ha.mode: single (the default), claims or
	// leader. In claims and leader mode they share their node state,
	// claims and identity registry (Registry kv) through the broker's
	// JetStream, as a deployment of several provisioners does.
	HA string
	// Provisioners is how many provisioners run (default 1; more need HA
	// claims or leader). Each has Workers workers.
	Provisioners int
	// HeapSettle, when positive, is the longest the run keeps collecting
	// after the fleet was torn down, until the live heap stops falling
	// (Result.HeapLiveSettledMB). Deadline timers of closed in-process
	// connections (net.Pipe) keep part of the torn-down fleet reachable
	// for a few seconds. Zero or negative skips it.
	HeapSettle time.Duration
	// RestartBroker, once every node is in production, restarts the broker
	// on the same address and measures how soon the nodes are connected
	// again (Result.Restart). TCP only.
	RestartBroker bool
}

// Identity registry kinds.
const (
	RegistryFile   = "file"
	RegistryMemory = "memory"
	// RegistryKV is the ha modes' registry: the MUSTER_REGISTRY bucket.
	RegistryKV = "kv"
)

// Validate applies defaults and reports every problem, naming the option
// and its value.
func (o *Options) Validate() error {
	if o.Workers == 0 {
		o.Workers = 16
	}
	if o.Helper == "" {
		o.Helper = HelperBuiltin
	}
	if o.Arrival == "" {
		o.Arrival = ArrivalStorm
	}
	if o.Transport == "" {
		o.Transport = TransportInProcess
		if o.Processes || o.FleetProcess {
			o.Transport = TransportTCP
		}
	}
	if o.KeyType == "" {
		o.KeyType = "ecdsa-p256"
	}
	if o.HA == "" {
		o.HA = provisioner.HASingle
	}
	if o.Provisioners == 0 {
		o.Provisioners = 1
	}
	shared := o.HA == provisioner.HAClaims || o.HA == provisioner.HALeader
	if o.Registry == "" {
		o.Registry = RegistryFile
		if shared {
			o.Registry = RegistryKV
		}
	}
	if o.Timeout == 0 {
		o.Timeout = 10 * time.Minute
	}
	if o.HelperTimeout == 0 {
		o.HelperTimeout = 10 * time.Second
	}
	if o.RestartSplay == 0 {
		o.RestartSplay = time.Millisecond
	}
	if o.DeferBackoff == 0 {
		o.DeferBackoff = 2 * time.Second
	}
	if o.MetadataInterval == 0 {
		o.MetadataInterval = 30 * time.Second
	}
	if o.Settle == 0 {
		o.Settle = time.Second
	}
	var errs []error
	bad := func(key string, val any, why string) {
		errs = append(errs, fmt.Errorf("%w: %s %v: %s", ErrOptions, key, val, why))
	}
	if o.Nodes < 1 {
		bad("nodes", o.Nodes, "must be at least 1")
	}
	if o.Workers < 1 || o.Workers > 10000 {
		bad("workers", o.Workers, "must be 1..10000")
	}
	switch o.Helper {
	case HelperBuiltin:
		if o.HelperCmd != "" {
			bad("helper-cmd", o.HelperCmd, "only used with --helper exec or persistent")
		}
	case HelperExec, HelperPersistent:
		if o.HelperCmd == "" {
			bad("helper-cmd", `""`, "required with --helper "+o.Helper)
		}
	default:
		bad("helper", o.Helper, "must be builtin, exec or persistent")
	}
	switch o.Arrival {
	case ArrivalStorm:
		if o.Rate != 0 {
			bad("rate", o.Rate, "only used with --arrival ramp")
		}
	case ArrivalRamp:
		if o.Rate <= 0 {
			bad("rate", o.Rate, "must be positive with --arrival ramp")
		}
	default:
		bad("arrival", o.Arrival, "must be storm or ramp")
	}
	switch o.KeyType {
	case "ecdsa-p256", "rsa":
	default:
		bad("key-type", o.KeyType, "must be ecdsa-p256 or rsa")
	}
	switch o.Transport {
	case TransportTCP, TransportInProcess:
	default:
		bad("transport", o.Transport, "must be tcp or inprocess")
	}
	if o.Timeout < 0 {
		bad("timeout", o.Timeout, "must be positive")
	}
	if o.HelperTimeout < 0 {
		bad("helper-timeout", o.HelperTimeout, "must be positive")
	}
	if o.RestartSplay < 0 {
		bad("restart-splay", o.RestartSplay, "must be positive")
	}
	if o.MetadataInterval < 0 {
		bad("metadata-interval", o.MetadataInterval, "must be positive")
	}
	if o.DeferBackoff < 0 {
		bad("defer-backoff", o.DeferBackoff, "must be positive")
	}
	if o.Processes && o.Transport != TransportTCP {
		bad("transport", o.Transport, "agent processes connect over tcp")
	}
	if o.RestartBroker && o.Transport != TransportTCP {
		bad("restart-broker", o.RestartBroker, "needs --transport tcp: in-process connections cannot reach a new broker")
	}
	if o.FleetProcess {
		switch {
		case o.Processes:
			bad("fleet-process", o.FleetProcess, "excludes --processes: the agents run in one process or one each")
		case o.Transport != TransportTCP:
			bad("transport", o.Transport, "the fleet process's agents connect over tcp")
		case len(o.FleetCommand) == 0:
			bad("fleet-process", o.FleetProcess, "needs the fleet host's command")
		}
	}
	if o.AgentBin != "" && !o.Processes {
		bad("agent-bin", o.AgentBin, "only used with --processes")
	}
	switch {
	case o.HA != provisioner.HASingle && !shared:
		bad("ha", o.HA, "must be single, claims or leader")
	case o.Provisioners < 1 || o.Provisioners > demo.MaxProvisioners:
		bad("provisioners", o.Provisioners, fmt.Sprintf("must be 1..%d", demo.MaxProvisioners))
	case o.Provisioners > 1 && !shared:
		bad("provisioners", o.Provisioners, "more than one needs --ha claims or leader")
	}
	switch {
	case shared && o.Registry != RegistryKV:
		bad("registry", o.Registry, "the ha modes keep the identity registry in JetStream (kv)")
	case !shared && o.Registry != RegistryFile && o.Registry != RegistryMemory:
		bad("registry", o.Registry, "must be file or memory")
	}
	if o.KnownNodes < 0 || o.KnownNodes+max(o.Nodes, 0) > provisioner.MaxRegistryRecords {
		bad("known-nodes", o.KnownNodes, fmt.Sprintf("must be 0..%d less --nodes (a registry holds at most %d identities)", provisioner.MaxRegistryRecords, provisioner.MaxRegistryRecords))
	}
	if o.KnownNodes > 0 && o.Registry != RegistryFile {
		bad("known-nodes", o.KnownNodes, "needs --registry file")
	}
	if o.StateDir != "" {
		if st, err := os.Stat(o.StateDir); err != nil {
			bad("state-dir", o.StateDir, err.Error())
		} else if !st.IsDir() {
			bad("state-dir", o.StateDir, "not a directory")
		}
	}
	return errors.Join(errs...)
}

// Percentiles summarise a distribution, in seconds.
type Percentiles struct {
	P50 float64 `json:"p50_seconds"`
	P95 float64 `json:"p95_seconds"`
	P99 float64 `json:"p99_seconds"`
	Max float64 `json:"max_seconds"`
}

// StageLatency is the latency of one pipeline stage.
type StageLatency struct {
	// Stage names the stage: queue_wait, inventory, gencsr, helper,
	// configure, restart.
	Stage string `json:"stage"`
	// Count is the number of observations.
	Count uint64 `json:"count"`
	// MeanMS is the exact mean in milliseconds.
	MeanMS float64 `json:"mean_ms"`
	// P95MS is the 95th percentile in milliseconds: exact when Source is
	// "measured", interpolated inside the histogram bucket when Source is
	// "histogram".
	P95MS float64 `json:"p95_ms"`
	// Source says where the figures come from: measured (every duration
	// recorded) or histogram (the provisioner's metrics).
	Source string `json:"source"`
	// Metric is the provisioner metric behind a histogram figure.
	Metric string `json:"metric,omitempty"`
}

// Machine describes where the run happened.
type Machine struct {
	CPUs      int `json:"cpus"`
	GOMAXPROC int `json:"gomaxprocs"`
	// GOGC is the garbage collector's percentage (the GOGC environment
	// variable; -1 when off): with thousands of simulated agents in one
	// process, the collector's share of the CPU depends on it.
	GOGC   int    `json:"gogc"`
	GOOS   string `json:"goos"`
	GOARCH string `json:"goarch"`
	Go     string `json:"go"`
	// Use is how its CPUs were spent during the provisioning phase
	// (/proc/stat; nil where there is none).
	Use *MachineUse `json:"use,omitempty"`
}

// Result is what a benchmark run reports.
type Result struct {
	Machine   Machine `json:"machine"`
	Nodes     int     `json:"nodes"`
	Workers   int     `json:"workers"`
	Helper    string  `json:"helper"`
	HelperCmd string  `json:"helper_cmd,omitempty"`
	Arrival   string  `json:"arrival"`
	Rate      float64 `json:"rate_per_second,omitempty"`
	KeyType   string  `json:"key_type"`
	Transport string  `json:"transport"`
	// StateDir is where the agents' state directories were.
	StateDir string `json:"state_dir"`
	// Processes says every agent was its own muster-agent process.
	Processes bool `json:"processes"`
	// FleetProcess says every agent ran in one other process, the fleet
	// host.
	FleetProcess bool `json:"fleet_process"`
	// Registry is where the provisioner kept its identity registry (file,
	// memory, or kv in the ha modes), KnownNodes how many identities it
	// held before the run.
	Registry   string `json:"registry"`
	KnownNodes int    `json:"known_nodes"`
	// HA is the provisioners' ha.mode and Provisioners how many ran.
	HA           string `json:"ha"`
	Provisioners int    `json:"provisioners"`
	// ProvisionedBy is how many nodes each provisioner provisioned (its
	// muster_provisioner_provisioned_total), in order.
	ProvisionedBy []int `json:"provisioned_by"`
	// ProductionConnections says what a production connection is in this
	// run: "TCP + mutual TLS" or "in-process + mutual TLS".
	ProductionConnections string `json:"production_connections"`

	// Provisioned counts nodes that reached production mode.
	Provisioned int `json:"provisioned"`
	// NotProvisioned counts nodes that did not within the timeout.
	NotProvisioned int `json:"not_provisioned"`
	// Duplicates counts identities the provisioner reported provisioned
	// more than once; DuplicateIdentities names up to 20 of them.
	Duplicates          int      `json:"duplicates"`
	DuplicateIdentities []string `json:"duplicate_identities,omitempty"`
	// ProductionReconnects counts production-mode connections beyond the
	// first per identity (in-process agents only: with --processes the
	// bench sees arrivals, one per lifecycle event ID, and a reconnection
	// repeats its ID).
	ProductionReconnects int `json:"production_reconnects"`

	// Seconds runs from the first agent's start to the last node's
	// production connection.
	Seconds     float64 `json:"seconds"`
	NodesPerMin float64 `json:"nodes_per_min"`
	// TimeToProduction runs from each agent's start to its production
	// connection.
	TimeToProduction Percentiles    `json:"time_to_production"`
	Stages           []StageLatency `json:"stages"`

	// CPUSeconds is this process's user+sys CPU during the provisioning
	// phase; ChildCPUSeconds that of its helper processes: exec'd helpers
	// reaped in it, and a persistent helper's (which runs throughout).
	CPUSeconds            float64 `json:"cpu_seconds"`
	ChildCPUSeconds       float64 `json:"child_cpu_seconds"`
	CPUMillisPerNode      float64 `json:"cpu_ms_per_node"`
	ChildCPUMillisPerNode float64 `json:"child_cpu_ms_per_node"`
	PeakRSSMB             float64 `json:"peak_rss_mb"`
	// AgentProcesses counts the agent processes alive when the last node
	// reached production; AgentCPUMillisPerNode is their CPU (read from
	// /proc, re-executions included) per provisioned node, and
	// AgentProcessRSSMB their mean resident memory, idle in production.
	AgentProcesses        int     `json:"agent_processes,omitempty"`
	AgentCPUSeconds       float64 `json:"agent_cpu_seconds,omitempty"`
	AgentCPUMillisPerNode float64 `json:"agent_cpu_ms_per_node,omitempty"`
	AgentProcessRSSMB     float64 `json:"agent_process_rss_mb,omitempty"`
	// FleetProcessRSSMB is the fleet host's resident memory once every
	// node is in production (FleetProcess), for all its agents.
	FleetProcessRSSMB float64 `json:"fleet_process_rss_mb,omitempty"`
	// ProvisioningSide is what the provisioning side alone cost, when the
	// agents ran outside this process (Processes or FleetProcess).
	ProvisioningSide    *ProvisioningSide `json:"provisioning_side,omitempty"`
	IdleAgents          int               `json:"idle_agents"`
	IdleAgentHeapBytes  float64           `json:"idle_agent_heap_bytes"`
	IdleAgentGoroutines float64           `json:"idle_agent_goroutines"`
	// Live heap (HeapAlloc after two GCs: bytes of reachable objects, not
	// the spans holding them) and goroutines before the provisioning
	// phase's fleet is built (the baseline), once every node is in
	// production (fleet still up), and after the fleet was torn down: after
	// a storm both come back to the baseline when nothing leaks.
	HeapLiveBeforeMB       float64 `json:"heap_live_before_mb"`
	GoroutinesBefore       int     `json:"goroutines_before"`
	HeapLiveAtEndMB        float64 `json:"heap_live_at_end_mb"`
	GoroutinesAtEnd        int     `json:"goroutines_at_end"`
	HeapLiveAfterMB        float64 `json:"heap_live_after_mb"`
	GoroutinesAfterCleanup int     `json:"goroutines_after_cleanup"`
	// HeapLiveSettledMB is the live heap once it stopped falling after
	// cleanup, HeapSettleSeconds how long that took (Options.HeapSettle;
	// both zero when it did not run). HeapSettled is false when the heap
	// was still falling at the bound.
	HeapLiveSettledMB float64 `json:"heap_live_settled_mb,omitempty"`
	HeapSettleSeconds float64 `json:"heap_settle_seconds,omitempty"`
	HeapSettled       bool    `json:"heap_settled,omitempty"`

	// Outcomes counts provisioner attempt outcomes (provisioned,
	// deferred, failed, shutdown).
	Outcomes map[string]int `json:"outcomes"`
	// FailedByStage counts failed attempts by the stage they failed in,
	// as seen by the Observer.
	FailedByStage map[string]int `json:"failed_by_stage,omitempty"`
	// Errors and Retries are the provisioner's errors_total and
	// retries_total by stage (zero stages left out).
	Errors  map[string]float64 `json:"errors_total,omitempty"`
	Retries map[string]float64 `json:"retries_total,omitempty"`
	// ClaimsLost and ClaimConflicts are the ha modes' claims_lost_total
	// by stage (attempts stopped because their claim lapsed) and
	// claim_conflicts_total (nodes dequeued that another provisioner
	// held or had finished), over every provisioner.
	ClaimsLost     map[string]float64 `json:"claims_lost_total,omitempty"`
	ClaimConflicts float64            `json:"claim_conflicts_total"`
	// QueueShed is the provisioners' queue_shed_total (announcements
	// dropped with the queue full) and IntakeDropped their
	// intake_dropped_total by source (dropped before they were read): a
	// node whose announcement was dropped waits for its next one.
	QueueShed     float64            `json:"queue_shed_total"`
	IntakeDropped map[string]float64 `json:"intake_dropped_total,omitempty"`
	// SampleErrors holds the last error of up to 10 nodes.
	SampleErrors map[string]string `json:"sample_errors,omitempty"`

	// Broker is what the provisioning phase cost the broker in messages,
	// bytes and connections (nil where its counters could not be read).
	Broker *BrokerTraffic `json:"broker,omitempty"`

	// Floor is what a node costs at least on this machine, measured just
	// before the provisioning phase (nil when skipped or when it could not
	// be measured: FloorError says why).
	Floor      *Floor `json:"floor,omitempty"`
	FloorError string `json:"floor_error,omitempty"`

	// Restart is the broker restart after provisioning (--restart-broker).
	Restart *BrokerRestart `json:"broker_restart,omitempty"`
}

// ProvisioningSide is the CPU this process (broker and provisioner) and its
// helpers spent per node: what a provisioning host carries when the
// agents run on their own machines, and the nodes/min that would give on
// this machine's cores. Here the broker is the production broker too, so
// it includes the broker's side of every production connection, which a
// deployment's production brokers carry.
type ProvisioningSide struct {
	MillisPerNode float64 `json:"cpu_ms_per_node"`
	Cores         int     `json:"cores"`
	NodesPerMin   float64 `json:"nodes_per_min"`
}

// provisioningSide fills in ProvisioningSide from the run's CPU figures.
func (r *Result) provisioningSide() {
	if !r.Processes && !r.FleetProcess || r.Provisioned == 0 {
		return
	}
	ms := r.CPUMillisPerNode + r.ChildCPUMillisPerNode
	if ms <= 0 {
		return
	}
	r.ProvisioningSide = &ProvisioningSide{MillisPerNode: ms, Cores: r.Machine.CPUs, NodesPerMin: float64(r.Machine.CPUs) * 60000 / ms}
}

// cpuPerNode is the CPU a node cost the machine in this run: its busy time
// per node where /proc/stat has it (everything, attributed to a process or
// not), else this process's, its helpers' and its agent processes' CPU.
func (r *Result) cpuPerNode() float64 {
	if u := r.Machine.Use; u != nil && u.BusyMillisPerNode > 0 {
		return u.BusyMillisPerNode
	}
	return r.CPUMillisPerNode + r.ChildCPUMillisPerNode + r.AgentCPUMillisPerNode
}

// OK reports whether every node was provisioned exactly once, and came
// back after a broker restart when there was one.
func (r *Result) OK() bool {
	back := r.Restart == nil || r.Restart.Reconnected >= r.Restart.Nodes
	return r.NotProvisioned == 0 && r.Duplicates == 0 && back
}

// recorder collects what the fleet's callbacks report.
type recorder struct {
	mu          sync.Mutex
	started     map[string]time.Time
	production  map[string]time.Time
	prodConns   map[string]int
	provisioned map[string]int
	outcomes    map[string]int
	failedStage map[string]int
	lastErr     map[string]string
	helperDur   []time.Duration
	newProd     chan struct{}
	bar         *progress.Meter
}

func newRecorder(n int) *recorder {
	return &recorder{
		started:     make(map[string]time.Time, n),
		production:  make(map[string]time.Time, n),
		prodConns:   make(map[string]int, n),
		provisioned: make(map[string]int, n),
		outcomes:    map[string]int{},
		failedStage: map[string]int{},
		lastErr:     map[string]string{},
		helperDur:   make([]time.Duration, 0, n),
		newProd:     make(chan struct{}, 1),
	}
}

func (r *recorder) agentStarted(id string, at time.Time) {
	r.mu.Lock()
	r.started[id] = at
	r.mu.Unlock()
}

func (r *recorder) modeChanged(id string, m agent.Mode, at time.Time) {
	if m != agent.ModeProduction {
		return
	}
	r.mu.Lock()
	r.prodConns[id]++
	first := r.prodConns[id] == 1
	if first {
		r.production[id] = at
		// Under r.mu, so that a count that includes the node includes
		// it on the progress line too (the meter has its own lock).
		if r.bar != nil {
			r.bar.Add(1)
		}
	}
	r.mu.Unlock()
	if !first {
		return
	}
	select {
	case r.newProd <- struct{}{}:
	default:
	}
}

func (r *recorder) nodeDone(id string, out provisioner.Outcome, stage provisioner.Stage, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.outcomes[string(out)]++
	switch out {
	case provisioner.OutcomeProvisioned:
		r.provisioned[id]++
	case provisioner.OutcomeFailed:
		r.failedStage[string(stage)]++
	}
	if err != nil {
		r.lastErr[id] = err.Error()
	}
}

func (r *recorder) productionCount() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.production)
}

// timedHelper measures every helper run.
type timedHelper struct {
	h   helper.Helper
	rec *recorder
}

func (t timedHelper) Provision(ctx context.Context, req *helper.Request) (*helper.Reply, error) {
	start := time.Now()
	rep, err := t.h.Provision(ctx, req)
	d := time.Since(start)
	t.rec.mu.Lock()
	t.rec.helperDur = append(t.rec.helperDur, d)
	t.rec.mu.Unlock()
	return rep, err
}

// Run runs the benchmark: the idle-memory phase (unless skipped), then the
// provisioning phase. It returns the result even when some nodes were not
// provisioned (see Result.OK); errors are for runs that could not happen.
func Run(ctx context.Context, o Options) (*Result, error) {
	if err := o.Validate(); err != nil {
		return nil, err
	}
	res := &Result{
		Machine: Machine{
			CPUs: runtime.NumCPU(), GOMAXPROC: runtime.GOMAXPROCS(0), GOGC: gcPercent(),
			GOOS: runtime.GOOS, GOARCH: runtime.GOARCH, Go: runtime.Version(),
		},
		Nodes: o.Nodes, Workers: o.Workers, Helper: o.Helper, HelperCmd: o.HelperCmd,
		Arrival: o.Arrival, Rate: o.Rate, KeyType: o.KeyType, Transport: o.Transport,
		ProductionConnections: "TCP + mutual TLS",
		StateDir:              o.StateDir,
		Registry:              o.Registry,
		KnownNodes:            o.KnownNodes,
		HA:                    o.HA,
		Provisioners:          o.Provisioners,
	}
	if res.StateDir == "" {
		res.StateDir = os.TempDir()
	}
	if o.Transport == TransportInProcess {
		res.ProductionConnections = "in-process + mutual TLS"
	}
	idle := o.IdleAgents
	if idle == 0 {
		idle = o.Nodes
	}
	if o.FleetProcess {
		idle = 0 // the idle phase measures agents in this process
		res.FleetProcess = true
	}
	if o.Processes {
		idle = 0 // the idle phase measures in-process agents
		res.Processes = true
		bin, cleanup, err := AgentBinary(ctx, o.AgentBin, o.StateDir)
		if err != nil {
			return nil, err
		}
		defer cleanup()
		o.AgentBin = bin
	}
	if idle > 0 {
		if err := idlePhase(ctx, o, idle, res); err != nil {
			return nil, fmt.Errorf("idle-memory phase: %w", err)
		}
	}
	if err := provisionPhase(ctx, o, res); err != nil {
		return nil, fmt.Errorf("provisioning phase: %w", err)
	}
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err == nil {
		res.PeakRSSMB = maxRSSBytes(ru.Maxrss) / (1 << 20)
	}
	fullGC()
	res.HeapLiveAfterMB, res.GoroutinesAfterCleanup = heapAndGoroutines()
	if o.HeapSettle > 0 {
		settleHeap(ctx, o.HeapSettle, res)
	}
	return res, nil
}

// Settling the heap: it is read every heapSettlePoll, and has settled once
// no reading for heapSettleQuiet fell more than heapSettleFall (a
// fraction) below the lowest before it.
const (
	heapSettlePoll  = 250 * time.Millisecond
	heapSettleQuiet = 5 * time.Second
	heapSettleFall  = 0.01
)

// settleHeap collects until the live heap stops falling, limit has passed
// or ctx ends, and records the lowest reading in res: the run's figures
// stand either way.
func settleHeap(ctx context.Context, limit time.Duration, res *Result) {
	low, took, settled := settle(ctx, res.HeapLiveAfterMB, limit, heapSettlePoll, heapSettleQuiet, func() float64 {
		fullGC()
		h, _ := heapAndGoroutines()
		return h
	})
	res.HeapLiveSettledMB, res.HeapSettleSeconds, res.HeapSettled = low, took.Seconds(), settled
}

// settle reads read every poll, starting from first, until no reading for
// quiet fell more than heapSettleFall below the lowest before it
// (settled), limit has passed or ctx ends. It returns the lowest reading
// and how long it watched.
func settle(ctx context.Context, first float64, limit, poll, quiet time.Duration, read func() float64) (low float64, took time.Duration, settled bool) {
	start := time.Now()
	low, lastFall := first, start
	t := time.NewTicker(poll)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return low, time.Since(start), false
		case <-t.C:
		}
		v := read()
		now := time.Now()
		if v < low*(1-heapSettleFall) {
			lastFall = now
		}
		low = min(low, v)
		took = now.Sub(start)
		if now.Sub(lastFall) >= quiet {
			return low, took, true
		}
		if took >= limit {
			return low, took, false
		}
	}
}

// fleetOptions are the fleet settings both phases share. dir is the
// phase's fresh directory.
func fleetOptions(o Options, nodes int, dir string) demo.Options {
	fo := demo.Options{
		Dir:              dir,
		Nodes:            nodes,
		Workers:          o.Workers,
		KeyType:          o.KeyType,
		HelperTimeout:    o.HelperTimeout,
		DeferBackoff:     o.DeferBackoff,
		RestartSplay:     o.RestartSplay,
		MusterBin:        o.MusterBin,
		Logger:           o.Logger,
		InProcess:        o.Transport == TransportInProcess,
		AgentBin:         o.AgentBin,
		QueueSize:        max(nodes, provisioner.DefaultQueueSize),
		MetadataInterval: o.MetadataInterval,
		FileRegistry:     o.Registry == RegistryFile,
		HA:               o.HA,
		Provisioners:     o.Provisioners,
	}
	if o.FleetProcess {
		fo.FleetHost, fo.FleetHostEnv = o.FleetCommand, o.FleetEnv
	}
	if o.Helper != HelperBuiltin {
		fo.HelperCommand = o.HelperCmd
		fo.HelperPersistent = o.Helper == HelperPersistent
	}
	return fo
}

// idlePhase starts n agents with the provisioner paused, waits until every
// one is connected in provisioning mode, and records the heap they hold.
func idlePhase(ctx context.Context, o Options, n int, res *Result) error {
	var mu sync.Mutex
	connected := make(map[string]bool, n)
	ready := make(chan struct{})
	dir, err := os.MkdirTemp(o.StateDir, "muster-bench-idle-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	fo := fleetOptions(o, n, dir)
	fo.HelperCommand, fo.HelperPersistent = "", false // the paused provisioner never calls it
	fo.StartPaused = true
	fo.OnModeChanged = func(id string, m agent.Mode, _ time.Time) {
		if m != agent.ModeProvisioning {
			return
		}
		mu.Lock()
		defer mu.Unlock()
		if connected[id] {
			return
		}
		connected[id] = true
		if len(connected) == n {
			close(ready)
		}
	}
	f, err := demo.New(fo)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.StartBroker(); err != nil {
		return err
	}
	if o.Progress != nil {
		fmt.Fprintf(o.Progress, "idle phase: starting %d agents with the provisioner paused\n", n)
	}
	fullGC()
	var before runtime.MemStats
	runtime.ReadMemStats(&before)
	gBefore := runtime.NumGoroutine()
	if err := f.Start(ctx); err != nil {
		return err
	}
	waitCtx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	select {
	case <-ready:
	case <-waitCtx.Done():
		mu.Lock()
		got := len(connected)
		mu.Unlock()
		return fmt.Errorf("%d of %d agents connected: %w", got, n, waitCtx.Err())
	}
	fullGC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	res.IdleAgents = n
	res.IdleAgentHeapBytes = (float64(after.HeapInuse) - float64(before.HeapInuse)) / float64(n)
	res.IdleAgentGoroutines = float64(runtime.NumGoroutine()-gBefore) / float64(n)
	if err := f.Close(); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	return nil
}

// provisionPhase provisions o.Nodes agents and fills in the result.
func provisionPhase(ctx context.Context, o Options, res *Result) error {
	rec := newRecorder(o.Nodes)
	dir, err := os.MkdirTemp(o.StateDir, "muster-bench-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	fo := fleetOptions(o, o.Nodes, dir)
	fo.KnownNodes = o.KnownNodes
	fo.OnAgentStart = rec.agentStarted
	fo.OnModeChanged = rec.modeChanged
	fo.OnNodeDone = rec.nodeDone
	var inner helper.Helper // the helper without the timing, for the floor
	fo.WrapHelper = func(h helper.Helper) helper.Helper {
		if o.WrapHelper != nil {
			h = o.WrapHelper(h)
		}
		inner = h
		return timedHelper{h: h, rec: rec}
	}
	if o.Arrival == ArrivalRamp {
		step := float64(time.Second) / o.Rate
		fo.AgentDelay = func(i int) time.Duration { return time.Duration(float64(i) * step) }
	}
	fullGC()
	res.HeapLiveBeforeMB, res.GoroutinesBefore = heapAndGoroutines()
	f, err := demo.New(fo)
	if err != nil {
		return err
	}
	defer f.Close()
	// Broker, provisioner and the simulated machines (state directories,
	// tokens, agents or agent command lines) are made before the clock and
	// the CPU count start: the run measures provisioning.
	if err := f.Prepare(); err != nil {
		return err
	}
	if !o.NoFloor {
		if o.Progress != nil {
			fmt.Fprintln(o.Progress, "measuring the floor (what a node costs at least on this machine)")
		}
		ff := floorFleet{f: f, helper: inner, keyType: o.KeyType, inProcess: o.Transport == TransportInProcess}
		if o.Processes {
			ff.agentBin = o.AgentBin
		}
		if res.Floor, err = measureFloor(ctx, ff); err != nil {
			// The run measures without it: the floor is context.
			res.Floor, res.FloorError = nil, err.Error()
		}
	}
	if o.Progress != nil {
		fmt.Fprintf(o.Progress, "provisioning %d agents: %s arrival, helper %s, %d workers, %s transport\n",
			o.Nodes, o.Arrival, o.Helper, o.Workers, o.Transport)
		rec.mu.Lock()
		rec.bar = progress.New(o.Progress, o.Nodes, progress.Options{Description: "provisioning", Unit: "nodes"})
		defer rec.bar.Done() // on an early return; Done again is nothing
		rec.mu.Unlock()
	}

	var ruBefore, chBefore syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ruBefore)
	_ = syscall.Getrusage(syscall.RUSAGE_CHILDREN, &chBefore)
	// Live children before the agents start: a persistent helper (agent
	// processes and the fleet host are counted on their own).
	liveBefore := liveChildrenCPU(f.AgentPIDs()...)
	m0 := readMachineTimes()
	b0 := readBrokerCounters(f.Broker())
	if err := f.Start(ctx); err != nil {
		return err
	}
	waitCtx, cancel := context.WithTimeout(ctx, o.Timeout)
	defer cancel()
	for rec.productionCount() < o.Nodes && waitCtx.Err() == nil {
		t := time.NewTimer(500 * time.Millisecond)
		select {
		case <-waitCtx.Done():
		case <-rec.newProd:
		case <-t.C:
		}
		t.Stop()
	}
	var ruAfter, chAfter syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &ruAfter)
	_ = syscall.Getrusage(syscall.RUSAGE_CHILDREN, &chAfter)
	res.Machine.Use = machineUse(m0, readMachineTimes(), runtime.NumCPU(), rec.productionCount())
	res.Broker = brokerTraffic(b0, readBrokerCounters(f.Broker()), rec.productionCount())
	// The agent processes are children too, counted on their own below.
	helperLive := liveChildrenCPU(f.AgentPIDs()...) - liveBefore
	if o.Processes {
		ps, err := f.ProcessStats()
		if err != nil {
			return fmt.Errorf("agent processes: %w", err)
		}
		res.AgentProcesses = ps.Processes
		res.AgentCPUSeconds = ps.CPUSeconds
		if ps.Processes > 0 {
			res.AgentProcessRSSMB = ps.RSSBytes / float64(ps.Processes) / (1 << 20)
		}
	}
	if o.FleetProcess {
		hs, ok, err := f.HostStats()
		if err != nil || !ok {
			return fmt.Errorf("fleet process: not running at the end of the run (%v)", err)
		}
		res.AgentProcesses = hs.Processes
		res.AgentCPUSeconds = hs.CPUSeconds
		res.FleetProcessRSSMB = hs.RSSBytes / (1 << 20)
	}
	if o.Progress != nil {
		rec.mu.Lock()
		bar := rec.bar
		rec.mu.Unlock()
		bar.Done()
	}
	if o.Settle > 0 && ctx.Err() == nil {
		t := time.NewTimer(o.Settle)
		select {
		case <-ctx.Done():
		case <-t.C:
		}
		t.Stop()
	}
	if o.RestartBroker && ctx.Err() == nil && rec.productionCount() == o.Nodes {
		if o.Progress != nil {
			fmt.Fprintf(o.Progress, "restarting the broker under %d nodes in production\n", o.Nodes)
		}
		if res.Restart, err = restartPhase(ctx, f, o.Nodes, o.Timeout); err != nil {
			return err
		}
	}
	metrics, gatherErr := gatherMetrics(f.Provisioners()...)
	fullGC()
	res.HeapLiveAtEndMB, res.GoroutinesAtEnd = heapAndGoroutines()
	if err := f.Close(); err != nil && !errors.Is(err, context.Canceled) {
		return err
	}
	if gatherErr != nil {
		return fmt.Errorf("provisioner metrics: %w", gatherErr)
	}

	res.CPUSeconds = cpuSeconds(ruAfter) - cpuSeconds(ruBefore)
	res.ChildCPUSeconds = cpuSeconds(chAfter) - cpuSeconds(chBefore) + helperLive.Seconds()
	fill(res, rec, metrics)
	res.provisioningSide()
	if res.Floor != nil && res.Floor.NodesPerMin > 0 {
		res.Floor.Efficiency = res.NodesPerMin / res.Floor.NodesPerMin
		if all := res.cpuPerNode(); all > 0 {
			res.Floor.CPUShare = res.Floor.MillisPerNode / all
		}
	}
	return nil
}

// fill turns the recorder's data and the provisioner metrics into figures.
func fill(res *Result, rec *recorder, m *provMetrics) {
	rec.mu.Lock()
	defer rec.mu.Unlock()
	res.Provisioned = len(rec.production)
	res.NotProvisioned = res.Nodes - res.Provisioned
	res.ProvisionedBy = m.provisioned
	var first, last time.Time
	for _, t := range rec.started {
		if first.IsZero() || t.Before(first) {
			first = t
		}
	}
	lat := make([]float64, 0, len(rec.production))
	for id, at := range rec.production {
		if at.After(last) {
			last = at
		}
		if s, ok := rec.started[id]; ok {
			lat = append(lat, max(0, at.Sub(s).Seconds()))
		}
	}
	if !first.IsZero() && last.After(first) {
		res.Seconds = last.Sub(first).Seconds()
		res.NodesPerMin = float64(res.Provisioned) / last.Sub(first).Minutes()
	}
	sort.Float64s(lat)
	res.TimeToProduction = Percentiles{
		P50: quantile(lat, 0.50), P95: quantile(lat, 0.95),
		P99: quantile(lat, 0.99), Max: quantile(lat, 1),
	}
	for id, n := range rec.provisioned {
		if n > 1 {
			res.Duplicates++
			res.DuplicateIdentities = append(res.DuplicateIdentities, id)
		}
	}
	slices.Sort(res.DuplicateIdentities)
	if len(res.DuplicateIdentities) > 20 {
		res.DuplicateIdentities = res.DuplicateIdentities[:20]
	}
	for _, n := range rec.prodConns {
		if n > 1 {
			res.ProductionReconnects += n - 1
		}
	}
	if res.Provisioned > 0 {
		res.CPUMillisPerNode = res.CPUSeconds * 1000 / float64(res.Provisioned)
		res.ChildCPUMillisPerNode = res.ChildCPUSeconds * 1000 / float64(res.Provisioned)
		res.AgentCPUMillisPerNode = res.AgentCPUSeconds * 1000 / float64(res.Provisioned)
	}
	res.Outcomes = maps(rec.outcomes)
	if len(rec.failedStage) > 0 {
		res.FailedByStage = maps(rec.failedStage)
	}
	ids := make([]string, 0, len(rec.lastErr))
	for id := range rec.lastErr {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		if res.SampleErrors == nil {
			res.SampleErrors = map[string]string{}
		}
		if len(res.SampleErrors) == 10 {
			break
		}
		res.SampleErrors[id] = rec.lastErr[id]
	}

	res.Stages = append(res.Stages, m.stage("queue_wait", metricQueueWait, ""))
	for _, a := range []string{"inventory", "gencsr"} {
		res.Stages = append(res.Stages, m.stage(a, metricRPC, a))
	}
	hd := make([]float64, len(rec.helperDur))
	var sum float64
	for i, d := range rec.helperDur {
		hd[i] = d.Seconds()
		sum += hd[i]
	}
	sort.Float64s(hd)
	hs := StageLatency{Stage: "helper", Count: uint64(len(hd)), Source: "measured"}
	if len(hd) > 0 {
		hs.MeanMS = sum / float64(len(hd)) * 1000
		hs.P95MS = quantile(hd, 0.95) * 1000
	}
	res.Stages = append(res.Stages, hs)
	for _, a := range []string{"configure", "restart"} {
		res.Stages = append(res.Stages, m.stage(a, metricRPC, a))
	}
	res.Errors = nonZero(m.errors)
	res.Retries = nonZero(m.retries)
	res.ClaimsLost = nonZero(m.claimsLost)
	res.ClaimConflicts = m.claimConflicts
	res.QueueShed = m.shed
	res.IntakeDropped = nonZero(m.intakeDropped)
}

func maps(m map[string]int) map[string]int {
	out := make(map[string]int, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func nonZero(m map[string]float64) map[string]float64 {
	var out map[string]float64
	for k, v := range m {
		if v == 0 {
			continue
		}
		if out == nil {
			out = map[string]float64{}
		}
		out[k] = v
	}
	return out
}

// quantile returns the q quantile of sorted values (nearest rank).
func quantile(sorted []float64, q float64) float64 {
	if len(sorted) == 0 {
		return 0
	}
	i := int(q*float64(len(sorted))+0.5) - 1
	return sorted[min(max(i, 0), len(sorted)-1)]
}

func cpuSeconds(ru syscall.Rusage) float64 {
	return float64(ru.Utime.Sec+ru.Stime.Sec) + float64(ru.Utime.Usec+ru.Stime.Usec)/1e6
}

// maxRSSBytes converts ru_maxrss (KiB on Linux) to bytes.
func maxRSSBytes(v int64) float64 {
	if runtime.GOOS == "darwin" {
		return float64(v)
	}
	return float64(v) * 1024
}

// heapAndGoroutines returns the live heap in MiB and the goroutine count.
func heapAndGoroutines() (float64, int) {
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return float64(ms.HeapAlloc) / (1 << 20), runtime.NumGoroutine()
}

// fullGC collects twice, so objects parked in sync.Pool victim caches are
// freed too and heap figures compare like with like.
func fullGC() {
	runtime.GC()
	runtime.GC()
}

// gcPercent returns the garbage collector's current percentage.
func gcPercent() int {
	v := debug.SetGCPercent(-1)
	debug.SetGCPercent(v)
	return v
}
