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
	hot map[string]*hotWarning
}

// hotWarnings are nats-server warnings logged once per client, which a
// storm (a site powering on, thousands of clients held back by a busy
// subscriber) turns into hundreds per second: each is logged at most once
// per hotWarningEvery, with the number suppressed since.
var hotWarnings = []string{"Readloop processing time", "Slow Consumer Detected"}

// hotWarningEvery is how often a hot warning is logged at most.
const hotWarningEvery = time.Second

// hotWarning is the throttle state of one hot warning.
type hotWarning struct {
	last       time.Time
	suppressed int
}

func newNATSLogger(log *logrus.Entry) *natsLogger {
	return &natsLogger{log: log.WithField("source", "nats-server"), fatal: make(chan error, 1), hot: map[string]*hotWarning{}}
}

// Noticef logs at info level.
func (l *natsLogger) Noticef(format string, v ...any) { l.emit(logrus.InfoLevel, format, v) }

// Warnf logs at warn level; the hot warnings at most once per
// hotWarningEvery each.
func (l *natsLogger) Warnf(format string, v ...any) {
	for _, h := range hotWarnings {
		if strings.Contains(format, h) {
			l.emitHot(h, format, v)
			return
		}
	}
	l.emit(logrus.WarnLevel, format, v)
}

// emitHot logs the hot warning h unless one was logged less than
// hotWarningEvery ago; the entry says how many were suppressed before it.
func (l *natsLogger) emitHot(h, format string, v []any) {
	if !l.log.Logger.IsLevelEnabled(logrus.WarnLevel) {
		return
	}
	now := time.Now()
	l.mu.Lock()
	st := l.hot[h]
	if st == nil {
		st = &hotWarning{}
		l.hot[h] = st
	}
	if now.Sub(st.last) < hotWarningEvery {
		st.suppressed++
		l.mu.Unlock()
		return
	}
	suppressed := st.suppressed
	st.last, st.suppressed = now, 0
	l.mu.Unlock()
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
