package syncbuf

import (
	"strings"
	"sync"
	"testing"

	"github.com/sirupsen/logrus"
)

// TestConcurrentWrites: every write from several goroutines is kept
// whole (run with -race).
func TestConcurrentWrites(t *testing.T) {
	var b Buffer
	var wg sync.WaitGroup
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 100 {
				_, _ = b.Write([]byte("line\n"))
				_ = b.String()
			}
		}()
	}
	wg.Wait()
	if n := strings.Count(b.String(), "line\n"); n != 800 {
		t.Fatalf("%d lines, want 800", n)
	}
}

func TestLogger(t *testing.T) {
	log, buf := Logger(logrus.InfoLevel)
	log.Debug("quiet")
	log.WithField("k", "v").Info("loud")
	if s := buf.String(); strings.Contains(s, "quiet") || !strings.Contains(s, "loud") || !strings.Contains(s, "k=v") {
		t.Errorf("logged %q: want the info line only", s)
	}
}
