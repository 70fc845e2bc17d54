package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
)

// ErrNoGo is returned when the muster-agent binary has to be built and the
// go tool is not on PATH.
var ErrNoGo = errors.New("the go tool is not on PATH")

// agentPackage is the import path of the agent command.
const agentPackage = "github.com/muster-io/muster/cmd/muster-agent"

// AgentBinary returns a muster-agent binary for --processes: bin when set
// (it must be an executable file), otherwise one built with `go build` into
// a fresh directory under tmpDir (the module's source must be the current
// directory or above it, as in a clone). cleanup removes what was built.
func AgentBinary(ctx context.Context, bin, tmpDir string) (path string, cleanup func(), err error) {
	if bin != "" {
		st, err := os.Stat(bin)
		if err != nil {
			return "", nil, fmt.Errorf("agent-bin: %w", err)
		}
		if st.IsDir() || st.Mode().Perm()&0o111 == 0 {
			return "", nil, fmt.Errorf("agent-bin %s: not an executable file", bin)
		}
		abs, err := filepath.Abs(bin)
		if err != nil {
			return "", nil, fmt.Errorf("agent-bin: %w", err)
		}
		return abs, func() {}, nil
	}
	goTool, err := exec.LookPath("go")
	if err != nil {
		return "", nil, fmt.Errorf("build muster-agent: %w; build it (go build -o /tmp/muster-agent ./cmd/muster-agent) and pass --agent-bin", ErrNoGo)
	}
	dir, err := os.MkdirTemp(tmpDir, "muster-bench-agent-")
	if err != nil {
		return "", nil, err
	}
	cleanup = func() { os.RemoveAll(dir) }
	out := filepath.Join(dir, "muster-agent")
	cmd := exec.CommandContext(ctx, goTool, "build", "-o", out, agentPackage)
	// Static, as a fleet would deploy it: no dynamic loader at each start.
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if msg, err := cmd.CombinedOutput(); err != nil {
		cleanup()
		return "", nil, fmt.Errorf("build muster-agent (run from the Muster source tree, or pass --agent-bin): %w: %s", err, msg)
	}
	return out, cleanup, nil
}
