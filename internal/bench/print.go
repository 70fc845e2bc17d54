package bench

import (
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"

	"github.com/muster-io/muster/provisioner"
)

// Print writes the result as a human table.
func (r *Result) Print(w io.Writer) {
	p := func(label, format string, args ...any) {
		fmt.Fprintf(w, "%-26s "+format+"\n", append([]any{label}, args...)...)
	}
	gogc := "off"
	if r.Machine.GOGC >= 0 {
		gogc = strconv.Itoa(r.Machine.GOGC)
	}
	p("machine", "%d CPUs (GOMAXPROCS %d, GOGC %s), %s/%s, %s", r.Machine.CPUs, r.Machine.GOMAXPROC, gogc, r.Machine.GOOS, r.Machine.GOARCH, r.Machine.Go)
	helper := r.Helper
	if r.HelperCmd != "" {
		helper += fmt.Sprintf(" %q", r.HelperCmd)
	}
	arrival := r.Arrival
	if r.Rate > 0 {
		arrival += fmt.Sprintf(" %g/s", r.Rate)
	}
	p("run", "%d nodes, %d workers, helper %s, arrival %s, key %s, transport %s", r.Nodes, r.Workers, helper, arrival, r.KeyType, r.Transport)
	p("production connections", "%s", r.ProductionConnections)
	p("agent state", "%s", r.StateDir)
	switch r.Registry {
	case RegistryFile:
		p("identity registry", "file (journal + snapshot) under the agent state's directory, %d identities known before the run", r.KnownNodes)
	case RegistryKV:
		p("identity registry", "JetStream KV (MUSTER_REGISTRY), shared")
	default:
		p("identity registry", "in memory")
	}
	if r.HA != "" && r.HA != provisioner.HASingle {
		p("provisioners", "%d, ha mode %s (node state and claims in JetStream, one replica), %d workers each", r.Provisioners, r.HA, r.Workers)
	}
	if r.Processes {
		p("agents", "one muster-agent process each (TCP + TLS, restart by re-exec)")
	}
	if r.FleetProcess {
		p("agents", "all in one other process, the fleet host (TCP + TLS each)")
	}
	p("provisioned", "%d of %d (%d not provisioned)", r.Provisioned, r.Nodes, r.NotProvisioned)
	if len(r.ProvisionedBy) > 1 {
		by := make([]string, len(r.ProvisionedBy))
		for i, n := range r.ProvisionedBy {
			by[i] = strconv.Itoa(n)
		}
		p("provisioned by", "%s (provisioner by provisioner)", strings.Join(by, " / "))
	}
	p("provisioned twice or more", "%d %s", r.Duplicates, strings.Join(r.DuplicateIdentities, " "))
	p("production reconnects", "%d", r.ProductionReconnects)
	p("time", "%.2fs (first agent start to last production connection)", r.Seconds)
	p("rate", "%.0f nodes/min", r.NodesPerMin)
	t := r.TimeToProduction
	p("time to production", "p50 %.3fs  p95 %.3fs  p99 %.3fs  max %.3fs", t.P50, t.P95, t.P99, t.Max)
	fmt.Fprintf(w, "%-26s %8s %10s %10s  %s\n", "stage", "count", "mean ms", "p95 ms", "source")
	for _, s := range r.Stages {
		src := s.Source
		if s.Metric != "" {
			src += " " + s.Metric
		}
		fmt.Fprintf(w, "  %-24s %8d %10.3f %10.3f  %s\n", s.Stage, s.Count, s.MeanMS, s.P95MS, src)
	}
	p("CPU", "%.2fs self (%.3f ms/node), %.2fs helper processes (%.3f ms/node)", r.CPUSeconds, r.CPUMillisPerNode, r.ChildCPUSeconds, r.ChildCPUMillisPerNode)
	if u := r.Machine.Use; u != nil {
		p("machine CPU", "of %d cores: %.2f busy (%.3f ms/node, every process and the kernel), %.2f stolen by the hypervisor, %.2f idle",
			r.Machine.CPUs, u.BusyCores, u.BusyMillisPerNode, u.StolenCores, u.IdleCores)
	}
	if r.Processes {
		p("agent processes", "%.2fs CPU (%.3f ms/node, /proc), %.1f MB RSS each (%d processes, idle in production)",
			r.AgentCPUSeconds, r.AgentCPUMillisPerNode, r.AgentProcessRSSMB, r.AgentProcesses)
	}
	if r.FleetProcess {
		per := 0.0
		if r.Nodes > 0 {
			per = r.FleetProcessRSSMB * 1024 / float64(r.Nodes)
		}
		p("fleet process", "%.2fs CPU (%.3f ms/node, /proc), %.0f MB RSS (%.1f KB per agent, in production)",
			r.AgentCPUSeconds, r.AgentCPUMillisPerNode, r.FleetProcessRSSMB, per)
	}
	if ps := r.ProvisioningSide; ps != nil {
		p("provisioning side", "%.3f ms CPU per node (this process and its helpers): %.0f nodes/min on %d cores with the agents on their own machines",
			ps.MillisPerNode, ps.NodesPerMin, ps.Cores)
	}
	switch {
	case r.Floor != nil:
		fl := r.Floor
		p("floor", "%.3f ms CPU per node: %.0f nodes/min on %d whole cores; this run reached %.0f%% of that rate, and %.0f%% of its CPU per node was floor work",
			fl.MillisPerNode, fl.NodesPerMin, fl.Cores, 100*fl.Efficiency, 100*fl.CPUShare)
		for _, it := range fl.Items {
			fmt.Fprintf(w, "  %-58s %d x %7.3f ms\n", it.Name, it.PerNode, it.EachMS)
		}
	case r.FloorError != "":
		p("floor", "not measured: %s", r.FloorError)
	}
	if b := r.Broker; b != nil {
		p("broker traffic", "per node %.1f msgs in, %.1f out, %.1f KB in, %.1f KB out, %.2f connections; %d slow consumers",
			b.MsgsInPerNode, b.MsgsOutPerNode, b.BytesInPerNode/1024, b.BytesOutPerNode/1024, b.ConnectionsPerNode, b.SlowConsumers)
		p("broker authentications", "%s", b.authentications())
	}
	if rs := r.Restart; rs != nil {
		back := func(v float64) string {
			if v < 0 {
				return "never"
			}
			return fmt.Sprintf("%.2fs", v)
		}
		p("broker restart", "%d of %d nodes connected again; down %.2fs, then 50%% back in %s, 90%% %s, 99%% %s, all %s; %.3f ms CPU per node",
			rs.Reconnected, rs.Nodes, rs.DownSeconds, back(rs.Back50), back(rs.Back90), back(rs.Back99), back(rs.BackAll), rs.CPUMillisPerNode)
		if b := rs.Broker; b != nil {
			p("  new broker", "%.2f connections per node; authentications %s", b.ConnectionsPerNode, b.authentications())
		}
	}
	p("peak RSS", "%.0f MB (this process)", r.PeakRSSMB)
	if r.IdleAgents > 0 {
		p("memory per idle agent", "%.1f KB heap, %.1f goroutines (%d idle agents)", r.IdleAgentHeapBytes/1024, r.IdleAgentGoroutines, r.IdleAgents)
	} else {
		p("memory per idle agent", "not measured")
	}
	p("live heap / goroutines", "before %.1f MB / %d, all in production %.1f MB / %d, after cleanup %.1f MB / %d",
		r.HeapLiveBeforeMB, r.GoroutinesBefore, r.HeapLiveAtEndMB, r.GoroutinesAtEnd, r.HeapLiveAfterMB, r.GoroutinesAfterCleanup)
	if r.HeapSettleSeconds > 0 {
		state := "settled"
		if !r.HeapSettled {
			state = "still falling"
		}
		p("live heap, settled", "%.1f MB after %.1f s (%s)", r.HeapLiveSettledMB, r.HeapSettleSeconds, state)
	}
	p("outcomes", "%s", kv(r.Outcomes))
	if len(r.FailedByStage) > 0 {
		p("failed attempts by stage", "%s", kv(r.FailedByStage))
	}
	p("announcements dropped", "%.0f with the queue full, %s before they were read (intake full)", r.QueueShed, kv(r.IntakeDropped))
	p("errors_total by stage", "%s", kv(r.Errors))
	p("retries_total by stage", "%s", kv(r.Retries))
	if r.HA != "" && r.HA != provisioner.HASingle {
		p("claims lost by stage", "%s", kv(r.ClaimsLost))
		p("claim conflicts", "%.0f (nodes dequeued that another provisioner held or had finished)", r.ClaimConflicts)
	}
	ids := make([]string, 0, len(r.SampleErrors))
	for id := range r.SampleErrors {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	for _, id := range ids {
		p("last error", "%s: %s", id, r.SampleErrors[id])
	}
}

// kv formats a map as sorted key=value pairs, or "none".
func kv[V int | float64](m map[string]V) string {
	if len(m) == 0 {
		return "none"
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	parts := make([]string, len(keys))
	for i, k := range keys {
		parts[i] = fmt.Sprintf("%s=%v", k, m[k])
	}
	return strings.Join(parts, " ")
}

// authentications is the broker's authentications by result, its
// refusals and the connections that never got as far, as one line.
func (b *BrokerTraffic) authentications() string {
	return fmt.Sprintf("%s; refused: %.0f for the token, %.0f for an identity already connected; %d closed before authenticating",
		kv(b.Authentications), b.TokenRefusals, b.DuplicateRefusals, b.Unauthenticated)
}
