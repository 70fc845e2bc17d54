package bench

import (
	"context"
	"math"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/procfs"
)

// checkFloor checks the floor's arithmetic and that every item ran.
func checkFloor(t *testing.T, r *Result, items int) {
	t.Helper()
	fl := r.Floor
	if fl == nil {
		t.Fatalf("no floor (error %q)", r.FloorError)
	}
	if len(fl.Items) != items {
		t.Errorf("%d floor items, want %d: %+v", len(fl.Items), items, fl.Items)
	}
	var sum float64
	seen := map[string]bool{}
	for _, it := range fl.Items {
		if it.Name == "" || seen[it.Name] {
			t.Errorf("item name %q empty or repeated", it.Name)
		}
		seen[it.Name] = true
		if it.PerNode < 1 || it.Runs < floorRounds*floorMinRuns || it.Runs > floorRounds*floorMaxRuns {
			t.Errorf("%s: per node %d, runs %d", it.Name, it.PerNode, it.Runs)
		}
		if it.EachMS <= 0 || math.IsNaN(it.EachMS) {
			t.Errorf("%s: %v ms per run, want a positive CPU time", it.Name, it.EachMS)
		}
		sum += it.EachMS * float64(it.PerNode)
	}
	if math.Abs(sum-fl.MillisPerNode) > 1e-9*sum {
		t.Errorf("ms per node %v, items add up to %v", fl.MillisPerNode, sum)
	}
	if fl.Cores != min(runtime.GOMAXPROCS(0), runtime.NumCPU()) {
		t.Errorf("floor cores %d, want GOMAXPROCS %d capped at %d CPUs", fl.Cores, runtime.GOMAXPROCS(0), runtime.NumCPU())
	}
	if want := 60e3 * float64(fl.Cores) / fl.MillisPerNode; math.Abs(fl.NodesPerMin-want) > 1e-9*want {
		t.Errorf("floor nodes/min %v, want %v", fl.NodesPerMin, want)
	}
	if want := r.NodesPerMin / fl.NodesPerMin; math.Abs(fl.Efficiency-want) > 1e-9*want || fl.Efficiency <= 0 {
		t.Errorf("efficiency %v, want %v", fl.Efficiency, want)
	}
	all := r.CPUMillisPerNode + r.ChildCPUMillisPerNode + r.AgentCPUMillisPerNode
	if u := r.Machine.Use; u != nil {
		all = u.BusyMillisPerNode
	}
	if math.Abs(fl.CPUShare-fl.MillisPerNode/all) > 1e-9 || fl.CPUShare <= 0 {
		t.Errorf("CPU share %v, want %v / %v", fl.CPUShare, fl.MillisPerNode, all)
	}
	if r.FloorError != "" {
		t.Errorf("floor error %q with a floor", r.FloorError)
	}
	var out strings.Builder
	r.Print(&out)
	for _, it := range fl.Items {
		if !strings.Contains(out.String(), it.Name) {
			t.Errorf("table lacks floor item %q", it.Name)
		}
	}
}

// refuseIdentity fails every request for one identity.
type refuseIdentity struct {
	h  helper.Helper
	id string
}

func (r refuseIdentity) Provision(ctx context.Context, req *helper.Request) (*helper.Reply, error) {
	if req.Identity == r.id {
		return nil, errInjected
	}
	return r.h.Provision(ctx, req)
}

// TestFloorFailureKeepsTheRun: a helper that will not sign the floor's
// node leaves the floor out with the reason, and the run goes on.
func TestFloorFailureKeepsTheRun(t *testing.T) {
	o := Options{
		Nodes: 5, Workers: 2, IdleAgents: -1, Timeout: 2 * time.Minute, Settle: -1,
		WrapHelper: func(h helper.Helper) helper.Helper { return refuseIdentity{h: h, id: floorIdentity} },
	}
	r, err := Run(context.Background(), o)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if r.Provisioned != 5 || !r.OK() {
		t.Errorf("provisioned %d of 5", r.Provisioned)
	}
	if r.Floor != nil || !strings.Contains(r.FloorError, errInjected.Error()) || !strings.Contains(r.FloorError, "helper run") {
		t.Errorf("floor %+v, error %q: want none, and the helper's error", r.Floor, r.FloorError)
	}
	var out strings.Builder
	r.Print(&out)
	if !strings.Contains(out.String(), "floor") || !strings.Contains(out.String(), "not measured") {
		t.Errorf("table does not say the floor was not measured:\n%s", out.String())
	}
}

func TestNoFloor(t *testing.T) {
	r, err := Run(context.Background(), Options{Nodes: 3, Workers: 2, IdleAgents: -1, Timeout: 2 * time.Minute, Settle: -1, NoFloor: true})
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if r.Floor != nil || r.FloorError != "" || !r.OK() {
		t.Errorf("floor %+v, error %q, ok %v: want no floor", r.Floor, r.FloorError, r.OK())
	}
}

// TestLiveChildrenCPU: a running child's CPU is counted (a persistent
// helper's), and its end is not an error.
func TestLiveChildrenCPU(t *testing.T) {
	if _, err := exec.LookPath("sh"); err != nil {
		t.Skip("no sh")
	}
	before := liveChildrenCPU()
	cmd := exec.Command("sh", "-c", "while :; do :; done")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	deadline := time.Now().Add(30 * time.Second)
	for liveChildrenCPU() <= before {
		if time.Now().After(deadline) {
			t.Fatal("a busy child's CPU never showed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	_ = cmd.Process.Kill()
	_ = cmd.Wait()
	if got := liveChildrenCPU(); got != before {
		t.Errorf("after the child ended: %v, want %v (only live children count)", got, before)
	}
}

func TestMachineUse(t *testing.T) {
	at := func(busy, steal, idle time.Duration) machineTimes {
		return machineTimes{busy: busy, steal: steal, idle: idle, ok: true}
	}
	s := time.Second
	cases := []struct {
		name string
		a, b machineTimes
		want *MachineUse
	}{
		{"no /proc", machineTimes{}, at(s, 0, 0), nil},
		{"no time passed", at(s, s, s), at(s, s, s), nil},
		{"busy, stolen and idle", at(10*s, 2*s, 4*s), at(13*s, 3*s, 4*s), &MachineUse{BusyCores: 1.5, StolenCores: 0.5, IdleCores: 0, BusyMillisPerNode: 30}},
		{"half idle", at(0, 0, 0), at(s, 0, s), &MachineUse{BusyCores: 1, IdleCores: 1, BusyMillisPerNode: 10}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			got := machineUse(tc.a, tc.b, 2, 100)
			if (got == nil) != (tc.want == nil) || (got != nil && *got != *tc.want) {
				t.Errorf("machineUse = %+v, want %+v", got, tc.want)
			}
		})
	}
	if u := readMachineTimes(); u.ok && u.busy+u.idle+u.steal <= 0 {
		t.Errorf("/proc/stat read as %+v", u)
	}
}

func TestParseProcStat(t *testing.T) {
	tick := procfs.Tick
	cases := []struct {
		name, text string
		want       machineTimes
	}{
		// user nice system idle iowait irq softirq steal guest guest_nice
		{"linux", "cpu  100 1 20 300 4 5 6 70 0 0\ncpu0 50 0 10 150 2 2 3 35 0 0\n",
			machineTimes{busy: 132 * tick, steal: 70 * tick, idle: 304 * tick, ok: true}},
		{"no steal column", "cpu  100 1 20 300 4 5 6\n", machineTimes{}},
		{"not the cpu line", "intr 1 2 3 4 5 6 7 8 9\n", machineTimes{}},
		{"not a number", "cpu  100 x 20 300 4 5 6 70\n", machineTimes{}},
		{"empty", "", machineTimes{}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := parseProcStat(tc.text); got != tc.want {
				t.Errorf("parseProcStat = %+v, want %+v", got, tc.want)
			}
		})
	}
}

// TestFloorCores checks that the floor counts no more cores than the
// machine has, whatever GOMAXPROCS says.
func TestFloorCores(t *testing.T) {
	cpus := runtime.NumCPU()
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(cpus + 2))
	if got := floorCores(); got != cpus {
		t.Errorf("GOMAXPROCS %d on %d CPUs: floor cores %d, want %d", cpus+2, cpus, got, cpus)
	}
	runtime.GOMAXPROCS(1)
	if got := floorCores(); got != 1 {
		t.Errorf("GOMAXPROCS 1: floor cores %d, want 1", got)
	}
}
