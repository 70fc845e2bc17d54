package builtin

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"gopkg.in/yaml.v3"

	"github.com/muster-io/muster/helper"
)

// Defaults.
const (
	DefaultValidity = "8760h"
	// DefaultSSLDir is the ssldir used for {{ssldir}} when a request has no
	// CSR (the node keeps the key and certificate it already has).
	DefaultSSLDir = "/etc/muster/ssl"
)

// Config is the built-in helper's configuration (YAML; unknown keys are
// rejected).
type Config struct {
	// CA locates the signing CA on disk (certificate and key PEM files).
	CA CAFiles `yaml:"ca"`
	// Validity is the lifetime of signed node certificates (a Go
	// duration), default 8760h.
	Validity string `yaml:"validity"`
	// MiddlewareHosts is the default plugin.choria.middleware_hosts.
	MiddlewareHosts string `yaml:"middleware_hosts"`
	// SSLDir is {{ssldir}} for requests without a CSR, default
	// /etc/muster/ssl. With a CSR the node's own ssldir is used.
	SSLDir string `yaml:"ssldir"`
	// Defaults is configuration every node gets (after the base keys).
	Defaults map[string]string `yaml:"defaults"`
	// Rules are applied in order after Defaults; later rules override.
	Rules []Rule `yaml:"rules"`
	// DeferUnless defers nodes lacking any of these facts, or whose value
	// does not match the glob (path.Match syntax).
	DeferUnless map[string]string `yaml:"defer_unless"`

	validity time.Duration
}

// CAFiles names the CA certificate and key files.
type CAFiles struct {
	Cert string `yaml:"cert"`
	Key  string `yaml:"key"`
}

// Rule sets configuration on the nodes whose facts all match.
type Rule struct {
	// Name identifies the rule in errors and messages.
	Name string `yaml:"name"`
	// Facts must all match; values are path.Match globs.
	Facts map[string]string `yaml:"facts"`
	// Set is the configuration the rule sets.
	Set map[string]string `yaml:"set"`
}

// LoadConfig reads a YAML configuration file, applies defaults and
// validates it.
func LoadConfig(file string) (*Config, error) {
	data, err := os.ReadFile(file)
	if err != nil {
		return nil, fmt.Errorf("helper config: %w", err)
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return nil, fmt.Errorf("helper config %s: %w", file, err)
	}
	return cfg, nil
}

// ParseConfig parses YAML (unknown keys rejected), applies defaults and
// validates.
func ParseConfig(data []byte) (*Config, error) {
	var cfg Config
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(&cfg); err != nil && !errors.Is(err, io.EOF) {
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	return &cfg, nil
}

// applyDefaults fills unset fields.
func (c *Config) applyDefaults() {
	if c.Validity == "" {
		c.Validity = DefaultValidity
	}
	if c.SSLDir == "" {
		c.SSLDir = DefaultSSLDir
	}
}

// Validate applies defaults and reports every problem, naming the key and
// value. It does not require ca.cert and ca.key (NewWithCA does without);
// New does.
func (c *Config) Validate() error {
	c.applyDefaults()
	var errs []error
	d, err := time.ParseDuration(c.Validity)
	if err != nil || d <= 0 {
		errs = append(errs, fmt.Errorf("validity %q: want a positive duration such as 8760h", c.Validity))
	}
	c.validity = d
	if (c.CA.Cert == "") != (c.CA.Key == "") {
		errs = append(errs, fmt.Errorf("ca: cert %q and key %q must be set together", c.CA.Cert, c.CA.Key))
	}
	if strings.ContainsAny(c.MiddlewareHosts, " \t\r\n") {
		errs = append(errs, fmt.Errorf("middleware_hosts %q: must not contain whitespace", c.MiddlewareHosts))
	}
	if !strings.HasPrefix(c.SSLDir, "/") {
		errs = append(errs, fmt.Errorf("ssldir %q: must be an absolute path", c.SSLDir))
	}
	errs = append(errs, checkSet("defaults", c.Defaults)...)
	errs = append(errs, checkGlobs("defer_unless", c.DeferUnless)...)
	names := map[string]bool{}
	for i, r := range c.Rules {
		where := fmt.Sprintf("rules[%d]", i)
		if r.Name == "" {
			errs = append(errs, fmt.Errorf("%s.name: empty", where))
		} else if names[r.Name] {
			errs = append(errs, fmt.Errorf("%s.name %q: duplicate", where, r.Name))
		}
		names[r.Name] = true
		if len(r.Set) == 0 {
			errs = append(errs, fmt.Errorf("%s (%s).set: empty", where, r.Name))
		}
		errs = append(errs, checkGlobs(where+".facts", r.Facts)...)
		errs = append(errs, checkSet(where+".set", r.Set)...)
	}
	return errors.Join(errs...)
}

// checkSet validates configuration keys and templates.
func checkSet(where string, set map[string]string) []error {
	var errs []error
	for _, k := range sortedKeys(set) {
		if err := helper.ValidateConfigKey(k); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", where, err))
			continue
		}
		if k == "identity" {
			errs = append(errs, fmt.Errorf("%s.identity: always the node's identity, cannot be set", where))
			continue
		}
		if strings.ContainsAny(set[k], "\n\r\x00") {
			errs = append(errs, fmt.Errorf("%s.%s %q: contains a newline or NUL", where, k, set[k]))
		}
		if err := checkTemplate(set[k]); err != nil {
			errs = append(errs, fmt.Errorf("%s.%s %q: %w", where, k, set[k], err))
		}
	}
	return errs
}

// checkGlobs validates fact globs.
func checkGlobs(where string, m map[string]string) []error {
	var errs []error
	for _, k := range sortedKeys(m) {
		if k == "" {
			errs = append(errs, fmt.Errorf("%s: empty fact name", where))
		}
		if _, err := path.Match(m[k], ""); err != nil {
			errs = append(errs, fmt.Errorf("%s.%s %q: bad glob: %w", where, k, m[k], err))
		}
	}
	return errs
}

func sortedKeys(m map[string]string) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

// clone returns a deep copy, so a Helper is not affected by later changes
// to the caller's Config.
func (c *Config) clone() *Config {
	cp := *c
	cp.Defaults = cloneMap(c.Defaults)
	cp.DeferUnless = cloneMap(c.DeferUnless)
	cp.Rules = make([]Rule, len(c.Rules))
	for i, r := range c.Rules {
		cp.Rules[i] = Rule{Name: r.Name, Facts: cloneMap(r.Facts), Set: cloneMap(r.Set)}
	}
	return &cp
}

func cloneMap(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	cp := make(map[string]string, len(m))
	for k, v := range m {
		cp[k] = v
	}
	return cp
}
