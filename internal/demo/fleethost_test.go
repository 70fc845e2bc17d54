package demo

import (
	"context"
	"errors"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/muster-io/muster/agent"
)

// fleetHostTestEnv makes the test binary a fleet host (see TestMain).
const fleetHostTestEnv = "MUSTER_TEST_FLEET_HOST"

// TestMain serves as a fleet host when the tests start this binary as one,
// and runs the tests otherwise.
func TestMain(m *testing.M) {
	if os.Getenv(fleetHostTestEnv) == "1" {
		os.Exit(FleetHostMain())
	}
	os.Exit(m.Run())
}

// hostOptions runs the fleet's agents in this test binary as a fleet host.
func hostOptions(t *testing.T, nodes int) Options {
	t.Helper()
	return Options{
		Nodes:        nodes,
		Dir:          t.TempDir(),
		FleetHost:    []string{os.Args[0]},
		FleetHostEnv: []string{fleetHostTestEnv + "=1"},
	}
}

// runHostFleet builds the fleet of o and starts it (after checks before the
// start, when given), with a context that ends with the test's 2 minutes.
func runHostFleet(t *testing.T, o Options, beforeStart func(*Fleet)) (*Fleet, context.Context) {
	t.Helper()
	f, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	t.Cleanup(cancel)
	if beforeStart != nil {
		if err := f.Prepare(); err != nil {
			t.Fatal(err)
		}
		beforeStart(f)
	}
	if err := f.Start(ctx); err != nil {
		t.Fatal(err)
	}
	if got := f.WaitProduction(ctx, o.Nodes); got != o.Nodes {
		t.Fatalf("%d of %d nodes in production; errors %v", got, o.Nodes, f.Errors())
	}
	return f, ctx
}

// TestFleetHost provisions a fleet whose agents run in a fleet host: every
// node reaches production once, after its start, on the real broker; the
// host's CPU is read apart from this process's; closing the fleet stops it.
func TestFleetHost(t *testing.T) {
	const n = 6
	o := hostOptions(t, n)
	var mu sync.Mutex
	started := map[string]time.Time{}
	prod := map[string]int{}
	prodAt := map[string]time.Time{}
	o.OnAgentStart = func(id string, at time.Time) {
		mu.Lock()
		started[id] = at
		mu.Unlock()
	}
	o.OnModeChanged = func(id string, m agent.Mode, at time.Time) {
		if m != agent.ModeProduction {
			return
		}
		mu.Lock()
		prod[id]++
		prodAt[id] = at
		mu.Unlock()
	}
	f, ctx := runHostFleet(t, o, func(f *Fleet) {
		if pids := f.AgentPIDs(); len(pids) != 1 || pids[0] == os.Getpid() {
			t.Fatalf("AgentPIDs %v: want the fleet host alone", pids)
		}
	})
	answered, err := f.PingProduction(ctx, 30*time.Second)
	if err != nil || len(answered) != n {
		t.Fatalf("production ping: %d of %d answered, %v", len(answered), n, err)
	}
	st, ok, err := f.HostStats()
	if err != nil || !ok || st.Processes != 1 || st.CPUSeconds <= 0 || st.RSSBytes <= 0 {
		t.Fatalf("HostStats %+v %v %v", st, ok, err)
	}
	if f.Agent(Identity(0)) != nil {
		t.Error("an agent of the fleet host is in this process")
	}
	if err := f.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	select {
	case <-f.host.done:
	default:
		t.Fatal("fleet host still running after Close")
	}
	if _, ok, _ := f.HostStats(); ok {
		t.Error("HostStats ok after Close")
	}
	mu.Lock()
	defer mu.Unlock()
	for _, id := range f.Identities() {
		s, ok := started[id]
		if !ok || prod[id] != 1 {
			t.Errorf("%s: started %v, %d production connections", id, ok, prod[id])
			continue
		}
		if !prodAt[id].After(s) {
			t.Errorf("%s: production at %v, not after its start at %v", id, prodAt[id], s)
		}
	}
}

// TestFleetHostRamp: the agents' delays reach the host, which starts them
// spaced out.
func TestFleetHostRamp(t *testing.T) {
	const n, step = 3, 300 * time.Millisecond
	o := hostOptions(t, n)
	o.AgentDelay = func(i int) time.Duration { return time.Duration(i) * step }
	var mu sync.Mutex
	var starts []time.Time
	o.OnAgentStart = func(_ string, at time.Time) {
		mu.Lock()
		starts = append(starts, at)
		mu.Unlock()
	}
	runHostFleet(t, o, nil)
	mu.Lock()
	defer mu.Unlock()
	if len(starts) != n {
		t.Fatalf("%d starts", len(starts))
	}
	// Each start waits for its delay from the host's start: the last is
	// at least 2 steps after the first (a lower bound, not a timing).
	if d := starts[n-1].Sub(starts[0]); d < (n-1)*step {
		t.Errorf("starts spread over %v, want at least %v", d, (n-1)*step)
	}
}

// TestFleetHostFails: a host that exits before it is ready fails Prepare
// with the end of its log.
func TestFleetHostFails(t *testing.T) {
	o := hostOptions(t, 2)
	o.FleetHost = []string{"/bin/sh", "-c", "echo 'no agents here' >&2; exit 3"}
	f, err := New(o)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	err = f.Prepare()
	if err == nil || !strings.Contains(err.Error(), "exited before it was ready") || !strings.Contains(err.Error(), "no agents here") {
		t.Fatalf("Prepare: %v", err)
	}
}

// TestFleetHostExcludes: a fleet host runs TCP agents, not in-process
// ones or agent processes.
func TestFleetHostExcludes(t *testing.T) {
	for name, mod := range map[string]func(*Options){
		"in-process": func(o *Options) { o.InProcess = true },
		"processes":  func(o *Options) { o.AgentBin = "/bin/true" },
	} {
		t.Run(name, func(t *testing.T) {
			o := hostOptions(t, 1)
			mod(&o)
			if _, err := New(o); err == nil || !strings.Contains(err.Error(), "FleetHost excludes") {
				t.Fatalf("New: %v", err)
			}
		})
	}
}

// TestServeFleetHostSpec: a bad spec is refused before any agent is built,
// naming every problem; an input that ends before the start stops the
// host cleanly.
func TestServeFleetHostSpec(t *testing.T) {
	run := func(in string) (string, error) {
		var out strings.Builder
		err := ServeFleetHost(context.Background(), strings.NewReader(in), &out, &strings.Builder{})
		return out.String(), err
	}
	for name, tc := range map[string]struct{ in, want string }{
		"not json":      {`{`, "fleet host spec"},
		"unknown field": {`{"brokers":["tls://127.0.0.1:1"],"extra":1}`, "unknown field"},
		"empty":         {`{}`, "no brokers"},
		"bad agents": {`{"brokers":["tls://127.0.0.1:1"],"provisioner_key":"U","ca":"x","agents":[` +
			`{"identity":"a.example","state_dir":"/tmp/a","token":"t"},{"identity":"a.example","state_dir":"/tmp/a","token":"t"},` +
			`{"identity":"bad id","state_dir":"/tmp/b","token":"t"},{"identity":"c.example","delay":-1}]}`,
			"a.example twice"},
	} {
		t.Run(name, func(t *testing.T) {
			out, err := run(tc.in)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err %v, want %q", err, tc.want)
			}
			if out != "" {
				t.Errorf("host wrote %q before refusing", out)
			}
		})
	}
	_, err := run(`{"brokers":["tls://127.0.0.1:1"],"provisioner_key":"U","ca":"x","agents":[{"identity":"c.example","state_dir":"/tmp/c","token":"t","delay":-1}]}`)
	if err == nil || !strings.Contains(err.Error(), "delay not negative") {
		t.Errorf("negative delay: %v", err)
	}
	out, err := run(`{"brokers":["tls://127.0.0.1:1"],"provisioner_key":"U","ca":"x","agents":[]}`)
	if err != nil || strings.TrimSpace(out) != `{"event":"ready"}` {
		t.Errorf("no agents, input ends: out %q, err %v", out, err)
	}
}

func TestDecodeHostEvent(t *testing.T) {
	long := strings.Repeat("x", maxHostErrorLen+1)
	for name, tc := range map[string]struct {
		line string
		ok   bool
	}{
		"ready":              {`{"event":"ready"}`, true},
		"start":              {`{"event":"start","identity":"node1.example","at":5}`, true},
		"production":         {`{"event":"mode","identity":"node1.example","mode":"production","at":5}`, true},
		"provisioning":       {`{"event":"mode","identity":"node1.example","mode":"provisioning","at":5}`, true},
		"exit":               {`{"event":"exit","identity":"node1.example","error":"boom"}`, true},
		"ready with data":    {`{"event":"ready","identity":"node1.example"}`, false},
		"unknown event":      {`{"event":"gone","identity":"node1.example","at":5}`, false},
		"unknown field":      {`{"event":"start","identity":"node1.example","at":5,"x":1}`, false},
		"no time":            {`{"event":"start","identity":"node1.example"}`, false},
		"negative time":      {`{"event":"mode","identity":"node1.example","mode":"production","at":-1}`, false},
		"unknown mode":       {`{"event":"mode","identity":"node1.example","mode":"sleeping","at":5}`, false},
		"bad identity":       {`{"event":"start","identity":"node 1","at":5}`, false},
		"no identity":        {`{"event":"start","at":5}`, false},
		"exit without error": {`{"event":"exit","identity":"node1.example"}`, false},
		"exit error too long": {`{"event":"exit","identity":"node1.example","error":"` + long + `"}`,
			false},
		"two values": {`{"event":"ready"}{"event":"ready"}`, false},
		"too long":   {`{"event":"ready","x":"` + strings.Repeat("y", maxHostEventLen) + `"}`, false},
		"not json":   {`ready`, false},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := decodeHostEvent([]byte(tc.line))
			if (err == nil) != tc.ok {
				t.Fatalf("err %v, want ok %v", err, tc.ok)
			}
			if err != nil && !errors.Is(err, errHostEvent) {
				t.Fatalf("err %v is not errHostEvent", err)
			}
		})
	}
}

// FuzzDecodeHostEvent: any line is an event that passes every check, or an
// errHostEvent; never a panic.
func FuzzDecodeHostEvent(f *testing.F) {
	for _, s := range []string{
		`{"event":"ready"}`,
		`{"event":"mode","identity":"node1.example","mode":"production","at":5}`,
		`{"event":"exit","identity":"node1.example","error":"boom"}`,
		`{"event":"start","identity":"node1.example","at":5}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		ev, err := decodeHostEvent(line)
		if err != nil {
			if !errors.Is(err, errHostEvent) {
				t.Fatalf("error %v is not errHostEvent", err)
			}
			return
		}
		switch ev.Event {
		case hostReady:
		case hostStart, hostMode, hostExit:
			if ev.Identity == "" {
				t.Fatalf("%s without an identity", ev.Event)
			}
			if ev.Event != hostExit && ev.At <= 0 {
				t.Fatalf("%s without a time", ev.Event)
			}
		default:
			t.Fatalf("event %q accepted", ev.Event)
		}
	})
}
