//go:build linux

package faulttest

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/muster-io/muster/agent"
	"github.com/muster-io/muster/internal/fsutil"
)

// victimCount is how many nodes of the agent kill test run as their own
// muster-agent process (the rest of the thousand in fleetsim).
const victimCount = 60

// Kill points: the file event on which a victim is killed, spreading the
// kills over configure's atomic batch write.
const (
	// killAtFirstTemp: the first temporary (the key's) is created; every
	// file is still as it was.
	killAtFirstTemp = iota
	// killAtCertRenamed: the certificate was renamed into place, the
	// configuration not yet.
	killAtCertRenamed
	// killAtConfigRenamed: the configuration was renamed into place (the
	// batch is done): configure's reply and the restart never happen.
	killAtConfigRenamed
	killPoints
)

var killPointNames = [killPoints]string{"first temporary created", "certificate renamed", "configuration renamed"}

// victim is a node run as a muster-agent process, killed once.
type victim struct {
	id    string
	point int

	mu     sync.Mutex
	proc   *proc
	killed time.Time
	// left is what the kill left in the state directory.
	left string
}

// killer kills victims on inotify events in their directories.
type killer struct {
	t    *testing.T
	d    *deployment
	file *os.File
	wds  map[int32]*victim
	wg   sync.WaitGroup
}

func newKiller(t *testing.T, d *deployment) *killer {
	t.Helper()
	fd, err := syscall.InotifyInit1(syscall.IN_CLOEXEC | syscall.IN_NONBLOCK)
	if err != nil {
		t.Fatal(err)
	}
	// Non-blocking, so reads wait in the runtime's poller and Close ends
	// them.
	return &killer{t: t, d: d, file: os.NewFile(uintptr(fd), "inotify"), wds: map[int32]*victim{}}
}

// watch watches dir (created here) for victim v.
func (k *killer) watch(dir string, v *victim) {
	k.t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		k.t.Fatal(err)
	}
	wd, err := syscall.InotifyAddWatch(int(k.file.Fd()), dir, syscall.IN_CREATE|syscall.IN_MOVED_TO)
	if err != nil {
		k.t.Fatal(err)
	}
	k.wds[int32(wd)] = v
}

// run reads events until the file is closed, killing each victim at its
// kill point once and restarting it (as systemd would) 200 ms after it
// died.
func (k *killer) run() {
	buf := make([]byte, 64*1024)
	for {
		n, err := k.file.Read(buf)
		if err != nil {
			return
		}
		for off := 0; off+syscall.SizeofInotifyEvent <= n; {
			ev := (*syscall.InotifyEvent)(unsafe.Pointer(&buf[off]))
			name := string(bytes.TrimRight(buf[off+syscall.SizeofInotifyEvent:off+syscall.SizeofInotifyEvent+int(ev.Len)], "\x00"))
			off += syscall.SizeofInotifyEvent + int(ev.Len)
			v := k.wds[ev.Wd]
			if v == nil || !v.triggers(ev.Mask, name) {
				continue
			}
			v.mu.Lock()
			if !v.killed.IsZero() {
				v.mu.Unlock()
				continue
			}
			v.killed = time.Now()
			p := v.proc
			v.mu.Unlock()
			_ = syscall.Kill(-p.cmd.Process.Pid, syscall.SIGKILL)
			k.wg.Add(1)
			go k.restart(v, p)
		}
	}
}

func (v *victim) triggers(mask uint32, name string) bool {
	switch v.point {
	case killAtFirstTemp:
		return mask&syscall.IN_CREATE != 0 && fsutil.IsTemp(name, agent.KeyFile)
	case killAtCertRenamed:
		return mask&syscall.IN_MOVED_TO != 0 && name == agent.CertFile
	default:
		return mask&syscall.IN_MOVED_TO != 0 && name == agent.ConfigFileName
	}
}

// restart waits for the killed process, notes what it left, and starts the
// node again.
func (k *killer) restart(v *victim, p *proc) {
	defer k.wg.Done()
	<-p.done
	v.mu.Lock()
	v.left = leftovers(k.d.nodeDir(v.id))
	v.mu.Unlock()
	time.Sleep(200 * time.Millisecond) // systemd's RestartSec, not a synchronisation
	v.mu.Lock()
	defer v.mu.Unlock()
	np, err := k.d.startVictim(v.id)
	if err != nil {
		k.t.Errorf("restart %s: %v", v.id, err)
		return
	}
	v.proc = np
}

// leftovers describes what a killed agent left in its state directory.
func leftovers(dir string) string {
	var temps []string
	for _, d := range []string{dir, filepath.Join(dir, agent.SSLDirName)} {
		entries, _ := os.ReadDir(d)
		for _, e := range entries {
			if fsutil.IsTemp(e.Name(), "") {
				temps = append(temps, e.Name())
			}
		}
	}
	_, cfgErr := os.Stat(filepath.Join(dir, agent.ConfigFileName))
	_, certErr := os.Stat(filepath.Join(dir, agent.SSLDirName, agent.CertFile))
	return fmt.Sprintf("%d temporaries, certificate %t, configuration %t", len(temps), certErr == nil, !errors.Is(cfgErr, os.ErrNotExist))
}

// TestKillAgentsMidConfigure runs sixty of the thousand nodes as real
// muster-agent processes and kills each one (SIGKILL) once, in the middle
// of the atomic write configure makes: when its first temporary appears,
// when its certificate has been renamed into place, or when its
// configuration has (before configure's reply and before the restart).
// Each comes back 200 ms later, as under systemd, and is provisioned
// exactly once: from scratch, or with the key it already wrote, or (the
// configuration complete) straight into production, the provisioner
// learning it from the node's arrival with the new certificate. No torn or
// temporary file is left.
func TestKillAgentsMidConfigure(t *testing.T) {
	d := newDeployment(t, 3)
	d.startProvisioners()
	k := newKiller(t, d)
	var victims []*victim
	for i := fleetSize - victimCount; i < fleetSize; i++ {
		v := &victim{id: identity(i), point: i % killPoints}
		k.watch(filepath.Join(d.nodeDir(v.id), agent.SSLDirName), v)
		k.watch(d.nodeDir(v.id), v)
		victims = append(victims, v)
		d.victims[v.id] = true
	}
	go k.run()
	t.Cleanup(func() {
		k.file.Close()
		k.wg.Wait()
	})
	for _, v := range victims {
		// Held while starting, so the killer, woken by a configure that
		// came quicker than this goroutine, waits for the process.
		v.mu.Lock()
		p, err := d.startVictim(v.id)
		v.proc = p
		v.mu.Unlock()
		if err != nil {
			t.Fatal(err)
		}
	}
	d.startFleet(0, fleetSize-victimCount)
	for _, v := range victims {
		d.ids = append(d.ids, v.id)
	}
	d.beforeDisks = func() {
		for _, v := range victims {
			v.mu.Lock()
			p := v.proc
			v.mu.Unlock()
			p.stop(10 * time.Second)
		}
	}
	waitFor(t, convergeTimeout, "every victim killed once", func() bool {
		for _, v := range victims {
			v.mu.Lock()
			killed := !v.killed.IsZero()
			v.mu.Unlock()
			if !killed {
				return false
			}
		}
		return true
	})
	d.verify()
	k.wg.Wait()

	var recovery []time.Duration
	landed := map[string]int{}
	slowest, slowestID := time.Duration(0), ""
	for _, v := range victims {
		v.mu.Lock()
		r := d.arr.firstAt(v.id).Sub(v.killed)
		recovery = append(recovery, r)
		landed[killPointNames[v.point]+": "+v.left]++
		if r > slowest {
			slowest, slowestID = r, fmt.Sprintf("%s (%s: %s)", v.id, killPointNames[v.point], v.left)
		}
		v.mu.Unlock()
	}
	t.Logf("slowest back in production: %s after %.1fs", slowestID, slowest.Seconds())
	// Which recovery paths the kills exercised, from the provisioners' logs.
	paths := map[string]int{}
	for _, p := range d.provs {
		b, err := os.ReadFile(p.logFile)
		if err != nil {
			t.Fatal(err)
		}
		for _, msg := range []string{
			"configure not acknowledged, but the node arrived in production",
			"restart not confirmed, but the node arrived in production",
			"node arrived in production before its restart was confirmed",
			"provisioned although the attempt did not see it through",
		} {
			paths[msg] += bytes.Count(b, []byte(msg))
		}
	}
	t.Logf("recovery paths taken (provisioner log lines): %v", paths)
	var lines []string
	for what, n := range landed {
		lines = append(lines, fmt.Sprintf("%3d × %s", n, what))
	}
	t.Logf("where the kills landed (kill point: what the state directory held):\n%s", strings.Join(lines, "\n"))
	report(t, "killed_agent_in_production_p50", percentile(recovery, 50), fmt.Sprintf("victims=%d restart_after=200ms", len(victims)))
	report(t, "killed_agent_in_production_max", percentile(recovery, 100), "")
	report(t, "storm_total", time.Since(d.started), fmt.Sprintf("nodes=%d (%d muster-agent processes) provisioners=3", len(d.ids), victimCount))
}
