//go:build !linux

package demo

import "syscall"

// agentProcAttr puts an agent process in its own process group (a
// terminal's Ctrl-C reaches the fleet, which stops the agents in order).
func agentProcAttr() *syscall.SysProcAttr {
	return &syscall.SysProcAttr{Setpgid: true}
}
