package faulttest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"
)

// programs are the commands the tests run, built once (without the race
// detector: they are the deployment under test, not the test) into the
// directory TestMain makes and removes.
type programs struct {
	muster, agent, fleetsim, faulthelper string
}

var build struct {
	dir  string
	once sync.Once
	bins programs
	err  error
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "muster-faulttest-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	build.dir = dir
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// bins builds the programs on first use (a run that selects no test, such
// as a benchmark run, builds nothing).
func bins(t *testing.T) programs {
	t.Helper()
	build.once.Do(func() {
		cmd := exec.Command("go", "build", "-o", build.dir+string(filepath.Separator),
			"../../cmd/muster", "../../cmd/muster-agent", "./fleetsim", "./faulthelper")
		if out, err := cmd.CombinedOutput(); err != nil {
			build.err = fmt.Errorf("build the fault test programs: %w\n%s", err, out)
			return
		}
		build.bins = programs{
			muster:      filepath.Join(build.dir, "muster"),
			agent:       filepath.Join(build.dir, "muster-agent"),
			fleetsim:    filepath.Join(build.dir, "fleetsim"),
			faulthelper: filepath.Join(build.dir, "faulthelper"),
		}
	})
	if build.err != nil {
		t.Fatal(build.err)
	}
	return build.bins
}
