package protocol

import (
	"encoding/json"
	"testing"
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
