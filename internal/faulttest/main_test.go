package faulttest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// bins are the programs TestMain builds (without the race detector: they
// are the deployment under test, not the test).
var bins struct {
	muster, agent, fleetsim, faulthelper string
}

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "muster-faulttest-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	cmd := exec.Command("go", "build", "-o", dir+string(filepath.Separator),
		"../../cmd/muster", "../../cmd/muster-agent", "./fleetsim", "./faulthelper")
	if out, err := cmd.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build the fault test programs: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	bins.muster = filepath.Join(dir, "muster")
	bins.agent = filepath.Join(dir, "muster-agent")
	bins.fleetsim = filepath.Join(dir, "fleetsim")
	bins.faulthelper = filepath.Join(dir, "faulthelper")
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}
