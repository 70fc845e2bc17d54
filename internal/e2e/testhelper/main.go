// Command testhelper is a misbehaving provisioning helper for the end-to-end
// tests. It is a real program exec'd by the provisioner, reading the request
// on stdin like any helper. Its first argument picks the behaviour:
//
//	cfssl       check the token claims (jwt), then run the real helper
//	defer-once  defer each identity the first time, then run the real helper
//	sleep       never answer (the provisioner must time it out)
//	garbage     print text that is not JSON
//	exit        complain on stderr and exit 3
//	wrong-key   sign a certificate for a key the node does not hold
//
// The real helper is "$MUSTER_BIN helper cfssl", run with the fleet's CA
// (MUSTER_CA_DIR) and production broker (MUSTER_BROKER).
package main

import (
	"encoding/json"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/ca"
	"github.com/muster-io/muster/internal/pki"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "testhelper:", err)
		os.Exit(1)
	}
}

func run() error {
	if len(os.Args) < 2 {
		return fmt.Errorf("usage: testhelper defer-once|sleep|garbage|wrong-key")
	}
	mode := os.Args[1]
	switch mode {
	case "sleep":
		time.Sleep(time.Hour)
		return nil
	case "garbage":
		fmt.Println("this is not JSON {")
		return nil
	case "exit":
		fmt.Fprintln(os.Stderr, "boom: the CA is out of capacity")
		os.Exit(3)
	}
	in, err := io.ReadAll(io.LimitReader(os.Stdin, 1<<20))
	if err != nil {
		return err
	}
	var req helper.Request
	if err := json.Unmarshal(in, &req); err != nil {
		return err
	}
	switch mode {
	case "cfssl":
		if err := checkClaims(&req); err != nil {
			return err
		}
		return realHelper(in)
	case "defer-once":
		marker := filepath.Join(os.Getenv("MUSTER_TEST_STATE"), req.Identity)
		if _, err := os.Stat(marker); os.IsNotExist(err) {
			if err := os.WriteFile(marker, nil, 0o600); err != nil {
				return err
			}
			return json.NewEncoder(os.Stdout).Encode(helper.Reply{Defer: true, Msg: "first visit: come back later", RetryAfter: 1})
		}
		return realHelper(in)
	case "wrong-key":
		c, err := ca.LoadDir(os.Getenv("MUSTER_CA_DIR"), 0)
		if err != nil {
			return err
		}
		key, err := pki.GenerateKey("", 0)
		if err != nil {
			return err
		}
		csr, err := pki.CreateCSR(key, req.Identity, pki.CSRSubject{})
		if err != nil {
			return err
		}
		cert, err := c.SignCSR(csr, []string{req.Identity})
		if err != nil {
			return err
		}
		ssldir := ""
		if req.CSR != nil {
			ssldir = req.CSR.SSLDir
		}
		return json.NewEncoder(os.Stdout).Encode(helper.Reply{
			Configuration: map[string]string{"plugin.choria.middleware_hosts": os.Getenv("MUSTER_BROKER")},
			Certificate:   string(cert),
			CA:            string(c.CertificatePEM()),
			SSLDir:        ssldir,
		})
	default:
		return fmt.Errorf("unknown mode %q", mode)
	}
}

// checkClaims insists on what COMPAT.md promises the helper: the verified
// claims of the node's provisioning token as "jwt" (the demo fleet's tokens
// are for one identity, batch "demo"), and never the token itself.
func checkClaims(req *helper.Request) error {
	var c struct {
		Subject string `json:"sub"`
		Issuer  string `json:"iss"`
		Muster  struct {
			Identity string `json:"identity"`
			Batch    string `json:"batch"`
		} `json:"muster"`
	}
	if err := json.Unmarshal(req.JWT, &c); err != nil {
		return fmt.Errorf("jwt %s: %w", req.JWT, err)
	}
	if c.Subject != req.Identity || c.Muster.Identity != req.Identity || c.Muster.Batch != "demo" || c.Issuer == "" {
		return fmt.Errorf("jwt claims %s do not fit %s", req.JWT, req.Identity)
	}
	if strings.Contains(req.Inventory, "eyJ") {
		return fmt.Errorf("the inventory carries a token")
	}
	return nil
}

// realHelper replaces this process with the real built-in helper, feeding it
// the request already read.
func realHelper(req []byte) error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	if _, err := w.Write(req); err != nil {
		return err
	}
	w.Close()
	if err := syscall.Dup2(int(r.Fd()), 0); err != nil {
		return err
	}
	bin := os.Getenv("MUSTER_BIN")
	return syscall.Exec(bin, []string{bin, "helper", "cfssl", "--ca-dir", os.Getenv("MUSTER_CA_DIR"), "--middleware-hosts", os.Getenv("MUSTER_BROKER")}, os.Environ())
}
