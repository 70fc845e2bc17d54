// Package fsutil holds the file primitives every writer of node state uses:
// atomic replacement (temp file, fsync, rename, fsync of the directory) so a
// crash never leaves a half-written configuration, key or certificate.
package fsutil

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// tempMarker separates a target's name from the random suffix in the name
// of a temporary file: "." + base + tempMarker + digits.
const tempMarker = ".tmp-"

// tempPattern is the os.CreateTemp pattern of path's temporary files.
func tempPattern(path string) string { return "." + filepath.Base(path) + tempMarker + "*" }

// IsTemp reports whether name (a base name) is a temporary file of
// WriteFileAtomic or WriteFilesAtomic: "." + target + ".tmp-" + digits. When
// target is not empty, only temporaries of that target match.
func IsTemp(name, target string) bool {
	if !strings.HasPrefix(name, ".") {
		return false
	}
	i := strings.LastIndex(name, tempMarker)
	if i < 2 {
		return false
	}
	digits := name[i+len(tempMarker):]
	if digits == "" || strings.Trim(digits, "0123456789") != "" {
		return false
	}
	return target == "" || name[1:i] == target
}

// RemoveTemps deletes the temporary files a writer killed in the middle of
// WriteFileAtomic or WriteFilesAtomic left in dir (never the files they
// were replacing, which are intact: temporaries only become files by
// rename). With target set, only that target's temporaries are removed,
// for directories shared with other programs. A missing dir is not an
// error. It returns the names it removed.
func RemoveTemps(dir, target string) ([]string, error) {
	entries, err := os.ReadDir(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("remove temporaries in %s: %w", dir, err)
	}
	var removed []string
	var errs []error
	for _, e := range entries {
		if !e.Type().IsRegular() || !IsTemp(e.Name(), target) {
			continue
		}
		if err := os.Remove(filepath.Join(dir, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("remove temporary %s: %w", filepath.Join(dir, e.Name()), err))
			continue
		}
		removed = append(removed, e.Name())
	}
	return removed, errors.Join(errs...)
}

// WriteFileAtomic replaces path with data. The data is written to a temporary
// file in the same directory with mode perm, synced, renamed over path, and
// the directory is synced. On any error path is left as it was.
func WriteFileAtomic(path string, data []byte, perm os.FileMode) error {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, tempPattern(path))
	if err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	name := tmp.Name()
	ok := false
	defer func() {
		if !ok {
			tmp.Close()
			os.Remove(name)
		}
	}()
	if err := tmp.Chmod(perm); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if _, err := tmp.Write(data); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err := syncData(tmp); err != nil {
		return fmt.Errorf("write %s: sync: %w", path, err)
	}
	if err := tmp.Close(); err != nil {
		return fmt.Errorf("write %s: close: %w", path, err)
	}
	if err := os.Rename(name, path); err != nil {
		return fmt.Errorf("write %s: rename: %w", path, err)
	}
	ok = true
	return SyncDir(dir)
}

// SyncDir fsyncs a directory so a rename inside it is durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync dir %s: %w", dir, err)
	}
	return nil
}

// File is one file of a WriteFilesAtomic batch.
type File struct {
	Path string
	Data []byte
	Perm os.FileMode
}

// WriteFilesAtomic writes several files so that each one is replaced
// atomically and the last one only appears once the others are durable. All
// files are first written and synced (data) as temporaries; only when every
// temporary exists are they renamed into place, in order. A failure before
// the renames leaves every file as it was. Callers that need the set to
// switch as one (certificate, CA, then the configuration that points at
// them) order the slice so the file that activates the others comes last.
//
// Directory syncs: the directories of the other files are synced once each
// before the last file is renamed (so after a crash the activating file
// never points at files whose renames were lost), then the last file's
// directory once. Renames inside one directory reach the disk in order on
// journaling filesystems, so a batch in a single directory costs one
// directory sync, and a configure (ssldir + state directory) two, whatever
// the number of files.
func WriteFilesAtomic(files []File) error {
	if len(files) == 0 {
		return nil
	}
	tmps := make([]string, 0, len(files))
	cleanup := func() {
		for _, t := range tmps {
			os.Remove(t)
		}
	}
	for _, f := range files {
		tmp, err := os.CreateTemp(filepath.Dir(f.Path), tempPattern(f.Path))
		if err != nil {
			cleanup()
			return fmt.Errorf("write %s: %w", f.Path, err)
		}
		tmps = append(tmps, tmp.Name())
		err = tmp.Chmod(f.Perm)
		if err == nil {
			_, err = tmp.Write(f.Data)
		}
		if err == nil {
			err = syncData(tmp)
		}
		if cerr := tmp.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			cleanup()
			return fmt.Errorf("write %s: %w", f.Path, err)
		}
	}
	last := len(files) - 1
	lastDir := filepath.Dir(files[last].Path)
	var dirs []string
	for i, f := range files[:last] {
		if err := os.Rename(tmps[i], f.Path); err != nil {
			tmps = tmps[i:]
			cleanup()
			return fmt.Errorf("write %s: rename: %w", f.Path, err)
		}
		if d := filepath.Dir(f.Path); d != lastDir && !slices.Contains(dirs, d) {
			dirs = append(dirs, d)
		}
	}
	for _, d := range dirs {
		if err := SyncDir(d); err != nil {
			os.Remove(tmps[last])
			return err
		}
	}
	if err := os.Rename(tmps[last], files[last].Path); err != nil {
		os.Remove(tmps[last])
		return fmt.Errorf("write %s: rename: %w", files[last].Path, err)
	}
	return SyncDir(lastDir)
}

// SyncData makes the data written to f durable, and the size change of an
// append or a truncation with it (fdatasync on Linux, fsync elsewhere):
// what an append-only journal needs after each write.
func SyncData(f *os.File) error { return syncData(f) }
