package main

import (
	"errors"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/helper/cfsslhelper"
	"github.com/muster-io/muster/internal/ca"
)

func newHelperCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "helper",
		Short: "Built-in provisioning helpers (Choria-compatible helper programs)",
	}
	cmd.AddCommand(newHelperCfsslCmd())
	return cmd
}

func newHelperCfsslCmd() *cobra.Command {
	var configFile, caDir, hosts string
	var check, persistent bool
	var concurrency int
	cmd := &cobra.Command{
		Use:   "cfssl",
		Short: "Answer one helper request on stdin with a reply on stdout, signing the CSR with a cfssl CA",
		Long: `Reads one helper request (JSON, at most 1 MiB) on stdin, writes the reply JSON on stdout and
exits 0; errors go to stderr with exit status 1. The configuration (see docs/helpers.md) names the
CA, the brokers, default configuration and fact rules; --ca-dir and --middleware-hosts override it
(and are enough on their own).

With --persistent it is a persistent helper instead: it reads newline-delimited requests until
stdin ends, answers up to --concurrency of them at once, and writes one reply line per request,
tagged with its request_id (a failed request gets a reply with "error" set).`,
		Example: `  muster helper cfssl --config /etc/muster/helper-cfssl.yaml < request.json
  muster helper cfssl --ca-dir ./ca --middleware-hosts broker.example.net:4222 < request.json
  muster helper cfssl --config /etc/muster/helper-cfssl.yaml --persistent --concurrency 16   # provisioner helper_mode: persistent`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg := &cfsslhelper.Config{}
			if configFile != "" {
				var err error
				if cfg, err = cfsslhelper.LoadConfig(configFile); err != nil {
					return err
				}
			}
			if caDir != "" {
				cfg.CA = cfsslhelper.CAFiles{Cert: filepath.Join(caDir, ca.CertFile), Key: filepath.Join(caDir, ca.KeyFile)}
			}
			if hosts != "" {
				cfg.MiddlewareHosts = hosts
			}
			if configFile == "" && caDir == "" {
				return errors.New("helper cfssl: --config or --ca-dir is required")
			}
			h, err := cfsslhelper.New(cfg)
			if err != nil {
				return err
			}
			if check {
				return nil
			}
			if persistent {
				return helper.ServeLines(cmd.Context(), h, cmd.InOrStdin(), cmd.OutOrStdout(), cmd.ErrOrStderr(), concurrency)
			}
			return helper.ServeOne(cmd.Context(), h, cmd.InOrStdin(), cmd.OutOrStdout())
		},
	}
	cmd.Flags().StringVar(&configFile, "config", "", "helper configuration file (YAML)")
	cmd.Flags().StringVar(&caDir, "ca-dir", os.Getenv("MUSTER_CA_DIR"), "CA directory holding ca.pem and ca-key.pem (overrides the config's ca; default $MUSTER_CA_DIR)")
	cmd.Flags().StringVar(&hosts, "middleware-hosts", os.Getenv("MUSTER_BROKER"), "default plugin.choria.middleware_hosts (overrides the config's middleware_hosts; default $MUSTER_BROKER)")
	cmd.Flags().BoolVar(&persistent, "persistent", false, "persistent mode: request lines in, reply lines out, until stdin ends")
	cmd.Flags().IntVar(&concurrency, "concurrency", 8, "requests answered at once in persistent mode")
	cmd.Flags().BoolVar(&check, "check-config", false, "validate the configuration and the CA, then exit")
	return cmd
}
