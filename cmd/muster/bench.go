package main

import (
	"encoding/json"
	"fmt"
	"os"
	"os/signal"
	"runtime"
	"runtime/pprof"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/bench"
	"github.com/muster-io/muster/internal/demo"
	"github.com/muster-io/muster/internal/logging"
)

// benchFailed is returned when some nodes were not provisioned exactly once.
type benchFailed struct{ missing, duplicates int }

func (b benchFailed) Error() string {
	return fmt.Sprintf("%d nodes not provisioned, %d provisioned more than once", b.missing, b.duplicates)
}
func (b benchFailed) ExitCode() int { return 2 }

func newBenchCmd() *cobra.Command {
	var (
		o        bench.Options
		asJSON   bool
		floor    bool
		procs    int
		logLevel string
		cpuProf  string
		memProf  string
	)
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure provisioning throughput with N simulated agents in one process",
		Long: `Runs a broker, a provisioner and N real agents in one process, each agent with its own state
directory and NATS connection, and provisions them. First an idle phase starts --idle-agents agents
with the provisioner paused to measure the heap an idle agent holds; then the provisioning phase
starts --nodes fresh agents (all at once, or --arrival ramp at --rate agents a second) and waits
until every one reaches production mode.

--transport inprocess connects the agents and the provisioner with nats.InProcessServer: no file
descriptors; the provisioning side runs without TLS, production connections use mutual TLS over the
in-process pipe, so the broker verifies every node's certificate as over TCP. --transport tcp uses
TLS over loopback and mutual TLS in production; each agent then needs two file descriptors (both
ends live in this process), as does each agent process of --processes. A fleet that would not fit in
the open-file limit (ulimit -n) is refused before it starts, with how many agents would fit.

It reports nodes/min, time to production (agent start to production connection), per-stage latency,
CPU per node (getrusage), peak RSS, memory per idle agent, the broker's traffic per node (messages,
bytes and connections, from its own counters: a figure to size brokers by), outcomes, errors and
retries by stage, and whether every node was provisioned exactly once (exit code 2 if not).

Before the clock starts it measures the floor (--floor, on by default, about a second): the CPU of
each piece of security work a node needs (its two connections with the broker's token and
certificate checks, request signatures and their checks, the token check, key and CSR, the CSR
check, one run of the run's helper, the reply and certificate checks), done alone with the run's
broker, CA, helper and key type. Their sum is what a node costs at least on this machine now; the
run reports the nodes/min that would give, the share of that rate it reached, and the share of its
own CPU per node that was floor work. It also says how the machine's cores were spent during the
run (/proc/stat): busy, stolen by the hypervisor (on a shared host the same run gets fewer cores at
a busy hour) and idle (where the pipeline waited on latency).

--processes runs every agent as its own muster-agent process instead (TCP + TLS, restarted by
re-executing itself, as on a real machine), for a like-for-like comparison with tools that run one
process per node; the agents' CPU and memory are read from /proc. The binary is --agent-bin, or
built with "go build" from the source tree the command runs in.

--fleet-process runs every agent in one other process instead (this binary, "muster bench
fleet-host", started before the clock; TCP + TLS, each agent with its own connection). This process
then holds only the provisioning side, broker and provisioner, and the report gives its CPU per node
with its helpers' as "provisioning side": the nodes/min a provisioning host with this machine's
cores would carry with the agents on their own machines. (The broker here is the production broker
too: the figure includes the broker's side of every production connection.) --processes gives the
same line.

An exec'd or persistent helper gets MUSTER_CA_DIR (the fleet's CA: ca.pem and ca-key.pem),
MUSTER_BROKER (the production broker), MUSTER_BIN and MUSTER_HELPER_BIN (muster-helper beside this
binary, which the example helpers sign with) in its environment, so the built-in helper
programs need no flags: "muster helper cfssl" (the whole muster binary, cfssl) or bin/muster-helper
(the same helper, crypto/x509 only, a small static binary that starts in a few milliseconds: the
one to measure an exec'd Go helper with; "make build" builds it).

--state-dir puts the agents' state directories on another filesystem: agents fsync their key,
certificate and configuration, so on one shared disk the disk is part of what is measured; a tmpfs
(/dev/shm) leaves the orchestration.

The provisioner keeps its identity registry in files (--registry file, the default: registry.json
and its journal in the provisioner's state_dir under --state-dir, as a deployment has it), or in
memory (--registry memory). --known-nodes N writes N other identities into it before the clock
starts, so the run provisions new nodes into a fleet that already exists.

--ha claims or leader runs the provisioners as a deployment of several does: they share node
state, claims and the identity registry (kv) through the broker's JetStream (one broker: one
replica). --provisioners N runs N of them, each with --workers workers; in claims mode they all
work and every node is provisioned under one claim, in leader mode one works and the others stand
by. The run checks that no node was provisioned twice, whichever provisioner did it.`,
		Example: `  muster bench --nodes 10000 --helper builtin --transport inprocess
  muster bench --nodes 3000 --transport tcp --json
  muster bench --nodes 2000 --helper exec --helper-cmd bin/muster-helper
  muster bench --nodes 5000 --helper persistent --helper-cmd "bin/muster-helper --persistent"
  muster bench --nodes 2000 --helper exec --helper-cmd "muster helper cfssl"
  muster bench --nodes 5000 --arrival ramp --rate 500
  muster bench --nodes 100 --processes --workers 8 --helper exec --helper-cmd bin/muster-helper
  muster bench --nodes 10000 --fleet-process --state-dir /dev/shm
  muster bench --nodes 10000 --state-dir /dev/shm
  muster bench --nodes 3000 --known-nodes 90000
  muster bench --nodes 3000 --ha claims --provisioners 2 --workers 8`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			log, closer, err := logging.New(logLevel, "")
			if err != nil {
				return err
			}
			defer closer.Close()
			if logLevel == "" {
				log.SetOutput(discard{})
			}
			o.Logger = log
			o.NoFloor = !floor
			if o.FleetProcess {
				self, err := os.Executable()
				if err != nil {
					return fmt.Errorf("fleet process: %w", err)
				}
				o.FleetCommand = []string{self, "bench", "fleet-host"}
			}
			switch {
			case procs > 0:
				// This process only: helpers and agent processes keep
				// their own default.
				runtime.GOMAXPROCS(procs)
			case o.Helper == bench.HelperExec:
				// As the provisioner command does.
				helper.ReserveForkP(os.Getenv)
			}
			if !asJSON {
				o.Progress = cmd.ErrOrStderr()
			}
			if cpuProf != "" {
				pf, err := os.Create(cpuProf)
				if err != nil {
					return err
				}
				defer pf.Close()
				if err := pprof.StartCPUProfile(pf); err != nil {
					return err
				}
				defer pprof.StopCPUProfile()
			}
			r, err := bench.Run(ctx, o)
			if err != nil {
				return err
			}
			if memProf != "" {
				// After the run: what is still live once every fleet is gone.
				pf, err := os.Create(memProf)
				if err != nil {
					return err
				}
				err = pprof.Lookup("heap").WriteTo(pf, 0)
				if cerr := pf.Close(); err == nil {
					err = cerr
				}
				if err != nil {
					return err
				}
			}
			if asJSON {
				enc := json.NewEncoder(cmd.OutOrStdout())
				enc.SetIndent("", "  ")
				if err := enc.Encode(r); err != nil {
					return err
				}
			} else {
				r.Print(cmd.OutOrStdout())
			}
			if !r.OK() {
				return benchFailed{missing: r.NotProvisioned, duplicates: r.Duplicates}
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.IntVarP(&o.Nodes, "nodes", "n", 1000, "number of simulated agents")
	f.IntVar(&o.Workers, "workers", 16, "provisioner workers (16: enough to keep 2 cores busy; the pipeline is latency-bound per worker)")
	f.StringVar(&o.Helper, "helper", bench.HelperBuiltin, "helper mode: builtin (in-process cfssl signer), exec or persistent")
	f.StringVar(&o.HelperCmd, "helper-cmd", "", "helper command for --helper exec or persistent")
	f.DurationVar(&o.HelperTimeout, "helper-timeout", 10*time.Second, "helper timeout")
	f.StringVar(&o.Arrival, "arrival", bench.ArrivalStorm, "arrival: storm (all agents at once) or ramp (--rate agents a second)")
	f.Float64Var(&o.Rate, "rate", 0, "agents started per second with --arrival ramp")
	f.StringVar(&o.KeyType, "key-type", "ecdsa-p256", "node key type: ecdsa-p256 or rsa")
	f.StringVar(&o.Transport, "transport", "", "agent and provisioner connections: inprocess or tcp (default inprocess; tcp with --processes)")
	f.IntVar(&o.IdleAgents, "idle-agents", 0, "agents in the idle-memory phase (0: --nodes, negative: skip the phase)")
	f.DurationVar(&o.RestartSplay, "restart-splay", time.Millisecond, "provisioner restart_splay (the longest random wait before a node restarts)")
	f.DurationVar(&o.DeferBackoff, "defer-backoff", 2*time.Second, "how long a failed node waits before it is taken again")
	f.DurationVar(&o.Timeout, "timeout", 10*time.Minute, "give up on the provisioning phase after this long")
	f.BoolVar(&o.Processes, "processes", false, "run every agent as its own muster-agent process over TCP + TLS (restart by re-exec), like real machines")
	f.BoolVar(&o.FleetProcess, "fleet-process", false, "run every agent in one other process (this binary) over TCP + TLS, so the report gives the provisioning side's CPU apart from the fleet's")
	f.StringVar(&o.AgentBin, "agent-bin", "", "muster-agent binary for --processes (default: build it with go build into a temporary directory)")
	f.StringVar(&o.Registry, "registry", "", "provisioner identity registry: file (its state_dir under --state-dir, as deployed; the default) or memory; kv (JetStream, the only one) with --ha claims or leader")
	f.StringVar(&o.HA, "ha", "single", "provisioners' ha.mode: single, claims (active-active, each node under a claim) or leader (one active, the others standing by); claims and leader share state through the broker's JetStream")
	f.IntVar(&o.Provisioners, "provisioners", 1, "provisioners to run (more than one needs --ha claims or leader); each has --workers workers")
	f.IntVar(&o.KnownNodes, "known-nodes", 0, "identities the file registry holds before the run (a fleet that already exists)")
	f.StringVar(&o.StateDir, "state-dir", "", "directory for the fleet's CA and agent state directories (default: the system temp dir; a tmpfs such as /dev/shm leaves the disk out)")
	f.BoolVar(&floor, "floor", true, "measure the floor first: what a node's security work (connections, signatures, key, CSR, helper, certificate checks) costs on this machine now, and the share of it the run reached")
	f.IntVar(&procs, "gomaxprocs", 0, "GOMAXPROCS of this process only (broker, provisioner, in-process agents); 0: Go's default, plus one with --helper exec as the provisioner command has it (a fork holds a P). Helper and agent processes keep theirs")
	f.BoolVar(&asJSON, "json", false, "print the result as JSON (no progress)")
	f.StringVar(&cpuProf, "cpuprofile", "", "write a CPU profile of the whole run to this file (go tool pprof)")
	f.StringVar(&memProf, "memprofile", "", "write a heap profile taken after the run (what stays live after cleanup; after --heap-settle when set) to this file")
	f.BoolVar(&o.RestartBroker, "restart-broker", false, "once every node is in production, restart the broker on the same address (an upgrade) and report how soon the nodes are connected again; needs --transport tcp")
	f.DurationVar(&o.HeapSettle, "heap-settle", 0, "after cleanup, keep collecting for up to this long until the live heap stops falling (no fall over 1% for 5 s), and report it: deadline timers of closed in-process connections keep part of the fleet live for a few seconds; 0 skips")
	f.StringVar(&logLevel, "loglevel", "", "show component logs at this level (default: none)")
	cmd.AddCommand(newBenchFleetHostCmd())
	return cmd
}

// newBenchFleetHostCmd is the fleet host of --fleet-process: started by
// bench, never by hand (hidden). It reads its agents' spec on standard
// input and writes their events on standard output.
func newBenchFleetHostCmd() *cobra.Command {
	return &cobra.Command{
		Use:    "fleet-host",
		Short:  "Run the simulated agents of muster bench --fleet-process (started by bench)",
		Hidden: true,
		Args:   cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			ctx, stop := signal.NotifyContext(cmd.Context(), os.Interrupt, syscall.SIGTERM)
			defer stop()
			return demo.ServeFleetHost(ctx, cmd.InOrStdin(), cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
}
