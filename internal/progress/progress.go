// Package progress shows how far a run over N nodes has come: a bar
// redrawn in place on a terminal, and elsewhere (a CI log, a file, a pipe)
// a plain line every few seconds, so that a log holds a readable record
// instead of thousands of carriage-return redraws.
package progress

import (
	"fmt"
	"io"
	"os"
	"sync"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"
)

// DefaultInterval is how often a line is written when the output is not a
// terminal.
const DefaultInterval = 2 * time.Second

// Meter counts done items against a total and shows it. Add may be called
// from several goroutines, Done after the last Add.
type Meter struct {
	w   io.Writer
	bar *progressbar.ProgressBar // nil in line mode

	mu       sync.Mutex
	finished bool // Done was called

	// Line mode.
	desc    string
	unit    string
	total   int
	start   time.Time
	done    int
	stop    chan struct{}
	stopped chan struct{}
}

// Options configure a Meter.
type Options struct {
	// Description leads every line ("provisioning").
	Description string
	// Unit names what is counted ("nodes").
	Unit string
	// Interval between lines in line mode (default DefaultInterval).
	Interval time.Duration
}

// New starts a meter over total items written to w: a bar when w is a
// terminal, lines otherwise.
func New(w io.Writer, total int, o Options) *Meter {
	if o.Unit == "" {
		o.Unit = "items"
	}
	if IsTerminal(w) {
		return &Meter{w: w, bar: progressbar.NewOptions(total,
			progressbar.OptionSetWriter(w),
			progressbar.OptionSetDescription(o.Description),
			progressbar.OptionShowCount(),
			progressbar.OptionShowIts(),
			progressbar.OptionSetItsString(o.Unit),
			progressbar.OptionSetPredictTime(true),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionOnCompletion(func() { fmt.Fprintln(w) }),
		)}
	}
	if o.Interval <= 0 {
		o.Interval = DefaultInterval
	}
	m := &Meter{w: w, desc: o.Description, unit: o.Unit, total: total, start: time.Now(),
		stop: make(chan struct{}), stopped: make(chan struct{})}
	go m.lines(o.Interval)
	return m
}

// IsTerminal reports whether w is a terminal.
func IsTerminal(w io.Writer) bool {
	f, ok := w.(*os.File)
	return ok && term.IsTerminal(int(f.Fd()))
}

// lines writes a line every interval until Done, also while nothing
// moves (a stalled run shows as one).
func (m *Meter) lines(interval time.Duration) {
	defer close(m.stopped)
	t := time.NewTicker(interval)
	defer t.Stop()
	for {
		select {
		case <-m.stop:
			return
		case <-t.C:
			m.mu.Lock()
			m.line("")
			m.mu.Unlock()
		}
	}
}

// line writes one line; m.mu is held.
func (m *Meter) line(suffix string) {
	el := time.Since(m.start)
	pct := 100.0
	if m.total > 0 {
		pct = 100 * float64(m.done) / float64(m.total)
	}
	rate := 0.0
	if s := el.Seconds(); s > 0 {
		rate = float64(m.done) / s
	}
	fmt.Fprintf(m.w, "%s %d/%d %s (%.0f%%), %.0f %s/s, %s%s\n",
		m.desc, m.done, m.total, m.unit, pct, rate, m.unit, el.Round(100*time.Millisecond), suffix)
}

// Add counts n more items done.
func (m *Meter) Add(n int) {
	if m.bar != nil {
		_ = m.bar.Add(n)
		return
	}
	m.mu.Lock()
	m.done += n
	m.mu.Unlock()
}

// Done ends the meter: the bar is closed (its line ended), or a last line
// is written. It may be called more than once.
func (m *Meter) Done() {
	m.mu.Lock()
	if m.finished {
		m.mu.Unlock()
		return
	}
	m.finished = true
	m.mu.Unlock()
	if m.bar != nil {
		if !m.bar.IsFinished() {
			_ = m.bar.Exit()
			fmt.Fprintln(m.w)
		}
		return
	}
	close(m.stop)
	<-m.stopped
	m.mu.Lock()
	defer m.mu.Unlock()
	suffix := ", done"
	if m.done < m.total {
		suffix = ", stopped"
	}
	m.line(suffix)
}
