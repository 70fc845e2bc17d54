package demo

import "fmt"

// fileReserve is what a fleet needs in file descriptors besides its
// agents' connections: the broker's listeners, the provisioner's
// connections and state files, JetStream's files, helper pipes.
const fileReserve = 256

// filesPerAgent is how many file descriptors each agent holds in this
// process while it runs: none in-process (pipes), two over TCP (both ends
// of its connection live here), two in process mode (the broker's end of
// the agent's connection and the pidfd of its process), one with a fleet
// host (the broker's end; the host checks its own limit).
func filesPerAgent(o Options) int {
	switch {
	case o.InProcess && o.AgentBin == "":
		return 0
	case len(o.FleetHost) > 0:
		return 1
	}
	return 2
}

// filesNeeded is the file descriptors a fleet of o needs at its peak: its
// agents' with a tenth more (a closed connection's server end goes
// a moment after the agent has dialled its next) and the rest.
func filesNeeded(o Options) int {
	per := filesPerAgent(o)
	return per*o.Nodes + per*o.Nodes/10 + filesBesideAgents(o)
}

// filesBesideAgents is the helper processes' pipes (three per worker) and
// the reserve.
func filesBesideAgents(o Options) int {
	return 3*o.Workers*max(o.Provisioners, 1) + fileReserve
}

// openFileLimit returns this process's limit on open files (RLIMIT_NOFILE,
// soft; Go raises it to the hard limit at start), ok false where there is
// none to read. A variable for the tests.
var openFileLimit = readOpenFileLimit

// checkFileLimit refuses a fleet that would run out of file descriptors
// part way through: without it, a run past the limit fails agent after
// agent with "too many open files" and retries for minutes.
func checkFileLimit(o Options) error {
	per := filesPerAgent(o)
	if per == 0 {
		return nil
	}
	limit, ok := openFileLimit()
	if !ok {
		return nil
	}
	need := filesNeeded(o)
	if uint64(need) <= limit {
		return nil
	}
	how := "over TCP both ends of each agent's connection live in this process"
	switch {
	case o.AgentBin != "":
		how = "each agent process holds its broker connection and its process handle here"
	case len(o.FleetHost) > 0:
		how = "the broker's end of each agent's connection lives in this process"
	}
	fit := (int(limit) - filesBesideAgents(o)) * 10 / (11 * per)
	return fmt.Errorf("%d agents need about %d open files (%d each: %s), and this process may open %d (RLIMIT_NOFILE): raise the limit (ulimit -n) or run at most %d agents (in-process agents, muster bench --transport inprocess, need none)",
		o.Nodes, need, per, how, limit, max(fit, 0))
}
