package broker

import (
	"bytes"
	"strings"
	"testing"
	"time"

	"github.com/sirupsen/logrus"
)

// TestHotWarningsThrottled: nats-server's per-client warnings that a storm
// multiplies are logged once per second with the count suppressed; other
// warnings are all logged.
func TestHotWarningsThrottled(t *testing.T) {
	var buf bytes.Buffer
	lg := logrus.New()
	lg.SetOutput(&buf)
	lg.SetLevel(logrus.WarnLevel)
	l := newNATSLogger(logrus.NewEntry(lg))
	for i := 0; i < 100; i++ {
		l.Warnf("pipe - cid:%d - \"node.example.net\" - Readloop processing time: %v", i, 2*time.Second)
		l.Warnf("pipe - cid:%d - Slow Consumer Detected: MaxPending of %d Exceeded", i, 64)
		l.Warnf("some other warning %d", i)
	}
	out := buf.String()
	if n := strings.Count(out, "Readloop processing time"); n != 1 {
		t.Errorf("%d readloop warnings logged, want 1", n)
	}
	if n := strings.Count(out, "Slow Consumer Detected"); n != 1 {
		t.Errorf("%d slow consumer warnings logged, want 1", n)
	}
	if n := strings.Count(out, "some other warning"); n != 100 {
		t.Errorf("%d other warnings logged, want 100", n)
	}
	// A second later the next one is logged, with the count it stood for.
	buf.Reset()
	l.mu.Lock()
	l.hot["Readloop processing time"].last = time.Now().Add(-2 * logEvery)
	l.mu.Unlock()
	l.Warnf("pipe - cid:%d - \"node.example.net\" - Readloop processing time: %v", 7, 3*time.Second)
	if out := buf.String(); !strings.Contains(out, "Readloop processing time: 3s") || !strings.Contains(out, "suppressed=99") {
		t.Errorf("after the interval: %q", out)
	}
}
