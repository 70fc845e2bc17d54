//go:build !linux

package fsutil

import "os"

// syncData makes a freshly written temporary file's data durable before it
// is renamed into place.
func syncData(f *os.File) error { return f.Sync() }
