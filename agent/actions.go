package agent

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rsa"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/sirupsen/logrus"

	"github.com/muster-io/muster/agent/config"
	"github.com/muster-io/muster/internal/fsutil"
	"github.com/muster-io/muster/internal/pki"
	"github.com/muster-io/muster/internal/protocol"
)

// PoliciesDir is the directory under the state directory where configure
// installs action and OPA policies.
const PoliciesDir = "policies"

// maxPolicySize bounds one policy file.
const maxPolicySize = 64 * 1024

func (s *session) genCSR(body protocol.GenCSRRequest, log *logrus.Entry) answer {
	key, reused := s.a.reusableKey(body, log)
	if key == nil {
		var err error
		if key, err = pki.GenerateKey(body.KeyType, body.RSABits); err != nil {
			return fail(protocol.CodeBadRequest, "%v", err)
		}
	}
	csrPEM, err := pki.CreateCSR(key, s.a.id, pki.CSRSubject{
		Country: body.Country, Locality: body.Locality, Organization: body.Organization,
		OrgUnit: body.OrgUnit, State: body.State,
	})
	if err != nil {
		return fail(protocol.CodeBadRequest, "subject fields: %v", errors.Unwrap(err))
	}
	keyPEM, err := pki.MarshalPrivateKey(key)
	if err != nil {
		log.WithError(err).Error("gencsr: encode key")
		return fail(protocol.CodeInternal, "could not encode the key")
	}
	pubPEM, err := pki.MarshalPublicKey(key.Public())
	if err != nil {
		log.WithError(err).Error("gencsr: encode public key")
		return fail(protocol.CodeInternal, "could not encode the public key")
	}
	// The key stays in memory until configure writes it together with the
	// certificate that matches it: one durable write per node, and no key
	// on disk without its certificate. A process restart in between loses
	// it; the provisioner then starts over with a new gencsr.
	s.a.pending = &pendingKey{key: key, pem: keyPEM, csr: csrPEM}
	log.WithFields(logrus.Fields{"key_type": keyTypeName(body), "reused_key": reused}).Info("made a CSR")
	return ok(protocol.GenCSRReply{CSR: string(csrPEM), PublicKey: string(pubPEM), SSLDir: s.a.sslDir})
}

// reusableKey returns the node's existing key when it can serve this
// gencsr: the key of a gencsr not yet configured, else the key on disk from
// an earlier provisioning, if it is of the requested type and size and the
// request does not ask for a new one (rotate). Keeping the key across
// reprovisioning keeps the node's identity: the provisioner holds
// identities that come back with a different key.
func (a *Agent) reusableKey(body protocol.GenCSRRequest, log *logrus.Entry) (crypto.Signer, bool) {
	if body.Rotate {
		return nil, false
	}
	if p := a.pending; p != nil && keyFits(p.key, body) {
		return p.key, true
	}
	keyFile := filepath.Join(a.sslDir, KeyFile)
	if !a.confined(keyFile) {
		log.Warn("gencsr: the key on disk lies behind a symbolic link out of the state directory; making a new one")
		return nil, false
	}
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		return nil, false
	}
	key, err := pki.ParsePrivateKey(keyPEM)
	if err != nil {
		log.WithError(err).Warn("gencsr: the key on disk is unusable; making a new one")
		return nil, false
	}
	if !keyFits(key, body) {
		return nil, false
	}
	return key, true
}

// keyFits reports whether key is of the type and at least the size body
// asks for.
func keyFits(key crypto.Signer, body protocol.GenCSRRequest) bool {
	switch k := key.Public().(type) {
	case *ecdsa.PublicKey:
		return (body.KeyType == "" || body.KeyType == protocol.KeyECDSAP256) && k.Curve == elliptic.P256()
	case *rsa.PublicKey:
		bits := body.RSABits
		if bits == 0 {
			bits = 2048
		}
		return body.KeyType == protocol.KeyRSA && k.N.BitLen() >= bits
	}
	return false
}

func keyTypeName(b protocol.GenCSRRequest) string {
	if b.KeyType == protocol.KeyRSA {
		bits := b.RSABits
		if bits == 0 {
			bits = 2048
		}
		return fmt.Sprintf("rsa-%d", bits)
	}
	return protocol.KeyECDSAP256
}

// configure verifies everything the request carries before writing anything,
// then writes certificate, CA, policies and finally the configuration.
func (s *session) configure(body protocol.ConfigureRequest, now time.Time, log *logrus.Entry) answer {
	a := s.a
	if body.SSLDir != "" && (!filepath.IsAbs(body.SSLDir) || filepath.Clean(body.SSLDir) != a.sslDir) {
		return fail(protocol.CodeBadRequest, "ssldir must be this node's ssldir as reported by gencsr")
	}
	cfg, err := config.FromMap(body.Configuration)
	if err != nil {
		return fail(protocol.CodeBadRequest, "configuration: %v", err)
	}
	if id, set := cfg.Get(config.KeyIdentity); set && id != a.id {
		return fail(protocol.CodeBadRequest, "configuration: identity %q is not this node's identity %q", id, a.id)
	}
	// Paths the agent will open are confined to its state directory, so a
	// configuration cannot point it at files elsewhere on the machine, not
	// even through a symbolic link inside the state directory.
	for _, k := range []string{config.KeyCertificate, config.KeyKey, config.KeyCA} {
		if v, set := cfg.Get(k); set && !a.confined(v) {
			return fail(protocol.CodeBadRequest, "configuration: %s must be an absolute path inside the agent's state directory", k)
		}
	}
	var files []fsutil.File
	certPath := filepath.Join(a.sslDir, CertFile)
	caPath := filepath.Join(a.sslDir, CAFile)
	keyPath := filepath.Join(a.sslDir, KeyFile)
	certInstalled := false
	var verified *verifiedFiles
	switch {
	case body.Certificate != "":
		key, keyPEM, pending, ans := a.configureKey(keyPath, log)
		if ans != nil {
			return *ans
		}
		if body.CA == "" {
			return fail(protocol.CodeInvalidCert, "a certificate needs the ca that signed it")
		}
		v, err := pki.VerifyChain([]byte(body.Certificate), []byte(body.CA), key.Public(), a.id, now)
		if err != nil {
			return fail(protocol.CodeInvalidCert, "%v", err)
		}
		if pending != nil {
			files = append(files,
				fsutil.File{Path: keyPath, Data: keyPEM, Perm: 0o600},
				fsutil.File{Path: filepath.Join(a.sslDir, CSRFile), Data: pending.csr, Perm: 0o644})
		}
		files = append(files,
			fsutil.File{Path: certPath, Data: []byte(body.Certificate), Perm: 0o644},
			fsutil.File{Path: caPath, Data: []byte(body.CA), Perm: 0o644})
		certInstalled = true
		verified = newVerifiedFiles(a.id, []byte(body.Certificate), []byte(body.CA), keyPEM, v)
	case body.CA != "":
		if _, err := pki.ParseCertificates([]byte(body.CA)); err != nil {
			return fail(protocol.CodeInvalidCert, "ca: %v", err)
		}
		files = append(files, fsutil.File{Path: caPath, Data: []byte(body.CA), Perm: 0o644})
	}
	polFiles, ans := a.policyFiles(body)
	if ans != nil {
		return *ans
	}
	files = append(files, polFiles...)

	defaults := map[string]string{config.KeyIdentity: a.id}
	if certInstalled {
		defaults[config.KeySecurityProv] = "file"
		defaults[config.KeyCertificate] = certPath
		defaults[config.KeyKey] = keyPath
		defaults[config.KeyCA] = caPath
		if _, set := cfg.Get(config.KeyProvision); !set {
			log.Infof("helper did not set %s; setting it to false because a certificate was installed", config.KeyProvision)
			defaults[config.KeyProvision] = "false"
		}
	}
	for k, v := range defaults {
		if _, set := cfg.Get(k); !set {
			if err := cfg.Set(k, v); err != nil {
				log.WithError(err).Error("configure: default key")
				return fail(protocol.CodeInternal, "could not build the configuration")
			}
		}
	}
	// Every file written inside the state directory must stay there once
	// symbolic links are followed (an ssl or policies directory linked
	// elsewhere would take the key and certificate with it).
	for _, f := range append(files, fsutil.File{Path: a.configFile}) {
		if (f.Path != a.configFile || within(a.stateDir, a.configFile)) && !a.confined(f.Path) {
			log.WithField("path", f.Path).Error("configure: refusing to write through a symbolic link out of the state directory")
			return fail(protocol.CodeInternal, "the node's state directory is not safe to write")
		}
	}
	files = append(files, fsutil.File{Path: a.configFile, Data: cfg.Bytes(), Perm: 0o600})

	if len(polFiles) > 0 {
		if err := os.MkdirAll(filepath.Join(a.stateDir, PoliciesDir), 0o700); err != nil {
			log.WithError(err).Error("configure: create policies dir")
			return fail(protocol.CodeInternal, "could not create the policies directory")
		}
	}
	if err := os.MkdirAll(filepath.Dir(a.configFile), 0o700); err != nil {
		log.WithError(err).Error("configure: create config dir")
		return fail(protocol.CodeInternal, "could not create the configuration directory")
	}
	a.verified = nil
	if err := fsutil.WriteFilesAtomic(files); err != nil {
		log.WithError(err).Error("configure: write files")
		return fail(protocol.CodeInternal, "could not write the configuration")
	}
	if certInstalled {
		a.pending = nil
		a.verified = verified
	}
	s.cfg = cfg
	log.WithFields(logrus.Fields{"certificate": certInstalled, "keys": cfg.Len()}).Info("configured; waiting for restart")
	return ok(nil)
}

// confined reports whether p is an absolute path inside the state
// directory, once cleaned (so "..", "." and doubled separators cannot
// escape it) and once the symbolic links of its existing part are
// followed (so a link inside the state directory cannot lead out of it).
func (a *Agent) confined(p string) bool {
	p = filepath.Clean(p)
	if !filepath.IsAbs(p) || !within(a.stateDir, p) {
		return false
	}
	root := a.stateRoot
	if root == "" {
		r, err := filepath.EvalSymlinks(a.stateDir)
		if err != nil {
			return false
		}
		root = r
	}
	rel, err := filepath.Rel(a.stateDir, p)
	if err != nil {
		return false
	}
	real, err := resolveBelow(root, rel)
	return err == nil && within(root, real)
}

// resolveBelow resolves rel (a clean relative path) below root, a directory
// whose own links are resolved: it looks at rel's components one by one and
// stops at the first that does not exist. Only when it meets a symbolic link
// does it resolve the whole path (resolveExisting), so the usual case costs
// one lstat per existing component below root instead of one per component
// from the file system root.
func resolveBelow(root, rel string) (string, error) {
	cur := root
	parts := strings.Split(rel, string(filepath.Separator))
	for i, part := range parts {
		next := filepath.Join(cur, part)
		fi, err := os.Lstat(next)
		switch {
		case errors.Is(err, os.ErrNotExist):
			return filepath.Join(append([]string{next}, parts[i+1:]...)...), nil
		case err != nil:
			return "", err
		case fi.Mode()&os.ModeSymlink != 0:
			return resolveExisting(filepath.Join(root, rel))
		}
		cur = next
	}
	return cur, nil
}

// within reports whether p lies strictly inside dir (both clean).
func within(dir, p string) bool {
	rel, err := filepath.Rel(dir, p)
	return err == nil && rel != "." && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator))
}

// resolveExisting follows the symbolic links of the longest existing
// prefix of p and appends the rest. A dangling link is an error.
func resolveExisting(p string) (string, error) {
	rest := ""
	for cur := p; ; {
		real, err := filepath.EvalSymlinks(cur)
		if err == nil {
			return filepath.Join(real, rest), nil
		}
		if _, lerr := os.Lstat(cur); lerr == nil || !errors.Is(err, os.ErrNotExist) {
			// There, but not resolvable: a dangling link, which could
			// point anywhere once its target appears.
			return "", err
		}
		parent := filepath.Dir(cur)
		if parent == cur {
			return "", err
		}
		rest = filepath.Join(filepath.Base(cur), rest)
		cur = parent
	}
}

// pendingKey is a key gencsr made and configure has not written yet.
type pendingKey struct {
	key crypto.Signer
	pem []byte
	csr []byte
}

// configureKey returns the key a configure certificate must match: the one
// the last gencsr made (pending: configure writes it and its CSR), or else
// the key already on disk (written by an earlier configure or placed by
// hand).
func (a *Agent) configureKey(keyPath string, log *logrus.Entry) (key crypto.Signer, keyPEM []byte, pending *pendingKey, ans *answer) {
	if p := a.pending; p != nil {
		return p.key, p.pem, p, nil
	}
	if !a.confined(keyPath) {
		an := fail(protocol.CodeConflict, "no usable private key on this node: gencsr must come before configure with a certificate")
		return nil, nil, nil, &an
	}
	keyPEM, err := os.ReadFile(keyPath)
	if errors.Is(err, os.ErrNotExist) {
		an := fail(protocol.CodeConflict, "no private key on this node: gencsr must come before configure with a certificate")
		return nil, nil, nil, &an
	}
	if err != nil {
		log.WithError(err).Error("configure: read private key")
		an := fail(protocol.CodeInternal, "could not read the private key")
		return nil, nil, nil, &an
	}
	key, err = pki.ParsePrivateKey(keyPEM)
	if err != nil {
		log.WithError(err).Error("configure: parse private key")
		an := fail(protocol.CodeConflict, "the private key on this node is unusable: run gencsr again")
		return nil, nil, nil, &an
	}
	return key, keyPEM, nil, nil
}

// policyFiles validates the policies of a configure request.
func (a *Agent) policyFiles(body protocol.ConfigureRequest) ([]fsutil.File, *answer) {
	var files []fsutil.File
	for _, set := range []struct {
		m   map[string]string
		ext string
	}{{body.ActionPolicies, ".policy"}, {body.OPAPolicies, ".rego"}} {
		for name, text := range set.m {
			if err := protocol.ValidateIdentity(name); err != nil {
				an := fail(protocol.CodeBadRequest, "policy name %q: must be letters, digits, '-', '_' and '.'", name)
				return nil, &an
			}
			if len(text) > maxPolicySize {
				an := fail(protocol.CodeBadRequest, "policy %q: larger than %d bytes", name, maxPolicySize)
				return nil, &an
			}
			files = append(files, fsutil.File{Path: filepath.Join(a.stateDir, PoliciesDir, name+set.ext), Data: []byte(text), Perm: 0o644})
		}
	}
	return files, nil
}

func splayOf(body protocol.RestartRequest) (time.Duration, *answer) {
	if body.SplayMillis < 0 {
		an := fail(protocol.CodeBadRequest, "splay_ms %d: must not be negative", body.SplayMillis)
		return 0, &an
	}
	max := DefaultRestartSplay
	if body.SplayMillis > 0 {
		max = time.Duration(body.SplayMillis) * time.Millisecond
	}
	if max > MaxRestartSplay {
		max = MaxRestartSplay
	}
	return time.Duration(rand.Int64N(int64(max) + 1)), nil
}

func (s *session) restart(body protocol.RestartRequest) answer {
	d, an := splayOf(body)
	if an != nil {
		return *an
	}
	return answer{code: protocol.CodeOK, act: actRestart, splay: d}
}

func (s *session) reprovision(body protocol.RestartRequest, log *logrus.Entry) answer {
	d, an := splayOf(body)
	if an != nil {
		return *an
	}
	cfg, err := config.Load(s.a.configFile)
	if errors.Is(err, os.ErrNotExist) {
		cfg, err = config.New(), nil
	}
	if err != nil {
		log.WithError(err).Error("reprovision: read configuration")
		return fail(protocol.CodeInternal, "could not read the configuration")
	}
	if err := cfg.Set(config.KeyProvision, "true"); err != nil {
		log.WithError(err).Error("reprovision: set provision")
		return fail(protocol.CodeInternal, "could not update the configuration")
	}
	if err := cfg.Save(s.a.configFile); err != nil {
		log.WithError(err).Error("reprovision: write configuration")
		return fail(protocol.CodeInternal, "could not write the configuration")
	}
	s.cfg = cfg
	log.Info("reprovision requested; restarting into provisioning mode")
	return answer{code: protocol.CodeOK, act: actRestart, splay: d}
}

func (s *session) shutdown(body protocol.ShutdownRequest, now time.Time, log *logrus.Entry) answer {
	marker := fmt.Sprintf("shut down by request at %s\n", now.UTC().Format(time.RFC3339))
	if err := fsutil.WriteFileAtomic(filepath.Join(s.a.stateDir, ShutdownMarker), []byte(marker), 0o600); err != nil {
		log.WithError(err).Error("shutdown: write marker")
		return fail(protocol.CodeInternal, "could not write the shutdown marker")
	}
	log.WithField("reason", body.Reason).Warn("shutdown requested; the agent stays down until the marker file is removed")
	return answer{code: protocol.CodeOK, act: actShutdown}
}
