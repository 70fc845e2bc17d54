package config

import (
	"errors"
	"testing"
	"time"
)

func TestParseBool(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want bool
		ok   bool
	}{
		{"true", true, true}, {" Yes ", true, true}, {"1", true, true}, {"on", true, true},
		{"false", false, true}, {"NO", false, true}, {"0", false, true}, {"off", false, true},
		{"", false, false}, {"maybe", false, false}, {"2", false, false},
	} {
		got, err := ParseBool(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseBool(%q) = %v, %v; want %v, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
		if err != nil && !errors.Is(err, ErrInvalidVal) {
			t.Errorf("ParseBool(%q) error %v does not wrap ErrInvalidVal", tc.in, err)
		}
	}
}

func TestParseDuration(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want time.Duration
		ok   bool
	}{
		{"10s", 10 * time.Second, true}, {"1m30s", 90 * time.Second, true}, {"10", 10 * time.Second, true},
		{" 600ms ", 600 * time.Millisecond, true}, {"0", 0, true},
		{"-1s", 0, false}, {"-5", 0, false}, {"ten", 0, false}, {"", 0, false},
		{"99999999999999999999", 0, false}, {"1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s1s", 0, false},
	} {
		got, err := ParseDuration(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("ParseDuration(%q) = %v, %v; want %v, ok %v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}

// FuzzParseValues: configuration values come from the helper through the
// provisioner; parsing any of them must not panic, and accepted durations
// are never negative.
func FuzzParseValues(f *testing.F) {
	for _, s := range []string{"10s", "10", "yes", "-1s", "1h2m3.5s", "9223372036854775807", "\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if d, err := ParseDuration(s); err == nil && d < 0 {
			t.Fatalf("ParseDuration(%q) = %v", s, d)
		}
		if _, err := ParseBool(s); err != nil && !errors.Is(err, ErrInvalidVal) {
			t.Fatalf("ParseBool(%q) error %v", s, err)
		}
	})
}
