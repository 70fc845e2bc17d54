package provisioner

import (
	"bufio"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// registryWriterEnv names the state directory the registry writer child
// writes to.
const registryWriterEnv = "MUSTER_TEST_REGISTRY_WRITER"

// registryWriterKeys is how many identities each writer goroutine cycles
// through: a small registry, so its journal is folded every few hundred
// Puts and kills land in folds too.
const registryWriterKeys = 16

// TestRegistryWriterProcess is the child of TestFileRegistrySurvivesKill:
// eight goroutines put records into the registry as fast as they can, each
// cycling through its own identities with rising serials, and print
// "identity serial" once a Put has returned.
func TestRegistryWriterProcess(t *testing.T) {
	dir := os.Getenv(registryWriterEnv)
	if dir == "" {
		t.Skip("run by TestFileRegistrySurvivesKill")
	}
	r, err := OpenFileRegistry(dir)
	if err != nil {
		fmt.Println("open:", err)
		os.Exit(1)
	}
	r.minFold = 4 << 10
	base, _ := strconv.ParseUint(os.Getenv(registryWriterEnv+"_BASE"), 10, 64)
	fp := "sha256:" + strings.Repeat("ab", 32)
	var out sync.Mutex
	var wg sync.WaitGroup
	for g := 0; g < 8; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := uint64(0); ; i++ {
				id := fmt.Sprintf("w%d-%d.example.net", g, i%registryWriterKeys)
				serial := base + i + 1
				if err := r.Put(Record{Identity: id, KeyFingerprint: fp, Serial: strconv.FormatUint(serial, 16)}); err != nil {
					fmt.Println("put:", err)
					os.Exit(1)
				}
				out.Lock()
				fmt.Println(id, serial)
				out.Unlock()
			}
		}()
	}
	wg.Wait()
}

// TestFileRegistrySurvivesKill kills a process writing the registry
// (SIGKILL at a random time, so in appends, syncs and folds)
// twenty times in one state directory: each time the registry opens, and
// every identity holds its last acknowledged record or a later one.
func TestFileRegistrySurvivesKill(t *testing.T) {
	if testing.Short() {
		t.Skip("starts writer processes")
	}
	dir := t.TempDir()
	acked := map[string]uint64{} // identity -> last acknowledged serial
	for round := 0; round < 20; round++ {
		cmd := exec.Command(os.Args[0], "-test.run=^TestRegistryWriterProcess$", "-test.count=1")
		cmd.Env = append(os.Environ(), registryWriterEnv+"="+dir, fmt.Sprintf("%s_BASE=%d", registryWriterEnv, uint64(round)*1_000_000_000))
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		// The kill comes at a random time once the writer is writing, not
		// after a number of lines: a writer blocked on a full pipe would be
		// killed between Puts every time.
		first := make(chan struct{})
		go func() {
			select {
			case <-first:
				time.Sleep(time.Duration(2+rand.IntN(40)) * time.Millisecond)
			case <-time.After(time.Minute):
			}
			_ = cmd.Process.Signal(syscall.SIGKILL)
		}()
		sc := bufio.NewScanner(stdout)
		n := 0
		for sc.Scan() {
			line := sc.Text()
			if strings.HasPrefix(line, "open:") || strings.HasPrefix(line, "put:") {
				t.Fatalf("round %d: writer: %s", round, line)
			}
			id, s, ok := strings.Cut(line, " ")
			serial, err := strconv.ParseUint(s, 10, 64)
			if !ok || err != nil || !strings.HasPrefix(id, "w") {
				continue // the test framework's own output
			}
			acked[id] = max(acked[id], serial)
			if n++; n == 1 {
				close(first)
			}
		}
		err = cmd.Wait()
		if st, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !st.Signaled() {
			t.Fatalf("round %d: the writer was not killed but ended: %v after %d Puts", round, err, n)
		}
		r, err := OpenFileRegistry(dir)
		if err != nil {
			t.Fatalf("round %d: open after the kill: %v", round, err)
		}
		for id, want := range acked {
			rec, ok, _ := r.Get(id)
			got, _ := strconv.ParseUint(rec.Serial, 16, 64)
			if !ok || got < want {
				t.Fatalf("round %d: %s holds serial %d (%v), acknowledged %d", round, id, got, ok, want)
			}
		}
		if err := r.Close(); err != nil {
			t.Fatal(err)
		}
		t.Logf("round %d: killed after %d acknowledged Puts; every identity kept its last", round, n)
	}
}
