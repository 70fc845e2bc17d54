package main

import "github.com/spf13/cobra"

// TEMPORARY during the first build session: replaced by the helper subcommand.
func newHelperCmd() *cobra.Command { return &cobra.Command{Use: "helper", Hidden: true} }
