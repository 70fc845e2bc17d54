package main

import "github.com/spf13/cobra"

// TEMPORARY during the first build session: replaced by the ca subcommand.
func newCACmd() *cobra.Command { return &cobra.Command{Use: "ca", Hidden: true} }
