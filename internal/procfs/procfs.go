// Package procfs reads the few Linux /proc figures the bench and the demo
// fleet report: a process's CPU times and resident size.
package procfs

import (
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"
)

// ClockTicks is USER_HZ, the unit of the times in /proc/<pid>/stat and
// /proc/stat: 100 on every Linux architecture Go supports.
const ClockTicks = 100

// Tick is one clock tick.
const Tick = time.Second / ClockTicks

// Stat is what /proc/<pid>/stat says of a process.
type Stat struct {
	// User and System are its own CPU time (all threads, re-executions
	// included); ChildUser and ChildSystem that of the children it waited
	// for.
	User, System, ChildUser, ChildSystem time.Duration
	// RSSPages is its resident set in pages.
	RSSPages int64
}

// ErrFormat is returned for a stat file this package cannot read.
var ErrFormat = errors.New("unexpected /proc stat format")

// ReadStat reads /proc/<pid>/stat.
func ReadStat(pid int) (Stat, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return Stat{}, err
	}
	return ParseStat(string(b))
}

// ParseStat parses the text of a /proc/<pid>/stat file.
func ParseStat(text string) (Stat, error) {
	// The command name is in parentheses and may hold spaces: fields
	// count from after the last ')'.
	i := strings.LastIndexByte(text, ')')
	if i < 0 {
		return Stat{}, ErrFormat
	}
	f := strings.Fields(text[i+1:])
	// After ')': state is field 3 of proc(5); utime 14, stime 15, cutime
	// 16, cstime 17, rss 24; here index = field - 3.
	if len(f) < 22 {
		return Stat{}, fmt.Errorf("%d fields: %w", len(f), ErrFormat)
	}
	var v [5]int64
	for j, k := range []int{11, 12, 13, 14, 21} {
		n, err := strconv.ParseInt(f[k], 10, 64)
		if err != nil {
			return Stat{}, fmt.Errorf("field %d: %w", k+3, ErrFormat)
		}
		v[j] = n
	}
	return Stat{
		User: time.Duration(v[0]) * Tick, System: time.Duration(v[1]) * Tick,
		ChildUser: time.Duration(v[2]) * Tick, ChildSystem: time.Duration(v[3]) * Tick,
		RSSPages: v[4],
	}, nil
}
