package main

import "github.com/spf13/cobra"

// TEMPORARY during the first build session: replaced by the broker subcommand.
func newBrokerCmd() *cobra.Command { return &cobra.Command{Use: "broker", Hidden: true} }
