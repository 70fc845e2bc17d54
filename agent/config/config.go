// Package config reads and writes the agent's flat configuration file:
// Choria-style "key = value" lines with "#" comments. Keys the agent does not
// use are kept, written back and reported; values are single lines.
package config

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/muster-io/muster/internal/fsutil"
)

// Keys the agent understands (COMPAT.md).
const (
	KeyIdentity        = "identity"
	KeyMiddlewareHosts = "plugin.choria.middleware_hosts"
	KeySecurityProv    = "plugin.security.provider"
	KeyCertificate     = "plugin.security.file.certificate"
	KeyKey             = "plugin.security.file.key"
	KeyCA              = "plugin.security.file.ca"
	KeyProvision       = "plugin.choria.server.provision"
	KeyLogLevel        = "loglevel"
	KeyLogFile         = "logfile"
	KeyCollectives     = "collectives"
	KeyMainCollective  = "main_collective"
	// KeyRandomizeHosts shuffles plugin.choria.middleware_hosts before
	// connecting (Choria's key; default true).
	KeyRandomizeHosts = "plugin.choria.randomize_middleware_hosts"
	// KeyAliveInterval bounds how long a silent production broker stays
	// undetected (a duration such as 10s; Muster's key).
	KeyAliveInterval = "plugin.muster.alive_interval"
	// KeyReconnectWait is the first wait between rounds of connection
	// attempts to the production brokers (Muster's key).
	KeyReconnectWait = "plugin.muster.reconnect_wait"
	// KeyReconnectMaxWait caps that wait (Muster's key).
	KeyReconnectMaxWait = "plugin.muster.reconnect_max_wait"
)

// Limits on what a configuration may hold.
const (
	// MaxSize bounds a configuration file.
	MaxSize = 256 * 1024
	// MaxKeyLength bounds a key.
	MaxKeyLength = 256
	// MaxValueLength bounds a value.
	MaxValueLength = 16 * 1024
)

// Mask replaces the value of secret-looking keys in Masked.
const Mask = "****"

// Sentinel errors.
var (
	ErrSyntax     = errors.New("config syntax error")
	ErrInvalidKey = errors.New("invalid config key")
	ErrInvalidVal = errors.New("invalid config value")
	ErrTooLarge   = errors.New("config too large")
)

// secretMarkers are substrings of keys whose values Masked hides.
var secretMarkers = []string{"token", "password", "secret", "key_pem", "seed"}

// Config is a parsed configuration: a set of unique keys with string values.
// The zero value is an empty configuration ready to use.
type Config struct {
	values map[string]string
}

// New returns an empty configuration.
func New() *Config { return &Config{values: map[string]string{}} }

// FromMap validates every key and value of m and returns them as a
// configuration; all problems are reported together.
func FromMap(m map[string]string) (*Config, error) {
	c := New()
	var errs []error
	for _, k := range sortedKeys(m) {
		if err := c.Set(k, m[k]); err != nil {
			errs = append(errs, err)
		}
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return c, nil
}

// ValidateKey checks that k can be a configuration key: non-empty, at most
// MaxKeyLength bytes, valid UTF-8, no whitespace or control characters, no
// '=', no path separators ('/', '\\') or "..", and not starting with '#'.
func ValidateKey(k string) error {
	if k == "" {
		return fmt.Errorf("%w: empty", ErrInvalidKey)
	}
	if len(k) > MaxKeyLength {
		return fmt.Errorf("%w: %.40q... longer than %d bytes", ErrInvalidKey, k, MaxKeyLength)
	}
	if !utf8.ValidString(k) {
		return fmt.Errorf("%w: %q is not UTF-8", ErrInvalidKey, k)
	}
	if k[0] == '#' {
		return fmt.Errorf("%w: %q starts with '#'", ErrInvalidKey, k)
	}
	if strings.ContainsAny(k, `/\`) || strings.Contains(k, "..") {
		return fmt.Errorf("%w: %q contains a path separator or '..'", ErrInvalidKey, k)
	}
	for _, r := range k {
		if unicode.IsSpace(r) || unicode.IsControl(r) || r == '=' {
			return fmt.Errorf("%w: %q contains %q", ErrInvalidKey, k, r)
		}
	}
	return nil
}

// ValidateValue checks that v can be a configuration value: valid UTF-8, at
// most MaxValueLength bytes, one line, no control characters other than tab.
// Leading and trailing white space is not significant (Set trims it).
func ValidateValue(v string) error {
	if len(v) > MaxValueLength {
		return fmt.Errorf("%w: longer than %d bytes", ErrInvalidVal, MaxValueLength)
	}
	if !utf8.ValidString(v) {
		return fmt.Errorf("%w: not UTF-8", ErrInvalidVal)
	}
	for _, r := range v {
		if r == '\n' || r == '\r' || r == '\u2028' || r == '\u2029' || r == '\u0085' {
			return fmt.Errorf("%w: contains a line break", ErrInvalidVal)
		}
		if r != '\t' && unicode.IsControl(r) {
			return fmt.Errorf("%w: contains control character %q", ErrInvalidVal, r)
		}
	}
	return nil
}

// Set validates and stores key = value (value trimmed of surrounding white
// space).
func (c *Config) Set(key, value string) error {
	if err := ValidateKey(key); err != nil {
		return err
	}
	if err := ValidateValue(value); err != nil {
		return fmt.Errorf("key %q: %w", key, err)
	}
	if c.values == nil {
		c.values = map[string]string{}
	}
	c.values[key] = strings.TrimSpace(value)
	return nil
}

// Get returns the value of key and whether it is set.
func (c *Config) Get(key string) (string, bool) {
	v, ok := c.values[key]
	return v, ok
}

// Value returns the value of key, or "" when it is not set.
func (c *Config) Value(key string) string { return c.values[key] }

// Bool reports the boolean value of key ("true", "yes", "1", "on" are true,
// case-insensitive) and whether the key is set.
func (c *Config) Bool(key string) (value, set bool) {
	v, ok := c.values[key]
	if !ok {
		return false, false
	}
	switch strings.ToLower(v) {
	case "true", "yes", "1", "on", "y", "t":
		return true, true
	}
	return false, true
}

// ParseBool parses a configuration boolean: true, yes, 1, on, y, t or
// false, no, 0, off, n, f (case-insensitive).
func ParseBool(v string) (bool, error) {
	switch strings.ToLower(strings.TrimSpace(v)) {
	case "true", "yes", "1", "on", "y", "t":
		return true, nil
	case "false", "no", "0", "off", "n", "f":
		return false, nil
	}
	return false, fmt.Errorf("%w: %q is not a boolean", ErrInvalidVal, v)
}

// ParseDuration parses a configuration duration: a Go duration ("10s",
// "1m30s") or a whole number of seconds ("10"). Negative values are
// refused.
func ParseDuration(v string) (time.Duration, error) {
	v = strings.TrimSpace(v)
	if len(v) > 32 {
		return 0, fmt.Errorf("%w: duration longer than 32 bytes", ErrInvalidVal)
	}
	if n, err := strconv.ParseUint(v, 10, 32); err == nil {
		return time.Duration(n) * time.Second, nil
	}
	d, err := time.ParseDuration(v)
	if err != nil || d < 0 {
		return 0, fmt.Errorf("%w: %q is not a duration", ErrInvalidVal, v)
	}
	return d, nil
}

// Len returns the number of keys.
func (c *Config) Len() int { return len(c.values) }

// Keys returns the keys in sorted order.
func (c *Config) Keys() []string { return sortedKeys(c.values) }

// Map returns a copy of the configuration as a map.
func (c *Config) Map() map[string]string {
	m := make(map[string]string, len(c.values))
	for k, v := range c.values {
		m[k] = v
	}
	return m
}

// Clone returns a deep copy.
func (c *Config) Clone() *Config { return &Config{values: c.Map()} }

// Masked returns the configuration with the values of secret-looking keys
// (containing token, password, secret, key_pem or seed) replaced by Mask.
func (c *Config) Masked() map[string]string {
	m := c.Map()
	for k := range m {
		if IsSecretKey(k) {
			m[k] = Mask
		}
	}
	return m
}

// IsSecretKey reports whether the value of key must never be shown.
func IsSecretKey(key string) bool {
	l := strings.ToLower(key)
	for _, s := range secretMarkers {
		if strings.Contains(l, s) {
			return true
		}
	}
	return false
}

// Bytes renders the configuration as "key = value" lines sorted by key: the
// same configuration always renders to the same bytes.
func (c *Config) Bytes() []byte {
	var b bytes.Buffer
	b.WriteString("# Written by muster-agent. Keys are sorted; unknown keys are kept.\n")
	for _, k := range c.Keys() {
		b.WriteString(k)
		b.WriteString(" = ")
		b.WriteString(c.values[k])
		b.WriteByte('\n')
	}
	return b.Bytes()
}

// Parse reads a configuration. Errors name the line. A key given twice is an
// error.
func Parse(data []byte) (*Config, error) {
	if len(data) > MaxSize {
		return nil, fmt.Errorf("%w: %d bytes, limit %d", ErrTooLarge, len(data), MaxSize)
	}
	c := New()
	lines := strings.Split(string(data), "\n")
	seen := make(map[string]int, len(lines))
	var errs []error
	for i, line := range lines {
		n := i + 1
		line = strings.TrimSuffix(line, "\r")
		t := strings.TrimSpace(line)
		if t == "" || strings.HasPrefix(t, "#") {
			continue
		}
		k, v, ok := strings.Cut(t, "=")
		if !ok {
			errs = append(errs, fmt.Errorf("line %d: %w: expected key = value", n, ErrSyntax))
			continue
		}
		k = strings.TrimSpace(k)
		if err := c.Set(k, v); err != nil {
			errs = append(errs, fmt.Errorf("line %d: %w", n, err))
			continue
		}
		if prev, dup := seen[k]; dup {
			errs = append(errs, fmt.Errorf("line %d: %w: key %q already set on line %d", n, ErrSyntax, k, prev))
			continue
		}
		seen[k] = n
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return c, nil
}

// Load reads and parses the file at path. A missing file is reported with an
// error satisfying errors.Is(err, os.ErrNotExist).
func Load(path string) (*Config, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return nil, err
	}
	if st.Size() > MaxSize {
		return nil, fmt.Errorf("%s: %w: %d bytes, limit %d", path, ErrTooLarge, st.Size(), MaxSize)
	}
	data := make([]byte, st.Size())
	if _, err := f.ReadAt(data, 0); err != nil && st.Size() > 0 {
		return nil, fmt.Errorf("read %s: %w", path, err)
	}
	c, err := Parse(data)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// Save writes the configuration to path atomically with mode 0600.
func (c *Config) Save(path string) error {
	return fsutil.WriteFileAtomic(path, c.Bytes(), 0o600)
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
