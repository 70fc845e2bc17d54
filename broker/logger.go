package broker

import (
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/internal/logging"
)

// natsLogger sends nats-server's logs to logrus, redacted (logging.Redact):
// at trace level nats-server logs every message payload, and an inventory
// reply carries the node's provisioning token. A fatal error is logged at
// error level and reported on fatal: the process never exits.
type natsLogger struct {
	log   *logrus.Entry
	fatal chan error

	mu    sync.Mutex
	first error
	// hot throttles the per-client warnings in hotWarnings.
	hot map[string]*logLimit
}

// hotWarnings are nats-server warnings logged once per client, which a
// storm (a site powering on, thousands of clients held back by a busy
// subscriber) turns into hundreds per second: each is logged at most once
// per logEvery, with the number suppressed since.
var hotWarnings = []string{"Readloop processing time", "Slow Consumer Detected"}

// logEvery is how often a repeated warning is logged at most (logLimit).
const logEvery = time.Second

// logLimit lets a repeated log entry through at most once per logEvery and
// counts the ones it held back. The zero value is ready.
type logLimit struct {
	mu         sync.Mutex
	last       time.Time
	suppressed int
}

// allow reports whether an entry may be logged at now, and how many were
// held back since the last one that was.
func (l *logLimit) allow(now time.Time) (suppressed int, ok bool) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if now.Sub(l.last) < logEvery {
		l.suppressed++
		return 0, false
	}
	suppressed = l.suppressed
	l.last, l.suppressed = now, 0
	return suppressed, true
}

func newNATSLogger(log *logrus.Entry) *natsLogger {
	hot := make(map[string]*logLimit, len(hotWarnings))
	for _, h := range hotWarnings {
		hot[h] = &logLimit{}
	}
	return &natsLogger{log: log.WithField("source", "nats-server"), fatal: make(chan error, 1), hot: hot}
}

// Noticef logs at info level.
func (l *natsLogger) Noticef(format string, v ...any) { l.emit(logrus.InfoLevel, format, v) }

// Warnf logs at warn level; the hot warnings at most once per logEvery
// each.
func (l *natsLogger) Warnf(format string, v ...any) {
	for _, h := range hotWarnings {
		if strings.Contains(format, h) {
			l.emitHot(h, format, v)
			return
		}
	}
	l.emit(logrus.WarnLevel, format, v)
}

// emitHot logs the hot warning h unless one was logged less than logEvery
// ago; the entry says how many were suppressed before it.
func (l *natsLogger) emitHot(h, format string, v []any) {
	if !l.log.Logger.IsLevelEnabled(logrus.WarnLevel) {
		return
	}
	suppressed, ok := l.hot[h].allow(time.Now())
	if !ok {
		return
	}
	l.log.WithField("suppressed", suppressed).Warn(logging.Redact(fmt.Sprintf(format, v...)))
}

// Errorf logs at error level.
func (l *natsLogger) Errorf(format string, v ...any) { l.emit(logrus.ErrorLevel, format, v) }

// Debugf logs at debug level.
func (l *natsLogger) Debugf(format string, v ...any) { l.emit(logrus.DebugLevel, format, v) }

// Tracef logs at trace level.
func (l *natsLogger) Tracef(format string, v ...any) { l.emit(logrus.TraceLevel, format, v) }

// emit logs the redacted message at lvl, formatting it only when lvl is on.
func (l *natsLogger) emit(lvl logrus.Level, format string, v []any) {
	if !l.log.Logger.IsLevelEnabled(lvl) {
		return
	}
	l.log.Log(lvl, logging.Redact(fmt.Sprintf(format, v...)))
}

// Fatalf logs at error level and records the error; it does not exit.
func (l *natsLogger) Fatalf(format string, v ...any) {
	err := fmt.Errorf("%w: %s", ErrServerFailed, logging.Redact(fmt.Sprintf(format, v...)))
	l.log.Error(err.Error())
	l.mu.Lock()
	if l.first == nil {
		l.first = err
	}
	l.mu.Unlock()
	select {
	case l.fatal <- err:
	default:
	}
}

// firstFatal returns the first fatal error logged, or nil.
func (l *natsLogger) firstFatal() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.first
}
