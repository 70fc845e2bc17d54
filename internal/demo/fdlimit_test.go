package demo

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"testing"
)

// TestCheckFileLimit: a fleet whose agents' connections would not fit in
// the process's open-file limit is refused before it starts, with the
// limit, what it needs and how many agents would fit; in-process agents
// need none.
func TestCheckFileLimit(t *testing.T) {
	limit, readable := uint64(1000), true
	saved := openFileLimit
	openFileLimit = func() (uint64, bool) { return limit, readable }
	t.Cleanup(func() { openFileLimit = saved })

	cases := []struct {
		name string
		o    Options
		ok   bool
	}{
		{"tcp, fits", Options{Nodes: 300, Workers: 8}, true},
		{"tcp, too many", Options{Nodes: 500, Workers: 8}, false},
		{"processes, too many", Options{Nodes: 500, Workers: 8, AgentBin: "/bin/muster-agent"}, false},
		{"in-process, any number", Options{Nodes: 1_000_000, Workers: 8, InProcess: true}, true},
		{"workers count too", Options{Nodes: 300, Workers: 100, Provisioners: 2}, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			err := checkFileLimit(tc.o)
			if tc.ok {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if err == nil {
				t.Fatalf("%d agents accepted with a limit of %d open files (need %d)", tc.o.Nodes, limit, filesNeeded(tc.o))
			}
			for _, want := range []string{strconv.Itoa(tc.o.Nodes) + " agents", "1000 (RLIMIT_NOFILE)", "ulimit -n", fmt.Sprint(filesNeeded(tc.o))} {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q lacks %q", err, want)
				}
			}
			// The number of agents it says would fit does.
			m := regexp.MustCompile(`at most (\d+) agents`).FindStringSubmatch(err.Error())
			if m == nil {
				t.Fatalf("error %q does not say how many agents fit", err)
			}
			fit, _ := strconv.Atoi(m[1])
			o := tc.o
			o.Nodes = fit
			if err := checkFileLimit(o); err != nil {
				t.Errorf("%d agents, which the error says fit, refused: %v", fit, err)
			}
			o.Nodes = fit + 10
			if checkFileLimit(o) == nil {
				t.Errorf("%d agents fit, more than the %d the error says", fit+10, fit)
			}
		})
	}

	t.Run("New refuses it", func(t *testing.T) {
		dir := t.TempDir()
		if _, err := New(Options{Nodes: 500, Dir: dir}); err == nil || !strings.Contains(err.Error(), "RLIMIT_NOFILE") {
			t.Fatalf("New: %v, want the open-file limit", err)
		}
	})

	readable = false
	if err := checkFileLimit(Options{Nodes: 100_000}); err != nil {
		t.Errorf("no readable limit: %v, want no check", err)
	}
}
