// Package syncbuf is a bytes.Buffer safe for concurrent writers: a log
// sink or a subprocess's output that a test reads while it is written.
package syncbuf

import (
	"bytes"
	"sync"

	"github.com/sirupsen/logrus"
)

// Buffer is a bytes.Buffer whose Write and String may be called from
// several goroutines. The zero value is empty and ready.
type Buffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

// Write appends p.
func (b *Buffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns what was written so far.
func (b *Buffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// Logger returns a logger at level that writes to a new Buffer, and the
// Buffer: a test's view of what a component logged.
func Logger(level logrus.Level) (*logrus.Entry, *Buffer) {
	buf := &Buffer{}
	l := logrus.New()
	l.SetOutput(buf)
	l.SetLevel(level)
	return logrus.NewEntry(l), buf
}
