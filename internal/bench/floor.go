package bench

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nkeys"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/demo"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/procfs"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/token"
)

// Floor is what one node costs at least with every security check on,
// measured on this machine just before the provisioning phase: each piece
// of cryptographic and connection work a node needs, run alone with the
// run's own broker, helper, CA and key type, times how often a node needs
// it. Everything else a node costs (request and reply envelopes, NATS
// routing, the agent's durable writes, metadata and lifecycle events,
// scheduling and garbage collection) is the orchestration on top; the
// run's CPU per node minus the floor's is what it costs.
//
// The floor is CPU time, measured on the machine as it is just before the
// run: on a VM whose host takes a varying share of its cores (steal,
// Machine.Use) or runs it more slowly, the floor moves with the run, and
// Efficiency and CPUShare move far less from hour to hour than nodes/min.
type Floor struct {
	// Items are the pieces of work, in the order a node needs them.
	Items []FloorItem `json:"items"`
	// MillisPerNode is the CPU all items cost one node, in milliseconds.
	MillisPerNode float64 `json:"ms_per_node"`
	// NodesPerMin is what Cores cores would provision if a node cost
	// only MillisPerNode.
	NodesPerMin float64 `json:"nodes_per_min"`
	// Cores is the cores NodesPerMin counts: GOMAXPROCS, but no more than
	// the machine's CPUs (floorCores).
	Cores int `json:"cores"`
	// Efficiency is the run's nodes/min divided by NodesPerMin (set
	// after the run): below 1 by the orchestration's CPU, by the cores
	// the hypervisor took, and by cores left idle.
	Efficiency float64 `json:"efficiency"`
	// CPUShare is MillisPerNode divided by the CPU the run spent per node
	// (the machine's busy time per node, or where /proc/stat is missing
	// this process's, its helpers' and its agent processes' CPU): the
	// share of the run's CPU that was floor work, whatever cores were
	// stolen or idle.
	CPUShare float64 `json:"cpu_share"`
}

// FloorItem is one piece of work of the Floor.
type FloorItem struct {
	// Name says what the work is and who does it.
	Name string `json:"name"`
	// PerNode is how many times one node needs it.
	PerNode int `json:"per_node"`
	// EachMS is the CPU one run costs (this process and its helper
	// processes), in milliseconds: the median of the rounds' means.
	EachMS float64 `json:"each_ms"`
	// Runs is how many runs were measured in all rounds.
	Runs int `json:"runs"`
}

// RPCsPerNode is how many signed requests the provisioner sends a node
// that provisions on its first attempt: inventory, gencsr, configure,
// restart.
const RPCsPerNode = 4

// How the floor is measured: floorRounds rounds over every item, each
// item run in a round until floorBudget of wall time has passed (at least
// floorMinRuns and at most floorMaxRuns times), the first round after one
// run that warms it up (first-use costs are not a node's). An item's figure is its median
// round: on a VM whose speed changes from second to second, rounds spread
// over the whole measurement and the median drops a round that met a slow
// patch.
const (
	floorRounds  = 3
	floorBudget  = 40 * time.Millisecond
	floorMinRuns = 5
	floorMaxRuns = 500
)

// floorIdentity is the identity the floor's work is done for; no agent of
// the fleet has it. Its provisioning connections are made as
// floor-<n>.bench.muster (floorPattern), one identity each: the broker
// refuses a second live connection of one identity, and a closed one may
// not be gone yet when the next connects.
const (
	floorIdentity = "floor.bench.muster"
	floorPattern  = "floor-*.bench.muster"
)

// floorFleet is what the floor needs from the prepared fleet: its broker,
// CA, tokens and facts (internal/demo's Fleet), and the helper the
// provisioner will run.
type floorFleet struct {
	f         *demo.Fleet
	helper    helper.Helper
	keyType   string
	inProcess bool
	// agentBin is the muster-agent binary of process mode, "" in-process.
	agentBin string
}

// measureFloor measures the floor with the fleet's parts. It must run
// before the fleet starts: the broker, the provisioner and the agents must
// be idle for the CPU counts to be the floor's.
func measureFloor(ctx context.Context, ff floorFleet) (*Floor, error) {
	st, err := newFloorState(ff)
	if err != nil {
		return nil, err
	}
	type step struct {
		name    string
		perNode int
		op      func() error
	}
	// A node's production connection stays up, so the floor does not
	// count its close (the run does not either); it closes them after
	// each measurement.
	defer st.closeConns()
	steps := []step{
		{"provisioning connection with token (node and broker)", 1, st.provisioningConn},
		{"request signature (provisioner)", RPCsPerNode, st.signRequest},
		{"request signature check (node)", RPCsPerNode, st.verifyRequest},
		{"token check (provisioner)", 1, st.checkToken},
		{"node key and CSR (node)", 1, st.keyAndCSR},
		{"CSR check (provisioner)", 1, st.checkCSR},
		{"helper run: signing and configuration (" + st.helperKind() + ")", 1, func() error { return st.runHelper(ctx) }},
		{"helper reply check (provisioner)", 1, st.checkReply},
		{"certificate check (node, at configure)", 1, st.checkCertificate},
		{"production connection, mutual TLS (node and broker)", 1, st.productionConn},
	}
	if ff.agentBin != "" {
		// A node of process mode starts its agent and starts it again
		// (the restart is a re-exec); this is the least a start costs.
		steps = append(steps, step{"agent process start (" + filepath.Base(ff.agentBin) + " --version)", 2, func() error {
			return exec.CommandContext(ctx, ff.agentBin, "--version").Run()
		}})
	}
	// What the fleet's preparation left for the collector is not the
	// floor's.
	fullGC()
	rounds := make([][]time.Duration, len(steps))
	runs := make([]int, len(steps))
	for round := range floorRounds {
		for i, s := range steps {
			if err := ctx.Err(); err != nil {
				return nil, err
			}
			each, n, err := measureCPU(s.op, round == 0)
			st.closeConns()
			if err != nil {
				return nil, fmt.Errorf("%s: %w", s.name, err)
			}
			rounds[i] = append(rounds[i], each)
			runs[i] += n
		}
	}
	fl := &Floor{}
	for i, s := range steps {
		slices.Sort(rounds[i])
		ms := float64(rounds[i][len(rounds[i])/2]) / float64(time.Millisecond)
		fl.Items = append(fl.Items, FloorItem{Name: s.name, PerNode: s.perNode, EachMS: ms, Runs: runs[i]})
		fl.MillisPerNode += ms * float64(s.perNode)
	}
	fl.Cores = floorCores()
	if fl.MillisPerNode > 0 {
		fl.NodesPerMin = 60e3 * float64(fl.Cores) / fl.MillisPerNode
	}
	return fl, nil
}

// floorCores is how many cores the run can keep busy: GOMAXPROCS, which
// bounds this process, but no more than the CPUs it may run on
// (--gomaxprocs above them adds Ps, not cores).
func floorCores() int {
	return min(runtime.GOMAXPROCS(0), runtime.NumCPU())
}

// measureCPU runs op once to warm it up when warm is set, then for
// floorBudget (within floorMinRuns and floorMaxRuns runs), and returns
// the CPU time this process and its helper processes spent per run.
func measureCPU(op func() error, warm bool) (time.Duration, int, error) {
	if warm {
		if err := op(); err != nil {
			return 0, 0, err
		}
	}
	before := processCPU()
	start := time.Now()
	runs := 0
	for runs < floorMinRuns || (runs < floorMaxRuns && time.Since(start) < floorBudget) {
		if err := op(); err != nil {
			return 0, 0, err
		}
		runs++
	}
	return (processCPU() - before) / time.Duration(runs), runs, nil
}

// processCPU is the user and system CPU of this process, of the children
// it has waited for, and of those still running (a persistent helper).
func processCPU() time.Duration {
	var self, children syscall.Rusage
	_ = syscall.Getrusage(syscall.RUSAGE_SELF, &self)
	_ = syscall.Getrusage(syscall.RUSAGE_CHILDREN, &children)
	return time.Duration((cpuSeconds(self)+cpuSeconds(children))*float64(time.Second)) + liveChildrenCPU()
}

// liveChildrenCPU is the CPU time of this process's running children but
// those in except: their threads' run time
// (/proc/<pid>/task/<tid>/schedstat, nanoseconds) and that of the children
// they have waited for (cutime and cstime of /proc/<pid>/stat, clock
// ticks: a shell helper's jq runs). Zero without /proc.
func liveChildrenCPU(except ...int) time.Duration {
	lists, _ := filepath.Glob("/proc/self/task/*/children")
	var total time.Duration
	for _, l := range lists {
		b, err := os.ReadFile(l)
		if err != nil {
			continue
		}
		for _, pid := range strings.Fields(string(b)) {
			if n, err := strconv.Atoi(pid); err == nil && slices.Contains(except, n) {
				continue
			}
			total += processRunTime(pid)
		}
	}
	return total
}

// processRunTime is liveChildrenCPU's figure for one process.
func processRunTime(pid string) time.Duration {
	var total time.Duration
	tasks, _ := filepath.Glob("/proc/" + pid + "/task/*/schedstat")
	for _, t := range tasks {
		b, err := os.ReadFile(t)
		if err != nil {
			continue
		}
		if f := strings.Fields(string(b)); len(f) > 0 {
			if ns, err := strconv.ParseInt(f[0], 10, 64); err == nil {
				total += time.Duration(ns)
			}
		}
	}
	if n, err := strconv.Atoi(pid); err == nil {
		if ps, err := procfs.ReadStat(n); err == nil {
			total += ps.ChildUser + ps.ChildSystem
		}
	}
	return total
}

// floorState holds the inputs and outputs the floor's steps pass along,
// made once with real keys: each step's input is what the step before it
// produced, so every run does a node's real work on real data.
type floorState struct {
	ff       floorFleet
	caPEM    []byte
	roots    *x509.CertPool
	tok      string
	verifier *token.Verifier
	signer   *protocol.Signer
	trusted  *protocol.KeySet
	req      protocol.Request // an inventory request, signed
	signed   protocol.Request // req as the node receives it
	nodeKey  crypto.Signer    // the key of the first keyAndCSR run
	csrPEM   []byte
	pubPEM   []byte
	hreq     *helper.Request
	hrep     *helper.Reply
	cert     tls.Certificate
	open     []*nats.Conn // production connections not closed yet
	conns    int          // provisioning connections made
}

func newFloorState(ff floorFleet) (*floorState, error) {
	st := &floorState{ff: ff, caPEM: ff.f.CA().CertificatePEM()}
	st.roots = x509.NewCertPool()
	st.roots.AppendCertsFromPEM(st.caPEM)

	tok, err := ff.f.IssueToken(token.Scope{Pattern: floorPattern, Batch: "demo"})
	if err != nil {
		return nil, fmt.Errorf("token: %w", err)
	}
	st.tok = tok
	issuer, err := ff.f.TokenIssuer()
	if err != nil {
		return nil, err
	}
	if st.verifier, err = token.NewVerifier([]string{issuer}); err != nil {
		return nil, fmt.Errorf("token verifier: %w", err)
	}

	kp, err := nkeys.CreateUser()
	if err != nil {
		return nil, err
	}
	if st.signer, err = protocol.NewSigner(kp); err != nil {
		return nil, err
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, err
	}
	if st.trusted, err = protocol.NewKeySet([]string{pub}); err != nil {
		return nil, err
	}
	st.req = protocol.Request{
		Protocol: protocol.RequestProtocol, ID: "floor", Sender: "muster-provisioner",
		Target: floorIdentity, Agent: protocol.AgentRPCUtil, Action: protocol.ActionInventory,
		Time: time.Now().UTC(), TTL: 60,
	}
	if err := st.signRequest(); err != nil {
		return nil, err
	}
	st.signed = st.req

	// One node's way through, to have a real CSR, helper request and
	// reply and certificate for the steps that check them.
	if err := st.keyAndCSR(); err != nil {
		return nil, fmt.Errorf("node key and CSR: %w", err)
	}
	inv, err := json.Marshal(protocol.Inventory{
		Agents: []string{protocol.AgentRPCUtil, protocol.AgentProvision}, Facts: ff.f.Facts(0),
		Version: "bench", MainCollective: protocol.DefaultMainCollective,
	})
	if err != nil {
		return nil, err
	}
	claims, err := st.claims()
	if err != nil {
		return nil, err
	}
	st.hreq = &helper.Request{
		Identity:  floorIdentity,
		CSR:       &helper.CSRInfo{CSR: string(st.csrPEM), PublicKey: string(st.pubPEM), SSLDir: filepath.Join(ff.f.AgentDir(floorIdentity), "ssl")},
		Inventory: string(inv),
		JWT:       claims,
		RequestID: "floor",
		Site:      "demo",
	}
	return st, nil
}

func (st *floorState) helperKind() string {
	switch st.ff.helper.(type) {
	case *helper.Exec:
		return "exec'd helper"
	case *helper.Persistent:
		return "persistent helper"
	}
	return "built-in helper"
}

// provisioningConn is a waiting node's connection: the broker checks its
// token at connect; one PING round trip, then it closes.
func (st *floorState) provisioningConn() error {
	st.conns++
	id := strings.Replace(floorPattern, "*", strconv.Itoa(st.conns), 1)
	opts := []nats.Option{nats.Name(id), nats.Token(st.tok), nats.NoReconnect(), nats.Timeout(10 * time.Second)}
	url := ""
	if st.ff.inProcess {
		opts = append(opts, nats.InProcessServer(st.ff.f.Broker().Server()))
	} else {
		url = st.ff.f.Broker().ClientURL()
		opts = append(opts, nats.Secure(&tls.Config{MinVersion: tls.VersionTLS12, RootCAs: st.roots}))
	}
	nc, err := connect(url, opts)
	if err != nil {
		return err
	}
	nc.Close() // at restart, in the run
	return nil
}

// productionConn is the node's production connection with the
// certificate the helper made: mutual TLS, X25519 only in-process (as the
// agent does), Go's default key exchange over TCP.
func (st *floorState) productionConn() error {
	if st.cert.Certificate == nil {
		return errors.New("no certificate from the helper run")
	}
	tc := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{st.cert}, RootCAs: st.roots}
	opts := []nats.Option{nats.Name(floorIdentity), nats.NoReconnect(), nats.Timeout(10 * time.Second)}
	url := ""
	if st.ff.inProcess {
		tc.CurvePreferences = []tls.CurveID{tls.X25519}
		opts = append(opts, nats.InProcessServer(st.ff.f.Broker().Server()))
	} else {
		url = st.ff.f.Broker().ClientURL()
	}
	nc, err := connect(url, append(opts, nats.Secure(tc)))
	if err != nil {
		return err
	}
	st.open = append(st.open, nc)
	return nil
}

func (st *floorState) closeConns() {
	for _, nc := range st.open {
		nc.Close()
	}
	st.open = nil
}

// connect connects and round-trips a PING.
func connect(url string, opts []nats.Option) (*nats.Conn, error) {
	nc, err := nats.Connect(url, opts...)
	if err != nil {
		return nil, err
	}
	if err := nc.FlushTimeout(10 * time.Second); err != nil {
		nc.Close()
		return nil, err
	}
	return nc, nil
}

func (st *floorState) signRequest() error {
	st.req.Signer, st.req.Signature = "", ""
	return st.req.Sign(st.signer)
}

func (st *floorState) verifyRequest() error { return st.signed.VerifySignature(st.trusted) }

// claims is the provisioner's token check: verify, then the claims the
// helper gets.
func (st *floorState) claims() (json.RawMessage, error) {
	c, err := st.verifier.Verify(st.tok, strings.Replace(floorPattern, "*", "0", 1), time.Now())
	if err != nil {
		return nil, err
	}
	return json.Marshal(c)
}

func (st *floorState) checkToken() error {
	_, err := st.claims()
	return err
}

// keyAndCSR is gencsr on the node: a new key, its CSR, the PEM encodings
// it keeps and sends.
func (st *floorState) keyAndCSR() error {
	key, err := pki.GenerateKey(st.ff.keyType, 0)
	if err != nil {
		return err
	}
	csrPEM, err := pki.CreateCSR(key, floorIdentity, pki.CSRSubject{})
	if err != nil {
		return err
	}
	if _, err := pki.MarshalPrivateKey(key); err != nil {
		return err
	}
	pubPEM, err := pki.MarshalPublicKey(key.Public())
	if err != nil {
		return err
	}
	if st.nodeKey == nil {
		// Keep the first: the helper's certificate is for this key.
		st.nodeKey, st.csrPEM, st.pubPEM = key, csrPEM, pubPEM
		st.cert.PrivateKey = key
	}
	return nil
}

func (st *floorState) checkCSR() error {
	csr, err := pki.ParseCSR(st.csrPEM)
	if err != nil {
		return err
	}
	if csr.Subject.CommonName != floorIdentity {
		return fmt.Errorf("CSR names %q", csr.Subject.CommonName)
	}
	return nil
}

// runHelper runs the fleet's helper for the floor's node; the first run's
// certificate is the one the production connection uses.
func (st *floorState) runHelper(ctx context.Context) error {
	rep, err := st.ff.helper.Provision(ctx, st.hreq)
	if err != nil {
		return err
	}
	if rep.Defer || rep.Shutdown || rep.Certificate == "" {
		return fmt.Errorf("the helper did not sign the floor node's CSR (defer %v, shutdown %v, msg %q)", rep.Defer, rep.Shutdown, rep.Msg)
	}
	if st.hrep == nil {
		st.hrep = rep
		certs, err := pki.ParseCertificates([]byte(rep.Certificate))
		if err != nil {
			return err
		}
		for _, c := range certs {
			st.cert.Certificate = append(st.cert.Certificate, c.Raw)
		}
	}
	return nil
}

func (st *floorState) checkReply() error {
	if st.hrep == nil {
		return errors.New("no helper reply")
	}
	return helper.ValidateReply(st.hreq, st.hrep, time.Now())
}

// checkCertificate is the node's check of the configure request's
// certificate: its key, its name, its chain to the request's CA.
func (st *floorState) checkCertificate() error {
	if st.hrep == nil {
		return errors.New("no helper reply")
	}
	_, err := pki.VerifyChain([]byte(st.hrep.Certificate), []byte(st.hrep.CA), st.nodeKey.Public(), floorIdentity, time.Now())
	return err
}
