package config

import (
	"fmt"
	"path/filepath"
	"testing"
)

func BenchmarkSave(b *testing.B) {
	c := New()
	for i := 0; i < 20; i++ {
		if err := c.Set(fmt.Sprintf("plugin.example.key%02d", i), "some value"); err != nil {
			b.Fatal(err)
		}
	}
	path := filepath.Join(b.TempDir(), "agent.cfg")
	b.ReportAllocs()
	for b.Loop() {
		if err := c.Save(path); err != nil {
			b.Fatal(err)
		}
	}
}
