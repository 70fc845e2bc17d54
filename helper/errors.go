package helper

import (
	"errors"
	"fmt"
)

// Sentinel errors. Every failure of a helper run wraps one of them; use
// errors.Is.
var (
	// ErrTimeout means the helper did not finish within its timeout and its
	// process group was killed.
	ErrTimeout = errors.New("helper timed out")
	// ErrExit means the helper exited with a non-zero status (see ExitError).
	ErrExit = errors.New("helper failed")
	// ErrEmpty means the helper wrote nothing on stdout.
	ErrEmpty = errors.New("helper wrote no reply")
	// ErrBadJSON means the helper's stdout is not a JSON reply of the
	// expected shape.
	ErrBadJSON = errors.New("helper reply is not valid JSON")
	// ErrInvalidReply means the reply decoded but breaks the contract (see
	// ValidateReply), or the output was too large.
	ErrInvalidReply = errors.New("invalid helper reply")
	// ErrTooLarge means the helper wrote more than ExecOptions.MaxStdout
	// bytes; it is always joined with ErrInvalidReply.
	ErrTooLarge = errors.New("helper output too large")
)

// ExitError is a helper that exited with a non-zero status (or was killed by
// a signal, Code -1). It matches ErrExit.
type ExitError struct {
	// Code is the exit status, -1 when the process died from a signal.
	Code int
	// Stderr is the helper's bounded standard error.
	Stderr string
}

// Error implements error. Stderr is deliberately not part of the text: it
// is carried separately (see Stderr) so callers decide where it goes.
func (e *ExitError) Error() string {
	if e.Code < 0 {
		return "helper killed by a signal"
	}
	return fmt.Sprintf("helper exited with status %d", e.Code)
}

// Is makes errors.Is(err, ErrExit) true.
func (e *ExitError) Is(target error) bool { return target == ErrExit }

// RunError is what Exec.Provision returns for every failure: the identity
// being provisioned, the bounded stderr of the helper (possibly empty) and
// the cause, which wraps one of the sentinel errors.
type RunError struct {
	Identity string
	Stderr   string
	Err      error
}

// Error implements error.
func (e *RunError) Error() string {
	return fmt.Sprintf("helper for %s: %v", e.Identity, e.Err)
}

// Unwrap returns the cause.
func (e *RunError) Unwrap() error { return e.Err }

// Stderr returns the helper's bounded standard error carried by err (a
// RunError or an ExitError anywhere in its chain), or "".
func Stderr(err error) string {
	var re *RunError
	if errors.As(err, &re) && re.Stderr != "" {
		return re.Stderr
	}
	var ee *ExitError
	if errors.As(err, &ee) {
		return ee.Stderr
	}
	return ""
}
