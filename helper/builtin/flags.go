package builtin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"path/filepath"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/x509ca"
)

// Environment variables the helper programs take flag defaults from
// (muster demo and muster bench set them for exec'd helpers).
const (
	// EnvCADir is the default of --ca-dir.
	EnvCADir = "MUSTER_CA_DIR"
	// EnvBroker is the default of --middleware-hosts.
	EnvBroker = "MUSTER_BROKER"
)

// DefaultConcurrency is the default of --concurrency: requests a persistent
// helper answers at once.
const DefaultConcurrency = 8

// Flags are the command-line settings of both helper programs, "muster
// helper cfssl" and muster-helper, so the two take the same flags with the
// same defaults and meaning.
type Flags struct {
	// Config is the YAML configuration file (--config).
	Config string
	// CADir holds ca.pem and ca-key.pem and overrides the configuration's
	// ca (--ca-dir, default $MUSTER_CA_DIR).
	CADir string
	// MiddlewareHosts overrides the configuration's middleware_hosts
	// (--middleware-hosts, default $MUSTER_BROKER).
	MiddlewareHosts string
	// Persistent serves newline-delimited requests until stdin ends
	// (--persistent).
	Persistent bool
	// Concurrency is how many requests a persistent helper answers at once
	// (--concurrency).
	Concurrency int
	// CheckConfig validates the configuration and loads the CA, then stops
	// (--check-config).
	CheckConfig bool
}

// FlagSet is what Register needs of a flag set; the standard library's
// flag.FlagSet and cobra's pflag.FlagSet both have it.
type FlagSet interface {
	StringVar(p *string, name, value, usage string)
	BoolVar(p *bool, name string, value bool, usage string)
	IntVar(p *int, name string, value int, usage string)
}

// Register defines the flags on fs, reading the environment defaults with
// getenv (os.Getenv).
func (f *Flags) Register(fs FlagSet, getenv func(string) string) {
	fs.StringVar(&f.Config, "config", "", "helper configuration file (YAML)")
	fs.StringVar(&f.CADir, "ca-dir", getenv(EnvCADir), "CA directory holding ca.pem and ca-key.pem (overrides the config's ca; default $"+EnvCADir+")")
	fs.StringVar(&f.MiddlewareHosts, "middleware-hosts", getenv(EnvBroker), "default plugin.choria.middleware_hosts (overrides the config's middleware_hosts; default $"+EnvBroker+")")
	fs.BoolVar(&f.Persistent, "persistent", false, "persistent mode: request lines in, reply lines out, until stdin ends")
	fs.IntVar(&f.Concurrency, "concurrency", DefaultConcurrency, "requests answered at once in persistent mode")
	fs.BoolVar(&f.CheckConfig, "check-config", false, "validate the configuration and the CA, then exit")
}

// Configuration loads the configuration file the flags name, if any, and
// applies --ca-dir and --middleware-hosts over it. One of --config and
// --ca-dir is required.
func (f *Flags) Configuration() (*Config, error) {
	if f.Config == "" && f.CADir == "" {
		return nil, errors.New("--config or --ca-dir (or $" + EnvCADir + ") is required")
	}
	if f.Persistent && f.Concurrency < 1 {
		return nil, fmt.Errorf("--concurrency %d: must be at least 1", f.Concurrency)
	}
	cfg := &Config{}
	if f.Config != "" {
		var err error
		if cfg, err = LoadConfig(f.Config); err != nil {
			return nil, err
		}
	}
	if f.CADir != "" {
		cfg.CA = CAFiles{Cert: filepath.Join(f.CADir, x509ca.CertFile), Key: filepath.Join(f.CADir, x509ca.KeyFile)}
	}
	if f.MiddlewareHosts != "" {
		cfg.MiddlewareHosts = f.MiddlewareHosts
	}
	return cfg, nil
}

// Run is a helper program: it builds the helper the flags describe,
// loading its CA with load, and answers one request from stdin on stdout
// (or, with Persistent, request lines until stdin ends; failed requests get
// an error reply, undecodable lines are reported on stderr). With
// CheckConfig it stops once the configuration and the CA are loaded.
func Run(ctx context.Context, f Flags, load LoadSigner, stdin io.Reader, stdout, stderr io.Writer) error {
	cfg, err := f.Configuration()
	if err != nil {
		return err
	}
	h, err := NewFromFiles(cfg, load)
	if err != nil {
		return err
	}
	if f.CheckConfig {
		return nil
	}
	if f.Persistent {
		return helper.ServeLines(ctx, h, stdin, stdout, stderr, f.Concurrency)
	}
	return helper.ServeOne(ctx, h, stdin, stdout)
}
