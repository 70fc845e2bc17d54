// Package logging builds the logrus loggers every Muster daemon uses, from a
// level name and an optional log file.
package logging

import (
	"fmt"
	"io"
	"os"

	"github.com/sirupsen/logrus"
)

// New returns a logger at level ("debug", "info", "warn", "error"; empty
// means info) writing text to file, or to stderr when file is empty. The
// returned closer closes the file.
func New(level, file string) (*logrus.Logger, io.Closer, error) {
	if level == "" {
		level = "info"
	}
	lvl, err := logrus.ParseLevel(level)
	if err != nil {
		return nil, nil, fmt.Errorf("log level %q: %w", level, err)
	}
	l := logrus.New()
	l.SetLevel(lvl)
	l.SetFormatter(&logrus.TextFormatter{FullTimestamp: true})
	var closer io.Closer = io.NopCloser(nil)
	if file != "" {
		f, err := os.OpenFile(file, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
		if err != nil {
			return nil, nil, fmt.Errorf("log file: %w", err)
		}
		l.SetOutput(f)
		closer = f
	} else {
		l.SetOutput(os.Stderr)
	}
	return l, closer, nil
}

// ValidLevel reports an error for a level logrus does not know.
func ValidLevel(level string) error {
	if level == "" {
		return nil
	}
	_, err := logrus.ParseLevel(level)
	return err
}

// Discard returns a logger that writes nothing, for tests and embedded use.
func Discard() *logrus.Logger {
	l := logrus.New()
	l.SetOutput(io.Discard)
	return l
}
