package helper

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"sync"
)

// ServeOne makes an in-process Helper a helper program: it reads one
// request document from in (at most MaxRequestSize bytes), runs h and
// writes the reply document, followed by a newline, to out.
func ServeOne(ctx context.Context, h Helper, in io.Reader, out io.Writer) error {
	data, err := io.ReadAll(io.LimitReader(in, MaxRequestSize+1))
	if err != nil {
		return fmt.Errorf("read helper request: %w", err)
	}
	req, err := DecodeRequest(data)
	if err != nil {
		return err
	}
	return serveRequest(ctx, h, req, out)
}

// serveRequest answers one decoded request; a line-oriented mode calls it
// once per line.
func serveRequest(ctx context.Context, h Helper, req *Request, out io.Writer) error {
	rep, err := h.Provision(ctx, req)
	if err != nil {
		return err
	}
	if rep.RequestID == "" {
		rep.RequestID = req.RequestID
	}
	b, err := json.Marshal(rep)
	if err != nil {
		return fmt.Errorf("encode helper reply for %s: %w", req.Identity, err)
	}
	if _, err := out.Write(append(b, '\n')); err != nil {
		return fmt.Errorf("write helper reply: %w", err)
	}
	return nil
}

// ServeLines makes an in-process Helper a persistent helper program: it
// reads newline-delimited requests from in, answers up to concurrency of
// them at a time, and writes each reply as one line to out, tagged with the
// request's request_id (replies may be out of order). A request the helper
// fails gets a reply with "error" set; a line that is not a request is
// reported on errOut and skipped. It returns when in ends and every reply
// is written.
func ServeLines(ctx context.Context, h Helper, in io.Reader, out, errOut io.Writer, concurrency int) error {
	if concurrency <= 0 {
		concurrency = 1
	}
	sc := bufio.NewScanner(in)
	sc.Buffer(make([]byte, 0, 64*1024), MaxRequestSize)
	var wmu sync.Mutex
	var wg sync.WaitGroup
	sem := make(chan struct{}, concurrency)
	write := func(b []byte) {
		wmu.Lock()
		defer wmu.Unlock()
		_, _ = out.Write(append(b, '\n'))
	}
	for sc.Scan() {
		if len(sc.Bytes()) == 0 {
			continue
		}
		req, err := DecodeRequest(sc.Bytes())
		if err != nil || req.RequestID == "" {
			if err == nil {
				err = fmt.Errorf("request without request_id")
			}
			fmt.Fprintf(errOut, "skipping request line: %v\n", err)
			continue
		}
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			rep, err := h.Provision(ctx, req)
			if err != nil {
				rep = &Reply{Error: err.Error()}
			}
			rep.RequestID = req.RequestID
			b, err := json.Marshal(rep)
			if err != nil {
				b, _ = json.Marshal(&Reply{RequestID: req.RequestID, Error: "encode reply: " + err.Error()})
			}
			write(b)
		}()
	}
	wg.Wait()
	if err := sc.Err(); err != nil {
		return fmt.Errorf("read helper requests: %w", err)
	}
	return nil
}
