package helper

import (
	"runtime"
	"sync"
)

// forkP makes ReserveForkP act once per process.
var forkP sync.Once

// ReserveForkP raises GOMAXPROCS by one, once per process, for a process
// that execs a helper per node, unless getenv("GOMAXPROCS") is set (the
// operator chose). It returns GOMAXPROCS before and after (equal when
// left alone or already raised).
//
// Go starts a process with clone(2) as a raw system call, so the forking
// thread keeps its P until the child has exec'd (golang/go#11155). With
// one P per CPU, every fork takes one of them away for that time: on the
// 2-core machine of docs/performance.md, `muster bench --helper exec` left
// 0.2 of the 2 cores idle while runnable goroutines waited for a P
// (GODEBUG=schedtrace). Forks are serialised (syscall.ForkLock), so one P
// more covers the one a fork holds.
//
// Setting GOMAXPROCS this way stops the runtime from following later
// changes of the process's CPU limit.
func ReserveForkP(getenv func(string) string) (from, to int) {
	from = runtime.GOMAXPROCS(0)
	to = from
	if getenv("GOMAXPROCS") != "" {
		return from, to
	}
	forkP.Do(func() {
		to = from + 1
		runtime.GOMAXPROCS(to)
	})
	return from, to
}
