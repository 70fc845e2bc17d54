package main

import (
	"os"

	"github.com/spf13/cobra"

	"github.com/muster-io/muster/helper/builtin"
	"github.com/muster-io/muster/helper/cfsslhelper"
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
	var f builtin.Flags
	cmd := &cobra.Command{
		Use:   "cfssl",
		Short: "Answer one helper request on stdin with a reply on stdout, signing the CSR with a cfssl CA",
		Long: `Reads one helper request (JSON, at most 1 MiB) on stdin, writes the reply JSON on stdout and
exits 0; errors go to stderr with exit status 1. The configuration (see docs/helpers.md) names the
CA, the brokers, default configuration and fact rules; --ca-dir and --middleware-hosts override it
(and are enough on their own).

With --persistent it is a persistent helper instead: it reads newline-delimited requests until
stdin ends, answers up to --concurrency of them at once, and writes one reply line per request,
tagged with its request_id (a failed request gets a reply with "error" set).

The muster-helper binary is the same helper (same flags, configuration and replies) signing with
crypto/x509 instead of cfssl: a small program that starts in a few milliseconds, for exec'd use.`,
		Example: `  muster helper cfssl --config /etc/muster/helper-cfssl.yaml < request.json
  muster helper cfssl --ca-dir ./ca --middleware-hosts broker.example.net:4222 < request.json
  muster helper cfssl --config /etc/muster/helper-cfssl.yaml --persistent --concurrency 16   # provisioner helper_mode: persistent`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return builtin.Run(cmd.Context(), f, cfsslhelper.LoadCA, cmd.InOrStdin(), cmd.OutOrStdout(), cmd.ErrOrStderr())
		},
	}
	f.Register(cmd.Flags(), os.Getenv)
	return cmd
}
