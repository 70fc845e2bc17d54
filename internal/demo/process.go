package demo

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/nats-io/nats.go"

	"github.com/muster-io/muster/agent"
	"github.com/muster-io/muster/internal/fsutil"
	"github.com/muster-io/muster/internal/procfs"
	"github.com/muster-io/muster/internal/protocol"
	"github.com/muster-io/muster/internal/token"
)

// Process mode: with Options.AgentBin every agent is its own muster-agent
// process over TCP + TLS, the way a real machine runs it, restarted by
// re-executing itself. The fleet learns that a node reached production from
// the lifecycle "provisioned" event the agent publishes on its production
// connection (mutual TLS), received on the fleet's admin connection.

// agentProc is one running muster-agent process.
type agentProc struct {
	id   string
	cmd  *exec.Cmd
	done chan struct{} // closed when the process has been waited for
	err  error         // its exit error, valid after done
}

// processArgs is the command line of node i's agent.
func (f *Fleet) processArgs(i int, brokerURL, caFile string) (args []string, dir string, err error) {
	id := Identity(i)
	dir = filepath.Join(f.dir, "agents", id)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, "", err
	}
	facts, err := json.Marshal(f.opts.Facts(i))
	if err != nil {
		return nil, "", err
	}
	factsFile := filepath.Join(dir, "facts.json")
	if err := fsutil.WriteFileAtomic(factsFile, facts, 0o600); err != nil {
		return nil, "", err
	}
	return []string{
		"run",
		"--identity", id,
		"--state-dir", dir,
		"--provisioning-broker", brokerURL,
		"--ca", caFile,
		"--facts", factsFile,
		"--provision",
		"--loglevel", "warn",
		"--logfile", filepath.Join(dir, "agent.log"),
	}, dir, nil
}

// procSpec is how one agent process is started.
type procSpec struct {
	args []string
	dir  string
	env  []string
}

// prepareProcesses makes every agent's state directory, facts file, token
// and command line, and subscribes to the production lifecycle events, so
// that starting an agent is only the fork and exec. Each agent trusts the
// provisioner key provKey; its provisioning token goes in the environment
// (MUSTER_TOKEN), never on the command line.
func (f *Fleet) prepareProcesses(brokerURL string, issuer *token.Issuer, provKey string) error {
	if f.opts.InProcess {
		return errProcessesInProcess
	}
	if err := f.watchProduction(); err != nil {
		return err
	}
	caFile := filepath.Join(f.dir, "pki", "ca.pem")
	env := os.Environ()
	now := time.Now()
	f.specs = make([]procSpec, 0, len(f.ids))
	for i, id := range f.ids {
		args, dir, err := f.processArgs(i, brokerURL, caFile)
		if err != nil {
			return fmt.Errorf("agent %s: %w", id, err)
		}
		tok, err := nodeToken(issuer, id, now)
		if err != nil {
			return err
		}
		f.specs = append(f.specs, procSpec{
			args: append(args, "--provisioner-key", provKey),
			dir:  dir,
			env:  append(env[:len(env):len(env)], "MUSTER_TOKEN="+tok),
		})
	}
	return nil
}

// startProcess starts node i's agent process as prepareProcesses set it up.
func (f *Fleet) startProcess(i int) error {
	sp := f.specs[i]
	cmd := exec.Command(f.opts.AgentBin, sp.args...)
	cmd.Dir = sp.dir
	cmd.Env = sp.env
	cmd.SysProcAttr = agentProcAttr()
	if f.opts.OnAgentStart != nil {
		f.opts.OnAgentStart(Identity(i), time.Now())
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("start agent %s: %w", Identity(i), err)
	}
	p := &agentProc{id: Identity(i), cmd: cmd, done: make(chan struct{})}
	f.mu.Lock()
	f.procs = append(f.procs, p)
	late := f.stopping // Close began while this one was starting
	f.mu.Unlock()
	if late {
		_ = cmd.Process.Kill()
	}
	f.wg.Add(1)
	go func() {
		defer f.wg.Done()
		p.err = cmd.Wait()
		close(p.done)
		f.mu.Lock()
		stopping := f.stopping
		f.mu.Unlock()
		if !stopping {
			f.mu.Lock()
			f.runErr = append(f.runErr, fmt.Errorf("agent process %s exited: %v", p.id, p.err))
			f.mu.Unlock()
		}
	}()
	return nil
}

// watchProduction reports every agent process's production connection to
// the observer, from the lifecycle events on the production side.
func (f *Fleet) watchProduction() error {
	nc, err := f.AdminConn()
	if err != nil {
		return fmt.Errorf("admin connection: %w", err)
	}
	// A node publishes its event again, with the same ID, after a
	// reconnection and a few times more in case it was lost: one arrival
	// per ID. (The callback runs on one goroutine.)
	seen := map[string]string{}
	_, err = nc.Subscribe(protocol.LifecycleSubject(protocol.EventProvisioned, protocol.AgentComponent, ">"), func(m *nats.Msg) {
		ev, err := protocol.DecodeEventFrom(m.Subject, m.Data)
		if err != nil || ev.ID != "" && seen[ev.Identity] == ev.ID {
			return
		}
		seen[ev.Identity] = ev.ID
		observer{f}.ModeChanged(ev.Identity, agent.ModeProduction, time.Now())
	})
	if err == nil {
		err = nc.Flush()
	}
	if err != nil {
		nc.Close()
		return fmt.Errorf("watch lifecycle events: %w", err)
	}
	f.watchConn = nc
	return nil
}

// stopProcesses asks every agent process to stop (SIGTERM), waits up to
// grace, then kills what is left.
func (f *Fleet) stopProcesses(grace time.Duration) {
	f.mu.Lock()
	f.stopping = true
	procs := append([]*agentProc(nil), f.procs...)
	f.mu.Unlock()
	for _, p := range procs {
		_ = p.cmd.Process.Signal(syscall.SIGTERM)
	}
	deadline := time.NewTimer(grace)
	defer deadline.Stop()
	for _, p := range procs {
		select {
		case <-p.done:
			continue
		case <-deadline.C:
		}
		for _, q := range procs {
			select {
			case <-q.done:
			default:
				_ = q.cmd.Process.Kill()
			}
		}
		break
	}
}

// ProcessStats are the resources the agent processes use, read from /proc
// while they run (Linux only).
type ProcessStats struct {
	// Processes is how many agent processes were alive and read.
	Processes int
	// CPUSeconds is their user+system CPU time since they started,
	// re-executions included (same PID).
	CPUSeconds float64
	// RSSBytes is their total resident memory.
	RSSBytes float64
}

// ProcessStats reads the CPU time and resident memory of every running
// agent process.
func (f *Fleet) ProcessStats() (ProcessStats, error) {
	f.mu.Lock()
	procs := append([]*agentProc(nil), f.procs...)
	f.mu.Unlock()
	var st ProcessStats
	for _, p := range procs {
		select {
		case <-p.done:
			continue
		default:
		}
		ps, err := procfs.ReadStat(p.cmd.Process.Pid)
		if err != nil {
			return st, err
		}
		st.Processes++
		st.CPUSeconds += (ps.User + ps.System).Seconds()
		st.RSSBytes += float64(ps.RSSPages) * float64(os.Getpagesize())
	}
	return st, nil
}

// AgentPIDs returns the process IDs of the running agent processes, or of
// the fleet host.
func (f *Fleet) AgentPIDs() []int {
	f.mu.Lock()
	defer f.mu.Unlock()
	pids := make([]int, 0, len(f.procs)+1)
	if h := f.host; h != nil {
		select {
		case <-h.done:
		default:
			pids = append(pids, h.cmd.Process.Pid)
		}
	}
	for _, p := range f.procs {
		select {
		case <-p.done:
		default:
			pids = append(pids, p.cmd.Process.Pid)
		}
	}
	return pids
}

// errProcessesInProcess refuses a fleet that asks for both.
var errProcessesInProcess = errors.New("agent processes connect over TCP: AgentBin and InProcess exclude each other")
