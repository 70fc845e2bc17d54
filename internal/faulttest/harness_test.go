package faulttest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"

	"github.com/muster-io/muster/agent"
	"github.com/muster-io/muster/agent/config"
	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/claims"
	"github.com/muster-io/muster/internal/fsutil"
	"github.com/muster-io/muster/internal/natstest"
	"github.com/muster-io/muster/internal/nodestate"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/token"
	"github.com/muster-io/muster/provisioner"
)

// Settings every fault test deployment uses: short leases and intervals so
// failover happens in seconds.
const (
	fleetSize       = 1000
	lease           = 2 * time.Second
	workers         = 16
	rpcTimeout      = 2 * time.Second
	helperTimeout   = 3 * time.Second
	metadataEvery   = 3 * time.Second
	aliveInterval   = 5 * time.Second
	discoveryEvery  = 15 * time.Second
	identityFormat  = "node%05d.fault.test"
	adminCN         = "faulttest-admin"
	convergeTimeout = 150 * time.Second
)

// identity is the name of node i.
func identity(i int) string { return fmt.Sprintf(identityFormat, i) }

// waitFor polls cond every interval until it holds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", timeout, what)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// proc is a process of the deployment, in its own process group (killed
// whole), killed at cleanup if still running.
type proc struct {
	name string
	cmd  *exec.Cmd
	done chan struct{}
}

// spawn starts bin with args; its output goes to logFile. It is killed at
// cleanup, and its output's end logged when the test failed.
func spawn(t *testing.T, name, bin string, args, env []string, logFile string) *proc {
	t.Helper()
	p, err := spawnErr(name, bin, args, env, logFile)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			logTail(t, name, logFile)
		}
	})
	return p
}

// spawnErr starts a process without registering its cleanup (for
// goroutines other than the test's: the deployment kills what it tracks).
func spawnErr(name, bin string, args, env []string, logFile string) (*proc, error) {
	out, err := os.OpenFile(logFile, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, err
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = out, out
	// Its own process group, so a kill reaches its children (helpers);
	// and it dies with the test binary.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		out.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &proc{name: name, cmd: cmd, done: make(chan struct{})}
	go func() {
		_ = cmd.Wait()
		out.Close()
		close(p.done)
	}()
	return p, nil
}

// cpu is the user+system CPU the process used (once it has exited).
func (p *proc) cpu() time.Duration {
	if !p.exited() || p.cmd.ProcessState == nil {
		return 0
	}
	return p.cmd.ProcessState.UserTime() + p.cmd.ProcessState.SystemTime()
}

// logTail logs the end of a process's output for a failed test.
func logTail(t *testing.T, name, file string) {
	b, err := os.ReadFile(file)
	if err != nil || len(b) == 0 {
		return
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	t.Logf("--- last lines of %s (%s):\n%s", name, file, strings.Join(lines[max(0, len(lines)-15):], "\n"))
}

// kill sends SIGKILL to the process group and waits for the process.
func (p *proc) kill() {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
	<-p.done
}

// stop sends SIGTERM and waits up to grace, then kills.
func (p *proc) stop(grace time.Duration) {
	_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(grace):
		p.kill()
	}
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// testPKI is every credential of a deployment.
type testPKI struct {
	dir                      string
	caDir, caFile, caKeyFile string
	ca                       *ca.CA
	brokerCert, brokerKey    string
	adminCert, adminKey      string
	routeCA                  *ca.CA
	routeCAFile              string
	issuerSeedFile           string
	issuerPub                string
	issuer                   *token.Issuer
}

func newPKI(t *testing.T, dir string) *testPKI {
	t.Helper()
	ca.Silence()
	p := &testPKI{dir: dir, caDir: filepath.Join(dir, "ca")}
	var err error
	if p.ca, err = ca.Init(p.caDir, "Muster fault test CA", 0); err != nil {
		t.Fatal(err)
	}
	p.caFile, p.caKeyFile = filepath.Join(p.caDir, ca.CertFile), filepath.Join(p.caDir, ca.KeyFile)
	pkiDir := filepath.Join(dir, "pki")
	issue := func(c *ca.CA, cn, name string) (string, string) {
		is, err := c.Issue(cn, []string{cn, "localhost", "127.0.0.1"})
		if err != nil {
			t.Fatal(err)
		}
		cert, key, err := c.WriteIssued(pkiDir, name, is)
		if err != nil {
			t.Fatal(err)
		}
		return cert, key
	}
	p.brokerCert, p.brokerKey = issue(p.ca, "localhost", "broker")
	p.adminCert, p.adminKey = issue(p.ca, adminCN, "admin")
	routeDir := filepath.Join(dir, "route-ca")
	if p.routeCA, err = ca.Init(routeDir, "Muster fault test route CA", 0); err != nil {
		t.Fatal(err)
	}
	p.routeCAFile = filepath.Join(routeDir, ca.CertFile)
	seed, pub, err := token.GenerateIssuerSeed()
	if err != nil {
		t.Fatal(err)
	}
	p.issuerSeedFile, p.issuerPub = filepath.Join(pkiDir, "token-issuer.nk"), pub
	if err := fsutil.WriteFileAtomic(p.issuerSeedFile, seed, 0o600); err != nil {
		t.Fatal(err)
	}
	if p.issuer, err = token.NewIssuer(seed); err != nil {
		t.Fatal(err)
	}
	return p
}

// brokerNode is one `muster broker` of the cluster.
type brokerNode struct {
	name, config, clientURL, monitorURL, logFile string
	proc                                         *proc
}

// provNode is one `muster provisioner`.
type provNode struct {
	name, config, seedFile, pub, monitorURL, logFile string
	port                                             int
	proc                                             *proc
}

// deployment is one fault test's cluster, provisioners and fleet.
type deployment struct {
	t       *testing.T
	bin     programs
	dir     string
	pki     *testPKI
	brokers []*brokerNode
	provs   []*provNode
	fleet   *proc
	// summaryFile is where fleetsim writes its summary at exit.
	summaryFile string
	ids         []string
	// victims are nodes run as muster-agent processes (agent kill test).
	victims map[string]bool
	arr     *arrivals
	// procs are every process started, for the CPU figures and the final
	// kill; closed is set when the deployment is torn down.
	mu     sync.Mutex
	procs  []*proc
	closed bool
	// beforeDisks, when set, runs in verify before the state directories
	// are read (to stop processes the fleet does not own).
	beforeDisks func()
	kv          *nats.Conn
	js          jetstream.JetStream
	started     time.Time
}

// provOpts choose a provisioner's helper.
type provOpts struct {
	// helper is an exec'd helper command line; empty uses the built-in
	// cfssl helper.
	helper     string
	persistent bool
}

// newDeployment writes the credentials and configurations of three
// brokers and n provisioners (with the built-in helper; writeProvisioner
// changes that) and starts the brokers.
func newDeployment(t *testing.T, provisioners int) *deployment {
	t.Helper()
	begin := time.Now()
	d := &deployment{t: t, bin: bins(t), dir: t.TempDir(), victims: map[string]bool{}}
	t.Cleanup(func() {
		// Last of the cleanups: kill whatever is still running, also
		// processes started from other goroutines (restarted victims).
		d.mu.Lock()
		d.closed = true
		procs := append([]*proc(nil), d.procs...)
		d.mu.Unlock()
		for _, p := range procs {
			p.kill()
		}
		cpu := map[string]time.Duration{}
		for _, p := range procs {
			cpu[strings.TrimRight(strings.SplitN(p.name, "-", 2)[0], "0123456789")] += p.cpu()
		}
		t.Logf("CPU used (user+system): %v", cpu)
		if !t.Failed() {
			return
		}
		logs, _ := filepath.Glob(filepath.Join(d.dir, "*.log"))
		for _, f := range logs {
			logTail(t, filepath.Base(f), f)
		}
	})
	d.pki = newPKI(t, d.dir)
	free := natstest.NewPorts(t)
	defer free.Release()
	for i := range provisioners {
		kp, err := nkeys.CreateUser()
		if err != nil {
			t.Fatal(err)
		}
		seed, _ := kp.Seed()
		pub, _ := kp.PublicKey()
		p := &provNode{name: fmt.Sprintf("prov-%d", i), pub: pub, port: free.Next()}
		p.seedFile = filepath.Join(d.dir, "pki", p.name+".nk")
		if err := fsutil.WriteFileAtomic(p.seedFile, seed, 0o600); err != nil {
			t.Fatal(err)
		}
		d.provs = append(d.provs, p)
	}
	d.writeBrokers(free)
	for _, p := range d.provs {
		d.writeProvisioner(p, provOpts{})
	}
	free.Release()
	for _, b := range d.brokers {
		d.startBroker(b)
	}
	waitFor(t, 60*time.Second, "the cluster (every broker healthy, JetStream meta leader)", func() bool {
		for _, b := range d.brokers {
			if b.proc.exited() {
				t.Fatalf("%s exited", b.name)
			}
			if !healthy(b.monitorURL + "/healthz") {
				return false
			}
		}
		return true
	})
	d.arr = watchArrivals(t, d)
	t.Logf("cluster up in %.1fs", time.Since(begin).Seconds())
	return d
}

func healthy(url string) bool {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get(url)
	if err != nil {
		return false
	}
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

func writeYAML(t *testing.T, path string, v any) {
	t.Helper()
	// JSON is YAML; the configurations are decoded strictly either way.
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := fsutil.WriteFileAtomic(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

func (d *deployment) brokerURLs() []string {
	var out []string
	for _, b := range d.brokers {
		out = append(out, b.clientURL)
	}
	return out
}

func (d *deployment) provisionerKeys() []string {
	var out []string
	for _, p := range d.provs {
		out = append(out, p.pub)
	}
	return out
}

func (d *deployment) writeBrokers(free *natstest.Ports) {
	t := d.t
	names := []string{"broker-a", "broker-b", "broker-c"}
	var routes []string
	routePorts := make([]int, len(names))
	for i := range names {
		routePorts[i] = free.Next()
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", routePorts[i]))
	}
	for i, name := range names {
		is, err := d.pki.routeCA.Issue(name, []string{name, "localhost", "127.0.0.1"})
		if err != nil {
			t.Fatal(err)
		}
		routeCert, routeKey, err := d.pki.routeCA.WriteIssued(filepath.Join(d.dir, "pki"), "route-"+name, is)
		if err != nil {
			t.Fatal(err)
		}
		client, monitor := free.Next(), free.Next()
		b := &brokerNode{
			name:       name,
			config:     filepath.Join(d.dir, name+".yaml"),
			clientURL:  fmt.Sprintf("tls://127.0.0.1:%d", client),
			monitorURL: fmt.Sprintf("http://127.0.0.1:%d", monitor),
			logFile:    filepath.Join(d.dir, name+".log"),
		}
		writeYAML(t, b.config, map[string]any{
			"listen":         fmt.Sprintf("127.0.0.1:%d", client),
			"store_dir":      filepath.Join(d.dir, name),
			"monitor_listen": fmt.Sprintf("127.0.0.1:%d", monitor),
			"tls":            map[string]string{"cert": d.pki.brokerCert, "key": d.pki.brokerKey, "ca": d.pki.caFile},
			"provisioners":   d.provisionerKeys(),
			"admins":         []string{adminCN},
			"token_issuers":  []string{d.pki.issuerPub},
			"loglevel":       "warn",
			"logfile":        b.logFile,
			"cluster": map[string]any{
				"name":        "faulttest",
				"server_name": name,
				"listen":      fmt.Sprintf("127.0.0.1:%d", routePorts[i]),
				"routes":      routes,
				"tls":         map[string]string{"cert": routeCert, "key": routeKey, "ca": d.pki.routeCAFile},
				"peer_names":  names,
			},
			"jetstream": map[string]int{"replicas": 3},
		})
		d.brokers = append(d.brokers, b)
	}
}

// track records a process for the CPU figures and the final kill; one
// started once the deployment is torn down is killed at once.
func (d *deployment) track(p *proc) {
	d.mu.Lock()
	closed := d.closed
	d.procs = append(d.procs, p)
	d.mu.Unlock()
	if closed {
		p.kill()
	}
}

func (d *deployment) startBroker(b *brokerNode) {
	b.proc = spawn(d.t, b.name, d.bin.muster, []string{"broker", "--config", b.config}, nil, b.logFile+".out")
	d.track(b.proc)
}

func (d *deployment) writeProvisioner(p *provNode, o provOpts) {
	t := d.t
	port := p.port
	p.config = filepath.Join(d.dir, p.name+".yaml")
	p.monitorURL = fmt.Sprintf("http://127.0.0.1:%d", port)
	p.logFile = filepath.Join(d.dir, p.name+".log")
	cfg := map[string]any{
		"name":           p.name,
		"brokers":        d.brokerURLs(),
		"tls_ca":         d.pki.caFile,
		"nkey_seed_file": p.seedFile,
		"token_issuers":  []string{d.pki.issuerPub},
		"ha":             map[string]any{"mode": "claims", "lease": lease.String(), "replicas": 3},
		"workers":        workers,
		"interval":       discoveryEvery.String(),
		"rpc_timeout":    rpcTimeout.String(),
		"rpc_retries":    2,
		"helper_timeout": helperTimeout.String(),
		"defer_backoff":  "1s",
		"grace":          "10m",
		"restart_splay":  "200ms",
		"monitor_port":   port,
		"monitor_host":   "127.0.0.1",
		"loglevel":       "info",
		"logfile":        p.logFile,
		"site":           "faulttest",
		"policy":         map[string]string{"ca_file": d.pki.caFile},
	}
	hosts := strings.Join(d.brokerURLs(), ",")
	switch {
	case o.helper != "":
		cfg["helper"] = o.helper
		if o.persistent {
			cfg["helper_mode"] = "persistent"
		}
	default:
		helperCfg := filepath.Join(d.dir, "helper-cfssl.yaml")
		writeYAML(t, helperCfg, map[string]any{
			"ca":               map[string]string{"cert": d.pki.caFile, "key": d.pki.caKeyFile},
			"validity":         "24h",
			"middleware_hosts": hosts,
			"defaults": map[string]string{
				"plugin.choria.randomize_middleware_hosts": "true",
				"plugin.muster.alive_interval":             aliveInterval.String(),
				"plugin.muster.reconnect_wait":             "100ms",
				"plugin.muster.reconnect_max_wait":         "2s",
			},
		})
		cfg["helper_config"] = helperCfg
	}
	writeYAML(t, p.config, cfg)
}

// startProvisioners starts the provisioners (all, or those named) and
// waits until each serves its monitor (it has opened the shared state and
// subscribed by then).
func (d *deployment) startProvisioners(names ...string) {
	t := d.t
	begin := time.Now()
	defer func() { t.Logf("provisioners up in %.1fs", time.Since(begin).Seconds()) }()
	var started []*provNode
	for _, p := range d.provs {
		if len(names) > 0 && !slices.Contains(names, p.name) {
			continue
		}
		p.proc = spawn(t, p.name, d.bin.muster, []string{"provisioner", "--config", p.config}, nil, p.logFile+".out")
		d.track(p.proc)
		started = append(started, p)
	}
	waitFor(t, 60*time.Second, "the provisioners ready", func() bool {
		for _, p := range started {
			if p.proc.exited() {
				t.Fatalf("%s exited; see %s", p.name, p.logFile)
			}
			if !healthy(p.monitorURL + "/healthz") {
				return false
			}
		}
		return true
	})
	if d.kv == nil {
		d.connectKV()
	}
}

// connectKV connects the test's reader of the shared state (as a
// provisioner: the buckets live in the provisioning account).
func (d *deployment) connectKV() {
	t := d.t
	opt, err := nats.NkeyOptionFromSeed(d.provs[0].seedFile)
	if err != nil {
		t.Fatal(err)
	}
	nc, err := nats.Connect(strings.Join(d.brokerURLs(), ","), opt, nats.RootCAs(d.pki.caFile),
		nats.MaxReconnects(-1), nats.ReconnectWait(100*time.Millisecond), nats.Name("faulttest-reader"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(nc.Close)
	js, err := jetstream.New(nc)
	if err != nil {
		t.Fatal(err)
	}
	d.kv, d.js = nc, js
}

// startFleet starts the simulated fleet: nodes [0, fleetSize) except the
// victims, in one fleetsim process.
func (d *deployment) startFleet(first, count int) {
	t := d.t
	for i := first; i < first+count; i++ {
		d.ids = append(d.ids, identity(i))
	}
	d.summaryFile = filepath.Join(d.dir, "fleet-summary.json")
	args := []string{
		"--dir", filepath.Join(d.dir, "nodes"),
		"--identity-format", identityFormat,
		"--first", strconv.Itoa(first), "--count", strconv.Itoa(count),
		"--ca", d.pki.caFile, "--issuer-seed", d.pki.issuerSeedFile,
		"--metadata-interval", metadataEvery.String(), "--alive-interval", aliveInterval.String(),
		"--ramp", "2s", "--summary", d.summaryFile,
		"--logfile", filepath.Join(d.dir, "fleet.log"),
	}
	for _, u := range d.brokerURLs() {
		args = append(args, "--broker", u)
	}
	for _, k := range d.provisionerKeys() {
		args = append(args, "--provisioner-key", k)
	}
	d.started = time.Now()
	d.fleet = spawn(t, "fleetsim", d.bin.fleetsim, args, nil, filepath.Join(d.dir, "fleet.out"))
	d.track(d.fleet)
}

// nodeDir is a node's state directory.
func (d *deployment) nodeDir(id string) string { return filepath.Join(d.dir, "nodes", id) }

// startVictim starts node id as its own muster-agent process (safe from
// any goroutine).
func (d *deployment) startVictim(id string) (*proc, error) {
	tok, _, err := d.pki.issuer.Create(token.Scope{Identity: id, Batch: "faulttest"}, time.Now(), 24*time.Hour)
	if err != nil {
		return nil, err
	}
	args := []string{"run", "--identity", id, "--state-dir", d.nodeDir(id), "--ca", d.pki.caFile, "--provision",
		"--alive-interval", aliveInterval.String(), "--reconnect-wait", "100ms", "--reconnect-max-wait", "2s",
		"--loglevel", "info", "--logfile", filepath.Join(d.dir, "victims", id+".log")}
	for _, u := range d.brokerURLs() {
		args = append(args, "--provisioning-broker", u)
	}
	for _, k := range d.provisionerKeys() {
		args = append(args, "--provisioner-key", k)
	}
	if err := os.MkdirAll(filepath.Join(d.dir, "victims"), 0o700); err != nil {
		return nil, err
	}
	p, err := spawnErr("agent-"+id, d.bin.agent, args, []string{"MUSTER_TOKEN=" + tok}, filepath.Join(d.dir, "victims", id+".out"))
	if err != nil {
		return nil, err
	}
	d.track(p)
	return p, nil
}

// arrival is a node's provisioned event, as the test's subscribers saw it.
type arrival struct {
	id, eventID, serial string
	at                  time.Time
}

// arrivals records the provisioned lifecycle events of the production
// account, on one admin connection per broker (each pinned to its broker:
// an event is seen as long as one of them is up).
type arrivals struct {
	mu sync.Mutex
	// events maps identity → event id → first sighting.
	events map[string]map[string]arrival
	// firsts are the first sighting of each identity, in order.
	firsts []arrival
}

func watchArrivals(t *testing.T, d *deployment) *arrivals {
	t.Helper()
	a := &arrivals{events: map[string]map[string]arrival{}}
	for _, b := range d.brokers {
		nc, err := nats.Connect(b.clientURL, nats.NoReconnect(), nats.DontRandomize(), nats.IgnoreDiscoveredServers(),
			nats.RootCAs(d.pki.caFile), nats.ClientCert(d.pki.adminCert, d.pki.adminKey), nats.Name(adminCN))
		if err != nil {
			t.Fatalf("admin connection to %s: %v", b.name, err)
		}
		t.Cleanup(nc.Close)
		if _, err := nc.Subscribe(protocol.LifecycleSubject(protocol.EventProvisioned, protocol.AgentComponent, ">"), a.handle); err != nil {
			t.Fatal(err)
		}
		if err := nc.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	return a
}

func (a *arrivals) handle(m *nats.Msg) {
	ev, err := protocol.DecodeEvent(m.Data)
	if err != nil || ev.Type != protocol.EventProvisioned {
		return
	}
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	byID := a.events[ev.Identity]
	if byID == nil {
		byID = map[string]arrival{}
		a.events[ev.Identity] = byID
	}
	if _, seen := byID[ev.ID]; seen {
		return
	}
	ar := arrival{id: ev.Identity, eventID: ev.ID, serial: ev.Serial, at: now}
	byID[ev.ID] = ar
	if len(byID) == 1 {
		a.firsts = append(a.firsts, ar)
	}
}

// count is how many distinct nodes arrived.
func (a *arrivals) count() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.firsts)
}

// of returns the distinct arrivals (by event id) of id.
func (a *arrivals) of(id string) []arrival {
	a.mu.Lock()
	defer a.mu.Unlock()
	out := make([]arrival, 0, len(a.events[id]))
	for _, ar := range a.events[id] {
		out = append(out, ar)
	}
	return out
}

// firstAt returns when id first arrived (zero if not yet).
func (a *arrivals) firstAt(id string) time.Time {
	a.mu.Lock()
	defer a.mu.Unlock()
	var first time.Time
	for _, ar := range a.events[id] {
		if first.IsZero() || ar.at.Before(first) {
			first = ar.at
		}
	}
	return first
}

// longestGapAfter is the longest time after t0 without a new node
// arriving: from t0 to the first arrival after it, or between two
// consecutive ones, up to the last arrival.
func (a *arrivals) longestGapAfter(t0 time.Time) time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	prev, gap := t0, time.Duration(0)
	for _, ar := range a.firsts {
		if ar.at.Before(t0) {
			continue
		}
		gap = max(gap, ar.at.Sub(prev))
		prev = ar.at
	}
	return gap
}

// midStorm waits until a fraction of the fleet arrived in production.
func (d *deployment) midStorm(frac float64) {
	n := int(float64(len(d.ids)) * frac)
	waitFor(d.t, convergeTimeout, fmt.Sprintf("%d nodes in production", n), func() bool { return d.arr.count() >= n })
}

// claimsOf lists the nodes a provisioner holds claims on now.
func (d *deployment) claimsOf(owner string) []string {
	t := d.t
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	kv, err := d.js.KeyValue(ctx, claims.DefaultBucket)
	if err != nil {
		t.Fatal(err)
	}
	lister, err := kv.ListKeys(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for key := range lister.Keys() {
		e, err := kv.Get(ctx, key)
		if err != nil {
			continue
		}
		var r claims.Record
		if json.Unmarshal(e.Value(), &r) == nil && r.Owner == owner && key != claims.LeaderKey {
			out = append(out, key)
		}
	}
	return out
}

// nodeStates reads the shared node state of every node.
func (d *deployment) nodeStates(ctx context.Context) (map[string]nodestate.Record, error) {
	st, err := nodestate.Open(ctx, d.js, "")
	if err != nil {
		return nil, err
	}
	recs, bad, err := st.List(ctx)
	if err != nil {
		return nil, err
	}
	if bad > 0 {
		return nil, fmt.Errorf("%d undecodable node state records", bad)
	}
	out := make(map[string]nodestate.Record, len(recs))
	for _, r := range recs {
		out[r.Identity] = r
	}
	return out, nil
}

// registry reads the shared identity registry.
func (d *deployment) registry(ctx context.Context) (map[string]provisioner.Record, error) {
	kv, err := d.js.KeyValue(ctx, provisioner.RegistryBucket)
	if err != nil {
		return nil, err
	}
	lister, err := kv.ListKeys(ctx)
	if err != nil {
		return nil, err
	}
	out := map[string]provisioner.Record{}
	for key := range lister.Keys() {
		e, err := kv.Get(ctx, key)
		if err != nil {
			return nil, err
		}
		var r provisioner.Record
		if err := json.Unmarshal(e.Value(), &r); err != nil {
			return nil, fmt.Errorf("registry %s: %w", key, err)
		}
		out[key] = r
	}
	return out, nil
}

// verify ends every fault test: it waits until every node is in
// production and its shared state settled, then checks exactly-once from
// both the lifecycle events and the shared state, the identity registry,
// the fleet's own count of production starts, and every state directory.
// It returns how many nodes each provisioner provisioned.
func (d *deployment) verify() map[string]int {
	t := d.t
	t.Helper()
	waitFor(t, convergeTimeout, "every node's provisioned event", func() bool { return d.arr.count() >= len(d.ids) })
	t.Logf("every node arrived %.1fs after the fleet started", time.Since(d.started).Seconds())
	phase := time.Now()
	defer func() { t.Logf("verification took %.1fs", time.Since(phase).Seconds()) }()
	var states map[string]nodestate.Record
	var unsettled []string
	deadline := time.Now().Add(convergeTimeout)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		var err error
		states, err = d.nodeStates(ctx)
		cancel()
		unsettled = unsettled[:0]
		if err == nil {
			for _, id := range d.ids {
				// Settled: no certificate pending, and provisioned
				// (restart confirmed) or in production (arrival
				// recorded).
				r, ok := states[id]
				if !ok || r.Pending != nil || r.State != nodestate.StateProduction && r.State != nodestate.StateProvisioned {
					unsettled = append(unsettled, id)
				}
			}
		}
		if err == nil && len(unsettled) == 0 {
			break
		}
		if time.Now().After(deadline) {
			for _, id := range unsettled[:min(len(unsettled), 10)] {
				t.Errorf("%s never settled in the shared state: %+v", id, states[id])
			}
			t.Fatalf("%d nodes not settled in the shared state (last error %v)", len(unsettled), err)
		}
		time.Sleep(time.Second)
	}
	t.Logf("shared state settled %.1fs after the last arrival", time.Since(phase).Seconds())
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	reg, err := d.registry(ctx)
	if err != nil {
		t.Fatal(err)
	}

	// Stop the fleet (and victims) before reading the disks.
	stopping := time.Now()
	d.fleet.stop(30 * time.Second)
	if d.beforeDisks != nil {
		d.beforeDisks()
	}
	t.Logf("fleet stopped in %.1fs", time.Since(stopping).Seconds())
	var sum struct {
		Production map[string]int    `json:"production"`
		Errors     map[string]string `json:"errors"`
	}
	if b, err := os.ReadFile(d.summaryFile); err != nil {
		t.Errorf("fleet summary: %v", err)
	} else if err := json.Unmarshal(b, &sum); err != nil {
		t.Errorf("fleet summary: %v", err)
	}

	bad := 0
	fail := func(format string, args ...any) {
		bad++
		if bad <= 20 {
			t.Errorf(format, args...)
		}
	}
	byProv := map[string]int{}
	for _, id := range d.ids {
		evs := d.arr.of(id)
		r := states[id]
		byProv[r.ProvisionedBy]++
		switch {
		case d.victims[id]:
			// The killer acts on inotify events after the fact: under
			// load its kill can land after the victim reached production,
			// and the restarted process is a new production session
			// (a new event ID) with the same certificate. One
			// provisioning is one certificate.
			serials := map[string]bool{}
			for _, ev := range evs {
				serials[ev.serial] = true
			}
			if len(evs) == 0 || len(serials) != 1 {
				fail("%s: production arrivals %+v, want one certificate", id, evs)
			}
		case len(evs) != 1:
			fail("%s: %d production arrivals (distinct provisioned events), want 1", id, len(evs))
		}
		if r.Provisions != 1 || r.ProvisionedBy == "" {
			fail("%s: shared state counts %d provisionings (by %q), want 1", id, r.Provisions, r.ProvisionedBy)
		}
		if !d.victims[id] {
			if n := sum.Production[id]; n != 1 {
				fail("%s: the agent connected in production %d times, want 1", id, n)
			}
			if e := sum.Errors[id]; e != "" {
				fail("%s: agent error %s", id, e)
			}
		}
		serial, fp, err := checkStateDir(d.nodeDir(id), id, d.pki.ca.CertificatePEM())
		if err != nil {
			fail("%s: state directory: %v", id, err)
			continue
		}
		if r.Serial != serial {
			fail("%s: shared state serial %s, the node's certificate %s", id, r.Serial, serial)
		}
		for _, ev := range evs {
			if ev.serial != serial {
				fail("%s: provisioned event serial %s, the node's certificate %s", id, ev.serial, serial)
			}
		}
		if rec := reg[id]; rec.KeyFingerprint != fp || rec.Serial != serial {
			fail("%s: identity registry %+v, the node's key %s and certificate %s", id, rec, fp, serial)
		}
	}
	if bad > 20 {
		t.Errorf("... %d problems in all", bad)
	}
	t.Logf("%d nodes provisioned exactly once (events, shared state, fleet, disks); per provisioner: %v", len(d.ids), byProv)
	return byProv
}

// checkStateDir checks one node's state directory after the storm: the
// configuration parses and is complete, the key is 0600 and parses, the
// certificate matches it, names the node and chains to the CA, and no
// temporary file is left anywhere. It returns the certificate's serial and
// the key's fingerprint.
func checkStateDir(dir, id string, caPEM []byte) (serial, fp string, err error) {
	var temps []string
	werr := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if fsutil.IsTemp(e.Name(), "") {
			temps = append(temps, p)
		}
		return nil
	})
	if werr != nil {
		return "", "", werr
	}
	if len(temps) > 0 {
		return "", "", fmt.Errorf("temporary files left: %v", temps)
	}
	cfg, err := config.Load(filepath.Join(dir, agent.ConfigFileName))
	if err != nil {
		return "", "", fmt.Errorf("configuration: %w", err)
	}
	if v, _ := cfg.Bool(config.KeyProvision); v || cfg.Value(config.KeyMiddlewareHosts) == "" || cfg.Value(config.KeyIdentity) != id {
		return "", "", fmt.Errorf("configuration not a production one: provision %q, middleware_hosts %q, identity %q",
			cfg.Value(config.KeyProvision), cfg.Value(config.KeyMiddlewareHosts), cfg.Value(config.KeyIdentity))
	}
	keyFile := cfg.Value(config.KeyKey)
	st, err := os.Stat(keyFile)
	if err != nil {
		return "", "", fmt.Errorf("key: %w", err)
	}
	if st.Mode().Perm() != 0o600 {
		return "", "", fmt.Errorf("key mode %v, want 0600", st.Mode().Perm())
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return "", "", err
	}
	key, err := pki.ParsePrivateKey(keyPEM)
	if err != nil {
		return "", "", fmt.Errorf("key: %w", err)
	}
	certPEM, err := os.ReadFile(cfg.Value(config.KeyCertificate))
	if err != nil {
		return "", "", fmt.Errorf("certificate: %w", err)
	}
	nodeCA, err := os.ReadFile(cfg.Value(config.KeyCA))
	if err != nil {
		return "", "", fmt.Errorf("ca: %w", err)
	}
	if string(nodeCA) != string(caPEM) {
		return "", "", errors.New("ca.pem is not the fleet's CA")
	}
	leaf, err := pki.VerifyLeaf(certPEM, caPEM, key.Public(), id, time.Now())
	if err != nil {
		return "", "", fmt.Errorf("certificate: %w", err)
	}
	if fp, err = provisioner.Fingerprint(key.Public()); err != nil {
		return "", "", err
	}
	return leaf.SerialNumber.Text(16), fp, nil
}

// report logs one failover figure as a summary line and appends it to
// $MUSTER_FAULT_REPORT when that is set (docs/ha.md's table is made from
// these lines).
func report(t *testing.T, metric string, d time.Duration, note string) {
	t.Helper()
	line := fmt.Sprintf("FAILOVER test=%s metric=%s seconds=%.2f %s", t.Name(), metric, d.Seconds(), note)
	t.Log(line)
	if f := os.Getenv("MUSTER_FAULT_REPORT"); f != "" {
		out, err := os.OpenFile(f, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
		if err != nil {
			t.Errorf("report: %v", err)
			return
		}
		defer out.Close()
		fmt.Fprintln(out, line)
	}
}

// percentile returns the p-th percentile (0..100) of ds.
func percentile(ds []time.Duration, p int) time.Duration {
	if len(ds) == 0 {
		return 0
	}
	s := append([]time.Duration(nil), ds...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[min(len(s)-1, len(s)*p/100)]
}
