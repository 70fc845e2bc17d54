package fsutil

import (
	"bytes"
	"os"
	"path/filepath"
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
