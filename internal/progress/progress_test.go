package progress

import (
	"io"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/muster-io/muster/internal/syncbuf"
)

// TestLines: off a terminal the meter writes whole lines (no carriage
// returns), one every interval while it runs, and a last one at Done that
// says whether everything was done.
func TestLines(t *testing.T) {
	cases := []struct {
		name  string
		add   int
		final string
	}{
		{"all done", 50, "provisioning 50/50 nodes (100%)"},
		{"stopped short", 20, "provisioning 20/50 nodes (40%)"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			var buf syncbuf.Buffer
			m := New(&buf, 50, Options{Description: "provisioning", Unit: "nodes", Interval: 10 * time.Millisecond})
			if m.bar != nil {
				t.Fatal("a bar on a buffer")
			}
			var wg sync.WaitGroup
			for range tc.add {
				wg.Add(1)
				go func() { defer wg.Done(); m.Add(1) }()
			}
			wg.Wait()
			// Lines come while the run goes on, whether or not
			// anything moves.
			deadline := time.Now().Add(10 * time.Second)
			for strings.Count(buf.String(), "\n") < 2 && time.Now().Before(deadline) {
				time.Sleep(5 * time.Millisecond)
			}
			m.Done()
			m.Done()
			out := buf.String()
			if strings.Contains(out, "\r") {
				t.Errorf("carriage return in line output: %q", out)
			}
			lines := strings.Split(strings.TrimSuffix(out, "\n"), "\n")
			if len(lines) < 3 {
				t.Fatalf("%d lines, want at least 2 while running and 1 at Done: %q", len(lines), out)
			}
			shape := regexp.MustCompile(`^provisioning \d+/50 nodes \(\d+%\), \d+ nodes/s, [0-9.]+m?s(, done|, stopped)?$`)
			for _, l := range lines {
				if !shape.MatchString(l) {
					t.Errorf("line %q", l)
				}
			}
			last := lines[len(lines)-1]
			want := ", done"
			if tc.add < 50 {
				want = ", stopped"
			}
			if !strings.HasPrefix(last, tc.final) || !strings.HasSuffix(last, want) {
				t.Errorf("last line %q, want %q ... %q", last, tc.final, want)
			}
			if strings.Count(out, ", done")+strings.Count(out, ", stopped") != 1 {
				t.Errorf("Done twice wrote two last lines: %q", out)
			}
		})
	}
}

// TestIsTerminal: a buffer, a file and a pipe are not terminals.
func TestIsTerminal(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "out"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	defer w.Close()
	var buf syncbuf.Buffer
	for name, out := range map[string]io.Writer{"buffer": &buf, "file": f, "pipe": w} {
		if IsTerminal(out) {
			t.Errorf("%s taken for a terminal", name)
		}
	}
	m := New(f, 3, Options{})
	defer m.Done()
	if m.bar != nil {
		t.Error("a bar on a file")
	}
}
