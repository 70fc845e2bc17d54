package main

import "github.com/spf13/cobra"

// TEMPORARY during the first build session: replaced by the demo subcommand.
func newDemoCmd() *cobra.Command { return &cobra.Command{Use: "demo", Hidden: true} }
