package demo

import "syscall"

// agentProcAttr puts an agent process in its own process group (a
// terminal's Ctrl-C reaches the fleet, which stops the agents in order) and
// has the kernel terminate it if the fleet's process dies without stopping
// it.
func agentProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
}
