package fsutil

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestWriteFileAtomic(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "key.pem")
	if err := WriteFileAtomic(p, []byte("one"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := WriteFileAtomic(p, []byte("two"), 0o600); err != nil {
		t.Fatal(err)
	}
	b, _ := os.ReadFile(p)
	st, _ := os.Stat(p)
	if string(b) != "two" || st.Mode().Perm() != 0o600 {
		t.Fatalf("content %q mode %v", b, st.Mode().Perm())
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temporary files left: %v", entries)
	}
}

func TestWriteFilesAtomicFailureLeavesFiles(t *testing.T) {
	dir := t.TempDir()
	a := filepath.Join(dir, "a")
	if err := os.WriteFile(a, []byte("old"), 0o644); err != nil {
		t.Fatal(err)
	}
	err := WriteFilesAtomic([]File{
		{Path: a, Data: []byte("new"), Perm: 0o644},
		{Path: filepath.Join(dir, "missing-dir", "b"), Data: []byte("x"), Perm: 0o644},
	})
	if err == nil {
		t.Fatal("write into a missing directory succeeded")
	}
	if b, _ := os.ReadFile(a); !bytes.Equal(b, []byte("old")) {
		t.Fatalf("a changed to %q after a failed batch", b)
	}
	entries, _ := os.ReadDir(dir)
	if len(entries) != 1 {
		t.Fatalf("temporary files left: %v", entries)
	}
	if err := WriteFilesAtomic([]File{
		{Path: a, Data: []byte("new"), Perm: 0o600},
		{Path: filepath.Join(dir, "b"), Data: []byte("b"), Perm: 0o644},
	}); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(a); string(b) != "new" {
		t.Fatalf("a = %q", b)
	}
}

// TestWriteFilesAtomicDirs writes a batch over two directories the way the
// agent's configure does (key, certificate and CA in the ssldir, then the
// configuration) and checks contents, modes and that no temporary is left.
func TestWriteFilesAtomicDirs(t *testing.T) {
	state := t.TempDir()
	ssl := filepath.Join(state, "ssl")
	if err := os.Mkdir(ssl, 0o700); err != nil {
		t.Fatal(err)
	}
	files := []File{
		{Path: filepath.Join(ssl, "private.pem"), Data: []byte("key"), Perm: 0o600},
		{Path: filepath.Join(ssl, "certificate.pem"), Data: []byte("cert"), Perm: 0o644},
		{Path: filepath.Join(ssl, "ca.pem"), Data: []byte("ca"), Perm: 0o644},
		{Path: filepath.Join(state, "agent.cfg"), Data: []byte("cfg"), Perm: 0o600},
	}
	for round := 0; round < 2; round++ {
		if err := WriteFilesAtomic(files); err != nil {
			t.Fatal(err)
		}
		for _, f := range files {
			b, err := os.ReadFile(f.Path)
			if err != nil || !bytes.Equal(b, f.Data) {
				t.Fatalf("%s = %q, %v", f.Path, b, err)
			}
			if st, _ := os.Stat(f.Path); st.Mode().Perm() != f.Perm {
				t.Errorf("%s mode %v, want %v", f.Path, st.Mode().Perm(), f.Perm)
			}
		}
		for _, d := range []string{state, ssl} {
			entries, _ := os.ReadDir(d)
			for _, e := range entries {
				if strings.Contains(e.Name(), ".tmp-") {
					t.Errorf("temporary left in %s: %s", d, e.Name())
				}
			}
		}
		for i := range files {
			files[i].Data = append(files[i].Data, '2')
		}
	}
	if err := WriteFilesAtomic(nil); err != nil {
		t.Errorf("empty batch: %v", err)
	}
}

func TestIsTemp(t *testing.T) {
	for _, tc := range []struct {
		name, target string
		want         bool
	}{
		{".agent.cfg.tmp-123456", "", true},
		{".agent.cfg.tmp-123456", "agent.cfg", true},
		{".agent.cfg.tmp-123456", "private.pem", false},
		{".private.pem.tmp-9", "private.pem", true},
		{"agent.cfg", "", false},
		{".agent.cfg", "", false},
		{".agent.cfg.tmp-", "", false},
		{".agent.cfg.tmp-12a", "", false},
		{".tmp-123", "", false},
		{"x.tmp-123", "", false},
		{".a.tmp-1.tmp-2", "a.tmp-1", true},
	} {
		if got := IsTemp(tc.name, tc.target); got != tc.want {
			t.Errorf("IsTemp(%q, %q) = %t, want %t", tc.name, tc.target, got, tc.want)
		}
	}
}

// TestRemoveTempsAfterKilledWriter recreates what a writer killed between
// writing its temporaries and renaming them leaves behind, and checks that
// RemoveTemps removes the temporaries and nothing else.
func TestRemoveTempsAfterKilledWriter(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "agent.cfg")
	if err := WriteFileAtomic(cfg, []byte("old"), 0o600); err != nil {
		t.Fatal(err)
	}
	var temps []string
	for _, target := range []string{cfg, filepath.Join(dir, "private.pem"), cfg} {
		f, err := os.CreateTemp(dir, tempPattern(target))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteString("half a fi"); err != nil {
			t.Fatal(err)
		}
		f.Close()
		temps = append(temps, filepath.Base(f.Name()))
	}
	keep := []string{"agent.cfg", ".hidden", ".x.tmp-abc", "y.tmp-1"}
	for _, k := range keep[1:] {
		if err := os.WriteFile(filepath.Join(dir, k), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, ".d.tmp-1"), 0o700); err != nil {
		t.Fatal(err)
	}
	keep = append(keep, ".d.tmp-1")

	removed, err := RemoveTemps(dir, "agent.cfg")
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 2 {
		t.Fatalf("removed %v, want the two agent.cfg temporaries", removed)
	}
	removed, err = RemoveTemps(dir, "")
	if err != nil {
		t.Fatal(err)
	}
	if len(removed) != 1 || removed[0] != temps[1] {
		t.Fatalf("removed %v, want %s", removed, temps[1])
	}
	entries, _ := os.ReadDir(dir)
	var left []string
	for _, e := range entries {
		left = append(left, e.Name())
	}
	if strings.Join(left, ",") != strings.Join(sorted(keep), ",") {
		t.Fatalf("left %v, want %v", left, sorted(keep))
	}
	if b, _ := os.ReadFile(cfg); string(b) != "old" {
		t.Fatalf("the file being replaced changed: %q", b)
	}
	if removed, err := RemoveTemps(filepath.Join(dir, "missing"), ""); err != nil || removed != nil {
		t.Fatalf("missing dir: %v %v", removed, err)
	}
}

func sorted(s []string) []string {
	out := append([]string(nil), s...)
	slices.Sort(out)
	return out
}
