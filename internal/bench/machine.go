package bench

import (
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/muster-io/muster/internal/procfs"
)

// machineTimes is the whole machine's CPU time so far, from the first line
// of /proc/stat. ok is false without /proc.
type machineTimes struct {
	busy  time.Duration // user, nice, system, irq, softirq: every process and the kernel
	steal time.Duration // taken by the hypervisor while this VM wanted to run
	idle  time.Duration // idle and iowait
	ok    bool
}

func readMachineTimes() machineTimes {
	b, err := os.ReadFile("/proc/stat")
	if err != nil {
		return machineTimes{}
	}
	return parseProcStat(string(b))
}

// parseProcStat reads the machine's times from the text of /proc/stat.
func parseProcStat(text string) machineTimes {
	line, _, _ := strings.Cut(text, "\n")
	f := strings.Fields(line)
	if len(f) < 9 || f[0] != "cpu" {
		return machineTimes{}
	}
	var v [8]int64 // user nice system idle iowait irq softirq steal
	for i := range v {
		var err error
		if v[i], err = strconv.ParseInt(f[i+1], 10, 64); err != nil {
			return machineTimes{}
		}
	}
	tick := procfs.Tick
	return machineTimes{
		busy:  time.Duration(v[0]+v[1]+v[2]+v[5]+v[6]) * tick,
		steal: time.Duration(v[7]) * tick,
		idle:  time.Duration(v[3]+v[4]) * tick,
		ok:    true,
	}
}

// MachineUse is how the machine's CPUs were spent during the provisioning
// phase, in cores (averages over the phase; they add up to the CPU count).
type MachineUse struct {
	// BusyCores ran something: this run's processes, anything else, the
	// kernel.
	BusyCores float64 `json:"busy_cores"`
	// StolenCores were taken by the hypervisor while this VM had work
	// (steal time): on a shared host the same run gets fewer cores at a
	// busy hour. Part of it can be the run's own doing: on a nested VM
	// process starts and cross-CPU wake-ups go through the hypervisor
	// (docs/performance.md).
	StolenCores float64 `json:"stolen_cores"`
	// IdleCores had nothing to run: the run waited on latency there.
	IdleCores float64 `json:"idle_cores"`
	// BusyMillisPerNode is the busy time per node provisioned.
	BusyMillisPerNode float64 `json:"busy_ms_per_node"`
}

// machineUse turns two readings into a MachineUse for cpus CPUs and nodes
// provisioned; nil when either reading failed or no time passed.
func machineUse(a, b machineTimes, cpus, nodes int) *MachineUse {
	if !a.ok || !b.ok {
		return nil
	}
	busy, steal, idle := b.busy-a.busy, b.steal-a.steal, b.idle-a.idle
	all := busy + steal + idle
	if all <= 0 {
		return nil
	}
	c := float64(cpus) / float64(all)
	u := &MachineUse{BusyCores: float64(busy) * c, StolenCores: float64(steal) * c, IdleCores: float64(idle) * c}
	if nodes > 0 {
		u.BusyMillisPerNode = busy.Seconds() * 1000 / float64(nodes)
	}
	return u
}
