package fsutil

import (
	"os"
	"syscall"
)

// syncData makes a freshly written temporary file's data durable before it
// is renamed into place. fdatasync flushes the data and the metadata needed
// to read it back (size, block map) and skips timestamps, which a file that
// is about to be renamed does not need.
func syncData(f *os.File) error {
	for {
		err := syscall.Fdatasync(int(f.Fd()))
		if err != syscall.EINTR {
			if err != nil {
				return &os.PathError{Op: "fdatasync", Path: f.Name(), Err: err}
			}
			return nil
		}
	}
}
