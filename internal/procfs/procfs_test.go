package procfs

import (
	"errors"
	"os"
	"testing"
	"time"
)

func TestParseStat(t *testing.T) {
	// pid (comm) state ppid pgrp session tty tpgid flags minflt cminflt
	// majflt cmajflt utime stime cutime cstime prio nice threads
	// itrealvalue starttime vsize rss ...
	line := "1234 (a (b) c) S 1 1234 1234 0 -1 4194304 10 0 0 0 250 40 7 3 20 0 5 0 100 1000000 321 18446744073709551615\n"
	got, err := ParseStat(line)
	want := Stat{User: 2500 * time.Millisecond, System: 400 * time.Millisecond, ChildUser: 70 * time.Millisecond, ChildSystem: 30 * time.Millisecond, RSSPages: 321}
	if err != nil || got != want {
		t.Fatalf("ParseStat = %+v, %v; want %+v", got, err, want)
	}
	for name, bad := range map[string]string{
		"no parenthesis": "1234 comm S 1",
		"short":          "1234 (x) S 1 2 3",
		"not a number":   "1234 (x) S 1 1234 1234 0 -1 4194304 10 0 0 0 x 40 7 3 20 0 5 0 100 1000000 321",
	} {
		if _, err := ParseStat(bad); !errors.Is(err, ErrFormat) {
			t.Errorf("%s: %v, want ErrFormat", name, err)
		}
	}
}

func TestReadStatSelf(t *testing.T) {
	if _, err := os.Stat("/proc/self/stat"); err != nil {
		t.Skip("no /proc")
	}
	st, err := ReadStat(os.Getpid())
	if err != nil || st.RSSPages <= 0 {
		t.Fatalf("ReadStat(self) = %+v, %v", st, err)
	}
}
