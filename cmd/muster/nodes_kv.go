package main

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"os"
	"text/tabwriter"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/nats-io/nkeys"
	"github.com/spf13/cobra"

	"github.com/muster-io/muster/internal/nodestate"
	"github.com/muster-io/muster/internal/protocol"
)

// kvFlags select reading the shared node state from JetStream KV (ha
// modes) instead of one provisioner's monitor.
type kvFlags struct {
	use         bool
	brokers     []string
	nkey, tlsCA string
	timeout     time.Duration
}

func (k *kvFlags) register(cmd *cobra.Command) {
	f := cmd.PersistentFlags()
	f.BoolVar(&k.use, "kv", false, "ls/show: read the shared node state from JetStream KV on the brokers (ha modes)")
	f.StringArrayVar(&k.brokers, "broker", []string{"tls://127.0.0.1:4222"}, "with --kv: provisioning broker URL (repeatable)")
	f.StringVar(&k.nkey, "nkey", "", "with --kv: a provisioner nkey seed file (the broker admits provisioners to the KV)")
	f.StringVar(&k.tlsCA, "tls-ca", "", "with --kv: CA file of the brokers' certificates")
	f.DurationVar(&k.timeout, "timeout", 10*time.Second, "with --kv: how long to wait for the brokers")
}

func (k *kvFlags) open(ctx context.Context) (*nodestate.Store, func(), error) {
	if k.nkey == "" {
		return nil, nil, errors.New("--kv needs --nkey (a provisioner seed file)")
	}
	opts := []nats.Option{nats.Name("muster-nodes"), nats.Timeout(k.timeout)}
	seed, err := os.ReadFile(k.nkey)
	if err != nil {
		return nil, nil, fmt.Errorf("--nkey: %w", err)
	}
	kp, err := nkeys.ParseDecoratedNKey(seed)
	if err != nil {
		return nil, nil, fmt.Errorf("--nkey %s: not an nkey seed", k.nkey)
	}
	pub, err := kp.PublicKey()
	if err != nil {
		return nil, nil, fmt.Errorf("--nkey %s: %w", k.nkey, err)
	}
	// A provisioner's seed signs requests too: sign only real nonces.
	opts = append(opts, nats.Secure(&tls.Config{MinVersion: tls.VersionTLS12}),
		nats.Nkey(pub, func(nonce []byte) ([]byte, error) { return protocol.SignNonce(kp, nonce) }))
	if k.tlsCA != "" {
		opts = append(opts, nats.RootCAs(k.tlsCA))
	}
	var urls string
	for i, b := range k.brokers {
		if i > 0 {
			urls += ","
		}
		urls += b
	}
	nc, err := nats.Connect(urls, opts...)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to %s: %w", urls, err)
	}
	js, err := jetstream.New(nc)
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	octx, cancel := context.WithTimeout(ctx, k.timeout)
	defer cancel()
	st, err := nodestate.Open(octx, js, "")
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	return st, nc.Close, nil
}

func kvList(cmd *cobra.Command, k *kvFlags, state string, asJSON bool) error {
	st, closeFn, err := k.open(cmd.Context())
	if err != nil {
		return err
	}
	defer closeFn()
	ctx, cancel := context.WithTimeout(cmd.Context(), time.Minute)
	defer cancel()
	recs, bad, err := st.List(ctx)
	if err != nil {
		return err
	}
	if state != "" {
		kept := recs[:0]
		for _, r := range recs {
			if r.State == state {
				kept = append(kept, r)
			}
		}
		recs = kept
	}
	if recs == nil {
		recs = []nodestate.Record{}
	}
	if asJSON {
		return writeIndented(cmd.OutOrStdout(), recs)
	}
	tw := tabwriter.NewWriter(cmd.OutOrStdout(), 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "IDENTITY\tSTATE\tSTAGE\tATTEMPTS\tPROVISIONS\tCLAIMED BY\tPROVISIONED BY\tUPDATED\tLAST ERROR")
	for _, r := range recs {
		lastErr := r.LastError
		if len(lastErr) > 80 {
			lastErr = lastErr[:77] + "..."
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%d\t%s\t%s\t%s\t%s\n", r.Identity, r.State, r.Stage, r.Attempts, r.Provisions, r.ClaimedBy, r.ProvisionedBy,
			r.Updated.Local().Format(time.DateTime), lastErr)
	}
	if bad > 0 {
		fmt.Fprintf(tw, "(%d undecodable records skipped)\n", bad)
	}
	return tw.Flush()
}

func kvShow(cmd *cobra.Command, k *kvFlags, id string) error {
	if err := protocol.ValidateIdentity(id); err != nil {
		return err
	}
	st, closeFn, err := k.open(cmd.Context())
	if err != nil {
		return err
	}
	defer closeFn()
	ctx, cancel := context.WithTimeout(cmd.Context(), k.timeout)
	defer cancel()
	r, err := st.Get(ctx, id)
	if err != nil {
		return err
	}
	return writeIndented(cmd.OutOrStdout(), r)
}
