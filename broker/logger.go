package broker

import (
	"fmt"
	"sync"

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
}

func newNATSLogger(log *logrus.Entry) *natsLogger {
	return &natsLogger{log: log.WithField("source", "nats-server"), fatal: make(chan error, 1)}
}

// Noticef logs at info level.
func (l *natsLogger) Noticef(format string, v ...any) { l.emit(logrus.InfoLevel, format, v) }

// Warnf logs at warn level.
func (l *natsLogger) Warnf(format string, v ...any) { l.emit(logrus.WarnLevel, format, v) }

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
