package protocol

import (
	"encoding/json"
	"testing"

	"github.com/nats-io/nkeys"
)

func BenchmarkRequestEncode(b *testing.B) {
	r := validRequest()
	r.Body = json.RawMessage(`{"key_type":"ecdsa-p256"}`)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := Marshal(r); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkRequestDecode(b *testing.B) {
	r := validRequest()
	r.Body = json.RawMessage(`{"key_type":"ecdsa-p256"}`)
	data, _ := Marshal(r)
	b.ReportAllocs()
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := DecodeRequest(data); err != nil {
			b.Fatal(err)
		}
	}
}

func BenchmarkReplyDecode(b *testing.B) {
	rep, _ := NewReply(validRequest(), "node1.example.net", CodeOK, "", Inventory{Facts: map[string]string{"country": "mt"}})
	data, _ := Marshal(rep)
	b.ReportAllocs()
	for b.Loop() {
		if _, err := DecodeReply(data); err != nil {
			b.Fatal(err)
		}
	}
}

func benchSigner(b *testing.B) (*Signer, *KeySet) {
	kp, err := nkeys.CreateUser()
	if err != nil {
		b.Fatal(err)
	}
	s, err := NewSigner(kp)
	if err != nil {
		b.Fatal(err)
	}
	pub, _ := kp.PublicKey()
	ks, err := NewKeySet([]string{pub})
	if err != nil {
		b.Fatal(err)
	}
	return s, ks
}

// BenchmarkRequestSign is the provisioner's cost per request it sends.
func BenchmarkRequestSign(b *testing.B) {
	s, _ := benchSigner(b)
	r := validRequest()
	r.Body = json.RawMessage(`{"key_type":"ecdsa-p256"}`)
	b.ReportAllocs()
	for b.Loop() {
		if err := r.Sign(s); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRequestVerify is the agent's cost per request it receives.
func BenchmarkRequestVerify(b *testing.B) {
	s, ks := benchSigner(b)
	r := validRequest()
	r.Body = json.RawMessage(`{"key_type":"ecdsa-p256"}`)
	if err := r.Sign(s); err != nil {
		b.Fatal(err)
	}
	b.ReportAllocs()
	for b.Loop() {
		if err := r.VerifySignature(ks); err != nil {
			b.Fatal(err)
		}
	}
}
