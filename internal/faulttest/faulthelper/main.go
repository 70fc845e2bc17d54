// Command faulthelper is the provisioning helper of the fault tests. It
// signs each node's CSR with the test CA, as a real helper does, except that
// the first run for a chosen fraction of nodes misbehaves: it hangs, it
// crashes (half a reply, a message on stderr, exit status 2), or it prints
// garbage. Which nodes is decided by a hash of the identity; "first" is
// decided across every provisioner with a marker file per identity, created
// exclusively in --state, so each faulty node fails once and is provisioned
// on a later attempt.
//
// By default it serves one request on stdin, the Choria helper contract.
// With --persistent it reads request lines and writes reply lines tagged
// with the request_id: a hang then leaves one request unanswered, a crash
// ends the process (every request in flight with it) and garbage is an
// unusable line (the runner replaces the process).
//
// It signs with crypto/x509 directly: it starts in a few milliseconds, so
// a thousand runs of it cost the machine little. It dies with its parent
// (Linux), and a hang lasts two minutes at most, so it never outlives a
// test.
package main

import (
	"bufio"
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"hash/fnv"
	"io"
	"math/big"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/muster-io/muster/helper"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
)

// maxHang bounds a hang.
const maxHang = 2 * time.Minute

type fault int

const (
	none fault = iota
	hang
	crash
	garbage
)

type signer struct {
	cert  *x509.Certificate
	caPEM []byte
	key   crypto.Signer
	hosts string
	state string
	// percentages of nodes whose first run hangs, crashes, prints garbage
	hangPct, crashPct, garbagePct uint32
	defaults                      map[string]string
}

func main() {
	caDir := flag.String("ca-dir", "", "directory with ca.pem and ca-key.pem")
	hosts := flag.String("middleware-hosts", "", "plugin.choria.middleware_hosts for every node")
	state := flag.String("state", "", "directory of the first-run markers (shared by every provisioner)")
	hangPct := flag.Uint("hang", 0, "percent of nodes whose first run hangs")
	crashPct := flag.Uint("crash", 0, "percent of nodes whose first run crashes")
	garbagePct := flag.Uint("garbage", 0, "percent of nodes whose first run prints garbage")
	alive := flag.String("alive-interval", "3s", "plugin.muster.alive_interval for every node")
	persistent := flag.Bool("persistent", false, "serve request lines until stdin closes")
	flag.Parse()
	dieWithParent()
	s, err := load(*caDir, *hosts, *state, *alive)
	if err == nil && *hangPct+*crashPct+*garbagePct > 100 {
		err = errors.New("--hang, --crash and --garbage add up to more than 100")
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "faulthelper:", err)
		os.Exit(1)
	}
	s.hangPct, s.crashPct, s.garbagePct = uint32(*hangPct), uint32(*crashPct), uint32(*garbagePct)
	if *persistent {
		err = s.serveLines(os.Stdin, os.Stdout)
	} else {
		err = s.serveOne(os.Stdin, os.Stdout)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "faulthelper:", err)
		os.Exit(1)
	}
}

// dieWithParent asks Linux to kill this process when the provisioner that
// ran it dies, so a hung run never outlives a killed provisioner.
func dieWithParent() {
	const prSetPdeathsig = 1
	_, _, _ = syscall.RawSyscall(syscall.SYS_PRCTL, prSetPdeathsig, uintptr(syscall.SIGKILL), 0)
	if os.Getppid() == 1 {
		os.Exit(1) // the parent died before the request was set up
	}
}

func load(caDir, hosts, state, alive string) (*signer, error) {
	if caDir == "" || hosts == "" || state == "" {
		return nil, errors.New("--ca-dir, --middleware-hosts and --state are required")
	}
	caPEM, err := os.ReadFile(filepath.Join(caDir, "ca.pem"))
	if err != nil {
		return nil, err
	}
	certs, err := pki.ParseCertificates(caPEM)
	if err != nil {
		return nil, err
	}
	keyPEM, err := os.ReadFile(filepath.Join(caDir, "ca-key.pem"))
	if err != nil {
		return nil, err
	}
	key, err := pki.ParsePrivateKey(keyPEM)
	if err != nil {
		return nil, err
	}
	return &signer{cert: certs[0], caPEM: caPEM, key: key, hosts: hosts, state: state, defaults: map[string]string{
		"plugin.choria.randomize_middleware_hosts": "true",
		"plugin.muster.alive_interval":             alive,
		"plugin.muster.reconnect_wait":             "100ms",
		"plugin.muster.reconnect_max_wait":         "2s",
	}}, nil
}

// faultFor decides what the run for identity does: a fault only the first
// time the identity is seen (by any run of any provisioner).
func (s *signer) faultFor(identity string) (fault, error) {
	h := fnv.New32a()
	h.Write([]byte(identity))
	v := h.Sum32() % 100
	var f fault
	switch {
	case v < s.hangPct:
		f = hang
	case v < s.hangPct+s.crashPct:
		f = crash
	case v < s.hangPct+s.crashPct+s.garbagePct:
		f = garbage
	default:
		return none, nil
	}
	if protocol.ValidateIdentity(identity) != nil {
		return none, nil
	}
	m, err := os.OpenFile(filepath.Join(s.state, identity), os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
	if errors.Is(err, os.ErrExist) {
		return none, nil
	}
	if err != nil {
		return none, err
	}
	return f, m.Close()
}

// sign answers one request.
func (s *signer) sign(req *helper.Request) (*helper.Reply, error) {
	if req.CSR == nil {
		return nil, errors.New("no CSR in the request")
	}
	csr, err := pki.ParseCSR([]byte(req.CSR.CSR))
	if err != nil {
		return nil, err
	}
	if csr.Subject.CommonName != req.Identity {
		return nil, fmt.Errorf("CSR for %q, request for %q", csr.Subject.CommonName, req.Identity)
	}
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 159))
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber: serial.Add(serial, big.NewInt(1)),
		Subject:      pkix.Name{CommonName: req.Identity},
		DNSNames:     []string{req.Identity},
		NotBefore:    now.Add(-time.Minute),
		NotAfter:     now.Add(24 * time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, s.cert, csr.PublicKey, s.key)
	if err != nil {
		return nil, err
	}
	conf := map[string]string{"plugin.choria.middleware_hosts": s.hosts}
	for k, v := range s.defaults {
		conf[k] = v
	}
	return &helper.Reply{
		Configuration: conf,
		Certificate:   string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		CA:            string(s.caPEM),
		SSLDir:        req.CSR.SSLDir,
		RequestID:     req.RequestID,
	}, nil
}

// serveOne is one exec'd run: a request on stdin, the reply on stdout.
func (s *signer) serveOne(in io.Reader, out io.Writer) error {
	data, err := io.ReadAll(io.LimitReader(in, 1<<20))
	if err != nil {
		return err
	}
	var req helper.Request
	if err := json.Unmarshal(data, &req); err != nil {
		return err
	}
	f, err := s.faultFor(req.Identity)
	if err != nil {
		return err
	}
	switch f {
	case hang:
		time.Sleep(maxHang)
		return errors.New("hung for too long")
	case crash:
		fmt.Fprint(out, `{"configuration":{"plugin.choria.middle`)
		fmt.Fprintln(os.Stderr, "panic: simulated crash of the signing service")
		os.Exit(2)
	case garbage:
		_, err := fmt.Fprintln(out, "Traceback (most recent call last):\n  File \"sign.py\", line 1\nNameError: ca")
		return err
	}
	rep, err := s.sign(&req)
	if err != nil {
		return err
	}
	return json.NewEncoder(out).Encode(rep)
}

// serveLines is the persistent mode: request lines in, reply lines out,
// several requests in flight at once.
func (s *signer) serveLines(in io.Reader, out io.Writer) error {
	var mu sync.Mutex
	write := func(b []byte) {
		mu.Lock()
		defer mu.Unlock()
		_, _ = out.Write(b)
	}
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 64*1024), 1<<20)
	var wg sync.WaitGroup
	for sc.Scan() {
		var req helper.Request
		if err := json.Unmarshal(sc.Bytes(), &req); err != nil {
			return err
		}
		f, err := s.faultFor(req.Identity)
		if err != nil {
			return err
		}
		switch f {
		case hang:
			continue // this request is never answered
		case crash:
			write([]byte(`{"request_id":"` + req.RequestID + `","configuration":{"plugin.`))
			fmt.Fprintln(os.Stderr, "panic: simulated crash of the signing service")
			os.Exit(2)
		case garbage:
			write([]byte("Traceback (most recent call last): NameError: ca\n"))
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			rep, err := s.sign(&req)
			if err != nil {
				b, _ := json.Marshal(map[string]string{"request_id": req.RequestID, "error": err.Error()})
				write(append(b, '\n'))
				return
			}
			b, err := json.Marshal(rep)
			if err != nil {
				return
			}
			write(append(b, '\n'))
		}()
	}
	wg.Wait()
	return sc.Err()
}
