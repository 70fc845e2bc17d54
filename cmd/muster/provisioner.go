package main

import "github.com/spf13/cobra"

// TEMPORARY during the first build session: replaced by the provisioner subcommand.
func newProvisionerCmd() *cobra.Command { return &cobra.Command{Use: "provisioner", Hidden: true} }
