// Package logging builds the logrus loggers every Muster daemon uses, from a
// level name and an optional log file.
package logging

import (
	"fmt"
	"io"
	"os"
	"regexp"
	"strings"

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
	l.SetFormatter(RedactingFormatter{Formatter: &logrus.TextFormatter{FullTimestamp: true}})
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

// Redacted replaces a secret Redact found.
const Redacted = "[REDACTED]"

// Secret shapes Redact looks for. Muster never logs a secret on purpose;
// these catch what foreign code logs verbatim, such as nats-server's
// protocol traces, which show every message payload (an inventory reply
// carries the node's provisioning token).
var (
	// jwtPattern is a compact JWS (header.claims[.signature]) with a JSON
	// header, as provisioning tokens are.
	jwtPattern = regexp.MustCompile(`eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*(?:\.[A-Za-z0-9_-]*)?`)
	// seedPattern is an nkey seed (user, account, operator, server,
	// cluster or curve), 58 base32 characters starting with S.
	seedPattern = regexp.MustCompile(`S[UAONCX][A-Z2-7]{56}`)
	// pemKeyPattern is a PEM private key block, also with escaped newlines.
	pemKeyPattern = regexp.MustCompile(`-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----[\s\S]*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|$)`)
)

// Redact returns s with every provisioning token (any JWT), nkey seed and
// PEM private key block replaced by Redacted.
func Redact(s string) string {
	if strings.Contains(s, "eyJ") {
		s = jwtPattern.ReplaceAllLiteralString(s, Redacted)
	}
	if strings.Contains(s, "PRIVATE KEY") {
		s = pemKeyPattern.ReplaceAllLiteralString(s, Redacted)
	}
	return seedPattern.ReplaceAllLiteralString(s, Redacted)
}

// RedactingFormatter formats with Formatter and redacts the result (see
// Redact), so not even a field or an error text from foreign code can put a
// secret into a log.
type RedactingFormatter struct {
	Formatter logrus.Formatter
}

// Format implements logrus.Formatter.
func (f RedactingFormatter) Format(e *logrus.Entry) ([]byte, error) {
	b, err := f.Formatter.Format(e)
	if err != nil {
		return nil, err
	}
	if r := Redact(string(b)); r != string(b) {
		return []byte(r), nil
	}
	return b, nil
}
